//! Who may ask: requests come from the API server's front proxy, authenticated by its client
//! certificate (signed by the requestheader CA, with an allowed common name), on behalf of
//! the user named in its `X-Remote-*` headers; that user is then authorized by delegation
//! (a SubjectAccessReview). Everything else is refused.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::PostParams;
use kube::{Api, Client};

use super::api::Attributes;

/// Namespace and name of the ConfigMap the API server publishes its requestheader settings in.
pub const AUTH_CONFIG_MAP: (&str, &str) = ("kube-system", "extension-apiserver-authentication");

/// Why the requestheader settings could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("reading ConfigMap kube-system/extension-apiserver-authentication: {0}")]
    Fetch(#[source] kube::Error),
    #[error(
        "ConfigMap kube-system/extension-apiserver-authentication has no requestheader-client-ca-file: the API server runs without the aggregation layer (--requestheader-client-ca-file)"
    )]
    NoClientCa,
    #[error("key {key} of the authentication ConfigMap is not a JSON list of strings: {source}")]
    BadList {
        key: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

/// The front proxy's settings, as the API server publishes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHeaderConfig {
    /// PEM bundle of the CA that signs the front proxy's client certificate.
    pub client_ca_pem: String,
    /// Common names the proxy's certificate may carry (empty: any the CA signed).
    pub allowed_names: Vec<String>,
    pub username_headers: Vec<String>,
    pub uid_headers: Vec<String>,
    pub group_headers: Vec<String>,
    pub extra_header_prefixes: Vec<String>,
}

impl RequestHeaderConfig {
    /// Reads the settings out of the ConfigMap's data.
    pub fn from_data(data: &BTreeMap<String, String>) -> Result<Self, AuthConfigError> {
        let client_ca_pem = data
            .get("requestheader-client-ca-file")
            .filter(|s| !s.trim().is_empty())
            .ok_or(AuthConfigError::NoClientCa)?
            .clone();
        let list = |key: &'static str, default: &[&str]| -> Result<Vec<String>, AuthConfigError> {
            match data.get(key) {
                Some(s) if !s.trim().is_empty() => serde_json::from_str(s)
                    .map_err(|source| AuthConfigError::BadList { key, source }),
                _ => Ok(default.iter().map(|s| (*s).to_string()).collect()),
            }
        };
        Ok(Self {
            client_ca_pem,
            allowed_names: list("requestheader-allowed-names", &[])?,
            username_headers: list("requestheader-username-headers", &["X-Remote-User"])?,
            uid_headers: list("requestheader-uid-headers", &["X-Remote-Uid"])?,
            group_headers: list("requestheader-group-headers", &["X-Remote-Group"])?,
            extra_header_prefixes: list(
                "requestheader-extra-headers-prefix",
                &["X-Remote-Extra-"],
            )?,
        })
    }

    /// Fetches the settings from the cluster.
    pub async fn fetch(client: &Client) -> Result<Self, AuthConfigError> {
        let (ns, name) = AUTH_CONFIG_MAP;
        let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
            .get(name)
            .await
            .map_err(AuthConfigError::Fetch)?;
        Self::from_data(&cm.data.unwrap_or_default())
    }
}

/// The group every authenticated user is in.
pub const AUTHENTICATED_GROUP: &str = "system:authenticated";

/// The user a request is made for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct UserInfo {
    pub name: String,
    pub uid: Option<String>,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// Why a request is not authenticated (401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unauthenticated {
    #[error("no client certificate signed by the requestheader CA was presented")]
    NoClientCertificate,
    #[error("client certificate common name {0:?} is not one of requestheader-allowed-names")]
    NameNotAllowed(String),
    #[error("the request names no user in the requestheader username headers")]
    NoUser,
}

/// The authentication decision. `peer_cn` is the common name of the client certificate
/// rustls verified against the requestheader CA (None: no certificate was presented; one
/// from another CA never gets this far, the TLS handshake refuses it).
pub fn authenticate(
    peer_cn: Option<&str>,
    config: &RequestHeaderConfig,
    headers: &HeaderMap,
) -> Result<UserInfo, Unauthenticated> {
    let cn = peer_cn.ok_or(Unauthenticated::NoClientCertificate)?;
    if !config.allowed_names.is_empty() && !config.allowed_names.iter().any(|n| n == cn) {
        return Err(Unauthenticated::NameNotAllowed(cn.to_string()));
    }
    let first = |names: &[String]| {
        names
            .iter()
            .find_map(|h| headers.get(h.as_str())?.to_str().ok())
            .map(str::to_string)
            .filter(|v| !v.is_empty())
    };
    let name = first(&config.username_headers).ok_or(Unauthenticated::NoUser)?;
    let uid = first(&config.uid_headers);
    // Each header value is one group (commas are legal inside a group name).
    let mut groups: Vec<String> = config
        .group_headers
        .iter()
        .flat_map(|h| headers.get_all(h.as_str()))
        .filter_map(|v| v.to_str().ok())
        .map(str::to_string)
        .collect();
    // As in every Kubernetes API server, an authenticated user is in system:authenticated
    // (the proxy does not always say so: its own discovery and OpenAPI requests carry no
    // groups, and RBAC grants discovery to that group).
    if !groups.iter().any(|g| g == AUTHENTICATED_GROUP) {
        groups.push(AUTHENTICATED_GROUP.to_string());
    }
    let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (header, value) in headers {
        let lower = header.as_str();
        for prefix in &config.extra_header_prefixes {
            let prefix = prefix.to_ascii_lowercase();
            if let Some(key) = lower.strip_prefix(prefix.as_str())
                && !key.is_empty()
                && let Ok(v) = value.to_str()
            {
                extra
                    .entry(super::api::percent_decode(key).to_ascii_lowercase())
                    .or_default()
                    .push(v.to_string());
            }
        }
    }
    Ok(UserInfo {
        name,
        uid,
        groups,
        extra,
    })
}

/// The subject common name of a DER certificate (the front proxy's identity). A small
/// reader of exactly the fields on the way there, rather than a full X.509 parser: rustls
/// has already verified the certificate's chain.
pub fn subject_common_name(cert_der: &[u8]) -> Option<String> {
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version?, serial, signature,
    //   issuer, validity, subject, ... }, ... }
    let (cert, _) = der_item(cert_der, 0x30)?;
    let (mut tbs, _) = der_item(cert, 0x30)?;
    if tbs.first() == Some(&0xa0) {
        tbs = der_item(tbs, 0xa0)?.1;
    }
    let (_, rest) = der_item(tbs, 0x02)?; // serialNumber
    let (_, rest) = der_item(rest, 0x30)?; // signature algorithm
    let (_, rest) = der_item(rest, 0x30)?; // issuer
    let (_, rest) = der_item(rest, 0x30)?; // validity
    let (mut subject, _) = der_item(rest, 0x30)?;
    // Name ::= SEQUENCE OF SET OF SEQUENCE { type OID, value ANY }; the last CN wins, as in Go.
    let mut cn = None;
    while !subject.is_empty() {
        let (mut set, rest) = der_item(subject, 0x31)?;
        subject = rest;
        while !set.is_empty() {
            let (atv, rest) = der_item(set, 0x30)?;
            set = rest;
            let (oid, value) = der_item(atv, 0x06)?;
            // 2.5.4.3 (commonName)
            if oid == [0x55, 0x04, 0x03] {
                let (&tag, _) = value.split_first()?;
                let (text, _) = der_item(value, tag)?;
                cn = Some(String::from_utf8_lossy(text).into_owned());
            }
        }
    }
    cn
}

/// Splits one DER TLV with tag `tag` off the front of `input`: (contents, rest).
fn der_item(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = input.split_first()?;
    if t != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some(rest.split_at(len))
}

/// The SubjectAccessReview that asks whether `user` may make a request with `attrs`.
pub fn access_review(user: &UserInfo, attrs: &Attributes) -> SubjectAccessReview {
    let (resource_attributes, non_resource_attributes) = match attrs {
        Attributes::Resource {
            verb,
            group,
            version,
            resource,
            subresource,
            namespace,
            name,
        } => (
            Some(ResourceAttributes {
                verb: Some((*verb).to_string()),
                group: Some((*group).to_string()),
                version: Some((*version).to_string()),
                resource: Some(resource.clone()),
                subresource: Some(subresource.clone()),
                namespace: Some(namespace.clone()),
                name: Some(name.clone()),
                ..Default::default()
            }),
            None,
        ),
        Attributes::NonResource { verb, path } => (
            None,
            Some(NonResourceAttributes {
                verb: Some((*verb).to_string()),
                path: Some(path.clone()),
            }),
        ),
    };
    SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.name.clone()),
            uid: user.uid.clone(),
            groups: Some(user.groups.clone()),
            extra: (!user.extra.is_empty()).then(|| user.extra.clone()),
            resource_attributes,
            non_resource_attributes,
        },
        ..Default::default()
    }
}

/// Why a request is not authorized (403), or could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum Denied {
    #[error("{user:?} (groups {groups:?}) may not {what}{reason}")]
    Forbidden {
        user: String,
        groups: Vec<String>,
        what: String,
        reason: String,
    },
    #[error("the authorization check failed: {0}")]
    Review(#[source] kube::Error),
}

/// Delegated authorization with a short cache of decisions: the HPA controller asks the same
/// question every sync period, and a SubjectAccessReview per request would double the load
/// on the API server for nothing.
#[derive(Clone)]
pub struct Authorizer {
    client: Client,
    ttl: Duration,
    cache: Arc<Mutex<DecisionCache>>,
}

/// (user, request) -> (when decided, allowed, the authorizer's reason).
type DecisionCache = HashMap<(UserInfo, Attributes), (Instant, bool, String)>;

/// Bound on cached decisions, so a flood of distinct users cannot grow memory without limit.
const MAX_CACHED_DECISIONS: usize = 4096;

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorizer")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Authorizer {
    pub fn new(client: Client, ttl: Duration) -> Self {
        Self {
            client,
            ttl,
            cache: Arc::default(),
        }
    }

    /// Allows the request or says why not.
    pub async fn authorize(&self, user: &UserInfo, attrs: &Attributes) -> Result<(), Denied> {
        let key = (user.clone(), attrs.clone());
        let cached = {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            cache
                .get(&key)
                .filter(|(at, _, _)| at.elapsed() < self.ttl)
                .map(|(_, allowed, reason)| (*allowed, reason.clone()))
        };
        let (allowed, reason) = match cached {
            Some(hit) => hit,
            None => {
                let review = Api::<SubjectAccessReview>::all(self.client.clone())
                    .create(&PostParams::default(), &access_review(user, attrs))
                    .await
                    .map_err(Denied::Review)?;
                let status = review.status.unwrap_or_default();
                let reason = status.reason.unwrap_or_default();
                let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                if cache.len() >= MAX_CACHED_DECISIONS {
                    cache.retain(|_, (at, _, _)| at.elapsed() < self.ttl);
                    if cache.len() >= MAX_CACHED_DECISIONS {
                        cache.clear();
                    }
                }
                cache.insert(key, (Instant::now(), status.allowed, reason.clone()));
                (status.allowed, reason)
            }
        };
        if allowed {
            Ok(())
        } else {
            Err(Denied::Forbidden {
                user: user.name.clone(),
                groups: user.groups.clone(),
                what: describe(attrs),
                reason: if reason.is_empty() {
                    String::new()
                } else {
                    format!(": {reason}")
                },
            })
        }
    }
}

fn describe(attrs: &Attributes) -> String {
    match attrs {
        Attributes::Resource {
            verb,
            group,
            resource,
            subresource,
            namespace,
            ..
        } => format!("{verb} {resource}/{subresource} in {group} in namespace {namespace}"),
        Attributes::NonResource { verb, path } => format!("{verb} {path}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use rustls::pki_types::pem::PemObject;

    fn config(allowed: &[&str]) -> RequestHeaderConfig {
        let data = BTreeMap::from([
            (
                "requestheader-client-ca-file".to_string(),
                "-----BEGIN CERTIFICATE-----\n...".to_string(),
            ),
            (
                "requestheader-allowed-names".to_string(),
                serde_json::to_string(allowed).expect("json"),
            ),
            (
                "requestheader-username-headers".to_string(),
                r#"["X-Remote-User"]"#.to_string(),
            ),
            (
                "requestheader-group-headers".to_string(),
                r#"["X-Remote-Group"]"#.to_string(),
            ),
            (
                "requestheader-extra-headers-prefix".to_string(),
                r#"["X-Remote-Extra-"]"#.to_string(),
            ),
        ]);
        RequestHeaderConfig::from_data(&data).expect("config")
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn the_front_proxy_acting_for_a_user_is_authenticated() {
        let h = headers(&[
            (
                "x-remote-user",
                "system:serviceaccount:kube-system:horizontal-pod-autoscaler",
            ),
            ("x-remote-group", "system:serviceaccounts"),
            ("x-remote-group", "system:authenticated"),
            (
                "x-remote-extra-authentication.kubernetes.io%2fcredential-id",
                "JTI=1",
            ),
        ]);
        let user = authenticate(
            Some("front-proxy-client"),
            &config(&["front-proxy-client"]),
            &h,
        )
        .expect("authenticated");
        assert_eq!(
            user.name,
            "system:serviceaccount:kube-system:horizontal-pod-autoscaler"
        );
        assert_eq!(
            user.groups,
            ["system:serviceaccounts", "system:authenticated"]
        );
        assert_eq!(
            user.extra.get("authentication.kubernetes.io/credential-id"),
            Some(&vec!["JTI=1".to_string()])
        );
    }

    #[test]
    fn no_certificate_a_foreign_name_or_no_user_is_unauthenticated() {
        let h = headers(&[("x-remote-user", "alice")]);
        let c = config(&["front-proxy-client"]);
        assert_eq!(
            authenticate(None, &c, &h),
            Err(Unauthenticated::NoClientCertificate)
        );
        assert_eq!(
            authenticate(Some("mallory"), &c, &h),
            Err(Unauthenticated::NameNotAllowed("mallory".into()))
        );
        assert_eq!(
            authenticate(Some("front-proxy-client"), &c, &headers(&[])),
            Err(Unauthenticated::NoUser)
        );
        assert_eq!(
            authenticate(
                Some("front-proxy-client"),
                &c,
                &headers(&[("x-remote-user", "")])
            ),
            Err(Unauthenticated::NoUser)
        );
    }

    #[test]
    fn an_empty_allowed_names_list_accepts_any_name_the_ca_signed() {
        let h = headers(&[("x-remote-user", "alice")]);
        let user = authenticate(Some("anything"), &config(&[]), &h).expect("authenticated");
        assert_eq!(user.name, "alice");
        // No group header: still in system:authenticated, as the API server would have it.
        assert_eq!(user.groups, [AUTHENTICATED_GROUP]);
    }

    #[test]
    fn a_config_map_without_the_client_ca_is_an_error() {
        assert!(matches!(
            RequestHeaderConfig::from_data(&BTreeMap::new()),
            Err(AuthConfigError::NoClientCa)
        ));
        let defaults = RequestHeaderConfig::from_data(&BTreeMap::from([(
            "requestheader-client-ca-file".to_string(),
            "pem".to_string(),
        )]))
        .expect("defaults");
        assert_eq!(defaults.username_headers, ["X-Remote-User"]);
        assert!(defaults.allowed_names.is_empty());
    }

    #[test]
    fn the_review_carries_the_user_and_the_metric_as_a_subresource() {
        let user = UserInfo {
            name: "u".into(),
            groups: vec!["g".into()],
            ..Default::default()
        };
        let attrs = Attributes::Resource {
            verb: "get",
            group: "custom.metrics.k8s.io",
            version: "v1beta2",
            resource: "pods".into(),
            subresource: "wsrelay_connections".into(),
            namespace: "apps".into(),
            name: "*".into(),
        };
        let sar = access_review(&user, &attrs);
        assert_eq!(sar.spec.user.as_deref(), Some("u"));
        assert_eq!(sar.spec.groups, Some(vec!["g".to_string()]));
        let ra = sar.spec.resource_attributes.expect("resource attributes");
        assert_eq!(ra.group.as_deref(), Some("custom.metrics.k8s.io"));
        assert_eq!(ra.resource.as_deref(), Some("pods"));
        assert_eq!(ra.subresource.as_deref(), Some("wsrelay_connections"));
        assert_eq!(ra.namespace.as_deref(), Some("apps"));
        assert!(sar.spec.non_resource_attributes.is_none());
    }

    #[test]
    fn common_name_is_read_from_a_real_certificate() {
        // The local cluster's front-proxy client certificate shape: CN=front-proxy-client,
        // issued by a CA with a different CN (the issuer must not be mistaken for it).
        let pem = include_str!("testdata/front-proxy-client.crt");
        let der: rustls::pki_types::CertificateDer<'_> =
            rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem");
        assert_eq!(
            subject_common_name(&der).as_deref(),
            Some("front-proxy-client")
        );
        // A version 3 certificate (explicit [0] version, extensions) too.
        let pem = include_str!("testdata/front-proxy-client-v3.crt");
        let der: rustls::pki_types::CertificateDer<'_> =
            rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem");
        assert_eq!(
            subject_common_name(&der).as_deref(),
            Some("front-proxy-client")
        );
        assert_eq!(subject_common_name(b"\x30\x03\x02\x01\x00"), None);
        assert_eq!(subject_common_name(b""), None);
    }
}
