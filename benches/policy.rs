//! Policy engine cost, side by side in one process (`cargo bench --bench policy`):
//! CPU per MAIL+RCPT evaluation with 10 rules vs. none, and memory for 100,000
//! distinct source keys hitting a rule, and CPU per key under distinct-key
//! floods (connect rate, failed logins). Prints figures; asserts nothing.

use mailgate::action::PolicyAction;
use mailgate::policy::KeyPart;
use mailgate::policy::{Facts, Kind, Policies, PolicySpec, PolicyStage, PolicyState, RuleSpec};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn rule(name: &str, key: Vec<KeyPart>, kind: Kind) -> RuleSpec {
    RuleSpec {
        name: name.into(),
        key,
        kind,
        action: PolicyAction::Shadow,
        prefix_v4: 24,
        prefix_v6: 56,
        max_delay: Duration::from_secs(1),
        ipv6_prefix: 64,
        ban_for: None,
        shadow: false,
    }
}

fn policy(
    rules: Vec<RuleSpec>,
    max_keys: usize,
) -> (Arc<mailgate::policy::Policy>, Arc<PolicyState>) {
    let state = PolicyState::new(
        mailgate::config::defaults::KNOWN_GOOD,
        mailgate::config::defaults::MAX_TRACKED_KEYS,
    );
    let mut specs = BTreeMap::new();
    specs.insert(
        "p".to_string(),
        Arc::new(PolicySpec {
            name: "p".into(),
            deny: vec![],
            allow: vec![],
            rules,
            max_tracked_keys: max_keys,
            known_good: Duration::from_secs(3600),
            auth: None,
            dkim_sign: None,
        }),
    );
    (Policies::compile(&specs, &state).get("p").unwrap(), state)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn cpu_ns() -> u128 {
    // utime+stime of this process, in clock ticks (100 Hz) → ns
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u128 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0u128)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0u128);
    ticks * 10_000_000
}

fn per_op(p: &mailgate::policy::Policy, n: usize) -> (f64, f64) {
    let senders: Vec<String> = (0..1000)
        .map(|i| format!("user{i}@domain{}.example", i % 50))
        .collect();
    let rcpts: Vec<String> = (0..1000)
        .map(|i| format!("rcpt{i}@dest{}.example", i % 70))
        .collect();
    let (c0, t0) = (cpu_ns(), Instant::now());
    for i in 0..n {
        let mut f = Facts::new(
            IpAddr::from([10, 0, (i % 200) as u8, (i % 251) as u8]),
            "mx",
        );
        f.helo = Some("client.example");
        f.sender = Some(&senders[i % 1000]);
        std::hint::black_box(p.check(PolicyStage::Mail, &f).decision);
        f.rcpt = Some(&rcpts[(i * 7) % 1000]);
        std::hint::black_box(p.check(PolicyStage::Rcpt, &f).decision);
    }
    (
        (cpu_ns() - c0) as f64 / n as f64,
        t0.elapsed().as_nanos() as f64 / n as f64,
    )
}

fn main() {
    let n = 200_000;
    let ten = vec![
        rule(
            "conn",
            vec![KeyPart::Ip],
            Kind::Rate {
                count: 100,
                period: Duration::from_secs(60),
                burst: 100,
            },
        ),
        rule(
            "net",
            vec![KeyPart::IpPrefix],
            Kind::Rate {
                count: 1000,
                period: Duration::from_secs(60),
                burst: 1000,
            },
        ),
        rule(
            "helo",
            vec![KeyPart::Helo],
            Kind::Rate {
                count: 1000,
                period: Duration::from_secs(60),
                burst: 1000,
            },
        ),
        rule(
            "sender",
            vec![KeyPart::Sender],
            Kind::Messages {
                count: 100,
                period: Duration::from_secs(3600),
                burst: 100,
            },
        ),
        rule(
            "sdom",
            vec![KeyPart::SenderDomain],
            Kind::Messages {
                count: 500,
                period: Duration::from_secs(3600),
                burst: 500,
            },
        ),
        rule(
            "ipsender",
            vec![KeyPart::Ip, KeyPart::Sender],
            Kind::Recipients {
                count: 200,
                period: Duration::from_secs(3600),
                burst: 200,
            },
        ),
        rule(
            "rcpt",
            vec![KeyPart::Rcpt],
            Kind::Recipients {
                count: 100,
                period: Duration::from_secs(3600),
                burst: 100,
            },
        ),
        rule(
            "rdom",
            vec![KeyPart::RcptDomain],
            Kind::Recipients {
                count: 1000,
                period: Duration::from_secs(3600),
                burst: 1000,
            },
        ),
        rule("rpm", vec![KeyPart::Ip], Kind::RecipientsPerMessage(50)),
        rule(
            "lst",
            vec![KeyPart::Listener, KeyPart::SenderDomain],
            Kind::Messages {
                count: 5000,
                period: Duration::from_secs(3600),
                burst: 5000,
            },
        ),
    ];
    let (none, _) = policy(vec![], 100_000);
    let (full, _) = policy(ten, 100_000);
    // warm up both, then measure alternately
    per_op(&none, 20_000);
    per_op(&full, 20_000);
    let (c_none, w_none) = per_op(&none, n);
    let (c_full, w_full) = per_op(&full, n);
    println!("policy overhead per MAIL+RCPT ({n} pairs, same process):");
    println!("  no rules:  {:8.0} ns CPU  {:8.0} ns wall", c_none, w_none);
    println!("  10 rules:  {:8.0} ns CPU  {:8.0} ns wall", c_full, w_full);
    println!(
        "  added by 10 rules: {:.2} µs per MAIL+RCPT",
        (w_full - w_none) / 1000.0
    );

    // memory and CPU: 100,000 distinct IPv6 sources (one per /64) against a
    // connect-rate rule; with max 10,000 the flood overflows the limiter
    for max in [100_000usize, 10_000] {
        let before = rss_kib();
        let (p, state) = policy(
            vec![rule(
                "conn",
                vec![KeyPart::Ip],
                Kind::Rate {
                    count: 5,
                    period: Duration::from_secs(60),
                    burst: 5,
                },
            )],
            max,
        );
        let t0 = Instant::now();
        for i in 0..100_000u128 {
            let _ = p
                .connect(&Facts::new(
                    IpAddr::V6(Ipv6Addr::from(0x2001_0db8_u128 << 96 | i << 64)),
                    "mx",
                ))
                .decision;
        }
        let ns = t0.elapsed().as_nanos() / 100_000;
        let after = rss_kib();
        println!(
            "100,000 distinct keys, max_tracked_keys {max}: {} keys tracked, {ns} ns per connect, RSS +{} KiB ({} bytes per tracked key)",
            state.tracked_keys(),
            after.saturating_sub(before),
            after.saturating_sub(before) * 1024 / state.tracked_keys().max(1) as u64
        );
        drop(p);
        state.housekeeping();
    }

    // a failed-login flood: 100,000 distinct user names against auth_failures
    let (p, state) = policy(
        vec![rule(
            "auth-user",
            vec![KeyPart::AuthUser],
            Kind::AuthFailures {
                count: 5,
                window: Duration::from_secs(900),
            },
        )],
        10_000,
    );
    let users: Vec<String> = (0..100_000).map(|i| format!("flood{i}")).collect();
    let t0 = Instant::now();
    for u in &users {
        let mut f = Facts::new(IpAddr::from([10, 0, 0, 1]), "pop3");
        f.auth_user = Some(u);
        std::hint::black_box(p.login_allowed(&f).decision);
        p.login_failed(&f);
    }
    println!(
        "100,000 distinct failed logins, max_tracked_keys 10000: {} keys tracked, {} ns per login check+failure",
        state.tracked_keys(),
        t0.elapsed().as_nanos() / 100_000
    );
}
