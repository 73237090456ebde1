//! Service and NetworkPolicy: how clients reach the relays, and nothing else does.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::json;

use super::{ADMIN_PORT, CLIENT_PORT, Ctx, from_json, selector_labels};
use crate::api::{ServiceType, WebsocketGateway};

pub(super) fn service(ctx: &Ctx, gw: &WebsocketGateway) -> Service {
    let svc = &gw.spec.service;
    let type_ = match svc.type_ {
        ServiceType::ClusterIP => "ClusterIP",
        ServiceType::NodePort => "NodePort",
        ServiceType::LoadBalancer => "LoadBalancer",
    };
    let mut service: Service = from_json(json!({
        "spec": {
            "type": type_,
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

/// Ingress to the relay pods only on the WebSocket and admin ports. Egress stays open: NATS
/// and a JWKS endpoint may live anywhere.
pub(super) fn network_policy(ctx: &Ctx) -> NetworkPolicy {
    let mut policy: NetworkPolicy = from_json(json!({
        "spec": {
            "podSelector": { "matchLabels": selector_labels(&ctx.name) },
            "policyTypes": ["Ingress"],
            "ingress": [{
                "ports": [
                    { "port": CLIENT_PORT, "protocol": "TCP" },
                    { "port": ADMIN_PORT, "protocol": "TCP" }
                ]
            }]
        }
    }));
    policy.metadata = ctx.meta();
    policy
}
