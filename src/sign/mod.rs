//! DKIM signing of submitted mail (RFC 6376; `ed25519-sha256`, RFC 8463), so
//! that mail a legacy server relays onward leaves signed and passes DMARC.
//!
//! ```text
//! key.rs      key files: PEM → `SignKey` (RSA ≥ 2048 or Ed25519, errors name
//!             the file), the DNS record of a key, `keygen` (mode 0600, O_EXCL)
//! decide.rs   which keys sign a message, or a refusal, or relay unsigned
//!             (pure: session facts and the header From domain in)
//! signer.rs   the signature fields over the message as the backend receives
//!             it (mail-auth's `DkimSigner`): the usual header set, over-signing
//! ```
//!
//! The driver's order: after DATA and the checks, [`author_domain`] of the
//! message and [`decide`]; a refusal is the session's reply. Then our own
//! header fields are written, and [`sign`] runs over them and the message
//! on the check runtime (`auth/worker.rs`, off the I/O threads); the
//! signature fields are prepended to what goes to the backend.

pub mod decide;
pub mod key;
pub mod signer;

pub use decide::{author_domain, decide, Decision, NotSigned};
pub use key::{
    ascii_domain, generate, keygen, load_key, valid_domain, valid_selector, zone_entry,
    KeyAlgorithm, NewKey, SignKey,
};
pub use signer::{sign, MAX_SIGNED_FIELDS};

use mail_auth::dkim::Canonicalization;
use schemars::JsonSchema;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

/// What a `dkim_sign` block does with an authenticated message whose header
/// From domain has no key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum UnknownDomain {
    /// Refuse the message (`550 5.7.1`).
    Reject,
    /// Relay it unsigned.
    Pass,
}

impl UnknownDomain {
    pub const fn as_str(self) -> &'static str {
        match self {
            UnknownDomain::Reject => "reject",
            UnknownDomain::Pass => "pass",
        }
    }
}

/// A validated `dkim_sign` block: the keys (loaded), and how to sign.
#[derive(Debug, Clone)]
pub struct SignPolicy {
    /// In configuration order; several keys of one domain all sign (dual signing).
    pub keys: Vec<Arc<SignKey>>,
    pub unknown_domain: UnknownDomain,
    /// The envelope sender's (MAIL FROM) domain must have a key too.
    pub match_envelope_sender: bool,
    /// (header, body) canonicalization, `c=`.
    pub canonicalization: (Canonicalization, Canonicalization),
    /// Signature lifetime (`x=`); none: no expiry.
    pub expiry: Option<Duration>,
}

impl SignPolicy {
    /// Whether `domain` (compared case-insensitively) has a key.
    pub fn signs_for(&self, domain: &str) -> bool {
        self.keys
            .iter()
            .any(|k| k.domain.eq_ignore_ascii_case(domain))
    }

    /// `c=` as written in the configuration and the signature.
    pub fn canonicalization_str(&self) -> String {
        let name = |c: Canonicalization| match c {
            Canonicalization::Relaxed => "relaxed",
            Canonicalization::Simple => "simple",
        };
        format!(
            "{}/{}",
            name(self.canonicalization.0),
            name(self.canonicalization.1)
        )
    }

    /// One line for `mailgate check`.
    pub fn describe(&self) -> String {
        let keys: Vec<String> = self
            .keys
            .iter()
            .map(|k| format!("{}/{} ({})", k.domain, k.selector, k.algorithm))
            .collect();
        format!(
            "dkim_sign: {}; c={}{}; unknown domain: {}{}",
            keys.join(", "),
            self.canonicalization_str(),
            self.expiry
                .map(|x| format!(", x= after {}s", x.as_secs()))
                .unwrap_or_default(),
            self.unknown_domain.as_str(),
            if self.match_envelope_sender {
                "; the envelope sender's domain must have a key too"
            } else {
                ""
            }
        )
    }
}

/// Why `dkim_sign` does not let a message go on (the session's reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `unknown_domain: reject` and the message is not one we sign.
    UnknownDomain,
    /// More header fields to sign than [`MAX_SIGNED_FIELDS`].
    TooManyFields(usize),
    /// The signing could not run or failed: try again later.
    NotSigned,
}

impl Refusal {
    /// The `reason` label of `dkim_sign_refusals_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::UnknownDomain => "unknown_domain",
            Refusal::TooManyFields(_) => "too_many_fields",
            Refusal::NotSigned => "not_signed",
        }
    }

    /// The refusal for a signing that returned `e`.
    pub fn of(e: &SignError) -> Refusal {
        match e {
            SignError::TooManyFields(n) => Refusal::TooManyFields(*n),
            _ => Refusal::NotSigned,
        }
    }
}

/// Errors of key files, key generation and signing. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// A key file that cannot be used; `path` as configured or given.
    #[error("{path}: {reason}")]
    Key { path: String, reason: String },
    /// Reading or writing a key file.
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// `keygen` never replaces a key file.
    #[error("{0}: already exists; not overwritten (choose another --out or selector)")]
    Exists(String),
    /// More header fields to sign than a verifier is expected to check.
    #[error("{0} header fields to sign (at most {MAX_SIGNED_FIELDS})")]
    TooManyFields(usize),
    /// The crypto library refused (not expected with a key that loaded).
    #[error("signing failed: {0}")]
    Failed(String),
    /// The signing could not run (the check runtime was busy or too late).
    #[error("not signed: {0}")]
    NotRun(&'static str),
}
