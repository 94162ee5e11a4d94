//! The [`Verifier`]: one `MessageAuthenticator` for the process, the bounded
//! DNS cache, and the translation of mail-auth's borrowed outputs into owned
//! outcome values that the policy and header code (both pure) consume.
//!
//! Deliberate deviations from what mail-auth reports, each tested below:
//! * **Client-controlled odd names never defer mail.** An SPF identity that is
//!   not a valid multi-label domain (address-literal HELO `[192.0.2.1]`,
//!   `OEMCOMPUTER`, empty or over-long labels, an all-numeric top label) is
//!   `none` without any DNS query (RFC 7208 §4.3); mail-auth would query it
//!   and report what hickory makes of it. When a check ends in `temperror` at
//!   a query for a name that is not a valid DNS name (a macro expanded to
//!   garbage, a `d=` such as `legitimate.com(.attacker.com`), the result is
//!   `permerror` instead: no retry can ever succeed, and a `temperror` would
//!   make the sender queue the message for days.
//! * **DKIM body-hash mismatch and expiry are `fail`**, not mail-auth's
//!   `neutral` (RFC 6376 §6.1: both are PERMFAIL; operators expect a tampered
//!   body to read `dkim=fail`).
//! * **A check that panics inside mail-auth** (hostile input hitting a bug) is
//!   caught and reported as `permerror`, so one message cannot take a session
//!   task down with it.
//! * **Every check is bounded** by [`DnsSettings::check_deadline`]; a check cut
//!   off there is `temperror`.
//! * **DNS work is bounded** by the gate of `cache.rs`: per-session and
//!   per-transaction query budgets ([`DnsBudget`]), the RFC 7208 §4.6.4 void
//!   lookup limit, and oversized records. A check the gate cut short ends in
//!   `temperror` marked [`NotChecked`] (session budget: the policy answers
//!   with a tempfail) or `permerror` (everything else), logged.
//! * **Verification work is bounded** before mail-auth sees the message: at
//!   most [`MAX_DKIM_SIGNATURES`] DKIM signatures are verified (later ones are
//!   reported as one `neutral` "not verified" result), a signature signing
//!   more than [`MAX_SIGNED_FIELDS`] fields is `permerror` without being
//!   verified, and an ARC chain of more than [`MAX_ARC_SETS`] sets (or with an
//!   ARC-Message-Signature over the field limit) is `fail` without being
//!   validated. mail-auth hashes and canonicalises per signature, so this is
//!   what bounds the CPU of one message; the dropped signature fields are
//!   removed from a copy of the header block mail-auth parses (the body is
//!   never copied; [`verification_copy_len`] says what the copy costs).

use super::cache::{
    CallCaches, CallLog, CheckKind, DnsBudget, DnsFacts, DnsStats, DnsStatsSnapshot, QueryLimits,
    SharedCaches, Trip,
};
use super::dns::DnsSettings;
use super::AuthError;
use base64::Engine as _;
use mail_auth::dkim::DkimError;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::dmarc::Policy;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, DkimOutput, DkimResult, DmarcResult, MessageAuthenticator, Parameters,
    SpfOutput, SpfResult,
};
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// DKIM signatures verified per message; later ones are reported, not verified.
pub const MAX_DKIM_SIGNATURES: usize = 10;
/// ARC sets validated per message; a longer chain is `fail`.
pub const MAX_ARC_SETS: usize = 10;
/// `h=` entries a DKIM or ARC message signature may have to be verified.
pub const MAX_SIGNED_FIELDS: usize = 64;

/// A result token as written in `Authentication-Results` (RFC 8601 §2.7).
/// SPF uses all of them; DKIM, ARC and DMARC a subset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthResult {
    Pass,
    Fail,
    SoftFail,
    Neutral,
    None,
    TempError,
    PermError,
}

impl AuthResult {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthResult::Pass => "pass",
            AuthResult::Fail => "fail",
            AuthResult::SoftFail => "softfail",
            AuthResult::Neutral => "neutral",
            AuthResult::None => "none",
            AuthResult::TempError => "temperror",
            AuthResult::PermError => "permerror",
        }
    }
}

impl fmt::Display for AuthResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<SpfResult> for AuthResult {
    fn from(r: SpfResult) -> Self {
        match r {
            SpfResult::Pass => AuthResult::Pass,
            SpfResult::Fail => AuthResult::Fail,
            SpfResult::SoftFail => AuthResult::SoftFail,
            SpfResult::Neutral => AuthResult::Neutral,
            SpfResult::TempError => AuthResult::TempError,
            SpfResult::PermError => AuthResult::PermError,
            SpfResult::None => AuthResult::None,
        }
    }
}

impl From<AuthResult> for SpfResult {
    fn from(r: AuthResult) -> Self {
        match r {
            AuthResult::Pass => SpfResult::Pass,
            AuthResult::Fail => SpfResult::Fail,
            AuthResult::SoftFail => SpfResult::SoftFail,
            AuthResult::Neutral => SpfResult::Neutral,
            AuthResult::TempError => SpfResult::TempError,
            AuthResult::PermError => SpfResult::PermError,
            AuthResult::None => SpfResult::None,
        }
    }
}

/// Which SPF identity was checked (RFC 7208 §2.3, §2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpfIdentity {
    MailFrom,
    /// The null reverse-path: the HELO name is checked, as `postmaster@<helo>`.
    Helo,
}

/// The SPF result of one MAIL FROM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpfOutcome {
    pub result: AuthResult,
    pub identity: SpfIdentity,
    /// The domain whose policy was evaluated (MAIL FROM domain or HELO name).
    /// DMARC aligns against it.
    pub domain: String,
    /// MAIL FROM as the client gave it; empty for the null reverse-path.
    pub mail_from: String,
    /// `<sender>` as evaluated (`postmaster@…` where RFC 7208 §4.3 says so).
    pub sender: String,
    pub helo: String,
    pub ip: IpAddr,
    /// Our host name (the `r` macro and `receiver=` of Received-SPF).
    pub receiver: String,
    /// The domain's `exp=` text on `fail`, sanitised (printable ASCII, ≤ 200 chars).
    pub explanation: Option<String>,
    /// Why, when the result is ours rather than the library's, or a detail
    /// worth logging. Sanitised; safe in an SMTP reply.
    pub reason: Option<String>,
    /// Set when mailgate itself could not complete the check (see
    /// [`NotChecked`]); the result is then `temperror`.
    pub not_checked: Option<NotChecked>,
    /// What the check's DNS queries did (the driver counts it).
    pub dns: DnsFacts,
}

/// A check that mailgate itself could not complete: the session's DNS query
/// budget was spent, or the check runtime was over capacity or too late.
/// Unlike a `temperror` from DNS, this is not the sender's domain's trouble
/// and no `temperror:` action applies: [`decide`](super::decide) answers
/// with a tempfail whatever the policy says (fail closed; a new session
/// starts with a new budget).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotChecked {
    /// "spf", "dkim", "arc" or "dmarc".
    pub check: &'static str,
    /// Sanitised, reply-safe text.
    pub reason: String,
    /// The check runtime had no slot for it (`worker.rs`): the driver counts
    /// `mailgate_auth_results_total{check="check_runtime",result="busy"}`.
    pub runtime_busy: bool,
}

impl SpfOutcome {
    /// The identity of an SPF check, before any result (`none`). `sender`
    /// is the reverse-path without angle brackets; empty means the null
    /// sender, for which the HELO identity is checked (§2.4). A sender
    /// without local part (`@d`) or without `@` is evaluated as
    /// `postmaster@<domain>` (§4.3).
    pub fn unchecked(ip: IpAddr, helo: &str, our_hostname: &str, sender: &str) -> SpfOutcome {
        let helo = helo.trim();
        let mail_from = sender.trim();
        let mail_from = mail_from
            .strip_prefix('<')
            .and_then(|s| s.strip_suffix('>'))
            .unwrap_or(mail_from);
        let (identity, evaluated_sender, domain) = if mail_from.is_empty() {
            (
                SpfIdentity::Helo,
                format!("postmaster@{helo}"),
                helo.to_string(),
            )
        } else {
            match mail_from.rsplit_once('@') {
                Some(("", d)) => (
                    SpfIdentity::MailFrom,
                    format!("postmaster@{d}"),
                    d.to_string(),
                ),
                Some((_, d)) => (SpfIdentity::MailFrom, mail_from.to_string(), d.to_string()),
                None => (
                    SpfIdentity::MailFrom,
                    format!("postmaster@{mail_from}"),
                    mail_from.to_string(),
                ),
            }
        };
        SpfOutcome {
            result: AuthResult::None,
            identity,
            domain,
            mail_from: mail_from.to_string(),
            sender: evaluated_sender,
            helo: helo.to_string(),
            ip,
            receiver: our_hostname.to_string(),
            explanation: None,
            reason: None,
            not_checked: None,
            dns: DnsFacts::default(),
        }
    }
}

/// Which message checks to run. DMARC needs DKIM, so `dmarc` implies `dkim`
/// (the DKIM results are then reported too). SPF is a separate call at MAIL
/// FROM; DMARC needs its outcome, so a policy naming `dmarc:` needs SPF run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Checks {
    pub dkim: bool,
    pub dmarc: bool,
    pub arc: bool,
}

impl Checks {
    pub fn all() -> Self {
        Checks {
            dkim: true,
            dmarc: true,
            arc: true,
        }
    }

    pub fn any(&self) -> bool {
        self.dkim || self.dmarc || self.arc
    }
}

/// One DKIM-Signature and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimSignature {
    pub result: AuthResult,
    /// `d=`; empty when the header could not be parsed at all.
    pub domain: String,
    /// `s=`
    pub selector: String,
    /// `i=` if present.
    pub auid: String,
    /// `rsa-sha256`, `ed25519-sha256`, `rsa-sha1`, …
    pub algorithm: &'static str,
    /// The first 8 base64 characters of `b=` (RFC 6008 `header.b`), to tell
    /// several signatures of one domain apart.
    pub b_prefix: String,
    pub reason: Option<String>,
}

impl DkimSignature {
    /// A result that stands for no particular signature (signatures not
    /// verified, a check that did not finish): no tags, only a reason.
    pub fn unattributed(result: AuthResult, reason: String) -> DkimSignature {
        DkimSignature {
            result,
            domain: String::new(),
            selector: String::new(),
            auid: String::new(),
            algorithm: "",
            b_prefix: String::new(),
            reason: Some(reason),
        }
    }
}

/// The ARC chain validation result (RFC 8617 §5.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArcOutcome {
    /// `pass`, `fail`, `none`, or `temperror` when a key could not be fetched.
    pub result: AuthResult,
    /// Number of ARC sets seen.
    pub instances: usize,
    pub reason: Option<String>,
}

/// The DMARC policy the From domain publishes (after `sp=`/`np=`/`t=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmarcPolicy {
    None,
    Quarantine,
    Reject,
}

impl DmarcPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            DmarcPolicy::None => "none",
            DmarcPolicy::Quarantine => "quarantine",
            DmarcPolicy::Reject => "reject",
        }
    }
}

/// The DMARC evaluation of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmarcOutcome {
    /// `pass`, `fail`, `none` (no policy or no single From domain),
    /// `temperror`, `permerror`.
    pub result: AuthResult,
    pub policy: DmarcPolicy,
    /// The RFC 5322 From domain; empty when the message has none (or several).
    pub from_domain: String,
    pub spf_aligned: bool,
    pub dkim_aligned: bool,
    pub reason: Option<String>,
}

/// Results of the message checks; `None` = that check was not requested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageOutcome {
    pub dkim: Option<Vec<DkimSignature>>,
    pub arc: Option<ArcOutcome>,
    pub dmarc: Option<DmarcOutcome>,
    /// The client address, for `arc=… smtp.remote-ip=`.
    pub remote_ip: IpAddr,
    /// The first requested check that mailgate could not complete.
    pub not_checked: Option<NotChecked>,
    /// What the checks' DNS queries did (the driver counts it).
    pub dns: DnsFacts,
}

impl MessageOutcome {
    /// DKIM as one result for policy decisions: one good signature is enough
    /// (RFC 6376 §6.1), so the best signature wins: pass > temperror > fail >
    /// permerror > neutral; `none` when there is no signature.
    pub fn dkim_summary(&self) -> Option<(AuthResult, Option<&DkimSignature>)> {
        let sigs = self.dkim.as_ref()?;
        let rank = |r: AuthResult| match r {
            AuthResult::Pass => 0,
            AuthResult::TempError => 1,
            AuthResult::Fail | AuthResult::SoftFail => 2,
            AuthResult::PermError => 3,
            AuthResult::Neutral => 4,
            AuthResult::None => 5,
        };
        Some(
            sigs.iter()
                .min_by_key(|s| rank(s.result))
                .map_or((AuthResult::None, None), |s| (s.result, Some(s))),
        )
    }
}

/// Runs SPF, DKIM, ARC and DMARC against DNS. Create one per process (or per
/// DNS configuration) and share it behind an `Arc`; all methods take `&self`.
pub struct Verifier {
    auth: MessageAuthenticator,
    caches: Option<SharedCaches>,
    stats: DnsStats,
    deadline: Duration,
    limits: QueryLimits,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("deadline", &self.deadline)
            .field("cached", &self.caches.as_ref().map(SharedCaches::len))
            .finish()
    }
}

impl Verifier {
    /// Builds the resolver from `settings`. Needs no runtime; the first check
    /// must run inside tokio.
    pub fn new(settings: &DnsSettings) -> Result<Verifier, AuthError> {
        Ok(Verifier {
            auth: settings.authenticator()?,
            caches: (settings.cache_entries > 0)
                .then(|| SharedCaches::with_bytes(settings.cache_entries, settings.cache_bytes)),
            stats: DnsStats::default(),
            deadline: settings.check_deadline(),
            limits: QueryLimits {
                per_session: settings.max_queries_per_session,
                per_message: settings.max_queries_per_message,
            },
        })
    }

    /// The bound of one check (see [`DnsSettings::check_deadline`]).
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// DNS and check counters for the metrics endpoint.
    pub fn stats(&self) -> DnsStatsSnapshot {
        self.stats
            .snapshot(self.caches.as_ref().map_or(0, SharedCaches::len))
    }

    /// The underlying authenticator, for lookups this module does not wrap.
    pub fn authenticator(&self) -> &MessageAuthenticator {
        &self.auth
    }

    /// SPF at MAIL FROM (RFC 7208). `sender` is the reverse-path without
    /// angle brackets; empty means the null sender, for which the HELO
    /// identity is checked (§2.4). A sender without local part (`@d`) or
    /// without `@` is evaluated as `postmaster@<domain>` (§4.3).
    pub async fn spf(
        &self,
        ip: IpAddr,
        helo: &str,
        our_hostname: &str,
        sender: &str,
    ) -> SpfOutcome {
        self.spf_within(&DnsBudget::new(), ip, helo, our_hostname, sender)
            .await
    }

    /// [`Self::spf`], charging the DNS queries to `budget` (one per SMTP
    /// session; [`DnsBudget::new_message`] at each MAIL).
    pub async fn spf_within(
        &self,
        budget: &DnsBudget,
        ip: IpAddr,
        helo: &str,
        our_hostname: &str,
        sender: &str,
    ) -> SpfOutcome {
        let started = Instant::now();
        let mut out = SpfOutcome::unchecked(ip, helo, our_hostname, sender);
        let identity = out.identity;
        let helo = out.helo.clone();
        let helo = helo.as_str();

        // RFC 7208 §4.3: a malformed or single-label <domain> is "none". This
        // is the address-literal HELO case; no DNS query is made for it.
        if let Err(why) = check_domain(&out.domain, false) {
            let what = match identity {
                SpfIdentity::Helo => "HELO name",
                SpfIdentity::MailFrom => "MAIL FROM domain",
            };
            out.reason = Some(format!("{what} is not a domain name ({why})"));
            self.stats
                .record_check(CheckKind::Spf, started.elapsed(), false, false);
            return out;
        }

        let log = CallLog::gated(&self.stats, budget, self.limits, true);
        let caches = CallCaches::new(self.caches.as_ref(), &log);
        let params = match identity {
            SpfIdentity::Helo => SpfParameters::helo(ip, helo, our_hostname),
            SpfIdentity::MailFrom => {
                SpfParameters::new(ip, &out.domain, helo, our_hostname, &out.sender)
            }
        };
        let run = self
            .auth
            .check_host(Parameters::new(params).with_cache(&caches));
        let mut deadline_hit = false;
        match tokio::time::timeout(self.deadline, CatchUnwind::new(run)).await {
            Ok(Ok(output)) => {
                out.result = output.result().into();
                out.explanation = output.explanation().map(|e| sanitize(e, 200));
            }
            Ok(Err(())) => {
                tracing::error!(domain = %sanitize(&out.domain, 255), "SPF evaluation panicked");
                out.result = AuthResult::PermError;
                out.reason = Some("internal error while evaluating SPF".into());
            }
            Err(_) => {
                deadline_hit = true;
                out.result = AuthResult::TempError;
                out.reason = Some(format!("DNS gave no answer within {:?}", self.deadline));
            }
        }
        log.settle_spf(deadline_hit || out.result == AuthResult::TempError);
        if let Some(trip) = log.tripped() {
            out.result = trip_result(&trip);
            out.reason = Some(trip.reason(self.limits));
            out.explanation = None;
            out.not_checked = cut_short("spf", &trip, self.limits);
            tracing::warn!(domain = %sanitize(&out.domain, 255), result = out.result.as_str(), reason = %trip.reason(self.limits), "SPF cut short by a DNS limit");
        }
        if out.result == AuthResult::TempError && !deadline_hit && out.not_checked.is_none() {
            // A query that hickory refused (or that cannot exist) is a
            // permanent problem of the SPF record, not a DNS outage.
            if let Some(name) = log.last_unanswered().and_then(|l| l.name) {
                if let Err(why) = check_domain(&name, true) {
                    out.result = AuthResult::PermError;
                    out.reason = Some(format!(
                        "SPF evaluation needs an invalid DNS name {} ({why})",
                        sanitize(&name, 100)
                    ));
                }
            }
            if out.result == AuthResult::TempError && out.reason.is_none() {
                out.reason = Some("DNS lookup failed".into());
            }
        }
        out.dns = log.finish();
        self.stats.record_check(
            CheckKind::Spf,
            started.elapsed(),
            out.result == AuthResult::TempError,
            deadline_hit,
        );
        out
    }

    /// The A records of `name` (a DNSBL query such as
    /// `2.0.0.127.zen.example.`), through the shared cache so that answers,
    /// positive and negative, are kept for their TTL. Counted in the DNS
    /// stats like the checks' lookups; not charged to any query budget (the
    /// caller bounds the number of names and the time). `Ok(vec![])` is
    /// "no such record" (NXDOMAIN or NODATA); `Err` any failure (timeout,
    /// SERVFAIL, a name hickory refuses), its text for the log.
    pub async fn a_records(
        &self,
        name: &str,
    ) -> (Result<Vec<std::net::Ipv4Addr>, String>, DnsFacts) {
        use mail_auth::DnsCache as _;
        let log = CallLog::new(&self.stats);
        let caches = CallCaches::new(self.caches.as_ref(), &log);
        let r = match self.auth.ipv4_lookup(name, caches.ipv4()).await {
            Ok(set) => Ok(set.records.to_vec()),
            Err(mail_auth::Error::Dns(mail_auth::DnsError::RecordNotFound(_))) => Ok(Vec::new()),
            Err(e) => Err(e.to_string()),
        };
        (r, log.finish())
    }

    /// The message checks after DATA, on the message exactly as received
    /// (CRLF line endings, before any header edit). Only the requested checks
    /// run; DMARC runs DKIM too. `spf` is the MAIL FROM outcome (DMARC needs
    /// it); without it DMARC sees SPF `none` for the MAIL FROM (or HELO)
    /// domain and can pass only through DKIM.
    pub async fn message(
        &self,
        raw: &[u8],
        ip: IpAddr,
        helo: &str,
        sender: &str,
        spf: Option<&SpfOutcome>,
        want: Checks,
    ) -> MessageOutcome {
        self.message_within(&DnsBudget::new(), raw, ip, helo, sender, spf, want)
            .await
    }

    /// [`Self::message`], charging the DNS queries to `budget`.
    #[allow(clippy::too_many_arguments)]
    pub async fn message_within(
        &self,
        budget: &DnsBudget,
        raw: &[u8],
        ip: IpAddr,
        helo: &str,
        sender: &str,
        spf: Option<&SpfOutcome>,
        want: Checks,
    ) -> MessageOutcome {
        let deadline = tokio::time::Instant::now() + self.deadline;
        let mut out = MessageOutcome {
            dkim: None,
            arc: None,
            dmarc: None,
            remote_ip: ip,
            not_checked: None,
            dns: DnsFacts::default(),
        };
        if !want.any() {
            return out;
        }
        // DMARC without the SPF result it needs is not completed either
        // (a policy with `dmarc:` is refused at MAIL FROM already).
        if let (true, Some(n)) = (want.dmarc, spf.and_then(|s| s.not_checked.as_ref())) {
            out.not_checked = Some(NotChecked {
                check: "dmarc",
                reason: format!("SPF not checked: {}", n.reason),
                runtime_busy: false,
            });
        }
        // One lookup log for all message checks; it must outlive the DKIM
        // outputs, which DMARC borrows together with the cache.
        let log = CallLog::gated(&self.stats, budget, self.limits, false);
        let caches = CallCaches::new(self.caches.as_ref(), &log);
        let plan = Plan::of(raw);
        let kept = plan.kept_headers(raw);
        let parsed = std::panic::catch_unwind(|| match &kept {
            // the kept header fields, then the body where it lies: the
            // message from the blank line on (never copied)
            Some(h) => {
                AuthenticatedMessage::parse_with_opts(&raw[plan.header_end..], Some(h), true)
            }
            None => AuthenticatedMessage::parse(raw),
        })
        .unwrap_or_else(|_| {
            tracing::error!("message parser panicked");
            None
        });
        let Some(msg) = parsed else {
            // No header at all: nothing is signed and there is no From.
            let why = Some("message has no parsable header".to_string());
            if want.dkim || want.dmarc {
                out.dkim = Some(Vec::new());
            }
            if want.arc {
                out.arc = Some(ArcOutcome {
                    result: AuthResult::None,
                    instances: 0,
                    reason: why.clone(),
                });
            }
            if want.dmarc {
                out.dmarc = Some(DmarcOutcome {
                    result: AuthResult::None,
                    policy: DmarcPolicy::None,
                    from_domain: String::new(),
                    spf_aligned: false,
                    dkim_aligned: false,
                    reason: why,
                });
            }
            return out;
        };

        let mut dkim_outputs: Vec<DkimOutput<'_>> = Vec::new();
        if want.dkim || want.dmarc {
            let started = Instant::now();
            let run = self
                .auth
                .verify_dkim(Parameters::new(&msg).with_cache(&caches));
            let (sigs, deadline_hit) =
                match tokio::time::timeout_at(deadline, CatchUnwind::new(run)).await {
                    Ok(Ok(outputs)) => {
                        dkim_outputs = outputs.into_iter().map(|o| adjust_dkim(o, &msg)).collect();
                        (dkim_outputs.iter().map(dkim_signature).collect(), false)
                    }
                    Ok(Err(())) => {
                        tracing::error!("DKIM verification panicked");
                        (
                            unverified(
                                &msg,
                                AuthResult::PermError,
                                "internal error while verifying",
                            ),
                            false,
                        )
                    }
                    Err(_) => (
                        unverified(&msg, AuthResult::TempError, "DNS gave no answer in time"),
                        true,
                    ),
                };
            let mut sigs: Vec<DkimSignature> = sigs;
            if let Some(trip) = log.tripped() {
                for (sig, o) in sigs.iter_mut().zip(&dkim_outputs) {
                    let denied = o.signature().is_some_and(|h| {
                        log.was_denied(&format!("{}._domainkey.{}.", h.s, h.d).to_lowercase())
                    });
                    if sig.result == AuthResult::TempError && denied {
                        sig.result = trip_result(&trip);
                        sig.reason = Some(trip.reason(self.limits));
                        if out.not_checked.is_none() {
                            out.not_checked = cut_short("dkim", &trip, self.limits);
                        }
                    }
                }
                tracing::warn!(reason = %trip.reason(self.limits), "DKIM cut short by a DNS limit");
            }
            sigs.extend(plan.dkim_skipped.iter().cloned());
            let temp = sigs
                .iter()
                .any(|s: &DkimSignature| s.result == AuthResult::TempError);
            self.stats
                .record_check(CheckKind::Dkim, started.elapsed(), temp, deadline_hit);
            out.dkim = Some(sigs);
        }

        if let (true, Some(why)) = (want.arc, &plan.arc_refused) {
            out.arc = Some(ArcOutcome {
                result: AuthResult::Fail,
                instances: plan.arc_sets,
                reason: Some(why.clone()),
            });
        } else if want.arc {
            let started = Instant::now();
            let instances = msg.arc_seals().len();
            let run = self
                .auth
                .verify_arc(Parameters::new(&msg).with_cache(&caches));
            let (arc, deadline_hit) =
                match tokio::time::timeout_at(deadline, CatchUnwind::new(run)).await {
                    Ok(Ok(output)) => (
                        arc_outcome(output.result(), output.chain().len().max(instances)),
                        false,
                    ),
                    Ok(Err(())) => {
                        tracing::error!("ARC validation panicked");
                        (
                            ArcOutcome {
                                result: AuthResult::Fail,
                                instances,
                                reason: Some("internal error while validating".into()),
                            },
                            false,
                        )
                    }
                    Err(_) => (
                        ArcOutcome {
                            result: AuthResult::TempError,
                            instances,
                            reason: Some("DNS gave no answer in time".into()),
                        },
                        true,
                    ),
                };
            let mut arc = arc;
            if let (Some(trip), AuthResult::TempError) = (log.tripped(), arc.result) {
                arc.result = match trip_result(&trip) {
                    AuthResult::PermError => AuthResult::Fail,
                    r => r,
                };
                arc.reason = Some(trip.reason(self.limits));
                if out.not_checked.is_none() {
                    out.not_checked = cut_short("arc", &trip, self.limits);
                }
                tracing::warn!(reason = %trip.reason(self.limits), "ARC cut short by a DNS limit");
            }
            self.stats.record_check(
                CheckKind::Arc,
                started.elapsed(),
                arc.result == AuthResult::TempError,
                deadline_hit,
            );
            out.arc = Some(arc);
        }

        if want.dmarc {
            let started = Instant::now();
            let helo = helo.trim();
            let (spf_output, mail_from_domain) = match spf {
                Some(s) => (
                    SpfOutput::new(s.domain.clone()).with_result(s.result.into()),
                    s.domain.clone(),
                ),
                None => {
                    let d = sender
                        .rsplit_once('@')
                        .map_or(helo, |(_, d)| d)
                        .trim_end_matches('>')
                        .to_string();
                    (SpfOutput::new(d.clone()), d)
                }
            };
            let tripped_before = log.tripped();
            // mail-auth turns every From domain into A-labels before it
            // compares them, and IDNA costs the square of a label's length:
            // a From list of long non-ASCII names would take seconds of CPU
            // that the deadline cannot cut (the conversion never yields). A
            // domain longer than DNS allows has no DMARC record, and a list
            // holding one is of no single domain: none, as mail-auth says
            // for a From of several domains.
            let oversized = msg.from_addresses().iter().any(|a| {
                a.rsplit_once('@')
                    .is_some_and(|(_, d)| !crate::units::dns_sized(d))
            });
            let params = DmarcParameters::new(&msg, &dkim_outputs, &mail_from_domain, &spf_output);
            let run = self
                .auth
                .verify_dmarc(Parameters::new(params).with_cache(&caches));
            let (dmarc, deadline_hit) = if oversized {
                (
                    dmarc_error(AuthResult::None, "From domain longer than a DNS name"),
                    false,
                )
            } else {
                match tokio::time::timeout_at(deadline, CatchUnwind::new(run)).await {
                    Ok(Ok(output)) => (dmarc_outcome(&output), false),
                    Ok(Err(())) => {
                        tracing::error!("DMARC evaluation panicked");
                        (
                            dmarc_error(AuthResult::PermError, "internal error while evaluating"),
                            false,
                        )
                    }
                    Err(_) => (
                        dmarc_error(AuthResult::TempError, "DNS gave no answer in time"),
                        true,
                    ),
                }
            };
            let mut dmarc = dmarc;
            if let Some(trip) = log.tripped() {
                let new_here = tripped_before.is_none();
                if dmarc.result == AuthResult::TempError
                    || (new_here && matches!(trip, Trip::Oversized(_)))
                {
                    dmarc.result = trip_result(&trip);
                    dmarc.reason = Some(trip.reason(self.limits));
                    if out.not_checked.is_none() {
                        out.not_checked = cut_short("dmarc", &trip, self.limits);
                    }
                    tracing::warn!(reason = %trip.reason(self.limits), "DMARC cut short by a DNS limit");
                }
            }
            self.stats.record_check(
                CheckKind::Dmarc,
                started.elapsed(),
                dmarc.result == AuthResult::TempError,
                deadline_hit,
            );
            out.dmarc = Some(dmarc);
        }
        out.dns = log.finish();
        out
    }
}

/// A check the DNS gate cut short for a reason of the session (its budget),
/// not of the records: not completed, see [`NotChecked`].
fn cut_short(check: &'static str, t: &Trip, limits: QueryLimits) -> Option<NotChecked> {
    t.is_temporary().then(|| NotChecked {
        check,
        reason: t.reason(limits),
        runtime_busy: false,
    })
}

/// The result of a check the DNS gate cut short.
fn trip_result(t: &Trip) -> AuthResult {
    if t.is_temporary() {
        AuthResult::TempError
    } else {
        AuthResult::PermError
    }
}

/// The bytes [`Verifier::message`] copies from `raw`: the header block
/// without the signature fields it does not verify, when there are such
/// fields (0 otherwise; the body is never copied). The SMTP driver reserves
/// them from its in-flight budget before the checks run.
pub fn verification_copy_len(raw: &[u8]) -> usize {
    Plan::of(raw).copy_len()
}

/// What of a message is verified (see the module comment): the header
/// fields mail-auth must not see, and the results of the signatures that
/// are not verified.
struct Plan {
    /// Byte ranges of the dropped fields, in order.
    drop: Vec<std::ops::Range<usize>>,
    /// Where the header fields end (the blank line, or the end of `raw`).
    header_end: usize,
    dkim_skipped: Vec<DkimSignature>,
    arc_sets: usize,
    /// Why the ARC chain is not validated.
    arc_refused: Option<String>,
}

impl Plan {
    /// Size of [`Self::kept_headers`].
    fn copy_len(&self) -> usize {
        if self.drop.is_empty() {
            return 0;
        }
        self.header_end - self.drop.iter().map(|r| r.len()).sum::<usize>()
    }

    /// The header fields without the dropped ones; `None` when none is dropped.
    fn kept_headers(&self, raw: &[u8]) -> Option<Vec<u8>> {
        if self.drop.is_empty() {
            return None;
        }
        let mut out = Vec::with_capacity(self.copy_len());
        let mut at = 0;
        for r in &self.drop {
            out.extend_from_slice(&raw[at..r.start]);
            at = r.end;
        }
        out.extend_from_slice(&raw[at..self.header_end]);
        Some(out)
    }

    fn of(raw: &[u8]) -> Plan {
        let mut drop: Vec<std::ops::Range<usize>> = Vec::new();
        let mut dkim_skipped = Vec::new();
        let (mut dkim_seen, mut not_checked) = (0usize, 0usize);
        let (mut seals, mut ams, mut aar) = (0usize, 0usize, 0usize);
        let mut ams_too_long = None;
        let mut header_end = 0;
        for (range, name, value) in header_fields(raw) {
            header_end = range.end;
            match FieldKind::of(name) {
                Some(FieldKind::DkimSignature) => {
                    dkim_seen += 1;
                    if dkim_seen > MAX_DKIM_SIGNATURES {
                        not_checked += 1;
                        drop.push(range);
                        continue;
                    }
                    let tags = Tags::dkim(value);
                    if tags.signed_fields > MAX_SIGNED_FIELDS {
                        dkim_skipped.push(DkimSignature {
                            result: AuthResult::PermError,
                            domain: tags.d,
                            selector: tags.s,
                            auid: String::new(),
                            algorithm: "",
                            b_prefix: tags.b_prefix,
                            reason: Some(format!(
                                "signs {} header fields (limit {MAX_SIGNED_FIELDS}): not verified",
                                tags.signed_fields
                            )),
                        });
                        drop.push(range);
                    }
                }
                Some(FieldKind::ArcSeal) => seals += 1,
                Some(FieldKind::ArcMessageSignature) => {
                    ams += 1;
                    let n = Tags::arc(value).signed_fields;
                    if n > MAX_SIGNED_FIELDS {
                        ams_too_long = Some(n);
                    }
                }
                Some(FieldKind::ArcAuthenticationResults) => aar += 1,
                None => {}
            }
        }
        if not_checked > 0 {
            dkim_skipped.push(DkimSignature::unattributed(
                AuthResult::Neutral,
                format!("{not_checked} more signatures not verified (limit {MAX_DKIM_SIGNATURES})"),
            ));
        }
        let arc_sets = seals.max(ams).max(aar);
        let arc_refused = if arc_sets > MAX_ARC_SETS {
            Some(format!(
                "{arc_sets} ARC sets (limit {MAX_ARC_SETS}): not validated"
            ))
        } else {
            ams_too_long.map(|n| {
                format!(
                    "ARC-Message-Signature signs {n} header fields (limit {MAX_SIGNED_FIELDS}): not validated"
                )
            })
        };
        Plan {
            drop,
            header_end,
            dkim_skipped,
            arc_sets,
            arc_refused,
        }
    }
}

/// The header fields of a message: (byte range with folded lines, name, value).
fn header_fields(raw: &[u8]) -> impl Iterator<Item = (std::ops::Range<usize>, &[u8], &[u8])> {
    let mut pos = 0;
    std::iter::from_fn(move || {
        if pos >= raw.len() || raw[pos..].starts_with(b"\r\n") || raw[pos] == b'\n' {
            return None;
        }
        let start = pos;
        loop {
            pos = memchr::memchr(b'\n', &raw[pos..]).map_or(raw.len(), |i| pos + i + 1);
            if !matches!(raw.get(pos), Some(b' ' | b'\t')) {
                break;
            }
        }
        let field = &raw[start..pos];
        let (name, value) = match memchr::memchr(b':', field) {
            Some(c) => (&field[..c], &field[c + 1..]),
            None => (field, &field[field.len()..]),
        };
        let name = name.trim_ascii_end();
        Some((start..pos, name, value))
    })
}

/// The header fields mail-auth verifies, recognised by name as mail-auth's
/// header parser does (`headers/parse.rs` `classify_name`): ASCII case and
/// whitespace (folding) inside the name ignored, only letters, digits and
/// `-` allowed, and every name beginning with `ARC-Seal` is an ARC-Seal. A
/// field this scan missed would be verified without the caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FieldKind {
    DkimSignature,
    ArcSeal,
    ArcMessageSignature,
    ArcAuthenticationResults,
}

impl FieldKind {
    fn of(name: &[u8]) -> Option<FieldKind> {
        // the longest name below has 26 characters; longer names keep
        // their first 32 (enough for the `ARC-Seal` prefix)
        let mut token = [0u8; 32];
        let (mut len, mut longer) = (0, false);
        for &b in name {
            match b {
                b' ' | b'\t' | b'\r' | b'\n' => {}
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' if len < token.len() => {
                    token[len] = b.to_ascii_lowercase();
                    len += 1;
                }
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' => longer = true,
                _ => return None,
            }
        }
        let token = &token[..len];
        if longer {
            return token.starts_with(b"arc-seal").then_some(FieldKind::ArcSeal);
        }
        match token {
            b"dkim-signature" => Some(FieldKind::DkimSignature),
            b"arc-message-signature" => Some(FieldKind::ArcMessageSignature),
            b"arc-authentication-results" => Some(FieldKind::ArcAuthenticationResults),
            t if t.starts_with(b"arc-seal") => Some(FieldKind::ArcSeal),
            _ => None,
        }
    }
}

/// The few tags of a DKIM-Signature / ARC-Message-Signature that are
/// reported without verifying it; sanitised and bounded. Read with
/// mail-auth's own tag parser, so that `signed_fields` is the `h=` list
/// mail-auth would hash (tag names in any case and with folding white
/// space, the last of duplicate tags). A signature mail-auth cannot parse
/// is never verified, so it counts no signed fields.
#[derive(Default)]
struct Tags {
    d: String,
    s: String,
    b_prefix: String,
    signed_fields: usize,
}

impl Tags {
    fn dkim(value: &[u8]) -> Tags {
        match mail_auth::dkim::Signature::parse(value) {
            Ok(sig) => Tags::of(&sig.d, &sig.s, &sig.b, sig.h.len()),
            Err(_) => Tags::default(),
        }
    }

    fn arc(value: &[u8]) -> Tags {
        match mail_auth::arc::Signature::parse(value) {
            Ok(sig) => Tags::of(&sig.d, &sig.s, &sig.b, sig.h.len()),
            Err(_) => Tags::default(),
        }
    }

    fn of(d: &str, s: &str, b: &[u8], signed_fields: usize) -> Tags {
        Tags {
            d: sanitize(d, 255),
            s: sanitize(s, 255),
            b_prefix: base64::engine::general_purpose::STANDARD.encode(b.get(..6).unwrap_or(b)),
            signed_fields,
        }
    }
}

/// Polls a future inside `catch_unwind`: a panic in mail-auth on hostile
/// input ends that check, not the session task.
struct CatchUnwind<F: Future>(Pin<Box<F>>);

impl<F: Future> CatchUnwind<F> {
    fn new(f: F) -> Self {
        CatchUnwind(Box::pin(f))
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, ()>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(_) => Poll::Ready(Err(())),
        }
    }
}

/// Syntax check of a domain name (RFC 1035 §2.3.4 lengths, RFC 7208 §4.3 /
/// §7.1 shape). `query` allows `_` labels and names produced by mail-auth
/// (trailing dot); identities are stricter: no address literals, at least two
/// labels, a top label that is not all digits.
pub(crate) fn check_domain(name: &str, query: bool) -> Result<(), &'static str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err("empty");
    }
    if name.starts_with('[') {
        return Err("address literal");
    }
    if name.len() > 253 {
        return Err("longer than 253 characters");
    }
    // Letters, digits, '-', '_' (SRV-style labels such as _spf, _domainkey)
    // and non-ASCII (IDN, converted by mail-auth). Anything else (space, '%',
    // quotes, brackets) cannot be a host name, whatever a macro expands to.
    if !name.chars().all(|c| {
        c.is_ascii_alphanumeric()
            || "-_.".contains(c)
            || (!c.is_ascii() && !c.is_control() && !c.is_whitespace())
    }) {
        return Err("invalid character");
    }
    let mut labels = 0;
    let mut last = "";
    for label in name.split('.') {
        if label.is_empty() {
            return Err("empty label");
        }
        if label.len() > 63 {
            return Err("label longer than 63 characters");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("label starts or ends with a hyphen");
        }
        labels += 1;
        last = label;
    }
    if !query {
        if labels < 2 {
            return Err("not a multi-label name");
        }
        if last.bytes().all(|b| b.is_ascii_digit()) {
            return Err("numeric top label");
        }
    }
    Ok(())
}

/// Printable ASCII only (space allowed), at most `max` characters: what can
/// go into a log line, a header comment or an SMTP reply unchanged.
pub(crate) fn sanitize(s: &str, max: usize) -> String {
    s.chars()
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .take(max)
        .collect()
}

fn dkim_reason(e: &mail_auth::Error) -> String {
    sanitize(&e.to_string(), 120)
}

/// Applies the deviations listed in the module comment to one DKIM output,
/// keeping it a `DkimOutput` so that DMARC sees the same verdicts.
fn adjust_dkim<'x>(o: DkimOutput<'x>, msg: &'x AuthenticatedMessage<'x>) -> DkimOutput<'x> {
    let new = match o.result() {
        DkimResult::Neutral(e @ mail_auth::Error::Dkim(DkimError::BodyHashMismatch))
        | DkimResult::Neutral(e @ mail_auth::Error::Dkim(DkimError::SignatureExpired)) => {
            DkimResult::Fail(e.clone())
        }
        DkimResult::TempError(e) => match o.signature() {
            Some(sig)
                if check_domain(&format!("{}._domainkey.{}", sig.s, sig.d), true).is_err() =>
            {
                DkimResult::PermError(e.clone())
            }
            _ => return o,
        },
        _ => return o,
    };
    // The output's own signature reference is only lent out for `&self`;
    // find the same signature in the message to rebuild the output.
    let same = o.signature().and_then(|sig| {
        msg.dkim_signatures()
            .iter()
            .find(|h| std::ptr::eq(&h.header, sig))
    });
    match same {
        Some(h) => DkimOutput::from(new).with_signature(&h.header),
        None => DkimOutput::from(new),
    }
}

fn dkim_signature(o: &DkimOutput<'_>) -> DkimSignature {
    let (result, reason) = match o.result() {
        DkimResult::Pass => (AuthResult::Pass, None),
        DkimResult::Neutral(e) => (AuthResult::Neutral, Some(dkim_reason(e))),
        DkimResult::Fail(e) => (
            AuthResult::Fail,
            Some(match e {
                mail_auth::Error::Dkim(DkimError::BodyHashMismatch) => {
                    "body hash did not verify".into()
                }
                mail_auth::Error::Dkim(DkimError::SignatureExpired) => "signature expired".into(),
                other => dkim_reason(other),
            }),
        ),
        DkimResult::PermError(e) => (AuthResult::PermError, Some(dkim_reason(e))),
        DkimResult::TempError(e) => (AuthResult::TempError, Some(dkim_reason(e))),
        DkimResult::None => (AuthResult::None, None),
    };
    let mut s = DkimSignature::unattributed(result, String::new());
    s.reason = reason;
    if let Some(sig) = o.signature() {
        s.domain = sig.d.clone();
        s.selector = sig.s.clone();
        s.auid = sig.i.clone();
        s.algorithm = algorithm_name(sig.a);
        let prefix = sig.b.get(..6).unwrap_or(&sig.b);
        s.b_prefix = base64::engine::general_purpose::STANDARD.encode(prefix);
    }
    s
}

fn algorithm_name(a: mail_auth::crypto::Algorithm) -> &'static str {
    use mail_auth::crypto::Algorithm;
    match a {
        Algorithm::RsaSha1 => "rsa-sha1",
        Algorithm::RsaSha256 => "rsa-sha256",
        Algorithm::Ed25519Sha256 => "ed25519-sha256",
        Algorithm::MlDsa44 => "mldsa44",
    }
}

/// All signatures of the message with one result, for a check that did not
/// complete (deadline or internal error).
fn unverified(msg: &AuthenticatedMessage<'_>, result: AuthResult, why: &str) -> Vec<DkimSignature> {
    msg.dkim_signatures()
        .iter()
        .map(|h| {
            let sig = &h.header;
            DkimSignature {
                result,
                domain: sig.d.clone(),
                selector: sig.s.clone(),
                auid: sig.i.clone(),
                algorithm: algorithm_name(sig.a),
                b_prefix: base64::engine::general_purpose::STANDARD
                    .encode(sig.b.get(..6).unwrap_or(&sig.b)),
                reason: Some(why.to_string()),
            }
        })
        .collect()
}

fn arc_outcome(r: &DkimResult, instances: usize) -> ArcOutcome {
    // RFC 8617 knows pass, fail and none; a key lookup that failed
    // transiently is kept apart so that policy can tell it from forgery.
    let (result, reason) = match r {
        DkimResult::Pass => (AuthResult::Pass, None),
        DkimResult::None => (AuthResult::None, None),
        DkimResult::TempError(e) => (AuthResult::TempError, Some(dkim_reason(e))),
        DkimResult::Fail(e) | DkimResult::Neutral(e) | DkimResult::PermError(e) => {
            (AuthResult::Fail, Some(dkim_reason(e)))
        }
    };
    ArcOutcome {
        result,
        instances,
        reason,
    }
}

fn dmarc_outcome(o: &mail_auth::DmarcOutput) -> DmarcOutcome {
    let policy = match o.policy() {
        Policy::Reject => DmarcPolicy::Reject,
        Policy::Quarantine => DmarcPolicy::Quarantine,
        Policy::None | Policy::Unspecified => DmarcPolicy::None,
    };
    let (result, reason) = match o.result() {
        DmarcResult::Pass => (AuthResult::Pass, None),
        DmarcResult::Fail(_) => (
            AuthResult::Fail,
            Some("no aligned SPF or DKIM pass".to_string()),
        ),
        DmarcResult::TempError(e) => (AuthResult::TempError, Some(dkim_reason(&e))),
        DmarcResult::PermError(e) => (AuthResult::PermError, Some(dkim_reason(&e))),
        DmarcResult::None => (AuthResult::None, None),
    };
    DmarcOutcome {
        result,
        policy,
        from_domain: o.domain().to_string(),
        spf_aligned: *o.spf_result() == DmarcResult::Pass,
        dkim_aligned: *o.dkim_result() == DmarcResult::Pass,
        reason,
    }
}

fn dmarc_error(result: AuthResult, why: &str) -> DmarcOutcome {
    DmarcOutcome {
        result,
        policy: DmarcPolicy::None,
        from_domain: String::new(),
        spf_aligned: false,
        dkim_aligned: false,
        reason: Some(why.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_syntax() {
        for ok in [
            "example.com",
            "mail.example.com.",
            "xn--bcher-kva.example",
            "a-b.c",
            "_spf.example.com",
        ] {
            assert_eq!(check_domain(ok, false), Ok(()), "{ok}");
        }
        let long_label = format!("{}.example.com", "a".repeat(64));
        let long_name = format!("{}.com", "abcdefghi.".repeat(26));
        for (bad, why) in [
            ("[192.0.2.1]", "address literal"),
            ("[IPv6:2001:db8::1]", "address literal"),
            ("OEMCOMPUTER", "not a multi-label name"),
            ("A...example.com", "empty label"),
            ("", "empty"),
            ("192.0.2.1", "numeric top label"),
            (long_label.as_str(), "label longer than 63 characters"),
            (long_name.as_str(), "longer than 253 characters"),
            ("legitimate.com(.attacker.com", "invalid character"),
            ("foo bar.com", "invalid character"),
            ("-a.example.com", "label starts or ends with a hyphen"),
        ] {
            assert_eq!(check_domain(bad, false), Err(why), "{bad}");
        }
        // As a query name (mail-auth's own FQDNs) single labels are allowed.
        assert_eq!(check_domain("localhost.", true), Ok(()));
        assert!(check_domain("sel._domainkey.legitimate.com(.attacker.com.", true).is_err());
        // what %{H} makes of an address-literal or quoted HELO
        assert!(check_domain("%5B192.168.218.40%5D.", true).is_err());
        assert!(check_domain("JUMPIN'%20JUPITER.", true).is_err());
    }

    #[test]
    fn signature_fields_are_recognised_as_mail_auth_does() {
        use FieldKind::*;
        for (name, kind) in [
            (&b"DKIM-Signature"[..], Some(DkimSignature)),
            (b"dkim-SIGNATURE \t", Some(DkimSignature)),
            (b"DKIM-Signature\r\n ", Some(DkimSignature)),
            (b"ARC-Seal", Some(ArcSeal)),
            (b"arc-seal-2", Some(ArcSeal)),
            (
                b"ARC-SEALxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
                Some(ArcSeal),
            ),
            (b"Arc-Message-Signature", Some(ArcMessageSignature)),
            (
                b"ARC-Authentication-Results",
                Some(ArcAuthenticationResults),
            ),
            (b"DKIM-Signature2", None),
            (b"DKIM_Signature", None),
            (b"X-DKIM-Signature", None),
            (b"ARC-Seal.", None),
        ] {
            assert_eq!(
                FieldKind::of(name),
                kind,
                "{}",
                String::from_utf8_lossy(name)
            );
        }
    }

    #[test]
    fn signed_fields_counted_as_mail_auth_reads_h() {
        let sig =
            |h: &str| format!("v=1; a=rsa-sha256; d=example.com; s=s; {h}; bh=AAAA; b=AAAA\r\n");
        for (tags, n) in [
            ("h=from:to", 2),
            ("H=from:to:subject", 3),
            ("\r\n h\r\n =\r\n from : to", 2),
            ("h=from; H=a:b:c:d", 4),
            ("h=a:b:c; h=from", 1),
            ("h=a::b:", 2),
        ] {
            assert_eq!(Tags::dkim(sig(tags).as_bytes()).signed_fields, n, "{tags}");
            let ams = sig(tags).replace("v=1", "i=1");
            assert_eq!(Tags::arc(ams.as_bytes()).signed_fields, n, "{tags}");
        }
        assert_eq!(Tags::dkim(b"v=1; garbage").signed_fields, 0);
    }

    #[test]
    fn sanitize_keeps_replies_safe() {
        assert_eq!(sanitize("a\r\nb\tc é", 100), "a??b?c ?");
        assert_eq!(sanitize("abcdef", 3), "abc");
    }

    #[test]
    fn dkim_summary_prefers_the_best_signature() {
        let sig = |r| DkimSignature {
            result: r,
            domain: "d.example".into(),
            selector: "s".into(),
            auid: String::new(),
            algorithm: "rsa-sha256",
            b_prefix: "AAAAAAAA".into(),
            reason: None,
        };
        let mut m = MessageOutcome {
            dkim: Some(vec![
                sig(AuthResult::Fail),
                sig(AuthResult::TempError),
                sig(AuthResult::Pass),
            ]),
            arc: None,
            dmarc: None,
            remote_ip: "192.0.2.1".parse().unwrap(),
            not_checked: None,
            dns: Default::default(),
        };
        assert_eq!(m.dkim_summary().unwrap().0, AuthResult::Pass);
        m.dkim = Some(vec![sig(AuthResult::Neutral), sig(AuthResult::Fail)]);
        assert_eq!(m.dkim_summary().unwrap().0, AuthResult::Fail);
        m.dkim = Some(vec![]);
        assert_eq!(m.dkim_summary().unwrap().0, AuthResult::None);
        m.dkim = None;
        assert!(m.dkim_summary().is_none());
    }

    fn offline_verifier() -> Verifier {
        // Port 9 (discard) on loopback: nothing answers, and these tests must
        // not need DNS at all.
        Verifier::new(&DnsSettings {
            nameservers: vec!["127.0.0.1:9".parse().unwrap()],
            timeout: Duration::from_millis(200),
            attempts: 1,
            cache_entries: 16,
            ..Default::default()
        })
        .unwrap()
    }

    #[tokio::test]
    async fn address_literal_helo_is_none_without_dns() {
        let v = offline_verifier();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for helo in [
            "[192.0.2.1]",
            "[IPv6:2001:db8::1]",
            "OEMCOMPUTER",
            "a..example.com",
        ] {
            let started = Instant::now();
            let o = v.spf(ip, helo, "mx.example.org", "").await;
            assert_eq!(o.result, AuthResult::None, "{helo}: {o:?}");
            assert_eq!(o.identity, SpfIdentity::Helo);
            assert!(o
                .reason
                .as_deref()
                .unwrap()
                .starts_with("HELO name is not a domain name"));
            assert!(
                started.elapsed() < Duration::from_millis(100),
                "no DNS query was made"
            );
        }
        // MAIL FROM with a literal domain: same rule.
        let o = v
            .spf(ip, "[192.0.2.1]", "mx.example.org", "user@[192.0.2.1]")
            .await;
        assert_eq!(
            (o.result, o.identity),
            (AuthResult::None, SpfIdentity::MailFrom)
        );
        assert_eq!(v.stats().queries, 0);
    }

    #[tokio::test]
    async fn sender_forms() {
        let v = offline_verifier();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let o = v.spf(ip, "[192.0.2.1]", "mx", "@bad..example").await;
        assert_eq!(o.sender, "postmaster@bad..example");
        assert_eq!(o.domain, "bad..example");
        let o = v.spf(ip, "h", "mx", "<a@[1.2.3.4]>").await;
        assert_eq!(o.mail_from, "a@[1.2.3.4]");
    }

    #[tokio::test]
    async fn unreachable_dns_is_temperror_within_the_deadline() {
        let v = offline_verifier();
        let started = Instant::now();
        let o = v
            .spf(
                "192.0.2.1".parse().unwrap(),
                "mail.example.com",
                "mx.example.org",
                "a@example.com",
            )
            .await;
        assert_eq!(o.result, AuthResult::TempError, "{o:?}");
        assert!(started.elapsed() < v.deadline + Duration::from_millis(500));
    }

    #[tokio::test]
    async fn message_checks_only_what_is_asked() {
        let v = offline_verifier();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let raw = b"From: a@example.com\r\nSubject: x\r\n\r\nbody\r\n";
        let o = v
            .message(
                raw,
                ip,
                "h.example",
                "a@example.com",
                None,
                Checks::default(),
            )
            .await;
        assert_eq!((o.dkim, o.arc, o.dmarc), (None, None, None));
        let o = v
            .message(
                raw,
                ip,
                "h.example",
                "a@example.com",
                None,
                Checks {
                    dkim: true,
                    ..Checks::default()
                },
            )
            .await;
        assert_eq!(o.dkim, Some(vec![]), "unsigned: dkim=none, no DNS");
        assert!(o.dmarc.is_none() && o.arc.is_none());
        assert_eq!(v.stats().queries, 0);
        // Garbage in: no panic, sensible results.
        for raw in [
            &b""[..],
            b"\r\n\r\n",
            b"\xff\xfe:\r\n",
            b"DKIM-Signature: v=1; d=\r\n\r\n",
        ] {
            let o = v
                .message(
                    raw,
                    ip,
                    "h",
                    "",
                    None,
                    Checks {
                        dkim: true,
                        arc: true,
                        dmarc: false,
                    },
                )
                .await;
            assert!(o.dkim.is_some() && o.arc.is_some());
        }
    }

    /// A From list of long non-ASCII names (each label 1000 code points,
    /// ~350 of them in a 1 MiB header) is refused DMARC before mail-auth
    /// turns each into A-labels, which took seconds of CPU (6.8 s in a
    /// debug build) that the deadline cannot cut: none, at once.
    #[tokio::test]
    async fn a_from_list_of_overlong_names_is_not_converted() {
        let v = offline_verifier();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let label: String = (0..1000u32)
            .map(|i| char::from_u32(0x4e00 + i).unwrap())
            .collect();
        let addr = format!("a@{label}.example,\r\n ");
        let mut raw = String::from("From: ");
        while raw.len() + addr.len() < 1_000_000 {
            raw.push_str(&addr);
        }
        raw.push_str("a@example.org\r\nSubject: x\r\n\r\nbody\r\n");
        let want = Checks {
            dkim: false,
            arc: false,
            dmarc: true,
        };
        let o = v
            .message(raw.as_bytes(), ip, "h.example", "a@example.org", None, want)
            .await;
        let d = o.dmarc.unwrap();
        assert_eq!(d.result, AuthResult::None);
        assert_eq!(
            d.reason.as_deref(),
            Some("From domain longer than a DNS name")
        );
        assert_eq!(v.stats().queries, 0);
    }

    #[test]
    fn verifier_futures_are_send() {
        fn is_send<T: Send>(_: &T) {}
        let v = offline_verifier();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        is_send(&v.spf(ip, "h", "mx", "a@b.example"));
        is_send(&v.message(b"", ip, "h", "", None, Checks::all()));
    }
}
