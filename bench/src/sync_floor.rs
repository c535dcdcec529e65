//! The disk's floor for acknowledgement latency under `fsync = always`, for
//! `rill-bench sync-floor` and `bench/limits.sh`.
//!
//! A group-committing log syncs back to back while records keep arriving: an append that
//! arrives while sync *i* runs is not covered by it (the flusher captured the end of the log
//! before calling `fdatasync`), so it is acknowledged when sync *i + 1* returns. Its wait is
//! the rest of sync *i* plus all of sync *i + 1*, whatever the software around it costs.
//!
//! [`measure`] writes and `fdatasync`s a file back to back, recording when each sync began
//! and ended; [`ack_floor`] turns that sequence into the latencies of appends arriving at
//! evenly spaced instants over the run. Evenly spaced in time, not one per sync: a slow sync
//! is waited on by every append that arrives during it, so it weighs in proportion to its
//! length. That is why the p99 of this floor is well above the p99 of the syncs themselves.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

/// One `fdatasync`, in seconds since the start of the run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SyncSpan {
    /// When the write before it was issued.
    pub start_s: f64,
    /// When `fdatasync` returned.
    pub end_s: f64,
}

/// Appends `write_bytes` to a new file in `dir` and `fdatasync`s it, back to back, for
/// `duration`. The file is removed afterwards.
pub fn measure(dir: &Path, duration: Duration, write_bytes: usize) -> std::io::Result<Vec<SyncSpan>> {
    let path = dir.join("sync-floor.data");
    let mut file = OpenOptions::new().create_new(true).write(true).open(&path)?;
    let buf = vec![0x5a_u8; write_bytes.max(1)];
    let mut spans = Vec::new();
    let t0 = Instant::now();
    let result: std::io::Result<()> = (|| {
        while t0.elapsed() < duration {
            let start_s = t0.elapsed().as_secs_f64();
            file.write_all(&buf)?;
            file.sync_data()?;
            spans.push(SyncSpan { start_s, end_s: t0.elapsed().as_secs_f64() });
        }
        Ok(())
    })();
    drop(file);
    // A failed write or sync is the error to report, not a failed cleanup after it.
    let removed = std::fs::remove_file(&path);
    result?;
    removed?;
    Ok(spans)
}

/// Acknowledgement latencies, in seconds and sorted, of appends arriving at `points` evenly
/// spaced instants from the start of the first sync to the start of the last: each waits for
/// the first sync that starts after it to end. Empty if there are fewer than two syncs.
pub fn ack_floor(spans: &[SyncSpan], points: usize) -> Vec<f64> {
    let (Some(first), Some(last)) = (spans.first(), spans.last()) else { return Vec::new() };
    if spans.len() < 2 || points == 0 {
        return Vec::new();
    }
    debug_assert!(spans.windows(2).all(|w| w[0].start_s <= w[1].start_s), "syncs in the order they ran");
    let (from, to) = (first.start_s, last.start_s);
    let step = (to - from) / points as f64;
    let mut out = Vec::with_capacity(points);
    // `next`: the first sync that starts strictly after the arrival.
    let mut next = 1;
    for k in 0..points {
        let arrival = from + step * k as f64;
        while next < spans.len() && spans[next].start_s <= arrival {
            next += 1;
        }
        if next == spans.len() {
            break;
        }
        out.push(spans[next].end_s - arrival);
    }
    out.sort_by(f64::total_cmp);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summary::percentile;
    use crate::ScratchDir;

    fn back_to_back(durations: &[f64]) -> Vec<SyncSpan> {
        let mut t = 0.0;
        durations
            .iter()
            .map(|d| {
                let span = SyncSpan { start_s: t, end_s: t + d };
                t += d;
                span
            })
            .collect()
    }

    #[test]
    fn equal_syncs_wait_between_one_and_two_syncs() {
        let spans = back_to_back(&[1.0; 1001]);
        let floor = ack_floor(&spans, 100_000);
        assert!(floor.len() > 99_000, "nearly every arrival has a next sync: {}", floor.len());
        let (lo, hi) = (floor[0], floor[floor.len() - 1]);
        // Arrivals are 0.01 apart, so the latest one before a sync starts waits 1.01.
        assert!((1.0..1.0101).contains(&lo), "shortest wait is one whole sync: {lo}");
        assert!(hi <= 2.0 && hi > 1.999, "longest wait is just under two syncs: {hi}");
        let p50 = percentile(&floor, 0.5);
        assert!((p50 - 1.5).abs() < 0.001, "uniform arrivals wait 1.5 syncs at the median: {p50}");
        let p99 = percentile(&floor, 0.99);
        assert!((p99 - 1.99).abs() < 0.001, "p99 {p99}");
    }

    /// One sync in a hundred takes ten times as long: 1 % of syncs, but 9 % of the time, so
    /// the arrivals it holds up are far more than 1 % and the p99 is set by it.
    #[test]
    fn a_slow_sync_weighs_by_its_length() {
        let durations: Vec<f64> = (0..10_000).map(|i| if i % 100 == 50 { 10.0 } else { 1.0 }).collect();
        let spans = back_to_back(&durations);
        let mut sorted = durations.clone();
        sorted.sort_by(f64::total_cmp);
        assert_eq!(percentile(&sorted, 0.99), 1.0, "the syncs' own p99 does not see the slow ones");
        let floor = ack_floor(&spans, 1_000_000);
        let p99 = percentile(&floor, 0.99);
        assert!(p99 > 10.0, "arrivals during a slow sync, or just before one, wait for it: p99 {p99}");
        // Slow syncs take 1,000 of 10,900 time units. An arrival in one waits its rest (0 to
        // 10) plus a normal sync: more than 2 for 9/10 of them (8.3 % of all); an arrival in
        // the sync before a slow one waits 10 to 11 (0.9 %). Together 9.2 % wait more than
        // two normal syncs, though only 1 % of syncs were slow.
        let over_two = floor.iter().filter(|&&l| l > 2.0).count() as f64 / floor.len() as f64;
        assert!((0.090..0.094).contains(&over_two), "share waiting more than 2: {over_two}");
    }

    #[test]
    fn too_few_syncs_give_nothing() {
        assert!(ack_floor(&[], 10).is_empty());
        assert!(ack_floor(&back_to_back(&[1.0]), 10).is_empty());
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[test]
    fn measure_writes_and_syncs_a_real_file() {
        let scratch = ScratchDir::new_in(&std::env::temp_dir()).expect("scratch dir");
        let dir = scratch.path();
        let spans = measure(dir, Duration::from_millis(50), 4096).expect("measure");
        assert!(!spans.is_empty(), "at least one sync in 50 ms");
        assert!(spans.iter().all(|s| s.end_s >= s.start_s), "each sync ends after it starts");
        assert!(spans.windows(2).all(|w| w[1].start_s >= w[0].end_s), "back to back, in order");
        assert!(!dir.join("sync-floor.data").exists(), "the file is removed");
    }
}
