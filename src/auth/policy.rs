//! What a policy does with authentication results.
//!
//! ```yaml
//! policies:
//!   inbound:
//!     authserv_id: mx.example.org
//!     spf:   { fail: reject, softfail: tag, neutral: tag, none: accept, temperror: tempfail, permerror: tag }
//!     dkim:  { fail: tag, temperror: tag }
//!     dmarc: { enforce: true, quarantine: tag, reject: reject }
//!     arc:   { fail: tag }
//! ```
//!
//! A check whose block is absent is not run (no DNS cost). Inside a block,
//! a result without a key is `accept`. DMARC is the exception: with
//! `enforce: true` a failing message from a `p=reject` domain is rejected and
//! one from a `p=quarantine` domain tagged unless the keys say otherwise;
//! with `enforce: false` DMARC only reports (actions at most `tag`).
//!
//! [`decide`] is pure: outcome in, strongest [`Verdict`] out, with
//! reject > tempfail > delay > tag > shadow > accept. `shadow` ranks above
//! `accept` only so that it reaches the log; it never refuses anything.

use super::verify::{
    AuthResult, Checks, DmarcPolicy, MessageOutcome, NotChecked, SpfIdentity, SpfOutcome,
};
use super::AuthError;
use crate::action::PolicyAction;
use serde::Deserialize;

/// `spf:` — one action per RFC 7208 result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SpfActions {
    pub pass: Option<PolicyAction>,
    pub fail: Option<PolicyAction>,
    pub softfail: Option<PolicyAction>,
    pub neutral: Option<PolicyAction>,
    pub none: Option<PolicyAction>,
    pub temperror: Option<PolicyAction>,
    pub permerror: Option<PolicyAction>,
}

/// `dkim:` — applied to the best signature of the message (see
/// [`MessageOutcome::dkim_summary`]); `none` = unsigned.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DkimActions {
    pub pass: Option<PolicyAction>,
    pub fail: Option<PolicyAction>,
    pub neutral: Option<PolicyAction>,
    pub none: Option<PolicyAction>,
    pub temperror: Option<PolicyAction>,
    pub permerror: Option<PolicyAction>,
}

/// `dmarc:` — `quarantine` / `reject` / `none` apply to a DMARC `fail`
/// according to the domain's published policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DmarcActions {
    /// Act on the published policy (`p=`/`sp=`/`np=`); false = report only.
    #[serde(default)]
    pub enforce: bool,
    /// Failing message, policy `quarantine` (default with enforce: `tag`).
    pub quarantine: Option<PolicyAction>,
    /// Failing message, policy `reject` (default with enforce: `reject`).
    pub reject: Option<PolicyAction>,
    /// Failing message, policy `none`.
    pub none: Option<PolicyAction>,
    pub temperror: Option<PolicyAction>,
    pub permerror: Option<PolicyAction>,
}

/// `arc:` — the chain validation result (reported; sealing is not done).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ArcActions {
    pub pass: Option<PolicyAction>,
    pub fail: Option<PolicyAction>,
    pub none: Option<PolicyAction>,
    pub temperror: Option<PolicyAction>,
}

/// The authentication part of one policy block.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthPolicy {
    /// Our authserv-id (RFC 8601 §2.5), usually the MX host name. Headers
    /// claiming it are removed from incoming mail.
    #[serde(default)]
    pub authserv_id: String,
    pub spf: Option<SpfActions>,
    pub dkim: Option<DkimActions>,
    pub dmarc: Option<DmarcActions>,
    pub arc: Option<ArcActions>,
}

impl AuthPolicy {
    /// Checks what serde cannot: an authserv_id that can stand in a header.
    pub fn validate(&self) -> Result<(), AuthError> {
        let any =
            self.spf.is_some() || self.dkim.is_some() || self.dmarc.is_some() || self.arc.is_some();
        if any && self.authserv_id.is_empty() {
            return Err(AuthError::Policy(
                "authserv_id is required when spf, dkim, dmarc or arc is set".into(),
            ));
        }
        if !self.authserv_id.is_empty() && !is_token(&self.authserv_id) {
            return Err(AuthError::Policy(format!(
                "authserv_id {:?} must be a host name (letters, digits, '.', '-', '_')",
                self.authserv_id
            )));
        }
        Ok(())
    }

    /// SPF is run at MAIL FROM when `spf:` is set, and also for `dmarc:`,
    /// which needs its result.
    pub fn wants_spf(&self) -> bool {
        self.spf.is_some() || self.dmarc.is_some()
    }

    /// The message checks this policy needs.
    pub fn checks(&self) -> Checks {
        Checks {
            dkim: self.dkim.is_some(),
            dmarc: self.dmarc.is_some(),
            arc: self.arc.is_some(),
        }
    }
}

fn is_token(s: &str) -> bool {
    s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
}

/// What to do, which check asked for it, and a reason fit for an SMTP reply
/// (printable ASCII, no line breaks, bounded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub action: PolicyAction,
    /// "spf", "dkim", "dmarc", "arc", or "" for the default accept.
    pub check: &'static str,
    pub reason: String,
}

impl Verdict {
    fn accept() -> Self {
        Verdict {
            action: PolicyAction::Accept,
            check: "",
            reason: String::new(),
        }
    }
}

fn strength(a: PolicyAction) -> u8 {
    match a {
        // `config` refuses `ban` for checks; were one here, it refuses as reject
        PolicyAction::Reject | PolicyAction::Ban => 5,
        PolicyAction::Tempfail => 4,
        PolicyAction::Delay => 3,
        PolicyAction::Tag => 2,
        PolicyAction::Shadow => 1,
        PolicyAction::Accept => 0,
    }
}

/// An outcome that the policy can judge: [`SpfOutcome`] at MAIL FROM,
/// [`MessageOutcome`] after DATA.
pub trait Decidable {
    /// Every configured rule that applies, in check order.
    fn verdicts(&self, policy: &AuthPolicy) -> Vec<Verdict>;
}

/// All applicable verdicts, strongest first (ties keep check order).
pub fn decisions<O: Decidable + ?Sized>(policy: &AuthPolicy, outcome: &O) -> Vec<Verdict> {
    let mut v = outcome.verdicts(policy);
    v.sort_by_key(|v| std::cmp::Reverse(strength(v.action)));
    v
}

/// The one action to take: the strongest applicable verdict, or accept.
pub fn decide<O: Decidable + ?Sized>(policy: &AuthPolicy, outcome: &O) -> Verdict {
    decisions(policy, outcome)
        .into_iter()
        .next()
        .unwrap_or_else(Verdict::accept)
}

fn clean(s: &str) -> String {
    super::verify::sanitize(s, 100)
}

/// The verdict on a check mailgate could not complete: tempfail, whatever
/// the `temperror:` keys say (fail closed; see [`NotChecked`]).
fn not_checked(n: &NotChecked) -> Vec<Verdict> {
    vec![Verdict {
        action: PolicyAction::Tempfail,
        check: n.check,
        reason: format!(
            "{} not checked: {}",
            n.check.to_uppercase(),
            clean(&n.reason)
        ),
    }]
}

impl Decidable for SpfOutcome {
    fn verdicts(&self, policy: &AuthPolicy) -> Vec<Verdict> {
        if let (true, Some(n)) = (policy.wants_spf(), &self.not_checked) {
            return not_checked(n);
        }
        let Some(a) = &policy.spf else {
            return Vec::new();
        };
        let action = match self.result {
            AuthResult::Pass => a.pass,
            AuthResult::Fail => a.fail,
            AuthResult::SoftFail => a.softfail,
            AuthResult::Neutral => a.neutral,
            AuthResult::None => a.none,
            AuthResult::TempError => a.temperror,
            AuthResult::PermError => a.permerror,
        };
        let Some(action) = action else {
            return Vec::new();
        };
        let who = match self.identity {
            SpfIdentity::MailFrom => format!("sender domain {}", clean(&self.domain)),
            SpfIdentity::Helo => format!("HELO {}", clean(&self.helo)),
        };
        let mut reason = match self.result {
            AuthResult::Fail => format!(
                "SPF fail: {who} does not designate {} as permitted sender",
                self.ip
            ),
            AuthResult::TempError => format!("SPF temporary error for {who}, try again later"),
            r => format!("SPF {r} for {who}"),
        };
        if let Some(detail) = self.explanation.as_deref().or(self.reason.as_deref()) {
            reason.push_str(" (");
            reason.push_str(&clean(detail));
            reason.push(')');
        }
        vec![Verdict {
            action,
            check: "spf",
            reason,
        }]
    }
}

impl Decidable for MessageOutcome {
    fn verdicts(&self, policy: &AuthPolicy) -> Vec<Verdict> {
        // Results next to an unfinished check are not final either (a DMARC
        // fail may only lack the signature that was not checked).
        if let Some(n) = &self.not_checked {
            return not_checked(n);
        }
        let mut out = Vec::new();
        if let (Some(a), Some((result, sig))) = (&policy.dkim, self.dkim_summary()) {
            let action = match result {
                AuthResult::Pass => a.pass,
                AuthResult::Fail | AuthResult::SoftFail => a.fail,
                AuthResult::Neutral => a.neutral,
                AuthResult::None => a.none,
                AuthResult::TempError => a.temperror,
                AuthResult::PermError => a.permerror,
            };
            if let Some(action) = action {
                let reason = match sig {
                    Some(s) => format!(
                        "DKIM {result} for d={}{}",
                        clean(&s.domain),
                        s.reason
                            .as_deref()
                            .map(|r| format!(" ({})", clean(r)))
                            .unwrap_or_default()
                    ),
                    None => "DKIM none: message is not signed".into(),
                };
                out.push(Verdict {
                    action,
                    check: "dkim",
                    reason,
                });
            }
        }
        if let (Some(a), Some(d)) = (&policy.dmarc, &self.dmarc) {
            let configured = match d.result {
                AuthResult::Fail => match d.policy {
                    DmarcPolicy::Reject => a.reject.or(a.enforce.then_some(PolicyAction::Reject)),
                    DmarcPolicy::Quarantine => {
                        a.quarantine.or(a.enforce.then_some(PolicyAction::Tag))
                    }
                    DmarcPolicy::None => a.none,
                },
                AuthResult::TempError => a.temperror,
                AuthResult::PermError => a.permerror,
                _ => None,
            };
            // Report-only mode never refuses, whatever the keys say.
            let action = configured.map(|act| {
                if !a.enforce && strength(act) > strength(PolicyAction::Tag) {
                    PolicyAction::Tag
                } else {
                    act
                }
            });
            if let Some(action) = action {
                let reason = match d.result {
                    AuthResult::Fail => format!(
                        "DMARC policy {} of {}: no aligned SPF or DKIM pass",
                        d.policy.as_str(),
                        clean(&d.from_domain)
                    ),
                    r => format!("DMARC {r} for {}", clean(&d.from_domain)),
                };
                out.push(Verdict {
                    action,
                    check: "dmarc",
                    reason,
                });
            }
        }
        if let (Some(a), Some(arc)) = (&policy.arc, &self.arc) {
            let action = match arc.result {
                AuthResult::Pass => a.pass,
                AuthResult::None => a.none,
                AuthResult::TempError => a.temperror,
                _ => a.fail,
            };
            if let Some(action) = action {
                out.push(Verdict {
                    action,
                    check: "arc",
                    reason: format!("ARC {}", arc.result),
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::verify::{ArcOutcome, DkimSignature, DmarcOutcome};
    use super::*;

    fn policy(yaml: &str) -> AuthPolicy {
        let p: AuthPolicy = serde_yaml::from_str(yaml).unwrap();
        p.validate().unwrap();
        p
    }

    fn spf(result: AuthResult) -> SpfOutcome {
        SpfOutcome {
            result,
            identity: SpfIdentity::MailFrom,
            domain: "example.com".into(),
            mail_from: "a@example.com".into(),
            sender: "a@example.com".into(),
            helo: "mail.example.com".into(),
            ip: "192.0.2.1".parse().unwrap(),
            receiver: "mx.example.org".into(),
            explanation: None,
            reason: None,
            not_checked: None,
            dns: Default::default(),
        }
    }

    fn msg(dkim: &[AuthResult], dmarc: Option<(AuthResult, DmarcPolicy)>) -> MessageOutcome {
        MessageOutcome {
            dkim: Some(
                dkim.iter()
                    .map(|r| DkimSignature {
                        result: *r,
                        domain: "example.com".into(),
                        selector: "s".into(),
                        auid: String::new(),
                        algorithm: "rsa-sha256",
                        b_prefix: "AAAAAAAA".into(),
                        reason: None,
                    })
                    .collect(),
            ),
            arc: Some(ArcOutcome {
                result: AuthResult::Fail,
                instances: 1,
                reason: None,
            }),
            dmarc: dmarc.map(|(result, policy)| DmarcOutcome {
                result,
                policy,
                from_domain: "example.com".into(),
                spf_aligned: false,
                dkim_aligned: false,
                reason: None,
            }),
            remote_ip: "192.0.2.1".parse().unwrap(),
            not_checked: None,
            dns: Default::default(),
        }
    }

    #[test]
    fn not_checked_is_a_tempfail_whatever_temperror_says() {
        let n = NotChecked {
            check: "spf",
            reason: "DNS query limit of the session reached (500 queries)".into(),
            runtime_busy: false,
        };
        let mut o = spf(AuthResult::TempError);
        o.not_checked = Some(n.clone());
        // `temperror: accept` and a DMARC-only policy (which needs SPF) alike
        for p in [
            "authserv_id: mx\nspf: { temperror: accept }\n",
            "authserv_id: mx\ndmarc: { enforce: true }\n",
        ] {
            let v = decide(&policy(p), &o);
            assert_eq!(v.action, PolicyAction::Tempfail, "{p}: {v:?}");
            assert!(
                v.reason.starts_with("SPF not checked: DNS query limit"),
                "{v:?}"
            );
        }
        // a DMARC reject next to an unfinished DKIM check is not final
        let mut m = msg(
            &[AuthResult::TempError],
            Some((AuthResult::Fail, DmarcPolicy::Reject)),
        );
        m.not_checked = Some(NotChecked { check: "dkim", ..n });
        let v = decide(&policy("authserv_id: mx\ndmarc: { enforce: true }\n"), &m);
        assert_eq!(
            (v.action, v.check),
            (PolicyAction::Tempfail, "dkim"),
            "{v:?}"
        );
    }

    #[test]
    fn spf_actions_per_result() {
        let p = policy(
            "authserv_id: mx.example.org\nspf: { fail: reject, softfail: tag, neutral: tag, none: accept, temperror: tempfail, permerror: shadow }",
        );
        let d = decide(&p, &spf(AuthResult::Fail));
        assert_eq!((d.action, d.check), (PolicyAction::Reject, "spf"));
        assert_eq!(
            d.reason,
            "SPF fail: sender domain example.com does not designate 192.0.2.1 as permitted sender"
        );
        assert_eq!(
            decide(&p, &spf(AuthResult::TempError)).action,
            PolicyAction::Tempfail
        );
        assert_eq!(
            decide(&p, &spf(AuthResult::SoftFail)).action,
            PolicyAction::Tag
        );
        assert_eq!(
            decide(&p, &spf(AuthResult::PermError)).action,
            PolicyAction::Shadow
        );
        assert_eq!(
            decide(&p, &spf(AuthResult::None)).action,
            PolicyAction::Accept
        );
        // unnamed result → accept, no check named
        assert_eq!(decide(&p, &spf(AuthResult::Pass)), Verdict::accept());
        // no spf block → nothing
        assert_eq!(
            decide(&AuthPolicy::default(), &spf(AuthResult::Fail)).action,
            PolicyAction::Accept
        );
    }

    #[test]
    fn reasons_are_reply_safe() {
        let p = policy("authserv_id: mx\nspf: { fail: reject }");
        let mut o = spf(AuthResult::Fail);
        o.domain = "evil\r\n550 pwned.example".into();
        o.explanation = Some("see\r\nhttp://x".into());
        let r = decide(&p, &o).reason;
        assert!(!r.contains('\r') && !r.contains('\n'), "{r}");
        assert!(r.len() < 400);
    }

    #[test]
    fn dmarc_enforcement() {
        let enforce = policy("authserv_id: mx\ndmarc: { enforce: true }");
        let fail_reject = msg(&[], Some((AuthResult::Fail, DmarcPolicy::Reject)));
        let d = decide(&enforce, &fail_reject);
        assert_eq!((d.action, d.check), (PolicyAction::Reject, "dmarc"));
        assert_eq!(
            d.reason,
            "DMARC policy reject of example.com: no aligned SPF or DKIM pass"
        );
        let fail_q = msg(&[], Some((AuthResult::Fail, DmarcPolicy::Quarantine)));
        assert_eq!(decide(&enforce, &fail_q).action, PolicyAction::Tag);
        let fail_none = msg(&[], Some((AuthResult::Fail, DmarcPolicy::None)));
        assert_eq!(decide(&enforce, &fail_none).action, PolicyAction::Accept);
        let pass = msg(
            &[AuthResult::Pass],
            Some((AuthResult::Pass, DmarcPolicy::Reject)),
        );
        assert_eq!(decide(&enforce, &pass).action, PolicyAction::Accept);

        let custom = policy("authserv_id: mx\ndmarc: { enforce: true, quarantine: tempfail, reject: tag, temperror: tempfail }");
        assert_eq!(decide(&custom, &fail_q).action, PolicyAction::Tempfail);
        assert_eq!(decide(&custom, &fail_reject).action, PolicyAction::Tag);
        let temp = msg(&[], Some((AuthResult::TempError, DmarcPolicy::None)));
        assert_eq!(decide(&custom, &temp).action, PolicyAction::Tempfail);

        let report_only = policy("authserv_id: mx\ndmarc: { enforce: false, reject: reject }");
        assert_eq!(decide(&report_only, &fail_reject).action, PolicyAction::Tag);
        let report_default = policy("authserv_id: mx\ndmarc: {}");
        assert_eq!(
            decide(&report_default, &fail_reject).action,
            PolicyAction::Accept
        );
    }

    #[test]
    fn strongest_wins_and_all_are_listed() {
        let p = policy(
            "authserv_id: mx\ndkim: { fail: tag, none: shadow }\ndmarc: { enforce: true }\narc: { fail: tempfail }",
        );
        let m = msg(
            &[AuthResult::Fail],
            Some((AuthResult::Fail, DmarcPolicy::Reject)),
        );
        let all = decisions(&p, &m);
        assert_eq!(
            all.iter().map(|v| (v.check, v.action)).collect::<Vec<_>>(),
            vec![
                ("dmarc", PolicyAction::Reject),
                ("arc", PolicyAction::Tempfail),
                ("dkim", PolicyAction::Tag)
            ]
        );
        assert_eq!(decide(&p, &m).check, "dmarc");
        // DKIM: a passing signature outweighs a failing one
        let m = msg(&[AuthResult::Fail, AuthResult::Pass], None);
        assert!(decisions(&p, &m).iter().all(|v| v.check != "dkim"));
        // unsigned → dkim none → shadow (logged, not refused)
        let m = msg(&[], None);
        let v = decisions(&p, &m);
        assert_eq!(
            v.last().map(|v| (v.check, v.action)),
            Some(("dkim", PolicyAction::Shadow))
        );
    }

    #[test]
    fn parsing_and_validation() {
        assert!(serde_yaml::from_str::<AuthPolicy>("spf: { fial: reject }").is_err());
        assert!(serde_yaml::from_str::<AuthPolicy>("dkim: { softfail: tag }").is_err());
        assert!(serde_yaml::from_str::<AuthPolicy>("spf: { fail: bounce }").is_err());
        let p: AuthPolicy = serde_yaml::from_str("spf: { fail: reject }").unwrap();
        assert!(p.validate().is_err(), "authserv_id required");
        let p: AuthPolicy = serde_yaml::from_str("authserv_id: \"mx; spf=pass\"").unwrap();
        assert!(p.validate().is_err());
        let p = policy("authserv_id: mx.example.org\ndmarc: { enforce: true }");
        assert!(p.wants_spf());
        assert_eq!(
            p.checks(),
            Checks {
                dkim: false,
                dmarc: true,
                arc: false
            }
        );
        assert!(!AuthPolicy::default().wants_spf());
    }
}
