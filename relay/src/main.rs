//! The wsrelay binary: `wsrelay run --config FILE`, `wsrelay check-config FILE`, and
//! `wsrelay ctl ...`, a client of the control service (docs/backend.md).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use wsrelay::config::{Config, LoadError};

/// WebSocket relay between browsers and NATS.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Log format: `text` (coloured only when stderr is a terminal) or `json`.
    #[arg(long, env = "WSRELAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the relay until SIGTERM (drain) ; SIGHUP reloads the config.
    Run {
        /// The config file (YAML or JSON).
        #[arg(long, env = "WSRELAY_CONFIG")]
        config: PathBuf,
    },
    /// Check a config file and print every problem found.
    CheckConfig {
        /// The config file (YAML or JSON).
        file: PathBuf,
        /// Also check that every file the config names (keys, certificates,
        /// credentials) can be read: use where the Secrets are mounted.
        #[arg(long)]
        check_files: bool,
    },
    /// Command a gateway's relays through their control service over NATS (docs/backend.md):
    /// prints the JSON reply; exits 1 when the service refuses, 2 when it does not answer.
    Ctl {
        /// The NATS server.
        #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
        nats: String,
        /// A NATS credentials file (`.creds`), if the server wants one.
        #[arg(long, env = "NATS_CREDS")]
        creds: Option<PathBuf>,
        /// The gateway's control subject: `status.controlSubject` of the WebsocketGateway,
        /// e.g. `wsrelay.control.default.chat`.
        #[arg(long, env = "WSRELAY_CONTROL_SUBJECT")]
        subject: String,
        #[command(subcommand)]
        command: CtlCommand,
    },
}

/// Which connections a control command is for.
#[derive(Debug, clap::Args)]
struct Whom {
    /// The connections whose token has this `sub`.
    #[arg(long)]
    sub: Option<String>,
    /// With `--sub`: only those whose token also has this `iss`.
    #[arg(long)]
    iss: Option<String>,
    /// The connection with this id (`<relay>/<n>`, as in the events).
    #[arg(long)]
    connection: Option<String>,
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// Close connections (close code 4100; 4101 with --no-reconnect).
    Disconnect {
        #[command(flatten)]
        whom: Whom,
        /// Tell the clients not to reconnect.
        #[arg(long)]
        no_reconnect: bool,
    },
    /// List connections, with their channels.
    Connections {
        #[command(flatten)]
        whom: Whom,
    },
    /// Revoke one token by its `jti`: its connections close with 4409, and it is refused at
    /// every handshake and refresh until --until.
    Revoke {
        /// The token's `jti`.
        #[arg(long)]
        jti: String,
        /// When the token expires (Unix seconds): the revocation holds until then.
        #[arg(long)]
        until: u64,
    },
    /// Revoke every token of a `sub` issued before a time (their `iat`).
    Invalidate {
        /// The tokens' `sub`.
        #[arg(long)]
        sub: String,
        /// And their `iss`.
        #[arg(long)]
        iss: Option<String>,
        /// Tokens issued before this (Unix seconds; default: now).
        #[arg(long)]
        issued_before: Option<u64>,
        /// Until when it holds (Unix seconds; default: a day from now).
        #[arg(long)]
        until: Option<u64>,
    },
    /// Subscribe a user's connections, present and future, on every relay, to a channel (a
    /// server-side subscription).
    Subscribe {
        #[command(flatten)]
        user: User,
    },
    /// End a server-side subscription.
    Unsubscribe {
        #[command(flatten)]
        user: User,
    },
    /// List the channels subscribed to, with how many connections each.
    Channels {
        /// Only the channels that start with this.
        #[arg(long)]
        prefix: Option<String>,
    },
}

/// Whose server-side subscription to which channel.
#[derive(Debug, clap::Args)]
struct User {
    /// The user: the connections whose token has this `sub`.
    #[arg(long)]
    sub: String,
    /// Only those whose token also has this `iss`.
    #[arg(long)]
    iss: Option<String>,
    /// The channel.
    #[arg(long)]
    channel: String,
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WSRELAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: `kubectl logs` and log collectors get plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// A relay holds one descriptor per client: raise the soft limit to the hard one.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!(error = %e, soft, hard, "cannot raise the open-file limit");
    }
}

fn report(e: &LoadError) {
    match e {
        LoadError::Invalid { path, errors } => {
            eprintln!("{}: {} error(s):", path.display(), errors.0.len());
            for err in &errors.0 {
                eprintln!("  - {err}");
            }
        }
        other => eprintln!("{other}"),
    }
}

/// `wsrelay ctl`: one request to the control service, its reply on stdout.
fn ctl(nats: &str, creds: Option<PathBuf>, subject: &str, command: CtlCommand) -> ExitCode {
    use wsrelay::runtime::control::{Selector, Verb, ask};
    let whom = |w: Whom| Selector {
        sub: w.sub,
        iss: w.iss,
        connection: w.connection,
        ..Selector::default()
    };
    let user = |u: User| Selector {
        sub: Some(u.sub),
        iss: u.iss,
        channel: Some(u.channel),
        ..Selector::default()
    };
    let (verb, selector) = match command {
        CtlCommand::Disconnect {
            whom: w,
            no_reconnect,
        } => (
            Verb::Disconnect,
            Selector {
                reconnect: no_reconnect.then_some(false),
                ..whom(w)
            },
        ),
        CtlCommand::Connections { whom: w } => (Verb::Connections, whom(w)),
        CtlCommand::Revoke { jti, until } => (
            Verb::Revoke,
            Selector {
                jti: Some(jti),
                until: Some(until),
                ..Selector::default()
            },
        ),
        CtlCommand::Invalidate {
            sub,
            iss,
            issued_before,
            until,
        } => (
            Verb::Invalidate,
            Selector {
                sub: Some(sub),
                iss,
                issued_before: Some(issued_before.unwrap_or_else(wsrelay::clock::now_secs)),
                until,
                ..Selector::default()
            },
        ),
        CtlCommand::Subscribe { user: u } => (Verb::Subscribe, user(u)),
        CtlCommand::Unsubscribe { user: u } => (Verb::Unsubscribe, user(u)),
        CtlCommand::Channels { prefix } => (
            Verb::Channels,
            Selector {
                prefix,
                ..Selector::default()
            },
        ),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(ask(nats, creds.as_deref(), subject, verb, &selector)) {
        Ok(reply) => {
            println!("{reply}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(if e.is_refusal() { 1 } else { 2 })
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Command::Ctl {
            nats,
            creds,
            subject,
            command,
        } => ctl(&nats, creds, &subject, command),
        Command::CheckConfig { file, check_files } => match Config::load(&file) {
            Ok(config) => {
                let unreadable: Vec<String> = if check_files {
                    config
                        .referenced_files()
                        .into_iter()
                        .filter_map(|(field, path)| {
                            std::fs::File::open(path)
                                .err()
                                .map(|e| format!("{field}: cannot read {}: {e}", path.display()))
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                if unreadable.is_empty() {
                    println!("{}: ok", file.display());
                    ExitCode::SUCCESS
                } else {
                    eprintln!("{}: {} error(s):", file.display(), unreadable.len());
                    for e in unreadable {
                        eprintln!("  - {e}");
                    }
                    ExitCode::from(1)
                }
            }
            Err(e) => {
                report(&e);
                ExitCode::from(1)
            }
        },
        Command::Run { config } => {
            init_tracing(args.log_format);
            wsrelay::task::install_panic_log();
            raise_fd_limit();
            let loaded = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    report(&e);
                    return ExitCode::from(2);
                }
            };
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            match rt.block_on(wsrelay::runtime::process::run(config, loaded)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "relay failed");
                    ExitCode::from(1)
                }
            }
        }
    }
}
