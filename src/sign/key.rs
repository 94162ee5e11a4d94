//! DKIM key files: PEM private keys (PKCS #8 `PRIVATE KEY`, or PKCS #1
//! `RSA PRIVATE KEY`) → [`SignKey`], and new keys for `mailgate dkim keygen`.
//!
//! RSA keys have at least 2048 bits (RFC 8301 §3.2 requires 1024 and
//! recommends 2048; large providers treat shorter keys as no signature);
//! Ed25519 keys sign `ed25519-sha256` (RFC 8463). A key that does not load
//! is an error naming its file and why, never what it holds. The key itself
//! stays inside mail-auth's key type; [`SignKey`]'s `Debug` shows only the
//! domain, selector, file and algorithm.

use super::SignError;
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::KeyPair as _;
use base64::Engine as _;
use mail_auth::crypto::{DkimKey, Ed25519Key, RsaKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The smallest RSA key accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;
/// Key files larger than this are refused unread (an 8192-bit RSA PEM is ~6.5 KB).
pub const MAX_KEY_FILE: u64 = 64 * 1024;

/// The algorithm of a key, as `mailgate check` and logs show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlgorithm {
    Rsa { bits: usize },
    Ed25519,
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyAlgorithm::Rsa { bits } => write!(f, "rsa-sha256, {bits} bits"),
            KeyAlgorithm::Ed25519 => f.write_str("ed25519-sha256"),
        }
    }
}

/// One loaded signing key with the domain (`d=`) and selector (`s=`) it signs as.
pub struct SignKey {
    pub domain: String,
    pub selector: String,
    /// The file it was loaded from (for messages; never its content).
    pub path: PathBuf,
    pub algorithm: KeyAlgorithm,
    /// The TXT record to publish at `<selector>._domainkey.<domain>`.
    pub dns_record: String,
    pub(super) key: DkimKey,
}

impl fmt::Debug for SignKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignKey")
            .field("domain", &self.domain)
            .field("selector", &self.selector)
            .field("path", &self.path)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl SignKey {
    /// `domain/selector`, as the transaction log and metrics name a key.
    pub fn name(&self) -> String {
        format!("{}/{}", self.domain, self.selector)
    }

    /// Where the DNS record goes.
    pub fn record_name(&self) -> String {
        format!("{}._domainkey.{}", self.selector, self.domain)
    }
}

/// A selector (RFC 6376 §3.1: a sub-domain): dot-separated labels of
/// letters, digits, `-` and `_`, none starting or ending with `-`.
pub fn valid_selector(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// `d` as DKIM names it: A-labels (RFC 8616 §3: an internationalised
/// domain is signed and looked up in its ASCII form), lowercase, without a
/// trailing dot. `None`: IDNA refuses it (no key can match it). ASCII names
/// pass unchanged but for case; [`valid_domain`] judges them.
pub fn ascii_domain(d: &str) -> Option<String> {
    if d.is_ascii() {
        return Some(d.trim_end_matches('.').to_ascii_lowercase());
    }
    // bounded before IDNA: nothing longer is a name a key can match
    if !crate::units::dns_sized(d) {
        return None;
    }
    // UTS 46 maps the other full stops to `.`: trimmed after it
    let a = idna::domain_to_ascii(d).ok()?;
    Some(a.trim_end_matches('.').to_string())
}

/// A signing domain: as a selector, with at least two labels.
pub fn valid_domain(d: &str) -> bool {
    valid_selector(d.trim_end_matches('.')) && d.trim_end_matches('.').contains('.')
}

/// Loads the key file at `path` to sign as `domain`/`selector`.
pub fn load_key(domain: &str, selector: &str, path: &Path) -> Result<Arc<SignKey>, SignError> {
    let shown = path.display().to_string();
    let bad = |reason: String| SignError::Key {
        path: shown.clone(),
        reason,
    };
    let io = |source| SignError::Io {
        path: shown.clone(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if len > MAX_KEY_FILE {
        return Err(bad(format!(
            "{len} bytes; a DKIM key file is a PEM private key of a few KB"
        )));
    }
    let mut pem = Vec::with_capacity(len as usize);
    std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_KEY_FILE), &mut pem)
        .map_err(io)?;
    let (key, algorithm, dns_record) = parse_pem(&pem).map_err(bad)?;
    Ok(Arc::new(SignKey {
        domain: domain.trim_end_matches('.').to_ascii_lowercase(),
        selector: selector.to_string(),
        path: path.to_path_buf(),
        algorithm,
        dns_record,
        key,
    }))
}

/// A PEM private key → the signing key, its algorithm and its DNS record.
/// Errors say what is wrong with the key, never what it contains.
fn parse_pem(pem: &[u8]) -> Result<(DkimKey, KeyAlgorithm, String), String> {
    let der = PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => {
            "no PEM private key (PRIVATE KEY or RSA PRIVATE KEY) in the file".to_string()
        }
        e => format!("not a readable PEM private key ({e})"),
    })?;
    match der {
        PrivateKeyDer::Pkcs1(der) => rsa(der.secret_pkcs1_der(), false),
        PrivateKeyDer::Pkcs8(der) => {
            let bytes = der.secret_pkcs8_der();
            match aws_lc_rs::rsa::KeyPair::from_pkcs8(bytes) {
                Ok(_) => return rsa(bytes, true),
                // an RSA key aws-lc refuses (too small ones are not parsed at all)
                Err(e) if e.description_() != "WrongAlgorithm" => {
                    return Err(format!("RSA key refused ({e}); DKIM keys are RSA of at least {MIN_RSA_BITS} bits or Ed25519"));
                }
                Err(_) => {}
            }
            match aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(bytes) {
                Ok(pair) => {
                    let public = base64::engine::general_purpose::STANDARD
                        .encode(pair.public_key().as_ref());
                    let key = Ed25519Key::from_pkcs8_maybe_unchecked_der(bytes)
                        .map_err(|e| format!("Ed25519 key refused: {e}"))?;
                    Ok((
                        DkimKey::Ed25519(key),
                        KeyAlgorithm::Ed25519,
                        format!("v=DKIM1; k=ed25519; p={public}"),
                    ))
                }
                Err(_) => Err(format!(
                    "not an RSA or Ed25519 private key; DKIM keys are RSA (at least {MIN_RSA_BITS} bits) or Ed25519"
                )),
            }
        }
        PrivateKeyDer::Sec1(_) => Err(format!(
            "an EC (SEC1) key; DKIM keys are RSA (at least {MIN_RSA_BITS} bits) or Ed25519"
        )),
        _ => Err("an unknown kind of private key".into()),
    }
}

fn rsa(der: &[u8], pkcs8: bool) -> Result<(DkimKey, KeyAlgorithm, String), String> {
    let pair = if pkcs8 {
        aws_lc_rs::rsa::KeyPair::from_pkcs8(der)
    } else {
        aws_lc_rs::rsa::KeyPair::from_der(der)
    }
    .map_err(|e| {
        format!(
            "RSA key refused ({e}); DKIM keys are RSA of at least {MIN_RSA_BITS} bits or Ed25519"
        )
    })?;
    let bits = pair.public_modulus_len() * 8;
    if bits < MIN_RSA_BITS {
        return Err(format!(
            "RSA key of {bits} bits; DKIM keys must have at least {MIN_RSA_BITS}"
        ));
    }
    let record = rsa_record(&pair).ok_or("RSA public key cannot be encoded")?;
    let der = if pkcs8 {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der))
    } else {
        PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(der))
    };
    let key = RsaKey::from_key_der(der).map_err(|e| format!("RSA key refused: {e}"))?;
    Ok((DkimKey::Rsa(key), KeyAlgorithm::Rsa { bits }, record))
}

/// `v=DKIM1; k=rsa; p=<SubjectPublicKeyInfo>`: the form opendkim-genkey
/// publishes and every verifier reads (dkimpy reads only this one).
fn rsa_record(pair: &aws_lc_rs::rsa::KeyPair) -> Option<String> {
    let spki = pair.public_key().as_der().ok()?;
    Some(format!(
        "v=DKIM1; k=rsa; p={}",
        base64::engine::general_purpose::STANDARD.encode(spki.as_ref())
    ))
}

/// A freshly generated key: its PEM (PKCS #8) and DNS record.
pub struct NewKey {
    pub pem: String,
    pub dns_record: String,
    pub algorithm: KeyAlgorithm,
}

impl fmt::Debug for NewKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewKey")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

/// Generates a key: `rsa_bits` 2048, 3072 or 4096 for RSA, `None` for Ed25519.
pub fn generate(rsa_bits: Option<usize>) -> Result<NewKey, SignError> {
    let failed = |what: &str| SignError::Failed(format!("key generation: {what}"));
    let der: Vec<u8> = match rsa_bits {
        Some(bits) => {
            let size = match bits {
                2048 => aws_lc_rs::rsa::KeySize::Rsa2048,
                3072 => aws_lc_rs::rsa::KeySize::Rsa3072,
                4096 => aws_lc_rs::rsa::KeySize::Rsa4096,
                _ => return Err(failed("RSA keys have 2048, 3072 or 4096 bits")),
            };
            let pair = aws_lc_rs::rsa::KeyPair::generate(size).map_err(|_| failed("RSA"))?;
            let doc: aws_lc_rs::encoding::Pkcs8V1Der = pair.as_der().map_err(|_| failed("RSA"))?;
            doc.as_ref().to_vec()
        }
        None => {
            // PKCS #8 v1 (no public key inside), as `openssl genpkey` writes
            // it: OpenSSL 3.0 does not read the v2 form
            let doc = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8v1(
                &aws_lc_rs::rand::SystemRandom::new(),
            )
            .map_err(|_| failed("Ed25519"))?;
            doc.as_ref().to_vec()
        }
    };
    let pem = pem_encode("PRIVATE KEY", &der);
    // the record comes from the key as a key file holds it: what loads is what is published
    let (_, algorithm, dns_record) = parse_pem(pem.as_bytes()).map_err(|e| failed(&e))?;
    Ok(NewKey {
        pem,
        dns_record,
        algorithm,
    })
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Writes a new key file: created (never replaced: `O_EXCL`) with mode 0600
/// from the start, so the key is never readable by others, not even briefly.
pub fn write_new(path: &Path, pem: &str) -> Result<(), SignError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let shown = path.display().to_string();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => SignError::Exists(shown.clone()),
            _ => SignError::Io {
                path: shown.clone(),
                source: e,
            },
        })?;
    f.write_all(pem.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|source| SignError::Io {
            path: shown,
            source,
        })
}

/// `mailgate dkim keygen`: a new key for `domain`/`selector` written to
/// `out` (see [`write_new`]); returns what to tell the operator: the DNS
/// record to publish and the `keys:` entry. Nothing of the private key.
pub fn keygen(
    domain: &str,
    selector: &str,
    rsa_bits: Option<usize>,
    out: &Path,
) -> Result<String, SignError> {
    let bad = |reason: String| SignError::Key {
        path: out.display().to_string(),
        reason,
    };
    // named as the configuration names it: the record goes under A-labels
    let Some(domain) = ascii_domain(domain).filter(|d| valid_domain(d)) else {
        return Err(bad(format!("{domain:?} is not a domain name")));
    };
    if !valid_selector(selector) {
        return Err(bad(format!(
            "{selector:?} is not a selector (DNS labels: letters, digits, '-', '_')"
        )));
    }
    let new = generate(rsa_bits)?;
    write_new(out, &new.pem)?;
    Ok(format!(
        "wrote {} ({}, mode 0600)\n\nPublish this DNS record:\n\n{}\n\nand name the key in a policy's dkim_sign block:\n\n        - {{ domain: {domain}, selector: {selector}, key: {} }}\n",
        out.display(),
        new.algorithm,
        zone_entry(&domain, selector, &new.dns_record),
        out.display()
    ))
}

/// The zone-file line(s) for `record` at `<selector>._domainkey.<domain>`:
/// TXT strings of at most 255 octets (RFC 1035 §3.3), in parentheses.
pub fn zone_entry(domain: &str, selector: &str, record: &str) -> String {
    let strings: Vec<String> = record
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    format!(
        "{selector}._domainkey.{domain}. IN TXT ( {} )",
        strings.join("\n    ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A-labels, lowercase, no trailing dot, however the name is written.
    #[test]
    fn domains_are_named_in_a_labels() {
        for (d, want) in [
            ("Example.ORG.", Some("example.org")),
            ("XN--BCHER-KVA.example", Some("xn--bcher-kva.example")),
            ("Bücher.example", Some("xn--bcher-kva.example")),
            // ideographic and fullwidth full stops end labels too
            (
                "bücher\u{3002}example\u{ff0e}",
                Some("xn--bcher-kva.example"),
            ),
            ("b\u{fffd}cher.example", None),
        ] {
            assert_eq!(ascii_domain(d).as_deref(), want, "{d:?}");
        }
    }

    /// Nothing longer than a DNS name reaches IDNA: its Punycode costs the
    /// square of a label's length (30 ms for one of 1000 code points in a
    /// debug build, 11 s of a runtime thread for a From list of them in a
    /// 1 MiB header block, `decide::a_from_list_of_overlong_names_is_cheap`).
    #[test]
    fn only_names_of_dns_length_reach_idna() {
        let label = |n: u32| -> String {
            (0..n)
                .map(|i| char::from_u32(0x4e00 + i).unwrap())
                .collect()
        };
        assert!(ascii_domain(&format!("{}.example", label(19))).is_some());
        assert_eq!(ascii_domain(&format!("{}.example", label(64))), None);
        assert_eq!(ascii_domain(&format!("{}.example", label(1000))), None);
        // five labels of 60: each short enough, too long together
        let many = vec![label(60); 5].join("\u{3002}");
        assert_eq!(ascii_domain(&format!("{many}.example")), None);
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn generated_keys_load_with_their_records() {
        let dir = tempfile::tempdir().unwrap();
        for (bits, algorithm, k) in [
            (Some(2048), KeyAlgorithm::Rsa { bits: 2048 }, "k=rsa"),
            (None, KeyAlgorithm::Ed25519, "k=ed25519"),
        ] {
            let new = generate(bits).unwrap();
            assert!(new.pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
            assert_eq!(new.algorithm, algorithm);
            let p = dir.path().join(format!("{k}.pem"));
            write_new(&p, &new.pem).unwrap();
            let key = load_key("Example.ORG", "s1", &p).unwrap();
            assert_eq!(key.domain, "example.org");
            assert_eq!(key.algorithm, algorithm);
            assert_eq!(key.dns_record, new.dns_record);
            assert!(key.dns_record.starts_with(&format!("v=DKIM1; {k}; p=")));
            // keys never show in Debug output
            let debug = format!("{key:?}");
            assert!(!debug.contains("MII") && !debug.contains("key:"), "{debug}");
        }
        // an Ed25519 record holds the raw 32-byte key (RFC 8463 §4.2)
        let ed = generate(None).unwrap();
        let p = ed.dns_record.split("p=").nth(1).unwrap();
        let raw = base64::engine::general_purpose::STANDARD.decode(p).unwrap();
        assert_eq!(raw.len(), 32);
    }

    #[test]
    fn key_files_are_created_0600_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.pem");
        write_new(&p, "first").unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        let e = write_new(&p, "second").unwrap_err();
        assert!(matches!(e, SignError::Exists(_)), "{e}");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "first");
    }

    /// Errors name the file and say why, never what it holds.
    #[test]
    fn unusable_key_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = load_key("a.example", "s", &missing)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(&missing.display().to_string()), "{e}");

        let cert = write(
            dir.path(),
            "cert.pem",
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        );
        let e = load_key("a.example", "s", &cert).unwrap_err().to_string();
        assert!(e.contains("cert.pem: no PEM private key"), "{e}");

        // an EC key (rcgen makes P-256 keys)
        let ec = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let ec = write(dir.path(), "ec.pem", &ec);
        let e = load_key("a.example", "s", &ec).unwrap_err().to_string();
        assert!(
            e.contains("ec.pem: not an RSA or Ed25519 private key"),
            "{e}"
        );
        assert!(!e.contains("MII"), "{e}");

        let big = write(
            dir.path(),
            "big.pem",
            &"x".repeat(MAX_KEY_FILE as usize + 1),
        );
        let e = load_key("a.example", "s", &big).unwrap_err().to_string();
        assert!(e.contains("big.pem: 65537 bytes"), "{e}");
    }

    #[test]
    fn keygen_writes_the_key_and_says_what_to_publish() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("example.org.ed.pem");
        let said = keygen("example.org", "ed", None, &out).unwrap();
        let key = load_key("example.org", "ed", &out).unwrap();
        assert!(
            said.contains(&format!(
                "ed._domainkey.example.org. IN TXT ( \"{}\" )",
                key.dns_record
            )),
            "{said}"
        );
        assert!(
            said.contains("- { domain: example.org, selector: ed, key: "),
            "{said}"
        );
        assert!(!said.contains("PRIVATE"), "{said}");
        let e = keygen("example.org", "ed", None, &out).unwrap_err();
        assert!(matches!(e, SignError::Exists(_)), "{e}");
        for (d, s) in [
            ("example", "s"),
            ("example.org", "a/b"),
            ("../x.org", "s"),
            ("example.org", "-s"),
        ] {
            let e = keygen(d, s, None, &dir.path().join("x.pem")).unwrap_err();
            assert!(e.to_string().contains("is not a"), "{d} {s}: {e}");
        }
        assert!(!dir.path().join("x.pem").exists());
        // an internationalised domain, as the configuration takes it
        let out = dir.path().join("idn.pem");
        let said = keygen("Bücher.example", "ed", None, &out).unwrap();
        assert!(
            said.contains("ed._domainkey.xn--bcher-kva.example. IN TXT ("),
            "{said}"
        );
        assert!(said.contains("{ domain: xn--bcher-kva.example,"), "{said}");
    }

    #[test]
    fn zone_entries_split_long_records() {
        let rsa = generate(Some(2048)).unwrap();
        let z = zone_entry("example.org", "s2026", &rsa.dns_record);
        assert!(z.starts_with("s2026._domainkey.example.org. IN TXT ( \"v=DKIM1; k=rsa; p="));
        let strings: Vec<&str> = z.split('"').skip(1).step_by(2).collect();
        assert!(strings.len() >= 2 && strings.iter().all(|s| s.len() <= 255));
        assert_eq!(strings.concat(), rsa.dns_record);
    }
}
