//! The `custom.metrics.k8s.io` wire format and URL layout: pure functions from a path to a
//! route, and from scraped values to the JSON documents the API server and the HPA expect.

use axum::http;
use serde_json::{Value, json};

/// The API group served.
pub const GROUP: &str = "custom.metrics.k8s.io";
/// Served versions, preferred first (the HPA controller prefers v1beta2).
pub const VERSIONS: &[&str] = &["v1beta2", "v1beta1"];

/// What a request asks for, decided from its method and path alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/healthz`, `/livez`, `/readyz` (and their `/...` sub-checks): no authentication, so
    /// probes work; they reveal nothing.
    Health,
    /// `/apis`: the group list.
    GroupList,
    /// `/apis/custom.metrics.k8s.io`: the group.
    Group,
    /// `/apis/custom.metrics.k8s.io/{version}`: the resource list (discovery).
    Discovery { version: &'static str },
    /// `/openapi/v2` or `/openapi/v3[/...]`: the aggregator merges these into its own.
    OpenApi { v3: bool, path: String },
    /// `/metrics`: this server's own scrape counters.
    Metrics,
    /// `/apis/custom.metrics.k8s.io/{version}/namespaces/{ns}/{resource}/{name}/{metric}`:
    /// `name` is None for `*` (every object the label selector matches).
    Values {
        version: &'static str,
        namespace: String,
        resource: String,
        name: Option<String>,
        metric: String,
    },
    /// Anything else (404), including cluster-scoped metric paths, which are not served.
    NotFound,
}

impl Route {
    /// Parses a GET request's path (without the query). Only GET is ever served.
    pub fn parse(method: &http::Method, path: &str) -> Route {
        if method != http::Method::GET {
            return Route::NotFound;
        }
        // Clients may escape segments (kubectl sends `*` as `%2A`); the API server passes
        // the path on as it came.
        let decoded: Vec<String> = path
            .trim_end_matches('/')
            .split('/')
            .skip(1)
            .map(percent_decode)
            .collect();
        let segments: Vec<&str> = decoded.iter().map(String::as_str).collect();
        match segments.as_slice() {
            ["healthz" | "livez" | "readyz", ..] => Route::Health,
            ["metrics"] => Route::Metrics,
            ["openapi", "v2"] => Route::OpenApi {
                v3: false,
                path: path.to_string(),
            },
            ["openapi", "v3", ..] => Route::OpenApi {
                v3: true,
                path: path.to_string(),
            },
            ["apis"] => Route::GroupList,
            ["apis", GROUP] => Route::Group,
            ["apis", GROUP, version] => match known_version(version) {
                Some(version) => Route::Discovery { version },
                None => Route::NotFound,
            },
            [
                "apis",
                GROUP,
                version,
                "namespaces",
                ns,
                resource,
                name,
                metric,
            ] => match known_version(version) {
                Some(version) if !ns.is_empty() && !name.is_empty() => Route::Values {
                    version,
                    namespace: (*ns).to_string(),
                    resource: (*resource).to_string(),
                    name: (*name != "*").then(|| (*name).to_string()),
                    metric: (*metric).to_string(),
                },
                _ => Route::NotFound,
            },
            _ => Route::NotFound,
        }
    }

    /// What delegated authorization is asked about (None: no authorization, only health).
    /// Mirrors how a Kubernetes API server derives request attributes, so RBAC rules written
    /// for other metrics adapters (resources `*` in `custom.metrics.k8s.io`) apply unchanged.
    pub fn attributes(&self, path: &str) -> Option<Attributes> {
        match self {
            Route::Health => None,
            Route::Values {
                version,
                namespace,
                resource,
                name,
                metric,
            } => Some(Attributes::Resource {
                verb: "get",
                group: GROUP,
                version,
                resource: resource.clone(),
                subresource: metric.clone(),
                namespace: namespace.clone(),
                name: name.clone().unwrap_or_else(|| "*".to_string()),
            }),
            _ => Some(Attributes::NonResource {
                verb: "get",
                path: path.to_string(),
            }),
        }
    }
}

fn known_version(v: &str) -> Option<&'static str> {
    VERSIONS.iter().copied().find(|known| *known == v)
}

/// The attributes of one request, as a SubjectAccessReview carries them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Attributes {
    Resource {
        verb: &'static str,
        group: &'static str,
        version: &'static str,
        resource: String,
        subresource: String,
        namespace: String,
        name: String,
    },
    NonResource {
        verb: &'static str,
        path: String,
    },
}

/// One scraped value of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodValue {
    pub name: String,
    pub value: i64,
    /// RFC 3339 time of the scrape.
    pub timestamp: String,
}

/// The discovery document of a version: one resource per served metric.
pub fn resource_list(version: &str, metric: &str) -> Value {
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": format!("{GROUP}/{version}"),
        "resources": [{
            "name": format!("pods/{metric}"),
            "singularName": "",
            "namespaced": true,
            "kind": "MetricValueList",
            "verbs": ["get"]
        }]
    })
}

/// The group, as `/apis/{group}` and `/apis` list it.
pub fn group() -> Value {
    let versions: Vec<Value> = VERSIONS
        .iter()
        .map(|v| json!({ "groupVersion": format!("{GROUP}/{v}"), "version": v }))
        .collect();
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": GROUP,
        "versions": versions,
        "preferredVersion": versions[0]
    })
}

/// `/apis`: this server serves one group.
pub fn group_list() -> Value {
    json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": [group()] })
}

/// A MetricValueList in `version`'s shape (v1beta2 nests the name under `metric`, v1beta1
/// has `metricName`). Pods are listed in the order given.
pub fn value_list(version: &str, namespace: &str, metric: &str, values: &[PodValue]) -> Value {
    let items: Vec<Value> = values
        .iter()
        .map(|v| {
            let described = json!({
                "kind": "Pod",
                "namespace": namespace,
                "name": v.name,
                "apiVersion": "/v1"
            });
            if version == "v1beta1" {
                json!({
                    "describedObject": described,
                    "metricName": metric,
                    "timestamp": v.timestamp,
                    "value": v.value.to_string()
                })
            } else {
                json!({
                    "describedObject": described,
                    "metric": { "name": metric },
                    "timestamp": v.timestamp,
                    "value": v.value.to_string()
                })
            }
        })
        .collect();
    json!({
        "kind": "MetricValueList",
        "apiVersion": format!("{GROUP}/{version}"),
        "metadata": {},
        "items": items
    })
}

/// A Kubernetes `Status` failure document (what kubectl and client-go understand).
pub fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code
    })
}

/// A minimal OpenAPI document: the aggregator fetches one from every APIService and only
/// needs it to parse. Metric values are not objects with a schema worth publishing.
pub fn openapi(v3: bool) -> Value {
    if v3 {
        json!({ "paths": {} })
    } else {
        json!({
            "swagger": "2.0",
            "info": { "title": "wsrelay custom metrics", "version": "v1beta2" },
            "paths": {}
        })
    }
}

/// Decodes `%XX` escapes (and, in query strings, `+` as a space). Used for query values and
/// for the keys of `X-Remote-Extra-` headers, which the proxy percent-encodes.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of query parameter `name` (decoded), if present.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(&k.replace('+', " ")) == name).then(|| percent_decode(&v.replace('+', " ")))
    })
}

/// Checks a `labelSelector` query value before it is handed to the API server: the HPA
/// always sends one, and an empty one would select every pod of the namespace, relays or
/// not, so it is refused.
pub fn check_selector(selector: Option<&str>) -> Result<&str, &'static str> {
    match selector.map(str::trim) {
        None | Some("") => Err("a labelSelector selecting the relay pods is required"),
        Some(s) if s.len() > 4096 => Err("labelSelector is too long"),
        Some(s) => Ok(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;

    #[test]
    fn routes_are_parsed_from_the_path() {
        let get = |p: &str| Route::parse(&Method::GET, p);
        assert_eq!(get("/healthz"), Route::Health);
        assert_eq!(get("/readyz/ping"), Route::Health);
        assert_eq!(get("/apis"), Route::GroupList);
        assert_eq!(get("/apis/custom.metrics.k8s.io/"), Route::Group);
        assert_eq!(
            get("/apis/custom.metrics.k8s.io/v1beta2"),
            Route::Discovery { version: "v1beta2" }
        );
        assert_eq!(get("/apis/custom.metrics.k8s.io/v2"), Route::NotFound);
        assert_eq!(
            get("/apis/custom.metrics.k8s.io/v1beta2/namespaces/apps/pods/*/wsrelay_connections"),
            Route::Values {
                version: "v1beta2",
                namespace: "apps".into(),
                resource: "pods".into(),
                name: None,
                metric: "wsrelay_connections".into()
            }
        );
        assert_eq!(
            get("/apis/custom.metrics.k8s.io/v1beta1/namespaces/apps/pods/relay-0/m"),
            Route::Values {
                version: "v1beta1",
                namespace: "apps".into(),
                resource: "pods".into(),
                name: Some("relay-0".into()),
                metric: "m".into()
            }
        );
        // Cluster-scoped metrics are not served.
        assert_eq!(
            get("/apis/custom.metrics.k8s.io/v1beta2/namespaces/apps/metric"),
            Route::NotFound
        );
        assert_eq!(
            Route::parse(&Method::POST, "/apis/custom.metrics.k8s.io/v1beta2"),
            Route::NotFound
        );
        assert!(matches!(
            get("/openapi/v3/apis/x"),
            Route::OpenApi { v3: true, .. }
        ));
    }

    #[test]
    fn metric_requests_are_authorized_as_a_subresource_of_the_object() {
        let path = "/apis/custom.metrics.k8s.io/v1beta2/namespaces/apps/pods/*/wsrelay_connections";
        let attrs = Route::parse(&Method::GET, path).attributes(path);
        assert_eq!(
            attrs,
            Some(Attributes::Resource {
                verb: "get",
                group: GROUP,
                version: "v1beta2",
                resource: "pods".into(),
                subresource: "wsrelay_connections".into(),
                namespace: "apps".into(),
                name: "*".into()
            })
        );
        let path = "/apis/custom.metrics.k8s.io/v1beta2";
        assert_eq!(
            Route::parse(&Method::GET, path).attributes(path),
            Some(Attributes::NonResource {
                verb: "get",
                path: path.into()
            })
        );
        assert_eq!(Route::Health.attributes("/healthz"), None);
    }

    #[test]
    fn value_lists_have_each_versions_shape() {
        let values = [PodValue {
            name: "relay-a".into(),
            value: 3,
            timestamp: "2026-01-01T00:00:00Z".into(),
        }];
        let v2 = value_list("v1beta2", "apps", "wsrelay_connections", &values);
        assert_eq!(v2["apiVersion"], "custom.metrics.k8s.io/v1beta2");
        assert_eq!(v2["kind"], "MetricValueList");
        assert_eq!(v2["items"][0]["metric"]["name"], "wsrelay_connections");
        assert_eq!(v2["items"][0]["value"], "3");
        assert_eq!(v2["items"][0]["describedObject"]["kind"], "Pod");
        assert_eq!(v2["items"][0]["describedObject"]["namespace"], "apps");
        assert_eq!(v2["items"][0]["describedObject"]["name"], "relay-a");
        let v1 = value_list("v1beta1", "apps", "wsrelay_connections", &values);
        assert_eq!(v1["items"][0]["metricName"], "wsrelay_connections");
        assert!(v1["items"][0].get("metric").is_none());
        assert_eq!(
            value_list("v1beta2", "apps", "m", &[])["items"],
            serde_json::json!([])
        );
    }

    #[test]
    fn discovery_lists_the_pod_metric() {
        let d = resource_list("v1beta2", "wsrelay_connections");
        assert_eq!(d["groupVersion"], "custom.metrics.k8s.io/v1beta2");
        assert_eq!(d["resources"][0]["name"], "pods/wsrelay_connections");
        assert_eq!(d["resources"][0]["namespaced"], true);
        assert_eq!(group()["preferredVersion"]["version"], "v1beta2");
    }

    #[test]
    fn percent_encoded_text_is_decoded() {
        assert_eq!(percent_decode("a%2fb"), "a/b");
        assert_eq!(percent_decode("plain"), "plain");
        assert_eq!(percent_decode("bad%zz"), "bad%zz");
        assert_eq!(percent_decode("end%2"), "end%2");
    }

    #[test]
    fn query_parameters_are_found_and_decoded() {
        let q = Some(
            "metricLabelSelector=&labelSelector=app.kubernetes.io%2Fname%3Dwsrelay%2Capp.kubernetes.io%2Finstance+in+%28a%29",
        );
        assert_eq!(
            query_param(q, "labelSelector").as_deref(),
            Some("app.kubernetes.io/name=wsrelay,app.kubernetes.io/instance in (a)")
        );
        assert_eq!(query_param(q, "metricLabelSelector").as_deref(), Some(""));
        assert_eq!(query_param(q, "other"), None);
        assert_eq!(query_param(None, "labelSelector"), None);
    }

    #[test]
    fn an_empty_selector_is_refused() {
        assert!(check_selector(None).is_err());
        assert!(check_selector(Some(" ")).is_err());
        assert_eq!(check_selector(Some("app=x")), Ok("app=x"));
    }
}
