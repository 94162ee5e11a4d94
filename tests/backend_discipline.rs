//! Fail closed towards odd backends (issue 11 items 3 and 4, issue 19 item 4
//! for SMTP AUTH), gateway in-process on loopback. Each scripted backend
//! misbehaves in one way; the client must never see a 2xx (or a 235/535) the
//! backend did not give for that command, a configured client identity that
//! cannot be applied stops the transaction before MAIL, and PROXY headers
//! without a client address are not taken from balancers by default.

mod common;

use common::{Gateway, Running, SmtpBackend, SmtpClient, Tls, Yaml};
use std::net::IpAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The legacy server these tests script: PIPELINING, XCLIENT, AUTH, and
/// enhanced codes on MAIL and RCPT; every reply is the raw bytes it writes.
fn legacy() -> SmtpBackend {
    SmtpBackend::new()
        .on("EHLO", "250-legacy\r\n250 PIPELINING\r\n")
        .on("XCLIENT", "220 legacy ESMTP again\r\n")
        .on("MAIL", "250 2.1.0 ok\r\n")
        .on("RCPT", "250 2.1.5 ok\r\n")
        .on("AUTH", "235 2.7.0 ok\r\n")
        .otherwise("250 2.0.0 ok\r\n")
}

/// The backend running: its address, and what it received.
async fn scripted(script: SmtpBackend) -> (String, Running) {
    let b = script.start().await;
    (b.addr.clone(), b)
}

/// A plaintext listener `mx` in front of `backend`; `backend_extra` goes into
/// the backend's flow mapping, `listener_extra` into the listener's.
fn config(backend: &str, backend_extra: &str, listener_extra: &str) -> String {
    Yaml::new()
        .listener(
            "mx",
            "smtp",
            "none",
            &format!("timeouts: {{ backend_reply: 3s, backend_connect: 3s }}{listener_extra}"),
        )
        .backend("b", backend, backend_extra)
        .build()
}

async fn session(gw: &Gateway) -> SmtpClient<TcpStream> {
    let mut r = SmtpClient::connect(gw.addr("mx").unwrap()).await;
    assert!(r.text().await.starts_with("220"));
    assert!(r.cmd("EHLO client.example").await.starts_with("250"));
    r
}

/// MAIL, RCPT and the message; returns the client's reply to the end of DATA.
async fn send_message(r: &mut SmtpClient<TcpStream>) -> String {
    let mail = r.cmd("MAIL FROM:<a@example.org>").await;
    assert!(mail.starts_with("250"), "MAIL: {mail}");
    let rcpt = r.cmd("RCPT TO:<b@example.net>").await;
    assert!(rcpt.starts_with("250"), "RCPT: {rcpt}");
    assert!(r.cmd("DATA").await.starts_with("354"));
    r.cmd("Subject: x\r\n\r\nhello\r\n.").await
}

/// Acceptance 2: the end of DATA answered with 221 (the backend closing) is
/// not a delivery.
#[tokio::test]
async fn end_of_data_answered_221_is_not_delivered() {
    let (backend, _) = scripted(legacy().end_of_data("221 2.0.0 bye\r\n")).await;
    let gw = common::start(&config(&backend, "", "")).await;
    let mut r = session(&gw).await;
    let fin = send_message(&mut r).await;
    assert!(fin.starts_with("451 4.4.2"), "end of DATA: {fin}");
}

/// Acceptance 2: a stale 250 written right after 354, then the real verdict
/// 554 after the message: the stale reply is never taken as the verdict.
#[tokio::test]
async fn stale_250_before_554_is_not_delivered() {
    let (backend, _) = scripted(
        legacy()
            .on("DATA", "354 go\r\n250 2.0.0 stale\r\n")
            .end_of_data("554 5.7.1 rejected\r\n"),
    )
    .await;
    let gw = common::start(&config(&backend, "", "")).await;
    let mut r = session(&gw).await;
    let fin = send_message(&mut r).await;
    assert!(!fin.starts_with('2'), "end of DATA: {fin}");
    assert!(fin.starts_with("451 4.4.2"), "end of DATA: {fin}");
    // the out-of-step connection was dropped: the next message starts afresh
    let fin = send_message(&mut r).await;
    assert!(fin.starts_with("451 4.4.2"), "second message: {fin}");
}

/// An extra 250 after MAIL is not taken as the answer to RCPT (which the
/// backend refuses with 554).
#[tokio::test]
async fn extra_reply_after_mail_is_not_taken_for_rcpt() {
    let (backend, seen) = scripted(
        legacy()
            .on("MAIL", "250 2.1.0 ok\r\n250 2.1.5 stale\r\n")
            .on("RCPT", "554 5.7.1 relay denied\r\n"),
    )
    .await;
    let gw = common::start(&config(&backend, "", "")).await;
    let mut r = session(&gw).await;
    assert!(r.cmd("MAIL FROM:<a@example.org>").await.starts_with("250"));
    let rcpt = r.cmd("RCPT TO:<b@example.net>").await;
    assert!(rcpt.starts_with("451 4.4.2"), "RCPT: {rcpt}");
    let data = r.cmd("DATA").await;
    assert!(!data.starts_with('2') && !data.starts_with('3'), "{data}");
    let seen = seen.lines();
    assert!(
        !seen.iter().any(|l| l.starts_with("RCPT")),
        "RCPT never sent on the out-of-step connection: {seen:?}"
    );
}

/// An unsolicited 421 (idle timeout, shutdown: RFC 5321 §3.8) waiting
/// before MAIL ends that connection: 451 4.4.2, the MAIL never sent there.
#[tokio::test]
async fn unsolicited_421_before_mail_is_a_lost_connection() {
    let (backend, seen) = scripted(
        legacy()
            .on(
                "EHLO",
                "250-legacy\r\n250 PIPELINING\r\n421 4.4.2 legacy Error: timeout exceeded\r\n",
            )
            .close_after("EHLO"),
    )
    .await;
    let gw = common::start(&config(&backend, "", "")).await;
    let mut r = session(&gw).await;
    let mail = r.cmd("MAIL FROM:<a@example.org>").await;
    assert!(mail.starts_with("451 4.4.2"), "MAIL: {mail}");
    assert!(!seen.lines().iter().any(|l| l.starts_with("MAIL")));
}

/// Codes that are not valid answers at their stage never reach the client
/// as such: 251 to MAIL, 252 to RCPT, 251 at the end of DATA.
#[tokio::test]
async fn wrong_positive_codes_are_not_relayed() {
    let (backend, _) = scripted(legacy().on("MAIL", "251 2.1.0 odd\r\n")).await;
    let gw = common::start(&config(&backend, "", "")).await;
    let mut r = session(&gw).await;
    let mail = r.cmd("MAIL FROM:<a@example.org>").await;
    assert!(mail.starts_with("451 4.4.2"), "MAIL: {mail}");

    let (backend, _) = scripted(legacy().on("RCPT", "252 2.1.5 cannot verify\r\n")).await;
    let gw = common::start(&config(&backend, "", "")).await;
    let mut r = session(&gw).await;
    assert!(r.cmd("MAIL FROM:<a@example.org>").await.starts_with("250"));
    let rcpt = r.cmd("RCPT TO:<b@example.net>").await;
    assert!(rcpt.starts_with("451 4.4.2"), "RCPT: {rcpt}");

    let (backend, _) = scripted(legacy().end_of_data("251 2.0.0 odd\r\n")).await;
    let gw = common::start(&config(&backend, "", "")).await;
    let mut r = session(&gw).await;
    let fin = send_message(&mut r).await;
    assert!(fin.starts_with("451 4.4.2"), "end of DATA: {fin}");
}

const XCLIENT_EHLO: &str =
    "250-legacy\r\n250-XCLIENT NAME ADDR PORT PROTO HELO\r\n250 PIPELINING\r\n";

/// A backend whose XCLIENT cannot be used never sees MAIL; the client gets
/// 451 4.7.0 at MAIL, every time.
async fn identity_fails_closed(what: &str, script: SmtpBackend) {
    let (backend, seen) = scripted(script).await;
    let gw = common::start(&config(&backend, ", identity: [xclient, received]", "")).await;
    let mut r = session(&gw).await;
    for _ in 0..2 {
        let mail = r.cmd("MAIL FROM:<a@example.org>").await;
        assert!(mail.starts_with("451 4.7.0"), "{what}: MAIL: {mail}");
    }
    let rcpt = r.cmd("RCPT TO:<b@example.net>").await;
    assert!(rcpt.starts_with("503"), "{what}: no transaction: {rcpt}");
    r.cmd("QUIT").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let seen = seen.lines();
    assert!(
        !seen.iter().any(|l| l.starts_with("MAIL")),
        "{what}: the backend saw MAIL: {seen:?}"
    );
}

/// Acceptance 2 (identity): XCLIENT offered but refused.
#[tokio::test]
async fn xclient_refused_fails_closed() {
    let script = legacy()
        .on("EHLO", XCLIENT_EHLO)
        .on("XCLIENT", "550 5.7.0 Error: insufficient authorization\r\n");
    identity_fails_closed("refused", script).await;
}

/// Acceptance 2 (identity): XCLIENT configured, the backend does not offer it.
#[tokio::test]
async fn xclient_not_offered_fails_closed() {
    identity_fails_closed("not offered", legacy()).await;
}

/// XCLIENT offered without ADDR cannot tell the backend the address.
#[tokio::test]
async fn xclient_without_addr_fails_closed() {
    let script = legacy().on("EHLO", "250-legacy\r\n250 XCLIENT NAME HELO\r\n");
    identity_fails_closed("offered without ADDR", script).await;
}

/// The explicit opt-out: `identity_optional: true` relays without XCLIENT.
#[tokio::test]
async fn xclient_opt_out_relays_without_identity() {
    let (backend, seen) = scripted(
        legacy()
            .on("EHLO", XCLIENT_EHLO)
            .on("XCLIENT", "550 5.7.0 Error: insufficient authorization\r\n"),
    )
    .await;
    let gw = common::start(&config(
        &backend,
        ", identity: [xclient, received], identity_optional: true",
        "",
    ))
    .await;
    let mut r = session(&gw).await;
    let fin = send_message(&mut r).await;
    assert!(fin.starts_with("250"), "{fin}");
    assert!(seen.lines().iter().any(|l| l.starts_with("MAIL")));
}

/// A TLS listener with AUTH and a one-failure lock per IP, so a counted
/// failure shows in `login_allowed`.
fn auth_config(dir: &std::path::Path, backend: &str) -> String {
    Yaml::new()
        .listener("mx", "smtp", "implicit", "auth: optional, policy: p, login_failure_delay: 10ms, timeouts: { backend_reply: 3s, backend_connect: 3s }")
        .certs(dir)
        .backend("b", backend, "")
        .section("policies:\n  p:\n    limits:\n      - { name: auth-ip, key: [ip], auth_failures: 1/15minutes, action: reject }")
        .build()
}

/// A session over implicit TLS, after an EHLO that offered AUTH PLAIN.
async fn auth_session(gw: &Gateway, ca: &std::path::Path) -> SmtpClient<Tls> {
    let mut r = SmtpClient::connect(gw.addr("mx").unwrap())
        .await
        .tls(ca)
        .await;
    assert!(r.text().await.starts_with("220"));
    let ehlo = r.cmd("EHLO client.example").await;
    assert!(ehlo.contains("AUTH PLAIN"), "{ehlo}");
    r
}

/// One AUTH PLAIN (alice/secret) over implicit TLS; the reply.
async fn auth_once(gw: &Gateway, ca: &std::path::Path) -> String {
    let mut r = auth_session(gw, ca).await;
    r.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA==").await
}

fn failure_counted(gw: &Gateway) -> bool {
    let p = gw.policy("mx").unwrap();
    let mut f = mailgate::policy::Facts::new(IpAddr::from([127, 0, 0, 1]), "mx");
    f.auth_user = Some("alice");
    !matches!(
        p.login_allowed(&f).decision,
        mailgate::policy::Decision::Continue
    )
}

/// Issue 19 item 4 (SMTP AUTH): whatever the backend does before AUTH, the
/// attempt is a temporary failure: 454, never 235 or 535, nothing counted.
async fn auth_is_temporary(what: &str, script: SmtpBackend) {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = common::dev_cert(dir.path());
    let (backend, _) = scripted(script).await;
    let gw = common::start(&auth_config(dir.path(), &backend)).await;
    for i in 0..2 {
        let r = auth_once(&gw, &ca).await;
        assert!(r.starts_with("454 4.7.0"), "{what} attempt {i}: {r}");
    }
    assert!(!failure_counted(&gw), "{what}: a failure was counted");
}

/// A stale 235 buffered before AUTH is not a login.
#[tokio::test]
async fn auth_after_stale_235_is_temporary() {
    let script = legacy()
        .on(
            "EHLO",
            "250-legacy\r\n250 AUTH PLAIN\r\n235 2.7.0 stale\r\n",
        )
        .on("AUTH", "535 5.7.8 wrong\r\n");
    auth_is_temporary("stale 235", script).await;
}

/// An idle-timeout 554 and close before AUTH is not a failed login.
#[tokio::test]
async fn auth_after_idle_close_is_temporary() {
    let script = legacy()
        .on(
            "EHLO",
            "250-legacy\r\n250 AUTH PLAIN\r\n554 5.0.0 idle timeout\r\n",
        )
        .close_after("EHLO");
    auth_is_temporary("554 and close", script).await;
}

/// A backend that closed before AUTH is not a failed login.
#[tokio::test]
async fn auth_after_close_is_temporary() {
    let script = legacy()
        .on("EHLO", "250-legacy\r\n250 AUTH PLAIN\r\n")
        .close_after("EHLO");
    auth_is_temporary("closed", script).await;
}

/// A LOGIN-only backend that answers the bare `AUTH LOGIN` with 235 (before
/// any credentials) is out of step, not a login.
#[tokio::test]
async fn auth_login_235_before_credentials_is_temporary() {
    let script = legacy()
        .on("EHLO", "250-legacy\r\n250 AUTH LOGIN\r\n")
        .on("AUTH", "235 2.7.0 ok\r\n");
    auth_is_temporary("235 to AUTH LOGIN", script).await;
}

/// A legacy backend that answers a wrong password with 554 (not 535): never
/// charged to the policy's lockout (it may be backend trouble), but slowed by
/// `login_failure_delay` and counted towards the session's
/// `max_login_failures`, so guessing stays slow and bounded.
#[tokio::test]
async fn auth_other_5xx_is_slowed_and_bounded_per_session() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = common::dev_cert(dir.path());
    let (backend, _) = scripted(
        legacy()
            .on("EHLO", "250-legacy\r\n250 AUTH PLAIN\r\n")
            .on("AUTH", "554 5.7.1 no\r\n"),
    )
    .await;
    let y = auth_config(dir.path(), &backend).replace(
        "login_failure_delay: 10ms",
        "login_failure_delay: 300ms, max_login_failures: 2",
    );
    let gw = common::start(&y).await;
    let mut r = auth_session(&gw, &ca).await;
    let t = std::time::Instant::now();
    let first = r.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA==").await;
    assert!(first.starts_with("454 4.7.0"), "{first}");
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    let second = r.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA==").await;
    assert!(second.starts_with("421 4.7.0"), "{second}");
    assert!(!failure_counted(&gw), "never charged to the lockout");
}

/// Issue 19 item 4: bytes buffered behind a 235 mean the conversation is
/// out of step (the 235 may answer something else): a temporary failure,
/// never a login, never known-good.
#[tokio::test]
async fn auth_235_with_trailing_bytes_is_temporary() {
    let script = legacy()
        .on("EHLO", "250-legacy\r\n250 AUTH PLAIN\r\n")
        .on("AUTH", "235 2.7.0 ok\r\n535 5.7.8 wrong\r\n");
    auth_is_temporary("235 and more", script).await;
}

/// Control for the three above: a real 535 is counted (so `failure_counted`
/// does see the policy's counter).
#[tokio::test]
async fn auth_real_535_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = common::dev_cert(dir.path());
    let (backend, _) = scripted(
        legacy()
            .on("EHLO", "250-legacy\r\n250 AUTH PLAIN\r\n")
            .on("AUTH", "535 5.7.8 wrong\r\n"),
    )
    .await;
    let gw = common::start(&auth_config(dir.path(), &backend)).await;
    assert!(!failure_counted(&gw));
    assert!(auth_once(&gw, &ca).await.starts_with("535"));
    assert!(failure_counted(&gw), "a real 535 is counted");
}

/// Issue 11 item 4: PROXY `LOCAL` (v2) and `UNKNOWN` (v1) from a trusted
/// balancer carry no client address: closed, unless the listener allows it.
#[tokio::test]
async fn proxy_local_and_unknown_need_the_opt_in() {
    const V2_LOCAL: &[u8] = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";
    const V1_UNKNOWN: &[u8] = b"PROXY UNKNOWN\r\n";
    let (backend, _) = scripted(legacy()).await;
    let trusted = ", proxy_protocol: { trusted: [\"127.0.0.0/8\"], timeout: 2s }";
    let gw = common::start(&config(&backend, "", trusted)).await;
    for header in [V2_LOCAL, V1_UNKNOWN] {
        let mut s = TcpStream::connect(gw.addr("mx").unwrap()).await.unwrap();
        s.write_all(header).await.unwrap();
        let mut buf = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .expect("closed")
            .unwrap_or(0);
        assert_eq!(n, 0, "{header:?}: got {:?}", String::from_utf8_lossy(&buf));
    }
    let allowed =
        ", proxy_protocol: { trusted: [\"127.0.0.0/8\"], timeout: 2s, allow_local: true }";
    let gw = common::start(&config(&backend, "", allowed)).await;
    for header in [V2_LOCAL, V1_UNKNOWN] {
        let mut r = SmtpClient::connect(gw.addr("mx").unwrap()).await;
        r.send(header).await;
        let g = r.text().await;
        assert!(g.starts_with("220"), "{header:?} with allow_local: {g}");
    }
}
