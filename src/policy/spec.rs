//! Validated policy data, as `config` builds it from YAML: the rules with what
//! they count ([`Kind`]) and where they are evaluated ([`PolicyStage`]), allow lists,
//! and the description `mailgate check` prints.

use crate::action::PolicyAction;
use crate::units::Cidr;
use std::fmt::Write as _;
use std::time::Duration;

/// When in a session a rule is evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyStage {
    Connect,
    Helo,
    Login,
    Mail,
    Rcpt,
}

/// One part of a rule's key (`key: [ip, sender_domain]`): what the rule counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum KeyPart {
    Ip,
    IpPrefix,
    Helo,
    Sender,
    SenderDomain,
    Rcpt,
    RcptDomain,
    AuthUser,
    Listener,
}

impl KeyPart {
    /// The earliest stage at which this key part has a value.
    pub fn stage(self) -> PolicyStage {
        match self {
            KeyPart::Ip | KeyPart::IpPrefix | KeyPart::Listener => PolicyStage::Connect,
            KeyPart::Helo => PolicyStage::Helo,
            KeyPart::AuthUser => PolicyStage::Login,
            KeyPart::Sender | KeyPart::SenderDomain => PolicyStage::Mail,
            KeyPart::Rcpt | KeyPart::RcptDomain => PolicyStage::Rcpt,
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
    /// Recipients the backend refused (5xx to RCPT) in a sliding window:
    /// recipient harvesting.
    RcptRefusals {
        count: u32,
        window: Duration,
    },
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
            Kind::RcptRefusals { count, window } => {
                format!("rcpt_refusals {count} per {}s", window.as_secs())
            }
        }
    }
}

/// One validated limit rule.
#[derive(Debug, Clone)]
pub struct RuleSpec {
    pub name: String,
    pub key: Vec<KeyPart>,
    pub kind: Kind,
    pub action: PolicyAction,
    pub prefix_v4: u8,
    pub prefix_v6: u8,
    pub max_delay: Duration,
    /// The `ip` key groups IPv6 clients by this prefix (one host often holds a
    /// whole /64; IPv4 stays per address).
    pub ipv6_prefix: u8,
    /// `action: ban`: how long the client's network is banned.
    pub ban_for: Option<Duration>,
    /// `shadow: true` (with `action: ban`): count and log the ban, do nothing.
    pub shadow: bool,
}

impl RuleSpec {
    /// Keyed by the login name and not by the client's address: a lock of
    /// such a rule spares a known-good (user, network) pair, since an
    /// attacker elsewhere must not lock the user out of their own network.
    pub fn per_user_only(&self) -> bool {
        self.key.contains(&KeyPart::AuthUser)
            && !self
                .key
                .iter()
                .any(|k| matches!(k, KeyPart::Ip | KeyPart::IpPrefix))
    }

    /// Where the rule is evaluated.
    pub fn stage(&self) -> PolicyStage {
        let key_stage = self
            .key
            .iter()
            .map(|k| k.stage())
            .max()
            .unwrap_or(PolicyStage::Connect);
        match self.kind {
            Kind::Rate { .. } => key_stage,
            Kind::Concurrent(_) => PolicyStage::Connect,
            Kind::Messages { .. } => PolicyStage::Mail,
            Kind::Recipients { .. } | Kind::RecipientsPerMessage(_) | Kind::RcptRefusals { .. } => {
                PolicyStage::Rcpt
            }
            Kind::AuthFailures { .. } => PolicyStage::Login,
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
    /// DKIM signing of authenticated sessions' mail (keys loaded).
    pub dkim_sign: Option<std::sync::Arc<crate::sign::SignPolicy>>,
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
        if let Some(d) = &self.dkim_sign {
            let _ = writeln!(out, "    {}", d.describe());
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
            let mut action = r.action.as_str().to_string();
            if let Some(d) = r.ban_for {
                let v6 = if r.ipv6_prefix < 128 {
                    format!("IPv6 /{}", r.ipv6_prefix)
                } else {
                    "IPv6 address".into()
                };
                let _ = write!(
                    action,
                    " for {}s (every listener; IPv4 address, {v6}){}",
                    d.as_secs(),
                    if r.shadow { " shadow: log only" } else { "" }
                );
            }
            let _ = writeln!(
                out,
                "    {}. [{:?}] {} key=[{}] {} action={action}",
                i + 1,
                r.stage(),
                r.name,
                key.join(","),
                r.kind.describe(),
            );
        }
        out
    }
}
