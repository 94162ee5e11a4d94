//! The allowlist cache: clients (addresses) that passed every test of a
//! policy's triage are not tested again for `cache` — no held greeting, no
//! DNS queries. One [`PassCache`] per policy, kept in [`TriageState`], which
//! the gateway holds for its whole life, so the cache survives reloads.
//!
//! Bounded like the limiters (`policy/lru.rs`): at most `cache_size`
//! addresses, a new one replacing an expired (else the least recently seen)
//! one. Only passes are stored: a client that failed a test, even one only
//! shadowed, is tested again next time.

use crate::policy::lru::Lru;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The addresses that passed one policy's triage, and when.
pub struct PassCache {
    hasher: std::collections::hash_map::RandomState,
    /// How long a pass counts (the policy's `cache`; follows reloads).
    ttl_ms: AtomicU64,
    max: AtomicUsize,
    map: Mutex<Lru<Instant>>,
}

impl PassCache {
    pub fn new(ttl: Duration, max: usize) -> Self {
        let c = PassCache {
            hasher: Default::default(),
            ttl_ms: AtomicU64::new(0),
            max: AtomicUsize::new(max),
            map: Mutex::new(Lru::default()),
        };
        c.configure(ttl, max);
        c
    }

    /// A reload's new `cache` and `cache_size` (entries beyond the new size
    /// go as new clients arrive).
    pub fn configure(&self, ttl: Duration, max: usize) {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        self.ttl_ms.store(ms, Ordering::Relaxed);
        self.max.store(max.max(1), Ordering::Relaxed);
    }

    fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms.load(Ordering::Relaxed))
    }

    fn key(&self, ip: IpAddr) -> u64 {
        self.hasher.hash_one(ip)
    }

    /// Whether `ip` passed within the last `cache`.
    pub fn passed(&self, ip: IpAddr, now: Instant) -> bool {
        let ttl = self.ttl();
        let key = self.key(ip);
        let m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        m.peek(key)
            .is_some_and(|t| now.saturating_duration_since(*t) < ttl)
    }

    /// `ip` passed every test at `now`.
    pub fn remember(&self, ip: IpAddr, now: Instant) {
        let ttl = self.ttl();
        if ttl.is_zero() {
            return;
        }
        let key = self.key(ip);
        let max = self.max.load(Ordering::Relaxed);
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        m.insert(key, now, max, |t| now.saturating_duration_since(*t) >= ttl);
    }

    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Every policy's [`PassCache`], for the life of the gateway.
#[derive(Default)]
pub struct TriageState {
    caches: Mutex<HashMap<String, Arc<PassCache>>>,
}

impl TriageState {
    pub fn new() -> Arc<Self> {
        Arc::new(TriageState::default())
    }

    /// The cache of `policy`, made on first use, configured anew on each call.
    pub fn cache(&self, policy: &str, ttl: Duration, max: usize) -> Arc<PassCache> {
        let mut m = self.caches.lock().unwrap_or_else(|e| e.into_inner());
        let c = m
            .entry(policy.to_string())
            .or_insert_with(|| Arc::new(PassCache::new(ttl, max)))
            .clone();
        c.configure(ttl, max);
        c
    }

    /// Drops the caches of policies that no longer have a triage block.
    pub fn retain(&self, live: &[&str]) {
        self.caches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| live.contains(&k.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn passes_expire_and_stay_bounded() {
        let c = PassCache::new(Duration::from_secs(60), 16);
        let t0 = Instant::now();
        assert!(!c.passed(ip("127.0.0.2"), t0));
        c.remember(ip("127.0.0.2"), t0);
        assert!(c.passed(ip("127.0.0.2"), t0 + Duration::from_secs(59)));
        assert!(!c.passed(ip("127.0.0.2"), t0 + Duration::from_secs(60)));
        assert!(!c.passed(ip("127.0.0.3"), t0));
        for i in 0..100u32 {
            c.remember(IpAddr::from(std::net::Ipv6Addr::from(u128::from(i))), t0);
        }
        assert!(c.len() <= 16, "{}", c.len());
    }

    #[test]
    fn state_keeps_caches_across_reloads() {
        let s = TriageState::new();
        let t0 = Instant::now();
        s.cache("inbound", Duration::from_secs(60), 10)
            .remember(ip("127.0.0.2"), t0);
        // a reload with a shorter `cache`: same entries, the new lifetime
        let again = s.cache("inbound", Duration::from_secs(5), 10);
        assert!(again.passed(ip("127.0.0.2"), t0 + Duration::from_secs(4)));
        assert!(!again.passed(ip("127.0.0.2"), t0 + Duration::from_secs(6)));
        assert!(!s
            .cache("other", Duration::from_secs(60), 10)
            .passed(ip("127.0.0.2"), t0));
        s.retain(&["other"]);
        assert!(!s
            .cache("inbound", Duration::from_secs(60), 10)
            .passed(ip("127.0.0.2"), t0));
        // cache: 0 keeps nothing
        let off = PassCache::new(Duration::ZERO, 10);
        off.remember(ip("127.0.0.2"), t0);
        assert!(off.is_empty());
    }
}
