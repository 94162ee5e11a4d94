//! Idle SMTP backend connections kept between client sessions
//! (`backends.NAME.reuse`). Without it every client session costs the legacy
//! server a connection, a greeting, an EHLO and a QUIT; with it a session
//! that ends cleanly leaves its connection here, reset, for the next one.
//!
//! Only connections that carry nothing of their client are kept: the config
//! refuses `reuse` with the PROXY v2 identity (told once, when the
//! connection opens), a connection that relayed an AUTH (or had a command
//! refused: error counts are per connection) is never kept, and an open
//! transaction is RSET first (a connection whose RSET fails is closed). An
//! XCLIENT identity is told again, the next session's, before its first
//! command ([`SmtpBackend::identify`]); a connection that cannot be told it
//! is not used, and one whose backend stopped offering XCLIENT (Postfix
//! checks the told address against its authorized hosts) is not kept. A
//! kept connection is taken only while it is in step and open (nothing
//! unsolicited, no close seen); one that proves dead at its first command
//! (or its XCLIENT) is replaced by a fresh connection before the client
//! hears anything (`smtp/driver.rs`), so reuse never turns into a refusal
//! the client would not have had without it.
//!
//! The sweeper closes connections idle longer than `idle_timeout` (QUIT)
//! and sleeps until the next one is due, or, with none kept, until one is
//! (a gateway without `reuse` never wakes for it); the gateway's shutdown
//! closes the rest ([`SmtpPool::close_all`]).

use super::smtp::SmtpBackend;
use super::stream::BackendTls;
use super::{Backend, Deadlines};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
/// The RSET that cleans a released connection, and each QUIT, may take this
/// long (the client session is over; nobody waits for it longer).
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Which connections can stand in for each other: the same backend entry,
/// address, EHLO name, identity by XCLIENT or not, and TLS settings (a
/// reload that changes any of them closes the old connections,
/// [`SmtpPool::keep_only`]; every reload builds TLS settings anew, so it
/// closes a TLS backend's). The TLS settings are
/// the very ones of the config the connections were made with (compared by
/// address), held here: were they freed, a later reload's settings could
/// be allocated at that address and take the old connections.
#[derive(Debug, Clone)]
struct Key {
    name: String,
    address: String,
    helo: String,
    xclient: bool,
    tls: Option<Arc<BackendTls>>,
}

impl Key {
    fn of(b: &Backend) -> Self {
        Key {
            name: b.name.clone(),
            address: b.address.clone(),
            helo: b.helo_name.clone(),
            xclient: b.xclient,
            tls: b.tls.clone(),
        }
    }

    fn tls_ptr(&self) -> Option<*const BackendTls> {
        self.tls.as_ref().map(Arc::as_ptr)
    }
}

impl PartialEq for Key {
    fn eq(&self, o: &Self) -> bool {
        (
            &self.name,
            &self.address,
            &self.helo,
            self.xclient,
            self.tls_ptr(),
        ) == (&o.name, &o.address, &o.helo, o.xclient, o.tls_ptr())
    }
}

impl Eq for Key {}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        (
            &self.name,
            &self.address,
            &self.helo,
            self.xclient,
            self.tls_ptr(),
        )
            .hash(h)
    }
}

struct Idle {
    conn: SmtpBackend,
    until: Instant,
}

/// `conn` reset for the next client session, or the next part of this one
/// ([`SmtpBackend::reset`], within [`CLOSE_WAIT`]); `None` when it was not
/// clean (its state is unknown: closed with QUIT) or did not answer in time
/// (dropped).
async fn cleaned(mut conn: SmtpBackend) -> Option<SmtpBackend> {
    match tokio::time::timeout(CLOSE_WAIT, conn.reset()).await {
        Ok(true) => Some(conn),
        Ok(false) => {
            conn.quit().await;
            None
        }
        Err(_) => None,
    }
}

/// The idle connections, and when the sweeper will look next (`None`: it
/// waits for a connection to be kept), under one lock: a release that
/// expires before that time wakes it, and only such a release does (with
/// one `idle_timeout`, when the pool was empty), so sessions do not wake
/// it on their way out.
#[derive(Default)]
struct Lists {
    lists: HashMap<Key, Vec<Idle>>,
    armed: Option<Instant>,
    /// Since a reload, the keys its backends take (`None`: no reload yet):
    /// a session begun before it releases its connection under the old
    /// settings, which nobody takes any more.
    current: Option<Vec<Key>>,
}

/// The process's idle SMTP backend connections, per backend.
#[derive(Default)]
pub struct SmtpPool {
    idle: Mutex<Lists>,
    /// Set at shutdown: sessions still ending close their connections.
    closed: std::sync::atomic::AtomicBool,
    /// A connection was kept: the sweeper's next wake may be earlier.
    kept: Notify,
    /// Times the sweeper woke (tests: it must not wake while nothing is kept).
    wakes: std::sync::atomic::AtomicU64,
}

impl SmtpPool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Lists> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Idle connections held for `b` now.
    pub fn idle(&self, b: &Backend) -> usize {
        self.lock().lists.get(&Key::of(b)).map_or(0, Vec::len)
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
        let list = map.lists.get_mut(&Key::of(b))?;
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
    pub async fn release(&self, b: &Backend, conn: SmtpBackend) {
        let r = b.reuse;
        // one key per release: it clones the backend's names
        let key = Key::of(b);
        let room = || self.lock().lists.get(&key).map_or(0, Vec::len) < r.max_idle;
        let closed = self.closed.load(std::sync::atomic::Ordering::Relaxed);
        if closed || r.max_idle == 0 || !conn.reusable(r.max_sessions) || !room() {
            conn.quit().await;
            return;
        }
        let Some(conn) = cleaned(conn).await else {
            return;
        };
        let refused = {
            let mut map = self.lock();
            // shutdown (or a reload) may have begun during the RSET
            let wanted = map.current.as_ref().is_none_or(|c| c.contains(&key))
                && !self.closed.load(std::sync::atomic::Ordering::Relaxed);
            if wanted && map.lists.get(&key).map_or(0, Vec::len) < r.max_idle {
                let until = Instant::now() + r.idle_timeout;
                map.lists.entry(key).or_default().push(Idle { conn, until });
                if map.armed.is_none_or(|at| until < at) {
                    map.armed = Some(until);
                    self.kept.notify_one();
                }
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

    /// A reload: idle connections no backend of the new configuration can
    /// take (another address, EHLO name or TLS settings, a backend gone, or
    /// `reuse` turned off) are closed with QUIT now rather than at the end
    /// of their idle time, and so are those that sessions begun before it
    /// release later; a lowered `max_idle` closes the oldest beyond it.
    pub fn keep_only<'a>(&self, backends: impl IntoIterator<Item = &'a Backend>) {
        let mut room: Vec<(Key, usize)> = Vec::new();
        for b in backends.into_iter().filter(|b| b.reuse.max_idle > 0) {
            let key = Key::of(b);
            if !room.iter().any(|(k, _)| *k == key) {
                room.push((key, b.reuse.max_idle));
            }
        }
        let gone: Vec<SmtpBackend> = {
            let mut map = self.lock();
            map.current = Some(room.iter().map(|(k, _)| k.clone()).collect());
            let mut gone = Vec::new();
            map.lists.retain(|k, list| {
                let max = room.iter().find(|(r, _)| r == k).map_or(0, |(_, m)| *m);
                // the oldest first: `take` serves from the end
                let over = list.len().saturating_sub(max);
                gone.extend(list.drain(..over).map(|i| i.conn));
                !list.is_empty()
            });
            gone
        };
        for conn in gone {
            tokio::spawn(conn.quit());
        }
    }

    /// Takes out every connection idle past its time (all at `shutdown`).
    fn expired(&self, now: Instant, all: bool) -> Vec<SmtpBackend> {
        let mut out = Vec::new();
        let mut map = self.lock();
        for list in map.lists.values_mut() {
            let (gone, keep): (Vec<Idle>, Vec<Idle>) =
                list.drain(..).partition(|i| all || i.until <= now);
            *list = keep;
            out.extend(gone.into_iter().map(|i| i.conn));
        }
        map.lists.retain(|_, l| !l.is_empty());
        out
    }

    /// The session goes on after the client's STARTTLS (RFC 3207: it starts
    /// afresh): a connection that carries nothing of its first part (no
    /// AUTH, nothing refused) serves its second part too, reset like a
    /// released one, without a trip through the pool (it is the same client
    /// session: not counted again toward `max_sessions`, nor as reused, and
    /// kept on its last allowed session too). Others are closed: `None`.
    pub async fn restart(&self, b: &Backend, conn: SmtpBackend) -> Option<SmtpBackend> {
        // not `reusable`: this session was counted toward `max_sessions`
        // when it took the connection, and may finish on it
        if b.reuse.max_idle == 0 || !conn.clean_slate() {
            conn.quit().await;
            return None;
        }
        let mut conn = cleaned(conn).await?;
        // the backend was told the pre-TLS HELO (XCLIENT)
        conn.restarted();
        Some(conn)
    }

    /// When the next kept connection's idle time ends, which is when the
    /// sweeper looks next (releases compare against it).
    fn arm(&self) -> Option<Instant> {
        let mut map = self.lock();
        map.armed = map.lists.values().flatten().map(|i| i.until).min();
        map.armed
    }

    /// Closes idle connections past their `idle_timeout` until shutdown,
    /// waking when the earliest is due and not at all while none is kept.
    pub async fn sweep(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let due = self.arm();
            tokio::select! {
                _ = async {
                    match due {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {}
                // a kept connection may expire before `due` (another
                // backend's shorter idle_timeout): look again
                _ = self.kept.notified() => {}
                _ = shutdown.changed() => return,
            }
            self.wakes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

    /// A gateway whose backends keep nothing does not wake for the pool:
    /// the sweeper of an empty pool sleeps until a connection is kept.
    #[tokio::test(start_paused = true)]
    async fn the_sweeper_of_an_empty_pool_sleeps() {
        let pool = Arc::new(SmtpPool::default());
        let (stop, rx) = watch::channel(false);
        let sweeper = tokio::spawn(pool.clone().sweep(rx));
        // paused time jumps to each timer the sweeper sets
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(pool.wakes.load(std::sync::atomic::Ordering::Relaxed), 0);
        stop.send(true).unwrap();
        sweeper.await.unwrap();
    }

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

    /// A connection told a client's identity by XCLIENT never serves a
    /// backend entry that tells none (a reload that drops `xclient`), nor
    /// the other way round: the key tells them apart.
    #[test]
    fn keys_tell_apart_identity_by_xclient() {
        let yaml = |id: &str| {
            format!("backends:\n  a: {{ address: \"127.0.0.1:1\", {id}reuse: {{}} }}\nlisteners:\n  - {{ name: mx, protocol: smtp, bind: \"127.0.0.1:25\", tls: none, backend: a }}\n")
        };
        let load = |id: &str| crate::config::load_str("k.yaml", &yaml(id)).unwrap();
        let (told, plain) = (load("identity: [xclient], "), load(""));
        assert_ne!(
            Key::of(&told.listeners[0].backend),
            Key::of(&plain.listeners[0].backend)
        );
    }
}
