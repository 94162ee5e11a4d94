//! The IMAP client of the legacy server (`backend/imap.rs`) on loopback:
//! against the scripted IMAP backend (`common/backend.rs`: LOGIN-only and
//! AUTH=PLAIN backends, hard passwords, identity, out-of-step backends) and
//! against a real Dovecot imapd.

mod common;

use common::ImapBackend as Scripted;
use mailgate::backend::imap::{ImapBackend, ImapLogin, ImapLoginReply, AUTHZID_TEXT};
use mailgate::backend::{Backend, BackendError, ClientIdentity, Deadlines};
use std::time::Duration;

/// `"`, `\`, a space and non-ASCII: quoted strings cannot carry it whole.
const HARD: &str = "p\"a\\ss w\u{f6}rd\u{20ac}";

fn backend(addr: &str) -> Backend {
    Backend {
        name: "legacy-imap".into(),
        address: addr.into(),
        helo_name: "gw.test".into(),
        xclient: false,
        proxy_v2: false,
        tls: None,
        identity_optional: false,
        imap_id: false,
        reuse: Default::default(),
    }
}

fn deadlines() -> Deadlines {
    Deadlines {
        connect: Duration::from_secs(5),
        reply: Duration::from_secs(5),
        data: Duration::from_secs(5),
    }
}

fn client() -> ClientIdentity {
    ClientIdentity {
        peer: "192.0.2.7:50123".parse().unwrap(),
        local: "127.0.0.1:993".parse().unwrap(),
        helo: None,
        esmtp: false,
    }
}

fn login(user: &str, password: &str) -> ImapLogin {
    ImapLogin::Login {
        user: user.into(),
        password: password.into(),
    }
}

fn plain(authzid: &str, user: &str, password: &str) -> ImapLogin {
    ImapLogin::Plain {
        authzid: authzid.into(),
        user: user.into(),
        password: password.into(),
    }
}

async fn connect(b: &Backend) -> Result<ImapBackend, BackendError> {
    ImapBackend::connect(b, &deadlines(), Some(&client())).await
}

async fn login_on(be: &common::Running, l: &ImapLogin) -> ImapLoginReply {
    let mut c = connect(&backend(&be.addr)).await.unwrap();
    c.login(l).await.unwrap()
}

/// Acceptance 4: AUTHENTICATE PLAIN from the client against a LOGIN-only
/// backend is replayed as LOGIN; the hard password goes as a synchronising
/// literal (the backend's `+` awaited), the user as a quoted string.
#[tokio::test]
async fn plain_against_login_only_backend_with_a_hard_password() {
    let be = Scripted::new()
        .greeting("* OK fake ready\r\n")
        .caps("IMAP4rev1")
        .user("alice", HARD)
        .start()
        .await;
    let r = login_on(&be, &plain("", "alice", HARD)).await;
    assert_eq!(
        r,
        ImapLoginReply::Accepted("OK [CAPABILITY IMAP4rev1 IDLE] Logged in".into())
    );
    assert_eq!(be.accepted(), 1);
    let lines = be.lines();
    assert_eq!(
        lines[0], "m1 CAPABILITY",
        "caps learnt by command: {lines:?}"
    );
    assert_eq!(lines[1], format!("m2 LOGIN \"alice\" {{{}}}", HARD.len()));
    assert_eq!(be.literals(), [HARD.as_bytes().to_vec()]);
    // authzid equal to the user: LOGIN too
    let r = login_on(&be, &plain("alice", "alice", HARD)).await;
    assert!(matches!(r, ImapLoginReply::Accepted(_)), "{r:?}");
}

/// With LITERAL+ the literal is non-synchronising: one write, no `+`.
#[tokio::test]
async fn literal_plus_backend_gets_one_write() {
    let be = Scripted::new()
        .caps("IMAP4rev1 LITERAL+")
        .user("j\u{fc}rgen", HARD)
        .start()
        .await;
    let r = login_on(&be, &login("j\u{fc}rgen", HARD)).await;
    assert!(matches!(r, ImapLoginReply::Accepted(_)), "{r:?}");
    let lines = be.lines();
    assert_eq!(
        lines[0], "m1 LOGIN {7+}",
        "greeting caps used, no CAPABILITY"
    );
    assert_eq!(
        be.literals(),
        ["j\u{fc}rgen".as_bytes().to_vec(), HARD.as_bytes().to_vec()]
    );
}

/// Quotable passwords (with `"` and `\`) go as escaped quoted strings.
#[tokio::test]
async fn quoted_password_with_escapes() {
    let pw = "a \"quoted\" \\ pass";
    let be = Scripted::new()
        .caps("IMAP4rev1")
        .user("alice", pw)
        .start()
        .await;
    let r = login_on(&be, &login("alice", pw)).await;
    assert!(matches!(r, ImapLoginReply::Accepted(_)), "{r:?}");
    assert_eq!(
        be.lines()[0],
        "m1 LOGIN \"alice\" \"a \\\"quoted\\\" \\\\ pass\""
    );
    assert!(be.literals().is_empty());
}

/// AUTHENTICATE PLAIN where the backend has it: with SASL-IR in one line,
/// without it after the `+`; an authzid is carried.
#[tokio::test]
async fn authenticate_plain_with_and_without_sasl_ir() {
    for caps in ["IMAP4rev1 AUTH=PLAIN SASL-IR", "IMAP4rev1 AUTH=PLAIN"] {
        let be = Scripted::new().caps(caps).user("alice", HARD).start().await;
        let r = login_on(&be, &plain("", "alice", HARD)).await;
        assert!(matches!(r, ImapLoginReply::Accepted(_)), "{caps}: {r:?}");
        let lines = be.lines();
        if caps.contains("SASL-IR") {
            assert!(lines[0].starts_with("m1 AUTHENTICATE PLAIN "), "{lines:?}");
        } else {
            assert_eq!(lines[0], "m1 AUTHENTICATE PLAIN");
            assert_eq!(lines.len(), 2, "the response after the `+`: {lines:?}");
        }
        // the backend decides about authorization identities
        let r = login_on(&be, &plain("bob", "alice", HARD)).await;
        assert!(
            matches!(&r, ImapLoginReply::Rejected(t) if t.contains("AUTHORIZATIONFAILED")),
            "{r:?}"
        );
    }
}

/// A different authorization identity cannot be carried by LOGIN: rejected
/// without a word to the backend.
#[tokio::test]
async fn authzid_against_login_only_backend_fails_closed() {
    let be = Scripted::new().caps("IMAP4rev1").start().await;
    let r = login_on(&be, &plain("bob", "alice", "secret")).await;
    assert_eq!(r, ImapLoginReply::Rejected(AUTHZID_TEXT.into()));
    assert_eq!(be.accepted(), 0);
    assert!(!be.lines().iter().any(|l| l.contains("LOGIN")));
}

/// Acceptance 5: a wrong password gets the backend's own text.
#[tokio::test]
async fn wrong_password_is_the_backends_no() {
    let be = Scripted::new().start().await;
    let r = login_on(&be, &login("alice", "wrong")).await;
    assert_eq!(
        r,
        ImapLoginReply::Rejected("NO [AUTHENTICATIONFAILED] Authentication failed.".into())
    );
    // an unprintable text is replaced
    let be = Scripted::new()
        .on("LOGIN", "{tag} NO caf\u{e9} \x1b[31m\r\n")
        .start()
        .await;
    let r = login_on(&be, &login("alice", "secret")).await;
    assert_eq!(
        r,
        ImapLoginReply::Rejected(mailgate::backend::imap::REJECTED_TEXT.into())
    );
}

/// Greetings that cannot lead to a replayed login: BYE, PREAUTH, and
/// LOGINDISABLED (the client gets a temporary error).
#[tokio::test]
async fn greetings_and_logindisabled_are_unavailable() {
    for greeting in ["* BYE too busy\r\n", "* PREAUTH welcome, no login\r\n"] {
        let be = Scripted::new().greeting(greeting).start().await;
        let r = connect(&backend(&be.addr)).await;
        assert!(matches!(r, Err(BackendError::Unavailable(_))), "{greeting}");
        assert!(be.lines().is_empty());
    }
    let be = Scripted::new()
        .caps("IMAP4rev1 STARTTLS LOGINDISABLED")
        .start()
        .await;
    let r = connect(&backend(&be.addr)).await;
    assert!(matches!(r, Err(BackendError::Unavailable(_))));
    let be = Scripted::new().greeting("hello\r\n").start().await;
    let r = connect(&backend(&be.addr)).await;
    assert!(matches!(r, Err(BackendError::Protocol(_))));
}

/// `identity: [imap_id]`: Dovecot's ID fields before the login; a backend
/// without ID, or one that refuses it, fails closed.
#[tokio::test]
async fn imap_id_is_sent_or_fails_closed() {
    let be = Scripted::new().start().await;
    let mut b = backend(&be.addr);
    b.imap_id = true;
    let mut c = connect(&b).await.unwrap();
    assert!(matches!(
        c.login(&login("alice", "secret")).await.unwrap(),
        ImapLoginReply::Accepted(_)
    ));
    assert_eq!(
        be.lines()[..2],
        [
            "m1 ID (\"x-originating-ip\" \"192.0.2.7\" \"x-originating-port\" \"50123\" \
             \"x-connected-ip\" \"127.0.0.1\" \"x-connected-port\" \"993\")"
                .to_string(),
            "m2 LOGIN \"alice\" \"secret\"".to_string()
        ]
    );
    // without identity configured: no ID
    let be2 = Scripted::new().start().await;
    connect(&backend(&be2.addr)).await.unwrap();
    assert!(!be2.lines().iter().any(|l| l.contains(" ID ")));

    let no_id = Scripted::new().caps("IMAP4rev1").start().await;
    let mut b = backend(&no_id.addr);
    b.imap_id = true;
    assert!(matches!(connect(&b).await, Err(BackendError::Identity(_))));
    let refused = Scripted::new()
        .on("ID", "{tag} NO not from you\r\n")
        .start()
        .await;
    let mut b = backend(&refused.addr);
    b.imap_id = true;
    assert!(matches!(connect(&b).await, Err(BackendError::Identity(_))));
    assert!(!refused.lines().iter().any(|l| l.contains("LOGIN")));
}

/// Out of step: bytes nobody asked for before the login (nothing is sent),
/// and a tagged reply with another tag.
#[tokio::test]
async fn out_of_step_backends() {
    let stray = Scripted::new()
        .greeting("* OK ready\r\n")
        .on(
            "CAPABILITY",
            "* CAPABILITY IMAP4rev1\r\n{tag} OK done\r\nx1 OK stray\r\n",
        )
        .start()
        .await;
    let mut c = connect(&backend(&stray.addr)).await.unwrap();
    // let the stray line arrive
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        c.login(&login("alice", "secret")).await.unwrap(),
        ImapLoginReply::OutOfStep
    );
    drop(c);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(stray.lines(), ["m1 CAPABILITY"], "no LOGIN was sent");

    let other_tag = Scripted::new()
        .on("LOGIN", "m9 OK [CAPABILITY IMAP4rev1] Logged in\r\n")
        .start()
        .await;
    let r = login_on(&other_tag, &login("alice", "secret")).await;
    assert_eq!(r, ImapLoginReply::OutOfStep);
}

/// After the tagged OK the connection is the client's: what the backend
/// sent after it comes out of `into_parts` untouched.
#[tokio::test]
async fn into_parts_hands_over_the_rest() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let be = Scripted::new()
        .on("LOGIN", "{tag} OK Logged in\r\n* 1 EXISTS\r\n")
        .start()
        .await;
    let mut c = connect(&backend(&be.addr)).await.unwrap();
    assert_eq!(
        c.login(&login("alice", "secret")).await.unwrap(),
        ImapLoginReply::Accepted("OK Logged in".into())
    );
    let (mut stream, mut left) = c.into_parts();
    if left.is_empty() {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        left.extend_from_slice(&buf[..n]);
    }
    assert_eq!(&left[..], b"* 1 EXISTS\r\n");
    stream.write_all(b"a1 NOOP\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"a1 OK done\r\n");
}

/// The real thing: LOGIN (literal, as Dovecot offers no LITERAL+ before
/// login… or `{n+}` if it does) and AUTHENTICATE PLAIN (SASL-IR) with the
/// hard password, the client identity by ID (logged by Dovecot as the
/// client's address), a wrong password's `NO [AUTHENTICATIONFAILED]`.
#[test]
fn real_dovecot_logins() {
    common::require_or_skip!(root: "Dovecot (it switches users)", "dovecot");
    let dir = tempfile::tempdir().unwrap();
    let dovecot = common::Dovecot::start(
        dir.path(),
        &common::DovecotConf {
            password: HARD,
            inbox: vec![b"Subject: hi\n\nhello\n".to_vec()],
            folders: vec![],
            trusted_networks: Some("127.0.0.0/8"),
        },
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut b = backend(&format!("127.0.0.1:{}", dovecot.imap));
        b.imap_id = true;
        for l in [
            login("alice", HARD),
            plain("", "alice", HARD),
            plain("alice", "alice", HARD),
        ] {
            let mut c = connect(&b).await.unwrap();
            assert!(c.caps.imap4rev1 && c.caps.auth_plain && c.caps.id);
            let r = c.login(&l).await.unwrap();
            assert!(
                matches!(&r, ImapLoginReply::Accepted(t) if t.starts_with("OK [CAPABILITY ")),
                "{l:?}: {r:?}"
            );
            c.logout().await;
        }
        let mut c = connect(&b).await.unwrap();
        let r = c.login(&login("alice", "wrong")).await.unwrap();
        assert!(
            matches!(&r, ImapLoginReply::Rejected(t) if t.starts_with("NO [AUTHENTICATIONFAILED]")),
            "{r:?}"
        );
    });
    let log = dovecot.log_text();
    assert!(
        log.contains("rip=192.0.2.7"),
        "Dovecot took the client's address from ID:\n{log}"
    );
}

// ---------------------------------------------------------------- demo

fn demo_mailbox() -> std::sync::Arc<mailgate::demo::Mailbox> {
    let mb = mailgate::demo::Mailbox::default();
    for body in [
        "Subject: one\n\nfirst message\n",
        "Subject: two\r\n\r\nsecond\r\n",
    ] {
        mb.messages
            .lock()
            .unwrap()
            .push(mailgate::demo::StoredMessage {
                from: "alice@example.org".into(),
                rcpts: vec!["demo@example.net".into()],
                data: body.as_bytes().to_vec(),
            });
    }
    std::sync::Arc::new(mb)
}

/// The demo maildrop answers what curl sends for `imap://…/INBOX;UID=n`
/// (and `;MAILINDEX=n`), with the message in CRLF form.
#[test]
fn demo_imap_maildrop_serves_curl() {
    common::require_or_skip!("curl");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr = rt.block_on(common::demo_imap(demo_mailbox()));
    for (url, want) in [
        ("INBOX;UID=1", "Subject: one\r\n\r\nfirst message\r\n"),
        ("INBOX;UID=2", "Subject: two\r\n\r\nsecond\r\n"),
        ("INBOX;MAILINDEX=2", "Subject: two\r\n\r\nsecond\r\n"),
    ] {
        let (ok, out, err) = common::run_limited(
            std::process::Command::new(common::tool("curl"))
                .args(["-sS", "-v", "--max-time", "10"])
                .arg(format!(
                    "imap://{0}:{0}@{addr}/{url}",
                    mailgate::demo::DEMO_USER
                )),
            Duration::from_secs(20),
        );
        assert!(ok, "curl {url}: {err}");
        assert_eq!(out, want, "{url}: {err}");
    }
    // a wrong user is refused
    let (ok, _, err) = common::run_limited(
        std::process::Command::new(common::tool("curl"))
            .args(["-sS", "--max-time", "10"])
            .arg(format!("imap://bob:x@{addr}/INBOX;UID=1")),
        Duration::from_secs(20),
    );
    assert!(!ok, "{err}");
}

/// The backend client logs in to the demo in every form (the demo takes
/// any password, literals included).
#[tokio::test]
async fn backend_client_logs_in_to_the_demo() {
    let addr = common::demo_imap(demo_mailbox()).await;
    for l in [
        login("demo", HARD),
        plain("", "demo", HARD),
        plain("demo", "demo", "x"),
    ] {
        let mut c = connect(&backend(&addr)).await.unwrap();
        assert!(c.caps.literal_plus && c.caps.sasl_ir && c.caps.id);
        let r = c.login(&l).await.unwrap();
        assert!(matches!(r, ImapLoginReply::Accepted(_)), "{l:?}: {r:?}");
        c.logout().await;
    }
    let mut c = connect(&backend(&addr)).await.unwrap();
    let r = c.login(&login("bob", "x")).await.unwrap();
    assert!(matches!(r, ImapLoginReply::Rejected(_)), "{r:?}");
}

/// The demo's own configuration (`demo_config`) with its IMAPS listener in
/// front of the demo maildrop: the exact curl command `demo` prints fetches
/// message 1 through mailgate, byte for byte as the maildrop serves it.
#[test]
fn demo_prints_an_imaps_command_that_works_through_mailgate() {
    common::require_or_skip!("curl", "sh");
    let dir = tempfile::tempdir().unwrap();
    let (cert, _) = common::dev_cert(dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mailbox = demo_mailbox();
    let ports = mailgate::demo::DemoPorts {
        smtp: common::free_port(),
        smtps: common::free_port(),
        pop3: common::free_port(),
        pop3s: common::free_port(),
        imaps: common::free_port(),
    };
    let gw = rt.block_on(async {
        let (_, smtp) = common::demo_smtp().await;
        let pop3 = common::demo_pop3(mailbox.clone()).await;
        let imap = common::demo_imap(mailbox.clone()).await;
        let yaml = mailgate::demo::demo_config(
            dir.path(),
            ports,
            smtp.parse().unwrap(),
            pop3.parse().unwrap(),
            imap.parse().unwrap(),
        );
        common::start(&yaml).await
    });
    let command = mailgate::demo::imaps_command(&cert, ports.imaps);
    let (ok, out, err) = common::run_limited(
        std::process::Command::new(common::tool("sh"))
            .arg("-c")
            .arg(&command),
        Duration::from_secs(20),
    );
    assert!(ok, "{command}: {err}");
    assert_eq!(out, "Subject: one\r\n\r\nfirst message\r\n", "{err}");
    rt.block_on(gw.shutdown());
}
