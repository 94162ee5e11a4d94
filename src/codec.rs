//! A bounded line reader and whole-reply writer over any byte stream, used on
//! both legs. Reads never grow past the caller's line limit; replies are
//! queued and written in one `write` so a pipelined burst costs one segment
//! (and no Nagle / delayed-ACK stall).

use bytes::{Buf, BytesMut};
use std::io;
use std::task::Poll;
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

/// A line without its terminator (CRLF, or a bare LF).
fn strip_terminator(mut line: BytesMut) -> BytesMut {
    let mut cut = line.len() - 1;
    if cut > 0 && line[cut - 1] == b'\r' {
        cut -= 1;
    }
    line.truncate(cut);
    line
}

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

    /// False only when the stream surely holds nothing to read: no decrypted
    /// bytes buffered and an empty socket. Never waits. A hang-up or a socket
    /// error is "something": the read that follows reports it.
    fn input_waiting(&mut self) -> bool;
}

impl WaitReadable for tokio::net::TcpStream {
    async fn wait_readable(&mut self) -> io::Result<()> {
        socket_readable(self).await
    }

    fn input_waiting(&mut self) -> bool {
        socket_has_input(self)
    }
}

impl WaitReadable for tokio::io::DuplexStream {
    async fn wait_readable(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn input_waiting(&mut self) -> bool {
        true // no socket to ask: the caller reads (tests only)
    }
}

/// Whether a socket holds bytes (or a hang-up, or an error) right now. It
/// asks the kernel, not the runtime's readiness flags, which are only as
/// fresh as the reactor's last turn. A failed ask is "something": the read
/// finds out.
pub(crate) fn socket_has_input(tcp: &tokio::net::TcpStream) -> bool {
    socket_ready_now(tcp).unwrap_or(true)
}

/// One `poll(2)` of the socket with a zero timeout: readable (bytes, or the
/// peer's FIN), in error or hung up. Nothing is consumed, not even a pending
/// error: a `recv(MSG_PEEK)` would take a reset's ECONNRESET, and the read
/// that follows would see a plain EOF (test
/// `a_reset_behind_the_last_command_is_a_read_error`).
fn socket_ready_now(tcp: &tokio::net::TcpStream) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: tcp.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd we own, on a descriptor `tcp` keeps open.
    if unsafe { libc::poll(&mut p, 1, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(p.revents != 0)
}

/// Waits until the socket has something to read (bytes, a hang-up, an
/// error). The runtime's "readable" can be left over from an earlier read
/// that emptied the socket without meeting `WouldBlock`; a reader that took
/// it at its word would allocate its buffer and then wait on it, for as long
/// as the peer stays idle (issue 17: about a third of idle sessions did). So
/// a readiness that was there at once is checked with the kernel
/// (`socket_ready_now`), and a stale one is cleared (`try_io` sees the
/// `WouldBlock`) before waiting for real. A readiness that arrived while we
/// waited is fresh and costs nothing more.
pub(crate) async fn socket_readable(tcp: &tokio::net::TcpStream) -> io::Result<()> {
    loop {
        let mut waited = false;
        std::future::poll_fn(|cx| match tcp.poll_read_ready(cx) {
            Poll::Pending => {
                waited = true;
                Poll::Pending
            }
            ready => ready,
        })
        .await?;
        if waited {
            return Ok(());
        }
        let ask = || match socket_ready_now(tcp) {
            Ok(false) => Err(io::ErrorKind::WouldBlock.into()),
            other => other.map(drop),
        };
        match tcp.try_io(tokio::io::Interest::READABLE, ask) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            _ => return Ok(()),
        }
    }
}

/// Whether rustls itself has something for the next read: decrypted bytes,
/// or the peer's close_notify (the read answers EOF). Either may have come
/// in with the last record read, leaving the socket empty: a peer that
/// closes TLS and waits for our close_notify before it closes the socket
/// sends nothing more (test
/// `transport::tests::a_close_notify_read_with_the_last_command_ends_the_wait`).
/// An error is something too: the read reports it.
fn tls_pending<D>(tls: &mut rustls::ConnectionCommon<D>) -> bool {
    match tls.process_new_packets() {
        Ok(st) => st.plaintext_bytes_to_read() > 0 || st.peer_has_closed(),
        Err(_) => true,
    }
}

/// The same for a TLS leg: what rustls holds, else the socket (a TLS record
/// there may carry no data, a ticket say: the read finds out).
pub(crate) fn tls_has_input<D>(
    tcp: &tokio::net::TcpStream,
    tls: &mut rustls::ConnectionCommon<D>,
) -> bool {
    tls_pending(tls) || socket_has_input(tcp)
}

/// The wait of a TLS leg (client or backend side): at once when rustls
/// holds something for the read already, else until the socket is readable.
pub(crate) async fn tls_readable<D>(
    tcp: &tokio::net::TcpStream,
    tls: &mut rustls::ConnectionCommon<D>,
) -> io::Result<()> {
    if tls_pending(tls) {
        Ok(())
    } else {
        socket_readable(tcp).await
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
        let line = self.read_line_raw(max, deadline).await?;
        Ok(strip_terminator(line))
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

    /// A whole line already buffered, with its terminator (`TooLong` past
    /// `max`); `None` when none is.
    fn buffered_line(&mut self, max: usize) -> Option<Result<BytesMut, CodecError>> {
        let i = memchr(b'\n', &self.rbuf)?;
        let line = self.rbuf.split_to(i + 1);
        Some(if line.len() > max {
            Err(CodecError::TooLong(max))
        } else {
            Ok(line)
        })
    }

    async fn line_inner(&mut self, max: usize) -> Result<BytesMut, CodecError> {
        let mut skipping = false;
        loop {
            if let Some(line) = self.buffered_line(max) {
                return if skipping {
                    Err(CodecError::TooLong(max))
                } else {
                    line
                };
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
        // a pipelined line is taken without a wait (and without a second
        // read state in this future, which every idle session holds)
        if let Some(line) = self.buffered_line(max) {
            return Ok(line.map(strip_terminator));
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
    /// else what the socket already holds (`Closed` if it hung up). The
    /// in-step rule of the backend clients, asked before every command: `0`
    /// means in step.
    ///
    /// The common answer, an empty socket, costs one `poll(2)` and no
    /// wait ([`WaitReadable::input_waiting`]). Only when the socket holds
    /// something (or cannot say) is it read, under a zero deadline: that
    /// yields once, and the runtime polls the socket before the timer fires,
    /// so bytes that arrived while this task was busy are seen (test
    /// `stray_bytes_that_arrived_while_busy_are_seen`). Asking the timer
    /// every time cost a reactor turn, an eventfd wake and up to a
    /// millisecond (the timer's resolution) before each backend command.
    pub async fn unsolicited(&mut self) -> Result<usize, CodecError> {
        if !self.rbuf.is_empty() {
            return Ok(self.rbuf.len());
        }
        if !self.stream.input_waiting() {
            return Ok(0);
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

    /// A read that fills the buffer exactly leaves the runtime's readiness
    /// set though the socket is empty. An idle session must still hold no
    /// read buffer: the stale readiness is found out (`poll(2)`) and cleared
    /// before the buffer is allocated. Taken at its word, it cost a 4 KiB
    /// buffer in about a third of idle sessions (issue 17).
    #[tokio::test]
    async fn an_idle_connection_holds_no_read_buffer_after_a_full_read() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = l.accept().await.unwrap();
        // 64 lines of 64 octets: exactly one READ_CHUNK
        let line = format!("{}\r\n", "x".repeat(62));
        client
            .write_all(line.repeat(READ_CHUNK / 64).as_bytes())
            .await
            .unwrap();
        let mut c = Conn::new(server);
        let (_tx, shutdown) = tokio::sync::watch::channel(false);
        let wait = Duration::from_secs(5);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        // the whole chunk arrives before the first read
        tokio::time::sleep(Duration::from_millis(50)).await;
        for _ in 0..READ_CHUNK / 64 {
            let got = c.next_command(100, wait, deadline, &shutdown).await;
            assert_eq!(got.unwrap().unwrap().len(), 62);
        }
        let idle = tokio::time::timeout(
            Duration::from_millis(100),
            c.next_command(100, wait, deadline, &shutdown),
        )
        .await;
        assert!(idle.is_err(), "nothing more was sent");
        assert_eq!(
            c.rbuf.capacity(),
            0,
            "an idle connection holds a read buffer"
        );
        // and the wait is real: the next line is read when it comes
        client.write_all(b"QUIT\r\n").await.unwrap();
        let got = c.next_command(100, wait, deadline, &shutdown).await;
        assert_eq!(&got.unwrap().unwrap()[..], b"QUIT");
    }

    /// The in-step check before every backend command answers "nothing
    /// there" at once, without a turn of the runtime: it used to wait for a
    /// zero-length timer, which fires at the timer's next tick (up to 1 ms
    /// per command, and a wake-up of the reactor). Bytes that are there are
    /// still seen (and `stray_bytes_that_arrived_while_busy_are_seen` in
    /// backend::pop3 covers bytes the reactor has not reported yet).
    #[tokio::test]
    async fn the_in_step_check_does_not_wait() {
        use std::future::Future;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut peer = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = l.accept().await.unwrap();
        let mut c = Conn::new(server);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let once = std::pin::pin!(c.unsolicited()).poll(&mut cx);
        assert!(
            matches!(once, std::task::Poll::Ready(Ok(0))),
            "answered in one poll: {once:?}"
        );
        peer.write_all(b"421 bye\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(c.unsolicited().await.unwrap(), 9);
    }

    /// A reset that came in while the session was busy (behind its last
    /// command) is reported as the read error it is, not as a hang-up: the
    /// check of a readiness that was there at once must leave the socket's
    /// pending error to the read (a recv(MSG_PEEK) takes it), or the
    /// session's end says "client closed" where it was "read: Connection
    /// reset by peer".
    #[tokio::test]
    async fn a_reset_behind_the_last_command_is_a_read_error() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = l.accept().await.unwrap();
        client.write_all(b"NOOP\r\n").await.unwrap();
        client.set_zero_linger().unwrap();
        drop(client); // RST
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut c = Conn::new(server);
        let (_tx, shutdown) = tokio::sync::watch::channel(false);
        let wait = Duration::from_secs(5);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let got = c.next_command(100, wait, deadline, &shutdown).await;
        assert_eq!(&got.unwrap().unwrap()[..], b"NOOP");
        let got = c.next_command(100, wait, deadline, &shutdown).await;
        assert!(
            matches!(&got, Ok(Err(CodecError::Io(e))) if e.kind() == io::ErrorKind::ConnectionReset),
            "the read after a reset: {got:?}"
        );
    }

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
