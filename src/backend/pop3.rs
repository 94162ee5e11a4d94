//! POP3 client for the legacy server: greeting (with its APOP timestamp),
//! CAPA, and the login replayed in a form the backend supports — USER/PASS,
//! SASL PLAIN when USER is missing
//! or an authorization identity must be carried, or APOP. After `+OK` the
//! connection is handed to the driver's pipe via [`Pop3Backend::into_parts`].
//! Before each login command the conversation must be in step (nothing
//! unread, not closed), or the attempt is not believed.
//!
//! Capabilities are learnt at every connection and kept per backend in a
//! process-wide cache, so CAPA answers to clients (given before any backend
//! connection of their own) can reflect them.

use super::BackendError;
use crate::codec::Conn;
use crate::config::{Backend, Timeouts};
use crate::pop3::command::base64_encode;
use crate::pop3::session::{BackendCaps, Login, LoginOutcome};
use bytes::BytesMut;
use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};
use std::time::Duration;

/// Longest status or CAPA line accepted from a backend (RFC 2449 §4: 512).
pub const MAX_LINE: usize = 1024;
/// Most CAPA lines read from a backend.
const MAX_CAPA_LINES: usize = 64;

/// A backend status line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Ok(String),
    Err(String),
    /// `+ ` SASL continuation
    Continue,
}

/// Parses `+OK text`, `-ERR text` or `+ …`; anything else is a protocol error.
pub fn parse_status(line: &[u8]) -> Result<Status, BackendError> {
    let text = |rest: &[u8]| {
        String::from_utf8_lossy(rest)
            .trim_start_matches(' ')
            .to_string()
    };
    let upper: Vec<u8> = line.iter().take(4).map(u8::to_ascii_uppercase).collect();
    if upper.starts_with(b"+OK") && line.get(3).is_none_or(|b| *b == b' ') {
        Ok(Status::Ok(text(&line[3..])))
    } else if upper.starts_with(b"-ERR") && line.get(4).is_none_or(|b| *b == b' ') {
        Ok(Status::Err(text(&line[4..])))
    } else if line == b"+" || line.starts_with(b"+ ") {
        Ok(Status::Continue)
    } else {
        Err(BackendError::Protocol(format!(
            "not a POP3 status line: {:?}",
            String::from_utf8_lossy(&line[..line.len().min(60)])
        )))
    }
}

/// The `<…@…>` timestamp of an APOP-capable greeting (RFC 1939 §7).
pub fn apop_timestamp(greeting: &str) -> Option<String> {
    let start = greeting.find('<')?;
    let len = greeting[start..].find('>')? + 1;
    let ts = &greeting[start..start + len];
    let inner = &ts[1..ts.len() - 1];
    (ts.len() <= 200
        && inner.contains('@')
        && inner.bytes().all(|b| b.is_ascii_graphic() && b != b'<'))
    .then(|| ts.to_string())
}

fn cache() -> &'static RwLock<HashMap<String, BackendCaps>> {
    static CACHE: OnceLock<RwLock<HashMap<String, BackendCaps>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

fn cache_key(b: &Backend) -> String {
    format!("{}\0{}", b.name, b.address)
}

/// What the backend announced last time anyone connected, if ever.
pub fn cached_caps(b: &Backend) -> Option<BackendCaps> {
    cache().read().ok()?.get(&cache_key(b)).cloned()
}

fn remember_caps(b: &Backend, caps: &BackendCaps) {
    if let Ok(mut m) = cache().write() {
        let key = cache_key(b);
        if m.get(&key) != Some(caps) {
            tracing::info!(backend = %b.name, ?caps, "POP3 backend capabilities");
            m.insert(key, caps.clone());
        }
    }
}

/// One capability probe: connect, greeting, CAPA, QUIT.
pub async fn probe(b: &Backend, t: &Timeouts) -> Option<BackendCaps> {
    match Pop3Backend::connect(b, t).await {
        Ok(be) => {
            let caps = be.caps.clone();
            be.quit().await;
            Some(caps)
        }
        Err(e) => {
            tracing::warn!(backend = %b.name, error = %e, "POP3 backend probe failed");
            None
        }
    }
}

pub struct Pop3Backend {
    conn: Conn<super::stream::BackendStream>,
    pub caps: BackendCaps,
    /// APOP timestamp from the greeting.
    pub timestamp: Option<String>,
    reply_timeout: Duration,
}

impl Pop3Backend {
    /// Connects, reads the greeting and learns the capabilities (CAPA; an
    /// RFC 1939-only server's `-ERR` means USER/PASS only).
    pub async fn connect(backend: &Backend, t: &Timeouts) -> Result<Self, BackendError> {
        let started = std::time::Instant::now();
        let tcp = super::connect(&backend.address, t.backend_connect).await?;
        let mut stream = super::stream::BackendStream::Plain(tcp);
        if let Some(tls) = &backend.tls {
            // implicit TLS (POP3S backends); STLS to backends is refused by config
            stream = stream.upgrade(tls, t.backend_connect).await?;
        }
        let mut b = Pop3Backend {
            conn: Conn::new(stream),
            caps: BackendCaps::rfc1939(),
            timestamp: None,
            reply_timeout: t.backend_reply,
        };
        let line = b.conn.read_line(MAX_LINE, t.backend_connect).await?;
        match parse_status(&line)? {
            Status::Ok(text) => b.timestamp = apop_timestamp(&text),
            Status::Err(text) => {
                return Err(BackendError::Unavailable(format!("greeting -ERR {text}")))
            }
            Status::Continue => return Err(BackendError::Protocol("greeting is `+`".into())),
        }
        b.caps = match b.command("CAPA").await? {
            Status::Ok(_) => {
                let lines = b.multiline().await?;
                BackendCaps::from_capa(&lines)
            }
            _ => BackendCaps::rfc1939(),
        };
        remember_caps(backend, &b.caps);
        crate::observe::metrics().backend_connected(&backend.name, started.elapsed().as_secs_f64());
        Ok(b)
    }

    async fn status(&mut self) -> Result<Status, BackendError> {
        let line = self.conn.read_line(MAX_LINE, self.reply_timeout).await?;
        parse_status(&line)
    }

    async fn send(&mut self, lines: &[&str]) -> Result<(), BackendError> {
        for l in lines {
            self.conn.queue(l.as_bytes());
            self.conn.queue(b"\r\n");
        }
        self.conn.flush(self.reply_timeout).await?;
        Ok(())
    }

    async fn command(&mut self, line: &str) -> Result<Status, BackendError> {
        self.send(&[line]).await?;
        self.status().await
    }

    /// The body of a multi-line answer, dot-unstuffed, bounded.
    async fn multiline(&mut self) -> Result<Vec<String>, BackendError> {
        let mut lines = Vec::new();
        loop {
            let line = self.conn.read_line(MAX_LINE, self.reply_timeout).await?;
            if &line[..] == b"." {
                return Ok(lines);
            }
            if lines.len() >= MAX_CAPA_LINES {
                return Err(BackendError::Protocol("CAPA answer too long".into()));
            }
            let l = line.strip_prefix(b".").unwrap_or(&line);
            lines.push(String::from_utf8_lossy(l).into_owned());
        }
    }

    /// Replays `login`. `Ok` carries what the backend decided (or
    /// [`LoginOutcome::OutOfStep`]: it spoke out of turn, nothing decided);
    /// `Err` means the connection is unusable.
    pub async fn login(&mut self, login: &Login) -> Result<LoginOutcome, BackendError> {
        let status = match login {
            Login::Password { user, pass } => {
                if self.caps.user || !self.caps.sasl_plain {
                    self.user_pass(user, pass).await?
                } else {
                    self.auth_plain("", user, pass).await?
                }
            }
            Login::PlainAs {
                authzid,
                user,
                pass,
            } => {
                if !self.caps.sasl_plain {
                    return Ok(LoginOutcome::Unsupported);
                }
                self.auth_plain(authzid, user, pass).await?
            }
            Login::Apop { user, digest } => {
                if self.timestamp.is_none() {
                    return Ok(LoginOutcome::Unsupported);
                }
                self.login_command(&format!("APOP {user} {digest}")).await?
            }
        };
        match status {
            // more behind the `+OK` (as after the end of SMTP DATA): it may
            // have been the answer to an earlier command, so it is no login
            Some(Status::Ok(_)) if self.conn.buffered() > 0 => {
                tracing::warn!("POP3 backend sent more after its login reply: out of step");
                Ok(LoginOutcome::OutOfStep)
            }
            Some(Status::Ok(t)) => Ok(LoginOutcome::Accepted(t)),
            Some(Status::Err(t)) => Ok(LoginOutcome::Rejected(t)),
            None => Ok(LoginOutcome::OutOfStep),
            Some(Status::Continue) => Err(BackendError::Protocol("unexpected `+` to login".into())),
        }
    }

    /// Whether the conversation is in step: nothing unread from the backend
    /// and the connection not closed. A stray reply (or an idle backend's
    /// parting `-ERR`) would otherwise be read as the answer to the next
    /// login command, and every later answer as that of the one after.
    async fn in_step(&mut self) -> bool {
        match self.conn.unsolicited().await {
            Ok(0) => true,
            Ok(_) => {
                tracing::warn!("POP3 backend sent data nobody asked for: out of step");
                false
            }
            Err(e) => {
                tracing::debug!(error = %e, "POP3 backend connection gone before login");
                false
            }
        }
    }

    /// A login command, sent only while the conversation is in step (`None`
    /// otherwise: nothing was sent).
    async fn login_command(&mut self, line: &str) -> Result<Option<Status>, BackendError> {
        if !self.in_step().await {
            return Ok(None);
        }
        self.command(line).await.map(Some)
    }

    async fn user_pass(&mut self, user: &str, pass: &str) -> Result<Option<Status>, BackendError> {
        // Not pipelined even where PIPELINING is announced: Dovecot 2.3 answers
        // a USER+PASS burst ~40 ms late (measured on loopback), while the
        // extra round trip costs ~0.1 ms.
        match self.login_command(&format!("USER {user}")).await? {
            Some(Status::Ok(_)) => self.login_command(&format!("PASS {pass}")).await,
            other => Ok(other),
        }
    }

    async fn auth_plain(
        &mut self,
        authzid: &str,
        user: &str,
        pass: &str,
    ) -> Result<Option<Status>, BackendError> {
        let ir = base64_encode(format!("{authzid}\0{user}\0{pass}").as_bytes());
        // initial response (RFC 5034 §4); a server that still asks gets it again
        match self.login_command(&format!("AUTH PLAIN {ir}")).await? {
            Some(Status::Continue) => self.login_command(&ir).await,
            other => Ok(other),
        }
    }

    /// The connection and whatever the backend already sent after its `+OK`
    /// (which belongs to the client).
    pub fn into_parts(mut self) -> (super::stream::BackendStream, BytesMut) {
        let left = self.conn.take_buffered();
        (self.conn.stream, left)
    }

    /// Polite goodbye; errors do not matter any more.
    pub async fn quit(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.command("QUIT")).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(
            parse_status(b"+OK Dovecot ready.").unwrap(),
            Status::Ok("Dovecot ready.".into())
        );
        assert_eq!(parse_status(b"+OK").unwrap(), Status::Ok(String::new()));
        assert_eq!(
            parse_status(b"-ERR [AUTH] Authentication failed.").unwrap(),
            Status::Err("[AUTH] Authentication failed.".into())
        );
        assert_eq!(parse_status(b"-err no").unwrap(), Status::Err("no".into()));
        assert_eq!(parse_status(b"+ ").unwrap(), Status::Continue);
        assert_eq!(parse_status(b"+").unwrap(), Status::Continue);
        for bad in [&b""[..], b"OK", b"+OKAY", b"-ERROR x", b"220 smtp"] {
            assert!(parse_status(bad).is_err(), "{bad:?}");
        }
    }

    /// Nit 13 (regression guard): bytes that reached the socket while the
    /// task was busy (the reactor had no turn since) are still seen before a
    /// login command: the zero-deadline read yields once to the runtime,
    /// whose park polls the socket before the timer fires. A poll-once check
    /// would miss them and send USER into an out-of-step conversation.
    #[tokio::test]
    async fn stray_bytes_that_arrived_while_busy_are_seen() {
        use std::io::{Read as _, Write as _};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            wait.recv().unwrap();
            s.write_all(b"-ERR Disconnected for inactivity\r\n")
                .unwrap();
            let mut seen = Vec::new();
            let _ = s.read_to_end(&mut seen);
            seen
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut b = Pop3Backend {
            conn: Conn::new(super::super::stream::BackendStream::Plain(tcp)),
            caps: BackendCaps::rfc1939(),
            timestamp: None,
            reply_timeout: Duration::from_secs(5),
        };
        assert!(b.in_step().await, "nothing sent yet");
        go.send(()).unwrap();
        // blocking on purpose: the reactor gets no turn meanwhile
        std::thread::sleep(Duration::from_millis(100));
        let login = Login::Password {
            user: "alice".into(),
            pass: "secret".into(),
        };
        assert!(matches!(b.login(&login).await, Ok(LoginOutcome::OutOfStep)));
        drop(b);
        assert!(server.join().unwrap().is_empty(), "no USER was sent");
    }

    #[test]
    fn timestamps() {
        assert_eq!(
            apop_timestamp("POP3 server ready <1896.697170952@dbc.mtview.ca.us>").as_deref(),
            Some("<1896.697170952@dbc.mtview.ca.us>")
        );
        assert_eq!(apop_timestamp("Dovecot ready."), None);
        assert_eq!(apop_timestamp("ready <no-at-sign>"), None);
        assert_eq!(apop_timestamp("ready <a b@c>"), None);
        assert_eq!(apop_timestamp("ready <unterminated@x"), None);
    }
}
