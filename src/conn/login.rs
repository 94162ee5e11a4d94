//! The login guard, for every protocol: the policy's login check
//! (failed-login locks, login rates) before anything reaches the backend,
//! the backend login, the policy's success / failure bookkeeping after it,
//! and the failure delay that slows down guessing within one session. The
//! protocol supplies the backend login and, through its session, every
//! reply ([`Login`]); the guard only sequences and waits. [`replay`] is the
//! backend side every protocol shares: which connection carries a login,
//! and when a fresh one is tried.

use crate::action::PolicyAction;
use crate::backend::BackendError;
use crate::policy::{Decision, Facts, Policy};
use std::future::Future;
use std::time::Duration;
use tracing::info;

/// What the session made of a login: its action, and how the login policy
/// and the failure delay count it.
#[derive(Debug, PartialEq, Eq)]
pub enum LoginResult<A> {
    /// Accepted: the policy counts a success.
    Succeeded(A),
    /// Wrong credentials: the policy counts a failure, and the answer waits
    /// the failure delay.
    Failed(A),
    /// Not charged to the policy (it may be the backend's trouble, or the
    /// policy itself refused), but answered after the failure delay: a guess
    /// cannot be told apart.
    Refused(A),
    /// Not counted, answered at once (the backend's trouble).
    Undecided(A),
}

impl<A> LoginResult<A> {
    pub fn into_action(self) -> A {
        match self {
            LoginResult::Succeeded(a)
            | LoginResult::Failed(a)
            | LoginResult::Refused(a)
            | LoginResult::Undecided(a) => a,
        }
    }

    pub fn action(&self) -> &A {
        match self {
            LoginResult::Succeeded(a)
            | LoginResult::Failed(a)
            | LoginResult::Refused(a)
            | LoginResult::Undecided(a) => a,
        }
    }

    /// The answer waits `login_failure_delay`.
    pub fn delayed(&self) -> bool {
        matches!(self, LoginResult::Failed(_) | LoginResult::Refused(_))
    }
}

/// One login attempt as a protocol carries it out.
pub trait Login {
    type Action;
    /// What the policy sees (`auth_user` set to the login's user).
    fn facts(&self) -> Facts<'_>;
    /// The session's answer to a login the policy refused with `action`.
    fn refused(&mut self, action: PolicyAction) -> LoginResult<Self::Action>;
    /// The login on the backend, and the session's answer to its outcome.
    fn attempt(&mut self) -> impl Future<Output = LoginResult<Self::Action>> + Send;
}

/// Runs one login through the policy (`None`: no login rules) and the
/// backend; the action comes back after the failure delay where it applies.
pub async fn guard<L: Login + Send>(
    login: &mut L,
    policy: Option<&Policy>,
    failure_delay: Duration,
) -> L::Action {
    let decision = match policy {
        Some(p) => {
            let checked = p.login_allowed_shared(&login.facts()).await;
            // counted here, at the edge, from the rules the policy says fired
            super::count_hits(&checked.hits);
            Some(checked.decision)
        }
        None => None,
    };
    let result = match decision {
        Some(Decision::Refuse { action, rule }) => {
            info!(
                user = login.facts().auth_user.unwrap_or("-"),
                rule = %rule,
                "login refused by policy"
            );
            login.refused(action)
        }
        d => {
            if let Some(Decision::Delay(d)) = d {
                tokio::time::sleep(d).await;
            }
            let result = login.attempt().await;
            if let Some(p) = policy {
                match &result {
                    LoginResult::Succeeded(_) => p.login_succeeded_shared(&login.facts()).await,
                    // a ban this failure makes holds from the next command
                    // and connection on; the failure's answer stands
                    LoginResult::Failed(_) => {
                        super::count_hits(&p.login_failed_shared(&login.facts()).await.hits)
                    }
                    LoginResult::Refused(_) | LoginResult::Undecided(_) => {}
                }
            }
            result
        }
    };
    if result.delayed() {
        tokio::time::sleep(failure_delay).await;
    }
    result.into_action()
}

/// How a login replay on the backend ended ([`replay`]).
#[derive(Debug)]
pub enum Replayed<R> {
    /// The backend's answer.
    Answer(R),
    /// Out of step on a fresh connection too: never a login result.
    OutOfStep,
    /// No usable connection (connect failed, or it broke).
    Failed(BackendError),
}

/// One login as a protocol's backend client carries it out ([`replay`]).
pub trait Replay {
    /// The backend connection.
    type Conn: Send;
    /// The backend's answer.
    type Answer;
    fn connect(&mut self) -> impl Future<Output = Result<Self::Conn, BackendError>> + Send;
    /// The login on `conn`; `None`: the backend is out of step (it spoke
    /// unasked, or had closed), so nothing it says is an answer.
    fn login(
        &mut self,
        conn: &mut Self::Conn,
    ) -> impl Future<Output = Result<Option<Self::Answer>, BackendError>> + Send;
}

/// Replays one login on the session's backend connection `slot`
/// (connected first where there is none), for every protocol: a backend
/// out of step is never believed, and the login moves to one fresh
/// connection; so does a login whose connection broke after an earlier
/// attempt on it (the backend may have closed it since), but not one that
/// timed out (the backend may be working on it). `fresh`: whether
/// those moves are allowed (POP3's APOP is bound to the connection it
/// greeted with). `used` says the connection carried a login; `slot` is
/// left empty whenever the connection is not usable any more (it stays
/// after [`BackendError::Lacks`]: nothing went over it).
pub async fn replay<P: Replay>(
    p: &mut P,
    slot: &mut Option<P::Conn>,
    used: &mut bool,
    fresh: bool,
) -> Replayed<P::Answer> {
    let retry = slot.is_some() && *used;
    for attempt in 0..2 {
        let conn = match slot {
            Some(c) => c,
            None => match p.connect().await {
                Ok(c) => slot.insert(c),
                Err(e) => return Replayed::Failed(e),
            },
        };
        *used = true;
        match p.login(conn).await {
            Ok(Some(r)) => return Replayed::Answer(r),
            Ok(None) => {
                *slot = None;
                if attempt == 0 && fresh {
                    continue;
                }
                return Replayed::OutOfStep;
            }
            // one that lacks what the command needs was sent nothing: in
            // step, it stays the session's (not lost: no other is tried)
            Err(e @ BackendError::Lacks(_)) => return Replayed::Failed(e),
            Err(e) => {
                *slot = None;
                // a timeout is not a close: the backend may have taken the
                // login, and a second one elsewhere would count twice there
                let timed_out = matches!(e, BackendError::TimedOut(_));
                if attempt == 0 && retry && fresh && !timed_out {
                    tracing::debug!(error = %e, "backend connection lost; reconnecting");
                    continue;
                }
                return Replayed::Failed(e);
            }
        }
    }
    Replayed::OutOfStep
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    /// Records what the guard asked of it.
    struct Probe {
        user: &'static str,
        result: fn(&'static str) -> LoginResult<&'static str>,
        attempts: u32,
        refusals: Vec<PolicyAction>,
    }

    impl Login for Probe {
        type Action = &'static str;
        fn facts(&self) -> Facts<'_> {
            let mut f = Facts::new(IpAddr::V4(Ipv4Addr::LOCALHOST), "l");
            f.auth_user = Some(self.user);
            f
        }
        fn refused(&mut self, action: PolicyAction) -> LoginResult<&'static str> {
            self.refusals.push(action);
            LoginResult::Refused("refused")
        }
        async fn attempt(&mut self) -> LoginResult<&'static str> {
            self.attempts += 1;
            (self.result)("backend")
        }
    }

    fn probe(result: fn(&'static str) -> LoginResult<&'static str>) -> Probe {
        Probe {
            user: "alice",
            result,
            attempts: 0,
            refusals: Vec::new(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failure_delay_only_where_the_session_says() {
        let delay = Duration::from_secs(3);
        for (result, delayed) in [
            (LoginResult::Succeeded as fn(_) -> _, false),
            (LoginResult::Failed, true),
            (LoginResult::Refused, true),
            (LoginResult::Undecided, false),
        ] {
            let mut p = probe(result);
            let t = tokio::time::Instant::now();
            assert_eq!(guard(&mut p, None, delay).await, "backend");
            assert_eq!(p.attempts, 1);
            assert!(p.refusals.is_empty());
            assert_eq!(t.elapsed() >= delay, delayed);
        }
    }

    /// The policy's side of the bracket: failures the session calls `Failed`
    /// are charged, and once the lock holds, the backend is not tried and the
    /// session answers the refusal.
    #[tokio::test(start_paused = true)]
    async fn policy_lock_refuses_before_the_backend() {
        let yaml = "backends:\n  a: { address: \"127.0.0.1:1\" }\nlisteners:\n  - { name: l, protocol: pop3, bind: \"127.0.0.1:110\", tls: none, backend: a, policy: p }\npolicies:\n  p:\n    limits:\n      - { key: [auth_user], auth_failures: 2/15minutes, action: tempfail }\n";
        let c = crate::config::load_str("g.yaml", yaml).unwrap();
        let state = crate::policy::PolicyState::new(
            crate::config::defaults::KNOWN_GOOD,
            crate::config::defaults::MAX_TRACKED_KEYS,
        );
        let policy = crate::policy::Policies::compile(&c.policies, &state)
            .get("p")
            .unwrap();
        let mut p = probe(LoginResult::Failed);
        for _ in 0..2 {
            assert_eq!(
                guard(&mut p, Some(&policy), Duration::ZERO).await,
                "backend"
            );
        }
        assert_eq!(
            guard(&mut p, Some(&policy), Duration::ZERO).await,
            "refused"
        );
        assert_eq!(p.attempts, 2, "the locked login never reached the backend");
        assert_eq!(p.refusals, vec![PolicyAction::Tempfail]);
        // `Refused` and `Undecided` are not charged: another user's lock
        // never comes from them
        let mut p = probe(LoginResult::Refused);
        p.user = "bob";
        for _ in 0..3 {
            assert_eq!(
                guard(&mut p, Some(&policy), Duration::ZERO).await,
                "backend"
            );
        }
        assert_eq!(p.attempts, 3);
    }

    /// A backend client whose logins answer from a script: `Ok(None)` is
    /// out of step, `Err("slow")` a reply timeout, any other `Err` a broken
    /// connection.
    struct Script {
        connects: u32,
        answers: Vec<Result<Option<&'static str>, &'static str>>,
    }

    impl Replay for Script {
        type Conn = u32;
        type Answer = &'static str;
        async fn connect(&mut self) -> Result<u32, BackendError> {
            self.connects += 1;
            Ok(self.connects)
        }
        async fn login(&mut self, _: &mut u32) -> Result<Option<&'static str>, BackendError> {
            self.answers.remove(0).map_err(|e| match e {
                "slow" => BackendError::TimedOut(e.into()),
                _ => BackendError::Failed(e.into()),
            })
        }
    }

    fn script(answers: Vec<Result<Option<&'static str>, &'static str>>) -> Script {
        Script {
            connects: 0,
            answers,
        }
    }

    #[tokio::test]
    async fn replay_moves_to_one_fresh_connection_where_allowed() {
        let answer = |r: Replayed<&'static str>| match r {
            Replayed::Answer(a) => a,
            Replayed::OutOfStep => "out of step",
            Replayed::Failed(_) => "failed",
        };
        // out of step: a fresh connection once
        let (mut slot, mut used) = (None, false);
        let mut s = script(vec![Ok(None), Ok(Some("ok"))]);
        assert_eq!(
            answer(replay(&mut s, &mut slot, &mut used, true).await),
            "ok"
        );
        assert_eq!((s.connects, slot, used), (2, Some(2), true));
        // twice out of step: never an answer
        let (mut slot, mut used) = (None, false);
        let mut s = script(vec![Ok(None), Ok(None)]);
        assert_eq!(
            answer(replay(&mut s, &mut slot, &mut used, true).await),
            "out of step"
        );
        assert_eq!(slot, None);
        // APOP: bound to its connection
        let (mut slot, mut used) = (Some(7), false);
        let mut s = script(vec![Ok(None)]);
        assert_eq!(
            answer(replay(&mut s, &mut slot, &mut used, false).await),
            "out of step"
        );
        assert_eq!(s.connects, 0);
        // a used connection that broke: once more on a fresh one
        let (mut slot, mut used) = (Some(7), true);
        let mut s = script(vec![Err("gone"), Ok(Some("ok"))]);
        assert_eq!(
            answer(replay(&mut s, &mut slot, &mut used, true).await),
            "ok"
        );
        assert_eq!(s.connects, 1);
        // a new connection that broke: no second try
        let (mut slot, mut used) = (None, false);
        let mut s = script(vec![Err("gone")]);
        assert_eq!(
            answer(replay(&mut s, &mut slot, &mut used, true).await),
            "failed"
        );
        assert_eq!((s.connects, slot), (1, None));
        // a used connection that timed out: the backend may have the login,
        // so it is not sent again elsewhere (a lockout would count it twice)
        let (mut slot, mut used) = (Some(7), true);
        let mut s = script(vec![Err("slow"), Ok(Some("ok"))]);
        assert_eq!(
            answer(replay(&mut s, &mut slot, &mut used, true).await),
            "failed"
        );
        assert_eq!((s.connects, slot), (0, None));
    }

    #[test]
    fn into_action_and_delayed() {
        assert_eq!(LoginResult::Failed(7).into_action(), 7);
        assert!(LoginResult::Refused(()).delayed());
        assert!(!LoginResult::Succeeded(()).delayed());
        assert!(!LoginResult::Undecided(()).delayed());
    }
}
