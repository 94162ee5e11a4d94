//! POP3 command parser for the AUTHORIZATION state (RFC 1939, 2449, 2595,
//! 5034), sans-IO, plus the SASL PLAIN decoding the session needs. Input is
//! one line without its CRLF. TRANSACTION-state commands have their own
//! parser (`transaction.rs`); here they are recognised only to say "not
//! logged in" instead of "unknown".

use std::fmt;

/// Longest user name mailgate passes to a backend.
pub const MAX_USER: usize = 255;
use crate::conn::sasl::MAX_PASS;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::sasl::decode_plain;

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
}
