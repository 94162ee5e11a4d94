//! The load generator for the side-by-side benchmarks (`bench/run.sh`,
//! `bench/smtp.sh`): tokio + rustls, SMTP and POP3.
//!
//! ```text
//! cargo run --release --ignore-rust-version --example loadgen -- \
//!     --addr 127.0.0.1:2525 --mode starttls --ca cert.pem -c 20 -n 2000 --size 10240
//! cargo run ... --example loadgen -- --proto pop3 --addr 127.0.0.1:9995 --mode implicit \
//!     --ca cert.pem --user bench --pass bench -c 4 -n 400 --per-conn 10
//! cargo run ... --example loadgen -- --addr 127.0.0.1:2525 --mode starttls --ca cert.pem --idle 1000 --hold 10
//! ```
//! SMTP: `-n` messages, `--per-conn` messages per connection. POP3: `-n`
//! sessions of login, `--per-conn` RETRs (cycling over the maildrop), QUIT;
//! retrieved bytes are counted and every RETR must end in `.CRLF`.
//! Modes: `plain`, `starttls`, `implicit`; `--resume` reuses TLS sessions. One new connection per message
//! (the worst case for a TLS proxy). Prints msgs/s, latency percentiles and
//! errors; `--idle N` instead opens N sessions (TLS established, EHLO done;
//! with `--idle-rcpt` also MAIL and RCPT answered, so mailgate holds a backend
//! connection for each), prints `IDLE READY`, holds them for `--hold` seconds
//! and closes them. Idle sessions come from source addresses 127.0.0.1–250 in
//! turn (no ephemeral-port exhaustion at 10,000 sessions).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Clone)]
struct Opts {
    addr: String,
    mode: String,
    ca: Option<String>,
    concurrency: usize,
    messages: usize,
    size: usize,
    idle: usize,
    idle_rcpt: bool,
    hold: u64,
    resume: bool,
    proto: String,
    per_conn: usize,
    user: String,
    pass: String,
}

fn parse() -> Opts {
    let mut o = Opts {
        addr: "127.0.0.1:2525".into(),
        mode: "plain".into(),
        ca: None,
        concurrency: 20,
        messages: 1000,
        size: 10240,
        idle: 0,
        idle_rcpt: false,
        hold: 10,
        resume: false,
        proto: "smtp".into(),
        per_conn: 1,
        user: "bench".into(),
        pass: "bench".into(),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--addr" => o.addr = v,
            "--mode" => o.mode = v,
            "--ca" => o.ca = Some(v),
            "-c" | "--concurrency" => o.concurrency = v.parse().expect("-c N"),
            "-n" | "--messages" => o.messages = v.parse().expect("-n N"),
            "--size" => o.size = v.parse().expect("--size BYTES"),
            "--idle" => o.idle = v.parse().expect("--idle N"),
            "--hold" => o.hold = v.parse().expect("--hold SECONDS"),
            "--proto" => o.proto = v,
            "--per-conn" => o.per_conn = v.parse().expect("--per-conn N"),
            "--user" => o.user = v,
            "--pass" => o.pass = v,
            "--resume" => {
                o.resume = true;
                i += 1;
                continue;
            }
            "--idle-rcpt" => {
                o.idle_rcpt = true;
                i += 1;
                continue;
            }
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    o
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn reply<S: AsyncRead + Unpin>(r: &mut BufReader<S>) -> std::io::Result<u16> {
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Err(std::io::Error::other("closed"));
        }
        if line.len() < 4 || line.as_bytes()[3] != b'-' {
            return line
                .get(..3)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| std::io::Error::other("bad reply"));
        }
    }
}

async fn expect<S: AsyncRead + Unpin>(r: &mut BufReader<S>, code: u16) -> std::io::Result<()> {
    let c = reply(r).await?;
    if c != code {
        return Err(std::io::Error::other(format!("expected {code}, got {c}")));
    }
    Ok(())
}

/// Without `--resume` every connection is a full handshake (the worst case);
/// with it, TLS session tickets / IDs are reused as real MTAs do.
fn connector(ca: &Option<String>, resume: bool) -> Option<tokio_rustls::TlsConnector> {
    use rustls_pki_types::pem::PemObject;
    let ca = ca.as_ref()?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca).expect("--ca file") {
        roots.add(c.expect("certificate")).expect("root");
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut cfg = cfg;
    if !resume {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    Some(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

async fn pop_line<S: AsyncRead + Unpin>(r: &mut BufReader<S>) -> std::io::Result<String> {
    let mut line = String::new();
    if r.read_line(&mut line).await? == 0 {
        return Err(std::io::Error::other("closed"));
    }
    Ok(line)
}

async fn pop_ok<S: AsyncRead + Unpin>(r: &mut BufReader<S>) -> std::io::Result<()> {
    let l = pop_line(r).await?;
    if !l.starts_with("+OK") {
        return Err(std::io::Error::other(format!(
            "expected +OK, got {}",
            l.trim_end()
        )));
    }
    Ok(())
}

/// POP3: greeting (and STLS), ready for USER.
async fn open_pop3(
    o: &Opts,
    tls: &Option<tokio_rustls::TlsConnector>,
) -> std::io::Result<BufReader<Box<dyn Io>>> {
    let tcp = TcpStream::connect(&o.addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let stream: Box<dyn Io> = match o.mode.as_str() {
        "implicit" => Box::new(
            tls.as_ref()
                .expect("--ca needed")
                .connect(name, tcp)
                .await?,
        ),
        "starttls" => {
            let mut r = BufReader::new(tcp);
            pop_ok(&mut r).await?;
            r.get_mut().write_all(b"STLS\r\n").await?;
            pop_ok(&mut r).await?;
            let s: Box<dyn Io> = Box::new(
                tls.as_ref()
                    .expect("--ca needed")
                    .connect(name, r.into_inner())
                    .await?,
            );
            return Ok(BufReader::new(s));
        }
        _ => Box::new(tcp),
    };
    let mut r = BufReader::new(stream);
    pop_ok(&mut r).await?;
    Ok(r)
}

/// One POP3 session: login, `per_conn` RETRs, QUIT. Returns bytes retrieved.
async fn one_pop3(o: &Opts, tls: &Option<tokio_rustls::TlsConnector>) -> std::io::Result<usize> {
    let mut r = open_pop3(o, tls).await?;
    r.get_mut()
        .write_all(format!("USER {}\r\n", o.user).as_bytes())
        .await?;
    pop_ok(&mut r).await?;
    r.get_mut()
        .write_all(format!("PASS {}\r\n", o.pass).as_bytes())
        .await?;
    pop_ok(&mut r).await?;
    r.get_mut().write_all(b"STAT\r\n").await?;
    let stat = pop_line(&mut r).await?;
    let count: usize = stat
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if count == 0 {
        return Err(std::io::Error::other("empty maildrop"));
    }
    let mut bytes = 0;
    for i in 0..o.per_conn {
        r.get_mut()
            .write_all(format!("RETR {}\r\n", i % count + 1).as_bytes())
            .await?;
        pop_ok(&mut r).await?;
        loop {
            let l = pop_line(&mut r).await?;
            bytes += l.len();
            if l == ".\r\n" {
                break;
            }
        }
    }
    r.get_mut().write_all(b"QUIT\r\n").await?;
    let _ = pop_line(&mut r).await;
    Ok(bytes)
}

/// Connects from loopback source address 127.0.0.`1 + n % 250` (`n`: the
/// session's number), so many held sessions do not share one address's ports.
async fn connect_from(o: &Opts, n: usize) -> std::io::Result<TcpStream> {
    let addr: std::net::SocketAddr = o
        .addr
        .parse()
        .map_err(|_| std::io::Error::other("--addr IP:PORT"))?;
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(std::net::SocketAddr::from((
        [127, 0, 0, 1 + (n % 250) as u8],
        0,
    )))?;
    sock.connect(addr).await
}

/// Connects and brings the session to "EHLO answered" in the requested mode.
async fn open(
    o: &Opts,
    tls: &Option<tokio_rustls::TlsConnector>,
) -> std::io::Result<BufReader<Box<dyn Io>>> {
    if o.proto == "pop3" {
        return open_pop3(o, tls).await;
    }
    let tcp = TcpStream::connect(&o.addr).await?;
    open_on(o, tls, tcp).await
}

async fn open_on(
    o: &Opts,
    tls: &Option<tokio_rustls::TlsConnector>,
    tcp: TcpStream,
) -> std::io::Result<BufReader<Box<dyn Io>>> {
    tcp.set_nodelay(true)?;
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let stream: Box<dyn Io> = match o.mode.as_str() {
        "implicit" => Box::new(
            tls.as_ref()
                .expect("--ca needed")
                .connect(name, tcp)
                .await?,
        ),
        "starttls" => {
            let mut r = BufReader::new(tcp);
            expect(&mut r, 220).await?;
            r.get_mut()
                .write_all(b"EHLO load.test\r\nSTARTTLS\r\n")
                .await?;
            expect(&mut r, 250).await?;
            expect(&mut r, 220).await?;
            let tcp = r.into_inner();
            let mut s: Box<dyn Io> = Box::new(
                tls.as_ref()
                    .expect("--ca needed")
                    .connect(name, tcp)
                    .await?,
            );
            s.write_all(b"EHLO load.test\r\n").await?;
            let mut r = BufReader::new(s);
            expect(&mut r, 250).await?;
            return Ok(r);
        }
        _ => Box::new(tcp),
    };
    let mut r = BufReader::new(stream);
    expect(&mut r, 220).await?;
    r.get_mut().write_all(b"EHLO load.test\r\n").await?;
    expect(&mut r, 250).await?;
    Ok(r)
}

/// One SMTP connection delivering `per_conn` messages. Returns messages acknowledged.
async fn one_message(
    o: &Opts,
    tls: &Option<tokio_rustls::TlsConnector>,
    body: &[u8],
) -> std::io::Result<usize> {
    let mut r = open(o, tls).await?;
    for _ in 0..o.per_conn.max(1) {
        // PIPELINING: envelope in one write
        r.get_mut()
            .write_all(b"MAIL FROM:<load@example.org>\r\nRCPT TO:<sink@example.net>\r\nDATA\r\n")
            .await?;
        expect(&mut r, 250).await?;
        expect(&mut r, 250).await?;
        expect(&mut r, 354).await?;
        r.get_mut().write_all(body).await?;
        expect(&mut r, 250).await?;
    }
    r.get_mut().write_all(b"QUIT\r\n").await?;
    let _ = reply(&mut r).await;
    Ok(o.per_conn.max(1))
}

/// One held SMTP session (`--idle`): EHLO answered, and with `--idle-rcpt`
/// an envelope open (MAIL and RCPT answered 250).
async fn idle_session(
    o: &Opts,
    tls: &Option<tokio_rustls::TlsConnector>,
    n: usize,
) -> std::io::Result<BufReader<Box<dyn Io>>> {
    let tcp = connect_from(o, n).await?;
    let mut r = open_on(o, tls, tcp).await?;
    if o.idle_rcpt {
        r.get_mut()
            .write_all(b"MAIL FROM:<load@example.org>\r\nRCPT TO:<sink@example.net>\r\n")
            .await?;
        expect(&mut r, 250).await?;
        expect(&mut r, 250).await?;
    }
    Ok(r)
}

#[tokio::main]
async fn main() {
    let o = parse();
    let tls = connector(&o.ca, o.resume);
    if o.idle > 0 {
        let mut held = Vec::with_capacity(o.idle);
        let mut errors = 0;
        for n in 0..o.idle {
            match idle_session(&o, &tls, n).await {
                Ok(s) => held.push(s),
                Err(e) => {
                    errors += 1;
                    if errors <= 3 {
                        eprintln!("error: {e}");
                    }
                }
            }
        }
        println!("IDLE READY sessions={} errors={errors}", held.len());
        tokio::time::sleep(Duration::from_secs(o.hold)).await;
        drop(held);
        return;
    }
    let mut body =
        b"From: load@example.org\r\nTo: sink@example.net\r\nSubject: load\r\n\r\n".to_vec();
    while body.len() < o.size {
        body.extend_from_slice(
            b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n",
        );
    }
    body.extend_from_slice(b".\r\n");
    let body = Arc::new(body);
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..o.concurrency {
        let (o, tls, body, next, errors) = (
            o.clone(),
            tls.clone(),
            body.clone(),
            next.clone(),
            errors.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut units = 0usize;
            while next.fetch_add(1, Ordering::Relaxed) < o.messages {
                let t = Instant::now();
                let r = if o.proto == "pop3" {
                    tokio::time::timeout(Duration::from_secs(60), one_pop3(&o, &tls))
                        .await
                        .map(|r| r.map(|_| 1))
                } else {
                    tokio::time::timeout(Duration::from_secs(60), one_message(&o, &tls, &body))
                        .await
                };
                match r {
                    Ok(Ok(n)) => {
                        lat.push(t.elapsed());
                        units += n;
                    }
                    Ok(Err(e)) => {
                        if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("error: {e}");
                        }
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            (lat, units)
        }));
    }
    let mut lat = Vec::new();
    let mut acked = 0;
    for t in tasks {
        let (l, n) = t.await.expect("worker");
        lat.extend(l);
        acked += n;
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    };
    println!(
        "RESULT proto={} mode={} ok={} acked={} errors={} secs={:.2} msgs_per_s={:.1} p50_ms={:.2} p90_ms={:.2} p99_ms={:.2} max_ms={:.2}",
        o.proto,
        o.mode,
        lat.len(),
        acked,
        errors.load(Ordering::Relaxed),
        secs,
        lat.len() as f64 / secs,
        pct(0.5),
        pct(0.9),
        pct(0.99),
        lat.last().map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0)
    );
}
