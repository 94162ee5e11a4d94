//! The client-facing POP3 AUTHORIZATION state, sans-IO. The driver feeds it
//! raw command lines and the outcomes of backend logins and of the login
//! policy; it answers with an [`Action`]: every reply mailgate sends before
//! login is chosen here (those the layer writes when it ends a wait too,
//! through [`Replies`]), none in the driver. After a successful login the
//! session is over for this module:
//! the driver hands both connections to the pipe, where `transaction.rs`
//! parses every command and the backend's answers pass unchanged.

use super::command::{self, Command, ParseError};
use super::reply;
/// The replies in [`Action`]s (built in `reply.rs`, chosen here).
pub use super::reply::Reply;
use crate::action::PolicyAction;
use crate::backend::caps::Pop3Caps;
use crate::backend::pop3::{Login, LoginReply};
use crate::conn::sasl::{self, Plain, SaslError};
pub use crate::conn::Ending;
use crate::conn::Replies;
use std::borrow::Cow;

/// What became of a login on the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginOutcome {
    /// `+OK` with this text: the session becomes a pipe.
    Accepted(String),
    /// `-ERR` with this text.
    Rejected(String),
    /// The backend offers no method that can carry this login.
    Unsupported,
    /// No connection could be made.
    Unavailable,
    /// The connection failed or timed out in the middle.
    Failed,
    /// The backend sent something that is not a POP3 status line.
    Invalid,
    /// The backend spoke out of turn (unsolicited data) or had closed before
    /// a login command: its next reply would not have been the answer.
    /// Temporary, never a login result.
    OutOfStep,
}

/// The session's answer to a login, and how the login guard counts it
/// (`conn/login.rs`).
pub type LoginResult = crate::conn::login::LoginResult<Action>;

/// Why the session closed after too many failed logins (the session-end log).
const LOGIN_FAILURES: &str = "too many login failures";

impl From<LoginReply> for LoginOutcome {
    fn from(r: LoginReply) -> Self {
        match r {
            LoginReply::Accepted(text) => LoginOutcome::Accepted(text),
            LoginReply::Rejected(text) => LoginOutcome::Rejected(text),
            LoginReply::Unsupported => LoginOutcome::Unsupported,
            LoginReply::OutOfStep => LoginOutcome::OutOfStep,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub hostname: String,
    /// STLS may be offered (a `starttls` listener with a TLS configuration).
    pub starttls: bool,
    pub require_tls: bool,
    pub apop: bool,
    pub max_errors: u32,
    pub max_login_failures: u32,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Reply(Reply),
    /// Reply, then close the connection.
    Close(Reply, Ending),
    /// Reply `+OK`, discard buffered input, run the TLS handshake, then `tls_started`.
    StartTls(Reply),
    /// Answer CAPA with [`Session::capa`]. `probe`: the backend may be asked
    /// for its capabilities if they are not known yet (only where a login
    /// could follow: nothing reaches the backend before TLS on a TLS-only listener).
    Capa {
        probe: bool,
    },
    /// Run this login through the login guard: the policy (a refusal:
    /// `login_refused`), the replay on the backend, then `login_result`.
    Login(Login),
    /// Reply (the backend's `+OK`) and become a byte pipe to the backend.
    Pipe(Reply),
}

pub struct Session {
    pub settings: Settings,
    pub tls: bool,
    /// The backend's greeting timestamp, when APOP is offered.
    apop_timestamp: Option<String>,
    /// Name from USER, waiting for PASS.
    user: Option<String>,
    /// A `+ ` was sent: the next line is a SASL PLAIN response.
    sasl_pending: bool,
    /// The login in flight was AUTH PLAIN with an authorization identity.
    pending_authzid: bool,
    errors: u32,
    pub failures: u32,
    /// The user of the last login attempt, for the session log line.
    pub last_user: Option<String>,
    pub logged_in: bool,
}

impl Session {
    pub fn new(settings: Settings, tls: bool, apop_timestamp: Option<String>) -> Self {
        Session {
            apop_timestamp: apop_timestamp.filter(|_| settings.apop),
            settings,
            tls,
            user: None,
            sasl_pending: false,
            pending_authzid: false,
            errors: 0,
            failures: 0,
            last_user: None,
            logged_in: false,
        }
    }

    pub fn greeting(&self) -> Reply {
        reply::greeting(&self.settings.hostname, self.apop_timestamp.as_deref())
    }

    /// Login commands are accepted now (TLS is active or not required).
    pub fn login_allowed(&self) -> bool {
        self.tls || !self.settings.require_tls
    }

    /// Protocol errors so far (they keep counting after login).
    pub fn errors(&self) -> u32 {
        self.errors
    }

    /// The next line is a SASL response, not a command (never log it).
    pub fn awaiting_sasl(&self) -> bool {
        self.sasl_pending
    }

    fn error(&mut self, r: Reply) -> Action {
        self.errors += 1;
        if self.errors >= self.settings.max_errors {
            Action::Close(reply::too_many_errors(), Ending::Refused)
        } else {
            Action::Reply(r)
        }
    }

    /// A line longer than the command limit.
    pub fn line_too_long(&mut self) -> Action {
        self.sasl_pending = false;
        self.error(reply::line_too_long())
    }

    /// One input line (without CRLF).
    pub fn line(&mut self, line: &[u8]) -> Action {
        if self.sasl_pending {
            self.sasl_pending = false;
            return self.sasl_response(line);
        }
        match command::parse(line) {
            Ok(c) => self.command(c),
            Err(ParseError::Unknown) => self.error(reply::unknown_command()),
            Err(ParseError::Bytes) => self.error(reply::bad_bytes()),
            Err(ParseError::Syntax(why)) => self.error(reply::syntax(why)),
        }
    }

    fn command(&mut self, cmd: Command) -> Action {
        match cmd {
            Command::Capa => Action::Capa {
                probe: self.login_allowed(),
            },
            Command::Stls => {
                if self.tls {
                    self.error(reply::tls_already_active())
                } else if !self.settings.starttls {
                    self.error(reply::stls_unavailable())
                } else {
                    Action::StartTls(reply::stls_ready())
                }
            }
            Command::Quit => Action::Close(reply::bye(), Ending::Quit),
            Command::Noop => Action::Reply(reply::noop()),
            Command::Transaction(_) => self.error(reply::not_logged_in()),
            // every login command: refused before TLS where TLS is required,
            // before anything is remembered or sent anywhere
            _ if !self.login_allowed() => {
                self.user = None;
                self.error(reply::tls_required())
            }
            Command::User(u) => {
                // answered here: the backend sees USER and PASS together at PASS
                self.user = Some(u);
                Action::Reply(reply::user_accepted())
            }
            Command::Pass(pass) => match self.user.take() {
                None => self.error(reply::need_user()),
                Some(user) => self.login(Login::Password { user, pass }),
            },
            Command::Auth { mechanism, initial } => {
                self.user = None;
                match (mechanism.as_deref(), initial) {
                    (None, _) => Action::Reply(reply::auth_mechanisms()),
                    (Some("PLAIN"), None) => {
                        self.sasl_pending = true;
                        Action::Reply(reply::sasl_continue())
                    }
                    (Some("PLAIN"), Some(ir)) => self.plain(&ir),
                    (Some(_), _) => self.error(reply::mechanism_unsupported()),
                }
            }
            Command::Apop { user, digest } => {
                self.user = None;
                if self.apop_timestamp.is_none() {
                    return self.error(reply::apop_unavailable());
                }
                self.login(Login::Apop { user, digest })
            }
        }
    }

    fn sasl_response(&mut self, line: &[u8]) -> Action {
        if line == b"*" {
            return Action::Reply(reply::auth_cancelled());
        }
        match std::str::from_utf8(line) {
            Ok(s) => self.plain(s),
            Err(_) => self.error(reply::sasl_bad_base64()),
        }
    }

    fn plain(&mut self, b64: &str) -> Action {
        match sasl::decode_plain(b64) {
            Ok(Plain {
                authzid,
                user,
                pass,
            }) => {
                if authzid.is_empty() || authzid == user {
                    self.login(Login::Password { user, pass })
                } else {
                    self.login(Login::PlainAs {
                        authzid,
                        user,
                        pass,
                    })
                }
            }
            Err(SaslError::Base64) => self.error(reply::sasl_bad_base64()),
            Err(SaslError::Malformed) => self.error(reply::sasl_malformed()),
        }
    }

    fn login(&mut self, login: Login) -> Action {
        self.last_user = Some(login.user().to_string());
        self.pending_authzid = matches!(login, Login::PlainAs { .. });
        Action::Login(login)
    }

    /// The CAPA answer, given what is known about the backend (`None`: nothing
    /// yet, so only what any RFC 1939 server can carry).
    pub fn capa(&self, caps: Option<&Pop3Caps>) -> Reply {
        let mut v: Vec<Cow<'static, str>> = Vec::new();
        if self.settings.starttls && !self.tls {
            v.push("STLS".into());
        }
        if self.login_allowed() && caps.is_none_or(|c| c.user || c.sasl_plain) {
            // either form is replayed in whatever form the backend supports
            v.push("USER".into());
            v.push("SASL PLAIN".into());
        }
        if let Some(c) = caps {
            for (has, name) in [
                (c.top, "TOP"),
                (c.uidl, "UIDL"),
                (c.pipelining, "PIPELINING"),
                (c.resp_codes, "RESP-CODES"),
                (c.auth_resp_code, "AUTH-RESP-CODE"),
            ] {
                if has {
                    v.push(name.into());
                }
            }
        }
        reply::capa(v)
    }

    /// The TLS handshake after STLS succeeded: forget what was said before
    /// (RFC 2595 §4: the client must not trust anything from before TLS).
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.user = None;
        self.sasl_pending = false;
    }

    /// The backend's answer to the login from `Action::Login`. A wrong
    /// password is answered after the failure delay and counts towards
    /// `max_login_failures` (then the session closes); the backend's trouble
    /// is a protocol error, answered at once.
    pub fn login_result(&mut self, outcome: LoginOutcome) -> LoginResult {
        let authzid = std::mem::take(&mut self.pending_authzid);
        match outcome {
            LoginOutcome::Accepted(text) => {
                self.logged_in = true;
                LoginResult::Succeeded(Action::Pipe(Reply::relayed(
                    true,
                    &text,
                    reply::login_ok_default(),
                )))
            }
            LoginOutcome::Rejected(text) => LoginResult::Failed(self.login_failed(Reply::relayed(
                false,
                &text,
                reply::login_failed_default(),
            ))),
            LoginOutcome::Unsupported if authzid => {
                LoginResult::Undecided(self.error(reply::authzid_unsupported()))
            }
            LoginOutcome::Unsupported => {
                LoginResult::Undecided(self.error(reply::backend_cannot_login()))
            }
            LoginOutcome::Unavailable => {
                LoginResult::Undecided(self.error(reply::backend_unavailable()))
            }
            LoginOutcome::Failed | LoginOutcome::OutOfStep => {
                LoginResult::Undecided(self.error(reply::backend_failed()))
            }
            LoginOutcome::Invalid => LoginResult::Undecided(self.error(reply::backend_bad_reply())),
        }
    }

    /// The login policy refused the login before it reached the backend
    /// (failed-login lock, login rate: `tempfail`; or `reject`). Counted
    /// like a wrong password (the client is guessing) and answered after the
    /// failure delay, but not charged to the policy again: `Refused` to the
    /// login guard.
    pub fn login_refused(&mut self, action: PolicyAction) -> LoginResult {
        self.pending_authzid = false;
        let r = if action == PolicyAction::Reject {
            Reply::err(reply::login_failed_default())
        } else {
            reply::login_locked()
        };
        LoginResult::Refused(self.login_failed(r))
    }

    /// A failed login answered with `r`; the session closes once
    /// `max_login_failures` is reached.
    fn login_failed(&mut self, r: Reply) -> Action {
        self.failures += 1;
        if self.failures >= self.settings.max_login_failures {
            Action::Close(r, Ending::Because(LOGIN_FAILURES))
        } else {
            Action::Reply(r)
        }
    }

    /// An APOP listener whose `apop_max_pending` sessions already wait for
    /// login (each holds a backend connection for its timestamp): the
    /// connection is turned away before any greeting.
    pub fn apop_busy() -> Reply {
        reply::apop_busy()
    }
}

impl Replies for Session {
    type Reply = Reply;

    /// No command within `timeouts.command`, the pipe's idle time, or an APOP
    /// listener's `apop_prelogin_timeout`.
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
    use super::*;
    use crate::conn::sasl::base64_encode;

    fn settings() -> Settings {
        Settings {
            hostname: "gw.test".into(),
            starttls: true,
            require_tls: true,
            apop: false,
            max_errors: 5,
            max_login_failures: 2,
        }
    }

    fn wire(a: &Action) -> String {
        let r = match a {
            Action::Reply(r) | Action::Close(r, _) | Action::StartTls(r) | Action::Pipe(r) => r,
            other => panic!("no reply in {other:?}"),
        };
        String::from_utf8(r.to_bytes()).unwrap()
    }

    fn full() -> Pop3Caps {
        Pop3Caps::from_capa(&[
            "TOP",
            "UIDL",
            "RESP-CODES",
            "PIPELINING",
            "AUTH-RESP-CODE",
            "USER",
            "SASL PLAIN LOGIN",
            "EXPIRE NEVER",
        ])
    }

    #[test]
    fn capa_parse() {
        let c = full();
        assert!(c.capa && c.user && c.sasl_plain && c.top && c.uidl && c.pipelining);
        assert!(c.resp_codes && c.auth_resp_code);
        let c = Pop3Caps::from_capa(&["user", "sasl login cram-md5", ""]);
        assert!(c.user && !c.sasl_plain && !c.top);
        assert!(Pop3Caps::rfc1939().user && !Pop3Caps::rfc1939().capa);
    }

    #[test]
    fn capa_lists_by_state() {
        let mut s = Session::new(settings(), false, None);
        assert_eq!(s.line(b"CAPA"), Action::Capa { probe: false });
        // before TLS on a TLS-only listener: no login mechanisms at all
        assert_eq!(
            String::from_utf8(s.capa(Some(&full())).to_bytes()).unwrap(),
            "+OK Capability list follows\r\nSTLS\r\nTOP\r\nUIDL\r\nPIPELINING\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n.\r\n"
        );
        s.tls_started();
        assert_eq!(s.line(b"CAPA"), Action::Capa { probe: true });
        assert_eq!(
            String::from_utf8(s.capa(Some(&full())).to_bytes()).unwrap(),
            "+OK Capability list follows\r\nUSER\r\nSASL PLAIN\r\nTOP\r\nUIDL\r\nPIPELINING\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n.\r\n"
        );
        // unknown backend: conservative
        assert_eq!(
            String::from_utf8(s.capa(None).to_bytes()).unwrap(),
            "+OK Capability list follows\r\nUSER\r\nSASL PLAIN\r\n.\r\n"
        );
        // RFC 1939-only backend
        assert_eq!(
            String::from_utf8(s.capa(Some(&Pop3Caps::rfc1939())).to_bytes()).unwrap(),
            "+OK Capability list follows\r\nUSER\r\nSASL PLAIN\r\n.\r\n"
        );
        // implicit TLS listener: never STLS
        let s = Session::new(
            Settings {
                starttls: false,
                ..settings()
            },
            true,
            None,
        );
        assert!(!String::from_utf8(s.capa(None).to_bytes())
            .unwrap()
            .contains("STLS"));
        // plaintext allowed: USER before TLS, and STLS
        let s = Session::new(
            Settings {
                require_tls: false,
                ..settings()
            },
            false,
            None,
        );
        assert_eq!(
            String::from_utf8(s.capa(None).to_bytes()).unwrap(),
            "+OK Capability list follows\r\nSTLS\r\nUSER\r\nSASL PLAIN\r\n.\r\n"
        );
    }

    #[test]
    fn table() {
        // (line, expected wire reply or action) in one session that starts before TLS
        let mut s = Session::new(settings(), false, None);
        let steps: &[(&[u8], &str)] = &[
            (
                b"USER alice",
                "-ERR [AUTH] Plaintext login is disabled: use STLS first\r\n",
            ),
            (
                b"PASS secret",
                "-ERR [AUTH] Plaintext login is disabled: use STLS first\r\n",
            ),
            (b"NOOP", "+OK\r\n"),
            (b"STAT", "-ERR Not logged in\r\n"),
            (b"BOGUS", "-ERR Unknown command\r\n"),
        ];
        for (line, want) in steps {
            assert_eq!(
                wire(&s.line(line)),
                *want,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        // the fifth error closes
        assert_eq!(
            s.line(b"AUTH PLAIN AGFsaWNlAHNlY3JldA=="),
            Action::Close(reply::too_many_errors(), Ending::Refused)
        );
    }

    #[test]
    fn stls_rules() {
        let mut s = Session::new(settings(), false, None);
        assert_eq!(s.line(b"STLS"), Action::StartTls(reply::stls_ready()));
        s.tls_started();
        assert_eq!(wire(&s.line(b"STLS")), "-ERR TLS is already active\r\n");
        let mut s = Session::new(
            Settings {
                starttls: false,
                ..settings()
            },
            true,
            None,
        );
        assert_eq!(wire(&s.line(b"STLS")), "-ERR TLS is already active\r\n");
        let mut s = Session::new(
            Settings {
                starttls: false,
                require_tls: false,
                ..settings()
            },
            false,
            None,
        );
        assert_eq!(
            wire(&s.line(b"STLS")),
            "-ERR STLS is not available here\r\n"
        );
    }

    #[test]
    fn stls_forgets_user() {
        let mut s = Session::new(
            Settings {
                require_tls: false,
                ..settings()
            },
            false,
            None,
        );
        assert_eq!(wire(&s.line(b"USER alice")), "+OK Send PASS\r\n");
        assert!(matches!(s.line(b"STLS"), Action::StartTls(_)));
        s.tls_started();
        assert_eq!(wire(&s.line(b"PASS secret")), "-ERR USER first\r\n");
    }

    #[test]
    fn user_pass_and_plain_logins() {
        let mut s = Session::new(settings(), true, None);
        assert_eq!(wire(&s.line(b"USER alice")), "+OK Send PASS\r\n");
        assert_eq!(
            s.line(b"PASS se cret"),
            Action::Login(Login::Password {
                user: "alice".into(),
                pass: "se cret".into()
            })
        );
        // RFC 1939: after PASS, USER must come again
        assert_eq!(wire(&s.line(b"PASS x")), "-ERR USER first\r\n");
        assert_eq!(
            s.line(b"AUTH PLAIN AGFsaWNlAHNlY3JldA=="),
            Action::Login(Login::Password {
                user: "alice".into(),
                pass: "secret".into()
            })
        );
        // continuation form
        assert_eq!(wire(&s.line(b"AUTH PLAIN")), "+ \r\n");
        assert!(s.awaiting_sasl());
        assert_eq!(
            s.line(b"AGFsaWNlAHNlY3JldA=="),
            Action::Login(Login::Password {
                user: "alice".into(),
                pass: "secret".into()
            })
        );
        // `*` cancels; the next line is a command again
        assert_eq!(wire(&s.line(b"AUTH PLAIN")), "+ \r\n");
        assert_eq!(wire(&s.line(b"*")), "-ERR Authentication cancelled\r\n");
        assert_eq!(wire(&s.line(b"NOOP")), "+OK\r\n");
        // authzid equal to the user is a plain login; a different one is not
        let same = base64_encode(b"alice\0alice\0pw");
        assert!(matches!(
            s.line(format!("AUTH PLAIN {same}").as_bytes()),
            Action::Login(Login::Password { .. })
        ));
        let other = base64_encode(b"admin\0alice\0pw");
        assert!(matches!(
            s.line(format!("AUTH PLAIN {other}").as_bytes()),
            Action::Login(Login::PlainAs { .. })
        ));
        assert_eq!(
            wire(s.login_result(LoginOutcome::Unsupported).action()),
            "-ERR [AUTH] Authorization identity is not supported by this mail server\r\n"
        );
        assert_eq!(wire(&s.line(b"AUTH")), "+OK\r\nPLAIN\r\n.\r\n");
        assert_eq!(
            wire(&s.line(b"AUTH CRAM-MD5")),
            "-ERR Unsupported authentication mechanism (only PLAIN)\r\n"
        );
        assert_eq!(
            wire(&s.line(b"AUTH PLAIN !!")),
            "-ERR Invalid base64 data\r\n"
        );
        assert_eq!(
            s.line(b"AUTH PLAIN ="),
            Action::Close(reply::too_many_errors(), Ending::Refused)
        );
    }

    #[test]
    fn login_results() {
        let mut s = Session::new(settings(), true, None);
        s.line(b"USER alice");
        assert!(matches!(s.line(b"PASS bad"), Action::Login(_)));
        // a wrong password: counted by the policy, delayed, backend text kept
        assert_eq!(
            s.login_result(LoginOutcome::Rejected(
                " [AUTH] Authentication failed.".into()
            )),
            LoginResult::Failed(Action::Reply(Reply::err("[AUTH] Authentication failed.")))
        );
        // the backend's trouble: answered at once, not counted
        let r = s.login_result(LoginOutcome::Unavailable);
        assert!(matches!(r, LoginResult::Undecided(_)));
        assert_eq!(
            wire(r.action()),
            "-ERR [SYS/TEMP] Mail server temporarily unavailable, try again later\r\n"
        );
        // out of step: temporary, and not a failed login
        let r = s.login_result(LoginOutcome::OutOfStep);
        assert!(matches!(r, LoginResult::Undecided(_)));
        assert_eq!(
            wire(r.action()),
            "-ERR [SYS/TEMP] Connection to the mail server failed, try again later\r\n"
        );
        assert_eq!(
            wire(s.login_result(LoginOutcome::Invalid).action()),
            "-ERR [SYS/TEMP] Mail server sent an invalid response, try again later\r\n"
        );
        assert_eq!(s.failures, 1);
        // the second failure reaches max_login_failures: the reply, then close
        assert_eq!(
            s.login_result(LoginOutcome::Rejected(String::new())),
            LoginResult::Failed(Action::Close(
                Reply::err("[AUTH] Authentication failed"),
                Ending::Because("too many login failures")
            ))
        );
        assert_eq!(s.last_user.as_deref(), Some("alice"));
        let mut s = Session::new(settings(), true, None);
        assert_eq!(
            s.login_result(LoginOutcome::Accepted("Logged in.".into())),
            LoginResult::Succeeded(Action::Pipe(Reply::ok("Logged in.")))
        );
        assert!(s.logged_in);
        assert_eq!(
            wire(
                s.login_result(LoginOutcome::Accepted("\u{7}".into()))
                    .action()
            ),
            "+OK Logged in\r\n"
        );
    }

    /// Issue 12 item 3: the login policy's refusal is the session's
    /// decision: a tempfail (lock, rate) is `[SYS/TEMP]`, a reject looks like
    /// a wrong password; both count towards `max_login_failures` and are
    /// delayed, but are not charged to the policy again (`Refused`).
    #[test]
    fn login_refused_by_policy() {
        let mut s = Session::new(settings(), true, None);
        let r = s.login_refused(PolicyAction::Tempfail);
        assert!(matches!(r, LoginResult::Refused(Action::Reply(_))), "{r:?}");
        assert!(r.delayed());
        assert_eq!(
            wire(r.action()),
            "-ERR [SYS/TEMP] Too many failed logins, try again later\r\n"
        );
        assert_eq!(s.failures, 1);
        assert_eq!(
            s.login_refused(PolicyAction::Reject),
            LoginResult::Refused(Action::Close(
                Reply::err("[AUTH] Authentication failed"),
                Ending::Because("too many login failures")
            ))
        );
        // anything but reject is temporary
        let mut s = Session::new(settings(), true, None);
        assert_eq!(
            wire(s.login_refused(PolicyAction::Delay).action()),
            "-ERR [SYS/TEMP] Too many failed logins, try again later\r\n"
        );
        // an AUTH PLAIN with authzid refused by the policy leaves no authzid
        // behind for the next backend answer
        let other = base64_encode(b"admin\0alice\0pw");
        assert!(matches!(
            s.line(format!("AUTH PLAIN {other}").as_bytes()),
            Action::Login(Login::PlainAs { .. })
        ));
        s.login_refused(PolicyAction::Tempfail);
        assert_eq!(
            wire(s.login_result(LoginOutcome::Unsupported).action()),
            "-ERR [SYS/PERM] The mail server offers no login method mailgate can use\r\n"
        );
    }

    /// Issue 12 item 3: the replies the layer writes when it ends a wait,
    /// and the APOP listener's busy refusal, come from the session.
    #[test]
    fn idle_replies_and_apop_busy() {
        let s = Session::new(settings(), false, None);
        assert_eq!(
            wire(&Action::Reply(s.timed_out())),
            "-ERR Disconnected for inactivity\r\n"
        );
        assert_eq!(
            wire(&Action::Reply(s.session_over())),
            "-ERR [SYS/TEMP] Session time limit reached\r\n"
        );
        assert_eq!(
            wire(&Action::Reply(s.shutting_down())),
            "-ERR [SYS/TEMP] shutting down, try again later\r\n"
        );
        assert_eq!(
            wire(&Action::Reply(Session::apop_busy())),
            "-ERR [SYS/TEMP] Too many connections waiting to log in, try again later\r\n"
        );
    }

    #[test]
    fn apop() {
        let digest = "c4c9334bac560ecc979e58001b3e22fb";
        let line = format!("APOP mrose {digest}");
        // not enabled: refused, even with a timestamp at hand
        let mut s = Session::new(settings(), true, Some("<1.2@x>".into()));
        assert_eq!(
            wire(&s.line(line.as_bytes())),
            "-ERR APOP is not available\r\n"
        );
        assert_eq!(
            wire(&Action::Reply(s.greeting())),
            "+OK gw.test POP3 mailgate ready\r\n"
        );
        let on = Settings {
            apop: true,
            ..settings()
        };
        // enabled, but the backend had no timestamp
        let mut s = Session::new(on.clone(), true, None);
        assert_eq!(
            wire(&s.line(line.as_bytes())),
            "-ERR APOP is not available\r\n"
        );
        // enabled: the greeting carries the backend's timestamp
        let mut s = Session::new(on.clone(), false, Some("<1.2@x>".into()));
        assert_eq!(
            wire(&Action::Reply(s.greeting())),
            "+OK gw.test POP3 mailgate ready <1.2@x>\r\n"
        );
        // but not before TLS on a TLS-only listener
        assert_eq!(
            wire(&s.line(line.as_bytes())),
            "-ERR [AUTH] Plaintext login is disabled: use STLS first\r\n"
        );
        s.tls_started();
        assert_eq!(
            s.line(line.as_bytes()),
            Action::Login(Login::Apop {
                user: "mrose".into(),
                digest: digest.into()
            })
        );
    }

    #[test]
    fn overlong_lines_count_as_errors() {
        let mut s = Session::new(
            Settings {
                max_errors: 2,
                ..settings()
            },
            true,
            None,
        );
        assert_eq!(wire(&s.line_too_long()), "-ERR Line too long\r\n");
        assert_eq!(
            s.line_too_long(),
            Action::Close(reply::too_many_errors(), Ending::Refused)
        );
    }

    #[test]
    fn quit_closes() {
        let mut s = Session::new(settings(), false, None);
        assert_eq!(
            s.line(b"QUIT"),
            Action::Close(Reply::ok("mailgate signing off"), Ending::Quit)
        );
    }
}
