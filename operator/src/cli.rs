//! Command line: every flag also reads an environment variable, so a Deployment configures
//! the operator with `env:` alone.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;

use crate::RunConfig;
use crate::leader::LeaseConfig;

/// Kubernetes operator for wsrelay WebSocket gateways.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format.
    #[arg(long, env = "WSRELAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line (for log collectors).
    Json,
    /// Human-readable lines.
    Text,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the operator (uses KUBECONFIG, else the in-cluster service account). Boxed: its
    /// flags make it far larger than its sibling.
    Run(Box<RunArgs>),
    /// Print the WebsocketGateway CRD as YAML (or its Markdown reference).
    Crd {
        /// Print the field reference as Markdown instead (docs/crd.md).
        #[arg(long)]
        markdown: bool,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "WSRELAY_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Address of the admin server (/live, /ready, /metrics).
    #[arg(long, env = "WSRELAY_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    pub admin_addr: SocketAddr,
    /// Elect a leader over a Lease so that only one replica reconciles.
    #[arg(long, env = "WSRELAY_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Name of the Lease.
    #[arg(long, env = "WSRELAY_LEASE_NAME", default_value = "wsrelay-operator")]
    pub lease_name: String,
    /// Namespace of the Lease (default: the watched namespace, else `default`).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Seconds a lease holds without renewal; a standby takes over after that.
    #[arg(long, env = "WSRELAY_LEASE_DURATION_SECONDS", default_value_t = 15)]
    pub lease_duration_seconds: u64,
    /// This replica's identity in the Lease and in Events (default: host name and pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// JSON list of NetworkPolicy peers (`namespaceSelector`/`podSelector`/`ipBlock`) allowed
    /// to reach the relays' admin port 9090 (unauthenticated /metrics): the operator's own
    /// pods and the monitoring. Empty: only the node (kubelet probes) reaches it.
    #[arg(long, env = "WSRELAY_RELAY_ADMIN_PEERS", value_parser = parse_peers, default_value = "[]")]
    pub relay_admin_peers: Peers,
    /// A label (`key=value`) every Secret a gateway names must carry; a gateway naming
    /// another is Degraded (`SecretNotUsable`). Unset: any Secret of the gateway's namespace.
    #[arg(long, env = "WSRELAY_SECRET_LABEL")]
    pub secret_label: Option<crate::validate::SecretLabel>,
    /// The custom metrics API (custom.metrics.k8s.io) for the HPA. Boxed: it would make
    /// `Command::Run` much larger than its sibling.
    #[command(flatten)]
    pub metrics_api: Box<crate::metrics_api::MetricsApiArgs>,
    /// The validating admission webhook (a rule that does not compile refused at apply).
    #[command(flatten)]
    pub webhook: crate::webhook::server::WebhookArgs,
}

impl RunArgs {
    pub fn into_config(self) -> RunConfig {
        let identity = self.identity.unwrap_or_else(default_identity);
        let lease_namespace = self
            .lease_namespace
            .or_else(|| self.namespace.clone())
            .unwrap_or_else(|| "default".to_string());
        RunConfig {
            namespace: self.namespace,
            admin_addr: Some(self.admin_addr),
            leader_election: self.leader_election.then(|| LeaseConfig {
                namespace: lease_namespace,
                name: self.lease_name,
                identity: identity.clone(),
                lease_duration: Duration::from_secs(self.lease_duration_seconds.max(3)),
            }),
            identity: Some(identity),
            relay_admin_peers: self.relay_admin_peers.0,
            secret_label: self.secret_label,
        }
    }
}

/// The parsed `--relay-admin-peers`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Peers(pub Vec<NetworkPolicyPeer>);

fn parse_peers(s: &str) -> Result<Peers, String> {
    serde_json::from_str(s)
        .map(Peers)
        .map_err(|e| format!("a JSON list of NetworkPolicy peers: {e}"))
}

fn default_identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "wsrelay-operator".to_string());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_defaults_elect_a_leader_in_the_watched_namespace() {
        let cli = Cli::try_parse_from([
            "wsrelay-operator",
            "run",
            "--namespace",
            "apps",
            "--identity",
            "a",
        ])
        .expect("parses");
        let Command::Run(args) = cli.command else {
            panic!("run")
        };
        let config = args.into_config();
        let lease = config
            .leader_election
            .expect("leader election on by default");
        assert_eq!(lease.namespace, "apps");
        assert_eq!(lease.identity, "a");
        assert_eq!(config.namespace.as_deref(), Some("apps"));
    }

    #[test]
    fn leader_election_can_be_turned_off_and_logs_can_be_json() {
        let cli = Cli::try_parse_from([
            "wsrelay-operator",
            "--log-format",
            "json",
            "run",
            "--leader-election",
            "false",
        ])
        .expect("parses");
        assert_eq!(cli.log_format, LogFormat::Json);
        let Command::Run(args) = cli.command else {
            panic!("run")
        };
        assert!(args.into_config().leader_election.is_none());
    }

    #[test]
    fn relay_admin_peers_are_a_json_list_and_default_to_none() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["wsrelay-operator", "run"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).map(|cli| match cli.command {
                Command::Run(args) => args.into_config().relay_admin_peers,
                Command::Crd { .. } => panic!("run"),
            })
        };
        assert!(parse(&[]).expect("parses").is_empty());
        let peers = parse(&[
            "--relay-admin-peers",
            r#"[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}}]"#,
        ])
        .expect("parses");
        assert_eq!(peers.len(), 1);
        assert!(peers[0].namespace_selector.is_some());
        assert!(parse(&["--relay-admin-peers", "{}"]).is_err());
    }
}
