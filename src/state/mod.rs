//! Limiter state shared by several mailgate instances through Valkey/Redis
//! (`state: store: redis`). The default (`store: memory`) keeps everything in
//! process (`policy::limits`) and never reaches this module's I/O.
//!
//! ```text
//! mod.rs     settings (`StoreSettings`, `OnUnavailable`), the store's `Op`s and `Answer`s
//! keys.rs    key naming under `prefix` (pure): rule ids, digests of key values
//! redis.rs   `Store`: one connection manager, the one Lua script (GCRA, leases,
//!            failure windows, known-good, TTL sets) run with EVALSHA, every call
//!            under `timeout`, a breaker that backs off while the store is down
//! lease.rs   session leases: the live set, one pipelined refresh per interval
//! ```
//!
//! Every key has a TTL, so the store never grows without bound; every call
//! waits at most `timeout`, and the caller decides what a failed call means
//! (`on_unavailable`). Metrics are counted here, at this I/O edge: refreshes
//! and releases run in background tasks no driver sees.

pub mod keys;
pub mod lease;
pub mod redis;

pub use self::redis::{Store, StoreError};
pub use lease::Lease;
use std::time::Duration;

/// What a policy decision does when the store cannot answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnUnavailable {
    /// Per-instance limits, as with `store: memory` (logged and counted).
    Local,
    /// No limit while the store is down.
    Accept,
    /// A temporary error to the client (421/4xx, -ERR, NO).
    Tempfail,
}

impl OnUnavailable {
    pub const fn as_str(self) -> &'static str {
        match self {
            OnUnavailable::Local => "local",
            OnUnavailable::Accept => "accept",
            OnUnavailable::Tempfail => "tempfail",
        }
    }
}

/// A validated `state:` section with `store: redis`.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreSettings {
    /// `redis://` or `rediss://` URL, as written (it may carry a password:
    /// only [`StoreSettings::redacted_url`] is ever shown).
    pub url: String,
    /// From `password_file` / `password_env` (overrides one in the URL).
    pub password: Option<String>,
    pub prefix: String,
    pub timeout: Duration,
    pub on_unavailable: OnUnavailable,
    /// How long a session lease lives without a refresh (a crashed
    /// instance's sessions stop counting after at most this long).
    pub lease_ttl: Duration,
}

impl std::fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSettings")
            .field("url", &self.redacted_url())
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("on_unavailable", &self.on_unavailable)
            .field("lease_ttl", &self.lease_ttl)
            .finish()
    }
}

impl StoreSettings {
    /// The URL without its user-info part (`redis://host:port/db`): what logs
    /// and `check` show.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// What `check` prints.
    pub fn describe(&self) -> String {
        format!(
            "redis {} prefix={:?} timeout={}ms on_unavailable={} lease_ttl={}s{}",
            self.redacted_url(),
            self.prefix,
            self.timeout.as_millis(),
            self.on_unavailable.as_str(),
            self.lease_ttl.as_secs(),
            if self.password.is_some() {
                " (password set)"
            } else {
                ""
            }
        )
    }
}

/// `scheme://user:secret@host/db` → `scheme://host/db` (`***@` marks that
/// credentials were there).
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<invalid url>".into();
    };
    let (auth, tail) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match auth.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://***@{host}{tail}"),
        None => format!("{scheme}://{auth}{tail}"),
    }
}

/// Where limiter state lives (`state.store`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StateSettings {
    /// In process, per instance (the default).
    #[default]
    Memory,
    Redis(StoreSettings),
}

impl StateSettings {
    pub fn describe(&self) -> String {
        match self {
            StateSettings::Memory => "memory (in process, per instance)".into(),
            StateSettings::Redis(s) => s.describe(),
        }
    }
}

/// One step of a store call. A call runs its ops in order, atomically (one
/// script), and stops after the first op that refuses with `stop` set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// GCRA: one cell per `per_cell`, up to `burst_time` ahead of now.
    Rate {
        key: String,
        per_cell: Duration,
        burst_time: Duration,
        stop: bool,
    },
    /// A session lease in the key's sorted set, unless it holds `max` live
    /// ones. On a stop, the leases this call took are given back.
    Lease {
        key: String,
        max: u32,
        stop: bool,
    },
    /// Renews a live lease of this instance (`lease.rs`, in the background).
    Renew {
        key: String,
        member: String,
    },
    /// Gives a lease back (the session ended).
    Release {
        key: String,
        member: String,
    },
    /// Whether the key was remembered (`Remember`) less than `trust` ago;
    /// later `Locked` ops with `spare_if_good` are then not applied.
    KnownGood {
        key: String,
        trust: Duration,
    },
    /// Whether `max` failures lie within `window`.
    Locked {
        key: String,
        max: u32,
        window: Duration,
        stop: bool,
        spare_if_good: bool,
    },
    /// Records a failure (the newest `max` are kept).
    Fail {
        key: String,
        max: u32,
        window: Duration,
    },
    /// Remembers the key for `ttl`.
    Remember {
        key: String,
        ttl: Duration,
    },
    /// A TTL set (`keys::ttl_set`): adds or renews `member` with `value`
    /// until `ttl` from now (a member living longer is kept as it is). The
    /// set holds at most `max` members: past it, the others expiring
    /// soonest make room (as the in-process ban list does).
    SetPut {
        key: String,
        member: String,
        value: String,
        ttl: Duration,
        max: u32,
    },
    /// A live member's value and remaining time.
    SetGet {
        key: String,
        member: String,
    },
    SetRemove {
        key: String,
        member: String,
    },
    /// Up to `max` live members.
    SetList {
        key: String,
        max: u32,
    },
}

/// What one op found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Admitted, recorded, or nothing to report.
    Ok,
    /// Over the rate, or locked: this long until it would pass.
    Wait(Duration),
    /// All `max` leases are taken.
    Full,
    /// Locked, but spared (a known-good network).
    Spared,
    /// `KnownGood` found the key.
    Good,
    /// `SetGet`: the member's value and remaining time.
    Member(String, Duration),
    /// `SetList`: (member, value, remaining).
    Members(Vec<(String, String, Duration)>),
    /// `SetRemove` removed a live member.
    Removed,
}
