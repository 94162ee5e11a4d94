//! A deliberately small HTTP/1.x endpoint: `GET /metrics`, `/healthz`,
//! `/readyz`, `/bans`, and `DELETE /bans/<address>` (bearer token). One
//! request per connection, bounded request size and time; no web framework
//! for a few fixed answers.
//!
//! It must never cost the mail listeners anything: at most `max_connections`
//! requests are served at a time (further connections are closed at once, so
//! idle ones cannot pile up descriptors), each request has a short read
//! deadline, and `/readyz` answers from a probe result at most
//! [`READY_CACHE`] old, so a burst of requests is not a burst of backend
//! connections.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

/// Answers `/readyz`: `Ok(degradations)` when ready (200; a degradation,
/// such as an unreachable shared state store, is named in the body but does
/// not fail readiness), `Err(reason)` otherwise (503). Reasons go into the
/// response body: names, never internal addresses.
pub type ReadyCheck = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<Vec<String>, String>> + Send>> + Send + Sync,
>;

/// The bans the server keeps (`policy/bans.rs`; observe sits below policy,
/// so the server supplies them).
pub trait BanDesk: Send + Sync {
    /// `GET /bans`: the bans in force, as a JSON body.
    fn list(&self) -> String;
    /// `DELETE /bans/<address>`: lifts the bans covering `ip`.
    fn lift(
        &self,
        ip: IpAddr,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Lifted> + Send + '_>>;
}

/// What a lift did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifted {
    /// Bans covering the address, lifted here or in the state store (one
    /// ban held in both counts once).
    pub lifted: usize,
    /// The state store did not answer: other instances may still learn
    /// the ban from it.
    pub store_failed: bool,
}

/// The bearer token that lifting bans needs (`metrics.admin_token_file`).
/// Never printed: `Debug` shows no byte of it.
#[derive(Clone)]
pub struct AdminToken(Arc<[u8]>);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

impl AdminToken {
    pub fn new(token: &[u8]) -> AdminToken {
        AdminToken(token.into())
    }

    /// The token as a client sends it (for `mailgate bans lift`).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Whether `presented` is the token, in time that depends on neither
    /// (digests of equal length compared in constant time).
    pub fn matches(&self, presented: &[u8]) -> bool {
        use aws_lc_rs::digest::{digest, SHA256};
        let (a, b) = (digest(&SHA256, &self.0), digest(&SHA256, presented));
        aws_lc_rs::constant_time::verify_slices_are_equal(a.as_ref(), b.as_ref()).is_ok()
    }
}

/// What the admin resources need: the bans, and the token (swapped by reload).
#[derive(Clone)]
pub struct Admin {
    pub bans: Arc<dyn BanDesk>,
    pub token: Arc<arc_swap::ArcSwapOption<AdminToken>>,
}

/// Requests served at once, at most (the caller may lower it to fit the
/// process's descriptor budget).
pub const MAX_CONNECTIONS: usize = 16;
/// Time for the client to send its request head.
const READ_DEADLINE: Duration = Duration::from_secs(3);
/// Time for the whole exchange (a readiness probe included).
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// How long a readiness result is reused.
pub const READY_CACHE: Duration = Duration::from_secs(5);

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// The last readiness result and when it was taken; the lock also makes
/// concurrent requests share one probe instead of each starting their own.
type ReadyCache = tokio::sync::Mutex<Option<(tokio::time::Instant, Result<Vec<String>, String>)>>;

async fn cached_ready(check: &ReadyCheck, cache: &ReadyCache) -> Result<Vec<String>, String> {
    let mut last = cache.lock().await;
    if let Some((at, r)) = last.as_ref() {
        if at.elapsed() < READY_CACHE {
            return r.clone();
        }
    }
    let r = check().await;
    *last = Some((tokio::time::Instant::now(), r.clone()));
    r
}

pub async fn serve(
    listener: TcpListener,
    ready: ReadyCheck,
    admin: Admin,
    max_connections: usize,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    if let Ok(a) = listener.local_addr() {
        info!(addr = %a, max_connections, "metrics endpoint listening");
    }
    let permits = Arc::new(Semaphore::new(max_connections.max(1)));
    let cache: Arc<ReadyCache> = Arc::default();
    loop {
        let (s, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // closed at once: its descriptor is back before the next accept
            debug!(%peer, "metrics endpoint busy; connection closed");
            drop(s);
            continue;
        };
        let (ready, cache, admin) = (ready.clone(), cache.clone(), admin.clone());
        tokio::spawn(async move {
            let r = tokio::time::timeout(REQUEST_DEADLINE, answer(s, peer, &ready, &cache, &admin))
                .await;
            if let Ok(Err(e)) = r {
                debug!(%peer, error = %e, "metrics request failed");
            }
            drop(permit);
        });
    }
}

async fn answer(
    mut s: tokio::net::TcpStream,
    peer: SocketAddr,
    ready: &ReadyCheck,
    cache: &ReadyCache,
    admin: &Admin,
) -> std::io::Result<()> {
    let head = tokio::time::timeout(READ_DEADLINE, async {
        let mut buf = Vec::with_capacity(1024);
        let mut tmp = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
            let n = s.read(&mut tmp).await?;
            if n == 0 || buf.len() > 8192 {
                return Ok(None);
            }
            buf.extend_from_slice(&tmp[..n]);
        }
        Ok::<_, std::io::Error>(Some(buf))
    })
    .await;
    let buf = match head {
        Ok(Ok(Some(b))) => b,
        Ok(Ok(None)) | Err(_) => return Ok(()),
        Ok(Err(e)) => return Err(e),
    };
    let line = String::from_utf8_lossy(&buf[..buf.iter().position(|b| *b == b'\n').unwrap_or(0)])
        .to_string();
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    if let Some(address) = path.strip_prefix("/bans/").filter(|_| method == "DELETE") {
        let (status, body) = lift(&buf, address, peer, admin).await;
        let auth = if status.starts_with("401") {
            "WWW-Authenticate: Bearer realm=\"mailgate\"\r\n"
        } else {
            ""
        };
        let resp = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(resp.as_bytes()).await?;
        return s.shutdown().await;
    }
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            super::metrics().encode(),
        ),
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", "/bans") => ("200 OK", "application/json", admin.bans.list()),
        ("GET", "/readyz") => match cached_ready(ready, cache).await {
            Ok(degraded) if degraded.is_empty() => ("200 OK", "text/plain", "ready\n".to_string()),
            Ok(degraded) => (
                "200 OK",
                "text/plain",
                format!("ready, degraded: {}\n", degraded.join("; ")),
            ),
            Err(why) => (
                "503 Service Unavailable",
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".to_string(),
        ),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(resp.as_bytes()).await?;
    s.shutdown().await
}

/// `DELETE /bans/<address>` with the request head `head`: (status, JSON
/// body). Without a configured token lifting is off (403); a missing or
/// wrong token is 401. `address` may be a network as `/bans` shows it
/// (`2001:db8::/64`): the bans covering its address are lifted.
async fn lift(
    head: &[u8],
    address: &str,
    peer: SocketAddr,
    admin: &Admin,
) -> (&'static str, String) {
    let err = |e: &str| serde_json::json!({ "error": e }).to_string();
    let Some(token) = admin.token.load_full() else {
        warn!(%peer, "ban lift refused: no metrics.admin_token_file is configured");
        return (
            "403 Forbidden",
            err("lifting bans is disabled: no metrics.admin_token_file is configured"),
        );
    };
    // the header lines only: anything after the blank line is no header
    let end = head
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .or_else(|| head.windows(2).position(|w| w == b"\n\n"))
        .unwrap_or(head.len());
    let presented = String::from_utf8_lossy(&head[..end])
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("authorization"))
        .and_then(|(_, v)| {
            let (scheme, t) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| t.trim().to_string())
        });
    if !presented.is_some_and(|t| token.matches(t.as_bytes())) {
        // never the token presented: it may be a mistyped real one
        warn!(%peer, "ban lift refused: missing or wrong bearer token");
        return ("401 Unauthorized", err("a valid bearer token is required"));
    }
    let host = address.split('/').next().unwrap_or("");
    let Ok(ip) = host.parse::<IpAddr>() else {
        return ("400 Bad Request", err("not an IP address"));
    };
    let Lifted {
        lifted,
        store_failed,
    } = admin.bans.lift(ip).await;
    info!(%peer, client = %ip, lifted, store_failed, "ban lift over HTTP");
    if store_failed {
        let e = "the state store did not answer: lifted on this instance only, other instances may still refuse the address";
        return (
            "503 Service Unavailable",
            serde_json::json!({ "lifted": lifted, "error": e }).to_string(),
        );
    }
    if lifted == 0 {
        return ("404 Not Found", err("no ban covers this address"));
    }
    (
        "200 OK",
        serde_json::json!({ "lifted": lifted }).to_string(),
    )
}
