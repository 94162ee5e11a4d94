//! Shared helpers for integration and end-to-end tests. Everything binds
//! 127.0.0.1 and every child process is killed by a Drop guard.
//!
//! - `smtp_client` / `pop3_client`: the test clients;
//! - `backend`: scripted SMTP, POP3 and IMAP backends that record what they got;
//! - `yaml`: the configuration builder (the real loader reads its text);
//! - `dovecot`: a throwaway Dovecot (POP3 and IMAP) as the legacy backend;
//! - `ports`, `tools`, `sink`, `redis`: ports, external programs, smtp-sink, redis-server.
//!
//! The library paths tests use (`mailgate::server::Gateway`, …) are named
//! here, so that a move inside the library changes this file only.
#![allow(dead_code, unused_imports)]

pub mod backend;
pub mod dovecot;
mod http;
pub mod pop3_client;
mod ports;
mod redis;
mod sink;
pub mod smtp_client;
mod tools;
pub mod yaml;

pub use backend::{
    demo_imap, demo_pop3, demo_smtp, ImapBackend, Pop3Backend, Running, SmtpBackend,
};
pub use dovecot::{crlf, Dovecot, DovecotConf};
pub use http::{http, http_get, sample};
pub use pop3_client::Pop3Client;
pub use ports::*;
pub use redis::Redis;
pub use sink::Sink;
pub use smtp_client::{SmtpClient, Tls};
pub(crate) use tools::require_or_skip;
pub use tools::*;
pub use yaml::Yaml;

pub use mailgate::server::Gateway;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::{TcpSocket, TcpStream};

/// A self-signed certificate for localhost / 127.0.0.1 in `dir` (cert.pem, key.pem).
pub fn dev_cert(dir: &Path) -> (PathBuf, PathBuf) {
    mailgate::tls::write_self_signed(dir, &["localhost", "127.0.0.1"]).unwrap()
}

/// Loads `yaml` and starts the gateway in-process, returning once the SMTP
/// backends' capabilities are known (tests check what EHLO advertises).
pub async fn start(yaml: &str) -> Gateway {
    let cfg = mailgate::config::load_str("test.yaml", yaml).unwrap_or_else(|e| panic!("{e}"));
    let gw = Gateway::start(&cfg).await.unwrap();
    gw.backends_probed().await;
    gw
}

/// A rustls client config trusting exactly `ca`.
pub fn tls_client(ca: &Path) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// The TLS handshake as a client of `localhost`, trusting `ca`.
pub async fn tls_connect(s: TcpStream, ca: &Path) -> Tls {
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(tls_client(ca))
        .connect(name, s)
        .await
        .unwrap()
}

/// A TCP connection to `dst` from loopback address `src` (127.0.0.x), so
/// that tests can be different clients to per-address policies.
pub async fn connect_from(src: &str, dst: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{src}:0").parse().unwrap()).unwrap();
    s.connect(dst).await.unwrap()
}
