//! Every IMAP response mailgate itself sends, in one place. Response codes
//! in square brackets follow RFC 5530 (`PRIVACYREQUIRED`,
//! `AUTHENTICATIONFAILED`, `UNAVAILABLE`, `CANNOT`), RFC 3501 (`CAPABILITY`,
//! `ALERT`) and RFC 4469 / RFC 7889 (`TOOBIG`). The backend's login answer
//! passes through [`Reply::relayed`], which keeps its text but re-renders it
//! safely under the client's tag; after login the backend's bytes are not
//! touched at all.

use std::borrow::Cow;

/// One or more response lines (each written with CRLF): untagged data, then
/// usually one tagged status or a `+` continuation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    lines: Vec<Cow<'static, str>>,
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

/// Longest backend text relayed under the client's tag (a post-login
/// CAPABILITY list fits well within it).
const MAX_RELAYED: usize = 4096;

impl Reply {
    fn line(s: impl Into<Cow<'static, str>>) -> Reply {
        Reply {
            lines: vec![s.into()],
        }
    }

    /// `tag status text` (`status`: OK, NO or BAD).
    pub fn tagged(tag: &str, status: &str, text: &str) -> Reply {
        Reply::line(format!("{tag} {status} {text}"))
    }

    /// `* text`.
    pub fn untagged(text: impl Into<Cow<'static, str>>) -> Reply {
        let text = text.into();
        Reply::line(format!("* {text}"))
    }

    /// This reply, then `next`.
    pub fn then(mut self, next: Reply) -> Reply {
        self.lines.extend(next.lines);
        self
    }

    /// Whether the last line is a tagged OK (a login the backend accepted).
    pub fn is_ok(&self) -> bool {
        self.lines
            .last()
            .and_then(|l| l.split(' ').nth(1))
            .is_some_and(|s| s == "OK")
    }

    pub fn write_to(&self, out: &mut Vec<u8>) {
        for l in &self.lines {
            out.extend_from_slice(l.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.write_to(&mut v);
        v
    }

    /// The last line (the status), for logs.
    pub fn summary(&self) -> String {
        self.lines.last().map(|l| l.to_string()).unwrap_or_default()
    }

    /// The backend's answer to a login (the text after its tag: `OK
    /// [CAPABILITY …] Logged in`, `NO [AUTHENTICATIONFAILED] …`) under the
    /// client's tag: printable ASCII only, at most 4096 characters, `OK` /
    /// `NO` as the status it must have, `fallback` when no text is left.
    pub fn relayed(tag: &str, ok: bool, text: &str, fallback: &'static str) -> Reply {
        let clean: String = text
            .chars()
            .filter(|c| (' '..='~').contains(c))
            .take(MAX_RELAYED)
            .collect();
        let status = if ok { "OK" } else { "NO" };
        let mut words = clean.trim().splitn(2, ' ');
        let first = words.next().unwrap_or("");
        let rest =
            if first.eq_ignore_ascii_case(status) || (!ok && first.eq_ignore_ascii_case("BAD")) {
                words.next().unwrap_or("").trim()
            } else {
                clean.trim()
            };
        let rest = if rest.is_empty() { fallback } else { rest };
        Reply::tagged(tag, status, rest)
    }
}

/// The backend's accepting login answer under the client's tag
/// ([`Reply::relayed`]), its `[CAPABILITY …]` without what cannot work
/// through mailgate: `STARTTLS` (TLS is mailgate's), `COMPRESS=…`
/// (RFC 4978: the relay must see every command) and `UNAUTHENTICATE`
/// (RFC 8437: the session here stays logged in).
pub fn login_accepted(tag: &str, text: &str) -> Reply {
    let r = Reply::relayed(tag, true, text, login_ok_default());
    let line = &r.lines[0];
    let Some(start) = line.find(" OK [CAPABILITY ") else {
        return r;
    };
    let list_at = start + " OK [CAPABILITY ".len();
    let Some(end) = line[list_at..].find(']').map(|e| list_at + e) else {
        return r;
    };
    let kept: Vec<&str> = line[list_at..end]
        .split(' ')
        .filter(|c| {
            !c.is_empty()
                && !c.eq_ignore_ascii_case("STARTTLS")
                && !c.eq_ignore_ascii_case("UNAUTHENTICATE")
                && !c.to_ascii_uppercase().starts_with("COMPRESS=")
        })
        .collect();
    Reply::line(format!(
        "{}{}{}",
        &line[..list_at],
        kept.join(" "),
        &line[end..]
    ))
}

/// COMPRESS after login (RFC 4978): the relay must see every command.
pub fn compress_unavailable(tag: &str) -> Reply {
    Reply::tagged(
        tag,
        "NO",
        "[CANNOT] COMPRESS is not available through this gateway",
    )
}

/// UNAUTHENTICATE after login (RFC 8437): the backend would leave the
/// authenticated state while the session here stays logged in.
pub fn unauthenticate_unavailable(tag: &str) -> Reply {
    Reply::tagged(
        tag,
        "NO",
        "[CANNOT] UNAUTHENTICATE is not available through this gateway",
    )
}

/// What mailgate offers before login.
pub struct Capabilities {
    pub starttls: bool,
    /// LOGIN and AUTHENTICATE are accepted now.
    pub login: bool,
}

impl Capabilities {
    pub fn list(&self) -> String {
        let mut v = vec!["IMAP4rev1"];
        if self.starttls {
            v.push("STARTTLS");
        }
        if self.login {
            v.extend(["AUTH=PLAIN", "SASL-IR"]);
        } else {
            // RFC 3501 §6.2.3; no plaintext mechanism either (RFC 9051 §6.2.3)
            v.push("LOGINDISABLED");
        }
        v.extend(["ID", "LITERAL+"]);
        v.join(" ")
    }
}

pub fn greeting(host: &str, caps: &Capabilities) -> Reply {
    Reply::untagged(format!(
        "OK [CAPABILITY {}] {host} IMAP4rev1 mailgate ready",
        caps.list()
    ))
}

pub fn capability(tag: &str, caps: &Capabilities) -> Reply {
    Reply::untagged(format!("CAPABILITY {}", caps.list())).then(Reply::tagged(
        tag,
        "OK",
        "CAPABILITY completed",
    ))
}

pub fn id(tag: &str) -> Reply {
    Reply::untagged("ID (\"name\" \"mailgate\")").then(Reply::tagged(tag, "OK", "ID completed"))
}

pub fn noop(tag: &str) -> Reply {
    Reply::tagged(tag, "OK", "NOOP completed")
}

pub fn logout(tag: &str) -> Reply {
    Reply::untagged("BYE mailgate logging out").then(Reply::tagged(tag, "OK", "LOGOUT completed"))
}

pub fn starttls_ready(tag: &str) -> Reply {
    Reply::tagged(tag, "OK", "Begin TLS negotiation now")
}
pub fn tls_already_active(tag: &str) -> Reply {
    Reply::tagged(tag, "BAD", "TLS is already active")
}
pub fn starttls_unavailable(tag: &str) -> Reply {
    Reply::tagged(tag, "BAD", "STARTTLS is not available here")
}
/// LOGIN / AUTHENTICATE before TLS where TLS is required.
pub fn privacy_required(tag: &str) -> Reply {
    Reply::tagged(
        tag,
        "NO",
        "[PRIVACYREQUIRED] Plaintext login is disabled: use STARTTLS first",
    )
}
pub fn mechanism_unsupported(tag: &str) -> Reply {
    Reply::tagged(
        tag,
        "NO",
        "[CANNOT] Unsupported authentication mechanism (only PLAIN)",
    )
}
/// A SASL continuation with an empty challenge.
pub fn sasl_continue() -> Reply {
    Reply::line("+ ")
}
/// The go-ahead for a synchronising literal (RFC 3501 §7.5).
pub fn literal_go() -> Reply {
    Reply::line("+ Ready for literal data")
}
pub fn auth_cancelled(tag: &str) -> Reply {
    Reply::tagged(tag, "BAD", "Authentication cancelled")
}
pub fn sasl_bad_base64(tag: &str) -> Reply {
    Reply::tagged(tag, "BAD", "Invalid base64 data")
}
pub fn sasl_malformed(tag: &str) -> Reply {
    Reply::tagged(tag, "BAD", "Malformed PLAIN credentials")
}
pub fn login_failed_default() -> &'static str {
    "[AUTHENTICATIONFAILED] Authentication failed"
}
pub fn login_ok_default() -> &'static str {
    "Logged in"
}
/// A login refused by a failed-login lock or login rate (policy, tempfail).
pub fn login_locked(tag: &str) -> Reply {
    Reply::tagged(
        tag,
        "NO",
        "[UNAVAILABLE] Too many failed logins, try again later",
    )
}
pub fn backend_unavailable(tag: &str) -> Reply {
    Reply::tagged(
        tag,
        "NO",
        "[UNAVAILABLE] Mail server temporarily unavailable, try again later",
    )
}
pub fn backend_failed(tag: &str) -> Reply {
    Reply::tagged(
        tag,
        "NO",
        "[UNAVAILABLE] Connection to the mail server failed, try again later",
    )
}
pub fn backend_bad_reply(tag: &str) -> Reply {
    Reply::tagged(
        tag,
        "NO",
        "[UNAVAILABLE] Mail server sent an invalid response, try again later",
    )
}
pub fn not_logged_in(tag: &str) -> Reply {
    Reply::tagged(tag, "BAD", "Not logged in")
}
pub fn unknown_command(tag: &str) -> Reply {
    Reply::tagged(tag, "BAD", "Unknown command")
}
pub fn syntax(tag: Option<&str>, why: &str) -> Reply {
    match tag {
        Some(t) => Reply::tagged(t, "BAD", &format!("Syntax error: {why}")),
        None => Reply::untagged(format!("BAD Syntax error: {why}")),
    }
}
pub fn bad_bytes(tag: Option<&str>) -> Reply {
    match tag {
        Some(t) => Reply::tagged(t, "BAD", "Invalid characters in command"),
        None => Reply::untagged("BAD Invalid characters in command"),
    }
}
pub fn line_too_long(tag: Option<&str>) -> Reply {
    match tag {
        Some(t) => Reply::tagged(t, "BAD", "Line too long"),
        None => Reply::untagged("BAD Line too long"),
    }
}
/// A literal over the command's bound (RFC 7888 §4 names `TOOBIG` for it).
pub fn literal_too_large(tag: Option<&str>) -> Reply {
    match tag {
        Some(t) => Reply::tagged(t, "BAD", "[TOOBIG] Literal too large"),
        None => Reply::untagged("BAD [TOOBIG] Literal too large"),
    }
}
/// An APPEND over the listener's `max_message_size` (RFC 7889 §4).
pub fn message_too_large(tag: &str) -> Reply {
    Reply::tagged(tag, "NO", "[TOOBIG] Message too large")
}
/// After a non-synchronising literal mailgate will not read: the client has
/// sent (or is sending) it, so the connection cannot go on.
pub fn bye_literal_too_large() -> Reply {
    Reply::untagged("BYE [TOOBIG] Literal too large, closing connection")
}
/// A command that broke off in the middle after part of it reached the
/// backend: the session cannot go on.
pub fn bye_command_broken() -> Reply {
    Reply::untagged("BYE Malformed command, closing connection")
}
/// LOGIN or AUTHENTICATE after login: never relayed.
pub fn already_logged_in(tag: &str) -> Reply {
    Reply::tagged(tag, "BAD", "Already logged in")
}
/// STARTTLS after login (RFC 3501 §6.2.1: not-authenticated state only).
pub fn starttls_after_login(tag: &str) -> Reply {
    Reply::tagged(tag, "BAD", "STARTTLS is only valid before login")
}
pub fn too_many_errors() -> Reply {
    Reply::untagged("BYE Too many errors, closing connection")
}
pub fn timeout() -> Reply {
    Reply::untagged("BYE Autologout; idle for too long")
}
pub fn session_too_long() -> Reply {
    Reply::untagged("BYE [UNAVAILABLE] Session time limit reached")
}
pub fn shutting_down() -> Reply {
    Reply::untagged("BYE [UNAVAILABLE] Server shutting down, try again later")
}
/// Refusal of a connection from a denied network (server.rs).
pub fn denied() -> Reply {
    Reply::untagged("BYE Access denied")
}
/// Refusal of a connection from a banned address (server.rs, `action: ban`).
pub fn banned() -> Reply {
    Reply::untagged("BYE Access denied: address banned for a while")
}
/// Refusal beyond the listener's connection limit (server.rs).
pub fn too_many_connections() -> Reply {
    Reply::untagged("BYE [UNAVAILABLE] Too many connections, try again later")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_forms() {
        let before = Capabilities {
            starttls: true,
            login: false,
        };
        let after = Capabilities {
            starttls: false,
            login: true,
        };
        let cases: Vec<(Reply, &str)> = vec![
            (
                greeting("gw.test", &before),
                "* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED ID LITERAL+] gw.test IMAP4rev1 mailgate ready\r\n",
            ),
            (
                capability("a1", &after),
                "* CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR ID LITERAL+\r\na1 OK CAPABILITY completed\r\n",
            ),
            (
                logout("z"),
                "* BYE mailgate logging out\r\nz OK LOGOUT completed\r\n",
            ),
            (sasl_continue(), "+ \r\n"),
            (
                privacy_required("a"),
                "a NO [PRIVACYREQUIRED] Plaintext login is disabled: use STARTTLS first\r\n",
            ),
            (syntax(None, "x"), "* BAD Syntax error: x\r\n"),
            (
                id("i"),
                "* ID (\"name\" \"mailgate\")\r\ni OK ID completed\r\n",
            ),
        ];
        for (r, want) in cases {
            assert_eq!(String::from_utf8(r.to_bytes()).unwrap(), want);
        }
        assert_eq!(logout("z").summary(), "z OK LOGOUT completed");
    }

    #[test]
    fn relayed_is_sanitised_and_keeps_its_status() {
        let r = Reply::relayed(
            "c7",
            true,
            "OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n* BYE fake",
            "x",
        );
        assert_eq!(
            r.to_bytes(),
            b"c7 OK [CAPABILITY IMAP4rev1 IDLE] Logged in* BYE fake\r\n"
        );
        assert!(r.is_ok());
        assert_eq!(
            Reply::relayed("c", false, "NO [AUTHENTICATIONFAILED] Nope.", "x").to_bytes(),
            b"c NO [AUTHENTICATIONFAILED] Nope.\r\n"
        );
        assert_eq!(
            Reply::relayed("c", false, "BAD odd", "x").to_bytes(),
            b"c NO odd\r\n"
        );
        // never an OK the backend did not give
        assert_eq!(
            Reply::relayed("c", false, "OK in", "x").to_bytes(),
            b"c NO OK in\r\n"
        );
        assert_eq!(
            Reply::relayed("c", false, "NO \u{7}", login_failed_default()).to_bytes(),
            b"c NO [AUTHENTICATIONFAILED] Authentication failed\r\n"
        );
        let long = format!("OK {}", "y".repeat(10_000));
        assert!(Reply::relayed("c", true, &long, "x").to_bytes().len() < 4200);
        assert!(!Reply::relayed("c", false, "NO x", "x").is_ok());
    }

    #[test]
    fn login_capabilities_lose_what_cannot_work_through_mailgate() {
        assert_eq!(
            login_accepted(
                "t",
                "OK [CAPABILITY IMAP4rev1 STARTTLS IDLE compress=deflate LITERAL+ UNAUTHENTICATE] Logged in"
            )
            .to_bytes(),
            b"t OK [CAPABILITY IMAP4rev1 IDLE LITERAL+] Logged in\r\n"
        );
        assert_eq!(
            login_accepted("t", "OK Logged in").to_bytes(),
            b"t OK Logged in\r\n"
        );
        assert_eq!(
            login_accepted("t", "OK [CAPABILITY IMAP4rev1").to_bytes(),
            b"t OK [CAPABILITY IMAP4rev1\r\n"
        );
    }
}
