//! [`Store`]: the shared state on Valkey/Redis through redis-rs's
//! `ConnectionManager` (one multiplexed connection, reconnected by the
//! manager), and the one Lua script (`ops.lua`) every decision runs in: a
//! stage's ops travel in one EVALSHA (redis-rs `Script` loads the script
//! again on NOSCRIPT, after a store restart), so a stage costs one round trip.
//!
//! Each call waits at most `timeout`. After a failed or late call the store
//! counts as down for a backoff (100 ms doubling to 5 s): calls then fail at
//! once instead of each waiting `timeout`, and the first call after the
//! backoff is the probe that finds the store back.

use super::lease::Live;
use super::{Answer, Op, StoreSettings};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn};

const SCRIPT: &str = include_str!("ops.lua");
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The longest a ban lift waits for the store ([`Store::run_lift`]).
pub const LIFT_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store: invalid url {0}: {1}")]
    Url(String, String),
    #[error("state store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("state store is backing off after an error")]
    Down,
    #[error("state store: {0}")]
    Redis(String),
    #[error("state store: unexpected answer to {0}")]
    Answer(&'static str),
}

#[derive(Default)]
struct Breaker {
    down_until: Option<Instant>,
    backoff: Duration,
}

/// The shared store of one process (all listeners and policies use it).
pub struct Store {
    settings: StoreSettings,
    con: ConnectionManager,
    script: redis::Script,
    breaker: Mutex<Breaker>,
    /// This process's id in lease members: a restarted or other instance
    /// never renews or releases another's leases.
    instance: String,
    calls: AtomicU64,
    pub(super) live: Live,
}

impl Store {
    /// Builds the client without connecting (the first call connects): a
    /// store that is down at start is the `on_unavailable` case, not a
    /// start-up failure. Must run inside the tokio runtime.
    pub fn connect(settings: &StoreSettings) -> Result<Arc<Store>, StoreError> {
        let url = settings.redacted_url();
        let mut info = settings
            .url
            .as_str()
            .into_connection_info()
            // redis-rs's message may quote the URL, password included
            .map_err(|_| StoreError::Url(url.clone(), "not a valid redis URL".into()))?;
        if let Some(p) = &settings.password {
            let redis = info.redis_settings().clone().set_password(p);
            info = info.set_redis_settings(redis);
        }
        let client = redis::Client::open(info)
            .map_err(|e| StoreError::Url(url.clone(), format!("{:?}", e.kind())))?;
        let config = ConnectionManagerConfig::new()
            // a connect to a dead host must not hang the manager for minutes;
            // sessions never wait for it anyway (each call has `timeout`)
            .set_connection_timeout(Some(Duration::from_secs(2).max(settings.timeout)))
            .set_response_timeout(None)
            .set_number_of_retries(2)
            .set_max_delay(BACKOFF_MAX);
        let con = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| StoreError::Redis(e.to_string()))?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(Arc::new(Store {
            settings: settings.clone(),
            con,
            script: redis::Script::new(SCRIPT),
            breaker: Mutex::default(),
            instance: format!("{}-{:x}", crate::session_id(), seed.subsec_nanos()),
            calls: AtomicU64::new(0),
            live: Live::default(),
        }))
    }

    pub fn settings(&self) -> &StoreSettings {
        &self.settings
    }

    /// A member unique to this call (its leases, its failure records).
    pub fn token(&self) -> String {
        format!(
            "{}-{}",
            self.instance,
            self.calls.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// True while the store counts as down (readiness reports it).
    pub fn degraded(&self) -> bool {
        self.breaker
            .lock()
            .map(|b| b.down_until.is_some())
            .unwrap_or(true)
    }

    /// Runs `ops` in one script call under `timeout`. The answers stop after
    /// an op that refused with `stop` (fewer answers than ops). Boxed: the
    /// call's state lives on the heap while it runs, so the session futures
    /// that may call the store stay small without one (tests/session_memory.rs).
    pub async fn run(&self, ops: &[Op], token: &str) -> Result<Vec<Answer>, StoreError> {
        Box::pin(self.run_within(ops, token, self.settings.timeout, "stage")).await
    }

    /// Runs `ops` on a task of its own: a write no session waits for (a
    /// ban, a lift, a triage pass). `failed`: the warning when it fails
    /// (`None`: nothing to say, the entry simply is not shared). Without a
    /// runtime (unit tests of the callers) nothing is sent.
    pub fn run_in_background(self: &Arc<Self>, ops: Vec<Op>, failed: Option<&'static str>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = self.clone();
        rt.spawn(async move {
            if store.run(&ops, &store.token()).await.is_err() {
                if let Some(message) = failed {
                    warn!("{message}");
                }
            }
        });
    }

    /// [`run`](Self::run) for a ban lift over the metrics endpoint, which
    /// answers within [`LIFT_WAIT`] at most whatever `timeout` is: the
    /// endpoint gives a request 10 s, 3 of them for its head, and an
    /// operator must hear that the store did not answer.
    pub async fn run_lift(&self, ops: &[Op], token: &str) -> Result<Vec<Answer>, StoreError> {
        let within = self.settings.timeout.min(LIFT_WAIT);
        Box::pin(self.run_within(ops, token, within, "lift")).await
    }

    pub(super) async fn run_within(
        &self,
        ops: &[Op],
        token: &str,
        within: Duration,
        what: &'static str,
    ) -> Result<Vec<Answer>, StoreError> {
        let mut inv = self.script.prepare_invoke();
        inv.arg(token)
            .arg(self.settings.lease_ttl.as_millis() as u64);
        for op in ops {
            let (key, args) = encode(op);
            inv.key(key);
            for a in args {
                inv.arg(a);
            }
        }
        let mut con = self.con.clone();
        let v: Value = self
            .call(
                what,
                within,
                async move { inv.invoke_async(&mut con).await },
            )
            .await?;
        let Value::Array(items) = v else {
            return Err(StoreError::Answer("script"));
        };
        ops.iter()
            .zip(items)
            .map(|(op, v)| decode(op, v).ok_or(StoreError::Answer("an op")))
            .collect()
    }

    /// PING under `timeout` (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut con = self.con.clone();
        self.call("ping", self.settings.timeout, async move {
            redis::cmd("PING").query_async::<()>(&mut con).await
        })
        .await
    }

    async fn call<T>(
        &self,
        what: &'static str,
        within: Duration,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        if self
            .breaker
            .lock()
            .ok()
            .and_then(|b| b.down_until)
            .is_some_and(|until| Instant::now() < until)
        {
            return Err(StoreError::Down);
        }
        let t0 = Instant::now();
        let r = match tokio::time::timeout(within, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::Redis(e.to_string())),
            Err(_) => Err(StoreError::Timeout(within)),
        };
        crate::observe::metrics().store_call(what, t0.elapsed().as_secs_f64(), r.is_ok());
        let mut b = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
        match &r {
            Ok(_) if b.down_until.is_some() => {
                info!(store = %self.settings.redacted_url(), "state store reachable again: limits are shared again");
                *b = Breaker::default();
            }
            Ok(_) => {}
            Err(e) => {
                if b.down_until.is_none() {
                    warn!(store = %self.settings.redacted_url(), error = %e, on_unavailable = self.settings.on_unavailable.as_str(), "state store unavailable");
                }
                b.backoff = (b.backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
                b.down_until = Some(Instant::now() + b.backoff);
            }
        }
        r
    }

    /// Adds or renews `member` of the TTL set `set` (a `keys::ttl_set`
    /// name, such as `bans`) with `value`, for `ttl`; a member already
    /// living longer is kept as it is; at most `max` members are kept.
    pub async fn ttl_set_put(
        &self,
        set: &str,
        member: &str,
        value: &str,
        ttl: Duration,
        max: u32,
    ) -> Result<(), StoreError> {
        let op = Op::SetPut {
            key: super::keys::ttl_set(&self.settings.prefix, set),
            member: member.into(),
            value: value.into(),
            ttl,
            max,
        };
        self.run(&[op], &self.token()).await.map(|_| ())
    }

    /// A live member's value and remaining time.
    pub async fn ttl_set_get(
        &self,
        set: &str,
        member: &str,
    ) -> Result<Option<(String, Duration)>, StoreError> {
        let op = Op::SetGet {
            key: super::keys::ttl_set(&self.settings.prefix, set),
            member: member.into(),
        };
        Ok(match self.run(&[op], &self.token()).await?.pop() {
            Some(Answer::Member(v, left)) => Some((v, left)),
            _ => None,
        })
    }

    pub async fn ttl_set_remove(&self, set: &str, member: &str) -> Result<(), StoreError> {
        let op = Op::SetRemove {
            key: super::keys::ttl_set(&self.settings.prefix, set),
            member: member.into(),
        };
        self.run(&[op], &self.token()).await.map(|_| ())
    }

    /// Up to `max` live members: (member, value, remaining).
    pub async fn ttl_set_list(
        &self,
        set: &str,
        max: u32,
    ) -> Result<Vec<(String, String, Duration)>, StoreError> {
        let op = Op::SetList {
            key: super::keys::ttl_set(&self.settings.prefix, set),
            max,
        };
        Ok(match self.run(&[op], &self.token()).await?.pop() {
            Some(Answer::Members(m)) => m,
            _ => Vec::new(),
        })
    }
}

/// Whether redis-rs accepts `url` (`config` validates with it).
pub fn check_url(url: &str) -> Result<(), String> {
    url.into_connection_info()
        .map(|_| ())
        .map_err(|_| "not a valid redis URL".to_string())
}

/// Whether `url` carries a password (`redis://:pw@host`).
pub fn url_has_password(url: &str) -> bool {
    url.into_connection_info()
        .is_ok_and(|i| i.redis_settings().password().is_some())
}

fn flag(b: bool) -> String {
    if b { "1" } else { "0" }.into()
}

fn ms(d: Duration) -> String {
    d.as_millis().max(1).to_string()
}

/// An op as (key, [kind, a, b, c, d]) for `ops.lua`.
fn encode(op: &Op) -> (&str, [String; 5]) {
    let e = String::new;
    match op {
        Op::Rate {
            key,
            per_cell,
            burst_time,
            stop,
        } => (
            key,
            [
                "rate".into(),
                per_cell.as_micros().max(1).to_string(),
                burst_time.as_micros().to_string(),
                flag(*stop),
                e(),
            ],
        ),
        Op::Lease { key, max, stop } => (
            key,
            ["lease".into(), max.to_string(), e(), flag(*stop), e()],
        ),
        Op::Renew { key, member } => (key, ["renew".into(), e(), e(), member.clone(), e()]),
        Op::Release { key, member } => (key, ["release".into(), e(), e(), member.clone(), e()]),
        Op::KnownGood { key, trust } => (key, ["good".into(), ms(*trust), e(), e(), e()]),
        Op::Locked {
            key,
            max,
            window,
            stop,
            spare_if_good,
        } => (
            key,
            [
                "locked".into(),
                max.to_string(),
                ms(*window),
                flag(*stop),
                flag(*spare_if_good),
            ],
        ),
        Op::Fail { key, max, window } => {
            (key, ["fail".into(), max.to_string(), ms(*window), e(), e()])
        }
        Op::Remember { key, ttl } => (key, ["remember".into(), ms(*ttl), e(), e(), e()]),
        Op::SetPut {
            key,
            member,
            value,
            ttl,
            max,
        } => (
            key,
            [
                "put".into(),
                ms(*ttl),
                (*max).max(1).to_string(),
                member.clone(),
                value.clone(),
            ],
        ),
        Op::SetGet { key, member } => (key, ["get".into(), e(), e(), member.clone(), e()]),
        Op::SetRemove { key, member } => (key, ["remove".into(), e(), e(), member.clone(), e()]),
        Op::SetList { key, max } => (key, ["list".into(), max.to_string(), e(), e(), e()]),
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

fn millis(n: i64) -> Duration {
    Duration::from_millis(n.max(0) as u64)
}

/// One op's answer from the script's reply.
fn decode(op: &Op, v: Value) -> Option<Answer> {
    Some(match op {
        Op::Rate { .. } => match int(&v)? {
            0 => Answer::Ok,
            us => Answer::Wait(Duration::from_micros(us.max(1) as u64)),
        },
        Op::Lease { .. } => match int(&v)? {
            0 => Answer::Ok,
            _ => Answer::Full,
        },
        Op::KnownGood { .. } => match int(&v)? {
            0 => Answer::Ok,
            _ => Answer::Good,
        },
        Op::Locked { .. } => match int(&v)? {
            0 => Answer::Ok,
            -1 => Answer::Spared,
            n => Answer::Wait(millis(n)),
        },
        Op::SetGet { .. } => match v {
            Value::Array(pair) if pair.len() == 2 => {
                Answer::Member(text(&pair[1])?, millis(int(&pair[0])?))
            }
            _ => Answer::Ok,
        },
        Op::SetList { .. } => match v {
            Value::Array(flat) => Answer::Members(
                flat.chunks(3)
                    .filter_map(|c| match c {
                        [m, val, left] => Some((text(m)?, text(val)?, millis(int(left)?))),
                        _ => None,
                    })
                    .collect(),
            ),
            _ => Answer::Members(Vec::new()),
        },
        Op::SetRemove { .. } => match int(&v) {
            Some(1) => Answer::Removed,
            _ => Answer::Ok,
        },
        Op::Renew { .. }
        | Op::Release { .. }
        | Op::Fail { .. }
        | Op::Remember { .. }
        | Op::SetPut { .. } => Answer::Ok,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_encode_five_values_and_decode_answers() {
        let op = Op::Rate {
            key: "m:r:1:2".into(),
            per_cell: Duration::from_secs(6),
            burst_time: Duration::from_secs(60),
            stop: true,
        };
        let (k, a) = encode(&op);
        assert_eq!(k, "m:r:1:2");
        assert_eq!(a, ["rate", "6000000", "60000000", "1", ""]);
        let (_, a) = encode(&Op::Locked {
            key: "k".into(),
            max: 5,
            window: Duration::from_secs(900),
            stop: false,
            spare_if_good: true,
        });
        assert_eq!(a, ["locked", "5", "900000", "0", "1"]);
        let rate = Op::Rate {
            key: "k".into(),
            per_cell: Duration::from_secs(1),
            burst_time: Duration::from_secs(1),
            stop: true,
        };
        assert_eq!(decode(&rate, Value::Int(0)), Some(Answer::Ok));
        assert_eq!(
            decode(&rate, Value::Int(1500)),
            Some(Answer::Wait(Duration::from_micros(1500)))
        );
        assert_eq!(
            decode(&rate, Value::Nil),
            None,
            "a malformed answer is an error"
        );
        let locked = Op::Locked {
            key: "k".into(),
            max: 1,
            window: Duration::from_secs(1),
            stop: true,
            spare_if_good: true,
        };
        assert_eq!(decode(&locked, Value::Int(-1)), Some(Answer::Spared));
        let get = Op::SetGet {
            key: "k".into(),
            member: "192.0.2.1".into(),
        };
        assert_eq!(
            decode(
                &get,
                Value::Array(vec![Value::Int(2000), Value::BulkString(b"why".to_vec())])
            ),
            Some(Answer::Member("why".into(), Duration::from_secs(2)))
        );
        assert_eq!(decode(&get, Value::Int(0)), Some(Answer::Ok));
    }
}
