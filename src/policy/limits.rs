//! Limiter state: bounded keyed GCRA buckets (governor), session counters and
//! failed-login windows. Keys are 64-bit hashes of the composite key values
//! (a process-random SipHash key), so memory per tracked key is small and
//! does not depend on what a client sends.
//!
//! Bounds: each limiter tracks at most `max_keys` keys. Past that, after a
//! `retain_recent` pass, new keys share one overflow bucket per rule: a flood
//! of distinct sources is then limited as one, and while the flood lasts new,
//! legitimate sources may be refused by that rule too. Known keys keep their
//! own buckets. This trades precision for a hard memory bound.

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The key all new keys share once a limiter is full.
const OVERFLOW_KEY: u64 = u64::MAX;

pub struct Bucket {
    limiter: DefaultKeyedRateLimiter<u64>,
    clock: DefaultClock,
    max_keys: usize,
    pub overflowed: AtomicU64,
    /// When the last full `retain_recent` pass ran (ms since `born`): a full
    /// limiter must not scan all its keys for every new key (that scan is
    /// what a distinct-key flood would otherwise buy).
    last_retain_ms: AtomicU64,
    born: Instant,
}

impl Bucket {
    pub fn new(quota: Quota, max_keys: usize) -> Self {
        Bucket {
            limiter: RateLimiter::keyed(quota),
            clock: DefaultClock::default(),
            max_keys,
            overflowed: AtomicU64::new(0),
            last_retain_ms: AtomicU64::new(0),
            born: Instant::now(),
        }
    }

    /// Takes one cell; `Err(wait)` when the key is over its rate.
    pub fn take(&self, key: u64) -> Result<(), Duration> {
        let key = if self.limiter.len() >= self.max_keys {
            let now_ms = self.born.elapsed().as_millis() as u64;
            let last = self.last_retain_ms.load(Ordering::Relaxed);
            if now_ms.saturating_sub(last) >= 1000
                && self
                    .last_retain_ms
                    .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                self.limiter.retain_recent();
            }
            if self.limiter.len() >= self.max_keys {
                self.overflowed.fetch_add(1, Ordering::Relaxed);
                OVERFLOW_KEY
            } else {
                key
            }
        } else {
            key
        };
        self.limiter
            .check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }

    /// Forgets keys whose bucket is full again (periodic housekeeping).
    pub fn housekeeping(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

/// Simultaneous sessions per key. Entries disappear when their count drops to 0.
#[derive(Default)]
pub struct Counter {
    map: Mutex<HashMap<u64, u32>>,
}

impl Counter {
    /// Increments unless the key is at `max`.
    pub fn acquire(self: &Arc<Self>, key: u64, max: u32) -> Option<CounterGuard> {
        let mut m = self.map.lock().ok()?;
        let n = m.entry(key).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(CounterGuard {
            counter: self.clone(),
            key,
        })
    }

    pub fn current(&self, key: u64) -> u32 {
        self.map
            .lock()
            .ok()
            .and_then(|m| m.get(&key).copied())
            .unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Releases one session slot when dropped.
pub struct CounterGuard {
    counter: Arc<Counter>,
    key: u64,
}

impl Drop for CounterGuard {
    fn drop(&mut self) {
        if let Ok(mut m) = self.counter.map.lock() {
            if let Some(n) = m.get_mut(&self.key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&self.key);
                }
            }
        }
    }
}

/// Failed logins in a sliding window: after `max` failures within `window`,
/// the key is locked until the oldest of them leaves the window.
pub struct Failures {
    max: u32,
    window: Duration,
    max_keys: usize,
    map: Mutex<HashMap<u64, VecDeque<Instant>>>,
}

impl Failures {
    pub fn new(max: u32, window: Duration, max_keys: usize) -> Self {
        Failures {
            max,
            window,
            max_keys,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(remaining lock time)` when the key may not try now.
    pub fn locked(&self, key: u64, now: Instant) -> Option<Duration> {
        let m = self.map.lock().ok()?;
        let q = m
            .get(&key)
            .or_else(|| m.get(&OVERFLOW_KEY).filter(|_| m.len() >= self.max_keys))?;
        let recent = q
            .iter()
            .filter(|t| now.duration_since(**t) < self.window)
            .count();
        if recent as u32 >= self.max {
            let oldest = q.iter().find(|t| now.duration_since(**t) < self.window)?;
            Some(self.window.saturating_sub(now.duration_since(*oldest)))
        } else {
            None
        }
    }

    pub fn record(&self, key: u64, now: Instant) {
        let Ok(mut m) = self.map.lock() else { return };
        if !m.contains_key(&key) && m.len() >= self.max_keys {
            let window = self.window;
            m.retain(|_, q| q.back().is_some_and(|t| now.duration_since(*t) < window));
        }
        let key = if !m.contains_key(&key) && m.len() >= self.max_keys {
            OVERFLOW_KEY
        } else {
            key
        };
        let q = m.entry(key).or_default();
        q.push_back(now);
        while q.len() > self.max as usize {
            q.pop_front();
        }
    }

    pub fn housekeeping(&self, now: Instant) {
        if let Ok(mut m) = self.map.lock() {
            let window = self.window;
            m.retain(|_, q| q.back().is_some_and(|t| now.duration_since(*t) < window));
            m.shrink_to_fit();
        }
    }

    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// (user, network) pairs that logged in successfully, with when. A per-user
/// lock does not apply from a known-good network (lockout safety).
pub struct KnownGood {
    /// How long entries are kept at most (a policy may trust them for less).
    ttl: Duration,
    max_keys: usize,
    map: Mutex<HashMap<u64, Instant>>,
}

impl KnownGood {
    pub fn new(ttl: Duration, max_keys: usize) -> Self {
        KnownGood {
            ttl,
            max_keys,
            map: Mutex::new(HashMap::new()),
        }
    }

    pub fn remember(&self, key: u64, now: Instant) {
        let Ok(mut m) = self.map.lock() else { return };
        if m.len() >= self.max_keys && !m.contains_key(&key) {
            let ttl = self.ttl;
            m.retain(|_, t| now.duration_since(*t) < ttl);
            if m.len() >= self.max_keys {
                // drop the oldest eighth: bounded, and recent successes win
                let mut ages: Vec<(u64, Instant)> = m.iter().map(|(k, t)| (*k, *t)).collect();
                ages.sort_by_key(|(_, t)| *t);
                for (k, _) in ages.iter().take(self.max_keys / 8 + 1) {
                    m.remove(k);
                }
            }
        }
        m.insert(key, now);
    }

    pub fn contains(&self, key: u64, now: Instant, ttl: Duration) -> bool {
        self.map
            .lock()
            .ok()
            .and_then(|m| m.get(&key).copied())
            .is_some_and(|t| now.duration_since(t) < ttl.min(self.ttl))
    }

    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    #[test]
    fn bucket_limits_and_overflow() {
        let q = Quota::per_minute(NonZeroU32::new(5).unwrap());
        let b = Bucket::new(q, 3);
        for _ in 0..5 {
            assert!(b.take(1).is_ok());
        }
        assert!(b.take(1).is_err());
        assert!(b.take(2).is_ok(), "other keys unaffected");
        b.take(3).unwrap();
        // full: new keys share the overflow bucket
        for _ in 0..5 {
            assert!(b.take(100).is_ok());
        }
        assert!(b.take(101).is_err(), "overflow bucket is shared");
        assert!(b.len() <= 4);
        assert!(b.overflowed.load(Ordering::Relaxed) >= 6);
    }

    #[test]
    fn counter_guards() {
        let c = Arc::new(Counter::default());
        let a = c.acquire(7, 2).unwrap();
        let b = c.acquire(7, 2).unwrap();
        assert!(c.acquire(7, 2).is_none());
        drop(a);
        assert!(c.acquire(7, 2).is_some());
        drop(b);
        assert_eq!(c.current(7), 0);
        assert!(c.is_empty());
    }

    #[test]
    fn failure_window() {
        let f = Failures::new(3, Duration::from_secs(60), 100);
        let t0 = Instant::now();
        for i in 0..3 {
            assert!(f.locked(1, t0).is_none());
            f.record(1, t0 + Duration::from_secs(i));
        }
        let lock = f.locked(1, t0 + Duration::from_secs(5)).unwrap();
        assert_eq!(lock, Duration::from_secs(55));
        assert!(f.locked(2, t0).is_none());
        assert!(
            f.locked(1, t0 + Duration::from_secs(61)).is_none(),
            "window passed"
        );
        f.housekeeping(t0 + Duration::from_secs(120));
        assert!(f.is_empty());
    }

    #[test]
    fn known_good_is_bounded() {
        let k = KnownGood::new(Duration::from_secs(60), 16);
        let t0 = Instant::now();
        for i in 0..100 {
            k.remember(i, t0 + Duration::from_millis(i));
        }
        assert!(k.len() <= 16);
        let ttl = Duration::from_secs(60);
        assert!(k.contains(99, t0 + Duration::from_secs(1), ttl));
        assert!(!k.contains(99, t0 + Duration::from_secs(120), ttl));
        assert!(!k.contains(99, t0 + Duration::from_secs(10), Duration::from_secs(5)));
    }
}
