//! wsrelay: the WebSocket data plane between browsers and NATS.
//!
//! `config` (with `template`, the channel and subject template parser it validates with,
//! and `pem`) is the crate `wsrelay-config`, the contract with the operator, re-exported
//! here. The relay itself is in layers; each imports only the layers below it
//! (`tests/layering.rs` checks it):
//!
//! 1. `protocol` (frames), `metrics`, `limits` (token bucket, counters), `slots`, `clock`, `signal`
//!    (a cheap wake-up for one task), `events` (the lifecycle events' form): pure or leaf parts;
//! 2. `task` (the panic boundary), `confirm` (a NATS round trip no other client can answer),
//!    `auth` (JWT keys, JWKS), `authz` (bindings), `nats` (the connection), `history` (the
//!    ring and the stream reads), `registry` (the connection registry in JetStream KV);
//! 3. `access/`: whether a connection may use a channel (bindings, subscription tokens,
//!    rules, the backend's decisions) and may connect;
//! 4. `conn/`: one open connection — its subscription map, outbox, close causes, sink;
//! 5. `fanout/`: subject entries, the resumable join and gap fill, the hub;
//! 6. `presence/`: channels' members from the registry, their events (fanned out the way
//!    messages are);
//! 7. `state`: the relay's shared state;
//! 8. `session/`: reader, writer and requests, over any sink and stream;
//! 9. `edge/`: one admission, then the WebSocket and SSE transports, the listener, TLS;
//! 10. `runtime/`: process, drain, reload, admin, stream and bucket upkeep, the control
//!     service.

pub use wsrelay_config as config;
pub use wsrelay_config::{pem, template};

pub mod clock;
pub mod events;
pub mod limits;
pub mod metrics;
pub mod protocol;
pub mod signal;
pub mod slots;

pub mod auth;
pub mod authz;
pub mod confirm;
pub mod history;
pub mod nats;
pub mod registry;
pub mod task;

pub mod access;

pub mod conn;

pub mod fanout;

pub mod presence;

pub mod state;

pub mod session;

pub mod edge;

pub mod runtime;
