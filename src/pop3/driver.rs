//! The one place that awaits for a POP3 session: it reads command lines
//! through the client-connection layer (`conn/client.rs`), asks the pure
//! [`Session`] what to do, talks to the backend, and after login hands both
//! connections to the [`pipe`](super::pipe). It decides no reply itself:
//! login outcomes and policy refusals go to the session (through the login
//! guard, `conn/login.rs`), whose [`Action`] it carries out.
//!
//! The backend is contacted only at the first login command — except with
//! `apop: true`, where its greeting timestamp must be in ours, and at a CAPA
//! where login is allowed while its capabilities are still unknown (one probe
//! per process and backend; later connections refresh them). On a TLS-only
//! listener nothing at all reaches the backend before TLS.

use super::command;
use super::pipe::{self, PipeEnd};
use super::session::{Action, LoginOutcome, LoginResult, Reply, Session, Settings};
use super::transaction::Transaction;
use crate::action::PolicyAction;
use crate::backend::caps::Pop3Caps;
use crate::backend::pop3::{self as backend, Login, LoginReply, Pop3Backend};
use crate::backend::{BackendError, ClientIdentity};
use crate::config::TlsMode;
use crate::conn::client::{session_end, Client, Line};
use crate::conn::login::{self, Login as LoginAttempt, Replayed};
use crate::conn::pipe::Timers;
use crate::conn::{End, Replies, SessionCtx};
use crate::policy::Facts;
use crate::transport::ClientStream;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use tokio::net::TcpStream;
use tracing::{debug, info, warn, Instrument};

pub async fn run(tcp: TcpStream, peer: SocketAddr, ctx: SessionCtx) {
    let id = crate::session_id();
    let span = tracing::info_span!("pop3", id = %id, listener = %ctx.listener().name, peer = %peer);
    Driver::start(tcp, peer, ctx).instrument(span).await
}

struct Driver {
    client: Client,
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
    retr: u32,
    dele: u32,
}

impl Driver {
    async fn start(tcp: TcpStream, peer: SocketAddr, ctx: SessionCtx) {
        let Some(mut client) = Box::pin(Client::accept(tcp, &ctx, "pop3")).await else {
            return;
        };
        let l = ctx.listener().clone();
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
                client.queue(&Session::apop_busy());
                client.close(&ctx, &End::Because("apop_max_pending")).await;
                return;
            };
            let id = client_identity(peer, &ctx);
            match Pop3Backend::connect(&l.backend, &l.timeouts.backend, Some(&id)).await {
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
            starttls: l.tls == TlsMode::Starttls && ctx.tls().is_some(),
            require_tls: l.require_tls,
            apop: l.apop,
            max_errors: l.max_errors,
            max_login_failures: l.max_login_failures,
        };
        let mut d = Driver {
            session: Session::new(settings, client.tls.is_some(), timestamp),
            client,
            ctx,
            peer,
            backend: early_backend,
            early_slot,
            early_until: tokio::time::Instant::now() + l.apop_prelogin_timeout,
            backend_used: false,
            probed: false,
            retr: 0,
            dele: 0,
        };
        let end = d.serve().await;
        d.client.close(&d.ctx, &end).await;
        if let Some(b) = d.backend.take() {
            b.quit().await;
        }
        // the user only; passwords and SASL payloads are never logged
        session_end!(
            d.client,
            end,
            user = d.session.last_user.as_deref().unwrap_or("-"),
            logged_in = d.session.logged_in,
            login_failures = d.session.failures,
            retr = d.retr,
            dele = d.dele,
        );
    }

    fn queue(&mut self, r: &Reply) {
        self.client.queue(r);
    }

    /// Next command line, or why the session ends (see `Client::next_line`).
    async fn next_line(&mut self) -> Result<Line, End> {
        let l = self.ctx.listener();
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
                let r = self.session.timed_out();
                self.queue(&r);
                return Err(End::Timeout);
            }
            l.timeouts.command.min(left)
        } else {
            l.timeouts.command
        };
        self.client
            .next_line(&self.session, &self.ctx, max, wait)
            .await
    }

    async fn serve(&mut self) -> End {
        let greeting = self.session.greeting();
        self.queue(&greeting);
        // whatever is queued last (+OK bye, -ERR …) goes out in `Client::close`
        self.serve_loop().await
    }

    async fn serve_loop(&mut self) -> End {
        loop {
            let line = match self.next_line().await {
                Ok(l) => l,
                Err(end) => return end,
            };
            let action = match line {
                Line::Command(line) => {
                    if !self.session.awaiting_sasl() {
                        // the verb only: never arguments (passwords)
                        debug!(command = %verb_of(&line), "command");
                        crate::observe::metrics()
                            .command(&self.ctx.listener().name, command::metric_verb(&line));
                    }
                    self.session.line(&line)
                }
                Line::TooLong => self.session.line_too_long(),
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
                Action::Close(r, ending) => {
                    self.queue(&r);
                    return Some(End::closing(&r, ending));
                }
                Action::StartTls(r) => {
                    return match self.client.start_tls(&r, &self.ctx, "STLS").await {
                        Ok(()) => {
                            self.session.tls_started();
                            None
                        }
                        Err(end) => Some(end),
                    };
                }
                Action::Capa { probe } => {
                    let caps = self.caps(probe).await;
                    let r = self.session.capa(caps.as_ref());
                    self.queue(&r);
                }
                Action::Login(login) => {
                    // policy, backend, bookkeeping, failure delay (`conn/login.rs`)
                    let policy = self.ctx.policy().cloned();
                    let delay = self.ctx.listener().login_failure_delay;
                    let mut attempt = Attempt {
                        driver: self,
                        login: &login,
                    };
                    action = login::guard(&mut attempt, policy.as_deref(), delay).await;
                    continue;
                }
                Action::Pipe(r) => {
                    self.queue(&r);
                    if let Err(e) = self.client.flush().await {
                        return Some(e);
                    }
                    return Some(self.pipe().await);
                }
            }
            return None;
        }
    }

    /// The backend's capabilities for a CAPA answer: from this session's own
    /// backend connection, the cache, or (once, where allowed) a probe.
    async fn caps(&mut self, probe: bool) -> Option<Pop3Caps> {
        if let Some(b) = &self.backend {
            return Some(b.caps.clone());
        }
        let l = self.ctx.listener().clone();
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

    async fn backend_login(&mut self, login: &Login) -> LoginOutcome {
        let l = self.ctx.listener().clone();
        // APOP's digest covers the timestamp of the connection we greeted
        // with: once that connection is gone, no other can carry it
        let apop = matches!(login, Login::Apop { .. });
        if apop && self.backend.is_none() {
            return LoginOutcome::Failed;
        }
        let mut replay = Replayer {
            backend: &l.backend,
            deadlines: &l.timeouts.backend,
            caps: &self.ctx.caps,
            id: client_identity(self.peer, &self.ctx),
            login,
        };
        let replayed = login::replay(
            &mut replay,
            &mut self.backend,
            &mut self.backend_used,
            !apop,
        )
        .await;
        match replayed {
            Replayed::Answer(r) => r.into(),
            Replayed::OutOfStep => LoginOutcome::OutOfStep,
            Replayed::Failed(e) => self.backend_error(e),
        }
    }

    fn backend_error(&mut self, e: BackendError) -> LoginOutcome {
        warn!(error = %e, "backend");
        crate::observe::metrics().backend_failed(&self.ctx.listener().backend.name);
        self.backend = None;
        match e {
            BackendError::Unavailable(_) | BackendError::Identity(_) => LoginOutcome::Unavailable,
            BackendError::Failed(_) | BackendError::TimedOut(_) => LoginOutcome::Failed,
            BackendError::Protocol(_) | BackendError::OutOfStep(_) | BackendError::Lacks(_) => {
                LoginOutcome::Invalid
            }
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
        let conn = &mut self.client.conn;
        let to_backend = conn.take_buffered();
        let client = std::mem::replace(&mut conn.stream, ClientStream::Detached);
        let l = self.ctx.listener();
        let tx = Transaction::new(caps, l.max_errors, self.session.errors());
        let stats = pipe::relay(
            client,
            tcp,
            tx,
            &to_backend,
            &from_backend,
            Timers {
                idle: l.timeouts.idle,
                deadline: self.client.deadline,
                shutdown: self.ctx.shutdown.clone(),
                idle_reply: &self.session.timed_out().to_bytes(),
                deadline_reply: &self.session.session_over().to_bytes(),
                shutdown_reply: &self.session.shutting_down().to_bytes(),
            },
        )
        .await;
        // the leftover was already counted when it was read from the client
        let conn = &mut self.client.conn;
        conn.bytes_in += stats.up - to_backend.len() as u64;
        conn.bytes_out += stats.down;
        self.retr = stats.retr;
        self.dele = stats.dele;
        match stats.end {
            PipeEnd::ClientClosed if stats.quit => End::Quit,
            PipeEnd::BackendClosed => End::Quit,
            PipeEnd::ClientClosed => End::ClientClosed,
            PipeEnd::Idle => End::Because("idle timeout"),
            PipeEnd::SessionLimit => End::Because("session limit"),
            PipeEnd::TooManyErrors => End::Because("too many errors"),
            PipeEnd::Shutdown => End::Shutdown,
            PipeEnd::Error(e) => End::Error(e),
        }
    }
}

/// The client as the backend's PROXY v2 header names it: `peer` is the
/// address after any PROXY header from a trusted proxy.
fn client_identity(peer: SocketAddr, ctx: &SessionCtx) -> ClientIdentity {
    ClientIdentity {
        peer,
        local: ctx.local,
        helo: None,
        esmtp: false,
    }
}

/// One login as the backend client replays it (`conn/login.rs`).
struct Replayer<'a> {
    backend: &'a crate::backend::Backend,
    deadlines: &'a crate::backend::Deadlines,
    caps: &'a crate::backend::caps::CapsCache,
    id: ClientIdentity,
    login: &'a Login,
}

impl login::Replay for Replayer<'_> {
    type Conn = Pop3Backend;
    type Answer = LoginReply;

    /// Counts a new backend connection and caches what it announced.
    async fn connect(&mut self) -> Result<Pop3Backend, BackendError> {
        let b = Pop3Backend::connect(self.backend, self.deadlines, Some(&self.id)).await?;
        crate::observe::metrics()
            .backend_connected(&self.backend.name, b.connect_time.as_secs_f64());
        self.caps.set_pop3(self.backend, b.caps.clone());
        Ok(b)
    }

    async fn login(&mut self, b: &mut Pop3Backend) -> Result<Option<LoginReply>, BackendError> {
        Ok(match b.login(self.login).await? {
            LoginReply::OutOfStep => {
                crate::observe::metrics().backend_failed(&self.backend.name);
                None
            }
            r => Some(r),
        })
    }
}

/// One login as the login guard runs it.
struct Attempt<'a> {
    driver: &'a mut Driver,
    login: &'a Login,
}

impl LoginAttempt for Attempt<'_> {
    type Action = Action;

    fn facts(&self) -> Facts<'_> {
        let mut f = Facts::new(self.driver.peer.ip(), &self.driver.ctx.listener().name);
        f.auth_user = Some(self.login.user());
        f
    }

    fn refused(&mut self, action: PolicyAction) -> LoginResult {
        self.driver.session.login_refused(action)
    }

    async fn attempt(&mut self) -> LoginResult {
        let outcome = self.driver.backend_login(self.login).await;
        if let LoginOutcome::Rejected(_) = &outcome {
            debug!(user = self.login.user(), "login rejected by the backend");
        }
        self.driver.session.login_result(outcome)
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
