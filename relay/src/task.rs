//! The panic boundary of the relay's own tasks. A bug that panics in one connection's task
//! (or one subject's) must end that connection cleanly and nothing else: the process, its NATS
//! client and every other connection go on. The panic itself is logged once, by the hook
//! `main` installs; here it is counted.

use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;

use crate::metrics::Metrics;

/// Runs `fut` to its end; `None` if it panicked (counted in `wsrelay_task_panics_total`).
/// What `fut` held is dropped by the unwind: its caller releases what it registered.
/// Not an `async fn`: that would hold `fut` twice (as its argument and inside the
/// `CatchUnwind`), and an idle connection's task is sized by its reader's future.
pub fn catch<'a, F: Future + 'a>(
    task: &'static str,
    metrics: &'a Metrics,
    fut: F,
) -> impl Future<Output = Option<F::Output>> + 'a {
    AssertUnwindSafe(fut).catch_unwind().map(move |r| match r {
        Ok(v) => Some(v),
        Err(_) => {
            metrics.task_panics.inc();
            tracing::debug!(task, "panic caught at the task boundary");
            None
        }
    })
}

/// Logs a panic as one structured error line (message and place), instead of the default
/// hook's text on stderr.
pub fn install_panic_log() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(panic = %message, at, "task panicked");
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_is_caught_and_counted() {
        let m = Metrics::new();
        assert_eq!(catch("t", &m, async { 7 }).await, Some(7));
        let r = catch("t", &m, async {
            let v: Vec<u8> = Vec::new();
            // An index out of bounds, as a bug would.
            v[usize::from(v.is_empty())]
        })
        .await;
        assert_eq!(r, None);
        assert_eq!(m.task_panics.get(), 1);
        assert!(m.encode().contains("wsrelay_task_panics_total 1"));
    }
}
