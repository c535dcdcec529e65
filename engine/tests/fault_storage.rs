//! Failed fsyncs, failed writes and simulated power loss, injected through `FaultStorage`:
//! an append is acknowledged only once its bytes are durable, a failed write or fsync fails
//! the appends it concerns and poisons the partition until reopen, and after a crash the
//! reopened log holds every acknowledged record exactly once, in order, and serves nothing
//! torn.
//!
//! Every record carries a unique value `w<writer>-b<batch>-r<record>-<padding>`, so the
//! checks can tell lost, duplicated, reordered and damaged records apart. Seeded cases print
//! their seed on failure; `RILL_FAULT_SEED=<n>` replays one.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rill_engine::format::batch::{BatchBuilder, BatchIter};
use rill_engine::io::fault::{splitmix64, CrashMode, FaultStorage, WriteFault};
use rill_engine::{AppendInfo, Compression, Error, FsyncPolicy, Partition, Record, Store, StoreConfig, TopicConfig};

const TOPIC: &str = "t";

fn topic_config(fsync: FsyncPolicy, segment_size_bytes: u64) -> TopicConfig {
    TopicConfig {
        partitions: 1,
        fsync,
        segment_size_bytes,
        segment_ms: None,
        retention_ms: None,
        index_interval_bytes: 128,
        index_size_bytes: 1024,
        ..TopicConfig::default()
    }
}

fn fault_config(fs: &FaultStorage) -> StoreConfig {
    StoreConfig { storage: Arc::new(fs.clone()), retention_check_interval_ms: None, ..StoreConfig::default() }
}

fn plain_config() -> StoreConfig {
    StoreConfig { retention_check_interval_ms: None, ..StoreConfig::default() }
}

/// The value of a record: its identity, padded to 40..120 bytes so a few dozen batches
/// fill a small segment.
fn value(writer: u64, batch: u64, record: u64) -> Bytes {
    let pad = "x".repeat((40 + (writer * 7 + batch * 13 + record) % 80) as usize);
    Bytes::from(format!("w{writer}-b{batch:04}-r{record}-{pad}"))
}

/// Batch `batch` of `writer`: 1 to 3 records.
fn batch(writer: u64, batch: u64) -> Vec<Record> {
    (0..1 + batch % 3).map(|r| Record::from_value(value(writer, batch, r))).collect()
}

fn compression(batch: u64) -> Compression {
    if batch % 5 == 4 {
        Compression::Lz4
    } else {
        Compression::None
    }
}

/// Size of the encoded batch `batch(writer, b)`, uncompressed.
fn encoded_len(writer: u64, b: u64) -> usize {
    let mut builder = BatchBuilder::new(Compression::None, 0);
    for record in batch(writer, b) {
        builder.push(&record).expect("push");
    }
    builder.build().expect("build").len()
}

/// An acknowledged append: where it landed and what it held.
#[derive(Clone, Debug)]
struct Acked {
    base_offset: u64,
    last_offset: u64,
    writer: u64,
    batch: u64,
}

impl Acked {
    fn new(info: AppendInfo, writer: u64, batch: u64) -> Self {
        Acked { base_offset: info.base_offset, last_offset: info.last_offset, writer, batch }
    }

    fn records(&self) -> impl Iterator<Item = (u64, Bytes)> + '_ {
        (self.base_offset..=self.last_offset).zip(0..).map(|(offset, r)| (offset, value(self.writer, self.batch, r)))
    }
}

/// Every visible record as (offset, value), read batch by batch; each served batch must
/// pass its CRC and decode, and offsets must be dense from 0.
fn read_all(p: &Partition) -> Vec<(u64, Bytes)> {
    let end = p.end_offset();
    let mut next = 0;
    let mut out = Vec::new();
    while next < end {
        let bytes = p.read(next, 2048).expect("read below the end offset");
        assert!(!bytes.is_empty(), "read at {next} below end {end} returned nothing");
        for batch in BatchIter::new(bytes) {
            let batch = batch.expect("every served batch passes its header and CRC checks");
            for record in batch.records().expect("every served batch decodes") {
                assert_eq!(record.offset, next, "offsets are dense");
                out.push((record.offset, record.value.expect("test records have values")));
                next += 1;
            }
        }
    }
    out
}

/// Parses a value back into (writer, batch, record); `None` unless it is exactly
/// `value(writer, batch, record)`.
fn parse_value(v: &[u8]) -> Option<(u64, u64, u64)> {
    let text = std::str::from_utf8(v).ok()?;
    let mut parts = text.split('-');
    let writer = parts.next()?.strip_prefix('w')?.parse().ok()?;
    let batch = parts.next()?.strip_prefix('b')?.parse().ok()?;
    let record = parts.next()?.strip_prefix('r')?.parse().ok()?;
    (value(writer, batch, record) == v).then_some((writer, batch, record))
}

/// The log holds every acknowledged record at its acknowledged offset; every record in it is
/// one that was appended, whole batches only, exactly once, and each writer's records appear
/// in the order they were appended.
fn check_log(log: &[(u64, Bytes)], acked: &[Acked]) {
    let mut seen: HashMap<&Bytes, u64> = HashMap::new();
    let mut last_of_writer: HashMap<u64, (u64, u64)> = HashMap::new();
    for (offset, v) in log {
        if let Some(first) = seen.insert(v, *offset) {
            panic!("value {v:?} appears twice: at {first} and at {offset}");
        }
        let (writer, batch, record) = parse_value(v).unwrap_or_else(|| panic!("unknown value {v:?} at {offset}"));
        if let Some(previous) = last_of_writer.insert(writer, (batch, record)) {
            assert!(previous < (batch, record), "writer {writer}: {previous:?} before {:?}", (batch, record));
        }
    }
    for append in acked {
        for (offset, v) in append.records() {
            let found = log.get(offset as usize).map(|(_, v)| v);
            assert_eq!(found, Some(&v), "acknowledged record at offset {offset} ({append:?})");
        }
    }
    // Whole batches only: a batch whose first record survived kept all its records.
    for (offset, v) in log {
        let (writer, b, record) = parse_value(v).expect("checked above");
        if record == 0 {
            for (r, expected) in (1..1 + b % 3).map(|r| (r, value(writer, b, r))) {
                let found = log.get((offset + r) as usize).map(|(_, v)| v);
                assert_eq!(found, Some(&expected), "batch w{writer}-b{b} is whole");
            }
        }
    }
}

/// After recovery the log takes a new append at its end, and a second reopen cuts nothing.
fn check_appends_resume(root: &Path, log: &[(u64, Bytes)]) {
    let store = Store::open(root, plain_config()).expect("reopen");
    let p = store.partition(TOPIC, 0).expect("partition");
    let end = log.len() as u64;
    let info = p.append_records(&batch(99, 0), Compression::None).expect("append").wait().expect("ack");
    assert_eq!(info.base_offset, end, "appends resume at the recovered end");
    drop(p);
    drop(store);
    let store = Store::open(root, plain_config()).expect("reopen again");
    let p = store.partition(TOPIC, 0).expect("partition");
    assert_eq!(p.recovery_report().truncated_bytes, 0, "nothing left to cut");
    let again = read_all(&p);
    assert_eq!(&again[..log.len()], log, "a second recovery changes nothing");
    assert_eq!(again.len() as u64, end + 1);
}

/// Appends `count` batches of writer 0 one after the other, each acknowledged.
fn append_acked(p: &Partition, count: u64) -> Vec<Acked> {
    (0..count)
        .map(|b| {
            let info = p.append_records(&batch(0, b), compression(b)).expect("append").wait().expect("ack");
            Acked::new(info, 0, b)
        })
        .collect()
}

/// Whether `err` is the file system's "no space left" (ENOSPC), kept as the I/O error's kind.
fn is_no_space(err: &Error) -> bool {
    matches!(err, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull)
}

fn assert_poisoned(p: &Partition) {
    match p.append_records(&batch(0, 9_999), Compression::None) {
        Err(Error::Poisoned { .. }) => {}
        other => panic!("append to a poisoned partition: expected Error::Poisoned, got {other:?}"),
    }
}

/// The fsync that would acknowledge an append fails: `wait()` returns the error (which names
/// the injected fault), the batch never becomes visible, every later append gets
/// `Error::Poisoned`, a close does not mark the partition clean, and after reopen every
/// acknowledged record is intact. The failed batch's bytes were written but not made durable:
/// after a simulated power loss that drops unsynced bytes it is gone; without one it may
/// survive, but only whole.
#[test]
fn failed_fsync_fails_its_append_and_poisons_until_reopen() {
    for crash in [false, true] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let fs = FaultStorage::new();
        let store = Store::open(tmp.path(), fault_config(&fs)).expect("open");
        store.create_topic(TOPIC, topic_config(FsyncPolicy::Always, 1 << 20)).expect("create topic");
        let p = store.partition(TOPIC, 0).expect("partition");
        let acked = append_acked(&p, 20);
        let acked_log: Vec<_> = acked.iter().flat_map(Acked::records).collect();
        let end = p.end_offset();
        assert_eq!(end, acked_log.len() as u64);

        let syncs_before = fs.counts().1;
        fs.fail_sync(1);
        let handle = p.append_records(&batch(0, 20), Compression::None).expect("the write itself succeeds");
        let err = handle.wait().expect_err("the append whose fsync failed is not acknowledged");
        assert!(err.to_string().contains("injected fault"), "the error keeps its cause: {err}");
        assert_eq!(fs.counts().1, syncs_before + 1, "one fsync was attempted");
        assert_eq!(p.end_offset(), end, "the unsynced batch is not visible");
        assert!(p.read(end, 1 << 20).expect("read at the end").is_empty());
        assert_poisoned(&p);
        assert_poisoned(&p);
        assert_eq!(read_all(&p), acked_log, "a poisoned partition still serves what was acknowledged");
        drop(p);
        // Whether close reports the earlier failure is not the point; it must not mark the
        // partition as cleanly shut down.
        drop(store.close());
        if crash {
            fs.crash(CrashMode::DropUnsynced).expect("crash");
        }

        let store = Store::open(tmp.path(), plain_config()).expect("reopen");
        let p = store.partition(TOPIC, 0).expect("partition");
        assert!(!p.recovery_report().clean_shutdown, "a poisoned partition is recovered on reopen");
        let log = read_all(&p);
        assert_eq!(&log[..acked_log.len()], &acked_log[..], "acknowledged records survive (crash: {crash})");
        let records = batch(0, 20).len() as u64;
        let failed = Acked { base_offset: end, last_offset: end + records - 1, writer: 0, batch: 20 };
        if crash || log.len() == acked_log.len() {
            assert_eq!(log.len(), acked_log.len(), "the unsynced batch is lost in a crash");
        } else {
            assert_eq!(log[acked_log.len()..], failed.records().collect::<Vec<_>>(), "it survives whole or not at all");
        }
        check_log(&log, &acked);
        drop(p);
        drop(store);
        check_appends_resume(tmp.path(), &log);
    }
}

/// The write of an append fails: with ENOSPC (nothing written) or torn after 0, 1, ... bytes,
/// up to the whole batch. The append returns the error, later appends get `Error::Poisoned`,
/// reads still serve the acknowledged records, and the reopened log is exactly the
/// acknowledged prefix (plus the failed batch only if all its bytes landed), with exactly
/// the torn bytes cut.
#[test]
fn failed_write_poisons_and_reopen_recovers_a_clean_prefix() {
    const ACKED: u64 = 12;
    let len = encoded_len(0, ACKED);
    let mut faults = vec![WriteFault::NoSpace];
    for written_bytes in [0, 1, 8, 12, 16, 17, 21, 60, 61, 62, len / 2, len - 1, len, len + 10] {
        faults.push(WriteFault::Torn { written_bytes });
    }
    for fault in faults {
        let tmp = tempfile::tempdir().expect("tempdir");
        let fs = FaultStorage::new();
        let store = Store::open(tmp.path(), fault_config(&fs)).expect("open");
        store.create_topic(TOPIC, topic_config(FsyncPolicy::Always, 1 << 20)).expect("create topic");
        let p = store.partition(TOPIC, 0).expect("partition");
        let acked = append_acked(&p, ACKED);
        let acked_log: Vec<_> = acked.iter().flat_map(Acked::records).collect();
        let end = p.end_offset();

        fs.fail_write(1, fault);
        let err = p
            .append_records(&batch(0, ACKED), Compression::None)
            .expect_err("the append whose write failed returns the error");
        assert!(err.to_string().contains("injected fault"), "{fault:?}: the error keeps its cause: {err}");
        assert_eq!(p.end_offset(), end, "{fault:?}: nothing new is visible");
        assert_poisoned(&p);
        assert_eq!(read_all(&p), acked_log, "{fault:?}: reads still serve the acknowledged records");
        drop(p);
        drop(store);

        let landed = match fault {
            WriteFault::NoSpace => 0,
            WriteFault::Torn { written_bytes } | WriteFault::ShortNoSpace { written_bytes } => written_bytes.min(len),
        };
        let whole = landed == len;
        let store = Store::open(tmp.path(), plain_config()).expect("reopen");
        let p = store.partition(TOPIC, 0).expect("partition");
        let report = p.recovery_report();
        let cut = if whole { 0 } else { landed as u64 };
        assert_eq!(report.truncated_bytes, cut, "{fault:?}: torn bytes cut ({report:?})");
        let log = read_all(&p);
        let mut expected = acked_log.clone();
        if whole {
            let records = batch(0, ACKED).len() as u64;
            let failed = Acked { base_offset: end, last_offset: end + records - 1, writer: 0, batch: ACKED };
            expected.extend(failed.records());
        }
        assert_eq!(log, expected, "{fault:?}: the recovered log");
        check_log(&log, &acked);
        drop(p);
        drop(store);
        check_appends_resume(tmp.path(), &log);
    }
}

/// The seeds a seeded test runs: `RILL_FAULT_SEED=<n>` runs that one seed;
/// otherwise `RILL_FAULT_SEEDS=<count>` seeds from `RILL_FAULT_SEED_START` (default 0), or the
/// test's own `default_count` (small, so `cargo test` stays fast; the fault campaign raises it).
fn seeds(default_count: u64) -> std::ops::Range<u64> {
    let var = |name: &str| {
        std::env::var(name)
            .ok()
            .map(|v| v.trim().parse::<u64>().unwrap_or_else(|_| panic!("{name} is a number, got {v:?}")))
    };
    if let Some(seed) = var("RILL_FAULT_SEED") {
        return seed..seed + 1;
    }
    let start = var("RILL_FAULT_SEED_START").unwrap_or(0);
    start..start + var("RILL_FAULT_SEEDS").unwrap_or(default_count)
}

/// Runs `case(seed)` for every seed of [`seeds`]; a failure names the seed and the command
/// that replays it alone. Prints how many seeds ran and how long they took.
fn for_each_seed(test: &str, default_count: u64, case: impl Fn(u64)) {
    let started = std::time::Instant::now();
    let seeds = seeds(default_count);
    let count = seeds.end - seeds.start;
    for seed in seeds {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| case(seed))) {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(non-string panic)");
            panic!(
                "seed {seed} failed: {message}\nreplay: RILL_FAULT_SEED={seed} cargo test -p rill-engine --release \
                 --test fault_storage -- --exact {test} --nocapture"
            );
        }
    }
    eprintln!("{test}: {count} seeds passed in {:.1} s", started.elapsed().as_secs_f64());
}

const WRITERS: u64 = 3;
const BATCHES_PER_WRITER: u64 = 10;

/// `WRITERS` threads append `BATCHES_PER_WRITER` batches each, waiting for every ack, and
/// stop at their first error. Returns what was acknowledged and the errors seen.
fn append_concurrently(p: &Arc<Partition>) -> (Vec<Acked>, Vec<String>) {
    let threads: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let p = Arc::clone(p);
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                for b in 0..BATCHES_PER_WRITER {
                    match p.append_records(&batch(writer, b), compression(b)).and_then(|h| h.wait()) {
                        Ok(info) => acked.push(Acked::new(info, writer, b)),
                        Err(e) => return (acked, Some(e.to_string())),
                    }
                }
                (acked, None)
            })
        })
        .collect();
    let mut acked = Vec::new();
    let mut errors = Vec::new();
    for thread in threads {
        let (a, e) = thread.join().expect("writer thread");
        acked.extend(a);
        errors.extend(e);
    }
    (acked, errors)
}

/// A crash model drawn from `pick`: drop every unsynced byte, tear each file's unsynced
/// suffix, or decide every unsynced write on its own (kept, lost as zeros, torn).
fn crash_mode(pick: u64, seed: u64) -> CrashMode {
    match pick % 3 {
        0 => CrashMode::DropUnsynced,
        1 => CrashMode::TearUnsynced { seed },
        _ => CrashMode::ScrambleUnsynced { seed },
    }
}

/// Power loss at a random point under `fsync = always`, 200 seeds: writers append
/// concurrently (with small segments, so rolls happen) until a seeded fault (an fsync or a
/// write failing, torn or for lack of space; or none) stops the log at a random point; then
/// the store is dropped and a crash drops, tears or scrambles (seeded) every byte not yet
/// synced. `RILL_FAULT_SEEDS=10000` is the campaign's count.
/// After reopen every acknowledged record is present exactly once, in order, at its
/// acknowledged offset, every batch served passes its CRC, and (checked after every cut tail
/// and for every fourth seed) appends resume and a second reopen changes nothing.
#[test]
fn crash_at_a_random_point_keeps_every_acknowledged_record() {
    for_each_seed("crash_at_a_random_point_keeps_every_acknowledged_record", 200, |seed| {
        let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x00c0_ffee;
        let mut next = move || splitmix64(&mut rng);
        let tmp = tempfile::tempdir().expect("tempdir");
        let fs = FaultStorage::new();
        let store = Store::open(tmp.path(), fault_config(&fs)).expect("open");
        store.create_topic(TOPIC, topic_config(FsyncPolicy::Always, 4096)).expect("create topic");
        let p = store.partition(TOPIC, 0).expect("partition");
        let kind = next() % 5;
        match kind {
            // Each writer waits for each ack, so there are at least BATCHES_PER_WRITER
            // fsyncs and writers * batches writes: every armed fault fires.
            0 => fs.fail_sync(1 + next() % (BATCHES_PER_WRITER - 1)),
            1 => {
                let written_bytes = (next() % 400) as usize;
                fs.fail_write(1 + next() % (WRITERS * BATCHES_PER_WRITER), WriteFault::Torn { written_bytes });
            }
            2 => fs.fail_write(1 + next() % (WRITERS * BATCHES_PER_WRITER), WriteFault::NoSpace),
            3 => {
                let written_bytes = (next() % 400) as usize;
                fs.fail_write(1 + next() % (WRITERS * BATCHES_PER_WRITER), WriteFault::ShortNoSpace { written_bytes });
            }
            _ => {}
        }
        let armed = kind != 4;
        let mode = crash_mode(next(), next());
        let (acked, errors) = append_concurrently(&p);
        if armed {
            assert!(!errors.is_empty(), "the armed fault fired");
        } else {
            assert!(errors.is_empty(), "no fault, no error: {errors:?}");
            assert_eq!(acked.len() as u64, WRITERS * BATCHES_PER_WRITER);
        }
        drop(p);
        drop(store);
        fs.crash(mode).expect("crash");

        let store = Store::open(tmp.path(), plain_config()).expect("reopen after crash");
        let p = store.partition(TOPIC, 0).expect("partition");
        let log = read_all(&p);
        check_log(&log, &acked);
        if !armed {
            let records: u64 = acked.iter().map(|a| a.last_offset - a.base_offset + 1).sum();
            assert_eq!(log.len() as u64, records, "everything was acknowledged, so everything survives");
        }
        let cut = p.recovery_report().truncated_bytes > 0;
        drop(p);
        drop(store);
        // Costs fsyncs: after every cut tail, and every fourth seed otherwise.
        if cut || seed % 4 == 0 {
            check_appends_resume(tmp.path(), &log);
        }
    });
}

/// Power loss under `fsync = never`, 50 seeds: appends are acknowledged unsynced, only
/// rolls sync (the sealed segment). After a crash that drops (or tears or scrambles, seeded) the unsynced
/// bytes, whatever survives is a prefix of what was written, with whole batches only: all
/// of the sealed segments, and none of the active one when unsynced bytes are dropped.
#[test]
fn crash_under_fsync_never_leaves_a_valid_prefix() {
    for_each_seed("crash_under_fsync_never_leaves_a_valid_prefix", 50, |seed| {
        let mut rng = seed ^ 0x0dd_ba11;
        let tmp = tempfile::tempdir().expect("tempdir");
        let fs = FaultStorage::new();
        let store = Store::open(tmp.path(), fault_config(&fs)).expect("open");
        store.create_topic(TOPIC, topic_config(FsyncPolicy::Never, 4096)).expect("create topic");
        let p = store.partition(TOPIC, 0).expect("partition");
        let (acked, errors) = append_concurrently(&p);
        assert!(errors.is_empty(), "no fault injected: {errors:?}");
        let written = read_all(&p);
        assert_eq!(written.len() as u64, p.end_offset());
        check_log(&written, &acked);
        let active_base = std::fs::read_dir(p.dir())
            .expect("list partition")
            .filter_map(|e| {
                let name = e.expect("entry").file_name().into_string().ok()?;
                name.strip_suffix(".log")?.parse::<u64>().ok()
            })
            .max()
            .expect("a segment exists");
        assert!(active_base > 0, "the writes rolled at least once");
        drop(p);
        drop(store);
        let mode = crash_mode(splitmix64(&mut rng), splitmix64(&mut rng));
        let drop_all = mode == CrashMode::DropUnsynced;
        fs.crash(mode).expect("crash");

        let store = Store::open(tmp.path(), plain_config()).expect("reopen after crash");
        let p = store.partition(TOPIC, 0).expect("partition");
        let log = read_all(&p);
        assert_eq!(&written[..log.len()], &log[..], "{mode:?}: what survives is a prefix of what was written");
        assert!(log.len() as u64 >= active_base, "{mode:?}: sealed segments were synced at roll");
        if drop_all {
            assert_eq!(log.len() as u64, active_base, "{mode:?}: the never-synced active segment is lost");
        }
        let survivors: Vec<_> = acked.iter().filter(|a| a.last_offset < log.len() as u64).cloned().collect();
        check_log(&log, &survivors);
        drop(p);
        drop(store);
        check_appends_resume(tmp.path(), &log);
    });
}

/// ENOSPC from the file layer, with nothing written or after a short write of 1 byte up to
/// all but one byte of the batch, under each fsync policy: the append fails with
/// `Error::Io` whose kind is `StorageFull` (the message says "injected fault" and names the
/// file), nothing new becomes visible, the partition refuses later appends with
/// `Error::Poisoned` whose cause names the full disk, reads still serve every acknowledged
/// record, and after reopen the short write's bytes are cut, the acknowledged records are
/// all there and appends resume at the acknowledged end.
#[test]
fn enospc_fails_the_append_with_a_typed_error_and_reopen_resumes() {
    const ACKED: u64 = 12;
    let len = encoded_len(0, ACKED);
    let mut faults = vec![WriteFault::NoSpace];
    for written_bytes in [1, 17, 61, len / 2, len - 1] {
        faults.push(WriteFault::ShortNoSpace { written_bytes });
    }
    for fsync in [FsyncPolicy::Always, FsyncPolicy::Interval { interval_ms: 5 }, FsyncPolicy::Never] {
        for &fault in &faults {
            let tmp = tempfile::tempdir().expect("tempdir");
            let fs = FaultStorage::new();
            let store = Store::open(tmp.path(), fault_config(&fs)).expect("open");
            store.create_topic(TOPIC, topic_config(fsync, 1 << 20)).expect("create topic");
            let p = store.partition(TOPIC, 0).expect("partition");
            let acked = append_acked(&p, ACKED);
            let acked_log: Vec<_> = acked.iter().flat_map(Acked::records).collect();
            let end = p.end_offset();

            fs.fail_write(1, fault);
            let err = p.append_records(&batch(0, ACKED), Compression::None).expect_err("a full disk fails the append");
            assert!(is_no_space(&err), "{fsync:?} {fault:?}: a typed ENOSPC error, got {err:?}");
            let text = err.to_string();
            assert!(text.contains("injected fault") && text.contains(".log"), "{fault:?}: the message says so: {text}");
            assert_eq!(p.end_offset(), end, "{fault:?}: nothing new is visible");
            match p.append_records(&batch(0, 9_999), Compression::None) {
                Err(Error::Poisoned { cause, .. }) => {
                    assert!(cause.contains("write") && cause.contains("injected fault"), "the cause is kept: {cause}")
                }
                other => panic!("{fault:?}: an append after ENOSPC: expected Error::Poisoned, got {other:?}"),
            }
            assert_eq!(read_all(&p), acked_log, "{fault:?}: reads still serve the acknowledged records");
            drop(p);
            drop(store);

            let store = Store::open(tmp.path(), plain_config()).expect("reopen after ENOSPC");
            let p = store.partition(TOPIC, 0).expect("partition");
            let landed = match fault {
                WriteFault::ShortNoSpace { written_bytes } => written_bytes as u64,
                _ => 0,
            };
            assert_eq!(p.recovery_report().truncated_bytes, landed, "{fault:?}: the short write is cut");
            let log = read_all(&p);
            assert_eq!(log, acked_log, "{fsync:?} {fault:?}: exactly the acknowledged records");
            drop(p);
            drop(store);
            check_appends_resume(tmp.path(), &log);
        }
    }
}

/// An acknowledged append under `fsync = interval`, and when its call returned.
#[derive(Clone, Debug)]
struct TimedAck {
    acked: Acked,
    returned: Instant,
}

/// Power loss under `fsync = interval(10 ms)`, 30 seeds (`RILL_FAULT_SEEDS` for more):
/// writers append without pause (small segments, so rolls happen) and the power is cut
/// (`FaultStorage::power_cut`) at a seeded instant 5..85 ms in; every later write and sync
/// fails, then the crash drops, tears or scrambles the unsynced bytes.
///
/// The guarantee checked, exactly: an append is lost only if no sync of its segment file
/// *began* after its call returned and completed before the cut. Every append whose segment
/// had such a sync is present at its acknowledged offset; what survives is whole batches,
/// each once, in each writer's order; appends resume after reopen.
///
/// And the bound on that window: the flusher syncs the active segment `T` after its previous
/// sync returned, so the last completed flusher sync began at most `T` + one fsync +
/// scheduling delay before the cut. The test asserts the window is under `T` + 1 s (a
/// flusher that stopped syncing fails it) and prints the largest window seen.
#[test]
fn crash_under_fsync_interval_loses_only_the_last_interval() {
    const INTERVAL_MS: u64 = 10;
    let worst_window = parking_lot::Mutex::new(Duration::ZERO);
    for_each_seed("crash_under_fsync_interval_loses_only_the_last_interval", 30, |seed| {
        let mut rng = seed ^ 0x0017_e4a1;
        let tmp = tempfile::tempdir().expect("tempdir");
        let fs = FaultStorage::new();
        let store = Store::open(tmp.path(), fault_config(&fs)).expect("open");
        store
            .create_topic(TOPIC, topic_config(FsyncPolicy::Interval { interval_ms: INTERVAL_MS }, 4096))
            .expect("topic");
        let p = store.partition(TOPIC, 0).expect("partition");
        let dir = p.dir().to_path_buf();
        fs.record_syncs();
        let opened = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let p = Arc::clone(&p);
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut acked = Vec::new();
                    let mut b = 0;
                    while !stop.load(Ordering::Relaxed) && b < 9_999 {
                        match p.append_records(&batch(writer, b), compression(b)).and_then(|h| h.wait()) {
                            Ok(info) => {
                                acked.push(TimedAck { acked: Acked::new(info, writer, b), returned: Instant::now() })
                            }
                            Err(_) => break,
                        }
                        b += 1;
                    }
                    acked
                })
            })
            .collect();
        // The crash instant itself is what is drawn here, so this sleep is the scenario.
        std::thread::sleep(Duration::from_millis(5 + splitmix64(&mut rng) % 80));
        let cut = fs.power_cut();
        stop.store(true, Ordering::Relaxed);
        let acked: Vec<TimedAck> = writers.into_iter().flat_map(|w| w.join().expect("writer")).collect();
        drop(p);
        drop(store);
        let segment_bases = log_bases(&dir);
        let mode = crash_mode(splitmix64(&mut rng), splitmix64(&mut rng));
        fs.crash(mode).expect("crash");

        let syncs: Vec<_> =
            fs.sync_log().into_iter().filter(|e| e.path.extension().is_some_and(|x| x == "log")).collect();
        let file_of = |offset: u64| {
            let base = segment_bases.iter().rev().find(|&&b| b <= offset).expect("a segment holds every offset");
            dir.join(format!("{base:020}.log"))
        };
        let must_survive: Vec<Acked> = acked
            .iter()
            .filter(|a| {
                let file = file_of(a.acked.base_offset);
                syncs.iter().any(|e| e.path == file && e.started > a.returned)
            })
            .map(|a| a.acked.clone())
            .collect();
        let last_flush = syncs
            .iter()
            .filter(|e| e.thread.as_deref().is_some_and(|t| t.starts_with("rill-flush-")))
            .map(|e| e.started)
            .max()
            .unwrap_or(opened);
        let window = cut.saturating_duration_since(last_flush);
        {
            let mut worst = worst_window.lock();
            *worst = (*worst).max(window);
        }
        assert!(
            window < Duration::from_millis(INTERVAL_MS + 1000),
            "the last flusher sync began {window:?} before the cut (interval {INTERVAL_MS} ms)"
        );

        let store = Store::open(tmp.path(), plain_config()).expect("reopen after crash");
        let p = store.partition(TOPIC, 0).expect("partition");
        let log = read_all(&p);
        check_log(&log, &must_survive);
        let survivors: Vec<_> =
            acked.iter().map(|a| a.acked.clone()).filter(|a| a.last_offset < log.len() as u64).collect();
        check_log(&log, &survivors);
        drop(p);
        drop(store);
        if seed % 4 == 0 {
            check_appends_resume(tmp.path(), &log);
        }
    });
    eprintln!(
        "fsync=interval({INTERVAL_MS} ms): largest window between the last completed flusher sync and the cut: {:?}",
        worst_window.lock()
    );
}

/// Base offsets of the `.log` files in `dir`, ascending.
fn log_bases(dir: &Path) -> Vec<u64> {
    let mut bases: Vec<u64> = std::fs::read_dir(dir)
        .expect("list partition")
        .filter_map(|e| e.expect("entry").file_name().into_string().ok()?.strip_suffix(".log")?.parse().ok())
        .collect();
    bases.sort_unstable();
    bases
}
