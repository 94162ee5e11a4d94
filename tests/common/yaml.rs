//! The gateway configuration builder: listeners, backends, certificates,
//! policies, as the YAML text that `mailgate::config::load_str` reads (so
//! every test goes through the real loader).
//!
//! ```ignore
//! let gw = Yaml::new()
//!     .listener("mx", "smtp", "starttls", "policy: p")
//!     .backend("b", &backend.addr, "")
//!     .certs(dir.path())
//!     .section("policies:\n  p: { deny: [\"192.0.2.0/24\"] }")
//!     .start()
//!     .await;
//! ```

use std::path::Path;

#[derive(Clone)]
pub struct Yaml {
    server: String,
    listeners: Vec<String>,
    backends: Vec<String>,
    certs: Option<String>,
    sections: Vec<String>,
}

impl Default for Yaml {
    fn default() -> Self {
        Self::new()
    }
}

/// `extra` as more fields of a flow mapping: `, a: b` or nothing.
fn fields(extra: &str) -> String {
    let extra = extra.trim().trim_start_matches(',').trim();
    if extra.is_empty() {
        String::new()
    } else {
        format!(", {extra}")
    }
}

impl Yaml {
    /// `server: { hostname: gw.test }` and nothing else yet.
    pub fn new() -> Self {
        Yaml {
            server: "hostname: gw.test".into(),
            listeners: Vec::new(),
            backends: Vec::new(),
            certs: None,
            sections: Vec::new(),
        }
    }

    /// More fields of the `server:` mapping (`shutdown_grace: 2s`).
    pub fn server(mut self, extra: &str) -> Self {
        self.server.push_str(&fields(extra));
        self
    }

    /// A listener on `127.0.0.1:0` in front of backend `b`; `extra`: more
    /// fields of its mapping (`policy: p, auth: required`).
    pub fn listener(self, name: &str, protocol: &str, tls: &str, extra: &str) -> Self {
        self.listener_to(name, protocol, tls, "b", extra)
    }

    /// Like [`listener`](Self::listener), in front of backend `backend`.
    pub fn listener_to(
        mut self,
        name: &str,
        protocol: &str,
        tls: &str,
        backend: &str,
        extra: &str,
    ) -> Self {
        self.listeners.push(format!(
            "  - {{ name: {name}, protocol: {protocol}, bind: \"127.0.0.1:0\", tls: {tls}, backend: {backend}{} }}\n",
            fields(extra)
        ));
        self
    }

    /// Backend `name` at `address`; `extra`: more fields (`identity: [xclient]`).
    pub fn backend(mut self, name: &str, address: &str, extra: &str) -> Self {
        self.backends.push(format!(
            "  {name}: {{ address: \"{address}\"{} }}\n",
            fields(extra)
        ));
        self
    }

    /// The certificate [`dev_cert`](super::dev_cert) wrote into `dir`.
    pub fn certs(mut self, dir: &Path) -> Self {
        self.certs = Some(format!(
            "tls:\n  certificates: [ {{ cert: \"{d}/cert.pem\", key: \"{d}/key.pem\" }} ]\n",
            d = dir.display()
        ));
        self
    }

    /// A top-level section as written (`policies:`, `dns:`, `metrics:`, …).
    pub fn section(mut self, yaml: &str) -> Self {
        let mut s = yaml.trim_matches('\n').to_string();
        s.push('\n');
        self.sections.push(s);
        self
    }

    /// The YAML text.
    pub fn build(&self) -> String {
        let mut y = format!("server: {{ {} }}\n", self.server);
        if !self.listeners.is_empty() {
            y.push_str("listeners:\n");
            y.extend(self.listeners.iter().cloned());
        }
        if let Some(c) = &self.certs {
            y.push_str(c);
        }
        if !self.backends.is_empty() {
            y.push_str("backends:\n");
            y.extend(self.backends.iter().cloned());
        }
        y.extend(self.sections.iter().cloned());
        y
    }

    /// The gateway in-process with this configuration ([`start`](super::start)).
    pub async fn start(&self) -> super::Gateway {
        super::start(&self.build()).await
    }
}
