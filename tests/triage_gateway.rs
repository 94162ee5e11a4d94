//! Triage through the gateway (issue 14, acceptance 1, 2 and 4): DNSBL/DNSWL
//! scoring against a real DNS server on loopback (tests/dns), the pregreet
//! test, the allowlist cache and `shadow`. Clients are told apart by their
//! loopback source address (127.0.0.x), looked up as `x.0.0.127.<zone>`.
//!
//! The zones carry a `nosoa` label: their "not listed" answers come without
//! SOA, so no DNS cache keeps them, and a query the pass cache saves is one
//! the test DNS server would otherwise see.

mod common;
mod dns;

use common::{SmtpClient, Yaml};
use dns::{TestDns, Zone};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

const ONE: &str = "one.nosoa.test";
const TWO: &str = "two.nosoa.test";
const WL: &str = "wl.nosoa.test";
const REFUSING: &str = "refusing.nosoa.test";

/// one (weight 1): .2 .3 .6 .12; two (weight 2): .3 .4 .6 .12; the allow list
/// (−2): .6; `refusing` answers 127.255.255.254 for .7 (weight 3: it would
/// refuse .7 if such an answer counted).
fn zone() -> Zone {
    let mut z = Zone::new();
    let listed = Ipv4Addr::new(127, 0, 0, 2);
    for c in [2, 3, 6, 12] {
        z.add_a(&format!("{c}.0.0.127.{ONE}"), listed);
    }
    for c in [3, 4, 6, 12] {
        z.add_a(&format!("{c}.0.0.127.{TWO}"), Ipv4Addr::new(127, 0, 0, 4));
    }
    z.add_a(&format!("6.0.0.127.{WL}"), listed);
    z.add_a(
        &format!("7.0.0.127.{REFUSING}"),
        Ipv4Addr::new(127, 255, 255, 254),
    );
    z
}

/// A gateway whose listener `mx` has policy `policy` with `triage` (its
/// body, indented for the policy block), DNS from `dns`.
async fn start(dns: &TestDns, policy: &str, triage: &str) -> common::Gateway {
    let (_mailbox, backend) = common::demo_smtp().await;
    Yaml::new()
        .section(&format!(
            "dns: {{ nameservers: [\"{}\"], timeout: 1s, attempts: 1 }}",
            dns.addr
        ))
        .listener("mx", "smtp", "none", &format!("policy: {policy}"))
        .backend("b", &backend, "")
        .section(&format!("policies:\n  {policy}:\n    triage:\n{triage}"))
        .start()
        .await
}

fn dnsbl() -> String {
    format!(
        "      dnsbl:\n        - {{ zone: {ONE}, weight: 1 }}\n        - {{ zone: {TWO}, weight: 2 }}\n        - {{ zone: {WL}, weight: -2 }}\n        - {{ zone: {REFUSING}, weight: 3 }}\n      threshold: 3\n"
    )
}

/// The value of one metric series (0 when absent).
fn metric(series: &str) -> u64 {
    let text = mailgate::observe::metrics().encode();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Queries the test DNS server got for client 127.0.0.`c`.
fn queries_for(dns: &TestDns, c: u8) -> usize {
    let prefix = format!("{c}.0.0.127.");
    dns.queries()
        .iter()
        .filter(|(n, _)| n.starts_with(&prefix))
        .count()
}

/// Connects from 127.0.0.`c`: the greeting (whole), or the refusal and the close.
async fn greet(gw: &common::Gateway, c: u8) -> (u16, String, SmtpClient<tokio::net::TcpStream>) {
    let mut r = SmtpClient::connect_from(&format!("127.0.0.{c}"), gw.addr("mx").unwrap()).await;
    let (code, text) = r.reply().await.expect("a greeting or a refusal");
    (code, text, r)
}

/// Acceptance 1: a listed client is refused naming the lists; weights 1 and
/// 2 with threshold 3 refuse only a client on both; an allow list (−2) lets
/// one on both through; a 127.255.255.254 answer refuses nobody and is
/// counted; a cached passing client causes no new lookup.
#[tokio::test]
async fn dnsbl_scores_refuse_listed_clients_and_cache_passes() {
    let dns = TestDns::start(zone()).await;
    let gw = start(
        &dns,
        "scored",
        &format!("{}      action: reject\n      cache: 1h\n", dnsbl()),
    )
    .await;

    // on both block lists: 1 + 2 = 3 ≥ 3
    let (code, text, mut r) = greet(&gw, 3).await;
    assert_eq!(code, 554, "{text}");
    assert!(
        text.starts_with(
            "554 5.7.1 Service unavailable; client [127.0.0.3] blocked using one.nosoa.test, two.nosoa.test"
        ),
        "{text}"
    );
    r.closed(Duration::from_secs(5)).await;

    // on one list only (1, 2): greeted, and the session works
    for c in [2, 4] {
        let (code, text, mut r) = greet(&gw, c).await;
        assert_eq!(code, 220, "127.0.0.{c}: {text}");
        assert!(r.cmd("EHLO client.test").await.starts_with("250"));
    }

    // on both and on the allow list: 3 − 2 = 1
    let (code, text, _r) = greet(&gw, 6).await;
    assert_eq!(code, 220, "allow-listed: {text}");

    // the refusing list's 127.255.255.254 is no listing
    let refused = format!(
        "mailgate_triage_zone_answers_total{{policy=\"scored\",zone=\"{REFUSING}\",result=\"list_refused\"}}"
    );
    let (code, text, _r) = greet(&gw, 7).await;
    assert_eq!(code, 220, "list_refused is not a hit: {text}");
    assert_eq!(metric(&refused), 1);

    // a client on no list: four queries the first time, none while cached
    let (code, _, _r) = greet(&gw, 9).await;
    assert_eq!(code, 220);
    assert_eq!(queries_for(&dns, 9), 4, "{:?}", dns.queries());
    let (code, _, _r) = greet(&gw, 9).await;
    assert_eq!(code, 220);
    assert_eq!(queries_for(&dns, 9), 4, "cached: no new lookup");
    assert_eq!(
        metric("mailgate_triage_cache_hits_total{policy=\"scored\"}"),
        1
    );

    // a refused client is not cached as passed: refused again
    let (code, _, _r) = greet(&gw, 3).await;
    assert_eq!(code, 554);
    assert_eq!(
        metric("mailgate_triage_hits_total{policy=\"scored\",test=\"dnsbl\",mode=\"enforced\"}"),
        2
    );
    assert!(
        metric(&format!(
        "mailgate_triage_zone_answers_total{{policy=\"scored\",zone=\"{ONE}\",result=\"listed\"}}"
    )) >= 4
    );
}

/// `action: tempfail` answers 421 4.7.0 in place of the greeting; a zone
/// that does not answer in time counts as not listed.
#[tokio::test]
async fn tempfail_and_unanswered_zones() {
    let mut z = zone();
    for c in [2, 3] {
        z.push(&format!("{c}.0.0.127.slow.nosoa.test"), dns::Entry::Timeout);
    }
    let dns = TestDns::start(z).await;
    let gw = start(
        &dns,
        "tempfailing",
        &format!(
            "      dnsbl:\n        - {{ zone: {ONE}, weight: 1 }}\n        - {{ zone: {TWO}, weight: 2 }}\n        - {{ zone: slow.nosoa.test, weight: 3 }}\n      threshold: 3\n      action: tempfail\n      timeout: 500ms\n"
        ),
    )
    .await;
    let (code, text, mut r) = greet(&gw, 3).await;
    assert_eq!(code, 421, "{text}");
    assert!(text.starts_with("421 4.7.0 "), "{text}");
    r.closed(Duration::from_secs(5)).await;
    // slow.nosoa.test does not answer: not listed, within `timeout`
    let t = Instant::now();
    let (code, text, _r) = greet(&gw, 2).await;
    assert_eq!(code, 220, "{text}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(
        metric("mailgate_triage_zone_answers_total{policy=\"tempfailing\",zone=\"slow.nosoa.test\",result=\"failed\"}"),
        2
    );
}

/// Acceptance 2: a client that sends EHLO before the final greeting line is
/// refused; a patient one is greeted after `wait` (the lookups ran during
/// it) and, once cached, at once with a one-line greeting.
#[tokio::test]
async fn pregreet_refuses_early_talkers() {
    let dns = TestDns::start(zone()).await;
    let gw = start(
        &dns,
        "pregreeting",
        &format!(
            "      dnsbl:\n        - {{ zone: {ONE}, weight: 1 }}\n      threshold: 3\n      pregreet: {{ wait: 1s, action: reject }}\n      cache: 1h\n"
        ),
    )
    .await;
    let addr = gw.addr("mx").unwrap();

    // early: EHLO right after connect, before the final line
    let mut r = SmtpClient::connect_from("127.0.0.10", addr).await;
    assert_eq!(
        r.line().await.as_deref(),
        Some("220-gw.test ESMTP mailgate")
    );
    r.send(b"EHLO early.test\r\n").await;
    // the greeting is completed, then the refusal, then the close
    assert_eq!(
        r.line().await.as_deref(),
        Some("220 gw.test ESMTP mailgate")
    );
    let refusal = r.text().await;
    assert!(refusal.starts_with("554 5.7.1 Protocol error"), "{refusal}");
    r.closed(Duration::from_secs(5)).await;

    // patient: the final line after about `wait`, then a normal session
    let t = Instant::now();
    let (code, text, mut r) = greet(&gw, 11).await;
    let waited = t.elapsed();
    assert_eq!(code, 220);
    assert_eq!(
        text,
        "220-gw.test ESMTP mailgate\n220 gw.test ESMTP mailgate\n"
    );
    assert!(
        waited >= Duration::from_millis(950) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    assert!(r.cmd("EHLO patient.test").await.starts_with("250"));
    drop(r);

    // cached: greeted at once, one line, no lookup
    let before = queries_for(&dns, 11);
    let t = Instant::now();
    let (code, text, _r) = greet(&gw, 11).await;
    assert_eq!(code, 220);
    assert_eq!(text, "220 gw.test ESMTP mailgate\n");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(queries_for(&dns, 11), before);

    // the early talker was not cached: held and refused again
    let mut r = SmtpClient::connect_from("127.0.0.10", addr).await;
    assert_eq!(
        r.line().await.as_deref(),
        Some("220-gw.test ESMTP mailgate")
    );
    r.send(b"EHLO early.test\r\n").await;
    r.expect(220).await;
    assert!(r.text().await.starts_with("554 "));
    assert_eq!(
        metric("mailgate_triage_hits_total{policy=\"pregreeting\",test=\"pregreet\",mode=\"enforced\"}"),
        2
    );
}

/// The final line waits for the lookups too (max(`wait`, lookups)): a
/// client that talks after `wait` but while a slow list still holds the
/// final line has talked before it, and is refused like one that talked
/// within `wait`.
#[tokio::test]
async fn pregreet_catches_talkers_while_lookups_hold_the_greeting() {
    let mut z = zone();
    z.push("20.0.0.127.slow.nosoa.test", dns::Entry::Timeout);
    let dns = TestDns::start(z).await;
    let gw = start(
        &dns,
        "pregreet-slow",
        "      dnsbl:\n        - { zone: slow.nosoa.test, weight: 1 }\n      threshold: 3\n      pregreet: { wait: 200ms, action: reject }\n      timeout: 1500ms\n",
    )
    .await;
    let mut r = SmtpClient::connect_from("127.0.0.20", gw.addr("mx").unwrap()).await;
    assert_eq!(
        r.line().await.as_deref(),
        Some("220-gw.test ESMTP mailgate")
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    r.send(b"EHLO late.test\r\n").await;
    assert_eq!(
        r.line().await.as_deref(),
        Some("220 gw.test ESMTP mailgate")
    );
    let refusal = r.text().await;
    assert!(refusal.starts_with("554 5.7.1 Protocol error"), "{refusal}");
}

/// Acceptance 4: with `shadow` the same clients are counted, nothing is
/// refused, and a pregreeting client's early EHLO is answered after the
/// greeting as a pipelined command. Shadowed failures are not cached.
#[tokio::test]
async fn shadow_counts_and_refuses_nobody() {
    let dns = TestDns::start(zone()).await;
    let gw = start(
        &dns,
        "shadowed",
        &format!(
            "{}      action: shadow\n      pregreet: {{ wait: 500ms, action: shadow }}\n      cache: 1h\n",
            dnsbl()
        ),
    )
    .await;
    let addr = gw.addr("mx").unwrap();

    // listed on both lists (score 3): greeted, its session works
    for _ in 0..2 {
        let (code, text, mut r) = greet(&gw, 3).await;
        assert_eq!(code, 220, "{text}");
        assert!(r.cmd("EHLO listed.test").await.starts_with("250"));
    }
    // listed and early (127.0.0.12): greeted, the early EHLO answered
    let mut r = SmtpClient::connect_from("127.0.0.12", addr).await;
    r.send(b"EHLO early.test\r\n").await;
    assert_eq!(
        r.expect(220).await,
        "220-gw.test ESMTP mailgate\n220 gw.test ESMTP mailgate\n"
    );
    assert!(r.expect(250).await.contains("gw.test"));
    assert!(r.cmd("QUIT").await.starts_with("221"));

    let series = |test: &str| {
        format!("mailgate_triage_hits_total{{policy=\"shadowed\",test=\"{test}\",mode=\"shadow\"}}")
    };
    assert_eq!(
        metric(&series("dnsbl")),
        3,
        "shadowed failures tested each time"
    );
    assert_eq!(metric(&series("pregreet")), 1);
    assert_eq!(
        metric("mailgate_triage_decisions_total{policy=\"shadowed\",verdict=\"listed\",mode=\"shadow\"}"),
        3
    );
    assert_eq!(
        metric("mailgate_triage_cache_hits_total{policy=\"shadowed\"}"),
        0
    );
}

/// On an implicit-TLS listener the test runs after the handshake, on the
/// TLS stream: the held line and the refusal arrive encrypted.
#[tokio::test]
async fn pregreet_on_implicit_tls_runs_inside_tls() {
    let dns = TestDns::start(zone()).await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, _) = common::dev_cert(dir.path());
    let (_mailbox, backend) = common::demo_smtp().await;
    let gw = Yaml::new()
        .section(&format!(
            "dns: {{ nameservers: [\"{}\"], timeout: 1s, attempts: 1 }}",
            dns.addr
        ))
        .certs(dir.path())
        .listener("smtps", "smtp", "implicit", "policy: tls_pregreet")
        .backend("b", &backend, "")
        .section("policies:\n  tls_pregreet:\n    triage:\n      pregreet: { wait: 500ms }\n")
        .start()
        .await;
    let addr = gw.addr("smtps").unwrap();
    let mut r = SmtpClient::connect_from("127.0.0.13", addr)
        .await
        .tls(&cert)
        .await;
    assert_eq!(
        r.line().await.as_deref(),
        Some("220-gw.test ESMTP mailgate")
    );
    r.send(b"EHLO early.test\r\n").await;
    r.expect(220).await;
    assert!(r.text().await.starts_with("554 5.7.1 Protocol error"));
    let mut r = SmtpClient::connect_from("127.0.0.14", addr)
        .await
        .tls(&cert)
        .await;
    assert_eq!(
        r.expect(220).await,
        "220-gw.test ESMTP mailgate\n220 gw.test ESMTP mailgate\n"
    );
    assert!(r.cmd("EHLO patient.test").await.starts_with("250"));
}

/// `action: ban`: a client the lists refuse, or one that talks before the
/// final greeting line, is refused as with `reject` and then banned on every
/// listener of the gateway (here a second SMTP listener without triage),
/// before its greeting, for `ban_for`; a client that passed is not banned.
#[tokio::test]
async fn ban_action_bans_the_client_on_every_listener() {
    let dns = TestDns::start(zone()).await;
    let (_mailbox, backend) = common::demo_smtp().await;
    let gw = Yaml::new()
        .section(&format!(
            "dns: {{ nameservers: [\"{}\"], timeout: 1s, attempts: 1 }}",
            dns.addr
        ))
        .listener("mx", "smtp", "none", "policy: banning")
        .listener("other", "smtp", "none", "")
        .backend("b", &backend, "")
        .section(&format!(
            "policies:\n  banning:\n    triage:\n{}      action: ban\n      ban_for: 2s\n      pregreet: {{ wait: 300ms, action: ban, ban_for: 2s }}\n      cache: 0s\n",
            dnsbl()
        ))
        .start()
        .await;
    let other = gw.addr("other").unwrap();
    let greets = |from: &'static str| async move {
        let mut r = SmtpClient::connect_from(from, other).await;
        r.reply().await.expect("a greeting or a refusal")
    };
    assert_eq!(greets("127.0.0.3").await.0, 220, "not banned yet");

    // listed on both block lists: refused as reject, then banned everywhere
    let mut r = SmtpClient::connect_from("127.0.0.3", gw.addr("mx").unwrap()).await;
    r.expect(220).await; // the held greeting's first line, completed
    let refusal = r.text().await;
    assert!(
        refusal.starts_with("554 5.7.1 Service unavailable; client [127.0.0.3] blocked using"),
        "{refusal}"
    );
    let (code, text) = greets("127.0.0.3").await;
    assert_eq!(code, 554, "banned on the other listener: {text}");
    assert!(text.contains("banned"), "{text}");

    // an early talker is banned too
    let mut r = SmtpClient::connect_from("127.0.0.13", gw.addr("mx").unwrap()).await;
    assert_eq!(
        r.line().await.as_deref(),
        Some("220-gw.test ESMTP mailgate")
    );
    r.send(b"EHLO early.test\r\n").await;
    r.expect(220).await;
    assert!(r.text().await.starts_with("554 5.7.1 Protocol error"));
    assert_eq!(greets("127.0.0.13").await.0, 554, "pregreet ban");

    // a patient client on one list only passes and is not banned
    let (code, _, _r) = greet(&gw, 2).await;
    assert_eq!(code, 220);
    assert_eq!(greets("127.0.0.2").await.0, 220);
    assert_eq!(
        metric("mailgate_bans_total{policy=\"banning\",rule=\"triage-dnsbl\"}"),
        1
    );
    assert_eq!(
        metric("mailgate_bans_total{policy=\"banning\",rule=\"triage-pregreet\"}"),
        1
    );

    // the bans expire after ban_for
    tokio::time::sleep(Duration::from_millis(2300)).await;
    assert_eq!(greets("127.0.0.3").await.0, 220, "ban expired");
    assert_eq!(greets("127.0.0.13").await.0, 220, "ban expired");
}
