//! The SMTP transaction vocabulary both legs share: the MAIL parameters a
//! client asked for (parsed in `smtp/command.rs`, passed on by
//! `backend/smtp.rs` where the backend announced them) and dot-stuffing
//! (RFC 5321 §4.5.2) of the message on its way to the backend. A leaf, so
//! that neither side depends on the other for these.

/// MAIL FROM parameters mailgate accepts (RFC 1870 SIZE, RFC 6152 BODY,
/// RFC 6531 SMTPUTF8).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailParams {
    pub size: Option<u64>,
    pub body: Option<Body>,
    pub smtputf8: bool,
}

/// `BODY=` (RFC 6152).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    SevenBit,
    EightBitMime,
}

/// Dot-stuffing for the backend, a piece at a time: every line starting with
/// `.` gets another. The input is guaranteed CRLF-only (the receiver made it
/// so), so no other sequence can end the message early at the backend. The
/// state carries over between calls, so a message in several parts (our
/// headers, then the body) and in several chunks comes out as one.
#[derive(Debug)]
pub struct Stuffer {
    /// At the beginning of a line.
    bol: bool,
}

impl Default for Stuffer {
    fn default() -> Self {
        Stuffer { bol: true }
    }
}

impl Stuffer {
    /// Appends the stuffed form of whole lines of `input` to `out` until `out`
    /// holds at least `max_out` bytes (one line may go past it); returns how
    /// many input bytes were used.
    pub fn stuff(&mut self, input: &[u8], out: &mut Vec<u8>, max_out: usize) -> usize {
        // whole lines at a time (memchr), not byte by byte: this is the hot
        // loop of every message (a profile showed a third of the relay's
        // instructions here when it pushed single bytes)
        let mut used = 0;
        while used < input.len() && out.len() < max_out {
            let rest = &input[used..];
            if self.bol && rest[0] == b'.' {
                out.push(b'.');
            }
            let n = match memchr::memchr(b'\n', rest) {
                Some(i) => {
                    self.bol = true;
                    i + 1
                }
                None => {
                    self.bol = false;
                    rest.len()
                }
            };
            out.extend_from_slice(&rest[..n]);
            used += n;
        }
        used
    }

    /// The end of the message: a CRLF if the last line lacked one, then `.CRLF`.
    pub fn finish(self, out: &mut Vec<u8>) {
        if !self.bol {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pieces and chunk limits give the same wire form as one call.
    #[test]
    fn stuffing_carries_over_between_pieces() {
        let mut st = Stuffer::default();
        let mut out = Vec::new();
        let input = b"a\r\n.b\r\n";
        let used = st.stuff(input, &mut out, 1);
        assert_eq!(used, 3, "one whole line past max_out");
        st.stuff(&input[used..], &mut out, usize::MAX);
        st.stuff(b".", &mut out, usize::MAX);
        st.finish(&mut out);
        assert_eq!(out, b"a\r\n..b\r\n..\r\n.\r\n");
    }
}
