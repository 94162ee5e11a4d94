//! The client-facing SMTP state machine, sans-IO. The driver feeds it parsed
//! commands and the outcomes of backend operations; it answers with an
//! [`Action`]. It never awaits and owns no sockets, so every rule below is
//! unit-tested with plain values.

use super::command::{Body, Command, MailParams, ParseError};
use super::data::Violation;
use super::reply::{self, Reply, Stage};

/// What the backend can carry end to end (from its EHLO), which bounds what
/// we advertise and pass on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendCaps {
    pub eightbitmime: bool,
    pub smtputf8: bool,
    pub pipelining: bool,
    /// The backend's SIZE limit, if it announced one (0 = no limit).
    pub size: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub hostname: String,
    /// STARTTLS may be offered (a `starttls` listener, not yet upgraded).
    pub starttls: bool,
    pub require_tls: bool,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_errors: u32,
}

/// A backend operation the driver must perform, then report with `relayed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendOp {
    Mail { from: String, params: MailParams },
    Rcpt { to: String },
}

/// The result of a backend operation.
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
}

#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Reply(Reply),
    /// Reply, then close the connection.
    Close(Reply),
    /// Reply 220, discard buffered input, run the TLS handshake, then `tls_started`.
    StartTls(Reply),
    /// Perform this on the backend, then call `relayed`.
    Relay(BackendOp),
    /// Reply 354 and read the message, then call `data_received`.
    ReadData(Reply),
}

#[derive(Debug, Clone)]
pub struct Transaction {
    pub from: String,
    pub params: MailParams,
    pub rcpts: Vec<String>,
    pub rcpt_attempts: usize,
}

pub struct Session {
    pub settings: Settings,
    pub caps: BackendCaps,
    pub tls: bool,
    pub helo: Option<String>,
    pub esmtp: bool,
    pub tx: Option<Transaction>,
    errors: u32,
}

impl Session {
    pub fn new(settings: Settings, caps: BackendCaps, tls: bool) -> Self {
        Session {
            settings,
            caps,
            tls,
            helo: None,
            esmtp: false,
            tx: None,
            errors: 0,
        }
    }

    pub fn greeting(&self) -> Reply {
        reply::greeting(&self.settings.hostname)
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
            Action::Close(reply::too_many_errors())
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
                Action::Reply(reply::ehlo(&self.settings.hostname, &d, self.extensions()))
            }
            Command::Helo(d) => {
                self.helo = Some(d);
                self.esmtp = false;
                self.tx = None;
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
                if self.tx.is_some() {
                    return self.error(reply::nested_mail());
                }
                if params.size.is_some_and(|s| s > self.size_limit()) {
                    return Action::Reply(reply::size_exceeded());
                }
                if params.smtputf8 && !self.caps.smtputf8 {
                    return self.error(reply::smtputf8_unavailable());
                }
                if params.body == Some(Body::EightBitMime) && !self.caps.eightbitmime {
                    return self.error(reply::unsupported_parameter("BODY=8BITMIME"));
                }
                if !self.esmtp && params != MailParams::default() {
                    return self.error(reply::syntax("parameters need EHLO"));
                }
                Action::Relay(BackendOp::Mail { from, params })
            }
            Command::Rcpt { to } => {
                let max = self.settings.max_recipients;
                let Some(tx) = self.tx.as_mut() else {
                    return self.error(reply::need_mail());
                };
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
            Command::Quit => Action::Close(reply::bye()),
            Command::Help => Action::Reply(reply::help()),
            Command::Vrfy => Action::Reply(reply::vrfy_disabled()),
            Command::Expn => Action::Reply(reply::expn_disabled()),
            Command::Auth => {
                if self.settings.require_tls && !self.tls {
                    self.error(reply::tls_required())
                } else {
                    self.error(reply::auth_unavailable())
                }
            }
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
        if self.settings.starttls && !self.tls {
            e.push("STARTTLS".into());
        }
        e
    }

    /// The TLS handshake after STARTTLS succeeded: forget everything the client
    /// said before (RFC 3207 §4.2).
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.helo = None;
        self.esmtp = false;
        self.tx = None;
    }

    /// The backend's answer to `op`. The backend decides about addresses; we only
    /// make sure its reply is a valid one for the stage.
    pub fn relayed(&mut self, op: BackendOp, outcome: Outcome) -> Action {
        let (code, lines) = match outcome {
            Outcome::Reply(code, lines) => (code, lines),
            Outcome::Unavailable => return Action::Reply(reply::backend_unavailable()),
            Outcome::Failed => return Action::Reply(reply::backend_failed()),
            Outcome::Invalid => return Action::Reply(reply::backend_bad_reply()),
        };
        // only 2xx/4xx/5xx are valid answers to MAIL and RCPT
        if !matches!(code / 100, 2 | 4 | 5) {
            return Action::Reply(reply::backend_bad_reply());
        }
        match op {
            BackendOp::Mail { from, params } => {
                let r = Reply::relayed(code, &lines, Stage::Mail);
                if r.is_positive() {
                    self.tx = Some(Transaction {
                        from,
                        params,
                        rcpts: Vec::new(),
                        rcpt_attempts: 0,
                    });
                }
                Action::Reply(r)
            }
            BackendOp::Rcpt { to } => {
                let r = Reply::relayed(code, &lines, Stage::Rcpt);
                if r.is_positive() {
                    if let Some(tx) = self.tx.as_mut() {
                        tx.rcpts.push(to);
                    }
                }
                Action::Reply(r)
            }
        }
    }

    /// The message was read. `Ok` → the driver sends it to the backend and reports
    /// with `delivered`; a violation → the reply right away, transaction over.
    pub fn data_received(
        &mut self,
        result: &Result<Vec<u8>, Violation>,
        max_line: usize,
    ) -> Option<Reply> {
        match result {
            Ok(_) => None,
            Err(v) => {
                self.tx = None;
                Some(match v {
                    Violation::BareNewline => reply::bare_newline(),
                    Violation::Nul => reply::nul_in_message(),
                    Violation::LineTooLong => reply::message_line_too_long(max_line),
                    Violation::TooBig => reply::size_exceeded(),
                })
            }
        }
    }

    /// The backend's final answer to the message. Only a real 250 becomes a 250.
    pub fn delivered(&mut self, outcome: Outcome) -> Reply {
        self.tx = None;
        match outcome {
            Outcome::Reply(code, lines)
                if code / 100 == 2 || code / 100 == 4 || code / 100 == 5 =>
            {
                Reply::relayed(code, &lines, Stage::Data)
            }
            Outcome::Reply(..) | Outcome::Invalid => reply::backend_bad_reply(),
            Outcome::Unavailable => reply::backend_unavailable(),
            Outcome::Failed => reply::backend_failed(),
        }
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
        }
    }

    fn caps() -> BackendCaps {
        BackendCaps {
            eightbitmime: true,
            smtputf8: false,
            pipelining: true,
            size: None,
        }
    }

    fn cmd(s: &mut Session, line: &str) -> Action {
        s.command(parse(line.as_bytes()))
    }

    fn reply_of(a: Action) -> Vec<u8> {
        match a {
            Action::Reply(r) | Action::Close(r) | Action::StartTls(r) | Action::ReadData(r) => {
                r.to_bytes()
            }
            Action::Relay(op) => panic!("unexpected relay {op:?}"),
        }
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
            BackendCaps {
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
        assert!(s.data_received(&Ok(b"x\r\n".to_vec()), 1000).is_none());
        let r = s.delivered(Outcome::Reply(250, vec!["2.0.0 queued as 1".into()]));
        assert_eq!(r.to_bytes(), b"250 2.0.0 queued as 1\r\n");
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
            let r = s.delivered(outcome.clone());
            assert!(r.code >= 400, "{outcome:?} gave {r:?}");
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
        let mut s = Session::new(settings(false, false), BackendCaps::default(), false);
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
        assert!(matches!(cmd(&mut s, "QUIT"), Action::Close(_)));
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
        let r = s.data_received(&Err(Violation::BareNewline), 1000).unwrap();
        assert_eq!(
            r.to_bytes(),
            b"550 5.6.0 Message contains bare CR or LF; lines must end with CRLF\r\n"
        );
        assert!(s.tx.is_none());
    }
}
