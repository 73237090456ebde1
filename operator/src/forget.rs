//! Forgetting dead relays. When a relay pod of a gateway with a connection registry is gone
//! (its object deleted, or in a terminal phase: its containers will not run again), the
//! operator asks one live, Ready relay of the same gateway to delete the dead one's registry
//! entries (`POST /registry/forget?relay=<name>` on its admin port, the port it scrapes), so
//! that its members leave within seconds instead of at its lease's expiry
//! (docs/operations.md, "Presence and the connection registry").
//!
//! A container restart is not a loss: the pod keeps its name and the relay deletes its own
//! leftovers when it starts again. A pod being deleted is not one yet either: it is draining,
//! and its relay deletes its own entries when it exits; the forget that follows its removal
//! finds nothing left (idempotent).
//!
//! [`relay_pods`] and [`plan`] decide (pure); [`Forgetter`] keeps what was seen and does the
//! HTTP at the edge, bounded in time and tries. A forget no relay answers is logged and
//! counted; the relays' lease watch purges the dead relay's entries when its lease expires.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::Semaphore;

use crate::build::INSTANCE_LABEL;
use crate::metrics_api::scrape::{RELAY_LABEL, ScrapeError, admin_port, post};

/// Live relays asked, one after the other, before a forget is given up.
pub const MAX_TRIES: usize = 3;
/// Bound on one relay's answer: it deletes the dead relay's keys before answering, and bounds
/// that by 30 s itself (the relay's `PURGE_WITHIN`).
pub const FORGET_TIMEOUT: Duration = Duration::from_secs(35);
/// Forgets under way at once (a rolling update removes many pods in a row).
const CONCURRENT: usize = 4;

/// Outcomes of a forget, the label `result` of `wsrelay_operator_registry_forgets_total`.
pub const RESULTS: &[&str] = &["ok", "failed", "no_relay"];

/// What the decision needs of one relay pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayPod {
    pub namespace: String,
    /// The gateway (the pod's instance label).
    pub gateway: String,
    pub name: String,
    /// Failed or Succeeded: its containers will not run again.
    pub terminal: bool,
    /// Where to ask it, when it may be asked: Running, Ready, not being deleted, with an IP.
    pub admin: Option<SocketAddr>,
}

/// The relay pods among `pods` (by the relay label and the gateway's instance label), by
/// uid. Pure.
pub fn relay_pods<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> BTreeMap<String, RelayPod> {
    pods.into_iter()
        .filter_map(|p| {
            let labels = p.metadata.labels.as_ref()?;
            if labels.get(RELAY_LABEL.0).map(String::as_str) != Some(RELAY_LABEL.1) {
                return None;
            }
            let gateway = labels.get(INSTANCE_LABEL)?.clone();
            let uid = p.metadata.uid.clone()?;
            let status = p.status.as_ref();
            let phase = status.and_then(|s| s.phase.as_deref());
            let ready = status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let ip: Option<IpAddr> = status
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse().ok());
            let askable =
                phase == Some("Running") && ready && p.metadata.deletion_timestamp.is_none();
            Some((
                uid,
                RelayPod {
                    namespace: p.namespace().unwrap_or_default(),
                    gateway,
                    name: p.name_any(),
                    terminal: matches!(phase, Some("Failed" | "Succeeded")),
                    admin: ip
                        .filter(|_| askable)
                        .map(|ip| SocketAddr::new(ip, admin_port(p))),
                },
            ))
        })
        .collect()
}

/// Whether the pod cache, once `event` is applied, shows a full view worth comparing: not
/// during a (re)list (`Init`, `InitApply`: the cache still shows what it had, or nothing at
/// all before its first list), not on an error. Pure.
pub fn shows_a_view<K>(
    event: &Result<kube::runtime::watcher::Event<K>, kube::runtime::watcher::Error>,
) -> bool {
    use kube::runtime::watcher::Event;
    matches!(
        event,
        Ok(Event::InitDone | Event::Apply(_) | Event::Delete(_))
    )
}

/// The name a relay gives itself in the registry's keys, from its pod name (a Deployment's
/// pod names are at most 63 characters, so `HOSTNAME` is the whole name): the relay's own
/// rule, from the config crate they share.
pub use wsrelay_config::relay_token;

/// One dead relay to forget, and whom to ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forget {
    pub namespace: String,
    pub gateway: String,
    /// The lost pod.
    pub pod: String,
    /// Its name in the registry ([`relay_token`]).
    pub relay: String,
    /// Live, Ready relays of the same gateway to ask in turn (pod name, admin address), at
    /// most [`MAX_TRIES`]; empty: nobody to ask.
    pub ask: Vec<(String, SocketAddr)>,
}

/// The relays lost between two views of the pods (`before`, `after`, by uid), of gateways
/// `has_registry` says keep a registry, each with the live relays of its gateway to ask:
/// a pod that was not terminal before and is absent or terminal after. A pod whose name a
/// live pod of the gateway carries again is left alone: that relay owns the name's entries
/// (and deletes what its predecessor left when it starts). Pure.
pub fn plan(
    before: &BTreeMap<String, RelayPod>,
    after: &BTreeMap<String, RelayPod>,
    has_registry: impl Fn(&str, &str) -> bool,
) -> Vec<Forget> {
    before
        .iter()
        .filter(|(_, p)| !p.terminal)
        .filter(|(uid, _)| after.get(*uid).is_none_or(|now| now.terminal))
        .filter(|(_, p)| has_registry(&p.namespace, &p.gateway))
        .filter_map(|(uid, lost)| {
            let same_gateway =
                |q: &&RelayPod| q.namespace == lost.namespace && q.gateway == lost.gateway;
            let name_taken = after
                .iter()
                .filter(|(u, q)| *u != uid && !q.terminal)
                .any(|(_, q)| same_gateway(&q) && q.name == lost.name);
            if name_taken {
                return None;
            }
            let mut ask: Vec<(String, SocketAddr)> = after
                .iter()
                .filter(|(u, _)| *u != uid)
                .map(|(_, q)| q)
                .filter(same_gateway)
                .filter_map(|q| Some((q.name.clone(), q.admin?)))
                .collect();
            ask.sort();
            ask.truncate(MAX_TRIES);
            Some(Forget {
                namespace: lost.namespace.clone(),
                gateway: lost.gateway.clone(),
                pod: lost.name.clone(),
                relay: relay_token(&lost.name),
                ask,
            })
        })
        .collect()
}

/// The path of a forget. The relay token is `[-_=a-zA-Z0-9]`, sent as it is: the relay reads
/// the name after `relay=` without percent-decoding it (relay/src/runtime/admin.rs).
pub fn forget_path(relay: &str) -> String {
    format!("/registry/forget?relay={relay}")
}

/// Label of `wsrelay_operator_registry_forgets_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ForgetLabels {
    pub result: &'static str,
}

/// Forgets by outcome: `ok` (a relay deleted the dead one's entries), `failed` (no relay
/// asked answered 200), `no_relay` (the gateway had no live, Ready relay to ask).
pub type ForgetCounts = Family<ForgetLabels, Counter>;

/// Keeps the last view of the relay pods and sends the forgets the next one calls for.
#[derive(Debug)]
pub struct Forgetter {
    /// None until the first view: pods lost while no operator watched are left to the lease.
    known: Mutex<Option<BTreeMap<String, RelayPod>>>,
    counts: ForgetCounts,
    limit: Arc<Semaphore>,
    timeout: Duration,
}

impl Forgetter {
    pub fn new(counts: ForgetCounts) -> Self {
        Self::with_timeout(counts, FORGET_TIMEOUT)
    }

    /// As [`Forgetter::new`], each relay's answer bounded by `timeout`.
    pub fn with_timeout(counts: ForgetCounts, timeout: Duration) -> Self {
        Self {
            known: Mutex::new(None),
            counts,
            limit: Arc::new(Semaphore::new(CONCURRENT)),
            timeout,
        }
    }

    /// Takes the current view of the pods (the watch cache), and returns the forgets it
    /// calls for compared with the previous view. Pure but for the remembered view.
    pub fn observe<'a>(
        &self,
        pods: impl IntoIterator<Item = &'a Pod>,
        has_registry: impl Fn(&str, &str) -> bool,
    ) -> Vec<Forget> {
        let now = relay_pods(pods);
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let forgets = match known.as_ref() {
            Some(before) => plan(before, &now, has_registry),
            None => Vec::new(),
        };
        *known = Some(now);
        forgets
    }

    /// Sends each forget in a task of its own (at most a few at once).
    pub fn spawn(self: &Arc<Self>, forgets: Vec<Forget>) {
        for f in forgets {
            let this = self.clone();
            tokio::spawn(async move {
                let Ok(_permit) = this.limit.clone().acquire_owned().await else {
                    return;
                };
                let result = this.send(&f).await;
                this.counts.get_or_create(&ForgetLabels { result }).inc();
            });
        }
    }

    /// Asks the relays of `f.ask` in turn until one answers 200; the outcome's label.
    pub async fn send(&self, f: &Forget) -> &'static str {
        let gateway = format!("{}/{}", f.namespace, f.gateway);
        if f.ask.is_empty() {
            tracing::warn!(%gateway, pod = %f.pod, "registry: no live relay to forget a lost one; its lease's expiry will purge its entries");
            return "no_relay";
        }
        let path = forget_path(&f.relay);
        for (name, addr) in &f.ask {
            let outcome = match tokio::time::timeout(self.timeout, post(*addr, &path, None)).await {
                Err(_) => Err(ScrapeError::Timeout(self.timeout)),
                Ok(r) => r,
            };
            match outcome {
                Ok((200, body)) => {
                    tracing::info!(%gateway, pod = %f.pod, by = %name, answer = %body.trim(), "registry: lost relay forgotten");
                    return "ok";
                }
                Ok((status, body)) => {
                    tracing::warn!(%gateway, pod = %f.pod, by = %name, status, answer = %body.trim(), "registry: forget refused");
                }
                Err(e) => {
                    tracing::warn!(%gateway, pod = %f.pod, by = %name, error = %e, "registry: forget not answered");
                }
            }
        }
        tracing::warn!(%gateway, pod = %f.pod, tries = f.ask.len(), "registry: no relay forgot a lost one; its lease's expiry will purge its entries");
        "failed"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A relay pod of gateway `gw` in `apps`: `phase`, Ready or not, deleting or not.
    fn pod(gw: &str, name: &str, phase: &str, ready: bool) -> Pod {
        serde_json::from_value(json!({
            "metadata": {
                "name": name, "namespace": "apps", "uid": format!("uid-{name}"),
                "labels": { "app.kubernetes.io/name": "wsrelay", "app.kubernetes.io/instance": gw }
            },
            "spec": { "containers": [{ "name": "relay", "ports": [{ "name": "admin", "containerPort": 9090 }] }] },
            "status": {
                "phase": phase,
                "podIP": format!("10.0.0.{}", name.len()),
                "conditions": [{ "type": "Ready", "status": if ready { "True" } else { "False" } }]
            }
        }))
        .expect("pod")
    }

    fn view(pods: &[Pod]) -> BTreeMap<String, RelayPod> {
        relay_pods(pods)
    }

    fn all(_: &str, _: &str) -> bool {
        true
    }

    #[test]
    fn a_deleted_relay_pod_is_forgotten_by_a_ready_one_of_its_gateway() {
        let a = pod("chat", "chat-1-a", "Running", true);
        let b = pod("chat", "chat-1-bb", "Running", true);
        let c = pod("chat", "chat-1-ccc", "Running", false);
        let other = pod("news", "news-1-dddd", "Running", true);
        let before = view(&[a.clone(), b.clone(), c.clone(), other.clone()]);
        let after = view(&[b.clone(), c.clone(), other.clone()]);
        let plan = plan(&before, &after, all);
        assert_eq!(
            plan,
            [Forget {
                namespace: "apps".into(),
                gateway: "chat".into(),
                pod: "chat-1-a".into(),
                relay: "chat-1-a".into(),
                // Not the unready one, not another gateway's.
                ask: vec![("chat-1-bb".into(), "10.0.0.9:9090".parse().unwrap())],
            }]
        );
        // Nothing lost: nothing to do.
        assert!(super::plan(&after, &after, all).is_empty());
    }

    #[test]
    fn only_gateways_with_a_registry_forget() {
        let a = pod("chat", "chat-1-a", "Running", true);
        let b = pod("chat", "chat-1-bb", "Running", true);
        let before = view(&[a, b.clone()]);
        let after = view(&[b]);
        assert!(plan(&before, &after, |_, gw| gw != "chat").is_empty());
        assert_eq!(
            plan(&before, &after, |ns, gw| (ns, gw) == ("apps", "chat")).len(),
            1
        );
    }

    /// A pod turning Failed (evicted: its object stays) is lost; one already terminal in the
    /// previous view is not lost again, and a container restart (same pod, Running) is no
    /// loss. A pod being deleted (draining) is not lost yet, nor asked.
    #[test]
    fn a_terminal_pod_is_lost_once_and_a_draining_one_not_yet() {
        let a = pod("chat", "chat-1-a", "Running", true);
        let b = pod("chat", "chat-1-bb", "Running", true);
        let failed = pod("chat", "chat-1-a", "Failed", false);
        let before = view(&[a.clone(), b.clone()]);
        let after = view(&[failed.clone(), b.clone()]);
        let p = plan(&before, &after, all);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].pod, "chat-1-a");
        assert!(plan(&after, &view(&[failed.clone(), b.clone()]), all).is_empty());
        assert!(
            plan(&after, &view(std::slice::from_ref(&b)), all).is_empty(),
            "gone after failing: forgotten already"
        );
        let mut restarted = a.clone();
        restarted
            .status
            .as_mut()
            .unwrap()
            .conditions
            .as_mut()
            .unwrap()[0]
            .status = "False".into();
        assert!(plan(&before, &view(&[restarted, b.clone()]), all).is_empty());
        let mut draining = a.clone();
        draining.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        let drained = view(&[draining.clone(), b.clone()]);
        assert!(plan(&before, &drained, all).is_empty());
        assert_eq!(
            drained["uid-chat-1-a"].admin, None,
            "a draining relay is not asked"
        );
        // Its removal, later, is the loss.
        let gone = plan(&drained, &view(&[b]), all);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].ask.len(), 1);
    }

    #[test]
    fn at_most_max_tries_relays_are_asked_in_name_order_and_none_when_none_is_ready() {
        let lost = pod("chat", "chat-0", "Running", true);
        let live: Vec<Pod> = ["chat-9", "chat-3", "chat-5", "chat-1"]
            .iter()
            .map(|n| pod("chat", n, "Running", true))
            .collect();
        let before = view(&[vec![lost.clone()], live.clone()].concat());
        let after = view(&live);
        let p = plan(&before, &after, all);
        let asked: Vec<&str> = p[0].ask.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(asked, ["chat-1", "chat-3", "chat-5"]);
        assert_eq!(MAX_TRIES, 3);
        // The whole gateway down: one forget per pod, nobody to ask.
        let p = plan(&before, &view(&[]), all);
        assert_eq!(p.len(), 5);
        assert!(p.iter().all(|f| f.ask.is_empty()));
    }

    /// A new pod with the lost one's name (a StatefulSet would do that) owns the name's
    /// entries again: forgetting them would delete a live relay's.
    #[test]
    fn a_name_a_live_pod_carries_again_is_not_forgotten() {
        let old = pod("chat", "chat-0", "Running", true);
        let mut new = pod("chat", "chat-0", "Running", true);
        new.metadata.uid = Some("uid-new".into());
        let b = pod("chat", "chat-1-bb", "Running", true);
        assert!(plan(&view(&[old, b.clone()]), &view(&[new, b]), all).is_empty());
    }

    #[test]
    fn the_relay_name_is_the_pod_name_as_a_key_token() {
        assert_eq!(relay_token("chat-7d9f8b6c4-x2k9p"), "chat-7d9f8b6c4-x2k9p");
        assert_eq!(relay_token("relay.0"), "relay_0");
        assert_eq!(relay_token(""), "_");
        assert_eq!(relay_token(&"a".repeat(200)).len(), 128);
        assert_eq!(forget_path("chat-1"), "/registry/forget?relay=chat-1");
        assert_eq!(forget_path("a=b"), "/registry/forget?relay=a=b");
    }

    /// A (re)list shows no view until it is done: an empty cache is not every relay gone.
    #[test]
    fn only_a_listed_cache_is_a_view() {
        use kube::runtime::watcher::Event;
        let p = pod("chat", "chat-1-a", "Running", true);
        assert!(!shows_a_view::<Pod>(&Ok(Event::Init)));
        assert!(!shows_a_view(&Ok(Event::InitApply(p.clone()))));
        assert!(shows_a_view::<Pod>(&Ok(Event::InitDone)));
        assert!(shows_a_view(&Ok(Event::Apply(p.clone()))));
        assert!(shows_a_view(&Ok(Event::Delete(p))));
    }

    /// The first view only records: pods lost while no operator watched are the lease's.
    #[test]
    fn the_first_view_forgets_nothing_and_later_views_compare_with_the_last() {
        let f = Forgetter::new(ForgetCounts::default());
        let a = pod("chat", "chat-1-a", "Running", true);
        let b = pod("chat", "chat-1-bb", "Running", true);
        assert!(f.observe([&a, &b], all).is_empty());
        assert!(f.observe([&b], |_, _| false).is_empty(), "no registry");
        assert!(f.observe([&b], all).is_empty(), "already seen gone");
        let c = pod("chat", "chat-1-ccc", "Running", true);
        assert!(f.observe([&b, &c], all).is_empty());
        let lost = f.observe([&c], all);
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].pod, "chat-1-bb");
    }

    /// An admin port on loopback answering `POST /registry/forget` with `status`, recording
    /// each request's path and query (axum, as the relay serves it).
    async fn admin(
        status: u16,
    ) -> (
        SocketAddr,
        Arc<Mutex<Vec<String>>>,
        tokio::task::JoinHandle<()>,
    ) {
        use axum::http::{StatusCode, Uri};
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let app = axum::Router::new().route(
            "/registry/forget",
            axum::routing::post(move |uri: Uri| {
                let record = record.clone();
                async move {
                    record
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(uri.to_string());
                    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
                    (code, "{\"deleted\":3}")
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (addr, seen, task)
    }

    fn forget_of(ask: Vec<(String, SocketAddr)>) -> Forget {
        Forget {
            namespace: "apps".into(),
            gateway: "chat".into(),
            pod: "chat-1-a".into(),
            relay: "chat-1-a".into(),
            ask,
        }
    }

    /// The edge, on loopback only: a relay that refuses the connection, one that answers
    /// 503 and one that never answers are passed over (each bounded), the next one's 200 is
    /// the outcome; nobody answering is `failed`, nobody to ask `no_relay`.
    #[tokio::test]
    async fn the_next_live_relay_is_asked_until_one_forgets() {
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let (busy, busy_seen, t1) = admin(503).await;
        let (good, good_seen, t2) = admin(200).await;
        let f = Forgetter::with_timeout(ForgetCounts::default(), Duration::from_secs(2));
        let ask = vec![
            ("chat-1-b".to_string(), closed),
            ("chat-1-c".to_string(), silent.local_addr().expect("addr")),
            ("chat-1-d".to_string(), busy),
            ("chat-1-e".to_string(), good),
        ];
        assert_eq!(f.send(&forget_of(ask)).await, "ok");
        let want = vec!["/registry/forget?relay=chat-1-a".to_string()];
        assert_eq!(*busy_seen.lock().unwrap(), want);
        assert_eq!(*good_seen.lock().unwrap(), want);
        assert_eq!(
            f.send(&forget_of(vec![("chat-1-d".into(), busy)])).await,
            "failed"
        );
        assert_eq!(f.send(&forget_of(Vec::new())).await, "no_relay");
        t1.abort();
        t2.abort();
    }
}
