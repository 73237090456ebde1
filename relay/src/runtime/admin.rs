//! The admin listener: `/live`, `/ready`, `/metrics`, `POST /registry/forget?relay=<name>`
//! (deletes a dead relay's registry entries; the operator calls it when it sees a pod gone)
//! and `POST /rebalance` (sheds connections; the operator's rebalancer calls it,
//! `runtime::rebalance`).

use std::sync::Arc;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use tokio::net::TcpListener;

use crate::state::Relay;

/// The admin router.
pub fn router(relay: Arc<Relay>) -> Router {
    Router::new()
        .route("/live", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/registry/forget", post(forget))
        .route("/rebalance", post(rebalance))
        .with_state(relay)
}

async fn ready(State(relay): State<Arc<Relay>>) -> impl IntoResponse {
    if relay.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if relay.is_shedding() {
        // Out of the Service's endpoints, so the connections it sheds land elsewhere.
        (StatusCode::SERVICE_UNAVAILABLE, "rebalancing")
    } else if relay.nats_failed.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "NATS client failed")
    } else if relay.registry.as_ref().is_some_and(|r| !r.was_in_place()) {
        // Once only: a new relay takes no client before presence can answer; a later
        // registry outage does not take it out of the Service (presence answers 503).
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "registry bucket not in place yet",
        )
    } else if relay.settings().config.control.is_some()
        && relay.registry.is_some()
        && !relay
            .revocations_read
            .load(std::sync::atomic::Ordering::SeqCst)
    {
        // Once only: a relay started after a revocation must know it before any handshake.
        (StatusCode::SERVICE_UNAVAILABLE, "revocations not read yet")
    } else if relay.settings().config.control.is_some()
        && relay.registry.is_some()
        && !relay
            .server_subs_read
            .load(std::sync::atomic::Ordering::SeqCst)
    {
        // Once only: a relay started after a server-side subscribe gives it to its first
        // connections too.
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "server-side subscriptions not read yet",
        )
    } else if relay.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "NATS disconnected")
    }
}

/// Deletes every registry key of another relay (its entries, then its lease).
async fn forget(
    State(relay): State<Arc<Relay>>,
    RawQuery(query): RawQuery,
) -> (StatusCode, String) {
    let Some(registry) = &relay.registry else {
        return (StatusCode::NOT_FOUND, "no registry configured".into());
    };
    // A relay's name is one key token, which needs no percent-decoding.
    let name = query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("relay="))
        .filter(|n| crate::registry::keys::is_token(n));
    let Some(name) = name else {
        return (
            StatusCode::BAD_REQUEST,
            "relay: required, one NATS subject token ([-_=a-zA-Z0-9], 1 to 128)".into(),
        );
    };
    if name == registry.relay() {
        return (StatusCode::CONFLICT, "relay: this relay's own name".into());
    }
    match registry
        .purge(name, crate::registry::PurgeCause::Forget)
        .await
    {
        Ok(n) => {
            tracing::info!(relay = %name, keys = n, "registry: relay forgotten");
            (StatusCode::OK, format!("{{\"deleted\":{n}}}"))
        }
        Err(e) => {
            tracing::warn!(relay = %name, error = %e, "registry: forget failed");
            (StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
    }
}

/// Starts a rebalancing round: 200 with what it will move, 409 when one is under way or the
/// relay drains, 400 for a body that is not an [`Ask`](super::rebalance::Ask).
async fn rebalance(State(relay): State<Arc<Relay>>, body: axum::body::Bytes) -> impl IntoResponse {
    let json = [(header::CONTENT_TYPE, "application/json")];
    let ask: super::rebalance::Ask = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => {
            let error = format!(
                "body: {{\"shed\": <count>, \"windowMs\": <ms>, \"includePlainChannels\": <bool>}} expected ({e})"
            );
            return (
                StatusCode::BAD_REQUEST,
                json,
                serde_json::json!({ "error": error }).to_string(),
            );
        }
    };
    match super::rebalance::start(&relay, &ask) {
        Ok(round) => (
            StatusCode::OK,
            json,
            serde_json::to_string(&round).unwrap_or_default(),
        ),
        Err(e) => (
            StatusCode::CONFLICT,
            json,
            serde_json::json!({ "error": e.to_string() }).to_string(),
        ),
    }
}

async fn metrics(State(relay): State<Arc<Relay>>) -> impl IntoResponse {
    // Read at scrape time from the authenticator in force (a reload replaces it).
    relay
        .metrics
        .jwks_fetch_failing
        .set(i64::from(relay.settings().authn.jwks_failing()));
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        relay.metrics.encode(),
    )
}

/// Serves the admin router until the relay shuts down.
pub async fn serve(listener: TcpListener, relay: Arc<Relay>) {
    let stop = relay.shutdown.clone();
    let app = router(relay);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "admin server failed");
    }
}
