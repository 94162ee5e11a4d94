//! SMTP reply parser for the backend leg, sans-IO and bounded: feed it lines,
//! it says when a (multi-line) reply is complete. Accepts smtp-sink's empty
//! last line (`250 `) and a bare code (`250`).

/// Most lines one reply may have (EHLO replies are the longest in practice).
pub const MAX_LINES: usize = 100;
/// Longest reply line (RFC 5321 §4.5.3.1.5: 512; old servers exceed it).
pub const MAX_LINE: usize = 2048;

#[derive(Debug, Default)]
pub struct ReplyParser {
    code: Option<u16>,
    lines: Vec<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    More,
    Done(u16, Vec<String>),
    Invalid(&'static str),
}

impl ReplyParser {
    pub fn push(&mut self, line: &[u8]) -> Parsed {
        if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
            return Parsed::Invalid("reply does not start with a code");
        }
        let code = u16::from(line[0] - b'0') * 100
            + u16::from(line[1] - b'0') * 10
            + u16::from(line[2] - b'0');
        if !(200..600).contains(&code) {
            return Parsed::Invalid("reply code out of range");
        }
        if self.code.is_some_and(|c| c != code) {
            return Parsed::Invalid("reply lines carry different codes");
        }
        self.code = Some(code);
        let (last, text) = match line.get(3) {
            None => (true, &[][..]),
            Some(b' ') => (true, &line[4..]),
            Some(b'-') => (false, &line[4..]),
            Some(_) => return Parsed::Invalid("bad separator after reply code"),
        };
        self.lines.push(String::from_utf8_lossy(text).into_owned());
        if last {
            let lines = std::mem::take(&mut self.lines);
            self.code = None;
            Parsed::Done(code, lines)
        } else if self.lines.len() >= MAX_LINES {
            Parsed::Invalid("too many reply lines")
        } else {
            Parsed::More
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_multi_and_odd() {
        let mut p = ReplyParser::default();
        assert_eq!(p.push(b"250 ok"), Parsed::Done(250, vec!["ok".into()]));
        assert_eq!(p.push(b"250-sink"), Parsed::More);
        assert_eq!(p.push(b"250-PIPELINING"), Parsed::More);
        assert_eq!(
            p.push(b"250 "),
            Parsed::Done(250, vec!["sink".into(), "PIPELINING".into(), "".into()])
        );
        assert_eq!(p.push(b"354"), Parsed::Done(354, vec!["".into()]));
        assert!(matches!(p.push(b"25"), Parsed::Invalid(_)));
        assert!(matches!(p.push(b"hello"), Parsed::Invalid(_)));
        assert!(matches!(p.push(b"999 x"), Parsed::Invalid(_)));
        assert!(matches!(p.push(b"250x"), Parsed::Invalid(_)));
        let mut p = ReplyParser::default();
        assert_eq!(p.push(b"250-a"), Parsed::More);
        assert!(matches!(p.push(b"550 b"), Parsed::Invalid(_)));
        let mut p = ReplyParser::default();
        let mut last = Parsed::More;
        for _ in 0..MAX_LINES {
            last = p.push(b"250-x");
        }
        assert!(matches!(last, Parsed::Invalid(_)));
    }
}
