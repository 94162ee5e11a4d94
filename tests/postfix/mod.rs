//! A throwaway real Postfix instance (master, smtpd, cleanup, qmgr, local,
//! postlogd) under a temp dir, for end-to-end tests. Everything binds
//! 127.0.0.1; the log goes to `DIR/maillog` (postlogd), mail for
//! `bob@test.example` is appended to the mbox file `DIR/mail/bob.mbox`.
//!
//! Layout (DIR is the directory given to [`Postfix::start`]):
//! - `DIR/etc/{main.cf,master.cf}`: `config_directory`; `postfix -c DIR/etc`
//! - `DIR/queue`: `queue_directory` (sub-directories made by `postfix start`,
//!   which runs `postfix check` first)
//! - `DIR/data`: `data_directory` (must be owned by `mail_owner` = postfix:
//!   master.lock lives there)
//! - `DIR/mail`: mode 1777; local(8) writes `bob.mbox` as `default_privs`
//!   (nobody), so DIR itself must be traversable (0755)
//!
//! Two smtpd services: `xclient_port` trusts 127.0.0.0/8 for XCLIENT,
//! `untrusting_port` trusts nobody (`-o smtpd_authorized_xclient_hosts=`).
//! `check_helo_access static:{INFO helo-logged}` makes smtpd log one `info:`
//! line per RCPT with the HELO name it believes (`helo=<...>`).
//!
//! Needs root (master starts as root and drops to `mail_owner`). Stopped by
//! `postfix stop` on Drop; processes left after that (found by their
//! `MAIL_CONFIG=DIR/etc` environment, i.e. only this instance's) are killed
//! by PID.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const DOMAIN: &str = "test.example";
pub const HOSTNAME: &str = "legacy.test.example";

pub struct Postfix {
    pub dir: PathBuf,
    pub etc: PathBuf,
    pub xclient_port: u16,
    pub untrusting_port: u16,
    pub maillog: PathBuf,
    pub mbox: PathBuf,
}

/// Fails unless the test runs as root (CI does).
pub fn require_root(why: &str) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_default();
    assert_eq!(uid, "0", "{why} needs root (CI runs as root)");
}

/// Runs `cmd` with stdout/stderr to files in `dir` (never pipes: `postfix
/// start` leaves a daemon behind that could hold a pipe open), bounded by
/// `limit`. Returns (success, stdout + stderr).
pub fn run_to_files(cmd: &mut Command, dir: &Path, limit: Duration) -> (bool, String) {
    let out = dir.join(".cmd.out");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::OpenOptions::new().append(true).open(&out).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not finish within {limit:?}: {}",
                std::fs::read_to_string(&out).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status.success(),
        std::fs::read_to_string(&out).unwrap_or_default(),
    )
}

impl Postfix {
    /// Writes main.cf/master.cf under `dir`, starts Postfix and waits until
    /// both smtpd ports accept connections.
    pub fn start(dir: &Path) -> Postfix {
        Postfix::start_with(dir, "")
    }

    /// [`Postfix::start`] with `main_cf` (`name = value` lines) appended to main.cf.
    pub fn start_with(dir: &Path, main_cf: &str) -> Postfix {
        require_root("a Postfix instance");
        let postfix = crate::common::tool("postfix");
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        assert!(
            passwd.lines().any(|l| l.starts_with("postfix:")),
            "no `postfix` user: install the postfix package (bash .ci/run does)"
        );
        assert!(
            Path::new("/usr/lib/postfix/sbin/smtpd").exists(),
            "Postfix daemons not found in /usr/lib/postfix/sbin: install postfix"
        );
        let etc = dir.join("etc");
        let (queue, data, mail) = (dir.join("queue"), dir.join("data"), dir.join("mail"));
        for d in [&etc, &queue, &data, &mail] {
            std::fs::create_dir_all(d).unwrap();
        }
        chmod(dir, "0755");
        chmod(&mail, "1777");
        let (ok, out) = run_to_files(
            Command::new("chown").args(["postfix"]).arg(&data),
            dir,
            Duration::from_secs(10),
        );
        assert!(ok, "chown postfix {}: {out}", data.display());

        let xclient_port = crate::common::free_port();
        let untrusting_port = crate::common::free_port();
        let maillog = dir.join("maillog");
        let mbox = mail.join("bob.mbox");
        let d = dir.display();
        std::fs::write(
            etc.join("main.cf"),
            format!(
                "# throwaway instance for mailgate's end-to-end tests
compatibility_level = 3.6
config_directory = {d}/etc
queue_directory = {d}/queue
data_directory = {d}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = {HOSTNAME}
mydomain = {DOMAIN}
myorigin = $myhostname
mydestination = {DOMAIN}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.1/32
smtpd_authorized_xclient_hosts = 127.0.0.0/8
smtpd_client_port_logging = yes
smtpd_helo_restrictions = check_helo_access static:{{INFO helo-logged}}
smtpd_banner = $myhostname ESMTP legacy
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
alias_maps = inline:{{ bob={d}/mail/bob.mbox }}
alias_database =
local_recipient_maps = $alias_maps
biff = no
{main_cf}"
            ),
        )
        .unwrap();
        std::fs::write(
            etc.join("master.cf"),
            format!(
                "# service type private unpriv chroot wakeup maxproc command
127.0.0.1:{xclient_port} inet n - n - - smtpd
127.0.0.1:{untrusting_port} inet n - n - - smtpd -o smtpd_authorized_xclient_hosts=
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
local     unix  - n n - - local
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"
            ),
        )
        .unwrap();
        let pf = Postfix {
            dir: dir.to_path_buf(),
            etc,
            xclient_port,
            untrusting_port,
            maillog,
            mbox,
        };
        let (ok, out) = run_to_files(
            Command::new(&postfix).arg("-c").arg(&pf.etc).arg("start"),
            dir,
            Duration::from_secs(60),
        );
        assert!(ok, "postfix start failed: {out}\nmaillog:\n{}", pf.log());
        crate::common::wait_port(xclient_port);
        crate::common::wait_port(untrusting_port);
        pf
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.maillog).unwrap_or_default()
    }

    /// Waits (at most 30 s) until `done` holds for the log; returns the log.
    pub fn wait_log(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let log = self.log();
            if done(&log) {
                return log;
            }
            if start.elapsed() > Duration::from_secs(30) {
                panic!("Postfix log never showed {what}:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Messages delivered to bob@test.example (mbox, split at `From ` lines).
    pub fn mailbox(&self) -> Vec<String> {
        let text = std::fs::read_to_string(&self.mbox).unwrap_or_default();
        let mut out: Vec<String> = Vec::new();
        for line in text.split_inclusive('\n') {
            if line.starts_with("From ") || out.is_empty() {
                out.push(String::new());
            }
            out.last_mut().unwrap().push_str(line);
        }
        out.retain(|m| !m.trim().is_empty());
        out
    }

    /// PIDs of this instance's processes (master and its children): their
    /// environment carries MAIL_CONFIG=<our etc>.
    fn processes(&self) -> Vec<u32> {
        let marker = format!("MAIL_CONFIG={}", self.etc.display());
        let mut pids = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Ok(env) = std::fs::read(e.path().join("environ")) {
                if env.split(|b| *b == 0).any(|v| v == marker.as_bytes()) {
                    pids.push(pid);
                }
            }
        }
        pids
    }
}

/// `chmod mode p`, which must succeed.
pub fn chmod(p: &Path, mode: &str) {
    let ok = Command::new("chmod")
        .arg(mode)
        .arg(p)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "chmod {mode} {}", p.display());
}

impl Drop for Postfix {
    fn drop(&mut self) {
        // `postfix stop`: master sends SIGTERM to its children and exits.
        if let Ok(mut child) = Command::new("postfix")
            .arg("-c")
            .arg(&self.etc)
            .arg("stop")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            let start = Instant::now();
            while child.try_wait().ok().flatten().is_none() {
                if start.elapsed() > Duration::from_secs(10) {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // whatever is left of this instance after 5 s is killed by PID
        let start = Instant::now();
        loop {
            let left = self.processes();
            if left.is_empty() {
                break;
            }
            if start.elapsed() > Duration::from_secs(5) {
                for pid in left {
                    let _ = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .stderr(Stdio::null())
                        .status();
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
