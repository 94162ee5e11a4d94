//! Session leases: a session admitted by a shared `concurrent` rule holds a
//! member in that key's sorted set, scored by its expiry. This instance keeps
//! its live leases in [`Live`] and renews them all every `lease_ttl / 3` in
//! one script call per chunk ([`refresh_loop`]), instead of a timer per
//! session. A session that ends gives its lease back; an instance that dies
//! stops renewing, and its leases expire within `lease_ttl`.

use super::redis::Store;
use super::Op;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Renewals per script call: a refresh never holds the store for long.
const CHUNK: usize = 500;

/// This instance's live leases: id → (key, member).
#[derive(Default)]
pub struct Live {
    next: AtomicU64,
    map: Mutex<HashMap<u64, (String, String)>>,
}

impl Live {
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A held lease; dropping it gives the lease back (in the background: the
/// session's end never waits for the store).
pub struct Lease {
    store: Arc<Store>,
    id: u64,
}

impl Store {
    /// Registers a lease the store granted (`Op::Lease` answered `Ok` for
    /// `key`, with the call's `member` token) for renewal until dropped.
    pub fn hold(self: &Arc<Self>, key: String, member: String) -> Lease {
        let id = self.live.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut m) = self.live.map.lock() {
            m.insert(id, (key, member));
        }
        Lease {
            store: self.clone(),
            id,
        }
    }

    /// Leases this instance holds now.
    pub fn live_leases(&self) -> usize {
        self.live.len()
    }

    /// Renews every live lease (chunks of [`CHUNK`] ops, each one call).
    pub async fn refresh(&self) -> Result<(), super::StoreError> {
        let ops: Vec<Op> = self
            .live
            .map
            .lock()
            .map(|m| {
                m.values()
                    .map(|(key, member)| Op::Renew {
                        key: key.clone(),
                        member: member.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        // a renewal may take longer than a session's `timeout`: nobody waits
        let within = (self.settings().lease_ttl / 3).max(self.settings().timeout);
        for chunk in ops.chunks(CHUNK) {
            self.run_within(chunk, "", within, "refresh").await?;
        }
        Ok(())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let taken = self
            .store
            .live
            .map
            .lock()
            .ok()
            .and_then(|mut m| m.remove(&self.id));
        let Some((key, member)) = taken else { return };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = self.store.clone();
        rt.spawn(async move {
            // when this fails the lease expires by its TTL instead
            let _ = store
                .run_within(
                    &[Op::Release { key, member }],
                    "",
                    store.settings().timeout,
                    "release",
                )
                .await;
        });
    }
}

/// Renews this instance's leases every `lease_ttl / 3` until `stop`.
pub async fn refresh_loop(store: Arc<Store>, mut stop: watch::Receiver<bool>) {
    let every = (store.settings().lease_ttl / 3).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {
                if !store.live.is_empty() {
                    // errors are counted and logged by the store; the next
                    // round tries again (leases outlive two missed rounds)
                    let _ = store.refresh().await;
                }
            }
            _ = stop.changed() => return,
        }
    }
}
