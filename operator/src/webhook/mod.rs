//! The validating admission webhook: refuses a WebsocketGateway whose `authorize.rule` does
//! not compile, with the rule's path and the position of the fault, at `kubectl apply`.
//!
//! The CRD's own validation cannot compile a CEL string the user wrote, so the API server
//! asks the operator ([`server`], HTTPS). [`review`] is the decision and is pure: it reads
//! the raw object JSON, so it needs nothing but the object the API server sends. Anything it
//! cannot read is allowed: the CRD schema is the API server's business, and the operator's
//! validate stage refuses a bad rule again (as a condition) when the webhook is not there.

pub mod server;

use std::collections::HashSet;

use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use serde_json::Value;

use crate::api::GROUP;

/// The path the API server posts AdmissionReviews to.
pub const PATH: &str = "/validate-websocketgateway";

/// Decides one admission request: CREATE and UPDATE of a WebsocketGateway are denied when
/// one of its rules does not compile, every fault on its own line; anything else passes.
pub fn review(request: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
    let response = AdmissionResponse::from(request);
    if request.kind.group != GROUP || request.kind.kind != "WebsocketGateway" {
        return response;
    }
    let old = match request.operation {
        Operation::Create => None,
        Operation::Update => request.old_object.as_ref(),
        Operation::Delete | Operation::Connect => return response,
    };
    let Some(object) = &request.object else {
        return response;
    };
    // Ratcheting, as the API server does for CEL rules in a CRD: a rule the stored object
    // already has is not judged again, so an object stored before this webhook (or before a
    // stricter compiler) can still be labelled, annotated or have another binding fixed.
    let unchanged: HashSet<&str> = old
        .map(|o| rules(&o.data).map(|(_, r)| r).collect())
        .unwrap_or_default();
    let faults: Vec<String> = rules(&object.data)
        .filter(|(_, rule)| !unchanged.contains(rule))
        .filter_map(|(i, rule)| {
            wsrelay_config::rule::compile(rule)
                .err()
                .map(|e| format!("spec.bindings[{i}].authorize.rule: {e}"))
        })
        .collect();
    if faults.is_empty() {
        return response;
    }
    // No code or reason: the API server answers 400 with "admission webhook
    // "websocketgateways.wsrelay.dev" denied the request: " and the message, which kubectl
    // prints as it is.
    response.deny(faults.join("\n"))
}

/// Every `spec.bindings[i].authorize.rule` that is a string, with its binding's index.
fn rules(data: &Value) -> impl Iterator<Item = (usize, &str)> {
    data.pointer("/spec/bindings")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, b)| b.pointer("/authorize/rule")?.as_str().map(|r| (i, r)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::admission::AdmissionReview;
    use serde_json::json;

    /// An AdmissionRequest as the API server sends it (admission.k8s.io/v1).
    fn request(
        operation: &str,
        object: Value,
        old: Option<Value>,
    ) -> AdmissionRequest<DynamicObject> {
        let review: AdmissionReview<DynamicObject> = serde_json::from_value(json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "wsrelay.dev", "version": "v1alpha1", "kind": "WebsocketGateway"},
                "resource": {"group": "wsrelay.dev", "version": "v1alpha1", "resource": "websocketgateways"},
                "name": "chat",
                "namespace": "apps",
                "operation": operation,
                "userInfo": {"username": "admin"},
                "object": object,
                "oldObject": old,
                "dryRun": false,
            }
        }))
        .expect("an AdmissionReview");
        review.try_into().expect("a request")
    }

    fn gateway(rules: &[Option<&str>]) -> Value {
        let bindings: Vec<Value> = rules
            .iter()
            .enumerate()
            .map(|(i, rule)| {
                let mut b = json!({"channel": format!("c{i}.{{room}}"), "subject": format!("c{i}.{{room}}"), "subscribe": true});
                if let Some(rule) = rule {
                    b["authorize"] = json!({"rule": rule});
                }
                b
            })
            .collect();
        json!({
            "apiVersion": "wsrelay.dev/v1alpha1",
            "kind": "WebsocketGateway",
            "metadata": {"name": "chat", "namespace": "apps"},
            "spec": {"nats": {"urls": ["nats://nats:4222"]}, "bindings": bindings},
        })
    }

    #[test]
    fn good_rules_and_no_rules_are_allowed_with_the_request_uid() {
        let req = request(
            "CREATE",
            gateway(&[
                None,
                Some("vars.room in claims.rooms || 'admin' in claims.roles"),
            ]),
            None,
        );
        let resp = review(&req);
        assert!(resp.allowed, "{:?}", resp.result);
        assert_eq!(resp.uid, "705ab4f5-6393-11e8-b7cc-42010a800002");
    }

    #[test]
    fn every_rule_that_does_not_compile_is_named_with_its_position() {
        let req = request(
            "CREATE",
            gateway(&[
                Some("vars.room in claims.rooms ||"),
                Some("true"),
                Some("vars.room == rooom"),
            ]),
            None,
        );
        let resp = review(&req);
        assert!(!resp.allowed);
        let lines: Vec<&str> = resp.result.message.lines().collect();
        assert_eq!(lines.len(), 2, "{}", resp.result.message);
        assert!(
            lines[0].starts_with("spec.bindings[0].authorize.rule: line 1, column "),
            "{}",
            lines[0]
        );
        assert_eq!(
            lines[1],
            "spec.bindings[2].authorize.rule: line 1, column 14: undeclared reference to \"rooom\" (a rule may use claims, vars, channel, op)"
        );
        // The response carries the request's uid, as the API server requires.
        let review = resp.into_review();
        let body = serde_json::to_value(&review).expect("serializes");
        assert_eq!(
            body["response"]["uid"],
            "705ab4f5-6393-11e8-b7cc-42010a800002"
        );
        assert_eq!(body["response"]["allowed"], false);
    }

    #[test]
    fn an_update_is_judged_on_its_new_rules_only() {
        let bad = "claims.rooms.exists(r, claims.rooms.exists(s, r == s))";
        assert!(
            wsrelay_config::rule::compile(bad).is_err(),
            "nested comprehension"
        );
        // Stored before the webhook: a label change, or fixing another binding, passes.
        let stored = gateway(&[Some(bad), Some("true ||")]);
        let req = request(
            "UPDATE",
            gateway(&[Some(bad), Some("true")]),
            Some(stored.clone()),
        );
        assert!(review(&req).allowed);
        // A new bad rule does not.
        let req = request("UPDATE", gateway(&[Some(bad), Some("op ==")]), Some(stored));
        let resp = review(&req);
        assert!(!resp.allowed);
        assert!(
            resp.result
                .message
                .starts_with("spec.bindings[1].authorize.rule: line 1, column "),
            "{}",
            resp.result.message
        );
        assert_eq!(resp.result.message.lines().count(), 1);
    }

    #[test]
    fn what_it_cannot_read_or_does_not_judge_is_allowed() {
        // The schema is the API server's business: odd shapes pass here.
        for object in [
            json!({"apiVersion": "wsrelay.dev/v1alpha1", "kind": "WebsocketGateway", "metadata": {"name": "chat"}}),
            json!({"apiVersion": "wsrelay.dev/v1alpha1", "kind": "WebsocketGateway", "metadata": {"name": "chat"}, "spec": {"bindings": "x"}}),
            json!({"apiVersion": "wsrelay.dev/v1alpha1", "kind": "WebsocketGateway", "metadata": {"name": "chat"}, "spec": {"bindings": [{"authorize": {"rule": 7}}, 3]}}),
        ] {
            assert!(review(&request("CREATE", object, None)).allowed);
        }
        // A DELETE carries the old object only; never judged.
        let req = request("DELETE", Value::Null, Some(gateway(&[Some("true ||")])));
        assert!(review(&req).allowed);
        // Another kind is not this webhook's business.
        let mut req = request("CREATE", gateway(&[Some("true ||")]), None);
        req.kind.kind = "ConfigMap".to_string();
        req.kind.group = String::new();
        assert!(review(&req).allowed);
    }
}
