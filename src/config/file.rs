//! The serde shapes of one YAML file. Every struct denies unknown fields, so a
//! typo is an error with its line and column instead of a silently ignored key.
//! Field names here are the operator contract: extend, never rename.
//! Defaults are not restated here: they live in `defaults.rs`, which the
//! schema (`mailgate schema`, each field's `default`) and README follow.

use crate::units::{ByteSize, Cidr, Rate, Secs};
use schemars::JsonSchema;
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: Option<ServerFile>,
    #[serde(default)]
    pub listeners: Vec<ListenerFile>,
    #[serde(default)]
    pub tls: Option<TlsFile>,
    #[serde(default)]
    pub backends: BTreeMap<String, BackendFile>,
    #[serde(default)]
    pub policies: BTreeMap<String, PolicyFile>,
    #[serde(default)]
    pub metrics: Option<MetricsFile>,
    /// Resolver for SPF/DKIM/DMARC (default: the system's resolv.conf).
    #[serde(default)]
    pub dns: Option<crate::auth::DnsFile>,
    /// Where limiter state lives: in process (default) or in Valkey/Redis,
    /// shared by several instances (README, "Running several instances").
    #[serde(default)]
    pub state: Option<StateFile>,
}

/// Where limiter state is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// In process, per instance.
    Memory,
    /// Valkey/Redis at `url`, shared by every instance with the same `prefix`.
    Redis,
}

/// `state:`: rate rules, concurrent sessions (as leases), failed-login
/// windows and known-good networks, shared through Valkey/Redis.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    /// `memory` (in process) or `redis`.
    pub store: Option<StoreKind>,
    /// `redis://host:port/db`, or `rediss://` for TLS (system roots).
    /// Prefer `password_file`/`password_env` to a password in the URL.
    pub url: Option<String>,
    /// A file holding the store's password (trailing newline ignored).
    pub password_file: Option<String>,
    /// An environment variable holding the store's password.
    pub password_env: Option<String>,
    /// Every key starts with this (instances sharing limits share it).
    pub prefix: Option<String>,
    /// The longest a session waits for the store at one stage.
    pub timeout: Option<Secs>,
    /// When the store does not answer in time: `local` (per-instance
    /// limits), `accept` (no limit) or `tempfail` (a temporary error).
    pub on_unavailable: Option<crate::state::OnUnavailable>,
    /// A session lease lives this long without renewal (renewed every
    /// third of it): a crashed instance's sessions stop counting after it.
    pub lease_ttl: Option<Secs>,
}

/// `metrics: { bind: "127.0.0.1:9090" }`: Prometheus `/metrics`, `/healthz`,
/// `/readyz`, and the bans (`GET /bans`, `DELETE /bans/<address>`).
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MetricsFile {
    pub bind: String,
    /// A file holding the bearer token (at least 16 characters, one line)
    /// that `DELETE /bans/<address>` and `mailgate bans lift` need. Without
    /// it, bans cannot be lifted over HTTP (403).
    pub admin_token_file: Option<String>,
}

/// `proxy_protocol: { trusted: [CIDR, ...] }`: a PROXY v1/v2 header is required
/// from these peers (load balancers); any other peer is closed.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProxyProtocolFile {
    pub trusted: Vec<Cidr>,
    /// How long the header may take to arrive.
    pub timeout: Option<Secs>,
    /// Accept `LOCAL` (v2) and `UNKNOWN` (v1) headers, which carry no client
    /// address (balancer health checks); the session then runs as the
    /// balancer's own address. When false, such connections are closed.
    pub allow_local: Option<bool>,
}

/// How the backend learns who the client is (README, "Backend fields").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum IdentityMethod {
    /// Postfix XCLIENT (ADDR, PORT, PROTO, HELO) when the backend offers it.
    Xclient,
    /// A PROXY protocol v2 header at the start of the backend connection.
    ProxyV2,
    /// The `Received:` trace header (always added).
    Received,
    /// IMAP backends: Dovecot's `ID ("x-originating-ip" …)` before the login
    /// (honoured from Dovecot's `login_trusted_networks`); the session gets a
    /// temporary error when the backend does not offer ID or refuses it.
    ImapId,
}

/// Process-wide settings.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    /// Name in greetings, EHLO to backends and `Received:` headers (default: the host name).
    pub hostname: Option<String>,
    /// How long running transactions may take to finish after SIGTERM.
    pub shutdown_grace: Option<Secs>,
    /// Message bytes all SMTP sessions together may hold in memory; a DATA
    /// beyond it gets `452 4.3.1`.
    pub max_inflight_data: Option<ByteSize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Smtp,
    Pop3,
    Imap,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    None,
    Starttls,
    Implicit,
}

/// What to do with bare CR, bare LF inside a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BareNewlines {
    /// Reject the message with 550 5.6.0.
    Reject,
    /// Turn each bare CR or LF into CRLF before the message goes anywhere.
    Normalize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    None,
    Optional,
    Required,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListenerFile {
    pub name: String,
    pub protocol: Protocol,
    pub bind: String,
    pub tls: TlsMode,
    pub require_tls: Option<bool>,
    pub backend: String,
    pub policy: Option<String>,
    /// Overrides `server.hostname` for this listener.
    pub hostname: Option<String>,
    /// Concurrent connections; more are answered 421 / -ERR and closed.
    pub max_connections: Option<usize>,
    /// SMTP: SIZE limit advertised and enforced (552 5.3.4). IMAP: the largest
    /// APPEND literal (`NO [TOOBIG]` beyond it).
    pub max_message_size: Option<ByteSize>,
    /// SMTP: recipients per message (452 4.5.3 beyond it).
    pub max_recipients: Option<usize>,
    /// Protocol errors tolerated per session before 421 and close.
    pub max_errors: Option<u32>,
    /// SMTP: `reject` or `normalize` bare CR / bare LF in messages.
    pub bare_newlines: Option<BareNewlines>,
    /// Longest command line including CRLF (RFC 5321: 512; IMAP: 8192, RFC 7162 §4,
    /// which also bounds each IMAP literal other than an APPEND's message).
    pub max_command_line: Option<usize>,
    /// Longest message text line including CRLF (RFC 5321: 1000).
    pub max_text_line: Option<usize>,
    /// POP3: offer APOP (the backend is then contacted before login for its timestamp).
    pub apop: Option<bool>,
    /// POP3, IMAP and SMTP AUTH: failed logins per session before the session is closed.
    pub max_login_failures: Option<u32>,
    /// Accept connections through a TCP load balancer that sends PROXY headers.
    pub proxy_protocol: Option<ProxyProtocolFile>,
    /// SMTP: `none`, `optional` or `required` AUTH (PLAIN, LOGIN; only over TLS).
    pub auth: Option<AuthMode>,
    /// POP3, IMAP and SMTP AUTH: pause after each failed login.
    pub login_failure_delay: Option<Secs>,
    #[serde(default)]
    pub timeouts: TimeoutsFile,
    /// SMTP: MAIL commands per session; the next gets `421 4.7.0` and the close.
    pub max_transactions: Option<u32>,
    /// POP3 with `apop: true`: sessions that may hold a backend connection
    /// before login (for its greeting timestamp) at the same time; beyond it
    /// new connections get `-ERR [SYS/TEMP]` and are closed (default 50).
    pub apop_max_pending: Option<usize>,
    /// POP3 with `apop: true`: while a session holds such a connection, the
    /// login must come within this time of the greeting (default 10s).
    pub apop_prelogin_timeout: Option<Secs>,
}

/// Named deadlines. Defaults follow RFC 5321 §4.5.3.2 where it has a value.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsFile {
    pub tls_handshake: Option<Secs>,
    pub command: Option<Secs>,
    pub data: Option<Secs>,
    pub session: Option<Secs>,
    pub backend_connect: Option<Secs>,
    pub backend_reply: Option<Secs>,
    pub backend_data: Option<Secs>,
    /// After login: no traffic either way for this long ends the session
    /// (POP3 and IMAP; IMAP default 30m, and at least 29m while in IDLE).
    pub idle: Option<Secs>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    #[serde(default)]
    pub certificates: Vec<CertFile>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CertFile {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BackendFile {
    /// `host:port` of the legacy server (plaintext).
    pub address: String,
    /// Name sent in EHLO/HELO to the backend (default: the listener's hostname).
    pub helo_name: Option<String>,
    /// Default `[received]`; e.g. `[xclient, received]`.
    pub identity: Option<Vec<IdentityMethod>>,
    /// TLS to the backend, for backends that can do it: `implicit` or
    /// `starttls` (SMTP only). Default: none (plaintext).
    pub tls: Option<BackendTlsFile>,
    /// PEM trust anchors for the backend's certificate (default: the system bundle).
    pub ca: Option<String>,
    /// Accept exactly these certificates (hex SHA-256 of the DER) instead of a CA.
    pub pin_sha256: Option<Vec<String>>,
    /// Name to verify the certificate against (default: the host of `address`).
    pub server_name: Option<String>,
    /// With `identity: [xclient]`: relay anyway when the backend does not
    /// offer XCLIENT (with ADDR) or refuses it; the backend then sees
    /// mailgate's address. When false, MAIL gets `451 4.7.0` and nothing is
    /// relayed.
    pub identity_optional: Option<bool>,
    /// SMTP backends: keep the backend connection when a client session
    /// ends, for the next session (no connect, greeting, EHLO and QUIT each
    /// time). Off unless given; `reuse: {}` takes the defaults.
    pub reuse: Option<ReuseFile>,
}

/// `backends.NAME.reuse`: idle backend connections kept for later sessions.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReuseFile {
    /// Idle connections kept at most; 0 turns reuse off.
    pub max_idle: Option<usize>,
    /// An idle connection unused this long is closed (QUIT).
    pub idle_timeout: Option<Secs>,
    /// Client sessions one backend connection serves before it is closed.
    pub max_sessions: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackendTlsFile {
    None,
    Implicit,
    Starttls,
}

/// A policy block: who may do how much (README, "Policies"). Lists are checked in
/// this order: `deny` (refused before anything else, even before TLS), `allow`
/// (skips the limits it names, or all), then `limits` in file order.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    #[serde(default)]
    pub deny: Vec<Cidr>,
    #[serde(default)]
    pub allow: Vec<AllowFile>,
    #[serde(default)]
    pub limits: Vec<LimitFile>,
    /// Keys tracked per rule; past it, a new key replaces an idle (else the
    /// least recently seen) one.
    pub max_tracked_keys: Option<usize>,
    /// How long a successful login keeps (user, network) "known good", exempt
    /// from per-user lockouts.
    pub known_good: Option<Secs>,
    /// Our authserv-id for Authentication-Results (RFC 8601); headers claiming
    /// it are removed from incoming mail. Default: the listener's hostname.
    pub authserv_id: Option<String>,
    /// SPF at MAIL FROM (RFC 7208): an action per result. Not named = not run.
    pub spf: Option<crate::auth::SpfActions>,
    /// DKIM after DATA (RFC 6376).
    pub dkim: Option<crate::auth::DkimActions>,
    /// DMARC after DATA (RFC 7489); needs SPF and DKIM, which then run too.
    pub dmarc: Option<crate::auth::DmarcActions>,
    /// ARC chain validation (reported; no sealing).
    pub arc: Option<crate::auth::ArcActions>,
    /// DKIM signing of authenticated sessions' mail (RFC 6376, RFC 8463).
    pub dkim_sign: Option<super::dkim_sign::DkimSignFile>,
    /// DNSBL/DNSWL scoring, the pregreet test and the allowlist cache before
    /// the SMTP greeting (SMTP listeners only).
    pub triage: Option<super::triage::TriageFile>,
}

/// `"10.0.0.0/8"` (skip every limit) or `{ networks: [...], skip: [rule names] }`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum AllowFile {
    Network(Cidr),
    Entry(AllowEntryFile),
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AllowEntryFile {
    pub networks: Vec<Cidr>,
    /// Names of the limits skipped; empty or absent = all.
    #[serde(default)]
    pub skip: Vec<String>,
}

/// One limit rule. Exactly one of the counting fields is set.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitFile {
    /// Used in logs, metrics and `allow.skip` (default `rule-N`, N from 1).
    pub name: Option<String>,
    pub key: Vec<crate::policy::KeyPart>,
    /// Events at the stage where the key is known ("20/minute", "5/15minutes").
    pub rate: Option<Rate>,
    pub burst: Option<u32>,
    /// Simultaneous sessions.
    pub concurrent: Option<u32>,
    /// Messages (counted at MAIL).
    pub messages: Option<Rate>,
    /// Recipients (counted at each RCPT).
    pub recipients: Option<Rate>,
    /// Failed logins (SMTP AUTH, POP3 USER/PASS/AUTH/APOP) before login attempts are refused.
    pub auth_failures: Option<Rate>,
    /// Recipients in one message.
    pub recipients_per_message: Option<u32>,
    /// Recipients the backend refused (5xx to RCPT) in a window: recipient
    /// harvesting ("5/10minutes"). Reaching N refuses further RCPTs (or bans).
    pub rcpt_refusals: Option<Rate>,
    pub prefix_v4: Option<u8>,
    pub prefix_v6: Option<u8>,
    pub action: Option<crate::action::PolicyAction>,
    /// Longest tarpit for `action: delay` (at most 60s).
    pub max_delay: Option<Secs>,
    /// The `ip` key counts IPv6 clients per network of this prefix length
    /// (64: rotating addresses inside one /64 is one client; 128 = per
    /// address). IPv4 clients are always counted per address.
    pub ipv6_prefix: Option<u8>,
    /// With `action: ban` (and only then): how long the client's address (an
    /// IPv6 client's `ipv6_prefix` network) is refused on every listener,
    /// from 1s to 30d.
    pub ban_for: Option<Secs>,
    /// With `action: ban`: log and count the ban (`would ban`), refuse nothing.
    pub shadow: Option<bool>,
}
