//! The `WebsocketGateway` API (`wsrelay.dev/v1alpha1`), defined once here; the CRD YAML in
//! `crds/` is generated from these types, never edited by hand.
//!
//! Validation that needs no cluster state lives in the schema itself (OpenAPI constraints and
//! CEL rules), so the API server refuses a bad gateway before the operator ever sees it.
//! Bounds on every list and string (maxItems/maxLength) are there for two reasons: they
//! are sane limits, and the API server refuses CEL rules whose estimated cost is unbounded.

mod docs;
mod spec;
mod status;

pub use docs::crd_markdown;

pub use spec::*;
pub use status::*;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, ValidationRule,
};
use kube::CustomResourceExt;

/// The API group of every wsrelay resource.
pub const GROUP: &str = "wsrelay.dev";

/// The CEL rule on `metadata.name`: every child object carries the gateway's name, and the
/// strictest of them is the Service (an RFC 1035 label: the cluster DNS name of the
/// endpoint) and the pods' `app.kubernetes.io/instance` label value (63 characters). A
/// custom resource name may be any DNS subdomain (`chat.v2`), which would be accepted and
/// then fail at every reconcile.
pub const NAME_RULE: &str =
    "size(self.metadata.name) <= 63 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')";
/// What the API server answers when [`NAME_RULE`] refuses a name.
pub const NAME_RULE_MESSAGE: &str = "metadata.name must be a DNS label (at most 63 lowercase letters, digits and '-', starting with a letter and ending with a letter or digit, so no '.'): it also names the gateway's Service and labels its pods, which allow nothing else";

/// The `WebsocketGateway` CRD: the derived one plus the rules the derive cannot place, at
/// the top level of the schema (on `metadata.name`).
pub fn crd() -> CustomResourceDefinition {
    let mut crd = WebsocketGateway::crd();
    for version in &mut crd.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            schema.x_kubernetes_validations = Some(vec![ValidationRule {
                rule: NAME_RULE.to_string(),
                message: Some(NAME_RULE_MESSAGE.to_string()),
                reason: Some("FieldValueInvalid".to_string()),
                ..ValidationRule::default()
            }]);
            // `kubectl explain` prints descriptions as they are: reflow the doc comments'
            // source line breaks, keep their paragraphs and list items.
            if let Ok(mut value) = serde_json::to_value(&*schema) {
                reflow_descriptions(&mut value);
                if let Ok(reflowed) = serde_json::from_value(value) {
                    *schema = reflowed;
                }
            }
        }
    }
    crd
}

/// Rewrites every `description` string under `v` with [`reflow`].
fn reflow_descriptions(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            for (key, child) in map.iter_mut() {
                match child {
                    serde_json::Value::String(text) if key == "description" => {
                        *text = reflow(text);
                    }
                    other => reflow_descriptions(other),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(reflow_descriptions),
        _ => {}
    }
}

/// One line per paragraph (paragraphs stay apart by a blank line) and per list item (a line
/// starting with `- `, `* ` or `1. `): the reader's terminal wraps, not the source file.
pub fn reflow(text: &str) -> String {
    let mut paragraphs: Vec<String> = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let flush = |current: &mut Vec<String>, paragraphs: &mut Vec<String>| {
        if !current.is_empty() {
            paragraphs.push(current.join("\n"));
            current.clear();
        }
    };
    for line in text.lines().map(str::trim) {
        if line.is_empty() {
            flush(&mut current, &mut paragraphs);
            continue;
        }
        let item = line.starts_with("- ")
            || line.starts_with("* ")
            || line
                .split_once(". ")
                .is_some_and(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
        match current.last_mut() {
            Some(last) if !item => {
                last.push(' ');
                last.push_str(line);
            }
            _ => current.push(line.to_string()),
        }
    }
    flush(&mut current, &mut paragraphs);
    paragraphs.join("\n\n")
}

/// The CRD of `WebsocketGateway` as YAML, exactly as `wsrelay-operator crd` prints it and
/// `crds/websocketgateways.wsrelay.dev.yaml` holds it.
pub fn crd_yaml() -> String {
    let crd = crd();
    // A CRD always serialises; failing here would be a bug in the derive, not a user error.
    let body = serde_yaml::to_string(&crd).expect("a CRD serialises to YAML");
    format!(
        "# Generated by `wsrelay-operator crd` from operator/src/api. Do not edit by hand:\n\
         # regenerate with `cargo run -p wsrelay-operator -- crd > crds/websocketgateways.wsrelay.dev.yaml`.\n\
         {body}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `make test` runs this: the committed CRD must be what the code generates.
    #[test]
    fn committed_crd_matches_the_generated_one() {
        let committed = include_str!("../../../crds/websocketgateways.wsrelay.dev.yaml");
        assert!(
            committed == crd_yaml(),
            "crds/websocketgateways.wsrelay.dev.yaml is stale: regenerate it with \
             `cargo run -p wsrelay-operator -- crd > crds/websocketgateways.wsrelay.dev.yaml`"
        );
    }

    #[test]
    fn committed_crd_reference_matches_the_generated_one() {
        let committed = include_str!("../../../docs/crd.md");
        assert!(
            committed == crd_markdown(),
            "docs/crd.md is stale: regenerate it with \
             `cargo run -p wsrelay-operator -- crd --markdown > docs/crd.md`"
        );
    }

    #[test]
    fn crd_has_scale_status_and_short_name() {
        let crd = crd();
        assert_eq!(crd.spec.names.short_names, Some(vec!["wsgw".to_string()]));
        let version = &crd.spec.versions[0];
        let sub = version.subresources.as_ref().expect("subresources");
        assert!(sub.status.is_some());
        let scale = sub.scale.as_ref().expect("scale subresource");
        assert_eq!(
            scale.label_selector_path.as_deref(),
            Some(".status.selector")
        );
        let columns: Vec<_> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            columns,
            [
                "Ready",
                "Desired",
                "Pods-Ready",
                "Connections",
                "Degraded",
                "Endpoint",
                "Age"
            ]
        );
    }

    #[test]
    fn descriptions_are_reflowed_paragraphs() {
        assert_eq!(
            reflow(
                "Each channel may be\nbound once.\n\nSecond\n  paragraph:\n- one\n- two\n  wrapped"
            ),
            "Each channel may be bound once.\n\nSecond paragraph:\n- one\n- two wrapped"
        );
        let yaml = crd_yaml();
        let doc: serde_json::Value = serde_yaml::from_str(&yaml).expect("yaml");
        let bindings = &doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["bindings"]["description"];
        assert_eq!(
            bindings,
            "The client-facing channels and the NATS subjects behind them. Each channel may be bound once."
        );
    }

    /// The rule sits on the root, where CEL may read metadata.name (the e2e suite checks
    /// that the API server refuses `chat.v2` with the message).
    #[test]
    fn the_name_rule_is_on_the_top_level_schema() {
        let yaml = crd_yaml();
        let doc: serde_json::Value = serde_yaml::from_str(&yaml).expect("yaml");
        let rules =
            &doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["x-kubernetes-validations"];
        assert_eq!(rules[0]["rule"], NAME_RULE);
        assert!(NAME_RULE_MESSAGE.contains("DNS label"));
    }

    /// The subject prefixes are bounded so that, with `.<namespace>.<name>` appended, the
    /// relay takes them; the duplicate window's rule assumes the registry's default lease
    /// when `spec.registry` is unset.
    #[test]
    fn the_events_rules_agree_with_the_code() {
        let yaml = crd_yaml();
        let doc: serde_json::Value = serde_yaml::from_str(&yaml).expect("yaml");
        let spec = &doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        for section in ["events", "control"] {
            let subject = &spec["properties"][section]["properties"]["subject"];
            assert_eq!(
                subject["maxLength"],
                serde_json::json!(MAX_PREFIX_SUBJECT_LEN),
                "{section}"
            );
        }
        let lease = RegistrySpec::default().lease_seconds;
        let rules = spec["x-kubernetes-validations"]
            .as_array()
            .expect("rules on the spec");
        let window = rules
            .iter()
            .filter_map(|r| r["rule"].as_str())
            .find(|r| r.contains("duplicateWindowSeconds"))
            .expect("the duplicate window's rule");
        assert!(
            window.contains(&format!("self.registry.leaseSeconds : {lease})")),
            "{window}"
        );
    }

    #[test]
    fn conditions_are_a_list_map_keyed_by_type() {
        let yaml = crd_yaml();
        let doc: serde_json::Value = serde_yaml::from_str(&yaml).expect("yaml");
        let conditions = &doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
            ["properties"]["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"], "map");
        assert_eq!(
            conditions["x-kubernetes-list-map-keys"],
            serde_json::json!(["type"])
        );
    }
}
