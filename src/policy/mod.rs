//! The policy engine: per-listener limits, evaluated at the stage where their
//! key is known (connect, HELO, login, MAIL, RCPT).
//!
//! A policy is compiled in two steps. `config` turns YAML into a [`PolicySpec`]
//! (pure data, validated, with file:line errors). [`Policies::compile`] joins the
//! specs with the long-lived [`PolicyState`], where each rule's limiter lives
//! under a fingerprint of its definition: a reload keeps the counters of rules
//! that did not change and starts fresh for those that did.
//!
//! ```text
//! spec.rs     validated rules (what they count, where they run), `check` text
//! state.rs    limiter state across reloads, compiling specs against it
//! evaluate.rs per-stage decisions of a compiled policy
//! bans.rs     client networks refused on every listener until they expire
//! shared.rs   the same decisions taken in the shared store (`state/`), one call a stage
//! limits.rs   the limiters: GCRA buckets, session counters, failure windows
//! lru.rs      the bounded key maps under them
//! ```

pub mod bans;
mod evaluate;
pub mod limits;
pub mod lru;
mod shared;
mod spec;
mod state;

pub use bans::{BanCause, BanInfo, BanOutcome, Bans};
pub use evaluate::{BanEvent, Checked, ConnectPermit, Decision, Facts, Hit, Policy};
pub use shared::STORE_RULE;
pub use spec::{AllowSpec, KeyPart, Kind, PolicySpec, PolicyStage, RuleSpec};
pub use state::{Policies, PolicyState, RuleHits};

/// A login name (SMTP AUTH, POP3 SASL) that may be relayed and used as a
/// limiter key: at most 255 octets, no control character (C0, DEL, C1; NUL
/// separates PLAIN's fields) and no whitespace (`alice` and `alice ` would be
/// two keys for one backend user). One rule for every protocol.
pub fn valid_login_name(name: &str) -> bool {
    name.len() <= 255 && !name.chars().any(|c| c.is_control() || c.is_whitespace())
}

/// Rules and compiled policies shared by the unit tests of the files above.
#[cfg(test)]
mod fixtures {
    pub use super::{
        AllowSpec, Decision, Facts, KeyPart, Kind, Policies, Policy, PolicySpec, PolicyState,
        RuleSpec,
    };
    pub use crate::action::PolicyAction;
    pub use crate::units::Cidr;
    pub use std::collections::BTreeMap;
    pub use std::net::IpAddr;
    pub use std::sync::Arc;
    pub use std::time::Duration;

    pub fn rule(name: &str, key: Vec<KeyPart>, kind: Kind, action: PolicyAction) -> RuleSpec {
        RuleSpec {
            name: name.into(),
            key,
            kind,
            action,
            prefix_v4: 24,
            prefix_v6: 56,
            max_delay: Duration::from_millis(50),
            ipv6_prefix: 64,
            ban_for: (action == PolicyAction::Ban).then_some(Duration::from_secs(3600)),
            shadow: false,
        }
    }

    pub fn policy(rules: Vec<RuleSpec>, allow: Vec<AllowSpec>) -> (Arc<Policy>, Arc<PolicyState>) {
        let spec = PolicySpec {
            name: "p".into(),
            deny: vec![Cidr::parse("192.0.2.0/24").unwrap()],
            allow,
            rules,
            max_tracked_keys: 1000,
            known_good: Duration::from_secs(3600),
            auth: None,
            dkim_sign: None,
        };
        let state = PolicyState::new(Duration::from_secs(30 * 86_400), 100_000);
        let mut specs = BTreeMap::new();
        specs.insert("p".to_string(), Arc::new(spec));
        (Policies::compile(&specs, &state).get("p").unwrap(), state)
    }

    pub fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
}
