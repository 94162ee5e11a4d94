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
//! The queue in front of the runtime is bounded: at most
//! [`SLOTS_PER_THREAD`] checks per thread are admitted; a check that gets no
//! slot within [`SLOT_WAIT`] is not run. A check that does not come back
//! within its deadline plus a queueing allowance (the runtime is busy) is
//! abandoned. Either way the check was not completed by mailgate, which
//! the policy answers with a tempfail ([`NotChecked`]), never with the
//! `temperror:` action meant for DNS trouble.

use super::cache::DnsBudget;
use super::verify::{
    ArcOutcome, AuthResult, Checks, DkimSignature, DmarcOutcome, DmarcPolicy, MessageOutcome,
    NotChecked, SpfOutcome, Verifier,
};
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::Semaphore;

/// Time a check may wait for a thread of the check runtime, on top of its deadline.
const QUEUE_ALLOWANCE: Duration = Duration::from_secs(5);
/// Checks admitted to the check runtime at once, per thread: enough to
/// overlap DNS waits, few enough that an admitted check is not starved.
pub const SLOTS_PER_THREAD: usize = 8;
/// How long a check waits for a slot before it is refused as not checked.
pub const SLOT_WAIT: Duration = Duration::from_secs(2);

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).clamp(1, 4))
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads())
            .thread_name("mailgate-auth")
            .enable_all()
            .build()
            .expect("the check runtime starts (threads and timers only)")
    })
}

/// The bounded queue in front of [`runtime`].
fn slots() -> &'static Arc<Semaphore> {
    static SLOTS: OnceLock<Arc<Semaphore>> = OnceLock::new();
    SLOTS.get_or_init(|| Arc::new(Semaphore::new(threads() * SLOTS_PER_THREAD)))
}

/// Why a check did not return a result.
#[derive(Debug)]
enum Lost {
    /// No slot of the check runtime within [`SLOT_WAIT`].
    Busy,
    Late,
    Panicked,
}

/// Runs `check` on the check runtime; `Err` when it does not finish within `limit`.
async fn run<T: Send + 'static>(
    limit: Duration,
    check: impl Future<Output = T> + Send + 'static,
) -> Result<T, Lost> {
    run_in(slots(), limit, check).await
}

/// [`run`] with the admission of `slots`.
async fn run_in<T: Send + 'static>(
    slots: &Arc<Semaphore>,
    limit: Duration,
    check: impl Future<Output = T> + Send + 'static,
) -> Result<T, Lost> {
    let Ok(Ok(slot)) = tokio::time::timeout(SLOT_WAIT, slots.clone().acquire_owned()).await else {
        return Err(Lost::Busy);
    };
    // the slot is freed when the check ends or is aborted (its future dropped)
    let handle = runtime().spawn(async move {
        let _slot = slot;
        check.await
    });
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
            o.not_checked = lost.not_checked("spf");
            o
        }
    }
}

impl Lost {
    fn result(&self) -> (AuthResult, &'static str) {
        match self {
            Lost::Busy => (AuthResult::TempError, "check runtime over capacity"),
            Lost::Late => (AuthResult::TempError, "verification did not finish in time"),
            Lost::Panicked => (AuthResult::PermError, "internal error while verifying"),
        }
    }

    /// Busy and late checks were not completed by mailgate; a panic is a
    /// result (`permerror`: the same message would panic again).
    fn not_checked(&self, check: &'static str) -> Option<NotChecked> {
        match self {
            Lost::Busy | Lost::Late => Some(NotChecked {
                check,
                reason: self.result().1.into(),
                runtime_busy: matches!(self, Lost::Busy),
            }),
            Lost::Panicked => None,
        }
    }
}

/// [`Verifier::message_within`] off the I/O threads. The message is lent to
/// the check and handed back, never copied: when the check is abandoned
/// while it still holds the message, the message is given up (empty) and
/// the outcome is [`NotChecked`], which the policy always tempfails.
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
    // a check that ended has dropped its share; an abandoned one may not yet
    let (raw, lost) = match (Arc::try_unwrap(raw), outcome) {
        (Ok(raw), Ok(o)) => return (raw, o),
        (Ok(raw), Err(lost)) => (raw, lost),
        (Err(_), Err(lost @ (Lost::Busy | Lost::Late))) => (Vec::new(), lost),
        // never seen: still shared after the check ended; refused, not copied
        (Err(_), _) => (Vec::new(), Lost::Late),
    };
    tracing::warn!(reason = lost.result().1, "message checks lost");
    (raw, lost_outcome(ip, want, &lost))
}

/// How long signing one message may take (hashing its body once per key).
pub const SIGN_LIMIT: Duration = Duration::from_secs(30);

/// [`crate::sign::sign`] off the I/O threads, admitted like a check: over
/// `prefix` (our header fields) and `raw` (the message), which is lent and
/// handed back as in [`message`]. When the signing could not run, the
/// result is [`SignError::NotRun`](crate::sign::SignError::NotRun), which
/// the session answers with a tempfail: the message never leaves unsigned
/// by accident.
pub async fn sign(
    policy: Arc<crate::sign::SignPolicy>,
    keys: Vec<Arc<crate::sign::SignKey>>,
    prefix: String,
    raw: Vec<u8>,
) -> (Vec<u8>, Result<String, crate::sign::SignError>) {
    let raw = Arc::new(raw);
    let lent = raw.clone();
    let job = async move { crate::sign::sign(&policy, &keys, &[prefix.as_bytes(), &lent]) };
    let outcome = run(SIGN_LIMIT + QUEUE_ALLOWANCE, job).await;
    let why = |lost: &Lost| {
        crate::sign::SignError::NotRun(match lost {
            Lost::Busy => "check runtime over capacity",
            Lost::Late => "signing did not finish in time",
            Lost::Panicked => "internal error while signing",
        })
    };
    match (Arc::try_unwrap(raw), outcome) {
        (Ok(raw), Ok(r)) => (raw, r),
        (Ok(raw), Err(lost)) => (raw, Err(why(&lost))),
        // abandoned while it still held the message: given up, not copied
        (Err(_), Err(lost)) => (Vec::new(), Err(why(&lost))),
        (Err(_), Ok(_)) => (Vec::new(), Err(why(&Lost::Late))),
    }
}

/// The name a lost set of message checks is reported under.
fn first_check(want: Checks) -> &'static str {
    if want.dmarc {
        "dmarc"
    } else if want.dkim {
        "dkim"
    } else {
        "arc"
    }
}

/// Every requested check with the same result and reason.
fn lost_outcome(ip: IpAddr, want: Checks, lost: &Lost) -> MessageOutcome {
    let (result, why) = lost.result();
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
        not_checked: lost.not_checked(first_check(want)),
        dns: Default::default(),
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

    /// A check abandoned as late was not completed: tempfail, even for a
    /// policy without `temperror` keys (their default, accept, would let
    /// whoever keeps the check runtime busy past DMARC).
    #[test]
    fn a_late_check_tempfails_whatever_temperror_says() {
        let policy: crate::auth::AuthPolicy = serde_yaml::from_str(
            "authserv_id: mx.example\nspf: { fail: reject }\ndkim: { fail: tag }\ndmarc: { enforce: true }\n",
        )
        .unwrap();
        let ip = "192.0.2.1".parse().unwrap();
        for lost in [Lost::Late, Lost::Busy] {
            let o = lost_outcome(ip, policy.checks(), &lost);
            let v = crate::auth::decide(&policy, &o);
            assert_eq!(v.action, crate::action::PolicyAction::Tempfail, "{v:?}");
            assert!(v.reason.starts_with("DMARC not checked: "), "{v:?}");
        }
        // a panic is a result (permerror), judged by the policy's keys
        let o = lost_outcome(ip, policy.checks(), &Lost::Panicked);
        assert!(o.not_checked.is_none());
    }

    /// Signing borrows the message and hands it back unchanged with the
    /// signature fields.
    #[tokio::test]
    async fn signing_hands_the_message_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        let new = crate::sign::generate(None).unwrap();
        crate::sign::key::write_new(&path, &new.pem).unwrap();
        let key = crate::sign::load_key("example.org", "s", &path).unwrap();
        let policy = Arc::new(crate::sign::SignPolicy {
            keys: vec![key],
            unknown_domain: crate::sign::UnknownDomain::Reject,
            match_envelope_sender: false,
            canonicalization: (
                mail_auth::dkim::Canonicalization::Relaxed,
                mail_auth::dkim::Canonicalization::Relaxed,
            ),
            expiry: None,
        });
        let raw = b"From: a@example.org\r\n\r\nbody\r\n".to_vec();
        let (back, r) = sign(
            policy.clone(),
            policy.keys.clone(),
            "Received: by gw\r\n".into(),
            raw.clone(),
        )
        .await;
        assert_eq!(back, raw);
        let fields = r.unwrap();
        assert!(
            fields.starts_with("DKIM-Signature: v=1; a=ed25519-sha256; s=s; d=example.org;"),
            "{fields}"
        );
    }

    /// The queue in front of the check runtime is bounded: with every slot
    /// taken a check is refused after [`SLOT_WAIT`], and an abandoned
    /// check gives its slot back.
    #[tokio::test]
    async fn check_runtime_admission_is_bounded() {
        let slots = Arc::new(Semaphore::new(1));
        let late = run_in(
            &slots,
            Duration::from_millis(50),
            std::future::pending::<()>(),
        )
        .await;
        assert!(matches!(late, Err(Lost::Late)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            slots.available_permits(),
            1,
            "the aborted check's slot is free"
        );
        let held = slots.clone().acquire_owned().await.unwrap();
        let started = std::time::Instant::now();
        let busy = run_in(&slots, Duration::from_secs(5), async {}).await;
        assert!(matches!(busy, Err(Lost::Busy)), "{busy:?}");
        assert!(started.elapsed() >= SLOT_WAIT);
        // the outcome says so, for the driver to count (`check_runtime` busy)
        assert!(Lost::Busy
            .not_checked("spf")
            .is_some_and(|n| n.runtime_busy));
        assert!(Lost::Late
            .not_checked("spf")
            .is_some_and(|n| !n.runtime_busy));
        drop(held);
        assert!(run_in(&slots, Duration::from_secs(5), async {})
            .await
            .is_ok());
    }
}
