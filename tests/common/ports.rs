//! Ports and addresses of test servers: free ports for servers that cannot
//! bind port 0, waiting for a port, and a gateway child's own report of
//! where it listens.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// A port for a server that cannot be bound to port 0 by us (smtp-sink,
/// Dovecot, Postfix) or for a backend that must be down.
///
/// Binding port 0 and handing the number on is a race: the probe listener is
/// dropped, and the kernel gives the same number to the next `bind(…:0)` (a
/// gateway or another test's `free_port` in the same test binary) before the
/// server it was meant for binds it; the two tests then talk to one server
/// (that is how `e2e_smtp::sighup_reload_keeps_or_applies` met another test's
/// gateway and its `421`). So the ports come from below the kernel's
/// ephemeral range (`ip_local_port_range`), which it never hands out by
/// itself, for `bind(…:0)` or for outgoing connections; each at most once
/// per process; free when checked; the start is spread by process id so that
/// test binaries running side by side do not walk the same numbers.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (lo, hi) = unassigned_ports();
    let span = u32::from(hi - lo);
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = lo + ((start + n) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {lo}..{hi}");
}

/// Ports the kernel does not assign on its own: below the ephemeral range
/// (from 10000, clear of well-known services), or above it if it starts low.
fn unassigned_ports() -> (u16, u16) {
    let range =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut it = range.split_whitespace().map(|p| p.parse::<u16>().ok());
    match (it.next().flatten(), it.next().flatten()) {
        (Some(lo), _) if lo > 12_000 => (10_000, lo),
        (_, Some(hi)) if hi < 63_000 => (hi + 1, 65_535),
        _ => panic!("ip_local_port_range {range:?} leaves no ports for test servers"),
    }
}

/// The bound addresses a `mailgate run` child reports in its log (its stdout,
/// `--log-format json` or text): its `listening` lines by listener name, and
/// `metrics` for the metrics endpoint. Waits until every one of `names` is
/// there. Taken from the child's own log, these are its sockets (start it with
/// `bind: 127.0.0.1:0`), not whatever answers on a number, and no probe
/// connection is made that a connection-rate policy would count.
pub fn listening(log: &Path, names: &[&str]) -> std::collections::HashMap<String, SocketAddr> {
    let start = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let found: std::collections::HashMap<String, SocketAddr> =
            text.lines().filter_map(listening_line).collect();
        if names.iter().all(|n| found.contains_key(*n)) {
            return found;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{} never said it listens on all of {names:?}:\n{text}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// (name, address) of one `listening` log line, JSON or text.
fn listening_line(line: &str) -> Option<(String, SocketAddr)> {
    let (message, listener, addr) = if line.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        let field = |k: &str| v[k].as_str().map(str::to_string);
        (field("message")?, field("listener"), field("addr")?)
    } else {
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
                .map(str::to_string)
        };
        let message = ["metrics endpoint listening", "listening"]
            .into_iter()
            .find(|m| line.contains(&format!(": {m} ")))?;
        (message.to_string(), field("listener"), field("addr")?)
    };
    let name = match message.as_str() {
        "listening" => listener?,
        "metrics endpoint listening" => "metrics".to_string(),
        _ => return None,
    };
    Some((name, addr.parse().ok()?))
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_port(port: u16) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("nothing listens on 127.0.0.1:{port}");
}
