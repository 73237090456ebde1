//! Per-gateway state as metrics, read from the controller's watch caches at scrape time
//! (kube-state-metrics style): a gateway that is deleted has no series at the next scrape,
//! and a replica that does not lead (no caches) exports none. Labels `namespace` and
//! `gateway`; scrape the operator with `honor_labels` so `namespace` stays the gateway's (the
//! chart's PodMonitor does).
//!
//! - `wsrelay_operator_gateway_condition{type,status,reason}`: 1 per condition of the status;
//! - `wsrelay_operator_gateway_replicas`, `_ready_replicas`, `_desired_replicas`,
//!   `_connections`: the status fields;
//! - `wsrelay_operator_gateway_min_replicas`, `_max_replicas`, `_target_connections_per_pod`:
//!   `spec.autoscaling` (only for autoscaled gateways);
//! - `wsrelay_operator_hpa_current_replicas`, `wsrelay_operator_hpa_desired_replicas`: the
//!   gateway's HorizontalPodAutoscaler's status;
//! - `wsrelay_operator_gateway_drain_grace_period_seconds`: `spec.drain.gracePeriodSeconds`;
//! - `wsrelay_operator_gateway_terminating_pods`: relay pods being deleted (draining);
//! - `wsrelay_operator_gateway_drain_overdue_pods`: of those, the ones deleted longer ago than
//!   the drain grace period (a drain that overruns; also pods stuck on a lost node).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::api::WebsocketGateway;
use crate::build::INSTANCE_LABEL;

/// Labels of the per-gateway series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct GatewayLabels {
    pub namespace: String,
    pub gateway: String,
}

/// Labels of `wsrelay_operator_gateway_condition`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabels {
    pub namespace: String,
    pub gateway: String,
    pub r#type: String,
    pub status: String,
    pub reason: String,
}

/// The caches of the controller that runs (none while this replica does not lead).
#[derive(Clone)]
pub struct Caches {
    pub gateways: Store<WebsocketGateway>,
    pub hpas: Store<HorizontalPodAutoscaler>,
    pub pods: Store<Pod>,
}

/// Where the collector finds the caches; the controller attaches them while it runs.
#[derive(Clone, Default)]
pub struct GatewayMetrics {
    caches: Arc<RwLock<Option<Caches>>>,
}

impl std::fmt::Debug for Caches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caches").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for GatewayMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayMetrics").finish_non_exhaustive()
    }
}

/// Detaches the caches when the controller stops.
#[derive(Debug)]
#[must_use = "the caches are detached when this is dropped"]
pub struct Attached(GatewayMetrics);

impl Drop for Attached {
    fn drop(&mut self) {
        *self.0.caches.write().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl GatewayMetrics {
    /// Exports from `caches` until the returned guard is dropped.
    pub fn attach(&self, caches: Caches) -> Attached {
        *self.caches.write().unwrap_or_else(|p| p.into_inner()) = Some(caches);
        Attached(self.clone())
    }
}

/// The families of one scrape, filled from the caches.
#[derive(Default)]
struct Snapshot {
    condition: Family<ConditionLabels, Gauge>,
    gauges: BTreeMap<&'static str, (&'static str, Family<GatewayLabels, Gauge>)>,
}

impl Snapshot {
    fn set(&mut self, name: &'static str, help: &'static str, labels: &GatewayLabels, v: i64) {
        self.gauges
            .entry(name)
            .or_insert_with(|| (help, Family::default()))
            .1
            .get_or_create(labels)
            .set(v);
    }
}

/// Seconds since the pod's deletion was requested (`deletionTimestamp` minus
/// `deletionGracePeriodSeconds`), when it is being deleted.
fn deleted_for(pod: &Pod, now: Timestamp) -> Option<i64> {
    let at = pod.metadata.deletion_timestamp.as_ref()?.0;
    let grace = pod.metadata.deletion_grace_period_seconds.unwrap_or(0);
    Some(now.as_second() - (at.as_second() - grace))
}

/// Fills a snapshot from the objects (pure, for tests).
fn snapshot<'a>(
    gateways: impl IntoIterator<Item = &'a WebsocketGateway>,
    hpas: impl IntoIterator<Item = &'a HorizontalPodAutoscaler>,
    pods: impl IntoIterator<Item = &'a Pod>,
    now: Timestamp,
) -> Snapshot {
    let mut s = Snapshot::default();
    let mut grace = BTreeMap::new();
    for gw in gateways {
        let labels = GatewayLabels {
            namespace: gw.namespace().unwrap_or_default(),
            gateway: gw.name_any(),
        };
        let g = i64::from(gw.spec.drain.grace_period_seconds);
        grace.insert(labels.clone(), g);
        s.set(
            "gateway_drain_grace_period_seconds",
            "spec.drain.gracePeriodSeconds of the gateway",
            &labels,
            g,
        );
        // Every gateway has these two, so a drain shows against zero.
        s.set(
            "gateway_terminating_pods",
            "Relay pods of the gateway being deleted (draining)",
            &labels,
            0,
        );
        s.set(
            "gateway_drain_overdue_pods",
            "Relay pods deleted longer ago than the gateway's drain grace period",
            &labels,
            0,
        );
        if let Some(a) = &gw.spec.autoscaling {
            s.set(
                "gateway_min_replicas",
                "spec.autoscaling.minReplicas",
                &labels,
                a.min_replicas.into(),
            );
            s.set(
                "gateway_max_replicas",
                "spec.autoscaling.maxReplicas",
                &labels,
                a.max_replicas.into(),
            );
            s.set(
                "gateway_target_connections_per_pod",
                "spec.autoscaling.targetConnectionsPerPod",
                &labels,
                a.target_connections_per_pod,
            );
        }
        let Some(status) = &gw.status else { continue };
        s.set(
            "gateway_replicas",
            "Relay pods of the gateway (status.replicas)",
            &labels,
            status.replicas.into(),
        );
        s.set(
            "gateway_ready_replicas",
            "Relay pods ready to serve (status.readyReplicas)",
            &labels,
            status.ready_replicas.into(),
        );
        s.set(
            "gateway_desired_replicas",
            "Relay pods wanted (status.desiredReplicas)",
            &labels,
            status.desired_replicas.into(),
        );
        s.set(
            "gateway_connections",
            "Open connections across the fleet (status.connections)",
            &labels,
            status.connections,
        );
        for c in &status.conditions {
            s.condition
                .get_or_create(&ConditionLabels {
                    namespace: labels.namespace.clone(),
                    gateway: labels.gateway.clone(),
                    r#type: c.type_.clone(),
                    status: c.status.clone(),
                    reason: c.reason.clone(),
                })
                .set(1);
        }
    }
    for hpa in hpas {
        let Some(gateway) = hpa.labels().get(INSTANCE_LABEL) else {
            continue;
        };
        let labels = GatewayLabels {
            namespace: hpa.namespace().unwrap_or_default(),
            gateway: gateway.clone(),
        };
        let Some(status) = &hpa.status else { continue };
        s.set(
            "hpa_current_replicas",
            "Replicas the gateway's HPA last saw (status.currentReplicas)",
            &labels,
            status.current_replicas.unwrap_or(0).into(),
        );
        s.set(
            "hpa_desired_replicas",
            "Replicas the gateway's HPA asks for (status.desiredReplicas)",
            &labels,
            status.desired_replicas.into(),
        );
    }
    for pod in pods {
        let Some(age) = deleted_for(pod, now) else {
            continue;
        };
        let Some(gateway) = pod.labels().get(INSTANCE_LABEL) else {
            continue;
        };
        let labels = GatewayLabels {
            namespace: pod.namespace().unwrap_or_default(),
            gateway: gateway.clone(),
        };
        let Some(grace) = grace.get(&labels).copied() else {
            continue;
        };
        if let Some((_, f)) = s.gauges.get("gateway_terminating_pods") {
            f.get_or_create(&labels).inc();
        }
        if age > grace
            && let Some((_, f)) = s.gauges.get("gateway_drain_overdue_pods")
        {
            f.get_or_create(&labels).inc();
        }
    }
    s
}

impl Collector for GatewayMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let caches = self
            .caches
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(c) = caches else { return Ok(()) };
        let gateways = c.gateways.state();
        let hpas = c.hpas.state();
        let pods = c.pods.state();
        let s = snapshot(
            gateways.iter().map(AsRef::as_ref),
            hpas.iter().map(AsRef::as_ref),
            pods.iter().map(AsRef::as_ref),
            Timestamp::now(),
        );
        let m = encoder.encode_descriptor(
            "gateway_condition",
            "1 per condition of the gateway's status, with its status and reason",
            None,
            s.condition.metric_type(),
        )?;
        s.condition.encode(m)?;
        for (name, (help, family)) in &s.gauges {
            let m = encoder.encode_descriptor(name, help, None, family.metric_type())?;
            family.encode(m)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;
    use serde_json::json;

    fn gateway() -> WebsocketGateway {
        serde_json::from_value(json!({
            "apiVersion": "wsrelay.dev/v1alpha1",
            "kind": "WebsocketGateway",
            "metadata": { "name": "chat", "namespace": "apps" },
            "spec": {
                "nats": { "urls": ["nats://nats:4222"] },
                "auth": { "allowAnonymous": true },
                "bindings": [{ "channel": "news", "subject": "news" }],
                "autoscaling": { "minReplicas": 2, "maxReplicas": 10, "targetConnectionsPerPod": 500 },
                "drain": { "gracePeriodSeconds": 30 }
            },
            "status": {
                "replicas": 3, "desiredReplicas": 4, "readyReplicas": 2, "connections": 1200,
                "conditions": [
                    { "type": "Ready", "status": "False", "reason": "NatsUnreachable", "message": "m",
                      "lastTransitionTime": "2026-01-01T00:00:00Z" },
                    { "type": "Degraded", "status": "True", "reason": "NatsUnreachable", "message": "m",
                      "lastTransitionTime": "2026-01-01T00:00:00Z" }
                ]
            }
        }))
        .unwrap()
    }

    fn pod(name: &str, deleted_at: Option<&str>) -> Pod {
        serde_json::from_value(json!({
            "metadata": {
                "name": name, "namespace": "apps",
                "labels": { INSTANCE_LABEL: "chat" },
                "deletionTimestamp": deleted_at,
                "deletionGracePeriodSeconds": deleted_at.map(|_| 45),
            }
        }))
        .unwrap()
    }

    fn text(s: &Snapshot) -> String {
        let mut r = Registry::with_prefix("wsrelay_operator");
        r.register("gateway_condition", "c", s.condition.clone());
        for (name, (help, f)) in &s.gauges {
            r.register(*name, *help, f.clone());
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        out
    }

    #[test]
    fn status_spec_hpa_and_draining_pods_become_series() {
        let gw = gateway();
        let hpa: HorizontalPodAutoscaler = serde_json::from_value(json!({
            "metadata": { "name": "chat", "namespace": "apps", "labels": { INSTANCE_LABEL: "chat" } },
            "status": { "currentReplicas": 3, "desiredReplicas": 4 }
        }))
        .unwrap();
        // Deleted 20 s ago (deletionTimestamp = request + 45 s grace): draining, not overdue.
        // Deleted 40 s ago: past the gateway's 30 s drain grace.
        let now: Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let pods = [
            pod("a", None),
            pod("b", Some("2026-01-01T00:01:25Z")),
            pod("c", Some("2026-01-01T00:01:05Z")),
        ];
        let out = text(&snapshot([&gw], [&hpa], &pods, now));
        for want in [
            r#"wsrelay_operator_gateway_condition{namespace="apps",gateway="chat",type="Degraded",status="True",reason="NatsUnreachable"} 1"#,
            r#"wsrelay_operator_gateway_condition{namespace="apps",gateway="chat",type="Ready",status="False",reason="NatsUnreachable"} 1"#,
            r#"wsrelay_operator_gateway_replicas{namespace="apps",gateway="chat"} 3"#,
            r#"wsrelay_operator_gateway_ready_replicas{namespace="apps",gateway="chat"} 2"#,
            r#"wsrelay_operator_gateway_desired_replicas{namespace="apps",gateway="chat"} 4"#,
            r#"wsrelay_operator_gateway_connections{namespace="apps",gateway="chat"} 1200"#,
            r#"wsrelay_operator_gateway_max_replicas{namespace="apps",gateway="chat"} 10"#,
            r#"wsrelay_operator_gateway_target_connections_per_pod{namespace="apps",gateway="chat"} 500"#,
            r#"wsrelay_operator_hpa_current_replicas{namespace="apps",gateway="chat"} 3"#,
            r#"wsrelay_operator_hpa_desired_replicas{namespace="apps",gateway="chat"} 4"#,
            r#"wsrelay_operator_gateway_drain_grace_period_seconds{namespace="apps",gateway="chat"} 30"#,
            r#"wsrelay_operator_gateway_terminating_pods{namespace="apps",gateway="chat"} 2"#,
            r#"wsrelay_operator_gateway_drain_overdue_pods{namespace="apps",gateway="chat"} 1"#,
        ] {
            assert!(out.contains(want), "{want} not in\n{out}");
        }
    }

    #[test]
    fn nothing_without_caches_and_the_registry_prefixes_the_collector() {
        let m = GatewayMetrics::default();
        let mut r = Registry::with_prefix("wsrelay_operator");
        r.register_collector(Box::new(m.clone()));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        assert!(!out.contains("gateway_"), "{out}");

        let (gateways, mut w) = kube::runtime::reflector::store::<WebsocketGateway>();
        w.apply_watcher_event(&kube::runtime::watcher::Event::Apply(gateway()));
        let (hpas, _hw) = kube::runtime::reflector::store::<HorizontalPodAutoscaler>();
        let (pods, _pw) = kube::runtime::reflector::store::<Pod>();
        let attached = m.attach(Caches {
            gateways,
            hpas,
            pods,
        });
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        assert!(
            out.contains(r#"wsrelay_operator_gateway_replicas{namespace="apps",gateway="chat"} 3"#),
            "{out}"
        );
        drop(attached);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        assert!(!out.contains("gateway_"), "{out}");
    }
}
