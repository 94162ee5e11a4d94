//! End to end with a real Postfix behind the `mailgate` binary (issue 6
//! acceptance 3: the client identity reaches Postfix through XCLIENT), the
//! binary run the way the container image runs it (acceptance 5: the
//! Dockerfile's ENTRYPOINT/CMD/USER/HEALTHCHECK, the image's config layout,
//! non-root, STARTTLS end to end), and checks of `examples/compose.yaml` and the
//! config it mounts.
//!
//! Needs root, Postfix (daemons, `postfix`, `smtp-sink`), python3, curl and
//! setpriv: `.ci/run` installs them; without one a test prints `SKIPPED:` and
//! passes, unless `MAILGATE_E2E=require` (CI) makes it fail.
//! Only 127.0.0.0/8 is used. Every process started here is stopped by a Drop
//! guard (Postfix by `postfix stop`, then by PID).

mod common;
mod postfix;

use common::{require_or_skip, run_limited, Guard, Sink};
use postfix::Postfix;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);
const CLIENT_HELO: &str = "real-client.example";
/// The client connects from here; mailgate's own backend connections come
/// from 127.0.0.1, so Postfix's log tells the two apart.
const CLIENT_ADDR: &str = "127.0.0.2";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chmod(p: &Path, mode: &str) {
    let ok = Command::new("chmod")
        .arg(mode)
        .arg(p)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "chmod {mode} {}", p.display());
}

fn chown(p: &Path, owner: &str) {
    let ok = Command::new("chown")
        .arg(owner)
        .arg(p)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "chown {owner} {}", p.display());
}

/// Waits until `port` accepts connections, failing early (with the child's
/// stderr) if the child exits first.
fn wait_listening(child: &mut Guard, port: u16, stderr: &Path) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!(
                "mailgate exited ({status}) before listening on {port}: {}",
                std::fs::read_to_string(stderr).unwrap_or_default()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "mailgate did not listen on 127.0.0.1:{port} within 20 s: {}",
            std::fs::read_to_string(stderr).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

// ---------------------------------------------------------------------------
// Postfix smtpd as the backend (acceptance 3)

/// What one run of the Postfix scenario produced.
struct PostfixRun {
    /// Postfix's maillog (postlogd) after the three deliveries.
    maillog: String,
    /// bob@test.example's mailbox: the three messages as Postfix delivered them.
    mailbox: Vec<String>,
    /// mailgate's stdout (`--log-format json`).
    gateway_log: String,
    /// The client's source port per sender local part.
    client_ports: serde_json::Value,
}

/// Senders, one per mailgate listener: XCLIENT to a Postfix that trusts
/// mailgate; Received header only; XCLIENT configured but Postfix does not
/// trust mailgate (it then does not offer XCLIENT), with the explicit opt-out
/// `identity_optional: true`.
const VIA_XCLIENT: &str = "via-xclient";
const VIA_RECEIVED: &str = "via-received";
const VIA_UNTRUSTED: &str = "via-untrusted";
/// XCLIENT configured, Postfix does not trust mailgate, no opt-out: MAIL gets
/// 451 4.7.0 and Postfix never sees MAIL (issue 11 item 4).
const VIA_STRICT: &str = "via-strict";

/// Real Postfix, mailgate in front of it with three listeners (see the
/// senders above), and Python smtplib delivering one message through each over
/// STARTTLS from 127.0.0.2 with HELO real-client.example.
fn postfix_run() -> PostfixRun {
    let dir = tempfile::tempdir().unwrap();
    let pf = Postfix::start(&dir.path().join("postfix"));

    let gw_dir = dir.path().join("gw");
    std::fs::create_dir_all(&gw_dir).unwrap();
    let (ca, _) = common::dev_cert(&gw_dir);
    let ports = [
        (VIA_XCLIENT, common::free_port()),
        (VIA_RECEIVED, common::free_port()),
        (VIA_UNTRUSTED, common::free_port()),
    ];
    let strict = [(VIA_STRICT, common::free_port())];
    let listeners: String = ports
        .iter()
        .chain(strict.iter())
        .map(|(name, port)| {
            format!("  - {{ name: {name}, protocol: smtp, bind: \"127.0.0.1:{port}\", tls: starttls, require_tls: true, backend: {name} }}\n")
        })
        .collect();
    std::fs::write(
        gw_dir.join("mailgate.yaml"),
        format!(
            "server: {{ hostname: gw.test.example, shutdown_grace: 2s }}
tls:
  certificates: [ {{ cert: cert.pem, key: key.pem }} ]
backends:
  {VIA_XCLIENT}: {{ address: \"127.0.0.1:{x}\", identity: [xclient, received] }}
  {VIA_RECEIVED}: {{ address: \"127.0.0.1:{x}\", identity: [received] }}
  {VIA_UNTRUSTED}: {{ address: \"127.0.0.1:{u}\", identity: [xclient, received], identity_optional: true }}
  {VIA_STRICT}: {{ address: \"127.0.0.1:{u}\", identity: [xclient, received] }}
listeners:
{listeners}",
            x = pf.xclient_port,
            u = pf.untrusting_port
        ),
    )
    .unwrap();
    let stdout = gw_dir.join("stdout.log");
    let stderr = gw_dir.join("stderr.log");
    let mut gw = Guard(
        Command::new(env!("CARGO_BIN_EXE_mailgate"))
            .args(["--log-format", "json", "run", "--config"])
            .arg(&gw_dir)
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap(),
    );
    for (_, port) in ports.iter().chain(strict.iter()) {
        wait_listening(&mut gw, *port, &stderr);
    }

    let py = r#"
import json, smtplib, ssl, sys
ca, helo, src, ports = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
strict = json.loads(sys.argv[5])
ctx = ssl.create_default_context(cafile=ca)
out = {}
# first, so that its Postfix log lines are written before the deliveries'
for name, port in strict.items():
    with smtplib.SMTP("127.0.0.1", port, local_hostname=helo, source_address=(src, 0), timeout=30) as s:
        s.starttls(context=ctx)
        s.ehlo()
        code, text = s.mail(name + "@example.org")
        out[name] = [code, text.decode()]
for name, port in ports.items():
    msg = ("From: %s@example.org\r\nTo: bob@test.example\r\nMessage-ID: <%s@client.example>\r\n"
           "Subject: through %s\r\n\r\nHello from %s.\r\n") % (name, name, name, name)
    with smtplib.SMTP("127.0.0.1", port, local_hostname=helo, source_address=(src, 0), timeout=30) as s:
        out[name] = s.sock.getsockname()[1]
        s.starttls(context=ctx)
        s.ehlo()
        refused = s.sendmail(name + "@example.org", ["bob@test.example"], msg)
        assert refused == {}, refused
print(json.dumps(out))
"#;
    let to_json = |ports: &[(&str, u16)]| {
        serde_json::to_string(
            &ports
                .iter()
                .map(|(n, p)| (n.to_string(), *p))
                .collect::<std::collections::BTreeMap<_, _>>(),
        )
        .unwrap()
    };
    let (ports_json, strict_json) = (to_json(&ports), to_json(&strict));
    let (ok, out, err) = run_limited(
        Command::new("python3")
            .arg("-c")
            .arg(py)
            .arg(&ca)
            .arg(CLIENT_HELO)
            .arg(CLIENT_ADDR)
            .arg(&ports_json)
            .arg(&strict_json),
        LIMIT,
    );
    assert!(
        ok,
        "smtplib through mailgate to Postfix: {out} {err}\nPostfix log:\n{}\nmailgate:\n{}",
        pf.log(),
        std::fs::read_to_string(&stdout).unwrap_or_default()
    );
    let client_ports: serde_json::Value = serde_json::from_str(out.trim()).unwrap();

    let maillog = pf.wait_log("three deliveries to the mailbox", |log| {
        log.matches("status=sent (delivered to file:").count() >= 3
    });
    let mailbox = pf.mailbox();
    assert_eq!(mailbox.len(), 3, "{mailbox:?}");
    drop(gw);
    PostfixRun {
        maillog,
        mailbox,
        gateway_log: std::fs::read_to_string(&stdout).unwrap(),
        client_ports,
    }
}

impl PostfixRun {
    /// Postfix's queue id for the message from `sender@example.org`.
    fn queue_id(&self, sender: &str) -> String {
        let needle = format!(": from=<{sender}@example.org>, size=");
        let line = self
            .maillog
            .lines()
            .find(|l| l.contains("postfix/qmgr[") && l.contains(&needle))
            .unwrap_or_else(|| panic!("no qmgr line for {sender}:\n{}", self.maillog));
        let before = line.split(&needle).next().unwrap();
        before.rsplit(' ').next().unwrap().to_string()
    }

    /// The client smtpd recorded for the message: `name[addr]:port` from the
    /// `QUEUEID: client=` line.
    fn client(&self, sender: &str) -> String {
        let needle = format!("{}: client=", self.queue_id(sender));
        let line = self
            .maillog
            .lines()
            .find(|l| l.contains("postfix/smtpd[") && l.contains(&needle))
            .unwrap_or_else(|| panic!("no smtpd client= line for {sender}:\n{}", self.maillog));
        line.split(&needle).nth(1).unwrap().trim().to_string()
    }

    /// The HELO name smtpd believed when the RCPT for `sender` came (from the
    /// `info: RCPT from ...: helo-logged; ... helo=<...>` line).
    fn helo(&self, sender: &str) -> String {
        let needle = format!("from=<{sender}@example.org>");
        let line = self
            .maillog
            .lines()
            .find(|l| l.contains("info: RCPT from") && l.contains(&needle))
            .unwrap_or_else(|| panic!("no info: RCPT line for {sender}:\n{}", self.maillog));
        line.split("helo=<")
            .nth(1)
            .and_then(|s| s.split('>').next())
            .unwrap_or_else(|| panic!("no helo=<> in {line}"))
            .to_string()
    }

    /// The delivered message from `sender`.
    fn message(&self, sender: &str) -> &str {
        let id = format!("Message-ID: <{sender}@client.example>");
        self.mailbox
            .iter()
            .find(|m| m.contains(&id))
            .unwrap_or_else(|| panic!("{sender}'s message not in the mailbox: {:?}", self.mailbox))
    }

    /// The message's `Received:` headers, unfolded, top first.
    fn received(&self, sender: &str) -> Vec<String> {
        let msg = self.message(sender);
        let head = msg.split("\n\n").next().unwrap();
        let mut out: Vec<String> = Vec::new();
        let mut in_received = false;
        for line in head.lines() {
            if line.starts_with([' ', '\t']) {
                if in_received {
                    let last = out.last_mut().unwrap();
                    last.push(' ');
                    last.push_str(line.trim());
                }
            } else {
                in_received = line.starts_with("Received:");
                if in_received {
                    out.push(line.to_string());
                }
            }
        }
        out
    }

    fn client_port(&self, sender: &str) -> u64 {
        self.client_ports[sender].as_u64().unwrap()
    }
}

/// Issue 11 item 4: XCLIENT configured but Postfix does not trust mailgate
/// (so it does not offer XCLIENT), no `identity_optional`: the client's MAIL
/// gets 451 4.7.0 and Postfix never sees a MAIL command from that session
/// (its `disconnect` lines count `mail=` only for the three deliveries).
#[test]
fn postfix_untrusting_xclient_gets_no_mail() {
    require_or_skip!(root: "a Postfix instance", "postfix", "postconf", "python3");
    let run = postfix_run();
    let strict = &run.client_ports[VIA_STRICT];
    assert_eq!(strict[0], 451, "MAIL through {VIA_STRICT}: {strict}");
    assert!(
        strict[1].as_str().is_some_and(|t| t.starts_with("4.7.0")),
        "{strict}"
    );
    let mails = run
        .maillog
        .lines()
        .filter(|l| l.contains("postfix/smtpd[") && l.contains(": disconnect from "))
        .filter(|l| l.contains(" mail="))
        .count();
    assert_eq!(
        mails, 3,
        "only the three deliveries sent MAIL:\n{}",
        run.maillog
    );
    assert!(!run.maillog.contains(&format!("{VIA_STRICT}@example.org")));
}

/// Acceptance 3 (address): Postfix's log shows the real client's address and
/// port (XCLIENT ADDR/PORT), not mailgate's; without XCLIENT (or when Postfix
/// does not trust mailgate) it shows mailgate's 127.0.0.1 and mail still flows.
/// The delivered message carries mailgate's Received header naming the client,
/// and its session id joins mailgate's JSON log to the message.
#[test]
fn postfix_logs_the_real_client_address_through_xclient() {
    require_or_skip!(root: "a Postfix instance", "postfix", "postconf", "python3");
    let run = postfix_run();

    // XCLIENT: `client=NAME[127.0.0.2]:PORT` with the client's own source port.
    // (No XCLIENT NAME is sent; Postfix keeps the name it looked up for the
    // real TCP peer, so NAME is `localhost` here and not asserted.)
    let client = run.client(VIA_XCLIENT);
    let want = format!("[{CLIENT_ADDR}]:{}", run.client_port(VIA_XCLIENT));
    assert!(
        client.ends_with(&want),
        "Postfix should log the real client {want}, logged client={client}\n{}",
        run.maillog
    );
    // controls: only the Received header, and a Postfix that does not trust us
    for sender in [VIA_RECEIVED, VIA_UNTRUSTED] {
        let client = run.client(sender);
        assert!(
            client.contains("[127.0.0.1]:") && !client.contains(CLIENT_ADDR),
            "{sender}: Postfix can only see mailgate's address, logged client={client}"
        );
    }
    // Postfix's own Received header names the address XCLIENT gave it
    let rcvd = run.received(VIA_XCLIENT);
    assert!(
        rcvd[0].contains(&format!("[{CLIENT_ADDR}])"))
            && rcvd[0].contains("by legacy.test.example (Postfix)"),
        "Postfix's Received header: {rcvd:?}"
    );
    let rcvd = run.received(VIA_RECEIVED);
    assert!(rcvd[0].contains("[127.0.0.1])"), "{rcvd:?}");

    // mailgate's Received header (second from the top) on every message
    for sender in [VIA_XCLIENT, VIA_RECEIVED, VIA_UNTRUSTED] {
        let rcvd = run.received(sender);
        let ours = rcvd
            .iter()
            .find(|h| h.contains("(mailgate)"))
            .unwrap_or_else(|| panic!("{sender}: no mailgate Received header: {rcvd:?}"));
        assert!(
            ours.starts_with(&format!("Received: from {CLIENT_HELO} ([{CLIENT_ADDR}])"))
                && ours.contains("by gw.test.example (mailgate) with ESMTPS"),
            "{sender}: {ours}"
        );
        // the session id in the header is the one in mailgate's JSON log line
        // for this transaction
        let id = ours
            .split(" id ")
            .nth(1)
            .and_then(|s| s.split([' ', ';']).next())
            .unwrap_or_else(|| panic!("no session id in {ours}"));
        let joined = run.gateway_log.lines().any(|l| {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
                return false;
            };
            v["message"] == "transaction"
                && v["span"]["id"] == id
                && v["from"]
                    .as_str()
                    .is_some_and(|f| f.contains(&format!("{sender}@example.org")))
        });
        assert!(
            joined,
            "{sender}: no JSON transaction line with session id {id}:\n{}",
            run.gateway_log
        );
    }
}

/// Acceptance 3 (HELO): Postfix believes the HELO name the real client sent.
/// mailgate passes it as XCLIENT HELO=; Postfix replaces it with the name in
/// any later EHLO, so the EHLO that must follow XCLIENT has to repeat the
/// client's name (as nginx's mail proxy does), not mailgate's own.
#[test]
fn postfix_logs_the_real_client_helo_through_xclient() {
    require_or_skip!(root: "a Postfix instance", "postfix", "postconf", "python3");
    let run = postfix_run();
    let helo = run.helo(VIA_XCLIENT);
    let rcvd = run.received(VIA_XCLIENT);
    assert!(
        helo == CLIENT_HELO,
        "Postfix should see the client's HELO {CLIENT_HELO}, it logged helo=<{helo}> \
         (mailgate's EHLO after XCLIENT overrides XCLIENT HELO=; send the client's HELO \
         name in that EHLO)\nPostfix's Received header: {}\n{}",
        rcvd[0],
        run.maillog
    );
    assert!(
        rcvd[0].starts_with(&format!("Received: from {CLIENT_HELO} (")),
        "Postfix's Received header should name the client's HELO: {rcvd:?}"
    );
    // control: without XCLIENT Postfix sees mailgate's EHLO name
    assert_eq!(run.helo(VIA_RECEIVED), "gw.test.example");
}

/// Issue 17 (backend reuse with XCLIENT): two clients, from 127.0.0.2 and
/// 127.0.0.3 with their own HELO names, one after the other through a
/// backend with `identity: [xclient], reuse: {}` to a Postfix with
/// `main_cf`: each message's `client=` line and Received header name its
/// own client, the second never goes as the first. Postfix's log once
/// `done` holds for it too.
fn kept_xclient_sessions(main_cf: &str, what: &str, done: impl Fn(&str) -> bool) -> String {
    let dir = tempfile::tempdir().unwrap();
    let pf = Postfix::start_with(&dir.path().join("postfix"), main_cf);
    let gw_dir = dir.path().join("gw");
    std::fs::create_dir_all(&gw_dir).unwrap();
    let port = common::free_port();
    std::fs::write(
        gw_dir.join("mailgate.yaml"),
        format!(
            "server: {{ hostname: gw.test.example, shutdown_grace: 2s }}
backends:
  kept: {{ address: \"127.0.0.1:{x}\", identity: [xclient, received], reuse: {{ idle_timeout: 1s }} }}
listeners:
  - {{ name: mx, protocol: smtp, bind: \"127.0.0.1:{port}\", tls: none, backend: kept }}
",
            x = pf.xclient_port
        ),
    )
    .unwrap();
    let stderr = gw_dir.join("stderr.log");
    let mut gw = Guard(
        Command::new(env!("CARGO_BIN_EXE_mailgate"))
            .args(["run", "--config"])
            .arg(&gw_dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_listening(&mut gw, port, &stderr);
    let py = r#"
import json, smtplib, sys, time
port, out = int(sys.argv[1]), {}
for src, helo in (("127.0.0.2", "alpha.example"), ("127.0.0.3", "beta.example")):
    # mailgate keeps the backend connection after the client heard 221: a
    # client that comes back at once may find it not kept yet
    time.sleep(0.3)
    msg = ("From: %s@example.org\r\nTo: bob@test.example\r\nMessage-ID: <%s@client.example>\r\n"
           "Subject: kept\r\n\r\nHello.\r\n") % (helo, helo)
    with smtplib.SMTP("127.0.0.1", port, local_hostname=helo, source_address=(src, 0), timeout=30) as s:
        out[helo] = s.sock.getsockname()[1]
        assert s.sendmail(helo + "@example.org", ["bob@test.example"], msg) == {}
print(json.dumps(out))
"#;
    let (ok, out, err) = run_limited(
        Command::new("python3")
            .arg("-c")
            .arg(py)
            .arg(port.to_string()),
        LIMIT,
    );
    assert!(ok, "smtplib: {out} {err}\n{}", pf.log());
    let ports: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let log = pf.wait_log(what, |log| {
        log.matches("status=sent (delivered to file:").count() >= 2 && done(log)
    });
    let mailbox = pf.mailbox();
    for (src, helo) in [
        ("127.0.0.2", "alpha.example"),
        ("127.0.0.3", "beta.example"),
    ] {
        let qid = log
            .lines()
            .find(|l| {
                l.contains("postfix/qmgr[") && l.contains(&format!("from=<{helo}@example.org>"))
            })
            .and_then(|l| l.split(": from=").next())
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or_else(|| panic!("no qmgr line for {helo}:\n{log}"));
        let client = format!("{qid}: client=unknown[{src}]:{}", ports[helo]);
        let named = format!("{qid}: client=localhost[{src}]:{}", ports[helo]);
        assert!(
            log.contains(&client) || log.contains(&named),
            "{helo}: Postfix should log {client}\n{log}"
        );
        let msg = mailbox
            .iter()
            .find(|m| m.contains(&format!("Message-ID: <{helo}@client.example>")))
            .unwrap_or_else(|| panic!("{helo}'s message not delivered: {mailbox:?}"));
        let postfix_received = msg
            .lines()
            .find(|l| l.starts_with("Received: from "))
            .unwrap();
        assert!(
            postfix_received.starts_with(&format!("Received: from {helo} (")),
            "{helo}: {postfix_received}"
        );
        assert!(
            msg.contains(&format!("[{src}])")),
            "{helo}: Postfix's Received header should name {src}: {msg}"
        );
    }
    drop(gw);
    log
}

/// [`kept_xclient_sessions`] where the clients' addresses are authorized
/// XCLIENT hosts too (127.0.0.0/8): Postfix serves both on one connection
/// (its disconnect line counts two XCLIENTs and two MAILs).
#[test]
fn postfix_sees_each_client_on_a_kept_xclient_connection() {
    require_or_skip!(root: "a Postfix instance", "postfix", "postconf", "python3");
    let one = |l: &str| l.contains(": disconnect from ") && l.contains(" mail=2");
    // the kept connection is closed after its 1 s idle time: then Postfix
    // logs its disconnect line
    let log = kept_xclient_sessions("", "the kept connection's end", |log| log.lines().any(one));
    let disconnect = log.lines().find(|l| one(l)).unwrap();
    // `name=total` or, when some were not counted as successes (Postfix
    // logs XCLIENT's 220 as `xclient=0/2`), `name=ok/total`
    let total = |name: &str| {
        disconnect
            .split(' ')
            .find_map(|w| w.strip_prefix(name))
            .map(|v| v.rsplit('/').next().unwrap_or(v).to_string())
    };
    assert!(
        total("xclient=").as_deref() == Some("2") && total("data=").as_deref() == Some("2"),
        "one connection for both sessions, told each client: {disconnect}\n{log}"
    );
}

/// [`kept_xclient_sessions`] where only mailgate is an authorized XCLIENT
/// host, as is usual: Postfix checks the list again against the address
/// XCLIENT told it and offers XCLIENT no more, so each client has its own
/// connection, closed with QUIT as its session ends (never dropped).
#[test]
fn postfix_that_will_not_be_told_again_gets_a_connection_per_client() {
    require_or_skip!(root: "a Postfix instance", "postfix", "postconf", "python3");
    let each = |l: &str| l.contains(": disconnect from ") && l.contains(" mail=1");
    let log = kept_xclient_sessions(
        "smtpd_authorized_xclient_hosts = 127.0.0.1/32",
        "both clients' connections' ends",
        |log| log.lines().filter(|l| each(l)).count() >= 2,
    );
    for l in log.lines().filter(|l| each(l)) {
        assert!(l.contains(" quit=1"), "closed with QUIT: {l}\n{log}");
    }
    let dropped = |l: &str| l.contains("lost connection") && !l.contains("[127.0.0.1]");
    assert!(!log.lines().any(dropped), "{log}");
}

/// Postfix's reverse-name rules never take mailgate's own name for a
/// client's: XCLIENT's NAME=[UNAVAILABLE] leaves Postfix's reverse client
/// name as it found it for mailgate (smtpd.c `xclient_cmd` updates it only
/// for a NAME it can use), so REVERSE_NAME is said unavailable too. Here
/// mailgate's 127.0.0.1 is `localhost`, which the rule refuses.
#[test]
fn postfix_reverse_name_rules_do_not_see_mailgates_name() {
    require_or_skip!(root: "a Postfix instance", "postfix", "postconf", "python3");
    kept_xclient_sessions(
        "smtpd_client_restrictions = check_reverse_client_hostname_access inline:{ localhost=REJECT }",
        "nothing more",
        |_| true,
    );
}

// ---------------------------------------------------------------------------
// The binary as the container runs it (acceptance 5)

/// What the Dockerfile's final stage says about running the binary.
#[derive(Debug)]
struct Image {
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    uid: u32,
    gid: u32,
    healthcheck: Vec<String>,
    healthcheck_timeout: Duration,
}

/// Issue 17, `reuse:`: three client sessions (Python smtplib over STARTTLS,
/// one after the other) through a backend entry with `reuse: {}` reach the
/// real Postfix over one smtpd connection besides the start-up probe's. The
/// second session ends inside a transaction (MAIL, RCPT, QUIT): Postfix sees
/// its RSET and delivers only the other two messages. At shutdown the idle
/// connection says QUIT, and Postfix's disconnect line counts all of it.
#[test]
fn postfix_serves_later_sessions_on_a_reused_connection() {
    require_or_skip!(root: "a Postfix instance", "postfix", "postconf", "python3");
    let dir = tempfile::tempdir().unwrap();
    let pf = Postfix::start(&dir.path().join("postfix"));
    let gw_dir = dir.path().join("gw");
    std::fs::create_dir_all(&gw_dir).unwrap();
    let (ca, _) = common::dev_cert(&gw_dir);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let yaml = common::Yaml::new()
        .listener("mx", "smtp", "starttls", "")
        .certs(&gw_dir)
        .backend("b", &format!("127.0.0.1:{}", pf.xclient_port), "reuse: {}")
        .build();
    let gw = rt.block_on(common::start(&yaml));
    let port = gw.addr("mx").unwrap().port();
    let py = r#"
import smtplib, ssl, sys, time
ca, port = sys.argv[1], int(sys.argv[2])
ctx = ssl.create_default_context(cafile=ca)
for i in range(3):
    # mailgate keeps the backend connection (after an RSET for the second
    # session's open transaction) once the client heard 221: a client that
    # comes back at once may find it not kept yet and get a new one
    time.sleep(0.3)
    with smtplib.SMTP("127.0.0.1", port, local_hostname="real-client.example", timeout=30) as s:
        s.starttls(context=ctx)
        s.ehlo()
        if i == 1:
            assert s.mail("abandoned@example.org")[0] == 250
            assert s.rcpt("bob@test.example")[0] == 250
            continue
        msg = "From: reuse%d@example.org\r\nTo: bob@test.example\r\nSubject: reuse %d\r\n\r\nHello.\r\n" % (i, i)
        assert s.sendmail("reuse%d@example.org" % i, ["bob@test.example"], msg) == {}
print("sent")
"#;
    let (ok, out, err) = run_limited(
        Command::new("python3")
            .arg("-c")
            .arg(py)
            .arg(&ca)
            .arg(port.to_string()),
        LIMIT,
    );
    assert!(
        ok && out.contains("sent"),
        "smtplib: {out} {err}\n{}",
        pf.log()
    );
    pf.wait_log("two deliveries", |log| {
        log.matches("status=sent (delivered to file:").count() >= 2
    });
    rt.block_on(gw.shutdown());
    let log = pf.wait_log("the reused connection's disconnect", |log| {
        log.lines()
            .any(|l| l.contains(": disconnect from ") && l.contains(" mail=3"))
    });
    let smtpd = |what: &str| -> Vec<&str> {
        log.lines()
            .filter(|l| l.contains("postfix/smtpd[") && l.contains(what))
            .collect()
    };
    // the probe's connection and the one all three sessions shared (the
    // others without EHLO are the tests' own checks that Postfix listens)
    let sessions: Vec<&str> = smtpd(": disconnect from ")
        .into_iter()
        .filter(|l| l.contains(" ehlo="))
        .collect();
    assert_eq!(sessions.len(), 2, "{log}");
    let shared = sessions.iter().find(|l| l.contains(" mail=")).unwrap();
    for count in [
        "ehlo=1 ", "mail=3 ", "rcpt=3 ", "data=2 ", "rset=1 ", "quit=1 ",
    ] {
        assert!(shared.contains(count), "{count}: {shared}");
    }
    let mailbox = pf.mailbox();
    assert_eq!(mailbox.len(), 2, "{mailbox:?}");
    assert!(
        !mailbox.iter().any(|m| m.contains("abandoned")),
        "{mailbox:?}"
    );
}

/// The final stage's ENTRYPOINT, CMD, USER and HEALTHCHECK (exec forms).
fn image() -> Image {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    // comment lines go first (they may sit inside a continuation), then
    // backslash continuations are joined into logical lines
    let mut logical: Vec<String> = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        match line.trim_end().strip_suffix('\\') {
            Some(part) => {
                cur.push_str(part);
                cur.push(' ');
            }
            None => {
                cur.push_str(line);
                logical.push(std::mem::take(&mut cur));
            }
        }
    }
    let (mut entrypoint, mut cmd, mut user, mut health) = (None, None, None, None);
    for l in logical {
        let l = l.trim();
        let (kw, rest) = l.split_once(char::is_whitespace).unwrap_or((l, ""));
        let rest = rest.trim();
        let exec_form = |what: &str, s: &str| -> Vec<String> {
            serde_json::from_str(s).unwrap_or_else(|e| {
                panic!("Dockerfile {what} must be exec form (JSON array; PID 1 gets the signals): {s}: {e}")
            })
        };
        match kw.to_ascii_uppercase().as_str() {
            "FROM" => (entrypoint, cmd, user, health) = (None, None, None, None),
            "ENTRYPOINT" => entrypoint = Some(exec_form("ENTRYPOINT", rest)),
            "CMD" => cmd = Some(exec_form("CMD", rest)),
            "USER" => user = Some(rest.to_string()),
            "HEALTHCHECK" => {
                let (opts, c) = rest
                    .split_once(" CMD ")
                    .unwrap_or_else(|| panic!("HEALTHCHECK without CMD: {rest}"));
                let timeout = opts
                    .split_whitespace()
                    .find_map(|o| o.strip_prefix("--timeout="))
                    .and_then(|t| t.strip_suffix('s'))
                    .and_then(|t| t.parse().ok())
                    .map(Duration::from_secs)
                    .unwrap_or(Duration::from_secs(30));
                health = Some((exec_form("HEALTHCHECK CMD", c.trim()), timeout));
            }
            _ => {}
        }
    }
    let user = user.expect("Dockerfile: the final stage sets no USER (runs as root)");
    let (uid, gid) = user
        .split_once(':')
        .map(|(u, g)| (u.parse(), g.parse()))
        .and_then(|(u, g)| Some((u.ok()?, g.ok()?)))
        .unwrap_or_else(|| panic!("Dockerfile USER {user:?}: expected numeric uid:gid"));
    assert_ne!(uid, 0, "Dockerfile USER must not be root");
    let (healthcheck, healthcheck_timeout) = health.expect("Dockerfile has no HEALTHCHECK");
    Image {
        entrypoint: entrypoint.expect("Dockerfile has no ENTRYPOINT"),
        cmd: cmd.expect("Dockerfile has no CMD"),
        uid,
        gid,
        healthcheck,
        healthcheck_timeout,
    }
}

/// The image's paths mapped into `root` (a directory laid out like the
/// image): the ENTRYPOINT binary is the one cargo built, /etc/mailgate is
/// `root/etc/mailgate`.
fn remap(args: &[String], image: &Image, root: &Path) -> Vec<String> {
    args.iter()
        .map(|a| {
            if *a == image.entrypoint[0] {
                env!("CARGO_BIN_EXE_mailgate").to_string()
            } else if a == "/etc/mailgate" || a.starts_with("/etc/mailgate/") {
                root.join(&a[1..]).display().to_string()
            } else {
                a.clone()
            }
        })
        .collect()
}

/// `args` as the image's USER, with a container-like environment.
fn as_image_user(image: &Image, root: &Path, args: &[String]) -> Command {
    let mut c = Command::new(common::tool("setpriv"));
    c.arg(format!("--reuid={}", image.uid))
        .arg(format!("--regid={}", image.gid))
        .arg("--clear-groups")
        .arg("--")
        .args(args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .current_dir(root);
    c
}

struct ContainerRun {
    argv: Vec<String>,
    stdout: String,
    /// The session id from mailgate's Received header on the delivered message.
    session_id: String,
}

/// Lays out `root/etc/mailgate` like the image (root:GID 0750 directories,
/// config and certificates readable by the image's group only), runs
/// ENTRYPOINT+CMD as the image's USER in front of smtp-sink, delivers one
/// message with curl over STARTTLS, runs the HEALTHCHECK while it runs and
/// after SIGTERM stopped it.
fn container_run() -> ContainerRun {
    postfix::require_root("running the binary as the image's user (setpriv)");
    let image = image();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("image");
    let etc = root.join("etc/mailgate");
    let certs = etc.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let sink = Sink::start(&dir.path().join("sink"));

    common::dev_cert(&certs);
    let (smtp, metrics) = (common::free_port(), common::free_port());
    std::fs::write(
        etc.join("mailgate.yaml"),
        format!(
            "server: {{ hostname: mail.container.test, shutdown_grace: 3s }}
tls:
  certificates: [ {{ cert: certs/cert.pem, key: certs/key.pem }} ]
backends:
  legacy-smtp: {{ address: \"127.0.0.1:{sink}\" }}
listeners:
  - {{ name: mx, protocol: smtp, bind: \"127.0.0.1:{smtp}\", tls: starttls, require_tls: true, backend: legacy-smtp }}
metrics: {{ bind: \"127.0.0.1:{metrics}\" }}
",
            sink = sink.port
        ),
    )
    .unwrap();
    // as `install -d -o root -g mailgate -m 0750` in the Dockerfile; the files
    // are readable by the image's group, not by others
    let group = format!("0:{}", image.gid);
    for p in [&root, &root.join("etc"), &dir.path().to_path_buf()] {
        chmod(p, "0755");
    }
    for d in [&etc, &certs] {
        chown(d, &group);
        chmod(d, "0750");
    }
    for f in [
        etc.join("mailgate.yaml"),
        certs.join("cert.pem"),
        certs.join("key.pem"),
    ] {
        chown(&f, &group);
        chmod(&f, "0640");
    }

    let argv = remap(
        &[image.entrypoint.clone(), image.cmd.clone()].concat(),
        &image,
        &root,
    );
    let stdout = dir.path().join("stdout.log");
    let stderr = dir.path().join("stderr.log");
    let mut gw = Guard(
        as_image_user(&image, &root, &argv)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_listening(&mut gw, smtp, &stderr);
    let pid = gw.0.id();

    // setpriv exec'd mailgate: same PID, the image's uid/gid, no groups
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or("")
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(field("Uid:"), vec![image.uid.to_string(); 4], "{status}");
    assert_eq!(field("Gid:"), vec![image.gid.to_string(); 4], "{status}");
    assert!(field("Groups:").is_empty(), "{status}");
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe, Path::new(env!("CARGO_BIN_EXE_mailgate")));

    // a real client, STARTTLS required, certificate verified
    let eml = dir.path().join("msg.eml");
    std::fs::write(
        &eml,
        "From: alice@example.org\r\nTo: bob@example.net\r\nSubject: container\r\n\r\nHello from the container test.\r\n",
    )
    .unwrap();
    let (ok, out, err) = run_limited(
        Command::new("curl")
            .args(["-sS", "--ssl-reqd", "--max-time", "30", "--cacert"])
            .arg(certs.join("cert.pem"))
            .args([
                "--url",
                &format!("smtp://127.0.0.1:{smtp}"),
                "--mail-from",
                "alice@example.org",
                "--mail-rcpt",
                "bob@example.net",
                "-T",
            ])
            .arg(&eml),
        LIMIT,
    );
    assert!(
        ok,
        "curl STARTTLS through the container-style mailgate: {out} {err}\nmailgate stdout:\n{}\nstderr:\n{}",
        std::fs::read_to_string(&stdout).unwrap_or_default(),
        std::fs::read_to_string(&stderr).unwrap_or_default()
    );
    assert_eq!(sink.wait_count(1), 1, "the sink got the message");
    let msg = String::from_utf8_lossy(&sink.messages()[0]).into_owned();
    assert!(
        msg.contains("by mail.container.test (mailgate) with ESMTPS")
            && msg.contains("(version=TLSv1.")
            && msg.contains("Hello from the container test."),
        "{msg}"
    );
    let session_id = msg
        .split("\tid ")
        .nth(1)
        .and_then(|s| s.split(|c: char| c.is_whitespace() || c == ';').next())
        .unwrap_or_else(|| panic!("no session id in the Received header: {msg}"))
        .to_string();

    // the image's HEALTHCHECK, as the image's user, within its timeout
    let health = remap(&image.healthcheck, &image, &root);
    let limit = image.healthcheck_timeout + Duration::from_secs(5);
    let (ok, out, err) = run_limited(&mut as_image_user(&image, &root, &health), limit);
    assert!(ok, "HEALTHCHECK {health:?} while running: {out} {err}");

    // SIGTERM (docker stop): a clean exit within shutdown_grace
    let ok = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -TERM {pid}");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = gw.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "mailgate did not stop within 15 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(25));
    };
    assert!(
        status.success(),
        "exit after SIGTERM: {status}: {}",
        std::fs::read_to_string(&stderr).unwrap_or_default()
    );
    // and the health check notices
    let (ok, _, _) = run_limited(&mut as_image_user(&image, &root, &health), limit);
    assert!(!ok, "HEALTHCHECK must fail once mailgate is gone");

    ContainerRun {
        argv,
        stdout: std::fs::read_to_string(&stdout).unwrap(),
        session_id,
    }
}

/// Acceptance 5: ENTRYPOINT+CMD exactly as in the Dockerfile, as the image's
/// non-root USER, with the image's config layout, serves a STARTTLS session
/// end to end; the HEALTHCHECK passes while it runs and fails after SIGTERM.
#[test]
fn container_entrypoint_serves_starttls_as_non_root() {
    require_or_skip!(root: "running the binary as the image's user (setpriv)", "setpriv", "curl", "smtp-sink");
    let run = container_run();
    assert!(!run.session_id.is_empty());
}

/// Issue 6: the container logs JSON to stdout: every line of ENTRYPOINT+CMD's
/// stdout is a JSON object, and the transaction's line carries the session id
/// that the Received header gave the backend (so both logs can be joined).
#[test]
fn container_entrypoint_logs_json_lines() {
    require_or_skip!(root: "running the binary as the image's user (setpriv)", "setpriv", "curl", "smtp-sink");
    let run = container_run();
    let lines: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(!lines.is_empty(), "no log lines on stdout");
    let mut parsed = Vec::new();
    for l in &lines {
        match serde_json::from_str::<serde_json::Value>(l) {
            Ok(v) if v.is_object() => parsed.push(v),
            _ => panic!(
                "the image's ENTRYPOINT+CMD {:?} logs a non-JSON line: {l}\n\
                 (issue 6: JSON to stdout in the container; e.g. CMD [\"--log-format\", \"json\", \"run\", \"--config\", \"/etc/mailgate\"])",
                run.argv
            ),
        }
    }
    let tx = parsed
        .iter()
        .find(|v| v["message"] == "transaction")
        .unwrap_or_else(|| panic!("no transaction line:\n{}", run.stdout));
    assert_eq!(tx["span"]["id"], run.session_id.as_str(), "{tx}");
    assert_eq!(tx["span"]["listener"], "mx", "{tx}");
    assert!(
        tx["span"]["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{tx}"
    );
    assert!(
        tx["from"]
            .as_str()
            .is_some_and(|f| f.contains("alice@example.org")),
        "{tx}"
    );
    assert_eq!(tx["rcpts"], 1, "{tx}");
    let end = parsed
        .iter()
        .find(|v| v["message"] == "session end" && v["span"]["id"] == tx["span"]["id"])
        .unwrap_or_else(|| panic!("no session end line for the session:\n{}", run.stdout));
    assert_eq!(end["messages"], 1, "{end}");
    assert!(
        end["tls"].as_str().is_some_and(|t| t.starts_with("TLSv1.")),
        "{end}"
    );
}

// ---------------------------------------------------------------------------
// examples/compose.yaml and examples/mailgate

/// The config the compose file mounts is accepted by `mailgate check` (its
/// certificate files are not in the repository: warnings only), and the
/// compose file parses, builds mailgate from the Dockerfile, mounts config and
/// certificates read-only where the image reads them, publishes every port the
/// config listens on, has a health check, and names backends that are services.
#[test]
fn compose_example_matches_its_mailgate_config() {
    let examples = repo().join("examples");
    let (ok, out, err) = run_limited(
        Command::new(env!("CARGO_BIN_EXE_mailgate"))
            .args(["check", "--config"])
            .arg(examples.join("mailgate")),
        LIMIT,
    );
    assert!(ok, "mailgate check --config examples/mailgate: {out} {err}");

    let yaml = |p: &Path| -> serde_yaml::Value {
        serde_yaml::from_str(&std::fs::read_to_string(p).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    let compose = yaml(&examples.join("compose.yaml"));
    let services = compose["services"]
        .as_mapping()
        .expect("compose.yaml: services");
    let gw = &compose["services"]["mailgate"];
    assert_eq!(gw["build"]["dockerfile"].as_str(), Some("Dockerfile"));
    let context = examples.join(gw["build"]["context"].as_str().expect("build.context"));
    assert!(
        context.join("Dockerfile").is_file(),
        "build context {} has no Dockerfile",
        context.display()
    );
    let volumes: Vec<&str> = gw["volumes"]
        .as_sequence()
        .expect("mailgate volumes")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    for target in ["/etc/mailgate", "/etc/mailgate/certs"] {
        let v = volumes
            .iter()
            .find(|v| v.split(':').nth(1) == Some(target))
            .unwrap_or_else(|| panic!("nothing mounted at {target}: {volumes:?}"));
        assert!(v.ends_with(":ro"), "{v} must be read-only");
        let host = examples.join(v.split(':').next().unwrap());
        assert!(host.is_dir(), "{v}: {} is not a directory", host.display());
    }
    let config_host = volumes
        .iter()
        .find(|v| v.split(':').nth(1) == Some("/etc/mailgate"))
        .map(|v| examples.join(v.split(':').next().unwrap()))
        .unwrap();
    assert_eq!(
        config_host.canonicalize().unwrap(),
        examples.join("mailgate").canonicalize().unwrap(),
        "the mounted config is the one checked above"
    );
    let published: Vec<u16> = gw["ports"]
        .as_sequence()
        .expect("mailgate ports")
        .iter()
        .filter_map(|p| p.as_str())
        .filter_map(|p| p.rsplit(':').next()?.parse().ok())
        .collect();
    for port in [25, 465, 587, 110, 995, 9090] {
        assert!(
            published.contains(&port),
            "port {port} not published: {published:?}"
        );
    }
    let test = format!("{:?}", gw["healthcheck"]["test"]);
    assert!(test.contains("healthcheck"), "mailgate healthcheck: {test}");

    // every port the mounted config binds is published; every backend host is
    // a compose service
    let mut binds = Vec::new();
    let mut backends = Vec::new();
    for e in std::fs::read_dir(examples.join("mailgate")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            let v = yaml(&p);
            for l in v["listeners"].as_sequence().into_iter().flatten() {
                binds.push(l["bind"].as_str().unwrap().to_string());
            }
            if let Some(b) = v["metrics"]["bind"].as_str() {
                binds.push(b.to_string());
            }
            for (_, b) in v["backends"].as_mapping().into_iter().flatten() {
                backends.push(b["address"].as_str().unwrap().to_string());
            }
        }
    }
    assert!(!binds.is_empty() && !backends.is_empty());
    for b in &binds {
        let port: u16 = b.rsplit(':').next().unwrap().parse().unwrap();
        assert!(
            published.contains(&port),
            "{b} is not published: {published:?}"
        );
    }
    for a in &backends {
        let host = a.rsplit_once(':').unwrap().0;
        assert!(
            services.contains_key(host),
            "backend {a}: no compose service {host}"
        );
    }
}
