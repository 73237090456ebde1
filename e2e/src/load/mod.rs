//! Pure parts of the `wsrelay-load` benchmark client: the timestamped payload, the latency
//! histogram summary, the NATS text-protocol reader for the nats-server WebSocket peer and the
//! `/proc` readers. The network side lives in `src/bin/wsrelay-load.rs`.

pub mod natsproto;

use std::time::{SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Size of every published payload, in bytes.
pub const PAYLOAD_BYTES: usize = 128;

/// The key that carries the send time; no frame of any of the three protocols contains it
/// except inside a benchmark payload.
const TS_KEY: &[u8] = b"\"t\":";

/// Nanoseconds since the Unix epoch (all processes of a run share the machine's clock).
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A JSON object of exactly [`PAYLOAD_BYTES`] bytes carrying the send time `t` (nanoseconds
/// since the epoch), padded with a string: `{"t":1700000000000000000,"p":"xxx…"}`. Valid
/// JSON, so every server forwards it as JSON (wsrelay as `payload`, centrifuge as `data`).
pub fn encode_payload(t_ns: u64) -> Vec<u8> {
    let head = format!("{{\"t\":{t_ns},\"p\":\"");
    let mut out = Vec::with_capacity(PAYLOAD_BYTES);
    out.extend_from_slice(head.as_bytes());
    let pad = PAYLOAD_BYTES.saturating_sub(head.len() + 2);
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(b"\"}");
    out
}

/// Every send time found in `frame` (one per benchmark payload it holds; a centrifuge frame
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_128_bytes_of_json_and_round_trips() {
        let t = 1_763_800_000_123_456_789;
        let p = encode_payload(t);
        assert_eq!(p.len(), PAYLOAD_BYTES);
        let v: serde_json::Value = serde_json::from_slice(&p).expect("json");
        assert_eq!(v["t"], t);
        assert_eq!(timestamps(&p).collect::<Vec<_>>(), vec![t]);
    }

    #[test]
    fn timestamps_found_inside_each_protocol_frame() {
        let p = String::from_utf8(encode_payload(42)).expect("utf8");
        let wsrelay = format!(r#"{{"type":"message","channel":"bench.all","payload":{p}}}"#);
        assert_eq!(timestamps(wsrelay.as_bytes()).collect::<Vec<_>>(), vec![42]);
        let q = String::from_utf8(encode_payload(43)).expect("utf8");
        let centrifuge = format!(
            "{{\"push\":{{\"channel\":\"c\",\"pub\":{{\"data\":{p}}}}}}}\n{{\"push\":{{\"channel\":\"c\",\"pub\":{{\"data\":{q}}}}}}}"
        );
        assert_eq!(
            timestamps(centrifuge.as_bytes()).collect::<Vec<_>>(),
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
}
