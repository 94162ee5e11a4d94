//! A deliberately small HTTP/1.x endpoint: `GET /metrics`, `/healthz`,
//! `/readyz`. One request per connection, bounded request size and time; no
//! web framework for three fixed answers.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

/// Answers `/readyz`: `Ok(())` when ready, `Err(reason)` otherwise.
pub type ReadyCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

pub async fn serve(
    listener: TcpListener,
    ready: ReadyCheck,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    if let Ok(a) = listener.local_addr() {
        info!(addr = %a, "metrics endpoint listening");
    }
    loop {
        let (mut s, peer) = tokio::select! {
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
        let ready = ready.clone();
        tokio::spawn(async move {
            let r = tokio::time::timeout(Duration::from_secs(10), async {
                let mut buf = Vec::with_capacity(1024);
                let mut tmp = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
                    let n = s.read(&mut tmp).await?;
                    if n == 0 || buf.len() > 8192 {
                        return Ok(());
                    }
                    buf.extend_from_slice(&tmp[..n]);
                }
                let line = String::from_utf8_lossy(&buf[..buf.iter().position(|b| *b == b'\n').unwrap_or(0)]).to_string();
                let mut parts = line.split_whitespace();
                let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let (status, ctype, body) = match (method, path.split('?').next().unwrap_or("")) {
                    ("GET", "/metrics") => ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", super::metrics().encode()),
                    ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
                    ("GET", "/readyz") => match ready().await {
                        Ok(()) => ("200 OK", "text/plain", "ready\n".to_string()),
                        Err(why) => ("503 Service Unavailable", "text/plain", format!("not ready: {why}\n")),
                    },
                    ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
                    _ => ("405 Method Not Allowed", "text/plain", "method not allowed\n".to_string()),
                };
                let resp = format!("HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                s.write_all(resp.as_bytes()).await?;
                s.shutdown().await
            })
            .await;
            if let Ok(Err(e)) = r {
                debug!(%peer, error = %e, "metrics request failed");
            }
        });
    }
}
