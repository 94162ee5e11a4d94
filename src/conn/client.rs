//! The client side of one session, for every protocol: implicit TLS at
//! accept, the session gauge, STARTTLS/STLS with the discard of plaintext
//! pipelined behind it (CVE-2011-0411: here and nowhere else), queued
//! replies written together, the wait for the next command (idle buffer
//! release, shutdown only while idle, the session lifetime, the per-command
//! timeout) and the session-end log. Which reply ends a wait is the
//! session's choice ([`Replies`]); this file only writes it.

use super::{End, Replies, SessionCtx, Wire};
use crate::codec::{CodecError, Conn, Idle};
use crate::config::TlsMode;
use crate::observe::metrics::SessionGauge;
use crate::transport::{ClientStream, TlsInfo};
use bytes::BytesMut;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, warn};

/// How long writes to the client may take before the session is dropped.
const WRITE_DEADLINE: Duration = crate::codec::WRITE_DEADLINE;
/// How long the last reply (a 221, a -ERR …) may take to go out at the end.
const LAST_WORDS: Duration = Duration::from_secs(5);

/// One client connection and what the layer knows about it.
pub struct Client {
    pub conn: Conn<ClientStream>,
    /// The TLS layer, once there is one (implicit, or after STARTTLS/STLS).
    pub tls: Option<TlsInfo>,
    /// The end of the session's lifetime (`timeouts.session`).
    pub deadline: Instant,
    started: std::time::Instant,
    _gauge: SessionGauge,
}

/// A line the client sent, or one that was over the limit (consumed, for
/// the session to answer).
#[derive(Debug)]
pub enum Line {
    Command(BytesMut),
    TooLong,
}

impl Client {
    /// The accepted connection: on an implicit-TLS listener after the
    /// handshake (under `timeouts.tls_handshake`); `None` when that failed
    /// (counted, nothing to answer). `protocol` labels the session gauge.
    pub async fn accept(tcp: TcpStream, ctx: &SessionCtx, protocol: &'static str) -> Option<Self> {
        let l = ctx.listener();
        let started = std::time::Instant::now();
        let mut stream = ClientStream::Plain(tcp);
        if l.tls == TlsMode::Implicit {
            let Some(cfg) = ctx.tls().cloned() else {
                warn!("implicit TLS listener without TLS configuration");
                return None;
            };
            // boxed, like the STARTTLS handshake: the handshake's state
            // (a whole rustls connection) lives only while it runs, not in
            // every session's task for its whole life
            match Box::pin(stream.into_tls(cfg, l.timeouts.tls_handshake)).await {
                Ok(s) => stream = s,
                Err(e) => {
                    crate::observe::metrics().tls_failed(&l.name);
                    debug!(error = %e, "TLS handshake failed");
                    return None;
                }
            }
        }
        let tls = stream.tls_info();
        if let Some(t) = &tls {
            crate::observe::metrics().tls_ok(&l.name, &t.version);
        }
        let tls_label = if tls.is_some() { "implicit" } else { "none" };
        Some(Client {
            conn: Conn::new(stream),
            tls,
            deadline: Instant::now() + l.timeouts.session,
            started,
            _gauge: SessionGauge::new(&l.name, protocol, tls_label),
        })
    }

    /// Queues a reply; it goes out with the next flush (or before the next wait).
    pub fn queue(&mut self, r: &impl Wire) {
        r.write_to(self.conn.output());
    }

    /// Writes what is queued now (before a handshake, a pipe, a long wait).
    pub async fn flush(&mut self) -> Result<(), End> {
        self.conn
            .flush(WRITE_DEADLINE)
            .await
            .map_err(|e| End::Error(format!("write: {e}")))
    }

    /// The next command line of at most `max` octets, or why the session
    /// ends. Pipelined lines are taken at once; otherwise queued replies go
    /// out and the read waits up to `wait` (and the session lifetime), giving
    /// way to a shutdown. A timeout, the lifetime or a shutdown queue the
    /// session's reply for it.
    pub async fn next_line(
        &mut self,
        session: &impl Replies,
        ctx: &SessionCtx,
        max: usize,
        wait: Duration,
    ) -> Result<Line, End> {
        let line = match self
            .conn
            .next_command(max, wait, self.deadline, &ctx.shutdown)
            .await
        {
            Ok(line) => line,
            Err(Idle::SessionOver) => {
                self.queue(&session.session_over());
                return Err(End::Timeout);
            }
            Err(Idle::Shutdown) => {
                self.queue(&session.shutting_down());
                return Err(End::Shutdown);
            }
            Err(Idle::Write(e)) => return Err(End::Error(format!("write: {e}"))),
        };
        match line {
            Ok(line) => Ok(Line::Command(line)),
            Err(CodecError::TooLong(_)) => Ok(Line::TooLong),
            Err(CodecError::Timeout) => {
                self.queue(&session.timed_out());
                Err(End::Timeout)
            }
            Err(CodecError::Closed) => Err(End::ClientClosed),
            Err(CodecError::Io(e)) => Err(End::Error(format!("read: {e}"))),
        }
    }

    /// Reads more of a payload the protocol takes in bulk (a message after
    /// DATA): up to `per_read` for the next bytes, and never past the session
    /// lifetime (a trickle would otherwise never end). A shutdown does not
    /// interrupt it: the read is bounded by its own deadline.
    pub async fn fill(&mut self, session: &impl Replies, per_read: Duration) -> Result<(), End> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(per_read.min(left), self.conn.fill()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(CodecError::Closed)) => Err(End::ClientClosed),
            Ok(Err(e)) => Err(End::Error(format!("read: {e}"))),
            Err(_) if per_read > left => {
                self.queue(&session.session_over());
                Err(End::Timeout)
            }
            Err(_) => {
                self.queue(&session.timed_out());
                Err(End::Timeout)
            }
        }
    }

    /// The next `n` octets the client sends, whatever they hold (an IMAP
    /// literal, whose size the protocol checked before asking): each read
    /// waits up to `per_read`, never past the session lifetime.
    pub async fn take(
        &mut self,
        session: &impl Replies,
        n: usize,
        per_read: Duration,
    ) -> Result<BytesMut, End> {
        while self.conn.buffered() < n {
            self.fill(session, per_read).await?;
        }
        Ok(self.conn.rbuf_mut().split_to(n))
    }

    /// STARTTLS / STLS (`command` names it in logs): the session's go-ahead
    /// `ready` is written, everything the client sent behind the command in
    /// plaintext is forgotten — never read as a command inside TLS
    /// (CVE-2011-0411, RFC 3207 §4.2, RFC 2595 §4) — and the handshake runs
    /// under `timeouts.tls_handshake`. The session must then forget its own
    /// pre-TLS state (`tls_started`).
    pub async fn start_tls(
        &mut self,
        ready: &impl Wire,
        ctx: &SessionCtx,
        command: &'static str,
    ) -> Result<(), End> {
        self.queue(ready);
        self.flush().await?;
        let dropped = self.conn.discard_buffered();
        if dropped > 0 {
            warn!(
                bytes = dropped,
                "discarded plaintext pipelined after {command}"
            );
        }
        let l = ctx.listener();
        let Some(cfg) = ctx.tls().cloned() else {
            return Err(End::Error("no TLS configuration".into()));
        };
        let plain = std::mem::replace(&mut self.conn.stream, ClientStream::Detached);
        match Box::pin(plain.into_tls(cfg, l.timeouts.tls_handshake)).await {
            Ok(tls) => {
                self.tls = tls.tls_info();
                self.conn.stream = tls;
                crate::observe::metrics().tls_ok(&l.name, self.tls_version());
                Ok(())
            }
            Err(e) => {
                crate::observe::metrics().tls_failed(&l.name);
                Err(End::Error(format!("{command} handshake: {e}")))
            }
        }
    }

    /// The session is over (`end`): whatever was queued last goes out
    /// (briefly), and the bytes and the end are counted. The driver then
    /// logs [`session_end!`].
    pub async fn close(&mut self, ctx: &SessionCtx, end: &End) {
        let _ = self.conn.flush(LAST_WORDS).await;
        let m = crate::observe::metrics();
        let listener = &ctx.listener().name;
        m.bytes(listener, self.conn.bytes_in, self.conn.bytes_out);
        m.session_end(listener, end.label());
    }

    /// The TLS version in use, `none` in plaintext (for logs).
    pub fn tls_version(&self) -> &str {
        self.tls.as_ref().map_or("none", |t| t.version.as_str())
    }

    /// Milliseconds since accept (for logs).
    pub fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

/// The session-end log line: the protocol's own fields first, then what
/// every protocol logs (tls, bytes, duration, outcome). Passwords and SASL
/// payloads are never among the fields.
macro_rules! session_end {
    ($client:expr, $end:expr, $($field:ident = $value:expr),* $(,)?) => {{
        let c: &$crate::conn::client::Client = &$client;
        let end: &$crate::conn::End = &$end;
        tracing::info!(
            $($field = $value,)*
            tls = c.tls_version(),
            bytes_in = c.conn.bytes_in,
            bytes_out = c.conn.bytes_out,
            duration_ms = c.elapsed_ms(),
            outcome = end.as_str(),
            "session end"
        )
    }};
}
pub(crate) use session_end;
