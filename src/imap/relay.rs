//! The authenticated state's I/O: client bytes go through the sans-IO
//! [`Upstream`] (checked and bounded commands reach the backend as sent; the
//! rest is answered here), backend bytes go to the client unchanged, with
//! [`Downstream`] marking where each response ends so that mailgate's own
//! answers go out only there. Generic over the streams so it is tested with
//! in-memory pipes.
//!
//! Each direction runs on its own so a pipelining client and a streaming
//! backend never wait on each other, except where IMAP itself makes the
//! client wait: after a synchronising literal's announcement the client's
//! next bytes are read only once the backend answered it (`+` or the tagged
//! refusal). One idle timer covers both directions (any progress resets
//! it; while the client is in IDLE it is at least [`IDLE_MIN`]), plus the
//! session's absolute deadline.
//!
//! At the gateway's shutdown no new command is forwarded (what the client
//! sends at a command boundary is read and dropped; a command it had begun
//! is taken whole); once nothing is outstanding at the backend — every
//! command answered, or only an IDLE it accepted — the client gets
//! `* BYE [UNAVAILABLE]` (RFC 3501 §7.1.5, RFC 5530) at a response boundary
//! and the close. The backend connection is just closed:
//! with nothing outstanding it holds no half-done command, and a LOGOUT
//! would change nothing there (it expunges nothing, unlike CLOSE).

use super::tracker::{Downstream, Event, Seen, Upstream};
use crate::conn::pipe::{self, Activity, Expiry, Timers};
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

/// RFC 2177 §3: a client re-issues IDLE at least every 29 minutes, so the
/// server's inactivity timer must not be shorter while it idles.
pub const IDLE_MIN: Duration = Duration::from_secs(29 * 60);
/// How long the backend may take to finish its answers after the client
/// half-closed (e.g. LOGOUT then EOF).
const DRAIN: Duration = Duration::from_secs(5);
/// Local answers queued before the client's next read is waited for.
const MAX_OUTSTANDING: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEnd {
    /// The backend closed (normally after LOGOUT).
    BackendClosed,
    /// The client closed its side.
    ClientClosed,
    /// Nothing moved for the idle time.
    Idle,
    /// The session lifetime ran out.
    SessionLimit,
    /// mailgate closed it (too many errors, a literal it would not read).
    Refused,
    /// The gateway shuts down (ended once nothing was outstanding).
    Shutdown,
    Error(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayStats {
    /// Bytes from the client (including the leftover handed in).
    pub up: u64,
    /// Bytes to the client.
    pub down: u64,
    /// Commands forwarded.
    pub commands: u32,
    pub logout: bool,
    pub end: RelayEnd,
}

/// Both halves' view of the conversation. Locked only between awaits
/// (both halves run in one task), never across one.
struct Shared {
    up: Upstream,
    down: Downstream,
    /// Local answers waiting for a response boundary, and whether each closes.
    local: VecDeque<(Vec<u8>, bool)>,
    /// The gateway shuts down: no new command is forwarded.
    stopping: bool,
}

impl Shared {
    /// Nothing is outstanding (see [`Upstream::quiet`]), no local answer
    /// waits and the backend's stream is between responses: the session
    /// may end here.
    fn quiet(&self) -> bool {
        self.up.quiet() && self.local.is_empty() && self.down.at_boundary()
    }

    /// A response of the backend ended: the upstream half learns of `+`
    /// and tagged answers. True when that ends its wait.
    fn seen(&mut self, seen: Seen) -> bool {
        match seen {
            Seen::Continuation => self.up.continuation(),
            Seen::Tagged(tag) => self.up.tagged(&tag),
            Seen::Untagged => false,
        }
    }
}

/// Writes the local answers (the stream is at a response boundary).
async fn write_local<W: AsyncWrite + Unpin>(
    cw: &mut W,
    shared: &Mutex<Shared>,
    bytes_out: &mut u64,
) -> std::io::Result<Option<bool>> {
    let next = || {
        shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .local
            .pop_front()
    };
    pipe::write_queued(cw, next, bytes_out).await
}

/// Relays until one side closes, the idle time passes without progress, the
/// deadline, or the gateway's shutdown once nothing is outstanding. `to_backend` / `to_client` are bytes already read from the
/// other side (commands pipelined behind the login, the backend's untagged
/// data after its OK) and go first.
pub async fn relay<C, B>(
    client: C,
    backend: B,
    up: Upstream,
    to_backend: &[u8],
    to_client: &[u8],
    t: Timers<'_>,
) -> RelayStats
where
    C: AsyncRead + AsyncWrite + Send,
    B: AsyncRead + AsyncWrite + Send,
{
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut br, mut bw) = tokio::io::split(backend);
    let activity = Activity::default();
    let touch = || activity.touch();
    let shared = Mutex::new(Shared {
        up,
        down: Downstream::default(),
        local: VecDeque::new(),
        stopping: false,
    });
    let mut shutdown = t.shutdown.clone();
    let lock = || shared.lock().unwrap_or_else(|e| e.into_inner());
    // the signal itself, or the down half saw it (also a sender gone): the
    // down half may not look while a response streams
    let signalled = || *t.shutdown.borrow() || lock().stopping;
    // up → down: a local answer was queued; down → up: answers went out, or
    // the backend answered a synchronising literal
    let queued = Notify::new();
    let sent = Notify::new();
    let go = Notify::new();
    let mut up_bytes = to_backend.len() as u64;
    let mut down_bytes = 0u64;

    let end = {
        let up = async {
            let mut buf = vec![0u8; 16 * 1024];
            // client bytes not taken yet (only while a literal waits)
            let mut pending: Vec<u8> = to_backend.to_vec();
            let mut out = Vec::new();
            loop {
                out.clear();
                let (taken, events, waiting) = {
                    let mut s = lock();
                    let (taken, events) = s.up.feed(&pending, &mut out);
                    (taken, events, s.up.waiting())
                };
                pending.drain(..taken);
                let mut close = false;
                if !events.is_empty() {
                    let mut s = lock();
                    for e in events {
                        match e {
                            Event::Reply(r) => s.local.push_back((r.to_bytes(), false)),
                            Event::Close(r) => {
                                s.local.push_back((r.to_bytes(), true));
                                close = true;
                            }
                        }
                    }
                    drop(s);
                    queued.notify_one();
                }
                if !out.is_empty() {
                    bw.write_all(&out).await?;
                    bw.flush().await?;
                    touch();
                }
                if close {
                    return Ok::<bool, std::io::Error>(true);
                }
                if waiting {
                    go.notified().await;
                    continue;
                }
                while lock().local.len() >= MAX_OUTSTANDING {
                    sent.notified().await;
                }
                let n = cr.read(&mut buf).await?;
                if n == 0 {
                    let _ = bw.shutdown().await;
                    return Ok(false);
                }
                touch();
                up_bytes += n as u64;
                let dropped = signalled() && lock().up.at_command_start();
                // shutting down: a command started now is not forwarded
                // (the shutdown's BYE answers it)
                if !dropped {
                    pending.extend_from_slice(&buf[..n]);
                }
            }
        };
        let down = async {
            let mut buf = vec![0u8; 16 * 1024];
            let mut first: Option<&[u8]> = Some(to_client).filter(|b| !b.is_empty());
            loop {
                if lock().down.at_boundary() {
                    match write_local(&mut cw, &shared, &mut down_bytes).await? {
                        Some(true) => return Ok::<RelayEnd, std::io::Error>(RelayEnd::Refused),
                        Some(false) => {
                            cw.flush().await?;
                            touch();
                            sent.notify_one();
                        }
                        None => {}
                    }
                }
                // here everything taken from the backend is written
                if first.is_none() && signalled() && lock().quiet() {
                    return Ok(RelayEnd::Shutdown);
                }
                let stopping = lock().stopping;
                let data: &[u8] = match first.take() {
                    Some(b) => b,
                    None => {
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
                            return Ok(RelayEnd::BackendClosed);
                        }
                        &buf[..n]
                    }
                };
                touch();
                // written in one go unless a local answer is due at a boundary
                let (mut at, mut from) = (0, 0);
                while at < data.len() {
                    let (k, seen, local) = {
                        let mut s = lock();
                        let (k, seen) = s.down.feed(&data[at..]);
                        let ended = seen.is_some();
                        if seen.is_some_and(|x| s.seen(x)) {
                            go.notify_one();
                        }
                        (k, ended, !s.local.is_empty())
                    };
                    at += k;
                    if seen && local {
                        cw.write_all(&data[from..at]).await?;
                        from = at;
                        if write_local(&mut cw, &shared, &mut down_bytes).await? == Some(true) {
                            down_bytes += at as u64;
                            return Ok(RelayEnd::Refused);
                        }
                        sent.notify_one();
                    }
                }
                cw.write_all(&data[from..]).await?;
                // TLS buffers records until flushed
                cw.flush().await?;
                down_bytes += data.len() as u64;
                touch();
            }
        };
        let idle = || {
            if lock().up.idling() {
                t.idle.max(IDLE_MIN)
            } else {
                t.idle
            }
        };
        let watchdog = async {
            // woken at least every `t.idle` to see an IDLE end
            match activity.watchdog(idle, t.idle, t.deadline).await {
                Expiry::Idle => RelayEnd::Idle,
                Expiry::SessionLimit => RelayEnd::SessionLimit,
            }
        };
        tokio::pin!(up, down, watchdog);
        tokio::select! {
            r = &mut up => match r {
                Ok(closing) => {
                    // the backend's last answers (LOGOUT's, or those before
                    // mailgate's closing answer) still go out
                    let drained = tokio::select! {
                        r = &mut down => Some(r),
                        _ = tokio::time::sleep(DRAIN) => None,
                    };
                    match drained {
                        _ if closing => RelayEnd::Refused,
                        Some(Err(e)) => RelayEnd::Error(format!("backend→client: {e}")),
                        _ => RelayEnd::ClientClosed,
                    }
                }
                Err(e) => RelayEnd::Error(format!("client→backend: {e}")),
            },
            r = &mut down => r.unwrap_or_else(|e| RelayEnd::Error(format!("backend→client: {e}"))),
            e = &mut watchdog => e,
        }
    };
    let last_words = match end {
        RelayEnd::Idle => Some(t.idle_reply),
        RelayEnd::SessionLimit => Some(t.deadline_reply),
        RelayEnd::Shutdown => Some(t.shutdown_reply),
        _ => None,
    };
    // never in the middle of a backend response
    let at_boundary = lock().down.at_boundary();
    pipe::goodbye(&mut cw, last_words.filter(|_| at_boundary), &mut down_bytes).await;
    let up = shared.into_inner().unwrap_or_else(|e| e.into_inner()).up;
    RelayStats {
        up: up_bytes,
        down: down_bytes,
        commands: up.commands,
        logout: up.logout,
        end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::tracker::Limits;
    use tokio::io::duplex;
    use tokio::sync::watch;
    use tokio::time::Instant;

    fn up() -> Upstream {
        Upstream::new(
            Limits {
                line: 1000,
                literal: 1000,
                append: 100_000,
                non_sync: u64::MAX,
            },
            10,
            0,
        )
    }

    fn timers(idle: u64) -> Timers<'static> {
        with_shutdown(idle, pipe::no_shutdown())
    }

    fn with_shutdown(idle: u64, shutdown: watch::Receiver<bool>) -> Timers<'static> {
        Timers {
            idle: Duration::from_secs(idle),
            deadline: Instant::now() + Duration::from_secs(100_000),
            shutdown,
            idle_reply: b"* BYE idle\r\n",
            deadline_reply: b"* BYE limit\r\n",
            shutdown_reply: b"* BYE bye\r\n",
        }
    }

    async fn read_n(r: &mut (impl AsyncRead + Unpin), n: usize) -> String {
        let mut got = vec![0u8; n];
        r.read_exact(&mut got).await.unwrap();
        String::from_utf8_lossy(&got).into_owned()
    }

    #[tokio::test]
    async fn bytes_pass_unchanged_and_local_answers_wait_for_a_boundary() {
        let (client, mut cp) = duplex(1 << 16);
        let (backend, mut bp) = duplex(1 << 16);
        let task = tokio::spawn(async move {
            relay(
                client,
                backend,
                up(),
                b"a FETCH 1 BODY[]\r\n",
                b"",
                timers(30),
            )
            .await
        });
        assert_eq!(read_n(&mut bp, 18).await, "a FETCH 1 BODY[]\r\n");
        // the backend is in the middle of a literal when STARTTLS comes
        bp.write_all(b"* 1 FETCH (BODY[] {10}\r\n01234")
            .await
            .unwrap();
        assert_eq!(read_n(&mut cp, 29).await, "* 1 FETCH (BODY[] {10}\r\n01234");
        cp.write_all(b"b STARTTLS\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        bp.write_all(b"\r\n789)\r\na OK done\r\n").await.unwrap();
        let want = "\r\n789)\r\nb BAD STARTTLS is only valid before login\r\na OK done\r\n";
        assert_eq!(read_n(&mut cp, want.len()).await, want);
        cp.write_all(b"c LOGOUT\r\n").await.unwrap();
        assert_eq!(read_n(&mut bp, 10).await, "c LOGOUT\r\n");
        bp.write_all(b"* BYE\r\nc OK bye\r\n").await.unwrap();
        drop(bp);
        let stats = task.await.unwrap();
        assert_eq!(stats.end, RelayEnd::BackendClosed);
        assert!(stats.logout);
        assert_eq!(stats.commands, 2);
        let mut rest = Vec::new();
        cp.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"* BYE\r\nc OK bye\r\n");
    }

    #[tokio::test]
    async fn synchronising_literal_goes_after_the_backends_go_ahead() {
        let (client, mut cp) = duplex(1 << 16);
        let (backend, mut bp) = duplex(1 << 16);
        let task =
            tokio::spawn(async move { relay(client, backend, up(), b"", b"", timers(30)).await });
        // an impatient client: the literal and the next command in one write
        cp.write_all(b"a APPEND INBOX {5}\r\nhello\r\nb NOOP\r\n")
            .await
            .unwrap();
        assert_eq!(read_n(&mut bp, 20).await, "a APPEND INBOX {5}\r\n");
        tokio::time::sleep(Duration::from_millis(50)).await;
        bp.write_all(b"+ go\r\n").await.unwrap();
        assert_eq!(read_n(&mut bp, 15).await, "hello\r\nb NOOP\r\n");
        assert_eq!(read_n(&mut cp, 6).await, "+ go\r\n");
        drop(cp);
        // the client's close first, then the backend's (the drain ends)
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(bp);
        let stats = task.await.unwrap();
        assert_eq!(stats.end, RelayEnd::ClientClosed);
    }

    #[tokio::test]
    async fn a_synchronising_literal_waits_for_the_answers_before_it() {
        let (client, mut cp) = duplex(1 << 16);
        let (backend, mut bp) = duplex(1 << 16);
        let task =
            tokio::spawn(async move { relay(client, backend, up(), b"", b"", timers(30)).await });
        cp.write_all(b"a NOOP\r\na APPEND INBOX {5}\r\nhello\r\n")
            .await
            .unwrap();
        assert_eq!(read_n(&mut bp, 8).await, "a NOOP\r\n");
        tokio::time::sleep(Duration::from_millis(50)).await;
        // the APPEND line goes only once the NOOP is answered
        bp.write_all(b"a OK noop\r\n").await.unwrap();
        assert_eq!(read_n(&mut bp, 20).await, "a APPEND INBOX {5}\r\n");
        bp.write_all(b"+ go\r\n").await.unwrap();
        assert_eq!(read_n(&mut bp, 7).await, "hello\r\n");
        assert_eq!(read_n(&mut cp, 17).await, "a OK noop\r\n+ go\r\n");
        drop(cp);
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(bp);
        assert_eq!(task.await.unwrap().end, RelayEnd::ClientClosed);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_keeps_the_session_for_29_minutes() {
        let (client, mut cp) = duplex(1 << 16);
        let (backend, mut bp) = duplex(1 << 16);
        let started = Instant::now();
        let task =
            tokio::spawn(async move { relay(client, backend, up(), b"", b"", timers(60)).await });
        cp.write_all(b"a IDLE\r\n").await.unwrap();
        assert_eq!(read_n(&mut bp, 8).await, "a IDLE\r\n");
        bp.write_all(b"+ idling\r\n").await.unwrap();
        assert_eq!(read_n(&mut cp, 10).await, "+ idling\r\n");
        // a message arrives after 20 minutes of silence
        tokio::time::sleep(Duration::from_secs(20 * 60)).await;
        bp.write_all(b"* 4 EXISTS\r\n").await.unwrap();
        assert_eq!(read_n(&mut cp, 12).await, "* 4 EXISTS\r\n");
        cp.write_all(b"DONE\r\n").await.unwrap();
        assert_eq!(read_n(&mut bp, 6).await, "DONE\r\n");
        bp.write_all(b"a OK IDLE done\r\n").await.unwrap();
        assert_eq!(read_n(&mut cp, 16).await, "a OK IDLE done\r\n");
        // out of IDLE, the listener's own idle time applies again
        let stats = task.await.unwrap();
        assert_eq!(stats.end, RelayEnd::Idle);
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(21 * 60), "{waited:?}");
        assert!(waited < Duration::from_secs(22 * 60), "{waited:?}");
        let mut rest = Vec::new();
        cp.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"* BYE idle\r\n");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_client_is_dropped_after_29_minutes_of_silence() {
        let (client, mut cp) = duplex(1 << 16);
        let (backend, mut bp) = duplex(1 << 16);
        let started = Instant::now();
        let task =
            tokio::spawn(async move { relay(client, backend, up(), b"", b"", timers(60)).await });
        cp.write_all(b"a IDLE\r\n").await.unwrap();
        assert_eq!(read_n(&mut bp, 8).await, "a IDLE\r\n");
        let stats = task.await.unwrap();
        assert_eq!(stats.end, RelayEnd::Idle);
        let waited = started.elapsed();
        assert!(waited >= IDLE_MIN && waited < IDLE_MIN + Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_shutdown_ends_an_idle_at_once_and_a_fetch_once_answered() {
        let (client, mut cp) = duplex(1 << 16);
        let (backend, mut bp) = duplex(1 << 16);
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            relay(client, backend, up(), b"", b"", with_shutdown(60, rx)).await
        });
        cp.write_all(b"a IDLE\r\n").await.unwrap();
        assert_eq!(read_n(&mut bp, 8).await, "a IDLE\r\n");
        bp.write_all(b"+ idling\r\n").await.unwrap();
        assert_eq!(read_n(&mut cp, 10).await, "+ idling\r\n");
        stop.send(true).unwrap();
        let stats = task.await.unwrap();
        assert_eq!(stats.end, RelayEnd::Shutdown);
        let mut rest = Vec::new();
        cp.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"* BYE bye\r\n");

        // busy: a FETCH answer in flight goes out whole first
        let (client, mut cp) = duplex(1 << 16);
        let (backend, mut bp) = duplex(1 << 16);
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            relay(client, backend, up(), b"", b"", with_shutdown(60, rx)).await
        });
        cp.write_all(b"b FETCH 1 BODY[]\r\n").await.unwrap();
        assert_eq!(read_n(&mut bp, 18).await, "b FETCH 1 BODY[]\r\n");
        bp.write_all(b"* 1 FETCH (BODY[] {10}\r\n01234")
            .await
            .unwrap();
        assert_eq!(read_n(&mut cp, 29).await, "* 1 FETCH (BODY[] {10}\r\n01234");
        stop.send(true).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // started after the signal: not forwarded
        cp.write_all(b"c NOOP\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        bp.write_all(b"56789)\r\nb OK done\r\n").await.unwrap();
        let stats = task.await.unwrap();
        assert_eq!(stats.end, RelayEnd::Shutdown);
        assert_eq!(stats.commands, 1);
        let mut rest = Vec::new();
        cp.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"56789)\r\nb OK done\r\n* BYE bye\r\n");
        let mut rest = Vec::new();
        bp.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"", "nothing after the FETCH");
    }

    #[tokio::test]
    async fn too_many_errors_close_the_session() {
        let (client, mut cp) = duplex(1 << 16);
        let (backend, mut bp) = duplex(1 << 16);
        // one error before login already: the next closes
        let u = Upstream::new(
            Limits {
                line: 1000,
                literal: 1000,
                append: 1000,
                non_sync: u64::MAX,
            },
            2,
            1,
        );
        let task =
            tokio::spawn(async move { relay(client, backend, u, b"", b"", timers(30)).await });
        cp.write_all(b"a NOOP\r\nb LOGIN x y\r\n").await.unwrap();
        assert_eq!(read_n(&mut bp, 8).await, "a NOOP\r\n");
        // the relay may be gone already
        let _ = bp.write_all(b"a OK noop\r\n").await;
        let stats = task.await.unwrap();
        assert_eq!(stats.end, RelayEnd::Refused);
        let mut rest = Vec::new();
        cp.read_to_end(&mut rest).await.unwrap();
        let rest = String::from_utf8(rest).unwrap();
        assert!(
            rest.ends_with("* BYE Too many errors, closing connection\r\n"),
            "{rest}"
        );
    }
}
