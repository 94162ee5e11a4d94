//! The `mailgate` binary: CLI, logging, signals. Everything else is in the library.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "mailgate",
    version,
    about = "TLS-terminating, protocol-cleaning gateway for legacy SMTP and POP3 servers"
)]
struct Cli {
    /// Log format on stdout.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway (refuses to start on an invalid configuration).
    Run {
        /// A YAML file, or a directory whose *.yaml files are merged.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Validate the configuration and print a summary; non-zero exit on error.
    Check {
        #[arg(short, long)]
        config: PathBuf,
        /// Exit non-zero on warnings too (for CI pipelines).
        #[arg(long)]
        strict: bool,
    },
    /// Start mailgate in front of an in-memory demo backend, with a generated certificate.
    Demo {
        /// Where the generated certificate and config go.
        #[arg(long, default_value = "/tmp/mailgate-demo")]
        dir: PathBuf,
        #[arg(long, default_value_t = 2525)]
        smtp_port: u16,
        #[arg(long, default_value_t = 4465)]
        smtps_port: u16,
        /// POP3 with STLS (TLS required before login).
        #[arg(long, default_value_t = 1110)]
        pop3_port: u16,
        /// POP3S (implicit TLS).
        #[arg(long, default_value_t = 9995)]
        pop3s_port: u16,
        /// IMAPS (implicit TLS).
        #[arg(long, default_value_t = 9993)]
        imaps_port: u16,
    },
    /// Print the JSON Schema of the configuration and policy format (for editors).
    Schema,
    /// DKIM signing keys.
    Dkim {
        #[command(subcommand)]
        command: DkimCmd,
    },
    /// Exit 0 if every configured listener answers with a greeting on loopback (container HEALTHCHECK).
    Healthcheck {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// The bans of the running gateway, over its metrics endpoint (`metrics.bind`).
    Bans {
        #[command(subcommand)]
        command: BansCmd,
    },
}

#[derive(Subcommand)]
enum BansCmd {
    /// List the bans in force (`GET /bans`).
    List {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Lift the bans covering an address (`DELETE /bans/<address>`, with the
    /// token of `metrics.admin_token_file`).
    Lift {
        #[arg(short, long)]
        config: PathBuf,
        /// An address, or a network as `list` shows it (2001:db8:1:2::/64).
        address: String,
    },
}

#[derive(Subcommand)]
enum DkimCmd {
    /// Write a new key file (mode 0600, never over an existing file) and print its DNS record.
    Keygen {
        /// The signing domain (`d=`).
        #[arg(long)]
        domain: String,
        /// The selector (`s=`): the record goes to <selector>._domainkey.<domain>.
        #[arg(long)]
        selector: String,
        #[arg(long, value_enum, default_value_t = KeyAlgorithm::Rsa)]
        algorithm: KeyAlgorithm,
        /// RSA key size: 2048, 3072 or 4096.
        #[arg(long, default_value_t = 2048)]
        bits: usize,
        /// The key file (default: <domain>.<selector>.pem).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum KeyAlgorithm {
    Rsa,
    Ed25519,
}

fn init_logs(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("MAILGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    // colours only on a terminal: container logs and files stay plain text
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .with_ansi(std::io::stdout().is_terminal());
    match format {
        // client-supplied strings in fields and messages: control characters escaped
        LogFormat::Text => b
            .fmt_fields(mailgate::observe::logfmt::EscapedFields)
            .init(),
        LogFormat::Json => b
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mailgate: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    match cli.command {
        Cmd::Check { config, strict } => match mailgate::config::load(&config) {
            Ok(c) => {
                use mailgate::config::warnings;
                let warnings = warnings::of(&c, &warnings::Host::probe(&c));
                print!("{}", c.check_output(&warnings));
                // Certificate files: missing ones are warnings (the example
                // configuration ships without keys); present ones must load.
                let present: Vec<_> = c
                    .certificates
                    .iter()
                    .filter(|(cert, key)| cert.exists() && key.exists())
                    .cloned()
                    .collect();
                if !present.is_empty() {
                    if let Err(e) = mailgate::tls::server_config(&present) {
                        eprintln!("error: {e}");
                        return Ok(std::process::ExitCode::FAILURE);
                    }
                }
                if strict && !warnings.is_empty() {
                    eprintln!("error: {} warning(s) under --strict", warnings.len());
                    return Ok(std::process::ExitCode::FAILURE);
                }
                Ok(std::process::ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("error: {e}");
                Ok(std::process::ExitCode::FAILURE)
            }
        },
        Cmd::Dkim {
            command:
                DkimCmd::Keygen {
                    domain,
                    selector,
                    algorithm,
                    bits,
                    out,
                },
        } => {
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{domain}.{selector}.pem")));
            let bits = matches!(algorithm, KeyAlgorithm::Rsa).then_some(bits);
            print!(
                "{}",
                mailgate::sign::keygen(&domain, &selector, bits, &out)?
            );
            Ok(std::process::ExitCode::SUCCESS)
        }
        Cmd::Schema => {
            println!("{}", mailgate::config::json_schema());
            Ok(std::process::ExitCode::SUCCESS)
        }
        Cmd::Run { config } => {
            init_logs(cli.log_format);
            let cfg = mailgate::config::load(&config)?;
            runtime()?.block_on(run(cfg, config))?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Cmd::Demo {
            dir,
            smtp_port,
            smtps_port,
            pop3_port,
            pop3s_port,
            imaps_port,
        } => {
            init_logs(cli.log_format);
            let ports = mailgate::demo::DemoPorts {
                smtp: smtp_port,
                smtps: smtps_port,
                pop3: pop3_port,
                pop3s: pop3s_port,
                imaps: imaps_port,
            };
            runtime()?.block_on(mailgate::demo::run(&dir, ports))?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Cmd::Bans { command } => {
            let (config, lift) = match command {
                BansCmd::List { config } => (config, None),
                BansCmd::Lift { config, address } => (config, Some(address)),
            };
            let cfg = mailgate::config::load(&config)?;
            runtime()?.block_on(bans(&cfg, lift))
        }
        Cmd::Healthcheck { config } => {
            let cfg = mailgate::config::load(&config)?;
            let ok = runtime()?.block_on(healthcheck(&cfg));
            Ok(if ok {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            })
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

async fn run(cfg: mailgate::config::Config, path: PathBuf) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // handlers first: a signal that arrives while listeners come up must not
    // meet the default action (SIGHUP would end the process)
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let gw = std::sync::Arc::new(mailgate::server::Gateway::start(&cfg).await?);
    drop(cfg);
    // The signal loop only hands SIGHUP on: reloading runs beside it, so a
    // SIGTERM during a slow reload is honoured at once.
    let wake = std::sync::Arc::new(tokio::sync::Notify::new());
    let reloader = tokio::spawn(reload_loop(gw.clone(), path, wake.clone()));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => wake.notify_one(),
        }
    }
    reloader.abort();
    tracing::info!(grace = ?gw.shutdown_grace(), "shutting down");
    let left = gw.shutdown().await;
    if left > 0 {
        tracing::warn!(
            sessions = left,
            "sessions still running after the grace period were dropped"
        );
    }
    Ok(())
}

/// One reload per wake-up; SIGHUPs during a reload coalesce into one more.
/// Reload: re-read every file; a broken one leaves the running configuration
/// in place. New sessions get the new snapshot.
async fn reload_loop(
    gw: std::sync::Arc<mailgate::server::Gateway>,
    path: PathBuf,
    wake: std::sync::Arc<tokio::sync::Notify>,
) {
    loop {
        wake.notified().await;
        // Reading and parsing block: on a thread of their own, not the
        // runtime's blocking pool (the runtime would wait for it at exit).
        let (tx, rx) = tokio::sync::oneshot::channel();
        let p = path.clone();
        let spawned = std::thread::Builder::new()
            .name("reload".into())
            .spawn(move || {
                let _ = tx.send(mailgate::config::load(&p));
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "reload failed; keeping the running configuration");
            continue;
        }
        let Ok(loaded) = rx.await else { continue };
        match loaded.map_err(|e| e.to_string()).and_then(|new| {
            gw.reload(&new)
                .map(|notes| (new, notes))
                .map_err(|e| e.to_string())
        }) {
            Ok((new, notes)) => {
                for n in notes {
                    tracing::warn!("{n}");
                }
                tracing::info!(files = new.sources.len(), "configuration reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "reload failed; keeping the running configuration")
            }
        }
    }
}

/// With a metrics endpoint: `GET /healthz` must answer 200. Without: connects
/// to each listener on loopback (0.0.0.0 → 127.0.0.1) and expects a greeting:
/// `220` (SMTP), `+OK` (POP3); implicit-TLS listeners must accept the connection.
async fn healthcheck(cfg: &mailgate::config::Config) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if let Some(addr) = cfg.metrics_bind.map(loopback) {
        let probe = async {
            let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .await
                .ok()?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.ok()?;
            buf.starts_with(b"HTTP/1.1 200").then_some(())
        };
        let ok = tokio::time::timeout(Duration::from_secs(5), probe)
            .await
            .ok()
            .flatten()
            .is_some();
        if !ok {
            eprintln!("metrics endpoint {addr} /healthz is not answering 200");
        }
        return ok;
    }
    let mut all = true;
    for l in &cfg.listeners {
        let addr = loopback(l.bind);
        let check = async {
            let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
            if l.tls == mailgate::config::TlsMode::Implicit {
                // accepting the TCP connection is what we can check without a client certificate store
                return Some(());
            }
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).await.ok()?;
            let ok = buf[..n].starts_with(b"220") || buf[..n].starts_with(b"+OK");
            let _ = s.write_all(b"QUIT\r\n").await;
            ok.then_some(())
        };
        let ok = tokio::time::timeout(Duration::from_secs(5), check)
            .await
            .ok()
            .flatten()
            .is_some();
        if !ok {
            eprintln!("listener {} ({addr}) is not answering", l.name);
            all = false;
        }
    }
    all
}

/// A bind address as a local client reaches it (0.0.0.0 → 127.0.0.1, [::] → [::1]).
fn loopback(mut addr: std::net::SocketAddr) -> std::net::SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            [127, 0, 0, 1].into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    addr
}

/// `mailgate bans list` (`lift` None) and `mailgate bans lift ADDRESS`.
async fn bans(
    cfg: &mailgate::config::Config,
    lift: Option<String>,
) -> anyhow::Result<std::process::ExitCode> {
    let addr = cfg
        .metrics_bind
        .map(loopback)
        .context("the configuration has no metrics: { bind } to reach the gateway's bans")?;
    let Some(address) = lift else {
        let (code, body) = admin_request(addr, "GET /bans", None).await?;
        anyhow::ensure!(code == 200, "{addr}: GET /bans answered {code}: {body}");
        let list: Vec<serde_json::Value> = serde_json::from_str(&body)
            .with_context(|| format!("{addr}: GET /bans is not a JSON list"))?;
        if list.is_empty() {
            println!("no bans");
        }
        for b in list {
            println!(
                "{}  policy={} rule={} expires_in={}s  ({})",
                b["address"].as_str().unwrap_or("?"),
                b["policy"].as_str().unwrap_or("?"),
                b["rule"].as_str().unwrap_or("?"),
                b["expires_in"],
                b["reason"].as_str().unwrap_or(""),
            );
        }
        return Ok(std::process::ExitCode::SUCCESS);
    };
    let host = address.split('/').next().unwrap_or("");
    anyhow::ensure!(
        host.parse::<std::net::IpAddr>().is_ok(),
        "{address:?} is not an IP address"
    );
    let request = format!("DELETE /bans/{address}");
    let token = cfg.admin_token.as_ref().map(|t| t.as_bytes());
    let (code, body) = admin_request(addr, &request, token).await?;
    let said = |why: &str| {
        eprintln!("mailgate: {why}");
        Ok(std::process::ExitCode::FAILURE)
    };
    match code {
        200 => {
            println!("lifted the bans covering {address}");
            Ok(std::process::ExitCode::SUCCESS)
        }
        403 => said("the gateway runs without metrics.admin_token_file: lifting bans is disabled"),
        401 if token.is_none() => said(
            "this configuration has no metrics.admin_token_file, and the gateway wants a token",
        ),
        401 => said("the gateway refused the token (is this the configuration it runs with?)"),
        404 => said(&format!("no ban covers {address}")),
        503 => {
            let here = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["lifted"].as_u64())
                .unwrap_or(0);
            said(&format!(
                "the gateway's state store did not answer ({here} ban(s) lifted on the gateway asked): other instances may still refuse {address}; try again"
            ))
        }
        _ => said(&format!("{addr}: {request} answered {code}: {body}")),
    }
}

/// One HTTP/1.1 request line (`METHOD /path`) to the metrics endpoint,
/// with a bearer token when given: (status, body). Bounded in time and size.
async fn admin_request(
    addr: std::net::SocketAddr,
    request: &str,
    token: Option<&[u8]>,
) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let mut head =
            format!("{request} HTTP/1.1\r\nHost: mailgate\r\nConnection: close\r\n").into_bytes();
        if let Some(t) = token {
            head.extend_from_slice(b"Authorization: Bearer ");
            head.extend_from_slice(t);
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        s.write_all(&head).await?;
        let mut buf = Vec::new();
        // 100,000 bans of about 170 bytes each fit
        s.take(64 * 1024 * 1024).read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("{addr}: no answer within 10 s"))?
        .with_context(|| format!("{addr}: metrics endpoint"))?;
    let text = String::from_utf8_lossy(&buf);
    let code = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("{addr}: not an HTTP answer"))?;
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Ok((code, body.to_string()))
}
