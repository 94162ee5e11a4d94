//! `bans_active` counts a ban learnt from the state store when it is learnt,
//! not at the next housekeeping. A test binary of its own: the gauge is the
//! process's, and other tests' gateways ban, lift and keep house beside it.
//! Skipped (one `SKIPPED:` line) when redis-server is not installed, unless
//! `MAILGATE_E2E=require`.

mod common;

use common::{require_or_skip, Redis, SmtpBackend, SmtpClient, Yaml};
use mailgate::state::{Store, StoreSettings};
use std::time::Duration;

#[tokio::test]
async fn a_ban_learnt_from_the_store_is_counted_at_once() {
    require_or_skip!("redis-server");
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    let be = SmtpBackend::new().start().await;
    let gw = Yaml::new()
        .listener("mx", "smtp", "none", "policy: p")
        .backend("b", &be.addr, "")
        .section("policies:\n  p:\n    limits:\n      - { name: flood, key: [ip], rate: 100/minute, action: ban, ban_for: 1h }")
        .section(&format!(
            "state:\n  store: redis\n  url: \"{}\"\n  prefix: \"t-gauge:\"\n  timeout: 1s\n",
            redis.url()
        ))
        .section("metrics: { bind: \"127.0.0.1:0\" }")
        .start()
        .await;
    let active = || async {
        let (_, text) = common::http_get(gw.metrics_addr().unwrap(), "/metrics").await;
        common::sample(&text, "mailgate_bans_active")
    };
    assert_eq!(active().await, 0.0);
    // another instance's ban, as it writes it (`policy/shared.rs` share_ban)
    let store = Store::connect(&StoreSettings {
        url: redis.url(),
        password: None,
        prefix: "t-gauge:".into(),
        timeout: Duration::from_secs(1),
        on_unavailable: mailgate::state::OnUnavailable::Local,
        lease_ttl: Duration::from_secs(5),
    })
    .unwrap();
    store
        .ttl_set_put(
            "bans",
            "127.0.4.4/32",
            "p\u{1f}flood\u{1f}rate 100 per 60s",
            Duration::from_secs(3600),
            100,
        )
        .await
        .unwrap();
    let mut c = SmtpClient::connect_from("127.0.4.4", gw.addr("mx").unwrap()).await;
    let text = c.text().await;
    assert!(
        text.starts_with("554 5.7.1"),
        "learnt from the store: {text}"
    );
    assert_eq!(active().await, 1.0, "counted when learnt");
}
