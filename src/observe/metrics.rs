//! The process's metric families (prometheus-client), one registry for the
//! process. Counters are incremented at the edges (server, drivers) from the
//! facts that policy, auth and backend return, never from inside those
//! modules (so their unit tests read returned values, not process-global
//! counters); label values
//! are configuration names or small fixed sets, never client-controlled text
//! (no cardinality explosion from hostile input).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::OnceLock;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SessionLabels {
    pub listener: String,
    pub protocol: &'static str,
    pub tls: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsLabels {
    pub listener: String,
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    pub listener: String,
    pub command: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub listener: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    pub policy: String,
    pub rule: String,
    pub mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub listener: String,
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    pub check: &'static str,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignedLabels {
    pub domain: String,
    pub selector: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignRefusalLabels {
    pub policy: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BanLabels {
    pub policy: String,
    pub rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BanSkipLabels {
    pub policy: String,
    pub rule: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriageLabels {
    pub policy: String,
    pub verdict: &'static str,
    pub mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriageTestLabels {
    pub policy: String,
    pub test: &'static str,
    pub mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ZoneLabels {
    pub policy: String,
    pub zone: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ZoneNameLabels {
    pub zone: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    /// What was asked of the shared state store (`stage`, `refresh`, …).
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabels {
    /// `state.on_unavailable`: local, accept or tempfail.
    pub mode: &'static str,
}

type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn store_latency() -> Histogram {
    // 50 µs … ~0.4 s: a store on the LAN answers in well under a millisecond
    Histogram::new(exponential_buckets(0.00005, 2.0, 14))
}

fn latency() -> Histogram {
    // 0.5 ms … ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    pub sessions: Family<SessionLabels, Counter>,
    pub sessions_current: Family<ListenerLabels, Gauge>,
    pub tls_handshakes: Family<TlsLabels, Counter>,
    pub tls_failures: Family<ListenerLabels, Counter>,
    pub commands: Family<CommandLabels, Counter>,
    pub transactions: Family<OutcomeLabels, Counter>,
    pub session_ends: Family<OutcomeLabels, Counter>,
    pub refused_connections: Family<OutcomeLabels, Counter>,
    pub policy_hits: Family<RuleLabels, Counter>,
    pub auth_results: Family<VerdictLabels, Counter>,
    pub backend_connect: HistFamily<BackendLabels>,
    pub backend_reply: HistFamily<BackendLabels>,
    pub backend_failures: Family<BackendLabels, Counter>,
    /// Client sessions served by an idle backend connection (`reuse:`).
    pub backend_reused: Family<BackendLabels, Counter>,
    pub dns_lookup: Histogram,
    pub dns_failures: Counter,
    pub bytes: Family<BytesLabels, Counter>,
    /// Message bytes held in memory by DATA (`server.max_inflight_data`).
    pub inflight_bytes: Gauge,
    pub inflight_refused: Counter,
    pub backend_out_of_step: Family<BackendLabels, Counter>,
    /// DKIM signatures made (`dkim_sign`), by key (configuration names).
    pub dkim_signed: Family<SignedLabels, Counter>,
    pub dkim_sign_refusals: Family<SignRefusalLabels, Counter>,
    /// Bans in force (`policy/bans.rs`), set where bans change and by housekeeping.
    pub bans_active: Gauge,
    pub bans: Family<BanLabels, Counter>,
    pub bans_skipped: Family<BanSkipLabels, Counter>,
    pub bans_evicted: Counter,
    /// Triage decisions (one per SMTP connection of a policy with `triage:`).
    pub triage_decisions: Family<TriageLabels, Counter>,
    /// Failed triage tests (dnsbl, pregreet), enforced or shadow.
    pub triage_hits: Family<TriageTestLabels, Counter>,
    /// DNS list answers by zone and meaning (listed, not_listed, list_refused, failed).
    pub triage_zone_answers: Family<ZoneLabels, Counter>,
    pub triage_lookup: HistFamily<ZoneNameLabels>,
    /// Clients let through by the allowlist cache, untested.
    pub triage_cache_hits: Family<PolicyLabels, Counter>,
    /// Round trips to the shared state store (`state: store: redis`).
    pub store_latency: HistFamily<StoreLabels>,
    pub store_errors: Family<StoreLabels, Counter>,
    /// Decisions taken without the store, by `on_unavailable` mode.
    pub store_fallbacks: Family<FallbackLabels, Counter>,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("mailgate");
        let m = Metrics {
            sessions: Family::default(),
            sessions_current: Family::default(),
            tls_handshakes: Family::default(),
            tls_failures: Family::default(),
            commands: Family::default(),
            transactions: Family::default(),
            session_ends: Family::default(),
            refused_connections: Family::default(),
            policy_hits: Family::default(),
            auth_results: Family::default(),
            backend_connect: Family::new_with_constructor(latency),
            backend_reply: Family::new_with_constructor(latency),
            backend_failures: Family::default(),
            backend_reused: Family::default(),
            dns_lookup: latency(),
            dns_failures: Counter::default(),
            bytes: Family::default(),
            inflight_bytes: Gauge::default(),
            inflight_refused: Counter::default(),
            backend_out_of_step: Family::default(),
            dkim_signed: Family::default(),
            dkim_sign_refusals: Family::default(),
            bans_active: Gauge::default(),
            bans: Family::default(),
            bans_skipped: Family::default(),
            bans_evicted: Counter::default(),
            triage_decisions: Family::default(),
            triage_hits: Family::default(),
            triage_zone_answers: Family::default(),
            triage_lookup: Family::new_with_constructor(latency),
            triage_cache_hits: Family::default(),
            store_latency: Family::new_with_constructor(store_latency),
            store_errors: Family::default(),
            store_fallbacks: Family::default(),
            registry: Registry::default(),
        };
        registry.register("sessions", "Client sessions accepted", m.sessions.clone());
        registry.register(
            "sessions_current",
            "Client sessions in progress",
            m.sessions_current.clone(),
        );
        registry.register(
            "tls_handshakes",
            "Successful TLS handshakes by protocol version",
            m.tls_handshakes.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "Failed or timed-out TLS handshakes",
            m.tls_failures.clone(),
        );
        registry.register("commands", "Commands received, by verb", m.commands.clone());
        registry.register(
            "transactions",
            "SMTP transactions by outcome",
            m.transactions.clone(),
        );
        registry.register(
            "session_ends",
            "Client sessions of every protocol by how they ended",
            m.session_ends.clone(),
        );
        registry.register(
            "refused_connections",
            "Connections refused before the session (deny, limits, PROXY)",
            m.refused_connections.clone(),
        );
        registry.register(
            "policy_limit_hits",
            "Policy limit hits by rule (mode enforced or shadow)",
            m.policy_hits.clone(),
        );
        registry.register(
            "auth_results",
            "SPF/DKIM/DMARC/ARC results",
            m.auth_results.clone(),
        );
        registry.register(
            "backend_connect_seconds",
            "Time to a ready backend connection (greeting, EHLO)",
            m.backend_connect.clone(),
        );
        registry.register(
            "backend_reply_seconds",
            "Backend final reply latency after a message (DATA) or login",
            m.backend_reply.clone(),
        );
        registry.register(
            "backend_failures",
            "Backend connections that failed or broke",
            m.backend_failures.clone(),
        );
        registry.register(
            "backend_reused",
            "Client sessions served by an idle SMTP backend connection (reuse:), once it answered there",
            m.backend_reused.clone(),
        );
        registry.register(
            "dns_lookup_seconds",
            "DNS lookup latency for SPF/DKIM/DMARC",
            m.dns_lookup.clone(),
        );
        registry.register(
            "dns_failures",
            "DNS lookups that failed",
            m.dns_failures.clone(),
        );
        registry.register(
            "bytes",
            "Client bytes by direction (in = from clients)",
            m.bytes.clone(),
        );
        registry.register(
            "inflight_data_bytes",
            "Message bytes held in memory by DATA (budget: server.max_inflight_data)",
            m.inflight_bytes.clone(),
        );
        registry.register(
            "inflight_data_refusals",
            "Messages refused with 452 4.3.1 because the in-flight budget was spent",
            m.inflight_refused.clone(),
        );
        registry.register(
            "backend_out_of_step",
            "Backend connections dropped because a reply came unasked or did not fit its command",
            m.backend_out_of_step.clone(),
        );
        registry.register(
            "dkim_signed",
            "DKIM signatures made, by key (a dual-signed message counts once per key)",
            m.dkim_signed.clone(),
        );
        registry.register(
            "dkim_sign_refusals",
            "Messages not relayed because of dkim_sign, by reason",
            m.dkim_sign_refusals.clone(),
        );
        registry.register(
            "bans_active",
            "Client networks banned now (refused on every listener)",
            m.bans_active.clone(),
        );
        registry.register("bans", "Bans made by action: ban rules", m.bans.clone());
        registry.register(
            "bans_skipped",
            "Bans a rule called for but did not make (shadow, trusted_proxy)",
            m.bans_skipped.clone(),
        );
        registry.register(
            "bans_evicted",
            "Bans dropped (the soonest expiring) because the ban list was full",
            m.bans_evicted.clone(),
        );
        registry.register(
            "triage_decisions",
            "Triage decisions before the SMTP greeting, by verdict (mode enforced, shadow or none for a pass)",
            m.triage_decisions.clone(),
        );
        registry.register(
            "triage_hits",
            "Failed triage tests (dnsbl score at the threshold, pregreet), by mode",
            m.triage_hits.clone(),
        );
        registry.register(
            "triage_zone_answers",
            "DNS list answers by zone: listed, not_listed, list_refused (127.255.255.x), failed (timeout, SERVFAIL)",
            m.triage_zone_answers.clone(),
        );
        registry.register(
            "triage_lookup_seconds",
            "DNS list lookup latency by zone (answered lookups)",
            m.triage_lookup.clone(),
        );
        registry.register(
            "triage_cache_hits",
            "Clients let through untested by the triage allowlist cache",
            m.triage_cache_hits.clone(),
        );
        registry.register(
            "state_store_seconds",
            "Round trips to the shared state store, by operation",
            m.store_latency.clone(),
        );
        registry.register(
            "state_store_errors",
            "Shared state store calls that failed or timed out, by operation",
            m.store_errors.clone(),
        );
        registry.register(
            "state_store_fallbacks",
            "Policy decisions taken without the shared store (state.on_unavailable)",
            m.store_fallbacks.clone(),
        );
        Metrics { registry, ..m }
    }

    /// OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn command(&self, listener: &str, command: &'static str) {
        self.commands
            .get_or_create(&CommandLabels {
                listener: listener.to_string(),
                command,
            })
            .inc();
    }

    pub fn outcome(&self, listener: &str, outcome: &'static str) {
        self.transactions
            .get_or_create(&OutcomeLabels {
                listener: listener.to_string(),
                outcome,
            })
            .inc();
    }

    /// A session ended (`End::label`: a fixed set, never client text).
    pub fn session_end(&self, listener: &str, outcome: &'static str) {
        self.session_ends
            .get_or_create(&OutcomeLabels {
                listener: listener.to_string(),
                outcome,
            })
            .inc();
    }

    pub fn refused(&self, listener: &str, reason: &'static str) {
        self.refused_connections
            .get_or_create(&OutcomeLabels {
                listener: listener.to_string(),
                outcome: reason,
            })
            .inc();
    }

    pub fn bytes(&self, listener: &str, bytes_in: u64, bytes_out: u64) {
        self.bytes
            .get_or_create(&BytesLabels {
                listener: listener.to_string(),
                direction: "in",
            })
            .inc_by(bytes_in);
        self.bytes
            .get_or_create(&BytesLabels {
                listener: listener.to_string(),
                direction: "out",
            })
            .inc_by(bytes_out);
    }

    pub fn tls_ok(&self, listener: &str, version: &str) {
        self.tls_handshakes
            .get_or_create(&TlsLabels {
                listener: listener.to_string(),
                version: version.to_string(),
            })
            .inc();
    }

    pub fn tls_failed(&self, listener: &str) {
        self.tls_failures
            .get_or_create(&ListenerLabels {
                listener: listener.to_string(),
            })
            .inc();
    }

    /// A ban made by `policy`'s `rule`; `active` bans now.
    pub fn banned(&self, policy: &str, rule: &str, active: usize, evicted: bool) {
        self.bans
            .get_or_create(&BanLabels {
                policy: policy.to_string(),
                rule: rule.to_string(),
            })
            .inc();
        self.bans_active_now(active);
        if evicted {
            self.bans_evicted.inc();
        }
    }

    /// A ban not made: `shadow` or `trusted_proxy`.
    pub fn ban_skipped(&self, policy: &str, rule: &str, reason: &'static str) {
        self.bans_skipped
            .get_or_create(&BanSkipLabels {
                policy: policy.to_string(),
                rule: rule.to_string(),
                reason,
            })
            .inc();
    }

    pub fn bans_active_now(&self, active: usize) {
        self.bans_active
            .set(i64::try_from(active).unwrap_or(i64::MAX));
    }

    pub fn policy_hit(&self, policy: &str, rule: &str, shadow: bool) {
        let mode = if shadow { "shadow" } else { "enforced" };
        self.policy_hits
            .get_or_create(&RuleLabels {
                policy: policy.to_string(),
                rule: rule.to_string(),
                mode,
            })
            .inc();
    }

    pub fn auth_result(&self, check: &'static str, result: &str) {
        self.auth_results
            .get_or_create(&VerdictLabels {
                check,
                result: result.to_string(),
            })
            .inc();
    }

    /// One check's DNS: the answered queries' times and the unanswered count.
    pub fn dns_facts(&self, answered: &[std::time::Duration], unanswered: u64) {
        for d in answered {
            self.dns_lookup.observe(d.as_secs_f64());
        }
        self.dns_failures.inc_by(unanswered);
    }

    pub fn backend_connected(&self, backend: &str, seconds: f64) {
        self.backend_connect
            .get_or_create(&BackendLabels {
                backend: backend.to_string(),
            })
            .observe(seconds);
    }

    pub fn backend_replied(&self, backend: &str, seconds: f64) {
        self.backend_reply
            .get_or_create(&BackendLabels {
                backend: backend.to_string(),
            })
            .observe(seconds);
    }

    pub fn backend_reused(&self, backend: &str) {
        self.backend_reused
            .get_or_create(&BackendLabels {
                backend: backend.to_string(),
            })
            .inc();
    }

    pub fn backend_failed(&self, backend: &str) {
        self.backend_failures
            .get_or_create(&BackendLabels {
                backend: backend.to_string(),
            })
            .inc();
    }

    pub fn dkim_signed(&self, domain: &str, selector: &str) {
        self.dkim_signed
            .get_or_create(&SignedLabels {
                domain: domain.to_string(),
                selector: selector.to_string(),
            })
            .inc();
    }

    pub fn dkim_sign_refused(&self, policy: &str, reason: &'static str) {
        self.dkim_sign_refusals
            .get_or_create(&SignRefusalLabels {
                policy: policy.to_string(),
                reason,
            })
            .inc();
    }

    /// One triage decision; `mode` is `enforced`, `shadow` or `none` (a pass).
    pub fn triage_decision(&self, policy: &str, verdict: &'static str, mode: &'static str) {
        self.triage_decisions
            .get_or_create(&TriageLabels {
                policy: policy.to_string(),
                verdict,
                mode,
            })
            .inc();
        if verdict == "cached" {
            self.triage_cache_hits
                .get_or_create(&PolicyLabels {
                    policy: policy.to_string(),
                })
                .inc();
        }
    }

    pub fn triage_hit(&self, policy: &str, test: &'static str, shadow: bool) {
        self.triage_hits
            .get_or_create(&TriageTestLabels {
                policy: policy.to_string(),
                test,
                mode: if shadow { "shadow" } else { "enforced" },
            })
            .inc();
    }

    /// One zone's answer; `took` is observed for answers that arrived.
    pub fn triage_zone(
        &self,
        policy: &str,
        zone: &str,
        result: &'static str,
        took: Option<std::time::Duration>,
    ) {
        self.triage_zone_answers
            .get_or_create(&ZoneLabels {
                policy: policy.to_string(),
                zone: zone.to_string(),
                result,
            })
            .inc();
        if let Some(d) = took {
            self.triage_lookup
                .get_or_create(&ZoneNameLabels {
                    zone: zone.to_string(),
                })
                .observe(d.as_secs_f64());
        }
    }

    pub fn store_call(&self, op: &'static str, seconds: f64, ok: bool) {
        self.store_latency
            .get_or_create(&StoreLabels { op })
            .observe(seconds);
        if !ok {
            self.store_errors.get_or_create(&StoreLabels { op }).inc();
        }
    }

    pub fn store_fallback(&self, mode: &'static str) {
        self.store_fallbacks
            .get_or_create(&FallbackLabels { mode })
            .inc();
    }

    pub fn backend_out_of_step(&self, backend: &str) {
        self.backend_out_of_step
            .get_or_create(&BackendLabels {
                backend: backend.to_string(),
            })
            .inc();
    }
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    METRICS.get_or_init(Metrics::new)
}

/// Counts a session for its lifetime: `sessions_total` on creation,
/// `sessions_current` up now and down on drop.
pub struct SessionGauge {
    listener: String,
}

impl SessionGauge {
    pub fn new(listener: &str, protocol: &'static str, tls: &'static str) -> Self {
        let m = metrics();
        m.sessions
            .get_or_create(&SessionLabels {
                listener: listener.to_string(),
                protocol,
                tls,
            })
            .inc();
        m.sessions_current
            .get_or_create(&ListenerLabels {
                listener: listener.to_string(),
            })
            .inc();
        SessionGauge {
            listener: listener.to_string(),
        }
    }
}

impl Drop for SessionGauge {
    fn drop(&mut self) {
        metrics()
            .sessions_current
            .get_or_create(&ListenerLabels {
                listener: self.listener.clone(),
            })
            .dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_families() {
        let m = metrics();
        m.command("t", "EHLO");
        m.policy_hit("p", "r", true);
        let _g = SessionGauge::new("t", "smtp", "none");
        let text = m.encode();
        assert!(text.contains("# TYPE mailgate_commands counter"), "{text}");
        assert!(
            text.contains("mailgate_commands_total{listener=\"t\",command=\"EHLO\"}"),
            "{text}"
        );
        assert!(
            text.contains(
                "mailgate_policy_limit_hits_total{policy=\"p\",rule=\"r\",mode=\"shadow\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("mailgate_sessions_current{listener=\"t\"} 1"),
            "{text}"
        );
        m.dkim_signed("example.org", "s2026");
        m.dkim_sign_refused("submission", "unknown_domain");
        let text = m.encode();
        assert!(
            text.contains(
                "mailgate_dkim_signed_total{domain=\"example.org\",selector=\"s2026\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("mailgate_dkim_sign_refusals_total{policy=\"submission\",reason=\"unknown_domain\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
