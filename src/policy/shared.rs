//! The same per-stage decisions as `evaluate.rs`, taken in the shared store
//! when the configuration names one (`state: store: redis`): each stage's
//! shared rules become the ops of one store call (one round trip), in rule
//! order, with the same stop points, and the answers are turned into hits
//! and decisions by the same `Policy::hit`. Without a store these methods
//! are the in-process ones, unchanged.
//!
//! When the store cannot answer within `timeout`: `on_unavailable` decides
//! (`local`: the in-process limiters; `accept`: no limit; `tempfail`: a
//! temporary refusal), counted in `mailgate_state_store_fallbacks_total`.

use super::bans::{BanCause, BanInfo, Bans};
use super::evaluate::{Checked, ConnectPermit, Decision, Facts, Limiter, Policy, Rule};
use super::spec::PolicyStage;
use super::state::PolicyState;
use crate::action::PolicyAction;
use crate::state::keys::{self, KeyKind};
use crate::state::{Answer, OnUnavailable, Op, Store};
use std::net::IpAddr;
use std::time::{Duration, Instant};
use tracing::{debug, info};

/// The rule name of a refusal because the store was unavailable
/// (`on_unavailable: tempfail`).
pub const STORE_RULE: &str = "state_store";

/// Whether a hit of this rule refuses (the script then stops, as the
/// in-process loop does); a ban refuses as `reject` does, unless it is
/// `shadow: true` (it only observes: the rules after it must still run).
fn refuses(rule: &Rule) -> bool {
    !rule.spec.shadow
        && matches!(
            rule.spec.action,
            PolicyAction::Tempfail | PolicyAction::Reject | PolicyAction::Ban
        )
}

/// A full `concurrent` rule refuses unless it only observes (a delay would
/// admit the session uncounted: `evaluate.rs` turns it into a refusal).
fn full_refuses(rule: &Rule) -> bool {
    !rule.spec.shadow
        && !matches!(
            rule.spec.action,
            PolicyAction::Shadow | PolicyAction::Accept | PolicyAction::Tag
        )
}

fn store_refusal() -> Decision {
    Decision::Refuse {
        action: PolicyAction::Tempfail,
        rule: STORE_RULE.into(),
    }
}

/// One planned step of a stage: a rule with its key values, answered by the
/// store (`Some(op index)`) or a per-message cap decided here (`None`).
struct Step<'a> {
    rule: &'a Rule,
    values: Vec<String>,
    op: Option<usize>,
}

impl Policy {
    fn key(&self, store: &Store, kind: KeyKind, rule: &Rule, values: &[String]) -> String {
        let refs: Vec<&str> = values.iter().map(String::as_str).collect();
        keys::limiter(&store.settings().prefix, kind, &rule.id, &refs)
    }

    /// The store failed: what `on_unavailable` says, counted.
    fn unavailable(store: &Store) -> OnUnavailable {
        let mode = store.settings().on_unavailable;
        crate::observe::metrics().store_fallback(mode.as_str());
        mode
    }

    /// [`Policy::connect`], shared: connection rates and session leases.
    pub async fn connect_shared(&self, f: &Facts<'_>) -> Checked<Result<ConnectPermit, Decision>> {
        let Some(store) = self.state.store.clone() else {
            return self.connect(f);
        };
        if self.denied(f.ip) {
            return self.connect(f);
        }
        let mut steps = Vec::new();
        let mut ops = Vec::new();
        for (rule, values) in self.applicable(PolicyStage::Connect, f) {
            let op = match &rule.limiter {
                Limiter::Bucket(b) => Op::Rate {
                    key: self.key(&store, KeyKind::Rate, rule, &values),
                    per_cell: b.per_cell(),
                    burst_time: b.burst_time(),
                    stop: refuses(rule),
                },
                Limiter::Counter(_, max) => Op::Lease {
                    key: self.key(&store, KeyKind::Lease, rule, &values),
                    max: *max,
                    stop: full_refuses(rule),
                },
                _ => continue,
            };
            steps.push(Step {
                rule,
                values,
                op: Some(ops.len()),
            });
            ops.push(op);
        }
        if ops.is_empty() {
            return self.connect(f);
        }
        let token = store.token();
        let answers = match store.run(&ops, &token).await {
            Ok(a) => a,
            Err(_) => {
                return match Self::unavailable(&store) {
                    OnUnavailable::Local => self.connect(f),
                    OnUnavailable::Accept => Checked {
                        decision: Ok(ConnectPermit::default()),
                        hits: Vec::new(),
                    },
                    OnUnavailable::Tempfail => Checked {
                        decision: Err(store_refusal()),
                        hits: Vec::new(),
                    },
                }
            }
        };
        let mut hits = Vec::new();
        let mut granted = Vec::new();
        let mut decision = Decision::Continue;
        for (step, answer) in steps.iter().zip(answers) {
            let rule = step.rule;
            let d = match answer {
                Answer::Wait(wait) => self.hit(rule, f.ip, &step.values, wait, &mut hits),
                Answer::Full => {
                    match self.hit(rule, f.ip, &step.values, rule.spec.max_delay, &mut hits) {
                        Decision::Delay(_) => Decision::Refuse {
                            action: PolicyAction::Tempfail,
                            rule: rule.spec.name.clone(),
                        },
                        d => d,
                    }
                }
                _ => {
                    if let Some(Op::Lease { key, .. }) = step.op.map(|i| &ops[i]) {
                        granted.push(key.clone());
                    }
                    Decision::Continue
                }
            };
            decision = Self::combine(decision, d);
            if matches!(decision, Decision::Refuse { .. }) {
                // the script gave this call's leases back when it stopped
                return Checked {
                    decision: Err(decision),
                    hits,
                };
            }
        }
        Checked {
            decision: Ok(ConnectPermit {
                _guards: Vec::new(),
                _leases: granted
                    .into_iter()
                    .map(|key| store.hold(key, token.clone()))
                    .collect(),
                delay: match decision {
                    Decision::Delay(d) => d,
                    _ => Duration::ZERO,
                },
            }),
            hits,
        }
    }

    /// [`Policy::check`], shared: the stage's rates in one call; per-message
    /// caps are decided here, in rule order (a refusing cap ends the plan
    /// there, so later rates are not charged, as in process).
    pub async fn check_shared(&self, stage: PolicyStage, f: &Facts<'_>) -> Checked<Decision> {
        let Some(store) = self.state.store.clone() else {
            return self.check(stage, f);
        };
        if let Some(refusal) = self.banned_now(f) {
            return Checked {
                decision: refusal,
                hits: Vec::new(),
            };
        }
        let mut steps = Vec::new();
        let mut ops = Vec::new();
        self.plan_rates(&store, stage, f, &mut steps, &mut ops);
        if ops.is_empty() {
            return self.check(stage, f);
        }
        let answers = match store.run(&ops, &store.token()).await {
            Ok(a) => a,
            Err(_) => return self.check_unavailable(&store, stage, f),
        };
        let mut hits = Vec::new();
        let decision = self.decide_rates(&steps, &answers, f, &mut hits);
        Checked { decision, hits }
    }

    fn check_unavailable(&self, store: &Store, stage: PolicyStage, f: &Facts) -> Checked<Decision> {
        let decision = match Self::unavailable(store) {
            OnUnavailable::Local => return self.check(stage, f),
            OnUnavailable::Accept => Decision::Continue,
            OnUnavailable::Tempfail => store_refusal(),
        };
        Checked {
            decision,
            hits: Vec::new(),
        }
    }

    /// The rate rules (and per-message caps) of `stage` as steps and ops.
    fn plan_rates<'a>(
        &'a self,
        store: &Store,
        stage: PolicyStage,
        f: &'a Facts<'_>,
        steps: &mut Vec<Step<'a>>,
        ops: &mut Vec<Op>,
    ) {
        for (rule, values) in self.applicable(stage, f) {
            match &rule.limiter {
                Limiter::Bucket(b) => {
                    ops.push(Op::Rate {
                        key: self.key(store, KeyKind::Rate, rule, &values),
                        per_cell: b.per_cell(),
                        burst_time: b.burst_time(),
                        stop: refuses(rule),
                    });
                    steps.push(Step {
                        rule,
                        values,
                        op: Some(ops.len() - 1),
                    });
                }
                Limiter::PerMessage(max) if f.rcpts_in_message >= *max as usize => {
                    steps.push(Step {
                        rule,
                        values,
                        op: None,
                    });
                    if refuses(rule) {
                        return;
                    }
                }
                // not shared (counted in process, as `check` does); a ban
                // rule acts when the refusal is recorded (`rcpt_refused`)
                Limiter::Refusals(_)
                    if rule.spec.action != PolicyAction::Ban
                        && self.refusals_wait(rule, &values).is_some() =>
                {
                    steps.push(Step {
                        rule,
                        values,
                        op: None,
                    });
                    if refuses(rule) {
                        return;
                    }
                }
                _ => {}
            }
        }
    }

    /// How long an in-process `rcpt_refusals` window keeps refusing these
    /// key values (`None`: under its count).
    fn refusals_wait(&self, rule: &Rule, values: &[String]) -> Option<Duration> {
        let Limiter::Refusals(r) = &rule.limiter else {
            return None;
        };
        let refs: Vec<&str> = values.iter().map(String::as_str).collect();
        r.locked(self.state.hash(&refs), Instant::now())
    }

    /// Hits and the decision from a stage's rate answers, in rule order.
    fn decide_rates(
        &self,
        steps: &[Step],
        answers: &[Answer],
        f: &Facts,
        hits: &mut Vec<super::Hit>,
    ) -> Decision {
        let mut decision = Decision::Continue;
        for step in steps {
            let d = match step.op {
                // the script stopped before this op
                Some(i) if i >= answers.len() => break,
                Some(i) => match &answers[i] {
                    Answer::Wait(wait) => self.hit(step.rule, f.ip, &step.values, *wait, hits),
                    _ => Decision::Continue,
                },
                None => match step.rule.limiter {
                    Limiter::PerMessage(max) if f.rcpts_in_message >= max as usize => {
                        self.hit(step.rule, f.ip, &step.values, Duration::ZERO, hits)
                    }
                    Limiter::Refusals(_) => match self.refusals_wait(step.rule, &step.values) {
                        Some(wait) => self.hit(step.rule, f.ip, &step.values, wait, hits),
                        None => Decision::Continue,
                    },
                    _ => Decision::Continue,
                },
            };
            decision = Self::combine(decision, d);
            if matches!(decision, Decision::Refuse { .. }) {
                break;
            }
        }
        decision
    }

    /// The known-good key of a login in the store.
    fn known_good_store_key(store: &Store, f: &Facts) -> Option<String> {
        let (user, net) = Self::known_good_parts(f)?;
        Some(keys::known_good(
            &store.settings().prefix,
            &["known-good", &user, &net],
        ))
    }

    /// [`Policy::login_allowed`], shared: login rates, the known-good
    /// network and the failure locks, in one call.
    pub async fn login_allowed_shared(&self, f: &Facts<'_>) -> Checked<Decision> {
        let Some(store) = self.state.store.clone() else {
            return self.login_allowed(f);
        };
        if let Some(refusal) = self.banned_now(f) {
            return Checked {
                decision: refusal,
                hits: Vec::new(),
            };
        }
        let mut steps = Vec::new();
        let mut ops = Vec::new();
        self.plan_rates(&store, PolicyStage::Login, f, &mut steps, &mut ops);
        let rates = ops.len();
        // (rule, values, per-user-only) of each failure lock, in rule order
        let mut locks = Vec::new();
        for rule in &self.rules {
            let Limiter::Failures(fails) = &rule.limiter else {
                continue;
            };
            // a ban rule acts when the failure is recorded (`login_failed`)
            if rule.spec.action == PolicyAction::Ban || self.skipped(&rule.spec, f.ip) {
                continue;
            }
            let Some(values) = self.key_values(&rule.spec, f) else {
                continue;
            };
            let per_user_only = rule.spec.per_user_only();
            let (max, window) = fails.limits();
            ops.push(Op::Locked {
                key: self.key(&store, KeyKind::Failures, rule, &values),
                max,
                window,
                stop: refuses(rule),
                spare_if_good: per_user_only,
            });
            locks.push((rule, values, per_user_only));
        }
        if ops.is_empty() {
            return self.login_allowed(f);
        }
        // the known-good lookup goes first: the locks after it read it
        let good = match locks.iter().any(|(_, _, per_user)| *per_user) {
            true => Self::known_good_store_key(&store, f),
            false => None,
        };
        if let Some(key) = good {
            let trust = self.spec.known_good.min(self.state.known_good.ttl());
            ops.insert(0, Op::KnownGood { key, trust });
        }
        let skip = usize::from(matches!(ops.first(), Some(Op::KnownGood { .. })));
        let answers = match store.run(&ops, &store.token()).await {
            Ok(a) => a,
            Err(_) => {
                return match Self::unavailable(&store) {
                    OnUnavailable::Local => self.login_allowed(f),
                    OnUnavailable::Accept => Checked {
                        decision: Decision::Continue,
                        hits: Vec::new(),
                    },
                    OnUnavailable::Tempfail => Checked {
                        decision: store_refusal(),
                        hits: Vec::new(),
                    },
                }
            }
        };
        let answers = answers.get(skip..).unwrap_or_default();
        let mut hits = Vec::new();
        let mut decision = self.decide_rates(&steps, answers, f, &mut hits);
        if matches!(decision, Decision::Refuse { .. }) {
            return Checked { decision, hits };
        }
        for (i, (rule, values, _)) in locks.iter().enumerate() {
            let d = match answers.get(rates + i) {
                None => break,
                Some(Answer::Wait(wait)) => self.hit(rule, f.ip, values, *wait, &mut hits),
                Some(Answer::Spared) => {
                    info!(policy = %self.name, rule = %rule.spec.name, "per-user lock not applied: known-good network");
                    Decision::Continue
                }
                Some(_) => Decision::Continue,
            };
            decision = Self::combine(decision, d);
            if matches!(decision, Decision::Refuse { .. }) {
                break;
            }
        }
        Checked { decision, hits }
    }

    /// [`Policy::login_failed`], shared: one call records the failure in
    /// every failure window; a ban rule's window is read back in the same
    /// call, and the failure that reaches its count bans (as in process).
    pub async fn login_failed_shared(&self, f: &Facts<'_>) -> Checked<Decision> {
        let Some(store) = self.state.store.clone() else {
            return self.login_failed(f);
        };
        let mut ops = Vec::new();
        // (rule, values, index of the ban rule's read-back op)
        let mut bans = Vec::new();
        for rule in &self.rules {
            if let Limiter::Failures(fails) = &rule.limiter {
                if let Some(values) = self.key_values(&rule.spec, f) {
                    let (max, window) = fails.limits();
                    let key = self.key(&store, KeyKind::Failures, rule, &values);
                    ops.push(Op::Fail {
                        key: key.clone(),
                        max,
                        window,
                    });
                    if rule.spec.action == PolicyAction::Ban && !self.skipped(&rule.spec, f.ip) {
                        ops.push(Op::Locked {
                            key,
                            max,
                            window,
                            stop: false,
                            spare_if_good: false,
                        });
                        bans.push((rule, values, ops.len() - 1));
                    }
                }
            }
        }
        let mut hits = Vec::new();
        if ops.is_empty() {
            return Checked {
                decision: Decision::Continue,
                hits,
            };
        }
        let answers = match store.run(&ops, &store.token()).await {
            Ok(a) => a,
            Err(_) => {
                if Self::unavailable(&store) == OnUnavailable::Local {
                    return self.login_failed(f);
                }
                return Checked {
                    decision: Decision::Continue,
                    hits,
                };
            }
        };
        let mut decision = Decision::Continue;
        for (rule, values, i) in bans {
            if let Some(Answer::Wait(_)) = answers.get(i) {
                let d = self.hit(rule, f.ip, &values, Duration::ZERO, &mut hits);
                decision = Self::combine(decision, d);
            }
        }
        Checked { decision, hits }
    }

    /// [`Policy::login_succeeded`], shared: the known-good network is
    /// remembered in the store, and in process too (lockout safety holds
    /// on this instance while the store is down).
    pub async fn login_succeeded_shared(&self, f: &Facts<'_>) {
        self.login_succeeded(f);
        let Some(store) = self.state.store.clone() else {
            return;
        };
        let Some(key) = Self::known_good_store_key(&store, f) else {
            return;
        };
        let op = Op::Remember {
            key,
            ttl: self.state.known_good.ttl(),
        };
        if store.run(&[op], &store.token()).await.is_err() {
            Self::unavailable(&store);
        }
    }
}

/// The store's TTL set of bans: member the banned network (`127.0.0.9/32`,
/// `2001:db8:1:2::/64`), value `policy`, `rule` and `reason` joined by
/// U+001F (all three come from the configuration, never from the client).
const BANS: &str = "bans";
const SEP: char = '\u{1f}';

/// The IPv6 networks a client may be banned under in the store: what ban
/// rules count by (`ipv6_prefix`, default /64) in the usual steps, besides
/// the prefixes of this instance's own ban rules (`lookup_prefixes`).
const V6_PREFIXES: [u8; 4] = [128, 64, 56, 48];

/// Bans shared through the store (`state: store: redis`): a ban made on
/// one instance is written to the store (in the background: the session
/// that made it does not wait for it), a client this instance has not
/// banned is looked up there at connect (one call, under `timeout`) and,
/// when found, banned here too for the time left, and a lift removes it
/// there as well. Without a store these do nothing.
impl PolicyState {
    /// The prefixes `ip` is looked up under in the store's bans.
    fn lookup_prefixes(&self, ip: IpAddr) -> Vec<u8> {
        if crate::units::canonical(ip).is_ipv4() {
            return vec![32];
        }
        let mut p: std::collections::BTreeSet<u8> = V6_PREFIXES.into_iter().collect();
        p.extend(
            self.ban_prefixes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter(),
        );
        p.into_iter().rev().collect()
    }

    pub(super) fn share_ban(&self, ip: IpAddr, ipv6_prefix: u8, for_: Duration, cause: &BanCause) {
        let Some(store) = &self.store else {
            return;
        };
        let op = Op::SetPut {
            key: keys::ttl_set(&store.settings().prefix, BANS),
            member: Bans::network(ip, ipv6_prefix).to_string(),
            value: [cause.policy.as_str(), &cause.rule, &cause.reason].join(&SEP.to_string()),
            ttl: for_,
            // as many as this instance holds: the store's set is bounded too
            max: u32::try_from(self.bans.max()).unwrap_or(u32::MAX),
        };
        store.run_in_background(
            vec![op],
            Some("ban not written to the state store (it holds on this instance)"),
        );
    }

    /// A ban of `ip` in the store that this instance did not know of yet
    /// (learnt and kept here for the time left); `None` without a store,
    /// when not banned, or when the store does not answer in time (the
    /// local bans still hold; store errors are counted).
    pub async fn banned_shared(&self, ip: IpAddr) -> Option<BanInfo> {
        let store = self.store.clone()?;
        let (prefixes, ops) = self.ban_ops(&store, ip, |key, member| Op::SetGet { key, member });
        let answers = store.run(&ops, &store.token()).await.ok()?;
        let (prefix, value, left) = prefixes.iter().zip(answers).find_map(|(p, a)| match a {
            Answer::Member(v, left) if !left.is_zero() => Some((*p, v, left)),
            _ => None,
        })?;
        let mut parts = value.splitn(3, SEP);
        let cause = BanCause {
            policy: parts.next().unwrap_or_default().to_string(),
            rule: parts.next().unwrap_or_default().to_string(),
            reason: parts.next().unwrap_or_default().to_string(),
        };
        debug!(client = %ip, rule = %cause.rule, "ban learnt from the state store");
        let now = Instant::now();
        self.bans.ban(ip, prefix, left, cause, now);
        // the gauge counts it now, not at the next housekeeping
        crate::observe::metrics().bans_active_now(self.bans.housekeeping(now));
        self.bans.banned(ip, now)
    }

    /// One store op for each network `ip` may be banned under (every ban
    /// rule's prefix, `lookup_prefixes`), made by `op` from the bans set's
    /// key and the network; with those prefixes, in the same order.
    fn ban_ops(
        &self,
        store: &Store,
        ip: IpAddr,
        op: impl Fn(String, String) -> Op,
    ) -> (Vec<u8>, Vec<Op>) {
        let key = keys::ttl_set(&store.settings().prefix, BANS);
        let prefixes = self.lookup_prefixes(ip);
        let ops = prefixes
            .iter()
            .map(|p| op(key.clone(), Bans::network(ip, *p).to_string()))
            .collect();
        (prefixes, ops)
    }

    /// Lifts `ip`'s bans in the store too: the networks banned there
    /// (none without a store), so that a ban held both here and there
    /// counts once and one of each (an IPv6 address may be banned under
    /// several prefixes) counts twice. Waited for: the operator who lifts
    /// is told whether other instances will stop learning the ban.
    pub async fn lift_shared(
        &self,
        ip: IpAddr,
    ) -> Result<Vec<crate::units::Cidr>, crate::state::StoreError> {
        let Some(store) = self.store.clone() else {
            return Ok(Vec::new());
        };
        let (prefixes, ops) = self.ban_ops(&store, ip, |key, member| Op::SetRemove { key, member });
        let answers = store.run_lift(&ops, &store.token()).await?;
        Ok(prefixes
            .iter()
            .zip(&answers)
            .filter(|(_, a)| **a == Answer::Removed)
            .map(|(p, _)| Bans::network(ip, *p))
            .collect())
    }
}
