//! Warnings `mailgate check` prints: configurations that load and run but
//! are risky. Each has a stable short name (operators grep for it, and
//! `check --strict` fails their CI pipeline on any) and one line of why.
//!
//! [`of`] is pure: the configuration and a [`Host`] (what the machine has:
//! memory, the certificate files, the time) in, warnings out. Only
//! [`Host::probe`] reads files.

use super::{AuthMode, Config, Protocol, TlsMode};
use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

/// A certificate closer to its end than this is warned about.
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(14 * 86_400);

/// One risky setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// Stable short name (never renamed: operators' scripts match it).
    pub name: &'static str,
    /// What it is about: `listener mx`, `hostname mx.example.org`, a file.
    pub subject: String,
    /// One line: what happens because of it, and what to set instead.
    pub why: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "warning: {}: {}: {}", self.name, self.subject, self.why)
    }
}

/// One configured certificate file as found on disk.
#[derive(Debug, Clone)]
pub enum CertFile {
    /// The certificate or its key does not exist.
    Missing,
    /// The DER of the first (leaf) certificate of the PEM file.
    Leaf(Vec<u8>),
    /// Present but not readable as PEM: `check` reports that as an error.
    Unreadable,
}

/// What the machine has, as far as the warnings need it.
#[derive(Debug, Clone)]
pub struct Host {
    /// The memory this process may use: MemTotal or the cgroup's limit, the
    /// smaller. `None` when neither could be read.
    pub memory: Option<u64>,
    /// One entry per `Config::certificates`, in that order.
    pub certificates: Vec<CertFile>,
    pub now: SystemTime,
}

impl Host {
    /// Reads /proc/meminfo, the cgroup memory limit and the certificate files.
    pub fn probe(cfg: &Config) -> Host {
        let certificates = cfg
            .certificates
            .iter()
            .map(|(cert, key)| {
                if !cert.exists() || !key.exists() {
                    return CertFile::Missing;
                }
                use rustls::pki_types::pem::PemObject;
                match rustls::pki_types::CertificateDer::pem_file_iter(cert)
                    .ok()
                    .and_then(|mut it| it.next())
                {
                    Some(Ok(der)) => CertFile::Leaf(der.to_vec()),
                    _ => CertFile::Unreadable,
                }
            })
            .collect();
        Host {
            memory: memory_limit(),
            certificates,
            now: SystemTime::now(),
        }
    }
}

/// The smaller of MemTotal and the cgroup limit (v2 `memory.max` of this
/// process's cgroup or of the namespace root a container sees; v1
/// `memory.limit_in_bytes`). "max" and absent files are no limit.
fn memory_limit() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let total = read("/proc/meminfo").and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    });
    let mut files = vec![
        "/sys/fs/cgroup/memory.max".to_string(),
        "/sys/fs/cgroup/memory/memory.limit_in_bytes".to_string(),
    ];
    if let Some(own) = read("/proc/self/cgroup") {
        for path in own.lines().filter_map(|l| l.strip_prefix("0::")) {
            files.push(format!(
                "/sys/fs/cgroup{}/memory.max",
                path.trim().trim_end_matches('/')
            ));
        }
    }
    let cgroup = files
        .iter()
        .filter_map(|f| read(f)?.trim().parse::<u64>().ok())
        .min();
    [total, cgroup].into_iter().flatten().min()
}

/// Every warning for `cfg` on `host`, in a fixed order: listeners (in
/// configuration order), process-wide settings, certificates, names.
pub fn of(cfg: &Config, host: &Host) -> Vec<Warning> {
    let mut out = Vec::new();
    let mut w =
        |name: &'static str, subject: String, why: String| out.push(Warning { name, subject, why });
    for l in &cfg.listeners {
        let subject = || format!("listener {}", l.name);
        let smtp = l.protocol == Protocol::Smtp;
        let checks = l
            .policy
            .as_ref()
            .and_then(|p| p.auth.as_ref())
            .is_some_and(|a| a.spf.is_some() || a.dkim.is_some() || a.dmarc.is_some());
        if smtp && l.auth == AuthMode::None && !checks {
            w(
                "mx-without-auth-checks",
                subject(),
                "its policy checks no SPF, DKIM or DMARC: forged senders reach the backend \
                 unmarked (add spf:, dkim:, dmarc: to the policy; auth: marks a submission port)"
                    .into(),
            );
        }
        if let Some(p) = l
            .policy
            .as_ref()
            .filter(|p| !smtp && cfg.triage.contains_key(&p.name))
        {
            w(
                "triage-not-smtp",
                subject(),
                format!(
                    "policy {} has a triage: block, which applies to SMTP listeners only: \
                     DNSBL scoring and pregreet are not run on this {:?} listener",
                    p.name, l.protocol
                ),
            );
        }
        if smtp && l.auth != AuthMode::None && !l.require_tls {
            w(
                "submission-without-require-tls",
                subject(),
                "auth: is set but require_tls: false: a client whose STARTTLS is stripped \
                 goes on in plaintext instead of hearing 530 (RFC 8314: set require_tls: true)"
                    .into(),
            );
        }
        if !smtp && !l.require_tls {
            // one name per protocol: operators grep for the protocol they run
            let name = match l.protocol {
                Protocol::Imap => "imap-login-before-tls",
                _ => "pop3-login-before-tls",
            };
            w(
                name,
                subject(),
                "logins are accepted before TLS: passwords cross the network in plaintext \
                 (use tls: starttls with require_tls: true, or implicit)"
                    .into(),
            );
        }
        // what tells this backend the client, besides Received: (`backend.rs`
        // allows xclient on SMTP and imap_id on IMAP listeners only)
        let b = &l.backend;
        if l.proxy_trusted.is_some() && !b.xclient && !b.proxy_v2 && !b.imap_id {
            let methods = match l.protocol {
                Protocol::Smtp => "[xclient] or [proxy_v2]",
                Protocol::Imap => "[imap_id] or [proxy_v2]",
                Protocol::Pop3 => "[proxy_v2]",
            };
            w(
                "identity-received-only-behind-proxy",
                subject(),
                format!(
                    "behind a PROXY balancer, backend {} learns the client only from the \
                     Received: header, which legacy servers do not use for their own checks \
                     (set identity: {methods})",
                    b.name
                ),
            );
        }
        if smtp && l.max_message_size > cfg.max_inflight_data {
            w(
                "message-size-over-inflight",
                subject(),
                format!(
                    "max_message_size {} is larger than server.max_inflight_data {}: \
                     larger messages always get 452 4.3.1",
                    l.max_message_size, cfg.max_inflight_data
                ),
            );
        }
    }
    if let Some(mem) = host.memory {
        if cfg.max_inflight_data > mem {
            w(
                "inflight-over-memory",
                "server.max_inflight_data".into(),
                format!(
                    "{} bytes is more than the {mem} bytes of memory this machine (or \
                     cgroup) allows: a burst of large messages ends in the OOM killer, not 452",
                    cfg.max_inflight_data
                ),
            );
        }
    }
    let now = host
        .now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let mut leaves = Vec::new();
    for ((cert, key), file) in cfg.certificates.iter().zip(&host.certificates) {
        let subject = || format!("certificate {}", cert.display());
        match file {
            CertFile::Missing => w(
                "certificate-missing",
                subject(),
                format!(
                    "it or its key {} does not exist: run refuses to start without them",
                    key.display()
                ),
            ),
            CertFile::Unreadable => {}
            CertFile::Leaf(der) => {
                leaves.push(der.as_slice());
                let Ok((_, x509)) = x509_parser::parse_x509_certificate(der) else {
                    continue;
                };
                let left = x509.validity().not_after.timestamp() - now;
                if left < EXPIRY_MARGIN.as_secs() as i64 {
                    let when = if left < 0 {
                        format!("expired {} day(s) ago", -left / 86_400)
                    } else {
                        format!("expires in {} day(s)", left / 86_400)
                    };
                    w(
                        "certificate-expires",
                        subject(),
                        format!("{when}: clients refuse an expired certificate (renew it)"),
                    );
                }
            }
        }
    }
    // Names: each TLS listener's host name must be covered by a certificate
    // (judged as a client does, by webpki); with none loaded there is
    // nothing to judge (certificate-missing said why).
    let mut names: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for l in cfg.listeners.iter().filter(|l| l.tls != TlsMode::None) {
        names.entry(&l.hostname).or_default().push(&l.name);
    }
    if !leaves.is_empty() {
        for (name, listeners) in &names {
            if !leaves.iter().any(|der| covers(der, name)) {
                w(
                    "certificate-name-mismatch",
                    format!("hostname {name}"),
                    format!(
                        "no certificate covers it (listeners {}): clients that verify the \
                         name (submission clients, MTA-STS and DANE senders) refuse the handshake",
                        listeners.join(", ")
                    ),
                );
            }
        }
    }
    let mut documentation: BTreeMap<String, Vec<&'static str>> = BTreeMap::new();
    let mut note = |name: &str, field: &'static str| {
        let fields = documentation.entry(name.to_ascii_lowercase()).or_default();
        if !fields.contains(&field) {
            fields.push(field);
        }
    };
    for l in &cfg.listeners {
        note(&l.hostname, "hostname");
        note(&l.backend.helo_name, "helo_name");
        if let Some(a) = l.policy.as_ref().and_then(|p| p.auth.as_ref()) {
            if !a.authserv_id.is_empty() {
                note(&a.authserv_id, "authserv_id");
            }
        }
    }
    for (name, fields) in documentation {
        if is_documentation_name(&name) {
            w(
                "example-hostname",
                format!("{} {name}", fields.join("/")),
                "a documentation name (RFC 2606): set the name your MX is known by \
                 (greeting, EHLO, Received:, Authentication-Results)"
                    .into(),
            );
        }
    }
    out
}

/// Whether the certificate `der` is valid for the DNS name `name`.
fn covers(der: &[u8], name: &str) -> bool {
    let der = rustls::pki_types::CertificateDer::from(der);
    let Ok(cert) = webpki::EndEntityCert::try_from(&der) else {
        return false;
    };
    let Ok(server) = rustls::pki_types::ServerName::try_from(name) else {
        return false;
    };
    cert.verify_is_valid_for_subject_name(&server).is_ok()
}

/// RFC 2606's example domains and the `.example` TLD.
fn is_documentation_name(name: &str) -> bool {
    let name = name.trim_end_matches('.');
    ["example", "example.com", "example.net", "example.org"]
        .iter()
        .any(|d| name == *d || name.ends_with(&format!(".{d}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;
    use std::path::Path;

    const GIB: u64 = 1 << 30;

    /// A year-valid certificate for `names`, and a host with plenty of memory.
    fn host_with(names: &[&str], not_after: (i32, u8, u8)) -> Host {
        let mut p =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Host {
            memory: Some(64 * GIB),
            certificates: vec![CertFile::Leaf(cert.der().to_vec())],
            now: at(2030, 1, 1),
        }
    }

    /// Midnight UTC of a date (from the days-from-civil algorithm).
    fn at(y: i64, m: i64, d: i64) -> SystemTime {
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        SystemTime::UNIX_EPOCH + Duration::from_secs(days as u64 * 86_400)
    }

    /// The shipped `policies/`, as an operator has it once the site values
    /// (certificate, hostname) are filled in.
    fn shipped() -> Config {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let tmp = tempfile::tempdir().unwrap();
        for f in super::super::files_of(&dir).unwrap() {
            let text = std::fs::read_to_string(&f).unwrap();
            std::fs::write(
                tmp.path().join(f.file_name().unwrap()),
                text.replace("example.org", "mail.test"),
            )
            .unwrap();
        }
        super::super::load(tmp.path()).unwrap()
    }

    fn site_host() -> Host {
        host_with(&["mx.mail.test"], (2031, 1, 1))
    }

    fn names(ws: &[Warning]) -> Vec<&'static str> {
        ws.iter().map(|w| w.name).collect()
    }

    /// `name` fires on `yaml` (with `host`) and not on the shipped files.
    fn fires(name: &str, yaml: &str, host: &Host) -> Warning {
        let c = load_str("w.yaml", yaml).unwrap_or_else(|e| panic!("{e}"));
        let ws = of(&c, host);
        let found = ws.iter().find(|w| w.name == name).cloned();
        let w = found.unwrap_or_else(|| panic!("{name} does not fire: {:?}", names(&ws)));
        assert!(!w.why.contains('\n') && !w.why.is_empty(), "{w}");
        let shipped = of(&shipped(), &site_host());
        assert!(
            !names(&shipped).contains(&w.name),
            "{name} fires on the shipped policies: {shipped:?}"
        );
        w
    }

    /// A backend, and the certificate entry TLS listeners need (the host
    /// of each test says what the file holds).
    const BASE: &str = "tls:\n  certificates: [ { cert: c.pem, key: k.pem } ]\nbackends:\n  b: { address: \"127.0.0.1:1\" }\n";

    fn listener(fields: &str) -> String {
        format!("{BASE}listeners:\n  - {{ name: l, bind: \"127.0.0.1:1\", backend: b, hostname: mx.mail.test, {fields} }}\n")
    }

    fn none_of(yaml: &str, host: &Host) {
        let c = load_str("w.yaml", yaml).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(of(&c, host), vec![], "{yaml}");
    }

    /// The shipped files with only the site values filled in give no
    /// warning; as shipped, exactly the site-value ones.
    #[test]
    fn shipped_policies_warn_only_about_site_values() {
        assert_eq!(of(&shipped(), &site_host()), vec![]);
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let c = super::super::load(&dir).unwrap();
        let mut host = Host::probe(&c);
        host.memory = Some(64 * GIB);
        let ws = of(&c, &host);
        assert_eq!(
            names(&ws),
            ["certificate-missing", "example-hostname"],
            "{ws:?}"
        );
        assert_eq!(
            ws[1].subject,
            "hostname/helo_name/authserv_id mx.example.org"
        );
    }

    #[test]
    fn mx_without_auth_checks() {
        let yaml = listener("protocol: smtp, tls: none");
        let w = fires("mx-without-auth-checks", &yaml, &site_host());
        assert_eq!(w.subject, "listener l");
        // ARC alone reports, it judges nothing: still warned
        let with = |auth: &str| {
            format!(
                "{}policies:\n  p: {{ authserv_id: mx.mail.test, {auth} }}\n",
                yaml.replace("tls: none", "tls: none, policy: p")
            )
        };
        fires("mx-without-auth-checks", &with("arc: {}"), &site_host());
        for check in ["spf", "dkim", "dmarc"] {
            none_of(&with(&format!("{check}: {{}}")), &site_host());
        }
        // submission (auth:) is not an MX
        none_of(
            &listener("protocol: smtp, tls: implicit, auth: required"),
            &site_host(),
        );
    }

    #[test]
    fn submission_without_require_tls() {
        let yaml = listener("protocol: smtp, tls: starttls, auth: required");
        fires("submission-without-require-tls", &yaml, &site_host());
        none_of(
            &yaml.replace("auth:", "require_tls: true, auth:"),
            &site_host(),
        );
    }

    #[test]
    fn pop3_login_before_tls() {
        let yaml = listener("protocol: pop3, tls: starttls, require_tls: false");
        fires("pop3-login-before-tls", &yaml, &site_host());
        fires(
            "pop3-login-before-tls",
            &listener("protocol: pop3, tls: none"),
            &site_host(),
        );
        // STLS listeners require TLS unless told otherwise
        none_of(&listener("protocol: pop3, tls: starttls"), &site_host());
    }

    /// A triage block on a POP3 or IMAP listener's policy is not run there.
    #[test]
    fn triage_not_smtp() {
        let yaml = |protocol: &str| {
            format!(
                "{}policies:\n  p:\n    triage: {{ pregreet: {{ wait: 1s }} }}\n",
                listener(&format!("protocol: {protocol}, tls: none, policy: p"))
            )
        };
        let w = fires("triage-not-smtp", &yaml("pop3"), &site_host());
        assert!(w.why.contains("policy p"), "{w}");
        fires("triage-not-smtp", &yaml("imap"), &site_host());
        let c = load_str("w.yaml", &yaml("smtp")).unwrap();
        assert!(!names(&of(&c, &site_host())).contains(&"triage-not-smtp"));
        // `check` shows the block where it runs and says where it does not
        assert!(c
            .summary()
            .contains("triage pregreet: final 220 line held 1000ms"));
        let c = load_str("w.yaml", &yaml("pop3")).unwrap();
        assert!(c
            .summary()
            .contains("triage: not applied (SMTP listeners only)"));
    }

    /// IMAP listeners get their own name, never the POP3 one.
    #[test]
    fn imap_login_before_tls() {
        for fields in [
            "protocol: imap, tls: starttls, require_tls: false",
            "protocol: imap, tls: none",
        ] {
            let yaml = listener(fields);
            fires("imap-login-before-tls", &yaml, &site_host());
            let c = load_str("w.yaml", &yaml).unwrap();
            let ws = names(&of(&c, &site_host()));
            assert!(!ws.contains(&"pop3-login-before-tls"), "{fields}: {ws:?}");
        }
        none_of(&listener("protocol: imap, tls: starttls"), &site_host());
    }

    /// Each protocol's real identity methods silence the warning; the
    /// warning names the ones its protocol has.
    #[test]
    fn identity_received_only_behind_proxy() {
        let proxy = "proxy_protocol: { trusted: [\"10.0.0.0/8\"] }";
        for (protocol, methods, named) in [
            ("pop3", &["proxy_v2"][..], "identity: [proxy_v2]"),
            (
                "imap",
                &["imap_id", "proxy_v2"][..],
                "[imap_id] or [proxy_v2]",
            ),
            (
                "smtp",
                &["xclient", "proxy_v2"][..],
                "[xclient] or [proxy_v2]",
            ),
        ] {
            let yaml = listener(&format!(
                "protocol: {protocol}, tls: implicit, auth: required, {proxy}"
            ));
            let yaml = if protocol == "smtp" {
                yaml
            } else {
                yaml.replace("auth: required, ", "")
            };
            let w = fires("identity-received-only-behind-proxy", &yaml, &site_host());
            assert!(w.why.contains("backend b"), "{w}");
            assert!(w.why.contains(named), "{protocol}: {w}");
            for identity in methods {
                let with = yaml.replace(
                    "127.0.0.1:1\" }",
                    &format!("127.0.0.1:1\", identity: [{identity}] }}"),
                );
                assert_ne!(with, yaml);
                none_of(&with, &site_host());
            }
        }
    }

    #[test]
    fn message_size_over_inflight() {
        let yaml = format!(
            "server: {{ max_inflight_data: 10MiB }}\n{}",
            listener("protocol: smtp, tls: implicit, auth: required, max_message_size: 20MiB")
        );
        let w = fires("message-size-over-inflight", &yaml, &site_host());
        assert!(w.why.contains("452 4.3.1"), "{w}");
        none_of(&yaml.replace("20MiB", "10MiB"), &site_host());
    }

    #[test]
    fn inflight_over_memory() {
        let yaml = format!("server: {{ max_inflight_data: 2GiB }}\n{}", tls_listener());
        let mut host = site_host();
        host.memory = Some(GIB);
        fires("inflight-over-memory", &yaml, &host);
        host.memory = Some(4 * GIB);
        none_of(&yaml, &host);
        // the probe reads this machine's MemTotal (and cgroup limit)
        let c = load_str("w.yaml", &yaml).unwrap();
        assert!(Host::probe(&c).memory.is_some_and(|m| m > 1 << 20));
    }

    fn tls_listener() -> String {
        listener("protocol: smtp, tls: implicit, auth: required")
    }

    #[test]
    fn certificate_expires() {
        let yaml = tls_listener();
        let w = fires(
            "certificate-expires",
            &yaml,
            &host_with(&["mx.mail.test"], (2030, 1, 10)),
        );
        assert!(w.why.starts_with("expires in 9 day(s)"), "{w}");
        let w = fires(
            "certificate-expires",
            &yaml,
            &host_with(&["mx.mail.test"], (2029, 12, 1)),
        );
        assert!(w.why.starts_with("expired 31 day(s) ago"), "{w}");
        none_of(&yaml, &host_with(&["mx.mail.test"], (2030, 1, 16)));
    }

    #[test]
    fn certificate_name_mismatch() {
        let yaml = tls_listener();
        let w = fires(
            "certificate-name-mismatch",
            &yaml,
            &host_with(&["other.mail.test"], (2031, 1, 1)),
        );
        assert_eq!(w.subject, "hostname mx.mail.test");
        for ok in ["mx.mail.test", "*.mail.test"] {
            none_of(&yaml, &host_with(&["other.mail.test", ok], (2031, 1, 1)));
        }
    }

    #[test]
    fn certificate_missing() {
        let yaml = tls_listener();
        let c = load_str("w.yaml", &yaml).unwrap();
        let host = Host::probe(&c);
        assert!(matches!(host.certificates[..], [CertFile::Missing]));
        let w = fires("certificate-missing", &yaml, &host);
        assert!(w.why.contains("run refuses to start"), "{w}");
    }

    #[test]
    fn example_hostname() {
        let yaml = tls_listener().replace("mx.mail.test", "mx.example.org");
        let w = fires(
            "example-hostname",
            &yaml,
            &host_with(&["mx.example.org"], (2031, 1, 1)),
        );
        assert_eq!(w.subject, "hostname mx.example.org");
        for other in ["example.org.test", "myexample.com"] {
            assert!(!is_documentation_name(other), "{other}");
        }
    }
}
