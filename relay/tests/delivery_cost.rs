//! The relay's CPU cost per delivery, measured on the real binary (ignored; run by hand, in
//! release, when changing the delivery path):
//!
//! ```text
//! PATH=$HOME/.cache/wsrelay/path:$PATH cargo test --release -p wsrelay --test delivery_cost \
//!     -- --ignored --nocapture
//! ```
//!
//! A nats-server and the relay binary on loopback; `COST_CONNECTIONS` WebSocket clients in
//! this process, subscribed either each to its own subject (`COST_WORKLOAD=personal`, the
//! default: channel `notify` bound to `users.{claims.sub}.notify`) or all to one
//! (`broadcast`); a publisher sends `COST_MESSAGES` 128-byte JSON payloads at `COST_RATE`
//! per second (personal: round-robin over the users), stamped with their scheduled send time.
//! Printed: the relay's and nats-server's CPU time (from /proc) over the publish phase, per
//! delivery; voluntary and involuntary context switches of the relay's threads; client-side
//! latency p50/p99/max (scheduled send to receive; the clients share the machine).
//!
//! `COST_SERVER_CORE=0`: place the relay and its nats-server on that core as `make bench` does
//! (`taskset`, one tokio worker); run the test itself under `taskset -c 1` for the clients.
//! `COST_SYSCALLS=1`: count the relay's and nats-server's system calls by kind over the
//! publish phase (`perf stat` on the syscall tracepoints), printed per delivery.
//! Other knobs: `COST_RELAY_BIN` (measure another build: before/after), `COST_PERF_OUT` (run
//! `perf record -e cpu-clock -g` on the relay during the publish phase into that file),
//! `COST_CALLGRIND_OUT` (run the relay under `valgrind --tool=callgrind`, instrumentation on
//! during the publish phase only: instruction counts per delivery that do not depend on the
//! machine's load; use a small run, e.g. 1000 connections and 20000 messages at 2000/s).
//! Every phase is bounded in time.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use wsrelay::config::Direction;
use wsrelay_testkit::prelude::*;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// utime + stime of every thread of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

/// (voluntary, involuntary) context switches summed over `pid`'s threads.
fn switches(pid: u32) -> (u64, u64) {
    let mut out = (0, 0);
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        for line in status.lines() {
            let n = |l: &str| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            };
            if line.starts_with("voluntary_ctxt_switches") {
                out.0 += n(line).unwrap_or(0);
            } else if line.starts_with("nonvoluntary_ctxt_switches") {
                out.1 += n(line).unwrap_or(0);
            }
        }
    }
    out
}

fn payload(t_ns: u64) -> Vec<u8> {
    let mut p = format!("{{\"t\":{t_ns},\"p\":\"").into_bytes();
    p.resize(126, b'x');
    p.extend_from_slice(b"\"}");
    p
}

/// The `"t":` stamp of a message frame.
fn stamp(frame: &str) -> Option<u64> {
    let at = frame.find("\"t\":")? + 4;
    let digits: String = frame[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Moves every thread of `pid` to `core`.
fn pin(pid: u32, core: &str) {
    let ok = Command::new("taskset")
        .args(["-a", "-p", "-c", core, &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "taskset could not move {pid} to core {core}");
}

/// The system calls counted with `COST_SYSCALLS`.
const SYSCALLS: [&str; 9] = [
    "read",
    "write",
    "recvfrom",
    "sendto",
    "readv",
    "writev",
    "epoll_wait",
    "futex",
    "sched_yield",
];

/// Counts `pid`'s system calls of [`SYSCALLS`] into `out` (CSV) until interrupted.
fn count_syscalls(pid: u32, out: &std::path::Path) -> Proc {
    let mut cmd = Command::new("perf");
    cmd.args(["stat", "-x", ",", "-o"]).arg(out);
    for call in SYSCALLS {
        cmd.args(["-e", &format!("syscalls:sys_enter_{call}")]);
    }
    Proc(
        cmd.args(["-p", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// (system call, count) from `perf stat -x ,` output.
fn read_counts(out: &std::path::Path) -> Vec<(String, u64)> {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let n = f.first()?.parse().ok()?;
            let call = f.get(2)?.strip_prefix("syscalls:sys_enter_")?;
            Some((call.to_owned(), n))
        })
        .collect()
}

/// Stops a `perf` child the way that makes it write its output.
fn interrupt(p: &mut Proc) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(p.0.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = p.0.wait();
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
#[ignore = "a measurement, run by hand in release"]
async fn delivery_cost() {
    let connections: usize = env_or("COST_CONNECTIONS", 10_000);
    let rate: f64 = env_or("COST_RATE", 32_000.0);
    let messages: u64 = env_or("COST_MESSAGES", 128_000);
    let broadcast = std::env::var("COST_WORKLOAD").is_ok_and(|w| w == "broadcast");
    let callgrind = std::env::var("COST_CALLGRIND_OUT").ok();
    let perf_out = std::env::var("COST_PERF_OUT").ok();
    let server_core = std::env::var("COST_SERVER_CORE").ok();
    let bin = std::env::var("COST_RELAY_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_wsrelay").to_owned());

    let _ =
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, 20_000, 20_000);
    let nats = Nats::start();
    let port = free_port();
    let admin_port = free_port();
    let c = TestRelay::builder(&nats)
        .config(|c| {
            c.listen.client = format!("127.0.0.1:{port}").parse().unwrap();
            c.listen.admin = format!("127.0.0.1:{admin_port}").parse().unwrap();
        })
        .hs256()
        .binding("notify", "users.{claims.sub}.notify", Direction::Subscribe)
        .binding("public.{topic}", "public.{topic}", Direction::Subscribe)
        .max_connections(19_000)
        .build();
    let dir = std::env::temp_dir().join(format!("wsrelay-cost-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.yaml");
    std::fs::write(&path, serde_json::to_string_pretty(&c).unwrap()).unwrap();
    let mut cmd = match &callgrind {
        Some(out) => {
            let mut cmd = Command::new("valgrind");
            cmd.args([
                "--tool=callgrind",
                "--instr-atstart=no",
                &format!("--callgrind-out-file={out}"),
                &bin,
            ]);
            cmd
        }
        None => Command::new(&bin),
    };
    let relay = Proc(
        cmd.args(["run", "--config"])
            .arg(&path)
            .env("WSRELAY_LOG", "warn")
            .env(
                "TOKIO_WORKER_THREADS",
                if server_core.is_some() { "1" } else { "2" },
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let pid = relay.0.id();
    if let Some(core) = &server_core {
        pin(pid, core);
        pin(nats.pid(), core);
    }
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    assert!(
        eventually(Duration::from_secs(60), || async {
            tokio::net::TcpStream::connect(admin).await.is_ok()
                && http_get(admin, "/ready").await.0 == 200
        })
        .await,
        "relay not ready"
    );

    // Connect and subscribe, a few hundred at a time.
    let setup = Instant::now();
    let base = Instant::now();
    let received = Arc::new(AtomicU64::new(0));
    let gate = Arc::new(Semaphore::new(if callgrind.is_some() { 16 } else { 256 }));
    let mut opened = Vec::with_capacity(connections);
    for i in 0..connections {
        let gate = gate.clone();
        opened.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            let token = hs256(claims(&format!("u{i}")));
            let mut ws = connect(addr, &format!("?token={token}")).await;
            let channel = if broadcast { "public.all" } else { "notify" };
            let ok = subscribe(&mut ws, 1, channel).await;
            assert_eq!(ok["type"], "ok", "{ok}");
            ws
        }));
    }
    let mut clients = Vec::with_capacity(connections);
    for t in opened {
        clients.push(t.await.unwrap());
    }
    println!(
        "{connections} clients subscribed in {:.1}s",
        setup.elapsed().as_secs_f64()
    );
    let per_message = if broadcast { connections as u64 } else { 1 };
    let expected = messages * per_message;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            let received = received.clone();
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let mut lat_us: Vec<u32> = Vec::new();
                loop {
                    let m = tokio::select! {
                        _ = stop.changed() => break,
                        m = ws.next() => m,
                    };
                    let Some(Ok(m)) = m else { break };
                    if let Message::Text(t) = m
                        && let Some(t_ns) = stamp(t.as_str())
                    {
                        let now = base.elapsed().as_nanos() as u64;
                        lat_us.push((now.saturating_sub(t_ns) / 1000) as u32);
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
                lat_us
            })
        })
        .collect();

    let publisher = nats.client().await;
    let subjects: Vec<String> = if broadcast {
        vec!["public.all".into()]
    } else {
        (0..connections)
            .map(|i| format!("users.u{i}.notify"))
            .collect()
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (cpu0, nats0, sw0) = (cpu_seconds(pid), cpu_seconds(nats.pid()), switches(pid));
    if callgrind.is_some() {
        let s = Command::new("callgrind_control")
            .args(["-i", "on", &pid.to_string()])
            .status()
            .unwrap();
        assert!(s.success());
    }
    let mut perf = perf_out.as_ref().map(|out| {
        Proc(
            Command::new("perf")
                .args(["record", "-e", "cpu-clock", "-F", "2000", "-g", "-o", out])
                .args(["-p", &pid.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    });
    let counting = std::env::var("COST_SYSCALLS").is_ok().then(|| {
        [("relay", pid), ("nats-server", nats.pid())].map(|(name, p)| {
            let out = dir.join(format!("syscalls-{name}.csv"));
            (name, count_syscalls(p, &out), out)
        })
    });
    let start = base.elapsed();
    let wall = Instant::now();
    for k in 0..messages {
        let due = start + Duration::from_secs_f64(k as f64 / rate);
        let now = base.elapsed();
        if due > now {
            tokio::time::sleep(due - now).await;
        }
        let subject = &subjects[(k as usize) % subjects.len()];
        publisher
            .publish(subject.clone(), payload(due.as_nanos() as u64).into())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    let published_in = wall.elapsed();
    let deadline = Instant::now() + Duration::from_secs(if callgrind.is_some() { 120 } else { 20 });
    while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (cpu1, nats1, sw1) = (cpu_seconds(pid), cpu_seconds(nats.pid()), switches(pid));
    if let Some(p) = perf.as_mut() {
        interrupt(p);
    }
    let counted: Vec<_> = counting
        .into_iter()
        .flatten()
        .map(|(name, mut p, out)| {
            interrupt(&mut p);
            (name, read_counts(&out))
        })
        .collect();
    if callgrind.is_some() {
        let _ = Command::new("callgrind_control")
            .args(["-i", "off", &pid.to_string()])
            .status();
        let _ = Command::new("callgrind_control")
            .args(["-d", &pid.to_string()])
            .status();
    }
    let got = received.load(Ordering::Relaxed);
    let relay_latency = metric(admin, "wsrelay_delivery_latency_seconds_sum").await;
    let mut lat: Vec<u32> = Vec::new();
    let _ = stop_tx.send(true);
    for r in readers {
        if let Ok(v) = r.await {
            lat.extend(v);
        }
    }
    drop(relay);
    lat.sort_unstable();
    let q = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    let cpu = cpu1 - cpu0;
    let ncpu = nats1 - nats0;
    println!(
        "workload {} connections {connections} rate {rate}/s messages {messages}: published in {:.2}s, delivered {got}/{expected}",
        if broadcast { "broadcast" } else { "personal" },
        published_in.as_secs_f64()
    );
    println!(
        "relay cpu {cpu:.2}s = {:.2} us/delivery; nats-server cpu {ncpu:.2}s = {:.2} us/delivery; together {:.0} deliveries/cpu-s",
        cpu * 1e6 / got.max(1) as f64,
        ncpu * 1e6 / got.max(1) as f64,
        got as f64 / (cpu + ncpu).max(0.001)
    );
    println!(
        "relay context switches per delivery: voluntary {:.3}, involuntary {:.3}",
        (sw1.0 - sw0.0) as f64 / got.max(1) as f64,
        (sw1.1 - sw0.1) as f64 / got.max(1) as f64
    );
    for (name, counts) in &counted {
        let per: Vec<String> = counts
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(call, n)| format!("{call} {:.3}", *n as f64 / got.max(1) as f64))
            .collect();
        println!("{name} system calls per delivery: {}", per.join(", "));
    }
    println!(
        "client latency (scheduled send to receive): p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms, max {:.2} ms; relay latency sum {relay_latency:?}",
        q(0.5),
        q(0.99),
        q(0.999),
        q(1.0)
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(got >= expected * 99 / 100, "delivered {got} of {expected}");
}
