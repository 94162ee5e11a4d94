//! Hostile SMTP clients against the gateway in-process on loopback (in front of
//! the in-memory demo backend). Every scenario runs under `tokio::time::timeout`
//! and must end in a clean protocol reply or a clean close within its deadline;
//! afterwards a normal client is still served, and no code outside tests/ may
//! have panicked (a panic hook records library panics, which tokio would
//! otherwise swallow with the session task).
//!
//! Observed behaviour worth knowing (asserted below):
//! - Early talkers (bytes before the greeting) are not rejected: mailgate has no
//!   pregreet check, it sends its 220 and then answers the early commands in order.
//! - A command line longer than `max_command_line` gets one `500 5.5.2 Line too
//!   long` once its end arrives; it is skipped, never buffered whole.
//! - `timeouts.command` bounds one whole line (a slow line ends with 421 at the
//!   deadline however steadily its bytes trickle); `timeouts.session` bounds
//!   the session however many lines arrive in time.

mod common;

use common::{SmtpClient, Yaml};
use mailgate::demo::Mailbox;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------
// panics inside the gateway

static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Records every panic raised outside tests/ (the gateway's session tasks run
/// on the test's runtime and tokio turns their panics into a dropped task).
fn watch_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let at = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            if !at.starts_with("tests/") && !at.starts_with("tests\\") {
                PANICS.lock().unwrap().push(format!("{at}: {info}"));
            }
            default(info);
        }));
    });
}

fn assert_no_panics() {
    let p = PANICS.lock().unwrap();
    assert!(p.is_empty(), "the gateway panicked: {p:#?}");
}

/// Runs one scenario under a hard time limit.
async fn bounded<F: std::future::Future<Output = ()>>(limit: Duration, what: &str, f: F) {
    watch_panics();
    if tokio::time::timeout(limit, f).await.is_err() {
        panic!("{what}: not finished within {limit:?}");
    }
    assert_no_panics();
}

// ---------------------------------------------------------------------------
// the gateway

struct Setup {
    gw: common::Gateway,
    mailbox: Arc<Mailbox>,
    ca: PathBuf,
    _dir: tempfile::TempDir,
}

/// Listeners `plain` (no TLS), `mx` (STARTTLS) and `smtps` (implicit TLS), each
/// with `extra` appended to its flow mapping.
async fn setup(extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = common::dev_cert(dir.path());
    let (mailbox, backend) = common::demo_smtp().await;
    let gw = Yaml::new()
        .server("shutdown_grace: 1s")
        .listener("plain", "smtp", "none", extra)
        .listener("mx", "smtp", "starttls", extra)
        .listener("smtps", "smtp", "implicit", extra)
        .certs(dir.path())
        .backend("b", &backend, "")
        .start()
        .await;
    Setup {
        gw,
        mailbox,
        ca,
        _dir: dir,
    }
}

impl Setup {
    async fn tcp(&self, listener: &str) -> TcpStream {
        let s = TcpStream::connect(self.gw.addr(listener).unwrap())
            .await
            .unwrap();
        s.set_nodelay(true).unwrap();
        s
    }

    /// Connected, greeting read.
    async fn connect(&self, listener: &str) -> SmtpClient<TcpStream> {
        let mut c = SmtpClient::new(self.tcp(listener).await);
        c.expect(220).await;
        c
    }

    /// A well-behaved client still gets a message through, over plaintext and
    /// over STARTTLS.
    async fn assert_served(&self) {
        let before = self.mailbox.count();
        let mut c = self.connect("plain").await;
        send_message(&mut c).await;
        let c = self.connect("mx").await;
        let mut t = c.starttls(&self.ca).await;
        send_message(&mut t).await;
        assert_eq!(self.mailbox.count(), before + 2);
    }
}

async fn send_message<S: AsyncRead + AsyncWrite + Unpin>(c: &mut SmtpClient<S>) {
    let (code, t) = c
        .send_message(
            "normal.test",
            b"Subject: still served\r\n\r\nhello\r\n.\r\n",
        )
        .await;
    assert_eq!(code, 250, "unexpected reply: {t}");
    c.send(b"QUIT\r\n").await;
    c.expect(221).await;
}

/// A real TLS ClientHello, as the first flight of a rustls client.
fn client_hello(ca: &Path) -> Vec<u8> {
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(common::tls_client(ca), name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    assert_eq!(out[0], 0x16, "a handshake record");
    out
}

/// Deterministic pseudo-random bytes.
fn garbage(n: usize, mut seed: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------
// scenarios

#[tokio::test]
async fn overlong_lines_and_commands() {
    let st = setup(", max_errors: 50").await;
    bounded(Duration::from_secs(30), "overlong", async {
        let mut c = st.connect("plain").await;
        // just over the 512-octet command limit
        c.send(format!("NOOP {}\r\n", "x".repeat(600)).as_bytes())
            .await;
        assert!(c.expect(500).await.contains("Line too long"));
        // one megabyte without a line end, in several writes, then its end
        let chunk = vec![b'A'; 64 * 1024];
        for _ in 0..16 {
            c.send(&chunk).await;
        }
        assert!(c.quiet(Duration::from_millis(200)).await, "answered early");
        c.send(b"\r\nNOOP\r\n").await;
        assert!(c.expect(500).await.contains("Line too long"));
        c.expect(250).await;
        // within the line limit but arguments over their own limits
        c.send(format!("EHLO {}\r\n", "a".repeat(300)).as_bytes())
            .await;
        c.expect(501).await;
        c.send(b"EHLO client.test\r\n").await;
        c.expect(250).await;
        c.send(format!("MAIL FROM:<{}@example.org>\r\n", "a".repeat(300)).as_bytes())
            .await;
        c.expect(501).await;
        c.send(format!("MAIL FROM:<a@{}.example>\r\n", "b".repeat(70)).as_bytes())
            .await;
        c.expect(501).await;
        c.send(format!("RCPT TO:<{}@example.org>\r\n", "a".repeat(65)).as_bytes())
            .await;
        c.expect(501).await;
        // an overlong line made of many short pieces of a pipelined burst
        let mut burst = b"NOOP\r\n".to_vec();
        burst.extend_from_slice(&[b'x'; 5000]);
        burst.extend_from_slice(b"\r\nNOOP\r\n");
        c.send(&burst).await;
        c.expect(250).await;
        c.expect(500).await;
        c.expect(250).await;
        c.send(b"QUIT\r\n").await;
        c.expect(221).await;
        assert_eq!(c.closed(Duration::from_secs(2)).await, b"");
        st.assert_served().await;
    })
    .await;
}

#[tokio::test]
async fn nul_and_eight_bit_bytes_in_commands() {
    let st = setup(", max_errors: 50").await;
    bounded(Duration::from_secs(30), "8-bit", async {
        let mut c = st.connect("plain").await;
        let cases: &[(&[u8], u16)] = &[
            (b"NO\0OP", 500),
            (b"\0", 500),
            (b"NOOP\0", 500),
            (b"\x80NOOP", 500),
            (b"NOOP \x01\x02", 500),
            (b"EHLO \xff\xfe", 500),
            (b"\xc3\xa9HLO client.test", 500),
            (b"EHLO caf\xc3\xa9.example", 501),
            (b"EHLO client.test\x7f", 500),
            (b"EHLO client.test", 250),
            (b"MAIL FROM:<j\xc3\xb6rg@example.org>", 501),
            (b"MAIL FROM:<a@example.org>\x00 SIZE=10", 500),
            (b"MAIL FROM:<a\xff@example.org>", 500),
            (b"MAIL FROM:<a@example.org> SIZE=\xc3\xa9", 501),
            (b"MAIL FROM:<a@example.org> X\xc3\xa9=1", 555),
            (b"MAIL FROM:<a@example.org>", 250),
            (b"RCPT TO:<b\x00@example.net>", 500),
            (b"RCPT TO:<b@example.net>", 250),
            (b"RSET\x1b[2J", 500),
            (b"RSET", 250),
        ];
        for (line, code) in cases {
            let mut l = line.to_vec();
            l.extend_from_slice(b"\r\n");
            c.send(&l).await;
            let (got, text) = c
                .reply()
                .await
                .unwrap_or_else(|| panic!("closed after {:?}", String::from_utf8_lossy(line)));
            assert_eq!(got, *code, "{:?}: {text}", String::from_utf8_lossy(line));
        }
        // the same lines pipelined in one write: answered in order
        let mut burst = Vec::new();
        for (line, _) in cases {
            burst.extend_from_slice(line);
            burst.extend_from_slice(b"\r\n");
        }
        c.send(&burst).await;
        for (line, code) in cases {
            let (got, text) = c.reply().await.expect("closed during the burst");
            assert_eq!(got, *code, "{:?}: {text}", String::from_utf8_lossy(line));
        }
        c.send(b"QUIT\r\n").await;
        c.expect(221).await;
        st.assert_served().await;
    })
    .await;
}

/// Regression: 8-bit bytes straight after the `FROM`/`TO` keyword used to make
/// the command parser slice a UTF-8 character in half (a panic in the session
/// task, so the client saw its connection dropped without a reply).
#[tokio::test]
async fn eight_bit_inside_the_mail_and_rcpt_keywords() {
    let st = setup(", max_errors: 50").await;
    bounded(Duration::from_secs(20), "8-bit keyword", async {
        let mut c = st.connect("plain").await;
        c.send(b"EHLO client.test\r\n").await;
        c.expect(250).await;
        for line in [
            &b"MAIL FROM\xc3\xa9:<a@example.org>\r\n"[..],
            b"MAIL FRO\xc3\xa9:<a@example.org>\r\n",
            b"RCPT TO\xc3\xa9:<b@example.net>\r\n",
            b"RCPT T\xc3\xa9:<b@example.net>\r\n",
        ] {
            c.send(line).await;
            let r = c.reply().await;
            assert!(
                matches!(r, Some((501 | 503, _))),
                "{:?}: {r:?}",
                String::from_utf8_lossy(line)
            );
        }
        c.send(b"NOOP\r\n").await;
        c.expect(250).await;
    })
    .await;
}

/// Regression: a non-ASCII recipient in a transaction opened without
/// `SMTPUTF8` was relayed to the backend as raw 8-bit bytes (RFC 6531 §3.4:
/// the client must give SMTPUTF8 on MAIL for that; §3.7.1: 553 5.6.7). MAIL
/// already refuses an 8-bit sender without the parameter; RCPT must too, so no
/// 8-bit byte reaches a legacy backend that never negotiated it.
#[tokio::test]
async fn eight_bit_recipient_without_smtputf8_is_refused() {
    let st = setup("").await;
    bounded(Duration::from_secs(20), "8-bit RCPT", async {
        let mut c = st.connect("plain").await;
        c.send(b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\n")
            .await;
        c.expect(250).await;
        c.expect(250).await;
        c.send("RCPT TO:<j\u{f6}rg@example.net>\r\n".as_bytes())
            .await;
        let (code, text) = c.reply().await.expect("closed");
        assert!(
            (500..600).contains(&code),
            "8-bit recipient accepted: {text}"
        );
        c.send(b"RCPT TO:<b@example.net>\r\n").await;
        c.expect(250).await;
    })
    .await;
}

#[tokio::test]
async fn binary_garbage() {
    let st = setup("").await;
    bounded(Duration::from_secs(30), "garbage", async {
        // a normal session open the whole time is not disturbed
        let mut bystander = st.connect("plain").await;
        bystander.send(b"EHLO bystander.test\r\n").await;
        bystander.expect(250).await;

        // random bytes (LF about every 256 octets): errors, then 421 and close
        let mut c = SmtpClient::new(st.tcp("plain").await);
        c.expect(220).await;
        let _ = c.s.write_all(&garbage(256 * 1024, 0x5EED)).await;
        let mut codes = Vec::new();
        while let Some((code, _)) = c.reply().await {
            codes.push(code);
        }
        assert_eq!(codes.last(), Some(&421), "{codes:?}");
        assert!(codes[..codes.len() - 1]
            .iter()
            .all(|c| matches!(c, 500 | 501 | 503 | 555 | 250 | 214 | 502)));

        // garbage without a single LF: nothing is answered until a line ends
        let mut c = st.connect("plain").await;
        let mut g = garbage(200 * 1024, 7);
        g.retain(|b| *b != b'\n');
        c.send(&g).await;
        assert!(c.quiet(Duration::from_millis(300)).await);
        c.send(b"\r\nNOOP\r\n").await;
        c.expect(500).await;
        c.expect(250).await;

        // garbage that looks like the start of TLS on the plaintext port
        let mut c = st.connect("mx").await;
        c.send(&client_hello(&st.ca)).await;
        c.send(b"\r\nNOOP\r\n").await;
        let mut codes = Vec::new();
        loop {
            let (code, _) = c.reply().await.expect("closed");
            codes.push(code);
            if code == 250 {
                break;
            }
        }
        assert!(
            codes[..codes.len() - 1].iter().all(|c| *c == 500),
            "{codes:?}"
        );

        bystander.send(b"NOOP\r\n").await;
        bystander.expect(250).await;
        st.assert_served().await;
    })
    .await;
}

/// Thousands of commands in one write, with and without the client reading:
/// every one is answered, in order (RFC 2920), nothing is lost while the
/// gateway waits for the client to read.
#[tokio::test]
async fn pipelining_flood() {
    let st = setup("").await;
    bounded(Duration::from_secs(60), "flood", async {
        const N: usize = 20_000;
        let verbs: [(&[u8], u16); 4] = [
            (b"NOOP\r\n", 250),
            (b"HELP\r\n", 214),
            (b"VRFY postmaster\r\n", 502),
            (b"RSET\r\n", 250),
        ];
        let mut flood = Vec::new();
        for i in 0..N {
            flood.extend_from_slice(verbs[i % 4].0);
        }
        flood.extend_from_slice(b"QUIT\r\n");
        for read_late in [false, true] {
            let (r, mut w) = st.tcp("plain").await.into_split();
            let mut c = SmtpClient::new(r);
            c.expect(220).await;
            let data = flood.clone();
            let writer = tokio::spawn(async move {
                w.write_all(&data).await.unwrap();
                w
            });
            if read_late {
                // the client does not read for a while: the gateway must stop
                // reading (its replies cannot be written), not buffer without end
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            for i in 0..N {
                let (code, text) = c.reply().await.unwrap_or_else(|| panic!("closed at {i}"));
                assert_eq!(code, verbs[i % 4].1, "reply {i}: {text}");
            }
            c.expect(221).await;
            assert_eq!(c.closed(Duration::from_secs(2)).await, b"");
            drop(writer.await.unwrap());
        }

        // a flood of errors ends at max_errors with 421, the rest is never read
        let (r, mut w) = st.tcp("plain").await.into_split();
        let mut c = SmtpClient::new(r);
        c.expect(220).await;
        let junk = b"XYZZY\r\n".repeat(N);
        let writer = tokio::spawn(async move {
            let _ = w.write_all(&junk).await;
        });
        let mut codes = Vec::new();
        while let Some((code, _)) = c.reply().await {
            codes.push(code);
        }
        assert_eq!(codes.len(), 10, "{codes:?}");
        assert_eq!(codes[9], 421);
        writer.await.unwrap();
        st.assert_served().await;
    })
    .await;
}

#[tokio::test]
async fn commands_after_quit_are_never_answered() {
    let st = setup("").await;
    bounded(Duration::from_secs(20), "after QUIT", async {
        let mut c = st.connect("plain").await;
        c.send(b"EHLO client.test\r\nQUIT\r\nNOOP\r\nMAIL FROM:<a@example.org>\r\nRSET\r\n")
            .await;
        c.expect(250).await;
        c.expect(221).await;
        let rest = c.closed(Duration::from_secs(2)).await;
        assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
        // writing after the close fails or is ignored, never answered
        let _ = c.s.write_all(b"NOOP\r\n").await;
        assert_eq!(c.closed(Duration::from_secs(2)).await, b"");
        st.assert_served().await;
    })
    .await;
}

#[tokio::test]
async fn auth_with_broken_base64() {
    let st = setup("").await;
    bounded(Duration::from_secs(20), "AUTH", async {
        let c = st.connect("mx").await;
        let mut t = c.starttls(&st.ca).await;
        t.send(b"EHLO client.test\r\n").await;
        t.expect(250).await;
        for line in [
            &b"AUTH PLAIN !!!not-base64!!!\r\n"[..],
            b"AUTH PLAIN AGEAY\r\n",
            b"AUTH PLAIN ====\r\n",
            b"AUTH LOGIN \xff\xfe\r\n",
            b"AUTH\r\n",
        ] {
            t.send(line).await;
            let (code, text) = t.reply().await.expect("closed");
            // a refusal or a continuation we then cancel; never a success
            if code == 334 {
                t.send(b"*\r\n").await;
                let (code, text) = t.reply().await.expect("closed");
                assert!((500..600).contains(&code), "{text}");
            } else {
                assert!((500..600).contains(&code), "{text}");
            }
        }
        t.send(b"NOOP\r\n").await;
        t.expect(250).await;
        st.assert_served().await;
    })
    .await;
}

#[tokio::test]
async fn starttls_twice() {
    let st = setup(", timeouts: { tls_handshake: 1s }").await;
    bounded(Duration::from_secs(30), "STARTTLS twice", async {
        // two in one write: one 220, the second is discarded with the buffer
        let mut c = st.connect("mx").await;
        c.send(b"EHLO client.test\r\n").await;
        c.expect(250).await;
        c.send(b"STARTTLS\r\nSTARTTLS\r\n").await;
        c.expect(220).await;
        assert!(
            c.quiet(Duration::from_millis(200)).await,
            "second STARTTLS answered"
        );
        let mut t = c.tls(&st.ca).await;
        t.send(b"EHLO client.test\r\n").await;
        let ehlo = t.expect(250).await;
        assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
        // inside TLS: refused, session goes on
        t.send(b"STARTTLS\r\n").await;
        assert!(t.expect(503).await.contains("already active"));
        t.send(b"NOOP\r\n").await;
        t.expect(250).await;

        // on the implicit-TLS port
        let mut t = SmtpClient::new(st.tcp("smtps").await).tls(&st.ca).await;
        t.expect(220).await;
        t.send(b"STARTTLS\r\n").await;
        t.expect(503).await;

        // on a listener without TLS
        let mut c = st.connect("plain").await;
        c.send(b"STARTTLS\r\nSTARTTLS\r\nNOOP\r\n").await;
        c.expect(502).await;
        c.expect(502).await;
        c.expect(250).await;

        // STARTTLS answered, then no handshake: closed by the deadline
        let mut c = st.connect("mx").await;
        c.send(b"STARTTLS\r\n").await;
        c.expect(220).await;
        let started = Instant::now();
        c.closed(Duration::from_secs(4)).await;
        assert!(started.elapsed() >= Duration::from_millis(800));
        st.assert_served().await;
    })
    .await;
}

#[tokio::test]
async fn tls_handshake_garbage_on_the_implicit_port() {
    let st = setup(", timeouts: { tls_handshake: 1s }").await;
    bounded(Duration::from_secs(40), "TLS garbage", async {
        let hello = client_hello(&st.ca);
        let probes: Vec<(&str, Vec<u8>)> = vec![
            ("smtp", b"EHLO client.test\r\n".to_vec()),
            ("http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
            ("random", garbage(16 * 1024, 99)),
            ("oversized record", b"\x16\x03\x01\xff\xff".to_vec()),
            ("truncated record", b"\x16\x03\x01\x00\x40\x01\x00".to_vec()),
            ("bad content type", b"\x42\x03\x03\x00\x02\x00\x00".to_vec()),
            ("alert", b"\x15\x03\x03\x00\x02\x02\x28".to_vec()),
            ("hello cut short", hello[..hello.len() / 2].to_vec()),
            ("hello then garbage", {
                let mut v = hello.clone();
                v.extend_from_slice(&garbage(512, 3));
                v
            }),
            ("hello twice", [hello.clone(), hello.clone()].concat()),
        ];
        for (name, bytes) in probes {
            let mut c = SmtpClient::new(st.tcp("smtps").await);
            let _ = c.s.write_all(&bytes).await;
            let got = c.closed(Duration::from_secs(4)).await;
            // TLS records (alerts, a ServerHello) or nothing; never SMTP in clear
            assert!(
                got.is_empty() || matches!(got[0], 0x15 | 0x16),
                "{name}: {:?}",
                String::from_utf8_lossy(&got)
            );
        }
        st.assert_served().await;
    })
    .await;
}

#[tokio::test]
async fn client_hello_then_silence_is_closed_by_the_handshake_deadline() {
    let st = setup(", timeouts: { tls_handshake: 1s }").await;
    bounded(Duration::from_secs(20), "ClientHello then silence", async {
        // implicit TLS
        let mut c = SmtpClient::new(st.tcp("smtps").await);
        let started = Instant::now();
        c.s.write_all(&client_hello(&st.ca)).await.unwrap();
        let got = c.closed(Duration::from_secs(4)).await;
        let took = started.elapsed();
        assert!(!got.is_empty() && got[0] == 0x16, "no ServerHello");
        assert!(took >= Duration::from_millis(800), "{took:?}");
        // after STARTTLS
        let mut c = st.connect("mx").await;
        c.send(b"STARTTLS\r\n").await;
        c.expect(220).await;
        let started = Instant::now();
        c.send(&client_hello(&st.ca)).await;
        let got = c.closed(Duration::from_secs(4)).await;
        assert!(!got.is_empty() && got[0] == 0x16, "no ServerHello");
        assert!(started.elapsed() >= Duration::from_millis(800));
        st.assert_served().await;
    })
    .await;
}

/// Writes `bytes` one at a time, `every` apart, until done or the peer is gone.
fn trickle(
    mut w: tokio::net::tcp::OwnedWriteHalf,
    bytes: Vec<u8>,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for b in bytes {
            if w.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    })
}

#[tokio::test]
async fn slowloris_one_line_ends_at_the_command_deadline() {
    let st = setup(", timeouts: { command: 2s, session: 60s }").await;
    bounded(Duration::from_secs(20), "slowloris", async {
        let (r, w) = st.tcp("plain").await.into_split();
        let mut c = SmtpClient::new(r);
        c.expect(220).await;
        let started = Instant::now();
        // 1 byte per 100 ms, never a complete line within 2 s
        let t = trickle(w, b"NOOP ".repeat(100), Duration::from_millis(100));
        let text = c.expect(421).await;
        let took = started.elapsed();
        assert!(text.contains("4.4.2"), "{text}");
        assert!(
            (Duration::from_millis(1800)..Duration::from_millis(5000)).contains(&took),
            "{took:?}"
        );
        c.closed(Duration::from_secs(2)).await;
        t.abort();
        st.assert_served().await;
    })
    .await;
}

#[tokio::test]
async fn slow_but_complete_lines_end_at_the_session_deadline() {
    let st = setup(", timeouts: { command: 2s, session: 3s }").await;
    bounded(Duration::from_secs(20), "session lifetime", async {
        let (r, w) = st.tcp("plain").await.into_split();
        let mut c = SmtpClient::new(r);
        c.expect(220).await;
        let started = Instant::now();
        // each line takes 600 ms: always within the command deadline
        let t = trickle(w, b"NOOP\r\n".repeat(1000), Duration::from_millis(100));
        let mut oks = 0;
        let took = loop {
            match c.reply().await {
                Some((250, _)) => oks += 1,
                Some((421, _)) => break started.elapsed(),
                other => panic!("{other:?}"),
            }
        };
        assert!(oks >= 2, "{oks}");
        assert!(
            (Duration::from_millis(2800)..Duration::from_millis(6000)).contains(&took),
            "{took:?}"
        );
        c.closed(Duration::from_secs(2)).await;
        t.abort();
        st.assert_served().await;
    })
    .await;
}

/// The message text trickling in (one byte per 100 ms, so each read is well
/// within `timeouts.data`) must still end by the session deadline.
#[tokio::test]
async fn slowloris_in_data_ends_at_the_session_deadline() {
    let st = setup(", timeouts: { command: 2s, data: 2s, session: 3s }").await;
    bounded(Duration::from_secs(20), "DATA slowloris", async {
        let (r, mut w) = st.tcp("plain").await.into_split();
        let mut c = SmtpClient::new(r);
        c.expect(220).await;
        let started = Instant::now();
        w.write_all(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
            .await
            .unwrap();
        for code in [250, 250, 250, 354] {
            c.expect(code).await;
        }
        let t = trickle(w, b"Subject: slow\r\n\r\n".repeat(500), Duration::from_millis(100));
        let r = tokio::time::timeout(Duration::from_secs(8), c.reply()).await;
        let took = started.elapsed();
        t.abort();
        let r = r.unwrap_or_else(|_| {
            panic!("DATA trickle still running after {took:?}: timeouts.session (3s) not applied during DATA")
        });
        assert!(matches!(r, Some((421, _)) | None), "{r:?}");
        assert!(took < Duration::from_millis(6000), "{took:?}");
        assert_eq!(st.mailbox.count(), 0);
        st.assert_served().await;
    })
    .await;
}

#[tokio::test]
async fn half_open_connections() {
    let st = setup("").await;
    bounded(Duration::from_secs(20), "half-open", async {
        // complete commands, then the client shuts its write side: answered, closed
        let mut c = st.connect("plain").await;
        c.send(b"EHLO client.test\r\nNOOP\r\n").await;
        c.s.shutdown().await.unwrap();
        c.expect(250).await;
        c.expect(250).await;
        assert_eq!(c.closed(Duration::from_secs(2)).await, b"");

        // a partial last line is dropped, the complete one answered
        let mut c = st.connect("plain").await;
        c.send(b"NOOP\r\nQUI").await;
        c.s.shutdown().await.unwrap();
        c.expect(250).await;
        assert_eq!(c.closed(Duration::from_secs(2)).await, b"");

        // half-close in the middle of a message: nothing is delivered, no 250
        let before = st.mailbox.count();
        let mut c = st.connect("plain").await;
        c.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
            .await;
        for code in [250, 250, 250, 354] {
            c.expect(code).await;
        }
        c.send(b"Subject: cut\r\n\r\nhalf a mess").await;
        c.s.shutdown().await.unwrap();
        let rest = c.closed(Duration::from_secs(3)).await;
        assert!(
            !rest.starts_with(b"250"),
            "{:?}",
            String::from_utf8_lossy(&rest)
        );
        assert_eq!(st.mailbox.count(), before);

        // shut down before the greeting was even read
        let mut c = SmtpClient::new(st.tcp("plain").await);
        c.s.shutdown().await.unwrap();
        c.expect(220).await;
        assert_eq!(c.closed(Duration::from_secs(2)).await, b"");

        // and on TLS: close_notify after EHLO
        let c = st.connect("mx").await;
        let mut t = c.starttls(&st.ca).await;
        t.send(b"EHLO c\r\n").await;
        t.s.shutdown().await.unwrap();
        t.expect(250).await;
        t.closed(Duration::from_secs(2)).await;
        st.assert_served().await;
    })
    .await;
}

/// Without a pregreet test configured (none exists yet: issue 14), a client
/// talking before the banner gets the banner first, then its commands answered
/// in order, exactly as if it had waited.
#[tokio::test]
async fn early_talkers_get_the_greeting_first() {
    let st = setup("").await;
    bounded(Duration::from_secs(20), "early talker", async {
        for listener in ["plain", "mx"] {
            let mut c = SmtpClient::new(st.tcp(listener).await);
            c.send(b"EHLO early.test\r\nNOOP\r\nQUIT\r\n").await;
            let greeting = c.expect(220).await;
            assert!(greeting.contains("ESMTP"), "{greeting}");
            c.expect(250).await;
            c.expect(250).await;
            c.expect(221).await;
            assert_eq!(c.closed(Duration::from_secs(2)).await, b"");
        }
        // an early STARTTLS: the command is honoured, the rest discarded
        let mut c = SmtpClient::new(st.tcp("mx").await);
        c.send(b"STARTTLS\r\nMAIL FROM:<early@example.org>\r\n")
            .await;
        c.expect(220).await;
        c.expect(220).await;
        let mut t = c.tls(&st.ca).await;
        // the first answer inside TLS is to this NOOP, not to the early MAIL
        t.send(b"NOOP\r\nRCPT TO:<b@example.net>\r\n").await;
        t.expect(250).await;
        t.expect(503).await;
        st.assert_served().await;
    })
    .await;
}

#[derive(serde::Deserialize)]
struct Probes {
    cases: Vec<Probe>,
}

/// The injection probes (see tests/data/smtp-protocol/PROVENANCE.md).
const INJECTION: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/smtp-protocol/starttls-injection.json"
);

#[derive(serde::Deserialize)]
struct Probe {
    id: String,
    protocol: String,
    after: String,
    send: String,
}

/// The STARTTLS injection probes of tests/data/smtp-protocol (SMTP cases): the bytes
/// after STARTTLS in the same write are never answered, in plaintext or inside
/// TLS, and TLS starts with no HELO and no transaction.
#[tokio::test]
async fn starttls_injection_probes() {
    let st = setup("").await;
    bounded(Duration::from_secs(30), "injection probes", async {
        let text =
            std::fs::read_to_string(INJECTION).unwrap_or_else(|e| panic!("{INJECTION}: {e}"));
        let probes: Probes = serde_json::from_str(&text).unwrap();
        let smtp: Vec<&Probe> = probes
            .cases
            .iter()
            .filter(|p| p.protocol == "smtp")
            .collect();
        assert_eq!(smtp.len(), 3, "the SMTP probes changed");
        for p in smtp {
            let mut c = st.connect("mx").await;
            if p.send.starts_with("STARTTLS") {
                // `after` is the plaintext dialogue before the probe
                c.send(p.after.as_bytes()).await;
                c.expect(250).await;
                c.send(p.send.as_bytes()).await;
                c.expect(220).await;
                assert!(
                    c.quiet(Duration::from_millis(200)).await,
                    "{}: injected command answered in plaintext",
                    p.id
                );
                let mut t = c.tls(&st.ca).await;
                // the first reply inside TLS answers this, not the injected command
                t.send(b"RCPT TO:<b@example.org>\r\n").await;
                let r = t.expect(503).await;
                assert!(r.contains("MAIL") || r.contains("EHLO"), "{}: {r}", p.id);
                t.send(b"EHLO client.example\r\n").await;
                assert!(t
                    .expect(250)
                    .await
                    .starts_with("250-gw.test Hello client.example"));
                t.send(b"RCPT TO:<b@example.org>\r\n").await;
                t.expect(503).await;
                assert!(t.quiet(Duration::from_millis(200)).await, "{}", p.id);
            } else {
                // smtp-state-reset-after-tls: EHLO and MAIL in plaintext; STARTTLS
                // inside a transaction is refused, so RSET first
                assert_eq!(p.id, "smtp-state-reset-after-tls");
                c.send(b"EHLO client.example\r\nMAIL FROM:<a@example.net>\r\n")
                    .await;
                c.expect(250).await;
                c.expect(250).await;
                c.send(b"STARTTLS\r\n").await;
                c.expect(503).await;
                c.send(b"RSET\r\nSTARTTLS\r\n").await;
                c.expect(250).await;
                c.expect(220).await;
                let mut t = c.tls(&st.ca).await;
                t.send(p.send.as_bytes()).await;
                t.expect(503).await;
                t.send(b"EHLO client.example\r\n").await;
                t.expect(250).await;
                t.send(p.send.as_bytes()).await;
                t.expect(503).await;
            }
        }
        st.assert_served().await;
    })
    .await;
}

/// The POP3 STLS probes of the same file: one `+OK` in plaintext, the command
/// pipelined after STLS is never answered, and no USER survives the handshake.
#[tokio::test]
async fn pop3_stls_injection_probes() {
    watch_panics();
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = common::dev_cert(dir.path());
    let backend = common::demo_pop3(Arc::new(Mailbox::default())).await;
    let gw = Yaml::new()
        .listener_to("pop3", "pop3", "starttls", "p", "")
        .certs(dir.path())
        .backend("p", &backend, "")
        .start()
        .await;
    bounded(Duration::from_secs(30), "POP3 probes", async {
        let text =
            std::fs::read_to_string(INJECTION).unwrap_or_else(|e| panic!("{INJECTION}: {e}"));
        let probes: Probes = serde_json::from_str(&text).unwrap();
        let pop3: Vec<&Probe> = probes
            .cases
            .iter()
            .filter(|p| p.protocol == "pop3")
            .collect();
        assert_eq!(pop3.len(), 2, "the POP3 probes changed");
        for p in pop3 {
            let tcp = TcpStream::connect(gw.addr("pop3").unwrap()).await.unwrap();
            let mut c = SmtpClient::new(tcp);
            assert!(c.line().await.unwrap().starts_with("+OK"), "{}", p.id);
            c.send(p.send.as_bytes()).await;
            let ok = c.line().await.unwrap();
            assert!(ok.starts_with("+OK"), "{}: {ok}", p.id);
            assert!(
                c.quiet(Duration::from_millis(200)).await,
                "{}: injected command answered in plaintext",
                p.id
            );
            let mut t = c.tls(&ca).await;
            if p.send.contains("USER") {
                // no USER was accepted: PASS is out of sequence
                t.send(b"PASS x\r\n").await;
                let r = t.line().await.unwrap();
                assert!(r.starts_with("-ERR"), "{}: {r}", p.id);
            }
            // the next answer is to this NOOP, not to anything injected
            t.send(b"NOOP\r\n").await;
            assert_eq!(t.line().await.unwrap(), "+OK", "{}", p.id);
            t.send(b"QUIT\r\n").await;
            assert!(t.line().await.unwrap().starts_with("+OK"), "{}", p.id);
            t.closed(Duration::from_secs(2)).await;
        }
    })
    .await;
}

/// Issue 11 item 1: a message whose first line starts with SP or HTAB would
/// continue the last header mailgate prepends (`Received:` here; also
/// `Authentication-Results:` where a policy adds it), letting the client write
/// under our name. Refused with 550 5.6.0 on every listener, nothing relayed;
/// the session goes on.
#[tokio::test]
async fn message_starting_with_whitespace_is_refused() {
    let st = setup("").await;
    bounded(Duration::from_secs(30), "folded first line", async {
        async fn attempt<S: AsyncRead + AsyncWrite + Unpin>(c: &mut SmtpClient<S>, first: &[u8]) {
            c.send(b"EHLO client.test\r\n").await;
            c.expect(250).await;
            c.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n")
                .await;
            c.expect(250).await;
            c.expect(250).await;
            c.expect(354).await;
            let mut m = first.to_vec();
            m.extend_from_slice(b"Subject: forged\r\n\r\nbody\r\n.\r\n");
            c.send(&m).await;
            let t = c.expect(550).await;
            assert!(t.starts_with("550 5.6.0"), "{t}");
            // not a framing problem: the session continues
            send_message(c).await;
        }
        let firsts: [&[u8]; 2] = [
            b" dkim=pass header.d=bank.example\r\n",
            b"\tby bank.example\r\n",
        ];
        for first in firsts {
            let mut c = st.connect("plain").await;
            attempt(&mut c, first).await;
            let c = st.connect("mx").await;
            let mut t = c.starttls(&st.ca).await;
            attempt(&mut t, first).await;
            let mut t = SmtpClient::new(st.tcp("smtps").await).tls(&st.ca).await;
            t.expect(220).await;
            attempt(&mut t, first).await;
        }
        // only the six well-formed follow-up messages arrived
        let all = st.mailbox.all();
        assert_eq!(all.len(), 6);
        assert!(all
            .iter()
            .all(|m| !String::from_utf8_lossy(&m.data).contains("forged")));
    })
    .await;
}

/// Issue 19 item 2: MAIL commands per session are capped (each can cost a
/// backend round trip and SPF's DNS queries); the one past the cap gets 421
/// and the connection is closed.
#[tokio::test]
async fn mail_commands_per_session_are_capped() {
    let st = setup(", max_transactions: 5").await;
    bounded(Duration::from_secs(20), "max_transactions", async {
        let mut c = st.connect("plain").await;
        c.send(b"EHLO client.test\r\n").await;
        c.expect(250).await;
        for i in 0..5 {
            c.send(format!("MAIL FROM:<a{i}@example.org>\r\nRSET\r\n").as_bytes())
                .await;
            c.expect(250).await;
            c.expect(250).await;
        }
        c.send(b"MAIL FROM:<a5@example.org>\r\n").await;
        let t = c.expect(421).await;
        assert!(t.starts_with("421 4.7.0"), "{t}");
        assert_eq!(c.closed(Duration::from_secs(2)).await, b"");
        st.assert_served().await;
    })
    .await;
}
