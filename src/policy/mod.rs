//! The policy engine: per-listener limits, evaluated at the stage where their
//! key is known (connect, HELO, login, MAIL, RCPT).
//!
//! A policy is compiled in two steps. `config` turns YAML into a [`PolicySpec`]
//! (pure data, validated, with file:line errors). [`Policies::compile`] joins the
//! specs with the long-lived [`PolicyState`], where each rule's limiter lives
//! under a fingerprint of its definition: a reload keeps the counters of rules
//! that did not change and starts fresh for those that did.

pub mod action;
pub mod limits;
pub mod lru;

use crate::config::file::KeyPart;
use crate::config::units::{canonical, Cidr};
use action::Action;
use governor::Quota;
use limits::{Bucket, Counter, CounterGuard, Failures, KnownGood};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// When in a session a rule is evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    Connect,
    Helo,
    Login,
    Mail,
    Rcpt,
}

impl KeyPart {
    /// The earliest stage at which this key part has a value.
    pub fn stage(self) -> Stage {
        match self {
            KeyPart::Ip | KeyPart::IpPrefix | KeyPart::Listener => Stage::Connect,
            KeyPart::Helo => Stage::Helo,
            KeyPart::AuthUser => Stage::Login,
            KeyPart::Sender | KeyPart::SenderDomain => Stage::Mail,
            KeyPart::Rcpt | KeyPart::RcptDomain => Stage::Rcpt,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KeyPart::Ip => "ip",
            KeyPart::IpPrefix => "ip_prefix",
            KeyPart::Helo => "helo",
            KeyPart::Sender => "sender",
            KeyPart::SenderDomain => "sender_domain",
            KeyPart::Rcpt => "rcpt",
            KeyPart::RcptDomain => "rcpt_domain",
            KeyPart::AuthUser => "auth_user",
            KeyPart::Listener => "listener",
        }
    }
}

/// What a rule counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Events at the rule's stage: `count` per `period`, bucket `burst`.
    Rate {
        count: u32,
        period: Duration,
        burst: u32,
    },
    Concurrent(u32),
    Messages {
        count: u32,
        period: Duration,
        burst: u32,
    },
    Recipients {
        count: u32,
        period: Duration,
        burst: u32,
    },
    AuthFailures {
        count: u32,
        window: Duration,
    },
    RecipientsPerMessage(u32),
}

impl Kind {
    pub fn describe(&self) -> String {
        let per = |c: &u32, p: &Duration| format!("{c}/{}s", p.as_secs());
        match self {
            Kind::Rate {
                count,
                period,
                burst,
            } => format!("rate {} burst {burst}", per(count, period)),
            Kind::Concurrent(n) => format!("concurrent {n}"),
            Kind::Messages {
                count,
                period,
                burst,
            } => format!("messages {} burst {burst}", per(count, period)),
            Kind::Recipients {
                count,
                period,
                burst,
            } => format!("recipients {} burst {burst}", per(count, period)),
            Kind::AuthFailures { count, window } => {
                format!("auth_failures {count} per {}s", window.as_secs())
            }
            Kind::RecipientsPerMessage(n) => format!("recipients_per_message {n}"),
        }
    }
}

/// One validated limit rule.
#[derive(Debug, Clone)]
pub struct RuleSpec {
    pub name: String,
    pub key: Vec<KeyPart>,
    pub kind: Kind,
    pub action: Action,
    pub prefix_v4: u8,
    pub prefix_v6: u8,
    pub max_delay: Duration,
    /// The `ip` key groups IPv6 clients by this prefix (one host often holds a
    /// whole /64; IPv4 stays per address).
    pub ipv6_prefix: u8,
}

impl RuleSpec {
    /// Where the rule is evaluated.
    pub fn stage(&self) -> Stage {
        let key_stage = self
            .key
            .iter()
            .map(|k| k.stage())
            .max()
            .unwrap_or(Stage::Connect);
        match self.kind {
            Kind::Rate { .. } => key_stage,
            Kind::Concurrent(_) => Stage::Connect,
            Kind::Messages { .. } => Stage::Mail,
            Kind::Recipients { .. } | Kind::RecipientsPerMessage(_) => Stage::Rcpt,
            Kind::AuthFailures { .. } => Stage::Login,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AllowSpec {
    pub networks: Vec<Cidr>,
    /// Rule names skipped; empty = all.
    pub skip: Vec<String>,
}

/// A validated policy block.
#[derive(Debug, Clone)]
pub struct PolicySpec {
    pub name: String,
    pub deny: Vec<Cidr>,
    pub allow: Vec<AllowSpec>,
    pub rules: Vec<RuleSpec>,
    pub max_tracked_keys: usize,
    pub known_good: Duration,
    /// SPF/DKIM/DMARC/ARC settings; `authserv_id` empty = the listener's hostname.
    pub auth: Option<crate::auth::AuthPolicy>,
}

impl PolicySpec {
    /// The effective policy, rules in evaluation order, for `check`.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        if !self.deny.is_empty() {
            let n: Vec<String> = self.deny.iter().map(|c| c.to_string()).collect();
            let _ = writeln!(
                out,
                "    0. deny {} (before TLS and greeting)",
                n.join(", ")
            );
        }
        for a in &self.allow {
            let n: Vec<String> = a.networks.iter().map(|c| c.to_string()).collect();
            let what = if a.skip.is_empty() {
                "all limits".to_string()
            } else {
                a.skip.join(", ")
            };
            let _ = writeln!(out, "    0. allow {} skips {what}", n.join(", "));
        }
        if let Some(a) = &self.auth {
            let mut checks = Vec::new();
            if a.spf.is_some() || a.dmarc.is_some() {
                checks.push("spf (MAIL FROM)");
            }
            if a.dkim.is_some() || a.dmarc.is_some() {
                checks.push("dkim (after DATA)");
            }
            if a.dmarc.is_some() {
                checks.push("dmarc (after DATA)");
            }
            if a.arc.is_some() {
                checks.push("arc (after DATA)");
            }
            let id = if a.authserv_id.is_empty() {
                "<hostname>"
            } else {
                a.authserv_id.as_str()
            };
            let _ = writeln!(
                out,
                "    auth: authserv_id={id} checks: {}",
                checks.join(", ")
            );
        }
        let mut order: Vec<&RuleSpec> = self.rules.iter().collect();
        order.sort_by_key(|r| r.stage());
        for (i, r) in order.iter().enumerate() {
            let key: Vec<String> = r
                .key
                .iter()
                .map(|k| match k {
                    KeyPart::Ip => format!("ip=IPv4 /32, IPv6 /{}", r.ipv6_prefix),
                    KeyPart::IpPrefix => {
                        format!("ip_prefix=IPv4 /{}, IPv6 /{}", r.prefix_v4, r.prefix_v6)
                    }
                    k => k.as_str().to_string(),
                })
                .collect();
            let _ = writeln!(
                out,
                "    {}. [{:?}] {} key=[{}] {} action={}",
                i + 1,
                r.stage(),
                r.name,
                key.join(","),
                r.kind.describe(),
                r.action.as_str()
            );
        }
        out
    }
}

/// Long-lived limiter state shared by all compiled policies (survives reloads).
pub struct PolicyState {
    hasher: std::collections::hash_map::RandomState,
    buckets: Mutex<HashMap<String, Arc<Bucket>>>,
    counters: Mutex<HashMap<String, Arc<Counter>>>,
    failures: Mutex<HashMap<String, Arc<Failures>>>,
    hits: Mutex<HashMap<String, Arc<RuleHits>>>,
    pub known_good: KnownGood,
}

/// How often a rule fired (refused/delayed) and how often it would have (shadow).
#[derive(Default, Debug)]
pub struct RuleHits {
    pub enforced: AtomicU64,
    pub shadow: AtomicU64,
}

impl PolicyState {
    pub fn new() -> Arc<Self> {
        Arc::new(PolicyState {
            hasher: Default::default(),
            buckets: Default::default(),
            counters: Default::default(),
            failures: Default::default(),
            hits: Default::default(),
            known_good: KnownGood::new(Duration::from_secs(30 * 86_400), 100_000),
        })
    }

    fn get<T>(map: &Mutex<HashMap<String, Arc<T>>>, fp: &str, make: impl FnOnce() -> T) -> Arc<T> {
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

    fn hash(&self, parts: &[&str]) -> u64 {
        let mut h = self.hasher.build_hasher();
        for p in parts {
            p.hash(&mut h);
            0xffu8.hash(&mut h);
        }
        h.finish()
    }
}

enum Limiter {
    Bucket(Arc<Bucket>),
    Counter(Arc<Counter>, u32),
    Failures(Arc<Failures>),
    PerMessage(u32),
}

struct Rule {
    spec: RuleSpec,
    stage: Stage,
    limiter: Limiter,
    hits: Arc<RuleHits>,
}

/// A compiled policy, as a session sees it.
pub struct Policy {
    pub name: String,
    spec: PolicySpec,
    rules: Vec<Rule>,
    state: Arc<PolicyState>,
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
        action: Action,
        rule: String,
    },
}

/// Session slots held while a session runs.
pub struct ConnectPermit {
    _guards: Vec<CounterGuard>,
    pub delay: Duration,
}

fn domain_of(addr: &str) -> &str {
    addr.rsplit_once('@').map(|(_, d)| d).unwrap_or("")
}

fn mask(ip: IpAddr, v4: u8, v6: u8) -> String {
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
    fn key_values(&self, r: &RuleSpec, f: &Facts) -> Option<Vec<String>> {
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

    fn skipped(&self, r: &RuleSpec, ip: IpAddr) -> bool {
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

    /// Records a hit and turns the rule's action into a decision.
    fn hit(&self, rule: &Rule, values: &[String], wait: Duration) -> Decision {
        let key = Self::describe_key(&rule.spec, values);
        let action = rule.spec.action;
        crate::observe::metrics().policy_hit(&self.name, &rule.spec.name, action == Action::Shadow);
        if action == Action::Shadow {
            rule.hits.shadow.fetch_add(1, Ordering::Relaxed);
            info!(policy = %self.name, rule = %rule.spec.name, key = %key, "shadow: limit would have been enforced");
            return Decision::Continue;
        }
        rule.hits.enforced.fetch_add(1, Ordering::Relaxed);
        warn!(policy = %self.name, rule = %rule.spec.name, key = %key, action = action.as_str(), "policy limit hit");
        match action {
            Action::Delay => Decision::Delay(wait.min(rule.spec.max_delay)),
            Action::Tempfail | Action::Reject => Decision::Refuse {
                action,
                rule: rule.spec.name.clone(),
            },
            Action::Accept | Action::Tag | Action::Shadow => Decision::Continue,
        }
    }

    fn combine(acc: Decision, d: Decision) -> Decision {
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
    pub fn connect(&self, f: &Facts) -> Result<ConnectPermit, Decision> {
        if self.denied(f.ip) {
            warn!(policy = %self.name, ip = %f.ip, "denied by policy");
            return Err(Decision::Refuse {
                action: Action::Reject,
                rule: "deny".into(),
            });
        }
        let mut guards = Vec::new();
        let mut decision = Decision::Continue;
        for rule in self.rules.iter().filter(|r| r.stage == Stage::Connect) {
            if self.skipped(&rule.spec, f.ip) {
                continue;
            }
            let Some(values) = self.key_values(&rule.spec, f) else {
                continue;
            };
            let refs: Vec<&str> = values.iter().map(String::as_str).collect();
            let key = self.state.hash(&refs);
            let d = match &rule.limiter {
                Limiter::Bucket(b) => match b.take(key) {
                    Ok(()) => Decision::Continue,
                    Err(wait) => self.hit(rule, &values, wait),
                },
                Limiter::Counter(c, max) => match c.acquire(key, *max) {
                    Some(g) => {
                        guards.push(g);
                        Decision::Continue
                    }
                    // a delay would admit the session uncounted: `check`
                    // refuses the combination; fail closed if one gets here
                    None => match self.hit(rule, &values, rule.spec.max_delay) {
                        Decision::Delay(_) => Decision::Refuse {
                            action: Action::Tempfail,
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
            delay: if let Decision::Delay(d) = decision {
                d
            } else {
                Duration::ZERO
            },
        })
    }

    /// HELO, MAIL and RCPT stages (and `rate` rules keyed by auth_user at login).
    pub fn check(&self, stage: Stage, f: &Facts) -> Decision {
        let mut decision = Decision::Continue;
        for rule in self.rules.iter().filter(|r| r.stage == stage) {
            if self.skipped(&rule.spec, f.ip) {
                continue;
            }
            let Some(values) = self.key_values(&rule.spec, f) else {
                continue;
            };
            let d = match &rule.limiter {
                Limiter::Bucket(b) => {
                    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
                    match b.take(self.state.hash(&refs)) {
                        Ok(()) => Decision::Continue,
                        Err(wait) => self.hit(rule, &values, wait),
                    }
                }
                Limiter::PerMessage(max) if f.rcpts_in_message >= *max as usize => {
                    self.hit(rule, &values, Duration::ZERO)
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
        let user = f.auth_user?.to_ascii_lowercase();
        Some(self.state.hash(&["known-good", &user, &mask(f.ip, 24, 56)]))
    }

    /// Before a login is relayed: failed-login locks (and login rates). A lock
    /// keyed by user alone is not applied from a network where that user
    /// recently logged in successfully, so an attacker cannot lock a user out.
    pub fn login_allowed(&self, f: &Facts) -> Decision {
        let now = Instant::now();
        let mut decision = self.check(Stage::Login, f);
        if matches!(decision, Decision::Refuse { .. }) {
            return decision;
        }
        for rule in &self.rules {
            let Limiter::Failures(fails) = &rule.limiter else {
                continue;
            };
            if self.skipped(&rule.spec, f.ip) {
                continue;
            }
            let Some(values) = self.key_values(&rule.spec, f) else {
                continue;
            };
            let refs: Vec<&str> = values.iter().map(String::as_str).collect();
            let Some(wait) = fails.locked(self.state.hash(&refs), now) else {
                continue;
            };
            let per_user_only = rule.spec.key.contains(&KeyPart::AuthUser)
                && !rule
                    .spec
                    .key
                    .iter()
                    .any(|k| matches!(k, KeyPart::Ip | KeyPart::IpPrefix));
            if per_user_only
                && self
                    .known_good_key(f)
                    .is_some_and(|k| self.state.known_good.contains(k, now, self.spec.known_good))
            {
                info!(policy = %self.name, rule = %rule.spec.name, "per-user lock not applied: known-good network");
                continue;
            }
            decision = Self::combine(decision, self.hit(rule, &values, wait));
            if matches!(decision, Decision::Refuse { .. }) {
                break;
            }
        }
        decision
    }

    pub fn login_failed(&self, f: &Facts) {
        let now = Instant::now();
        for rule in &self.rules {
            if let Limiter::Failures(fails) = &rule.limiter {
                if let Some(values) = self.key_values(&rule.spec, f) {
                    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
                    fails.record(self.state.hash(&refs), now);
                }
            }
        }
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
                };
                let hits = PolicyState::get(&state.hits, &fp, RuleHits::default);
                rules.push(Rule {
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

    fn rule(name: &str, key: Vec<KeyPart>, kind: Kind, action: Action) -> RuleSpec {
        RuleSpec {
            name: name.into(),
            key,
            kind,
            action,
            prefix_v4: 24,
            prefix_v6: 56,
            max_delay: Duration::from_millis(50),
            ipv6_prefix: 64,
        }
    }

    fn policy(rules: Vec<RuleSpec>, allow: Vec<AllowSpec>) -> (Arc<Policy>, Arc<PolicyState>) {
        let spec = PolicySpec {
            name: "p".into(),
            deny: vec![Cidr::parse("192.0.2.0/24").unwrap()],
            allow,
            rules,
            max_tracked_keys: 1000,
            known_good: Duration::from_secs(3600),
            auth: None,
        };
        let state = PolicyState::new();
        let mut specs = BTreeMap::new();
        specs.insert("p".to_string(), Arc::new(spec));
        (Policies::compile(&specs, &state).get("p").unwrap(), state)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

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
                Action::Tempfail,
            )],
            vec![],
        );
        let f = Facts::new(ip("127.0.0.2"), "mx");
        let mut permits = Vec::new();
        for _ in 0..5 {
            permits.push(p.connect(&f).unwrap());
        }
        assert_eq!(
            p.connect(&f).err(),
            Some(Decision::Refuse {
                action: Action::Tempfail,
                rule: "conn".into()
            })
        );
        assert!(p.connect(&Facts::new(ip("127.0.0.3"), "mx")).is_ok());
        assert!(
            p.connect(&Facts::new(ip("192.0.2.9"), "mx")).is_err(),
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
                Action::Reject,
            )],
            allow,
        );
        let f = Facts::new(ip("127.0.0.2"), "mx");
        let a = p.connect(&f).unwrap();
        let _b = p.connect(&f).unwrap();
        assert!(p.connect(&f).is_err());
        drop(a);
        assert!(p.connect(&f).is_ok());
        let g = Facts::new(ip("10.1.2.3"), "mx");
        let _held: Vec<_> = (0..5).map(|_| p.connect(&g).unwrap()).collect();
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
                Action::Shadow,
            )],
            vec![],
        );
        let f = Facts::new(ip("127.0.0.2"), "mx");
        for _ in 0..4 {
            assert!(p.connect(&f).is_ok());
        }
        assert_eq!(p.hits()[0], ("s".to_string(), 0, 3));
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
                    Action::Tempfail,
                ),
                rule(
                    "rpm",
                    vec![KeyPart::Ip],
                    Kind::RecipientsPerMessage(2),
                    Action::Reject,
                ),
                rule(
                    "slow",
                    vec![KeyPart::Rcpt],
                    Kind::Recipients {
                        count: 1,
                        period: Duration::from_secs(3600),
                        burst: 1,
                    },
                    Action::Delay,
                ),
            ],
            vec![],
        );
        let mut f = Facts::new(ip("127.0.0.2"), "mx");
        f.sender = Some("a@Example.org");
        assert_eq!(p.check(Stage::Mail, &f), Decision::Continue);
        f.sender = Some("b@example.ORG");
        assert_eq!(p.check(Stage::Mail, &f), Decision::Continue);
        assert!(matches!(
            p.check(Stage::Mail, &f),
            Decision::Refuse {
                action: Action::Tempfail,
                ..
            }
        ));
        f.rcpt = Some("x@y.example");
        assert_eq!(p.check(Stage::Rcpt, &f), Decision::Continue);
        assert_eq!(
            p.check(Stage::Rcpt, &f),
            Decision::Delay(Duration::from_millis(50))
        );
        f.rcpts_in_message = 2;
        f.rcpt = Some("z@y.example");
        assert!(matches!(
            p.check(Stage::Rcpt, &f),
            Decision::Refuse {
                action: Action::Reject,
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
                    Action::Reject,
                ),
                rule(
                    "user",
                    vec![KeyPart::AuthUser],
                    Kind::AuthFailures {
                        count: 10,
                        window: Duration::from_secs(900),
                    },
                    Action::Tempfail,
                ),
            ],
            vec![],
        );
        let mut home = Facts::new(ip("127.0.0.5"), "pop3");
        home.auth_user = Some("alice");
        assert_eq!(p.login_allowed(&home), Decision::Continue);
        p.login_succeeded(&home);
        // an attacker elsewhere guesses alice's password
        let mut evil = Facts::new(ip("127.1.0.9"), "pop3");
        evil.auth_user = Some("alice");
        for _ in 0..5 {
            assert_eq!(p.login_allowed(&evil), Decision::Continue);
            p.login_failed(&evil);
        }
        assert!(
            matches!(
                p.login_allowed(&evil),
                Decision::Refuse {
                    action: Action::Reject,
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
            matches!(p.login_allowed(&fresh), Decision::Refuse { .. }),
            "per-user lock elsewhere"
        );
        // ...but not from her known-good network
        assert_eq!(p.login_allowed(&home), Decision::Continue);
    }

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
            Action::Tempfail,
        );
        let state = PolicyState::new();
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
                }),
            );
            Policies::compile(&specs, &state).get("p").unwrap()
        };
        let f = Facts::new(ip("127.0.0.2"), "mx");
        let p1 = mk(r.clone());
        p1.connect(&f).unwrap();
        p1.connect(&f).unwrap();
        let p2 = mk(r.clone());
        assert!(p2.connect(&f).is_err(), "unchanged rule keeps its counters");
        let mut changed = r;
        changed.kind = Kind::Rate {
            count: 3,
            period: Duration::from_secs(60),
            burst: 3,
        };
        let p3 = mk(changed);
        assert!(p3.connect(&f).is_ok(), "changed rule starts fresh");
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
                Action::Tempfail,
            )],
            vec![],
        );
        for i in 0..5000u32 {
            let _ = p.connect(&Facts::new(
                IpAddr::from(std::net::Ipv6Addr::from((u128::from(i) + 1) << 64)),
                "mx",
            ));
        }
        assert!(state.tracked_keys() <= 1000, "{}", state.tracked_keys());
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
                Action::Tempfail,
            )],
            vec![],
        );
        assert!(p.connect(&Facts::new(ip("2001:db8:1:2::1"), "mx")).is_ok());
        assert!(p
            .connect(&Facts::new(ip("2001:db8:1:2:ffff::9"), "mx"))
            .is_ok());
        assert!(
            p.connect(&Facts::new(ip("2001:db8:1:2::3"), "mx")).is_err(),
            "one /64 is one client"
        );
        assert!(
            p.connect(&Facts::new(ip("2001:db8:1:3::1"), "mx")).is_ok(),
            "another /64 is another client"
        );
        assert!(p.connect(&Facts::new(ip("127.0.0.2"), "mx")).is_ok());
        assert!(p.connect(&Facts::new(ip("127.0.0.3"), "mx")).is_ok());
        assert!(p.connect(&Facts::new(ip("127.0.0.3"), "mx")).is_ok());
        assert!(
            p.connect(&Facts::new(ip("127.0.0.3"), "mx")).is_err(),
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
            Action::Tempfail,
        );
        per_address.ipv6_prefix = 128;
        let (p, _) = policy(vec![per_address], vec![]);
        assert!(p.connect(&Facts::new(ip("2001:db8:1:2::1"), "mx")).is_ok());
        assert!(p.connect(&Facts::new(ip("2001:db8:1:2::2"), "mx")).is_ok());
        assert!(p.connect(&Facts::new(ip("2001:db8:1:2::2"), "mx")).is_err());
    }

    #[test]
    fn concurrent_with_delay_never_admits_uncounted() {
        // `check` refuses this combination; a spec built in code fails closed
        let (p, _) = policy(
            vec![rule(
                "conc",
                vec![KeyPart::Ip],
                Kind::Concurrent(1),
                Action::Delay,
            )],
            vec![],
        );
        let f = Facts::new(ip("127.0.0.2"), "mx");
        let _held = p.connect(&f).unwrap();
        assert!(matches!(
            p.connect(&f).err(),
            Some(Decision::Refuse {
                action: Action::Tempfail,
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
                Action::Reject,
            )],
            vec![],
        );
        // the deny list is 192.0.2.0/24
        assert!(p.denied(ip("::ffff:192.0.2.7")));
        let held = p.connect(&Facts::new(ip("198.51.100.5"), "mx")).unwrap();
        assert!(
            p.connect(&Facts::new(ip("::ffff:198.51.100.5"), "mx"))
                .is_err(),
            "one client, announced as TCP4 and as mapped TCP6, counts once"
        );
        drop(held);
        let held = p
            .connect(&Facts::new(ip("::ffff:198.51.100.5"), "mx"))
            .unwrap();
        assert!(p.connect(&Facts::new(ip("198.51.100.5"), "mx")).is_err());
        drop(held);
        let spec = PolicySpec {
            deny: vec![Cidr::parse("::ffff:203.0.113.1/128").unwrap()],
            ..p.spec().clone()
        };
        let state = PolicyState::new();
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
                Action::Tempfail,
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
        assert_eq!(p.login_allowed(&bob), Decision::Continue);
        p.login_failed(&bob);
        assert_eq!(
            p.login_allowed(&bob),
            Decision::Continue,
            "bob has one failure of his own, not the flood's"
        );
        assert!(state.tracked_keys() <= 1000, "{}", state.tracked_keys());
    }
}
