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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

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

/// What the fake backend saw and did.
#[derive(Default, Debug)]
struct Seen {
    lines: Vec<String>,
    /// messages it acknowledged with 250 after DATA
    accepted: usize,
}

async fn fake_smtp(case: Arc<Case>, seen: Arc<Mutex<Seen>>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (case, seen) = (case.clone(), seen.clone());
            tokio::spawn(async move {
                let mut r = BufReader::new(s);
                let g = case
                    .greeting
                    .clone()
                    .unwrap_or_else(|| "220 fake ESMTP\r\n".into());
                if r.get_mut().write_all(g.as_bytes()).await.is_err() {
                    return;
                }
                loop {
                    let mut line = String::new();
                    match tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line))
                        .await
                    {
                        Ok(Ok(n)) if n > 0 => {}
                        _ => return,
                    }
                    let cmd = line.trim_end().to_string();
                    seen.lock().unwrap().lines.push(cmd.clone());
                    let verb = cmd.split(' ').next().unwrap_or("").to_ascii_lowercase();
                    let answer = if let Some(o) = case.overrides.get(&verb) {
                        o.clone()
                    } else {
                        match verb.as_str() {
                            "ehlo" => "250-fake\r\n250-STARTTLS\r\n250 AUTH PLAIN\r\n".into(),
                            "data" => {
                                let _ = r.get_mut().write_all(b"354 go\r\n").await;
                                loop {
                                    let mut d = String::new();
                                    if r.read_line(&mut d).await.unwrap_or(0) == 0 {
                                        return;
                                    }
                                    if d == ".\r\n" {
                                        break;
                                    }
                                }
                                seen.lock().unwrap().accepted += 1;
                                "250 2.0.0 queued\r\n".into()
                            }
                            "quit" => "221 bye\r\n".into(),
                            "auth" => "235 ok\r\n".into(),
                            _ => "250 ok\r\n".into(),
                        }
                    };
                    if r.get_mut().write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

async fn reply<S: AsyncRead + Unpin>(r: &mut BufReader<S>) -> Option<String> {
    let mut all = String::new();
    loop {
        let mut l = String::new();
        match tokio::time::timeout(Duration::from_secs(15), r.read_line(&mut l)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return (!all.is_empty()).then_some(all),
        }
        all.push_str(&l);
        if l.len() < 4 || l.as_bytes()[3] != b'-' {
            return Some(all);
        }
    }
}

async fn cmd<S: AsyncRead + AsyncWrite + Unpin>(r: &mut BufReader<S>, c: &str) -> String {
    let _ = r.get_mut().write_all(format!("{c}\r\n").as_bytes()).await;
    reply(r).await.unwrap_or_default()
}

#[tokio::test]
async fn odd_smtp_backends_fail_closed() {
    let all = cases("smtp");
    assert!(all.len() >= 50, "found {} SMTP cases", all.len());
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = common::dev_cert(dir.path());
    let mut summary = Vec::new();
    for case in all {
        let case = Arc::new(case);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let backend = fake_smtp(case.clone(), seen.clone()).await;
        let y = format!(
            "listeners:\n  - {{ name: mx, protocol: smtp, bind: \"127.0.0.1:0\", tls: implicit, auth: optional, backend: b, timeouts: {{ backend_reply: 3s, backend_connect: 3s }} }}\ntls:\n  certificates: [ {{ cert: \"{d}/cert.pem\", key: \"{d}/key.pem\" }} ]\nbackends:\n  b: {{ address: \"{backend}\" }}\n",
            d = dir.path().display()
        );
        let gw = common::start(&y).await;
        let tcp = TcpStream::connect(gw.addr("mx").unwrap()).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(common::tls_client(&ca))
            .connect(
                rustls_pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        let mut r = BufReader::new(tls);
        let greeting = reply(&mut r).await.unwrap_or_default();
        assert!(
            greeting.starts_with("220 "),
            "{}: our own greeting: {greeting}",
            case.name
        );
        let ehlo = cmd(&mut r, "EHLO client.example").await;
        assert!(
            ehlo.starts_with("250"),
            "{}: EHLO is ours: {ehlo}",
            case.name
        );
        let offered_auth = ehlo.contains("AUTH PLAIN");
        let auth = if offered_auth {
            cmd(&mut r, "AUTH PLAIN AGFsaWNlAHNlY3JldA==").await
        } else {
            String::new()
        };
        let mut client_250_data = 0;
        for round in 0..2 {
            let mail = cmd(&mut r, "MAIL FROM:<a@example.org>").await;
            if !mail.starts_with("250") {
                assert!(
                    mail.starts_with('4') || mail.starts_with('5'),
                    "{} round {round}: MAIL: {mail}",
                    case.name
                );
                break;
            }
            let rcpt = cmd(&mut r, "RCPT TO:<b@example.net>").await;
            if !rcpt.starts_with("250") {
                let _ = cmd(&mut r, "RSET").await;
                continue;
            }
            if round == 0 {
                // abandon the first transaction: the backend then gets RSET
                assert!(cmd(&mut r, "RSET").await.starts_with("250"));
                continue;
            }
            if !cmd(&mut r, "DATA").await.starts_with("354") {
                break;
            }
            let fin = cmd(&mut r, "Subject: odd\r\n\r\nbody\r\n.").await;
            if fin.starts_with("250") {
                client_250_data += 1;
            }
        }
        let s = seen.lock().unwrap();
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
            .any(|l| l.to_ascii_uppercase().starts_with("AUTH"));
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
                !s.lines.iter().any(|l| l.starts_with("MAIL")),
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

async fn fake_pop3(case: Arc<Case>, seen: Arc<Mutex<Seen>>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (case, seen) = (case.clone(), seen.clone());
            tokio::spawn(async move {
                let mut r = BufReader::new(s);
                let g = case
                    .greeting
                    .clone()
                    .unwrap_or_else(|| "+OK fake\r\n".into());
                if r.get_mut().write_all(g.as_bytes()).await.is_err() {
                    return;
                }
                loop {
                    let mut line = String::new();
                    match tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line))
                        .await
                    {
                        Ok(Ok(n)) if n > 0 => {}
                        _ => return,
                    }
                    let cmd = line.trim_end().to_string();
                    seen.lock().unwrap().lines.push(cmd.clone());
                    let verb = cmd.split(' ').next().unwrap_or("").to_ascii_lowercase();
                    let answer = if let Some(o) = case.overrides.get(&verb) {
                        o.clone()
                    } else {
                        match verb.as_str() {
                            "capa" => {
                                let mut c = String::from("+OK\r\n");
                                for l in &case.capa {
                                    c.push_str(l);
                                    c.push_str("\r\n");
                                }
                                c.push_str(".\r\n");
                                c
                            }
                            "pass" | "auth" => {
                                seen.lock().unwrap().accepted += 1;
                                "+OK logged in\r\n".into()
                            }
                            "stat" => "+OK 0 0\r\n".into(),
                            _ => "+OK\r\n".into(),
                        }
                    };
                    if r.get_mut().write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn odd_pop3_backends_fail_closed() {
    let all = cases("pop3");
    assert!(all.len() >= 30, "found {} POP3 cases", all.len());
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = common::dev_cert(dir.path());
    for case in all {
        let case = Arc::new(case);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let backend = fake_pop3(case.clone(), seen.clone()).await;
        let y = format!(
            "listeners:\n  - {{ name: p, protocol: pop3, bind: \"127.0.0.1:0\", tls: implicit, backend: b, login_failure_delay: 10ms, timeouts: {{ backend_reply: 3s, backend_connect: 3s }} }}\ntls:\n  certificates: [ {{ cert: \"{d}/cert.pem\", key: \"{d}/key.pem\" }} ]\nbackends:\n  b: {{ address: \"{backend}\" }}\n",
            d = dir.path().display()
        );
        let gw = common::start(&y).await;
        let tcp = TcpStream::connect(gw.addr("p").unwrap()).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(common::tls_client(&ca))
            .connect(
                rustls_pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        let mut r = BufReader::new(tls);
        let greeting = reply_pop(&mut r).await;
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
        let user = pop(&mut r, "USER alice").await;
        let pass = if user.starts_with("+OK") {
            pop(&mut r, "PASS secret").await
        } else {
            String::new()
        };
        let s = seen.lock().unwrap();
        let greeted_ok = case
            .greeting
            .as_deref()
            .is_none_or(|g| g.starts_with("+OK"));
        let sent_pass = s.lines.iter().any(|l| {
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

async fn reply_pop<S: AsyncRead + Unpin>(r: &mut BufReader<S>) -> String {
    let mut l = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), r.read_line(&mut l)).await;
    l
}

async fn pop<S: AsyncRead + AsyncWrite + Unpin>(r: &mut BufReader<S>, c: &str) -> String {
    let _ = r.get_mut().write_all(format!("{c}\r\n").as_bytes()).await;
    reply_pop(r).await
}
