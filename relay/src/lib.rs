//! wsrelay: the WebSocket data plane between browsers and NATS.
//!
//! `config` is the relay's configuration format (with `template`, the channel and subject
//! template parser it validates with); it is the contract with the
//! operator (which renders it into a ConfigMap) and needs only serde. Everything
//! else is behind the `server` feature (on by default):
//!
//! - pure cores: `protocol` (frames), `authz` (bindings), `limits` (token bucket),
//!   `drain::schedule`, token lookup in `auth`;
//! - runtime parts: `auth` (JWT keys, JWKS), `nats`, `confirm` (a round trip through the NATS
//!   server that no other client can answer or delay), `hub` (subject fan-out), `outbox`
//!   (per-connection queue), `signal` (a cheap wake-up for one task), `connection` (reader and writer), `sink` (the write half a fan-out may write to at once), `server` (accept and
//!   upgrade), `admin` and `metrics`, `drain`, `reload`, `tls`, `process` (start, signals),
//!   `task` (the panic boundary of per-connection and per-subject tasks).

pub mod config;
#[cfg(feature = "pem")]
pub mod pem;
pub mod template;

#[cfg(feature = "server")]
pub mod admin;
#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "server")]
pub mod authz;
#[cfg(feature = "server")]
pub mod confirm;
#[cfg(feature = "server")]
pub mod connection;
#[cfg(feature = "server")]
pub mod drain;
#[cfg(feature = "server")]
pub mod history;
#[cfg(feature = "server")]
pub mod hub;
#[cfg(feature = "server")]
pub mod limits;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod nats;
#[cfg(feature = "server")]
pub mod outbox;
#[cfg(feature = "server")]
pub mod process;
#[cfg(feature = "server")]
pub mod protocol;
#[cfg(feature = "server")]
pub mod relay;
#[cfg(feature = "server")]
pub mod reload;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod signal;
#[cfg(feature = "server")]
pub mod sink;
#[cfg(feature = "server")]
pub mod slots;
#[cfg(feature = "server")]
pub mod sse;
#[cfg(feature = "server")]
pub mod task;
#[cfg(feature = "server")]
pub mod tls;
