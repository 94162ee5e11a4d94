//! Policy engine acceptance tests, the gateway in-process on loopback. Client
//! addresses differ by binding the client socket to 127.0.0.x.

mod common;

use common::{Gateway, Running, SmtpBackend, SmtpClient, Tls, Yaml};
use std::time::Duration;

/// A legacy SMTP server that knows one account (alice / secret); its AUTH
/// attempts are its `AUTH PLAIN` lines.
async fn auth_backend() -> Running {
    SmtpBackend::new()
        .on(
            "EHLO",
            "250-legacy\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n",
        )
        // \0alice\0secret
        .on_line("AUTH PLAIN AGFsaWNlAHNlY3JldA==", "235 2.7.0 ok\r\n")
        .on("AUTH", "535 5.7.8 no\r\n")
        .start()
        .await
}

/// How many AUTH attempts `backend` saw.
fn attempts(backend: &Running) -> usize {
    backend
        .lines()
        .iter()
        .filter(|l| l.starts_with("AUTH PLAIN "))
        .count()
}

/// Listeners `mx` (no TLS) and `sub` (implicit TLS, AUTH required, with
/// `extra_listener`), both under policy `p` whose `limits:` are `limits`.
fn cfg(dir: &std::path::Path, backend: &str, limits: &str, extra_listener: &str) -> String {
    Yaml::new()
        .listener("mx", "smtp", "none", "policy: p")
        .listener(
            "sub",
            "smtp",
            "implicit",
            &format!("auth: required, policy: p, login_failure_delay: 10ms{extra_listener}"),
        )
        .certs(dir)
        .backend("b", backend, "")
        .section(&format!("policies:\n  p:\n    limits:\n{limits}"))
        .build()
}

async fn sink() -> String {
    common::demo_smtp().await.1
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
        let mut s = SmtpClient::connect_from("127.0.0.2", addr).await;
        assert!(s.text().await.starts_with("220"), "connection {i}");
        held.push(s);
    }
    let mut s = SmtpClient::connect_from("127.0.0.2", addr).await;
    let r = s.text().await;
    assert!(r.starts_with("421 4.7.0"), "6th: {r}");
    let mut other = SmtpClient::connect_from("127.0.0.3", addr).await;
    assert!(other.text().await.starts_with("220"));
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
    let mut a = SmtpClient::connect_from("127.0.0.4", addr).await;
    assert!(a.text().await.starts_with("220"));
    let mut b = SmtpClient::connect_from("127.0.0.4", addr).await;
    assert!(b.text().await.starts_with("220"));
    let mut c = SmtpClient::connect_from("127.0.0.4", addr).await;
    let r = c.text().await;
    assert!(r.starts_with("554 5.7.1"), "third: {r}");
    let mut d = SmtpClient::connect_from("127.0.0.5", addr).await;
    assert!(d.text().await.starts_with("220"), "other IP unaffected");
    assert!(a.cmd("QUIT").await.starts_with("221"));
    drop(a);
    // the slot frees when the session task ends
    let mut ok = false;
    for _ in 0..50 {
        let mut e = SmtpClient::connect_from("127.0.0.4", addr).await;
        if e.text().await.starts_with("220") {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "accepted again after one closed");
}

async fn tls_session(gw: &Gateway, ca: &std::path::Path, src: &str) -> SmtpClient<Tls> {
    let c = SmtpClient::connect_from(src, gw.addr("sub").unwrap()).await;
    let mut t = c.tls(ca).await;
    assert!(t.text().await.starts_with("220"));
    let ehlo = t.cmd("EHLO c.test").await;
    let last = ehlo.lines().last().unwrap_or_default();
    assert!(last.starts_with("250 "), "{ehlo}");
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
    let be = auth_backend().await;
    let backend = be.addr.clone();
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
    assert!(home.cmd(GOOD).await.starts_with("235"));
    drop(home);

    let mut evil = tls_session(&gw, &ca, "127.0.2.66").await;
    for i in 0..5 {
        let r = evil.cmd(BAD).await;
        assert!(r.starts_with("535 5.7.8"), "failure {i}: {r}");
    }
    assert_eq!(attempts(&be), 6);
    // locked for the window: refused without reaching the backend
    let r = evil.cmd(GOOD).await;
    assert!(r.starts_with("535 5.7.8"), "locked IP: {r}");
    let mut evil2 = tls_session(&gw, &ca, "127.0.2.66").await;
    assert!(
        evil2.cmd(GOOD).await.starts_with("535"),
        "new session, same IP"
    );
    // an unknown user gets exactly the same reply as a wrong password
    let r = evil2.cmd("AUTH PLAIN AG5vYm9keQB4").await;
    assert!(
        r.starts_with("535 5.7.8 Authentication credentials invalid"),
        "{r}"
    );
    assert_eq!(attempts(&be), 6, "no attempt reached the backend");

    // alice's per-user lock is in force elsewhere ...
    let mut fresh = tls_session(&gw, &ca, "127.0.1.77").await;
    let r = fresh.cmd(GOOD).await;
    assert!(
        r.starts_with("454 4.7.0"),
        "per-user lock from a new network: {r}"
    );
    // ... but not from her known-good network
    let mut home = tls_session(&gw, &ca, "127.0.0.20").await;
    let r = home.cmd(GOOD).await;
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
        let mut s = SmtpClient::connect_from("127.0.0.9", gw.addr("mx").unwrap()).await;
        assert!(s.text().await.starts_with("220"));
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
    let mut s = SmtpClient::connect_from("127.0.0.10", gw.addr("mx").unwrap()).await;
    s.text().await;
    s.cmd("EHLO c").await;
    assert!(s.cmd("MAIL FROM:<a@example.org>").await.starts_with("250"));
    assert!(s.cmd("RCPT TO:<x@example.net>").await.starts_with("250"));
    let t = std::time::Instant::now();
    assert!(
        s.cmd("RCPT TO:<x@example.net>").await.starts_with("250"),
        "delay continues"
    );
    assert!(t.elapsed() >= Duration::from_millis(150), "tarpit applied");
    assert!(
        s.cmd("RCPT TO:<y@example.net>")
            .await
            .starts_with("550 5.7.1"),
        "3rd recipient in one message"
    );
    assert!(s.cmd("RSET").await.starts_with("250"));
    assert!(s.cmd("MAIL FROM:<b@example.org>").await.starts_with("250"));
    assert!(s.cmd("RSET").await.starts_with("250"));
    let r = s.cmd("MAIL FROM:<c@EXAMPLE.org>").await;
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
    let mut open = SmtpClient::connect_from("127.0.0.11", addr).await;
    open.text().await;
    let mut s = SmtpClient::connect_from("127.0.0.11", addr).await;
    s.text().await;
    let mut s = SmtpClient::connect_from("127.0.0.11", addr).await;
    assert!(s.text().await.starts_with("421"), "limit 2 in force");
    // a broken file never gets past loading: the running config stays
    assert!(mailgate::config::load_str("bad.yaml", "listeners: [ {").is_err());
    // same rule again: its state survives the reload
    let same = mailgate::config::load_str("t.yaml", &y1).unwrap();
    gw.reload(&same).unwrap();
    let mut s = SmtpClient::connect_from("127.0.0.11", addr).await;
    assert!(
        s.text().await.starts_with("421"),
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
        let mut s = SmtpClient::connect_from("127.0.0.11", addr).await;
        assert!(s.text().await.starts_with("220"));
    }
    // the session opened before the reloads still works
    assert!(open.cmd("EHLO still.here").await.starts_with("250"));
    assert!(open.cmd("NOOP").await.starts_with("250"));
}

/// The example policies in the repository are valid.
#[test]
fn shipped_policies_are_valid() {
    let c =
        mailgate::config::load(std::path::Path::new("policies")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.listeners.len(), 7);
    assert!(c.listeners.iter().all(|l| l.policy.is_some()));
}

/// A legacy server behind `identity: [proxy_v2]`: records the PROXY v2
/// header it gets, then accepts any mail.
async fn proxy_v2_backend() -> Running {
    SmtpBackend::new()
        .proxy()
        .on("EHLO", "250 ok\r\n")
        .end_of_data("250 queued\r\n")
        .start()
        .await
}

/// Issue 19 item 7: a client announced by the balancer once as TCP4 and once
/// as IPv4-mapped TCP6 is one client (one concurrency slot, one deny entry),
/// and the session (here: its PROXY v2 header to the backend) sees IPv4.
#[tokio::test]
async fn mapped_ipv6_from_proxy_is_the_ipv4_client() {
    let be = proxy_v2_backend().await;
    let backend = be.addr.clone();
    let y = Yaml::new()
        .listener(
            "mx",
            "smtp",
            "none",
            "policy: p, proxy_protocol: { trusted: [\"127.0.0.0/8\"], timeout: 2s }",
        )
        .backend("b", &backend, "identity: [proxy_v2, received]")
        .section(
            "policies:
  p:
    deny: [\"::ffff:203.0.113.66/128\"]
    limits:
      - { name: slots, key: [ip], concurrent: 1, action: tempfail }",
        )
        .build();
    let gw = common::start(&y).await;
    let addr = gw.addr("mx").unwrap();
    let mut a = SmtpClient::connect(addr).await;
    a.send(b"PROXY TCP4 198.51.100.7 198.51.100.1 5555 25\r\n")
        .await;
    assert!(a.text().await.starts_with("220"));
    let mut b = SmtpClient::connect(addr).await;
    b.send(b"PROXY TCP6 ::ffff:198.51.100.7 ::ffff:198.51.100.1 5556 25\r\n")
        .await;
    let r = b.text().await;
    assert!(r.starts_with("421 4.7.0"), "same client, second slot: {r}");
    let mut d = SmtpClient::connect(addr).await;
    d.send(b"PROXY TCP4 203.0.113.66 198.51.100.1 5557 25\r\n")
        .await;
    let r = d.text().await;
    assert!(r.starts_with("554 5.7.1"), "mapped deny entry: {r}");
    drop(a);
    // a mapped announcement delivers as the IPv4 client
    let mut ok = None;
    for _ in 0..50 {
        let mut c = SmtpClient::connect(addr).await;
        c.send(b"PROXY TCP6 ::ffff:198.51.100.7 ::ffff:198.51.100.1 5558 25\r\n")
            .await;
        if c.text().await.starts_with("220") {
            ok = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut c = ok.expect("slot freed");
    c.cmd("EHLO c.test").await;
    assert!(c.cmd("MAIL FROM:<a@example.org>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<b@example.net>").await.starts_with("250"));
    assert!(c.cmd("DATA").await.starts_with("354"));
    assert!(c.cmd("Subject: t\r\n\r\nhi\r\n.").await.starts_with("250"));
    assert_eq!(
        be.seen.lock().unwrap().proxy.last().map(|h| h[13]),
        Some(0x11),
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
    let be = auth_backend().await;
    let backend = be.addr.clone();
    let limits = "      - { key: [ip], auth_failures: 100/15minutes, action: reject }";
    // the `sub` listener pauses 10ms after each failed login
    let gw = common::start(&cfg(dir.path(), &backend, limits, "")).await;

    let mut s = tls_session(&gw, &ca, "127.0.3.1").await;
    let started = std::time::Instant::now();
    for i in 0..2 {
        let r = s.cmd(BAD).await;
        assert!(r.starts_with("535 5.7.8"), "failure {i}: {r}");
    }
    let r = s.cmd(BAD).await;
    assert!(r.starts_with("421 4.7.0"), "third failure: {r}");
    assert!(
        started.elapsed() >= Duration::from_millis(30),
        "the delay stays for every failure"
    );
    let after = s.closed(Duration::from_secs(5)).await;
    assert!(after.is_empty(), "closed after 421: {after:?}");
    assert_eq!(attempts(&be), 3);

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
        let r = s.cmd(&line).await;
        assert!(r.starts_with("501 5.5.2"), "{line}: {r}");
    }
    let r = s.cmd("AUTH LOGIN").await;
    assert!(r.starts_with("334"), "{r}");
    let r = s.cmd(&b64(b"\0alice")).await;
    assert!(r.starts_with("501 5.5.2"), "{r}");
    assert_eq!(attempts(&be), 3, "none reached the backend");
    // the session is still usable
    assert!(s.cmd(GOOD).await.starts_with("235"));
}
