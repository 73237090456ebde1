//! A certificate chain and its private key from PEM files: the one loader behind the relay's
//! wss listener and the operator's metrics API and admission webhook (feature `pem`, usable
//! without `server`); and the one plain server config built from them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A PEM file that could not be read or holds nothing usable.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct PemError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub message: String,
}

/// Why a server config could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ServerConfigError {
    /// A PEM file.
    #[error(transparent)]
    Pem(#[from] PemError),
    /// rustls refused the pair.
    #[error("certificate/key: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A TLS server config serving `cert`/`key` over HTTP/1.1, asking no client certificate: the
/// relay's wss listener and the operator's admission webhook (which the API server calls
/// without one).
pub fn server_config(
    cert: &Path,
    key: &Path,
) -> Result<Arc<rustls::ServerConfig>, ServerConfigError> {
    let (certs, key) = cert_chain_and_key(cert, key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Reads every certificate of `cert` (leaf first) and the private key in `key`.
pub fn cert_chain_and_key(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PemError> {
    let err = |path: &Path, e: rustls::pki_types::pem::Error| PemError {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| err(cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(cert, e))?;
    if certs.is_empty() {
        return Err(PemError {
            path: cert.to_owned(),
            message: "no certificate found".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| err(key, e))?;
    Ok((certs, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_a_certificate_is_named_in_the_error() {
        let dir = std::env::temp_dir().join(format!("wsrelay-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a pem\n").unwrap();
        let e = cert_chain_and_key(&empty, &empty).unwrap_err();
        assert_eq!(e.path, empty);
        assert!(e.message.contains("no certificate"), "{e}");
        let missing = dir.join("missing.pem");
        let e = cert_chain_and_key(&missing, &missing).unwrap_err();
        assert_eq!(e.path, missing);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
