//! The client connection: plaintext or TLS behind one type, so a session keeps
//! one value across STARTTLS. TLS handshakes always run under a deadline.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::codec::{socket_has_input, socket_readable, tls_has_input, tls_readable};

/// A TCP connection that is plaintext or TLS, one type across an upgrade
/// (STARTTLS/STLS). `T` is the server or client TLS stream.
pub enum MaybeTls<T> {
    Plain(TcpStream),
    Tls(Box<T>),
    /// Transient state while the stream is being upgraded; every I/O fails.
    Detached,
}

/// The client leg.
pub type ClientStream = MaybeTls<TlsStream<TcpStream>>;

/// What the `Received:` header and the logs say about the TLS layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    pub version: String,
    pub cipher: String,
    pub sni: Option<String>,
}

impl ClientStream {
    pub fn tls_info(&self) -> Option<TlsInfo> {
        match self {
            ClientStream::Tls(s) => {
                let (_, conn) = s.get_ref();
                Some(TlsInfo {
                    version: conn
                        .protocol_version()
                        .map(|v| match v {
                            rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".to_string(),
                            rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".to_string(),
                            other => format!("{other:?}"),
                        })
                        .unwrap_or_default(),
                    cipher: conn
                        .negotiated_cipher_suite()
                        .map(|c| format!("{:?}", c.suite()))
                        .unwrap_or_default(),
                    sni: conn.server_name().map(str::to_string),
                })
            }
            _ => None,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }

    /// Runs the server handshake over the plain TCP stream (STARTTLS, or implicit
    /// TLS right after accept). A deadline bounds a client that says ClientHello
    /// and then nothing.
    pub async fn into_tls(
        self,
        config: Arc<rustls::ServerConfig>,
        deadline: Duration,
    ) -> io::Result<ClientStream> {
        let tcp = match self {
            ClientStream::Plain(tcp) => tcp,
            _ => return Err(io::Error::other("TLS is already active")),
        };
        let acceptor = TlsAcceptor::from(config);
        match tokio::time::timeout(deadline, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => Ok(ClientStream::Tls(Box::new(tls))),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            )),
        }
    }
}

impl crate::codec::WaitReadable for ClientStream {
    async fn wait_readable(&mut self) -> io::Result<()> {
        match self {
            ClientStream::Plain(t) => socket_readable(t).await,
            ClientStream::Tls(s) => {
                let (tcp, tls) = s.get_mut();
                tls_readable(tcp, tls).await
            }
            ClientStream::Detached => Ok(()),
        }
    }

    fn input_waiting(&mut self) -> bool {
        match self {
            ClientStream::Plain(t) => socket_has_input(t),
            ClientStream::Tls(s) => {
                let (tcp, tls) = s.get_mut();
                tls_has_input(tcp, tls)
            }
            ClientStream::Detached => true,
        }
    }
}

pub(crate) fn detached() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "stream is being upgraded")
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            MaybeTls::Detached => Poll::Ready(Err(detached())),
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            MaybeTls::Detached => Poll::Ready(Err(detached())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            MaybeTls::Detached => Poll::Ready(Err(detached())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            MaybeTls::Detached => Poll::Ready(Ok(())),
        }
    }
}

/// Reads a PROXY protocol v1 or v2 header from a trusted load balancer and
/// returns the real (source, destination) addresses. Only the header's bytes
/// are consumed (they are peeked first), so a TLS ClientHello that follows in
/// the same segment stays in the socket for the handshake. Headers without a
/// client address (v2 `LOCAL`, v1 `UNKNOWN`, other address families) yield
/// `None` only when `allow_local` is set, and are refused otherwise: the
/// session would run as the balancer's own address, which the backend and
/// the limits may trust.
pub async fn read_proxy_header(
    tcp: &mut TcpStream,
    deadline: Duration,
    allow_local: bool,
) -> io::Result<Option<(std::net::SocketAddr, std::net::SocketAddr)>> {
    use proxy_header::{ParseConfig, ProxyHeader};
    use tokio::io::AsyncReadExt;
    let work = async {
        // v1 is at most 107 bytes; v2 is 16 + its length field (TLVs included)
        let mut buf = vec![0u8; 1024];
        let mut seen = 0;
        loop {
            let n = tcp.peek(&mut buf).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before the PROXY header",
                ));
            }
            let config = ParseConfig {
                include_tlvs: false,
                allow_v1: true,
                allow_v2: true,
            };
            match ProxyHeader::parse(&buf[..n], config) {
                Ok((header, len)) => {
                    use crate::units::canonical_socket as canon;
                    let addrs = header
                        .proxied_address()
                        .map(|a| (canon(a.source), canon(a.destination)));
                    if addrs.is_none() && !allow_local {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "PROXY header without a client address (LOCAL/UNKNOWN) \
                             refused; set proxy_protocol.allow_local to accept it",
                        ));
                    }
                    let mut consumed = vec![0u8; len];
                    tcp.read_exact(&mut consumed).await?;
                    return Ok(addrs);
                }
                Err(proxy_header::Error::BufferTooShort) if n < buf.len() => {
                    // peek returns at once while bytes are pending: wait for more
                    if n == seen {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    seen = n;
                }
                Err(e) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("bad PROXY header: {e:?}"),
                    ))
                }
            }
        }
    };
    match tokio::time::timeout(deadline, work).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "PROXY header timed out",
        )),
    }
}

/// The PROXY v2 header sent to a backend configured with `identity: [proxy_v2]`.
/// Both addresses must be of one family in the header: an IPv4-mapped IPv6
/// address next to an IPv4 one is sent as IPv4, and otherwise an IPv4 address
/// next to an IPv6 one is sent IPv4-mapped (as HAProxy does). Never a partial
/// header: an encoding error is returned, not written.
pub fn proxy_v2_header(
    source: std::net::SocketAddr,
    destination: std::net::SocketAddr,
) -> io::Result<Vec<u8>> {
    use std::net::{IpAddr, SocketAddr};
    let unmapped = |a: SocketAddr| match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    };
    let mapped = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    let (mut source, mut destination) = (unmapped(source), unmapped(destination));
    if source.is_ipv4() != destination.is_ipv4() {
        (source, destination) = (mapped(source), mapped(destination));
    }
    let mut out = Vec::with_capacity(64);
    let h = proxy_header::ProxyHeader::with_address(proxy_header::ProxiedAddress::stream(
        source,
        destination,
    ));
    h.encode_v2(&mut out)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("PROXY v2: {e:?}")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::proxy_v2_header;
    use proxy_header::{ParseConfig, ProxyHeader};
    use std::net::SocketAddr;
    use std::time::Duration;

    fn decoded(h: &[u8]) -> (SocketAddr, SocketAddr) {
        let (p, len) = ProxyHeader::parse(h, ParseConfig::default()).expect("a whole header");
        assert_eq!(len, h.len(), "nothing left over");
        let a = p.proxied_address().expect("an address");
        (a.source, a.destination)
    }

    /// Issue 11 item 4: mixed families were written as a truncated header
    /// (the 12-byte signature only); now they are one family, whole.
    #[test]
    fn proxy_v2_out_mixed_families_is_whole() {
        let v4: SocketAddr = "192.0.2.7:4242".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:25".parse().unwrap();
        let h = proxy_v2_header(v4, v6).unwrap();
        assert_eq!(h.len(), 16 + 36, "IPv6 addresses and ports");
        assert_eq!(
            decoded(&h),
            (
                "[::ffff:192.0.2.7]:4242".parse().unwrap(),
                "[2001:db8::1]:25".parse().unwrap()
            )
        );
        let h = proxy_v2_header(v6, v4).unwrap();
        assert_eq!(
            decoded(&h),
            (
                "[2001:db8::1]:25".parse().unwrap(),
                "[::ffff:192.0.2.7]:4242".parse().unwrap()
            )
        );
        // a dual-stack socket's mapped client next to an IPv4 address: IPv4
        let mapped: SocketAddr = "[::ffff:198.51.100.9]:1000".parse().unwrap();
        let h = proxy_v2_header(mapped, v4).unwrap();
        assert_eq!(h.len(), 16 + 12);
        assert_eq!(decoded(&h), ("198.51.100.9:1000".parse().unwrap(), v4));
        // same families as before
        let h = proxy_v2_header(v4, "198.51.100.1:25".parse().unwrap()).unwrap();
        assert_eq!(decoded(&h).0, v4);
    }

    /// A client that sends a command and its TLS close_notify together (a
    /// bidirectional shutdown: it waits for ours before closing the socket)
    /// has hung up: rustls took both records in with the command, so the
    /// socket is empty and the wait for the next command must still end at
    /// once with `Closed`, not sit out the idle timeout. The same check is the
    /// backend legs' in-step answer (`Conn::unsolicited`).
    #[tokio::test]
    async fn a_close_notify_read_with_the_last_command_ends_the_wait() {
        use crate::codec::{CodecError, Conn};
        use rustls_pki_types::pem::PemObject;
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let pair = crate::tls::write_self_signed(dir.path(), &["localhost"]).unwrap();
        let config = crate::tls::server_config(std::slice::from_ref(&pair)).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_file_iter(&pair.0).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let client_config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client_config))
                .connect(name, tcp)
                .await
                .unwrap();
            tls.write_all(b"NOOP\r\n").await.unwrap();
            tls.get_mut().1.send_close_notify();
            tls.flush().await.unwrap();
            tls // the socket stays open: no FIN
        });
        let (tcp, _) = l.accept().await.unwrap();
        let stream = super::ClientStream::Plain(tcp)
            .into_tls(config, Duration::from_secs(5))
            .await
            .unwrap();
        let _client = client.await.unwrap();
        // both records are there before the first read
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut c = Conn::new(stream);
        let (_tx, shutdown) = tokio::sync::watch::channel(false);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let wait = Duration::from_secs(3);
        let got = c.next_command(100, wait, deadline, &shutdown).await;
        assert_eq!(&got.unwrap().unwrap()[..], b"NOOP");
        let in_step = c.unsolicited().await;
        assert!(
            matches!(in_step, Err(CodecError::Closed)),
            "the in-step check after a close_notify: {in_step:?}"
        );
        let got = c.next_command(100, wait, deadline, &shutdown).await;
        assert!(
            matches!(got, Ok(Err(CodecError::Closed))),
            "the wait after a close_notify: {got:?}"
        );
    }
}
