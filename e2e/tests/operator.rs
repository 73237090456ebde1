//! The operator against a real control plane: every child object, updates that roll,
//! autoscaling removed, garbage collection, the API server refusing bad gateways, and a
//! missing Secret reported and recovered from.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, ResourceQuota, Secret, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use wsrelay_e2e::operator::{
    Operator, condition, create_example, create_gateway, example, install_crd,
};
use wsrelay_e2e::{eventually, wait_for, with_namespace};
use wsrelay_operator::api::WebsocketGateway;

const HASH: &str = "wsrelay.dev/config-hash";

fn owned_by(meta: &kube::api::ObjectMeta, gw: &WebsocketGateway) -> bool {
    meta.owner_references.iter().flatten().any(|o| {
        o.kind == "WebsocketGateway"
            && Some(&o.uid) == gw.metadata.uid.as_ref()
            && o.controller == Some(true)
            && o.block_owner_deletion == Some(true)
    })
}

async fn get<K>(client: &Client, ns: &str, name: &str) -> Result<Option<K>>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    Ok(Api::<K>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await?)
}

/// Sets one key of a Secret (a merge patch of its stringData).
async fn set_secret_key(secrets: &Api<Secret>, name: &str, key: &str, value: &str) -> Result<()> {
    secrets
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "stringData": { key: value } })),
        )
        .await?;
    Ok(())
}

fn pod_hash(d: &Deployment) -> Option<String> {
    d.spec
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get(HASH)
        .cloned()
}

#[tokio::test]
async fn gateway_lifecycle_create_update_unscale_delete() -> Result<()> {
    with_namespace("op-life", |client, ns| async move {
        install_crd(&client).await?;
        let _operator = Operator::start(client.clone(), &ns, None);
        let gw = create_example(&client, &ns).await?;
        let name = gw.name_any();
        let gws = Api::<WebsocketGateway>::namespaced(client.clone(), &ns);

        // Status: observedGeneration and the three conditions.
        let gw = wait_for(&gws, &name, |g: Option<&WebsocketGateway>| {
            g.and_then(|g| g.status.as_ref())
                .is_some_and(|s| s.observed_generation == Some(1) && s.conditions.len() == 3)
        })
        .await?;
        assert_eq!(
            condition(&gw, "Degraded").map(|c| c.status.as_str()),
            Some("False")
        );
        assert!(condition(&gw, "Ready").is_some() && condition(&gw, "Progressing").is_some());
        let status = gw.status.clone().context("status")?;
        assert_eq!(
            status.endpoint.as_deref(),
            Some(format!("ws://{name}.{ns}.svc:80/ws").as_str())
        );
        assert_eq!(
            status.selector.as_deref(),
            Some(
                format!("app.kubernetes.io/instance={name},app.kubernetes.io/name=wsrelay")
                    .as_str()
            )
        );

        // Every child exists, owned by the gateway, with the fields that matter.
        let sa: ServiceAccount = get(&client, &ns, &name).await?.context("ServiceAccount")?;
        assert!(owned_by(&sa.metadata, &gw));
        let cm: ConfigMap = get(&client, &ns, &name).await?.context("ConfigMap")?;
        assert!(owned_by(&cm.metadata, &gw));
        let config = cm
            .data
            .as_ref()
            .and_then(|d| d.get("relay.json"))
            .context("relay.json")?;
        let config: serde_json::Value = serde_json::from_str(config)?;
        assert_eq!(config["bindings"].as_array().map(Vec::len), Some(3));
        assert_eq!(
            config["auth"]["jwt"]["key"]["hmacSecretFile"],
            "/etc/wsrelay/secrets/chat-jwt/hmac"
        );
        let deploy: Deployment = get(&client, &ns, &name).await?.context("Deployment")?;
        assert!(owned_by(&deploy.metadata, &gw));
        let pod = deploy.spec.template.spec.as_ref().context("pod spec")?;
        assert_eq!(pod.termination_grace_period_seconds, Some(120 + 15));
        assert_eq!(pod.service_account_name.as_deref(), Some(name.as_str()));
        let c = &pod.containers[0];
        let sc = c
            .security_context
            .as_ref()
            .context("container securityContext")?;
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_string()])
        );
        assert_eq!(
            sc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
            Some("RuntimeDefault")
        );
        let readiness = c
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .context("readiness")?;
        assert_eq!(readiness.path.as_deref(), Some("/ready"));
        let liveness = c
            .liveness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .context("liveness")?;
        assert_eq!(liveness.path.as_deref(), Some("/live"));
        let hash_before = pod_hash(&deploy).context("config hash annotation")?;
        let svc: Service = get(&client, &ns, &name).await?.context("Service")?;
        assert!(owned_by(&svc.metadata, &gw));
        assert_eq!(
            svc.spec
                .as_ref()
                .and_then(|s| s.ports.as_ref())
                .map(|p| p[0].port),
            Some(80)
        );
        let hpa: HorizontalPodAutoscaler = get(&client, &ns, &name).await?.context("HPA")?;
        assert!(owned_by(&hpa.metadata, &gw));
        let hspec = &hpa.spec;
        assert_eq!((hspec.min_replicas, hspec.max_replicas), (Some(2), 20));
        let metric = &hspec.metrics.as_ref().context("metrics")?[0];
        let pods = metric.pods.as_ref().context("Pods metric")?;
        assert_eq!(pods.metric.name, "wsrelay_connections");
        assert_eq!(
            pods.target.average_value.as_ref().map(|q| q.0.as_str()),
            Some("5k")
        );
        assert_eq!(
            hspec
                .behavior
                .as_ref()
                .and_then(|b| b.scale_down.as_ref())
                .and_then(|s| s.stabilization_window_seconds),
            Some(600)
        );
        let pdb: PodDisruptionBudget = get(&client, &ns, &name).await?.context("PDB")?;
        assert!(owned_by(&pdb.metadata, &gw));
        let np: NetworkPolicy = get(&client, &ns, &name).await?.context("NetworkPolicy")?;
        assert!(owned_by(&np.metadata, &gw));

        // Update a binding: the ConfigMap and the pod-template hash change.
        gws.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "bindings": [
                { "channel": "notifications", "subject": "users.{claims.sub}.notify" },
                { "channel": "orders.{id}", "subject": "orders.{id}.updates" },
                { "channel": "rooms.{room}", "subject": "chat.rooms.{room}", "direction": "Both" }
            ]}})),
        )
        .await?;
        let cms = Api::<ConfigMap>::namespaced(client.clone(), &ns);
        wait_for(&cms, &name, |cm: Option<&ConfigMap>| {
            cm.and_then(|c| c.data.as_ref())
                .and_then(|d| d.get("relay.json"))
                .is_some_and(|c| c.contains("orders.{id}.updates"))
        })
        .await?;
        let deploys = Api::<Deployment>::namespaced(client.clone(), &ns);
        let rolled = wait_for(&deploys, &name, |d: Option<&Deployment>| {
            d.and_then(pod_hash).is_some_and(|h| h != hash_before)
        })
        .await?;
        assert_ne!(pod_hash(&rolled), Some(hash_before));
        wait_for(&gws, &name, |g: Option<&WebsocketGateway>| {
            g.and_then(|g| g.status.as_ref())
                .is_some_and(|s| s.observed_generation == Some(2))
        })
        .await?;

        // Rotate the NATS token (read by the relay only at start): the pods roll. Rotate the
        // JWT key (reloaded by the relay in place): they do not.
        let hash_rotated = pod_hash(&rolled).context("config hash annotation")?;
        let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
        set_secret_key(&secrets, "chat-jwt", "hmac", "a-rotated-key-of-at-least-32-bytes!").await?;
        set_secret_key(&secrets, "chat-nats", "token", "a-rotated-nats-token").await?;
        let after_nats = wait_for(&deploys, &name, |d: Option<&Deployment>| {
            d.and_then(pod_hash).is_some_and(|h| h != hash_rotated)
        })
        .await?;
        let hash_nats = pod_hash(&after_nats).context("config hash annotation")?;
        set_secret_key(&secrets, "chat-jwt", "hmac", "yet-another-key-of-at-least-32-bytes").await?;
        // A later spec change (a Service annotation, which leaves the pod template alone) is
        // reconciled with the rotated JWT key in hand: the template must still be the same.
        gws.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "service": { "annotations": { "e2e.wsrelay.dev/probe": "1" } } } })),
        )
        .await?;
        let services = Api::<Service>::namespaced(client.clone(), &ns);
        wait_for(&services, &name, |svc: Option<&Service>| {
            svc.and_then(|s| s.metadata.annotations.as_ref())
                .is_some_and(|a| a.contains_key("e2e.wsrelay.dev/probe"))
        })
        .await?;
        let after_jwt = deploys.get(&name).await?;
        assert_eq!(
            pod_hash(&after_jwt),
            Some(hash_nats),
            "a JWT key rotation must not roll the relays (the relay reloads the key file)"
        );

        // Remove autoscaling (with the replica count to go to, which the API server asks
        // for): the HPA goes, the Deployment gets the fixed replica count.
        gws.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "autoscaling": null, "replicas": 2 } })),
        )
        .await?;
        eventually("the HPA to be deleted", || async {
            Ok(get::<HorizontalPodAutoscaler>(&client, &ns, &name)
                .await?
                .is_none()
                .then_some(()))
        })
        .await?;
        let fixed = wait_for(&deploys, &name, |d: Option<&Deployment>| {
            d.is_some_and(|d| d.spec.replicas == Some(2))
        })
        .await?;
        assert_eq!(fixed.spec.replicas, Some(2));

        // Delete the gateway: the garbage collector removes every child.
        gws.delete(&name, &DeleteParams::background()).await?;
        eventually(
            "every child of the gateway to be garbage-collected",
            || async {
                let left = [
                    get::<ServiceAccount>(&client, &ns, &name).await?.is_some(),
                    get::<ConfigMap>(&client, &ns, &name).await?.is_some(),
                    get::<Deployment>(&client, &ns, &name).await?.is_some(),
                    get::<Service>(&client, &ns, &name).await?.is_some(),
                    get::<PodDisruptionBudget>(&client, &ns, &name)
                        .await?
                        .is_some(),
                    get::<NetworkPolicy>(&client, &ns, &name).await?.is_some(),
                ];
                Ok((!left.contains(&true)).then_some(()))
            },
        )
        .await
    })
    .await
}

/// A valid gateway as JSON, for the refusal cases to break one piece at a time.
fn valid() -> Result<serde_json::Value> {
    let (_, gw) = example()?;
    Ok(serde_json::to_value(gw)?)
}

fn merge(base: &mut serde_json::Value, patch: &serde_json::Value) {
    match (base, patch) {
        (serde_json::Value::Object(b), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    b.remove(k);
                } else {
                    merge(b.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

#[tokio::test]
async fn bad_gateways_are_refused_by_the_api_server_with_their_messages() -> Result<()> {
    with_namespace("op-cel", |client, ns| async move {
        install_crd(&client).await?;
        let gws = Api::<kube::api::DynamicObject>::namespaced_with(
            client.clone(),
            &ns,
            &kube::api::ApiResource::erase::<WebsocketGateway>(&()),
        );
        // The valid gateway goes in: the cases below fail for their own reason only.
        let good: kube::api::DynamicObject = serde_json::from_value(valid()?)?;
        eventually("the CRD to serve gateways", || async {
            match gws.create(&PostParams { dry_run: true, ..Default::default() }, &good).await {
                Ok(_) => Ok(Some(())),
                Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
                Err(e) => Err(e.into()),
            }
        })
        .await?;

        let cases: Vec<(&str, serde_json::Value, &str)> = vec![
            ("min > max replicas",
             json!({"spec": {"autoscaling": {"minReplicas": 5, "maxReplicas": 3}}}),
             "autoscaling.minReplicas must not be greater than autoscaling.maxReplicas"),
            ("replicas with autoscaling",
             json!({"spec": {"replicas": 3}}),
             "spec.replicas and spec.autoscaling are mutually exclusive"),
            ("malformed channel",
             json!({"spec": {"bindings": [{"channel": "orders..{id}", "subject": "orders.x"}]}}),
             "channel must be dot-separated tokens"),
            ("wildcard in subject",
             json!({"spec": {"bindings": [{"channel": "orders", "subject": "orders.>"}]}}),
             "NATS wildcards are not allowed"),
            ("subject uses a token its channel lacks",
             json!({"spec": {"bindings": [{"channel": "orders.{id}", "subject": "orders.{user}"}]}}),
             "subject uses a placeholder its channel does not define"),
            ("duplicate channel",
             json!({"spec": {"bindings": [
                 {"channel": "news", "subject": "news.a"},
                 {"channel": "news", "subject": "news.b"}]}}),
             "each channel may be bound only once"),
            ("two JWT key sources",
             json!({"spec": {"auth": {"jwt": {"jwksUrl": "https://issuer.example.com/jwks.json"}}}}),
             "auth.jwt needs exactly one key source"),
            ("no JWT key source",
             json!({"spec": {"auth": {"jwt": {"hmacSecretRef": null}}}}),
             "auth.jwt needs exactly one key source"),
            ("JWKS timings without a JWKS",
             json!({"spec": {"auth": {"jwt": {"jwksCacheSeconds": 60}}}}),
             "jwksCacheSeconds and jwksMinRefreshSeconds apply only with jwksUrl"),
            ("HMAC key with RS256",
             json!({"spec": {"auth": {"jwt": {"algorithms": ["RS256"]}}}}),
             "an HMAC secret verifies only HS256 tokens"),
            ("no auth at all",
             json!({"spec": {"auth": {"jwt": null}}}),
             "auth needs a jwt section, or allowAnonymous: true"),
            ("claims without JWT",
             json!({"spec": {"auth": {"jwt": null, "allowAnonymous": true}}}),
             "uses {claims.*} but auth has no jwt section"),
            ("bad NATS URL",
             json!({"spec": {"nats": {"urls": ["http://nats:4222"]}}}),
             "each NATS URL must look like nats://host:4222"),
            ("two NATS credentials",
             json!({"spec": {"nats": {"credentials": {"nkeySeed": {"name": "s", "key": "seed"}}}}}),
             "nats.credentials needs exactly one of token, userPassword, nkeySeed or credsFile"),
            ("ping not below idle timeout",
             json!({"spec": {"limits": {"pingIntervalSeconds": 90, "idleTimeoutSeconds": 60}}}),
             "limits.pingIntervalSeconds must be shorter than limits.idleTimeoutSeconds"),
            ("target above the per-pod maximum",
             json!({"spec": {"autoscaling": {"targetConnectionsPerPod": 50000}}}),
             "targetConnectionsPerPod must not exceed spec.limits.maxConnectionsPerPod"),
            ("origin with a path",
             json!({"spec": {"auth": {"allowedOrigins": ["https://chat.example.com/app"]}}}),
             "each allowed origin must be '*' or scheme://host[:port]"),
            ("query token source without a name",
             json!({"spec": {"auth": {"jwt": {"tokenSources": [{"from": "Query"}]}}}}),
             "a Query or Cookie token source needs the parameter or cookie name"),
            ("reserved pod label",
             json!({"spec": {"placement": {"podLabels": {"app.kubernetes.io/instance": "x"}}}}),
             "placement.podLabels must not set app.kubernetes.io/* labels"),
            ("cookie token with any origin",
             json!({"spec": {"auth": {"allowedOrigins": ["*"], "jwt": {"tokenSources": [{"from": "Cookie", "name": "session"}]}}}}),
             "a Cookie token source cannot be combined with allowedOrigins '*'"),
            ("subject starting with a placeholder",
             json!({"spec": {"bindings": [{"channel": "x.{t}", "subject": "{t}.feed"}]}}),
             "subject must start with a fixed name, outside _INBOX"),
            ("subject in _INBOX",
             json!({"spec": {"bindings": [{"channel": "x.{t}", "subject": "_INBOX.{t}"}]}}),
             "subject must start with a fixed name, outside _INBOX"),
            ("subject in the relay's own _WSRELAY",
             json!({"spec": {"bindings": [{"channel": "x.{t}", "subject": "_WSRELAY.{t}"}]}}),
             "outside _INBOX and _WSRELAY"),
            ("history window above the send queue",
             json!({"spec": {"bindings": [{"channel": "o.{id}", "subject": "o.{id}", "history": {"maxMessages": 5000}}]}}),
             "history.maxMessages must not exceed limits.sendQueueLength"),
            ("history replicas 2",
             json!({"spec": {"bindings": [{"channel": "o.{id}", "subject": "o.{id}", "history": {"replicas": 2}}]}}),
             "history.replicas must be 1, 3 or 5"),
            ("no bindings",
             json!({"spec": {"bindings": []}}),
             "spec.bindings: Invalid value"),
            ("Secret name that is not a DNS name",
             json!({"spec": {"nats": {"credentials": {"token": {"name": "Not_A_Name", "key": "token"}}}}}),
             "spec.nats.credentials.token.name"),
            ("message larger than the send queue",
             json!({"spec": {"limits": {"maxMessageBytes": 2_097_152}}}),
             "limits.maxMessageBytes must not exceed limits.sendQueueBytes"),
            ("pod budget below one connection's queue",
             json!({"spec": {"limits": {"sendQueueBytes": 4_194_304, "maxQueuedBytesPerPod": 1_048_576}}}),
             "limits.maxQueuedBytesPerPod must be at least limits.sendQueueBytes"),
            ("per-address handshake share above the total",
             json!({"spec": {"limits": {"maxHandshakesInFlight": 100, "maxHandshakesInFlightPerIp": 200}}}),
             "limits.maxHandshakesInFlightPerIp must not exceed limits.maxHandshakesInFlight"),
            ("negative per-address connection limit",
             json!({"spec": {"limits": {"maxConnectionsPerIp": -1}}}),
             "spec.limits.maxConnectionsPerIp"),
            ("http JWKS without jwksAllowHttp",
             json!({"spec": {"auth": {"jwt": {"hmacSecretRef": null, "jwksUrl": "http://issuer.example.com/jwks.json"}}}}),
             "jwksUrl is http://"),
            ("JWKS URL with an upper-case scheme (the relay reads https:// only)",
             json!({"spec": {"auth": {"jwt": {"hmacSecretRef": null, "jwksUrl": "HTTPS://issuer.example.com/jwks.json"}}}}),
             "jwksUrl must be an http(s) URL"),
            ("jwksAllowHttp without a JWKS",
             json!({"spec": {"auth": {"jwt": {"jwksAllowHttp": true}}}}),
             "jwksAllowHttp applies only with jwksUrl"),
            ("trusted proxy with a prefix too long",
             json!({"spec": {"network": {"trustedProxies": ["10.0.0.0/8", "10.0.0.0/33"]}}}),
             "each trusted proxy must be a CIDR"),
            ("trusted proxy given by name",
             json!({"spec": {"network": {"trustedProxies": ["ingress-nginx"]}}}),
             "each trusted proxy must be a CIDR"),
            ("client IP header that is not a header name",
             json!({"spec": {"network": {"clientIpHeader": "X Forwarded For"}}}),
             "spec.network.clientIpHeader"),
            ("authorize naming no check",
             json!({"spec": {"bindings": [{"channel": "o.{id}", "subject": "o.{id}", "authorize": {}}]}}),
             "authorize names no check"),
            ("request subject with a wildcard",
             json!({"spec": {"bindings": [{"channel": "o.{id}", "subject": "o.{id}",
                 "authorize": {"request": {"subject": "authz.*"}}}]}}),
             "request subject must be a fixed NATS subject"),
            ("request subject with a placeholder",
             json!({"spec": {"bindings": [{"channel": "o.{id}", "subject": "o.{id}",
                 "authorize": {"request": {"subject": "authz.{id}"}}}]}}),
             "request subject must be a fixed NATS subject"),
            ("request subject in $SYS",
             json!({"spec": {"bindings": [{"channel": "o.{id}", "subject": "o.{id}",
                 "authorize": {"request": {"subject": "$SYS.REQ.USER.INFO"}}}]}}),
             "request subject must be a fixed NATS subject"),
            ("request subject in _INBOX",
             json!({"spec": {"bindings": [{"channel": "o.{id}", "subject": "o.{id}",
                 "authorize": {"request": {"subject": "_INBOX.authz"}}}]}}),
             "request subject must be a fixed NATS subject"),
            ("presence key with a placeholder its channel lacks",
             json!({"spec": {"bindings": [{"channel": "rooms.{room}", "subject": "rooms.{room}",
                 "presence": {"key": "{user}"}}]}}),
             "presence.key uses a placeholder its channel does not define"),
            ("presence on a publish-only binding",
             json!({"spec": {"bindings": [{"channel": "rooms.{room}", "subject": "rooms.{room}",
                 "direction": "Publish", "presence": {}}]}}),
             "a binding with presence must allow subscribe"),
            ("presence key with a wildcard",
             json!({"spec": {"bindings": [{"channel": "rooms.{room}", "subject": "rooms.{room}",
                 "presence": {"key": "users.>"}}]}}),
             "presence.key must be dot-separated tokens"),
            ("presence grace above 300 s",
             json!({"spec": {"bindings": [{"channel": "rooms.{room}", "subject": "rooms.{room}",
                 "presence": {"leaveGraceSeconds": 301}}]}}),
             "spec.bindings[0].presence.leaveGraceSeconds"),
            ("registry replicas 2",
             json!({"spec": {"registry": {"replicas": 2}}}),
             "registry.replicas must be 1, 3 or 5"),
            ("request timeout above 5 s",
             json!({"spec": {"bindings": [{"channel": "o.{id}", "subject": "o.{id}",
                 "authorize": {"request": {"subject": "authz.o", "timeoutMs": 6000}}}]}}),
             "spec.bindings[0].authorize.request.timeoutMs"),
            ("onTimeout in the relay config's spelling",
             json!({"spec": {"bindings": [{"channel": "o.{id}", "subject": "o.{id}",
                 "authorize": {"request": {"subject": "authz.o", "onTimeout": "allow"}}}]}}),
             "spec.bindings[0].authorize.request.onTimeout"),
            ("rule above 1024 bytes",
             json!({"spec": {"bindings": [{"channel": "o.{id}", "subject": "o.{id}",
                 "authorize": {"rule": format!("{}true", "true && ".repeat(128))}}]}}),
             "spec.bindings[0].authorize.rule"),
            ("subscription token without keys of its own nor auth.jwt",
             json!({"spec": {"auth": {"jwt": null, "allowAnonymous": true},
                 "bindings": [{"channel": "o.{id}", "subject": "o.{id}", "authorize": {"token": {}}}]}}),
             "authorize.token has no jwt of its own"),
            ("subscription token with two key sources",
             json!({"spec": {"bindings": [{"channel": "o.{id}", "subject": "o.{id}",
                 "authorize": {"token": {"jwt": {"hmacSecretRef": {"name": "k", "key": "hmac"},
                     "jwksUrl": "https://issuer.example.com/jwks.json"}}}}]}}),
             "authorize.token.jwt needs exactly one key source"),
            ("connect request without auth.jwt",
             json!({"spec": {"auth": {"jwt": null, "allowAnonymous": true,
                 "connectRequest": {"subject": "authz.connect"}},
                 "bindings": [{"channel": "news", "subject": "news"}]}}),
             "auth.connectRequest asks your backend"),
            ("events subject with a wildcard",
             json!({"spec": {"events": {"subject": "wsrelay.*"}}}),
             "events.subject must be a fixed NATS subject"),
            ("control subject in _INBOX",
             json!({"spec": {"control": {"subject": "_INBOX.control"}}}),
             "control.subject must be a fixed NATS subject"),
            ("events subject above 72 bytes",
             json!({"spec": {"events": {"subject": "e".repeat(73)}}}),
             "spec.events.subject"),
            ("an event type named twice",
             json!({"spec": {"events": {"types": ["Connected", "Connected"]}}}),
             "events.types names a type twice"),
            ("events and control one within the other",
             json!({"spec": {"events": {"subject": "wsrelay"}, "control": {"subject": "wsrelay.control"}}}),
             "must not be one within the other"),
            ("durable events with 2 replicas",
             json!({"spec": {"events": {"durable": {"replicas": 2}}}}),
             "events.durable.replicas must be 1, 3 or 5"),
            ("a duplicate window shorter than two leases",
             json!({"spec": {"registry": {"leaseSeconds": 60}, "events": {"durable": {"duplicateWindowSeconds": 100}}}}),
             "at least twice registry.leaseSeconds"),
            ("a grace without durable events",
             json!({"spec": {"events": {"graceSeconds": 5}}}),
             "events.graceSeconds needs events.durable"),
            ("a duplicate window shorter than two leases and the grace",
             json!({"spec": {"events": {"graceSeconds": 40, "durable": {"duplicateWindowSeconds": 60}}}}),
             "plus events.graceSeconds"),
            ("a duplicate window longer than the events are kept",
             json!({"spec": {"events": {"durable": {"maxAgeSeconds": 60, "duplicateWindowSeconds": 120}}}}),
             "must not exceed events.durable.maxAgeSeconds"),
            ("rebalance tolerance below 5%",
             json!({"spec": {"rebalance": {"enabled": true, "tolerancePercent": 3}}}),
             "spec.rebalance.tolerancePercent in body should be greater than or equal to 5"),
            ("rebalance tolerance above 100%",
             json!({"spec": {"rebalance": {"enabled": true, "tolerancePercent": 150}}}),
             "spec.rebalance.tolerancePercent in body should be less than or equal to 100"),
            ("rebalance tolerance as a fraction (the API takes a percent)",
             json!({"spec": {"rebalance": {"enabled": true, "tolerancePercent": 0.25}}}),
             "spec.rebalance.tolerancePercent"),
            ("rebalance stableSeconds below 5",
             json!({"spec": {"rebalance": {"stableSeconds": 1}}}),
             "spec.rebalance.stableSeconds in body should be greater than or equal to 5"),
            ("rebalance overSeconds above an hour",
             json!({"spec": {"rebalance": {"overSeconds": 7200}}}),
             "spec.rebalance.overSeconds in body should be less than or equal to 3600"),
            ("rebalance maxMovesPerSecond 0",
             json!({"spec": {"rebalance": {"maxMovesPerSecond": 0}}}),
             "spec.rebalance.maxMovesPerSecond in body should be greater than or equal to 1"),
        ];
        assert!(cases.len() >= 10);
        let mut failures = Vec::new();
        for (i, (what, patch, message)) in cases.iter().enumerate() {
            let mut obj = valid()?;
            merge(&mut obj, patch);
            obj["metadata"] = json!({ "name": format!("bad-{i}") });
            let obj: kube::api::DynamicObject = serde_json::from_value(obj)?;
            match gws.create(&PostParams::default(), &obj).await {
                Ok(_) => failures.push(format!("{what}: accepted")),
                Err(kube::Error::Api(s)) => {
                    if s.code != 422 || !s.message.contains(message) {
                        failures.push(format!("{what}: got {} {:?}, wanted {message:?}", s.code, s.message));
                    }
                }
                Err(e) => failures.push(format!("{what}: {e}")),
            }
        }
        // What the rules above must still let through: an http JWKS with its flag, IPv6
        // and single-address trusted proxies, the largest message in a queue its size.
        let accepted: Vec<(&str, serde_json::Value)> = vec![
            ("http JWKS with jwksAllowHttp",
             json!({"spec": {"auth": {"jwt": {"hmacSecretRef": null, "jwksAllowHttp": true,
                 "jwksUrl": "http://issuer.auth.svc.cluster.local/jwks.json"}}}})),
            ("trusted proxies: IPv4 and IPv6 CIDRs and single addresses",
             json!({"spec": {"network": {"trustedProxies":
                 ["10.244.0.0/16", "fd00:10:244::/56", "192.0.2.10", "2001:db8::1"]},
                 "limits": {"maxConnectionsPerIp": 300}}})),
            ("rebalance at the ends of its ranges",
             json!({"spec": {"rebalance": {"enabled": true, "tolerancePercent": 5, "stableSeconds": 3600,
                 "overSeconds": 1, "maxMovesPerSecond": 10_000, "includePlainChannels": true}}})),
            ("maxMessageBytes equal to sendQueueBytes",
             json!({"spec": {"limits": {"maxMessageBytes": 8_388_608, "sendQueueBytes": 8_388_608,
                 "maxQueuedBytesPerPod": 8_388_608}}})),
            ("every authorize check, and the connect step",
             json!({"spec": {"auth": {"connectRequest": {"subject": "authz.connect", "onTimeout": "Allow"}},
                 "bindings": [
                     {"channel": "rooms.{room}", "subject": "chat.rooms.{room}", "direction": "Both",
                      "authorize": {"rule": "vars.room in claims.rooms || 'admin' in claims.roles"}},
                     {"channel": "orders.{id}", "subject": "orders.{id}.events",
                      "authorize": {"request": {"subject": "authz.orders", "timeoutMs": 5000,
                          "cacheSeconds": 0, "cacheEntries": 1_000_000}}},
                     {"channel": "vault.{id}", "subject": "vault.{id}",
                      "authorize": {"token": {"jwt": {"publicKeySecretRef": {"name": "k", "key": "pub.pem"},
                          "algorithms": ["ES256"]}}, "rule": "has(claims.org)",
                          "request": {"subject": "authz.vault-1_x"}}},
                     {"channel": "plans.{id}", "subject": "plans.{id}", "authorize": {"token": {}}}]}})),
            ("events and control with their defaults",
             json!({"spec": {"events": {"durable": {}}, "control": {}}})),
            ("events and control with every setting at an end of its range",
             json!({"spec": {"registry": {"leaseSeconds": 3},
                 "events": {"subject": "backend.events-1_x", "types": ["Disconnected"],
                     "durable": {"maxAgeSeconds": 60, "replicas": 5, "maxBytes": 1_048_576,
                         "duplicateWindowSeconds": 6}},
                 "control": {"subject": "backend.events-1"}}})),
        ];
        for (i, (what, patch)) in accepted.iter().enumerate() {
            let mut obj = valid()?;
            merge(&mut obj, patch);
            obj["metadata"] = json!({ "name": format!("good-{i}") });
            let obj: kube::api::DynamicObject = serde_json::from_value(obj)?;
            if let Err(e) = gws.create(&PostParams { dry_run: true, ..Default::default() }, &obj).await {
                failures.push(format!("{what}: refused: {e}"));
            }
        }
        // A valid custom resource name that its children cannot carry (the Service name
        // must be a DNS label): refused up front, not failing every reconcile afterwards.
        let mut obj = valid()?;
        obj["metadata"] = json!({ "name": "chat.v2" });
        let obj: kube::api::DynamicObject = serde_json::from_value(obj)?;
        match gws.create(&PostParams::default(), &obj).await {
            Ok(_) => failures.push("name chat.v2: accepted".to_string()),
            Err(kube::Error::Api(s))
                if s.code == 422 && s.message.contains("metadata.name must be a DNS label") => {}
            Err(e) => failures.push(format!("name chat.v2: {e}")),
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        Ok(())
    })
    .await
}

async fn events_for(client: &Client, ns: &str, name: &str, reason: &str) -> Result<Vec<Event>> {
    let events = Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?;
    Ok(events
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
        })
        .collect())
}

#[tokio::test]
async fn a_missing_secret_degrades_the_gateway_until_it_appears() -> Result<()> {
    with_namespace("op-secret", |client, ns| async move {
        install_crd(&client).await?;
        let _operator = Operator::start(client.clone(), &ns, None);
        let (secrets, gw) = example()?;
        let secret_api = Api::<Secret>::namespaced(client.clone(), &ns);
        // Only the NATS token: the JWT key Secret is missing.
        let (jwt, others): (Vec<Secret>, Vec<Secret>) = secrets
            .into_iter()
            .partition(|s| s.name_any() == "chat-jwt");
        for s in &others {
            secret_api.create(&PostParams::default(), s).await?;
        }
        let gw = create_gateway(&client, &ns, &gw).await?;
        let name = gw.name_any();
        let gws = Api::<WebsocketGateway>::namespaced(client.clone(), &ns);

        let degraded = wait_for(&gws, &name, |g: Option<&WebsocketGateway>| {
            g.and_then(|g| condition(g, "Degraded"))
                .is_some_and(|c| c.status == "True")
        })
        .await?;
        let c = condition(&degraded, "Degraded").context("Degraded")?;
        assert_eq!(c.reason, "SecretNotFound");
        assert!(
            c.message.contains("Secret chat-jwt does not exist"),
            "{}",
            c.message
        );
        assert_eq!(
            condition(&degraded, "Ready").map(|c| c.status.as_str()),
            Some("False")
        );
        let events = eventually("a SecretNotFound Event", || async {
            let e = events_for(&client, &ns, &name, "SecretNotFound").await?;
            Ok((!e.is_empty()).then_some(e))
        })
        .await?;
        assert_eq!(events[0].type_.as_deref(), Some("Warning"));
        assert!(
            get::<Deployment>(&client, &ns, &name).await?.is_none(),
            "nothing is rolled out while the spec is unusable"
        );

        // The Secret appears: the operator notices at its next look (within
        // controller::SECRET_RECHECK, 60 s: Secrets are not watched) and recovers.
        let mut jwt = jwt.into_iter().next().context("the example has chat-jwt")?;
        jwt.metadata.resource_version = None;
        secret_api.create(&PostParams::default(), &jwt).await?;
        let recovered = wait_for(&gws, &name, |g: Option<&WebsocketGateway>| {
            g.and_then(|g| condition(g, "Degraded"))
                .is_some_and(|c| c.status == "False")
        })
        .await?;
        assert_eq!(
            condition(&recovered, "Degraded").map(|c| c.reason.as_str()),
            Some("AsExpected")
        );
        assert!(get::<Deployment>(&client, &ns, &name).await?.is_some());
        eventually("a Recovered Event", || async {
            Ok((!events_for(&client, &ns, &name, "Recovered")
                .await?
                .is_empty())
            .then_some(()))
        })
        .await?;

        // A key that is too short is a user error too, reported the same way.
        let short: BTreeMap<String, String> =
            BTreeMap::from([("hmac".to_string(), "short".to_string())]);
        secret_api
            .patch(
                "chat-jwt",
                &PatchParams::default(),
                &Patch::Merge(json!({ "stringData": short })),
            )
            .await?;
        let invalid = wait_for(&gws, &name, |g: Option<&WebsocketGateway>| {
            g.and_then(|g| condition(g, "Degraded"))
                .is_some_and(|c| c.reason == "InvalidSecret")
        })
        .await?;
        let msg = &condition(&invalid, "Degraded").context("Degraded")?.message;
        assert!(msg.contains("at least 32 bytes"), "{msg}");
        Ok(())
    })
    .await
}

/// An apply the API server refuses (here a ResourceQuota that allows no Service: 403) is a
/// problem a person must fix: the gateway says so in Degraded and a Warning Event, and
/// recovers once the quota allows the Service.
#[tokio::test]
async fn a_refused_apply_degrades_the_gateway_until_it_is_allowed() -> Result<()> {
    with_namespace("op-quota", |client, ns| async move {
        install_crd(&client).await?;
        let quotas = Api::<ResourceQuota>::namespaced(client.clone(), &ns);
        let quota: ResourceQuota = serde_json::from_value(json!({
            "metadata": { "name": "no-services" },
            "spec": { "hard": { "services": "0" } }
        }))?;
        quotas.create(&PostParams::default(), &quota).await?;
        let _operator = Operator::start(client.clone(), &ns, None);
        let gw = create_example(&client, &ns).await?;
        let name = gw.name_any();
        let gws = Api::<WebsocketGateway>::namespaced(client.clone(), &ns);

        let degraded = wait_for(&gws, &name, |g: Option<&WebsocketGateway>| {
            g.and_then(|g| condition(g, "Degraded"))
                .is_some_and(|c| c.status == "True")
        })
        .await?;
        let c = condition(&degraded, "Degraded").context("Degraded")?;
        assert_eq!(c.reason, "ApplyForbidden", "{}", c.message);
        assert!(
            c.message.contains("Service") && c.message.contains("quota"),
            "{}",
            c.message
        );
        let events = eventually("an ApplyForbidden Event", || async {
            let e = events_for(&client, &ns, &name, "ApplyForbidden").await?;
            Ok((!e.is_empty()).then_some(e))
        })
        .await?;
        assert_eq!(events[0].type_.as_deref(), Some("Warning"));

        quotas
            .delete("no-services", &DeleteParams::default())
            .await?;
        // Allowed again: the refusal leaves the condition. Not necessarily for
        // `AsExpected`: this test's relay pods point at a NATS they cannot reach, and once
        // one runs (the Deployment was applied before the refused Service) the gateway is
        // Degraded for that instead (`NatsUnreachable`); which comes first is a race.
        let recovered = wait_for(&gws, &name, |g: Option<&WebsocketGateway>| {
            g.and_then(|g| condition(g, "Degraded"))
                .is_some_and(|c| c.status == "False" || c.reason != "ApplyForbidden")
        })
        .await?;
        let reason = condition(&recovered, "Degraded").map(|c| c.reason.clone());
        assert!(
            matches!(reason.as_deref(), Some("AsExpected" | "NatsUnreachable")),
            "{reason:?}"
        );
        assert!(get::<Service>(&client, &ns, &name).await?.is_some());
        Ok(())
    })
    .await
}

/// Every `spec.replicas` the Deployment `name` takes, in order, while `during` runs (and
/// for `settle` after it), from a watch: a dip that lasts one update is seen.
async fn replicas_seen<F, Fut>(
    client: &Client,
    ns: &str,
    name: &str,
    settle: std::time::Duration,
    during: F,
) -> Result<Vec<i32>>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let deploys = Api::<Deployment>::namespaced(client.clone(), ns);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<i32>::new()));
    let watch = {
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut stream = watcher(deploys, config).applied_objects().boxed();
            while let Some(Ok(d)) = stream.next().await {
                if let Some(r) = d.spec.replicas {
                    let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                    if seen.last() != Some(&r) {
                        seen.push(r);
                    }
                }
            }
        })
    };
    // Let the watch list the Deployment before anything changes: waited for (bounded), not
    // assumed to take under a fixed 2 s on a loaded cluster.
    let listed_by = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while seen.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
        if std::time::Instant::now() > listed_by {
            watch.abort();
            anyhow::bail!("the watch did not list Deployment {name} within 60 s");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let outcome = during().await;
    tokio::time::sleep(settle).await;
    watch.abort();
    outcome?;
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(seen)
}

/// replicas: 4 -> autoscaling hands the count to the HPA without a dip (it was 4 -> 1 -> 2:
/// three relays drained for nothing); autoscaling -> replicas: 3 goes straight to 3, and
/// removing autoscaling without saying where to go is refused.
#[tokio::test]
async fn switching_between_fixed_replicas_and_autoscaling_never_dips() -> Result<()> {
    with_namespace("op-handover", |client, ns| async move {
        install_crd(&client).await?;
        let _operator = Operator::start(client.clone(), &ns, None);
        let (secrets, mut gw) = example()?;
        let secret_api = Api::<Secret>::namespaced(client.clone(), &ns);
        for s in &secrets {
            secret_api.create(&PostParams::default(), s).await?;
        }
        gw.spec.autoscaling = None;
        gw.spec.replicas = Some(4);
        let gw = create_gateway(&client, &ns, &gw).await?;
        let name = gw.name_any();
        let gws = Api::<WebsocketGateway>::namespaced(client.clone(), &ns);
        let deploys = Api::<Deployment>::namespaced(client.clone(), &ns);
        wait_for(&deploys, &name, |d: Option<&Deployment>| {
            d.is_some_and(|d| d.spec.replicas == Some(4))
        })
        .await?;

        // To autoscaling (2..6, no metrics served here, so the HPA keeps what it finds).
        let hpas = Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), &ns);
        let seen = replicas_seen(
            &client,
            &ns,
            &name,
            std::time::Duration::from_secs(10),
            || async {
                gws.patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "spec": { "replicas": null, "autoscaling": {
                    "minReplicas": 2, "maxReplicas": 6, "targetConnectionsPerPod": 100 } } })),
                )
                .await?;
                // The HPA has looked at the Deployment (it reports the current count).
                wait_for(&hpas, &name, |h: Option<&HorizontalPodAutoscaler>| {
                    h.and_then(|h| h.status.as_ref())
                        .is_some_and(|s| s.current_replicas == Some(4))
                })
                .await?;
                Ok(())
            },
        )
        .await?;
        assert_eq!(
            seen,
            vec![4],
            "spec.replicas of the Deployment while autoscaling took over"
        );
        let deploy = deploys.get(&name).await?;
        let fields = serde_json::to_string(&deploy.metadata.managed_fields)?;
        assert!(
            !wsrelay_operator::build::applies_replicas(&deploy, "wsrelay-operator"),
            "the operator still applies spec.replicas under autoscaling: {fields}"
        );

        // Removing autoscaling without a replica count is refused with the reason.
        let refused = gws
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": { "autoscaling": null } })),
            )
            .await;
        match refused {
            Err(kube::Error::Api(s))
                if s.code == 422
                    && s.message
                        .contains("removing spec.autoscaling needs an explicit spec.replicas") => {}
            other => panic!("removing autoscaling alone: {other:?}"),
        }

        // Back to a fixed count: straight from 4 to 3, and the HPA is gone.
        let seen = replicas_seen(
            &client,
            &ns,
            &name,
            std::time::Duration::from_secs(10),
            || async {
                gws.patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "spec": { "autoscaling": null, "replicas": 3 } })),
                )
                .await?;
                eventually("the HPA to be deleted", || async {
                    Ok(hpas.get_opt(&name).await?.is_none().then_some(()))
                })
                .await?;
                wait_for(&deploys, &name, |d: Option<&Deployment>| {
                    d.is_some_and(|d| d.spec.replicas == Some(3))
                })
                .await?;
                Ok(())
            },
        )
        .await?;
        assert_eq!(
            seen,
            vec![4, 3],
            "spec.replicas of the Deployment when autoscaling was removed"
        );
        Ok(())
    })
    .await
}

/// The operator's API requests, recorded: Secrets are never listed or watched (the chart
/// grants only `get` on them), only those a gateway names are read, one GET each (a Helm
/// release's Secret beside them is never read); at rest a reconcile (the resync) costs
/// those GETs and nothing else: no GET of the gateway or its Deployment, no list of pods,
/// no re-apply.
#[tokio::test]
async fn the_operator_reads_only_the_secrets_it_needs_and_is_quiet_at_rest() -> Result<()> {
    with_namespace("op-quiet", |client, ns| async move {
        install_crd(&client).await?;
        let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
        let unrelated: Secret = serde_json::from_value(json!({
            "metadata": { "name": "sh.helm.release.v1.other.v1" },
            "type": "helm.sh/release.v1",
            "stringData": { "release": "x".repeat(256 * 1024) }
        }))?;
        secrets.create(&PostParams::default(), &unrelated).await?;
        let (recording, log) = wsrelay_e2e::operator::recording_client().await?;
        let _operator = Operator::start(recording, &ns, None);
        let gw = create_example(&client, &ns).await?;
        let name = gw.name_any();
        let gws = Api::<WebsocketGateway>::namespaced(client.clone(), &ns);
        wait_for(&gws, &name, |g: Option<&WebsocketGateway>| {
            g.and_then(|g| condition(g, "Degraded"))
                .is_some_and(|c| c.status == "False")
        })
        .await?;

        let named = [
            format!("/api/v1/namespaces/{ns}/secrets/chat-jwt"),
            format!("/api/v1/namespaces/{ns}/secrets/chat-nats"),
        ];
        let by_name = |r: &wsrelay_e2e::operator::ApiRequest| {
            let path = r.path.split('?').next().unwrap_or_default();
            r.method == "GET" && !r.is_watch() && named.iter().any(|n| path == n)
        };
        let mut wrong = Vec::new();
        for r in log.take().iter().filter(|r| r.path.contains("/secrets")) {
            if !by_name(r) {
                wrong.push(format!("{} {} (Accept: {})", r.method, r.path, r.accept));
            }
        }
        assert!(wrong.is_empty(), "Secret requests beyond a GET of each named Secret:\n{}", wrong.join("\n"));

        // At rest: one resync period and a bit. Watches (long-running) and status writes
        // (the status may still move: pods come and go) do not count.
        let window = std::time::Duration::from_secs(75);
        tokio::time::sleep(window).await;
        let at_rest: Vec<_> = log.take().into_iter().filter(|r| !r.is_watch()).collect();
        let per_minute = at_rest.len() as f64 * 60.0 / window.as_secs_f64();
        eprintln!(
            "FIGURES: {} API requests by the operator in {window:?} at rest for 1 gateway ({per_minute:.1}/min): {:?}",
            at_rest.len(),
            at_rest.iter().map(|r| format!("{} {}", r.method, r.path)).collect::<Vec<_>>()
        );
        // A status write may still come (pods come and go), and with it an Event when a
        // condition's reason changes: this gateway's NATS URL is loopback, which its relay
        // pods on the node cannot reach, so they report NatsUnreachable once they run. Each
        // resync reads the named Secrets (that is how a rotation is noticed).
        let unexpected: Vec<_> = at_rest
            .iter()
            .filter(|r| !by_name(r))
            .filter(|r| !(r.method == "PATCH" && r.path.contains("/status")))
            .filter(|r| !(r.method == "POST" && r.path.contains("/events")))
            .map(|r| format!("{} {}", r.method, r.path))
            .collect();
        assert!(unexpected.is_empty(), "requests at rest: {unexpected:?}");
        Ok(())
    })
    .await
}

/// Runs `kubectl` with `args` (as `user` when given) and returns (success, stdout + stderr).
fn kubectl_as(user: Option<&str>, args: &[&str]) -> Result<(bool, String)> {
    let mut c = wsrelay_e2e::tools::kubectl();
    if let Some(user) = user {
        c.args(["--as", user]);
    }
    let out = c.args(args).output().context("running kubectl")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// The chart's tenancy policy (issue 23: a gateway author who cannot exceed their rights), on
/// a real API server: a user who may create gateways and may not read Secrets, impersonated
/// with `kubectl --as`, is refused each spec the namespace's tenant may not use, with the
/// policy's message, and may create what it may.
#[tokio::test]
async fn a_tenancy_policy_refuses_what_the_namespace_may_not_use() -> Result<()> {
    with_namespace("op-tenancy", |client, ns| async move {
        install_crd(&client).await?;
        // This namespace alone is the tenant: other tests' namespaces stay unrestricted.
        Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
            .patch(
                &ns,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"wsrelay.dev/tenant": ns}}})),
            )
            .await?;
        let dir = std::env::temp_dir().join(format!("wsrelay-e2e-{ns}"));
        std::fs::create_dir_all(&dir)?;
        let values = dir.join("values.json");
        std::fs::write(
            &values,
            json!({"tenancy": {"policy": {"enabled": true, "tenants": [{
                "name": "a",
                "namespaceSelector": {"matchLabels": {"wsrelay.dev/tenant": ns}},
                "natsUrls": ["nats://nats.tenant-a:4222"],
                "imagePrefixes": ["registry.example.com/wsrelay/"],
            }]}}})
            .to_string(),
        )?;
        // The chart's own template, rendered for this namespace (the release name makes the
        // cluster-scoped objects this test's own).
        let chart = wsrelay_e2e::repo_root().join("charts/wsrelay-operator");
        let mut helm = wsrelay_e2e::tools::helm();
        helm.args(["template", &ns])
            .arg(&chart)
            .args(["--namespace", &ns, "-f"])
            .arg(&values)
            .args(["--show-only", "templates/tenancy-policy.yaml"]);
        let rendered = wsrelay_e2e::tools::run(helm)?.stdout;
        let manifest = dir.join("policy.yaml");
        std::fs::write(&manifest, rendered)?;
        let manifest = manifest.to_string_lossy().into_owned();
        let outcome = async {
            let (ok, out) = kubectl_as(None, &["apply", "-f", &manifest])?;
            anyhow::ensure!(ok, "applying the policy: {out}");
            // The author: gateways yes, Secrets no.
            for args in [
                vec!["create", "role", "gateway-author", "-n", &ns, "--verb=create,get,list,update,patch", "--resource=websocketgateways.wsrelay.dev"],
                vec!["create", "rolebinding", "gateway-author", "-n", &ns, "--role=gateway-author", "--user=tenant-author"],
            ] {
                let (ok, out) = kubectl_as(None, &args)?;
                anyhow::ensure!(ok, "{args:?}: {out}");
            }
            let author = Some("tenant-author");
            let (ok, out) = kubectl_as(author, &["get", "secrets", "-n", &ns])?;
            assert!(!ok && out.contains("forbidden"), "the author reads no Secret: {out}");

            let mut allowed = valid()?;
            merge(
                &mut allowed,
                &json!({
                    "metadata": {"namespace": ns},
                    "spec": {
                        "nats": {"urls": ["nats://nats.tenant-a:4222"]},
                        "image": {"name": "registry.example.com/wsrelay/wsrelay:0.1.0"}
                    }
                }),
            );
            let try_create = |gw: &serde_json::Value| -> Result<(bool, String)> {
                let file = dir.join("gateway.json");
                std::fs::write(&file, gw.to_string())?;
                kubectl_as(
                    author,
                    &["create", "--dry-run=server", "-n", &ns, "-f", &file.to_string_lossy()],
                )
            };
            let cases: Vec<(&str, serde_json::Value, &str)> = vec![
                ("another NATS server",
                 json!({"spec": {"nats": {"urls": ["nats://attacker.example.com:4222"]}}}),
                 "may use only the NATS servers nats://nats.tenant-a:4222"),
                ("a listed server and another",
                 json!({"spec": {"nats": {"urls": ["nats://nats.tenant-a:4222", "nats://nats.tenant-a.attacker.example.com:4222"]}}}),
                 "may use only the NATS servers"),
                ("an image from another registry",
                 json!({"spec": {"image": {"name": "docker.io/attacker/relay:1"}}}),
                 "may run only images under registry.example.com/wsrelay/, not docker.io/attacker/relay:1"),
                ("a node selector",
                 json!({"spec": {"placement": {"nodeSelector": {"node-role.kubernetes.io/control-plane": ""}}}}),
                 "may not choose their nodes"),
                ("a toleration",
                 json!({"spec": {"placement": {"tolerations": [{"key": "dedicated", "operator": "Exists"}]}}}),
                 "may not choose their nodes"),
            ];
            // A new policy takes effect within seconds: wait for the first refusal.
            let (_, first, want) = &cases[0];
            let mut gw = allowed.clone();
            merge(&mut gw, first);
            eventually("the tenancy policy to take effect", || async {
                let (ok, out) = try_create(&gw)?;
                Ok((!ok && out.contains(want)).then_some(()))
            })
            .await?;
            for (what, patch, want) in &cases {
                let mut gw = allowed.clone();
                merge(&mut gw, patch);
                let (ok, out) = try_create(&gw)?;
                assert!(!ok, "{what}: accepted");
                assert!(out.contains(want), "{what}: {out}");
            }
            let (ok, out) = try_create(&allowed)?;
            assert!(ok, "what the tenant may use is accepted: {out}");
            Ok(())
        }
        .await;
        // The policy and its binding are cluster-scoped: they go whatever the outcome.
        let _ = kubectl_as(None, &["delete", "--ignore-not-found", "-f", &manifest]);
        let _ = std::fs::remove_dir_all(&dir);
        outcome
    })
    .await
}

/// With a required Secret label (`tenancy.secretLabel`), a gateway that names a Secret
/// without it is Degraded `SecretNotUsable` with a Warning Event, nothing is rolled out, and
/// labelling the Secret lets it recover.
#[tokio::test]
async fn a_secret_without_the_required_label_degrades_the_gateway() -> Result<()> {
    with_namespace("op-label", |client, ns| async move {
        install_crd(&client).await?;
        let label: wsrelay_operator::validate::SecretLabel = "wsrelay.dev/usable=true"
            .parse()
            .map_err(anyhow::Error::msg)?;
        let _operator = Operator::start_with(client.clone(), &ns, None, Some(label));
        let (secrets, gw) = example()?;
        let secret_api = Api::<Secret>::namespaced(client.clone(), &ns);
        // Every Secret labelled but the JWT key's.
        for mut s in secrets {
            s.metadata.resource_version = None;
            if s.name_any() != "chat-jwt" {
                s.labels_mut()
                    .insert("wsrelay.dev/usable".into(), "true".into());
            }
            secret_api.create(&PostParams::default(), &s).await?;
        }
        let gw = create_gateway(&client, &ns, &gw).await?;
        let name = gw.name_any();
        let gws = Api::<WebsocketGateway>::namespaced(client.clone(), &ns);
        let degraded = wait_for(&gws, &name, |g: Option<&WebsocketGateway>| {
            g.and_then(|g| condition(g, "Degraded"))
                .is_some_and(|c| c.status == "True")
        })
        .await?;
        let c = condition(&degraded, "Degraded").context("Degraded")?;
        assert_eq!(c.reason, "SecretNotUsable", "{}", c.message);
        assert!(
            c.message
                .contains("Secret chat-jwt lacks the label wsrelay.dev/usable=true"),
            "{}",
            c.message
        );
        eventually("a SecretNotUsable Event", || async {
            let e = events_for(&client, &ns, &name, "SecretNotUsable").await?;
            Ok((!e.is_empty()).then_some(()))
        })
        .await?;
        assert!(
            get::<Deployment>(&client, &ns, &name).await?.is_none(),
            "nothing is rolled out with a Secret it may not use"
        );
        // Its owner labels it: the gateway recovers at the operator's next look.
        secret_api
            .patch(
                "chat-jwt",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"wsrelay.dev/usable": "true"}}})),
            )
            .await?;
        wait_for(&gws, &name, |g: Option<&WebsocketGateway>| {
            g.and_then(|g| condition(g, "Degraded"))
                .is_some_and(|c| c.status == "False")
        })
        .await?;
        assert!(get::<Deployment>(&client, &ns, &name).await?.is_some());
        Ok(())
    })
    .await
}

/// Deletes the test's ValidatingWebhookConfiguration on drop, pass, fail or panic: it is
/// cluster-scoped, so the namespace's deletion does not take it along. (Should even this
/// fail, it matches only the test's namespace, which is deleted.)
struct WebhookGuard(String);

impl Drop for WebhookGuard {
    fn drop(&mut self) {
        match kubectl_as(
            None,
            &[
                "delete",
                "validatingwebhookconfiguration",
                &self.0,
                "--ignore-not-found",
                "--wait=false",
                "--request-timeout=20s",
            ],
        ) {
            Ok((true, _)) => {}
            Ok((false, out)) => eprintln!("deleting webhook configuration {}: {out}", self.0),
            Err(e) => eprintln!("deleting webhook configuration {}: {e}", self.0),
        }
    }
}

/// Issue 25: a rule that does not compile is refused by `kubectl apply`, with its path and
/// position, by the operator's admission webhook (run in-process at the address where the
/// kube-apiserver reaches this machine, `callback_ip`), registered for this test's namespace only; a good
/// rule is accepted; an update to a bad rule is refused too.
// Multi-threaded: the test runs `kubectl` as a blocking child process while the API server
// calls the webhook served by this same process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_refuses_a_rule_that_does_not_compile_with_its_position() -> Result<()> {
    use wsrelay_operator::webhook::{self, server::WebhookConfig};

    with_namespace("op-hook", |client, ns| async move {
        install_crd(&client).await?;
        let dir = std::env::temp_dir().join(format!("wsrelay-e2e-{ns}"));
        std::fs::create_dir_all(&dir)?;
        wsrelay_e2e::pki::ca(&dir, "ca", "wsrelay-e2e-webhook-ca")?;
        let ip = wsrelay_e2e::callback_ip()?;
        wsrelay_e2e::pki::leaf(
            &dir,
            "tls",
            "ca",
            &ip.to_string(),
            &wsrelay_e2e::pki::server_ext(&format!("IP:{ip}")),
        )?;
        let ca_bundle = k8s_openapi::ByteString(std::fs::read(dir.join("ca.crt"))?);

        let listener = tokio::net::TcpListener::bind((ip, 0)).await?;
        let addr = listener.local_addr()?;
        let shutdown = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(webhook::server::serve_on(
            listener,
            WebhookConfig::new(addr, &dir),
            shutdown.clone(),
        ));

        // Registered as the chart registers it, but by URL, for this namespace alone.
        let name = format!("wsrelay-e2e-{ns}");
        let registration = json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": name},
            "webhooks": [{
                "name": "websocketgateways.wsrelay.dev",
                "clientConfig": {
                    "url": format!("https://{addr}{}", webhook::PATH),
                    "caBundle": ca_bundle,
                },
                "rules": [{
                    "apiGroups": ["wsrelay.dev"],
                    "apiVersions": ["*"],
                    "resources": ["websocketgateways"],
                    "operations": ["CREATE", "UPDATE"],
                    "scope": "Namespaced",
                }],
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                "failurePolicy": "Fail",
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "timeoutSeconds": 5,
            }],
        });
        let _guard = WebhookGuard(name.clone());
        let file = dir.join("webhook.json");
        std::fs::write(&file, registration.to_string())?;
        let (ok, out) = kubectl_as(None, &["apply", "-f", &file.to_string_lossy()])?;
        anyhow::ensure!(ok, "registering the webhook: {out}");

        let with_rule = |rule: &str| -> Result<String> {
            let mut gw = valid()?;
            merge(
                &mut gw,
                &json!({"metadata": {"name": "rooms", "namespace": ns}}),
            );
            gw["spec"]["bindings"] = json!([{
                "channel": "rooms.{room}",
                "subject": "chat.rooms.{room}",
                "direction": "Both",
                "authorize": {"rule": rule},
            }]);
            let file = dir.join("gateway.json");
            std::fs::write(&file, gw.to_string())?;
            Ok(file.to_string_lossy().into_owned())
        };
        let bad = with_rule("vars.room in claims.rooms ||")?;
        // The API server picks up a new webhook configuration within seconds; until then a
        // server-side dry run is accepted (and stores nothing).
        eventually("the webhook to take effect", || async {
            let (ok, out) = kubectl_as(None, &["apply", "--dry-run=server", "-f", &bad])?;
            anyhow::ensure!(
                !out.contains("unknown field"),
                "the CRD has no authorize field yet: {out}"
            );
            Ok((!ok && out.contains("denied the request")).then_some(()))
        })
        .await?;
        let (ok, out) = kubectl_as(None, &["apply", "-f", &bad])?;
        assert!(!ok, "a rule that does not compile was accepted: {out}");
        assert!(
            out.contains("spec.bindings[0].authorize.rule: line 1, column "),
            "{out}"
        );

        let good = with_rule("vars.room in claims.rooms || 'admin' in claims.roles")?;
        let (ok, out) = kubectl_as(None, &["apply", "-f", &good])?;
        assert!(ok, "a good rule is accepted: {out}");
        // An update to a bad rule (the UPDATE path) is refused, and the good one stays.
        let bad = with_rule("claims.rooms.exists(r, rooom == r)")?;
        let (ok, out) = kubectl_as(None, &["apply", "-f", &bad])?;
        assert!(!ok, "an update to a bad rule was accepted: {out}");
        assert!(
            out.contains("spec.bindings[0].authorize.rule: line 1, column ")
                && out.contains("undeclared reference to \"rooom\""),
            "{out}"
        );
        let stored = Api::<kube::api::DynamicObject>::namespaced_with(
            client.clone(),
            &ns,
            &kube::api::ApiResource::erase::<WebsocketGateway>(&()),
        )
        .get("rooms")
        .await?;
        assert_eq!(
            stored.data["spec"]["bindings"][0]["authorize"]["rule"],
            "vars.room in claims.rooms || 'admin' in claims.roles"
        );

        shutdown.cancel();
        server.await??;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    })
    .await
}
