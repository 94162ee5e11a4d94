//! Shared helpers for integration and end-to-end tests. Everything binds
//! 127.0.0.1 and every child process is killed by a Drop guard.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
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

/// A self-signed certificate for localhost / 127.0.0.1 in `dir` (cert.pem, key.pem).
pub fn dev_cert(dir: &Path) -> (PathBuf, PathBuf) {
    mailgate::tls::write_self_signed(dir, &["localhost", "127.0.0.1"]).unwrap()
}

/// Loads `yaml` and starts the gateway in-process, returning once the SMTP
/// backends' capabilities are known (tests check what EHLO advertises).
pub async fn start(yaml: &str) -> mailgate::server::Gateway {
    let cfg = mailgate::config::load_str("test.yaml", yaml).unwrap_or_else(|e| panic!("{e}"));
    let gw = mailgate::server::Gateway::start(&cfg).await.unwrap();
    gw.backends_probed().await;
    gw
}

/// A rustls client config trusting exactly `ca`.
pub fn tls_client(ca: &Path) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// Kills the child when dropped (also on panic).
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Where `tool` is installed (PATH, then the sbin directories), if it is.
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin"])
        .map(|dir| Path::new(dir).join(tool))
        .find(|p| p.is_file())
}

/// The path of a tool a test has already checked with [`require_or_skip!`].
pub fn tool(tool: &str) -> PathBuf {
    find_tool(tool).unwrap_or_else(|| panic!("{tool} is not installed"))
}

/// Whether every end-to-end test must run: `MAILGATE_E2E=require`, which
/// `.ci/run` sets, so that CI never skips one silently.
pub fn e2e_required() -> bool {
    std::env::var("MAILGATE_E2E").is_ok_and(|v| v == "require")
}

/// Says that the running test cannot run here and why: one
/// `SKIPPED: <test>: <why>` line on stderr, shown by a plain `cargo test`
/// (the caller then returns), or,
/// under `MAILGATE_E2E=require`, a failure.
pub fn skip(why: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("?");
    if e2e_required() {
        panic!("{test}: {why}, and MAILGATE_E2E=require: run `bash .ci/run` (it installs the end-to-end tools) or apt-get install it");
    }
    // straight to the stderr descriptor: libtest captures `eprintln!` of a
    // passing test, and a skip must show in a plain `cargo test`
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {why}");
}

/// `Some(path)` of `tool`, or `None` after [`skip`] said it is not installed.
pub fn require(tool: &str) -> Option<PathBuf> {
    let found = find_tool(tool);
    if found.is_none() {
        skip(&format!("{tool} not installed"));
    }
    found
}

/// `true` when the test runs as root; otherwise [`skip`]s (`why`: what needs it).
pub fn require_root(why: &str) -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        skip(&format!("{why} needs root"));
    }
    root
}

/// At the top of an end-to-end test: returns from it (after one `SKIPPED:`
/// line) unless every tool named is installed; `root: "why"` also needs root.
/// Under `MAILGATE_E2E=require` a missing tool fails the test instead.
#[allow(unused_macros)]
macro_rules! require_or_skip {
    (root: $why:expr $(, $tool:expr)* $(,)?) => {
        if !$crate::common::require_root($why) {
            return;
        }
        $crate::common::require_or_skip!($($tool),*);
    };
    ($($tool:expr),* $(,)?) => {
        $(
            if $crate::common::require($tool).is_none() {
                return;
            }
        )*
    };
}
#[allow(unused_imports)]
pub(crate) use require_or_skip;

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

/// Runs a command with a time limit; returns (status ok, stdout, stderr).
pub fn run_limited(cmd: &mut Command, limit: Duration) -> (bool, String, String) {
    use std::io::Read;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut out = String::new();
            let mut err = String::new();
            child.stdout.take().unwrap().read_to_string(&mut out).ok();
            child.stderr.take().unwrap().read_to_string(&mut err).ok();
            return (status.success(), out, err);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Postfix's smtp-sink on a free port, dumping each message into `dir`.
pub struct Sink {
    pub port: u16,
    pub dir: PathBuf,
    _child: Guard,
}

impl Sink {
    pub fn start(dir: &Path) -> Sink {
        let bin = tool("smtp-sink");
        std::fs::create_dir_all(dir).unwrap();
        // smtp-sink (running as nobody) writes the dump files
        Command::new("chmod").arg("0777").arg(dir).status().unwrap();
        let port = free_port();
        let child = Command::new(bin)
            .args([
                "-u",
                "nobody",
                "-h",
                "legacy-sink",
                "-m",
                "2048",
                "-t",
                "60",
                "-d",
            ])
            .arg(format!("{}/%M.", dir.display()))
            .arg(format!("127.0.0.1:{port}"))
            .arg("1024")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let guard = Guard(child);
        wait_port(port);
        Sink {
            port,
            dir: dir.to_path_buf(),
            _child: guard,
        }
    }

    /// Messages the sink has written so far.
    pub fn messages(&self) -> Vec<Vec<u8>> {
        let mut files: Vec<_> = std::fs::read_dir(&self.dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .collect();
        files.sort();
        files.iter().map(|p| std::fs::read(p).unwrap()).collect()
    }

    /// Waits briefly for the sink to finish writing `n` files.
    pub fn wait_count(&self, n: usize) -> usize {
        for _ in 0..100 {
            let c = self.messages().len();
            if c >= n {
                return c;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.messages().len()
    }
}
