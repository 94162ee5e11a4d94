//! A compiled [`Policy`] deciding, stage by stage, what a session may do:
//! connect (deny list, rates, session slots), HELO/MAIL/RCPT rates and
//! per-message caps, and the login bracket (failure locks, known-good
//! networks). Each hit is logged and returned beside the [`Decision`] (as a
//! [`Hit`] in [`Checked`]): the caller, at the edge, counts it.

use super::bans::{BanCause, BanOutcome};
use super::limits::{Bucket, Counter, CounterGuard, Failures};
use super::spec::{KeyPart, PolicySpec, PolicyStage, RuleSpec};
use super::state::{PolicyState, RuleHits};
use crate::action::PolicyAction;
use crate::units::canonical;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

pub(super) enum Limiter {
    Bucket(Arc<Bucket>),
    Counter(Arc<Counter>, u32),
    Failures(Arc<Failures>),
    PerMessage(u32),
    /// `rcpt_refusals`: the same sliding window, fed by backend refusals.
    Refusals(Arc<Failures>),
}

pub(super) struct Rule {
    pub(super) spec: RuleSpec,
    /// The rule's name in the shared store (`state::keys::rule_id`).
    pub(super) id: String,
    pub(super) stage: PolicyStage,
    pub(super) limiter: Limiter,
    pub(super) hits: Arc<RuleHits>,
}

/// A compiled policy, as a session sees it.
pub struct Policy {
    pub name: String,
    pub(super) spec: PolicySpec,
    pub(super) rules: Vec<Rule>,
    pub(super) state: Arc<PolicyState>,
}

/// What the client sent so far, as far as the rules care.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub ip: IpAddr,
    pub listener: &'a str,
    pub helo: Option<&'a str>,
    pub sender: Option<&'a str>,
    pub rcpt: Option<&'a str>,
    pub auth_user: Option<&'a str>,
    /// Recipients already accepted in the current message.
    pub rcpts_in_message: usize,
}

impl<'a> Facts<'a> {
    pub fn new(ip: IpAddr, listener: &'a str) -> Self {
        Facts {
            ip,
            listener,
            helo: None,
            sender: None,
            rcpt: None,
            auth_user: None,
            rcpts_in_message: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Continue,
    /// Tarpit: wait this long, then continue.
    Delay(Duration),
    /// Refuse the command (`action` is `Tempfail` or `Reject`).
    Refuse {
        action: PolicyAction,
        rule: String,
    },
}

/// A rule that fired during one evaluation, shadow hits included: what the
/// edges count (`mailgate_policy_hits_total{policy, rule, mode}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub policy: String,
    pub rule: String,
    /// A `shadow` rule: it would have fired, nothing was done.
    pub shadow: bool,
    /// What an `action: ban` rule did to the ban list.
    pub ban: Option<BanEvent>,
}

/// What the hit of a ban rule did (`mailgate_bans_total`, `_bans_skipped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BanEvent {
    /// Banned (or extended); `active` bans now; `evicted`: the list was
    /// full and the ban expiring soonest made room.
    Banned { active: usize, evicted: bool },
    /// Not banned: the client is (inside the network of) a trusted PROXY balancer.
    Protected,
    /// A `shadow: true` rule: would have banned.
    Shadow,
}

/// What an evaluation decided (`decision`) and which rules fired on the way.
#[derive(Debug)]
pub struct Checked<T> {
    pub decision: T,
    pub hits: Vec<Hit>,
}

/// Session slots held while a session runs: in-process counters, or leases
/// in the shared store.
#[derive(Default)]
pub struct ConnectPermit {
    pub(super) _guards: Vec<CounterGuard>,
    pub(super) _leases: Vec<crate::state::Lease>,
    pub delay: Duration,
}

fn domain_of(addr: &str) -> &str {
    addr.rsplit_once('@').map(|(_, d)| d).unwrap_or("")
}

pub(super) fn mask(ip: IpAddr, v4: u8, v6: u8) -> String {
    match canonical(ip) {
        IpAddr::V4(a) => {
            let m = u32::MAX
                .checked_shl(32 - u32::from(v4.min(32)))
                .unwrap_or(0);
            format!("{}/{v4}", std::net::Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = u128::MAX
                .checked_shl(128 - u32::from(v6.min(128)))
                .unwrap_or(0);
            format!("{}/{v6}", std::net::Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

impl Policy {
    /// The value of each key part, or `None` when one is not known (the rule
    /// then does not apply).
    pub(super) fn key_values(&self, r: &RuleSpec, f: &Facts) -> Option<Vec<String>> {
        r.key
            .iter()
            .map(|k| {
                Some(match k {
                    KeyPart::Ip => match canonical(f.ip) {
                        IpAddr::V6(_) if r.ipv6_prefix < 128 => mask(f.ip, 32, r.ipv6_prefix),
                        ip => ip.to_string(),
                    },
                    KeyPart::IpPrefix => mask(f.ip, r.prefix_v4, r.prefix_v6),
                    KeyPart::Listener => f.listener.to_string(),
                    KeyPart::Helo => f.helo?.to_ascii_lowercase(),
                    KeyPart::Sender => f.sender?.to_ascii_lowercase(),
                    KeyPart::SenderDomain => domain_of(f.sender?).to_ascii_lowercase(),
                    KeyPart::Rcpt => f.rcpt?.to_ascii_lowercase(),
                    KeyPart::RcptDomain => domain_of(f.rcpt?).to_ascii_lowercase(),
                    KeyPart::AuthUser => f.auth_user?.to_ascii_lowercase(),
                })
            })
            .collect()
    }

    /// The rules of `stage` that apply to this session (not skipped by an
    /// allow list, every key part known) with their key values, in rule order.
    pub(super) fn applicable<'s>(
        &'s self,
        stage: PolicyStage,
        f: &'s Facts<'_>,
    ) -> impl Iterator<Item = (&'s Rule, Vec<String>)> + 's {
        self.rules
            .iter()
            .filter(move |r| r.stage == stage && !self.skipped(&r.spec, f.ip))
            .filter_map(move |r| Some((r, self.key_values(&r.spec, f)?)))
    }

    pub(super) fn skipped(&self, r: &RuleSpec, ip: IpAddr) -> bool {
        self.spec.allow.iter().any(|a| {
            a.networks.iter().any(|n| n.contains(ip))
                && (a.skip.is_empty() || a.skip.contains(&r.name))
        })
    }

    pub fn denied(&self, ip: IpAddr) -> bool {
        self.spec.deny.iter().any(|n| n.contains(ip))
    }

    fn describe_key(r: &RuleSpec, values: &[String]) -> String {
        r.key
            .iter()
            .zip(values)
            .map(|(k, v)| format!("{}={v}", k.as_str()))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Records a hit (in `hits`, for the caller to count) and turns the
    /// rule's action into a decision; a ban rule bans the client `ip`'s
    /// network and refuses as `reject` does.
    pub(super) fn hit(
        &self,
        rule: &Rule,
        ip: IpAddr,
        values: &[String],
        wait: Duration,
        hits: &mut Vec<Hit>,
    ) -> Decision {
        let key = Self::describe_key(&rule.spec, values);
        let action = rule.spec.action;
        let mut hit = Hit {
            policy: self.name.clone(),
            rule: rule.spec.name.clone(),
            shadow: action == PolicyAction::Shadow || rule.spec.shadow,
            ban: None,
        };
        if hit.shadow {
            rule.hits.shadow.fetch_add(1, Ordering::Relaxed);
            if action == PolicyAction::Ban {
                hit.ban = Some(BanEvent::Shadow);
                info!(policy = %self.name, rule = %rule.spec.name, key = %key, "shadow: would ban the client");
            } else {
                info!(policy = %self.name, rule = %rule.spec.name, key = %key, "shadow: limit would have been enforced");
            }
            hits.push(hit);
            return Decision::Continue;
        }
        rule.hits.enforced.fetch_add(1, Ordering::Relaxed);
        warn!(policy = %self.name, rule = %rule.spec.name, key = %key, action = action.as_str(), "policy limit hit");
        let refuse = |action| Decision::Refuse {
            action,
            rule: rule.spec.name.clone(),
        };
        let decision = match action {
            PolicyAction::Delay => Decision::Delay(wait.min(rule.spec.max_delay)),
            PolicyAction::Tempfail | PolicyAction::Reject => refuse(action),
            PolicyAction::Ban => {
                // `config` requires `ban_for`; a spec built without it
                // refuses as `reject` and bans nothing
                if let Some(for_) = rule.spec.ban_for {
                    let cause = BanCause {
                        policy: self.name.clone(),
                        rule: rule.spec.name.clone(),
                        reason: rule.spec.kind.describe(),
                    };
                    let now = Instant::now();
                    let done =
                        self.state
                            .bans
                            .ban(ip, rule.spec.ipv6_prefix, for_, cause.clone(), now);
                    // a trusted balancer's network stays out of the store too
                    if done != BanOutcome::Protected {
                        self.state
                            .share_ban(ip, rule.spec.ipv6_prefix, for_, &cause);
                    }
                    hit.ban = Some(match done {
                        BanOutcome::Banned { active, evicted } => {
                            BanEvent::Banned { active, evicted }
                        }
                        BanOutcome::Protected => BanEvent::Protected,
                    });
                }
                refuse(PolicyAction::Reject)
            }
            PolicyAction::Accept | PolicyAction::Tag | PolicyAction::Shadow => Decision::Continue,
        };
        hits.push(hit);
        decision
    }

    pub(super) fn combine(acc: Decision, d: Decision) -> Decision {
        match (acc, d) {
            (r @ Decision::Refuse { .. }, _) => r,
            (_, r @ Decision::Refuse { .. }) => r,
            (Decision::Delay(a), Decision::Delay(b)) => Decision::Delay(a.max(b)),
            (Decision::Delay(a), Decision::Continue) | (Decision::Continue, Decision::Delay(a)) => {
                Decision::Delay(a)
            }
            (Decision::Continue, Decision::Continue) => Decision::Continue,
        }
    }

    /// Connect stage: deny list, connection rates and session counts. The
    /// permit must live as long as the session.
    pub fn connect(&self, f: &Facts) -> Checked<Result<ConnectPermit, Decision>> {
        let mut hits = Vec::new();
        let decision = self.connect_with(f, &mut hits);
        Checked { decision, hits }
    }

    fn connect_with(&self, f: &Facts, hits: &mut Vec<Hit>) -> Result<ConnectPermit, Decision> {
        if self.denied(f.ip) {
            warn!(policy = %self.name, ip = %f.ip, "denied by policy");
            return Err(Decision::Refuse {
                action: PolicyAction::Reject,
                rule: "deny".into(),
            });
        }
        let mut guards = Vec::new();
        let mut decision = Decision::Continue;
        for (rule, values) in self.applicable(PolicyStage::Connect, f) {
            let refs: Vec<&str> = values.iter().map(String::as_str).collect();
            let key = self.state.hash(&refs);
            let d = match &rule.limiter {
                Limiter::Bucket(b) => match b.take(key) {
                    Ok(()) => Decision::Continue,
                    Err(wait) => self.hit(rule, f.ip, &values, wait, hits),
                },
                Limiter::Counter(c, max) => match c.acquire(key, *max) {
                    Some(g) => {
                        guards.push(g);
                        Decision::Continue
                    }
                    // a delay would admit the session uncounted: `check`
                    // refuses the combination; fail closed if one gets here
                    None => match self.hit(rule, f.ip, &values, rule.spec.max_delay, hits) {
                        Decision::Delay(_) => Decision::Refuse {
                            action: PolicyAction::Tempfail,
                            rule: rule.spec.name.clone(),
                        },
                        d => d,
                    },
                },
                _ => Decision::Continue,
            };
            decision = Self::combine(decision, d);
            if matches!(decision, Decision::Refuse { .. }) {
                return Err(decision);
            }
        }
        Ok(ConnectPermit {
            _guards: guards,
            _leases: Vec::new(),
            delay: if let Decision::Delay(d) = decision {
                d
            } else {
                Duration::ZERO
            },
        })
    }

    /// HELO, MAIL and RCPT stages (and `rate` rules keyed by auth_user at login).
    pub fn check(&self, stage: PolicyStage, f: &Facts) -> Checked<Decision> {
        let mut hits = Vec::new();
        let decision = self.check_with(stage, f, &mut hits);
        Checked { decision, hits }
    }

    /// A client banned during this session (the server refuses its new
    /// connections): every further command is refused as `reject`.
    pub(super) fn banned_now(&self, f: &Facts) -> Option<Decision> {
        let b = self.state.bans.banned(f.ip, Instant::now())?;
        debug!(policy = %self.name, client = %b.address(), rule = %b.cause.rule, "command of a banned client refused");
        Some(Decision::Refuse {
            action: PolicyAction::Reject,
            rule: "banned".into(),
        })
    }

    fn check_with(&self, stage: PolicyStage, f: &Facts, hits: &mut Vec<Hit>) -> Decision {
        let now = Instant::now();
        if let Some(refusal) = self.banned_now(f) {
            return refusal;
        }
        let mut decision = Decision::Continue;
        for (rule, values) in self.applicable(stage, f) {
            let d = match &rule.limiter {
                Limiter::Bucket(b) => {
                    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
                    match b.take(self.state.hash(&refs)) {
                        Ok(()) => Decision::Continue,
                        Err(wait) => self.hit(rule, f.ip, &values, wait, hits),
                    }
                }
                Limiter::PerMessage(max) if f.rcpts_in_message >= *max as usize => {
                    self.hit(rule, f.ip, &values, Duration::ZERO, hits)
                }
                // a ban rule acts when the refusal is recorded (`rcpt_refused`)
                Limiter::Refusals(r) if rule.spec.action != PolicyAction::Ban => {
                    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
                    match r.locked(self.state.hash(&refs), now) {
                        Some(wait) => self.hit(rule, f.ip, &values, wait, hits),
                        None => Decision::Continue,
                    }
                }
                _ => Decision::Continue,
            };
            decision = Self::combine(decision, d);
            if matches!(decision, Decision::Refuse { .. }) {
                break;
            }
        }
        decision
    }

    fn known_good_key(&self, f: &Facts) -> Option<u64> {
        let (user, net) = Self::known_good_parts(f)?;
        Some(self.state.hash(&["known-good", &user, &net]))
    }

    /// (user, network) of a login: what known-good networks remember.
    pub(super) fn known_good_parts(f: &Facts) -> Option<(String, String)> {
        Some((f.auth_user?.to_ascii_lowercase(), mask(f.ip, 24, 56)))
    }

    /// Before a login is relayed: failed-login locks (and login rates). A lock
    /// keyed by user alone is not applied from a network where that user
    /// recently logged in successfully, so an attacker cannot lock a user out.
    pub fn login_allowed(&self, f: &Facts) -> Checked<Decision> {
        let mut hits = Vec::new();
        let decision = self.login_allowed_with(f, &mut hits);
        Checked { decision, hits }
    }

    fn login_allowed_with(&self, f: &Facts, hits: &mut Vec<Hit>) -> Decision {
        let now = Instant::now();
        let mut decision = self.check_with(PolicyStage::Login, f, hits);
        if matches!(decision, Decision::Refuse { .. }) {
            return decision;
        }
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
            let refs: Vec<&str> = values.iter().map(String::as_str).collect();
            let Some(wait) = fails.locked(self.state.hash(&refs), now) else {
                continue;
            };
            let per_user_only = rule.spec.per_user_only();
            if per_user_only
                && self
                    .known_good_key(f)
                    .is_some_and(|k| self.state.known_good.contains(k, now, self.spec.known_good))
            {
                info!(policy = %self.name, rule = %rule.spec.name, "per-user lock not applied: known-good network");
                continue;
            }
            decision = Self::combine(decision, self.hit(rule, f.ip, &values, wait, hits));
            if matches!(decision, Decision::Refuse { .. }) {
                break;
            }
        }
        decision
    }

    /// A failed login: counted by every `auth_failures` rule. A ban rule
    /// whose count this failure reaches bans now (so the client's next
    /// connection, on any listener, is refused); other actions refuse the
    /// next attempt (`login_allowed`).
    pub fn login_failed(&self, f: &Facts) -> Checked<Decision> {
        self.record(f, |l| match l {
            Limiter::Failures(w) => Some(w),
            _ => None,
        })
    }

    /// A recipient the backend refused (5xx to RCPT): counted by every
    /// `rcpt_refusals` rule; ban rules act as in [`Self::login_failed`],
    /// other actions refuse the next RCPT (`check`).
    pub fn rcpt_refused(&self, f: &Facts) -> Checked<Decision> {
        self.record(f, |l| match l {
            Limiter::Refusals(w) => Some(w),
            _ => None,
        })
    }

    /// A ban decided outside the limit rules (the triage's `action: ban`,
    /// `test` naming what failed: `triage-dnsbl`, `triage-pregreet`): the
    /// client's address (an IPv6 client's /64, as limit rules count by
    /// default) is banned on every listener for `for_`, unless it holds a
    /// trusted balancer. The returned hit is for the caller to count.
    pub fn ban(&self, ip: IpAddr, test: &str, reason: String, for_: Duration) -> Hit {
        let cause = BanCause {
            policy: self.name.clone(),
            rule: test.to_string(),
            reason,
        };
        let done = self
            .state
            .bans
            .ban(ip, 64, for_, cause.clone(), Instant::now());
        // a trusted balancer's network stays out of the store too
        if done != BanOutcome::Protected {
            self.state.share_ban(ip, 64, for_, &cause);
        }
        Hit {
            policy: self.name.clone(),
            rule: test.to_string(),
            shadow: false,
            ban: Some(match done {
                BanOutcome::Banned { active, evicted } => BanEvent::Banned { active, evicted },
                BanOutcome::Protected => BanEvent::Protected,
            }),
        }
    }

    fn record(
        &self,
        f: &Facts,
        window: impl Fn(&Limiter) -> Option<&Arc<Failures>>,
    ) -> Checked<Decision> {
        let now = Instant::now();
        let mut hits = Vec::new();
        let mut decision = Decision::Continue;
        for rule in &self.rules {
            let Some(w) = window(&rule.limiter) else {
                continue;
            };
            let Some(values) = self.key_values(&rule.spec, f) else {
                continue;
            };
            let refs: Vec<&str> = values.iter().map(String::as_str).collect();
            let key = self.state.hash(&refs);
            w.record(key, now);
            if rule.spec.action == PolicyAction::Ban
                && !self.skipped(&rule.spec, f.ip)
                && w.locked(key, now).is_some()
            {
                let d = self.hit(rule, f.ip, &values, Duration::ZERO, &mut hits);
                decision = Self::combine(decision, d);
            }
        }
        Checked { decision, hits }
    }

    pub fn login_succeeded(&self, f: &Facts) {
        if let Some(k) = self.known_good_key(f) {
            self.state.known_good.remember(k, Instant::now());
        }
    }

    /// (rule name, enforced hits, shadow hits), for metrics.
    pub fn hits(&self) -> Vec<(String, u64, u64)> {
        self.rules
            .iter()
            .map(|r| {
                (
                    r.spec.name.clone(),
                    r.hits.enforced.load(Ordering::Relaxed),
                    r.hits.shadow.load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    pub fn spec(&self) -> &PolicySpec {
        &self.spec
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::fixtures::*;

    #[test]
    fn connection_rate_per_ip() {
        let (p, _) = policy(
            vec![rule(
                "conn",
                vec![KeyPart::Ip],
                Kind::Rate {
                    count: 5,
                    period: Duration::from_secs(60),
                    burst: 5,
                },
                PolicyAction::Tempfail,
            )],
            vec![],
        );
        let f = Facts::new(ip("127.0.0.2"), "mx");
        let mut permits = Vec::new();
        for _ in 0..5 {
            permits.push(p.connect(&f).decision.unwrap());
        }
        assert_eq!(
            p.connect(&f).decision.err(),
            Some(Decision::Refuse {
                action: PolicyAction::Tempfail,
                rule: "conn".into()
            })
        );
        assert!(p
            .connect(&Facts::new(ip("127.0.0.3"), "mx"))
            .decision
            .is_ok());
        assert!(
            p.connect(&Facts::new(ip("192.0.2.9"), "mx"))
                .decision
                .is_err(),
            "deny list"
        );
        assert_eq!(p.hits()[0].1, 1);
    }

    #[test]
    fn concurrency_and_allow() {
        let allow = vec![AllowSpec {
            networks: vec![Cidr::parse("10.0.0.0/8").unwrap()],
            skip: vec!["conc".into()],
        }];
        let (p, _) = policy(
            vec![rule(
                "conc",
                vec![KeyPart::Ip],
                Kind::Concurrent(2),
                PolicyAction::Reject,
            )],
            allow,
        );
        let f = Facts::new(ip("127.0.0.2"), "mx");
        let a = p.connect(&f).decision.unwrap();
        let _b = p.connect(&f).decision.unwrap();
        assert!(p.connect(&f).decision.is_err());
        drop(a);
        assert!(p.connect(&f).decision.is_ok());
        let g = Facts::new(ip("10.1.2.3"), "mx");
        let _held: Vec<_> = (0..5).map(|_| p.connect(&g).decision.unwrap()).collect();
    }

    #[test]
    fn shadow_counts_but_never_refuses() {
        let (p, _) = policy(
            vec![rule(
                "s",
                vec![KeyPart::Ip],
                Kind::Rate {
                    count: 1,
                    period: Duration::from_secs(60),
                    burst: 1,
                },
                PolicyAction::Shadow,
            )],
            vec![],
        );
        let f = Facts::new(ip("127.0.0.2"), "mx");
        for _ in 0..4 {
            assert!(p.connect(&f).decision.is_ok());
        }
        assert_eq!(p.hits()[0], ("s".to_string(), 0, 3));
    }

    /// Every rule that fired is returned for the caller to count (the policy
    /// counts nothing process-wide): shadow hits beside the refusing one, and
    /// nothing when no rule fired.
    #[test]
    fn evaluations_return_the_rules_that_fired() {
        let per_minute = |n| Kind::Rate {
            count: n,
            period: Duration::from_secs(60),
            burst: n,
        };
        let (p, _) = policy(
            vec![
                rule(
                    "watch",
                    vec![KeyPart::Sender],
                    per_minute(1),
                    PolicyAction::Shadow,
                ),
                rule(
                    "cap",
                    vec![KeyPart::Sender],
                    per_minute(1),
                    PolicyAction::Reject,
                ),
            ],
            vec![],
        );
        let mut f = Facts::new(ip("127.0.0.2"), "mx");
        f.sender = Some("a@example.org");
        let first = p.check(PolicyStage::Mail, &f);
        assert_eq!(first.decision, Decision::Continue);
        assert!(first.hits.is_empty(), "{:?}", first.hits);
        let second = p.check(PolicyStage::Mail, &f);
        assert_eq!(
            second.decision,
            Decision::Refuse {
                action: PolicyAction::Reject,
                rule: "cap".into()
            }
        );
        let hit = |rule: &str, shadow| Hit {
            policy: "p".into(),
            rule: rule.into(),
            shadow,
            ban: None,
        };
        assert_eq!(second.hits, vec![hit("watch", true), hit("cap", false)]);
        let denied = p.connect(&Facts::new(ip("192.0.2.7"), "mx"));
        assert!(
            denied.decision.is_err() && denied.hits.is_empty(),
            "deny is no rule hit"
        );
    }

    fn refuse(rule: &str) -> Decision {
        Decision::Refuse {
            action: PolicyAction::Reject,
            rule: rule.into(),
        }
    }

    /// `action: ban` on auth_failures: the failure that reaches the count
    /// bans (the client's next connection is refused by the server); the
    /// session's own further commands are refused as `banned`.
    #[test]
    fn ban_rule_bans_on_the_failure_that_reaches_its_count() {
        let (p, state) = policy(
            vec![rule(
                "guess",
                vec![KeyPart::Ip],
                Kind::AuthFailures {
                    count: 3,
                    window: Duration::from_secs(900),
                },
                PolicyAction::Ban,
            )],
            vec![],
        );
        let mut f = Facts::new(ip("127.0.0.9"), "pop3");
        f.auth_user = Some("alice");
        for _ in 0..2 {
            assert_eq!(p.login_allowed(&f).decision, Decision::Continue);
            let failed = p.login_failed(&f);
            assert!(failed.hits.is_empty() && failed.decision == Decision::Continue);
        }
        let third = p.login_failed(&f);
        assert_eq!(third.decision, refuse("guess"));
        assert_eq!(
            third.hits[0].ban,
            Some(BanEvent::Banned {
                active: 1,
                evicted: false
            })
        );
        let now = Instant::now();
        let ban = state.bans.banned(ip("127.0.0.9"), now).unwrap();
        assert_eq!(ban.cause.reason, "auth_failures 3 per 900s");
        assert_eq!(ban.remaining.as_secs(), 3599);
        assert_eq!(p.login_allowed(&f).decision, refuse("banned"));
        assert_eq!(p.check(PolicyStage::Mail, &f).decision, refuse("banned"));
        let other = Facts::new(ip("127.0.0.10"), "pop3");
        assert_eq!(
            p.check(PolicyStage::Helo, &other).decision,
            Decision::Continue
        );
        // lifted: the next attempt goes on; failures still in the window
        // ban again at the next one
        assert_eq!(state.bans.lift(ip("127.0.0.9"), now).len(), 1);
        assert_eq!(p.login_allowed(&f).decision, Decision::Continue);
        assert_eq!(p.login_failed(&f).decision, refuse("guess"));
    }

    /// `rate` with `ban` at connect, an IPv6 client's /64, and a trusted
    /// balancer that is never banned.
    #[test]
    fn rate_ban_takes_the_counted_network_but_never_a_balancer() {
        let (p, state) = policy(
            vec![rule(
                "flood",
                vec![KeyPart::Ip],
                Kind::Rate {
                    count: 1,
                    period: Duration::from_secs(60),
                    burst: 1,
                },
                PolicyAction::Ban,
            )],
            vec![],
        );
        let v6 = Facts::new(ip("2001:db8:1:2::1"), "mx");
        assert!(p.connect(&v6).decision.is_ok());
        let c = p.connect(&v6);
        assert_eq!(c.decision.err(), Some(refuse("flood")));
        let now = Instant::now();
        assert_eq!(
            state
                .bans
                .banned(ip("2001:db8:1:2:ffff::7"), now)
                .unwrap()
                .address(),
            "2001:db8:1:2::/64"
        );
        state
            .bans
            .protect(vec![Cidr::parse("127.0.0.1/32").unwrap()]);
        let lb = Facts::new(ip("127.0.0.1"), "mx");
        assert!(p.connect(&lb).decision.is_ok());
        let c = p.connect(&lb);
        assert_eq!(c.decision.err(), Some(refuse("flood")), "refused as reject");
        assert_eq!(c.hits[0].ban, Some(BanEvent::Protected));
        assert!(state.bans.banned(ip("127.0.0.1"), now).is_none());
    }

    /// `rcpt_refusals`: with `reject`, reaching the count refuses the next
    /// RCPT before the backend; with `ban`, the refusal reaching it bans.
    #[test]
    fn rcpt_refusals_refuse_the_next_rcpt_or_ban() {
        let window = Kind::RcptRefusals {
            count: 2,
            window: Duration::from_secs(600),
        };
        let (p, state) = policy(
            vec![rule(
                "harvest",
                vec![KeyPart::Ip],
                window.clone(),
                PolicyAction::Reject,
            )],
            vec![],
        );
        let mut f = Facts::new(ip("127.0.0.11"), "mx");
        f.rcpt = Some("x@example.net");
        for _ in 0..2 {
            assert_eq!(p.check(PolicyStage::Rcpt, &f).decision, Decision::Continue);
            assert_eq!(p.rcpt_refused(&f).decision, Decision::Continue);
        }
        assert_eq!(p.check(PolicyStage::Rcpt, &f).decision, refuse("harvest"));
        assert!(state.bans.list(Instant::now()).is_empty());
        let (p, state) = policy(
            vec![rule(
                "harvest",
                vec![KeyPart::Ip],
                window,
                PolicyAction::Ban,
            )],
            vec![],
        );
        assert_eq!(p.rcpt_refused(&f).decision, Decision::Continue);
        assert_eq!(p.rcpt_refused(&f).decision, refuse("harvest"));
        assert!(state
            .bans
            .banned(ip("127.0.0.11"), Instant::now())
            .is_some());
        assert_eq!(p.check(PolicyStage::Rcpt, &f).decision, refuse("banned"));
    }

    /// A log sink for the tests that read what a rule logs.
    #[derive(Clone, Default)]
    struct Log(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Log {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// `shadow: true` on a ban rule: counted (a shadow hit, `BanEvent::Shadow`)
    /// and logged as "would ban"; nothing refused, nothing banned.
    #[test]
    fn shadow_ban_is_counted_and_logged_only() {
        let mut r = rule(
            "watch",
            vec![KeyPart::Ip],
            Kind::AuthFailures {
                count: 2,
                window: Duration::from_secs(900),
            },
            PolicyAction::Ban,
        );
        r.shadow = true;
        let (p, state) = policy(vec![r], vec![]);
        let log = Log::default();
        let sink = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish();
        let f = Facts::new(ip("127.0.0.12"), "pop3");
        let failed = tracing::subscriber::with_default(subscriber, || {
            p.login_failed(&f);
            p.login_failed(&f)
        });
        assert_eq!(failed.decision, Decision::Continue);
        assert_eq!(
            failed.hits,
            vec![Hit {
                policy: "p".into(),
                rule: "watch".into(),
                shadow: true,
                ban: Some(BanEvent::Shadow),
            }]
        );
        assert!(state.bans.list(Instant::now()).is_empty());
        assert_eq!(p.login_allowed(&f).decision, Decision::Continue);
        assert_eq!(p.hits()[0], ("watch".to_string(), 0, 1));
        let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        assert!(
            text.contains("shadow: would ban the client")
                && text.contains("rule=watch")
                && text.contains("key=ip=127.0.0.12"),
            "{text}"
        );
        assert!(!text.contains("client banned"), "{text}");
    }

    #[test]
    fn mail_and_rcpt_stages() {
        let (p, _) = policy(
            vec![
                rule(
                    "dom",
                    vec![KeyPart::SenderDomain],
                    Kind::Messages {
                        count: 2,
                        period: Duration::from_secs(3600),
                        burst: 2,
                    },
                    PolicyAction::Tempfail,
                ),
                rule(
                    "rpm",
                    vec![KeyPart::Ip],
                    Kind::RecipientsPerMessage(2),
                    PolicyAction::Reject,
                ),
                rule(
                    "slow",
                    vec![KeyPart::Rcpt],
                    Kind::Recipients {
                        count: 1,
                        period: Duration::from_secs(3600),
                        burst: 1,
                    },
                    PolicyAction::Delay,
                ),
            ],
            vec![],
        );
        let mut f = Facts::new(ip("127.0.0.2"), "mx");
        f.sender = Some("a@Example.org");
        assert_eq!(p.check(PolicyStage::Mail, &f).decision, Decision::Continue);
        f.sender = Some("b@example.ORG");
        assert_eq!(p.check(PolicyStage::Mail, &f).decision, Decision::Continue);
        assert!(matches!(
            p.check(PolicyStage::Mail, &f).decision,
            Decision::Refuse {
                action: PolicyAction::Tempfail,
                ..
            }
        ));
        f.rcpt = Some("x@y.example");
        assert_eq!(p.check(PolicyStage::Rcpt, &f).decision, Decision::Continue);
        assert_eq!(
            p.check(PolicyStage::Rcpt, &f).decision,
            Decision::Delay(Duration::from_millis(50))
        );
        f.rcpts_in_message = 2;
        f.rcpt = Some("z@y.example");
        assert!(matches!(
            p.check(PolicyStage::Rcpt, &f).decision,
            Decision::Refuse {
                action: PolicyAction::Reject,
                ..
            }
        ));
    }

    #[test]
    fn brute_force_is_lockout_safe() {
        let (p, _) = policy(
            vec![
                rule(
                    "ip",
                    vec![KeyPart::Ip],
                    Kind::AuthFailures {
                        count: 5,
                        window: Duration::from_secs(900),
                    },
                    PolicyAction::Reject,
                ),
                rule(
                    "user",
                    vec![KeyPart::AuthUser],
                    Kind::AuthFailures {
                        count: 10,
                        window: Duration::from_secs(900),
                    },
                    PolicyAction::Tempfail,
                ),
            ],
            vec![],
        );
        let mut home = Facts::new(ip("127.0.0.5"), "pop3");
        home.auth_user = Some("alice");
        assert_eq!(p.login_allowed(&home).decision, Decision::Continue);
        p.login_succeeded(&home);
        // an attacker elsewhere guesses alice's password
        let mut evil = Facts::new(ip("127.1.0.9"), "pop3");
        evil.auth_user = Some("alice");
        for _ in 0..5 {
            assert_eq!(p.login_allowed(&evil).decision, Decision::Continue);
            p.login_failed(&evil);
        }
        assert!(
            matches!(
                p.login_allowed(&evil).decision,
                Decision::Refuse {
                    action: PolicyAction::Reject,
                    ..
                }
            ),
            "per-IP lock"
        );
        // more failures from many IPs lock the user...
        for i in 0..10 {
            let mut other = Facts::new(IpAddr::from([127, 2, 0, i as u8]), "pop3");
            other.auth_user = Some("alice");
            p.login_failed(&other);
        }
        let mut fresh = Facts::new(ip("127.3.0.1"), "pop3");
        fresh.auth_user = Some("alice");
        assert!(
            matches!(p.login_allowed(&fresh).decision, Decision::Refuse { .. }),
            "per-user lock elsewhere"
        );
        // ...but not from her known-good network
        assert_eq!(p.login_allowed(&home).decision, Decision::Continue);
    }

    #[test]
    fn ip_key_groups_ipv6_by_64() {
        let (p, _) = policy(
            vec![rule(
                "conn",
                vec![KeyPart::Ip],
                Kind::Rate {
                    count: 2,
                    period: Duration::from_secs(60),
                    burst: 2,
                },
                PolicyAction::Tempfail,
            )],
            vec![],
        );
        assert!(p
            .connect(&Facts::new(ip("2001:db8:1:2::1"), "mx"))
            .decision
            .is_ok());
        assert!(p
            .connect(&Facts::new(ip("2001:db8:1:2:ffff::9"), "mx"))
            .decision
            .is_ok());
        assert!(
            p.connect(&Facts::new(ip("2001:db8:1:2::3"), "mx"))
                .decision
                .is_err(),
            "one /64 is one client"
        );
        assert!(
            p.connect(&Facts::new(ip("2001:db8:1:3::1"), "mx"))
                .decision
                .is_ok(),
            "another /64 is another client"
        );
        assert!(p
            .connect(&Facts::new(ip("127.0.0.2"), "mx"))
            .decision
            .is_ok());
        assert!(p
            .connect(&Facts::new(ip("127.0.0.3"), "mx"))
            .decision
            .is_ok());
        assert!(p
            .connect(&Facts::new(ip("127.0.0.3"), "mx"))
            .decision
            .is_ok());
        assert!(
            p.connect(&Facts::new(ip("127.0.0.3"), "mx"))
                .decision
                .is_err(),
            "IPv4 stays per address"
        );
        let mut per_address = rule(
            "conn",
            vec![KeyPart::Ip],
            Kind::Rate {
                count: 1,
                period: Duration::from_secs(60),
                burst: 1,
            },
            PolicyAction::Tempfail,
        );
        per_address.ipv6_prefix = 128;
        let (p, _) = policy(vec![per_address], vec![]);
        assert!(p
            .connect(&Facts::new(ip("2001:db8:1:2::1"), "mx"))
            .decision
            .is_ok());
        assert!(p
            .connect(&Facts::new(ip("2001:db8:1:2::2"), "mx"))
            .decision
            .is_ok());
        assert!(p
            .connect(&Facts::new(ip("2001:db8:1:2::2"), "mx"))
            .decision
            .is_err());
    }

    #[test]
    fn concurrent_with_delay_never_admits_uncounted() {
        // `check` refuses this combination; a spec built in code fails closed
        let (p, _) = policy(
            vec![rule(
                "conc",
                vec![KeyPart::Ip],
                Kind::Concurrent(1),
                PolicyAction::Delay,
            )],
            vec![],
        );
        let f = Facts::new(ip("127.0.0.2"), "mx");
        let _held = p.connect(&f).decision.unwrap();
        assert!(matches!(
            p.connect(&f).decision.err(),
            Some(Decision::Refuse {
                action: PolicyAction::Tempfail,
                ..
            })
        ));
    }

    #[test]
    fn mapped_addresses_match_and_count_as_ipv4() {
        let (p, _) = policy(
            vec![rule(
                "conc",
                vec![KeyPart::Ip],
                Kind::Concurrent(1),
                PolicyAction::Reject,
            )],
            vec![],
        );
        // the deny list is 192.0.2.0/24
        assert!(p.denied(ip("::ffff:192.0.2.7")));
        let held = p
            .connect(&Facts::new(ip("198.51.100.5"), "mx"))
            .decision
            .unwrap();
        assert!(
            p.connect(&Facts::new(ip("::ffff:198.51.100.5"), "mx"))
                .decision
                .is_err(),
            "one client, announced as TCP4 and as mapped TCP6, counts once"
        );
        drop(held);
        let held = p
            .connect(&Facts::new(ip("::ffff:198.51.100.5"), "mx"))
            .decision
            .unwrap();
        assert!(p
            .connect(&Facts::new(ip("198.51.100.5"), "mx"))
            .decision
            .is_err());
        drop(held);
        let spec = PolicySpec {
            deny: vec![Cidr::parse("::ffff:203.0.113.1/128").unwrap()],
            ..p.spec().clone()
        };
        let state = PolicyState::new(Duration::from_secs(30 * 86_400), 100_000);
        let mut specs = BTreeMap::new();
        specs.insert("p".to_string(), Arc::new(spec));
        let q = Policies::compile(&specs, &state).get("p").unwrap();
        assert!(
            q.denied(ip("203.0.113.1")),
            "mapped deny entry matches IPv4"
        );
        assert!(q.denied(ip("::ffff:203.0.113.1")));
        assert!(!q.denied(ip("203.0.113.2")));
    }
}
