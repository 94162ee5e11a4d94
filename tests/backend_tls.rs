//! TLS to backends that can do it: implicit TLS and STARTTLS to an SMTP
//! backend, implicit TLS to a POP3 backend; verification by CA file or by a
//! pinned SHA-256; a backend that does not offer STARTTLS when configured for
//! it never gets the session in plaintext.

mod common;

use common::{Gateway, Pop3Backend, Pop3Client, Running, SmtpBackend, SmtpClient, Yaml};
use tokio_rustls::TlsAcceptor;

fn acceptor(cert: &std::path::Path, key: &std::path::Path) -> TlsAcceptor {
    TlsAcceptor::from(
        mailgate::tls::server_config(&[(cert.to_path_buf(), key.to_path_buf())]).unwrap(),
    )
}

/// A legacy SMTP server speaking `mode` ("implicit", "starttls", "stripped":
/// says 220 to STARTTLS without offering it, then hangs up) that records the
/// commands it received and whether they came over TLS.
async fn smtp_backend(acc: TlsAcceptor, mode: &'static str) -> Running {
    let b = SmtpBackend::new().end_of_data("250 2.0.0 queued over tls\r\n");
    match mode {
        "implicit" => b.implicit_tls(acc),
        "starttls" => b.starttls(acc, "250-legacy\r\n250 STARTTLS\r\n"),
        _ => b.on("STARTTLS", "220 go ahead\r\n").close_after("STARTTLS"),
    }
    .start()
    .await
}

fn sha256_hex(pem: &std::path::Path) -> String {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_file(pem).unwrap();
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der.as_ref());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

async fn deliver(gw: &Gateway) -> String {
    let mut r = SmtpClient::connect(gw.addr("mx").unwrap()).await;
    r.text().await;
    r.cmd("EHLO c.example").await;
    let mail = r.cmd("MAIL FROM:<a@example.org>").await;
    if !mail.starts_with("250") {
        return mail;
    }
    r.cmd("RCPT TO:<b@example.net>").await;
    r.cmd("DATA").await;
    r.cmd("Subject: t\r\n\r\nhi\r\n.").await
}

fn config(backend: &str, tls: &str) -> String {
    Yaml::new()
        .listener("mx", "smtp", "none", "")
        .backend("b", backend, &format!("server_name: localhost, {tls}"))
        .build()
}

#[tokio::test]
async fn smtp_backend_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = common::dev_cert(dir.path());
    let other = tempfile::tempdir().unwrap();
    let (other_cert, _) = common::dev_cert(other.path());
    let ca = cert.display().to_string();
    for mode in ["implicit", "starttls"] {
        let be = smtp_backend(acceptor(&cert, &key), mode).await;
        let addr = be.addr.clone();
        // verified by CA
        let gw = common::start(&config(&addr, &format!("tls: {mode}, ca: \"{ca}\""))).await;
        let r = deliver(&gw).await;
        assert!(r.starts_with("250 2.0.0 queued over tls"), "{mode}: {r}");
        let seen = be.tagged();
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
    let be = smtp_backend(acceptor(&cert, &key), "stripped").await;
    let addr = be.addr.clone();
    let gw = common::start(&config(&addr, &format!("tls: starttls, ca: \"{ca}\""))).await;
    let r = deliver(&gw).await;
    assert!(r.starts_with("451 4.4.1"), "{r}");
    assert!(
        !be.lines().iter().any(|l| l.contains("MAIL")),
        "no MAIL over plaintext"
    );
}

#[tokio::test]
async fn pop3_backend_over_implicit_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = common::dev_cert(dir.path());
    let be = Pop3Backend::new()
        .implicit_tls(acceptor(&cert, &key))
        .greeting("+OK pop3s legacy\r\n")
        .capa(&["USER", "UIDL"])
        .on_line("PASS secret", "+OK in\r\n")
        .on("PASS", "-ERR [AUTH] no\r\n")
        .start()
        .await;
    let y = Yaml::new()
        .listener_to("p", "pop3", "none", "b", "require_tls: false")
        .backend(
            "b",
            &be.addr,
            &format!(
                "server_name: localhost, tls: implicit, ca: \"{}\"",
                cert.display()
            ),
        )
        .build();
    let gw = common::start(&y).await;
    let mut r = Pop3Client::connect(gw.addr("p").unwrap()).await;
    assert!(r.status().await.starts_with("+OK"));
    for (c, want) in [
        ("USER alice", "+OK"),
        ("PASS secret", "+OK"),
        ("STAT", "+OK 0 0"),
    ] {
        r.send(format!("{c}\r\n").as_bytes()).await;
        let l = r.status().await;
        assert!(l.starts_with(want), "{c}: {l}");
    }
    // STLS to a POP3 backend is refused by configuration
    let e = mailgate::config::load_str("t.yaml", &y.replace("tls: implicit", "tls: starttls"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("supported for SMTP backends only"), "{e}");
}
