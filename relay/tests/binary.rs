//! The real relay binary, driven by signals.
//!
//! - SIGTERM with 1,000 connected clients: /ready goes false, new connections are refused,
//!   every client gets a `drain` notice and a 1012 close spread across the grace period,
//!   and the process exits 0 before the grace period ends.
//! - SIGHUP (and file changes): the config is reloaded with connections kept; the TLS
//!   certificate is reloaded when its files change, and so is the JWT key (a rotated Secret).

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use wsrelay_testkit::prelude::*;

const CLIENTS: usize = 1_000;
const GRACE_SECS: u64 = 8;

struct Outcome {
    drain_hint_ms: Option<u64>,
    close: Option<u16>,
    closed_at: Option<Duration>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_every_client_across_the_grace_period() {
    init_logs();
    let nats = Nats::start();
    let c = TestRelay::builder(&nats)
        .max_connections(5_000)
        .config(|c| {
            c.drain.grace_period_seconds = GRACE_SECS;
        })
        .build();
    let dir = std::env::temp_dir().join(format!("wsrelay-drain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.yaml");
    std::fs::write(&path, serde_json::to_string_pretty(&c).unwrap()).unwrap();
    let mut relay = RelayProcess::spawn(env!("CARGO_BIN_EXE_wsrelay").as_ref(), &path, "info");
    assert!(
        eventually(Duration::from_secs(10), || async {
            http_get(relay.admin, "/ready").await.0 == 200
        })
        .await
    );

    // Connect the clients, 100 at a time.
    let mut clients = Vec::with_capacity(CLIENTS);
    for chunk in 0..CLIENTS / 100 {
        let batch: Vec<_> = (0..100)
            .map(|i| {
                let addr = relay.client;
                tokio::spawn(async move {
                    let mut ws = connect(addr, "").await;
                    if (chunk * 100 + i) % 10 == 0 {
                        assert_eq!(subscribe(&mut ws, 1, "public.x").await["type"], "ok");
                    }
                    ws
                })
            })
            .collect();
        for t in batch {
            clients.push(t.await.unwrap());
        }
    }
    assert_eq!(
        metric(relay.admin, "wsrelay_connections ").await,
        Some(CLIENTS as f64)
    );

    let sigterm_at = tokio::time::Instant::now();
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let mut out = Outcome {
                    drain_hint_ms: None,
                    close: None,
                    closed_at: None,
                };
                let deadline = sigterm_at + Duration::from_secs(GRACE_SECS + 5);
                loop {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    match next_event(&mut ws, left).await {
                        Got::Json(v) if v["type"] == "drain" => {
                            out.drain_hint_ms = v["reconnectAfterMs"].as_u64()
                        }
                        Got::Json(_) => {}
                        Got::Closed(code) => {
                            out.close = code;
                            out.closed_at = Some(sigterm_at.elapsed());
                            break;
                        }
                        Got::Timeout => break,
                    }
                }
                out
            })
        })
        .collect();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(relay.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();

    // Readiness goes false and new clients are refused while the relay drains: seen before
    // it exits (its admin port goes with it), however late this test gets to look.
    assert!(
        eventually(Duration::from_secs(20), || async {
            http_get(relay.admin, "/ready").await.0 == 503
        })
        .await
    );
    assert_eq!(connect_with(relay.client, "", &[]).await.err(), Some(503));

    // The process exits 0 before the grace period ends: watched here, while the client tasks
    // read their closes on their own, so that their reading does not delay the measurement.
    let status = loop {
        if let Some(s) = relay.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(GRACE_SECS + 20),
            "relay did not exit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let exited_after = started.elapsed();
    let mut outcomes = Vec::with_capacity(CLIENTS);
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    assert!(status.success(), "exit status {status:?}");
    assert!(
        exited_after < Duration::from_secs(GRACE_SECS),
        "exited after {exited_after:?}"
    );

    let with_drain = outcomes
        .iter()
        .filter(|o| o.drain_hint_ms.is_some())
        .count();
    let with_1012 = outcomes.iter().filter(|o| o.close == Some(1012)).count();
    // Every client got its 1012 before the relay exited, and the relay exits at its drain
    // deadline (0.9 of the grace period) whatever is still open (without a close frame):
    // so every close came in the grace period. The times this process read the closes at
    // are not checked against it: on two loaded cores its readers lag by seconds.
    assert_eq!(with_drain, CLIENTS, "every client gets a drain notice");
    assert_eq!(with_1012, CLIENTS, "every client gets 1012");
    let grace = Duration::from_secs(GRACE_SECS);
    let times: Vec<Duration> = outcomes.iter().filter_map(|o| o.closed_at).collect();
    // Closes follow the hints: no client is closed before its announced turn (a lower
    // bound, which a slow reader cannot break; how late is the relay's schedule, below).
    for o in &outcomes {
        let hint = Duration::from_millis(o.drain_hint_ms.unwrap());
        let at = o.closed_at.unwrap();
        assert!(
            at + Duration::from_millis(50) >= hint,
            "closed at {at:?} before its hint {hint:?}"
        );
    }
    // Spread: histogram of the closes over tenths of the grace period (printed), and of the
    // announced turns (checked: the relay's schedule, which the closes follow as checked
    // above; the times this process read the closes at shift between tenths when it stalls).
    let tenth = |t: Duration| ((t.as_secs_f64() / grace.as_secs_f64()) * 10.0).min(9.0) as usize;
    let mut hist = [0usize; 10];
    for t in &times {
        hist[tenth(*t)] += 1;
    }
    let mut turns = [0usize; 10];
    for o in &outcomes {
        turns[tenth(Duration::from_millis(o.drain_hint_ms.unwrap()))] += 1;
    }
    println!(
        "drain of {CLIENTS} clients, grace {GRACE_SECS} s, exit after {:.2} s",
        exited_after.as_secs_f64()
    );
    for (i, n) in hist.iter().enumerate() {
        println!(
            "  {:>4.1}-{:>4.1} s  {:>4}  {}",
            i as f64 * GRACE_SECS as f64 / 10.0,
            (i + 1) as f64 * GRACE_SECS as f64 / 10.0,
            n,
            "#".repeat(n / 5)
        );
    }
    println!("  announced turns per tenth: {turns:?}");
    // The close window is the first 70% of the grace period; each of its tenths of the
    // grace period holds a fair share (100 expected), none holds most.
    for (i, n) in turns.iter().take(7).enumerate() {
        assert!(
            (40..=250).contains(n),
            "tenth {i} holds {n} turns: {turns:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn tls_client_config(ca: &str) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(fixture(ca)).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

type Wss =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A wss client trusting only the certificate in fixture `ca`.
async fn connect_wss(addr: SocketAddr, ca: &str) -> Result<Wss, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(tls_client_config(ca)).connect(name, tcp),
    )
    .await
    .map_err(|_| "TLS timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    let (ws, _) =
        tokio_tungstenite::client_async(format!("wss://localhost:{}/ws", addr.port()), tls)
            .await
            .map_err(|e| e.to_string())?;
    Ok(ws)
}

async fn next_text<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> serde_json::Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures::StreamExt;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("frame timed out")
            .expect("stream ended")
            .expect("read error");
        if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
            return serde_json::from_str(t.as_str()).unwrap();
        }
    }
}

async fn send_text<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, v: serde_json::Value)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::text(v.to_string()))
        .await
        .unwrap();
}

#[tokio::test]
async fn sighup_reload_and_tls_rotation_keep_connections() {
    use serde_json::json;
    init_logs();
    let nats = Nats::start();
    let dir = std::env::temp_dir().join(format!("wsrelay-reload-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::copy(fixture("tls.crt"), &cert).unwrap();
    std::fs::copy(fixture("tls.key"), &key).unwrap();
    let mut c = TestRelay::builder(&nats)
        .tls(cert.clone(), key.clone())
        .binding("news", "public.news", Direction::Subscribe)
        .binding("orders.{id}", "orders.{id}", Direction::Subscribe)
        .build();
    let path = dir.join("config.yaml");
    std::fs::write(&path, serde_json::to_string_pretty(&c).unwrap()).unwrap();
    let mut relay = RelayProcess::spawn(env!("CARGO_BIN_EXE_wsrelay").as_ref(), &path, "info");

    let mut ws = connect_wss(relay.client, "ca.crt")
        .await
        .expect("wss with the first certificate");
    assert_eq!(next_text(&mut ws).await["type"], "welcome");
    assert!(
        connect_wss(relay.client, "ca2.crt").await.is_err(),
        "the second certificate is not served yet"
    );
    send_text(&mut ws, json!({"type":"subscribe","id":1,"channel":"news"})).await;
    assert_eq!(next_text(&mut ws).await, json!({"type":"ok","id":1}));
    send_text(
        &mut ws,
        json!({"type":"subscribe","id":2,"channel":"orders.1"}),
    )
    .await;
    assert_eq!(next_text(&mut ws).await, json!({"type":"ok","id":2}));

    // Rotate the certificate: new connections get the new one, the open one stays.
    std::fs::copy(fixture("tls2.key"), &key).unwrap();
    std::fs::copy(fixture("tls2.crt"), &cert).unwrap();
    assert!(
        eventually(Duration::from_secs(15), || async {
            connect_wss(relay.client, "ca2.crt").await.is_ok()
        })
        .await,
        "the rotated certificate was not picked up"
    );

    // Reload: remove `news`; SIGHUP.
    c.bindings.retain(|b| b.channel != "news");
    std::fs::write(&path, serde_json::to_string_pretty(&c).unwrap()).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(relay.child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    assert_eq!(
        next_text(&mut ws).await,
        json!({"type":"unsubscribed","channel":"news","reason":"binding removed"})
    );
    // Same connection, still served.
    let nc = nats.client().await;
    nc.publish("orders.1", "1".into()).await.unwrap();
    nc.flush().await.unwrap();
    assert_eq!(
        next_text(&mut ws).await,
        json!({"type":"message","channel":"orders.1","payload":1})
    );
    assert!(metric_wss_free(relay.admin).await);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(relay.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = relay.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "relay did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_jwt_key_file_takes_effect_without_a_restart() {
    use serde_json::json;
    init_logs();
    let nats = Nats::start();
    let dir = std::env::temp_dir().join(format!("wsrelay-key-rotation-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("hmac");
    let (old_key, new_key) = (
        "the-first-key-of-at-least-32-bytes-long",
        "the-second-key-of-at-least-32-bytes-long",
    );
    std::fs::write(&key_file, old_key).unwrap();
    // The fixture's verification, but reading the key from a file this test rotates.
    let mut jwt = fixture_jwt();
    jwt.key.hmac_secret_file = Some(key_file.clone());
    jwt.issuer = None;
    jwt.audiences.clear();
    let c = TestRelay::builder(&nats)
        .jwt(jwt)
        .binding("news", "public.news", Direction::Subscribe)
        .build();
    let path = dir.join("config.yaml");
    std::fs::write(&path, serde_json::to_string_pretty(&c).unwrap()).unwrap();
    let relay = RelayProcess::spawn(env!("CARGO_BIN_EXE_wsrelay").as_ref(), &path, "info");
    let token = |key: &str| {
        let claims = json!({"sub": "alice", "exp": now_secs() + 600});
        let t = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(key.as_bytes()),
        )
        .unwrap();
        format!("?token={t}")
    };

    let mut open = connect(relay.client, &token(old_key)).await;
    assert_eq!(subscribe(&mut open, 1, "news").await["type"], "ok");
    assert_eq!(
        connect_with(relay.client, &token(new_key), &[]).await.err(),
        Some(401)
    );

    // Rotate the key as a Secret update would: the file's content changes, nothing else.
    std::fs::write(&key_file, new_key).unwrap();
    assert!(
        eventually(Duration::from_secs(15), || async {
            connect_with(relay.client, &token(new_key), &[])
                .await
                .is_ok()
        })
        .await,
        "the new key was not picked up"
    );
    assert_eq!(
        connect_with(relay.client, &token(old_key), &[]).await.err(),
        Some(401)
    );
    // The connection opened with the old key is still served.
    let nc = nats.client().await;
    nc.publish("public.news", "still here".into())
        .await
        .unwrap();
    nc.flush().await.unwrap();
    assert_eq!(
        next_json(&mut open).await,
        Some(json!({"type":"message","channel":"news","text":"still here"}))
    );
    drop(relay);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The reload counter says one successful reload (SIGHUP and the file poll may both have
/// seen the change; the second finds nothing to end).
/// The reload counter moves after the reload's notices are queued: poll it, bounded.
async fn metric_wss_free(admin: SocketAddr) -> bool {
    eventually(Duration::from_secs(20), || async {
        metric(admin, "wsrelay_config_reloads_total{reason=\"ok\"}")
            .await
            .is_some_and(|n| n >= 1.0)
    })
    .await
}

#[test]
fn check_config_prints_every_error() {
    let dir = std::env::temp_dir().join(format!("wsrelay-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "nats:\n  urls: [http://nope]\nauth:\n  allowAnonymous: false\nbindings:\n  - channel: orders.*\n    subject: orders.{id}\nlimits:\n  maxConnections: 0\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wsrelay"))
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for field in [
        "nats.urls[0]",
        "auth.jwt",
        "bindings[0].channel",
        "limits.maxConnections",
    ] {
        assert!(err.contains(field), "{field} missing from:\n{err}");
    }
    let unknown = dir.join("unknown.yaml");
    std::fs::write(&unknown, "nats: {urls: [nats://x:4222]}\nbindngs: []\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wsrelay"))
        .args(["check-config"])
        .arg(&unknown)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bindngs"));
    let good = dir.join("good.yaml");
    std::fs::write(
        &good,
        "nats: {urls: [nats://x:4222]}\nauth: {allowAnonymous: true}\nbindings: [{channel: news, subject: public.news}]\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wsrelay"))
        .arg("check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // --check-files reports files that cannot be read.
    let files = dir.join("files.yaml");
    std::fs::write(
        &files,
        "nats: {urls: [nats://x:4222], credentials: {credsFile: /nonexistent/user.creds}}\nauth: {allowAnonymous: true}\nbindings: [{channel: news, subject: public.news}]\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wsrelay"))
        .args(["check-config", "--check-files"])
        .arg(&files)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nats.credentials.credsFile: cannot read"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

/// Resident memory per idle (unauthenticated) WebSocket connection of the relay binary, in
/// this debug build: IDLE_CONNECTIONS connections (default 1,000, small enough for every
/// `make test`; `make bench`'s idle workload measures release builds at 18,000). Asserted
/// under a bound with room for allocator noise, so that a connection that starts holding a
/// buffer of its own (a 64 KiB read buffer, an unshrunk queue) fails it.
#[tokio::test]
async fn idle_memory_per_connection() {
    let n: usize = std::env::var("IDLE_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000)
        .max(250)
        / 250
        * 250;
    let nats = Nats::start();
    let c = TestRelay::builder(&nats)
        .max_connections(20_000)
        .config(|c| {
            c.limits.idle_timeout_seconds = 600;
            c.limits.ping_interval_seconds = 300;
        })
        .build();
    let dir = std::env::temp_dir().join(format!("wsrelay-mem-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.yaml");
    std::fs::write(&path, serde_json::to_string(&c).unwrap()).unwrap();
    let relay = RelayProcess::spawn(env!("CARGO_BIN_EXE_wsrelay").as_ref(), &path, "info");
    let pid = relay.child.id();
    // Warm: one connection first, so that what every relay allocates once (the first
    // connection's runtime structures) is not counted per connection.
    let warm = raw_ws(relay.client).await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            metric(relay.admin, "wsrelay_connections ").await == Some(1.0)
        })
        .await
    );
    let before = rss_kib(pid);
    let mut socks = Vec::with_capacity(n);
    for _ in 0..n / 250 {
        let batch: Vec<_> = (0..250)
            .map(|_| tokio::spawn(raw_ws(relay.client)))
            .collect();
        for t in batch {
            socks.push(t.await.unwrap());
        }
    }
    assert!(
        eventually(Duration::from_secs(20), || async {
            metric(relay.admin, "wsrelay_connections ").await == Some((n + 1) as f64)
        })
        .await
    );
    let after = rss_kib(pid);
    let per = after.saturating_sub(before) as f64 / n as f64;
    println!(
        "{n} idle connections: RSS {before} KiB -> {after} KiB, {per:.1} KiB per connection (debug build)"
    );
    assert!(
        per <= MAX_IDLE_KIB,
        "{per:.1} KiB per idle connection, above {MAX_IDLE_KIB} KiB"
    );
    drop((socks, warm));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The bound for [`idle_memory_per_connection`] in a debug build: twice what 1,000
/// connections measured (10.2 KiB each, 7.5 at 4,000; 2026-12-06).
const MAX_IDLE_KIB: f64 = 20.0;
