//! mail-auth has no DNS cache of its own since 0.14: it asks the caller's
//! [`DnsCache`] before each query and stores the parsed answer after it.
//! This module supplies that cache, bounded in entries, and uses the same two
//! hooks to observe every lookup a check makes.
//!
//! **Bound and eviction.** Each record type has its own map with a fixed
//! share of `cache_entries` and of `cache_bytes` (TXT ½, MX/A/AAAA/PTR ⅛
//! each, at least 1 entry). Every entry is weighed ([`Weigh`]: key plus an
//! estimate of the parsed value's heap size), so a few huge records cannot
//! hold more memory than many small ones. Entries expire at the time
//! mail-auth gives (record TTL, negative TTL capped at one hour). When a map
//! is full (in entries or bytes), one pass drops every expired entry and, if
//! that is not enough, the least recently used eighth, repeated until the new
//! entry fits (an amortised, approximate LRU: one O(n) pass per n/8 inserts
//! instead of a linked list). An entry heavier than the whole share is never
//! stored.
//!
//! **Oversized records** are refused before they reach the cache: an SPF
//! record of more than [`MAX_SPF_TERMS`] terms or about [`MAX_SPF_TEXT`]
//! bytes of text, a DMARC record with more than [`MAX_DMARC_URIS`] report
//! addresses. The check that fetched one ends in `permerror` (see
//! [`Trip::Oversized`]); other TXT answers heavier than [`MAX_TXT_WEIGHT`]
//! (report and ATPS records) are used once and not cached.
//!
//! **The gate.** Each check runs with a [`CallLog`] that can deny a query
//! before it is made: mail-auth asks the cache first, and a cache that answers
//! "no such record" (or a resolver error for TXT) stops the query. A check is
//! denied further queries once it has spent the session's or the message's
//! query budget ([`DnsBudget`]), or, for SPF, once it has made more than
//! [`VOID_LOOKUP_LIMIT`] void lookups (RFC 7208 §4.6.4: answers with no
//! records, NXDOMAIN included), or fetched an oversized record. The reason
//! ([`Trip`]) is kept; `verify.rs` turns it into the check's result.
//!
//! A void lookup is seen as a negative answer put into or found in the cache;
//! a negative answer without SOA is not cached by mail-auth, so a lookup that
//! got no stored answer and after which the check went on (mail-auth goes on
//! only after "no records") counts as void too. The `exists` probe, which
//! mail-auth never caches, is counted the same way: void when the check
//! continues after it (a match inside an `include:` that does not pass is
//! miscounted as void; that costs at most one of the allowed voids).
//!
//! **Observation.** Each check runs with a [`CallCaches`] that wraps the shared
//! maps and logs each miss (a DNS query follows) and each insert (the query
//! was answered, positively or with a cacheable negative). From that log come
//! the lookup latency figures in [`DnsStats`] and the name of the query a check
//! stopped at, which `verify.rs` needs to tell a DNS failure from a name that
//! hickory refused to put on the wire.

use mail_auth::spf::{Macro, SpfRecord};
use mail_auth::{DnsCache, DnsError, Mx, Negative, RecordSet, ResolverCache, TxtRecord};
use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

type Answer<T> = Result<RecordSet<T>, Negative>;

/// RFC 7208 §4.6.4: more void lookups than this in one SPF evaluation is `permerror`.
pub const VOID_LOOKUP_LIMIT: u32 = 2;
/// SPF records with more terms (mechanisms and modifiers) are refused.
pub const MAX_SPF_TERMS: usize = 100;
/// SPF records with more text (estimated from the parsed terms) are refused.
pub const MAX_SPF_TEXT: usize = 4096;
/// DMARC records with more `rua=`/`ruf=` addresses are refused.
pub const MAX_DMARC_URIS: usize = 32;
/// Other TXT answers heavier than this (estimated bytes) are used, not cached.
pub const MAX_TXT_WEIGHT: usize = 8192;

/// Approximate memory an entry holds: its own size plus what it points to.
pub trait Weigh {
    fn weight(&self) -> usize;
}

impl Weigh for Box<str> {
    fn weight(&self) -> usize {
        16 + self.len()
    }
}

impl Weigh for IpAddr {
    fn weight(&self) -> usize {
        std::mem::size_of::<IpAddr>()
    }
}

fn macro_weight(m: &Macro) -> usize {
    std::mem::size_of::<Macro>()
        + match m {
            Macro::Literal(b) => b.len(),
            Macro::List(ms) => ms.iter().map(macro_weight).sum(),
            Macro::Variable { .. } | Macro::None => 0,
        }
}

/// Bytes of record text a macro string stands for, roughly.
fn macro_text(m: &Macro) -> usize {
    match m {
        Macro::Literal(b) => b.len(),
        Macro::List(ms) => ms.iter().map(macro_text).sum(),
        Macro::Variable { .. } => 4,
        Macro::None => 0,
    }
}

fn spf_macros(r: &SpfRecord) -> impl Iterator<Item = &Macro> {
    use mail_auth::spf::Mechanism as M;
    r.directives
        .iter()
        .filter_map(|d| match &d.mechanism {
            M::Include { macro_string }
            | M::A { macro_string, .. }
            | M::Mx { macro_string, .. }
            | M::Ptr { macro_string }
            | M::Exists { macro_string } => Some(macro_string),
            M::All | M::Ip4 { .. } | M::Ip6 { .. } => None,
        })
        .chain(r.exp.iter())
        .chain(r.redirect.iter())
}

fn spf_weight(r: &SpfRecord) -> usize {
    96 + r.directives.len() * std::mem::size_of::<mail_auth::spf::Directive>()
        + spf_macros(r).map(macro_weight).sum::<usize>()
        + r.ra.as_ref().map_or(0, |ra| ra.len())
}

/// Why an SPF record is refused, if it is.
fn spf_too_large(r: &SpfRecord) -> Option<String> {
    let terms =
        r.directives.len() + usize::from(r.exp.is_some()) + usize::from(r.redirect.is_some());
    // each term costs its name, a separator and any address or mask
    let text = 7 + 10 * terms + spf_macros(r).map(macro_text).sum::<usize>();
    if terms > MAX_SPF_TERMS {
        Some(format!(
            "SPF record has {terms} terms (limit {MAX_SPF_TERMS})"
        ))
    } else if text > MAX_SPF_TEXT {
        Some(format!(
            "SPF record is about {text} bytes long (limit {MAX_SPF_TEXT})"
        ))
    } else {
        None
    }
}

impl Weigh for TxtRecord {
    fn weight(&self) -> usize {
        48 + match self {
            TxtRecord::Spf(r) => spf_weight(r),
            TxtRecord::SpfExplanation(m) => macro_weight(m),
            // parsed public keys: the crypto libraries bound their size (RSA ≤ 16 kbit)
            TxtRecord::DomainKey(_) => 2048,
            TxtRecord::Dmarc(r) => {
                128 + r
                    .rua
                    .iter()
                    .chain(r.ruf.iter())
                    .map(|u| 40 + u.uri.len())
                    .sum::<usize>()
            }
            TxtRecord::DkimReport(r) => format!("{r:?}").len(),
            TxtRecord::Atps(r) => format!("{r:?}").len(),
            TxtRecord::MtaSts(_) | TxtRecord::TlsRpt(_) => 1024,
            TxtRecord::Error(_) => 32,
        }
    }
}

impl<T: Weigh> Weigh for Answer<T> {
    fn weight(&self) -> usize {
        48 + match self {
            Ok(set) => set.records.iter().map(Weigh::weight).sum(),
            Err(_) => 0,
        }
    }
}

impl Weigh for Ipv4Addr {
    fn weight(&self) -> usize {
        4
    }
}

impl Weigh for Ipv6Addr {
    fn weight(&self) -> usize {
        16
    }
}

impl Weigh for Mx {
    fn weight(&self) -> usize {
        32 + self.exchanges.iter().map(Weigh::weight).sum::<usize>()
    }
}

/// What the gate needs to know of a cached value.
pub trait GateValue: Clone + Weigh {
    /// A negative answer (NXDOMAIN / NODATA): a void lookup for SPF.
    fn is_void(&self) -> bool;
    /// What a denied query answers instead of going to DNS.
    fn denied() -> Self;
    /// `Some(why)` for a record the check must not use (it ends in
    /// `permerror`); `None` with `cacheable() == false` for one that is used
    /// once but not stored.
    fn refused(&self) -> Option<String> {
        None
    }
    fn cacheable(&self) -> bool {
        true
    }
}

impl GateValue for TxtRecord {
    fn is_void(&self) -> bool {
        matches!(
            self,
            TxtRecord::Error(mail_auth::Error::Dns(DnsError::RecordNotFound(_)))
        )
    }
    fn denied() -> Self {
        TxtRecord::Error(mail_auth::Error::Dns(DnsError::Resolver(
            "query not made (DNS limit)".into(),
        )))
    }
    fn refused(&self) -> Option<String> {
        match self {
            TxtRecord::Spf(r) => spf_too_large(r),
            TxtRecord::Dmarc(r) if r.rua.len() + r.ruf.len() > MAX_DMARC_URIS => Some(format!(
                "DMARC record has {} report addresses (limit {MAX_DMARC_URIS})",
                r.rua.len() + r.ruf.len()
            )),
            _ => None,
        }
    }
    fn cacheable(&self) -> bool {
        self.weight() <= MAX_TXT_WEIGHT
    }
}

impl<T: Clone + Weigh> GateValue for Answer<T> {
    fn is_void(&self) -> bool {
        match self {
            Ok(set) => set.records.is_empty(),
            Err(_) => true,
        }
    }
    fn denied() -> Self {
        Err(Negative {
            code: mail_auth::hickory_resolver::proto::op::ResponseCode::ServFail,
        })
    }
}

/// A map bounded in entries and in bytes, with per-entry expiry and
/// approximate LRU eviction.
pub struct LruCache<K, V> {
    capacity: usize,
    max_bytes: usize,
    inner: Mutex<LruInner<K, V>>,
}

struct LruInner<K, V> {
    map: HashMap<K, Slot<V>>,
    tick: u64,
    bytes: usize,
}

struct Slot<V> {
    value: V,
    expires: Instant,
    used: u64,
    weight: usize,
}

impl<K: Hash + Eq + Weigh, V: Clone + Weigh> LruCache<K, V> {
    pub fn new(capacity: usize, max_bytes: usize) -> Self {
        LruCache {
            capacity,
            max_bytes,
            inner: Mutex::new(LruInner {
                map: HashMap::new(),
                tick: 0,
                bytes: 0,
            }),
        }
    }

    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Estimated bytes held.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
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
    fn retain(&mut self, mut keep: impl FnMut(&Slot<V>) -> bool) {
        let mut freed = 0;
        self.map.retain(|_, s| {
            let k = keep(s);
            if !k {
                freed += s.weight;
            }
            k
        });
        self.bytes -= freed;
    }

    /// Makes room for one entry of `weight` bytes: drops expired entries,
    /// then the least recently used eighth, until it fits.
    fn evict(&mut self, capacity: usize, max_bytes: usize, weight: usize, now: Instant) {
        self.retain(|s| s.expires > now);
        while !self.map.is_empty()
            && (self.map.len() >= capacity || self.bytes + weight > max_bytes)
        {
            let n = (capacity / 8).max(1).min(self.map.len());
            let mut ages: Vec<u64> = self.map.values().map(|s| s.used).collect();
            let (_, threshold, _) = ages.select_nth_unstable(n - 1);
            let threshold = *threshold;
            // `used` values are unique (a strictly increasing tick), so this drops exactly n.
            self.retain(|s| s.used > threshold);
        }
    }
}

impl<K: Hash + Eq + Weigh, V: Clone + Weigh> ResolverCache<K, V> for LruCache<K, V> {
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
                if let Some(old) = inner.map.remove(name) {
                    inner.bytes -= old.weight;
                }
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
        let mut inner = self.lock();
        let old = inner.map.remove(name)?;
        inner.bytes -= old.weight;
        Some(old.value)
    }

    fn insert(&self, key: K, value: V, valid_until: Instant) {
        if self.capacity == 0 {
            return;
        }
        let now = Instant::now();
        if valid_until <= now {
            return;
        }
        let weight = key.weight() + value.weight();
        if weight > self.max_bytes {
            return;
        }
        let mut inner = self.lock();
        if let Some(old) = inner.map.remove(&key) {
            inner.bytes -= old.weight;
        }
        if inner.map.len() >= self.capacity || inner.bytes + weight > self.max_bytes {
            inner.evict(self.capacity, self.max_bytes, weight, now);
        }
        inner.tick += 1;
        let used = inner.tick;
        inner.bytes += weight;
        inner.map.insert(
            key,
            Slot {
                value,
                expires: valid_until,
                used,
                weight,
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
    /// `total` entries and [`DEFAULT_CACHE_BYTES`](super::dns::DEFAULT_CACHE_BYTES).
    pub fn new(total: usize) -> Self {
        Self::with_bytes(total, super::dns::DEFAULT_CACHE_BYTES)
    }

    /// `total` entries and `bytes` split as documented in the module
    /// comment; 0 entries disables caching.
    pub fn with_bytes(total: usize, bytes: usize) -> Self {
        let share = |div: usize| {
            if total == 0 {
                0
            } else {
                (total / div).max(1)
            }
        };
        let bytes = |div: usize| bytes / div;
        SharedCaches {
            txt: LruCache::new(share(2), bytes(2)),
            mx: LruCache::new(share(8), bytes(8)),
            ipv4: LruCache::new(share(8), bytes(8)),
            ipv6: LruCache::new(share(8), bytes(8)),
            ptr: LruCache::new(share(8), bytes(8)),
        }
    }

    /// Cached entries over all record types.
    pub fn len(&self) -> usize {
        self.txt.len() + self.mx.len() + self.ipv4.len() + self.ipv6.len() + self.ptr.len()
    }

    /// Estimated bytes held over all record types.
    pub fn bytes(&self) -> usize {
        self.txt.bytes()
            + self.mx.bytes()
            + self.ipv4.bytes()
            + self.ipv6.bytes()
            + self.ptr.bytes()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Upper bounds (µs) of the lookup latency buckets in [`DnsStats`]; the last
/// bucket counts everything slower.
pub const LATENCY_BUCKETS_US: [u64; 7] =
    [1_000, 5_000, 25_000, 100_000, 500_000, 2_000_000, 5_000_000];

/// What the DNS queries of one check did: the time each answered query took
/// and how many got no stored answer. Returned with the check's outcome so
/// that the driver counts `mailgate_dns_lookup_seconds` and
/// `mailgate_dns_failures_total`. Bounded like the lookups of a call (the
/// query budget).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsFacts {
    pub answered: Vec<Duration>,
    pub unanswered: u64,
}

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
    /// How long the answer took (answered lookups).
    took: Option<Duration>,
    /// Already counted as a void lookup.
    void: bool,
    /// An MX, A or AAAA lookup: the kinds whose empty answers are void
    /// lookups. TXT ones are not: a missing `include:`/`redirect=` target is
    /// `permerror` anyway, and RFC 7208 §4.6.4 says a missing `exp=` must not count.
    counts_void: bool,
}

/// The DNS query budget of one SMTP session: queries made by all its checks,
/// and by the checks of its current transaction (MAIL to end of DATA).
/// Cheap to clone (shared counters), so a check running on another thread
/// can charge it.
#[derive(Debug, Clone, Default)]
pub struct DnsBudget(Arc<BudgetCounters>);

#[derive(Debug, Default)]
struct BudgetCounters {
    session: AtomicU32,
    message: AtomicU32,
}

impl DnsBudget {
    pub fn new() -> Self {
        Self::default()
    }

    /// A new transaction begins (MAIL): its own count starts from zero.
    pub fn new_message(&self) {
        self.0.message.store(0, Ordering::Relaxed);
    }

    /// Queries made so far in this session.
    pub fn session_queries(&self) -> u32 {
        self.0.session.load(Ordering::Relaxed)
    }

    /// Takes one query from both budgets, or says which one is spent.
    fn charge(&self, limits: QueryLimits) -> Result<(), Trip> {
        let c = &self.0;
        if c.session.load(Ordering::Relaxed) >= limits.per_session {
            return Err(Trip::SessionBudget);
        }
        if c.message.load(Ordering::Relaxed) >= limits.per_message {
            return Err(Trip::MessageBudget);
        }
        c.session.fetch_add(1, Ordering::Relaxed);
        c.message.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Query caps, from the `dns:` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryLimits {
    pub per_session: u32,
    pub per_message: u32,
}

/// Why a check was denied further queries (or must not use what it got).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trip {
    /// The session spent its query budget: `temperror` (a new session may do better).
    SessionBudget,
    /// The transaction spent its query budget: `permerror` (the same
    /// message and records would spend it again).
    MessageBudget,
    /// More than [`VOID_LOOKUP_LIMIT`] void lookups in one SPF evaluation: `permerror`.
    VoidLimit,
    /// A record over the size limits: `permerror`.
    Oversized(String),
}

impl Trip {
    /// Whether retrying later could give a result (`temperror`) or not (`permerror`).
    pub fn is_temporary(&self) -> bool {
        matches!(self, Trip::SessionBudget)
    }

    /// Sanitised, reply-safe text.
    pub fn reason(&self, limits: QueryLimits) -> String {
        match self {
            Trip::SessionBudget => format!(
                "DNS query limit of the session reached ({} queries)",
                limits.per_session
            ),
            Trip::MessageBudget => format!(
                "DNS query limit of the message reached ({} queries)",
                limits.per_message
            ),
            Trip::VoidLimit => {
                format!("more than {VOID_LOOKUP_LIMIT} void DNS lookups (RFC 7208 4.6.4)")
            }
            Trip::Oversized(why) => super::verify::sanitize(why, 100),
        }
    }
}

struct Gate<'a> {
    budget: &'a DnsBudget,
    limits: QueryLimits,
    /// Count void lookups (SPF only).
    spf: bool,
}

#[derive(Default)]
struct LogState {
    lookups: Vec<Lookup>,
    voids: u32,
    /// Key of the last void counted: one term's A and AAAA (`exists`)
    /// or repeated cache hits for one name count once.
    last_void: Option<Vec<u8>>,
    tripped: Option<Trip>,
    denied: Vec<String>,
}

/// The lookups of one check, in order, and its gate (see the module comment).
pub struct CallLog<'a> {
    stats: &'a DnsStats,
    gate: Option<Gate<'a>>,
    state: Mutex<LogState>,
}

impl<'a> CallLog<'a> {
    /// A log without limits.
    pub fn new(stats: &'a DnsStats) -> Self {
        CallLog {
            stats,
            gate: None,
            state: Mutex::new(LogState::default()),
        }
    }

    /// A log that charges `budget` and, for SPF (`spf`), counts void lookups.
    pub fn gated(
        stats: &'a DnsStats,
        budget: &'a DnsBudget,
        limits: QueryLimits,
        spf: bool,
    ) -> Self {
        CallLog {
            stats,
            gate: Some(Gate {
                budget,
                limits,
                spf,
            }),
            state: Mutex::new(LogState::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn counts_voids(&self) -> bool {
        self.gate.as_ref().is_some_and(|g| g.spf)
    }

    fn void(&self, st: &mut LogState, key: &[u8]) {
        if st.last_void.as_deref() == Some(key) {
            return;
        }
        st.last_void = Some(key.to_vec());
        st.voids += 1;
        if st.voids > VOID_LOOKUP_LIMIT && st.tripped.is_none() {
            st.tripped = Some(Trip::VoidLimit);
        }
    }

    /// The previous lookup got no stored answer and the check went on
    /// (mail-auth continues only after "no records"): a void lookup, unless
    /// it is the first half of an `exists` probe for the same name.
    fn settle_previous(&self, st: &mut LogState, next: Option<&[u8]>) {
        let Some(last) = st.lookups.last_mut() else {
            return;
        };
        if last.answered
            || last.void
            || !last.counts_void
            || last.name.is_none()
            || Some(&last.key[..]) == next
        {
            return;
        }
        last.void = true;
        let key = last.key.clone();
        self.void(st, &key);
    }

    /// A cache hit: a cached negative answer is a void lookup too.
    fn hit(&self, key: Vec<u8>, void: bool) {
        self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
        if self.counts_voids() {
            let mut st = self.lock();
            self.settle_previous(&mut st, Some(&key));
            if void {
                self.void(&mut st, &key);
            }
        }
    }

    /// A cache miss: `true` when the query may go to DNS.
    fn miss(&self, key: Vec<u8>, named: bool, counts_void: bool) -> bool {
        let name = if named { key_name(&key) } else { None };
        let mut st = self.lock();
        if let Some(g) = &self.gate {
            if g.spf {
                self.settle_previous(&mut st, Some(&key));
            }
            let refused = match &st.tripped {
                Some(_) => true,
                None => match g.budget.charge(g.limits) {
                    Ok(()) => false,
                    Err(trip) => {
                        st.tripped = Some(trip);
                        true
                    }
                },
            };
            if refused {
                if st.denied.len() < 64 {
                    st.denied.push(name.unwrap_or_default());
                }
                return false;
            }
        }
        self.stats.queries.fetch_add(1, Ordering::Relaxed);
        // Bounded: the budget caps queries per check; without a gate mail-auth
        // caps SPF at 10 DNS mechanisms (×10 MX hosts) and DMARC walks at 8 names.
        if st.lookups.len() < 512 {
            st.lookups.push(Lookup {
                key,
                name,
                started: Instant::now(),
                answered: false,
                took: None,
                void: false,
                counts_void,
            });
        }
        true
    }

    /// A query was answered and mail-auth stores the answer.
    fn answer(&self, key: Vec<u8>, void: bool) {
        let mut st = self.lock();
        if let Some(entry) = st
            .lookups
            .iter_mut()
            .rev()
            .find(|e| !e.answered && e.key == key)
        {
            entry.answered = true;
            let d = entry.started.elapsed();
            entry.took = Some(d);
            self.stats.record_latency(d);
        }
        if void && self.counts_voids() {
            self.void(&mut st, &key);
        }
    }

    /// The check must not use a record it fetched.
    fn refuse(&self, why: String) {
        let mut st = self.lock();
        if st.tripped.is_none() {
            st.tripped = Some(Trip::Oversized(why));
        }
    }

    /// Why the check was cut short, if it was.
    pub fn tripped(&self) -> Option<Trip> {
        self.lock().tripped.clone()
    }

    /// Whether a query for `name` (as mail-auth spells it, with the
    /// trailing dot) was denied by the gate.
    pub fn was_denied(&self, name: &str) -> bool {
        self.lock()
            .denied
            .iter()
            .any(|d| d.eq_ignore_ascii_case(name))
    }

    /// The last lookup of the check if it got no stored answer: the query a
    /// check that ended in `temperror` stopped at.
    pub fn last_unanswered(&self) -> Option<Lookup> {
        self.lock().lookups.last().filter(|l| !l.answered).cloned()
    }

    /// Ends an SPF evaluation that did not stop at a failed query: a last
    /// lookup without stored answer was void (see [`Self::settle_previous`]).
    pub fn settle_spf(&self, stopped_at_failure: bool) {
        if !stopped_at_failure && self.counts_voids() {
            let mut st = self.lock();
            self.settle_previous(&mut st, None);
        }
    }

    /// Counts unanswered lookups into the stats and returns what this call's
    /// DNS did, for the caller to count. Call once, when the check is over.
    pub fn finish(&self) -> DnsFacts {
        let st = self.lock();
        let facts = DnsFacts {
            answered: st.lookups.iter().filter_map(|l| l.took).collect(),
            unanswered: st.lookups.iter().filter(|l| !l.answered).count() as u64,
        };
        self.stats
            .unanswered
            .fetch_add(facts.unanswered, Ordering::Relaxed);
        facts
    }
}

/// A shared cache (or none) seen through the log of one call.
pub struct Tracked<'a, K, V> {
    cache: Option<&'a LruCache<K, V>>,
    log: &'a CallLog<'a>,
    /// Keys are names (true) or IP addresses (false).
    named: bool,
    /// Empty answers are void lookups (MX, A, AAAA; see [`Lookup`]).
    voids: bool,
}

impl<K: Hash + Eq + Weigh, V: GateValue> ResolverCache<K, V> for Tracked<'_, K, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some(v) = self.cache.and_then(|c| c.get(name)) {
            self.log.hit(capture(name), self.voids && v.is_void());
            return Some(v);
        }
        if self.log.miss(capture(name), self.named, self.voids) {
            None
        } else {
            Some(V::denied())
        }
    }

    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.cache.and_then(|c| c.remove(name))
    }

    fn insert(&self, key: K, value: V, valid_until: Instant) {
        self.log
            .answer(capture(key.borrow()), self.voids && value.is_void());
        if let Some(why) = value.refused() {
            self.log.refuse(why);
            return;
        }
        if let (Some(c), true) = (self.cache, value.cacheable()) {
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
                voids: false,
            },
            mx: Tracked {
                cache: shared.map(|s| &s.mx),
                log,
                named: true,
                voids: true,
            },
            ipv4: Tracked {
                cache: shared.map(|s| &s.ipv4),
                log,
                named: true,
                voids: true,
            },
            ipv6: Tracked {
                cache: shared.map(|s| &s.ipv6),
                log,
                named: true,
                voids: true,
            },
            ptr: Tracked {
                cache: shared.map(|s| &s.ptr),
                log,
                named: false,
                voids: false,
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

    impl Weigh for u32 {
        fn weight(&self) -> usize {
            4
        }
    }

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
        let c: LruCache<Box<str>, u32> = LruCache::new(8, usize::MAX);
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
        let z: LruCache<Box<str>, u32> = LruCache::new(0, usize::MAX);
        z.insert("a.".into(), 1, later(60));
        assert!(z.is_empty());
    }

    /// Issue 19 item 1: the shared caches are bounded in bytes, not only in
    /// entries: 5,000 parsed SPF records of ~90 long terms each (under the
    /// per-record limit) must not all stay cached at the default settings.
    #[test]
    fn shared_cache_is_bounded_in_bytes() {
        use mail_auth::dns::TxtRecordParser;
        use mail_auth::spf::SpfRecord;
        let stats = DnsStats::default();
        let shared = SharedCaches::new(10_000);
        let log = CallLog::new(&stats);
        let caches = CallCaches::new(Some(&shared), &log);
        let txt = caches.txt().unwrap();
        let label = "l".repeat(20);
        let mut text = String::from("v=spf1");
        for i in 0..40 {
            text.push_str(&format!(" a:{label}{i}.{label}.example"));
        }
        text.push_str(" -all");
        let rec = SpfRecord::parse(text.as_bytes()).unwrap();
        for i in 0..5000 {
            txt.insert(
                format!("d{i}.example.").into(),
                TxtRecord::Spf(std::sync::Arc::new(rec.clone())),
                later(600),
            );
        }
        assert!(
            shared.len() < 3000,
            "{} large records cached at once",
            shared.len()
        );
    }

    const LIMITS: QueryLimits = QueryLimits {
        per_session: 5,
        per_message: 3,
    };

    /// The gate, sans DNS: what mail-auth's lookups look like from the cache.
    #[test]
    fn gate_counts_void_lookups() {
        let stats = DnsStats::default();
        let shared = SharedCaches::new(100);
        let budget = DnsBudget::new();
        let unlimited = QueryLimits {
            per_session: 100,
            per_message: 100,
        };
        let log = CallLog::gated(&stats, &budget, unlimited, true);
        let caches = CallCaches::new(Some(&shared), &log);
        let (a, txt) = (caches.ipv4().unwrap(), caches.txt().unwrap());
        let nx = || {
            Err(Negative {
                code: mail_auth::hickory_resolver::proto::op::ResponseCode::NXDomain,
            })
        };
        // TXT voids (include/redirect/exp targets) never count
        assert!(txt.get::<str>("exp.example.").is_none());
        txt.insert(
            "exp.example.".into(),
            TxtRecord::Error(mail_auth::Error::Dns(DnsError::RecordNotFound(
                mail_auth::hickory_resolver::proto::op::ResponseCode::NXDomain,
            ))),
            later(60),
        );
        // 1: a negative answer with SOA (stored)
        assert!(a.get::<str>("v1.example.").is_none());
        a.insert("v1.example.".into(), nx(), later(60));
        // 2: a query without stored answer, after which the check went on
        assert!(a.get::<str>("v2.example.").is_none());
        assert!(a.get::<str>("ok.example.").is_none(), "v2 settled as void");
        a.insert(
            "ok.example.".into(),
            Ok(RecordSet {
                records: std::sync::Arc::new([Ipv4Addr::LOCALHOST]),
                dnssec_status: Default::default(),
            }),
            later(60),
        );
        assert_eq!(log.tripped(), None, "two voids are allowed");
        // 3: a cached negative answer
        assert!(a.get::<str>("v1.example.").is_some());
        assert_eq!(log.tripped(), Some(Trip::VoidLimit));
        // from now on nothing goes to DNS
        let before = stats.queries.load(Ordering::Relaxed);
        assert!(
            a.get::<str>("new.example.").is_some(),
            "denied, answered locally"
        );
        assert!(txt.get::<str>("new.example.").is_some());
        assert_eq!(stats.queries.load(Ordering::Relaxed), before);
    }

    #[test]
    fn gate_charges_session_and_message_budgets() {
        let stats = DnsStats::default();
        let budget = DnsBudget::new();
        let log = CallLog::gated(&stats, &budget, LIMITS, false);
        let caches = CallCaches::new(None, &log);
        let txt = caches.txt().unwrap();
        for i in 0..3 {
            assert!(txt.get::<str>(&format!("q{i}.example.")).is_none());
        }
        assert!(
            txt.get::<str>("q3.example.").is_some(),
            "4th query of the message denied"
        );
        assert_eq!(log.tripped(), Some(Trip::MessageBudget));
        assert!(log.was_denied("q3.example."));
        // next transaction: two more, then the session is spent
        budget.new_message();
        let log = CallLog::gated(&stats, &budget, LIMITS, false);
        let caches = CallCaches::new(None, &log);
        let txt = caches.txt().unwrap();
        assert!(txt.get::<str>("r0.example.").is_none());
        assert!(txt.get::<str>("r1.example.").is_none());
        assert!(txt.get::<str>("r2.example.").is_some());
        assert_eq!(log.tripped(), Some(Trip::SessionBudget));
        assert!(Trip::SessionBudget.is_temporary() && !Trip::MessageBudget.is_temporary());
        assert_eq!(budget.session_queries(), 5);
    }

    #[test]
    fn oversized_records_are_refused_and_not_cached() {
        use mail_auth::dns::TxtRecordParser;
        use mail_auth::spf::SpfRecord;
        let stats = DnsStats::default();
        let shared = SharedCaches::new(100);
        let budget = DnsBudget::new();
        let limits = QueryLimits {
            per_session: 100,
            per_message: 100,
        };
        let terms: Vec<String> = (0..101).map(|i| format!("ip4:10.0.0.{i}")).collect();
        let big = SpfRecord::parse(format!("v=spf1 {} -all", terms.join(" ")).as_bytes()).unwrap();
        let log = CallLog::gated(&stats, &budget, limits, true);
        let caches = CallCaches::new(Some(&shared), &log);
        let txt = caches.txt().unwrap();
        assert!(txt.get::<str>("big.example.").is_none());
        txt.insert(
            "big.example.".into(),
            TxtRecord::Spf(std::sync::Arc::new(big)),
            later(600),
        );
        assert!(matches!(log.tripped(), Some(Trip::Oversized(why)) if why.contains("102 terms")));
        assert!(shared.is_empty());
        // a record under the limits is cached
        let small = SpfRecord::parse(b"v=spf1 ip4:10.0.0.1 -all").unwrap();
        txt.insert(
            "small.example.".into(),
            TxtRecord::Spf(std::sync::Arc::new(small)),
            later(600),
        );
        assert_eq!(shared.len(), 1);
        assert!(shared.bytes() > 0 && shared.bytes() < 1024);
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
        // the call's facts, for the driver to count (nothing process-wide)
        let facts = log.finish();
        assert_eq!((facts.answered.len(), facts.unanswered), (1, 1));
        let s = stats.snapshot(shared.len());
        assert_eq!(
            (s.queries, s.cache_hits, s.answered, s.unanswered),
            (2, 1, 1, 1)
        );
        assert_eq!(s.latency_buckets.iter().sum::<u64>(), 1);
        assert_eq!(s.cached_entries, 1);
    }
}
