//! Test harness for wsrelay's end-to-end tests.
//!
//! The tests run against whatever cluster a kubeconfig names: `KUBECONFIG` when set, else the
//! local cluster that `make cluster-up` leaves at `.cluster/kubeconfig`. Each test gets a fresh
//! namespace of its own ([`with_namespace`]) that is removed afterwards, pass or fail, so tests
//! run in parallel and leave nothing behind.

pub mod authz;
pub mod churn;
pub mod gateway;
pub mod load;
pub mod netns;
pub mod operator;
pub mod pki;
pub mod presence;
pub mod prometheus;
pub mod resumable;
pub mod subscriber;
pub mod tools;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::FutureExt;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{Condition, await_condition};
use kube::{Api, Client, Config, Resource};
use serde_json::json;

/// Label on every namespace the harness creates, so a crashed run's leftovers can be found.
pub const TEST_LABEL: &str = "e2e.wsrelay.dev/test";

/// How long a test waits for the cluster to reach a state before it gives up (default 120 s,
/// `E2E_WAIT_SECONDS` overrides). This bounds a wait; it is not a speed assertion.
pub fn wait_limit() -> Duration {
    let seconds = std::env::var("E2E_WAIT_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok());
    Duration::from_secs(seconds.unwrap_or(120))
}

/// The address of this machine that the cluster's API server reaches, for what the tests
/// serve it in-process (the admission webhook test): `E2E_CALLBACK_IP`, else loopback, where
/// the local cluster's API server runs. `make kind-e2e` sets the host's end of the kind bridge.
pub fn callback_ip() -> Result<std::net::IpAddr> {
    match std::env::var("E2E_CALLBACK_IP") {
        Ok(v) => v
            .parse()
            .with_context(|| format!("E2E_CALLBACK_IP={v:?} is not an IP address")),
        Err(_) => Ok(std::net::Ipv4Addr::LOCALHOST.into()),
    }
}

/// The repository root (the e2e crate's parent directory).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e crate has a parent directory")
        .to_path_buf()
}

/// The kubeconfig under test: `KUBECONFIG`, else the local cluster's.
pub fn kubeconfig_path() -> PathBuf {
    std::env::var_os("KUBECONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cluster/kubeconfig"))
}

/// Client configuration for the cluster under test.
pub async fn config() -> Result<Config> {
    let path = kubeconfig_path();
    let kubeconfig = Kubeconfig::read_from(&path).with_context(|| {
        format!(
            "no cluster to test against: cannot read kubeconfig {} (run `make cluster-up`, or set KUBECONFIG)",
            path.display()
        )
    })?;
    Ok(Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?)
}

/// A client for the cluster under test, with the kubeconfig's own credentials.
pub async fn client() -> Result<Client> {
    Ok(Client::try_from(config().await?)?)
}

/// The NATS server the tests use: `NATS_URL`, else the one `make cluster-up` started.
pub fn nats_url() -> Result<String> {
    env_or_cluster_file("NATS_URL", "nats-url")
}

/// The NATS WebSocket listener the tests use: `NATS_WS_URL`, else the local one.
pub fn nats_ws_url() -> Result<String> {
    env_or_cluster_file("NATS_WS_URL", "nats-ws-url")
}

/// The value of `var`, else the contents of `.cluster/{file}` that `make cluster-up` wrote.
fn env_or_cluster_file(var: &str, file: &str) -> Result<String> {
    if let Ok(value) = std::env::var(var) {
        return Ok(value);
    }
    let path = repo_root().join(".cluster").join(file);
    let value = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {} (run `make cluster-up`, or set {var})",
            path.display()
        )
    })?;
    Ok(value.trim().to_string())
}

/// A name that no other test run uses: `prefix-` and eight random characters.
pub fn unique_name(prefix: &str) -> String {
    use rand::Rng;
    let suffix: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        .take(8)
        .map(char::from)
        .collect();
    format!("{prefix}-{suffix}")
}

/// Runs `test` with a client and a new namespace, then deletes the namespace whatever the
/// outcome. A panic in the test is re-raised after the cleanup.
pub async fn with_namespace<F, Fut>(prefix: &str, test: F) -> Result<()>
where
    F: FnOnce(Client, String) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    init_tracing();
    let client = client().await?;
    let ns = create_namespace(&client, prefix).await?;
    let outcome = AssertUnwindSafe(test(client.clone(), ns.clone()))
        .catch_unwind()
        .await;
    let cleanup = Api::<Namespace>::all(client)
        .delete(&ns, &DeleteParams::background())
        .await;
    match outcome {
        Err(panic) => std::panic::resume_unwind(panic),
        Ok(result) => {
            result?;
            cleanup.with_context(|| format!("deleting test namespace {ns}"))?;
            Ok(())
        }
    }
}

/// Creates a labelled namespace and waits for its `default` ServiceAccount, without which the
/// API server refuses pods.
async fn create_namespace(client: &Client, prefix: &str) -> Result<String> {
    let name = unique_name(prefix);
    let ns: Namespace = serde_json::from_value(json!({
        "metadata": { "name": name, "labels": { TEST_LABEL: prefix } }
    }))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .with_context(|| format!("creating namespace {name}"))?;
    let sas = Api::<ServiceAccount>::namespaced(client.clone(), &name);
    wait_for(&sas, "default", exists()).await?;
    Ok(name)
}

/// Waits until the named object satisfies `condition`, or fails after [`wait_limit`].
pub async fn wait_for<K>(api: &Api<K>, name: &str, condition: impl Condition<K>) -> Result<K>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default,
{
    let kind = K::kind(&Default::default()).to_string();
    let limit = wait_limit();
    match tokio::time::timeout(limit, await_condition(api.clone(), name, condition)).await {
        Ok(Ok(Some(obj))) => Ok(obj),
        Ok(Ok(None)) => bail!("{kind} {name} was deleted while waiting for it"),
        Ok(Err(e)) => Err(e).with_context(|| format!("watching {kind} {name}")),
        Err(_) => bail!("{kind} {name} did not reach the expected state within {limit:?}"),
    }
}

/// Waits until `check` returns `Some`, polling once a second, or fails after [`wait_limit`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let limit = wait_limit();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("gave up after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A condition that holds as soon as the object exists.
pub fn exists<K>() -> impl Condition<K> {
    |obj: Option<&K>| obj.is_some()
}

/// Logs to the test output (`RUST_LOG` filters), once per test binary.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_test_writer()
        .try_init();
}
