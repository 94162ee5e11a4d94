//! SMTP client for the legacy server: greeting, EHLO (HELO fallback), MAIL,
//! RCPT, DATA, RSET, QUIT. One connection per client session, opened lazily
//! and reused across transactions; a transaction left open is RSET before the
//! next MAIL. Only parameters the backend announced are passed on. With
//! `reuse:` a connection may serve later client sessions too (`pool.rs`).

use super::caps::{Ehlo, SmtpCaps};
use super::reply::{Parsed, ReplyParser, MAX_LINE};
use super::stream::{BackendStream, BackendTlsMode};
use super::{Backend, BackendError, ClientIdentity, Deadlines};
use crate::codec::Conn;
use crate::mail::{Body, MailParams, Stuffer};
use std::time::{Duration, Instant};

pub type BackendReply = (u16, Vec<String>);

/// How much stuffed message text is buffered before it is written (the
/// output buffer stays within one allocation of 64 KiB).
const STUFF_CHUNK: usize = 32 * 1024;

pub struct SmtpBackend {
    conn: Conn<BackendStream>,
    /// The backend's configured name (logs, metrics).
    name: String,
    /// The backend offered STARTTLS in its last EHLO.
    starttls: bool,
    pub caps: SmtpCaps,
    /// How long connecting took (TCP, TLS, greeting, EHLO, identity), for
    /// the driver's `backend_connect_seconds`.
    pub connect_time: Duration,
    size_ext: bool,
    /// A MAIL was sent and its transaction not ended by DATA.
    open_tx: bool,
    reply_timeout: Duration,
    data_timeout: Duration,
    /// Client sessions this connection has served (`reuse.max_sessions`).
    sessions: u32,
    /// An AUTH went over this connection: it belongs to that user, and is
    /// never handed to another client.
    authenticated: bool,
    /// The backend refused a command here (4xx/5xx): servers count such
    /// errors per connection (Postfix's `smtpd_soft_error_limit` slows
    /// every later reply, its hard limit closes), so it is never handed on.
    refused: bool,
    /// The XCLIENT attributes the last EHLO offered (`None`: no XCLIENT).
    xclient_attrs: Option<Vec<String>>,
    /// XCLIENT told the backend a client's identity on this connection: it
    /// speaks as that client until XCLIENT tells it another.
    told: bool,
    /// The identity the backend holds is not this session's (taken from
    /// the pool, or kept across the client's STARTTLS, whose later EHLO
    /// may name another host): XCLIENT again before the next command.
    stale: bool,
}

impl SmtpBackend {
    /// Greeting, EHLO (HELO fallback), and the client's identity where the
    /// backend is configured for it (`id` is `None` for capability probes).
    pub async fn connect(
        backend: &Backend,
        t: &Deadlines,
        id: Option<&ClientIdentity>,
    ) -> Result<Self, BackendError> {
        let started = Instant::now();
        let tcp = super::connect_with_proxy(backend, t.connect, id).await?;
        let mut stream = BackendStream::Plain(tcp);
        if let Some(tls) = backend
            .tls
            .as_ref()
            .filter(|t| t.mode == BackendTlsMode::Implicit)
        {
            stream = stream.upgrade(tls, t.connect).await?;
        }
        let mut b = SmtpBackend {
            conn: Conn::new(stream),
            name: backend.name.clone(),
            starttls: false,
            caps: SmtpCaps::default(),
            connect_time: Duration::ZERO,
            size_ext: false,
            open_tx: false,
            reply_timeout: t.reply,
            data_timeout: t.data,
            sessions: 1,
            authenticated: false,
            refused: false,
            xclient_attrs: None,
            told: false,
            stale: false,
        };
        let (code, lines) = b.read_reply(t.connect).await?;
        if code != 220 {
            return Err(BackendError::Unavailable(format!(
                "greeting {code} {}",
                lines.join(" ")
            )));
        }
        b.hello(&backend.helo_name).await?;
        if let Some(tls) = backend
            .tls
            .as_ref()
            .filter(|t| t.mode == BackendTlsMode::Starttls)
        {
            // fail closed: a backend configured for TLS that does not offer it
            // (or a stripped STARTTLS) never gets the session in plaintext
            if !b.starttls {
                return Err(BackendError::Unavailable(
                    "backend does not offer STARTTLS".into(),
                ));
            }
            let (code, lines) = b.command("STARTTLS").await?;
            if code != 220 {
                return Err(BackendError::Unavailable(format!(
                    "STARTTLS {code} {}",
                    lines.join(" ")
                )));
            }
            // anything the backend sent after its 220 is not trusted (RFC 3207)
            b.conn.discard_buffered();
            let plain = std::mem::replace(&mut b.conn.stream, BackendStream::Detached);
            b.conn.stream = plain.upgrade(tls, t.connect).await?;
            b.hello(&backend.helo_name).await?;
        }
        // an EHLO a HELO-only server refused is mailgate's, not a client's;
        // a refused XCLIENT (`identity_optional`) counts, as any refusal
        b.refused = false;
        if let (true, Some(id)) = (backend.xclient, id) {
            b.xclient(backend, id, false).await?;
        }
        b.connect_time = started.elapsed();
        Ok(b)
    }

    /// XCLIENT (Postfix): the backend then sees the client's address and HELO
    /// as if it had connected itself. It answers with a new greeting, after
    /// which EHLO is repeated. When it cannot be applied (not offered, no
    /// ADDR, refused) the connection is not used, unless `identity_optional`
    /// says to go on as mailgate's own address, which legacy servers often
    /// trust as a relay; never when `strict` (the connection would go on as
    /// an earlier client).
    async fn xclient(
        &mut self,
        backend: &Backend,
        id: &ClientIdentity,
        strict: bool,
    ) -> Result<(), BackendError> {
        let attrs = self.xclient_attrs.clone();
        let not_applied = |why: String| {
            if backend.identity_optional && !strict {
                tracing::warn!(backend = %backend.name, reason = %why, "XCLIENT not applied; relaying as mailgate's own address (identity_optional)");
                Ok(())
            } else {
                Err(BackendError::Identity(why))
            }
        };
        let Some(attrs) = attrs else {
            return not_applied("the backend does not offer XCLIENT".into());
        };
        let attrs = &attrs;
        let has = |a: &str| attrs.iter().any(|x| x.eq_ignore_ascii_case(a));
        if !has("ADDR") {
            return not_applied("the backend's XCLIENT does not take ADDR".into());
        }
        let mut line = String::from("XCLIENT");
        // no reverse lookup here: say so, or Postfix keeps the name it found
        // for mailgate's own address (name-based rules would then match us);
        // an unavailable NAME leaves its reverse name as it was
        if has("NAME") {
            line.push_str(" NAME=[UNAVAILABLE]");
        }
        if has("REVERSE_NAME") {
            line.push_str(" REVERSE_NAME=[UNAVAILABLE]");
        }
        if has("ADDR") {
            let ip = match id.peer.ip() {
                std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                    Some(v4) => v4.to_string(),
                    None => format!("IPV6:{v6}"),
                },
                v4 => v4.to_string(),
            };
            line.push_str(&format!(" ADDR={ip}"));
        }
        if has("PORT") {
            line.push_str(&format!(" PORT={}", id.peer.port()));
        }
        if has("PROTO") {
            line.push_str(if id.esmtp {
                " PROTO=ESMTP"
            } else {
                " PROTO=SMTP"
            });
        }
        if let (true, Some(h)) = (has("HELO"), &id.helo) {
            line.push_str(&format!(" HELO={}", super::xtext(h)));
        }
        let (code, lines) = self.command(&line).await?;
        if code != 220 {
            return not_applied(format!(
                "backend refused XCLIENT ({code} {}); check its smtpd_authorized_xclient_hosts",
                lines.join(" ")
            ));
        }
        self.told = true;
        // Postfix takes the HELO name from the EHLO that follows XCLIENT,
        // replacing XCLIENT's HELO=: repeat the client's name there.
        let name = id
            .helo
            .as_deref()
            .filter(|h| super::xtext(h) == *h)
            .unwrap_or(&backend.helo_name);
        self.hello(name).await
    }

    /// Before the session's first command: a connection whose backend holds
    /// another session's identity (`stale`) is told this one's, with XCLIENT
    /// again (Postfix allows it outside a transaction; it answers with a new
    /// greeting, and EHLO follows, as on a new connection). One that told an
    /// earlier client's identity is used only once this one's is applied,
    /// whatever `identity_optional` says; an error leaves it unusable (the
    /// caller drops it and connects afresh). `true`: XCLIENT was tried, and
    /// the EHLO after it may have changed `caps` (Postfix can answer each
    /// client's EHLO differently).
    pub async fn identify(
        &mut self,
        backend: &Backend,
        id: &ClientIdentity,
    ) -> Result<bool, BackendError> {
        if !std::mem::take(&mut self.stale) {
            return Ok(false);
        }
        if !backend.xclient {
            // the pool key keeps such connections apart; never relay as
            // somebody else
            return match self.told {
                true => Err(BackendError::Identity(
                    "the connection speaks as an earlier client".into(),
                )),
                false => Ok(false),
            };
        }
        self.xclient(backend, id, self.told).await.map(|()| true)
    }

    /// EHLO with HELO fallback; learns the extensions and the XCLIENT
    /// attributes, if the backend offers XCLIENT.
    async fn hello(&mut self, name: &str) -> Result<(), BackendError> {
        let b = self;
        b.caps = SmtpCaps::default();
        b.size_ext = false;
        b.starttls = false;
        b.xclient_attrs = None;
        let (code, lines) = b.command(&format!("EHLO {name}")).await?;
        match code {
            250 => {
                let ehlo = Ehlo::parse(lines.get(1..).unwrap_or(&[]));
                b.caps = ehlo.caps;
                b.size_ext = ehlo.size_ext;
                b.starttls = ehlo.starttls;
                b.xclient_attrs = ehlo.xclient;
                Ok(())
            }
            // a truly old server: fall back to HELO (RFC 5321 §3.2)
            500..=504 | 550 => {
                let (code, lines) = b.command(&format!("HELO {name}")).await?;
                if code != 250 {
                    return Err(BackendError::Unavailable(format!(
                        "HELO {code} {}",
                        lines.join(" ")
                    )));
                }
                Ok(())
            }
            _ => Err(BackendError::Unavailable(format!(
                "EHLO {code} {}",
                lines.join(" ")
            ))),
        }
    }

    async fn read_reply(&mut self, deadline: Duration) -> Result<BackendReply, BackendError> {
        let mut p = ReplyParser::default();
        loop {
            let line = self.conn.read_line(MAX_LINE, deadline).await?;
            match p.push(&line) {
                Parsed::More => continue,
                Parsed::Done(code, lines) => {
                    // a whole reply and nothing behind it: the connection
                    // may now sit idle for as long as the client does, so
                    // its buffers go back (a message's 32 KiB output chunk
                    // among them) and come again with the next command
                    if self.conn.buffered() == 0 {
                        self.conn.shrink();
                    }
                    return Ok((code, lines));
                }
                Parsed::Invalid(why) => return Err(BackendError::Protocol(why.into())),
            }
        }
    }

    /// Before each command: the backend must not have written anything since
    /// its last reply. Bytes waiting (an unsolicited or extra reply) mean the
    /// conversation is out of step: every later reply would be taken for the
    /// answer to the wrong command, so this connection is not used again. A
    /// close already seen is reported too (never taken as an answer).
    async fn check_in_step(&mut self, before: &str) -> Result<(), BackendError> {
        let pending = self.conn.unsolicited().await?;
        if pending == 0 {
            return Ok(());
        }
        if self.closing_notice() {
            return Err(BackendError::Failed(format!(
                "backend closed the connection (unsolicited 421) before {before}"
            )));
        }
        Err(self.out_of_step(pending, &format!("before {before}")))
    }

    /// An unsolicited 421 is the one reply a server may send unasked, when it
    /// closes the channel (RFC 5321 §3.8): the connection ends, but it is not
    /// a conversation out of step (an idle timeout, a shutdown).
    fn closing_notice(&mut self) -> bool {
        self.conn.rbuf_mut().starts_with(b"421")
    }

    /// Logs an out-of-step backend; the error drops the connection (and the
    /// driver counts it).
    fn out_of_step(&self, bytes: usize, at: &str) -> BackendError {
        tracing::warn!(backend = %self.name, bytes, at, "backend wrote out of step (an unsolicited or extra reply); connection dropped");
        BackendError::OutOfStep(format!("out of step: {bytes} unsolicited bytes {at}"))
    }

    /// The command's verb for logs (never an AUTH response: credentials).
    fn verb(line: &str) -> &'static str {
        const VERBS: [&str; 10] = [
            "EHLO", "HELO", "STARTTLS", "XCLIENT", "MAIL", "RCPT", "DATA", "RSET", "AUTH", "QUIT",
        ];
        let first = line.split(' ').next().unwrap_or("");
        VERBS
            .iter()
            .find(|v| v.eq_ignore_ascii_case(first))
            .copied()
            .unwrap_or("an AUTH response")
    }

    async fn command(&mut self, line: &str) -> Result<BackendReply, BackendError> {
        self.check_in_step(Self::verb(line)).await?;
        self.exchange(line).await
    }

    /// One command and its reply, without the in-step check (QUIT).
    async fn exchange(&mut self, line: &str) -> Result<BackendReply, BackendError> {
        self.conn.queue(line.as_bytes());
        self.conn.queue(b"\r\n");
        self.conn.flush(self.reply_timeout).await?;
        let r = self.read_reply(self.reply_timeout).await?;
        self.refused |= r.0 >= 400;
        if r.0 == 421 {
            // the backend is closing; the caller drops this connection
            return Err(BackendError::Failed(format!(
                "backend said 421 {}",
                r.1.join(" ")
            )));
        }
        Ok(r)
    }

    /// A transaction left open (the client's RSET is answered by mailgate,
    /// a MAIL refused after it was sent) is RSET before the next MAIL or
    /// AUTH (RFC 4954 §4: no AUTH during a mail transaction).
    async fn end_open_tx(&mut self) -> Result<(), BackendError> {
        if self.open_tx {
            let (code, lines) = self.command("RSET").await?;
            if code != 250 {
                return Err(BackendError::Protocol(format!(
                    "RSET answered {code} {}",
                    lines.join(" ")
                )));
            }
            self.open_tx = false;
        }
        Ok(())
    }

    pub async fn mail(
        &mut self,
        from: &str,
        params: &MailParams,
        size_hint: Option<u64>,
    ) -> Result<BackendReply, BackendError> {
        // fail closed: never the message without the parameter it needs
        if let Some(ext) = self.caps.lacks(params) {
            return Err(BackendError::Lacks(ext));
        }
        self.end_open_tx().await?;
        let mut line = format!("MAIL FROM:<{from}>");
        if self.size_ext {
            if let Some(s) = params.size.or(size_hint) {
                line.push_str(&format!(" SIZE={s}"));
            }
        }
        if self.caps.eightbitmime {
            match params.body {
                Some(Body::EightBitMime) => line.push_str(" BODY=8BITMIME"),
                Some(Body::SevenBit) => line.push_str(" BODY=7BIT"),
                None => {}
            }
        }
        if params.smtputf8 && self.caps.smtputf8 {
            line.push_str(" SMTPUTF8");
        }
        self.open_tx = true;
        self.command(&line).await
    }

    /// Relays credentials in a mechanism the backend offers (PLAIN preferred).
    /// The final reply is returned as is (235 means success) when it is 235,
    /// 4xx or 5xx; anything else (a 334 asking for more, a 250) leaves the
    /// exchange out of step and is an error, never a login result.
    pub async fn auth(&mut self, user: &str, password: &str) -> Result<BackendReply, BackendError> {
        self.end_open_tx().await?;
        self.authenticated = true;
        let r = self.auth_exchange(user, password).await?;
        match r.0 {
            // more after the 235 (as after the end of DATA): which command
            // it answers is unknown, so it is no login
            235 if self.conn.buffered() > 0 => {
                if self.closing_notice() {
                    return Err(BackendError::Failed(
                        "backend closed the connection (421) after AUTH".into(),
                    ));
                }
                Err(self.out_of_step(self.conn.buffered(), "after the AUTH reply"))
            }
            235 | 400..=599 => Ok(r),
            code => Err(BackendError::Protocol(format!("AUTH answered {code}"))),
        }
    }

    async fn auth_exchange(
        &mut self,
        user: &str,
        password: &str,
    ) -> Result<BackendReply, BackendError> {
        use base64::Engine as _;
        let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
        // a NUL would add a field to PLAIN's message (the session refuses it)
        if user.contains('\0') || password.contains('\0') {
            return Err(BackendError::Protocol("NUL in credentials".into()));
        }
        if self.caps.auth_plain {
            let mut raw = Vec::with_capacity(user.len() + password.len() + 2);
            raw.push(0);
            raw.extend_from_slice(user.as_bytes());
            raw.push(0);
            raw.extend_from_slice(password.as_bytes());
            return self.command(&format!("AUTH PLAIN {}", b64(&raw))).await;
        }
        if !self.caps.auth_login {
            return Err(BackendError::Protocol(
                "backend offers neither AUTH PLAIN nor LOGIN".into(),
            ));
        }
        // before the password only 334 (go on) or a refusal fit: a 235 here
        // would be a login without credentials
        let step = |r: BackendReply| match r.0 {
            334 => Ok(None),
            400..=599 => Ok(Some(r)),
            code => Err(BackendError::Protocol(format!(
                "AUTH LOGIN step answered {code}"
            ))),
        };
        if let Some(r) = step(self.command("AUTH LOGIN").await?)? {
            return Ok(r);
        }
        if let Some(r) = step(self.command(&b64(user.as_bytes())).await?)? {
            return Ok(r);
        }
        self.command(&b64(password.as_bytes())).await
    }

    pub async fn rcpt(&mut self, to: &str) -> Result<BackendReply, BackendError> {
        self.command(&format!("RCPT TO:<{to}>")).await
    }

    /// DATA, then the message (`parts`: CRLF-normalised, unstuffed, sent as one
    /// text) dot-stuffed and ended with `.CRLF`, then the final reply. A
    /// non-354 answer to DATA is returned as the final reply.
    pub async fn data(&mut self, parts: &[&[u8]]) -> Result<BackendReply, BackendError> {
        let r = self.command("DATA").await?;
        if r.0 != 354 {
            self.open_tx = r.0 / 100 != 2;
            if r.0 / 100 == 2 {
                return Err(BackendError::Protocol(format!("DATA answered {}", r.0)));
            }
            return Ok(r);
        }
        self.open_tx = false;
        // a reply already waiting after 354 would be taken for the verdict
        self.check_in_step("the message").await?;
        self.send_stuffed(parts).await?;
        let r = self.read_reply(self.data_timeout).await?;
        self.refused |= r.0 >= 400;
        // more after the verdict (other than a closing notice): which reply
        // answers the message is unknown
        if self.conn.buffered() > 0 && !self.closing_notice() {
            return Err(self.out_of_step(self.conn.buffered(), "after the end of DATA reply"));
        }
        if r.0 == 421 {
            return Err(BackendError::Failed(format!(
                "backend said 421 {}",
                r.1.join(" ")
            )));
        }
        Ok(r)
    }

    /// Writes `parts` dot-stuffed through the output buffer, flushing every
    /// `STUFF_CHUNK` bytes: the message is never built a second time in
    /// memory. `backend_data` bounds the whole write, not each piece.
    async fn send_stuffed(&mut self, parts: &[&[u8]]) -> Result<(), BackendError> {
        let until = tokio::time::Instant::now() + self.data_timeout;
        let left = || until.saturating_duration_since(tokio::time::Instant::now());
        let mut st = Stuffer::default();
        for part in parts {
            let mut rest = *part;
            while !rest.is_empty() {
                let n = st.stuff(rest, self.conn.output(), STUFF_CHUNK);
                rest = &rest[n..];
                if self.conn.output().len() >= STUFF_CHUNK {
                    self.conn.flush(left()).await?;
                }
            }
        }
        st.finish(self.conn.output());
        self.conn.flush(left()).await?;
        Ok(())
    }

    /// Taken from the pool for a new client session, which may be another
    /// listener's (or one after a reload): its deadlines apply from now on.
    pub(super) fn taken_for_reuse(&mut self, t: &Deadlines) {
        self.sessions += 1;
        self.stale = true;
        self.reply_timeout = t.reply;
        self.data_timeout = t.data;
    }

    /// It served an earlier client session (was taken from the pool); a
    /// connection opened for this session is not.
    pub fn reused(&self) -> bool {
        self.sessions > 1
    }

    /// Open and in step after sitting idle: nothing unsolicited waiting
    /// (a 421 of the backend's idle timeout, a stray reply), no close seen.
    pub async fn idle_ready(&mut self) -> bool {
        matches!(self.conn.unsolicited().await, Ok(0))
    }

    /// May serve another client session: it carries nothing of this one
    /// ([`clean_slate`](Self::clean_slate)), and it has not served
    /// `max_sessions` yet.
    pub(super) fn reusable(&self, max_sessions: u32) -> bool {
        self.clean_slate() && self.sessions < max_sessions
    }

    /// It relayed no AUTH (the login belongs to its user), the backend
    /// refused nothing on it (error counts are per connection), and one
    /// told a client's identity can be told the next one: Postfix checks
    /// `smtpd_authorized_xclient_hosts` again against the address XCLIENT
    /// gave it, and offers XCLIENT no more where that client is not listed.
    pub(super) fn clean_slate(&self) -> bool {
        !self.authenticated && !self.refused && (!self.told || self.can_tell())
    }

    /// The backend's last EHLO offered XCLIENT with ADDR.
    fn can_tell(&self) -> bool {
        self.xclient_attrs
            .as_ref()
            .is_some_and(|a| a.iter().any(|x| x.eq_ignore_ascii_case("ADDR")))
    }

    /// Kept across the client's STARTTLS: the session starts afresh (RFC
    /// 3207), with another EHLO, so its identity is told again.
    pub(super) fn restarted(&mut self) {
        self.stale = true;
    }

    /// Cleans the connection for the next client session: an open
    /// transaction is RSET (it must be answered 250), and nothing may be
    /// left unread. False: its state is unknown and it is not reused.
    pub(super) async fn reset(&mut self) -> bool {
        if self.end_open_tx().await.is_err() {
            return false;
        }
        let clean = self.idle_ready().await;
        self.conn.shrink();
        clean
    }

    /// Polite goodbye; errors do not matter any more.
    pub async fn quit(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.exchange("QUIT")).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plaintext backend at `addr` without identity, 5 s deadlines.
    fn plain_backend(addr: std::net::SocketAddr) -> (Backend, Deadlines) {
        let backend = Backend {
            name: "b".into(),
            address: addr.to_string(),
            helo_name: "gw.test".into(),
            xclient: false,
            proxy_v2: false,
            tls: None,
            identity_optional: false,
            imap_id: false,
            reuse: Default::default(),
        };
        let t = Deadlines {
            connect: Duration::from_secs(5),
            reply: Duration::from_secs(5),
            data: Duration::from_secs(5),
        };
        (backend, t)
    }
    use std::io::{BufRead as _, BufReader, Write as _};

    /// What the backend client reports instead of counting: the connect time,
    /// the capabilities, and an out-of-step backend as its own error (the
    /// driver counts `backend_out_of_step` from it).
    #[tokio::test]
    async fn connect_and_out_of_step_are_returned_facts() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            w.write_all(b"220 legacy ESMTP\r\n").unwrap();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(line.starts_with("EHLO gw.test"), "{line:?}");
            // the EHLO answer, then a reply nobody asked for
            w.write_all(b"250-legacy\r\n250-8BITMIME\r\n250 SIZE 1000\r\n250 stray\r\n")
                .unwrap();
            let mut rest = String::new();
            let _ = std::io::Read::read_to_string(&mut r, &mut rest);
            rest
        });
        let (backend, t) = plain_backend(addr);
        let mut b = SmtpBackend::connect(&backend, &t, None).await.unwrap();
        assert!(b.connect_time > Duration::ZERO);
        assert!(b.caps.eightbitmime && b.caps.size == Some(1000));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let e = b.rcpt("<a@example.org>").await.unwrap_err();
        assert!(matches!(e, BackendError::OutOfStep(_)), "{e:?}");
        drop(b);
        assert!(!server.join().unwrap().contains("RCPT"), "no RCPT was sent");
    }

    /// Issue 17: between commands the backend connection holds no buffers
    /// (a session may keep it for as long as its client idles), and the
    /// in-step check before the next command does not allocate them again.
    #[tokio::test]
    async fn buffers_are_released_between_commands() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            w.write_all(b"220 legacy ESMTP\r\n").unwrap();
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                let answer: &[u8] = if line.starts_with("EHLO") {
                    b"250-legacy\r\n250 8BITMIME\r\n"
                } else {
                    b"250 ok\r\n"
                };
                w.write_all(answer).unwrap();
                line.clear();
            }
        });
        let (backend, t) = plain_backend(addr);
        let mut b = SmtpBackend::connect(&backend, &t, None).await.unwrap();
        let held = |b: &mut SmtpBackend| b.conn.rbuf_mut().capacity() + b.conn.output().capacity();
        assert_eq!(held(&mut b), 0, "after EHLO");
        let r = b.mail("a@example.org", &MailParams::default(), None).await;
        assert_eq!(r.unwrap().0, 250);
        assert_eq!(held(&mut b), 0, "after MAIL");
        assert_eq!(b.rcpt("b@example.org").await.unwrap().0, 250);
        assert_eq!(held(&mut b), 0, "after RCPT");
        b.quit().await;
        server.join().unwrap();
    }
}
