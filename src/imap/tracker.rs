//! The authenticated state, sans-IO, in the two halves the relay drives:
//!
//! - [`Upstream`] follows the client's bytes command by command (lines and
//!   the literals they announce) and decides each one at its first line:
//!   forwarded as sent — with the line length, every literal's size (an
//!   APPEND's up to `max_message_size`, others up to `max_command_line`),
//!   NUL and bare CR/LF checked — or answered here and never forwarded
//!   (STARTTLS, LOGIN, AUTHENTICATE, UNAUTHENTICATE, COMPRESS and ID after
//!   login, anything over a bound).
//!   After a synchronising literal's announcement it stops until the
//!   backend has answered with `+` (the literal follows) or with the
//!   command's tagged response (it does not): it keeps the backend's view
//!   of where commands start. Such an announcement goes only once every
//!   command before it is answered, so that no earlier `+` (an IDLE's) or
//!   tagged response (a repeated tag) is taken for the backend's word on it.
//!   It tracks `IDLE` … `DONE` (only DONE is forwarded in between), and
//!   says when nothing is outstanding at the backend ([`Upstream::quiet`]:
//!   where a shutdown ends the session).
//! - [`Downstream`] follows the backend's bytes response by response (a
//!   line, the literals it announces, the lines after them) without
//!   changing or keeping them, so that mailgate's own answers are inserted
//!   only where a response ends, and so that `+` and tagged responses reach
//!   the upstream half. Literal octets are skipped by count, not scanned.

use super::command::{literal_at_end, literal_placed, literal_syntax, tag_and_verb, tag_of};
use super::reply::{self, Reply};

/// Bytes kept of an overlong line's start (its tag) and end (its literal).
const HEAD: usize = super::command::MAX_TAG + 32;
const TAIL: usize = 32;

/// A command's bounds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Each line of a command, CRLF included (`max_command_line`).
    pub line: usize,
    /// Each literal of a command other than APPEND.
    pub literal: u64,
    /// Each literal of an APPEND (`max_message_size`).
    pub append: u64,
    /// The largest non-synchronising literal the backend takes: any with
    /// LITERAL+, 4096 with LITERAL- (RFC 7888), none without either (so
    /// that its idea of where a command ends is always ours).
    pub non_sync: u64,
}

/// A local answer for the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// Answer in place of the command (at the backend's next response boundary).
    Reply(Reply),
    /// Answer, then end the session.
    Close(Reply),
}

#[derive(Debug, PartialEq, Eq)]
enum Up {
    /// At a line (a command's first, or one after a literal).
    Line,
    /// Inside a literal: octets left, and whether they go to the backend.
    Literal { left: u64, forward: bool },
    /// A synchronising literal was forwarded: the backend decides.
    AwaitGo { tag: String, size: u64 },
    /// A line announcing a synchronising literal, held until the backend
    /// has answered every command before its own: only then is a tagged
    /// response surely the refusal of this one (tags may repeat) and a `+`
    /// surely its go-ahead (an IDLE before it has one too).
    Hold {
        line: Vec<u8>,
        tag: String,
        size: u64,
        append: bool,
    },
}

/// The command whose literal was announced (its later lines follow).
#[derive(Debug)]
struct Cmd {
    tag: String,
    forward: bool,
    append: bool,
}

pub struct Upstream {
    limits: Limits,
    max_errors: u32,
    errors: u32,
    state: Up,
    /// The current line; past the limit only its first [`HEAD`] bytes.
    line: Vec<u8>,
    overlong: bool,
    tail: Vec<u8>,
    cmd: Option<Cmd>,
    /// The tag of the IDLE in progress (RFC 2177).
    idle: Option<String>,
    /// The backend's `+` for that IDLE came: it waits for DONE.
    idle_go: bool,
    /// Commands forwarded whose tagged response has not come yet.
    in_flight: u64,
    done: bool,
    /// Commands forwarded, for the session log line.
    pub commands: u32,
    /// LOGOUT was forwarded (the backend's close is then the normal end).
    pub logout: bool,
}

impl Upstream {
    /// `errors`: protocol errors already made before login.
    pub fn new(limits: Limits, max_errors: u32, errors: u32) -> Self {
        Upstream {
            limits,
            max_errors,
            errors,
            state: Up::Line,
            line: Vec::new(),
            overlong: false,
            tail: Vec::new(),
            cmd: None,
            idle: None,
            idle_go: false,
            in_flight: 0,
            done: false,
            commands: 0,
            logout: false,
        }
    }

    /// The client is in IDLE (its idle time is at least 29 minutes).
    pub fn idling(&self) -> bool {
        self.idle.is_some()
    }

    /// Between client commands at a line start: no line or literal of the
    /// client's half-read (IDLE's DONE counts as part of the IDLE). At
    /// shutdown the relay forwards no command that starts after it.
    pub fn at_command_start(&self) -> bool {
        self.between_lines() && self.idle.is_none()
    }

    /// Nothing of the client's is outstanding at the backend: every command
    /// forwarded has had its tagged response, or the one left is an IDLE
    /// the backend accepted (`+`) and the client has not ended; and no
    /// command is half-read. A shutdown ends the session here (`relay.rs`).
    pub fn quiet(&self) -> bool {
        let pending = if self.idle.is_some() && self.idle_go {
            1
        } else {
            0
        };
        self.between_lines() && self.in_flight == pending
    }

    fn between_lines(&self) -> bool {
        self.state == Up::Line && self.line.is_empty() && !self.overlong && self.cmd.is_none()
    }

    /// Waiting for the backend's word on a synchronising literal (or for
    /// its answers to the commands before it).
    pub fn waiting(&self) -> bool {
        matches!(self.state, Up::AwaitGo { .. } | Up::Hold { .. })
    }

    /// The backend sent a `+` continuation request. True when that lets
    /// the client's literal through.
    pub fn continuation(&mut self) -> bool {
        if let Up::AwaitGo { size, .. } = self.state {
            self.state = Up::Literal {
                left: size,
                forward: true,
            };
            if size == 0 {
                self.state = Up::Line;
            }
            return true;
        }
        // nothing else asks for a `+` while an IDLE runs (only DONE is
        // forwarded in it)
        if self.idle.is_some() {
            self.idle_go = true;
        }
        false
    }

    /// The backend sent a tagged response. True when it ends a wait: the
    /// backend refused the literal, so the command is over; or the commands
    /// before a held one are all answered, so it may go.
    pub fn tagged(&mut self, tag: &str) -> bool {
        self.in_flight = self.in_flight.saturating_sub(1);
        if self.idle.as_deref() == Some(tag) {
            self.idle = None;
            self.idle_go = false;
        }
        if matches!(self.state, Up::Hold { .. }) {
            return self.in_flight <= 1;
        }
        if matches!(&self.state, Up::AwaitGo { tag: t, .. } if t == tag) {
            self.state = Up::Line;
            self.cmd = None;
            return true;
        }
        false
    }

    /// Client bytes in: what may go to the backend is appended to `out`,
    /// local answers come back as events. Returns how many bytes were taken:
    /// fewer than `data` while [`waiting`](Self::waiting) (the rest is to be
    /// fed again once the backend answered) or after a closing event.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> (usize, Vec<Event>) {
        let mut events = Vec::new();
        if matches!(self.state, Up::Hold { .. }) && self.in_flight <= 1 {
            let Up::Hold {
                line,
                tag,
                size,
                append,
            } = std::mem::replace(&mut self.state, Up::Line)
            else {
                unreachable!("matched above")
            };
            out.extend_from_slice(&line);
            self.literal(
                tag,
                super::command::Literal { size, sync: true },
                true,
                append,
            );
        }
        let mut i = 0;
        while i < data.len() && !self.done {
            match &mut self.state {
                Up::AwaitGo { .. } | Up::Hold { .. } => break,
                Up::Literal { left, forward } => {
                    let k = (data.len() - i).min(usize::try_from(*left).unwrap_or(usize::MAX));
                    if *forward {
                        out.extend_from_slice(&data[i..i + k]);
                    }
                    *left -= k as u64;
                    if *left == 0 {
                        self.state = Up::Line;
                    }
                    i += k;
                }
                Up::Line => {
                    let rest = &data[i..];
                    let (piece, complete) = match memchr::memchr(b'\n', rest) {
                        Some(lf) => (&rest[..=lf], true),
                        None => (rest, false),
                    };
                    i += piece.len();
                    self.push(piece);
                    if complete {
                        if let Some(e) = self.line_done(out) {
                            events.push(e);
                        }
                    }
                }
            }
        }
        (i, events)
    }

    fn push(&mut self, piece: &[u8]) {
        if !self.overlong && self.line.len() + piece.len() <= self.limits.line {
            self.line.extend_from_slice(piece);
            return;
        }
        if !self.overlong {
            self.overlong = true;
            self.line.truncate(HEAD);
        }
        let room = HEAD.saturating_sub(self.line.len());
        self.line.extend_from_slice(&piece[..room.min(piece.len())]);
        self.tail.extend_from_slice(piece);
        if self.tail.len() > TAIL {
            self.tail.drain(..self.tail.len() - TAIL);
        }
    }

    fn error(&mut self, r: Reply) -> Event {
        self.errors += 1;
        if self.errors >= self.max_errors {
            self.done = true;
            Event::Close(reply::too_many_errors())
        } else {
            Event::Reply(r)
        }
    }

    fn close(&mut self, r: Reply) -> Event {
        self.done = true;
        Event::Close(r)
    }

    /// A whole line is in `self.line` (or its head and tail).
    fn line_done(&mut self, out: &mut Vec<u8>) -> Option<Event> {
        let raw = std::mem::take(&mut self.line);
        let tail = std::mem::take(&mut self.tail);
        if std::mem::take(&mut self.overlong) {
            return self.overlong_line(&raw, &tail);
        }
        let clean = raw
            .strip_suffix(b"\r\n")
            .filter(|l| !l.iter().any(|b| matches!(b, 0 | b'\r' | b'\n')));
        if let Some(cmd) = self.cmd.take() {
            return self.next_piece(cmd, &raw, clean, out);
        }
        if self.idle.is_some() {
            if clean.is_some_and(|l| l.eq_ignore_ascii_case(b"DONE")) {
                self.idle = None;
                self.idle_go = false;
                out.extend_from_slice(&raw);
                return None;
            }
            // RFC 2177: only DONE. The backend would read this line as the
            // IDLE's end, whole: a literal it announces would be commands
            let tag = tag_of(&raw);
            let lit = clean.and_then(literal_at_end);
            let e = self.error(reply::syntax(tag.as_deref(), "only DONE ends an IDLE"));
            return Some(self.refused_literal(lit, false, e));
        }
        let Some(line) = clean else {
            let tag = tag_of(&raw);
            return Some(self.error(reply::bad_bytes(tag.as_deref())));
        };
        let lit = literal_at_end(line);
        let Some((tag, verb)) = tag_and_verb(line) else {
            let tag = tag_of(line);
            let e = self.error(reply::syntax(
                tag.as_deref(),
                "a tag and a command are required",
            ));
            return Some(self.refused_literal(lit, false, e));
        };
        let tag = tag.to_string();
        match verb.as_str() {
            // never relayed: mailgate holds the client's TLS, and the
            // session is logged in
            "STARTTLS" => {
                let e = Event::Reply(reply::starttls_after_login(&tag));
                return Some(self.refused_literal(lit, false, e));
            }
            "LOGIN" | "AUTHENTICATE" => {
                let e = self.error(reply::already_logged_in(&tag));
                return Some(self.refused_literal(lit, false, e));
            }
            // a compressed stream could not be checked
            "COMPRESS" => {
                let e = Event::Reply(reply::compress_unavailable(&tag));
                return Some(self.refused_literal(lit, false, e));
            }
            // RFC 8437: the backend would be not-authenticated again while
            // the session here stays logged in
            "UNAUTHENTICATE" => {
                let e = Event::Reply(reply::unauthenticate_unavailable(&tag));
                return Some(self.refused_literal(lit, false, e));
            }
            // RFC 2971: a backend that trusts mailgate's connection would
            // trust the client's fields (`x-originating-ip` …); mailgate's
            // own answer, as before login. A synchronising literal in it
            // never comes: the answer ends the command.
            "ID" => {
                let e = Event::Reply(reply::id(&tag));
                return Some(self.refused_literal(lit, false, e));
            }
            _ => {}
        }
        if lit.is_some() {
            // never forwarded where the backend would not read a literal
            let why = if !literal_placed(line) {
                "a literal must follow a space or ("
            } else if verb == "IDLE" {
                // a backend reading it would take the octets for the IDLE's end
                "IDLE takes no arguments"
            } else {
                ""
            };
            if !why.is_empty() {
                let e = self.error(reply::syntax(Some(&tag), why));
                return Some(self.refused_literal(lit, false, e));
            }
        }
        let append = verb == "APPEND";
        if let Some(l) = lit {
            if l.size > self.bound(append, l.sync) {
                return Some(self.too_big(&tag, append, l.sync));
            }
        }
        self.commands += 1;
        self.in_flight += 1;
        match verb.as_str() {
            "IDLE" => {
                self.idle = Some(tag.clone());
                self.idle_go = false;
            }
            "LOGOUT" => self.logout = true,
            _ => {}
        }
        self.forward(&raw, tag, lit, append, out);
        None
    }

    /// Forwards a line of a command (counted in `in_flight` already) that
    /// announces `lit`, or holds it (see [`Up::Hold`]).
    fn forward(
        &mut self,
        raw: &[u8],
        tag: String,
        lit: Option<super::command::Literal>,
        append: bool,
        out: &mut Vec<u8>,
    ) {
        match lit {
            Some(l) if l.sync && self.in_flight > 1 => {
                self.state = Up::Hold {
                    line: raw.to_vec(),
                    tag,
                    size: l.size,
                    append,
                };
            }
            Some(l) => {
                out.extend_from_slice(raw);
                self.literal(tag, l, true, append);
            }
            None => out.extend_from_slice(raw),
        }
    }

    fn limit(&self, append: bool) -> u64 {
        if append {
            self.limits.append
        } else {
            self.limits.literal
        }
    }

    /// The largest literal a forwarded command may announce.
    fn bound(&self, append: bool, sync: bool) -> u64 {
        if sync {
            self.limit(append)
        } else {
            self.limit(append).min(self.limits.non_sync)
        }
    }

    /// Enters the literal `l` of a command (forwarded or not).
    fn literal(&mut self, tag: String, l: super::command::Literal, forward: bool, append: bool) {
        self.state = if forward && l.sync {
            Up::AwaitGo {
                tag: tag.clone(),
                size: l.size,
            }
        } else if l.size == 0 {
            Up::Line
        } else {
            Up::Literal {
                left: l.size,
                forward,
            }
        };
        self.cmd = Some(Cmd {
            tag,
            forward,
            append,
        });
    }

    /// A literal over its bound, announced by a command's first line.
    fn too_big(&mut self, tag: &str, append: bool, sync: bool) -> Event {
        let r = if append {
            reply::message_too_large(tag)
        } else {
            reply::literal_too_large(Some(tag))
        };
        if sync {
            // the client sends none of it (RFC 3501 §7.5): the command is over
            Event::Reply(r)
        } else {
            self.close(r.then(reply::bye_literal_too_large()))
        }
    }

    /// A command answered here whose first line announced `lit`: a
    /// synchronising literal never comes (the answer is the refusal); a
    /// non-synchronising one is read and dropped, within the bounds.
    fn refused_literal(
        &mut self,
        lit: Option<super::command::Literal>,
        append: bool,
        answer: Event,
    ) -> Event {
        match lit {
            Some(l) if !l.sync && !self.done => {
                if l.size > self.limit(append) {
                    let r = match answer {
                        Event::Reply(r) => r,
                        Event::Close(r) => r,
                    };
                    return self.close(r.then(reply::bye_literal_too_large()));
                }
                self.literal(String::new(), l, false, append);
                answer
            }
            _ => answer,
        }
    }

    /// A line after a literal of the command `cmd`.
    fn next_piece(
        &mut self,
        cmd: Cmd,
        raw: &[u8],
        clean: Option<&[u8]>,
        out: &mut Vec<u8>,
    ) -> Option<Event> {
        let Some(line) = clean else {
            return if cmd.forward {
                // part of it is at the backend already: no way back in step
                Some(self.close(reply::bye_command_broken()))
            } else {
                None
            };
        };
        let lit = literal_at_end(line);
        if cmd.forward {
            if lit.is_some() && !literal_placed(line) {
                // part of it is at the backend already, read another way
                return Some(self.close(reply::bye_command_broken()));
            }
            if let Some(l) = lit {
                if l.size > self.bound(cmd.append, l.sync) {
                    let r = if cmd.append {
                        reply::bye_literal_too_large()
                    } else {
                        reply::bye_command_broken()
                    };
                    return Some(self.close(r));
                }
            }
            self.forward(raw, cmd.tag, lit, cmd.append, out);
            return None;
        }
        // the rest of a command answered here
        match lit {
            Some(l) if !l.sync => {
                if l.size > self.limit(cmd.append) {
                    return Some(self.close(reply::bye_literal_too_large()));
                }
                self.literal(String::new(), l, false, cmd.append);
            }
            // a synchronising literal: the client has our answer, and waits
            // for a `+` that never comes: the command is over
            _ => {}
        }
        None
    }

    /// A line of `raw` that came over the line limit.
    fn overlong_line(&mut self, head: &[u8], tail: &[u8]) -> Option<Event> {
        let end = tail
            .strip_suffix(b"\r\n")
            .or_else(|| tail.strip_suffix(b"\n"))
            .unwrap_or(tail);
        let lit = literal_at_end(end);
        match self.cmd.take() {
            Some(c) if c.forward => Some(self.close(reply::bye_command_broken())),
            Some(_) => match lit {
                Some(l) if !l.sync => Some(self.close(reply::bye_literal_too_large())),
                _ => None,
            },
            None => {
                let tag = tag_of(head);
                match lit {
                    Some(l) if !l.sync => Some(self.close(
                        reply::line_too_long(tag.as_deref()).then(reply::bye_literal_too_large()),
                    )),
                    _ => Some(self.error(reply::line_too_long(tag.as_deref()))),
                }
            }
        }
    }
}

/// What ended at a response boundary of the backend's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// `+ …`
    Continuation,
    /// `* …`
    Untagged,
    /// `tag OK|NO|BAD …`
    Tagged(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Down {
    Start,
    Line,
    Literal(u64),
}

pub struct Downstream {
    state: Down,
    /// The start of the response's first line (its tag).
    head: Vec<u8>,
    first: bool,
    /// The end of the current line (its literal announcement).
    tail: Vec<u8>,
    /// The current line is inside a quoted string here (and after a `\`
    /// in it): a `{n}` at its end is text then. Followed over the whole
    /// line, since a string may start long before the kept tail.
    quoted: bool,
    escaped: bool,
}

impl Default for Downstream {
    fn default() -> Self {
        Downstream {
            state: Down::Start,
            head: Vec::new(),
            first: true,
            tail: Vec::new(),
            quoted: false,
            escaped: false,
        }
    }
}

impl Downstream {
    /// Between two responses: mailgate's own may go out here.
    pub fn at_boundary(&self) -> bool {
        self.state == Down::Start
    }

    /// Scans backend bytes up to and including the end of the next response:
    /// how many were scanned, and the response that ended there (`None`:
    /// all of `data` was scanned and the response goes on).
    pub fn feed(&mut self, data: &[u8]) -> (usize, Option<Seen>) {
        let mut i = 0;
        while i < data.len() {
            match self.state {
                Down::Start => {
                    self.head.clear();
                    self.tail.clear();
                    self.first = true;
                    self.quoted = false;
                    self.escaped = false;
                    self.state = Down::Line;
                }
                Down::Literal(left) => {
                    let k = (data.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    i += k;
                    let left = left - k as u64;
                    self.state = if left == 0 {
                        Down::Line
                    } else {
                        Down::Literal(left)
                    };
                }
                Down::Line => {
                    let rest = &data[i..];
                    let (piece, complete) = match memchr::memchr(b'\n', rest) {
                        Some(lf) => (&rest[..=lf], true),
                        None => (rest, false),
                    };
                    i += piece.len();
                    if self.first && self.head.len() < HEAD {
                        let room = HEAD - self.head.len();
                        self.head.extend_from_slice(&piece[..room.min(piece.len())]);
                    }
                    self.tail.extend_from_slice(piece);
                    if self.tail.len() > TAIL {
                        self.tail.drain(..self.tail.len() - TAIL);
                    }
                    self.follow_quotes(piece);
                    if !complete {
                        continue;
                    }
                    let end = self.tail.strip_suffix(b"\n").unwrap_or(&self.tail);
                    let end = end.strip_suffix(b"\r").unwrap_or(end);
                    // resp-text (a status response's, a `+`'s) holds no literal
                    let text = self.quoted || (self.first && status_response(&self.head));
                    self.quoted = false;
                    self.escaped = false;
                    if let Some((_, l)) = literal_syntax(end).filter(|_| !text) {
                        self.first = false;
                        self.tail.clear();
                        self.state = if l.size == 0 {
                            Down::Line
                        } else {
                            Down::Literal(l.size)
                        };
                        continue;
                    }
                    self.state = Down::Start;
                    return (i, Some(self.seen()));
                }
            }
        }
        (i, None)
    }

    fn follow_quotes(&mut self, piece: &[u8]) {
        for b in piece {
            if self.escaped {
                self.escaped = false;
            } else if self.quoted && *b == b'\\' {
                self.escaped = true;
            } else if *b == b'"' {
                self.quoted = !self.quoted;
            }
        }
    }

    fn seen(&self) -> Seen {
        match self.head.first() {
            Some(b'+') => Seen::Continuation,
            Some(b'*') => Seen::Untagged,
            _ => match tag_of(&self.head) {
                Some(t) => Seen::Tagged(t),
                None => Seen::Untagged,
            },
        }
    }
}

/// Whether a response starting with `head` is a status response
/// (`tag OK|NO|BAD`, `* OK|NO|BAD|BYE|PREAUTH`) or a continuation request.
fn status_response(head: &[u8]) -> bool {
    if head.first() == Some(&b'+') {
        return true;
    }
    let Some(sp) = head.iter().position(|b| *b == b' ') else {
        return false;
    };
    let rest = &head[sp + 1..];
    let word = rest
        .iter()
        .position(|b| matches!(b, b' ' | b'\r' | b'\n'))
        .map_or(rest, |e| &rest[..e]);
    let is = |w: &[u8]| word.eq_ignore_ascii_case(w);
    is(b"OK") || is(b"NO") || is(b"BAD") || (head[..sp] == *b"*" && (is(b"BYE") || is(b"PREAUTH")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up() -> Upstream {
        Upstream::new(
            Limits {
                line: 100,
                literal: 100,
                append: 1000,
                non_sync: u64::MAX,
            },
            5,
            0,
        )
    }

    /// Feeds `s`; returns (forwarded, local answers as text, bytes taken).
    fn feed(u: &mut Upstream, s: &[u8]) -> (String, Vec<String>, usize) {
        let mut out = Vec::new();
        let (n, events) = u.feed(s, &mut out);
        let ev = events
            .into_iter()
            .map(|e| match e {
                Event::Reply(r) => String::from_utf8(r.to_bytes()).unwrap(),
                Event::Close(r) => format!("close:{}", String::from_utf8(r.to_bytes()).unwrap()),
            })
            .collect();
        (String::from_utf8_lossy(&out).into_owned(), ev, n)
    }

    #[test]
    fn commands_pass_as_sent_pipelined() {
        let mut u = up();
        let input = b"a SELECT INBOX\r\nb FETCH 1:* (FLAGS)\r\nc APPEND x {3+}\r\nabc\r\n";
        let (fwd, ev, n) = feed(&mut u, input);
        assert_eq!(fwd.as_bytes(), input);
        assert!(ev.is_empty());
        assert_eq!(n, input.len());
        assert_eq!(u.commands, 3);
        // split anywhere, same result
        let mut u = up();
        let mut all = String::new();
        for b in input.chunks(3) {
            all.push_str(&feed(&mut u, b).0);
        }
        assert_eq!(all.as_bytes(), input);
    }

    #[test]
    fn starttls_and_logins_after_login_never_reach_the_backend() {
        let mut u = up();
        let (fwd, ev, _) = feed(
            &mut u,
            b"a NOOP\r\nb STARTTLS\r\nc LOGIN x y\r\nd AUTHENTICATE PLAIN\r\nx COMPRESS DEFLATE\r\ne NOOP\r\n",
        );
        assert_eq!(fwd, "a NOOP\r\ne NOOP\r\n");
        assert_eq!(
            ev,
            vec![
                "b BAD STARTTLS is only valid before login\r\n",
                "c BAD Already logged in\r\n",
                "d BAD Already logged in\r\n",
                "x NO [CANNOT] COMPRESS is not available through this gateway\r\n",
            ]
        );
        // a refused command's non-synchronising literal is read and dropped
        let (fwd, ev, _) = feed(&mut u, b"f LOGIN {5+}\r\nalice {2+}\r\npw\r\ng NOOP\r\n");
        assert_eq!(fwd, "g NOOP\r\n");
        assert_eq!(ev, vec!["f BAD Already logged in\r\n"]);
        // a synchronising one never comes: the answer is the refusal
        let (fwd, ev, _) = feed(&mut u, b"h LOGIN {5}\r\ni NOOP\r\n");
        assert_eq!(fwd, "i NOOP\r\n");
        assert_eq!(ev, vec!["h BAD Already logged in\r\n"]);
    }

    #[test]
    fn unauthenticate_after_login_never_reaches_the_backend() {
        // RFC 8437: a backend would drop back to not-authenticated while
        // mailgate still relays a logged-in session
        let mut u = up();
        let (fwd, ev, _) = feed(
            &mut u,
            b"a NOOP\r\nb UNAUTHENTICATE\r\nc unauthenticate {3+}\r\nabc\r\nd NOOP\r\n",
        );
        assert_eq!(fwd, "a NOOP\r\nd NOOP\r\n");
        assert_eq!(
            ev,
            vec![
                "b NO [CANNOT] UNAUTHENTICATE is not available through this gateway\r\n",
                "c NO [CANNOT] UNAUTHENTICATE is not available through this gateway\r\n",
            ]
        );
        assert_eq!(u.commands, 2);
    }

    #[test]
    fn id_after_login_is_answered_here() {
        // the client's fields (`x-originating-ip` …) would be trusted by a
        // backend that trusts mailgate's connection
        let mut u = up();
        let (fwd, ev, _) = feed(
            &mut u,
            b"a ID (\"x-originating-ip\" \"192.0.2.1\")\r\nb id NIL\r\n\
              c ID (\"x-originating-ip\" {9+}\r\n192.0.2.1)\r\nd ID (\"name\" {3}\r\ne NOOP\r\n",
        );
        assert_eq!(fwd, "e NOOP\r\n");
        let id = |t: &str| format!("* ID (\"name\" \"mailgate\")\r\n{t} OK ID completed\r\n");
        assert_eq!(ev, vec![id("a"), id("b"), id("c"), id("d")]);
        assert_eq!(u.commands, 1);
    }

    #[test]
    fn synchronising_literal_waits_for_the_backend() {
        let mut u = up();
        let input = b"a APPEND INBOX {5}\r\nhello\r\nb NOOP\r\n";
        let (fwd, ev, n) = feed(&mut u, input);
        assert_eq!(fwd, "a APPEND INBOX {5}\r\n");
        assert!(ev.is_empty());
        assert!(u.waiting());
        // a client that did not wait: its bytes stay until the backend spoke
        assert_eq!(n, 20);
        assert!(!u.tagged("zz"));
        assert!(u.continuation());
        let (fwd, _, _) = feed(&mut u, &input[n..]);
        assert_eq!(fwd, "hello\r\nb NOOP\r\n");

        // refused by the backend: what follows is a new command
        let mut u = up();
        let (_, _, n) = feed(&mut u, b"a APPEND INBOX {5}\r\n");
        assert_eq!(n, 20);
        assert!(u.tagged("a"));
        assert!(!u.waiting());
        let (fwd, _, _) = feed(&mut u, b"b NOOP\r\n");
        assert_eq!(fwd, "b NOOP\r\n");
    }

    #[test]
    fn literal_bounds() {
        let mut u = up();
        // APPEND up to `append`, others up to `literal`
        let (fwd, ev, _) = feed(&mut u, b"a APPEND x {1000+}\r\n");
        assert_eq!(fwd, "a APPEND x {1000+}\r\n");
        assert!(ev.is_empty());
        let (fwd, _, _) = feed(&mut u, &[b'm'; 1000]);
        assert_eq!(fwd.len(), 1000);
        feed(&mut u, b"\r\n");
        let (fwd, ev, _) = feed(&mut u, b"b APPEND x {1001}\r\nc SEARCH TEXT {101}\r\n");
        assert_eq!(fwd, "");
        assert_eq!(
            ev,
            vec![
                "b NO [TOOBIG] Message too large\r\n",
                "c BAD [TOOBIG] Literal too large\r\n"
            ]
        );
        assert!(!u.waiting());
        // non-synchronising and too big: the octets are on their way; close
        let (fwd, ev, n) = feed(&mut u, b"d SEARCH TEXT {101+}\r\nxxxx");
        assert_eq!(fwd, "");
        assert_eq!(
            ev,
            vec!["close:d BAD [TOOBIG] Literal too large\r\n* BYE [TOOBIG] Literal too large, closing connection\r\n"]
        );
        assert_eq!(n, 22);
        assert_eq!(feed(&mut u, b"e NOOP\r\n").2, 0);
    }

    #[test]
    fn non_synchronising_literals_only_where_the_backend_takes_them() {
        let mut u = up();
        u.limits.non_sync = 4;
        let (fwd, ev, _) = feed(&mut u, b"a APPEND x {4+}\r\nabcd\r\n");
        assert_eq!(fwd, "a APPEND x {4+}\r\nabcd\r\n");
        assert!(ev.is_empty());
        let (fwd, ev, _) = feed(&mut u, b"b APPEND x {5+}\r\nabcde\r\n");
        assert_eq!(fwd, "");
        assert!(ev[0].starts_with("close:b NO [TOOBIG]"), "{ev:?}");
    }

    #[test]
    fn a_later_synchronising_literal_waits_too() {
        let mut u = up();
        let (fwd, _, _) = feed(&mut u, b"a APPEND x {2+}\r\nab {3}\r\n");
        assert_eq!(fwd, "a APPEND x {2+}\r\nab {3}\r\n");
        assert!(u.waiting());
        // the backend refuses it with the command's tag
        assert!(u.tagged("a"));
        let (fwd, _, _) = feed(&mut u, b"b NOOP\r\n");
        assert_eq!(fwd, "b NOOP\r\n");
    }

    #[test]
    fn a_literal_too_big_in_the_middle_of_a_command_closes() {
        let mut u = up();
        let (fwd, ev, _) = feed(&mut u, b"a APPEND x {2+}\r\nab {2000+}\r\n");
        assert_eq!(fwd, "a APPEND x {2+}\r\nab");
        assert_eq!(
            ev,
            vec!["close:* BYE [TOOBIG] Literal too large, closing connection\r\n"]
        );
    }

    #[test]
    fn line_bounds_and_bytes() {
        let mut u = up();
        let long = format!("a SEARCH {}\r\nb NOOP\r\n", "x".repeat(200));
        let (fwd, ev, _) = feed(&mut u, long.as_bytes());
        assert_eq!(fwd, "b NOOP\r\n");
        assert_eq!(ev, vec!["a BAD Line too long\r\n"]);
        let (fwd, ev, _) = feed(&mut u, b"c NOOP\n\x00d NOOP\r\ne NO\rOP\r\n{x} NOOP\r\n");
        assert_eq!(fwd, "");
        assert_eq!(
            ev,
            vec![
                "c BAD Invalid characters in command\r\n",
                "* BAD Invalid characters in command\r\n",
                "e BAD Invalid characters in command\r\n",
                "close:* BYE Too many errors, closing connection\r\n"
            ]
        );
        // an overlong line announcing a non-synchronising literal: close
        let mut u = up();
        let long = format!("a SEARCH {} {{5+}}\r\nhello", "x".repeat(200));
        let (_, ev, _) = feed(&mut u, long.as_bytes());
        assert!(
            ev[0].starts_with("close:a BAD Line too long\r\n* BYE"),
            "{ev:?}"
        );
        // 8-bit text (UTF-8 mailbox names) passes
        let mut u = up();
        let (fwd, _, _) = feed(&mut u, "a SELECT \"Entw\u{fc}rfe\"\r\n".as_bytes());
        assert_eq!(fwd, "a SELECT \"Entw\u{fc}rfe\"\r\n");
    }

    #[test]
    fn idle_until_done() {
        let mut u = up();
        let (fwd, _, _) = feed(&mut u, b"a IDLE\r\n");
        assert_eq!(fwd, "a IDLE\r\n");
        assert!(u.idling());
        assert!(!u.continuation(), "the `+ idling` releases nothing");
        assert!(u.idling());
        let (fwd, _, _) = feed(&mut u, b"done\r\n");
        assert_eq!(fwd, "done\r\n");
        assert!(!u.idling());
        // an IDLE the backend refuses ends with its tagged answer
        feed(&mut u, b"b IDLE\r\n");
        assert!(u.idling());
        u.tagged("b");
        assert!(!u.idling());
        // STARTTLS while idling is still never forwarded
        feed(&mut u, b"c IDLE\r\n");
        let (fwd, ev, _) = feed(&mut u, b"d STARTTLS\r\n");
        assert_eq!(fwd, "");
        assert_eq!(ev.len(), 1);
        assert!(u.idling());
    }

    #[test]
    fn quiet_only_with_nothing_outstanding() {
        let mut u = up();
        assert!(u.quiet() && u.at_command_start());
        feed(&mut u, b"a SEL");
        assert!(!u.quiet() && !u.at_command_start(), "a half-read line");
        feed(&mut u, b"ECT INBOX\r\n");
        assert!(u.at_command_start());
        assert!(!u.quiet(), "its answer is owed");
        u.tagged("a");
        assert!(u.quiet());
        // IDLE: quiet once the backend's `+` came, until DONE
        feed(&mut u, b"b IDLE\r\n");
        assert!(!u.quiet() && !u.at_command_start());
        u.continuation();
        assert!(u.quiet());
        assert!(!u.at_command_start(), "DONE belongs to the IDLE");
        feed(&mut u, b"DONE\r\n");
        assert!(!u.quiet(), "the IDLE's tagged answer is owed");
        u.tagged("b");
        assert!(u.quiet() && u.at_command_start());
        // an IDLE behind a command not answered yet
        feed(&mut u, b"c NOOP\r\nd IDLE\r\n");
        u.tagged("c");
        assert!(!u.quiet(), "the IDLE's `+` has not come");
        u.continuation();
        assert!(u.quiet());
        feed(&mut u, b"done\r\n");
        u.tagged("d");
        // a literal half-sent
        feed(&mut u, b"e APPEND INBOX {3+}\r\nab");
        assert!(!u.quiet() && !u.at_command_start());
        feed(&mut u, b"c\r\n");
        assert!(u.at_command_start() && !u.quiet());
        u.tagged("e");
        assert!(u.quiet());
        // a synchronising literal waiting for the backend's `+`
        feed(&mut u, b"f APPEND INBOX {3}\r\n");
        assert!(u.waiting() && !u.quiet() && !u.at_command_start());
    }

    #[test]
    fn logout_is_noticed() {
        let mut u = up();
        feed(&mut u, b"z LOGOUT\r\n");
        assert!(u.logout);
    }

    #[test]
    fn the_plus_of_an_idle_does_not_release_a_later_literal() {
        // IDLE, DONE and an APPEND the backend will refuse, in one write: the
        // backend's `+ idling` must not let the APPEND's octets through, or
        // after its `b NO [TRYCREATE]` they are a command to the backend
        let mut u = up();
        let (fwd, _, _) = feed(&mut u, b"a IDLE\r\nDONE\r\nb APPEND nosuch {20}\r\n");
        assert!(u.waiting());
        assert!(!u.continuation(), "the first `+` is the IDLE's");
        assert!(u.waiting());
        // the APPEND goes once the IDLE is answered
        assert_eq!(fwd, "a IDLE\r\nDONE\r\n");
        assert!(u.tagged("a"));
        let (fwd, _, _) = feed(&mut u, b"");
        assert_eq!(fwd, "b APPEND nosuch {20}\r\n");
        assert!(u.waiting());
        assert!(u.tagged("b"));
        let (fwd, ev, _) = feed(&mut u, b"x COMPRESS DEFLATE\r\n");
        assert_eq!(fwd, "");
        assert_eq!(ev.len(), 1);
    }

    #[test]
    fn a_repeated_tag_does_not_end_the_wait_for_a_literal() {
        // the NOOP's `a OK` is not the APPEND's refusal: taken for it, the
        // client's next octets would be read as commands here and as the
        // literal there, and the ones after as a literal here and commands there
        let mut u = up();
        let (fwd, _, _) = feed(&mut u, b"a NOOP\r\na APPEND INBOX {20}\r\n");
        assert_eq!(fwd, "a NOOP\r\n");
        assert!(u.waiting());
        assert!(u.tagged("a"), "the NOOP's answer lets the APPEND go");
        let (fwd, _, _) = feed(&mut u, b"");
        assert_eq!(fwd, "a APPEND INBOX {20}\r\n");
        assert!(u.waiting());
        assert!(u.continuation());
        let (fwd, _, _) = feed(&mut u, b"b SELECT {22+}\r\n12\r\n");
        assert_eq!(fwd, "b SELECT {22+}\r\n12\r\n");
        // a later line of a command waits for the answers before it too
        let mut u = up();
        let (fwd, _, _) = feed(&mut u, b"c NOOP\r\nd APPEND x {2+}\r\nab {3}\r\n");
        assert_eq!(fwd, "c NOOP\r\nd APPEND x {2+}\r\nab");
        assert!(u.waiting());
        assert!(!u.continuation());
        assert!(u.tagged("c"));
        let (fwd, _, _) = feed(&mut u, b"");
        assert_eq!(fwd, " {3}\r\n");
        assert!(u.continuation());
        let (fwd, _, _) = feed(&mut u, b"xyz\r\n");
        assert_eq!(fwd, "xyz\r\n");
    }

    #[test]
    fn a_literal_on_the_line_that_ends_an_idle_is_not_forwarded() {
        // the backend reads the line after IDLE as its end (BAD if not
        // DONE), never the literal it announces: the octets would be a command
        let mut u = up();
        feed(&mut u, b"a IDLE\r\n");
        let (fwd, ev, _) = feed(&mut u, b"b APPEND x {20+}\r\nx COMPRESS DEFLATE\r\n\r\n");
        assert_eq!(fwd, "");
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert!(ev[0].starts_with("b BAD"), "{ev:?}");
        let (fwd, ev, _) = feed(&mut u, b"c APPEND x {5}\r\n");
        assert_eq!(fwd, "");
        assert_eq!(ev.len(), 1, "{ev:?}");
        // still idling at the backend: DONE goes through
        assert!(u.idling());
        let (fwd, _, _) = feed(&mut u, b"DONE\r\n");
        assert_eq!(fwd, "DONE\r\n");
        // nor any other line: the backend would take it for the IDLE's end
        feed(&mut u, b"d IDLE\r\n");
        let (fwd, ev, _) = feed(&mut u, b"e NOOP\r\n");
        assert_eq!(fwd, "");
        assert_eq!(ev, vec!["e BAD Syntax error: only DONE ends an IDLE\r\n"]);
        // nor an IDLE with a literal
        let mut u = up();
        let (fwd, ev, _) = feed(&mut u, b"f IDLE {4+}\r\nDONE\r\n");
        assert_eq!(fwd, "");
        assert_eq!(ev.len(), 1);
    }

    #[test]
    fn a_literal_glued_to_an_atom_is_not_forwarded() {
        // Dovecot reads `x{20+}` as an atom: the 20 octets would be a command
        let mut u = up();
        let (fwd, ev, _) = feed(
            &mut u,
            b"a SELECT x{20+}\r\nx COMPRESS DEFLATE\r\n\r\nb NOOP\r\n",
        );
        assert_eq!(fwd, "b NOOP\r\n");
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert!(ev[0].starts_with("a BAD"), "{ev:?}");
        let (fwd, ev, _) = feed(&mut u, b"c SELECT \"x\"{5}\r\nd NOOP\r\n");
        assert_eq!(fwd, "d NOOP\r\n");
        assert_eq!(ev.len(), 1, "{ev:?}");
        // after a literal, the same: part of the command is at the backend
        let (fwd, ev, _) = feed(&mut u, b"e APPEND x {2+}\r\nab{3+}\r\n");
        assert_eq!(fwd, "e APPEND x {2+}\r\nab");
        assert!(ev[0].starts_with("close:"), "{ev:?}");
        // where the grammar has them, literals pass
        let mut u = up();
        let ok = b"f APPEND x (\\Seen) ~{2+}\r\nab\r\ng LOGOUT\r\n";
        let (fwd, ev, _) = feed(&mut u, ok);
        assert_eq!(fwd.as_bytes(), ok);
        assert!(ev.is_empty());
        let ok = b"h SEARCH CHARSET UTF-8 (TEXT {2+}\r\nab)\r\n";
        let (fwd, _, _) = feed(&mut u, ok);
        assert_eq!(fwd.as_bytes(), ok);
    }

    #[test]
    fn downstream_literal_after_a_quoted_string_longer_than_the_tail() {
        // an ENVELOPE's date, then its subject as a literal (8-bit text):
        // the quote that opens the date is far before the `{n}`
        let mut d = Downstream::default();
        let r =
            b"* 1 FETCH (ENVELOPE (\"Mon, 01 Jan 2024 00:00:00 +0000\" {8}\r\n+ go x\r\n NIL))\r\n";
        assert_eq!(d.feed(r), (r.len(), Some(Seen::Untagged)));
        assert!(d.at_boundary());
        // a `{n}` inside a quoted string is none, however long the string
        let mut d = Downstream::default();
        let r = format!("* LIST () \"/\" \"{} {{8}}\r\n", "y".repeat(100));
        assert_eq!(d.feed(r.as_bytes()), (r.len(), Some(Seen::Untagged)));
    }

    #[test]
    fn downstream_status_responses_carry_no_literal() {
        // resp-text (RFC 3501 §9) has no literals: a backend that echoes a
        // client's mailbox name `x{5}` in a NO must not hide what follows
        for (r, seen) in [
            (
                &b"b NO Mailbox doesn't exist: x{5}\r\n"[..],
                Seen::Tagged("b".into()),
            ),
            (b"* OK [ALERT] x {3}\r\n", Seen::Untagged),
            (b"* bye going {3}\r\n", Seen::Untagged),
            (b"+ send {2}\r\n", Seen::Continuation),
        ] {
            let mut d = Downstream::default();
            assert_eq!(d.feed(r), (r.len(), Some(seen)), "{r:?}");
            assert!(d.at_boundary());
        }
    }

    fn down_all(d: &mut Downstream, mut s: &[u8]) -> Vec<(usize, Option<Seen>)> {
        let mut v = Vec::new();
        while !s.is_empty() {
            let (n, seen) = d.feed(s);
            v.push((n, seen));
            s = &s[n..];
        }
        v
    }

    #[test]
    fn downstream_boundaries_skip_literals() {
        let mut d = Downstream::default();
        assert!(d.at_boundary());
        let body = b"* 1 FETCH (BODY[] {12}\r\nab\r\na OK x\r\n FLAGS (\\Seen))\r\na OK done\r\n+ idling\r\n";
        let got = down_all(&mut d, body);
        assert_eq!(
            got,
            vec![
                (53, Some(Seen::Untagged)),
                (11, Some(Seen::Tagged("a".into()))),
                (10, Some(Seen::Continuation)),
            ]
        );
        assert!(d.at_boundary());
        // byte by byte, the same boundaries
        let mut d = Downstream::default();
        let mut ends = Vec::new();
        for (i, b) in body.iter().enumerate() {
            let (n, seen) = d.feed(std::slice::from_ref(b));
            assert_eq!(n, 1);
            if let Some(s) = seen {
                ends.push((i + 1, s));
            }
            if i + 1 < 53 {
                assert!(!d.at_boundary() || i == 0);
            }
        }
        assert_eq!(
            ends,
            vec![
                (53, Seen::Untagged),
                (64, Seen::Tagged("a".into())),
                (74, Seen::Continuation)
            ]
        );
        // a response cut in the middle of its literal is no boundary
        let mut d = Downstream::default();
        assert_eq!(d.feed(b"* 2 FETCH (BODY[] {100}\r\nabc"), (28, None));
        assert!(!d.at_boundary());
        assert_eq!(d.feed(b"{1}\r\n"), (5, None));
        // `{0}` literals and binary `~{n}`
        let mut d = Downstream::default();
        assert_eq!(
            d.feed(b"* 3 FETCH (BINARY[] ~{0}\r\n)\r\n"),
            (29, Some(Seen::Untagged))
        );
    }
}
