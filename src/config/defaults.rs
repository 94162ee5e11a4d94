//! Every default of the configuration format, in one place. The build code
//! (`load.rs`, `listener.rs`, `backend.rs`, `policy.rs`, and the policy
//! state's known-good list) takes its values from these constants;
//! [`DOCUMENTED`] lists them per field, so `mailgate schema` publishes each as
//! the field's `default` and a unit test holds README's tables to them.

use super::{AuthMode, BareNewlines};
use crate::action::PolicyAction;
use std::time::Duration;

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}
const MIB: u64 = 1024 * 1024;

// state:
/// `state.prefix`: every key in the shared store starts with it.
pub const STATE_PREFIX: &str = "mailgate:";
/// `state.timeout`: the longest a session waits for the store per stage.
pub const STATE_TIMEOUT: Duration = Duration::from_millis(50);
pub const STATE_ON_UNAVAILABLE: crate::state::OnUnavailable = crate::state::OnUnavailable::Local;
/// `state.lease_ttl`: a crashed instance's sessions stop counting after it.
pub const STATE_LEASE_TTL: Duration = secs(30);

// server:
pub const SHUTDOWN_GRACE: Duration = secs(30);
pub const MAX_INFLIGHT_DATA: u64 = 512 * MIB;

// listeners:
pub const MAX_CONNECTIONS: usize = 1000;
pub const MAX_MESSAGE_SIZE: u64 = 25 * MIB;
pub const MAX_RECIPIENTS: usize = 100;
pub const MAX_ERRORS: u32 = 10;
pub const BARE_NEWLINES: BareNewlines = BareNewlines::Reject;
/// RFC 5321 §4.5.3.1.4
pub const MAX_COMMAND_LINE: usize = 512;
/// IMAP listeners: RFC 7162 §4 asks servers for at least 8192 octets.
pub const IMAP_MAX_COMMAND_LINE: usize = 8192;
/// RFC 5321 §4.5.3.1.6
pub const MAX_TEXT_LINE: usize = 1000;
pub const AUTH: AuthMode = AuthMode::None;
pub const APOP: bool = false;
pub const MAX_LOGIN_FAILURES: u32 = 3;
pub const LOGIN_FAILURE_DELAY: Duration = secs(2);
pub const MAX_TRANSACTIONS: u32 = 100;
pub const APOP_MAX_PENDING: usize = 50;
pub const APOP_PRELOGIN_TIMEOUT: Duration = secs(10);
pub const PROXY_TIMEOUT: Duration = secs(5);
pub const PROXY_ALLOW_LOCAL: bool = false;

/// `timeouts:`, RFC 5321 §4.5.3.2 where it has a value.
pub mod timeouts {
    use super::secs;
    use std::time::Duration;
    pub const TLS_HANDSHAKE: Duration = secs(10);
    pub const COMMAND: Duration = secs(300);
    pub const DATA: Duration = secs(180);
    pub const SESSION: Duration = secs(3600);
    pub const BACKEND_CONNECT: Duration = secs(10);
    pub const BACKEND_REPLY: Duration = secs(300);
    pub const BACKEND_DATA: Duration = secs(600);
    pub const IDLE: Duration = secs(600);
    /// IMAP listeners: RFC 3501 §5.4's autologout timer of at least 30 minutes.
    pub const IMAP_IDLE: Duration = secs(1800);
}

// backends:
pub const IDENTITY_OPTIONAL: bool = false;
/// `reuse:` given: idle backend connections kept per backend, how long one
/// may sit idle (Postfix's own client caches its connections 2 s:
/// `smtp_connection_cache_time_limit`), and how many client sessions one
/// connection serves (legacy servers may cap messages per connection).
pub const REUSE_MAX_IDLE: usize = 16;
pub const REUSE_IDLE_TIMEOUT: Duration = Duration::from_secs(2);
pub const REUSE_MAX_SESSIONS: u32 = 100;

// policies: and their limits
pub const MAX_TRACKED_KEYS: usize = 100_000;
pub const KNOWN_GOOD: Duration = secs(30 * 86_400);
pub const ACTION: PolicyAction = PolicyAction::Tempfail;
pub const MAX_DELAY: Duration = secs(5);
pub const PREFIX_V4: u8 = 24;
pub const PREFIX_V6: u8 = 56;
pub const IPV6_PREFIX: u8 = 64;
pub const LIMIT_SHADOW: bool = false;

// policies: dkim_sign:
pub const DKIM_SIGN_UNKNOWN_DOMAIN: crate::sign::UnknownDomain = crate::sign::UnknownDomain::Reject;
pub const DKIM_SIGN_MATCH_ENVELOPE_SENDER: bool = false;
pub const DKIM_SIGN_CANONICALIZATION: (
    mail_auth::dkim::Canonicalization,
    mail_auth::dkim::Canonicalization,
) = (
    mail_auth::dkim::Canonicalization::Relaxed,
    mail_auth::dkim::Canonicalization::Relaxed,
);

// policies: triage:
pub const TRIAGE_THRESHOLD: i32 = 1;
pub const TRIAGE_WEIGHT: i32 = 1;
pub const TRIAGE_ACTION: crate::triage::TriageAction = crate::triage::TriageAction::Reject;
pub const TRIAGE_PREGREET_WAIT: Duration = secs(2);
pub const TRIAGE_CACHE: Duration = secs(86_400);
pub const TRIAGE_CACHE_SIZE: usize = 100_000;
/// Long enough for a list server's answer over a normal resolver (they
/// answer in milliseconds, or from its cache), short enough that a dead
/// list delays a new client's greeting by at most this (postscreen waits
/// longer but greets first; here the greeting is what waits).
pub const TRIAGE_TIMEOUT: Duration = secs(2);

/// A default as an operator writes it.
#[derive(Debug, Clone, Copy)]
pub enum Value {
    Duration(Duration),
    Size(u64),
    Number(u64),
    Bool(bool),
    Word(&'static str),
}

impl Value {
    /// The YAML spelling: the largest unit that divides the value (`5m`, `25MiB`).
    pub fn yaml(self) -> String {
        match self {
            Value::Duration(d) if d.subsec_millis() != 0 => format!("{}ms", d.as_millis()),
            Value::Duration(d) => {
                let s = d.as_secs();
                let unit = [(86_400, "d"), (3600, "h"), (60, "m")]
                    .into_iter()
                    .find(|(u, _)| s > 0 && s % u == 0);
                match unit {
                    Some((u, name)) => format!("{}{name}", s / u),
                    None => format!("{s}s"),
                }
            }
            Value::Size(b) => {
                let unit = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")]
                    .into_iter()
                    .find(|(u, _)| b > 0 && b % u == 0);
                match unit {
                    Some((u, name)) => format!("{}{name}", b / u),
                    None => b.to_string(),
                }
            }
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Word(w) => w.to_string(),
        }
    }

    fn json(self) -> serde_json::Value {
        match self {
            Value::Number(n) => n.into(),
            Value::Bool(b) => b.into(),
            other => other.yaml().into(),
        }
    }
}

/// (schema definition of the section, field, default) for every field whose
/// default is a fixed value (others derive from other fields: `hostname`,
/// `helo_name`, `require_tls`, `burst`).
pub const DOCUMENTED: &[(&str, &str, Value)] = &[
    (
        "ServerFile",
        "shutdown_grace",
        Value::Duration(SHUTDOWN_GRACE),
    ),
    (
        "ServerFile",
        "max_inflight_data",
        Value::Size(MAX_INFLIGHT_DATA),
    ),
    (
        "ListenerFile",
        "max_connections",
        Value::Number(MAX_CONNECTIONS as u64),
    ),
    (
        "ListenerFile",
        "max_message_size",
        Value::Size(MAX_MESSAGE_SIZE),
    ),
    (
        "ListenerFile",
        "max_recipients",
        Value::Number(MAX_RECIPIENTS as u64),
    ),
    (
        "ListenerFile",
        "max_errors",
        Value::Number(MAX_ERRORS as u64),
    ),
    ("ListenerFile", "bare_newlines", Value::Word("reject")),
    (
        "ListenerFile",
        "max_command_line",
        Value::Number(MAX_COMMAND_LINE as u64),
    ),
    (
        "ListenerFile",
        "max_text_line",
        Value::Number(MAX_TEXT_LINE as u64),
    ),
    ("ListenerFile", "auth", Value::Word("none")),
    ("ListenerFile", "apop", Value::Bool(APOP)),
    (
        "ListenerFile",
        "max_login_failures",
        Value::Number(MAX_LOGIN_FAILURES as u64),
    ),
    (
        "ListenerFile",
        "login_failure_delay",
        Value::Duration(LOGIN_FAILURE_DELAY),
    ),
    (
        "ListenerFile",
        "max_transactions",
        Value::Number(MAX_TRANSACTIONS as u64),
    ),
    (
        "ListenerFile",
        "apop_max_pending",
        Value::Number(APOP_MAX_PENDING as u64),
    ),
    (
        "ListenerFile",
        "apop_prelogin_timeout",
        Value::Duration(APOP_PRELOGIN_TIMEOUT),
    ),
    (
        "ProxyProtocolFile",
        "timeout",
        Value::Duration(PROXY_TIMEOUT),
    ),
    (
        "ProxyProtocolFile",
        "allow_local",
        Value::Bool(PROXY_ALLOW_LOCAL),
    ),
    (
        "TimeoutsFile",
        "tls_handshake",
        Value::Duration(timeouts::TLS_HANDSHAKE),
    ),
    (
        "TimeoutsFile",
        "command",
        Value::Duration(timeouts::COMMAND),
    ),
    ("TimeoutsFile", "data", Value::Duration(timeouts::DATA)),
    (
        "TimeoutsFile",
        "session",
        Value::Duration(timeouts::SESSION),
    ),
    (
        "TimeoutsFile",
        "backend_connect",
        Value::Duration(timeouts::BACKEND_CONNECT),
    ),
    (
        "TimeoutsFile",
        "backend_reply",
        Value::Duration(timeouts::BACKEND_REPLY),
    ),
    (
        "TimeoutsFile",
        "backend_data",
        Value::Duration(timeouts::BACKEND_DATA),
    ),
    ("TimeoutsFile", "idle", Value::Duration(timeouts::IDLE)),
    (
        "BackendFile",
        "identity_optional",
        Value::Bool(IDENTITY_OPTIONAL),
    ),
    (
        "ReuseFile",
        "max_idle",
        Value::Number(REUSE_MAX_IDLE as u64),
    ),
    (
        "ReuseFile",
        "idle_timeout",
        Value::Duration(REUSE_IDLE_TIMEOUT),
    ),
    (
        "ReuseFile",
        "max_sessions",
        Value::Number(REUSE_MAX_SESSIONS as u64),
    ),
    (
        "PolicyFile",
        "max_tracked_keys",
        Value::Number(MAX_TRACKED_KEYS as u64),
    ),
    ("PolicyFile", "known_good", Value::Duration(KNOWN_GOOD)),
    ("LimitFile", "action", Value::Word(ACTION.as_str())),
    ("LimitFile", "max_delay", Value::Duration(MAX_DELAY)),
    ("LimitFile", "prefix_v4", Value::Number(PREFIX_V4 as u64)),
    ("LimitFile", "prefix_v6", Value::Number(PREFIX_V6 as u64)),
    (
        "LimitFile",
        "ipv6_prefix",
        Value::Number(IPV6_PREFIX as u64),
    ),
    ("LimitFile", "shadow", Value::Bool(LIMIT_SHADOW)),
    ("StateFile", "store", Value::Word("memory")),
    ("StateFile", "prefix", Value::Word(STATE_PREFIX)),
    ("StateFile", "timeout", Value::Duration(STATE_TIMEOUT)),
    (
        "StateFile",
        "on_unavailable",
        Value::Word(STATE_ON_UNAVAILABLE.as_str()),
    ),
    ("StateFile", "lease_ttl", Value::Duration(STATE_LEASE_TTL)),
    (
        "DkimSignFile",
        "unknown_domain",
        Value::Word(DKIM_SIGN_UNKNOWN_DOMAIN.as_str()),
    ),
    (
        "DkimSignFile",
        "match_envelope_sender",
        Value::Bool(DKIM_SIGN_MATCH_ENVELOPE_SENDER),
    ),
    (
        "DkimSignFile",
        "canonicalization",
        Value::Word("relaxed/relaxed"),
    ),
    (
        "TriageFile",
        "threshold",
        Value::Number(TRIAGE_THRESHOLD as u64),
    ),
    ("TriageFile", "action", Value::Word(TRIAGE_ACTION.as_str())),
    ("TriageFile", "cache", Value::Duration(TRIAGE_CACHE)),
    (
        "TriageFile",
        "cache_size",
        Value::Number(TRIAGE_CACHE_SIZE as u64),
    ),
    ("TriageFile", "timeout", Value::Duration(TRIAGE_TIMEOUT)),
    ("DnsblFile", "weight", Value::Number(TRIAGE_WEIGHT as u64)),
    (
        "PregreetFile",
        "wait",
        Value::Duration(TRIAGE_PREGREET_WAIT),
    ),
    (
        "PregreetFile",
        "action",
        Value::Word(TRIAGE_ACTION.as_str()),
    ),
];

/// Writes [`DOCUMENTED`] into the JSON Schema as each field's `default`.
pub(super) fn annotate(schema: &mut serde_json::Value) {
    for (def, field, value) in DOCUMENTED {
        if let Some(p) = schema
            .pointer_mut(&format!("/$defs/{def}/properties/{field}"))
            .and_then(|p| p.as_object_mut())
        {
            p.insert("default".into(), value.json());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_parse_back_to_the_constants() {
        for (def, field, value) in DOCUMENTED {
            let back = match value {
                Value::Duration(d) => crate::units::Secs::parse(&value.yaml()).map(|s| s.0 == *d),
                Value::Size(b) => crate::units::ByteSize::parse(&value.yaml()).map(|s| s.0 == *b),
                _ => Ok(true),
            };
            assert_eq!(back, Ok(true), "{def}.{field}: {}", value.yaml());
        }
        // the two enum defaults, as DOCUMENTED spells them
        let yaml = |def: &str, field: &str| {
            let (_, _, v) = DOCUMENTED
                .iter()
                .find(|(d, f, _)| (*d, *f) == (def, field))
                .unwrap();
            v.yaml()
        };
        let b: BareNewlines = serde_yaml::from_str(&yaml("ListenerFile", "bare_newlines")).unwrap();
        assert_eq!(b, BARE_NEWLINES);
        let a: AuthMode = serde_yaml::from_str(&yaml("ListenerFile", "auth")).unwrap();
        assert_eq!(a, AUTH);
    }

    /// The schema carries every default, at the field it belongs to.
    #[test]
    fn schema_publishes_every_default() {
        let v: serde_json::Value = serde_json::from_str(&super::super::json_schema()).unwrap();
        for (def, field, value) in DOCUMENTED {
            let at = format!("/$defs/{def}/properties/{field}/default");
            assert_eq!(v.pointer(&at), Some(&value.json()), "{at}");
        }
    }

    /// README's configuration section names each default next to its field
    /// (on the same line, as a whole word), so the two cannot drift apart.
    #[test]
    fn readme_states_every_default() {
        let readme = include_str!("../../README.md");
        let missing: Vec<String> = DOCUMENTED
            .iter()
            .filter(|(_, field, value)| {
                let shown = value.yaml();
                !readme.lines().any(|line| {
                    let line = without_digit_commas(line);
                    has_word(&line, field) && has_word(&line, &shown)
                })
            })
            .map(|(def, field, value)| format!("{def}.{field} = {}", value.yaml()))
            .collect();
        assert!(missing.is_empty(), "README does not state: {missing:?}");
    }

    /// `100,000` → `100000`; other commas stay.
    fn without_digit_commas(line: &str) -> String {
        let b = line.as_bytes();
        let digit = |i: usize| b.get(i).is_some_and(u8::is_ascii_digit);
        line.char_indices()
            .filter(|(i, c)| !(*c == ',' && *i > 0 && digit(i - 1) && digit(i + 1)))
            .map(|(_, c)| c)
            .collect()
    }

    fn has_word(line: &str, w: &str) -> bool {
        let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
        line.match_indices(w).any(|(i, _)| {
            !line[..i].chars().next_back().is_some_and(word)
                && !line[i + w.len()..].chars().next().is_some_and(word)
        })
    }
}
