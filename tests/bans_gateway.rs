//! Bans across protocols (issue 14, acceptance 3 and the ban half of 4):
//! the gateway in-process on loopback, in front of scripted POP3, SMTP and
//! IMAP backends. A rule with `action: ban` bans the client's address
//! (after PROXY) on every listener, before TLS and the greeting, until
//! `ban_for` runs out; `/bans` shows the bans and a bearer token lifts them
//! (also through `mailgate bans`). Client addresses differ by binding to
//! 127.0.0.x; policy and listener names differ per test because metrics are
//! process-wide.

mod common;

use common::{
    http, Gateway, ImapBackend, Pop3Backend, Pop3Client, Running, SmtpBackend, SmtpClient, Yaml,
};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const REFUSED_SMTP: &str = "554 5.7.1 Access denied: address banned for a while\r\n";
const REFUSED_POP3: &str = "-ERR [AUTH] Access denied: address banned for a while\r\n";
const REFUSED_IMAP: &str = "* BYE Access denied: address banned for a while\r\n";

/// A POP3 backend that refuses every password.
async fn refusing_pop3() -> Running {
    Pop3Backend::new()
        .on("PASS", "-ERR [AUTH] scripted: invalid password\r\n")
        .start()
        .await
}

/// `n` failed USER/PASS logins on `c` (greeting already read).
async fn fail_logins<S>(c: &mut Pop3Client<S>, n: usize)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    for i in 0..n {
        c.send(b"USER alice\r\nPASS wrong\r\n").await;
        c.ok().await;
        let r = c.status().await;
        assert_eq!(r, "-ERR [AUTH] scripted: invalid password", "login {i}");
    }
}

/// Everything a new connection from `src` receives before the gateway
/// closes it or goes quiet for 300 ms.
async fn first_words(src: &str, addr: SocketAddr, before: &[u8]) -> String {
    let mut s = common::connect_from(src, addr).await;
    s.write_all(before).await.unwrap();
    let mut out = Vec::new();
    let mut tmp = [0u8; 1024];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(300), s.read(&mut tmp)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&tmp[..n]);
    }
    String::from_utf8_lossy(&out).to_string()
}

/// Whether the SMTP listener greets `src` (else it must refuse it as banned, and close).
async fn smtp_greets(src: &str, addr: SocketAddr, before: &[u8]) -> bool {
    let w = first_words(src, addr, before).await;
    if w.starts_with("220 ") {
        return true;
    }
    assert_eq!(w, REFUSED_SMTP);
    false
}

async fn bans(gw: &Gateway) -> Vec<serde_json::Value> {
    let (code, body) = http(gw.metrics_addr().unwrap(), "GET /bans HTTP/1.1").await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

async fn metric(gw: &Gateway, series: &str) -> f64 {
    let (_, text) = http(gw.metrics_addr().unwrap(), "GET /metrics HTTP/1.1").await;
    common::sample(&text, series)
}

/// Acceptance 3: six failed POP3 logins from 127.0.0.9 ban it; its next
/// SMTP, IMAP (implicit TLS: refused in plaintext, before any handshake)
/// and POP3 connections are refused before the greeting, on listeners that
/// have no policy of their own; the ban ends after `ban_for`.
#[tokio::test]
async fn failed_pop3_logins_ban_the_client_on_every_listener_until_ban_for() {
    let dir = tempfile::tempdir().unwrap();
    common::dev_cert(dir.path());
    let (pop3, smtp, imap) = (
        refusing_pop3().await,
        SmtpBackend::new().start().await,
        ImapBackend::new().start().await,
    );
    let gw = Yaml::new()
        .section("metrics: { bind: \"127.0.0.1:0\" }")
        .listener_to(
            "pop3-a3",
            "pop3",
            "none",
            "p",
            "require_tls: false, policy: mailbox-a3, max_login_failures: 10, login_failure_delay: 10ms",
        )
        .listener_to("mx-a3", "smtp", "none", "s", "require_tls: false")
        .listener_to("imaps-a3", "imap", "implicit", "i", "")
        .certs(dir.path())
        .backend("p", &pop3.addr, "")
        .backend("s", &smtp.addr, "")
        .backend("i", &imap.addr, "")
        .section("policies:\n  mailbox-a3:\n    limits:\n      - { name: guess, key: [ip], auth_failures: 6/15minutes, action: ban, ban_for: 2s }")
        .start()
        .await;
    let (p, mx, imaps) = (
        gw.addr("pop3-a3").unwrap(),
        gw.addr("mx-a3").unwrap(),
        gw.addr("imaps-a3").unwrap(),
    );
    let mut c = Pop3Client::connect_from("127.0.0.9", p).await;
    c.ok().await;
    fail_logins(&mut c, 5).await;
    assert!(smtp_greets("127.0.0.9", mx, b"").await, "five are not six");
    fail_logins(&mut c, 1).await;
    let banned_at = Instant::now();
    // the session itself: its next login never reaches the backend
    let passes = pop3
        .lines()
        .iter()
        .filter(|l| l.starts_with("PASS"))
        .count();
    c.send(b"USER alice\r\nPASS secret\r\n").await;
    c.ok().await;
    assert_eq!(c.status().await, "-ERR [AUTH] Authentication failed");
    assert_eq!(
        pop3.lines()
            .iter()
            .filter(|l| l.starts_with("PASS"))
            .count(),
        passes
    );
    // every listener, before the greeting (and before TLS)
    assert!(!smtp_greets("127.0.0.9", mx, b"").await);
    assert_eq!(first_words("127.0.0.9", imaps, b"").await, REFUSED_IMAP);
    assert_eq!(first_words("127.0.0.9", p, b"").await, REFUSED_POP3);
    assert!(smtp_greets("127.0.0.10", mx, b"").await, "only that client");
    let listed = bans(&gw).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["address"], "127.0.0.9");
    assert_eq!(listed[0]["policy"], "mailbox-a3");
    assert_eq!(listed[0]["rule"], "guess");
    assert!(listed[0]["expires_in"].as_u64().unwrap() <= 2);
    assert_eq!(
        metric(
            &gw,
            "mailgate_bans_total{policy=\"mailbox-a3\",rule=\"guess\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            &gw,
            "mailgate_refused_connections_total{listener=\"mx-a3\",outcome=\"banned\"}"
        )
        .await,
        1.0
    );
    assert!(
        banned_at.elapsed() < Duration::from_millis(1800),
        "the checks above must run inside ban_for: {:?}",
        banned_at.elapsed()
    );
    // ban_for: 2s, then the client is back
    tokio::time::sleep(Duration::from_millis(2100).saturating_sub(banned_at.elapsed())).await;
    assert!(smtp_greets("127.0.0.9", mx, b"").await, "the ban expired");
    let mut back = Pop3Client::connect_from("127.0.0.9", p).await;
    back.ok().await;
    assert!(bans(&gw).await.is_empty());
}

fn proxy_v1(client: &str, port: u16) -> Vec<u8> {
    format!("PROXY TCP4 {client} 198.51.100.1 {port} 25\r\n").into_bytes()
}

fn proxy_v2(client: &str) -> Vec<u8> {
    mailgate::transport::proxy_v2_header(
        format!("{client}:4242").parse().unwrap(),
        "198.51.100.1:25".parse().unwrap(),
    )
    .unwrap()
}

/// Acceptance 3, behind a balancer: the client the PROXY header announces
/// is banned, never the balancer; a balancer's own failures (a listener
/// that takes direct connections too) are counted, not banned.
#[tokio::test]
async fn behind_a_trusted_balancer_the_announced_client_is_banned() {
    let (pop3, smtp) = (refusing_pop3().await, SmtpBackend::new().start().await);
    let lb = "proxy_protocol: { trusted: [\"127.0.0.1/32\"], timeout: 2s }";
    let limits = "policies:\n  mailbox-lb:\n    limits:\n      - { name: guess, key: [ip], auth_failures: 6/15minutes, action: ban, ban_for: 1h }";
    let pop3_extra =
        "require_tls: false, policy: mailbox-lb, max_login_failures: 10, login_failure_delay: 10ms";
    let gw = Yaml::new()
        .section("metrics: { bind: \"127.0.0.1:0\" }")
        .listener_to(
            "pop3-lb",
            "pop3",
            "none",
            "p",
            &format!("{pop3_extra}, {lb}"),
        )
        .listener_to("pop3-direct", "pop3", "none", "p", pop3_extra)
        .listener_to(
            "mx-lb",
            "smtp",
            "none",
            "s",
            &format!("require_tls: false, {lb}"),
        )
        .listener_to("mx-direct", "smtp", "none", "s", "require_tls: false")
        .backend("p", &pop3.addr, "")
        .backend("s", &smtp.addr, "")
        .section(limits)
        .start()
        .await;
    let (mx_lb, mx_direct) = (gw.addr("mx-lb").unwrap(), gw.addr("mx-direct").unwrap());
    // the balancer 127.0.0.1 forwards 127.0.0.9, who guesses six times
    let mut c = Pop3Client::connect_from("127.0.0.1", gw.addr("pop3-lb").unwrap()).await;
    c.send(&proxy_v1("127.0.0.9", 5555)).await;
    c.ok().await;
    fail_logins(&mut c, 6).await;
    assert!(
        smtp_greets("127.0.0.1", mx_direct, b"").await,
        "the balancer's own address is not banned"
    );
    assert!(!smtp_greets("127.0.0.1", mx_lb, &proxy_v2("127.0.0.9")).await);
    assert!(!smtp_greets("127.0.0.1", mx_lb, &proxy_v1("127.0.0.9", 5556)).await);
    assert!(smtp_greets("127.0.0.1", mx_lb, &proxy_v2("127.0.0.10")).await);
    assert!(
        !smtp_greets("127.0.0.9", mx_direct, b"").await,
        "the ban is the client's, wherever it comes from"
    );
    // the balancer itself failing six times (directly): counted, not banned
    let mut c = Pop3Client::connect_from("127.0.0.1", gw.addr("pop3-direct").unwrap()).await;
    c.ok().await;
    fail_logins(&mut c, 6).await;
    assert!(smtp_greets("127.0.0.1", mx_direct, b"").await);
    assert!(smtp_greets("127.0.0.1", mx_lb, &proxy_v2("127.0.0.10")).await);
    let listed = bans(&gw).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["address"], "127.0.0.9");
    assert_eq!(
        metric(
            &gw,
            "mailgate_bans_skipped_total{policy=\"mailbox-lb\",rule=\"guess\",reason=\"trusted_proxy\"}"
        )
        .await,
        1.0
    );
}

/// A gateway for the lift tests: POP3 with the ban rule, SMTP, the metrics
/// endpoint on a port of its own, and the YAML written to `dir/gw.yaml`
/// for the CLI (`token`: the admin token file's content, if any).
async fn lift_gateway(dir: &Path, pop3: &Running, smtp: &Running, token: Option<&str>) -> Gateway {
    let port = common::free_port();
    let mut metrics = format!("metrics: {{ bind: \"127.0.0.1:{port}\"");
    if let Some(t) = token {
        let f = dir.join("admin.token");
        std::fs::write(&f, format!("{t}\n")).unwrap();
        metrics.push_str(&format!(", admin_token_file: \"{}\"", f.display()));
    }
    metrics.push_str(" }");
    let yaml = Yaml::new()
        .section(&metrics)
        .listener_to(
            "pop3-lift",
            "pop3",
            "none",
            "p",
            "require_tls: false, policy: mailbox-lift, max_login_failures: 10, login_failure_delay: 10ms",
        )
        .listener_to("mx-lift", "smtp", "none", "s", "require_tls: false")
        .backend("p", &pop3.addr, "")
        .backend("s", &smtp.addr, "")
        .section("policies:\n  mailbox-lift:\n    limits:\n      - { name: guess, key: [ip], auth_failures: 6/15minutes, action: ban, ban_for: 1h }")
        .build();
    std::fs::write(dir.join("gw.yaml"), &yaml).unwrap();
    common::start(&yaml).await
}

/// `mailgate bans ARGS --config dir/gw.yaml`: (exit ok, stdout, stderr).
async fn cli(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mailgate"));
    cmd.arg("bans")
        .args(args)
        .arg("--config")
        .arg(dir.join("gw.yaml"));
    tokio::task::spawn_blocking(move || common::run_limited(&mut cmd, Duration::from_secs(20)))
        .await
        .unwrap()
}

/// Acceptance 3, lifting: `/bans` lists the ban; `DELETE /bans/<address>`
/// needs the configured bearer token (none or a wrong one: 401; without
/// `admin_token_file`: 403); `mailgate bans list` / `lift` do the same
/// through the endpoint.
#[tokio::test]
async fn bans_are_listed_and_lifted_with_the_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let (pop3, smtp) = (refusing_pop3().await, SmtpBackend::new().start().await);
    let token = "s3cret-t0ken-for-lifting-bans";
    let gw = lift_gateway(dir.path(), &pop3, &smtp, Some(token)).await;
    let (p, mx, m) = (
        gw.addr("pop3-lift").unwrap(),
        gw.addr("mx-lift").unwrap(),
        gw.metrics_addr().unwrap(),
    );
    let mut c = Pop3Client::connect_from("127.0.0.9", p).await;
    c.ok().await;
    fail_logins(&mut c, 6).await;
    assert!(!smtp_greets("127.0.0.9", mx, b"").await);
    let listed = bans(&gw).await;
    assert_eq!(listed[0]["address"], "127.0.0.9");
    assert_eq!(listed[0]["reason"], "auth_failures 6 per 900s");
    let left = listed[0]["expires_in"].as_u64().unwrap();
    assert!((3590..=3600).contains(&left), "{left}");
    let at = listed[0]["expires_at"].as_u64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(at.abs_diff(now + 3600) <= 5, "{at} vs {now}");

    let del = "DELETE /bans/127.0.0.9 HTTP/1.1";
    let (code, body) = http(m, del).await;
    assert_eq!(code, 401, "{body}");
    let (code, _) = http(
        m,
        &format!("{del}\r\nAuthorization: Bearer not-the-token-at-all"),
    )
    .await;
    assert_eq!(code, 401);
    let (code, _) = http(m, &format!("{del}\r\nAuthorization: Basic {token}")).await;
    assert_eq!(code, 401, "only a bearer token");
    assert!(!smtp_greets("127.0.0.9", mx, b"").await, "still banned");
    let (code, _) = http(
        m,
        &format!("DELETE /bans/not-an-ip HTTP/1.1\r\nAuthorization: Bearer {token}"),
    )
    .await;
    assert_eq!(code, 400);
    let (code, body) = http(m, &format!("{del}\r\nauthorization: bearer {token}")).await;
    assert_eq!((code, body.as_str()), (200, "{\"lifted\":1}"));
    assert!(smtp_greets("127.0.0.9", mx, b"").await, "lifted");
    let (code, _) = http(m, &format!("{del}\r\nAuthorization: Bearer {token}")).await;
    assert_eq!(code, 404, "nothing left to lift");
    assert!(bans(&gw).await.is_empty());

    // the CLI: its failures are still in the window, so one more bans again
    fail_logins(&mut c, 1).await;
    assert!(!smtp_greets("127.0.0.9", mx, b"").await);
    let (ok, out, err) = cli(dir.path(), &["list"]).await;
    assert!(ok, "{err}");
    assert!(
        out.starts_with("127.0.0.9  policy=mailbox-lift rule=guess expires_in="),
        "{out}"
    );
    let (ok, out, err) = cli(dir.path(), &["lift", "127.0.0.9"]).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("lifted"), "{out}");
    assert!(smtp_greets("127.0.0.9", mx, b"").await, "lifted by the CLI");
    let (ok, _, err) = cli(dir.path(), &["lift", "127.0.0.9"]).await;
    assert!(!ok && err.contains("no ban covers 127.0.0.9"), "{err}");
    let (ok, out, _) = cli(dir.path(), &["list"]).await;
    assert!(ok && out == "no bans\n", "{out}");

    // a gateway without admin_token_file: lifting is off
    let dir2 = tempfile::tempdir().unwrap();
    let gw2 = lift_gateway(dir2.path(), &pop3, &smtp, None).await;
    let (code, body) = http(
        gw2.metrics_addr().unwrap(),
        &format!("{del}\r\nAuthorization: Bearer {token}"),
    )
    .await;
    assert_eq!(code, 403, "{body}");
    let (ok, _, err) = cli(dir2.path(), &["lift", "127.0.0.9"]).await;
    assert!(!ok && err.contains("lifting bans is disabled"), "{err}");
}

/// Recipient harvesting: a backend that refuses every RCPT with 550; the
/// third refusal bans the client: its next RCPT is refused by mailgate
/// (never relayed) and its next connection before the greeting.
#[tokio::test]
async fn refused_recipients_ban_the_harvester() {
    let smtp = SmtpBackend::new()
        .on("RCPT", "550 5.1.1 no such user\r\n")
        .start()
        .await;
    let gw = Yaml::new()
        .listener_to("mx-harvest", "smtp", "none", "s", "require_tls: false, policy: harvest")
        .backend("s", &smtp.addr, "")
        .section("policies:\n  harvest:\n    limits:\n      - { name: harvest, key: [ip], rcpt_refusals: 3/10minutes, action: ban, ban_for: 1h }")
        .start()
        .await;
    let mx = gw.addr("mx-harvest").unwrap();
    let mut c = SmtpClient::connect_from("127.0.0.11", mx).await;
    c.expect(220).await;
    assert!(c.cmd("EHLO harvester.test").await.starts_with("250"));
    assert!(c.cmd("MAIL FROM:<a@example.org>").await.starts_with("250"));
    for i in 0..3 {
        let r = c.cmd(&format!("RCPT TO:<guess{i}@example.net>")).await;
        assert_eq!(r, "550 5.1.1 no such user\n", "the backend's refusal");
    }
    let r = c.cmd("RCPT TO:<guess3@example.net>").await;
    assert_eq!(r, "550 5.7.1 Refused by local policy\n");
    let rcpts = smtp
        .lines()
        .iter()
        .filter(|l| l.starts_with("RCPT"))
        .count();
    assert_eq!(rcpts, 3, "the fourth was not relayed");
    assert!(!smtp_greets("127.0.0.11", mx, b"").await);
    assert!(smtp_greets("127.0.0.12", mx, b"").await);
}

/// Acceptance 4, bans: a `shadow: true` ban rule counts and logs the ban it
/// would make; nothing is refused and nothing is banned.
#[tokio::test]
async fn shadow_ban_rule_counts_but_refuses_nothing() {
    let (pop3, smtp) = (refusing_pop3().await, SmtpBackend::new().start().await);
    let gw = Yaml::new()
        .section("metrics: { bind: \"127.0.0.1:0\" }")
        .listener_to(
            "pop3-shadow",
            "pop3",
            "none",
            "p",
            "require_tls: false, policy: mailbox-shadow, max_login_failures: 10, login_failure_delay: 10ms",
        )
        .listener_to("mx-shadow", "smtp", "none", "s", "require_tls: false")
        .backend("p", &pop3.addr, "")
        .backend("s", &smtp.addr, "")
        .section("policies:\n  mailbox-shadow:\n    limits:\n      - { name: watch, key: [ip], auth_failures: 3/15minutes, action: ban, ban_for: 1h, shadow: true }")
        .start()
        .await;
    let mut c = Pop3Client::connect_from("127.0.0.13", gw.addr("pop3-shadow").unwrap()).await;
    c.ok().await;
    fail_logins(&mut c, 6).await;
    assert_eq!(
        pop3.lines()
            .iter()
            .filter(|l| l.starts_with("PASS"))
            .count(),
        6,
        "every login reached the backend"
    );
    assert!(smtp_greets("127.0.0.13", gw.addr("mx-shadow").unwrap(), b"").await);
    assert!(bans(&gw).await.is_empty());
    // the third, fourth, fifth and sixth failure each would have banned
    let skipped =
        "mailgate_bans_skipped_total{policy=\"mailbox-shadow\",rule=\"watch\",reason=\"shadow\"}";
    assert_eq!(metric(&gw, skipped).await, 4.0);
    let hits = "mailgate_policy_limit_hits_total{policy=\"mailbox-shadow\",rule=\"watch\",mode=\"shadow\"}";
    assert_eq!(metric(&gw, hits).await, 4.0);
    assert_eq!(
        metric(&gw, "mailgate_bans_total{policy=\"mailbox-shadow\"").await,
        0.0
    );
}
