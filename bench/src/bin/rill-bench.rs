//! `rill-bench`: end-to-end throughput measurements of the rill engine.
//!
//! ```text
//! cargo run --release -p rill-bench --bin rill-bench -- append        # vs. dd's sequential write bandwidth
//! cargo run --release -p rill-bench --bin rill-bench -- group-commit  # fsync=always, 1..64 appenders
//! cargo run --release -p rill-bench --bin rill-bench -- read          # sequential scan from the page cache
//! cargo run --release -p rill-bench --bin rill-bench -- all --json    # all three, one JSON line per result
//! cargo run --release -p rill-bench --bin rill-bench -- idempotence     # append_records vs append_producer_records
//! cargo run --release -p rill-bench --bin rill-bench -- server-produce  # server throughput over loopback
//! cargo run --release -p rill-bench --bin rill-bench -- server-latency  # open-loop produce -> consume latency
//! cargo run --release -p rill-bench --features peers -- load --systems embedded,server,redis,nats  # side by side
//! cargo run --release -p rill-bench --bin rill-bench -- loopback        # loopback TCP bandwidth
//! cargo run --release -p rill-bench --bin rill-bench -- sync-floor      # the disk's ack-latency floor at fsync=always
//! ```
//!
//! Every run works in a fresh scratch directory (inside `--dir`, default `./target` if it
//! exists, else `/tmp`) that is removed afterwards. Progress goes to stderr; results go to
//! stdout as a table, or as JSON lines with `--json`. Rates use decimal units:
//! 1 MB = 10^6 bytes, 1 GB = 10^9 bytes (as `dd` reports them).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use rill_bench::idempotence::IdempotenceArgs;
use rill_bench::server_load::{LatencyArgs, ProduceArgs};
use rill_bench::{
    children_cpu_s, encode, load_average, now_ms, records, walk_headers, Sched, ScratchDir, TimingStorage,
};
use rill_engine::format::batch::BatchIter;
use rill_engine::io::fault::FaultStorage;
use rill_engine::io::{StdStorage, Storage};
use rill_engine::limits::SEGMENT_SIZE_BYTES_MAX;
use rill_engine::{Compression, FsyncPolicy, Partition, Store, StoreConfig, TopicConfig};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Result<T> = std::result::Result<T, BoxError>;

const MIB: u64 = 1024 * 1024;

#[derive(Parser, Debug)]
#[command(name = "rill-bench", about = "Throughput benchmarks of the rill engine")]
struct Cli {
    /// Parent directory of the scratch data directory (default: ./target if it exists, else /tmp).
    #[arg(long, global = true)]
    dir: Option<PathBuf>,
    /// Print one JSON object per result line instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Sequential write bandwidth (dd) vs. rill append with fsync=never, same total bytes.
    Append(AppendArgs),
    /// fsync=always throughput with 1, 4, 16, 64 concurrent appenders on one partition.
    GroupCommit(GroupCommitArgs),
    /// Write a log with fsync=never, then scan it from the page cache.
    Read(ReadArgs),
    /// Embedded append throughput, append_records vs. idempotent append_producer_records.
    Idempotence(IdempotenceArgs),
    /// Server produce throughput over loopback (raw pipeline, batching Producer, fsync=always vs never).
    ServerProduce(ProduceArgs),
    /// Open-loop produce -> consume latency through the server at a fixed rate.
    ServerLatency(LatencyArgs),
    /// Priority cursors: p0 latency under a p3 flood, and cursor vs plain read throughput.
    Priority(rill_bench::priority::PriorityArgs),
    /// Open- or closed-loop load on rill (embedded, server) and its peers (Redis, NATS), side by side.
    Load(rill_bench::load::LoadArgs),
    /// Loopback TCP bandwidth: one connection, 1 MiB writes, for `bench/limits.sh`.
    Loopback(LoopbackArgs),
    /// The disk's floor for acknowledgement latency at fsync=always: write + fdatasync back to
    /// back, and the wait of appends arriving evenly over the run (`rill_bench::sync_floor`).
    SyncFloor(SyncFloorArgs),
    /// Runs append, group-commit and read.
    All {
        #[command(flatten)]
        append: AppendArgs,
        #[command(flatten)]
        group_commit: GroupCommitArgs,
        #[command(flatten)]
        read: ReadArgs,
    },
}

#[derive(Args, Clone, Debug)]
struct LoopbackArgs {
    /// Seconds to stream.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Bytes of each write(2), in KiB.
    #[arg(long, default_value_t = 1024)]
    write_kib: usize,
}

#[derive(Args, Clone, Debug)]
struct SyncFloorArgs {
    /// Seconds of back-to-back write + fdatasync.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Bytes written before each fdatasync (about what one sync carries at the rate of
    /// interest: 50,000 msg/s of 100 B at ~2,000 syncs/s is ~3 KB).
    #[arg(long, default_value_t = 4096)]
    write_bytes: usize,
    /// Evenly spaced arrival instants at which the wait is evaluated.
    #[arg(long, default_value_t = 1_000_000)]
    points: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BandwidthMethod {
    /// `dd if=/dev/zero of=<dir>/ddtest bs=1M count=N [conv=fdatasync]`, rate from dd's own report.
    Dd,
    /// A Rust loop writing 1 MiB buffers with write(2), then fdatasync.
    Rust,
}

#[derive(Args, Clone, Debug)]
struct AppendArgs {
    /// Total bytes to write, in MiB (dd's count; rill writes at least as many log bytes).
    #[arg(long, default_value_t = 1024)]
    append_mib: u64,
    /// Value size of each record in bytes.
    #[arg(long, default_value_t = 1024)]
    value_size: usize,
    /// Records per appended batch.
    #[arg(long, default_value_t = 100)]
    batch_records: usize,
    /// How the raw sequential write bandwidth is measured.
    #[arg(long, value_enum, default_value_t = BandwidthMethod::Dd)]
    bandwidth: BandwidthMethod,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ProbeKind {
    Timing,
    Fault,
    Std,
    /// The io_uring backend (no fsync figures).
    Uring,
}

#[derive(Args, Clone, Debug)]
struct GroupCommitArgs {
    /// Measured seconds per concurrency level (after a 0.5 s warm-up).
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Times the whole sequence of levels is run (interleaved); medians are reported.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Concurrency levels (appender threads), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    appenders: Vec<usize>,
    /// Value size of each record of a group-commit append, in bytes.
    #[arg(long, default_value_t = 100)]
    gc_value_size: usize,
    /// Records per group-commit append.
    #[arg(long, default_value_t = 1)]
    gc_batch_records: usize,
    /// Storage under the store: `timing` counts and times every write and fdatasync (a thin
    /// wrapper of the standard storage), `fault` is the engine's FaultStorage used only to
    /// count fsyncs, `std` is the plain storage and `uring` the io_uring backend (neither gives fsync figures).
    #[arg(long, value_enum, default_value_t = ProbeKind::Timing)]
    storage: ProbeKind,
}

#[derive(Args, Clone, Debug)]
struct ReadArgs {
    /// Size of the log to write and scan, in MiB.
    #[arg(long, default_value_t = 1024)]
    read_mib: u64,
    /// Segment size of the scanned log, in MiB: every segment but the last is sealed
    /// (zero-copy mmap reads); the last one is active (pread copies).
    #[arg(long, default_value_t = 128)]
    segment_mib: u64,
    /// `max_bytes` of each `Partition::read` call, in KiB.
    #[arg(long, default_value_t = 1024)]
    read_kib: u64,
    /// Passes over the log per scan mode (the median is reported).
    #[arg(long, default_value_t = 3)]
    passes: usize,
}

/// One result line.
struct Row {
    bench: &'static str,
    metric: String,
    value: f64,
    unit: &'static str,
    note: String,
}

struct Report {
    json: bool,
    rows: Vec<Row>,
}

impl Report {
    fn add(&mut self, bench: &'static str, metric: impl Into<String>, value: f64, unit: &'static str, note: &str) {
        let row = Row { bench, metric: metric.into(), value, unit, note: note.to_string() };
        if self.json {
            println!(
                "{{\"bench\":\"{}\",\"metric\":\"{}\",\"value\":{},\"unit\":\"{}\",\"note\":\"{}\"}}",
                row.bench,
                json_escape(&row.metric),
                json_number(row.value),
                row.unit,
                json_escape(&row.note)
            );
        }
        self.rows.push(row);
    }

    fn print_table(&self) {
        if self.json || self.rows.is_empty() {
            return;
        }
        let metric_width = self.rows.iter().map(|r| r.metric.len()).max().unwrap_or(0);
        println!("{:<13} {:<metric_width$} {:>12} {:<9} note", "bench", "metric", "value", "unit");
        for row in &self.rows {
            println!(
                "{:<13} {:<metric_width$} {:>12} {:<9} {}",
                row.bench,
                row.metric,
                format_value(row.value),
                row.unit,
                row.note
            );
        }
    }
}

impl rill_bench::summary::Sink for Report {
    fn row(&mut self, bench: &'static str, metric: String, value: f64, unit: &'static str, note: String) {
        self.add(bench, metric, value, unit, &note);
    }
}

fn format_value(value: f64) -> String {
    if value.abs() >= 1000.0 {
        format!("{value:.0}")
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.3}")
    }
}

fn json_number(value: f64) -> String {
    if value.is_finite() {
        format!("{value}")
    } else {
        "null".to_string()
    }
}

fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64()
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn progress(message: &str) {
    eprintln!("rill-bench: {message}");
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(&cli) {
        eprintln!("rill-bench: error: {e}");
        std::process::exit(1);
    }
}

fn run(cli: &Cli) -> Result<()> {
    let parent = match &cli.dir {
        Some(dir) => dir.clone(),
        None if Path::new("target").is_dir() => PathBuf::from("target"),
        None => std::env::temp_dir(),
    };
    let scratch =
        ScratchDir::new_in(&parent).map_err(|e| format!("create scratch dir in {}: {e}", parent.display()))?;
    progress(&format!("data directory {}", scratch.path().display()));
    let mut report = Report { json: cli.json, rows: Vec::new() };
    let result = match &cli.command {
        Cmd::Append(args) => bench_append(scratch.path(), args, &mut report),
        Cmd::GroupCommit(args) => bench_group_commit(scratch.path(), args, &mut report),
        Cmd::Read(args) => bench_read(scratch.path(), args, &mut report),
        Cmd::Idempotence(args) => rill_bench::idempotence::run(scratch.path(), args, &mut report),
        Cmd::ServerProduce(args) => rill_bench::server_load::run_produce(scratch.path(), args, &mut report),
        Cmd::ServerLatency(args) => rill_bench::server_load::run_latency(scratch.path(), args, &mut report),
        Cmd::Priority(args) => rill_bench::priority::run(scratch.path(), args, &mut report),
        Cmd::Load(args) => {
            let command_line = std::env::args().collect::<Vec<_>>().join(" ");
            rill_bench::load::run(scratch.path(), args, cli.json, &command_line)
        }
        Cmd::Loopback(args) => bench_loopback(args, &mut report),
        Cmd::SyncFloor(args) => bench_sync_floor(scratch.path(), args, &mut report),
        Cmd::All { append, group_commit, read } => bench_append(scratch.path(), append, &mut report)
            .and_then(|()| bench_group_commit(scratch.path(), group_commit, &mut report))
            .and_then(|()| bench_read(scratch.path(), read, &mut report)),
    };
    report.print_table();
    result
}

fn topic_config(fsync: FsyncPolicy, segment_size_bytes: u64) -> TopicConfig {
    TopicConfig {
        partitions: 1,
        fsync,
        segment_size_bytes,
        segment_ms: None,
        retention_ms: None,
        ..TopicConfig::default()
    }
}

fn store_config() -> StoreConfig {
    StoreConfig { retention_check_interval_ms: None, ..StoreConfig::default() }
}

/// Asks the kernel to write back all dirty data, so a phase does not pay for the previous
/// one's (or another process's) writeback.
fn settle() {
    // Best effort: `sync` only reduces noise.
    drop(Command::new("sync").status());
}

// ---------------------------------------------------------------------------------------
// append

/// What a raw sequential write measured.
struct RawWrite {
    /// Rate computed from the tool's own report (dd) or our timing (Rust loop).
    mb_s: f64,
    /// Our wall-clock measurement around the whole thing.
    wall: Duration,
    /// CPU seconds the writer used (dd: the child's user + system time).
    cpu_s: Option<f64>,
}

fn raw_write(method: BandwidthMethod, path: &Path, mib: u64, sync: bool) -> Result<RawWrite> {
    match method {
        BandwidthMethod::Dd => {
            let mut cmd = Command::new("dd");
            cmd.env("LC_ALL", "C")
                .arg("if=/dev/zero")
                .arg(format!("of={}", path.display()))
                .arg("bs=1M")
                .arg(format!("count={mib}"));
            if sync {
                cmd.arg("conv=fdatasync");
            }
            let cpu_before = children_cpu_s();
            let start = Instant::now();
            let output = cmd.output().map_err(|e| format!("run dd: {e}"))?;
            let wall = start.elapsed();
            let cpu_s = cpu_before.zip(children_cpu_s()).map(|(before, after)| after - before);
            let stderr = String::from_utf8_lossy(&output.stderr);
            if !output.status.success() {
                return Err(format!("dd failed ({}): {stderr}", output.status).into());
            }
            let mb_s = parse_dd(&stderr).unwrap_or_else(|| mb_per_s(mib * MIB, wall));
            Ok(RawWrite { mb_s, wall, cpu_s })
        }
        BandwidthMethod::Rust => {
            let buf = vec![0u8; MIB as usize];
            let sched_before = Sched::thread();
            let start = Instant::now();
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
                .map_err(|e| format!("open {}: {e}", path.display()))?;
            for _ in 0..mib {
                file.write_all(&buf).map_err(|e| format!("write {}: {e}", path.display()))?;
            }
            if sync {
                file.sync_data().map_err(|e| format!("fdatasync {}: {e}", path.display()))?;
            }
            let wall = start.elapsed();
            let cpu_s = sched_before.zip(Sched::thread()).map(|(b, a)| a.since(b).on_cpu_ns as f64 / 1e9);
            Ok(RawWrite { mb_s: mb_per_s(mib * MIB, wall), wall, cpu_s })
        }
    }
}

/// Writes and deletes `mib` MiB of page cache right before a measured phase, so that the
/// phase reuses guest pages the host still backs. This VM has virtio-balloon free page
/// reporting: memory left free for ~2 s is handed back to the host, and touching it again
/// costs ~1.3 s of system time per GiB (dd then writes at ~330 MB/s instead of ~2 GB/s).
fn warm_memory(dir: &Path, mib: u64) -> Result<()> {
    let path = dir.join("warm-up");
    raw_write(BandwidthMethod::Rust, &path, mib, false)?;
    std::fs::remove_file(&path).map_err(|e| format!("remove {}: {e}", path.display()))?;
    Ok(())
}

/// Parses dd's summary line, `N bytes (...) copied, S s, R MB/s`, into bytes / S in MB/s.
fn parse_dd(stderr: &str) -> Option<f64> {
    let line = stderr.lines().rev().find(|l| l.contains("bytes") && l.contains("copied"))?;
    let bytes: f64 = line.split_whitespace().next()?.parse().ok()?;
    let after_copied = line.split("copied,").nth(1)?;
    let seconds: f64 = after_copied.split_whitespace().next()?.parse().ok()?;
    (seconds > 0.0).then(|| bytes / 1e6 / seconds)
}

fn bench_append(dir: &Path, args: &AppendArgs, report: &mut Report) -> Result<()> {
    let method_note = match args.bandwidth {
        BandwidthMethod::Dd => "dd bs=1M, rate = dd's bytes / dd's seconds",
        BandwidthMethod::Rust => "Rust loop: 1 MiB write(2) calls",
    };
    report.add("append", "load_average_1min", load_average().unwrap_or(f64::NAN), "", "at start; 2 vCPUs");
    let dd_path = dir.join("ddtest");
    let remove_dd = || std::fs::remove_file(&dd_path).map_err(|e| format!("remove {}: {e}", dd_path.display()));
    let raw_note = |raw: &RawWrite, what: &str| {
        let cpu = raw.cpu_s.map_or_else(|| "?".to_string(), |c| format!("{c:.2}"));
        format!("{method_note}{what}; wall {:.2} s, writer CPU {cpu} s", raw.wall.as_secs_f64())
    };

    settle();
    warm_memory(dir, args.append_mib)?;
    progress(&format!("append: raw write of {} MiB to the page cache (no sync)", args.append_mib));
    let raw_cache = raw_write(args.bandwidth, &dd_path, args.append_mib, false)?;
    remove_dd()?;
    report.add("append", "raw_write_page_cache", raw_cache.mb_s, "MB/s", &raw_note(&raw_cache, ""));

    settle();
    warm_memory(dir, args.append_mib)?;
    progress(&format!("append: raw write of {} MiB + fdatasync (before rill)", args.append_mib));
    let raw_sync_before = raw_write(args.bandwidth, &dd_path, args.append_mib, true)?;
    remove_dd()?;
    let note = raw_note(&raw_sync_before, " + fdatasync");
    report.add("append", "raw_write_fdatasync_before", raw_sync_before.mb_s, "MB/s", &note);

    settle();
    warm_memory(dir, args.append_mib)?;
    let recs = records(args.batch_records, args.value_size);
    let batch_bytes = encode(&recs, now_ms())?.len() as u64;
    let batches = (args.append_mib * MIB).div_ceil(batch_bytes);
    let log_bytes = batches * batch_bytes;
    let payload_bytes = batches * (args.batch_records * args.value_size) as u64;
    progress(&format!(
        "append: rill fsync=never, {batches} batches of {} x {} B records ({batch_bytes} B encoded), {log_bytes} log bytes",
        args.batch_records, args.value_size
    ));
    let store_dir = dir.join("append-store");
    let store = Store::open(&store_dir, store_config())?;
    store.create_topic("append", topic_config(FsyncPolicy::Never, SEGMENT_SIZE_BYTES_MAX))?;
    let partition = store.partition("append", 0)?;
    let sched_before = Sched::thread();
    let start = Instant::now();
    for _ in 0..batches {
        partition.append_records(&recs, Compression::None)?.wait()?;
    }
    let appended = start.elapsed();
    let sched = sched_before.zip(Sched::thread()).map(|(b, a)| a.since(b));
    let segments = partition.segment_count();
    drop(partition);
    // Clean close: fdatasyncs the active segment (sealed ones were synced when they rolled).
    store.close()?;
    let synced = start.elapsed();
    let rill_cache = mb_per_s(log_bytes, appended);
    let rill_sync = mb_per_s(log_bytes, synced);
    let sched_note = sched.map_or_else(String::new, |s| {
        format!(
            "; appender thread on CPU {:.2} s, waiting for a CPU {:.2} s",
            s.on_cpu_ns as f64 / 1e9,
            s.wait_ns as f64 / 1e9
        )
    });
    let note =
        format!("{segments} segment(s), log bytes incl. headers; wall {:.2} s{sched_note}", appended.as_secs_f64());
    report.add("append", "rill_append_page_cache", rill_cache, "MB/s", &note);
    report.add("append", "rill_append_payload_page_cache", mb_per_s(payload_bytes, appended), "MB/s", "values only");
    report.add(
        "append",
        "rill_append_incl_final_sync",
        rill_sync,
        "MB/s",
        &format!(
            "appends + store.close(): wall {:.2} s, of which the final fdatasync {:.2} s",
            synced.as_secs_f64(),
            (synced - appended).as_secs_f64()
        ),
    );
    if let Some(sched) = sched {
        report.add(
            "append",
            "rill_append_per_cpu_second",
            log_bytes as f64 / 1e6 / (sched.on_cpu_ns as f64 / 1e9),
            "MB/CPU-s",
            "log bytes / appender thread CPU time (rate with a CPU to itself)",
        );
    }
    if let Some(cpu_s) = raw_cache.cpu_s.filter(|c| *c > 0.0) {
        report.add(
            "append",
            "raw_write_page_cache_per_cpu_second",
            (args.append_mib * MIB) as f64 / 1e6 / cpu_s,
            "MB/CPU-s",
            "bytes / writer CPU time (10 ms resolution for dd)",
        );
    }
    std::fs::remove_dir_all(&store_dir).map_err(|e| format!("remove {}: {e}", store_dir.display()))?;

    settle();
    warm_memory(dir, args.append_mib)?;
    progress(&format!("append: raw write of {} MiB + fdatasync (after rill)", args.append_mib));
    let raw_sync_after = raw_write(args.bandwidth, &dd_path, args.append_mib, true)?;
    remove_dd()?;
    let note = raw_note(&raw_sync_after, " + fdatasync");
    report.add("append", "raw_write_fdatasync_after", raw_sync_after.mb_s, "MB/s", &note);
    let raw_sync = (raw_sync_before.mb_s + raw_sync_after.mb_s) / 2.0;
    report.add(
        "append",
        "ratio_synced",
        rill_sync / raw_sync,
        "x",
        "rill_append_incl_final_sync / mean(raw_write_fdatasync before, after); requirement >= 0.80",
    );
    report.add(
        "append",
        "ratio_page_cache",
        rill_cache / raw_cache.mb_s,
        "x",
        "rill_append_page_cache / raw_write_page_cache",
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// group-commit

struct LevelResult {
    appends: u64,
    elapsed: Duration,
    /// fsyncs of the window and their durations (ns), if the storage counts them.
    syncs: Option<Vec<u64>>,
    /// Bytes written and time spent writing in the window, if the storage times writes.
    writes: Option<(u64, u64, u64)>,
    /// Scheduler accounting of the whole process over the window.
    sched: Option<Sched>,
    p50_us: f64,
    p99_us: f64,
}

/// The storage under the group-commit benchmark and what it can tell.
enum Probe {
    Timing(TimingStorage),
    Fault(FaultStorage),
    Plain,
}

#[derive(Default)]
struct ProbeSnapshot {
    sync_count: Option<u64>,
    sync_ns: Vec<u64>,
    writes: Option<(u64, u64, u64)>,
}

impl Probe {
    fn snapshot(&self) -> ProbeSnapshot {
        match self {
            Probe::Timing(storage) => {
                let snap = storage.snapshot();
                ProbeSnapshot {
                    sync_count: Some(snap.sync_ns.len() as u64),
                    sync_ns: snap.sync_ns,
                    writes: Some((snap.writes, snap.write_bytes, snap.write_ns)),
                }
            }
            Probe::Fault(storage) => ProbeSnapshot { sync_count: Some(storage.counts().1), ..ProbeSnapshot::default() },
            Probe::Plain => ProbeSnapshot::default(),
        }
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64
}

/// The figures of one measured window, derived from a [`LevelResult`].
struct LevelFigures {
    appends_per_s: f64,
    fsyncs_per_s: Option<f64>,
    fsync_p50_us: Option<f64>,
    fsync_p99_us: Option<f64>,
    flusher_in_fsync_pct: Option<f64>,
    write_mean_us: Option<f64>,
    cpus_used: Option<f64>,
    threads_waiting_for_cpu: Option<f64>,
    latency_p50_us: f64,
    latency_p99_us: f64,
}

impl LevelFigures {
    fn new(result: &LevelResult) -> LevelFigures {
        let secs = result.elapsed.as_secs_f64();
        let mut sorted = result.syncs.clone().unwrap_or_default();
        sorted.sort_unstable();
        let timed = !sorted.is_empty() && sorted.iter().any(|&ns| ns > 0);
        LevelFigures {
            appends_per_s: result.appends as f64 / secs,
            fsyncs_per_s: result.syncs.as_ref().map(|s| s.len() as f64 / secs),
            fsync_p50_us: timed.then(|| percentile(&sorted, 0.5) / 1e3),
            fsync_p99_us: timed.then(|| percentile(&sorted, 0.99) / 1e3),
            flusher_in_fsync_pct: timed.then(|| sorted.iter().sum::<u64>() as f64 / 1e9 / secs * 100.0),
            write_mean_us: result
                .writes
                .filter(|w| w.0 > 0)
                .map(|(writes, _bytes, write_ns)| write_ns as f64 / writes as f64 / 1e3),
            cpus_used: result.sched.map(|s| s.on_cpu_ns as f64 / 1e9 / secs),
            threads_waiting_for_cpu: result.sched.map(|s| s.wait_ns as f64 / 1e9 / secs),
            latency_p50_us: result.p50_us,
            latency_p99_us: result.p99_us,
        }
    }
}

/// Median of `f` over the repetitions that have it, with the individual values.
fn median_of(figures: &[LevelFigures], f: impl Fn(&LevelFigures) -> Option<f64>) -> Option<(f64, String)> {
    let values: Vec<f64> = figures.iter().filter_map(f).collect();
    if values.is_empty() {
        return None;
    }
    let list: Vec<String> = values.iter().map(|v| format_value(*v)).collect();
    Some((median(&values), format!("runs [{}]", list.join(", "))))
}

fn bench_group_commit(dir: &Path, args: &GroupCommitArgs, report: &mut Report) -> Result<()> {
    let (probe, storage): (Probe, Arc<dyn Storage>) = match args.storage {
        ProbeKind::Timing => {
            let storage = TimingStorage::new();
            (Probe::Timing(storage.clone()), Arc::new(storage))
        }
        ProbeKind::Fault => {
            let storage = FaultStorage::new();
            (Probe::Fault(storage.clone()), Arc::new(storage))
        }
        ProbeKind::Std => (Probe::Plain, Arc::new(StdStorage)),
        ProbeKind::Uring => (Probe::Plain, rill_engine::io::Backend::Uring.storage()?),
    };
    report.add("group-commit", "load_average_1min", load_average().unwrap_or(f64::NAN), "", "at start; 2 vCPUs");
    let store_dir = dir.join("group-commit-store");
    let store = Store::open(&store_dir, StoreConfig { storage, ..store_config() })?;
    let recs = records(args.gc_batch_records, args.gc_value_size);
    let batch_bytes = encode(&recs, now_ms())?.len() as u64;
    let measure = Duration::from_secs_f64(args.seconds);
    let levels = &args.appenders;
    let mut figures: Vec<Vec<LevelFigures>> = levels.iter().map(|_| Vec::new()).collect();
    // Levels are interleaved across repetitions, so a slow spell of the disk or the CPUs
    // hits every level rather than one.
    for rep in 0..args.repeat.max(1) {
        for (i, &level) in levels.iter().enumerate() {
            settle();
            let topic = format!("gc-{level}-{rep}");
            store.create_topic(&topic, topic_config(FsyncPolicy::Always, 1024 * MIB))?;
            let partition = store.partition(&topic, 0)?;
            progress(&format!(
                "group-commit: repetition {}, {level} appender(s), {batch_bytes} B batches, {:.1} s",
                rep + 1,
                args.seconds
            ));
            let result = run_level(&partition, &recs, level, measure, &probe)?;
            let f = LevelFigures::new(&result);
            progress(&format!("group-commit: {:.0} appends/s", f.appends_per_s));
            figures[i].push(f);
        }
    }
    store.close()?;
    std::fs::remove_dir_all(&store_dir).map_err(|e| format!("remove {}: {e}", store_dir.display()))?;

    let first_level = levels.first().copied().unwrap_or(1);
    let base = figures.first().and_then(|f| median_of(f, |x| Some(x.appends_per_s))).map_or(f64::NAN, |m| m.0);
    for (i, &level) in levels.iter().enumerate() {
        let figs = &figures[i];
        let name = format!("appenders={level}");
        let mut add = |metric: &str, value: Option<(f64, String)>, unit: &'static str, note: &str| {
            if let Some((value, runs)) = value {
                let note = match (note.is_empty(), runs.is_empty()) {
                    (_, true) => note.to_string(),
                    (true, false) => runs,
                    (false, false) => format!("{note}; {runs}"),
                };
                report.add("group-commit", format!("{name} {metric}"), value, unit, &note);
            }
        };
        let rate = median_of(figs, |f| Some(f.appends_per_s));
        let rate_value = rate.as_ref().map_or(f64::NAN, |r| r.0);
        add("appends/s", rate, "appends/s", "median over repetitions");
        add(
            "MB/s",
            Some((rate_value * batch_bytes as f64 / 1e6, String::new())),
            "MB/s",
            &format!("{batch_bytes} B per append"),
        );
        if level != first_level {
            let per_rep: Vec<String> =
                figs.iter().zip(&figures[0]).map(|(f, b)| format_value(f.appends_per_s / b.appends_per_s)).collect();
            add(
                "ratio",
                Some((rate_value / base, String::new())),
                "x",
                &format!(
                    "median rate / median rate at appenders={first_level}; per repetition [{}]; requirement at 64: >= 20",
                    per_rep.join(", ")
                ),
            );
        }
        add("fsyncs/s", median_of(figs, |f| f.fsyncs_per_s), "fsyncs/s", "");
        let per_sync = median_of(figs, |f| f.fsyncs_per_s.map(|s| f.appends_per_s / s));
        add("appends/fsync", per_sync.as_ref().map(|p| (p.0, p.1.clone())), "appends", "");
        add("bytes/fsync", per_sync.map(|p| (p.0 * batch_bytes as f64, String::new())), "B", "appends/fsync x batch");
        add("fsync p50", median_of(figs, |f| f.fsync_p50_us), "us", "one fdatasync");
        add("fsync p99", median_of(figs, |f| f.fsync_p99_us), "us", "");
        add("flusher in fsync", median_of(figs, |f| f.flusher_in_fsync_pct), "%", "share of the window in fdatasync");
        add("write mean", median_of(figs, |f| f.write_mean_us), "us", "pwrite of one batch");
        add("CPUs used", median_of(figs, |f| f.cpus_used), "CPUs", "this process, on-CPU time / window");
        add(
            "threads waiting for CPU",
            median_of(figs, |f| f.threads_waiting_for_cpu),
            "threads",
            "this process's run-queue wait / window",
        );
        add("latency p50", median_of(figs, |f| Some(f.latency_p50_us)), "us", "append_records + wait");
        add("latency p99", median_of(figs, |f| Some(f.latency_p99_us)), "us", "");
    }
    Ok(())
}

fn run_level(
    partition: &Arc<Partition>,
    recs: &[rill_engine::Record],
    level: usize,
    measure: Duration,
    probe: &Probe,
) -> Result<LevelResult> {
    let stop = AtomicBool::new(false);
    let measuring = AtomicBool::new(false);
    let appends = AtomicU64::new(0);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..level)
            .map(|_| {
                scope.spawn(|| -> Result<Vec<u64>> {
                    let mut latencies_ns = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let timed = measuring.load(Ordering::Relaxed);
                        let start = Instant::now();
                        partition.append_records(recs, Compression::None)?.wait()?;
                        if timed {
                            latencies_ns.push(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX));
                        }
                        appends.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(latencies_ns)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        let before = probe.snapshot();
        let sched_before = Sched::process();
        let appends_before = appends.load(Ordering::Relaxed);
        let start = Instant::now();
        measuring.store(true, Ordering::Relaxed);
        std::thread::sleep(measure);
        measuring.store(false, Ordering::Relaxed);
        let appends_after = appends.load(Ordering::Relaxed);
        let after = probe.snapshot();
        let sched_after = Sched::process();
        let elapsed = start.elapsed();
        stop.store(true, Ordering::Relaxed);
        let mut latencies = Vec::new();
        for worker in workers {
            let thread_latencies = worker.join().map_err(|_panic| "an appender thread panicked")??;
            latencies.extend(thread_latencies);
        }
        latencies.sort_unstable();
        let syncs = match (before.sync_count, after.sync_count) {
            (Some(b), Some(a)) if after.sync_ns.len() as u64 == a => {
                Some(after.sync_ns[usize::try_from(b).unwrap_or(usize::MAX).min(after.sync_ns.len())..].to_vec())
            }
            // Counted but not timed: durations unknown, only the count.
            (Some(b), Some(a)) => Some(vec![0; usize::try_from(a - b).unwrap_or(0)]),
            _ => None,
        };
        let writes = before.writes.zip(after.writes).map(|(b, a)| (a.0 - b.0, a.1 - b.1, a.2 - b.2));
        Ok(LevelResult {
            appends: appends_after - appends_before,
            elapsed,
            syncs,
            writes,
            sched: sched_before.zip(sched_after).map(|(b, a)| a.since(b)),
            p50_us: percentile(&latencies, 0.5) / 1e3,
            p99_us: percentile(&latencies, 0.99) / 1e3,
        })
    })
}

// ---------------------------------------------------------------------------------------
// loopback

/// One TCP connection over 127.0.0.1: a thread writes `write_kib` buffers for `seconds`,
/// another reads and counts them. The receiver's count over its own time is the figure.
fn bench_loopback(args: &LoopbackArgs, report: &mut Report) -> Result<()> {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let seconds = args.seconds;
    let size = args.write_kib.max(1) * 1024;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut stream = std::net::TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        let buf = vec![0x5a_u8; size];
        let start = Instant::now();
        while start.elapsed().as_secs_f64() < seconds {
            stream.write_all(&buf)?;
        }
        Ok(())
    });
    let (mut stream, _) = listener.accept()?;
    let mut buf = vec![0u8; size];
    let mut bytes = 0u64;
    let start = Instant::now();
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
    }
    let elapsed = start.elapsed();
    writer.join().map_err(|_panic| "the loopback writer panicked")??;
    report.add(
        "loopback",
        "tcp_bandwidth",
        mb_per_s(bytes, elapsed),
        "MB/s",
        &format!("one connection over 127.0.0.1, {} KiB writes, {:.1} s", args.write_kib, elapsed.as_secs_f64()),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// sync-floor

fn bench_sync_floor(dir: &Path, args: &SyncFloorArgs, report: &mut Report) -> Result<()> {
    use rill_bench::summary::percentile;
    use rill_bench::sync_floor::{ack_floor, measure};
    if !(args.seconds > 0.0 && args.seconds.is_finite()) {
        return Err(format!("--seconds must be a positive number of seconds, got {}", args.seconds).into());
    }
    if args.points == 0 {
        return Err("--points must be at least 1".into());
    }
    progress(&format!("sync-floor: {} B write + fdatasync, back to back, {} s", args.write_bytes, args.seconds));
    let spans = measure(dir, Duration::from_secs_f64(args.seconds), args.write_bytes)?;
    let elapsed = spans.last().map_or(0.0, |s| s.end_s);
    let mut syncs: Vec<f64> = spans.iter().map(|s| s.end_s - s.start_s).collect();
    syncs.sort_by(f64::total_cmp);
    let floor = ack_floor(&spans, args.points);
    if floor.is_empty() {
        return Err("sync-floor: fewer than two syncs completed; run it longer".into());
    }
    let note = format!("{} B per sync, {} syncs in {elapsed:.1} s", args.write_bytes, spans.len());
    report.add("sync-floor", "syncs_per_s", spans.len() as f64 / elapsed, "/s", &note);
    report.add("sync-floor", "write_sync_p50", percentile(&syncs, 0.5) * 1e3, "ms", "one write + fdatasync");
    report.add("sync-floor", "write_sync_p99", percentile(&syncs, 0.99) * 1e3, "ms", "one write + fdatasync");
    let waits = "an append arriving at an even instant waits for the rest of the running sync and all of the next";
    for (metric, q) in [("ack_floor_p50", 0.5), ("ack_floor_p99", 0.99), ("ack_floor_p999", 0.999)] {
        report.add("sync-floor", metric, percentile(&floor, q) * 1e3, "ms", waits);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// read

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ScanMode {
    /// `Partition::read` + walk the batch headers (record bytes are not touched).
    Headers,
    /// `Partition::read` + `BatchIter` (header parse + CRC-32 of every batch).
    Crc,
    /// As `Crc`, plus `Batch::validate_records` (walks every record).
    Records,
}

impl ScanMode {
    fn name(self) -> &'static str {
        match self {
            ScanMode::Headers => "read_headers_only",
            ScanMode::Crc => "read_crc_verify",
            ScanMode::Records => "read_crc_and_records",
        }
    }

    fn note(self) -> &'static str {
        match self {
            ScanMode::Headers => "Partition::read + header walk; record bytes NOT touched (zero-copy views)",
            ScanMode::Crc => "Partition::read + BatchIter (CRC-32 of every byte); the requirement's figure",
            ScanMode::Records => "as crc + Batch::validate_records",
        }
    }
}

fn bench_read(dir: &Path, args: &ReadArgs, report: &mut Report) -> Result<()> {
    let store_dir = dir.join("read-store");
    let store = Store::open(&store_dir, store_config())?;
    let segment_bytes = (args.segment_mib * MIB).min(SEGMENT_SIZE_BYTES_MAX);
    store.create_topic("read", topic_config(FsyncPolicy::Never, segment_bytes))?;
    let partition = store.partition("read", 0)?;
    let recs = records(100, 1024);
    let batch_bytes = encode(&recs, now_ms())?.len() as u64;
    let batches = (args.read_mib * MIB).div_ceil(batch_bytes);
    progress(&format!("read: writing {} MiB ({batches} batches of {batch_bytes} B), fsync=never", args.read_mib));
    let start = Instant::now();
    for _ in 0..batches {
        partition.append_records(&recs, Compression::None)?.wait()?;
    }
    progress(&format!(
        "read: written in {:.2} s; {} segments; scanning",
        start.elapsed().as_secs_f64(),
        partition.segment_count()
    ));
    let end = partition.end_offset();
    // CRC first: its first pass also pays for populating the page tables of the sealed
    // segments' maps (the header-only walk touches only one page per batch).
    let modes = [ScanMode::Crc, ScanMode::Records, ScanMode::Headers];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut call_us: Vec<f64> = Vec::new();
    for pass in 0..args.passes {
        for (i, &mode) in modes.iter().enumerate() {
            let (bytes, calls, elapsed) = scan(&partition, end, args.read_kib * 1024, mode)?;
            let secs = elapsed.as_secs_f64();
            let gb_s = bytes as f64 / 1e9 / secs;
            progress(&format!(
                "read: pass {} {}: {bytes} bytes, {calls} reads in {secs:.3} s = {gb_s:.2} GB/s",
                pass + 1,
                mode.name()
            ));
            rates[i].push(gb_s);
            if mode == ScanMode::Headers {
                call_us.push(secs * 1e6 / calls as f64);
            }
        }
    }
    let segments = partition.segment_count();
    for (i, &mode) in modes.iter().enumerate() {
        let passes: Vec<String> = rates[i].iter().map(|r| format!("{r:.2}")).collect();
        let note = format!(
            "{}; median of passes [{}] (pass 1 first); {segments} segment(s): {} sealed (mmap), 1 active (pread)",
            mode.note(),
            passes.join(", "),
            segments.saturating_sub(1)
        );
        report.add("read", mode.name(), median(&rates[i]), "GB/s", &note);
    }
    report.add(
        "read",
        "read_call_headers_only",
        median(&call_us),
        "us/call",
        &format!("one Partition::read of {} KiB + header walk", args.read_kib),
    );
    drop(partition);
    store.close()?;
    std::fs::remove_dir_all(&store_dir).map_err(|e| format!("remove {}: {e}", store_dir.display()))?;
    Ok(())
}

/// Reads the whole log from offset 0 to `end`; returns the bytes of whole batches read,
/// the number of `Partition::read` calls and the time taken.
fn scan(partition: &Partition, end: u64, max_bytes: u64, mode: ScanMode) -> Result<(u64, u64, Duration)> {
    let start = Instant::now();
    let mut offset = 0;
    let mut total = 0u64;
    let mut calls = 0u64;
    while offset < end {
        let buf = partition.read(offset, max_bytes)?;
        calls += 1;
        let next = match mode {
            ScanMode::Headers => {
                let (_batches, bytes, next) = walk_headers(&buf)?;
                total += bytes;
                next
            }
            ScanMode::Crc | ScanMode::Records => {
                let mut next = None;
                for batch in BatchIter::new(buf) {
                    let batch = batch?;
                    if mode == ScanMode::Records {
                        batch.validate_records()?;
                    }
                    total += batch.as_bytes().len() as u64;
                    next = Some(batch.header().next_offset());
                }
                next
            }
        };
        offset = next.ok_or_else(|| format!("read at offset {offset} returned no whole batch"))?;
    }
    Ok((total, calls, start.elapsed()))
}
