//! Which keys sign a message (pure): only authenticated sessions are signed,
//! and only for the header From domain (the DMARC author domain, RFC 7489
//! §3.1.1) when a key of that domain is configured; the block's
//! `unknown_domain` says whether other authenticated mail is refused or
//! relayed unsigned. Unauthenticated sessions (MX) are never signed nor
//! refused here.

use super::{SignKey, SignPolicy, UnknownDomain};
use std::sync::Arc;

/// What to do with one message.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Sign with these keys (every key of the author domain: dual signing).
    Sign(Vec<Arc<SignKey>>),
    /// `unknown_domain: reject` and the message is not one we sign.
    Refuse,
    /// Relay unsigned, because…
    Pass(NotSigned),
}

/// Why a message goes on unsigned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotSigned {
    /// No AUTH in this session: mail from elsewhere is not ours to sign.
    Unauthenticated,
    /// `unknown_domain: pass` and the author domain (or the envelope
    /// sender's, with `match_envelope_sender`) has no key.
    UnknownDomain,
}

impl NotSigned {
    pub fn as_str(self) -> &'static str {
        match self {
            NotSigned::Unauthenticated => "unauthenticated",
            NotSigned::UnknownDomain => "unknown domain",
        }
    }
}

/// The decision for a message of a session logged in as `auth_user`, whose
/// header From domain is `author` ([`author_domain`]) and whose envelope
/// sender is `mail_from` (without angle brackets; empty for `<>`).
pub fn decide(
    p: &SignPolicy,
    auth_user: Option<&str>,
    author: Option<&str>,
    mail_from: &str,
) -> Decision {
    if auth_user.is_none() {
        return Decision::Pass(NotSigned::Unauthenticated);
    }
    let envelope_ok = || {
        !p.match_envelope_sender
            || mail_from
                .rsplit_once('@')
                .and_then(|(_, d)| super::ascii_domain(d))
                .is_some_and(|d| p.signs_for(&d))
    };
    match author {
        Some(d) if p.signs_for(d) && envelope_ok() => Decision::Sign(
            p.keys
                .iter()
                .filter(|k| k.domain.eq_ignore_ascii_case(d))
                .cloned()
                .collect(),
        ),
        _ => match p.unknown_domain {
            UnknownDomain::Reject => Decision::Refuse,
            UnknownDomain::Pass => Decision::Pass(NotSigned::UnknownDomain),
        },
    }
}

/// The author domain of `message` (its header block is read, the body never):
/// the domain of the header From's addresses (lowercase, in A-labels: a
/// SMTPUTF8 message's `bücher.example` is `xn--bcher-kva.example`, as keys
/// are named and receivers align, RFC 8616 §3-4), when there is
/// exactly one From field and all its addresses are of one domain. `None`
/// otherwise (no From, several From fields, mixed domains, unparsable), which
/// no key matches: RFC 5322 §3.6 allows one From field, and DMARC cannot
/// tell whose message such a one is.
///
/// The addresses are read by mail-auth's parser (mail-parser), as DMARC
/// verification reads them, so the domain we sign for is the one
/// receivers align against.
pub fn author_domain(message: &[u8]) -> Option<String> {
    let end = header_end(message);
    let header = &message[..end];
    let parsed = mail_auth::AuthenticatedMessage::parse(header)?;
    // counted on the raw lines, as the signer counts them (`signer.rs`):
    // mail-parser's header block ends early at a line without a colon, and
    // a From after it would not be counted
    if from_fields(header) != 1 {
        return None;
    }
    // compared as keys are named: `Example.org` and `example.org`, or a
    // U-label and its A-label, are one domain
    let mut domains = parsed
        .from_addresses()
        .iter()
        .map(|a| a.rsplit_once('@').and_then(|(_, d)| super::ascii_domain(d)));
    let first = domains.next()??;
    if first.is_empty() || domains.any(|d| d.as_deref() != Some(first.as_str())) {
        return None;
    }
    Some(first)
}

/// The From fields of a header block: every line that does not continue a
/// field and names From before its colon.
fn from_fields(header: &[u8]) -> usize {
    header
        .split_inclusive(|&b| b == b'\n')
        .filter(|line| !matches!(line.first(), Some(b' ' | b'\t')))
        .filter_map(|line| memchr::memchr(b':', line).map(|colon| &line[..colon]))
        .filter(|name| name.trim_ascii().eq_ignore_ascii_case(b"From"))
        .count()
}

/// The length of the header block of `message` including the empty line
/// that ends it (the whole message when it has no body).
pub(super) fn header_end(message: &[u8]) -> usize {
    if message.starts_with(b"\r\n") {
        return 2;
    }
    memchr::memmem::find(message, b"\r\n\r\n").map_or(message.len(), |i| i + 4)
}

#[cfg(test)]
mod tests {
    use super::super::key::{generate, load_key, write_new};
    use super::*;
    use mail_auth::dkim::Canonicalization;

    fn policy(unknown_domain: UnknownDomain, match_envelope_sender: bool) -> SignPolicy {
        let dir = tempfile::tempdir().unwrap();
        let mut keys = Vec::new();
        for (domain, selector, bits) in [
            ("example.org", "rsa", Some(2048)),
            ("example.org", "ed", None),
            ("other.example", "ed", None),
            ("xn--bcher-kva.example", "ed", None),
        ] {
            let p = dir.path().join(format!("{domain}.{selector}.pem"));
            write_new(&p, &generate(bits).unwrap().pem).unwrap();
            keys.push(load_key(domain, selector, &p).unwrap());
        }
        SignPolicy {
            keys,
            unknown_domain,
            match_envelope_sender,
            canonicalization: (Canonicalization::Relaxed, Canonicalization::Relaxed),
            expiry: None,
        }
    }

    fn names(d: &Decision) -> String {
        match d {
            Decision::Sign(keys) => keys.iter().map(|k| k.name()).collect::<Vec<_>>().join(","),
            Decision::Refuse => "refuse".into(),
            Decision::Pass(why) => format!("pass: {}", why.as_str()),
        }
    }

    #[test]
    fn only_authenticated_mail_of_a_configured_domain_is_signed() {
        let reject = policy(UnknownDomain::Reject, false);
        let pass = SignPolicy {
            unknown_domain: UnknownDomain::Pass,
            ..reject.clone()
        };
        let user = Some("alice");
        for (p, auth, author, from, want) in [
            // every key of the author domain: dual signing
            (
                &reject,
                user,
                Some("example.org"),
                "alice@example.org",
                "example.org/rsa,example.org/ed",
            ),
            (
                &reject,
                user,
                Some("EXAMPLE.org"),
                "",
                "example.org/rsa,example.org/ed",
            ),
            (
                &reject,
                user,
                Some("other.example"),
                "x@elsewhere.example",
                "other.example/ed",
            ),
            // no subdomains, no parents
            (
                &reject,
                user,
                Some("sub.example.org"),
                "alice@example.org",
                "refuse",
            ),
            (&reject, user, Some("org"), "alice@example.org", "refuse"),
            (&reject, user, None, "alice@example.org", "refuse"),
            (
                &pass,
                user,
                Some("elsewhere.example"),
                "alice@example.org",
                "pass: unknown domain",
            ),
            (
                &pass,
                user,
                None,
                "alice@example.org",
                "pass: unknown domain",
            ),
            // MX: never signed, never refused, whatever the domain
            (
                &reject,
                None,
                Some("example.org"),
                "alice@example.org",
                "pass: unauthenticated",
            ),
            (
                &pass,
                None,
                Some("elsewhere.example"),
                "",
                "pass: unauthenticated",
            ),
        ] {
            assert_eq!(
                names(&decide(p, auth, author, from)),
                want,
                "{auth:?} {author:?} {from}"
            );
        }
    }

    #[test]
    fn match_envelope_sender_requires_a_key_for_mail_from_too() {
        let p = policy(UnknownDomain::Reject, true);
        let user = Some("alice");
        for (from, want) in [
            ("alice@example.org", "example.org/rsa,example.org/ed"),
            // another domain of ours will do (bounces go where the sender wants)
            ("bounces@Other.Example", "example.org/rsa,example.org/ed"),
            ("alice@elsewhere.example", "refuse"),
            ("", "refuse"),
            // a SMTPUTF8 sender's domain, in A-labels as keys are named
            ("jörg@bücher.example", "example.org/rsa,example.org/ed"),
            ("jörg@bücher.test", "refuse"),
        ] {
            assert_eq!(
                names(&decide(&p, user, Some("example.org"), from)),
                want,
                "{from}"
            );
        }
    }

    #[test]
    fn the_author_domain_is_read_from_the_one_from_field() {
        for (header, want) in [
            (
                "From: Alice <alice@Example.ORG>\r\nTo: b@x.example\r\n\r\nbody",
                Some("example.org"),
            ),
            ("from:alice@example.org\r\n\r\n", Some("example.org")),
            // folded, with comments and a display name holding another address
            (
                "Subject: x\r\nFrom: \"bob@evil.example\"\r\n (c) <alice@example.org>\r\n\r\n",
                Some("example.org"),
            ),
            (
                "From: a@example.org, b@example.org\r\n\r\n",
                Some("example.org"),
            ),
            ("From: undisclosed:;\r\n\r\n", None),
            ("From: a@example.org, b@evil.example\r\n\r\n", None),
            ("From: a@example.org\r\nFrom: b@example.org\r\n\r\n", None),
            // a line without a colon ends mail-parser's header block early;
            // the second From is still a field to readers and to the signer
            (
                "From: <a@example.org>\r\nX\r\nFrom: b@evil.example\r\n\r\n",
                None,
            ),
            ("To: a@example.org\r\n\r\n", None),
            ("From: no address here\r\n\r\n", None),
            // the body is never read
            ("Subject: x\r\n\r\nFrom: alice@example.org\r\n", None),
            ("\r\nFrom: alice@example.org\r\n", None),
            ("From: alice@example.org\r\n", Some("example.org")),
            // one domain, however it is spelt
            (
                "From: a@Example.org, b@example.ORG\r\n\r\n",
                Some("example.org"),
            ),
            // SMTPUTF8 (RFC 6532): an internationalised domain in A-labels
            // (RFC 8616), as keys are named and receivers align
            (
                "From: Jörg <jörg@Bücher.example>\r\n\r\n",
                Some("xn--bcher-kva.example"),
            ),
            (
                "From: a@bücher.example, b@xn--bcher-kva.example\r\n\r\n",
                Some("xn--bcher-kva.example"),
            ),
            // IDNA refuses it: no domain, no key
            ("From: a@b\u{fffd}cher.example\r\n\r\n", None),
        ] {
            assert_eq!(
                author_domain(header.as_bytes()).as_deref(),
                want,
                "{header:?}"
            );
        }
    }

    /// An authenticated client's From list of names too long for the DNS,
    /// filling the 1 MiB header block (`smtp/data.rs`), costs about what
    /// parsing it costs: none reaches IDNA's Punycode, quadratic in a
    /// label's length (11 s of a runtime thread in a debug build before).
    #[test]
    fn a_from_list_of_overlong_names_is_cheap() {
        let label: String = (0..1000u32)
            .map(|i| char::from_u32(0x4e00 + i).unwrap())
            .collect();
        let addr = format!("a@{label}.example,\r\n ");
        let mut h = String::from("From: ");
        while h.len() + addr.len() < 1_000_000 {
            h.push_str(&addr);
        }
        h.push_str("a@example.org\r\n\r\n");
        let started = std::time::Instant::now();
        assert_eq!(author_domain(h.as_bytes()), None);
        let took = started.elapsed();
        assert!(took < std::time::Duration::from_secs(3), "{took:?}");
    }
}
