//! The HTTPS listener: the serving certificate from files, client certificates verified
//! against the API server's requestheader (front proxy) CA. The admission webhook
//! (`crate::webhook`) is served by the same loop, without client certificates.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
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
    let (certs, key) = cert_chain_and_key(cert, key)?;
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

/// Server settings that ask no client certificate: `cert`/`key` served, HTTP/1.1. For the
/// admission webhook, which the API server calls without one (unless told to in its own
/// admission configuration) and which hands out nothing: it answers allow or deny.
pub fn server_config_without_client_auth(
    cert: &Path,
    key: &Path,
) -> Result<Arc<ServerConfig>, TlsError> {
    wsrelay_config::pem::server_config(cert, key).map_err(|e| match e {
        wsrelay_config::pem::ServerConfigError::Pem(e) => TlsError::Pem {
            path: e.path,
            message: e.message,
        },
        wsrelay_config::pem::ServerConfigError::Rustls(e) => TlsError::Rustls(e),
    })
}

type ChainAndKey = (
    Vec<CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

fn cert_chain_and_key(cert: &Path, key: &Path) -> Result<ChainAndKey, TlsError> {
    wsrelay_config::pem::cert_chain_and_key(cert, key).map_err(|e| TlsError::Pem {
        path: e.path,
        message: e.message,
    })
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

/// Bounds on the connections of the listener. The API server's aggregator keeps a few
/// connections open and reuses them; nothing legitimate needs many, or sits silent.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once (TLS handshake included); a further client waits in the
    /// listen backlog until one closes.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, counted from the first byte of a
    /// request or, on a new connection, from the end of the TLS handshake.
    pub header_read_timeout: Duration,
    /// A connection with no byte read or written for this long is closed (a request in
    /// flight is let finish first).
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
        }
    }
}

/// Accepts connections until `shutdown`; each gets the service `make(peer_common_name)`.
pub async fn accept_loop<F>(
    listener: TcpListener,
    acceptor: Acceptor,
    limits: Limits,
    shutdown: CancellationToken,
    make: F,
) where
    F: Fn(Option<String>) -> axum::Router + Send + Sync + 'static,
{
    let handshake = move |tcp: TcpStream, peer: SocketAddr| {
        let tls = acceptor.get();
        async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    // A certificate from another CA ends here: refused at the TLS layer.
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return None;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return None;
                }
            };
            let cn = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| subject_common_name(leaf));
            Some((stream, cn))
        }
    };
    accept_with(listener, limits, shutdown, handshake, make).await;
}

/// The accept loop with the handshake as a parameter (TLS in production, plain TCP in the
/// tests of the limits): a permit of `limits.max_connections` is taken before `accept` and
/// held until the connection closes.
pub async fn accept_with<H, Fut, Io, F>(
    listener: TcpListener,
    limits: Limits,
    shutdown: CancellationToken,
    handshake: H,
    make: F,
) where
    H: Fn(TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Option<(Io, Option<String>)>> + Send + 'static,
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Option<String>) -> axum::Router + Send + Sync + 'static,
{
    let make = Arc::new(make);
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "HTTPS accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let handshaken = handshake(tcp, peer);
        let make = make.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let Some((stream, cn)) = handshaken.await else {
                return;
            };
            let svc = TowerToHyperService::new(make(cn));
            serve_connection(stream, svc, limits, peer, shutdown).await;
        });
    }
}

/// Serves HTTP/1.1 on one connection within `limits` until it ends, idles out or
/// `shutdown` (then the request in flight finishes, within 5 s).
async fn serve_connection<Io, S>(
    stream: Io,
    svc: S,
    limits: Limits,
    peer: SocketAddr,
    shutdown: CancellationToken,
) where
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming> + Send,
    S::Future: Send + 'static,
    S::ResBody: Send + 'static,
    <S::ResBody as hyper::body::Body>::Data: Send,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let activity = Activity::new();
    let io = Tracked {
        inner: stream,
        activity: activity.clone(),
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let tick = (limits.idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut ticks = tokio::time::interval(tick);
    let stop = loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "HTTPS connection ended");
                }
                return;
            }
            () = shutdown.cancelled() => break "shutting down",
            _ = ticks.tick() => {
                if activity.idle() >= limits.idle_timeout {
                    break "idle";
                }
            }
        }
    };
    tracing::debug!(%peer, reason = stop, "closing HTTPS connection");
    // Finish the request in flight (an idle connection closes at once), then close.
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
}

/// When a connection last moved a byte.
#[derive(Debug, Clone)]
struct Activity(Arc<std::sync::Mutex<Instant>>);

impl Activity {
    fn new() -> Self {
        Self(Arc::new(std::sync::Mutex::new(Instant::now())))
    }
    fn touch(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }
    fn idle(&self) -> Duration {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).elapsed()
    }
}

/// A stream that records its reads and writes in an [`Activity`].
struct Tracked<Io> {
    inner: Io,
    activity: Activity,
}

impl<Io: AsyncRead + Unpin> AsyncRead for Tracked<Io> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Tracked<Io> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serves `limits` over plain TCP on loopback (the handshake is the only part left out).
    async fn server(limits: Limits) -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let handshake = |tcp: TcpStream, _peer| async move { Some((tcp, None)) };
        tokio::spawn(accept_with(
            listener,
            limits,
            shutdown.clone(),
            handshake,
            |_| axum::Router::new().fallback(|| async { "ok" }),
        ));
        (addr, shutdown)
    }

    fn limits() -> Limits {
        Limits {
            max_connections: 2,
            header_read_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(400),
        }
    }

    /// Reads until the server closes; how long that took (bounded by 5 s).
    async fn closed_after(stream: &mut TcpStream) -> Duration {
        let started = Instant::now();
        let mut buf = [0u8; 1024];
        let read_to_end = async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), read_to_end)
            .await
            .expect("the server closes the connection");
        started.elapsed()
    }

    async fn get(stream: &mut TcpStream) -> String {
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("an answer in time")
            .expect("read");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[tokio::test]
    async fn headers_that_do_not_arrive_in_time_close_the_connection() {
        let (addr, _shutdown) = server(limits()).await;
        let mut slow = TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"GET /healthz HTTP/1.1\r\nhost:")
            .await
            .expect("write");
        let took = closed_after(&mut slow).await;
        // 300 ms nominally: the bound stays below the 5 s after which `closed_after` gives
        // up, and leaves a loaded machine seconds of slack (it was 2 s).
        assert!(took < Duration::from_secs(4), "closed after {took:?}");
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed() {
        let (addr, _shutdown) = server(limits()).await;
        let mut client = TcpStream::connect(addr).await.expect("connect");
        assert!(get(&mut client).await.starts_with("HTTP/1.1 200"));
        let took = closed_after(&mut client).await;
        // 400 ms nominally; see above for the bound.
        assert!(took < Duration::from_secs(4), "closed after {took:?}");
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_wait_for_a_free_slot() {
        let (addr, _shutdown) = server(Limits {
            idle_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(30),
            ..limits()
        })
        .await;
        let mut first = TcpStream::connect(addr).await.expect("connect");
        let mut second = TcpStream::connect(addr).await.expect("connect");
        assert!(get(&mut first).await.starts_with("HTTP/1.1 200"));
        assert!(get(&mut second).await.starts_with("HTTP/1.1 200"));
        // The third is accepted by the kernel (backlog) but not served while two are open.
        let mut third = TcpStream::connect(addr).await.expect("connect");
        third
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 64];
        let early = tokio::time::timeout(Duration::from_millis(300), third.read(&mut buf)).await;
        assert!(early.is_err(), "served beyond the cap: {early:?}");
        drop(first);
        let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
            .await
            .expect("served once a slot frees")
            .expect("read");
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    }
}
