//! The human summary `mailgate check` prints: files, listeners with their
//! effective limits, each policy's rules in evaluation order, certificates.

use super::{Config, Protocol, TlsMode};
use std::fmt::Write as _;

impl Config {
    /// The human summary `mailgate check` prints.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "configuration OK ({} file(s))", self.sources.len());
        for s in &self.sources {
            let _ = writeln!(out, "  file {}", s.display());
        }
        let _ = writeln!(
            out,
            "server max_inflight_data={} dns: cache {} entries / {} bytes, max_queries_per_session={} max_queries_per_message={}",
            self.max_inflight_data,
            self.dns.cache_entries,
            self.dns.cache_bytes,
            self.dns.max_queries_per_session,
            self.dns.max_queries_per_message
        );
        let _ = writeln!(out, "state store: {}", self.state.describe());
        for l in &self.listeners {
            let proto = match l.protocol {
                Protocol::Smtp => "smtp",
                Protocol::Pop3 => "pop3",
                Protocol::Imap => "imap",
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
            let b = &l.backend;
            let mut identity: Vec<&str> = Vec::new();
            if b.xclient {
                identity.push("xclient");
            }
            if b.proxy_v2 {
                identity.push("proxy_v2");
            }
            if b.imap_id {
                identity.push("imap_id");
            }
            identity.push("received");
            let _ = writeln!(
                out,
                "  identity=[{}]{}{}",
                identity.join(", "),
                if b.identity_optional && b.xclient {
                    " identity_optional=true (relays without XCLIENT when it cannot be applied)"
                } else {
                    ""
                },
                if b.imap_id {
                    " (imap_id: IMAP backends only; the login fails closed without ID)"
                } else {
                    ""
                }
            );
            if b.reuse.max_idle > 0 {
                let _ = writeln!(
                    out,
                    "  reuse: up to {} idle backend connection(s), closed after {}s idle or {} client session(s)",
                    b.reuse.max_idle,
                    b.reuse.idle_timeout.as_secs(),
                    b.reuse.max_sessions
                );
            }
            if let Some((trusted, _)) = &l.proxy_trusted {
                let _ = writeln!(
                    out,
                    "  proxy_protocol: {} trusted network(s), allow_local={}{}",
                    trusted.len(),
                    l.proxy_allow_local,
                    if l.proxy_allow_local {
                        " (LOCAL/UNKNOWN headers run as the balancer's address)"
                    } else {
                        ""
                    }
                );
            }
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
            } else if l.protocol == Protocol::Imap {
                let _ = writeln!(
                    out,
                    "  max_command_line={} max_message_size={} (APPEND) max_errors={}",
                    l.max_command_line, l.max_message_size, l.max_errors
                );
                let _ = writeln!(
                    out,
                    "  max_login_failures={} login_failure_delay={:?} idle={:?} (at least 29m in IDLE)",
                    l.max_login_failures, l.login_failure_delay, l.timeouts.idle
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
                let mut d = p.describe();
                if let Some(t) = self.triage.get(&p.name) {
                    if l.protocol == super::Protocol::Smtp {
                        d.push_str(&t.describe());
                    } else {
                        d.push_str("    triage: not applied (SMTP listeners only)\n");
                    }
                }
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

    /// What `check` prints: the summary, then each warning on a line of its
    /// own and their count (see `warnings.rs`).
    pub fn check_output(&self, warnings: &[super::warnings::Warning]) -> String {
        let mut out = self.summary();
        for w in warnings {
            let _ = writeln!(out, "{w}");
        }
        if !warnings.is_empty() {
            let _ = writeln!(out, "{} warning(s)", warnings.len());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use crate::config::fixtures::*;

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

    /// The fail-open opt-outs and the process-wide bounds are visible in `check`.
    #[test]
    fn summary_names_opt_outs_and_bounds() {
        let c = load_str(
            "o.yaml",
            "backends:\n  a: { address: \"127.0.0.1:1\", identity: [xclient], identity_optional: true }\nlisteners:\n  - { name: mx, protocol: smtp, bind: \"127.0.0.1:25\", tls: none, backend: a, proxy_protocol: { trusted: [\"10.0.0.0/8\"], allow_local: true } }\n",
        )
        .unwrap();
        let s = c.summary();
        assert!(
            s.contains("identity=[xclient, received] identity_optional=true"),
            "{s}"
        );
        assert!(s.contains("allow_local=true"), "{s}");
        assert!(s.contains("max_inflight_data=536870912"), "{s}");
        assert!(s.contains("max_queries_per_session=500"), "{s}");
    }

    /// `check` says whether backend connections serve several clients.
    #[test]
    fn summary_shows_backend_reuse() {
        let yaml = |extra: &str| {
            format!("backends:\n  a: {{ address: \"127.0.0.1:1\"{extra} }}\nlisteners:\n  - {{ name: mx, protocol: smtp, bind: \"127.0.0.1:25\", tls: none, backend: a }}\n")
        };
        let s = load_str("r.yaml", &yaml(", reuse: { max_idle: 4 }"))
            .unwrap()
            .summary();
        assert!(
            s.contains("reuse: up to 4 idle backend connection(s), closed after 2s idle or 100 client session(s)"),
            "{s}"
        );
        let s = load_str("r.yaml", &yaml("")).unwrap().summary();
        assert!(!s.contains("reuse:"), "{s}");
    }

    #[test]
    fn summary_shows_imap_listeners_and_their_bounds() {
        let c = load_str(
            "i.yaml",
            "tls: { certificates: [ { cert: c, key: k } ] }\nbackends:\n  i: { address: \"127.0.0.1:143\" }\nlisteners:\n  - { name: imap, protocol: imap, bind: \"127.0.0.1:143\", tls: starttls, backend: i }\n",
        )
        .unwrap();
        let s = c.summary();
        assert!(
            s.contains("listener imap imap on 127.0.0.1:143 tls=starttls require_tls=true"),
            "{s}"
        );
        assert!(
            s.contains("max_command_line=8192 max_message_size=26214400 (APPEND)"),
            "{s}"
        );
        assert!(s.contains("idle=1800s (at least 29m in IDLE)"), "{s}");
    }
}
