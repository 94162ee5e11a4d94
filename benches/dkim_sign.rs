//! DKIM signing cost, side by side in one run (`cargo bench --bench
//! dkim_sign`; issue 16 acceptance 4): CPU ms per 10 KiB message of the
//! `mailgate` process (utime + stime from /proc) relaying authenticated
//! submissions unsigned, signed with RSA-2048 and signed with Ed25519, and
//! the signing step alone (`sign::sign` on this thread). Each case runs a
//! fresh gateway with the same configuration but its `dkim_sign` block, in
//! front of a minimal in-process SMTP backend (EHLO with AUTH, 250 to
//! everything), the same client for all. Rounds alternate the cases;
//! medians are printed. Prints figures; asserts only that every message was
//! accepted. `MESSAGES` (default 2000) per case and round, `ROUNDS` (3).

#[path = "../tests/common/mod.rs"]
mod common;

use common::SmtpClient;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

const PER_SESSION: usize = 50;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A 10 KiB message of `alice@example.org` (typical headers, text body).
fn message() -> Vec<u8> {
    let mut m = b"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.net>\r\nSubject: a 10 KiB message\r\nDate: Tue, 1 Dec 2026 12:00:00 +0000\r\nMessage-ID: <bench@example.org>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n".to_vec();
    let mut i = 0;
    while m.len() < 10 * 1024 {
        m.extend_from_slice(
            format!("line {i:04}: the quick brown fox jumps over the lazy dog, twice.\r\n")
                .as_bytes(),
        );
        i += 1;
    }
    m
}

// ---------------------------------------------------------------------------
// the backend: accepts AUTH and every message

async fn backend(l: TcpListener) {
    loop {
        let Ok((s, _)) = l.accept().await else { return };
        tokio::spawn(async move {
            let mut r = BufReader::new(s);
            let _ = r.get_mut().write_all(b"220 bench ESMTP\r\n").await;
            let mut line = String::new();
            loop {
                line.clear();
                if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                let answer: &[u8] = match verb.as_str() {
                    "EHLO" => {
                        b"250-bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 AUTH PLAIN LOGIN\r\n"
                    }
                    "HELO" => b"250 bench\r\n",
                    "AUTH" => b"235 2.7.0 ok\r\n",
                    "DATA" => {
                        let _ = r.get_mut().write_all(b"354 go\r\n").await;
                        let mut l = Vec::new();
                        loop {
                            l.clear();
                            if r.read_until(b'\n', &mut l).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if l == b".\r\n" {
                                break;
                            }
                        }
                        b"250 2.0.0 queued\r\n"
                    }
                    "QUIT" => {
                        let _ = r.get_mut().write_all(b"221 bye\r\n").await;
                        return;
                    }
                    _ => b"250 ok\r\n",
                };
                if r.get_mut().write_all(answer).await.is_err() {
                    return;
                }
            }
        });
    }
}

// ---------------------------------------------------------------------------
// the client

/// Waits until the gateway offers AUTH: it does once its probe of the
/// backend has seen the backend's AUTH.
async fn wait_ready(addr: SocketAddr, ca: &Path) {
    let start = Instant::now();
    loop {
        let mut c = SmtpClient::connect(addr).await.tls(ca).await;
        c.expect(220).await;
        let ehlo = c.cmd("EHLO bench.example").await;
        c.cmd("QUIT").await;
        if ehlo.contains("AUTH") {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{ehlo}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `n` messages over implicit TLS, AUTH PLAIN, `PER_SESSION` per connection.
async fn submit(addr: SocketAddr, ca: &Path, n: usize, stuffed: &[u8]) {
    let mut left = n;
    while left > 0 {
        let mut c = SmtpClient::connect(addr).await.tls(ca).await;
        c.expect(220).await;
        c.cmd("EHLO bench.example").await;
        c.send(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n").await;
        c.expect(235).await;
        for _ in 0..PER_SESSION.min(left) {
            c.send(b"MAIL FROM:<alice@example.org>\r\n").await;
            c.expect(250).await;
            c.send(b"RCPT TO:<bob@example.net>\r\n").await;
            c.expect(250).await;
            c.send(b"DATA\r\n").await;
            c.expect(354).await;
            c.send(stuffed).await;
            c.expect(250).await;
            left -= 1;
        }
        c.cmd("QUIT").await;
    }
}

// ---------------------------------------------------------------------------
// the gateway

struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// utime + stime of `pid`, in seconds.
fn cpu_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // fields after the command name (which may hold spaces) in parentheses
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / ticks
}

fn start_gateway(dir: &Path, case: &str, backend: SocketAddr, dkim: &str) -> (Gateway, SocketAddr) {
    let config = dir.join(format!("{case}.yaml"));
    std::fs::write(
        &config,
        format!(
            "server: {{ hostname: gw.bench }}
tls:
  certificates: [ {{ cert: cert.pem, key: key.pem }} ]
backends:
  b: {{ address: \"{backend}\" }}
listeners:
  - {{ name: submission, protocol: smtp, bind: \"127.0.0.1:0\", tls: implicit, auth: required, backend: b, policy: p }}
policies:
  p:
    deny: [\"192.0.2.0/24\"]
{dkim}"
        ),
    )
    .unwrap();
    let log = dir.join(format!("{case}.log"));
    let child = Command::new(env!("CARGO_BIN_EXE_mailgate"))
        .args(["--log-format", "json", "run", "--config"])
        .arg(&config)
        .env("MAILGATE_LOG", "warn,mailgate::server=info")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let gw = Gateway(child);
    (gw, common::listening(&log, &["submission"])["submission"])
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let messages = env("MESSAGES", 2000);
    let rounds = env("ROUNDS", 3).max(1);
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = mailgate::tls::write_self_signed(dir.path(), &["localhost"]).unwrap();
    let mut cases = vec![("unsigned", String::new(), None)];
    for (name, bits) in [("rsa-2048", Some(2048)), ("ed25519", None)] {
        let path = dir.path().join(format!("{name}.pem"));
        let new = mailgate::sign::generate(bits).unwrap();
        mailgate::sign::key::write_new(&path, &new.pem).unwrap();
        let block = format!(
            "    dkim_sign:\n      keys: [ {{ domain: example.org, selector: {name}, key: {} }} ]\n",
            path.display()
        );
        let key = mailgate::sign::load_key("example.org", name, &path).unwrap();
        cases.push((name, block, Some(key)));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let l = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let backend_addr = l.local_addr().unwrap();
    rt.spawn(backend(l));
    let msg = message();
    let stuffed = mailgate::smtp::data::stuff(&[&msg]);

    let mut gateway_ms: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for round in 0..rounds {
        for (i, (name, block, _)) in cases.iter().enumerate() {
            let (gw, addr) = start_gateway(dir.path(), name, backend_addr, block);
            // warm-up: backend probe, first sessions, first signatures
            rt.block_on(wait_ready(addr, &ca));
            rt.block_on(submit(addr, &ca, PER_SESSION, &stuffed));
            let before = cpu_of(gw.0.id());
            let wall = Instant::now();
            rt.block_on(submit(addr, &ca, messages, &stuffed));
            let cpu = cpu_of(gw.0.id()) - before;
            let per = cpu * 1000.0 / messages as f64;
            eprintln!(
                "round {}: {name:<9} {per:.3} CPU ms/msg ({:.1} s wall)",
                round + 1,
                wall.elapsed().as_secs_f64()
            );
            gateway_ms[i].push(per);
        }
    }

    // the signing step alone, on this thread
    let policy = |key: Arc<mailgate::sign::SignKey>| mailgate::sign::SignPolicy {
        keys: vec![key],
        unknown_domain: mailgate::sign::UnknownDomain::Reject,
        match_envelope_sender: false,
        canonicalization: (
            mail_auth::dkim::Canonicalization::Relaxed,
            mail_auth::dkim::Canonicalization::Relaxed,
        ),
        expiry: None,
    };
    let ours = b"Received: from bench.example ([127.0.0.1])\r\n\tby gw.bench (mailgate) with ESMTPSA id 1;\r\n\tTue, 1 Dec 2026 12:00:00 +0000\r\n".to_vec();
    let thread_cpu = || {
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
        let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
        t(ru.ru_utime) + t(ru.ru_stime)
    };
    let mut sign_ms = vec![None; cases.len()];
    for (i, (_, _, key)) in cases.iter().enumerate() {
        let Some(key) = key else { continue };
        let p = policy(key.clone());
        let n = messages.max(200);
        let before = thread_cpu();
        for _ in 0..n {
            let fields = mailgate::sign::sign(&p, &p.keys, &[&ours, &msg]).unwrap();
            std::hint::black_box(fields);
        }
        sign_ms[i] = Some((thread_cpu() - before) * 1000.0 / n as f64);
    }

    println!(
        "\nDKIM signing, 10 KiB messages ({} bytes), {messages} per case and round, median of {rounds} rounds",
        msg.len()
    );
    println!(
        "{:<10} {:>22} {:>18} {:>20}",
        "case", "mailgate CPU ms/msg", "vs unsigned", "sign() alone ms/msg"
    );
    let base = median(gateway_ms[0].clone());
    for (i, (name, _, _)) in cases.iter().enumerate() {
        let m = median(gateway_ms[i].clone());
        println!(
            "{:<10} {:>22.3} {:>18} {:>20}",
            name,
            m,
            if i == 0 {
                "-".to_string()
            } else {
                format!("{:+.3} ({:.2}x)", m - base, m / base)
            },
            sign_ms[i].map_or("-".to_string(), |s| format!("{s:.3}"))
        );
    }
}
