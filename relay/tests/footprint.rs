//! What an idle connection holds in the relay's memory, checked where it is deterministic:
//! the size of its connection future (the tokio task that owns it is that size, for the
//! connection's whole life). A request's future is boxed for the request's duration only;
//! held inline it made this 4,440 bytes in a release build (2,784 of them for `handle`), a
//! quarter of an idle connection's 10 KiB. `make bench`'s idle workload measures the whole
//! (RSS per connection).

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use futures::StreamExt;

use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use wsrelay::config::SlowConsumerPolicy;
use wsrelay::conn::outbox::Outbox;
use wsrelay_testkit::prelude::*;

/// The size of a future's state, without polling it.
fn size_of_future<F: std::future::Future>(_: &F) -> usize {
    std::mem::size_of::<F>()
}

#[tokio::test]
async fn an_idle_connections_future_stays_small() {
    let nats = Nats::start();
    let c = TestRelay::builder(&nats).build();
    let running = TestRelay::start(c.clone()).await;
    let relay = running.relay.clone();
    let (server_io, _client_io) = tokio::io::duplex(1024);
    let ws = WebSocketStream::from_raw_socket(
        server_io,
        Role::Server,
        Some(wsrelay::edge::websocket::ws_config(&c.limits)),
    )
    .await;
    let conn = relay.register(
        Arc::new(Outbox::new(64, SlowConsumerPolicy::Disconnect)),
        None,
        None,
    );
    let (sink, stream) = ws.split();
    let run = wsrelay::session::run(
        sink,
        stream,
        relay.clone(),
        conn.clone(),
        None,
        wsrelay::session::Welcome::default(),
    );
    let size = size_of_future(&run);
    eprintln!("connection future: {size} bytes");
    // 1,488 bytes (release) when written; debug builds lay futures out alike here. The
    // bound leaves room for a field or two, not for an inlined request future.
    assert!(size <= 2048, "the connection future is {size} bytes");
    drop(run);
    relay.unregister(
        &conn,
        wsrelay::conn::close::End::Closed(wsrelay::conn::close::Cause::PeerGone),
    );
    running.drain().await;
}
