//! The client-connection layer every protocol driver stands on: what a
//! session loads at accept ([`SessionCtx`] over the listener's
//! [`ListenerRuntime`]), the client stream with implicit TLS, STARTTLS, the
//! wait for the next command and the end-of-session log (`client.rs`), the
//! login guard around a backend login (`login.rs`), SASL PLAIN (`sasl.rs`),
//! the pieces the after-login relays share (`pipe.rs`), and the
//! process-wide in-flight message budget (`inflight.rs`).
//!
//! The layer sends no reply of its own: where it ends a wait (timeout,
//! session lifetime, shutdown) it writes what the protocol's session decided
//! ([`Replies`]); where a login is refused it asks the session
//! ([`login::Login`]). `server.rs` builds the context and calls the drivers;
//! the drivers (`smtp/driver.rs`, `pop3/driver.rs`, `imap/driver.rs`) depend on this layer,
//! never on `server.rs`.

pub mod client;
pub mod inflight;
pub mod login;
pub mod pipe;
pub mod sasl;

use crate::backend::caps::CapsCache;
use crate::config::Listener;
use crate::policy::{BanEvent, Hit, Policy};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;

/// Counts the rules a policy evaluation says fired, and the bans they made
/// or did not make (metrics are counted at the edges: the server, the
/// drivers and the login guard call this).
pub fn count_hits(hits: &[Hit]) {
    let m = crate::observe::metrics();
    for h in hits {
        m.policy_hit(&h.policy, &h.rule, h.shadow);
        match h.ban {
            Some(BanEvent::Banned { active, evicted }) => {
                m.banned(&h.policy, &h.rule, active, evicted)
            }
            Some(BanEvent::Protected) => m.ban_skipped(&h.policy, &h.rule, "trusted_proxy"),
            Some(BanEvent::Shadow) => m.ban_skipped(&h.policy, &h.rule, "shadow"),
            None => {}
        }
    }
}

/// One listener's configuration snapshot: what a new session loads once at
/// accept and keeps for its whole life (across STARTTLS). Reload swaps it.
pub struct ListenerRuntime {
    pub listener: Arc<Listener>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub policy: Option<Arc<Policy>>,
    /// SPF/DKIM/DMARC verifier (one per configuration; its DNS cache is shared).
    pub verifier: Option<Arc<crate::auth::Verifier>>,
    /// The policy's triage (SMTP listeners with a `triage:` block only).
    pub triage: Option<Arc<crate::triage::Triage>>,
}

/// What one session needs, loaded once at accept and kept for its lifetime.
#[derive(Clone)]
pub struct SessionCtx {
    /// The listener's snapshot as it was at accept (a reload does not change it).
    pub runtime: Arc<ListenerRuntime>,
    pub caps: Arc<CapsCache>,
    /// Idle SMTP backend connections for later sessions (`reuse:`).
    pub pool: Arc<crate::backend::pool::SmtpPool>,
    pub shutdown: watch::Receiver<bool>,
    /// The address the client connected to (from PROXY when a balancer sent one).
    pub local: SocketAddr,
    /// Process-wide budget for message bytes in flight (`server.max_inflight_data`).
    pub inflight: Arc<inflight::Budget>,
}

impl SessionCtx {
    pub fn listener(&self) -> &Arc<Listener> {
        &self.runtime.listener
    }

    /// The listener's TLS configuration (implicit TLS, STARTTLS/STLS).
    pub fn tls(&self) -> Option<&Arc<rustls::ServerConfig>> {
        self.runtime.tls.as_ref()
    }

    pub fn policy(&self) -> Option<&Arc<Policy>> {
        self.runtime.policy.as_ref()
    }

    pub fn verifier(&self) -> Option<&Arc<crate::auth::Verifier>> {
        self.runtime.verifier.as_ref()
    }

    pub fn triage(&self) -> Option<&Arc<crate::triage::Triage>> {
        self.runtime.triage.as_ref()
    }
}

/// A protocol's reply as the layer handles it: written into the output
/// buffer as it is, summarised for logs.
pub trait Wire {
    fn write_to(&self, out: &mut Vec<u8>);
    /// The status line, for logs.
    fn summary(&self) -> String;
}

/// The replies the layer writes when it ends a wait, chosen by the
/// protocol's session (never by the layer).
pub trait Replies {
    type Reply: Wire;
    /// No command within `timeouts.command` (or no data within its timeout).
    fn timed_out(&self) -> Self::Reply;
    /// The session's lifetime (`timeouts.session`) is over.
    fn session_over(&self) -> Self::Reply;
    /// The gateway shuts down while the session waits for a command (or,
    /// after login, once nothing is outstanding at the backend).
    fn shutting_down(&self) -> Self::Reply;
}

/// Why the connection closes after a session's closing reply: what the
/// session-end log says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The client said QUIT.
    Quit,
    /// A limit or a refusal: the log shows the reply.
    Refused,
    /// The log gives this reason instead of the reply.
    Because(&'static str),
}

/// Why a session ended (the `outcome` of the session-end log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    Quit,
    ClientClosed,
    Timeout,
    Shutdown,
    /// A reason of the protocol's (a limit, how its pipe ended).
    Because(&'static str),
    /// The summary of the reply the session closed with, or an I/O error.
    Error(String),
}

impl End {
    /// The end after the session's closing reply `r`.
    pub fn closing(r: &impl Wire, ending: Ending) -> End {
        match ending {
            Ending::Quit => End::Quit,
            Ending::Refused => End::Error(r.summary()),
            Ending::Because(why) => End::Because(why),
        }
    }

    /// The outcome as `session_ends_total` counts it: a fixed set (a
    /// closing reply's text, an I/O error's, is `error`).
    pub fn label(&self) -> &'static str {
        match self {
            End::Quit => "quit",
            End::ClientClosed => "client_closed",
            End::Timeout => "timeout",
            End::Shutdown => "shutdown",
            End::Because(why) => why,
            End::Error(_) => "error",
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            End::Quit => "quit",
            End::ClientClosed => "client closed",
            End::Timeout => "timeout",
            End::Shutdown => "shutdown",
            End::Because(why) => why,
            End::Error(e) => e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Line(&'static str);

    impl Wire for Line {
        fn write_to(&self, out: &mut Vec<u8>) {
            out.extend_from_slice(self.0.as_bytes());
        }
        fn summary(&self) -> String {
            self.0.trim_end().to_string()
        }
    }

    #[test]
    fn closing_ends_name_their_reason() {
        let r = Line("-ERR Too many errors\r\n");
        assert_eq!(End::closing(&r, Ending::Quit).as_str(), "quit");
        assert_eq!(
            End::closing(&r, Ending::Refused).as_str(),
            "-ERR Too many errors"
        );
        assert_eq!(
            End::closing(&r, Ending::Because("too many login failures")).as_str(),
            "too many login failures"
        );
        assert_eq!(End::Shutdown.as_str(), "shutdown");
        // the metric's label never carries the reply's text
        assert_eq!(End::closing(&r, Ending::Refused).label(), "error");
        assert_eq!(End::ClientClosed.label(), "client_closed");
    }
}
