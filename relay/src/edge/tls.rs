//! TLS for the client listener (wss), from PEM files, reloaded when they change.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// Why the certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Reading or parsing a PEM file failed.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// rustls refused the pair.
    #[error("certificate/key: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Builds a rustls server config from PEM files.
pub fn load(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    crate::pem::server_config(cert, key).map_err(|e| match e {
        crate::pem::ServerConfigError::Pem(e) => TlsError::Pem {
            path: e.path,
            message: e.message,
        },
        crate::pem::ServerConfigError::Rustls(e) => TlsError::Rustls(e),
    })
}

/// A TLS acceptor whose certificate can be swapped while running.
#[derive(Debug, Clone)]
pub struct TlsAcceptor {
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl TlsAcceptor {
    /// An acceptor with `config`.
    pub fn new(config: Arc<ServerConfig>) -> Self {
        Self {
            current: Arc::new(RwLock::new(config)),
        }
    }

    /// Replaces the certificate for new connections.
    pub fn replace(&self, config: Arc<ServerConfig>) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = config;
    }

    /// Runs the TLS handshake.
    pub async fn accept(&self, tcp: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        let config = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        tokio_rustls::TlsAcceptor::from(config).accept(tcp).await
    }
}
