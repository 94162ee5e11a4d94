//! Reading the configuration: which files a path stands for, the size and
//! nesting caps checked before the YAML parser, and the merge of several
//! files into one [`Config`] (process-wide settings set once, names unique
//! across files), with the [`Source`] text that locates every error.

use super::backend::build_backend;
use super::file::FileConfig;
use super::listener::{build_listener, Listener};
use super::policy::build_policy;
use super::{defaults, Config, ConfigError, TlsMode};
use crate::backend::Backend;
use crate::policy::PolicySpec;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The largest configuration file read (real ones are a few KiB): the YAML
/// parser's time grows faster than the text.
pub const MAX_FILE_SIZE: usize = 1 << 20;
/// The deepest nesting accepted (real configurations nest five or six
/// levels); checked by [`check_nesting`] before the parser, whose time grows
/// with the square of the depth.
pub const MAX_NESTING: usize = 64;

/// One file: its path, its text (to locate errors) and what it parsed to.
pub(super) struct Source {
    pub(super) path: PathBuf,
    text: String,
    pub(super) parsed: FileConfig,
}

impl Source {
    /// file:line:column of the first occurrence of `needles` in order (each searched
    /// after the previous one); falls back to line 1 when not found.
    pub(super) fn err(&self, needles: &[&str], message: impl Into<String>) -> ConfigError {
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
    pub(super) fn err_key(
        &self,
        section: &str,
        key: &str,
        message: impl Into<String>,
    ) -> ConfigError {
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

    pub(super) fn resolve(&self, p: &str) -> PathBuf {
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
    // brackets seen inside what the scan takes for quoted text
    let mut quoted_brackets = 0usize;
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
        // a quote opens a quoted scalar only where a scalar may start (line
        // start, after `[`, `{`, `,`, or `: `): `k: a 'q` is a plain scalar,
        // and mistaking it for a quote would hide what follows from the count
        let mut scalar_start = quote.is_none();
        let mut i = at;
        while i < line.len() {
            let c = line[i];
            // brackets count inside quotes too: a mistaken quote state can
            // then only refuse a harmless file, never let a deep one through
            let bracket_open = matches!(c, b'[' | b'{') && quote.is_some();
            if bracket_open && depth + flow + quoted_brackets + 1 > MAX_NESTING {
                return Err((n + 1, i + 1));
            }
            match quote {
                Some(b'"') if c == b'\\' => i += 1,
                Some(q) if c == q => {
                    quote = None;
                    scalar_start = false;
                }
                Some(_) => match c {
                    b'[' | b'{' => quoted_brackets += 1,
                    b']' | b'}' => quoted_brackets = quoted_brackets.saturating_sub(1),
                    _ => {}
                },
                None => {
                    let prev = if i == 0 { b' ' } else { line[i - 1] };
                    if c == b' ' || c == b'\t' {
                        last_token_start = i + 1;
                        if prev == b':' {
                            scalar_start = true;
                        }
                    }
                    match c {
                        b'#' if prev == b' ' || prev == b'\t' || i == 0 => break,
                        b'"' | b'\'' if scalar_start => quote = Some(c),
                        b'[' | b'{' => {
                            flow += 1;
                            if depth + flow + quoted_brackets > MAX_NESTING {
                                return Err((n + 1, i + 1));
                            }
                        }
                        b']' | b'}' => flow = flow.saturating_sub(1),
                        _ => {}
                    }
                    if c != b' ' && c != b'\t' {
                        scalar_start = matches!(c, b'[' | b'{' | b',');
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

pub(super) fn valid_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

pub(super) fn build(sources: &[Source]) -> Result<Config, ConfigError> {
    // process-wide settings: at most one file may set each
    let mut hostname: Option<(String, usize)> = None;
    let mut grace = defaults::SHUTDOWN_GRACE;
    let mut max_inflight_data = defaults::MAX_INFLIGHT_DATA;
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
    let mut triage = BTreeMap::new();
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
            let backend = build_backend(s, name, b, &hostname)?;
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
            if let Some(t) = &p.triage {
                triage.insert(
                    name.clone(),
                    Arc::new(super::triage::build_triage(s, name, t)?),
                );
            }
        }
        if let Some(tls) = &s.parsed.tls {
            for c in &tls.certificates {
                certificates.push((s.resolve(&c.cert), s.resolve(&c.key)));
            }
        }
    }

    let mut metrics_bind = None;
    let mut admin_token = None;
    for s in sources {
        if let Some(m) = &s.parsed.metrics {
            if metrics_bind.is_some() {
                return Err(s.err(&["metrics"], "metrics is set in more than one file"));
            }
            if let Some(f) = &m.admin_token_file {
                admin_token = Some(read_admin_token(s, f)?);
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
    let state = super::state::build_state(sources)?;
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
    let ids = authserv_ids(&hostname, &listeners, policies.values().map(|p| &*p.0));
    for l in &mut listeners {
        // just built: not shared yet
        if let Some(l) = Arc::get_mut(l) {
            l.authserv_ids = ids.clone();
        }
    }
    Ok(Config {
        listeners,
        certificates,
        backends: backends.into_iter().map(|(k, v)| (k, v.0)).collect(),
        policies: policies.into_iter().map(|(k, v)| (k, v.0)).collect(),
        triage,
        metrics_bind,
        admin_token,
        dns: dns.unwrap_or_default(),
        shutdown_grace: grace,
        sources: sources.iter().map(|s| s.path.clone()).collect(),
        max_inflight_data,
        state,
    })
}

/// `metrics.admin_token_file`: one line of at least 16 visible ASCII
/// characters (it travels in an `Authorization` header). Errors never show
/// the file's content.
fn read_admin_token(
    s: &Source,
    file: &str,
) -> Result<crate::observe::http::AdminToken, ConfigError> {
    let at = |why: String| {
        s.err(
            &["admin_token_file", file],
            format!("metrics.admin_token_file {file:?}: {why}"),
        )
    };
    let path = s.resolve(file);
    let meta = std::fs::metadata(&path).map_err(|e| at(e.to_string()))?;
    if meta.len() > 4096 {
        return Err(at("larger than 4 KiB; a token is one line".into()));
    }
    let text = std::fs::read(&path).map_err(|e| at(e.to_string()))?;
    let token = text.trim_ascii();
    if token.len() < 16 || !token.iter().all(|b| b.is_ascii_graphic()) {
        return Err(at(
            "must hold one token of at least 16 visible ASCII characters (e.g. `openssl rand -hex 32`)"
                .into(),
        ));
    }
    Ok(crate::observe::http::AdminToken::new(token))
}

/// The set for [`Listener::authserv_ids`], sorted, without duplicates.
fn authserv_ids<'a>(
    hostname: &str,
    listeners: &[Arc<Listener>],
    policies: impl Iterator<Item = &'a PolicySpec>,
) -> Arc<[String]> {
    let mut ids: Vec<String> = std::iter::once(hostname)
        .chain(listeners.iter().map(|l| l.hostname.as_str()))
        .chain(policies.filter_map(|p| p.auth.as_ref().map(|a| a.authserv_id.as_str())))
        .map(|id| id.trim().trim_end_matches('.').to_ascii_lowercase())
        .filter(|id| !id.is_empty())
        .collect();
    ids.sort();
    ids.dedup();
    ids.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::fixtures::*;

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

    #[test]
    fn unknown_field_has_position() {
        let e = err("listeners:\n  - { name: mx, protocol: smtp, bind: \"127.0.0.1:25\", tls: none, backend: b, colour: red }\n");
        assert!(e.starts_with("bad.yaml:2:"), "{e}");
        assert!(e.contains("colour"), "{e}");
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
        // ordinary depth is fine, brackets inside comments and block scalars
        // do not count (inside quotes they do: see the test above)
        let quoted = format!(
            "{GOOD}# {}\nserver: {{ hostname: \"{}\" }}\n",
            "[".repeat(100),
            "x"
        );
        load_str("ok.yaml", &quoted).unwrap();
        let text = format!("a: |\n  {}\nb: '{}'\n", "[".repeat(100), "{".repeat(30));
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

    #[test]
    fn quote_inside_a_plain_scalar_does_not_hide_nesting() {
        // `a 'q` is a plain scalar (YAML opens quotes only where a scalar
        // starts): the deep sequence on the next line is real structure
        let deep = format!("k: a 'q\nz: {}{} # '\n", "[".repeat(200), "]".repeat(200));
        assert_eq!(check_nesting(&deep).map_err(|(l, _)| l), Err(2));
        // quotes where scalars start still hide brackets from the flow count,
        // but never more than MAX_NESTING of them
        assert!(check_nesting("k: 'it''s [x'\nl: \"a [b\"\nm: [\"[\", '{']\n").is_ok());
        let hidden = format!("k: '{}'\n", "[".repeat(MAX_NESTING + 1));
        assert!(check_nesting(&hidden).is_err());
    }
}
