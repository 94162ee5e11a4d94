//! Shutdown after login: the gateway in-process on loopback, POP3 and IMAP
//! clients past their login (the relays of `pop3/pipe.rs`, `imap/relay.rs`)
//! in front of the scripted backends of `tests/common/backend.rs`.
//!
//! A session with nothing outstanding ends at once (IMAP `* BYE
//! [UNAVAILABLE]`, also in IDLE; POP3 `-ERR [SYS/TEMP]` and no QUIT to the
//! backend); a busy one finishes the command in progress — a RETR streams
//! to its end, byte-exact — and then ends the same way. The grace is long
//! here, so that a session left to it would be seen.

mod common;

use common::{Gateway, ImapBackend, Pop3Backend, Pop3Client, Running, Tls, Yaml};

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// Far longer than any session here may take to end.
const GRACE: &str = "shutdown_grace: 20s";
/// What "at once" means: well within the grace.
const PROMPT: Duration = Duration::from_secs(3);

struct Setup {
    gw: Arc<Gateway>,
    ca: PathBuf,
    _dir: tempfile::TempDir,
}

/// An implicit-TLS listener `l` of `protocol` in front of `backend`.
async fn gateway(protocol: &str, backend: &Running) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = common::dev_cert(dir.path());
    let gw = Yaml::new()
        .server(GRACE)
        .listener("l", protocol, "implicit", "")
        .certs(dir.path())
        .backend("b", &backend.addr, "")
        .start()
        .await;
    Setup {
        gw: Arc::new(gw),
        ca,
        _dir: dir,
    }
}

impl Setup {
    async fn client(&self) -> Pop3Client<Tls> {
        let c = Pop3Client::connect(self.gw.addr("l").unwrap()).await;
        c.tls(&self.ca).await
    }
}

/// Shuts the gateway down on its own task; the sessions left at the end of
/// the grace, and how long it took.
fn shut_down(st: &Setup) -> tokio::task::JoinHandle<(usize, Duration)> {
    let gw = st.gw.clone();
    tokio::spawn(async move {
        let t = Instant::now();
        let left = gw.shutdown().await;
        (left, t.elapsed())
    })
}

/// The client's last words from the gateway are `want`, then the close,
/// and the shutdown that began at `t` is over, soon, with no session left.
async fn ends_with(
    c: &mut Pop3Client<Tls>,
    want: &str,
    t: Instant,
    down: tokio::task::JoinHandle<(usize, Duration)>,
) {
    let (rest, closed) = c.rest(PROMPT).await;
    assert!(closed, "still open after {:?}: {rest:?}", t.elapsed());
    assert_eq!(rest, want);
    assert!(t.elapsed() < PROMPT, "{:?}", t.elapsed());
    let (left, took) = down.await.unwrap();
    assert_eq!(left, 0);
    assert!(took < PROMPT, "{took:?}");
}

const POP3_BYE: &str = "-ERR [SYS/TEMP] shutting down, try again later\r\n";

async fn pop3_logged_in(st: &Setup) -> Pop3Client<Tls> {
    let mut c = st.client().await;
    c.ok().await;
    assert!(c.cmd("USER alice").await.starts_with("+OK"));
    assert!(c.cmd("PASS secret").await.starts_with("+OK"));
    c
}

/// An IMAP client in IDLE (the backend's `+` relayed, no DONE sent) gets
/// the BYE and the close at once; `shutdown()` returns with no session left.
#[tokio::test]
async fn imap_idle_session_gets_bye_at_once() {
    let be = ImapBackend::new()
        .caps("IMAP4rev1 IDLE")
        .on("IDLE", "+ idling\r\n")
        .start()
        .await;
    let st = gateway("imap", &be).await;
    let mut c = st.client().await;
    assert!(c.status().await.starts_with("* OK"));
    c.send(b"a LOGIN alice secret\r\nb SELECT INBOX\r\n").await;
    assert!(c.status().await.starts_with("a OK"));
    while !c.status().await.starts_with("b OK") {}
    c.send(b"c IDLE\r\n").await;
    assert_eq!(c.status().await, "+ idling");
    let t = Instant::now();
    let down = shut_down(&st);
    let bye = "* BYE [UNAVAILABLE] Server shutting down, try again later\r\n";
    ends_with(&mut c, bye, t, down).await;
    // the IDLE was never ended at the backend, nor anything sent after it
    assert_eq!(be.lines().last().map(String::as_str), Some("c IDLE"));
}

/// A POP3 client logged in and idle is closed at once with `-ERR
/// [SYS/TEMP]`, and the backend sees no QUIT (no UPDATE state: a DELE
/// would not be carried out).
#[tokio::test]
async fn pop3_idle_session_is_closed_without_quit() {
    let be = Pop3Backend::new().start().await;
    let st = gateway("pop3", &be).await;
    let mut c = pop3_logged_in(&st).await;
    assert!(c.cmd("DELE 1").await.starts_with("+OK"));
    let t = Instant::now();
    let down = shut_down(&st);
    ends_with(&mut c, POP3_BYE, t, down).await;
    let lines = be.lines();
    assert!(lines.contains(&"DELE 1".to_string()), "{lines:?}");
    assert!(!lines.iter().any(|l| l.starts_with("QUIT")), "{lines:?}");
}

/// A POP3 backend whose RETR answer stops halfway until `go` is notified
/// (so that the shutdown surely comes while it streams); it records lines.
async fn pausing_backend(retr: Vec<u8>, go: Arc<Notify>) -> (String, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let seen = lines.clone();
    tokio::spawn(async move {
        let Ok((tcp, _)) = l.accept().await else {
            return;
        };
        let (r, mut w) = tcp.into_split();
        let mut r = BufReader::new(r);
        let _ = w.write_all(b"+OK pausing\r\n").await;
        let mut line = String::new();
        loop {
            line.clear();
            match tokio::time::timeout(Duration::from_secs(30), r.read_line(&mut line)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            let cmd = line.trim_end().to_string();
            seen.lock().unwrap().push(cmd.clone());
            let answer: &[u8] = match cmd.split(' ').next().unwrap_or("") {
                "CAPA" => b"+OK\r\nUSER\r\n.\r\n",
                "RETR" => {
                    let half = retr.len() / 2;
                    if w.write_all(&retr[..half]).await.is_err() {
                        return;
                    }
                    go.notified().await;
                    &retr[half..]
                }
                _ => b"+OK\r\n",
            };
            if w.write_all(answer).await.is_err() {
                return;
            }
        }
    });
    (addr, lines)
}

/// A POP3 client in the middle of a large RETR at shutdown receives the
/// whole message byte-exact; then, with nothing outstanding, the session
/// ends (`-ERR [SYS/TEMP]`, close) without a QUIT to the backend. A
/// command sent after the signal is not forwarded (the -ERR answers it).
#[tokio::test]
async fn pop3_retr_in_progress_finishes_then_the_session_ends() {
    let mut body = Vec::new();
    let mut n = 0;
    while body.len() < 4 << 20 {
        body.extend_from_slice(format!("{n:08} {}\r\n", "x".repeat(989)).as_bytes());
        n += 1;
    }
    body.extend_from_slice(b"..a dot-stuffed line, \xe4 8-bit\r\n");
    let mut retr = format!("+OK {} octets\r\n", body.len()).into_bytes();
    retr.extend_from_slice(&body);
    retr.extend_from_slice(b".\r\n");
    let go = Arc::new(Notify::new());
    let (addr, lines) = pausing_backend(retr, go.clone()).await;
    let be = Running {
        addr,
        connections: Default::default(),
        seen: Default::default(),
    };
    let st = gateway("pop3", &be).await;
    let mut c = pop3_logged_in(&st).await;
    c.send(b"RETR 1\r\n").await;
    assert!(c.ok().await.starts_with("+OK"));
    // the first part, then the signal while the rest is still to come
    let mut got = Vec::new();
    while got.len() < 1 << 20 {
        got.extend(c.raw_line().await.unwrap());
    }
    let t = Instant::now();
    let down = shut_down(&st);
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.send(b"DELE 1\r\n").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    go.notify_one();
    loop {
        let l = c.raw_line().await.expect("closed inside the RETR");
        if l == b".\r\n" {
            break;
        }
        got.extend(l);
    }
    assert!(got == body, "the message arrived whole and unchanged");
    ends_with(&mut c, POP3_BYE, t, down).await;
    let lines = lines.lock().unwrap().clone();
    assert_eq!(
        lines.last().map(String::as_str),
        Some("RETR 1"),
        "{lines:?}"
    );
}
