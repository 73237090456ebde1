//! What a wsrelay test needs, each in one line: a real nats-server ([`nats`]), a relay started
//! in-process ([`relay::TestRelay`]), a client of the protocol over a real WebSocket
//! ([`client`]), of the SSE fallback ([`sse`]), and of the admin port ([`http`]); tokens signed
//! with the fixture keys ([`tokens`]).
//!
//! Loopback only. Every wait is bounded, by 20 s for what is expected to come: a loaded
//! machine can stall for seconds.
//!
//! ```no_run
//! # async fn t() {
//! use wsrelay_testkit::prelude::*;
//! let nats = Nats::start();
//! let relay = TestRelay::builder(&nats).binding("news", "public.news", Direction::Both).start().await;
//! let mut ws = connect(relay.client_addr, "").await;
//! assert_eq!(subscribe(&mut ws, 1, "news").await["type"], "ok");
//! # }
//! ```
#![forbid(unsafe_code)]
// A test kit: a failed setup step is a failed test, said where it happened.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

pub mod client;
pub mod http;
#[cfg(feature = "relay")]
pub mod nats;
#[cfg(feature = "relay")]
pub mod relay;
pub mod sse;
#[cfg(feature = "relay")]
pub mod tokens;

#[cfg(feature = "relay")]
/// The relay crate's API the kit builds on, in one place: when the relay's modules move, this
/// is the only part of the kit to follow them.
pub mod api {
    pub use wsrelay::config::{
        Authorize, BackendRequest, Binding, Config, Control, Direction, Events, History, Jwt,
        JwtAlgorithm, JwtKey, OnTimeout, Presence, Registry, ServerTls, SlowConsumerPolicy,
        SubscriptionToken, TokenSource,
    };
    pub use wsrelay::runtime::process::{Running, StartError, start};
}

/// The binary of `examples/<name>` (a Go example with its own `build.sh`, which caches it under
/// `~/.cache/wsrelay/bin` by its sources and prints its path; needs `go`), built once per test
/// process.
pub fn example_bin(name: &str) -> std::path::PathBuf {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static BINS: OnceLock<Mutex<HashMap<String, std::path::PathBuf>>> = OnceLock::new();
    let mut bins = BINS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    bins.entry(name.to_owned())
        .or_insert_with(|| {
            let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("../examples/{name}/build.sh"));
            let out = std::process::Command::new("bash")
                .arg(&script)
                .stderr(std::process::Stdio::inherit())
                .output()
                .unwrap_or_else(|e| panic!("{}: {e}", script.display()));
            assert!(
                out.status.success(),
                "{} failed ({}): the example needs go",
                script.display(),
                out.status
            );
            std::path::PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
        })
        .clone()
}

#[cfg(feature = "relay")]
/// A file of the test fixtures (keys, certificates: see `fixtures/README.md`).
pub fn fixture(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

#[cfg(feature = "relay")]
/// Logs to the test output when `WSRELAY_LOG` is set (e.g. `WSRELAY_LOG=debug`).
pub fn init_logs() {
    if let Ok(filter) = std::env::var("WSRELAY_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// Everything a test uses, for `use wsrelay_testkit::prelude::*;`.
/// Sends `child` SIGTERM and returns its exit status; kills it and panics, naming `what`, if
/// it has not exited within 20 s.
pub fn terminate(mut child: std::process::Child, what: &str) -> std::process::ExitStatus {
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success(), "kill -TERM {what}: {sent}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within 20 s of SIGTERM");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[cfg(feature = "relay")]
pub mod prelude {
    pub use crate::api::{
        Authorize, BackendRequest, Binding, Config, Direction, History, Jwt, JwtAlgorithm, JwtKey,
        OnTimeout, Presence, Registry, SlowConsumerPolicy, SubscriptionToken, TokenSource,
    };
    pub use crate::client::{
        Client, Event, Frame, Got, Request, Since, Ws, close_code, connect, connect_with,
        drain_messages, expect_messages, messages_then_quiet, next_event, next_json, request, send,
        subscribe,
    };
    pub use crate::http::{
        eventually, http_get, http_post, metric, raw_frames, raw_upgrade, raw_ws,
    };
    pub use crate::nats::{Nats, StoreDir, free_port, jetstream_nats, nats_server_bin};
    pub use crate::relay::{
        Builder as RelayBuilder, RelayProcess, TestRelay, base_config, binding, registry,
    };
    pub use crate::tokens::{claims, fixture_jwt, hs256, now_secs, rs256};
    pub use crate::{example_bin, fixture, init_logs, terminate};
}
