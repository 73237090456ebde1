//! Service and NetworkPolicy: how clients reach the relays, and nothing else does.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer};
use serde_json::json;

use super::{ADMIN_PORT, CLIENT_PORT, Ctx, from_json, selector_labels};
use crate::api::{ServiceType, SessionAffinity, WebsocketGateway};

pub(super) fn service(ctx: &Ctx, gw: &WebsocketGateway) -> Service {
    let svc = &gw.spec.service;
    let type_ = match svc.type_ {
        ServiceType::ClusterIP => "ClusterIP",
        ServiceType::NodePort => "NodePort",
        ServiceType::LoadBalancer => "LoadBalancer",
    };
    // Always set, so that turning ClientIP off again is applied (server-side apply).
    let affinity = match svc.session_affinity {
        SessionAffinity::None => "None",
        SessionAffinity::ClientIP => "ClientIP",
    };
    let mut service: Service = from_json(json!({
        "spec": {
            "type": type_,
            "sessionAffinity": affinity,
            "selector": selector_labels(&ctx.name),
            "ports": [{
                "name": "ws",
                "port": svc.port,
                "targetPort": "ws",
                "protocol": "TCP",
                "appProtocol": if gw.spec.tls.is_some() { "kubernetes.io/wss" } else { "kubernetes.io/ws" }
            }]
        }
    }));
    service.metadata = ctx.meta();
    if !svc.annotations.is_empty() {
        service.metadata.annotations = Some(svc.annotations.clone());
    }
    service
}

/// Ingress to the relay pods: the WebSocket port from anywhere (clients come through the
/// Service, from wherever it is exposed), the admin port (unauthenticated `/metrics`,
/// `/ready`, `/live`) only from `admin_peers`. Egress stays open: NATS and a JWKS endpoint
/// may live anywhere.
pub(super) fn network_policy(ctx: &Ctx, admin_peers: &[NetworkPolicyPeer]) -> NetworkPolicy {
    let mut ingress = vec![json!({
        "ports": [{ "port": CLIENT_PORT, "protocol": "TCP" }]
    })];
    // A rule with an empty `from` would admit every source: without peers there is no rule.
    if !admin_peers.is_empty() {
        ingress.push(json!({
            "from": admin_peers,
            "ports": [{ "port": ADMIN_PORT, "protocol": "TCP" }]
        }));
    }
    let mut policy: NetworkPolicy = from_json(json!({
        "spec": {
            "podSelector": { "matchLabels": selector_labels(&ctx.name) },
            "policyTypes": ["Ingress"],
            "ingress": ingress
        }
    }));
    policy.metadata = ctx.meta();
    policy
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{Options, build_with};

    fn gateway() -> WebsocketGateway {
        serde_yaml::from_str(include_str!("../../tests/fixtures/minimal.yaml"))
            .expect("fixture parses")
    }

    fn peer(v: serde_json::Value) -> NetworkPolicyPeer {
        serde_json::from_value(v).expect("peer")
    }

    /// The rules that admit a port, with their sources (None: every source).
    fn rules_for(policy: &NetworkPolicy, port: i32) -> Vec<Option<Vec<NetworkPolicyPeer>>> {
        let spec = policy.spec.as_ref().expect("spec");
        spec.ingress
            .iter()
            .flatten()
            .filter(|r| {
                r.ports.iter().flatten().any(|p| {
                    p.port
                        == Some(
                            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port),
                        )
                })
            })
            .map(|r| r.from.clone().filter(|f| !f.is_empty()))
            .collect()
    }

    #[test]
    fn the_admin_port_is_open_only_to_the_named_peers() {
        let operator = peer(json!({
            "namespaceSelector": { "matchLabels": { "kubernetes.io/metadata.name": "wsrelay-system" } },
            "podSelector": { "matchLabels": { "app.kubernetes.io/name": "wsrelay-operator" } }
        }));
        let monitoring = peer(json!({
            "namespaceSelector": { "matchLabels": { "kubernetes.io/metadata.name": "monitoring" } },
            "podSelector": { "matchLabels": { "app.kubernetes.io/name": "prometheus" } }
        }));
        let options = Options {
            admin_peers: vec![operator.clone(), monitoring.clone()],
            ..Options::default()
        };
        let np = build_with(&gateway(), &options)
            .expect("builds")
            .network_policy;
        assert_eq!(
            rules_for(&np, ADMIN_PORT),
            vec![Some(vec![operator, monitoring])]
        );
        // Clients still reach the WebSocket port from anywhere.
        assert_eq!(rules_for(&np, CLIENT_PORT), vec![None]);
    }

    #[test]
    fn session_affinity_is_none_unless_asked_for_client_ip() {
        let affinity = |gw: &WebsocketGateway| {
            build_with(gw, &Options::default())
                .expect("builds")
                .service
                .spec
                .and_then(|s| s.session_affinity)
        };
        // Set explicitly, so that going back from ClientIP is applied too.
        assert_eq!(affinity(&gateway()).as_deref(), Some("None"));
        let mut gw = gateway();
        gw.spec.service.session_affinity = SessionAffinity::ClientIP;
        assert_eq!(affinity(&gw).as_deref(), Some("ClientIP"));
        // And from YAML, as a user writes it.
        let gw: WebsocketGateway =
            serde_yaml::from_str(&include_str!("../../tests/fixtures/minimal.yaml").replace(
                "spec:\n",
                "spec:\n  service:\n    sessionAffinity: ClientIP\n",
            ))
            .expect("parses");
        assert_eq!(affinity(&gw).as_deref(), Some("ClientIP"));
    }

    #[test]
    fn without_peers_the_admin_port_is_closed() {
        let np = build_with(&gateway(), &Options::default())
            .expect("builds")
            .network_policy;
        assert!(rules_for(&np, ADMIN_PORT).is_empty(), "{np:?}");
        assert_eq!(rules_for(&np, CLIENT_PORT), vec![None]);
    }
}
