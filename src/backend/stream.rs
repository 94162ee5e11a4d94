//! The backend connection: plaintext, or TLS for backends that can do it
//! (`tls: implicit | starttls` per backend). Verification is by a CA file
//! (default: the system bundle) or by pinning the SHA-256 of the backend's
//! certificate — never "accept anything".

use super::BackendError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendTlsMode {
    Implicit,
    Starttls,
}

/// A backend's TLS settings, ready to connect.
pub struct BackendTls {
    pub mode: BackendTlsMode,
    pub connector: tokio_rustls::TlsConnector,
    pub server_name: ServerName<'static>,
}

impl std::fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BackendTls({:?}, {:?})", self.mode, self.server_name)
    }
}

/// Accepts exactly the certificates whose SHA-256 (of the DER) is pinned;
/// handshake signatures are still verified with the certificate's key.
#[derive(Debug)]
struct PinVerifier {
    pins: Vec<[u8; 32]>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, end_entity.as_ref());
        if self.pins.iter().any(|p| p[..] == *d.as_ref()) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "backend certificate does not match the pinned SHA-256".into(),
            ))
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Builds the client side. `ca`: PEM file of trust anchors; `pins`: hex
/// SHA-256 of acceptable certificates (then `ca` is not used).
pub fn client_config(
    ca: Option<&std::path::Path>,
    pins: &[String],
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let cfg = if !pins.is_empty() {
        let mut parsed = Vec::new();
        for p in pins {
            let hex: String = p.chars().filter(|c| *c != ':').collect();
            if hex.len() != 64 {
                return Err(format!("pin {p:?} is not a hex SHA-256"));
            }
            let mut out = [0u8; 32];
            for (i, b) in out.iter_mut().enumerate() {
                *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                    .map_err(|_| format!("pin {p:?} is not hex"))?;
            }
            parsed.push(out);
        }
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier {
                pins: parsed,
                provider,
            }))
            .with_no_client_auth()
    } else {
        use rustls::pki_types::pem::PemObject;
        let path = ca
            .map(|p| p.to_path_buf())
            .unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into());
        let mut roots = rustls::RootCertStore::empty();
        let certs =
            CertificateDer::pem_file_iter(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        for c in certs {
            let c = c.map_err(|e| format!("{}: {e}", path.display()))?;
            roots
                .add(c)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("{}: no certificates", path.display()));
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Ok(Arc::new(cfg))
}

/// The backend leg: plaintext or TLS (see `transport::MaybeTls`).
pub type BackendStream = crate::transport::MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;

impl BackendStream {
    /// TLS handshake over the plain connection, under a deadline.
    pub async fn upgrade(
        self,
        tls: &BackendTls,
        deadline: Duration,
    ) -> Result<BackendStream, BackendError> {
        let BackendStream::Plain(tcp) = self else {
            return Err(BackendError::Protocol("TLS already active".into()));
        };
        match tokio::time::timeout(
            deadline,
            tls.connector.connect(tls.server_name.clone(), tcp),
        )
        .await
        {
            Ok(Ok(s)) => Ok(BackendStream::Tls(Box::new(s))),
            Ok(Err(e)) => Err(BackendError::Unavailable(format!("backend TLS: {e}"))),
            Err(_) => Err(BackendError::Unavailable(
                "backend TLS handshake timed out".into(),
            )),
        }
    }
}

impl crate::codec::WaitReadable for BackendStream {
    /// As on the client leg: a connection whose buffers were released (the
    /// SMTP client does so after each whole reply) allocates again only once
    /// the backend has something to say, so a session that holds its backend
    /// connection while the client is idle holds no read buffer for it.
    async fn wait_readable(&mut self) -> io::Result<()> {
        match self {
            BackendStream::Plain(t) => crate::codec::socket_readable(t).await,
            BackendStream::Tls(s) => {
                let (tcp, tls) = s.get_mut();
                crate::codec::tls_readable(tcp, tls).await
            }
            BackendStream::Detached => Ok(()),
        }
    }

    fn input_waiting(&mut self) -> bool {
        match self {
            BackendStream::Plain(t) => crate::codec::socket_has_input(t),
            BackendStream::Tls(s) => {
                let (tcp, tls) = s.get_mut();
                crate::codec::tls_has_input(tcp, tls)
            }
            BackendStream::Detached => true,
        }
    }
}
