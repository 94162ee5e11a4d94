//! Configuration: YAML file(s) → a validated [`Config`].
//!
//! `--config PATH` names a file or a directory; a directory's `*.yaml`/`*.yml`
//! files are read in name order and merged (lists appended, named maps joined;
//! a name defined twice is an error naming both files). Syntax and type errors
//! come from the YAML parser with line and column; semantic errors (an unknown
//! backend name, a bad address) are located by finding the offending value in
//! the file's text, so they also carry file:line:column.
//!
//! ```text
//! file.rs     the serde shapes of one YAML file (the operator contract)
//! defaults.rs every default value, used by the build code, schema and README test
//! load.rs     files of a path, size/nesting caps, parsing, merging → Config
//! backend.rs  backends: → Backend
//! listener.rs listeners: → Listener, Timeouts
//! policy.rs   policies: → policy::PolicySpec
//! state.rs    state: → state::StateSettings (memory, or the shared store; its password read)
//! dkim_sign.rs a policy's dkim_sign: → sign::SignPolicy (keys loaded from their files)
//! triage.rs   a policy's triage: → triage::TriageSpec (zones, codes, bounds)
//! summary.rs  the `mailgate check` output
//! warnings.rs valid but risky settings `check` warns about (`--strict` fails on them)
//! ```

mod backend;
pub mod defaults;
pub mod dkim_sign;
pub mod file;
mod listener;
mod load;
mod policy;
mod state;
mod summary;
pub mod triage;
pub mod warnings;

use crate::backend::Backend;
use crate::policy::PolicySpec;
use file::FileConfig;
pub use file::{AuthMode, BareNewlines, IdentityMethod, Protocol, TlsMode};
pub use listener::{Listener, Timeouts};
pub use load::{check_nesting, files_of, load, load_str, MAX_FILE_SIZE, MAX_NESTING};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
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

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listeners: Vec<Arc<Listener>>,
    /// (cert, key) PEM paths, resolved against the naming file's directory. First = default.
    pub certificates: Vec<(PathBuf, PathBuf)>,
    pub backends: BTreeMap<String, Arc<Backend>>,
    pub policies: BTreeMap<String, Arc<PolicySpec>>,
    /// Each policy's `triage:` block, by policy name (policies without one are absent).
    pub triage: BTreeMap<String, Arc<crate::triage::TriageSpec>>,
    pub metrics_bind: Option<SocketAddr>,
    /// The bearer token lifting bans needs (`metrics.admin_token_file`).
    pub admin_token: Option<crate::observe::http::AdminToken>,
    /// Resolver settings for SPF/DKIM/DMARC.
    pub dns: crate::auth::DnsSettings,
    pub shutdown_grace: Duration,
    pub sources: Vec<PathBuf>,
    /// Budget for message bytes held by all SMTP sessions together.
    pub max_inflight_data: u64,
    /// Where limiter state lives (`state:`).
    pub state: crate::state::StateSettings,
}

/// The JSON Schema of the configuration format (`mailgate schema`).
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(FileConfig);
    let mut v = serde_json::to_value(&schema).unwrap_or_default();
    defaults::annotate(&mut v);
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

/// YAML shared by the unit tests of the files below.
#[cfg(test)]
mod fixtures {
    pub use super::load_str;

    pub const GOOD: &str = r#"
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

    pub fn err(text: &str) -> String {
        load_str("bad.yaml", text).unwrap_err().to_string()
    }

    pub const POLICY_BASE: &str = "backends:\n  a: { address: \"127.0.0.1:1\" }\nlisteners:\n  - { name: mx, protocol: smtp, bind: \"127.0.0.1:25\", tls: none, backend: a, policy: p }\npolicies:\n  p:\n    limits:\n      - { key: [ip], rate: 5/minute }\n";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_the_contract_fields() {
        let s = json_schema();
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert!(v.to_string().contains("require_tls"));
        assert!(v.to_string().contains("auth_failures"));
        assert!(v.to_string().contains("recipients_per_message"));
    }
}
