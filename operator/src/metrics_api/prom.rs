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

/// Every sample named exactly `name` in `text`, with its labels (in exposition order) and
/// value. Label values are unescaped (`\\`, `\"`, `\n`); a malformed line is skipped.
pub fn samples(text: &str, name: &str) -> Vec<(Vec<(String, String)>, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (labels, rest) = match rest.strip_prefix('{') {
            Some(inner) => match parse_labels(inner) {
                Some(parsed) => parsed,
                None => continue,
            },
            None => (Vec::new(), rest),
        };
        if !rest.starts_with([' ', '\t']) {
            continue;
        }
        if let Some(value) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite())
        {
            out.push((labels, value));
        }
    }
    out
}

/// Parses `a="x",b="y"}` (after the `{`): the labels and what follows the `}`.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let (key, rest) = s.split_once('=')?;
        let mut chars = rest.strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        labels.push((key.trim().to_string(), value));
        s = &rest[end + 2..];
    }
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
    fn labelled_samples_are_read_with_their_labels() {
        let text = "# TYPE e gauge\ne{server=\"nats://a:1\",error=\"say \\\"no\\\"\"} 1\ne_other 2\ne 3\ne{x=\"1\"\n";
        assert_eq!(
            samples(text, "e"),
            [
                (
                    vec![
                        ("server".to_string(), "nats://a:1".to_string()),
                        ("error".to_string(), "say \"no\"".to_string())
                    ],
                    1.0
                ),
                (vec![], 3.0)
            ]
        );
    }

    #[test]
    fn counts_are_rounded_and_never_negative() {
        assert_eq!(as_count(3.0), 3);
        assert_eq!(as_count(2.9999), 3);
        assert_eq!(as_count(-1.0), 0);
    }
}
