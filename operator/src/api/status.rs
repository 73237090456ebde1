//! The observed state of a gateway: what the operator reports.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Condition type: the rollout is done: every relay pod runs the current spec and is
/// available (as `kubectl rollout status` means it).
pub const CONDITION_READY: &str = "Ready";
/// Condition type: a rollout or scale change is under way.
pub const CONDITION_PROGRESSING: &str = "Progressing";
/// Condition type: the operator cannot bring the gateway to its spec (reason says why).
pub const CONDITION_DEGRADED: &str = "Degraded";
/// Condition type, with `spec.rebalance` only: True while a rebalance round moves
/// connections; the reason says what the rebalancer waits for otherwise.
pub const CONDITION_REBALANCING: &str = "Rebalancing";

/// What the operator observed of a gateway.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebsocketGatewayStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Ready, Progressing and Degraded, one of each at most, and Rebalancing when
    /// `spec.rebalance` is set.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// Relay pods that exist (the scale subresource reads it).
    #[serde(default)]
    pub replicas: i32,

    /// Relay pods wanted: `spec.replicas`, or the count the autoscaler chose.
    #[serde(default)]
    pub desired_replicas: i32,

    /// Relay pods ready to serve.
    #[serde(default)]
    pub ready_replicas: i32,

    /// Open client connections across the fleet.
    #[serde(default)]
    pub connections: i64,

    /// Where clients connect, e.g. `ws://chat.apps.svc:80`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,

    /// The label selector of the relay pods, for the scale subresource and HPA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,

    /// The connection registry the relays keep, when they keep one (a binding has
    /// `presence`, or `spec.events`, `spec.control` or `spec.registry` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<RegistryStatus>,

    /// Where the relays publish lifecycle events, when `spec.events` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<EventsStatus>,

    /// Where the relays serve the control service, when `spec.control` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<ControlStatus>,
}

/// Where the gateway's connection registry is.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegistryStatus {
    /// The JetStream KV bucket (its stream is `KV_<bucket>`): what backends read presence
    /// from with plain NATS (`nats kv ls <bucket>`; keys `pres.<channel>.<relay>.<conn>`).
    pub bucket: String,
}

/// Where a gateway's lifecycle events go.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventsStatus {
    /// The subject prefix with the gateway's namespace and name: events are published on
    /// `<subject>.<Type>` (`nats sub '<subject>.*'`).
    pub subject: String,
    /// The JetStream stream that keeps them, with `spec.events.durable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
}

/// Where a gateway's control service is.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ControlStatus {
    /// The subject prefix with the gateway's namespace and name: the endpoints are
    /// `<subject>.disconnect`, `.connections`, `.revoke` and `.invalidate` (`wsrelay ctl
    /// --subject <subject>`).
    pub subject: String,
}
