//! The DATA path, sans-IO.
//!
//! [`DataReceiver`] consumes client bytes after the 354 and ends the message
//! **only** on `<CRLF>.<CRLF>`: a `.` line counts as the end only when the line
//! before it ended in CRLF and the dot line itself ends in CRLF. Every other
//! look-alike (`\n.\n`, `\r.\r`, `\n.\r\n`, NUL tricks — the SMTP smuggling
//! variants) is message content, which is then either rejected (bare CR / bare
//! LF / NUL) or normalised to CRLF before anything reaches the backend. The
//! stored body is dot-unstuffed; [`stuff`] re-stuffs it for the backend, after
//! normalising, so no end-of-data look-alike can survive the hop.

use crate::config::BareNewlines;
use bytes::BytesMut;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    BareNewline,
    Nul,
    LineTooLong,
    TooBig,
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
    /// Whether the previous line ended in CRLF (true at the start: DATA's CRLF).
    prev_crlf: bool,
    /// A partial overlong line is being skipped.
    skipping: bool,
    violation: Option<Violation>,
    /// Bare CR, bare LF or NUL was seen (in either mode).
    tainted: bool,
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
            prev_crlf: true,
            skipping: false,
            violation: None,
            tainted: false,
            received: 0,
        }
    }

    fn flag(&mut self, v: Violation) {
        // the first violation decides the reply; drop the body to free memory
        if self.violation.is_none() {
            self.violation = Some(v);
            self.body = Vec::new();
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
                    let _ = buf.split_to(n);
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
                    self.body.extend_from_slice(piece);
                    self.body.extend_from_slice(b"\r\n");
                }
            } else {
                self.body.extend_from_slice(content);
                self.body.extend_from_slice(b"\r\n");
            }
            if self.body.len() as u64 > self.max_size {
                self.flag(Violation::TooBig);
            }
        }
    }
}

/// Dot-stuffs `parts` (each a CRLF-normalised text) into the wire form sent after
/// the backend's 354, including the final `.CRLF`. Every line starting with `.`
/// gets another; the input is guaranteed CRLF-only, so no other sequence can
/// end the message early at the backend.
pub fn stuff(parts: &[&[u8]]) -> Vec<u8> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(total + total / 64 + 8);
    // whole lines at a time (memchr), not byte by byte: this is the hot
    // loop of every message (a profile showed a third of the relay's
    // instructions here when it pushed single bytes)
    let mut bol = true;
    for part in parts {
        let mut rest: &[u8] = part;
        while let Some(&first) = rest.first() {
            if bol && first == b'.' {
                out.push(b'.');
            }
            match memchr::memchr(b'\n', rest) {
                Some(i) => {
                    out.extend_from_slice(&rest[..=i]);
                    rest = &rest[i + 1..];
                    bol = true;
                }
                None => {
                    out.extend_from_slice(rest);
                    rest = &[];
                    bol = false;
                }
            }
        }
    }
    if !bol {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
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
            tls: Some(("TLSv1.3", "TLS13_AES_256_GCM_SHA384")),
            rcpt: None,
            now: t,
        });
        assert_eq!(h, "Received: from client.example ([192.0.2.1])\r\n\tby gw.example (mailgate) with ESMTPS\r\n\t(version=TLSv1.3 cipher=TLS13_AES_256_GCM_SHA384)\r\n\tid ABC;\r\n\tSun, 29 Nov 2026 04:33:03 +0000\r\n");
    }
}
