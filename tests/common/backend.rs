//! Scripted backends: legacy SMTP, POP3 and IMAP servers on loopback whose replies
//! a test scripts, and which record what they received. Unscripted commands
//! get a plain success; a test scripts only what its case is about.
//!
//! ```ignore
//! let b = SmtpBackend::new().on("MAIL", "451 4.3.0 later\r\n").start().await;
//! … b.addr … b.lines() …
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// How long a backend waits for the gateway's next line before it hangs up.
const IDLE: Duration = Duration::from_secs(10);

/// What a scripted backend received, over all its connections.
#[derive(Default, Debug)]
pub struct Seen {
    /// Every command line, CRLF cut (lossy UTF-8), and whether it came over TLS.
    pub lines: Vec<(bool, String)>,
    /// Every byte received, PROXY header and message bodies included.
    pub raw: Vec<u8>,
    /// The PROXY v2 headers received ([`SmtpBackend::proxy`]).
    pub proxy: Vec<Vec<u8>>,
    /// Messages it answered with its end-of-data reply (a 250 unless
    /// scripted); POP3 and IMAP: logins it accepted.
    pub accepted: usize,
    /// IMAP: the literals received, in order.
    pub literals: Vec<Vec<u8>>,
}

/// A running scripted backend.
#[derive(Clone)]
pub struct Running {
    /// `127.0.0.1:port`, for a backend's `address:`.
    pub addr: String,
    pub connections: Arc<AtomicUsize>,
    pub seen: Arc<Mutex<Seen>>,
}

impl Running {
    /// Every command line received (without the TLS flag).
    pub fn lines(&self) -> Vec<String> {
        let s = self.seen.lock().unwrap();
        s.lines.iter().map(|(_, l)| l.clone()).collect()
    }

    /// Every command line, each prefixed `tls:` or `plain:` by how it came.
    pub fn tagged(&self) -> Vec<String> {
        let s = self.seen.lock().unwrap();
        s.lines
            .iter()
            .map(|(tls, l)| format!("{}{l}", if *tls { "tls:" } else { "plain:" }))
            .collect()
    }

    pub fn raw(&self) -> Vec<u8> {
        self.seen.lock().unwrap().raw.clone()
    }

    /// IMAP: the literals received, in order.
    pub fn literals(&self) -> Vec<Vec<u8>> {
        self.seen.lock().unwrap().literals.clone()
    }

    pub fn accepted(&self) -> usize {
        self.seen.lock().unwrap().accepted
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// Accepts connections on loopback, each served by `session` (with the
/// record); counts them.
pub async fn serve<F, Fut>(session: F) -> Running
where
    F: Fn(TcpStream, Arc<Mutex<Seen>>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = Running {
        addr: l.local_addr().unwrap().to_string(),
        connections: Arc::default(),
        seen: Arc::default(),
    };
    let (count, seen) = (running.connections.clone(), running.seen.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(session(tcp, seen.clone()));
        }
    });
    running
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Where TLS comes in, if at all.
#[derive(Clone)]
enum Tls {
    None,
    Implicit(TlsAcceptor),
    Starttls(TlsAcceptor),
}

/// Reads one line (raw, with its end) into `raw`; false at EOF, error or
/// [`IDLE`].
async fn read_line<R: AsyncBufReadExt + Unpin>(r: &mut R, line: &mut Vec<u8>) -> bool {
    line.clear();
    matches!(
        tokio::time::timeout(IDLE, r.read_until(b'\n', line)).await,
        Ok(Ok(n)) if n > 0
    )
}

/// The next command line (CRLF cut) and its verb, recorded in `seen`;
/// `None` at EOF, error or [`IDLE`].
async fn next_command<R: AsyncBufReadExt + Unpin>(
    r: &mut R,
    raw: &mut Vec<u8>,
    seen: &Mutex<Seen>,
    tls: bool,
) -> Option<(String, String)> {
    if !read_line(r, raw).await {
        return None;
    }
    let cmd = String::from_utf8_lossy(raw).trim_end().to_string();
    let mut s = seen.lock().unwrap();
    s.raw.extend_from_slice(raw);
    s.lines.push((tls, cmd.clone()));
    let verb = verb(&cmd);
    Some((cmd, verb))
}

/// The command's verb, upper case (`MAIL` of `MAIL FROM:<…>`).
fn verb(line: &str) -> String {
    line.split([' ', ':'])
        .next()
        .unwrap_or("")
        .to_ascii_uppercase()
}

/// A scripted backend: the greeting and the replies, by command verb or by
/// whole command line, and what its protocol adds (`P`).
#[derive(Clone)]
pub struct Scripted<P> {
    greeting: String,
    /// by upper-case verb
    verbs: HashMap<String, String>,
    /// by the whole command line, before `verbs`
    lines: HashMap<String, String>,
    p: P,
}

impl<P> Scripted<P> {
    fn with(greeting: &str, verbs: &[(&str, &str)], p: P) -> Self {
        Scripted {
            greeting: greeting.into(),
            verbs: verbs
                .iter()
                .map(|(v, r)| (v.to_string(), r.to_string()))
                .collect(),
            lines: HashMap::new(),
            p,
        }
    }

    /// The greeting, raw (CRLFs included).
    pub fn greeting(mut self, g: &str) -> Self {
        self.greeting = g.into();
        self
    }

    /// The raw reply to every command with verb `verb` (`EHLO`, `MAIL`, …).
    pub fn on(mut self, verb: &str, reply: &str) -> Self {
        self.verbs.insert(verb.to_ascii_uppercase(), reply.into());
        self
    }

    /// The raw reply to exactly the command line `line` (before [`on`](Self::on)).
    pub fn on_line(mut self, line: &str, reply: &str) -> Self {
        self.lines.insert(line.into(), reply.into());
        self
    }

    /// The scripted reply to `cmd` (its verb `verb`), if any.
    fn answer(&self, cmd: &str, verb: &str) -> Option<&String> {
        self.lines.get(cmd).or_else(|| self.verbs.get(verb))
    }
}

// ---------------------------------------------------------------- SMTP

/// A scripted legacy SMTP server. By default: `220 legacy ESMTP`, EHLO
/// `250-legacy` / `250 8BITMIME`, DATA `354 go` then (after the message)
/// `250 2.0.0 queued`, QUIT `221 bye` and a close, anything else `250 ok`.
/// A DATA reply that is not a 354 ends the command there (no message read).
pub type SmtpBackend = Scripted<Smtp>;

/// What SMTP adds to a [`Scripted`] backend.
#[derive(Clone)]
pub struct Smtp {
    /// EHLO before STARTTLS, when it differs
    ehlo_plain: Option<String>,
    end_of_data: String,
    otherwise: String,
    close_after: Option<String>,
    hang_after: Option<String>,
    tls: Tls,
    proxy: bool,
}

impl Default for SmtpBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl SmtpBackend {
    pub fn new() -> Self {
        Scripted::with(
            "220 legacy ESMTP\r\n",
            &[
                ("EHLO", "250-legacy\r\n250 8BITMIME\r\n"),
                ("DATA", "354 go\r\n"),
                ("QUIT", "221 bye\r\n"),
            ],
            Smtp {
                ehlo_plain: None,
                end_of_data: "250 2.0.0 queued\r\n".into(),
                otherwise: "250 ok\r\n".into(),
                close_after: None,
                hang_after: None,
                tls: Tls::None,
                proxy: false,
            },
        )
    }

    /// The raw reply to the message (after DATA's 354 and the end of data).
    pub fn end_of_data(mut self, reply: &str) -> Self {
        self.p.end_of_data = reply.into();
        self
    }

    /// The raw reply to every command not scripted otherwise.
    pub fn otherwise(mut self, reply: &str) -> Self {
        self.p.otherwise = reply.into();
        self
    }

    /// Hang up right after replying to `verb`.
    pub fn close_after(mut self, verb: &str) -> Self {
        self.p.close_after = Some(verb.to_ascii_uppercase());
        self
    }

    /// Stop answering (and reading) right after replying to `verb`, the
    /// connection held open for 30 s: a backend that stalls.
    pub fn hang_after(mut self, verb: &str) -> Self {
        self.p.hang_after = Some(verb.to_ascii_uppercase());
        self
    }

    /// Implicit TLS with `acc`: the greeting comes over TLS.
    pub fn implicit_tls(mut self, acc: TlsAcceptor) -> Self {
        self.p.tls = Tls::Implicit(acc);
        self
    }

    /// STARTTLS with `acc`: before it, EHLO answers `ehlo_plain`; after it,
    /// the scripted EHLO, and no second greeting.
    pub fn starttls(mut self, acc: TlsAcceptor, ehlo_plain: &str) -> Self {
        self.p.tls = Tls::Starttls(acc);
        self.p.ehlo_plain = Some(ehlo_plain.into());
        self.verbs
            .insert("STARTTLS".into(), "220 go ahead\r\n".into());
        self
    }

    /// Reads a PROXY v2 header, when one arrives before the greeting (within
    /// 200 ms); it is recorded in [`Seen::proxy`] and at the start of `raw`.
    pub fn proxy(mut self) -> Self {
        self.p.proxy = true;
        self
    }

    pub async fn start(self) -> Running {
        let script = Arc::new(self);
        serve(move |tcp, seen| {
            let script = script.clone();
            async move {
                let mut r = BufReader::new(tcp);
                if script.p.proxy {
                    read_proxy(&mut r, &seen).await;
                }
                match &script.p.tls {
                    Tls::Implicit(acc) => {
                        let Ok(t) = acc.clone().accept(r.into_inner()).await else {
                            return;
                        };
                        smtp_session(BufReader::new(Box::new(t)), true, &script, &seen).await;
                    }
                    _ => smtp_session(BufReader::new(Box::new(r)), false, &script, &seen).await,
                }
            }
        })
        .await
    }
}

/// A PROXY v2 header, if one comes before the greeting.
async fn read_proxy(r: &mut BufReader<TcpStream>, seen: &Mutex<Seen>) {
    let mut sig = [0u8; 16];
    let peeked = tokio::time::timeout(Duration::from_millis(200), async {
        loop {
            match r.get_mut().peek(&mut sig).await {
                Ok(n) if n < 16 && n > 0 => tokio::time::sleep(Duration::from_millis(5)).await,
                other => return other,
            }
        }
    })
    .await;
    if matches!(peeked, Ok(Ok(16))) && sig[..12] == *b"\r\n\r\n\0\r\nQUIT\n" {
        let len = u16::from_be_bytes([sig[14], sig[15]]) as usize;
        let mut header = vec![0u8; 16 + len];
        r.read_exact(&mut header).await.unwrap();
        let mut s = seen.lock().unwrap();
        s.raw.extend_from_slice(&header);
        s.proxy.push(header);
    }
}

async fn smtp_session(
    mut r: BufReader<Box<dyn Io>>,
    tls: bool,
    script: &SmtpBackend,
    seen: &Mutex<Seen>,
) {
    // a greeting on a new connection, not again after STARTTLS
    let greet = !tls || matches!(script.p.tls, Tls::Implicit(_));
    if greet
        && r.get_mut()
            .write_all(script.greeting.as_bytes())
            .await
            .is_err()
    {
        return;
    }
    let mut raw = Vec::new();
    loop {
        let Some((cmd, verb)) = next_command(&mut r, &mut raw, seen, tls).await else {
            return;
        };
        let answer = match (&script.p.ehlo_plain, verb.as_str()) {
            (Some(plain), "EHLO") if !tls => plain.clone(),
            _ => script
                .answer(&cmd, &verb)
                .unwrap_or(&script.p.otherwise)
                .clone(),
        };
        if r.get_mut().write_all(answer.as_bytes()).await.is_err() {
            return;
        }
        if script.p.close_after.as_deref() == Some(verb.as_str()) || verb == "QUIT" {
            return;
        }
        if script.p.hang_after.as_deref() == Some(verb.as_str()) {
            tokio::time::sleep(Duration::from_secs(30)).await;
            return;
        }
        match verb.as_str() {
            "DATA" if answer.starts_with("354") => {
                loop {
                    if !read_line(&mut r, &mut raw).await {
                        return;
                    }
                    seen.lock().unwrap().raw.extend_from_slice(&raw);
                    if raw == b".\r\n" {
                        break;
                    }
                }
                seen.lock().unwrap().accepted += 1;
                let end = script.p.end_of_data.as_bytes();
                if r.get_mut().write_all(end).await.is_err() {
                    return;
                }
            }
            "STARTTLS" if !tls && answer.starts_with("220") => {
                let Tls::Starttls(acc) = &script.p.tls else {
                    return;
                };
                let Ok(t) = acc.clone().accept(r.into_inner()).await else {
                    return;
                };
                let next = BufReader::new(Box::new(t) as Box<dyn Io>);
                return Box::pin(smtp_session(next, true, script, seen)).await;
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------- POP3

/// A scripted legacy POP3 server. By default: `+OK fake`, CAPA the scripted
/// capability lines (none: `+OK` and `.`), PASS and AUTH `+OK logged in`
/// (counted in [`Seen::accepted`]), STAT `+OK 0 0`, QUIT `+OK bye` and a
/// close, anything else `+OK`. A scripted CAPA replaces the capability lines.
pub type Pop3Backend = Scripted<Pop3>;

/// What POP3 adds to a [`Scripted`] backend.
#[derive(Clone)]
pub struct Pop3 {
    capa: Vec<String>,
    tls: Option<TlsAcceptor>,
    proxy: bool,
}

impl Default for Pop3Backend {
    fn default() -> Self {
        Self::new()
    }
}

impl Pop3Backend {
    pub fn new() -> Self {
        Scripted::with(
            "+OK fake\r\n",
            &[
                ("PASS", "+OK logged in\r\n"),
                ("AUTH", "+OK logged in\r\n"),
                ("STAT", "+OK 0 0\r\n"),
                ("QUIT", "+OK bye\r\n"),
            ],
            Pop3 {
                capa: Vec::new(),
                tls: None,
                proxy: false,
            },
        )
    }

    /// Implicit TLS with `acc`.
    pub fn implicit_tls(mut self, acc: TlsAcceptor) -> Self {
        self.p.tls = Some(acc);
        self
    }

    /// The capability lines CAPA lists (without CRLF).
    pub fn capa<S: ToString>(mut self, lines: &[S]) -> Self {
        self.p.capa = lines.iter().map(S::to_string).collect();
        self
    }

    /// Reads a PROXY v2 header as [`SmtpBackend::proxy`] does.
    pub fn proxy(mut self) -> Self {
        self.p.proxy = true;
        self
    }

    pub async fn start(self) -> Running {
        let script = Arc::new(self);
        serve(move |tcp, seen| {
            let script = script.clone();
            async move {
                let mut r = BufReader::new(tcp);
                if script.p.proxy {
                    read_proxy(&mut r, &seen).await;
                }
                match &script.p.tls {
                    Some(acc) => {
                        let Ok(t) = acc.clone().accept(r.into_inner()).await else {
                            return;
                        };
                        pop3_session(Box::new(t), &script, &seen).await
                    }
                    None => pop3_session(Box::new(r), &script, &seen).await,
                }
            }
        })
        .await
    }
}

async fn pop3_session(tcp: Box<dyn Io>, script: &Pop3Backend, seen: &Mutex<Seen>) {
    let mut r = BufReader::new(tcp);
    if r.get_mut()
        .write_all(script.greeting.as_bytes())
        .await
        .is_err()
    {
        return;
    }
    let mut raw = Vec::new();
    loop {
        let Some((cmd, verb)) = next_command(&mut r, &mut raw, seen, false).await else {
            return;
        };
        let answer = match script.answer(&cmd, &verb) {
            Some(a) => a.clone(),
            None if verb == "CAPA" => {
                let mut c = String::from("+OK\r\n");
                for l in &script.p.capa {
                    c.push_str(l);
                    c.push_str("\r\n");
                }
                c.push_str(".\r\n");
                c
            }
            None => "+OK\r\n".into(),
        };
        if answer.starts_with("+OK") && matches!(verb.as_str(), "PASS" | "AUTH") {
            seen.lock().unwrap().accepted += 1;
        }
        if r.get_mut().write_all(answer.as_bytes()).await.is_err() || verb == "QUIT" {
            return;
        }
    }
}

// ---------------------------------------------------------------- demo

/// The library's demo SMTP backend (an in-memory mailbox) on loopback: the
/// mailbox and the address.
pub async fn demo_smtp() -> (Arc<mailgate::demo::Mailbox>, String) {
    let mb = Arc::new(mailgate::demo::Mailbox::default());
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(mailgate::demo::serve_smtp(l, mb.clone()));
    (mb, addr)
}

/// The library's demo POP3 backend serving `mailbox` on loopback: its address.
pub async fn demo_pop3(mailbox: Arc<mailgate::demo::Mailbox>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(mailgate::demo::serve_pop3(l, mailbox));
    addr
}

// ---------------------------------------------------------------- IMAP

/// A scripted legacy IMAP server with one user. By default: the greeting
/// `* OK [CAPABILITY <caps>] fake IMAP ready` (`{caps}` in a scripted
/// greeting stands for the list), the capability list `IMAP4rev1
/// AUTH=PLAIN SASL-IR ID`, user `alice` / password `secret`; it answers
/// CAPABILITY, ID, LOGIN (quoted strings, atoms and literals, a `+` for each
/// synchronising one), AUTHENTICATE PLAIN (with or without an initial
/// response; `*` cancels), SELECT/EXAMINE, FETCH/UID FETCH of whole messages
/// (`BODY[]` literals), LOGOUT (`* BYE` and a close), anything else `OK`.
/// A scripted reply (by verb, or by the command line without its tag) is
/// sent instead, with `{tag}` replaced by the command's tag. Logins that
/// succeed are counted in [`Seen::accepted`]; literals are recorded in
/// [`Seen::literals`].
pub type ImapBackend = Scripted<Imap>;

/// What IMAP adds to a [`Scripted`] backend.
#[derive(Clone)]
pub struct Imap {
    caps: String,
    user: String,
    password: String,
    messages: Vec<Vec<u8>>,
    tls: Option<TlsAcceptor>,
}

impl Default for ImapBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl ImapBackend {
    pub fn new() -> Self {
        Scripted::with(
            "* OK [CAPABILITY {caps}] fake IMAP ready\r\n",
            &[],
            Imap {
                caps: "IMAP4rev1 AUTH=PLAIN SASL-IR ID".into(),
                user: "alice".into(),
                password: "secret".into(),
                messages: vec![b"Subject: one\r\n\r\nfirst\r\n".to_vec()],
                tls: None,
            },
        )
    }

    /// The capability list (CAPABILITY, and `{caps}` in the greeting).
    pub fn caps(mut self, list: &str) -> Self {
        self.p.caps = list.into();
        self
    }

    /// The one user and password it accepts.
    pub fn user(mut self, user: &str, password: &str) -> Self {
        self.p.user = user.into();
        self.p.password = password.into();
        self
    }

    /// The messages of INBOX (raw, CRLF).
    pub fn messages(mut self, messages: Vec<Vec<u8>>) -> Self {
        self.p.messages = messages;
        self
    }

    /// Implicit TLS with `acc`.
    pub fn implicit_tls(mut self, acc: TlsAcceptor) -> Self {
        self.p.tls = Some(acc);
        self
    }

    pub async fn start(self) -> Running {
        let script = Arc::new(self);
        serve(move |tcp, seen| {
            let script = script.clone();
            async move {
                match &script.p.tls {
                    Some(acc) => {
                        let Ok(t) = acc.clone().accept(tcp).await else {
                            return;
                        };
                        imap_session(Box::new(t), true, &script, &seen).await
                    }
                    None => imap_session(Box::new(tcp), false, &script, &seen).await,
                }
            }
        })
        .await
    }
}

/// One IMAP argument as the scripted backend read it.
fn imap_args(segments: &[(Vec<u8>, Option<Vec<u8>>)]) -> Vec<Vec<u8>> {
    let mut args = Vec::new();
    for (text, literal) in segments {
        let mut i = 0;
        let t = &text[..];
        while i < t.len() {
            match t[i] {
                b' ' => i += 1,
                b'"' => {
                    let mut s = Vec::new();
                    i += 1;
                    while i < t.len() && t[i] != b'"' {
                        if t[i] == b'\\' && i + 1 < t.len() {
                            i += 1;
                        }
                        s.push(t[i]);
                        i += 1;
                    }
                    i += 1;
                    args.push(s);
                }
                b'{' if t[i..].ends_with(b"}") => break,
                _ => {
                    let start = i;
                    while i < t.len() && t[i] != b' ' {
                        i += 1;
                    }
                    args.push(t[start..i].to_vec());
                }
            }
        }
        if let Some(l) = literal {
            args.push(l.clone());
        }
    }
    args
}

/// The octet count of a `{n}` / `{n+}` literal ending `line`, and whether
/// it is non-synchronising.
fn imap_literal(line: &[u8]) -> Option<(usize, bool)> {
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|b| *b == b'{')?;
    let digits = &inner[open + 1..];
    let (digits, plus) = match digits.strip_suffix(b"+") {
        Some(d) => (d, true),
        None => (digits, false),
    };
    Some((std::str::from_utf8(digits).ok()?.parse().ok()?, plus))
}

async fn imap_session(tcp: Box<dyn Io>, tls: bool, script: &ImapBackend, seen: &Mutex<Seen>) {
    let mut r = BufReader::new(tcp);
    let caps = script.p.caps.clone();
    let greeting = script.greeting.replace("{caps}", &caps);
    if r.get_mut().write_all(greeting.as_bytes()).await.is_err() {
        return;
    }
    let mut raw = Vec::new();
    loop {
        // the command line, and the literals it carries
        let Some((first, _)) = next_command(&mut r, &mut raw, seen, tls).await else {
            return;
        };
        let (tag, rest) = first.split_once(' ').unwrap_or((&first, ""));
        let tag = tag.to_string();
        let mut segments = Vec::new();
        let mut line = rest.as_bytes().to_vec();
        loop {
            let Some((n, plus)) = imap_literal(&line) else {
                segments.push((line, None));
                break;
            };
            if !plus && r.get_mut().write_all(b"+ go ahead\r\n").await.is_err() {
                return;
            }
            let mut lit = vec![0u8; n];
            if tokio::time::timeout(IDLE, r.read_exact(&mut lit))
                .await
                .is_err()
            {
                return;
            }
            {
                let mut s = seen.lock().unwrap();
                s.raw.extend_from_slice(&lit);
                s.literals.push(lit.clone());
            }
            segments.push((line, Some(lit)));
            if !read_line(&mut r, &mut raw).await {
                return;
            }
            let cont = String::from_utf8_lossy(&raw).trim_end().to_string();
            {
                let mut s = seen.lock().unwrap();
                s.raw.extend_from_slice(&raw);
                s.lines.push((tls, cont.clone()));
            }
            line = cont.into_bytes();
        }
        let command = String::from_utf8_lossy(&segments[0].0).to_string();
        let mut args = imap_args(&segments);
        let mut verb = String::from_utf8_lossy(args.first().map(|a| &a[..]).unwrap_or(b""))
            .to_ascii_uppercase();
        if !args.is_empty() {
            args.remove(0);
        }
        if verb == "UID" && !args.is_empty() {
            verb = format!(
                "UID {}",
                String::from_utf8_lossy(&args.remove(0)).to_ascii_uppercase()
            );
        }
        let answer = match script.answer(&command, verb.split(' ').next_back().unwrap_or("")) {
            Some(a) => a.replace("{tag}", &tag).into_bytes(),
            None => match imap_answer(script, &tag, &verb, &args, &mut r, seen).await {
                Some(a) => a,
                None => return,
            },
        };
        if (verb == "LOGIN" || verb == "AUTHENTICATE")
            && answer.starts_with(format!("{tag} OK").as_bytes())
        {
            seen.lock().unwrap().accepted += 1;
        }
        if r.get_mut().write_all(&answer).await.is_err() || verb == "LOGOUT" {
            return;
        }
    }
}

/// The default answer to one command (`None`: the connection is over).
async fn imap_answer(
    script: &ImapBackend,
    tag: &str,
    verb: &str,
    args: &[Vec<u8>],
    r: &mut BufReader<Box<dyn Io>>,
    seen: &Mutex<Seen>,
) -> Option<Vec<u8>> {
    let p = &script.p;
    let has = |c: &str| p.caps.split(' ').any(|x| x.eq_ignore_ascii_case(c));
    let login = |user: &[u8], pass: &[u8]| {
        if user == p.user.as_bytes() && pass == p.password.as_bytes() {
            format!("{tag} OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
        } else {
            format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
        }
    };
    let a = match verb {
        "CAPABILITY" => format!("* CAPABILITY {}\r\n{tag} OK done\r\n", p.caps),
        "ID" if has("ID") => format!("* ID NIL\r\n{tag} OK ID completed\r\n"),
        "ID" => format!("{tag} BAD unknown command\r\n"),
        "LOGIN" if has("LOGINDISABLED") => format!("{tag} NO [PRIVACYREQUIRED] no\r\n"),
        "LOGIN" if args.len() == 2 => login(&args[0], &args[1]),
        "LOGIN" => format!("{tag} BAD arguments\r\n"),
        "AUTHENTICATE" if !has("AUTH=PLAIN") => format!("{tag} NO unsupported mechanism\r\n"),
        "AUTHENTICATE" => {
            let response = match args.get(1) {
                Some(ir) => ir.clone(),
                None => {
                    r.get_mut().write_all(b"+ \r\n").await.ok()?;
                    let mut line = Vec::new();
                    if !read_line(r, &mut line).await {
                        return None;
                    }
                    line.truncate(line.trim_ascii_end().len());
                    let mut s = seen.lock().unwrap();
                    s.raw.extend_from_slice(&line);
                    s.lines
                        .push((false, String::from_utf8_lossy(&line).into_owned()));
                    line
                }
            };
            use base64::Engine as _;
            match base64::engine::general_purpose::STANDARD.decode(&response) {
                _ if response == b"*" => format!("{tag} BAD cancelled\r\n"),
                Ok(d) => {
                    let parts: Vec<&[u8]> = d.split(|b| *b == 0).collect();
                    match parts[..] {
                        [z, u, pw] if z.is_empty() || z == u => login(u, pw),
                        _ => format!("{tag} NO [AUTHORIZATIONFAILED] no\r\n"),
                    }
                }
                Err(_) => format!("{tag} BAD not base64\r\n"),
            }
        }
        "SELECT" | "EXAMINE" => format!(
            "* {} EXISTS\r\n* 0 RECENT\r\n* FLAGS (\\Seen)\r\n* OK [UIDVALIDITY 1] ok\r\n\
             {tag} OK [{}] done\r\n",
            p.messages.len(),
            if verb == "SELECT" {
                "READ-WRITE"
            } else {
                "READ-ONLY"
            }
        ),
        "FETCH" | "UID FETCH" => {
            let set = String::from_utf8_lossy(args.first().map(|a| &a[..]).unwrap_or(b""));
            let mut out = Vec::new();
            for (i, m) in p.messages.iter().enumerate() {
                let n = i + 1;
                if set == "1:*" || set.parse() == Ok(n) {
                    out.extend_from_slice(
                        format!("* {n} FETCH (UID {n} BODY[] {{{}}}\r\n", m.len()).as_bytes(),
                    );
                    out.extend_from_slice(m);
                    out.extend_from_slice(b")\r\n");
                }
            }
            out.extend_from_slice(format!("{tag} OK done\r\n").as_bytes());
            return Some(out);
        }
        "LOGOUT" => format!("* BYE bye\r\n{tag} OK done\r\n"),
        _ => format!("{tag} OK done\r\n"),
    };
    Some(a.into_bytes())
}

/// The library's demo IMAP maildrop serving `mailbox` on loopback: its address.
pub async fn demo_imap(mailbox: Arc<mailgate::demo::Mailbox>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(mailgate::demo::serve_imap(l, mailbox));
    addr
}
