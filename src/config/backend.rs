//! `backends:` entries → [`Backend`]: the address, EHLO name, how the client's
//! identity is passed on, and TLS to the backend.

use super::file::{BackendFile, BackendTlsFile, IdentityMethod, Protocol, ReuseFile};
use super::load::{valid_hostname, Source};
use super::{defaults, ConfigError};
use crate::backend::stream::{client_config, BackendTls, BackendTlsMode};
use crate::backend::{Backend, Reuse};
use std::sync::Arc;

/// One `backends:` entry → a [`Backend`]; `hostname` is the default EHLO name.
pub(super) fn build_backend(
    s: &Source,
    name: &str,
    b: &BackendFile,
    hostname: &str,
) -> Result<Backend, ConfigError> {
    if !b.address.contains(':')
        || b.address
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .is_none()
    {
        return Err(s.err(
            &["backends", name, &b.address],
            format!("backends.{name}.address {:?} must be host:port", b.address),
        ));
    }
    if let Some(h) = &b.helo_name {
        if !valid_hostname(h) {
            return Err(s.err(
                &[name, h],
                format!("backends.{name}.helo_name {h:?} is not a valid host name"),
            ));
        }
    }
    let has = |m: IdentityMethod| b.identity.as_ref().is_some_and(|v| v.contains(&m));
    let imap_id = has(IdentityMethod::ImapId);
    // one backend address speaks one protocol: XCLIENT is SMTP's, ID IMAP's
    if imap_id && has(IdentityMethod::Xclient) {
        return Err(s.err(
            &["backends", name, "identity"],
            format!(
                "backends.{name}.identity: imap_id (IMAP backends) and xclient (SMTP backends) \
                 cannot both apply to one backend"
            ),
        ));
    }
    let tls = match b.tls {
        None | Some(BackendTlsFile::None) => None,
        Some(mode) => {
            let host = b.server_name.clone().unwrap_or_else(|| {
                let h = b
                    .address
                    .rsplit_once(':')
                    .map(|x| x.0)
                    .unwrap_or(&b.address);
                h.trim_start_matches('[').trim_end_matches(']').to_string()
            });
            let server_name =
                rustls::pki_types::ServerName::try_from(host.clone()).map_err(|_| {
                    s.err(
                        &["backends", name],
                        format!("backends.{name}: {host:?} is not a valid TLS server name"),
                    )
                })?;
            let ca = b.ca.as_ref().map(|c| s.resolve(c));
            let cfg = client_config(ca.as_deref(), b.pin_sha256.as_deref().unwrap_or(&[]))
                .map_err(|e| {
                    s.err(
                        &["backends", name, "tls"],
                        format!("backends.{name}.tls: {e}"),
                    )
                })?;
            Some(Arc::new(BackendTls {
                mode: if mode == BackendTlsFile::Starttls {
                    BackendTlsMode::Starttls
                } else {
                    BackendTlsMode::Implicit
                },
                connector: tokio_rustls::TlsConnector::from(cfg),
                server_name,
            }))
        }
    };
    let reuse = match &b.reuse {
        None => Reuse::default(),
        Some(r) => build_reuse(s, name, b, r)?,
    };
    Ok(Backend {
        reuse,
        tls,
        name: name.to_string(),
        address: b.address.clone(),
        helo_name: b.helo_name.clone().unwrap_or_else(|| hostname.to_string()),
        xclient: b
            .identity
            .as_ref()
            .is_some_and(|v| v.contains(&IdentityMethod::Xclient)),
        proxy_v2: b
            .identity
            .as_ref()
            .is_some_and(|v| v.contains(&IdentityMethod::ProxyV2)),
        identity_optional: b.identity_optional.unwrap_or(defaults::IDENTITY_OPTIONAL),
        imap_id,
    })
}

/// `reuse:` → [`Reuse`]. A connection that told the backend one client's
/// identity for good (PROXY v2, at connect) must never serve the next
/// client: refused here rather than quietly not reused. XCLIENT can be told
/// again, per session (`backend/pool.rs`).
fn build_reuse(
    s: &Source,
    name: &str,
    b: &BackendFile,
    r: &ReuseFile,
) -> Result<Reuse, ConfigError> {
    let has = |m: IdentityMethod| b.identity.as_ref().is_some_and(|v| v.contains(&m));
    if has(IdentityMethod::ProxyV2) {
        return Err(s.err(
            &["backends", name, "reuse"],
            format!(
                "backends.{name}.reuse: a connection that began with one client's PROXY v2 \
                 header (identity: proxy_v2) cannot serve the next client"
            ),
        ));
    }
    let idle_timeout = r
        .idle_timeout
        .map(|t| t.0)
        .unwrap_or(defaults::REUSE_IDLE_TIMEOUT);
    // RFC 5321 §4.5.3.2.7: a server may close after 5 minutes idle; kept
    // longer, most idle connections would be dead when taken
    // at least a second: `check` shows whole seconds
    if idle_timeout < std::time::Duration::from_secs(1)
        || idle_timeout > std::time::Duration::from_secs(300)
    {
        return Err(s.err(
            &["backends", name, "reuse", "idle_timeout"],
            format!("backends.{name}.reuse.idle_timeout must be between 1s and 5m"),
        ));
    }
    let max_sessions = r.max_sessions.unwrap_or(defaults::REUSE_MAX_SESSIONS);
    if max_sessions == 0 {
        return Err(s.err(
            &["backends", name, "reuse", "max_sessions"],
            format!("backends.{name}.reuse.max_sessions must be at least 1"),
        ));
    }
    let max_idle = r.max_idle.unwrap_or(defaults::REUSE_MAX_IDLE);
    if max_idle > MAX_REUSE_IDLE {
        return Err(s.err(
            &["backends", name, "reuse", "max_idle"],
            format!("backends.{name}.reuse.max_idle must be at most {MAX_REUSE_IDLE}"),
        ));
    }
    Ok(Reuse {
        max_idle,
        idle_timeout,
        max_sessions,
    })
}

/// Idle connections kept per backend at most (each holds a descriptor here
/// and a process or slot on the backend).
const MAX_REUSE_IDLE: usize = 1000;

/// What a listener's protocol can apply of its backend's identity methods:
/// `imap_id` is IMAP's, so a listener of another protocol would silently
/// not send it (refused instead).
pub(super) fn check_for_listener(
    s: &Source,
    listener: &str,
    protocol: Protocol,
    backend_name: &str,
    b: &Backend,
) -> Result<(), ConfigError> {
    if b.imap_id && protocol != Protocol::Imap {
        return Err(s.err(
            &["listeners", listener, backend_name],
            format!(
                "listeners.{listener}: backend {backend_name:?} has identity: [imap_id], \
                 which applies to imap listeners only"
            ),
        ));
    }
    // a POP3 or IMAP backend connection holds one user's login: never reused
    if b.reuse.max_idle > 0 && protocol != Protocol::Smtp {
        return Err(s.err(
            &["listeners", listener, backend_name],
            format!(
                "listeners.{listener}: backend {backend_name:?} has reuse:, \
                 which applies to smtp listeners only (a POP3 or IMAP connection holds one login)"
            ),
        ));
    }
    // XCLIENT is an SMTP command: a POP3 or IMAP backend never gets it, so
    // accepting it there would drop the configured identity silently
    if b.xclient && protocol != Protocol::Smtp {
        return Err(s.err(
            &["listeners", listener, backend_name],
            format!(
                "listeners.{listener}: backend {backend_name:?} has identity: [xclient], \
                 which applies to smtp listeners only"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::fixtures::*;

    const IMAP_ID: &str = "backends:\n  a: { address: \"127.0.0.1:1\", identity: [imap_id] }\nlisteners:\n  - { name: imap, protocol: imap, bind: \"127.0.0.1:143\", tls: none, backend: a }\n";

    /// `identity: [imap_id]` is read, shown by `check`, and cannot be
    /// combined with SMTP's XCLIENT on one backend.
    #[test]
    fn imap_id_identity() {
        let c = load_str("i.yaml", IMAP_ID).unwrap();
        assert!(c.listeners[0].backend.imap_id && !c.listeners[0].backend.xclient);
        let s = c.summary();
        assert!(s.contains("identity=[imap_id, received]"), "{s}");
        assert!(s.contains("IMAP backends only"), "{s}");
        let e = err(&IMAP_ID.replace("[imap_id]", "[imap_id, xclient]"));
        assert!(
            e.starts_with("bad.yaml:2:") && e.contains("backends.a.identity"),
            "{e}"
        );
        let plain = load_str("p.yaml", &IMAP_ID.replace("[imap_id]", "[received]")).unwrap();
        assert!(!plain.listeners[0].backend.imap_id);
        // only IMAP listeners send ID
        for other in ["smtp", "pop3"] {
            let e = err(&IMAP_ID.replace("protocol: imap", &format!("protocol: {other}")));
            assert!(
                e.starts_with("bad.yaml:4:") && e.contains("imap listeners only"),
                "{other}: {e}"
            );
        }
    }

    /// `identity: [xclient]` is refused on a backend of a POP3 or IMAP
    /// listener: nothing there would send XCLIENT.
    #[test]
    fn xclient_identity_on_smtp_listeners_only() {
        let smtp = IMAP_ID
            .replace("[imap_id]", "[xclient]")
            .replace("protocol: imap", "protocol: smtp");
        assert!(
            load_str("s.yaml", &smtp).unwrap().listeners[0]
                .backend
                .xclient
        );
        for other in ["pop3", "imap"] {
            let e = err(&smtp.replace("protocol: smtp", &format!("protocol: {other}")));
            assert!(
                e.starts_with("bad.yaml:4:")
                    && e.contains("listeners.")
                    && e.contains("identity: [xclient]")
                    && e.contains("smtp listeners only"),
                "{other}: {e}"
            );
        }
    }
}
