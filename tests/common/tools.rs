//! External programs in tests: finding the end-to-end tools (or skipping
//! loudly), running them with a time limit, and killing them by guard.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

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

/// Like [`run_limited`], but the output goes to files in `dir`, so that a
/// client printing more than a pipe buffer cannot block (message hex dumps
/// do); returns (status ok, stdout bytes, stderr).
pub fn run_to_files(cmd: &mut Command, dir: &Path, limit: Duration) -> (bool, Vec<u8>, String) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let (out, err) = (
        dir.join(format!("run-{n}.out")),
        dir.join(format!("run-{n}.err")),
    );
    let mut child = cmd
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = String::from_utf8_lossy(&std::fs::read(&err).unwrap_or_default()).into_owned();
    (
        status.success(),
        std::fs::read(&out).unwrap_or_default(),
        err,
    )
}
