//! The client listener: the accept loop (TCP options, optional TLS, the handshake timeout,
//! the caps on handshakes in flight, in all and per client address) serving the edge's
//! router, one HTTP/1.1 request per TCP connection.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use super::Edge;
use super::http::{Peer, StreamHandoff};
use super::tls::TlsAcceptor;
use crate::limits::{ip_key, is_trusted_proxy};
use crate::state::Relay;

/// Socket options for a client connection: no Nagle delay; keepalive probes so a peer that
/// vanished without a FIN is found even when nothing is being sent (30 s idle, then 3 probes
/// 10 s apart); and a TCP user timeout equal to the write timeout, so the kernel gives up on
/// data a peer leaves unacknowledged as soon as the writer would. Best effort.
fn tune_socket(tcp: &tokio::net::TcpStream, write_timeout: Duration) {
    let _ = tcp.set_nodelay(true);
    let sock = socket2::SockRef::from(tcp);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    if let Err(e) = sock.set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "TCP keepalive not set");
    }
    #[cfg(target_os = "linux")]
    if let Err(e) = sock.set_tcp_user_timeout(Some(write_timeout)) {
        tracing::debug!(error = %e, "TCP user timeout not set");
    }
    #[cfg(not(target_os = "linux"))]
    let _ = write_timeout;
}

/// Accepts client connections until the relay shuts down. Each TCP connection serves one
/// HTTP/1.1 request (the upgrade) within the handshake timeout (TLS included).
pub async fn serve(listener: TcpListener, edge: Arc<Edge>, tls: Option<TlsAcceptor>) {
    let relay = edge.relay.clone();
    let path = relay.settings().config.listen.path.clone();
    let app = super::router(edge.clone(), &path);
    loop {
        let (tcp, peer) = tokio::select! {
            () = relay.shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let live = relay.settings();
        let limits = live.config.limits.clone();
        // One address's share first, from the accept on: connects that send nothing from one
        // address cannot hold the whole handshake budget. A trusted proxy speaks for many
        // clients and is not counted.
        let behind_proxy = is_trusted_proxy(peer.ip(), &live.config.listen.trusted_proxies);
        drop(live);
        let share = if behind_proxy {
            None
        } else {
            match edge
                .admission
                .handshakes_per_ip
                .try_acquire(ip_key(peer.ip()), limits.handshakes_per_ip())
            {
                Some(g) => Some(g),
                None => {
                    refuse_handshake(&relay, tcp, tls.is_some(), "handshakes_per_ip");
                    continue;
                }
            }
        };
        tune_socket(&tcp, Duration::from_secs(limits.write_timeout_seconds));
        let app = app.clone();
        let tls = tls.clone();
        let handshake = Duration::from_secs(limits.handshake_timeout_seconds);
        let relay2 = relay.clone();
        let edge2 = edge.clone();
        relay.tracker.spawn(async move {
            let mut share = share;
            // A slot of `maxHandshakesInFlight` only once the client has sent something.
            // The handshake timeout counts from the accept, the wait for first bytes included.
            let deadline = tokio::time::Instant::now() + handshake;
            let first = handshake.min(FIRST_BYTES_WITHIN);
            if !matches!(
                tokio::time::timeout(first, tcp.readable()).await,
                Ok(Ok(()))
            ) {
                relay2.metrics.refuse("handshake_timeout");
                tracing::debug!(%peer, "nothing sent after the TCP connect");
                return;
            }
            let Some(in_flight) = edge2
                .admission
                .handshakes
                .try_enter(limits.max_handshakes_in_flight as usize)
            else {
                refuse_handshake(&relay2, tcp, tls.is_some(), "handshakes");
                return;
            };
            let mut _in_flight = Some(in_flight);
            relay2
                .metrics
                .handshakes_in_flight
                .set(edge2.admission.handshakes.get() as i64);
            let handoff = Arc::new(tokio::sync::Notify::new());
            let handoff2 = handoff.clone();
            // The router, with the peer address as a request extension.
            let svc =
                hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(Peer(peer));
                    req.extensions_mut().insert(StreamHandoff(handoff2.clone()));
                    let mut app = app.clone();
                    tower_service::Service::call(&mut app, req)
                });
            let fut = async {
                // Keep-alive stays on: turning it off makes hyper answer the upgrade with
                // `Connection: close`. The handshake timeout bounds the connection anyway.
                let http = hyper::server::conn::http1::Builder::new();
                match tls {
                    Some(acceptor) => match acceptor.accept(tcp).await {
                        Ok(stream) => {
                            let _ = http
                                .serve_connection(TokioIo::new(stream), svc)
                                .with_upgrades()
                                .await;
                        }
                        Err(e) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    },
                    None => {
                        let _ = http
                            .serve_connection(TokioIo::new(tcp), svc)
                            .with_upgrades()
                            .await;
                    }
                }
            };
            tokio::pin!(fut);
            let timed_out = tokio::select! {
                () = &mut fut => false,
                () = tokio::time::sleep_until(deadline) => true,
                // An SSE stream: served for its life, which its session bounds.
                () = handoff.notified() => {
                    drop(_in_flight.take());
                    drop(share.take());
                    relay2
                        .metrics
                        .handshakes_in_flight
                        .set(edge2.admission.handshakes.get() as i64);
                    fut.await;
                    false
                }
            };
            if timed_out {
                relay2.metrics.refuse("handshake_timeout");
                tracing::debug!(%peer, "handshake timed out");
            }
            drop(_in_flight);
            relay2
                .metrics
                .handshakes_in_flight
                .set(edge2.admission.handshakes.get() as i64);
        });
    }
}

/// How long a new TCP connection may stay silent before it is closed; it takes a handshake
/// slot only once it has sent something (`limits.handshakeTimeoutSeconds`, if shorter).
pub const FIRST_BYTES_WITHIN: Duration = Duration::from_secs(5);

/// Refuses a TCP connection over a handshake limit, counted under `reason`. On ws:// a fixed
/// answer costs nothing; on wss:// answering would need the TLS handshake the limit protects
/// against: close.
fn refuse_handshake(relay: &Relay, tcp: tokio::net::TcpStream, tls: bool, reason: &'static str) {
    relay.metrics.refuse(reason);
    tracing::debug!(reason, "handshake limit reached");
    if !tls {
        relay.tracker.spawn(refuse_raw(tcp));
    }
}

/// Answers a plain-TCP client 503 without reading its request (a handshake limit), bounded
/// in time. What the client sent is read and dropped until it closes too: closing with
/// unread bytes would send a reset that can overtake the answer.
async fn refuse_raw(mut tcp: tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt;
    const ANSWER: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: 10\r\n\r\nhandshakes";
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        tcp.write_all(ANSWER).await?;
        tcp.shutdown().await?;
        let mut sink = [0u8; 1024];
        while tcp.read(&mut sink).await? > 0 {}
        Ok::<(), std::io::Error>(())
    })
    .await;
}
