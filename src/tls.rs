//! TLS for the client leg: certificates from PEM files, SNI selection by the
//! certificate's own names (first certificate = default for clients without SNI),
//! TLS 1.2 and 1.3 only, session resumption (tickets and a session cache), and
//! self-signed development certificates for `demo` and tests.

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

/// Builds the server configuration shared by all TLS listeners.
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
    let provider = Arc::new(aws_lc_rs::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    // Resumption: stateless tickets (TLS 1.2 and 1.3) plus a bounded stateful cache.
    cfg.ticketer = aws_lc_rs::Ticketer::new()?;
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(8192);
    // Mail clients rarely send early data; never accept it (replay risk).
    cfg.max_early_data_size = 0;
    Ok(Arc::new(cfg))
}

/// A self-signed certificate for `names`, written as PEM files into `dir`
/// (`cert.pem`, `key.pem`, mode 0600 for the key). Returns (cert, key) paths.
pub fn write_self_signed(dir: &Path, names: &[&str]) -> Result<(PathBuf, PathBuf), TlsError> {
    let ck = rcgen::generate_simple_self_signed(
        names.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    )?;
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).map_err(|e| file_err(&cert, e))?;
    write_private(&key, ck.signing_key.serialize_pem().as_bytes())?;
    Ok((cert, key))
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| file_err(path, e))?;
    f.write_all(data).map_err(|e| file_err(path, e))
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
}
