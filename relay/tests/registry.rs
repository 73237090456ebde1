//! The connection registry (docs/design/presence.md): two relays on one JetStream-enabled
//! nats-server keep `relay.<relay>` and `conn.<relay>.<conn>` keys in one KV bucket, read
//! here with a plain async-nats KV client; a relay stopped gracefully removes its keys, a
//! killed one is purged by the survivor when its lease expires, or at once by
//! `POST /registry/forget`.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use futures::TryStreamExt;
use wsrelay_testkit::prelude::*;

const BUCKET: &str = "WSRELAY_TEST_REG";

/// An in-process relay named `name` with the registry, its bucket in place.
async fn relay(nats: &Nats, name: &str, lease_seconds: u64) -> TestRelay {
    TestRelay::builder(nats)
        .registry(BUCKET, name, lease_seconds)
        .start()
        .await
}

/// The registry's live keys, sorted.
async fn keys(nats: &Nats) -> Vec<String> {
    let client = async_nats::connect(nats.url()).await.unwrap();
    let kv = async_nats::jetstream::new(client)
        .get_key_value(BUCKET)
        .await
        .unwrap();
    let mut keys: Vec<String> = tokio::time::timeout(Duration::from_secs(10), async {
        kv.keys().await.unwrap().try_collect().await.unwrap()
    })
    .await
    .expect("the keys were listed");
    keys.sort();
    keys
}

fn of(keys: &[String], prefix: &str) -> usize {
    keys.iter().filter(|k| k.starts_with(prefix)).count()
}

/// Waits until the registry's keys satisfy `ok`; the keys last seen.
async fn keys_until(nats: &Nats, within: Duration, ok: impl Fn(&[String]) -> bool) -> Vec<String> {
    let deadline = Instant::now() + within;
    loop {
        let k = keys(nats).await;
        if ok(&k) || Instant::now() > deadline {
            return k;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The relay binary `name`, with the registry, from a config file; its bucket in place.
async fn relay_process(nats: &Nats, name: &str, lease_seconds: u64) -> RelayProcess {
    let name = name.to_owned();
    let c = TestRelay::builder(nats)
        .registry(BUCKET, &name, lease_seconds)
        .build();
    let relay = RelayProcess::spawn_config(
        env!("CARGO_BIN_EXE_wsrelay").as_ref(),
        &c,
        &format!("registry-{name}"),
        "info",
    );
    assert!(
        eventually(Duration::from_secs(20), || async {
            metric(relay.admin, "wsrelay_registry_ready").await == Some(1.0)
        })
        .await,
        "the registry's bucket was not put in place"
    );
    relay
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_on_each_relay_is_a_conn_key_until_it_closes() {
    init_logs();
    let (_store, nats) = jetstream_nats("registry-conns");
    let a = relay(&nats, "relay-a", 15).await;
    let b = relay(&nats, "relay-b", 15).await;
    let mut on_a = a.connect("").await;
    let _on_b = b.connect("").await;
    let k = keys_until(&nats, Duration::from_secs(10), |k| {
        of(k, "conn.relay-a.") == 1 && of(k, "conn.relay-b.") == 1
    })
    .await;
    assert_eq!(of(&k, "conn.relay-a."), 1, "{k:?}");
    assert_eq!(of(&k, "conn.relay-b."), 1, "{k:?}");
    assert!(k.contains(&"relay.relay-a".to_owned()), "{k:?}");
    assert!(k.contains(&"relay.relay-b".to_owned()), "{k:?}");

    on_a.close(None).await.unwrap();
    let k = keys_until(&nats, Duration::from_secs(10), |k| {
        of(k, "conn.relay-a.") == 0
    })
    .await;
    assert_eq!(of(&k, "conn.relay-a."), 0, "{k:?}");
    assert_eq!(
        of(&k, "conn.relay-b."),
        1,
        "the other relay's entry stays: {k:?}"
    );
    assert!(a.metric("wsrelay_registry_keys_deleted_total").await >= Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_stopped_gracefully_deletes_its_keys() {
    init_logs();
    let (_store, nats) = jetstream_nats("registry-stop");
    let a = relay(&nats, "relay-a", 15).await;
    let b = relay(&nats, "relay-b", 15).await;
    let _c1 = b.connect("").await;
    let _c2 = b.connect("").await;
    let _on_a = a.connect("").await;
    let k = keys_until(&nats, Duration::from_secs(10), |k| {
        of(k, "conn.relay-b.") == 2 && of(k, "conn.relay-a.") == 1
    })
    .await;
    assert_eq!(of(&k, "conn.relay-b."), 2, "{k:?}");

    b.drain().await;
    // The drain returned after the deletes were acknowledged: no wait needed.
    let k = keys(&nats).await;
    assert_eq!(of(&k, "conn.relay-b."), 0, "{k:?}");
    assert!(!k.contains(&"relay.relay-b".to_owned()), "{k:?}");
    assert_eq!(of(&k, "conn.relay-a."), 1, "{k:?}");
    assert!(k.contains(&"relay.relay-a".to_owned()), "{k:?}");
    // The survivor saw a delete (a goodbye), not an expiry: it purged nothing.
    assert_eq!(
        a.metric("wsrelay_registry_purges_total{reason=\"lease_expired\"}")
            .await,
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relay_is_purged_by_the_survivor_when_its_lease_expires() {
    init_logs();
    const LEASE: u64 = 3;
    let (_store, nats) = jetstream_nats("registry-expiry");
    let a = relay(&nats, "relay-a", LEASE).await;
    let mut b = relay_process(&nats, "relay-b", LEASE).await;
    let _c1 = connect(b.client, "").await;
    let _c2 = connect(b.client, "").await;
    let _on_a = a.connect("").await;
    let k = keys_until(&nats, Duration::from_secs(10), |k| {
        of(k, "conn.relay-b.") == 2 && of(k, "conn.relay-a.") == 1
    })
    .await;
    assert_eq!(of(&k, "conn.relay-b."), 2, "{k:?}");

    b.child.kill().unwrap();
    b.child.wait().unwrap();
    let killed = Instant::now();
    // Bound: the lease, then the marker's delivery and the purge; generous for 2 loaded cores.
    let k = keys_until(&nats, Duration::from_secs(LEASE + 5 + 20), |k| {
        of(k, "conn.relay-b.") == 0 && !k.contains(&"relay.relay-b".to_owned())
    })
    .await;
    let took = killed.elapsed();
    assert_eq!(of(&k, "conn.relay-b."), 0, "{k:?}");
    assert!(!k.contains(&"relay.relay-b".to_owned()), "{k:?}");
    assert_eq!(
        of(&k, "conn.relay-a."),
        1,
        "the survivor's own entry stays: {k:?}"
    );
    assert!(k.contains(&"relay.relay-a".to_owned()), "{k:?}");
    eprintln!(
        "purged {} ms after the SIGKILL (lease {LEASE} s)",
        took.as_millis()
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            a.metric("wsrelay_registry_purges_total{reason=\"lease_expired\"}")
                .await
                == Some(1.0)
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_purges_a_dead_relay_at_once_and_refuses_bad_names() {
    init_logs();
    // A long lease: only the endpoint can purge within the test.
    const LEASE: u64 = 600;
    let (_store, nats) = jetstream_nats("registry-forget");
    let a = relay(&nats, "relay-a", LEASE).await;
    let mut b = relay_process(&nats, "relay-b", LEASE).await;
    let _c1 = connect(b.client, "").await;
    let _c2 = connect(b.client, "").await;
    let _on_a = a.connect("").await;
    let k = keys_until(&nats, Duration::from_secs(10), |k| {
        of(k, "conn.relay-b.") == 2 && of(k, "conn.relay-a.") == 1
    })
    .await;
    assert_eq!(of(&k, "conn.relay-b."), 2, "{k:?}");
    b.child.kill().unwrap();
    b.child.wait().unwrap();

    for (path, status) in [
        ("/registry/forget", 400),
        ("/registry/forget?relay=", 400),
        ("/registry/forget?relay=a.b", 400),
        ("/registry/forget?relay=a%3Eb", 400),
        ("/registry/forget?relay=relay-a", 409),
    ] {
        assert_eq!(http_post(a.admin(), path, "").await.0, status, "{path}");
    }
    assert_eq!(keys(&nats).await, k, "a refused forget deletes nothing");

    let started = Instant::now();
    let (status, body) = http_post(a.admin(), "/registry/forget?relay=relay-b", "").await;
    let took = started.elapsed();
    assert_eq!((status, body.as_str()), (200, r#"{"deleted":3}"#));
    // Acknowledged before the answer: gone at once.
    let k = keys(&nats).await;
    assert_eq!(of(&k, "conn.relay-b."), 0, "{k:?}");
    assert!(!k.contains(&"relay.relay-b".to_owned()), "{k:?}");
    assert_eq!(of(&k, "conn.relay-a."), 1, "{k:?}");
    eprintln!("forget answered in {} ms", took.as_millis());
    assert_eq!(
        a.metric("wsrelay_registry_purges_total{reason=\"forget\"}")
            .await,
        Some(1.0)
    );
    // Idempotent: nothing left to delete.
    assert_eq!(
        http_post(a.admin(), "/registry/forget?relay=relay-b", "").await,
        (200, r#"{"deleted":1}"#.to_owned())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_registry_section_there_is_no_bucket_and_no_endpoint() {
    init_logs();
    let (_store, nats) = jetstream_nats("registry-none");
    let a = TestRelay::builder(&nats).ready().start().await;
    let _c = a.connect("").await;
    assert_eq!(a.metric("wsrelay_registry_ready").await, Some(0.0));
    assert_eq!(
        http_post(a.admin(), "/registry/forget?relay=x", "").await.0,
        404
    );
    let client = async_nats::connect(nats.url()).await.unwrap();
    assert!(
        async_nats::jetstream::new(client)
            .get_key_value(BUCKET)
            .await
            .is_err()
    );
}

/// A container restart keeps the pod name: the relay started again under the same name
/// deletes what its previous run left (its connections are gone), before its lease could
/// expire, and keeps its own new entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_restarted_under_its_name_deletes_what_its_previous_run_left() {
    init_logs();
    // A long lease: only the restart can remove the old entries within the test.
    const LEASE: u64 = 600;
    let (_store, nats) = jetstream_nats("registry-restart");
    let mut first = relay_process(&nats, "relay-r", LEASE).await;
    let _c1 = connect(first.client, "").await;
    let _c2 = connect(first.client, "").await;
    let _c3 = connect(first.client, "").await;
    let k = keys_until(&nats, Duration::from_secs(10), |k| {
        of(k, "conn.relay-r.") == 3
    })
    .await;
    assert_eq!(of(&k, "conn.relay-r."), 3, "{k:?}");
    first.child.kill().unwrap();
    first.child.wait().unwrap();

    let second = relay_process(&nats, "relay-r", LEASE).await;
    let _again = connect(second.client, "").await;
    let k = keys_until(&nats, Duration::from_secs(20), |k| {
        of(k, "conn.relay-r.") == 1
    })
    .await;
    assert_eq!(
        of(&k, "conn.relay-r."),
        1,
        "only the new run's connection: {k:?}"
    );
    assert!(k.contains(&"relay.relay-r".to_owned()), "{k:?}");
    assert!(
        eventually(Duration::from_secs(5), || async {
            metric(
                second.admin,
                "wsrelay_registry_purges_total{reason=\"restart\"}",
            )
            .await
                == Some(1.0)
        })
        .await
    );
}

/// A relay with a registry is Ready only once its bucket was put in place: without JetStream
/// it never is, and says why; the same relay without a registry is Ready on that server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_is_not_ready_before_its_bucket_is_in_place() {
    init_logs();
    let nats = Nats::start(); // no JetStream: no bucket can be made
    let plain = TestRelay::builder(&nats).ready().start().await;
    assert_eq!(http_get(plain.admin(), "/ready").await.0, 200);
    let with = TestRelay::builder(&nats)
        .config(|c| c.registry = Some(registry(BUCKET, "relay-x", 15)))
        .start()
        .await;
    // Give it the time it would need, then some.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, body) = http_get(with.admin(), "/ready").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("registry bucket not in place yet"), "{body}");
}
