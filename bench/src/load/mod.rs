//! `rill-bench load`: the same workloads against rill (embedded and server) and its peers
//! (Redis Streams, NATS JetStream; feature `peers`), in one run, from one client.
//!
//! * **Closed loop** (default): every producer keeps `--inflight` sends unacknowledged and
//!   sends the next as soon as one is acknowledged: the maximum throughput.
//! * **Open loop** (`--rate R`): the producers send `R` messages a second in total on a
//!   fixed [`schedule::Schedule`], whatever the system does. Every message carries its
//!   intended send time, and latencies run from that time, so a stall counts against every
//!   message that should have gone out during it (no coordinated omission).
//!
//! Workloads: `produce` (acknowledged throughput and ack latency), `e2e` (plus one consumer
//! per partition, latency intended send → received), `fanout` (`--consumers` independent
//! consumers each receive everything), `replay` (fill a log of `--replay-mib`, then time one
//! consumer per partition reading it from the start). The priority mix (p0 trickle under a
//! p3 flood) is rill-only and stays `rill-bench priority`.
//!
//! Output: a markdown table (stdout, or the JSON document with `--json`), and with `--out
//! DIR` the files `load.json`, `load.md` and `load.svg`.

pub mod drivers;
pub mod kafka;
pub mod output;
pub mod pacer;
#[cfg(feature = "peers")]
pub mod peers;
pub mod schedule;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::load::drivers::{Driver, Durability, Front, SendSettings, SystemKind};
use crate::load::output::{Outcome, Percentiles};
use crate::load::schedule::{stamp_of, stamped_value, Schedule};
use crate::server_load::{BenchServer, ServerArgs};
use crate::summary::{loadavg_line, Result};

/// A workload of `rill-bench load`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// Producers only: acknowledged msg/s and ack latency.
    Produce,
    /// Producers and one consumer per partition: end-to-end latency.
    E2e,
    /// Producers and `--consumers` independent consumers, each receiving every message.
    Fanout,
    /// Fill a log, then read it from the start as fast as possible.
    Replay,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Produce => "produce",
            Workload::E2e => "e2e",
            Workload::Fanout => "fanout",
            Workload::Replay => "replay",
        }
    }
}

/// Options of `rill-bench load`.
#[derive(Args, Clone, Debug)]
pub struct LoadArgs {
    /// Systems to run, in this order (`redis` and `nats` need the `peers` feature).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "embedded,server")]
    pub systems: Vec<SystemKind>,
    /// Workloads to run, in this order.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "produce,e2e")]
    pub workloads: Vec<Workload>,
    /// Durability settings to run (matching pairs across systems; see docs/benchmarks.md).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "always")]
    pub durability: Vec<Durability>,
    /// Open loop at this total rate (messages per second); closed loop when absent.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Message payload size in bytes (at least 8: the intended send time).
    #[arg(long, default_value_t = 100)]
    pub message_size: usize,
    /// Producers (each its own connection).
    #[arg(long, default_value_t = 4)]
    pub producers: usize,
    /// Consumers of the `fanout` workload (each its own group, each receives everything).
    #[arg(long, default_value_t = 4)]
    pub consumers: usize,
    /// Partitions (rill), stream keys (Redis) or streams (NATS).
    #[arg(long, default_value_t = 1)]
    pub partitions: u32,
    /// Messages per send: records per append (embedded), records per produce request
    /// (rill server), XADDs per pipeline (Redis), publishes per send (NATS), `Producer`
    /// sends per await (rill server through the client `Producer`, which batches by linger
    /// and size).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Closed loop: sends each producer keeps unacknowledged.
    #[arg(long, default_value_t = 16)]
    pub inflight: usize,
    /// rill server through the client `Producer`: `linger_ms`.
    #[arg(long, default_value_t = 1)]
    pub linger_ms: u64,
    /// rill server through the client `Producer`: batch size in KiB.
    #[arg(long, default_value_t = 256)]
    pub batch_kib: usize,
    /// rill server client: acknowledgement level (`all` waits for the in-sync replicas of a
    /// cluster; on a single node it is `leader`).
    #[arg(long, value_enum, default_value_t = AcksArg::Leader)]
    pub acks: AcksArg,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Seconds of load before the measured window.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// `replay`: size of the log to write, then read, in MiB of payload.
    #[arg(long, default_value_t = 256)]
    pub replay_mib: u64,
    /// Redis server.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// NATS server for `relaxed` and `none` (started with the default `sync_interval`).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// NATS server for `always` (started with `sync_interval: always`).
    #[arg(long, default_value = "nats://127.0.0.1:4223")]
    pub nats_url_always: String,
    /// Also write `load.json`, `load.md` and `load.svg` into this directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// How the rill server is run (`--server process` starts `rill serve`).
    #[command(flatten)]
    pub server: ServerArgs,
}

/// `--acks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AcksArg {
    /// The leader's log acknowledged the batch.
    Leader,
    /// Every in-sync replica holds the batch.
    All,
}

impl From<AcksArg> for rill_server::messages::Acks {
    fn from(acks: AcksArg) -> Self {
        match acks {
            AcksArg::Leader => rill_server::messages::Acks::Leader,
            AcksArg::All => rill_server::messages::Acks::All,
        }
    }
}

fn histogram() -> Result<Histogram<u64>> {
    // µs, 1 µs .. 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).map_err(|e| format!("histogram: {e}").into())
}

fn elapsed_ns(base: Instant) -> u64 {
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Runs `rill-bench load`, prints the table (or JSON) and writes the files of `--out`.
pub fn run(dir: &Path, args: &LoadArgs, json: bool, command_line: &str) -> Result<()> {
    if args.message_size < 8 {
        return Err("--message-size must be at least 8 (the intended send time)".into());
    }
    if args.producers == 0 || args.partitions == 0 || args.batch == 0 || args.inflight == 0 {
        return Err("--producers, --partitions, --batch and --inflight must be positive".into());
    }
    let started = crate::now_ms();
    let load_start = loadavg_line();
    let runtime = crate::server_load::client_runtime(&args.server)?;
    let mut outcomes = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    for &system in &args.systems {
        let mut server = None;
        for &durability in &args.durability {
            let driver = match connect(&runtime, system, durability, args, dir, &mut server) {
                Ok(driver) => driver,
                Err(e) => {
                    eprintln!("rill-bench: load: {} {}: skipped: {e}", system.name(), durability.name());
                    continue;
                }
            };
            for &workload in &args.workloads {
                eprintln!(
                    "rill-bench: load: {} {} {} ...; loadavg {}",
                    system.name(),
                    durability.name(),
                    workload.name(),
                    loadavg_line()
                );
                match runtime.block_on(run_one(&driver, server.as_ref(), system, workload, durability, args)) {
                    Ok(outcome) => {
                        eprintln!("rill-bench: load:   {:.0} msg/s, latency {:?}", outcome.msgs_per_s, outcome.latency);
                        outcomes.push(outcome);
                    }
                    // One system failing a workload must not lose the others' results.
                    Err(e) => {
                        eprintln!(
                            "rill-bench: load: {} {} {} FAILED: {e}",
                            system.name(),
                            durability.name(),
                            workload.name()
                        );
                        failures.push(format!("{} {} {}: {e}", system.name(), durability.name(), workload.name()));
                    }
                }
            }
            driver.close()?;
        }
        if let Some(server) = server {
            server.stop()?;
        }
    }
    drop(runtime);
    let meta = vec![
        ("command".to_string(), command_line.to_string()),
        ("started_unix_ms".to_string(), started.to_string()),
        ("loadavg_start".to_string(), load_start),
        ("loadavg_end".to_string(), loadavg_line()),
        ("cpus".to_string(), std::thread::available_parallelism().map_or(0, |n| n.get()).to_string()),
        ("failures".to_string(), failures.join("; ")),
    ];
    let mut markdown = output::to_markdown(&outcomes);
    if !failures.is_empty() {
        markdown.push_str("\nFailed runs:\n\n");
        for failure in &failures {
            markdown.push_str(&format!("- {failure}\n"));
        }
    }
    let document = output::to_json(&meta, &outcomes);
    if json {
        print!("{document}");
    } else {
        print!("{markdown}");
    }
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out)?;
        std::fs::write(out.join("load.json"), &document)?;
        let header = format!("`{command_line}`\n\nloadavg at start {}, at end {}\n\n", meta[2].1, meta[3].1);
        std::fs::write(out.join("load.md"), format!("{header}{markdown}"))?;
        std::fs::write(out.join("load.svg"), output::to_svg(&svg_title(command_line), &outcomes))?;
        eprintln!("rill-bench: load: wrote load.json, load.md, load.svg in {}", out.display());
    }
    Ok(())
}

/// `rill-bench load <options>`, without the binary's path.
fn svg_title(command_line: &str) -> String {
    let options = command_line.split_once(" load").map_or("", |(_, rest)| rest);
    format!("rill-bench load{options}")
}

fn connect(
    runtime: &tokio::runtime::Runtime,
    system: SystemKind,
    durability: Durability,
    args: &LoadArgs,
    dir: &Path,
    server: &mut Option<BenchServer>,
) -> Result<Driver> {
    let _ = durability;
    match system {
        SystemKind::Embedded => Driver::embedded(&dir.join(format!("embedded-{}", durability.name()))),
        SystemKind::Server | SystemKind::ServerProducer | SystemKind::Kafka => {
            let server = match server {
                Some(server) => server,
                None => {
                    // A server per system; the Kafka listener only for the Kafka front door.
                    let kafka = system == SystemKind::Kafka;
                    server.insert(BenchServer::start_with(&args.server, &dir.join("server-data"), kafka)?)
                }
            };
            let front = match system {
                SystemKind::ServerProducer => Front::Producer,
                SystemKind::Kafka => {
                    Front::Kafka(server.kafka_addr().ok_or("the server was started without its Kafka listener")?.into())
                }
                _ => Front::Batch,
            };
            runtime.block_on(Driver::server(server.addr(), args.server.segment_mib << 20, front))
        }
        #[cfg(feature = "peers")]
        SystemKind::Redis => Ok(Driver::Redis(runtime.block_on(peers::RedisDriver::connect(&args.redis_url))?)),
        #[cfg(feature = "peers")]
        SystemKind::Nats => {
            let url = if durability == Durability::Always { &args.nats_url_always } else { &args.nats_url };
            Ok(Driver::Nats(runtime.block_on(peers::NatsDriver::connect(url))?))
        }
        #[cfg(not(feature = "peers"))]
        SystemKind::Redis | SystemKind::Nats => {
            Err("this rill-bench was built without the `peers` feature (cargo build --features peers)".into())
        }
    }
}

/// Counters shared by the tasks of one run.
#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    acked_in_window: AtomicU64,
    received: AtomicU64,
    errors: AtomicU64,
    /// Open loop: messages due in the run that were never sent (the sender gave up).
    unsent: AtomicU64,
}

/// Open loop: how long after the end of the window a sender that is behind keeps sending.
const GIVE_UP_NS: u64 = 5_000_000_000;

/// Where a run's time goes: `origin` is time 0 of every stamp; the window is
/// `[window_start_ns, window_end_ns)`.
#[derive(Clone, Copy)]
struct Clock {
    origin: Instant,
    window_start_ns: u64,
    window_end_ns: u64,
}

impl Clock {
    fn in_window(&self, ns: u64) -> bool {
        (self.window_start_ns..self.window_end_ns).contains(&ns)
    }
}

fn stream_name(system: SystemKind, workload: Workload, durability: Durability) -> String {
    format!("bench-{}-{}-{}-{}", system.name(), workload.name(), durability.name(), crate::now_ms())
}

fn params(args: &LoadArgs, workload: Workload) -> Vec<(String, String)> {
    let mut p = vec![
        ("message_size".to_string(), args.message_size.to_string()),
        ("producers".to_string(), args.producers.to_string()),
        ("partitions".to_string(), args.partitions.to_string()),
        ("batch".to_string(), args.batch.to_string()),
        ("inflight".to_string(), args.inflight.to_string()),
        ("linger_ms".to_string(), args.linger_ms.to_string()),
        ("batch_kib".to_string(), args.batch_kib.to_string()),
        ("duration_s".to_string(), args.duration.to_string()),
    ];
    if workload == Workload::Fanout {
        p.push(("consumers".to_string(), args.consumers.to_string()));
    }
    if workload == Workload::Replay {
        p.push(("replay_mib".to_string(), args.replay_mib.to_string()));
    }
    p
}

async fn run_one(
    driver: &Driver,
    server: Option<&BenchServer>,
    system: SystemKind,
    workload: Workload,
    durability: Durability,
    args: &LoadArgs,
) -> Result<Outcome> {
    let stream = stream_name(system, workload, durability);
    driver.create(&stream, args.partitions, durability).await.map_err(|e| format!("create {stream}: {e}"))?;
    let mode = match args.rate {
        Some(rate) if workload != Workload::Replay => format!("open@{rate}"),
        _ => "closed".to_string(),
    };
    let mut outcome = Outcome {
        system: system.name().to_string(),
        workload: workload.name().to_string(),
        durability: durability.name().to_string(),
        mode,
        params: params(args, workload),
        ..Outcome::default()
    };
    let result = match workload {
        Workload::Replay => replay(driver, &stream, args, &mut outcome).await,
        _ => {
            let groups = match workload {
                Workload::Produce => 0,
                Workload::E2e => 1,
                _ => args.consumers.max(1),
            };
            traffic(driver, server, &stream, args, groups, &mut outcome).await
        }
    };
    let deleted = driver.delete(&stream, args.partitions).await.map_err(|e| format!("delete {stream}: {e}").into());
    result.and(deleted).map(|()| outcome)
}

fn spawn_consumers(
    consumers: Vec<drivers::ConsumerHandle>,
    clock: Clock,
    counters: &Arc<Counters>,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Result<Histogram<u64>>>> {
    consumers
        .into_iter()
        .map(|mut consumer| {
            let (counters, stop) = (Arc::clone(counters), Arc::clone(stop));
            tokio::spawn(async move {
                let mut hist = histogram()?;
                while !stop.load(Ordering::Relaxed) {
                    let values = consumer.next().await.map_err(|e| format!("consumer: {e}"))?;
                    let now_ns = elapsed_ns(clock.origin);
                    for value in &values {
                        let stamp = stamp_of(value).ok_or("a message shorter than its stamp")?;
                        if clock.in_window(stamp) {
                            hist.saturating_record(now_ns.saturating_sub(stamp) / 1000);
                        }
                    }
                    counters.received.fetch_add(values.len() as u64, Ordering::Relaxed);
                }
                Ok(hist)
            })
        })
        .collect()
}

/// Producers (closed or open loop) and `groups` independent consumers per partition.
async fn traffic(
    driver: &Driver,
    server: Option<&BenchServer>,
    stream: &str,
    args: &LoadArgs,
    groups: usize,
    outcome: &mut Outcome,
) -> Result<()> {
    let settings =
        SendSettings { linger_ms: args.linger_ms, batch_bytes: args.batch_kib * 1024, acks: args.acks.into() };
    let mut consumers = Vec::new();
    for group in 0..groups {
        for p in 0..args.partitions {
            consumers.push(driver.consumer(stream, p, group).await.map_err(|e| format!("create a consumer: {e}"))?);
        }
    }
    let mut producers = Vec::new();
    for i in 0..args.producers {
        producers.push(
            driver
                .producer(stream, args.partitions, i, &settings)
                .await
                .map_err(|e| format!("create a producer: {e}"))?,
        );
    }
    let origin = Instant::now();
    let window_start_ns = (args.warmup * 1e9) as u64;
    let clock = Clock { origin, window_start_ns, window_end_ns: window_start_ns + (args.duration * 1e9) as u64 };
    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let consumer_tasks = spawn_consumers(consumers, clock, &counters, &stop);
    let pacer = match args.rate {
        Some(_) => Some(pacer::Pacer::start(origin, args.producers)?),
        None => None,
    };
    let mut producer_tasks = Vec::new();
    for (i, producer) in producers.into_iter().enumerate() {
        let schedule = match args.rate {
            Some(rate) => {
                let schedule = Schedule::for_producer(rate, args.producers, i).ok_or("--rate must be positive")?;
                let pacer = pacer.as_ref().map(|p| p.handle(i)).ok_or("an open loop has a pacer")?;
                Some((schedule, pacer))
            }
            None => None,
        };
        let counters = Arc::clone(&counters);
        let (size, batch, inflight) = (args.message_size, args.batch, args.inflight);
        producer_tasks.push(tokio::spawn(produce(producer, schedule, clock, size, batch, inflight, counters)));
    }

    // Figures over the window: the embedded store's writes and syncs, the server's fsyncs.
    tokio::time::sleep_until((origin + Duration::from_nanos(clock.window_start_ns)).into()).await;
    let io_before = driver.io_counts();
    let fsync_before =
        server.and_then(|s| s.metrics_addr.as_deref()).and_then(|a| crate::server_load::scrape_fsync(a).ok());
    let totals_before = server_totals(driver, stream).await;
    tokio::time::sleep_until((origin + Duration::from_nanos(clock.window_end_ns)).into()).await;
    let io_after = driver.io_counts();
    let fsync_after =
        server.and_then(|s| s.metrics_addr.as_deref()).and_then(|a| crate::server_load::scrape_fsync(a).ok());
    let totals_after = server_totals(driver, stream).await;

    let mut ack = histogram()?;
    let mut lag = histogram()?;
    for task in producer_tasks {
        let (a, l) = task.await??;
        ack.add(&a).map_err(|e| format!("merge histograms: {e}"))?;
        lag.add(&l).map_err(|e| format!("merge histograms: {e}"))?;
    }
    let expected = counters.sent.load(Ordering::Relaxed) * groups as u64;
    let drain_deadline = Instant::now() + Duration::from_secs(20);
    while counters.received.load(Ordering::Relaxed) < expected && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut e2e = histogram()?;
    for task in consumer_tasks {
        e2e.add(&task.await??).map_err(|e| format!("merge histograms: {e}"))?;
    }

    let secs = args.duration;
    let acked = counters.acked_in_window.load(Ordering::Relaxed);
    outcome.msgs_per_s = acked as f64 / secs;
    outcome.mb_per_s = outcome.msgs_per_s * args.message_size as f64 / 1e6;
    if groups == 0 {
        outcome.latency_kind = "ack".into();
        outcome.latency = Some(Percentiles::of(&ack));
    } else {
        outcome.latency_kind = "e2e".into();
        outcome.latency = Some(Percentiles::of(&e2e));
        outcome.extra.push(("ack p99 ms".into(), ack.value_at_quantile(0.99) as f64 / 1e3));
        let received = counters.received.load(Ordering::Relaxed);
        outcome.extra.push(("lost".into(), expected.saturating_sub(received) as f64));
    }
    if args.rate.is_some() {
        outcome.extra.push(("send lag p99 ms".into(), lag.value_at_quantile(0.99) as f64 / 1e3));
    }
    if let (Some((bytes_before, syncs_before)), Some((bytes_after, syncs_after))) = (io_before, io_after) {
        let mut window: Vec<u64> = syncs_after.get(syncs_before.len()..).unwrap_or_default().to_vec();
        let syncs = window.len() as u64;
        outcome.extra.push(("fsyncs/s".into(), syncs as f64 / secs));
        if syncs > 0 {
            outcome.extra.push(("B/fsync".into(), bytes_after.saturating_sub(bytes_before) as f64 / syncs as f64));
        }
        // The disk's own share of the latency: how long the fdatasyncs of the window took
        // (only where there are enough of them for a 99th percentile to mean something).
        if syncs >= 100 {
            window.sort_unstable();
            let p99 = window[(window.len() * 99 / 100).min(window.len() - 1)];
            outcome.extra.push(("fsync p99 ms".into(), p99 as f64 / 1e6));
        }
    }
    if let (Some(before), Some(after)) = (fsync_before, fsync_after) {
        let fsyncs = after.since(&before);
        outcome.extra.push(("fsyncs/s".into(), fsyncs.count as f64 / secs));
        if let (Some((_, b0)), Some((_, b1)), true) = (totals_before, totals_after, fsyncs.count > 0) {
            outcome.extra.push(("B/fsync".into(), b1.saturating_sub(b0) as f64 / fsyncs.count as f64));
        }
    }
    let errors = counters.errors.load(Ordering::Relaxed);
    if errors > 0 {
        outcome.extra.push(("send errors".into(), errors as f64));
    }
    let unsent = counters.unsent.load(Ordering::Relaxed);
    if unsent > 0 {
        // Their latency is unbounded, so the percentiles above flatter the system.
        outcome.extra.push(("UNSENT (fell behind)".into(), unsent as f64));
    }
    Ok(())
}

async fn server_totals(driver: &Driver, stream: &str) -> Option<(u64, u64)> {
    match driver {
        Driver::Server { admin, .. } => crate::server_load::topic_totals(admin, stream).await.ok(),
        _ => None,
    }
}

/// One producer: sends until the window ends, a collector task awaiting the acks in order.
/// Returns the ack latency (intended send → ack, window messages) and the send lag
/// (actual − intended send time) histograms.
async fn produce(
    mut producer: drivers::ProducerHandle,
    schedule: Option<(Schedule, pacer::PacerHandle)>,
    clock: Clock,
    size: usize,
    batch: usize,
    inflight: usize,
    counters: Arc<Counters>,
) -> Result<(Histogram<u64>, Histogram<u64>)> {
    // Closed loop: `inflight` permits bound the sends awaiting their ack; a permit is
    // returned when the collector has the ack. Open loop: no bound (a stalled system makes
    // the sends pile up, and their latency runs from the intended times).
    let permits = Arc::new(Semaphore::new(if schedule.is_some() { Semaphore::MAX_PERMITS } else { inflight }));
    let (tx, mut rx) = mpsc::unbounded_channel::<(Vec<u64>, drivers::AckFuture, OwnedSemaphorePermit)>();
    let collector = {
        let counters = Arc::clone(&counters);
        tokio::spawn(async move {
            let mut ack = histogram()?;
            while let Some((stamps, future, permit)) = rx.recv().await {
                let acked = future.await;
                drop(permit);
                if let Err(e) = acked {
                    if counters.errors.fetch_add(1, Ordering::Relaxed) == 0 {
                        eprintln!("rill-bench: load: send failed: {e}");
                    }
                    continue;
                }
                let now = elapsed_ns(clock.origin);
                if clock.in_window(now) {
                    counters.acked_in_window.fetch_add(stamps.len() as u64, Ordering::Relaxed);
                }
                for stamp in stamps {
                    if clock.in_window(stamp) {
                        ack.saturating_record(now.saturating_sub(stamp) / 1000);
                    }
                }
            }
            Ok::<_, crate::summary::BoxError>(ack)
        })
    };
    let mut lag = histogram()?;
    let mut sent = 0u64;
    loop {
        // Closed loop: a message's time starts once it may be sent.
        let permit = Arc::clone(&permits).acquire_owned().await.map_err(|_| "the permits closed")?;
        let now = elapsed_ns(clock.origin);
        if now >= clock.window_end_ns + GIVE_UP_NS {
            // The system cannot take the load: stop instead of sending for minutes more.
            if let Some((s, _)) = &schedule {
                let due = s.due_count(clock.window_end_ns.saturating_sub(1));
                counters.unsent.fetch_add(due.saturating_sub(sent), Ordering::Relaxed);
            }
            break;
        }
        let stamps: Vec<u64> = match &schedule {
            None if now >= clock.window_end_ns => break,
            None => vec![now; batch],
            Some((s, pacer)) => {
                let due = s.next_batch(sent, now, clock.window_end_ns, batch as u64);
                if due.is_empty() {
                    let next = s.due_ns(sent);
                    if next >= clock.window_end_ns {
                        break;
                    }
                    pacer.sleep_until(next).await;
                    continue;
                }
                lag.saturating_record(now.saturating_sub(s.due_ns(due.start)) / 1000);
                due.map(|i| s.due_ns(i)).collect()
            }
        };
        sent += stamps.len() as u64;
        let values: Vec<Bytes> = stamps.iter().map(|&t| Bytes::from(stamped_value(t, size))).collect();
        let future = match producer.send(values).await {
            Ok(future) => future,
            Err(e) => {
                // Counted and reported; a peer refusing sends is a result, not a crash.
                if counters.errors.fetch_add(1, Ordering::Relaxed) == 0 {
                    eprintln!("rill-bench: load: send failed: {e}");
                }
                continue;
            }
        };
        counters.sent.fetch_add(stamps.len() as u64, Ordering::Relaxed);
        tx.send((stamps, future, permit)).map_err(|_| "the ack collector stopped")?;
    }
    drop(tx);
    let ack = collector.await??;
    producer.close().await;
    Ok((ack, lag))
}

/// Fills a log with `--replay-mib` MiB of payload (closed loop, the run's durability), then
/// times one consumer per partition reading it all from the start.
async fn replay(driver: &Driver, stream: &str, args: &LoadArgs, outcome: &mut Outcome) -> Result<()> {
    let settings =
        SendSettings { linger_ms: args.linger_ms, batch_bytes: args.batch_kib * 1024, acks: args.acks.into() };
    let total = (args.replay_mib << 20) / args.message_size as u64;
    let per_producer = total.div_ceil(args.producers as u64);
    let fill_start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..args.producers {
        let mut producer = driver.producer(stream, args.partitions, i, &settings).await?;
        let (size, batch, inflight) = (args.message_size, args.batch, args.inflight);
        tasks.push(tokio::spawn(async move {
            let value = Bytes::from(stamped_value(0, size));
            let mut pending = std::collections::VecDeque::new();
            let mut sent = 0u64;
            while sent < per_producer {
                if pending.len() >= inflight {
                    if let Some(oldest) = pending.pop_front() {
                        let oldest: drivers::AckFuture = oldest;
                        oldest.await?;
                    }
                }
                let n = (per_producer - sent).min(batch as u64);
                pending.push_back(producer.send(vec![value.clone(); n as usize]).await?);
                sent += n;
            }
            for ack in pending {
                ack.await?;
            }
            producer.close().await;
            Ok::<u64, crate::summary::BoxError>(sent)
        }));
    }
    let mut written = 0;
    for task in tasks {
        written += task.await??;
    }
    let fill_s = fill_start.elapsed().as_secs_f64();
    eprintln!("rill-bench: load: replay: wrote {written} messages in {fill_s:.1} s; reading");
    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut consumers = Vec::new();
    for p in 0..args.partitions {
        consumers.push(driver.consumer(stream, p, 0).await?);
    }
    let clock = Clock { origin: start, window_start_ns: 0, window_end_ns: 0 };
    let tasks = spawn_consumers(consumers, clock, &counters, &stop);
    let deadline = Instant::now() + Duration::from_secs(600);
    while counters.received.load(Ordering::Relaxed) < written && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await??;
    }
    let received = counters.received.load(Ordering::Relaxed);
    outcome.msgs_per_s = received as f64 / secs;
    outcome.mb_per_s = outcome.msgs_per_s * args.message_size as f64 / 1e6;
    outcome.extra.push(("replayed msgs".into(), received as f64));
    outcome.extra.push(("replay s".into(), secs));
    outcome.extra.push(("fill msg/s".into(), written as f64 / fill_s));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        load: LoadArgs,
    }

    fn parse(options: &[&str]) -> LoadArgs {
        use clap::Parser;
        Cli::parse_from(std::iter::once("load").chain(options.iter().copied())).load
    }

    fn extra(outcome: &Outcome, name: &str) -> Option<f64> {
        outcome.extra.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }

    /// The Kafka driver end to end against an in-process server's Kafka listener: every
    /// message produced through it comes back through its fetches, stamped, and a replay
    /// reads the whole log.
    #[test]
    fn kafka_front_door_delivers_every_message() -> Result<()> {
        let scratch = crate::ScratchDir::new_in(&std::env::temp_dir())?;
        let args = parse(&[
            "--systems",
            "kafka",
            "--server",
            "in-process",
            "--segment-mib",
            "16",
            "--duration",
            "0.5",
            "--warmup",
            "0.2",
            "--producers",
            "2",
            "--partitions",
            "2",
            "--batch",
            "8",
            "--inflight",
            "2",
            "--replay-mib",
            "1",
        ]);
        let runtime = crate::server_load::client_runtime(&args.server)?;
        let mut server = None;
        let driver = connect(&runtime, SystemKind::Kafka, Durability::Always, &args, scratch.path(), &mut server)?;
        let server = server.ok_or("the Kafka system starts a server")?;
        assert!(server.kafka_addr().is_some(), "the server runs its Kafka listener");

        let e2e = runtime.block_on(run_one(
            &driver,
            Some(&server),
            SystemKind::Kafka,
            Workload::E2e,
            Durability::Always,
            &args,
        ))?;
        assert_eq!(e2e.system, "rill-kafka");
        assert!(e2e.msgs_per_s > 0.0, "acknowledged messages in the window: {e2e:?}");
        assert_eq!(extra(&e2e, "lost"), Some(0.0), "every produced message was fetched: {e2e:?}");
        assert!(e2e.latency.as_ref().is_some_and(|l| l.count > 0), "end-to-end latencies were recorded: {e2e:?}");
        assert!(extra(&e2e, "B/fsync").is_some_and(|b| b > 0.0), "the server's fsyncs were counted: {e2e:?}");

        let replay = runtime.block_on(run_one(
            &driver,
            Some(&server),
            SystemKind::Kafka,
            Workload::Replay,
            Durability::None,
            &args,
        ))?;
        let written = (1u64 << 20) / args.message_size as u64;
        assert!(
            extra(&replay, "replayed msgs").is_some_and(|n| n as u64 >= written),
            "the replay read back the whole log of at least {written} messages: {replay:?}"
        );
        driver.close()?;
        drop(runtime);
        server.stop()
    }

    #[test]
    fn svg_title_drops_the_binary_path() {
        assert_eq!(svg_title("/x/target/release/rill-bench load --rate 5"), "rill-bench load --rate 5");
        assert_eq!(svg_title("rill-bench --json load"), "rill-bench load");
    }
}
