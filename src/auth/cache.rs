//! mail-auth has no DNS cache of its own since 0.14: it asks the caller's
//! [`DnsCache`] before each query and stores the parsed answer after it.
//! This module supplies that cache, bounded in entries, and uses the same two
//! hooks to observe every lookup a check makes.
//!
//! **Bound and eviction.** Each record type has its own map with a fixed
//! share of `cache_entries` (TXT ½, MX/A/AAAA/PTR ⅛ each, at least 1). Entries
//! expire at the time mail-auth gives (record TTL, negative TTL capped at one
//! hour). When a map is full, one pass drops every expired entry and, if that
//! is not enough, the least recently used eighth (an amortised, approximate
//! LRU: one O(n) pass per n/8 inserts instead of a linked list). Memory is
//! bounded by entries × the largest parsed record, which an attacker with a
//! domain of their own can make a few KiB: keep `cache_size` in the tens of
//! thousands at most.
//!
//! **Observation.** Each check runs with a [`CallCaches`] that wraps the shared
//! maps and logs each miss (a DNS query follows) and each insert (the query
//! was answered, positively or with a cacheable negative). From that log come
//! the lookup latency figures in [`DnsStats`] and the name of the query a check
//! stopped at, which `verify.rs` needs to tell a DNS failure from a name that
//! hickory refused to put on the wire.

use mail_auth::{DnsCache, Mx, Negative, RecordSet, ResolverCache, TxtRecord};
use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

type Answer<T> = Result<RecordSet<T>, Negative>;

/// A size-bounded map with per-entry expiry and approximate LRU eviction.
pub struct LruCache<K, V> {
    capacity: usize,
    inner: Mutex<LruInner<K, V>>,
}

struct LruInner<K, V> {
    map: HashMap<K, Slot<V>>,
    tick: u64,
}

struct Slot<V> {
    value: V,
    expires: Instant,
    used: u64,
}

impl<K: Hash + Eq, V: Clone> LruCache<K, V> {
    pub fn new(capacity: usize) -> Self {
        LruCache {
            capacity,
            inner: Mutex::new(LruInner {
                map: HashMap::new(),
                tick: 0,
            }),
        }
    }

    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, LruInner<K, V>> {
        // A panic elsewhere while holding the lock leaves a consistent map
        // (every mutation is a single HashMap call), so keep using it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<K, V> LruInner<K, V> {
    /// Makes room for one entry: drops expired entries, then the least
    /// recently used eighth.
    fn evict(&mut self, capacity: usize, now: Instant) {
        self.map.retain(|_, s| s.expires > now);
        if self.map.len() < capacity {
            return;
        }
        let n = (capacity / 8).max(1).min(self.map.len());
        let mut ages: Vec<u64> = self.map.values().map(|s| s.used).collect();
        let (_, threshold, _) = ages.select_nth_unstable(n - 1);
        let threshold = *threshold;
        // `used` values are unique (a strictly increasing tick), so this drops exactly n.
        self.map.retain(|_, s| s.used > threshold);
    }
}

impl<K: Hash + Eq, V: Clone> ResolverCache<K, V> for LruCache<K, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.tick += 1;
        let tick = inner.tick;
        match inner.map.get_mut(name) {
            Some(slot) if slot.expires > now => {
                slot.used = tick;
                Some(slot.value.clone())
            }
            Some(_) => {
                inner.map.remove(name);
                None
            }
            None => None,
        }
    }

    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.lock().map.remove(name).map(|s| s.value)
    }

    fn insert(&self, key: K, value: V, valid_until: Instant) {
        if self.capacity == 0 {
            return;
        }
        let now = Instant::now();
        if valid_until <= now {
            return;
        }
        let mut inner = self.lock();
        if inner.map.len() >= self.capacity && !inner.map.contains_key(&key) {
            inner.evict(self.capacity, now);
        }
        inner.tick += 1;
        let used = inner.tick;
        inner.map.insert(
            key,
            Slot {
                value,
                expires: valid_until,
                used,
            },
        );
    }
}

/// The process-wide caches, one per record type.
pub struct SharedCaches {
    txt: LruCache<Box<str>, TxtRecord>,
    mx: LruCache<Box<str>, Answer<Mx>>,
    ipv4: LruCache<Box<str>, Answer<Ipv4Addr>>,
    ipv6: LruCache<Box<str>, Answer<Ipv6Addr>>,
    ptr: LruCache<IpAddr, Answer<Box<str>>>,
}

impl SharedCaches {
    /// `total` entries split as documented in the module comment; 0 disables caching.
    pub fn new(total: usize) -> Self {
        let share = |div: usize| {
            if total == 0 {
                0
            } else {
                (total / div).max(1)
            }
        };
        SharedCaches {
            txt: LruCache::new(share(2)),
            mx: LruCache::new(share(8)),
            ipv4: LruCache::new(share(8)),
            ipv6: LruCache::new(share(8)),
            ptr: LruCache::new(share(8)),
        }
    }

    /// Cached entries over all record types.
    pub fn len(&self) -> usize {
        self.txt.len() + self.mx.len() + self.ipv4.len() + self.ipv6.len() + self.ptr.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Upper bounds (µs) of the lookup latency buckets in [`DnsStats`]; the last
/// bucket counts everything slower.
pub const LATENCY_BUCKETS_US: [u64; 7] =
    [1_000, 5_000, 25_000, 100_000, 500_000, 2_000_000, 5_000_000];

/// Counters of DNS and check activity, cheap enough to bump on every lookup.
/// The metrics module turns a [`DnsStats::snapshot`] into Prometheus series.
#[derive(Default)]
pub struct DnsStats {
    /// Cache misses: each one is followed by a DNS query.
    pub queries: AtomicU64,
    /// Answers served from the cache.
    pub cache_hits: AtomicU64,
    /// Queries that returned an answer mail-auth stored (records, or a
    /// negative answer with an SOA). Only these are timed.
    pub answered: AtomicU64,
    /// Queries that did not end in a stored answer: timeouts, SERVFAIL,
    /// refused names, negative answers without SOA, `exists:` probes.
    pub unanswered: AtomicU64,
    pub latency_sum_us: AtomicU64,
    pub latency_max_us: AtomicU64,
    pub latency_buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    /// Checks by kind: spf, dkim, arc, dmarc.
    pub checks: [CheckStats; 4],
}

/// Counters of one kind of check.
#[derive(Default)]
pub struct CheckStats {
    pub runs: AtomicU64,
    pub temperrors: AtomicU64,
    /// Runs cut off by [`DnsSettings::check_deadline`](super::DnsSettings::check_deadline).
    pub deadline_hits: AtomicU64,
    pub time_sum_us: AtomicU64,
}

/// Index into [`DnsStats::checks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckKind {
    Spf = 0,
    Dkim = 1,
    Arc = 2,
    Dmarc = 3,
}

impl CheckKind {
    pub const ALL: [CheckKind; 4] = [
        CheckKind::Spf,
        CheckKind::Dkim,
        CheckKind::Arc,
        CheckKind::Dmarc,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CheckKind::Spf => "spf",
            CheckKind::Dkim => "dkim",
            CheckKind::Arc => "arc",
            CheckKind::Dmarc => "dmarc",
        }
    }
}

/// A plain copy of [`DnsStats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsStatsSnapshot {
    pub queries: u64,
    pub cache_hits: u64,
    pub answered: u64,
    pub unanswered: u64,
    pub latency_sum_us: u64,
    pub latency_max_us: u64,
    /// Counts per bucket of [`LATENCY_BUCKETS_US`] (not cumulative), plus one overflow bucket.
    pub latency_buckets: Vec<u64>,
    /// `(kind, runs, temperrors, deadline_hits, time_sum_us)`.
    pub checks: Vec<(&'static str, u64, u64, u64, u64)>,
    pub cached_entries: usize,
}

impl DnsStats {
    fn record_latency(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.answered.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
        self.latency_max_us.fetch_max(us, Ordering::Relaxed);
        let i = LATENCY_BUCKETS_US
            .iter()
            .position(|b| us < *b)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_check(
        &self,
        kind: CheckKind,
        took: Duration,
        temperror: bool,
        deadline: bool,
    ) {
        let c = &self.checks[kind as usize];
        c.runs.fetch_add(1, Ordering::Relaxed);
        if temperror {
            c.temperrors.fetch_add(1, Ordering::Relaxed);
        }
        if deadline {
            c.deadline_hits.fetch_add(1, Ordering::Relaxed);
        }
        c.time_sum_us.fetch_add(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    pub(crate) fn snapshot(&self, cached_entries: usize) -> DnsStatsSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DnsStatsSnapshot {
            queries: r(&self.queries),
            cache_hits: r(&self.cache_hits),
            answered: r(&self.answered),
            unanswered: r(&self.unanswered),
            latency_sum_us: r(&self.latency_sum_us),
            latency_max_us: r(&self.latency_max_us),
            latency_buckets: self.latency_buckets.iter().map(r).collect(),
            checks: CheckKind::ALL
                .iter()
                .map(|k| {
                    let c = &self.checks[*k as usize];
                    (
                        k.as_str(),
                        r(&c.runs),
                        r(&c.temperrors),
                        r(&c.deadline_hits),
                        r(&c.time_sum_us),
                    )
                })
                .collect(),
            cached_entries,
        }
    }
}

/// The bytes a key feeds to its `Hash` impl. mail-auth hands the caches only
/// `&Q where K: Borrow<Q>, Q: Hash`, so this is the one way to see the name
/// being looked up. For `str` the standard library writes the UTF-8 bytes
/// followed by a 0xFF terminator; `key_name` relies on that, and the unit
/// test `captured_name_of_str_key` fails loudly if it ever changes.
#[derive(Default)]
struct Capture(Vec<u8>);

impl Hasher for Capture {
    fn finish(&self) -> u64 {
        0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Bounded: a DNS name is at most 255 bytes; anything longer is not a name.
        if self.0.len() < 1024 {
            self.0.extend_from_slice(bytes);
        }
    }
}

fn capture<Q: Hash + ?Sized>(key: &Q) -> Vec<u8> {
    let mut c = Capture::default();
    key.hash(&mut c);
    c.0
}

fn key_name(bytes: &[u8]) -> Option<String> {
    let name = bytes.strip_suffix(&[0xff])?;
    std::str::from_utf8(name).ok().map(str::to_owned)
}

/// One DNS lookup made during a check.
#[derive(Debug, Clone)]
pub struct Lookup {
    key: Vec<u8>,
    /// The queried name; `None` for PTR lookups (keyed by address).
    pub name: Option<String>,
    started: Instant,
    pub answered: bool,
}

/// The lookups of one check, in order.
pub struct CallLog<'a> {
    stats: &'a DnsStats,
    lookups: Mutex<Vec<Lookup>>,
}

impl<'a> CallLog<'a> {
    pub fn new(stats: &'a DnsStats) -> Self {
        CallLog {
            stats,
            lookups: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Lookup>> {
        self.lookups.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn miss(&self, key: Vec<u8>, named: bool) {
        self.stats.queries.fetch_add(1, Ordering::Relaxed);
        let name = if named { key_name(&key) } else { None };
        let mut l = self.lock();
        // A hostile record cannot make this grow without bound: mail-auth caps
        // SPF at 10 DNS mechanisms (×10 MX hosts) and DMARC walks at 8 names.
        if l.len() < 512 {
            l.push(Lookup {
                key,
                name,
                started: Instant::now(),
                answered: false,
            });
        }
    }

    fn answer(&self, key: Vec<u8>) {
        let mut l = self.lock();
        if let Some(entry) = l.iter_mut().rev().find(|e| !e.answered && e.key == key) {
            entry.answered = true;
            let d = entry.started.elapsed();
            self.stats.record_latency(d);
            crate::observe::metrics()
                .dns_lookup
                .observe(d.as_secs_f64());
        }
    }

    /// The last lookup of the check if it got no stored answer: the query a
    /// check that ended in `temperror` stopped at.
    pub fn last_unanswered(&self) -> Option<Lookup> {
        self.lock().last().filter(|l| !l.answered).cloned()
    }

    /// Counts unanswered lookups into the stats. Call once, when the check is over.
    pub fn finish(&self) {
        let n = self.lock().iter().filter(|l| !l.answered).count();
        self.stats.unanswered.fetch_add(n as u64, Ordering::Relaxed);
        crate::observe::metrics().dns_failures.inc_by(n as u64);
    }
}

/// A shared cache (or none) seen through the log of one call.
pub struct Tracked<'a, K, V> {
    cache: Option<&'a LruCache<K, V>>,
    log: &'a CallLog<'a>,
    /// Keys are names (true) or IP addresses (false).
    named: bool,
}

impl<K: Hash + Eq, V: Clone> ResolverCache<K, V> for Tracked<'_, K, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some(v) = self.cache.and_then(|c| c.get(name)) {
            self.log.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Some(v);
        }
        self.log.miss(capture(name), self.named);
        None
    }

    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.cache.and_then(|c| c.remove(name))
    }

    fn insert(&self, key: K, value: V, valid_until: Instant) {
        self.log.answer(capture(key.borrow()));
        if let Some(c) = self.cache {
            c.insert(key, value, valid_until);
        }
    }
}

/// The [`DnsCache`] handed to mail-auth for one check.
pub struct CallCaches<'a> {
    txt: Tracked<'a, Box<str>, TxtRecord>,
    mx: Tracked<'a, Box<str>, Answer<Mx>>,
    ipv4: Tracked<'a, Box<str>, Answer<Ipv4Addr>>,
    ipv6: Tracked<'a, Box<str>, Answer<Ipv6Addr>>,
    ptr: Tracked<'a, IpAddr, Answer<Box<str>>>,
}

impl<'a> CallCaches<'a> {
    /// `shared: None` runs without caching but still logs.
    pub fn new(shared: Option<&'a SharedCaches>, log: &'a CallLog<'a>) -> Self {
        CallCaches {
            txt: Tracked {
                cache: shared.map(|s| &s.txt),
                log,
                named: true,
            },
            mx: Tracked {
                cache: shared.map(|s| &s.mx),
                log,
                named: true,
            },
            ipv4: Tracked {
                cache: shared.map(|s| &s.ipv4),
                log,
                named: true,
            },
            ipv6: Tracked {
                cache: shared.map(|s| &s.ipv6),
                log,
                named: true,
            },
            ptr: Tracked {
                cache: shared.map(|s| &s.ptr),
                log,
                named: false,
            },
        }
    }
}

impl<'a> DnsCache for CallCaches<'a> {
    type Txt = Tracked<'a, Box<str>, TxtRecord>;
    type Mx = Tracked<'a, Box<str>, Answer<Mx>>;
    type Ipv4 = Tracked<'a, Box<str>, Answer<Ipv4Addr>>;
    type Ipv6 = Tracked<'a, Box<str>, Answer<Ipv6Addr>>;
    type Ptr = Tracked<'a, IpAddr, Answer<Box<str>>>;

    fn txt(&self) -> Option<&Self::Txt> {
        Some(&self.txt)
    }
    fn mx(&self) -> Option<&Self::Mx> {
        Some(&self.mx)
    }
    fn ipv4(&self) -> Option<&Self::Ipv4> {
        Some(&self.ipv4)
    }
    fn ipv6(&self) -> Option<&Self::Ipv6> {
        Some(&self.ipv6)
    }
    fn ptr(&self) -> Option<&Self::Ptr> {
        Some(&self.ptr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn later(secs: u64) -> Instant {
        Instant::now() + Duration::from_secs(secs)
    }

    #[test]
    fn captured_name_of_str_key() {
        // Guards the assumption documented on `Capture`.
        let key: Box<str> = "Example.COM.".into();
        assert_eq!(
            key_name(&capture::<str>(&key)).as_deref(),
            Some("Example.COM.")
        );
        assert_eq!(
            capture::<str>("a.b."),
            capture::<Box<str>>(&Box::from("a.b."))
        );
        let ip: IpAddr = "192.0.2.255".parse().unwrap();
        assert!(capture(&ip) != capture("192.0.2.255"));
    }

    #[test]
    fn lru_bound_expiry_and_recency() {
        let c: LruCache<Box<str>, u32> = LruCache::new(8);
        for i in 0..8u32 {
            c.insert(format!("n{i}.").into(), i, later(60));
        }
        // touch n0 so it is the most recently used
        assert_eq!(c.get("n0."), Some(0));
        c.insert("new.".into(), 99, later(60));
        assert_eq!(c.len(), 8, "one eighth (1) evicted, one added");
        assert_eq!(c.get("n0."), Some(0), "recently used survives");
        assert_eq!(c.get("n1."), None, "least recently used went first");
        assert_eq!(c.get("new."), Some(99));

        // expired entries are not returned and go first
        c.insert("old.".into(), 7, Instant::now() + Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(c.get("old."), None);
        for i in 0..100u32 {
            c.insert(format!("m{i}.").into(), i, later(60));
            assert!(c.len() <= 8);
        }
        // capacity 0 stores nothing
        let z: LruCache<Box<str>, u32> = LruCache::new(0);
        z.insert("a.".into(), 1, later(60));
        assert!(z.is_empty());
    }

    #[test]
    fn call_log_pairs_misses_with_answers() {
        let stats = DnsStats::default();
        let shared = SharedCaches::new(100);
        let log = CallLog::new(&stats);
        let caches = CallCaches::new(Some(&shared), &log);
        let txt = caches.txt().unwrap();
        assert!(txt.get::<str>("a.example.").is_none());
        txt.insert(
            "a.example.".into(),
            TxtRecord::Error(mail_auth::Error::Parse),
            later(60),
        );
        assert!(
            txt.get::<str>("a.example.").is_some(),
            "served from the cache"
        );
        assert!(txt.get::<str>("bad name.").is_none());
        let last = log.last_unanswered().unwrap();
        assert_eq!(last.name.as_deref(), Some("bad name."));
        log.finish();
        let s = stats.snapshot(shared.len());
        assert_eq!(
            (s.queries, s.cache_hits, s.answered, s.unanswered),
            (2, 1, 1, 1)
        );
        assert_eq!(s.latency_buckets.iter().sum::<u64>(), 1);
        assert_eq!(s.cached_entries, 1);
    }
}
