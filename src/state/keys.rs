//! Key naming in the store. Every key is `prefix` + a one-letter kind + the
//! rule's id + a digest of the key's values, so:
//! - instances with the same configuration meet on the same keys (no
//!   process-random hash, unlike the in-process maps),
//! - a changed rule gets new keys (it starts fresh, as in process), and its
//!   old keys expire by their TTL,
//! - client-sent text never reaches the store: key length is fixed whatever
//!   a HELO or address holds.

use aws_lc_rs::digest::{digest as sha256, SHA256};

/// What a key holds (its letter after the prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// GCRA arrival time (a string, µs).
    Rate,
    /// Session leases (sorted set of lease ids by expiry).
    Lease,
    /// Failed logins (sorted set of failures by time).
    Failures,
    /// A (user, network) pair that logged in (a string, ms).
    KnownGood,
}

impl KeyKind {
    fn letter(self) -> char {
        match self {
            KeyKind::Rate => 'r',
            KeyKind::Lease => 'c',
            KeyKind::Failures => 'f',
            KeyKind::KnownGood => 'g',
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// 16 hex digits naming a rule: a digest of its fingerprint (policy name,
/// rule name and definition; `policy::state` builds it).
pub fn rule_id(fingerprint: &str) -> String {
    hex(&sha256(&SHA256, fingerprint.as_bytes()).as_ref()[..8])
}

/// 32 hex digits naming a key's values (separated so that `ab`,`c` and
/// `a`,`bc` differ).
pub fn digest(parts: &[&str]) -> String {
    let mut buf = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for p in parts {
        buf.extend_from_slice(p.as_bytes());
        buf.push(0xff);
    }
    hex(&sha256(&SHA256, &buf).as_ref()[..16])
}

/// The key of a rule's limiter for these values.
pub fn limiter(prefix: &str, kind: KeyKind, rule_id: &str, parts: &[&str]) -> String {
    format!("{prefix}{}:{rule_id}:{}", kind.letter(), digest(parts))
}

/// The known-good key of a (user, network) pair (shared by all policies).
pub fn known_good(prefix: &str, parts: &[&str]) -> String {
    format!("{prefix}{}:{}", KeyKind::KnownGood.letter(), digest(parts))
}

/// A named TTL set (`s:` + name; the name is the caller's constant, such as
/// `bans`, never client text). Its values live in the hash `<key>:v`.
pub fn ttl_set(prefix: &str, name: &str) -> String {
    format!("{prefix}s:{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_prefixed_fixed_length_and_separated() {
        let id = rule_id("p\u{1}conn\u{1}[Ip]");
        assert_eq!(id.len(), 16);
        assert_eq!(id, rule_id("p\u{1}conn\u{1}[Ip]"), "stable across calls");
        assert_ne!(id, rule_id("p\u{1}conn\u{1}[IpPrefix]"));
        let k = limiter("mailgate:", KeyKind::Rate, &id, &["192.0.2.1"]);
        assert!(k.starts_with(&format!("mailgate:r:{id}:")), "{k}");
        assert_eq!(k.len(), "mailgate:r:".len() + 16 + 1 + 32);
        let long = "x".repeat(10_000);
        assert_eq!(
            limiter("mailgate:", KeyKind::Rate, &id, &[&long]).len(),
            k.len(),
            "client text does not grow keys"
        );
        assert_ne!(digest(&["ab", "c"]), digest(&["a", "bc"]));
        assert_ne!(
            limiter("m:", KeyKind::Rate, &id, &["a"]),
            limiter("m:", KeyKind::Lease, &id, &["a"])
        );
        assert!(known_good("m:", &["alice", "192.0.2.0/24"]).starts_with("m:g:"));
        assert_eq!(ttl_set("m:", "bans"), "m:s:bans");
        // a known digest, so that instances built apart agree
        assert_eq!(digest(&[]), hex(&sha256(&SHA256, b"").as_ref()[..16]));
    }
}
