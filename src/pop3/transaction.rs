//! The TRANSACTION state, sans-IO, in two halves the pipe drives:
//!
//! - [`Transaction`] cuts the client's bytes into lines and decides each one:
//!   a well-formed RFC 1939 command is re-rendered for the backend, anything
//!   else (a second login, NUL, bare CR/LF, a line over RFC 2449's 255
//!   octets, bad arguments, an unknown verb) is answered here and never
//!   forwarded; `max_errors` closes the session.
//! - [`Responses`] keeps the order of replies when local answers sit between
//!   forwarded commands (pipelining): it knows only where each backend
//!   response ends. The backend's bytes are never changed; a multi-line body
//!   is scanned only while another backend response is queued behind it,
//!   otherwise its end is found by looking at the tail of each read (nothing
//!   else can follow it), so a plain RETR costs no per-byte work.

use super::command::MAX_COMMAND_LINE;
use super::reply::{self, Reply};
use crate::backend::caps::Pop3Caps;
use std::borrow::Cow;
use std::collections::VecDeque;

/// The shape of a backend response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// One status line.
    Single,
    /// A status line; after `+OK` a dot-terminated body.
    Multi,
}

/// What to do with one client line.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send `line` (re-rendered, with CRLF) to the backend.
    Forward { line: String, expect: Expect },
    /// Answer the client here, in order with the backend's replies.
    Reply(Reply),
    /// Answer, then end the session.
    Close(Reply),
}

pub struct Transaction {
    caps: Pop3Caps,
    max_errors: u32,
    errors: u32,
    /// The current, incomplete line.
    partial: Vec<u8>,
    /// The current line is over the limit: dropped up to its LF.
    skipping: bool,
    /// QUIT was forwarded or the session is closing: later input is ignored.
    done: bool,
    /// Commands forwarded, for the session log line.
    pub retr: u32,
    pub dele: u32,
    pub quit: bool,
}

impl Transaction {
    /// `errors`: protocol errors already made in the AUTHORIZATION state.
    pub fn new(caps: Pop3Caps, max_errors: u32, errors: u32) -> Self {
        Transaction {
            caps,
            max_errors,
            errors,
            partial: Vec::new(),
            skipping: false,
            done: false,
            retr: 0,
            dele: 0,
            quit: false,
        }
    }

    /// The backend announced PIPELINING: forwarded commands need not wait
    /// for the answer to the one before (RFC 2449 §6.6).
    pub fn pipelining(&self) -> bool {
        self.caps.pipelining
    }

    /// Between two client commands: no line of the client's half-read (nor
    /// an overlong one being dropped). At shutdown the pipe forwards no
    /// command that starts after it (`pipe.rs`).
    pub fn at_command_start(&self) -> bool {
        self.partial.is_empty() && !self.skipping
    }

    /// Client bytes in; one step per complete line. Incomplete lines are
    /// kept (at most [`MAX_COMMAND_LINE`] bytes).
    pub fn feed(&mut self, mut data: &[u8]) -> Vec<Step> {
        let mut steps = Vec::new();
        while !data.is_empty() && !self.done {
            let Some(i) = memchr::memchr(b'\n', data) else {
                if !self.skipping && self.partial.len() + data.len() > MAX_COMMAND_LINE {
                    self.skipping = true;
                    self.partial = Vec::new();
                }
                if !self.skipping {
                    self.partial.extend_from_slice(data);
                }
                break;
            };
            let (head, rest) = data.split_at(i + 1);
            data = rest;
            if self.skipping || self.partial.len() + head.len() > MAX_COMMAND_LINE {
                self.skipping = false;
                self.partial.clear();
                steps.push(self.error(reply::line_too_long()));
                continue;
            }
            let step = if self.partial.is_empty() {
                self.line(head)
            } else {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(head);
                self.line(&line)
            };
            steps.push(step);
        }
        steps
    }

    fn error(&mut self, r: Reply) -> Step {
        self.errors += 1;
        if self.errors >= self.max_errors {
            self.done = true;
            Step::Close(reply::too_many_errors())
        } else {
            Step::Reply(r)
        }
    }

    /// One line including its LF.
    fn line(&mut self, raw: &[u8]) -> Step {
        // a bare LF ends nothing a POP3 server must accept (and the backend's
        // idea of a line end may differ from ours)
        let Some(line) = raw.strip_suffix(b"\r\n") else {
            return self.error(reply::bad_bytes());
        };
        match parse(line) {
            Ok(Command::Forward(verb, args, expect)) => {
                if (verb == "TOP" && !self.caps.top) || (verb == "UIDL" && !self.caps.uidl) {
                    // an RFC 1939-only backend (no CAPA) may still have them
                    if self.caps.capa {
                        return Step::Reply(reply::command_unavailable());
                    }
                }
                match verb {
                    "RETR" => self.retr += 1,
                    "DELE" => self.dele += 1,
                    "QUIT" => {
                        self.quit = true;
                        self.done = true;
                    }
                    _ => {}
                }
                let mut line = String::from(verb);
                for a in args.iter().flatten() {
                    line.push(' ');
                    line.push_str(&a.to_string());
                }
                line.push_str("\r\n");
                Step::Forward { line, expect }
            }
            Ok(Command::Capa) => Step::Reply(self.capa()),
            Ok(Command::Login) => self.error(reply::already_logged_in()),
            Err(Bad::Unknown) => self.error(reply::unknown_command()),
            Err(Bad::Bytes) => self.error(reply::bad_bytes()),
            Err(Bad::Syntax(why)) => self.error(reply::syntax(why)),
        }
    }

    /// CAPA in the TRANSACTION state: what works now, end to end.
    fn capa(&self) -> Reply {
        let c = &self.caps;
        let v: Vec<Cow<'static, str>> = [
            (c.top, "TOP"),
            (c.uidl, "UIDL"),
            (c.pipelining, "PIPELINING"),
            (c.resp_codes, "RESP-CODES"),
        ]
        .into_iter()
        .filter(|(has, _)| *has)
        .map(|(_, name)| Cow::Borrowed(name))
        .collect();
        reply::capa(v)
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Command {
    /// Verb, up to two numeric arguments, response shape.
    Forward(&'static str, [Option<u32>; 2], Expect),
    Capa,
    /// USER, PASS, APOP, AUTH, STLS: the session is logged in already.
    Login,
}

#[derive(Debug, PartialEq, Eq)]
enum Bad {
    Unknown,
    Bytes,
    Syntax(&'static str),
}

/// A message number or line count: ASCII digits only (no sign), within u32.
fn number(w: &str) -> Result<u32, Bad> {
    if w.is_empty() || w.len() > 10 || !w.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Bad::Syntax("a number is required"));
    }
    w.parse().map_err(|_| Bad::Syntax("number too large"))
}

/// One line without CRLF.
fn parse(line: &[u8]) -> Result<Command, Bad> {
    // no TRANSACTION-state command carries controls or 8-bit data
    if line.iter().any(|b| *b < 0x20 || *b >= 0x7f) {
        return Err(Bad::Bytes);
    }
    // ASCII only from here on
    let line = std::str::from_utf8(line).map_err(|_| Bad::Bytes)?;
    let mut words = line.split(' ').filter(|w| !w.is_empty());
    let verb = match words.next() {
        Some(v) if !line.starts_with(' ') => v.to_ascii_uppercase(),
        _ => return Err(Bad::Unknown),
    };
    let args: Vec<&str> = words.by_ref().take(3).collect();
    let arity = |min: usize, max: usize| -> Result<[Option<u32>; 2], Bad> {
        if args.len() < min || args.len() > max {
            return Err(Bad::Syntax(match (min, max) {
                (0, 0) => "no arguments allowed",
                (0, 1) => "at most one message number",
                (1, 1) => "one message number required",
                _ => "a message number and a line count required",
            }));
        }
        let mut out = [None, None];
        for (slot, a) in out.iter_mut().zip(&args) {
            *slot = Some(number(a)?);
        }
        Ok(out)
    };
    use Expect::{Multi, Single};
    let (verb, args, expect): (&'static str, _, _) = match verb.as_str() {
        "STAT" => ("STAT", arity(0, 0)?, Single),
        "NOOP" => ("NOOP", arity(0, 0)?, Single),
        "RSET" => ("RSET", arity(0, 0)?, Single),
        "QUIT" => ("QUIT", arity(0, 0)?, Single),
        "RETR" => ("RETR", arity(1, 1)?, Multi),
        "DELE" => ("DELE", arity(1, 1)?, Single),
        "TOP" => ("TOP", arity(2, 2)?, Multi),
        "LIST" | "UIDL" => {
            let a = arity(0, 1)?;
            let v = if verb == "LIST" { "LIST" } else { "UIDL" };
            (v, a, if a[0].is_some() { Single } else { Multi })
        }
        "CAPA" => {
            arity(0, 0)?;
            return Ok(Command::Capa);
        }
        "USER" | "PASS" | "APOP" | "AUTH" | "STLS" => return Ok(Command::Login),
        _ => return Err(Bad::Unknown),
    };
    Ok(Command::Forward(verb, args, expect))
}

/// One entry in reply order.
#[derive(Debug)]
enum Pending {
    Backend(Expect),
    /// A reply of mailgate's own; `close` ends the session after it.
    Local {
        bytes: Vec<u8>,
        close: bool,
    },
}

/// Where the response at the front of the queue stands.
#[derive(Debug, Clone, Copy)]
enum Cur {
    /// Nothing of it seen yet.
    Start,
    /// Inside the status line (`multi`: a body follows it).
    Status { multi: bool },
    /// Inside a body; the last three bytes seen (the terminator may span reads).
    Body { last: [u8; 3] },
}

/// The order of replies after login: backend responses (found by their
/// ends) and local answers between them.
pub struct Responses {
    queue: VecDeque<Pending>,
    /// `Backend` entries in `queue`.
    backend: usize,
    cur: Cur,
}

const END: &[u8; 4] = b"\n.\r\n";

impl Default for Responses {
    fn default() -> Self {
        Responses {
            queue: VecDeque::new(),
            backend: 0,
            cur: Cur::Start,
        }
    }
}

impl Responses {
    /// Entries waiting (forwarded commands and local answers).
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Every command forwarded has had its whole response (a multi-line
    /// one up to its terminator) and every local answer was taken: nothing
    /// is owed to the client (what a shutdown waits for, `pipe.rs`).
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Forwarded commands whose response has not ended yet.
    pub fn at_backend(&self) -> usize {
        self.backend
    }

    /// A command went to the backend (call before writing it).
    pub fn forwarded(&mut self, e: Expect) {
        self.queue.push_back(Pending::Backend(e));
        self.backend += 1;
    }

    pub fn local(&mut self, r: &Reply, close: bool) {
        self.queue.push_back(Pending::Local {
            bytes: r.to_bytes(),
            close,
        });
    }

    /// The local answer due now (all backend responses before it are out).
    pub fn take_local(&mut self) -> Option<(Vec<u8>, bool)> {
        match self.queue.front() {
            Some(Pending::Local { .. }) => match self.queue.pop_front() {
                Some(Pending::Local { bytes, close }) => Some((bytes, close)),
                _ => None,
            },
            _ => None,
        }
    }

    fn complete(&mut self) {
        self.queue.pop_front();
        self.backend -= 1;
        self.cur = Cur::Start;
    }

    /// Backend bytes in: how many of them (from the start) go to the client
    /// before [`take_local`](Self::take_local) may have an answer due. The
    /// whole chunk unless a local answer sits right after a response that
    /// ends inside it. Bytes nobody asked for pass through.
    pub fn split(&mut self, chunk: &[u8]) -> usize {
        let mut at = 0;
        loop {
            let expect = match self.queue.front() {
                None => return chunk.len(),
                Some(Pending::Local { .. }) => return at,
                Some(Pending::Backend(e)) => *e,
            };
            if at == chunk.len() {
                return at;
            }
            let rest = &chunk[at..];
            match self.cur {
                Cur::Start => {
                    self.cur = Cur::Status {
                        multi: expect == Expect::Multi && rest[0] == b'+',
                    }
                }
                Cur::Status { multi } => match memchr::memchr(b'\n', rest) {
                    None => return chunk.len(),
                    Some(i) => {
                        at += i + 1;
                        if multi {
                            // the status line's LF starts the first body line
                            self.cur = Cur::Body {
                                last: [0, 0, b'\n'],
                            };
                        } else {
                            self.complete();
                        }
                    }
                },
                Cur::Body { last } => {
                    if self.backend == 1 {
                        // nothing else was asked of the backend: its body
                        // ends where its output pauses, so only the tail of
                        // each read needs a look
                        let ended = ends_with_terminator(last, rest);
                        self.cur = Cur::Body {
                            last: last3(last, rest),
                        };
                        if ended {
                            self.complete();
                        }
                        return chunk.len();
                    }
                    match find_terminator(last, rest) {
                        Some(end) => {
                            at += end;
                            self.complete();
                        }
                        None => {
                            self.cur = Cur::Body {
                                last: last3(last, rest),
                            };
                            return chunk.len();
                        }
                    }
                }
            }
        }
    }
}

/// The last three bytes of `last ++ data`.
fn last3(last: [u8; 3], data: &[u8]) -> [u8; 3] {
    let mut w = [0u8; 6];
    w[..3].copy_from_slice(&last);
    let n = data.len().min(3);
    w[3..3 + n].copy_from_slice(&data[data.len() - n..]);
    let end = 3 + n;
    [w[end - 3], w[end - 2], w[end - 1]]
}

fn ends_with_terminator(last: [u8; 3], data: &[u8]) -> bool {
    if data.len() >= 4 {
        return data.ends_with(END);
    }
    let mut w = [0u8; 7];
    w[..3].copy_from_slice(&last);
    w[3..3 + data.len()].copy_from_slice(data);
    w[..3 + data.len()].ends_with(END)
}

/// Offset in `data` just past the first `\n.\r\n` of `last ++ data` that
/// ends inside `data`.
fn find_terminator(last: [u8; 3], data: &[u8]) -> Option<usize> {
    // across the boundary: a match that starts in `last`
    let mut w = [0u8; 6];
    w[..3].copy_from_slice(&last);
    let n = data.len().min(3);
    w[3..3 + n].copy_from_slice(&data[..n]);
    for start in 0..3 {
        let end = start + 4;
        if end <= 3 + n && w[start..end] == *END {
            return Some(end - 3);
        }
    }
    memchr::memmem::find(data, END).map(|i| i + 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps() -> Pop3Caps {
        Pop3Caps::from_capa(&["USER", "UIDL", "PIPELINING", "RESP-CODES"])
    }

    fn one(t: &mut Transaction, line: &[u8]) -> Step {
        let mut s = t.feed(line);
        assert_eq!(s.len(), 1, "{:?}", String::from_utf8_lossy(line));
        s.remove(0)
    }

    fn fwd(line: &str, expect: Expect) -> Step {
        Step::Forward {
            line: line.into(),
            expect,
        }
    }

    #[test]
    fn well_formed_commands_are_re_rendered() {
        use Expect::*;
        let mut t = Transaction::new(caps(), 10, 0);
        for (input, want) in [
            (&b"STAT\r\n"[..], fwd("STAT\r\n", Single)),
            (b"stat \r\n", fwd("STAT\r\n", Single)),
            (b"LIST\r\n", fwd("LIST\r\n", Multi)),
            (b"list 007\r\n", fwd("LIST 7\r\n", Single)),
            (b"UIDL\r\n", fwd("UIDL\r\n", Multi)),
            (b"UIDL 2\r\n", fwd("UIDL 2\r\n", Single)),
            (b"RETR  4294967295\r\n", fwd("RETR 4294967295\r\n", Multi)),
            (b"DELE 1\r\n", fwd("DELE 1\r\n", Single)),
            (b"NOOP\r\n", fwd("NOOP\r\n", Single)),
            (b"RSET\r\n", fwd("RSET\r\n", Single)),
        ] {
            assert_eq!(
                one(&mut t, input),
                want,
                "{}",
                String::from_utf8_lossy(input)
            );
        }
        assert_eq!((t.retr, t.dele), (1, 1));
        // TOP: not announced by this backend
        assert_eq!(
            one(&mut t, b"TOP 1 0\r\n"),
            Step::Reply(reply::command_unavailable())
        );
        let mut old = Transaction::new(Pop3Caps::rfc1939(), 10, 0);
        assert_eq!(
            one(&mut old, b"TOP 1 0\r\n"),
            fwd("TOP 1 0\r\n", Expect::Multi)
        );
        assert_eq!(one(&mut t, b"QUIT\r\n"), fwd("QUIT\r\n", Single));
        assert!(t.quit);
        // nothing after QUIT
        assert!(t.feed(b"STAT\r\nUSER x\r\n").is_empty());
    }

    #[test]
    fn everything_else_is_answered_here() {
        let mut t = Transaction::new(caps(), 100, 0);
        let long = [b"RETR ".as_slice(), &[b'1'; 300], b"\r\n"].concat();
        for (input, want) in [
            (&b"USER bob\r\n"[..], reply::already_logged_in()),
            (b"PASS x\r\n", reply::already_logged_in()),
            (b"apop a b\r\n", reply::already_logged_in()),
            (b"AUTH PLAIN\r\n", reply::already_logged_in()),
            (b"STLS\r\n", reply::already_logged_in()),
            (b"STAT\0\r\n", reply::bad_bytes()),
            (b"STAT\rLIST\r\n", reply::bad_bytes()),
            (b"STAT\n", reply::bad_bytes()),
            (b"RETR \xff\r\n", reply::bad_bytes()),
            (b"\r\n", reply::unknown_command()),
            (b" STAT\r\n", reply::unknown_command()),
            (b"LAST\r\n", reply::unknown_command()),
            (b"RETR\r\n", reply::syntax("one message number required")),
            (
                b"RETR 1 2\r\n",
                reply::syntax("one message number required"),
            ),
            (b"RETR -1\r\n", reply::syntax("a number is required")),
            (b"RETR +1\r\n", reply::syntax("a number is required")),
            (b"RETR 4294967296\r\n", reply::syntax("number too large")),
            (
                b"RETR 00000000001\r\n",
                reply::syntax("a number is required"),
            ),
            (
                b"TOP 1\r\n",
                reply::syntax("a message number and a line count required"),
            ),
            (b"LIST 1 2\r\n", reply::syntax("at most one message number")),
            (b"NOOP x\r\n", reply::syntax("no arguments allowed")),
            (&long, reply::line_too_long()),
        ] {
            assert_eq!(
                one(&mut t, input),
                Step::Reply(want),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
        assert_eq!((t.retr, t.dele, t.quit), (0, 0, false));
    }

    #[test]
    fn line_limit_and_split_input() {
        let mut t = Transaction::new(caps(), 100, 0);
        // 255 octets with CRLF pass; 256 do not, even when split over reads
        let ok = format!("NOOP{}\r\n", " ".repeat(249));
        assert_eq!(ok.len(), 255);
        assert_eq!(one(&mut t, ok.as_bytes()), fwd("NOOP\r\n", Expect::Single));
        let bad = format!("NOOP{}\r\n", " ".repeat(250));
        let (a, b) = bad.as_bytes().split_at(100);
        assert!(t.feed(a).is_empty());
        assert_eq!(one(&mut t, b), Step::Reply(reply::line_too_long()));
        // a huge line is never buffered
        assert!(t.feed(&[b'x'; 100_000]).is_empty());
        assert!(t.partial.capacity() <= MAX_COMMAND_LINE);
        let s = t.feed(b"x\r\nST");
        assert_eq!(s, [Step::Reply(reply::line_too_long())]);
        assert_eq!(t.feed(b"AT\r\nNOOP\r\n").len(), 2);
    }

    #[test]
    fn a_half_read_line_is_not_a_command_start() {
        let mut t = Transaction::new(caps(), 100, 0);
        assert!(t.at_command_start());
        assert!(t.feed(b"RET").is_empty());
        assert!(!t.at_command_start());
        assert_eq!(one(&mut t, b"R 1\r\n"), fwd("RETR 1\r\n", Expect::Multi));
        assert!(t.at_command_start());
        // an overlong line being dropped is one too, until its LF
        assert!(t.feed(&[b'x'; 300]).is_empty());
        assert!(!t.at_command_start());
        assert_eq!(t.feed(b"\r\n"), [Step::Reply(reply::line_too_long())]);
        assert!(t.at_command_start());
    }

    #[test]
    fn errors_close_after_max_errors() {
        // two errors before login count too
        let mut t = Transaction::new(caps(), 4, 2);
        let s = t.feed(b"USER a\r\nUSER b\r\nSTAT\r\n");
        assert_eq!(
            s,
            [
                Step::Reply(reply::already_logged_in()),
                Step::Close(reply::too_many_errors())
            ]
        );
    }

    #[test]
    fn capa_lists_what_works_now() {
        let mut t = Transaction::new(caps(), 10, 0);
        match one(&mut t, b"CAPA\r\n") {
            Step::Reply(r) => assert_eq!(
                String::from_utf8(r.to_bytes()).unwrap(),
                "+OK Capability list follows\r\nUIDL\r\nPIPELINING\r\nRESP-CODES\r\n.\r\n"
            ),
            other => panic!("{other:?}"),
        }
    }

    /// Feeds `chunks` through `r` the way the pipe does; returns the client's view.
    fn run(r: &mut Responses, chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        let drain = |r: &mut Responses, out: &mut Vec<u8>| {
            while let Some((b, _)) = r.take_local() {
                out.extend_from_slice(b"<");
                out.extend_from_slice(&b);
                out.extend_from_slice(b">");
            }
        };
        drain(r, &mut out);
        for c in chunks {
            let mut at = 0;
            while at < c.len() {
                let k = r.split(&c[at..]);
                out.extend_from_slice(&c[at..at + k]);
                at += k;
                drain(r, &mut out);
            }
        }
        out
    }

    #[test]
    fn local_answers_wait_for_earlier_responses() {
        let mut r = Responses::default();
        let err = Reply::err("x");
        r.local(&err, false);
        r.forwarded(Expect::Single);
        r.local(&err, false);
        r.forwarded(Expect::Multi);
        r.local(&err, false);
        r.forwarded(Expect::Multi);
        r.forwarded(Expect::Multi);
        r.local(&err, false);
        // STAT, then RETR with a body split over reads (terminator split too),
        // then a failed RETR, then an empty LIST, all in awkward chunks
        let out = run(
            &mut r,
            &[
                b"+OK 1 5\r",
                b"\n+OK 5 octets\r\n..dot\r\nx\r\n\r",
                b"\n.",
                b"\r\n-ERR no such message\r\n+OK\r\n.\r\n",
            ],
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "<-ERR x\r\n>+OK 1 5\r\n<-ERR x\r\n>+OK 5 octets\r\n..dot\r\nx\r\n\r\n.\r\n<-ERR x\r\n>-ERR no such message\r\n+OK\r\n.\r\n<-ERR x\r\n>"
        );
        assert!(r.is_empty());
    }

    #[test]
    fn a_lone_body_is_found_by_its_tail() {
        let mut r = Responses::default();
        r.forwarded(Expect::Multi);
        r.local(&Reply::err("after"), false);
        // a line that only looks like the end ("..") does not end it
        let out = run(
            &mut r,
            &[b"+OK\r\nline\r\n..\r\n", b"more\r\n.", b"\r", b"\n"],
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "+OK\r\nline\r\n..\r\nmore\r\n.\r\n<-ERR after\r\n>"
        );
        // unsolicited bytes pass through untouched
        assert_eq!(run(&mut r, &[b"+OK hello\r\n"]), b"+OK hello\r\n");
    }

    #[test]
    fn nothing_is_owed_only_after_the_whole_body() {
        let mut r = Responses::default();
        assert!(r.is_empty());
        r.forwarded(Expect::Single);
        r.forwarded(Expect::Multi);
        assert!(!r.is_empty());
        run(&mut r, &[b"+OK 2 320\r\n"]);
        assert!(!r.is_empty(), "the RETR is still owed");
        run(&mut r, &[b"+OK 10 octets\r\nline\r\n.\r"]);
        assert!(!r.is_empty(), "its terminator is not whole yet");
        run(&mut r, &[b"\n"]);
        assert!(r.is_empty());
        // a local answer not written yet is owed too
        r.local(&Reply::err("x"), false);
        assert!(!r.is_empty());
        assert!(r.take_local().is_some());
        assert!(r.is_empty());
    }

    #[test]
    fn terminator_helpers() {
        assert!(ends_with_terminator([0, 0, b'\n'], b".\r\n"));
        assert!(ends_with_terminator([b'\n', b'.', b'\r'], b"\n"));
        assert!(!ends_with_terminator([b'.', b'.', b'\r'], b"\n"));
        assert_eq!(find_terminator([b'x', b'\r', b'\n'], b".\r\nabc"), Some(3));
        assert_eq!(find_terminator([b'\n', b'.', b'\r'], b"\nabc"), Some(1));
        assert_eq!(find_terminator([0, 0, 0], b"a\r\n.\r\nb"), Some(6));
        assert_eq!(find_terminator([0, 0, 0], b"a\r\n..\r\nb"), None);
        assert_eq!(last3([1, 2, 3], b"ab"), [3, b'a', b'b']);
        assert_eq!(last3([1, 2, 3], b"abcd"), *b"bcd");
    }
}
