//! `rill-bench idempotence`: what producer sequencing costs an embedded append.
//!
//! Variant A appends with `Partition::append_records` (no producer fields). Variant B
//! appends the same records with `Partition::append_producer_records`: one producer id
//! from `Store::init_producer`, the sequence advancing by the record count of each batch,
//! so every batch passes the sequence check and is appended (none is a duplicate). Both run
//! in the same process, on topics of the same configuration (one partition, fsync=never,
//! no roll within a run), one fresh topic per run, deleted afterwards.
//!
//! Runs alternate in pairs A B, B A, A B, ... (so the sequence reads A B B A A B B A),
//! which cancels a linear drift of the machine's speed. The overhead is reported from the
//! medians and, more robustly, as the median of the per-pair overheads.

use std::path::Path;
use std::time::{Duration, Instant};

use clap::Args;
use rill_engine::limits::SEGMENT_SIZE_BYTES_MAX;
use rill_engine::producer::state::increment_sequence;
use rill_engine::{Compression, FsyncPolicy, ProducerFields, Record, Store, StoreConfig, TopicConfig};

use crate::summary::{fmt, median, runs_note, Result, Sink};
use crate::{encode, load_average, now_ms, records, Sched};

const MIB: u64 = 1024 * 1024;
const BENCH: &str = "idempotence";

/// Options of `rill-bench idempotence`.
#[derive(Args, Clone, Debug)]
pub struct IdempotenceArgs {
    /// Log bytes appended per run, in MiB (rounded up to whole batches).
    #[arg(long, default_value_t = 256)]
    pub run_mib: u64,
    /// Batch shapes, `VALUE_BYTESxRECORDS_PER_BATCH`, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1024x100,100x1000")]
    pub shapes: Vec<String>,
    /// Pairs of runs per shape (each pair runs A and B once; the order alternates).
    #[arg(long, default_value_t = 4)]
    pub pairs: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// `append_records`.
    Plain,
    /// `append_producer_records` with advancing sequences.
    Idempotent,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Plain => "non-idempotent",
            Variant::Idempotent => "idempotent",
        }
    }
}

struct RunResult {
    elapsed: Duration,
    /// The appending thread's CPU time and run-queue wait over the run.
    sched: Option<Sched>,
}

fn parse_shape(shape: &str) -> Result<(usize, usize)> {
    let (value, count) =
        shape.split_once('x').ok_or_else(|| format!("shape '{shape}' is not VALUE_BYTESxRECORDS_PER_BATCH"))?;
    let value: usize = value.trim().parse().map_err(|e| format!("shape '{shape}': value size: {e}"))?;
    let count: usize = count.trim().parse().map_err(|e| format!("shape '{shape}': record count: {e}"))?;
    if count == 0 {
        return Err(format!("shape '{shape}': a batch needs at least one record").into());
    }
    Ok((value, count))
}

fn topic_config() -> TopicConfig {
    TopicConfig {
        partitions: 1,
        fsync: FsyncPolicy::Never,
        segment_size_bytes: SEGMENT_SIZE_BYTES_MAX,
        segment_ms: None,
        retention_ms: None,
        retention_bytes: None,
        ..TopicConfig::default()
    }
}

/// Runs the benchmark in a store under `dir` and reports to `sink`.
pub fn run(dir: &Path, args: &IdempotenceArgs, sink: &mut dyn Sink) -> Result<()> {
    let store_dir = dir.join("idempotence-store");
    let store = Store::open(&store_dir, StoreConfig { retention_check_interval_ms: None, ..StoreConfig::default() })?;
    sink.row(BENCH, "load_average_1min".into(), load_average().unwrap_or(f64::NAN), "", "at start; 2 vCPUs".into());
    let mut topic_seq = 0u32;
    for shape in &args.shapes {
        let (value_size, count) = parse_shape(shape)?;
        let recs = records(count, value_size);
        let batch_bytes = encode(&recs, now_ms())?.len() as u64;
        let batches = (args.run_mib * MIB).div_ceil(batch_bytes);
        let label = format!("{value_size}Bx{count}");
        eprintln!(
            "rill-bench: idempotence {label}: {batches} batches of {batch_bytes} B per run, {} pairs",
            args.pairs
        );
        // Unmeasured warm-up of both variants (page cache, allocator, branch predictors).
        for variant in [Variant::Plain, Variant::Idempotent] {
            topic_seq += 1;
            one_run(&store, &format!("idem-warm-{topic_seq}"), variant, &recs, batches.div_ceil(4))?;
        }
        let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        let mut cpu_rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        let mut waits: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for pair in 0..args.pairs.max(1) {
            let order = if pair % 2 == 0 {
                [Variant::Plain, Variant::Idempotent]
            } else {
                [Variant::Idempotent, Variant::Plain]
            };
            for variant in order {
                topic_seq += 1;
                let result = one_run(&store, &format!("idem-{topic_seq}"), variant, &recs, batches)?;
                let messages = (batches * count as u64) as f64;
                let rate = messages / result.elapsed.as_secs_f64();
                let slot = usize::from(variant == Variant::Idempotent);
                rates[slot].push(rate);
                if let Some(sched) = result.sched {
                    cpu_rates[slot].push(messages / (sched.on_cpu_ns as f64 / 1e9));
                    waits[slot].push(sched.wait_ns as f64 / 1e9);
                }
                eprintln!(
                    "rill-bench: idempotence {label} pair {} {}: {rate:.0} msg/s in {:.3} s",
                    pair + 1,
                    variant.name(),
                    result.elapsed.as_secs_f64()
                );
            }
        }
        report_shape(sink, &label, batch_bytes, count, &rates, &cpu_rates, &waits);
    }
    sink.row(BENCH, "load_average_1min_end".into(), load_average().unwrap_or(f64::NAN), "", "at end".into());
    store.close()?;
    // Best effort: the topics were deleted already; only the store's own files remain.
    drop(std::fs::remove_dir_all(&store_dir));
    Ok(())
}

fn report_shape(
    sink: &mut dyn Sink,
    label: &str,
    batch_bytes: u64,
    count: usize,
    rates: &[Vec<f64>; 2],
    cpu_rates: &[Vec<f64>; 2],
    waits: &[Vec<f64>; 2],
) {
    let per_message_bytes = batch_bytes as f64 / count as f64;
    for (slot, variant) in [Variant::Plain, Variant::Idempotent].into_iter().enumerate() {
        let rate = median(&rates[slot]);
        sink.row(
            BENCH,
            format!("{label} {} msg/s", variant.name()),
            rate,
            "msg/s",
            format!("median; {}", runs_note(&rates[slot])),
        );
        sink.row(
            BENCH,
            format!("{label} {} MB/s", variant.name()),
            rate * per_message_bytes / 1e6,
            "MB/s",
            format!("log bytes ({batch_bytes} B per batch)"),
        );
        if !cpu_rates[slot].is_empty() {
            sink.row(
                BENCH,
                format!("{label} {} msg/CPU-s", variant.name()),
                median(&cpu_rates[slot]),
                "msg/CPU-s",
                format!("messages / appender thread CPU time; {}", runs_note(&cpu_rates[slot])),
            );
            sink.row(
                BENCH,
                format!("{label} {} CPU wait", variant.name()),
                median(&waits[slot]),
                "s",
                format!("appender runnable but waiting for a CPU, per run; {}", runs_note(&waits[slot])),
            );
        }
    }
    let overhead = |a: f64, b: f64| (1.0 - b / a) * 100.0;
    let (a, b) = (median(&rates[0]), median(&rates[1]));
    sink.row(
        BENCH,
        format!("{label} overhead (medians)"),
        overhead(a, b),
        "%",
        "1 - idempotent / non-idempotent median rate; requirement <= 5".into(),
    );
    // Pair i holds A and B run back to back; the pair's overhead cancels slower drift.
    let pairs: Vec<f64> = rates[0].iter().zip(&rates[1]).map(|(a, b)| overhead(*a, *b)).collect();
    sink.row(
        BENCH,
        format!("{label} overhead (median of pairs)"),
        median(&pairs),
        "%",
        format!("per pair [{}]", pairs.iter().map(|p| fmt(*p)).collect::<Vec<_>>().join(", ")),
    );
    if !cpu_rates[0].is_empty() && !cpu_rates[1].is_empty() {
        let (a, b) = (median(&cpu_rates[0]), median(&cpu_rates[1]));
        sink.row(
            BENCH,
            format!("{label} overhead (CPU time)"),
            overhead(a, b),
            "%",
            "1 - idempotent / non-idempotent median msg per CPU-second".into(),
        );
    }
}

/// Creates a topic, appends `batches` batches of `recs` with `variant`, deletes the topic.
fn one_run(store: &Store, topic: &str, variant: Variant, recs: &[Record], batches: u64) -> Result<RunResult> {
    store.create_topic(topic, topic_config())?;
    let partition = store.partition(topic, 0)?;
    // Both variants ask for an identity, so the set-up is the same; only B uses it.
    let identity = store.init_producer(None)?;
    let count = u32::try_from(recs.len()).map_err(|_| "too many records in a batch")?;
    let mut sequence = 0i32;
    let sched_before = Sched::thread();
    let start = Instant::now();
    for _ in 0..batches {
        let handle = match variant {
            Variant::Plain => partition.append_records(recs, Compression::None)?,
            Variant::Idempotent => {
                let fields = ProducerFields {
                    producer_id: identity.producer_id,
                    producer_epoch: identity.producer_epoch,
                    base_sequence: sequence,
                };
                sequence = increment_sequence(sequence, count);
                partition.append_producer_records(fields, recs, Compression::None)?
            }
        };
        if handle.wait()?.duplicate {
            return Err(format!("{topic}: a batch was answered as a duplicate").into());
        }
    }
    let elapsed = start.elapsed();
    let sched = sched_before.zip(Sched::thread()).map(|(b, a)| a.since(b));
    let end = partition.end_offset();
    drop(partition);
    if end != batches * u64::from(count) {
        return Err(format!("{topic}: end offset {end}, expected {}", batches * u64::from(count)).into());
    }
    store.delete_topic(topic)?;
    Ok(RunResult { elapsed, sched })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse() {
        assert_eq!(parse_shape("1024x100").expect("valid"), (1024, 100));
        assert!(parse_shape("1024").is_err());
        assert!(parse_shape("1x0").is_err());
    }
}
