//! DKIM signing end to end (issue 16): a client logs in (AUTH over
//! STARTTLS) on a submission listener of the `mailgate` binary, which signs
//! and relays to a real Postfix smtpd (SASL by a Dovecot auth service);
//! Postfix delivers to an mbox file, and the stored message is verified by
//! dkimpy (`python3-dkim`) and by mailgate's own verifier, both against the
//! TXT records of keys made by `mailgate dkim keygen`, served by a DNS server
//! on loopback (tests/dns).
//!
//! Acceptance 1: RSA and Ed25519 signatures (dual signing) verify.
//! Acceptance 2: an unknown From domain is refused (`unknown_domain: reject`)
//! or relayed unsigned (`pass`); an MX session (no AUTH) is not signed.
//! Acceptance 3: a 10 MiB message and one with `.`-lines verify after the trip.
//! Also: SIGHUP reloads keys and keeps them when a key file is broken; key
//! files from openssl load, short RSA keys are refused naming the file.
//!
//! Needs root, Postfix, Dovecot, dkimpy (`dkimverify`), openssl: `.ci/run`
//! installs them; without one a test prints `SKIPPED:` and passes, unless
//! `MAILGATE_E2E=require`. Only 127.0.0.1 is used; every process started
//! here is stopped by a Drop guard, by PID.

mod common;
mod dns;
mod postfix;

use common::{require_or_skip, run_limited, Guard, SmtpClient};
use dns::{TestDns, Zone};
use postfix::{chmod, Postfix};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(120);

fn mailgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mailgate"))
}

/// `mailgate dkim keygen`; returns the TXT record it says to publish.
fn keygen(domain: &str, selector: &str, algorithm: &str, out: &Path) -> String {
    let (ok, stdout, stderr) = run_limited(
        mailgate()
            .args(["dkim", "keygen", "--domain", domain, "--selector", selector])
            .args(["--algorithm", algorithm, "--out"])
            .arg(out),
        LIMIT,
    );
    assert!(ok, "keygen: {stdout}{stderr}");
    record_of(&stdout, &format!("{selector}._domainkey.{domain}."))
}

/// The TXT strings printed after `name` (a zone-file entry), joined.
fn record_of(text: &str, name: &str) -> String {
    let at = text
        .find(&format!("{name} IN TXT ("))
        .unwrap_or_else(|| panic!("no record for {name} in {text}"));
    let entry = &text[at..text[at..].find(')').map_or(text.len(), |e| at + e)];
    entry.split('"').skip(1).step_by(2).collect()
}

// ---------------------------------------------------------------------------
// Dovecot as Postfix's SASL service

/// A Dovecot with only its auth service, on a loopback port (user alice, password secret).
struct DovecotAuth {
    port: u16,
    _child: Guard,
}

fn dovecot_auth(dir: &Path) -> DovecotAuth {
    std::fs::create_dir_all(dir).unwrap();
    chmod(dir, "0755");
    let port = common::free_port();
    let users = dir.join("users");
    std::fs::write(&users, "alice:{PLAIN}secret::::::\n").unwrap();
    chmod(&users, "0644");
    for sub in ["run", "state"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let d = dir.display();
    let conf = dir.join("dovecot.conf");
    std::fs::write(
        &conf,
        format!(
            r#"base_dir = {d}/run
state_dir = {d}/state
protocols = none
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
log_path = {d}/dovecot.log
passdb {{
  driver = passwd-file
  args = username_format=%u {d}/users
}}
userdb {{
  driver = static
  args = uid=65534 gid=65534 home=/nonexistent
}}
service auth {{
  inet_listener {{
    address = 127.0.0.1
    port = {port}
  }}
}}
"#
        ),
    )
    .unwrap();
    let child = Command::new(common::tool("dovecot"))
        .arg("-F")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
        .spawn()
        .expect("start dovecot");
    let child = Guard(child);
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "dovecot auth did not listen: {}{}",
            std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default(),
            std::fs::read_to_string(dir.join("dovecot.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    DovecotAuth {
        port,
        _child: child,
    }
}

// ---------------------------------------------------------------------------
// The rig: DNS, Dovecot, Postfix, mailgate

/// The settings README gives for keeping relayed mail intact, plus SASL and
/// room for the 10 MiB message.
fn postfix_settings(sasl_port: u16) -> String {
    format!(
        "smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = inet:127.0.0.1:{sasl_port}
local_header_rewrite_clients =
disable_mime_output_conversion = yes
message_size_limit = 40000000
mailbox_size_limit = 0
"
    )
}

struct Key {
    domain: &'static str,
    selector: &'static str,
    path: PathBuf,
}

struct Rig {
    dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    dns: TestDns,
    pf: Postfix,
    _dovecot: DovecotAuth,
    gw: Guard,
    addrs: HashMap<String, SocketAddr>,
    ca: PathBuf,
    log: PathBuf,
    config: PathBuf,
    zone: Zone,
}

const LISTENERS: [&str; 4] = ["submission", "submission-pass", "mx", "metrics"];

/// mailgate's configuration: three listeners in front of Postfix, each
/// policy with the same `keys` (a YAML list).
fn gateway_yaml(dns: SocketAddr, backend: u16, keys: &str) -> String {
    format!(
        r#"server: {{ hostname: gw.test.example, shutdown_grace: 2s }}
dns: {{ nameservers: ["{dns}"], timeout: 2s, attempts: 1 }}
metrics: {{ bind: "127.0.0.1:0" }}
tls:
  certificates: [ {{ cert: cert.pem, key: key.pem }} ]
backends:
  postfix: {{ address: "127.0.0.1:{backend}" }}
listeners:
  - {{ name: submission, protocol: smtp, bind: "127.0.0.1:0", tls: starttls, require_tls: true, auth: required, backend: postfix, policy: submission, max_message_size: 20MiB }}
  - {{ name: submission-pass, protocol: smtp, bind: "127.0.0.1:0", tls: starttls, require_tls: true, auth: required, backend: postfix, policy: submission-pass }}
  - {{ name: mx, protocol: smtp, bind: "127.0.0.1:0", tls: starttls, backend: postfix, policy: mx }}
policies:
  submission:
    dkim_sign:
      keys: {keys}
      unknown_domain: reject
  submission-pass:
    dkim_sign:
      keys: {keys}
      unknown_domain: pass
  mx:
    dkim_sign:
      keys: {keys}
"#
    )
}

fn keys_yaml(keys: &[Key]) -> String {
    let k: Vec<String> = keys
        .iter()
        .map(|k| {
            format!(
                "{{ domain: {}, selector: {}, key: {} }}",
                k.domain,
                k.selector,
                k.path.display()
            )
        })
        .collect();
    format!("[ {} ]", k.join(", "))
}

impl Rig {
    fn start() -> Rig {
        Rig::start_with(&[])
    }

    /// With one more Ed25519 key per `(domain as the YAML writes it,
    /// its A-labels, selector)`, published under the A-labels.
    fn start_with(extra: &[(&'static str, &str, &'static str)]) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        chmod(dir.path(), "0755");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let gw_dir = dir.path().join("gw");
        std::fs::create_dir_all(gw_dir.join("keys")).unwrap();
        let mut zone = Zone::new();
        let mut keys = Vec::new();
        for (selector, algorithm) in [("s2026", "rsa"), ("ed2026", "ed25519")] {
            let path = gw_dir.join(format!("keys/example.org.{selector}.pem"));
            let record = keygen("example.org", selector, algorithm, &path);
            zone.add_txt(&format!("{selector}._domainkey.example.org"), &record);
            keys.push(Key {
                domain: "example.org",
                selector,
                path,
            });
        }
        for (domain, a_labels, selector) in extra {
            let path = gw_dir.join(format!("keys/{a_labels}.{selector}.pem"));
            let record = keygen(a_labels, selector, "ed25519", &path);
            zone.add_txt(&format!("{selector}._domainkey.{a_labels}"), &record);
            keys.push(Key {
                domain,
                selector,
                path,
            });
        }
        let dns = rt.block_on(TestDns::start(zone.clone()));
        let dovecot = dovecot_auth(&dir.path().join("dovecot"));
        let pf = Postfix::start_with(&dir.path().join("postfix"), &postfix_settings(dovecot.port));
        let (ca, _) = common::dev_cert(&gw_dir);
        let config = gw_dir.join("mailgate.yaml");
        std::fs::write(
            &config,
            gateway_yaml(dns.addr, pf.xclient_port, &keys_yaml(&keys)),
        )
        .unwrap();
        let log = gw_dir.join("stdout.log");
        let gw = Guard(
            mailgate()
                .args(["--log-format", "json", "run", "--config"])
                .arg(&config)
                .stdout(std::fs::File::create(&log).unwrap())
                .stderr(std::fs::File::create(gw_dir.join("stderr.log")).unwrap())
                .spawn()
                .unwrap(),
        );
        let addrs = common::listening(&log, &LISTENERS);
        // the listeners do not wait for the start-up probe of Postfix's
        // EHLO (backend/probe.rs); until it answers, AUTH is not offered,
        // and every test here submits with AUTH at once
        let start = std::time::Instant::now();
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("backend capabilities")
        {
            assert!(
                start.elapsed() < LIMIT,
                "the probe of Postfix never answered"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Rig {
            dir,
            rt,
            dns,
            pf,
            _dovecot: dovecot,
            gw,
            addrs,
            ca,
            log,
            config,
            zone,
        }
    }

    /// Sends `message` through `listener` (STARTTLS, then AUTH when `auth`);
    /// returns the reply to the end of DATA.
    fn send(&self, listener: &str, auth: bool, from: &str, message: &[u8]) -> String {
        let addr = self.addrs[listener];
        self.rt.block_on(async {
            tokio::time::timeout(LIMIT, submit(addr, &self.ca, auth, from, message))
                .await
                .expect("the SMTP conversation timed out")
        })
    }

    fn gateway_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The messages Postfix delivered to bob, once `n` are delivered (the
    /// log says so: the mbox grows while local(8) writes), turned back into
    /// the CRLF form they travelled in (the mbox `From ` line removed).
    fn delivered(&self, n: usize) -> Vec<Vec<u8>> {
        self.pf.wait_log(&format!("{n} deliveries"), |l| {
            l.matches("status=sent").count() >= n
        });
        self.pf.mailbox().iter().map(|m| crlf_of_mbox(m)).collect()
    }

    fn metrics(&self) -> String {
        let addr = self.addrs["metrics"];
        let (ok, out, err) = run_limited(
            Command::new("curl")
                .args(["-s", "--max-time", "10"])
                .arg(format!("http://{addr}/metrics")),
            LIMIT,
        );
        assert!(ok, "curl /metrics: {err}");
        out
    }

    /// dkimpy's verdict per signature of `message`: `a=/d=/s= True|False`.
    fn dkimpy(&self, message: &[u8]) -> Vec<String> {
        let file = self.dir.path().join("dkimpy-message.eml");
        std::fs::write(&file, message).unwrap();
        let (ok, out, err) = run_limited(
            Command::new(dkimpy_python())
                .arg("-c")
                .arg(DKIMPY)
                .arg(&file)
                .arg(self.dns.addr.port().to_string()),
            LIMIT,
        );
        assert!(ok, "dkimpy: {out}{err}");
        out.lines().map(str::to_string).collect()
    }

    /// mailgate's own verifier on `message`, against the same DNS server:
    /// `a=/d=/s= result` per signature.
    fn mailgate_verifies(&self, message: &[u8]) -> Vec<String> {
        let file: mailgate::auth::DnsFile = serde_yaml::from_str(&format!(
            "{{ nameservers: [\"{}\"], timeout: 2s, attempts: 1 }}",
            self.dns.addr
        ))
        .unwrap();
        let verifier = mailgate::auth::Verifier::new(&file.to_settings().unwrap()).unwrap();
        let want = mailgate::auth::Checks {
            dkim: true,
            ..Default::default()
        };
        let message = message.to_vec();
        let o = self.rt.block_on(async move {
            verifier
                .message(
                    &message,
                    "127.0.0.1".parse().unwrap(),
                    "gw.test.example",
                    "alice@example.org",
                    None,
                    want,
                )
                .await
        });
        o.dkim
            .unwrap_or_default()
            .iter()
            .map(|s| {
                format!(
                    "{}/{}/{} {}",
                    s.algorithm,
                    s.domain,
                    s.selector,
                    s.result.as_str()
                )
            })
            .collect()
    }
}

/// The interpreter dkimpy was installed for (dkimverify's `#!` line): on a
/// machine with several Pythons (pyenv) the first `python3` may not have it.
fn dkimpy_python() -> PathBuf {
    let script = std::fs::read_to_string(common::tool("dkimverify")).unwrap_or_default();
    let shebang = script.lines().next().unwrap_or_default();
    let interpreter = shebang
        .trim_start_matches("#!")
        .split_whitespace()
        .collect::<Vec<_>>();
    match interpreter.as_slice() {
        [env, name, ..] if env.ends_with("/env") => common::tool(name),
        [path, ..] => PathBuf::from(path),
        [] => common::tool("python3"),
    }
}

/// Verifies every DKIM-Signature of the message in argv[1] with dkimpy,
/// asking the DNS server on 127.0.0.1:argv[2] (dnspython).
const DKIMPY: &str = r#"
import sys, dkim, dns.resolver
r = dns.resolver.Resolver(configure=False)
r.nameservers = ["127.0.0.1"]
r.port = int(sys.argv[2])
def txt(name, timeout=5):
    name = name.decode() if isinstance(name, bytes) else name
    answer = r.resolve(name, "TXT", lifetime=timeout)
    return b"".join(s for rr in answer for s in rr.strings)
message = open(sys.argv[1], "rb").read()
d = dkim.DKIM(message)
n = len([1 for name, _ in d.headers if name.lower() == b"dkim-signature"])
for i in range(n):
    try:
        ok, why = d.verify(idx=i, dnsfunc=txt), ""
    except dkim.DKIMException as e:
        ok, why = False, " (%s)" % e
    f = d.signature_fields
    print("%s/%s/%s %s%s" % (f[b"a"].decode(), f[b"d"].decode(), f[b"s"].decode(), ok, why))
"#;

/// An mbox message (LF line ends, `From ` line first) → CRLF, without the `From ` line.
fn crlf_of_mbox(m: &str) -> Vec<u8> {
    let body = m.split_once('\n').map_or("", |(_, rest)| rest);
    body.replace('\n', "\r\n").into_bytes()
}

/// The reply to the end of a message, which may take longer than the
/// client's wait for one read on a loaded machine: a 10 MiB body is signed
/// twice (a debug build) and Postfix syncs its queue file before it answers.
async fn final_reply(c: &mut SmtpClient<common::Tls>) -> String {
    use tokio::io::AsyncReadExt as _;
    let mut tmp = [0u8; 512];
    while !c.buf.contains(&b'\n') {
        match tokio::time::timeout(LIMIT, c.s.read(&mut tmp)).await {
            Ok(Ok(n)) if n > 0 => c.buf.extend_from_slice(&tmp[..n]),
            other => panic!("no reply to the message within {LIMIT:?}: {other:?}"),
        }
    }
    c.text().await
}

/// One message to bob@test.example over STARTTLS (and AUTH PLAIN as
/// alice when `auth`); the reply to the end of DATA.
async fn submit(addr: SocketAddr, ca: &Path, auth: bool, from: &str, message: &[u8]) -> String {
    use base64::Engine as _;
    let mut c = SmtpClient::greeted(addr).await.starttls(ca).await;
    let ehlo = c.cmd("EHLO client.example").await;
    if auth {
        assert!(ehlo.contains("AUTH"), "{ehlo}");
        let creds = base64::engine::general_purpose::STANDARD.encode(b"\0alice\0secret");
        c.send(format!("AUTH PLAIN {creds}\r\n").as_bytes()).await;
        c.expect(235).await;
    }
    // an internationalised address needs SMTPUTF8 (RFC 6531)
    let utf8 = if from.is_ascii() { "" } else { " SMTPUTF8" };
    c.send(format!("MAIL FROM:<{from}>{utf8}\r\n").as_bytes())
        .await;
    c.expect(250).await;
    c.send(b"RCPT TO:<bob@test.example>\r\n").await;
    c.expect(250).await;
    c.send(b"DATA\r\n").await;
    c.expect(354).await;
    c.send(&mailgate::smtp::data::stuff(&[message])).await;
    let end = final_reply(&mut c).await;
    c.cmd("QUIT").await;
    end
}

fn message(from: &str, subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: {from}\r\nTo: Bob <bob@test.example>\r\nSubject: {subject}\r\nDate: Tue, 1 Dec 2026 12:00:00 +0000\r\nMessage-ID: <{subject}@example.org>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}"
    )
    .into_bytes()
}

/// Lines that start with dots (dot-stuffed on the way, twice: client →
/// mailgate → Postfix), a lone dot, trailing spaces, an empty last line.
const DOTS: &str = ".\r\n..\r\n.leading dot\r\n..two dots\r\n... three\r\nmid . dot\r\n. \r\ntrailing spaces   \r\n\r\n";

/// 10 MiB of lines (no line starts with `From `, which mbox would quote).
fn big_body() -> String {
    let mut b = String::with_capacity(10 * 1024 * 1024 + 100);
    let mut i = 0u64;
    while b.len() < 10 * 1024 * 1024 {
        if i.is_multiple_of(1000) {
            b.push_str(".a dot-line in a large message\r\n");
        }
        b.push_str(&format!(
            "line {i:08} of ten mebibytes, signed by mailgate and verified after the trip\r\n"
        ));
        i += 1;
    }
    b
}

const BOTH: [&str; 2] = [
    "rsa-sha256/example.org/s2026",
    "ed25519-sha256/example.org/ed2026",
];

fn with(result: &str) -> Vec<String> {
    BOTH.iter().map(|k| format!("{k} {result}")).collect()
}

/// Acceptance 1 and 3.
#[test]
fn signed_submissions_verify_after_postfix_with_dkimpy_and_mailgate() {
    require_or_skip!(root: "Postfix and Dovecot", "postfix", "dovecot", "dkimverify", "openssl", "curl");
    let rig = Rig::start();
    let alice = "Alice <alice@example.org>";
    let messages = [
        // no Date or Message-ID: Postfix adds them for clients it counts as
        // local unless `local_header_rewrite_clients =` (README), and an
        // added Date breaks the (over-signed) signature
        format!("From: {alice}\r\nTo: bob@test.example\r\nSubject: plain\r\n\r\nHello Bob,\r\nthis one is signed twice.\r\n").into_bytes(),
        message(alice, "dots", DOTS),
        message(alice, "large", &big_body()),
    ];
    for m in &messages {
        let end = rig.send("submission", true, "alice@example.org", m);
        assert!(end.starts_with("250"), "{end}");
    }
    let stored = rig.delivered(messages.len());
    for (sent, got) in messages.iter().zip(&stored) {
        let text = String::from_utf8_lossy(&got[..got.len().min(20_000)]).to_string();
        let subject = String::from_utf8_lossy(&sent[..sent.len().min(200)]).to_string();
        // the signatures sit above mailgate's Received field, RSA first
        let rsa = text
            .find("DKIM-Signature: v=1; a=rsa-sha256")
            .expect("RSA signature");
        let ed = text
            .find("DKIM-Signature: v=1; a=ed25519-sha256")
            .expect("Ed25519 signature");
        let ours = text
            .find("by gw.test.example")
            .expect("mailgate's Received");
        assert!(rsa < ed && ed < ours, "{text}");
        let verdicts = (rig.dkimpy(got), rig.mailgate_verifies(got));
        assert_eq!(verdicts, (with("True"), with("pass")), "{subject}");
    }
    // the 10 MiB body arrived whole (and signed)
    assert!(stored[2].len() > 10 * 1024 * 1024);
    // a changed body fails: both verifiers really check
    let mut tampered = stored[1].clone();
    let at = tampered.len() - 10;
    tampered[at] ^= 0x01;
    let dkimpy = rig.dkimpy(&tampered);
    assert_eq!(dkimpy.len(), 2);
    for (verdict, key) in dkimpy.iter().zip(BOTH) {
        assert!(
            verdict.starts_with(&format!("{key} False (body hash mismatch")),
            "{dkimpy:?}"
        );
    }
    assert_eq!(rig.mailgate_verifies(&tampered), with("fail"));

    let log = rig.gateway_log();
    assert_eq!(
        log.matches("\"dkim_signed\":\"example.org/s2026,example.org/ed2026\"")
            .count(),
        3,
        "{log}"
    );
    assert!(
        !log.contains("PRIVATE KEY") && !log.contains("MII"),
        "{log}"
    );
    let metrics = rig.metrics();
    for k in ["s2026", "ed2026"] {
        let line =
            format!("mailgate_dkim_signed_total{{domain=\"example.org\",selector=\"{k}\"}} 3");
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
}

/// RFC 8616: a SMTPUTF8 message from an internationalised domain, whose
/// key the YAML names in U-labels, is signed with `d=` in A-labels and
/// verifies after Postfix with dkimpy and mailgate, against the key
/// published under the A-labels (the From field itself stays as written).
#[test]
fn an_internationalised_author_domain_is_signed_in_a_labels_and_verifies() {
    require_or_skip!(root: "Postfix and Dovecot", "postfix", "dovecot", "dkimverify", "openssl", "curl");
    let rig = Rig::start_with(&[("Bücher.example", "xn--bcher-kva.example", "idn2026")]);
    let from = "jörg@bücher.example";
    let m = message(&format!("Jörg <{from}>"), "idn", "Grüße\r\n");
    let end = rig.send("submission", true, from, &m);
    assert!(end.starts_with("250"), "{end}");
    let stored = rig.delivered(1);
    let text = String::from_utf8_lossy(&stored[0]).to_string();
    assert!(
        text.contains("From: Jörg <jörg@bücher.example>\r\n"),
        "{text}"
    );
    assert!(text.contains(" d=xn--bcher-kva.example;"), "{text}");
    let want = "ed25519-sha256/xn--bcher-kva.example/idn2026";
    assert_eq!(
        (rig.dkimpy(&stored[0]), rig.mailgate_verifies(&stored[0])),
        (vec![format!("{want} True")], vec![format!("{want} pass")]),
        "{text}"
    );
}

/// Acceptance 2.
#[test]
fn unknown_domains_are_refused_or_passed_and_mx_mail_is_not_signed() {
    require_or_skip!(root: "Postfix and Dovecot", "postfix", "dovecot", "dkimverify", "openssl", "curl");
    let rig = Rig::start();
    let mallory = message("mallory@elsewhere.example", "refused", "not ours\r\n");
    let end = rig.send("submission", true, "mallory@elsewhere.example", &mallory);
    assert!(
        end.starts_with("550 5.7.1 Not authorized to send mail with this From domain"),
        "{end}"
    );
    // two From fields: no author domain, refused as well
    let two = b"From: alice@example.org\r\nFrom: mallory@elsewhere.example\r\nTo: bob@test.example\r\nSubject: two\r\n\r\nx\r\n";
    let end = rig.send("submission", true, "alice@example.org", two);
    assert!(end.starts_with("550 5.7.1"), "{end}");

    let passed = message("carol@elsewhere.example", "passed", "relayed unsigned\r\n");
    let end = rig.send("submission-pass", true, "carol@elsewhere.example", &passed);
    assert!(end.starts_with("250"), "{end}");
    let inbound = message(
        "Alice <alice@example.org>",
        "inbound",
        "from the MX, no AUTH\r\n",
    );
    let end = rig.send("mx", false, "alice@example.org", &inbound);
    assert!(end.starts_with("250"), "{end}");

    let stored = rig.delivered(2);
    assert_eq!(
        stored.len(),
        2,
        "the refused messages never reached Postfix"
    );
    for (m, subject) in stored.iter().zip(["passed", "inbound"]) {
        let text = String::from_utf8_lossy(m);
        assert!(text.contains(&format!("Subject: {subject}\r\n")), "{text}");
        assert!(!text.contains("DKIM-Signature"), "{text}");
    }
    let metrics = rig.metrics();
    let line =
        "mailgate_dkim_sign_refusals_total{policy=\"submission\",reason=\"unknown_domain\"} 2";
    assert!(metrics.contains(line), "{line} in\n{metrics}");
    assert!(
        !metrics.contains("mailgate_dkim_signed_total{"),
        "{metrics}"
    );
}

/// Keys are part of the configuration snapshot: SIGHUP loads new ones; a
/// key that fails to load is logged naming its file and the old keys sign on.
#[test]
fn sighup_reloads_keys_and_keeps_the_old_ones_when_a_key_is_bad() {
    require_or_skip!(root: "Postfix and Dovecot", "postfix", "dovecot", "dkimverify", "openssl", "curl");
    let mut rig = Rig::start();
    let keys = rig.dir.path().join("gw/keys");
    let hup = |rig: &Rig| {
        let before = rig.gateway_log().len();
        let ok = Command::new("kill")
            .args(["-HUP", &rig.gw.0.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -HUP");
        let start = Instant::now();
        loop {
            let log = rig.gateway_log();
            let new = &log[before..];
            if new.contains("configuration reloaded") || new.contains("reload failed") {
                return new.to_string();
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no reload: {new}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let alice = "Alice <alice@example.org>";

    // a broken key file: the reload fails naming it, the old keys stay
    let new_rsa = keys.join("example.org.s2027.pem");
    std::fs::write(
        &new_rsa,
        "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let yaml = std::fs::read_to_string(&rig.config).unwrap();
    std::fs::write(
        &rig.config,
        yaml.replace("selector: s2026, key: ", "selector: s2027, key: ")
            .replace("example.org.s2026.pem", "example.org.s2027.pem"),
    )
    .unwrap();
    let said = hup(&rig);
    assert!(said.contains("reload failed"), "{said}");
    assert!(said.contains(&format!("{}", new_rsa.display())), "{said}");
    assert!(
        !said.contains("not a key"),
        "the file's content is not logged: {said}"
    );
    let end = rig.send(
        "submission",
        true,
        "alice@example.org",
        &message(alice, "old", "old keys\r\n"),
    );
    assert!(end.starts_with("250"), "{end}");
    let stored = rig.delivered(1);
    assert_eq!(rig.dkimpy(&stored[0]), with("True"));

    // a good one in its place: signed with it after the next SIGHUP
    std::fs::remove_file(&new_rsa).unwrap();
    let record = keygen("example.org", "s2027", "rsa", &new_rsa);
    rig.zone.add_txt("s2027._domainkey.example.org", &record);
    rig.dns.set_zone(rig.zone.clone());
    let said = hup(&rig);
    assert!(said.contains("configuration reloaded"), "{said}");
    let end = rig.send(
        "submission",
        true,
        "alice@example.org",
        &message(alice, "new", "new key\r\n"),
    );
    assert!(end.starts_with("250"), "{end}");
    let stored = rig.delivered(2);
    assert_eq!(
        rig.dkimpy(&stored[1]),
        [
            "rsa-sha256/example.org/s2027 True",
            "ed25519-sha256/example.org/ed2026 True"
        ]
    );
}

/// `mailgate check` on keys made by openssl: PKCS #1 and PKCS #8 RSA and
/// Ed25519 load; a 1024-bit RSA key is refused, naming the file and line.
#[test]
fn openssl_keys_load_and_short_rsa_keys_are_refused() {
    require_or_skip!("openssl");
    let dir = tempfile::tempdir().unwrap();
    let openssl = |args: &[&str]| {
        let (ok, out, err) = run_limited(Command::new(common::tool("openssl")).args(args), LIMIT);
        assert!(ok, "openssl {args:?}: {out}{err}");
    };
    let p = |name: &str| dir.path().join(name).display().to_string();
    openssl(&["genrsa", "-traditional", "-out", &p("pkcs1.pem"), "2048"]);
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:3072",
        "-out",
        &p("pkcs8.pem"),
    ]);
    openssl(&["genpkey", "-algorithm", "ED25519", "-out", &p("ed.pem")]);
    openssl(&["genrsa", "-out", &p("short.pem"), "1024"]);
    openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        &p("ec.pem"),
    ]);
    assert!(std::fs::read_to_string(p("pkcs1.pem"))
        .unwrap()
        .contains("BEGIN RSA PRIVATE KEY"));
    let check = |keys: &[&str]| {
        let list: Vec<String> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{{ domain: example.org, selector: s{i}, key: {k} }}"))
            .collect();
        let yaml = format!(
            "backends:\n  b: {{ address: \"127.0.0.1:25\" }}\nlisteners:\n  - {{ name: sub, protocol: smtp, bind: \"127.0.0.1:0\", tls: none, backend: b, policy: p }}\npolicies:\n  p:\n    dkim_sign:\n      keys: [ {} ]\n",
            list.join(", ")
        );
        let config = dir.path().join("mailgate.yaml");
        std::fs::write(&config, yaml).unwrap();
        run_limited(mailgate().args(["check", "--config"]).arg(&config), LIMIT)
    };
    let (ok, out, err) = check(&["pkcs1.pem", "pkcs8.pem", "ed.pem"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("dkim_sign: example.org/s0 (rsa-sha256, 2048 bits), example.org/s1 (rsa-sha256, 3072 bits), example.org/s2 (ed25519-sha256)"),
        "{out}"
    );
    for (bad, why) in [
        ("short.pem", "RSA key refused"),
        ("ec.pem", "an EC (SEC1) key"),
        ("missing.pem", "No such file"),
    ] {
        let (ok, out, err) = check(&["ed.pem", bad]);
        assert!(!ok, "{bad}: {out}");
        let want = "mailgate.yaml:8:";
        assert!(err.contains(want), "{bad}: {err}");
        assert!(
            err.contains(&format!("keys[2] (example.org/s1).key: {}: {why}", p(bad))),
            "{bad}: {err}"
        );
    }

    // keygen: mode 0600, never over an existing file
    use std::os::unix::fs::PermissionsExt as _;
    let out = dir.path().join("new.pem");
    keygen("example.org", "k1", "ed25519", &out);
    let mode = std::fs::metadata(&out).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let before = std::fs::read(&out).unwrap();
    let (ok, _, err) = run_limited(
        mailgate()
            .args([
                "dkim",
                "keygen",
                "--domain",
                "example.org",
                "--selector",
                "k1",
                "--out",
            ])
            .arg(&out),
        LIMIT,
    );
    assert!(!ok && err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), before);
}
