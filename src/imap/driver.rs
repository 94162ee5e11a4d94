//! The one place that awaits for an IMAP session: it reads command lines
//! and literals through the client-connection layer (`conn/client.rs`),
//! assembles commands (`command::Assembler`, which bounds every literal
//! before it is read), asks the pure [`Session`] what to do — at each
//! literal's announcement too: `+`, or a refusal that drops the rest of the
//! command — talks to the backend, and after login hands both connections
//! to the [`relay`](super::relay). It decides no reply itself: login
//! outcomes and policy refusals go to the session (through the login
//! guard, `conn/login.rs`), whose [`Action`] it carries out.
//!
//! The backend is contacted only at the first login command, after TLS on a
//! TLS-only listener: CAPABILITY before login is mailgate's own.

use super::command::{self, Assembler, Next};
use super::relay::{self, RelayEnd};
use super::session::{Action, AtLiteral, LoginOutcome, LoginResult, Session, Settings};
use super::tracker::{Limits, Upstream};
use crate::action::PolicyAction;
use crate::backend::imap::{ImapBackend, ImapLogin, ImapLoginReply};
use crate::backend::{Backend, BackendError, ClientIdentity, Deadlines};
use crate::config::TlsMode;
use crate::conn::client::{session_end, Client, Line};
use crate::conn::login::{self, Login as LoginAttempt, Replayed};
use crate::conn::pipe::Timers;
use crate::conn::{End, Replies, SessionCtx};
use crate::policy::Facts;
use crate::transport::ClientStream;
use std::net::SocketAddr;
use tokio::net::TcpStream;
use tracing::{debug, warn, Instrument};

/// LITERAL- (RFC 7888 §5): non-synchronising literals up to this size.
const LITERAL_MINUS: u64 = 4096;

pub async fn run(tcp: TcpStream, peer: SocketAddr, ctx: SessionCtx) {
    let id = crate::session_id();
    let span = tracing::info_span!("imap", id = %id, listener = %ctx.listener().name, peer = %peer);
    Driver::start(tcp, peer, ctx).instrument(span).await
}

struct Driver {
    client: Client,
    session: Session,
    ctx: SessionCtx,
    peer: SocketAddr,
    assembler: Assembler,
    backend: Option<ImapBackend>,
    /// The backend connection already carried a login attempt (it may have
    /// been closed by the backend since).
    backend_used: bool,
    /// Commands relayed after login, for the log line.
    commands: u32,
}

impl Driver {
    async fn start(tcp: TcpStream, peer: SocketAddr, ctx: SessionCtx) {
        let Some(client) = Box::pin(Client::accept(tcp, &ctx, "imap")).await else {
            return;
        };
        let l = ctx.listener().clone();
        let settings = Settings {
            hostname: l.hostname.clone(),
            starttls: l.tls == TlsMode::Starttls && ctx.tls().is_some(),
            require_tls: l.require_tls,
            max_errors: l.max_errors,
            max_login_failures: l.max_login_failures,
        };
        let mut d = Driver {
            session: Session::new(settings, client.tls.is_some()),
            client,
            ctx,
            peer,
            assembler: Assembler::new(l.max_command_line),
            backend: None,
            backend_used: false,
            commands: 0,
        };
        let end = d.serve().await;
        d.client.close(&d.ctx, &end).await;
        if let Some(b) = d.backend.take() {
            b.logout().await;
        }
        // the user only; passwords and SASL payloads are never logged
        session_end!(
            d.client,
            end,
            user = d.session.last_user.as_deref().unwrap_or("-"),
            logged_in = d.session.logged_in,
            login_failures = d.session.failures,
            commands = d.commands,
        );
    }

    async fn serve(&mut self) -> End {
        let greeting = self.session.greeting();
        self.client.queue(&greeting);
        // whatever is queued last (BYE, a tagged NO …) goes out in `Client::close`
        loop {
            let action = match self.next_command().await {
                Ok(a) => a,
                Err(end) => return end,
            };
            if let Some(end) = self.act(action).await {
                return end;
            }
        }
    }

    /// Reads one whole command — its lines and literals, with `+` before
    /// each synchronising one — or a SASL response line, and returns the
    /// session's answer.
    async fn next_command(&mut self) -> Result<Action, End> {
        let l = self.ctx.listener().clone();
        loop {
            let max = if self.session.awaiting_sasl() {
                l.max_command_line
            } else {
                self.assembler.room()
            };
            let line = self
                .client
                .next_line(&self.session, &self.ctx, max, l.timeouts.command)
                .await?;
            let line = match line {
                Line::Command(line) => line,
                Line::TooLong => {
                    self.assembler.reset();
                    return Ok(self.session.line_too_long());
                }
            };
            if self.session.awaiting_sasl() {
                return Ok(self.session.command(&line));
            }
            match self.assembler.line(&line) {
                Next::Complete(cmd) => {
                    count_command(&cmd, &l.name);
                    return Ok(self.session.command(&cmd));
                }
                Next::TooBig { tag, sync } => {
                    return Ok(self.session.literal_too_large(tag.as_deref(), sync));
                }
                Next::Literal(lit) => match self.session.literal(self.assembler.head(), lit) {
                    AtLiteral::Read(go) => {
                        if let Some(go) = go {
                            self.client.queue(&go);
                            self.client.flush().await?;
                        }
                        self.read_literal(lit.size).await?;
                    }
                    // answered before a byte of the literal (a password) is read
                    AtLiteral::Refuse(action) => {
                        count_command(self.assembler.head(), &l.name);
                        let skip = self.assembler.refuse(lit);
                        if skip > 0 && !matches!(action, Action::Close(..)) {
                            self.read_literal(skip).await?;
                        }
                        return Ok(action);
                    }
                },
                Next::Skip(n) => self.read_literal(n).await?,
                Next::Dropped => {}
            }
        }
    }

    /// Reads the `size` octets of a literal into the assembler (which
    /// drops them for a command answered already).
    async fn read_literal(&mut self, size: u64) -> Result<(), End> {
        // within the assembler's budget, so within memory
        let n = usize::try_from(size).unwrap_or(usize::MAX);
        let wait = self.ctx.listener().timeouts.command;
        let data = self.client.take(&self.session, n, wait).await?;
        self.assembler.literal(&data);
        Ok(())
    }

    async fn act(&mut self, mut action: Action) -> Option<End> {
        loop {
            match action {
                Action::Reply(r) => self.client.queue(&r),
                Action::Close(r, ending) => {
                    self.client.queue(&r);
                    return Some(End::closing(&r, ending));
                }
                Action::StartTls(r) => {
                    self.assembler.reset();
                    return match self.client.start_tls(&r, &self.ctx, "STARTTLS").await {
                        Ok(()) => {
                            self.session.tls_started();
                            None
                        }
                        Err(end) => Some(end),
                    };
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
                Action::Relay(r) => {
                    self.client.queue(&r);
                    if let Err(e) = self.client.flush().await {
                        return Some(e);
                    }
                    return Some(self.relay().await);
                }
            }
            return None;
        }
    }

    async fn backend_login(&mut self, login: &ImapLogin) -> LoginOutcome {
        let l = self.ctx.listener().clone();
        let mut replay = Replayer {
            backend: &l.backend,
            deadlines: &l.timeouts.backend,
            id: ClientIdentity {
                peer: self.peer,
                local: self.ctx.local,
                helo: None,
                esmtp: false,
            },
            login,
        };
        let replayed =
            login::replay(&mut replay, &mut self.backend, &mut self.backend_used, true).await;
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

    async fn relay(&mut self) -> End {
        let Some(b) = self.backend.take() else {
            return End::Error("no backend connection".into());
        };
        let caps = b.caps.clone();
        let (stream, from_backend) = b.into_parts();
        // commands pipelined behind the login belong to the backend now
        let conn = &mut self.client.conn;
        let to_backend = conn.take_buffered();
        let client = std::mem::replace(&mut conn.stream, ClientStream::Detached);
        let l = self.ctx.listener();
        let limits = Limits {
            line: l.max_command_line,
            literal: l.max_command_line as u64,
            append: l.max_message_size,
            non_sync: if caps.literal_plus {
                u64::MAX
            } else if caps.literal_minus {
                LITERAL_MINUS
            } else {
                0
            },
        };
        let up = Upstream::new(limits, l.max_errors, self.session.errors());
        let (idle_reply, deadline_reply, shutdown_reply) = (
            self.session.timed_out().to_bytes(),
            self.session.session_over().to_bytes(),
            self.session.shutting_down().to_bytes(),
        );
        let stats = relay::relay(
            client,
            stream,
            up,
            &to_backend,
            &from_backend,
            Timers {
                idle: l.timeouts.idle,
                deadline: self.client.deadline,
                shutdown: self.ctx.shutdown.clone(),
                idle_reply: &idle_reply,
                deadline_reply: &deadline_reply,
                shutdown_reply: &shutdown_reply,
            },
        )
        .await;
        // the leftover was already counted when it was read from the client
        let conn = &mut self.client.conn;
        conn.bytes_in += stats.up - to_backend.len() as u64;
        conn.bytes_out += stats.down;
        self.commands = stats.commands;
        match stats.end {
            RelayEnd::ClientClosed if stats.logout => End::Quit,
            RelayEnd::BackendClosed if stats.logout => End::Quit,
            RelayEnd::BackendClosed => End::Because("backend closed"),
            RelayEnd::ClientClosed => End::ClientClosed,
            RelayEnd::Idle => End::Because("idle timeout"),
            RelayEnd::SessionLimit => End::Because("session limit"),
            RelayEnd::Refused => End::Because("closed by mailgate"),
            RelayEnd::Shutdown => End::Shutdown,
            RelayEnd::Error(e) => End::Error(e),
        }
    }
}

/// Logs and counts a command by its verb only: never its arguments (passwords).
fn count_command(cmd: &[u8], listener: &str) {
    if let Some((_, verb)) = command::tag_and_verb(cmd) {
        debug!(command = %verb, "command");
        crate::observe::metrics().command(listener, command::metric_verb(&verb));
    }
}

/// One login as the backend client replays it (`conn/login.rs`).
struct Replayer<'a> {
    backend: &'a Backend,
    deadlines: &'a Deadlines,
    id: ClientIdentity,
    login: &'a ImapLogin,
}

impl login::Replay for Replayer<'_> {
    type Conn = ImapBackend;
    type Answer = ImapLoginReply;

    async fn connect(&mut self) -> Result<ImapBackend, BackendError> {
        let b = ImapBackend::connect(self.backend, self.deadlines, Some(&self.id)).await?;
        crate::observe::metrics()
            .backend_connected(&self.backend.name, b.connect_time.as_secs_f64());
        Ok(b)
    }

    async fn login(&mut self, b: &mut ImapBackend) -> Result<Option<ImapLoginReply>, BackendError> {
        Ok(match b.login(self.login).await? {
            ImapLoginReply::OutOfStep => {
                crate::observe::metrics().backend_out_of_step(&self.backend.name);
                None
            }
            r => Some(r),
        })
    }
}

/// One login as the login guard runs it.
struct Attempt<'a> {
    driver: &'a mut Driver,
    login: &'a ImapLogin,
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
