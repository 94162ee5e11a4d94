//! Listeners and sessions: bind every configured listener, accept with
//! TCP_NODELAY, apply the policy's connect stage (deny list, connection rate,
//! concurrent sessions) and the listener's connection cap with a proper reply,
//! spawn one task per session, reload atomically, and drain on shutdown (idle
//! sessions get 421 / -ERR at once; running transactions get `shutdown_grace`).

use crate::backend::probe::{self, CapsCache};
use crate::config::{Config, Listener, Protocol};
use crate::observe::http::ReadyCheck;
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
    /// SPF/DKIM/DMARC verifier (one per configuration; its DNS cache is shared).
    pub verifier: Option<Arc<crate::auth::Verifier>>,
}

/// What one session needs, loaded once at accept and kept for its lifetime.
#[derive(Clone)]
pub struct SessionCtx {
    pub listener: Arc<Listener>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub policy: Option<Arc<Policy>>,
    pub verifier: Option<Arc<crate::auth::Verifier>>,
    pub caps: Arc<CapsCache>,
    pub shutdown: watch::Receiver<bool>,
    /// The address the client connected to (from PROXY when a balancer sent one).
    pub local: SocketAddr,
    /// Process-wide budget for message bytes in flight (`server.max_inflight_data`).
    pub inflight: Arc<crate::smtp::inflight::Budget>,
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
    #[error("DNS resolver: {0}")]
    Dns(String),
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
    metrics_addr: Option<SocketAddr>,
    /// Certificate files the watcher checks (updated by reload).
    cert_paths: Arc<std::sync::Mutex<Vec<(std::path::PathBuf, std::path::PathBuf)>>>,
    pub inflight: Arc<crate::smtp::inflight::Budget>,
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
    verifier: &Option<Arc<crate::auth::Verifier>>,
) -> ListenerRuntime {
    let policy = l.policy.as_ref().and_then(|p| policies.get(&p.name));
    let wants_auth = policy.as_ref().is_some_and(|p| p.spec().auth.is_some());
    ListenerRuntime {
        listener: l.clone(),
        tls: tls.clone(),
        policy,
        verifier: if wants_auth { verifier.clone() } else { None },
    }
}

/// One verifier (resolver + cache) when any policy checks SPF/DKIM/DMARC/ARC.
fn verifier_for(config: &Config) -> Result<Option<Arc<crate::auth::Verifier>>, ServerError> {
    if !config.policies.values().any(|p| p.auth.is_some()) {
        return Ok(None);
    }
    crate::auth::Verifier::new(&config.dns)
        .map(|v| Some(Arc::new(v)))
        .map_err(|e| ServerError::Dns(e.to_string()))
}

impl Gateway {
    /// Binds everything first (so a config that cannot bind fails before any
    /// client is accepted), probes SMTP backends once, then starts accepting.
    pub async fn start(config: &Config) -> Result<Gateway, ServerError> {
        let tls = tls_config(config)?;
        let verifier = verifier_for(config)?;
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
        let inflight = crate::smtp::inflight::Budget::new(config.max_inflight_data);
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
        let mut metrics_addr = None;
        if let Some(addr) = config.metrics_bind {
            let listener =
                crate::observe::http::bind(addr)
                    .await
                    .map_err(|source| ServerError::Bind {
                        name: "metrics".into(),
                        addr,
                        source,
                    })?;
            let backends: Vec<String> = config
                .backends
                .values()
                .map(|b| b.address.clone())
                .collect();
            let ready: ReadyCheck = Arc::new(move || {
                let backends = backends.clone();
                Box::pin(async move {
                    for b in backends {
                        let ok =
                            tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(&b))
                                .await;
                        if !matches!(ok, Ok(Ok(_))) {
                            return Err(format!("backend {b} unreachable"));
                        }
                    }
                    Ok(())
                })
            });
            metrics_addr = listener.local_addr().ok();
            tokio::spawn(crate::observe::http::serve(listener, ready, rx.clone()));
        }
        let mut slots = Vec::new();
        let mut accept_tasks = Vec::new();
        for (l, socket) in bound {
            let addr = socket.local_addr().unwrap_or(l.bind);
            info!(listener = %l.name, %addr, protocol = ?l.protocol, tls = ?l.tls, backend = %l.backend.address, "listening");
            let runtime = Arc::new(ArcSwap::from_pointee(runtime_for(
                &l, &tls, &policies, &verifier,
            )));
            let permits = Arc::new(Semaphore::new(l.max_connections));
            accept_tasks.push(tokio::spawn(accept_loop(
                socket,
                permits.clone(),
                runtime.clone(),
                caps.clone(),
                rx.clone(),
                inflight.clone(),
            )));
            slots.push(Slot {
                name: l.name.clone(),
                addr,
                runtime,
                permits,
                max: l.max_connections as u32,
            });
        }
        let cert_paths = Arc::new(std::sync::Mutex::new(config.certificates.clone()));
        let runtimes: Vec<_> = slots.iter().map(|s| s.runtime.clone()).collect();
        tokio::spawn(watch_certificates(
            cert_paths.clone(),
            runtimes,
            Duration::from_secs(2),
            rx.clone(),
        ));
        Ok(Gateway {
            slots,
            shutdown,
            accept_tasks,
            grace: std::sync::Mutex::new(config.shutdown_grace),
            caps,
            policy_state,
            metrics_addr,
            cert_paths,
            inflight,
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
        let verifier = verifier_for(config)?;
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
                        .store(Arc::new(runtime_for(l, &tls, &policies, &verifier)));
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
        self.inflight.set_limit(config.max_inflight_data);
        if let Ok(mut p) = self.cert_paths.lock() {
            *p = config.certificates.clone();
        }
        Ok(notes)
    }

    /// Where `/metrics` is served, when configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
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

/// Swaps in new certificates when their files change (checked by mtime and
/// size every `every`): new handshakes use them, running sessions keep theirs.
/// A file that does not load is logged and the current certificates stay.
async fn watch_certificates(
    paths: Arc<std::sync::Mutex<Vec<(std::path::PathBuf, std::path::PathBuf)>>>,
    runtimes: Vec<Arc<ArcSwap<ListenerRuntime>>>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    fn stamp(
        files: &[(std::path::PathBuf, std::path::PathBuf)],
    ) -> Vec<Option<(std::time::SystemTime, u64)>> {
        files
            .iter()
            .flat_map(|(c, k)| [c, k])
            .map(|p| {
                std::fs::metadata(p)
                    .ok()
                    .and_then(|m| Some((m.modified().ok()?, m.len())))
            })
            .collect()
    }
    let mut last_paths = paths.lock().map(|p| p.clone()).unwrap_or_default();
    let mut last = stamp(&last_paths);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        let current = paths.lock().map(|p| p.clone()).unwrap_or_default();
        if current.is_empty() {
            continue;
        }
        let now = stamp(&current);
        if current == last_paths && now == last {
            continue;
        }
        // a writer may be midway: wait one more round for the files to settle
        tokio::time::sleep(Duration::from_millis(200)).await;
        let settled = stamp(&current);
        if settled != now {
            continue;
        }
        match crate::tls::server_config(&current) {
            Ok(cfg) => {
                for rt in &runtimes {
                    let old = rt.load();
                    if old.tls.is_some() {
                        rt.store(Arc::new(ListenerRuntime {
                            listener: old.listener.clone(),
                            tls: Some(cfg.clone()),
                            policy: old.policy.clone(),
                            verifier: old.verifier.clone(),
                        }));
                    }
                }
                info!(files = current.len(), "certificates reloaded");
            }
            Err(e) => {
                warn!(error = %e, "new certificate files do not load; keeping the current certificates")
            }
        }
        last_paths = current;
        last = settled;
    }
}

async fn housekeeping(state: Arc<PolicyState>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10)) => {
                state.housekeeping();
                release_free_memory();
            }
            _ = stop.changed() => return,
        }
    }
}

/// Gives memory freed by ended sessions back to the OS. glibc keeps freed
/// heap memory of its per-thread arenas until trimmed, so after a burst of
/// connections (a flood, a slowloris wave) RSS would stay at the peak.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own allocator state; it takes no
    // pointers from us and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
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
    inflight: Arc<crate::smtp::inflight::Budget>,
) {
    let mut stop = shutdown.clone();
    let local = socket.local_addr().ok();
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
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let l = &rt.listener;
                warn!(listener = %l.name, %peer, limit = l.max_connections, "connection limit reached");
                crate::observe::metrics().refused(&l.name, "max_connections");
                tokio::spawn(refuse(tcp, l.protocol, Action::Tempfail));
                continue;
            }
        };
        let ctx = SessionCtx {
            listener: rt.listener.clone(),
            tls: rt.tls.clone(),
            policy: rt.policy.clone(),
            verifier: rt.verifier.clone(),
            caps: caps.clone(),
            shutdown: shutdown.clone(),
            local: local.unwrap_or(rt.listener.bind),
            inflight: inflight.clone(),
        };
        tokio::spawn(async move {
            connection(tcp, peer, ctx).await;
            drop(permit);
        });
    }
}

/// One accepted connection: PROXY header (from trusted balancers only), the
/// policy's connect stage with the real client address, then the protocol.
async fn connection(mut tcp: TcpStream, mut peer: SocketAddr, mut ctx: SessionCtx) {
    let l = ctx.listener.clone();
    if let Some((trusted, deadline)) = &l.proxy_trusted {
        if !trusted.iter().any(|n| n.contains(peer.ip())) {
            warn!(listener = %l.name, %peer, "connection from an untrusted peer on a PROXY protocol listener closed");
            crate::observe::metrics().refused(&l.name, "proxy_untrusted");
            return;
        }
        match crate::transport::read_proxy_header(&mut tcp, *deadline, l.proxy_allow_local).await {
            Ok(Some((source, destination))) => {
                info!(listener = %l.name, balancer = %peer, client = %source, "PROXY header");
                peer = source;
                ctx.local = destination;
            }
            // LOCAL/UNKNOWN, accepted only with `allow_local`: the
            // balancer's own health check, run as the balancer's address
            Ok(None) => {}
            Err(e) => {
                warn!(listener = %l.name, %peer, error = %e, "PROXY header missing or malformed; closed");
                crate::observe::metrics().refused(&l.name, "proxy_invalid");
                return;
            }
        }
    }
    let permit: Option<ConnectPermit> = match &ctx.policy {
        None => None,
        Some(p) => match p.connect(&Facts::new(peer.ip(), &l.name)) {
            Ok(permit) => Some(permit),
            Err(Decision::Refuse { action, rule }) => {
                crate::observe::metrics()
                    .refused(&l.name, if rule == "deny" { "deny" } else { "policy" });
                refuse(tcp, l.protocol, action).await;
                return;
            }
            Err(_) => None,
        },
    };
    // tarpit (`action: delay`) before the greeting
    if let Some(d) = permit.as_ref().map(|p| p.delay).filter(|d| !d.is_zero()) {
        tokio::time::sleep(d).await;
    }
    match l.protocol {
        Protocol::Smtp => crate::smtp::driver::run(tcp, peer, ctx).await,
        Protocol::Pop3 => crate::pop3::driver::run(tcp, peer, ctx).await,
    }
    drop(permit);
}

/// A one-line answer in plaintext before closing (even on implicit-TLS
/// listeners: no handshake is spent on a connection that is turned away).
async fn refuse(mut tcp: TcpStream, protocol: Protocol, action: Action) {
    let line: Vec<u8> = match (protocol, action) {
        (Protocol::Smtp, Action::Reject) => crate::smtp::reply::denied().to_bytes(),
        (Protocol::Smtp, _) => crate::smtp::reply::too_many_connections().to_bytes(),
        (Protocol::Pop3, Action::Reject) => crate::pop3::reply::denied().to_bytes(),
        (Protocol::Pop3, _) => crate::pop3::reply::too_many_connections().to_bytes(),
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = tcp.write_all(&line).await;
        let _ = tcp.shutdown().await;
    })
    .await;
}
