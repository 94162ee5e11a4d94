//! What SPF/DKIM/DMARC checking costs a message
//! (`cargo bench --ignore-rust-version --bench auth_latency`), with the test
//! DNS server of `tests/dns` on loopback and a DKIM-signed message
//! (`tests/data/dkim/dkimpy/rfc6376.signed.rsa.msg`):
//!
//! 1. end-of-DATA → reply through the gateway in-process (demo backend):
//!    30 messages through a listener with all checks on (warm DNS cache),
//!    against the baseline of 30 interleaved ones through the same setup
//!    with no checks; both medians and the difference;
//! 2. the message checks alone (DKIM, ARC, DMARC on `Verifier::message`),
//!    mean of 50 with a warm DNS cache against the baseline of no cache.
//!
//! Prints figures; asserts nothing (performance is measured, not asserted).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/dns/mod.rs"]
mod dns;

use common::{SmtpClient, Yaml};
use dns::TestDns;
use mailgate::auth::{Checks, DnsSettings, Verifier};
use std::time::{Duration, Instant};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");
const ROUNDS: usize = 30;

fn crlf(s: &str) -> Vec<u8> {
    s.replace("\r\n", "\n").replace('\n', "\r\n").into_bytes()
}

/// Listener `mx` with policy body `auth`, in front of a demo backend.
async fn gateway(dns: &TestDns, auth: &str) -> common::Gateway {
    let (_mailbox, backend) = common::demo_smtp().await;
    Yaml::new()
        .section(&format!(
            "dns: {{ nameservers: [\"{}\"], timeout: 1s, attempts: 1 }}",
            dns.addr
        ))
        .listener("mx", "smtp", "none", "policy: p")
        .backend("b", &backend, "")
        .section(&format!("policies:\n  p:\n{auth}"))
        .start()
        .await
}

/// One message; the time from its last byte's write to the reply.
async fn timed(gw: &common::Gateway, msg: &[u8]) -> Duration {
    let mut c = SmtpClient::greeted(gw.addr("mx").unwrap()).await;
    c.cmd("EHLO client.football.example.com").await;
    c.cmd("MAIL FROM:<joe@football.example.com>").await;
    c.cmd("RCPT TO:<suzie@shopping.example.net>").await;
    c.cmd("DATA").await;
    let wire = mailgate::smtp::data::stuff(&[msg]);
    let t = Instant::now();
    c.send(&wire).await;
    c.expect(250).await;
    t.elapsed()
}

#[tokio::main]
async fn main() {
    let dns = TestDns::start(dns::football()).await;
    let on = gateway(
        &dns,
        "    authserv_id: gw.test\n    spf: { fail: reject, softfail: tag, none: accept, temperror: tempfail }\n    dkim: { fail: tag }\n    dmarc: { enforce: true }\n",
    )
    .await;
    let off = gateway(&dns, "    limits: []\n").await;
    let msg = crlf(
        &std::fs::read_to_string(format!("{DATA}/dkim/dkimpy/rfc6376.signed.rsa.msg")).unwrap(),
    );
    // warm the cache
    timed(&on, &msg).await;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        a.push(timed(&on, &msg).await);
        b.push(timed(&off, &msg).await);
    }
    a.sort();
    b.sort();
    let (on, off) = (a[ROUNDS / 2], b[ROUNDS / 2]);
    println!(
        "end-of-DATA → reply, median of {ROUNDS}: checks on {on:?}, off {off:?}, added {:?}",
        on.saturating_sub(off)
    );
    verifier_alone(&dns, &msg).await;
}

/// The message checks without the gateway: warm cache against no cache.
async fn verifier_alone(dns: &TestDns, msg: &[u8]) {
    let settings = |cache_entries| DnsSettings {
        nameservers: vec![dns.addr],
        timeout: Duration::from_millis(400),
        attempts: 1,
        cache_entries,
        ..Default::default()
    };
    let warm = Verifier::new(&settings(1000)).unwrap();
    let cold = Verifier::new(&settings(0)).unwrap();
    let spf = warm
        .spf(
            std::net::IpAddr::from([127, 0, 0, 1]),
            "mail.football.example.com",
            "gw.test",
            "joe@football.example.com",
        )
        .await;
    for (label, v) in [("warm cache", &warm), ("no cache", &cold)] {
        let n = 50;
        let t0 = Instant::now();
        for _ in 0..n {
            let _ = v
                .message(
                    msg,
                    spf.ip,
                    &spf.helo,
                    &spf.mail_from,
                    Some(&spf),
                    Checks::all(),
                )
                .await;
        }
        println!(
            "message checks (dkim+arc+dmarc), {label}: {:?} per message",
            t0.elapsed() / n
        );
    }
}
