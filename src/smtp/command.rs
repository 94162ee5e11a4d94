//! SMTP command parser (RFC 5321 §4.1), sans-IO. Input is one line without its
//! CRLF. Only what mailgate can carry through to the backend parses; anything
//! else is an error value that the session turns into a reply.
//!
//! Why not smtp-proto's `Request::parse`: mailgate must decide per parameter
//! whether the backend can carry it (SIZE, BODY, SMTPUTF8) and answer 555 for
//! the rest itself, and it must treat NUL / 8-bit bytes in commands as syntax
//! errors, never pass them on. A small parser of exactly that is easier to
//! audit and fuzz than filtering a general one.

use crate::mail::{Body, MailParams};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    Mail {
        from: String,
        params: MailParams,
    },
    Rcpt {
        to: String,
    },
    Data,
    Bdat,
    Rset,
    Noop,
    Quit,
    StartTls,
    Vrfy,
    Expn,
    Help,
    Auth {
        mechanism: String,
        initial: Option<Secret>,
    },
}

/// A value that must never reach a log (AUTH payloads): its Debug is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Command {
    /// The verb, for logs (arguments are never logged).
    pub fn verb(&self) -> &'static str {
        match self {
            Command::Ehlo(_) => "EHLO",
            Command::Helo(_) => "HELO",
            Command::Mail { .. } => "MAIL",
            Command::Rcpt { .. } => "RCPT",
            Command::Data => "DATA",
            Command::Bdat => "BDAT",
            Command::Rset => "RSET",
            Command::Noop => "NOOP",
            Command::Quit => "QUIT",
            Command::StartTls => "STARTTLS",
            Command::Vrfy => "VRFY",
            Command::Expn => "EXPN",
            Command::Help => "HELP",
            Command::Auth { .. } => "AUTH",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// Not a command we know (500 5.5.2).
    Unknown,
    /// Known command, bad arguments (501 5.5.4).
    Syntax(&'static str),
    /// MAIL/RCPT parameter we do not offer (555 5.5.4).
    Parameter(String),
    /// Non-ASCII or control bytes in the command line (500 5.5.2).
    Bytes,
}

/// Longest address (RFC 5321 §4.5.3.1.3: path 256 octets including brackets).
const MAX_PATH: usize = 256;

pub fn parse(line: &[u8]) -> Result<Command, ParseError> {
    // Commands are ASCII; 8-bit is only allowed inside SMTPUTF8 addresses,
    // checked where the address is parsed.
    if line
        .iter()
        .any(|b| *b == 0 || (*b < 0x20 && *b != b'\t') || *b == 0x7f)
    {
        return Err(ParseError::Bytes);
    }
    let text = std::str::from_utf8(line).map_err(|_| ParseError::Bytes)?;
    let (verb, rest) = match text.find([' ', '\t']) {
        Some(i) => (&text[..i], text[i..].trim_start_matches([' ', '\t'])),
        None => (text, ""),
    };
    let rest = rest.trim_end_matches([' ', '\t']);
    if !verb.is_ascii() {
        return Err(ParseError::Bytes);
    }
    let no_args = |c: Command| {
        if rest.is_empty() {
            Ok(c)
        } else {
            Err(ParseError::Syntax("this command takes no arguments"))
        }
    };
    match verb.to_ascii_uppercase().as_str() {
        "EHLO" => Ok(Command::Ehlo(domain(rest)?)),
        "HELO" => Ok(Command::Helo(domain(rest)?)),
        "MAIL" => mail(rest),
        "RCPT" => rcpt(rest),
        "DATA" => no_args(Command::Data),
        "BDAT" => Ok(Command::Bdat),
        "RSET" => no_args(Command::Rset),
        // NOOP and HELP may carry an argument, which is ignored (RFC 5321 §4.1.1.9)
        "NOOP" => Ok(Command::Noop),
        "HELP" => Ok(Command::Help),
        "QUIT" => no_args(Command::Quit),
        "STARTTLS" => no_args(Command::StartTls),
        "VRFY" => Ok(Command::Vrfy),
        "EXPN" => Ok(Command::Expn),
        "AUTH" => {
            let mut words = rest.split(' ').filter(|w| !w.is_empty());
            let mechanism = words
                .next()
                .ok_or(ParseError::Syntax("AUTH needs a mechanism"))?
                .to_ascii_uppercase();
            let initial = words.next().map(|w| Secret(w.to_string()));
            if words.next().is_some() {
                return Err(ParseError::Syntax("too many AUTH arguments"));
            }
            Ok(Command::Auth { mechanism, initial })
        }
        _ => Err(ParseError::Unknown),
    }
}

/// EHLO/HELO argument: a domain or an address literal. Odd but printable names
/// are accepted (many real clients send bare host names); the value is only
/// used in our trace header, after this check.
fn domain(arg: &str) -> Result<String, ParseError> {
    let d = arg.split([' ', '\t']).next().unwrap_or("");
    if d.is_empty() {
        return Err(ParseError::Syntax(
            "a domain name or address literal is required",
        ));
    }
    if d.len() > 255 || !d.is_ascii() {
        return Err(ParseError::Syntax("invalid domain name"));
    }
    if d.starts_with('[') {
        if !d.ends_with(']') || !address_literal(&d[1..d.len() - 1]) {
            return Err(ParseError::Syntax("invalid address literal"));
        }
    } else if !d
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(ParseError::Syntax("invalid domain name"));
    }
    Ok(d.to_string())
}

fn address_literal(s: &str) -> bool {
    if let Some(v6) = s.strip_prefix("IPv6:").or_else(|| s.strip_prefix("ipv6:")) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        s.parse::<std::net::Ipv4Addr>().is_ok()
    }
}

/// `FROM:<path> [params]` (a space after the colon is tolerated; real clients send it).
fn mail(rest: &str) -> Result<Command, ParseError> {
    let arg =
        strip_keyword(rest, "FROM:").ok_or(ParseError::Syntax("expected MAIL FROM:<address>"))?;
    let (from, params) = path(arg, true)?;
    let mut p = MailParams::default();
    for param in params.split(' ').filter(|s| !s.is_empty()) {
        let (k, v) = match param.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (param, None),
        };
        match (k.to_ascii_uppercase().as_str(), v) {
            ("SIZE", Some(v)) if p.size.is_none() => {
                p.size = Some(
                    v.parse()
                        .map_err(|_| ParseError::Syntax("invalid SIZE value"))?,
                )
            }
            ("BODY", Some(v)) if p.body.is_none() => {
                p.body = Some(match v.to_ascii_uppercase().as_str() {
                    "7BIT" => Body::SevenBit,
                    "8BITMIME" => Body::EightBitMime,
                    _ => return Err(ParseError::Parameter(clip(param))),
                })
            }
            ("SMTPUTF8", None) if !p.smtputf8 => p.smtputf8 = true,
            _ => return Err(ParseError::Parameter(clip(param))),
        }
    }
    if !p.smtputf8 && !from.is_ascii() {
        return Err(ParseError::Syntax("8-bit address without SMTPUTF8"));
    }
    Ok(Command::Mail { from, params: p })
}

fn rcpt(rest: &str) -> Result<Command, ParseError> {
    let arg = strip_keyword(rest, "TO:").ok_or(ParseError::Syntax("expected RCPT TO:<address>"))?;
    let (to, params) = path(arg, false)?;
    if let Some(p) = params.split(' ').find(|s| !s.is_empty()) {
        return Err(ParseError::Parameter(clip(p)));
    }
    Ok(Command::Rcpt { to })
}

fn clip(s: &str) -> String {
    s.chars().take(40).collect()
}

fn strip_keyword<'a>(s: &'a str, kw: &str) -> Option<&'a str> {
    // `get`: the input may hold multi-byte characters; never slice inside one
    match (s.get(..kw.len()), s.get(kw.len()..)) {
        (Some(head), Some(rest)) if head.eq_ignore_ascii_case(kw) => {
            Some(rest.trim_start_matches(' '))
        }
        _ => None,
    }
}

/// `<addr>` followed by parameters. Returns the bare address (source routes
/// dropped, RFC 5321 §C) and the parameter text.
fn path(arg: &str, null_ok: bool) -> Result<(String, &str), ParseError> {
    let inner = arg
        .strip_prefix('<')
        .ok_or(ParseError::Syntax("address must be in <>"))?;
    let end = inner.find('>').ok_or(ParseError::Syntax("missing >"))?;
    let addr = &inner[..end];
    let params = &inner[end + 1..];
    if !params.is_empty() && !params.starts_with(' ') {
        return Err(ParseError::Syntax("space required after >"));
    }
    if addr.len() + 2 > MAX_PATH {
        return Err(ParseError::Syntax("address too long"));
    }
    let addr = strip_source_route(addr)?;
    if addr.is_empty() {
        return if null_ok {
            Ok((String::new(), params))
        } else {
            Err(ParseError::Syntax("empty recipient"))
        };
    }
    let special =
        |b: u8| b <= b' ' || matches!(b, b'<' | b'>' | b'(' | b')' | b',' | b';' | b'\\' | b'"');
    let (local, dom) = if addr.starts_with('"') {
        // a quoted local part may hold spaces and specials; it ends at its
        // closing quote, which must be right before the domain's `@`
        let (local, dom) =
            quoted_local(addr).ok_or(ParseError::Syntax("invalid quoted local part"))?;
        if dom.bytes().any(special) {
            return Err(ParseError::Syntax("invalid characters in address"));
        }
        (local, dom)
    } else {
        if addr.bytes().any(special) {
            return Err(ParseError::Syntax("invalid characters in address"));
        }
        let Some(split) = addr.rsplit_once('@') else {
            // RFC 5321 §4.5.1: <postmaster> without a domain must be accepted
            if !null_ok && addr.eq_ignore_ascii_case("postmaster") {
                return Ok((addr.to_string(), params));
            }
            return Err(ParseError::Syntax("address must be local@domain"));
        };
        split
    };
    // an unquoted local part holds no '@' or ':' (RFC 5321 Dot-string): what
    // is left of a route (`@b:user`) must never reach the backend
    if local.is_empty()
        || local.len() > 64
        || dom.is_empty()
        || (!local.starts_with('"') && local.contains(['@', ':']))
    {
        return Err(ParseError::Syntax("invalid address"));
    }
    if dom.starts_with('[') {
        if !dom.ends_with(']') || !address_literal(&dom[1..dom.len() - 1]) {
            return Err(ParseError::Syntax("invalid address literal"));
        }
    } else if dom.split('.').any(|l| l.is_empty() || l.len() > 63)
        || !dom
            .chars()
            .all(|c| c.is_alphanumeric() || c == '-' || c == '.')
    {
        return Err(ParseError::Syntax("invalid domain in address"));
    }
    Ok((addr.to_string(), params))
}

/// Drops a source route (RFC 5321 §4.1.2 `A-d-l ":"`, obsolete: §C says to
/// ignore it) completely: `<@a,@b:user@d>` and the non-standard nesting
/// `<@a:@b:user@d>` both become `user@d`. What is left never starts with `@`,
/// so the backend cannot be made to route through the listed hosts.
fn strip_source_route(mut addr: &str) -> Result<&str, ParseError> {
    while let Some(route) = addr.strip_prefix('@') {
        let (hops, rest) = route
            .split_once(':')
            .ok_or(ParseError::Syntax("bad source route"))?;
        if hops.split(',').enumerate().any(|(i, hop)| {
            let hop = if i == 0 {
                Some(hop)
            } else {
                hop.strip_prefix('@')
            };
            !hop.is_some_and(|h| {
                !h.is_empty()
                    && h.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']')
                    })
            })
        }) {
            return Err(ParseError::Syntax("bad source route"));
        }
        addr = rest;
    }
    Ok(addr)
}

/// Splits `"quoted"@domain`, reading the RFC 5321 Quoted-string from the
/// left: qtextSMTP (printable ASCII but `"` and `\\`, or UTF-8 for SMTPUTF8)
/// and quoted-pairSMTP (`\\` + printable ASCII). The closing quote must be
/// followed by the `@` of the domain: `"x"@evil"@good` is refused, never split
/// where a lax backend would split it differently.
fn quoted_local(addr: &str) -> Option<(&str, &str)> {
    let b = addr.as_bytes();
    let mut i = 1;
    while i < b.len() {
        match b[i] {
            b'"' => {
                let (local, rest) = addr.split_at(i + 1);
                return rest.strip_prefix('@').map(|dom| (local, dom));
            }
            b'\\' if b.get(i + 1).is_some_and(|c| (b' '..=b'~').contains(c)) => i += 2,
            b'\\' => return None,
            c if (b' '..=b'~').contains(&c) || c >= 0x80 => i += 1,
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Command {
        parse(s.as_bytes()).unwrap_or_else(|e| panic!("{s:?}: {e:?}"))
    }
    fn bad(s: &str) -> ParseError {
        parse(s.as_bytes()).expect_err(s)
    }

    #[test]
    fn verbs() {
        assert_eq!(
            ok("EHLO client.example"),
            Command::Ehlo("client.example".into())
        );
        assert_eq!(ok("ehlo [192.0.2.1]"), Command::Ehlo("[192.0.2.1]".into()));
        assert_eq!(
            ok("HELO [IPv6:2001:db8::1]"),
            Command::Helo("[IPv6:2001:db8::1]".into())
        );
        assert_eq!(ok("data"), Command::Data);
        assert_eq!(ok("NOOP hello"), Command::Noop);
        assert_eq!(ok("QUIT"), Command::Quit);
        assert_eq!(ok("StartTLS"), Command::StartTls);
        assert_eq!(ok("VRFY root"), Command::Vrfy);
        assert_eq!(
            ok("auth plain AGEAYg=="),
            Command::Auth {
                mechanism: "PLAIN".into(),
                initial: Some(Secret("AGEAYg==".into()))
            }
        );
        assert_eq!(
            ok("AUTH LOGIN"),
            Command::Auth {
                mechanism: "LOGIN".into(),
                initial: None
            }
        );
        assert!(matches!(bad("AUTH"), ParseError::Syntax(_)));
        assert_eq!(
            format!("{:?}", ok("AUTH PLAIN c2VjcmV0")),
            "Auth { mechanism: \"PLAIN\", initial: Some(<redacted>) }"
        );
        assert_eq!(bad("FOO"), ParseError::Unknown);
        assert_eq!(bad(""), ParseError::Unknown);
        assert!(matches!(bad("EHLO"), ParseError::Syntax(_)));
        assert!(matches!(bad("EHLO [1.2.3]"), ParseError::Syntax(_)));
        assert!(matches!(bad("EHLO a<b"), ParseError::Syntax(_)));
        assert!(matches!(bad("QUIT now"), ParseError::Syntax(_)));
        assert!(matches!(bad("STARTTLS x"), ParseError::Syntax(_)));
        assert_eq!(bad("NO\0OP"), ParseError::Bytes);
        assert!(matches!(bad("EHLO \u{e9}t\u{e9}"), ParseError::Syntax(_)));
    }

    #[test]
    fn mail_from() {
        assert_eq!(
            ok("MAIL FROM:<a@b.example>"),
            Command::Mail {
                from: "a@b.example".into(),
                params: MailParams::default()
            }
        );
        assert_eq!(
            ok("MAIL FROM:<>"),
            Command::Mail {
                from: "".into(),
                params: MailParams::default()
            }
        );
        assert_eq!(
            ok("mail from: <a@b.example> SIZE=1000 BODY=8BITMIME"),
            Command::Mail {
                from: "a@b.example".into(),
                params: MailParams {
                    size: Some(1000),
                    body: Some(Body::EightBitMime),
                    smtputf8: false
                }
            }
        );
        assert_eq!(
            ok("MAIL FROM:<@relay.example:a@b.example>"),
            Command::Mail {
                from: "a@b.example".into(),
                params: MailParams::default()
            }
        );
        assert!(matches!(
            ok("MAIL FROM:<j\u{f6}rg@b.example> SMTPUTF8"),
            Command::Mail {
                params: MailParams { smtputf8: true, .. },
                ..
            }
        ));
        assert!(matches!(
            bad("MAIL FROM:<j\u{f6}rg@b.example>"),
            ParseError::Syntax(_)
        ));
        assert!(matches!(
            ok("MAIL FROM:<\"john doe\"@b.example>"),
            Command::Mail { .. }
        ));
        assert_eq!(
            bad("MAIL FROM:<a@b.example> RET=FULL"),
            ParseError::Parameter("RET=FULL".into())
        );
        assert_eq!(
            bad("MAIL FROM:<a@b.example> BODY=BINARYMIME"),
            ParseError::Parameter("BODY=BINARYMIME".into())
        );
        assert!(matches!(
            bad("MAIL FROM:<a@b.example> SIZE=big"),
            ParseError::Syntax(_)
        ));
        assert!(matches!(
            bad("MAIL FROM:a@b.example"),
            ParseError::Syntax(_)
        ));
        assert!(matches!(
            bad("MAIL TO:<a@b.example>"),
            ParseError::Syntax(_)
        ));
        assert!(matches!(
            bad("MAIL FROM:<a@b.example"),
            ParseError::Syntax(_)
        ));
        assert!(matches!(
            bad("MAIL FROM:<a b@c.example>"),
            ParseError::Syntax(_)
        ));
        assert!(matches!(
            bad("MAIL FROM:<a@b..example>"),
            ParseError::Syntax(_)
        ));
        assert!(matches!(
            bad(&format!("MAIL FROM:<{}@b.example>", "a".repeat(300))),
            ParseError::Syntax(_)
        ));
    }

    /// Issue 11 item 10: every level of a source route goes, and nothing
    /// route-like is left for the backend to act on.
    #[test]
    fn source_routes_are_stripped_completely() {
        for line in [
            "RCPT TO:<@a.example,@b.example:user@d.example>",
            "RCPT TO:<@a.example:@b.example:user@d.example>",
            "RCPT TO:<@a.example:@b.example,@c.example:@e.example:user@d.example>",
        ] {
            assert_eq!(
                ok(line),
                Command::Rcpt {
                    to: "user@d.example".into()
                },
                "{line}"
            );
        }
        for line in [
            // what one level of stripping left behind, or a route in disguise
            "RCPT TO:<@a.example:b.example:user@d.example>",
            "RCPT TO:<a@b.example@d.example>",
            "RCPT TO:<@a.example,b.example:user@d.example>",
            "RCPT TO:<@:user@d.example>",
            "RCPT TO:<@a.example,@:user@d.example>",
            "MAIL FROM:<@a.example:@b.example>",
        ] {
            assert!(matches!(bad(line), ParseError::Syntax(_)), "{line}");
        }
        // quoted local parts and IPv6 literals keep their specials
        assert_eq!(
            ok("RCPT TO:<\"a@b:c\"@d.example>"),
            Command::Rcpt {
                to: "\"a@b:c\"@d.example".into()
            }
        );
        assert_eq!(
            ok("RCPT TO:<@a.example:u@[IPv6:2001:db8::1]>"),
            Command::Rcpt {
                to: "u@[IPv6:2001:db8::1]".into()
            }
        );
    }

    /// A quoted local part is read from the left (RFC 5321 Quoted-string:
    /// qtextSMTP / quoted-pairSMTP): its closing quote is the one right before
    /// the `@` of the domain. A second quoted section, a stray quote or
    /// backslash elsewhere would let a lax backend find another domain than
    /// ours (`"x"@evil"@good` ends in good for `rsplit`, in evil for others).
    #[test]
    fn quoted_local_parts_are_read_from_the_left() {
        for (line, to) in [
            (
                r#"RCPT TO:<"john doe"@d.example>"#,
                r#""john doe"@d.example"#,
            ),
            (r#"RCPT TO:<"a\"b"@d.example>"#, r#""a\"b"@d.example"#),
            (r#"RCPT TO:<"a\\"@d.example>"#, r#""a\\"@d.example"#),
            (r#"RCPT TO:<"a@b"@d.example>"#, r#""a@b"@d.example"#),
        ] {
            assert_eq!(ok(line), Command::Rcpt { to: to.into() }, "{line}");
        }
        for line in [
            r#"RCPT TO:<"x"@evil.example"@good.example>"#,
            r#"RCPT TO:<"x"@evil.example"x"@good.example>"#,
            r#"RCPT TO:<"x"y"@good.example>"#,
            r#"RCPT TO:<"x"y@good.example>"#,
            r#"RCPT TO:<x"y"@good.example>"#,
            r#"RCPT TO:<x"@good.example>"#,
            r#"RCPT TO:<"unterminated@good.example>"#,
            r#"RCPT TO:<"a\"@good.example>"#,
            "RCPT TO:<\"a\\\u{e9}\"@good.example>",
            "RCPT TO:<\"a\tb\"@good.example>",
            r#"RCPT TO:<"x"@good.example\>"#,
            r#"MAIL FROM:<"x"@evil.example"@good.example>"#,
        ] {
            assert!(matches!(bad(line), ParseError::Syntax(_)), "{line:?}");
        }
    }

    #[test]
    fn rcpt_to() {
        assert_eq!(
            ok("RCPT TO:<b@c.example>"),
            Command::Rcpt {
                to: "b@c.example".into()
            }
        );
        assert_eq!(
            ok("RCPT TO:<Postmaster>"),
            Command::Rcpt {
                to: "Postmaster".into()
            }
        );
        assert_eq!(
            ok("RCPT TO:<b@[192.0.2.7]>"),
            Command::Rcpt {
                to: "b@[192.0.2.7]".into()
            }
        );
        assert!(matches!(bad("RCPT TO:<>"), ParseError::Syntax(_)));
        assert!(matches!(bad("RCPT TO:<nobody>"), ParseError::Syntax(_)));
        assert_eq!(
            bad("RCPT TO:<b@c.example> NOTIFY=NEVER"),
            ParseError::Parameter("NOTIFY=NEVER".into())
        );
    }
}
