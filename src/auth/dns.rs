//! The `dns:` section of the configuration and the resolver built from it.
//!
//! ```yaml
//! dns:
//!   nameservers: ["127.0.0.1:53", "[::1]:53"]   # empty or absent: /etc/resolv.conf
//!   timeout: 5s          # per query attempt
//!   attempts: 2          # tries per query
//!   cache_size: 10000    # cached answers in total; 0 disables the cache
//!   cache_memory: 16MiB  # and at most this much memory (estimated) for them
//!   max_queries_per_session: 500   # DNS queries all checks of one SMTP session may make
//!   max_queries_per_message: 150   # … and of one transaction (SPF at MAIL + message checks)
//! ```
//!
//! A check that would exceed a query budget makes no further query: it ends
//! in `temperror` when the session's budget is spent (a new session may
//! succeed) and in `permerror` when the transaction's is (the same message
//! would spend it again); the policy's action for that result applies.
//!
//! mail-auth always queries fully qualified names (trailing dot), so search
//! domains and `ndots` from resolv.conf never apply. hickory's own response
//! cache is switched off: mail-auth's [`DnsCache`](mail_auth::DnsCache), which
//! holds already-parsed records, is the only cache, so its size bound is the
//! only one an operator has to think about.

use super::AuthError;
use crate::units::{ByteSize, Secs};
use mail_auth::hickory_resolver::config::{
    NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use mail_auth::MessageAuthenticator;
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Default per-attempt query timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default number of attempts per query.
pub const DEFAULT_ATTEMPTS: usize = 2;
/// Default total number of cached answers.
pub const DEFAULT_CACHE_ENTRIES: usize = 10_000;
/// Default bound of the cache's (estimated) memory.
pub const DEFAULT_CACHE_BYTES: usize = 16 << 20;
/// Default DNS queries per SMTP session (all checks of all its transactions).
pub const DEFAULT_QUERIES_PER_SESSION: u32 = 500;
/// Default DNS queries per transaction: SPF at MAIL FROM plus the message
/// checks. SPF alone may need 1 + 10 mechanisms × (1 + 10 MX hosts) + `exp=`
/// (RFC 7208 §4.6.4), the message checks at most 10 keys, 10 ARC sets and a
/// DMARC walk; real mail needs a handful.
pub const DEFAULT_QUERIES_PER_MESSAGE: u32 = 150;

/// Validated DNS settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// Resolvers to ask; empty means the system configuration (resolv.conf).
    pub nameservers: Vec<SocketAddr>,
    /// Timeout of one query attempt.
    pub timeout: Duration,
    /// Attempts per query (at least 1).
    pub attempts: usize,
    /// Total number of cached answers over all record types; 0 disables caching.
    pub cache_entries: usize,
    /// Bound of the cache's estimated memory in bytes.
    pub cache_bytes: usize,
    /// DNS queries one SMTP session may make.
    pub max_queries_per_session: u32,
    /// DNS queries one transaction may make.
    pub max_queries_per_message: u32,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            nameservers: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            attempts: DEFAULT_ATTEMPTS,
            cache_entries: DEFAULT_CACHE_ENTRIES,
            cache_bytes: DEFAULT_CACHE_BYTES,
            max_queries_per_session: DEFAULT_QUERIES_PER_SESSION,
            max_queries_per_message: DEFAULT_QUERIES_PER_MESSAGE,
        }
    }
}

impl DnsSettings {
    /// The longest a single check (one SPF evaluation, or all message checks
    /// of one message) may take before it is cut off as `temperror`.
    ///
    /// A check stops at its first failed query, except for lookups whose
    /// failure mail-auth ignores (an SPF `exp=` text, a PTR name), so the
    /// bound allows two failed queries of `timeout × attempts` each, plus a
    /// margin for the answered ones. It is reached only when DNS is down or
    /// very slow; defaults (5 s × 2) give 20.25 s, far below the 10 minutes
    /// RFC 5321 §4.5.3.2.6 gives the server after the end of DATA.
    pub fn check_deadline(&self) -> Duration {
        let attempts = u32::try_from(self.attempts.max(1)).unwrap_or(u32::MAX);
        self.timeout
            .saturating_mul(attempts.saturating_mul(2))
            .saturating_add(Duration::from_millis(250))
    }

    fn validate(&self) -> Result<(), AuthError> {
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(60) {
            return Err(AuthError::Config(
                "timeout must be between 1ms and 60s".into(),
            ));
        }
        if self.attempts == 0 || self.attempts > 10 {
            return Err(AuthError::Config(
                "attempts must be between 1 and 10".into(),
            ));
        }
        if self.nameservers.iter().any(|s| s.port() == 0) {
            return Err(AuthError::Config("a nameserver port must not be 0".into()));
        }
        if self.max_queries_per_session == 0 || self.max_queries_per_message == 0 {
            return Err(AuthError::Config(
                "max_queries_per_session and max_queries_per_message must be at least 1".into(),
            ));
        }
        if self.cache_entries > 0 && self.cache_bytes < 64 << 10 {
            return Err(AuthError::Config(
                "cache_memory must be at least 64KiB (or set cache_size: 0)".into(),
            ));
        }
        Ok(())
    }

    /// Builds the one `MessageAuthenticator` of the process.
    pub(crate) fn authenticator(&self) -> Result<MessageAuthenticator, AuthError> {
        self.validate()?;
        let (config, mut opts) = if self.nameservers.is_empty() {
            mail_auth::hickory_resolver::system_conf::read_system_conf()
                .map_err(|e| AuthError::SystemConf(e.to_string()))?
        } else {
            let servers = self
                .nameservers
                .iter()
                .map(|addr| {
                    // 0.26: the struct is #[non_exhaustive]; the constructor
                    // makes one UDP and one TCP connection config with port 53.
                    let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                    for conn in &mut ns.connections {
                        conn.port = addr.port();
                    }
                    ns
                })
                .collect();
            (
                ResolverConfig::from_name_servers(servers),
                ResolverOpts::default(),
            )
        };
        opts.timeout = self.timeout;
        opts.attempts = self.attempts;
        // See the module comment: mail-auth's parsed-record cache is the only cache.
        opts.cache_size = 0;
        // /etc/hosts must not answer for SPF/DKIM/DMARC names.
        opts.use_hosts_file = ResolveHosts::Never;
        MessageAuthenticator::new(config, opts).map_err(|e| AuthError::Resolver(e.to_string()))
    }
}

/// The `dns:` section as written in YAML. Unknown fields are errors.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DnsFile {
    /// `"IP:port"`, `"[v6]:port"` or a bare IP (port 53).
    #[serde(default)]
    pub nameservers: Vec<String>,
    pub timeout: Option<Secs>,
    pub attempts: Option<usize>,
    pub cache_size: Option<usize>,
    /// Memory bound of the DNS cache ("16MiB"), estimated from the parsed records.
    pub cache_memory: Option<ByteSize>,
    /// DNS queries all checks of one SMTP session may make (default 500).
    pub max_queries_per_session: Option<u32>,
    /// DNS queries one transaction may make: SPF at MAIL FROM plus the
    /// message checks (default 150).
    pub max_queries_per_message: Option<u32>,
}

impl DnsFile {
    /// Validates and converts; the error names the offending field.
    pub fn to_settings(&self) -> Result<DnsSettings, AuthError> {
        let mut nameservers = Vec::with_capacity(self.nameservers.len());
        for s in &self.nameservers {
            nameservers.push(parse_nameserver(s)?);
        }
        let settings = DnsSettings {
            nameservers,
            timeout: self.timeout.map(|s| s.0).unwrap_or(DEFAULT_TIMEOUT),
            attempts: self.attempts.unwrap_or(DEFAULT_ATTEMPTS),
            cache_entries: self.cache_size.unwrap_or(DEFAULT_CACHE_ENTRIES),
            cache_bytes: self.cache_memory.map_or(DEFAULT_CACHE_BYTES, |b| {
                usize::try_from(b.0).unwrap_or(usize::MAX)
            }),
            max_queries_per_session: self
                .max_queries_per_session
                .unwrap_or(DEFAULT_QUERIES_PER_SESSION),
            max_queries_per_message: self
                .max_queries_per_message
                .unwrap_or(DEFAULT_QUERIES_PER_MESSAGE),
        };
        settings.validate()?;
        Ok(settings)
    }
}

impl TryFrom<&DnsFile> for DnsSettings {
    type Error = AuthError;
    fn try_from(f: &DnsFile) -> Result<Self, AuthError> {
        f.to_settings()
    }
}

fn parse_nameserver(s: &str) -> Result<SocketAddr, AuthError> {
    let t = s.trim();
    if let Ok(addr) = t.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Ok(ip) = t.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    Err(AuthError::Config(format!(
        "nameservers: {s:?} is not an IP address or IP:port (write IPv6 with a port as [::1]:53)"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(yaml: &str) -> Result<DnsFile, serde_yaml::Error> {
        serde_yaml::from_str(yaml)
    }

    #[test]
    fn parses_the_documented_shape() {
        let f = file(
            "nameservers: [\"127.0.0.1:5353\", \"::1\", \"[::1]:54\"]\ntimeout: 2s\nattempts: 3\ncache_size: 50\ncache_memory: 1MiB\nmax_queries_per_session: 40\nmax_queries_per_message: 20\n",
        )
        .unwrap();
        let s = f.to_settings().unwrap();
        assert_eq!(
            s.nameservers,
            vec![
                "127.0.0.1:5353".parse().unwrap(),
                "[::1]:53".parse().unwrap(),
                "[::1]:54".parse().unwrap()
            ]
        );
        assert_eq!(s.timeout, Duration::from_secs(2));
        assert_eq!(s.attempts, 3);
        assert_eq!(s.cache_entries, 50);
        assert_eq!(s.cache_bytes, 1 << 20);
        assert_eq!(
            (s.max_queries_per_session, s.max_queries_per_message),
            (40, 20)
        );
        assert_eq!(s.check_deadline(), Duration::from_millis(12250));
    }

    #[test]
    fn defaults_and_errors() {
        let s = file("{}").unwrap().to_settings().unwrap();
        assert_eq!(s, DnsSettings::default());
        assert!(file("nameserver: []").is_err(), "unknown field");
        assert!(file("nameservers: [\"dns.example\"]")
            .unwrap()
            .to_settings()
            .is_err());
        assert!(file("attempts: 0").unwrap().to_settings().is_err());
        assert!(file("timeout: 0s").unwrap().to_settings().is_err());
        assert!(file("max_queries_per_message: 0")
            .unwrap()
            .to_settings()
            .is_err());
        assert!(file("cache_memory: 1KiB").unwrap().to_settings().is_err());
        assert!(file("nameservers: [\"127.0.0.1:0\"]")
            .unwrap()
            .to_settings()
            .is_err());
    }
}
