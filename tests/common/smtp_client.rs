//! The SMTP test client: one line-oriented client over any stream (plain TCP
//! or TLS), for every test that talks SMTP to the gateway (or reads a
//! backend's side of a session).
//!
//! Every reply line it reads is checked for shape (CRLF-terminated, printable
//! ASCII, `ddd-`/`ddd `, one code per reply): whatever the gateway sends a
//! client must be well-formed, in every test and not only the hostile ones.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// The client's side of a TLS session.
pub type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// How long a reply may take before the test fails as hung (generous: the
/// gateway's own timeouts, DNS checks on a loaded machine, come first).
const WAIT: Duration = Duration::from_secs(30);

pub struct SmtpClient<S> {
    pub s: S,
    /// Bytes read but not yet returned as a line.
    pub buf: Vec<u8>,
}

impl SmtpClient<TcpStream> {
    /// A TCP connection to `addr`, nothing read yet.
    pub async fn connect(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        SmtpClient::new(s)
    }

    /// Like [`connect`](Self::connect), from loopback address `src` (client
    /// addresses differ by binding to 127.0.0.x).
    pub async fn connect_from(src: &str, addr: SocketAddr) -> Self {
        SmtpClient::new(super::connect_from(src, addr).await)
    }

    /// The client's own port (what XCLIENT PORT= must carry).
    #[allow(dead_code)] // not every test binary asks
    pub fn local_port(&self) -> u16 {
        self.s.local_addr().unwrap().port()
    }

    /// Connected and the greeting read (a 220).
    pub async fn greeted(addr: SocketAddr) -> Self {
        let mut c = Self::connect(addr).await;
        c.expect(220).await;
        c
    }

    /// EHLO (which must offer STARTTLS), STARTTLS, 220, then the handshake
    /// trusting `ca`; nothing may be buffered before it.
    pub async fn starttls(mut self, ca: &Path) -> SmtpClient<Tls> {
        self.send(b"EHLO client.test\r\n").await;
        let ehlo = self.expect(250).await;
        assert!(ehlo.contains("STARTTLS"), "{ehlo}");
        self.send(b"STARTTLS\r\n").await;
        self.expect(220).await;
        assert!(self.buf.is_empty());
        self.tls(ca).await
    }

    /// The TLS handshake on this connection (implicit TLS), trusting `ca`.
    pub async fn tls(self, ca: &Path) -> SmtpClient<Tls> {
        SmtpClient::new(super::tls_connect(self.s, ca).await)
    }
}

/// Reading works on a read half alone (a test that writes from another task).
impl<S: AsyncRead + Unpin> SmtpClient<S> {
    pub fn new(s: S) -> Self {
        SmtpClient { s, buf: Vec::new() }
    }

    /// Reads more; false at a close (or a reset).
    async fn fill(&mut self) -> bool {
        let mut tmp = [0u8; 8192];
        match tokio::time::timeout(WAIT, self.s.read(&mut tmp)).await {
            Err(_) => panic!(
                "no reply within {WAIT:?} (buffered: {:?})",
                String::from_utf8_lossy(&self.buf)
            ),
            Ok(Ok(n)) if n > 0 => {
                self.buf.extend_from_slice(&tmp[..n]);
                true
            }
            Ok(_) => false,
        }
    }

    /// One reply line without its CRLF; `None` at a clean close.
    pub async fn line(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let l: Vec<u8> = self.buf.drain(..=i).collect();
                assert!(l.ends_with(b"\r\n"), "reply line without CRLF: {l:?}");
                let l = &l[..l.len() - 2];
                assert!(
                    l.iter().all(|b| (0x20..=0x7e).contains(b)),
                    "unprintable reply line {l:?}"
                );
                return Some(String::from_utf8(l.to_vec()).unwrap());
            }
            if !self.fill().await {
                assert!(
                    self.buf.is_empty(),
                    "connection closed inside a reply line: {:?}",
                    self.buf
                );
                return None;
            }
        }
    }

    /// One complete (multi-line) reply, checked for shape: (code, its lines
    /// each ended by `\n`); `None` at a clean close.
    pub async fn reply(&mut self) -> Option<(u16, String)> {
        let mut text = String::new();
        let mut code = None;
        loop {
            let Some(line) = self.line().await else {
                assert!(code.is_none(), "connection closed inside a reply: {text}");
                return None;
            };
            assert!(
                line.len() >= 4
                    && line.as_bytes()[..3].iter().all(u8::is_ascii_digit)
                    && matches!(line.as_bytes()[3], b' ' | b'-'),
                "malformed reply line {line:?}"
            );
            let c: u16 = line[..3].parse().unwrap();
            assert!(code.is_none_or(|x| x == c), "code changed inside a reply");
            code = Some(c);
            text.push_str(&line);
            text.push('\n');
            if line.as_bytes()[3] == b' ' {
                return Some((c, text));
            }
        }
    }

    /// The next reply's text (`""` when the peer closed instead).
    pub async fn text(&mut self) -> String {
        self.reply().await.map(|(_, t)| t).unwrap_or_default()
    }

    /// A reply that must come and carry `code`; its text.
    pub async fn expect(&mut self, code: u16) -> String {
        match self.reply().await {
            Some((c, t)) => {
                assert_eq!(c, code, "unexpected reply: {t}");
                t
            }
            None => panic!("connection closed while waiting for {code}"),
        }
    }

    /// Waits for the peer to close; everything it still sent, or a panic when it
    /// is still open after `within`.
    pub async fn closed(&mut self, within: Duration) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.buf);
        let mut tmp = [0u8; 8192];
        let until = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(until, self.s.read(&mut tmp)).await {
                Err(_) => panic!(
                    "connection still open after {within:?} (received {:?})",
                    String::from_utf8_lossy(&out)
                ),
                Ok(Ok(0)) | Ok(Err(_)) => return out,
                Ok(Ok(n)) => out.extend_from_slice(&tmp[..n]),
            }
        }
    }

    /// Everything until the peer closes or `wait` passes without data.
    pub async fn rest(&mut self, wait: Duration) -> String {
        let mut out = std::mem::take(&mut self.buf);
        let mut tmp = [0u8; 4096];
        while let Ok(Ok(n)) = tokio::time::timeout(wait, self.s.read(&mut tmp)).await {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&tmp[..n]);
        }
        String::from_utf8_lossy(&out).to_string()
    }

    /// True when nothing arrives for `wait` (the connection may stay open).
    pub async fn quiet(&mut self, wait: Duration) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut tmp = [0u8; 1];
        tokio::time::timeout(wait, self.s.read(&mut tmp))
            .await
            .is_err()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> SmtpClient<S> {
    pub async fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).await.unwrap();
    }

    /// Sends `c` and CRLF; the reply's text (`""` when the peer closed).
    pub async fn cmd(&mut self, c: &str) -> String {
        self.send(format!("{c}\r\n").as_bytes()).await;
        self.text().await
    }

    /// EHLO `helo`, MAIL, RCPT, DATA and `message` (already dot-stuffed, with
    /// its end-of-data line), each step's reply checked; the final reply.
    pub async fn send_message(&mut self, helo: &str, message: &[u8]) -> (u16, String) {
        self.send(format!("EHLO {helo}\r\n").as_bytes()).await;
        self.expect(250).await;
        self.send(b"MAIL FROM:<alice@example.org>\r\n").await;
        self.expect(250).await;
        self.send(b"RCPT TO:<bob@example.net>\r\n").await;
        self.expect(250).await;
        self.send(b"DATA\r\n").await;
        self.expect(354).await;
        self.send(message).await;
        self.reply()
            .await
            .expect("connection closed instead of a reply to the message")
    }
}
