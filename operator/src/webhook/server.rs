//! The webhook's HTTPS server: POST [`PATH`](super::PATH) takes an AdmissionReview and
//! answers one. It is the metrics API's listener ([`crate::metrics_api::tls`]: connection
//! cap, header-read and idle timeouts, graceful close), without client certificates.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionReview};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics_api::{RELOAD_INTERVAL, tls};

/// An AdmissionReview carries the object and the old object; the API server's own limit
/// on a request body is 3 MiB.
const MAX_BODY_BYTES: usize = 8 << 20;

/// Command line of the webhook (flattened into `operator run`).
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookArgs {
    /// Serve the validating admission webhook (HTTPS, POST /validate-websocketgateway) on
    /// this address; unset: not served.
    #[arg(long, env = "WSRELAY_WEBHOOK_LISTEN")]
    pub webhook_listen: Option<SocketAddr>,
    /// Directory of the webhook's serving certificate: `tls.crt` (PEM chain) and `tls.key`,
    /// re-read every 5 minutes (a renewed certificate is served without a restart).
    #[arg(long, env = "WSRELAY_WEBHOOK_CERT_DIR", requires = "webhook_listen")]
    pub webhook_cert_dir: Option<PathBuf>,
}

impl WebhookArgs {
    /// The server's configuration, None when `--webhook-listen` is not set.
    pub fn into_config(self) -> Result<Option<WebhookConfig>, WebhookError> {
        let Some(addr) = self.webhook_listen else {
            return Ok(None);
        };
        let dir = self
            .webhook_cert_dir
            .ok_or(WebhookError::MissingCertificate)?;
        Ok(Some(WebhookConfig::new(addr, &dir)))
    }
}

/// How the webhook server runs.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub addr: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Connection cap, header-read and idle timeouts of the HTTPS listener.
    pub limits: tls::Limits,
}

impl WebhookConfig {
    /// Serves on `addr` with `dir/tls.crt` and `dir/tls.key`, default limits.
    pub fn new(addr: SocketAddr, dir: &Path) -> Self {
        Self {
            addr,
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            limits: tls::Limits::default(),
        }
    }
}

/// Why the webhook server could not run.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error(
        "--webhook-listen needs --webhook-cert-dir (tls.crt, tls.key: the API server calls webhooks over HTTPS only)"
    )]
    MissingCertificate,
    #[error("binding the webhook to {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the webhook's serving certificate: {0}")]
    Tls(#[from] tls::TlsError),
}

/// Binds `config.addr` and serves until `shutdown`.
pub async fn serve(config: WebhookConfig, shutdown: CancellationToken) -> Result<(), WebhookError> {
    let listener = TcpListener::bind(config.addr)
        .await
        .map_err(|source| WebhookError::Bind {
            addr: config.addr,
            source,
        })?;
    serve_on(listener, config, shutdown).await
}

/// Serves on an already bound listener until `shutdown` (tests bind port 0 themselves).
/// Fails at once when the serving certificate cannot be read; later a certificate that
/// cannot be read keeps the one in use (logged).
pub async fn serve_on(
    listener: TcpListener,
    config: WebhookConfig,
    shutdown: CancellationToken,
) -> Result<(), WebhookError> {
    let acceptor = tls::Acceptor::new(tls::server_config_without_client_auth(
        &config.cert,
        &config.key,
    )?);
    tracing::info!(
        addr = %listener.local_addr().unwrap_or(config.addr),
        path = super::PATH,
        "admission webhook listening"
    );

    // Re-read the serving certificate now and then (cert-manager and the kubelet swap the
    // mounted files when it is renewed), as the metrics API does.
    {
        let acceptor = acceptor.clone();
        let shutdown = shutdown.clone();
        let (cert, key) = (config.cert.clone(), config.key.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(RELOAD_INTERVAL) => {}
                }
                match tls::server_config_without_client_auth(&cert, &key) {
                    Ok(sc) => acceptor.replace(sc),
                    Err(e) => tracing::warn!("webhook: keeping the old serving certificate: {e}"),
                }
            }
        });
    }

    let app = axum::Router::new()
        .route(super::PATH, axum::routing::post(handle))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES));
    tls::accept_loop(listener, acceptor, config.limits, shutdown, move |_| {
        app.clone()
    })
    .await;
    Ok(())
}

/// One AdmissionReview in, one out. A body that is no AdmissionReview is a 400: the API
/// server then applies the webhook's failurePolicy.
async fn handle(body: Bytes) -> Response {
    let request: AdmissionRequest<DynamicObject> =
        match serde_json::from_slice::<AdmissionReview<DynamicObject>>(&body)
            .map_err(|e| e.to_string())
            .and_then(|r| {
                r.try_into()
                    .map_err(|_| "no request in the AdmissionReview".to_string())
            }) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("webhook: not an AdmissionReview: {e}");
                return (
                    StatusCode::BAD_REQUEST,
                    format!("not an AdmissionReview: {e}"),
                )
                    .into_response();
            }
        };
    let response = super::review(&request);
    if !response.allowed {
        tracing::info!(
            namespace = request.namespace.as_deref().unwrap_or_default(),
            name = %request.name,
            user = request.user_info.username.as_deref().unwrap_or_default(),
            "webhook: refused: {}",
            response.result.message.replace('\n', "; ")
        );
    }
    match serde_json::to_vec(&response.into_review()) {
        Ok(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: WebhookArgs,
    }

    #[test]
    fn the_webhook_is_off_unless_an_address_is_given_and_needs_a_certificate() {
        let parse = |argv: &[&str]| {
            let mut all = vec!["x"];
            all.extend_from_slice(argv);
            Cli::try_parse_from(all).expect("parses").args.into_config()
        };
        assert!(parse(&[]).expect("ok").is_none());
        assert!(matches!(
            parse(&["--webhook-listen", "0.0.0.0:9443"]),
            Err(WebhookError::MissingCertificate)
        ));
        let on = parse(&[
            "--webhook-listen",
            "0.0.0.0:9443",
            "--webhook-cert-dir",
            "/tls",
        ])
        .expect("ok")
        .expect("on");
        assert_eq!(on.addr.port(), 9443);
        assert_eq!(on.cert, Path::new("/tls/tls.crt"));
        assert_eq!(on.key, Path::new("/tls/tls.key"));
        // A certificate directory without an address is a mistake, not silently ignored.
        assert!(Cli::try_parse_from(["x", "--webhook-cert-dir", "/tls"]).is_err());
    }
}
