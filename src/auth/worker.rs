//! Checks run off the I/O threads.
//!
//! mail-auth's verifiers are async (DNS) but do their hashing, header
//! canonicalisation and signature checks inside a poll: on a session task
//! that would hold a tokio worker for as long as a message takes, and with it
//! every other session and deadline scheduled there. So the SMTP driver runs
//! each check as a task of a small dedicated runtime (half the CPUs, 1 to 4
//! threads, named `mailgate-auth`): DNS waits there stay async, CPU work
//! competes only with other checks, and the session task just awaits the
//! result. What one check may cost is bounded in `verify.rs` (signatures,
//! ARC sets, `h=` entries) and `cache.rs` (DNS queries).
//!
//! A check that does not come back within its deadline plus a queueing
//! allowance (the runtime is busy) is abandoned as `temperror`.

use super::cache::DnsBudget;
use super::verify::{
    ArcOutcome, AuthResult, Checks, DkimSignature, DmarcOutcome, DmarcPolicy, MessageOutcome,
    SpfOutcome, Verifier,
};
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Time a check may wait for a thread of the check runtime, on top of its deadline.
const QUEUE_ALLOWANCE: Duration = Duration::from_secs(5);

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).clamp(1, 4));
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("mailgate-auth")
            .enable_all()
            .build()
            .expect("the check runtime starts (threads and timers only)")
    })
}

/// Why a check did not return a result.
enum Lost {
    Late,
    Panicked,
}

/// Runs `check` on the check runtime; `Err` when it does not finish within `limit`.
async fn run<T: Send + 'static>(
    limit: Duration,
    check: impl Future<Output = T> + Send + 'static,
) -> Result<T, Lost> {
    let handle = runtime().spawn(check);
    let abort = handle.abort_handle();
    match tokio::time::timeout(limit, handle).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) if e.is_panic() => Err(Lost::Panicked),
        Ok(Err(_)) => Err(Lost::Late),
        Err(_) => {
            abort.abort();
            Err(Lost::Late)
        }
    }
}

/// [`Verifier::spf_within`] off the I/O threads.
pub async fn spf(
    verifier: Arc<Verifier>,
    budget: DnsBudget,
    ip: IpAddr,
    helo: String,
    our_hostname: String,
    sender: String,
) -> SpfOutcome {
    let limit = verifier.deadline() + QUEUE_ALLOWANCE;
    let (h, r, s) = (helo.clone(), our_hostname.clone(), sender.clone());
    let check = async move { verifier.spf_within(&budget, ip, &h, &r, &s).await };
    match run(limit, check).await {
        Ok(o) => o,
        Err(lost) => {
            let (result, why) = lost.result();
            tracing::warn!(reason = why, "SPF check lost");
            let mut o = SpfOutcome::unchecked(ip, &helo, &our_hostname, &sender);
            o.result = result;
            o.reason = Some(why.into());
            o
        }
    }
}

impl Lost {
    fn result(&self) -> (AuthResult, &'static str) {
        match self {
            Lost::Late => (AuthResult::TempError, "verification did not finish in time"),
            Lost::Panicked => (AuthResult::PermError, "internal error while verifying"),
        }
    }
}

/// [`Verifier::message_within`] off the I/O threads. The message is lent to
/// the check and handed back (copied only if the check was abandoned).
#[allow(clippy::too_many_arguments)]
pub async fn message(
    verifier: Arc<Verifier>,
    budget: DnsBudget,
    raw: Vec<u8>,
    ip: IpAddr,
    helo: String,
    sender: String,
    spf: Option<SpfOutcome>,
    want: Checks,
) -> (Vec<u8>, MessageOutcome) {
    let limit = verifier.deadline() + QUEUE_ALLOWANCE;
    let raw = Arc::new(raw);
    let lent = raw.clone();
    let check = async move {
        verifier
            .message_within(&budget, &lent, ip, &helo, &sender, spf.as_ref(), want)
            .await
    };
    let outcome = run(limit, check).await;
    let raw = Arc::try_unwrap(raw).unwrap_or_else(|shared| shared.to_vec());
    let outcome = outcome.unwrap_or_else(|lost| {
        let (result, why) = lost.result();
        tracing::warn!(reason = why, "message checks lost");
        lost_outcome(ip, want, result, why)
    });
    (raw, outcome)
}

/// Every requested check with the same result and reason.
fn lost_outcome(ip: IpAddr, want: Checks, result: AuthResult, why: &str) -> MessageOutcome {
    MessageOutcome {
        dkim: (want.dkim || want.dmarc)
            .then(|| vec![DkimSignature::unattributed(result, why.into())]),
        arc: want.arc.then(|| ArcOutcome {
            result: if result == AuthResult::PermError {
                AuthResult::Fail
            } else {
                result
            },
            instances: 0,
            reason: Some(why.into()),
        }),
        dmarc: want.dmarc.then(|| DmarcOutcome {
            result,
            policy: DmarcPolicy::None,
            from_domain: String::new(),
            spf_aligned: false,
            dkim_aligned: false,
            reason: Some(why.into()),
        }),
        remote_ip: ip,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn checks_run_on_the_check_runtime() {
        let name = run(Duration::from_secs(5), async {
            std::thread::current().name().map(str::to_owned)
        })
        .await;
        assert_eq!(name.ok().flatten().as_deref(), Some("mailgate-auth"));
        // a check that never ends is abandoned at the limit
        let late = run(Duration::from_millis(50), std::future::pending::<()>()).await;
        assert!(matches!(late, Err(Lost::Late)));
    }
}
