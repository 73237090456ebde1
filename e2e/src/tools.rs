//! The command-line tools the tests drive (kubectl, helm), preferring the pinned builds that
//! `e2e/cluster/tools.sh` caches over whatever happens to be on PATH.

use std::path::PathBuf;
use std::process::{Command, Output};

use anyhow::{Context, Result, ensure};

use crate::kubeconfig_path;

/// The pinned build of `name` in `$WSRELAY_CACHE/path` (default ~/.cache/wsrelay/path), else
/// `name` as found on PATH.
pub fn tool(name: &str) -> PathBuf {
    let cache = std::env::var_os("WSRELAY_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/wsrelay")
        });
    let pinned = cache.join("path").join(name);
    if pinned.is_file() {
        pinned
    } else {
        PathBuf::from(name)
    }
}

/// `kubectl` against the cluster under test.
pub fn kubectl() -> Command {
    let mut c = Command::new(tool("kubectl"));
    c.arg("--kubeconfig").arg(kubeconfig_path());
    c
}

/// `helm` against the cluster under test.
pub fn helm() -> Command {
    let mut c = Command::new(tool("helm"));
    c.arg("--kubeconfig").arg(kubeconfig_path());
    c
}

/// Runs `command` and returns its output, failing with its stderr when it fails.
pub fn run(mut command: Command) -> Result<Output> {
    let shown = format!("{command:?}");
    let out = command
        .output()
        .with_context(|| format!("running {shown}"))?;
    ensure!(
        out.status.success(),
        "{shown} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}
