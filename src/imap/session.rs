//! The client-facing IMAP not-authenticated state, sans-IO. The driver feeds
//! it assembled commands (`command.rs`), SASL response lines and the
//! outcomes of backend logins and of the login policy; it answers with an
//! [`Action`]: every response mailgate sends before login is chosen here
//! (those the layer writes when it ends a wait too, through [`Replies`]),
//! none in the driver. After a successful login the session is over for
//! this module: the driver hands both connections to the relay
//! (`relay.rs`), where `tracker.rs` checks every command and the backend's
//! answers pass unchanged.

use super::command::{self, Command, ErrorKind, ParseError, Tagged};
/// The replies in [`Action`]s (built in `reply.rs`, chosen here).
pub use super::reply::Reply;
use super::reply::{self, Capabilities};
use crate::action::PolicyAction;
use crate::backend::imap::{ImapLogin, ImapLoginReply};
use crate::conn::sasl::{self, Plain, SaslError};
pub use crate::conn::Ending;
use crate::conn::Replies;

/// The commands that carry credentials (refused before TLS where TLS is
/// required, before anything of them is read or kept).
fn is_login(verb: &str) -> bool {
    verb == "LOGIN" || verb == "AUTHENTICATE"
}

/// What became of a login on the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginOutcome {
    /// The backend's tagged `OK` text: the session becomes a relay.
    Accepted(String),
    /// Its tagged `NO` / `BAD` text.
    Rejected(String),
    /// No connection could be made, or the client identity could not be
    /// applied (fail closed).
    Unavailable,
    /// The connection failed or timed out in the middle.
    Failed,
    /// The backend sent something that is not an IMAP response.
    Invalid,
    /// The backend spoke out of turn: its next reply would not have been
    /// the answer. Temporary, never a login result.
    OutOfStep,
}

impl From<ImapLoginReply> for LoginOutcome {
    fn from(r: ImapLoginReply) -> Self {
        match r {
            ImapLoginReply::Accepted(t) => LoginOutcome::Accepted(t),
            ImapLoginReply::Rejected(t) => LoginOutcome::Rejected(t),
            ImapLoginReply::OutOfStep => LoginOutcome::OutOfStep,
        }
    }
}

/// The session's answer to a login, and how the login guard counts it
/// (`conn/login.rs`).
pub type LoginResult = crate::conn::login::LoginResult<Action>;

/// Why the session closed after too many failed logins (the session-end log).
const LOGIN_FAILURES: &str = "too many login failures";

#[derive(Debug, Clone)]
pub struct Settings {
    pub hostname: String,
    /// STARTTLS may be offered (a `starttls` listener with a TLS configuration).
    pub starttls: bool,
    pub require_tls: bool,
    pub max_errors: u32,
    pub max_login_failures: u32,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Reply(Reply),
    /// Reply, then close the connection.
    Close(Reply, Ending),
    /// Reply `OK`, discard buffered input, run the TLS handshake, then `tls_started`.
    StartTls(Reply),
    /// Run this login through the login guard: the policy (a refusal:
    /// `login_refused`), the replay on the backend, then `login_result`.
    Login(ImapLogin),
    /// Reply (the backend's `OK` under the client's tag) and become a relay.
    Relay(Reply),
}

/// The session's word on a literal the command being read announces.
#[derive(Debug, PartialEq, Eq)]
pub enum AtLiteral {
    /// Read it, after this `+` where it is synchronising.
    Read(Option<Reply>),
    /// The command is answered now, before anything of the literal is read
    /// (`command::Assembler::refuse` drops the rest of it).
    Refuse(Action),
}

pub struct Session {
    pub settings: Settings,
    pub tls: bool,
    /// The tag of an AUTHENTICATE PLAIN whose `+ ` was sent: the next line
    /// is its SASL response, not a command.
    sasl_tag: Option<String>,
    /// The tag of the login in flight (its answer carries it).
    login_tag: String,
    errors: u32,
    pub failures: u32,
    /// The user of the last login attempt, for the session log line.
    pub last_user: Option<String>,
    pub logged_in: bool,
}

impl Session {
    pub fn new(settings: Settings, tls: bool) -> Self {
        Session {
            settings,
            tls,
            sasl_tag: None,
            login_tag: String::new(),
            errors: 0,
            failures: 0,
            last_user: None,
            logged_in: false,
        }
    }

    fn caps(&self) -> Capabilities {
        Capabilities {
            starttls: self.settings.starttls && !self.tls,
            login: self.login_allowed(),
        }
    }

    pub fn greeting(&self) -> Reply {
        reply::greeting(&self.settings.hostname, &self.caps())
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
        self.sasl_tag.is_some()
    }

    fn error(&mut self, r: Reply) -> Action {
        self.errors += 1;
        if self.errors >= self.settings.max_errors {
            Action::Close(reply::too_many_errors(), Ending::Refused)
        } else {
            Action::Reply(r)
        }
    }

    /// A line longer than the command limit (consumed by the layer).
    pub fn line_too_long(&mut self) -> Action {
        let tag = self.sasl_tag.take();
        self.error(reply::line_too_long(tag.as_deref()))
    }

    /// A literal over the command's budget: synchronising, the client sends
    /// none of it and the command is over; otherwise its octets are on the
    /// way and the session ends.
    pub fn literal_too_large(&mut self, tag: Option<&str>, sync: bool) -> Action {
        if sync {
            self.error(reply::literal_too_large(tag))
        } else {
            Action::Close(
                reply::literal_too_large(tag).then(reply::bye_literal_too_large()),
                Ending::Refused,
            )
        }
    }

    /// A literal announced by the command being assembled (`head`: its
    /// pieces so far). A login command that will be refused anyway is
    /// refused here, instead of the `+` (RFC 3501 §7.5, RFC 9051 §7.5: the
    /// server may reject a command in place of the continuation): a client
    /// must not be invited to send a password in the clear.
    pub fn literal(&mut self, head: &[u8], lit: command::Literal) -> AtLiteral {
        if let Some((tag, verb)) = command::tag_and_verb(head) {
            if is_login(&verb) && !self.login_allowed() {
                return AtLiteral::Refuse(self.error(reply::privacy_required(tag)));
            }
        }
        AtLiteral::Read(lit.sync.then(reply::literal_go))
    }

    /// One assembled command (`command::Assembler`), or a SASL response line.
    pub fn command(&mut self, cmd: &[u8]) -> Action {
        if let Some(tag) = self.sasl_tag.take() {
            return self.sasl_response(&tag, cmd);
        }
        match command::parse(cmd) {
            Ok(t) => self.tagged(t),
            Err(ParseError { tag, kind }) => {
                let tag = tag.as_deref();
                let r = match (kind, tag) {
                    (ErrorKind::Unknown, Some(t)) => reply::unknown_command(t),
                    (ErrorKind::Unknown, None) => reply::syntax(None, "a tag is required"),
                    (ErrorKind::Bytes, t) => reply::bad_bytes(t),
                    (ErrorKind::Syntax(why), t) => reply::syntax(t, why),
                };
                self.error(r)
            }
        }
    }

    fn tagged(&mut self, Tagged { tag, command }: Tagged) -> Action {
        match command {
            Command::Capability => Action::Reply(reply::capability(&tag, &self.caps())),
            Command::Noop => Action::Reply(reply::noop(&tag)),
            Command::Id => Action::Reply(reply::id(&tag)),
            Command::Logout => Action::Close(reply::logout(&tag), Ending::Quit),
            Command::StartTls => {
                if self.tls {
                    self.error(reply::tls_already_active(&tag))
                } else if !self.settings.starttls {
                    self.error(reply::starttls_unavailable(&tag))
                } else {
                    Action::StartTls(reply::starttls_ready(&tag))
                }
            }
            Command::NotYet => self.error(reply::not_logged_in(&tag)),
            // every login command: refused before TLS where TLS is required,
            // before anything is remembered or sent anywhere
            Command::Login { .. } | Command::Authenticate { .. } if !self.login_allowed() => {
                self.error(reply::privacy_required(&tag))
            }
            Command::Login { user, password } => {
                self.login(&tag, ImapLogin::Login { user, password })
            }
            Command::Authenticate { mechanism, initial } => {
                if mechanism != "PLAIN" {
                    return self.error(reply::mechanism_unsupported(&tag));
                }
                match initial {
                    None => {
                        self.sasl_tag = Some(tag);
                        Action::Reply(reply::sasl_continue())
                    }
                    Some(ir) => self.plain(&tag, &ir),
                }
            }
        }
    }

    fn sasl_response(&mut self, tag: &str, line: &[u8]) -> Action {
        if line == b"*" {
            return self.error(reply::auth_cancelled(tag));
        }
        match std::str::from_utf8(line) {
            Ok(s) => self.plain(tag, s),
            Err(_) => self.error(reply::sasl_bad_base64(tag)),
        }
    }

    fn plain(&mut self, tag: &str, b64: &str) -> Action {
        match sasl::decode_plain(b64) {
            Ok(Plain {
                authzid,
                user,
                pass,
            }) => self.login(
                tag,
                ImapLogin::Plain {
                    authzid,
                    user,
                    password: pass,
                },
            ),
            Err(SaslError::Base64) => self.error(reply::sasl_bad_base64(tag)),
            Err(SaslError::Malformed) => self.error(reply::sasl_malformed(tag)),
        }
    }

    fn login(&mut self, tag: &str, login: ImapLogin) -> Action {
        self.last_user = Some(login.user().to_string());
        self.login_tag = tag.to_string();
        Action::Login(login)
    }

    /// The TLS handshake after STARTTLS succeeded: forget what was said
    /// before (RFC 3501 §6.2.1: the client must discard what it knew; so do we).
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.sasl_tag = None;
    }

    /// The backend's answer to the login from `Action::Login`. A wrong
    /// password is answered after the failure delay and counts towards
    /// `max_login_failures` (then the session closes); the backend's trouble
    /// is a protocol error, answered at once.
    pub fn login_result(&mut self, outcome: LoginOutcome) -> LoginResult {
        let tag = std::mem::take(&mut self.login_tag);
        match outcome {
            LoginOutcome::Accepted(text) => {
                self.logged_in = true;
                LoginResult::Succeeded(Action::Relay(reply::login_accepted(&tag, &text)))
            }
            LoginOutcome::Rejected(text) => LoginResult::Failed(self.login_failed(Reply::relayed(
                &tag,
                false,
                &text,
                reply::login_failed_default(),
            ))),
            LoginOutcome::Unavailable => {
                LoginResult::Undecided(self.error(reply::backend_unavailable(&tag)))
            }
            LoginOutcome::Failed | LoginOutcome::OutOfStep => {
                LoginResult::Undecided(self.error(reply::backend_failed(&tag)))
            }
            LoginOutcome::Invalid => {
                LoginResult::Undecided(self.error(reply::backend_bad_reply(&tag)))
            }
        }
    }

    /// The login policy refused the login before it reached the backend
    /// (failed-login lock, login rate: `tempfail`; or `reject`). Counted
    /// like a wrong password and answered after the failure delay, but not
    /// charged to the policy again: `Refused` to the login guard.
    pub fn login_refused(&mut self, action: PolicyAction) -> LoginResult {
        let tag = std::mem::take(&mut self.login_tag);
        let r = if action == PolicyAction::Reject {
            Reply::tagged(&tag, "NO", reply::login_failed_default())
        } else {
            reply::login_locked(&tag)
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
}

impl Replies for Session {
    type Reply = Reply;

    /// No command within `timeouts.command`, or the relay's idle time.
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
            max_errors: 6,
            max_login_failures: 3,
        }
    }

    fn text(a: &Action) -> String {
        match a {
            Action::Reply(r) | Action::Close(r, _) | Action::StartTls(r) | Action::Relay(r) => {
                String::from_utf8(r.to_bytes()).unwrap()
            }
            Action::Login(l) => format!("login {l:?}"),
        }
    }

    fn say(s: &mut Session, line: &str) -> String {
        text(&s.command(line.as_bytes()))
    }

    #[test]
    fn capabilities_follow_tls_and_require_tls() {
        let mut s = Session::new(settings(), false);
        assert_eq!(
            String::from_utf8(s.greeting().to_bytes()).unwrap(),
            "* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED ID LITERAL+] gw.test IMAP4rev1 mailgate ready\r\n"
        );
        assert_eq!(
            say(&mut s, "a CAPABILITY"),
            "* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED ID LITERAL+\r\na OK CAPABILITY completed\r\n"
        );
        s.tls_started();
        assert_eq!(
            say(&mut s, "b capability"),
            "* CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR ID LITERAL+\r\nb OK CAPABILITY completed\r\n"
        );
        // plaintext allowed on purpose: login offered, STARTTLS still there
        let mut open = Session::new(
            Settings {
                require_tls: false,
                ..settings()
            },
            false,
        );
        assert!(say(&mut open, "c CAPABILITY")
            .starts_with("* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN SASL-IR ID LITERAL+\r\n"));
        // implicit TLS: never STARTTLS
        let mut tls = Session::new(settings(), true);
        assert!(!say(&mut tls, "d CAPABILITY").contains("STARTTLS"));
    }

    #[test]
    fn login_before_tls_is_refused_without_the_backend() {
        let mut s = Session::new(settings(), false);
        for line in [
            "a LOGIN alice secret",
            "b AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==",
            "c AUTHENTICATE PLAIN",
        ] {
            let a = s.command(line.as_bytes());
            let tag = &line[..1];
            assert_eq!(
                text(&a),
                format!("{tag} NO [PRIVACYREQUIRED] Plaintext login is disabled: use STARTTLS first\r\n")
            );
        }
        assert!(!s.awaiting_sasl());
        assert_eq!(s.last_user, None);
    }

    #[test]
    fn a_login_literal_before_tls_is_refused_instead_of_its_plus() {
        use command::Literal;
        let sync = Literal {
            size: 5,
            sync: true,
        };
        let plus = Literal {
            size: 5,
            sync: false,
        };
        let mut s = Session::new(settings(), false);
        for head in [&b"f LOGIN {5}\r\n"[..], b"g login alice {5}\r\n"] {
            let tag = std::str::from_utf8(&head[..1]).unwrap();
            assert_eq!(
                s.literal(head, sync),
                AtLiteral::Refuse(Action::Reply(reply::privacy_required(tag)))
            );
        }
        assert_eq!(
            s.literal(b"h AUTHENTICATE {5+}\r\n", plus),
            AtLiteral::Refuse(Action::Reply(reply::privacy_required("h")))
        );
        assert_eq!(s.errors(), 3);
        assert_eq!(s.last_user, None);
        // what is not a login reads its literal
        assert_eq!(
            s.literal(b"i ID (\"name\" {5}\r\n", sync),
            AtLiteral::Read(Some(reply::literal_go()))
        );
        // once login is allowed, the password is invited
        s.tls_started();
        assert_eq!(
            s.literal(b"j LOGIN {5}\r\n", sync),
            AtLiteral::Read(Some(reply::literal_go()))
        );
        assert_eq!(s.literal(b"k LOGIN {5+}\r\n", plus), AtLiteral::Read(None));
        let mut open = Session::new(
            Settings {
                require_tls: false,
                ..settings()
            },
            false,
        );
        assert_eq!(
            open.literal(b"l LOGIN {5}\r\n", sync),
            AtLiteral::Read(Some(reply::literal_go()))
        );
    }

    #[test]
    fn starttls_and_its_refusals() {
        let mut s = Session::new(settings(), false);
        assert_eq!(
            s.command(b"a STARTTLS"),
            Action::StartTls(reply::starttls_ready("a"))
        );
        s.tls_started();
        assert_eq!(say(&mut s, "b STARTTLS"), "b BAD TLS is already active\r\n");
        let mut plain = Session::new(
            Settings {
                starttls: false,
                require_tls: false,
                ..settings()
            },
            false,
        );
        assert_eq!(
            say(&mut plain, "c STARTTLS"),
            "c BAD STARTTLS is not available here\r\n"
        );
    }

    #[test]
    fn logins_after_tls() {
        let mut s = Session::new(settings(), true);
        assert_eq!(
            s.command(b"a LOGIN {5+}\r\nalice \"p w\""),
            Action::Login(ImapLogin::Login {
                user: "alice".into(),
                password: "p w".into()
            })
        );
        assert_eq!(s.last_user.as_deref(), Some("alice"));
        // SASL-IR
        assert_eq!(
            s.command(b"b AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA=="),
            Action::Login(ImapLogin::Plain {
                authzid: String::new(),
                user: "alice".into(),
                password: "secret".into()
            })
        );
        // continuation, then the response line
        assert_eq!(say(&mut s, "c AUTHENTICATE plain"), "+ \r\n");
        assert!(s.awaiting_sasl());
        let r = base64_encode(b"admin\0bob\0pw");
        assert_eq!(
            s.command(r.as_bytes()),
            Action::Login(ImapLogin::Plain {
                authzid: "admin".into(),
                user: "bob".into(),
                password: "pw".into()
            })
        );
        // `*` cancels (RFC 3501 §6.2.2: BAD)
        say(&mut s, "d AUTHENTICATE PLAIN");
        assert_eq!(say(&mut s, "*"), "d BAD Authentication cancelled\r\n");
        assert!(!s.awaiting_sasl());
        say(&mut s, "e AUTHENTICATE PLAIN");
        assert_eq!(say(&mut s, "!!!"), "e BAD Invalid base64 data\r\n");
        assert_eq!(
            say(&mut s, "f AUTHENTICATE PLAIN AGFsaWNl"),
            "f BAD Malformed PLAIN credentials\r\n"
        );
        assert_eq!(
            say(&mut s, "g AUTHENTICATE CRAM-MD5"),
            "g NO [CANNOT] Unsupported authentication mechanism (only PLAIN)\r\n"
        );
    }

    #[test]
    fn local_commands_and_errors() {
        let mut s = Session::new(settings(), false);
        assert_eq!(say(&mut s, "a NOOP"), "a OK NOOP completed\r\n");
        assert_eq!(
            say(&mut s, "b ID (\"name\" \"x\")"),
            "* ID (\"name\" \"mailgate\")\r\nb OK ID completed\r\n"
        );
        assert_eq!(say(&mut s, "c SELECT INBOX"), "c BAD Not logged in\r\n");
        assert_eq!(say(&mut s, "d FROB"), "d BAD Unknown command\r\n");
        assert_eq!(
            say(&mut s, "e NOOP x"),
            "e BAD Syntax error: unexpected arguments\r\n"
        );
        // a lone word is a tag without a command
        assert_eq!(
            say(&mut s, "NOOP"),
            "NOOP BAD Syntax error: a command is required\r\n"
        );
        assert_eq!(
            say(&mut s, "(x NOOP"),
            "* BAD Syntax error: a tag is required\r\n"
        );
        assert!(matches!(
            s.command(b"f NOOP\0"),
            Action::Close(_, Ending::Refused)
        ));
        assert_eq!(s.errors(), 6);
        let mut s = Session::new(settings(), false);
        assert_eq!(
            s.command(b"z LOGOUT"),
            Action::Close(reply::logout("z"), Ending::Quit)
        );
        assert_eq!(text(&s.line_too_long()), "* BAD Line too long\r\n");
        assert_eq!(
            text(&s.literal_too_large(Some("q"), true)),
            "q BAD [TOOBIG] Literal too large\r\n"
        );
        assert_eq!(
            s.literal_too_large(Some("q"), false),
            Action::Close(
                reply::literal_too_large(Some("q")).then(reply::bye_literal_too_large()),
                Ending::Refused
            )
        );
    }

    #[test]
    fn login_results() {
        let mut s = Session::new(settings(), true);
        s.command(b"t1 LOGIN alice pw");
        let r = s.login_result(LoginOutcome::Accepted(
            "OK [CAPABILITY IMAP4rev1 IDLE] Logged in".into(),
        ));
        assert!(matches!(r, LoginResult::Succeeded(_)));
        assert_eq!(
            text(r.action()),
            "t1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"
        );
        assert!(s.logged_in);

        let mut s = Session::new(settings(), true);
        for (i, tag) in ["a", "b", "c"].iter().enumerate() {
            s.command(format!("{tag} LOGIN alice pw").as_bytes());
            let r = s.login_result(LoginOutcome::Rejected(
                "NO [AUTHENTICATIONFAILED] Authentication failed.".into(),
            ));
            assert!(matches!(r, LoginResult::Failed(_)));
            let want = format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n");
            assert_eq!(text(r.action()), want);
            // the third closes the session
            assert_eq!(
                matches!(
                    r.action(),
                    Action::Close(_, Ending::Because(LOGIN_FAILURES))
                ),
                i == 2
            );
        }

        let mut s = Session::new(settings(), true);
        for (outcome, want) in [
            (
                LoginOutcome::Unavailable,
                "x NO [UNAVAILABLE] Mail server temporarily unavailable, try again later\r\n",
            ),
            (
                LoginOutcome::OutOfStep,
                "x NO [UNAVAILABLE] Connection to the mail server failed, try again later\r\n",
            ),
            (
                LoginOutcome::Invalid,
                "x NO [UNAVAILABLE] Mail server sent an invalid response, try again later\r\n",
            ),
        ] {
            s.command(b"x LOGIN alice pw");
            let r = s.login_result(outcome);
            assert!(matches!(r, LoginResult::Undecided(_)));
            assert_eq!(text(r.action()), want);
        }
        assert_eq!(s.failures, 0);

        s.command(b"y LOGIN alice pw");
        let r = s.login_refused(PolicyAction::Tempfail);
        assert!(matches!(r, LoginResult::Refused(_)));
        assert_eq!(
            text(r.action()),
            "y NO [UNAVAILABLE] Too many failed logins, try again later\r\n"
        );
        s.command(b"z LOGIN alice pw");
        assert_eq!(
            text(s.login_refused(PolicyAction::Reject).action()),
            "z NO [AUTHENTICATIONFAILED] Authentication failed\r\n"
        );
        assert_eq!(s.failures, 2);
    }

    #[test]
    fn layer_replies() {
        let s = Session::new(settings(), false);
        assert_eq!(
            s.timed_out().to_bytes(),
            b"* BYE Autologout; idle for too long\r\n"
        );
        assert!(s
            .session_over()
            .summary()
            .starts_with("* BYE [UNAVAILABLE]"));
        assert!(s
            .shutting_down()
            .summary()
            .starts_with("* BYE [UNAVAILABLE]"));
    }
}
