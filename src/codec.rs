//! A bounded line reader and whole-reply writer over any byte stream, used on
//! both legs. Reads never grow past the caller's line limit; replies are
//! queued and written in one `write` so a pipelined burst costs one segment
//! (and no Nagle / delayed-ACK stall).

use bytes::{Buf, BytesMut};
use std::io;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("connection closed")]
    Closed,
    #[error("timed out")]
    Timeout,
    #[error("line longer than {0} octets")]
    TooLong(usize),
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
}

const READ_CHUNK: usize = 4096;

/// How long writes to a client may take before the session is dropped.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(60);

/// Why `next_command` returned without a line.
#[derive(Debug)]
pub enum Idle {
    /// The session lifetime is over.
    SessionOver,
    /// The process is shutting down (only noticed while waiting, never mid-line).
    Shutdown,
    /// Writing the queued replies failed.
    Write(CodecError),
}

/// Lets an idle reader wait for input before it allocates a read buffer, so
/// thousands of idle sessions hold no read buffers (see `Conn::shrink`).
pub trait WaitReadable {
    fn wait_readable(&mut self) -> impl std::future::Future<Output = io::Result<()>> + Send;
}

impl WaitReadable for tokio::net::TcpStream {
    async fn wait_readable(&mut self) -> io::Result<()> {
        self.readable().await
    }
}

impl WaitReadable for tokio::io::DuplexStream {
    async fn wait_readable(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub struct Conn<S> {
    pub stream: S,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    /// Bytes read and written, for logs.
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl<S: AsyncRead + AsyncWrite + Unpin + WaitReadable> Conn<S> {
    pub fn new(stream: S) -> Self {
        Conn {
            stream,
            rbuf: BytesMut::new(),
            wbuf: Vec::new(),
            bytes_in: 0,
            bytes_out: 0,
        }
    }

    /// Reads more bytes into the buffer; `Closed` at EOF.
    pub async fn fill(&mut self) -> Result<usize, CodecError> {
        if self.rbuf.capacity() == 0 {
            // released while idle: allocate only once there is something to read
            self.stream.wait_readable().await?;
        }
        if self.rbuf.capacity() - self.rbuf.len() < 512 {
            self.rbuf.reserve(READ_CHUNK);
        }
        let n = self.stream.read_buf(&mut self.rbuf).await?;
        if n == 0 {
            return Err(CodecError::Closed);
        }
        self.bytes_in += n as u64;
        Ok(n)
    }

    /// The next line without its terminator (CRLF, or a bare LF: callers that
    /// care see it through `read_line_raw`). `max` counts the terminator too.
    /// An overlong line is consumed up to its end and reported as `TooLong`,
    /// never buffered whole.
    pub async fn read_line(
        &mut self,
        max: usize,
        deadline: Duration,
    ) -> Result<BytesMut, CodecError> {
        let mut line = self.read_line_raw(max, deadline).await?;
        let mut cut = line.len() - 1;
        if cut > 0 && line[cut - 1] == b'\r' {
            cut -= 1;
        }
        line.truncate(cut);
        Ok(line)
    }

    /// Like `read_line` but keeps the terminator.
    pub async fn read_line_raw(
        &mut self,
        max: usize,
        deadline: Duration,
    ) -> Result<BytesMut, CodecError> {
        match tokio::time::timeout(deadline, self.line_inner(max)).await {
            Ok(r) => r,
            Err(_) => Err(CodecError::Timeout),
        }
    }

    async fn line_inner(&mut self, max: usize) -> Result<BytesMut, CodecError> {
        let mut skipping = false;
        loop {
            if let Some(i) = memchr(b'\n', &self.rbuf) {
                let line = self.rbuf.split_to(i + 1);
                if skipping || line.len() > max {
                    return Err(CodecError::TooLong(max));
                }
                return Ok(line);
            }
            if self.rbuf.len() > max {
                // drop what we have; keep reading until the line ends
                skipping = true;
                self.rbuf.clear();
            }
            self.fill().await?;
        }
    }

    /// The wait for the next command line, shared by both protocols: pipelined
    /// lines are taken at once; otherwise queued replies are written in one
    /// go, buffers are released, and the read waits for at most `per_command`
    /// (and the session `deadline`), giving way to a shutdown.
    pub async fn next_command(
        &mut self,
        max: usize,
        per_command: Duration,
        deadline: tokio::time::Instant,
        shutdown: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<Result<BytesMut, CodecError>, Idle> {
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(Idle::SessionOver);
        }
        let wait = per_command.min(deadline - now);
        if self.has_line() {
            return Ok(self.read_line(max, wait).await);
        }
        self.flush(WRITE_DEADLINE).await.map_err(Idle::Write)?;
        self.shrink();
        let mut shutdown = shutdown.clone();
        if *shutdown.borrow() {
            return Err(Idle::Shutdown);
        }
        tokio::select! {
            r = self.read_line(max, wait) => Ok(r),
            _ = shutdown.changed() => Err(Idle::Shutdown),
        }
    }

    /// True when a complete line is already buffered (more pipelined input):
    /// replies are then held back and sent together (RFC 2920).
    pub fn has_line(&self) -> bool {
        memchr(b'\n', &self.rbuf).is_some()
    }

    pub fn buffered(&self) -> usize {
        self.rbuf.len()
    }

    /// Bytes the peer sent that nobody asked for yet: what is buffered, or
    /// else what the socket already holds (`Closed` if it hung up). Never
    /// waits: a zero deadline yields once, and the runtime polls the socket
    /// before the timer fires, so bytes that arrived while this task was busy
    /// are seen (test `stray_bytes_that_arrived_while_busy_are_seen`). The
    /// in-step rule of both backend clients: `0` means in step.
    pub async fn unsolicited(&mut self) -> Result<usize, CodecError> {
        if !self.rbuf.is_empty() {
            return Ok(self.rbuf.len());
        }
        match tokio::time::timeout(Duration::ZERO, self.fill()).await {
            Err(_) => Ok(0),
            Ok(r) => r,
        }
    }

    pub fn rbuf_mut(&mut self) -> &mut BytesMut {
        &mut self.rbuf
    }

    /// Forgets every byte read but not yet used (STARTTLS: CVE-2011-0411).
    pub fn discard_buffered(&mut self) -> usize {
        let n = self.rbuf.len();
        self.rbuf.clear();
        n
    }

    /// Takes the buffered bytes (leftover pipelined input handed to a byte pipe).
    pub fn take_buffered(&mut self) -> BytesMut {
        self.rbuf.split()
    }

    /// Releases buffer memory while the session waits idle.
    pub fn shrink(&mut self) {
        if self.rbuf.is_empty() && self.rbuf.capacity() > 0 {
            self.rbuf = BytesMut::new();
        }
        if self.wbuf.is_empty() && self.wbuf.capacity() > 0 {
            self.wbuf = Vec::new();
        }
    }

    /// The output buffer, for writers that render straight into it (replies).
    pub fn output(&mut self) -> &mut Vec<u8> {
        &mut self.wbuf
    }

    pub fn queue(&mut self, bytes: &[u8]) {
        self.wbuf.extend_from_slice(bytes);
    }

    pub fn pending_output(&self) -> bool {
        !self.wbuf.is_empty()
    }

    /// Writes everything queued, in one write where the OS allows.
    pub async fn flush(&mut self, deadline: Duration) -> Result<(), CodecError> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let w = async {
            self.stream.write_all(&self.wbuf).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(deadline, w).await {
            Ok(Ok(())) => {
                self.bytes_out += self.wbuf.len() as u64;
                self.wbuf.clear();
                if self.wbuf.capacity() > 64 * 1024 {
                    self.wbuf = Vec::new();
                }
                Ok(())
            }
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(CodecError::Timeout),
        }
    }

    /// Writes `bytes` directly (large message bodies), after anything queued.
    pub async fn write_now(&mut self, bytes: &[u8], deadline: Duration) -> Result<(), CodecError> {
        self.queue(bytes);
        self.flush(deadline).await
    }

    /// Consumes `n` buffered bytes.
    pub fn advance(&mut self, n: usize) {
        self.rbuf.advance(n);
    }
}

pub fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    memchr::memchr(needle, hay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_and_limits() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut c = Conn::new(a);
        let long = "x".repeat(600);
        b.write_all(format!("EHLO a\r\nNOOP\n{long}\r\nQUIT\r\n").as_bytes())
            .await
            .unwrap();
        drop(b);
        let t = Duration::from_secs(1);
        assert_eq!(&c.read_line(512, t).await.unwrap()[..], b"EHLO a");
        assert!(c.has_line());
        assert_eq!(&c.read_line_raw(512, t).await.unwrap()[..], b"NOOP\n");
        assert!(matches!(
            c.read_line(512, t).await,
            Err(CodecError::TooLong(512))
        ));
        assert_eq!(&c.read_line(512, t).await.unwrap()[..], b"QUIT");
        assert!(matches!(c.read_line(512, t).await, Err(CodecError::Closed)));
    }

    #[tokio::test]
    async fn overlong_line_is_not_buffered_whole() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut c = Conn::new(a);
        let long = vec![b'y'; 200_000];
        b.write_all(&long).await.unwrap();
        b.write_all(b"\r\nNOOP\r\n").await.unwrap();
        let t = Duration::from_secs(1);
        assert!(matches!(
            c.read_line(512, t).await,
            Err(CodecError::TooLong(_))
        ));
        assert!(c.rbuf.capacity() < 64 * 1024);
        assert_eq!(&c.read_line(512, t).await.unwrap()[..], b"NOOP");
    }

    #[tokio::test(start_paused = true)]
    async fn read_deadline() {
        let (a, _b) = tokio::io::duplex(64);
        let mut c = Conn::new(a);
        let r = c.read_line(512, Duration::from_secs(300)).await;
        assert!(matches!(r, Err(CodecError::Timeout)));
    }
}
