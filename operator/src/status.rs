//! The status stage: what the gateway reports, computed purely from what was observed.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::{
    CONDITION_DEGRADED, CONDITION_PROGRESSING, CONDITION_READY, WebsocketGateway,
    WebsocketGatewayStatus,
};
use crate::build::{endpoint, selector_string};

/// A problem a person must fix, as the Degraded condition shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Degradation {
    /// CamelCase reason (the error category).
    pub reason: String,
    /// What is wrong and what to do.
    pub message: String,
}

/// Computes the status from the Deployment as stored (None: not created yet), the fleet's
/// open connections and an optional degradation. A condition keeps its lastTransitionTime
/// while its status does not change.
pub fn compute(
    gw: &WebsocketGateway,
    deployment: Option<&Deployment>,
    connections: i64,
    degraded: Option<&Degradation>,
    now: &Time,
) -> WebsocketGatewayStatus {
    let generation = gw.metadata.generation;
    let previous = gw.status.as_ref();
    let name = gw.metadata.name.clone().unwrap_or_default();

    let dstatus = deployment.and_then(|d| d.status.as_ref());
    let replicas = dstatus.and_then(|s| s.replicas).unwrap_or(0);
    let ready = dstatus.and_then(|s| s.ready_replicas).unwrap_or(0);
    let updated = dstatus.and_then(|s| s.updated_replicas).unwrap_or(0);
    let wanted = deployment.and_then(|d| d.spec.replicas).unwrap_or(0);
    let rolled_out = deployment.is_some_and(|d| {
        let observed = d.status.as_ref().and_then(|s| s.observed_generation);
        observed >= d.metadata.generation && updated >= wanted && replicas == wanted
    });

    let condition = |type_: &str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" };
        // Keep the transition time while the status holds: it says since when.
        let last = previous
            .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_))
            .filter(|c| c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| now.clone());
        Condition {
            type_: type_.to_string(),
            status: status.to_string(),
            reason: reason.to_string(),
            message,
            observed_generation: generation,
            last_transition_time: last,
        }
    };

    let ready_cond = if degraded.is_some() && deployment.is_none() {
        condition(
            CONDITION_READY,
            false,
            "Degraded",
            "the gateway cannot be rolled out; see the Degraded condition".into(),
        )
    } else if ready > 0 {
        condition(
            CONDITION_READY,
            true,
            "RelaysReady",
            format!("{ready} of {wanted} relay pods ready"),
        )
    } else {
        condition(
            CONDITION_READY,
            false,
            "NoRelayReady",
            format!("0 of {wanted} relay pods ready"),
        )
    };
    let progressing = if deployment.is_none() {
        condition(
            CONDITION_PROGRESSING,
            false,
            "NotStarted",
            "no relay Deployment yet".into(),
        )
    } else if rolled_out {
        condition(
            CONDITION_PROGRESSING,
            false,
            "RolloutComplete",
            format!("{updated} of {wanted} relay pods run the current spec"),
        )
    } else {
        condition(
            CONDITION_PROGRESSING,
            true,
            "RollingOut",
            format!("{updated} of {wanted} relay pods run the current spec"),
        )
    };
    let degraded_cond = match degraded {
        Some(d) => condition(CONDITION_DEGRADED, true, &d.reason, d.message.clone()),
        None => condition(
            CONDITION_DEGRADED,
            false,
            "AsExpected",
            "the spec and everything it refers to are usable".into(),
        ),
    };

    WebsocketGatewayStatus {
        observed_generation: generation,
        conditions: vec![ready_cond, progressing, degraded_cond],
        replicas,
        ready_replicas: ready,
        connections,
        endpoint: endpoint(gw),
        selector: Some(selector_string(&name)),
    }
}

/// Whether the gateway's current status says Degraded=True.
pub fn is_degraded(gw: &WebsocketGateway) -> bool {
    gw.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == CONDITION_DEGRADED && c.status == "True")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;
    use serde_json::json;

    fn gateway() -> WebsocketGateway {
        serde_yaml::from_str(include_str!("../tests/fixtures/minimal.yaml")).expect("fixture")
    }

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).expect("valid time"))
    }

    fn deployment(wanted: i32, ready: i32, updated: i32) -> Deployment {
        serde_json::from_value(json!({
            "metadata": { "name": "ticker", "generation": 2 },
            "spec": { "replicas": wanted, "selector": {}, "template": {} },
            "status": { "observedGeneration": 2, "replicas": wanted, "readyReplicas": ready, "updatedReplicas": updated }
        }))
        .expect("deployment")
    }

    fn cond<'a>(s: &'a WebsocketGatewayStatus, t: &str) -> &'a Condition {
        s.conditions
            .iter()
            .find(|c| c.type_ == t)
            .expect("condition")
    }

    #[test]
    fn ready_rolled_out_gateway() {
        let gw = gateway();
        let s = compute(&gw, Some(&deployment(2, 2, 2)), 7, None, &at(100));
        assert_eq!(s.observed_generation, Some(1));
        assert_eq!((s.replicas, s.ready_replicas), (2, 2));
        assert_eq!(s.connections, 7);
        assert_eq!(cond(&s, "Ready").status, "True");
        assert_eq!(cond(&s, "Progressing").reason, "RolloutComplete");
        assert_eq!(cond(&s, "Degraded").status, "False");
        assert_eq!(s.endpoint.as_deref(), Some("ws://ticker.markets.svc:80/ws"));
        assert_eq!(
            s.selector.as_deref(),
            Some("app.kubernetes.io/instance=ticker,app.kubernetes.io/name=wsrelay")
        );
    }

    #[test]
    fn a_rollout_in_progress_is_progressing() {
        let s = compute(&gateway(), Some(&deployment(3, 1, 1)), 0, None, &at(100));
        assert_eq!(cond(&s, "Progressing").status, "True");
        assert_eq!(cond(&s, "Ready").message, "1 of 3 relay pods ready");
    }

    #[test]
    fn degradation_sets_reason_and_message() {
        let d = Degradation {
            reason: "SecretNotFound".into(),
            message: "Secret x does not exist".into(),
        };
        let s = compute(&gateway(), None, 0, Some(&d), &at(100));
        let c = cond(&s, "Degraded");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "SecretNotFound")
        );
        assert_eq!(cond(&s, "Ready").status, "False");
    }

    #[test]
    fn transition_time_is_kept_while_status_holds() {
        let mut gw = gateway();
        gw.status = Some(compute(&gw, Some(&deployment(2, 2, 2)), 7, None, &at(100)));
        let later = compute(&gw, Some(&deployment(2, 2, 2)), 0, None, &at(200));
        assert_eq!(cond(&later, "Ready").last_transition_time, at(100));
        let down = compute(&gw, Some(&deployment(2, 0, 2)), 0, None, &at(300));
        assert_eq!(cond(&down, "Ready").last_transition_time, at(300));
    }
}
