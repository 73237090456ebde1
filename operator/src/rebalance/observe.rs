//! What the rebalancer reads of a gateway's objects, as the pure decision's input: the
//! relay pods with their scraped counts, whether the Deployment is rolling out, whether
//! the HPA is steady. Pure.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use super::decide::{Hpa, PodView};
use crate::metrics_api::scrape::Report;

/// Whether the Deployment is changing its pods: its controller has not seen its latest
/// spec, or not every replica runs the current template, or it has more or fewer pods than
/// it wants. Ready and available counts are left out on purpose: a relay shedding for a
/// round reads not Ready, and pods' readiness is judged pod by pod. No Deployment: nothing
/// runs yet, as good as a rollout.
pub fn rollout_in_progress(deployment: Option<&Deployment>) -> bool {
    let Some(d) = deployment else { return true };
    let wanted = d.spec.replicas.unwrap_or(1);
    let Some(status) = d.status.as_ref() else {
        return true;
    };
    status.observed_generation < d.metadata.generation
        || status.updated_replicas.unwrap_or(0) != wanted
        || status.replicas.unwrap_or(0) != wanted
}

/// The autoscaler's state: steady when there is none, or when the replicas it wants, the
/// replicas it last saw and the Deployment's own count agree.
pub fn hpa_state(hpa: Option<&HorizontalPodAutoscaler>, deployment: Option<&Deployment>) -> Hpa {
    let Some(hpa) = hpa else { return Hpa::Stable };
    let status = hpa.status.as_ref();
    let desired = status.map(|s| s.desired_replicas).unwrap_or(0);
    let current = status.and_then(|s| s.current_replicas).unwrap_or(0);
    let replicas = deployment.and_then(|d| d.spec.replicas).unwrap_or(0);
    if desired == current && current == replicas {
        Hpa::Stable
    } else {
        Hpa::Scaling {
            desired,
            current,
            replicas,
        }
    }
}

/// The gateway's relay pods as the decision sees them, by name, with the reports of those
/// that answered their scrape (by pod name). Pods in a terminal phase (Failed, Succeeded:
/// evicted, their object kept) are left out: they hold no connections and never come back.
pub fn pod_views(pods: &[Pod], reports: &[(String, Report)]) -> Vec<PodView> {
    let mut views: Vec<PodView> = pods
        .iter()
        .filter(|p| {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            !matches!(phase, Some("Failed" | "Succeeded"))
        })
        .map(|p| {
            let name = p.name_any();
            let report = reports.iter().find(|(n, _)| *n == name).map(|(_, r)| r);
            let ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            PodView {
                ready,
                deleting: p.metadata.deletion_timestamp.is_some(),
                connections: report.map(|r| u64::try_from(r.connections).unwrap_or(0)),
                shedding: report.is_some_and(|r| r.rebalancing),
                name,
            }
        })
        .collect();
    views.sort_by(|a, b| a.name.cmp(&b.name));
    views
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(generation: i64, status: serde_json::Value) -> Deployment {
        serde_json::from_value(json!({
            "metadata": { "name": "chat", "generation": generation },
            "spec": { "replicas": 4, "selector": {}, "template": {} },
            "status": status
        }))
        .expect("deployment")
    }

    /// A round's shedding pods are not Ready and not available: that is no rollout.
    #[test]
    fn a_rollout_is_a_new_generation_or_pods_off_the_template_not_unready_ones() {
        let steady = json!({ "observedGeneration": 3, "replicas": 4, "updatedReplicas": 4, "readyReplicas": 2, "availableReplicas": 2 });
        assert!(!rollout_in_progress(Some(&deployment(3, steady))));
        let unseen = json!({ "observedGeneration": 2, "replicas": 4, "updatedReplicas": 4 });
        assert!(rollout_in_progress(Some(&deployment(3, unseen))));
        let rolling = json!({ "observedGeneration": 3, "replicas": 5, "updatedReplicas": 2 });
        assert!(rollout_in_progress(Some(&deployment(3, rolling))));
        let scaling = json!({ "observedGeneration": 3, "replicas": 2, "updatedReplicas": 2 });
        assert!(rollout_in_progress(Some(&deployment(3, scaling))));
        assert!(rollout_in_progress(None));
    }

    #[test]
    fn the_hpa_is_steady_when_it_wants_what_runs() {
        let d = deployment(3, json!({}));
        let hpa = |desired: i32, current: i32| -> HorizontalPodAutoscaler {
            serde_json::from_value(json!({
                "spec": { "maxReplicas": 8, "scaleTargetRef": { "kind": "Deployment", "name": "chat" } },
                "status": { "desiredReplicas": desired, "currentReplicas": current }
            }))
            .expect("hpa")
        };
        assert_eq!(hpa_state(None, Some(&d)), Hpa::Stable);
        assert_eq!(hpa_state(Some(&hpa(4, 4)), Some(&d)), Hpa::Stable);
        assert_eq!(
            hpa_state(Some(&hpa(6, 4)), Some(&d)),
            Hpa::Scaling {
                desired: 6,
                current: 4,
                replicas: 4
            }
        );
        // The HPA decided, the Deployment has not taken it yet.
        assert!(matches!(
            hpa_state(Some(&hpa(2, 2)), Some(&d)),
            Hpa::Scaling { .. }
        ));
    }

    #[test]
    fn pods_carry_their_readiness_count_and_shedding_and_terminal_ones_are_left_out() {
        let pod = |name: &str, phase: &str, ready: bool| -> Pod {
            serde_json::from_value(json!({
                "metadata": { "name": name },
                "status": { "phase": phase, "conditions": [{ "type": "Ready", "status": if ready { "True" } else { "False" } }] }
            }))
            .expect("pod")
        };
        let report = |connections: i64, rebalancing: bool| Report {
            connections,
            rebalancing,
            ..Report::default()
        };
        let views = pod_views(
            &[
                pod("b", "Running", false),
                pod("a", "Running", true),
                pod("evicted", "Failed", false),
                pod("c", "Running", true),
            ],
            &[
                ("a".into(), report(7, false)),
                ("b".into(), report(3, true)),
            ],
        );
        assert_eq!(
            views,
            [
                PodView {
                    name: "a".into(),
                    ready: true,
                    deleting: false,
                    connections: Some(7),
                    shedding: false
                },
                PodView {
                    name: "b".into(),
                    ready: false,
                    deleting: false,
                    connections: Some(3),
                    shedding: true
                },
                PodView {
                    name: "c".into(),
                    ready: true,
                    deleting: false,
                    connections: None,
                    shedding: false
                },
            ]
        );
    }
}
