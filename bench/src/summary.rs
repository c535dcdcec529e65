//! Result rows and small statistics shared by the `rill-bench` subcommands that live in this
//! library (`idempotence`, `server-produce`, `server-latency`). The binary decides how rows
//! are printed (a table, or JSON lines).

use std::time::Duration;

use crate::Sched;

/// The error type of the library's benchmark drivers.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Their result type.
pub type Result<T> = std::result::Result<T, BoxError>;

/// Receives result rows: `bench` names the subcommand, `metric` the figure.
pub trait Sink {
    /// One result line.
    fn row(&mut self, bench: &'static str, metric: String, value: f64, unit: &'static str, note: String);
}

/// The median of `values` (`NaN` when empty).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// The `q`-quantile (0..=1) of already sorted values, nearest rank; `NaN` when empty.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// A figure with as many digits as it deserves (as the rest of `rill-bench` prints them).
pub fn fmt(value: f64) -> String {
    if value.abs() >= 1000.0 {
        format!("{value:.0}")
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.3}")
    }
}

/// `runs [a, b, c]`, in run order.
pub fn runs_note(values: &[f64]) -> String {
    let list: Vec<String> = values.iter().map(|v| fmt(*v)).collect();
    format!("runs [{}]", list.join(", "))
}

/// Decimal megabytes per second.
pub fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64()
}

/// Scheduler accounting summed over every thread of process `pid` (`"self"` for this
/// one), from `/proc/<pid>/task/*/schedstat`. Threads that already exited are not counted.
pub fn process_sched(pid: &str) -> Option<Sched> {
    let mut total = Sched::default();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(entry) = entry else { continue };
        // A thread that exited since the listing is simply skipped.
        let Ok(text) = std::fs::read_to_string(entry.path().join("schedstat")) else { continue };
        let mut fields = text.split_whitespace();
        let on_cpu_ns: u64 = fields.next()?.parse().ok()?;
        let wait_ns: u64 = fields.next()?.parse().ok()?;
        total.on_cpu_ns += on_cpu_ns;
        total.wait_ns += wait_ns;
    }
    Some(total)
}

/// The whole `/proc/loadavg` line (1, 5 and 15 minute averages, runnable/total tasks).
pub fn loadavg_line() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(|_| "?".to_string(), |s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn own_process_has_cpu_time() {
        let sched = process_sched("self").expect("schedstat is readable on Linux");
        assert!(sched.on_cpu_ns > 0);
    }
}
