//! A deliberately small HTTP/1.x endpoint: `GET /metrics`, `/healthz`,
//! `/readyz`. One request per connection, bounded request size and time; no
//! web framework for three fixed answers.
//!
//! It must never cost the mail listeners anything: at most `max_connections`
//! requests are served at a time (further connections are closed at once, so
//! idle ones cannot pile up descriptors), each request has a short read
//! deadline, and `/readyz` answers from a probe result at most
//! [`READY_CACHE`] old, so a burst of requests is not a burst of backend
//! connections.

use std::future::Future;
use std::net::SocketAddr;
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
        let (ready, cache) = (ready.clone(), cache.clone());
        tokio::spawn(async move {
            let r = tokio::time::timeout(REQUEST_DEADLINE, answer(s, &ready, &cache)).await;
            if let Ok(Err(e)) = r {
                debug!(%peer, error = %e, "metrics request failed");
            }
            drop(permit);
        });
    }
}

async fn answer(
    mut s: tokio::net::TcpStream,
    ready: &ReadyCheck,
    cache: &ReadyCache,
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
    let (status, ctype, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            super::metrics().encode(),
        ),
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
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
