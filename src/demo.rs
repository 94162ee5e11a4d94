//! `mailgate demo`: the gateway in front of a small, clearly labelled
//! **demo** legacy backend that keeps mail in memory. It exists so a newcomer
//! sees the whole path work in seconds; it is not a mail server.
//!
//! Its three faces share one in-memory [`Mailbox`]: an SMTP server that
//! stores what it receives, and a POP3 and an IMAP maildrop (user `demo`,
//! any password) that serve it, so the demo shows the whole loop: send with
//! curl over STARTTLS, fetch with curl over POP3S or IMAPS. All are also
//! handy as scripted legacy servers in tests.

use crate::codec::{CodecError, Conn};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// One message as the demo backend received it (dot-unstuffed, CRLF lines).
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub from: String,
    pub rcpts: Vec<String>,
    pub data: Vec<u8>,
}

/// The demo backend's in-memory store, shared by its SMTP and POP3 sides.
#[derive(Default)]
pub struct Mailbox {
    pub messages: Mutex<Vec<StoredMessage>>,
}

impl Mailbox {
    pub fn count(&self) -> usize {
        self.messages.lock().map(|m| m.len()).unwrap_or(0)
    }
    pub fn all(&self) -> Vec<StoredMessage> {
        self.messages.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

const LIMIT: Duration = Duration::from_secs(60);

/// Serves the demo SMTP backend on `listener` until the task is dropped.
pub async fn serve_smtp(listener: TcpListener, mailbox: Arc<Mailbox>) {
    while let Ok((tcp, _)) = listener.accept().await {
        let _ = tcp.set_nodelay(true);
        let mb = mailbox.clone();
        tokio::spawn(async move {
            let _ = smtp_session(tcp, mb).await;
        });
    }
}

async fn smtp_session(tcp: TcpStream, mailbox: Arc<Mailbox>) -> Result<(), CodecError> {
    let mut c = Conn::new(tcp);
    c.queue(b"220 demo-backend ESMTP (mailgate demo backend, in-memory)\r\n");
    let mut from = None;
    let mut rcpts = Vec::new();
    loop {
        if !c.has_line() {
            c.flush(LIMIT).await?;
        }
        let line = c.read_line(4096, LIMIT).await?;
        let text = String::from_utf8_lossy(&line).to_string();
        let upper = text.to_ascii_uppercase();
        if upper.starts_with("EHLO") {
            c.queue(b"250-demo-backend\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 52428800\r\n250 ENHANCEDSTATUSCODES\r\n");
        } else if upper.starts_with("HELO") {
            c.queue(b"250 demo-backend\r\n");
        } else if upper.starts_with("MAIL FROM:") {
            from = Some(angle(&text[10..]));
            rcpts.clear();
            c.queue(b"250 2.1.0 Ok\r\n");
        } else if upper.starts_with("RCPT TO:") {
            if from.is_none() {
                c.queue(b"503 5.5.1 need MAIL\r\n");
            } else {
                rcpts.push(angle(&text[8..]));
                c.queue(b"250 2.1.5 Ok\r\n");
            }
        } else if upper == "DATA" {
            if rcpts.is_empty() {
                c.queue(b"503 5.5.1 need RCPT\r\n");
                continue;
            }
            c.queue(b"354 go ahead\r\n");
            c.flush(LIMIT).await?;
            let mut data = Vec::new();
            loop {
                let l = c.read_line_raw(1 << 20, LIMIT).await?;
                if &l[..] == b".\r\n" {
                    break;
                }
                let l = if l.first() == Some(&b'.') {
                    &l[1..]
                } else {
                    &l[..]
                };
                data.extend_from_slice(l);
            }
            let n = {
                let mut m = mailbox.messages.lock().map_err(|_| CodecError::Closed)?;
                m.push(StoredMessage {
                    from: from.take().unwrap_or_default(),
                    rcpts: std::mem::take(&mut rcpts),
                    data,
                });
                m.len()
            };
            c.queue(format!("250 2.0.0 Ok: queued as DEMO{n}\r\n").as_bytes());
        } else if upper == "RSET" {
            from = None;
            rcpts.clear();
            c.queue(b"250 2.0.0 Ok\r\n");
        } else if upper.starts_with("NOOP") {
            c.queue(b"250 2.0.0 Ok\r\n");
        } else if upper == "QUIT" {
            c.queue(b"221 2.0.0 Bye\r\n");
            c.flush(LIMIT).await?;
            return Ok(());
        } else {
            c.queue(b"502 5.5.2 not implemented\r\n");
        }
    }
}

/// Serves the demo POP3 maildrop on `listener` until the task is dropped:
/// plaintext RFC 1939 for user `demo` with any password, over every message
/// in the mailbox (CAPA: USER UIDL TOP PIPELINING RESP-CODES).
pub async fn serve_pop3(listener: TcpListener, mailbox: Arc<Mailbox>) {
    while let Ok((tcp, _)) = listener.accept().await {
        let _ = tcp.set_nodelay(true);
        let mb = mailbox.clone();
        tokio::spawn(async move {
            let _ = pop3_session(tcp, mb).await;
        });
    }
}

/// The POP3 user of the demo maildrop.
pub const DEMO_USER: &str = "demo";

/// A unique id that stays the same across sessions (RFC 1939 §7 UIDL): a hash
/// of the message, plus a counter for identical copies.
fn uidl_of(m: &StoredMessage, seen: &mut Vec<u64>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in m.from.bytes().chain([0]).chain(m.data.iter().copied()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let n = seen.iter().filter(|x| **x == h).count();
    seen.push(h);
    format!("{h:016x}-{n}")
}

/// The message as it goes on the wire: CRLF line endings, ending in CRLF.
fn wire_form(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 2);
    let mut prev = 0u8;
    for &b in data {
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        prev = b;
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// `lines` (CRLF-terminated) dot-stuffed, then the terminating `.`.
fn stuffed(out: &mut Vec<u8>, text: &[u8]) {
    for line in text.split_inclusive(|b| *b == b'\n') {
        if line.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    out.extend_from_slice(b".\r\n");
}

struct Drop3 {
    original: StoredMessage,
    uid: String,
    wire: Vec<u8>,
    deleted: bool,
}

async fn pop3_session(tcp: TcpStream, mailbox: Arc<Mailbox>) -> Result<(), CodecError> {
    let mut c = Conn::new(tcp);
    c.queue(b"+OK demo-backend POP3 (mailgate demo backend, in-memory)\r\n");
    let mut user: Option<String> = None;
    let mut maildrop: Option<Vec<Drop3>> = None;
    loop {
        if !c.has_line() {
            c.flush(LIMIT).await?;
        }
        let line = c.read_line(512, LIMIT).await?;
        let text = String::from_utf8_lossy(&line).to_string();
        let mut words = text.split(' ');
        let verb = words.next().unwrap_or("").to_ascii_uppercase();
        let arg = |w: Option<&str>| w.and_then(|a| a.parse::<usize>().ok());
        let a1 = words.next();
        let a2 = words.next();
        match (verb.as_str(), maildrop.as_mut()) {
            ("CAPA", _) => c.queue(
                b"+OK Capability list follows\r\nUSER\r\nUIDL\r\nTOP\r\nPIPELINING\r\nRESP-CODES\r\n.\r\n",
            ),
            ("QUIT", None) => {
                c.queue(b"+OK demo-backend signing off\r\n");
                c.flush(LIMIT).await?;
                return Ok(());
            }
            ("QUIT", Some(msgs)) => {
                // UPDATE state: the deletions take effect now
                let mut n = 0;
                if let Ok(mut store) = mailbox.messages.lock() {
                    for m in msgs.iter().filter(|m| m.deleted) {
                        if let Some(i) = store.iter().position(|s| {
                            s.from == m.original.from
                                && s.rcpts == m.original.rcpts
                                && s.data == m.original.data
                        }) {
                            store.remove(i);
                            n += 1;
                        }
                    }
                }
                c.queue(format!("+OK demo-backend signing off ({n} messages deleted)\r\n").as_bytes());
                c.flush(LIMIT).await?;
                return Ok(());
            }
            ("NOOP", _) => c.queue(b"+OK\r\n"),
            ("USER", None) => {
                user = a1.map(str::to_string);
                c.queue(b"+OK\r\n");
            }
            ("PASS", None) => {
                if user.as_deref() == Some(DEMO_USER) {
                    let mut seen = Vec::new();
                    let msgs: Vec<Drop3> = mailbox
                        .all()
                        .into_iter()
                        .map(|m| Drop3 {
                            uid: uidl_of(&m, &mut seen),
                            wire: wire_form(&m.data),
                            original: m,
                            deleted: false,
                        })
                        .collect();
                    c.queue(format!("+OK [demo] maildrop has {} messages\r\n", msgs.len()).as_bytes());
                    maildrop = Some(msgs);
                } else {
                    user = None;
                    c.queue(b"-ERR [AUTH] Invalid login (the demo maildrop's user is demo)\r\n");
                }
            }
            ("STAT", Some(msgs)) => {
                let live = msgs.iter().filter(|m| !m.deleted);
                let (n, size) = live.fold((0, 0), |(n, s), m| (n + 1, s + m.wire.len()));
                c.queue(format!("+OK {n} {size}\r\n").as_bytes());
            }
            ("LIST" | "UIDL", Some(msgs)) => {
                let uidl = verb == "UIDL";
                let show = |i: usize, m: &Drop3| {
                    if uidl {
                        format!("{} {}", i + 1, m.uid)
                    } else {
                        format!("{} {}", i + 1, m.wire.len())
                    }
                };
                match a1 {
                    Some(_) => match arg(a1).and_then(|i| i.checked_sub(1)) {
                        Some(i) if msgs.get(i).is_some_and(|m| !m.deleted) => {
                            c.queue(format!("+OK {}\r\n", show(i, &msgs[i])).as_bytes())
                        }
                        _ => c.queue(b"-ERR no such message\r\n"),
                    },
                    None => {
                        let mut out = b"+OK\r\n".to_vec();
                        for (i, m) in msgs.iter().enumerate().filter(|(_, m)| !m.deleted) {
                            out.extend_from_slice(show(i, m).as_bytes());
                            out.extend_from_slice(b"\r\n");
                        }
                        out.extend_from_slice(b".\r\n");
                        c.queue(&out);
                    }
                }
            }
            ("RETR" | "TOP", Some(msgs)) => {
                let lines = if verb == "TOP" { arg(a2) } else { None };
                match arg(a1).and_then(|i| i.checked_sub(1)) {
                    Some(i) if msgs.get(i).is_some_and(|m| !m.deleted) && (verb == "RETR" || lines.is_some()) => {
                        let m = &msgs[i];
                        let text: &[u8] = match lines {
                            None => &m.wire,
                            Some(n) => {
                                // headers, the empty line, then n body lines
                                let mut end = 0;
                                let mut in_body = false;
                                let mut body_lines = 0;
                                for line in m.wire.split_inclusive(|b| *b == b'\n') {
                                    if in_body {
                                        if body_lines == n {
                                            break;
                                        }
                                        body_lines += 1;
                                    } else if line == b"\r\n" {
                                        in_body = true;
                                    }
                                    end += line.len();
                                }
                                &m.wire[..end]
                            }
                        };
                        let mut out = format!("+OK {} octets\r\n", m.wire.len()).into_bytes();
                        stuffed(&mut out, text);
                        c.write_now(&out, LIMIT).await?;
                    }
                    _ => c.queue(b"-ERR no such message\r\n"),
                }
            }
            ("DELE", Some(msgs)) => match arg(a1).and_then(|i| i.checked_sub(1)) {
                Some(i) if msgs.get(i).is_some_and(|m| !m.deleted) => {
                    msgs[i].deleted = true;
                    c.queue(format!("+OK message {} deleted\r\n", i + 1).as_bytes());
                }
                _ => c.queue(b"-ERR no such message\r\n"),
            },
            ("RSET", Some(msgs)) => {
                msgs.iter_mut().for_each(|m| m.deleted = false);
                c.queue(b"+OK\r\n");
            }
            (_, None) => c.queue(b"-ERR [AUTH] log in first\r\n"),
            (_, Some(_)) => c.queue(b"-ERR unknown command\r\n"),
        }
    }
}

/// Serves the demo IMAP maildrop on `listener` until the task is dropped:
/// plaintext IMAP4rev1 for user `demo` with any password (LOGIN or
/// AUTHENTICATE PLAIN), INBOX read-only over every message in the mailbox
/// (message `n` has UID `n`): what curl, Python's imaplib and the tests need
/// (CAPABILITY, NOOP, ID, SELECT/EXAMINE, FETCH/UID FETCH of `BODY[]`,
/// `BODY.PEEK[]`, `RFC822`, `RFC822.SIZE`, `FLAGS`, `UID`, LOGOUT).
pub async fn serve_imap(listener: TcpListener, mailbox: Arc<Mailbox>) {
    while let Ok((tcp, _)) = listener.accept().await {
        let _ = tcp.set_nodelay(true);
        let mb = mailbox.clone();
        tokio::spawn(async move {
            let _ = imap_session(tcp, mb).await;
        });
    }
}

/// The demo's capability list (before and after login).
const IMAP_CAPS: &str = "IMAP4rev1 AUTH=PLAIN SASL-IR LITERAL+ ID IDLE";
/// Longest command line and literal the demo reads.
const IMAP_MAX: usize = 8192;

/// One command's words: atoms, quoted strings (unescaped) and literals.
fn imap_words(parts: &[(Vec<u8>, Option<Vec<u8>>)]) -> Vec<Vec<u8>> {
    let mut words = Vec::new();
    for (text, literal) in parts {
        let mut i = 0;
        while i < text.len() {
            match text[i] {
                b' ' => i += 1,
                b'"' => {
                    let mut w = Vec::new();
                    i += 1;
                    while i < text.len() && text[i] != b'"' {
                        if text[i] == b'\\' && i + 1 < text.len() {
                            i += 1;
                        }
                        w.push(text[i]);
                        i += 1;
                    }
                    words.push(w);
                    i += 1;
                }
                b'(' => {
                    // a parenthesised list stays one word (FETCH items)
                    let end = text[i..]
                        .iter()
                        .position(|b| *b == b')')
                        .map_or(text.len(), |p| i + p + 1);
                    words.push(text[i..end].to_vec());
                    i = end;
                }
                _ => {
                    let end = text[i..]
                        .iter()
                        .position(|b| *b == b' ')
                        .map_or(text.len(), |p| i + p);
                    words.push(text[i..end].to_vec());
                    i = end;
                }
            }
        }
        if let Some(l) = literal {
            words.push(l.clone());
        }
    }
    words
}

/// Whether message `n` (1-based) of `count` is in the sequence set `set`
/// (`1`, `2:4`, `3:*`, `*`, comma-separated).
fn in_set(set: &str, n: usize, count: usize) -> bool {
    let num = |s: &str| {
        if s == "*" {
            Some(count)
        } else {
            s.parse::<usize>().ok()
        }
    };
    set.split(',').any(|r| match r.split_once(':') {
        Some((a, b)) => match (num(a), num(b)) {
            (Some(a), Some(b)) => (a.min(b)..=a.max(b)).contains(&n),
            _ => false,
        },
        None => num(r) == Some(n),
    })
}

/// The `* n FETCH (…)` response for `items` (upper case) of message `n`.
fn imap_fetch(n: usize, wire: &[u8], items: &str, uid: bool) -> Vec<u8> {
    let mut out = format!("* {n} FETCH (").into_bytes();
    let mut first = true;
    let mut add = |out: &mut Vec<u8>, item: &str, literal: Option<&[u8]>| {
        if !first {
            out.push(b' ');
        }
        first = false;
        out.extend_from_slice(item.as_bytes());
        if let Some(l) = literal {
            out.extend_from_slice(format!(" {{{}}}\r\n", l.len()).as_bytes());
            out.extend_from_slice(l);
        }
    };
    if uid || items.contains("UID") {
        add(&mut out, &format!("UID {n}"), None);
    }
    if items.contains("FLAGS") {
        add(&mut out, "FLAGS ()", None);
    }
    if items.contains("RFC822.SIZE") {
        add(&mut out, &format!("RFC822.SIZE {}", wire.len()), None);
    }
    if items.contains("BODY[]") || items.contains("BODY.PEEK[]") {
        add(&mut out, "BODY[]", Some(wire));
    } else if items.replace("RFC822.SIZE", "").contains("RFC822") {
        add(&mut out, "RFC822", Some(wire));
    }
    out.extend_from_slice(b")\r\n");
    out
}

async fn imap_session(tcp: TcpStream, mailbox: Arc<Mailbox>) -> Result<(), CodecError> {
    use base64::Engine as _;
    let mut c = Conn::new(tcp);
    c.queue(
        format!(
            "* OK [CAPABILITY {IMAP_CAPS}] demo-backend IMAP (mailgate demo backend, in-memory)\r\n"
        )
        .as_bytes(),
    );
    let mut logged_in = false;
    // INBOX as it was at SELECT: the messages' wire forms
    let mut selected: Option<Vec<Vec<u8>>> = None;
    loop {
        if !c.has_line() {
            c.flush(LIMIT).await?;
        }
        // the command line and the literals it carries
        let mut parts = Vec::new();
        let mut line = c.read_line(IMAP_MAX, LIMIT).await?.to_vec();
        while let Some((n, plus)) =
            crate::backend::imap::literal_at_end(&line).filter(|(n, _)| *n <= IMAP_MAX)
        {
            if !plus {
                c.queue(b"+ go ahead\r\n");
                c.flush(LIMIT).await?;
            }
            let read = async {
                while c.buffered() < n {
                    c.fill().await?;
                }
                Ok::<_, CodecError>(c.rbuf_mut().split_to(n).to_vec())
            };
            let literal = tokio::time::timeout(LIMIT, read)
                .await
                .map_err(|_| CodecError::Timeout)??;
            parts.push((line, Some(literal)));
            line = c.read_line(IMAP_MAX, LIMIT).await?.to_vec();
        }
        parts.push((line, None));
        let mut words = imap_words(&parts).into_iter();
        let tag = String::from_utf8_lossy(&words.next().unwrap_or_default()).into_owned();
        let text =
            |w: Option<Vec<u8>>| String::from_utf8_lossy(&w.unwrap_or_default()).into_owned();
        let mut verb = text(words.next()).to_ascii_uppercase();
        if verb == "UID" {
            verb = format!("UID {}", text(words.next()).to_ascii_uppercase());
        }
        let welcome = format!("{tag} OK [CAPABILITY {IMAP_CAPS}] Logged in (demo)\r\n");
        let refused = format!(
            "{tag} NO [AUTHENTICATIONFAILED] Invalid login (the demo maildrop's user is {DEMO_USER})\r\n"
        );
        match verb.as_str() {
            "CAPABILITY" => {
                c.queue(format!("* CAPABILITY {IMAP_CAPS}\r\n{tag} OK done\r\n").as_bytes())
            }
            "NOOP" => c.queue(format!("{tag} OK done\r\n").as_bytes()),
            "ID" => c.queue(
                format!("* ID (\"name\" \"mailgate-demo\")\r\n{tag} OK ID completed\r\n")
                    .as_bytes(),
            ),
            "LOGOUT" => {
                c.queue(format!("* BYE demo-backend signing off\r\n{tag} OK done\r\n").as_bytes());
                c.flush(LIMIT).await?;
                return Ok(());
            }
            "LOGIN" if !logged_in => {
                logged_in = text(words.next()) == DEMO_USER;
                c.queue(if logged_in { &welcome } else { &refused }.as_bytes());
            }
            "AUTHENTICATE" if !logged_in => {
                if !text(words.next()).eq_ignore_ascii_case("PLAIN") {
                    c.queue(format!("{tag} NO unsupported mechanism\r\n").as_bytes());
                    continue;
                }
                let response = match words.next() {
                    Some(ir) => ir,
                    None => {
                        c.queue(b"+ \r\n");
                        c.flush(LIMIT).await?;
                        c.read_line(IMAP_MAX, LIMIT).await?.to_vec()
                    }
                };
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(&response)
                    .unwrap_or_default();
                let fields: Vec<&[u8]> = decoded.split(|b| *b == 0).collect();
                logged_in = matches!(fields[..], [z, u, _] if u == DEMO_USER.as_bytes()
                    && (z.is_empty() || z == u));
                c.queue(if logged_in { &welcome } else { &refused }.as_bytes());
            }
            "LOGIN" | "AUTHENTICATE" => {
                c.queue(format!("{tag} BAD already logged in\r\n").as_bytes())
            }
            _ if !logged_in => c.queue(format!("{tag} NO log in first\r\n").as_bytes()),
            "SELECT" | "EXAMINE" => {
                if !text(words.next()).eq_ignore_ascii_case("INBOX") {
                    selected = None;
                    c.queue(format!("{tag} NO [NONEXISTENT] only INBOX here\r\n").as_bytes());
                    continue;
                }
                let msgs: Vec<Vec<u8>> = mailbox.all().iter().map(|m| wire_form(&m.data)).collect();
                c.queue(
                    format!(
                        "* {n} EXISTS\r\n* 0 RECENT\r\n* FLAGS (\\Seen)\r\n\
                         * OK [PERMANENTFLAGS ()] read-only\r\n* OK [UIDVALIDITY 1] UIDs valid\r\n\
                         * OK [UIDNEXT {next}] predicted\r\n{tag} OK [READ-ONLY] INBOX selected (demo)\r\n",
                        n = msgs.len(),
                        next = msgs.len() + 1
                    )
                    .as_bytes(),
                );
                selected = Some(msgs);
            }
            "FETCH" | "UID FETCH" => {
                let Some(msgs) = &selected else {
                    c.queue(format!("{tag} BAD select a mailbox first\r\n").as_bytes());
                    continue;
                };
                let set = text(words.next());
                let items = words
                    .map(|w| String::from_utf8_lossy(&w).to_ascii_uppercase())
                    .collect::<Vec<_>>()
                    .join(" ");
                let mut out = Vec::new();
                for (i, m) in msgs.iter().enumerate() {
                    if in_set(&set, i + 1, msgs.len()) {
                        out.extend_from_slice(&imap_fetch(i + 1, m, &items, verb == "UID FETCH"));
                    }
                }
                out.extend_from_slice(format!("{tag} OK done\r\n").as_bytes());
                c.write_now(&out, LIMIT).await?;
            }
            "CLOSE" | "UNSELECT" if selected.is_some() => {
                selected = None;
                c.queue(format!("{tag} OK done\r\n").as_bytes());
            }
            _ => c.queue(format!("{tag} BAD unknown command (demo)\r\n").as_bytes()),
        }
    }
}

fn angle(s: &str) -> String {
    let s = s.trim();
    let s = s.strip_prefix('<').unwrap_or(s);
    s.split('>').next().unwrap_or("").to_string()
}

/// Ports the demo listens on.
#[derive(Debug, Clone, Copy)]
pub struct DemoPorts {
    pub smtp: u16,
    pub smtps: u16,
    /// POP3 with STLS (TLS required before login).
    pub pop3: u16,
    /// POP3S (implicit TLS).
    pub pop3s: u16,
    /// IMAPS (implicit TLS).
    pub imaps: u16,
}

/// The demo's configuration: a real config file, written next to the certificate.
pub fn demo_config(
    dir: &Path,
    ports: DemoPorts,
    smtp_backend: SocketAddr,
    pop3_backend: SocketAddr,
    imap_backend: SocketAddr,
) -> String {
    format!(
        r#"# mailgate demo configuration (generated). The backend is the in-memory DEMO backend.
server:
  hostname: mailgate.demo
listeners:
  - {{ name: smtp, protocol: smtp, bind: "127.0.0.1:{smtp}", tls: starttls, require_tls: true, backend: demo-smtp }}
  - {{ name: smtps, protocol: smtp, bind: "127.0.0.1:{smtps}", tls: implicit, backend: demo-smtp }}
  - {{ name: pop3, protocol: pop3, bind: "127.0.0.1:{pop3}", tls: starttls, backend: demo-pop3 }}
  - {{ name: pop3s, protocol: pop3, bind: "127.0.0.1:{pop3s}", tls: implicit, backend: demo-pop3 }}
  - {{ name: imaps, protocol: imap, bind: "127.0.0.1:{imaps}", tls: implicit, backend: demo-imap }}
tls:
  certificates: [ {{ cert: "{dir}/cert.pem", key: "{dir}/key.pem" }} ]
backends:
  demo-smtp: {{ address: "{smtp_backend}" }}
  demo-pop3: {{ address: "{pop3_backend}" }}
  demo-imap: {{ address: "{imap_backend}" }}
"#,
        smtp = ports.smtp,
        smtps = ports.smtps,
        pop3 = ports.pop3,
        pop3s = ports.pop3s,
        imaps = ports.imaps,
        dir = dir.display(),
    )
}

/// The curl command that fetches message 1 over IMAPS (printed by `demo`).
pub fn imaps_command(cert: &Path, port: u16) -> String {
    format!(
        "curl --cacert {} 'imaps://{DEMO_USER}:{DEMO_USER}@127.0.0.1:{port}/INBOX;UID=1'",
        cert.display()
    )
}

/// Makes `dir` safe to write the demo's files into: created 0700 when it is
/// missing; an existing one must be a directory (not a symlink) owned by us
/// that nobody else may write to (then nobody can plant links in it; read
/// or search bits for others are removed). The default lives in /tmp, where
/// anyone could have created it first.
pub fn private_dir(dir: &Path) -> anyhow::Result<()> {
    use anyhow::{bail, Context};
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    let d = dir.display();
    let m = std::fs::symlink_metadata(dir).with_context(|| format!("inspecting {d}"))?;
    if m.file_type().is_symlink() {
        bail!("{d} is a symbolic link; the demo only writes into a real directory (choose another with --dir)");
    }
    if !m.is_dir() {
        bail!("{d} exists and is not a directory (choose another with --dir)");
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if m.uid() != me {
        bail!(
            "{d} belongs to uid {}, not to us (uid {me}); refusing to write into it (choose another with --dir)",
            m.uid()
        );
    }
    if m.mode() & 0o022 != 0 {
        bail!(
            "{d} is writable by others (mode {:o}); refusing to write into it (chmod 700 it, or choose another with --dir)",
            m.mode() & 0o7777
        );
    }
    if m.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 700 {d}"))?;
    }
    Ok(())
}

/// Runs the demo until Ctrl-C.
pub async fn run(dir: &Path, ports: DemoPorts) -> anyhow::Result<()> {
    use anyhow::Context;
    private_dir(dir)?;
    let (cert, _key) =
        crate::tls::write_self_signed(dir, &["localhost", "127.0.0.1", "mailgate.demo"])?;
    let mailbox = Arc::new(Mailbox::default());
    let smtp_sink = TcpListener::bind("127.0.0.1:0").await?;
    let smtp_addr = smtp_sink.local_addr()?;
    tokio::spawn(serve_smtp(smtp_sink, mailbox.clone()));
    let maildrop = TcpListener::bind("127.0.0.1:0").await?;
    let pop3_addr = maildrop.local_addr()?;
    tokio::spawn(serve_pop3(maildrop, mailbox.clone()));
    let imap_drop = TcpListener::bind("127.0.0.1:0").await?;
    let imap_addr = imap_drop.local_addr()?;
    tokio::spawn(serve_imap(imap_drop, mailbox.clone()));
    let text = demo_config(dir, ports, smtp_addr, pop3_addr, imap_addr);
    let cfg_path = dir.join("mailgate-demo.yaml");
    crate::tls::write_fresh(&cfg_path, text.as_bytes(), 0o600)
        .with_context(|| format!("writing {}", cfg_path.display()))?;
    let config = crate::config::load(&cfg_path)?;
    let gw = crate::server::Gateway::start(&config).await?;
    println!("mailgate demo — the backend is an in-memory DEMO backend, not a mail server");
    println!("  SMTP + STARTTLS (TLS required)  127.0.0.1:{}", ports.smtp);
    println!(
        "  SMTPS (implicit TLS)            127.0.0.1:{}",
        ports.smtps
    );
    println!("  POP3 + STLS (TLS required)      127.0.0.1:{}", ports.pop3);
    println!(
        "  POP3S (implicit TLS)            127.0.0.1:{}",
        ports.pop3s
    );
    println!(
        "  IMAPS (implicit TLS)            127.0.0.1:{}",
        ports.imaps
    );
    println!("  demo SMTP backend (plaintext)   {smtp_addr}");
    println!("  demo POP3 maildrop (plaintext)  {pop3_addr}  user {DEMO_USER}, any password");
    println!("  demo IMAP maildrop (plaintext)  {imap_addr}  user {DEMO_USER}, any password");
    println!(
        "  config {}  certificate {}",
        cfg_path.display(),
        cert.display()
    );
    println!();
    println!("Send a message through STARTTLS:");
    println!(
        "  printf 'From: alice@example.org\\r\\nTo: bob@example.net\\r\\nSubject: hello\\r\\n\\r\\nHello through mailgate.\\r\\n' | curl --ssl-reqd --cacert {} --url smtp://127.0.0.1:{} --mail-from alice@example.org --mail-rcpt bob@example.net -T -",
        cert.display(),
        ports.smtp
    );
    println!();
    println!("Fetch it back over POP3S (message 1; list with a trailing / instead of /1):");
    println!(
        "  curl --cacert {} pop3s://{DEMO_USER}:{DEMO_USER}@127.0.0.1:{}/1",
        cert.display(),
        ports.pop3s
    );
    println!();
    println!("Or over IMAPS (the message with UID 1 in INBOX):");
    println!("  {}", imaps_command(&cert, ports.imaps));
    println!();
    println!("Press Ctrl-C to stop.");
    let mut seen = 0;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                let all = mailbox.all();
                for m in &all[seen..] {
                    let subject = String::from_utf8_lossy(&m.data)
                        .lines()
                        .find(|l| l.to_ascii_lowercase().starts_with("subject:"))
                        .map(|l| l[8..].trim().to_string())
                        .unwrap_or_default();
                    println!("demo backend received: from=<{}> rcpts={:?} size={} subject={:?}", m.from, m.rcpts, m.data.len(), subject);
                }
                seen = all.len();
            }
        }
    }
    gw.shutdown().await;
    Ok(())
}
