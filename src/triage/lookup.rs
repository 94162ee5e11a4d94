//! The DNS-awaiting half of DNSBL scoring: every zone's query starts at once
//! on its own task ([`Lookups::start`], at connect), and [`Lookups::finish`]
//! collects what arrived by `timeout` after the start. A zone that did not
//! answer by then, or answered with an error, is `Failed` (counted as not
//! listed). Dropping [`Lookups`] cancels the queries still running.

use super::score::{judge, Answer, ZoneResult};
use super::TriageSpec;
use crate::auth::{DnsFacts, Verifier};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// One zone's result, for the score, the log and the metrics.
#[derive(Debug, Clone)]
pub struct ZoneLookup {
    pub result: ZoneResult,
    /// From the start to the answer (the deadline for `Failed` by timeout).
    pub took: Duration,
    /// The error text of a failed lookup (for the log).
    pub error: Option<String>,
    /// What the DNS queries did (for `mailgate_dns_*`).
    pub facts: DnsFacts,
}

/// The queries of one connection, running.
pub struct Lookups {
    tasks: JoinSet<(usize, ZoneLookup)>,
    zones: usize,
    started: Instant,
    deadline: Instant,
}

impl Lookups {
    /// Starts one query per zone of `spec` for `ip` (spawned: they run while
    /// the caller holds the greeting).
    pub fn start(verifier: &Arc<Verifier>, spec: &TriageSpec, ip: IpAddr) -> Lookups {
        let started = Instant::now();
        let mut tasks = JoinSet::new();
        for (i, z) in spec.dnsbl.iter().enumerate() {
            let v = verifier.clone();
            let zone = z.clone();
            let name = super::score::query_name(ip, &z.zone);
            tasks.spawn(async move {
                let (r, facts) = v.a_records(&name).await;
                let took = started.elapsed();
                let (answer, error) = match r {
                    Ok(a) if a.is_empty() => (Answer::NotFound, None),
                    Ok(a) => (Answer::Records(a), None),
                    Err(e) => (Answer::Failed, Some(e)),
                };
                let result = judge(&zone, &answer);
                (
                    i,
                    ZoneLookup {
                        result,
                        took,
                        error,
                        facts,
                    },
                )
            });
        }
        Lookups {
            tasks,
            zones: spec.dnsbl.len(),
            started,
            deadline: started + spec.timeout,
        }
    }

    /// The results in zone order, once all answered or the deadline passed.
    pub async fn finish(mut self) -> Vec<ZoneLookup> {
        let timeout = self.deadline.saturating_duration_since(self.started);
        let mut out: Vec<ZoneLookup> = (0..self.zones)
            .map(|_| ZoneLookup {
                result: ZoneResult::Failed,
                took: timeout,
                error: Some(format!("no answer within {}ms", timeout.as_millis())),
                facts: DnsFacts::default(),
            })
            .collect();
        while let Ok(Some(done)) =
            tokio::time::timeout_at(self.deadline, self.tasks.join_next()).await
        {
            if let Ok((i, z)) = done {
                if let Some(slot) = out.get_mut(i) {
                    *slot = z;
                }
            }
        }
        // the deadline passed: what is still running is cancelled
        self.tasks.abort_all();
        out
    }
}
