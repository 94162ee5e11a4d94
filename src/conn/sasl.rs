//! SASL PLAIN (RFC 4616) as every protocol's login receives it: the strict
//! base64 (RFC 4648 §4) of its response and the decoding into credentials,
//! with the name and password rules all logins share (POP3 `AUTH PLAIN`,
//! IMAP `AUTHENTICATE PLAIN`).

use std::fmt;

/// Longest password mailgate passes to a backend.
pub const MAX_PASS: usize = 255;

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
