//! `state:` → [`StateSettings`]: where limiter state lives. Set in one file
//! at most. The password is read here (from `password_file` or
//! `password_env`), so a missing one is a configuration error, not a
//! surprise at the first session.

use super::defaults;
use super::file::{StateFile, StoreKind};
use super::load::Source;
use super::ConfigError;
use crate::state::{StateSettings, StoreSettings};
use std::time::Duration;

/// Bounds of `timeout`: a session waits at most this per stage.
const TIMEOUT_RANGE: (Duration, Duration) = (Duration::from_millis(1), Duration::from_secs(10));
/// Bounds of `lease_ttl`.
const LEASE_TTL_RANGE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(3600));
/// A prefix longer than this is a mistake (every key carries it).
const MAX_PREFIX: usize = 64;
/// A password file larger than this is not a password file.
const MAX_PASSWORD_FILE: u64 = 4096;

pub(super) fn build_state(sources: &[Source]) -> Result<StateSettings, ConfigError> {
    let mut found: Option<(&Source, &StateFile)> = None;
    for s in sources {
        if let Some(st) = &s.parsed.state {
            if found.is_some() {
                return Err(s.err(&["state"], "state is set in more than one file"));
            }
            found = Some((s, st));
        }
    }
    let Some((s, st)) = found else {
        return Ok(StateSettings::Memory);
    };
    let at = |field: &str, message: String| s.err(&["state", field], message);
    if st.store.unwrap_or(StoreKind::Memory) == StoreKind::Memory {
        let set = [
            ("url", st.url.is_some()),
            ("password_file", st.password_file.is_some()),
            ("password_env", st.password_env.is_some()),
            ("prefix", st.prefix.is_some()),
            ("timeout", st.timeout.is_some()),
            ("on_unavailable", st.on_unavailable.is_some()),
            ("lease_ttl", st.lease_ttl.is_some()),
        ];
        if let Some((field, _)) = set.iter().find(|(_, set)| *set) {
            return Err(at(
                field,
                format!("state.{field} needs store: redis (the store is memory)"),
            ));
        }
        return Ok(StateSettings::Memory);
    }
    let Some(url) = st.url.clone() else {
        return Err(at("store", "state: store: redis needs url".into()));
    };
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err(at(
            "url",
            format!(
                "state.url {} must start with redis:// or rediss://",
                crate::state::redact_url(&url)
            ),
        ));
    }
    crate::state::redis::check_url(&url).map_err(|e| at("url", format!("state.url: {e}")))?;
    let in_url = crate::state::redis::url_has_password(&url);
    let password = match (&st.password_file, &st.password_env) {
        (Some(_), Some(_)) => {
            return Err(at(
                "password_env",
                "state: password_file and password_env are both set; give one".into(),
            ))
        }
        (Some(f), None) => Some(
            read_password(&s.resolve(f))
                .map_err(|e| at("password_file", format!("state.password_file {f}: {e}")))?,
        ),
        (None, Some(v)) => match std::env::var(v) {
            Ok(p) if !p.is_empty() => Some(p),
            _ => {
                return Err(at(
                    "password_env",
                    format!("state.password_env: environment variable {v} is not set or empty"),
                ))
            }
        },
        (None, None) => None,
    };
    if in_url && password.is_some() {
        return Err(at(
            "url",
            "state.url carries a password and password_file/password_env gives one too; give one"
                .into(),
        ));
    }
    let prefix = st
        .prefix
        .clone()
        .unwrap_or_else(|| defaults::STATE_PREFIX.into());
    if prefix.is_empty()
        || prefix.len() > MAX_PREFIX
        || !prefix.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(at(
            "prefix",
            format!(
                "state.prefix {prefix:?} must be 1 to {MAX_PREFIX} printable ASCII characters without spaces"
            ),
        ));
    }
    let timeout = st.timeout.map_or(defaults::STATE_TIMEOUT, |t| t.0);
    if timeout < TIMEOUT_RANGE.0 || timeout > TIMEOUT_RANGE.1 {
        return Err(at(
            "timeout",
            "state.timeout must be between 1ms and 10s".into(),
        ));
    }
    let lease_ttl = st.lease_ttl.map_or(defaults::STATE_LEASE_TTL, |t| t.0);
    if lease_ttl < LEASE_TTL_RANGE.0 || lease_ttl > LEASE_TTL_RANGE.1 {
        return Err(at(
            "lease_ttl",
            "state.lease_ttl must be between 1s and 1h".into(),
        ));
    }
    Ok(StateSettings::Redis(StoreSettings {
        url,
        password,
        prefix,
        timeout,
        on_unavailable: st.on_unavailable.unwrap_or(defaults::STATE_ON_UNAVAILABLE),
        lease_ttl,
    }))
}

fn read_password(path: &std::path::Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if meta.len() > MAX_PASSWORD_FILE {
        return Err(format!("larger than {MAX_PASSWORD_FILE} bytes"));
    }
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let p = text.trim_end_matches(['\r', '\n']);
    if p.is_empty() {
        return Err("empty".into());
    }
    Ok(p.to_string())
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{err, load_str, POLICY_BASE};
    use crate::state::{OnUnavailable, StateSettings};
    use std::time::Duration;

    fn with(state: &str) -> String {
        format!("{POLICY_BASE}state:\n{state}")
    }

    #[test]
    fn memory_is_the_default_and_redis_takes_the_contract_fields() {
        let c = load_str("ok.yaml", POLICY_BASE).unwrap();
        assert_eq!(c.state, StateSettings::Memory);
        let c = load_str(
            "ok.yaml",
            &with("  store: redis\n  url: \"redis://127.0.0.1:6379/0\"\n  prefix: \"mg1:\"\n  timeout: 20ms\n  on_unavailable: tempfail\n  lease_ttl: 5s\n"),
        )
        .unwrap();
        let StateSettings::Redis(s) = &c.state else {
            panic!("{:?}", c.state)
        };
        assert_eq!(s.prefix, "mg1:");
        assert_eq!(s.timeout, Duration::from_millis(20));
        assert_eq!(s.on_unavailable, OnUnavailable::Tempfail);
        assert_eq!(s.lease_ttl, Duration::from_secs(5));
        let c = load_str(
            "ok.yaml",
            &with("  store: redis\n  url: \"rediss://cache.example:6380/2\"\n"),
        )
        .unwrap();
        let StateSettings::Redis(s) = &c.state else {
            panic!()
        };
        assert_eq!(
            (s.prefix.as_str(), s.timeout, s.on_unavailable),
            ("mailgate:", Duration::from_millis(50), OnUnavailable::Local)
        );
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let e = err(&with("  store: redis\n"));
        assert!(e.contains("bad.yaml:10:") && e.contains("needs url"), "{e}");
        let e = err(&with("  url: \"redis://127.0.0.1/0\"\n"));
        assert!(
            e.contains("bad.yaml:10:") && e.contains("state.url needs store: redis"),
            "{e}"
        );
        let e = err(&with("  store: redis\n  url: \"http://127.0.0.1/\"\n"));
        assert!(e.contains("bad.yaml:11:") && e.contains("redis://"), "{e}");
        let e = err(&with(
            "  store: redis\n  url: \"redis://127.0.0.1/0\"\n  timeout: 30s\n",
        ));
        assert!(
            e.contains("bad.yaml:12:") && e.contains("state.timeout"),
            "{e}"
        );
        let e = err(&with(
            "  store: redis\n  url: \"redis://127.0.0.1/0\"\n  prefix: \"a b\"\n",
        ));
        assert!(e.contains("state.prefix"), "{e}");
        let e = err(&with(
            "  store: redis\n  url: \"redis://127.0.0.1/0\"\n  password_env: MAILGATE_TEST_SURELY_UNSET_VAR\n",
        ));
        assert!(e.contains("bad.yaml:12:") && e.contains("not set"), "{e}");
        let e = err(&with(
            "  store: redis\n  url: \"redis://127.0.0.1/0\"\n  password_file: /nonexistent/pw\n",
        ));
        assert!(e.contains("state.password_file"), "{e}");
        let e = err(&with(
            "  store: redis\n  url: \"redis://127.0.0.1/0\"\n  on_unavailable: maybe\n",
        ));
        assert!(e.contains("bad.yaml:12:"), "{e}");
    }

    #[test]
    fn passwords_come_from_a_file_and_never_show() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "s3cret-pw\n").unwrap();
        let text = with(&format!(
            "  store: redis\n  url: \"redis://127.0.0.1:6379/0\"\n  password_file: {}\n",
            dir.path().join("pw").display()
        ));
        let c = load_str("ok.yaml", &text).unwrap();
        let StateSettings::Redis(s) = &c.state else {
            panic!()
        };
        assert_eq!(s.password.as_deref(), Some("s3cret-pw"));
        assert!(!format!("{:?}", c.state).contains("s3cret"));
        assert!(!c.state.describe().contains("s3cret"));
        let e = err(&with(&format!(
            "  store: redis\n  url: \"redis://:inurl@127.0.0.1:6379/0\"\n  password_file: {}\n",
            dir.path().join("pw").display()
        )));
        assert!(e.contains("give one") && !e.contains("inurl"), "{e}");
        let c = load_str(
            "ok.yaml",
            &with("  store: redis\n  url: \"redis://:inurl@127.0.0.1:6379/0\"\n"),
        )
        .unwrap();
        let shown = c.state.describe();
        assert!(
            !shown.contains("inurl") && shown.contains("redis://***@127.0.0.1:6379/0"),
            "{shown}"
        );
    }
}
