//! Fault soak: many messages through mailgate while the legacy backend is
//! killed and restarted at random moments, resets connections mid-DATA, loses
//! its reply after accepting (the RFC 1047 window), and stalls past the
//! deadline. Every message a client saw 250 for must be at the backend (zero
//! loss); duplicates may only come from the lost-reply window, and are counted.
//! `MAILGATE_SOAK_MESSAGES` sets the count (default 10,000).

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
struct Backend {
    /// message id → times stored
    stored: Mutex<HashMap<String, usize>>,
    lost_replies: AtomicUsize,
    resets: AtomicUsize,
    stalls: AtomicUsize,
    kills: AtomicUsize,
    up: AtomicBool,
}

/// A tiny deterministic PRNG (xorshift), so a failing run can be replayed by seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.next() % 1000 < per_mille
    }
}

async fn session(s: TcpStream, b: Arc<Backend>, seed: u64) {
    let mut rng = Rng(seed | 1);
    let mut r = BufReader::new(s);
    if r.get_mut().write_all(b"220 chaos ESMTP\r\n").await.is_err() {
        return;
    }
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let verb = line
            .split([' ', '\r'])
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        let answer: &[u8] = match verb.as_str() {
            "EHLO" => b"250-chaos\r\n250 PIPELINING\r\n",
            "QUIT" => {
                let _ = r.get_mut().write_all(b"221 bye\r\n").await;
                return;
            }
            "DATA" => {
                if r.get_mut().write_all(b"354 go\r\n").await.is_err() {
                    return;
                }
                let mut id = String::new();
                let reset = rng.chance(5);
                loop {
                    let mut d = String::new();
                    if r.read_line(&mut d).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if let Some(v) = d.strip_prefix("Message-ID: ") {
                        id = v.trim().to_string();
                        if reset {
                            // connection reset in the middle of the message
                            b.resets.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                    if d == ".\r\n" {
                        break;
                    }
                }
                if rng.chance(2) {
                    b.stalls.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    return;
                }
                *b.stored.lock().unwrap().entry(id).or_insert(0) += 1;
                if rng.chance(5) {
                    // accepted, but the reply is lost (RFC 1047)
                    b.lost_replies.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                b"250 2.0.0 queued\r\n"
            }
            _ => b"250 ok\r\n",
        };
        if r.get_mut().write_all(answer).await.is_err() {
            return;
        }
    }
}

/// Serves on `addr`; every ~300 ms it may be "killed": the listener and every
/// connection dropped for 50-150 ms, then started again on the same port.
async fn chaos(addr: SocketAddr, b: Arc<Backend>, stop: Arc<AtomicBool>) {
    let mut rng = Rng(0x5eed_cafe);
    let mut seed = 1u64;
    while !stop.load(Ordering::Relaxed) {
        let l = match TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        b.up.store(true, Ordering::Relaxed);
        let mut conns = tokio::task::JoinSet::new();
        let life = Duration::from_millis(150 + rng.next() % 400);
        let until = Instant::now() + life;
        loop {
            tokio::select! {
                r = l.accept() => if let Ok((s, _)) = r {
                    seed += 1;
                    conns.spawn(session(s, b.clone(), seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
                },
                _ = tokio::time::sleep_until(until.into()) => break,
            }
            while conns.try_join_next().is_some() {}
        }
        // kill: listener gone, every connection aborted
        b.up.store(false, Ordering::Relaxed);
        b.kills.fetch_add(1, Ordering::Relaxed);
        drop(l);
        conns.abort_all();
        tokio::time::sleep(Duration::from_millis(50 + rng.next() % 100)).await;
    }
}

async fn reply(r: &mut BufReader<TcpStream>) -> Option<u16> {
    loop {
        let mut l = String::new();
        match tokio::time::timeout(Duration::from_secs(20), r.read_line(&mut l)).await {
            Ok(Ok(n)) if n >= 4 => {}
            _ => return None,
        }
        if l.as_bytes()[3] != b'-' {
            return l[..3].parse().ok();
        }
    }
}

/// One attempt to deliver message `id`; true only on a final 250.
async fn attempt(gw: SocketAddr, id: &str) -> bool {
    let Ok(s) = TcpStream::connect(gw).await else {
        return false;
    };
    let mut r = BufReader::new(s);
    if reply(&mut r).await != Some(220) {
        return false;
    }
    for (c, want) in [
        ("EHLO soak.test", 250),
        ("MAIL FROM:<soak@example.org>", 250),
        ("RCPT TO:<sink@example.net>", 250),
        ("DATA", 354),
    ] {
        if r.get_mut()
            .write_all(format!("{c}\r\n").as_bytes())
            .await
            .is_err()
            || reply(&mut r).await != Some(want)
        {
            return false;
        }
    }
    let msg = format!(
        "Message-ID: {id}\r\nSubject: soak\r\n\r\n{}\r\n.\r\n",
        "x".repeat(200)
    );
    if r.get_mut().write_all(msg.as_bytes()).await.is_err() {
        return false;
    }
    let ok = reply(&mut r).await == Some(250);
    let _ = r.get_mut().write_all(b"QUIT\r\n").await;
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_backend_faults_loses_nothing() {
    let total: usize = std::env::var("MAILGATE_SOAK_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let backend_addr: SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let b = Arc::new(Backend::default());
    let stop = Arc::new(AtomicBool::new(false));
    let chaos_task = tokio::spawn(chaos(backend_addr, b.clone(), stop.clone()));
    let gw = common::Yaml::new()
        .listener(
            "mx",
            "smtp",
            "none",
            "max_connections: 5000, timeouts: { backend_connect: 1s, backend_reply: 1s, backend_data: 1s }",
        )
        .backend("b", &backend_addr.to_string(), "")
        .start()
        .await;
    let gw_addr = gw.addr("mx").unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let attempts = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..64 {
        let (next, acked, attempts) = (next.clone(), acked.clone(), attempts.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return;
                }
                let id = format!("<soak-{i}@example.org>");
                // retry like an MTA would, until the gateway says 250
                for _ in 0..50 {
                    attempts.fetch_add(1, Ordering::Relaxed);
                    if attempt(gw_addr, &id).await {
                        acked.lock().unwrap().insert(id.clone());
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(5), chaos_task).await;
    let acked = acked.lock().unwrap().clone();
    let stored = b.stored.lock().unwrap().clone();
    let lost: Vec<&String> = acked
        .iter()
        .filter(|id| !stored.contains_key(*id))
        .collect();
    let duplicates: usize = stored.values().map(|n| n - 1).sum();
    eprintln!(
        "fault soak: sent {total} (attempts {}), acknowledged {}, delivered {} distinct ({} stored), lost {}, duplicates {duplicates}; backend kills {}, mid-DATA resets {}, lost replies {}, stalls {}; {:.1}s",
        attempts.load(Ordering::Relaxed),
        acked.len(),
        stored.len(),
        stored.values().sum::<usize>(),
        lost.len(),
        b.kills.load(Ordering::Relaxed),
        b.resets.load(Ordering::Relaxed),
        b.lost_replies.load(Ordering::Relaxed),
        b.stalls.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    assert!(
        lost.is_empty(),
        "acknowledged but not at the backend: {:?}",
        &lost[..lost.len().min(5)]
    );
    // duplicates only from the lost-reply window (at most one per lost reply)
    assert!(
        duplicates <= b.lost_replies.load(Ordering::Relaxed),
        "duplicates beyond lost replies"
    );
    assert_eq!(acked.len(), total, "every message eventually acknowledged");
    assert!(
        b.kills.load(Ordering::Relaxed) > 0 && b.resets.load(Ordering::Relaxed) > 0,
        "faults were injected"
    );
}
