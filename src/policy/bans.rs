//! Bans: client networks refused on every listener (SMTP, POP3, IMAP) until
//! they expire, whichever policy's rule banned them (`action: ban`). One
//! [`Bans`] per process, in the [`PolicyState`](super::PolicyState) that
//! survives reloads; the server checks it right after the PROXY header,
//! before TLS and the greeting.
//!
//! What is banned is the network the rule counted: an IPv4 address, or the
//! IPv6 network of the rule's `ipv6_prefix` (default /64). The networks of
//! trusted PROXY balancers ([`Bans::protect`]) are never banned: a ban there
//! would turn away every client behind the balancer.
//!
//! Bounded: at most `max` bans. When full, a new ban takes the place of the
//! one that expires soonest (counted in [`Bans::evicted`]): refusing the new
//! ban instead would let an attacker who filled the list go unbanned.

use crate::units::{canonical, Cidr};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::{info, warn};

/// A banned network as a map key: family, masked address bits, prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Key {
    v6: bool,
    bits: u128,
    prefix: u8,
}

impl Key {
    /// The network of `prefix` bits around `ip` (IPv4 always /32).
    fn of(ip: IpAddr, ipv6_prefix: u8) -> Key {
        match canonical(ip) {
            IpAddr::V4(a) => Key {
                v6: false,
                bits: u128::from(u32::from(a)),
                prefix: 32,
            },
            IpAddr::V6(a) => {
                let prefix = ipv6_prefix.min(128);
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                Key {
                    v6: true,
                    bits: u128::from(a) & mask,
                    prefix,
                }
            }
        }
    }

    fn cidr(self) -> Cidr {
        let addr = if self.v6 {
            IpAddr::V6(Ipv6Addr::from(self.bits))
        } else {
            IpAddr::V4(Ipv4Addr::from(self.bits as u32))
        };
        Cidr {
            addr,
            prefix: self.prefix,
        }
    }
}

/// Who banned, and why (for the log, `/bans` and the metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BanCause {
    pub policy: String,
    pub rule: String,
    /// What the rule counts (`auth_failures 6 per 900s`).
    pub reason: String,
}

/// One ban as `/bans` and `mailgate bans list` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BanInfo {
    /// The banned network (`127.0.0.9/32`, `2001:db8:1:2::/64`).
    pub network: Cidr,
    pub cause: BanCause,
    /// Time left.
    pub remaining: Duration,
    /// Wall-clock expiry, for operators.
    pub expires_at: SystemTime,
}

impl BanInfo {
    /// The network as operators write it: a bare address for one host.
    pub fn address(&self) -> String {
        let host = if self.network.addr.is_ipv4() { 32 } else { 128 };
        if self.network.prefix == host {
            self.network.addr.to_string()
        } else {
            self.network.to_string()
        }
    }

    /// The `/bans` JSON object of this ban.
    pub fn to_json(&self) -> serde_json::Value {
        // rounded up: a ban with 0.4 s left is not over
        let left = self.remaining.as_secs() + u64::from(self.remaining.subsec_nanos() > 0);
        serde_json::json!({
            "address": self.address(),
            "policy": self.cause.policy,
            "rule": self.cause.rule,
            "reason": self.cause.reason,
            "expires_in": left,
            "expires_at": self.expires_at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        })
    }
}

/// What [`Bans::ban`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BanOutcome {
    /// Banned (or an existing ban extended); `active` bans now, and whether
    /// another ban was evicted to make room.
    Banned { active: usize, evicted: bool },
    /// Not banned: the network holds a trusted PROXY balancer.
    Protected,
}

struct Entry {
    cause: BanCause,
    until: Instant,
    expires_at: SystemTime,
}

#[derive(Default)]
struct Inner {
    map: HashMap<Key, Entry>,
    /// The same bans in expiry order: the soonest is evicted or dropped first.
    by_expiry: BTreeSet<(Instant, Key)>,
    /// IPv6 prefix lengths in use and how many bans have each (a lookup
    /// masks the address once per length).
    v6_prefixes: BTreeMap<u8, usize>,
}

impl Inner {
    fn remove(&mut self, k: Key) -> Option<Entry> {
        let e = self.map.remove(&k)?;
        self.by_expiry.remove(&(e.until, k));
        if k.v6 {
            if let Some(n) = self.v6_prefixes.get_mut(&k.prefix) {
                *n -= 1;
                if *n == 0 {
                    self.v6_prefixes.remove(&k.prefix);
                }
            }
        }
        Some(e)
    }

    fn insert(&mut self, k: Key, e: Entry) {
        self.by_expiry.insert((e.until, k));
        if k.v6 {
            *self.v6_prefixes.entry(k.prefix).or_insert(0) += 1;
        }
        self.map.insert(k, e);
    }

    /// The keys of bans that may cover `ip`.
    fn candidates(&self, ip: IpAddr) -> Vec<Key> {
        match canonical(ip) {
            v4 @ IpAddr::V4(_) => vec![Key::of(v4, 32)],
            v6 => self.v6_prefixes.keys().map(|p| Key::of(v6, *p)).collect(),
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(until, k)) = self.by_expiry.first() {
            if until > now {
                break;
            }
            self.remove(k);
        }
    }
}

/// The process's bans (see the module comment).
pub struct Bans {
    max: usize,
    inner: Mutex<Inner>,
    protected: RwLock<Vec<Cidr>>,
    evicted: AtomicU64,
}

impl Bans {
    pub fn new(max: usize) -> Bans {
        Bans {
            max: max.max(1),
            inner: Mutex::default(),
            protected: RwLock::default(),
            evicted: AtomicU64::new(0),
        }
    }

    /// The networks never banned (every listener's `proxy_protocol.trusted`);
    /// bans already covering one of them are lifted.
    pub fn protect(&self, networks: Vec<Cidr>) {
        let mut inner = self.lock();
        let covered: Vec<Key> = inner
            .map
            .keys()
            .filter(|k| networks.iter().any(|n| overlaps(k.cidr(), *n)))
            .copied()
            .collect();
        for k in covered {
            inner.remove(k);
            warn!(client = %k.cidr(), "ban lifted: the network holds a trusted PROXY balancer");
        }
        *self.protected.write().unwrap_or_else(|e| e.into_inner()) = networks;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bans the network of `ipv6_prefix` bits around `ip` (IPv4: the
    /// address) for `for_`. A ban already running longer is kept as it is.
    pub fn ban(
        &self,
        ip: IpAddr,
        ipv6_prefix: u8,
        for_: Duration,
        cause: BanCause,
        now: Instant,
    ) -> BanOutcome {
        let k = Key::of(ip, ipv6_prefix);
        let network = k.cidr();
        let protected = self
            .protected
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|n| overlaps(network, *n));
        if protected {
            warn!(client = %network, policy = %cause.policy, rule = %cause.rule,
                "ban not applied: the network holds a trusted PROXY balancer");
            return BanOutcome::Protected;
        }
        let until = now + for_;
        let mut inner = self.lock();
        inner.expire(now);
        let mut evicted = false;
        match inner.map.get(&k) {
            Some(e) if e.until >= until => {
                return BanOutcome::Banned {
                    active: inner.map.len(),
                    evicted,
                }
            }
            Some(_) => {
                inner.remove(k);
            }
            None if inner.map.len() >= self.max => {
                if let Some(&(_, soonest)) = inner.by_expiry.first() {
                    inner.remove(soonest);
                    self.evicted.fetch_add(1, Ordering::Relaxed);
                    evicted = true;
                    warn!(client = %soonest.cidr(), max = self.max, "ban list full: the ban expiring soonest was dropped");
                }
            }
            None => {}
        }
        let expires_at = SystemTime::now() + for_;
        let unix = expires_at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        warn!(client = %network, policy = %cause.policy, rule = %cause.rule, reason = %cause.reason,
            ban_for_s = for_.as_secs(), until_unix = unix, "client banned");
        inner.insert(
            k,
            Entry {
                cause,
                until,
                expires_at,
            },
        );
        BanOutcome::Banned {
            active: inner.map.len(),
            evicted,
        }
    }

    /// The ban covering `ip` now, if any.
    /// The network a ban of `ip` covers (`ipv6_prefix` bits of an IPv6
    /// address; an IPv4 address is its own /32).
    pub fn network(ip: IpAddr, ipv6_prefix: u8) -> Cidr {
        Key::of(ip, ipv6_prefix).cidr()
    }

    pub fn banned(&self, ip: IpAddr, now: Instant) -> Option<BanInfo> {
        let inner = self.lock();
        inner
            .candidates(ip)
            .into_iter()
            .filter_map(|k| Some((k, inner.map.get(&k)?)))
            .find(|(_, e)| e.until > now)
            .map(|(k, e)| info_of(k, e, now))
    }

    /// Lifts every ban covering `ip`; the bans lifted.
    pub fn lift(&self, ip: IpAddr, now: Instant) -> Vec<BanInfo> {
        let mut inner = self.lock();
        inner.expire(now);
        let mut lifted = Vec::new();
        for k in inner.candidates(ip) {
            if let Some(e) = inner.remove(k) {
                info!(client = %k.cidr(), policy = %e.cause.policy, rule = %e.cause.rule, "ban lifted");
                lifted.push(info_of(k, &e, now));
            }
        }
        lifted
    }

    /// The bans in force, soonest expiry first.
    pub fn list(&self, now: Instant) -> Vec<BanInfo> {
        let mut inner = self.lock();
        inner.expire(now);
        inner
            .by_expiry
            .iter()
            .filter_map(|(_, k)| Some(info_of(*k, inner.map.get(k)?, now)))
            .collect()
    }

    /// Drops expired bans; the number still in force (periodic housekeeping).
    pub fn housekeeping(&self, now: Instant) -> usize {
        let mut inner = self.lock();
        inner.expire(now);
        inner.map.len()
    }

    /// The most bans held at once.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Bans dropped because the list was full.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }
}

fn info_of(k: Key, e: &Entry, now: Instant) -> BanInfo {
    BanInfo {
        network: k.cidr(),
        cause: e.cause.clone(),
        remaining: e.until.saturating_duration_since(now),
        expires_at: e.expires_at,
    }
}

/// Whether two networks share an address.
fn overlaps(a: Cidr, b: Cidr) -> bool {
    a.contains(b.addr) || b.contains(a.addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cause(rule: &str) -> BanCause {
        BanCause {
            policy: "p".into(),
            rule: rule.into(),
            reason: "auth_failures 6 per 900s".into(),
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn ban_expires_and_covers_only_its_network() {
        let b = Bans::new(10);
        let t = Instant::now();
        assert_eq!(
            b.ban(ip("127.0.0.9"), 64, Duration::from_secs(2), cause("r"), t),
            BanOutcome::Banned {
                active: 1,
                evicted: false
            }
        );
        let got = b.banned(ip("127.0.0.9"), t).unwrap();
        assert_eq!(got.address(), "127.0.0.9");
        assert_eq!(got.cause.rule, "r");
        assert_eq!(got.remaining, Duration::from_secs(2));
        assert!(
            b.banned(ip("::ffff:127.0.0.9"), t).is_some(),
            "mapped is IPv4"
        );
        assert!(b.banned(ip("127.0.0.10"), t).is_none());
        assert!(b
            .banned(ip("127.0.0.9"), t + Duration::from_secs(2))
            .is_none());
        assert_eq!(b.housekeeping(t + Duration::from_secs(2)), 0);
        assert!(b.list(t).is_empty());
    }

    #[test]
    fn ipv6_bans_the_counted_network() {
        let b = Bans::new(10);
        let t = Instant::now();
        b.ban(ip("2001:db8:1:2::7"), 64, HOUR, cause("r"), t);
        b.ban(ip("2001:db8:9::1"), 128, HOUR, cause("s"), t);
        assert_eq!(
            b.banned(ip("2001:db8:1:2:ffff::1"), t).unwrap().address(),
            "2001:db8:1:2::/64"
        );
        assert!(b.banned(ip("2001:db8:1:3::7"), t).is_none());
        assert_eq!(b.banned(ip("2001:db8:9::1"), t).unwrap().cause.rule, "s");
        assert!(b.banned(ip("2001:db8:9::2"), t).is_none());
        let j = b.list(t)[0].to_json();
        assert_eq!(j["expires_in"], 3600);
        assert!(j["expires_at"].as_u64().unwrap() > 1_700_000_000);
    }

    #[test]
    fn a_longer_ban_is_kept_a_shorter_one_extended() {
        let b = Bans::new(10);
        let t = Instant::now();
        b.ban(ip("192.0.2.1"), 64, HOUR, cause("long"), t);
        b.ban(
            ip("192.0.2.1"),
            64,
            Duration::from_secs(60),
            cause("short"),
            t,
        );
        let got = b.banned(ip("192.0.2.1"), t).unwrap();
        assert_eq!((got.cause.rule.as_str(), got.remaining), ("long", HOUR));
        b.ban(ip("192.0.2.1"), 64, 2 * HOUR, cause("longer"), t);
        assert_eq!(b.banned(ip("192.0.2.1"), t).unwrap().remaining, 2 * HOUR);
        assert_eq!(b.list(t).len(), 1);
    }

    #[test]
    fn full_list_evicts_the_soonest_expiring() {
        let b = Bans::new(3);
        let t = Instant::now();
        for (i, secs) in [(1u8, 300u64), (2, 100), (3, 200)] {
            b.ban(
                IpAddr::from([198, 51, 100, i]),
                64,
                Duration::from_secs(secs),
                cause("r"),
                t,
            );
        }
        assert_eq!(
            b.ban(ip("198.51.100.4"), 64, HOUR, cause("r"), t),
            BanOutcome::Banned {
                active: 3,
                evicted: true
            }
        );
        assert_eq!(b.evicted(), 1);
        assert!(b.banned(ip("198.51.100.2"), t).is_none(), "soonest went");
        for a in ["198.51.100.1", "198.51.100.3", "198.51.100.4"] {
            assert!(b.banned(ip(a), t).is_some(), "{a}");
        }
        let order: Vec<String> = b.list(t).iter().map(|i| i.address()).collect();
        assert_eq!(order, ["198.51.100.3", "198.51.100.1", "198.51.100.4"]);
        // expired bans make room before anything in force is evicted
        let later = t + Duration::from_secs(250);
        b.ban(ip("198.51.100.5"), 64, HOUR, cause("r"), later);
        assert_eq!(b.evicted(), 1);
        assert_eq!(b.list(later).len(), 3);
    }

    #[test]
    fn lift_removes_what_covers_the_address() {
        let b = Bans::new(10);
        let t = Instant::now();
        b.ban(ip("127.0.0.9"), 64, HOUR, cause("r"), t);
        b.ban(ip("2001:db8::5"), 64, HOUR, cause("r"), t);
        assert!(b.lift(ip("127.0.0.8"), t).is_empty());
        assert_eq!(b.lift(ip("127.0.0.9"), t).len(), 1);
        assert!(b.banned(ip("127.0.0.9"), t).is_none());
        assert_eq!(
            b.lift(ip("2001:db8::ffff"), t)[0].address(),
            "2001:db8::/64"
        );
        assert!(b.list(t).is_empty());
        assert!(b.lift(ip("127.0.0.9"), t).is_empty());
    }

    #[test]
    fn trusted_balancers_are_never_banned() {
        let b = Bans::new(10);
        let t = Instant::now();
        b.ban(ip("10.0.0.5"), 64, HOUR, cause("r"), t);
        b.ban(ip("2001:db8:7::1"), 64, HOUR, cause("r"), t);
        b.protect(vec![
            Cidr::parse("10.0.0.0/24").unwrap(),
            Cidr::parse("2001:db8:7::1").unwrap(),
        ]);
        assert!(b.list(t).is_empty(), "bans covering them are lifted");
        assert_eq!(
            b.ban(ip("10.0.0.7"), 64, HOUR, cause("r"), t),
            BanOutcome::Protected
        );
        assert_eq!(
            b.ban(ip("2001:db8:7::99"), 64, HOUR, cause("r"), t),
            BanOutcome::Protected,
            "the /64 would cover the balancer"
        );
        assert!(matches!(
            b.ban(ip("10.0.1.7"), 64, HOUR, cause("r"), t),
            BanOutcome::Banned { .. }
        ));
    }
}
