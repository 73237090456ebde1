//! Stream upkeep: keeps the history streams the config names, and the connection registry's
//! bucket, in place (created or updated at start, after a reload and every minute), tells
//! the hub when a history stream was recreated behind the relay's back, and exports why a
//! stream is not in place.

use std::sync::Arc;
use std::time::Duration;

use crate::history::{stream, wanted_streams};
use crate::state::Relay;

/// Keeps the streams of the live config in place: creates or updates them at start, after
/// a reload and every `every`, retrying every 2 s while JetStream does not answer. An epoch
/// that changes (a stream recreated behind the relay's back) is reported to `changed`.
pub async fn maintain(relay: Arc<Relay>, every: Duration, changed: impl Fn(&str)) {
    let js = async_nats::jetstream::new(relay.hub.client().clone());
    let mut applied: Option<Vec<async_nats::jetstream::stream::Config>> = None;
    let mut last_check = tokio::time::Instant::now();
    let mut failures: u32 = 0;
    loop {
        let mut wanted = wanted_streams(&relay.settings().config);
        let bucket = relay.registry.as_ref().map(|r| r.stream_config().clone());
        wanted.extend(bucket.clone());
        // The events' stream, as the config at start named it (events change at a restart).
        let events = relay
            .registry
            .as_ref()
            .and(relay.events_stream.as_ref())
            .cloned();
        wanted.extend(events.clone());
        let due = applied.as_ref() != Some(&wanted) || last_check.elapsed() >= every;
        if due {
            let mut all_ok = true;
            let mut failed = Vec::new();
            for cfg in &wanted {
                let is_bucket = bucket.as_ref().is_some_and(|b| b.name == cfg.name);
                let ensured = stream::ensure(&js, cfg.clone()).await;
                if is_bucket {
                    // The registry's bucket is not a history stream: its state is its own.
                    if let Some(r) = &relay.registry {
                        if let Err(e) = &ensured {
                            tracing::warn!(error = %e, "registry bucket not in place; the relay keeps serving");
                        }
                        r.bucket_ready(ensured.is_ok()).await;
                    }
                    all_ok &= ensured.is_ok();
                    continue;
                }
                if events.as_ref().is_some_and(|e| e.name == cfg.name) {
                    if let Err(e) = &ensured {
                        tracing::warn!(error = %e, "events stream not in place; events are counted as failed until it is");
                    }
                    all_ok &= ensured.is_ok();
                    continue;
                }
                match ensured {
                    Ok(epoch) => {
                        if relay.hub.streams().set(&cfg.name, epoch).is_some() {
                            tracing::warn!(stream = %cfg.name, "history stream recreated: positions of the old one are void");
                            changed(&cfg.name);
                        }
                    }
                    Err(e) => {
                        all_ok = false;
                        tracing::warn!(error = %e, "history stream not in place; resumable subscribes answer 503");
                        failed.push(crate::metrics::StreamError {
                            stream: cfg.name.clone(),
                            // A label value: no quote, backslash or line break to escape.
                            error: e
                                .reason()
                                .chars()
                                .map(|c| match c {
                                    '"' => '\'',
                                    '\\' => '/',
                                    c if c.is_control() => ' ',
                                    c => c,
                                })
                                .take(200)
                                .collect(),
                        });
                    }
                }
            }
            // Why each stream is not in place, for the operator (Degraded HistoryNotReady)
            // and for dashboards: a refusal is a config error that no retry mends.
            let errors = &relay.metrics.history_stream_error;
            errors.clear();
            for f in failed {
                errors.get_or_create(&f).set(1);
            }
            relay
                .metrics
                .history_streams_ready
                .set(i64::try_from(relay.hub.streams().ready()).unwrap_or(0));
            if all_ok {
                applied = Some(wanted);
                last_check = tokio::time::Instant::now();
            }
        }
        // While JetStream refuses (not enabled, no permission), retry with backoff up to
        // 30 s: the warning above is logged at that pace, not twice a second.
        failures = if applied.is_some() { 0 } else { failures + 1 };
        let pause = if failures == 0 {
            Duration::from_secs(2)
        } else {
            Duration::from_millis(250u64.saturating_mul(1 << failures.min(7)))
        };
        tokio::select! {
            () = relay.shutdown.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}
