//! wsrelay-operator: the `WebsocketGateway` API and its reconciler.
//!
//! The reconcile pipeline, one module per stage (only the ends touch the API server):
//! [`fetch`] referenced Secrets -> [`validate`] -> [`build`] desired objects (pure) ->
//! [`apply`] them (server-side apply, orphan sweep) -> [`status`]. [`controller`] drives it,
//! [`leader`] makes sure one replica at a time does, [`admin`] serves health and [`metrics`].
//! Beside it: the custom metrics API ([`metrics_api`]), the admission [`webhook`], and in the
//! leader the [`rebalance`]r, which moves connections off hot relays.

pub mod admin;
pub mod api;
pub mod apply;
pub mod build;
pub mod cli;
pub mod controller;
pub mod error;
pub mod fetch;
pub mod forget;
pub mod gateway_metrics;
pub mod leader;
pub mod metrics;
pub mod metrics_api;
pub mod rebalance;
pub mod stages;
pub mod status;
pub mod validate;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kube::Client;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::AdminState;
use crate::controller::Context;
use crate::leader::LeaseConfig;
use crate::metrics::Metrics;
use crate::metrics_api::CONNECTIONS_METRIC;
use crate::metrics_api::scrape::Scraper;

/// How one operator process runs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Watch only this namespace (None: all).
    pub namespace: Option<String>,
    /// Where the admin server listens (None: no admin server, for in-process tests).
    pub admin_addr: Option<SocketAddr>,
    /// Leader election (None: this process always reconciles).
    pub leader_election: Option<LeaseConfig>,
    /// Name of this replica in Events.
    pub identity: Option<String>,
    /// Who may reach the relays' admin port (see [`build::Options::admin_peers`]).
    pub relay_admin_peers: Vec<k8s_openapi::api::networking::v1::NetworkPolicyPeer>,
    /// The label every Secret a gateway names must carry (None: any Secret of its namespace).
    pub secret_label: Option<validate::SecretLabel>,
}

/// Why the operator could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("binding the admin server to {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("admin server: {0}")]
    Admin(#[source] std::io::Error),
    #[error(transparent)]
    Leadership(#[from] leader::LeaderError),
}

/// Runs the operator until `shutdown` is cancelled, then stops cleanly: in-flight
/// reconciles finish and the lease is released.
pub async fn run(
    client: Client,
    config: RunConfig,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    run_with_metrics(client, config, Arc::new(Metrics::new()), shutdown).await
}

/// As [`run`], exporting `metrics` on the admin server (the binary shares them with the
/// custom metrics API, so its scrape counts show there too).
pub async fn run_with_metrics(
    client: Client,
    config: RunConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let scraper = Scraper::with_metrics(
        CONNECTIONS_METRIC,
        metrics_api::DEFAULT_SCRAPE_TIMEOUT,
        metrics_api::DEFAULT_CACHE_TTL,
        metrics.scrape.clone(),
    );
    run_with(client, config, metrics, scraper, shutdown).await
}

/// As [`run_with_metrics`], with the relay scraper the custom metrics API uses too (one
/// scraper per process: its timeout flag holds for the gateways' status as well, and a pod
/// is asked once per cache period whoever asks).
pub async fn run_with(
    client: Client,
    config: RunConfig,
    metrics: Arc<Metrics>,
    scraper: Scraper,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let ready = Arc::new(AtomicBool::new(false));

    let admin = match config.admin_addr {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::Bind { addr, source })?;
            tracing::info!(addr = %listener.local_addr().unwrap_or(addr), "admin server listening");
            let state = AdminState {
                metrics: metrics.clone(),
                ready: ready.clone(),
            };
            Some(tokio::spawn(admin::serve(
                listener,
                state,
                shutdown.clone(),
            )))
        }
        None => None,
    };

    // Ready once the API server answers; until then a rolling update of the operator waits.
    {
        let client = client.clone();
        let ready = ready.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                match client.apiserver_version().await {
                    Ok(v) => {
                        tracing::info!(version = %v.git_version, "connected to the API server");
                        ready.store(true, Ordering::Relaxed);
                        return;
                    }
                    Err(e) => tracing::warn!("API server not reachable yet: {e}"),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
                }
            }
        });
    }

    let ctx = Arc::new(Context::new(
        client.clone(),
        metrics.clone(),
        config.identity.clone(),
        config.relay_admin_peers.clone(),
        scraper,
        config.secret_label.clone(),
    ));
    let namespace = config.namespace.clone();
    // A replica that lost the lease ends here with an error (the binary exits non-zero and
    // is restarted as a candidate; see `leader`), its controller already stopped.
    let led = match config.leader_election {
        Some(lease) => {
            leader::run_as_leader(client, lease, &metrics, shutdown.clone(), move |token| {
                controller::run(ctx, namespace, async move { token.cancelled().await })
            })
            .await
        }
        None => {
            metrics.leader.set(1);
            let token = shutdown.clone();
            controller::run(ctx, namespace, async move { token.cancelled().await }).await;
            Ok(())
        }
    };

    if let Some(admin) = admin {
        shutdown.cancel();
        match admin.await {
            Ok(result) => result.map_err(RunError::Admin)?,
            Err(e) => tracing::warn!("admin server task: {e}"),
        }
    }
    Ok(led?)
}
