//! A relay started in-process for a test: `TestRelay::builder(&nats).binding(..).start().await`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::api::{
    Binding, Config, Direction, Jwt, JwtAlgorithm, JwtKey, Registry, Running, ServerTls,
    SlowConsumerPolicy, StartError, TokenSource, start,
};
use crate::client::{self, Ws};
use crate::http::{eventually, http_get, metric};
use crate::tokens::fixture_jwt;

/// A config on loopback with free ports (and a 2 s drain grace period, to keep tests short).
pub fn base_config(nats_url: &str) -> Config {
    let mut c = Config::example(nats_url);
    c.listen.client = "127.0.0.1:0".parse().unwrap();
    c.listen.admin = "127.0.0.1:0".parse().unwrap();
    c.drain.grace_period_seconds = 2;
    c
}

pub fn binding(channel: &str, subject: &str, direction: Direction) -> Binding {
    Binding {
        channel: channel.into(),
        subject: subject.into(),
        direction,
        history: None,
        authorize: None,
        presence: None,
        auto_subscribe: false,
    }
}

/// A registry section: the test's `bucket` (1 MiB ... 8 MiB), this relay named `name` in it
/// (in-process relays share `HOSTNAME`), its lease `lease_seconds`.
pub fn registry(bucket: &str, name: &str, lease_seconds: u64) -> Registry {
    Registry {
        bucket: bucket.into(),
        lease_seconds,
        replicas: 1,
        max_bytes: 8 << 20,
        relay_name: Some(name.into()),
    }
}

/// Where a relay finds NATS: a [`crate::nats::Nats`] or a URL.
pub trait NatsUrl {
    fn nats_url(&self) -> String;
}

impl NatsUrl for crate::nats::Nats {
    fn nats_url(&self) -> String {
        self.url()
    }
}

impl NatsUrl for str {
    fn nats_url(&self) -> String {
        self.to_owned()
    }
}

impl NatsUrl for String {
    fn nats_url(&self) -> String {
        self.clone()
    }
}

/// What to wait for after the start, before the test goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Nothing: the relay serves from the start (NATS may still be connecting).
    Listening,
    /// `/ready` answers 200 (connected to NATS), within 20 s.
    Ready,
    /// `n` history streams are in place (`wsrelay_history_streams_ready`), within 15 s.
    Streams(u32),
}

/// Builds a relay's config from [`base_config`]: what the tests vary has a method; anything
/// else goes through [`Builder::config`]. The config is validated before the start.
#[must_use]
#[derive(Debug)]
pub struct Builder {
    config: Config,
    /// Whether a binding was given: the first one replaces the example's.
    bound: bool,
    wait: Wait,
    /// Wait for the registry's bucket too.
    registry_ready: bool,
}

impl Builder {
    /// Adds a binding (the first replaces the example's `public.{topic}`).
    pub fn binding(self, channel: &str, subject: &str, direction: Direction) -> Self {
        self.with_binding(binding(channel, subject, direction))
    }

    /// Adds a binding built by the test (e.g. with `history`).
    pub fn with_binding(mut self, b: Binding) -> Self {
        if !self.bound {
            self.config.bindings.clear();
            self.bound = true;
        }
        self.config.bindings.push(b);
        self
    }

    /// Verifies tokens with [`fixture_jwt`] (HS256, the fixture secret). Anonymous clients are
    /// still admitted unless [`Builder::anonymous`]`(false)`.
    pub fn hs256(self) -> Self {
        self.jwt(fixture_jwt())
    }

    /// Verifies tokens with `algorithm` and `key` (an RS256 PEM file, a JWKS URL, ...), and the
    /// issuer and audience of [`fixture_jwt`].
    pub fn jwt_with(self, algorithm: JwtAlgorithm, key: JwtKey) -> Self {
        self.jwt(Jwt {
            algorithms: vec![algorithm],
            key,
            ..fixture_jwt()
        })
    }

    /// Verifies tokens with `jwt`.
    pub fn jwt(mut self, jwt: Jwt) -> Self {
        self.config.auth.jwt = Some(jwt);
        self
    }

    pub fn anonymous(mut self, allow: bool) -> Self {
        self.config.auth.allow_anonymous = allow;
        self
    }

    /// Adds an allowed `Origin`.
    pub fn origin(mut self, origin: &str) -> Self {
        self.config.auth.allowed_origins.push(origin.into());
        self
    }

    pub fn token_sources(mut self, sources: Vec<TokenSource>) -> Self {
        self.config.auth.token_sources = sources;
        self
    }

    pub fn max_connections(mut self, n: u32) -> Self {
        self.config.limits.max_connections = n;
        self
    }

    pub fn send_queue_len(mut self, n: u32) -> Self {
        self.config.limits.send_queue_len = n;
        self
    }

    pub fn slow_consumer_policy(mut self, p: SlowConsumerPolicy) -> Self {
        self.config.limits.slow_consumer_policy = p;
        self
    }

    pub fn max_message_bytes(mut self, n: u32) -> Self {
        self.config.limits.max_message_bytes = n;
        self
    }

    /// Serves wss with this certificate and key.
    pub fn tls(mut self, cert_file: PathBuf, key_file: PathBuf) -> Self {
        self.config.tls = Some(ServerTls {
            cert_file,
            key_file,
        });
        self
    }

    /// Anything else about the config.
    pub fn config(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(&mut self.config);
        self
    }

    /// With the connection registry (see [`registry`]); the start then also waits until its
    /// bucket is in place.
    pub fn registry(mut self, bucket: &str, name: &str, lease_seconds: u64) -> Self {
        self.config.registry = Some(registry(bucket, name, lease_seconds));
        if self.wait == Wait::Listening {
            self.wait = Wait::Ready;
        }
        self.registry_ready = true;
        self
    }

    /// With lifecycle events on `subject` (`<subject>.<Type>`), kept in `stream` when given
    /// (duplicate window 60 s; the registry's lease must be at most 30 s).
    pub fn events(mut self, subject: &str, stream: Option<&str>) -> Self {
        let durable =
            stream.map(|s| serde_json::json!({"stream": s, "duplicateWindowSeconds": 60}));
        let mut v = serde_json::json!({"subject": subject});
        if let Some(d) = durable {
            v["durable"] = d;
        }
        self.config.events = Some(serde_json::from_value(v).unwrap());
        self
    }

    /// With `events.graceSeconds` (after [`RelayBuilder::events`] with a stream).
    pub fn events_grace(mut self, seconds: u64) -> Self {
        if let Some(e) = self.config.events.as_mut() {
            e.grace_seconds = seconds;
        }
        self
    }

    /// With the control service on `subject` (`<subject>.disconnect`, ...).
    pub fn control(mut self, subject: &str) -> Self {
        self.config.control = Some(crate::api::Control {
            subject: subject.to_owned(),
        });
        self
    }

    /// After the start, waits until `/ready` answers 200 (connected to NATS).
    pub fn ready(mut self) -> Self {
        self.wait = Wait::Ready;
        self
    }

    /// After the start, waits until `n` history streams are in place.
    pub fn streams_ready(mut self, n: u32) -> Self {
        self.wait = Wait::Streams(n);
        self
    }

    /// The config as built, not validated: for a test of the validation itself.
    pub fn unvalidated(self) -> Config {
        self.config
    }

    /// The validated config, for a test that starts the relay itself (or the binary).
    pub fn build(self) -> Config {
        if let Err(e) = self.config.validate() {
            panic!("the test's relay config is invalid: {e}");
        }
        self.config
    }

    /// Starts the relay (panics if it cannot), then waits as asked.
    pub async fn start(self) -> TestRelay {
        let (wait, registry_ready) = (self.wait, self.registry_ready);
        let relay = TestRelay::start(self.build()).await;
        let admin = relay.admin_addr;
        match wait {
            Wait::Listening => {}
            Wait::Ready => assert!(
                eventually(Duration::from_secs(20), || async {
                    http_get(admin, "/ready").await.0 == 200
                })
                .await,
                "the relay did not become ready"
            ),
            Wait::Streams(n) => assert!(
                eventually(Duration::from_secs(15), || async {
                    metric(admin, "wsrelay_history_streams_ready").await == Some(f64::from(n))
                })
                .await,
                "the history stream was not put in place"
            ),
        }
        if registry_ready {
            assert!(
                eventually(Duration::from_secs(15), || async {
                    metric(admin, "wsrelay_registry_ready").await == Some(1.0)
                })
                .await,
                "the registry's bucket was not put in place"
            );
        }
        relay
    }

    /// Starts the relay; `Err` if it cannot.
    pub async fn try_start(self) -> Result<TestRelay, StartError> {
        TestRelay::try_start(self.build()).await
    }
}

/// A relay running in the test's process. It derefs to what the relay's start returns
/// (`client_addr`, `admin_addr`, `relay`, `tls`).
#[derive(Debug)]
pub struct TestRelay {
    running: Running,
}

impl std::ops::Deref for TestRelay {
    type Target = Running;
    fn deref(&self) -> &Running {
        &self.running
    }
}

impl TestRelay {
    /// A builder over [`base_config`] for this NATS server (a [`crate::nats::Nats`] or a URL).
    pub fn builder(nats: &(impl NatsUrl + ?Sized)) -> Builder {
        Builder {
            config: base_config(&nats.nats_url()),
            bound: false,
            wait: Wait::Listening,
            registry_ready: false,
        }
    }

    /// A builder over a config the test built (bindings added go after its own).
    pub fn with_config(config: Config) -> Builder {
        Builder {
            config,
            bound: true,
            wait: Wait::Listening,
            registry_ready: false,
        }
    }

    /// Starts a relay from a config the test built (panics if it cannot).
    pub async fn start(config: Config) -> Self {
        Self::try_start(config)
            .await
            .unwrap_or_else(|e| panic!("the relay did not start: {e}"))
    }

    pub async fn try_start(config: Config) -> Result<Self, StartError> {
        start(config).await.map(|running| Self { running })
    }

    pub fn addr(&self) -> SocketAddr {
        self.running.client_addr
    }

    pub fn admin(&self) -> SocketAddr {
        self.running.admin_addr
    }

    /// A client connected with `query` (e.g. `?token=...`), its welcome read.
    pub async fn connect(&self, query: &str) -> Ws {
        client::connect(self.running.client_addr, query).await
    }

    /// A metric's value from the admin port's exposition.
    pub async fn metric(&self, prefix: &str) -> Option<f64> {
        metric(self.running.admin_addr, prefix).await
    }

    /// The relay's process handle (to drain it, or reach its shared state).
    pub fn into_running(self) -> Running {
        self.running
    }

    /// Drains and stops (what SIGTERM does).
    pub async fn drain(self) {
        self.running.drain().await;
    }
}

/// The real relay binary, run from a config file, its JSON log kept; killed when dropped.
#[derive(Debug)]
pub struct RelayProcess {
    pub child: std::process::Child,
    /// Bound client address (from its log).
    pub client: SocketAddr,
    /// Bound admin address (from its log).
    pub admin: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
}

impl RelayProcess {
    /// Writes `config` to a file of its own (under the system's temp dir, named after `tag`
    /// and this process) and starts `bin` with it, as [`RelayProcess::spawn`] does.
    pub fn spawn_config(bin: &Path, config: &Config, tag: &str, log_filter: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("wsrelay-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        std::fs::write(&path, serde_json::to_string_pretty(config).unwrap()).unwrap();
        Self::spawn(bin, &path, log_filter)
    }

    /// Starts `bin` (the test's `env!("CARGO_BIN_EXE_wsrelay")`) with `config_path`, logging
    /// JSON at `log_filter` (`WSRELAY_LOG`), and reads its bound addresses from the log
    /// (within 20 s).
    pub fn spawn(bin: &Path, config_path: &Path, log_filter: &str) -> Self {
        let mut child = Command::new(bin)
            .args(["--log-format", "json", "run", "--config"])
            .arg(config_path)
            .env("WSRELAY_LOG", log_filter)
            // Its name from its config (`nats.name`, `registry.relayName`), not the host's:
            // the relays a test runs on this host need names of their own.
            .env_remove("HOSTNAME")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let keep = lines.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the log to its end (the process's exit), so that it never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v["fields"]["message"] == "wsrelay listening"
                    && let Some(tx) = tx.take()
                {
                    let addr = |k: &str| -> SocketAddr {
                        v["fields"][k].as_str().unwrap().parse().unwrap()
                    };
                    let _ = tx.send((addr("client"), addr("admin")));
                }
                keep.lock().unwrap().push(line);
            }
        });
        let (client, admin) = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("relay did not start");
        Self {
            child,
            client,
            admin,
            lines,
        }
    }

    /// The whole log so far, one line per record.
    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// The JSON log lines whose message is `message`.
    pub fn lines_with(&self, message: &str) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["fields"]["message"] == message)
            .collect()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
