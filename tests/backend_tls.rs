//! TLS to backends that can do it: implicit TLS and STARTTLS to an SMTP
//! backend, implicit TLS to a POP3 backend; verification by CA file or by a
//! pinned SHA-256; a backend that does not offer STARTTLS when configured for
//! it never gets the session in plaintext.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

fn acceptor(cert: &std::path::Path, key: &std::path::Path) -> TlsAcceptor {
    TlsAcceptor::from(
        mailgate::tls::server_config(&[(cert.to_path_buf(), key.to_path_buf())]).unwrap(),
    )
}

/// A legacy SMTP server speaking `mode` ("implicit", "starttls", "stripped")
/// that records the commands it received and whether they came over TLS.
async fn smtp_backend(
    acc: TlsAcceptor,
    mode: &'static str,
    log: Arc<Mutex<Vec<String>>>,
) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (acc, log) = (acc.clone(), log.clone());
            tokio::spawn(async move {
                if mode == "implicit" {
                    let Ok(tls) = acc.accept(tcp).await else {
                        return;
                    };
                    serve(BufReader::new(Box::new(tls)), true, mode, log, None).await;
                } else {
                    serve(BufReader::new(Box::new(tcp)), false, mode, log, Some(acc)).await;
                }
            });
        }
    });
    addr
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn serve(
    mut r: BufReader<Box<dyn Io>>,
    tls: bool,
    mode: &'static str,
    log: Arc<Mutex<Vec<String>>>,
    upgrade: Option<TlsAcceptor>,
) {
    // a greeting on a new connection (not again after STARTTLS)
    let greet = !tls || mode == "implicit";
    if greet
        && r.get_mut()
            .write_all(b"220 legacy ESMTP\r\n")
            .await
            .is_err()
    {
        return;
    }
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let cmd = line.trim_end().to_string();
        log.lock()
            .unwrap()
            .push(format!("{}{cmd}", if tls { "tls:" } else { "plain:" }));
        let up = cmd.to_ascii_uppercase();
        let ans: &[u8] = if up.starts_with("EHLO") {
            if !tls && mode == "starttls" {
                b"250-legacy\r\n250 STARTTLS\r\n"
            } else {
                b"250-legacy\r\n250 8BITMIME\r\n"
            }
        } else if up == "STARTTLS" && !tls {
            r.get_mut().write_all(b"220 go ahead\r\n").await.unwrap();
            let Some(acc) = upgrade else { return };
            let Ok(t) = acc.accept(r.into_inner()).await else {
                return;
            };
            return Box::pin(serve(BufReader::new(Box::new(t)), true, mode, log, None)).await;
        } else if up == "DATA" {
            r.get_mut().write_all(b"354 go\r\n").await.unwrap();
            loop {
                let mut d = String::new();
                if r.read_line(&mut d).await.unwrap_or(0) == 0 || d == ".\r\n" {
                    break;
                }
            }
            b"250 2.0.0 queued over tls\r\n"
        } else if up == "QUIT" {
            let _ = r.get_mut().write_all(b"221 bye\r\n").await;
            return;
        } else {
            b"250 ok\r\n"
        };
        if r.get_mut().write_all(ans).await.is_err() {
            return;
        }
    }
}

async fn reply<S: AsyncRead + Unpin>(r: &mut BufReader<S>) -> String {
    let mut all = String::new();
    loop {
        let mut l = String::new();
        tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut l))
            .await
            .expect("timed out")
            .unwrap();
        all.push_str(&l);
        if l.len() < 4 || l.as_bytes()[3] != b'-' {
            return all;
        }
    }
}

async fn cmd<S: AsyncRead + AsyncWrite + Unpin>(r: &mut BufReader<S>, c: &str) -> String {
    r.get_mut()
        .write_all(format!("{c}\r\n").as_bytes())
        .await
        .unwrap();
    reply(r).await
}

fn sha256_hex(pem: &std::path::Path) -> String {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_file(pem).unwrap();
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der.as_ref());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

async fn deliver(gw: &mailgate::server::Gateway) -> String {
    let s = TcpStream::connect(gw.addr("mx").unwrap()).await.unwrap();
    let mut r = BufReader::new(s);
    reply(&mut r).await;
    cmd(&mut r, "EHLO c.example").await;
    let mail = cmd(&mut r, "MAIL FROM:<a@example.org>").await;
    if !mail.starts_with("250") {
        return mail;
    }
    cmd(&mut r, "RCPT TO:<b@example.net>").await;
    cmd(&mut r, "DATA").await;
    cmd(&mut r, "Subject: t\r\n\r\nhi\r\n.").await
}

fn config(backend: &str, tls: &str) -> String {
    format!("listeners:\n  - {{ name: mx, protocol: smtp, bind: \"127.0.0.1:0\", tls: none, backend: b }}\nbackends:\n  b: {{ address: \"{backend}\", server_name: localhost, {tls} }}\n")
}

#[tokio::test]
async fn smtp_backend_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = common::dev_cert(dir.path());
    let other = tempfile::tempdir().unwrap();
    let (other_cert, _) = common::dev_cert(other.path());
    let ca = cert.display().to_string();
    for mode in ["implicit", "starttls"] {
        let log = Arc::new(Mutex::new(Vec::new()));
        let addr = smtp_backend(acceptor(&cert, &key), mode, log.clone()).await;
        // verified by CA
        let gw = common::start(&config(&addr, &format!("tls: {mode}, ca: \"{ca}\""))).await;
        let r = deliver(&gw).await;
        assert!(r.starts_with("250 2.0.0 queued over tls"), "{mode}: {r}");
        let seen = log.lock().unwrap().clone();
        assert!(
            seen.iter().any(|l| l.starts_with("tls:MAIL FROM")),
            "{mode}: {seen:?}"
        );
        assert!(
            !seen.iter().any(|l| l.starts_with("plain:MAIL")),
            "{mode}: MAIL in plaintext: {seen:?}"
        );
        // verified by pin
        let gw = common::start(&config(
            &addr,
            &format!("tls: {mode}, pin_sha256: [\"{}\"]", sha256_hex(&cert)),
        ))
        .await;
        assert!(deliver(&gw).await.starts_with("250"), "{mode}: pinned");
        // wrong pin, wrong CA: fail closed
        let gw = common::start(&config(
            &addr,
            &format!("tls: {mode}, pin_sha256: [\"{}\"]", sha256_hex(&other_cert)),
        ))
        .await;
        let r = deliver(&gw).await;
        assert!(r.starts_with("451 4.4.1"), "{mode} wrong pin: {r}");
        let gw = common::start(&config(
            &addr,
            &format!("tls: {mode}, ca: \"{}\"", other_cert.display()),
        ))
        .await;
        assert!(
            deliver(&gw).await.starts_with("451 4.4.1"),
            "{mode}: wrong CA"
        );
    }
    // configured for STARTTLS, backend does not offer it: never plaintext
    let log = Arc::new(Mutex::new(Vec::new()));
    let addr = smtp_backend(acceptor(&cert, &key), "stripped", log.clone()).await;
    let gw = common::start(&config(&addr, &format!("tls: starttls, ca: \"{ca}\""))).await;
    let r = deliver(&gw).await;
    assert!(r.starts_with("451 4.4.1"), "{r}");
    assert!(
        !log.lock().unwrap().iter().any(|l| l.contains("MAIL")),
        "no MAIL over plaintext"
    );
}

#[tokio::test]
async fn pop3_backend_over_implicit_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = common::dev_cert(dir.path());
    let acc = acceptor(&cert, &key);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let acc = acc.clone();
            tokio::spawn(async move {
                let Ok(tls) = acc.accept(tcp).await else {
                    return;
                };
                let mut r = BufReader::new(tls);
                r.get_mut()
                    .write_all(b"+OK pop3s legacy\r\n")
                    .await
                    .unwrap();
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let up = line.trim_end().to_ascii_uppercase();
                    let ans: &[u8] = if up == "CAPA" {
                        b"+OK\r\nUSER\r\nUIDL\r\n.\r\n"
                    } else if up.starts_with("PASS") {
                        if up == "PASS SECRET" {
                            b"+OK in\r\n"
                        } else {
                            b"-ERR [AUTH] no\r\n"
                        }
                    } else if up == "STAT" {
                        b"+OK 0 0\r\n"
                    } else {
                        b"+OK\r\n"
                    };
                    r.get_mut().write_all(ans).await.unwrap();
                }
            });
        }
    });
    let y = format!(
        "listeners:\n  - {{ name: p, protocol: pop3, bind: \"127.0.0.1:0\", tls: none, require_tls: false, backend: b }}\nbackends:\n  b: {{ address: \"{addr}\", server_name: localhost, tls: implicit, ca: \"{}\" }}\n",
        cert.display()
    );
    let gw = common::start(&y).await;
    let s = TcpStream::connect(gw.addr("p").unwrap()).await.unwrap();
    let mut r = BufReader::new(s);
    let mut l = String::new();
    r.read_line(&mut l).await.unwrap();
    assert!(l.starts_with("+OK"));
    for (c, want) in [
        ("USER alice", "+OK"),
        ("PASS secret", "+OK"),
        ("STAT", "+OK 0 0"),
    ] {
        r.get_mut()
            .write_all(format!("{c}\r\n").as_bytes())
            .await
            .unwrap();
        let mut l = String::new();
        tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut l))
            .await
            .unwrap()
            .unwrap();
        assert!(l.starts_with(want), "{c}: {l}");
    }
    // STLS to a POP3 backend is refused by configuration
    let e = mailgate::config::load_str("t.yaml", &y.replace("tls: implicit", "tls: starttls"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("supported for SMTP backends only"), "{e}");
}
