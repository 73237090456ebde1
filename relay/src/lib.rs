//! wsrelay: the WebSocket data plane between browsers and NATS.
//!
//! `config` is the relay's configuration format; it is the contract with the
//! operator (which renders it into a ConfigMap) and needs only serde. Everything
//! else is behind the `server` feature (on by default).

pub mod config;
