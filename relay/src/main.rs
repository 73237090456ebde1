//! The wsrelay binary.

use clap::Parser;

/// WebSocket relay between browsers and NATS.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {}

fn main() {
    let _args = Args::parse();
}
