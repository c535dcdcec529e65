//! Sequences of store operations (create topic, append, read, roll, clock, retention, power
//! loss and reopen, clean close and reopen) against a `Store` on `FaultStorage`, checked
//! against a model of each topic's single partition after every operation.
//!
//! The model holds every batch from the log start: its offsets, encoded size, records, and
//! which segment it lies in (a roll is seen as the segment count growing by one during an
//! append; the segment files on disk must match the model's bases). It requires:
//! * offsets are assigned contiguously and an acknowledged batch gets the model's offsets;
//! * a read returns exactly the model's batches and records (the batch holding the offset,
//!   then following batches of the same segment within `max_bytes`), and out-of-range reads
//!   fail with `OffsetOutOfRange`;
//! * an append that the size or age rule must roll does roll, and no segment outgrows
//!   `segment_size_bytes` unless it holds one batch;
//! * retention removes exactly the sealed segments the rule names, from the front;
//! * after a power loss, under `fsync = always` every acknowledged batch survives; under
//!   `fsync = never` what survives is a batch-aligned prefix of what was written that keeps
//!   everything synced (sealed segments, clean closes), all of it when the unsynced bytes
//!   are kept, nothing more when they are dropped; nothing is invented or reordered, and a
//!   record read at offset N is the same record after any number of reopens;
//! * a clean close reopens clean, trusting every index, with nothing cut.
//!
//! Input layout: `rill_fuzz::StoreOpsInput` (at most 48 ops, 8 records of at most 1 KiB
//! value a batch). Files go to a temporary directory under `/dev/shm` when usable
//! (`rill-fuzz-store-*`, removed after each input).
#![no_main]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use rill_engine::format::batch::{BatchBuilder, BatchIter};
use rill_engine::io::fault::{CrashMode, FaultStorage};
use rill_engine::segment::parse_log_file_name;
use rill_engine::{
    Clock, Compression, Error, FsyncPolicy, Header, ManualClock, Partition, Record, Store, StoreConfig, StoredRecord,
    TopicConfig,
};
use rill_fuzz::{RecordSpec, StoreOp, StoreOpsInput, TopicSpec};

const CLOCK_START_MS: i64 = 1_700_000_000_000;
const TOPIC_SLOTS: u8 = 3;
const VALUE_LEN_MAX: usize = 1024;

fn scratch_base() -> &'static Path {
    static BASE: OnceLock<std::path::PathBuf> = OnceLock::new();
    BASE.get_or_init(rill_fuzz::scratch_base)
}

/// A small topic: 4 to 12 KiB segments, indices of 8 to 128 offset entries, retention of
/// up to ~1 MiB or ~17 minutes.
fn topic_config(spec: &TopicSpec) -> TopicConfig {
    TopicConfig {
        partitions: 1,
        fsync: if spec.fsync_never { FsyncPolicy::Never } else { FsyncPolicy::Always },
        segment_size_bytes: 4096 + u64::from(spec.segment_size % 8192),
        segment_ms: spec.segment_ms.map(|v| 1 + u64::from(v)),
        retention_bytes: spec.retention_bytes.map(|v| u64::from(v) * 16),
        retention_ms: spec.retention_ms.map(|v| 1 + u64::from(v) * 16),
        index_interval_bytes: 1 + u32::from(spec.index_interval) * 16,
        index_size_bytes: 64 * (1 + u64::from(spec.index_size % 16)),
        ..TopicConfig::default()
    }
}

#[derive(Clone, Debug)]
struct ModelBatch {
    base_offset: u64,
    size_bytes: u64,
    max_timestamp_ms: i64,
    records: Vec<StoredRecord>,
}

impl ModelBatch {
    fn next_offset(&self) -> u64 {
        self.base_offset + self.records.len() as u64
    }
}

/// The model of one topic's partition 0.
#[derive(Debug)]
struct TopicModel {
    name: String,
    config: TopicConfig,
    /// Every batch from the log start to the end, in offset order.
    batches: Vec<ModelBatch>,
    /// Base offsets of the segments; the first is the log start, the last the active one.
    segment_bases: Vec<u64>,
    end: u64,
    /// No crash may take away an offset below this.
    synced_end: u64,
    /// Clock at the active segment's first append since it was opened or rolled.
    active_first_append_ms: Option<i64>,
}

impl TopicModel {
    fn new(name: String, config: TopicConfig) -> Self {
        TopicModel {
            name,
            config,
            batches: Vec::new(),
            segment_bases: vec![0],
            end: 0,
            synced_end: 0,
            active_first_append_ms: None,
        }
    }

    fn log_start(&self) -> u64 {
        self.segment_bases[0]
    }

    fn size_bytes(&self) -> u64 {
        self.batches.iter().map(|b| b.size_bytes).sum()
    }

    /// The batches of segment `i`.
    fn segment(&self, i: usize) -> &[ModelBatch] {
        let lo = self.batches.partition_point(|b| b.base_offset < self.segment_bases[i]);
        let hi = match self.segment_bases.get(i + 1) {
            Some(&next) => self.batches.partition_point(|b| b.base_offset < next),
            None => self.batches.len(),
        };
        &self.batches[lo..hi]
    }

    fn segment_size(&self, i: usize) -> u64 {
        self.segment(i).iter().map(|b| b.size_bytes).sum()
    }

    /// The engine's retention rule: how many of the oldest sealed segments go.
    fn retention_count(&self, now_ms: i64) -> usize {
        let mut total = self.size_bytes();
        let mut removed = 0;
        for i in 0..self.segment_bases.len() - 1 {
            let size = self.segment_size(i);
            let max_ms = self.segment(i).iter().map(|b| b.max_timestamp_ms).max();
            let over_size = self.config.retention_bytes.is_some_and(|max| total > max);
            let too_old = match (self.config.retention_ms, max_ms) {
                (Some(limit_ms), Some(max_ms)) => now_ms.saturating_sub(max_ms) > limit_ms as i64,
                _ => false,
            };
            if !(over_size || too_old) {
                break;
            }
            total -= size;
            removed += 1;
        }
        removed
    }

    fn remove_segments(&mut self, count: usize) {
        self.segment_bases.drain(..count);
        let start = self.log_start();
        self.batches.retain(|b| b.base_offset >= start);
    }

    /// A crash kept the log up to `end`.
    fn recover(&mut self, end: u64) {
        assert!(end <= self.end, "{}: recovery invented records: end {end} > {}", self.name, self.end);
        assert!(end >= self.synced_end, "{}: a crash lost synced records: end {end} < {}", self.name, self.synced_end);
        let keep = self.batches.partition_point(|b| b.next_offset() <= end);
        self.batches.truncate(keep);
        let kept_end = self.batches.last().map_or(self.log_start(), ModelBatch::next_offset);
        assert_eq!(kept_end, end, "{}: recovery cuts at a batch boundary", self.name);
        self.end = end;
        self.synced_end = end;
        self.active_first_append_ms = None;
    }

    /// The batches `read(offset, max_bytes)` returns (offset inside the log).
    fn read(&self, offset: u64, max_bytes: u64) -> &[ModelBatch] {
        let seg = self.segment_bases.partition_point(|&b| b <= offset) - 1;
        let batches = self.segment(seg);
        let first = batches.partition_point(|b| b.next_offset() <= offset);
        let mut total = batches[first].size_bytes;
        let mut last = first + 1;
        while last < batches.len() && total + batches[last].size_bytes <= max_bytes {
            total += batches[last].size_bytes;
            last += 1;
        }
        &batches[first..last]
    }
}

struct Harness {
    /// Declared first: dropped (unclosed) before the directory is removed.
    store: Option<Store>,
    dir: tempfile::TempDir,
    fault: FaultStorage,
    clock: Arc<ManualClock>,
    topics: BTreeMap<u8, TopicModel>,
    /// Numbers every appended record, so that values are unique.
    records_appended: u64,
}

fn slot_name(slot: u8) -> (u8, String) {
    let slot = slot % TOPIC_SLOTS;
    (slot, format!("t{slot}"))
}

fn pattern(fill: u8, len: usize) -> impl Iterator<Item = u8> {
    (0..len).map(move |i| fill.wrapping_add((i % 3) as u8))
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("rill-fuzz-store-").tempdir_in(scratch_base()).expect("temp dir");
        let mut harness = Harness {
            store: None,
            dir,
            fault: FaultStorage::new(),
            clock: Arc::new(ManualClock::new(CLOCK_START_MS)),
            topics: BTreeMap::new(),
            records_appended: 0,
        };
        harness.store = Some(harness.open_store());
        harness
    }

    fn open_store(&self) -> Store {
        let config = StoreConfig {
            storage: Arc::new(self.fault.clone()),
            clock: Arc::clone(&self.clock) as Arc<dyn Clock>,
            retention_check_interval_ms: None,
            ..StoreConfig::default()
        };
        Store::open(self.dir.path(), config).expect("open the store")
    }

    fn store(&self) -> &Store {
        self.store.as_ref().expect("the store is open between operations")
    }

    fn partition(&self, model: &TopicModel) -> Arc<Partition> {
        self.store().partition(&model.name, 0).expect("a created topic has partition 0")
    }

    fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    fn advance(&self, ms: i64) {
        self.clock.advance_ms(ms);
    }

    /// The slot's model, or `None` after checking the store does not know the topic.
    fn existing(&self, slot: u8) -> Option<u8> {
        let (slot, name) = slot_name(slot);
        if self.topics.contains_key(&slot) {
            return Some(slot);
        }
        match self.store().partition(&name, 0) {
            Err(Error::TopicNotFound { topic }) => assert_eq!(topic, name),
            other => panic!("topic {name} was never created, yet partition 0 gave {other:?}"),
        }
        None
    }

    fn apply(&mut self, op: &StoreOp) {
        match op {
            StoreOp::CreateTopic { slot, spec } => self.create(*slot, spec),
            StoreOp::Append { slot, lz4, advance_ms, records } => {
                self.advance(i64::from(*advance_ms));
                if let Some(slot) = self.existing(*slot) {
                    self.append(slot, *lz4, records);
                }
            }
            StoreOp::Read { slot, selector, max_bytes } => {
                if let Some(slot) = self.existing(*slot) {
                    let model = &self.topics[&slot];
                    let offset = u64::from(*selector) % (model.end + 3);
                    check_read(&self.partition(model), model, offset, u64::from(*max_bytes));
                }
            }
            StoreOp::Roll { slot } => {
                if let Some(slot) = self.existing(*slot) {
                    if let Some(segment_ms) = self.topics[&slot].config.segment_ms {
                        self.advance(segment_ms as i64);
                    }
                }
            }
            StoreOp::AdvanceClock { ms } => self.advance(i64::from(*ms)),
            StoreOp::Retention { flags, advance_ms } => {
                let advance_ms = match self.age_boundary(*flags) {
                    Some(at_ms) if flags & 2 != 0 => (at_ms - self.now_ms()).max(0),
                    _ => i64::from(*advance_ms),
                };
                self.advance(advance_ms);
                self.retention(flags & 1 != 0);
            }
            StoreOp::Crash { mode, seed } => self.crash(*mode, *seed),
            StoreOp::CloseReopen => self.close_and_reopen(),
        }
        for model in self.topics.values() {
            check_bounds(&self.partition(model), model);
        }
    }

    /// 1 ms before, at or after (bits 4..=5 of `flags`, % 3) the instant the oldest segment
    /// of topic slot `bits 2..=3` reaches `retention_ms`: where an off-by-one would show.
    fn age_boundary(&self, flags: u8) -> Option<i64> {
        let model = self.topics.get(&(((flags >> 2) & 0b11) % TOPIC_SLOTS))?;
        let limit_ms = model.config.retention_ms?;
        let oldest_max_ms = model.segment(0).iter().map(|b| b.max_timestamp_ms).max()?;
        let delta_ms = i64::from((flags >> 4) % 3) - 1;
        Some(oldest_max_ms.saturating_add(limit_ms as i64).saturating_add(delta_ms))
    }

    fn create(&mut self, slot: u8, spec: &TopicSpec) {
        let (slot, name) = slot_name(slot);
        let config = topic_config(spec);
        if self.topics.contains_key(&slot) {
            match self.store().create_topic(&name, config) {
                Err(Error::TopicExists { topic }) => assert_eq!(topic, name),
                other => panic!("creating {name} twice gave {other:?}"),
            }
            return;
        }
        self.store().create_topic(&name, config.clone()).expect("create a valid topic");
        let model = TopicModel::new(name, config);
        check_full(&self.partition(&model), &model);
        self.topics.insert(slot, model);
    }

    fn append(&mut self, slot: u8, lz4: bool, specs: &[RecordSpec]) {
        let now_ms = self.now_ms();
        let records: Vec<Record> = specs
            .iter()
            .map(|spec| {
                let number = self.records_appended;
                self.records_appended += 1;
                Record {
                    timestamp_ms: spec.timestamp_delta_ms.map(|d| now_ms + i64::from(d)),
                    key: spec.key_len.map(|n| pattern(spec.fill, usize::from(n)).collect()),
                    value: spec.value_len.map(|n| {
                        let len = usize::from(n) % (VALUE_LEN_MAX + 1);
                        number.to_le_bytes().into_iter().chain(pattern(spec.fill, len)).collect()
                    }),
                    headers: if spec.header {
                        let value = (spec.fill % 2 == 0).then(|| Bytes::from(vec![spec.fill; 3]));
                        vec![Header { key: "h".into(), value }]
                    } else {
                        Vec::new()
                    },
                }
            })
            .collect();
        let compression = if lz4 { Compression::Lz4 } else { Compression::None };
        let mut builder = BatchBuilder::new(compression, now_ms);
        for record in &records {
            builder.push(record).expect("records within limits");
        }
        let size_bytes = builder.build().expect("batch within limits").len() as u64;

        let model = self.topics.get_mut(&slot).expect("slot exists");
        let p = self.store.as_ref().expect("open").partition(&model.name, 0).expect("partition 0");
        let base_offset = model.end;
        let stored: Vec<StoredRecord> = records
            .iter()
            .zip(base_offset..)
            .map(|(r, offset)| StoredRecord {
                offset,
                timestamp_ms: r.timestamp_ms.unwrap_or(now_ms),
                key: r.key.clone(),
                value: r.value.clone(),
                headers: r.headers.clone(),
            })
            .collect();
        let max_timestamp_ms = stored.iter().map(|r| r.timestamp_ms).max().expect("a batch has records");

        let segments_before = p.segment_count();
        let info = p.append_records(&records, compression).expect("append").wait().expect("ack");
        assert_eq!(info.base_offset, base_offset, "{}: base offset of the appended batch", model.name);
        assert_eq!(info.last_offset, base_offset + records.len() as u64 - 1, "{}: last offset", model.name);
        assert!(!info.duplicate);
        let segments_after = p.segment_count();
        assert!(
            segments_after == segments_before || segments_after == segments_before + 1,
            "{}: an append rolls at most once ({segments_before} -> {segments_after})",
            model.name
        );
        let rolled = segments_after > segments_before;
        let active = model.segment_bases.len() - 1;
        let active_size = model.segment_size(active);
        if active_size == 0 {
            assert!(!rolled, "{}: an empty active segment is never rolled", model.name);
        } else {
            let too_big = active_size + size_bytes > model.config.segment_size_bytes;
            let too_old = match (model.config.segment_ms, model.active_first_append_ms) {
                (Some(limit_ms), Some(first_ms)) => now_ms.saturating_sub(first_ms) >= limit_ms as i64,
                _ => false,
            };
            // Rolling because an index is full is not modelled: a roll may also happen
            // without either reason.
            assert!(
                rolled || !(too_big || too_old),
                "{}: no roll although the active segment (base {}, {active_size} bytes) is too big ({too_big}) \
                 or too old ({too_old}) for a {size_bytes}-byte batch",
                model.name,
                model.segment_bases[active]
            );
        }
        if rolled {
            // Sealing synced the old segment.
            model.segment_bases.push(base_offset);
            model.synced_end = base_offset;
            model.active_first_append_ms = None;
        }
        model.active_first_append_ms.get_or_insert(now_ms);
        model.batches.push(ModelBatch { base_offset, size_bytes, max_timestamp_ms, records: stored.clone() });
        model.end = base_offset + records.len() as u64;
        if model.config.fsync == FsyncPolicy::Always {
            model.synced_end = model.end;
        }
        let back = p.read_records(base_offset, 1).expect("read the appended batch");
        assert_eq!(back, stored, "{}: the appended batch reads back", model.name);
    }

    fn retention(&mut self, via_store: bool) {
        let now_ms = self.now_ms();
        let expected: BTreeMap<u8, usize> =
            self.topics.iter().map(|(&slot, model)| (slot, model.retention_count(now_ms))).collect();
        if via_store {
            let removed = self.store().enforce_retention().expect("store retention");
            assert_eq!(removed, expected.values().sum::<usize>(), "segments removed by store retention");
        } else {
            for (slot, model) in &self.topics {
                let removed = self.partition(model).enforce_retention().expect("partition retention");
                assert_eq!(removed, expected[slot], "{}: segments removed by retention", model.name);
            }
        }
        for (slot, count) in expected {
            let model = self.topics.get_mut(&slot).expect("slot exists");
            model.remove_segments(count);
        }
        for model in self.topics.values() {
            check_full(&self.partition(model), model);
        }
    }

    fn crash(&mut self, mode: u8, seed: u64) {
        let mode = match mode % 4 {
            0 => CrashMode::DropUnsynced,
            1 => CrashMode::KeepUnsynced,
            2 => CrashMode::TearUnsynced { seed },
            _ => CrashMode::ScrambleUnsynced { seed },
        };
        // Nothing written after this instant reaches the disk, not even by the drop.
        self.fault.power_cut();
        drop(self.store.take());
        self.fault.crash(mode).expect("simulate the power loss");
        self.store = Some(self.open_store());
        self.check_topic_names();
        for model in self.topics.values_mut() {
            let p = self.store.as_ref().expect("open").partition(&model.name, 0).expect("partition 0");
            let report = p.recovery_report().clone();
            let end = p.end_offset();
            assert!(!report.clean_shutdown, "{}: an unclosed store reopens unclean: {report:?}", model.name);
            let expected = match (model.config.fsync, mode) {
                (FsyncPolicy::Always, _) | (_, CrashMode::KeepUnsynced) => Some(model.end),
                (_, CrashMode::DropUnsynced) => Some(model.synced_end),
                _ => None,
            };
            if let Some(expected) = expected {
                assert_eq!(end, expected, "{}: end offset after {mode:?} under {:?}", model.name, model.config.fsync);
            }
            if end == model.end {
                assert_eq!(report.truncated_bytes, 0, "{}: nothing to cut when all survived: {report:?}", model.name);
            }
            model.recover(end);
            check_full(&p, model);
        }
    }

    fn close_and_reopen(&mut self) {
        self.store.take().expect("open").close().expect("clean close");
        self.store = Some(self.open_store());
        self.check_topic_names();
        for model in self.topics.values_mut() {
            let p = self.store.as_ref().expect("open").partition(&model.name, 0).expect("partition 0");
            let report = p.recovery_report();
            assert!(report.clean_shutdown, "{}: a closed store reopens clean: {report:?}", model.name);
            assert_eq!(report.truncated_bytes, 0, "{}: a clean log is not cut: {report:?}", model.name);
            assert_eq!(report.rebuilt_indices, 0, "{}: indices of a clean close are trusted: {report:?}", model.name);
            model.synced_end = model.end;
            model.active_first_append_ms = None;
            check_full(&p, model);
        }
    }

    fn check_topic_names(&self) {
        let names: Vec<String> = self.topics.values().map(|m| m.name.clone()).collect();
        assert_eq!(self.store().topics(), names, "created topics survive reopening");
    }
}

/// End offset, log start and size agree with the model.
fn check_bounds(p: &Partition, model: &TopicModel) {
    assert_eq!(p.end_offset(), model.end, "{}: end offset", model.name);
    assert_eq!(p.log_start_offset(), model.log_start(), "{}: log start offset", model.name);
    assert_eq!(p.size_bytes(), model.size_bytes(), "{}: size in bytes", model.name);
    assert_eq!(p.segment_count(), model.segment_bases.len(), "{}: segment count", model.name);
}

/// Bounds, the segment files on disk, the segment shapes, and every record of the log.
fn check_full(p: &Partition, model: &TopicModel) {
    check_bounds(p, model);
    let mut bases: Vec<u64> = std::fs::read_dir(p.dir())
        .expect("list the partition")
        .filter_map(|e| parse_log_file_name(e.expect("entry").file_name().to_str()?))
        .collect();
    bases.sort_unstable();
    assert_eq!(bases, model.segment_bases, "{}: segment files", model.name);
    for i in 0..model.segment_bases.len() {
        let batches = model.segment(i);
        let sealed = i + 1 < model.segment_bases.len();
        assert!(!sealed || !batches.is_empty(), "{}: sealed segment {i} is empty", model.name);
        assert!(
            batches.len() <= 1 || model.segment_size(i) <= model.config.segment_size_bytes,
            "{}: segment {i} has {} batches and {} bytes, over the segment size {}",
            model.name,
            batches.len(),
            model.segment_size(i),
            model.config.segment_size_bytes
        );
    }
    // Below the start, at the end and past it.
    if model.log_start() > 0 {
        check_read(p, model, model.log_start() - 1, 1 << 20);
    }
    check_read(p, model, model.end, 1 << 20);
    check_read(p, model, model.end + 1, 1 << 20);
    // Walk the log, alternately a batch at a time and in larger reads.
    let expected: Vec<&StoredRecord> = model.batches.iter().flat_map(|b| b.records.iter()).collect();
    let mut next = model.log_start();
    let mut at = 0usize;
    let mut round = 0u64;
    while next < model.end {
        let max_bytes = if round.is_multiple_of(2) { 1 } else { 16 * 1024 };
        let records = p.read_records(next, max_bytes).expect("read below the end");
        assert!(!records.is_empty(), "{}: a read below the end returns records (at {next})", model.name);
        for record in records {
            assert_eq!(&record, expected[at], "{}: record at offset {next}", model.name);
            next += 1;
            at += 1;
        }
        round += 1;
    }
    assert_eq!(at, expected.len());
}

/// `read` and `read_records` at `offset` give exactly what the model says.
fn check_read(p: &Partition, model: &TopicModel, offset: u64, max_bytes: u64) {
    let (log_start, end) = (model.log_start(), model.end);
    if offset == end {
        assert!(p.read(offset, max_bytes).expect("read at the end").is_empty(), "{}: read at the end", model.name);
        assert!(p.read_records(offset, max_bytes).expect("read at the end").is_empty());
        return;
    }
    if offset < log_start || offset > end {
        for result in [p.read(offset, max_bytes).map(|_| ()), p.read_records(offset, max_bytes).map(|_| ())] {
            match result {
                Err(Error::OffsetOutOfRange { requested, log_start: start, log_end }) => {
                    assert_eq!((requested, start, log_end), (offset, log_start, end), "out-of-range details");
                }
                other => panic!("{}: read at {offset} outside [{log_start}, {end}] gave {other:?}", model.name),
            }
        }
        return;
    }
    let want = model.read(offset, max_bytes);
    let bytes = p.read(offset, max_bytes).expect("read inside the log");
    let want_len: u64 = want.iter().map(|b| b.size_bytes).sum();
    assert_eq!(bytes.len() as u64, want_len, "{}: bytes read at {offset} with max_bytes {max_bytes}", model.name);
    let batches: Vec<_> = BatchIter::new(bytes).collect::<Result<_, _>>().expect("read returns valid batches");
    assert_eq!(batches.len(), want.len(), "{}: batches read at {offset} with max_bytes {max_bytes}", model.name);
    for (batch, want) in batches.iter().zip(want) {
        assert_eq!(batch.header().base_offset, want.base_offset, "{}: batch base offset", model.name);
        assert_eq!(batch.header().max_timestamp_ms, want.max_timestamp_ms, "{}: batch max timestamp", model.name);
        assert_eq!(batch.records().expect("records decode"), want.records, "{}: records of the batch", model.name);
    }
    let records = p.read_records(offset, max_bytes).expect("read_records inside the log");
    let want_records: Vec<StoredRecord> =
        want.iter().flat_map(|b| b.records.iter()).filter(|r| r.offset >= offset).cloned().collect();
    assert_eq!(records, want_records, "{}: read_records at {offset} with max_bytes {max_bytes}", model.name);
}

fuzz_target!(|data: &[u8]| {
    let input = StoreOpsInput::decode(data);
    let mut harness = Harness::new();
    for op in &input.ops {
        harness.apply(op);
    }
    for model in harness.topics.values() {
        check_full(&harness.partition(model), model);
    }
});
