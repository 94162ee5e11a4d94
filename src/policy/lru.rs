//! A bounded map of limiter keys in least-recently-seen order. Every
//! operation is O(1): a hash map from key to slot, and the slots form a
//! doubly linked list (by index) from the most to the least recently seen.
//! When a limiter is full, a new key takes the place of an old, idle one
//! instead of sharing a bucket with every other new key (which would let a
//! flood of distinct keys refuse or lock out every new, legitimate client).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

const NIL: u32 = u32::MAX;

/// How many of the least recently seen keys are looked at for an idle one
/// before the least recently seen is evicted anyway (bounded work per new key).
const IDLE_SCAN: usize = 8;

/// Keys are already keyed SipHash values (process-random key, see
/// `PolicyState::hash`): hashing them again would only cost time.
#[derive(Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

struct Slot<V> {
    key: u64,
    prev: u32,
    next: u32,
    value: V,
}

pub struct Lru<V> {
    index: HashMap<u64, u32, BuildHasherDefault<KeyHasher>>,
    slots: Vec<Slot<V>>,
    /// Most recently seen.
    head: u32,
    /// Least recently seen.
    tail: u32,
}

impl<V> Default for Lru<V> {
    fn default() -> Self {
        Lru {
            index: HashMap::default(),
            slots: Vec::new(),
            head: NIL,
            tail: NIL,
        }
    }
}

impl<V> Lru<V> {
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The value, without counting this as seen.
    pub fn peek(&self, key: u64) -> Option<&V> {
        let i = *self.index.get(&key)?;
        Some(&self.slots[i as usize].value)
    }

    /// The value, now the most recently seen.
    pub fn get_mut(&mut self, key: u64) -> Option<&mut V> {
        let i = *self.index.get(&key)?;
        self.unlink(i);
        self.push_front(i);
        Some(&mut self.slots[i as usize].value)
    }

    /// Inserts or replaces `key` as the most recently seen. When this would
    /// exceed `max` keys, one old key goes first: the first idle one among the
    /// few least recently seen, else the least recently seen. Returns the
    /// evicted key's value and whether it was idle.
    pub fn insert(
        &mut self,
        key: u64,
        value: V,
        max: usize,
        idle: impl Fn(&V) -> bool,
    ) -> Option<(V, bool)> {
        if let Some(v) = self.get_mut(key) {
            *v = value;
            return None;
        }
        let mut evicted = None;
        if self.slots.len() >= max.max(1) {
            let mut at = self.tail;
            let mut victim = self.tail;
            let mut was_idle = false;
            for _ in 0..IDLE_SCAN {
                if at == NIL {
                    break;
                }
                if idle(&self.slots[at as usize].value) {
                    victim = at;
                    was_idle = true;
                    break;
                }
                at = self.slots[at as usize].prev;
            }
            evicted = self.remove_slot(victim).map(|v| (v, was_idle));
        }
        let i = self.slots.len() as u32;
        self.slots.push(Slot {
            key,
            prev: NIL,
            next: NIL,
            value,
        });
        self.index.insert(key, i);
        self.push_front(i);
        evicted
    }

    /// Keeps the keys for which `keep` is true (periodic housekeeping, O(n)),
    /// in their order, and returns memory when many went.
    pub fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        let mut at = self.tail;
        while at != NIL {
            let prev = self.slots[at as usize].prev;
            if !keep(&self.slots[at as usize].value) {
                // removing swaps the last slot into `at`; `prev` may be that slot
                let last = self.slots.len() as u32 - 1;
                self.remove_slot(at);
                at = if prev == last { at } else { prev };
                continue;
            }
            at = prev;
        }
        if self.slots.capacity() > 64 && self.slots.len() < self.slots.capacity() / 4 {
            self.slots.shrink_to_fit();
            self.index.shrink_to_fit();
        }
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let s = &self.slots[i as usize];
            (s.prev, s.next)
        };
        match prev {
            NIL => self.head = next,
            p => self.slots[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.slots[n as usize].prev = prev,
        }
    }

    fn push_front(&mut self, i: u32) {
        let old = self.head;
        {
            let s = &mut self.slots[i as usize];
            s.prev = NIL;
            s.next = old;
        }
        match old {
            NIL => self.tail = i,
            o => self.slots[o as usize].prev = i,
        }
        self.head = i;
    }

    /// Removes slot `i`; the last slot moves into its place (slots stay dense).
    fn remove_slot(&mut self, i: u32) -> Option<V> {
        if i == NIL || i as usize >= self.slots.len() {
            return None;
        }
        self.unlink(i);
        let last = self.slots.len() as u32 - 1;
        if i != last {
            self.slots.swap(i as usize, last as usize);
            // the last slot now lives at `i`: point its neighbours there
            let (prev, next, key) = {
                let s = &self.slots[i as usize];
                (s.prev, s.next, s.key)
            };
            match prev {
                NIL => self.head = i,
                p => self.slots[p as usize].next = i,
            }
            match next {
                NIL => self.tail = i,
                n => self.slots[n as usize].prev = i,
            }
            self.index.insert(key, i);
        }
        let s = self.slots.pop()?;
        self.index.remove(&s.key);
        Some(s.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(l: &Lru<u32>) -> Vec<u64> {
        let mut out = Vec::new();
        let mut at = l.head;
        while at != NIL {
            out.push(l.slots[at as usize].key);
            at = l.slots[at as usize].next;
        }
        out
    }

    #[test]
    fn evicts_least_recently_seen_prefers_idle() {
        let mut l = Lru::default();
        for k in 1..=4 {
            assert!(l.insert(k, 0u32, 4, |_| false).is_none());
        }
        assert_eq!(order(&l), vec![4, 3, 2, 1]);
        l.get_mut(1);
        assert_eq!(order(&l), vec![1, 4, 3, 2]);
        // nothing idle: the least recently seen goes
        assert_eq!(l.insert(5, 0, 4, |_| false), Some((0, false)));
        assert_eq!(order(&l), vec![5, 1, 4, 3]);
        assert!(l.peek(2).is_none());
        // an idle key near the end goes first
        *l.get_mut(4).unwrap() = 9;
        l.get_mut(5);
        l.get_mut(1);
        assert_eq!(order(&l), vec![1, 5, 4, 3]);
        assert_eq!(l.insert(6, 0, 4, |v| *v == 9), Some((9, true)));
        assert_eq!(order(&l), vec![6, 1, 5, 3]);
        assert_eq!(l.len(), 4);
        for k in [6, 1, 5, 3] {
            assert_eq!(
                l.index[&k] as usize,
                l.slots.iter().position(|s| s.key == k).unwrap()
            );
        }
    }

    #[test]
    fn matches_a_simple_model() {
        // model: keys most recent first
        let mut model: Vec<(u64, u32)> = Vec::new();
        let mut l = Lru::default();
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for step in 0..20_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let key = x % 40;
            match x % 7 {
                0 => {
                    l.get_mut(key);
                    if let Some(p) = model.iter().position(|e| e.0 == key) {
                        let e = model.remove(p);
                        model.insert(0, e);
                    }
                }
                1 if step % 50 == 0 => {
                    l.retain(|v| v % 2 == 0);
                    model.retain(|e| e.1 % 2 == 0);
                }
                _ => {
                    let idle = |v: &u32| v.is_multiple_of(5);
                    let got = l.insert(key, step, 16, idle);
                    if let Some(p) = model.iter().position(|e| e.0 == key) {
                        model.remove(p);
                        assert!(got.is_none());
                    } else if model.len() >= 16 {
                        let n = model.len();
                        let victim = (0..n.min(IDLE_SCAN))
                            .map(|j| n - 1 - j)
                            .find(|&j| idle(&model[j].1))
                            .unwrap_or(n - 1);
                        let e = model.remove(victim);
                        assert_eq!(got, Some((e.1, idle(&e.1))));
                    }
                    model.insert(0, (key, step));
                }
            }
            assert_eq!(order(&l), model.iter().map(|e| e.0).collect::<Vec<_>>());
            for (k, v) in &model {
                assert_eq!(l.peek(*k), Some(v));
            }
        }
    }

    #[test]
    fn retain_keeps_order_and_index() {
        let mut l = Lru::default();
        for k in 0..100u64 {
            l.insert(k, k as u32, 1000, |_| false);
        }
        l.retain(|v| v % 3 == 0);
        let o = order(&l);
        assert_eq!(o, (0..100).rev().filter(|k| k % 3 == 0).collect::<Vec<_>>());
        for k in o {
            assert_eq!(*l.peek(k).unwrap() as u64, k);
        }
        l.retain(|_| false);
        assert!(l.is_empty() && l.head == NIL && l.tail == NIL);
    }
}
