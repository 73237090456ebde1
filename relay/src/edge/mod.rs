//! The edge: where clients meet the relay. One admission ([`admit`]) for both transports,
//! then the WebSocket upgrade ([`websocket`]) or the SSE fallback ([`sse`]), each building a
//! sink and a stream for the one session loop (`crate::session::run`); the listener that
//! accepts TCP connections and bounds handshakes ([`listener`]); TLS ([`tls`]).

pub mod admit;
pub mod http;
pub mod listener;
pub mod sse;
pub mod tls;
pub mod websocket;

use std::sync::Arc;

use ::http::{StatusCode, header};
use axum::Router;

use crate::conn::Conn;
use crate::conn::outbox::Outbox;
use crate::state::Relay;
use admit::Admission;
use serde_json::{Map, Value};

/// What the edge's handlers share: the relay and admission's counters.
#[derive(Debug)]
pub struct Edge {
    /// The relay.
    pub relay: Arc<Relay>,
    /// Admission's counters.
    pub admission: Admission,
    /// The SSE sessions this relay holds.
    pub sessions: Arc<sse::Sessions>,
}

impl Edge {
    /// The edge of `relay`.
    pub fn new(relay: Arc<Relay>) -> Self {
        let settings = relay.settings();
        let max = settings.config.limits.max_connections as usize;
        let sessions = Arc::new(sse::Sessions::new(
            &relay.name,
            &settings.config.listen.sse_forward_subject,
        ));
        drop(settings);
        Self {
            relay,
            admission: Admission::new(max),
            sessions,
        }
    }

    /// Registers an admitted connection, with a send queue sized by the limits in force;
    /// resumes the connection it names when it may (docs/backend.md, *Resumes*). What its
    /// `welcome` says of that: `None` when it named none.
    pub async fn open(
        &self,
        claims: Option<Map<String, Value>>,
        resume: Option<&str>,
    ) -> (Arc<Conn>, Option<bool>) {
        let resumes = match resume {
            Some(previous) if self.relay.may_resume(claims.as_ref(), previous).await => {
                Some(previous)
            }
            _ => None,
        };
        let settings = self.relay.settings();
        let limits = &settings.config.limits;
        let outbox = Arc::new(Outbox::with_budget(
            limits.send_queue_len as usize,
            usize::try_from(limits.send_queue_bytes).unwrap_or(usize::MAX),
            limits.slow_consumer_policy,
            self.relay.queue_budget.clone(),
        ));
        drop(settings);
        self.relay.metrics.accepted.inc();
        let conn = self.relay.register(outbox, claims, resumes);
        let resumed = match (resumes, &self.relay.registry) {
            (Some(_), Some(r)) => Some(r.settle_opened(conn.id).await),
            _ => resume.map(|_| false),
        };
        (conn, resumed)
    }
}

/// The client-facing router: the WebSocket path, and under it the SSE fallback
/// (`<path>/sse`, `<path>/sse/{session}`).
pub fn router(edge: Arc<Edge>, path: &str) -> Router {
    websocket::router(edge.clone(), path)
        .merge(sse::router(edge, path))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                [(header::CONNECTION, "close")],
                "not found",
            )
        })
}
