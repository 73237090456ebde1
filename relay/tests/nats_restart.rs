//! The relay and its NATS connection: NATS stopped and started again on the same port (the
//! relay reports not ready, then resubscribes by itself and delivery resumes; prints how
//! many messages were lost), NATS absent at start, credentials and TLS from files.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use wsrelay_testkit::prelude::*;

#[tokio::test]
async fn relay_resubscribes_after_nats_restart() {
    init_logs();
    let mut nats = Nats::start();
    let port = nats.port;
    let relay = TestRelay::builder(&nats)
        .binding("t", "public.t", Direction::Both)
        .start()
        .await;
    let (addr, admin) = (relay.client_addr, relay.admin_addr);
    assert!(
        eventually(Duration::from_secs(10), || async {
            http_get(admin, "/ready").await.0 == 200
        })
        .await
    );
    let mut ws = connect(addr, "").await;
    assert_eq!(subscribe(&mut ws, 1, "t").await["type"], "ok");
    let mut pubc = connect(addr, "").await;

    // A publisher with its own connection, sending a numbered message every 10 ms for
    // the whole test (async-nats buffers while it is disconnected).
    let publisher = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .reconnect_delay_callback(|n| Duration::from_millis((n as u64 * 100).min(500)))
        .connect(nats.url())
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let (stop2, sent2) = (stop.clone(), sent.clone());
    let pub_task = tokio::spawn(async move {
        for i in 1..=3_000u64 {
            if stop2.load(Ordering::SeqCst) {
                break;
            }
            if publisher
                .publish("public.t", i.to_string().into())
                .await
                .is_ok()
            {
                sent2.store(i, Ordering::SeqCst);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), publisher.flush()).await;
    });
    let received = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let r2 = received.clone();
    let reader = tokio::spawn(async move {
        loop {
            match next_event(&mut ws, Duration::from_secs(30)).await {
                Got::Json(v) if v["type"] == "message" => {
                    r2.lock().unwrap().push(v["payload"].as_u64().unwrap());
                }
                Got::Json(_) => {}
                _ => break,
            }
        }
        ws
    });
    assert!(
        eventually(Duration::from_secs(10), || async {
            received.lock().unwrap().len() >= 20
        })
        .await
    );

    nats.stop();
    assert!(
        eventually(Duration::from_secs(10), || async {
            http_get(admin, "/ready").await.0 == 503
        })
        .await,
        "/ready stays 200 while NATS is down"
    );
    assert_eq!(metric(admin, "wsrelay_nats_connected ").await, Some(0.0));
    // A client publish while NATS is down is answered 503, and the client stays.
    let r = request(
        &mut pubc,
        serde_json::json!({"type":"publish","id":1,"channel":"t","text":"x"}),
    )
    .await;
    assert_eq!(r["code"], 503, "{r}");
    let outage_started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _nats = Nats::start_on(port);
    assert!(
        eventually(Duration::from_secs(15), || async {
            http_get(admin, "/ready").await.0 == 200
        })
        .await,
        "relay did not reconnect"
    );
    let outage = outage_started.elapsed();
    // Delivery resumes: messages sent well after the restart arrive.
    let resumed_from = sent.load(Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(15), || async {
            received
                .lock()
                .unwrap()
                .iter()
                .any(|n| *n > resumed_from + 20)
        })
        .await,
        "delivery did not resume after the NATS restart"
    );
    stop.store(true, Ordering::SeqCst);
    pub_task.await.unwrap();
    let total = sent.load(Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(10), || async {
            received.lock().unwrap().last().copied() == Some(total)
        })
        .await,
        "the last message ({total}) never arrived"
    );
    let got = received.lock().unwrap().clone();
    let distinct: std::collections::BTreeSet<u64> = got.iter().copied().collect();
    let lost = total - distinct.len() as u64;
    println!(
        "NATS restart: outage {:.1} s, sent {total}, received {}, lost {lost} ({:.1}%)",
        outage.as_secs_f64(),
        distinct.len(),
        100.0 * lost as f64 / total as f64
    );
    assert!(
        metric(admin, "wsrelay_nats_disconnects_total")
            .await
            .unwrap()
            >= 1.0
    );
    assert_eq!(relay.relay.hub.subject_count(), 1);
    reader.abort();
    relay.drain().await;
}

#[tokio::test]
async fn relay_starts_without_nats_and_becomes_ready_when_it_appears() {
    init_logs();
    let port = free_port();
    let relay = tokio::time::timeout(
        Duration::from_secs(10),
        TestRelay::builder(&format!("nats://127.0.0.1:{port}")).start(),
    )
    .await
    .expect("start does not wait for NATS");
    let admin = relay.admin_addr;
    assert_eq!(http_get(admin, "/live").await.0, 200);
    assert_eq!(http_get(admin, "/ready").await.0, 503);
    let _nats = Nats::start_on(port);
    assert!(
        eventually(Duration::from_secs(15), || async {
            http_get(admin, "/ready").await.0 == 200
        })
        .await,
        "never became ready"
    );
    relay.drain().await;
}

/// Credentials and TLS towards NATS, each from files, against a real nats-server.
#[tokio::test]
async fn nats_credentials_and_tls_from_files() {
    init_logs();
    let dir = std::env::temp_dir().join(format!("wsrelay-natsauth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let user = write("user", "relay\n");
    let pass = write("pass", "s3cret\n");
    let token = write("token", "tok-123\n");
    let (cert, key) = (fixture("tls.crt"), fixture("tls.key"));
    type Setup = Box<dyn Fn(&mut wsrelay::config::Config)>;
    let cases: Vec<(Vec<String>, Setup, &str)> = vec![
        (
            vec![
                "--user".into(),
                "relay".into(),
                "--pass".into(),
                "s3cret".into(),
            ],
            Box::new(move |c| {
                c.nats.credentials.user_file = Some(user.clone());
                c.nats.credentials.password_file = Some(pass.clone());
            }),
            "nats",
        ),
        (
            vec!["--auth".into(), "tok-123".into()],
            Box::new(move |c| c.nats.credentials.token_file = Some(token.clone())),
            "nats",
        ),
        (
            vec![
                "--tls".into(),
                "--tlscert".into(),
                cert.display().to_string(),
                "--tlskey".into(),
                key.display().to_string(),
            ],
            Box::new(|c| {
                c.nats.tls = Some(wsrelay::config::NatsTls {
                    ca_file: Some(fixture("ca.crt")),
                    ..Default::default()
                });
            }),
            "tls",
        ),
    ];
    for (args, set, scheme) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let nats = Nats::start_args(&args);
        let port = nats.port;
        let relay = TestRelay::builder(&format!("{scheme}://127.0.0.1:{port}"))
            .config(|c| set(c))
            .start()
            .await;
        let admin = relay.admin_addr;
        assert!(
            eventually(Duration::from_secs(10), || async {
                http_get(admin, "/ready").await.0 == 200
            })
            .await,
            "not ready with {args:?}"
        );
        relay.drain().await;
    }
    // Wrong credentials: the relay runs but never becomes ready.
    let nats = Nats::start_args(&["--auth", "other"]);
    let port = nats.port;
    let relay = TestRelay::builder(&format!("nats://127.0.0.1:{port}"))
        .config(|c| c.nats.credentials.token_file = Some(dir.join("token")))
        .start()
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(http_get(relay.admin_addr, "/ready").await.0, 503);
    relay.drain().await;
    let _ = std::fs::remove_dir_all(&dir);
}
