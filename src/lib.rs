//! mailgate — a TLS-terminating, protocol-cleaning gateway in front of legacy
//! plaintext SMTP, POP3 and IMAP servers.
//!
//! # Layout
//!
//! ```text
//! units.rs     sizes ("25MiB"), durations ("5m") and rates ("20/minute", one unit table),
//!              CIDR networks, canonical addresses (a leaf: policy, auth, transport use it)
//! action.rs    `PolicyAction`: what a limit rule or an auth verdict does (shared by both)
//! mail.rs      MAIL parameters and dot-stuffing, shared by the client and backend SMTP legs
//! config/      YAML files → validated `Config` (errors carry file:line:column); it builds
//!              the types the modules below own (`backend::Backend`, `policy::PolicySpec`, …)
//!   file.rs      the serde shapes of one YAML file (unknown fields are errors)
//!   load.rs      files of a path, size/nesting caps, parsing, merging several files
//!   listener.rs, backend.rs, policy.rs  each section → its validated type
//!   dkim_sign.rs a policy's `dkim_sign:` → `sign::SignPolicy` (its keys loaded)
//!   summary.rs   the `check` output
//!   warnings.rs  valid but risky settings `check` warns about (`--strict` fails on them)
//!   defaults.rs  every default value, in one place (also published in the schema)
//! tls.rs       certificates from PEM, SNI resolver, rustls `ServerConfig`, dev certs (rcgen)
//! transport.rs `MaybeTls` (plain or TLS, one type across STARTTLS) = `ClientStream`;
//!              TLS accept under a deadline; PROXY v1/v2 in, v2 header out
//! codec.rs     bounded line reader / whole-reply writer shared by both legs; the
//!              wait for the next command (pipelining, idle buffer release, shutdown);
//!              readiness asked of the kernel (`poll(2)`), not of stale runtime flags
//! conn/        the client-connection layer every protocol's driver stands on
//!   mod.rs       `ListenerRuntime` (reloadable snapshot), `SessionCtx` (holds it),
//!                `Replies`/`Wire` (what a session supplies), `End` (session outcomes)
//!   client.rs    implicit TLS, session gauge, STARTTLS/STLS (CVE-2011-0411 discard),
//!                the wait for the next command, literal reads, the session-end log
//!   login.rs     the login guard: policy check → backend login → bookkeeping → delay;
//!                the replay on a backend connection (out of step, one fresh retry),
//!                which SMTP's MAIL and AUTH take too (a pooled connection that died idle)
//!   sasl.rs      SASL PLAIN decoding and strict base64, for every protocol's login
//!   pipe.rs      what the after-login relays share: activity clock and watchdog,
//!                `Timers` (idle, deadline, shutdown signal), queued local answers,
//!                last words
//!   inflight.rs  the process-wide budget for message bytes in memory (max_inflight_data)
//! smtp/        the client-facing SMTP side
//!   command.rs   command parser (sans-IO)
//!   reply.rs     every reply mailgate itself sends, in one place
//!   session.rs   the pure SMTP state machine: command or outcome in, `Action` out;
//!                every reply decision (policy, login, verdicts, backend replies)
//!   data.rs      DATA receiver: ends only on CRLF.CRLF, bare CR/LF/NUL guard, header
//!                bounds, dot-unstuffing; Received
//!   driver.rs    the only code that awaits (on `conn/`): backend, checks, DATA, timeouts
//! pop3/        the client-facing POP3 side (same shape as smtp/)
//!   command.rs   AUTHORIZATION-state parser, SASL PLAIN, base64 (sans-IO)
//!   reply.rs     every reply mailgate itself sends (RFC 2449/3206 codes)
//!   session.rs   the pure AUTHORIZATION state machine: line in, `Action` out
//!   driver.rs    the only code that awaits (on `conn/`): backend, APOP slots, the pipe
//!   transaction.rs TRANSACTION-state parser, reply order around local answers (sans-IO)
//!   pipe.rs      TRANSACTION state I/O: parsed commands up, backend bytes down unchanged, idle
//!                timer, shutdown once nothing is owed (no QUIT)
//! imap/        the client-facing IMAP side (same shape as pop3/)
//!   command.rs   not-authenticated-state syntax: tags, strings, literals `{n}` / `{n+}`,
//!                the bounded command assembler (sans-IO)
//!   reply.rs     every response mailgate itself sends (RFC 5530 codes)
//!   session.rs   the pure not-authenticated state machine: command in, `Action` out
//!   driver.rs    the only code that awaits (on `conn/`): literals, backend, the relay
//!   tracker.rs   authenticated state: client commands checked and bounded (STARTTLS,
//!                LOGIN refused here), backend response boundaries (sans-IO)
//!   relay.rs     authenticated-state I/O: checked commands up, backend bytes down
//!                unchanged, idle timer (at least 29 minutes in IDLE), shutdown once
//!                nothing is outstanding (BYE, also in IDLE)
//! backend/     clients of the legacy servers; `Backend`, `Deadlines` (built by config)
//!   caps.rs      `SmtpCaps`/`Pop3Caps`/`ImapCaps`, the pure EHLO/CAPA/CAPABILITY parsers, one `CapsCache` for both
//!                protocols (owned by the gateway, reached through the session context)
//!   reply.rs     SMTP reply parser (sans-IO, bounded)
//!   smtp.rs      SMTP client: greeting, EHLO/HELO, MAIL/RCPT/DATA relay, RSET, QUIT
//!   pool.rs      idle SMTP backend connections kept for later client sessions (`reuse:`):
//!                bounded per backend, reset before they are kept, expired by a sweeper
//!   pop3.rs      POP3 client: greeting, CAPA, login replay (only while in step), then the
//!                pipe; `Login` in, `LoginReply` out (the POP3 session maps it)
//!   imap.rs      IMAP client: greeting, CAPABILITY, Dovecot `ID` identity, login replay
//!                (LOGIN quoted or literal, AUTHENTICATE PLAIN; only while in step, own
//!                tags), then the relay; bounded sans-IO response reader
//!   probe.rs     periodic SMTP capability probe into the cache
//!   stream.rs    TLS to backends (implicit / STARTTLS), CA or SHA-256 pin verification
//! auth/        SPF/DKIM/DMARC/ARC via mail-auth: DNS cache bounded in bytes, query
//!              budgets and void-lookup limit, `Verifier` (signature caps), policy verdicts,
//!              Authentication-Results / Received-SPF, forged A-R removal; `worker.rs`
//!              runs checks on a small bounded runtime of their own, off the I/O threads
//! sign/        DKIM signing of submitted mail (mail-auth): key files and keygen (key.rs),
//!              which keys sign or a refusal (decide.rs, pure), the signature fields (signer.rs)
//! policy/      limits per listener: deny/allow lists, rate (GCRA over governor's `Quota`), concurrency,
//!   spec.rs      validated rules: key parts (`KeyPart`), what each counts, the stage it runs at, `check` text
//!   state.rs     limiter state that survives reloads; compiling specs against it
//!   evaluate.rs  per-stage decisions of a compiled policy → `Checked { decision, hits }`
//!   shared.rs    the same decisions in the shared store (one call per stage, `on_unavailable`)
//!   limits.rs    brute-force windows with known-good networks; buckets, counters
//!   bans.rs      process-wide bans (`action: ban`): bounded, expiring, never a
//!                trusted balancer; checked by server.rs before TLS and greeting
//!   lru.rs       bounded keyed state: least-recently-seen order, idle keys evicted first
//! state/       limiter state shared by several instances through Valkey/Redis (`state:`)
//!   mod.rs       settings, the store's `Op`s and `Answer`s; keys.rs: key naming under `prefix`
//!   redis.rs     `Store`: connection manager, the one Lua script (ops.lua) per call under
//!                `timeout`, backoff while down, TTL sets (for bans, allowlists)
//!   lease.rs     session leases for shared `concurrent` rules, one batched renewal per interval
//! triage/      postscreen-style tests before the SMTP greeting (SMTP only)
//!   mod.rs       validated `TriageSpec`; `Triaged` (verdict, action, score), what the driver acts on
//!   score.rs     DNSBL query names (IPv4, IPv6 nibbles), codes, score, verdict (sans-IO)
//!   lookup.rs    every zone's query started at connect, bounded by `timeout`
//!   cache.rs     allowlist cache of clients that passed (bounded, survives reloads)
//! observe/     Prometheus metrics (metrics.rs), the /metrics /healthz /readyz /bans endpoint
//!              (http.rs: capped, cached readiness, bearer-token ban lifts), text-log
//!              escaping of client strings (logfmt.rs)
//! server.rs    listeners, per-listener runtime snapshots (ArcSwap) and reload, connect-stage
//!              policy, connection limits, certificate file watch, graceful shutdown
//! demo.rs      the `demo` subcommand: an in-memory legacy backend, clearly labelled
//! ```
//!
//! Layers, bottom to top (no module uses one above it; `tests/module_graph.rs`
//! fails on any cycle): units, codec, observe, action, mail → transport, sign →
//! auth, backend → state → policy → triage → config → tls → conn → smtp, pop3, imap → server → demo.
//! Metrics are counted at the edges (server, drivers) from the facts policy,
//! auth and backend return (`Checked::hits`, `DnsFacts`, `connect_time`,
//! `BackendError::OutOfStep`).
//!
//! Rules: protocol logic in `session.rs`/`command.rs`/`data.rs` never awaits and is
//! unit-tested with strings; only `driver.rs` (and `conn/` under it) touches sockets,
//! and it loads its configuration once per session.

pub mod action;
pub mod auth;
pub mod backend;
pub mod codec;
pub mod config;
pub mod conn;
pub mod demo;
pub mod imap;
pub mod mail;
pub mod observe;
pub mod policy;
pub mod pop3;
pub mod server;
pub mod sign;
pub mod smtp;
pub mod state;
pub mod tls;
pub mod transport;
pub mod triage;
pub mod units;

/// A short, unique-enough session id, also handed to the backend in the
/// `Received:` header so both logs can be joined.
pub fn session_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static SEED: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        (now.as_secs() << 20) ^ u64::from(now.subsec_micros()) ^ u64::from(std::process::id())
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // mix so consecutive ids do not look sequential in logs of busy servers
    let x = (seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    format!("{:012X}", x >> 16)
}
