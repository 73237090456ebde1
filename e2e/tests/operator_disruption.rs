//! Disruptive operator tests, in a test binary of their own so that nothing else runs while
//! the API server is restarted: the operator rides out an API server restart, and a standby
//! replica takes over when the leader dies. The two tests also take turns (SERIAL), since
//! the tests of one binary run in parallel.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
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
