//! `rill-bench server-produce` and `rill-bench server-latency`: the server under load over
//! loopback TCP, driven by the crate's own client (`rill_server::client`).
//!
//! Where the server runs (`--server`):
//! - `process` (default): `rill serve` is started as a child process on a scratch data
//!   directory, so client and server are separate processes talking over loopback. Both
//!   still share this machine's CPUs; the server's CPU time is read from `/proc`.
//! - `in-process`: the server runs on its own tokio runtime inside `rill-bench`.
//! - `external`: a server already running at `--addr` (topics are created and deleted).
//!
//! Throughput (`server-produce`) is counted on the server: the sum of the topic's partition
//! end offsets from `Metadata`, read at the start and the end of the measured window, so a
//! message counts once it is in the log (and, under fsync=always, synced). Latency
//! (`server-latency`) is open-loop: sends are scheduled at fixed intended times, every
//! message carries its intended send time, and latency runs from that time until a
//! consumer on another connection receives the message, so a stalled sender cannot hide
//! latency (no coordinated omission).

use std::collections::VecDeque;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{ArgAction, Args, ValueEnum};
use hdrhistogram::Histogram;
use rill_engine::FsyncPolicy;
use rill_server::client::{decode_fetched, Client, Producer, ProducerConfig, SendReceipt};
use rill_server::config::ServerConfig;
use rill_server::messages::{Acks, TopicSettings};
use rill_server::server::ServerHandle;
use tokio::sync::mpsc;

use crate::summary::{loadavg_line, median, process_sched, runs_note, Result, Sink};
use crate::{encode, load_average, now_ms, records, Sched};

const MIB: u64 = 1024 * 1024;

/// Where the benchmarked server runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ServerMode {
    /// `rill serve` as a child process (client and server talk over loopback between processes).
    Process,
    /// The server on its own runtime inside this process (client and server share it).
    InProcess,
    /// A server already running at `--addr`.
    External,
}

/// How the server is reached, and how the client runs.
#[derive(Args, Clone, Debug)]
pub struct ServerArgs {
    /// Where the server runs.
    #[arg(long, value_enum, default_value_t = ServerMode::Process)]
    pub server: ServerMode,
    /// Address of the server for `--server external`.
    #[arg(long, default_value = "127.0.0.1:7400")]
    pub addr: String,
    /// Address of its Kafka listener for `--server external` (system `kafka` of `load`).
    #[arg(long)]
    pub kafka_addr: Option<String>,
    /// The `rill` binary for `--server process` [default: `rill` next to this executable].
    #[arg(long)]
    pub rill_bin: Option<PathBuf>,
    /// Worker threads of the benchmark client's tokio runtime.
    #[arg(long, default_value_t = 2)]
    pub client_threads: usize,
    /// Worker threads of the server's runtime with `--server in-process`.
    #[arg(long, default_value_t = 2)]
    pub server_threads: usize,
    /// Segment size of the benchmark's topics, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub segment_mib: u64,
}

/// What `server-produce` measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProducePhase {
    /// Pre-encoded batches through `Client::produce`, many requests in flight (the server's
    /// ceiling, without the client's per-record cost).
    Raw,
    /// The batching `Producer`, closed loop, fsync=never.
    Producer,
    /// `--fsync-producers` producers, fsync=never against fsync=always.
    Fsync,
}

/// Options of `rill-bench server-produce`.
#[derive(Args, Clone, Debug)]
pub struct ProduceArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Phases to run, in this order.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "raw,producer,fsync")]
    pub phases: Vec<ProducePhase>,
    /// Partitions of each topic.
    #[arg(long, default_value_t = 4)]
    pub partitions: u32,
    /// Value bytes of each message (no key, no headers).
    #[arg(long, default_value_t = 100)]
    pub value_size: usize,
    /// Seconds of load before the measured window starts.
    #[arg(long, default_value_t = 1.0)]
    pub warmup_seconds: f64,
    /// Length of the measured window, in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Raw phase: records per pre-encoded batch.
    #[arg(long, default_value_t = 1000)]
    pub raw_batch_records: usize,
    /// Raw phase: connections (each its own `Client`).
    #[arg(long, default_value_t = 2)]
    pub raw_connections: usize,
    /// Raw phase: requests in flight per connection (one task each, awaiting its response).
    #[arg(long, default_value_t = 8)]
    pub raw_inflight: usize,
    /// Producer phase: producers, each with its own `Client` (connection) and identity.
    #[arg(long, default_value_t = 1)]
    pub producers: usize,
    /// Producer phase: tasks calling `send` per producer.
    #[arg(long, default_value_t = 1)]
    pub senders: usize,
    /// Producer phases: unacknowledged sends a sender keeps before awaiting the oldest.
    #[arg(long, default_value_t = 100_000)]
    pub window: usize,
    /// `ProducerConfig::linger_ms`.
    #[arg(long, default_value_t = 5)]
    pub linger_ms: u64,
    /// `ProducerConfig::batch_size_bytes`, in KiB.
    #[arg(long, default_value_t = 256)]
    pub batch_kib: usize,
    /// `ProducerConfig::idempotent`.
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub idempotent: bool,
    /// Fsync phase: concurrent producers (each its own connection and producer id).
    #[arg(long, default_value_t = 32)]
    pub fsync_producers: usize,
    /// Fsync phase: window per producer.
    #[arg(long, default_value_t = 10_000)]
    pub fsync_window: usize,
    /// Times the fsync phase measures each policy (the order alternates: never, always,
    /// always, never, ...).
    #[arg(long, default_value_t = 1)]
    pub fsync_repeat: usize,
}

/// An fsync policy named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FsyncArg {
    /// Acknowledge after `fdatasync`.
    Always,
    /// Acknowledge after the write to the page cache.
    Never,
}

impl FsyncArg {
    fn policy(self) -> FsyncPolicy {
        match self {
            FsyncArg::Always => FsyncPolicy::Always,
            FsyncArg::Never => FsyncPolicy::Never,
        }
    }

    fn name(self) -> &'static str {
        match self {
            FsyncArg::Always => "always",
            FsyncArg::Never => "never",
        }
    }
}

/// Options of `rill-bench server-latency`.
#[derive(Args, Clone, Debug)]
pub struct LatencyArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Target send rate, messages per second (open loop).
    #[arg(long, default_value_t = 50_000)]
    pub rate: u64,
    /// Length of the measured window, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Seconds of load at the target rate before the measured window.
    #[arg(long, default_value_t = 2.0)]
    pub warmup_seconds: f64,
    /// Value bytes of each message (at least 8: the intended send time).
    #[arg(long, default_value_t = 100)]
    pub value_size: usize,
    /// Partitions of the topic (one consumer connection per partition).
    #[arg(long, default_value_t = 1)]
    pub partitions: u32,
    /// `ProducerConfig::linger_ms`.
    #[arg(long, default_value_t = 1)]
    pub linger_ms: u64,
    /// `ProducerConfig::batch_size_bytes`, in KiB.
    #[arg(long, default_value_t = 256)]
    pub batch_kib: usize,
    /// Fsync policies to measure, in this order.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "never,always")]
    pub fsync: Vec<FsyncArg>,
    /// Shortest sleep of the sending thread, in µs: it wakes at most once per tick and sends
    /// every message due by then (each stamped with its own intended time, so the wait for
    /// the tick counts as latency). Waking for every message would cost more CPU than the
    /// server spends.
    #[arg(long, default_value_t = 200)]
    pub tick_us: u64,
    /// `max_wait_ms` of the consumer's long-polling fetches.
    #[arg(long, default_value_t = 500)]
    pub fetch_wait_ms: u32,
}

// ---------------------------------------------------------------------------------------
// the server

enum Running {
    Child(Child),
    InProcess { runtime: tokio::runtime::Runtime, handle: ServerHandle },
    External,
}

/// A server to benchmark, started (or found) according to [`ServerArgs`].
pub struct BenchServer {
    addr: String,
    /// The Kafka listener's address, where it was asked for.
    kafka_addr: Option<String>,
    /// The metrics endpoint (`process` and `in-process` only), for the fsync histogram.
    pub(crate) metrics_addr: Option<String>,
    mode: ServerMode,
    running: Option<Running>,
}

impl BenchServer {
    /// Starts the server (`process`, `in-process`) with its data in `data_dir`, or takes
    /// `--addr` (`external`).
    pub fn start(args: &ServerArgs, data_dir: &Path) -> Result<BenchServer> {
        BenchServer::start_with(args, data_dir, false)
    }

    /// As [`BenchServer::start`], with the Kafka listener on a free loopback port if
    /// `kafka` (`external`: the one at `--kafka-addr`).
    pub fn start_with(args: &ServerArgs, data_dir: &Path, kafka: bool) -> Result<BenchServer> {
        let (addr, metrics_addr, kafka_addr, running) = match args.server {
            ServerMode::External => {
                let kafka_addr = match (&args.kafka_addr, kafka) {
                    (Some(a), true) => Some(a.clone()),
                    (None, true) => return Err("--server external needs --kafka-addr for the kafka system".into()),
                    (_, false) => None,
                };
                (args.addr.clone(), None, kafka_addr, Running::External)
            }
            ServerMode::InProcess => {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(args.server_threads.max(1))
                    .thread_name("rill-server")
                    .enable_all()
                    .build()?;
                let config = ServerConfig {
                    data_dir: data_dir.to_path_buf(),
                    listen: "127.0.0.1:0".into(),
                    metrics_listen: "127.0.0.1:0".into(),
                    kafka_listen: if kafka { "127.0.0.1:0".into() } else { String::new() },
                    ..ServerConfig::default()
                };
                let handle = runtime.block_on(rill_server::server::start(config))?;
                let metrics = handle.metrics_addr.map(|a| a.to_string());
                let kafka_addr = handle.kafka_addr.map(|a| a.to_string());
                (handle.addr.to_string(), metrics, kafka_addr, Running::InProcess { runtime, handle })
            }
            ServerMode::Process => {
                let bin = match &args.rill_bin {
                    Some(bin) => bin.clone(),
                    None => std::env::current_exe()?.with_file_name("rill"),
                };
                let mut child = Command::new(&bin)
                    .arg("serve")
                    .arg("--data-dir")
                    .arg(data_dir)
                    .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
                    .args(if kafka { &["--kafka-listen", "127.0.0.1:0"][..] } else { &[] })
                    .env("RILL_LOG", "warn")
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .map_err(|e| format!("start {} serve: {e}", bin.display()))?;
                let (addr, metrics, kafka_addr) = match read_listen_lines(&mut child, kafka) {
                    Ok(found) => found,
                    Err(e) => {
                        // Best effort: the child failed to come up; make sure it is gone.
                        drop(child.kill());
                        drop(child.wait());
                        return Err(e);
                    }
                };
                (addr, metrics, kafka_addr, Running::Child(child))
            }
        };
        eprintln!("rill-bench: server ({:?}) at {addr}, metrics at {metrics_addr:?}", args.server);
        if let Some(kafka) = &kafka_addr {
            eprintln!("rill-bench: its Kafka listener at {kafka}");
        }
        Ok(BenchServer { addr, kafka_addr, metrics_addr, mode: args.server, running: Some(running) })
    }

    /// The protocol address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The Kafka listener's address, if it was started with one.
    pub fn kafka_addr(&self) -> Option<&str> {
        self.kafka_addr.as_deref()
    }

    /// CPU accounting of the server process; `None` when it is this process or external.
    pub fn sched(&self) -> Option<Sched> {
        match &self.running {
            Some(Running::Child(child)) => process_sched(&child.id().to_string()),
            _ => None,
        }
    }

    /// Stops the server gracefully (SIGTERM for a child) and waits for it.
    pub fn stop(mut self) -> Result<()> {
        match self.running.take() {
            Some(Running::Child(mut child)) => {
                let status = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status()?;
                if !status.success() {
                    return Err(format!("kill -TERM {} failed: {status}", child.id()).into());
                }
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    if let Some(status) = child.try_wait()? {
                        if !status.success() {
                            return Err(format!("rill serve exited with {status}").into());
                        }
                        return Ok(());
                    }
                    if Instant::now() > deadline {
                        child.kill()?;
                        child.wait()?;
                        return Err("rill serve did not stop within 30 s of SIGTERM; killed".into());
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            Some(Running::InProcess { runtime, handle }) => {
                runtime.block_on(handle.shutdown())?;
                Ok(())
            }
            Some(Running::External) | None => Ok(()),
        }
    }
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        // Only reached without `stop` (an error unwound the bench): do not leave a server behind.
        if let Some(Running::Child(mut child)) = self.running.take() {
            drop(child.kill());
            drop(child.wait());
        }
    }
}

/// Waits for `rill serve`'s "rill listening on ADDR (metrics and health on http://ADDR)"
/// line; the rest of its stdout is drained by a thread so that the child never blocks on a
/// full pipe.
/// `rill serve`'s protocol and metrics addresses from its first line, and with `kafka` the
/// Kafka listener's from the line after it.
fn read_listen_lines(child: &mut Child, kafka: bool) -> Result<(String, Option<String>, Option<String>)> {
    let stdout = child.stdout.take().ok_or("rill serve has no stdout pipe")?;
    let mut lines = BufReader::new(stdout).lines();
    let (addr, metrics) = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(rest) = line.strip_prefix("rill listening on ") {
                    let addr = rest.split_whitespace().next().ok_or("empty listen line")?.to_string();
                    let metrics = rest
                        .split("http://")
                        .nth(1)
                        .map(|m| m.trim_end_matches(|c: char| c == ')' || c.is_whitespace()).to_string());
                    break (addr, metrics);
                }
            }
            Some(Err(e)) => return Err(format!("read rill serve's stdout: {e}").into()),
            None => return Err("rill serve exited before it listened".into()),
        }
    };
    let kafka_addr = if kafka {
        match lines.next() {
            Some(Ok(line)) => match line.strip_prefix("Kafka protocol listening on ") {
                Some(addr) => Some(addr.trim().to_string()),
                None => return Err(format!("rill serve printed {line:?} where its Kafka address was due").into()),
            },
            Some(Err(e)) => return Err(format!("read rill serve's stdout: {e}").into()),
            None => return Err("rill serve exited before its Kafka listener listened".into()),
        }
    } else {
        None
    };
    std::thread::spawn(move || lines.for_each(drop));
    Ok((addr, metrics, kafka_addr))
}

/// The server's fsync histogram (`rill_fsync_latency_seconds`, all partitions), from its
/// metrics endpoint.
#[derive(Clone, Debug, Default)]
pub(crate) struct FsyncStats {
    /// `(upper bound in seconds, cumulative count)`, `+Inf` last.
    buckets: Vec<(f64, u64)>,
    pub(crate) sum_s: f64,
    pub(crate) count: u64,
}

impl FsyncStats {
    pub(crate) fn since(&self, earlier: &FsyncStats) -> FsyncStats {
        FsyncStats {
            buckets: self
                .buckets
                .iter()
                .zip(&earlier.buckets)
                .map(|((bound, now), (_, before))| (*bound, now.saturating_sub(*before)))
                .collect(),
            sum_s: self.sum_s - earlier.sum_s,
            count: self.count.saturating_sub(earlier.count),
        }
    }

    /// The smallest bucket bound at or below which a fraction `q` of the calls fell.
    fn quantile_bound_s(&self, q: f64) -> f64 {
        let target = (self.count as f64 * q).ceil() as u64;
        self.buckets.iter().find(|(_, cumulative)| *cumulative >= target).map_or(f64::NAN, |(bound, _)| *bound)
    }

    fn parse(text: &str) -> FsyncStats {
        let mut stats = FsyncStats::default();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("rill_fsync_latency_seconds") else { continue };
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(value)) = (parts.next(), parts.next()) else { continue };
            if let Some(bound) = name.strip_prefix("_bucket{le=\"").and_then(|b| b.strip_suffix("\"}")) {
                let bound = if bound == "+Inf" { f64::INFINITY } else { bound.parse().unwrap_or(f64::NAN) };
                stats.buckets.push((bound, value.parse().unwrap_or(0)));
            } else if name == "_sum" {
                stats.sum_s = value.parse().unwrap_or(0.0);
            } else if name == "_count" {
                stats.count = value.parse().unwrap_or(0);
            }
        }
        stats
    }
}

/// `GET /metrics` with a plain blocking socket (one short local request).
pub(crate) fn scrape_fsync(metrics_addr: &str) -> Result<FsyncStats> {
    use std::io::{Read, Write};
    let mut socket = std::net::TcpStream::connect(metrics_addr)?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    socket.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut body = String::new();
    socket.read_to_string(&mut body)?;
    Ok(FsyncStats::parse(&body))
}

pub(crate) fn client_runtime(args: &ServerArgs) -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .thread_name("rill-bench-client")
        .enable_all()
        .build()?)
}

fn settings(args: &ServerArgs, partitions: u32, fsync: FsyncPolicy) -> TopicSettings {
    TopicSettings {
        partitions,
        fsync: Some(fsync),
        segment_size_bytes: Some(args.segment_mib * MIB),
        retention_bytes: None,
        retention_ms: None,
    }
}

/// A unique topic name (an external server may hold topics of earlier runs).
fn topic_name(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), now_ms())
}

/// Sum of end offsets and of sizes over the topic's partitions.
pub(crate) async fn topic_totals(admin: &Client, topic: &str) -> Result<(u64, u64)> {
    let metadata = admin.metadata(&[topic]).await?;
    let description =
        metadata.into_iter().find(|t| t.name == topic).ok_or_else(|| format!("topic {topic} not in metadata"))?;
    Ok(description.partitions.iter().fold((0, 0), |(o, b), p| (o + p.end_offset, b + p.size_bytes)))
}

/// CPU used by this process and the server over a window.
#[derive(Clone, Debug, Default)]
struct CpuWindow {
    client: Option<Sched>,
    server: Option<Sched>,
    /// The server's fdatasync calls in the window.
    fsync: Option<FsyncStats>,
}

struct CpuMark {
    client: Option<Sched>,
    server: Option<Sched>,
    fsync: Option<FsyncStats>,
}

impl CpuMark {
    fn now(server: &BenchServer) -> CpuMark {
        // A failed scrape only loses the fsync figures.
        let fsync = server.metrics_addr.as_deref().and_then(|addr| scrape_fsync(addr).ok());
        CpuMark { client: process_sched("self"), server: server.sched(), fsync }
    }

    fn since(&self, server: &BenchServer) -> CpuWindow {
        let now = CpuMark::now(server);
        CpuWindow {
            client: self.client.zip(now.client).map(|(b, a)| a.since(b)),
            server: self.server.zip(now.server).map(|(b, a)| a.since(b)),
            fsync: self.fsync.as_ref().zip(now.fsync.as_ref()).map(|(b, a)| a.since(b)),
        }
    }
}

/// One measured window of a throughput phase.
#[derive(Clone, Debug)]
struct Window {
    messages: u64,
    log_bytes: u64,
    elapsed: Duration,
    cpu: CpuWindow,
}

impl Window {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }
}

/// Lets the load run for the warm-up, then measures the topic's growth over the window.
async fn measure(admin: &Client, server: &BenchServer, topic: &str, args: &ProduceArgs) -> Result<Window> {
    tokio::time::sleep(Duration::from_secs_f64(args.warmup_seconds)).await;
    let (offsets_before, bytes_before) = topic_totals(admin, topic).await?;
    let cpu = CpuMark::now(server);
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.seconds)).await;
    let (offsets_after, bytes_after) = topic_totals(admin, topic).await?;
    let elapsed = start.elapsed();
    let cpu = cpu.since(server);
    Ok(Window { messages: offsets_after - offsets_before, log_bytes: bytes_after - bytes_before, elapsed, cpu })
}

// ---------------------------------------------------------------------------------------
// server-produce

/// Runs `server-produce` (scratch data in `dir` for a server it starts) and reports to `sink`.
pub fn run_produce(dir: &Path, args: &ProduceArgs, sink: &mut dyn Sink) -> Result<()> {
    let bench = "server-produce";
    sink.row(bench, "load_average_1min".into(), load_average().unwrap_or(f64::NAN), "", "at start; 2 vCPUs".into());
    eprintln!("rill-bench: loadavg at start: {}", loadavg_line());
    let server = BenchServer::start(&args.server, &dir.join("server-data"))?;
    let runtime = client_runtime(&args.server)?;
    let result = runtime.block_on(produce_phases(&server, args, sink));
    drop(runtime);
    let stopped = server.stop();
    eprintln!("rill-bench: loadavg at end: {}", loadavg_line());
    sink.row(bench, "load_average_1min_end".into(), load_average().unwrap_or(f64::NAN), "", "at end".into());
    result.and(stopped)
}

async fn produce_phases(server: &BenchServer, args: &ProduceArgs, sink: &mut dyn Sink) -> Result<()> {
    let bench = "server-produce";
    let admin = Client::connect(server.addr(), "rill-bench-admin").await?;
    let where_note = match server.mode {
        ServerMode::Process => "server: separate `rill serve` process",
        ServerMode::InProcess => "server: in-process (shares this process's CPUs)",
        ServerMode::External => "server: external",
    };
    for phase in &args.phases {
        match phase {
            ProducePhase::Raw => {
                let window = raw_phase(&admin, server, args).await?;
                let batch_note = format!(
                    "{} connection(s) x {} in flight, pre-encoded batches of {} x {} B, fsync=never, {} partitions; {where_note}",
                    args.raw_connections, args.raw_inflight, args.raw_batch_records, args.value_size, args.partitions
                );
                report_window(sink, bench, "raw", &window, args.value_size, &batch_note);
            }
            ProducePhase::Producer => {
                let config = producer_config(args, args.linger_ms);
                let window = producer_phase(
                    &admin,
                    server,
                    args,
                    FsyncPolicy::Never,
                    args.producers,
                    args.senders,
                    args.window,
                    &config,
                )
                .await?;
                let note = format!(
                    "{} producer(s) x {} sender(s), window {}, linger {} ms, batch {} KiB, idempotent {}, fsync=never, {} partitions; {where_note}",
                    args.producers,
                    args.senders,
                    args.window,
                    args.linger_ms,
                    args.batch_kib,
                    args.idempotent,
                    args.partitions
                );
                report_window(sink, bench, "producer", &window, args.value_size, &note);
            }
            ProducePhase::Fsync => fsync_phase(&admin, server, args, sink, where_note).await?,
        }
    }
    Ok(())
}

fn producer_config(args: &ProduceArgs, linger_ms: u64) -> ProducerConfig {
    ProducerConfig {
        linger_ms,
        batch_size_bytes: args.batch_kib * 1024,
        idempotent: args.idempotent,
        ..ProducerConfig::default()
    }
}

fn report_window(sink: &mut dyn Sink, bench: &'static str, name: &str, w: &Window, value_size: usize, note: &str) {
    let secs = w.elapsed.as_secs_f64();
    sink.row(bench, format!("{name} msg/s"), w.rate(), "msg/s", note.to_string());
    sink.row(
        bench,
        format!("{name} payload MB/s"),
        w.rate() * value_size as f64 / 1e6,
        "MB/s",
        format!("{value_size} B values"),
    );
    sink.row(
        bench,
        format!("{name} log MB/s"),
        w.log_bytes as f64 / 1e6 / secs,
        "MB/s",
        "segment bytes written".into(),
    );
    cpu_rows(sink, bench, name, &w.cpu, secs, Some(w.messages));
}

fn cpu_rows(sink: &mut dyn Sink, bench: &'static str, name: &str, cpu: &CpuWindow, secs: f64, messages: Option<u64>) {
    if let Some(fsync) = cpu.fsync.as_ref().filter(|f| f.count > 0) {
        sink.row(
            bench,
            format!("{name} fsyncs/s"),
            fsync.count as f64 / secs,
            "fsyncs/s",
            format!(
                "server fdatasync calls in the window, mean {:.0} us, p50 <= {} ms, p99 <= {} ms (bucket bounds)",
                fsync.sum_s / fsync.count as f64 * 1e6,
                fsync.quantile_bound_s(0.5) * 1e3,
                fsync.quantile_bound_s(0.99) * 1e3
            ),
        );
    }
    for (who, sched) in [("client", cpu.client), ("server", cpu.server)] {
        let Some(sched) = sched else { continue };
        let cpu_s = sched.on_cpu_ns as f64 / 1e9;
        sink.row(
            bench,
            format!("{name} {who} CPUs"),
            cpu_s / secs,
            "CPUs",
            format!(
                "{who} process on-CPU time / window; its threads also waited {:.2} s for a CPU",
                sched.wait_ns as f64 / 1e9
            ),
        );
        if let Some(messages) = messages.filter(|m| *m > 0) {
            sink.row(
                bench,
                format!("{name} {who} CPU per msg"),
                cpu_s * 1e9 / messages as f64,
                "ns/msg",
                String::new(),
            );
        }
    }
}

async fn raw_phase(admin: &Client, server: &BenchServer, args: &ProduceArgs) -> Result<Window> {
    let topic = topic_name("raw");
    admin.create_topic(&topic, settings(&args.server, args.partitions, FsyncPolicy::Never)).await?;
    let batch = encode(&records(args.raw_batch_records, args.value_size), now_ms())?.freeze();
    eprintln!(
        "rill-bench: server-produce raw: {} B batches of {} records, {} x {} in flight",
        batch.len(),
        args.raw_batch_records,
        args.raw_connections,
        args.raw_inflight
    );
    let stop = Arc::new(AtomicBool::new(false));
    let topic: Arc<str> = Arc::from(topic.as_str());
    let mut tasks = Vec::new();
    for c in 0..args.raw_connections.max(1) {
        let client = Client::connect(server.addr(), &format!("rill-bench-raw-{c}")).await?;
        for t in 0..args.raw_inflight.max(1) {
            let partition = u32::try_from((c * args.raw_inflight.max(1) + t) % args.partitions.max(1) as usize)?;
            let (client, topic, batch, stop) = (client.clone(), Arc::clone(&topic), batch.clone(), Arc::clone(&stop));
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    client.produce(&topic, partition, Acks::Leader, batch.clone()).await?;
                }
                Ok::<(), rill_server::Error>(())
            }));
        }
    }
    let window = measure(admin, server, &topic, args).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await??;
    }
    admin.delete_topic(&topic).await?;
    window
}

/// Closed loop: each sender keeps `window` sends unacknowledged, awaiting the oldest before
/// sending the next.
async fn sender(producer: Producer, topic: Arc<str>, value: Bytes, window: usize, stop: Arc<AtomicBool>) -> Result<()> {
    let mut pending = VecDeque::with_capacity(window);
    while !stop.load(Ordering::Relaxed) {
        if pending.len() >= window {
            if let Some(oldest) = pending.pop_front() {
                oldest.await?;
            }
        }
        pending.push_back(producer.send(&topic, None, value.clone(), Vec::new()));
    }
    for send in pending {
        send.await?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn producer_phase(
    admin: &Client,
    server: &BenchServer,
    args: &ProduceArgs,
    fsync: FsyncPolicy,
    producers: usize,
    senders: usize,
    window: usize,
    config: &ProducerConfig,
) -> Result<Window> {
    let topic = topic_name("prod");
    admin.create_topic(&topic, settings(&args.server, args.partitions, fsync)).await?;
    eprintln!(
        "rill-bench: server-produce producers: {producers} x {senders} sender(s), window {window}, fsync {fsync:?}, linger {} ms",
        config.linger_ms
    );
    let value = Bytes::from(vec![0x5a_u8; args.value_size]);
    let stop = Arc::new(AtomicBool::new(false));
    let topic: Arc<str> = Arc::from(topic.as_str());
    let mut tasks = Vec::new();
    let mut handles = Vec::new();
    for p in 0..producers.max(1) {
        let client = Client::connect(server.addr(), &format!("rill-bench-producer-{p}")).await?;
        let producer = Producer::new(client, config.clone())?;
        for _ in 0..senders.max(1) {
            let task = sender(producer.clone(), Arc::clone(&topic), value.clone(), window.max(1), Arc::clone(&stop));
            tasks.push(tokio::spawn(task));
        }
        handles.push(producer);
    }
    let measured = measure(admin, server, &topic, args).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await??;
    }
    for producer in handles {
        producer.close().await;
    }
    admin.delete_topic(&topic).await?;
    measured
}

async fn fsync_phase(
    admin: &Client,
    server: &BenchServer,
    args: &ProduceArgs,
    sink: &mut dyn Sink,
    where_note: &str,
) -> Result<()> {
    let bench = "server-produce";
    let config = producer_config(args, args.linger_ms);
    let n = args.fsync_producers;
    let mut never: Vec<Window> = Vec::new();
    let mut always: Vec<Window> = Vec::new();
    for rep in 0..args.fsync_repeat.max(1) {
        let order = if rep % 2 == 0 { [false, true] } else { [true, false] };
        for is_always in order {
            let policy = if is_always { FsyncPolicy::Always } else { FsyncPolicy::Never };
            let w = producer_phase(admin, server, args, policy, n, 1, args.fsync_window, &config).await?;
            eprintln!("rill-bench: server-produce fsync {policy:?} x {n} producers: {:.0} msg/s", w.rate());
            if is_always {
                always.push(w);
            } else {
                never.push(w);
            }
        }
    }
    let note = format!(
        "{n} producers (own connection and producer id each), window {} each, linger {} ms, batch {} KiB, idempotent {}, {} partitions; {where_note}",
        args.fsync_window, args.linger_ms, args.batch_kib, args.idempotent, args.partitions
    );
    let mut medians = [0.0; 2];
    for (i, (name, windows)) in [("never", &never), ("always", &always)].into_iter().enumerate() {
        let rates: Vec<f64> = windows.iter().map(Window::rate).collect();
        medians[i] = median(&rates);
        let label = format!("fsync={name} x{n}");
        sink.row(bench, format!("{label} msg/s"), medians[i], "msg/s", format!("{note}; {}", runs_note(&rates)));
        sink.row(
            bench,
            format!("{label} payload MB/s"),
            medians[i] * args.value_size as f64 / 1e6,
            "MB/s",
            String::new(),
        );
        if let Some(last) = windows.last() {
            cpu_rows(sink, bench, &label, &last.cpu, last.elapsed.as_secs_f64(), Some(last.messages));
        }
    }
    sink.row(
        bench,
        format!("fsync never/always x{n}"),
        medians[0] / medians[1],
        "x",
        "median never rate / median always rate; requirement <= 3".into(),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// server-latency

/// Runs `server-latency` and reports to `sink`.
pub fn run_latency(dir: &Path, args: &LatencyArgs, sink: &mut dyn Sink) -> Result<()> {
    let bench = "server-latency";
    if args.value_size < 8 {
        return Err("--value-size must be at least 8 (the intended send time)".into());
    }
    if args.rate == 0 {
        return Err("--rate must be positive".into());
    }
    sink.row(bench, "load_average_1min".into(), load_average().unwrap_or(f64::NAN), "", "at start; 2 vCPUs".into());
    eprintln!("rill-bench: loadavg at start: {}", loadavg_line());
    let server = BenchServer::start(&args.server, &dir.join("server-data"))?;
    let runtime = client_runtime(&args.server)?;
    let result = runtime.block_on(async {
        let admin = Client::connect(server.addr(), "rill-bench-admin").await?;
        for &fsync in &args.fsync {
            let result = latency_run(&admin, &server, args, fsync).await?;
            result.report(sink, args, fsync);
        }
        Ok::<(), crate::summary::BoxError>(())
    });
    drop(runtime);
    let stopped = server.stop();
    eprintln!("rill-bench: loadavg at end: {}", loadavg_line());
    sink.row(bench, "load_average_1min_end".into(), load_average().unwrap_or(f64::NAN), "", "at end".into());
    result.and(stopped)
}

fn histogram() -> Result<Histogram<u64>> {
    // Microseconds, 1 µs .. 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).map_err(|e| format!("histogram: {e}").into())
}

struct LatencyResult {
    /// Intended send time -> received by the consumer, messages of the window (µs).
    end_to_end: Histogram<u64>,
    /// Intended send time -> the producer's acknowledgement (µs).
    ack: Histogram<u64>,
    /// Actual send (`Producer::send` call) - intended send time (µs): the load generator's lag.
    send_lag: Histogram<u64>,
    sent_in_window: u64,
    sent_total: u64,
    received_total: u64,
    send_errors: u64,
    window: Duration,
    cpu: CpuWindow,
}

impl LatencyResult {
    fn report(&self, sink: &mut dyn Sink, args: &LatencyArgs, fsync: FsyncArg) {
        let bench = "server-latency";
        let label = format!("fsync={}", fsync.name());
        let e2e = &self.end_to_end;
        let ms = |us: u64| us as f64 / 1e3;
        let secs = self.window.as_secs_f64();
        let received = e2e.len();
        let note = format!(
            "intended send -> consumer receives; {} msg/s target, {} B values, {} partition(s), linger {} ms, tick {} us; {received} messages in {secs:.1} s",
            args.rate, args.value_size, args.partitions, args.linger_ms, args.tick_us
        );
        sink.row(bench, format!("{label} e2e p50"), ms(e2e.value_at_quantile(0.5)), "ms", note);
        sink.row(bench, format!("{label} e2e p99"), ms(e2e.value_at_quantile(0.99)), "ms", "requirement <= 5".into());
        sink.row(bench, format!("{label} e2e p99.9"), ms(e2e.value_at_quantile(0.999)), "ms", String::new());
        sink.row(bench, format!("{label} e2e max"), ms(e2e.max()), "ms", String::new());
        sink.row(
            bench,
            format!("{label} achieved msg/s"),
            received as f64 / secs,
            "msg/s",
            format!("window messages received / window; sent {} in the window", self.sent_in_window),
        );
        sink.row(
            bench,
            format!("{label} lost"),
            self.sent_total.saturating_sub(self.received_total) as f64,
            "msgs",
            format!(
                "sent {} in all, received {}, send errors {}",
                self.sent_total, self.received_total, self.send_errors
            ),
        );
        sink.row(
            bench,
            format!("{label} ack p50"),
            ms(self.ack.value_at_quantile(0.5)),
            "ms",
            "intended send -> the producer's receipt, window messages".into(),
        );
        sink.row(bench, format!("{label} ack p99"), ms(self.ack.value_at_quantile(0.99)), "ms", String::new());
        sink.row(
            bench,
            format!("{label} send lag p99"),
            ms(self.send_lag.value_at_quantile(0.99)),
            "ms",
            format!("actual - intended send time (load generator health); max {:.3} ms", ms(self.send_lag.max())),
        );
        cpu_rows(sink, bench, &label, &self.cpu, secs, None);
    }
}

type SendFuture = Pin<Box<dyn Future<Output = rill_server::Result<SendReceipt>> + Send>>;

/// Counters shared by the pacer, the collector and the consumers.
#[derive(Default)]
struct Progress {
    sent: AtomicU64,
    received: AtomicU64,
}

fn elapsed_ns(base: Instant) -> u64 {
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

async fn latency_run(
    admin: &Client,
    server: &BenchServer,
    args: &LatencyArgs,
    fsync: FsyncArg,
) -> Result<LatencyResult> {
    let topic = topic_name(&format!("lat-{}", fsync.name()));
    admin.create_topic(&topic, settings(&args.server, args.partitions, fsync.policy())).await?;
    eprintln!(
        "rill-bench: server-latency fsync={}: {} msg/s for {:.1} s (+{:.1} s warm-up); loadavg {}",
        fsync.name(),
        args.rate,
        args.seconds,
        args.warmup_seconds,
        loadavg_line()
    );
    let base = Instant::now();
    let window_start_ns = (args.warmup_seconds * 1e9) as u64;
    let end_ns = window_start_ns + (args.seconds * 1e9) as u64;
    let progress = Arc::new(Progress::default());
    let stop = Arc::new(AtomicBool::new(false));

    // Consumers first, one connection per partition, each long-polling from offset 0.
    let mut consumers = Vec::new();
    for partition in 0..args.partitions.max(1) {
        let client = Client::connect(server.addr(), &format!("rill-bench-consumer-{partition}")).await?;
        let (topic, progress, stop) = (topic.clone(), Arc::clone(&progress), Arc::clone(&stop));
        let wait_ms = args.fetch_wait_ms;
        consumers.push(tokio::spawn(async move {
            let mut hist = histogram()?;
            let mut offset = 0;
            while !stop.load(Ordering::Relaxed) {
                let fetched = client.fetch(&topic, partition, offset, 1 << 20, wait_ms).await?;
                let now_ns = elapsed_ns(base);
                let (records, next) = decode_fetched(partition, offset, fetched.records)?;
                offset = next;
                for record in &records {
                    let value = record.value.as_deref().unwrap_or_default();
                    let stamp: [u8; 8] = value.get(..8).and_then(|s| s.try_into().ok()).ok_or("short value")?;
                    let intended_ns = u64::from_le_bytes(stamp);
                    if (window_start_ns..end_ns).contains(&intended_ns) {
                        hist.saturating_record(now_ns.saturating_sub(intended_ns) / 1000);
                    }
                }
                progress.received.fetch_add(records.len() as u64, Ordering::Relaxed);
            }
            Ok::<Histogram<u64>, crate::summary::BoxError>(hist)
        }));
    }

    // The producer, on its own connection; a collector awaits every send's receipt.
    let client = Client::connect(server.addr(), "rill-bench-latency-producer").await?;
    let config = ProducerConfig {
        linger_ms: args.linger_ms,
        batch_size_bytes: args.batch_kib * 1024,
        ..ProducerConfig::default()
    };
    let producer = Producer::new(client, config)?;
    // The pacer hands over the sends of one wake-up at a time (one channel wake per tick,
    // not per message: the load generator's own CPU use competes with the server's).
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<(u64, SendFuture)>>();
    let collector = tokio::spawn(async move {
        let mut ack = histogram()?;
        let mut errors = 0u64;
        while let Some(sends) = rx.recv().await {
            for (intended_ns, send) in sends {
                match send.await {
                    Ok(_) => {
                        if (window_start_ns..end_ns).contains(&intended_ns) {
                            ack.saturating_record(elapsed_ns(base).saturating_sub(intended_ns) / 1000);
                        }
                    }
                    Err(e) => {
                        if errors == 0 {
                            eprintln!("rill-bench: send failed: {e}");
                        }
                        errors += 1;
                    }
                }
            }
        }
        Ok::<(Histogram<u64>, u64), crate::summary::BoxError>((ack, errors))
    });

    // The pacer: a thread that sends every message at (or as soon as it can after) its
    // intended time, i / rate seconds after the start.
    let pacer = {
        let (producer, topic, progress) = (producer.clone(), topic.clone(), Arc::clone(&progress));
        let (rate, value_size, tick_ns) = (args.rate, args.value_size, args.tick_us * 1000);
        tokio::task::spawn_blocking(move || -> Result<(Histogram<u64>, u64)> {
            let mut lag = histogram()?;
            let mut in_window = 0u64;
            let interval_ns = 1e9 / rate as f64;
            let mut i: u64 = 0;
            loop {
                let due = (i as f64 * interval_ns) as u64;
                if due >= end_ns {
                    break;
                }
                let now = elapsed_ns(base);
                if now < due {
                    std::thread::sleep(Duration::from_nanos((due - now).max(tick_ns)));
                    continue;
                }
                let mut sends = Vec::new();
                loop {
                    let intended = (i as f64 * interval_ns) as u64;
                    if intended > now || intended >= end_ns {
                        break;
                    }
                    let mut value = vec![0x5a_u8; value_size];
                    value[..8].copy_from_slice(&intended.to_le_bytes());
                    let send: SendFuture = Box::pin(producer.send(&topic, None, Bytes::from(value), Vec::new()));
                    lag.saturating_record((now - intended) / 1000);
                    if intended >= window_start_ns {
                        in_window += 1;
                    }
                    sends.push((intended, send));
                    i += 1;
                }
                progress.sent.fetch_add(sends.len() as u64, Ordering::Relaxed);
                tx.send(sends).map_err(|_| "the collector stopped")?;
            }
            Ok((lag, in_window))
        })
    };

    // CPU over the measured window.
    tokio::time::sleep_until((base + Duration::from_nanos(window_start_ns)).into()).await;
    let cpu = CpuMark::now(server);
    tokio::time::sleep_until((base + Duration::from_nanos(end_ns)).into()).await;
    let cpu = cpu.since(server);

    let (send_lag, sent_in_window) = pacer.await??;
    let (ack, send_errors) = collector.await??;
    // Drain: wait until the consumers have every message, at most 10 s.
    let drain_deadline = Instant::now() + Duration::from_secs(10);
    while progress.received.load(Ordering::Relaxed) < progress.sent.load(Ordering::Relaxed)
        && Instant::now() < drain_deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut end_to_end = histogram()?;
    for consumer in consumers {
        let hist = consumer.await??;
        end_to_end.add(&hist).map_err(|e| format!("merge histograms: {e}"))?;
    }
    producer.close().await;
    admin.delete_topic(&topic).await?;
    let result = LatencyResult {
        end_to_end,
        ack,
        send_lag,
        sent_in_window,
        sent_total: progress.sent.load(Ordering::Relaxed),
        received_total: progress.received.load(Ordering::Relaxed),
        send_errors,
        window: Duration::from_nanos(end_ns - window_start_ns),
        cpu,
    };
    eprintln!(
        "rill-bench: server-latency fsync={}: p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms; {} of {} received; loadavg {}",
        fsync.name(),
        result.end_to_end.value_at_quantile(0.5) as f64 / 1e3,
        result.end_to_end.value_at_quantile(0.99) as f64 / 1e3,
        result.end_to_end.value_at_quantile(0.999) as f64 / 1e3,
        result.end_to_end.max() as f64 / 1e3,
        result.received_total,
        result.sent_total,
        loadavg_line()
    );
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pacing arithmetic: message i is due i / rate seconds after the start.
    #[test]
    fn intended_times_follow_the_rate() {
        let interval_ns = 1e9 / 50_000.0;
        let due = |i: u64| (i as f64 * interval_ns) as u64;
        assert_eq!(due(0), 0);
        assert_eq!(due(50_000), 1_000_000_000);
        assert_eq!(due(1), 20_000);
    }

    #[test]
    fn fmt_helpers() {
        use crate::summary::fmt;
        assert_eq!(fmt(1234.4), "1234");
        assert_eq!(runs_note(&[1.0, 2.0]), "runs [1.000, 2.000]");
    }
}
