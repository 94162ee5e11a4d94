//! Integration tests: the gateway in-process on loopback, in front of the demo
//! backend (an in-memory SMTP server) or small scripted backends.

mod common;

use common::{Gateway, SmtpBackend, SmtpClient, Yaml};
use mailgate::demo::Mailbox;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Setup {
    gw: Gateway,
    mailbox: Arc<Mailbox>,
    ca: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// Listeners `mx` (STARTTLS), `smtps` (implicit TLS), `plain` (none), each
/// with `extra`, and `sub` (STARTTLS required), in front of `backend`.
fn yaml(dir: &Path, backend: &str, extra: &str) -> Yaml {
    Yaml::new()
        .server("shutdown_grace: 2s")
        .listener("mx", "smtp", "starttls", extra)
        .listener("smtps", "smtp", "implicit", extra)
        .listener("plain", "smtp", "none", extra)
        .listener("sub", "smtp", "starttls", "require_tls: true")
        .certs(dir)
        .backend("b", backend, "")
}

async fn setup_with(extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = common::dev_cert(dir.path());
    let (mailbox, addr) = common::demo_smtp().await;
    let gw = yaml(dir.path(), &addr, extra).start().await;
    Setup {
        gw,
        mailbox,
        ca,
        _dir: dir,
    }
}

async fn setup() -> Setup {
    setup_with("").await
}

async fn connect(gw: &Gateway, name: &str) -> SmtpClient<TcpStream> {
    SmtpClient::greeted(gw.addr(name).unwrap()).await
}

/// The message as the backend stored it, minus mailgate's Received header.
fn without_trace(data: &[u8]) -> Vec<u8> {
    let s = data;
    assert!(
        s.starts_with(b"Received: from "),
        "no trace header first: {:?}",
        String::from_utf8_lossy(&s[..s.len().min(200)])
    );
    let mut i = s.iter().position(|b| *b == b'\n').unwrap() + 1;
    while s[i] == b'\t' || s[i] == b' ' {
        i += s[i..].iter().position(|b| *b == b'\n').unwrap() + 1;
    }
    s[i..].to_vec()
}

#[tokio::test]
async fn plaintext_pipelined_transaction() {
    let st = setup().await;
    let mut c = connect(&st.gw, "plain").await;
    // RFC 2920: the whole transaction in one write; replies come in order
    c.send(b"EHLO client.test\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\nRCPT TO:<carol@example.net>\r\nDATA\r\n").await;
    let ehlo = c.expect(250).await;
    assert!(
        ehlo.contains("PIPELINING")
            && ehlo.contains("8BITMIME")
            && ehlo.contains("ENHANCEDSTATUSCODES"),
        "{ehlo}"
    );
    assert!(
        !ehlo.contains("STARTTLS") && !ehlo.contains("CHUNKING") && !ehlo.contains("SMTPUTF8"),
        "{ehlo}"
    );
    c.expect(250).await;
    c.expect(250).await;
    c.expect(250).await;
    c.expect(354).await;
    c.send(b"Subject: hi\r\n\r\nline one\r\n..leading dot\r\n.\r\nQUIT\r\n")
        .await;
    let t = c.expect(250).await;
    assert!(
        t.contains("queued as DEMO1"),
        "backend reply passed through: {t}"
    );
    c.expect(221).await;
    let m = &st.mailbox.all()[0];
    assert_eq!(m.from, "alice@example.org");
    assert_eq!(m.rcpts, vec!["bob@example.net", "carol@example.net"]);
    let text = String::from_utf8_lossy(&m.data).to_string();
    assert!(
        text.starts_with(
            "Received: from client.test ([127.0.0.1])\r\n\tby gw.test (mailgate) with ESMTP\r\n"
        ),
        "{text}"
    );
    assert_eq!(
        without_trace(&m.data),
        b"Subject: hi\r\n\r\nline one\r\n.leading dot\r\n"
    );
}

#[tokio::test]
async fn backend_connection_is_reused_across_transactions() {
    let st = setup().await;
    let mut c = connect(&st.gw, "plain").await;
    let (code, _) = c
        .send_message("client.test", b"Subject: 1\r\n\r\none\r\n.\r\n")
        .await;
    assert_eq!(code, 250);
    // an abandoned transaction, then a second message
    c.send(b"MAIL FROM:<x@example.org>\r\n").await;
    c.expect(250).await;
    c.send(b"RSET\r\nMAIL FROM:<y@example.org>\r\nRCPT TO:<z@example.net>\r\nDATA\r\n")
        .await;
    c.expect(250).await;
    c.expect(250).await;
    c.expect(250).await;
    c.expect(354).await;
    c.send(b"Subject: 2\r\n\r\ntwo\r\n.\r\n").await;
    c.expect(250).await;
    let all = st.mailbox.all();
    assert_eq!(all.len(), 2);
    assert_eq!(all[1].from, "y@example.org");
}

#[tokio::test]
async fn starttls_delivers_and_traces_tls() {
    let st = setup().await;
    let c = connect(&st.gw, "mx").await;
    let mut c = c.starttls(&st.ca).await;
    let (code, _) = c
        .send_message("client.test", b"Subject: tls\r\n\r\nsecret\r\n.\r\n")
        .await;
    assert_eq!(code, 250);
    let data = String::from_utf8_lossy(&st.mailbox.all()[0].data).to_string();
    assert!(
        data.contains("with ESMTPS\r\n\t(version=TLSv1.3 cipher=TLS13_"),
        "{data}"
    );
}

#[tokio::test]
async fn implicit_tls_delivers() {
    let st = setup().await;
    let s = TcpStream::connect(st.gw.addr("smtps").unwrap())
        .await
        .unwrap();
    let mut c = SmtpClient::new(s).tls(&st.ca).await;
    c.expect(220).await;
    let (code, _) = c
        .send_message("client.test", b"Subject: smtps\r\n\r\nhello\r\n.\r\n")
        .await;
    assert_eq!(code, 250);
    assert_eq!(st.mailbox.count(), 1);
}

/// CVE-2011-0411: bytes pipelined after STARTTLS are never executed.
#[tokio::test]
async fn starttls_injection_is_discarded() {
    let st = setup().await;
    let mut c = connect(&st.gw, "mx").await;
    c.send(b"EHLO client.test\r\n").await;
    c.expect(250).await;
    c.send(b"STARTTLS\r\nRSET\r\n").await;
    c.expect(220).await;
    // exactly one plaintext reply: nothing else is buffered or arrives
    assert!(
        c.buf.is_empty(),
        "extra plaintext: {:?}",
        String::from_utf8_lossy(&c.buf)
    );
    let mut t = c.tls(&st.ca).await;
    // first thing inside TLS is the answer to our EHLO, not to the injected RSET
    t.send(b"EHLO client.test\r\n").await;
    let ehlo = t.expect(250).await;
    assert!(ehlo.starts_with("250-gw.test Hello client.test"), "{ehlo}");
    assert!(!ehlo.contains("STARTTLS"));
    t.send(b"RCPT TO:<bob@example.net>\r\n").await;
    t.expect(503).await;
    // state was reset by the handshake: MAIL needs a fresh EHLO, which we gave
    t.send(b"MAIL FROM:<a@example.org>\r\n").await;
    t.expect(250).await;
}

#[tokio::test]
async fn state_is_forgotten_after_starttls() {
    let st = setup().await;
    let c = connect(&st.gw, "mx").await;
    let mut t = c.starttls(&st.ca).await;
    // no EHLO after TLS: MAIL is out of sequence (RFC 3207 §4.2)
    t.send(b"MAIL FROM:<a@example.org>\r\n").await;
    t.expect(503).await;
    t.send(b"STARTTLS\r\n").await;
    t.expect(503).await;
}

#[tokio::test]
async fn require_tls_refuses_mail_before_starttls() {
    let st = setup().await;
    let mut c = connect(&st.gw, "sub").await;
    c.send(b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nAUTH PLAIN AGEAYg==\r\n")
        .await;
    c.expect(250).await;
    let t = c.expect(530).await;
    assert!(t.contains("5.7.0"), "{t}");
    c.expect(530).await;
    let mut t = c.starttls(&st.ca).await;
    let (code, _) = t
        .send_message("client.test", b"Subject: x\r\n\r\ny\r\n.\r\n")
        .await;
    assert_eq!(code, 250);
}

/// The 13 end-of-data variants of SMTP smuggling (tests/data/smtp-smuggling), in
/// plaintext and after STARTTLS, in both bare-newline modes: at most one
/// message reaches the backend, the smuggled commands are never answered.
#[tokio::test]
async fn smuggling_variants_never_smuggle() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/smtp-smuggling/eod-sequences.tsv"
    );
    let tsv = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut variants = Vec::new();
    for line in tsv.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        if cols[0].contains("VALID") {
            continue;
        }
        let bytes: Vec<u8> = cols[2]
            .split(' ')
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect();
        variants.push((cols[0].to_string(), bytes));
    }
    assert_eq!(variants.len(), 13, "expected the 13 variants");
    for mode in ["", ", bare_newlines: normalize"] {
        let st = setup_with(mode).await;
        let mut expected_msgs = 0;
        for (name, v) in &variants {
            for tls in [false, true] {
                let mut payload =
                    b"From: a@example.org\r\nSubject: smuggle test\r\n\r\nbody".to_vec();
                payload.extend_from_slice(v);
                payload.extend_from_slice(b"MAIL FROM:<smuggled@x.example>\r\nRCPT TO:<victim@y.example>\r\nDATA\r\nFrom: smuggled@x.example\r\n\r\nsmuggled\r\n");
                payload.extend_from_slice(b".\r\n");
                let before = st.mailbox.count();
                let (code, rest) = if tls {
                    let c = connect(&st.gw, "mx").await;
                    let mut t = c.starttls(&st.ca).await;
                    let (code, _) = t.send_message("client.test", &payload).await;
                    (code, t.rest(Duration::from_millis(300)).await)
                } else {
                    let mut c = connect(&st.gw, "plain").await;
                    let (code, _) = c.send_message("client.test", &payload).await;
                    (code, c.rest(Duration::from_millis(300)).await)
                };
                let after = st.mailbox.count();
                assert!(
                    after - before <= 1,
                    "{name} tls={tls} mode={mode}: {} messages",
                    after - before
                );
                assert!(
                    rest.is_empty(),
                    "{name} tls={tls} mode={mode}: smuggled commands answered: {rest:?}"
                );
                if code == 250 {
                    expected_msgs += 1;
                    let m = &st.mailbox.all()[after - 1];
                    assert_eq!(m.from, "alice@example.org");
                    assert!(
                        !m.data.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'),
                        "{name}: bare LF reached the backend"
                    );
                } else {
                    assert!(code == 550 || code == 554, "{name}: {code}");
                }
            }
        }
        if mode.is_empty() {
            assert_eq!(expected_msgs, 0, "reject mode accepted a variant");
        }
        assert!(st
            .mailbox
            .all()
            .iter()
            .all(|m| m.from != "smuggled@x.example"));
    }
}

#[tokio::test]
async fn size_limit_and_message_line_limit() {
    let st = setup_with(", max_message_size: 4KiB").await;
    let mut c = connect(&st.gw, "plain").await;
    c.send(b"EHLO c\r\n").await;
    assert!(c.expect(250).await.contains("SIZE 4096"));
    c.send(b"MAIL FROM:<a@example.org> SIZE=100000\r\n").await;
    c.expect(552).await;
    let big = format!(
        "Subject: big\r\n\r\n{}\r\n.\r\n",
        "0123456789\r\n".repeat(1000)
    );
    let (code, t) = c.send_message("client.test", big.as_bytes()).await;
    assert_eq!(code, 552, "{t}");
    let long = format!("Subject: long\r\n\r\n{}\r\n.\r\n", "x".repeat(1200));
    let (code, t) = c.send_message("client.test", long.as_bytes()).await;
    assert_eq!(code, 550, "{t}");
    assert_eq!(st.mailbox.count(), 0);
    // the session is still usable
    let (code, _) = c
        .send_message("client.test", b"Subject: ok\r\n\r\nfine\r\n.\r\n")
        .await;
    assert_eq!(code, 250);
}

#[tokio::test]
async fn one_megabyte_with_dot_lines_is_byte_identical() {
    let st = setup().await;
    let mut body = b"Subject: big dotted\r\n\r\n".to_vec();
    let mut i = 0;
    while body.len() < 1_000_000 {
        let line = match i % 4 {
            0 => format!(".line {i} starts with a dot\r\n"),
            1 => format!("..two dots {i}\r\n"),
            2 => ".\t\r\n".to_string(),
            _ => format!("plain line {i} {}\r\n", "abc".repeat(20)),
        };
        body.extend_from_slice(line.as_bytes());
        i += 1;
    }
    let wire = mailgate::smtp::data::stuff(&[&body]);
    let c = connect(&st.gw, "mx").await;
    let mut t = c.starttls(&st.ca).await;
    let (code, _) = t.send_message("client.test", &wire).await;
    assert_eq!(code, 250);
    assert_eq!(without_trace(&st.mailbox.all()[0].data), body);
}

#[tokio::test]
async fn commands_refused_and_limits() {
    let st = setup().await;
    let mut c = connect(&st.gw, "plain").await;
    c.send(b"VRFY root\r\nEXPN staff\r\nHELP\r\nNOOP\r\nBDAT 10 LAST\r\n")
        .await;
    c.expect(502).await;
    c.expect(502).await;
    c.expect(214).await;
    c.expect(250).await;
    c.expect(502).await;
    let long = format!("NOOP {}\r\n", "x".repeat(600));
    c.send(long.as_bytes()).await;
    c.expect(500).await;
    c.send(b"MAIL FROM:<a@example.org>\r\n").await;
    c.expect(503).await;
    c.send(b"HELO c\r\nMAIL FROM:<a@example.org> BODY=8BITMIME\r\n")
        .await;
    c.expect(250).await;
    c.expect(501).await;
    c.send(b"QUIT\r\n").await;
    c.expect(221).await;
    assert_eq!(c.rest(Duration::from_millis(500)).await, "");
}

#[tokio::test]
async fn too_many_errors_closes() {
    let st = setup_with(", max_errors: 3").await;
    let mut c = connect(&st.gw, "plain").await;
    c.send(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n").await;
    c.expect(500).await;
    c.expect(500).await;
    c.expect(421).await;
    assert_eq!(c.rest(Duration::from_millis(500)).await, "");
}

#[tokio::test]
async fn backend_down_is_a_temporary_failure() {
    let dir = tempfile::tempdir().unwrap();
    common::dev_cert(dir.path());
    let dead = format!("127.0.0.1:{}", common::free_port());
    let gw = yaml(dir.path(), &dead, "").start().await;
    let mut c = connect(&gw, "plain").await;
    c.send(b"EHLO c\r\n").await;
    let ehlo = c.expect(250).await;
    // caps unknown: nothing optional is advertised
    assert!(!ehlo.contains("8BITMIME"), "{ehlo}");
    c.send(b"MAIL FROM:<a@example.org>\r\n").await;
    let t = c.expect(451).await;
    assert!(t.contains("4.4.1"), "{t}");
}

/// A scripted backend that answers until DATA, then behaves as `mode`.
async fn faulty_backend(mode: &'static str) -> String {
    let b = SmtpBackend::new().on("EHLO", "250-legacy\r\n250 PIPELINING\r\n");
    let b = match mode {
        // the connection dropped mid-message
        "close-in-data" => b.close_after("DATA"),
        "stall" => b.hang_after("DATA"),
        "bogus-250-to-data" => b.on("DATA", "250 sure\r\n"),
        _ => b.on("DATA", "451 4.3.0 try later\r\n"),
    };
    b.start().await.addr
}

#[tokio::test]
async fn backend_failures_mid_transaction_never_become_250() {
    for mode in ["close-in-data", "stall", "bogus-250-to-data", "tempfail"] {
        let dir = tempfile::tempdir().unwrap();
        common::dev_cert(dir.path());
        let addr = faulty_backend(mode).await;
        let gw = yaml(dir.path(), &addr, "timeouts: { backend_data: 1s }")
            .start()
            .await;
        let mut c = connect(&gw, "plain").await;
        let (code, t) = c
            .send_message("client.test", b"Subject: x\r\n\r\nbody\r\n.\r\n")
            .await;
        assert!((400..500).contains(&code), "{mode}: {t}");
    }
}

#[tokio::test]
async fn connection_limit_answers_421() {
    let st = setup_with(", max_connections: 2").await;
    let _a = connect(&st.gw, "plain").await;
    let _b = connect(&st.gw, "plain").await;
    let s = TcpStream::connect(st.gw.addr("plain").unwrap())
        .await
        .unwrap();
    let mut c = SmtpClient::new(s);
    let t = c.expect(421).await;
    assert!(t.contains("4.7.0"), "{t}");
}

#[tokio::test]
async fn deny_list_refuses_before_greeting() {
    let dir = tempfile::tempdir().unwrap();
    common::dev_cert(dir.path());
    let (_mb, addr) = common::demo_smtp().await;
    let gw = yaml(dir.path(), &addr, "policy: p")
        .section("policies:\n  p: { deny: [\"127.0.0.0/8\"] }")
        .start()
        .await;
    let s = TcpStream::connect(gw.addr("plain").unwrap()).await.unwrap();
    let mut c = SmtpClient::new(s);
    c.expect(554).await;
}

#[tokio::test]
async fn shutdown_tells_idle_sessions_421() {
    let st = setup().await;
    let mut c = connect(&st.gw, "plain").await;
    c.send(b"EHLO c\r\n").await;
    c.expect(250).await;
    let left = st.gw.shutdown().await;
    assert_eq!(left, 0);
    let t = c.expect(421).await;
    assert!(t.contains("4.3.2"), "{t}");
}

#[tokio::test]
async fn tls_handshake_garbage_and_silence_are_bounded() {
    let st = setup_with(", timeouts: { tls_handshake: 1s }").await;
    // garbage instead of a ClientHello
    let mut s = TcpStream::connect(st.gw.addr("smtps").unwrap())
        .await
        .unwrap();
    s.write_all(b"EHLO this is not TLS\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 256];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("not closed");
    assert!(matches!(r, Ok(_) | Err(_)));
    // silence: closed by the handshake deadline
    let mut s = TcpStream::connect(st.gw.addr("smtps").unwrap())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("handshake deadline not applied");
    assert_eq!(n.unwrap_or(0), 0);
    assert!(started.elapsed() >= Duration::from_millis(900));
    // the gateway still serves others
    let mut c = connect(&st.gw, "plain").await;
    c.send(b"NOOP\r\n").await;
    c.expect(250).await;
}

/// Sends a message in two halves, so that parallel messages are in flight
/// together; the reply after its end.
async fn send_in_halves(c: &mut SmtpClient<TcpStream>, m: &[u8]) -> (u16, String) {
    let mut wire = mailgate::smtp::data::stuff(&[m]);
    let tail = wire.split_off(wire.len() / 2);
    c.send(&wire).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.send(&tail).await;
    c.reply().await.unwrap()
}

/// The demo backend behind a gateway with `max_inflight_data: 1MiB`.
async fn budget_gateway() -> (tempfile::TempDir, Arc<Mailbox>, Gateway) {
    let dir = tempfile::tempdir().unwrap();
    common::dev_cert(dir.path());
    let (mailbox, addr) = common::demo_smtp().await;
    let gw = yaml(dir.path(), &addr, "")
        .server("max_inflight_data: 1MiB")
        .start()
        .await;
    (dir, mailbox, gw)
}

/// A SIZE announced in MAIL is checked against the in-flight budget at DATA
/// but not reserved: memory is taken as bytes arrive. Otherwise a few
/// sessions announcing big messages and then trickling hold the whole budget
/// without sending anything, and everyone else gets 452.
#[tokio::test]
async fn announced_size_is_not_reserved_before_the_data() {
    let (_dir, mailbox, gw) = budget_gateway().await;
    let announce = b"EHLO client.test\r\nMAIL FROM:<a@example.org> SIZE=900000\r\nRCPT TO:<b@example.net>\r\nDATA\r\n";
    let mut idle = connect(&gw, "plain").await;
    idle.send(announce).await;
    idle.expect(250).await;
    idle.expect(250).await;
    idle.expect(250).await;
    idle.expect(354).await;
    assert!(
        gw.inflight.used() < 100_000,
        "nothing sent yet, {} bytes held",
        gw.inflight.used()
    );
    // a second session announcing as much still gets its 354 and delivers
    let mut c = connect(&gw, "plain").await;
    c.send(announce).await;
    c.expect(250).await;
    c.expect(250).await;
    c.expect(250).await;
    c.expect(354).await;
    c.send(b"Subject: sized\r\n\r\nhi\r\n.\r\n").await;
    c.expect(250).await;
    assert_eq!(mailbox.count(), 1);
    drop(idle);
}

/// Issue 11 item 8: a process-wide budget for message bytes in flight. With
/// 1 MiB, of two parallel 700 KiB messages one gets 452 4.3.1 at the end of
/// its data (read to its end, holding nothing), and a MAIL announcing
/// SIZE=2000000 gets 452 instead of 354. The backend never sees a refused
/// message, and every reserved byte is given back.
#[tokio::test]
async fn inflight_budget_refuses_with_452() {
    let (_dir, mailbox, gw) = budget_gateway().await;
    let refused_before = mailgate::observe::metrics().inflight_refused.get();

    let message = |tag: &str| {
        let mut m = format!("Subject: {tag}\r\n\r\n").into_bytes();
        let line = format!("{tag} {}\r\n", "x".repeat(96));
        while m.len() < 700 * 1024 {
            m.extend_from_slice(line.as_bytes());
        }
        m
    };
    let (a, b) = (message("AAA"), message("BBB"));
    let mut ca = connect(&gw, "plain").await;
    let mut cb = connect(&gw, "plain").await;
    for c in [&mut ca, &mut cb] {
        c.send(
            b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n",
        )
        .await;
        c.expect(250).await;
        c.expect(250).await;
        c.expect(250).await;
        c.expect(354).await;
    }
    let (ra, rb) = tokio::join!(send_in_halves(&mut ca, &a), send_in_halves(&mut cb, &b));
    let mut codes = [ra.0, rb.0];
    codes.sort();
    assert_eq!(codes, [250, 452], "{ra:?} {rb:?}");
    let refused = if ra.0 == 452 { &ra.1 } else { &rb.1 };
    assert!(refused.starts_with("452 4.3.1"), "{refused}");
    let all = mailbox.all();
    assert_eq!(
        all.len(),
        1,
        "the refused message never reached the backend"
    );
    let kept = if ra.0 == 250 { &a } else { &b };
    assert_eq!(&without_trace(&all[0].data), kept);
    assert_eq!(gw.inflight.used(), 0, "every reservation released");

    // the refused session is fine afterwards (a 452, not a framing problem)
    let loser = if ra.0 == 452 { &mut ca } else { &mut cb };
    let (code, _) = loser
        .send_message("client.test", b"Subject: small\r\n\r\nhi\r\n.\r\n")
        .await;
    assert_eq!(code, 250);

    // SIZE above what the budget can hold: refused before 354
    let mut c = connect(&gw, "plain").await;
    c.send(b"EHLO client.test\r\nMAIL FROM:<a@example.org> SIZE=2000000\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
        .await;
    c.expect(250).await;
    c.expect(250).await;
    c.expect(250).await;
    let t = c.expect(452).await;
    assert!(t.starts_with("452 4.3.1"), "{t}");
    // the transaction stays; a smaller announced size goes through after RSET
    c.send(b"RSET\r\nMAIL FROM:<a@example.org> SIZE=1000\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
        .await;
    c.expect(250).await;
    c.expect(250).await;
    c.expect(250).await;
    c.expect(354).await;
    c.send(b"Subject: sized\r\n\r\nhi\r\n.\r\n").await;
    c.expect(250).await;
    assert_eq!(mailbox.count(), 3);
    assert_eq!(gw.inflight.used(), 0);
    let m = mailgate::observe::metrics();
    assert!(m.inflight_refused.get() >= refused_before + 2);
    let text = m.encode();
    assert!(text.contains("mailgate_inflight_data_bytes "), "{text}");
    assert!(text.contains("mailgate_inflight_data_refusals_total "));
}
