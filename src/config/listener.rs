//! `listeners:` entries → [`Listener`]: bind address, TLS mode, the backend and
//! policy they name, per-session limits and [`Timeouts`].

use super::defaults::{self, timeouts as deft};
use super::file::ListenerFile;
use super::load::{valid_hostname, Source};
use super::{AuthMode, BareNewlines, ConfigError, Protocol, TlsMode};
use crate::backend::{Backend, Deadlines};
use crate::policy::PolicySpec;
use crate::units;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Timeouts {
    pub tls_handshake: Duration,
    pub command: Duration,
    pub data: Duration,
    pub session: Duration,
    /// `backend_connect`, `backend_reply`, `backend_data`.
    pub backend: Deadlines,
    /// After login (POP3 transaction state, IMAP authenticated state): idle time.
    pub idle: Duration,
}

#[derive(Debug, Clone)]
pub struct Listener {
    pub name: String,
    pub protocol: Protocol,
    pub bind: SocketAddr,
    pub tls: TlsMode,
    pub require_tls: bool,
    pub backend: Arc<Backend>,
    pub policy: Option<Arc<PolicySpec>>,
    pub auth: AuthMode,
    /// Peers that must (and alone may) send a PROXY header, and its deadline.
    pub proxy_trusted: Option<(Vec<units::Cidr>, Duration)>,
    pub hostname: String,
    pub max_connections: usize,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_errors: u32,
    pub bare_newlines: BareNewlines,
    pub max_command_line: usize,
    pub max_text_line: usize,
    pub apop: bool,
    pub max_login_failures: u32,
    pub login_failure_delay: Duration,
    pub timeouts: Timeouts,
    pub max_transactions: u32,
    /// PROXY `LOCAL`/`UNKNOWN` (no client address) accepted from trusted peers.
    pub proxy_allow_local: bool,
    /// APOP listeners: sessions holding a backend connection before login.
    pub apop_max_pending: usize,
    /// APOP listeners: the command deadline while such a connection is held.
    pub apop_prelogin_timeout: Duration,
    /// Every authserv-id of the configuration (all policies' `authserv_id`,
    /// `server.hostname`, every listener's host name), lower case: the
    /// `Authentication-Results` claiming any of them are removed from
    /// incoming mail on every SMTP listener, since a backend behind several
    /// listeners may trust each of them.
    pub authserv_ids: Arc<[String]>,
}

pub(super) fn build_listener(
    s: &Source,
    l: &ListenerFile,
    hostname: &str,
    backends: &BTreeMap<String, (Arc<Backend>, usize)>,
    policies: &BTreeMap<String, (Arc<PolicySpec>, usize)>,
) -> Result<Listener, ConfigError> {
    let name = &l.name;
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(s.err(
            &["name", name],
            format!("listener name {name:?}: use letters, digits, - and _"),
        ));
    }
    let bind: SocketAddr = l.bind.parse().map_err(|_| {
        s.err(
            &[name, &l.bind],
            format!(
                "listeners.{name}.bind {:?} must be IP:port, e.g. \"0.0.0.0:25\"",
                l.bind
            ),
        )
    })?;
    let backend = backends
        .get(&l.backend)
        .map(|b| b.0.clone())
        .ok_or_else(|| {
            s.err(
                &[name, &l.backend],
                format!(
                    "listeners.{name}.backend {:?} is not defined under backends:",
                    l.backend
                ),
            )
        })?;
    let policy = match &l.policy {
        None => None,
        Some(p) => Some(policies.get(p).map(|p| p.0.clone()).ok_or_else(|| {
            s.err(
                &[name, p],
                format!("listeners.{name}.policy {p:?} is not defined under policies:"),
            )
        })?),
    };
    let auth = l.auth.unwrap_or(defaults::AUTH);
    if auth != AuthMode::None && (l.protocol != Protocol::Smtp || l.tls == TlsMode::None) {
        return Err(s.err(&[name, "auth"], format!(
            "listeners.{name}.auth applies to smtp listeners with tls: starttls or implicit (credentials only over TLS)")));
    }
    if matches!(l.protocol, Protocol::Pop3 | Protocol::Imap)
        && backend
            .tls
            .as_ref()
            .is_some_and(|t| t.mode == crate::backend::stream::BackendTlsMode::Starttls)
    {
        return Err(s.err(&[name, &l.backend], format!(
            "listeners.{name}: backend {:?} uses tls: starttls, which is supported for SMTP backends only (use implicit)", l.backend)));
    }
    super::backend::check_for_listener(s, name, l.protocol, &l.backend, &backend)?;
    if let Some(h) = &l.hostname {
        if !valid_hostname(h) {
            return Err(s.err(
                &[name, h],
                format!("listeners.{name}.hostname {h:?} is not a valid host name"),
            ));
        }
    }
    let require_tls = match (l.tls, l.require_tls, l.protocol) {
        (TlsMode::None, Some(true), _) => {
            return Err(s.err(
                &[name, "require_tls"],
                format!("listeners.{name}: require_tls needs tls: starttls or implicit"),
            ))
        }
        (TlsMode::Implicit, _, _) => true,
        (_, Some(v), _) => v,
        // RFC 8314 / DESIGN §4: no POP3 or IMAP login before TLS unless
        // explicitly allowed
        (TlsMode::Starttls, None, Protocol::Pop3 | Protocol::Imap) => true,
        (_, None, _) => false,
    };
    if l.apop == Some(true) && l.protocol != Protocol::Pop3 {
        return Err(s.err(
            &[name, "apop"],
            format!("listeners.{name}.apop applies to pop3 listeners only"),
        ));
    }
    let checked = |v: Option<usize>, def: usize, min: usize, max: usize, field: &str| {
        let v = v.unwrap_or(def);
        if v < min || v > max {
            Err(s.err(
                &[name, field],
                format!("listeners.{name}.{field} must be between {min} and {max}"),
            ))
        } else {
            Ok(v)
        }
    };
    let t = &l.timeouts;
    let d = |v: Option<units::Secs>, def: Duration| v.map(|s| s.0).unwrap_or(def);
    let max_message_size = l
        .max_message_size
        .map(|b| b.0)
        .unwrap_or(defaults::MAX_MESSAGE_SIZE);
    if l.apop_prelogin_timeout.is_some_and(|t| t.0.is_zero()) {
        return Err(s.err(
            &[name, "apop_prelogin_timeout"],
            format!("listeners.{name}.apop_prelogin_timeout must be more than 0s"),
        ));
    }
    if max_message_size < 1024 {
        return Err(s.err(
            &[name, "max_message_size"],
            format!("listeners.{name}.max_message_size must be at least 1KiB"),
        ));
    }
    Ok(Listener {
        name: name.clone(),
        protocol: l.protocol,
        bind,
        tls: l.tls,
        require_tls,
        backend,
        policy,
        auth,
        proxy_trusted: l.proxy_protocol.as_ref().map(|p| {
            (
                p.trusted.clone(),
                p.timeout.map(|t| t.0).unwrap_or(defaults::PROXY_TIMEOUT),
            )
        }),
        hostname: l.hostname.clone().unwrap_or_else(|| hostname.to_string()),
        max_connections: checked(
            l.max_connections,
            defaults::MAX_CONNECTIONS,
            1,
            1_000_000,
            "max_connections",
        )?,
        max_message_size,
        max_recipients: checked(
            l.max_recipients,
            defaults::MAX_RECIPIENTS,
            1,
            100_000,
            "max_recipients",
        )?,
        max_errors: checked(
            l.max_errors.map(|v| v as usize),
            defaults::MAX_ERRORS as usize,
            1,
            10_000,
            "max_errors",
        )? as u32,
        bare_newlines: l.bare_newlines.unwrap_or(defaults::BARE_NEWLINES),
        max_command_line: checked(
            l.max_command_line,
            if l.protocol == Protocol::Imap {
                defaults::IMAP_MAX_COMMAND_LINE
            } else {
                defaults::MAX_COMMAND_LINE
            },
            512,
            65536,
            "max_command_line",
        )?,
        max_text_line: checked(
            l.max_text_line,
            defaults::MAX_TEXT_LINE,
            1000,
            1_048_576,
            "max_text_line",
        )?,
        apop: l.apop.unwrap_or(defaults::APOP),
        max_login_failures: checked(
            l.max_login_failures.map(|v| v as usize),
            defaults::MAX_LOGIN_FAILURES as usize,
            1,
            100,
            "max_login_failures",
        )? as u32,
        login_failure_delay: l
            .login_failure_delay
            .map(|s| s.0)
            .unwrap_or(defaults::LOGIN_FAILURE_DELAY),
        timeouts: Timeouts {
            tls_handshake: d(t.tls_handshake, deft::TLS_HANDSHAKE),
            command: d(t.command, deft::COMMAND),
            data: d(t.data, deft::DATA),
            session: d(t.session, deft::SESSION),
            backend: Deadlines {
                connect: d(t.backend_connect, deft::BACKEND_CONNECT),
                reply: d(t.backend_reply, deft::BACKEND_REPLY),
                data: d(t.backend_data, deft::BACKEND_DATA),
            },
            idle: d(
                t.idle,
                if l.protocol == Protocol::Imap {
                    deft::IMAP_IDLE
                } else {
                    deft::IDLE
                },
            ),
        },
        max_transactions: checked(
            l.max_transactions.map(|v| v as usize),
            defaults::MAX_TRANSACTIONS as usize,
            1,
            1_000_000,
            "max_transactions",
        )? as u32,
        proxy_allow_local: l
            .proxy_protocol
            .as_ref()
            .and_then(|p| p.allow_local)
            .unwrap_or(defaults::PROXY_ALLOW_LOCAL),
        apop_max_pending: checked(
            l.apop_max_pending,
            defaults::APOP_MAX_PENDING,
            1,
            100_000,
            "apop_max_pending",
        )?,
        apop_prelogin_timeout: d(l.apop_prelogin_timeout, defaults::APOP_PRELOGIN_TIMEOUT),
        authserv_ids: Arc::from([]),
    })
}

#[cfg(test)]
mod tests {
    use crate::config::fixtures::*;

    #[test]
    fn unknown_backend_is_located() {
        let e = err("backends:\n  a: { address: \"127.0.0.1:1\" }\nlisteners:\n  - { name: mx, protocol: smtp, bind: \"127.0.0.1:25\", tls: none, backend: nosuch }\n");
        assert!(e.starts_with("bad.yaml:4:"), "{e}");
        assert!(e.contains("nosuch"), "{e}");
    }

    #[test]
    fn bad_values() {
        let base = "backends:\n  a: { address: \"127.0.0.1:1\" }\nlisteners:\n  - { name: mx, protocol: smtp, bind: \"127.0.0.1:25\", tls: none, backend: a";
        assert!(err(&format!("{base}, tls: sometimes }}\n")).contains("bad.yaml:4:"));
        assert!(err(&format!("{base}, max_message_size: 12 parsecs }}\n")).contains("invalid size"));
        assert!(err(&format!("{base}, require_tls: true }}\n")).contains("require_tls"));
        assert!(err(&format!("{base}, policy: nope }}\n")).contains("policy"));
        assert!(err(&format!("{base}, max_command_line: 10 }}\n")).contains("max_command_line"));
        assert!(err("listeners: [ { name: x } ]\n").contains("missing field"));
        assert!(err("backends:\n  a: { address: \"nowhere\" }\n").contains("host:port"));
        assert!(err("{}\n").contains("no listeners"));
        assert!(err("listeners: [\n").starts_with("bad.yaml:"));
    }

    #[test]
    fn tls_needs_a_certificate() {
        let e = err("backends:\n  a: { address: \"127.0.0.1:1\" }\nlisteners:\n  - { name: mx, protocol: smtp, bind: \"127.0.0.1:25\", tls: starttls, backend: a }\n");
        assert!(e.contains("tls.certificates"), "{e}");
    }

    #[test]
    fn pop3_starttls_requires_tls_by_default() {
        let c = load_str("p.yaml", "tls: { certificates: [ { cert: c, key: k } ] }\nbackends:\n  p: { address: \"127.0.0.1:110\" }\nlisteners:\n  - { name: pop, protocol: pop3, bind: \"127.0.0.1:1110\", tls: starttls, backend: p }\n").unwrap();
        assert!(c.listeners[0].require_tls);
    }

    #[test]
    fn imap_listeners_default_to_require_tls_and_imap_bounds() {
        let base = "tls: { certificates: [ { cert: c, key: k } ] }\nbackends:\n  i: { address: \"127.0.0.1:143\" }\nlisteners:\n  - { name: imap, protocol: imap, bind: \"127.0.0.1:1143\", tls: starttls, backend: i";
        let c = load_str("i.yaml", &format!("{base} }}\n")).unwrap();
        let l = &c.listeners[0];
        assert_eq!(l.protocol, crate::config::Protocol::Imap);
        assert!(l.require_tls);
        assert_eq!(l.max_command_line, 8192);
        assert_eq!(l.timeouts.idle, std::time::Duration::from_secs(1800));
        let c = load_str(
            "i.yaml",
            &format!(
                "{base}, require_tls: false, max_command_line: 1000, timeouts: {{ idle: 5m }} }}\n"
            ),
        )
        .unwrap();
        let l = &c.listeners[0];
        assert!(!l.require_tls);
        assert_eq!(l.max_command_line, 1000);
        assert_eq!(l.timeouts.idle, std::time::Duration::from_secs(300));
        assert!(err(&format!("{base}, apop: true }}\n")).contains("apop"));
    }

    #[test]
    fn inflight_budget_and_transaction_cap() {
        let base = "backends:\n  a: { address: \"127.0.0.1:1\" }\nlisteners:\n  - { name: mx, protocol: smtp, bind: \"127.0.0.1:25\", tls: none, backend: a";
        let c = load_str("d.yaml", &format!("{base} }}\n")).unwrap();
        assert_eq!(c.max_inflight_data, 512 * 1024 * 1024);
        assert_eq!(c.listeners[0].max_transactions, 100);
        assert_eq!(c.listeners[0].max_login_failures, 3);
        let c = load_str(
            "s.yaml",
            &format!("server: {{ max_inflight_data: 64MiB }}\n{base}, max_transactions: 7 }}\n"),
        )
        .unwrap();
        assert_eq!(c.max_inflight_data, 64 * 1024 * 1024);
        assert_eq!(c.listeners[0].max_transactions, 7);
        assert!(c.summary().contains("max_transactions=7"));
        let e = load_str(
            "t.yaml",
            &format!("server: {{ max_inflight_data: 1KiB }}\n{base} }}\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("max_inflight_data must be at least 1MiB"), "{e}");
        let e = load_str("u.yaml", &format!("{base}, max_transactions: 0 }}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_transactions must be between"), "{e}");
        // a budget smaller than a message the listener accepts: said by `check`
        let c = load_str(
            "v.yaml",
            &format!(
                "server: {{ max_inflight_data: 10MiB }}\n{base}, max_message_size: 20MiB }}\n"
            ),
        )
        .unwrap();
        let host = crate::config::warnings::Host {
            memory: None,
            certificates: vec![],
            now: std::time::SystemTime::now(),
        };
        let ws = crate::config::warnings::of(&c, &host);
        assert!(c
            .check_output(&ws)
            .contains("warning: message-size-over-inflight: listener mx: max_message_size"));
    }
}
