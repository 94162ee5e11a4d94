//! Scripted backends: legacy SMTP and POP3 servers on loopback whose replies
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
    /// Messages it answered with its end-of-data reply (a 250 unless scripted).
    pub accepted: usize,
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
                        pop3_session(Box::new(t), &script, &seen).await
                    }
                    None => pop3_session(Box::new(tcp), &script, &seen).await,
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
