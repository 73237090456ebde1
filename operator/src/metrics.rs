//! The operator's own Prometheus metrics, served on the admin port.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::CATEGORIES;
use crate::forget::{ForgetCounts, ForgetLabels, RESULTS};
use crate::gateway_metrics::GatewayMetrics;
use crate::metrics_api::ScrapeMetrics;
use crate::rebalance::{self, RebalanceMetrics, RoundLabels};

/// Label of a failure: its bounded category.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub category: String,
}

/// Label of a stage of the reconcile pipeline.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: &'static str,
}

/// Reconcile counters, the duration histogram and the leadership gauge.
#[derive(Debug)]
pub struct Metrics {
    pub reconciles: Counter,
    pub failures: Family<FailureLabels, Counter>,
    pub duration: Histogram,
    pub leader: Gauge,
    /// The custom metrics API's scrapes of the relays (it counts into these clones).
    pub scrape: ScrapeMetrics,
    /// `wsrelay_operator_reconcile_stage_duration_seconds{stage}`: time spent in each stage
    /// of the pipeline (fetch, validate, build, apply, status).
    pub stage_duration: Family<StageLabels, Histogram>,
    /// Per-gateway series read from the leader's caches at scrape time.
    pub gateways: GatewayMetrics,
    /// `wsrelay_operator_registry_forgets_total{result}`: lost relays the operator asked a
    /// live one to forget ([`crate::forget`]), by outcome.
    pub forgets: ForgetCounts,
    /// `wsrelay_operator_rebalance_rounds_total{result}` and
    /// `wsrelay_operator_rebalance_moves_requested_total` ([`crate::rebalance`]).
    pub rebalance: RebalanceMetrics,
    registry: Registry,
}

/// 0.1 ms .. ~3 s: a stage is a cache read, pure code, or a few API calls.
fn stage_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_1, 2.0, 15))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("wsrelay_operator");
        let reconciles = Counter::default();
        let failures = Family::<FailureLabels, Counter>::default();
        // 1ms .. ~16s: a reconcile is a handful of API calls.
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let leader = Gauge::default();
        registry.register("reconciles", "Reconciles started", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Failed reconciles by error category",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile took",
            duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        let stage_duration =
            Family::<StageLabels, Histogram>::new_with_constructor(stage_histogram as fn() -> _);
        registry.register(
            "reconcile_stage_duration_seconds",
            "Time one stage of a reconcile took (fetch, validate, build, apply, status)",
            stage_duration.clone(),
        );
        let gateways = GatewayMetrics::default();
        registry.register_collector(Box::new(gateways.clone()));
        let scrape = ScrapeMetrics::new();
        scrape.register(&mut registry);
        let forgets = ForgetCounts::default();
        registry.register(
            "registry_forgets",
            "Lost relay pods whose registry entries the operator asked a live relay to delete, by result (ok; failed: no relay asked answered; no_relay: none to ask)",
            forgets.clone(),
        );
        for result in RESULTS {
            let _ = forgets.get_or_create(&ForgetLabels { result });
        }
        let rebalance = RebalanceMetrics::default();
        registry.register(
            "rebalance_rounds",
            "Rebalance rounds the operator started, by result (ok: every hot relay took its part; partial; failed: none did)",
            rebalance.rounds.clone(),
        );
        registry.register(
            "rebalance_moves_requested",
            "Connections the operator asked hot relays to move in rebalance rounds",
            rebalance.moves_requested.clone(),
        );
        for result in rebalance::RESULTS {
            let _ = rebalance.rounds.get_or_create(&RoundLabels { result });
        }
        // Every category shows up at 0 from the start, so rate() works on the first failure.
        for category in CATEGORIES {
            let _ = failures.get_or_create(&FailureLabels {
                category: (*category).to_string(),
            });
        }
        Self {
            reconciles,
            failures,
            duration,
            leader,
            scrape,
            stage_duration,
            gateways,
            forgets,
            rebalance,
            registry,
        }
    }

    /// Records how long `stage` of a reconcile took.
    pub fn stage(&self, stage: &'static str, seconds: f64) {
        self.stage_duration
            .get_or_create(&StageLabels { stage })
            .observe(seconds);
    }

    /// Counts a failure under its category.
    pub fn failed(&self, category: &str) {
        self.failures
            .get_or_create(&FailureLabels {
                category: category.to_string(),
            })
            .inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_labelled_by_category() {
        let m = Metrics::new();
        m.reconciles.inc();
        m.failed("SecretNotFound");
        m.duration.observe(0.01);
        let text = m.encode();
        assert!(
            text.contains("wsrelay_operator_reconciles_total 1"),
            "{text}"
        );
        assert!(
            text.contains(
                r#"wsrelay_operator_reconcile_failures_total{category="SecretNotFound"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"wsrelay_operator_reconcile_failures_total{category="ApplyFailed"} 0"#),
            "{text}"
        );
        assert!(
            text.contains("wsrelay_operator_reconcile_duration_seconds_count 1"),
            "{text}"
        );
    }

    #[test]
    fn forgets_are_counted_by_result_from_zero() {
        let m = Metrics::new();
        let text = m.encode();
        for result in RESULTS {
            let want = format!("wsrelay_operator_registry_forgets_total{{result=\"{result}\"}} 0");
            assert!(text.contains(&want), "{want} not in {text}");
        }
        m.forgets
            .get_or_create(&ForgetLabels { result: "ok" })
            .inc();
        assert!(
            m.encode()
                .contains(r#"wsrelay_operator_registry_forgets_total{result="ok"} 1"#)
        );
    }

    #[test]
    fn rebalance_rounds_and_moves_are_counted_from_zero() {
        let m = Metrics::new();
        let text = m.encode();
        for result in rebalance::RESULTS {
            let want = format!("wsrelay_operator_rebalance_rounds_total{{result=\"{result}\"}} 0");
            assert!(text.contains(&want), "{want} not in {text}");
        }
        assert!(text.contains("wsrelay_operator_rebalance_moves_requested_total 0"));
        m.rebalance
            .rounds
            .get_or_create(&RoundLabels { result: "partial" })
            .inc();
        m.rebalance.moves_requested.inc_by(300);
        let text = m.encode();
        assert!(text.contains(r#"wsrelay_operator_rebalance_rounds_total{result="partial"} 1"#));
        assert!(text.contains("wsrelay_operator_rebalance_moves_requested_total 300"));
    }

    #[test]
    fn the_metrics_api_scrapes_count_into_the_operators_registry() {
        let m = Metrics::new();
        // The metrics API holds a clone: what it counts shows on the operator's /metrics.
        let scraper_side = m.scrape.clone();
        scraper_side.ok.inc();
        scraper_side.failed.inc();
        scraper_side.failed.inc();
        let text = m.encode();
        assert!(
            text.contains("wsrelay_operator_metrics_api_scrapes_total 1"),
            "{text}"
        );
        assert!(
            text.contains("wsrelay_operator_metrics_api_scrape_failures_total 2"),
            "{text}"
        );
    }
}
