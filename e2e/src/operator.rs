//! Helpers for the operator's end-to-end tests: install the CRD, run an operator in-process
//! scoped to the test's namespace, and read the example gateway.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::conditions;
use kube::{Api, Client, ResourceExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use wsrelay_operator::api::WebsocketGateway;
use wsrelay_operator::leader::LeaseConfig;
use wsrelay_operator::{RunConfig, RunError};

use crate::{eventually, wait_for};

/// Installs (or updates) the WebsocketGateway CRD from the operator's types and waits until
/// the API server serves it. Safe to call from many tests at once.
pub async fn install_crd(client: &Client) -> Result<()> {
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    let crd = wsrelay_operator::api::crd();
    let name = crd.name_any();
    crds.patch(
        &name,
        &PatchParams::apply("wsrelay-e2e").force(),
        &Patch::Apply(&crd),
    )
    .await
    .context("installing the WebsocketGateway CRD")?;
    wait_for(&crds, &name, conditions::is_crd_established()).await?;
    Ok(())
}

/// Installs (or updates) the CRD from the Helm chart's own copy
/// (`charts/wsrelay-operator/crds/`), as `helm install` would on a fresh cluster, by
/// server-side apply, and waits until the API server serves it. The chart's copy is what
/// users get: a test using this checks that copy, not only the operator's types.
pub async fn install_chart_crd(client: &Client) -> Result<()> {
    let path =
        crate::repo_root().join("charts/wsrelay-operator/crds/websocketgateways.wsrelay.dev.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let crd: CustomResourceDefinition =
        serde_yaml::from_str(&text).with_context(|| format!("{} is not a CRD", path.display()))?;
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    let name = crd.name_any();
    crds.patch(
        &name,
        &PatchParams::apply("wsrelay-e2e").force(),
        &Patch::Apply(&crd),
    )
    .await
    .context("installing the chart's WebsocketGateway CRD")?;
    wait_for(&crds, &name, conditions::is_crd_established()).await?;
    Ok(())
}

/// An operator running in this process, watching one namespace.
#[derive(Debug)]
pub struct Operator {
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), RunError>>>,
}

impl Operator {
    /// Starts an operator for `namespace`, with leader election over `lease` if given.
    pub fn start(client: Client, namespace: &str, lease: Option<LeaseConfig>) -> Self {
        Self::start_with(client, namespace, lease, None)
    }

    /// Like [`Operator::start`], requiring `secret_label` of every Secret a gateway names.
    pub fn start_with(
        client: Client,
        namespace: &str,
        lease: Option<LeaseConfig>,
        secret_label: Option<wsrelay_operator::validate::SecretLabel>,
    ) -> Self {
        let shutdown = CancellationToken::new();
        let config = RunConfig {
            namespace: Some(namespace.to_string()),
            admin_addr: None,
            identity: lease.as_ref().map(|l| l.identity.clone()),
            leader_election: lease,
            relay_admin_peers: Vec::new(),
            secret_label,
        };
        let task = tokio::spawn(wsrelay_operator::run(client, config, shutdown.clone()));
        Self {
            shutdown,
            task: Some(task),
        }
    }

    /// Stops it as a crash would: no graceful shutdown, the lease is not released.
    pub fn kill(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Stops it gracefully and reports how its run ended.
    pub async fn stop(mut self) -> Result<()> {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.context("operator task")??;
        }
        Ok(())
    }

    /// Whether the operator task is still running.
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The Secrets and the gateway of `examples/gateway.yaml`.
pub fn example() -> Result<(Vec<Secret>, WebsocketGateway)> {
    let path = crate::repo_root().join("examples/gateway.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut secrets = Vec::new();
    let mut gateway = None;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value: serde_json::Value = serde::Deserialize::deserialize(doc)?;
        match value["kind"].as_str() {
            Some("Secret") => secrets.push(serde_json::from_value(value)?),
            Some("WebsocketGateway") => gateway = Some(serde_json::from_value(value)?),
            Some(other) => bail!("unexpected {other} in the example"),
            None => {}
        }
    }
    Ok((
        secrets,
        gateway.context("the example has a WebsocketGateway")?,
    ))
}

/// Creates the example's Secrets and gateway in `namespace`; returns the stored gateway.
pub async fn create_example(client: &Client, namespace: &str) -> Result<WebsocketGateway> {
    let (secrets, gateway) = example()?;
    let secret_api = Api::<Secret>::namespaced(client.clone(), namespace);
    for s in &secrets {
        secret_api.create(&PostParams::default(), s).await?;
    }
    create_gateway(client, namespace, &gateway).await
}

/// Creates a gateway, retrying while a just-installed CRD is not yet served, or while the
/// API server cannot call a just-installed admission webhook (the chart's: its Service's
/// endpoints can lag the operator Deployment's readiness by a moment).
pub async fn create_gateway(
    client: &Client,
    namespace: &str,
    gateway: &WebsocketGateway,
) -> Result<WebsocketGateway> {
    let api = Api::<WebsocketGateway>::namespaced(client.clone(), namespace);
    eventually("the API server to accept the gateway", || async {
        match api.create(&PostParams::default(), gateway).await {
            Ok(gw) => Ok(Some(gw)),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
            Err(kube::Error::Api(s))
                if s.code == 500 && s.message.contains("failed calling webhook") =>
            {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    })
    .await
}

/// The condition of `type_` in the gateway's status.
pub fn condition<'a>(gw: &'a WebsocketGateway, type_: &str) -> Option<&'a Condition> {
    gw.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// One API request a client made: method, path with query, and the Accept header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiRequest {
    pub method: String,
    pub path: String,
    pub accept: String,
}

impl ApiRequest {
    /// A watch (long-running; re-established now and then, not per reconcile).
    pub fn is_watch(&self) -> bool {
        self.path.contains("watch=true") || self.path.contains("watch=1")
    }
}

/// The requests a [`recording_client`] made, oldest first.
#[derive(Debug, Clone, Default)]
pub struct RequestLog(Arc<Mutex<Vec<ApiRequest>>>);

impl RequestLog {
    /// Every request since the last call.
    pub fn take(&self) -> Vec<ApiRequest> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// A client for the cluster under test that records every request it makes, to see what the
/// operator asks the API server.
pub async fn recording_client() -> Result<(Client, RequestLog)> {
    let log = RequestLog::default();
    let client = kube::client::ClientBuilder::try_from(crate::config().await?)?
        .with_layer(&RecordLayer { log: log.clone() })
        .build();
    Ok((client, log))
}

/// The tower layer that wraps kube's HTTP service in a [`Record`].
#[derive(Debug, Clone)]
struct RecordLayer {
    log: RequestLog,
}

/// Logs each request, then passes it on.
#[derive(Debug, Clone)]
struct Record<S> {
    log: RequestLog,
    inner: S,
}

impl<S> tower::Layer<S> for RecordLayer {
    type Service = Record<S>;
    fn layer(&self, inner: S) -> Record<S> {
        Record {
            log: self.log.clone(),
            inner,
        }
    }
}

impl<S, B> tower::Service<http::Request<B>> for Record<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let entry = ApiRequest {
            method: req.method().to_string(),
            path: req
                .uri()
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default(),
            accept: req
                .headers()
                .get(http::header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
        };
        self.log
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(entry);
        self.inner.call(req)
    }
}
