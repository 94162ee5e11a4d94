//! Listeners and sessions: bind every configured listener, accept with
//! TCP_NODELAY, apply the policy's connect stage (deny list, connection rate,
//! concurrent sessions) and the listener's connection cap with a proper reply,
//! spawn one task per session with its `conn::SessionCtx` (over the listener's
//! current `conn::ListenerRuntime`), reload atomically, and drain on shutdown
//! (idle sessions, also POP3/IMAP ones after login, get 421 / -ERR / BYE at
//! once; running transactions and commands get `shutdown_grace`). It calls
//! the protocol drivers; they never call back.

use crate::action::PolicyAction;
use crate::backend::caps::CapsCache;
use crate::backend::pool::SmtpPool;
use crate::backend::probe;
use crate::config::{Config, Listener, Protocol};
use crate::conn::inflight::Budget;
use crate::conn::{ListenerRuntime, SessionCtx};
use crate::observe::http::{Admin, AdminToken, BanDesk, Lifted, ReadyCheck};
use crate::policy::{ConnectPermit, Decision, Facts, Policies, Policy, PolicyState};
use crate::state::{StateSettings, Store};
use crate::triage::{Triage, TriageState};
use arc_swap::{ArcSwap, ArcSwapOption};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tracing::{info, warn};

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
    #[error(transparent)]
    Store(#[from] crate::state::StoreError),
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
    /// `state:` as started (the store is not switched by a reload).
    state: StateSettings,
    pub caps: Arc<CapsCache>,
    /// Idle SMTP backend connections (`reuse:`), closed at shutdown.
    pool: Arc<SmtpPool>,
    pub policy_state: Arc<PolicyState>,
    /// The triage pass caches (survive reloads, like `policy_state`).
    pub triage_state: Arc<TriageState>,
    metrics_addr: Option<SocketAddr>,
    /// Becomes true when the first capability probe of every SMTP backend
    /// has answered or failed.
    probed: watch::Receiver<bool>,
    /// Certificate files the watcher checks (updated by reload).
    cert_paths: Arc<std::sync::Mutex<Vec<(std::path::PathBuf, std::path::PathBuf)>>>,
    pub inflight: Arc<Budget>,
    /// The token lifting bans needs (`metrics.admin_token_file`; follows reloads).
    admin_token: Arc<ArcSwapOption<AdminToken>>,
}

/// Every listener's trusted PROXY balancers: never banned (a ban there would
/// refuse every client behind the balancer).
fn balancers(config: &Config) -> Vec<crate::units::Cidr> {
    config
        .listeners
        .iter()
        .filter_map(|l| l.proxy_trusted.as_ref())
        .flat_map(|(nets, _)| nets.iter().copied())
        .collect()
}

/// `/bans` over the process's ban list.
struct Desk(Arc<PolicyState>);

impl BanDesk for Desk {
    fn list(&self) -> String {
        let bans: Vec<_> = self
            .0
            .bans
            .list(std::time::Instant::now())
            .iter()
            .map(|b| b.to_json())
            .collect();
        serde_json::Value::from(bans).to_string()
    }

    fn lift(
        &self,
        ip: std::net::IpAddr,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Lifted> + Send + '_>> {
        Box::pin(async move {
            let now = std::time::Instant::now();
            let mut lifted: Vec<_> = self
                .0
                .bans
                .lift(ip, now)
                .iter()
                .map(|b| b.network)
                .collect();
            crate::observe::metrics().bans_active_now(self.0.bans.housekeeping(now));
            let store_failed = match self.0.lift_shared(ip).await {
                Ok(shared) => {
                    for n in shared {
                        if !lifted.contains(&n) {
                            lifted.push(n);
                        }
                    }
                    false
                }
                Err(e) => {
                    tracing::warn!(client = %ip, error = %e, "ban lift not written to the state store (lifted on this instance)");
                    true
                }
            };
            Lifted {
                lifted: lifted.len(),
                store_failed,
            }
        })
    }
}

fn tls_config(config: &Config) -> Result<Option<Arc<rustls::ServerConfig>>, ServerError> {
    Ok(if config.certificates.is_empty() {
        None
    } else {
        Some(crate::tls::server_config(&config.certificates)?)
    })
}

/// `tls` is the shared configuration; the listener gets its own copy (its
/// protocol's ALPN id, its own ticket key).
fn runtime_for(
    l: &Arc<Listener>,
    tls: &Option<Arc<rustls::ServerConfig>>,
    policies: &Policies,
    verifier: &Option<Arc<crate::auth::Verifier>>,
    triage: &BTreeMap<String, Arc<Triage>>,
) -> Result<ListenerRuntime, ServerError> {
    let policy = l.policy.as_ref().and_then(|p| policies.get(&p.name));
    let wants_auth = policy.as_ref().is_some_and(|p| p.spec().auth.is_some());
    // triage is SMTP's (postscreen's tests); `check` warns where it is ignored
    let triage = match (&l.policy, l.protocol) {
        (Some(p), Protocol::Smtp) => triage.get(&p.name).cloned(),
        _ => None,
    };
    Ok(ListenerRuntime {
        listener: l.clone(),
        tls: match tls {
            Some(base) => Some(crate::tls::for_listener(base, l.protocol)?),
            None => None,
        },
        policy,
        verifier: if wants_auth { verifier.clone() } else { None },
        triage,
    })
}

/// Each policy's compiled triage: its settings, its pass cache from the
/// long-lived `state` (kept across reloads) and the shared resolver.
fn triage_for(
    config: &Config,
    state: &TriageState,
    verifier: &Option<Arc<crate::auth::Verifier>>,
    store: Option<&Arc<Store>>,
) -> BTreeMap<String, Arc<Triage>> {
    let mut out = BTreeMap::new();
    if let Some(v) = verifier {
        for (name, spec) in &config.triage {
            let mut t = Triage::new(name, spec.clone(), state, v.clone());
            t.store = store.cloned();
            out.insert(name.clone(), Arc::new(t));
        }
    }
    let live: Vec<&str> = out.keys().map(String::as_str).collect();
    state.retain(&live);
    out
}

/// One verifier (resolver + cache) when any policy checks SPF/DKIM/DMARC/ARC
/// or has DNS lists to query (triage).
fn verifier_for(config: &Config) -> Result<Option<Arc<crate::auth::Verifier>>, ServerError> {
    if !config.policies.values().any(|p| p.auth.is_some()) && config.triage.is_empty() {
        return Ok(None);
    }
    crate::auth::Verifier::new(&config.dns)
        .map(|v| Some(Arc::new(v)))
        .map_err(|e| ServerError::Dns(e.to_string()))
}

impl Gateway {
    /// Binds everything first (so a config that cannot bind fails before any
    /// client is accepted), starts accepting, and probes SMTP backends in the
    /// background: a slow backend delays nothing but its own capabilities,
    /// which stay the conservative default until its probe answers.
    pub async fn start(config: &Config) -> Result<Gateway, ServerError> {
        let tls = tls_config(config)?;
        let verifier = verifier_for(config)?;
        let store = match &config.state {
            StateSettings::Memory => None,
            StateSettings::Redis(s) => {
                info!(store = %s.redacted_url(), prefix = %s.prefix, "limiter state shared through the store");
                Some(Store::connect(s)?)
            }
        };
        let policy_state = PolicyState::with_store(
            crate::config::defaults::KNOWN_GOOD,
            crate::config::defaults::MAX_TRACKED_KEYS,
            store.clone(),
        );
        let policies = Policies::compile(&config.policies, &policy_state);
        policy_state.bans.protect(balancers(config));
        let admin_token = Arc::new(ArcSwapOption::from(
            config.admin_token.clone().map(Arc::new),
        ));
        let triage_state = TriageState::new();
        let triage = triage_for(config, &triage_state, &verifier, store.as_ref());
        let mut bound = Vec::new();
        for l in &config.listeners {
            let socket = bind(l.bind).map_err(|source| ServerError::Bind {
                name: l.name.clone(),
                addr: l.bind,
                source,
            })?;
            bound.push((l.clone(), socket));
        }
        let metrics_listener = match config.metrics_bind {
            Some(addr) => Some(crate::observe::http::bind(addr).await.map_err(|source| {
                ServerError::Bind {
                    name: "metrics".into(),
                    addr,
                    source,
                }
            })?),
            None => None,
        };
        let mut runtimes = Vec::new();
        for (l, _) in &bound {
            runtimes.push(runtime_for(l, &tls, &policies, &verifier, &triage)?);
        }
        let fds = FdBudget::check(config);
        arm_spare_fd();
        let caps = Arc::new(CapsCache::default());
        let inflight = Budget::new(config.max_inflight_data);
        let (shutdown, rx) = watch::channel(false);
        let pool = Arc::new(SmtpPool::default());
        tokio::spawn(pool.clone().sweep(rx.clone()));
        let shared = Shared {
            caps: caps.clone(),
            pool: pool.clone(),
            inflight: inflight.clone(),
        };
        let mut metrics_addr = None;
        if let Some(listener) = metrics_listener {
            metrics_addr = listener.local_addr().ok();
            let admin = Admin {
                bans: Arc::new(Desk(policy_state.clone())),
                token: admin_token.clone(),
            };
            tokio::spawn(crate::observe::http::serve(
                listener,
                ready_check(config, store.clone()),
                admin,
                fds.http_connections,
                rx.clone(),
            ));
        }
        let mut slots = Vec::new();
        let mut accept_tasks = Vec::new();
        for ((l, socket), runtime) in bound.into_iter().zip(runtimes) {
            let addr = socket.local_addr().unwrap_or(l.bind);
            info!(listener = %l.name, %addr, protocol = ?l.protocol, tls = ?l.tls, backend = %l.backend.address, "listening");
            let runtime = Arc::new(ArcSwap::from_pointee(runtime));
            let permits = Arc::new(Semaphore::new(l.max_connections));
            accept_tasks.push(tokio::spawn(accept_loop(
                socket,
                permits.clone(),
                runtime.clone(),
                shared.clone(),
                rx.clone(),
                policy_state.clone(),
            )));
            slots.push(Slot {
                name: l.name.clone(),
                addr,
                runtime,
                permits,
                max: l.max_connections as u32,
            });
        }
        let mut smtp_backends: Vec<(Arc<crate::backend::Backend>, crate::backend::Deadlines)> =
            Vec::new();
        for l in config
            .listeners
            .iter()
            .filter(|l| l.protocol == Protocol::Smtp)
        {
            if !smtp_backends.iter().any(|(b, _)| b.name == l.backend.name) {
                smtp_backends.push((l.backend.clone(), l.timeouts.backend));
            }
        }
        let (probed_tx, probed) = watch::channel(false);
        tokio::spawn(probe::refresh_loop(
            caps.clone(),
            smtp_backends,
            Duration::from_secs(60),
            probed_tx,
            rx.clone(),
            |b, took| crate::observe::metrics().backend_connected(&b.name, took.as_secs_f64()),
        ));
        tokio::spawn(housekeeping(policy_state.clone(), rx.clone()));
        if let Some(store) = &store {
            tokio::spawn(crate::state::lease::refresh_loop(store.clone(), rx.clone()));
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
            state: config.state.clone(),
            caps,
            pool,
            policy_state,
            triage_state,
            metrics_addr,
            probed,
            cert_paths,
            inflight,
            admin_token,
        })
    }

    /// Resolves once the start-up capability probe of every SMTP backend has
    /// answered (or failed): from then on EHLO advertises what the backends
    /// really offer. Tests that check advertised extensions wait for it.
    pub async fn backends_probed(&self) {
        let mut p = self.probed.clone();
        let _ = p.wait_for(|done| *done).await;
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
        self.policy_state.bans.protect(balancers(config));
        self.admin_token
            .store(config.admin_token.clone().map(Arc::new));
        let triage = triage_for(
            config,
            &self.triage_state,
            &verifier,
            self.policy_state.store(),
        );
        let mut notes = Vec::new();
        let mut apply = Vec::new();
        for slot in &self.slots {
            let old = slot.runtime.load();
            match config.listeners.iter().find(|l| l.name == slot.name) {
                Some(l)
                    if l.bind == old.listener.bind
                        && l.protocol == old.listener.protocol
                        && l.max_connections == old.listener.max_connections =>
                {
                    apply.push((slot, runtime_for(l, &tls, &policies, &verifier, &triage)?));
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
        for (slot, runtime) in apply {
            slot.runtime.store(Arc::new(runtime));
        }
        // kept connections of the old settings would only wait out their
        // idle time (new sessions take the new settings' connections)
        let current: Vec<_> = self.slots.iter().map(|s| s.runtime.load_full()).collect();
        self.pool
            .keep_only(current.iter().map(|r| &*r.listener.backend));
        for l in &config.listeners {
            if !self.slots.iter().any(|s| s.name == l.name) {
                notes.push(format!("listener {} is new; restart to apply", l.name));
            }
        }
        if config.state != self.state {
            notes.push("state: changed; restart to apply (the running store is kept)".into());
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

    /// The grace period `shutdown` gives running sessions (follows reloads).
    pub fn shutdown_grace(&self) -> Duration {
        self.grace
            .lock()
            .map(|g| *g)
            .unwrap_or(Duration::from_secs(30))
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
    pub async fn shutdown(&self) -> usize {
        let _ = self.shutdown.send(true);
        for t in &self.accept_tasks {
            t.abort();
        }
        let grace = self.shutdown_grace();
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
        // the sessions are over: the idle backend connections get their QUIT
        self.pool.close_all().await;
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
                    if old.tls.is_none() {
                        continue;
                    }
                    match crate::tls::for_listener(&cfg, old.listener.protocol) {
                        Ok(tls) => rt.store(Arc::new(ListenerRuntime {
                            listener: old.listener.clone(),
                            tls: Some(tls),
                            policy: old.policy.clone(),
                            verifier: old.verifier.clone(),
                            triage: old.triage.clone(),
                        })),
                        Err(e) => {
                            warn!(listener = %old.listener.name, error = %e, "TLS setup failed; keeping the current certificates")
                        }
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

/// `/readyz`: every backend accepts a TCP connection (probed at once, each
/// for at most 2 s; the endpoint caches the result). The reason names the
/// backends; their addresses go to the log only.
fn ready_check(config: &Config, store: Option<Arc<Store>>) -> ReadyCheck {
    let backends: Vec<(String, String)> = config
        .backends
        .values()
        .map(|b| (b.name.clone(), b.address.clone()))
        .collect();
    Arc::new(move || {
        let backends = backends.clone();
        let store = store.clone();
        Box::pin(async move {
            // the gateway runs on without the store (`on_unavailable`):
            // degraded, still ready
            let mut degraded = Vec::new();
            if let Some(store) = &store {
                if store.ping().await.is_err() {
                    degraded.push(format!(
                        "state store unreachable (on_unavailable: {})",
                        store.settings().on_unavailable.as_str()
                    ));
                }
            }
            let mut probes = tokio::task::JoinSet::new();
            for (name, address) in backends {
                probes.spawn(async move {
                    let r = tokio::time::timeout(
                        Duration::from_secs(2),
                        TcpStream::connect(address.as_str()),
                    )
                    .await;
                    let error = match r {
                        Ok(Ok(_)) => return None,
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => "connect timed out".to_string(),
                    };
                    warn!(backend = %name, %address, %error, "readiness: backend unreachable");
                    Some(name)
                });
            }
            let mut down = Vec::new();
            while let Some(r) = probes.join_next().await {
                if let Ok(Some(name)) = r {
                    down.push(name);
                }
            }
            if down.is_empty() {
                return Ok(degraded);
            }
            down.sort();
            Err(format!("backend {} unreachable", down.join(", ")))
        })
    })
}

/// The process's file descriptor budget (RLIMIT_NOFILE) against what the
/// configuration may use: every session holds two (client and backend).
struct FdBudget {
    /// The metrics endpoint's connection cap: well below the budget.
    http_connections: usize,
}

/// Descriptors kept aside for the runtime, listeners, DNS, certificate files.
const FD_OVERHEAD: u64 = 64;

impl FdBudget {
    fn check(config: &Config) -> FdBudget {
        let sessions: u64 = config
            .listeners
            .iter()
            .map(|l| l.max_connections as u64)
            .sum();
        let wanted = sessions * 2 + crate::observe::http::MAX_CONNECTIONS as u64 + FD_OVERHEAD;
        // the soft limit may be raised up to the hard one without privileges
        let soft = raise_nofile_limit(wanted);
        let http = (soft / 32).clamp(1, crate::observe::http::MAX_CONNECTIONS as u64) as usize;
        let needed = sessions * 2 + http as u64 + FD_OVERHEAD;
        if needed > soft {
            warn!(
                limit = soft,
                needed,
                "the file descriptor limit (ulimit -n) is below what max_connections allow; \
                 connections beyond it are turned away with a temporary error"
            );
        }
        FdBudget {
            http_connections: http,
        }
    }
}

/// Raises the soft RLIMIT_NOFILE towards `wanted` (at most to the hard
/// limit); returns the soft limit in force.
fn raise_nofile_limit(wanted: u64) -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return 1024;
    }
    if r.rlim_cur < wanted && r.rlim_cur < r.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: wanted.min(r.rlim_max),
            rlim_max: r.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            info!(
                from = r.rlim_cur,
                to = raised.rlim_cur,
                "raised the file descriptor limit"
            );
            return raised.rlim_cur;
        }
    }
    r.rlim_cur
}

/// One spare descriptor for the whole process (nginx/haproxy style). When
/// accept fails for want of descriptors, the client stays unanswered in the
/// backlog and the accept would fail again at once; instead the spare is
/// closed, the waiting client accepted, told to come back later (421 /
/// -ERR) and closed, and the spare re-opened. Clients hear a proper
/// temporary error instead of a silent stall.
static SPARE_FD: std::sync::Mutex<Option<std::fs::File>> = std::sync::Mutex::new(None);
/// Set while the spare is spent (it could not be re-opened at once): the
/// accept loops try again after their next successful accept.
static SPARE_SPENT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn arm_spare_fd() {
    if let Ok(mut spare) = SPARE_FD.lock() {
        if spare.is_none() {
            *spare = std::fs::File::open("/dev/null").ok();
        }
        SPARE_SPENT.store(spare.is_none(), std::sync::atomic::Ordering::Relaxed);
    }
}

fn out_of_fds(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// Turns away one waiting client using the spare descriptor; false when
/// there was no spare (another listener has it) or no client.
async fn shed_one(socket: &TcpListener, rt: &ListenerRuntime) -> bool {
    let spare = SPARE_FD.lock().ok().and_then(|mut s| s.take());
    if spare.is_none() {
        return false;
    }
    drop(spare);
    let shed = match tokio::time::timeout(Duration::from_millis(10), socket.accept()).await {
        Ok(Ok((tcp, peer))) => {
            let l = &rt.listener;
            // a new connection's send buffer is empty: this cannot block
            let _ = tcp.try_write(&refusal(l.protocol, PolicyAction::Tempfail));
            crate::observe::metrics().refused(&l.name, "fd_exhausted");
            warn!(listener = %l.name, %peer, "out of file descriptors; connection turned away");
            true
        }
        _ => false,
    };
    arm_spare_fd();
    shed
}

async fn housekeeping(state: Arc<PolicyState>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10)) => {
                state.housekeeping();
                let active = state.bans.housekeeping(std::time::Instant::now());
                crate::observe::metrics().bans_active_now(active);
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

/// What every session of the gateway shares, handed to each [`SessionCtx`].
#[derive(Clone)]
struct Shared {
    caps: Arc<CapsCache>,
    pool: Arc<SmtpPool>,
    inflight: Arc<Budget>,
}

async fn accept_loop(
    socket: TcpListener,
    permits: Arc<Semaphore>,
    runtime: Arc<ArcSwap<ListenerRuntime>>,
    shared: Shared,
    shutdown: watch::Receiver<bool>,
    state: Arc<PolicyState>,
) {
    let mut stop = shutdown.clone();
    let local = socket.local_addr().ok();
    let mut last_warn: Option<tokio::time::Instant> = None;
    loop {
        let (tcp, peer) = tokio::select! {
            r = socket.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // out of descriptors: turn the waiting client away with
                    // the spare one, then back off briefly; other errors
                    // (ECONNABORTED, ENOBUFS): back off instead of spinning
                    let shed = out_of_fds(&e) && shed_one(&socket, &runtime.load()).await;
                    if last_warn.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        warn!(error = %e, "accept failed");
                        last_warn = Some(tokio::time::Instant::now());
                    }
                    let pause = if shed { 10 } else { 100 };
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        if SPARE_SPENT.load(std::sync::atomic::Ordering::Relaxed) {
            arm_spare_fd();
        }
        let _ = tcp.set_nodelay(true);
        let rt = runtime.load_full();
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let l = &rt.listener;
                warn!(listener = %l.name, %peer, limit = l.max_connections, "connection limit reached");
                crate::observe::metrics().refused(&l.name, "max_connections");
                tokio::spawn(refuse(tcp, l.protocol, PolicyAction::Tempfail));
                continue;
            }
        };
        let ctx = SessionCtx {
            local: local.unwrap_or(rt.listener.bind),
            runtime: rt,
            caps: shared.caps.clone(),
            pool: shared.pool.clone(),
            shutdown: shutdown.clone(),
            inflight: shared.inflight.clone(),
        };
        let state = state.clone();
        tokio::spawn(async move {
            connection(tcp, peer, ctx, &state).await;
            drop(permit);
        });
    }
}

/// One accepted connection: admitted (see [`admit`]), then the protocol.
///
/// Both are boxed: the task of every session lives as long as the session
/// and is as large as its largest state, so the admission's awaits (PROXY
/// header, store lookups, refusals) and the three protocols' sessions each
/// take memory only while they run (tests/session_memory.rs).
async fn connection(tcp: TcpStream, peer: SocketAddr, ctx: SessionCtx, state: &PolicyState) {
    let Some((tcp, peer, ctx, permit)) = Box::pin(admit(tcp, peer, ctx, state)).await else {
        return;
    };
    match ctx.listener().protocol {
        Protocol::Smtp => Box::pin(crate::smtp::driver::run(tcp, peer, ctx)).await,
        Protocol::Pop3 => Box::pin(crate::pop3::driver::run(tcp, peer, ctx)).await,
        Protocol::Imap => Box::pin(crate::imap::driver::run(tcp, peer, ctx)).await,
    }
    drop(permit);
}

/// What a session starts with once admitted: the connection, the client's
/// address (from PROXY when a trusted balancer sent one), its context, and
/// the connect stage's permit (held for the whole session).
type Admitted = (TcpStream, SocketAddr, SessionCtx, Option<ConnectPermit>);

/// PROXY header (from trusted balancers only), the ban list and the
/// policy's connect stage with the real client address, the tarpit; `None`
/// when the connection was turned away (answered and closed here).
async fn admit(
    mut tcp: TcpStream,
    peer: SocketAddr,
    mut ctx: SessionCtx,
    state: &PolicyState,
) -> Option<Admitted> {
    let l = ctx.listener().clone();
    // a dual-stack `[::]` socket reports IPv4 clients as ::ffff:a.b.c.d: one
    // client is one address in logs, limits and headers, whatever the socket
    use crate::units::canonical_socket;
    let mut peer = canonical_socket(peer);
    ctx.local = canonical_socket(ctx.local);
    if let Some((trusted, deadline)) = &l.proxy_trusted {
        if !trusted.iter().any(|n| n.contains(peer.ip())) {
            warn!(listener = %l.name, %peer, "connection from an untrusted peer on a PROXY protocol listener closed");
            crate::observe::metrics().refused(&l.name, "proxy_untrusted");
            return None;
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
                return None;
            }
        }
    }
    // banned by any policy's rule, on any listener: refused before TLS and
    // greeting (logged when banned, not per refused connection: a banned
    // client that keeps coming back would flood the log)
    let ban = match state.bans.banned(peer.ip(), std::time::Instant::now()) {
        Some(ban) => Some(ban),
        // made by another instance (`state: store: redis`)
        None => state.banned_shared(peer.ip()).await,
    };
    if let Some(ban) = ban {
        tracing::debug!(listener = %l.name, client = %peer.ip(), ban = %ban.address(), rule = %ban.cause.rule, "banned client refused");
        crate::observe::metrics().refused(&l.name, "banned");
        send_and_close(tcp, banned(l.protocol)).await;
        return None;
    }
    let permit: Option<ConnectPermit> = match ctx.policy() {
        None => None,
        Some(p) => {
            let checked = p.connect_shared(&Facts::new(peer.ip(), &l.name)).await;
            crate::conn::count_hits(&checked.hits);
            match checked.decision {
                Ok(permit) => Some(permit),
                Err(Decision::Refuse { action, rule }) => {
                    crate::observe::metrics()
                        .refused(&l.name, if rule == "deny" { "deny" } else { "policy" });
                    refuse(tcp, l.protocol, action).await;
                    return None;
                }
                Err(_) => None,
            }
        }
    };
    // tarpit (`action: delay`) before the greeting
    if let Some(d) = permit.as_ref().map(|p| p.delay).filter(|d| !d.is_zero()) {
        tokio::time::sleep(d).await;
    }
    Some((tcp, peer, ctx, permit))
}

/// A one-line answer in plaintext before closing (even on implicit-TLS
/// listeners: no handshake is spent on a connection that is turned away).
async fn refuse(tcp: TcpStream, protocol: Protocol, action: PolicyAction) {
    send_and_close(tcp, refusal(protocol, action)).await
}

async fn send_and_close(mut tcp: TcpStream, line: Vec<u8>) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = tcp.write_all(&line).await;
        let _ = tcp.shutdown().await;
    })
    .await;
}

/// The refusal of a banned client's connection.
fn banned(protocol: Protocol) -> Vec<u8> {
    match protocol {
        Protocol::Smtp => crate::smtp::reply::banned().to_bytes(),
        Protocol::Pop3 => crate::pop3::reply::banned().to_bytes(),
        Protocol::Imap => crate::imap::reply::banned().to_bytes(),
    }
}

fn refusal(protocol: Protocol, action: PolicyAction) -> Vec<u8> {
    match (protocol, action) {
        (Protocol::Smtp, PolicyAction::Reject) => crate::smtp::reply::denied().to_bytes(),
        (Protocol::Smtp, _) => crate::smtp::reply::too_many_connections().to_bytes(),
        (Protocol::Pop3, PolicyAction::Reject) => crate::pop3::reply::denied().to_bytes(),
        (Protocol::Pop3, _) => crate::pop3::reply::too_many_connections().to_bytes(),
        (Protocol::Imap, PolicyAction::Reject) => crate::imap::reply::denied().to_bytes(),
        (Protocol::Imap, _) => crate::imap::reply::too_many_connections().to_bytes(),
    }
}

#[cfg(test)]
mod tests {
    /// The task of every session holds `connection`'s future for the whole
    /// session: with the admission and the protocol boxed it is a few
    /// hundred bytes, not the largest admission state (a store lookup, the
    /// PROXY header read) as it was (1.2 KB more per idle session).
    #[test]
    #[allow(unreachable_code)]
    fn the_connection_task_is_small() {
        fn size<F: std::future::Future>(_: &dyn Fn() -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let n = size(&|| {
            super::connection(
                unreachable!(),
                unreachable!(),
                unreachable!(),
                unreachable!(),
            )
        });
        assert!(n <= 512, "connection's future is {n} bytes");
    }
}
