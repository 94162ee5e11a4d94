//! The TRANSACTION state: after a successful login the client and backend
//! connections are joined byte for byte (multi-line answers, dot-stuffing and
//! 8-bit data pass unchanged). Part of the driver's I/O; generic over the
//! streams so it is tested with in-memory pipes.
//!
//! Each direction runs on its own so a pipelining client and a streaming
//! backend never wait on each other; one idle timer covers both (any progress
//! in either direction resets it), plus the session's absolute deadline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

/// How long the backend may take to finish its answers after the client
/// half-closed (e.g. QUIT then EOF).
const DRAIN: Duration = Duration::from_secs(5);
/// Writes of mailgate's own last words.
const GOODBYE: Duration = Duration::from_secs(5);

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
    Error(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipeStats {
    /// Bytes from the client (including the leftover handed in).
    pub up: u64,
    /// Bytes to the client.
    pub down: u64,
    /// RETR / DELE / QUIT command lines seen from the client.
    pub retr: u32,
    pub dele: u32,
    pub quit: bool,
    pub end: PipeEnd,
}

/// Counts command verbs at line starts in the client's byte stream: cheap,
/// and enough for the session log line (commands sent, not their success).
#[derive(Default)]
struct Scanner {
    head: [u8; 5],
    len: usize,
    retr: u32,
    dele: u32,
    quit: bool,
}

impl Scanner {
    fn feed(&mut self, data: &[u8]) {
        for &b in data {
            if b == b'\n' {
                if self.len == 4 && &self.head[..4] == b"QUIT" {
                    self.quit = true;
                }
                self.len = 0;
                continue;
            }
            if b == b'\r' || self.len >= 5 {
                continue;
            }
            self.head[self.len] = b.to_ascii_uppercase();
            self.len += 1;
            if self.len == 5 {
                match &self.head {
                    b"RETR " => self.retr += 1,
                    b"DELE " => self.dele += 1,
                    _ => {}
                }
            }
        }
    }
}

/// Pipes until one side closes, the idle time passes without progress, or
/// `deadline`. `to_backend` / `to_client` are bytes already read from the
/// other side (pipelined commands, early backend output) and go first.
/// On idle / deadline the client gets `idle_reply` / `deadline_reply`.
#[allow(clippy::too_many_arguments)]
pub async fn relay<C, B>(
    client: C,
    backend: B,
    to_backend: &[u8],
    to_client: &[u8],
    idle: Duration,
    deadline: Instant,
    idle_reply: &[u8],
    deadline_reply: &[u8],
) -> PipeStats
where
    C: AsyncRead + AsyncWrite + Send,
    B: AsyncRead + AsyncWrite + Send,
{
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut br, mut bw) = tokio::io::split(backend);
    let start = Instant::now();
    // milliseconds since `start` of the last progress in either direction
    let activity = AtomicU64::new(0);
    let touch = || {
        activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    };
    let mut scanner = Scanner::default();
    let mut up_bytes = to_backend.len() as u64;
    let mut down_bytes = 0u64;
    scanner.feed(to_backend);

    let end = {
        let up = async {
            if !to_backend.is_empty() {
                bw.write_all(to_backend).await?;
                bw.flush().await?;
            }
            let mut buf = vec![0u8; 4096];
            loop {
                let n = cr.read(&mut buf).await?;
                if n == 0 {
                    // let the backend see EOF (it ends the session without UPDATE
                    // unless QUIT came first, RFC 1939 §6)
                    let _ = bw.shutdown().await;
                    return Ok::<(), std::io::Error>(());
                }
                touch();
                up_bytes += n as u64;
                scanner.feed(&buf[..n]);
                bw.write_all(&buf[..n]).await?;
                bw.flush().await?;
                touch();
            }
        };
        let down = async {
            if !to_client.is_empty() {
                cw.write_all(to_client).await?;
                cw.flush().await?;
                down_bytes += to_client.len() as u64;
            }
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = br.read(&mut buf).await?;
                if n == 0 {
                    return Ok::<(), std::io::Error>(());
                }
                touch();
                cw.write_all(&buf[..n]).await?;
                // TLS buffers records until flushed
                cw.flush().await?;
                down_bytes += n as u64;
                touch();
            }
        };
        let watchdog = async {
            loop {
                let last = Duration::from_millis(activity.load(Ordering::Relaxed));
                let idle_at = start + last + idle;
                let now = Instant::now();
                if now >= deadline {
                    return PipeEnd::SessionLimit;
                }
                if now >= idle_at {
                    return PipeEnd::Idle;
                }
                tokio::time::sleep_until(idle_at.min(deadline)).await;
            }
        };
        tokio::pin!(up, down, watchdog);
        tokio::select! {
            r = &mut up => match r {
                Ok(()) => {
                    // the backend's last answers (QUIT's +OK) still go out
                    tokio::select! {
                        _ = &mut down => {}
                        _ = tokio::time::sleep(DRAIN) => {}
                    }
                    PipeEnd::ClientClosed
                }
                Err(e) => PipeEnd::Error(format!("client→backend: {e}")),
            },
            r = &mut down => match r {
                Ok(()) => PipeEnd::BackendClosed,
                Err(e) => PipeEnd::Error(format!("backend→client: {e}")),
            },
            e = &mut watchdog => e,
        }
    };
    let last_words = match end {
        PipeEnd::Idle => Some(idle_reply),
        PipeEnd::SessionLimit => Some(deadline_reply),
        _ => None,
    };
    let _ = tokio::time::timeout(GOODBYE, async {
        if let Some(w) = last_words {
            if cw.write_all(w).await.is_ok() {
                down_bytes += w.len() as u64;
            }
        }
        let _ = cw.shutdown().await;
    })
    .await;
    PipeStats {
        up: up_bytes,
        down: down_bytes,
        retr: scanner.retr,
        dele: scanner.dele,
        quit: scanner.quit,
        end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[test]
    fn scanner_counts_verbs() {
        let mut s = Scanner::default();
        s.feed(b"STAT\r\nRETR 1\r\nre");
        s.feed(b"tr 2\r\nDELE 1\r\nRETRX\r\nLIST\r\nTOP 1 0\r\nQUI");
        s.feed(b"T\r\n");
        assert_eq!((s.retr, s.dele, s.quit), (2, 1, true));
    }

    #[tokio::test]
    async fn bytes_pass_unchanged_and_leftovers_go_first() {
        let (client, mut client_peer) = duplex(1 << 16);
        let (backend, mut backend_peer) = duplex(1 << 16);
        let task = tokio::spawn(async move {
            relay(
                client,
                backend,
                b"RETR 1\r\n",
                b"",
                Duration::from_secs(30),
                Instant::now() + Duration::from_secs(60),
                b"-ERR idle\r\n",
                b"-ERR limit\r\n",
            )
            .await
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

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_tells_the_client() {
        let (client, mut client_peer) = duplex(1 << 16);
        let (backend, _backend_peer) = duplex(1 << 16);
        let stats = relay(
            client,
            backend,
            b"",
            b"+OK early\r\n",
            Duration::from_secs(30),
            Instant::now() + Duration::from_secs(3600),
            b"-ERR idle\r\n",
            b"-ERR limit\r\n",
        )
        .await;
        assert_eq!(stats.end, PipeEnd::Idle);
        let mut rest = Vec::new();
        client_peer.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"+OK early\r\n-ERR idle\r\n");
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
        let stats = relay(
            client,
            backend,
            b"",
            b"",
            Duration::from_secs(30),
            Instant::now() + Duration::from_secs(100),
            b"-ERR idle\r\n",
            b"-ERR limit\r\n",
        )
        .await;
        assert_eq!(stats.end, PipeEnd::SessionLimit);
        feeder.abort();
    }
}
