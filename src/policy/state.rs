//! Limiter state that outlives a configuration: [`PolicyState`] keeps each
//! rule's limiter under a fingerprint of its definition, and
//! [`Policies::compile`] joins a snapshot's specs with it, so a reload keeps
//! the counters of unchanged rules and starts fresh for changed ones.

use super::bans::Bans;
use super::evaluate::{Limiter, Policy, Rule};
use super::limits::{Bucket, Counter, Failures, KnownGood};
use super::spec::{Kind, PolicySpec};
use crate::state::Store;
use governor::Quota;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasher, Hash, Hasher};
use std::num::NonZeroU32;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Long-lived limiter state shared by all compiled policies (survives reloads).
pub struct PolicyState {
    hasher: std::collections::hash_map::RandomState,
    buckets: Mutex<HashMap<String, Arc<Bucket>>>,
    counters: Mutex<HashMap<String, Arc<Counter>>>,
    failures: Mutex<HashMap<String, Arc<Failures>>>,
    hits: Mutex<HashMap<String, Arc<RuleHits>>>,
    pub known_good: KnownGood,
    /// Process-wide: a ban by any policy's rule holds on every listener.
    pub bans: Bans,
    /// The shared store (`state: store: redis`); `None`: all in process.
    pub(super) store: Option<Arc<Store>>,
    /// The `ipv6_prefix` of every ban rule compiled so far: the networks a
    /// client may be banned under in the store (`shared.rs` looks each up).
    /// Kept across reloads, as the bans those rules made are.
    pub(super) ban_prefixes: Mutex<BTreeSet<u8>>,
}

/// How often a rule fired (refused/delayed) and how often it would have (shadow).
#[derive(Default, Debug)]
pub struct RuleHits {
    pub enforced: AtomicU64,
    pub shadow: AtomicU64,
}

impl PolicyState {
    /// `known_good`/`max_keys` bound the known-good networks shared by all
    /// policies, and `max_keys` the bans (`config/defaults.rs` holds the
    /// values the gateway uses).
    pub fn new(known_good: Duration, max_keys: usize) -> Arc<Self> {
        Self::with_store(known_good, max_keys, None)
    }

    /// As [`PolicyState::new`], deciding shared rules in `store` (the
    /// in-process limiters stay, for `on_unavailable: local`).
    pub fn with_store(
        known_good: Duration,
        max_keys: usize,
        store: Option<Arc<Store>>,
    ) -> Arc<Self> {
        Arc::new(PolicyState {
            store,
            hasher: Default::default(),
            buckets: Default::default(),
            counters: Default::default(),
            failures: Default::default(),
            hits: Default::default(),
            known_good: KnownGood::new(known_good, max_keys),
            bans: Bans::new(max_keys),
            ban_prefixes: Default::default(),
        })
    }

    pub(super) fn get<T>(
        map: &Mutex<HashMap<String, Arc<T>>>,
        fp: &str,
        make: impl FnOnce() -> T,
    ) -> Arc<T> {
        let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(fp.to_string())
            .or_insert_with(|| Arc::new(make()))
            .clone()
    }

    /// Drops limiters no compiled policy uses any more.
    fn retain(&self, live: &[String]) {
        self.buckets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| live.contains(k));
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| live.contains(k));
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| live.contains(k));
    }

    /// Periodic memory housekeeping (call every few seconds).
    pub fn housekeeping(&self) {
        let now = Instant::now();
        let buckets: Vec<_> = self
            .buckets
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        for b in buckets {
            b.housekeeping();
        }
        let failures: Vec<_> = self
            .failures
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        for f in failures {
            f.housekeeping(now);
        }
    }

    /// The shared store, when the configuration names one.
    pub fn store(&self) -> Option<&Arc<Store>> {
        self.store.as_ref()
    }

    /// Keys tracked across all limiters (for tests and metrics).
    pub fn tracked_keys(&self) -> usize {
        let b: usize = self
            .buckets
            .lock()
            .map(|m| m.values().map(|b| b.len()).sum())
            .unwrap_or(0);
        let c: usize = self
            .counters
            .lock()
            .map(|m| m.values().map(|c| c.len()).sum())
            .unwrap_or(0);
        let f: usize = self
            .failures
            .lock()
            .map(|m| m.values().map(|f| f.len()).sum())
            .unwrap_or(0);
        b + c + f
    }

    pub(super) fn hash(&self, parts: &[&str]) -> u64 {
        let mut h = self.hasher.build_hasher();
        for p in parts {
            p.hash(&mut h);
            0xffu8.hash(&mut h);
        }
        h.finish()
    }
}

/// All compiled policies of one configuration snapshot.
#[derive(Clone, Default)]
pub struct Policies {
    map: BTreeMap<String, Arc<Policy>>,
}

impl Policies {
    pub fn compile(
        specs: &BTreeMap<String, Arc<PolicySpec>>,
        state: &Arc<PolicyState>,
    ) -> Policies {
        let mut map = BTreeMap::new();
        let mut live = Vec::new();
        for (name, spec) in specs {
            let mut rules = Vec::new();
            for r in &spec.rules {
                let fp = format!(
                    "{name}\u{1}{}\u{1}{:?}\u{1}{:?}\u{1}{}/{}/{}\u{1}{}",
                    r.name,
                    r.key,
                    r.kind,
                    r.prefix_v4,
                    r.prefix_v6,
                    r.ipv6_prefix,
                    spec.max_tracked_keys
                );
                live.push(fp.clone());
                let quota = |count: u32, period: Duration, burst: u32| {
                    let per_cell = (period / count.max(1)).max(Duration::from_nanos(1));
                    Quota::with_period(per_cell)
                        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
                        .allow_burst(NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN))
                };
                let max_keys = spec.max_tracked_keys;
                let limiter = match r.kind {
                    Kind::Rate {
                        count,
                        period,
                        burst,
                    }
                    | Kind::Messages {
                        count,
                        period,
                        burst,
                    }
                    | Kind::Recipients {
                        count,
                        period,
                        burst,
                    } => Limiter::Bucket(PolicyState::get(&state.buckets, &fp, || {
                        Bucket::new(quota(count, period, burst), max_keys)
                    })),
                    Kind::Concurrent(n) => Limiter::Counter(
                        PolicyState::get(&state.counters, &fp, Counter::default),
                        n,
                    ),
                    Kind::AuthFailures { count, window } => {
                        Limiter::Failures(PolicyState::get(&state.failures, &fp, || {
                            Failures::new(count, window, max_keys)
                        }))
                    }
                    Kind::RecipientsPerMessage(n) => Limiter::PerMessage(n),
                    Kind::RcptRefusals { count, window } => {
                        Limiter::Refusals(PolicyState::get(&state.failures, &fp, || {
                            Failures::new(count, window, max_keys)
                        }))
                    }
                };
                if r.action == crate::action::PolicyAction::Ban {
                    state
                        .ban_prefixes
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(r.ipv6_prefix.min(128));
                }
                let hits = PolicyState::get(&state.hits, &fp, RuleHits::default);
                rules.push(Rule {
                    id: crate::state::keys::rule_id(&fp),
                    stage: r.stage(),
                    spec: r.clone(),
                    limiter,
                    hits,
                });
            }
            map.insert(
                name.clone(),
                Arc::new(Policy {
                    name: name.clone(),
                    spec: (**spec).clone(),
                    rules,
                    state: state.clone(),
                }),
            );
        }
        state.retain(&live);
        Policies { map }
    }

    pub fn get(&self, name: &str) -> Option<Arc<Policy>> {
        self.map.get(name).cloned()
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Policy>> {
        self.map.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::fixtures::*;

    #[test]
    fn state_survives_recompile_of_unchanged_rules() {
        let r = rule(
            "conn",
            vec![KeyPart::Ip],
            Kind::Rate {
                count: 2,
                period: Duration::from_secs(60),
                burst: 2,
            },
            PolicyAction::Tempfail,
        );
        let state = PolicyState::new(Duration::from_secs(30 * 86_400), 100_000);
        let mk = |r: RuleSpec| {
            let mut specs = BTreeMap::new();
            specs.insert(
                "p".to_string(),
                Arc::new(PolicySpec {
                    name: "p".into(),
                    deny: vec![],
                    allow: vec![],
                    rules: vec![r],
                    max_tracked_keys: 100,
                    known_good: Duration::from_secs(60),
                    auth: None,
                    dkim_sign: None,
                }),
            );
            Policies::compile(&specs, &state).get("p").unwrap()
        };
        let f = Facts::new(ip("127.0.0.2"), "mx");
        let p1 = mk(r.clone());
        p1.connect(&f).decision.unwrap();
        p1.connect(&f).decision.unwrap();
        let p2 = mk(r.clone());
        assert!(
            p2.connect(&f).decision.is_err(),
            "unchanged rule keeps its counters"
        );
        let mut changed = r;
        changed.kind = Kind::Rate {
            count: 3,
            period: Duration::from_secs(60),
            burst: 3,
        };
        let p3 = mk(changed);
        assert!(p3.connect(&f).decision.is_ok(), "changed rule starts fresh");
    }

    #[test]
    fn many_distinct_keys_stay_bounded() {
        let (p, state) = policy(
            vec![rule(
                "conn",
                vec![KeyPart::Ip],
                Kind::Rate {
                    count: 10,
                    period: Duration::from_secs(60),
                    burst: 10,
                },
                PolicyAction::Tempfail,
            )],
            vec![],
        );
        for i in 0..5000u32 {
            let _ = p
                .connect(&Facts::new(
                    IpAddr::from(std::net::Ipv6Addr::from((u128::from(i) + 1) << 64)),
                    "mx",
                ))
                .decision;
        }
        assert!(state.tracked_keys() <= 1000, "{}", state.tracked_keys());
    }

    #[test]
    fn auth_failure_flood_does_not_lock_out_a_new_user() {
        let (p, state) = policy(
            vec![rule(
                "user",
                vec![KeyPart::AuthUser],
                Kind::AuthFailures {
                    count: 3,
                    window: Duration::from_secs(900),
                },
                PolicyAction::Tempfail,
            )],
            vec![],
        );
        let names: Vec<String> = (0..5000).map(|i| format!("flood{i}")).collect();
        for n in &names {
            let mut f = Facts::new(ip("127.0.0.66"), "pop3");
            f.auth_user = Some(n);
            for _ in 0..3 {
                p.login_failed(&f);
            }
        }
        let mut bob = Facts::new(ip("127.0.0.7"), "pop3");
        bob.auth_user = Some("bob");
        assert_eq!(p.login_allowed(&bob).decision, Decision::Continue);
        p.login_failed(&bob);
        assert_eq!(
            p.login_allowed(&bob).decision,
            Decision::Continue,
            "bob has one failure of his own, not the flood's"
        );
        assert!(state.tracked_keys() <= 1000, "{}", state.tracked_keys());
    }
}
