//! End to end with real software: the `mailgate` binary (run the way the
//! container's ENTRYPOINT runs it) in front of Postfix's `smtp-sink`, driven by
//! curl, swaks, Python smtplib and `openssl s_client`. Needs the tools that
//! `.ci/run` installs; without one a test prints `SKIPPED: <test>: <tool> not
//! installed` and passes, unless `MAILGATE_E2E=require` (CI) makes it fail.

mod common;

use common::{require_or_skip, run_limited, Guard, Sink};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

struct Gw {
    smtp: u16,
    smtps: u16,
    plain: u16,
    ca: PathBuf,
    config_dir: PathBuf,
    _child: Guard,
}

/// Listeners `mx` (STARTTLS), `smtps` and `plain` on `ports` (0: the kernel
/// picks; the test reads the bound ports from the log, see [`started`]).
fn write_config(dir: &Path, sink_port: u16, ports: [u16; 3]) -> PathBuf {
    let (ca, _) = common::dev_cert(dir);
    let [smtp, smtps, plain] = ports;
    let cfg = dir.join("conf.d");
    std::fs::create_dir_all(&cfg).unwrap();
    // two files, merged: the directory form of --config
    std::fs::write(
        cfg.join("10-backends.yaml"),
        format!("backends:\n  legacy-smtp: {{ address: \"127.0.0.1:{sink_port}\" }}\ntls:\n  certificates: [ {{ cert: ../cert.pem, key: ../key.pem }} ]\nserver: {{ hostname: gw.e2e.test, shutdown_grace: 5s }}\n"),
    )
    .unwrap();
    std::fs::write(
        cfg.join("20-listeners.yaml"),
        format!(
            "listeners:\n  - {{ name: mx, protocol: smtp, bind: \"127.0.0.1:{smtp}\", tls: starttls, require_tls: false, backend: legacy-smtp }}\n  - {{ name: smtps, protocol: smtp, bind: \"127.0.0.1:{smtps}\", tls: implicit, backend: legacy-smtp }}\n  - {{ name: plain, protocol: smtp, bind: \"127.0.0.1:{plain}\", tls: none, backend: legacy-smtp }}\n"
        ),
    )
    .unwrap();
    ca
}

/// Runs `mailgate run` on `dir/conf.d`, logging JSON to `dir/mailgate.log`.
fn spawn_gateway(dir: &Path) -> Guard {
    let child = Command::new(env!("CARGO_BIN_EXE_mailgate"))
        .args(["--log-format", "json", "run", "--config"])
        .arg(dir.join("conf.d"))
        .stdout(std::fs::File::create(dir.join("mailgate.log")).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Guard(child)
}

/// The ports the gateway in `dir` bound, [mx, smtps, plain], from its log:
/// its own sockets, found without a probe connection.
fn started(dir: &Path) -> [u16; 3] {
    let addrs = common::listening(&dir.join("mailgate.log"), &["mx", "smtps", "plain"]);
    ["mx", "smtps", "plain"].map(|n| addrs[n].port())
}

/// The gateway in front of `sink_port`, its listeners on ports the kernel
/// picked (`ports` [0; 3]) or on the ones given.
fn start_gateway_on(dir: &Path, sink_port: u16, ports: [u16; 3]) -> Gw {
    let ca = write_config(dir, sink_port, ports);
    let guard = spawn_gateway(dir);
    let [smtp, smtps, plain] = started(dir);
    Gw {
        smtp,
        smtps,
        plain,
        ca,
        config_dir: dir.join("conf.d"),
        _child: guard,
    }
}

fn start_gateway(dir: &Path, sink_port: u16) -> Gw {
    start_gateway_on(dir, sink_port, [0; 3])
}

fn eml(dir: &Path, subject: &str) -> PathBuf {
    let p = dir.join(format!("{subject}.eml"));
    std::fs::write(&p, format!("From: alice@example.org\r\nTo: bob@example.net\r\nSubject: {subject}\r\n\r\nHello from {subject}.\r\n.leading dot line\r\n")).unwrap();
    p
}

/// Acceptance 2: every real client delivers through STARTTLS and implicit TLS;
/// the sink's count equals the number of 250s the clients saw.
#[test]
fn real_clients_deliver_through_tls() {
    require_or_skip!(root: "smtp-sink -u nobody", "smtp-sink", "curl", "swaks", "python3", "openssl");
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(&dir.path().join("sink"));
    let gw = start_gateway(dir.path(), sink.port);
    let ca = gw.ca.display().to_string();
    let mut accepted = 0;

    // curl: STARTTLS required, and smtps://
    for (url, name) in [
        (format!("smtp://127.0.0.1:{}", gw.smtp), "curl-starttls"),
        (format!("smtps://127.0.0.1:{}", gw.smtps), "curl-smtps"),
    ] {
        let (ok, out, err) = run_limited(
            Command::new("curl")
                .args([
                    "-sS",
                    "--ssl-reqd",
                    "--cacert",
                    &ca,
                    "--url",
                    &url,
                    "--mail-from",
                    "alice@example.org",
                    "--mail-rcpt",
                    "bob@example.net",
                    "-T",
                ])
                .arg(eml(dir.path(), name)),
            LIMIT,
        );
        assert!(ok, "{name}: {out} {err}");
        accepted += 1;
    }

    // swaks: --tls (STARTTLS) and --tlsc (implicit), verifying the certificate
    for (flag, port, name) in [
        ("--tls", gw.smtp, "swaks-tls"),
        ("--tlsc", gw.smtps, "swaks-tlsc"),
    ] {
        let (ok, out, err) = run_limited(
            Command::new("swaks").args([
                "--server",
                &format!("127.0.0.1:{port}"),
                flag,
                "--tls-verify",
                "--tls-ca-path",
                &ca,
                "--tls-sni",
                "localhost",
                "--from",
                "alice@example.org",
                "--to",
                "bob@example.net",
                "--header",
                &format!("Subject: {name}"),
                "--body",
                "hello from swaks",
            ]),
            LIMIT,
        );
        assert!(ok, "{name}: {out} {err}");
        assert!(
            out.contains("<~  250 2.0.0") || out.contains("<~  250 "),
            "{name}: {out}"
        );
        accepted += 1;
    }

    // Python smtplib: starttls() and SMTP_SSL, certificate verified
    let py = format!(
        r#"
import smtplib, ssl, sys
ctx = ssl.create_default_context(cafile={ca:?})
ctx.minimum_version = ssl.TLSVersion.TLSv1_2
msg = "From: alice@example.org\r\nTo: bob@example.net\r\nSubject: python-%s\r\n\r\nhello\r\n"
with smtplib.SMTP("localhost", {smtp}, timeout=30) as s:
    s.starttls(context=ctx)
    s.ehlo()
    assert s.sendmail("alice@example.org", ["bob@example.net"], msg % "starttls") == {{}}
with smtplib.SMTP_SSL("localhost", {smtps}, context=ctx, timeout=30) as s:
    assert s.sendmail("alice@example.org", ["bob@example.net"], msg % "ssl") == {{}}
print("python ok")
"#,
        smtp = gw.smtp,
        smtps = gw.smtps
    );
    let (ok, out, err) = run_limited(Command::new("python3").arg("-c").arg(&py), LIMIT);
    assert!(ok && out.contains("python ok"), "{out} {err}");
    accepted += 2;

    // openssl s_client -starttls smtp, certificate verified, commands from stdin
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{}", gw.smtp),
            "-starttls",
            "smtp",
            "-CAfile",
            &ca,
            "-verify_return_error",
            "-verify_hostname",
            "localhost",
            "-quiet",
            "-nocommands",
            "-crlf",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let stdin = child.stdin.as_mut().unwrap();
        stdin.write_all(b"EHLO openssl.test\nMAIL FROM:<alice@example.org>\nRCPT TO:<bob@example.net>\nDATA\nSubject: openssl\n\nhello from s_client\n.\nQUIT\n").unwrap();
    }
    let guard = Guard(child);
    let mut out = String::new();
    let mut g = guard;
    let mut so = g.0.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        so.read_to_string(&mut s).ok();
        s
    });
    for _ in 0..600 {
        if g.0.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(g);
    out.push_str(&reader.join().unwrap());
    assert!(out.contains("250 2.0.0 Ok"), "openssl: {out}");
    assert!(out.contains("221 2.0.0 Bye"), "openssl: {out}");
    accepted += 1;

    assert_eq!(
        sink.wait_count(accepted),
        accepted,
        "sink count equals the 250s the clients saw"
    );
    // every message carries our trace header naming the client and the TLS version
    for m in sink.messages() {
        let text = String::from_utf8_lossy(&m);
        assert!(
            text.contains("by gw.e2e.test (mailgate) with ESMTPS"),
            "{text}"
        );
        assert!(text.contains("(version=TLSv1."), "{text}");
        assert!(
            text.contains("Received: from ") && text.contains("([127.0.0.1])"),
            "{text}"
        );
    }
    let log = std::fs::read_to_string(dir.path().join("mailgate.log")).unwrap();
    assert!(
        log.contains("\"message\":\"transaction\""),
        "one JSON line per transaction: {log}"
    );
}

fn raw_session(port: u16, script: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // greeting
    let n = s.read(&mut buf).unwrap();
    out.extend_from_slice(&buf[..n]);
    s.write_all(script).unwrap();
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).to_string()
}

/// Acceptance 4 against a real backend: smtp-sink is lax (it reads bare LF as a
/// line end), the ideal smuggling target. No variant gets a second message in.
#[test]
fn smuggling_variants_against_smtp_sink() {
    require_or_skip!(root: "smtp-sink -u nobody", "smtp-sink");
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/smtp-smuggling/eod-sequences.tsv"
    );
    let tsv = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(&dir.path().join("sink"));
    let gw = start_gateway(dir.path(), sink.port);
    let mut n = 0;
    for line in tsv.lines().skip(1).filter(|l| !l.contains("VALID")) {
        let cols: Vec<&str> = line.split('\t').collect();
        let v: Vec<u8> = cols[2]
            .split(' ')
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect();
        let mut script =
            b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n".to_vec();
        script.extend_from_slice(b"From: a@example.org\r\n\r\nbody");
        script.extend_from_slice(&v);
        script.extend_from_slice(b"MAIL FROM:<smuggled@x.example>\r\nRCPT TO:<victim@y.example>\r\nDATA\r\nFrom: smuggled@x.example\r\n\r\nsmuggled\r\n.\r\n");
        let out = raw_session(gw.plain, &script);
        let finals: Vec<&str> = out
            .lines()
            .skip_while(|l| !l.starts_with("354"))
            .skip(1)
            .collect();
        assert_eq!(finals.len(), 1, "{}: {out}", cols[0]);
        assert!(
            finals[0].starts_with("550 5.6.0") || finals[0].starts_with("554 5.6.0"),
            "{}: {out}",
            cols[0]
        );
        n += 1;
    }
    assert_eq!(n, 13);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(sink.messages().len(), 0, "nothing reached the backend");
}

/// Acceptance 5: backend stopped → 4xx; backend killed while the client is in
/// DATA → 4xx; never 250.
#[test]
fn backend_stopped_or_killed_in_data() {
    require_or_skip!(root: "smtp-sink -u nobody", "smtp-sink");
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(&dir.path().join("sink"));
    let gw = start_gateway(dir.path(), sink.port);
    // killed while the client is in the middle of its message
    let mut s = TcpStream::connect(("127.0.0.1", gw.plain)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 4096];
    let mut read_reply = |s: &mut TcpStream| -> String {
        let n = s.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    read_reply(&mut s);
    s.write_all(b"EHLO c\r\n").unwrap();
    read_reply(&mut s);
    s.write_all(b"MAIL FROM:<a@example.org>\r\n").unwrap();
    assert!(read_reply(&mut s).starts_with("250"));
    s.write_all(b"RCPT TO:<b@example.net>\r\n").unwrap();
    assert!(read_reply(&mut s).starts_with("250"));
    s.write_all(b"DATA\r\n").unwrap();
    assert!(read_reply(&mut s).starts_with("354"));
    s.write_all(b"Subject: doomed\r\n\r\nfirst half\r\n")
        .unwrap();
    drop(sink); // kills smtp-sink
    std::thread::sleep(Duration::from_millis(200));
    s.write_all(b"second half\r\n.\r\n").unwrap();
    let r = read_reply(&mut s);
    assert!(
        r.starts_with("451 4.4."),
        "killed backend mid-DATA must give 4xx: {r}"
    );
    // stopped: a new transaction gets 451 4.4.1
    s.write_all(b"MAIL FROM:<a@example.org>\r\n").unwrap();
    let r = read_reply(&mut s);
    assert!(r.starts_with("451 4.4.1"), "{r}");
}

/// Acceptance 1: `check` names file:line:column; `run` refuses to start.
#[test]
fn broken_config_is_located_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sink_port = common::free_port();
    write_config(dir.path(), sink_port, [0; 3]);
    let conf = dir.path().join("conf.d");
    let bin = env!("CARGO_BIN_EXE_mailgate");
    let (ok, out, err) = run_limited(
        Command::new(bin).args(["check", "--config"]).arg(&conf),
        LIMIT,
    );
    assert!(ok, "{out} {err}");
    assert!(out.contains("listener mx smtp on 127.0.0.1:"), "{out}");
    // a typo in a field name
    std::fs::write(
        conf.join("30-broken.yaml"),
        "backends:\n  other: { address: \"127.0.0.1:25\", helo_nmae: x }\n",
    )
    .unwrap();
    let (ok, _out, err) = run_limited(
        Command::new(bin).args(["check", "--config"]).arg(&conf),
        LIMIT,
    );
    assert!(!ok);
    assert!(
        err.contains("30-broken.yaml:2:") && err.contains("helo_nmae"),
        "{err}"
    );
    let (ok, _out, err) = run_limited(
        Command::new(bin).args(["run", "--config"]).arg(&conf),
        LIMIT,
    );
    assert!(!ok, "run must refuse a broken config");
    assert!(err.contains("30-broken.yaml:2:"), "{err}");
    // a reference to a backend that does not exist, in a single file
    std::fs::remove_file(conf.join("30-broken.yaml")).unwrap();
    std::fs::write(conf.join("30-broken.yaml"), "listeners:\n  - { name: extra, protocol: smtp, bind: \"127.0.0.1:1\", tls: none, backend: nowhere }\n").unwrap();
    let (ok, _out, err) = run_limited(
        Command::new(bin).args(["check", "--config"]).arg(&conf),
        LIMIT,
    );
    assert!(!ok);
    assert!(
        err.contains("30-broken.yaml:2:") && err.contains("nowhere"),
        "{err}"
    );
}

/// The container runs `mailgate run --config /etc/mailgate` and probes it with
/// `mailgate healthcheck`; SIGTERM ends it cleanly.
#[test]
fn healthcheck_and_sigterm() {
    require_or_skip!(root: "smtp-sink -u nobody", "smtp-sink");
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(&dir.path().join("sink"));
    // `healthcheck` connects to the configured addresses: real port numbers
    let ports = [(); 3].map(|_| common::free_port());
    let gw = start_gateway_on(dir.path(), sink.port, ports);
    let bin = env!("CARGO_BIN_EXE_mailgate");
    let (ok, out, err) = run_limited(
        Command::new(bin)
            .args(["healthcheck", "--config"])
            .arg(&gw.config_dir),
        LIMIT,
    );
    assert!(ok, "{out} {err}");
    let mut g = gw._child;
    let pid = g.0.id().to_string();
    let mut idle = TcpStream::connect(("127.0.0.1", gw.smtp)).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 512];
    let _ = idle.read(&mut buf).unwrap();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let n = idle.read(&mut buf).unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("421 4.3.2"),
        "idle session told 421"
    );
    for _ in 0..100 {
        if let Some(st) = g.0.try_wait().unwrap() {
            assert!(st.success(), "exit status {st:?}");
            let (ok, ..) = run_limited(
                Command::new(bin)
                    .args(["healthcheck", "--config"])
                    .arg(&gw.config_dir),
                LIMIT,
            );
            assert!(!ok, "healthcheck fails once the gateway is gone");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("mailgate did not exit after SIGTERM");
}

/// Policy acceptance 6 with the real binary: SIGHUP with a broken file keeps
/// the running policy; SIGHUP with a changed limit applies it to new sessions
/// while an open session carries on.
#[test]
fn sighup_reload_keeps_or_applies() {
    require_or_skip!(root: "smtp-sink -u nobody", "smtp-sink");
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(&dir.path().join("sink"));
    write_config(dir.path(), sink.port, [0; 3]);
    let conf = dir.path().join("conf.d");
    let policy = |rate: u32| {
        format!("policies:\n  p:\n    limits:\n      - {{ name: conn, key: [ip], rate: {rate}/minute, burst: {rate} }}\n")
    };
    // the plain listener gets the policy
    let listeners = std::fs::read_to_string(conf.join("20-listeners.yaml"))
        .unwrap()
        .replace(
            "tls: none, backend: legacy-smtp }",
            "tls: none, backend: legacy-smtp, policy: p }",
        );
    std::fs::write(conf.join("20-listeners.yaml"), listeners).unwrap();
    std::fs::write(conf.join("30-policy.yaml"), policy(2)).unwrap();
    let log = dir.path().join("mailgate.log");
    let g = spawn_gateway(dir.path());
    // from the log, not a probe connection: every connection below is ours
    // and counted, and it is this gateway's port, not another test's
    let [_, _, plain] = started(dir.path());
    let pid = g.0.id().to_string();
    let greet = |expect: &str| {
        let mut s = TcpStream::connect(("127.0.0.1", plain)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).unwrap_or(0);
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(text.starts_with(expect), "expected {expect}: {text:?}");
        s
    };
    // bounded generously: a reload re-reads certificates and recompiles
    // policies, which a starved CI machine may take seconds over
    let wait_log = |needle: &str| {
        for _ in 0..400 {
            if std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(needle)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("log never said {needle:?}");
    };
    // use up the limit: rate 2/minute, burst 2 admits two and refuses the third
    let mut open = greet("220");
    let _second = greet("220");
    greet("421");
    // broken file: logged with its position, old policy stays
    std::fs::write(
        conf.join("30-policy.yaml"),
        "policies:\n  p:\n    limits:\n      - { key: [ip], rate: 2/minute, burts: 3 }\n",
    )
    .unwrap();
    Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    wait_log("reload failed");
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("30-policy.yaml:4:"),
        "position in the log"
    );
    greet("421");
    // a changed limit applies to new sessions
    std::fs::write(conf.join("30-policy.yaml"), policy(20)).unwrap();
    Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    wait_log("configuration reloaded");
    for _ in 0..5 {
        greet("220");
    }
    // the session opened before both reloads still works
    open.write_all(b"EHLO still.here\r\n").unwrap();
    let mut buf = [0u8; 512];
    let n = open.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("250"));
}

/// Runs `mailgate demo --dir dir` on free ports until it is up (its banner
/// ends with "Press Ctrl-C") or exits; returns (came up, exit ok, output).
fn run_demo(dir: &Path) -> (bool, bool, String) {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("demo.out");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mailgate"))
        .arg("demo")
        .arg("--dir")
        .arg(dir)
        .args(["--smtp-port", &common::free_port().to_string()])
        .args(["--smtps-port", &common::free_port().to_string()])
        .args(["--pop3-port", &common::free_port().to_string()])
        .args(["--pop3s-port", &common::free_port().to_string()])
        .args(["--imaps-port", &common::free_port().to_string()])
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(out_dir.path().join("demo.err")).unwrap())
        .spawn()
        .unwrap();
    let text = || {
        std::fs::read_to_string(&out).unwrap_or_default()
            + &std::fs::read_to_string(out_dir.path().join("demo.err")).unwrap_or_default()
    };
    for _ in 0..400 {
        if let Some(st) = child.try_wait().unwrap() {
            return (false, st.success(), text());
        }
        if text().contains("Press Ctrl-C") {
            let _ = child.kill();
            let _ = child.wait();
            return (true, false, text());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("demo neither came up nor exited: {}", text());
}

/// Issue 19.8: `mailgate demo` never writes through symlinks planted in its
/// directory, refuses a directory others can write to (or a symlink, or one
/// owned by someone else), and still runs twice in a row in the same place.
#[test]
fn demo_does_not_write_through_symlinks() {
    use std::os::unix::fs::{symlink, PermissionsExt};
    let base = tempfile::tempdir().unwrap();
    let victims = base.path().join("victims");
    std::fs::create_dir(&victims).unwrap();
    let plant = |dir: &Path| {
        for f in ["cert.pem", "key.pem", "mailgate-demo.yaml"] {
            let v = victims.join(format!(
                "{}-{f}",
                dir.file_name().unwrap().to_string_lossy()
            ));
            std::fs::write(&v, "precious\n").unwrap();
            symlink(&v, dir.join(f)).unwrap();
        }
    };
    let untouched = || {
        for e in std::fs::read_dir(&victims).unwrap() {
            let p = e.unwrap().path();
            assert_eq!(
                std::fs::read_to_string(&p).unwrap(),
                "precious\n",
                "{} was written through a symlink",
                p.display()
            );
        }
    };
    // our own private directory with planted links: replaced, not followed
    let private = base.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    plant(&private);
    let (up, _, out) = run_demo(&private);
    untouched();
    assert!(up, "demo in a private directory: {out}");
    for f in ["cert.pem", "key.pem", "mailgate-demo.yaml"] {
        let m = std::fs::symlink_metadata(private.join(f)).unwrap();
        assert!(m.file_type().is_file(), "{f} is a fresh file");
    }
    // and again: the files of the first run are replaced
    let (up, _, out) = run_demo(&private);
    assert!(up, "second run in the same directory: {out}");
    // a directory others may write to is refused
    let open = base.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    plant(&open);
    let (up, ok, out) = run_demo(&open);
    untouched();
    assert!(!up && !ok, "world-writable directory accepted: {out}");
    assert!(out.contains(&open.display().to_string()), "{out}");
    // our own directory that others may only read (an earlier demo's): made private
    let readable = base.path().join("readable");
    std::fs::create_dir(&readable).unwrap();
    std::fs::set_permissions(&readable, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (up, _, out) = run_demo(&readable);
    assert!(up, "{out}");
    let mode = std::fs::metadata(&readable).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    // a symlink as the directory is refused
    let link = base.path().join("link");
    symlink(&private, &link).unwrap();
    let (up, ok, out) = run_demo(&link);
    assert!(!up && !ok, "symlinked directory accepted: {out}");
    // someone else's directory (only checkable as root: chown)
    if unsafe { libc::geteuid() } == 0 {
        let theirs = base.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).unwrap();
        plant(&theirs);
        std::os::unix::fs::lchown(&theirs, Some(65534), Some(65534)).unwrap();
        let (up, ok, out) = run_demo(&theirs);
        untouched();
        assert!(
            !up && !ok,
            "directory owned by another user accepted: {out}"
        );
    }
    // a directory that does not exist yet is created private
    let fresh = base.path().join("new/demo");
    let (up, _, out) = run_demo(&fresh);
    assert!(up, "{out}");
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
}

/// Issue 19.10: a reload that hangs (here: the configuration is a FIFO
/// nobody writes to) does not hold up SIGTERM: the signal loop never parses.
#[test]
fn sigterm_during_a_slow_reload() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("mailgate.yaml");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let child = Command::new(env!("CARGO_BIN_EXE_mailgate"))
        .args(["run", "--config"])
        .arg(&fifo)
        .stdout(std::fs::File::create(dir.path().join("mailgate.log")).unwrap())
        .spawn()
        .unwrap();
    let mut g = Guard(child);
    // the first read of the configuration gets its text
    std::fs::write(
        &fifo,
        format!("listeners:\n  - {{ name: mx, protocol: smtp, bind: \"127.0.0.1:0\", tls: none, backend: b }}\nbackends:\n  b: {{ address: \"127.0.0.1:{}\" }}\nserver: {{ shutdown_grace: 1s }}\n", common::free_port()),
    )
    .unwrap();
    let log = dir.path().join("mailgate.log");
    for _ in 0..200 {
        if std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("listening")
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let pid = g.0.id().to_string();
    // the reload opens the FIFO and waits for a writer that never comes
    Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    for _ in 0..100 {
        if let Some(st) = g.0.try_wait().unwrap() {
            assert!(st.success(), "exit status {st:?}");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("SIGTERM was not honoured while a reload was stuck");
}

/// Why `sighup_reload_keeps_or_applies` once met a `421` at its first
/// greeting: `free_port` used to bind port 0, drop the listener and return the
/// number, which the kernel then handed to the next `bind(…:0)` — here another
/// test's gateway (`sigterm_during_a_slow_reload` binds port 0) or another
/// test's `free_port` — so two tests shared one server. A port `free_port`
/// gives is one the kernel never assigns by itself, and never given twice.
#[test]
fn free_ports_are_never_assigned_by_the_kernel() {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let [lo, hi]: [u16; 2] = range
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    let ports: Vec<u16> = (0..200).map(|_| common::free_port()).collect();
    for p in &ports {
        assert!(
            !(lo..=hi).contains(p),
            "free_port gave {p}, inside the kernel's ephemeral range {lo}-{hi}"
        );
    }
    let distinct: std::collections::BTreeSet<&u16> = ports.iter().collect();
    assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
}
