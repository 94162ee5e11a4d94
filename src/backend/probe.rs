//! What each SMTP backend can carry end to end. EHLO to clients is answered by
//! mailgate before any backend connection exists (connections are lazy), so
//! the backend's extensions are learnt by a probe at start-up (in the
//! background: listeners do not wait for it), refreshed periodically and by
//! every real session's EHLO. Until a probe succeeds the caps are the
//! conservative default (no 8BITMIME, no SMTPUTF8).

use super::caps::CapsCache;
use super::smtp::SmtpBackend;
use super::{Backend, Deadlines};
use std::sync::Arc;
use std::time::Duration;

/// One probe: connect, EHLO, QUIT. The capabilities go into `cache`; the
/// connect time is returned for the caller to count.
pub async fn probe(cache: &CapsCache, backend: &Backend, t: &Deadlines) -> Option<Duration> {
    match SmtpBackend::connect(backend, t, None).await {
        Ok(b) => {
            cache.set_smtp(backend, b.caps.clone());
            let took = b.connect_time;
            b.quit().await;
            Some(took)
        }
        Err(e) => {
            tracing::warn!(backend = %backend.name, error = %e, "backend probe failed");
            None
        }
    }
}

/// Probes now, then every `every` until `stop` fires. Runs beside the
/// listeners (start-up does not wait for it); `probed` turns true after the
/// first round, answered or failed. `connected(backend, took)` is called
/// for each probe that connected (the caller counts it).
pub async fn refresh_loop(
    cache: Arc<CapsCache>,
    backends: Vec<(Arc<Backend>, Deadlines)>,
    every: Duration,
    probed: tokio::sync::watch::Sender<bool>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    connected: impl Fn(&Backend, Duration),
) {
    let round = || async {
        for (b, t) in &backends {
            if let Some(took) = probe(&cache, b, t).await {
                connected(b, took);
            }
        }
    };
    tokio::select! {
        _ = round() => {}
        _ = stop.changed() => return,
    }
    probed.send_replace(true);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        round().await;
    }
}
