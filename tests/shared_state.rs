//! Issue 15: several mailgate instances, one set of limits, through a real
//! `redis-server` on loopback (started per test on its own port, no
//! persistence, killed by PID). Two gateways run in this process against it
//! with one prefix; the crash test runs one of them as a child process of
//! the built binary and kills it with SIGKILL. Skipped (one `SKIPPED:` line)
//! when redis-server is not installed, unless `MAILGATE_E2E=require`.

mod common;
mod dns;

use common::{http_get, require_or_skip, Gateway, Guard, Redis, SmtpClient, Tls, Yaml};
use mailgate::state::{keys, Answer, Op, Store, StoreSettings};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The `state:` section for `redis` with this test's `prefix`; `extra`:
/// more fields (`timeout` among them: 1s unless given, so that a loaded
/// test machine does not turn a slow answer into a per-instance decision
/// where a test counts on sharing).
fn state(redis: &Redis, prefix: &str, extra: &str) -> String {
    let timeout = if extra.contains("timeout:") {
        ""
    } else {
        "  timeout: 1s\n"
    };
    format!(
        "state:\n  store: redis\n  url: \"{}\"\n  prefix: \"{prefix}\"\n{timeout}{extra}",
        redis.url()
    )
}

/// Listeners `mx` (no TLS) and `sub` (implicit TLS, AUTH required) under
/// policy `p` with `limits`, and the shared store.
fn cfg(dir: &Path, backend: &str, limits: &str, state: &str) -> String {
    Yaml::new()
        .listener("mx", "smtp", "none", "policy: p")
        .listener(
            "sub",
            "smtp",
            "implicit",
            "auth: required, policy: p, login_failure_delay: 10ms, max_login_failures: 10",
        )
        .certs(dir)
        .backend("b", backend, "")
        .section(&format!("policies:\n  p:\n    limits:\n{limits}"))
        .section(state)
        .build()
}

/// Two gateways on one store and prefix.
async fn pair(y: &str) -> (Gateway, Gateway) {
    (common::start(y).await, common::start(y).await)
}

/// The greeting's first line of a new connection from `src`.
async fn greeting(gw: &Gateway, src: &str) -> (String, SmtpClient<tokio::net::TcpStream>) {
    let mut c = SmtpClient::connect_from(src, gw.addr("mx").unwrap()).await;
    (c.text().await, c)
}

/// Acceptance 1a: `rate: 10/minute, burst: 10` per IP admits 10
/// connections across both instances, not 20.
#[tokio::test]
async fn rate_is_shared_across_two_instances() {
    require_or_skip!("redis-server");
    let dir = tempfile::tempdir().unwrap();
    common::dev_cert(dir.path());
    let redis = Redis::start(dir.path());
    let sink = common::demo_smtp().await.1;
    let y = cfg(
        dir.path(),
        &sink,
        "      - { key: [ip], rate: 10/minute, burst: 10, action: tempfail }",
        &state(&redis, "t-rate:", ""),
    );
    let (a, b) = pair(&y).await;
    let mut admitted = 0;
    for i in 0..20 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let (g, _c) = greeting(gw, "127.0.0.2").await;
        if g.starts_with("220") {
            admitted += 1;
        } else {
            assert!(g.starts_with("421 4.7.0"), "connection {i}: {g}");
        }
    }
    assert_eq!(admitted, 10, "one budget across both instances");
    let (g, _c) = greeting(&a, "127.0.0.3").await;
    assert!(g.starts_with("220"), "other IPs unaffected: {g}");
    let mut con = redis.client();
    let keys: Vec<String> = redis::cmd("KEYS").arg("t-rate:*").query(&mut con).unwrap();
    assert!(!keys.is_empty());
    for k in keys {
        let ttl: i64 = redis::cmd("PTTL").arg(&k).query(&mut con).unwrap();
        assert!(ttl > 0 && ttl <= 60_000, "{k} has a TTL: {ttl}");
    }
}

/// Acceptance 1b: `concurrent: 3` holds across both instances, and a slot
/// given back on one is free on the other.
#[tokio::test]
async fn concurrent_is_shared_across_two_instances() {
    require_or_skip!("redis-server");
    let dir = tempfile::tempdir().unwrap();
    common::dev_cert(dir.path());
    let redis = Redis::start(dir.path());
    let sink = common::demo_smtp().await.1;
    let y = cfg(
        dir.path(),
        &sink,
        "      - { key: [ip], concurrent: 3, action: reject }",
        &state(&redis, "t-conc:", ""),
    );
    let (a, b) = pair(&y).await;
    let mut held = Vec::new();
    for gw in [&a, &b, &a] {
        let (g, c) = greeting(gw, "127.0.0.4").await;
        assert!(g.starts_with("220"), "{g}");
        held.push(c);
    }
    for gw in [&a, &b] {
        let (g, _c) = greeting(gw, "127.0.0.4").await;
        assert!(g.starts_with("554 5.7.1"), "fourth, on either: {g}");
    }
    let (g, _other) = greeting(&b, "127.0.0.5").await;
    assert!(g.starts_with("220"), "other IP unaffected");
    let mut first = held.remove(0);
    assert!(first.cmd("QUIT").await.starts_with("221"));
    drop(first);
    let mut ok = false;
    for _ in 0..50 {
        let (g, c) = greeting(&b, "127.0.0.4").await;
        if g.starts_with("220") {
            ok = true;
            held.push(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "the slot given back on a is free on b");
}

async fn tls_session(gw: &Gateway, ca: &Path, src: &str) -> SmtpClient<Tls> {
    let c = SmtpClient::connect_from(src, gw.addr("sub").unwrap()).await;
    let mut t = c.tls(ca).await;
    assert!(t.text().await.starts_with("220"));
    let ehlo = t.cmd("EHLO c.test").await;
    assert!(
        ehlo.lines().last().unwrap_or_default().starts_with("250 "),
        "{ehlo}"
    );
    t
}

const GOOD: &str = "AUTH PLAIN AGFsaWNlAHNlY3JldA=="; // alice / secret
const BAD: &str = "AUTH PLAIN AGFsaWNlAHdyb25n"; // alice / wrong

async fn auth_backend() -> common::Running {
    common::SmtpBackend::new()
        .on(
            "EHLO",
            "250-legacy\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n",
        )
        .on_line(GOOD, "235 2.7.0 ok\r\n")
        .on("AUTH", "535 5.7.8 no\r\n")
        .start()
        .await
}

fn attempts(backend: &common::Running) -> usize {
    backend
        .lines()
        .iter()
        .filter(|l| l.starts_with("AUTH PLAIN "))
        .count()
}

/// Acceptance 1c/1d: 5 failed logins spread over both instances lock the IP
/// on both; a known-good network learnt on one spares the user's per-user
/// lock on the other.
#[tokio::test]
async fn failed_logins_and_known_good_are_shared() {
    require_or_skip!("redis-server");
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = common::dev_cert(dir.path());
    let redis = Redis::start(dir.path());
    let be = auth_backend().await;
    let limits = "      - { name: auth-ip, key: [ip], auth_failures: 5/15minutes, action: reject }\n      - { name: auth-user, key: [auth_user], auth_failures: 5/15minutes, action: tempfail }";
    let (a, b) = pair(&cfg(
        dir.path(),
        &be.addr,
        limits,
        &state(&redis, "t-auth:", ""),
    ))
    .await;

    // alice logs in from her usual network, on a
    let mut home = tls_session(&a, &ca, "127.0.0.20").await;
    assert!(home.cmd(GOOD).await.starts_with("235"));
    drop(home);

    let mut on_a = tls_session(&a, &ca, "127.0.2.66").await;
    let mut on_b = tls_session(&b, &ca, "127.0.2.66").await;
    for i in 0..5 {
        let s = if i % 2 == 0 { &mut on_a } else { &mut on_b };
        let r = s.cmd(BAD).await;
        assert!(r.starts_with("535 5.7.8"), "failure {i}: {r}");
    }
    assert_eq!(attempts(&be), 6);
    for gw in [&a, &b] {
        let mut s = tls_session(gw, &ca, "127.0.2.66").await;
        let r = s.cmd(GOOD).await;
        assert!(r.starts_with("535 5.7.8"), "locked IP on both: {r}");
    }
    assert_eq!(attempts(&be), 6, "no attempt reached the backend");

    // alice's per-user lock (her 5 failures) holds on b from a new network ...
    let mut fresh = tls_session(&b, &ca, "127.0.1.77").await;
    let r = fresh.cmd(GOOD).await;
    assert!(r.starts_with("454 4.7.0"), "per-user lock on b: {r}");
    // ... but not from the network a learnt as known-good
    let mut home = tls_session(&b, &ca, "127.0.0.20").await;
    let r = home.cmd(GOOD).await;
    assert!(
        r.starts_with("235"),
        "known-good network learnt on a, on b: {r}"
    );
}

/// Bans are shared (issue 14's bans with issue 15's store): failed logins
/// spread over both instances reach a ban rule's count; the client is then
/// refused before the greeting on both (the other instance learns the ban
/// from the store at connect), until `ban_for` ends.
#[tokio::test]
async fn bans_are_shared_across_two_instances() {
    require_or_skip!("redis-server");
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = common::dev_cert(dir.path());
    let redis = Redis::start(dir.path());
    let be = auth_backend().await;
    let limits =
        "      - { name: guess, key: [ip], auth_failures: 4/15minutes, action: ban, ban_for: 3s }";
    let (a, b) = pair(&cfg(
        dir.path(),
        &be.addr,
        limits,
        &state(&redis, "t-ban:", "  timeout: 1s\n"),
    ))
    .await;
    let mut on_a = tls_session(&a, &ca, "127.0.3.9").await;
    let mut on_b = tls_session(&b, &ca, "127.0.3.9").await;
    for i in 0..4 {
        let s = if i % 2 == 0 { &mut on_a } else { &mut on_b };
        let r = s.cmd(BAD).await;
        assert!(r.starts_with("535 5.7.8"), "failure {i}: {r}");
    }
    // the 4th failure (on b) banned the client; a learns it from the store
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (name, gw) in [("a", &a), ("b", &b)] {
        let (text, _c) = greeting(gw, "127.0.3.9").await;
        assert!(
            text.starts_with("554 5.7.1 Access denied: address banned"),
            "banned on {name}: {text}"
        );
    }
    let (text, _c) = greeting(&a, "127.0.3.10").await;
    assert!(text.starts_with("220"), "another client: {text}");
    tokio::time::sleep(Duration::from_millis(3200)).await;
    for (name, gw) in [("a", &a), ("b", &b)] {
        let (text, _c) = greeting(gw, "127.0.3.9").await;
        assert!(text.starts_with("220"), "ban over on {name}: {text}");
    }
}

/// The admin token of the lift tests.
const TOKEN: &str = "s3cret-t0ken-for-lifting-bans";

/// A `metrics:` section with lifting on: [`TOKEN`] written to `dir`.
fn lifting_metrics(dir: &Path) -> String {
    let file = dir.join("admin.token");
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    format!(
        "metrics: {{ bind: \"127.0.0.1:0\", admin_token_file: \"{}\" }}\n",
        file.display()
    )
}

/// `DELETE /bans/<address>` on `gw` with [`TOKEN`]: (status, body).
async fn lift(gw: &Gateway, address: &str) -> (u16, String) {
    let del = format!("DELETE /bans/{address} HTTP/1.1\r\nAuthorization: Bearer {TOKEN}");
    common::http(gw.metrics_addr().unwrap(), &del).await
}

/// `DELETE /bans/<address>` on an instance that never saw the client lifts
/// the ban another instance wrote to the store, and says so (200, lifted 1;
/// it answered 404, though the store's copy went too); that instance then
/// greets the client. With the store down the lift answers 503: other
/// instances may still learn the ban from it.
#[tokio::test]
async fn a_ban_held_only_in_the_store_is_lifted_and_counted() {
    require_or_skip!("redis-server");
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = common::dev_cert(dir.path());
    let mut redis = Redis::start(dir.path());
    let be = auth_backend().await;
    let limits =
        "      - { name: guess, key: [ip], auth_failures: 2/15minutes, action: ban, ban_for: 1h }";
    let yaml = format!(
        "{}{}",
        cfg(dir.path(), &be.addr, limits, &state(&redis, "t-lift:", "")),
        lifting_metrics(dir.path())
    );
    let (a, b) = pair(&yaml).await;
    let mut on_b = tls_session(&b, &ca, "127.0.3.19").await;
    for i in 0..2 {
        let r = on_b.cmd(BAD).await;
        assert!(r.starts_with("535 5.7.8"), "failure {i}: {r}");
    }
    // b writes its ban to the store in the background
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, body) = lift(&a, "127.0.3.19").await;
    assert_eq!((code, body.as_str()), (200, "{\"lifted\":1}"));
    let (text, _c) = greeting(&a, "127.0.3.19").await;
    assert!(text.starts_with("220"), "lifted in the store: {text}");
    let (code, body) = lift(&a, "127.0.3.19").await;
    assert_eq!(code, 404, "nothing left: {body}");
    redis.kill();
    let (code, body) = lift(&a, "127.0.3.19").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("other instances may still refuse"), "{body}");
}

/// One address, two bans lifted: this instance's own (`2001:db8::/64`,
/// already gone from the store: another instance lifted it there) and
/// another instance's `/128` that only the store holds. The answer counts
/// both (the larger of the two counts said 1).
#[tokio::test]
async fn a_lift_counts_the_bans_of_both_the_instance_and_the_store() {
    require_or_skip!("redis-server");
    let dir = tempfile::tempdir().unwrap();
    common::dev_cert(dir.path());
    let redis = Redis::start(dir.path());
    let limits = "      - { name: flood, key: [ip], rate: 100/minute, action: ban, ban_for: 1h }";
    let yaml = format!(
        "{}{}",
        cfg(
            dir.path(),
            "127.0.0.1:9",
            limits,
            &state(&redis, "t-lift6:", "")
        ),
        lifting_metrics(dir.path())
    );
    let gw = common::start(&yaml).await;
    let ip: std::net::IpAddr = "2001:db8::5".parse().unwrap();
    let p = gw.policy("mx").unwrap();
    let _ = p.ban(
        ip,
        "triage-pregreet",
        "talked first".into(),
        Duration::from_secs(3600),
    );
    // its copy in the store (written in the background), lifted there
    let key = keys::ttl_set("t-lift6:", "bans");
    let mut con = redis.client();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let s: Option<f64> = redis::cmd("ZSCORE")
            .arg(&key)
            .arg("2001:db8::/64")
            .query(&mut con)
            .unwrap();
        if s.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "the ban never reached the store");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _: () = redis::cmd("ZREM")
        .arg(&key)
        .arg("2001:db8::/64")
        .query(&mut con)
        .unwrap();
    let _: () = redis::cmd("HDEL")
        .arg(format!("{key}:v"))
        .arg("2001:db8::/64")
        .query(&mut con)
        .unwrap();
    // another instance's ban of the address itself
    let store = Store::connect(&settings(&redis, "t-lift6:")).unwrap();
    store
        .ttl_set_put(
            "bans",
            "2001:db8::5/128",
            "p\u{1f}other\u{1f}x",
            Duration::from_secs(3600),
            100,
        )
        .await
        .unwrap();
    let (code, body) = lift(&gw, "2001:db8::5").await;
    assert_eq!((code, body.as_str()), (200, "{\"lifted\":2}"));
}

/// The triage pass cache is shared (issue 14's cache with issue 15's
/// store): a client that passed on one instance is greeted untested by the
/// other (no DNS query, no held greeting); a listed one is tested on both.
#[tokio::test]
async fn triage_passes_are_shared_across_two_instances() {
    require_or_skip!("redis-server");
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    let mut zone = dns::Zone::new();
    zone.add_a(
        "5.4.0.127.bl.nosoa.test",
        std::net::Ipv4Addr::new(127, 0, 0, 2),
    );
    let dns = dns::TestDns::start(zone).await;
    let (_mailbox, backend) = common::demo_smtp().await;
    let y = Yaml::new()
        .section(&format!(
            "dns: {{ nameservers: [\"{}\"], timeout: 1s, attempts: 1 }}",
            dns.addr
        ))
        .listener("mx", "smtp", "none", "policy: p")
        .backend("b", &backend, "")
        .section("policies:\n  p:\n    triage:\n      dnsbl: [ { zone: bl.nosoa.test } ]\n      pregreet: { wait: 300ms, action: reject }\n      cache: 1h\n")
        .section(&state(&redis, "t-pass:", ""))
        .build();
    let (a, b) = pair(&y).await;
    let queries = |c: &str| {
        dns.queries()
            .iter()
            .filter(|(n, _)| n.starts_with(c))
            .count()
    };
    // a passing client: tested on a (held greeting, one query) ...
    let (text, _c) = greeting(&a, "127.0.4.4").await;
    assert!(text.starts_with("220-"), "tested on a: {text}");
    assert_eq!(queries("4.4.0.127."), 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ... and greeted at once on b: the pass came from the store
    let (text, _c) = greeting(&b, "127.0.4.4").await;
    assert_eq!(text, "220 gw.test ESMTP mailgate\n", "untested on b");
    assert_eq!(queries("4.4.0.127."), 1, "no new lookup on b");
    // a listed client is refused on a and not remembered: tested on b too
    for (name, gw) in [("a", &a), ("b", &b)] {
        // the held greeting is completed, then the refusal
        let (_, mut c) = greeting(gw, "127.0.4.5").await;
        let refusal = c.text().await;
        assert!(
            refusal.starts_with("554 5.7.1"),
            "listed on {name}: {refusal}"
        );
    }
    assert_eq!(queries("5.4.0.127."), 2);
}

/// A `mailgate run` child on `dir/child.yaml`, logging JSON to `dir/child.log`.
fn spawn_child(dir: &Path, yaml: &str) -> (Guard, std::net::SocketAddr) {
    std::fs::write(dir.join("child.yaml"), yaml).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_mailgate"))
        .args(["--log-format", "json", "run", "--config"])
        .arg(dir.join("child.yaml"))
        .stdout(std::fs::File::create(dir.join("child.log")).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let guard = Guard(child);
    let addrs = common::listening(&dir.join("child.log"), &["mx"]);
    (guard, addrs["mx"])
}

/// Acceptance 2: an instance holding 3 sessions is killed with SIGKILL: its
/// leases expire within the lease TTL, and the other instance admits new
/// sessions from that address again.
#[tokio::test]
async fn killed_instance_leases_expire() {
    require_or_skip!("redis-server");
    let dir = tempfile::tempdir().unwrap();
    common::dev_cert(dir.path());
    let redis = Redis::start(dir.path());
    let sink = common::demo_smtp().await.1;
    let lease_ttl = Duration::from_secs(2);
    let y = cfg(
        dir.path(),
        &sink,
        "      - { key: [ip], concurrent: 3, action: reject }",
        &state(&redis, "t-kill:", "  lease_ttl: 2s\n"),
    );
    let (child, child_mx) = spawn_child(dir.path(), &y);
    let survivor = common::start(&y).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = SmtpClient::connect_from("127.0.0.9", child_mx).await;
        let g = c.text().await;
        assert!(g.starts_with("220"), "{g}");
        held.push(c);
    }
    // the child's leases are renewed: they outlive one lease TTL
    tokio::time::sleep(lease_ttl + Duration::from_millis(500)).await;
    let (g, _c) = greeting(&survivor, "127.0.0.9").await;
    assert!(
        g.starts_with("554 5.7.1"),
        "3 leases held by the child: {g}"
    );

    drop(child); // SIGKILL: no lease is given back
    let killed = Instant::now();
    let mut admitted = None;
    while killed.elapsed() < lease_ttl + Duration::from_secs(3) {
        let (g, c) = greeting(&survivor, "127.0.0.9").await;
        if g.starts_with("220") {
            admitted = Some((killed.elapsed(), c));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (after, _c) = admitted.expect("admitted again after the lease TTL");
    assert!(
        after <= lease_ttl + Duration::from_millis(500),
        "leases expired within the lease TTL (+ one poll): {after:?}"
    );
    drop(held);
}

fn fallbacks() -> u64 {
    let text = mailgate::observe::metrics().encode();
    text.lines()
        .find(|l| l.starts_with("mailgate_state_store_fallbacks_total{mode=\"local\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// The time from connect to the greeting's first line, and that line.
async fn timed_greeting(gw: &Gateway, src: &str) -> (Duration, String) {
    let t0 = Instant::now();
    let (g, _c) = greeting(gw, src).await;
    (t0.elapsed(), g)
}

/// `state.timeout` of the outage test, and what a greeting may take beyond
/// it on a loaded test machine.
const TIMEOUT: Duration = Duration::from_millis(250);
const MARGIN: Duration = Duration::from_millis(250);

/// Acceptance 3: the store is killed mid-run: sessions go on under the
/// in-process limits without waiting longer than `timeout`, the fallback
/// metric moves and readiness says degraded; once the store is back on its
/// port, limits are shared again without a restart.
#[tokio::test]
async fn store_outage_falls_back_to_local_and_recovers() {
    require_or_skip!("redis-server");
    let dir = tempfile::tempdir().unwrap();
    common::dev_cert(dir.path());
    let mut redis = Redis::start(dir.path());
    let sink = common::demo_smtp().await.1;
    let y = cfg(
        dir.path(),
        &sink,
        "      - { key: [ip], rate: 4/minute, burst: 4, action: tempfail }",
        &format!(
            "{}metrics:\n  bind: \"127.0.0.1:0\"\n",
            state(
                &redis,
                "t-down:",
                &format!("  timeout: {}ms\n", TIMEOUT.as_millis())
            )
        ),
    );
    let (a, b) = pair(&y).await;
    let shared = |src: &'static str| {
        let (a, b) = (&a, &b);
        async move {
            for gw in [a, b, a, b] {
                let (g, _c) = greeting(gw, src).await;
                assert!(g.starts_with("220"), "{src}: {g}");
            }
            let (g, _c) = greeting(a, src).await;
            assert!(g.starts_with("421"), "{src}: the fifth, shared: {g}");
        }
    };
    shared("127.0.0.30").await;

    redis.kill();
    let before = fallbacks();
    // the in-process limit of each instance: 4 each, no stall
    for gw in [&a, &b] {
        for i in 0..4 {
            let (took, g) = timed_greeting(gw, "127.0.0.31").await;
            assert!(g.starts_with("220"), "local limit, {i}: {g}");
            assert!(took < TIMEOUT + MARGIN, "no stall past timeout: {took:?}");
        }
        let (took, g) = timed_greeting(gw, "127.0.0.31").await;
        assert!(g.starts_with("421"), "local limit, fifth: {g}");
        assert!(took < TIMEOUT + MARGIN, "{took:?}");
    }
    assert!(fallbacks() >= before + 10, "fallbacks counted");
    let store = a.policy_state.store().unwrap().clone();
    assert!(store.degraded());
    let (code, body) = http_get(a.metrics_addr().unwrap(), "/readyz").await;
    assert_eq!(
        code, 200,
        "a degraded store does not fail readiness: {body}"
    );
    assert!(body.contains("degraded: state store unreachable"), "{body}");

    redis.restart(dir.path());
    // the next call after the backoff finds it back (at most 5 s)
    let back = Instant::now();
    for gw in [&a, &b] {
        let store = gw.policy_state.store().unwrap();
        while store.ping().await.is_err() {
            assert!(back.elapsed() < Duration::from_secs(15), "store never back");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    shared("127.0.0.32").await;
}

fn settings(redis: &Redis, prefix: &str) -> StoreSettings {
    StoreSettings {
        url: redis.url(),
        password: None,
        prefix: prefix.into(),
        timeout: Duration::from_millis(500),
        on_unavailable: mailgate::state::OnUnavailable::Local,
        lease_ttl: Duration::from_secs(5),
    }
}

/// The store script against a real redis: GCRA admits the burst and says
/// how long to wait; a stopping op gives back the leases its call took;
/// failure windows lock and known-good spares; TTL sets (for bans and the
/// allowlist) keep values until their TTL; every key has a TTL.
#[tokio::test]
async fn store_script_against_a_real_redis() {
    require_or_skip!("redis-server");
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    let store: std::sync::Arc<Store> = Store::connect(&settings(&redis, "t-ops:")).unwrap();
    let rate = Op::Rate {
        key: "t-ops:r:x".into(),
        per_cell: Duration::from_secs(1),
        burst_time: Duration::from_secs(3),
        stop: true,
    };
    for i in 0..3 {
        assert_eq!(
            store.run(std::slice::from_ref(&rate), "t").await.unwrap(),
            vec![Answer::Ok],
            "{i}"
        );
    }
    match store
        .run(std::slice::from_ref(&rate), "t")
        .await
        .unwrap()
        .as_slice()
    {
        [Answer::Wait(w)] => assert!(
            *w > Duration::from_millis(900) && *w <= Duration::from_secs(1),
            "{w:?}"
        ),
        other => panic!("{other:?}"),
    }

    // a stop gives back the leases of its call; later ops do not run
    let lease = |key: &str, max| Op::Lease {
        key: key.into(),
        max,
        stop: true,
    };
    let answers = store
        .run(
            &[lease("t-ops:c:a", 5), lease("t-ops:c:b", 0), rate.clone()],
            "tok1",
        )
        .await
        .unwrap();
    assert_eq!(answers, vec![Answer::Ok, Answer::Full]);
    let mut con = redis.client();
    let n: u64 = redis::cmd("ZCARD")
        .arg("t-ops:c:a")
        .query(&mut con)
        .unwrap();
    assert_eq!(n, 0, "rolled back");
    assert_eq!(
        store.run(&[lease("t-ops:c:a", 1)], "tok2").await.unwrap(),
        vec![Answer::Ok]
    );
    assert_eq!(
        store.run(&[lease("t-ops:c:a", 1)], "tok3").await.unwrap(),
        vec![Answer::Full]
    );

    // failure windows and known-good networks
    let fail = Op::Fail {
        key: "t-ops:f:u".into(),
        max: 3,
        window: Duration::from_secs(60),
    };
    for _ in 0..5 {
        store
            .run(std::slice::from_ref(&fail), &store.token())
            .await
            .unwrap();
    }
    let n: u64 = redis::cmd("ZCARD")
        .arg("t-ops:f:u")
        .query(&mut con)
        .unwrap();
    assert_eq!(n, 3, "only the newest `max` failures are kept");
    let locked = |spare| Op::Locked {
        key: "t-ops:f:u".into(),
        max: 3,
        window: Duration::from_secs(60),
        stop: true,
        spare_if_good: spare,
    };
    match store.run(&[locked(true)], "t").await.unwrap().as_slice() {
        [Answer::Wait(w)] => assert!(*w > Duration::from_secs(58), "{w:?}"),
        other => panic!("{other:?}"),
    }
    let good = Op::KnownGood {
        key: "t-ops:g:alice".into(),
        trust: Duration::from_secs(60),
    };
    store
        .run(
            &[Op::Remember {
                key: "t-ops:g:alice".into(),
                ttl: Duration::from_secs(60),
            }],
            "t",
        )
        .await
        .unwrap();
    assert_eq!(
        store.run(&[good.clone(), locked(true)], "t").await.unwrap(),
        vec![Answer::Good, Answer::Spared]
    );
    match store
        .run(&[good, locked(false)], "t")
        .await
        .unwrap()
        .as_slice()
    {
        [Answer::Good, Answer::Wait(_)] => {}
        other => panic!("a lock keyed by more than the user is not spared: {other:?}"),
    }

    // TTL sets: what bans and the triage allowlist stand on
    store
        .ttl_set_put(
            "bans",
            "192.0.2.1",
            "brute force",
            Duration::from_secs(30),
            100,
        )
        .await
        .unwrap();
    store
        .ttl_set_put("bans", "192.0.2.2", "spam", Duration::from_millis(200), 100)
        .await
        .unwrap();
    let (why, left) = store
        .ttl_set_get("bans", "192.0.2.1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(why, "brute force");
    assert!(left > Duration::from_secs(29) && left <= Duration::from_secs(30));
    assert_eq!(store.ttl_set_list("bans", 10).await.unwrap().len(), 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        store.ttl_set_get("bans", "192.0.2.2").await.unwrap(),
        None,
        "expired"
    );
    let list = store.ttl_set_list("bans", 10).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(
        (list[0].0.as_str(), list[0].1.as_str()),
        ("192.0.2.1", "brute force")
    );
    store.ttl_set_remove("bans", "192.0.2.1").await.unwrap();
    assert_eq!(store.ttl_set_get("bans", "192.0.2.1").await.unwrap(), None);
    store
        .ttl_set_put("bans", "192.0.2.3", "x", Duration::from_secs(30), 100)
        .await
        .unwrap();
    // a removal says whether a live member went (the ban lift's count)
    store
        .ttl_set_put("bans", "192.0.2.4", "x", Duration::from_secs(30), 100)
        .await
        .unwrap();
    let remove = |member: &str| Op::SetRemove {
        key: keys::ttl_set("t-ops:", "bans"),
        member: member.into(),
    };
    for (member, want) in [
        ("192.0.2.4", Answer::Removed),
        ("192.0.2.4", Answer::Ok),
        ("192.0.2.2", Answer::Ok),
    ] {
        let got = store.run(&[remove(member)], "t").await.unwrap();
        assert_eq!(got, vec![want], "{member}");
    }

    let all: Vec<String> = redis::cmd("KEYS").arg("t-ops:*").query(&mut con).unwrap();
    assert!(all.len() >= 5, "{all:?}");
    for k in all {
        let ttl: i64 = redis::cmd("PTTL").arg(&k).query(&mut con).unwrap();
        assert!(ttl > 0, "{k} has no TTL ({ttl})");
    }
    // the key names the policy uses are the ones `keys` builds
    assert!(keys::ttl_set("t-ops:", "bans").starts_with("t-ops:s:"));
}

/// A `shadow: true` ban rule only observes: when it fires in the store
/// script it must not end the call there, or the enforced rules after it
/// are never charged (in process they are: `evaluate.rs` goes on after a
/// shadowed hit).
#[tokio::test]
async fn shadow_ban_rule_does_not_skip_the_rules_after_it() {
    require_or_skip!("redis-server");
    let dir = tempfile::tempdir().unwrap();
    common::dev_cert(dir.path());
    let redis = Redis::start(dir.path());
    let sink = common::demo_smtp().await.1;
    let y = cfg(
        dir.path(),
        &sink,
        "      - { name: watch, key: [ip], rate: 1/minute, burst: 1, action: ban, ban_for: 1h, shadow: true }\n      - { name: cap, key: [ip], rate: 2/minute, burst: 2, action: tempfail }",
        &state(&redis, "t-shadow:", ""),
    );
    let gw = common::start(&y).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        let (g, _c) = greeting(&gw, "127.0.5.1").await;
        got.push(g[..3].to_string());
    }
    assert_eq!(
        got,
        ["220", "220", "421", "421"],
        "cap holds behind the shadow rule"
    );
}

/// `rcpt_refusals` is counted in process (README: not shared), and must
/// still refuse when the RCPT stage also has a shared rate rule: the stage
/// then goes to the store, and the in-process rules of the stage must be
/// decided beside the store's answers, not dropped.
#[tokio::test]
async fn rcpt_refusals_hold_beside_shared_rates() {
    require_or_skip!("redis-server");
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    let smtp = common::SmtpBackend::new()
        .on("RCPT", "550 5.1.1 no such user\r\n")
        .start()
        .await;
    let gw = Yaml::new()
        .listener_to("mx", "smtp", "none", "s", "require_tls: false, policy: p")
        .backend("s", &smtp.addr, "")
        .section("policies:\n  p:\n    limits:\n      - { name: harvest, key: [ip], rcpt_refusals: 2/10minutes, action: reject }\n      - { name: rcpts, key: [ip], recipients: 100/hour, action: tempfail }")
        .section(&state(&redis, "t-refusals:", ""))
        .start()
        .await;
    let mut c = SmtpClient::connect_from("127.0.5.2", gw.addr("mx").unwrap()).await;
    c.expect(220).await;
    assert!(c.cmd("EHLO harvester.test").await.starts_with("250"));
    assert!(c.cmd("MAIL FROM:<a@example.org>").await.starts_with("250"));
    for i in 0..2 {
        let r = c.cmd(&format!("RCPT TO:<guess{i}@example.net>")).await;
        assert_eq!(r, "550 5.1.1 no such user\n", "the backend's refusal");
    }
    let r = c.cmd("RCPT TO:<guess2@example.net>").await;
    assert_eq!(r, "550 5.7.1 Refused by local policy\n", "harvest refuses");
    let rcpts = smtp
        .lines()
        .iter()
        .filter(|l| l.starts_with("RCPT"))
        .count();
    assert_eq!(rcpts, 2, "the third was not relayed");
}

/// A ban rule may count IPv6 clients by any `ipv6_prefix` (here /60): the
/// other instance must find that ban in the store for another address of
/// the network, or the banned network just moves to that instance.
#[tokio::test]
async fn shared_ban_of_a_configured_ipv6_prefix_is_found() {
    use mailgate::policy::{Facts, Policies, PolicyState};
    require_or_skip!("redis-server");
    let dir = tempfile::tempdir().unwrap();
    common::dev_cert(dir.path());
    let redis = Redis::start(dir.path());
    let y = Yaml::new()
        .listener("mx", "smtp", "none", "policy: p")
        .certs(dir.path())
        .backend("b", "127.0.0.1:9", "")
        .section("policies:\n  p:\n    limits:\n      - { name: flood, key: [ip], rate: 1/minute, burst: 1, action: ban, ban_for: 1h, ipv6_prefix: 60 }")
        .build();
    let cfg = mailgate::config::load_str("t.yaml", &y).unwrap();
    let instance = || {
        let store = Store::connect(&settings(&redis, "t-v6:")).unwrap();
        let state = PolicyState::with_store(Duration::from_secs(86_400), 1000, Some(store));
        (Policies::compile(&cfg.policies, &state), state)
    };
    let ((pa, a), (_pb, b)) = (instance(), instance());
    let p = pa.get("p").unwrap();
    let ip: std::net::IpAddr = "2001:db8:1:2::7".parse().unwrap();
    for _ in 0..2 {
        let _ = p.connect_shared(&Facts::new(ip, "mx")).await;
    }
    assert!(a.bans.banned(ip, Instant::now()).is_some(), "banned on a");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let other: std::net::IpAddr = "2001:db8:1:f::9".parse().unwrap();
    let got = b.banned_shared(other).await.expect("b finds the /60 ban");
    assert_eq!(got.address(), "2001:db8:1::/60");
}

/// A trusted balancer is never banned (README, Bans), in the store either:
/// a ban rule that fires for the balancer's own address (here a direct
/// connection to a listener without PROXY) is refused as `reject` but not
/// written to the shared set, where an instance that does not list the
/// balancer among its trusted ones would learn it and refuse every client.
#[tokio::test]
async fn trusted_balancer_is_not_banned_in_the_store() {
    require_or_skip!("redis-server");
    let dir = tempfile::tempdir().unwrap();
    common::dev_cert(dir.path());
    let redis = Redis::start(dir.path());
    let sink = common::demo_smtp().await.1;
    let y = Yaml::new()
        .listener("mx", "smtp", "none", "policy: p")
        .listener(
            "lb",
            "smtp",
            "none",
            "policy: p, proxy_protocol: { trusted: [\"127.0.4.1/32\"], timeout: 2s }",
        )
        .certs(dir.path())
        .backend("b", &sink, "")
        .section(
            "policies:\n  p:\n    limits:\n      - { name: flood, key: [ip], rate: 1/minute, burst: 1, action: ban, ban_for: 1h }",
        )
        .section(&state(&redis, "t-lb:", ""))
        .build();
    let gw = common::start(&y).await;
    for src in ["127.0.4.1", "127.0.4.2"] {
        let (g, _c) = greeting(&gw, src).await;
        assert!(g.starts_with("220"), "{src} first: {g}");
        let (g, _c) = greeting(&gw, src).await;
        assert!(g.starts_with("554 5.7.1"), "{src} over the rate: {g}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut con = redis.client();
    let set = keys::ttl_set("t-lb:", "bans");
    let mut score = |m: &str| -> Option<f64> {
        redis::cmd("ZSCORE")
            .arg(&set)
            .arg(m)
            .query(&mut con)
            .unwrap()
    };
    assert!(score("127.0.4.2/32").is_some(), "a client's ban is shared");
    assert_eq!(score("127.0.4.1/32"), None, "the balancer's is not");
}

/// A shorter ban written to the store after a longer one of the same
/// network keeps the longer (README, Bans: "A new ban never shortens a
/// longer one"): an instance learning the ban must learn the longer one.
#[tokio::test]
async fn shared_ban_is_never_shortened() {
    require_or_skip!("redis-server");
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    let store: std::sync::Arc<Store> = Store::connect(&settings(&redis, "t-long:")).unwrap();
    store
        .ttl_set_put(
            "bans",
            "192.0.2.7/32",
            "long",
            Duration::from_secs(3600),
            100,
        )
        .await
        .unwrap();
    store
        .ttl_set_put("bans", "192.0.2.7/32", "short", Duration::from_secs(5), 100)
        .await
        .unwrap();
    let (why, left) = store
        .ttl_set_get("bans", "192.0.2.7/32")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(why, "long");
    assert!(left > Duration::from_secs(3590), "{left:?}");
    let mut con = redis.client();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(keys::ttl_set("t-long:", "bans"))
        .query(&mut con)
        .unwrap();
    assert!(
        ttl > 3_590_000,
        "the set lives as long as its longest member: {ttl}"
    );
    // a longer one still extends
    store
        .ttl_set_put(
            "bans",
            "192.0.2.7/32",
            "longer",
            Duration::from_secs(7200),
            100,
        )
        .await
        .unwrap();
    let (why, left) = store
        .ttl_set_get("bans", "192.0.2.7/32")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(why, "longer");
    assert!(left > Duration::from_secs(7190), "{left:?}");
}

/// The store's set of bans is bounded like the in-process list: past
/// `max` members, the others expiring soonest make room (an attacker with
/// many addresses, such as IPv6 /64s, must not grow the store for as long
/// as its bans last).
#[tokio::test]
async fn shared_bans_are_bounded() {
    require_or_skip!("redis-server");
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    let store: std::sync::Arc<Store> = Store::connect(&settings(&redis, "t-max:")).unwrap();
    for (m, secs) in [("a", 300u64), ("b", 100), ("c", 200), ("d", 3600)] {
        store
            .ttl_set_put("bans", m, "x", Duration::from_secs(secs), 3)
            .await
            .unwrap();
    }
    let mut con = redis.client();
    let set = keys::ttl_set("t-max:", "bans");
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg(&set)
        .arg(0)
        .arg(-1)
        .query(&mut con)
        .unwrap();
    assert_eq!(members, ["c", "a", "d"], "the soonest (b) made room");
    let values: u64 = redis::cmd("HLEN")
        .arg(format!("{set}:v"))
        .query(&mut con)
        .unwrap();
    assert_eq!(values, 3);
    // a new member expiring soonest still gets in: the soonest other goes
    store
        .ttl_set_put("bans", "e", "x", Duration::from_secs(50), 3)
        .await
        .unwrap();
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg(&set)
        .arg(0)
        .arg(-1)
        .query(&mut con)
        .unwrap();
    assert_eq!(members, ["e", "a", "d"]);
}

/// `on_unavailable: accept` and `tempfail` with no store at the URL (a
/// port nothing listens on; no redis-server needed): `accept` admits past
/// the limit, `tempfail` refuses every session; neither waits past
/// `timeout`.
#[tokio::test]
async fn unavailable_modes_accept_and_tempfail() {
    let dir = tempfile::tempdir().unwrap();
    common::dev_cert(dir.path());
    let sink = common::demo_smtp().await.1;
    let dead = common::free_port();
    for (mode, expect) in [("accept", "220"), ("tempfail", "421 4.7.0")] {
        let y = cfg(
            dir.path(),
            &sink,
            "      - { key: [ip], rate: 1/minute, burst: 1, action: tempfail }",
            &format!(
                "state:\n  store: redis\n  url: \"redis://127.0.0.1:{dead}/0\"\n  timeout: 50ms\n  on_unavailable: {mode}\n"
            ),
        );
        let gw = common::start(&y).await;
        for i in 0..3 {
            let (took, g) = timed_greeting(&gw, "127.0.0.40").await;
            assert!(g.starts_with(expect), "{mode}, session {i}: {g}");
            assert!(took < Duration::from_millis(300), "{mode}: {took:?}");
        }
    }
}

/// A ban lift answers within the metrics endpoint's request deadline (10 s)
/// even with `timeout: 10s` and a store that takes connections and never
/// answers: it waits for the store 5 s at most, then says 503.
#[tokio::test]
async fn a_lift_answers_in_time_when_the_store_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let mute = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = mute.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = mute.accept().await {
            held.push(s); // read nothing, answer nothing
        }
    });
    let be = common::SmtpBackend::new().start().await;
    let gw = Yaml::new()
        .listener("mx", "smtp", "none", "")
        .backend("b", &be.addr, "")
        .section(&format!(
            "state:\n  store: redis\n  url: \"redis://127.0.0.1:{port}/0\"\n  prefix: \"t-mute:\"\n  timeout: 10s\n"
        ))
        .section(&lifting_metrics(dir.path()))
        .start()
        .await;
    let t0 = Instant::now();
    let (code, body) = lift(&gw, "127.0.5.5").await;
    assert_eq!(code, 503, "{body}");
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
}
