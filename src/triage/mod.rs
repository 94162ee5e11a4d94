//! Triage at the edge, postscreen style: before an SMTP client is greeted,
//! its address is scored against DNS block and allow lists (weighted), and
//! with `pregreet` the final greeting line is held to catch clients that talk
//! first. A client that passed is remembered and not tested again for
//! `cache`. The SMTP driver runs the tests and acts on the returned
//! [`Triaged`] (its [`TriageVerdict`] and action); the session decides the
//! replies.
//!
//! ```text
//! mod.rs     validated settings (`TriageSpec`, built by config/triage.rs),
//!            the verdict and `Triaged`, the compiled `Triage` a listener
//!            runtime holds
//! score.rs   query names (IPv4 octets, IPv6 nibbles), codes, the score,
//!            the verdict, `triage()` → `Triaged` (sans-IO)
//! lookup.rs  the zones' queries, all started at connect, bounded by `timeout`
//! cache.rs   the allowlist cache of clients that passed (survives reloads)
//! ```

pub mod cache;
pub mod lookup;
pub mod score;

pub use cache::{PassCache, TriageState};
pub use lookup::{Lookups, ZoneLookup};
pub use score::{CodeRange, ZoneResult};

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

/// What a failed test does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TriageAction {
    /// `554 5.7.1`, naming the list(s), then close.
    Reject,
    /// `421 4.7.0`, then close.
    Tempfail,
    /// Logged and counted only; the session goes on.
    Shadow,
    /// As `reject`, and the client is banned on every listener (SMTP, POP3,
    /// IMAP) for `ban_for` (`policy/bans.rs`).
    Ban,
}

impl TriageAction {
    pub const fn as_str(self) -> &'static str {
        match self {
            TriageAction::Reject => "reject",
            TriageAction::Tempfail => "tempfail",
            TriageAction::Shadow => "shadow",
            TriageAction::Ban => "ban",
        }
    }
}

/// One DNS list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneSpec {
    /// The zone, without trailing dot (`zen.spamhaus.org`).
    pub zone: String,
    /// Added to the score when the zone lists the client; negative: an allow list.
    pub weight: i32,
    /// Answers that count as a listing; empty: any 127.0.0.0/8 answer but
    /// 127.255.255.0/24.
    pub codes: Vec<CodeRange>,
}

/// The pregreet test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PregreetSpec {
    /// How long the final `220 ` line is held.
    pub wait: Duration,
    pub action: TriageAction,
    /// How long `action: ban` bans (required with it, `None` otherwise).
    pub ban_for: Option<Duration>,
}

/// A policy's validated `triage:` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TriageSpec {
    pub dnsbl: Vec<ZoneSpec>,
    /// A score at or above this is a DNSBL hit.
    pub threshold: i32,
    /// What a DNSBL hit does.
    pub action: TriageAction,
    /// How long `action: ban` bans (required with it, `None` otherwise).
    pub ban_for: Option<Duration>,
    pub pregreet: Option<PregreetSpec>,
    /// How long a client that passed is not tested again (0: never cached).
    pub cache: Duration,
    /// Addresses the cache holds at most.
    pub cache_size: usize,
    /// How long after connect the zones' answers are awaited.
    pub timeout: Duration,
}

impl TriageSpec {
    /// The `mailgate check` lines.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let zones: Vec<String> = self
            .dnsbl
            .iter()
            .map(|z| {
                let codes: Vec<String> = z.codes.iter().map(|c| c.to_string()).collect();
                if codes.is_empty() {
                    format!("{} ({:+})", z.zone, z.weight)
                } else {
                    format!("{} ({:+}, codes {})", z.zone, z.weight, codes.join(","))
                }
            })
            .collect();
        let _ = writeln!(
            out,
            "    triage (SMTP, before the greeting): dnsbl [{}] threshold {} action={}{} timeout={}ms",
            zones.join(", "),
            self.threshold,
            self.action.as_str(),
            ban_text(self.ban_for),
            self.timeout.as_millis()
        );
        if let Some(p) = &self.pregreet {
            let _ = writeln!(
                out,
                "    triage pregreet: final 220 line held {}ms action={}{}",
                p.wait.as_millis(),
                p.action.as_str(),
                ban_text(p.ban_for)
            );
        }
        let _ = writeln!(
            out,
            "    triage cache: passed clients not re-tested for {}s (at most {} addresses)",
            self.cache.as_secs(),
            self.cache_size
        );
        out
    }
}

/// ` for 3600s (every listener)` after `action=ban` in `check`.
fn ban_text(ban_for: Option<Duration>) -> String {
    ban_for.map_or(String::new(), |d| {
        format!(" for {}s (every listener)", d.as_secs())
    })
}

/// What the triage of one connection found (the fact the driver acts on and
/// logs; a later ban rule may act on it too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TriageVerdict {
    /// The client passed recently (allowlist cache): nothing was tested.
    Cached,
    /// Every test passed.
    Pass { score: i32 },
    /// The score reached the threshold; `zones` are the block lists listing it.
    Listed { score: i32, zones: Vec<String> },
    /// The client sent something before the final greeting line.
    Pregreet,
}

impl TriageVerdict {
    /// Log word and metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            TriageVerdict::Cached => "cached",
            TriageVerdict::Pass { .. } => "pass",
            TriageVerdict::Listed { .. } => "listed",
            TriageVerdict::Pregreet => "pregreet",
        }
    }
}

/// One connection's triage: the fact the driver acts on (through the
/// session), logs and counts, and a later ban rule may act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Triaged {
    pub verdict: TriageVerdict,
    /// What is done: `None` for a pass (tested or cached).
    pub action: Option<TriageAction>,
    pub score: score::Score,
    /// The client talked before the final greeting line.
    pub pregreet: bool,
    /// The tests that failed (`dnsbl`, `pregreet`) and whether each is only shadowed.
    pub hits: Vec<(&'static str, bool)>,
    /// `action: ban`: how long the client is to be banned (the driver bans).
    pub ban_for: Option<Duration>,
}

impl Triaged {
    /// An allowlist cache hit: nothing tested.
    pub fn cached() -> Triaged {
        Triaged {
            verdict: TriageVerdict::Cached,
            action: None,
            score: score::Score::default(),
            pregreet: false,
            hits: Vec::new(),
            ban_for: None,
        }
    }

    /// `none` (a pass), `shadow` or `enforced`: the metric label.
    pub fn mode(&self) -> &'static str {
        match self.action {
            None => "none",
            Some(TriageAction::Shadow) => "shadow",
            Some(_) => "enforced",
        }
    }

    /// Whether the client passed every test (and may be cached).
    pub fn passed(&self) -> bool {
        self.action.is_none()
    }
}

/// A policy's triage as a listener runtime holds it: the settings, the
/// policy's pass cache (long-lived) and the resolver.
pub struct Triage {
    pub policy: String,
    pub spec: Arc<TriageSpec>,
    pub cache: Arc<PassCache>,
    pub dns: Arc<crate::auth::Verifier>,
    /// The shared store (`state: store: redis`): passes are shared by the
    /// instances, see [`Triage::passed`].
    pub store: Option<Arc<crate::state::Store>>,
}

impl Triage {
    pub fn new(
        policy: &str,
        spec: Arc<TriageSpec>,
        state: &TriageState,
        dns: Arc<crate::auth::Verifier>,
    ) -> Triage {
        Triage {
            policy: policy.to_string(),
            cache: state.cache(policy, spec.cache, spec.cache_size),
            spec,
            dns,
            store: None,
        }
    }
}

/// The pass cache across instances (`state: store: redis`): a pass is
/// remembered here and, in the background, in the store's TTL set
/// `pass:<policy>` for `cache`; a client this instance has not seen pass
/// is looked up there (one call, under the store's `timeout`) before it is
/// tested. A store that fails or is slow only means testing the client
/// (the stricter path), never letting it through untested.
impl Triage {
    fn pass_set(&self, store: &crate::state::Store) -> String {
        crate::state::keys::ttl_set(&store.settings().prefix, &format!("pass:{}", self.policy))
    }

    /// Whether `ip` passed recently, on this instance or another.
    pub async fn passed(&self, ip: std::net::IpAddr, now: std::time::Instant) -> bool {
        if self.cache.passed(ip, now) {
            return true;
        }
        let Some(store) = &self.store else {
            return false;
        };
        if self.spec.cache.is_zero() {
            return false;
        }
        let op = crate::state::Op::SetGet {
            key: self.pass_set(store),
            member: crate::units::canonical(ip).to_string(),
        };
        match store.run(&[op], &store.token()).await.as_deref() {
            Ok([crate::state::Answer::Member(_, left)]) if !left.is_zero() => {
                self.cache.remember(ip, now);
                true
            }
            _ => false,
        }
    }

    /// `ip` passed every test: remembered here and in the store.
    pub fn remember(&self, ip: std::net::IpAddr, now: std::time::Instant) {
        self.cache.remember(ip, now);
        let Some(store) = &self.store else {
            return;
        };
        if self.spec.cache.is_zero() {
            return;
        }
        let op = crate::state::Op::SetPut {
            key: self.pass_set(store),
            member: crate::units::canonical(ip).to_string(),
            value: String::new(),
            ttl: self.spec.cache,
            // bounded like the local cache (`cache_size`)
            max: u32::try_from(self.spec.cache_size).unwrap_or(u32::MAX),
        };
        store.run_in_background(vec![op], None);
    }
}
