//! A throwaway Dovecot on loopback as the legacy backend of the end-to-end
//! tests: plaintext POP3 and IMAP (`disable_plaintext_auth = no`), user
//! alice (with the test's password) from a passwd-file, a Maildir whose
//! messages the test wrote (so it knows their exact bytes), its own
//! `base_dir`, log and rawlog in the test's directory; and fetchmail as
//! alice's client. Needs root: Dovecot switches users (the mail processes
//! run as uid 65534, which owns the Maildir).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// What the Dovecot instance serves.
pub struct DovecotConf<'a> {
    /// alice's password (any bytes but `:` and line ends: passwd-file).
    pub password: &'a str,
    /// alice's INBOX (LF line ends, as maildirs keep them), in order.
    pub inbox: Vec<Vec<u8>>,
    /// Further folders (Maildir++ `.Name`) with their messages.
    pub folders: Vec<(&'a str, Vec<Vec<u8>>)>,
    /// `login_trusted_networks` (e.g. `127.0.0.0/8`): clients there may
    /// tell Dovecot the real client address (IMAP `ID x-originating-ip`).
    pub trusted_networks: Option<&'a str>,
}

/// Dovecot, stopped with SIGTERM (then SIGKILL) when dropped — also on panic.
pub struct Dovecot {
    /// Its plaintext POP3 port.
    pub port: u16,
    /// Its plaintext IMAP port.
    pub imap: u16,
    /// Its log file (logins, auth failures, `rip=` client addresses).
    pub log: PathBuf,
    /// alice's Maildir (a test delivers into it while a client idles).
    pub maildir: PathBuf,
    child: Child,
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..40 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `chmod mode path`.
pub fn chmod(path: &Path, mode: &str) {
    assert!(Command::new("chmod")
        .arg(mode)
        .arg(path)
        .status()
        .unwrap()
        .success());
}

/// `m` with every LF as CRLF: how POP3 and IMAP carry a maildir message.
pub fn crlf(m: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(m.len() + m.len() / 20);
    for &b in m {
        if b == b'\n' {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

/// The uid Dovecot's mail processes run as (they own the Maildir).
const MAIL_UID: u32 = 65534;

fn write_folder(folder: &Path, messages: &[Vec<u8>]) {
    for sub in ["new", "cur", "tmp"] {
        std::fs::create_dir_all(folder.join(sub)).unwrap();
    }
    for (i, m) in messages.iter().enumerate() {
        std::fs::write(
            folder.join(format!("new/{}.M{i}P1.mailgate-test", 1_700_000_000 + i)),
            m,
        )
        .unwrap();
    }
}

impl Dovecot {
    /// Starts Dovecot in `dir` on two free loopback ports (POP3, IMAP).
    pub fn start(dir: &Path, conf: &DovecotConf) -> Dovecot {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "the Dovecot end-to-end tests need root (dovecot switches users); CI runs as root"
        );
        let bin = super::tool("dovecot");
        let (port, imap) = (super::free_port(), super::free_port());
        // dovecot's auth process runs as user dovecot and must read these
        chmod(dir, "0755");
        let home = dir.join("home/alice");
        let maildir = home.join("Maildir");
        write_folder(&maildir, &conf.inbox);
        for (name, messages) in &conf.folders {
            write_folder(&maildir.join(format!(".{name}")), messages);
        }
        chown_mail(&dir.join("home"));
        let users = dir.join("users");
        std::fs::write(
            &users,
            format!(
                "alice:{{PLAIN}}{}:{MAIL_UID}:{MAIL_UID}::{}\n",
                conf.password,
                home.display()
            ),
        )
        .unwrap();
        chmod(&users, "0644");
        let d = dir.display();
        for sub in ["run", "state", "rawlog"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        // the mail process (uid 65534) writes what it reads after login here
        chmod(&dir.join("rawlog"), "0777");
        let trusted = conf
            .trusted_networks
            .map(|n| format!("login_trusted_networks = {n}\n"))
            .unwrap_or_default();
        let cfg = dir.join("dovecot.conf");
        std::fs::write(
            &cfg,
            format!(
                r#"base_dir = {d}/run
state_dir = {d}/state
protocols = imap pop3
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
# one log line per password mismatch: tests count what reached Dovecot
auth_verbose = yes
log_path = {d}/dovecot.log
mail_location = maildir:~/Maildir
rawlog_dir = {d}/rawlog
first_valid_uid = 1
{trusted}passdb {{
  driver = passwd-file
  args = username_format=%u {d}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {d}/users
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
protocol pop3 {{
  pop3_uidl_format = %08Xu%08Xv
}}
protocol imap {{
  mail_max_userip_connections = 100
  # a session in IDLE sees a delivered message within a second
  mailbox_idle_check_interval = 1 secs
}}
"#
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .arg("-F")
            .arg("-c")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dovecot");
        let dovecot = Dovecot {
            port,
            imap,
            log: dir.join("dovecot.log"),
            maildir,
            child,
        };
        super::wait_port(port);
        super::wait_port(imap);
        // wait_port's probe connections are logged asynchronously; let both
        // land so that later log comparisons only see what the test caused
        for _ in 0..100 {
            if dovecot.log_text().matches("Disconnected").count() >= 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        dovecot
    }

    /// Dovecot's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// fetchmail as alice (password `secret`) against `port` speaking
/// `protocol` (`pop3`, `imap`), TLS 1.2+ with the certificate checked against
/// `ca`; `options`: more of the poll entry (`ssl` for implicit TLS, else
/// STARTTLS; `folder …`). Every message as its MDA got it (LF lines), in the
/// order they were written. `name` keeps the runs in `dir` apart.
pub fn fetchmail(
    dir: &Path,
    name: &str,
    protocol: &str,
    port: u16,
    options: &str,
    ca: &Path,
) -> Vec<Vec<u8>> {
    let out = dir.join(format!("fetchmail-{name}"));
    std::fs::create_dir_all(&out).unwrap();
    let rc = dir.join(format!("fetchmailrc-{name}"));
    std::fs::write(
        &rc,
        format!(
            "set no syslog\nset invisible\n\
             poll 127.0.0.1 service {port} protocol {protocol} timeout 30\n  \
             user \"alice\" password \"secret\" is \"alice\" here\n  \
             {options} sslproto tls1.2+ sslcertck sslcommonname localhost sslcertfile \"{ca}\"\n  \
             keep fetchall no rewrite mda \"cat > {out}/msg.$$\"\n",
            ca = ca.display(),
            out = out.display()
        ),
    )
    .unwrap();
    chmod(&rc, "0600");
    let (ok, stdout, err) = super::run_to_files(
        Command::new(super::tool("fetchmail"))
            .arg("-f")
            .arg(&rc)
            .arg("--idfile")
            .arg(dir.join(format!("fetchids-{name}")))
            .arg("--pidfile")
            .arg(dir.join(format!("fetchmail-{name}.pid")))
            .arg("-v")
            .env("HOME", dir),
        dir,
        Duration::from_secs(60),
    );
    assert!(
        ok,
        "fetchmail {name} failed:\n{}\n{err}",
        String::from_utf8_lossy(&stdout)
    );
    let mut files: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

fn chown_mail(path: &Path) {
    assert!(Command::new("chown")
        .args(["-R", &format!("{MAIL_UID}:{MAIL_UID}")])
        .arg(path)
        .status()
        .unwrap()
        .success());
}
