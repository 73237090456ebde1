//! Reconcile latency over many gateways: create N gateways at once and measure, per gateway,
//! the time from its create call returning to its first status (written only after every
//! child object was applied). A measurement, not a pass/fail speed check, so it is ignored
//! by default:
//!
//!   cargo test -p wsrelay-e2e --test operator_scale -- --ignored --nocapture
//!
//! The relay pods are kept off the nodes (a nodeSelector nothing matches): the measurement is
//! the operator's. It also reports the operator's API requests per gateway per minute at rest
//! (watches excluded) and the resident memory of the test process, which runs the operator.
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
        // The in-process operator's requests are recorded, for the figure at rest.
        let (recording, log) = wsrelay_e2e::operator::recording_client().await?;
        let _operator = (!external).then(|| Operator::start(recording, &ns, None));
        let (secrets, mut template) = example()?;
        // The relay pods stay Pending (no node has this label): the operator is measured,
        // not a node starting hundreds of relays, and nothing churns at rest.
        template.spec.placement.node_selector =
            [("e2e.wsrelay.dev/scale-test".to_string(), "no-such-node".to_string())].into();
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
        if !external {
            // At rest: every gateway reconciled, nothing changing. Watches (long-running)
            // do not count; everything else the operator asked in the window does.
            let settle = Duration::from_secs(20);
            tokio::time::sleep(settle).await;
            let _ = log.take();
            let window = Duration::from_secs(120);
            tokio::time::sleep(window).await;
            let requests: Vec<_> = log.take().into_iter().filter(|r| !r.is_watch()).collect();
            let per_gateway_minute = requests.len() as f64 / n as f64 * 60.0 / window.as_secs_f64();
            let mut kinds = std::collections::BTreeMap::<String, usize>::new();
            for r in &requests {
                // .../namespaces/NS/RESOURCE[/NAME[/SUBRESOURCE]]
                let path = r.path.split('?').next().unwrap_or("");
                let parts: Vec<&str> = path.split('/').collect();
                let at = parts.iter().position(|p| *p == "namespaces").map_or(0, |i| i + 2);
                let mut kind = parts.get(at).copied().unwrap_or(path).to_string();
                if let Some(sub) = parts.get(at + 2) {
                    kind = format!("{kind}/{sub}");
                }
                *kinds.entry(format!("{} {kind}", r.method)).or_default() += 1;
            }
            let rss = std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_string))
                .unwrap_or_default();
            println!(
                "at rest over {window:?}: {} API requests by the operator, {per_gateway_minute:.3} per gateway per minute ({kinds:?}); test process (operator in-process) {rss}",
                requests.len()
            );
        }
        Ok(())
    })
    .await
}
