//! The relay's debug log follows a client by request id, and never holds its token.
//!
//! The real binary with `WSRELAY_LOG=wsrelay=debug` and JSON logs: a handshake refused for a
//! bad token, one accepted, a subscribe allowed and one refused. Every line of the handshake
//! and of the connection it opened carries the handshake's `request_id` (the client's
//! `X-Request-Id`, answered in the same header); subscribe lines carry the frame's id; no line
//! holds either token.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::Value;
use wsrelay::config::Direction;
use wsrelay_testkit::prelude::*;

/// The `request_id` of the spans of a JSON log line (tracing-subscriber's `spans` list).
fn span_request_id(v: &Value) -> Option<String> {
    v["spans"]
        .as_array()?
        .iter()
        .find_map(|s| s["request_id"].as_str().map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_and_subscribes_log_their_request_id_and_no_token() {
    let nats = Nats::start();
    let c = TestRelay::builder(&nats)
        .anonymous(false)
        .hs256()
        .binding("news", "public.news", Direction::Subscribe)
        .build();
    let dir = std::env::temp_dir().join(format!("wsrelay-reqlog-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&c).unwrap()).unwrap();
    let relay = RelayProcess::spawn(
        env!("CARGO_BIN_EXE_wsrelay").as_ref(),
        &path,
        "wsrelay=debug",
    );

    // Refused: a token that is no JWT. The answer names the request id.
    let bad = "not-a-jwt-but-secret-looking-0123456789";
    let head = raw_upgrade(
        relay.client,
        &format!("X-Request-Id: req-bad-1\r\nAuthorization: Bearer {bad}\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("x-request-id: req-bad-1"),
        "{head}"
    );

    // Accepted, with a real token; one subscribe allowed, one refused.
    let token = hs256(claims("alice"));
    let mut ws = connect_with(
        relay.client,
        &format!("?token={token}"),
        &[("X-Request-Id", "req-good-2")],
    )
    .await
    .expect("refused");
    assert_eq!(next_json(&mut ws).await.unwrap()["type"], "welcome");
    assert_eq!(subscribe(&mut ws, 7, "news").await["type"], "ok");
    assert_eq!(subscribe(&mut ws, 8, "secrets").await["type"], "error");

    // A header that is not a short token is replaced by a fresh id.
    let head = raw_upgrade(relay.client, "X-Request-Id: has spaces\r\n").await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    let answered = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("x-request-id: ")
                .map(str::to_owned)
        })
        .unwrap();
    assert_eq!(answered.len(), 16, "{head}");

    // The relay logs a refusal after it has answered it, so wait for the last line of each
    // kind rather than for one of them.
    let ok = eventually(Duration::from_secs(20), || async {
        !relay.lines_with("request refused").is_empty()
            && relay.lines_with("handshake refused").len() >= 2
    })
    .await;
    assert!(
        ok,
        "missing 'request refused' or the second 'handshake refused' line"
    );

    let refused = relay.lines_with("handshake refused");
    assert!(
        refused
            .iter()
            .any(|v| span_request_id(v).as_deref() == Some("req-bad-1")
                && v["fields"]["reason"] == "invalid_token"),
        "{refused:?}"
    );
    assert!(
        refused
            .iter()
            .any(|v| span_request_id(v).as_deref() == Some(answered.as_str())),
        "{refused:?}"
    );
    let accepted = relay.lines_with("connection accepted");
    assert!(
        accepted
            .iter()
            .any(|v| span_request_id(v).as_deref() == Some("req-good-2")),
        "{accepted:?}"
    );
    for (message, id) in [
        ("subscribe", "7"),
        ("subscribed", "7"),
        ("request refused", "8"),
    ] {
        let found = relay.lines_with(message);
        assert!(
            found.iter().any(|v| v["fields"]["request_id"] == id
                && span_request_id(v).as_deref() == Some("req-good-2")),
            "{message}: {found:?}"
        );
    }

    let all = relay.log();
    assert!(!all.contains(bad), "the refused token is in the log");
    assert!(!all.contains(&token), "the accepted token is in the log");
    let signature = token.rsplit('.').next().unwrap();
    assert!(
        !all.contains(signature),
        "a token's signature is in the log"
    );
    drop(ws);
}
