//! The NATS fixture: a real nats-server per test, on loopback, killed when dropped.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The nats-server binary: `NATS_SERVER_BIN`, else `nats-server` on PATH, else the
/// project's tool cache.
pub fn nats_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NATS_SERVER_BIN") {
        return PathBuf::from(p);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("nats-server");
            if p.is_file() {
                return p;
            }
        }
    }
    let cache = std::env::var("WSRELAY_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/wsrelay")
        });
    let p = cache.join("path/nats-server");
    if p.is_file() {
        return p;
    }
    panic!(
        "nats-server not found: set NATS_SERVER_BIN or put nats-server on PATH (run `make tools`, which builds it into ~/.cache/wsrelay/path)"
    );
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A nats-server on 127.0.0.1, killed on drop.
#[derive(Debug)]
pub struct Nats {
    pub port: u16,
    child: Option<Child>,
    /// The server's log (stderr) so far, up to [`LOG_KEPT`] bytes.
    log: Arc<Mutex<String>>,
}

/// How much of a server's log [`Nats::log`] keeps: without `-D`/`-V`, nats-server says little
/// after its start (permission violations, slow consumers, JetStream warnings).
const LOG_KEPT: usize = 1 << 20;

impl Nats {
    /// On a port nats-server picks itself (`-p -1`): no other process can take it between
    /// the choice and the bind, as one could a port `free_port` saw free.
    pub fn start() -> Self {
        Self::start_args(&[])
    }

    /// Like [`Nats::start`], with extra nats-server arguments (auth, TLS, JetStream).
    pub fn start_args(extra: &[&str]) -> Self {
        Self::try_start_args(extra)
            .unwrap_or_else(|log| panic!("nats-server did not start:\n{log}"))
    }

    /// Like [`Nats::start_args`]; `Err(its log)` when it exited instead of starting.
    pub fn try_start_args(extra: &[&str]) -> Result<Self, String> {
        Self::spawn("-1", extra)
    }

    /// From a config file (`-c`): `conf` written to `<dir>/nats.conf`, e.g. users with their
    /// permissions and `jetstream {store_dir: ...}`. The host and port are still the command
    /// line's (127.0.0.1, a port the server picks), which take precedence over the file's.
    pub fn start_config(dir: &std::path::Path, conf: &str) -> Self {
        let path = dir.join("nats.conf");
        std::fs::write(&path, conf).unwrap();
        Self::start_args(&["-c", path.to_str().unwrap()])
    }

    /// On `port`, e.g. to start again where a stopped server listened.
    pub fn start_on(port: u16) -> Self {
        Self::start_with(port, &[])
    }

    /// On `port`, with extra nats-server arguments (auth, TLS).
    pub fn start_with(port: u16, extra: &[&str]) -> Self {
        Self::try_start_with(port, extra)
            .unwrap_or_else(|log| panic!("nats-server could not start on {port}:\n{log}"))
    }

    /// Starts nats-server on `port`; `Err(its log)` when it exited instead (the port was
    /// taken: what answers there is someone else's server).
    pub fn try_start_with(port: u16, extra: &[&str]) -> Result<Self, String> {
        Self::spawn(&port.to_string(), extra)
    }

    /// Starts nats-server and waits for its own log to say it is ready, and on which port.
    /// A connect to the port cannot tell this server from another test's that took the port
    /// first (this one then exits, but maybe only after a check had found it alive).
    fn spawn(port: &str, extra: &[&str]) -> Result<Self, String> {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new(nats_server_bin())
            .args(["-a", "127.0.0.1", "-p", port])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nats-server");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel::<Result<u16, String>>();
        // Reads the log to its end (the server's exit), so that it never blocks on a full pipe.
        // A cluster member binds its route port after "Server is ready" (and exits if that
        // port is taken): it is ready once it listens for routes too.
        let mut routes = !extra.contains(&"--cluster");
        let kept = Arc::new(Mutex::new(String::new()));
        let keep = kept.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            let (mut listening, mut ready) = (None, false);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                {
                    let mut log = keep
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if log.len() < LOG_KEPT {
                        log.push_str(&line);
                        log.push('\n');
                    }
                }
                if tx.is_none() {
                    continue;
                }
                if let Some(at) = line.split("Listening for client connections on ").nth(1) {
                    listening = at.trim().rsplit(':').next().and_then(|p| p.parse().ok());
                }
                routes |= line.contains("Listening for route connections on ");
                ready |= line.contains("Server is ready");
                if ready
                    && routes
                    && let Some(port) = listening
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(Ok(port));
                }
            }
            if let Some(tx) = tx {
                let log = keep
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let _ = tx.send(Err(log.clone()));
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(port)) => Ok(Self {
                port,
                child: Some(child),
                log: kept,
            }),
            Ok(Err(log)) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(log)
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("nats-server (port {port}) was not ready within 30 s")
            }
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// What the server logged so far (its first [`LOG_KEPT`] bytes).
    pub fn log(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The server's process id (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url()).await.expect("nats connect")
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A directory of a test's own under the system temp dir, removed when dropped.
#[derive(Debug)]
pub struct StoreDir(PathBuf);

impl StoreDir {
    /// `wsrelay-js-<pid>-<tag>` under the temp dir, empty.
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("wsrelay-js-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl std::ops::Deref for StoreDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for StoreDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A nats-server with JetStream, its store in a directory of the test's own. The directory
/// comes first so that it outlives the server: `let (_store, nats) = jetstream_nats(..)`.
pub fn jetstream_nats(tag: &str) -> (StoreDir, Nats) {
    let dir = StoreDir::new(tag);
    let nats = Nats::start_args(&["-js", "-sd", dir.to_str().unwrap()]);
    (dir, nats)
}
