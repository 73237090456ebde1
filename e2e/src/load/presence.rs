//! The pure parts of `wsrelay-load`'s presence workload (issue 26): which presence frame a
//! client received, and the bound a steady observer of a large channel checks: occupancy
//! only (no `join`/`leave` above `maxMembersWithEvents`), at most one per second.

use serde::Serialize;
use wsrelay_testkit::client::Head;

/// A frame's kind, as far as presence is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Join,
    Leave,
    Occupancy,
    /// Anything else (a reply, a message, a notice).
    Other,
}

/// The kind of the frame `text`, read from its head alone (no value tree of the rest).
pub fn kind_of(text: &[u8]) -> FrameKind {
    match serde_json::from_slice::<Head<'_>>(text).map(|h| h.kind) {
        Ok("join") => FrameKind::Join,
        Ok("leave") => FrameKind::Leave,
        Ok("occupancy") => FrameKind::Occupancy,
        _ => FrameKind::Other,
    }
}

/// The observer's verdict over a window: `pass` only when it received occupancy frames and
/// nothing else presence sends, at most one per second.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Bound {
    pub pass: bool,
    /// The rule checked, in words (the report prints it).
    pub rule: String,
    /// Why it failed; empty when it passed.
    pub reason: String,
    /// The most occupancy frames the rule admits in the window.
    pub max_allowed: u64,
}

/// Checks the frames an observer received in a window of `window_s` seconds: `occupancy`
/// arrival times (seconds from the window's start, any order), and the `join`s and
/// `leave`s. The relay sends at most one `occupancy` per second; a frame sent just before the
/// window can arrive in it late, so a window of W seconds admits ⌈W⌉ + 1. At least one must
/// have arrived: a window without any measured nothing (the counts did not change).
pub fn occupancy_bound(window_s: f64, occupancy_s: &[f64], joins: u64, leaves: u64) -> Bound {
    let max_allowed = window_s.max(0.0).ceil() as u64 + 1;
    let n = occupancy_s.len() as u64;
    let reason = if joins + leaves > 0 {
        format!(
            "{joins} join and {leaves} leave frames: expected occupancy only (the channel is above maxMembersWithEvents)"
        )
    } else if n == 0 {
        "no occupancy frame in the window: nothing was measured".to_string()
    } else if n > max_allowed {
        format!(
            "{n} occupancy frames in {window_s:.1} s: more than one per second (at most {max_allowed})"
        )
    } else {
        String::new()
    };
    Bound {
        pass: reason.is_empty(),
        rule: format!(
            "occupancy only (no join/leave) and at most one per second: at most ⌈W⌉ + 1 = {max_allowed} in the {window_s:.1} s window"
        ),
        reason,
        max_allowed,
    }
}

/// The shortest time between two consecutive arrivals (seconds), if there are two.
pub fn min_gap(times_s: &[f64]) -> Option<f64> {
    let mut t = times_s.to_vec();
    t.sort_by(f64::total_cmp);
    t.windows(2).map(|w| w[1] - w[0]).min_by(f64::total_cmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_told_apart_by_their_type() {
        assert_eq!(
            kind_of(br#"{"type":"occupancy","channel":"c","clients":3,"users":2,"events":false}"#),
            FrameKind::Occupancy
        );
        assert_eq!(
            kind_of(br#"{"type":"join","channel":"c","member":{"key":"a","info":{}}}"#),
            FrameKind::Join
        );
        assert_eq!(
            kind_of(br#"{"type":"leave","channel":"c","member":{"key":"a","info":{}}}"#),
            FrameKind::Leave
        );
        assert_eq!(kind_of(br#"{"type":"ok","id":3}"#), FrameKind::Other);
        assert_eq!(kind_of(b"not json"), FrameKind::Other);
    }

    #[test]
    fn the_bound_admits_one_per_second_and_one_late_frame() {
        let once: Vec<f64> = (0..18).map(|s| s as f64 + 0.5).collect();
        assert!(occupancy_bound(18.0, &once, 0, 0).pass);
        // 19 = ⌈18⌉ + 1: a frame sent before the window that arrived in it.
        let late: Vec<f64> = std::iter::once(0.01).chain(once.iter().copied()).collect();
        assert!(occupancy_bound(18.0, &late, 0, 0).pass);
        let twice: Vec<f64> = (0..36).map(|s| s as f64 * 0.5).collect();
        let b = occupancy_bound(18.0, &twice, 0, 0);
        assert!(
            !b.pass && b.reason.contains("more than one per second"),
            "{b:?}"
        );
        let b = occupancy_bound(18.0, &once, 1, 0);
        assert!(!b.pass && b.reason.contains("join"), "{b:?}");
        let b = occupancy_bound(18.0, &[], 0, 0);
        assert!(
            !b.pass && b.reason.contains("nothing was measured"),
            "{b:?}"
        );
    }

    #[test]
    fn the_shortest_gap_between_arrivals() {
        let t = [3.0, 0.0, 1.0, 1.2, 5.0];
        assert_eq!(min_gap(&t).map(|g| (g * 10.0).round()), Some(2.0));
        assert_eq!(min_gap(&[1.0]), None);
    }
}
