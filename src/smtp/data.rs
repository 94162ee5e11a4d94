//! The DATA path, sans-IO.
//!
//! [`DataReceiver`] consumes client bytes after the 354 and ends the message
//! **only** on `<CRLF>.<CRLF>`: a `.` line counts as the end only when the line
//! before it ended in CRLF and the dot line itself ends in CRLF. Every other
//! look-alike (`\n.\n`, `\r.\r`, `\n.\r\n`, NUL tricks — the SMTP smuggling
//! variants) is message content, which is then either rejected (bare CR / bare
//! LF / NUL) or normalised to CRLF before anything reaches the backend. The
//! stored body is dot-unstuffed; `mail::Stuffer` re-stuffs it for the backend, after
//! normalising, so no end-of-data look-alike can survive the hop. The receiver
//! also refuses what would break the headers mailgate prepends (a first line
//! that continues them), bounds the header block, and holds the body within
//! the process-wide in-flight budget.

use crate::config::BareNewlines;
use crate::conn::inflight::Reservation;
use crate::mail::Stuffer;
use bytes::BytesMut;

/// Header fields per message (RFC 5322 sets no limit; this bounds what
/// verification and the backend must parse). More → 552 5.3.4.
pub const MAX_HEADER_FIELDS: usize = 1000;
/// Octets of the header block per message (including each line's CRLF).
pub const MAX_HEADER_BYTES: usize = 1 << 20;

/// Smallest growth step of the message buffer.
const MIN_GROWTH: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    BareNewline,
    Nul,
    LineTooLong,
    TooBig,
    /// The first line starts with SP or HTAB: it would continue the last
    /// header mailgate prepends (Received:, Authentication-Results: …).
    FoldedFirstLine,
    /// More than `MAX_HEADER_FIELDS` fields or `MAX_HEADER_BYTES` octets.
    HeaderTooBig,
    /// The process-wide in-flight budget could not cover the message.
    NoMemory,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Feed {
    /// The end was not seen yet; call again with more bytes.
    NeedMore,
    /// End of data seen (bytes after it stay in the buffer: pipelined commands).
    Done(Result<Vec<u8>, Violation>),
}

pub struct DataReceiver {
    mode: BareNewlines,
    max_size: u64,
    max_line: usize,
    body: Vec<u8>,
    /// Covers `body`'s capacity when a budget applies (see `inflight`).
    reservation: Option<Reservation>,
    /// Whether the previous line ended in CRLF (true at the start: DATA's CRLF).
    prev_crlf: bool,
    /// A partial overlong line is being skipped.
    skipping: bool,
    violation: Option<Violation>,
    /// Bare CR, bare LF or NUL was seen (in either mode).
    tainted: bool,
    /// Still in the header block (before the first empty line).
    in_header: bool,
    header_fields: usize,
    header_bytes: usize,
    /// Octets received (for logs), including rejected content.
    pub received: u64,
}

impl DataReceiver {
    pub fn new(mode: BareNewlines, max_size: u64, max_line: usize) -> Self {
        DataReceiver {
            mode,
            max_size,
            max_line,
            body: Vec::new(),
            reservation: None,
            prev_crlf: true,
            skipping: false,
            violation: None,
            tainted: false,
            in_header: true,
            header_fields: 0,
            header_bytes: 0,
            received: 0,
        }
    }

    /// Holds the message within `r`: the buffer grows only as far as the
    /// reservation can be grown; beyond that the message is refused
    /// (`Violation::NoMemory`) and read on to its end holding nothing.
    pub fn with_reservation(mut self, r: Reservation) -> Self {
        self.reservation = Some(r);
        self
    }

    /// The reservation covering the body handed out by `Feed::Done(Ok)`: the
    /// caller keeps it until the message is delivered.
    pub fn take_reservation(&mut self) -> Option<Reservation> {
        self.reservation.take()
    }

    fn flag(&mut self, v: Violation) {
        // the first violation decides the reply; drop the body to free memory
        if self.violation.is_none() {
            self.violation = Some(v);
            self.body = Vec::new();
            self.reservation = None;
        }
    }

    /// True when the message had bare CR, bare LF or NUL. The client's framing
    /// can then not be trusted: bytes such as `\r\r\n.\r\n` hold a genuine
    /// CRLF.CRLF, so whatever follows would be read as new commands — the
    /// smuggling shape. The driver ends the session after answering such a
    /// message, so nothing sent after its end is ever read as a command.
    pub fn tainted(&self) -> bool {
        self.tainted
    }

    /// Consumes complete lines from `buf`.
    pub fn feed(&mut self, buf: &mut BytesMut) -> Feed {
        loop {
            let Some(i) = memchr::memchr(b'\n', buf) else {
                if buf.len() > self.max_line {
                    // keep the last byte: it may be the CR of this line's CRLF
                    let n = buf.len() - 1;
                    self.received += n as u64;
                    let dropped = buf.split_to(n);
                    // no LF follows any CR in here: each one is bare
                    if memchr::memchr2(b'\r', 0, &dropped).is_some() {
                        self.tainted = true;
                    }
                    self.skipping = true;
                    self.flag(Violation::LineTooLong);
                }
                return Feed::NeedMore;
            };
            let line = buf.split_to(i + 1);
            self.received += line.len() as u64;
            let crlf = line.len() >= 2 && line[line.len() - 2] == b'\r';
            let content = &line[..line.len() - if crlf { 2 } else { 1 }];
            if self.skipping {
                // the discarded tail is checked like any other line: bare
                // CR/LF or NUL in it must end the session too
                if !crlf || memchr::memchr2(b'\r', 0, content).is_some() {
                    self.tainted = true;
                }
                self.skipping = false;
                self.prev_crlf = crlf;
                continue;
            }
            if self.prev_crlf && crlf && content == b"." {
                return Feed::Done(match self.violation {
                    Some(v) => Err(v),
                    None => Ok(std::mem::take(&mut self.body)),
                });
            }
            let after_crlf = self.prev_crlf;
            self.prev_crlf = crlf;
            if line.len() > self.max_line {
                self.flag(Violation::LineTooLong);
            }
            let bare = !crlf || memchr::memchr(b'\r', content).is_some();
            let nul = memchr::memchr(0, content).is_some();
            if bare || nul {
                self.tainted = true;
            }
            if nul {
                // NUL is never valid in a message (RFC 5322 §3.5) and is a
                // smuggling ingredient; rejected in both modes
                self.flag(Violation::Nul);
            }
            if bare && self.mode == BareNewlines::Reject {
                self.flag(Violation::BareNewline);
            }
            if self.violation.is_some() {
                continue;
            }
            // dot-unstuff only lines that started after a real CRLF
            let content = if after_crlf && content.first() == Some(&b'.') {
                &content[1..]
            } else {
                content
            };
            if bare {
                // normalise: each bare CR ends a line too
                for piece in content.split(|b| *b == b'\r') {
                    self.push_line(piece);
                }
            } else {
                self.push_line(content);
            }
            if self.body.len() as u64 > self.max_size {
                self.flag(Violation::TooBig);
            }
        }
    }

    /// Appends one line (without its CRLF) to the body, after the checks that
    /// look at the message's structure.
    fn push_line(&mut self, line: &[u8]) {
        if self.violation.is_some() {
            return;
        }
        let folded = matches!(line.first(), Some(b' ' | b'\t'));
        if self.in_header {
            if self.body.is_empty() && folded {
                self.flag(Violation::FoldedFirstLine);
                return;
            }
            if line.is_empty() {
                self.in_header = false;
            } else {
                self.header_fields += usize::from(!folded);
                self.header_bytes += line.len() + 2;
                if self.header_fields > MAX_HEADER_FIELDS || self.header_bytes > MAX_HEADER_BYTES {
                    self.flag(Violation::HeaderTooBig);
                    return;
                }
            }
        }
        if !self.make_room(line.len() + 2) {
            return;
        }
        self.body.extend_from_slice(line);
        self.body.extend_from_slice(b"\r\n");
    }

    /// Ensures room for `n` more bytes. The buffer grows by half its size (not
    /// doubling: a large message then holds at most 1.5× its size), never
    /// past what the size limit needs, and only as far as the reservation
    /// grows; `false` (message refused, memory freed) when it cannot.
    fn make_room(&mut self, n: usize) -> bool {
        let len = self.body.len();
        if self.body.capacity() - len >= n {
            return true;
        }
        let need = len + n;
        let ceiling = usize::try_from(self.max_size)
            .unwrap_or(usize::MAX)
            .saturating_add(self.max_line)
            .max(need);
        let mut want = (len + len / 2).max(MIN_GROWTH).max(need).min(ceiling);
        if let Some(r) = self.reservation.as_mut() {
            match r.grow(need as u64, want as u64) {
                Some(covered) => want = want.min(covered as usize),
                None => {
                    self.flag(Violation::NoMemory);
                    return false;
                }
            }
        }
        self.body.reserve_exact(want - len);
        true
    }
}

/// Dot-stuffs `parts` (each a CRLF-normalised text) into one buffer: the wire
/// form sent after the backend's 354, including the final `.CRLF`. The relay
/// itself streams with `mail::Stuffer` instead (no second copy of the message).
pub fn stuff(parts: &[&[u8]]) -> Vec<u8> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(total + total / 64 + 8);
    let mut st = Stuffer::default();
    for part in parts {
        st.stuff(part, &mut out, usize::MAX);
    }
    st.finish(&mut out);
    out
}

/// What the trace header says about the client.
pub struct TraceInfo<'a> {
    pub helo: &'a str,
    pub peer: std::net::SocketAddr,
    pub host: &'a str,
    pub session_id: &'a str,
    pub esmtp: bool,
    pub tls: Option<(&'a str, &'a str)>,
    pub rcpt: Option<&'a str>,
    pub now: std::time::SystemTime,
}

/// RFC 5321 §4.4 `Received:` header, folded, CRLF-terminated.
pub fn received_header(t: &TraceInfo) -> String {
    let proto = match (t.esmtp, t.tls.is_some()) {
        (true, true) => "ESMTPS",
        (true, false) => "ESMTP",
        (false, true) => "SMTPS",
        (false, false) => "SMTP",
    };
    let ip = match t.peer.ip() {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => format!("IPv6:{v6}"),
        },
        v4 => v4.to_string(),
    };
    let mut h = format!(
        "Received: from {} ([{}])\r\n\tby {} (mailgate) with {}",
        t.helo, ip, t.host, proto
    );
    if let Some((version, cipher)) = t.tls {
        h.push_str(&format!("\r\n\t(version={version} cipher={cipher})"));
    }
    h.push_str(&format!("\r\n\tid {}", t.session_id));
    if let Some(r) = t.rcpt {
        h.push_str(&format!("\r\n\tfor <{r}>"));
    }
    h.push_str(&format!(";\r\n\t{}\r\n", rfc5322_date(t.now)));
    h
}

/// `Sun, 29 Nov 2026 04:33:03 +0000` (UTC; no time-zone database needed).
pub fn rfc5322_date(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // civil_from_days (Howard Hinnant), proleptic Gregorian
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const WD: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MON: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {} {} {} {:02}:{:02}:{:02} +0000",
        WD[days.rem_euclid(7) as usize],
        day,
        MON[(month - 1) as usize],
        year,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(mode: BareNewlines, input: &[u8]) -> (Feed, Vec<u8>) {
        let mut r = DataReceiver::new(mode, 1 << 20, 1000);
        let mut buf = BytesMut::from(input);
        let f = r.feed(&mut buf);
        (f, buf.to_vec())
    }

    #[test]
    fn ends_only_on_crlf_dot_crlf() {
        let (f, rest) = run(
            BareNewlines::Reject,
            b"Subject: x\r\n\r\nhi\r\n..dot\r\n.\r\nQUIT\r\n",
        );
        assert_eq!(
            f,
            Feed::Done(Ok(b"Subject: x\r\n\r\nhi\r\n.dot\r\n".to_vec()))
        );
        assert_eq!(rest, b"QUIT\r\n");
        // an empty message
        let (f, _) = run(BareNewlines::Reject, b".\r\n");
        assert_eq!(f, Feed::Done(Ok(Vec::new())));
        // incomplete: wait
        let (f, _) = run(BareNewlines::Reject, b"hi\r\n.");
        assert_eq!(f, Feed::NeedMore);
    }

    #[test]
    fn byte_at_a_time() {
        let input = b"a\r\n.b\r\n\r\n.\r\nNEXT";
        let mut r = DataReceiver::new(BareNewlines::Reject, 1 << 20, 1000);
        let mut buf = BytesMut::new();
        let mut out = None;
        for b in input {
            buf.extend_from_slice(&[*b]);
            if let Feed::Done(x) = r.feed(&mut buf) {
                out = Some(x);
                break;
            }
        }
        assert_eq!(out, Some(Ok(b"a\r\nb\r\n\r\n".to_vec())));
    }

    /// The 13 smuggling variants from the shared test data, in both modes: either
    /// the smuggled commands stay inside the message, or the message ended at a
    /// genuine CRLF.CRLF and is marked tainted (the driver then closes the
    /// session, so the rest is never read as commands).
    #[test]
    fn smuggling_variants() {
        let variants: &[&[u8]] = &[
            b"\n.\n",
            b"\n.\r",
            b"\r.\n",
            b"\r.\r",
            b"\n.\r\n",
            b"\r\n.\n",
            b"\r.\r\n",
            b"\r\n.\r",
            b"\r\n.\r\r\n",
            b"\r\r\n.\r\n",
            b"\r\r\n.\r\r\n",
            b"\r\n\x00.\r\n",
            b"\r\n.\x00\r\n",
        ];
        let smuggled = b"MAIL FROM:<smuggled@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nFrom: smuggled@x\r\n\r\nsmuggled\r\n";
        for v in variants {
            for mode in [BareNewlines::Reject, BareNewlines::Normalize] {
                let mut input = b"From: a@b\r\n\r\nbody".to_vec();
                input.extend_from_slice(v);
                input.extend_from_slice(smuggled);
                input.extend_from_slice(b".\r\nNOOP\r\n");
                let mut r = DataReceiver::new(mode, 1 << 20, 1000);
                let mut buf = BytesMut::from(&input[..]);
                let f = r.feed(&mut buf);
                assert!(r.tainted(), "variant {v:?} not flagged");
                let rest = buf.to_vec();
                if rest != b"NOOP\r\n" {
                    // only possible when the bytes really contain CRLF.CRLF
                    assert!(
                        input.windows(5).any(|w| w == b"\r\n.\r\n"),
                        "{v:?} {mode:?} ended early"
                    );
                }
                match f {
                    Feed::Done(Ok(body)) => {
                        assert_eq!(
                            mode,
                            BareNewlines::Normalize,
                            "{v:?} accepted in reject mode"
                        );
                        // CRLF only, and re-stuffed output has exactly one end marker
                        let wire = stuff(&[&body]);
                        assert!(
                            !wire.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'),
                            "{v:?}"
                        );
                        assert!(
                            !wire.windows(2).any(|w| w[0] == b'\r' && w[1] != b'\n'),
                            "{v:?}"
                        );
                        let ends = wire.windows(5).filter(|w| w == b"\r\n.\r\n").count()
                            + usize::from(wire.starts_with(b".\r\n"));
                        assert_eq!(ends, 1, "{v:?}: {:?}", String::from_utf8_lossy(&wire));
                    }
                    Feed::Done(Err(e)) => {
                        assert!(
                            matches!(e, Violation::BareNewline | Violation::Nul),
                            "{v:?} {e:?}"
                        );
                    }
                    Feed::NeedMore => panic!("{v:?} not finished"),
                }
            }
        }
    }

    #[test]
    fn limits() {
        let mut r = DataReceiver::new(BareNewlines::Reject, 10, 1000);
        let mut buf = BytesMut::from(&b"0123456789abc\r\n.\r\n"[..]);
        assert_eq!(r.feed(&mut buf), Feed::Done(Err(Violation::TooBig)));
        let mut r = DataReceiver::new(BareNewlines::Reject, 1 << 20, 20);
        let mut buf = BytesMut::from(&vec![b'x'; 100][..]);
        assert_eq!(r.feed(&mut buf), Feed::NeedMore);
        assert!(buf.len() <= 1);
        buf.extend_from_slice(b"yy\r\n.\r\n");
        assert_eq!(r.feed(&mut buf), Feed::Done(Err(Violation::LineTooLong)));
        let (f, _) = run(BareNewlines::Normalize, b"a\0b\r\n.\r\n");
        assert_eq!(f, Feed::Done(Err(Violation::Nul)));
    }

    #[test]
    fn stuffing() {
        assert_eq!(stuff(&[b"a\r\n.b\r\n..\r\n"]), b"a\r\n..b\r\n...\r\n.\r\n");
        assert_eq!(stuff(&[b"H: v\r\n", b".x\r\n"]), b"H: v\r\n..x\r\n.\r\n");
        assert_eq!(stuff(&[b""]), b".\r\n");
    }

    /// A feed result without the body (readable in assertion messages).
    fn short(f: &Feed) -> Option<Result<usize, Violation>> {
        match f {
            Feed::NeedMore => None,
            Feed::Done(r) => Some(r.as_ref().map(Vec::len).map_err(|v| *v)),
        }
    }

    /// Feeds `input` in pieces of `chunk` bytes, like the driver does.
    fn run_chunked(r: &mut DataReceiver, input: &[u8], chunk: usize) -> Feed {
        let mut buf = BytesMut::new();
        for piece in input.chunks(chunk) {
            buf.extend_from_slice(piece);
            if let Feed::Done(x) = r.feed(&mut buf) {
                return Feed::Done(x);
            }
        }
        Feed::NeedMore
    }

    /// Issue 11 item 1: a first line starting with SP or HTAB would become a
    /// continuation of the last header mailgate prepends.
    #[test]
    fn first_line_may_not_continue_prepended_headers() {
        for input in [
            &b" dkim=pass header.d=bank.example\r\nSubject: x\r\n\r\nhi\r\n.\r\n"[..],
            b"\tdkim=pass\r\n\r\nhi\r\n.\r\n",
            b" \r\n.\r\n",
            // a leading dot is stuffing: what is left starts with SP
            b". x\r\n\r\nhi\r\n.\r\n",
        ] {
            for mode in [BareNewlines::Reject, BareNewlines::Normalize] {
                let (f, _) = run(mode, input);
                assert_eq!(
                    short(&f),
                    Some(Err(Violation::FoldedFirstLine)),
                    "{:?}",
                    String::from_utf8_lossy(input)
                );
            }
        }
        // bare-CR normalisation cannot smuggle one in either
        let (f, _) = run(BareNewlines::Normalize, b" \rx: y\r\n\r\nhi\r\n.\r\n");
        assert_eq!(f, Feed::Done(Err(Violation::FoldedFirstLine)));
        // folding the client's own headers, and a message without headers, are fine
        let (f, _) = run(
            BareNewlines::Reject,
            b"Subject: a\r\n\tlong subject\r\n\r\n  indented body\r\n.\r\n",
        );
        assert!(matches!(f, Feed::Done(Ok(_))), "{f:?}");
        let (f, _) = run(BareNewlines::Reject, b"\r\n body\r\n.\r\n");
        assert!(matches!(f, Feed::Done(Ok(_))), "{f:?}");
    }

    /// Issue 11 item 7 (DATA part): at most 1,000 header fields or 1 MiB of
    /// header block; continuation lines count as bytes, body lines not at all.
    #[test]
    fn header_block_is_bounded() {
        let msg = |fields: usize, body_lines: usize| {
            let mut m = Vec::new();
            for i in 0..fields {
                m.extend_from_slice(format!("X-H{i}: v\r\n\tcontinued\r\n").as_bytes());
            }
            m.extend_from_slice(b"\r\n");
            for _ in 0..body_lines {
                m.extend_from_slice(b"X-Not-A-Header: body\r\n");
            }
            m.extend_from_slice(b".\r\n");
            m
        };
        let (f, _) = run(BareNewlines::Reject, &msg(1000, 5000));
        assert!(matches!(short(&f), Some(Ok(_))), "1000 fields are fine");
        let (f, _) = run(BareNewlines::Reject, &msg(1001, 0));
        assert_eq!(short(&f), Some(Err(Violation::HeaderTooBig)));
        // over 1 MiB in a few fields (long folded values)
        let mut m = b"Subject: big\r\n".to_vec();
        let fold = format!(" {}\r\n", "x".repeat(900));
        for _ in 0..1200 {
            m.extend_from_slice(fold.as_bytes());
        }
        m.extend_from_slice(b"\r\nbody\r\n.\r\n");
        let mut r = DataReceiver::new(BareNewlines::Reject, 4 << 20, 1000);
        let mut buf = BytesMut::from(&m[..]);
        assert_eq!(short(&r.feed(&mut buf)), Some(Err(Violation::HeaderTooBig)));
        // the same bytes in the body are fine
        let mut m = b"Subject: big\r\n\r\n".to_vec();
        for _ in 0..1200 {
            m.extend_from_slice(fold.as_bytes());
        }
        m.extend_from_slice(b".\r\n");
        let mut r = DataReceiver::new(BareNewlines::Reject, 4 << 20, 1000);
        let mut buf = BytesMut::from(&m[..]);
        assert!(matches!(short(&r.feed(&mut buf)), Some(Ok(_))));
    }

    /// Issue 11 item 10: bare CR/LF or NUL in the skipped part of an overlong
    /// line taints the message (the session is then closed), however the
    /// bytes arrive.
    #[test]
    fn discarded_tail_of_an_overlong_line_taints() {
        let long = "y".repeat(100);
        let cases: Vec<Vec<u8>> = vec![
            format!("a\r\n{long}\r{long}\r\n.\r\n").into(),
            format!("a\r\n{long}\0{long}\r\n.\r\n").into(),
            format!("a\r\n{long}{long}\n.\r\n").into(),
            format!("a\r\n{long}\r\r\n.\r\n").into(),
        ];
        for input in &cases {
            for chunk in [1, 7, 64, 1000] {
                let mut r = DataReceiver::new(BareNewlines::Normalize, 1 << 20, 50);
                let f = run_chunked(&mut r, input, chunk);
                assert!(matches!(short(&f), Some(Err(_)) | None), "{:?}", short(&f));
                assert!(
                    r.tainted(),
                    "chunk {chunk}: {:?} not tainted",
                    String::from_utf8_lossy(input)
                );
            }
        }
        // an overlong line with clean line ends is refused but not tainted
        let clean = format!("a\r\n{long}{long}\r\n.\r\n");
        for chunk in [1, 7, 64, 1000] {
            let mut r = DataReceiver::new(BareNewlines::Normalize, 1 << 20, 50);
            let f = run_chunked(&mut r, clean.as_bytes(), chunk);
            assert_eq!(f, Feed::Done(Err(Violation::LineTooLong)));
            assert!(!r.tainted(), "chunk {chunk}");
        }
    }

    /// Issue 11 item 8: the body is held within a reservation; a message the
    /// budget cannot cover is refused at its end (read on, holding nothing),
    /// and every byte is given back.
    #[test]
    fn inflight_budget() {
        let budget = crate::conn::inflight::Budget::new(1 << 20);
        let line = format!("{}\r\n", "z".repeat(98));
        let mut msg = b"Subject: big\r\n\r\n".to_vec();
        while msg.len() < 700 * 1024 {
            msg.extend_from_slice(line.as_bytes());
        }
        let rx = || {
            DataReceiver::new(BareNewlines::Reject, 25 << 20, 1000)
                .with_reservation(budget.reserve(0).unwrap())
        };
        let mut a = rx();
        let mut buf = BytesMut::from(&msg[..]);
        assert_eq!(a.feed(&mut buf), Feed::NeedMore);
        let held = budget.used();
        assert!((700 * 1024..=1 << 20).contains(&held), "{held}");
        let mut b = rx();
        let mut buf = BytesMut::from(&msg[..]);
        assert_eq!(b.feed(&mut buf), Feed::NeedMore, "read on to the end");
        assert_eq!(budget.used(), held, "the refused message holds nothing");
        buf.extend_from_slice(b".\r\n");
        assert_eq!(short(&b.feed(&mut buf)), Some(Err(Violation::NoMemory)));
        let mut buf = BytesMut::from(&b".\r\n"[..]);
        let Feed::Done(Ok(body)) = a.feed(&mut buf) else {
            panic!()
        };
        assert_eq!(body, msg);
        let r = a.take_reservation().unwrap();
        assert!(r.bytes() >= body.capacity() as u64);
        drop((r, body));
        drop((a, b));
        assert_eq!(budget.used(), 0);
        // without a budget, growth by half: never twice the message (a
        // little over 512 KiB is where doubling would hold 1 MiB)
        msg.truncate(16 + 100 * 5300);
        let mut r = DataReceiver::new(BareNewlines::Reject, 25 << 20, 1000);
        let mut buf = BytesMut::from(&msg[..]);
        buf.extend_from_slice(b".\r\n");
        let Feed::Done(Ok(body)) = r.feed(&mut buf) else {
            panic!()
        };
        assert!(
            body.capacity() <= body.len() * 3 / 2 + 2048,
            "{}",
            body.capacity()
        );
    }

    #[test]
    fn stuffing_in_pieces_equals_whole() {
        let parts: [&[u8]; 3] = [b"Received: x\r\n\ty\r\n", b"", b".a\r\nb\r\n..\r\n.\r\nend"];
        let whole = stuff(&parts);
        assert!(whole.ends_with(b"end\r\n.\r\n"));
        for max_out in [1, 3, 10, 1 << 20] {
            let mut out = Vec::new();
            let mut st = Stuffer::default();
            for part in parts {
                let mut rest = part;
                while !rest.is_empty() {
                    let mut piece = Vec::new();
                    let n = st.stuff(rest, &mut piece, max_out);
                    assert!(n > 0);
                    out.extend_from_slice(&piece);
                    rest = &rest[n..];
                }
            }
            st.finish(&mut out);
            assert_eq!(out, whole, "max_out {max_out}");
        }
    }

    #[test]
    fn dates_and_trace() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_795_926_783);
        assert_eq!(rfc5322_date(t), "Sun, 29 Nov 2026 04:33:03 +0000");
        assert_eq!(
            rfc5322_date(std::time::UNIX_EPOCH),
            "Thu, 1 Jan 1970 00:00:00 +0000"
        );
        let h = received_header(&TraceInfo {
            helo: "client.example",
            peer: "192.0.2.1:4567".parse().unwrap(),
            host: "gw.example",
            session_id: "ABC",
            esmtp: true,
            tls: Some(("TLSv1.3", "TLS13_AES_128_GCM_SHA256")),
            rcpt: None,
            now: t,
        });
        assert_eq!(h, "Received: from client.example ([192.0.2.1])\r\n\tby gw.example (mailgate) with ESMTPS\r\n\t(version=TLSv1.3 cipher=TLS13_AES_128_GCM_SHA256)\r\n\tid ABC;\r\n\tSun, 29 Nov 2026 04:33:03 +0000\r\n");
    }
}
