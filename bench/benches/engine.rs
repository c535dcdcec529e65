//! Criterion micro-benchmarks of the engine's hot paths.
//!
//! `cargo bench -p rill-bench` runs them all in a couple of minutes:
//!
//! - `append/records_100x1KiB_fsync_never`: `Partition::append_records` of 100 x 1 KiB
//!   records (encode + write to the page cache), throughput in record-value bytes.
//! - `append/batch_preencoded_100x1KiB_fsync_never`: `Partition::append_batch` of the same
//!   batch pre-encoded (the server path: header + CRC + record validation, then write).
//! - `validate/decode_crc_and_records_100x1KiB`: the validation `append_batch` does, alone.
//! - `encode/build_100x1KiB`, `decode/records_100x1KiB`: the batch codec without I/O.
//! - `read/sealed_scan_*`: a sequential scan of 64 MiB of sealed (mmap'd) segments with
//!   `Partition::read(offset, 1 MiB)`, walking batch headers or verifying every CRC.
//!
//! Data lives under cargo's `CARGO_TARGET_TMPDIR` and is removed afterwards.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rill_bench::{encode, now_ms, records, walk_headers, ScratchDir};
use rill_engine::format::batch::{Batch, BatchIter};
use rill_engine::{Compression, FsyncPolicy, Partition, Record, Store, StoreConfig, TopicConfig};

const RECORDS_PER_BATCH: usize = 100;
const VALUE_SIZE: usize = 1024;
const PAYLOAD_BYTES: u64 = (RECORDS_PER_BATCH * VALUE_SIZE) as u64;
/// A fresh store is opened once this many bytes were appended to the current one, so the
/// append benches never roll a segment (a roll fdatasyncs the sealed segment) and the page
/// cache does not fill up with the bench's own dirty pages.
const STORE_BYTES_MAX: u64 = 256 * 1024 * 1024;
const READ_SEGMENT_BYTES: u64 = 8 * 1024 * 1024;
const READ_SEALED_SEGMENTS: usize = 8;

fn tmp_parent() -> &'static Path {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
}

fn topic_config(segment_size_bytes: u64) -> TopicConfig {
    TopicConfig {
        partitions: 1,
        fsync: FsyncPolicy::Never,
        segment_size_bytes,
        segment_ms: None,
        retention_ms: None,
        ..TopicConfig::default()
    }
}

/// A store with one fsync=never partition, in its own scratch directory.
struct Scratch {
    // Field order is drop order: the store closes before its directory is removed.
    partition: Arc<Partition>,
    _store: Store,
    _dir: ScratchDir,
    written: u64,
}

impl Scratch {
    fn new(segment_size_bytes: u64) -> Scratch {
        let dir = ScratchDir::new_in(tmp_parent()).expect("create scratch directory");
        let store =
            Store::open(dir.path(), StoreConfig { retention_check_interval_ms: None, ..StoreConfig::default() })
                .expect("open store");
        store.create_topic("bench", topic_config(segment_size_bytes)).expect("create topic");
        let partition = store.partition("bench", 0).expect("partition 0");
        Scratch { partition, _store: store, _dir: dir, written: 0 }
    }
}

/// Runs `iters` appends on stores that are replaced (untimed) before they grow past
/// [`STORE_BYTES_MAX`]; `append` returns the time spent on the append it made.
fn timed_appends(
    scratch: &mut Option<Scratch>,
    iters: u64,
    batch_bytes: u64,
    mut append: impl FnMut(&Partition) -> Duration,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        if scratch.as_ref().is_none_or(|s| s.written + batch_bytes > STORE_BYTES_MAX) {
            *scratch = None;
            *scratch = Some(Scratch::new(1024 * 1024 * 1024));
        }
        let s = scratch.as_mut().expect("created above");
        total += append(&s.partition);
        s.written += batch_bytes;
    }
    total
}

fn bench_append(c: &mut Criterion) {
    let recs = records(RECORDS_PER_BATCH, VALUE_SIZE);
    let encoded = encode(&recs, now_ms()).expect("encode batch");
    let batch_bytes = encoded.len() as u64;
    let mut group = c.benchmark_group("append");
    group.throughput(Throughput::Bytes(PAYLOAD_BYTES));
    group.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));

    let mut scratch = None;
    group.bench_function("records_100x1KiB_fsync_never", |b| {
        b.iter_custom(|iters| {
            timed_appends(&mut scratch, iters, batch_bytes, |partition| {
                let start = Instant::now();
                let info = partition.append_records(&recs, Compression::None).and_then(|h| h.wait());
                let elapsed = start.elapsed();
                black_box(info.expect("append_records"));
                elapsed
            })
        });
    });

    let mut scratch = None;
    group.bench_function("batch_preencoded_100x1KiB_fsync_never", |b| {
        b.iter_custom(|iters| {
            timed_appends(&mut scratch, iters, batch_bytes, |partition| {
                let batch = BytesMut::from(&encoded[..]);
                let start = Instant::now();
                let info = partition.append_batch(batch).and_then(|h| h.wait());
                let elapsed = start.elapsed();
                black_box(info.expect("append_batch"));
                elapsed
            })
        });
    });
    group.finish();
}

fn bench_codec(c: &mut Criterion) {
    let recs: Vec<Record> = records(RECORDS_PER_BATCH, VALUE_SIZE);
    let encoded: Bytes = encode(&recs, now_ms()).expect("encode batch").freeze();

    let mut group = c.benchmark_group("validate");
    group.throughput(Throughput::Bytes(PAYLOAD_BYTES));
    group.sample_size(30).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(2));
    group.bench_function("decode_crc_and_records_100x1KiB", |b| {
        b.iter(|| {
            let batch = Batch::decode(black_box(encoded.clone())).expect("decode");
            batch.validate_records().expect("validate records");
            black_box(batch);
        });
    });
    group.finish();

    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Bytes(PAYLOAD_BYTES));
    group.sample_size(30).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(2));
    group.bench_function("build_100x1KiB", |b| {
        b.iter(|| black_box(encode(black_box(&recs), 1_700_000_000_000).expect("encode")));
    });
    group.finish();

    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Bytes(PAYLOAD_BYTES));
    group.sample_size(30).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(2));
    group.bench_function("records_100x1KiB", |b| {
        b.iter(|| {
            let batch = Batch::decode(black_box(encoded.clone())).expect("decode");
            black_box(batch.records().expect("records"));
        });
    });
    group.finish();
}

/// Reads `[0, end)` with 1 MiB reads; `verify` checks every batch's CRC. Returns the bytes.
fn scan(partition: &Partition, end: u64, verify: bool) -> u64 {
    let mut offset = 0;
    let mut total = 0;
    while offset < end {
        let buf = partition.read(offset, 1024 * 1024).expect("read");
        if verify {
            for batch in BatchIter::new(buf) {
                let batch = batch.expect("valid batch");
                let header = batch.header();
                if header.base_offset >= end {
                    return total;
                }
                total += header.size_bytes();
                offset = header.next_offset();
            }
        } else {
            let (_batches, bytes, next) = walk_headers(&buf).expect("valid headers");
            total += bytes;
            offset = next.expect("a whole batch");
        }
    }
    total
}

fn bench_read(c: &mut Criterion) {
    // Fill READ_SEALED_SEGMENTS segments; the batch that opens the next one stays active and
    // is not scanned, so every scanned byte comes from a sealed (mmap'd) segment.
    let scratch = Scratch::new(READ_SEGMENT_BYTES);
    let recs = records(RECORDS_PER_BATCH, VALUE_SIZE);
    while scratch.partition.segment_count() <= READ_SEALED_SEGMENTS {
        scratch.partition.append_records(&recs, Compression::None).and_then(|h| h.wait()).expect("append");
    }
    let sealed_end = scratch.partition.end_offset() - RECORDS_PER_BATCH as u64;
    let bytes = scan(&scratch.partition, sealed_end, false);
    assert_eq!(bytes, scan(&scratch.partition, sealed_end, true), "both scans cover the same batches");

    let mut group = c.benchmark_group("read");
    group.throughput(Throughput::Bytes(bytes));
    group.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    group.bench_function("sealed_scan_64MiB_headers", |b| {
        b.iter(|| black_box(scan(&scratch.partition, sealed_end, false)));
    });
    group.bench_function("sealed_scan_64MiB_crc", |b| {
        b.iter(|| black_box(scan(&scratch.partition, sealed_end, true)));
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default().without_plots()
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_append, bench_codec, bench_read
}
criterion_main!(benches);
