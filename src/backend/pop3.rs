//! POP3 client for the legacy server: greeting (with its APOP timestamp),
//! CAPA, and the login replayed in a form the backend supports — USER/PASS,
//! SASL PLAIN when USER is missing
//! or an authorization identity must be carried, or APOP. After `+OK` the
//! connection is handed to the driver's pipe via [`Pop3Backend::into_parts`].
//! Before each login command the conversation must be in step (nothing
//! unread, not closed), or the attempt is not believed.
//!
//! Capabilities are learnt at every connection; the driver keeps them in the
//! gateway's `caps::CapsCache`, so CAPA answers to clients (given before any
//! backend connection of their own) can reflect them.

use super::caps::Pop3Caps;
use super::{Backend, BackendError, ClientIdentity, Deadlines};
use crate::codec::Conn;
use base64::Engine as _;
use bytes::BytesMut;
use std::fmt;
use std::time::{Duration, Instant};

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

/// A login to replay on the backend.
#[derive(Clone, PartialEq, Eq)]
pub enum Login {
    /// USER/PASS, or AUTH PLAIN without a separate authorization identity:
    /// the backend gets it in whatever form it supports.
    Password { user: String, pass: String },
    /// AUTH PLAIN acting as `authzid`: only SASL PLAIN can carry that.
    PlainAs {
        authzid: String,
        user: String,
        pass: String,
    },
    /// APOP against the backend's own greeting timestamp.
    Apop { user: String, digest: String },
}

impl Login {
    pub fn user(&self) -> &str {
        match self {
            Login::Password { user, .. }
            | Login::PlainAs { user, .. }
            | Login::Apop { user, .. } => user,
        }
    }
}

// never print a password or digest
impl fmt::Debug for Login {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Login::Password { user, .. } => write!(f, "Password({user:?})"),
            Login::PlainAs { authzid, user, .. } => write!(f, "PlainAs({authzid:?}, {user:?})"),
            Login::Apop { user, .. } => write!(f, "Apop({user:?})"),
        }
    }
}

/// What the backend answered to a login (the POP3 session maps it to its
/// reply, beside the outcomes of errors and policy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginReply {
    /// `+OK` with this text: the session becomes a pipe.
    Accepted(String),
    /// `-ERR` with this text.
    Rejected(String),
    /// The backend offers no method that can carry this login.
    Unsupported,
    /// The backend spoke out of turn (unsolicited data) or had closed before
    /// a login command: its next reply would not have been the answer.
    OutOfStep,
}

/// One capability probe: connect, greeting, CAPA, QUIT.
/// The caller caches the capabilities and counts the connect time.
/// No client: like the SMTP probe (`probe.rs`), no PROXY v2 header.
pub async fn probe(b: &Backend, t: &Deadlines) -> Option<(Pop3Caps, Duration)> {
    match Pop3Backend::connect(b, t, None).await {
        Ok(be) => {
            let found = (be.caps.clone(), be.connect_time);
            be.quit().await;
            Some(found)
        }
        Err(e) => {
            tracing::warn!(backend = %b.name, error = %e, "POP3 backend probe failed");
            None
        }
    }
}

pub struct Pop3Backend {
    conn: Conn<super::stream::BackendStream>,
    pub caps: Pop3Caps,
    /// How long connecting took (TCP, TLS, greeting, CAPA), for the driver's
    /// `backend_connect_seconds`.
    pub connect_time: Duration,
    /// APOP timestamp from the greeting.
    pub timestamp: Option<String>,
    reply_timeout: Duration,
}

impl Pop3Backend {
    /// Connects (with a PROXY v2 header naming `id` where the backend is
    /// configured for it; `id` is `None` for capability probes), reads the
    /// greeting and learns the capabilities (CAPA; an RFC 1939-only server's
    /// `-ERR` means USER/PASS only).
    pub async fn connect(
        backend: &Backend,
        t: &Deadlines,
        id: Option<&ClientIdentity>,
    ) -> Result<Self, BackendError> {
        let started = Instant::now();
        let tcp = super::connect_with_proxy(backend, t.connect, id).await?;
        let mut stream = super::stream::BackendStream::Plain(tcp);
        if let Some(tls) = &backend.tls {
            // implicit TLS (POP3S backends); STLS to backends is refused by config
            stream = stream.upgrade(tls, t.connect).await?;
        }
        let mut b = Pop3Backend {
            conn: Conn::new(stream),
            caps: Pop3Caps::rfc1939(),
            connect_time: Duration::ZERO,
            timestamp: None,
            reply_timeout: t.reply,
        };
        let line = b.conn.read_line(MAX_LINE, t.connect).await?;
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
                Pop3Caps::from_capa(&lines)
            }
            _ => Pop3Caps::rfc1939(),
        };
        b.connect_time = started.elapsed();
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
    /// [`LoginReply::OutOfStep`]: it spoke out of turn, nothing decided);
    /// `Err` means the connection is unusable.
    pub async fn login(&mut self, login: &Login) -> Result<LoginReply, BackendError> {
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
                    return Ok(LoginReply::Unsupported);
                }
                self.auth_plain(authzid, user, pass).await?
            }
            Login::Apop { user, digest } => {
                if self.timestamp.is_none() {
                    return Ok(LoginReply::Unsupported);
                }
                self.login_command(&format!("APOP {user} {digest}")).await?
            }
        };
        match status {
            // more behind the `+OK` (as after the end of SMTP DATA): it may
            // have been the answer to an earlier command, so it is no login
            Some(Status::Ok(_)) if self.conn.buffered() > 0 => {
                tracing::warn!("POP3 backend sent more after its login reply: out of step");
                Ok(LoginReply::OutOfStep)
            }
            Some(Status::Ok(t)) => Ok(LoginReply::Accepted(t)),
            Some(Status::Err(t)) => Ok(LoginReply::Rejected(t)),
            None => Ok(LoginReply::OutOfStep),
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
        let ir = base64::engine::general_purpose::STANDARD
            .encode(format!("{authzid}\0{user}\0{pass}").as_bytes());
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
            caps: Pop3Caps::rfc1939(),
            connect_time: Duration::ZERO,
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
        assert!(matches!(b.login(&login).await, Ok(LoginReply::OutOfStep)));
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
