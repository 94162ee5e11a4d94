//! What SPF/DKIM/DMARC checking adds to a message's end-of-DATA → reply
//! latency (`cargo bench --ignore-rust-version --bench auth_latency`): the
//! gateway in-process in front of the demo backend, a DKIM-signed message
//! (`tests/data/dkim/dkimpy/rfc6376.signed.rsa.msg`) sent 30 times through a
//! listener with all checks on (warm DNS cache, the test DNS server of
//! `tests/dns` on loopback) and, interleaved, 30 times through the same
//! setup with no checks (the baseline). Prints both medians and the
//! difference; asserts nothing (performance is measured, not asserted).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/dns/mod.rs"]
mod dns;

use common::{SmtpClient, Yaml};
use dns::{TestDns, Zone};
use std::time::{Duration, Instant};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");
const ROUNDS: usize = 30;

fn crlf(s: &str) -> Vec<u8> {
    s.replace("\r\n", "\n").replace('\n', "\r\n").into_bytes()
}

/// The signer's SPF, DKIM key and DMARC records.
fn zone() -> Zone {
    let mut z = Zone::new();
    z.add_txt("football.example.com", "v=spf1 ip4:127.0.0.0/8 -all");
    let key = std::fs::read_to_string(format!("{DATA}/dkim/dkimpy/test.txt")).unwrap();
    z.add_txt("test._domainkey.football.example.com", key.trim());
    z.add_txt("_dmarc.football.example.com", "v=DMARC1; p=reject");
    z
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
    let dns = TestDns::start(zone()).await;
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
}
