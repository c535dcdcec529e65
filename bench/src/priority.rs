//! `rill-bench priority`: priority cursors against the issue-6 requirements.
//!
//! * **latency**: one producer appends a record to lane `p0` every `--interval-us`; a consumer
//!   thread polls (up to `--latency-batch`), records for each `p0` delivery the time from
//!   just before its append to the return of the poll that delivered it, and acks the batch
//!   with `ack_many_deferred`; a second thread waits for each ack's ticket to be durable, so
//!   polls do not wait for syncs (a consumer that keeps working while its acks are written).
//!   Variant *idle*: nothing else. Variant *flood*: a third thread appends batches of 100
//!   records to `p3` as fast as it can. Requirement: flood p99 ≤ 2 × idle p99.
//! * **throughput**: a topic is filled with `--records` records in lane `p3` (one partition);
//!   variant *plain* reads them all with `Partition::read_records` (1 MiB per call); variant
//!   *cursor* drains them with a fresh priority cursor, one thread doing `poll(--batch)` then
//!   `ack_many` (one durable state write per batch, waited for); variant *cursor deferred*
//!   polls and acks with `ack_many_deferred` on one thread while a second thread waits for
//!   the tickets (acks made during a write share the next one). Requirement: cursor ≥ 50 % of
//!   plain (judged on the deferred variant; both shown).
//!
//! Topics use fsync=never (the cursor's state file is still written with fsync on every
//! ack batch). Each run uses a fresh store in the scratch directory; variants alternate.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use rill_engine::{FsyncPolicy, PriorityCursorConfig, Record, Store, StoreConfig, TopicConfig};

use crate::summary::{fmt, median, percentile, runs_note, Result, Sink};

const BENCH: &str = "priority";

/// Options of `rill-bench priority`.
#[derive(Args, Clone, Debug)]
pub struct PriorityArgs {
    /// Runs of each variant.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Seconds each latency run measures.
    #[arg(long, default_value_t = 3)]
    pub latency_secs: u64,
    /// Interval between p0 appends in the latency runs (µs).
    #[arg(long, default_value_t = 1_000)]
    pub interval_us: u64,
    /// Records of each throughput run.
    #[arg(long, default_value_t = 500_000)]
    pub records: usize,
    /// Value size of every record (bytes).
    #[arg(long, default_value_t = 100)]
    pub value_bytes: usize,
    /// Messages per poll (and per `ack_many`) in the throughput runs.
    #[arg(long, default_value_t = 1_000)]
    pub batch: usize,
    /// Most messages per poll in the latency runs.
    #[arg(long, default_value_t = 64)]
    pub latency_batch: usize,
    /// Run only the latency or only the throughput measurement.
    #[arg(long, value_parser = ["latency", "throughput"])]
    pub only: Option<String>,
}

fn open(dir: &Path) -> Result<Store> {
    Ok(Store::open(dir, StoreConfig { retention_check_interval_ms: None, ..StoreConfig::default() })?)
}

fn topic_config() -> TopicConfig {
    TopicConfig { partitions: 1, fsync: FsyncPolicy::Never, retention_ms: None, ..TopicConfig::default() }
}

fn cursor_config() -> PriorityCursorConfig {
    PriorityCursorConfig { max_in_flight: 100_000, ..PriorityCursorConfig::default() }
}

/// p50, p99 and max (µs) of one latency run, and how many p3 records were appended.
struct LatencyRun {
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    samples: usize,
    flood_records: u64,
}

fn latency_run(dir: &Path, args: &PriorityArgs, flood: bool) -> Result<LatencyRun> {
    let store = open(dir)?;
    let topic = store.create_priority_topic("lat", 4, topic_config())?;
    let cursor = store.priority_cursor("lat", "bench", cursor_config())?;
    let stop = Arc::new(AtomicBool::new(false));
    let origin = Instant::now();
    let value = Bytes::from(vec![b'x'; args.value_bytes]);
    let flooder = flood.then(|| {
        let (topic, stop, value) = (topic.clone(), Arc::clone(&stop), value.clone());
        std::thread::spawn(move || -> Result<u64> {
            let batch: Vec<Record> = (0..100).map(|_| Record::from_value(value.clone())).collect();
            let mut appended = 0;
            while !stop.load(Ordering::Relaxed) {
                topic.append_to_lane(3, None, &batch)?.1.wait()?;
                appended += 100;
            }
            Ok(appended)
        })
    });
    let (to_waiter, waiter) = durability_waiter(&cursor);
    let consumer = {
        let (cursor, stop, max) = (Arc::clone(&cursor), Arc::clone(&stop), args.latency_batch);
        std::thread::spawn(move || -> Result<Vec<f64>> {
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let polled = cursor.poll(max)?;
                let now_ns = origin.elapsed().as_nanos() as f64;
                if polled.is_empty() {
                    std::thread::yield_now();
                    continue;
                }
                for d in polled.iter().filter(|d| d.lane == 0) {
                    let key = d.record.key.as_deref().ok_or("p0 records carry their append time")?;
                    let sent_ns = u64::from_le_bytes(key.try_into()?) as f64;
                    samples.push((now_ns - sent_ns) / 1_000.0);
                }
                let ticket = cursor.ack_many_deferred(&polled)?;
                to_waiter.send(ticket).map_err(|_| "the waiting thread stopped")?;
            }
            Ok(samples)
        })
    };
    let interval = Duration::from_micros(args.interval_us);
    let end = Instant::now() + Duration::from_secs(args.latency_secs);
    let mut next = Instant::now();
    while Instant::now() < end {
        let sent_ns = u64::try_from(origin.elapsed().as_nanos())?;
        let record =
            Record { key: Some(Bytes::copy_from_slice(&sent_ns.to_le_bytes())), ..Record::from_value(value.clone()) };
        topic.append_to_lane(0, None, &[record])?.1.wait()?;
        next += interval;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    // Let the last p0 records arrive.
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    let mut samples = consumer.join().map_err(|_| "consumer thread panicked")??;
    waiter.join().map_err(|_| "waiting thread panicked")??;
    let flood_records = match flooder {
        Some(f) => f.join().map_err(|_| "flood thread panicked")??,
        None => 0,
    };
    drop(cursor);
    store.close()?;
    samples.sort_by(f64::total_cmp);
    Ok(LatencyRun {
        p50_us: percentile(&samples, 0.50),
        p99_us: percentile(&samples, 0.99),
        max_us: samples.last().copied().unwrap_or(f64::NAN),
        samples: samples.len(),
        flood_records,
    })
}

fn fill(dir: &Path, args: &PriorityArgs) -> Result<Store> {
    let store = open(dir)?;
    let topic = store.create_priority_topic("tp", 4, topic_config())?;
    let value = Bytes::from(vec![b'x'; args.value_bytes]);
    let batch: Vec<Record> = (0..1_000).map(|_| Record::from_value(value.clone())).collect();
    let mut handles = Vec::new();
    for start in (0..args.records).step_by(batch.len()) {
        let n = batch.len().min(args.records - start);
        handles.push(topic.append_to_lane(3, None, &batch[..n])?.1);
    }
    for handle in handles {
        handle.wait()?;
    }
    Ok(store)
}

/// A thread that waits for every ticket sent to it to be durable (the newest queued ticket
/// covers the older ones); it ends when the sender is dropped.
fn durability_waiter(
    cursor: &Arc<rill_engine::PriorityCursor>,
) -> (std::sync::mpsc::Sender<rill_engine::AckTicket>, std::thread::JoinHandle<Result<()>>) {
    let (to_waiter, tickets) = std::sync::mpsc::channel::<rill_engine::AckTicket>();
    let cursor = Arc::clone(cursor);
    let waiter = std::thread::spawn(move || -> Result<()> {
        while let Ok(first) = tickets.recv() {
            let newest = tickets.try_iter().fold(first, std::cmp::max);
            cursor.wait_durable(newest)?;
        }
        Ok(())
    });
    (to_waiter, waiter)
}

/// How a throughput run reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reader {
    Plain,
    Cursor,
    CursorDeferred,
}

/// Records per second of one throughput run.
fn throughput_run(dir: &Path, args: &PriorityArgs, reader: Reader) -> Result<f64> {
    let store = fill(dir, args)?;
    let partition = store.priority_topic("tp")?.lane(3)?.partition(0)?.clone();
    let end = partition.end_offset();
    let started = Instant::now();
    let mut seen = 0u64;
    if reader == Reader::Cursor {
        let cursor = store.priority_cursor("tp", "bench", cursor_config())?;
        while cursor.committed_offset(3, 0)? < end {
            let polled = cursor.poll(args.batch)?;
            seen += polled.len() as u64;
            cursor.ack_many(&polled)?;
        }
    } else if reader == Reader::CursorDeferred {
        let cursor = store.priority_cursor("tp", "bench", cursor_config())?;
        let (to_waiter, waiter) = durability_waiter(&cursor);
        while cursor.committed_offset(3, 0)? < end {
            let polled = cursor.poll(args.batch)?;
            seen += polled.len() as u64;
            let ticket = cursor.ack_many_deferred(&polled)?;
            to_waiter.send(ticket).map_err(|_| "the waiting thread stopped")?;
        }
        drop(to_waiter);
        waiter.join().map_err(|_| "waiting thread panicked")??;
        cursor.flush()?;
    } else {
        let mut next = 0;
        while next < end {
            let records = partition.read_records(next, 1 << 20)?;
            let last = records.last().ok_or("read_records below the end returned nothing")?;
            next = last.offset + 1;
            seen += records.len() as u64;
        }
    }
    let elapsed = started.elapsed();
    if seen != end {
        return Err(format!("read {seen} records of {end}").into());
    }
    drop(partition);
    store.close()?;
    Ok(end as f64 / elapsed.as_secs_f64())
}

fn fresh_dir(scratch: &Path, name: &str) -> Result<std::path::PathBuf> {
    let dir = scratch.join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(dir)
}

/// Runs both measurements and reports them with their verdicts.
pub fn run(scratch: &Path, args: &PriorityArgs, sink: &mut dyn Sink) -> Result<()> {
    if args.only.as_deref() != Some("throughput") {
        run_latency(scratch, args, sink)?;
    }
    if args.only.as_deref() != Some("latency") {
        run_throughput(scratch, args, sink)?;
    }
    Ok(())
}

fn run_latency(scratch: &Path, args: &PriorityArgs, sink: &mut dyn Sink) -> Result<()> {
    let (mut idle, mut flood) = (Vec::new(), Vec::new());
    for i in 0..args.runs {
        for &with_flood in if i % 2 == 0 { &[false, true] } else { &[true, false] } {
            let run = latency_run(&fresh_dir(scratch, "priority-latency")?, args, with_flood)?;
            let name = if with_flood { "flood" } else { "idle" };
            eprintln!(
                "latency {name} run {i}: p50 {} µs, p99 {} µs, max {} µs, {} samples, {} p3 records",
                fmt(run.p50_us),
                fmt(run.p99_us),
                fmt(run.max_us),
                run.samples,
                run.flood_records
            );
            if with_flood { &mut flood } else { &mut idle }.push(run);
        }
    }
    let p99 = |runs: &[LatencyRun]| runs.iter().map(|r| r.p99_us).collect::<Vec<_>>();
    let p50 = |runs: &[LatencyRun]| runs.iter().map(|r| r.p50_us).collect::<Vec<_>>();
    let (idle_p99, flood_p99) = (median(&p99(&idle)), median(&p99(&flood)));
    sink.row(BENCH, "p0_latency_p50_idle".into(), median(&p50(&idle)), "us", runs_note(&p50(&idle)));
    sink.row(BENCH, "p0_latency_p50_p3_flood".into(), median(&p50(&flood)), "us", runs_note(&p50(&flood)));
    sink.row(BENCH, "p0_latency_p99_idle".into(), idle_p99, "us", runs_note(&p99(&idle)));
    sink.row(BENCH, "p0_latency_p99_p3_flood".into(), flood_p99, "us", runs_note(&p99(&flood)));
    let flood_rate: Vec<f64> = flood.iter().map(|r| r.flood_records as f64 / args.latency_secs as f64).collect();
    sink.row(BENCH, "p3_flood_append_rate".into(), median(&flood_rate), "rec/s", runs_note(&flood_rate));
    let ratio = flood_p99 / idle_p99;
    let verdict = if ratio <= 2.0 { "MET (≤ 2x)" } else { "MISSED (> 2x)" };
    sink.row(BENCH, "p99_flood_over_idle".into(), ratio, "x", verdict.to_string());
    Ok(())
}

fn run_throughput(scratch: &Path, args: &PriorityArgs, sink: &mut dyn Sink) -> Result<()> {
    let (mut plain, mut cursor, mut pipelined) = (Vec::new(), Vec::new(), Vec::new());
    let orders = [
        [Reader::Plain, Reader::Cursor, Reader::CursorDeferred],
        [Reader::CursorDeferred, Reader::Cursor, Reader::Plain],
    ];
    for i in 0..args.runs {
        for &reader in &orders[i % 2] {
            let rate = throughput_run(&fresh_dir(scratch, "priority-throughput")?, args, reader)?;
            eprintln!("throughput {reader:?} run {i}: {} rec/s", fmt(rate));
            match reader {
                Reader::Plain => &mut plain,
                Reader::Cursor => &mut cursor,
                Reader::CursorDeferred => &mut pipelined,
            }
            .push(rate);
        }
    }
    let (plain_rate, cursor_rate, pipelined_rate) = (median(&plain), median(&cursor), median(&pipelined));
    sink.row(BENCH, "plain_read_records".into(), plain_rate, "rec/s", runs_note(&plain));
    let note = format!("one thread: poll({0}) then ack_many; {1}", args.batch, runs_note(&cursor));
    sink.row(BENCH, "cursor_poll_ack".into(), cursor_rate, "rec/s", note);
    let note = format!(
        "poll({0}) + ack_many_deferred, durability waited for on another thread; {1}",
        args.batch,
        runs_note(&pipelined)
    );
    sink.row(BENCH, "cursor_poll_ack_deferred".into(), pipelined_rate, "rec/s", note);
    let serial_share = 100.0 * cursor_rate / plain_rate;
    sink.row(BENCH, "cursor_waiting_over_plain".into(), serial_share, "%", "ack_many waited for per batch".to_string());
    let share = 100.0 * pipelined_rate / plain_rate;
    let verdict = if share >= 50.0 { "MET (≥ 50 %)" } else { "MISSED (< 50 %)" };
    sink.row(BENCH, "cursor_over_plain".into(), share, "%", verdict.to_string());
    Ok(())
}
