//! Policy engine acceptance tests, the gateway in-process on loopback. Client
//! addresses differ by binding the client socket to 127.0.0.x.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

async fn connect_from(src: &str, dst: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{src}:0").parse().unwrap()).unwrap();
    s.connect(dst).await.unwrap()
}

/// Reads one reply line (tests here only need single-line replies or the code).
async fn reply<S: AsyncRead + Unpin>(s: &mut S) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
            .await
            .expect("reply timed out")
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                out.push(b[0]);
                if b[0] == b'\n' {
                    let line = String::from_utf8_lossy(&out).to_string();
                    if line.len() >= 4 && line.as_bytes()[3] == b'-' {
                        out.clear();
                        continue;
                    }
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&out).to_string()
}

async fn say<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, line: &str) -> String {
    s.write_all(line.as_bytes()).await.unwrap();
    s.write_all(b"\r\n").await.unwrap();
    reply(s).await
}

/// A legacy SMTP server that knows one account (alice / secret) and counts AUTH attempts.
async fn auth_backend(attempts: Arc<AtomicUsize>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let attempts = attempts.clone();
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut r = tokio::io::BufReader::new(r);
                w.write_all(b"220 legacy ESMTP\r\n").await.unwrap();
                let mut line = String::new();
                use tokio::io::AsyncBufReadExt;
                while r.read_line(&mut line).await.unwrap_or(0) > 0 {
                    let up = line.trim_end().to_string();
                    let answer: &[u8] = if up.starts_with("EHLO") {
                        b"250-legacy\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n"
                    } else if let Some(b64) = up.strip_prefix("AUTH PLAIN ") {
                        attempts.fetch_add(1, Ordering::SeqCst);
                        // \0alice\0secret
                        if b64 == "AGFsaWNlAHNlY3JldA==" {
                            b"235 2.7.0 ok\r\n"
                        } else {
                            b"535 5.7.8 no\r\n"
                        }
                    } else if up == "QUIT" {
                        let _ = w.write_all(b"221 bye\r\n").await;
                        return;
                    } else {
                        b"250 ok\r\n"
                    };
                    if w.write_all(answer).await.is_err() {
                        return;
                    }
                    line.clear();
                }
            });
        }
    });
    addr
}

fn cfg(dir: &std::path::Path, backend: &str, limits: &str, extra_listener: &str) -> String {
    format!(
        r#"
server: {{ hostname: gw.test }}
listeners:
  - {{ name: mx, protocol: smtp, bind: "127.0.0.1:0", tls: none, backend: b, policy: p }}
  - {{ name: sub, protocol: smtp, bind: "127.0.0.1:0", tls: implicit, auth: required, backend: b, policy: p, login_failure_delay: 10ms {extra_listener} }}
tls:
  certificates: [ {{ cert: "{d}/cert.pem", key: "{d}/key.pem" }} ]
backends:
  b: {{ address: "{backend}" }}
policies:
  p:
    limits:
{limits}
"#,
        d = dir.display()
    )
}

async fn sink() -> String {
    let mb = Arc::new(mailgate::demo::Mailbox::default());
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(mailgate::demo::serve_smtp(l, mb));
    addr
}

/// Acceptance 1: the 6th connection within a minute from one IP gets the
/// configured reply; other IPs are unaffected.
#[tokio::test]
async fn connection_rate_per_ip() {
    let dir = tempfile::tempdir().unwrap();
    common::dev_cert(dir.path());
    let y = cfg(
        dir.path(),
        &sink().await,
        "      - { key: [ip], rate: 5/minute, burst: 5, action: tempfail }",
        "",
    );
    let gw = common::start(&y).await;
    let addr = gw.addr("mx").unwrap();
    let mut held = Vec::new();
    for i in 0..5 {
        let mut s = connect_from("127.0.0.2", addr).await;
        assert!(reply(&mut s).await.starts_with("220"), "connection {i}");
        held.push(s);
    }
    let mut s = connect_from("127.0.0.2", addr).await;
    let r = reply(&mut s).await;
    assert!(r.starts_with("421 4.7.0"), "6th: {r}");
    let mut other = connect_from("127.0.0.3", addr).await;
    assert!(reply(&mut other).await.starts_with("220"));
    let hits = gw.policy("mx").unwrap().hits();
    assert_eq!(hits[0].1, 1, "counted per rule: {hits:?}");
}

/// Acceptance 2: a third simultaneous session is refused, and accepted again
/// once one closes.
#[tokio::test]
async fn concurrent_sessions_per_ip() {
    let dir = tempfile::tempdir().unwrap();
    common::dev_cert(dir.path());
    let y = cfg(
        dir.path(),
        &sink().await,
        "      - { key: [ip], concurrent: 2, action: reject }",
        "",
    );
    let gw = common::start(&y).await;
    let addr = gw.addr("mx").unwrap();
    let mut a = connect_from("127.0.0.4", addr).await;
    assert!(reply(&mut a).await.starts_with("220"));
    let mut b = connect_from("127.0.0.4", addr).await;
    assert!(reply(&mut b).await.starts_with("220"));
    let mut c = connect_from("127.0.0.4", addr).await;
    let r = reply(&mut c).await;
    assert!(r.starts_with("554 5.7.1"), "third: {r}");
    let mut d = connect_from("127.0.0.5", addr).await;
    assert!(
        reply(&mut d).await.starts_with("220"),
        "other IP unaffected"
    );
    assert!(say(&mut a, "QUIT").await.starts_with("221"));
    drop(a);
    // the slot frees when the session task ends
    let mut ok = false;
    for _ in 0..50 {
        let mut e = connect_from("127.0.0.4", addr).await;
        if reply(&mut e).await.starts_with("220") {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "accepted again after one closed");
}

async fn tls_session(
    gw: &mailgate::server::Gateway,
    ca: &std::path::Path,
    src: &str,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = connect_from(src, gw.addr("sub").unwrap()).await;
    let connector = tokio_rustls::TlsConnector::from(common::tls_client(ca));
    let mut t = connector
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    assert!(reply(&mut t).await.starts_with("220"));
    let ehlo = say(&mut t, "EHLO c.test").await;
    assert!(ehlo.starts_with("250 "), "{ehlo}");
    t
}

const GOOD: &str = "AUTH PLAIN AGFsaWNlAHNlY3JldA=="; // alice / secret
const BAD: &str = "AUTH PLAIN AGFsaWNlAHdyb25n"; // alice / wrong

/// Acceptance 3 (SMTP AUTH side): 5 wrong passwords from one IP lock that IP
/// for the window without the backend seeing further attempts; the same user
/// still gets in from a network where she logged in before, and the reply
/// never says whether the user exists.
#[tokio::test]
async fn brute_force_via_smtp_auth_is_lockout_safe() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = common::dev_cert(dir.path());
    let attempts = Arc::new(AtomicUsize::new(0));
    let backend = auth_backend(attempts.clone()).await;
    let limits = "      - { name: auth-ip, key: [ip], auth_failures: 5/15minutes, action: reject }\n      - { name: auth-user, key: [auth_user], auth_failures: 5/15minutes, action: tempfail }";
    // the per-session cap (max_login_failures) is not what this test is about
    let gw = common::start(&cfg(
        dir.path(),
        &backend,
        limits,
        ", max_login_failures: 10",
    ))
    .await;

    // alice logs in from her usual network first
    let mut home = tls_session(&gw, &ca, "127.0.0.20").await;
    assert!(say(&mut home, GOOD).await.starts_with("235"));
    drop(home);

    let mut evil = tls_session(&gw, &ca, "127.0.2.66").await;
    for i in 0..5 {
        let r = say(&mut evil, BAD).await;
        assert!(r.starts_with("535 5.7.8"), "failure {i}: {r}");
    }
    assert_eq!(attempts.load(Ordering::SeqCst), 6);
    // locked for the window: refused without reaching the backend
    let r = say(&mut evil, GOOD).await;
    assert!(r.starts_with("535 5.7.8"), "locked IP: {r}");
    let mut evil2 = tls_session(&gw, &ca, "127.0.2.66").await;
    assert!(
        say(&mut evil2, GOOD).await.starts_with("535"),
        "new session, same IP"
    );
    // an unknown user gets exactly the same reply as a wrong password
    let r = say(&mut evil2, "AUTH PLAIN AG5vYm9keQB4").await;
    assert!(
        r.starts_with("535 5.7.8 Authentication credentials invalid"),
        "{r}"
    );
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        6,
        "no attempt reached the backend"
    );

    // alice's per-user lock is in force elsewhere ...
    let mut fresh = tls_session(&gw, &ca, "127.0.1.77").await;
    let r = say(&mut fresh, GOOD).await;
    assert!(
        r.starts_with("454 4.7.0"),
        "per-user lock from a new network: {r}"
    );
    // ... but not from her known-good network
    let mut home = tls_session(&gw, &ca, "127.0.0.20").await;
    let r = say(&mut home, GOOD).await;
    assert!(r.starts_with("235"), "known-good network: {r}");
}

/// Acceptance 4: shadow never refuses, but counts and logs.
#[tokio::test]
async fn shadow_only_counts() {
    let dir = tempfile::tempdir().unwrap();
    common::dev_cert(dir.path());
    let y = cfg(
        dir.path(),
        &sink().await,
        "      - { name: would, key: [ip], rate: 1/minute, burst: 1, action: shadow }",
        "",
    );
    let gw = common::start(&y).await;
    for _ in 0..4 {
        let mut s = connect_from("127.0.0.9", gw.addr("mx").unwrap()).await;
        assert!(reply(&mut s).await.starts_with("220"));
    }
    assert_eq!(
        gw.policy("mx").unwrap().hits(),
        vec![("would".to_string(), 0, 3)]
    );
}

/// Limits at MAIL and RCPT, and delay (tarpit) continuing afterwards.
#[tokio::test]
async fn mail_and_rcpt_limits() {
    let dir = tempfile::tempdir().unwrap();
    common::dev_cert(dir.path());
    let limits = "      - { key: [sender_domain], messages: 2/hour, action: tempfail }\n      - { key: [ip], recipients_per_message: 2, action: reject }\n      - { key: [rcpt], recipients: 1/hour, action: delay, max_delay: 200ms }";
    let gw = common::start(&cfg(dir.path(), &sink().await, limits, "")).await;
    let mut s = connect_from("127.0.0.10", gw.addr("mx").unwrap()).await;
    reply(&mut s).await;
    say(&mut s, "EHLO c").await;
    assert!(say(&mut s, "MAIL FROM:<a@example.org>")
        .await
        .starts_with("250"));
    assert!(say(&mut s, "RCPT TO:<x@example.net>")
        .await
        .starts_with("250"));
    let t = std::time::Instant::now();
    assert!(
        say(&mut s, "RCPT TO:<x@example.net>")
            .await
            .starts_with("250"),
        "delay continues"
    );
    assert!(t.elapsed() >= Duration::from_millis(150), "tarpit applied");
    assert!(
        say(&mut s, "RCPT TO:<y@example.net>")
            .await
            .starts_with("550 5.7.1"),
        "3rd recipient in one message"
    );
    assert!(say(&mut s, "RSET").await.starts_with("250"));
    assert!(say(&mut s, "MAIL FROM:<b@example.org>")
        .await
        .starts_with("250"));
    assert!(say(&mut s, "RSET").await.starts_with("250"));
    let r = say(&mut s, "MAIL FROM:<c@EXAMPLE.org>").await;
    assert!(
        r.starts_with("451 4.7.1"),
        "3rd message from the domain: {r}"
    );
}

/// Acceptance 6: a reload with a changed limit applies to new sessions and
/// keeps open ones; state of unchanged rules survives.
#[tokio::test]
async fn reload_applies_to_new_sessions_only() {
    let dir = tempfile::tempdir().unwrap();
    common::dev_cert(dir.path());
    let backend = sink().await;
    let y1 = cfg(
        dir.path(),
        &backend,
        "      - { name: r, key: [ip], rate: 2/minute, burst: 2 }",
        "",
    );
    let gw = common::start(&y1).await;
    let addr = gw.addr("mx").unwrap();
    let mut open = connect_from("127.0.0.11", addr).await;
    reply(&mut open).await;
    let mut s = connect_from("127.0.0.11", addr).await;
    reply(&mut s).await;
    let mut s = connect_from("127.0.0.11", addr).await;
    assert!(reply(&mut s).await.starts_with("421"), "limit 2 in force");
    // a broken file never gets past loading: the running config stays
    assert!(mailgate::config::load_str("bad.yaml", "listeners: [ {").is_err());
    // same rule again: its state survives the reload
    let same = mailgate::config::load_str("t.yaml", &y1).unwrap();
    gw.reload(&same).unwrap();
    let mut s = connect_from("127.0.0.11", addr).await;
    assert!(
        reply(&mut s).await.starts_with("421"),
        "unchanged rule kept its counters"
    );
    // a changed limit starts fresh and applies to new sessions
    let y2 = cfg(
        dir.path(),
        &backend,
        "      - { name: r, key: [ip], rate: 10/minute, burst: 10 }",
        "",
    );
    let notes = gw
        .reload(&mailgate::config::load_str("t.yaml", &y2).unwrap())
        .unwrap();
    assert!(notes.is_empty(), "{notes:?}");
    for _ in 0..5 {
        let mut s = connect_from("127.0.0.11", addr).await;
        assert!(reply(&mut s).await.starts_with("220"));
    }
    // the session opened before the reloads still works
    assert!(say(&mut open, "EHLO still.here").await.starts_with("250"));
    assert!(say(&mut open, "NOOP").await.starts_with("250"));
}

/// The example policies in the repository are valid.
#[test]
fn shipped_policies_are_valid() {
    let c =
        mailgate::config::load(std::path::Path::new("policies")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.listeners.len(), 5);
    assert!(c.listeners.iter().all(|l| l.policy.is_some()));
}

/// A legacy server behind `identity: [proxy_v2]`: records the address family
/// byte of each PROXY v2 header it gets, then accepts any mail.
async fn proxy_v2_backend(families: Arc<std::sync::Mutex<Vec<u8>>>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let families = families.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncBufReadExt;
                let mut r = tokio::io::BufReader::new(s);
                let mut sig = [0u8; 16];
                let peeked = tokio::time::timeout(Duration::from_millis(200), async {
                    r.get_mut().peek(&mut sig).await
                })
                .await;
                if matches!(peeked, Ok(Ok(16))) && sig[..12] == *b"\r\n\r\n\0\r\nQUIT\n" {
                    let len = u16::from_be_bytes([sig[14], sig[15]]) as usize;
                    let mut header = vec![0u8; 16 + len];
                    r.read_exact(&mut header).await.unwrap();
                    families.lock().unwrap().push(sig[13]);
                }
                let _ = r.get_mut().write_all(b"220 legacy ESMTP\r\n").await;
                let mut in_data = false;
                let mut line = String::new();
                while r.read_line(&mut line).await.unwrap_or(0) > 0 {
                    let answer: &[u8] = if in_data {
                        if line == ".\r\n" {
                            in_data = false;
                            b"250 queued\r\n"
                        } else {
                            b""
                        }
                    } else if line.starts_with("DATA") {
                        in_data = true;
                        b"354 go\r\n"
                    } else if line.starts_with("QUIT") {
                        let _ = r.get_mut().write_all(b"221 bye\r\n").await;
                        return;
                    } else {
                        b"250 ok\r\n"
                    };
                    if r.get_mut().write_all(answer).await.is_err() {
                        return;
                    }
                    line.clear();
                }
            });
        }
    });
    addr
}

/// Issue 19 item 7: a client announced by the balancer once as TCP4 and once
/// as IPv4-mapped TCP6 is one client (one concurrency slot, one deny entry),
/// and the session (here: its PROXY v2 header to the backend) sees IPv4.
#[tokio::test]
async fn mapped_ipv6_from_proxy_is_the_ipv4_client() {
    let families = Arc::new(std::sync::Mutex::new(Vec::new()));
    let backend = proxy_v2_backend(families.clone()).await;
    let y = format!(
        r#"
server: {{ hostname: gw.test }}
listeners:
  - {{ name: mx, protocol: smtp, bind: "127.0.0.1:0", tls: none, backend: b, policy: p, proxy_protocol: {{ trusted: ["127.0.0.0/8"], timeout: 2s }} }}
backends:
  b: {{ address: "{backend}", identity: [proxy_v2, received] }}
policies:
  p:
    deny: ["::ffff:203.0.113.66/128"]
    limits:
      - {{ name: slots, key: [ip], concurrent: 1, action: tempfail }}
"#
    );
    let gw = common::start(&y).await;
    let addr = gw.addr("mx").unwrap();
    let mut a = TcpStream::connect(addr).await.unwrap();
    a.write_all(b"PROXY TCP4 198.51.100.7 198.51.100.1 5555 25\r\n")
        .await
        .unwrap();
    assert!(reply(&mut a).await.starts_with("220"));
    let mut b = TcpStream::connect(addr).await.unwrap();
    b.write_all(b"PROXY TCP6 ::ffff:198.51.100.7 ::ffff:198.51.100.1 5556 25\r\n")
        .await
        .unwrap();
    let r = reply(&mut b).await;
    assert!(r.starts_with("421 4.7.0"), "same client, second slot: {r}");
    let mut d = TcpStream::connect(addr).await.unwrap();
    d.write_all(b"PROXY TCP4 203.0.113.66 198.51.100.1 5557 25\r\n")
        .await
        .unwrap();
    let r = reply(&mut d).await;
    assert!(r.starts_with("554 5.7.1"), "mapped deny entry: {r}");
    drop(a);
    // a mapped announcement delivers as the IPv4 client
    let mut ok = None;
    for _ in 0..50 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"PROXY TCP6 ::ffff:198.51.100.7 ::ffff:198.51.100.1 5558 25\r\n")
            .await
            .unwrap();
        if reply(&mut c).await.starts_with("220") {
            ok = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut c = ok.expect("slot freed");
    say(&mut c, "EHLO c.test").await;
    assert!(say(&mut c, "MAIL FROM:<a@example.org>")
        .await
        .starts_with("250"));
    assert!(say(&mut c, "RCPT TO:<b@example.net>")
        .await
        .starts_with("250"));
    assert!(say(&mut c, "DATA").await.starts_with("354"));
    assert!(say(&mut c, "Subject: t\r\n\r\nhi\r\n.")
        .await
        .starts_with("250"));
    assert_eq!(
        families.lock().unwrap().last(),
        Some(&0x11),
        "the backend is told TCP over IPv4"
    );
}

/// Issue 11 item 5: failed AUTH attempts count per session; after
/// `max_login_failures` (default 3) the session ends with 421 4.7.0, the
/// delay after each failure staying. User names with control characters or
/// over 255 octets are refused locally (501 5.5.2) and never reach the backend.
#[tokio::test]
async fn smtp_auth_failures_and_bad_user_names() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = common::dev_cert(dir.path());
    let attempts = Arc::new(AtomicUsize::new(0));
    let backend = auth_backend(attempts.clone()).await;
    let limits = "      - { key: [ip], auth_failures: 100/15minutes, action: reject }";
    // the `sub` listener pauses 10ms after each failed login
    let gw = common::start(&cfg(dir.path(), &backend, limits, "")).await;

    let mut s = tls_session(&gw, &ca, "127.0.3.1").await;
    let started = std::time::Instant::now();
    for i in 0..2 {
        let r = say(&mut s, BAD).await;
        assert!(r.starts_with("535 5.7.8"), "failure {i}: {r}");
    }
    let r = say(&mut s, BAD).await;
    assert!(r.starts_with("421 4.7.0"), "third failure: {r}");
    assert!(
        started.elapsed() >= Duration::from_millis(30),
        "the delay stays for every failure"
    );
    let mut b = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
        .await
        .expect("still open after 421");
    assert!(matches!(n, Ok(0) | Err(_)), "closed after 421");
    assert_eq!(attempts.load(Ordering::SeqCst), 3);

    use base64::Engine as _;
    let b64 = |raw: &[u8]| base64::engine::general_purpose::STANDARD.encode(raw);
    let mut s = tls_session(&gw, &ca, "127.0.3.2").await;
    for line in [
        format!("AUTH PLAIN {}", b64(b"\0al\x01ice\0secret")),
        format!("AUTH PLAIN {}", b64(b"alice\x1b[2J\0alice\0secret")),
        format!("AUTH PLAIN {}", b64("\0alice\u{85}\0secret".as_bytes())),
        format!(
            "AUTH PLAIN {}",
            b64(format!("\0{}\0secret", "a".repeat(256)).as_bytes())
        ),
        format!("AUTH LOGIN {}", b64(b"alice\r\nRSET")),
    ] {
        let r = say(&mut s, &line).await;
        assert!(r.starts_with("501 5.5.2"), "{line}: {r}");
    }
    let r = say(&mut s, "AUTH LOGIN").await;
    assert!(r.starts_with("334"), "{r}");
    let r = say(&mut s, &b64(b"\0alice")).await;
    assert!(r.starts_with("501 5.5.2"), "{r}");
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        3,
        "none reached the backend"
    );
    // the session is still usable
    assert!(say(&mut s, GOOD).await.starts_with("235"));
}
