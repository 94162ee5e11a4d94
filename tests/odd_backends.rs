//! Odd and hostile legacy servers, from the "Why TLS is better without
//! STARTTLS" fake-mail-server cases (tests/data/smtp-protocol/
//! nostarttls-fake-mail-server, see its PROVENANCE.md). mailgate is the *client* of these backends.
//! For every case: mailgate fails closed (4xx / -ERR), never reports a success
//! the backend did not give, and never sends credentials to a backend that is
//! not in a state to expect them.
//!
//! Skipped fields and why: `stls_response`, `stls_make_transition`,
//! `capabilities_tls`, `capa_tls*`, `implicit_tls` and the Buffering cases
//! describe the backend's STARTTLS/STLS behaviour; mailgate speaks plaintext
//! to backends and never sends STARTTLS/STLS there, so those parts cannot be
//! reached. The cases still run with their greetings and overrides.

mod common;

use common::{Pop3Backend, Pop3Client, Running, SmtpBackend, SmtpClient, Yaml};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const ROOT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/smtp-protocol/nostarttls-fake-mail-server"
);

/// The few RON fields the fake servers use, read by hand.
#[derive(Debug, Default)]
struct Case {
    name: String,
    greeting: Option<String>,
    overrides: HashMap<String, String>,
    capa: Vec<String>,
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('r') => out.push('\r'),
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('x') => {
                let h: String = it.by_ref().take(2).collect();
                out.push(u8::from_str_radix(&h, 16).unwrap_or(b'?') as char);
            }
            Some(o) => out.push(o),
            None => {}
        }
    }
    out
}

/// Quoted strings on a line: `"key": "value"` or `greeting: "value"`.
fn quoted(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = None::<String>;
    let mut esc = false;
    for c in line.chars() {
        match (&mut cur, c) {
            (Some(s), '\\') if !esc => {
                esc = true;
                s.push(c);
            }
            (Some(s), '"') if !esc => {
                out.push(unescape(s));
                cur = None;
            }
            (Some(s), c) => {
                esc = false;
                s.push(c);
            }
            (None, '"') => cur = Some(String::new()),
            (None, _) => {}
        }
    }
    out
}

fn parse(path: &Path) -> Case {
    let text = std::fs::read_to_string(path).unwrap();
    let mut c = Case {
        name: path
            .strip_prefix(ROOT)
            .unwrap_or(path)
            .display()
            .to_string(),
        ..Default::default()
    };
    let mut in_overrides = false;
    let mut in_capa = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("//") {
            continue;
        }
        if t.starts_with("greeting:") {
            c.greeting = quoted(t).into_iter().next();
        } else if t.starts_with("override_response:") {
            in_overrides = true;
        } else if in_overrides && t.starts_with('}') {
            in_overrides = false;
        } else if in_overrides {
            let q = quoted(t);
            if q.len() == 2 {
                c.overrides.insert(q[0].to_ascii_lowercase(), q[1].clone());
            }
        } else if t.starts_with("capa:") {
            in_capa = !t.contains(']');
            c.capa.extend(quoted(t));
        } else if in_capa {
            if t.starts_with(']') {
                in_capa = false;
            } else {
                c.capa.extend(quoted(t));
            }
        }
    }
    c
}

fn cases(dir: &str) -> Vec<Case> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "ron") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&Path::new(ROOT).join(dir), &mut files);
    files.sort();
    files.iter().map(|p| parse(p)).collect()
}

/// The fake SMTP server of `case`: its greeting and overrides over a
/// server that offers STARTTLS and AUTH PLAIN and accepts everything.
async fn fake_smtp(case: &Case) -> Running {
    let mut b = SmtpBackend::new()
        .greeting(case.greeting.as_deref().unwrap_or("220 fake ESMTP\r\n"))
        .on("EHLO", "250-fake\r\n250-STARTTLS\r\n250 AUTH PLAIN\r\n")
        .on("AUTH", "235 ok\r\n");
    for (verb, reply) in &case.overrides {
        b = b.on(verb, reply);
    }
    b.start().await
}

#[tokio::test]
async fn odd_smtp_backends_fail_closed() {
    let all = cases("smtp");
    assert!(all.len() >= 50, "found {} SMTP cases", all.len());
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = common::dev_cert(dir.path());
    let mut summary = Vec::new();
    for case in all {
        let be = fake_smtp(&case).await;
        let gw = Yaml::new()
            .listener(
                "mx",
                "smtp",
                "implicit",
                "auth: optional, timeouts: { backend_reply: 3s, backend_connect: 3s }",
            )
            .certs(dir.path())
            .backend("b", &be.addr, "")
            .start()
            .await;
        let mut r = SmtpClient::connect(gw.addr("mx").unwrap())
            .await
            .tls(&ca)
            .await;
        let greeting = r.text().await;
        assert!(
            greeting.starts_with("220 "),
            "{}: our own greeting: {greeting}",
            case.name
        );
        let ehlo = r.cmd("EHLO client.example").await;
        assert!(
            ehlo.starts_with("250"),
            "{}: EHLO is ours: {ehlo}",
            case.name
        );
        let offered_auth = ehlo.contains("AUTH PLAIN");
        let auth = if offered_auth {
            r.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA==").await
        } else {
            String::new()
        };
        let mut client_250_data = 0;
        for round in 0..2 {
            let mail = r.cmd("MAIL FROM:<a@example.org>").await;
            if !mail.starts_with("250") {
                assert!(
                    mail.starts_with('4') || mail.starts_with('5'),
                    "{} round {round}: MAIL: {mail}",
                    case.name
                );
                break;
            }
            let rcpt = r.cmd("RCPT TO:<b@example.net>").await;
            if !rcpt.starts_with("250") {
                let _ = r.cmd("RSET").await;
                continue;
            }
            if round == 0 {
                // abandon the first transaction: the backend then gets RSET
                assert!(r.cmd("RSET").await.starts_with("250"));
                continue;
            }
            if !r.cmd("DATA").await.starts_with("354") {
                break;
            }
            let fin = r.cmd("Subject: odd\r\n\r\nbody\r\n.").await;
            if fin.starts_with("250") {
                client_250_data += 1;
            }
        }
        let s = be.seen.lock().unwrap();
        // (a) no success the backend did not give
        assert!(
            client_250_data <= s.accepted,
            "{}: client saw {client_250_data} 250s, backend accepted {}",
            case.name,
            s.accepted
        );
        // (b) credentials only to a backend that greeted 220, answered EHLO 250 and offered AUTH
        let greeted_ok = case
            .greeting
            .as_deref()
            .is_none_or(|g| g.starts_with("220"));
        let ehlo_ok = case
            .overrides
            .get("ehlo")
            .is_none_or(|e| e.starts_with("250"));
        let sent_auth = s
            .lines
            .iter()
            .any(|(_, l)| l.to_ascii_uppercase().starts_with("AUTH"));
        if sent_auth {
            assert!(
                greeted_ok && ehlo_ok,
                "{}: credentials sent to a backend in an odd state: {:?}",
                case.name,
                s.lines
            );
        }
        // (c) fail closed: a backend that did not greet/EHLO properly never gets MAIL
        // EHLO refused with 5xx → HELO fallback (answered 250 unless overridden)
        let ehlo_5xx = case
            .overrides
            .get("ehlo")
            .is_some_and(|e| e.starts_with('5'));
        let hello_ok = ehlo_ok
            || (ehlo_5xx
                && case
                    .overrides
                    .get("helo")
                    .is_none_or(|h| h.starts_with("250")));
        if !greeted_ok || !hello_ok {
            assert!(
                !s.lines.iter().any(|(_, l)| l.starts_with("MAIL")),
                "{}: MAIL sent to a broken backend: {:?}",
                case.name,
                s.lines
            );
            assert!(
                !auth.starts_with("235"),
                "{}: AUTH success from a broken backend",
                case.name
            );
        }
        summary.push(format!("{}: greeted_ok={greeted_ok} hello_ok={hello_ok} delivered={client_250_data} auth_relayed={sent_auth}", case.name));
    }
    eprintln!("{}", summary.join("\n"));
}

/// The fake POP3 server of `case`: its greeting, capabilities and overrides
/// over a server that accepts every login.
async fn fake_pop3(case: &Case) -> Running {
    let mut b = Pop3Backend::new()
        .greeting(case.greeting.as_deref().unwrap_or("+OK fake\r\n"))
        .capa(&case.capa);
    for (verb, reply) in &case.overrides {
        b = b.on(verb, reply);
    }
    b.start().await
}

#[tokio::test]
async fn odd_pop3_backends_fail_closed() {
    let all = cases("pop3");
    assert!(all.len() >= 30, "found {} POP3 cases", all.len());
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = common::dev_cert(dir.path());
    for case in all {
        let be = fake_pop3(&case).await;
        let gw = Yaml::new()
            .listener(
                "p",
                "pop3",
                "implicit",
                "login_failure_delay: 10ms, timeouts: { backend_reply: 3s, backend_connect: 3s }",
            )
            .certs(dir.path())
            .backend("b", &be.addr, "")
            .start()
            .await;
        let mut r = Pop3Client::connect(gw.addr("p").unwrap())
            .await
            .tls(&ca)
            .await;
        let greeting = r.line().await;
        assert!(
            greeting.starts_with("+OK"),
            "{}: our own greeting: {greeting}",
            case.name
        );
        assert!(
            !greeting.bytes().any(|b| b == 0x1b),
            "{}: escape sequences never reach the client",
            case.name
        );
        let user = r.cmd("USER alice").await;
        let pass = if user.starts_with("+OK") {
            r.cmd("PASS secret").await
        } else {
            String::new()
        };
        let s = be.seen.lock().unwrap();
        let greeted_ok = case
            .greeting
            .as_deref()
            .is_none_or(|g| g.starts_with("+OK"));
        let sent_pass = s.lines.iter().any(|(_, l)| {
            l.to_ascii_uppercase().starts_with("PASS") || l.to_ascii_uppercase().starts_with("AUTH")
        });
        if !greeted_ok {
            assert!(
                !sent_pass,
                "{}: credentials sent after a -ERR greeting: {:?}",
                case.name, s.lines
            );
            assert!(
                pass.starts_with("-ERR"),
                "{}: login must fail closed: {pass}",
                case.name
            );
        }
        if pass.starts_with("+OK") {
            assert!(
                s.accepted >= 1,
                "{}: +OK for PASS the backend never gave",
                case.name
            );
        }
        assert!(
            !pass.bytes().any(|b| b == 0x1b),
            "{}: escape sequences in a relayed reply",
            case.name
        );
    }
}
