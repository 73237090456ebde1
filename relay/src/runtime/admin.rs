//! The admin listener: `/live`, `/ready`, `/metrics`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::state::Relay;

/// The admin router.
pub fn router(relay: Arc<Relay>) -> Router {
    Router::new()
        .route("/live", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(relay)
}

async fn ready(State(relay): State<Arc<Relay>>) -> impl IntoResponse {
    if relay.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if relay.nats_failed.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "NATS client failed")
    } else if relay.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "NATS disconnected")
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
