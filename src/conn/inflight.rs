//! The process-wide budget for message bytes in flight (`server.max_inflight_data`).
//!
//! Every DATA holds its message in memory until the backend has answered, so
//! without a bound the connection limit times the message size is what an
//! attacker can make the gateway allocate. A [`Reservation`] covers the memory
//! one message holds (the receive buffer's capacity, not only its length); it
//! grows as the buffer grows and is given back when dropped. A message that
//! cannot get the memory it needs is refused with `452 4.3.1`, never left to
//! the allocator's mercy. No awaits here: plain atomics, usable from sans-IO
//! code.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug)]
pub struct Budget {
    limit: AtomicU64,
    used: AtomicU64,
}

impl Budget {
    pub fn new(limit: u64) -> Arc<Budget> {
        Arc::new(Budget {
            limit: AtomicU64::new(limit),
            used: AtomicU64::new(0),
        })
    }

    /// Applies a reloaded limit; reservations already held are kept.
    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Bytes currently reserved by messages in flight.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// A reservation of `bytes` (0 always succeeds), or `None` when the budget
    /// cannot cover it.
    pub fn reserve(self: &Arc<Self>, bytes: u64) -> Option<Reservation> {
        let mut r = Reservation {
            budget: self.clone(),
            bytes: 0,
        };
        r.grow(bytes, bytes)?;
        Some(r)
    }

    /// Whether `bytes` more would fit now, reserving nothing (a refusal is
    /// counted). DATA checks a SIZE announced in MAIL with this: reserving it
    /// before any byte arrives would let a client that announces big messages
    /// and then trickles hold the whole budget without sending anything.
    pub fn fits(&self, bytes: u64) -> bool {
        let fits = self.used().saturating_add(bytes) <= self.limit.load(Ordering::Relaxed);
        if !fits {
            crate::observe::metrics().inflight_refused.inc();
        }
        fits
    }

    /// Takes between `min` and `max` bytes: as much of `max` as is left, or
    /// nothing (and a refusal counted) when not even `min` is left.
    fn take(&self, min: u64, max: u64) -> Option<u64> {
        let limit = self.limit.load(Ordering::Relaxed);
        let mut granted = 0;
        let r = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                let left = limit.saturating_sub(used);
                if left < min {
                    return None;
                }
                granted = max.min(left);
                Some(used + granted)
            });
        let m = crate::observe::metrics();
        match r {
            Ok(_) => {
                m.inflight_bytes.inc_by(granted as i64);
                Some(granted)
            }
            Err(_) => {
                m.inflight_refused.inc();
                None
            }
        }
    }

    fn give_back(&self, bytes: u64) {
        if bytes > 0 {
            self.used.fetch_sub(bytes, Ordering::AcqRel);
            crate::observe::metrics()
                .inflight_bytes
                .dec_by(bytes as i64);
        }
    }
}

/// Memory one message may hold; released on drop.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Reservation {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Makes the reservation cover at least `min` bytes and up to `want`;
    /// returns what it covers now, or `None` (unchanged) when the budget has
    /// less than `min` left.
    pub fn grow(&mut self, min: u64, want: u64) -> Option<u64> {
        if self.bytes >= want.max(min) {
            return Some(self.bytes);
        }
        let min_extra = min.saturating_sub(self.bytes);
        let want_extra = want.max(min) - self.bytes;
        self.bytes += self.budget.take(min_extra, want_extra)?;
        Some(self.bytes)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_grow_release() {
        let b = Budget::new(100);
        let mut a = b.reserve(30).unwrap();
        assert_eq!(b.used(), 30);
        // as much of `want` as is left, at least `min`
        assert_eq!(a.grow(50, 200), Some(100));
        assert_eq!(b.used(), 100);
        assert!(b.reserve(1).is_none());
        assert!(b.reserve(0).is_some());
        drop(a);
        assert_eq!(b.used(), 0);
        let mut c = b.reserve(60).unwrap();
        let d = b.reserve(40).unwrap();
        // not even `min` left: refused, reservation unchanged
        assert_eq!(c.grow(61, 80), None);
        assert_eq!(c.bytes(), 60);
        drop(d);
        assert_eq!(c.grow(61, 80), Some(80));
        // a lower reloaded limit refuses new growth, keeps what is held
        b.set_limit(50);
        assert!(b.reserve(1).is_none());
        assert_eq!(c.bytes(), 80);
        drop(c);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn fits_reserves_nothing() {
        let b = Budget::new(100);
        assert!(b.fits(100));
        assert_eq!(b.used(), 0);
        let _a = b.reserve(30).unwrap();
        assert!(b.fits(70));
        assert!(!b.fits(71));
        assert_eq!(b.used(), 30);
    }
}
