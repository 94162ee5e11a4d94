//! IMAP command syntax for the not-authenticated state (RFC 3501 §9,
//! RFC 9051 §9), sans-IO: tags, atoms, quoted strings, literals `{n}`
//! (synchronising: the server says `+` first) and `{n+}` (LITERAL+,
//! RFC 7888), all bounded.
//!
//! A command arrives in pieces: a line, and after each line that ends in a
//! literal announcement the literal's octets, then the next line. The
//! [`Assembler`] takes the pieces as the driver reads them and says what
//! comes next — a literal (the session says whether `+ ` goes first or the
//! command is refused there, its rest then dropped), how many octets to
//! read — checking every literal's size against the command's budget
//! before anything of it is read. The assembled command goes to [`parse`].
//! [`literal_at_end`] and [`tag_and_verb`] are shared with the
//! authenticated-state tracker (`tracker.rs`).

use crate::conn::sasl::MAX_PASS;
use std::fmt;

/// Longest tag mailgate accepts (RFC 3501 sets none; real tags are short).
pub const MAX_TAG: usize = 64;
/// Longest user name mailgate passes to a backend.
pub const MAX_USER: usize = 255;

/// A literal announced at the end of a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Literal {
    /// Octets announced (saturating: an absurd size stays absurd).
    pub size: u64,
    /// `{n}`: the client waits for `+`; `{n+}`: the octets follow at once.
    pub sync: bool,
}

/// The literal announced at the end of `line` (without CRLF), if any:
/// `{n}`, `{n+}`, or the BINARY forms `~{n}`, `~{n+}` (RFC 3516). A `{` inside
/// a quoted string is not one (a quoted string never spans lines).
pub fn literal_at_end(line: &[u8]) -> Option<Literal> {
    let (open, lit) = literal_syntax(line)?;
    (!in_quote(&line[..open])).then_some(lit)
}

/// The `{n}` / `{n+}` that `line` ends with, by its own syntax only (the
/// caller knows whether it stands inside a quoted string), and where its
/// `{` is.
pub fn literal_syntax(line: &[u8]) -> Option<(usize, Literal)> {
    let body = line.strip_suffix(b"}")?;
    let open = body.iter().rposition(|b| *b == b'{')?;
    let (digits, sync) = match body[open + 1..].strip_suffix(b"+") {
        Some(d) => (d, false),
        None => (&body[open + 1..], true),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let size = digits.iter().fold(0u64, |n, d| {
        n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    });
    Some((open, Literal { size, sync }))
}

/// Whether the literal `line` ends with stands where the grammar allows a
/// string (RFC 3501 §9: after SP or `(`, its `~` too for BINARY). Servers
/// read a `{n}` glued to an atom (`x{5}`) differently — Dovecot as part of
/// the atom, the line then ends there — so such a line is never forwarded:
/// octets mailgate would skip as a literal would be a command to the backend.
pub fn literal_placed(line: &[u8]) -> bool {
    let Some((open, _)) = literal_syntax(line) else {
        return true;
    };
    let before = &line[..open];
    let before = before.strip_suffix(b"~").unwrap_or(before);
    matches!(before.last(), Some(b' ' | b'('))
}

/// Whether `s` ends inside an open quoted string.
fn in_quote(s: &[u8]) -> bool {
    let mut quoted = false;
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            _ => {}
        }
        i += 1;
    }
    quoted
}

/// ATOM-CHAR (RFC 3501 §9): any CHAR except atom-specials.
fn atom_char(b: u8) -> bool {
    (0x21..0x7f).contains(&b) && !b"(){%*\"\\]".contains(&b)
}

/// ASTRING-CHAR: ATOM-CHAR or `]`.
fn astring_char(b: u8) -> bool {
    atom_char(b) || b == b']'
}

/// A valid tag: 1*<ASTRING-CHAR except "+">, at most [`MAX_TAG`].
pub fn valid_tag(t: &[u8]) -> bool {
    !t.is_empty() && t.len() <= MAX_TAG && t.iter().all(|b| astring_char(*b) && *b != b'+')
}

/// The tag and the verb (upper case) a command line starts with, when both
/// are well-formed.
pub fn tag_and_verb(line: &[u8]) -> Option<(&str, String)> {
    let sp = line.iter().position(|b| *b == b' ')?;
    let (tag, rest) = (&line[..sp], &line[sp + 1..]);
    if !valid_tag(tag) {
        return None;
    }
    let end = rest
        .iter()
        .position(|b| !atom_char(*b))
        .unwrap_or(rest.len());
    if end == 0 || end > 32 {
        return None;
    }
    let verb = std::str::from_utf8(&rest[..end]).ok()?.to_ascii_uppercase();
    Some((std::str::from_utf8(tag).ok()?, verb))
}

/// The tag a line starts with, if it is a valid one (for a BAD to a line
/// that did not parse).
pub fn tag_of(line: &[u8]) -> Option<String> {
    let end = line.iter().position(|b| *b == b' ').unwrap_or(line.len());
    valid_tag(&line[..end]).then(|| String::from_utf8_lossy(&line[..end]).into_owned())
}

/// What the driver does after a piece of a command.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// The command is whole: for [`parse`].
    Complete(Vec<u8>),
    /// A literal of this size follows (after `+ ` where it is synchronising:
    /// the session decides, `Session::literal`).
    Literal(Literal),
    /// The literal announced would take the command over its budget; nothing
    /// of it is read. Synchronising: the client sends none of it (RFC 3501
    /// §7.5) and the command is over; otherwise the session must end.
    TooBig { tag: Option<String>, sync: bool },
    /// A non-synchronising literal of a command answered already
    /// ([`Assembler::refuse`]): its octets are on the way, to be read and
    /// dropped ([`Assembler::literal`]).
    Skip(u64),
    /// The end of a command answered already: nothing more of it comes.
    Dropped,
}

/// Collects one command's pieces, within `max` octets in all.
pub struct Assembler {
    buf: Vec<u8>,
    /// Octets of the command so far, kept or not.
    taken: usize,
    /// The command was answered at a literal's announcement: the rest of
    /// it is counted against the budget but never kept.
    refused: bool,
    max: usize,
}

impl Assembler {
    pub fn new(max: usize) -> Self {
        Assembler {
            buf: Vec::new(),
            taken: 0,
            refused: false,
            max,
        }
    }

    /// Inside a command (a literal was announced, or is being read).
    pub fn in_command(&self) -> bool {
        self.taken > 0
    }

    /// Octets the command may still take.
    pub fn room(&self) -> usize {
        self.max.saturating_sub(self.taken)
    }

    /// The tag of the command being assembled, if valid.
    pub fn tag(&self) -> Option<String> {
        tag_of(&self.buf)
    }

    /// The command's pieces so far (its first line at least, where a
    /// literal was announced).
    pub fn head(&self) -> &[u8] {
        &self.buf
    }

    /// Forgets the command (an error, or STARTTLS).
    pub fn reset(&mut self) {
        self.buf = Vec::new();
        self.taken = 0;
        self.refused = false;
    }

    /// The command was answered at the announcement of `lit` (a refusal):
    /// nothing of it is kept any more, and the rest is dropped. A
    /// synchronising literal never comes — the client has the tagged answer
    /// instead of `+` (RFC 3501 §7.5) — so the command is over. A
    /// non-synchronising one comes anyway (RFC 7888): its octets, returned,
    /// are to be read and dropped, and so is the rest of the command.
    pub fn refuse(&mut self, lit: Literal) -> u64 {
        if lit.sync {
            self.reset();
            return 0;
        }
        // what was read stays counted: the budget covers the whole command
        self.buf = Vec::new();
        self.refused = true;
        lit.size
    }

    /// A line without CRLF (at most [`room`](Self::room) octets: the driver
    /// reads it with that bound).
    pub fn line(&mut self, line: &[u8]) -> Next {
        self.taken = self.taken.saturating_add(line.len());
        if !self.refused {
            self.buf.extend_from_slice(line);
        }
        let lit = literal_at_end(line);
        if self.refused {
            return match lit {
                Some(l) if !l.sync => {
                    if l.size > (self.room().saturating_sub(2)) as u64 {
                        self.reset();
                        return Next::TooBig {
                            tag: None,
                            sync: false,
                        };
                    }
                    self.taken += 2;
                    Next::Skip(l.size)
                }
                // a synchronising literal: the client has the answer and
                // waits for a `+` that never comes; the command is over
                _ => {
                    self.reset();
                    Next::Dropped
                }
            };
        }
        match lit {
            None => {
                let cmd = std::mem::take(&mut self.buf);
                self.reset();
                Next::Complete(cmd)
            }
            Some(lit) => {
                // the CRLF that ends the announcement is part of the syntax
                if lit.size > (self.room().saturating_sub(2)) as u64 {
                    let tag = self.tag();
                    self.reset();
                    return Next::TooBig {
                        tag,
                        sync: lit.sync,
                    };
                }
                self.buf.extend_from_slice(b"\r\n");
                self.taken += 2;
                Next::Literal(lit)
            }
        }
    }

    /// The octets of the literal just announced (dropped where the command
    /// was answered already).
    pub fn literal(&mut self, data: &[u8]) {
        self.taken = self.taken.saturating_add(data.len());
        if !self.refused {
            self.buf.extend_from_slice(data);
        }
    }
}

/// A not-authenticated-state command.
#[derive(Clone, PartialEq, Eq)]
pub enum Command {
    Capability,
    Noop,
    Logout,
    StartTls,
    Login {
        user: String,
        password: String,
    },
    Authenticate {
        mechanism: String,
        /// SASL-IR (RFC 4959): the initial response, `=` for an empty one.
        initial: Option<String>,
    },
    /// RFC 2971; the client's fields are checked, not kept.
    Id,
    /// A command of the authenticated or selected state.
    NotYet,
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Login { user, .. } => {
                write!(f, "Login {{ user: {user:?}, password: <redacted> }}")
            }
            Command::Authenticate { mechanism, initial } => write!(
                f,
                "Authenticate {{ mechanism: {mechanism:?}, initial: {} }}",
                if initial.is_some() {
                    "<redacted>"
                } else {
                    "none"
                }
            ),
            Command::Capability => write!(f, "Capability"),
            Command::Noop => write!(f, "Noop"),
            Command::Logout => write!(f, "Logout"),
            Command::StartTls => write!(f, "StartTls"),
            Command::Id => write!(f, "Id"),
            Command::NotYet => write!(f, "NotYet"),
        }
    }
}

/// A tagged command.
#[derive(Debug, PartialEq, Eq)]
pub struct Tagged {
    pub tag: String,
    pub command: Command,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    /// Not a known IMAP command.
    Unknown,
    /// NUL, bare CR/LF, invalid UTF-8 where text is required.
    Bytes,
    Syntax(&'static str),
}

/// A command that did not parse; `tag` when it had a valid one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub tag: Option<String>,
    pub kind: ErrorKind,
}

/// Commands of the later states: answered "not logged in", not "unknown".
const LATER: &[&str] = &[
    "SELECT",
    "EXAMINE",
    "CREATE",
    "DELETE",
    "RENAME",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "LIST",
    "LSUB",
    "NAMESPACE",
    "STATUS",
    "APPEND",
    "IDLE",
    "ENABLE",
    "CHECK",
    "CLOSE",
    "UNSELECT",
    "EXPUNGE",
    "SEARCH",
    "FETCH",
    "STORE",
    "COPY",
    "MOVE",
    "UID",
    "GETQUOTA",
    "GETQUOTAROOT",
    "SETQUOTA",
    "GETACL",
    "SETACL",
    "MYRIGHTS",
    "LISTRIGHTS",
    "GETMETADATA",
    "SETMETADATA",
    "COMPRESS",
    "NOTIFY",
];

/// The verb as a metric label: known verbs, else `other` (bounded labels).
pub fn metric_verb(verb: &str) -> &'static str {
    const OWN: &[&str] = &[
        "CAPABILITY",
        "NOOP",
        "LOGOUT",
        "STARTTLS",
        "LOGIN",
        "AUTHENTICATE",
        "ID",
    ];
    OWN.iter()
        .chain(LATER)
        .find(|v| v.eq_ignore_ascii_case(verb))
        .copied()
        .unwrap_or("other")
}

/// Parses one assembled command (pieces joined as the client sent them,
/// without the final CRLF).
pub fn parse(cmd: &[u8]) -> Result<Tagged, ParseError> {
    let tag = tag_of(cmd);
    let err = |kind| ParseError {
        tag: tag.clone(),
        kind,
    };
    // a literal's octets may be anything; only the lines between are checked
    if lines_have_bad_bytes(cmd) {
        return Err(err(ErrorKind::Bytes));
    }
    let Some(tag) = tag.clone() else {
        return Err(err(ErrorKind::Syntax("a tag is required")));
    };
    let mut p = Lexer {
        b: cmd,
        i: tag.len(),
    };
    if !p.sp() {
        return Err(err(ErrorKind::Syntax("a command is required")));
    }
    let verb = p
        .atom()
        .ok_or(err(ErrorKind::Syntax("a command is required")))?
        .to_ascii_uppercase();
    let command = match verb.as_str() {
        "CAPABILITY" => Command::Capability,
        "NOOP" => Command::Noop,
        "LOGOUT" => Command::Logout,
        "STARTTLS" => Command::StartTls,
        "LOGIN" => {
            let user = p.arg().map_err(|w| err(ErrorKind::Syntax(w)))?;
            let password = p.arg().map_err(|w| err(ErrorKind::Syntax(w)))?;
            let user = String::from_utf8(user).map_err(|_| err(ErrorKind::Bytes))?;
            let password = String::from_utf8(password).map_err(|_| err(ErrorKind::Bytes))?;
            // names carry no whitespace or controls (one limiter key per user)
            if user.len() > MAX_USER || !crate::policy::valid_login_name(&user) || user.is_empty() {
                return Err(err(ErrorKind::Syntax("invalid user name")));
            }
            if password.is_empty()
                || password.len() > MAX_PASS
                || password.chars().any(char::is_control)
            {
                return Err(err(ErrorKind::Syntax("invalid password")));
            }
            p.end().map_err(|w| err(ErrorKind::Syntax(w)))?;
            Command::Login { user, password }
        }
        "AUTHENTICATE" => {
            if !p.sp() {
                return Err(err(ErrorKind::Syntax("a mechanism is required")));
            }
            let mechanism = p
                .atom()
                .ok_or(err(ErrorKind::Syntax("a mechanism is required")))?
                .to_ascii_uppercase();
            let initial = if p.sp() {
                let ir = p
                    .atom()
                    .ok_or(err(ErrorKind::Syntax("invalid initial response")))?;
                if !ir
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
                {
                    return Err(err(ErrorKind::Syntax("invalid initial response")));
                }
                Some(ir.to_string())
            } else {
                None
            };
            p.end().map_err(|w| err(ErrorKind::Syntax(w)))?;
            Command::Authenticate { mechanism, initial }
        }
        "ID" => {
            p.id_list().map_err(|w| err(ErrorKind::Syntax(w)))?;
            p.end().map_err(|w| err(ErrorKind::Syntax(w)))?;
            Command::Id
        }
        v if LATER.contains(&v) => Command::NotYet,
        _ => return Err(err(ErrorKind::Unknown)),
    };
    // no arguments where none are defined
    if matches!(
        command,
        Command::Capability | Command::Noop | Command::Logout | Command::StartTls
    ) {
        p.end().map_err(|w| err(ErrorKind::Syntax(w)))?;
    }
    Ok(Tagged { tag, command })
}

/// NUL, or CR / LF other than the CRLF after a literal announcement, in the
/// line parts of `cmd`.
fn lines_have_bad_bytes(cmd: &[u8]) -> bool {
    let mut i = 0;
    let mut line_start = 0;
    while i < cmd.len() {
        match cmd[i] {
            0 => return true,
            b'\r' | b'\n' => {
                // only `{n}` / `{n+}` CRLF, then the literal's octets
                let Some(lit) = literal_at_end(&cmd[line_start..i]) else {
                    return true;
                };
                if !cmd[i..].starts_with(b"\r\n") {
                    return true;
                }
                let skip = usize::try_from(lit.size).unwrap_or(usize::MAX);
                i = (i + 2).saturating_add(skip);
                line_start = i;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    false
}

struct Lexer<'a> {
    b: &'a [u8],
    i: usize,
}

impl Lexer<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn sp(&mut self) -> bool {
        if self.peek() == Some(b' ') {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn end(&self) -> Result<(), &'static str> {
        if self.i == self.b.len() {
            Ok(())
        } else {
            Err("unexpected arguments")
        }
    }

    fn atom(&mut self) -> Option<&str> {
        let start = self.i;
        while self.peek().is_some_and(astring_char) {
            self.i += 1;
        }
        if self.i == start {
            return None;
        }
        std::str::from_utf8(&self.b[start..self.i]).ok()
    }

    /// SP astring (RFC 3501 §9): atom, quoted string or literal.
    fn arg(&mut self) -> Result<Vec<u8>, &'static str> {
        if !self.sp() {
            return Err("missing argument");
        }
        self.string(true)
    }

    /// A quoted string, a literal, or (where `atoms`) an atom.
    fn string(&mut self, atoms: bool) -> Result<Vec<u8>, &'static str> {
        match self.peek() {
            Some(b'"') => self.quoted(),
            Some(b'{') => self.literal(),
            Some(_) if atoms => self
                .atom()
                .map(|a| a.as_bytes().to_vec())
                .ok_or("invalid argument"),
            _ => Err("a string is required"),
        }
    }

    /// `"…"` with `\"` and `\\` the only escapes; 8-bit UTF-8 allowed
    /// (RFC 9051 / RFC 6855 clients send it).
    fn quoted(&mut self) -> Result<Vec<u8>, &'static str> {
        self.i += 1;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err("unterminated quoted string"),
                Some(b'"') => {
                    self.i += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    match self.b.get(self.i + 1) {
                        Some(c @ (b'"' | b'\\')) => out.push(*c),
                        _ => return Err("invalid escape in quoted string"),
                    }
                    self.i += 2;
                }
                Some(b'\r' | b'\n') => return Err("invalid quoted string"),
                Some(c) => {
                    out.push(c);
                    self.i += 1;
                }
            }
        }
    }

    /// `{n}` / `{n+}` CRLF and n octets (the assembler checked the size).
    fn literal(&mut self) -> Result<Vec<u8>, &'static str> {
        let rest = &self.b[self.i..];
        let crlf = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("invalid literal")?;
        let lit = literal_at_end(&rest[..crlf]).ok_or("invalid literal")?;
        if crlf < 3
            || !rest[1..crlf - 1]
                .iter()
                .all(|b| b.is_ascii_digit() || *b == b'+')
        {
            return Err("invalid literal");
        }
        let start = self.i + crlf + 2;
        let end = usize::try_from(lit.size)
            .ok()
            .and_then(|n| start.checked_add(n))
            .filter(|e| *e <= self.b.len())
            .ok_or("literal shorter than announced")?;
        self.i = end;
        Ok(self.b[start..end].to_vec())
    }

    /// `SP (NIL / "(" *(string SP nstring) ")")` (RFC 2971 §3.3), at most
    /// 30 pairs.
    fn id_list(&mut self) -> Result<(), &'static str> {
        if !self.sp() {
            return Err("missing argument");
        }
        if self.b[self.i..].len() >= 3 && self.b[self.i..self.i + 3].eq_ignore_ascii_case(b"NIL") {
            self.i += 3;
            return Ok(());
        }
        if self.peek() != Some(b'(') {
            return Err("a list or NIL is required");
        }
        self.i += 1;
        let mut pairs = 0;
        loop {
            if self.peek() == Some(b')') && pairs == 0 {
                self.i += 1;
                return Ok(());
            }
            self.string(false)?;
            if !self.sp() {
                return Err("invalid ID list");
            }
            if self.b[self.i..].len() >= 3
                && self.b[self.i..self.i + 3].eq_ignore_ascii_case(b"NIL")
            {
                self.i += 3;
            } else {
                self.string(false)?;
            }
            pairs += 1;
            if pairs > 30 {
                return Err("too many ID fields");
            }
            match self.peek() {
                Some(b')') => {
                    self.i += 1;
                    return Ok(());
                }
                Some(b' ') => self.i += 1,
                _ => return Err("invalid ID list"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(s: &[u8]) -> Result<Tagged, ParseError> {
        parse(s)
    }

    fn login(user: &str, password: &str) -> Command {
        Command::Login {
            user: user.into(),
            password: password.into(),
        }
    }

    #[test]
    fn simple_commands() {
        for (line, want) in [
            (&b"a CAPABILITY"[..], Command::Capability),
            (b"a1 noop", Command::Noop),
            (b"x.y LOGOUT", Command::Logout),
            (b"A001 StartTLS", Command::StartTls),
            (b"t ID NIL", Command::Id),
            (
                b"t ID (\"name\" \"sodr\" \"version\" NIL \"os\" {5}\r\nLinux)",
                Command::Id,
            ),
            (b"t ID ()", Command::Id),
            (b"t SELECT INBOX", Command::NotYet),
            (b"t uid fetch 1:* (FLAGS)", Command::NotYet),
        ] {
            let t = cmd(line).unwrap_or_else(|e| panic!("{line:?}: {e:?}"));
            assert_eq!(t.command, want, "{line:?}");
        }
        assert_eq!(cmd(b"A001 NOOP").unwrap().tag, "A001");
    }

    #[test]
    fn login_forms() {
        for (line, want) in [
            (&b"a LOGIN alice secret"[..], login("alice", "secret")),
            (
                b"a LOGIN \"alice\" \"s e\\\"c\\\\r\"",
                login("alice", "s e\"c\\r"),
            ),
            (
                b"a LOGIN {5}\r\nalice {6+}\r\nsecret",
                login("alice", "secret"),
            ),
            (
                "a LOGIN alice {8}\r\np\"w\\ \u{e4}x".as_bytes(),
                login("alice", "p\"w\\ \u{e4}x"),
            ),
            (
                "a LOGIN alice \"p\u{e4}ss\"".as_bytes(),
                login("alice", "p\u{e4}ss"),
            ),
            (b"a LOGIN alice ]pw", login("alice", "]pw")),
        ] {
            assert_eq!(cmd(line).unwrap().command, want, "{line:?}");
        }
        let syntax = |line: &[u8]| match cmd(line) {
            Err(ParseError {
                tag: Some(t),
                kind: ErrorKind::Syntax(_),
            }) => t == "a",
            other => panic!("{line:?}: {other:?}"),
        };
        for bad in [
            &b"a LOGIN alice"[..],
            b"a LOGIN alice secret extra",
            b"a LOGIN \"alice secret",
            b"a LOGIN \"al\\ice\" pw",
            b"a LOGIN \"\" pw",
            b"a LOGIN \"al ice\" pw",
            b"a LOGIN alice \"\"",
            b"a LOGIN alice {3}\r\nab",
            b"a LOGIN alice {3}\r\na\tb",
            b"a LOGIN  alice pw",
            b"a LOGIN (alice) pw",
        ] {
            assert!(syntax(bad), "{bad:?}");
        }
        // a literal's octets may hold CRLF; the lines may not hold NUL or bare LF
        assert_eq!(
            cmd(b"a LOGIN alice pw\0").unwrap_err().kind,
            ErrorKind::Bytes
        );
        assert_eq!(
            cmd(b"a LOGIN alice\npw").unwrap_err().kind,
            ErrorKind::Bytes
        );
        assert_eq!(
            cmd(b"a LOGIN alice \"\xff\"").unwrap_err().kind,
            ErrorKind::Bytes
        );
        let long = format!("a LOGIN {} pw", "u".repeat(MAX_USER + 1));
        assert!(syntax(long.as_bytes()));
        // the password never shows in Debug output
        let c = cmd(b"a LOGIN alice hunter2").unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn authenticate_forms() {
        assert_eq!(
            cmd(b"a AUTHENTICATE plain").unwrap().command,
            Command::Authenticate {
                mechanism: "PLAIN".into(),
                initial: None
            }
        );
        assert_eq!(
            cmd(b"a AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==")
                .unwrap()
                .command,
            Command::Authenticate {
                mechanism: "PLAIN".into(),
                initial: Some("AGFsaWNlAHNlY3JldA==".into())
            }
        );
        assert!(cmd(b"a AUTHENTICATE").is_err());
        assert!(cmd(b"a AUTHENTICATE PLAIN a:b").is_err());
        let c = cmd(b"a AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==").unwrap();
        assert!(!format!("{c:?}").contains("AGFs"));
    }

    #[test]
    fn tags_and_unknown_commands() {
        assert_eq!(
            cmd(b"a FROB").unwrap_err(),
            ParseError {
                tag: Some("a".into()),
                kind: ErrorKind::Unknown
            }
        );
        for bad_tag in [&b"+a NOOP"[..], b"a*b NOOP", b"(x NOOP", b" NOOP", b""] {
            let e = cmd(bad_tag).unwrap_err();
            assert_eq!(e.tag, None, "{bad_tag:?}");
        }
        assert!(cmd(b"a NOOP extra").is_err());
        assert!(cmd(b"a CAPABILITY ").is_err());
        assert_eq!(tag_and_verb(b"A1 uid FETCH 1"), Some(("A1", "UID".into())));
        assert_eq!(tag_and_verb(b"A1"), None);
        assert_eq!(
            tag_and_verb(format!("{} NOOP", "t".repeat(MAX_TAG + 1)).as_bytes()),
            None
        );
        assert_eq!(metric_verb("fetch"), "FETCH");
        assert_eq!(metric_verb("x\u{1b}"), "other");
    }

    #[test]
    fn literal_announcements() {
        let lit = |size, sync| Some(Literal { size, sync });
        assert_eq!(literal_at_end(b"a LOGIN {5}"), lit(5, true));
        assert_eq!(
            literal_at_end(b"a APPEND x {5000000+}"),
            lit(5_000_000, false)
        );
        assert_eq!(literal_at_end(b"a APPEND x ~{7}"), lit(7, true));
        assert_eq!(
            literal_at_end(b"a APPEND x {99999999999999999999999}"),
            lit(u64::MAX, true)
        );
        assert_eq!(literal_at_end(b"a LOGIN \"{5}"), None);
        assert_eq!(literal_at_end(b"a LOGIN \"x\" {5}"), lit(5, true));
        assert_eq!(literal_at_end(b"a LOGIN \"\\\"{5}"), None);
        assert_eq!(literal_at_end(b"a LOGIN {}"), None);
        assert_eq!(literal_at_end(b"a LOGIN {+}"), None);
        assert_eq!(literal_at_end(b"a LOGIN {5-}"), None);
        assert_eq!(literal_at_end(b"a LOGIN {5} "), None);
    }

    #[test]
    fn assembler_bounds_literals_before_reading_them() {
        let mut a = Assembler::new(100);
        assert_eq!(
            a.line(b"a LOGIN {5}"),
            Next::Literal(Literal {
                size: 5,
                sync: true
            })
        );
        assert!(a.in_command());
        a.literal(b"alice");
        assert_eq!(
            a.line(b" {6+}"),
            Next::Literal(Literal {
                size: 6,
                sync: false
            })
        );
        a.literal(b"p\"w\\ d");
        let Next::Complete(c) = a.line(b"") else {
            panic!()
        };
        assert_eq!(c, b"a LOGIN {5}\r\nalice {6+}\r\np\"w\\ d");
        assert!(!a.in_command());
        assert_eq!(parse(&c).unwrap().command, login("alice", "p\"w\\ d"));
        // a literal may hold CRLF; a password may not (it is replayed)
        assert_eq!(
            parse(b"a LOGIN alice {4}\r\np\r\nw").unwrap_err().kind,
            ErrorKind::Syntax("invalid password")
        );
        assert!(lines_have_bad_bytes(b"a LOGIN alice {2}\r\nab\r\n"));

        // over the budget: refused before a byte of it is read
        assert_eq!(
            a.line(b"b LOGIN {200}"),
            Next::TooBig {
                tag: Some("b".into()),
                sync: true
            }
        );
        assert!(!a.in_command());
        assert_eq!(
            a.line(b"c LOGIN {18446744073709551615+}"),
            Next::TooBig {
                tag: Some("c".into()),
                sync: false
            }
        );
        // the budget counts every piece
        assert!(matches!(a.line(b"d LOGIN {80}"), Next::Literal(_)));
        a.literal(&[b'x'; 80]);
        assert!(matches!(a.line(b" {10}"), Next::TooBig { .. }));
    }

    #[test]
    fn a_command_refused_at_its_literal_is_dropped_to_its_end() {
        let lit = |size, sync| Literal { size, sync };
        // synchronising: the client sends nothing more of it
        let mut a = Assembler::new(100);
        assert_eq!(a.line(b"f LOGIN {5}"), Next::Literal(lit(5, true)));
        assert_eq!(a.head(), b"f LOGIN {5}\r\n");
        assert_eq!(a.refuse(lit(5, true)), 0);
        assert!(!a.in_command());
        assert_eq!(a.line(b"g NOOP"), Next::Complete(b"g NOOP".to_vec()));
        // LITERAL+: the octets come anyway; read, dropped, never kept, and
        // so is the rest of the command, within the command's budget
        assert_eq!(a.line(b"h LOGIN {5+}"), Next::Literal(lit(5, false)));
        assert_eq!(a.refuse(lit(5, false)), 5);
        a.literal(b"alice");
        assert!(a.head().is_empty());
        assert_eq!(a.room(), 100 - 19);
        assert_eq!(a.line(b" {6+}"), Next::Skip(6));
        a.literal(b"secret");
        assert_eq!(a.line(b""), Next::Dropped);
        assert!(!a.in_command());
        assert_eq!(a.room(), 100);
        // a synchronising literal later in it: over, no `+`
        a.line(b"i LOGIN {1+}");
        a.refuse(lit(1, false));
        a.literal(b"x");
        assert_eq!(a.line(b" {6}"), Next::Dropped);
        assert_eq!(a.line(b"j NOOP"), Next::Complete(b"j NOOP".to_vec()));
        // over the budget: the session ends (the tag was answered already)
        a.line(b"k LOGIN {1+}");
        a.refuse(lit(1, false));
        a.literal(b"x");
        assert_eq!(
            a.line(b" {90+}"),
            Next::TooBig {
                tag: None,
                sync: false
            }
        );
        assert!(!a.in_command());
    }

    #[test]
    fn starttls_then_pipelined_command_are_two_commands() {
        // the driver reads line by line: STARTTLS is whole on its own, and
        // what follows it in the same write is the layer's to discard
        let mut a = Assembler::new(1000);
        let input = b"a STARTTLS\r\nb CAPABILITY\r\n";
        let first = input.split(|b| *b == b'\n').next().unwrap();
        let first = first.strip_suffix(b"\r").unwrap();
        let Next::Complete(c) = a.line(first) else {
            panic!()
        };
        assert_eq!(
            parse(&c).unwrap(),
            Tagged {
                tag: "a".into(),
                command: Command::StartTls
            }
        );
        assert!(!a.in_command());
    }
}
