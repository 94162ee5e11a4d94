//! The client-facing SMTP state machine, sans-IO. The driver feeds it parsed
//! commands and outcomes — of backend operations, policy rules, logins,
//! SPF/DKIM/DMARC/ARC verdicts, the DATA read — and it answers with an
//! [`Action`]: every reply mailgate sends is chosen here, none in the driver.
//! It never awaits and owns no sockets, so every rule below is unit-tested
//! with plain values.

use super::command::{Command, ParseError, Secret};
use super::data::Violation;
/// The replies in [`Action`]s (built in `reply.rs`, chosen here).
pub use super::reply::Reply;
use super::reply::{self, Stage};
use crate::action::PolicyAction;
use crate::auth::Verdict as AuthVerdict;
use crate::backend::caps::SmtpCaps;
use crate::config::AuthMode;
use crate::mail::{Body, MailParams};
use crate::policy::valid_login_name;
use crate::policy::PolicyStage;
use crate::triage::{TriageAction, TriageVerdict};
use base64::Engine as _;
use std::time::Duration;

/// The tarpit for an authentication verdict of `delay` (SPF at MAIL, the
/// message's checks at the end of DATA).
const AUTH_DELAY: Duration = Duration::from_secs(5);

/// Why the session ended after a message with bare line endings (normalised,
/// `bare_newlines: normalize`): whatever followed them is not trusted.
const SMUGGLING: &str = "bare line endings in message: session closed (smuggling guard)";

#[derive(Debug, Clone)]
pub struct Settings {
    pub hostname: String,
    /// STARTTLS may be offered (a `starttls` listener, not yet upgraded).
    pub starttls: bool,
    pub require_tls: bool,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_errors: u32,
    pub auth: AuthMode,
    /// Failed AUTH attempts per session before 421 and close.
    pub max_login_failures: u32,
    /// MAIL commands per session before 421 and close.
    pub max_transactions: u32,
}

/// Login data from AUTH PLAIN or LOGIN. Never logged: Debug shows the user only.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: Secret,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Credentials {{ user: {:?}, password: <redacted> }}",
            self.user
        )
    }
}

/// Where an AUTH exchange waits for the client's next line.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AuthWait {
    Plain,
    LoginUser,
    LoginPassword(String),
}

/// A backend operation the driver must perform, then report with `relayed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendOp {
    Mail { from: String, params: MailParams },
    Rcpt { to: String },
}

/// The result of a backend operation. Every outcome but `Reply` leaves the
/// driver without a backend connection (it drops a connection that failed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The backend answered (code, text lines).
    Reply(u16, Vec<String>),
    /// No connection could be made.
    Unavailable,
    /// The connection failed or timed out in the middle.
    Failed,
    /// The backend sent something that is not a valid reply for this stage.
    Invalid,
    /// The client identity the backend is configured for (XCLIENT, PROXY v2)
    /// could not be applied; nothing was relayed.
    NoIdentity,
    /// The connection lacks an extension the command needs end to end,
    /// which the session had advertised from the capability cache; nothing
    /// was relayed, and the connection stays the session's.
    Lacks(&'static str),
}

/// A recipient the backend refused for good (5xx to RCPT): what
/// `rcpt_refusals` rules count (recipient harvesting). A 4xx (greylisting,
/// too many recipients) is not counted.
pub fn recipient_refused(op: &BackendOp, outcome: &Outcome) -> bool {
    matches!(
        (op, outcome),
        (BackendOp::Rcpt { .. }, Outcome::Reply(500..=599, _))
    )
}

/// What a backend's reply code means at one stage. Only these are
/// acceptances: MAIL 250, RCPT 250/251, end of DATA 250 (RFC 5321 §4.3.2);
/// 4xx/5xx are refusals passed on; anything else (221, 252, 354 …) means
/// the conversation is out of step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Accepted,
    Refused,
    OutOfStep,
}

fn verdict(stage: Stage, code: u16) -> Verdict {
    match (stage, code) {
        (Stage::Mail, 250) | (Stage::Rcpt, 250 | 251) | (Stage::Data, 250) => Verdict::Accepted,
        (_, 400..=599) => Verdict::Refused,
        _ => Verdict::OutOfStep,
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Reply(Reply),
    /// Reply, then close the connection.
    Close(Reply, Ending),
    /// Reply, then carry on with the next action (a reply the session cannot
    /// go on after: the close follows it).
    Then(Reply, Box<Action>),
    /// Reply 220, discard buffered input, run the TLS handshake, then `tls_started`.
    StartTls(Reply),
    /// Run the policy rules of its stage (a refusal: `policy_refused`) and,
    /// for MAIL, SPF (`spf_checked`); then perform this on the backend and
    /// call `relayed`.
    Relay(BackendOp),
    /// Reply 354 (unless the in-flight budget is spent: `inflight_refused`)
    /// and read the message, then call `data_received`, `message_verdict`
    /// and, after the relay, `delivered`.
    ReadData(Reply),
    /// Reply 334 and read one raw line (an AUTH response), then call `auth_line`.
    AuthChallenge(Reply),
    /// Check the login policy (a refusal: `login_refused`), relay the
    /// credentials, then call `auth_result`.
    Authenticate(Credentials),
}

impl Action {
    /// The first reply this action sends, if any (for logs).
    pub fn reply(&self) -> Option<&Reply> {
        match self {
            Action::Reply(r)
            | Action::Close(r, _)
            | Action::Then(r, _)
            | Action::StartTls(r)
            | Action::ReadData(r)
            | Action::AuthChallenge(r) => Some(r),
            Action::Relay(_) | Action::Authenticate(_) => None,
        }
    }
}

/// Why the connection closes after a [`Action::Close`] reply (the layer's,
/// shared by every protocol).
pub use crate::conn::Ending;

/// What an authentication verdict means: go on (perhaps after a tarpit, or
/// with a log line for `shadow`), or the refusal `R` instead.
#[derive(Debug, PartialEq, Eq)]
pub enum Checked<R> {
    Pass,
    /// Go on after this tarpit.
    Delay(Duration),
    /// Go on; the verdict would have refused (shadow mode: log it).
    Shadow,
    Refused(R),
}

impl<R> Checked<R> {
    fn map<S>(self, f: impl FnOnce(R) -> S) -> Checked<S> {
        match self {
            Checked::Pass => Checked::Pass,
            Checked::Delay(d) => Checked::Delay(d),
            Checked::Shadow => Checked::Shadow,
            Checked::Refused(r) => Checked::Refused(f(r)),
        }
    }
}

/// How a transaction counts in `transactions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxOutcome {
    Accepted,
    Tempfail,
    Rejected,
}

impl TxOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            TxOutcome::Accepted => "accepted",
            TxOutcome::Tempfail => "tempfail",
            TxOutcome::Rejected => "rejected",
        }
    }

    /// By the class of the reply that ends the transaction.
    fn of(r: &Reply) -> TxOutcome {
        if r.is_positive() {
            TxOutcome::Accepted
        } else if r.is_transient() {
            TxOutcome::Tempfail
        } else {
            TxOutcome::Rejected
        }
    }
}

/// How a DATA command ends: what to do, and how the transaction counts.
#[derive(Debug, PartialEq, Eq)]
pub struct DataEnd {
    pub action: Action,
    pub outcome: TxOutcome,
}

/// The session's answer to a login (relayed to the backend, or refused by
/// the policy), and how the login guard counts it (`conn/login.rs`): `Failed`
/// is a wrong password (535; 421 and close at the session's limit); `Refused`
/// a 5xx other than 535 (503, 504, 554 …), possibly the backend's own
/// trouble, so never charged to the policy's lockout, but a legacy server may
/// answer every wrong password so, so it is slowed down like a failure and
/// counted towards this session's limits; `Undecided` the backend's trouble
/// (454), not counted.
pub type LoginResult = crate::conn::login::LoginResult<Action>;

#[derive(Debug, Clone)]
pub struct Transaction {
    pub from: String,
    pub params: MailParams,
    pub rcpts: Vec<String>,
    pub rcpt_attempts: usize,
}

pub struct Session {
    pub settings: Settings,
    /// What the backend offers: the cache's word until the session's own
    /// connection exists, then that connection's (the driver sets it).
    pub caps: SmtpCaps,
    /// `caps` as the client's last EHLO was answered: a MAIL is judged by
    /// what the client was told, so one promised 8BITMIME that the
    /// connection then lacks hears 451 (`Outcome::Lacks`), not a 555 for
    /// a parameter it was offered.
    offered: SmtpCaps,
    pub tls: bool,
    pub helo: Option<String>,
    pub esmtp: bool,
    pub tx: Option<Transaction>,
    pub auth_user: Option<String>,
    auth_wait: Option<AuthWait>,
    errors: u32,
    auth_failures: u32,
    /// MAIL commands that went on to the backend (and to SPF).
    transactions: u32,
    /// A backend reply did not fit its command: the driver drops that
    /// connection (`take_backend_out_of_step`).
    backend_out_of_step: bool,
    /// The message being relayed had bare line endings (normalised): the
    /// session closes after its answer.
    smuggled: bool,
}

impl Session {
    pub fn new(settings: Settings, caps: SmtpCaps, tls: bool) -> Self {
        Session {
            settings,
            caps,
            offered: SmtpCaps::default(),
            tls,
            helo: None,
            esmtp: false,
            tx: None,
            auth_user: None,
            auth_wait: None,
            errors: 0,
            auth_failures: 0,
            transactions: 0,
            backend_out_of_step: false,
            smuggled: false,
        }
    }

    pub fn greeting(&self) -> Reply {
        reply::greeting(&self.settings.hostname)
    }

    /// The greeting's first line, sent while the pregreet test holds the
    /// final one ([`Self::greeting`]).
    pub fn held_greeting(&self) -> reply::HeldGreeting {
        reply::held_greeting(&self.settings.hostname)
    }

    /// The triage verdict before the greeting: `None` lets the session go on
    /// (a pass, or a failed test in `shadow`); otherwise the refusal that
    /// closes it (RFC 5321 §3.1: 554 instead of the greeting; 421 to come
    /// back). When the greeting's first line went out already (`held`, the
    /// pregreet test), the greeting is completed first so that the client
    /// reads whole replies of one code each, then the refusal follows.
    pub fn triaged(
        &self,
        client: std::net::IpAddr,
        verdict: &TriageVerdict,
        action: Option<TriageAction>,
        held: bool,
    ) -> Option<Action> {
        let r = match (action?, verdict) {
            (TriageAction::Shadow, _) => return None,
            (TriageAction::Tempfail, _) => reply::triage_tempfail(),
            (TriageAction::Reject | TriageAction::Ban, TriageVerdict::Listed { zones, .. }) => {
                reply::triage_listed(client, zones)
            }
            (TriageAction::Reject | TriageAction::Ban, _) => reply::triage_pregreet(),
        };
        let why = match verdict {
            TriageVerdict::Pregreet => "triage: pregreet",
            _ => "triage: dnsbl",
        };
        let close = Action::Close(r, Ending::Because(why));
        Some(if held {
            Action::Then(self.greeting(), Box::new(close))
        } else {
            close
        })
    }

    /// The effective SIZE limit: ours, or the backend's if that is smaller.
    pub fn size_limit(&self) -> u64 {
        match self.caps.size {
            Some(b) if b > 0 && b < self.settings.max_message_size => b,
            _ => self.settings.max_message_size,
        }
    }

    fn error(&mut self, r: Reply) -> Action {
        self.errors += 1;
        if self.errors >= self.settings.max_errors {
            Action::Close(reply::too_many_errors(), Ending::Refused)
        } else {
            Action::Reply(r)
        }
    }

    /// A line that was too long to be a command.
    pub fn line_too_long(&mut self) -> Action {
        self.error(reply::line_too_long())
    }

    pub fn command(&mut self, cmd: Result<Command, ParseError>) -> Action {
        let cmd = match cmd {
            Ok(c) => c,
            Err(ParseError::Unknown) => return self.error(reply::unknown_command()),
            Err(ParseError::Bytes) => return self.error(reply::bad_bytes()),
            Err(ParseError::Syntax(why)) => return self.error(reply::syntax(why)),
            Err(ParseError::Parameter(p)) => return self.error(reply::unsupported_parameter(&p)),
        };
        match cmd {
            Command::Ehlo(d) => {
                self.helo = Some(d.clone());
                self.esmtp = true;
                self.tx = None;
                self.offered = self.caps.clone();
                Action::Reply(reply::ehlo(&self.settings.hostname, &d, self.extensions()))
            }
            Command::Helo(d) => {
                self.helo = Some(d);
                self.esmtp = false;
                self.tx = None;
                self.offered = SmtpCaps::default();
                Action::Reply(reply::helo(&self.settings.hostname))
            }
            Command::StartTls => {
                if self.tls {
                    self.error(reply::tls_already_active())
                } else if !self.settings.starttls {
                    self.error(reply::starttls_unavailable())
                } else if self.tx.is_some() {
                    self.error(reply::starttls_in_transaction())
                } else {
                    Action::StartTls(reply::starttls_ready())
                }
            }
            Command::Mail { from, params } => {
                if self.helo.is_none() {
                    return self.error(reply::need_helo());
                }
                if self.settings.require_tls && !self.tls {
                    return self.error(reply::tls_required());
                }
                if self.settings.auth == AuthMode::Required && self.auth_user.is_none() {
                    return self.error(reply::auth_required());
                }
                if self.tx.is_some() {
                    return self.error(reply::nested_mail());
                }
                if params.size.is_some_and(|s| s > self.size_limit()) {
                    return Action::Reply(reply::size_exceeded());
                }
                if !self.esmtp && params != MailParams::default() {
                    return self.error(reply::syntax("parameters need EHLO"));
                }
                if params.smtputf8 && !self.offered.smtputf8 {
                    return self.error(reply::smtputf8_unavailable());
                }
                if params.body == Some(Body::EightBitMime) && !self.offered.eightbitmime {
                    return self.error(reply::unsupported_parameter("BODY=8BITMIME"));
                }
                // each MAIL costs a backend round trip and SPF's DNS queries:
                // a session cannot loop MAIL/RSET for ever
                self.transactions += 1;
                if self.transactions > self.settings.max_transactions {
                    return Action::Close(reply::too_many_transactions(), Ending::Refused);
                }
                Action::Relay(BackendOp::Mail { from, params })
            }
            Command::Rcpt { to } => {
                let max = self.settings.max_recipients;
                let Some(tx) = self.tx.as_mut() else {
                    return self.error(reply::need_mail());
                };
                // RFC 6531 §3.4: 8-bit addresses only in an SMTPUTF8 transaction;
                // never pass 8-bit bytes to a backend that did not negotiate it
                if !tx.params.smtputf8 && !to.is_ascii() {
                    return self.error(reply::non_ascii_recipient());
                }
                // attempts, not acceptances: a flood of rejected RCPTs is bounded too
                if tx.rcpt_attempts >= max {
                    return Action::Reply(reply::too_many_recipients());
                }
                tx.rcpt_attempts += 1;
                Action::Relay(BackendOp::Rcpt { to })
            }
            Command::Data => match &self.tx {
                None => self.error(reply::need_mail()),
                Some(tx) if tx.rcpts.is_empty() && tx.rcpt_attempts == 0 => {
                    self.error(reply::need_rcpt())
                }
                Some(tx) if tx.rcpts.is_empty() => {
                    // every RCPT failed; end the transaction (RFC 2920 §3.1)
                    self.tx = None;
                    Action::Reply(reply::no_valid_recipients())
                }
                Some(_) => Action::ReadData(reply::start_data()),
            },
            Command::Rset => {
                self.tx = None;
                Action::Reply(reply::ok())
            }
            Command::Noop => Action::Reply(reply::ok()),
            Command::Quit => Action::Close(reply::bye(), Ending::Quit),
            Command::Help => Action::Reply(reply::help()),
            Command::Vrfy => Action::Reply(reply::vrfy_disabled()),
            Command::Expn => Action::Reply(reply::expn_disabled()),
            Command::Auth { mechanism, initial } => self.auth(&mechanism, initial),
            Command::Bdat => self.error(reply::bdat_unavailable()),
        }
    }

    fn extensions(&self) -> Vec<String> {
        let mut e = vec![
            "PIPELINING".to_string(),
            format!("SIZE {}", self.size_limit()),
        ];
        if self.caps.eightbitmime {
            e.push("8BITMIME".into());
        }
        if self.caps.smtputf8 {
            e.push("SMTPUTF8".into());
        }
        e.push("ENHANCEDSTATUSCODES".into());
        if self.auth_offered() {
            e.push("AUTH PLAIN LOGIN".into());
        }
        if self.settings.starttls && !self.tls {
            e.push("STARTTLS".into());
        }
        e
    }

    /// AUTH is offered only over TLS, on listeners configured for it, and only
    /// when the backend has a mechanism to relay the credentials in.
    fn auth_offered(&self) -> bool {
        self.settings.auth != AuthMode::None
            && self.tls
            && (self.caps.auth_plain || self.caps.auth_login)
    }

    fn auth(&mut self, mechanism: &str, initial: Option<Secret>) -> Action {
        if self.settings.auth == AuthMode::None {
            return if self.settings.require_tls && !self.tls {
                self.error(reply::tls_required())
            } else {
                self.error(reply::auth_unavailable())
            };
        }
        if !self.tls {
            return self.error(reply::tls_required());
        }
        if self.helo.is_none() {
            return self.error(reply::need_helo());
        }
        if self.auth_user.is_some() {
            return self.error(reply::already_authenticated());
        }
        if self.tx.is_some() {
            return self.error(reply::nested_mail());
        }
        if !self.auth_offered() {
            return Action::Reply(reply::auth_temporary());
        }
        match (mechanism, initial) {
            ("PLAIN", None) => {
                self.auth_wait = Some(AuthWait::Plain);
                Action::AuthChallenge(reply::auth_challenge(""))
            }
            // RFC 4954 §4: "=" is an empty initial response
            ("PLAIN", Some(ir)) => self.plain(if ir.0 == "=" { "" } else { &ir.0 }),
            ("LOGIN", None) => {
                self.auth_wait = Some(AuthWait::LoginUser);
                Action::AuthChallenge(reply::auth_challenge("VXNlcm5hbWU6"))
            }
            ("LOGIN", Some(ir)) => self.login_user(&ir.0),
            _ => self.error(reply::auth_mechanism()),
        }
    }

    fn plain(&mut self, b64: &str) -> Action {
        let Some(raw) = decode_bytes(b64) else {
            return self.error(reply::auth_bad_base64());
        };
        let mut parts = raw.split(|b| *b == 0);
        let (Some(authz), Some(user), Some(pass), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return self.error(reply::auth_bad_base64());
        };
        let (Ok(authz), Ok(user), Ok(pass)) = (
            std::str::from_utf8(authz),
            std::str::from_utf8(user),
            std::str::from_utf8(pass),
        ) else {
            return self.error(reply::auth_bad_base64());
        };
        if !valid_login_name(user) || !valid_login_name(authz) {
            return self.error(reply::auth_bad_user());
        }
        // acting for someone else (authzid) is not relayed
        if user.is_empty() || (!authz.is_empty() && authz != user) {
            return self.login_failed();
        }
        Action::Authenticate(Credentials {
            user: user.to_string(),
            password: Secret(pass.to_string()),
        })
    }

    /// AUTH LOGIN's user name (base64): checked before the password is asked for.
    fn login_user(&mut self, b64: &str) -> Action {
        match decode(b64) {
            Some(user) if valid_login_name(&user) => {
                self.auth_wait = Some(AuthWait::LoginPassword(user));
                Action::AuthChallenge(reply::auth_challenge("UGFzc3dvcmQ6"))
            }
            Some(_) => self.error(reply::auth_bad_user()),
            None => self.error(reply::auth_bad_base64()),
        }
    }

    /// A failed login (wrong credentials, here or at the backend): `535`, or
    /// `421` and close once `max_login_failures` is reached in this session.
    pub fn login_failed(&mut self) -> Action {
        self.auth_failures += 1;
        if self.auth_failures >= self.settings.max_login_failures {
            Action::Close(reply::too_many_auth_failures(), Ending::Refused)
        } else {
            Action::Reply(reply::auth_failed())
        }
    }

    /// Whether the next line is an AUTH response, not a command.
    pub fn awaiting_auth_line(&self) -> bool {
        self.auth_wait.is_some()
    }

    /// One AUTH response line (after a 334).
    pub fn auth_line(&mut self, line: &[u8]) -> Action {
        let Some(wait) = self.auth_wait.take() else {
            return self.error(reply::unknown_command());
        };
        let Ok(text) = std::str::from_utf8(line) else {
            return self.error(reply::auth_bad_base64());
        };
        let text = text.trim();
        if text == "*" {
            return Action::Reply(reply::auth_cancelled());
        }
        match wait {
            AuthWait::Plain => self.plain(text),
            AuthWait::LoginUser => self.login_user(text),
            AuthWait::LoginPassword(user) => match decode(text) {
                // relayed as PLAIN, where a NUL would start another field
                Some(pass) if pass.contains('\0') => self.login_failed(),
                Some(pass) if !user.is_empty() => Action::Authenticate(Credentials {
                    user,
                    password: Secret(pass),
                }),
                Some(_) => self.login_failed(),
                None => self.error(reply::auth_bad_base64()),
            },
        }
    }

    /// The backend's answer to the relayed credentials. Failures look the same
    /// whatever the reason (no hint whether the user exists) and count
    /// towards `max_login_failures`.
    pub fn auth_result(&mut self, user: &str, outcome: Outcome) -> LoginResult {
        match outcome {
            Outcome::Reply(235, _) => {
                self.auth_user = Some(user.to_string());
                LoginResult::Succeeded(Action::Reply(reply::auth_ok()))
            }
            // only 535 says "wrong credentials" (RFC 4954 §6); another 5xx
            // (503 bad sequence, 504, 534 …) may be the backend's trouble:
            // `Refused`, see there
            Outcome::Reply(535, _) => LoginResult::Failed(self.login_failed()),
            Outcome::Reply(500..=599, _) => {
                self.auth_failures += 1;
                LoginResult::Refused(match self.error(reply::auth_temporary()) {
                    Action::Reply(_) if self.auth_failures >= self.settings.max_login_failures => {
                        Action::Close(reply::too_many_auth_failures(), Ending::Refused)
                    }
                    a => a,
                })
            }
            _ => LoginResult::Undecided(Action::Reply(reply::auth_temporary())),
        }
    }

    /// The login policy refused the login before it reached the backend:
    /// `reject` looks like (and counts as) a wrong password; a tempfail
    /// (failed-login lock, login rate) is 454. The policy already counted the
    /// attempt, and the answer is not delayed: `Undecided` to the login guard.
    pub fn login_refused(&mut self, action: PolicyAction) -> LoginResult {
        LoginResult::Undecided(if action == PolicyAction::Reject {
            self.login_failed()
        } else {
            Action::Reply(reply::auth_locked())
        })
    }

    /// A policy rule refused the command of `stage` (HELO/EHLO, MAIL, RCPT)
    /// with `action` (`reject` or `tempfail`). A tempfail at HELO/EHLO ends
    /// the session with 421; elsewhere refusals leave it open.
    pub fn policy_refused(&mut self, stage: PolicyStage, action: PolicyAction) -> Action {
        match (stage, action) {
            (_, PolicyAction::Reject) => Action::Reply(reply::policy_reject()),
            (PolicyStage::Helo, _) => Action::Close(
                reply::helo_policy_tempfail(),
                Ending::Because("HELO rate limit"),
            ),
            _ => Action::Reply(reply::policy_tempfail()),
        }
    }

    /// The SPF verdict at MAIL FROM: a refusal answers the MAIL, which is
    /// then not relayed.
    pub fn spf_checked(&mut self, v: &AuthVerdict) -> Checked<Action> {
        checked(v).map(Action::Reply)
    }

    /// The verdict of the message's checks (SPF/DKIM/DMARC/ARC) at the end of
    /// DATA: a refusal ends the transaction, nothing is relayed.
    pub fn message_verdict(&mut self, v: &AuthVerdict) -> Checked<DataEnd> {
        checked(v).map(|r| {
            self.tx = None;
            DataEnd {
                outcome: TxOutcome::of(&r),
                action: self.message_answer(r, false),
            }
        })
    }

    /// DATA while the process-wide budget for message bytes in flight cannot
    /// cover what MAIL's SIZE announced: 452, the transaction stays (the
    /// client may try DATA again).
    pub fn inflight_refused(&mut self) -> DataEnd {
        DataEnd {
            action: Action::Reply(reply::inflight_exceeded()),
            outcome: TxOutcome::Tempfail,
        }
    }

    /// The end of DATA when the header copy verification needs (signature
    /// fields dropped, see `auth::verification_copy_len`) does not fit the
    /// in-flight budget: 452, the transaction ends, nothing is relayed.
    pub fn verification_copy_refused(&mut self) -> DataEnd {
        self.tx = None;
        DataEnd {
            outcome: TxOutcome::Tempfail,
            action: self.message_answer(reply::inflight_exceeded(), false),
        }
    }

    /// A message `dkim_sign` does not let go on (from the driver's signing
    /// step): the transaction ends, nothing is relayed.
    pub fn signing_refused(&mut self, r: crate::sign::Refusal) -> DataEnd {
        use crate::sign::Refusal;
        self.tx = None;
        let reply = match r {
            Refusal::UnknownDomain => reply::dkim_unknown_domain(),
            Refusal::TooManyFields(n) => {
                reply::dkim_too_many_fields(n, crate::sign::MAX_SIGNED_FIELDS)
            }
            Refusal::NotSigned => reply::dkim_not_signed(),
        };
        DataEnd {
            outcome: TxOutcome::of(&reply),
            action: self.message_answer(reply, false),
        }
    }

    /// The TLS handshake after STARTTLS succeeded: forget everything the client
    /// said before (RFC 3207 §4.2).
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.helo = None;
        self.esmtp = false;
        self.tx = None;
        self.auth_user = None;
        self.auth_wait = None;
    }

    /// The backend's answer to `op`. The backend decides about addresses; we only
    /// make sure its reply is a valid one for the stage.
    pub fn relayed(&mut self, op: BackendOp, outcome: Outcome) -> Action {
        let (code, lines) = match outcome {
            Outcome::Reply(code, lines) => (code, lines),
            // a connection that lacks an extension was sent nothing and
            // stays: an authenticated session goes on over it
            other => {
                let lost = !matches!(other, Outcome::Lacks(_));
                return self.answer(Self::failed(other), lost);
            }
        };
        let stage = match op {
            BackendOp::Mail { .. } => Stage::Mail,
            BackendOp::Rcpt { .. } => Stage::Rcpt,
        };
        let v = verdict(stage, code);
        if v == Verdict::OutOfStep {
            self.backend_out_of_step = true;
            return self.answer(reply::backend_bad_reply(), true);
        }
        let r = Reply::relayed(code, &lines, stage);
        if v == Verdict::Accepted {
            match op {
                BackendOp::Mail { from, params } => {
                    self.tx = Some(Transaction {
                        from,
                        params,
                        rcpts: Vec::new(),
                        rcpt_attempts: 0,
                    })
                }
                BackendOp::Rcpt { to } => {
                    if let Some(tx) = self.tx.as_mut() {
                        tx.rcpts.push(to);
                    }
                }
            }
        }
        Action::Reply(r)
    }

    /// `r` answers a relayed command. When the backend connection went with
    /// it (`lost`), an authenticated session cannot go on over a new,
    /// unauthenticated one (we keep no passwords): 421 and close after `r`.
    fn answer(&self, r: Reply, lost: bool) -> Action {
        if lost && self.auth_user.is_some() {
            Action::Then(
                r,
                Box::new(Action::Close(
                    reply::backend_lost_closing(),
                    Ending::Because("backend lost in an authenticated session"),
                )),
            )
        } else {
            Action::Reply(r)
        }
    }

    /// `r` ends a message: after one with bare line endings the session
    /// closes (smuggling guard), else as [`Self::answer`].
    fn message_answer(&mut self, r: Reply, lost: bool) -> Action {
        if std::mem::take(&mut self.smuggled) {
            Action::Close(r, Ending::Because(SMUGGLING))
        } else {
            self.answer(r, lost)
        }
    }

    /// The reply for a backend operation that got no usable answer.
    fn failed(outcome: Outcome) -> Reply {
        match outcome {
            Outcome::Unavailable => reply::backend_unavailable(),
            Outcome::Failed => reply::backend_failed(),
            Outcome::NoIdentity => reply::identity_unavailable(),
            Outcome::Lacks(ext) => reply::backend_lacks(ext),
            Outcome::Invalid | Outcome::Reply(..) => reply::backend_bad_reply(),
        }
    }

    /// True once after a backend reply that did not fit its command: that
    /// connection is out of step and must be dropped, never reused.
    pub fn take_backend_out_of_step(&mut self) -> bool {
        std::mem::take(&mut self.backend_out_of_step)
    }

    /// The message was read; `tainted`: it had bare line endings, normalised
    /// (`bare_newlines: normalize`), and the session closes after its answer.
    /// `None` → the driver checks it (`message_verdict`), sends it to the
    /// backend and reports with `delivered`; a violation → this, right away,
    /// transaction over.
    pub fn data_received(
        &mut self,
        result: &Result<Vec<u8>, Violation>,
        max_line: usize,
        tainted: bool,
    ) -> Option<DataEnd> {
        self.smuggled = tainted;
        let v = result.as_ref().err()?;
        self.tx = None;
        let r = match v {
            Violation::BareNewline => reply::bare_newline(),
            Violation::Nul => reply::nul_in_message(),
            Violation::LineTooLong => reply::message_line_too_long(max_line),
            Violation::TooBig => reply::size_exceeded(),
            Violation::FoldedFirstLine => reply::folded_first_line(),
            Violation::HeaderTooBig => reply::header_too_big(),
            Violation::NoMemory => reply::inflight_exceeded(),
        };
        Some(DataEnd {
            action: self.message_answer(r, false),
            // every violation counts as rejected, the 452 of NoMemory too
            outcome: TxOutcome::Rejected,
        })
    }

    /// The backend's final answer to the message. Only a real 250 becomes a 250.
    pub fn delivered(&mut self, outcome: Outcome) -> DataEnd {
        self.tx = None;
        let (r, lost) = match outcome {
            Outcome::Reply(code, lines) => match verdict(Stage::Data, code) {
                Verdict::Accepted | Verdict::Refused => {
                    (Reply::relayed(code, &lines, Stage::Data), false)
                }
                Verdict::OutOfStep => {
                    self.backend_out_of_step = true;
                    (reply::backend_bad_reply(), true)
                }
            },
            other => (Self::failed(other), true),
        };
        DataEnd {
            outcome: TxOutcome::of(&r),
            action: self.message_answer(r, lost),
        }
    }
}

/// What an authentication verdict's action means; a refusal with its reply
/// (RFC 7372 codes where one exists).
fn checked(v: &AuthVerdict) -> Checked<Reply> {
    match v.action {
        // `config` refuses `ban` for checks; were one here, it refuses as reject
        PolicyAction::Reject | PolicyAction::Ban => {
            Checked::Refused(reply::auth_check_reject(v.check, &v.reason))
        }
        PolicyAction::Tempfail => Checked::Refused(reply::auth_check_tempfail(v.check, &v.reason)),
        PolicyAction::Delay => Checked::Delay(AUTH_DELAY),
        PolicyAction::Shadow => Checked::Shadow,
        PolicyAction::Accept | PolicyAction::Tag => Checked::Pass,
    }
}

fn decode_bytes(b64: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()
}

fn decode(b64: &str) -> Option<String> {
    decode_bytes(b64).and_then(|v| String::from_utf8(v).ok())
}

impl crate::conn::Replies for Session {
    type Reply = Reply;

    /// No command within `timeouts.command` (or DATA line within `timeouts.data`).
    fn timed_out(&self) -> Reply {
        reply::timeout()
    }

    fn session_over(&self) -> Reply {
        reply::session_too_long()
    }

    fn shutting_down(&self) -> Reply {
        reply::shutting_down()
    }
}

#[cfg(test)]
mod tests {
    use super::super::command::parse;
    use super::*;

    fn settings(starttls: bool, require_tls: bool) -> Settings {
        Settings {
            hostname: "gw.example".into(),
            starttls,
            require_tls,
            max_message_size: 1000,
            max_recipients: 2,
            max_errors: 20,
            auth: AuthMode::None,
            max_login_failures: 3,
            max_transactions: 100,
        }
    }

    fn caps() -> SmtpCaps {
        SmtpCaps {
            eightbitmime: true,
            smtputf8: false,
            pipelining: true,
            auth_plain: true,
            auth_login: false,
            size: None,
        }
    }

    fn cmd(s: &mut Session, line: &str) -> Action {
        s.command(parse(line.as_bytes()))
    }

    fn reply_of(a: Action) -> Vec<u8> {
        match a {
            Action::Reply(r)
            | Action::Close(r, _)
            | Action::StartTls(r)
            | Action::ReadData(r)
            | Action::AuthChallenge(r) => r.to_bytes(),
            Action::Then(r, next) => [r.to_bytes(), reply_of(*next)].concat(),
            Action::Relay(op) => panic!("unexpected relay {op:?}"),
            Action::Authenticate(c) => panic!("unexpected authenticate {c:?}"),
        }
    }

    #[test]
    fn triage_refusals_and_the_held_greeting() {
        use crate::conn::Wire;
        let s = Session::new(settings(false, false), caps(), false);
        let mut held = Vec::new();
        s.held_greeting().write_to(&mut held);
        assert_eq!(held, b"220-gw.example ESMTP mailgate\r\n");
        assert_eq!(
            s.greeting().to_bytes(),
            b"220 gw.example ESMTP mailgate\r\n"
        );
        let ip: std::net::IpAddr = "127.0.0.2".parse().unwrap();
        let listed = TriageVerdict::Listed {
            score: 3,
            zones: vec!["a.test".into(), "b.test".into()],
        };
        let a = s
            .triaged(ip, &listed, Some(TriageAction::Reject), false)
            .unwrap();
        assert!(matches!(
            a,
            Action::Close(_, Ending::Because("triage: dnsbl"))
        ));
        assert_eq!(
            reply_of(a),
            b"554 5.7.1 Service unavailable; client [127.0.0.2] blocked using a.test, b.test\r\n"
        );
        // after the held first line: the greeting ends, then the refusal
        let a = s
            .triaged(
                ip,
                &TriageVerdict::Pregreet,
                Some(TriageAction::Reject),
                true,
            )
            .unwrap();
        let bytes = reply_of(a);
        assert!(
            bytes.starts_with(b"220 gw.example ESMTP mailgate\r\n554 5.7.1 Protocol error"),
            "{}",
            String::from_utf8_lossy(&bytes)
        );
        let a = s
            .triaged(ip, &listed, Some(TriageAction::Tempfail), false)
            .unwrap();
        assert!(reply_of(a).starts_with(b"421 4.7.0 "));
        assert!(s
            .triaged(ip, &listed, Some(TriageAction::Shadow), true)
            .is_none());
        assert!(s
            .triaged(ip, &TriageVerdict::Pass { score: 0 }, None, true)
            .is_none());
    }

    fn ok250(s: &mut Session, op: BackendOp) -> Action {
        s.relayed(op, Outcome::Reply(250, vec!["Ok".into()]))
    }

    #[test]
    fn ehlo_advertises_only_what_is_true() {
        let mut s = Session::new(settings(true, false), caps(), false);
        let r = String::from_utf8(reply_of(cmd(&mut s, "EHLO c.example"))).unwrap();
        assert_eq!(
            r,
            "250-gw.example Hello c.example\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n"
        );
        assert!(!r.contains("SMTPUTF8") && !r.contains("CHUNKING") && !r.contains("AUTH"));
        s.tls_started();
        let r = String::from_utf8(reply_of(cmd(&mut s, "EHLO c.example"))).unwrap();
        assert!(!r.contains("STARTTLS"), "{r}");
        // backend with a smaller SIZE wins
        let mut s = Session::new(
            settings(false, false),
            SmtpCaps {
                size: Some(500),
                ..caps()
            },
            false,
        );
        let r = String::from_utf8(reply_of(cmd(&mut s, "EHLO c"))).unwrap();
        assert!(r.contains("SIZE 500") && !r.contains("STARTTLS") && r.contains("8BITMIME"));
    }

    #[test]
    fn full_transaction() {
        let mut s = Session::new(settings(true, false), caps(), false);
        assert_eq!(
            reply_of(cmd(&mut s, "RCPT TO:<a@b.example>")),
            b"503 5.5.1 Need MAIL command first\r\n"
        );
        assert_eq!(
            reply_of(cmd(&mut s, "MAIL FROM:<a@b.example>")),
            b"503 5.5.1 Send EHLO or HELO first\r\n"
        );
        cmd(&mut s, "EHLO c.example");
        let Action::Relay(op) = cmd(&mut s, "MAIL FROM:<a@b.example> SIZE=10") else {
            panic!()
        };
        assert_eq!(reply_of(ok250(&mut s, op)), b"250 2.1.0 Ok\r\n");
        assert_eq!(
            reply_of(cmd(&mut s, "DATA")),
            b"503 5.5.1 Need RCPT command first\r\n"
        );
        let Action::Relay(op) = cmd(&mut s, "RCPT TO:<x@y.example>") else {
            panic!()
        };
        let r = s.relayed(op, Outcome::Reply(550, vec!["5.1.1 no such user".into()]));
        assert_eq!(reply_of(r), b"550 5.1.1 no such user\r\n");
        let Action::Relay(op) = cmd(&mut s, "RCPT TO:<z@y.example>") else {
            panic!()
        };
        ok250(&mut s, op);
        assert_eq!(
            reply_of(cmd(&mut s, "RCPT TO:<w@y.example>")),
            b"452 4.5.3 Too many recipients\r\n"
        );
        assert!(matches!(cmd(&mut s, "DATA"), Action::ReadData(_)));
        assert!(s
            .data_received(&Ok(b"x\r\n".to_vec()), 1000, false)
            .is_none());
        let end = s.delivered(Outcome::Reply(250, vec!["2.0.0 queued as 1".into()]));
        assert_eq!(end.outcome, TxOutcome::Accepted);
        assert_eq!(reply_of(end.action), b"250 2.0.0 queued as 1\r\n");
        assert!(s.tx.is_none());
    }

    #[test]
    fn never_250_without_backend_250() {
        for outcome in [
            Outcome::Unavailable,
            Outcome::Failed,
            Outcome::Invalid,
            Outcome::Reply(354, vec!["go ahead".into()]),
            Outcome::Reply(451, vec!["later".into()]),
        ] {
            let mut s = Session::new(settings(false, false), caps(), false);
            let end = s.delivered(outcome.clone());
            assert_eq!(end.outcome, TxOutcome::Tempfail, "{outcome:?} gave {end:?}");
            assert!(reply_of(end.action).starts_with(b"451 "), "{outcome:?}");
        }
        let mut s = Session::new(settings(false, false), caps(), false);
        cmd(&mut s, "HELO c");
        let Action::Relay(op) = cmd(&mut s, "MAIL FROM:<a@b.example>") else {
            panic!()
        };
        assert_eq!(
            reply_of(s.relayed(op, Outcome::Unavailable)),
            b"451 4.4.1 Mail server temporarily unavailable, try again later\r\n"
        );
        assert!(s.tx.is_none());
    }

    /// Issue 11 item 3: only MAIL 250, RCPT 250/251 and end-of-DATA 250 are
    /// acceptances; 4xx/5xx pass through; any other code is 451 4.4.2 and
    /// marks the backend connection out of step.
    #[test]
    fn backend_codes_fit_their_command() {
        let mail = |code: u16| {
            let mut s = Session::new(settings(false, false), caps(), false);
            cmd(&mut s, "EHLO c");
            let Action::Relay(op) = cmd(&mut s, "MAIL FROM:<a@b.example>") else {
                panic!()
            };
            let r = reply_of(s.relayed(op, Outcome::Reply(code, vec!["x".into()])));
            (
                String::from_utf8(r).unwrap(),
                s.tx.is_some(),
                s.take_backend_out_of_step(),
            )
        };
        assert_eq!(mail(250), ("250 2.1.0 x\r\n".into(), true, false));
        assert_eq!(mail(550), ("550 5.0.0 x\r\n".into(), false, false));
        assert_eq!(mail(451), ("451 4.0.0 x\r\n".into(), false, false));
        for odd in [221, 251, 252, 235, 354, 334, 220] {
            let (r, tx, dropped) = mail(odd);
            assert!(r.starts_with("451 4.4.2"), "MAIL {odd}: {r}");
            assert!(!tx && dropped, "MAIL {odd}");
        }
        let rcpt = |code: u16| {
            let mut s = Session::new(settings(false, false), caps(), false);
            cmd(&mut s, "EHLO c");
            let Action::Relay(op) = cmd(&mut s, "MAIL FROM:<a@b.example>") else {
                panic!()
            };
            ok250(&mut s, op);
            let Action::Relay(op) = cmd(&mut s, "RCPT TO:<x@y.example>") else {
                panic!()
            };
            let r = reply_of(s.relayed(op, Outcome::Reply(code, vec![])));
            let n = s.tx.as_ref().map(|t| t.rcpts.len()).unwrap_or(9);
            (
                String::from_utf8(r).unwrap(),
                n,
                s.take_backend_out_of_step(),
            )
        };
        assert_eq!(rcpt(250), ("250 2.1.5\r\n".into(), 1, false));
        assert_eq!(rcpt(251), ("251 2.1.5\r\n".into(), 1, false));
        assert_eq!(rcpt(554), ("554 5.0.0\r\n".into(), 0, false));
        for odd in [221, 252, 354, 235] {
            let (r, n, dropped) = rcpt(odd);
            assert!(
                r.starts_with("451 4.4.2") && n == 0 && dropped,
                "RCPT {odd}: {r}"
            );
        }
        let mut s = Session::new(settings(false, false), caps(), false);
        for (code, want) in [(250, "250 2.0.0"), (554, "554 5.0.0"), (452, "452 4.0.0")] {
            let r = String::from_utf8(reply_of(s.delivered(Outcome::Reply(code, vec![])).action))
                .unwrap();
            assert!(r.starts_with(want), "DATA {code}: {r:?}");
            assert!(!s.take_backend_out_of_step());
        }
        for odd in [221, 251, 252, 354, 220] {
            let r = reply_of(s.delivered(Outcome::Reply(odd, vec!["bye".into()])).action);
            assert!(r.starts_with(b"451 4.4.2"), "DATA {odd}: {r:?}");
            assert!(s.take_backend_out_of_step(), "DATA {odd}");
            assert!(!s.take_backend_out_of_step(), "reported once");
        }
    }

    /// Issue 11 item 4: an identity that cannot be applied is 451 4.7.0.
    #[test]
    fn no_identity_is_451_470() {
        let mut s = Session::new(settings(false, false), caps(), false);
        cmd(&mut s, "EHLO c");
        let Action::Relay(op) = cmd(&mut s, "MAIL FROM:<a@b.example>") else {
            panic!()
        };
        let r = reply_of(s.relayed(op, Outcome::NoIdentity));
        assert!(
            r.starts_with(b"451 4.7.0"),
            "{}",
            String::from_utf8_lossy(&r)
        );
        assert!(s.tx.is_none());
    }

    /// A connection without an extension the cache had promised: 451, and
    /// no transaction (nothing reached the backend).
    #[test]
    fn an_extension_the_connection_lacks_is_451_430() {
        let mut s = Session::new(settings(false, false), caps(), false);
        cmd(&mut s, "EHLO c");
        let Action::Relay(op) = cmd(&mut s, "MAIL FROM:<a@b.example> BODY=8BITMIME") else {
            panic!()
        };
        let r = reply_of(s.relayed(op, Outcome::Lacks("8BITMIME")));
        assert_eq!(
            String::from_utf8_lossy(&r),
            "451 4.3.0 Mail server no longer offers 8BITMIME, try again later\r\n"
        );
        assert!(s.tx.is_none());
        // nothing was sent, the connection is as it was: an authenticated
        // session goes on over it (no 421 'connection lost')
        s.auth_user = Some("alice".into());
        let Action::Relay(op) = cmd(&mut s, "MAIL FROM:<a@b.example> BODY=8BITMIME") else {
            panic!()
        };
        assert!(matches!(
            s.relayed(op, Outcome::Lacks("8BITMIME")),
            Action::Reply(r) if r.code == 451
        ));
    }

    /// A MAIL is judged by what the client's EHLO was told; what the
    /// connection offers (the driver's `caps`) answers the next EHLO.
    #[test]
    fn mail_parameters_are_judged_by_what_ehlo_offered() {
        let mut s = Session::new(settings(false, false), caps(), false);
        cmd(&mut s, "EHLO c");
        s.caps.eightbitmime = false;
        // offered: relayed, for the connection to refuse (451 4.3.0)
        let a = cmd(&mut s, "MAIL FROM:<a@b.example> BODY=8BITMIME");
        assert!(matches!(a, Action::Relay(_)), "{a:?}");
        let ehlo = String::from_utf8(reply_of(cmd(&mut s, "EHLO c"))).unwrap();
        assert!(!ehlo.contains("8BITMIME"), "{ehlo}");
        let r = reply_of(cmd(&mut s, "MAIL FROM:<a@b.example> BODY=8BITMIME"));
        assert!(r.starts_with(b"555"), "{}", String::from_utf8_lossy(&r));
    }

    #[test]
    fn all_rcpts_failed() {
        let mut s = Session::new(settings(false, false), caps(), false);
        cmd(&mut s, "EHLO c");
        let Action::Relay(op) = cmd(&mut s, "MAIL FROM:<>") else {
            panic!()
        };
        ok250(&mut s, op);
        let Action::Relay(op) = cmd(&mut s, "RCPT TO:<a@b.example>") else {
            panic!()
        };
        s.relayed(op, Outcome::Reply(550, vec!["no".into()]));
        assert_eq!(
            reply_of(cmd(&mut s, "DATA")),
            b"554 5.5.1 No valid recipients\r\n"
        );
        assert!(s.tx.is_none());
    }

    #[test]
    fn recipient_limit() {
        let mut s = Session::new(settings(false, false), caps(), false);
        cmd(&mut s, "EHLO c");
        let Action::Relay(op) = cmd(&mut s, "MAIL FROM:<>") else {
            panic!()
        };
        ok250(&mut s, op);
        for i in 0..2 {
            let Action::Relay(op) = cmd(&mut s, &format!("RCPT TO:<r{i}@b.example>")) else {
                panic!()
            };
            ok250(&mut s, op);
        }
        assert_eq!(
            reply_of(cmd(&mut s, "RCPT TO:<r3@b.example>")),
            b"452 4.5.3 Too many recipients\r\n"
        );
    }

    #[test]
    fn require_tls_and_starttls_reset() {
        let mut s = Session::new(settings(true, true), caps(), false);
        cmd(&mut s, "EHLO c");
        assert_eq!(
            reply_of(cmd(&mut s, "MAIL FROM:<a@b.example>")),
            b"530 5.7.0 Must issue a STARTTLS command first\r\n"
        );
        assert_eq!(
            reply_of(cmd(&mut s, "AUTH PLAIN AGFsaWNlAHNlY3JldA==")),
            b"530 5.7.0 Must issue a STARTTLS command first\r\n"
        );
        assert!(matches!(cmd(&mut s, "STARTTLS"), Action::StartTls(_)));
        s.tls_started();
        assert!(s.helo.is_none());
        assert_eq!(
            reply_of(cmd(&mut s, "RCPT TO:<a@b.example>")),
            b"503 5.5.1 Need MAIL command first\r\n"
        );
        assert_eq!(
            reply_of(cmd(&mut s, "MAIL FROM:<a@b.example>")),
            b"503 5.5.1 Send EHLO or HELO first\r\n"
        );
        cmd(&mut s, "EHLO c");
        assert!(matches!(
            cmd(&mut s, "MAIL FROM:<a@b.example>"),
            Action::Relay(_)
        ));
        assert_eq!(
            reply_of(cmd(&mut s, "STARTTLS")),
            b"503 5.5.1 TLS is already active\r\n"
        );
        // not offered on a plain listener
        let mut s = Session::new(settings(false, false), caps(), false);
        assert_eq!(
            reply_of(cmd(&mut s, "STARTTLS")),
            b"502 5.5.1 STARTTLS is not available on this service\r\n"
        );
    }

    #[test]
    fn parameters_checked_against_backend() {
        let mut s = Session::new(settings(false, false), SmtpCaps::default(), false);
        cmd(&mut s, "EHLO c");
        assert_eq!(
            reply_of(cmd(&mut s, "MAIL FROM:<a@b.example> BODY=8BITMIME")),
            b"555 5.5.4 Unsupported parameter BODY=8BITMIME\r\n"
        );
        assert_eq!(
            reply_of(cmd(&mut s, "MAIL FROM:<a@b.example> SMTPUTF8")),
            b"555 5.5.4 SMTPUTF8 is not supported by this service\r\n"
        );
        assert_eq!(
            reply_of(cmd(&mut s, "MAIL FROM:<a@b.example> SIZE=5000")),
            b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
        );
        let mut s = Session::new(settings(false, false), caps(), false);
        cmd(&mut s, "HELO c");
        assert_eq!(
            reply_of(cmd(&mut s, "MAIL FROM:<a@b.example> SIZE=5")),
            b"501 5.5.4 Syntax error: parameters need EHLO\r\n"
        );
    }

    #[test]
    fn refusals_and_error_limit() {
        let mut s = Session::new(
            Settings {
                max_errors: 5,
                ..settings(false, false)
            },
            caps(),
            false,
        );
        assert_eq!(
            reply_of(cmd(&mut s, "VRFY root")),
            b"502 5.5.1 VRFY command is disabled\r\n"
        );
        assert_eq!(
            reply_of(cmd(&mut s, "EXPN list")),
            b"502 5.5.1 EXPN command is disabled\r\n"
        );
        assert_eq!(
            reply_of(cmd(&mut s, "BDAT 10 LAST")),
            b"502 5.5.1 BDAT is not supported, use DATA\r\n"
        );
        assert!(matches!(cmd(&mut s, "QUIT"), Action::Close(..)));
        for _ in 0..3 {
            assert!(matches!(cmd(&mut s, "BOGUS"), Action::Reply(_)));
        }
        assert_eq!(
            reply_of(cmd(&mut s, "BOGUS")),
            b"421 4.7.0 Too many errors, closing connection\r\n"
        );
    }

    #[test]
    fn data_violations_end_the_transaction() {
        let mut s = Session::new(settings(false, false), caps(), false);
        s.tx = Some(Transaction {
            from: "".into(),
            params: MailParams::default(),
            rcpts: vec!["a@b".into()],
            rcpt_attempts: 1,
        });
        let r = s
            .data_received(&Err(Violation::BareNewline), 1000, false)
            .unwrap();
        assert_eq!(r.outcome, TxOutcome::Rejected);
        assert_eq!(
            reply_of(r.action),
            b"550 5.6.0 Message contains bare CR or LF; lines must end with CRLF\r\n"
        );
        assert!(s.tx.is_none());
    }

    /// Issue 16: what `dkim_sign` refuses ends the transaction with its reply.
    #[test]
    fn signing_refusals_end_the_transaction() {
        use crate::sign::Refusal;
        for (refusal, outcome, want) in [
            (
                Refusal::UnknownDomain,
                TxOutcome::Rejected,
                "550 5.7.1 Not authorized to send mail with this From domain\r\n",
            ),
            (
                Refusal::TooManyFields(70),
                TxOutcome::Rejected,
                "550 5.6.0 Message has 70 header fields to sign, at most 64 can be\r\n",
            ),
            (
                Refusal::NotSigned,
                TxOutcome::Tempfail,
                "451 4.3.0 Message could not be signed, try again later\r\n",
            ),
        ] {
            let mut s = Session::new(settings(false, false), caps(), false);
            s.tx = Some(Transaction {
                from: "alice@example.org".into(),
                params: MailParams::default(),
                rcpts: vec!["a@b".into()],
                rcpt_attempts: 1,
            });
            let r = s.signing_refused(refusal);
            assert_eq!(r.outcome, outcome);
            assert_eq!(String::from_utf8(reply_of(r.action)).unwrap(), want);
            assert!(s.tx.is_none());
        }
    }

    fn auth_session() -> Session {
        let mut s = Session::new(
            Settings {
                auth: AuthMode::Required,
                ..settings(true, true)
            },
            caps(),
            false,
        );
        cmd(&mut s, "EHLO c");
        s
    }

    #[test]
    fn auth_only_over_tls_and_required_before_mail() {
        let mut s = auth_session();
        let r = String::from_utf8(reply_of(cmd(&mut s, "EHLO c"))).unwrap();
        assert!(!r.contains("AUTH"), "never offered in plaintext: {r}");
        assert_eq!(
            reply_of(cmd(&mut s, "AUTH PLAIN AGEAYg==")),
            b"530 5.7.0 Must issue a STARTTLS command first\r\n"
        );
        s.tls_started();
        let r = String::from_utf8(reply_of(cmd(&mut s, "EHLO c"))).unwrap();
        assert!(r.ends_with("250 AUTH PLAIN LOGIN\r\n"), "{r}");
        assert_eq!(
            reply_of(cmd(&mut s, "MAIL FROM:<a@b.example>")),
            b"530 5.7.0 Authentication required\r\n"
        );
        // PLAIN with initial response: \0alice\0secret
        let Action::Authenticate(c) = cmd(&mut s, "AUTH PLAIN AGFsaWNlAHNlY3JldA==") else {
            panic!()
        };
        assert_eq!(c.user, "alice");
        assert_eq!(c.password.0, "secret");
        assert!(!format!("{c:?}").contains("secret"));
        assert_eq!(
            reply_of(
                s.auth_result("alice", Outcome::Reply(535, vec![]))
                    .into_action()
            ),
            b"535 5.7.8 Authentication credentials invalid\r\n"
        );
        assert!(s.auth_user.is_none());
        let Action::Authenticate(_) = cmd(&mut s, "AUTH PLAIN AGFsaWNlAHNlY3JldA==") else {
            panic!()
        };
        assert_eq!(
            reply_of(
                s.auth_result("alice", Outcome::Reply(235, vec![]))
                    .into_action()
            ),
            b"235 2.7.0 Authentication successful\r\n"
        );
        assert_eq!(
            reply_of(cmd(&mut s, "AUTH PLAIN AGFsaWNlAHNlY3JldA==")),
            b"503 5.5.1 Already authenticated\r\n"
        );
        assert!(matches!(
            cmd(&mut s, "MAIL FROM:<a@b.example>"),
            Action::Relay(_)
        ));
    }

    #[test]
    fn auth_continuations() {
        let mut s = auth_session();
        s.tls_started();
        cmd(&mut s, "EHLO c");
        assert_eq!(reply_of(cmd(&mut s, "AUTH LOGIN")), b"334 VXNlcm5hbWU6\r\n");
        assert!(s.awaiting_auth_line());
        assert_eq!(reply_of(s.auth_line(b"YWxpY2U=")), b"334 UGFzc3dvcmQ6\r\n");
        let Action::Authenticate(c) = s.auth_line(b"c2VjcmV0") else {
            panic!()
        };
        assert_eq!(
            (c.user.as_str(), c.password.0.as_str()),
            ("alice", "secret")
        );
        assert_eq!(reply_of(cmd(&mut s, "AUTH PLAIN")), b"334 \r\n");
        assert_eq!(
            reply_of(s.auth_line(b"*")),
            b"501 5.0.0 Authentication cancelled\r\n"
        );
        assert!(!s.awaiting_auth_line());
        assert_eq!(reply_of(cmd(&mut s, "AUTH PLAIN")), b"334 \r\n");
        assert_eq!(
            reply_of(s.auth_line(b"!!notbase64")),
            b"501 5.5.2 Cannot decode the response\r\n"
        );
        assert_eq!(
            reply_of(cmd(&mut s, "AUTH CRAM-MD5")),
            b"504 5.5.4 Unrecognized authentication type\r\n"
        );
        // authzid for someone else is refused like a wrong password
        assert_eq!(
            reply_of(cmd(&mut s, "AUTH PLAIN Ym9iAGFsaWNlAHNlY3JldA==")),
            b"535 5.7.8 Authentication credentials invalid\r\n"
        );
    }

    /// A backend 5xx other than 535 (a legacy server answering a wrong
    /// password with 554, 500 or 504) is not charged to the policy's lockout
    /// (it may be the backend's trouble), but it counts towards this
    /// session's `max_login_failures` and `max_errors`: guessing against such
    /// a server stays bounded per session.
    #[test]
    fn backend_5xx_other_than_535_counts_per_session() {
        let mut s = auth_session();
        s.tls_started();
        cmd(&mut s, "EHLO c");
        for code in [554, 504] {
            let r = s.auth_result("alice", Outcome::Reply(code, vec![]));
            assert!(
                matches!(r, LoginResult::Refused(_)),
                "backend {code}: {r:?}"
            );
            assert_eq!(
                reply_of(r.into_action()),
                reply::auth_temporary().to_bytes(),
                "backend {code}"
            );
        }
        assert_eq!(
            s.auth_result("alice", Outcome::Reply(500, vec![])),
            LoginResult::Refused(Action::Close(
                reply::too_many_auth_failures(),
                Ending::Refused
            )),
            "third 5xx ends the session"
        );
        assert_eq!(s.errors, 3);
        // a 4xx is still the backend's trouble, never counted
        let mut s = auth_session();
        s.tls_started();
        cmd(&mut s, "EHLO c");
        for _ in 0..5 {
            assert_eq!(
                reply_of(
                    s.auth_result("alice", Outcome::Reply(454, vec![]))
                        .into_action()
                ),
                reply::auth_temporary().to_bytes()
            );
        }
        assert_eq!(s.errors, 0);
    }

    /// User names with whitespace are refused as POP3 does (`alice` and
    /// `alice ` would be two limiter keys); a password holding NUL would be
    /// re-encoded as a PLAIN message with an extra field: refused locally
    /// and counted as a failure.
    #[test]
    fn auth_user_whitespace_and_nul_password_refused() {
        let mut s = auth_session();
        s.tls_started();
        cmd(&mut s, "EHLO c");
        for user in ["alice ", " alice", "al ice", "al\tice"] {
            let ir = b64(format!("\0{user}\0secret").as_bytes());
            assert_eq!(
                reply_of(cmd(&mut s, &format!("AUTH PLAIN {ir}"))),
                reply::auth_bad_user().to_bytes(),
                "{user:?}"
            );
            assert!(matches!(
                cmd(&mut s, &format!("AUTH LOGIN {}", b64(user.as_bytes()))),
                Action::Reply(r) if r == reply::auth_bad_user()
            ));
        }
        assert!(matches!(
            cmd(&mut s, &format!("AUTH LOGIN {}", b64(b"alice"))),
            Action::AuthChallenge(_)
        ));
        assert_eq!(
            reply_of(s.auth_line(b64(b"sec\0ret").as_bytes())),
            reply::auth_failed().to_bytes()
        );
        assert_eq!(s.auth_failures, 1);
    }

    fn b64(raw: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(raw)
    }

    /// Issue 11 item 5: failed AUTH attempts count per session (backend 535s
    /// and local refusals alike); the last allowed one ends it with 421.
    #[test]
    fn auth_failures_end_the_session() {
        let mut s = auth_session();
        s.tls_started();
        cmd(&mut s, "EHLO c");
        let Action::Authenticate(c) = cmd(&mut s, "AUTH PLAIN AGFsaWNlAHdyb25n") else {
            panic!()
        };
        assert_eq!(
            reply_of(
                s.auth_result(&c.user, Outcome::Reply(535, vec![]))
                    .into_action()
            ),
            b"535 5.7.8 Authentication credentials invalid\r\n"
        );
        // a temporary backend failure is not a failed attempt
        assert!(matches!(
            s.auth_result(&c.user, Outcome::Unavailable),
            LoginResult::Undecided(Action::Reply(_))
        ));
        // authzid for someone else: refused locally, counted too
        assert_eq!(
            reply_of(cmd(&mut s, "AUTH PLAIN Ym9iAGFsaWNlAHNlY3JldA==")),
            b"535 5.7.8 Authentication credentials invalid\r\n"
        );
        let Action::Authenticate(c) = cmd(&mut s, "AUTH PLAIN AGFsaWNlAHdyb25n") else {
            panic!()
        };
        let a = s
            .auth_result(&c.user, Outcome::Reply(535, vec![]))
            .into_action();
        assert_eq!(
            a,
            Action::Close(reply::too_many_auth_failures(), Ending::Refused),
            "third failure"
        );
        assert_eq!(
            reply_of(a),
            b"421 4.7.0 Too many failed authentication attempts, closing connection\r\n"
        );
        // the limit comes from the settings
        let mut s = Session::new(
            Settings {
                auth: AuthMode::Required,
                max_login_failures: 1,
                ..settings(true, true)
            },
            caps(),
            true,
        );
        cmd(&mut s, "EHLO c");
        assert!(matches!(
            s.auth_result("x", Outcome::Reply(535, vec![])),
            LoginResult::Failed(Action::Close(..))
        ));
    }

    /// Issue 11 item 5: user names with control characters or over 255
    /// octets never reach the backend or the limiter: 501 5.5.2 locally.
    #[test]
    fn user_names_are_checked() {
        let mut s = auth_session();
        s.settings.max_errors = 1000;
        s.tls_started();
        cmd(&mut s, "EHLO c");
        let bad_users: Vec<String> = vec![
            "al\u{1}ice".into(),
            "alice\r\nX".into(),
            "alice\u{7f}".into(),
            "alice\u{85}".into(),
            "alice\u{9b}31m".into(),
            "\u{1b}[2Jalice".into(),
            "a".repeat(256),
        ];
        for user in &bad_users {
            let plain = b64(format!("\0{user}\0secret").as_bytes());
            assert_eq!(
                reply_of(cmd(&mut s, &format!("AUTH PLAIN {plain}"))),
                b"501 5.5.2 Invalid user name\r\n",
                "PLAIN authcid {user:?}"
            );
            let plain = b64(format!("{user}\0alice\0secret").as_bytes());
            assert_eq!(
                reply_of(cmd(&mut s, &format!("AUTH PLAIN {plain}"))),
                b"501 5.5.2 Invalid user name\r\n",
                "PLAIN authzid {user:?}"
            );
            let login = b64(user.as_bytes());
            assert_eq!(
                reply_of(cmd(&mut s, &format!("AUTH LOGIN {login}"))),
                b"501 5.5.2 Invalid user name\r\n",
                "LOGIN initial {user:?}"
            );
            assert_eq!(reply_of(cmd(&mut s, "AUTH LOGIN")), b"334 VXNlcm5hbWU6\r\n");
            assert_eq!(
                reply_of(s.auth_line(login.as_bytes())),
                b"501 5.5.2 Invalid user name\r\n",
                "LOGIN continuation {user:?}"
            );
            assert!(!s.awaiting_auth_line());
        }
        // 255 octets (multi-byte characters count as octets) is the most
        let ok_user = "\u{e9}".repeat(127) + "a";
        assert_eq!(ok_user.len(), 255);
        let Action::Authenticate(c) = cmd(
            &mut s,
            &format!("AUTH PLAIN {}", b64(format!("\0{ok_user}\0pw").as_bytes())),
        ) else {
            panic!()
        };
        assert_eq!(c.user, ok_user);
        let too_long = "\u{e9}".repeat(128);
        assert_eq!(
            reply_of(cmd(
                &mut s,
                &format!("AUTH PLAIN {}", b64(format!("\0{too_long}\0pw").as_bytes()))
            )),
            b"501 5.5.2 Invalid user name\r\n"
        );
    }

    /// Issue 19 item 2: MAIL commands per session are capped; the one beyond
    /// the cap gets 421 and the session ends.
    #[test]
    fn max_transactions_closes() {
        let mut s = Session::new(
            Settings {
                max_transactions: 3,
                ..settings(false, false)
            },
            caps(),
            false,
        );
        cmd(&mut s, "EHLO c");
        for i in 0..3 {
            let Action::Relay(op) = cmd(&mut s, "MAIL FROM:<a@b.example>") else {
                panic!("MAIL {i}")
            };
            ok250(&mut s, op);
            assert!(matches!(cmd(&mut s, "RSET"), Action::Reply(_)));
        }
        assert_eq!(
            cmd(&mut s, "MAIL FROM:<a@b.example>"),
            Action::Close(reply::too_many_transactions(), Ending::Refused)
        );
        assert_eq!(
            reply_of(cmd(&mut s, "MAIL FROM:<a@b.example>")),
            b"421 4.7.0 Too many transactions in one session, closing connection\r\n"
        );
        // refused MAILs (before the backend) do not count
        let mut s = Session::new(
            Settings {
                max_transactions: 1,
                ..settings(false, false)
            },
            caps(),
            false,
        );
        assert!(matches!(
            cmd(&mut s, "MAIL FROM:<a@b.example>"),
            Action::Reply(_)
        ));
        cmd(&mut s, "EHLO c");
        assert!(matches!(
            cmd(&mut s, "MAIL FROM:<a@b.example> SIZE=5000"),
            Action::Reply(_)
        ));
        assert!(matches!(
            cmd(&mut s, "MAIL FROM:<a@b.example>"),
            Action::Relay(_)
        ));
    }

    #[test]
    fn data_structure_violations() {
        for (v, want) in [
            (
                Violation::FoldedFirstLine,
                &b"550 5.6.0 Message must not start with a folded (indented) line\r\n"[..],
            ),
            (
                Violation::HeaderTooBig,
                b"552 5.3.4 Message header exceeds 1000 fields or 1 MiB\r\n",
            ),
            (
                Violation::NoMemory,
                b"452 4.3.1 Insufficient system storage, try again later\r\n",
            ),
        ] {
            let mut s = Session::new(settings(false, false), caps(), false);
            s.tx = Some(Transaction {
                from: "".into(),
                params: MailParams::default(),
                rcpts: vec!["a@b".into()],
                rcpt_attempts: 1,
            });
            let end = s.data_received(&Err(v), 1000, false).unwrap();
            assert_eq!(reply_of(end.action), want);
            assert!(s.tx.is_none());
        }
    }

    fn verdict_of(action: PolicyAction, check: &'static str, reason: &str) -> AuthVerdict {
        AuthVerdict {
            action,
            check,
            reason: reason.into(),
        }
    }

    /// A session in a transaction with one accepted recipient.
    fn in_transaction(s: &mut Session) {
        cmd(s, "EHLO c");
        let Action::Relay(op) = cmd(s, "MAIL FROM:<a@b.example>") else {
            panic!("MAIL")
        };
        ok250(s, op);
        let Action::Relay(op) = cmd(s, "RCPT TO:<x@y.example>") else {
            panic!("RCPT")
        };
        ok250(s, op);
    }

    /// An authenticated session (over TLS, AUTH PLAIN accepted by the backend).
    fn logged_in() -> Session {
        let mut s = auth_session();
        s.tls_started();
        cmd(&mut s, "EHLO c");
        let Action::Authenticate(c) = cmd(&mut s, "AUTH PLAIN AGFsaWNlAHNlY3JldA==") else {
            panic!()
        };
        assert!(matches!(
            s.auth_result(&c.user, Outcome::Reply(235, vec![])),
            LoginResult::Succeeded(Action::Reply(_))
        ));
        s
    }

    /// Issue 12 item 3: the SPF verdict at MAIL FROM becomes its reply here,
    /// not in the driver: `fail: reject` is 550 5.7.23 (RFC 7372).
    #[test]
    fn spf_verdicts_at_mail() {
        let mut s = Session::new(settings(false, false), caps(), false);
        let v = verdict_of(PolicyAction::Reject, "spf", "192.0.2.1 is not allowed");
        let Checked::Refused(a) = s.spf_checked(&v) else {
            panic!("refused")
        };
        assert_eq!(
            reply_of(a),
            b"550 5.7.23 Rejected by spf check: 192.0.2.1 is not allowed\r\n"
        );
        let v = verdict_of(PolicyAction::Tempfail, "spf", "DNS timeout");
        let Checked::Refused(a) = s.spf_checked(&v) else {
            panic!("refused")
        };
        assert_eq!(
            reply_of(a),
            b"451 4.7.24 Temporary spf failure, try again later: DNS timeout\r\n"
        );
        let v = |action| verdict_of(action, "spf", "x");
        assert_eq!(
            s.spf_checked(&v(PolicyAction::Delay)),
            Checked::Delay(Duration::from_secs(5))
        );
        assert_eq!(s.spf_checked(&v(PolicyAction::Shadow)), Checked::Shadow);
        assert_eq!(s.spf_checked(&v(PolicyAction::Tag)), Checked::Pass);
        assert_eq!(s.spf_checked(&v(PolicyAction::Accept)), Checked::Pass);
    }

    /// Issue 12 item 3: policy refusals at HELO/EHLO, MAIL and RCPT. A
    /// rate-limited HELO closes the session with 421; a rejected one does not.
    #[test]
    fn policy_refusals() {
        let mut s = Session::new(settings(false, false), caps(), false);
        let a = s.policy_refused(PolicyStage::Helo, PolicyAction::Tempfail);
        assert_eq!(
            a,
            Action::Close(
                reply::helo_policy_tempfail(),
                Ending::Because("HELO rate limit")
            )
        );
        assert_eq!(
            reply_of(a),
            b"421 4.7.0 Rate limit exceeded, closing connection\r\n"
        );
        assert_eq!(
            s.policy_refused(PolicyStage::Helo, PolicyAction::Reject),
            Action::Reply(reply::policy_reject())
        );
        assert_eq!(
            reply_of(s.policy_refused(PolicyStage::Helo, PolicyAction::Reject)),
            b"550 5.7.1 Refused by local policy\r\n"
        );
        for stage in [PolicyStage::Mail, PolicyStage::Rcpt] {
            assert_eq!(
                reply_of(s.policy_refused(stage, PolicyAction::Tempfail)),
                b"451 4.7.1 Rate limit exceeded, try again later\r\n",
                "{stage:?}"
            );
            assert_eq!(
                reply_of(s.policy_refused(stage, PolicyAction::Reject)),
                b"550 5.7.1 Refused by local policy\r\n",
                "{stage:?}"
            );
        }
        // refusals are not protocol errors: they never add up to a 421
        for _ in 0..50 {
            assert!(matches!(
                s.policy_refused(PolicyStage::Mail, PolicyAction::Reject),
                Action::Reply(_)
            ));
        }
    }

    /// Issue 12 item 3: a login the policy locks out is 454 and not counted
    /// as a failed attempt; a policy `reject` looks like (and counts as) a
    /// wrong password, up to the 421 at the session's limit.
    #[test]
    fn login_refused_by_policy() {
        let mut s = auth_session();
        s.tls_started();
        cmd(&mut s, "EHLO c");
        for _ in 0..5 {
            assert_eq!(
                reply_of(s.login_refused(PolicyAction::Tempfail).into_action()),
                b"454 4.7.0 Too many failed authentication attempts, try again later\r\n"
            );
        }
        assert_eq!(
            reply_of(s.login_refused(PolicyAction::Reject).into_action()),
            b"535 5.7.8 Authentication credentials invalid\r\n"
        );
        assert_eq!(
            reply_of(s.login_refused(PolicyAction::Reject).into_action()),
            b"535 5.7.8 Authentication credentials invalid\r\n"
        );
        assert_eq!(
            s.login_refused(PolicyAction::Reject),
            LoginResult::Undecided(Action::Close(
                reply::too_many_auth_failures(),
                Ending::Refused
            )),
            "third counted failure"
        );
        // how backend answers count for the login policy
        assert!(matches!(
            s.auth_result("a", Outcome::Reply(535, vec![])),
            LoginResult::Failed(_)
        ));
        assert!(matches!(
            s.auth_result("a", Outcome::Failed),
            LoginResult::Undecided(_)
        ));
        assert!(matches!(
            s.auth_result("a", Outcome::Reply(235, vec![])),
            LoginResult::Succeeded(_)
        ));
    }

    /// Issue 12 item 3: a backend connection lost at MAIL, RCPT or the end of
    /// DATA is 451 4.4.2; the session goes on (a new connection next time).
    #[test]
    fn backend_lost_is_451() {
        let mut s = Session::new(settings(false, false), caps(), false);
        cmd(&mut s, "EHLO c");
        let Action::Relay(op) = cmd(&mut s, "MAIL FROM:<a@b.example>") else {
            panic!()
        };
        assert_eq!(
            s.relayed(op, Outcome::Failed),
            Action::Reply(reply::backend_failed())
        );
        assert_eq!(
            reply::backend_failed().to_bytes(),
            b"451 4.4.2 Connection to mail server lost, try again later\r\n"
        );
        in_transaction(&mut s);
        assert!(s.data_received(&Ok(Vec::new()), 1000, false).is_none());
        let end = s.delivered(Outcome::Failed);
        assert_eq!(
            end,
            DataEnd {
                action: Action::Reply(reply::backend_failed()),
                outcome: TxOutcome::Tempfail,
            }
        );
        assert!(s.tx.is_none());
    }

    /// Issue 12 item 3: in an authenticated session the same loss is 451 and
    /// then 421 and close: a new backend connection would not be
    /// authenticated (we keep no passwords). A refusal by a backend that is
    /// still there is not a loss.
    #[test]
    fn authenticated_backend_lost_closes() {
        let closing = |first: Reply| {
            Action::Then(
                first,
                Box::new(Action::Close(
                    reply::backend_lost_closing(),
                    Ending::Because("backend lost in an authenticated session"),
                )),
            )
        };
        let mut s = logged_in();
        let Action::Relay(op) = cmd(&mut s, "MAIL FROM:<a@b.example>") else {
            panic!()
        };
        let a = s.relayed(op, Outcome::Failed);
        assert_eq!(a, closing(reply::backend_failed()));
        assert_eq!(
            reply_of(a),
            b"451 4.4.2 Connection to mail server lost, try again later\r\n\
              421 4.4.2 Connection to mail server lost, closing connection\r\n"
        );
        // out of step: that connection is dropped as well
        let mut s = logged_in();
        let Action::Relay(op) = cmd(&mut s, "MAIL FROM:<a@b.example>") else {
            panic!()
        };
        assert_eq!(
            s.relayed(op, Outcome::Reply(221, vec![])),
            closing(reply::backend_bad_reply())
        );
        // at the end of DATA
        let mut s = logged_in();
        in_transaction(&mut s);
        assert!(s.data_received(&Ok(Vec::new()), 1000, false).is_none());
        let end = s.delivered(Outcome::Unavailable);
        assert_eq!(end.action, closing(reply::backend_unavailable()));
        assert_eq!(end.outcome, TxOutcome::Tempfail);
        // the backend refused, its connection is still there
        let mut s = logged_in();
        let Action::Relay(op) = cmd(&mut s, "MAIL FROM:<a@b.example>") else {
            panic!()
        };
        assert!(matches!(
            s.relayed(op, Outcome::Reply(451, vec![])),
            Action::Reply(_)
        ));
        in_transaction(&mut s);
        let end = s.delivered(Outcome::Reply(554, vec!["no".into()]));
        assert_eq!(reply_of(end.action), b"554 5.0.0 no\r\n");
        assert_eq!(end.outcome, TxOutcome::Rejected);
    }

    /// Issue 12 item 3: the message's verdict at the end of DATA. DMARC
    /// `reject` is 550 and ends the transaction (counted as rejected); a
    /// tempfail is 451 (counted as tempfail); others let it through.
    #[test]
    fn message_verdicts() {
        let mut s = Session::new(settings(false, false), caps(), false);
        in_transaction(&mut s);
        assert!(s.data_received(&Ok(Vec::new()), 1000, false).is_none());
        let v = verdict_of(PolicyAction::Reject, "dmarc", "example.org p=reject");
        let Checked::Refused(end) = s.message_verdict(&v) else {
            panic!("refused")
        };
        assert_eq!(end.outcome, TxOutcome::Rejected);
        assert_eq!(
            reply_of(end.action),
            b"550 5.7.1 Rejected by dmarc check: example.org p=reject\r\n"
        );
        assert!(s.tx.is_none(), "transaction over");
        in_transaction(&mut s);
        let v = verdict_of(PolicyAction::Tempfail, "dkim", "key lookup failed");
        let Checked::Refused(end) = s.message_verdict(&v) else {
            panic!("refused")
        };
        assert_eq!(end.outcome, TxOutcome::Tempfail);
        assert_eq!(
            reply_of(end.action),
            b"451 4.7.5 Temporary dkim failure, try again later: key lookup failed\r\n"
        );
        let v = verdict_of(PolicyAction::Reject, "dkim", "bad signature");
        let Checked::Refused(end) = s.message_verdict(&v) else {
            panic!("refused")
        };
        assert!(reply_of(end.action).starts_with(b"550 5.7.20 "));
        in_transaction(&mut s);
        for (action, want) in [
            (PolicyAction::Accept, Checked::Pass),
            (PolicyAction::Tag, Checked::Pass),
            (PolicyAction::Shadow, Checked::Shadow),
            (PolicyAction::Delay, Checked::Delay(Duration::from_secs(5))),
        ] {
            let v = verdict_of(action, "dmarc", "x");
            assert_eq!(s.message_verdict(&v), want, "{action:?}");
            assert!(s.tx.is_some(), "{action:?}: transaction goes on");
        }
    }

    /// Issue 12 item 3: DATA while the in-flight budget is spent: 452 4.3.1,
    /// counted as tempfail, and the transaction stays for another DATA.
    #[test]
    fn inflight_budget_spent_is_452() {
        let mut s = Session::new(settings(false, false), caps(), false);
        in_transaction(&mut s);
        assert!(matches!(cmd(&mut s, "DATA"), Action::ReadData(_)));
        let end = s.inflight_refused();
        assert_eq!(end.outcome, TxOutcome::Tempfail);
        assert_eq!(
            reply_of(end.action),
            b"452 4.3.1 Insufficient system storage, try again later\r\n"
        );
        assert!(s.tx.is_some());
        assert!(matches!(cmd(&mut s, "DATA"), Action::ReadData(_)));
        // at the end of DATA (the verification copy did not fit): the
        // transaction is over, nothing relayed
        let end = s.verification_copy_refused();
        assert_eq!(end.outcome, TxOutcome::Tempfail);
        assert_eq!(
            reply_of(end.action),
            b"452 4.3.1 Insufficient system storage, try again later\r\n"
        );
        assert!(s.tx.is_none());
    }

    /// A message with bare line endings (normalised) gets its answer, then
    /// the session closes: after a violation, a refusal or the delivery.
    #[test]
    fn smuggling_guard_closes_after_the_answer() {
        let guard = Ending::Because(SMUGGLING);
        let mut s = Session::new(settings(false, false), caps(), false);
        in_transaction(&mut s);
        let end = s
            .data_received(&Err(Violation::TooBig), 1000, true)
            .unwrap();
        assert_eq!(end.action, Action::Close(reply::size_exceeded(), guard));
        in_transaction(&mut s);
        assert!(s.data_received(&Ok(Vec::new()), 1000, true).is_none());
        let end = s.delivered(Outcome::Reply(250, vec!["queued".into()]));
        assert_eq!(end.outcome, TxOutcome::Accepted);
        assert!(matches!(end.action, Action::Close(_, g) if g == guard));
        // the next message without bare line endings does not close
        in_transaction(&mut s);
        assert!(s.data_received(&Ok(Vec::new()), 1000, false).is_none());
        let end = s.delivered(Outcome::Reply(250, vec!["queued".into()]));
        assert!(matches!(end.action, Action::Reply(_)));
        in_transaction(&mut s);
        assert!(s.data_received(&Ok(Vec::new()), 1000, true).is_none());
        let v = verdict_of(PolicyAction::Reject, "dmarc", "p=reject");
        let Checked::Refused(end) = s.message_verdict(&v) else {
            panic!()
        };
        assert!(matches!(end.action, Action::Close(_, g) if g == guard));
    }

    /// QUIT ends the session as a quit; the other closes as refusals. The
    /// replies for the driver's own events come from here as well.
    #[test]
    fn endings_and_idle_replies() {
        use crate::conn::Replies;
        let mut s = Session::new(settings(false, false), caps(), false);
        assert_eq!(
            cmd(&mut s, "QUIT"),
            Action::Close(reply::bye(), Ending::Quit)
        );
        assert_eq!(reply_of(cmd(&mut s, "QUIT")), b"221 2.0.0 Bye\r\n");
        assert_eq!(
            s.timed_out().to_bytes(),
            b"421 4.4.2 Timeout exceeded, closing connection\r\n"
        );
        assert_eq!(
            s.session_over().to_bytes(),
            b"421 4.4.2 Session time limit exceeded, closing connection\r\n"
        );
        assert_eq!(
            s.shutting_down().to_bytes(),
            b"421 4.3.2 Service shutting down, try again later\r\n"
        );
    }
}
