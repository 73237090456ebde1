//! A network namespace of the test's own, joined to the host by a veth pair, so that real
//! processes (relays) get real non-loopback addresses that Kubernetes objects (pod IPs,
//! EndpointSlices) may carry. Addresses come from 10.201.0.0/16, a range only test hosts
//! created here use; traffic goes only to them.
//!
//! Everything is undone when the [`NetNs`] is dropped, panic or not: its processes are
//! killed (by their own pid), the veth pair and the namespace deleted. Needs root.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The range test hosts take their addresses from.
pub const TEST_RANGE: &str = "10.201.0.0/16";

/// Whether this process runs as root (creating namespaces needs it).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A network namespace with one veth link to the host.
#[derive(Debug)]
pub struct NetNs {
    /// Name of the namespace (`ip netns exec NAME ...`).
    pub name: String,
    /// Host end of the veth pair.
    host_if: String,
    /// The host's address on the link (reachable from inside the namespace).
    pub host_addr: Ipv4Addr,
    /// Addresses inside the namespace, one per test host asked for.
    pub addrs: Vec<Ipv4Addr>,
    children: Vec<(String, Child)>,
}

impl NetNs {
    /// Creates a namespace with `hosts` addresses inside, on a /24 of 10.201.0.0/16 that no
    /// interface of this machine uses yet.
    pub fn create(hosts: u8) -> Result<Self> {
        let suffix = crate::unique_name("n").trim_start_matches("n-").to_string();
        let name = format!("wsrelay-e2e-{suffix}");
        let host_if = format!("wsh{suffix}");
        let peer_if = format!("wsp{suffix}");
        let used = Command::new("ip")
            .args(["-4", "-o", "addr", "show"])
            .output()
            .context("listing addresses")?;
        let used = String::from_utf8_lossy(&used.stdout).to_string();
        let subnet = (0..50)
            .map(|_| rand::random_range(2u8..=254))
            .find(|n| !used.contains(&format!(" 10.201.{n}.")))
            .context("no free 10.201.X.0/24 for the test network")?;
        let ns = Self {
            name: name.clone(),
            host_if: host_if.clone(),
            host_addr: Ipv4Addr::new(10, 201, subnet, 1),
            addrs: (0..hosts)
                .map(|i| Ipv4Addr::new(10, 201, subnet, 2 + i))
                .collect(),
            children: Vec::new(),
        };
        // Nothing addressed to the test range may leave the machine: a stale scrape of a test
        // host that is gone would otherwise follow the default route out. Live test hosts
        // keep their more specific /24; every other 10.201.x address is refused locally.
        // Left in place on purpose (idempotent, and only this project uses the range).
        ip(&["route", "replace", "unreachable", TEST_RANGE])?;
        // From here on, Drop undoes whatever part was made.
        ip(&["netns", "add", &name])?;
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &peer_if,
        ])?;
        ip(&["link", "set", &peer_if, "netns", &name])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", ns.host_addr),
            "dev",
            &host_if,
        ])?;
        ip(&["link", "set", &host_if, "up"])?;
        for addr in &ns.addrs {
            ip(&[
                "netns",
                "exec",
                &name,
                "ip",
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &peer_if,
            ])?;
        }
        ip(&["netns", "exec", &name, "ip", "link", "set", &peer_if, "up"])?;
        ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Starts `program args` inside the namespace; it is killed when `self` is dropped.
    /// Its output goes to `log`.
    pub fn spawn_inside(
        &mut self,
        what: &str,
        program: &Path,
        args: &[&str],
        log: &Path,
    ) -> Result<()> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .arg(program)
            .args(args);
        self.spawn(what, cmd, log)
    }

    /// Starts `program args` on the host; it is killed when `self` is dropped.
    pub fn spawn_host(
        &mut self,
        what: &str,
        program: &Path,
        args: &[&str],
        log: &Path,
    ) -> Result<()> {
        let mut cmd = Command::new(program);
        cmd.args(args);
        self.spawn(what, cmd, log)
    }

    fn spawn(&mut self, what: &str, mut cmd: Command, log: &Path) -> Result<()> {
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        // `ip netns exec` execs the program, so the child's pid is the program's own.
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        self.children.push((what.to_string(), child));
        Ok(())
    }

    /// Kills the started process named `what` (by its own pid) and reaps it.
    pub fn stop(&mut self, what: &str) -> Result<()> {
        let index = self
            .children
            .iter()
            .position(|(w, _)| w == what)
            .with_context(|| format!("no process {what} was started"))?;
        let (_, mut child) = self.children.remove(index);
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Fails if one of the started processes has exited (it should run until the end).
    pub fn check_running(&mut self) -> Result<()> {
        for (what, child) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                bail!("{what} exited early: {status}");
            }
        }
        Ok(())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        for (what, child) in &mut self.children {
            let _ = child.kill();
            // Bounded: a killed process is reaped at once; never hang a test on it.
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            tracing::debug!(%what, "stopped");
        }
        // Deleting one end deletes the pair; deleting the namespace removes the other end.
        let _ = ip(&["link", "del", &self.host_if]);
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            tracing::warn!("cleaning up network namespace {}: {e}", self.name);
        }
    }
}
