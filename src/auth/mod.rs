//! Mail authentication at the edge: SPF (RFC 7208), DKIM (RFC 6376, RFC 8463),
//! DMARC (RFC 7489 / RFC 9989 as `mail-auth` implements it) and ARC
//! validation (RFC 8617), plus the headers that carry the results to the
//! backend (RFC 8601 `Authentication-Results`, RFC 7208 `Received-SPF`).
//!
//! Shape (same rules as the rest of the crate: only DNS awaits):
//!
//! ```text
//! dns.rs      `dns:` config (DnsFile → DnsSettings), resolver construction
//! cache.rs    bounded DNS cache behind mail-auth's `DnsCache`, per-call lookup
//!             log, DNS/check counters (`DnsStats`)
//! verify.rs   `Verifier`: one shared `MessageAuthenticator`; `spf()` at MAIL
//!             FROM, `message()` after DATA; owned outcome types
//! policy.rs   serde shapes of the policy block (`spf:`, `dkim:`, `dmarc:`,
//!             `arc:`), pure `decide()` → `Verdict`
//! headers.rs  pure header writers and `strip_forged()`
//! worker.rs   the check runtime: the SMTP driver's checks run off the I/O threads
//! ```
//!
//! Pipeline the SMTP driver is expected to run (the order matters):
//! 1. MAIL FROM: [`DnsBudget::new_message`], [`worker::spf`] → [`decide`]
//!    (reject/tempfail before RCPT).
//! 2. After DATA, on the message exactly as received: [`worker::message`]
//!    → [`decide`]. One [`DnsBudget`] per session bounds the DNS queries.
//! 3. [`strip_forged`] on the same bytes (on every listener, checks or not),
//!    then prepend [`authentication_results`] and [`received_spf`].
//!    Verification must run before stripping so that ARC sees the chain as
//!    it arrived.

pub mod cache;
pub mod dns;
pub mod headers;
pub mod policy;
pub mod verify;
pub mod worker;

pub use cache::{DnsBudget, DnsFacts, DnsStats, QueryLimits, Trip};
pub use dns::{DnsFile, DnsSettings};
pub use headers::{authentication_results, authserv_id, received_spf, strip_forged};
pub use policy::{
    decide, decisions, ArcActions, AuthPolicy, DkimActions, DmarcActions, SpfActions, Verdict,
};
pub use verify::{
    verification_copy_len, ArcOutcome, AuthResult, Checks, DkimSignature, DmarcOutcome,
    DmarcPolicy, MessageOutcome, NotChecked, SpfIdentity, SpfOutcome, Verifier, MAX_ARC_SETS,
    MAX_DKIM_SIGNATURES, MAX_SIGNED_FIELDS,
};

/// Errors of this module. Verification itself never fails: DNS trouble,
/// hostile records and broken messages become results (`temperror`,
/// `permerror`, `none`), never errors.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A `dns:` setting is out of range or unparsable.
    #[error("dns: {0}")]
    Config(String),
    /// The system resolver configuration (resolv.conf) could not be read.
    #[error("dns: cannot read the system resolver configuration: {0}")]
    SystemConf(String),
    /// hickory could not build the resolver.
    #[error("dns: cannot build the resolver: {0}")]
    Resolver(String),
    /// A policy block is inconsistent (for example checks without an authserv_id).
    #[error("{0}")]
    Policy(String),
}
