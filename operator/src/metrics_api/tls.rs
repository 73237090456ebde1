//! The HTTPS listener: the serving certificate from files, client certificates verified
//! against the API server's requestheader (front proxy) CA.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::auth::{RequestHeaderConfig, subject_common_name};

/// A TLS handshake plus one request must not hold a connection slot for longer than this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the TLS settings could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("the requestheader client CA bundle: {0}")]
    ClientCa(String),
    #[error("TLS settings: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Server settings: `cert`/`key` served; a client certificate is optional at the TLS layer
/// (so health probes and refusals with a 401 work), but one that is presented must chain to
/// the requestheader CA, or the handshake fails.
pub fn server_config(
    cert: &Path,
    key: &Path,
    requestheader: &RequestHeaderConfig,
) -> Result<Arc<ServerConfig>, TlsError> {
    let (certs, key) = wsrelay::pem::cert_chain_and_key(cert, key).map_err(|e| TlsError::Pem {
        path: e.path,
        message: e.message,
    })?;

    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(requestheader.client_ca_pem.as_bytes()) {
        let ca = ca.map_err(|e| TlsError::ClientCa(e.to_string()))?;
        roots
            .add(ca)
            .map_err(|e| TlsError::ClientCa(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(TlsError::ClientCa("no certificate in the bundle".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::ClientCa(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    // HTTP/1.1 only: the API server's proxy speaks it when h2 is not offered.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A TLS acceptor whose settings can be swapped while running.
#[derive(Debug, Clone)]
pub struct Acceptor {
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl Acceptor {
    pub fn new(config: Arc<ServerConfig>) -> Self {
        Self {
            current: Arc::new(RwLock::new(config)),
        }
    }

    /// New connections use `config`.
    pub fn replace(&self, config: Arc<ServerConfig>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
    }

    fn get(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// Accepts connections until `shutdown`; each gets the service `make(peer_common_name)`.
pub async fn accept_loop<F>(
    listener: TcpListener,
    acceptor: Acceptor,
    shutdown: CancellationToken,
    make: F,
) where
    F: Fn(Option<String>) -> axum::Router + Send + Sync + 'static,
{
    let make = Arc::new(make);
    loop {
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "metrics API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let tls = acceptor.get();
        let make = make.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    // A certificate from another CA ends here: refused at the TLS layer.
                    tracing::debug!(%peer, error = %e, "metrics API TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "metrics API TLS handshake timed out");
                    return;
                }
            };
            let cn = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| subject_common_name(leaf));
            let svc = TowerToHyperService::new(make(cn));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "metrics API connection ended");
                    }
                }
                () = shutdown.cancelled() => {
                    // Finish the request in flight, then close.
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                }
            }
        });
    }
}
