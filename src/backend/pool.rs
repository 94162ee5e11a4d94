//! Idle SMTP backend connections kept between client sessions
//! (`backends.NAME.reuse`). Without it every client session costs the legacy
//! server a connection, a greeting, an EHLO and a QUIT; with it a session
//! that ends cleanly leaves its connection here, reset, for the next one.
//!
//! Only connections that carry nothing of their client are kept: the config
//! refuses `reuse` with XCLIENT or PROXY v2 identities, a connection that
//! relayed an AUTH (or had a command refused: error counts are per
//! connection) is never kept, and an open transaction is RSET first (a
//! connection whose RSET fails is closed). A kept connection is taken only
//! while it is in step and open (nothing unsolicited, no close seen); one
//! that proves dead at its first command is replaced by a fresh connection
//! before the client hears anything (`smtp/driver.rs`), so reuse never turns
//! into a refusal the client would not have had without it.
//!
//! The sweeper closes connections idle longer than `idle_timeout` (QUIT);
//! the gateway's shutdown closes the rest ([`SmtpPool::close_all`]).

use super::smtp::SmtpBackend;
use super::stream::BackendTls;
use super::{Backend, Deadlines};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How often the sweeper looks for connections past their idle time.
const SWEEP: Duration = Duration::from_millis(500);
/// The RSET that cleans a released connection, and each QUIT, may take this
/// long (the client session is over; nobody waits for it longer).
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Which connections can stand in for each other: the same backend entry,
/// address, EHLO name and TLS settings (a reload that changes any of them
/// leaves the old connections to expire unused). The TLS settings are the
/// very ones of the config the connections were made with (compared by
/// address), held here: were they freed, a later reload's settings could
/// be allocated at that address and take the old connections.
#[derive(Debug, Clone)]
struct Key {
    name: String,
    address: String,
    helo: String,
    tls: Option<Arc<BackendTls>>,
}

impl Key {
    fn of(b: &Backend) -> Self {
        Key {
            name: b.name.clone(),
            address: b.address.clone(),
            helo: b.helo_name.clone(),
            tls: b.tls.clone(),
        }
    }

    fn tls_ptr(&self) -> Option<*const BackendTls> {
        self.tls.as_ref().map(Arc::as_ptr)
    }
}

impl PartialEq for Key {
    fn eq(&self, o: &Self) -> bool {
        (&self.name, &self.address, &self.helo, self.tls_ptr())
            == (&o.name, &o.address, &o.helo, o.tls_ptr())
    }
}

impl Eq for Key {}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        (&self.name, &self.address, &self.helo, self.tls_ptr()).hash(h)
    }
}

struct Idle {
    conn: SmtpBackend,
    until: Instant,
}

/// The process's idle SMTP backend connections, per backend.
#[derive(Default)]
pub struct SmtpPool {
    idle: Mutex<HashMap<Key, Vec<Idle>>>,
    /// Set at shutdown: sessions still ending close their connections.
    closed: std::sync::atomic::AtomicBool,
}

impl SmtpPool {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Vec<Idle>>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Idle connections held for `b` now.
    pub fn idle(&self, b: &Backend) -> usize {
        self.lock().get(&Key::of(b)).map_or(0, Vec::len)
    }

    /// The most recently released connection for `b` still within its idle
    /// time (the warmest one; older ones expire first), marked as reused,
    /// with the taking session's deadlines `t`. The caller checks that it
    /// is still in step before using it ([`SmtpBackend::idle_ready`]).
    pub fn take(&self, b: &Backend, t: &Deadlines) -> Option<SmtpBackend> {
        if b.reuse.max_idle == 0 {
            return None;
        }
        let now = Instant::now();
        let mut map = self.lock();
        let list = map.get_mut(&Key::of(b))?;
        while let Some(idle) = list.pop() {
            if idle.until > now {
                let mut conn = idle.conn;
                conn.taken_for_reuse(t);
                return Some(conn);
            }
            // past its idle time (the sweeper has not come by yet): closed
            tokio::spawn(idle.conn.quit());
        }
        None
    }

    /// The end of a client session: `conn` is kept for the next one when
    /// `b.reuse` allows it and it can be cleaned (RSET of an open
    /// transaction, nothing unread), else it is closed with QUIT.
    pub async fn release(&self, b: &Backend, mut conn: SmtpBackend) {
        let r = b.reuse;
        let room = || self.idle(b) < r.max_idle;
        let closed = self.closed.load(std::sync::atomic::Ordering::Relaxed);
        if closed || r.max_idle == 0 || !conn.reusable(r.max_sessions) || !room() {
            conn.quit().await;
            return;
        }
        match tokio::time::timeout(CLOSE_WAIT, conn.reset()).await {
            Ok(true) => {}
            // not clean: its state is unknown, so it is not handed on
            Ok(false) => {
                conn.quit().await;
                return;
            }
            Err(_) => return,
        }
        let refused = {
            let mut map = self.lock();
            let list = map.entry(Key::of(b)).or_default();
            // shutdown may have begun during the RSET
            if list.len() < r.max_idle && !self.closed.load(std::sync::atomic::Ordering::Relaxed) {
                list.push(Idle {
                    conn,
                    until: Instant::now() + r.idle_timeout,
                });
                None
            } else {
                Some(conn)
            }
        };
        // filled up by other sessions meanwhile
        if let Some(conn) = refused {
            conn.quit().await;
        }
    }

    /// Takes out every connection idle past its time (all at `shutdown`).
    fn expired(&self, now: Instant, all: bool) -> Vec<SmtpBackend> {
        let mut out = Vec::new();
        let mut map = self.lock();
        for list in map.values_mut() {
            let (gone, keep): (Vec<Idle>, Vec<Idle>) =
                list.drain(..).partition(|i| all || i.until <= now);
            *list = keep;
            out.extend(gone.into_iter().map(|i| i.conn));
        }
        map.retain(|_, l| !l.is_empty());
        out
    }

    /// Closes idle connections past their `idle_timeout` until shutdown.
    pub async fn sweep(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(SWEEP) => {}
                _ = shutdown.changed() => return,
            }
            for conn in self.expired(Instant::now(), false) {
                tokio::spawn(conn.quit());
            }
        }
    }

    /// Shutdown: every idle connection is closed with QUIT (waited for, up
    /// to [`CLOSE_WAIT`]), and connections released from now on are too.
    pub async fn close_all(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let mut quits = tokio::task::JoinSet::new();
        for conn in self.expired(Instant::now(), true) {
            quits.spawn(conn.quit());
        }
        let all = async { while quits.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(CLOSE_WAIT, all).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reload's TLS settings never pass for those of kept connections:
    /// the key holds the settings it was made from (so their address stays
    /// theirs) and tells apart settings built alike.
    #[test]
    fn keys_hold_and_tell_apart_tls_settings() {
        let yaml = "backends:\n  a: { address: \"127.0.0.1:1\", tls: starttls, pin_sha256: [\"0000000000000000000000000000000000000000000000000000000000000000\"], reuse: {} }\nlisteners:\n  - { name: mx, protocol: smtp, bind: \"127.0.0.1:25\", tls: none, backend: a }\n";
        let load = || crate::config::load_str("k.yaml", yaml).unwrap();
        let (old, new) = (load(), load());
        let key = Key::of(&old.listeners[0].backend);
        let settings = Arc::downgrade(old.listeners[0].backend.tls.as_ref().unwrap());
        assert_ne!(key, Key::of(&new.listeners[0].backend));
        assert_eq!(key, Key::of(&old.listeners[0].backend));
        drop(old);
        assert!(settings.upgrade().is_some(), "freed while a key names them");
    }
}
