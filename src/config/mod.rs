//! Configuration: YAML file(s) → a validated [`Config`].
//!
//! `--config PATH` names a file or a directory; a directory's `*.yaml`/`*.yml`
//! files are read in name order and merged (lists appended, named maps joined;
//! a name defined twice is an error naming both files). Syntax and type errors
//! come from the YAML parser with line and column; semantic errors (an unknown
//! backend name, a bad address) are located by finding the offending value in
//! the file's text, so they also carry file:line:column.

pub mod file;
pub mod units;

use crate::policy::{self, AllowSpec, Kind, PolicySpec, RuleSpec};
use file::{AllowFile, FileConfig, ListenerFile, PolicyFile};
pub use file::{AuthMode, BareNewlines, IdentityMethod, Protocol, TlsMode};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{file}:{line}:{column}: {message}")]
    At {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{0}: no *.yaml files found")]
    Empty(String),
    #[error("{0}: larger than 1 MiB; configuration files that large are refused before parsing")]
    TooLarge(String),
}

/// The largest configuration file read (real ones are a few KiB): the YAML
/// parser's time grows faster than the text.
pub const MAX_FILE_SIZE: usize = 1 << 20;
/// The deepest nesting accepted (real configurations nest five or six
/// levels); checked by [`check_nesting`] before the parser, whose time grows
/// with the square of the depth.
pub const MAX_NESTING: usize = 64;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listeners: Vec<Arc<Listener>>,
    /// (cert, key) PEM paths, resolved against the naming file's directory. First = default.
    pub certificates: Vec<(PathBuf, PathBuf)>,
    pub backends: BTreeMap<String, Arc<Backend>>,
    pub policies: BTreeMap<String, Arc<PolicySpec>>,
    pub metrics_bind: Option<SocketAddr>,
    /// Resolver settings for SPF/DKIM/DMARC.
    pub dns: crate::auth::DnsSettings,
    pub shutdown_grace: Duration,
    pub sources: Vec<PathBuf>,
    /// Budget for message bytes held by all SMTP sessions together.
    pub max_inflight_data: u64,
}

#[derive(Debug, Clone)]
pub struct Backend {
    pub name: String,
    pub address: String,
    pub helo_name: String,
    pub xclient: bool,
    pub proxy_v2: bool,
    /// TLS to the backend, when configured.
    pub tls: Option<Arc<crate::backend::stream::BackendTls>>,
    /// Relay even when XCLIENT cannot be applied (explicit opt-out).
    pub identity_optional: bool,
}

#[derive(Debug, Clone)]
pub struct Timeouts {
    pub tls_handshake: Duration,
    pub command: Duration,
    pub data: Duration,
    pub session: Duration,
    pub backend_connect: Duration,
    pub backend_reply: Duration,
    pub backend_data: Duration,
    /// POP3 transaction state (byte pipe) idle time.
    pub idle: Duration,
}

#[derive(Debug, Clone)]
pub struct Listener {
    pub name: String,
    pub protocol: Protocol,
    pub bind: SocketAddr,
    pub tls: TlsMode,
    pub require_tls: bool,
    pub backend: Arc<Backend>,
    pub policy: Option<Arc<PolicySpec>>,
    pub auth: AuthMode,
    /// Peers that must (and alone may) send a PROXY header, and its deadline.
    pub proxy_trusted: Option<(Vec<units::Cidr>, Duration)>,
    pub hostname: String,
    pub max_connections: usize,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_errors: u32,
    pub bare_newlines: BareNewlines,
    pub max_command_line: usize,
    pub max_text_line: usize,
    pub apop: bool,
    pub max_login_failures: u32,
    pub login_failure_delay: Duration,
    pub timeouts: Timeouts,
    pub max_transactions: u32,
    /// PROXY `LOCAL`/`UNKNOWN` (no client address) accepted from trusted peers.
    pub proxy_allow_local: bool,
    /// APOP listeners: sessions holding a backend connection before login.
    pub apop_max_pending: usize,
    /// APOP listeners: the command deadline while such a connection is held.
    pub apop_prelogin_timeout: Duration,
}

struct Source {
    path: PathBuf,
    text: String,
    parsed: FileConfig,
}

impl Source {
    /// file:line:column of the first occurrence of `needles` in order (each searched
    /// after the previous one); falls back to line 1 when not found.
    fn err(&self, needles: &[&str], message: impl Into<String>) -> ConfigError {
        let mut at = 0;
        let mut found = None;
        for n in needles.iter().filter(|n| !n.is_empty()) {
            match self.text[at..].find(n) {
                Some(i) => {
                    at += i;
                    found = Some(at);
                }
                None => break,
            }
        }
        let (line, column) = match found {
            Some(pos) => {
                let before = &self.text[..pos];
                let line = before.matches('\n').count() + 1;
                let column = pos - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
                (line, column)
            }
            None => (1, 1),
        };
        ConfigError::At {
            file: self.path.display().to_string(),
            line,
            column,
            message: message.into(),
        }
    }

    /// Like `err`, for a key of a map under `section` (`backends:` → `name:`).
    fn err_key(&self, section: &str, key: &str, message: impl Into<String>) -> ConfigError {
        let mut in_section = false;
        for (i, line) in self.text.lines().enumerate() {
            let t = line.trim_start();
            if t.starts_with(&format!("{section}:")) {
                in_section = true;
                continue;
            }
            let k = t.trim_start_matches(['"', '\'']);
            if in_section
                && k.starts_with(key)
                && k[key.len()..]
                    .trim_start_matches(['"', '\''])
                    .starts_with(':')
            {
                return ConfigError::At {
                    file: self.path.display().to_string(),
                    line: i + 1,
                    column: line.len() - t.len() + 1,
                    message: message.into(),
                };
            }
        }
        self.err(&[section], message)
    }

    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.path.parent().unwrap_or(Path::new(".")).join(p)
        }
    }
}

/// The files `path` stands for: itself, or a directory's YAML files in name order.
pub fn files_of(path: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let io = |e| ConfigError::Io {
        path: path.display().to_string(),
        source: e,
    };
    if !path.is_dir() {
        std::fs::metadata(path).map_err(io)?;
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml") | Some("yml")
                )
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ConfigError::Empty(path.display().to_string()));
    }
    Ok(files)
}

pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let mut sources = Vec::new();
    for f in files_of(path)? {
        let text = read_limited(&f)?;
        sources.push(parse_source(f, text)?);
    }
    build(&sources)
}

/// Reads at most `MAX_FILE_SIZE` bytes (plus one, to tell a larger file).
fn read_limited(f: &Path) -> Result<String, ConfigError> {
    use std::io::Read;
    let io = |e| ConfigError::Io {
        path: f.display().to_string(),
        source: e,
    };
    let mut buf = Vec::new();
    std::fs::File::open(f)
        .map_err(io)?
        .take(MAX_FILE_SIZE as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(io)?;
    if buf.len() > MAX_FILE_SIZE {
        return Err(ConfigError::TooLarge(f.display().to_string()));
    }
    String::from_utf8(buf).map_err(|_| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        ))
    })
}

/// Parses one YAML text (used by `load` and by tests that keep config inline).
pub fn load_str(name: &str, text: &str) -> Result<Config, ConfigError> {
    build(&[parse_source(PathBuf::from(name), text.to_string())?])
}

/// A cheap scan of the nesting depth, before the YAML parser sees the text.
/// It counts block levels (indentation steps, and `- `, `? `, `: ` indicators
/// that open a nested node on the same line) plus flow levels (`[`, `{`
/// outside quotes and comments), skipping block scalar (`|`, `>`) content.
/// It may count more than the parser (a `[` inside a plain scalar), never
/// fewer. Returns the line and column (1-based) where `MAX_NESTING` is passed.
pub fn check_nesting(text: &str) -> Result<(), (usize, usize)> {
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    let mut quote: Option<u8> = None;
    // the indentation of the line that opened a block scalar
    let mut block_scalar: Option<usize> = None;
    for (n, raw) in text.split('\n').enumerate() {
        let line = raw.as_bytes();
        let indent = line.iter().take_while(|b| **b == b' ').count();
        let content = &line[indent..];
        let blank = content.iter().all(|b| b.is_ascii_whitespace());
        if let Some(parent) = block_scalar {
            if blank || indent > parent {
                continue;
            }
            block_scalar = None;
        }
        let mut at = indent;
        let mut depth = indents.len();
        if flow == 0 && quote.is_none() {
            if blank || content.first() == Some(&b'#') {
                continue;
            }
            while indents.last().is_some_and(|top| *top >= indent) {
                indents.pop();
            }
            indents.push(indent);
            depth = indents.len();
            if depth > MAX_NESTING {
                return Err((n + 1, indent + 1));
            }
            // compact nested nodes: `- - x`, `- ? x`
            while at < line.len()
                && matches!(line[at], b'-' | b'?' | b':')
                && line.get(at + 1).is_none_or(|b| *b == b' ')
            {
                depth += 1;
                at += 1;
                while line.get(at) == Some(&b' ') {
                    at += 1;
                }
                if depth > MAX_NESTING {
                    return Err((n + 1, at));
                }
            }
        }
        let mut last_token_start = at;
        let mut i = at;
        while i < line.len() {
            let c = line[i];
            match quote {
                Some(b'"') if c == b'\\' => i += 1,
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None => {
                    let prev = if i == 0 { b' ' } else { line[i - 1] };
                    let token_start = matches!(prev, b' ' | b'\t' | b'[' | b'{' | b',' | b':');
                    if c == b' ' || c == b'\t' {
                        last_token_start = i + 1;
                    }
                    match c {
                        b'#' if prev == b' ' || prev == b'\t' || i == 0 => break,
                        b'"' | b'\'' if token_start => quote = Some(c),
                        b'[' | b'{' => {
                            flow += 1;
                            if depth + flow > MAX_NESTING {
                                return Err((n + 1, i + 1));
                            }
                        }
                        b']' | b'}' => flow = flow.saturating_sub(1),
                        _ => {}
                    }
                }
            }
            i += 1;
        }
        // `key: |`, `- >-`: the lines below are text, not structure
        if flow == 0 && quote.is_none() {
            let end = line[..i]
                .iter()
                .rposition(|b| !b.is_ascii_whitespace())
                .map_or(0, |p| p + 1);
            let token = &line[last_token_start.min(end)..end];
            if matches!(token.first(), Some(b'|' | b'>'))
                && token[1..]
                    .iter()
                    .all(|b| b.is_ascii_digit() || *b == b'+' || *b == b'-')
            {
                block_scalar = Some(indent);
            }
        }
    }
    Ok(())
}

fn parse_source(path: PathBuf, text: String) -> Result<Source, ConfigError> {
    if text.len() > MAX_FILE_SIZE {
        return Err(ConfigError::TooLarge(path.display().to_string()));
    }
    if let Err((line, column)) = check_nesting(&text) {
        return Err(ConfigError::At {
            file: path.display().to_string(),
            line,
            column,
            message: format!("nesting deeper than {MAX_NESTING} levels; refused before parsing"),
        });
    }
    let parsed: FileConfig = if text.trim().is_empty() {
        FileConfig::default()
    } else {
        serde_yaml::from_str(&text).map_err(|e| {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((1, 1));
            ConfigError::At {
                file: path.display().to_string(),
                line,
                column,
                // the parser's message repeats the position; keep only the reason
                message: strip_position(&e.to_string()),
            }
        })?
    };
    Ok(Source { path, text, parsed })
}

fn strip_position(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && valid_hostname(s))
        .unwrap_or_else(|| "mailgate.localdomain".to_string())
}

fn valid_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn build(sources: &[Source]) -> Result<Config, ConfigError> {
    // process-wide settings: at most one file may set each
    let mut hostname: Option<(String, usize)> = None;
    let mut grace = Duration::from_secs(30);
    let mut max_inflight_data = 512 * 1024 * 1024;
    for (i, s) in sources.iter().enumerate() {
        if let Some(server) = &s.parsed.server {
            if let Some(h) = &server.hostname {
                if let Some((_, j)) = hostname {
                    return Err(s.err(
                        &["hostname"],
                        format!(
                            "server.hostname is already set in {}",
                            sources[j].path.display()
                        ),
                    ));
                }
                if !valid_hostname(h) {
                    return Err(s.err(
                        &["hostname", h],
                        format!("server.hostname {h:?} is not a valid host name"),
                    ));
                }
                hostname = Some((h.clone(), i));
            }
            if let Some(g) = server.shutdown_grace {
                grace = g.0;
            }
            if let Some(b) = server.max_inflight_data {
                if b.0 < 1024 * 1024 {
                    return Err(s.err(
                        &["max_inflight_data"],
                        "server.max_inflight_data must be at least 1MiB",
                    ));
                }
                max_inflight_data = b.0;
            }
        }
    }
    let hostname = hostname.map(|h| h.0).unwrap_or_else(system_hostname);

    // backends and policies: names unique across files
    let mut backends: BTreeMap<String, (Arc<Backend>, usize)> = BTreeMap::new();
    let mut policies: BTreeMap<String, (Arc<PolicySpec>, usize)> = BTreeMap::new();
    let mut certificates = Vec::new();
    for (i, s) in sources.iter().enumerate() {
        for (name, b) in &s.parsed.backends {
            if let Some((_, j)) = backends.get(name) {
                return Err(s.err_key(
                    "backends",
                    name,
                    format!(
                        "backend {name:?} is also defined in {}",
                        sources[*j].path.display()
                    ),
                ));
            }
            if !b.address.contains(':')
                || b.address
                    .rsplit_once(':')
                    .and_then(|(_, p)| p.parse::<u16>().ok())
                    .is_none()
            {
                return Err(s.err(
                    &["backends", name, &b.address],
                    format!("backends.{name}.address {:?} must be host:port", b.address),
                ));
            }
            if let Some(h) = &b.helo_name {
                if !valid_hostname(h) {
                    return Err(s.err(
                        &[name, h],
                        format!("backends.{name}.helo_name {h:?} is not a valid host name"),
                    ));
                }
            }
            let tls = match b.tls {
                None | Some(file::BackendTlsFile::None) => None,
                Some(mode) => {
                    let host = b.server_name.clone().unwrap_or_else(|| {
                        let h = b
                            .address
                            .rsplit_once(':')
                            .map(|x| x.0)
                            .unwrap_or(&b.address);
                        h.trim_start_matches('[').trim_end_matches(']').to_string()
                    });
                    let server_name = rustls::pki_types::ServerName::try_from(host.clone())
                        .map_err(|_| {
                            s.err(
                                &["backends", name],
                                format!("backends.{name}: {host:?} is not a valid TLS server name"),
                            )
                        })?;
                    let ca = b.ca.as_ref().map(|c| s.resolve(c));
                    let cfg = crate::backend::stream::client_config(
                        ca.as_deref(),
                        b.pin_sha256.as_deref().unwrap_or(&[]),
                    )
                    .map_err(|e| {
                        s.err(
                            &["backends", name, "tls"],
                            format!("backends.{name}.tls: {e}"),
                        )
                    })?;
                    Some(Arc::new(crate::backend::stream::BackendTls {
                        mode: if mode == file::BackendTlsFile::Starttls {
                            crate::backend::stream::BackendTlsMode::Starttls
                        } else {
                            crate::backend::stream::BackendTlsMode::Implicit
                        },
                        connector: tokio_rustls::TlsConnector::from(cfg),
                        server_name,
                    }))
                }
            };
            let backend = Backend {
                tls,
                name: name.clone(),
                address: b.address.clone(),
                helo_name: b.helo_name.clone().unwrap_or_else(|| hostname.clone()),
                xclient: b
                    .identity
                    .as_ref()
                    .is_some_and(|v| v.contains(&IdentityMethod::Xclient)),
                proxy_v2: b
                    .identity
                    .as_ref()
                    .is_some_and(|v| v.contains(&IdentityMethod::ProxyV2)),
                identity_optional: b.identity_optional.unwrap_or(false),
            };
            backends.insert(name.clone(), (Arc::new(backend), i));
        }
        for (name, p) in &s.parsed.policies {
            if let Some((_, j)) = policies.get(name) {
                return Err(s.err_key(
                    "policies",
                    name,
                    format!(
                        "policy {name:?} is also defined in {}",
                        sources[*j].path.display()
                    ),
                ));
            }
            policies.insert(name.clone(), (Arc::new(build_policy(s, name, p)?), i));
        }
        if let Some(tls) = &s.parsed.tls {
            for c in &tls.certificates {
                certificates.push((s.resolve(&c.cert), s.resolve(&c.key)));
            }
        }
    }

    let mut metrics_bind = None;
    for s in sources {
        if let Some(m) = &s.parsed.metrics {
            if metrics_bind.is_some() {
                return Err(s.err(&["metrics"], "metrics is set in more than one file"));
            }
            metrics_bind = Some(m.bind.parse::<SocketAddr>().map_err(|_| {
                s.err(
                    &["metrics", &m.bind],
                    format!("metrics.bind {:?} must be IP:port", m.bind),
                )
            })?);
        }
    }
    let mut dns = None;
    for s in sources {
        if let Some(d) = &s.parsed.dns {
            if dns.is_some() {
                return Err(s.err(&["dns"], "dns is set in more than one file"));
            }
            dns = Some(
                d.to_settings()
                    .map_err(|e| s.err(&["dns"], format!("dns: {e}")))?,
            );
        }
    }
    let mut listeners: Vec<Arc<Listener>> = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (i, s) in sources.iter().enumerate() {
        for l in &s.parsed.listeners {
            if let Some(j) = seen.get(&l.name) {
                return Err(s.err(
                    &["name", &l.name],
                    format!(
                        "listener {:?} is also defined in {}",
                        l.name,
                        sources[*j].path.display()
                    ),
                ));
            }
            seen.insert(l.name.clone(), i);
            let listener = build_listener(s, l, &hostname, &backends, &policies)?;
            if let Some(other) = listeners
                .iter()
                .find(|o| o.bind == listener.bind && o.bind.port() != 0)
            {
                return Err(s.err(
                    &[&l.name, &l.bind],
                    format!(
                        "listener {:?} binds {} which listener {:?} already uses",
                        l.name, listener.bind, other.name
                    ),
                ));
            }
            if listener.tls != TlsMode::None && certificates.is_empty() {
                return Err(s.err(
                    &[&l.name, "tls"],
                    format!(
                        "listener {:?} uses TLS but tls.certificates is empty",
                        l.name
                    ),
                ));
            }
            listeners.push(Arc::new(listener));
        }
    }
    if listeners.is_empty() {
        let s = &sources[0];
        return Err(s.err(&[], "no listeners defined (listeners: [...])"));
    }
    Ok(Config {
        listeners,
        certificates,
        backends: backends.into_iter().map(|(k, v)| (k, v.0)).collect(),
        policies: policies.into_iter().map(|(k, v)| (k, v.0)).collect(),
        metrics_bind,
        dns: dns.unwrap_or_default(),
        shutdown_grace: grace,
        sources: sources.iter().map(|s| s.path.clone()).collect(),
        max_inflight_data,
    })
}

fn build_policy(s: &Source, name: &str, p: &PolicyFile) -> Result<PolicySpec, ConfigError> {
    let mut rules: Vec<RuleSpec> = Vec::new();
    for (i, r) in p.limits.iter().enumerate() {
        let rname = r.name.clone().unwrap_or_else(|| format!("rule-{}", i + 1));
        let at = |msg: String| {
            s.err_key(
                "policies",
                name,
                format!("policies.{name}.limits[{}] ({rname}): {msg}", i + 1),
            )
        };
        let at_field = |field: &str, msg: String| {
            let e = s.err(
                &["policies", name, "limits", field],
                format!("policies.{name}.limits[{}] ({rname}).{field}: {msg}", i + 1),
            );
            e
        };
        if rules.iter().any(|o| o.name == rname) {
            return Err(at(format!("rule name {rname:?} is used twice")));
        }
        if r.key.is_empty() {
            return Err(at_field("key", "must name at least one of ip, ip_prefix, helo, sender, sender_domain, rcpt, rcpt_domain, auth_user, listener".into()));
        }
        let burst_of = |count: u32| r.burst.unwrap_or(count);
        let mut kinds = Vec::new();
        if let Some(v) = r.rate {
            kinds.push(Kind::Rate {
                count: v.count,
                period: v.period,
                burst: burst_of(v.count),
            });
        }
        if let Some(n) = r.concurrent {
            kinds.push(Kind::Concurrent(n));
        }
        if let Some(v) = r.messages {
            kinds.push(Kind::Messages {
                count: v.count,
                period: v.period,
                burst: burst_of(v.count),
            });
        }
        if let Some(v) = r.recipients {
            kinds.push(Kind::Recipients {
                count: v.count,
                period: v.period,
                burst: burst_of(v.count),
            });
        }
        if let Some(v) = r.auth_failures {
            kinds.push(Kind::AuthFailures {
                count: v.count,
                window: v.period,
            });
        }
        if let Some(n) = r.recipients_per_message {
            kinds.push(Kind::RecipientsPerMessage(n));
        }
        if kinds.len() != 1 {
            return Err(at("set exactly one of rate, concurrent, messages, recipients, auth_failures, recipients_per_message".into()));
        }
        let kind = kinds.remove(0);
        if r.burst == Some(0) {
            return Err(at_field("burst", "must be at least 1".into()));
        }
        if matches!(kind, Kind::Concurrent(0) | Kind::RecipientsPerMessage(0)) {
            return Err(at("the limit must be at least 1".into()));
        }
        use file::KeyPart as K;
        let allowed: &[K] = match kind {
            Kind::Concurrent(_) => &[K::Ip, K::IpPrefix, K::Listener],
            Kind::AuthFailures { .. } => &[K::Ip, K::IpPrefix, K::AuthUser, K::Listener],
            Kind::Messages { .. } => &[
                K::Ip,
                K::IpPrefix,
                K::Listener,
                K::Helo,
                K::AuthUser,
                K::Sender,
                K::SenderDomain,
            ],
            _ => &[
                K::Ip,
                K::IpPrefix,
                K::Listener,
                K::Helo,
                K::AuthUser,
                K::Sender,
                K::SenderDomain,
                K::Rcpt,
                K::RcptDomain,
            ],
        };
        if let Some(k) = r.key.iter().find(|k| !allowed.contains(k)) {
            return Err(at_field(
                "key",
                format!("{} is not known where this limit is counted", k.as_str()),
            ));
        }
        let prefix_v4 = r.prefix_v4.unwrap_or(24);
        let prefix_v6 = r.prefix_v6.unwrap_or(56);
        if prefix_v4 > 32 || prefix_v6 > 128 {
            return Err(at("prefix_v4 must be ≤ 32 and prefix_v6 ≤ 128".into()));
        }
        let ipv6_prefix = r.ipv6_prefix.unwrap_or(64);
        if ipv6_prefix > 128 {
            return Err(at_field("ipv6_prefix", "must be ≤ 128".into()));
        }
        let action = r.action.unwrap_or(policy::action::Action::Tempfail);
        if matches!(kind, Kind::Concurrent(_)) && action == policy::action::Action::Delay {
            // a tarpit admits the session afterwards without a slot: no limit at all
            let mut at = vec!["policies", name, "limits"];
            if let Some(n) = &r.name {
                at.push(n);
            }
            at.extend(["concurrent", "delay"]);
            return Err(s.err(
                &at,
                format!(
                    "policies.{name}.limits[{}] ({rname}): concurrent limits cannot use action: delay (the session would be admitted uncounted); use tempfail or reject",
                    i + 1
                ),
            ));
        }
        if matches!(
            action,
            policy::action::Action::Accept | policy::action::Action::Tag
        ) {
            return Err(at_field(
                "action",
                "a limit's action is tempfail, reject, delay or shadow".into(),
            ));
        }
        rules.push(RuleSpec {
            name: rname,
            key: r.key.clone(),
            kind,
            action,
            prefix_v4,
            prefix_v6,
            max_delay: r
                .max_delay
                .map(|d| d.0)
                .unwrap_or(Duration::from_secs(5))
                .min(Duration::from_secs(60)),
            ipv6_prefix,
        });
    }
    let mut allow = Vec::new();
    for a in &p.allow {
        allow.push(match a {
            AllowFile::Network(n) => AllowSpec {
                networks: vec![*n],
                skip: vec![],
            },
            AllowFile::Entry(e) => {
                if let Some(bad) = e.skip.iter().find(|n| !rules.iter().any(|r| &r.name == *n)) {
                    return Err(s.err(
                        &["policies", name, "allow", bad],
                        format!("policies.{name}.allow: no limit named {bad:?}"),
                    ));
                }
                AllowSpec {
                    networks: e.networks.clone(),
                    skip: e.skip.clone(),
                }
            }
        });
    }
    let auth = if p.spf.is_some()
        || p.dkim.is_some()
        || p.dmarc.is_some()
        || p.arc.is_some()
        || p.authserv_id.is_some()
    {
        let a = crate::auth::AuthPolicy {
            authserv_id: p.authserv_id.clone().unwrap_or_default(),
            spf: p.spf.clone(),
            dkim: p.dkim.clone(),
            dmarc: p.dmarc.clone(),
            arc: p.arc.clone(),
        };
        Some(a)
    } else {
        None
    };
    if let Some(a) = &auth {
        if !a.authserv_id.is_empty() {
            a.validate().map_err(|e| {
                s.err(
                    &["policies", name, "authserv_id"],
                    format!("policies.{name}: {e}"),
                )
            })?;
        }
    }
    Ok(PolicySpec {
        name: name.to_string(),
        auth,
        deny: p.deny.clone(),
        allow,
        rules,
        max_tracked_keys: p.max_tracked_keys.unwrap_or(100_000).clamp(16, 10_000_000),
        known_good: p
            .known_good
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(30 * 86_400)),
    })
}

fn build_listener(
    s: &Source,
    l: &ListenerFile,
    hostname: &str,
    backends: &BTreeMap<String, (Arc<Backend>, usize)>,
    policies: &BTreeMap<String, (Arc<PolicySpec>, usize)>,
) -> Result<Listener, ConfigError> {
    let name = &l.name;
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(s.err(
            &["name", name],
            format!("listener name {name:?}: use letters, digits, - and _"),
        ));
    }
    let bind: SocketAddr = l.bind.parse().map_err(|_| {
        s.err(
            &[name, &l.bind],
            format!(
                "listeners.{name}.bind {:?} must be IP:port, e.g. \"0.0.0.0:25\"",
                l.bind
            ),
        )
    })?;
    let backend = backends
        .get(&l.backend)
        .map(|b| b.0.clone())
        .ok_or_else(|| {
            s.err(
                &[name, &l.backend],
                format!(
                    "listeners.{name}.backend {:?} is not defined under backends:",
                    l.backend
                ),
            )
        })?;
    let policy = match &l.policy {
        None => None,
        Some(p) => Some(policies.get(p).map(|p| p.0.clone()).ok_or_else(|| {
            s.err(
                &[name, p],
                format!("listeners.{name}.policy {p:?} is not defined under policies:"),
            )
        })?),
    };
    let auth = l.auth.unwrap_or(AuthMode::None);
    if auth != AuthMode::None && (l.protocol != Protocol::Smtp || l.tls == TlsMode::None) {
        return Err(s.err(&[name, "auth"], format!(
            "listeners.{name}.auth applies to smtp listeners with tls: starttls or implicit (credentials only over TLS)")));
    }
    if l.protocol == Protocol::Pop3
        && backend
            .tls
            .as_ref()
            .is_some_and(|t| t.mode == crate::backend::stream::BackendTlsMode::Starttls)
    {
        return Err(s.err(&[name, &l.backend], format!(
            "listeners.{name}: backend {:?} uses tls: starttls, which is supported for SMTP backends only (use implicit)", l.backend)));
    }
    if let Some(h) = &l.hostname {
        if !valid_hostname(h) {
            return Err(s.err(
                &[name, h],
                format!("listeners.{name}.hostname {h:?} is not a valid host name"),
            ));
        }
    }
    let require_tls = match (l.tls, l.require_tls, l.protocol) {
        (TlsMode::None, Some(true), _) => {
            return Err(s.err(
                &[name, "require_tls"],
                format!("listeners.{name}: require_tls needs tls: starttls or implicit"),
            ))
        }
        (TlsMode::Implicit, _, _) => true,
        (_, Some(v), _) => v,
        // RFC 8314 / DESIGN §4: no POP3 login before TLS unless explicitly allowed
        (TlsMode::Starttls, None, Protocol::Pop3) => true,
        (_, None, _) => false,
    };
    if l.apop == Some(true) && l.protocol != Protocol::Pop3 {
        return Err(s.err(
            &[name, "apop"],
            format!("listeners.{name}.apop applies to pop3 listeners only"),
        ));
    }
    let checked = |v: Option<usize>, def: usize, min: usize, max: usize, field: &str| {
        let v = v.unwrap_or(def);
        if v < min || v > max {
            Err(s.err(
                &[name, field],
                format!("listeners.{name}.{field} must be between {min} and {max}"),
            ))
        } else {
            Ok(v)
        }
    };
    let t = &l.timeouts;
    let d = |v: Option<units::Secs>, def: u64| v.map(|s| s.0).unwrap_or(Duration::from_secs(def));
    let max_message_size = l.max_message_size.map(|b| b.0).unwrap_or(25 * 1024 * 1024);
    if l.apop_prelogin_timeout.is_some_and(|t| t.0.is_zero()) {
        return Err(s.err(
            &[name, "apop_prelogin_timeout"],
            format!("listeners.{name}.apop_prelogin_timeout must be more than 0s"),
        ));
    }
    if max_message_size < 1024 {
        return Err(s.err(
            &[name, "max_message_size"],
            format!("listeners.{name}.max_message_size must be at least 1KiB"),
        ));
    }
    Ok(Listener {
        name: name.clone(),
        protocol: l.protocol,
        bind,
        tls: l.tls,
        require_tls,
        backend,
        policy,
        auth,
        proxy_trusted: l.proxy_protocol.as_ref().map(|p| {
            (
                p.trusted.clone(),
                p.timeout.map(|t| t.0).unwrap_or(Duration::from_secs(5)),
            )
        }),
        hostname: l.hostname.clone().unwrap_or_else(|| hostname.to_string()),
        max_connections: checked(l.max_connections, 1000, 1, 1_000_000, "max_connections")?,
        max_message_size,
        max_recipients: checked(l.max_recipients, 100, 1, 100_000, "max_recipients")?,
        max_errors: checked(
            l.max_errors.map(|v| v as usize),
            10,
            1,
            10_000,
            "max_errors",
        )? as u32,
        bare_newlines: l.bare_newlines.unwrap_or(BareNewlines::Reject),
        max_command_line: checked(l.max_command_line, 512, 512, 65536, "max_command_line")?,
        max_text_line: checked(l.max_text_line, 1000, 1000, 1_048_576, "max_text_line")?,
        apop: l.apop.unwrap_or(false),
        max_login_failures: checked(
            l.max_login_failures.map(|v| v as usize),
            3,
            1,
            100,
            "max_login_failures",
        )? as u32,
        login_failure_delay: l
            .login_failure_delay
            .map(|s| s.0)
            .unwrap_or(Duration::from_secs(2)),
        timeouts: Timeouts {
            tls_handshake: d(t.tls_handshake, 10),
            command: d(t.command, 300),
            data: d(t.data, 180),
            session: d(t.session, 3600),
            backend_connect: d(t.backend_connect, 10),
            backend_reply: d(t.backend_reply, 300),
            backend_data: d(t.backend_data, 600),
            idle: d(t.idle, 600),
        },
        max_transactions: checked(
            l.max_transactions.map(|v| v as usize),
            100,
            1,
            1_000_000,
            "max_transactions",
        )? as u32,
        proxy_allow_local: l
            .proxy_protocol
            .as_ref()
            .and_then(|p| p.allow_local)
            .unwrap_or(false),
        apop_max_pending: checked(l.apop_max_pending, 50, 1, 100_000, "apop_max_pending")?,
        apop_prelogin_timeout: d(l.apop_prelogin_timeout, 10),
    })
}

/// The JSON Schema of the configuration format (`mailgate schema`).
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(FileConfig);
    serde_json::to_string_pretty(&schema).unwrap_or_default()
}

impl Config {
    /// The human summary `mailgate check` prints.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "configuration OK ({} file(s))", self.sources.len());
        for s in &self.sources {
            let _ = writeln!(out, "  file {}", s.display());
        }
        for l in &self.listeners {
            let proto = match l.protocol {
                Protocol::Smtp => "smtp",
                Protocol::Pop3 => "pop3",
            };
            let tls = match l.tls {
                TlsMode::None => "none",
                TlsMode::Starttls => "starttls",
                TlsMode::Implicit => "implicit",
            };
            let _ = writeln!(
                out,
                "listener {} {} on {} tls={} require_tls={} -> backend {} ({}) policy={} max_connections={}",
                l.name, proto, l.bind, tls, l.require_tls, l.backend.name, l.backend.address,
                l.policy.as_ref().map(|p| p.name.as_str()).unwrap_or("-"), l.max_connections
            );
            if l.protocol == Protocol::Smtp {
                let _ = writeln!(
                    out,
                    "  max_message_size={} max_recipients={} bare_newlines={:?} max_errors={}",
                    l.max_message_size, l.max_recipients, l.bare_newlines, l.max_errors
                );
                let _ = writeln!(
                    out,
                    "  max_transactions={} max_login_failures={}",
                    l.max_transactions, l.max_login_failures
                );
            } else {
                let _ = writeln!(
                    out,
                    "  apop={} max_login_failures={} login_failure_delay={:?}",
                    l.apop, l.max_login_failures, l.login_failure_delay
                );
                if l.apop {
                    let _ = writeln!(
                        out,
                        "  apop_max_pending={} apop_prelogin_timeout={:?}",
                        l.apop_max_pending, l.apop_prelogin_timeout
                    );
                }
            }
            if let Some(p) = &l.policy {
                let _ = writeln!(out, "  policy {} (evaluation order):", p.name);
                let d = p.describe();
                if d.is_empty() {
                    let _ = writeln!(out, "    (no rules)");
                }
                out.push_str(&d);
            }
        }
        for (cert, key) in &self.certificates {
            let _ = writeln!(
                out,
                "certificate {} (key {})",
                cert.display(),
                key.display()
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listeners:
  - { name: mx, protocol: smtp, bind: "127.0.0.1:2525", tls: starttls, require_tls: false, backend: legacy-smtp, policy: inbound }
  - { name: smtps, protocol: smtp, bind: "127.0.0.1:4465", tls: implicit, backend: legacy-smtp }
tls:
  certificates: [ { cert: certs/dev.pem, key: certs/dev.key } ]
backends:
  legacy-smtp: { address: "127.0.0.1:10025" }
policies:
  inbound: { deny: ["192.0.2.0/24"] }
"#;

    #[test]
    fn schema_names_the_contract_fields() {
        let s = json_schema();
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert!(v.to_string().contains("require_tls"));
        assert!(v.to_string().contains("auth_failures"));
        assert!(v.to_string().contains("recipients_per_message"));
    }

    #[test]
    fn contract_example_loads() {
        let c = load_str("t.yaml", GOOD).unwrap();
        assert_eq!(c.listeners.len(), 2);
        assert!(!c.listeners[0].require_tls);
        assert!(c.listeners[1].require_tls, "implicit TLS always is TLS");
        assert_eq!(c.listeners[0].backend.address, "127.0.0.1:10025");
        assert_eq!(c.listeners[0].max_command_line, 512);
        assert_eq!(c.listeners[0].policy.as_ref().unwrap().deny.len(), 1);
        assert_eq!(c.certificates[0].0, PathBuf::from("certs/dev.pem"));
    }

    fn err(text: &str) -> String {
        load_str("bad.yaml", text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_field_has_position() {
        let e = err("listeners:\n  - { name: mx, protocol: smtp, bind: \"127.0.0.1:25\", tls: none, backend: b, colour: red }\n");
        assert!(e.starts_with("bad.yaml:2:"), "{e}");
        assert!(e.contains("colour"), "{e}");
    }

    #[test]
    fn unknown_backend_is_located() {
        let e = err("backends:\n  a: { address: \"127.0.0.1:1\" }\nlisteners:\n  - { name: mx, protocol: smtp, bind: \"127.0.0.1:25\", tls: none, backend: nosuch }\n");
        assert!(e.starts_with("bad.yaml:4:"), "{e}");
        assert!(e.contains("nosuch"), "{e}");
    }

    #[test]
    fn bad_values() {
        let base = "backends:\n  a: { address: \"127.0.0.1:1\" }\nlisteners:\n  - { name: mx, protocol: smtp, bind: \"127.0.0.1:25\", tls: none, backend: a";
        assert!(err(&format!("{base}, tls: sometimes }}\n")).contains("bad.yaml:4:"));
        assert!(err(&format!("{base}, max_message_size: 12 parsecs }}\n")).contains("invalid size"));
        assert!(err(&format!("{base}, require_tls: true }}\n")).contains("require_tls"));
        assert!(err(&format!("{base}, policy: nope }}\n")).contains("policy"));
        assert!(err(&format!("{base}, max_command_line: 10 }}\n")).contains("max_command_line"));
        assert!(err("listeners: [ { name: x } ]\n").contains("missing field"));
        assert!(err("backends:\n  a: { address: \"nowhere\" }\n").contains("host:port"));
        assert!(err("{}\n").contains("no listeners"));
        assert!(err("listeners: [\n").starts_with("bad.yaml:"));
    }

    const POLICY_BASE: &str = "backends:\n  a: { address: \"127.0.0.1:1\" }\nlisteners:\n  - { name: mx, protocol: smtp, bind: \"127.0.0.1:25\", tls: none, backend: a, policy: p }\npolicies:\n  p:\n    limits:\n      - { key: [ip], rate: 5/minute }\n";

    #[test]
    fn concurrent_with_delay_is_refused_with_position() {
        let e = err(&format!(
            "{POLICY_BASE}      - {{ name: slots, key: [ip], concurrent: 3, action: delay }}\n"
        ));
        assert!(e.starts_with("bad.yaml:9:"), "{e}");
        assert!(e.contains("concurrent") && e.contains("delay"), "{e}");
    }

    #[test]
    fn check_summary_says_how_ip_keys_group() {
        let c = load_str("p.yaml", POLICY_BASE).unwrap();
        let s = c.summary();
        assert!(s.contains("ip=IPv4 /32, IPv6 /64"), "{s}");
        let per_address = POLICY_BASE.replace("rate: 5/minute", "rate: 5/minute, ipv6_prefix: 128");
        let c = load_str("p.yaml", &per_address).unwrap();
        assert!(c.summary().contains("ip=IPv4 /32, IPv6 /128"));
        let e = err(&POLICY_BASE.replace("rate: 5/minute", "rate: 5/minute, ipv6_prefix: 129"));
        assert!(
            e.starts_with("bad.yaml:8:") && e.contains("ipv6_prefix"),
            "{e}"
        );
    }

    /// Issue 12.6: rates are typed values, located like every other value,
    /// and their periods are bounded as durations are (a period beyond what
    /// the limiter holds in u64 nanoseconds panicked when policies compiled).
    #[test]
    fn rates_are_typed_and_bounded() {
        let c = load_str(
            "r.yaml",
            &POLICY_BASE.replace("rate: 5/minute", "auth_failures: 5/1hour"),
        )
        .unwrap();
        let rule = &c.policies["p"].rules[0];
        assert_eq!(
            rule.kind,
            Kind::AuthFailures {
                count: 5,
                window: Duration::from_secs(3600)
            }
        );
        for bad in ["5/fortnight", "0/minute", "5", "5/0s"] {
            let e = err(&POLICY_BASE.replace("5/minute", bad));
            assert!(e.starts_with("bad.yaml:8:28:"), "{bad}: {e}");
        }
        let text = POLICY_BASE.replace("5/minute", "1/300000days");
        let loaded = load_str("huge.yaml", &text);
        if let Ok(c) = &loaded {
            // what the server does with a loaded configuration
            crate::policy::Policies::compile(&c.policies, &crate::policy::PolicyState::new());
        }
        let e = loaded.unwrap_err().to_string();
        assert!(
            e.starts_with("huge.yaml:8:28:") && e.contains("too long"),
            "{e}"
        );
    }

    #[test]
    fn tls_needs_a_certificate() {
        let e = err("backends:\n  a: { address: \"127.0.0.1:1\" }\nlisteners:\n  - { name: mx, protocol: smtp, bind: \"127.0.0.1:25\", tls: starttls, backend: a }\n");
        assert!(e.contains("tls.certificates"), "{e}");
    }

    #[test]
    fn pop3_starttls_requires_tls_by_default() {
        let c = load_str("p.yaml", "tls: { certificates: [ { cert: c, key: k } ] }\nbackends:\n  p: { address: \"127.0.0.1:110\" }\nlisteners:\n  - { name: pop, protocol: pop3, bind: \"127.0.0.1:1110\", tls: starttls, backend: p }\n").unwrap();
        assert!(c.listeners[0].require_tls);
    }

    #[test]
    fn directory_merge_and_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("10-backends.yaml"),
            "backends:\n  a: { address: \"127.0.0.1:1\" }\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("20-listeners.yaml"), "listeners:\n  - { name: mx, protocol: smtp, bind: \"127.0.0.1:25\", tls: none, backend: a }\n").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let c = load(dir.path()).unwrap();
        assert_eq!(c.sources.len(), 2);
        std::fs::write(
            dir.path().join("30-dup.yaml"),
            "backends:\n  a: { address: \"127.0.0.1:2\" }\n",
        )
        .unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("30-dup.yaml:2:") && e.contains("10-backends.yaml"),
            "{e}"
        );
    }

    #[test]
    fn inflight_budget_and_transaction_cap() {
        let base = "backends:\n  a: { address: \"127.0.0.1:1\" }\nlisteners:\n  - { name: mx, protocol: smtp, bind: \"127.0.0.1:25\", tls: none, backend: a";
        let c = load_str("d.yaml", &format!("{base} }}\n")).unwrap();
        assert_eq!(c.max_inflight_data, 512 * 1024 * 1024);
        assert_eq!(c.listeners[0].max_transactions, 100);
        assert_eq!(c.listeners[0].max_login_failures, 3);
        let c = load_str(
            "s.yaml",
            &format!("server: {{ max_inflight_data: 64MiB }}\n{base}, max_transactions: 7 }}\n"),
        )
        .unwrap();
        assert_eq!(c.max_inflight_data, 64 * 1024 * 1024);
        assert_eq!(c.listeners[0].max_transactions, 7);
        assert!(c.summary().contains("max_transactions=7"));
        let e = load_str(
            "t.yaml",
            &format!("server: {{ max_inflight_data: 1KiB }}\n{base} }}\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("max_inflight_data must be at least 1MiB"), "{e}");
        let e = load_str("u.yaml", &format!("{base}, max_transactions: 0 }}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_transactions must be between"), "{e}");
    }

    /// Issue 19.10: nesting is capped before the YAML parser sees the text
    /// (its time grows quadratically with depth); the error names the file
    /// and the line.
    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        let n = 50_000;
        let flow = format!(
            "backends: {{}}\nlisteners: {}{}\n",
            "[".repeat(n),
            "]".repeat(n)
        );
        let e = err(&flow);
        assert!(e.starts_with("bad.yaml:2:") && e.contains("nest"), "{e}");
        let block = format!("listeners:\n  {}x\n", "- ".repeat(n));
        let e = err(&block);
        assert!(e.starts_with("bad.yaml:2:") && e.contains("nest"), "{e}");
        // ordinary depth is fine, brackets inside quotes and comments do not count
        let quoted = format!(
            "{GOOD}# {}\nserver: {{ hostname: \"{}\" }}\n",
            "[".repeat(100),
            "x"
        );
        load_str("ok.yaml", &quoted).unwrap();
        let text = format!("a: |\n  {}\nb: '{}'\n", "[".repeat(100), "{".repeat(100));
        assert_eq!(check_nesting(&text), Ok(()));
        let stairs: String = (0..70)
            .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
            .collect();
        assert_eq!(check_nesting(&stairs).map_err(|e| e.0), Err(65));
    }

    /// Issue 19.10: a file over 1 MiB is refused before it is parsed.
    #[test]
    fn oversized_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("huge.yaml");
        let mut text = GOOD.to_string();
        while text.len() <= 1 << 20 {
            text.push_str("# padding padding padding padding padding padding padding\n");
        }
        std::fs::write(&f, &text).unwrap();
        let e = load(&f).unwrap_err().to_string();
        assert!(e.contains("huge.yaml") && e.contains("1 MiB"), "{e}");
        let e = load_str("inline.yaml", &text).unwrap_err().to_string();
        assert!(e.contains("inline.yaml") && e.contains("1 MiB"), "{e}");
    }
}
