//! The TRANSACTION state's I/O: client lines go through the sans-IO
//! [`Transaction`] (only well-formed, re-rendered commands reach the backend;
//! the rest is answered here), backend bytes go to the client unchanged
//! (multi-line answers, dot-stuffing and 8-bit data pass as they are), with
//! [`Responses`] keeping local answers in reply order. A backend that did
//! not announce PIPELINING gets each command only once it has answered the
//! one before (the client may have been told PIPELINING before login: that
//! CAPA comes from the cache). Generic over the streams so it is tested
//! with in-memory pipes.
//!
//! Each direction runs on its own so a pipelining client and a streaming
//! backend never wait on each other; one idle timer covers both (any progress
//! in either direction resets it), plus the session's absolute deadline.
//!
//! At the gateway's shutdown no new command is forwarded (what the client
//! sends at a command boundary is read and dropped; a command it had begun
//! is taken whole); once every command forwarded has had its whole answer
//! (a RETR streams to its end) the client gets `-ERR [SYS/TEMP]` and the
//! close, as Dovecot's pop3 does for a client with no command running. The backend gets no QUIT: it never enters the UPDATE
//! state (RFC 1939 §6), so messages marked with DELE stay — the session ends
//! as if the connection had dropped, and nothing is lost.

use super::transaction::{Responses, Step, Transaction};
use crate::conn::pipe::{self, Activity, Expiry, Timers};
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

/// How long the backend may take to finish its answers after the client
/// half-closed (e.g. QUIT then EOF).
const DRAIN: Duration = Duration::from_secs(5);
/// Replies owed to a pipelining client before its next read is waited for
/// (bounds the reply-order queue).
const MAX_OUTSTANDING: usize = 256;
/// The backend → client read buffer: small for a session of short answers,
/// grown (once) to the large size when a read fills it, i.e. while a
/// message streams: a quarter of the reads, writes and wake-ups per RETR.
const DOWN_BUF: usize = 16 * 1024;
const DOWN_BUF_STREAMING: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PipeEnd {
    /// The backend closed (normally after QUIT).
    BackendClosed,
    /// The client closed its side.
    ClientClosed,
    /// Nothing moved for the idle time.
    Idle,
    /// The session lifetime ran out.
    SessionLimit,
    /// `max_errors` reached in the TRANSACTION state.
    TooManyErrors,
    /// The gateway shuts down (ended once nothing was owed to the client).
    Shutdown,
    Error(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipeStats {
    /// Bytes from the client (including the leftover handed in).
    pub up: u64,
    /// Bytes to the client.
    pub down: u64,
    /// RETR / DELE / QUIT commands forwarded.
    pub retr: u32,
    pub dele: u32,
    pub quit: bool,
    pub end: PipeEnd,
}

/// Both halves' view of the conversation. Locked only between awaits (both
/// halves run in one task, so the lock is never contended), never across one.
struct Shared {
    tx: Transaction,
    replies: Responses,
    /// Steps behind a command the backend has not answered yet, where it
    /// did not announce PIPELINING (the client may have been told it before
    /// login, from the cache: another connection's CAPA). In order: a local
    /// answer behind a held command waits with it.
    held: VecDeque<Step>,
    /// The gateway shuts down: no new command is forwarded.
    stopping: bool,
}

impl Shared {
    /// Nothing of the client's is outstanding: every answer is out, no
    /// command is held and no line is half-read, so the session may end
    /// here.
    fn quiet(&self) -> bool {
        self.replies.is_empty() && self.held.is_empty() && self.tx.at_command_start()
    }

    /// Client bytes in: the commands to forward now (rendered, in one
    /// buffer) and whether the session closes after the answers queued.
    fn client_bytes(&mut self, data: &[u8], out: &mut Vec<u8>) -> bool {
        self.held.extend(self.tx.feed(data));
        self.release(out)
    }

    /// Steps held behind a command the backend is still answering.
    fn holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// Takes the held steps that may go now: all of them where the backend
    /// pipelines, else up to the next command while one is at the backend
    /// (RFC 2449 §6.6: without PIPELINING a client waits for each answer).
    fn release(&mut self, out: &mut Vec<u8>) -> bool {
        while let Some(step) = self.held.front() {
            let forward = matches!(step, Step::Forward { .. });
            if forward && !self.tx.pipelining() && self.replies.at_backend() > 0 {
                break;
            }
            let Some(step) = self.held.pop_front() else {
                break;
            };
            match step {
                Step::Forward { line, expect } => {
                    // queued before the write: the answer cannot come earlier
                    self.replies.forwarded(expect);
                    out.extend_from_slice(line.as_bytes());
                }
                Step::Reply(r) => self.replies.local(&r, false),
                Step::Close(r) => {
                    self.replies.local(&r, true);
                    return true;
                }
            }
        }
        false
    }
}

/// Writes the local answers due now (nothing of the backend's before them).
async fn write_due<W: AsyncWrite + Unpin>(
    cw: &mut W,
    shared: &Mutex<Shared>,
    bytes_out: &mut u64,
) -> std::io::Result<Option<bool>> {
    let next = || {
        shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replies
            .take_local()
    };
    pipe::write_queued(cw, next, bytes_out).await
}

/// Pipes until one side closes, the idle time passes without progress, the
/// deadline, or the gateway's shutdown once nothing is owed to the client.
/// `to_backend` / `to_client` are bytes already read from the other side
/// (pipelined commands, early backend output) and go first. On idle /
/// deadline / shutdown the client gets the matching reply of `t`.
pub async fn relay<C, B>(
    client: C,
    backend: B,
    tx: Transaction,
    to_backend: &[u8],
    to_client: &[u8],
    t: Timers<'_>,
) -> PipeStats
where
    C: AsyncRead + AsyncWrite + Send,
    B: AsyncRead + AsyncWrite + Send,
{
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut br, mut bw) = tokio::io::split(backend);
    let activity = Activity::default();
    let touch = || activity.touch();
    let shared = Mutex::new(Shared {
        tx,
        replies: Responses::default(),
        held: VecDeque::new(),
        stopping: false,
    });
    let mut shutdown = t.shutdown.clone();
    let lock = || shared.lock().unwrap_or_else(|e| e.into_inner());
    // the signal itself, or the down half saw it (also a sender gone): the
    // down half may not look while a response streams
    let signalled = || *t.shutdown.borrow() || lock().stopping;
    // up → down: a local answer was queued; down → up: replies went out
    let queued = Notify::new();
    let sent = Notify::new();
    let mut up_bytes = to_backend.len() as u64;
    let mut down_bytes = 0u64;

    let end = {
        let up = async {
            let mut buf = vec![0u8; 4096];
            let mut out = Vec::new();
            let mut data: &[u8] = to_backend;
            loop {
                out.clear();
                let close = lock().client_bytes(data, &mut out);
                queued.notify_one();
                if !out.is_empty() {
                    bw.write_all(&out).await?;
                    bw.flush().await?;
                    touch();
                }
                if close {
                    return Ok::<bool, std::io::Error>(true);
                }
                // held behind an answer (no PIPELINING): released as the
                // down half finishes responses, before the client is read on
                while lock().holding() {
                    sent.notified().await;
                    out.clear();
                    let close = lock().release(&mut out);
                    queued.notify_one();
                    if !out.is_empty() {
                        bw.write_all(&out).await?;
                        bw.flush().await?;
                        touch();
                    }
                    if close {
                        return Ok(true);
                    }
                }
                while lock().replies.len() >= MAX_OUTSTANDING {
                    sent.notified().await;
                }
                let n = cr.read(&mut buf).await?;
                if n == 0 {
                    // let the backend see EOF (it ends the session without UPDATE
                    // unless QUIT came first, RFC 1939 §6)
                    let _ = bw.shutdown().await;
                    return Ok(false);
                }
                touch();
                up_bytes += n as u64;
                data = &buf[..n];
                if signalled() && lock().tx.at_command_start() {
                    // shutting down: a command started now is not forwarded
                    // (its answer is the shutdown's -ERR)
                    data = &[];
                }
            }
        };
        let down = async {
            if !to_client.is_empty() {
                cw.write_all(to_client).await?;
                cw.flush().await?;
                down_bytes += to_client.len() as u64;
            }
            let mut buf = vec![0u8; DOWN_BUF];
            loop {
                // local answers now due (nothing of the backend's before them)
                match write_due(&mut cw, &shared, &mut down_bytes).await? {
                    Some(true) => return Ok::<PipeEnd, std::io::Error>(PipeEnd::TooManyErrors),
                    Some(false) => {
                        cw.flush().await?;
                        touch();
                        sent.notify_one();
                    }
                    None => {}
                }
                // here everything taken from the backend is written
                if signalled() && lock().quiet() {
                    return Ok(PipeEnd::Shutdown);
                }
                let stopping = lock().stopping;
                let n = tokio::select! {
                    biased;
                    r = br.read(&mut buf) => r?,
                    _ = queued.notified() => continue,
                    _ = pipe::shutdown_signalled(&mut shutdown), if !stopping => {
                        lock().stopping = true;
                        continue;
                    }
                };
                if n == 0 {
                    return Ok(PipeEnd::BackendClosed);
                }
                touch();
                let full = n == buf.len();
                let mut at = 0;
                while at < n {
                    let k = lock().replies.split(&buf[at..n]);
                    if k > 0 {
                        cw.write_all(&buf[at..at + k]).await?;
                        at += k;
                    }
                    if write_due(&mut cw, &shared, &mut down_bytes).await? == Some(true) {
                        return Ok(PipeEnd::TooManyErrors);
                    }
                }
                // TLS buffers records until flushed
                cw.flush().await?;
                down_bytes += n as u64;
                touch();
                sent.notify_one();
                if full && buf.len() < DOWN_BUF_STREAMING {
                    buf.resize(DOWN_BUF_STREAMING, 0);
                }
            }
        };
        let watchdog = async {
            match activity.watchdog(|| t.idle, t.idle, t.deadline).await {
                Expiry::Idle => PipeEnd::Idle,
                Expiry::SessionLimit => PipeEnd::SessionLimit,
            }
        };
        tokio::pin!(up, down, watchdog);
        tokio::select! {
            r = &mut up => match r {
                Ok(closing) => {
                    // the backend's last answers (QUIT's +OK, or those before
                    // the too-many-errors reply) still go out
                    tokio::select! {
                        _ = &mut down => {}
                        _ = tokio::time::sleep(DRAIN) => {}
                    }
                    if closing {
                        PipeEnd::TooManyErrors
                    } else {
                        PipeEnd::ClientClosed
                    }
                }
                Err(e) => PipeEnd::Error(format!("client→backend: {e}")),
            },
            r = &mut down => r.unwrap_or_else(|e| PipeEnd::Error(format!("backend→client: {e}"))),
            e = &mut watchdog => e,
        }
    };
    let last_words = match end {
        PipeEnd::Idle => Some(t.idle_reply),
        PipeEnd::SessionLimit => Some(t.deadline_reply),
        PipeEnd::Shutdown => Some(t.shutdown_reply),
        _ => None,
    };
    pipe::goodbye(&mut cw, last_words, &mut down_bytes).await;
    let tx = shared.into_inner().unwrap_or_else(|e| e.into_inner()).tx;
    PipeStats {
        up: up_bytes,
        down: down_bytes,
        retr: tx.retr,
        dele: tx.dele,
        quit: tx.quit,
        end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::caps::Pop3Caps;
    use tokio::io::duplex;
    use tokio::sync::watch;
    use tokio::time::Instant;

    /// A backend that takes pipelined commands (the tests below send them
    /// in bursts).
    fn tx() -> Transaction {
        let caps = Pop3Caps {
            pipelining: true,
            ..Pop3Caps::rfc1939()
        };
        Transaction::new(caps, 10, 0)
    }

    fn timers(idle: u64, deadline: u64) -> Timers<'static> {
        with_shutdown(idle, deadline, pipe::no_shutdown())
    }

    fn with_shutdown(idle: u64, deadline: u64, shutdown: watch::Receiver<bool>) -> Timers<'static> {
        Timers {
            idle: Duration::from_secs(idle),
            deadline: Instant::now() + Duration::from_secs(deadline),
            shutdown,
            idle_reply: b"-ERR idle\r\n",
            deadline_reply: b"-ERR limit\r\n",
            shutdown_reply: b"-ERR bye\r\n",
        }
    }

    #[tokio::test]
    async fn bytes_pass_unchanged_and_leftovers_go_first() {
        let (client, mut client_peer) = duplex(1 << 16);
        let (backend, mut backend_peer) = duplex(1 << 16);
        let task = tokio::spawn(async move {
            relay(client, backend, tx(), b"RETR 1\r\n", b"", timers(30, 60)).await
        });
        let mut got = vec![0u8; 8];
        backend_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"RETR 1\r\n");
        let body = b"+OK 12 octets\r\n..dot\r\n\xe4\xf6\r\n.\r\n";
        backend_peer.write_all(body).await.unwrap();
        let mut got = vec![0u8; body.len()];
        client_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..], &body[..]);
        client_peer.write_all(b"QUIT\r\n").await.unwrap();
        let mut got = vec![0u8; 6];
        backend_peer.read_exact(&mut got).await.unwrap();
        backend_peer.write_all(b"+OK bye\r\n").await.unwrap();
        drop(backend_peer);
        let stats = task.await.unwrap();
        let mut rest = Vec::new();
        client_peer.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"+OK bye\r\n");
        assert_eq!(stats.end, PipeEnd::BackendClosed);
        assert_eq!((stats.retr, stats.dele, stats.quit), (1, 0, true));
        assert_eq!(stats.up, 14);
        assert_eq!(stats.down, body.len() as u64 + 9);
    }

    #[tokio::test]
    async fn local_answers_stay_in_reply_order_and_never_reach_the_backend() {
        let (client, mut client_peer) = duplex(1 << 16);
        let (backend, mut backend_peer) = duplex(1 << 16);
        let task = tokio::spawn(async move {
            relay(
                client,
                backend,
                tx(),
                b"STAT\r\nUSER bob\r\nretr 1\r\nPASS x\0\r\nQUIT\r\n",
                b"",
                timers(30, 60),
            )
            .await
        });
        let want_up = b"STAT\r\nRETR 1\r\nQUIT\r\n";
        let mut got = vec![0u8; want_up.len()];
        backend_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, want_up);
        backend_peer
            .write_all(b"+OK 1 3\r\n+OK\r\nhi\r\n.\r\n+OK bye\r\n")
            .await
            .unwrap();
        drop(backend_peer);
        let stats = task.await.unwrap();
        let mut rest = Vec::new();
        client_peer.read_to_end(&mut rest).await.unwrap();
        assert_eq!(
            String::from_utf8(rest).unwrap(),
            "+OK 1 3\r\n-ERR Already logged in\r\n+OK\r\nhi\r\n.\r\n-ERR Invalid characters in command\r\n+OK bye\r\n"
        );
        assert_eq!((stats.retr, stats.quit), (1, true));
    }

    /// A backend without PIPELINING gets one command at a time, whatever
    /// the client was told before login (CAPA there comes from the cache,
    /// which may have seen another backend connection): each waits for the
    /// whole answer to the one before, and the replies keep their order.
    #[tokio::test]
    async fn a_backend_without_pipelining_gets_one_command_at_a_time() {
        let (client, mut client_peer) = duplex(1 << 16);
        let (backend, mut backend_peer) = duplex(1 << 16);
        let no_pipelining = Transaction::new(Pop3Caps::from_capa(&["USER", "UIDL"]), 10, 0);
        let task = tokio::spawn(async move {
            relay(
                client,
                backend,
                no_pipelining,
                b"RETR 1\r\nUSER x\r\nDELE 1\r\nQUIT\r\n",
                b"",
                timers(30, 60),
            )
            .await
        });
        // nothing after RETR until its body has ended
        let mut got = vec![0u8; 8];
        backend_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"RETR 1\r\n");
        let early = tokio::time::timeout(Duration::from_millis(200), backend_peer.read_u8()).await;
        assert!(
            early.is_err(),
            "a second command before RETR's answer: {early:?}"
        );
        backend_peer.write_all(b"+OK\r\nbody\r\n").await.unwrap();
        let early = tokio::time::timeout(Duration::from_millis(100), backend_peer.read_u8()).await;
        assert!(early.is_err(), "DELE before RETR's body ended: {early:?}");
        backend_peer.write_all(b".\r\n").await.unwrap();
        let mut got = vec![0u8; 8];
        backend_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"DELE 1\r\n");
        backend_peer.write_all(b"+OK deleted\r\n").await.unwrap();
        let mut got = vec![0u8; 6];
        backend_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"QUIT\r\n");
        backend_peer.write_all(b"+OK bye\r\n").await.unwrap();
        drop(backend_peer);
        let stats = task.await.unwrap();
        let mut rest = Vec::new();
        client_peer.read_to_end(&mut rest).await.unwrap();
        assert_eq!(
            String::from_utf8(rest).unwrap(),
            "+OK\r\nbody\r\n.\r\n-ERR Already logged in\r\n+OK deleted\r\n+OK bye\r\n"
        );
        assert_eq!((stats.retr, stats.dele, stats.quit), (1, 1, true));
    }

    fn no_pipelining() -> Transaction {
        Transaction::new(Pop3Caps::from_capa(&["USER", "UIDL"]), 3, 0)
    }

    /// A backend that never answers the command the others are held
    /// behind: the idle timer still ends the session (nothing more is
    /// sent to the backend, the client hears the idle reply).
    #[tokio::test(start_paused = true)]
    async fn held_commands_behind_a_silent_backend_end_at_the_idle_time() {
        let (client, mut client_peer) = duplex(1 << 16);
        let (backend, mut backend_peer) = duplex(1 << 16);
        let stats = relay(
            client,
            backend,
            no_pipelining(),
            b"STAT\r\nUSER x\r\nDELE 1\r\nQUIT\r\n",
            b"",
            timers(30, 3600),
        )
        .await;
        assert_eq!(stats.end, PipeEnd::Idle);
        drop(stats);
        let mut rest = Vec::new();
        client_peer.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"-ERR idle\r\n");
        let mut up = Vec::new();
        backend_peer.read_to_end(&mut up).await.unwrap();
        assert_eq!(up, b"STAT\r\n");
    }

    /// A shutdown while commands are held: those the client sent before
    /// it go one at a time as promised, then the session ends.
    #[tokio::test]
    async fn a_shutdown_while_holding_forwards_what_came_before_it() {
        let (client, mut client_peer) = duplex(1 << 16);
        let (backend, mut backend_peer) = duplex(1 << 16);
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            relay(
                client,
                backend,
                no_pipelining(),
                b"STAT\r\nNOOP\r\n",
                b"",
                with_shutdown(30, 3600, rx),
            )
            .await
        });
        let mut got = vec![0u8; 6];
        backend_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"STAT\r\n");
        stop.send(true).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        backend_peer.write_all(b"+OK 1 3\r\n").await.unwrap();
        let mut got = vec![0u8; 6];
        backend_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"NOOP\r\n");
        backend_peer.write_all(b"+OK\r\n").await.unwrap();
        let stats = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the shutdown ends the session")
            .unwrap();
        assert_eq!(stats.end, PipeEnd::Shutdown);
        let mut rest = Vec::new();
        client_peer.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"+OK 1 3\r\n+OK\r\n-ERR bye\r\n");
    }

    /// `max_errors` reached behind a held command: the errors and the
    /// close wait for the backend's answer, in order, and nothing after
    /// the close reaches the backend.
    #[tokio::test]
    async fn too_many_errors_behind_a_held_command_keep_reply_order() {
        let (client, mut client_peer) = duplex(1 << 16);
        let (backend, mut backend_peer) = duplex(1 << 16);
        let task = tokio::spawn(async move {
            relay(
                client,
                backend,
                no_pipelining(),
                b"STAT\r\nNOOP\r\nX\r\nY\r\nZ\r\nDELE 1\r\n",
                b"",
                timers(30, 3600),
            )
            .await
        });
        let mut got = vec![0u8; 6];
        backend_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"STAT\r\n");
        backend_peer.write_all(b"+OK 1 3\r\n").await.unwrap();
        let mut got = vec![0u8; 6];
        backend_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"NOOP\r\n");
        backend_peer.write_all(b"+OK\r\n").await.unwrap();
        let stats = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the close ends the session")
            .unwrap();
        assert_eq!(stats.end, PipeEnd::TooManyErrors);
        assert_eq!(stats.dele, 0);
        let mut rest = Vec::new();
        client_peer.read_to_end(&mut rest).await.unwrap();
        let rest = String::from_utf8(rest).unwrap();
        assert!(rest.starts_with("+OK 1 3\r\n+OK\r\n-ERR"), "{rest}");
        assert_eq!(rest.matches("\r\n").count(), 5, "{rest}");
        drop(client_peer);
        let mut up = Vec::new();
        backend_peer.read_to_end(&mut up).await.unwrap();
        assert_eq!(up, b"");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_tells_the_client() {
        let (client, mut client_peer) = duplex(1 << 16);
        let (backend, _backend_peer) = duplex(1 << 16);
        let stats = relay(
            client,
            backend,
            tx(),
            b"",
            b"+OK early\r\n",
            timers(30, 3600),
        )
        .await;
        assert_eq!(stats.end, PipeEnd::Idle);
        let mut rest = Vec::new();
        client_peer.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"+OK early\r\n-ERR idle\r\n");
    }

    #[tokio::test]
    async fn a_shutdown_before_the_pipe_ends_an_idle_session_without_quit() {
        let (client, mut client_peer) = duplex(1 << 16);
        let (backend, mut backend_peer) = duplex(1 << 16);
        let (stop, rx) = watch::channel(false);
        stop.send(true).unwrap();
        let stats = relay(client, backend, tx(), b"", b"", with_shutdown(30, 3600, rx)).await;
        assert_eq!(stats.end, PipeEnd::Shutdown);
        assert!(!stats.quit);
        let mut rest = Vec::new();
        client_peer.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"-ERR bye\r\n");
        // the backend got nothing: no QUIT, so no UPDATE state
        let mut rest = Vec::new();
        backend_peer.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"");
    }

    #[tokio::test]
    async fn a_shutdown_lets_a_retr_finish_and_takes_no_new_command() {
        let (client, mut client_peer) = duplex(1 << 16);
        let (backend, mut backend_peer) = duplex(1 << 16);
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            relay(client, backend, tx(), b"", b"", with_shutdown(30, 3600, rx)).await
        });
        client_peer.write_all(b"RETR 1\r\nNO").await.unwrap();
        let mut got = vec![0u8; 8];
        backend_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"RETR 1\r\n");
        backend_peer.write_all(b"+OK\r\nfirst\r\n").await.unwrap();
        let mut got = vec![0u8; 12];
        client_peer.read_exact(&mut got).await.unwrap();
        stop.send(true).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // the half-sent NOOP is finished and forwarded; a command started
        // after the signal is not
        client_peer.write_all(b"OP\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        client_peer.write_all(b"DELE 1\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        backend_peer
            .write_all(b"second\r\n.\r\n+OK noop\r\n")
            .await
            .unwrap();
        let stats = task.await.unwrap();
        assert_eq!(stats.end, PipeEnd::Shutdown);
        assert_eq!((stats.retr, stats.dele, stats.quit), (1, 0, false));
        let mut rest = Vec::new();
        client_peer.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"second\r\n.\r\n+OK noop\r\n-ERR bye\r\n");
        let mut rest = Vec::new();
        backend_peer.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"NOOP\r\n");
    }

    #[tokio::test(start_paused = true)]
    async fn session_deadline_applies_while_busy() {
        let (client, _client_peer) = duplex(1 << 20);
        let (backend, mut backend_peer) = duplex(1 << 16);
        let feeder = tokio::spawn(async move {
            // a backend that keeps talking never lets the idle timer fire
            loop {
                if backend_peer.write_all(b"+OK\r\n").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let stats = relay(client, backend, tx(), b"", b"", timers(30, 100)).await;
        assert_eq!(stats.end, PipeEnd::SessionLimit);
        feeder.abort();
    }
}
