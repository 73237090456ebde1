//! `wsrelay-effective-config FILE`: prints a relay config file as the relay reads it, every
//! default filled in (`make bench` puts it in docs/benchmarks.md as wsrelay's effective config).

use anyhow::{Context, Result};

fn main() -> Result<()> {
    let path = std::env::args()
        .nth(1)
        .context("usage: wsrelay-effective-config FILE")?;
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    let config: wsrelay::config::Config =
        serde_yaml::from_str(&text).with_context(|| format!("parse {path}"))?;
    print!("{}", serde_yaml::to_string(&config)?);
    Ok(())
}
