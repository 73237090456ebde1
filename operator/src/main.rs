//! The wsrelay operator binary.

use clap::Parser;

/// Kubernetes operator for wsrelay WebSocket gateways.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {}

fn main() {
    let _args = Args::parse();
}
