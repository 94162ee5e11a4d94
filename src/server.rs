//! Listeners and sessions: bind every configured listener, accept with
//! TCP_NODELAY, apply the policy's connect stage (deny list, connection rate,
//! concurrent sessions) and the listener's connection cap with a proper reply,
//! spawn one task per session, reload atomically, and drain on shutdown (idle
//! sessions get 421 / -ERR at once; running transactions get `shutdown_grace`).

use crate::backend::probe::{self, CapsCache};
use crate::config::{Config, Listener, Protocol};
use crate::policy::action::Action;
use crate::policy::{ConnectPermit, Decision, Facts, Policies, Policy, PolicyState};
use arc_swap::ArcSwap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tracing::{info, warn};

/// One listener's configuration snapshot: what a new session loads once at
/// accept and keeps for its whole life (across STARTTLS). Reload swaps it.
pub struct ListenerRuntime {
    pub listener: Arc<Listener>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub policy: Option<Arc<Policy>>,
}

/// What one session needs, loaded once at accept and kept for its lifetime.
#[derive(Clone)]
pub struct SessionCtx {
    pub listener: Arc<Listener>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub policy: Option<Arc<Policy>>,
    pub caps: Arc<CapsCache>,
    pub shutdown: watch::Receiver<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("listener {name}: cannot bind {addr}: {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

struct Slot {
    name: String,
    addr: SocketAddr,
    runtime: Arc<ArcSwap<ListenerRuntime>>,
    permits: Arc<Semaphore>,
    max: u32,
}

/// A running gateway: its bound addresses and handles to reload and stop it.
pub struct Gateway {
    slots: Vec<Slot>,
    shutdown: watch::Sender<bool>,
    accept_tasks: Vec<tokio::task::JoinHandle<()>>,
    grace: std::sync::Mutex<Duration>,
    pub caps: Arc<CapsCache>,
    pub policy_state: Arc<PolicyState>,
}

fn tls_config(config: &Config) -> Result<Option<Arc<rustls::ServerConfig>>, ServerError> {
    Ok(if config.certificates.is_empty() {
        None
    } else {
        Some(crate::tls::server_config(&config.certificates)?)
    })
}

fn runtime_for(
    l: &Arc<Listener>,
    tls: &Option<Arc<rustls::ServerConfig>>,
    policies: &Policies,
) -> ListenerRuntime {
    ListenerRuntime {
        listener: l.clone(),
        tls: tls.clone(),
        policy: l.policy.as_ref().and_then(|p| policies.get(&p.name)),
    }
}

impl Gateway {
    /// Binds everything first (so a config that cannot bind fails before any
    /// client is accepted), probes SMTP backends once, then starts accepting.
    pub async fn start(config: &Config) -> Result<Gateway, ServerError> {
        let tls = tls_config(config)?;
        let policy_state = PolicyState::new();
        let policies = Policies::compile(&config.policies, &policy_state);
        let mut bound = Vec::new();
        for l in &config.listeners {
            let socket = bind(l.bind).map_err(|source| ServerError::Bind {
                name: l.name.clone(),
                addr: l.bind,
                source,
            })?;
            bound.push((l.clone(), socket));
        }
        let caps = Arc::new(CapsCache::default());
        let (shutdown, rx) = watch::channel(false);
        let mut smtp_backends: Vec<(Arc<crate::config::Backend>, crate::config::Timeouts)> =
            Vec::new();
        for l in config
            .listeners
            .iter()
            .filter(|l| l.protocol == Protocol::Smtp)
        {
            if !smtp_backends.iter().any(|(b, _)| b.name == l.backend.name) {
                smtp_backends.push((l.backend.clone(), l.timeouts.clone()));
            }
        }
        for (b, t) in &smtp_backends {
            caps.probe(b, t).await;
        }
        tokio::spawn(probe::refresh_loop(
            caps.clone(),
            smtp_backends,
            Duration::from_secs(60),
            rx.clone(),
        ));
        tokio::spawn(housekeeping(policy_state.clone(), rx.clone()));
        let mut slots = Vec::new();
        let mut accept_tasks = Vec::new();
        for (l, socket) in bound {
            let addr = socket.local_addr().unwrap_or(l.bind);
            info!(listener = %l.name, %addr, protocol = ?l.protocol, tls = ?l.tls, backend = %l.backend.address, "listening");
            let runtime = Arc::new(ArcSwap::from_pointee(runtime_for(&l, &tls, &policies)));
            let permits = Arc::new(Semaphore::new(l.max_connections));
            accept_tasks.push(tokio::spawn(accept_loop(
                socket,
                permits.clone(),
                runtime.clone(),
                caps.clone(),
                rx.clone(),
            )));
            slots.push(Slot {
                name: l.name.clone(),
                addr,
                runtime,
                permits,
                max: l.max_connections as u32,
            });
        }
        Ok(Gateway {
            slots,
            shutdown,
            accept_tasks,
            grace: std::sync::Mutex::new(config.shutdown_grace),
            caps,
            policy_state,
        })
    }

    /// Applies a new, already validated configuration to new sessions:
    /// listener settings, policies (limiter state kept for unchanged rules) and
    /// certificates. Sessions in progress keep their snapshot. Listeners whose
    /// bind address or protocol changed, and added or removed listeners, need
    /// a restart; they are reported and left as they are. On a certificate
    /// error nothing is applied.
    pub fn reload(&self, config: &Config) -> Result<Vec<String>, ServerError> {
        let tls = tls_config(config)?;
        let policies = Policies::compile(&config.policies, &self.policy_state);
        let mut notes = Vec::new();
        for slot in &self.slots {
            let old = slot.runtime.load();
            match config.listeners.iter().find(|l| l.name == slot.name) {
                Some(l)
                    if l.bind == old.listener.bind
                        && l.protocol == old.listener.protocol
                        && l.max_connections == old.listener.max_connections =>
                {
                    slot.runtime
                        .store(Arc::new(runtime_for(l, &tls, &policies)));
                }
                Some(l) => notes.push(format!(
                    "listener {}: bind, protocol or max_connections changed; restart to apply",
                    l.name
                )),
                None => notes.push(format!(
                    "listener {} was removed; restart to apply",
                    slot.name
                )),
            }
        }
        for l in &config.listeners {
            if !self.slots.iter().any(|s| s.name == l.name) {
                notes.push(format!("listener {} is new; restart to apply", l.name));
            }
        }
        if let Ok(mut g) = self.grace.lock() {
            *g = config.shutdown_grace;
        }
        Ok(notes)
    }

    /// The address a listener is bound to (useful with port 0 in tests).
    pub fn addr(&self, listener: &str) -> Option<SocketAddr> {
        self.slots
            .iter()
            .find(|s| s.name == listener)
            .map(|s| s.addr)
    }

    pub fn addrs(&self) -> Vec<(String, SocketAddr)> {
        self.slots
            .iter()
            .map(|s| (s.name.clone(), s.addr))
            .collect()
    }

    /// The policy currently applied to new sessions of a listener.
    pub fn policy(&self, listener: &str) -> Option<Arc<Policy>> {
        self.slots
            .iter()
            .find(|s| s.name == listener)
            .and_then(|s| s.runtime.load().policy.clone())
    }

    /// Stops accepting, tells idle sessions to go, and waits up to the grace
    /// period for running ones. Returns the number of sessions still running
    /// when the grace period ended (they are dropped with the runtime).
    pub async fn shutdown(self) -> usize {
        let _ = self.shutdown.send(true);
        for t in &self.accept_tasks {
            t.abort();
        }
        let grace = self
            .grace
            .lock()
            .map(|g| *g)
            .unwrap_or(Duration::from_secs(30));
        let deadline = tokio::time::Instant::now() + grace;
        let mut left = 0;
        for s in &self.slots {
            if tokio::time::timeout_at(deadline, s.permits.acquire_many(s.max))
                .await
                .is_err()
            {
                left += s.max as usize - s.permits.available_permits();
            }
        }
        left
    }
}

async fn housekeeping(state: Arc<PolicyState>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10)) => state.housekeeping(),
            _ = stop.changed() => return,
        }
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

async fn accept_loop(
    socket: TcpListener,
    permits: Arc<Semaphore>,
    runtime: Arc<ArcSwap<ListenerRuntime>>,
    caps: Arc<CapsCache>,
    shutdown: watch::Receiver<bool>,
) {
    let mut stop = shutdown.clone();
    loop {
        let (tcp, peer) = tokio::select! {
            r = socket.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let rt = runtime.load_full();
        let l = &rt.listener;
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                warn!(listener = %l.name, %peer, limit = l.max_connections, "connection limit reached");
                tokio::spawn(refuse(tcp, l.protocol, Action::Tempfail));
                continue;
            }
        };
        let policy_permit: Option<ConnectPermit> = match &rt.policy {
            None => None,
            Some(p) => match p.connect(&Facts::new(peer.ip(), &l.name)) {
                Ok(permit) => Some(permit),
                Err(Decision::Refuse { action, .. }) => {
                    tokio::spawn(refuse(tcp, l.protocol, action));
                    continue;
                }
                Err(_) => None,
            },
        };
        let ctx = SessionCtx {
            listener: rt.listener.clone(),
            tls: rt.tls.clone(),
            policy: rt.policy.clone(),
            caps: caps.clone(),
            shutdown: shutdown.clone(),
        };
        tokio::spawn(async move {
            // tarpit (`action: delay`) before the greeting
            if let Some(d) = policy_permit
                .as_ref()
                .map(|p| p.delay)
                .filter(|d| !d.is_zero())
            {
                tokio::time::sleep(d).await;
            }
            match ctx.listener.protocol {
                Protocol::Smtp => crate::smtp::driver::run(tcp, peer, ctx).await,
                Protocol::Pop3 => crate::pop3::driver::run(tcp, peer, ctx).await,
            }
            drop(policy_permit);
            drop(permit);
        });
    }
}

/// A one-line answer in plaintext before closing (even on implicit-TLS
/// listeners: no handshake is spent on a connection that is turned away).
async fn refuse(mut tcp: TcpStream, protocol: Protocol, action: Action) {
    let line: Vec<u8> = match (protocol, action) {
        (Protocol::Smtp, Action::Reject) => crate::smtp::reply::denied().to_bytes(),
        (Protocol::Smtp, _) => crate::smtp::reply::too_many_connections().to_bytes(),
        (Protocol::Pop3, Action::Reject) => b"-ERR [AUTH] Access denied\r\n".to_vec(),
        (Protocol::Pop3, _) => {
            b"-ERR [SYS/TEMP] Too many connections, try again later\r\n".to_vec()
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = tcp.write_all(&line).await;
        let _ = tcp.shutdown().await;
    })
    .await;
}
