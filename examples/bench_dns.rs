//! The loopback DNS server of `bench/hardening.sh`: the tests' authoritative
//! server (`tests/dns`, hickory-server, UDP and TCP on one port, TC on UDP for
//! large answers) serving generated zones for the hardening figures (issues 11
//! and 19), and counting every query it receives.
//!
//! ```text
//! cargo run --release --ignore-rust-version --example bench_dns -- --key-file dkim.b64 \
//!     --count-file count --port-file port [--big 300] [--void 200] [--selectors 2000] [--lifetime 3600]
//! ```
//! Zones (every other name: NXDOMAIN):
//! * `flood._domainkey.flood.example` and `sI._domainkey.dI.flood.example` (I below
//!   `--selectors`) TXT: `v=DKIM1; k=rsa; p=<key-file>` (a real public key, so every
//!   signature is hashed and then fails);
//! * `eN.big.example` (N in 1..=`--big`) TXT: `v=spf1` + 30,000 ` a` terms (~60 KB:
//!   UDP answers get TC, the resolver retries over TCP);
//! * `vN.void.example` (N in 1..=`--void`) TXT: `v=spf1 mx:m1.vN.void.example …
//!   mx:m10.vN.void.example -all`; each `mK.vN.void.example` has ten MX hosts
//!   `hJ.mK.vN.void.example`, which are NXDOMAIN (void lookups).
//!
//! The query count is written to `--count-file` (every 50 ms when it changed);
//! the port to `--port-file` once both sockets are bound. The server exits by
//! itself after `--lifetime` seconds.

#[path = "../tests/dns/mod.rs"]
mod dns;

use dns::{Entry, TestDns, Type, Value, Zone};
use std::time::Duration;

fn zone(key: &str, big: usize, void: usize, selectors: usize) -> Zone {
    let mut z = Zone::new();
    let dkim = format!("v=DKIM1; k=rsa; p={key}");
    z.add_txt("flood._domainkey.flood.example", &dkim);
    for i in 0..selectors {
        z.add_txt(&format!("s{i}._domainkey.d{i}.flood.example"), &dkim);
    }
    let spf = format!("v=spf1{}", " a".repeat(30_000));
    for n in 1..=big {
        z.add_txt(&format!("e{n}.big.example"), &spf);
    }
    for n in 1..=void {
        let domain = format!("v{n}.void.example");
        let mx: String = (1..=10).map(|k| format!(" mx:m{k}.{domain}")).collect();
        z.add_txt(&domain, &format!("v=spf1{mx} -all"));
        for k in 1..=10 {
            let host = format!("m{k}.{domain}");
            for j in 1..=10 {
                let target = format!("h{j}.{host}");
                z.push(&host, Entry::Rec(Type::Mx, Value::Mx(10 + j, target)));
            }
        }
    }
    z
}

#[tokio::main]
async fn main() {
    let (mut key_file, mut count_file, mut port_file) = (None, None, None);
    let (mut big, mut void, mut selectors, mut lifetime) = (300, 200, 2000, 3600);
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let v = pair.get(1).cloned().unwrap_or_default();
        let num = || v.parse::<usize>().expect("a number");
        match pair[0].as_str() {
            "--key-file" => key_file = Some(v.clone()),
            "--count-file" => count_file = Some(v.clone()),
            "--port-file" => port_file = Some(v.clone()),
            "--big" => big = num(),
            "--void" => void = num(),
            "--selectors" => selectors = num(),
            "--lifetime" => lifetime = num() as u64,
            other => panic!("unknown argument {other}"),
        }
    }
    let key = std::fs::read_to_string(key_file.expect("--key-file")).expect("key file");
    let count_file = count_file.expect("--count-file");
    let server = TestDns::start(zone(key.trim(), big, void, selectors)).await;
    std::fs::write(&count_file, "0\n").expect("count file");
    let port = server.addr.port();
    std::fs::write(port_file.expect("--port-file"), format!("{port}\n")).expect("port file");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(lifetime);
    let mut written = 0;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let n = server.log.lock().unwrap().len();
        if n != written {
            // write, then rename: a reader never sees a half-written number
            let tmp = format!("{count_file}.tmp");
            std::fs::write(&tmp, format!("{n}\n")).expect("count file");
            std::fs::rename(&tmp, &count_file).expect("count file");
            written = n;
        }
    }
}
