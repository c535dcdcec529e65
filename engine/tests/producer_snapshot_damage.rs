//! Producer snapshots are caches of the log: whatever happens to them, a reopened
//! partition answers producers exactly as before.
//!
//! A baseline directory gets several producers' batches across several segment rolls (so
//! there are snapshots at the last roll and at the clean close). Each damage case works on a
//! copy of it: the newest snapshot filled with garbage, truncated, with one byte flipped,
//! emptied, replaced by an older snapshot's (valid) bytes, every snapshot damaged at once,
//! and a snapshot past the log end because recovery cut a corrupt last batch off the log.
//! Each is reopened both clean and unclean, and the probe checks the same answers as for
//! the undamaged copy: each producer's last five batches are duplicates with their original
//! offsets, the sixth-last is a `DuplicateSequence`, a gap names the same expected
//! sequence, and the next batch is appended at the log end. The damaged file must be gone
//! after the reopen, and the state must still be right after a further restart.
//!
//! Two more scenarios: retention deleting old segments keeps the state of producers whose
//! batches are in the remaining segments (also across restarts and with every snapshot
//! gone), and never lets a producer whose batches were deleted append a retry again; and
//! producer-id expiry under a manual clock forgets an idle producer (a non-zero sequence
//! then fails with `UnknownProducerId`, sequence 0 starts afresh), also across a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rill_engine::producer::snapshot;
use rill_engine::producer::state::BATCHES_PER_PRODUCER_MAX;
use rill_engine::{
    AppendInfo, Compression, Error, FsyncPolicy, ManualClock, Partition, ProducerFields, ProducerIdentity, Record,
    Store, StoreConfig, TopicConfig,
};

const TOPIC: &str = "snap";
const CLOCK_START_MS: i64 = 1_700_000_000_000;

/// One batch a producer appended.
#[derive(Clone, Copy, Debug)]
struct Sent {
    producer: usize,
    first_sequence: i32,
    count: i32,
    base_offset: u64,
    last_offset: u64,
}

/// The producers and every batch they appended, in log order.
#[derive(Clone, Debug, Default)]
struct History {
    ids: Vec<ProducerIdentity>,
    batches: Vec<Sent>,
}

impl History {
    fn of(&self, producer: usize) -> Vec<Sent> {
        self.batches.iter().filter(|b| b.producer == producer).copied().collect()
    }

    fn next_sequence(&self, producer: usize) -> i32 {
        self.of(producer).last().map_or(0, |b| b.first_sequence + b.count)
    }

    fn fields(&self, producer: usize, base_sequence: i32) -> ProducerFields {
        let id = self.ids[producer];
        ProducerFields { producer_id: id.producer_id, producer_epoch: id.producer_epoch, base_sequence }
    }
}

fn records(producer: usize, first_sequence: i32, count: i32) -> Vec<Record> {
    (first_sequence..first_sequence + count)
        .map(|s| Record::from_value(format!("p{producer}-s{s}-{}", "x".repeat(90))))
        .collect()
}

fn send(
    p: &Partition,
    history: &History,
    producer: usize,
    first_sequence: i32,
    count: i32,
) -> rill_engine::Result<AppendInfo> {
    let fields = history.fields(producer, first_sequence);
    p.append_producer_records(fields, &records(producer, first_sequence, count), Compression::None)?.wait()
}

/// Appends the producer's next batch and checks it lands at the log end.
fn append(p: &Partition, history: &mut History, producer: usize, count: i32) {
    let first_sequence = history.next_sequence(producer);
    let end = p.end_offset();
    let info = send(p, history, producer, first_sequence, count).expect("the next batch is appended");
    assert_eq!(
        info,
        AppendInfo { base_offset: end, last_offset: end + count as u64 - 1, duplicate: false },
        "producer {producer} batch at sequence {first_sequence}"
    );
    history.batches.push(Sent {
        producer,
        first_sequence,
        count,
        base_offset: info.base_offset,
        last_offset: info.last_offset,
    });
}

/// The partition answers `producer` as its history says: its last five batches are
/// duplicates with their original offsets, the sixth-last is too old, and a gap names the
/// next expected sequence. Nothing is appended.
fn probe(p: &Partition, history: &History, producer: usize, what: &str) {
    let mine = history.of(producer);
    let end = p.end_offset();
    for sent in mine.iter().rev().take(BATCHES_PER_PRODUCER_MAX) {
        let info = send(p, history, producer, sent.first_sequence, sent.count)
            .unwrap_or_else(|e| panic!("{what}: retry of {sent:?} fails: {e}"));
        assert_eq!(
            info,
            AppendInfo { base_offset: sent.base_offset, last_offset: sent.last_offset, duplicate: true },
            "{what}: retry of {sent:?}"
        );
    }
    if let Some(old) = mine.iter().rev().nth(BATCHES_PER_PRODUCER_MAX) {
        let result = send(p, history, producer, old.first_sequence, old.count);
        assert!(
            matches!(result, Err(Error::DuplicateSequence { received, .. }) if received == old.first_sequence),
            "{what}: retry of {old:?} outside the window: {result:?}"
        );
    }
    let next = history.next_sequence(producer);
    let result = send(p, history, producer, next + 1, 1);
    if mine.is_empty() {
        assert!(matches!(result, Err(Error::UnknownProducerId { .. })), "{what}: gap of a new producer: {result:?}");
    } else {
        assert!(
            matches!(result, Err(Error::OutOfOrderSequence { expected, .. }) if expected == next),
            "{what}: producer {producer} expects sequence {next}: {result:?}"
        );
    }
    assert_eq!(p.end_offset(), end, "{what}: probing appends nothing");
}

fn store_config() -> StoreConfig {
    StoreConfig {
        clock: Arc::new(ManualClock::new(CLOCK_START_MS)),
        retention_check_interval_ms: None,
        ..StoreConfig::default()
    }
}

fn topic_config() -> TopicConfig {
    TopicConfig {
        fsync: FsyncPolicy::Always,
        segment_size_bytes: 4096,
        segment_ms: None,
        retention_ms: None,
        index_interval_bytes: 256,
        index_size_bytes: 4096,
        ..TopicConfig::default()
    }
}

const PRODUCERS: usize = 3;

/// Builds the baseline: three producers (one transactional) interleaving batches of
/// different sizes over several rolls, then a clean close. Returns the history and the
/// partition directory relative to the store directory.
fn build_baseline(dir: &Path) -> (History, PathBuf) {
    let store = Store::open(dir, store_config()).expect("open");
    store.create_topic(TOPIC, topic_config()).expect("create");
    let mut history = History {
        ids: vec![
            store.init_producer(None).expect("init"),
            store.init_producer(Some("tx-1")).expect("init"),
            store.init_producer(None).expect("init"),
        ],
        ..History::default()
    };
    let p = store.partition(TOPIC, 0).expect("partition");
    for round in 0..30 {
        append(&p, &mut history, 0, 2);
        if round % 4 != 3 {
            append(&p, &mut history, 1, 3);
        }
        if round % 2 == 0 {
            append(&p, &mut history, 2, 1);
        }
    }
    assert!(p.segment_count() >= 4, "several rolls: {} segments", p.segment_count());
    let partition_dir = p.dir().strip_prefix(dir).expect("the partition is inside the store").to_path_buf();
    drop(p);
    store.close().expect("clean close");
    (history, partition_dir)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create the copy's directory");
    for entry in std::fs::read_dir(from).expect("list a directory") {
        let entry = entry.expect("a directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy a file");
        }
    }
}

/// Snapshot files of a partition, oldest first.
fn snapshots(partition_dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(partition_dir)
        .expect("list the partition")
        .map(|entry| entry.expect("a directory entry").path())
        .filter_map(|path| {
            let offset = path.file_name().and_then(|n| n.to_str()).and_then(snapshot::parse_file_name)?;
            Some((offset, path))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, path)| path).collect()
}

#[derive(Clone, Copy, Debug)]
enum Damage {
    None,
    Garbage,
    Truncated,
    FlippedByte,
    Empty,
    /// The newest snapshot's name holds the older snapshot's valid bytes (wrong offset).
    StaleContent,
    /// Every snapshot is garbage: the state is rebuilt from the whole log.
    AllGarbage,
}

fn damage_file(path: &Path, damage: Damage, seed: u64) {
    let bytes = std::fs::read(path).expect("read the snapshot");
    let damaged = match damage {
        Damage::None | Damage::StaleContent => return,
        Damage::Garbage | Damage::AllGarbage => {
            let mut state = seed;
            (0..bytes.len()).map(|_| rill_engine::io::fault::splitmix64(&mut state) as u8).collect()
        }
        Damage::Truncated => bytes[..bytes.len() - 7].to_vec(),
        Damage::FlippedByte => {
            let mut flipped = bytes.clone();
            flipped[bytes.len() / 2] ^= 0x20;
            flipped
        }
        Damage::Empty => Vec::new(),
    };
    std::fs::write(path, damaged).expect("write the damaged snapshot");
}

/// Reopens the damaged copy (clean or unclean), checks the damaged file is gone and every
/// producer is answered as `history` says, appends a batch per producer, and checks again
/// after a further clean restart (which writes a fresh snapshot).
fn reopen_and_check(dir: &Path, partition_dir: &Path, mut history: History, damaged: &[PathBuf], what: &str) {
    let store = Store::open(dir, store_config()).unwrap_or_else(|e| panic!("{what}: reopen fails: {e}"));
    for path in damaged {
        assert!(!path.exists(), "{what}: damaged {} was removed", path.display());
    }
    let p = store.partition(TOPIC, 0).expect("partition");
    for producer in 0..PRODUCERS {
        probe(&p, &history, producer, what);
    }
    for producer in 0..PRODUCERS {
        append(&p, &mut history, producer, 1);
    }
    drop(p);
    store.close().expect("clean close");
    let newest = snapshots(partition_dir).pop().expect("the close wrote a snapshot");
    let (_, offset) = snapshot::decode(&std::fs::read(&newest).expect("read")).expect("the new snapshot is valid");
    assert_eq!(offset, history.batches.last().map_or(0, |b| b.last_offset + 1), "{what}: snapshot at the log end");
    let store = Store::open(dir, store_config()).expect("reopen after the repair");
    let p = store.partition(TOPIC, 0).expect("partition");
    for producer in 0..PRODUCERS {
        probe(&p, &history, producer, &format!("{what}, after a further restart"));
    }
}

/// Damaged, truncated, emptied, stale or all-garbage snapshots are removed on reopen, clean
/// or unclean, and the producer state rebuilt from older snapshots and the log answers
/// exactly as the undamaged one.
#[test]
fn damaged_snapshots_are_rebuilt_from_the_log() {
    let base = tempfile::tempdir().expect("tempdir");
    let (history, partition_rel) = build_baseline(base.path());
    let base_snapshots = snapshots(&base.path().join(&partition_rel));
    assert_eq!(base_snapshots.len(), 2, "one snapshot at the last roll, one at the clean close");
    let damages = [
        Damage::None,
        Damage::Garbage,
        Damage::Truncated,
        Damage::FlippedByte,
        Damage::Empty,
        Damage::StaleContent,
        Damage::AllGarbage,
    ];
    for (i, damage) in damages.into_iter().enumerate() {
        for clean in [true, false] {
            let copy = tempfile::tempdir().expect("tempdir");
            copy_dir(base.path(), copy.path());
            let partition_dir = copy.path().join(&partition_rel);
            let files = snapshots(&partition_dir);
            let newest = files.last().expect("snapshots").clone();
            let damaged = match damage {
                Damage::None => Vec::new(),
                Damage::AllGarbage => files.clone(),
                Damage::StaleContent => {
                    std::fs::copy(&files[0], &newest).expect("copy the older snapshot over the newest");
                    vec![newest]
                }
                _ => vec![newest],
            };
            for path in &damaged {
                damage_file(path, damage, i as u64 + 1);
            }
            if !clean {
                std::fs::remove_file(partition_dir.join(".clean_shutdown")).expect("remove the clean marker");
            }
            let what = format!("{damage:?}, {}", if clean { "clean" } else { "unclean" });
            reopen_and_check(copy.path(), &partition_dir, history.clone(), &damaged, &what);
        }
    }
}

/// Recovery cuts a corrupt last batch off the log, leaving the newest snapshot past the log
/// end: it is deleted, and the state (from the older snapshot plus the log) no longer has
/// the lost batch, so its producer expects that batch's sequence again.
#[test]
fn snapshot_past_the_truncated_log_end_is_discarded() {
    let base = tempfile::tempdir().expect("tempdir");
    let (mut history, partition_rel) = build_baseline(base.path());
    let partition_dir = base.path().join(&partition_rel);
    let newest = snapshots(&partition_dir).pop().expect("snapshots");
    let lost = history.batches.pop().expect("batches");
    let end = lost.last_offset + 1;
    assert_eq!(snapshot::parse_file_name(&newest.file_name().expect("name").to_string_lossy()), Some(end));
    // An unclean stop whose last batch is corrupt: flip the last byte of the active log.
    std::fs::remove_file(partition_dir.join(".clean_shutdown")).expect("remove the clean marker");
    let active = std::fs::read_dir(&partition_dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .max()
        .expect("a log file");
    let mut bytes = std::fs::read(&active).expect("read the active log");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&active, bytes).expect("write the active log");
    {
        let store = Store::open(base.path(), store_config()).expect("reopen");
        let p = store.partition(TOPIC, 0).expect("partition");
        assert!(p.recovery_report().truncated_bytes > 0, "recovery cut the corrupt batch");
        assert_eq!(p.end_offset(), lost.base_offset, "the log ends before the lost batch");
        assert!(!newest.exists(), "the snapshot past the log end was deleted");
        for producer in 0..PRODUCERS {
            probe(&p, &history, producer, "after the tail cut");
        }
        // The lost batch's producer sends it again and it is appended where it was.
        let info = send(&p, &history, lost.producer, lost.first_sequence, lost.count).expect("re-send");
        assert_eq!(info, AppendInfo { base_offset: lost.base_offset, last_offset: lost.last_offset, duplicate: false });
        history.batches.push(lost);
        drop(p);
        store.close().expect("clean close");
    }
    let store = Store::open(base.path(), store_config()).expect("reopen");
    let p = store.partition(TOPIC, 0).expect("partition");
    for producer in 0..PRODUCERS {
        probe(&p, &history, producer, "after the re-sent batch and a restart");
    }
}

/// Retention deletes the oldest segments: a producer whose batches are all in the remaining
/// segments is answered exactly as before, also after clean and unclean restarts and with
/// every snapshot deleted (rebuilt from the remaining log, whose first batch of it does not
/// start at sequence 0). A producer whose batches were all deleted never gets a retry
/// appended again: it is a duplicate (state kept) or an unknown producer (state rebuilt).
#[test]
fn retention_keeps_state_of_remaining_producers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let retained = TopicConfig { retention_bytes: Some(3 * 4096), ..topic_config() };
    let store = Store::open(dir.path(), store_config()).expect("open");
    store.create_topic(TOPIC, retained).expect("create");
    let mut history = History {
        ids: vec![store.init_producer(None).expect("init"), store.init_producer(None).expect("init")],
        ..History::default()
    };
    let p = store.partition(TOPIC, 0).expect("partition");
    for _ in 0..8 {
        append(&p, &mut history, 0, 2);
    }
    for _ in 0..60 {
        append(&p, &mut history, 1, 2);
    }
    let removed = store.enforce_retention().expect("retention");
    assert!(removed > 0, "retention deleted segments");
    let log_start = p.log_start_offset();
    assert!(history.of(0).iter().all(|b| b.last_offset < log_start), "producer 0's batches are all deleted");
    assert!(history.of(1).first().expect("batches").base_offset < log_start, "producer 1 lost its first batches");
    let window = history.of(1).iter().rev().nth(BATCHES_PER_PRODUCER_MAX).copied().expect("six batches");
    assert!(window.base_offset >= log_start, "producer 1's last six batches are retained");
    let partition_dir = p.dir().to_path_buf();
    drop(p);

    let check = |store: &Store, history: &mut History, what: &str| {
        let p = store.partition(TOPIC, 0).expect("partition");
        assert_eq!(p.log_start_offset(), log_start, "{what}: log start");
        probe(&p, history, 1, what);
        let gone = *history.of(0).last().expect("batches");
        match send(&p, history, 0, gone.first_sequence, gone.count) {
            Ok(info) => assert_eq!(
                info,
                AppendInfo { base_offset: gone.base_offset, last_offset: gone.last_offset, duplicate: true },
                "{what}: a deleted producer's retry"
            ),
            Err(Error::UnknownProducerId { .. }) => {}
            Err(e) => panic!("{what}: a deleted producer's retry: {e}"),
        }
        append(&p, history, 1, 1);
    };
    check(&store, &mut history, "after retention");
    store.close().expect("clean close");
    let store = Store::open(dir.path(), store_config()).expect("reopen clean");
    check(&store, &mut history, "clean restart after retention");
    drop(store);
    let store = Store::open(dir.path(), store_config()).expect("reopen unclean");
    check(&store, &mut history, "unclean restart after retention");
    store.close().expect("clean close");
    for path in snapshots(&partition_dir) {
        std::fs::remove_file(path).expect("remove a snapshot");
    }
    let store = Store::open(dir.path(), store_config()).expect("reopen without snapshots");
    check(&store, &mut history, "restart without snapshots after retention");
}

/// With `producer_id_expiration_ms = 1000` and a manual clock, a producer idle for longer is
/// forgotten: its retries and next batch (non-zero sequences) fail with `UnknownProducerId`
/// and sequence 0 starts a fresh sequence at new offsets, while a producer that kept
/// writing is still known. The expiry also holds after a restart.
#[test]
fn idle_producers_expire() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(CLOCK_START_MS));
    let config = || StoreConfig {
        clock: Arc::clone(&clock) as Arc<dyn rill_engine::Clock>,
        producer_id_expiration_ms: 1000,
        retention_check_interval_ms: None,
        ..StoreConfig::default()
    };
    let store = Store::open(dir.path(), config()).expect("open");
    store.create_topic(TOPIC, topic_config()).expect("create");
    let mut history = History {
        ids: vec![store.init_producer(None).expect("init"), store.init_producer(None).expect("init")],
        ..History::default()
    };
    let p = store.partition(TOPIC, 0).expect("partition");
    for _ in 0..3 {
        append(&p, &mut history, 0, 2);
    }
    append(&p, &mut history, 1, 1);
    clock.advance_ms(600);
    append(&p, &mut history, 1, 1);
    clock.advance_ms(401);
    // Producer 0 has been idle for 1001 ms, producer 1 for 401 ms.
    probe(&p, &history, 1, "active producer");
    let last = *history.of(0).last().expect("batches");
    for (sequence, count) in [(last.first_sequence, last.count), (history.next_sequence(0), 1)] {
        let result = send(&p, &history, 0, sequence, count);
        assert!(
            matches!(result, Err(Error::UnknownProducerId { base_sequence, .. }) if base_sequence == sequence),
            "expired producer at sequence {sequence}: {result:?}"
        );
    }
    // Sequence 0 starts afresh: appended again at the end, not a duplicate of the first batch.
    let mut fresh = History { ids: history.ids.clone(), batches: history.of(1) };
    let end = p.end_offset();
    let info = send(&p, &fresh, 0, 0, 2).expect("sequence 0 after expiry");
    assert_eq!(info, AppendInfo { base_offset: end, last_offset: end + 1, duplicate: false });
    fresh.batches.push(Sent { producer: 0, first_sequence: 0, count: 2, base_offset: end, last_offset: end + 1 });
    append(&p, &mut fresh, 0, 1);
    probe(&p, &fresh, 0, "restarted producer");
    history = fresh;

    // Expiry across a restart: producer 1 goes idle, the store restarts, the clock moves on.
    drop(p);
    store.close().expect("clean close");
    clock.advance_ms(1001);
    let store = Store::open(dir.path(), config()).expect("reopen");
    let p = store.partition(TOPIC, 0).expect("partition");
    let next = history.next_sequence(1);
    let result = send(&p, &history, 1, next, 1);
    assert!(matches!(result, Err(Error::UnknownProducerId { .. })), "expired across a restart: {result:?}");
    let end = p.end_offset();
    let info = send(&p, &history, 1, 0, 1).expect("sequence 0 after expiry");
    assert_eq!(info, AppendInfo { base_offset: end, last_offset: end, duplicate: false });
}
