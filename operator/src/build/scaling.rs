//! HorizontalPodAutoscaler and PodDisruptionBudget: how many relays, and how few.

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use serde_json::json;

use super::{Ctx, from_json, selector_labels};
use crate::api::WebsocketGateway;

/// The relay's open-connection gauge, served per pod through the custom metrics API.
pub const CONNECTIONS_METRIC: &str = "wsrelay_connections";

/// An HPA on the average open connections per pod, or none when autoscaling is off.
pub(super) fn hpa(ctx: &Ctx, gw: &WebsocketGateway) -> Option<HorizontalPodAutoscaler> {
    let a = gw.spec.autoscaling.as_ref()?;
    let mut hpa: HorizontalPodAutoscaler = from_json(json!({
        "spec": {
            "scaleTargetRef": { "apiVersion": "apps/v1", "kind": "Deployment", "name": ctx.name },
            "minReplicas": a.min_replicas,
            "maxReplicas": a.max_replicas,
            "metrics": [{
                "type": "Pods",
                "pods": {
                    "metric": { "name": CONNECTIONS_METRIC },
                    "target": { "type": "AverageValue", "averageValue": a.target_connections_per_pod.to_string() }
                }
            }],
            "behavior": {
                // Scale up fast: a reconnect storm should find room.
                "scaleUp": {
                    "stabilizationWindowSeconds": 0,
                    "selectPolicy": "Max",
                    "policies": [
                        { "type": "Percent", "value": 100, "periodSeconds": 30 },
                        { "type": "Pods", "value": 4, "periodSeconds": 30 }
                    ]
                },
                // Scale down slowly: every removed pod drains its clients onto the others.
                "scaleDown": {
                    "stabilizationWindowSeconds": a.scale_down_stabilization_seconds,
                    "selectPolicy": "Min",
                    "policies": [
                        { "type": "Percent", "value": 10, "periodSeconds": 60 },
                        { "type": "Pods", "value": 1, "periodSeconds": 60 }
                    ]
                }
            }
        }
    }));
    hpa.metadata = ctx.meta();
    Some(hpa)
}

/// At most one relay down by choice at a time, so voluntary disruptions (node drains)
/// move clients gradually. Unhealthy pods may always be evicted, so a broken pod never
/// blocks a node drain.
pub(super) fn pdb(ctx: &Ctx) -> PodDisruptionBudget {
    let mut pdb: PodDisruptionBudget = from_json(json!({
        "spec": {
            "maxUnavailable": 1,
            "selector": { "matchLabels": selector_labels(&ctx.name) },
            "unhealthyPodEvictionPolicy": "AlwaysAllow"
        }
    }));
    pdb.metadata = ctx.meta();
    pdb
}
