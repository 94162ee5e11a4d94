//! IMAP integration tests: the gateway in-process on loopback, in front of
//! the scripted IMAP backend of `tests/common/backend.rs` (LOGIN only, or
//! LOGIN and AUTHENTICATE PLAIN), talked to by a line client.

mod common;

use common::{Gateway, ImapBackend, Pop3Client as LineClient, Running, Tls, Yaml};

use mailgate::conn::sasl::base64_encode;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

struct Setup {
    gw: Gateway,
    ca: PathBuf,
    _dir: tempfile::TempDir,
}

/// Listeners `imap` (STARTTLS, require_tls by default) and `imaps` (implicit
/// TLS), each with `extra`, in front of `backend`; `top`: more top-level
/// YAML (e.g. `policies:`).
async fn gateway(backend: &str, extra: &str, top: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = common::dev_cert(dir.path());
    let gw = Yaml::new()
        .server("shutdown_grace: 2s")
        .listener("imap", "imap", "starttls", extra)
        .listener("imaps", "imap", "implicit", extra)
        .certs(dir.path())
        .backend("b", backend, "")
        .section(top)
        .start()
        .await;
    Setup { gw, ca, _dir: dir }
}

impl Setup {
    async fn plain(&self, name: &str) -> LineClient<TcpStream> {
        let mut c = LineClient::connect(self.gw.addr(name).unwrap()).await;
        let g = c.status().await;
        assert!(g.starts_with("* OK [CAPABILITY IMAP4rev1"), "{g}");
        c
    }

    async fn tls(&self, name: &str) -> LineClient<Tls> {
        self.tls_from(name, "127.0.0.1").await
    }

    /// Implicit TLS from loopback address `src`.
    async fn tls_from(&self, name: &str, src: &str) -> LineClient<Tls> {
        let c = LineClient::connect_from(src, self.gw.addr(name).unwrap()).await;
        let mut c = c.tls(&self.ca).await;
        let g = c.status().await;
        assert!(g.starts_with("* OK [CAPABILITY IMAP4rev1"), "{g}");
        assert!(
            !g.contains("STARTTLS") && !g.contains("LOGINDISABLED"),
            "{g}"
        );
        c
    }
}

/// Lines up to and including the one tagged `tag`.
async fn until<S>(c: &mut LineClient<S>, tag: &str) -> Vec<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut v = Vec::new();
    loop {
        let l = c.status().await;
        let done = l.starts_with(&format!("{tag} "));
        v.push(l);
        if done {
            return v;
        }
    }
}

fn plain_ir(authzid: &str, user: &str, pass: &str) -> String {
    base64_encode(format!("{authzid}\0{user}\0{pass}").as_bytes())
}

/// A backend with LOGIN only (no AUTH=PLAIN, no LITERAL+).
async fn login_only(user: &str, pass: &str) -> Running {
    ImapBackend::new()
        .caps("IMAP4rev1 ID IDLE")
        .user(user, pass)
        .start()
        .await
}

/// Issue 13, acceptance 2: `a STARTTLS` and `b CAPABILITY` in one write get
/// exactly one tagged OK before TLS, and `b` is never answered, in
/// plaintext or inside TLS.
#[tokio::test]
async fn starttls_injection_is_discarded() {
    let be = login_only("alice", "secret").await;
    let st = gateway(&be.addr, "", "").await;
    let mut c = st.plain("imap").await;
    c.send(b"a STARTTLS\r\nb CAPABILITY\r\n").await;
    assert_eq!(c.status().await, "a OK Begin TLS negotiation now");
    let (rest, closed) = c.rest(Duration::from_millis(500)).await;
    assert!(!closed && rest.is_empty(), "plaintext after OK: {rest:?}");
    let mut t = c.tls(&st.ca).await;
    // the first answer inside TLS is to our NOOP, not to the injected `b`
    t.send(b"c NOOP\r\n").await;
    assert_eq!(t.status().await, "c OK NOOP completed");
    t.send(b"d CAPABILITY\r\n").await;
    let caps = until(&mut t, "d").await;
    assert_eq!(
        caps,
        vec![
            "* CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR ID LITERAL+",
            "d OK CAPABILITY completed"
        ]
    );
    t.send(b"e STARTTLS\r\n").await;
    assert_eq!(t.status().await, "e BAD TLS is already active");
    t.send(b"f LOGOUT\r\n").await;
    assert_eq!(
        until(&mut t, "f").await,
        vec!["* BYE mailgate logging out", "f OK LOGOUT completed"]
    );
    assert!(!be
        .lines()
        .iter()
        .any(|l| l.contains("CAPABILITY") && l.starts_with('b')));
}

/// Issue 13, acceptance 3: LOGIN or AUTHENTICATE before TLS on a
/// require_tls listener: `NO [PRIVACYREQUIRED]`, and the backend gets no
/// connection.
#[tokio::test]
async fn login_before_tls_is_refused_and_never_reaches_the_backend() {
    let be = login_only("alice", "secret").await;
    let st = gateway(&be.addr, "", "").await;
    let mut c = st.plain("imap").await;
    c.send(b"a CAPABILITY\r\n").await;
    let caps = until(&mut c, "a").await;
    assert_eq!(
        caps[0],
        "* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED ID LITERAL+"
    );
    let ir = plain_ir("", "alice", "secret");
    for cmd in [
        "b LOGIN alice secret".to_string(),
        format!("c AUTHENTICATE PLAIN {ir}"),
        "d AUTHENTICATE PLAIN".to_string(),
        "e LOGIN {5+}\r\nalice {6+}\r\nsecret".to_string(),
    ] {
        c.send(format!("{cmd}\r\n").as_bytes()).await;
        let tag = &cmd[..1];
        assert_eq!(
            c.status().await,
            format!("{tag} NO [PRIVACYREQUIRED] Plaintext login is disabled: use STARTTLS first")
        );
    }
    // a synchronising literal gets no `+`, which would invite the password
    // in the clear: the refusal comes instead, and the client sends nothing
    // more of the command (RFC 3501 §7.5)
    c.send(b"f LOGIN {5}\r\n").await;
    assert_eq!(
        c.status().await,
        "f NO [PRIVACYREQUIRED] Plaintext login is disabled: use STARTTLS first"
    );
    c.send(b"g NOOP\r\n").await;
    assert_eq!(c.status().await, "g OK NOOP completed");
    // LITERAL+ octets come anyway: read and dropped to the command's end,
    // also where a synchronising literal follows (never a `+` for it)
    c.send(b"h LOGIN alice {6+}\r\nsecret\r\ni LOGIN {5+}\r\nalice {6}\r\nj NOOP\r\n")
        .await;
    assert!(c.status().await.starts_with("h NO [PRIVACYREQUIRED]"));
    assert!(c.status().await.starts_with("i NO [PRIVACYREQUIRED]"));
    assert_eq!(c.status().await, "j OK NOOP completed");
    c.send(b"k LOGOUT\r\n").await;
    assert_eq!(
        until(&mut c, "k").await,
        vec!["* BYE mailgate logging out", "k OK LOGOUT completed"]
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(be.connections(), 0, "the backend must not be connected to");
}

/// Issue 13, acceptance 4: AUTHENTICATE PLAIN from the client, replayed to
/// a backend that has LOGIN only, with a password holding `"`, `\`, a
/// space and non-ASCII characters; then the backend's capabilities and
/// bytes pass through.
#[tokio::test]
async fn authenticate_plain_is_replayed_as_login() {
    let pass = "p\"a\\s s w\u{f6}rd\u{1f600}";
    let be = login_only("alice", pass).await;
    let st = gateway(&be.addr, "", "").await;
    // SASL-IR
    let mut c = st.tls("imaps").await;
    c.send(format!("a AUTHENTICATE PLAIN {}\r\n", plain_ir("", "alice", pass)).as_bytes())
        .await;
    assert_eq!(
        c.status().await,
        "a OK [CAPABILITY IMAP4rev1 IDLE] Logged in"
    );
    c.send(b"b SELECT INBOX\r\nc FETCH 1 BODY[]\r\n").await;
    let sel = until(&mut c, "b").await;
    assert_eq!(sel.last().unwrap(), "b OK [READ-WRITE] done");
    let mut raw = Vec::new();
    loop {
        let l = c.raw_line().await.unwrap();
        let done = l.starts_with(b"c ");
        raw.extend_from_slice(&l);
        if done {
            break;
        }
    }
    let msg = b"Subject: one\r\n\r\nfirst\r\n";
    let want = [
        format!("* 1 FETCH (UID 1 BODY[] {{{}}}\r\n", msg.len()).as_bytes(),
        msg,
        b")\r\nc OK done\r\n",
    ]
    .concat();
    assert_eq!(raw, want, "byte-exact");
    c.send(b"d LOGOUT\r\n").await;
    until(&mut c, "d").await;
    // the backend saw a LOGIN (quoted or literal), never an AUTHENTICATE
    let lines = be.lines();
    assert!(lines.iter().any(|l| l.contains("LOGIN")), "{lines:?}");
    assert!(
        !lines.iter().any(|l| l.contains("AUTHENTICATE")),
        "{lines:?}"
    );
    assert_eq!(be.accepted(), 1);

    // the continuation form, and LOGIN with literals from the client
    let mut c = st.tls("imaps").await;
    c.send(b"e AUTHENTICATE PLAIN\r\n").await;
    assert_eq!(c.status().await, "+");
    c.send(format!("{}\r\n", plain_ir("", "alice", pass)).as_bytes())
        .await;
    assert!(c.status().await.starts_with("e OK"));
    drop(c);
    let mut c = st.tls("imaps").await;
    let n = pass.len();
    c.send(b"f LOGIN alice {").await;
    c.send(format!("{n}}}\r\n").as_bytes()).await;
    assert_eq!(c.status().await, "+ Ready for literal data");
    c.send(format!("{pass}\r\n").as_bytes()).await;
    assert!(c.status().await.starts_with("f OK"));
    assert_eq!(be.accepted(), 3);
}

/// Issue 13, acceptance 5 (first half): the backend's `NO
/// [AUTHENTICATIONFAILED]` under the client's tag, after the failure
/// delay; `max_login_failures` closes the session.
#[tokio::test]
async fn wrong_password_gets_the_backends_no_and_closes_after_n() {
    let be = login_only("alice", "secret").await;
    let st = gateway(
        &be.addr,
        ", max_login_failures: 2, login_failure_delay: 300ms",
        "",
    )
    .await;
    let mut c = st.tls("imaps").await;
    for tag in ["a", "b"] {
        let t = Instant::now();
        c.send(format!("{tag} LOGIN alice wrong\r\n").as_bytes())
            .await;
        assert_eq!(
            c.status().await,
            format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed.")
        );
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
    }
    let (rest, closed) = c.rest(Duration::from_secs(5)).await;
    assert!(closed, "closed after the second failure (got {rest:?})");
}

/// Issue 13, acceptance 5 (second half): the brute-force limits and
/// known_good exactly as for POP3 — failures lock the guessing IP and the
/// user, the user still gets in from a network she logged in from before.
#[tokio::test]
async fn policy_locks_guessing_and_spares_known_good_networks() {
    let be = login_only("alice", "secret").await;
    let top = "policies:\n  mailbox:\n    limits:\n      - { name: auth-ip, key: [ip], auth_failures: 5/15minutes, action: reject }\n      - { name: auth-user, key: [auth_user], auth_failures: 5/15minutes, action: tempfail }";
    let st = gateway(
        &be.addr,
        ", policy: mailbox, max_login_failures: 10, login_failure_delay: 10ms",
        top,
    )
    .await;
    async fn try_login(c: &mut LineClient<Tls>, pass: &str) -> String {
        c.send(format!("t LOGIN alice {pass}\r\n").as_bytes()).await;
        c.status().await
    }
    // alice's usual network
    let mut home = st.tls_from("imaps", "127.0.0.20").await;
    assert!(try_login(&mut home, "secret").await.starts_with("t OK"));
    drop(home);
    let before = be.lines().len();
    // five wrong passwords from elsewhere
    let mut evil = st.tls_from("imaps", "127.0.2.66").await;
    for _ in 0..5 {
        assert!(try_login(&mut evil, "wrong").await.starts_with("t NO"));
    }
    // locked: even the right password is refused before the backend
    assert_eq!(
        try_login(&mut evil, "secret").await,
        "t NO [AUTHENTICATIONFAILED] Authentication failed"
    );
    let logins = |be: &Running| {
        be.lines()[before..]
            .iter()
            .filter(|l| l.contains("LOGIN"))
            .count()
    };
    assert_eq!(logins(&be), 5, "the locked login never reached the backend");
    // a fresh network: the per-user lock applies (tempfail)
    let mut fresh = st.tls_from("imaps", "127.0.1.77").await;
    assert_eq!(
        try_login(&mut fresh, "secret").await,
        "t NO [UNAVAILABLE] Too many failed logins, try again later"
    );
    // her known-good network still gets in
    let mut home = st.tls_from("imaps", "127.0.0.20").await;
    let r = try_login(&mut home, "secret").await;
    assert!(r.starts_with("t OK"), "known-good network: {r}");
}

/// After login: STARTTLS and a second LOGIN are answered by mailgate (never
/// relayed), pipelined commands keep their order, and an APPEND over
/// `max_message_size` is refused before its literal is sent.
#[tokio::test]
async fn authenticated_state_answers_starttls_and_bounds_appends() {
    let be = login_only("alice", "secret").await;
    let st = gateway(&be.addr, ", max_message_size: 2KiB", "").await;
    let mut c = st.tls("imaps").await;
    c.send(b"a LOGIN alice secret\r\nb NOOP\r\nc STARTTLS\r\nd LOGIN alice secret\r\ne NOOP\r\n")
        .await;
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(c.status().await);
    }
    assert_eq!(got[0], "a OK [CAPABILITY IMAP4rev1 IDLE] Logged in");
    got[1..].sort();
    assert_eq!(
        got[1..],
        [
            "b OK done",
            "c BAD STARTTLS is only valid before login",
            "d BAD Already logged in",
            "e OK done",
        ]
    );
    c.send(b"f APPEND INBOX {4096}\r\n").await;
    assert_eq!(c.status().await, "f NO [TOOBIG] Message too large");
    let msg = b"Subject: x\r\n\r\nhello\r\n";
    c.send(format!("g APPEND INBOX {{{}}}\r\n", msg.len()).as_bytes())
        .await;
    // the backend's own go-ahead
    assert_eq!(c.status().await, "+ go ahead");
    c.send(msg).await;
    c.send(b"\r\n").await;
    assert_eq!(c.status().await, "g OK done");
    let lines = be.lines();
    assert!(!lines.iter().any(|l| l.contains("STARTTLS")), "{lines:?}");
    assert_eq!(lines.iter().filter(|l| l.contains("LOGIN")).count(), 1);
    assert!(!lines.iter().any(|l| l.starts_with("f ")), "{lines:?}");
    assert!(be.seen.lock().unwrap().literals.contains(&msg.to_vec()));
}

/// Overlong lines and garbage before login count as errors; `max_errors`
/// ends the session with `* BYE`; a literal over the command budget is
/// refused before it is read.
#[tokio::test]
async fn bounds_before_login() {
    let be = login_only("alice", "secret").await;
    let st = gateway(&be.addr, ", max_errors: 3, max_command_line: 1024", "").await;
    let mut c = st.tls("imaps").await;
    c.send(b"a LOGIN alice {5000}\r\n").await;
    assert_eq!(c.status().await, "a BAD [TOOBIG] Literal too large");
    c.send(format!("b NOOP {}\r\n", "x".repeat(2000)).as_bytes())
        .await;
    assert_eq!(c.status().await, "* BAD Line too long");
    c.send(b"c NOOP\r\n").await;
    assert_eq!(c.status().await, "c OK NOOP completed");
    c.send(b"d FROB\r\n").await;
    assert_eq!(
        c.status().await,
        "* BYE Too many errors, closing connection"
    );
    let (_, closed) = c.rest(Duration::from_secs(5)).await;
    assert!(closed);
    // a non-synchronising literal over the budget: its octets are on the way
    let mut c = st.tls("imaps").await;
    c.send(b"e LOGIN alice {5000+}\r\n").await;
    assert_eq!(c.status().await, "e BAD [TOOBIG] Literal too large");
    assert!(c.status().await.starts_with("* BYE [TOOBIG]"));
    assert_eq!(be.connections(), 0);
}

/// The backend down: `NO [UNAVAILABLE]`, not a failed login.
#[tokio::test]
async fn backend_down_is_unavailable() {
    let port = common::free_port();
    let st = gateway(&format!("127.0.0.1:{port}"), "", "").await;
    let mut c = st.tls("imaps").await;
    c.send(b"a LOGIN alice secret\r\n").await;
    assert_eq!(
        c.status().await,
        "a NO [UNAVAILABLE] Mail server temporarily unavailable, try again later"
    );
}

/// The idle timeout after login ends the session with `* BYE`.
#[tokio::test]
async fn idle_relay_ends_with_bye() {
    let be = login_only("alice", "secret").await;
    let st = gateway(&be.addr, ", timeouts: { idle: 1s }", "").await;
    let mut c = st.tls("imaps").await;
    c.send(b"a LOGIN alice secret\r\n").await;
    assert!(c.status().await.starts_with("a OK"));
    let t = Instant::now();
    let (rest, closed) = c.rest(Duration::from_secs(5)).await;
    assert!(closed);
    assert_eq!(rest, "* BYE Autologout; idle for too long\r\n");
    assert!(t.elapsed() >= Duration::from_millis(900));
}

/// Before login, the command timeout ends the session with `* BYE`.
#[tokio::test]
async fn command_timeout_before_login_is_a_bye() {
    let be = login_only("alice", "secret").await;
    let st = gateway(&be.addr, ", timeouts: { command: 1s }", "").await;
    let mut c = st.tls("imaps").await;
    let (rest, closed) = c.rest(Duration::from_secs(5)).await;
    assert!(closed);
    assert_eq!(rest, "* BYE Autologout; idle for too long\r\n");
}

/// The connect stage's refusals speak IMAP: beyond `max_connections` a
/// `* BYE [UNAVAILABLE]`, from a denied network `* BYE Access denied`.
#[tokio::test]
async fn connect_stage_refusals_are_byes() {
    let be = login_only("alice", "secret").await;
    let top = "policies:\n  p: { deny: [\"127.0.0.66/32\"] }";
    let st = gateway(&be.addr, ", max_connections: 1, policy: p", top).await;
    let _first = st.plain("imap").await;
    let mut second = LineClient::connect(st.gw.addr("imap").unwrap()).await;
    assert_eq!(
        second.status().await,
        "* BYE [UNAVAILABLE] Too many connections, try again later"
    );
    let mut denied = LineClient::connect_from("127.0.0.66", st.gw.addr("imaps").unwrap()).await;
    assert_eq!(denied.status().await, "* BYE Access denied");
}

/// ALPN (RFC 7301): an IMAPS listener negotiates `imap` and refuses a
/// client that offers only other protocols (ALPACA).
#[tokio::test]
async fn imaps_alpn_is_imap() {
    let be = login_only("alice", "secret").await;
    let st = gateway(&be.addr, "", "").await;
    let connect = |protocols: &[&[u8]]| {
        let mut cfg = (*common::tls_client(&st.ca)).clone();
        cfg.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
        let addr = st.gw.addr("imaps").unwrap();
        async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
                .connect(
                    rustls_pki_types::ServerName::try_from("localhost").unwrap(),
                    tcp,
                )
                .await
        }
    };
    let tls = connect(&[b"h2", b"imap"]).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"imap"[..]));
    let mut c = LineClient::new(tls);
    assert!(c.status().await.starts_with("* OK [CAPABILITY IMAP4rev1"));
    assert!(connect(&[b"h2", b"http/1.1"]).await.is_err());
}

/// A backend whose login OK carries no capabilities: the client was told
/// mailgate's own list before login (LITERAL+ among them, true while
/// mailgate reads the login itself) and would go on with it; mailgate asks
/// the backend's own list after the login and hands it on in the OK, so a
/// backend without LITERAL+ never has the client count on it (before, its
/// `{n+}` APPEND was closed as `[TOOBIG]`).
#[tokio::test]
async fn a_login_ok_without_capabilities_gets_the_backends_list() {
    let be = ImapBackend::new()
        .caps("IMAP4rev1 ID IDLE")
        .user("alice", "secret")
        .on("LOGIN", "{tag} OK Logged in\r\n")
        .start()
        .await;
    let (_st, mut c) = login_to_a_bare_ok(&be.addr).await;
    // the backend is the client's now: its answers pass as before
    c.send(b"b NOOP\r\n").await;
    assert_eq!(until(&mut c, "b").await, vec!["b OK done"]);
}

/// imaps in front of `backend` (a backend of `caps("IMAP4rev1 ID IDLE")`
/// whose LOGIN OK carries no list): alice logs in, and the OK handed to
/// her carries the list mailgate asked for after the login.
async fn login_to_a_bare_ok(backend: &str) -> (Setup, LineClient<Tls>) {
    let st = gateway(backend, "", "").await;
    let mut c = st.tls("imaps").await;
    c.send(b"a LOGIN alice secret\r\n").await;
    assert_eq!(
        c.status().await,
        "a OK [CAPABILITY IMAP4rev1 ID IDLE] Logged in"
    );
    (st, c)
}

/// What the backend sends after its login OK is the client's, though it
/// comes in with the answer to the CAPABILITY mailgate asked after the
/// login: an ALERT (which a client must show, RFC 9051 §7.1) is handed on
/// after the OK, not swallowed with our CAPABILITY's answer.
#[tokio::test]
async fn untagged_data_after_a_bare_login_ok_reaches_the_client() {
    let be = ImapBackend::new()
        .caps("IMAP4rev1 ID IDLE")
        .user("alice", "secret")
        .on("LOGIN", "{tag} OK Logged in\r\n")
        .on(
            "CAPABILITY",
            "* OK [ALERT] Mailbox over quota\r\n* CAPABILITY IMAP4rev1 ID IDLE\r\n{tag} OK done\r\n",
        )
        .start()
        .await;
    let (_st, mut c) = login_to_a_bare_ok(&be.addr).await;
    c.send(b"b NOOP\r\n").await;
    assert_eq!(
        until(&mut c, "b").await,
        vec!["* OK [ALERT] Mailbox over quota", "b OK done"]
    );
}
