//! The built binary: exits 0 on SIGTERM and SIGINT, reaps the children it inherits.

use std::path::Path;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const PAUSE: &str = env!("CARGO_BIN_EXE_wsrelay-pause");

/// Polls `cond` every 10 ms for up to 10 s.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(10));
    }
}

/// True once a signal sent to `pid` is taken by `sigwait` instead of killing it: the mask is
/// in place (`SigBlk` in /proc), or the process sleeps in `sigtimedwait`, which clears the
/// waited-for signals from `SigBlk` while it waits.
fn waiting_for_signals(pid: u32) -> bool {
    let proc =
        |file: &str| std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_default();
    if proc("wchan").contains("sigtimedwait") {
        return true;
    }
    let wanted = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGCHLD]
        .iter()
        .fold(0u64, |mask, s| mask | 1 << (*s as u64 - 1));
    proc("status")
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|mask| mask & wanted == wanted)
}

fn exits_zero_on(signal: Signal) {
    let mut child = Command::new(PAUSE)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn wsrelay-pause");
    wait_for("sigwait", || waiting_for_signals(child.id()));
    kill(Pid::from_raw(child.id() as i32), signal).expect("kill");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "{signal}: {status}");
}

#[test]
fn sigterm_exits_zero() {
    exits_zero_on(Signal::SIGTERM);
}

#[test]
fn sigint_exits_zero() {
    exits_zero_on(Signal::SIGINT);
}

#[test]
fn reaps_inherited_children() {
    // The shell starts a short-lived child, then becomes the pause process in place: the
    // child is now pause's, as orphans are in a pod where pause is PID 1.
    let mut pause = Command::new("sh")
        .args(["-c", "sleep 0.3 & echo $!; exec \"$0\"", PAUSE])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(pause.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let orphan: u32 = line.trim().parse().unwrap();
    // Unreaped, the exited child would stay in /proc as a zombie until pause exits.
    wait_for("the exited child to be reaped", || {
        !Path::new(&format!("/proc/{orphan}")).exists()
    });
    // The child may also be gone because the shell reaped it before its exec (a loaded
    // machine can delay the exec past the child's 0.3 s): SIGTERM before pause has blocked
    // it would kill pause instead of making it exit 0.
    wait_for("sigwait", || waiting_for_signals(pause.id()));
    kill(Pid::from_raw(pause.id() as i32), Signal::SIGTERM).unwrap();
    assert_eq!(pause.wait().unwrap().code(), Some(0));
}

#[test]
fn version_and_usage() {
    let out = Command::new(PAUSE).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        concat!("wsrelay-pause ", env!("CARGO_PKG_VERSION"))
    );
    let out = Command::new(PAUSE).arg("--bogus").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
