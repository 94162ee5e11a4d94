//! The fuzz harness, shared by the cargo-fuzz targets (`fuzz_targets/*.rs`,
//! nightly features via `RUSTC_BOOTSTRAP=1`) and by `tests/fuzz_corpus.rs`,
//! which replays every file of `fuzz/corpus/<target>/` through the same
//! functions on stable (that is how CI replays the corpus).
//!
//! Each function takes arbitrary bytes, drives a sans-IO part of mailgate the
//! way its driver does, and panics when an invariant breaks. Library panics
//! count as failures too.
#![allow(dead_code)]

use bytes::BytesMut;
use mailgate::backend::caps::SmtpCaps;
use mailgate::backend::reply::{Parsed, ReplyParser, MAX_LINE, MAX_LINES};
use mailgate::config::{AuthMode, BareNewlines};
use mailgate::pop3;
use mailgate::smtp::command::{self, Command, ParseError};
use mailgate::smtp::data::{self, DataReceiver, Feed};
use mailgate::smtp::reply::{Reply, Stage};
use mailgate::smtp::session::{Action, Outcome, Session, Settings};

/// A harness: arbitrary bytes in, a panic when an invariant breaks.
pub type Harness = fn(&[u8]);

/// Every harness, by corpus directory name.
pub const TARGETS: &[(&str, Harness)] = &[
    ("smtp_command", smtp_command),
    ("smtp_data", smtp_data),
    ("backend_reply", backend_reply),
    ("config_yaml", config_yaml),
    ("pop3_command", pop3_command),
];

/// The listener default `max_command_line` (octets including CRLF).
const MAX_COMMAND_LINE: usize = 512;

/// Lines as the codec hands them over: split at LF, one CR before it removed.
fn lines(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    data.split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
}

fn printable(b: &[u8]) -> bool {
    b.iter().all(|c| (0x20..=0x7e).contains(c))
}

/// An SMTP reply on the wire: `ddd-text` lines then `ddd text`, one code,
/// printable ASCII only, CRLF-terminated, at most 512 octets a line.
fn check_smtp_reply(r: &Reply) {
    let wire = r.to_bytes();
    assert!(wire.ends_with(b"\r\n"), "{wire:?}");
    let body = &wire[..wire.len() - 2];
    let lines: Vec<&[u8]> = body.split(|b| *b == b'\n').collect();
    for (i, l) in lines.iter().enumerate() {
        let l = if i + 1 < lines.len() {
            l.strip_suffix(b"\r").expect("bare LF in a reply")
        } else {
            l
        };
        assert!(l.len() >= 4 && l.len() + 2 <= 512, "reply line {l:?}");
        assert_eq!(&l[..3], r.code.to_string().as_bytes());
        assert_eq!(l[3], if i + 1 == lines.len() { b' ' } else { b'-' });
        assert!(printable(&l[4..]), "unprintable reply text {l:?}");
    }
    assert!((200..600).contains(&r.code), "{r:?}");
}

fn check_address(a: &str, utf8: bool) {
    assert!(a.len() <= 256, "address too long");
    assert!(!a.bytes().any(|b| b < 0x20 || b == 0x7f), "{a:?}");
    assert!(utf8 || a.is_ascii(), "{a:?}");
}

/// SMTP command lines through `command::parse` and the `Session` state
/// machine, with a backend that accepts everything.
pub fn smtp_command(data: &[u8]) {
    let mut s = Session::new(
        Settings {
            hostname: "gw.fuzz.example".into(),
            starttls: true,
            require_tls: false,
            max_message_size: 1 << 20,
            max_recipients: 100,
            max_errors: 20,
            auth: AuthMode::Optional,
            max_login_failures: 3,
            max_transactions: 100,
        },
        SmtpCaps {
            eightbitmime: true,
            smtputf8: true,
            pipelining: true,
            size: Some(1 << 19),
            ..Default::default()
        },
        false,
    );
    let mut logins = 0u32;
    for line in lines(data) {
        let mut action = if line.len() + 2 > pop3::command::MAX_COMMAND_LINE {
            s.line_too_long()
        } else if s.awaiting_auth_line() {
            s.auth_line(line)
        } else {
            let cmd = command::parse(line);
            match &cmd {
                Ok(Command::Ehlo(d) | Command::Helo(d)) => {
                    assert!(!d.is_empty() && d.len() <= 255, "{d:?}");
                    assert!(d.bytes().all(|b| b.is_ascii_graphic()), "{d:?}");
                }
                Ok(Command::Mail { from, params }) => check_address(from, params.smtputf8),
                Ok(Command::Rcpt { to }) => {
                    assert!(!to.is_empty());
                    check_address(to, true);
                }
                Ok(_) => {}
                Err(ParseError::Parameter(p)) => {
                    assert!(p.chars().count() <= 40, "{p:?}");
                    // a tab may pass here; the reply keeps printable ASCII only
                    assert!(
                        !p.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f),
                        "{p:?}"
                    );
                }
                Err(_) => {}
            }
            s.command(cmd)
        };
        // play the driver: a backend that says 250 to everything
        loop {
            match action {
                Action::Reply(r) => {
                    check_smtp_reply(&r);
                    break;
                }
                Action::Close(r, _) => {
                    check_smtp_reply(&r);
                    return;
                }
                Action::Then(r, next) => {
                    check_smtp_reply(&r);
                    action = *next;
                }
                Action::StartTls(r) => {
                    assert_eq!(r.code, 220);
                    s.tls_started();
                    break;
                }
                Action::AuthChallenge(r) => {
                    assert_eq!(r.code, 334);
                    check_smtp_reply(&r);
                    break;
                }
                Action::Authenticate(creds) => {
                    // never a control character (C0, DEL, C1) or over 255 octets
                    assert!(creds.user.len() <= 255, "{:?}", creds.user);
                    assert!(!creds.user.chars().any(char::is_control), "{creds:?}");
                    logins += 1;
                    let code = if logins.is_multiple_of(2) { 235 } else { 535 };
                    action = s
                        .auth_result(&creds.user, Outcome::Reply(code, vec![]))
                        .into_action();
                }
                Action::Relay(op) => {
                    action = s.relayed(op, Outcome::Reply(250, vec!["2.1.0 ok".into()]));
                }
                Action::ReadData(r) => {
                    assert_eq!(r.code, 354);
                    assert!(s.tx.as_ref().is_some_and(|t| !t.rcpts.is_empty()));
                    assert!(s.data_received(&Ok(Vec::new()), 1000, false).is_none());
                    let end = s.delivered(Outcome::Reply(250, vec!["queued".into()]));
                    assert!(s.tx.is_none());
                    action = end.action;
                }
            }
        }
    }
}

/// Tiny deterministic PRNG for chunk sizes (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Feeds `input` to a fresh receiver in chunks of the given sizes (0 = all
/// at once), like the driver: append, feed until it needs more.
/// Returns (result, bytes left after the end, tainted).
fn receive(
    mode: BareNewlines,
    max_size: u64,
    max_line: usize,
    input: &[u8],
    chunks: &mut dyn FnMut() -> usize,
) -> (Feed, Vec<u8>, bool) {
    let mut rx = DataReceiver::new(mode, max_size, max_line);
    let mut buf = BytesMut::new();
    let mut at = 0;
    loop {
        match rx.feed(&mut buf) {
            Feed::Done(r) => {
                let mut rest = buf.to_vec();
                rest.extend_from_slice(&input[at..]);
                return (Feed::Done(r), rest, rx.tainted());
            }
            Feed::NeedMore if at == input.len() => {
                return (Feed::NeedMore, Vec::new(), rx.tainted());
            }
            Feed::NeedMore => {
                // the receiver never holds more than one partial line
                assert!(buf.len() <= max_line, "buffered {} > {max_line}", buf.len());
                let n = match chunks() {
                    0 => input.len() - at,
                    n => n.min(input.len() - at),
                };
                buf.extend_from_slice(&input[at..at + n]);
                at += n;
            }
        }
    }
}

fn crlf_only(b: &[u8]) -> bool {
    b.iter().enumerate().all(|(i, c)| match c {
        b'\r' => b.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && b[i - 1] == b'\r',
        _ => true,
    })
}

/// The DATA path. Byte 0 picks the mode and limits, byte 1 seeds the chunk
/// sizes; the rest is what the client sends after the 354. Invariants: the
/// result does not depend on how the bytes are split; it ends only after a
/// real CRLF.CRLF; an accepted body is CRLF-only without NUL and within the
/// size limit; re-stuffed for the backend it has exactly one end marker and
/// reads back to the same body.
pub fn smtp_data(data: &[u8]) {
    let (Some(&flags), Some(&seed)) = (data.first(), data.get(1)) else {
        return;
    };
    let input = &data[2..];
    let mode = if flags & 1 == 0 {
        BareNewlines::Reject
    } else {
        BareNewlines::Normalize
    };
    let max_line = [1000, 64, 16, 1000][usize::from(flags >> 1 & 3)];
    let max_size = [1 << 20, 1024, 64, 1 << 20][usize::from(flags >> 3 & 3)];

    let whole = receive(mode, max_size, max_line, input, &mut || 0);
    let mut rng = Rng(u64::from(seed) | 0x1_0000);
    let random = receive(mode, max_size, max_line, input, &mut || {
        1 + (rng.next() % 97) as usize
    });
    let byte = receive(mode, max_size, max_line, input, &mut || 1);
    for other in [&random, &byte] {
        assert_eq!(whole.0, other.0, "result depends on the chunking");
        assert_eq!(whole.1, other.1, "leftover depends on the chunking");
        if matches!(whole.0, Feed::Done(Ok(_))) {
            assert_eq!(whole.2, other.2, "taint depends on the chunking");
        }
    }
    let (feed, rest, tainted) = whole;
    let Feed::Done(result) = feed else { return };
    // it ended on a genuine CRLF.CRLF (DATA's own CRLF counts as the first)
    let consumed = &input[..input.len() - rest.len()];
    assert!(
        consumed == b".\r\n" || consumed.ends_with(b"\r\n.\r\n"),
        "ended without CRLF.CRLF: {consumed:?}"
    );
    let Ok(body) = result else { return };
    if mode == BareNewlines::Reject {
        assert!(!tainted, "bare newline accepted in reject mode");
    }
    assert!(body.len() as u64 <= max_size);
    assert!(!body.contains(&0), "NUL in an accepted body");
    assert!(crlf_only(&body), "bare CR/LF in an accepted body");
    assert!(body.is_empty() || body.ends_with(b"\r\n"));

    let header = b"Received: from fuzz ([192.0.2.1])\r\n\tby gw (mailgate) with ESMTP;\r\n";
    let wire = data::stuff(&[header, &body]);
    assert!(crlf_only(&wire), "stuffed output not CRLF-only");
    assert!(wire.ends_with(b"\r\n.\r\n"));
    let ends = wire.windows(5).filter(|w| w == b"\r\n.\r\n").count();
    assert_eq!(ends, 1, "end-of-data markers in the stuffed output");
    // the backend's view: reading the wire back gives the same message
    let big = wire.len() + max_line + 16;
    let (back, rest, tainted) = receive(BareNewlines::Reject, big as u64, big, &wire, &mut || 0);
    if back == Feed::Done(Err(data::Violation::HeaderTooBig)) {
        // our own header field can take a body at the header limit over it
        return;
    }
    let mut expect = header.to_vec();
    expect.extend_from_slice(&body);
    assert_eq!(back, Feed::Done(Ok(expect)), "stuff/unstuff round trip");
    assert!(rest.is_empty() && !tainted);
}

/// Backend reply lines (as the bounded line reader gives them) through
/// `ReplyParser`, and each complete reply through `Reply::relayed`, which
/// must make it safe for the client whatever the backend sent.
pub fn backend_reply(data: &[u8]) {
    let mut p = ReplyParser::default();
    for line in lines(data) {
        if line.len() + 2 > MAX_LINE {
            // the codec refuses the line; the backend connection is dropped
            p = ReplyParser::default();
            continue;
        }
        match p.push(line) {
            Parsed::More => {}
            Parsed::Invalid(_) => p = ReplyParser::default(),
            Parsed::Done(code, text) => {
                assert!((200..600).contains(&code), "code {code}");
                assert!(!text.is_empty() && text.len() <= MAX_LINES);
                assert_eq!(&line[..3], code.to_string().as_bytes());
                // the session relays only 2xx/4xx/5xx (anything else: 451)
                if !matches!(code / 100, 2 | 4 | 5) {
                    continue;
                }
                for stage in [Stage::Mail, Stage::Rcpt, Stage::Data] {
                    let r = Reply::relayed(code, &text, stage);
                    check_smtp_reply(&r);
                    assert_eq!(r.code, code);
                    assert!(r.lines.len() <= 8);
                    // ENHANCEDSTATUSCODES is advertised: every line carries one
                    // of the reply's class
                    let class = (code / 100).to_string();
                    for l in &r.lines {
                        let enh = l.split(' ').next().unwrap_or("");
                        assert!(
                            enh.split('.').count() == 3 && enh.starts_with(&class),
                            "{l:?}"
                        );
                    }
                }
            }
        }
    }
}

/// The YAML loader: never panics; errors point into the text; whatever it
/// accepts can be used by a session (deadlines can be added to `now`).
pub fn config_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match mailgate::config::load_str("fuzz.yaml", text) {
        Err(mailgate::config::ConfigError::At { line, column, .. }) => {
            assert!(line >= 1 && column >= 1);
            // YAML counts CRLF, CR, LF, NEL, LS and PS as line breaks
            let breaks = text
                .replace("\r\n", "\n")
                .matches(['\r', '\n', '\u{85}', '\u{2028}', '\u{2029}'])
                .count();
            assert!(line <= breaks + 2, "line {line}");
        }
        Err(_) => {}
        Ok(cfg) => {
            let now = std::time::Instant::now();
            for l in &cfg.listeners {
                let t = &l.timeouts;
                for d in [
                    t.tls_handshake,
                    t.command,
                    t.data,
                    t.session,
                    t.backend.connect,
                    t.backend.reply,
                    t.backend.data,
                    t.idle,
                ] {
                    assert!(
                        now.checked_add(d).is_some(),
                        "listener {}: timeout {d:?} overflows a deadline",
                        l.name
                    );
                }
                assert!(l.max_command_line >= 512 && l.max_text_line >= 1000);
            }
        }
    }
}

/// A POP3 reply on the wire: a `+OK`/`-ERR`/`+ ` status line, printable, then
/// for multi-line replies dot-stuffed lines and `.`.
fn check_pop3_reply(r: &pop3::reply::Reply) {
    let wire = r.to_bytes();
    assert!(crlf_only(&wire) && wire.ends_with(b"\r\n"), "{wire:?}");
    let lines: Vec<&[u8]> = wire[..wire.len() - 2].split(|b| *b == b'\n').collect();
    let first = lines[0].strip_suffix(b"\r").unwrap_or(lines[0]);
    assert!(
        first.starts_with(b"+OK") || first.starts_with(b"-ERR") || first.starts_with(b"+ "),
        "{first:?}"
    );
    for l in &lines {
        let l = l.strip_suffix(b"\r").unwrap_or(l);
        assert!(printable(l) && l.len() + 2 <= 512, "{l:?}");
    }
    if r.body.is_some() {
        assert_eq!(*lines.last().unwrap(), b".");
        for l in &lines[1..lines.len() - 1] {
            let l = l.strip_suffix(b"\r").unwrap_or(l);
            assert!(!l.starts_with(b".") || l.starts_with(b".."), "{l:?}");
        }
    } else {
        assert_eq!(lines.len(), 1);
    }
}

/// POP3 AUTHORIZATION lines through `pop3::command::parse`, the SASL PLAIN
/// decoder, base64, and the `pop3::session::Session` state machine.
pub fn pop3_command(data: &[u8]) {
    pop3_transaction(data);
    use mailgate::conn::sasl::{base64_decode, base64_encode, decode_plain};
    use pop3::session::{Action as P, LoginOutcome, Session as Pop3Session, Settings as P3};
    let mut s = Pop3Session::new(
        P3 {
            hostname: "gw.fuzz.example".into(),
            starttls: true,
            require_tls: false,
            apop: true,
            max_errors: 20,
            max_login_failures: 5,
        },
        false,
        Some("<1.2@gw.fuzz.example>".into()),
    );
    check_pop3_reply(&s.greeting());
    let mut logins = 0u32;
    for line in lines(data) {
        // the codec's view of one line, and the parsers on it
        if let Ok(c) = pop3::command::parse(line) {
            let args: Vec<&str> = match &c {
                pop3::command::Command::User(u) => vec![u.as_str()],
                pop3::command::Command::Apop { user, digest } => {
                    vec![user.as_str(), digest.as_str()]
                }
                pop3::command::Command::Auth { mechanism, initial } => mechanism
                    .iter()
                    .chain(initial)
                    .map(|s| s.as_str())
                    .collect(),
                _ => vec![],
            };
            for a in args {
                assert!(!a.bytes().any(|b| b < 0x20 || b == 0x7f), "{a:?}");
            }
        }
        if let Ok(text) = std::str::from_utf8(line) {
            if let Ok(p) = decode_plain(text) {
                for f in [&p.authzid, &p.user, &p.pass] {
                    assert!(!f.chars().any(char::is_control));
                }
                assert!(!p.user.is_empty() && p.user.trim() == p.user);
            }
            if let Some(raw) = base64_decode(text) {
                assert_eq!(base64_encode(&raw), text, "base64 not canonical");
            }
        }
        if !line.is_empty() {
            assert_eq!(base64_decode(&base64_encode(line)).as_deref(), Some(line));
        }
        let mut action = if line.len() + 2 > pop3::command::MAX_COMMAND_LINE {
            s.line_too_long()
        } else {
            s.line(line)
        };
        loop {
            match action {
                P::Reply(r) => {
                    check_pop3_reply(&r);
                    break;
                }
                P::Close(r, _) => {
                    check_pop3_reply(&r);
                    return;
                }
                P::StartTls(r) => {
                    check_pop3_reply(&r);
                    s.tls_started();
                    break;
                }
                P::Capa { .. } => {
                    check_pop3_reply(&s.capa(None));
                    break;
                }
                P::Login(login) => {
                    assert!(!login.user().is_empty());
                    logins += 1;
                    action = s
                        .login_result(match logins % 6 {
                            1 => LoginOutcome::Rejected("-ERR [AUTH] no\r\n\0x".into()),
                            2 => LoginOutcome::Unsupported,
                            3 => LoginOutcome::Unavailable,
                            4 => LoginOutcome::Failed,
                            5 => LoginOutcome::Invalid,
                            _ => LoginOutcome::Accepted("+OK hi\r\nthere".into()),
                        })
                        .into_action();
                }
                P::Pipe(r) => {
                    check_pop3_reply(&r);
                    // after login the session is a byte pipe: nothing more to parse
                    return;
                }
            }
        }
    }
}

/// The TRANSACTION state on raw client bytes (split once at an arbitrary
/// point): only re-rendered, well-formed commands come out; the same bytes
/// as a backend stream never make the reply-order tracker overrun or stall.
fn pop3_transaction(data: &[u8]) {
    use pop3::transaction::{Responses, Step, Transaction};
    let caps = mailgate::backend::caps::Pop3Caps::from_capa(&["TOP", "UIDL"]);
    let mut t = Transaction::new(caps, 50, 0);
    let mut r = Responses::default();
    let mid = data.len() / 2;
    for part in [&data[..mid], &data[mid..]] {
        for step in t.feed(part) {
            match step {
                Step::Forward { line, expect } => {
                    assert!(line.len() <= pop3::command::MAX_COMMAND_LINE, "{line:?}");
                    let body = line.strip_suffix("\r\n").expect("CRLF");
                    assert!(
                        body.bytes()
                            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b' '),
                        "{line:?}"
                    );
                    r.forwarded(expect);
                }
                Step::Reply(rep) => {
                    check_pop3_reply(&rep);
                    r.local(&rep, false);
                }
                Step::Close(rep) => {
                    check_pop3_reply(&rep);
                    r.local(&rep, true);
                }
            }
        }
    }
    let mut at = 0;
    while at < data.len() {
        let k = r.split(&data[at..]);
        assert!(k <= data.len() - at);
        at += k;
        let mut popped = 0;
        while r.take_local().is_some() {
            popped += 1;
        }
        assert!(k > 0 || popped > 0, "reply tracker stalled");
    }
}
