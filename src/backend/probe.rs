//! What each SMTP backend can carry end to end. EHLO to clients is answered by
//! mailgate before any backend connection exists (connections are lazy), so
//! the backend's extensions are learnt by a probe at start-up (in the
//! background: listeners do not wait for it), refreshed periodically and by
//! every real session's EHLO. Until a probe succeeds the caps are the
//! conservative default (no 8BITMIME, no SMTPUTF8).

use super::smtp::SmtpBackend;
use crate::config::{Backend, Timeouts};
use crate::smtp::session::BackendCaps;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

#[derive(Default)]
pub struct CapsCache {
    map: RwLock<HashMap<String, BackendCaps>>,
}

impl CapsCache {
    pub fn get(&self, backend: &str) -> BackendCaps {
        self.map
            .read()
            .ok()
            .and_then(|m| m.get(backend).cloned())
            .unwrap_or_default()
    }

    pub fn set(&self, backend: &str, caps: BackendCaps) {
        if let Ok(mut m) = self.map.write() {
            if m.get(backend) != Some(&caps) {
                tracing::info!(backend, ?caps, "backend capabilities");
                m.insert(backend.to_string(), caps);
            }
        }
    }

    /// One probe: connect, EHLO, QUIT.
    pub async fn probe(&self, backend: &Backend, t: &Timeouts) -> bool {
        match SmtpBackend::connect(backend, t, None).await {
            Ok(b) => {
                self.set(&backend.name, b.caps.clone());
                b.quit().await;
                true
            }
            Err(e) => {
                tracing::warn!(backend = %backend.name, error = %e, "backend probe failed");
                false
            }
        }
    }
}

/// Probes now, then every `every` until `stop` fires. Runs beside the
/// listeners (start-up does not wait for it); `probed` turns true after the
/// first round, answered or failed.
pub async fn refresh_loop(
    cache: Arc<CapsCache>,
    backends: Vec<(Arc<Backend>, Timeouts)>,
    every: std::time::Duration,
    probed: tokio::sync::watch::Sender<bool>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let round = async {
        for (b, t) in &backends {
            cache.probe(b, t).await;
        }
    };
    tokio::select! {
        _ = round => {}
        _ = stop.changed() => return,
    }
    probed.send_replace(true);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        for (b, t) in &backends {
            cache.probe(b, t).await;
        }
    }
}
