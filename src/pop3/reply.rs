//! Every POP3 reply mailgate itself sends, in one place. Response codes in
//! square brackets follow RFC 2449 §8 (`[SYS/TEMP]`, `[SYS/PERM]`, `[IN-USE]`)
//! and RFC 3206 (`[AUTH]`). Backend replies during login pass through
//! [`Reply::relayed`], which keeps their text but re-renders it safely; after
//! login the backend's bytes are not touched at all (byte pipe).

use std::borrow::Cow;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// `+OK`
    Ok,
    /// `-ERR`
    Err,
    /// `+ ` — a SASL continuation (RFC 5034 §4)
    Continue,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: Status,
    pub text: Cow<'static, str>,
    /// Lines of a multi-line reply (dot-stuffed on the wire, then `.`).
    pub body: Option<Vec<Cow<'static, str>>>,
}

/// How the client-connection layer writes and logs it (`conn/mod.rs`).
impl crate::conn::Wire for Reply {
    fn write_to(&self, out: &mut Vec<u8>) {
        Reply::write_to(self, out)
    }
    fn summary(&self) -> String {
        Reply::summary(self)
    }
}

impl Reply {
    pub fn ok(text: impl Into<Cow<'static, str>>) -> Reply {
        Reply {
            status: Status::Ok,
            text: text.into(),
            body: None,
        }
    }

    pub fn err(text: impl Into<Cow<'static, str>>) -> Reply {
        Reply {
            status: Status::Err,
            text: text.into(),
            body: None,
        }
    }

    pub fn is_ok(&self) -> bool {
        self.status == Status::Ok
    }

    pub fn write_to(&self, out: &mut Vec<u8>) {
        let (ind, sep_always) = match self.status {
            Status::Ok => ("+OK", false),
            Status::Err => ("-ERR", false),
            // "+" SP always, even with an empty challenge
            Status::Continue => ("+", true),
        };
        out.extend_from_slice(ind.as_bytes());
        if sep_always || !self.text.is_empty() {
            out.push(b' ');
            out.extend_from_slice(self.text.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        if let Some(body) = &self.body {
            for l in body {
                if l.starts_with('.') {
                    out.push(b'.');
                }
                out.extend_from_slice(l.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b".\r\n");
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.write_to(&mut v);
        v
    }

    /// The status line, for logs.
    pub fn summary(&self) -> String {
        let mut v = Vec::new();
        Reply {
            body: None,
            ..self.clone()
        }
        .write_to(&mut v);
        String::from_utf8_lossy(&v).trim_end().to_string()
    }

    /// A backend's status-line text (after `+OK`/`-ERR`) as passed on to the
    /// client: printable ASCII only, at most 200 characters, with `fallback`
    /// when nothing is left.
    pub fn relayed(ok: bool, text: &str, fallback: &'static str) -> Reply {
        let clean: String = text
            .chars()
            .filter(|c| (' '..='~').contains(c))
            .take(200)
            .collect();
        let clean = clean.trim();
        let text: Cow<'static, str> = if clean.is_empty() {
            Cow::Borrowed(fallback)
        } else {
            Cow::Owned(clean.to_string())
        };
        if ok {
            Reply::ok(text)
        } else {
            Reply::err(text)
        }
    }
}

pub fn greeting(host: &str, apop_timestamp: Option<&str>) -> Reply {
    match apop_timestamp {
        Some(ts) => Reply::ok(format!("{host} POP3 mailgate ready {ts}")),
        None => Reply::ok(format!("{host} POP3 mailgate ready")),
    }
}

pub fn capa(caps: Vec<Cow<'static, str>>) -> Reply {
    Reply {
        body: Some(caps),
        ..Reply::ok("Capability list follows")
    }
}

/// The answer to a bare `AUTH` (the de-facto mechanism listing many clients use).
pub fn auth_mechanisms() -> Reply {
    Reply {
        body: Some(vec![Cow::Borrowed("PLAIN")]),
        ..Reply::ok("")
    }
}

pub fn sasl_continue() -> Reply {
    Reply {
        status: Status::Continue,
        text: Cow::Borrowed(""),
        body: None,
    }
}

pub fn stls_ready() -> Reply {
    Reply::ok("Begin TLS negotiation now")
}
pub fn tls_already_active() -> Reply {
    Reply::err("TLS is already active")
}
pub fn stls_unavailable() -> Reply {
    Reply::err("STLS is not available here")
}
pub fn user_accepted() -> Reply {
    Reply::ok("Send PASS")
}
pub fn need_user() -> Reply {
    Reply::err("USER first")
}
pub fn tls_required() -> Reply {
    Reply::err("[AUTH] Plaintext login is disabled: use STLS first")
}
pub fn mechanism_unsupported() -> Reply {
    Reply::err("Unsupported authentication mechanism (only PLAIN)")
}
pub fn auth_cancelled() -> Reply {
    Reply::err("Authentication cancelled")
}
pub fn sasl_bad_base64() -> Reply {
    Reply::err("Invalid base64 data")
}
pub fn sasl_malformed() -> Reply {
    Reply::err("[AUTH] Malformed PLAIN credentials")
}
pub fn authzid_unsupported() -> Reply {
    Reply::err("[AUTH] Authorization identity is not supported by this mail server")
}
pub fn apop_unavailable() -> Reply {
    Reply::err("APOP is not available")
}
pub fn login_failed_default() -> &'static str {
    "[AUTH] Authentication failed"
}
/// A login refused by a failed-login lock or login rate (policy, tempfail).
pub fn login_locked() -> Reply {
    Reply::err("[SYS/TEMP] Too many failed logins, try again later")
}
pub fn login_ok_default() -> &'static str {
    "Logged in"
}
pub fn backend_unavailable() -> Reply {
    Reply::err("[SYS/TEMP] Mail server temporarily unavailable, try again later")
}
pub fn backend_failed() -> Reply {
    Reply::err("[SYS/TEMP] Connection to the mail server failed, try again later")
}
pub fn backend_bad_reply() -> Reply {
    Reply::err("[SYS/TEMP] Mail server sent an invalid response, try again later")
}
pub fn backend_cannot_login() -> Reply {
    Reply::err("[SYS/PERM] The mail server offers no login method mailgate can use")
}
pub fn not_logged_in() -> Reply {
    Reply::err("Not logged in")
}
pub fn unknown_command() -> Reply {
    Reply::err("Unknown command")
}
/// A login or STLS command after login (TRANSACTION state): never relayed.
pub fn already_logged_in() -> Reply {
    Reply::err("Already logged in")
}
/// TOP / UIDL where the backend did not announce them.
pub fn command_unavailable() -> Reply {
    Reply::err("Command not supported by this mail server")
}
pub fn syntax(why: &str) -> Reply {
    Reply::err(format!("Syntax error: {why}"))
}
pub fn bad_bytes() -> Reply {
    Reply::err("Invalid characters in command")
}
pub fn line_too_long() -> Reply {
    Reply::err("Line too long")
}
pub fn too_many_errors() -> Reply {
    Reply::err("Too many errors, closing connection")
}
pub fn noop() -> Reply {
    Reply::ok("")
}
pub fn bye() -> Reply {
    Reply::ok("mailgate signing off")
}
pub fn timeout() -> Reply {
    Reply::err("Disconnected for inactivity")
}
pub fn session_too_long() -> Reply {
    Reply::err("[SYS/TEMP] Session time limit reached")
}
pub fn shutting_down() -> Reply {
    Reply::err("[SYS/TEMP] shutting down, try again later")
}
/// Refusal of a connection from a denied network (server.rs).
pub fn denied() -> Reply {
    Reply::err("[SYS/PERM] Access denied")
}
/// Refusal of a connection from a banned address (server.rs, `action: ban`).
pub fn banned() -> Reply {
    Reply::err("[AUTH] Access denied: address banned for a while")
}
/// An APOP listener with `apop_max_pending` sessions already waiting for
/// login (each holds a backend connection for its timestamp).
pub fn apop_busy() -> Reply {
    Reply::err("[SYS/TEMP] Too many connections waiting to log in, try again later")
}
/// Refusal beyond the listener's connection limit (server.rs).
pub fn too_many_connections() -> Reply {
    Reply::err("[SYS/TEMP] Too many connections, try again later")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_forms() {
        let cases: Vec<(Reply, &[u8])> = vec![
            (noop(), b"+OK\r\n"),
            (bye(), b"+OK mailgate signing off\r\n"),
            (sasl_continue(), b"+ \r\n"),
            (
                greeting("gw.test", None),
                b"+OK gw.test POP3 mailgate ready\r\n",
            ),
            (
                greeting("gw.test", Some("<1896.697170952@dbc.mtview.ca.us>")),
                b"+OK gw.test POP3 mailgate ready <1896.697170952@dbc.mtview.ca.us>\r\n",
            ),
            (
                tls_required(),
                b"-ERR [AUTH] Plaintext login is disabled: use STLS first\r\n",
            ),
            (auth_mechanisms(), b"+OK\r\nPLAIN\r\n.\r\n"),
            (
                capa(vec!["STLS".into(), ".odd".into(), "TOP".into()]),
                b"+OK Capability list follows\r\nSTLS\r\n..odd\r\nTOP\r\n.\r\n",
            ),
            (
                shutting_down(),
                b"-ERR [SYS/TEMP] shutting down, try again later\r\n",
            ),
            (
                backend_unavailable(),
                b"-ERR [SYS/TEMP] Mail server temporarily unavailable, try again later\r\n",
            ),
            (syntax("x"), b"-ERR Syntax error: x\r\n"),
        ];
        for (r, want) in cases {
            assert_eq!(
                String::from_utf8_lossy(&r.to_bytes()),
                String::from_utf8_lossy(want)
            );
        }
    }

    #[test]
    fn relayed_is_sanitised() {
        assert_eq!(
            Reply::relayed(
                false,
                " [AUTH] Authentication failed.\u{7}\r\n+OK fake ",
                "x"
            )
            .to_bytes(),
            b"-ERR [AUTH] Authentication failed.+OK fake\r\n"
        );
        assert_eq!(
            Reply::relayed(false, "\u{1b}[31m", login_failed_default()).to_bytes(),
            b"-ERR [31m\r\n"
        );
        assert_eq!(
            Reply::relayed(false, "\t", login_failed_default()).to_bytes(),
            b"-ERR [AUTH] Authentication failed\r\n"
        );
        assert_eq!(
            Reply::relayed(true, "Logged in.", login_ok_default()).to_bytes(),
            b"+OK Logged in.\r\n"
        );
        let long = "y".repeat(1000);
        assert_eq!(Reply::relayed(false, &long, "x").text.len(), 200);
        assert_eq!(
            tls_required().summary(),
            "-ERR [AUTH] Plaintext login is disabled: use STLS first"
        );
    }
}
