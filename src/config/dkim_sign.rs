//! `policies.NAME.dkim_sign:` → [`sign::SignPolicy`]: the serde shape, and
//! the keys loaded from their files (relative paths against the YAML file's
//! directory). The keys are part of the configuration snapshot: a SIGHUP
//! loads them anew, and a key that fails to load is a configuration error
//! naming its file, so the running configuration (with the old keys) stays.

use super::load::Source;
use super::{defaults, ConfigError};
use crate::sign::{self, SignPolicy, UnknownDomain};
use crate::units::Secs;
use mail_auth::dkim::Canonicalization;
use schemars::JsonSchema;
use serde::Deserialize;
use std::time::Duration;

/// DKIM signing of authenticated sessions' mail (submission).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DkimSignFile {
    /// The keys. Every key of the message's header From domain signs it
    /// (several for one domain: dual signing, e.g. RSA and Ed25519).
    pub keys: Vec<DkimKeyFile>,
    /// Authenticated mail whose header From domain has no key: `reject`
    /// (`550 5.7.1`) or `pass` (relayed unsigned).
    pub unknown_domain: Option<UnknownDomain>,
    /// The envelope sender's (MAIL FROM) domain must have a key too, or
    /// the message is treated as of an unknown domain.
    pub match_envelope_sender: Option<bool>,
    /// `c=`, header/body: `relaxed/relaxed`, `relaxed/simple`,
    /// `simple/relaxed` or `simple/simple`.
    pub canonicalization: Option<String>,
    /// Signature lifetime (`x=` = signing time + this); none: no expiry.
    pub expiry: Option<Secs>,
}

/// `{ domain: example.org, selector: s2026, key: keys/example.org.s2026.pem }`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DkimKeyFile {
    /// `d=`: the domain signed for (the header From domain it matches).
    pub domain: String,
    /// `s=`: the key's DNS record is at `<selector>._domainkey.<domain>`.
    pub selector: String,
    /// PEM private key file: RSA (at least 2048 bits) or Ed25519, PKCS #8
    /// or PKCS #1 (`mailgate dkim keygen` writes one).
    pub key: String,
}

/// Shortest `expiry`: a signature must outlive the queues the message passes.
const MIN_EXPIRY: Duration = Duration::from_secs(3600);

pub(super) fn build_dkim_sign(
    s: &Source,
    policy: &str,
    f: &DkimSignFile,
) -> Result<SignPolicy, ConfigError> {
    let at = |needle: &str, msg: String| {
        s.err(
            &["policies", policy, "dkim_sign", needle],
            format!("policies.{policy}.dkim_sign{msg}"),
        )
    };
    if f.keys.is_empty() {
        return Err(at("keys", ".keys: name at least one key".into()));
    }
    let mut keys = Vec::with_capacity(f.keys.len());
    for (i, k) in f.keys.iter().enumerate() {
        let field = format!(".keys[{}]", i + 1);
        // an internationalised name is signed for in A-labels (RFC 8616)
        let Some(domain) = sign::ascii_domain(&k.domain).filter(|d| sign::valid_domain(d)) else {
            return Err(at(
                &k.domain,
                format!("{field}.domain: {:?} is not a domain name", k.domain),
            ));
        };
        if !sign::valid_selector(&k.selector) {
            return Err(at(
                &k.selector,
                format!(
                    "{field}.selector: {:?} is not a selector (DNS labels: letters, digits, '-', '_')",
                    k.selector
                ),
            ));
        }
        let dup = |o: &&std::sync::Arc<sign::SignKey>| {
            o.domain == domain && o.selector.eq_ignore_ascii_case(&k.selector)
        };
        if keys.iter().any(|o| dup(&o)) {
            return Err(at(
                &k.selector,
                format!("{field}: {}/{} is named twice", k.domain, k.selector),
            ));
        }
        let key = sign::load_key(&domain, &k.selector, &s.resolve(&k.key)).map_err(|e| {
            at(
                &k.key,
                format!("{field} ({}/{}).key: {e}", k.domain, k.selector),
            )
        })?;
        keys.push(key);
    }
    let canonicalization = match f.canonicalization.as_deref() {
        None => defaults::DKIM_SIGN_CANONICALIZATION,
        Some(c) => parse_canonicalization(c).ok_or_else(|| {
            at(
                c,
                format!(".canonicalization: {c:?} is not relaxed/relaxed, relaxed/simple, simple/relaxed or simple/simple"),
            )
        })?,
    };
    if let Some(x) = f.expiry {
        if x.0 < MIN_EXPIRY {
            return Err(at(
                "expiry",
                ".expiry: at least 1h (a signature must outlive the queues the message passes)"
                    .into(),
            ));
        }
    }
    Ok(SignPolicy {
        keys,
        unknown_domain: f
            .unknown_domain
            .unwrap_or(defaults::DKIM_SIGN_UNKNOWN_DOMAIN),
        match_envelope_sender: f
            .match_envelope_sender
            .unwrap_or(defaults::DKIM_SIGN_MATCH_ENVELOPE_SENDER),
        canonicalization,
        expiry: f.expiry.map(|x| x.0),
    })
}

fn parse_canonicalization(c: &str) -> Option<(Canonicalization, Canonicalization)> {
    let one = |w: &str| match w.trim() {
        "relaxed" => Some(Canonicalization::Relaxed),
        "simple" => Some(Canonicalization::Simple),
        _ => None,
    };
    let (h, b) = c.split_once('/')?;
    Some((one(h)?, one(b)?))
}

#[cfg(test)]
mod tests {
    use crate::config::fixtures::*;
    use crate::sign::{generate, KeyAlgorithm, UnknownDomain};
    use mail_auth::dkim::Canonicalization;

    fn yaml(dir: &std::path::Path, block: &str) -> String {
        format!(
            "{POLICY_BASE}    dkim_sign:\n{}",
            block.replace("DIR", &dir.display().to_string())
        )
    }

    fn keys(dir: &std::path::Path) {
        for (name, bits) in [("rsa.pem", Some(2048)), ("ed.pem", None)] {
            crate::sign::key::write_new(&dir.join(name), &generate(bits).unwrap().pem).unwrap();
        }
    }

    #[test]
    fn the_contract_example_loads_with_its_defaults() {
        let dir = tempfile::tempdir().unwrap();
        keys(dir.path());
        let c = load_str(
            "p.yaml",
            &yaml(
                dir.path(),
                "      keys:\n        - { domain: example.org, selector: s2026, key: DIR/rsa.pem }\n        - { domain: example.org, selector: ed2026, key: DIR/ed.pem }\n      unknown_domain: reject\n",
            ),
        )
        .unwrap();
        let d = c.policies["p"].dkim_sign.as_ref().unwrap();
        let algorithms: Vec<KeyAlgorithm> = d.keys.iter().map(|k| k.algorithm).collect();
        assert_eq!(
            algorithms,
            [KeyAlgorithm::Rsa { bits: 2048 }, KeyAlgorithm::Ed25519]
        );
        assert_eq!(d.unknown_domain, UnknownDomain::Reject);
        assert!(!d.match_envelope_sender);
        assert_eq!(
            d.canonicalization,
            (Canonicalization::Relaxed, Canonicalization::Relaxed)
        );
        assert_eq!(d.expiry, None);
        assert!(
            c.summary().contains("dkim_sign: example.org/s2026"),
            "{}",
            c.summary()
        );
    }

    /// An internationalised domain is named in A-labels (RFC 8616), however
    /// the file writes it: `d=` and the DNS name of the key are ASCII, and a
    /// second key for the same domain in the other spelling is a duplicate.
    #[test]
    fn internationalised_key_domains_are_signed_for_in_a_labels() {
        let dir = tempfile::tempdir().unwrap();
        keys(dir.path());
        let load = |keys: &str| load_str("p.yaml", &yaml(dir.path(), keys));
        let c = load(
            "      keys:\n        - { domain: Bücher.example, selector: s1, key: DIR/ed.pem }\n",
        )
        .unwrap();
        let d = c.policies["p"].dkim_sign.as_ref().unwrap();
        assert_eq!(d.keys[0].domain, "xn--bcher-kva.example");
        assert!(
            c.summary().contains("dkim_sign: xn--bcher-kva.example/s1"),
            "{}",
            c.summary()
        );
        let e = load("      keys:\n        - { domain: bücher.example, selector: s1, key: DIR/ed.pem }\n        - { domain: xn--bcher-kva.example, selector: s1, key: DIR/ed.pem }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("is named twice"), "{e}");
    }

    #[test]
    fn relative_key_paths_are_read_beside_the_yaml_file() {
        let dir = tempfile::tempdir().unwrap();
        keys(dir.path());
        let path = dir.path().join("p.yaml");
        std::fs::write(
            &path,
            yaml(
                dir.path(),
                "      keys: [ { domain: example.org, selector: ed, key: ed.pem } ]\n      unknown_domain: pass\n      canonicalization: simple/relaxed\n      expiry: 7d\n      match_envelope_sender: true\n",
            ),
        )
        .unwrap();
        let c = crate::config::load(&path).unwrap();
        let d = c.policies["p"].dkim_sign.as_ref().unwrap();
        assert_eq!(d.keys[0].path, dir.path().join("ed.pem"));
        assert_eq!(d.unknown_domain, UnknownDomain::Pass);
        assert!(d.match_envelope_sender);
        assert_eq!(d.canonicalization_str(), "simple/relaxed");
        assert_eq!(d.expiry, Some(std::time::Duration::from_secs(7 * 86400)));
    }

    /// A key that does not load is an error at the line that names it, with
    /// the file and the reason.
    #[test]
    fn errors_name_the_line_and_the_key_file() {
        let dir = tempfile::tempdir().unwrap();
        keys(dir.path());
        std::fs::write(dir.path().join("notakey.pem"), "hello\n").unwrap();
        let ok = "{ domain: example.org, selector: s1, key: DIR/ed.pem }";
        for (block, line, want) in [
            (
                "      keys:\n        - { domain: example.org, selector: s1, key: DIR/missing.pem }\n".to_string(),
                11,
                "keys[1] (example.org/s1).key: DIR/missing.pem: No such file",
            ),
            (
                format!("      keys:\n        - {ok}\n        - {{ domain: example.org, selector: s2, key: DIR/notakey.pem }}\n"),
                12,
                "keys[2] (example.org/s2).key: DIR/notakey.pem: no PEM private key",
            ),
            (format!("      keys: [ {ok}, {ok} ]\n"), 10, "example.org/s1 is named twice"),
            ("      keys: []\n".into(), 10, "name at least one key"),
            (
                "      keys: [ { domain: \"exa mple.org\", selector: s, key: k } ]\n".into(),
                10,
                "is not a domain name",
            ),
            (
                "      keys: [ { domain: example.org, selector: \"s/1\", key: k } ]\n".into(),
                10,
                "is not a selector",
            ),
            (format!("      keys: [ {ok} ]\n      canonicalization: relaxed\n"), 11, "is not relaxed/relaxed"),
            (format!("      keys: [ {ok} ]\n      expiry: 10m\n"), 11, "at least 1h"),
            (format!("      keys: [ {ok} ]\n      unknown_domain: drop\n"), 11, "unknown variant"),
        ] {
            let e = err(&yaml(dir.path(), &block));
            let want = want.replace("DIR", &dir.path().display().to_string());
            assert!(e.starts_with(&format!("bad.yaml:{line}:")), "{block}: {e}");
            assert!(e.contains(&want), "{block}: {e}");
        }
    }
}
