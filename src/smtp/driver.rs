//! The one place that awaits for an SMTP session: it reads commands, asks the
//! pure [`Session`] what to do, talks to the backend, and writes replies. It
//! decides no reply itself: policy decisions, authentication verdicts, login
//! and backend outcomes go to the session, whose [`Action`] it carries out.
//! Every wait has its own deadline; replies to pipelined commands are written
//! together, once no further command is buffered.

use super::command;
use super::data::{self, DataReceiver, Feed};
use super::session::{
    recipient_refused, Action, BackendOp, Checked, Credentials, DataEnd, LoginResult, Outcome,
    Reply, Session, Settings, TxOutcome,
};
use crate::action::PolicyAction;
use crate::auth::Verdict as AuthVerdict;
use crate::backend::smtp::{BackendReply, SmtpBackend};
use crate::backend::BackendError;
use crate::config::TlsMode;
use crate::conn::client::{session_end, Client, Line};
use crate::conn::inflight::Reservation;
use crate::conn::login::{self, Login, Replayed};
use crate::conn::{End, SessionCtx};
use crate::policy::{Decision, Facts, PolicyStage};
use std::net::SocketAddr;
use std::time::Instant;
use tokio::net::TcpStream;
use tracing::{debug, info, warn, Instrument};

pub async fn run(tcp: TcpStream, peer: SocketAddr, ctx: SessionCtx) {
    let id = crate::session_id();
    let span = tracing::info_span!("smtp", id = %id, listener = %ctx.listener().name, peer = %peer);
    Driver::start(tcp, peer, ctx, id).instrument(span).await
}

/// A message read in DATA, on its way through the checks to the backend.
struct Message {
    from: String,
    rcpts: Vec<String>,
    body: Vec<u8>,
    /// Octets the client sent for it (for the log).
    received: u64,
    /// Held until the backend has answered: the body lives until then.
    _reservation: Option<Reservation>,
    started: Instant,
}

struct Driver {
    client: Client,
    session: Session,
    ctx: SessionCtx,
    peer: SocketAddr,
    id: String,
    backend: Option<SmtpBackend>,
    /// The backend connection carried a command before (in this session,
    /// or, taken from the pool, in an earlier one): see [`Driver::opening`].
    backend_used: bool,
    /// The connection was taken from the pool and has not answered yet
    /// (`backend_reused_total` counts only connections that served).
    reuse_pending: bool,
    /// The session was counted in `backend_reused_total` (once: a session
    /// that loses its taken connection may take another).
    reuse_counted: bool,
    messages: u32,
    /// SPF result of the current transaction (for DMARC and the A-R header);
    /// boxed, as it is there only between MAIL and the end of DATA.
    spf: Option<Box<crate::auth::SpfOutcome>>,
    /// DNS queries of this session's checks.
    dns_budget: crate::auth::DnsBudget,
}

impl Driver {
    async fn start(tcp: TcpStream, peer: SocketAddr, ctx: SessionCtx, id: String) {
        // the opening (an implicit TLS handshake) and the closing (QUIT to
        // the backend, the log line) are boxed: they run once, and the task
        // of a session waiting for its next command keeps only `serve`'s
        // state (tests/session_memory.rs)
        let Some(mut d) = Box::pin(Driver::open(tcp, peer, ctx, id)).await else {
            return;
        };
        let end = d.serve().await;
        Box::pin(d.close(end)).await
    }

    async fn open(tcp: TcpStream, peer: SocketAddr, ctx: SessionCtx, id: String) -> Option<Self> {
        let client = Client::accept(tcp, &ctx, "smtp").await?;
        let l = ctx.listener().clone();
        let caps = ctx.caps.smtp(&l.backend);
        let settings = Settings {
            hostname: l.hostname.clone(),
            starttls: l.tls == TlsMode::Starttls && ctx.tls().is_some(),
            require_tls: l.require_tls,
            max_message_size: l.max_message_size,
            max_recipients: l.max_recipients,
            max_errors: l.max_errors,
            auth: l.auth,
            max_login_failures: l.max_login_failures,
            max_transactions: l.max_transactions,
        };
        Some(Driver {
            session: Session::new(settings, caps, client.tls.is_some()),
            client,
            ctx,
            peer,
            id,
            backend: None,
            backend_used: false,
            reuse_pending: false,
            reuse_counted: false,
            messages: 0,
            spf: None,
            dns_budget: crate::auth::DnsBudget::new(),
        })
    }

    async fn close(mut self, end: End) {
        self.client.close(&self.ctx, &end).await;
        self.release_backend().await;
        session_end!(
            self.client,
            end,
            helo = self.session.helo.as_deref().unwrap_or("-"),
            messages = self.messages,
        );
    }

    fn queue(&mut self, r: &Reply) {
        self.client.queue(r);
    }

    /// Next command line, or why the session ends (see `Client::next_line`).
    async fn next_line(&mut self) -> Result<Line, End> {
        let l = self.ctx.listener();
        // AUTH responses may be longer than commands (RFC 4954 §4: 12288)
        let max = if self.session.awaiting_auth_line() {
            l.max_command_line.max(12288)
        } else {
            l.max_command_line
        };
        let wait = l.timeouts.command;
        self.client
            .next_line(&self.session, &self.ctx, max, wait)
            .await
    }

    async fn serve(&mut self) -> End {
        if let Some(t) = self.ctx.triage().cloned() {
            // boxed: it runs once, before the greeting (tests/session_memory.rs)
            let triaged = match Box::pin(self.triage(&t)).await {
                Ok(x) => x,
                Err(end) => return end,
            };
            let held = t.spec.pregreet.is_some();
            let ip = self.peer.ip();
            if let (Some(for_), Some(p)) = (triaged.ban_for, self.ctx.policy()) {
                let (test, reason) = match &triaged.verdict {
                    crate::triage::TriageVerdict::Pregreet => {
                        ("triage-pregreet", "talked before the greeting".to_string())
                    }
                    _ => (
                        "triage-dnsbl",
                        format!(
                            "dnsbl score {} ({})",
                            triaged.score.total,
                            triaged.score.listed.join(",")
                        ),
                    ),
                };
                crate::conn::count_hits(&[p.ban(ip, test, reason, for_)]);
            }
            if let Some(refusal) = self
                .session
                .triaged(ip, &triaged.verdict, triaged.action, held)
            {
                // boxed: the rare path, kept out of the idle task's size
                if let Some(end) = Box::pin(self.act(refusal)).await {
                    return end;
                }
            }
        }
        let greeting = self.session.greeting();
        self.queue(&greeting);
        // whatever is queued last (221, 421 …) goes out in `Client::close`
        self.serve_loop().await
    }

    /// Triage before the greeting (`triage/`): a client the pass cache
    /// knows goes on untested; otherwise every zone's query starts now, the
    /// pregreet test (if any) sends the greeting's first line and holds the
    /// final one for `wait`, and the answers are awaited after it (a good
    /// client waits max(wait, lookups), bounded by `timeout`). The outcome
    /// is counted, logged and returned for the session to answer; a pass is
    /// remembered. `Err`: the client left during the wait.
    async fn triage(&mut self, t: &crate::triage::Triage) -> Result<crate::triage::Triaged, End> {
        use crate::triage::{Triaged, ZoneResult};
        let ip = self.peer.ip();
        let m = crate::observe::metrics();
        let started = Instant::now();
        if t.passed(ip, started).await {
            m.triage_decision(&t.policy, "cached", "none");
            // postscreen's "PASS OLD": one line per decision, cached ones too
            info!(client = %ip, verdict = "cached", action = "pass", shadow = false, elapsed_ms = 0u64, "triage");
            return Ok(Triaged::cached());
        }
        let lookups =
            (!t.spec.dnsbl.is_empty()).then(|| crate::triage::Lookups::start(&t.dns, &t.spec, ip));
        let client = &mut self.client;
        let held = self.session.held_greeting();
        let pregreet = async {
            let Some(p) = t.spec.pregreet else {
                return Ok(false);
            };
            client.queue(&held);
            client.flush().await?;
            match tokio::time::timeout(p.wait, client.conn.fill()).await {
                Err(_) => Ok(false),
                Ok(Ok(_)) => Ok(true),
                Ok(Err(crate::codec::CodecError::Closed)) => Err(End::ClientClosed),
                Ok(Err(e)) => Err(End::Error(format!("read: {e}"))),
            }
        };
        let answers = async {
            match lookups {
                Some(l) => l.finish().await,
                None => Vec::new(),
            }
        };
        let (pregreet, answers) = tokio::join!(pregreet, answers);
        // the final line also waited for the lookups: what the client sent
        // after `wait` but before that line came before it all the same
        // (asked like the backends' in-step check: a silent client costs
        // one poll(2), no timer)
        let pregreet = match pregreet {
            Ok(false) if t.spec.pregreet.is_some() => match self.client.conn.unsolicited().await {
                Ok(0) => Ok(false),
                Ok(_) => Ok(true),
                Err(crate::codec::CodecError::Closed) => Err(End::ClientClosed),
                Err(e) => Err(End::Error(format!("read: {e}"))),
            },
            other => other,
        };
        for (z, a) in t.spec.dnsbl.iter().zip(&answers) {
            let answered = a.error.is_none().then_some(a.took);
            m.triage_zone(&t.policy, &z.zone, a.result.as_str(), answered);
            m.dns_facts(&a.facts.answered, a.facts.unanswered);
            match a.result {
                ZoneResult::ListRefused => {
                    warn!(zone = %z.zone, client = %ip, reason = "list_refused", "DNS list refused the query (answer in 127.255.255.0/24): not counted as listed")
                }
                ZoneResult::Failed => {
                    warn!(zone = %z.zone, client = %ip, error = a.error.as_deref().unwrap_or("-"), "DNS list lookup failed: counted as not listed")
                }
                _ => {}
            }
        }
        let results: Vec<ZoneResult> = answers.iter().map(|a| a.result).collect();
        let triaged = crate::triage::score::triage(&t.spec, &results, pregreet?);
        for (test, shadow) in &triaged.hits {
            m.triage_hit(&t.policy, test, *shadow);
        }
        m.triage_decision(&t.policy, triaged.verdict.as_str(), triaged.mode());
        info!(
            client = %ip,
            verdict = triaged.verdict.as_str(),
            score = triaged.score.total,
            listed = %triaged.score.listed.join(","),
            allowed = %triaged.score.allowed.join(","),
            pregreet = triaged.pregreet,
            action = triaged.action.map_or("pass", |a| a.as_str()),
            shadow = triaged.mode() == "shadow",
            elapsed_ms = started.elapsed().as_millis() as u64,
            "triage"
        );
        if triaged.passed() {
            t.remember(ip, Instant::now());
        }
        Ok(triaged)
    }

    async fn serve_loop(&mut self) -> End {
        loop {
            let line = match self.next_line().await {
                Ok(l) => l,
                Err(end) => return end,
            };
            let action = match line {
                Line::Command(line) if self.session.awaiting_auth_line() => {
                    self.session.auth_line(&line)
                }
                Line::Command(line) => {
                    let cmd = command::parse(&line);
                    match &cmd {
                        Ok(c) => {
                            // the verb only: never arguments (AUTH payloads)
                            debug!(command = c.verb(), "command");
                            crate::observe::metrics().command(&self.ctx.listener().name, c.verb());
                        }
                        Err(_) => {
                            crate::observe::metrics().command(&self.ctx.listener().name, "invalid")
                        }
                    }
                    let refused = match &cmd {
                        Ok(command::Command::Ehlo(h) | command::Command::Helo(h)) => {
                            let mut f = self.facts();
                            f.helo = Some(h);
                            self.policy(PolicyStage::Helo, &f).await
                        }
                        _ => None,
                    };
                    match refused {
                        Some(a) => self.session.policy_refused(PolicyStage::Helo, a),
                        None => self.session.command(cmd),
                    }
                }
                Line::TooLong => self.session.line_too_long(),
            };
            if let Some(end) = self.act(action).await {
                return end;
            }
        }
    }

    async fn act(&mut self, action: Action) -> Option<End> {
        match action {
            Action::Reply(r) => self.queue(&r),
            Action::Close(r, ending) => {
                self.queue(&r);
                return Some(End::closing(&r, ending));
            }
            Action::Then(r, next) => {
                self.queue(&r);
                return Box::pin(self.act(*next)).await;
            }
            Action::StartTls(r) => return Box::pin(self.start_tls(&r)).await.err(),
            Action::Relay(op) => {
                let mut f = self.facts();
                let stage = match &op {
                    BackendOp::Mail { from, .. } => {
                        f.sender = Some(from);
                        PolicyStage::Mail
                    }
                    BackendOp::Rcpt { to } => {
                        f.rcpt = Some(to);
                        PolicyStage::Rcpt
                    }
                };
                if let Some(a) = self.policy(stage, &f).await {
                    let a = self.session.policy_refused(stage, a);
                    return Box::pin(self.act(a)).await;
                }
                if let BackendOp::Mail { from, .. } = &op {
                    if let Some(a) = Box::pin(self.check_spf(from)).await {
                        return Box::pin(self.act(a)).await;
                    }
                }
                let outcome = Box::pin(self.relay(&op)).await;
                if let (true, BackendOp::Rcpt { to }) = (recipient_refused(&op, &outcome), &op) {
                    self.count_refused_recipient(to);
                }
                let action = self.session.relayed(op, outcome);
                self.drop_out_of_step_backend();
                return Box::pin(self.act(action)).await;
            }
            Action::AuthChallenge(r) => self.queue(&r),
            Action::Authenticate(creds) => return Box::pin(self.authenticate(creds)).await,
            // boxed: DATA's state (message, checks, relay) lives only while
            // a message is in flight, not in every idle session's task
            Action::ReadData(r) => return Box::pin(self.data(r)).await,
        }
        None
    }

    /// What the policy rules see of this session.
    fn facts(&self) -> Facts<'_> {
        let mut f = Facts::new(self.peer.ip(), &self.ctx.listener().name);
        f.helo = self.session.helo.as_deref();
        f.auth_user = self.session.auth_user.as_deref();
        if let Some(tx) = &self.session.tx {
            f.sender = Some(&tx.from);
            f.rcpts_in_message = tx.rcpts.len();
        }
        f
    }

    /// A recipient the backend refused: `rcpt_refusals` rules count it. A
    /// ban it makes holds from the next command and connection on; the
    /// backend's refusal answers this RCPT.
    fn count_refused_recipient(&self, to: &str) {
        if let Some(p) = self.ctx.policy() {
            let mut f = self.facts();
            f.rcpt = Some(to);
            crate::conn::count_hits(&p.rcpt_refused(&f).hits);
        }
    }

    /// Runs the policy's rules for `stage`; `Some(action)` refuses the command.
    async fn policy(&self, stage: PolicyStage, f: &Facts<'_>) -> Option<PolicyAction> {
        let p = self.ctx.policy()?;
        let checked = p.check_shared(stage, f).await;
        crate::conn::count_hits(&checked.hits);
        match checked.decision {
            Decision::Continue => None,
            Decision::Delay(d) => {
                tokio::time::sleep(d).await;
                None
            }
            Decision::Refuse { action, .. } => Some(action),
        }
    }

    /// SPF at MAIL FROM when the policy names it (or DMARC, which needs it).
    /// `Some(action)` refuses the MAIL.
    async fn check_spf(&mut self, from: &str) -> Option<Action> {
        self.spf = None;
        self.dns_budget.new_message();
        let (policy, verifier) = (self.ctx.policy()?.clone(), self.ctx.verifier()?.clone());
        let auth = policy.spec().auth.as_ref()?;
        if !auth.wants_spf() {
            return None;
        }
        let helo = self.session.helo.clone().unwrap_or_default();
        let spf = crate::auth::worker::spf(
            verifier,
            self.dns_budget.clone(),
            self.peer.ip(),
            helo,
            self.ctx.listener().hostname.clone(),
            from.to_string(),
        )
        .await;
        let m = crate::observe::metrics();
        m.auth_result("spf", spf.result.as_str());
        m.dns_facts(&spf.dns.answered, spf.dns.unanswered);
        if spf.not_checked.as_ref().is_some_and(|n| n.runtime_busy) {
            m.auth_result("check_runtime", "busy");
        }
        let verdict = crate::auth::decide(auth, &spf);
        info!(result = spf.result.as_str(), domain = %spf.domain, action = verdict.action.as_str(), "spf");
        self.spf = Some(Box::new(spf));
        let checked = self.session.spf_checked(&verdict);
        self.refusal(checked, &verdict).await
    }

    /// Carries out what the session made of an authentication verdict: a
    /// tarpit, a shadow log line, or the refusal handed back.
    async fn refusal<R>(&self, checked: Checked<R>, v: &AuthVerdict) -> Option<R> {
        match checked {
            Checked::Pass => None,
            Checked::Delay(d) => {
                tokio::time::sleep(d).await;
                None
            }
            Checked::Shadow => {
                info!(check = v.check, reason = %v.reason, "shadow: authentication verdict would have been enforced");
                None
            }
            Checked::Refused(r) => Some(r),
        }
    }

    /// AUTH through the login guard (`conn/login.rs`): policy, backend,
    /// bookkeeping, failure delay; then the session's answer.
    async fn authenticate(&mut self, creds: Credentials) -> Option<End> {
        let policy = self.ctx.policy().cloned();
        let delay = self.ctx.listener().login_failure_delay;
        let mut attempt = AuthAttempt {
            driver: self,
            creds: &creds,
        };
        let action = login::guard(&mut attempt, policy.as_deref(), delay).await;
        Box::pin(self.act(action)).await
    }

    /// STARTTLS through the layer; then the session and the backend start
    /// afresh.
    async fn start_tls(&mut self, ready: &Reply) -> Result<(), End> {
        self.client.start_tls(ready, &self.ctx, "STARTTLS").await?;
        self.session.tls_started();
        // the backend starts afresh, like the client's own state (RFC 3207):
        // a connection that may serve another session goes on, reset, and
        // is told the identity again (XCLIENT HELO) before its next command
        // (`reuse:`); others are closed
        if let Some(b) = self.backend.take() {
            let l = self.ctx.listener();
            self.backend = self.ctx.pool.restart(&l.backend, b).await;
        }
        Ok(())
    }

    fn outcome(&mut self, r: Result<(u16, Vec<String>), BackendError>) -> Outcome {
        match r {
            Ok((code, lines)) => Outcome::Reply(code, lines),
            Err(e) => {
                warn!(error = %e, "backend");
                // nothing was sent over a connection that lacks what the
                // command needs: it stays (in step, nothing refused)
                if !matches!(e, BackendError::Lacks(_)) {
                    self.backend = None;
                }
                match e {
                    BackendError::Unavailable(_) => Outcome::Unavailable,
                    BackendError::Failed(_) | BackendError::TimedOut(_) => Outcome::Failed,
                    BackendError::Protocol(_) => Outcome::Invalid,
                    BackendError::OutOfStep(_) => {
                        crate::observe::metrics()
                            .backend_out_of_step(&self.ctx.listener().backend.name);
                        Outcome::Invalid
                    }
                    BackendError::Identity(_) => Outcome::NoIdentity,
                    BackendError::Lacks(ext) => Outcome::Lacks(ext),
                }
            }
        }
    }

    /// The session found a backend reply that does not fit its command: that
    /// connection is out of step and is dropped (no QUIT: its answer would be
    /// misread as well).
    fn drop_out_of_step_backend(&mut self) {
        if self.session.take_backend_out_of_step() {
            let name = &self.ctx.listener().backend.name;
            warn!(backend = %name, "backend reply does not fit its command; connection dropped");
            crate::observe::metrics().backend_out_of_step(name);
            self.backend = None;
        }
    }

    /// MAIL or AUTH: the commands a backend connection is opened for. They
    /// go through the replay every protocol's login takes (`conn/login.rs`):
    /// on the connection the session holds, else an idle one from the pool
    /// (`reuse:`), else a new one; a connection that served before (earlier
    /// in this session, or another session's from the pool) and breaks, or
    /// one out of step, hands the command to one new connection. Nothing was
    /// committed on the broken one, and the client hears only the answer.
    /// Never after a login: the session's AUTH lives on its connection only
    /// (we keep no passwords), and the session ends when that one goes.
    async fn opening(&mut self, command: Opening<'_>) -> Result<BackendReply, BackendError> {
        if self.backend.is_none() {
            self.take_idle().await;
        }
        let fresh = self.session.auth_user.is_none();
        let l = self.ctx.listener().clone();
        let mut opener = Opener {
            ctx: &self.ctx,
            backend: &l.backend,
            id: crate::backend::ClientIdentity {
                peer: self.peer,
                local: self.ctx.local,
                helo: self.session.helo.clone(),
                esmtp: self.session.esmtp,
            },
            command,
        };
        let replayed = login::replay(
            &mut opener,
            &mut self.backend,
            &mut self.backend_used,
            fresh,
        )
        .await;
        // what the session's own connection offers is the truth for its
        // later EHLOs (the cache is only the best guess before it exists)
        if let Some(b) = &self.backend {
            self.session.caps = b.caps.clone();
        }
        match replayed {
            Replayed::Answer(r) => {
                if std::mem::take(&mut self.reuse_pending)
                    && self.backend.as_ref().is_some_and(|b| b.reused())
                    && !std::mem::replace(&mut self.reuse_counted, true)
                {
                    crate::observe::metrics().backend_reused(&l.backend.name);
                }
                Ok(r)
            }
            // each out-of-step connection was counted as it was dropped
            Replayed::OutOfStep => Err(BackendError::Protocol(
                "out of step on a new connection too".into(),
            )),
            Replayed::Failed(e) => Err(e),
        }
    }

    /// The session is done with its backend connection: kept for a later
    /// session where `reuse:` allows it, else closed (`backend/pool.rs`).
    async fn release_backend(&mut self) {
        if let Some(b) = self.backend.take() {
            let l = self.ctx.listener();
            self.ctx.pool.release(&l.backend, b).await;
        }
    }

    /// An idle backend connection from the pool that is still in step;
    /// dead or out-of-step ones are dropped on the way.
    async fn take_idle(&mut self) {
        let l = self.ctx.listener();
        while let Some(mut b) = self.ctx.pool.take(&l.backend, &l.timeouts.backend) {
            if b.idle_ready().await {
                self.backend = Some(b);
                // counted once its first command is answered on it
                self.reuse_pending = true;
                // it served before: a break now is the backend's idle close
                self.backend_used = true;
                return;
            }
        }
    }

    async fn relay(&mut self, op: &BackendOp) -> Outcome {
        let r = match op {
            BackendOp::Mail { from, params } => self.opening(Opening::Mail { from, params }).await,
            BackendOp::Rcpt { to } => match self.backend.as_mut() {
                Some(b) => b.rcpt(to).await,
                // the connection was lost after MAIL
                None => Err(BackendError::Failed(
                    "connection lost during transaction".into(),
                )),
            },
        };
        self.outcome(r)
    }

    /// DATA: the message (`read_message`), its checks (`verify`), the relay
    /// (`deliver`). Each step ends the DATA early with what the session
    /// decided, or with the end of the session.
    async fn data(&mut self, go_ahead: Reply) -> Option<End> {
        let mut msg = match self.read_message(go_ahead).await {
            Ok(m) => m,
            Err(end) => return end,
        };
        let auth_headers = match self.verify(&mut msg).await {
            Ok(h) => h,
            Err(end) => return end,
        };
        self.deliver(msg, auth_headers).await
    }

    /// `go_ahead` (354) if what MAIL's SIZE announced fits the in-flight
    /// budget now (nothing is reserved for it: memory is reserved as the
    /// message arrives), then the message up to CRLF.CRLF.
    async fn read_message(&mut self, go_ahead: Reply) -> Result<Message, Option<End>> {
        let l = self.ctx.listener().clone();
        let started = Instant::now();
        let declared = self.session.tx.as_ref().and_then(|t| t.params.size);
        let reservation = if self.ctx.inflight.fits(declared.unwrap_or(0)) {
            self.ctx.inflight.reserve(0)
        } else {
            None
        };
        let Some(reservation) = reservation else {
            info!(
                size = declared,
                "DATA refused: in-flight message budget spent"
            );
            let end = self.session.inflight_refused();
            return Err(self.finish(end).await);
        };
        self.queue(&go_ahead);
        self.client.flush().await.map_err(Some)?;
        let mut rx = DataReceiver::new(l.bare_newlines, self.session.size_limit(), l.max_text_line)
            .with_reservation(reservation);
        let result = loop {
            match rx.feed(self.client.conn.rbuf_mut()) {
                Feed::Done(r) => break r,
                // `timeouts.data` per read, within the session lifetime
                Feed::NeedMore => self
                    .client
                    .fill(&self.session, l.timeouts.data)
                    .await
                    .map_err(Some)?,
            }
        };
        let tx = self.session.tx.clone();
        let (from, rcpts) = tx.map(|t| (t.from, t.rcpts)).unwrap_or_default();
        if let Some(end) = self
            .session
            .data_received(&result, l.max_text_line, rx.tainted())
        {
            info!(from = %from, rcpts = rcpts.len(), size = rx.received, result = %summary(&end.action), duration_ms = started.elapsed().as_millis() as u64, "transaction rejected");
            return Err(self.finish(end).await);
        }
        Ok(Message {
            from,
            rcpts,
            body: result.unwrap_or_default(),
            received: rx.received,
            _reservation: rx.take_reservation(),
            started,
        })
    }

    /// SPF/DKIM/DMARC/ARC on the message as received (the verdict may refuse
    /// it); then forged Authentication-Results removed. Returns our header
    /// fields to prepend (never touching other headers or the body, so
    /// existing signatures stay valid).
    async fn verify(&mut self, msg: &mut Message) -> Result<String, Option<End>> {
        let mut auth_headers = String::new();
        let authserv_id = crate::auth::authserv_id(
            self.ctx.policy().and_then(|p| p.spec().auth.as_ref()),
            &self.ctx.listener().hostname,
        )
        .to_string();
        if let (Some(policy), Some(verifier)) =
            (self.ctx.policy().cloned(), self.ctx.verifier().cloned())
        {
            if let Some(auth) = policy.spec().auth.as_ref() {
                let checks = auth.checks();
                let outcome = if checks.any() {
                    // the header copy verification makes when it must drop
                    // signature fields counts against the in-flight budget
                    let copy = crate::auth::verification_copy_len(&msg.body) as u64;
                    let _copy = match (copy > 0).then(|| self.ctx.inflight.reserve(copy)) {
                        Some(None) => {
                            info!(from = %msg.from, size = msg.received, copy, "transaction refused: in-flight budget spent (verification copy)");
                            let end = self.session.verification_copy_refused();
                            return Err(self.finish(end).await);
                        }
                        r => r.flatten(),
                    };
                    let helo = self.session.helo.clone().unwrap_or_default();
                    let (b, o) = crate::auth::worker::message(
                        verifier,
                        self.dns_budget.clone(),
                        std::mem::take(&mut msg.body),
                        self.peer.ip(),
                        helo,
                        msg.from.clone(),
                        self.spf.as_deref().cloned(),
                        checks,
                    )
                    .await;
                    msg.body = b;
                    let m = crate::observe::metrics();
                    m.dns_facts(&o.dns.answered, o.dns.unanswered);
                    if o.not_checked.as_ref().is_some_and(|n| n.runtime_busy) {
                        m.auth_result("check_runtime", "busy");
                    }
                    if let Some((r, _)) = o.dkim_summary() {
                        m.auth_result("dkim", r.as_str());
                    }
                    if let Some(d) = &o.dmarc {
                        m.auth_result("dmarc", d.result.as_str());
                    }
                    if let Some(a) = &o.arc {
                        m.auth_result("arc", a.result.as_str());
                    }
                    let verdict = crate::auth::decide(auth, &o);
                    let checked = self.session.message_verdict(&verdict);
                    if let Some(end) = self.refusal(checked, &verdict).await {
                        info!(from = %msg.from, rcpts = msg.rcpts.len(), size = msg.received, check = verdict.check, result = %summary(&end.action), "transaction refused by authentication policy");
                        return Err(self.finish(end).await);
                    }
                    Some(o)
                } else {
                    None
                };
                auth_headers.push_str(&crate::auth::authentication_results(
                    &authserv_id,
                    self.spf.as_deref(),
                    outcome.as_ref(),
                ));
                if let Some(spf) = &self.spf {
                    auth_headers.push_str(&crate::auth::received_spf(spf));
                }
            }
        }
        // on every listener, checks or not, every id of the configuration:
        // the backend may trust any of them (in place: no copy of the message)
        let forged = crate::auth::strip_forged(&mut msg.body, &self.ctx.listener().authserv_ids);
        if forged > 0 {
            warn!(
                forged,
                "removed Authentication-Results claiming one of our authserv-ids"
            );
        }
        Ok(auth_headers)
    }

    /// Our Received header, then `auth_headers`, then the message, signed
    /// where `dkim_sign` says so, to the backend; its answer goes to the session.
    async fn deliver(&mut self, mut msg: Message, auth_headers: String) -> Option<End> {
        let l = self.ctx.listener().clone();
        let header = data::received_header(&data::TraceInfo {
            helo: self.session.helo.as_deref().unwrap_or("unknown"),
            peer: self.peer,
            host: &l.hostname,
            session_id: &self.id,
            esmtp: self.session.esmtp,
            tls: self
                .client
                .tls
                .as_ref()
                .map(|t| (t.version.as_str(), t.cipher.as_str())),
            rcpt: if msg.rcpts.len() == 1 {
                Some(msg.rcpts[0].as_str())
            } else {
                None
            },
            now: std::time::SystemTime::now(),
        });
        let ours = header + &auth_headers;
        let (signatures, signed_by) = match self.sign(&mut msg, &ours).await {
            Ok(s) => s,
            Err(end) => return end,
        };
        let size = signatures.len() + ours.len() + msg.body.len();
        let sent = Instant::now();
        let r = match self.backend.as_mut() {
            // dot-stuffed on the way out: the message is not copied again
            Some(b) => {
                b.data(&[signatures.as_bytes(), ours.as_bytes(), &msg.body])
                    .await
            }
            None => Err(BackendError::Failed(
                "connection lost during transaction".into(),
            )),
        };
        crate::observe::metrics().backend_replied(&l.backend.name, sent.elapsed().as_secs_f64());
        let outcome = self.outcome(r);
        let end = self.session.delivered(outcome);
        self.drop_out_of_step_backend();
        info!(from = %msg.from, rcpts = msg.rcpts.len(), size, dkim_signed = %signed_by, backend = %summary(&end.action), duration_ms = msg.started.elapsed().as_millis() as u64, "transaction");
        // the body (and its in-flight reservation) is held until here
        self.finish(end).await
    }

    /// `dkim_sign`: the signature fields over `ours` (our header fields) and
    /// the message, exactly as the backend will receive them, and the keys
    /// that made them (`domain/selector,…`, `-` for none, for the log), or
    /// the end of the DATA that the session made of a refusal.
    async fn sign(
        &mut self,
        msg: &mut Message,
        ours: &str,
    ) -> Result<(String, String), Option<End>> {
        use crate::sign::{Decision, Refusal};
        let unsigned = || (String::new(), "-".to_string());
        let Some(policy) = self.ctx.policy().cloned() else {
            return Ok(unsigned());
        };
        let Some(p) = policy.spec().dkim_sign.clone() else {
            return Ok(unsigned());
        };
        let user = self.session.auth_user.as_deref();
        // the header block is parsed only for sessions that may be signed
        let author = user.and_then(|_| crate::sign::author_domain(&msg.body));
        let refusal = match crate::sign::decide(&p, user, author.as_deref(), &msg.from) {
            Decision::Pass(why) => {
                debug!(reason = why.as_str(), "not signed");
                return Ok(unsigned());
            }
            Decision::Refuse => Refusal::UnknownDomain,
            Decision::Sign(keys) => {
                let body = std::mem::take(&mut msg.body);
                let (body, r) =
                    crate::auth::worker::sign(p, keys.clone(), ours.to_string(), body).await;
                msg.body = body;
                match r {
                    Ok(fields) => {
                        let m = crate::observe::metrics();
                        for k in &keys {
                            m.dkim_signed(&k.domain, &k.selector);
                        }
                        let names: Vec<String> = keys.iter().map(|k| k.name()).collect();
                        return Ok((fields, names.join(",")));
                    }
                    Err(e) => {
                        warn!(error = %e, "DKIM signing failed");
                        Refusal::of(&e)
                    }
                }
            }
        };
        crate::observe::metrics().dkim_sign_refused(&policy.spec().name, refusal.as_str());
        info!(from = %msg.from, rcpts = msg.rcpts.len(), size = msg.received, reason = refusal.as_str(), "transaction refused by dkim_sign");
        let end = self.session.signing_refused(refusal);
        Err(self.finish(end).await)
    }

    /// Counts how a DATA ended and carries out the session's action.
    async fn finish(&mut self, end: DataEnd) -> Option<End> {
        if end.outcome == TxOutcome::Accepted {
            self.messages += 1;
        }
        crate::observe::metrics().outcome(&self.ctx.listener().name, end.outcome.as_str());
        Box::pin(self.act(end.action)).await
    }
}

/// The first reply of an action, for logs.
fn summary(a: &Action) -> String {
    a.reply().map(Reply::summary).unwrap_or_default()
}

/// The command a backend connection is opened for ([`Driver::opening`]).
enum Opening<'a> {
    Mail {
        from: &'a str,
        params: &'a crate::mail::MailParams,
    },
    Auth(&'a Credentials),
}

/// [`Opening`] as the shared replay carries it out.
struct Opener<'a> {
    ctx: &'a SessionCtx,
    backend: &'a crate::backend::Backend,
    id: crate::backend::ClientIdentity,
    command: Opening<'a>,
}

impl login::Replay for Opener<'_> {
    type Conn = SmtpBackend;
    type Answer = BackendReply;

    /// A new connection: counted, and what it announced cached.
    async fn connect(&mut self) -> Result<SmtpBackend, BackendError> {
        let l = self.ctx.listener();
        let b = match SmtpBackend::connect(self.backend, &l.timeouts.backend, Some(&self.id)).await
        {
            Ok(b) => b,
            Err(e) => {
                crate::observe::metrics().backend_failed(&self.backend.name);
                return Err(e);
            }
        };
        crate::observe::metrics()
            .backend_connected(&self.backend.name, b.connect_time.as_secs_f64());
        self.ctx.caps.set_smtp(self.backend, b.caps.clone());
        Ok(b)
    }

    /// `None`: out of step (the connection's own check logged it; counted
    /// here, as the replay may go on without an error the driver sees).
    async fn login(&mut self, b: &mut SmtpBackend) -> Result<Option<BackendReply>, BackendError> {
        // a connection another session (or this one before STARTTLS) used
        // speaks as that client until told otherwise; failing that it is
        // dropped, and the command moves to a new connection
        let told = match b.identify(self.backend, &self.id).await {
            Ok(told) => told,
            Err(e) => {
                return match e {
                    BackendError::OutOfStep(_) => {
                        crate::observe::metrics().backend_out_of_step(&self.backend.name);
                        Ok(None)
                    }
                    // reuse does nothing for this backend if it stays so
                    BackendError::Identity(why) => {
                        warn!(backend = %self.backend.name, reason = %why, "a kept connection could not be told this client's identity; using a new one");
                        Err(BackendError::Identity(why))
                    }
                    // nothing of the client's went over it yet: unlike a
                    // command's, the replay may move this one on
                    BackendError::TimedOut(why) => Err(BackendError::Failed(format!(
                        "XCLIENT on a kept connection: {why}"
                    ))),
                    e => Err(e),
                };
            }
        };
        if told {
            // the EHLO after XCLIENT is the newest word on what the backend
            // offers (`caps.rs`: what the next sessions are promised)
            self.ctx.caps.set_smtp(self.backend, b.caps.clone());
        }
        let r = match &self.command {
            Opening::Mail { from, params } => b.mail(from, params, None).await,
            Opening::Auth(c) => b.auth(&c.user, &c.password.0).await,
        };
        match r {
            Err(BackendError::OutOfStep(_)) => {
                crate::observe::metrics().backend_out_of_step(&self.backend.name);
                Ok(None)
            }
            r => r.map(Some),
        }
    }
}

/// One AUTH as the login guard runs it.
struct AuthAttempt<'a> {
    driver: &'a mut Driver,
    creds: &'a Credentials,
}

impl Login for AuthAttempt<'_> {
    type Action = Action;

    fn facts(&self) -> Facts<'_> {
        let mut f = self.driver.facts();
        f.auth_user = Some(&self.creds.user);
        f
    }

    fn refused(&mut self, action: PolicyAction) -> LoginResult {
        self.driver.session.login_refused(action)
    }

    async fn attempt(&mut self) -> LoginResult {
        let d = &mut *self.driver;
        let r = d.opening(Opening::Auth(self.creds)).await;
        let outcome = d.outcome(r);
        let result = d.session.auth_result(&self.creds.user, outcome);
        let code = result.action().reply().map_or(0, |r| r.code);
        info!(user = %self.creds.user, result = code, "auth");
        result
    }
}
