//! What every protocol's after-login relay (`pop3/pipe.rs`, `imap/relay.rs`)
//! shares: one activity clock for both directions and the watchdog over it
//! (idle time, session deadline), the gateway's shutdown signal, the writer
//! of mailgate's own queued answers between the backend's, and the last
//! words before the close.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

/// Writes of mailgate's own last words.
const GOODBYE: Duration = Duration::from_secs(5);

/// What ends a relay besides either side closing, and the last words for
/// each: the idle time, the session deadline and the gateway's shutdown.
pub struct Timers<'a> {
    pub idle: Duration,
    pub deadline: Instant,
    /// `SessionCtx::shutdown`: once it says so, the relay ends as soon as
    /// no command is outstanding (see [`shutdown_signalled`]).
    pub shutdown: watch::Receiver<bool>,
    /// Written on idle / on the deadline / at shutdown.
    pub idle_reply: &'a [u8],
    pub deadline_reply: &'a [u8],
    pub shutdown_reply: &'a [u8],
}

/// Resolves once the gateway shuts down, at once when it did so before the
/// relay started (the watch's current value). A sender gone counts as a
/// shutdown, as in the wait for the next command (`codec.rs`).
pub async fn shutdown_signalled(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// A shutdown signal that never comes (for the relays' unit tests): its
/// sender lives as long as the process.
#[cfg(test)]
pub fn no_shutdown() -> watch::Receiver<bool> {
    static NEVER: std::sync::OnceLock<watch::Sender<bool>> = std::sync::OnceLock::new();
    NEVER.get_or_init(|| watch::channel(false).0).subscribe()
}

/// The time of the last progress in either direction (both halves touch it).
pub struct Activity {
    start: Instant,
    /// Milliseconds since `start`.
    last: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }
}

/// Why the watchdog fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Nothing moved for the idle time.
    Idle,
    /// The session lifetime ran out.
    SessionLimit,
}

impl Activity {
    pub fn touch(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }

    /// Returns once nothing moved for `idle()` (asked anew at each wake, at
    /// least every `every`, so the protocol may change it — IMAP's IDLE),
    /// or at `deadline`.
    pub async fn watchdog(
        &self,
        idle: impl Fn() -> Duration,
        every: Duration,
        deadline: Instant,
    ) -> Expiry {
        loop {
            let idle = idle();
            let idle_at = self.last() + idle;
            let now = Instant::now();
            if now >= deadline {
                return Expiry::SessionLimit;
            }
            if now >= idle_at {
                return Expiry::Idle;
            }
            tokio::time::sleep_until(idle_at.min(deadline).min(now + every)).await;
        }
    }
}

/// Writes mailgate's own answers that are due now, as `next` hands them
/// out (bytes, and whether the session closes after them): `None` if there
/// were none, else `Some(close)`; a closing answer is flushed at once.
pub async fn write_queued<W: AsyncWrite + Unpin>(
    cw: &mut W,
    mut next: impl FnMut() -> Option<(Vec<u8>, bool)>,
    bytes_out: &mut u64,
) -> std::io::Result<Option<bool>> {
    let mut wrote = None;
    while let Some((bytes, close)) = next() {
        cw.write_all(&bytes).await?;
        *bytes_out += bytes.len() as u64;
        if close {
            cw.flush().await?;
            return Ok(Some(true));
        }
        wrote = Some(false);
    }
    Ok(wrote)
}

/// The client's half at the end: `words` (the idle or deadline answer)
/// when there are any, then the close, briefly.
pub async fn goodbye<W: AsyncWrite + Unpin>(cw: &mut W, words: Option<&[u8]>, bytes_out: &mut u64) {
    let _ = tokio::time::timeout(GOODBYE, async {
        if let Some(w) = words {
            if cw.write_all(w).await.is_ok() {
                *bytes_out += w.len() as u64;
            }
        }
        let _ = cw.shutdown().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn watchdog_follows_activity_and_a_changing_idle_time() {
        let a = Activity::default();
        let t = Instant::now();
        let far = t + Duration::from_secs(3600);
        assert_eq!(
            a.watchdog(|| Duration::from_secs(10), Duration::from_secs(10), far)
                .await,
            Expiry::Idle
        );
        assert_eq!(t.elapsed(), Duration::from_secs(10));
        a.touch();
        let idle = std::sync::atomic::AtomicU64::new(60);
        let w = a.watchdog(
            || Duration::from_secs(idle.load(Ordering::Relaxed)),
            Duration::from_secs(60),
            far,
        );
        tokio::pin!(w);
        // shortened while it sleeps: noticed at its next wake
        tokio::select! {
            _ = &mut w => panic!("too early"),
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        idle.store(1, Ordering::Relaxed);
        assert_eq!(w.await, Expiry::Idle);
        assert!(t.elapsed() <= Duration::from_secs(71));
        assert_eq!(
            a.watchdog(
                || Duration::from_secs(3600),
                Duration::from_secs(3600),
                t + Duration::from_secs(100)
            )
            .await,
            Expiry::SessionLimit
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_shutdown_is_seen_whenever_it_was_signalled() {
        let (tx, mut rx) = watch::channel(false);
        let wait = tokio::time::timeout(Duration::from_secs(1), shutdown_signalled(&mut rx));
        assert!(wait.await.is_err(), "no signal yet");
        tx.send(true).unwrap();
        // signalled before the wait starts: seen at once
        shutdown_signalled(&mut rx).await;
        shutdown_signalled(&mut tx.subscribe()).await;
        let mut never = no_shutdown();
        let wait = tokio::time::timeout(Duration::from_secs(1), shutdown_signalled(&mut never));
        assert!(wait.await.is_err());
    }

    #[tokio::test]
    async fn queued_answers_stop_at_a_closing_one() {
        let mut out = Vec::new();
        let mut q = vec![
            (b"c\r\n".to_vec(), false),
            (b"b\r\n".to_vec(), true),
            (b"a\r\n".to_vec(), false),
        ];
        let mut n = 0;
        assert_eq!(
            write_queued(&mut out, || q.pop(), &mut n).await.unwrap(),
            Some(true)
        );
        assert_eq!(out, b"a\r\nb\r\n");
        assert_eq!(n, 6);
        assert_eq!(
            write_queued(&mut out, || q.pop(), &mut n).await.unwrap(),
            Some(false)
        );
        assert_eq!(write_queued(&mut out, || None, &mut n).await.unwrap(), None);
    }
}
