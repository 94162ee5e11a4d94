//! TLS for the client leg: certificates from PEM files, SNI selection by the
//! certificate's own names (first certificate = default for clients without SNI),
//! TLS 1.2 and 1.3 only, session resumption (tickets and a session cache), and
//! self-signed development certificates for `demo` and tests.

use crate::config::Protocol;
use rustls::crypto::aws_lc_rs;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
}

fn file_err(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

struct Entry {
    key: Arc<CertifiedKey>,
}

impl Entry {
    fn serves(&self, name: &str) -> bool {
        let Some(leaf) = self.key.cert.first() else {
            return false;
        };
        let Ok(server_name) = ServerName::try_from(name) else {
            return false;
        };
        match webpki::EndEntityCert::try_from(leaf) {
            Ok(ee) => ee.verify_is_valid_for_subject_name(&server_name).is_ok(),
            Err(_) => false,
        }
    }
}

/// Picks the certificate whose names match the client's SNI; the first one otherwise.
#[derive(Clone)]
pub struct SniResolver {
    entries: Arc<Vec<Entry>>,
}

impl std::fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SniResolver({} certificates)", self.entries.len())
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let first = self.entries.first()?;
        if self.entries.len() > 1 {
            if let Some(sni) = hello.server_name() {
                if let Some(e) = self.entries.iter().find(|e| e.serves(sni)) {
                    return Some(e.key.clone());
                }
            }
        }
        Some(first.key.clone())
    }
}

fn load_pair(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_err(cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(cert, e))?;
    if chain.is_empty() {
        return Err(file_err(cert, "no CERTIFICATE block found"));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e))?;
    let signing = aws_lc_rs::sign::any_supported_type(&der)
        .map_err(|e| file_err(key, format!("unsupported private key: {e}")))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match()
        .map_err(|e| file_err(key, format!("does not belong to {}: {e}", cert.display())))?;
    Ok(Arc::new(ck))
}

/// Builds the server configuration shared by all TLS listeners (each listener
/// runs on its own copy from [`for_listener`]).
pub fn server_config(pairs: &[(PathBuf, PathBuf)]) -> Result<Arc<ServerConfig>, TlsError> {
    let mut entries = Vec::new();
    for (cert, key) in pairs {
        entries.push(Entry {
            key: load_pair(cert, key)?,
        });
    }
    let resolver = SniResolver {
        entries: Arc::new(entries),
    };
    let mut provider = aws_lc_rs::default_provider();
    provider.cipher_suites.sort_by_key(suite_rank);
    let mut cfg = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    // Resumption: stateless tickets (TLS 1.2 and 1.3) plus a bounded stateful cache.
    cfg.ticketer = aws_lc_rs::Ticketer::new()?;
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
    // One TLS 1.3 ticket per full handshake, not rustls' default of two: a
    // mail client opens one connection at a time and resumes with one ticket
    // (this ticketer's tickets stay valid for reuse), and every ticket costs
    // an encryption, a key derivation and bytes on the wire, also for the
    // many clients that never resume. A client that says how many it wants
    // (RFC 9149 ticket_request) gets that many, at most this one: none for
    // a client that asks for none.
    cfg.send_tls13_tickets = TLS13_TICKETS;
    cfg.max_tls13_tickets = TLS13_TICKETS;
    // Mail clients rarely send early data; never accept it (replay risk).
    cfg.max_early_data_size = 0;
    // The server's order of suites (`suite_rank`), not the client's.
    cfg.ignore_client_order = true;
    Ok(Arc::new(cfg))
}

/// The order the server picks cipher suites in: TLS 1.3 before 1.2, and
/// AES-128-GCM, then AES-256-GCM, then ChaCha20-Poly1305 in each. Clients
/// built on OpenSSL list AES-256-GCM-SHA384 first and get it when the server
/// follows them; its SHA-384 key schedule (some 67 HMAC-SHA384 finals per
/// handshake, tickets included) was 5.6% of the instructions of a whole
/// STARTTLS message (issue 17, callgrind), while AES-128-GCM's SHA-256 runs
/// on the CPU's SHA instructions. AES-128 has no weakness that matters for
/// mail transport. Every suite stays on offer: a client that has only
/// ChaCha20 still gets it. (Go's crypto/tls also prefers AES-128-GCM, but
/// keeps ChaCha20 first for a client that lists it first, as one without
/// AES instructions would; rustls has no hook for that, so such a client
/// gets AES-128-GCM here: slower for it, never refused.)
fn suite_rank(s: &rustls::SupportedCipherSuite) -> (bool, u8) {
    use rustls::CipherSuite as C;
    let aead = match s.suite() {
        C::TLS13_AES_128_GCM_SHA256
        | C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
        C::TLS13_AES_256_GCM_SHA384
        | C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        | C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 1,
        _ => 2,
    };
    (matches!(s, rustls::SupportedCipherSuite::Tls12(_)), aead)
}

/// The ALPN id of a listener's protocol. IANA registers `pop3` and `imap`
/// (RFC 2595, in the RFC 7301 registry); it has no id for SMTP, and `smtp`
/// is the one a client would send.
pub fn alpn_id(protocol: Protocol) -> &'static [u8] {
    match protocol {
        Protocol::Smtp => b"smtp",
        Protocol::Pop3 => b"pop3",
        Protocol::Imap => b"imap",
    }
}

/// One listener's configuration: the shared certificates, but only its own
/// protocol in ALPN and its own ticket key and session cache.
///
/// ALPN: a client that offers ALPN without our protocol (a browser's `h2`,
/// `http/1.1`) is refused with `no_application_protocol` (RFC 7301 §3.2), so
/// a TLS session meant for another service cannot be redirected here
/// (ALPACA); clients that offer no ALPN, as mail clients do, are unaffected.
/// Tickets and cached sessions: a session resumes on the listener that made
/// it and nowhere else (an SMTPS ticket does not open a POP3S session).
pub fn for_listener(
    base: &ServerConfig,
    protocol: Protocol,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut cfg = base.clone();
    cfg.alpn_protocols = vec![alpn_id(protocol).to_vec()];
    cfg.ticketer = aws_lc_rs::Ticketer::new()?;
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
    Ok(Arc::new(cfg))
}

/// Sessions kept for TLS 1.2 session-id resumption, per configuration.
const SESSION_CACHE: usize = 8192;

/// TLS 1.3 session tickets sent after each full handshake (see `server_config`).
const TLS13_TICKETS: usize = 1;

/// A self-signed certificate for `names`, written as PEM files into `dir`
/// (`cert.pem`, `key.pem`, mode 0600 for the key). Returns (cert, key) paths.
/// Files already there are replaced, never written through (see [`write_fresh`]).
pub fn write_self_signed(dir: &Path, names: &[&str]) -> Result<(PathBuf, PathBuf), TlsError> {
    let ck = rcgen::generate_simple_self_signed(
        names.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    )?;
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    write_fresh(&cert, ck.cert.pem().as_bytes(), 0o644).map_err(|e| file_err(&cert, e))?;
    write_fresh(&key, ck.signing_key.serialize_pem().as_bytes(), 0o600)
        .map_err(|e| file_err(&key, e))?;
    Ok((cert, key))
}

/// Writes a new file at `path`: whatever is there (a file, or a symlink
/// someone planted) is unlinked, not opened, and the file is created with
/// O_CREAT|O_EXCL|O_NOFOLLOW, so the write never lands anywhere but a file
/// this call created.
pub fn write_fresh(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode)
        .open(path)?;
    f.write_all(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_generated_and_picks_by_sni() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_self_signed(&dir.path().join("a"), &["a.example", "localhost"]).unwrap();
        let b = write_self_signed(&dir.path().join("b"), &["b.example"]).unwrap();
        let cfg = server_config(&[a.clone(), b.clone()]).unwrap();
        assert!(cfg.ticketer.enabled());
        let entries = [
            Entry {
                key: load_pair(&a.0, &a.1).unwrap(),
            },
            Entry {
                key: load_pair(&b.0, &b.1).unwrap(),
            },
        ];
        assert!(entries[0].serves("a.example"));
        assert!(!entries[0].serves("b.example"));
        assert!(entries[1].serves("b.example"));
    }

    #[test]
    fn mismatched_or_missing_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_self_signed(&dir.path().join("a"), &["a.example"]).unwrap();
        let b = write_self_signed(&dir.path().join("b"), &["b.example"]).unwrap();
        let e = server_config(&[(a.0.clone(), b.1.clone())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not belong"), "{e}");
        let e = server_config(&[(dir.path().join("nope.pem"), a.1)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.pem"), "{e}");
        std::fs::write(dir.path().join("empty.pem"), "hello").unwrap();
        let e = server_config(&[(dir.path().join("empty.pem"), b.1)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("no CERTIFICATE"), "{e}");
    }

    /// Counts the TLS 1.3 tickets a client is given (a session store that
    /// keeps them, so the next handshake can resume with one).
    #[derive(Debug)]
    struct CountingStore {
        inner: rustls::client::ClientSessionMemoryCache,
        tickets: std::sync::atomic::AtomicUsize,
    }

    impl rustls::client::ClientSessionStore for CountingStore {
        fn set_kx_hint(&self, n: ServerName<'static>, g: rustls::NamedGroup) {
            self.inner.set_kx_hint(n, g)
        }
        fn kx_hint(&self, n: &ServerName<'_>) -> Option<rustls::NamedGroup> {
            self.inner.kx_hint(n)
        }
        fn set_tls12_session(
            &self,
            n: ServerName<'static>,
            v: rustls::client::Tls12ClientSessionValue,
        ) {
            self.inner.set_tls12_session(n, v)
        }
        fn tls12_session(
            &self,
            n: &ServerName<'_>,
        ) -> Option<rustls::client::Tls12ClientSessionValue> {
            self.inner.tls12_session(n)
        }
        fn remove_tls12_session(&self, n: &ServerName<'static>) {
            self.inner.remove_tls12_session(n)
        }
        fn insert_tls13_ticket(
            &self,
            n: ServerName<'static>,
            v: rustls::client::Tls13ClientSessionValue,
        ) {
            self.tickets
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.inner.insert_tls13_ticket(n, v)
        }
        fn take_tls13_ticket(
            &self,
            n: &ServerName<'static>,
        ) -> Option<rustls::client::Tls13ClientSessionValue> {
            self.inner.take_tls13_ticket(n)
        }
    }

    /// A listener's configuration (SMTP, a fresh self-signed certificate for
    /// `localhost`) and roots that trust it; the directory holds the files.
    fn smtp_listener_and_roots() -> (tempfile::TempDir, Arc<ServerConfig>, rustls::RootCertStore) {
        use rustls_pki_types::pem::PemObject;
        let dir = tempfile::tempdir().unwrap();
        let pair = write_self_signed(dir.path(), &["localhost"]).unwrap();
        let server = for_listener(
            &server_config(std::slice::from_ref(&pair)).unwrap(),
            Protocol::Smtp,
        )
        .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&pair.0).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        (dir, server, roots)
    }

    /// One handshake in memory, then a byte from the server so that the
    /// client reads what followed the handshake (the tickets); the client
    /// connection after it.
    fn handshake(
        server: &Arc<ServerConfig>,
        client: &Arc<rustls::ClientConfig>,
    ) -> rustls::ClientConnection {
        use std::io::{Read, Write};
        let name = ServerName::try_from("localhost").unwrap();
        let mut c = rustls::ClientConnection::new(client.clone(), name).unwrap();
        let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
        let mut sent = false;
        let mut got = [0u8; 1];
        for _ in 0..20 {
            let mut wire = Vec::new();
            c.write_tls(&mut wire).unwrap();
            s.read_tls(&mut &wire[..]).unwrap();
            s.process_new_packets().unwrap();
            if !s.is_handshaking() && !sent {
                s.writer().write_all(b"2").unwrap();
                sent = true;
            }
            let mut wire = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut wire).unwrap();
            }
            c.read_tls(&mut &wire[..]).unwrap();
            c.process_new_packets().unwrap();
            if c.reader().read(&mut got).is_ok() {
                return c;
            }
        }
        panic!("no handshake");
    }

    /// Issue 17: the server's suite order wins: a client that lists
    /// AES-256-GCM-SHA384 first (as OpenSSL does) gets AES-128-GCM, and one
    /// that offers only ChaCha20 still gets that.
    #[test]
    fn the_server_picks_aes128_first_and_offers_every_suite() {
        let (_dir, server, roots) = smtp_listener_and_roots();
        let negotiated = |suites: &[rustls::CipherSuite], version| {
            let mut p = aws_lc_rs::default_provider();
            p.cipher_suites = suites
                .iter()
                .map(|want| {
                    *aws_lc_rs::ALL_CIPHER_SUITES
                        .iter()
                        .find(|s| s.suite() == *want)
                        .unwrap()
                })
                .collect();
            let client = rustls::ClientConfig::builder_with_provider(Arc::new(p))
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            handshake(&server, &Arc::new(client))
                .negotiated_cipher_suite()
                .unwrap()
                .suite()
        };
        use rustls::CipherSuite as C;
        let openssl_order = [
            C::TLS13_AES_256_GCM_SHA384,
            C::TLS13_CHACHA20_POLY1305_SHA256,
            C::TLS13_AES_128_GCM_SHA256,
        ];
        let v13 = &rustls::version::TLS13;
        assert_eq!(negotiated(&openssl_order, v13), C::TLS13_AES_128_GCM_SHA256);
        let chacha = [C::TLS13_CHACHA20_POLY1305_SHA256];
        assert_eq!(negotiated(&chacha, v13), C::TLS13_CHACHA20_POLY1305_SHA256);
        // (the test certificate is ECDSA)
        let tls12 = [
            C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ];
        let v12 = &rustls::version::TLS12;
        assert_eq!(
            negotiated(&tls12, v12),
            C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        );
    }

    /// Issue 17: one TLS 1.3 ticket per full handshake (rustls sends two by
    /// default), and resumption with it still works.
    #[test]
    fn one_tls13_ticket_and_it_resumes() {
        let (_dir, server, roots) = smtp_listener_and_roots();
        let store = Arc::new(CountingStore {
            inner: rustls::client::ClientSessionMemoryCache::new(8),
            tickets: Default::default(),
        });
        let mut client =
            rustls::ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        client.resumption = rustls::client::Resumption::store(store.clone());
        let client = Arc::new(client);
        let kind = |c: rustls::ClientConnection| c.handshake_kind().unwrap();
        assert_eq!(
            kind(handshake(&server, &client)),
            rustls::HandshakeKind::Full
        );
        let tickets = || store.tickets.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(tickets(), 1, "tickets after a full handshake");
        assert_eq!(
            kind(handshake(&server, &client)),
            rustls::HandshakeKind::Resumed
        );
    }
}
