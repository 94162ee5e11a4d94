//! What triage costs a new SMTP client
//! (`cargo bench --ignore-rust-version --bench triage`), side by side in one
//! run, with the test DNS server of `tests/dns` on loopback and the gateway
//! in-process in front of a demo backend:
//!
//! 1. greeting latency (connect → final `220 ` line read), p50 and p99, for
//!    triage off, DNSBL only (3 zones) cold (a new client address each time:
//!    pass cache and DNS cache miss) and warm (the same addresses again:
//!    cached passes), and DNSBL + pregreet (`wait` [`WAIT_MS`]) cold and warm;
//! 2. triage CPU µs per connection with a warm cache: this process's CPU
//!    time (getrusage: gateway and client together) per connection with
//!    cached passes minus the same with triage off, medians of
//!    interleaved rounds; and `PassCache::passed` alone.
//!
//! Loopback only, bounded (a few hundred connections, about 30 s), prints
//! figures and asserts nothing. Clients are 127.0.1.x / 127.0.2.x addresses.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/dns/mod.rs"]
mod dns;

use common::{SmtpClient, Yaml};
use dns::{TestDns, Zone};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Connections per latency case (one client address each).
const CLIENTS: u8 = 200;
/// Connections per case with the pregreet wait (each waits it when cold).
const PREGREET_CLIENTS: u8 = 60;
const WAIT_MS: u64 = 100;
/// CPU rounds (each: `CPU_CONNECTIONS` with triage off, then warm).
const CPU_ROUNDS: usize = 5;
const CPU_CONNECTIONS: usize = 200;

const ZONES: [&str; 3] = ["a.bench.test", "b.bench.test", "c.bench.test"];

/// Every client is on no list, except that `a` lists 127.0.9.x (unused
/// here): the zones answer NXDOMAIN, the common case.
fn zone() -> Zone {
    let mut z = Zone::new();
    z.add_a(
        "1.9.0.127.a.bench.test",
        std::net::Ipv4Addr::new(127, 0, 0, 2),
    );
    z
}

async fn gateway(dns: &TestDns, policy: &str) -> common::Gateway {
    let (_mailbox, backend) = common::demo_smtp().await;
    Yaml::new()
        .section(&format!(
            "dns: {{ nameservers: [\"{}\"], timeout: 1s, attempts: 1 }}",
            dns.addr
        ))
        .listener("mx", "smtp", "none", "policy: p")
        .backend("b", &backend, "")
        .section(&format!("policies:\n  p:\n{policy}"))
        .start()
        .await
}

fn dnsbl() -> String {
    let zones: Vec<String> = ZONES
        .iter()
        .map(|z| format!("        - {{ zone: {z}, weight: 1 }}\n"))
        .collect();
    format!(
        "    triage:\n      dnsbl:\n{}      threshold: 2\n      action: reject\n      cache: 1h\n",
        zones.concat()
    )
}

/// Connect from `src` until the whole greeting is read, then QUIT.
async fn greeting(gw: &common::Gateway, src: &str) -> Duration {
    let t = Instant::now();
    let mut c = SmtpClient::connect_from(src, gw.addr("mx").unwrap()).await;
    c.expect(220).await;
    let took = t.elapsed();
    c.send(b"QUIT\r\n").await;
    c.expect(221).await;
    took
}

/// p50 and p99 of greetings from 127.0.`net`.1 … `n`.
async fn latencies(gw: &common::Gateway, net: u8, n: u8) -> (Duration, Duration) {
    let mut v = Vec::with_capacity(n as usize);
    for host in 1..=n {
        v.push(greeting(gw, &format!("127.0.{net}.{host}")).await);
    }
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

fn cpu() -> Duration {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes the struct we pass.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut r) };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(r.ru_utime) + tv(r.ru_stime)
}

/// CPU per connection for `n` connections from one (cached) address.
async fn cpu_per_connection(gw: &common::Gateway, src: &str, n: usize) -> Duration {
    let c0 = cpu();
    for _ in 0..n {
        greeting(gw, src).await;
    }
    (cpu() - c0) / n as u32
}

fn show(label: &str, (p50, p99): (Duration, Duration)) {
    println!(
        "  {label:<34} p50 {:>8.2} ms   p99 {:>8.2} ms",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dns = TestDns::start(zone()).await;
    let off = gateway(&dns, "    limits: []\n").await;
    let on = gateway(&dns, &dnsbl()).await;
    let pregreet = gateway(
        &dns,
        &format!(
            "{}      pregreet: {{ wait: {WAIT_MS}ms, action: reject }}\n",
            dnsbl()
        ),
    )
    .await;

    println!("greeting latency, connect → final 220 line (loopback, sequential):");
    // warm-up of the runtime and the sockets
    latencies(&off, 3, 20).await;
    show("triage off", latencies(&off, 1, CLIENTS).await);
    dns.clear_log();
    show(
        &format!("dnsbl ({} zones), cold", ZONES.len()),
        latencies(&on, 1, CLIENTS).await,
    );
    let queries = dns.queries().len();
    show(
        &format!("dnsbl ({} zones), warm (cached)", ZONES.len()),
        latencies(&on, 1, CLIENTS).await,
    );
    println!(
        "    DNS queries: {queries} cold ({} clients × {} zones), {} warm",
        CLIENTS,
        ZONES.len(),
        dns.queries().len() - queries
    );
    show(
        &format!("dnsbl + pregreet {WAIT_MS}ms, cold"),
        latencies(&pregreet, 2, PREGREET_CLIENTS).await,
    );
    show(
        &format!("dnsbl + pregreet {WAIT_MS}ms, warm"),
        latencies(&pregreet, 2, PREGREET_CLIENTS).await,
    );
    show("triage off (again)", latencies(&off, 1, CLIENTS).await);

    // CPU: interleaved rounds, one cached address for `on`
    greeting(&on, "127.0.4.1").await;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..CPU_ROUNDS {
        b.push(cpu_per_connection(&off, "127.0.4.1", CPU_CONNECTIONS).await);
        a.push(cpu_per_connection(&on, "127.0.4.1", CPU_CONNECTIONS).await);
    }
    a.sort();
    b.sort();
    let (warm, base) = (a[CPU_ROUNDS / 2], b[CPU_ROUNDS / 2]);
    println!(
        "CPU per connection (process: gateway + client), median of {CPU_ROUNDS} × {CPU_CONNECTIONS}: \
         triage warm {:.1} µs, off {:.1} µs, triage adds {:.1} µs",
        warm.as_secs_f64() * 1e6,
        base.as_secs_f64() * 1e6,
        (warm.as_secs_f64() - base.as_secs_f64()) * 1e6
    );

    // the cache lookup alone
    let cache = mailgate::triage::PassCache::new(Duration::from_secs(3600), 100_000);
    let now = std::time::Instant::now();
    for i in 0..100_000u32 {
        cache.remember(IpAddr::from(std::net::Ipv6Addr::from(u128::from(i))), now);
    }
    let n = 1_000_000u32;
    let t = Instant::now();
    let mut hits = 0u32;
    for i in 0..n {
        let ip = IpAddr::from(std::net::Ipv6Addr::from(u128::from(i % 100_000)));
        hits += u32::from(cache.passed(ip, now));
    }
    println!(
        "PassCache::passed with 100,000 entries: {:.0} ns per lookup ({hits} hits)",
        t.elapsed().as_secs_f64() * 1e9 / f64::from(n)
    );
}
