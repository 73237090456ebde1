//! HorizontalPodAutoscaler and PodDisruptionBudget: how many relays, and how few.

use k8s_openapi::api::apps::v1::Deployment;
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

/// The field manager that holds `spec.replicas` of a relay Deployment while the replica
/// count passes from the operator (a fixed `spec.replicas`) to the HPA.
pub const HANDOVER_MANAGER: &str = "wsrelay-operator-replicas-handover";

/// Whether `manager`'s server-side apply owns `spec.replicas` of `deployment`.
pub fn applies_replicas(deployment: &Deployment, manager: &str) -> bool {
    deployment
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| {
            m.manager.as_deref() == Some(manager) && m.operation.as_deref() == Some("Apply")
        })
        .filter_map(|m| m.fields_v1.as_ref())
        .any(|f| {
            f.0.get("f:spec")
                .and_then(|s| s.get("f:replicas"))
                .is_some()
        })
}

/// The apply that hands `spec.replicas` over to the HPA without a dip, or None when none is
/// needed.
///
/// When autoscaling is switched on, the operator's apply stops naming `spec.replicas`. If
/// the operator was its only owner, the API server would then remove the field and the
/// Deployment would fall back to 1 replica until the HPA acts (4 -> 1 -> 3: three relays
/// drained for nothing). So first a second field manager applies the live count (the
/// "transferring ownership" step of server-side apply): the field then has another owner
/// and keeps its value when the operator lets go. The HPA takes it over with its first
/// scale, which removes the handover manager's claim.
///
/// The apply configuration is JSON, not a `Deployment`: that type always serialises a
/// selector and a template, which the handover manager would then co-own.
pub fn replicas_handover(
    desired: &Deployment,
    live: Option<&Deployment>,
) -> Option<serde_json::Value> {
    if desired.spec.replicas.is_some() {
        return None;
    }
    let live = live?;
    let replicas = live.spec.replicas?;
    if !applies_replicas(live, super::MANAGER) {
        return None;
    }
    Some(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": desired.metadata.name, "namespace": desired.metadata.namespace },
        "spec": { "replicas": replicas }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(replicas: i32, managers: serde_json::Value) -> Deployment {
        from_json(json!({
            "metadata": { "name": "chat", "namespace": "apps", "managedFields": managers },
            "spec": { "replicas": replicas, "selector": {}, "template": {} }
        }))
    }

    fn applied_by(manager: &str, fields: serde_json::Value) -> serde_json::Value {
        json!({ "manager": manager, "operation": "Apply", "apiVersion": "apps/v1", "fieldsType": "FieldsV1", "fieldsV1": fields })
    }

    fn desired(replicas: Option<i32>) -> Deployment {
        let mut spec = json!({ "selector": {}, "template": {} });
        if let Some(r) = replicas {
            spec["replicas"] = json!(r);
        }
        from_json(json!({ "metadata": { "name": "chat", "namespace": "apps" }, "spec": spec }))
    }

    /// replicas: 4 -> autoscaling: the live 4 is held by the handover manager before the
    /// operator's apply drops the field (without it the Deployment went 4 -> 1 -> 3).
    #[test]
    fn switching_to_autoscaling_hands_the_live_count_over() {
        let owned = live(
            4,
            json!([applied_by(
                super::super::MANAGER,
                json!({ "f:spec": { "f:replicas": {}, "f:template": {} } })
            )]),
        );
        let handover = replicas_handover(&desired(None), Some(&owned)).expect("a handover");
        // Only spec.replicas is claimed, at the live count.
        assert_eq!(
            handover,
            json!({
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": { "name": "chat", "namespace": "apps" },
                "spec": { "replicas": 4 }
            })
        );
    }

    #[test]
    fn no_handover_when_the_operator_does_not_own_replicas_or_still_sets_them() {
        let by_hpa = live(
            3,
            json!([
                applied_by(super::super::MANAGER, json!({ "f:spec": { "f:template": {} } })),
                { "manager": "kube-controller-manager", "operation": "Update", "subresource": "scale",
                  "fieldsType": "FieldsV1", "fieldsV1": { "f:spec": { "f:replicas": {} } } }
            ]),
        );
        assert!(replicas_handover(&desired(None), Some(&by_hpa)).is_none());
        let owned = live(
            4,
            json!([applied_by(
                super::super::MANAGER,
                json!({ "f:spec": { "f:replicas": {} } })
            )]),
        );
        assert!(replicas_handover(&desired(Some(4)), Some(&owned)).is_none());
        assert!(replicas_handover(&desired(None), None).is_none());
    }
}
