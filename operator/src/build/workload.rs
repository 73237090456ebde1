//! ServiceAccount, ConfigMap and Deployment: the relay pods and what they read.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use serde_json::{Value, json};

use super::config::{SECRETS_DIR, TLS_DIR};
use super::{
    ADMIN_PORT, CLIENT_PORT, CONFIG_FILE, CONFIG_HASH_ANNOTATION, CONFIG_KEY, Ctx,
    TERMINATION_SLACK_SECONDS, from_json,
};
use crate::api::{PullPolicy, WebsocketGateway};

/// UID and GID the relay runs as (the distroless `nonroot` user), so `runAsNonRoot` holds
/// whatever the image declares.
const RELAY_UID: i64 = 65532;

pub(super) fn service_account(ctx: &Ctx) -> ServiceAccount {
    ServiceAccount {
        metadata: ctx.meta(),
        // The relay never talks to the Kubernetes API: no token in its pods.
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    }
}

pub(super) fn config_map(ctx: &Ctx, rendered: String) -> ConfigMap {
    ConfigMap {
        metadata: ctx.meta(),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), rendered)])),
        ..ConfigMap::default()
    }
}

pub(super) fn deployment(ctx: &Ctx, gw: &WebsocketGateway, config_hash: &str) -> Deployment {
    let spec = &gw.spec;

    let mut pod_labels = spec.placement.pod_labels.clone();
    pod_labels.extend(ctx.labels());

    let mut pod_annotations = spec.placement.pod_annotations.clone();
    pod_annotations.insert(CONFIG_HASH_ANNOTATION.to_string(), config_hash.to_string());
    pod_annotations.insert(
        "kubectl.kubernetes.io/default-container".to_string(),
        "relay".to_string(),
    );

    // The config, a writable /tmp (the root filesystem is read-only), each referenced Secret
    // as a directory of files, and the serving certificate.
    let mut volumes = vec![
        json!({ "name": "config", "configMap": { "name": ctx.name } }),
        json!({ "name": "tmp", "emptyDir": { "sizeLimit": "16Mi" } }),
    ];
    let mut mounts = vec![
        json!({ "name": "config", "mountPath": "/etc/wsrelay/config", "readOnly": true }),
        json!({ "name": "tmp", "mountPath": "/tmp" }),
    ];
    for (i, secret) in crate::validate::mounted_secret_names(gw).iter().enumerate() {
        // Volume names are DNS labels (63 chars); Secret names may be longer, so index them.
        let volume = format!("secret-{i}");
        volumes.push(json!({
            "name": volume,
            "secret": { "secretName": secret, "defaultMode": 0o440 }
        }));
        mounts.push(json!({
            "name": volume,
            "mountPath": format!("{SECRETS_DIR}/{secret}"),
            "readOnly": true
        }));
    }
    if let Some(tls) = &spec.tls {
        volumes.push(json!({
            "name": "tls",
            "secret": { "secretName": tls.secret_name, "defaultMode": 0o440 }
        }));
        mounts.push(json!({ "name": "tls", "mountPath": TLS_DIR, "readOnly": true }));
    }

    let pull_policy = match spec.image.pull_policy {
        PullPolicy::IfNotPresent => "IfNotPresent",
        PullPolicy::Always => "Always",
        PullPolicy::Never => "Never",
    };
    let probe = |path: &str, period: i32, failures: i32| {
        json!({
            "httpGet": { "path": path, "port": "admin" },
            "periodSeconds": period,
            "failureThreshold": failures,
            "timeoutSeconds": 2
        })
    };
    let container = json!({
        "name": "relay",
        "image": spec.image.name,
        "imagePullPolicy": pull_policy,
        "args": ["run", "--config", CONFIG_FILE],
        "ports": [
            { "name": "ws", "containerPort": CLIENT_PORT, "protocol": "TCP" },
            { "name": "admin", "containerPort": ADMIN_PORT, "protocol": "TCP" }
        ],
        "env": [{ "name": "RUST_LOG", "value": "info" }],
        "livenessProbe": probe("/live", 10, 3),
        // Readiness flips false first thing on SIGTERM, so the Service stops sending new
        // clients to a draining pod.
        "readinessProbe": probe("/ready", 2, 1),
        "startupProbe": probe("/live", 1, 30),
        "resources": spec.resources.clone().unwrap_or_default(),
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": RELAY_UID,
            "runAsGroup": RELAY_UID,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": { "drop": ["ALL"] },
            "seccompProfile": { "type": "RuntimeDefault" }
        },
        "volumeMounts": mounts
    });

    let topology: Value = if spec.placement.topology_spread_constraints.is_empty() {
        // Losing one node should cost a fraction of the clients, not all of them.
        json!([{
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": { "matchLabels": super::selector_labels(&ctx.name) }
        }])
    } else {
        json!(spec.placement.topology_spread_constraints)
    };

    let mut pod_spec = json!({
        "serviceAccountName": ctx.name,
        "automountServiceAccountToken": false,
        // The drain, then the wait for resumes of the connections it closed
        // (`events.graceSeconds`), then the rest of the shutdown.
        "terminationGracePeriodSeconds":
            i64::from(spec.drain.grace_period_seconds)
                + spec.events.as_ref().map_or(0, |e| i64::from(e.grace_seconds))
                + TERMINATION_SLACK_SECONDS,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": RELAY_UID,
            "runAsGroup": RELAY_UID,
            "fsGroup": RELAY_UID,
            "seccompProfile": { "type": "RuntimeDefault" }
        },
        "containers": [container],
        "volumes": volumes,
        "topologySpreadConstraints": topology
    });
    if !spec.placement.node_selector.is_empty() {
        pod_spec["nodeSelector"] = json!(spec.placement.node_selector);
    }
    if !spec.placement.tolerations.is_empty() {
        pod_spec["tolerations"] = json!(spec.placement.tolerations);
    }
    if let Some(affinity) = &spec.placement.affinity {
        pod_spec["affinity"] = json!(affinity);
    }

    let mut deploy_spec = json!({
        "selector": { "matchLabels": super::selector_labels(&ctx.name) },
        // Replace one pod at a time and never lose capacity: each replaced pod drains its
        // clients, who reconnect to the others.
        "strategy": {
            "type": "RollingUpdate",
            "rollingUpdate": { "maxUnavailable": 0, "maxSurge": 1 }
        },
        "revisionHistoryLimit": 5,
        "template": {
            "metadata": { "labels": pod_labels, "annotations": pod_annotations },
            "spec": pod_spec
        }
    });
    // With autoscaling the HPA owns the replica count; naming it here would fight it.
    if spec.autoscaling.is_none() {
        deploy_spec["replicas"] = json!(spec.replicas.unwrap_or(2));
    }

    let mut deployment: Deployment = from_json(json!({ "spec": deploy_spec }));
    deployment.metadata = ctx.meta();
    deployment
}
