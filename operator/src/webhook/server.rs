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
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use std::process::Command;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

    /// `openssl` (as e2e/src/pki.rs and e2e/cluster/pki.sh make test certificates): a CA and a
    /// serving certificate for 127.0.0.1 in `dir` (ca.crt, tls.crt, tls.key).
    fn certificates(dir: &Path) {
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .current_dir(dir)
                .args(args)
                .output()
                .expect("openssl runs");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-subj",
            "/CN=test-ca",
            "-days",
            "1",
        ]);
        openssl(&ca);
        let mut csr = vec!["req"];
        csr.extend(ec);
        csr.extend([
            "-keyout",
            "tls.key",
            "-out",
            "tls.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        openssl(&csr);
        std::fs::write(
            dir.join("tls.ext"),
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
        )
        .expect("write");
        openssl(&[
            "x509",
            "-req",
            "-in",
            "tls.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "tls.crt",
            "-days",
            "1",
            "-extfile",
            "tls.ext",
        ]);
    }

    /// One HTTP/1.1 request over TLS, verified against `ca`; the whole response.
    async fn https(addr: SocketAddr, ca: &Path, request: String) -> String {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).expect("ca.crt") {
            roots.add(c.expect("a certificate")).expect("added");
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let name = ServerName::IpAddress(addr.ip().into());
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .expect("the certificate verifies for 127.0.0.1");
        tls.write_all(request.as_bytes()).await.expect("write");
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out))
            .await
            .expect("an answer in time")
            .ok();
        String::from_utf8_lossy(&out).into_owned()
    }

    fn post(body: &str) -> String {
        format!(
            "POST /validate-websocketgateway HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    /// The server end to end on a real socket: TLS with the certificate from the directory,
    /// an AdmissionReview in and out, a 400 for a body that is none, and a clean stop.
    #[tokio::test]
    async fn answers_admission_reviews_over_https_and_stops_on_shutdown() {
        let dir = std::env::temp_dir().join(format!("wsrelay-webhook-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        certificates(&dir);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve_on(
            listener,
            WebhookConfig::new(addr, &dir),
            shutdown.clone(),
        ));

        let review = serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u-1",
                "kind": {"group": "wsrelay.dev", "version": "v1alpha1", "kind": "WebsocketGateway"},
                "resource": {"group": "wsrelay.dev", "version": "v1alpha1", "resource": "websocketgateways"},
                "name": "chat", "namespace": "apps", "operation": "CREATE",
                "userInfo": {"username": "admin"},
                "object": {
                    "apiVersion": "wsrelay.dev/v1alpha1", "kind": "WebsocketGateway",
                    "metadata": {"name": "chat", "namespace": "apps"},
                    "spec": {"bindings": [{"channel": "rooms.{room}", "subject": "rooms.{room}",
                        "authorize": {"rule": "vars.room in claims.rooms ||"}}]},
                },
            },
        });
        let out = https(addr, &dir.join("ca.crt"), post(&review.to_string())).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .unwrap_or_default();
        let answer: serde_json::Value = serde_json::from_str(body).expect("JSON");
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(answer["kind"], "AdmissionReview");
        assert_eq!(answer["response"]["uid"], "u-1");
        assert_eq!(answer["response"]["allowed"], false);
        let message = answer["response"]["status"]["message"]
            .as_str()
            .unwrap_or_default();
        assert!(
            message.starts_with("spec.bindings[0].authorize.rule: line 1, column "),
            "{message}"
        );

        let out = https(addr, &dir.join("ca.crt"), post("{}")).await;
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("stops on shutdown")
            .expect("task")
            .expect("served without error");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
