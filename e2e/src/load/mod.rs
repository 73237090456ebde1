//! Pure parts of the `wsrelay-load` benchmark client: the timestamped payload, the latency
//! histogram summary, the NATS text-protocol reader for the nats-server WebSocket peer, the
//! `/proc` readers (process CPU and memory, per-core busy time, the kernel's TCP counters) and
//! the reader of a Prometheus histogram (the relay's own delivery latency), the presence
//! workload's frame kinds and occupancy bound ([`presence`]). The network side
//! lives in `src/bin/wsrelay-load.rs`.

pub mod natsproto;
pub mod presence;

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Default size of a published payload, in bytes.
pub const PAYLOAD_BYTES: usize = 128;

/// The key that carries the send time; no frame of any of the three protocols contains it
/// except inside a benchmark payload.
const TS_KEY: &[u8] = b"\"t\":";

/// Nanoseconds on the monotonic clock since this process first asked (the sender and the
/// receivers of a timestamp are the same process, so no wall clock is involved).
pub fn now_ns() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

/// A JSON object of `size` bytes (at least the header's) carrying the time `t` (nanoseconds
/// on [`now_ns`]'s clock: the time the schedule says it is due, not when it left), padded
/// with a string: `{"t":123456789,"p":"xxx…"}`. Valid JSON, so every server forwards it as
/// JSON (wsrelay as `payload`, Centrifugo as `data`).
pub fn encode_payload(t_ns: u64, size: usize) -> Vec<u8> {
    let head = format!("{{\"t\":{t_ns},\"p\":\"");
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(head.as_bytes());
    let pad = size.saturating_sub(head.len() + 2);
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(b"\"}");
    out
}

/// Every send time found in `frame` (one per benchmark payload it holds; a Centrifugo frame
/// may batch several).
pub fn timestamps(frame: &[u8]) -> impl Iterator<Item = u64> + '_ {
    let mut rest = frame;
    std::iter::from_fn(move || {
        loop {
            let at = find(rest, TS_KEY)?;
            rest = &rest[at + TS_KEY.len()..];
            let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
            if digits == 0 {
                continue;
            }
            let value = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok();
            rest = &rest[digits..];
            if value.is_some() {
                return value;
            }
        }
    })
}

/// Position of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A latency histogram in microseconds, 1 µs to 120 s, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

/// Percentiles of a latency histogram, in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

/// The summary of `h` (recorded in microseconds).
pub fn summarize(h: &Histogram<u64>) -> Summary {
    let ms = |us: u64| us as f64 / 1000.0;
    if h.is_empty() {
        return Summary {
            count: 0,
            p50_ms: 0.0,
            p90_ms: 0.0,
            p99_ms: 0.0,
            p999_ms: 0.0,
            max_ms: 0.0,
            mean_ms: 0.0,
        };
    }
    Summary {
        count: h.len(),
        p50_ms: ms(h.value_at_quantile(0.50)),
        p90_ms: ms(h.value_at_quantile(0.90)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
        mean_ms: h.mean() / 1000.0,
    }
}

/// CPU time (user + system) of a process, in clock ticks, from `/proc/PID/stat` text.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A `kB` field (`VmRSS`, `VmHWM`) of `/proc/PID/status` text, in bytes.
pub fn parse_status_kb(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let v = l.strip_prefix(field)?.strip_prefix(':')?;
        let kb: u64 = v.split_whitespace().next()?.parse().ok()?;
        Some(kb * 1024)
    })
}

/// One reading of a process: CPU seconds so far, resident and peak resident bytes.
#[derive(Debug, Clone, Copy, Serialize, Default, PartialEq)]
pub struct ProcSample {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
    pub hwm_bytes: u64,
}

/// Reads `/proc/PID/{stat,status}`; `clk_tck` is `getconf CLK_TCK`.
pub fn sample_proc(pid: u32, clk_tck: u64) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(ProcSample {
        cpu_seconds: parse_stat_ticks(&stat)? as f64 / clk_tck.max(1) as f64,
        rss_bytes: parse_status_kb(&status, "VmRSS").unwrap_or(0),
        hwm_bytes: parse_status_kb(&status, "VmHWM").unwrap_or(0),
    })
}

/// Busy and total clock ticks of each CPU (`cpu0`, `cpu1`, ...) from `/proc/stat` text; busy is
/// everything but idle and iowait.
pub fn parse_cpu_ticks(stat: &str) -> BTreeMap<String, (u64, u64)> {
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let name = f.next()?.to_string();
            let v: Vec<u64> = f.filter_map(|x| x.parse().ok()).collect();
            let total: u64 = v.iter().take(8).sum();
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            Some((name, (total - idle.min(total), total)))
        })
        .collect()
}

/// The kernel's TCP counters (`/proc/net/netstat` and `/proc/net/snmp` text: header line,
/// value line, per group), keyed `Group.Name` (`TcpExt.ListenOverflows`, `Tcp.RetransSegs`).
pub fn parse_netstat(text: &str) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        let [head, values] = pair else { continue };
        let (Some((g1, names)), Some((g2, vals))) = (head.split_once(':'), values.split_once(':'))
        else {
            continue;
        };
        if g1 != g2 {
            continue;
        }
        for (n, v) in names.split_whitespace().zip(vals.split_whitespace()) {
            if let Ok(v) = v.parse() {
                out.insert(format!("{g1}.{n}"), v);
            }
        }
    }
    out
}

/// The buckets (`le` upper bound in seconds, cumulative count) of the Prometheus histogram
/// `name` in a text exposition, in order; `+Inf` is `f64::INFINITY`.
pub fn parse_prom_histogram(text: &str, name: &str) -> Vec<(f64, u64)> {
    let prefix = format!("{name}_bucket{{");
    let mut out: Vec<(f64, u64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let le = rest.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = l.rsplit(' ').next()?.parse::<f64>().ok()? as u64;
            Some((le, count))
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// The sum of the samples of the Prometheus counter `name` (any suffix such as `_total` is
/// part of `name`) whose labels include every `key="value"` of `labels`, in a text
/// exposition; `None` when no sample matches.
pub fn parse_prom_counter(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for l in text.lines() {
        let Some(rest) = l.strip_prefix(name) else {
            continue;
        };
        let (set, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once("} ") {
                Some((set, value)) => (set, value),
                None => continue,
            },
            None => match rest.strip_prefix(' ') {
                Some(value) => ("", value),
                None => continue,
            },
        };
        let wanted = labels
            .iter()
            .all(|(k, v)| set.split(',').any(|p| p == format!("{k}=\"{v}\"")));
        if !wanted {
            continue;
        }
        if let Some(v) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// Percentile `q` (0..1) of the difference of two readings of one cumulative histogram: the
/// upper bound of the bucket it falls in, in milliseconds (`None` when nothing was counted;
/// infinite when it is in the last, open bucket).
pub fn histogram_delta_quantile(
    before: &[(f64, u64)],
    after: &[(f64, u64)],
    q: f64,
) -> Option<f64> {
    let delta: Vec<(f64, u64)> = after
        .iter()
        .map(|(le, c)| {
            let b = before
                .iter()
                .find(|(l, _)| l == le)
                .map(|x| x.1)
                .unwrap_or(0);
            (*le, c.saturating_sub(b))
        })
        .collect();
    let total = delta.last()?.1;
    if total == 0 {
        return None;
    }
    let want = (q * total as f64).ceil() as u64;
    delta
        .iter()
        .find(|(_, c)| *c >= want)
        .map(|(le, _)| le * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_128_bytes_of_json_and_round_trips() {
        let t = 1_763_800_000_123_456_789;
        let p = encode_payload(t, PAYLOAD_BYTES);
        assert_eq!(p.len(), PAYLOAD_BYTES);
        assert_eq!(encode_payload(t, 65536).len(), 65536);
        assert_eq!(
            timestamps(&encode_payload(t, 64)).collect::<Vec<_>>(),
            vec![t]
        );
        let v: serde_json::Value = serde_json::from_slice(&p).expect("json");
        assert_eq!(v["t"], t);
        assert_eq!(timestamps(&p).collect::<Vec<_>>(), vec![t]);
    }

    #[test]
    fn timestamps_found_inside_each_protocol_frame() {
        let p = String::from_utf8(encode_payload(42, PAYLOAD_BYTES)).expect("utf8");
        let wsrelay = format!(r#"{{"type":"message","channel":"bench.all","payload":{p}}}"#);
        assert_eq!(timestamps(wsrelay.as_bytes()).collect::<Vec<_>>(), vec![42]);
        let q = String::from_utf8(encode_payload(43, PAYLOAD_BYTES)).expect("utf8");
        let centrifugo = format!(
            "{{\"push\":{{\"channel\":\"c\",\"pub\":{{\"data\":{p}}}}}}}\n{{\"push\":{{\"channel\":\"c\",\"pub\":{{\"data\":{q}}}}}}}"
        );
        assert_eq!(
            timestamps(centrifugo.as_bytes()).collect::<Vec<_>>(),
            vec![42, 43]
        );
        assert_eq!(timestamps(br#"{"type":"ok","id":1}"#).count(), 0);
        assert_eq!(
            timestamps(br#"{"t":"x","t":7}"#).collect::<Vec<_>>(),
            vec![7]
        );
    }

    #[test]
    fn summary_in_milliseconds() {
        let mut h = new_histogram();
        for us in 1..=1000u64 {
            h.record(us * 1000).expect("record");
        }
        let s = summarize(&h);
        assert_eq!(s.count, 1000);
        assert!((s.p50_ms - 500.0).abs() < 1.0, "{s:?}");
        assert!((s.p99_ms - 990.0).abs() < 1.0, "{s:?}");
        assert!((s.max_ms - 1000.0).abs() < 1.0, "{s:?}");
        assert_eq!(summarize(&new_histogram()).count, 0);
    }

    #[test]
    fn proc_parsers() {
        let stat = "1234 (wsrelay run) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0";
        assert_eq!(parse_stat_ticks(stat), Some(300));
        let status = "Name:\twsrelay\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(parse_status_kb(status, "VmRSS"), Some(10240 * 1024));
        assert_eq!(parse_status_kb(status, "VmHWM"), Some(20480 * 1024));
        assert_eq!(parse_status_kb(status, "VmSwap"), None);
    }

    #[test]
    fn cpu_ticks_per_core() {
        let stat = "cpu  10 0 10 100 5 0 0 0 0 0\ncpu0 4 0 6 50 2 0 0 0 0 0\ncpu1 6 0 4 50 3 1 0 0 0 0\nintr 1\n";
        let t = parse_cpu_ticks(stat);
        assert_eq!(t.len(), 2);
        assert_eq!(t["cpu0"], (10, 62));
        assert_eq!(t["cpu1"], (11, 64));
    }

    #[test]
    fn netstat_counters() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 7 9\nIpExt: InNoRoutes\nIpExt: 3\n";
        let n = parse_netstat(text);
        assert_eq!(n["TcpExt.ListenOverflows"], 7);
        assert_eq!(n["TcpExt.ListenDrops"], 9);
        assert_eq!(n["IpExt.InNoRoutes"], 3);
    }

    #[test]
    fn prometheus_counter_by_labels() {
        let text = "# TYPE wsrelay_authorize_cache_total counter\n\
            wsrelay_authorize_cache_total{op=\"subscribe\",result=\"hit\"} 12\n\
            wsrelay_authorize_cache_total{op=\"subscribe\",result=\"miss\"} 3\n\
            wsrelay_authorize_cache_total{op=\"publish\",result=\"hit\"} 5\n\
            wsrelay_authorize_cache_total_created 1\n\
            wsrelay_connections 7\n";
        let c = |labels: &[(&str, &str)]| {
            parse_prom_counter(text, "wsrelay_authorize_cache_total", labels)
        };
        assert_eq!(c(&[("op", "subscribe"), ("result", "hit")]), Some(12.0));
        assert_eq!(c(&[("result", "hit")]), Some(17.0));
        assert_eq!(c(&[]), Some(20.0));
        assert_eq!(c(&[("op", "connect")]), None);
        assert_eq!(
            parse_prom_counter(text, "wsrelay_connections", &[]),
            Some(7.0)
        );
        assert_eq!(parse_prom_counter(text, "wsrelay_absent_total", &[]), None);
    }

    #[test]
    fn prometheus_histogram_delta() {
        let a = "x_bucket{le=\"0.001\"} 10\nx_bucket{le=\"0.002\"} 20\nx_bucket{le=\"+Inf\"} 20\nx_count 20\n";
        let b =
            "x_bucket{le=\"0.001\"} 110\nx_bucket{le=\"0.002\"} 219\nx_bucket{le=\"+Inf\"} 220\n";
        let (a, b) = (parse_prom_histogram(a, "x"), parse_prom_histogram(b, "x"));
        assert_eq!(b.len(), 3);
        assert_eq!(histogram_delta_quantile(&a, &b, 0.5), Some(1.0));
        assert_eq!(histogram_delta_quantile(&a, &b, 0.99), Some(2.0));
        assert_eq!(histogram_delta_quantile(&a, &b, 1.0), Some(f64::INFINITY));
        assert_eq!(histogram_delta_quantile(&b, &b, 0.5), None);
    }
}
