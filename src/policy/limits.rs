//! Limiter state: bounded keyed GCRA buckets, session counters and
//! failed-login windows. Keys are 64-bit hashes of the composite key values
//! (a process-random SipHash key), so memory per tracked key is small and
//! does not depend on what a client sends.
//!
//! Bounds: each rate or failure limiter tracks at most `max_keys` keys, in
//! least-recently-seen order ([`Lru`]). A new key past that takes the place
//! of an idle old one (a bucket that is full again, failures that left the
//! window), else of the least recently seen: a flood of distinct keys then
//! costs old, quiet keys their history, but never charges or locks a new,
//! legitimate client for what the flood did. Session counters are never
//! evicted: they exist only while sessions hold them (bounded by connections).

use super::lru::Lru;
use governor::Quota;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// GCRA (the algorithm governor implements) per key: the state is the
/// theoretical arrival time of the next cell, in ns since `born`.
pub struct Bucket {
    /// One cell per this many ns.
    per_cell: u64,
    /// How far ahead of now the arrival time may run: `burst` cells.
    tolerance: u64,
    max_keys: usize,
    keys: Mutex<Lru<u64>>,
    born: Instant,
    /// Keys dropped while their bucket was not full yet (a flood is running).
    pub evicted_active: AtomicU64,
}

impl Bucket {
    pub fn new(quota: Quota, max_keys: usize) -> Self {
        let per_cell = (quota.replenish_interval().as_nanos() as u64).max(1);
        Bucket {
            per_cell,
            tolerance: per_cell.saturating_mul(u64::from(quota.burst_size().get())),
            max_keys,
            keys: Mutex::new(Lru::default()),
            born: Instant::now(),
            evicted_active: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        self.born.elapsed().as_nanos() as u64
    }

    /// One cell per this long (the shared store runs the same GCRA).
    pub fn per_cell(&self) -> Duration {
        Duration::from_nanos(self.per_cell)
    }

    /// How far ahead of now the arrival time may run (`burst` cells).
    pub fn burst_time(&self) -> Duration {
        Duration::from_nanos(self.tolerance)
    }

    /// Takes one cell; `Err(wait)` when the key is over its rate.
    pub fn take(&self, key: u64) -> Result<(), Duration> {
        let now = self.now();
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if keys.peek(key).is_none() {
            // a bucket whose arrival time has passed is full again: idle
            if let Some((_, false)) = keys.insert(key, now, self.max_keys, |t| *t <= now) {
                self.evicted_active.fetch_add(1, Ordering::Relaxed);
            }
        }
        let Some(tat) = keys.get_mut(key) else {
            return Ok(());
        };
        let next = (*tat).max(now).saturating_add(self.per_cell);
        if next - now > self.tolerance {
            return Err(Duration::from_nanos(next - now - self.tolerance));
        }
        *tat = next;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.keys.lock().map(|k| k.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets keys whose bucket is full again (periodic housekeeping).
    pub fn housekeeping(&self) {
        let now = self.now();
        if let Ok(mut k) = self.keys.lock() {
            k.retain(|t| *t > now);
        }
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
    map: Mutex<Lru<VecDeque<Instant>>>,
    /// Keys dropped while they still had failures in the window.
    pub evicted_active: AtomicU64,
}

impl Failures {
    pub fn new(max: u32, window: Duration, max_keys: usize) -> Self {
        Failures {
            max,
            window,
            max_keys,
            map: Mutex::new(Lru::default()),
            evicted_active: AtomicU64::new(0),
        }
    }

    /// (failures that lock, window): what the shared store is asked.
    pub fn limits(&self) -> (u32, Duration) {
        (self.max, self.window)
    }

    /// `Some(remaining lock time)` when the key may not try now. Asking counts
    /// as seeing the key: a locked source that keeps trying stays tracked.
    pub fn locked(&self, key: u64, now: Instant) -> Option<Duration> {
        let mut m = self.map.lock().ok()?;
        let q = m.get_mut(key)?;
        let mut recent = q.iter().filter(|t| now.duration_since(**t) < self.window);
        let oldest = *recent.next()?;
        if 1 + recent.count() as u32 >= self.max {
            Some(self.window.saturating_sub(now.duration_since(oldest)))
        } else {
            None
        }
    }

    pub fn record(&self, key: u64, now: Instant) {
        let Ok(mut m) = self.map.lock() else { return };
        if m.get_mut(key).is_none() {
            let window = self.window;
            let idle =
                |q: &VecDeque<Instant>| q.back().is_none_or(|t| now.duration_since(*t) >= window);
            if let Some((_, false)) = m.insert(key, VecDeque::new(), self.max_keys, idle) {
                self.evicted_active.fetch_add(1, Ordering::Relaxed);
            }
        }
        let Some(q) = m.get_mut(key) else { return };
        q.push_back(now);
        while q.len() > self.max as usize {
            q.pop_front();
        }
    }

    pub fn housekeeping(&self, now: Instant) {
        if let Ok(mut m) = self.map.lock() {
            let window = self.window;
            m.retain(|q| q.back().is_some_and(|t| now.duration_since(*t) < window));
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
/// lock does not apply from a known-good network (lockout safety). Past
/// `max_keys`, the least recently remembered pair goes.
pub struct KnownGood {
    /// How long entries are kept at most (a policy may trust them for less).
    ttl: Duration,
    max_keys: usize,
    map: Mutex<Lru<Instant>>,
}

impl KnownGood {
    pub fn new(ttl: Duration, max_keys: usize) -> Self {
        KnownGood {
            ttl,
            max_keys,
            map: Mutex::new(Lru::default()),
        }
    }

    /// How long entries are kept at most.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn remember(&self, key: u64, now: Instant) {
        let Ok(mut m) = self.map.lock() else { return };
        let ttl = self.ttl;
        m.insert(key, now, self.max_keys, |t| now.duration_since(*t) >= ttl);
    }

    pub fn contains(&self, key: u64, now: Instant, ttl: Duration) -> bool {
        self.map
            .lock()
            .ok()
            .and_then(|m| m.peek(key).copied())
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
    fn bucket_limits_per_key() {
        let q = Quota::per_minute(NonZeroU32::new(5).unwrap());
        let b = Bucket::new(q, 3);
        for _ in 0..5 {
            assert!(b.take(1).is_ok());
        }
        let wait = b.take(1).unwrap_err();
        assert!(
            wait > Duration::from_secs(11) && wait <= Duration::from_secs(12),
            "{wait:?}"
        );
        assert!(b.take(2).is_ok(), "other keys unaffected");
        b.take(3).unwrap();
        b.take(4).unwrap();
        assert_eq!(b.len(), 3);
        assert_eq!(b.evicted_active.load(Ordering::Relaxed), 1);
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
    fn bucket_flood_evicts_least_recent_instead_of_sharing() {
        let q = Quota::per_minute(NonZeroU32::new(1).unwrap());
        let b = Bucket::new(q, 16);
        for k in 0..100 {
            assert!(b.take(k).is_ok(), "flood key {k} gets its own bucket");
        }
        assert!(b.len() <= 16, "bounded: {}", b.len());
        assert!(
            b.take(1000).is_ok(),
            "a new key is not charged by the flood"
        );
        assert!(b.take(1000).is_err(), "and has its own bucket");
        assert!(b.take(99).is_err(), "recent keys keep their state");
    }

    #[test]
    fn auth_failures_flood_does_not_lock_out_new_users() {
        let f = Failures::new(3, Duration::from_secs(60), 16);
        let t0 = Instant::now();
        for k in 0..100 {
            for _ in 0..3 {
                f.record(k, t0);
            }
        }
        assert!(
            f.locked(1000, t0).is_none(),
            "a new user is not pre-charged"
        );
        assert!(f.len() <= 16, "bounded: {}", f.len());
        f.record(1000, t0);
        assert!(f.locked(1000, t0).is_none(), "one failure of three");
        assert!(
            f.locked(99, t0).is_some(),
            "a recent flood key stays locked"
        );
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
