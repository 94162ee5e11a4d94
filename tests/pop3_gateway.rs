//! POP3 integration tests: the gateway in-process on loopback, in front of a
//! small scripted RFC 1939-only backend (USER/PASS, no CAPA, no AUTH) written
//! here, or the demo maildrop.

mod common;

use common::backend::Seen;
use common::{Gateway, Pop3Client, Running, Tls, Yaml};

use mailgate::conn::sasl::base64_encode;
use mailgate::demo::{Mailbox, StoredMessage};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

// ---------------------------------------------------------------- scripted backend

/// Message 1 of the scripted backend, as it goes on the wire (dot-stuffed).
const MSG1_WIRE: &[u8] = b"Subject: one\r\n\r\n..leading dot\r\n.\xe4 8-bit\r\nlast line\r\n.\r\n";
/// The same message as the client must receive it.
const MSG1: &[u8] = b"Subject: one\r\n\r\n.leading dot\r\n\xe4 8-bit\r\nlast line\r\n";
const TIMESTAMP: &str = "<1896.697170952@scripted.test>";
const APOP_DIGEST: &str = "c4c9334bac560ecc979e58001b3e22fb";

/// A legacy POP3 server that knows only RFC 1939: USER/PASS and APOP for
/// alice/secret, STAT, RETR 1, QUIT. It records connections and every line.
async fn scripted() -> Running {
    common::backend::serve(scripted_session).await
}

async fn scripted_session(tcp: TcpStream, log: Arc<Mutex<Seen>>) {
    let (r, mut w) = tcp.into_split();
    let mut r = tokio::io::BufReader::new(r);
    let _ = w
        .write_all(format!("+OK scripted RFC 1939 server {TIMESTAMP}\r\n").as_bytes())
        .await;
    let mut user = None;
    let mut logged_in = false;
    loop {
        let mut line = String::new();
        use tokio::io::AsyncBufReadExt;
        match r.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = line.trim_end().to_string();
        log.lock().unwrap().lines.push((false, line.clone()));
        let mut words = line.splitn(2, ' ');
        let verb = words.next().unwrap_or("").to_ascii_uppercase();
        let arg = words.next().unwrap_or("");
        let out: Vec<u8> = match (verb.as_str(), logged_in) {
            ("USER", false) => {
                user = Some(arg.to_string());
                b"+OK\r\n".to_vec()
            }
            ("PASS", false) => {
                if user.as_deref() == Some("alice") && arg == "secret" {
                    logged_in = true;
                    b"+OK alice's maildrop has 1 message\r\n".to_vec()
                } else {
                    b"-ERR [AUTH] scripted: invalid password\r\n".to_vec()
                }
            }
            ("APOP", false) => {
                if arg == format!("alice {APOP_DIGEST}") {
                    logged_in = true;
                    b"+OK alice's maildrop has 1 message\r\n".to_vec()
                } else {
                    b"-ERR [AUTH] scripted: APOP failed\r\n".to_vec()
                }
            }
            ("STAT", true) => format!("+OK 1 {}\r\n", MSG1.len()).into_bytes(),
            ("RETR", true) if arg == "1" => {
                let mut v = format!("+OK {} octets\r\n", MSG1.len()).into_bytes();
                v.extend_from_slice(MSG1_WIRE);
                v
            }
            ("QUIT", _) => {
                let _ = w.write_all(b"+OK scripted bye\r\n").await;
                return;
            }
            // CAPA, AUTH, anything else: an RFC 1939 server does not know them
            _ => b"-ERR unknown command\r\n".to_vec(),
        };
        if w.write_all(&out).await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------- setup

struct Setup {
    gw: Gateway,
    ca: PathBuf,
    _dir: tempfile::TempDir,
}

async fn gateway(backend: &str, extra: &str) -> Setup {
    gateway_with(backend, extra, "").await
}

/// Listeners `pop3` (STLS), `pop3s` (implicit TLS) and `apop` (implicit,
/// APOP), each with `extra`, in front of `backend`; `top`: more top-level
/// YAML (e.g. `policies:`).
async fn gateway_with(backend: &str, extra: &str, top: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = common::dev_cert(dir.path());
    let gw = Yaml::new()
        .server("shutdown_grace: 2s")
        .listener("pop3", "pop3", "starttls", extra)
        .listener("pop3s", "pop3", "implicit", extra)
        .listener("apop", "pop3", "implicit", &format!("apop: true{extra}"))
        .certs(dir.path())
        .backend("b", backend, "")
        .section(top)
        .start()
        .await;
    Setup { gw, ca, _dir: dir }
}

impl Setup {
    async fn plain(&self, name: &str) -> Pop3Client<TcpStream> {
        let mut c = Pop3Client::connect(self.gw.addr(name).unwrap()).await;
        let g = c.ok().await;
        assert!(g.starts_with("+OK gw.test POP3"), "{g}");
        c
    }
    async fn tls(&self, name: &str) -> (Pop3Client<Tls>, String) {
        let c = Pop3Client::connect(self.gw.addr(name).unwrap()).await;
        let mut c = c.tls(&self.ca).await;
        let g = c.ok().await;
        (c, g)
    }

    /// Like `tls`, from a given loopback source address.
    async fn tls_from(&self, name: &str, src: &str) -> Pop3Client<Tls> {
        let c = Pop3Client::connect_from(src, self.gw.addr(name).unwrap()).await;
        let mut c = c.tls(&self.ca).await;
        c.ok().await;
        c
    }
}

fn plain_ir(user: &str, pass: &str) -> String {
    base64_encode(format!("\0{user}\0{pass}").as_bytes())
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn auth_plain_is_replayed_as_user_pass() {
    let be = scripted().await;
    let st = gateway(&be.addr, "").await;

    // initial-response form
    let (mut c, _) = st.tls("pop3s").await;
    c.send(format!("AUTH PLAIN {}\r\n", plain_ir("alice", "secret")).as_bytes())
        .await;
    assert_eq!(c.ok().await, "+OK alice's maildrop has 1 message");
    c.send(b"RETR 1\r\n").await;
    c.ok().await;
    assert_eq!(c.body().await, MSG1, "byte-identical retrieval");
    c.send(b"QUIT\r\n").await;
    assert_eq!(c.ok().await, "+OK scripted bye");
    assert!(c.rest(Duration::from_secs(5)).await.1, "closed after QUIT");

    // continuation form, after a cancelled attempt
    let (mut c, _) = st.tls("pop3s").await;
    c.send(b"AUTH PLAIN\r\n").await;
    assert_eq!(c.raw_line().await.unwrap(), b"+ \r\n");
    c.send(b"*\r\n").await;
    c.err().await;
    c.send(b"AUTH PLAIN\r\n").await;
    assert_eq!(c.raw_line().await.unwrap(), b"+ \r\n");
    c.send(format!("{}\r\n", plain_ir("alice", "secret")).as_bytes())
        .await;
    c.ok().await;
    c.send(b"STAT\r\n").await;
    assert_eq!(c.ok().await, format!("+OK 1 {}", MSG1.len()));
    c.send(b"QUIT\r\n").await;
    c.ok().await;

    let lines = be.lines();
    assert!(
        !lines.iter().any(|l| l.starts_with("AUTH")),
        "the backend only knows USER/PASS: {lines:?}"
    );
    assert_eq!(
        lines
            .iter()
            .filter(|l| *l == "USER alice" || *l == "PASS secret")
            .count(),
        4,
        "{lines:?}"
    );
}

#[tokio::test]
async fn stls_injection_is_discarded() {
    let be = scripted().await;
    let st = gateway(&be.addr, "").await;
    let mut c = st.plain("pop3").await;
    // STLS and a command in one write: only STLS may be answered in plaintext
    c.send(b"STLS\r\nCAPA\r\n").await;
    assert_eq!(c.status().await, "+OK Begin TLS negotiation now");
    let (rest, closed) = c.rest(Duration::from_millis(500)).await;
    assert!(!closed && rest.is_empty(), "plaintext after +OK: {rest:?}");
    let mut t = c.tls(&st.ca).await;
    // the first answer inside TLS is to our NOOP, not to the injected CAPA
    t.send(b"NOOP\r\n").await;
    assert_eq!(t.status().await, "+OK");
    t.send(b"CAPA\r\n").await;
    t.ok().await;
    let caps = String::from_utf8(t.body().await).unwrap();
    assert!(
        caps.contains("USER\r\n") && caps.contains("SASL PLAIN\r\n"),
        "{caps}"
    );
    assert!(!caps.contains("STLS"), "{caps}");
    // an RFC 1939-only backend: nothing it lacks is advertised
    for absent in ["TOP", "UIDL", "PIPELINING", "RESP-CODES"] {
        assert!(!caps.contains(absent), "{caps}");
    }
    t.send(b"STLS\r\n").await;
    t.err().await;
    t.send(b"USER alice\r\nPASS secret\r\nQUIT\r\n").await;
    t.ok().await;
    t.ok().await;
    assert_eq!(t.ok().await, "+OK scripted bye");
}

#[tokio::test]
async fn login_before_tls_is_refused_and_never_reaches_the_backend() {
    let be = scripted().await;
    let st = gateway(&be.addr, "").await;
    let mut c = st.plain("pop3").await;
    c.send(b"CAPA\r\n").await;
    c.ok().await;
    let caps = String::from_utf8(c.body().await).unwrap();
    assert!(caps.contains("STLS"), "{caps}");
    assert!(!caps.contains("USER") && !caps.contains("SASL"), "{caps}");
    for cmd in [
        "USER alice".to_string(),
        "PASS secret".to_string(),
        format!("AUTH PLAIN {}", plain_ir("alice", "secret")),
        format!("APOP alice {APOP_DIGEST}"),
    ] {
        c.send(format!("{cmd}\r\n").as_bytes()).await;
        let r = c.err().await;
        assert!(r.starts_with("-ERR [AUTH]"), "{cmd}: {r}");
    }
    c.send(b"QUIT\r\n").await;
    c.ok().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        be.connections(),
        0,
        "the backend must not even be connected to"
    );
}

#[tokio::test]
async fn wrong_password_gets_the_backends_error_and_closes_after_n() {
    let be = scripted().await;
    let st = gateway(
        &be.addr,
        ", max_login_failures: 2, login_failure_delay: 300ms",
    )
    .await;
    let (mut c, _) = st.tls("pop3s").await;
    for i in 0..2 {
        c.send(b"USER alice\r\n").await;
        c.ok().await;
        let t = Instant::now();
        c.send(b"PASS wrong\r\n").await;
        assert_eq!(c.status().await, "-ERR [AUTH] scripted: invalid password");
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "failure delay: {:?}",
            t.elapsed()
        );
        if i == 0 {
            // still usable after one failure
            c.send(b"NOOP\r\n").await;
            c.ok().await;
        }
    }
    let (rest, closed) = c.rest(Duration::from_secs(5)).await;
    assert!(closed, "closed after the second failure (got {rest:?})");
    assert!(!be.lines().iter().any(|l| l == "PASS secret"));
}

#[tokio::test]
async fn backend_down_is_sys_temp() {
    let port = common::free_port();
    let st = gateway(&format!("127.0.0.1:{port}"), "").await;
    let (mut c, _) = st.tls("pop3s").await;
    c.send(b"USER alice\r\nPASS secret\r\n").await;
    c.ok().await;
    let r = c.err().await;
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
    // CAPA still answers, conservatively
    c.send(b"CAPA\r\n").await;
    c.ok().await;
    let caps = String::from_utf8(c.body().await).unwrap();
    assert_eq!(caps, "USER\r\nSASL PLAIN\r\n");
    c.send(b"QUIT\r\n").await;
    c.ok().await;
}

#[tokio::test]
async fn pipelined_login_and_commands_reach_the_backend_in_order() {
    let be = scripted().await;
    let st = gateway(&be.addr, "").await;
    let (mut c, _) = st.tls("pop3s").await;
    c.send(b"USER alice\r\nPASS secret\r\nSTAT\r\nRETR 1\r\nQUIT\r\n")
        .await;
    c.ok().await; // USER
    c.ok().await; // PASS (the backend's)
    assert_eq!(c.ok().await, format!("+OK 1 {}", MSG1.len()));
    c.ok().await;
    assert_eq!(c.body().await, MSG1);
    assert_eq!(c.ok().await, "+OK scripted bye");
    assert!(c.rest(Duration::from_secs(5)).await.1);
}

#[tokio::test]
async fn apop_carries_the_backends_timestamp() {
    let be = scripted().await;
    let st = gateway(&be.addr, "").await;
    let (mut c, greeting) = st.tls("apop").await;
    assert!(greeting.ends_with(TIMESTAMP), "{greeting}");
    c.send(format!("APOP alice {APOP_DIGEST}\r\n").as_bytes())
        .await;
    c.ok().await;
    c.send(b"QUIT\r\n").await;
    c.ok().await;
    // other listeners have no timestamp and refuse APOP
    let (mut c, greeting) = st.tls("pop3s").await;
    assert!(!greeting.contains('<'), "{greeting}");
    c.send(format!("APOP alice {APOP_DIGEST}\r\n").as_bytes())
        .await;
    c.err().await;
}

#[tokio::test]
async fn garbage_and_overlong_lines_end_the_session() {
    let be = scripted().await;
    let st = gateway(&be.addr, ", max_errors: 3").await;
    let (mut c, _) = st.tls("pop3s").await;
    c.send(&[b'x'; 2000]).await;
    c.send(b"\r\n").await;
    assert_eq!(c.status().await, "-ERR Line too long");
    c.send(b"\x01\x02\xff\r\n").await;
    c.err().await;
    c.send(b"HELO there\r\n").await;
    assert_eq!(c.status().await, "-ERR Too many errors, closing connection");
    assert!(c.rest(Duration::from_secs(5)).await.1);
}

#[tokio::test]
async fn timeouts_end_the_session_with_err() {
    let be = scripted().await;
    let st = gateway(&be.addr, ", timeouts: { command: 1s, idle: 1s }").await;
    // AUTHORIZATION state: the command timeout
    let (mut c, _) = st.tls("pop3s").await;
    let (rest, closed) = c.rest(Duration::from_secs(5)).await;
    assert!(
        closed && rest == "-ERR Disconnected for inactivity\r\n",
        "{rest:?}"
    );
    // TRANSACTION state (the pipe): the idle timeout
    let (mut c, _) = st.tls("pop3s").await;
    c.send(b"USER alice\r\nPASS secret\r\n").await;
    c.ok().await;
    c.ok().await;
    let t = Instant::now();
    let (rest, closed) = c.rest(Duration::from_secs(5)).await;
    assert!(
        closed && rest == "-ERR Disconnected for inactivity\r\n",
        "{rest:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(4));
}

#[tokio::test]
async fn shutdown_tells_sessions_in_authorization_state() {
    let be = scripted().await;
    let st = gateway(&be.addr, "").await;
    let (mut c, _) = st.tls("pop3s").await;
    c.send(b"NOOP\r\n").await;
    c.ok().await;
    let left = st.gw.shutdown().await;
    assert_eq!(left, 0);
    let (rest, closed) = c.rest(Duration::from_secs(5)).await;
    assert!(
        closed && rest.starts_with("-ERR [SYS/TEMP] shutting down"),
        "{rest:?}"
    );
}

#[tokio::test]
async fn demo_maildrop_through_the_gateway() {
    let mailbox = Arc::new(Mailbox::default());
    let messages: Vec<&[u8]> = vec![
        b"From: a@example.org\r\nSubject: first\r\n\r\nbody\r\n.\r\n..two dots\r\n",
        b"Subject: second\r\n\r\n\xc3\xa4 8-bit line\r\nno final newline",
    ];
    for m in &messages {
        mailbox.messages.lock().unwrap().push(StoredMessage {
            from: "a@example.org".into(),
            rcpts: vec!["demo@example.net".into()],
            data: m.to_vec(),
        });
    }
    let addr = common::demo_pop3(mailbox.clone()).await;
    let st = gateway(&addr, "").await;

    let (mut c, _) = st.tls("pop3s").await;
    // the first CAPA where login is allowed probes the backend once
    c.send(b"CAPA\r\n").await;
    c.ok().await;
    let caps = String::from_utf8(c.body().await).unwrap();
    assert_eq!(
        caps,
        "USER\r\nSASL PLAIN\r\nTOP\r\nUIDL\r\nPIPELINING\r\nRESP-CODES\r\n"
    );
    c.send(b"USER demo\r\nPASS anything\r\nUIDL\r\n").await;
    c.ok().await;
    c.ok().await;
    c.ok().await;
    let uidl = c.body().await;
    assert_eq!(uidl.split(|b| *b == b'\n').count(), 3, "{uidl:?}");
    let mut retrieved = Vec::new();
    for i in 1..=messages.len() {
        c.send(format!("RETR {i}\r\n").as_bytes()).await;
        c.ok().await;
        retrieved.push(c.body().await);
    }
    assert_eq!(retrieved[0], messages[0]);
    assert_eq!(retrieved[1], [messages[1], b"\r\n"].concat());
    c.send(b"TOP 1 0\r\n").await;
    c.ok().await;
    assert_eq!(
        c.body().await,
        b"From: a@example.org\r\nSubject: first\r\n\r\n"
    );
    c.send(b"DELE 1\r\nQUIT\r\n").await;
    c.ok().await;
    c.ok().await;
    assert!(c.rest(Duration::from_secs(5)).await.1);
    assert_eq!(mailbox.count(), 1);
}

#[tokio::test]
async fn policy_locks_out_guessing_before_the_backend() {
    let be = scripted().await;
    let top = "policies:\n  mailbox:\n    limits:\n      - { name: auth-ip, key: [ip], auth_failures: 2/15minutes, action: reject }";
    let st = gateway_with(
        &be.addr,
        ", policy: mailbox, max_login_failures: 5, login_failure_delay: 10ms",
        top,
    )
    .await;
    let (mut c, _) = st.tls("pop3s").await;
    for _ in 0..2 {
        c.send(b"USER alice\r\nPASS wrong\r\n").await;
        c.ok().await;
        assert_eq!(c.status().await, "-ERR [AUTH] scripted: invalid password");
    }
    // locked: even the right password is refused, and never reaches the backend
    c.send(b"USER alice\r\nPASS secret\r\n").await;
    c.ok().await;
    assert_eq!(c.status().await, "-ERR [AUTH] Authentication failed");
    assert!(!be.lines().iter().any(|l| l == "PASS secret"));
    assert_eq!(
        be.lines().iter().filter(|l| l.starts_with("PASS")).count(),
        2
    );
}

/// Policy acceptance 3, POP3 side: failures lock the guessing IP and the user,
/// but the user still gets in from a network where she logged in before.
#[tokio::test]
async fn per_user_lock_spares_known_good_networks() {
    let be = scripted().await;
    let top = "policies:\n  mailbox:\n    limits:\n      - { name: auth-ip, key: [ip], auth_failures: 5/15minutes, action: reject }\n      - { name: auth-user, key: [auth_user], auth_failures: 5/15minutes, action: tempfail }";
    let st = gateway_with(
        &be.addr,
        ", policy: mailbox, max_login_failures: 10, login_failure_delay: 10ms",
        top,
    )
    .await;
    // alice's usual network
    let mut home = st.tls_from("pop3s", "127.0.0.20").await;
    home.send(b"USER alice\r\nPASS secret\r\n").await;
    home.ok().await;
    assert!(home.status().await.starts_with("+OK"));
    drop(home);
    // five wrong passwords from elsewhere
    let mut evil = st.tls_from("pop3s", "127.0.2.66").await;
    for _ in 0..5 {
        evil.send(b"USER alice\r\nPASS wrong\r\n").await;
        evil.ok().await;
        assert!(evil.status().await.starts_with("-ERR"));
    }
    evil.send(b"USER alice\r\nPASS secret\r\n").await;
    evil.ok().await;
    assert!(
        evil.status().await.starts_with("-ERR"),
        "the guessing IP is locked"
    );
    // a fresh network: the per-user lock applies
    let mut fresh = st.tls_from("pop3s", "127.0.1.77").await;
    fresh.send(b"USER alice\r\nPASS secret\r\n").await;
    fresh.ok().await;
    assert!(
        fresh.status().await.starts_with("-ERR"),
        "per-user lock from a new network"
    );
    // her known-good network still gets in
    let mut home = st.tls_from("pop3s", "127.0.0.20").await;
    home.send(b"USER alice\r\nPASS secret\r\n").await;
    home.ok().await;
    let r = home.status().await;
    assert!(r.starts_with("+OK"), "known-good network: {r}");
}

// ---------------------------------------------------------------- hardening (issues 11, 19)

/// How a [`odd_backend`] misbehaves.
#[derive(Clone, Copy, PartialEq)]
enum Odd {
    /// Behaves: CAPA with USER, UIDL and PIPELINING (no TOP).
    Normal,
    /// Writes a stray `+OK` right after its CAPA answer.
    StrayOk,
    /// After a failed login, says `-ERR Disconnected for inactivity` and closes.
    IdleDisconnect,
    /// Answers a good PASS with `+OK logged in` and one more `+OK`.
    ExtraAfterPass,
}

/// A CAPA-capable backend (alice/secret) with one scripted misbehaviour; it
/// records every line it receives, byte for byte (lossy UTF-8, CRLF cut).
async fn odd_backend(kind: Odd) -> Running {
    common::backend::serve(move |tcp, log| odd_session(tcp, kind, log)).await
}

async fn odd_session(tcp: TcpStream, kind: Odd, log: Arc<Mutex<Seen>>) {
    use tokio::io::AsyncBufReadExt;
    let (r, mut w) = tcp.into_split();
    let mut r = tokio::io::BufReader::new(r);
    let _ = w.write_all(b"+OK odd server ready\r\n").await;
    let (mut user, mut logged_in) = (None, false);
    loop {
        let mut raw = Vec::new();
        match r.read_until(b'\n', &mut raw).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&raw)
            .trim_end_matches("\r\n")
            .to_string();
        log.lock().unwrap().lines.push((false, line.clone()));
        let mut words = line.splitn(2, ' ');
        let verb = words.next().unwrap_or("").to_ascii_uppercase();
        let arg = words.next().unwrap_or("").to_string();
        let out: Vec<u8> = match (verb.as_str(), logged_in) {
            ("CAPA", _) => {
                let mut v = b"+OK\r\nUSER\r\nUIDL\r\nPIPELINING\r\n.\r\n".to_vec();
                if kind == Odd::StrayOk {
                    v.extend_from_slice(b"+OK\r\n");
                }
                v
            }
            ("USER", false) => {
                user = Some(arg);
                b"+OK\r\n".to_vec()
            }
            ("PASS", false) if user.as_deref() == Some("alice") && arg == "secret" => {
                logged_in = true;
                if kind == Odd::ExtraAfterPass {
                    b"+OK logged in\r\n+OK\r\n".to_vec()
                } else {
                    b"+OK logged in\r\n".to_vec()
                }
            }
            ("PASS", false) => {
                let _ = w.write_all(b"-ERR [AUTH] odd: wrong password\r\n").await;
                if kind == Odd::IdleDisconnect {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let _ = w.write_all(b"-ERR Disconnected for inactivity\r\n").await;
                    return;
                }
                continue;
            }
            ("STAT", true) => b"+OK 1 10\r\n".to_vec(),
            ("UIDL", true) => b"+OK\r\n1 uid-one\r\n.\r\n".to_vec(),
            ("QUIT", _) => {
                let _ = w.write_all(b"+OK odd bye\r\n").await;
                return;
            }
            _ => b"-ERR odd: unknown command\r\n".to_vec(),
        };
        if w.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// What the backend received after the login (everything after `PASS secret`).
fn after_login(lines: &[String]) -> Vec<String> {
    let at = lines
        .iter()
        .position(|l| l == "PASS secret")
        .expect("logged in");
    lines[at + 1..].to_vec()
}

/// Issue 11 item 6: after login nothing unparsed reaches the backend.
#[tokio::test]
async fn transaction_state_answers_login_commands_and_bad_lines_locally() {
    let be = scripted().await;
    let st = gateway(&be.addr, ", max_errors: 30").await;
    let (mut c, _) = st.tls("pop3s").await;
    c.send(b"USER alice\r\nPASS secret\r\n").await;
    c.ok().await;
    c.ok().await;
    let long = format!("RETR {}\r\n", "1".repeat(5000));
    let refused: Vec<&[u8]> = vec![
        b"USER bob\r\n",
        b"PASS guess\r\n",
        b"APOP bob c4c9334bac560ecc979e58001b3e22fb\r\n",
        b"AUTH PLAIN AGJvYgBndWVzcw==\r\n",
        b"STLS\r\n",
        b"STAT\0\r\n",
        b"\0\r\n",
        b"STAT\rRETR 1\r\n",
        b"STAT\n",
        long.as_bytes(),
        b"RETR\r\n",
        b"RETR -1\r\n",
        b"RETR +1\r\n",
        b"RETR 1 2\r\n",
        b"RETR 4294967296\r\n",
        b"DELE x\r\n",
        b"LIST 1 2\r\n",
        b"TOP 1\r\n",
        b"STAT now\r\n",
        b"XTND XMIT\r\n",
    ];
    for cmd in &refused {
        c.send(cmd).await;
        let r = c.err().await;
        assert!(
            !r.contains("scripted"),
            "{:?} answered by the backend: {r}",
            String::from_utf8_lossy(cmd)
        );
    }
    // well-formed commands still flow, re-rendered
    c.send(b"stat\r\n").await;
    assert_eq!(c.ok().await, format!("+OK 1 {}", MSG1.len()));
    c.send(b"retr 01\r\n").await;
    c.ok().await;
    assert_eq!(c.body().await, MSG1, "byte-identical retrieval");
    c.send(b"QUIT\r\n").await;
    assert_eq!(c.ok().await, "+OK scripted bye");
    assert!(c.rest(Duration::from_secs(5)).await.1);
    let lines = after_login(&be.lines());
    assert_eq!(
        lines,
        ["STAT", "RETR 1", "QUIT"],
        "the backend saw {lines:?}"
    );
}

/// Pipelined commands mixing forwarded and locally answered ones: every
/// reply comes in command order, the backend's bytes untouched.
#[tokio::test]
async fn transaction_pipelining_keeps_reply_order() {
    let be = scripted().await;
    let st = gateway(&be.addr, "").await;
    let (mut c, _) = st.tls("pop3s").await;
    c.send(b"USER alice\r\nPASS secret\r\nSTAT\r\nUSER bob\r\nRETR 1\r\nCAPA\r\nRETR 1\r\nPASS x\r\nSTAT\r\nQUIT\r\n")
        .await;
    c.ok().await;
    c.ok().await;
    assert_eq!(c.ok().await, format!("+OK 1 {}", MSG1.len()));
    c.err().await;
    c.ok().await;
    assert_eq!(c.body().await, MSG1);
    c.ok().await;
    let caps = String::from_utf8(c.body().await).unwrap();
    assert!(!caps.contains("USER") && !caps.contains("SASL"), "{caps}");
    c.ok().await;
    assert_eq!(c.body().await, MSG1);
    c.err().await;
    assert_eq!(c.ok().await, format!("+OK 1 {}", MSG1.len()));
    assert_eq!(c.ok().await, "+OK scripted bye");
    assert!(c.rest(Duration::from_secs(5)).await.1);
    assert_eq!(
        after_login(&be.lines()),
        ["STAT", "RETR 1", "RETR 1", "STAT", "QUIT"]
    );
}

#[tokio::test]
async fn transaction_errors_close_the_session() {
    let be = scripted().await;
    let st = gateway(&be.addr, ", max_errors: 3").await;
    let (mut c, _) = st.tls("pop3s").await;
    c.send(b"USER alice\r\nPASS secret\r\n").await;
    c.ok().await;
    c.ok().await;
    c.send(b"USER a\r\nUSER b\r\nUSER c\r\nUSER d\r\n").await;
    c.err().await;
    c.err().await;
    assert_eq!(c.status().await, "-ERR Too many errors, closing connection");
    assert!(c.rest(Duration::from_secs(5)).await.1);
    assert!(after_login(&be.lines()).is_empty(), "{:?}", be.lines());
}

/// TOP and UIDL only where the backend announced them; CAPA in the
/// TRANSACTION state is mailgate's own.
#[tokio::test]
async fn transaction_commands_follow_the_backends_caps() {
    let be = odd_backend(Odd::Normal).await;
    let st = gateway(&be.addr, "").await;
    let (mut c, _) = st.tls("pop3s").await;
    c.send(b"USER alice\r\nPASS secret\r\n").await;
    c.ok().await;
    assert_eq!(c.ok().await, "+OK logged in");
    c.send(b"TOP 1 0\r\n").await;
    let r = c.err().await;
    assert!(!r.contains("odd"), "{r}");
    c.send(b"UIDL\r\n").await;
    c.ok().await;
    assert_eq!(c.body().await, b"1 uid-one\r\n");
    c.send(b"CAPA\r\n").await;
    c.ok().await;
    let caps = String::from_utf8(c.body().await).unwrap();
    assert_eq!(caps, "UIDL\r\nPIPELINING\r\n");
    c.send(b"QUIT\r\n").await;
    c.ok().await;
    assert_eq!(after_login(&be.lines()), ["UIDL", "QUIT"]);
}

/// Issue 19 item 4: a stray `+OK` after CAPA must not pass for the PASS reply.
#[tokio::test]
async fn stray_ok_after_capa_is_not_a_login() {
    let be = odd_backend(Odd::StrayOk).await;
    let st = gateway(&be.addr, ", max_login_failures: 1").await;
    let (mut c, _) = st.tls("pop3s").await;
    c.send(b"USER alice\r\nPASS wrong\r\n").await;
    c.ok().await;
    let r = c.status().await;
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
    // a temporary error, not a failed login: the session stays open
    c.send(b"NOOP\r\n").await;
    assert_eq!(c.status().await, "+OK");
    assert!(
        !be.lines().iter().any(|l| l.starts_with("PASS")),
        "{:?}",
        be.lines()
    );
}

/// Issue 19 item 4: bytes buffered behind the `+OK` to PASS mean the
/// conversation is out of step (that `+OK` may have been USER's real reply):
/// temporary, never a login.
#[tokio::test]
async fn extra_reply_after_pass_is_not_a_login() {
    let be = odd_backend(Odd::ExtraAfterPass).await;
    let st = gateway(&be.addr, ", max_login_failures: 1").await;
    let (mut c, _) = st.tls("pop3s").await;
    c.send(b"USER alice\r\nPASS secret\r\n").await;
    c.ok().await;
    let r = c.status().await;
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
    // not a failed login either: the session stays open
    c.send(b"NOOP\r\n").await;
    assert_eq!(c.status().await, "+OK");
}

/// Issue 19 item 4: an idle backend's parting `-ERR` is not a login result.
#[tokio::test]
async fn idle_backend_disconnect_is_not_a_failed_login() {
    let be = odd_backend(Odd::IdleDisconnect).await;
    let st = gateway(
        &be.addr,
        ", max_login_failures: 2, login_failure_delay: 10ms",
    )
    .await;
    let (mut c, _) = st.tls("pop3s").await;
    c.send(b"USER alice\r\nPASS wrong\r\n").await;
    c.ok().await;
    assert_eq!(c.status().await, "-ERR [AUTH] odd: wrong password");
    // the backend gives up on the connection meanwhile
    tokio::time::sleep(Duration::from_millis(600)).await;
    c.send(b"USER alice\r\nPASS secret\r\n").await;
    c.ok().await;
    assert_eq!(c.status().await, "+OK logged in");
    assert_eq!(be.connections(), 2);
}

/// Issue 19 item 5: user names with whitespace or controls never leave mailgate.
#[tokio::test]
async fn user_names_with_spaces_are_refused_locally() {
    let be = scripted().await;
    let st = gateway(&be.addr, ", max_errors: 20").await;
    let (mut c, _) = st.tls("pop3s").await;
    let bad_plain = [
        plain_ir("alice x1", "secret"),
        plain_ir("alice\u{a0}", "secret"),
        base64_encode(b"admin x\0alice\0secret"),
        base64_encode(b"\0ali\tce\0secret"),
    ];
    let mut cmds: Vec<String> = vec![
        "USER alice STAT".into(),
        "USER alice\tx".into(),
        "USER alice\u{1b}[0m".into(),
        format!("APOP alice\u{7f} {APOP_DIGEST}"),
    ];
    cmds.extend(bad_plain.iter().map(|ir| format!("AUTH PLAIN {ir}")));
    for cmd in &cmds {
        c.send(format!("{cmd}\r\n").as_bytes()).await;
        let r = c.err().await;
        assert!(!r.contains("scripted"), "{cmd:?}: {r}");
        // a PASS after a refused USER has no user to go with
        c.send(b"PASS secret\r\n").await;
        c.err().await;
    }
    assert_eq!(
        be.connections(),
        0,
        "nothing reached the backend: {:?}",
        be.lines()
    );
}

/// Issue 19 item 5: RFC 2449's 255 octets per command line also before login.
#[tokio::test]
async fn overlong_authorization_lines_are_refused() {
    let be = scripted().await;
    let st = gateway(&be.addr, "").await;
    let (mut c, _) = st.tls("pop3s").await;
    // 5 + 249 + 2 = 256 octets: one too many
    let name = "a".repeat(249);
    c.send(format!("USER {name}\r\n").as_bytes()).await;
    assert_eq!(c.status().await, "-ERR Line too long");
    c.send(b"PASS secret\r\n").await;
    c.err().await;
    // 255 octets exactly are fine
    let name = "a".repeat(248);
    c.send(format!("USER {name}\r\n").as_bytes()).await;
    c.ok().await;
    // a SASL response line may be longer (RFC 5034 §4), up to max_command_line
    c.send(b"AUTH PLAIN\r\n").await;
    assert_eq!(c.raw_line().await.unwrap(), b"+ \r\n");
    let ir = plain_ir(&"b".repeat(150), &"p".repeat(150));
    assert!(ir.len() > 255);
    c.send(format!("{ir}\r\n").as_bytes()).await;
    assert_eq!(c.status().await, "-ERR [AUTH] scripted: invalid password");
    assert!(!be.lines().iter().any(|l| l.starts_with("USER aaa")));
}

/// An APOP listener of its own (the cap is counted per listener name in the
/// process) with `apop_prelogin_timeout: 1s`.
struct ApopListener {
    gw: Gateway,
    name: &'static str,
    ca: PathBuf,
    _dir: tempfile::TempDir,
}

impl ApopListener {
    async fn start(name: &'static str, backend: &str, max_pending: usize) -> ApopListener {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = common::dev_cert(dir.path());
        let gw = Yaml::new()
            .listener(
                name,
                "pop3",
                "implicit",
                &format!("apop: true, apop_max_pending: {max_pending}, apop_prelogin_timeout: 1s"),
            )
            .certs(dir.path())
            .backend("b", backend, "")
            .start()
            .await;
        ApopListener {
            gw,
            name,
            ca,
            _dir: dir,
        }
    }

    /// A client over TLS and the greeting it got.
    async fn connect(&self) -> (Pop3Client<Tls>, String) {
        let s = TcpStream::connect(self.gw.addr(self.name).unwrap())
            .await
            .unwrap();
        let mut c = Pop3Client::new(s).tls(&self.ca).await;
        let greeting = c.status().await;
        (c, greeting)
    }
}

/// Issue 19 item 9: silent connections to an APOP listener hold only a
/// bounded number of backend sessions, and only briefly.
#[tokio::test]
async fn apop_early_backend_connections_are_bounded() {
    let be = scripted().await;
    let l = ApopListener::start("apop-bounded", &be.addr, 2).await;
    let connect = || l.connect();
    let (mut a, ga) = connect().await;
    let (_b, gb) = connect().await;
    assert!(
        ga.ends_with(TIMESTAMP) && gb.ends_with(TIMESTAMP),
        "{ga} {gb}"
    );
    let (mut c, gc) = connect().await;
    assert!(gc.starts_with("-ERR [SYS/TEMP]"), "{gc}");
    assert!(c.rest(Duration::from_secs(5)).await.1, "closed");
    assert_eq!(be.connections(), 2);
    // the silent ones are closed after the pre-login deadline ...
    let t = Instant::now();
    let (rest, closed) = a.rest(Duration::from_secs(5)).await;
    assert!(closed && rest.starts_with("-ERR"), "{rest:?}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ... which frees their slots
    let (mut d, gd) = connect().await;
    assert!(gd.ends_with(TIMESTAMP), "{gd}");
    d.send(format!("APOP alice {APOP_DIGEST}\r\n").as_bytes())
        .await;
    d.ok().await;
    // logged in: the pre-login deadline no longer applies
    tokio::time::sleep(Duration::from_millis(1500)).await;
    d.send(b"STAT\r\n").await;
    d.ok().await;
}

/// Issue 19 item 9: the pre-login deadline of an APOP session is absolute
/// (greeting + `apop_prelogin_timeout`): free NOOPs every few hundred ms do
/// not keep the early backend connection, and its slot, for the session.
#[tokio::test]
async fn apop_prelogin_deadline_is_absolute() {
    let be = scripted().await;
    let l = ApopListener::start("apop-absolute", &be.addr, 1).await;
    let connect = || l.connect();
    let (mut a, ga) = connect().await;
    assert!(ga.ends_with(TIMESTAMP), "{ga}");
    let t = Instant::now();
    let last = loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        a.send(b"NOOP\r\n").await;
        let r = a.status().await;
        if !r.starts_with("+OK") || t.elapsed() > Duration::from_secs(4) {
            break r;
        }
    };
    assert!(last.starts_with("-ERR"), "{last}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(a.rest(Duration::from_secs(5)).await.1, "closed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // the slot is free again
    let (_b, gb) = connect().await;
    assert!(gb.ends_with(TIMESTAMP), "{gb}");
}

/// A POP3 backend behind `identity: [proxy_v2]` gets a PROXY v2 header
/// naming the client first on every connection: the login's and the APOP
/// listener's early one (made before the greeting).
#[tokio::test]
async fn proxy_v2_backend_is_told_the_client() {
    let be = common::Pop3Backend::new()
        .capa(&["USER"])
        .proxy()
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = common::dev_cert(dir.path());
    let gw = Yaml::new()
        .listener("pop3s", "pop3", "implicit", "")
        .listener("apop", "pop3", "implicit", "apop: true")
        .certs(dir.path())
        .backend("b", &be.addr, "identity: [proxy_v2, received]")
        .start()
        .await;
    let header = |s: &TcpStream, listener: &str| {
        let to = gw.addr(listener).unwrap();
        mailgate::transport::proxy_v2_header(s.local_addr().unwrap(), to).unwrap()
    };
    for (src, listener) in [("127.0.0.7", "pop3s"), ("127.0.0.8", "apop")] {
        let s = common::connect_from(src, gw.addr(listener).unwrap()).await;
        let expected = header(&s, listener);
        let mut c = Pop3Client::new(s).tls(&ca).await;
        c.ok().await;
        assert!(c.cmd("USER alice").await.starts_with("+OK"));
        let r = c.cmd("PASS secret").await;
        assert!(r.starts_with("+OK"), "{listener}: {r}");
        let seen = be.seen.lock().unwrap();
        assert!(
            seen.proxy.contains(&expected),
            "{listener}: the backend is told {src}: {:?}",
            seen.proxy
        );
        assert!(
            seen.raw.starts_with(&seen.proxy[0]),
            "the header comes first"
        );
    }
    assert_eq!(be.connections(), 2, "one backend connection per session");
}
