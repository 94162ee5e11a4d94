//! The `DKIM-Signature` fields of one message, by mail-auth's `DkimSigner`.
//!
//! Signed header fields (RFC 6376 §5.4.1's recommendation and the fields
//! that carry meaning for the reader): every occurrence present of
//! [`SIGNED`]; [`OVER_SIGNED`] (From, To, Subject, Date) are also signed
//! once more than they occur, so a copy added on the way (a second From
//! shown by a lax reader) breaks the signature (§8.15). Fields added by
//! relays (`Received`, `Return-Path`, `Delivered-To`) are not signed.

use super::{SignError, SignKey, SignPolicy};
use mail_auth::crypto::{Algorithm, Sha256, SigningKey};
use mail_auth::dkim::DkimSigner;
use mail_auth::headers::{HeaderWriter as _, Writable};
use std::sync::Arc;

/// Signed when present.
pub const SIGNED: &[&str] = &[
    "From",
    "Sender",
    "Reply-To",
    "Subject",
    "Date",
    "Message-ID",
    "To",
    "Cc",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Content-ID",
    "Content-Description",
    "In-Reply-To",
    "References",
    "Resent-Date",
    "Resent-From",
    "Resent-Sender",
    "Resent-To",
    "Resent-Cc",
    "Resent-Message-ID",
    "List-Id",
    "List-Help",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "List-Subscribe",
    "List-Post",
    "List-Owner",
    "List-Archive",
];

/// Signed once more than present (once when absent): none can be added.
pub const OVER_SIGNED: &[&str] = &["From", "To", "Subject", "Date"];

/// `h=` entries of one signature, at most: mailgate's own verifier leaves
/// signatures over more fields unverified (`MAX_SIGNED_FIELDS` in
/// `auth/verify.rs`, the same number), and so may others.
pub const MAX_SIGNED_FIELDS: usize = 64;

/// A [`SignKey`] lent to one signer: mail-auth's signer owns its key, ours
/// are shared by every session of the configuration snapshot.
struct Lent(Arc<SignKey>);

impl SigningKey for Lent {
    type Hasher = Sha256;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        self.0.key.sign(input)
    }

    fn algorithm(&self) -> Algorithm {
        self.0.key.algorithm()
    }
}

/// The `DKIM-Signature` fields (CRLF-terminated, to be prepended in this
/// order) by each of `keys` over the message `parts` read as one (our own
/// header fields, then the message as received). Every part but the last
/// ends at a line end. Pure CPU work (hashing the body per key): the driver
/// runs it on the check runtime.
pub fn sign(p: &SignPolicy, keys: &[Arc<SignKey>], parts: &[&[u8]]) -> Result<String, SignError> {
    let (names, fields) = header_list(parts);
    if fields > MAX_SIGNED_FIELDS {
        return Err(SignError::TooManyFields(fields));
    }
    let mut out = String::new();
    for key in keys {
        let mut signer = DkimSigner::from_key(Lent(key.clone()))
            .domain(key.domain.clone())
            .selector(key.selector.clone())
            .headers(names.iter().copied())
            .header_canonicalization(p.canonicalization.0)
            .body_canonicalization(p.canonicalization.1);
        if let Some(x) = p.expiry {
            signer = signer.expiration(x);
        }
        let sig = signer
            .sign_chained(parts.iter().copied())
            .map_err(|e| SignError::Failed(format!("{}: {e}", key.name())))?;
        out.push_str(&sig.to_header());
    }
    Ok(out)
}

/// The names handed to mail-auth (which signs every occurrence of a listed
/// name and lists an absent one once) and the number of `h=` entries that
/// makes: [`SIGNED`] names present, [`OVER_SIGNED`] names twice when present.
fn header_list(parts: &[&[u8]]) -> (Vec<&'static str>, usize) {
    let mut count = vec![0usize; SIGNED.len()];
    'parts: for part in parts {
        for line in part.split_inclusive(|&b| b == b'\n') {
            if line == b"\r\n" || line == b"\n" {
                break 'parts;
            }
            if matches!(line.first(), Some(b' ' | b'\t')) {
                continue;
            }
            let Some(colon) = memchr::memchr(b':', line) else {
                continue;
            };
            let name = line[..colon].trim_ascii();
            if let Some(i) = SIGNED
                .iter()
                .position(|s| s.as_bytes().eq_ignore_ascii_case(name))
            {
                count[i] += 1;
            }
        }
    }
    let mut names = Vec::new();
    let mut fields = 0;
    for (i, name) in SIGNED.iter().enumerate() {
        let over = OVER_SIGNED.contains(name);
        if count[i] > 0 {
            names.push(*name);
            fields += count[i];
        }
        if over {
            names.push(*name);
            fields += 1;
        }
    }
    (names, fields)
}

#[cfg(test)]
mod tests {
    use super::super::key::{generate, load_key, write_new};
    use super::super::UnknownDomain;
    use super::*;
    use mail_auth::dkim::Canonicalization;
    use mail_auth::AuthenticatedMessage;
    use std::time::Duration;

    fn policy(expiry: Option<Duration>) -> SignPolicy {
        let dir = tempfile::tempdir().unwrap();
        let mut keys = Vec::new();
        for (selector, bits) in [("rsa", Some(2048)), ("ed", None)] {
            let p = dir.path().join(format!("{selector}.pem"));
            write_new(&p, &generate(bits).unwrap().pem).unwrap();
            keys.push(load_key("example.org", selector, &p).unwrap());
        }
        SignPolicy {
            keys,
            unknown_domain: UnknownDomain::Reject,
            match_envelope_sender: false,
            canonicalization: (Canonicalization::Relaxed, Canonicalization::Relaxed),
            expiry,
        }
    }

    const OURS: &[u8] = b"Received: from client by gw; Tue, 1 Dec 2026 12:00:00 +0000\r\nAuthentication-Results: gw; spf=pass\r\n";
    const MESSAGE: &[u8] = b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nCc: carol@example.net,\r\n dave@example.net\r\nSubject: hi\r\nX-Mailer: test\r\nMessage-ID: <1@example.org>\r\n\r\nHello.\r\n.dot line\r\n";

    fn signatures(fields: &str, parts: &[&[u8]]) -> Vec<mail_auth::dkim::Signature> {
        let mut whole = fields.as_bytes().to_vec();
        for p in parts {
            whole.extend_from_slice(p);
        }
        let m = AuthenticatedMessage::parse(&whole).unwrap();
        m.dkim_signatures()
            .iter()
            .map(|h| h.header.clone())
            .collect()
    }

    #[test]
    fn each_key_signs_the_usual_fields_and_over_signs_four() {
        let p = policy(None);
        let parts: &[&[u8]] = &[OURS, MESSAGE];
        let fields = sign(&p, &p.keys, parts).unwrap();
        assert_eq!(fields.matches("DKIM-Signature:").count(), 2, "{fields}");
        assert!(fields.ends_with("\r\n") && !fields.contains("\r\n\r\n"));
        let sigs = signatures(&fields, parts);
        assert_eq!(sigs.len(), 2);
        let algorithms: Vec<Algorithm> = sigs.iter().map(|s| s.a).collect();
        assert_eq!(algorithms, [Algorithm::RsaSha256, Algorithm::Ed25519Sha256]);
        for s in &sigs {
            assert_eq!((s.d.as_str(), s.x, s.l), ("example.org", 0, 0));
            assert_eq!(
                (s.ch, s.cb),
                (Canonicalization::Relaxed, Canonicalization::Relaxed)
            );
            let h: Vec<String> = s.h.iter().map(|n| n.to_ascii_lowercase()).collect();
            let count = |n: &str| h.iter().filter(|x| *x == n).count();
            // present and over-signed: once more than present
            assert_eq!(
                (count("from"), count("to"), count("subject")),
                (2, 2, 2),
                "{h:?}"
            );
            // absent and over-signed: once, so that none can be added
            assert_eq!(count("date"), 1, "{h:?}");
            // present: signed once; absent ones not listed
            assert_eq!((count("cc"), count("message-id")), (1, 1), "{h:?}");
            for unsigned in [
                "received",
                "authentication-results",
                "x-mailer",
                "reply-to",
                "list-id",
            ] {
                assert_eq!(count(unsigned), 0, "{unsigned} in {h:?}");
            }
        }
        let selectors: Vec<&str> = sigs.iter().map(|s| s.s.as_str()).collect();
        assert_eq!(selectors, ["rsa", "ed"]);
    }

    #[test]
    fn expiry_and_canonicalization_are_written() {
        let mut p = policy(Some(Duration::from_secs(7 * 86400)));
        p.canonicalization = (Canonicalization::Simple, Canonicalization::Simple);
        let parts: &[&[u8]] = &[MESSAGE];
        let sigs = signatures(&sign(&p, &p.keys[1..], parts).unwrap(), parts);
        assert_eq!(sigs.len(), 1);
        assert_eq!(sigs[0].x, sigs[0].t + 7 * 86400);
        assert_eq!(
            (sigs[0].ch, sigs[0].cb),
            (Canonicalization::Simple, Canonicalization::Simple)
        );
    }

    /// What a verifier would leave unverified is not signed: the client
    /// hears why instead.
    #[test]
    fn too_many_fields_to_sign_is_an_error() {
        let p = policy(None);
        let mut m = Vec::new();
        for i in 0..MAX_SIGNED_FIELDS {
            m.extend_from_slice(format!("To: r{i}@example.net\r\n").as_bytes());
        }
        m.extend_from_slice(b"From: alice@example.org\r\n\r\nbody\r\n");
        let e = sign(&p, &p.keys, &[&m]).unwrap_err();
        assert!(
            matches!(e, SignError::TooManyFields(n) if n > MAX_SIGNED_FIELDS),
            "{e}"
        );
        // the body is never read for names
        let (_, fields) = header_list(&[b"From: a@example.org\r\n\r\nTo: x\r\nCc: y\r\n"]);
        assert_eq!(fields, 2 + 1 + 1 + 1);
    }
}
