//! The one place that awaits for a POP3 session: it reads command lines, asks
//! the pure [`Session`] what to do, talks to the backend, writes replies, and
//! after login hands both connections to the [`pipe`](super::pipe).
//! Every wait has its own deadline; replies to pipelined commands are written
//! together, once no further command is buffered.
//!
//! The backend is contacted only at the first login command — except with
//! `apop: true`, where its greeting timestamp must be in ours, and at a CAPA
//! where login is allowed while its capabilities are still unknown (one probe
//! per process and backend; later connections refresh them). On a TLS-only
//! listener nothing at all reaches the backend before TLS.

use super::command;
use super::pipe::{self, PipeEnd};
use super::reply::{self, Reply};
use super::session::{Action, LoginOutcome, Session, Settings};
use super::transaction::Transaction;
use crate::action::PolicyAction;
use crate::backend::caps::Pop3Caps;
use crate::backend::pop3::{self as backend, Login, LoginReply, Pop3Backend};
use crate::backend::BackendError;
use crate::codec::{CodecError, Conn};
use crate::config::TlsMode;
use crate::policy::{Decision, Facts};
use crate::server::SessionCtx;
use crate::transport::ClientStream;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tracing::{debug, info, warn, Instrument};

/// How long writes to the client may take before the session is dropped.
const WRITE_DEADLINE: Duration = Duration::from_secs(60);

pub async fn run(tcp: TcpStream, peer: SocketAddr, ctx: SessionCtx) {
    let id = crate::session_id();
    let span = tracing::info_span!("pop3", id = %id, listener = %ctx.listener.name, peer = %peer);
    Driver::start(tcp, peer, ctx).instrument(span).await
}

enum End {
    Quit,
    ClientClosed,
    Timeout,
    Shutdown,
    LoginFailures,
    Pipe(PipeEnd),
    Error(String),
}

struct Driver {
    conn: Conn<ClientStream>,
    session: Session,
    ctx: SessionCtx,
    peer: SocketAddr,
    backend: Option<Pop3Backend>,
    /// Held while `backend` is the APOP greeting's connection and nobody
    /// has logged in: counts against `apop_max_pending`, until `early_until`.
    early_slot: Option<EarlySlot>,
    /// Greeting + `apop_prelogin_timeout`: absolute, so that free commands
    /// (NOOP, CAPA) cannot keep the early connection and its slot.
    early_until: tokio::time::Instant,
    /// The backend connection already carried a login attempt (it may have
    /// been closed by the backend since).
    backend_used: bool,
    probed: bool,
    tls: Option<String>,
    deadline: tokio::time::Instant,
    retr: u32,
    dele: u32,
}

impl Driver {
    async fn start(tcp: TcpStream, peer: SocketAddr, ctx: SessionCtx) {
        let l = ctx.listener.clone();
        let started = Instant::now();
        let mut stream = ClientStream::Plain(tcp);
        if l.tls == TlsMode::Implicit {
            let Some(cfg) = ctx.tls.clone() else {
                warn!("implicit TLS listener without TLS configuration");
                return;
            };
            match stream.into_tls(cfg, l.timeouts.tls_handshake).await {
                Ok(s) => {
                    stream = s;
                    let v = stream.tls_info().map(|i| i.version).unwrap_or_default();
                    crate::observe::metrics().tls_ok(&l.name, &v);
                }
                Err(e) => {
                    crate::observe::metrics().tls_failed(&l.name);
                    debug!(error = %e, "TLS handshake failed");
                    return;
                }
            }
        }
        let tls = stream.tls_info().map(|i| i.version);
        let _gauge = crate::observe::metrics::SessionGauge::new(
            &l.name,
            "pop3",
            if tls.is_some() { "implicit" } else { "none" },
        );
        // APOP: the digest the client computes covers the backend's timestamp,
        // so the backend must be reached before we greet — for at most
        // `apop_max_pending` sessions at once: beyond that the listener is
        // busy (-ERR [SYS/TEMP]), never silently without the APOP it offers
        let mut early_backend = None;
        let mut early_slot = None;
        if l.apop {
            let Some(slot) = EarlySlot::take(&l.name, l.apop_max_pending) else {
                crate::observe::metrics().refused(&l.name, "apop_max_pending");
                info!("APOP listener busy: apop_max_pending sessions wait for login");
                let mut conn = Conn::new(stream);
                reply::apop_busy().write_to(conn.output());
                let _ = conn.flush(Duration::from_secs(5)).await;
                return;
            };
            match Pop3Backend::connect(&l.backend, &l.timeouts.backend).await {
                Ok(b) => {
                    crate::observe::metrics()
                        .backend_connected(&l.backend.name, b.connect_time.as_secs_f64());
                    ctx.caps.set_pop3(&l.backend, b.caps.clone());
                    early_backend = Some(b);
                    early_slot = Some(slot);
                }
                // greet without a timestamp; a later login retries the backend
                Err(e) => warn!(error = %e, "backend (for the APOP timestamp)"),
            }
        }
        let timestamp = early_backend.as_ref().and_then(|b| b.timestamp.clone());
        let settings = Settings {
            hostname: l.hostname.clone(),
            starttls: l.tls == TlsMode::Starttls && ctx.tls.is_some(),
            require_tls: l.require_tls,
            apop: l.apop,
            max_errors: l.max_errors,
            max_login_failures: l.max_login_failures,
        };
        let mut d = Driver {
            conn: Conn::new(stream),
            session: Session::new(settings, tls.is_some(), timestamp),
            deadline: tokio::time::Instant::now() + l.timeouts.session,
            ctx,
            peer,
            backend: early_backend,
            early_slot,
            early_until: tokio::time::Instant::now() + l.apop_prelogin_timeout,
            backend_used: false,
            probed: false,
            tls,
            retr: 0,
            dele: 0,
        };
        let end = d.serve().await;
        crate::observe::metrics().bytes(&l.name, d.conn.bytes_in, d.conn.bytes_out);
        if let Some(b) = d.backend.take() {
            b.quit().await;
        }
        let outcome = match &end {
            End::Quit => "quit",
            End::ClientClosed => "client closed",
            End::Timeout => "timeout",
            End::Shutdown => "shutdown",
            End::LoginFailures => "too many login failures",
            End::Pipe(PipeEnd::BackendClosed) => "quit",
            End::Pipe(PipeEnd::ClientClosed) => "client closed",
            End::Pipe(PipeEnd::Idle) => "idle timeout",
            End::Pipe(PipeEnd::SessionLimit) => "session limit",
            End::Pipe(PipeEnd::TooManyErrors) => "too many errors",
            End::Pipe(PipeEnd::Error(e)) | End::Error(e) => e.as_str(),
        };
        // the user only; passwords and SASL payloads are never logged
        info!(
            user = d.session.last_user.as_deref().unwrap_or("-"),
            logged_in = d.session.logged_in,
            login_failures = d.session.failures,
            tls = d.tls.as_deref().unwrap_or("none"),
            retr = d.retr,
            dele = d.dele,
            bytes_in = d.conn.bytes_in,
            bytes_out = d.conn.bytes_out,
            duration_ms = started.elapsed().as_millis() as u64,
            outcome,
            "session end"
        );
    }

    fn queue(&mut self, r: &Reply) {
        r.write_to(self.conn.output());
    }

    async fn flush(&mut self) -> Result<(), End> {
        self.conn
            .flush(WRITE_DEADLINE)
            .await
            .map_err(|e| End::Error(format!("write: {e}")))
    }

    /// Next command line, or why the session ends. Honours shutdown (only while
    /// idle between commands) and the session lifetime.
    async fn next_line(&mut self) -> Result<Result<bytes::BytesMut, CodecError>, End> {
        let l = &self.ctx.listener;
        // RFC 2449 §4: 255 octets per command; a SASL response line may be
        // longer (RFC 5034 §4), up to the listener's `max_command_line`
        let max = if self.session.awaiting_sasl() {
            l.max_command_line
        } else {
            command::MAX_COMMAND_LINE
        };
        if self.backend.is_none() {
            self.early_slot = None;
        }
        let wait = if self.early_slot.is_some() {
            let left = self
                .early_until
                .saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                // the early connection and its slot go with the session
                self.queue(&reply::timeout());
                return Err(End::Timeout);
            }
            l.timeouts.command.min(left)
        } else {
            l.timeouts.command
        };
        match self
            .conn
            .next_command(max, wait, self.deadline, &self.ctx.shutdown)
            .await
        {
            Ok(line) => Ok(line),
            Err(crate::codec::Idle::SessionOver) => {
                self.queue(&reply::session_too_long());
                Err(End::Timeout)
            }
            Err(crate::codec::Idle::Shutdown) => {
                self.queue(&reply::shutting_down());
                Err(End::Shutdown)
            }
            Err(crate::codec::Idle::Write(e)) => Err(End::Error(format!("write: {e}"))),
        }
    }

    async fn serve(&mut self) -> End {
        let greeting = self.session.greeting();
        self.queue(&greeting);
        let end = self.serve_loop().await;
        // whatever was queued last (+OK bye, -ERR …) goes out before we close
        if !matches!(end, End::Pipe(_)) {
            let _ = self.conn.flush(Duration::from_secs(5)).await;
        }
        end
    }

    async fn serve_loop(&mut self) -> End {
        loop {
            let line = match self.next_line().await {
                Ok(l) => l,
                Err(end) => return end,
            };
            let action = match line {
                Ok(line) => {
                    if !self.session.awaiting_sasl() {
                        // the verb only: never arguments (passwords)
                        debug!(command = %verb_of(&line), "command");
                        crate::observe::metrics()
                            .command(&self.ctx.listener.name, command::metric_verb(&line));
                    }
                    self.session.line(&line)
                }
                Err(CodecError::TooLong(_)) => self.session.line_too_long(),
                Err(CodecError::Timeout) => {
                    self.queue(&reply::timeout());
                    return End::Timeout;
                }
                Err(CodecError::Closed) => return End::ClientClosed,
                Err(CodecError::Io(e)) => return End::Error(format!("read: {e}")),
            };
            if let Some(end) = self.act(action).await {
                return end;
            }
        }
    }

    async fn act(&mut self, mut action: Action) -> Option<End> {
        loop {
            match action {
                Action::Reply(r) => self.queue(&r),
                Action::Close(r) => {
                    self.queue(&r);
                    return Some(if r.is_ok() {
                        End::Quit
                    } else {
                        End::Error(r.summary())
                    });
                }
                Action::StartTls(r) => {
                    self.queue(&r);
                    if let Err(e) = self.flush().await {
                        return Some(e);
                    }
                    return self.start_tls().await;
                }
                Action::Capa { probe } => {
                    let caps = self.caps(probe).await;
                    let r = self.session.capa(caps.as_ref());
                    self.queue(&r);
                }
                Action::Login(login) => {
                    let outcome = self.login(&login).await;
                    if let LoginOutcome::Rejected(_) = &outcome {
                        debug!(user = login.user(), "login rejected by the backend");
                    }
                    action = self.session.login_result(outcome);
                    continue;
                }
                Action::LoginFailed { reply, close } => {
                    // slows down guessing; the reply is held back until then
                    tokio::time::sleep(self.ctx.listener.login_failure_delay).await;
                    self.queue(&reply);
                    if close {
                        return Some(End::LoginFailures);
                    }
                }
                Action::Pipe(r) => {
                    self.queue(&r);
                    if let Err(e) = self.flush().await {
                        return Some(e);
                    }
                    return Some(self.pipe().await);
                }
            }
            return None;
        }
    }

    async fn start_tls(&mut self) -> Option<End> {
        // RFC 2595 §4 / CVE-2011-0411: anything the client sent after STLS in
        // plaintext is forgotten, never read as a command inside TLS
        let dropped = self.conn.discard_buffered();
        if dropped > 0 {
            warn!(bytes = dropped, "discarded plaintext pipelined after STLS");
        }
        let Some(cfg) = self.ctx.tls.clone() else {
            return Some(End::Error("no TLS configuration".into()));
        };
        let plain = std::mem::replace(&mut self.conn.stream, ClientStream::Detached);
        match plain
            .into_tls(cfg, self.ctx.listener.timeouts.tls_handshake)
            .await
        {
            Ok(tls) => {
                self.tls = tls.tls_info().map(|i| i.version);
                crate::observe::metrics()
                    .tls_ok(&self.ctx.listener.name, self.tls.as_deref().unwrap_or(""));
                self.conn.stream = tls;
                self.session.tls_started();
                None
            }
            Err(e) => {
                crate::observe::metrics().tls_failed(&self.ctx.listener.name);
                Some(End::Error(format!("STLS handshake: {e}")))
            }
        }
    }

    /// The backend's capabilities for a CAPA answer: from this session's own
    /// backend connection, the cache, or (once, where allowed) a probe.
    async fn caps(&mut self, probe: bool) -> Option<Pop3Caps> {
        if let Some(b) = &self.backend {
            return Some(b.caps.clone());
        }
        let l = self.ctx.listener.clone();
        let cached = self.ctx.caps.pop3(&l.backend);
        if cached.is_some() || !probe || self.probed {
            return cached;
        }
        self.probed = true;
        let (caps, took) = backend::probe(&l.backend, &l.timeouts.backend).await?;
        crate::observe::metrics().backend_connected(&l.backend.name, took.as_secs_f64());
        self.ctx.caps.set_pop3(&l.backend, caps.clone());
        Some(caps)
    }

    /// Policy around the backend login: failed-login locks and login rates
    /// before it, failure / success bookkeeping after it (DESIGN §4).
    async fn login(&mut self, login: &Login) -> LoginOutcome {
        let policy = self.ctx.policy.clone();
        let l = self.ctx.listener.clone();
        let mut f = Facts::new(self.peer.ip(), &l.name);
        f.auth_user = Some(login.user());
        if let Some(p) = &policy {
            let checked = p.login_allowed(&f);
            for h in &checked.hits {
                crate::observe::metrics().policy_hit(&h.policy, &h.rule, h.shadow);
            }
            match checked.decision {
                Decision::Continue => {}
                Decision::Delay(d) => tokio::time::sleep(d).await,
                Decision::Refuse { action, rule } => {
                    info!(user = login.user(), rule = %rule, "login refused by policy");
                    return LoginOutcome::Refused {
                        temporary: action != PolicyAction::Reject,
                    };
                }
            }
        }
        let outcome = self.backend_login(login).await;
        if let Some(p) = &policy {
            match outcome {
                LoginOutcome::Accepted(_) => p.login_succeeded(&f),
                LoginOutcome::Rejected(_) => p.login_failed(&f),
                _ => {}
            }
        }
        outcome
    }

    async fn backend_login(&mut self, login: &Login) -> LoginOutcome {
        let l = self.ctx.listener.clone();
        // APOP's digest covers the timestamp of the connection we greeted
        // with: once that connection is gone, no other can carry it
        let apop = matches!(login, Login::Apop { .. });
        if apop && self.backend.is_none() {
            return LoginOutcome::Failed;
        }
        // a connection that already saw a failed login may have been closed by
        // the backend since: then one fresh connection is tried (not for APOP)
        let retry = self.backend.is_some() && self.backend_used;
        for attempt in 0..2 {
            if self.backend.is_none() {
                match Pop3Backend::connect(&l.backend, &l.timeouts.backend).await {
                    Ok(b) => self.connected(b),
                    Err(e) => return self.backend_error(e),
                }
            }
            let Some(b) = self.backend.as_mut() else {
                return LoginOutcome::Failed;
            };
            self.backend_used = true;
            match b.login(login).await {
                Ok(LoginReply::OutOfStep) => {
                    // never a login result: a fresh connection, else temporary
                    crate::observe::metrics().backend_failed(&l.backend.name);
                    self.backend = None;
                    if attempt == 0 && !apop {
                        continue;
                    }
                    return LoginOutcome::OutOfStep;
                }
                Ok(o) => return o.into(),
                Err(e) => {
                    if attempt == 0 && retry && !apop {
                        debug!(error = %e, "backend connection lost; reconnecting");
                        self.backend = None;
                        continue;
                    }
                    return self.backend_error(e);
                }
            }
        }
        LoginOutcome::Failed
    }

    /// Counts a new backend connection and caches what it announced.
    fn connected(&mut self, b: Pop3Backend) {
        let backend = &self.ctx.listener.backend;
        crate::observe::metrics().backend_connected(&backend.name, b.connect_time.as_secs_f64());
        self.ctx.caps.set_pop3(backend, b.caps.clone());
        self.backend = Some(b);
    }

    fn backend_error(&mut self, e: BackendError) -> LoginOutcome {
        warn!(error = %e, "backend");
        crate::observe::metrics().backend_failed(&self.ctx.listener.backend.name);
        self.backend = None;
        match e {
            BackendError::Unavailable(_) | BackendError::Identity(_) => LoginOutcome::Unavailable,
            BackendError::Failed(_) => LoginOutcome::Failed,
            BackendError::Protocol(_) | BackendError::OutOfStep(_) => LoginOutcome::Invalid,
        }
    }

    async fn pipe(&mut self) -> End {
        let Some(b) = self.backend.take() else {
            return End::Error("no backend connection".into());
        };
        // logged in: no longer a pre-login connection
        self.early_slot = None;
        let caps = b.caps.clone();
        let (tcp, from_backend) = b.into_parts();
        // commands pipelined behind the login belong to the backend now
        let to_backend = self.conn.take_buffered();
        let client = std::mem::replace(&mut self.conn.stream, ClientStream::Detached);
        let l = &self.ctx.listener;
        let tx = Transaction::new(caps, l.max_errors, self.session.errors());
        let stats = pipe::relay(
            client,
            tcp,
            tx,
            &to_backend,
            &from_backend,
            l.timeouts.idle,
            self.deadline,
            &reply::timeout().to_bytes(),
            &reply::session_too_long().to_bytes(),
        )
        .await;
        // the leftover was already counted when it was read from the client
        self.conn.bytes_in += stats.up - to_backend.len() as u64;
        self.conn.bytes_out += stats.down;
        self.retr = stats.retr;
        self.dele = stats.dele;
        match stats.end {
            PipeEnd::ClientClosed if stats.quit => End::Quit,
            other => End::Pipe(other),
        }
    }
}

/// One of an APOP listener's `apop_max_pending` pre-login backend
/// connections; released when dropped. Counted per listener name, so a
/// reload that changes the cap applies it to the sessions already counted.
struct EarlySlot(Arc<AtomicUsize>);

impl EarlySlot {
    fn take(listener: &str, max: usize) -> Option<EarlySlot> {
        static COUNTS: OnceLock<Mutex<HashMap<String, Arc<AtomicUsize>>>> = OnceLock::new();
        let counter = {
            let mut m = COUNTS
                .get_or_init(Default::default)
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            m.entry(listener.to_string()).or_default().clone()
        };
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| EarlySlot(counter))
    }
}

impl Drop for EarlySlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The first word of a command line, for logs (never its arguments).
fn verb_of(line: &[u8]) -> String {
    let end = line.iter().position(|b| *b == b' ').unwrap_or(line.len());
    String::from_utf8_lossy(&line[..end.min(8)]).into_owned()
}
