//! Edge operations, gateway in-process on loopback: metrics and health
//! endpoints, PROXY protocol in, client identity out (XCLIENT, PROXY v2),
//! certificate replacement while sessions run.

mod common;

use common::{http_get, sample, Gateway, Running, SmtpBackend, SmtpClient, Yaml};

use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// A legacy server that records everything it is sent (raw, a PROXY v2
/// header included), offering XCLIENT when `xclient`.
async fn recording_backend(xclient: bool) -> Running {
    let b = SmtpBackend::new()
        .proxy()
        .on("XCLIENT", "220 legacy ESMTP again\r\n");
    if xclient {
        b.on(
            "EHLO",
            "250-legacy\r\n250-XCLIENT NAME ADDR PORT PROTO HELO LOGIN\r\n250 8BITMIME\r\n",
        )
    } else {
        b
    }
    .start()
    .await
}

/// Listener `mx` (STARTTLS, policy `p` denying 192.0.2.0/24, with
/// `listener_extra`) and the metrics endpoint, in front of `backend` with
/// `identity`.
fn config(dir: &std::path::Path, backend: &str, identity: &str, listener_extra: &str) -> String {
    config_tls(dir, backend, identity, "starttls", listener_extra)
}

/// [`config`] with the listener's `tls:` mode.
fn config_tls(
    dir: &std::path::Path,
    backend: &str,
    identity: &str,
    tls: &str,
    listener_extra: &str,
) -> String {
    Yaml::new()
        .section("metrics: { bind: \"127.0.0.1:0\" }")
        .listener("mx", "smtp", tls, &format!("policy: p{listener_extra}"))
        .certs(dir)
        .backend("b", backend, &format!("identity: [{identity}]"))
        .section("policies:\n  p: { deny: [\"192.0.2.0/24\"] }")
        .build()
}

async fn deliver<S: AsyncRead + AsyncWrite + Unpin>(r: &mut SmtpClient<S>, helo: &str) {
    assert!(r.cmd(&format!("EHLO {helo}")).await.starts_with("250"));
    assert!(r.cmd("MAIL FROM:<a@example.org>").await.starts_with("250"));
    assert!(r.cmd("RCPT TO:<b@example.net>").await.starts_with("250"));
    assert!(r.cmd("DATA").await.starts_with("354"));
    let t = r.cmd("Subject: x\r\n\r\nhello\r\n.").await;
    assert!(t.starts_with("250"), "{t}");
}

/// Checks the OpenMetrics text: every sample belongs to a declared family,
/// names and label syntax are well formed, values parse, and it ends in # EOF.
fn validate_exposition(text: &str) {
    let mut families = std::collections::HashSet::new();
    assert!(text.ends_with("# EOF\n"));
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let mut p = rest.split(' ');
            families.insert(p.next().unwrap().to_string());
            assert!(
                matches!(p.next(), Some("counter" | "gauge" | "histogram")),
                "{l}"
            );
            continue;
        }
        if l.starts_with('#') || l.is_empty() {
            continue;
        }
        let (series, value) = l
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {l}"));
        assert!(
            value.parse::<f64>().is_ok() || value == "+Inf",
            "value: {l}"
        );
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{l}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{l}");
            }
        }
        let base = ["_total", "_bucket", "_sum", "_count", "_created"]
            .iter()
            .fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
        assert!(
            families.contains(base) || families.contains(name),
            "sample of undeclared family: {l}"
        );
    }
}

#[tokio::test]
async fn metrics_and_health_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = common::dev_cert(dir.path());
    let be = recording_backend(false).await;
    let backend = be.addr.clone();
    // a listener name of its own: metrics are process-wide and tests run in parallel
    let gw = common::start(
        &config(dir.path(), &backend, "received", "").replace("name: mx,", "name: mxm,"),
    )
    .await;
    let m = gw.metrics_addr().unwrap();
    assert_eq!(http_get(m, "/healthz").await, (200, "ok\n".to_string()));
    assert_eq!(http_get(m, "/readyz").await.0, 200);
    assert_eq!(http_get(m, "/nope").await.0, 404);
    let (_, before) = http_get(m, "/metrics").await;
    // one STARTTLS session with a message
    let mut r = SmtpClient::connect(gw.addr("mxm").unwrap()).await;
    r.text().await;
    r.cmd("EHLO c").await;
    assert!(r.cmd("STARTTLS").await.starts_with("220"));
    let mut t = r.tls(&ca).await;
    deliver(&mut t, "client.test").await;
    t.cmd("QUIT").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (code, after) = http_get(m, "/metrics").await;
    assert_eq!(code, 200);
    validate_exposition(&after);
    let moved = |prefix: &str| sample(&after, prefix) - sample(&before, prefix);
    assert_eq!(
        moved("mailgate_transactions_total{listener=\"mxm\",outcome=\"accepted\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        moved("mailgate_tls_handshakes_total{listener=\"mxm\",version=\"TLSv1.3\"}"),
        1.0
    );
    assert_eq!(
        moved("mailgate_commands_total{listener=\"mxm\",command=\"EHLO\"}"),
        2.0
    );
    assert_eq!(moved("mailgate_sessions_total{listener=\"mxm\""), 1.0);
    assert!(moved("mailgate_bytes_total{listener=\"mxm\",direction=\"in\"}") > 0.0);
    assert!(
        after.contains("mailgate_backend_reply_seconds_bucket{"),
        "{after}"
    );
    // backend gone: not ready
    let dead = format!("127.0.0.1:{}", common::free_port());
    let gw2 = common::start(&config(dir.path(), &dead, "received", "")).await;
    assert_eq!(
        http_get(gw2.metrics_addr().unwrap(), "/readyz").await.0,
        503
    );
}

fn proxy_v2(src: &str, dst: &str) -> Vec<u8> {
    mailgate::transport::proxy_v2_header(src.parse().unwrap(), dst.parse().unwrap()).unwrap()
}

#[tokio::test]
async fn proxy_protocol_in_and_identity_out() {
    let dir = tempfile::tempdir().unwrap();
    common::dev_cert(dir.path());
    let be = recording_backend(true).await;
    let backend = be.addr.clone();
    let gw = common::start(&config(
        dir.path(),
        &backend,
        "xclient, received",
        ", proxy_protocol: { trusted: [\"127.0.0.0/8\"], timeout: 1s }",
    ))
    .await;
    let addr = gw.addr("mx").unwrap();
    // trusted balancer forwards 203.0.113.7
    let mut r = SmtpClient::connect(addr).await;
    r.send(&proxy_v2("203.0.113.7:4242", "198.51.100.1:25"))
        .await;
    assert!(r.text().await.starts_with("220"));
    deliver(&mut r, "real.client.example").await;
    r.cmd("QUIT").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let seen = String::from_utf8_lossy(&be.raw()).to_string();
    assert!(
        seen.contains(
            "XCLIENT NAME=[UNAVAILABLE] ADDR=203.0.113.7 PORT=4242 PROTO=ESMTP HELO=real.client.example\r\n"
        ),
        "{seen}"
    );
    assert!(
        seen.contains("Received: from real.client.example ([203.0.113.7])"),
        "{seen}"
    );
    // the limiter/deny key is the forwarded address
    let mut r = SmtpClient::connect(addr).await;
    r.send(&proxy_v2("192.0.2.9:1000", "198.51.100.1:25")).await;
    assert!(
        r.text().await.starts_with("554 5.7.1"),
        "denied by forwarded address"
    );
    // PROXY v1 works too
    let mut r = SmtpClient::connect(addr).await;
    r.send(b"PROXY TCP4 203.0.113.8 198.51.100.1 5555 25\r\n")
        .await;
    assert!(r.text().await.starts_with("220"));
    // malformed header: closed without a greeting
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"EHLO not-a-proxy-header\r\n").await.unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "{:?}", String::from_utf8_lossy(&buf));

    // untrusted peer: closed at once
    let gw2 = common::start(&config(
        dir.path(),
        &backend,
        "received",
        ", proxy_protocol: { trusted: [\"10.0.0.0/8\"] }",
    ))
    .await;
    let mut s = TcpStream::connect(gw2.addr("mx").unwrap()).await.unwrap();
    s.write_all(&proxy_v2("203.0.113.7:4242", "198.51.100.1:25"))
        .await
        .unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn proxy_v2_to_the_backend() {
    let dir = tempfile::tempdir().unwrap();
    common::dev_cert(dir.path());
    let be = recording_backend(false).await;
    let backend = be.addr.clone();
    let gw = common::start(&config(dir.path(), &backend, "proxy_v2, received", "")).await;
    let mut r = SmtpClient::connect(gw.addr("mx").unwrap()).await;
    let local = r.s.local_addr().unwrap();
    r.text().await;
    deliver(&mut r, "c.example").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let seen = be.raw();
    let header = proxy_v2(&local.to_string(), &gw.addr("mx").unwrap().to_string());
    // (the start-up capability probe came first, without a header)
    let at = seen
        .windows(header.len())
        .position(|w| w == header)
        .expect("PROXY v2 header sent");
    assert!(
        seen[at + header.len()..].starts_with(b"EHLO "),
        "header precedes the session's EHLO"
    );
}

/// Acceptance 4: replacing the certificate files changes what new handshakes
/// present; a session in progress is not dropped.
#[tokio::test]
async fn certificate_files_replaced_while_sessions_run() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_a, _) = common::dev_cert(dir.path());
    let ca_a = dir.path().join("trusted-a.pem");
    std::fs::copy(&cert_a, &ca_a).unwrap();
    let be = recording_backend(false).await;
    let backend = be.addr.clone();
    let gw = common::start(&config_tls(
        dir.path(),
        &backend,
        "received",
        "implicit",
        "",
    ))
    .await;
    let addr = gw.addr("mx").unwrap();
    let connect = |ca: std::path::PathBuf| async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(common::tls_client(&ca));
        connector
            .connect(
                rustls_pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
    };
    let tls = connect(ca_a.clone()).await.expect("cert A");
    let mut running = SmtpClient::new(tls);
    assert!(running.text().await.starts_with("220"));
    // new key and certificate written over the old files
    let other = tempfile::tempdir().unwrap();
    let (cert_b, key_b) = common::dev_cert(other.path());
    std::fs::copy(&key_b, dir.path().join("key.pem")).unwrap();
    std::fs::copy(&cert_b, dir.path().join("cert.pem")).unwrap();
    let mut switched = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if connect(cert_b.clone()).await.is_ok() {
            switched = true;
            break;
        }
    }
    assert!(switched, "new handshakes present the new certificate");
    assert!(
        connect(ca_a).await.is_err(),
        "old certificate no longer presented"
    );
    // a broken replacement keeps the current certificate
    std::fs::write(dir.path().join("cert.pem"), "garbage").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        connect(cert_b).await.is_ok(),
        "broken files do not replace a working certificate"
    );
    // the session from before is still alive
    assert!(running.cmd("NOOP").await.starts_with("250"));
}

/// SMTPS and POP3S in front of the demo backends (both sides in memory).
async fn tls_pair(dir: &std::path::Path) -> Gateway {
    let (mb, sa) = common::demo_smtp().await;
    let pa = common::demo_pop3(mb).await;
    Yaml::new()
        .listener_to("smtps", "smtp", "implicit", "s", "")
        .listener_to("pop3s", "pop3", "implicit", "p", "")
        .certs(dir)
        .backend("s", &sa, "")
        .backend("p", &pa, "")
        .start()
        .await
}

/// A TLS client session on `addr` that reads the greeting (which also takes in
/// the server's session tickets); returns how the handshake went.
async fn tls_greeting(
    addr: std::net::SocketAddr,
    client: Arc<rustls::ClientConfig>,
) -> std::io::Result<(rustls::HandshakeKind, Option<Vec<u8>>, String)> {
    let tcp = TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(client)
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await?;
    let kind = tls.get_ref().1.handshake_kind().unwrap();
    let alpn = tls.get_ref().1.alpn_protocol().map(|p| p.to_vec());
    let greeting = SmtpClient::new(tls).line().await.unwrap_or_default();
    Ok((kind, alpn, greeting))
}

fn with_alpn(ca: &std::path::Path, protocols: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut c = (*common::tls_client(ca)).clone();
    c.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
    Arc::new(c)
}

/// Issue 19.11 (ALPACA): a client that wants another protocol (h2, http/1.1)
/// is refused in the handshake; no ALPN, or the listener's own id, is fine.
#[tokio::test]
async fn tls_refuses_foreign_alpn() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = common::dev_cert(dir.path());
    let gw = tls_pair(dir.path()).await;
    let (smtps, pop3s) = (gw.addr("smtps").unwrap(), gw.addr("pop3s").unwrap());
    for addr in [smtps, pop3s] {
        let e = tls_greeting(addr, with_alpn(&ca, &[b"h2", b"http/1.1"]))
            .await
            .expect_err("handshake offering only HTTP must fail");
        let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
        assert_eq!(
            inner,
            Some(&rustls::Error::AlertReceived(
                rustls::AlertDescription::NoApplicationProtocol
            )),
            "{e}"
        );
    }
    let (_, alpn, g) = tls_greeting(smtps, with_alpn(&ca, &[b"h2", b"smtp"]))
        .await
        .unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"smtp"[..]));
    assert!(g.starts_with("220"), "{g}");
    let (_, alpn, g) = tls_greeting(pop3s, with_alpn(&ca, &[b"pop3"]))
        .await
        .unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"pop3"[..]));
    assert!(g.starts_with("+OK"), "{g}");
    // the other protocol's id is foreign too
    assert!(tls_greeting(pop3s, with_alpn(&ca, &[b"smtp"]))
        .await
        .is_err());
    let (_, alpn, g) = tls_greeting(smtps, common::tls_client(&ca)).await.unwrap();
    assert_eq!(alpn, None);
    assert!(g.starts_with("220"), "{g}");
}

/// Issue 19.11: a session ticket from SMTPS does not resume on POP3S, but
/// does resume on SMTPS again (one client cache per case: tickets are
/// stored per server name, and both listeners are "localhost").
#[tokio::test]
async fn tls_tickets_stay_on_their_listener() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = common::dev_cert(dir.path());
    let gw = tls_pair(dir.path()).await;
    let (smtps, pop3s) = (gw.addr("smtps").unwrap(), gw.addr("pop3s").unwrap());
    let client = common::tls_client(&ca);
    let first = tls_greeting(smtps, client.clone()).await.unwrap();
    assert_eq!(first.0, rustls::HandshakeKind::Full);
    let again = tls_greeting(smtps, client).await.unwrap();
    assert_eq!(again.0, rustls::HandshakeKind::Resumed, "resumes on SMTPS");
    let client = common::tls_client(&ca);
    tls_greeting(smtps, client.clone()).await.unwrap();
    let cross = tls_greeting(pop3s, client).await.unwrap();
    assert!(cross.2.starts_with("+OK"), "{}", cross.2);
    assert_eq!(
        cross.0,
        rustls::HandshakeKind::Full,
        "an SMTPS ticket must not resume on POP3S"
    );
}

/// Issue 19.12: a backend that accepts but does not greet does not hold up
/// the listeners: a client gets the gateway's 220 while the backend is still
/// stalled; once the backend answers, its capabilities are advertised.
#[tokio::test]
async fn startup_does_not_wait_for_a_stalled_backend() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let released = Arc::new(AtomicBool::new(false));
    let release = Arc::new(tokio::sync::Notify::new());
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (rel, flag) = (release.clone(), released.clone());
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((s, _)) = l.accept().await {
            if first {
                first = false;
                // stalled until released (or, so that a broken gateway fails
                // the test instead of hanging it, for 10 s)
                tokio::select! {
                    _ = rel.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                }
                flag.store(true, Ordering::SeqCst);
            }
            tokio::spawn(async move {
                let mut r = BufReader::new(s);
                r.get_mut().write_all(b"220 slow ESMTP\r\n").await.unwrap();
                loop {
                    let mut l = String::new();
                    if r.read_line(&mut l).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let ans: &[u8] = match l.trim_end().to_ascii_uppercase().as_str() {
                        u if u.starts_with("EHLO") => b"250-slow\r\n250 8BITMIME\r\n",
                        "QUIT" => b"221 bye\r\n",
                        _ => b"250 ok\r\n",
                    };
                    let _ = r.get_mut().write_all(ans).await;
                }
            });
        }
    });
    let cfg = mailgate::config::load_str(
        "t.yaml",
        &Yaml::new()
            .listener("mx", "smtp", "none", "timeouts: { backend_reply: 60s }")
            .backend("b", &addr.to_string(), "")
            .build(),
    )
    .unwrap();
    let gw = tokio::time::timeout(Duration::from_secs(30), Gateway::start(&cfg))
        .await
        .unwrap()
        .unwrap();
    let mut r = SmtpClient::connect(gw.addr("mx").unwrap()).await;
    assert!(r.text().await.starts_with("220"));
    assert!(
        !released.load(Ordering::SeqCst),
        "the client got its greeting only after the backend answered"
    );
    // until the probe answers: conservative
    assert!(!r.cmd("EHLO c").await.contains("8BITMIME"));
    release.notify_one();
    let mut learnt = false;
    for _ in 0..100 {
        let mut r = SmtpClient::connect(gw.addr("mx").unwrap()).await;
        r.text().await;
        if r.cmd("EHLO c").await.contains("8BITMIME") {
            learnt = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(learnt, "the probe's answer is used once it arrives");
}

/// Issue 19.3: `/readyz` answers from a cached probe (a burst of requests
/// does not become a burst of backend connections) and names backends, not
/// their addresses.
#[tokio::test]
async fn readyz_is_cached_and_names_no_addresses() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let connects = Arc::new(AtomicUsize::new(0));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    let n = connects.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            n.fetch_add(1, Ordering::SeqCst);
            drop(s);
        }
    });
    let dead = format!("127.0.0.1:{}", common::free_port());
    // POP3 backends are not capability-probed: every connect here is /readyz
    let yaml = |backend: &str| {
        Yaml::new()
            .section("metrics: { bind: \"127.0.0.1:0\" }")
            .listener_to(
                "pop-ready",
                "pop3",
                "none",
                "legacy-pop",
                "require_tls: false",
            )
            .backend("legacy-pop", backend, "")
    };
    let gw = yaml(&up.to_string()).start().await;
    let m = gw.metrics_addr().unwrap();
    for _ in 0..20 {
        assert_eq!(http_get(m, "/readyz").await, (200, "ready\n".to_string()));
    }
    let seen = connects.load(Ordering::SeqCst);
    assert!(
        seen <= 2,
        "20 /readyz requests made {seen} backend connections"
    );
    let gw2 = yaml(&dead).start().await;
    let (code, body) = http_get(gw2.metrics_addr().unwrap(), "/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("legacy-pop"), "{body}");
    let port = dead.rsplit(':').next().unwrap();
    assert!(
        !body.contains(port) && !body.contains("127.0.0.1"),
        "address in the body: {body}"
    );
}

/// Issue 19.3: connections beyond the endpoint's small cap are closed at
/// once instead of each holding a descriptor until its read deadline.
#[tokio::test]
async fn metrics_connections_are_capped() {
    let gw = Yaml::new()
        .section("metrics: { bind: \"127.0.0.1:0\" }")
        .listener("pop-cap", "pop3", "none", "require_tls: false")
        .backend("b", "127.0.0.1:9", "")
        .start()
        .await;
    let m = gw.metrics_addr().unwrap();
    let mut idle = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let mut s = TcpStream::connect(m).await.unwrap();
        idle.spawn(async move {
            let mut b = [0u8; 16];
            // closed by the server within the second: EOF or reset
            let r = tokio::time::timeout(Duration::from_secs(1), s.read(&mut b)).await;
            (matches!(r, Ok(Ok(0) | Err(_))), s)
        });
    }
    let mut closed = 0;
    let mut held = Vec::new();
    while let Some(r) = idle.join_next().await {
        let (c, s) = r.unwrap();
        closed += usize::from(c);
        held.push(s);
    }
    assert!(
        closed >= 24,
        "only {closed} of 40 idle connections were closed"
    );
    drop(held);
    // and the endpoint still serves once the idle ones are gone
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(http_get(m, "/healthz").await.0, 200);
}

/// The real binary with `yaml` (a `{dead}` in it becomes a closed port)
/// under `ulimit -n fds`; killed when the guard drops. The log is `dir/mailgate.log`.
fn low_fd_gateway(dir: &std::path::Path, fds: u32, yaml: &str) -> common::Guard {
    let conf = dir.join("mailgate.yaml");
    let dead = format!("127.0.0.1:{}", common::free_port());
    std::fs::write(&conf, yaml.replace("{dead}", &dead)).unwrap();
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -n {fds} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_mailgate"))
        .args(["run", "--config"])
        .arg(&conf)
        .stdout(std::fs::File::create(dir.join("mailgate.log")).unwrap())
        .spawn()
        .unwrap();
    common::Guard(child)
}

/// Issue 19.3 with the real binary under `ulimit -n 256`: 300 connections
/// held on the metrics port do not starve the mail listener of descriptors;
/// a new SMTP client still gets its greeting promptly.
#[test]
fn metrics_flood_under_low_fd_limit_keeps_smtp_greeting() {
    use std::io::Read as _;
    let dir = tempfile::tempdir().unwrap();
    let (smtp, metrics) = (common::free_port(), common::free_port());
    let _g = low_fd_gateway(
        dir.path(),
        256,
        &format!("metrics: {{ bind: \"127.0.0.1:{metrics}\" }}\nlisteners:\n  - {{ name: mx, protocol: smtp, bind: \"127.0.0.1:{smtp}\", tls: none, backend: b, max_connections: 50 }}\nbackends:\n  b: {{ address: \"{{dead}}\" }}\n"),
    );
    common::wait_port(smtp);
    common::wait_port(metrics);
    let held: Vec<_> = (0..300)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", metrics)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", smtp)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).unwrap_or(0);
    let waited = started.elapsed();
    let log = std::fs::read_to_string(dir.path().join("mailgate.log")).unwrap_or_default();
    assert!(
        buf[..n].starts_with(b"220"),
        "no greeting within 5 s while 300 connections hold the metrics port: {:?}\n{}",
        String::from_utf8_lossy(&buf[..n]),
        &log[log.len().saturating_sub(2000)..]
    );
    eprintln!("time to greeting with 300 metrics connections held: {waited:?}");
    drop(held);
}

/// Issue 19.3, the descriptor reserve: when the process is out of
/// descriptors (here: SMTP sessions alone under `ulimit -n 64`), a new client
/// is not left unanswered in the backlog; it hears a temporary error.
#[test]
fn out_of_descriptors_clients_hear_a_temporary_error() {
    use std::io::Read as _;
    let dir = tempfile::tempdir().unwrap();
    let smtp = common::free_port();
    let _g = low_fd_gateway(
        dir.path(),
        64,
        &format!("listeners:\n  - {{ name: mx, protocol: smtp, bind: \"127.0.0.1:{smtp}\", tls: none, backend: b, max_connections: 500 }}\nbackends:\n  b: {{ address: \"{{dead}}\" }}\n"),
    );
    common::wait_port(smtp);
    let mut held = Vec::new();
    let mut turned_away = 0;
    for _ in 0..100 {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", smtp)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).unwrap_or(0);
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        if text.starts_with("421") {
            turned_away += 1;
        } else {
            assert!(
                text.starts_with("220"),
                "neither greeting nor 421: {text:?}"
            );
        }
        held.push(s);
    }
    assert!(turned_away > 0, "the limit was never reached");
}

/// `session_ends_total{listener,outcome}` counts how the sessions of every
/// protocol end, in a fixed set of outcomes: SMTP QUIT, a POP3 client that
/// hangs up, an IMAP session closed after too many bad commands (`error`:
/// never the text of the closing reply).
#[tokio::test]
async fn session_ends_are_counted_for_every_protocol() {
    let ends = |listener: &str, outcome: &'static str| {
        mailgate::observe::metrics()
            .session_ends
            .get_or_create(&mailgate::observe::metrics::OutcomeLabels {
                listener: listener.into(),
                outcome,
            })
            .get()
    };
    let smtp = SmtpBackend::new().start().await;
    let pop3 = common::Pop3Backend::new().start().await;
    let imap = common::ImapBackend::new().start().await;
    // listener names of their own: the counters are the process's
    let gw = Yaml::new()
        .listener_to("ends-smtp", "smtp", "none", "s", "")
        .listener_to("ends-pop3", "pop3", "none", "p", "")
        .listener_to("ends-imap", "imap", "none", "i", "")
        .backend("s", &smtp.addr, "")
        .backend("p", &pop3.addr, "")
        .backend("i", &imap.addr, "")
        .start()
        .await;
    let mut c = SmtpClient::greeted(gw.addr("ends-smtp").unwrap()).await;
    c.cmd("QUIT").await;
    c.closed(Duration::from_secs(3)).await;

    let mut p = BufReader::new(
        TcpStream::connect(gw.addr("ends-pop3").unwrap())
            .await
            .unwrap(),
    );
    let mut greeting = String::new();
    p.read_line(&mut greeting).await.unwrap();
    assert!(greeting.starts_with("+OK"), "{greeting}");
    drop(p);

    let mut i = BufReader::new(
        TcpStream::connect(gw.addr("ends-imap").unwrap())
            .await
            .unwrap(),
    );
    let mut line = String::new();
    i.read_line(&mut line).await.unwrap();
    assert!(line.starts_with("* OK"), "{line}");
    for n in 0..20 {
        if i.get_mut()
            .write_all(format!("{n} BOGUS\r\n").as_bytes())
            .await
            .is_err()
        {
            break;
        }
    }
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), i.read_to_end(&mut rest)).await;
    assert!(
        String::from_utf8_lossy(&rest).contains("* BYE"),
        "{}",
        String::from_utf8_lossy(&rest)
    );

    let want = [
        ("ends-smtp", "quit"),
        ("ends-pop3", "client_closed"),
        ("ends-imap", "error"),
    ];
    for _ in 0..100 {
        if want.iter().all(|(l, o)| ends(l, o) == 1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (l, o) in want {
        assert_eq!(ends(l, o), 1, "{l} {o}");
    }
    gw.shutdown().await;
}
