//! The desired state of a gateway: what an application team writes.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::WebsocketGatewayStatus;

/// The relay image used when `spec.image.name` is not set: the one `images/build.sh` builds
/// from this workspace, named in `images/images.env`, tagged with the workspace version.
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/wsrelay/wsrelay:", env!("CARGO_PKG_VERSION"));

/// A fleet of wsrelay pods that bridge WebSocket clients and NATS subjects.
// The printcolumn attributes repeat `type_ = ...` by design; clippy reads that as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "wsrelay.dev",
    version = "v1alpha1",
    kind = "WebsocketGateway",
    plural = "websocketgateways",
    singular = "websocketgateway",
    shortname = "wsgw",
    category = "wsrelay",
    namespaced,
    status = "WebsocketGatewayStatus",
    derive = "PartialEq",
    doc = "A WebsocketGateway is a fleet of wsrelay pods that authenticate WebSocket clients and relay messages between them and NATS subjects, behind a Service, autoscaled on connection count.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the gateway serves clients"
    ),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.desiredReplicas",
        description = "Relay pods wanted (spec.replicas, or the autoscaler's count)"
    ),
    printcolumn(
        name = "Pods-Ready",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Relay pods ready to serve"
    ),
    printcolumn(
        name = "Connections",
        type_ = "integer",
        json_path = ".status.connections",
        description = "Open client connections across the fleet"
    ),
    printcolumn(
        name = "Degraded",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Degraded\")].reason",
        description = "Why the gateway is degraded (AsExpected when it is not)"
    ),
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".status.endpoint",
        description = "Where clients connect"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = Rule::new("!(has(self.replicas) && has(self.autoscaling))").message("spec.replicas and spec.autoscaling are mutually exclusive: with autoscaling the HorizontalPodAutoscaler sets the replica count"),
    validation = Rule::new("has(self.autoscaling) || !has(oldSelf.autoscaling) || has(self.replicas)").message("removing spec.autoscaling needs an explicit spec.replicas: set it to the current count (status.replicas) to keep every relay running, or to the count you want; the relays go straight from the autoscaled count to it"),
    validation = Rule::new("!has(self.autoscaling) || self.autoscaling.targetConnectionsPerPod <= self.limits.maxConnectionsPerPod").message("spec.autoscaling.targetConnectionsPerPod must not exceed spec.limits.maxConnectionsPerPod: pods would refuse connections before the autoscaler adds more"),
    validation = Rule::new("self.bindings.all(b, !has(b.history) || b.history.maxMessages <= self.limits.sendQueueLength)").message("a binding's history.maxMessages must not exceed limits.sendQueueLength: a full replay is queued to the client at once"),
    validation = Rule::new("self.bindings.all(b, !has(b.history) || b.history.maxBytes >= self.limits.maxMessageBytes)").message("a binding's history.maxBytes must be at least limits.maxMessageBytes: the stream must hold one message of the largest size"),
    validation = Rule::new("has(self.auth.jwt) || !self.bindings.exists(b, b.subject.contains('{claims.'))").message("a binding uses {claims.*} but auth has no jwt section, so clients carry no claims: add auth.jwt or drop the claims from the subject"),
    validation = Rule::new("has(self.auth.jwt) || !self.bindings.exists(b, has(b.authorize) && has(b.authorize.token) && !has(b.authorize.token.jwt))").message("a binding's authorize.token has no jwt of its own, so subscription tokens would be verified with spec.auth.jwt's keys, and auth has no jwt section: add auth.jwt, or give the token its own jwt (a subscription token's sub must also match the connection's, which needs auth.jwt)"),
    validation = Rule::new("!has(self.events) || !has(self.control) || (self.events.subject != self.control.subject && !self.events.subject.startsWith(self.control.subject + '.') && !self.control.subject.startsWith(self.events.subject + '.'))").message("events.subject and control.subject must not be one within the other (such as wsrelay and wsrelay.control): events would reach the control service"),
    validation = Rule::new("!has(self.events) || !has(self.events.durable) || self.events.durable.duplicateWindowSeconds >= 2 * (has(self.registry) ? self.registry.leaseSeconds : 15) + self.events.graceSeconds").message("events.durable.duplicateWindowSeconds must be at least twice registry.leaseSeconds (15 when spec.registry is unset) plus events.graceSeconds: a relay's own Disconnected, the survivor's relay_lost and a Resumed for the same connection must fall in one window to be stored once")
)]
#[serde(rename_all = "camelCase")]
pub struct WebsocketGatewaySpec {
    /// The fixed number of relay pods when autoscaling is off (the scale subresource writes
    /// it). Must be unset when `autoscaling` is set, and set in the same change that removes
    /// `autoscaling` (the relays then go straight from the autoscaled count to this one).
    ///
    /// Default: 2 when `autoscaling` is unset. (The operator applies it, not the API
    /// server: a schema default would also be filled in beside `autoscaling`.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: Option<i32>,

    /// The NATS servers the relays connect to, and how they authenticate.
    pub nats: NatsSpec,

    /// How clients authenticate on the WebSocket handshake (required, so that a gateway
    /// without authentication is a choice someone wrote down: `allowAnonymous: true`).
    pub auth: AuthSpec,

    /// The client-facing channels and the NATS subjects behind them. Each channel may be
    /// bound once.
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = Rule::new("self.all(b, self.exists_one(c, c.channel == b.channel))").message("each channel may be bound only once: two bindings share a channel"))]
    pub bindings: Vec<Binding>,

    /// Per-pod, per-client and per-connection limits.
    #[serde(default)]
    pub limits: LimitsSpec,

    /// How the relays tell clients apart behind proxies: which peers may name the client's
    /// address in a header. Used by `limits.maxConnectionsPerIp` and
    /// `limits.maxHandshakesInFlightPerIp`.
    #[serde(default)]
    pub network: NetworkSpec,

    /// Scale the fleet on open connections per pod (a HorizontalPodAutoscaler on the relay
    /// metric `wsrelay_connections`). Unset: a fixed `replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,

    /// Move connections off relay pods that hold well above the fleet's mean (after a
    /// scale-up, or after a relay was killed and its clients piled onto the others), with
    /// the relays' `drain` notice so clients on resumable channels lose nothing
    /// (docs/autoscaling.md, "Rebalancing"). Unset: relays never move open connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebalance: Option<RebalanceSpec>,

    /// How a relay pod lets its clients go when it stops (rollout, scale-down, eviction).
    #[serde(default)]
    pub drain: DrainSpec,

    /// The Service clients connect through.
    #[serde(default)]
    pub service: ServiceSpec,

    /// Serve `wss://` with this certificate. Unset: plain `ws://` (TLS terminated in front).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,

    /// CPU and memory for each relay container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// The relay container image.
    #[serde(default)]
    pub image: ImageSpec,

    /// Where relay pods run, and extra labels and annotations for them.
    #[serde(default)]
    pub placement: PlacementSpec,

    /// The connection registry: a NATS JetStream KV bucket where every relay of the gateway
    /// keeps a lease for itself and an entry per connection and per presence membership
    /// (docs/protocol.md section 10). The relays keep one when a binding has `presence`,
    /// when `events` or `control` is set, when `limits.maxFleetConnectionsPerSubject` is
    /// above 0, or when this is set; the operator names the
    /// bucket (`status.registry.bucket`). Unset: those get the defaults (a 15 s lease, 1
    /// replica, 64 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<RegistrySpec>,

    /// Lifecycle events for your backend: the relays publish one JSON message per
    /// connection and subscription event on `<subject>.<namespace>.<name>.<Type>`
    /// (`status.events.subject`), optionally kept in a JetStream stream
    /// (docs/backend.md). Turns the connection registry on. Unset: no events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<EventsSpec>,

    /// The control service for your backend: every relay serves the NATS service
    /// `wsrelay_control` on `<subject>.<namespace>.<name>` (`status.control.subject`), to
    /// list a user's connections, disconnect them on every relay, or revoke tokens
    /// (docs/backend.md). Turns the connection registry on. Unset: no control service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<ControlSpec>,
}

/// Longest `events.subject` or `control.subject` (their schemas' maxLength): the operator
/// appends `.<namespace>.<name>` (two DNS labels, at most 63 bytes each), and the relay
/// takes prefixes of at most 200 bytes (room for the suffixes it appends itself).
pub const MAX_PREFIX_SUBJECT_LEN: usize = 200 - 2 * (1 + 63);

/// Lifecycle events.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.graceSeconds == 0 || (has(self.durable) && ['Connected', 'Disconnected', 'Resumed'].all(t, t in self.types))").message("events.graceSeconds needs events.durable and the types Connected, Disconnected and Resumed: the stream decides, once, whether a connection ended or was resumed")
)]
pub struct EventsSpec {
    /// The subject prefix, a fixed NATS subject (no wildcards, not `$...`, `_INBOX` or
    /// `_WSRELAY`), at most 72 bytes. The relays publish on
    /// `<subject>.<namespace>.<name>.<Type>` (a `.` in the gateway's name becomes `_`).
    #[serde(default = "default_events_subject")]
    #[schemars(length(min = 1, max = 72))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9_-]+([.][A-Za-z0-9_-]+)*$') && self != '_INBOX' && !self.startsWith('_INBOX.') && self != '_WSRELAY' && !self.startsWith('_WSRELAY.')").message("events.subject must be a fixed NATS subject: dot-separated names of letters, digits, '-' and '_' (no wildcards or placeholders), not starting with '$', _INBOX or _WSRELAY, e.g. wsrelay.events"))]
    pub subject: String,
    /// The event types published. Default: the connections' (`Connected`, `Resumed`,
    /// `Subscribed`, `Unsubscribed`, `Disconnected`); a channel's `Occupied` and `Vacated`
    /// only when named.
    #[serde(default = "default_event_types")]
    #[schemars(length(min = 1, max = 7))]
    #[x_kube(validation = Rule::new("self.all(t, self.exists_one(u, u == t))").message("events.types names a type twice: list each at most once"))]
    pub types: Vec<EventType>,
    /// Also keep the events in a JetStream stream the relays create and update
    /// (`status.events.stream`, subjects `<subject>.<namespace>.<name>.*`): stored at least
    /// once, duplicates removed by message id, for backends that read them with durable
    /// consumers. Needs NATS with JetStream. Unset: plain NATS messages, heard by whoever
    /// is subscribed at the time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durable: Option<DurableEventsSpec>,
    /// Seconds a relay waits before it says a connection's `Disconnected`: a client that
    /// connects again within them naming its old connection (the SDK does) gets `Resumed`
    /// said instead of a `Disconnected` and a `Connected` (docs/backend.md, *Resumes*).
    /// 0 (default): said at once. Above 0 it needs `durable` and the types `Connected`,
    /// `Disconnected` and `Resumed`; `durable.duplicateWindowSeconds` must then be at least
    /// twice `registry.leaseSeconds` plus this.
    #[serde(default)]
    #[schemars(range(min = 0, max = 60))]
    pub grace_seconds: i32,
}

fn default_events_subject() -> String {
    "wsrelay.events".into()
}
fn default_event_types() -> Vec<EventType> {
    vec![
        EventType::Connected,
        EventType::Resumed,
        EventType::Subscribed,
        EventType::Unsubscribed,
        EventType::Disconnected,
    ]
}

/// One kind of lifecycle event.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum EventType {
    /// A connection was admitted (after the upgrade).
    Connected,
    /// A connection was admitted that resumes one that ended within `graceSeconds`.
    Resumed,
    /// A connection ended, for whatever reason (its relay's death included).
    Disconnected,
    /// A subscription was confirmed.
    Subscribed,
    /// A subscription ended while its connection stayed.
    Unsubscribed,
    /// A channel got its first subscriber across the gateway's relays.
    Occupied,
    /// A channel lost its last subscriber across the gateway's relays.
    Vacated,
}

/// The JetStream stream that keeps the events.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.replicas in [1, 3, 5]").message("events.durable.replicas must be 1, 3 or 5 (JetStream stream replicas)"),
    validation = Rule::new("self.duplicateWindowSeconds <= self.maxAgeSeconds").message("events.durable.duplicateWindowSeconds must not exceed events.durable.maxAgeSeconds: JetStream refuses a duplicate window longer than the stream keeps its messages")
)]
pub struct DurableEventsSpec {
    /// How long an event is kept, in seconds (up to a year). Default 86400 (a day).
    #[serde(default = "default_events_max_age")]
    #[schemars(range(min = 60, max = 31_536_000))]
    pub max_age_seconds: i32,
    /// Copies of the stream in a NATS cluster (1, 3 or 5).
    #[serde(default = "default_events_replicas")]
    pub replicas: i32,
    /// Bytes the stream keeps; beyond it the oldest events go first. JetStream reserves it
    /// on the NATS servers (times `replicas`). Default 268435456 (256 MiB).
    #[serde(default = "default_events_bytes")]
    #[schemars(range(min = 1_048_576, max = 1_099_511_627_776_i64))]
    pub max_bytes: i64,
    /// The stream's duplicate window, in seconds: an event published twice within it (a
    /// relay that said `Disconnected` and died before removing the connection's registry
    /// entry, and the survivor that says it again) is stored once. At least twice
    /// `registry.leaseSeconds`, at most `maxAgeSeconds`. Default 300.
    #[serde(default = "default_events_duplicate_window")]
    #[schemars(range(min = 1, max = 31_536_000))]
    pub duplicate_window_seconds: i32,
}

fn default_events_max_age() -> i32 {
    86_400
}
fn default_events_replicas() -> i32 {
    1
}
fn default_events_bytes() -> i64 {
    268_435_456
}
fn default_events_duplicate_window() -> i32 {
    300
}

/// The control service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ControlSpec {
    /// The subject prefix, a fixed NATS subject (no wildcards, not `$...`, `_INBOX` or
    /// `_WSRELAY`), at most 72 bytes. The endpoints are on
    /// `<subject>.<namespace>.<name>.<endpoint>` (a `.` in the gateway's name becomes `_`).
    /// Whoever may publish there may disconnect any user of the gateway and revoke their tokens.
    #[serde(default = "default_control_subject")]
    #[schemars(length(min = 1, max = 72))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9_-]+([.][A-Za-z0-9_-]+)*$') && self != '_INBOX' && !self.startsWith('_INBOX.') && self != '_WSRELAY' && !self.startsWith('_WSRELAY.')").message("control.subject must be a fixed NATS subject: dot-separated names of letters, digits, '-' and '_' (no wildcards or placeholders), not starting with '$', _INBOX or _WSRELAY, e.g. wsrelay.control"))]
    pub subject: String,
}

fn default_control_subject() -> String {
    "wsrelay.control".into()
}

/// The connection registry's bucket and leases.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.replicas in [1, 3, 5]").message("registry.replicas must be 1, 3 or 5 (JetStream stream replicas)")
)]
pub struct RegistrySpec {
    /// How long a relay's lease outlives its last refresh, in seconds: a relay refreshes it
    /// every third of this, and one silent for this long is taken for dead (its members
    /// leave) when the operator has not already reported it gone.
    #[serde(default = "default_lease_seconds")]
    #[schemars(range(min = 3, max = 3600))]
    pub lease_seconds: i32,
    /// Copies of the bucket in a NATS cluster (1, 3 or 5).
    #[serde(default = "default_registry_replicas")]
    pub replicas: i32,
    /// Bytes the bucket keeps (about 150 per connection and 200 per presence membership);
    /// writes beyond it are refused. JetStream reserves it on the NATS servers (times
    /// `replicas`). Default 67108864 (64 MiB).
    #[serde(default = "default_registry_bytes")]
    #[schemars(range(min = 1_048_576, max = 1_099_511_627_776_i64))]
    pub max_bytes: i64,
}

fn default_lease_seconds() -> i32 {
    15
}
fn default_registry_replicas() -> i32 {
    1
}
fn default_registry_bytes() -> i64 {
    67_108_864
}

impl Default for RegistrySpec {
    fn default() -> Self {
        Self {
            lease_seconds: default_lease_seconds(),
            replicas: default_registry_replicas(),
            max_bytes: default_registry_bytes(),
        }
    }
}

/// A reference to one key of a Secret in the gateway's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The Secret's name, in the gateway's namespace.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
    /// The key within the Secret's data.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// The NATS connection of every relay pod.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NatsSpec {
    /// NATS server URLs (`nats://`, `tls://`, `ws://` or `wss://`), e.g. `nats://nats.messaging:4222`.
    #[schemars(length(min = 1, max = 16), inner(length(max = 256)))]
    #[x_kube(validation = Rule::new("self.all(u, isURL(u) && url(u).getScheme() in ['nats', 'tls', 'ws', 'wss'] && url(u).getHostname() != '')").message("each NATS URL must look like nats://host:4222 (schemes: nats, tls, ws, wss)"))]
    pub urls: Vec<String>,

    /// How the relays authenticate to NATS. Unset: no credentials. Changing the Secret's value
    /// rolls the relays (they read it when they start), draining their clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<NatsCredentials>,

    /// A PEM CA bundle to verify the NATS servers' certificates with. Changing it rolls the relays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,

    /// A `kubernetes.io/tls` Secret (keys `tls.crt` and `tls.key`, PEM) whose certificate
    /// the relays present to NATS servers that require mutual TLS. Changing it rolls the relays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub client_cert_secret_name: Option<String>,
}

/// Exactly one way to authenticate to NATS, read from a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("[has(self.token), has(self.userPassword), has(self.nkeySeed), has(self.credsFile)].filter(x, x).size() == 1").message("nats.credentials needs exactly one of token, userPassword, nkeySeed or credsFile")
)]
pub struct NatsCredentials {
    /// A NATS authentication token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<SecretKeyRef>,
    /// A user name and password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_password: Option<UserPasswordRef>,
    /// An NKey seed (`SU...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nkey_seed: Option<SecretKeyRef>,
    /// A `.creds` file (user JWT and NKey seed), as `nsc` writes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creds_file: Option<SecretKeyRef>,
}

/// A Secret holding a NATS user name and password.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserPasswordRef {
    /// The Secret's name, in the gateway's namespace.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub secret_name: String,
    /// The key holding the user name.
    #[serde(default = "default_username_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub username_key: String,
    /// The key holding the password.
    #[serde(default = "default_password_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub password_key: String,
}

fn default_username_key() -> String {
    "username".into()
}
fn default_password_key() -> String {
    "password".into()
}

/// Client authentication on the WebSocket handshake. A refused client gets a close code it
/// can read (4401, 4403), or with `refuseAfterUpgrade: false` an HTTP 401/403; it never
/// reaches a channel.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.jwt) || self.allowAnonymous").message("auth needs a jwt section, or allowAnonymous: true for a gateway without authentication"),
    validation = Rule::new("!has(self.jwt) || !self.jwt.tokenSources.exists(s, s.from == 'Cookie') || (has(self.allowedOrigins) && self.allowedOrigins.size() > 0)").message("a Cookie token source needs allowedOrigins: browsers send cookies on cross-site WebSocket requests"),
    validation = Rule::new("!has(self.jwt) || !self.jwt.tokenSources.exists(s, s.from == 'Cookie') || !has(self.allowedOrigins) || !self.allowedOrigins.exists(o, o == '*')").message("a Cookie token source cannot be combined with allowedOrigins '*': any site could open a connection with the visitor's cookie (cross-site WebSocket hijacking); list the allowed origins"),
    validation = Rule::new("!has(self.connectRequest) || has(self.jwt)").message("auth.connectRequest asks your backend whether a token's identity may connect: it needs auth.jwt (an anonymous connection has no identity to ask about)")
)]
pub struct AuthSpec {
    /// Verify a JWT presented by each client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtSpec>,

    /// Let clients without a token connect (they see only bindings that use no claims).
    #[serde(default)]
    pub allow_anonymous: bool,

    /// Browser origins allowed to connect (`Origin` header), e.g. `https://app.example.com`;
    /// `*` allows any. Empty: any origin.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 256)))]
    #[x_kube(validation = Rule::new("self.all(o, o == '*' || o.matches('^https?://[A-Za-z0-9.-]+(:[0-9]+)?$'))").message("each allowed origin must be '*' or scheme://host[:port] with no path, such as https://app.example.com"))]
    pub allowed_origins: Vec<String>,

    /// Refuse a WebSocket request after the upgrade instead of with an HTTP status: the
    /// relay accepts it and closes it at once with 4401 (no or invalid token), 4403 (origin
    /// not allowed), 4429 (too many connections from this address or token subject) or
    /// 4503 (at capacity, draining, signing keys unavailable) and a readable reason.
    ///
    /// Default true, because browsers report every refused upgrade (HTTP 401, 403, 429,
    /// 503) as close code 1006, the same as a network failure: the SDK (docs/client.md) then
    /// retries a forbidden origin for ever and asks for a new token only after several
    /// failed opens, while with these codes it gets a new token at once (4401), stops
    /// (4403) or backs off harder (4429). The cost: a refused client costs an upgrade and a
    /// close frame, and is never counted as a connection. Set false for clients that read
    /// HTTP statuses (a refused handshake then answers 401/403/429/503).
    #[serde(default = "default_true")]
    pub refuse_after_upgrade: bool,

    /// The connect step: after the token is verified and before the upgrade, ask your
    /// backend over NATS request-reply whether this identity may connect (`op` `connect`,
    /// docs/protocol.md section 3). A deny refuses the connection (403, or 4403 after the
    /// upgrade); a timeout or no backend listening refuses it with 503 (4503) unless
    /// `onTimeout: Allow`. The reply's `data` reaches the client in `welcome`. Needs `jwt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_request: Option<BackendRequestSpec>,
}

fn default_true() -> bool {
    true
}

impl Default for AuthSpec {
    fn default() -> Self {
        Self {
            jwt: None,
            allow_anonymous: false,
            allowed_origins: Vec::new(),
            refuse_after_upgrade: default_true(),
            connect_request: None,
        }
    }
}

/// JWT verification: exactly one key source, optional issuer and audience checks, and where
/// the token is read from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("[has(self.hmacSecretRef), has(self.publicKeySecretRef), has(self.jwksUrl)].filter(x, x).size() == 1").message("auth.jwt needs exactly one key source: hmacSecretRef, publicKeySecretRef or jwksUrl"),
    validation = Rule::new("!has(self.hmacSecretRef) || !has(self.algorithms) || self.algorithms.all(a, a == 'HS256')").message("an HMAC secret verifies only HS256 tokens: remove the other algorithms"),
    validation = Rule::new("has(self.hmacSecretRef) || !has(self.algorithms) || !self.algorithms.exists(a, a == 'HS256')").message("HS256 tokens need hmacSecretRef: a public key or JWKS cannot verify them"),
    validation = Rule::new("!has(self.publicKeySecretRef) || !has(self.algorithms) || self.algorithms.size() == 1").message("a PEM public key is either RSA (RS256) or EC (ES256): list one algorithm"),
    validation = Rule::new("has(self.jwksUrl) || (!has(self.jwksCacheSeconds) && !has(self.jwksMinRefreshSeconds))").message("jwksCacheSeconds and jwksMinRefreshSeconds apply only with jwksUrl"),
    validation = Rule::new("!has(self.jwksUrl) || !self.jwksUrl.startsWith('http://') || self.jwksAllowHttp").message("jwksUrl is http://: keys fetched without TLS can be replaced by anyone on the path; use https://, or set jwksAllowHttp: true for an issuer on a network you trust (tests, in-cluster)"),
    validation = Rule::new("has(self.jwksUrl) || !self.jwksAllowHttp").message("jwksAllowHttp applies only with jwksUrl")
)]
pub struct JwtSpec {
    /// An HMAC secret for HS256 tokens (at least 32 bytes). Rotating the Secret's value takes
    /// effect within seconds of the kubelet updating the mounted file, without a restart; open
    /// connections stay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hmac_secret_ref: Option<SecretKeyRef>,

    /// A PEM public key (RSA or EC) for RS256/ES256 tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key_secret_ref: Option<SecretKeyRef>,

    /// An https URL serving a JWKS for RS256/ES256 tokens; the relays refresh it. `http://`
    /// only with `jwksAllowHttp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    #[x_kube(validation = Rule::new("isURL(self) && (self.startsWith('https://') || self.startsWith('http://')) && url(self).getHostname() != ''").message("jwksUrl must be an http(s) URL such as https://issuer.example.com/.well-known/jwks.json"))]
    pub jwks_url: Option<String>,

    /// Accept an `http://` `jwksUrl`. Keys fetched without TLS can be replaced by anyone on
    /// the path, who can then sign any token: only for an issuer on a network you trust
    /// (tests, an issuer in the same cluster).
    #[serde(default)]
    pub jwks_allow_http: bool,

    /// How long the relays use a fetched JWKS before fetching it again, in seconds (with
    /// `jwksUrl`). Unset: the relay's default (300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 86400))]
    pub jwks_cache_seconds: Option<i32>,

    /// The least time between two fetches caused by tokens with an unknown key id, in
    /// seconds (with `jwksUrl`): a flood of made-up `kid`s cannot hammer the issuer. Unset:
    /// the relay's default (10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub jwks_min_refresh_seconds: Option<i32>,

    /// The algorithms accepted. Empty: HS256 for an HMAC secret, RS256 for a public key,
    /// RS256 and ES256 for a JWKS.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3))]
    pub algorithms: Vec<JwtAlgorithm>,

    /// Required `iss` claim. Unset: not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub issuer: Option<String>,

    /// Accepted `aud` values (any one must match). Empty: not checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(max = 256)))]
    pub audiences: Vec<String>,

    /// Clock skew tolerated on `nbf`, in seconds (`exp` is enforced to the second).
    #[serde(default = "default_leeway")]
    #[schemars(range(min = 0, max = 300))]
    pub leeway_seconds: i32,

    /// Where the token is read, first match wins. Default: the `token` query parameter, the
    /// `Authorization: Bearer` header, then `Sec-WebSocket-Protocol`.
    #[serde(default = "default_token_sources")]
    #[schemars(length(min = 1, max = 4))]
    pub token_sources: Vec<TokenSource>,
}

fn default_leeway() -> i32 {
    30
}

fn default_token_sources() -> Vec<TokenSource> {
    vec![
        TokenSource {
            from: TokenLocation::Query,
            name: Some("token".into()),
        },
        TokenSource {
            from: TokenLocation::Header,
            name: None,
        },
        TokenSource {
            from: TokenLocation::Subprotocol,
            name: None,
        },
    ]
}

/// A JWT signature algorithm.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum JwtAlgorithm {
    /// HMAC with SHA-256.
    HS256,
    /// RSA PKCS#1 v1.5 with SHA-256.
    RS256,
    /// ECDSA P-256 with SHA-256.
    ES256,
}

/// One place a client may put its token.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("(self.from in ['Query', 'Cookie']) == has(self.name)").message("a Query or Cookie token source needs the parameter or cookie name; Header and Subprotocol take no name")
)]
pub struct TokenSource {
    /// `Query` (parameter `name`), `Header` (`Authorization: Bearer`), `Cookie` (cookie
    /// `name`), or `Subprotocol` (`Sec-WebSocket-Protocol: wsrelay.v1, bearer.<token>`).
    pub from: TokenLocation,
    /// The query parameter or cookie name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9_-]+$"))]
    pub name: Option<String>,
}

/// Where a token is carried on the handshake.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TokenLocation {
    /// The `Authorization: Bearer` header.
    Header,
    /// A query parameter of the WebSocket URL.
    Query,
    /// A cookie.
    Cookie,
    /// The `Sec-WebSocket-Protocol` header, as `bearer.<token>`.
    Subprotocol,
}

/// Maps a client-facing channel to a NATS subject.
///
/// The channel is dot-separated tokens; a token is a name (`orders`) or a placeholder the
/// client fills in (`{id}`). The subject template uses names, the channel's placeholders and
/// JWT claims (`{claims.sub}`). A value substituted into a subject that contains `.`, `*`,
/// `>` or whitespace is refused, so a client can never widen a subject.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.channel.matches('^([A-Za-z0-9_-]+|[{][a-z][A-Za-z0-9_]*[}])([.]([A-Za-z0-9_-]+|[{][a-z][A-Za-z0-9_]*[}]))*$')").message("channel must be dot-separated tokens, each a name (letters, digits, _ or -) or a placeholder such as {id}, e.g. orders.{id}"),
    validation = Rule::new("self.subject.matches('^([A-Za-z0-9_-]+|[{][a-z][A-Za-z0-9_]*[}]|[{]claims([.][A-Za-z0-9_-]+)+[}])([.]([A-Za-z0-9_-]+|[{][a-z][A-Za-z0-9_]*[}]|[{]claims([.][A-Za-z0-9_-]+)+[}]))*$')").message("subject must be dot-separated tokens, each a name (letters, digits, _ or -), a channel placeholder such as {id} or a claim such as {claims.sub} or {claims.org.id}; NATS wildcards are not allowed"),
    validation = Rule::new("self.subject.findAll('[{][^}]*[}]').all(p, p.startsWith('{claims.') || self.channel.contains(p))").message("subject uses a placeholder its channel does not define: a subject may use only the channel's own {placeholders} and {claims.*}"),
    validation = Rule::new("!has(self.presence) || !has(self.direction) || self.direction != 'Publish'").message("presence makes the channel's subscribers its members: a binding with presence must allow subscribe (direction Subscribe or Both)"),
    validation = Rule::new("!has(self.presence) || !has(self.presence.key) || self.presence.key.findAll('[{][^}]*[}]').all(p, p.startsWith('{claims.') || self.channel.contains(p))").message("presence.key uses a placeholder its channel does not define: a key may use only the channel's own {placeholders} and {claims.*}"),
    validation = Rule::new("!self.subject.startsWith('{') && self.subject != '_INBOX' && !self.subject.startsWith('_INBOX.') && self.subject != '_WSRELAY' && !self.subject.startsWith('_WSRELAY.')").message("subject must start with a fixed name, outside _INBOX and _WSRELAY: a placeholder first could reach NATS's own subjects ($JS., $SYS., _INBOX.), and _WSRELAY is the relay's own"),
    validation = Rule::new("!has(self.autoSubscribe) || !self.autoSubscribe || !self.channel.contains('{')").message("autoSubscribe needs a channel the client chooses nothing of: no {placeholder} in the channel (fill the subject from claims instead, e.g. channel notifications, subject users.{claims.sub}.notify)"),
    validation = Rule::new("!has(self.autoSubscribe) || !self.autoSubscribe || !has(self.direction) || self.direction != 'Publish'").message("autoSubscribe subscribes clients to the channel: the binding must allow subscribe (direction Subscribe or Both)")
)]
pub struct Binding {
    /// The channel clients name, e.g. `orders.{id}` or `notifications`.
    #[schemars(length(min = 1, max = 128))]
    pub channel: String,
    /// The NATS subject template, e.g. `orders.{id}.events` or `users.{claims.sub}.notify`.
    #[schemars(length(min = 1, max = 256))]
    pub subject: String,
    /// What clients may do on the channel.
    #[serde(default)]
    pub direction: Direction,
    /// Keep history: the channels become resumable. A client that reconnects gets the
    /// messages it missed, or is told it cannot (docs/protocol.md section 8). The relays keep
    /// the history in a NATS JetStream stream they create and update themselves; NATS must
    /// have JetStream enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<BindingHistory>,
    /// Who may use the channel, beyond what the subject template decides from the token:
    /// `orders.{id}` or `rooms.{room}` otherwise accept any value from any authenticated
    /// client. Up to three checks; all the ones named must allow, and they run cheapest
    /// first (token, rule, request) on every `subscribe` and `publish` on the binding
    /// (docs/protocol.md section 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorize: Option<AuthorizeSpec>,
    /// Who is in the channel: every subscriber is a member, and a client that subscribes
    /// with `presence: true` gets the members, their joins and leaves, and the counts
    /// (docs/protocol.md section 10). Kept in the connection registry (`spec.registry`),
    /// which needs NATS with JetStream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence: Option<PresenceSpec>,
    /// Subscribe every SSE session (and WebSockets that ask, `?autoSubscribe=true`) to the
    /// channel right after its `welcome`, when the binding's `authorize` allows, with no
    /// `subscribe` from the client: a bare `EventSource` or `curl -N` then receives it with a
    /// URL and a token, and on a binding with `history` resumes through the browser's own
    /// reconnect (`Last-Event-ID`). Only for a channel with no `{placeholder}` (its subject
    /// filled from claims, e.g. `notifications` → `users.{claims.sub}.notify`) that allows
    /// subscribe and that no earlier binding's pattern takes (docs/protocol.md section 9).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auto_subscribe: bool,
}

/// A binding's presence.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PresenceSpec {
    /// Who a member is: dot-separated names, the channel's placeholders and claims, like a
    /// subject (`{claims.sub}`, `{claims.org}.{claims.sub}`); the connections that render the
    /// same key are one member. A connection whose claims cannot render it (an anonymous
    /// one) is a member of its own.
    #[serde(default = "default_presence_key")]
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = Rule::new("self.matches('^([A-Za-z0-9_-]+|[{][a-z][A-Za-z0-9_]*[}]|[{]claims([.][A-Za-z0-9_-]+)+[}])([.]([A-Za-z0-9_-]+|[{][a-z][A-Za-z0-9_]*[}]|[{]claims([.][A-Za-z0-9_-]+)+[}]))*$')").message("presence.key must be dot-separated tokens, each a name (letters, digits, _ or -), a channel placeholder such as {room} or a claim such as {claims.sub}"))]
    pub key: String,
    /// The claims the other members see as this member's `info`, as `claims.` then the
    /// claim's path (`claims.name`). Only these, never the token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 8),
        inner(length(max = 128), regex(pattern = r"^claims([.][A-Za-z0-9_-]+)+$"))
    )]
    pub info: Vec<String>,
    /// Send `join` and `leave` frames. False: the counts (`occupancy`) only.
    #[serde(default = "default_true")]
    pub events: bool,
    /// Above this many members a channel sends only `occupancy`, at most once a second,
    /// whatever its churn.
    #[serde(default = "default_max_members_with_events")]
    #[schemars(range(min = 1, max = 10_000))]
    pub max_members_with_events: i32,
    /// A member whose connections all ended and who is back within this many seconds makes
    /// no leave/join pair (a relay drain, a page reload, a network blip).
    #[serde(default = "default_leave_grace_seconds")]
    #[schemars(range(min = 0, max = 300))]
    pub leave_grace_seconds: i32,
}

fn default_presence_key() -> String {
    "{claims.sub}".into()
}
fn default_max_members_with_events() -> i32 {
    200
}
fn default_leave_grace_seconds() -> i32 {
    10
}

/// The checks a binding adds; all the ones named must allow.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.token) || has(self.rule) || has(self.request)").message("authorize names no check: set token, rule or request (all the ones set must allow), or remove authorize")
)]
pub struct AuthorizeSpec {
    /// Require a subscription token: a short JWT for this one channel that the client got
    /// from your backend and sends with the `subscribe` (claims `sub`, equal to the
    /// connection's, `channel`, equal to the channel, and `exp`; the subscription ends at
    /// its `exp` unless the client sends a newer one). `{}` verifies it with
    /// `spec.auth.jwt`'s keys; `jwt` names a key set of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<SubscriptionTokenSpec>,
    /// A CEL expression that must be `true`, over `claims` (the connection's JWT claims),
    /// `vars` (the channel's placeholder values), `channel` and `op` (`subscribe` or
    /// `publish`), e.g. `vars.room in claims.rooms || 'admin' in claims.roles`. At most 1024
    /// bytes and 256 expression nodes, no comprehension inside another. A rule that does
    /// not compile is refused when the gateway is applied (with a validating webhook
    /// installed) or turns it Degraded (`InvalidRule`, naming the line and column). A rule
    /// that fails when it runs (an absent claim: use `has(claims.rooms)`) denies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub rule: Option<String>,
    /// Ask your backend over NATS request-reply, answered allow or deny (for access that
    /// lives in your application's data: who owns order 42). Decisions are cached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<BackendRequestSpec>,
}

/// How a binding's subscription tokens are verified.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionTokenSpec {
    /// The binding's own key set, shaped like `spec.auth.jwt` (without token sources: the
    /// token travels in the `subscribe`). Unset: `spec.auth.jwt`'s keys, issuer and
    /// audiences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<TokenJwtSpec>,
}

/// A subscription token's key set: exactly one key source, optional issuer and audience
/// checks.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("[has(self.hmacSecretRef), has(self.publicKeySecretRef), has(self.jwksUrl)].filter(x, x).size() == 1").message("authorize.token.jwt needs exactly one key source: hmacSecretRef, publicKeySecretRef or jwksUrl"),
    validation = Rule::new("!has(self.hmacSecretRef) || !has(self.algorithms) || self.algorithms.all(a, a == 'HS256')").message("an HMAC secret verifies only HS256 tokens: remove the other algorithms from authorize.token.jwt"),
    validation = Rule::new("has(self.hmacSecretRef) || !has(self.algorithms) || !self.algorithms.exists(a, a == 'HS256')").message("HS256 subscription tokens need authorize.token.jwt.hmacSecretRef: a public key or JWKS cannot verify them"),
    validation = Rule::new("!has(self.publicKeySecretRef) || !has(self.algorithms) || self.algorithms.size() == 1").message("a PEM public key is either RSA (RS256) or EC (ES256): list one algorithm in authorize.token.jwt"),
    validation = Rule::new("has(self.jwksUrl) || (!has(self.jwksCacheSeconds) && !has(self.jwksMinRefreshSeconds))").message("authorize.token.jwt: jwksCacheSeconds and jwksMinRefreshSeconds apply only with jwksUrl"),
    validation = Rule::new("!has(self.jwksUrl) || !self.jwksUrl.startsWith('http://') || self.jwksAllowHttp").message("authorize.token.jwt.jwksUrl is http://: keys fetched without TLS can be replaced by anyone on the path; use https://, or set jwksAllowHttp: true for an issuer on a network you trust (tests, in-cluster)"),
    validation = Rule::new("has(self.jwksUrl) || !self.jwksAllowHttp").message("authorize.token.jwt: jwksAllowHttp applies only with jwksUrl")
)]
pub struct TokenJwtSpec {
    /// An HMAC secret for HS256 tokens (at least 32 bytes). Rotating the Secret's value
    /// takes effect without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hmac_secret_ref: Option<SecretKeyRef>,

    /// A PEM public key (RSA or EC) for RS256/ES256 tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key_secret_ref: Option<SecretKeyRef>,

    /// An https URL serving a JWKS for RS256/ES256 tokens; the relays refresh it. `http://`
    /// only with `jwksAllowHttp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    #[x_kube(validation = Rule::new("isURL(self) && (self.startsWith('https://') || self.startsWith('http://')) && url(self).getHostname() != ''").message("authorize.token.jwt.jwksUrl must be an http(s) URL such as https://issuer.example.com/.well-known/jwks.json"))]
    pub jwks_url: Option<String>,

    /// Accept an `http://` `jwksUrl` (only for an issuer on a network you trust).
    #[serde(default)]
    pub jwks_allow_http: bool,

    /// How long the relays use a fetched JWKS before fetching it again, in seconds (with
    /// `jwksUrl`). Unset: the relay's default (300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 86400))]
    pub jwks_cache_seconds: Option<i32>,

    /// The least time between two fetches caused by tokens with an unknown key id, in
    /// seconds (with `jwksUrl`). Unset: the relay's default (10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub jwks_min_refresh_seconds: Option<i32>,

    /// The algorithms accepted. Empty: HS256 for an HMAC secret, RS256 for a public key,
    /// RS256 and ES256 for a JWKS.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3))]
    pub algorithms: Vec<JwtAlgorithm>,

    /// Required `iss` claim. Unset: not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub issuer: Option<String>,

    /// Accepted `aud` values (any one must match). Empty: not checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(max = 256)))]
    pub audiences: Vec<String>,

    /// Clock skew tolerated on `nbf`, in seconds (`exp` is enforced to the second).
    #[serde(default = "default_leeway")]
    #[schemars(range(min = 0, max = 300))]
    pub leeway_seconds: i32,
}

impl TokenJwtSpec {
    /// The same key set as a connection token's `JwtSpec` (token sources do not apply to
    /// a subscription token; the default ones stand in), so both map and validate alike.
    pub fn as_jwt_spec(&self) -> JwtSpec {
        JwtSpec {
            hmac_secret_ref: self.hmac_secret_ref.clone(),
            public_key_secret_ref: self.public_key_secret_ref.clone(),
            jwks_url: self.jwks_url.clone(),
            jwks_allow_http: self.jwks_allow_http,
            jwks_cache_seconds: self.jwks_cache_seconds,
            jwks_min_refresh_seconds: self.jwks_min_refresh_seconds,
            algorithms: self.algorithms.clone(),
            issuer: self.issuer.clone(),
            audiences: self.audiences.clone(),
            leeway_seconds: self.leeway_seconds,
            token_sources: default_token_sources(),
        }
    }
}

/// A question to your backend over NATS request-reply: the relay sends the operation, the
/// channel, its placeholder values and the connection's claims (JSON) and waits for
/// `{"allow": true}` or `{"allow": false, "reason": "..."}` (docs/protocol.md section 3).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendRequestSpec {
    /// The NATS subject your backend serves, a fixed subject such as `authz.orders` (serve
    /// it with a queue group to spread the load).
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9_-]+([.][A-Za-z0-9_-]+)*$') && self != '_INBOX' && !self.startsWith('_INBOX.') && self != '_WSRELAY' && !self.startsWith('_WSRELAY.')").message("request subject must be a fixed NATS subject: dot-separated names of letters, digits, '-' and '_' (no wildcards or placeholders), not starting with '$', _INBOX or _WSRELAY, e.g. authz.orders"))]
    pub subject: String,
    /// How long to wait for the reply, in milliseconds; then `onTimeout` decides.
    #[serde(default = "default_request_timeout_ms")]
    #[schemars(range(min = 1, max = 5000))]
    pub timeout_ms: i32,
    /// How long a decision (allow or deny) is reused for the same question (identity,
    /// operation and channel; for the connect step, the identity), in seconds, or until the
    /// reply's `expiresAt` when that is sooner; 0: never cached. Failures are never cached.
    #[serde(default = "default_request_cache_seconds")]
    #[schemars(range(min = 0, max = 86_400))]
    pub cache_seconds: i32,
    /// Most decisions each relay keeps for this check.
    #[serde(default = "default_request_cache_entries")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub cache_entries: i32,
    /// What a backend that does not answer within `timeoutMs` decides. No backend
    /// listening, or NATS disconnected, always refuses (503), whatever this says.
    #[serde(default)]
    pub on_timeout: OnTimeout,
}

fn default_request_timeout_ms() -> i32 {
    300
}
fn default_request_cache_seconds() -> i32 {
    30
}
fn default_request_cache_entries() -> i32 {
    10_000
}

/// What a backend that does not answer in time decides.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum OnTimeout {
    /// Refuse with 503 (the client retries later).
    #[default]
    Deny,
    /// Allow.
    Allow,
}

/// How much history a resumable binding keeps, per channel.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.replicas in [1, 3, 5]").message("history.replicas must be 1, 3 or 5 (JetStream stream replicas)")
)]
pub struct BindingHistory {
    /// Newest messages kept per channel: a client that missed more is told `recovered: false`.
    #[serde(default = "default_history_messages")]
    #[schemars(range(min = 1, max = 65_536))]
    pub max_messages: i32,
    /// Oldest message kept, in seconds. Client publishes with the same `msgId` are stored
    /// once within 120 s, or within this age when it is shorter.
    #[serde(default = "default_history_age")]
    #[schemars(range(min = 1, max = 31_536_000))]
    pub max_age_seconds: i32,
    /// Bytes the history keeps in all, every channel of the binding together: beyond it the
    /// oldest messages of any channel go first (clients choose channel names, so this is
    /// what bounds the stream). JetStream reserves it on the NATS servers' file store (times
    /// `replicas`); a stream JetStream refuses turns the gateway Degraded (HistoryNotReady).
    /// At least `limits.maxMessageBytes`. Default 268435456 (256 MiB).
    #[serde(default = "default_history_bytes")]
    #[schemars(range(min = 1_048_576, max = 1_099_511_627_776_i64))]
    pub max_bytes: i64,
    /// Copies of the history in a NATS cluster (1, 3 or 5); 3 survives the loss of a server.
    #[serde(default = "default_history_replicas")]
    pub replicas: i32,
}

fn default_history_messages() -> i32 {
    100
}
fn default_history_age() -> i32 {
    300
}
fn default_history_bytes() -> i64 {
    268_435_456
}
fn default_history_replicas() -> i32 {
    1
}

/// What clients may do on a channel.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum Direction {
    /// Receive messages published on the subject.
    #[default]
    Subscribe,
    /// Publish to the subject.
    Publish,
    /// Both.
    Both,
}

/// Per-pod and per-connection limits.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.pingIntervalSeconds < self.idleTimeoutSeconds").message("limits.pingIntervalSeconds must be shorter than limits.idleTimeoutSeconds, or healthy idle clients are cut off"),
    validation = Rule::new("self.maxMessageBytes <= self.sendQueueBytes").message("limits.maxMessageBytes must not exceed limits.sendQueueBytes: a connection's send queue must have room for the largest message; raise sendQueueBytes or lower maxMessageBytes"),
    validation = Rule::new("!has(self.maxQueuedBytesPerPod) || self.maxQueuedBytesPerPod >= self.sendQueueBytes").message("limits.maxQueuedBytesPerPod must be at least limits.sendQueueBytes: the pod's budget must hold one connection's full queue"),
    validation = Rule::new("!has(self.maxHandshakesInFlightPerIp) || self.maxHandshakesInFlightPerIp <= self.maxHandshakesInFlight").message("limits.maxHandshakesInFlightPerIp must not exceed limits.maxHandshakesInFlight: it is one address's share of them"),
    validation = Rule::new("!has(self.acceptBurst) || self.acceptRatePerSecond > 0").message("limits.acceptBurst needs limits.acceptRatePerSecond: a burst without a rate limits nothing (0 turns storm control off)")
)]
pub struct LimitsSpec {
    /// Connections one pod accepts before it refuses new ones (4503, or HTTP 503 with
    /// `auth.refuseAfterUpgrade: false`).
    #[serde(default = "default_max_connections")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_connections_per_pod: i64,
    /// Open connections one client address may hold on one pod; beyond it the handshake is
    /// refused (4429, or HTTP 429 with `auth.refuseAfterUpgrade: false`). IPv6 addresses
    /// are counted per /64. 0: no limit.
    ///
    /// Default 0, because the address is the TCP peer's unless the peer is listed in
    /// `network.trustedProxies`: behind an ingress, a load balancer that does not keep
    /// client addresses (`externalTrafficPolicy: Cluster`) or any other proxy, every client
    /// has the proxy's address and a limit would refuse everyone once the proxy holds that
    /// many. List the proxies in `network.trustedProxies` (or make sure the pods see client
    /// addresses), then set it: a few hundred leaves room for a NAT with many users.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub max_connections_per_ip: i64,
    /// Open connections one identity (the token's `sub`) may hold on one pod; beyond it the
    /// handshake is refused (4429, or HTTP 429 with `auth.refuseAfterUpgrade: false`).
    /// Anonymous clients are not counted. 0: no limit. Default 100: far above one person's
    /// tabs and devices, far below a pod's capacity, so one stolen or shared token cannot
    /// take a pod's connections. Raise it (or set 0) when many clients share one token.
    #[serde(default = "default_max_connections_per_subject")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub max_connections_per_subject: i64,
    /// Open connections one identity (the token's `sub`) may hold across all the gateway's
    /// pods, counted through the connection registry (which it turns on); beyond it the
    /// handshake is refused like one over `maxConnectionsPerSubject`. Handshakes at the same
    /// instant on two pods may both pass. 0 (default): no limit.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub max_fleet_connections_per_subject: i64,
    /// HTTP handshakes (TLS included) one pod processes at once, from the TCP accept to the
    /// upgrade; beyond it new TCP connections are refused (HTTP 503 on `ws://`, closed on
    /// `wss://`). Bounds what slow or stalled handshakes can hold.
    #[serde(default = "default_max_handshakes")]
    #[schemars(range(min = 1, max = 65_536))]
    pub max_handshakes_in_flight: i32,
    /// Handshakes one client address may have in progress at once on one pod (the TCP
    /// peer's address, IPv6 per /64); beyond it its new TCP connections are refused like
    /// those over `maxHandshakesInFlight`. Peers in `network.trustedProxies` are not counted.
    /// Unset: a quarter of `maxHandshakesInFlight` (the relay's default), so one address
    /// cannot take every slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65_536))]
    pub max_handshakes_in_flight_per_ip: Option<i32>,
    /// Storm control: new connections one pod admits per second, sustained (a token bucket,
    /// checked before the token is verified); beyond it the handshake is refused (4503, or
    /// HTTP 503 with `Retry-After: 1` with `auth.refuseAfterUpgrade: false`) and the client
    /// backs off, so the clients of a pod that went away do not all land on one neighbour in
    /// the same second. 0 (default): no limit. Size it from what one pod can admit (JWT
    /// verification, the connect step, resumes, subscriptions; docs/operations.md).
    #[serde(default)]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub accept_rate_per_second: i64,
    /// New connections one pod admits at once above `acceptRatePerSecond` (the bucket's
    /// size). Needs `acceptRatePerSecond`. Unset: equal to the rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub accept_burst: Option<i64>,
    /// Largest message a client may send or receive, in bytes. At most `sendQueueBytes`.
    #[serde(default = "default_max_message_bytes")]
    #[schemars(range(min = 256, max = 8_388_608))]
    pub max_message_bytes: i32,
    /// Messages queued per connection before the slow-consumer policy applies.
    #[serde(default = "default_send_queue")]
    #[schemars(range(min = 1, max = 65_536))]
    pub send_queue_length: i32,
    /// Bytes queued per connection before the slow-consumer policy applies (with
    /// `sendQueueLength`: the first reached applies). At least `maxMessageBytes`. Default
    /// 1048576 (1 MiB).
    #[serde(default = "default_send_queue_bytes")]
    #[schemars(range(min = 256, max = 67_108_864))]
    pub send_queue_bytes: i64,
    /// Bytes queued on all connections of one pod together. When a message would take the
    /// total above it, a connection that is already behind gets the slow-consumer policy
    /// instead of the message; one that keeps up still gets it. At least `sendQueueBytes`.
    ///
    /// Unset: half the relay container's memory limit (`resources.limits.memory`) when
    /// one is set (at least `sendQueueBytes`), so that clients that stop reading cannot
    /// take the pod past its limit; without a memory limit, the relay's default (536870912,
    /// 512 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 256, max = 1_099_511_627_776_i64))]
    pub max_queued_bytes_per_pod: Option<i64>,
    /// What happens to a client whose queue is full.
    #[serde(default)]
    pub slow_consumer_policy: SlowConsumerPolicy,
    /// Sustained publishes per second one connection may make (bindings decide whether it may
    /// publish at all).
    #[serde(default = "default_publish_rate")]
    #[schemars(range(min = 1, max = 100_000))]
    pub publish_rate_per_second: i32,
    /// Publishes one connection may make in a burst above the rate.
    #[serde(default = "default_publish_burst")]
    #[schemars(range(min = 1, max = 100_000))]
    pub publish_burst: i32,
    /// Channels one connection may be subscribed to at once.
    #[serde(default = "default_max_subscriptions")]
    #[schemars(range(min = 1, max = 10_000))]
    pub max_subscriptions_per_connection: i32,
    /// A connection from which nothing (not even a pong) arrived for this long is closed.
    #[serde(default = "default_idle_timeout")]
    #[schemars(range(min = 5, max = 86_400))]
    pub idle_timeout_seconds: i32,
    /// How often the relay pings an idle client.
    #[serde(default = "default_ping_interval")]
    #[schemars(range(min = 1, max = 3_600))]
    pub ping_interval_seconds: i32,
    /// How long a client has to complete the WebSocket handshake.
    #[serde(default = "default_handshake_timeout")]
    #[schemars(range(min = 1, max = 120))]
    pub handshake_timeout_seconds: i32,
    /// A client that takes no bytes for this long (it stopped reading) is dropped; also the
    /// TCP user timeout of client sockets.
    #[serde(default = "default_write_timeout")]
    #[schemars(range(min = 1, max = 300))]
    pub write_timeout_seconds: i32,
}

fn default_max_connections() -> i64 {
    10_000
}
fn default_max_message_bytes() -> i32 {
    65_536
}
fn default_max_connections_per_subject() -> i64 {
    100
}
fn default_max_handshakes() -> i32 {
    1024
}
fn default_send_queue_bytes() -> i64 {
    1_048_576
}
fn default_send_queue() -> i32 {
    256
}
fn default_publish_rate() -> i32 {
    10
}
fn default_publish_burst() -> i32 {
    20
}
fn default_max_subscriptions() -> i32 {
    100
}
fn default_idle_timeout() -> i32 {
    60
}
fn default_ping_interval() -> i32 {
    20
}
fn default_handshake_timeout() -> i32 {
    10
}
fn default_write_timeout() -> i32 {
    10
}

impl Default for LimitsSpec {
    fn default() -> Self {
        Self {
            max_connections_per_pod: default_max_connections(),
            max_connections_per_ip: 0,
            max_connections_per_subject: default_max_connections_per_subject(),
            max_fleet_connections_per_subject: 0,
            max_handshakes_in_flight: default_max_handshakes(),
            max_handshakes_in_flight_per_ip: None,
            accept_rate_per_second: 0,
            accept_burst: None,
            max_message_bytes: default_max_message_bytes(),
            send_queue_length: default_send_queue(),
            send_queue_bytes: default_send_queue_bytes(),
            max_queued_bytes_per_pod: None,
            slow_consumer_policy: SlowConsumerPolicy::default(),
            publish_rate_per_second: default_publish_rate(),
            publish_burst: default_publish_burst(),
            max_subscriptions_per_connection: default_max_subscriptions(),
            idle_timeout_seconds: default_idle_timeout(),
            ping_interval_seconds: default_ping_interval(),
            handshake_timeout_seconds: default_handshake_timeout(),
            write_timeout_seconds: default_write_timeout(),
        }
    }
}

/// What happens to a client that reads slower than messages arrive.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum SlowConsumerPolicy {
    /// Close the connection (the client reconnects and resumes).
    #[default]
    Disconnect,
    /// Drop the oldest queued message and keep the connection.
    DropOldest,
}

/// How the relays find a client's address when connections arrive through proxies.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSpec {
    /// Proxies whose `clientIpHeader` the relays believe: CIDRs (`10.0.0.0/8`,
    /// `fd00::/8`) or single addresses (`10.1.2.3`). A connection from one of them is
    /// counted under the address the header names (read from the right, skipping trusted
    /// proxies; the first other address is the client), and the proxy's own address is not
    /// counted against `limits.maxHandshakesInFlightPerIp`. A connection from any other peer
    /// is counted under the peer's address, whatever it sends.
    ///
    /// Empty (the default): the header is never read. Behind an ingress controller, list
    /// the addresses its pods connect from (the cluster's pod CIDR, say); the controller
    /// must append the address it received the connection from to the header (as
    /// `X-Forwarded-For` proxies do), so a client cannot choose what the rightmost
    /// untrusted entry is. Listing an address anyone can connect from lets anyone pick the
    /// address they are counted under.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 64)))]
    #[x_kube(validation = Rule::new("self.all(c, isCIDR(c) || isIP(c))").message("each trusted proxy must be a CIDR such as 10.0.0.0/8 or fd00::/8, or a single address such as 10.1.2.3"))]
    pub trusted_proxies: Vec<String>,

    /// The header a trusted proxy puts the client's address in: a comma-separated list each
    /// proxy appends to (`X-Forwarded-For`, the default) or a single address (`X-Real-IP`).
    #[serde(default = "default_client_ip_header")]
    #[schemars(
        length(min = 1, max = 64),
        regex(pattern = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
    )]
    pub client_ip_header: String,
}

fn default_client_ip_header() -> String {
    "X-Forwarded-For".into()
}

impl Default for NetworkSpec {
    fn default() -> Self {
        Self {
            trusted_proxies: Vec::new(),
            client_ip_header: default_client_ip_header(),
        }
    }
}

/// Autoscaling on open connections per pod.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.minReplicas <= self.maxReplicas").message("autoscaling.minReplicas must not be greater than autoscaling.maxReplicas")
)]
pub struct AutoscalingSpec {
    /// The fewest relay pods.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,
    /// The most relay pods.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Average open connections per pod the autoscaler aims for.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub target_connections_per_pod: i64,
    /// How long the load must stay low before pods are removed (every removal drains clients).
    #[serde(default = "default_scale_down_window")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_stabilization_seconds: i32,
}

fn default_min_replicas() -> i32 {
    2
}
fn default_scale_down_window() -> i32 {
    300
}

/// Rebalancing: the operator's leader watches every relay's connection count and, when one
/// holds more than the mean by more than the tolerance for `stableSeconds`, with every pod
/// Ready, no rollout under way and the autoscaler steady, asks each such relay to move its
/// excess to the others: it stops taking new connections (its readiness goes false) and
/// tells the chosen clients to reconnect, their turns spread over `overSeconds`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RebalanceSpec {
    /// Rebalance this gateway. Off by default: moving a client costs it a reconnect.
    #[serde(default)]
    pub enabled: bool,
    /// How far above the mean a pod may hold, in percent of the mean, before it sheds (a
    /// percent, not a fraction: the Kubernetes API conventions avoid floats). 25: a pod
    /// with more than 1.25 times the mean sheds down to the mean.
    #[serde(default = "default_tolerance_percent")]
    #[schemars(range(min = 5, max = 100))]
    pub tolerance_percent: i32,
    /// How long an imbalance must last before a round starts, and how long the fleet is
    /// left to settle after a round's last move before the next can start.
    #[serde(default = "default_rebalance_stable")]
    #[schemars(range(min = 5, max = 3600))]
    pub stable_seconds: i32,
    /// The least time over which a round's moves are spread (longer when
    /// `maxMovesPerSecond` needs it).
    #[serde(default = "default_rebalance_over")]
    #[schemars(range(min = 1, max = 3600))]
    pub over_seconds: i32,
    /// The most connections the whole fleet moves per second in a round: the round's
    /// spread is stretched until its moves fit.
    #[serde(default = "default_max_moves")]
    #[schemars(range(min = 1, max = 10_000))]
    pub max_moves_per_second: i32,
    /// Also move connections with a subscription on a channel without history. Such a
    /// client may lose the messages published on those channels while it reconnects (a
    /// resumable channel replays them). Off: only connections whose every subscription is
    /// resumable move, so a relay may shed fewer than asked.
    #[serde(default)]
    pub include_plain_channels: bool,
}

fn default_tolerance_percent() -> i32 {
    25
}
fn default_rebalance_stable() -> i32 {
    60
}
fn default_rebalance_over() -> i32 {
    120
}
fn default_max_moves() -> i32 {
    100
}

impl Default for RebalanceSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            tolerance_percent: default_tolerance_percent(),
            stable_seconds: default_rebalance_stable(),
            over_seconds: default_rebalance_over(),
            max_moves_per_second: default_max_moves(),
            include_plain_channels: false,
        }
    }
}

/// Graceful drain of a stopping pod: readiness goes false, new connections are refused, and
/// open ones are told to reconnect elsewhere, their disconnects spread over most of the grace
/// period (the relay keeps the rest as slack for the last clients and for NATS).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainSpec {
    /// Time a stopping pod has to let its clients go. The pod's
    /// terminationGracePeriodSeconds is set above it.
    #[serde(default = "default_grace")]
    #[schemars(range(min = 1, max = 3600))]
    pub grace_period_seconds: i32,
    /// Wait this long after the pod stops being ready before the first client is told to
    /// reconnect, so the Service's endpoints and any ingress have dropped the pod and
    /// reconnects cannot land on it again. At most half the grace period is used. 0 (the
    /// default) starts at once; behind an ingress with slow endpoint updates, 5 is typical.
    #[serde(default)]
    #[schemars(range(min = 0, max = 600))]
    pub delay_before_close_seconds: i32,
}

fn default_grace() -> i32 {
    60
}

impl Default for DrainSpec {
    fn default() -> Self {
        Self {
            grace_period_seconds: default_grace(),
            delay_before_close_seconds: 0,
        }
    }
}

/// The Service in front of the relays.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// The Service type.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// The port clients connect to.
    #[serde(default = "default_service_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Extra annotations on the Service (load balancer settings and the like).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub annotations: BTreeMap<String, String>,
    /// `ClientIP`: the Service sends every connection from one client address to the same
    /// relay pod (for 3 hours after the address's last connection). No longer needed for
    /// anything: an SSE POST may reach any relay pod, which forwards it to the pod holding the
    /// session (docs/protocol.md section 9). `None` (the default) balances each connection
    /// on its own; `ClientIP` pins every client behind one address (a NAT, a load balancer
    /// that hides client addresses) to one pod. Kept for gateways that set it.
    #[serde(default)]
    pub session_affinity: SessionAffinity,
}

/// Session affinity of the gateway's Service.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum SessionAffinity {
    /// Each connection balanced on its own.
    #[default]
    None,
    /// Connections from one client address go to the same relay pod.
    ClientIP,
}

fn default_service_port() -> i32 {
    80
}

impl Default for ServiceSpec {
    fn default() -> Self {
        Self {
            type_: ServiceType::default(),
            port: default_service_port(),
            annotations: BTreeMap::new(),
            session_affinity: SessionAffinity::default(),
        }
    }
}

/// A Service type.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ServiceType {
    /// Reachable inside the cluster (put an Ingress or Gateway in front).
    #[default]
    ClusterIP,
    /// A port on every node.
    NodePort,
    /// A cloud load balancer.
    LoadBalancer,
}

/// TLS on the client port.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// A `kubernetes.io/tls` Secret (keys `tls.crt` and `tls.key`) in the gateway's namespace.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub secret_name: String,
}

/// The relay container image.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageSpec {
    /// Image reference, e.g. `registry.example.com/wsrelay:0.1.0`.
    #[serde(default = "default_image")]
    #[schemars(length(min = 1, max = 512))]
    pub name: String,
    /// When the kubelet pulls the image.
    #[serde(default)]
    pub pull_policy: PullPolicy,
}

fn default_image() -> String {
    DEFAULT_IMAGE.into()
}

impl Default for ImageSpec {
    fn default() -> Self {
        Self {
            name: default_image(),
            pull_policy: PullPolicy::default(),
        }
    }
}

/// An image pull policy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum PullPolicy {
    /// Pull when the node lacks the image.
    #[default]
    IfNotPresent,
    /// Pull on every pod start.
    Always,
    /// Never pull.
    Never,
}

/// Where relay pods are scheduled, and extra metadata on them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlacementSpec {
    /// Node labels a pod's node must have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the pods tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tolerations: Vec<Toleration>,
    /// Node and pod (anti-)affinity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// How pods spread across zones and nodes. Empty: spread across nodes, best effort.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    /// Extra labels on the pods. Keys under `app.kubernetes.io/` are reserved for the operator.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    #[x_kube(validation = Rule::new("self.all(k, !k.startsWith('app.kubernetes.io/'))").message("placement.podLabels must not set app.kubernetes.io/* labels: the operator selects its pods with them"))]
    pub pod_labels: BTreeMap<String, String>,
    /// Extra annotations on the pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub pod_annotations: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::DEFAULT_IMAGE;

    /// The default must name the image `images/build.sh` builds, so a gateway without
    /// `spec.image` runs the relay of the same release as the operator.
    #[test]
    fn default_image_matches_images_env() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../images/images.env");
        let env = std::fs::read_to_string(path).unwrap();
        let relay = env
            .lines()
            .find_map(|l| l.trim().strip_prefix("RELAY_IMAGE="))
            .expect("RELAY_IMAGE= in images/images.env");
        assert_eq!(
            DEFAULT_IMAGE,
            format!("{relay}:{}", env!("CARGO_PKG_VERSION")),
            "DEFAULT_IMAGE and images/images.env disagree"
        );
    }
}
