//! Reconcile latency over many gateways: create N gateways at once and measure, per gateway,
//! the time from its create call returning to its first status (written only after every
//! child object was applied). A measurement, not a pass/fail speed check, so it is ignored
//! by default:
//!
//!   cargo test -p wsrelay-e2e --test operator_scale -- --ignored --nocapture
//!
//! `SCALE_GATEWAYS` sets N (default 100). With `SCALE_EXTERNAL_OPERATOR=1` no operator is
//! started in-process, so one started by hand (watching all namespaces) can be measured,
//! e.g. for its memory.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use kube::api::PostParams;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use wsrelay_e2e::operator::{Operator, example, install_crd};
use wsrelay_e2e::with_namespace;
use wsrelay_operator::api::WebsocketGateway;

#[tokio::test]
#[ignore = "a measurement; run with --ignored --nocapture"]
async fn reconcile_latency_over_many_gateways() -> Result<()> {
    let n: usize = std::env::var("SCALE_GATEWAYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let external = std::env::var_os("SCALE_EXTERNAL_OPERATOR").is_some();
    with_namespace("op-scale", |client, ns| async move {
        install_crd(&client).await?;
        let _operator = (!external).then(|| Operator::start(client.clone(), &ns, None));
        let (secrets, template) = example()?;
        let secret_api = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), &ns);
        for s in &secrets {
            secret_api.create(&PostParams::default(), s).await?;
        }
        let gws = Api::<WebsocketGateway>::namespaced(client.clone(), &ns);

        // Watch first, so no status is missed.
        let mut seen = std::collections::HashMap::<String, Instant>::new();
        let mut stream = watcher(gws.clone(), watcher::Config::default()).boxed();
        let mut created = std::collections::HashMap::<String, Instant>::new();
        let start = Instant::now();
        for i in 0..n {
            let mut gw = template.clone();
            gw.metadata.name = Some(format!("gw-{i:03}"));
            gws.create(&PostParams::default(), &gw).await?;
            created.insert(gw.name_any(), Instant::now());
        }
        let created_all = start.elapsed();
        tokio::time::timeout(Duration::from_secs(600), async {
            while seen.len() < n {
                let event = stream.next().await.context("watch ended")??;
                let objs = match event {
                    watcher::Event::Apply(o) | watcher::Event::InitApply(o) => vec![o],
                    _ => vec![],
                };
                for gw in objs {
                    if gw.status.as_ref().is_some_and(|s| s.observed_generation.is_some()) {
                        seen.entry(gw.name_any()).or_insert_with(Instant::now);
                    }
                }
            }
            Ok::<_, anyhow::Error>(())
        })
        .await
        .context("not every gateway got a status within 600s")??;
        let mut latencies: Vec<Duration> = seen
            .iter()
            .map(|(name, at)| at.saturating_duration_since(created[name]))
            .collect();
        latencies.sort();
        let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
        println!(
            "{n} gateways: created in {created_all:?}; all reconciled after {:?}; create->all-objects-applied p50 {:?} p90 {:?} p99 {:?} max {:?}",
            start.elapsed(),
            pct(0.5),
            pct(0.9),
            pct(0.99),
            latencies[latencies.len() - 1],
        );
        Ok(())
    })
    .await
}
