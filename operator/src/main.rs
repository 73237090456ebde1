//! The wsrelay operator binary: `run` the controller, or print the `crd`.

use std::sync::Arc;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use wsrelay_operator::cli::{Cli, Command, LogFormat};
use wsrelay_operator::metrics::Metrics;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd { markdown } => {
            if markdown {
                print!("{}", wsrelay_operator::api::crd_markdown());
            } else {
                print!("{}", wsrelay_operator::api::crd_yaml());
            }
            Ok(())
        }
        Command::Run(args) => {
            init_logging(cli.log_format);
            let client = kube::Client::try_default().await?;
            let shutdown = CancellationToken::new();
            tokio::spawn(signal_shutdown(shutdown.clone()));
            // The custom metrics API runs beside the controller on every replica (not only
            // the leader): the APIService's Service spreads requests over all of them.
            // One set of metrics for the admin /metrics, the metrics API counting into it.
            let metrics = Arc::new(Metrics::new());
            // One scraper of the relays' /metrics for the metrics API and the gateways'
            // status.connections, with the timeout and cache flags.
            let scraper = args.metrics_api.scraper(metrics.scrape.clone());
            let metrics_api = match args.metrics_api.clone().into_config()? {
                Some(config) => {
                    let (client, shutdown) = (client.clone(), shutdown.clone());
                    let scraper = scraper.clone();
                    Some(tokio::spawn(async move {
                        let result = wsrelay_operator::metrics_api::serve(
                            client,
                            config,
                            scraper,
                            shutdown.clone(),
                        )
                        .await;
                        if let Err(e) = &result {
                            // A replica whose metrics API died would stay Ready behind the
                            // APIService while the HPA goes blind: stop the whole process,
                            // so the exit is seen and the kubelet restarts it.
                            tracing::error!("custom metrics API stopped: {e}; shutting down");
                            shutdown.cancel();
                        }
                        result
                    }))
                }
                None => None,
            };
            // The admission webhook, on every replica too (its Service spreads the API
            // server's calls). Not part of readiness: a replica reconciles without it.
            let webhook = match args.webhook.clone().into_config()? {
                Some(config) => {
                    let shutdown = shutdown.clone();
                    Some(tokio::spawn(async move {
                        let result =
                            wsrelay_operator::webhook::server::serve(config, shutdown.clone())
                                .await;
                        if let Err(e) = &result {
                            // As for the metrics API: a dead webhook behind a Ready pod
                            // would refuse (or, with failurePolicy Ignore, let through)
                            // every gateway write unseen; exit so it is seen and restarted.
                            tracing::error!("admission webhook stopped: {e}; shutting down");
                            shutdown.cancel();
                        }
                        result
                    }))
                }
                None => None,
            };
            wsrelay_operator::run_with(
                client,
                args.into_config(),
                metrics,
                scraper,
                shutdown.clone(),
            )
            .await
            // A lost lease ends up here: exit non-zero, and the kubelet restarts the replica.
            .inspect_err(|e| tracing::error!("{e}; exiting"))?;
            if let Some(task) = metrics_api {
                shutdown.cancel();
                task.await??;
            }
            if let Some(task) = webhook {
                shutdown.cancel();
                task.await??;
            }
            tracing::info!("stopped");
            Ok(())
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube=warn".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Cancels `shutdown` on SIGTERM (what the kubelet sends) or Ctrl-C.
async fn signal_shutdown(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("cannot listen for SIGTERM: {e}");
                    let _ = ctrl_c.await;
                    shutdown.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
    shutdown.cancel();
}
