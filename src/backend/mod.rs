//! Clients of the legacy servers behind mailgate. This module owns what it
//! needs to connect ([`Backend`], [`Deadlines`]; `config` builds them from
//! YAML) and what it learns (`caps.rs`), and returns facts (login replies,
//! connect times) for the drivers to map to replies and count.

pub mod caps;
pub mod imap;
pub mod pool;
pub mod pop3;
pub mod probe;
pub mod reply;
pub mod smtp;
pub mod stream;

use std::sync::Arc;
use std::time::Duration;

/// One `backends:` entry, validated.
#[derive(Debug, Clone)]
pub struct Backend {
    pub name: String,
    pub address: String,
    pub helo_name: String,
    pub xclient: bool,
    pub proxy_v2: bool,
    /// TLS to the backend, when configured.
    pub tls: Option<Arc<stream::BackendTls>>,
    /// Relay even when XCLIENT cannot be applied (explicit opt-out).
    pub identity_optional: bool,
    /// Dovecot's `ID` with the client's address before an IMAP login
    /// (`identity: [imap_id]`); IMAP backends only.
    pub imap_id: bool,
    /// SMTP: idle connections kept for later client sessions (`reuse:`).
    pub reuse: Reuse,
}

/// `backends.NAME.reuse`: how many idle SMTP backend connections are kept
/// for the next client sessions, for how long, and how many sessions one
/// connection serves. `max_idle: 0` (the default, no `reuse:`) is off: each
/// client session has its own backend connection, as the backend would see
/// without mailgate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reuse {
    pub max_idle: usize,
    pub idle_timeout: Duration,
    pub max_sessions: u32,
}

/// A listener's deadlines for its backend (`timeouts.backend_connect`,
/// `backend_reply`, `backend_data`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// TCP connect, TLS handshake and greeting.
    pub connect: Duration,
    /// Each reply to a command.
    pub reply: Duration,
    /// The whole message body write (SMTP DATA).
    pub data: Duration,
}

#[cfg(test)]
mod tests {
    #[test]
    fn xtext_encodes_specials() {
        assert_eq!(super::xtext("client.example"), "client.example");
        assert_eq!(super::xtext("a+b=c d"), "a+2Bb+3Dc+20d");
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Nothing listening, DNS failure, connect timeout, or a refusing greeting.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The connection broke.
    #[error("backend connection failed: {0}")]
    Failed(String),
    /// A reply did not come in time. Apart from `Failed` because the backend
    /// may have taken the command: it is never sent again elsewhere (a login
    /// replayed after a timeout would reach the backend's lockout twice).
    #[error("backend connection failed: {0}")]
    TimedOut(String),
    /// The backend said something that is not valid here.
    #[error("backend protocol error: {0}")]
    Protocol(String),
    /// The backend wrote before it was asked (an unsolicited or extra reply):
    /// every later reply would answer the wrong command. Reported apart from
    /// `Protocol` so that the driver can count it (`backend_out_of_step`).
    #[error("backend protocol error: {0}")]
    OutOfStep(String),
    /// The configured client identity (XCLIENT, PROXY v2) could not be
    /// applied; the connection is not used (fail closed).
    #[error("client identity not applied: {0}")]
    Identity(String),
    /// The connection does not offer an extension the command needs end to
    /// end (SMTP `SmtpCaps::lacks`); nothing was sent, and the connection
    /// is as it was (in step: it stays the session's). The session had
    /// promised it from the capability cache, which this connection has
    /// corrected.
    #[error("the backend does not offer {0}")]
    Lacks(&'static str),
}

impl From<crate::codec::CodecError> for BackendError {
    fn from(e: crate::codec::CodecError) -> Self {
        match e {
            crate::codec::CodecError::TooLong(_) => {
                BackendError::Protocol("reply line too long".into())
            }
            crate::codec::CodecError::Timeout => BackendError::TimedOut("reply timed out".into()),
            other => BackendError::Failed(other.to_string()),
        }
    }
}

/// Who the client is, for backends configured to be told (XCLIENT, PROXY v2).
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    pub peer: std::net::SocketAddr,
    pub local: std::net::SocketAddr,
    pub helo: Option<String>,
    pub esmtp: bool,
}

/// xtext (RFC 3461 §4) for XCLIENT values: `+XX` for `+`, `=`, controls, space, 8-bit.
pub fn xtext(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// Connects to `backend` and, where it is configured for PROXY v2 and the
/// client is known (`id`), writes the header first: it belongs to the TCP
/// connection, before any TLS, and is never partial (the backend would read
/// garbage, or take the connection as coming from mailgate itself).
pub async fn connect_with_proxy(
    backend: &Backend,
    deadline: std::time::Duration,
    id: Option<&ClientIdentity>,
) -> Result<tokio::net::TcpStream, BackendError> {
    let mut tcp = connect(&backend.address, deadline).await?;
    if let (true, Some(id)) = (backend.proxy_v2, id) {
        use tokio::io::AsyncWriteExt;
        let header = crate::transport::proxy_v2_header(id.peer, id.local)
            .map_err(|e| BackendError::Identity(e.to_string()))?;
        tcp.write_all(&header)
            .await
            .map_err(|e| BackendError::Failed(format!("PROXY header: {e}")))?;
    }
    Ok(tcp)
}

/// Connects with TCP_NODELAY under a deadline; `address` is `host:port`.
pub async fn connect(
    address: &str,
    deadline: std::time::Duration,
) -> Result<tokio::net::TcpStream, BackendError> {
    match tokio::time::timeout(deadline, tokio::net::TcpStream::connect(address)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(BackendError::Unavailable(format!("{address}: {e}"))),
        Err(_) => Err(BackendError::Unavailable(format!(
            "{address}: connect timed out"
        ))),
    }
}
