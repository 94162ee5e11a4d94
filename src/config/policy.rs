//! `policies:` blocks → [`PolicySpec`]: limit rules checked (one counting
//! field, keys known where the rule is counted, actions a limit may take),
//! allow lists naming real rules, and the mail-authentication settings.

use super::file::{AllowFile, PolicyFile};
use super::load::Source;
use super::{defaults, ConfigError};
use crate::action::PolicyAction;
use crate::policy::{AllowSpec, Kind, PolicySpec, RuleSpec};
use std::time::Duration;

/// The shortest and longest `ban_for` (a 1s minimum keeps tests quick; past
/// 30 days a ban is a `deny` entry's job).
pub const BAN_FOR_MIN: Duration = Duration::from_secs(1);
pub const BAN_FOR_MAX: Duration = Duration::from_secs(30 * 86_400);

pub(super) fn build_policy(
    s: &Source,
    name: &str,
    p: &PolicyFile,
) -> Result<PolicySpec, ConfigError> {
    let mut rules: Vec<RuleSpec> = Vec::new();
    for (i, r) in p.limits.iter().enumerate() {
        let rname = r.name.clone().unwrap_or_else(|| format!("rule-{}", i + 1));
        let at = |msg: String| {
            s.err_key(
                "policies",
                name,
                format!("policies.{name}.limits[{}] ({rname}): {msg}", i + 1),
            )
        };
        let at_field = |field: &str, msg: String| {
            let e = s.err(
                &["policies", name, "limits", field],
                format!("policies.{name}.limits[{}] ({rname}).{field}: {msg}", i + 1),
            );
            e
        };
        if rules.iter().any(|o| o.name == rname) {
            return Err(at(format!("rule name {rname:?} is used twice")));
        }
        if r.key.is_empty() {
            return Err(at_field("key", "must name at least one of ip, ip_prefix, helo, sender, sender_domain, rcpt, rcpt_domain, auth_user, listener".into()));
        }
        let burst_of = |count: u32| r.burst.unwrap_or(count);
        let mut kinds = Vec::new();
        if let Some(v) = r.rate {
            kinds.push(Kind::Rate {
                count: v.count,
                period: v.period,
                burst: burst_of(v.count),
            });
        }
        if let Some(n) = r.concurrent {
            kinds.push(Kind::Concurrent(n));
        }
        if let Some(v) = r.messages {
            kinds.push(Kind::Messages {
                count: v.count,
                period: v.period,
                burst: burst_of(v.count),
            });
        }
        if let Some(v) = r.recipients {
            kinds.push(Kind::Recipients {
                count: v.count,
                period: v.period,
                burst: burst_of(v.count),
            });
        }
        if let Some(v) = r.auth_failures {
            kinds.push(Kind::AuthFailures {
                count: v.count,
                window: v.period,
            });
        }
        if let Some(n) = r.recipients_per_message {
            kinds.push(Kind::RecipientsPerMessage(n));
        }
        if let Some(v) = r.rcpt_refusals {
            kinds.push(Kind::RcptRefusals {
                count: v.count,
                window: v.period,
            });
        }
        if kinds.len() != 1 {
            return Err(at("set exactly one of rate, concurrent, messages, recipients, auth_failures, recipients_per_message, rcpt_refusals".into()));
        }
        let kind = kinds.remove(0);
        if r.burst == Some(0) {
            return Err(at_field("burst", "must be at least 1".into()));
        }
        if matches!(kind, Kind::Concurrent(0) | Kind::RecipientsPerMessage(0)) {
            return Err(at("the limit must be at least 1".into()));
        }
        use crate::policy::KeyPart as K;
        let allowed: &[K] = match kind {
            Kind::Concurrent(_) => &[K::Ip, K::IpPrefix, K::Listener],
            Kind::AuthFailures { .. } => &[K::Ip, K::IpPrefix, K::AuthUser, K::Listener],
            Kind::Messages { .. } => &[
                K::Ip,
                K::IpPrefix,
                K::Listener,
                K::Helo,
                K::AuthUser,
                K::Sender,
                K::SenderDomain,
            ],
            _ => &[
                K::Ip,
                K::IpPrefix,
                K::Listener,
                K::Helo,
                K::AuthUser,
                K::Sender,
                K::SenderDomain,
                K::Rcpt,
                K::RcptDomain,
            ],
        };
        if let Some(k) = r.key.iter().find(|k| !allowed.contains(k)) {
            return Err(at_field(
                "key",
                format!("{} is not known where this limit is counted", k.as_str()),
            ));
        }
        let prefix_v4 = r.prefix_v4.unwrap_or(defaults::PREFIX_V4);
        let prefix_v6 = r.prefix_v6.unwrap_or(defaults::PREFIX_V6);
        if prefix_v4 > 32 || prefix_v6 > 128 {
            return Err(at("prefix_v4 must be ≤ 32 and prefix_v6 ≤ 128".into()));
        }
        let ipv6_prefix = r.ipv6_prefix.unwrap_or(defaults::IPV6_PREFIX);
        if ipv6_prefix > 128 {
            return Err(at_field("ipv6_prefix", "must be ≤ 128".into()));
        }
        let action = r.action.unwrap_or(defaults::ACTION);
        if matches!(kind, Kind::Concurrent(_)) && action == PolicyAction::Delay {
            // a tarpit admits the session afterwards without a slot: no limit at all
            let mut at = vec!["policies", name, "limits"];
            if let Some(n) = &r.name {
                at.push(n);
            }
            at.extend(["concurrent", "delay"]);
            return Err(s.err(
                &at,
                format!(
                    "policies.{name}.limits[{}] ({rname}): concurrent limits cannot use action: delay (the session would be admitted uncounted); use tempfail or reject",
                    i + 1
                ),
            ));
        }
        if matches!(action, PolicyAction::Accept | PolicyAction::Tag) {
            return Err(at_field(
                "action",
                "a limit's action is tempfail, reject, delay, shadow or ban".into(),
            ));
        }
        let ban_for = ban_for(r, &kind, action, &at_field)?;
        rules.push(RuleSpec {
            name: rname,
            key: r.key.clone(),
            kind,
            action,
            prefix_v4,
            prefix_v6,
            max_delay: r
                .max_delay
                .map(|d| d.0)
                .unwrap_or(defaults::MAX_DELAY)
                .min(Duration::from_secs(60)),
            ipv6_prefix,
            ban_for,
            shadow: r.shadow.unwrap_or(defaults::LIMIT_SHADOW),
        });
    }
    let mut allow = Vec::new();
    for a in &p.allow {
        allow.push(match a {
            AllowFile::Network(n) => AllowSpec {
                networks: vec![*n],
                skip: vec![],
            },
            AllowFile::Entry(e) => {
                if let Some(bad) = e.skip.iter().find(|n| !rules.iter().any(|r| &r.name == *n)) {
                    return Err(s.err(
                        &["policies", name, "allow", bad],
                        format!("policies.{name}.allow: no limit named {bad:?}"),
                    ));
                }
                AllowSpec {
                    networks: e.networks.clone(),
                    skip: e.skip.clone(),
                }
            }
        });
    }
    let auth = if p.spf.is_some()
        || p.dkim.is_some()
        || p.dmarc.is_some()
        || p.arc.is_some()
        || p.authserv_id.is_some()
    {
        let a = crate::auth::AuthPolicy {
            authserv_id: p.authserv_id.clone().unwrap_or_default(),
            spf: p.spf.clone(),
            dkim: p.dkim.clone(),
            dmarc: p.dmarc.clone(),
            arc: p.arc.clone(),
        };
        Some(a)
    } else {
        None
    };
    if let Some(a) = &auth {
        if let Some(check) = bans_in(a) {
            return Err(s.err(
                &["policies", name, check, "ban"],
                format!("policies.{name}.{check}: ban is an action of limit rules only (a check result is not a client to ban); use reject"),
            ));
        }
        if !a.authserv_id.is_empty() {
            a.validate().map_err(|e| {
                s.err(
                    &["policies", name, "authserv_id"],
                    format!("policies.{name}: {e}"),
                )
            })?;
        }
    }
    let dkim_sign = match &p.dkim_sign {
        Some(d) => Some(std::sync::Arc::new(super::dkim_sign::build_dkim_sign(
            s, name, d,
        )?)),
        None => None,
    };
    Ok(PolicySpec {
        name: name.to_string(),
        auth,
        dkim_sign,
        deny: p.deny.clone(),
        allow,
        rules,
        max_tracked_keys: p
            .max_tracked_keys
            .unwrap_or(defaults::MAX_TRACKED_KEYS)
            .clamp(16, 10_000_000),
        known_good: p.known_good.map(|d| d.0).unwrap_or(defaults::KNOWN_GOOD),
    })
}

/// `ban_for` of a rule: required with `action: ban` (bounded), refused
/// without it; a ban is by address, so the key must hold `ip`, and it is
/// made for evidence of abuse (rates, failures, refusals), not for caps.
fn ban_for(
    r: &super::file::LimitFile,
    kind: &Kind,
    action: PolicyAction,
    at_field: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Option<Duration>, ConfigError> {
    if action != PolicyAction::Ban {
        if r.ban_for.is_some() {
            return Err(at_field("ban_for", "ban_for needs action: ban".into()));
        }
        if r.shadow == Some(true) {
            return Err(at_field(
                "shadow",
                "shadow: true is for action: ban (other limits use action: shadow)".into(),
            ));
        }
        return Ok(None);
    }
    let Some(d) = r.ban_for.map(|d| d.0) else {
        return Err(at_field(
            "action",
            "action: ban needs ban_for (how long, 1s to 30d)".into(),
        ));
    };
    if !(BAN_FOR_MIN..=BAN_FOR_MAX).contains(&d) {
        return Err(at_field("ban_for", "ban_for must be from 1s to 30d".into()));
    }
    if matches!(kind, Kind::Concurrent(_) | Kind::RecipientsPerMessage(_)) {
        return Err(at_field(
            "action",
            "ban is for rate, messages, recipients, auth_failures and rcpt_refusals limits (a cap is no evidence of abuse)".into(),
        ));
    }
    if !r.key.contains(&crate::policy::KeyPart::Ip) {
        return Err(at_field(
            "key",
            "a ban is by client address: the key of an action: ban rule must include ip".into(),
        ));
    }
    Ok(Some(d))
}

/// The check (`spf`, `dkim`, `dmarc`, `arc`) that names `ban` for a result.
fn bans_in(a: &crate::auth::AuthPolicy) -> Option<&'static str> {
    let ban = |acts: &[Option<PolicyAction>]| acts.contains(&Some(PolicyAction::Ban));
    if let Some(x) = &a.spf {
        let acts = [
            x.pass,
            x.fail,
            x.softfail,
            x.neutral,
            x.none,
            x.temperror,
            x.permerror,
        ];
        if ban(&acts) {
            return Some("spf");
        }
    }
    if let Some(x) = &a.dkim {
        if ban(&[x.pass, x.fail, x.neutral, x.none, x.temperror, x.permerror]) {
            return Some("dkim");
        }
    }
    if let Some(x) = &a.dmarc {
        if ban(&[x.quarantine, x.reject, x.none, x.temperror, x.permerror]) {
            return Some("dmarc");
        }
    }
    if let Some(x) = &a.arc {
        if ban(&[x.pass, x.fail, x.none, x.temperror]) {
            return Some("arc");
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::fixtures::*;

    #[test]
    fn concurrent_with_delay_is_refused_with_position() {
        let e = err(&format!(
            "{POLICY_BASE}      - {{ name: slots, key: [ip], concurrent: 3, action: delay }}\n"
        ));
        assert!(e.starts_with("bad.yaml:9:"), "{e}");
        assert!(e.contains("concurrent") && e.contains("delay"), "{e}");
    }

    /// `action: ban`: `ban_for` required and bounded, never without ban;
    /// an `ip` key; evidence-of-abuse kinds only; `shadow` only with ban;
    /// not an action of SPF/DKIM/DMARC/ARC results. Each error names the
    /// rule's line.
    #[test]
    fn ban_rules_are_validated() {
        let with = |r: &str| POLICY_BASE.replace("{ key: [ip], rate: 5/minute }", r);
        let c = load_str(
            "b.yaml",
            &with("{ name: guess, key: [ip, listener], auth_failures: 6/15minutes, action: ban, ban_for: 1h }"),
        )
        .unwrap();
        let r = &c.policies["p"].rules[0];
        assert_eq!(
            (r.action, r.ban_for, r.shadow),
            (PolicyAction::Ban, Some(Duration::from_secs(3600)), false)
        );
        let c = load_str(
            "b.yaml",
            &with(
                "{ key: [ip], rcpt_refusals: 5/10minutes, action: ban, ban_for: 1s, shadow: true }",
            ),
        )
        .unwrap();
        let r = &c.policies["p"].rules[0];
        assert_eq!(
            r.kind,
            Kind::RcptRefusals {
                count: 5,
                window: Duration::from_secs(600)
            }
        );
        assert_eq!(r.stage(), crate::policy::PolicyStage::Rcpt);
        assert!(r.shadow);
        let described = c.policies["p"].describe();
        assert!(
            described.contains("rcpt_refusals 5 per 600s action=ban for 1s (every listener; IPv4 address, IPv6 /64) shadow: log only"),
            "{described}"
        );
        for (rule, why) in [
            (
                "{ key: [ip], auth_failures: 6/15minutes, action: ban }",
                "needs ban_for",
            ),
            (
                "{ key: [ip], auth_failures: 6/15minutes, action: ban, ban_for: 500ms }",
                "from 1s to 30d",
            ),
            (
                "{ key: [ip], auth_failures: 6/15minutes, action: ban, ban_for: 31d }",
                "from 1s to 30d",
            ),
            (
                "{ key: [ip], auth_failures: 6/15minutes, ban_for: 1h }",
                "ban_for needs action: ban",
            ),
            (
                "{ key: [ip], rate: 5/minute, shadow: true }",
                "shadow: true is for action: ban",
            ),
            (
                "{ key: [auth_user], auth_failures: 6/15minutes, action: ban, ban_for: 1h }",
                "must include ip",
            ),
            (
                "{ key: [ip_prefix], rate: 5/minute, action: ban, ban_for: 1h }",
                "must include ip",
            ),
            (
                "{ key: [ip], concurrent: 5, action: ban, ban_for: 1h }",
                "a cap is no evidence",
            ),
        ] {
            let e = err(&with(rule));
            assert!(
                e.starts_with("bad.yaml:8:") && e.contains(why),
                "{rule}: {e}"
            );
        }
        let e = err(&format!("{POLICY_BASE}    spf: {{ fail: ban }}\n"));
        assert!(
            e.starts_with("bad.yaml:9:") && e.contains("ban is an action of limit rules only"),
            "{e}"
        );
    }

    /// Issue 12.6: rates are typed values, located like every other value,
    /// and their periods are bounded as durations are (a period beyond what
    /// the limiter holds in u64 nanoseconds panicked when policies compiled).
    #[test]
    fn rates_are_typed_and_bounded() {
        let c = load_str(
            "r.yaml",
            &POLICY_BASE.replace("rate: 5/minute", "auth_failures: 5/1hour"),
        )
        .unwrap();
        let rule = &c.policies["p"].rules[0];
        assert_eq!(
            rule.kind,
            Kind::AuthFailures {
                count: 5,
                window: Duration::from_secs(3600)
            }
        );
        for bad in ["5/fortnight", "0/minute", "5", "5/0s"] {
            let e = err(&POLICY_BASE.replace("5/minute", bad));
            assert!(e.starts_with("bad.yaml:8:28:"), "{bad}: {e}");
        }
        let text = POLICY_BASE.replace("5/minute", "1/300000days");
        let loaded = load_str("huge.yaml", &text);
        if let Ok(c) = &loaded {
            // what the server does with a loaded configuration
            crate::policy::Policies::compile(
                &c.policies,
                &crate::policy::PolicyState::new(defaults::KNOWN_GOOD, defaults::MAX_TRACKED_KEYS),
            );
        }
        let e = loaded.unwrap_err().to_string();
        assert!(
            e.starts_with("huge.yaml:8:28:") && e.contains("too long"),
            "{e}"
        );
    }
}
