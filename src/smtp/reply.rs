//! Every SMTP reply mailgate sends, in one place, with RFC 3463 enhanced status
//! codes. Backend replies pass through `Reply::relayed`, which keeps their code
//! and text but re-renders them safely.

use std::borrow::Cow;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<Cow<'static, str>>,
}

/// Which command a relayed backend reply answers (for the default enhanced code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Mail,
    Rcpt,
    Data,
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
    pub fn new(code: u16, text: impl Into<Cow<'static, str>>) -> Self {
        Reply {
            code,
            lines: vec![text.into()],
        }
    }

    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// The wire form: `250-first`, …, `250 last`, each CRLF-terminated.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let n = self.lines.len().max(1);
        for i in 0..n {
            let text = self.lines.get(i).map(|s| s.as_ref()).unwrap_or("");
            let sep = if i + 1 == n { ' ' } else { '-' };
            out.extend_from_slice(format!("{}{}{}\r\n", self.code, sep, text).as_bytes());
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.write_to(&mut v);
        v
    }

    /// First line of text, for logs.
    pub fn summary(&self) -> String {
        format!(
            "{} {}",
            self.code,
            self.lines.first().map(|s| s.as_ref()).unwrap_or("")
        )
    }

    /// A backend's reply as passed on to the client: printable ASCII only, at
    /// most 8 lines of 400 characters, and with an enhanced status code added
    /// when the backend did not send one (we advertise ENHANCEDSTATUSCODES).
    pub fn relayed(code: u16, lines: &[String], stage: Stage) -> Reply {
        let class = code / 100;
        let default_enh = match (class, stage) {
            (2, Stage::Mail) => "2.1.0",
            (2, Stage::Rcpt) => "2.1.5",
            (2, Stage::Data) => "2.0.0",
            (4, _) => "4.0.0",
            _ => "5.0.0",
        };
        let clean: Vec<Cow<'static, str>> = lines
            .iter()
            .take(8)
            .map(|l| {
                let text: String = l
                    .chars()
                    .filter(|c| (' '..='~').contains(c))
                    .take(400)
                    .collect();
                let text = text.trim().to_string();
                // RFC 3463 defines classes 2, 4 and 5 only
                if has_enhanced(&text, class) || !matches!(class, 2 | 4 | 5) {
                    Cow::Owned(text)
                } else if text.is_empty() {
                    Cow::Owned(default_enh.to_string())
                } else {
                    Cow::Owned(format!("{default_enh} {text}"))
                }
            })
            .collect();
        Reply {
            code,
            lines: if clean.is_empty() {
                vec![Cow::Borrowed(default_enh)]
            } else {
                clean
            },
        }
    }
}

fn has_enhanced(text: &str, class: u16) -> bool {
    let first = text.split(' ').next().unwrap_or("");
    let mut parts = first.split('.');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next()),
        (Some(a), Some(b), Some(c), None)
            if a == class.to_string()
                && !b.is_empty() && b.len() <= 3 && b.bytes().all(|x| x.is_ascii_digit())
                && !c.is_empty() && c.len() <= 3 && c.bytes().all(|x| x.is_ascii_digit())
    )
}

pub fn greeting(host: &str) -> Reply {
    Reply::new(220, format!("{host} ESMTP mailgate"))
}
/// The first line of a greeting whose final line the pregreet test holds
/// back (postscreen's trick): `220-host ESMTP mailgate`, a continuation line
/// only. The final line is [`greeting`]'s, written after the wait.
pub fn held_greeting(host: &str) -> HeldGreeting {
    HeldGreeting(greeting(host))
}

/// The first line(s) of a multi-line greeting, each as `220-…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldGreeting(Reply);

impl crate::conn::Wire for HeldGreeting {
    fn write_to(&self, out: &mut Vec<u8>) {
        for line in &self.0.lines {
            out.extend_from_slice(format!("{}-{}\r\n", self.0.code, line).as_bytes());
        }
    }
    fn summary(&self) -> String {
        self.0.summary()
    }
}

/// Triage: the client's score on the DNS block lists reached the threshold.
/// The zones are configuration names, the address the socket's: no client text.
pub fn triage_listed(client: std::net::IpAddr, zones: &[String]) -> Reply {
    Reply::new(
        554,
        format!(
            "5.7.1 Service unavailable; client [{client}] blocked using {}",
            zones.join(", ")
        ),
    )
}
/// Triage: the client talked before the final greeting line.
pub fn triage_pregreet() -> Reply {
    Reply::new(554, "5.7.1 Protocol error: data sent before the greeting")
}
/// Triage with `action: tempfail` (a listing or a pregreet hit).
pub fn triage_tempfail() -> Reply {
    Reply::new(
        421,
        "4.7.0 Service temporarily unavailable, try again later",
    )
}
pub fn helo(host: &str) -> Reply {
    Reply::new(250, host.to_string())
}
pub fn ehlo(host: &str, client: &str, extensions: Vec<String>) -> Reply {
    let mut lines: Vec<Cow<'static, str>> = vec![Cow::Owned(format!("{host} Hello {client}"))];
    lines.extend(extensions.into_iter().map(Cow::Owned));
    Reply { code: 250, lines }
}
pub fn ok() -> Reply {
    Reply::new(250, "2.0.0 Ok")
}
pub fn bye() -> Reply {
    Reply::new(221, "2.0.0 Bye")
}
pub fn help() -> Reply {
    Reply::new(
        214,
        "2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT STARTTLS HELP",
    )
}
pub fn vrfy_disabled() -> Reply {
    Reply::new(502, "5.5.1 VRFY command is disabled")
}
pub fn expn_disabled() -> Reply {
    Reply::new(502, "5.5.1 EXPN command is disabled")
}
pub fn auth_unavailable() -> Reply {
    Reply::new(502, "5.5.1 AUTH is not available on this service")
}
pub fn bdat_unavailable() -> Reply {
    Reply::new(502, "5.5.1 BDAT is not supported, use DATA")
}
pub fn starttls_ready() -> Reply {
    Reply::new(220, "2.0.0 Ready to start TLS")
}
pub fn starttls_unavailable() -> Reply {
    Reply::new(502, "5.5.1 STARTTLS is not available on this service")
}
pub fn tls_already_active() -> Reply {
    Reply::new(503, "5.5.1 TLS is already active")
}
pub fn starttls_in_transaction() -> Reply {
    Reply::new(
        503,
        "5.5.1 STARTTLS is not allowed during a mail transaction",
    )
}
pub fn tls_required() -> Reply {
    Reply::new(530, "5.7.0 Must issue a STARTTLS command first")
}
pub fn start_data() -> Reply {
    Reply::new(354, "End data with <CR><LF>.<CR><LF>")
}
pub fn need_helo() -> Reply {
    Reply::new(503, "5.5.1 Send EHLO or HELO first")
}
pub fn nested_mail() -> Reply {
    Reply::new(503, "5.5.1 Sender already specified")
}
pub fn need_mail() -> Reply {
    Reply::new(503, "5.5.1 Need MAIL command first")
}
pub fn need_rcpt() -> Reply {
    Reply::new(503, "5.5.1 Need RCPT command first")
}
pub fn no_valid_recipients() -> Reply {
    Reply::new(554, "5.5.1 No valid recipients")
}
pub fn too_many_recipients() -> Reply {
    Reply::new(452, "4.5.3 Too many recipients")
}
pub fn size_exceeded() -> Reply {
    Reply::new(552, "5.3.4 Message size exceeds fixed maximum message size")
}
pub fn syntax(reason: &'static str) -> Reply {
    Reply::new(501, format!("5.5.4 Syntax error: {reason}"))
}
pub fn unknown_command() -> Reply {
    Reply::new(500, "5.5.2 Command not recognized")
}
pub fn bad_bytes() -> Reply {
    Reply::new(500, "5.5.2 Invalid characters in command")
}
pub fn unsupported_parameter(p: &str) -> Reply {
    let p: String = p.chars().filter(|c| c.is_ascii_graphic()).collect();
    Reply::new(555, format!("5.5.4 Unsupported parameter {p}"))
}
pub fn non_ascii_recipient() -> Reply {
    Reply::new(553, "5.6.7 Non-ASCII address requires SMTPUTF8")
}
pub fn smtputf8_unavailable() -> Reply {
    Reply::new(555, "5.5.4 SMTPUTF8 is not supported by this service")
}
pub fn line_too_long() -> Reply {
    Reply::new(500, "5.5.2 Line too long")
}
pub fn too_many_errors() -> Reply {
    Reply::new(421, "4.7.0 Too many errors, closing connection")
}
pub fn bare_newline() -> Reply {
    Reply::new(
        550,
        "5.6.0 Message contains bare CR or LF; lines must end with CRLF",
    )
}
pub fn nul_in_message() -> Reply {
    Reply::new(554, "5.6.0 Message contains NUL characters")
}
pub fn message_line_too_long(max: usize) -> Reply {
    Reply::new(
        550,
        format!("5.6.0 Message has a line longer than {max} octets"),
    )
}
pub fn backend_unavailable() -> Reply {
    Reply::new(
        451,
        "4.4.1 Mail server temporarily unavailable, try again later",
    )
}
pub fn backend_failed() -> Reply {
    Reply::new(451, "4.4.2 Connection to mail server lost, try again later")
}
/// A temporary failure: by the retry, EHLO says what the backend offers
/// now, and the client can convert the message (8BITMIME) or decide
/// (SMTPUTF8) instead of bouncing on a 5xx to an extension it was offered.
pub fn backend_lacks(ext: &'static str) -> Reply {
    Reply::new(
        451,
        format!("4.3.0 Mail server no longer offers {ext}, try again later"),
    )
}
pub fn backend_bad_reply() -> Reply {
    Reply::new(
        451,
        "4.4.2 Mail server sent an invalid reply, try again later",
    )
}
pub fn timeout() -> Reply {
    Reply::new(421, "4.4.2 Timeout exceeded, closing connection")
}
pub fn shutting_down() -> Reply {
    Reply::new(421, "4.3.2 Service shutting down, try again later")
}
pub fn too_many_connections() -> Reply {
    Reply::new(421, "4.7.0 Too many connections, try again later")
}
pub fn denied() -> Reply {
    Reply::new(554, "5.7.1 Access denied")
}
/// Refusal of a connection from a banned address (server.rs, `action: ban`).
pub fn banned() -> Reply {
    Reply::new(554, "5.7.1 Access denied: address banned for a while")
}
pub fn policy_tempfail() -> Reply {
    Reply::new(451, "4.7.1 Rate limit exceeded, try again later")
}
pub fn policy_reject() -> Reply {
    Reply::new(550, "5.7.1 Refused by local policy")
}
pub fn helo_policy_tempfail() -> Reply {
    Reply::new(421, "4.7.0 Rate limit exceeded, closing connection")
}
/// A message or sender refused by SPF/DKIM/DMARC/ARC (RFC 7372 codes where
/// one exists). `reason` is already sanitised (printable ASCII, bounded).
pub fn auth_check_reject(check: &str, reason: &str) -> Reply {
    let code = match check {
        "spf" => "5.7.23",
        "dkim" => "5.7.20",
        _ => "5.7.1",
    };
    Reply::new(550, format!("{code} Rejected by {check} check: {reason}"))
}
pub fn auth_check_tempfail(check: &str, reason: &str) -> Reply {
    let code = if check == "spf" { "4.7.24" } else { "4.7.5" };
    Reply::new(
        451,
        format!("{code} Temporary {check} failure, try again later: {reason}"),
    )
}
/// `dkim_sign` with `unknown_domain: reject`: an authenticated message
/// whose header From domain has no key (RFC 7372 has no code for it).
pub fn dkim_unknown_domain() -> Reply {
    Reply::new(
        550,
        "5.7.1 Not authorized to send mail with this From domain",
    )
}
pub fn dkim_too_many_fields(n: usize, max: usize) -> Reply {
    Reply::new(
        550,
        format!("5.6.0 Message has {n} header fields to sign, at most {max} can be"),
    )
}
/// The signing `dkim_sign` asks for could not be made now.
pub fn dkim_not_signed() -> Reply {
    Reply::new(451, "4.3.0 Message could not be signed, try again later")
}
pub fn auth_challenge(text: &'static str) -> Reply {
    Reply::new(334, text)
}
pub fn auth_ok() -> Reply {
    Reply::new(235, "2.7.0 Authentication successful")
}
/// The same reply for a wrong password and an unknown user.
pub fn auth_failed() -> Reply {
    Reply::new(535, "5.7.8 Authentication credentials invalid")
}
pub fn auth_temporary() -> Reply {
    Reply::new(
        454,
        "4.7.0 Temporary authentication failure, try again later",
    )
}
pub fn auth_locked() -> Reply {
    Reply::new(
        454,
        "4.7.0 Too many failed authentication attempts, try again later",
    )
}
pub fn too_many_auth_failures() -> Reply {
    Reply::new(
        421,
        "4.7.0 Too many failed authentication attempts, closing connection",
    )
}
/// A user name with control characters or over 255 octets: never relayed.
pub fn auth_bad_user() -> Reply {
    Reply::new(501, "5.5.2 Invalid user name")
}
pub fn auth_cancelled() -> Reply {
    Reply::new(501, "5.0.0 Authentication cancelled")
}
pub fn auth_bad_base64() -> Reply {
    Reply::new(501, "5.5.2 Cannot decode the response")
}
pub fn auth_mechanism() -> Reply {
    Reply::new(504, "5.5.4 Unrecognized authentication type")
}
pub fn auth_required() -> Reply {
    Reply::new(530, "5.7.0 Authentication required")
}
pub fn already_authenticated() -> Reply {
    Reply::new(503, "5.5.1 Already authenticated")
}
pub fn backend_lost_closing() -> Reply {
    Reply::new(
        421,
        "4.4.2 Connection to mail server lost, closing connection",
    )
}
pub fn session_too_long() -> Reply {
    Reply::new(421, "4.4.2 Session time limit exceeded, closing connection")
}
/// The message's first line starts with SP/HTAB: it would continue the last
/// header mailgate prepends.
pub fn folded_first_line() -> Reply {
    Reply::new(
        550,
        "5.6.0 Message must not start with a folded (indented) line",
    )
}
pub fn header_too_big() -> Reply {
    Reply::new(552, "5.3.4 Message header exceeds 1000 fields or 1 MiB")
}
/// The process-wide budget for message bytes in flight is spent.
pub fn inflight_exceeded() -> Reply {
    Reply::new(452, "4.3.1 Insufficient system storage, try again later")
}
pub fn too_many_transactions() -> Reply {
    Reply::new(
        421,
        "4.7.0 Too many transactions in one session, closing connection",
    )
}
/// The backend is configured to be told who the client is (XCLIENT, PROXY
/// v2) and that could not be done: nothing is relayed (issue 11).
pub fn identity_unavailable() -> Reply {
    Reply::new(
        451,
        "4.7.0 Client identity cannot be passed to the mail server, try again later",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        assert_eq!(ok().to_bytes(), b"250 2.0.0 Ok\r\n");
        let e = ehlo(
            "gw.example",
            "client",
            vec!["PIPELINING".into(), "SIZE 10".into()],
        );
        assert_eq!(
            e.to_bytes(),
            b"250-gw.example Hello client\r\n250-PIPELINING\r\n250 SIZE 10\r\n"
        );
    }

    #[test]
    fn relayed_replies_are_cleaned() {
        let r = Reply::relayed(250, &["Ok: queued as ABC".into()], Stage::Data);
        assert_eq!(r.to_bytes(), b"250 2.0.0 Ok: queued as ABC\r\n");
        let r = Reply::relayed(
            550,
            &["5.1.1 <x@y>: Recipient address rejected".into()],
            Stage::Rcpt,
        );
        assert_eq!(
            r.to_bytes(),
            b"550 5.1.1 <x@y>: Recipient address rejected\r\n"
        );
        let r = Reply::relayed(250, &["".into()], Stage::Rcpt);
        assert_eq!(r.to_bytes(), b"250 2.1.5\r\n");
        let r = Reply::relayed(451, &["evil\r\n250 ok\u{7}".into()], Stage::Mail);
        assert_eq!(r.to_bytes(), b"451 4.0.0 evil250 ok\r\n");
        // a 2.x code on a 5xx reply is not a valid enhanced code for it
        let r = Reply::relayed(550, &["2.1.0 odd".into()], Stage::Mail);
        assert_eq!(r.to_bytes(), b"550 5.0.0 2.1.0 odd\r\n");
        let many: Vec<String> = (0..50).map(|i| format!("line {i}")).collect();
        assert_eq!(Reply::relayed(550, &many, Stage::Rcpt).lines.len(), 8);
    }
}
