//! POP3 command parser for the AUTHORIZATION state (RFC 1939, 2449, 2595,
//! 5034), sans-IO, plus the SASL PLAIN decoding the session needs. Input is
//! one line without its CRLF. TRANSACTION-state commands have their own
//! parser (`transaction.rs`); here they are recognised only to say "not
//! logged in" instead of "unknown".

use std::fmt;

/// Longest user name mailgate passes to a backend.
pub const MAX_USER: usize = 255;
/// Longest password mailgate passes to a backend.
pub const MAX_PASS: usize = 255;
/// Longest command line, CRLF included (RFC 2449 §4). SASL response lines
/// are not commands and may be longer (RFC 5034 §4: `max_command_line`).
pub const MAX_COMMAND_LINE: usize = 255;

#[derive(Clone, PartialEq, Eq)]
pub enum Command {
    Capa,
    Stls,
    User(String),
    Pass(String),
    /// `AUTH` (list mechanisms), `AUTH PLAIN`, `AUTH PLAIN <initial response>`.
    Auth {
        mechanism: Option<String>,
        initial: Option<String>,
    },
    Apop {
        user: String,
        digest: String,
    },
    Quit,
    Noop,
    /// A TRANSACTION-state command (STAT, LIST, RETR …) before login.
    Transaction(&'static str),
}

// Debug never shows passwords or SASL payloads (they would end up in logs).
impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::User(u) => write!(f, "User({u:?})"),
            Command::Pass(_) => f.write_str("Pass(<redacted>)"),
            Command::Auth { mechanism, initial } => write!(
                f,
                "Auth {{ mechanism: {mechanism:?}, initial: {} }}",
                if initial.is_some() {
                    "<redacted>"
                } else {
                    "None"
                }
            ),
            Command::Apop { user, .. } => write!(f, "Apop({user:?}, <digest>)"),
            other => f.write_str(other.verb()),
        }
    }
}

impl Command {
    /// The verb, for logs (arguments are never logged).
    pub fn verb(&self) -> &'static str {
        match self {
            Command::Capa => "CAPA",
            Command::Stls => "STLS",
            Command::User(_) => "USER",
            Command::Pass(_) => "PASS",
            Command::Auth { .. } => "AUTH",
            Command::Apop { .. } => "APOP",
            Command::Quit => "QUIT",
            Command::Noop => "NOOP",
            Command::Transaction(v) => v,
        }
    }
}

/// The verb of a command line as a metrics label: a known POP3 verb, else
/// `invalid` (labels must not grow with what clients send).
pub fn metric_verb(line: &[u8]) -> &'static str {
    const KNOWN: [&str; 17] = [
        "CAPA", "STLS", "USER", "PASS", "AUTH", "APOP", "QUIT", "NOOP", "STAT", "LIST", "RETR",
        "DELE", "RSET", "TOP", "UIDL", "LAST", "XTND",
    ];
    let end = line.iter().position(|b| *b == b' ').unwrap_or(line.len());
    let verb = &line[..end];
    KNOWN
        .iter()
        .find(|k| k.as_bytes().eq_ignore_ascii_case(verb))
        .copied()
        .unwrap_or("invalid")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// Not a command we know.
    Unknown,
    /// Known command, bad arguments.
    Syntax(&'static str),
    /// Control characters (or 8-bit outside a password) in the line.
    Bytes,
}

const TRANSACTION: [&str; 9] = [
    "STAT", "LIST", "RETR", "DELE", "RSET", "TOP", "UIDL", "LAST", "XTND",
];

pub fn parse(line: &[u8]) -> Result<Command, ParseError> {
    // CR, LF, NUL and other controls never reach a backend inside an argument
    if line.iter().any(|b| *b < 0x20 || *b == 0x7f) {
        return Err(ParseError::Bytes);
    }
    let (verb, rest) = match line.iter().position(|b| *b == b' ') {
        Some(i) => (&line[..i], Some(&line[i + 1..])),
        None => (line, None),
    };
    if verb.is_empty() || verb.len() > 4 || !verb.iter().all(u8::is_ascii_alphabetic) {
        return Err(ParseError::Unknown);
    }
    let verb = String::from_utf8_lossy(verb).to_ascii_uppercase();
    // a password may be UTF-8 (RFC 5198 era clients); every other argument is ASCII
    let text = |b: Option<&[u8]>| -> Result<Option<String>, ParseError> {
        match b {
            None => Ok(None),
            Some(b) if b.is_ascii() => Ok(Some(String::from_utf8_lossy(b).into_owned())),
            Some(_) => Err(ParseError::Bytes),
        }
    };
    let no_args = |c: Command| match rest {
        None => Ok(c),
        Some(r) if r.iter().all(|b| *b == b' ') => Ok(c),
        Some(_) => Err(ParseError::Syntax("no arguments allowed")),
    };
    match verb.as_str() {
        "CAPA" => no_args(Command::Capa),
        "STLS" => no_args(Command::Stls),
        "QUIT" => no_args(Command::Quit),
        "NOOP" => no_args(Command::Noop),
        "USER" => {
            let user = text(rest)?.unwrap_or_default();
            let user = user.trim_matches(' ');
            if user.is_empty() {
                return Err(ParseError::Syntax("USER needs a name"));
            }
            // one name, one limiter key: `USER alice STAT` is not alice
            if user.contains(' ') {
                return Err(ParseError::Syntax("spaces in user name"));
            }
            if user.len() > MAX_USER {
                return Err(ParseError::Syntax("user name too long"));
            }
            Ok(Command::User(user.to_string()))
        }
        "PASS" => {
            // the whole rest of the line: passwords may contain spaces (RFC 1939 §7)
            let Some(pass) = rest.filter(|r| !r.is_empty()) else {
                return Err(ParseError::Syntax("PASS needs a password"));
            };
            let pass = std::str::from_utf8(pass).map_err(|_| ParseError::Bytes)?;
            if pass.len() > MAX_PASS {
                return Err(ParseError::Syntax("password too long"));
            }
            Ok(Command::Pass(pass.to_string()))
        }
        "AUTH" => {
            let args = text(rest)?.unwrap_or_default();
            let mut words = args.split(' ').filter(|w| !w.is_empty());
            let mechanism = words.next().map(|m| m.to_ascii_uppercase());
            let initial = words.next().map(str::to_string);
            if words.next().is_some() {
                return Err(ParseError::Syntax("too many arguments"));
            }
            Ok(Command::Auth { mechanism, initial })
        }
        "APOP" => {
            let args = text(rest)?.unwrap_or_default();
            let mut words = args.split(' ').filter(|w| !w.is_empty());
            let (Some(user), Some(digest), None) = (words.next(), words.next(), words.next())
            else {
                return Err(ParseError::Syntax("APOP needs a name and a digest"));
            };
            if user.len() > MAX_USER {
                return Err(ParseError::Syntax("user name too long"));
            }
            if digest.len() != 32 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ParseError::Syntax("APOP digest must be 32 hex digits"));
            }
            Ok(Command::Apop {
                user: user.to_string(),
                digest: digest.to_ascii_lowercase(),
            })
        }
        v => match TRANSACTION.iter().find(|t| **t == v) {
            Some(t) => Ok(Command::Transaction(t)),
            None => Err(ParseError::Unknown),
        },
    }
}

/// Credentials from SASL PLAIN (RFC 4616).
#[derive(Clone, PartialEq, Eq)]
pub struct Plain {
    pub authzid: String,
    pub user: String,
    pub pass: String,
}

impl fmt::Debug for Plain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Plain {{ authzid: {:?}, user: {:?}, pass: <redacted> }}",
            self.authzid, self.user
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    #[error("invalid base64")]
    Base64,
    #[error("malformed PLAIN message")]
    Malformed,
}

/// Decodes a PLAIN response: base64 of `authzid NUL authcid NUL passwd`.
/// `=` is the empty response (RFC 5034 §4), which is malformed for PLAIN.
pub fn decode_plain(b64: &str) -> Result<Plain, SaslError> {
    let raw = if b64 == "=" {
        Vec::new()
    } else {
        base64_decode(b64).ok_or(SaslError::Base64)?
    };
    let mut parts = raw.split(|b| *b == 0);
    let (Some(z), Some(u), Some(p), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslError::Malformed);
    };
    let s = |b: &[u8], max: usize| -> Result<String, SaslError> {
        let s = std::str::from_utf8(b).map_err(|_| SaslError::Malformed)?;
        if s.len() > max || s.chars().any(|c| c.is_control()) {
            return Err(SaslError::Malformed);
        }
        Ok(s.to_string())
    };
    // names carry no whitespace at all (U+00A0 and friends included):
    // `alice x1` must not be a second limiter key for alice
    let name = |b: &[u8]| -> Result<String, SaslError> {
        let n = std::str::from_utf8(b).map_err(|_| SaslError::Malformed)?;
        if !crate::policy::valid_login_name(n) {
            return Err(SaslError::Malformed);
        }
        Ok(n.to_string())
    };
    let plain = Plain {
        authzid: name(z)?,
        user: name(u)?,
        pass: s(p, MAX_PASS)?,
    };
    // the user goes into `USER name`: not empty
    if plain.user.is_empty() || plain.pass.is_empty() {
        return Err(SaslError::Malformed);
    }
    Ok(plain)
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Strict standard base64 (RFC 4648 §4): length a multiple of 4, padding only
/// at the end, no whitespace. `None` for anything else.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if s.is_empty() || !s.len().is_multiple_of(4) {
        return None;
    }
    let pad = s.iter().rev().take_while(|b| **b == b'=').count();
    if pad > 2 {
        return None;
    }
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let body = &s[..s.len() - pad];
    for chunk in body.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c)? << (18 - 6 * i);
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        let keep = match chunk.len() {
            4 => 3,
            3 => 2,
            2 => 1,
            _ => return None,
        };
        // non-canonical encodings (stray low bits) are rejected
        if keep < 3 && bytes[keep..].iter().any(|b| *b != 0) {
            return None;
        }
        out.extend_from_slice(&bytes[..keep]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        let ok: &[(&str, Command)] = &[
            ("CAPA", Command::Capa),
            ("capa", Command::Capa),
            ("STLS", Command::Stls),
            ("QUIT", Command::Quit),
            ("NOOP ", Command::Noop),
            ("USER alice", Command::User("alice".into())),
            (
                "user  alice@example.org ",
                Command::User("alice@example.org".into()),
            ),
            (
                "PASS s3cret with spaces ",
                Command::Pass("s3cret with spaces ".into()),
            ),
            ("PASS pässwörd", Command::Pass("pässwörd".into())),
            (
                "AUTH",
                Command::Auth {
                    mechanism: None,
                    initial: None,
                },
            ),
            (
                "AUTH plain",
                Command::Auth {
                    mechanism: Some("PLAIN".into()),
                    initial: None,
                },
            ),
            (
                "AUTH PLAIN AGFsaWNlAHNlY3JldA==",
                Command::Auth {
                    mechanism: Some("PLAIN".into()),
                    initial: Some("AGFsaWNlAHNlY3JldA==".into()),
                },
            ),
            (
                "APOP mrose C4C9334BAC560ECC979E58001B3E22FB",
                Command::Apop {
                    user: "mrose".into(),
                    digest: "c4c9334bac560ecc979e58001b3e22fb".into(),
                },
            ),
            ("STAT", Command::Transaction("STAT")),
            ("retr 1", Command::Transaction("RETR")),
            ("TOP 1 10", Command::Transaction("TOP")),
        ];
        for (line, want) in ok {
            assert_eq!(parse(line.as_bytes()).as_ref(), Ok(want), "{line}");
        }
        let bad: &[(&[u8], ParseError)] = &[
            (b"", ParseError::Unknown),
            (b" USER a", ParseError::Unknown),
            (b"HELO x", ParseError::Unknown),
            (b"XXXXX", ParseError::Unknown),
            (b"CAPA x", ParseError::Syntax("no arguments allowed")),
            (b"STLS now", ParseError::Syntax("no arguments allowed")),
            (b"USER", ParseError::Syntax("USER needs a name")),
            (b"USER  ", ParseError::Syntax("USER needs a name")),
            (b"PASS", ParseError::Syntax("PASS needs a password")),
            (b"PASS ", ParseError::Syntax("PASS needs a password")),
            (
                b"USER alice STAT",
                ParseError::Syntax("spaces in user name"),
            ),
            (b"USER a\tb", ParseError::Bytes),
            (b"USER a\x1b[0m", ParseError::Bytes),
            (
                b"APOP al\x7fice c4c9334bac560ecc979e58001b3e22fb",
                ParseError::Bytes,
            ),
            (b"USER a\0b", ParseError::Bytes),
            (b"USER a\rPASS b", ParseError::Bytes),
            (b"USER j\xc3\xb6rg", ParseError::Bytes),
            (b"PASS \xff\xfe", ParseError::Bytes),
            (b"AUTH PLAIN a b", ParseError::Syntax("too many arguments")),
            (
                b"APOP mrose",
                ParseError::Syntax("APOP needs a name and a digest"),
            ),
            (
                b"APOP mrose xyz",
                ParseError::Syntax("APOP digest must be 32 hex digits"),
            ),
        ];
        for (line, want) in bad {
            assert_eq!(
                parse(line).as_ref(),
                Err(want),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        let long_user = format!("USER {}", "u".repeat(MAX_USER + 1));
        assert!(parse(long_user.as_bytes()).is_err());
    }

    #[test]
    fn metric_verbs_are_bounded() {
        assert_eq!(metric_verb(b"retr 1"), "RETR");
        assert_eq!(metric_verb(b"CAPA"), "CAPA");
        assert_eq!(metric_verb(b"AGFsaWNlAHNlY3JldA=="), "invalid");
        assert_eq!(metric_verb(b""), "invalid");
    }

    #[test]
    fn debug_never_shows_secrets() {
        let c = parse(b"PASS hunter2").unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        let c = parse(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==").unwrap();
        assert!(!format!("{c:?}").contains("AGFs"));
        let p = decode_plain("AGFsaWNlAHNlY3JldA==").unwrap();
        assert!(!format!("{p:?}").contains("secret"));
    }

    #[test]
    fn base64_round_trip() {
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(raw.as_bytes()), enc);
            if !enc.is_empty() {
                assert_eq!(base64_decode(enc).unwrap(), raw.as_bytes());
            }
        }
        for bad in [
            "",
            "Zg",
            "Zg=",
            "Z===",
            "Zh==",
            "Zm9v YmFy",
            "Zm9v\n",
            "Zm=v",
            "éé==",
        ] {
            assert_eq!(base64_decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn plain() {
        assert_eq!(
            decode_plain("AGFsaWNlAHNlY3JldA==").unwrap(),
            Plain {
                authzid: String::new(),
                user: "alice".into(),
                pass: "secret".into()
            }
        );
        let with_authz = base64_encode(b"admin\0alice\0pw");
        // passwords may hold spaces
        assert_eq!(
            decode_plain(&base64_encode(b"\0alice\0s3 cr3t"))
                .unwrap()
                .pass,
            "s3 cr3t"
        );
        assert_eq!(decode_plain(&with_authz).unwrap().authzid, "admin");
        for (raw, want) in [
            (&b"alice\0secret"[..], SaslError::Malformed),
            (b"\0\0secret", SaslError::Malformed),
            (b"\0alice\0", SaslError::Malformed),
            (b"\0alice\0se\0cret", SaslError::Malformed),
            (b"\0al\rice\0secret", SaslError::Malformed),
            (b"\0 alice\0secret", SaslError::Malformed),
            (b"\0\xff\0secret", SaslError::Malformed),
            (b"\0alice x1\0secret", SaslError::Malformed),
            (b"admin x\0alice\0secret", SaslError::Malformed),
            (b"\0alice\xc2\xa0\0secret", SaslError::Malformed),
            (b"\0alice\xc2\x85\0secret", SaslError::Malformed),
        ] {
            assert_eq!(decode_plain(&base64_encode(raw)), Err(want));
        }
        assert_eq!(decode_plain("="), Err(SaslError::Malformed));
        assert_eq!(decode_plain("!!!!"), Err(SaslError::Base64));
    }
}
