//! Edge operations, gateway in-process on loopback: metrics and health
//! endpoints, PROXY protocol in, client identity out (XCLIENT, PROXY v2),
//! certificate replacement while sessions run.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

async fn line<S: AsyncRead + Unpin>(r: &mut BufReader<S>) -> String {
    let mut l = String::new();
    loop {
        let mut part = String::new();
        tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut part))
            .await
            .expect("timed out")
            .unwrap();
        l.push_str(&part);
        if part.len() < 4 || part.as_bytes()[3] != b'-' {
            return l;
        }
    }
}

async fn cmd<S: AsyncRead + AsyncWrite + Unpin>(r: &mut BufReader<S>, c: &str) -> String {
    r.get_mut()
        .write_all(format!("{c}\r\n").as_bytes())
        .await
        .unwrap();
    line(r).await
}

/// A legacy server that records everything it is sent (raw), offers XCLIENT.
async fn recording_backend(log: Arc<Mutex<Vec<u8>>>, xclient: bool) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut r = BufReader::new(s);
                // a PROXY v2 header, if any, arrives before our greeting is read
                let mut first = vec![0u8; 0];
                if let Ok(Ok(n)) = tokio::time::timeout(
                    Duration::from_millis(100),
                    r.get_mut().peek(&mut [0u8; 1]),
                )
                .await
                {
                    if n > 0 {
                        let mut sig = [0u8; 16];
                        if r.get_mut().peek(&mut sig).await.unwrap_or(0) == 16
                            && sig[..12] == *b"\r\n\r\n\0\r\nQUIT\n"
                        {
                            let len = u16::from_be_bytes([sig[14], sig[15]]) as usize;
                            first = vec![0u8; 16 + len];
                            r.read_exact(&mut first).await.unwrap();
                        }
                    }
                }
                log.lock().unwrap().extend_from_slice(&first);
                r.get_mut()
                    .write_all(b"220 legacy ESMTP\r\n")
                    .await
                    .unwrap();
                loop {
                    let mut l = String::new();
                    if r.read_line(&mut l).await.unwrap_or(0) == 0 {
                        return;
                    }
                    log.lock().unwrap().extend_from_slice(l.as_bytes());
                    let up = l.trim_end().to_ascii_uppercase();
                    let ans: &[u8] = if up.starts_with("EHLO") {
                        if xclient {
                            b"250-legacy\r\n250-XCLIENT NAME ADDR PORT PROTO HELO LOGIN\r\n250 8BITMIME\r\n"
                        } else {
                            b"250-legacy\r\n250 8BITMIME\r\n"
                        }
                    } else if up.starts_with("XCLIENT") {
                        b"220 legacy ESMTP again\r\n"
                    } else if up == "DATA" {
                        r.get_mut().write_all(b"354 go\r\n").await.unwrap();
                        loop {
                            let mut d = String::new();
                            if r.read_line(&mut d).await.unwrap_or(0) == 0 {
                                return;
                            }
                            log.lock().unwrap().extend_from_slice(d.as_bytes());
                            if d == ".\r\n" {
                                break;
                            }
                        }
                        b"250 2.0.0 queued\r\n"
                    } else if up == "QUIT" {
                        let _ = r.get_mut().write_all(b"221 bye\r\n").await;
                        return;
                    } else {
                        b"250 ok\r\n"
                    };
                    r.get_mut().write_all(ans).await.unwrap();
                }
            });
        }
    });
    addr
}

fn config(dir: &std::path::Path, backend: &str, identity: &str, listener_extra: &str) -> String {
    format!(
        r#"
server: {{ hostname: gw.test }}
metrics: {{ bind: "127.0.0.1:0" }}
listeners:
  - {{ name: mx, protocol: smtp, bind: "127.0.0.1:0", tls: starttls, backend: b, policy: p {listener_extra} }}
tls:
  certificates: [ {{ cert: "{d}/cert.pem", key: "{d}/key.pem" }} ]
backends:
  b: {{ address: "{backend}", identity: [{identity}] }}
policies:
  p: {{ deny: ["192.0.2.0/24"] }}
"#,
        d = dir.display()
    )
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (code, body)
}

async fn deliver<S: AsyncRead + AsyncWrite + Unpin>(r: &mut BufReader<S>, helo: &str) {
    assert!(cmd(r, &format!("EHLO {helo}")).await.starts_with("250"));
    assert!(cmd(r, "MAIL FROM:<a@example.org>").await.starts_with("250"));
    assert!(cmd(r, "RCPT TO:<b@example.net>").await.starts_with("250"));
    assert!(cmd(r, "DATA").await.starts_with("354"));
    let t = cmd(r, "Subject: x\r\n\r\nhello\r\n.").await;
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

fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit_once(' '))
        .map(|x| x.1.parse().unwrap())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_and_health_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = common::dev_cert(dir.path());
    let log = Arc::new(Mutex::new(Vec::new()));
    let backend = recording_backend(log, false).await;
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
    let tcp = TcpStream::connect(gw.addr("mxm").unwrap()).await.unwrap();
    let mut r = BufReader::new(tcp);
    line(&mut r).await;
    cmd(&mut r, "EHLO c").await;
    assert!(cmd(&mut r, "STARTTLS").await.starts_with("220"));
    let connector = tokio_rustls::TlsConnector::from(common::tls_client(&ca));
    let tls = connector
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            r.into_inner(),
        )
        .await
        .unwrap();
    let mut t = BufReader::new(tls);
    deliver(&mut t, "client.test").await;
    cmd(&mut t, "QUIT").await;
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
    let log = Arc::new(Mutex::new(Vec::new()));
    let backend = recording_backend(log.clone(), true).await;
    let gw = common::start(&config(
        dir.path(),
        &backend,
        "xclient, received",
        ", proxy_protocol: { trusted: [\"127.0.0.0/8\"], timeout: 1s }",
    ))
    .await;
    let addr = gw.addr("mx").unwrap();
    // trusted balancer forwards 203.0.113.7
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&proxy_v2("203.0.113.7:4242", "198.51.100.1:25"))
        .await
        .unwrap();
    let mut r = BufReader::new(s);
    assert!(line(&mut r).await.starts_with("220"));
    deliver(&mut r, "real.client.example").await;
    cmd(&mut r, "QUIT").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let seen = String::from_utf8_lossy(&log.lock().unwrap()).to_string();
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
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&proxy_v2("192.0.2.9:1000", "198.51.100.1:25"))
        .await
        .unwrap();
    let mut r = BufReader::new(s);
    assert!(
        line(&mut r).await.starts_with("554 5.7.1"),
        "denied by forwarded address"
    );
    // PROXY v1 works too
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"PROXY TCP4 203.0.113.8 198.51.100.1 5555 25\r\n")
        .await
        .unwrap();
    let mut r = BufReader::new(s);
    assert!(line(&mut r).await.starts_with("220"));
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
    let log = Arc::new(Mutex::new(Vec::new()));
    let backend = recording_backend(log.clone(), false).await;
    let gw = common::start(&config(dir.path(), &backend, "proxy_v2, received", "")).await;
    let s = TcpStream::connect(gw.addr("mx").unwrap()).await.unwrap();
    let local = s.local_addr().unwrap();
    let mut r = BufReader::new(s);
    line(&mut r).await;
    deliver(&mut r, "c.example").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let seen = log.lock().unwrap().clone();
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
    let log = Arc::new(Mutex::new(Vec::new()));
    let backend = recording_backend(log, false).await;
    let gw = common::start(
        &config(dir.path(), &backend, "received", ", tls: implicit").replace(
            "tls: starttls, backend: b, policy: p , tls: implicit",
            "tls: implicit, backend: b, policy: p",
        ),
    )
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
    let mut running = BufReader::new(tls);
    assert!(line(&mut running).await.starts_with("220"));
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
    assert!(cmd(&mut running, "NOOP").await.starts_with("250"));
}
