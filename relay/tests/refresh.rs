//! In-band token refresh (docs/protocol.md section 2, `refresh`): a connection gets a new
//! expiry from a new token of the same identity, without reconnecting; other identities,
//! invalid tokens and anonymous connections are refused with their codes.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::json;
use wsrelay_testkit::prelude::*;

fn token_for(sub: &str, exp: u64) -> String {
    let mut c = claims(sub);
    c["exp"] = json!(exp);
    hs256(c)
}

#[tokio::test]
async fn a_refresh_moves_the_expiry_of_the_same_identity_only() {
    init_logs();
    let nats = Nats::start();
    let relay = TestRelay::builder(&nats)
        .anonymous(true)
        .hs256()
        .binding("news", "public.news", Direction::Subscribe)
        .start()
        .await;
    let addr = relay.client_addr;

    // Expires in 4 s (3 to 4: `exp` is in whole seconds), time for the handshake and the
    // refresh on a loaded machine; refreshed to 10 min: still open 5 s later.
    let mut ws = connect(
        addr,
        &format!("?token={}", token_for("alice", now_secs() + 4)),
    )
    .await;
    let r = request(
        &mut ws,
        json!({"type": "refresh", "id": 1, "token": token_for("alice", now_secs() + 600)}),
    )
    .await;
    assert_eq!(r["type"], "ok", "{r}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        request(&mut ws, json!({"type": "ping", "id": 2})).await["type"],
        "pong",
        "the connection outlived its first token"
    );

    // Another identity, a bad signature: refused, the connection stays.
    let r = request(
        &mut ws,
        json!({"type": "refresh", "id": 3, "token": token_for("bob", now_secs() + 600)}),
    )
    .await;
    assert_eq!(r["code"], 403, "{r}");
    let forged = format!("{}x", token_for("alice", now_secs() + 600));
    let r = request(
        &mut ws,
        json!({"type": "refresh", "id": 4, "token": forged}),
    )
    .await;
    assert_eq!(r["code"], 401, "{r}");
    let expired = token_for("alice", now_secs() - 120);
    let r = request(
        &mut ws,
        json!({"type": "refresh", "id": 5, "token": expired}),
    )
    .await;
    assert_eq!(r["code"], 401, "{r}");

    // A shorter token shortens the connection: closed with 1008 when it passes.
    let r = request(
        &mut ws,
        json!({"type": "refresh", "id": 6, "token": token_for("alice", now_secs() + 2)}),
    )
    .await;
    assert_eq!(r["type"], "ok", "{r}");
    assert_eq!(
        close_code(&mut ws, Duration::from_secs(10)).await,
        Some(1008)
    );

    // An anonymous connection has nothing to refresh.
    let mut anon = connect(addr, "").await;
    let r = request(
        &mut anon,
        json!({"type": "refresh", "id": 7, "token": token_for("alice", now_secs() + 600)}),
    )
    .await;
    assert_eq!(r["code"], 403, "{r}");
    relay.drain().await;
}
