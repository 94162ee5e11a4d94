//! Backend connection reuse (`backends.NAME.reuse`, issue 17): a client
//! session that ends cleanly leaves its SMTP backend connection for the next
//! one, reset; AUTH connections are never handed on; idle ones expire; one
//! that died while idle is replaced before the client hears anything; what
//! a connection (new or kept) offers corrects what the capability cache
//! promised. Gateway in-process, scripted backends on loopback.

mod common;

use common::{Gateway, SmtpBackend, SmtpClient, Yaml};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

const MESSAGE: &[u8] = b"Subject: reuse\r\n\r\nhello\r\n.\r\n";

/// A plaintext listener `mx` in front of backend `b` at `backend`, whose
/// flow mapping gets `extra` (e.g. `reuse: {}`).
fn config(backend: &str, extra: &str) -> String {
    Yaml::new()
        .listener(
            "mx",
            "smtp",
            "none",
            "timeouts: { backend_reply: 3s, backend_connect: 3s }",
        )
        .backend("b", backend, extra)
        .build()
}

/// One client session: a message, then QUIT; the reply to the message.
async fn one_message(gw: &Gateway) -> (u16, String) {
    let mut c = SmtpClient::greeted(gw.addr("mx").unwrap()).await;
    let r = c.send_message("client.example", MESSAGE).await;
    c.cmd("QUIT").await;
    c.closed(Duration::from_secs(3)).await;
    r
}

/// Waits until the backend has seen `n` lines starting with `verb`, after
/// the start-up capability probe's (one EHLO, one QUIT).
async fn wait_lines(b: &common::Running, verb: &str, n: usize) -> usize {
    let probe = usize::from(verb == "QUIT" || verb == "EHLO");
    let count = || b.lines().iter().filter(|l| l.starts_with(verb)).count();
    for _ in 0..100 {
        if count() >= n + probe {
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    count().saturating_sub(probe)
}

/// Three sessions in a row take one backend connection between them (the
/// capability probe at start has its own); without `reuse:` each has its own.
#[tokio::test]
async fn later_sessions_take_the_idle_backend_connection() {
    for (extra, want) in [("reuse: {}", 1), ("", 3)] {
        let b = SmtpBackend::new().start().await;
        let gw = common::start(&config(&b.addr, extra)).await;
        let before = b.connections();
        assert_eq!(wait_lines(&b, "QUIT", 0).await, 0, "the probe's");
        for _ in 0..3 {
            let (code, text) = one_message(&gw).await;
            assert_eq!(code, 250, "{text}");
        }
        assert_eq!(b.accepted(), 3);
        assert_eq!(b.connections() - before, want, "{extra:?}: {:?}", b.lines());
        let ehlo_after_probe = b.lines().iter().filter(|l| l.starts_with("EHLO")).count() - 1;
        assert_eq!(
            ehlo_after_probe, want,
            "one greeting and EHLO per connection"
        );
        gw.shutdown().await;
    }
}

/// A session that ends inside a transaction (MAIL and RCPT, no DATA) leaves
/// it reset: the next session's MAIL comes after an RSET on that connection.
#[tokio::test]
async fn an_open_transaction_is_reset_before_the_connection_serves_again() {
    let b = SmtpBackend::new().start().await;
    let gw = common::start(&config(&b.addr, "reuse: {}")).await;
    let before = b.connections();
    let mut c = SmtpClient::greeted(gw.addr("mx").unwrap()).await;
    assert!(c.cmd("EHLO client.example").await.starts_with("250"));
    assert!(c.cmd("MAIL FROM:<a@example.org>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<b@example.net>").await.starts_with("250"));
    c.cmd("QUIT").await;
    c.closed(Duration::from_secs(3)).await;
    assert_eq!(wait_lines(&b, "RSET", 1).await, 1, "{:?}", b.lines());
    let (code, text) = one_message(&gw).await;
    assert_eq!(code, 250, "{text}");
    assert_eq!(b.connections() - before, 1);
    let lines = b.lines();
    let rset = lines.iter().position(|l| l == "RSET").unwrap();
    let second_mail = lines.iter().rposition(|l| l.starts_with("MAIL")).unwrap();
    assert!(rset < second_mail, "{lines:?}");
    assert_eq!(
        wait_lines(&b, "QUIT", 0).await,
        0,
        "kept, not closed: {lines:?}"
    );
}

/// `idle_timeout`: an idle connection is closed with QUIT, and the next
/// session connects anew; `max_sessions`: a connection serves that many
/// client sessions, then is closed.
#[tokio::test]
async fn idle_connections_expire_and_serve_at_most_max_sessions() {
    let b = SmtpBackend::new().start().await;
    let gw = common::start(&config(
        &b.addr,
        "reuse: { idle_timeout: 1s, max_sessions: 2 }",
    ))
    .await;
    let before = b.connections();
    assert_eq!(one_message(&gw).await.0, 250);
    assert_eq!(wait_lines(&b, "QUIT", 0).await, 0, "still idle");
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(
        wait_lines(&b, "QUIT", 1).await,
        1,
        "expired: {:?}",
        b.lines()
    );
    // three more sessions: two on one connection, the third on a new one
    for _ in 0..3 {
        assert_eq!(one_message(&gw).await.0, 250);
    }
    assert_eq!(b.connections() - before, 3, "{:?}", b.lines());
    assert_eq!(
        wait_lines(&b, "QUIT", 2).await,
        2,
        "the second closed after 2 sessions"
    );
    gw.shutdown().await;
    assert_eq!(
        wait_lines(&b, "QUIT", 3).await,
        3,
        "shutdown says goodbye to the idle one"
    );
}

/// An implicit-TLS listener `mx` with `auth: optional` in front of backend
/// `b` at `addr` (its flow mapping gets `extra`); the certificate in `dir`.
async fn auth_gateway(dir: &std::path::Path, addr: &str, extra: &str) -> Gateway {
    Yaml::new()
        .listener(
            "mx",
            "smtp",
            "implicit",
            "auth: optional, timeouts: { backend_reply: 3s, backend_connect: 3s }",
        )
        .certs(dir)
        .backend("b", addr, extra)
        .start()
        .await
}

/// A client session on [`auth_gateway`]: TLS, greeting, and an EHLO that
/// offered AUTH PLAIN.
async fn auth_session(gw: &Gateway, ca: &std::path::Path) -> SmtpClient<common::Tls> {
    let mut c = SmtpClient::connect(gw.addr("mx").unwrap())
        .await
        .tls(ca)
        .await;
    assert!(c.text().await.starts_with("220"));
    let ehlo = c.cmd("EHLO client.example").await;
    assert!(ehlo.contains("AUTH PLAIN"), "{ehlo}");
    c
}

/// A connection that relayed an AUTH belongs to that user: it is closed at
/// the end of the session, and the next client gets a connection of its own.
#[tokio::test]
async fn a_connection_that_relayed_auth_is_not_handed_on() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = common::dev_cert(dir.path());
    let b = SmtpBackend::new()
        .on("EHLO", "250-legacy\r\n250 AUTH PLAIN\r\n")
        .on("AUTH", "235 2.7.0 ok\r\n")
        .start()
        .await;
    let gw = auth_gateway(dir.path(), &b.addr, "reuse: {}").await;
    let before = b.connections();
    for user in ["AGFsaWNlAHNlY3JldA==", "AGJvYgBzZWNyZXQ="] {
        let mut c = auth_session(&gw, &ca).await;
        let auth = c.cmd(&format!("AUTH PLAIN {user}")).await;
        assert!(auth.starts_with("235"), "{auth}");
        let (code, text) = c.send_message("client.example", MESSAGE).await;
        assert_eq!(code, 250, "{text}");
        c.cmd("QUIT").await;
        c.closed(Duration::from_secs(3)).await;
    }
    assert_eq!(b.connections() - before, 2, "{:?}", b.lines());
    assert_eq!(wait_lines(&b, "QUIT", 2).await, 2, "{:?}", b.lines());
}

/// A connection the backend dropped while it sat idle, unseen (its close
/// comes only when the next MAIL arrives): the MAIL goes again on a new
/// connection and the client hears that 250, never the failure.
#[tokio::test]
async fn a_connection_that_died_while_idle_is_replaced_before_the_client_hears() {
    fn rule(n: usize, verb: &str, seen: usize) -> Option<&'static str> {
        match verb {
            "EHLO" => Some("250-legacy\r\n250 8BITMIME\r\n"),
            // connection 1 (after the probe, connection 0) dies before its
            // second MAIL is answered
            "MAIL" if n == 1 && seen == 2 => None,
            "DATA" => Some("354 go\r\n"),
            "QUIT" => Some("221 bye\r\n"),
            _ => Some("250 ok\r\n"),
        }
    }
    let (addr, conns) = scripted(rule, Duration::ZERO).await;
    let gw = common::start(&config(&addr, "reuse: {}")).await;
    assert_eq!(one_message(&gw).await.0, 250);
    let (code, text) = one_message(&gw).await;
    assert_eq!(code, 250, "{text}");
    // probe, the first session's (reused, then dead), the replacement
    assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 3);
}

/// Config contract: `reuse` with an identity that belongs to one client,
/// on a POP3 backend, or out of range is refused, naming file, line and field.
#[test]
fn reuse_config_is_checked() {
    let smtp = |extra: &str| config("127.0.0.1:25", extra);
    for (yaml, field) in [
        (smtp("identity: [proxy_v2], reuse: {}"), "backends.b.reuse"),
        (
            smtp("reuse: { idle_timeout: 10m }"),
            "backends.b.reuse.idle_timeout",
        ),
        (
            smtp("reuse: { idle_timeout: 500ms }"),
            "backends.b.reuse.idle_timeout",
        ),
        (
            smtp("reuse: { max_sessions: 0 }"),
            "backends.b.reuse.max_sessions",
        ),
        (
            smtp("reuse: { max_idle: 100000 }"),
            "backends.b.reuse.max_idle",
        ),
        (
            Yaml::new()
                .listener("pop", "pop3", "none", "")
                .backend("b", "127.0.0.1:110", "reuse: {}")
                .build(),
            "smtp listeners only",
        ),
    ] {
        let e = mailgate::config::load_str("gw.yaml", &yaml)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("gw.yaml:") && e.contains(field),
            "{e}\n{yaml}"
        );
    }
    let ok = mailgate::config::load_str("gw.yaml", &smtp("reuse: { max_idle: 0 }")).unwrap();
    assert_eq!(ok.listeners[0].backend.reuse.max_idle, 0);
    // XCLIENT is told again per session (below)
    let ok = mailgate::config::load_str("gw.yaml", &smtp("identity: [xclient], reuse: {}"));
    assert!(ok.unwrap().listeners[0].backend.xclient);
}

const XCLIENT_EHLO: &str =
    "250-legacy\r\n250-XCLIENT NAME ADDR PORT PROTO HELO\r\n250 8BITMIME\r\n";

/// The positions of the backend's lines that start with `prefix`.
fn at(lines: &[String], prefix: &str) -> Vec<usize> {
    (0..lines.len())
        .filter(|&i| lines[i].starts_with(prefix))
        .collect()
}

/// With `identity: [xclient]` a kept connection is told each session's
/// client before that session's first command: XCLIENT again (address,
/// port, HELO of the new client), the new greeting's EHLO, then MAIL. The
/// second client never speaks as the first.
#[tokio::test]
async fn xclient_is_told_again_before_each_session_on_a_kept_connection() {
    let b = SmtpBackend::new()
        .on("EHLO", XCLIENT_EHLO)
        .on("XCLIENT", "220 legacy ESMTP again\r\n")
        .start()
        .await;
    // a backend name of its own: `reused` reads the process's counter
    let gw = Yaml::new()
        .listener_to(
            "mx",
            "smtp",
            "none",
            "told",
            "timeouts: { backend_reply: 3s }",
        )
        .backend("told", &b.addr, "identity: [xclient], reuse: {}")
        .start()
        .await;
    let before = b.connections();
    let mut ports = Vec::new();
    for (src, helo) in [
        ("127.0.0.2", "alpha.example"),
        ("127.0.0.3", "beta.example"),
    ] {
        let mut c = SmtpClient::connect_from(src, gw.addr("mx").unwrap()).await;
        c.expect(220).await;
        ports.push(c.local_port());
        let (code, text) = c.send_message(helo, MESSAGE).await;
        assert_eq!(code, 250, "{text}");
        c.cmd("QUIT").await;
        c.closed(Duration::from_secs(3)).await;
    }
    assert_eq!(b.connections() - before, 1, "{:?}", b.lines());
    let lines = b.lines();
    let (xclient, mail) = (at(&lines, "XCLIENT"), at(&lines, "MAIL"));
    assert_eq!((xclient.len(), mail.len()), (2, 2), "{lines:?}");
    assert_eq!(
        lines[xclient[0]],
        format!(
            "XCLIENT NAME=[UNAVAILABLE] ADDR=127.0.0.2 PORT={} PROTO=ESMTP HELO=alpha.example",
            ports[0]
        )
    );
    assert_eq!(
        lines[xclient[1]],
        format!(
            "XCLIENT NAME=[UNAVAILABLE] ADDR=127.0.0.3 PORT={} PROTO=ESMTP HELO=beta.example",
            ports[1]
        )
    );
    // each XCLIENT's greeting is followed by the client's EHLO, then its MAIL
    assert_eq!(lines[xclient[0] + 1], "EHLO alpha.example", "{lines:?}");
    assert_eq!(lines[xclient[1] + 1], "EHLO beta.example", "{lines:?}");
    assert!(
        xclient[0] < mail[0] && mail[0] < xclient[1] && xclient[1] < mail[1],
        "{lines:?}"
    );
    assert_eq!(reused("told"), 1);
    gw.shutdown().await;
}

/// The first kept connection's second XCLIENT is refused: the connection,
/// which still speaks as the first client, is not used (not even with
/// `identity_optional`, which lets mailgate speak as itself, never as
/// another client); the session's MAIL goes to a new connection told its
/// own identity, and the client hears only the answer.
#[tokio::test]
async fn a_kept_connection_that_cannot_be_told_the_next_client_is_not_used() {
    static LATE_MAIL: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    fn rule(n: usize, verb: &str, seen: usize) -> Option<&'static str> {
        Some(match verb {
            "EHLO" => "250-legacy\r\n250 XCLIENT NAME ADDR PORT PROTO HELO\r\n",
            "XCLI" if n == 1 && seen == 2 => "550 5.7.0 Error: insufficient authorization\r\n",
            "XCLI" => "220 legacy ESMTP again\r\n",
            "MAIL" if n == 1 && seen == 2 => {
                LATE_MAIL.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                "250 ok\r\n"
            }
            "DATA" => "354 go\r\n",
            "QUIT" => "221 bye\r\n",
            _ => "250 ok\r\n",
        })
    }
    for optional in ["", ", identity_optional: true"] {
        LATE_MAIL.store(0, std::sync::atomic::Ordering::SeqCst);
        let (addr, conns) = scripted(rule, Duration::ZERO).await;
        let gw = common::start(&config(
            &addr,
            &format!("identity: [xclient], reuse: {{}}{optional}"),
        ))
        .await;
        for _ in 0..2 {
            let (code, text) = one_message(&gw).await;
            assert_eq!(code, 250, "{optional:?}: {text}");
        }
        // the probe, the first session's (kept, then refused), the new one
        assert_eq!(
            conns.load(std::sync::atomic::Ordering::SeqCst),
            3,
            "{optional:?}"
        );
        assert_eq!(
            LATE_MAIL.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "{optional:?}"
        );
        gw.shutdown().await;
    }
}

/// Postfix checks `smtpd_authorized_xclient_hosts` again against the
/// address XCLIENT told it (smtpd.c `xclient_cmd`: `xclient_allowed =
/// namadr_list_match(xclient_hosts, state->name, state->addr)`): where
/// only mailgate is authorized, the EHLO after XCLIENT no longer offers
/// XCLIENT, and the connection can never be told the next client. It is
/// closed with QUIT as its session ends (as without `reuse`), not kept to
/// be dropped by the next session.
#[tokio::test]
async fn a_connection_that_can_no_longer_be_told_a_client_is_not_kept() {
    static QUITS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    fn rule(n: usize, verb: &str, seen: usize) -> Option<&'static str> {
        Some(match verb {
            // the client's address is not an authorized XCLIENT host
            "EHLO" if seen == 1 => "250-legacy\r\n250 XCLIENT NAME ADDR PORT PROTO HELO\r\n",
            "EHLO" => "250-legacy\r\n250 8BITMIME\r\n",
            "XCLI" => "220 legacy ESMTP again\r\n",
            "DATA" => "354 go\r\n",
            "QUIT" => {
                if n == 1 {
                    QUITS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                "221 bye\r\n"
            }
            _ => "250 ok\r\n",
        })
    }
    let (addr, conns) = scripted(rule, Duration::ZERO).await;
    let gw = common::start(&config(
        &addr,
        "identity: [xclient], reuse: { idle_timeout: 5m }",
    ))
    .await;
    let (code, text) = one_message(&gw).await;
    assert_eq!(code, 250, "{text}");
    for _ in 0..100 {
        if QUITS.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(
        QUITS.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "closed as its session ended, not kept"
    );
    let (code, text) = one_message(&gw).await;
    assert_eq!(code, 250, "{text}");
    assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 3);
    gw.shutdown().await;
}

/// A kept connection whose XCLIENT gets no answer in time: nothing of the
/// client went over it yet, so its MAIL moves to a new connection (as for
/// a kept connection found closed) instead of the client hearing a 451 it
/// would not have had without `reuse`.
#[tokio::test]
async fn a_kept_connection_whose_xclient_times_out_is_replaced() {
    fn rule(n: usize, verb: &str, seen: usize) -> Option<&'static str> {
        Some(match verb {
            "EHLO" => "250-legacy\r\n250 XCLIENT NAME ADDR PORT PROTO HELO\r\n",
            // no answer
            "XCLI" if n == 1 && seen == 2 => "",
            "XCLI" => "220 legacy ESMTP again\r\n",
            "DATA" => "354 go\r\n",
            "QUIT" => "221 bye\r\n",
            _ => "250 ok\r\n",
        })
    }
    let (addr, conns) = scripted(rule, Duration::ZERO).await;
    let gw = Yaml::new()
        .listener(
            "mx",
            "smtp",
            "none",
            "timeouts: { backend_reply: 1s, backend_connect: 3s }",
        )
        .backend("b", &addr, "identity: [xclient], reuse: {}")
        .start()
        .await;
    for _ in 0..2 {
        let (code, text) = one_message(&gw).await;
        assert_eq!(code, 250, "{text}");
    }
    // the probe, the first session's (kept, then silent), the new one
    assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 3);
    gw.shutdown().await;
}

/// A backend that refuses XCLIENT, with `identity_optional: true`: the
/// session relays as mailgate's own address, but the refusal counts
/// against that connection as any refused command does (Postfix counts
/// errors per connection), so it is not handed on; each session has its
/// own, as without `reuse`.
#[tokio::test]
async fn a_connection_whose_xclient_was_refused_is_not_handed_on() {
    fn rule(_: usize, verb: &str, _: usize) -> Option<&'static str> {
        Some(match verb {
            "EHLO" => "250-legacy\r\n250 XCLIENT NAME ADDR PORT PROTO HELO\r\n",
            "XCLI" => "550 5.7.0 Error: insufficient authorization\r\n",
            "DATA" => "354 go\r\n",
            "QUIT" => "221 bye\r\n",
            _ => "250 ok\r\n",
        })
    }
    let (addr, conns) = scripted(rule, Duration::ZERO).await;
    let gw = common::start(&config(
        &addr,
        "identity: [xclient], identity_optional: true, reuse: {}",
    ))
    .await;
    for _ in 0..2 {
        let (code, text) = one_message(&gw).await;
        assert_eq!(code, 250, "{text}");
    }
    // the probe, then one per session
    assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 3);
    gw.shutdown().await;
}

/// A session that opened a transaction before STARTTLS goes on, after it,
/// on the same connection (`reuse:`), told the identity again: XCLIENT
/// with the HELO the client gave after TLS.
#[tokio::test]
async fn starttls_tells_the_kept_connection_the_new_helo() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = common::dev_cert(dir.path());
    let b = SmtpBackend::new()
        .on("EHLO", XCLIENT_EHLO)
        .on("XCLIENT", "220 legacy ESMTP again\r\n")
        .start()
        .await;
    let gw = Yaml::new()
        .listener("mx", "smtp", "starttls", "timeouts: { backend_reply: 3s }")
        .certs(dir.path())
        .backend("b", &b.addr, "identity: [xclient], reuse: {}")
        .start()
        .await;
    let before = b.connections();
    mail_then_starttls(&gw, &ca, "before.example", "after.example").await;
    assert_eq!(b.connections() - before, 1, "{:?}", b.lines());
    let lines = b.lines();
    let xclient = at(&lines, "XCLIENT");
    assert_eq!(xclient.len(), 2, "{lines:?}");
    assert!(
        lines[xclient[0]].ends_with(" HELO=before.example"),
        "{lines:?}"
    );
    assert!(
        lines[xclient[1]].ends_with(" HELO=after.example"),
        "{lines:?}"
    );
    let mail = at(&lines, "MAIL");
    assert!(
        at(&lines, "RSET")[0] < xclient[1] && xclient[1] < mail[1],
        "{lines:?}"
    );
    gw.shutdown().await;
}

/// A backend whose every connection `n` (0: the start-up probe) answers
/// each command as `rule(n, verb, how many of that verb it saw)` says:
/// `None` closes the connection instead. The message after DATA's 354 is
/// read, and answered `250` after `data_wait`. Returns the address and the
/// count of connections.
async fn scripted(
    rule: fn(usize, &str, usize) -> Option<&'static str>,
    data_wait: Duration,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let conns = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = conns.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut r = BufReader::new(r);
                w.write_all(b"220 legacy ESMTP\r\n").await.unwrap();
                let mut counts = std::collections::HashMap::new();
                let mut line = String::new();
                loop {
                    line.clear();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                    let k = counts.entry(verb.clone()).or_insert(0usize);
                    *k += 1;
                    let Some(reply) = rule(n, &verb, *k) else {
                        return;
                    };
                    let _ = w.write_all(reply.as_bytes()).await;
                    if verb == "DATA" && reply.starts_with("354") {
                        let mut body = String::new();
                        while body != ".\r\n" {
                            body.clear();
                            if r.read_line(&mut body).await.unwrap_or(0) == 0 {
                                return;
                            }
                        }
                        tokio::time::sleep(data_wait).await;
                        let _ = w.write_all(b"250 2.0.0 queued\r\n").await;
                    }
                    if verb == "QUIT" {
                        return;
                    }
                }
            });
        }
    });
    (addr, conns)
}

/// A session that logged in over the backend (AUTH) must never go on over
/// another, unauthenticated connection (`smtp/session.rs` `answer`: we keep
/// no passwords): when the authenticated connection breaks at MAIL, the
/// client hears a temporary failure and the session closes, and no MAIL
/// reaches the backend on a new connection. With and without `reuse:`.
#[tokio::test]
async fn mail_after_auth_never_moves_to_an_unauthenticated_connection() {
    fn rule(n: usize, verb: &str, _: usize) -> Option<&'static str> {
        match verb {
            "EHLO" => Some("250-legacy\r\n250 AUTH PLAIN\r\n"),
            "AUTH" => Some("235 2.7.0 ok\r\n"),
            // the session's connection (after the probe's) breaks at MAIL;
            // any other would take it unauthenticated
            "MAIL" if n == 1 => None,
            "QUIT" => Some("221 bye\r\n"),
            _ => Some("250 ok\r\n"),
        }
    }
    for extra in ["", "reuse: {}"] {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = common::dev_cert(dir.path());
        let (addr, conns) = scripted(rule, Duration::ZERO).await;
        let gw = auth_gateway(dir.path(), &addr, extra).await;
        let mut c = auth_session(&gw, &ca).await;
        let auth = c.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA==").await;
        assert!(auth.starts_with("235"), "{auth}");
        let mail = c.cmd("MAIL FROM:<alice@example.org>").await;
        assert!(mail.starts_with("451"), "{extra:?}: MAIL: {mail}");
        let rest = c.rest(Duration::from_secs(3)).await;
        assert!(rest.starts_with("421"), "{extra:?}: closed: {rest}");
        assert_eq!(
            conns.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "{extra:?}: the probe's and the session's, no unauthenticated one"
        );
        gw.shutdown().await;
    }
}

/// A kept connection serves a session of another listener with that
/// listener's backend deadlines (`timeouts.backend_data` …), not those of
/// the listener whose session opened it: here the first listener's 1s would
/// give up on the backend's verdict (2s) that the second one waits for, and
/// the client would hear 451 for a message the backend then accepts.
#[tokio::test]
async fn a_kept_connection_takes_the_deadlines_of_the_session_that_uses_it() {
    fn rule(_: usize, verb: &str, _: usize) -> Option<&'static str> {
        match verb {
            "EHLO" => Some("250 legacy\r\n"),
            "DATA" => Some("354 go\r\n"),
            "QUIT" => Some("221 bye\r\n"),
            _ => Some("250 ok\r\n"),
        }
    }
    let (addr, conns) = scripted(rule, Duration::from_secs(2)).await;
    let gw = Yaml::new()
        .listener(
            "short",
            "smtp",
            "none",
            "timeouts: { backend_reply: 3s, backend_connect: 3s, backend_data: 1s }",
        )
        .listener(
            "long",
            "smtp",
            "none",
            "timeouts: { backend_reply: 3s, backend_connect: 3s, backend_data: 10s }",
        )
        .backend("b", &addr, "reuse: {}")
        .start()
        .await;
    // a transaction left open on `short`: its connection is reset and kept
    let mut c = SmtpClient::greeted(gw.addr("short").unwrap()).await;
    assert!(c.cmd("EHLO client.example").await.starts_with("250"));
    assert!(c.cmd("MAIL FROM:<a@example.org>").await.starts_with("250"));
    c.cmd("QUIT").await;
    c.closed(Duration::from_secs(3)).await;
    let mut c = SmtpClient::greeted(gw.addr("long").unwrap()).await;
    let (code, text) = c.send_message("client.example", MESSAGE).await;
    assert_eq!(code, 250, "{text}");
    assert_eq!(
        conns.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "the probe's and the kept one"
    );
    gw.shutdown().await;
}

/// A connection out of step at MAIL (a stray reply waiting) hands the MAIL
/// to a new connection, and is still counted in
/// `backend_out_of_step_total`, once per connection, as the other
/// protocols' replays count it.
#[tokio::test]
async fn an_out_of_step_connection_is_counted_when_mail_moves_on() {
    fn rule(n: usize, verb: &str, _: usize) -> Option<&'static str> {
        match verb {
            // the session's first connection (after the probe's) says
            // more than asked
            "EHLO" if n == 1 => Some("250 legacy\r\n250 stray\r\n"),
            "EHLO" => Some("250 legacy\r\n"),
            "DATA" => Some("354 go\r\n"),
            "QUIT" => Some("221 bye\r\n"),
            _ => Some("250 ok\r\n"),
        }
    }
    let (addr, conns) = scripted(rule, Duration::ZERO).await;
    // a backend name of its own: the counter is the process's
    let gw = Yaml::new()
        .listener_to(
            "mx",
            "smtp",
            "none",
            "oos",
            "timeouts: { backend_reply: 3s, backend_connect: 3s }",
        )
        .backend("oos", &addr, "")
        .start()
        .await;
    let counted = || {
        mailgate::observe::metrics()
            .backend_out_of_step
            .get_or_create(&mailgate::observe::metrics::BackendLabels {
                backend: "oos".into(),
            })
            .get()
    };
    let (code, text) = one_message(&gw).await;
    assert_eq!(code, 250, "{text}");
    assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert_eq!(counted(), 1, "the out-of-step connection");
    gw.shutdown().await;
}

/// A transaction the client ended with RSET is still open on the backend
/// (mailgate answers RSET itself): an AUTH after it is sent only after the
/// backend's transaction is reset too (RFC 4954 §4: no AUTH during a mail
/// transaction, which Postfix answers 503, taken for a refused login).
#[tokio::test]
async fn auth_after_the_clients_rset_resets_the_backend_transaction_first() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = common::dev_cert(dir.path());
    let b = SmtpBackend::new()
        .on("EHLO", "250-legacy\r\n250 AUTH PLAIN\r\n")
        .on("AUTH", "235 2.7.0 ok\r\n")
        .start()
        .await;
    let gw = auth_gateway(dir.path(), &b.addr, "").await;
    let mut c = auth_session(&gw, &ca).await;
    assert!(c.cmd("MAIL FROM:<a@example.org>").await.starts_with("250"));
    assert!(c.cmd("RSET").await.starts_with("250"));
    let auth = c.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA==").await;
    assert!(auth.starts_with("235"), "{auth}");
    let lines = b.lines();
    let auth_at = lines.iter().position(|l| l.starts_with("AUTH")).unwrap();
    let mail_at = lines.iter().position(|l| l.starts_with("MAIL")).unwrap();
    assert!(
        lines[mail_at..auth_at].iter().any(|l| l == "RSET"),
        "{lines:?}"
    );
    gw.shutdown().await;
}

/// A connection on which the backend refused a command carries that
/// client's errors: servers count them per connection (Postfix's
/// `smtpd_soft_error_limit` slows every later reply, its hard limit
/// closes), so it is not handed on; a clean session's connection is.
#[tokio::test]
async fn a_connection_with_refused_commands_is_not_handed_on() {
    let b = SmtpBackend::new()
        .on_line("RCPT TO:<nobody@example.net>", "550 5.1.1 no such user\r\n")
        .start()
        .await;
    let gw = common::start(&config(&b.addr, "reuse: {}")).await;
    let before = b.connections();
    let mut c = SmtpClient::greeted(gw.addr("mx").unwrap()).await;
    assert!(c.cmd("EHLO client.example").await.starts_with("250"));
    assert!(c.cmd("MAIL FROM:<a@example.org>").await.starts_with("250"));
    assert!(c
        .cmd("RCPT TO:<nobody@example.net>")
        .await
        .starts_with("550"));
    c.cmd("QUIT").await;
    c.closed(Duration::from_secs(3)).await;
    // the refusing one is closed; the next two sessions share a new one
    for _ in 0..2 {
        let (code, text) = one_message(&gw).await;
        assert_eq!(code, 250, "{text}");
    }
    assert_eq!(b.connections() - before, 2, "{:?}", b.lines());
    assert_eq!(wait_lines(&b, "QUIT", 1).await, 1, "{:?}", b.lines());
    gw.shutdown().await;
}

/// `backend_reused_total{backend}` of backend `name` (the counter is the
/// process's: each test that reads it has a backend name of its own).
fn reused(name: &str) -> u64 {
    mailgate::observe::metrics()
        .backend_reused
        .get_or_create(&mailgate::observe::metrics::BackendLabels {
            backend: name.into(),
        })
        .get()
}

/// `backend_reused_total` counts connections that served a later session,
/// not those taken and found dead (their command went to a new one).
#[tokio::test]
async fn only_connections_that_serve_again_are_counted_as_reused() {
    fn rule(n: usize, verb: &str, seen: usize) -> Option<&'static str> {
        match verb {
            "EHLO" => Some("250 legacy\r\n"),
            // connection 1 serves two sessions, then dies at its third MAIL
            "MAIL" if n == 1 && seen == 3 => None,
            "DATA" => Some("354 go\r\n"),
            "QUIT" => Some("221 bye\r\n"),
            _ => Some("250 ok\r\n"),
        }
    }
    let (addr, conns) = scripted(rule, Duration::ZERO).await;
    let gw = Yaml::new()
        .listener_to(
            "mx",
            "smtp",
            "none",
            "counted",
            "timeouts: { backend_reply: 3s, backend_connect: 3s }",
        )
        .backend("counted", &addr, "reuse: {}")
        .start()
        .await;
    for _ in 0..3 {
        let (code, text) = one_message(&gw).await;
        assert_eq!(code, 250, "{text}");
    }
    // probe, connection 1 (three sessions, the third's MAIL moved), its replacement
    assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert_eq!(
        reused("counted"),
        1,
        "the second session's; not the third's"
    );
    gw.shutdown().await;
}

/// `backend_reused_total` counts client sessions: one that loses its
/// taken connection (the backend closes it at RCPT) and takes another kept
/// one for its next MAIL is counted once.
#[tokio::test]
async fn a_session_that_takes_two_kept_connections_is_counted_once() {
    fn rule(_: usize, verb: &str, seen: usize) -> Option<&'static str> {
        match verb {
            "EHLO" => Some("250 legacy\r\n"),
            // each kept connection breaks at its second RCPT
            "RCPT" if seen == 2 => None,
            "DATA" => Some("354 go\r\n"),
            "QUIT" => Some("221 bye\r\n"),
            _ => Some("250 ok\r\n"),
        }
    }
    let (addr, conns) = scripted(rule, Duration::ZERO).await;
    let gw = Yaml::new()
        .listener_to(
            "mx",
            "smtp",
            "none",
            "twice",
            "timeouts: { backend_reply: 3s }",
        )
        .backend("twice", &addr, "reuse: {}")
        .start()
        .await;
    // two sessions at once leave two connections in the pool
    let mx = gw.addr("mx").unwrap();
    let (mut a, mut b) = (SmtpClient::greeted(mx).await, SmtpClient::greeted(mx).await);
    for c in [&mut a, &mut b] {
        let (code, text) = c.send_message("client.example", MESSAGE).await;
        assert_eq!(code, 250, "{text}");
    }
    for mut c in [a, b] {
        c.cmd("QUIT").await;
        c.closed(Duration::from_secs(3)).await;
    }
    assert_eq!(
        conns.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "probe + 2"
    );
    let mut c = SmtpClient::greeted(mx).await;
    assert!(c.cmd("EHLO client.example").await.starts_with("250"));
    for _ in 0..2 {
        assert!(c.cmd("MAIL FROM:<a@example.org>").await.starts_with("250"));
        let rcpt = c.cmd("RCPT TO:<b@example.net>").await;
        assert!(rcpt.starts_with("4"), "the kept connection broke: {rcpt}");
        assert!(c.cmd("RSET").await.starts_with("250"));
    }
    // both kept connections served this session's MAIL: no new one
    assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert_eq!(reused("twice"), 1, "one session");
    gw.shutdown().await;
}

/// A client that opened a transaction before STARTTLS (then RSET) goes on, after it,
/// on the same backend connection, reset (RFC 3207: the session starts
/// afresh) and counted once toward `max_sessions`: with `max_sessions: 2`
/// a second client session still takes it.
#[tokio::test]
async fn starttls_keeps_the_sessions_own_connection_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = common::dev_cert(dir.path());
    let b = SmtpBackend::new().start().await;
    let gw = Yaml::new()
        .listener_to(
            "mx",
            "smtp",
            "starttls",
            "restarted",
            "timeouts: { backend_reply: 3s, backend_connect: 3s }",
        )
        .certs(dir.path())
        .backend("restarted", &b.addr, "reuse: { max_sessions: 2 }")
        .start()
        .await;
    let before = b.connections();
    mail_then_starttls(&gw, &ca, "client.example", "client.example").await;
    let (code, text) = one_message_tls(&gw, &ca).await;
    assert_eq!(code, 250, "{text}");
    assert_eq!(b.connections() - before, 1, "{:?}", b.lines());
    assert_eq!(b.accepted(), 2);
    let lines = b.lines();
    let rset = lines
        .iter()
        .position(|l| l == "RSET")
        .expect("the pre-TLS MAIL reset");
    let mails: Vec<_> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("MAIL"))
        .map(|(i, _)| i)
        .collect();
    assert!(mails[0] < rset && rset < mails[1], "{lines:?}");
    assert_eq!(reused("restarted"), 1, "the second client session");
    // two sessions served: closed after the second
    assert_eq!(wait_lines(&b, "QUIT", 1).await, 1, "{lines:?}");
    gw.shutdown().await;
}

/// The same on a connection's last allowed session (`max_sessions: 1`):
/// the session still finishes on it after STARTTLS (it was counted when it
/// took it), and the connection is closed when the session ends.
#[tokio::test]
async fn starttls_on_the_last_allowed_session_keeps_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = common::dev_cert(dir.path());
    let b = SmtpBackend::new().start().await;
    let gw = Yaml::new()
        .listener("mx", "smtp", "starttls", "timeouts: { backend_reply: 3s }")
        .certs(dir.path())
        .backend("b", &b.addr, "reuse: { max_sessions: 1 }")
        .start()
        .await;
    let before = b.connections();
    mail_then_starttls(&gw, &ca, "client.example", "client.example").await;
    assert_eq!(b.connections() - before, 1, "{:?}", b.lines());
    assert_eq!(wait_lines(&b, "QUIT", 1).await, 1, "{:?}", b.lines());
    gw.shutdown().await;
}

/// One client session on listener `mx` that opens a backend transaction
/// before STARTTLS (EHLO `before`, MAIL; RSET is answered by mailgate, so
/// the backend's transaction stays open), then sends a message over TLS
/// (EHLO `after`) and QUITs.
async fn mail_then_starttls(gw: &Gateway, ca: &std::path::Path, before: &str, after: &str) {
    let mut c = SmtpClient::greeted(gw.addr("mx").unwrap()).await;
    assert!(c.cmd(&format!("EHLO {before}")).await.starts_with("250"));
    assert!(c.cmd("MAIL FROM:<a@example.org>").await.starts_with("250"));
    assert!(c.cmd("RSET").await.starts_with("250"));
    assert!(c.cmd("STARTTLS").await.starts_with("220"));
    let mut c = c.tls(ca).await;
    let (code, text) = c.send_message(after, MESSAGE).await;
    assert_eq!(code, 250, "{text}");
    c.cmd("QUIT").await;
    c.closed(Duration::from_secs(3)).await;
}

/// One client session over STARTTLS on `mx`: a message, then QUIT.
async fn one_message_tls(gw: &Gateway, ca: &std::path::Path) -> (u16, String) {
    let mut c = SmtpClient::greeted(gw.addr("mx").unwrap())
        .await
        .starttls(ca)
        .await;
    let r = c.send_message("client.example", MESSAGE).await;
    c.cmd("QUIT").await;
    c.closed(Duration::from_secs(3)).await;
    r
}

/// A reload that changes the backend's address closes the connections kept
/// for the old one at once (QUIT), instead of at the end of their idle
/// time; one that changes nothing of the backend keeps them.
#[tokio::test]
async fn a_reload_closes_connections_the_new_settings_cannot_take() {
    let b = SmtpBackend::new().start().await;
    let other = SmtpBackend::new().start().await;
    let yaml = |addr: &str| config(addr, "reuse: { idle_timeout: 5m }");
    let gw = common::start(&yaml(&b.addr)).await;
    assert_eq!(one_message(&gw).await.0, 250);
    let load = |y: &str| mailgate::config::load_str("t.yaml", y).unwrap();
    gw.reload(&load(&yaml(&b.addr))).unwrap();
    let (code, text) = one_message(&gw).await;
    assert_eq!(code, 250, "{text}");
    assert_eq!(b.connections(), 2, "probe, then one kept across the reload");
    gw.reload(&load(&yaml(&other.addr))).unwrap();
    assert_eq!(
        wait_lines(&b, "QUIT", 1).await,
        1,
        "closed at the reload: {:?}",
        b.lines()
    );
    gw.shutdown().await;
}

/// A session that began before a reload and ends after it leaves its
/// connection, made with the old settings, for nobody: the new sessions
/// take the new settings' connections. It is closed at once (QUIT), not
/// kept for its idle time.
#[tokio::test]
async fn a_session_ending_after_a_reload_closes_the_old_settings_connection() {
    let b = SmtpBackend::new().start().await;
    let other = SmtpBackend::new().start().await;
    let yaml = |addr: &str| config(addr, "reuse: { idle_timeout: 5m }");
    let gw = common::start(&yaml(&b.addr)).await;
    let mut c = SmtpClient::greeted(gw.addr("mx").unwrap()).await;
    let (code, text) = c.send_message("client.example", MESSAGE).await;
    assert_eq!(code, 250, "{text}");
    let load = |y: &str| mailgate::config::load_str("t.yaml", y).unwrap();
    gw.reload(&load(&yaml(&other.addr))).unwrap();
    c.cmd("QUIT").await;
    c.closed(Duration::from_secs(3)).await;
    assert_eq!(
        wait_lines(&b, "QUIT", 1).await,
        1,
        "closed as its session ended: {:?}",
        b.lines()
    );
    assert_eq!(one_message(&gw).await.0, 250);
    assert_eq!(other.accepted(), 1, "the new settings serve");
    gw.shutdown().await;
}

/// A reload that lowers `max_idle` closes the oldest kept connections
/// beyond it, and one that turns `reuse` off closes the rest (QUIT at
/// once, not at the end of their idle time).
#[tokio::test]
async fn a_reload_that_lowers_or_turns_off_reuse_closes_kept_connections() {
    let b = SmtpBackend::new().start().await;
    let yaml = |extra: &str| config(&b.addr, extra);
    let gw = common::start(&yaml("reuse: { idle_timeout: 5m }")).await;
    // two sessions at once: two backend connections, both kept after
    let mut one = SmtpClient::greeted(gw.addr("mx").unwrap()).await;
    let mut two = SmtpClient::greeted(gw.addr("mx").unwrap()).await;
    for c in [&mut one, &mut two] {
        assert!(c.cmd("EHLO client.example").await.starts_with("250"));
        assert!(c.cmd("MAIL FROM:<a@example.org>").await.starts_with("250"));
    }
    for mut c in [one, two] {
        c.cmd("QUIT").await;
        c.closed(Duration::from_secs(3)).await;
    }
    assert_eq!(wait_lines(&b, "RSET", 2).await, 2, "{:?}", b.lines());
    assert_eq!(wait_lines(&b, "QUIT", 0).await, 0, "both kept");
    let load = |y: &str| mailgate::config::load_str("t.yaml", y).unwrap();
    gw.reload(&load(&yaml("reuse: { idle_timeout: 5m, max_idle: 1 }")))
        .unwrap();
    assert_eq!(wait_lines(&b, "QUIT", 1).await, 1, "one beyond max_idle");
    gw.reload(&load(&yaml(""))).unwrap();
    assert_eq!(
        wait_lines(&b, "QUIT", 2).await,
        2,
        "reuse off: {:?}",
        b.lines()
    );
    gw.shutdown().await;
}

/// The capability cache promised what the connection then opened does not
/// offer (the backend was reconfigured after the start-up probe): a MAIL
/// that needs SMTPUTF8 or 8BITMIME is answered 451 and never sent without
/// its parameter (before: `MAIL FROM:<jörg@bücher.example>` went to a
/// backend that never agreed to SMTPUTF8, and the client heard its 250).
/// The next session is promised only what the backend offers now.
#[tokio::test]
async fn a_mail_needing_an_extension_the_connection_lacks_is_not_sent() {
    fn rule(n: usize, verb: &str, _: usize) -> Option<&'static str> {
        match verb {
            // the probe's connection; every later one has neither
            "EHLO" if n == 0 => Some("250-legacy\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"),
            "EHLO" => Some("250-legacy\r\n250 PIPELINING\r\n"),
            "QUIT" => Some("221 bye\r\n"),
            _ => Some("250 ok\r\n"),
        }
    }
    for extra in ["", "reuse: {}"] {
        let (addr, conns) = scripted(rule, Duration::ZERO).await;
        let gw = common::start(&config(&addr, extra)).await;
        let mut c = SmtpClient::greeted(gw.addr("mx").unwrap()).await;
        let ehlo = c.cmd("EHLO client.example").await;
        assert!(
            ehlo.contains("SMTPUTF8") && ehlo.contains("8BITMIME"),
            "{ehlo}"
        );
        for (mail, ext) in [
            (
                "MAIL FROM:<j\u{f6}rg@b\u{fc}cher.example> SMTPUTF8",
                "SMTPUTF8",
            ),
            ("MAIL FROM:<alice@example.org> BODY=8BITMIME", "8BITMIME"),
        ] {
            let r = c.cmd(mail).await;
            assert_eq!(
                r,
                format!("451 4.3.0 Mail server no longer offers {ext}, try again later\n"),
                "{extra:?}: {mail}"
            );
        }
        // the session goes on: a MAIL that needs nothing is relayed
        assert!(c
            .cmd("MAIL FROM:<alice@example.org>")
            .await
            .starts_with("250"));
        c.cmd("QUIT").await;
        let mut c = SmtpClient::greeted(gw.addr("mx").unwrap()).await;
        let ehlo = c.cmd("EHLO client.example").await;
        assert!(
            !ehlo.contains("SMTPUTF8") && !ehlo.contains("8BITMIME"),
            "{extra:?}: {ehlo}"
        );
        let r = c.cmd("MAIL FROM:<alice@example.org> BODY=8BITMIME").await;
        assert!(r.starts_with("555"), "{extra:?}: {r}");
        assert!(conns.load(std::sync::atomic::Ordering::SeqCst) >= 2);
        gw.shutdown().await;
    }
}

/// A MAIL refused for an extension the connection lacks sent nothing over
/// it: the session keeps that connection (in step, nothing refused) for
/// its next MAIL, and the backend sees QUIT, not a dropped connection per
/// refused MAIL. Before, each 451 cost a connection, closed without QUIT.
#[tokio::test]
async fn a_connection_lacking_an_extension_stays_with_the_session() {
    fn rule(n: usize, verb: &str, _: usize) -> Option<&'static str> {
        match verb {
            "EHLO" if n == 0 => Some("250-legacy\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"),
            "EHLO" => Some("250-legacy\r\n250 PIPELINING\r\n"),
            "QUIT" => Some("221 bye\r\n"),
            _ => Some("250 ok\r\n"),
        }
    }
    let (addr, conns) = scripted(rule, Duration::ZERO).await;
    let gw = common::start(&config(&addr, "")).await;
    let mut c = SmtpClient::greeted(gw.addr("mx").unwrap()).await;
    assert!(c.cmd("EHLO client.example").await.contains("SMTPUTF8"));
    for _ in 0..3 {
        let r = c.cmd("MAIL FROM:<alice@example.org> BODY=8BITMIME").await;
        assert!(r.starts_with("451 4.3.0"), "{r}");
    }
    assert!(c
        .cmd("MAIL FROM:<alice@example.org>")
        .await
        .starts_with("250"));
    // a later EHLO of the session says what its connection offers
    assert!(c.cmd("RSET").await.starts_with("250"));
    let ehlo = c.cmd("EHLO client.example").await;
    assert!(
        !ehlo.contains("8BITMIME") && !ehlo.contains("SMTPUTF8"),
        "{ehlo}"
    );
    let r = c.cmd("MAIL FROM:<alice@example.org> BODY=8BITMIME").await;
    assert!(r.starts_with("555"), "{r}");
    c.cmd("QUIT").await;
    c.closed(Duration::from_secs(3)).await;
    // the probe's and the session's one
    assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 2);
    gw.shutdown().await;
}

/// A kept connection's EHLO after XCLIENT answers this client: what it
/// offers is what the next sessions are promised (Postfix can discard EHLO
/// keywords per client). Here the second client's EHLO lacks 8BITMIME, so
/// the third client is not offered it; before, the cache kept what the
/// first (fresh) connection had said.
#[tokio::test]
async fn a_kept_connections_new_ehlo_updates_what_clients_are_offered() {
    let b = SmtpBackend::new()
        .on("EHLO", XCLIENT_EHLO)
        .on_line(
            "EHLO beta.example",
            "250-legacy\r\n250 XCLIENT NAME ADDR PORT PROTO HELO\r\n",
        )
        .on("XCLIENT", "220 legacy ESMTP again\r\n")
        .start()
        .await;
    let gw = Yaml::new()
        .listener("mx", "smtp", "none", "timeouts: { backend_reply: 3s }")
        .backend("b", &b.addr, "identity: [xclient], reuse: {}")
        .start()
        .await;
    let mut offered = Vec::new();
    for helo in ["alpha.example", "beta.example", "gamma.example"] {
        let mut c = SmtpClient::greeted(gw.addr("mx").unwrap()).await;
        offered.push(c.cmd(&format!("EHLO {helo}")).await.contains("8BITMIME"));
        assert!(c
            .cmd("MAIL FROM:<alice@example.org>")
            .await
            .starts_with("250"));
        c.cmd("QUIT").await;
        c.closed(Duration::from_secs(3)).await;
        // the connection is kept once the session's QUIT was answered
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(offered, [true, true, false], "{:?}", b.lines());
    assert_eq!(
        b.connections(),
        2,
        "the probe's and one kept: {:?}",
        b.lines()
    );
    gw.shutdown().await;
}
