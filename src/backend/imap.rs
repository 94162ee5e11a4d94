//! IMAP client for the legacy server: greeting, CAPABILITY (from the
//! greeting's response code or the command), the client identity (Dovecot's
//! `ID` fields, with `identity: [imap_id]`), and the login replayed in a form
//! the backend supports — `LOGIN` (quoted strings or literals, whatever the
//! password holds) or `AUTHENTICATE PLAIN`. After the tagged `OK` the
//! connection is handed to the driver's relay via [`ImapBackend::into_parts`].
//!
//! Tags are mailgate's own (`m1`, `m2`, …), never the client's. Before each
//! login command the conversation must be in step (nothing unread, not
//! closed), and a tagged reply must carry the tag just sent, or the attempt
//! is not believed ([`ImapLoginReply::OutOfStep`]).
//!
//! The response reader ([`parse_response`]) is sans-IO and bounded: one
//! response (its line and the literals it announces) is at most
//! [`MAX_RESPONSE`] octets.

use super::caps::ImapCaps;
use super::stream::BackendStream;
use super::{Backend, BackendError, ClientIdentity, Deadlines};
use crate::codec::Conn;
use base64::Engine as _;
use bytes::BytesMut;
use std::fmt;
use std::time::{Duration, Instant};

/// Largest response accepted from the backend before login (line plus
/// literals). Greetings and capability lists are a few hundred octets;
/// RFC 9051 §4 suggests accepting lines of at least 8000.
pub const MAX_RESPONSE: usize = 16 * 1024;
/// Most untagged responses accepted while waiting for one tagged reply.
const MAX_UNTAGGED: usize = 64;
/// Longest reply text handed back to the session (Dovecot's post-login
/// `OK [CAPABILITY …] Logged in` is about 500 octets).
pub const MAX_REPLY_TEXT: usize = 2000;
/// Longest string sent as a quoted string; longer ones go as literals.
const MAX_QUOTED: usize = 1000;
/// Stand-ins for reply texts that are too long or not printable ASCII.
pub const ACCEPTED_TEXT: &str = "OK Logged in";
pub const REJECTED_TEXT: &str = "NO [AUTHENTICATIONFAILED] Authentication failed.";
/// The reply to an authorization identity no replay form can carry.
pub const AUTHZID_TEXT: &str =
    "NO [AUTHORIZATIONFAILED] Authorization identity not supported by the backend";

/// What the client sent to log in (its form decides nothing about the form
/// the backend gets).
#[derive(Clone, PartialEq, Eq)]
pub enum ImapLogin {
    /// `LOGIN user password`
    Login { user: String, password: String },
    /// `AUTHENTICATE PLAIN` (`authzid` empty when the client sent none)
    Plain {
        authzid: String,
        user: String,
        password: String,
    },
}

impl ImapLogin {
    pub fn user(&self) -> &str {
        match self {
            ImapLogin::Login { user, .. } | ImapLogin::Plain { user, .. } => user,
        }
    }
}

// never print a password
impl fmt::Debug for ImapLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImapLogin::Login { user, .. } => write!(f, "Login({user:?})"),
            ImapLogin::Plain { authzid, user, .. } => write!(f, "Plain({authzid:?}, {user:?})"),
        }
    }
}

/// What the backend answered to a login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImapLoginReply {
    /// The text after the backend's tag, e.g. `OK [CAPABILITY IMAP4rev1 …]
    /// Logged in` (checked: printable ASCII, bounded; else [`ACCEPTED_TEXT`]).
    Accepted(String),
    /// The text after the backend's tag, e.g. `NO [AUTHENTICATIONFAILED]
    /// Authentication failed.` (checked; else [`REJECTED_TEXT`]).
    Rejected(String),
    /// The backend spoke out of turn (unsolicited data, another tag) or had
    /// closed before a login command: nothing it said is an answer.
    OutOfStep,
}

/// A tagged or untagged status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    No,
    Bad,
    PreAuth,
    Bye,
}

/// One backend response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// `tag OK|NO|BAD text`; `text` is the whole line after the tag
    /// (`OK [CAPABILITY …] Logged in`), lossy UTF-8.
    Tagged {
        tag: String,
        status: Status,
        text: String,
        /// The response carried literals (never expected in a tagged reply).
        literals: bool,
    },
    /// `* …`: the first line after `* ` (lossy UTF-8), its status if it is
    /// a status response, and whether literals followed.
    Untagged {
        status: Option<Status>,
        text: String,
        literals: bool,
    },
    /// `+ …` continuation request.
    Continue(String),
}

fn status_word(w: &str) -> Option<Status> {
    match w.to_ascii_uppercase().as_str() {
        "OK" => Some(Status::Ok),
        "NO" => Some(Status::No),
        "BAD" => Some(Status::Bad),
        "PREAUTH" => Some(Status::PreAuth),
        "BYE" => Some(Status::Bye),
        _ => None,
    }
}

/// The literal a line (without CRLF) announces at its end: `{n}`, `{n+}`
/// (non-synchronising: `true`) or `~{n}` (RFC 3516 literal8). Also read by
/// the demo maildrop for commands.
pub fn literal_at_end(line: &[u8]) -> Option<(usize, bool)> {
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|b| *b == b'{')?;
    let digits = &inner[open + 1..];
    let (digits, plus) = match digits.strip_suffix(b"+") {
        Some(d) => (d, true),
        None => (digits, false),
    };
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some((std::str::from_utf8(digits).ok()?.parse().ok()?, plus))
}

/// Reads one response from the start of `buf`: `Ok(None)` while it is
/// incomplete, `Ok(Some((response, consumed)))` once whole. A response
/// longer than `max` (line and literals together) or without a valid shape
/// is an error; nothing is buffered beyond `max`.
pub fn parse_response(buf: &[u8], max: usize) -> Result<Option<(Response, usize)>, BackendError> {
    let too_long = || BackendError::Protocol(format!("IMAP response longer than {max} octets"));
    let mut pos = 0;
    let mut first: Option<&[u8]> = None;
    let mut literals = false;
    loop {
        let Some(nl) = crate::codec::memchr(b'\n', &buf[pos..]) else {
            return if buf.len() > max {
                Err(too_long())
            } else {
                Ok(None)
            };
        };
        let end = pos + nl + 1;
        if end > max {
            return Err(too_long());
        }
        let mut line = &buf[pos..end - 1];
        line = line.strip_suffix(b"\r").unwrap_or(line);
        first.get_or_insert(line);
        match literal_at_end(line) {
            Some((n, _)) => {
                literals = true;
                if end + n > max {
                    return Err(too_long());
                }
                if buf.len() < end + n {
                    return Ok(None);
                }
                pos = end + n;
            }
            None => {
                pos = end;
                break;
            }
        }
    }
    let line = String::from_utf8_lossy(first.unwrap_or_default()).into_owned();
    let response = if let Some(rest) = line.strip_prefix("* ") {
        let status = status_word(rest.split(' ').next().unwrap_or(""));
        Response::Untagged {
            status,
            text: rest.to_string(),
            literals,
        }
    } else if line == "+" || line.starts_with("+ ") {
        Response::Continue(line.get(2..).unwrap_or("").to_string())
    } else {
        let (tag, rest) = line.split_once(' ').unwrap_or((&line, ""));
        let status = status_word(rest.split(' ').next().unwrap_or(""));
        let valid_tag = !tag.is_empty()
            && tag
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"(){%*\"\\+".contains(&b));
        match status {
            Some(s @ (Status::Ok | Status::No | Status::Bad)) if valid_tag => Response::Tagged {
                tag: tag.to_string(),
                status: s,
                text: rest.to_string(),
                literals,
            },
            _ => {
                // 60 characters, not bytes: a cut inside one would panic
                let start: String = line.chars().take(60).collect();
                return Err(BackendError::Protocol(format!(
                    "not an IMAP response: {start:?}"
                )));
            }
        }
    };
    Ok(Some((response, pos)))
}

/// The `[CAPABILITY …]` response code at the start of a status text
/// (`OK [CAPABILITY IMAP4rev1 …] ready`), if any.
pub fn capability_code(text: &str) -> Option<&str> {
    let rest = text.split_once(' ').map(|x| x.1).unwrap_or("");
    let code = rest.strip_prefix('[')?;
    let (code, _) = code.split_once(']')?;
    let (name, list) = code.split_once(' ').unwrap_or((code, ""));
    name.eq_ignore_ascii_case("CAPABILITY").then_some(list)
}

/// A reply text safe to hand on: one line of printable ASCII, bounded.
fn checked_text(text: &str, literals: bool, fallback: &str) -> String {
    if !literals
        && !text.is_empty()
        && text.len() <= MAX_REPLY_TEXT
        && text.bytes().all(|b| (b' '..=b'~').contains(&b))
    {
        text.to_string()
    } else {
        fallback.to_string()
    }
}

/// How one string argument goes on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Arg {
    /// `"…"` with `\"` and `\\` escaped
    Quoted(String),
    /// `{n}` (or `{n+}`) and then the octets
    Literal(Vec<u8>),
}

/// A quoted string where RFC 3501 allows one (7-bit, no CR, LF or NUL,
/// bounded), a literal otherwise (UTF-8 and anything else).
fn arg(s: &str) -> Arg {
    if s.len() <= MAX_QUOTED && s.bytes().all(|b| b.is_ascii() && !b"\0\r\n".contains(&b)) {
        let mut q = String::with_capacity(s.len() + 2);
        q.push('"');
        for c in s.chars() {
            if c == '"' || c == '\\' {
                q.push('\\');
            }
            q.push(c);
        }
        q.push('"');
        Arg::Quoted(q)
    } else {
        Arg::Literal(s.as_bytes().to_vec())
    }
}

/// A command (`tag` and words, then string arguments) as the chunks to
/// send: the first at once, each later one only after the backend's `+`
/// continuation (synchronising literals). With LITERAL+ (or LITERAL- for
/// literals up to 4096 octets, RFC 7888) literals are non-synchronising and
/// everything is one chunk.
fn command_chunks(head: &str, args: &[Arg], caps: &ImapCaps) -> Vec<Vec<u8>> {
    let mut chunks = Vec::new();
    let mut cur = head.as_bytes().to_vec();
    for a in args {
        cur.push(b' ');
        match a {
            Arg::Quoted(q) => cur.extend_from_slice(q.as_bytes()),
            Arg::Literal(bytes) => {
                let plus = caps.literal_plus || (caps.literal_minus && bytes.len() <= 4096);
                let marker = if plus { "+" } else { "" };
                cur.extend_from_slice(format!("{{{}{marker}}}\r\n", bytes.len()).as_bytes());
                if !plus {
                    chunks.push(std::mem::take(&mut cur));
                }
                cur.extend_from_slice(bytes);
            }
        }
    }
    cur.extend_from_slice(b"\r\n");
    chunks.push(cur);
    chunks
}

/// `tag LOGIN user password` as chunks (see [`command_chunks`]).
fn login_chunks(tag: &str, user: &str, password: &str, caps: &ImapCaps) -> Vec<Vec<u8>> {
    command_chunks(&format!("{tag} LOGIN"), &[arg(user), arg(password)], caps)
}

/// `tag AUTHENTICATE PLAIN [ir]` and the response, as chunks: with SASL-IR
/// one line (RFC 4959), otherwise the response after the `+`.
fn plain_chunks(
    tag: &str,
    authzid: &str,
    user: &str,
    password: &str,
    caps: &ImapCaps,
) -> Vec<Vec<u8>> {
    let ir = base64::engine::general_purpose::STANDARD
        .encode(format!("{authzid}\0{user}\0{password}").as_bytes());
    if caps.sasl_ir {
        vec![format!("{tag} AUTHENTICATE PLAIN {ir}\r\n").into_bytes()]
    } else {
        vec![
            format!("{tag} AUTHENTICATE PLAIN\r\n").into_bytes(),
            format!("{ir}\r\n").into_bytes(),
        ]
    }
}

/// Dovecot's client-identity `ID` command (fields honoured from
/// `login_trusted_networks`: `src/imap-login/imap-login-cmd-id.c`).
pub fn id_command(tag: &str, id: &ClientIdentity) -> String {
    format!(
        "{tag} ID (\"x-originating-ip\" \"{}\" \"x-originating-port\" \"{}\" \
         \"x-connected-ip\" \"{}\" \"x-connected-port\" \"{}\")\r\n",
        id.peer.ip(),
        id.peer.port(),
        id.local.ip(),
        id.local.port()
    )
}

pub struct ImapBackend {
    conn: Conn<BackendStream>,
    pub caps: ImapCaps,
    /// How long connecting took (TCP, TLS, greeting, CAPABILITY, identity),
    /// for the driver's `backend_connect_seconds`.
    pub connect_time: Duration,
    reply_timeout: Duration,
    /// The number in the next tag (`m1`, `m2`, …).
    next_tag: u32,
    /// Untagged data that came with our CAPABILITY after the login (an
    /// `* OK [ALERT] …` the backend sent after its OK): the client's,
    /// handed on first by [`Self::into_parts`].
    after_login: Vec<u8>,
}

impl ImapBackend {
    /// Connects, reads the greeting, learns the capabilities and applies the
    /// client identity where the backend is configured for it (`id` is
    /// `None` for capability probes).
    pub async fn connect(
        backend: &Backend,
        t: &Deadlines,
        id: Option<&ClientIdentity>,
    ) -> Result<ImapBackend, BackendError> {
        let started = Instant::now();
        let tcp = super::connect_with_proxy(backend, t.connect, id).await?;
        let mut stream = BackendStream::Plain(tcp);
        if let Some(tls) = &backend.tls {
            // implicit TLS (IMAPS backends); STARTTLS to backends is refused by config
            stream = stream.upgrade(tls, t.connect).await?;
        }
        let mut b = ImapBackend {
            conn: Conn::new(stream),
            caps: ImapCaps::default(),
            connect_time: Duration::ZERO,
            reply_timeout: t.reply,
            next_tag: 1,
            after_login: Vec::new(),
        };
        let greeting_caps = b.greeting(t.connect).await?;
        b.caps = match greeting_caps {
            Some(c) => c,
            None => b.capability().await?,
        };
        if b.caps.logindisabled {
            return Err(BackendError::Unavailable(
                "backend announces LOGINDISABLED: the login cannot be replayed".into(),
            ));
        }
        if let (true, Some(id)) = (backend.imap_id, id) {
            b.imap_id(id).await?;
        }
        b.connect_time = started.elapsed();
        Ok(b)
    }

    /// The greeting: `* OK` (its capabilities, if it carries them); `* BYE`
    /// is unavailable, and `* PREAUTH` too: a backend that logs the session
    /// in without credentials would make mailgate's login check meaningless.
    async fn greeting(&mut self, deadline: Duration) -> Result<Option<ImapCaps>, BackendError> {
        match self.response(deadline).await? {
            Response::Untagged {
                status: Some(Status::Ok),
                text,
                ..
            } => Ok(capability_code(&text).map(ImapCaps::parse)),
            Response::Untagged {
                status: Some(Status::Bye),
                text,
                ..
            } => Err(BackendError::Unavailable(format!(
                "greeting BYE {}",
                checked_text(&text, false, "")
            ))),
            Response::Untagged {
                status: Some(Status::PreAuth),
                ..
            } => Err(BackendError::Unavailable(
                "greeting PREAUTH: the backend logs in without credentials".into(),
            )),
            other => Err(BackendError::Protocol(format!(
                "unexpected IMAP greeting: {other:?}"
            ))),
        }
    }

    fn tag(&mut self) -> String {
        let tag = format!("m{}", self.next_tag);
        self.next_tag += 1;
        tag
    }

    /// The next whole response, under `deadline`.
    async fn response(&mut self, deadline: Duration) -> Result<Response, BackendError> {
        let read = async {
            loop {
                if let Some((r, n)) = parse_response(self.conn.rbuf_mut(), MAX_RESPONSE)? {
                    self.conn.advance(n);
                    return Ok(r);
                }
                self.conn.fill().await?;
            }
        };
        match tokio::time::timeout(deadline, read).await {
            Ok(r) => r,
            Err(_) => Err(BackendError::TimedOut(
                "IMAP backend reply timed out".into(),
            )),
        }
    }

    /// The tagged reply to `tag`, with the untagged responses before it (at
    /// most [`MAX_UNTAGGED`]). `Ok(None)`: out of step (another tag, or a
    /// continuation request nobody made).
    async fn tagged(
        &mut self,
        tag: &str,
    ) -> Result<Option<(Status, String, bool, Vec<Response>)>, BackendError> {
        let mut untagged = Vec::new();
        loop {
            match self.response(self.reply_timeout).await? {
                Response::Tagged {
                    tag: t,
                    status,
                    text,
                    literals,
                } => {
                    if t != tag {
                        tracing::warn!("IMAP backend answered another tag: out of step");
                        return Ok(None);
                    }
                    return Ok(Some((status, text, literals, untagged)));
                }
                Response::Untagged {
                    status: Some(Status::Bye),
                    ..
                } => return Err(BackendError::Failed("IMAP backend said BYE".into())),
                u @ Response::Untagged { .. } => {
                    if untagged.len() >= MAX_UNTAGGED {
                        return Err(BackendError::Protocol(
                            "too many untagged IMAP responses".into(),
                        ));
                    }
                    untagged.push(u);
                }
                Response::Continue(_) => {
                    tracing::warn!("IMAP backend asked for a continuation nobody announced");
                    return Ok(None);
                }
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), BackendError> {
        self.conn.queue(bytes);
        self.conn.flush(self.reply_timeout).await?;
        Ok(())
    }

    /// A command without arguments; its tagged status and text.
    async fn simple(&mut self, command: &str) -> Result<(Status, String), BackendError> {
        let tag = self.tag();
        self.send(format!("{tag} {command}\r\n").as_bytes()).await?;
        match self.tagged(&tag).await? {
            Some((s, text, _, _)) => Ok((s, text)),
            None => Err(BackendError::OutOfStep(format!("{command}: another tag"))),
        }
    }

    /// `CAPABILITY`: the untagged `* CAPABILITY …` list.
    async fn capability(&mut self) -> Result<ImapCaps, BackendError> {
        self.capability_list().await.map(|l| ImapCaps::parse(&l))
    }

    /// `CAPABILITY`: the list as the backend wrote it.
    async fn capability_list(&mut self) -> Result<String, BackendError> {
        self.capability_answer().await.map(|(list, _)| list)
    }

    /// `CAPABILITY`: the list, and the untagged responses that came with
    /// it besides the list's own.
    async fn capability_answer(&mut self) -> Result<(String, Vec<Response>), BackendError> {
        let tag = self.tag();
        self.send(format!("{tag} CAPABILITY\r\n").as_bytes())
            .await?;
        let Some((status, text, _, untagged)) = self.tagged(&tag).await? else {
            return Err(BackendError::OutOfStep("CAPABILITY: another tag".into()));
        };
        let is_list = |r: &Response| match r {
            Response::Untagged { text, .. } => text
                .split(' ')
                .next()
                .is_some_and(|n| n.eq_ignore_ascii_case("CAPABILITY")),
            _ => false,
        };
        let others: Vec<Response> = untagged.iter().filter(|r| !is_list(r)).cloned().collect();
        if status != Status::Ok {
            return Err(BackendError::Protocol(format!(
                "CAPABILITY {}",
                checked_text(&text, false, "refused")
            )));
        }
        let list = untagged.iter().find_map(|r| match r {
            Response::Untagged { text, .. } => {
                let (name, list) = text.split_once(' ').unwrap_or((text, ""));
                name.eq_ignore_ascii_case("CAPABILITY").then_some(list)
            }
            _ => None,
        });
        // the tagged OK may carry the list as a response code instead
        match list.or_else(|| capability_code(&text)) {
            Some(l) => Ok((l.to_string(), others)),
            None => Err(BackendError::Protocol("CAPABILITY without a list".into())),
        }
    }

    /// A login OK without `[CAPABILITY …]` (`text`: `OK …`) gets the
    /// backend's list, asked now: before login the client was told
    /// mailgate's own (LITERAL+ among them: mailgate reads the login), and
    /// a client that gets no list with the OK (RFC 9051 §6.2.3 lets it
    /// carry one) may go on with what it knows: LITERAL+ of a backend
    /// without it, whose relay then closes the session at the first `{n+}`.
    /// `caps` become the list after login too (what the relay allows). A
    /// list that cannot be handed on (refused, not printable, too long)
    /// leaves the OK as it is; a broken connection is an error.
    async fn with_capabilities(&mut self, text: String) -> Result<String, BackendError> {
        // the backend's untagged data after its OK belongs to the client
        if capability_code(&text).is_some() || self.conn.buffered() > 0 {
            return Ok(text);
        }
        let list = match self.capability_answer().await {
            Ok((l, others)) => {
                // what the backend sent after its OK, before our CAPABILITY
                // was answered, is the client's: handed on after the OK
                // (re-rendered, so only a clean line; one with literals
                // cannot be told again and is dropped)
                for r in others {
                    if let Response::Untagged {
                        text,
                        literals: false,
                        ..
                    } = &r
                    {
                        if checked_text(text, false, "") == *text {
                            self.after_login
                                .extend_from_slice(format!("* {text}\r\n").as_bytes());
                            continue;
                        }
                    }
                    tracing::debug!("untagged data after login dropped: not printable");
                }
                l
            }
            Err(BackendError::Protocol(why)) => {
                tracing::debug!(reason = %why, "no capabilities after login");
                return Ok(text);
            }
            Err(e) => return Err(e),
        };
        let list = list.trim();
        let rest = text.split_once(' ').map_or("", |x| x.1);
        let with = format!("OK [CAPABILITY {list}] {rest}");
        let printable = !list.is_empty() && !list.contains(['[', ']']);
        if !printable || checked_text(&with, false, "") != with {
            return Ok(text);
        }
        self.caps = ImapCaps::parse(list);
        Ok(with.trim_end().to_string())
    }

    /// Dovecot's `ID` with the client's address; fails closed when the
    /// backend does not offer ID or does not answer OK.
    async fn imap_id(&mut self, id: &ClientIdentity) -> Result<(), BackendError> {
        if !self.caps.id {
            return Err(BackendError::Identity(
                "the backend does not offer ID".into(),
            ));
        }
        let tag = self.tag();
        self.send(id_command(&tag, id).as_bytes()).await?;
        match self.tagged(&tag).await? {
            Some((Status::Ok, _, _, _)) => Ok(()),
            Some((_, text, literals, _)) => Err(BackendError::Identity(format!(
                "ID refused: {}",
                checked_text(&text, literals, "(unprintable)")
            ))),
            None => Err(BackendError::Identity("ID: out of step".into())),
        }
    }

    /// Replays `login`. `Ok` carries what the backend decided (or
    /// [`ImapLoginReply::OutOfStep`]); `Err` means the connection is
    /// unusable.
    pub async fn login(&mut self, login: &ImapLogin) -> Result<ImapLoginReply, BackendError> {
        let tag = self.tag();
        let chunks = match login {
            ImapLogin::Login { user, password } => login_chunks(&tag, user, password, &self.caps),
            ImapLogin::Plain {
                authzid,
                user,
                password,
            } if self.caps.auth_plain => plain_chunks(&tag, authzid, user, password, &self.caps),
            // LOGIN carries no authorization identity: only one equal to
            // the user (or none) can be replayed
            ImapLogin::Plain {
                authzid,
                user,
                password,
            } if authzid.is_empty() || authzid == user => {
                login_chunks(&tag, user, password, &self.caps)
            }
            ImapLogin::Plain { .. } => return Ok(ImapLoginReply::Rejected(AUTHZID_TEXT.into())),
        };
        if !self.in_step().await {
            return Ok(ImapLoginReply::OutOfStep);
        }
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.into_iter().enumerate() {
            self.send(&chunk).await?;
            if i == last {
                break;
            }
            // a synchronising literal or the SASL response: the backend's
            // `+` first, or its refusal
            match self.response(self.reply_timeout).await? {
                Response::Continue(_) => {}
                Response::Tagged {
                    tag: t,
                    status,
                    text,
                    literals,
                } if t == tag => return Ok(reply(status, &text, literals)),
                _ => {
                    tracing::warn!("IMAP backend did not continue the login: out of step");
                    return Ok(ImapLoginReply::OutOfStep);
                }
            }
        }
        match self.tagged(&tag).await? {
            Some((status, text, literals, _)) => match reply(status, &text, literals) {
                ImapLoginReply::Accepted(t) => {
                    Ok(ImapLoginReply::Accepted(self.with_capabilities(t).await?))
                }
                r => Ok(r),
            },
            None => Ok(ImapLoginReply::OutOfStep),
        }
    }

    /// Whether the conversation is in step: nothing unread from the backend
    /// and the connection not closed (as in the POP3 client).
    async fn in_step(&mut self) -> bool {
        match self.conn.unsolicited().await {
            Ok(0) => true,
            Ok(_) => {
                tracing::warn!("IMAP backend sent data nobody asked for: out of step");
                false
            }
            Err(e) => {
                tracing::debug!(error = %e, "IMAP backend connection gone before login");
                false
            }
        }
    }

    /// The connection and whatever the backend already sent after its
    /// tagged OK (untagged data, which belongs to the client).
    pub fn into_parts(mut self) -> (BackendStream, BytesMut) {
        let mut left = BytesMut::from(&std::mem::take(&mut self.after_login)[..]);
        left.extend_from_slice(&self.conn.take_buffered());
        (self.conn.stream, left)
    }

    /// Polite goodbye; errors do not matter any more.
    pub async fn logout(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.simple("LOGOUT")).await;
    }
}

/// The session's view of a tagged login reply.
fn reply(status: Status, text: &str, literals: bool) -> ImapLoginReply {
    match status {
        Status::Ok => ImapLoginReply::Accepted(checked_text(text, literals, ACCEPTED_TEXT)),
        _ => ImapLoginReply::Rejected(checked_text(text, literals, REJECTED_TEXT)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Option<(Response, usize)> {
        parse_response(s.as_bytes(), MAX_RESPONSE).unwrap()
    }

    #[test]
    fn responses() {
        let (r, n) = parse("* OK [CAPABILITY IMAP4rev1 LITERAL+] ready\r\nm1").unwrap();
        assert_eq!(n, 44);
        let Response::Untagged {
            status,
            text,
            literals,
        } = r
        else {
            panic!()
        };
        assert_eq!(status, Some(Status::Ok));
        assert!(!literals);
        assert_eq!(capability_code(&text), Some("IMAP4rev1 LITERAL+"));
        assert_eq!(
            parse("m1 no [AUTHENTICATIONFAILED] no\r\n").unwrap().0,
            Response::Tagged {
                tag: "m1".into(),
                status: Status::No,
                text: "no [AUTHENTICATIONFAILED] no".into(),
                literals: false
            }
        );
        assert_eq!(
            parse("+ \r\n").unwrap().0,
            Response::Continue(String::new())
        );
        assert_eq!(parse("+\r\n").unwrap().0, Response::Continue(String::new()));
        assert!(matches!(
            parse("* PREAUTH hi\r\n").unwrap().0,
            Response::Untagged {
                status: Some(Status::PreAuth),
                ..
            }
        ));
        assert!(matches!(
            parse("* 3 EXISTS\n").unwrap().0,
            Response::Untagged { status: None, .. }
        ));
        // incomplete: no line end yet
        assert!(parse("* OK ready").is_none());
        for bad in [
            "hello\r\n",
            "m1 MAYBE\r\n",
            "\r\n",
            "m(1 OK x\r\n",
            "* OK\r\n\r\n",
        ] {
            let r = parse_response(bad.as_bytes(), MAX_RESPONSE);
            // the last one: the first response is fine, the second is not
            if bad.starts_with("* OK") {
                let (_, n) = r.unwrap().unwrap();
                assert!(parse_response(&bad.as_bytes()[n..], MAX_RESPONSE).is_err());
            } else {
                assert!(r.is_err(), "{bad:?}");
            }
        }
    }

    #[test]
    fn a_garbled_non_ascii_response_is_an_error_not_a_panic() {
        // the error quotes the line's start: never cut inside a character
        let line = format!("x{}\r\n", "\u{e4}".repeat(40));
        assert!(parse_response(line.as_bytes(), MAX_RESPONSE).is_err());
    }

    /// Literals are read whole (a `{n}` inside them is data) and counted
    /// against the bound.
    #[test]
    fn literals_in_responses() {
        let s = "* ID (\"name\" {5}\r\n{3}\r\n \"x\" {0}\r\n)\r\nm2 OK done\r\n";
        let (r, n) = parse(s).unwrap();
        assert!(matches!(r, Response::Untagged { literals: true, .. }));
        assert_eq!(&s[n..], "m2 OK done\r\n");
        // waiting for the literal's octets
        assert!(parse("* 1 FETCH (BODY[] {10}\r\nabc").is_none());
        // the literal would pass the bound: an error before it is buffered
        let big = "* 1 FETCH (BODY[] {100000}\r\n";
        assert!(parse_response(big.as_bytes(), MAX_RESPONSE).is_err());
        // a line without an end longer than the bound
        let long = vec![b'x'; MAX_RESPONSE + 1];
        assert!(parse_response(&long, MAX_RESPONSE).is_err());
        assert_eq!(literal_at_end(b"x {12}"), Some((12, false)));
        assert_eq!(literal_at_end(b"x {12+}"), Some((12, true)));
        assert_eq!(literal_at_end(b"x ~{7}"), Some((7, false)));
        for no in [&b"x {}"[..], b"x {a}", b"x 12}", b"x {99999999999}"] {
            assert_eq!(literal_at_end(no), None, "{no:?}");
        }
    }

    #[test]
    fn reply_texts_are_checked() {
        assert_eq!(
            reply(Status::Ok, "OK [CAPABILITY IMAP4rev1] Logged in", false),
            ImapLoginReply::Accepted("OK [CAPABILITY IMAP4rev1] Logged in".into())
        );
        assert_eq!(
            reply(Status::No, "NO caf\u{e9}", false),
            ImapLoginReply::Rejected(REJECTED_TEXT.into())
        );
        assert_eq!(
            reply(Status::Bad, "BAD x\ty", false),
            ImapLoginReply::Rejected(REJECTED_TEXT.into())
        );
        assert_eq!(
            reply(
                Status::Ok,
                &format!("OK {}", "x".repeat(MAX_REPLY_TEXT)),
                false
            ),
            ImapLoginReply::Accepted(ACCEPTED_TEXT.into())
        );
        assert_eq!(
            reply(Status::Ok, "OK {3}", true),
            ImapLoginReply::Accepted(ACCEPTED_TEXT.into())
        );
    }

    fn caps(list: &str) -> ImapCaps {
        ImapCaps::parse(list)
    }

    fn text(chunks: &[Vec<u8>]) -> Vec<String> {
        chunks
            .iter()
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect()
    }

    /// Every password class: plain text, quotes and backslashes (escaped in
    /// a quoted string), CR/LF/NUL and non-ASCII (literals: synchronising,
    /// or `{n+}` with LITERAL+, or with LITERAL- up to 4096 octets).
    #[test]
    fn login_quoting_and_literals() {
        let rev1 = caps("IMAP4rev1");
        assert_eq!(
            text(&login_chunks("m2", "alice", "secret", &rev1)),
            ["m2 LOGIN \"alice\" \"secret\"\r\n"]
        );
        assert_eq!(
            text(&login_chunks("m2", "al ice", r#"a"b\c d"#, &rev1)),
            ["m2 LOGIN \"al ice\" \"a\\\"b\\\\c d\"\r\n"]
        );
        assert_eq!(
            text(&login_chunks("m2", "alice", "pä\"ss", &rev1)),
            ["m2 LOGIN \"alice\" {6}\r\n", "pä\"ss\r\n"]
        );
        assert_eq!(
            text(&login_chunks("m2", "alice", "a\r\nb", &rev1)),
            ["m2 LOGIN \"alice\" {4}\r\n", "a\r\nb\r\n"]
        );
        assert_eq!(
            text(&login_chunks("m2", "alice", "a\0b", &rev1)),
            ["m2 LOGIN \"alice\" {3}\r\n", "a\0b\r\n"]
        );
        // both arguments literals: three chunks, two continuations
        assert_eq!(
            text(&login_chunks("m2", "jürgen", "pä", &rev1)),
            ["m2 LOGIN {7}\r\n", "jürgen {3}\r\n", "pä\r\n"]
        );
        assert_eq!(
            text(&login_chunks(
                "m2",
                "jürgen",
                "pä",
                &caps("IMAP4rev1 LITERAL+")
            )),
            ["m2 LOGIN {7+}\r\njürgen {3+}\r\npä\r\n"]
        );
        let minus = caps("IMAP4rev2 LITERAL-");
        assert_eq!(
            text(&login_chunks("m2", "u", "pä", &minus)),
            ["m2 LOGIN \"u\" {3+}\r\npä\r\n"]
        );
        let long = "ä".repeat(3000);
        assert_eq!(login_chunks("m2", "u", &long, &minus).len(), 2);
        // a very long 7-bit password goes as a literal too
        let long7 = "x".repeat(MAX_QUOTED + 1);
        assert_eq!(login_chunks("m2", "u", &long7, &rev1).len(), 2);
    }

    #[test]
    fn authenticate_plain_forms() {
        let b64 = base64::engine::general_purpose::STANDARD.encode("\0alice\0pä");
        assert_eq!(
            text(&plain_chunks(
                "m3",
                "",
                "alice",
                "pä",
                &caps("IMAP4rev1 AUTH=PLAIN SASL-IR")
            )),
            [format!("m3 AUTHENTICATE PLAIN {b64}\r\n")]
        );
        assert_eq!(
            text(&plain_chunks(
                "m3",
                "",
                "alice",
                "pä",
                &caps("IMAP4rev1 AUTH=PLAIN")
            )),
            [
                "m3 AUTHENTICATE PLAIN\r\n".to_string(),
                format!("{b64}\r\n")
            ]
        );
    }

    #[test]
    fn id_line() {
        let id = ClientIdentity {
            peer: "192.0.2.7:50123".parse().unwrap(),
            local: "[2001:db8::1]:993".parse().unwrap(),
            helo: None,
            esmtp: false,
        };
        assert_eq!(
            id_command("m2", &id),
            "m2 ID (\"x-originating-ip\" \"192.0.2.7\" \"x-originating-port\" \"50123\" \
             \"x-connected-ip\" \"2001:db8::1\" \"x-connected-port\" \"993\")\r\n"
        );
    }

    #[test]
    fn login_debug_hides_the_password() {
        let l = ImapLogin::Plain {
            authzid: String::new(),
            user: "alice".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{l:?}").contains("hunter2"));
    }
}
