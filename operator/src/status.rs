//! The status stage: what the gateway reports, computed purely from what was observed.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::{
    CONDITION_DEGRADED, CONDITION_PROGRESSING, CONDITION_READY, CONDITION_REBALANCING,
    ControlStatus, EventsStatus, RegistryStatus, WebsocketGateway, WebsocketGatewayStatus,
};
use crate::build::{
    endpoint, relay_config, relay_control, relay_events, relay_registry, selector_string,
};
use crate::metrics_api::scrape::{AuthorizeCounts, Report};

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
    compute_with(gw, deployment, connections, 0, degraded, now)
}

/// As [`compute`], with `shedding` relay pods not Ready on purpose: they shed connections
/// for a rebalance round ([`crate::rebalance`]) and are Ready again after it, so they do not
/// make the gateway not Ready (a round is no outage and no rollout).
pub fn compute_with(
    gw: &WebsocketGateway,
    deployment: Option<&Deployment>,
    connections: i64,
    shedding: i32,
    degraded: Option<&Degradation>,
    now: &Time,
) -> WebsocketGatewayStatus {
    let generation = gw.metadata.generation;
    let name = gw.metadata.name.clone().unwrap_or_default();

    let dstatus = deployment.and_then(|d| d.status.as_ref());
    let replicas = dstatus.and_then(|s| s.replicas).unwrap_or(0);
    let ready = dstatus.and_then(|s| s.ready_replicas).unwrap_or(0);
    let updated = dstatus.and_then(|s| s.updated_replicas).unwrap_or(0);
    let available = dstatus.and_then(|s| s.available_replicas).unwrap_or(0);
    let wanted = deployment.and_then(|d| d.spec.replicas).unwrap_or(0);
    let rolled_out = deployment.is_some_and(|d| {
        let observed = d.status.as_ref().and_then(|s| s.observed_generation);
        observed >= d.metadata.generation && updated >= wanted && replicas == wanted
    });

    let condition = |type_: &str, ok: bool, reason: &str, message: String| {
        condition(gw, type_, ok, reason, message, now)
    };

    let ready_cond = if degraded.is_some() && deployment.is_none() {
        condition(
            CONDITION_READY,
            false,
            "Degraded",
            "the gateway cannot be rolled out; see the Degraded condition".into(),
        )
    } else if rolled_out && available + shedding >= wanted {
        // Ready as for a Deployment's rollout: every replica runs the current spec and is
        // available, not merely one pod answering.
        let also = if shedding > 0 {
            format!(", {shedding} more shedding connections for a rebalance round")
        } else {
            String::new()
        };
        condition(
            CONDITION_READY,
            true,
            "RolloutComplete",
            format!("{available} of {wanted} relay pods available{also}, all on the current spec"),
        )
    } else {
        let why = match degraded {
            Some(d) => format!("; {}: see the Degraded condition", d.reason),
            None => String::new(),
        };
        let (reason, message) = if available == 0 && wanted > 0 {
            (
                "NoRelayReady",
                format!("0 of {wanted} relay pods available{why}"),
            )
        } else {
            (
                "RollingOut",
                format!(
                    "{updated} of {wanted} relay pods on the current spec, {available} available{why}"
                ),
            )
        };
        condition(CONDITION_READY, false, reason, message)
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

    let namespace = gw.metadata.namespace.as_deref().unwrap_or_default();
    WebsocketGatewayStatus {
        observed_generation: generation,
        conditions: vec![ready_cond, progressing, degraded_cond],
        replicas,
        desired_replicas: wanted,
        ready_replicas: ready,
        connections,
        endpoint: endpoint(gw),
        selector: Some(selector_string(&name)),
        registry: relay_registry(&gw.spec, namespace, &name)
            .map(|r| RegistryStatus { bucket: r.bucket }),
        // The same functions render the relay config, so the status names what the relays use.
        events: relay_events(&gw.spec, namespace, &name).map(|e| EventsStatus {
            subject: e.subject,
            stream: e.durable.map(|d| d.stream),
        }),
        control: relay_control(&gw.spec, namespace, &name)
            .map(|c| ControlStatus { subject: c.subject }),
    }
}

/// A condition of `gw`'s status; it keeps its lastTransitionTime while its status holds
/// (the time says since when).
fn condition(
    gw: &WebsocketGateway,
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    now: &Time,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last = gw
        .status
        .as_ref()
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: gw.metadata.generation,
        last_transition_time: last,
    }
}

/// The `Rebalancing` condition from the rebalancer's last decision ([`crate::rebalance`]):
/// none without `spec.rebalance`; the one the status has while the rebalancer has not
/// decided yet (right after a leader change), so it does not flap. Pure.
pub fn rebalancing(
    gw: &WebsocketGateway,
    summary: Option<&crate::rebalance::Summary>,
    now: &Time,
) -> Option<Condition> {
    gw.spec.rebalance.as_ref()?;
    match summary {
        Some(s) => Some(condition(
            gw,
            CONDITION_REBALANCING,
            s.active,
            s.reason,
            s.message.clone(),
            now,
        )),
        None => gw
            .status
            .as_ref()
            .and_then(|p| {
                p.conditions
                    .iter()
                    .find(|c| c.type_ == CONDITION_REBALANCING)
            })
            .cloned(),
    }
}

/// What the relays report that a person must fix, as a degradation (None: nothing). Pure:
/// from the gateway and the reports of the relay pods that answered their scrape. In
/// order: NATS unreachable (with each server and cause), a config reload refused, the JWKS
/// document unreachable, history streams missing (fewer than the gateway's resumable bindings
/// need), most backend authorization requests failing.
pub fn relay_problem(gw: &WebsocketGateway, relays: &[(String, Report)]) -> Option<Degradation> {
    let total = relays.len();
    let mut unreachable: std::collections::BTreeMap<&(String, String), usize> =
        std::collections::BTreeMap::new();
    for (_, r) in relays {
        if r.nats_connected == Some(false)
            && let Some(e) = &r.nats_error
        {
            *unreachable.entry(e).or_default() += 1;
        }
    }
    if !unreachable.is_empty() {
        let pods: usize = unreachable.values().sum();
        let causes: Vec<String> = unreachable
            .keys()
            .take(3)
            .map(|(server, error)| format!("{server}: {error}"))
            .collect();
        return Some(Degradation {
            reason: "NatsUnreachable".into(),
            message: format!(
                "{pods} of {total} relay pods cannot connect to NATS ({}); check spec.nats.urls, that the server runs, and that the relay pods' network reaches it",
                causes.join("; ")
            ),
        });
    }
    let rejected: Vec<&str> = relays
        .iter()
        .filter(|(_, r)| r.config_rejected)
        .map(|(pod, _)| pod.as_str())
        .collect();
    if !rejected.is_empty() {
        return Some(Degradation {
            reason: "ConfigRejected".into(),
            message: format!(
                "{} of {total} relay pods refused their last config reload and run the previous config ({}); their logs say why",
                rejected.len(),
                rejected.join(", ")
            ),
        });
    }
    let failing: Vec<&str> = relays
        .iter()
        .filter(|(_, r)| r.jwks_failing)
        .map(|(pod, _)| pod.as_str())
        .collect();
    if !failing.is_empty() {
        let url = gw
            .spec
            .auth
            .jwt
            .as_ref()
            .and_then(|j| j.jwks_url.clone())
            .unwrap_or_default();
        return Some(Degradation {
            reason: "JwksUnreachable".into(),
            message: format!(
                "{} of {total} relay pods cannot fetch the JWKS document {url}, so tokens signed with a key they do not hold yet are refused (503); check spec.auth.jwt.jwksUrl and that the relay pods reach it; their logs say why",
                failing.len()
            ),
        });
    }
    let name = gw.metadata.name.clone().unwrap_or_default();
    let namespace = gw.metadata.namespace.clone().unwrap_or_default();
    let wanted: std::collections::BTreeSet<String> = relay_config(&gw.spec, &namespace, &name)
        .bindings
        .into_iter()
        .filter_map(|b| b.history.map(|h| h.stream))
        .collect();
    let expected = i64::try_from(wanted.len()).unwrap_or(i64::MAX);
    let lagging: Vec<(&str, i64)> = relays
        .iter()
        .filter(|(_, r)| r.nats_connected == Some(true))
        .filter_map(|(pod, r)| {
            r.history_streams_ready
                .filter(|n| *n < expected)
                .map(|n| (pod.as_str(), n))
        })
        .collect();
    if let Some(fewest) = lagging.iter().map(|(_, n)| *n).min() {
        // JetStream's answer, when a relay reports one: a refusal (a limit, a name, subjects
        // another stream holds) is a config error no retry mends, so it is named.
        let refused = relays
            .iter()
            .filter(|(pod, _)| lagging.iter().any(|(p, _)| *p == pod.as_str()))
            .find_map(|(_, r)| r.history_error.as_ref());
        let why = match refused {
            Some((stream, error)) => format!("stream {stream}: {error}; check the binding's history (maxBytes within the JetStream file store), JetStream on the NATS server, and that the relays' NATS user may create streams"),
            None => "is JetStream enabled on the NATS server, and may the relays' NATS user create streams? Their logs say why".into(),
        };
        return Some(Degradation {
            reason: "HistoryNotReady".into(),
            message: format!(
                "{} of {total} relay pods have {fewest} of {expected} history streams in place, so resumable subscribes are answered 503; {why}",
                lagging.len()
            ),
        });
    }
    authorize_failing(gw, relays)
}

/// Fewest backend authorization requests (fleet-wide, in the relays' last windows) for
/// failures to count as most of them: one failed request out of one is no news.
pub const AUTHORIZE_MIN_REQUESTS: u64 = 20;

/// Degraded `AuthorizeFailing` when more than half of the fleet's backend authorization
/// requests failed over the relays' last windows ([`crate::metrics_api::scrape::AUTHORIZE_WINDOW`])
/// and there were at least [`AUTHORIZE_MIN_REQUESTS`]. Denies are answers, not failures.
fn authorize_failing(gw: &WebsocketGateway, relays: &[(String, Report)]) -> Option<Degradation> {
    let mut sum = AuthorizeCounts::default();
    let mut pods = 0;
    for (_, r) in relays {
        if let Some(w) = &r.authorize_window {
            sum.add(w);
            pods += usize::from(w.failed() > 0);
        }
    }
    let failed = sum.failed();
    // A failure before the request left (NATS down) may not count as one: never less than
    // the failures, so "more than half" stays a fraction.
    let asked = sum.requests.max(failed);
    if asked < AUTHORIZE_MIN_REQUESTS || failed * 2 <= asked {
        return None;
    }
    let mut reasons: Vec<(&String, &u64)> = sum.failures.iter().filter(|(_, n)| **n > 0).collect();
    reasons.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let reasons: Vec<String> = reasons.iter().map(|(r, n)| format!("{r} {n}")).collect();
    let mut subjects: Vec<&str> = gw
        .spec
        .auth
        .connect_request
        .iter()
        .chain(
            gw.spec
                .bindings
                .iter()
                .filter_map(|b| b.authorize.as_ref()?.request.as_ref()),
        )
        .map(|r| r.subject.as_str())
        .collect();
    subjects.sort_unstable();
    subjects.dedup();
    Some(Degradation {
        reason: "AuthorizeFailing".into(),
        message: format!(
            "{failed} of {asked} backend authorization requests failed in the last {}s or more ({}; on {pods} of {} relay pods), so clients are refused with 503 unless onTimeout: Allow; check that a backend serves {} (a queue group of responders), answers within timeoutMs with {{\"allow\": ...}} JSON, and that the relays' NATS user may publish there",
            crate::metrics_api::scrape::AUTHORIZE_WINDOW.as_secs(),
            reasons.join(", "),
            relays.len(),
            subjects.join(", ")
        ),
    })
}

/// The reason of the gateway's current Degraded=True condition, if it has one.
pub fn degraded_reason(gw: &WebsocketGateway) -> Option<String> {
    gw.status.as_ref().and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.type_ == CONDITION_DEGRADED && c.status == "True")
            .map(|c| c.reason.clone())
    })
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
            "status": { "observedGeneration": 2, "replicas": wanted, "readyReplicas": ready, "availableReplicas": ready, "updatedReplicas": updated }
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
        assert_eq!(cond(&s, "Ready").status, "False");
        assert_eq!(
            cond(&s, "Ready").message,
            "1 of 3 relay pods on the current spec, 1 available"
        );
    }

    /// Ready means the rollout is done: one ready pod of two is not Ready, nor are two
    /// available pods of which one still runs the previous spec.
    #[test]
    fn ready_means_every_replica_updated_and_available() {
        let gw = gateway();
        assert_eq!(
            cond(
                &compute(&gw, Some(&deployment(2, 1, 2)), 0, None, &at(1)),
                "Ready"
            )
            .status,
            "False"
        );
        assert_eq!(
            cond(
                &compute(&gw, Some(&deployment(2, 2, 1)), 0, None, &at(1)),
                "Ready"
            )
            .status,
            "False"
        );
        let mut stale = deployment(2, 2, 2);
        stale.metadata.generation = Some(3);
        assert_eq!(
            cond(&compute(&gw, Some(&stale), 0, None, &at(1)), "Ready").status,
            "False"
        );
        let done = compute(&gw, Some(&deployment(2, 2, 2)), 0, None, &at(1));
        assert_eq!(cond(&done, "Ready").reason, "RolloutComplete");
    }

    /// Relays shedding for a rebalance round read not Ready on purpose: the gateway stays
    /// Ready, and says why fewer pods are available; other unready pods still count.
    #[test]
    fn relays_shedding_for_a_round_keep_the_gateway_ready() {
        let gw = gateway();
        let d = deployment(4, 2, 4);
        let s = compute_with(&gw, Some(&d), 600, 2, None, &at(1));
        assert_eq!(cond(&s, "Ready").status, "True");
        assert_eq!(
            cond(&s, "Ready").message,
            "2 of 4 relay pods available, 2 more shedding connections for a rebalance round, all on the current spec"
        );
        let s = compute_with(&gw, Some(&d), 600, 1, None, &at(1));
        assert_eq!(cond(&s, "Ready").status, "False");
        assert_eq!(
            cond(&compute(&gw, Some(&d), 600, None, &at(1)), "Ready").status,
            "False"
        );
    }

    /// The Rebalancing condition: none without spec.rebalance; the rebalancer's summary
    /// otherwise, keeping its transition time while its status holds; the previous one
    /// while the rebalancer has not decided yet (a new leader).
    #[test]
    fn the_rebalancing_condition_follows_the_rebalancers_summary() {
        use crate::rebalance::Summary;
        let mut gw = gateway();
        let shedding = Summary {
            active: true,
            reason: "Shedding",
            message: "moving 300 connections".into(),
        };
        assert_eq!(rebalancing(&gw, Some(&shedding), &at(1)), None);
        gw.spec.rebalance = Some(crate::api::RebalanceSpec::default());
        let c = rebalancing(&gw, Some(&shedding), &at(1)).expect("condition");
        assert_eq!(
            (c.type_.as_str(), c.status.as_str(), c.reason.as_str()),
            ("Rebalancing", "True", "Shedding")
        );
        assert_eq!(c.message, "moving 300 connections");
        gw.status = Some(WebsocketGatewayStatus {
            conditions: vec![c.clone()],
            ..Default::default()
        });
        assert_eq!(rebalancing(&gw, None, &at(9)), Some(c.clone()));
        let still = rebalancing(&gw, Some(&shedding), &at(5)).expect("condition");
        assert_eq!(still.last_transition_time, at(1));
        let settling = Summary {
            active: false,
            reason: "Settling",
            message: "m".into(),
        };
        let done = rebalancing(&gw, Some(&settling), &at(5)).expect("condition");
        assert_eq!(
            (done.status.as_str(), done.last_transition_time.clone()),
            ("False", at(5))
        );
    }

    fn report(nats: Option<(&str, &str)>) -> Report {
        Report {
            connections: 0,
            nats_connected: Some(nats.is_none()),
            nats_error: nats.map(|(s, e)| (s.into(), e.into())),
            config_rejected: false,
            history_streams_ready: Some(0),
            history_error: None,
            jwks_failing: false,
            authorize: None,
            authorize_window: None,
            rebalancing: false,
        }
    }

    /// A relay whose last window saw `requests` backend requests and these failures.
    fn authorizing(requests: u64, failures: &[(&str, u64)]) -> Report {
        let mut r = report(None);
        r.authorize_window = Some(AuthorizeCounts {
            requests,
            failures: failures.iter().map(|(k, n)| (k.to_string(), *n)).collect(),
        });
        r
    }

    #[test]
    fn most_backend_authorization_requests_failing_is_degraded() {
        let mut gw = gateway();
        gw.spec.bindings[0].authorize = Some(
            serde_json::from_value(json!({"request": {"subject": "authz.prices"}}))
                .expect("authorize"),
        );
        let relays = vec![
            (
                "ticker-a".to_string(),
                authorizing(30, &[("timeout", 20), ("no_responders", 4)]),
            ),
            ("ticker-b".to_string(), authorizing(10, &[])),
        ];
        let d = relay_problem(&gw, &relays).expect("a problem");
        assert_eq!(d.reason, "AuthorizeFailing");
        assert!(
            d.message.starts_with(
                "24 of 40 backend authorization requests failed in the last 60s or more (timeout 20, no_responders 4; on 1 of 2 relay pods)"
            ),
            "{}",
            d.message
        );
        assert!(d.message.contains("serves authz.prices"), "{}", d.message);

        // Half is not most; a few requests are not enough to tell.
        let half = vec![("a".to_string(), authorizing(40, &[("timeout", 20)]))];
        assert_eq!(relay_problem(&gw, &half), None);
        let few = vec![("a".to_string(), authorizing(5, &[("timeout", 5)]))];
        assert_eq!(relay_problem(&gw, &few), None);
        let just = vec![(
            "a".to_string(),
            authorizing(AUTHORIZE_MIN_REQUESTS, &[("bad_reply", 11)]),
        )];
        assert_eq!(
            relay_problem(&gw, &just).map(|d| d.reason),
            Some("AuthorizeFailing".into())
        );
        // No window yet (a relay just started, or an older relay): nothing to say.
        assert_eq!(relay_problem(&gw, &[("a".into(), report(None))]), None);
        // NATS down explains the failures: that is the condition's reason.
        let mut down = authorizing(30, &[("unavailable", 30)]);
        down.nats_connected = Some(false);
        down.nats_error = Some(("nats://nats:4222".into(), "connection refused".into()));
        assert_eq!(
            relay_problem(&gw, &[("a".into(), down)]).map(|d| d.reason),
            Some("NatsUnreachable".into())
        );
    }

    #[test]
    fn unreachable_nats_is_degraded_with_the_server_and_cause() {
        let gw = gateway();
        let refused = ("nats://10.0.0.9:4222", "connection refused");
        let relays = vec![
            ("ticker-a".to_string(), report(Some(refused))),
            ("ticker-b".to_string(), report(Some(refused))),
        ];
        let d = relay_problem(&gw, &relays).expect("a problem");
        assert_eq!(d.reason, "NatsUnreachable");
        assert!(
            d.message.starts_with(
                "2 of 2 relay pods cannot connect to NATS (nats://10.0.0.9:4222: connection refused)"
            ),
            "{}",
            d.message
        );
        let s = compute(&gw, Some(&deployment(2, 0, 2)), 0, Some(&d), &at(1));
        assert_eq!(cond(&s, "Degraded").reason, "NatsUnreachable");
        assert_eq!(cond(&s, "Degraded").status, "True");
        assert_eq!(
            cond(&s, "Ready").message,
            "0 of 2 relay pods available; NatsUnreachable: see the Degraded condition"
        );
        // Connected pods, an older relay without the metric, no pods: nothing to say.
        assert_eq!(relay_problem(&gw, &[("a".into(), report(None))]), None);
        assert_eq!(relay_problem(&gw, &[("a".into(), Report::default())]), None);
        assert_eq!(relay_problem(&gw, &[]), None);
    }

    #[test]
    fn a_refused_reload_and_missing_history_streams_are_degraded() {
        let gw = gateway();
        let mut rejected = report(None);
        rejected.config_rejected = true;
        let d = relay_problem(&gw, &[("ticker-a".into(), rejected)]).expect("problem");
        assert_eq!(d.reason, "ConfigRejected");
        assert!(d.message.contains("ticker-a"), "{}", d.message);

        let mut resumable = gateway();
        resumable.spec.bindings[0].history =
            Some(serde_json::from_value(json!({ "maxMessages": 10 })).expect("history"));
        let d = relay_problem(&resumable, &[("ticker-a".into(), report(None))]).expect("problem");
        assert_eq!(d.reason, "HistoryNotReady");
        assert!(
            d.message.contains("0 of 1 history streams"),
            "{}",
            d.message
        );
        // A relay that says why JetStream refused the stream: the condition says it too.
        let mut refused = report(None);
        refused.history_error = Some((
            "wsrelay_ns_gw_1".into(),
            "insufficient storage resources available (code 500, error code 10047)".into(),
        ));
        let d = relay_problem(&resumable, &[("ticker-a".into(), refused)]).expect("problem");
        assert_eq!(d.reason, "HistoryNotReady");
        assert!(
            d.message.contains(
                "stream wsrelay_ns_gw_1: insufficient storage resources available (code 500, error code 10047)"
            ),
            "{}",
            d.message
        );
        let mut keys = report(None);
        keys.jwks_failing = true;
        let d = relay_problem(&gw, &[("ticker-b".into(), keys)]).expect("problem");
        assert_eq!(d.reason, "JwksUnreachable");
        assert!(d.message.contains("1 of 1 relay pods"), "{}", d.message);

        let mut in_place = report(None);
        in_place.history_streams_ready = Some(1);
        assert_eq!(relay_problem(&resumable, &[("a".into(), in_place)]), None);
        // Not connected to NATS yet: streams cannot be in place, and NATS is the news.
        let mut down = report(None);
        down.nats_connected = Some(false);
        assert_eq!(relay_problem(&resumable, &[("a".into(), down)]), None);
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

    /// The bucket backends read presence from is in the status (docs/protocol.md section
    /// 10), the same the relay config names; none without a registry.
    #[test]
    fn the_registry_bucket_is_in_the_status_when_the_relays_keep_one() {
        let plain = compute(&gateway(), None, 0, None, &at(0));
        assert_eq!(plain.registry, None);
        let gw: WebsocketGateway =
            serde_yaml::from_str(include_str!("../tests/fixtures/presence.yaml")).expect("fixture");
        let s = compute(&gw, None, 0, None, &at(0));
        let bucket = s.registry.expect("registry").bucket;
        assert_eq!(bucket, crate::build::registry_bucket("games", "lobby"));
        assert_eq!(
            relay_config(&gw.spec, "games", "lobby")
                .registry
                .map(|r| r.bucket),
            Some(bucket)
        );
    }

    /// The subjects and the stream backends use are in the status, the same the relay
    /// config names; none for a gateway without them.
    #[test]
    fn the_events_and_control_subjects_are_in_the_status_when_set() {
        let plain = compute(&gateway(), None, 0, None, &at(0));
        assert_eq!((plain.events, plain.control), (None, None));
        let mut gw: WebsocketGateway =
            serde_yaml::from_str(include_str!("../tests/fixtures/events.yaml")).expect("fixture");
        let s = compute(&gw, None, 0, None, &at(0));
        assert_eq!(
            s.events,
            Some(EventsStatus {
                subject: "backend.events.apps.chat".into(),
                stream: Some(crate::build::events_stream("apps", "chat")),
            })
        );
        assert_eq!(
            s.control,
            Some(ControlStatus {
                subject: "wsrelay.control.apps.chat".into()
            })
        );
        assert_eq!(
            s.registry.map(|r| r.bucket),
            Some(crate::build::registry_bucket("apps", "chat")),
            "events and control keep a registry"
        );
        let config = relay_config(&gw.spec, "apps", "chat");
        assert_eq!(
            config.events.map(|e| e.subject),
            s.events.as_ref().map(|e| e.subject.clone())
        );
        // Plain events have no stream.
        gw.spec.events.as_mut().expect("events").durable = None;
        let s = compute(&gw, None, 0, None, &at(0));
        assert_eq!(s.events.expect("events").stream, None);
    }
}
