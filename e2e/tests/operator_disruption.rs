//! Disruptive operator tests, in a test binary of their own so that nothing else runs while
//! the API server is restarted: the operator rides out an API server restart, a standby
//! replica takes over when the leader dies, and a leader cut off from the API server stops
//! reconciling before a standby takes over. The tests also take turns (SERIAL), since the
//! tests of one binary run in parallel.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use wsrelay_e2e::operator::{Operator, create_example, install_crd};
use wsrelay_e2e::{eventually, repo_root, wait_for, with_namespace};
use wsrelay_operator::api::WebsocketGateway;
use wsrelay_operator::leader::LeaseConfig;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits until the gateway's ConfigMap mentions `needle`.
async fn config_mentions(client: &Client, ns: &str, name: &str, needle: &str) -> Result<()> {
    let cms = Api::<ConfigMap>::namespaced(client.clone(), ns);
    wait_for(&cms, name, |cm: Option<&ConfigMap>| {
        cm.and_then(|c| c.data.as_ref())
            .and_then(|d| d.get("relay.json"))
            .is_some_and(|c| c.contains(needle))
    })
    .await?;
    Ok(())
}

async fn rebind(client: &Client, ns: &str, name: &str, subject: &str) -> Result<()> {
    let gws = Api::<WebsocketGateway>::namespaced(client.clone(), ns);
    gws.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "bindings": [
            { "channel": "notifications", "subject": "users.{claims.sub}.notify" },
            { "channel": "orders.{id}", "subject": subject }
        ]}})),
    )
    .await?;
    Ok(())
}

/// Kills the local kube-apiserver and starts it again with the cluster's own script.
fn restart_api_server() -> Result<()> {
    let root = repo_root();
    let pid_file = root.join(".cluster/pids/kube-apiserver.pid");
    let pid = std::fs::read_to_string(&pid_file)
        .with_context(|| format!("{} (this test needs the local cluster)", pid_file.display()))?;
    // SIGKILL, as a crash would: a graceful apiserver shutdown takes a minute, and up.sh
    // must find it gone, not shutting down.
    let status = Command::new("kill").args(["-KILL", pid.trim()]).status()?;
    if !status.success() {
        bail!("kill {} failed", pid.trim());
    }
    let proc_dir = std::path::PathBuf::from(format!("/proc/{}", pid.trim()));
    for _ in 0..300 {
        if !proc_dir.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if proc_dir.exists() {
        bail!("kube-apiserver (pid {}) did not exit", pid.trim());
    }
    let tools = std::env::var("WSRELAY_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/wsrelay")
        })
        .join("path");
    let status = Command::new(root.join("e2e/cluster/up.sh"))
        .arg(tools)
        .current_dir(&root)
        .status()
        .context("running e2e/cluster/up.sh")?;
    if !status.success() {
        bail!("e2e/cluster/up.sh failed: {status}");
    }
    Ok(())
}

#[tokio::test]
async fn the_operator_recovers_from_an_api_server_restart() -> Result<()> {
    let _serial = SERIAL.lock().await;
    with_namespace("op-restart", |client, ns| async move {
        install_crd(&client).await?;
        let operator = Operator::start(client.clone(), &ns, None);
        let gw = create_example(&client, &ns).await?;
        let name = gw.name_any();
        config_mentions(&client, &ns, &name, "orders.{id}.events").await?;

        tokio::task::spawn_blocking(restart_api_server).await??;
        // A fresh client for the test itself; the operator keeps its own.
        let client = wsrelay_e2e::client().await?;
        eventually("the API server to answer again", || async {
            Ok(client.apiserver_version().await.ok().map(|_| ()))
        })
        .await?;

        // The same operator, never restarted, acts on a change made after the restart.
        assert!(operator.is_running(), "the operator must not have stopped");
        rebind(&client, &ns, &name, "orders.{id}.after-restart").await?;
        config_mentions(&client, &ns, &name, "orders.{id}.after-restart").await?;
        assert!(operator.is_running());
        operator.stop().await
    })
    .await
}

async fn holder(leases: &Api<Lease>, name: &str) -> Result<Option<String>> {
    Ok(leases
        .get_opt(name)
        .await?
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty()))
}

#[tokio::test]
async fn a_standby_replica_takes_over_when_the_leader_dies() -> Result<()> {
    let _serial = SERIAL.lock().await;
    with_namespace("op-leader", |client, ns| async move {
        install_crd(&client).await?;
        let lease_duration = Duration::from_secs(6);
        let lease = |identity: &str| LeaseConfig {
            namespace: ns.clone(),
            name: "wsrelay-operator".into(),
            identity: identity.into(),
            lease_duration,
        };
        let a = Operator::start(client.clone(), &ns, Some(lease("replica-a")));
        let leases = Api::<Lease>::namespaced(client.clone(), &ns);
        let first = eventually("a leader", || async {
            holder(&leases, "wsrelay-operator").await
        })
        .await?;
        assert_eq!(first, "replica-a");
        let b = Operator::start(client.clone(), &ns, Some(lease("replica-b")));

        // The leader reconciles; the standby does not take the lease while it is renewed.
        let gw = create_example(&client, &ns).await?;
        let name = gw.name_any();
        config_mentions(&client, &ns, &name, "orders.{id}.events").await?;
        tokio::time::sleep(lease_duration * 2).await;
        assert_eq!(
            holder(&leases, "wsrelay-operator").await?.as_deref(),
            Some("replica-a")
        );

        // Kill the leader (no release): the standby takes over once the lease runs out.
        a.kill();
        let deadline = lease_duration * 3;
        let took_over = tokio::time::timeout(deadline, async {
            loop {
                if holder(&leases, "wsrelay-operator").await?.as_deref() == Some("replica-b") {
                    return Ok::<_, anyhow::Error>(());
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
        .await;
        match took_over {
            Ok(r) => r?,
            Err(_) => bail!("replica-b did not take the lease within {deadline:?}"),
        }
        // And the new leader reconciles.
        rebind(&client, &ns, &name, "orders.{id}.new-leader").await?;
        config_mentions(&client, &ns, &name, "orders.{id}.new-leader").await?;
        b.stop().await?;
        // A graceful stop hands the lease back.
        assert_eq!(holder(&leases, "wsrelay-operator").await?, None);
        Ok(())
    })
    .await
}

/// A loopback TCP proxy in front of the API server that can be made to black-hole, which is
/// what a network partition looks like to a client: connections are still accepted and
/// held open, but nothing more is forwarded either way, so every API call hangs (no error,
/// no reset). TLS passes through untouched (the API server's certificate names 127.0.0.1).
struct BlackholeProxy {
    addr: SocketAddr,
    blackhole: CancellationToken,
    stop: CancellationToken,
}

impl BlackholeProxy {
    async fn start(upstream: String) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (blackhole, stop) = (CancellationToken::new(), CancellationToken::new());
        let (bh, st) = (blackhole.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    _ = st.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => client,
                        Err(_) => return,
                    },
                };
                let (bh, st, upstream) = (bh.clone(), st.clone(), upstream.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = st.cancelled() => {}
                        _ = Self::serve(client, upstream, bh) => {}
                    }
                });
            }
        });
        Ok(Self {
            addr,
            blackhole,
            stop,
        })
    }

    async fn serve(client: TcpStream, upstream: String, blackhole: CancellationToken) {
        if blackhole.is_cancelled() {
            // Accept, hold, never answer.
            let _held = client;
            return std::future::pending().await;
        }
        let Ok(server) = TcpStream::connect(&upstream).await else {
            return;
        };
        let (client_read, client_write) = client.into_split();
        let (server_read, server_write) = server.into_split();
        tokio::join!(
            Self::pipe(client_read, server_write, blackhole.clone()),
            Self::pipe(server_read, client_write, blackhole),
        );
    }

    /// Copies `from` to `to` until the black hole opens, then holds both open forever.
    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        blackhole: CancellationToken,
    ) {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = tokio::select! {
                _ = blackhole.cancelled() => break,
                read = from.read(&mut buf) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                },
            };
            if blackhole.is_cancelled() || to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _held = (from, to);
        std::future::pending::<()>().await;
    }

    /// The API server's URL through this proxy.
    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// From now on nothing passes, on open connections and new ones alike.
    fn black_hole(&self) {
        self.blackhole.cancel();
    }
}

impl Drop for BlackholeProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[tokio::test]
async fn a_partitioned_leader_stops_reconciling_before_a_standby_takes_over() -> Result<()> {
    let _serial = SERIAL.lock().await;
    with_namespace("op-partition", |client, ns| async move {
        install_crd(&client).await?;
        let lease_duration = Duration::from_secs(6);
        let lease = |identity: &str| LeaseConfig {
            namespace: ns.clone(),
            name: "wsrelay-operator".into(),
            identity: identity.into(),
            lease_duration,
        };

        // Replica A reaches the API server only through the proxy.
        let mut config = wsrelay_e2e::config().await?;
        let upstream = format!(
            "{}:{}",
            config
                .cluster_url
                .host()
                .context("API server URL has a host")?,
            config.cluster_url.port_u16().unwrap_or(443)
        );
        let proxy = BlackholeProxy::start(upstream).await?;
        config.cluster_url = proxy.url().parse()?;
        let a = Operator::start(Client::try_from(config)?, &ns, Some(lease("replica-a")));
        let leases = Api::<Lease>::namespaced(client.clone(), &ns);
        let first = eventually("a leader", || async {
            holder(&leases, "wsrelay-operator").await
        })
        .await?;
        assert_eq!(first, "replica-a");
        let b = Operator::start(client.clone(), &ns, Some(lease("replica-b")));

        // A leads and reconciles.
        let gw = create_example(&client, &ns).await?;
        let name = gw.name_any();
        config_mentions(&client, &ns, &name, "orders.{id}.events").await?;

        // Cut A off: its API calls hang from now on, its renewals included.
        proxy.black_hole();
        let partitioned = Instant::now();
        let partitioned_wall = Timestamp::now();
        // A's last successful renewal (A's clock, the same machine's as ours).
        let last_renew = leases
            .get("wsrelay-operator")
            .await?
            .spec
            .and_then(|s| s.renew_time)
            .context("the lease has a renewTime")?
            .0;

        // Watch A stop (its run ends with an error: it lost the lease) and B take the lease.
        let limit = lease_duration * 4;
        let mut a_stopped: Option<Timestamp> = None;
        let b_lease = loop {
            if partitioned.elapsed() > limit {
                bail!("replica-b did not take the lease within {limit:?} of the partition");
            }
            if a_stopped.is_none() && !a.is_running() {
                a_stopped = Some(Timestamp::now());
            }
            let spec = leases
                .get("wsrelay-operator")
                .await?
                .spec
                .unwrap_or_default();
            if spec.holder_identity.as_deref() == Some("replica-b") {
                break spec;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let b_acquired = b_lease
            .acquire_time
            .context("the new lease has an acquireTime")?
            .0;
        let Some(a_stopped) = a_stopped else {
            bail!(
                "replica-b took the lease {:.1} s after the partition while the partitioned \
                 replica-a was still running (two leaders)",
                partitioned.elapsed().as_secs_f64()
            );
        };
        // B wrote acquireTime before it decided to take the lease, so A stopped first.
        assert!(
            a_stopped < b_acquired,
            "replica-a stopped at {a_stopped}, after replica-b acquired at {b_acquired}"
        );
        let secs = |from: Timestamp, to: Timestamp| to.duration_since(from).as_secs_f64();
        println!(
            "lease {lease_duration:?}: partition -> replica-a stopped {:.2} s, -> replica-b \
             acquired {:.2} s; last renewal -> replica-a stopped {:.2} s, -> replica-b \
             acquired {:.2} s; margin {:.2} s",
            secs(partitioned_wall, a_stopped),
            secs(partitioned_wall, b_acquired),
            secs(last_renew, a_stopped),
            secs(last_renew, b_acquired),
            secs(a_stopped, b_acquired),
        );
        // A reports why it stopped.
        let err = a
            .stop()
            .await
            .expect_err("a partitioned leader's run ends with an error");
        assert!(
            format!("{err:#}").contains("lost the lease"),
            "unexpected error: {err:#}"
        );

        // The new leader reconciles.
        rebind(&client, &ns, &name, "orders.{id}.after-partition").await?;
        config_mentions(&client, &ns, &name, "orders.{id}.after-partition").await?;
        b.stop().await?;
        drop(proxy);
        Ok(())
    })
    .await
}
