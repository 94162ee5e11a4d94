//! The POP3 test client: status lines and multi-line answers over any stream
//! (plain TCP or TLS), for every test that talks POP3 to the gateway.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

pub use super::smtp_client::Tls;

/// How long an answer may take before the test fails as hung.
const WAIT: Duration = Duration::from_secs(30);

pub struct Pop3Client<S> {
    pub s: S,
    /// Bytes read but not yet returned as a line.
    pub buf: Vec<u8>,
}

impl Pop3Client<TcpStream> {
    /// A TCP connection to `addr`, nothing read yet.
    pub async fn connect(addr: SocketAddr) -> Self {
        Pop3Client::new(TcpStream::connect(addr).await.unwrap())
    }

    /// Like [`connect`](Self::connect), from loopback address `src`.
    pub async fn connect_from(src: &str, addr: SocketAddr) -> Self {
        Pop3Client::new(super::connect_from(src, addr).await)
    }

    /// The TLS handshake on this connection (implicit TLS, or after STLS),
    /// trusting `ca`.
    pub async fn tls(self, ca: &Path) -> Pop3Client<Tls> {
        Pop3Client::new(super::tls_connect(self.s, ca).await)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Pop3Client<S> {
    pub fn new(s: S) -> Self {
        Pop3Client { s, buf: Vec::new() }
    }

    pub async fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).await.unwrap();
    }

    /// Sends `c` and CRLF; the status line (`""` when the peer closed).
    pub async fn cmd(&mut self, c: &str) -> String {
        self.send(format!("{c}\r\n").as_bytes()).await;
        self.line().await
    }

    /// The next line without CRLF (`""` when the peer closed instead).
    pub async fn line(&mut self) -> String {
        self.raw_line()
            .await
            .map(|l| String::from_utf8_lossy(&l).trim_end().to_string())
            .unwrap_or_default()
    }

    /// One line including its CRLF; `None` at EOF.
    pub async fn raw_line(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                return Some(self.buf.drain(..=i).collect());
            }
            let mut tmp = [0u8; 4096];
            let n = tokio::time::timeout(WAIT, self.s.read(&mut tmp))
                .await
                .expect("reply timed out")
                .ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }

    /// A status line without CRLF.
    pub async fn status(&mut self) -> String {
        let l = self
            .raw_line()
            .await
            .expect("connection closed while waiting for a reply");
        String::from_utf8_lossy(&l).trim_end().to_string()
    }

    pub async fn ok(&mut self) -> String {
        let l = self.status().await;
        assert!(l.starts_with("+OK"), "expected +OK, got {l:?}");
        l
    }

    pub async fn err(&mut self) -> String {
        let l = self.status().await;
        assert!(l.starts_with("-ERR"), "expected -ERR, got {l:?}");
        l
    }

    /// The body of a multi-line answer, dot-unstuffed, exactly as sent.
    pub async fn body(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let l = self
                .raw_line()
                .await
                .expect("closed inside a multi-line answer");
            if l == b".\r\n" {
                return out;
            }
            out.extend_from_slice(l.strip_prefix(b".").unwrap_or(&l));
        }
    }

    /// Everything until the peer closes or `wait` passes without data, and
    /// whether it closed.
    pub async fn rest(&mut self, wait: Duration) -> (String, bool) {
        let mut out = std::mem::take(&mut self.buf);
        let mut tmp = [0u8; 4096];
        let mut closed = false;
        loop {
            match tokio::time::timeout(wait, self.s.read(&mut tmp)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    closed = true;
                    break;
                }
                Ok(Ok(n)) => out.extend_from_slice(&tmp[..n]),
                Err(_) => break,
            }
        }
        (String::from_utf8_lossy(&out).to_string(), closed)
    }
}
