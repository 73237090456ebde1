//! A pod's sandbox process: it holds the pod's namespaces, does nothing else, reaps the
//! orphans the kernel hands to it as PID 1, and exits 0 on SIGINT or SIGTERM.
//!
//! Signals are blocked and taken synchronously with `sigwait`, so there are no handlers and
//! no unsafe code. Blocked signals stay pending even for a namespace's PID 1 (which otherwise
//! drops signals it has no handler for), so SIGTERM from inside the pod still works.

use std::process::ExitCode;

use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

const USAGE: &str = "usage: wsrelay-pause [--version | --help]\n\
Blocks until SIGINT or SIGTERM (then exits 0), reaping child processes meanwhile.";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.next()) {
        (None, _) => {}
        (Some("--version" | "-V"), None) => {
            println!("wsrelay-pause {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        (Some("--help" | "-h"), None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    }
    match run() {
        Ok(signal) => {
            eprintln!("wsrelay-pause: {signal}, exiting");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wsrelay-pause: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Waits for SIGINT or SIGTERM, reaping children on every SIGCHLD; returns the signal.
fn run() -> Result<Signal, Errno> {
    let mut set = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGCHLD] {
        set.add(signal);
    }
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
    // Children that exited before the mask was in place sent a SIGCHLD that was discarded.
    reap();
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => reap(),
            Ok(signal @ (Signal::SIGINT | Signal::SIGTERM)) => return Ok(signal),
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Collects every exited child; one SIGCHLD may stand for several.
fn reap() {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                eprintln!("wsrelay-pause: waitpid: {e}");
                return;
            }
        }
    }
}
