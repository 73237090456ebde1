//! The operator's built-in custom metrics API: `custom.metrics.k8s.io` (v1beta2 and v1beta1)
//! served as an aggregated API, so an HPA scales relays on their open connections with no
//! Prometheus and no adapter installed.
//!
//! Layout: [`api`] (paths and JSON, pure), [`prom`] (reading the relay's gauge, pure),
//! [`scrape`] (asking the relay pods, with a timeout and a short cache), [`auth`] (front
//! proxy authentication and delegated authorization), [`tls`] (the HTTPS listener).
//! `docs/autoscaling.md` tells the whole story.

pub mod api;
pub mod auth;
pub mod prom;
pub mod scrape;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Extension;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client};
use prometheus_client::registry::Registry;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use self::api::Route;
use self::auth::{AuthConfigError, Authorizer, RequestHeaderConfig};
pub use self::scrape::ScrapeMetrics;
pub use self::scrape::Scraper;
pub use crate::build::CONNECTIONS_METRIC;

/// Default bound on one relay scrape.
pub const DEFAULT_SCRAPE_TIMEOUT: Duration = Duration::from_millis(1000);
/// Default time a scraped value is reused. Well under the HPA's sync period (15 s by
/// default), so every HPA sync sees a fresh value, while concurrent askers share a scrape.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(2);
/// How long an authorization decision is reused.
pub const AUTHZ_CACHE_TTL: Duration = Duration::from_secs(10);
/// How often the front proxy CA, the allowed names and the serving certificate are re-read
/// (the API server's CA and cert-manager's certificates rotate).
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(300);

/// Command line of the metrics API (flattened into `operator run`).
#[derive(Debug, Clone, clap::Args)]
pub struct MetricsApiArgs {
    /// Serve custom.metrics.k8s.io on this address (HTTPS); unset: not served.
    #[arg(long, env = "WSRELAY_METRICS_API_ADDR")]
    pub metrics_api_addr: Option<SocketAddr>,
    /// PEM serving certificate (chain) of the metrics API; the APIService's caBundle must
    /// verify it for the name `<service>.<namespace>.svc`.
    #[arg(long, env = "WSRELAY_METRICS_API_CERT", requires = "metrics_api_addr")]
    pub metrics_api_cert: Option<PathBuf>,
    /// PEM private key of the serving certificate.
    #[arg(long, env = "WSRELAY_METRICS_API_KEY", requires = "metrics_api_addr")]
    pub metrics_api_key: Option<PathBuf>,
    /// Milliseconds one relay /metrics scrape may take before the pod is left out.
    #[arg(
        long,
        env = "WSRELAY_METRICS_SCRAPE_TIMEOUT_MS",
        default_value_t = 1000
    )]
    pub metrics_scrape_timeout_ms: u64,
    /// Milliseconds a scraped value is reused.
    #[arg(long, env = "WSRELAY_METRICS_CACHE_TTL_MS", default_value_t = 2000)]
    pub metrics_cache_ttl_ms: u64,
    /// Connections the metrics API serves at once; more wait in the listen backlog.
    #[arg(
        long,
        env = "WSRELAY_METRICS_API_MAX_CONNECTIONS",
        default_value_t = 256
    )]
    pub metrics_api_max_connections: usize,
    /// Milliseconds a client has to send a request's headers.
    #[arg(
        long,
        env = "WSRELAY_METRICS_API_HEADER_READ_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub metrics_api_header_read_timeout_ms: u64,
    /// Milliseconds a connection may stay silent before it is closed.
    #[arg(
        long,
        env = "WSRELAY_METRICS_API_IDLE_TIMEOUT_MS",
        default_value_t = 90_000
    )]
    pub metrics_api_idle_timeout_ms: u64,
}

impl MetricsApiArgs {
    /// The relay scraper these flags describe (timeout, cache), counting into `metrics`.
    pub fn scraper(&self, metrics: ScrapeMetrics) -> Scraper {
        Scraper::with_metrics(
            CONNECTIONS_METRIC,
            Duration::from_millis(self.metrics_scrape_timeout_ms.max(1)),
            Duration::from_millis(self.metrics_cache_ttl_ms),
            metrics,
        )
    }

    /// The server's configuration, None when `--metrics-api-addr` is not set.
    pub fn into_config(self) -> Result<Option<MetricsApiConfig>, MetricsApiError> {
        let Some(addr) = self.metrics_api_addr else {
            return Ok(None);
        };
        let (Some(cert), Some(key)) = (self.metrics_api_cert, self.metrics_api_key) else {
            return Err(MetricsApiError::MissingCertificate);
        };
        Ok(Some(MetricsApiConfig {
            addr,
            cert,
            key,
            scrape_timeout: Duration::from_millis(self.metrics_scrape_timeout_ms.max(1)),
            cache_ttl: Duration::from_millis(self.metrics_cache_ttl_ms),
            limits: tls::Limits {
                max_connections: self.metrics_api_max_connections.max(1),
                header_read_timeout: Duration::from_millis(
                    self.metrics_api_header_read_timeout_ms.max(1),
                ),
                idle_timeout: Duration::from_millis(self.metrics_api_idle_timeout_ms.max(1)),
            },
        }))
    }
}

/// How the metrics API runs.
#[derive(Debug, Clone)]
pub struct MetricsApiConfig {
    pub addr: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub scrape_timeout: Duration,
    pub cache_ttl: Duration,
    /// Connection cap, header-read and idle timeouts of the HTTPS listener.
    pub limits: tls::Limits,
}

/// Why the metrics API could not run.
#[derive(Debug, thiserror::Error)]
pub enum MetricsApiError {
    #[error("--metrics-api-addr needs --metrics-api-cert and --metrics-api-key (TLS is required)")]
    MissingCertificate,
    #[error("binding the metrics API to {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    AuthConfig(#[from] AuthConfigError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// What every request handler shares.
struct Shared {
    client: Client,
    scraper: Scraper,
    authorizer: Authorizer,
    requestheader: RwLock<Arc<RequestHeaderConfig>>,
    registry: Registry,
    ready: AtomicBool,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("scraper", &self.scraper)
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

/// The common name of the verified client certificate of one connection.
#[derive(Debug, Clone)]
struct PeerName(Option<String>);

/// Binds `config.addr` and serves until `shutdown`, asking the relays through `scraper`
/// (the process's one scraper: its counters may also be on the operator's own `/metrics`;
/// they are on this API's `/metrics` too). `config.scrape_timeout` and `config.cache_ttl`
/// are the scraper's business then.
pub async fn serve(
    client: Client,
    config: MetricsApiConfig,
    scraper: Scraper,
    shutdown: CancellationToken,
) -> Result<(), MetricsApiError> {
    let listener =
        TcpListener::bind(config.addr)
            .await
            .map_err(|source| MetricsApiError::Bind {
                addr: config.addr,
                source,
            })?;
    serve_with(listener, client, config, scraper, shutdown).await
}

/// Serves on an already bound listener until `shutdown` (tests bind port 0 themselves).
/// Fails at once when the front proxy settings or the serving certificate cannot be read:
/// without them no request could ever be authenticated.
pub async fn serve_on(
    listener: TcpListener,
    client: Client,
    config: MetricsApiConfig,
    shutdown: CancellationToken,
) -> Result<(), MetricsApiError> {
    let scraper = Scraper::new(CONNECTIONS_METRIC, config.scrape_timeout, config.cache_ttl);
    serve_with(listener, client, config, scraper, shutdown).await
}

async fn serve_with(
    listener: TcpListener,
    client: Client,
    config: MetricsApiConfig,
    scraper: Scraper,
    shutdown: CancellationToken,
) -> Result<(), MetricsApiError> {
    let requestheader = RequestHeaderConfig::fetch(&client).await?;
    let server_config = tls::server_config(&config.cert, &config.key, &requestheader)?;
    let acceptor = tls::Acceptor::new(server_config);

    let mut registry = Registry::with_prefix("wsrelay_operator");
    scraper.metrics.register(&mut registry);
    let shared = Arc::new(Shared {
        authorizer: Authorizer::new(client.clone(), AUTHZ_CACHE_TTL),
        client: client.clone(),
        scraper,
        requestheader: RwLock::new(Arc::new(requestheader)),
        registry,
        ready: AtomicBool::new(true),
    });
    tracing::info!(
        addr = %listener.local_addr().unwrap_or(config.addr),
        scrape_timeout = ?shared.scraper.timeout,
        cache_ttl = ?shared.scraper.ttl,
        "custom metrics API listening"
    );

    // Re-read the CA, the allowed names and the serving certificate now and then.
    {
        let shared = shared.clone();
        let acceptor = acceptor.clone();
        let shutdown = shutdown.clone();
        let config = config.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(RELOAD_INTERVAL) => {}
                }
                match RequestHeaderConfig::fetch(&shared.client).await {
                    Ok(rh) => match tls::server_config(&config.cert, &config.key, &rh) {
                        Ok(sc) => {
                            acceptor.replace(sc);
                            *shared
                                .requestheader
                                .write()
                                .unwrap_or_else(|e| e.into_inner()) = Arc::new(rh);
                        }
                        Err(e) => tracing::warn!("keeping the old TLS settings: {e}"),
                    },
                    Err(e) => tracing::warn!("keeping the old front proxy settings: {e}"),
                }
            }
        });
    }

    let app = axum::Router::new()
        .fallback(handle)
        .with_state(shared.clone());
    tls::accept_loop(listener, acceptor, config.limits, shutdown, move |peer| {
        app.clone().layer(Extension(PeerName(peer)))
    })
    .await;
    shared.ready.store(false, Ordering::Relaxed);
    Ok(())
}

fn json(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn failure(code: StatusCode, reason: &str, message: &str) -> Response {
    json(code, &api::status(code.as_u16(), reason, message))
}

/// Every request: route, authenticate, authorize, answer.
async fn handle(
    State(shared): State<Arc<Shared>>,
    Extension(PeerName(peer)): Extension<PeerName>,
    request: Request<Body>,
) -> Response {
    let path = request.uri().path().to_string();
    let query = request.uri().query().map(str::to_string);
    let route = Route::parse(request.method(), &path);
    let Some(attrs) = route.attributes(&path) else {
        // Health: no authentication, so kubelet probes work.
        return if shared.ready.load(Ordering::Relaxed) {
            (StatusCode::OK, "ok").into_response()
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
        };
    };

    let requestheader = shared
        .requestheader
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let user = match auth::authenticate(peer.as_deref(), &requestheader, request.headers()) {
        Ok(user) => user,
        Err(e) => {
            tracing::debug!(%path, error = %e, "unauthenticated request");
            return failure(StatusCode::UNAUTHORIZED, "Unauthorized", &e.to_string());
        }
    };
    if let Err(e) = shared.authorizer.authorize(&user, &attrs).await {
        return match e {
            auth::Denied::Forbidden { .. } => {
                tracing::debug!(%path, error = %e, "forbidden");
                failure(StatusCode::FORBIDDEN, "Forbidden", &e.to_string())
            }
            auth::Denied::Review(_) => {
                tracing::warn!(%path, error = %e, "authorization check failed");
                failure(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    &e.to_string(),
                )
            }
        };
    }

    match route {
        Route::Health => (StatusCode::OK, "ok").into_response(),
        Route::GroupList => json(StatusCode::OK, &api::group_list()),
        Route::Group => json(StatusCode::OK, &api::group()),
        Route::Discovery { version } => json(
            StatusCode::OK,
            &api::resource_list(version, CONNECTIONS_METRIC),
        ),
        Route::OpenApi { v3, .. } => json(StatusCode::OK, &api::openapi(v3)),
        Route::Metrics => {
            let mut out = String::new();
            let _ = prometheus_client::encoding::text::encode(&mut out, &shared.registry);
            (
                StatusCode::OK,
                [(
                    header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )],
                out,
            )
                .into_response()
        }
        Route::NotFound => failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        ),
        Route::Values {
            version,
            namespace,
            resource,
            name,
            metric,
        } => {
            if resource != "pods" || metric != CONNECTIONS_METRIC {
                return failure(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!(
                        "the server does not serve metric {metric} for {resource}; it serves pods/{CONNECTIONS_METRIC}"
                    ),
                );
            }
            values(
                &shared,
                version,
                &namespace,
                name.as_deref(),
                query.as_deref(),
                &metric,
            )
            .await
        }
    }
}

/// The values of the relay pods a request names (one by name, or all its selector matches).
async fn values(
    shared: &Shared,
    version: &str,
    namespace: &str,
    name: Option<&str>,
    query: Option<&str>,
    metric: &str,
) -> Response {
    let pods_api = Api::<Pod>::namespaced(shared.client.clone(), namespace);
    let pods = match name {
        Some(name) => match pods_api.get_opt(name).await {
            Ok(Some(pod)) => vec![pod],
            Ok(None) => {
                return failure(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("pods {name:?} not found"),
                );
            }
            Err(e) => return kube_failure(&e),
        },
        None => {
            let selector = api::query_param(query, "labelSelector");
            let selector = match api::check_selector(selector.as_deref()) {
                Ok(s) => s,
                Err(msg) => return failure(StatusCode::BAD_REQUEST, "BadRequest", msg),
            };
            match pods_api.list(&ListParams::default().labels(selector)).await {
                Ok(list) => list.items,
                Err(e) => return kube_failure(&e),
            }
        }
    };
    let targets = scrape::targets(&pods);
    let scraped = shared.scraper.values(&targets).await;
    if let Some(name) = name
        && scraped.is_empty()
    {
        return failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!(
                "no {metric} value for pod {name:?}: it is not running or its /metrics did not answer"
            ),
        );
    }
    let values: Vec<api::PodValue> = scraped
        .into_iter()
        .map(|s| api::PodValue {
            name: s.name,
            value: s.value,
            timestamp: s.timestamp,
        })
        .collect();
    json(
        StatusCode::OK,
        &api::value_list(version, namespace, metric, &values),
    )
}

/// An API server error passed on with its own code (a bad selector is the caller's 400).
fn kube_failure(e: &kube::Error) -> Response {
    match e {
        kube::Error::Api(status) => {
            let code = StatusCode::from_u16(status.code).unwrap_or(StatusCode::BAD_GATEWAY);
            failure(code, &status.reason, &status.message)
        }
        other => failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            &format!("listing pods: {other}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: MetricsApiArgs,
    }

    #[test]
    fn the_api_is_off_unless_an_address_is_given_and_tls_is_required() {
        let off = Cli::try_parse_from(["x"]).expect("parses").args;
        assert!(off.into_config().expect("ok").is_none());
        let no_cert = Cli::try_parse_from(["x", "--metrics-api-addr", "0.0.0.0:6443"])
            .expect("parses")
            .args;
        assert!(matches!(
            no_cert.into_config(),
            Err(MetricsApiError::MissingCertificate)
        ));
        let on = Cli::try_parse_from([
            "x",
            "--metrics-api-addr",
            "0.0.0.0:6443",
            "--metrics-api-cert",
            "/tls/tls.crt",
            "--metrics-api-key",
            "/tls/tls.key",
        ])
        .expect("parses")
        .args
        .into_config()
        .expect("ok")
        .expect("on");
        assert_eq!(on.addr.port(), 6443);
        assert_eq!(on.scrape_timeout, DEFAULT_SCRAPE_TIMEOUT);
        assert_eq!(on.cache_ttl, DEFAULT_CACHE_TTL);
        assert_eq!(on.limits.max_connections, 256);
        assert_eq!(on.limits.header_read_timeout, Duration::from_secs(10));
        assert_eq!(on.limits.idle_timeout, Duration::from_secs(90));
    }
}
