//! One tracing span per reconcile, `reconcile{gateway}`, with the time each stage of the
//! pipeline took as span fields (`fetch_ms`, `validate_ms`, `build_ms`, `apply_ms`,
//! `status_ms`; a stage that did not run stays empty), and the same durations in the histogram
//! `wsrelay_operator_reconcile_stage_duration_seconds{stage}`. Every log line of the reconcile
//! carries the span's fields; the last one, `reconciled`, carries them all and the total
//! (`info` when the reconcile applied children or failed, `debug` for a status refresh).

use std::sync::Arc;
use std::time::Instant;

use tracing::Span;
use tracing::field::Empty;

use crate::metrics::Metrics;

/// The stages, in pipeline order, and their span fields.
pub const STAGES: &[(&str, &str)] = &[
    ("fetch", "fetch_ms"),
    ("validate", "validate_ms"),
    ("build", "build_ms"),
    ("apply", "apply_ms"),
    ("status", "status_ms"),
];

/// The span of one reconcile of `gateway` (`namespace/name`).
pub fn reconcile_span(gateway: &str) -> Span {
    tracing::info_span!(
        "reconcile",
        gateway,
        fetch_ms = Empty,
        validate_ms = Empty,
        build_ms = Empty,
        apply_ms = Empty,
        status_ms = Empty,
        total_ms = Empty,
    )
}

/// The clock of one reconcile: [`Stages::done`] ends a stage, [`Stages::finish`] the whole.
#[derive(Debug)]
pub struct Stages {
    span: Span,
    metrics: Arc<Metrics>,
    started: Instant,
    last: Instant,
    applied: bool,
}

fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl Stages {
    /// Starts the clock of a reconcile in `span`.
    pub fn new(span: Span, metrics: Arc<Metrics>) -> Self {
        let now = Instant::now();
        Self {
            span,
            metrics,
            started: now,
            last: now,
            applied: false,
        }
    }

    /// Ends `stage` (one of [`STAGES`]): the time since the previous stage ended (or the
    /// reconcile began) goes into its span field and its histogram.
    pub fn done(&mut self, stage: &'static str) {
        let now = Instant::now();
        let took = now - self.last;
        self.last = now;
        if let Some((_, field)) = STAGES.iter().find(|(s, _)| *s == stage) {
            self.span.record(*field, ms(took));
        }
        self.applied |= stage == "apply";
        self.metrics.stage(stage, took.as_secs_f64());
    }

    /// Restarts the stage clock without recording (time spent between stages that belongs to
    /// none of them).
    pub fn skip(&mut self) {
        self.last = Instant::now();
    }

    /// Records the total and logs `reconciled` in the span.
    pub fn finish(&self, failed: Option<&str>) {
        self.span.record("total_ms", ms(self.started.elapsed()));
        let _in = self.span.enter();
        match failed {
            Some(category) => tracing::info!(category, "reconciled: failed"),
            None if self.applied => tracing::info!("reconciled"),
            None => tracing::debug!("reconciled"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_reconcile_span_carries_each_stage_and_the_histogram_counts_them() {
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || writer.clone())
            .finish();
        let metrics = Arc::new(Metrics::new());
        tracing::subscriber::with_default(subscriber, || {
            let span = reconcile_span("apps/chat");
            let mut stages = Stages::new(span.clone(), metrics.clone());
            for (stage, _) in STAGES {
                stages.done(stage);
            }
            stages.finish(None);
        });
        let out = String::from_utf8(buf.0.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .unwrap_or_default();
        let line: serde_json::Value = out
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .find(|v: &serde_json::Value| v["fields"]["message"] == "reconciled")
            .unwrap_or_else(|| panic!("no reconciled line in {out}"));
        let span = &line["span"];
        assert_eq!(span["name"], "reconcile", "{line}");
        assert_eq!(span["gateway"], "apps/chat", "{line}");
        for (_, field) in STAGES {
            assert!(span[*field].is_f64(), "{field} missing: {line}");
        }
        assert!(span["total_ms"].is_f64(), "{line}");
        let text = metrics.encode();
        for (stage, _) in STAGES {
            let want = format!(
                "wsrelay_operator_reconcile_stage_duration_seconds_count{{stage=\"{stage}\"}} 1"
            );
            assert!(text.contains(&want), "{want} not in {text}");
        }
    }
}
