//! Reading one unlabelled gauge out of a Prometheus (or OpenMetrics) text exposition.

/// The value of the sample named exactly `name` (no labels) in `text`, if there is one.
///
/// Only what the relay emits has to be understood, but the parser stays lenient about the
/// rest of the format: comments, other families, labelled samples, optional timestamps,
/// `+Inf`/`NaN` (which are not a connection count and yield None).
pub fn gauge(text: &str, name: &str) -> Option<f64> {
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // `wsrelay_connections_total 3` must not match `wsrelay_connections`.
        let rest = if let Some(labels) = rest.strip_prefix('{') {
            // Accept only an empty label set: the gauge has no labels.
            match labels.strip_prefix('}') {
                Some(r) => r,
                None => continue,
            }
        } else {
            rest
        };
        if !rest.starts_with([' ', '\t']) {
            continue;
        }
        let value = rest.split_whitespace().next()?;
        return value.parse::<f64>().ok().filter(|v| v.is_finite());
    }
    None
}

/// A gauge value as a connection count: rounded, never negative.
pub fn as_count(value: f64) -> i64 {
    // A gauge of open connections is integral; rounding only guards against float noise.
    value.round().max(0.0) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    const RELAY: &str = "\
# HELP wsrelay_connections Open WebSocket connections.
# TYPE wsrelay_connections gauge
wsrelay_connections 5
# HELP wsrelay_connections_accepted Connections accepted.
# TYPE wsrelay_connections_accepted counter
wsrelay_connections_accepted_total 12
wsrelay_refused_total{reason=\"auth\"} 1
# EOF
";

    #[test]
    fn reads_the_unlabelled_gauge() {
        assert_eq!(gauge(RELAY, "wsrelay_connections"), Some(5.0));
    }

    #[test]
    fn a_longer_name_with_the_same_prefix_does_not_match() {
        let text = "wsrelay_connections_accepted_total 12\nwsrelay_connections 7\n";
        assert_eq!(gauge(text, "wsrelay_connections"), Some(7.0));
        assert_eq!(gauge(text, "wsrelay_conn"), None);
    }

    #[test]
    fn empty_label_set_timestamps_and_floats_are_understood() {
        assert_eq!(gauge("m{} 3 1700000000000\n", "m"), Some(3.0));
        assert_eq!(gauge("m 2.0e1\n", "m"), Some(20.0));
        assert_eq!(gauge("m\t4\n", "m"), Some(4.0));
    }

    #[test]
    fn labelled_missing_or_non_finite_samples_yield_none() {
        assert_eq!(gauge("m{pod=\"a\"} 3\n", "m"), None);
        assert_eq!(gauge("# m 3\nother 1\n", "m"), None);
        assert_eq!(gauge("m NaN\n", "m"), None);
        assert_eq!(gauge("m +Inf\n", "m"), None);
        assert_eq!(gauge("m garbage\n", "m"), None);
        assert_eq!(gauge("", "m"), None);
    }

    #[test]
    fn counts_are_rounded_and_never_negative() {
        assert_eq!(as_count(3.0), 3);
        assert_eq!(as_count(2.9999), 3);
        assert_eq!(as_count(-1.0), 0);
    }
}
