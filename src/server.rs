//! Listeners and sessions: bind every configured listener, accept with
//! TCP_NODELAY, refuse denied networks and connections beyond the listener's
//! limit with a proper reply, spawn one task per session, and drain on
//! shutdown (idle sessions get 421 / -ERR at once; running transactions get
//! `shutdown_grace` to finish).

use crate::backend::probe::{self, CapsCache};
use crate::config::{Config, Listener, Protocol};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tracing::{info, warn};

/// What one session needs, loaded once at accept and kept for its lifetime.
#[derive(Clone)]
pub struct SessionCtx {
    pub listener: Arc<Listener>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
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

struct Bound {
    listener: Arc<Listener>,
    socket: TcpListener,
    permits: Arc<Semaphore>,
}

/// A running gateway: its bound addresses and a handle to stop it.
pub struct Gateway {
    addrs: Vec<(String, SocketAddr)>,
    shutdown: watch::Sender<bool>,
    accept_tasks: Vec<tokio::task::JoinHandle<()>>,
    drains: Vec<(Arc<Semaphore>, u32)>,
    grace: Duration,
    pub caps: Arc<CapsCache>,
}

impl Gateway {
    /// Binds everything first (so a config that cannot bind fails before any
    /// client is accepted), probes SMTP backends once, then starts accepting.
    pub async fn start(config: &Config) -> Result<Gateway, ServerError> {
        let tls = if config.certificates.is_empty() {
            None
        } else {
            Some(crate::tls::server_config(&config.certificates)?)
        };
        let mut bound = Vec::new();
        for l in &config.listeners {
            let socket = bind(l.bind).map_err(|source| ServerError::Bind {
                name: l.name.clone(),
                addr: l.bind,
                source,
            })?;
            bound.push(Bound {
                listener: l.clone(),
                socket,
                permits: Arc::new(Semaphore::new(l.max_connections)),
            });
        }
        let caps = Arc::new(CapsCache::default());
        let (shutdown, rx) = watch::channel(false);
        let mut smtp_backends: Vec<_> = Vec::new();
        for l in config
            .listeners
            .iter()
            .filter(|l| l.protocol == Protocol::Smtp)
        {
            if !smtp_backends
                .iter()
                .any(|(b, _): &(Arc<crate::config::Backend>, _)| b.name == l.backend.name)
            {
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
        let mut addrs = Vec::new();
        let mut accept_tasks = Vec::new();
        let mut drains = Vec::new();
        for b in bound {
            let addr = b.socket.local_addr().unwrap_or(b.listener.bind);
            info!(listener = %b.listener.name, %addr, protocol = ?b.listener.protocol, tls = ?b.listener.tls, backend = %b.listener.backend.address, "listening");
            addrs.push((b.listener.name.clone(), addr));
            drains.push((b.permits.clone(), b.listener.max_connections as u32));
            let ctx = SessionCtx {
                listener: b.listener.clone(),
                tls: tls.clone(),
                caps: caps.clone(),
                shutdown: rx.clone(),
            };
            accept_tasks.push(tokio::spawn(accept_loop(b.socket, b.permits, ctx)));
        }
        Ok(Gateway {
            addrs,
            shutdown,
            accept_tasks,
            drains,
            grace: config.shutdown_grace,
            caps,
        })
    }

    /// The address a listener is bound to (useful with port 0 in tests).
    pub fn addr(&self, listener: &str) -> Option<SocketAddr> {
        self.addrs
            .iter()
            .find(|(n, _)| n == listener)
            .map(|(_, a)| *a)
    }

    pub fn addrs(&self) -> &[(String, SocketAddr)] {
        &self.addrs
    }

    /// Stops accepting, tells idle sessions to go, and waits up to the grace
    /// period for running ones. Returns the number of sessions still running
    /// when the grace period ended (they are dropped with the runtime).
    pub async fn shutdown(self) -> usize {
        let _ = self.shutdown.send(true);
        for t in &self.accept_tasks {
            t.abort();
        }
        let deadline = tokio::time::Instant::now() + self.grace;
        let mut left = 0;
        for (sem, n) in &self.drains {
            match tokio::time::timeout_at(deadline, sem.acquire_many(*n)).await {
                Ok(_) => {}
                Err(_) => left += *n as usize - sem.available_permits(),
            }
        }
        left
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

async fn accept_loop(socket: TcpListener, permits: Arc<Semaphore>, ctx: SessionCtx) {
    let mut shutdown = ctx.shutdown.clone();
    loop {
        let (tcp, peer) = tokio::select! {
            r = socket.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning
                    warn!(listener = %ctx.listener.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let l = &ctx.listener;
        if l.deny.iter().any(|n| n.contains(peer.ip())) {
            info!(listener = %l.name, %peer, "connection denied by policy");
            tokio::spawn(refuse(tcp, l.protocol, Refusal::Denied));
            continue;
        }
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                warn!(listener = %l.name, %peer, limit = l.max_connections, "connection limit reached");
                tokio::spawn(refuse(tcp, l.protocol, Refusal::Busy));
                continue;
            }
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            match ctx.listener.protocol {
                Protocol::Smtp => crate::smtp::driver::run(tcp, peer, ctx).await,
                Protocol::Pop3 => crate::pop3::driver::run(tcp, peer, ctx).await,
            }
            drop(permit);
        });
    }
}

enum Refusal {
    Denied,
    Busy,
}

/// A one-line answer in plaintext before closing (even on implicit-TLS
/// listeners: no handshake is spent on a connection that is turned away).
async fn refuse(mut tcp: TcpStream, protocol: Protocol, why: Refusal) {
    let line: Vec<u8> = match (protocol, why) {
        (Protocol::Smtp, Refusal::Denied) => crate::smtp::reply::denied().to_bytes(),
        (Protocol::Smtp, Refusal::Busy) => crate::smtp::reply::too_many_connections().to_bytes(),
        (Protocol::Pop3, Refusal::Denied) => b"-ERR [AUTH] Access denied\r\n".to_vec(),
        (Protocol::Pop3, Refusal::Busy) => {
            b"-ERR [SYS/TEMP] Too many connections, try again later\r\n".to_vec()
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = tcp.write_all(&line).await;
        let _ = tcp.shutdown().await;
    })
    .await;
}
