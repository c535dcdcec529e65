//! Offset and time indices are caches of the log: deleted, truncated, garbage, zeroed,
//! reordered or stale index files are detected on open and rebuilt, after a clean close and
//! after an unclean stop alike, and reads by offset and by timestamp answer exactly as before.
//!
//! A multi-segment partition (small segments, an offset index entry every 64 bytes, record
//! timestamps that sometimes go backwards) is written once; the answers to a read from every
//! offset and to `offset_for_timestamp` for timestamps across the whole range are recorded
//! (and the timestamp answers checked against a brute-force model). Then, for each kind of
//! damage, a copy of the directory, closed cleanly or dropped, has every index file damaged
//! and is reopened: the answers must be identical, `rebuilt_indices` must count the damaged
//! segments, and once closed again the rebuilt files must equal the originals byte for byte.
//! A last case damages an index in a way the open-time checks cannot see (an entry moved to
//! a later batch, order kept): reads must still never skip records.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use rill_engine::format::batch::{peek_batch_size, BatchIter, LOG_OVERHEAD};
use rill_engine::index::{OFFSET_ENTRY_SIZE, TIME_ENTRY_SIZE};
use rill_engine::io::fault::splitmix64;
use rill_engine::{Compression, Error, FsyncPolicy, Partition, Record, Store, StoreConfig, TopicConfig};

const TOPIC: &str = "idx";
const BATCHES: u64 = 200;

fn topic_config() -> TopicConfig {
    TopicConfig {
        partitions: 1,
        // Durability is not under test here; nothing is lost without a crash.
        fsync: FsyncPolicy::Never,
        segment_size_bytes: 4096,
        segment_ms: None,
        retention_ms: None,
        index_interval_bytes: 64,
        index_size_bytes: 1024,
        ..TopicConfig::default()
    }
}

fn store_config() -> StoreConfig {
    StoreConfig { retention_check_interval_ms: None, ..StoreConfig::default() }
}

/// Timestamp of the record at `offset`: rising by 10 ms, but every fourth record is older
/// than the one before it.
fn timestamp(offset: u64) -> i64 {
    1_000_000 + 10 * offset as i64 - if offset % 4 == 2 { 35 } else { 0 }
}

fn batch(first_offset: u64, b: u64) -> Vec<Record> {
    (0..1 + b % 3)
        .map(|r| {
            let offset = first_offset + r;
            Record {
                timestamp_ms: Some(timestamp(offset)),
                ..Record::keyed(format!("k{b}"), format!("value-{offset}"))
            }
        })
        .collect()
}

/// The answers the partition gives, to compare before and after damage.
#[derive(Debug, PartialEq)]
struct Answers {
    end: u64,
    /// `read(offset, max_bytes)` for every offset, with varying `max_bytes`.
    reads: Vec<Bytes>,
    /// `offset_for_timestamp(t)` for timestamps across the range.
    lookups: Vec<(i64, Option<u64>)>,
}

/// Read sizes from none at all (a read still returns the whole first batch) to many batches.
fn max_bytes(offset: u64) -> u64 {
    [0, 1, 11, 12, 61, 100, 300, 1000][(offset % 8) as usize]
}

fn lookup_timestamps(end: u64) -> impl Iterator<Item = i64> {
    (timestamp(0) - 50..=timestamp(end - 1) + 50).step_by(7)
}

fn answers(p: &Partition) -> Answers {
    let end = p.end_offset();
    let reads = (0..end)
        .map(|offset| {
            let bytes = p.read(offset, max_bytes(offset)).expect("read");
            let first = BatchIter::new(bytes.clone()).next().expect("a read below the end returns a batch");
            let header = *first.expect("served batches are valid").header();
            assert!((header.base_offset..=header.last_offset()).contains(&offset), "batch holding {offset}");
            bytes
        })
        .collect();
    assert!(p.read(end, 100).expect("read at the end").is_empty());
    assert!(matches!(p.read(end + 1, 100), Err(Error::OffsetOutOfRange { .. })));
    let lookups = lookup_timestamps(end).map(|t| (t, p.offset_for_timestamp(t).expect("lookup"))).collect();
    Answers { end, reads, lookups }
}

/// Names the first difference, rather than printing both answers whole.
fn assert_same_answers(now: &Answers, before: &Answers, case: &str) {
    assert_eq!(now.end, before.end, "{case}: end offset");
    for (offset, (a, b)) in now.reads.iter().zip(&before.reads).enumerate() {
        assert!(a == b, "{case}: read({offset}, {}) differs", max_bytes(offset as u64));
    }
    for (a, b) in now.lookups.iter().zip(&before.lookups) {
        assert_eq!(a, b, "{case}: offset_for_timestamp differs");
    }
    assert_eq!(now.reads.len(), before.reads.len(), "{case}");
    assert_eq!(now.lookups.len(), before.lookups.len(), "{case}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create copy directory");
    for entry in std::fs::read_dir(from).expect("list directory to copy") {
        let entry = entry.expect("directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

fn partition_dir(root: &Path) -> PathBuf {
    root.join("topics").join(TOPIC).join("0")
}

/// Base offsets of the segments in a partition directory, ascending.
fn segment_bases(dir: &Path) -> Vec<u64> {
    let mut bases: Vec<u64> = std::fs::read_dir(dir)
        .expect("list partition")
        .filter_map(|e| {
            let name = e.expect("entry").file_name().into_string().ok()?;
            name.strip_suffix(".log")?.parse().ok()
        })
        .collect();
    bases.sort_unstable();
    bases
}

fn index_path(dir: &Path, base: u64, extension: &str) -> PathBuf {
    dir.join(format!("{base:020}.{extension}"))
}

/// What is done to an index file.
#[derive(Clone, Copy, Debug)]
enum Harm {
    Delete,
    /// Cut to an odd length (never a whole number of entries).
    TruncateOdd,
    /// Overwritten with seeded random bytes.
    Garbage,
    /// Zeroed, as a preallocated file whose entries never reached the disk.
    Zeroed,
    /// The first two entries swapped (the last one intact): only the monotonicity check
    /// can tell.
    SwapFirstTwo,
    /// The first and the last entries swapped.
    SwapFirstLast,
    /// The last entry dropped: whole entries, but stale.
    DropLastEntry,
}

/// Which index files of every segment are harmed.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Files {
    Offsets,
    Times,
    Both,
}

/// No damage (the control case), then each harm, to the files where it can be detected.
const DAMAGES: [Option<(Harm, Files)>; 12] = [
    None,
    Some((Harm::Delete, Files::Offsets)),
    Some((Harm::Delete, Files::Times)),
    Some((Harm::TruncateOdd, Files::Both)),
    Some((Harm::Garbage, Files::Offsets)),
    Some((Harm::Garbage, Files::Times)),
    Some((Harm::Zeroed, Files::Both)),
    Some((Harm::SwapFirstTwo, Files::Offsets)),
    Some((Harm::SwapFirstTwo, Files::Times)),
    Some((Harm::SwapFirstLast, Files::Offsets)),
    Some((Harm::SwapFirstLast, Files::Times)),
    // Dropping the last offset entry leaves a sparser but correct index: not damage.
    Some((Harm::DropLastEntry, Files::Times)),
];

fn swap_entries(path: &Path, entry_size: usize, a: usize, b: usize) -> bool {
    let bytes = std::fs::read(path).expect("read index file");
    let entries = bytes.len() / entry_size;
    if a >= entries || b >= entries {
        return false;
    }
    let mut swapped = bytes.clone();
    swapped[a * entry_size..][..entry_size].copy_from_slice(&bytes[b * entry_size..][..entry_size]);
    swapped[b * entry_size..][..entry_size].copy_from_slice(&bytes[a * entry_size..][..entry_size]);
    std::fs::write(path, &swapped).expect("write index file");
    swapped != bytes
}

/// Harms one index file; returns whether anything changed.
fn harm_file(path: &Path, entry_size: usize, harm: Harm, rng: &mut u64) -> bool {
    let bytes = std::fs::read(path).expect("read index file");
    let len = bytes.len();
    let write = |new: &[u8]| std::fs::write(path, new).expect("write index file");
    match harm {
        Harm::Delete => std::fs::remove_file(path).expect("delete index file"),
        Harm::TruncateOdd => {
            let odd = [len.saturating_sub(1), (len / 2) | 1, 1][(splitmix64(rng) % 3) as usize];
            let odd = if odd % 2 == 1 && odd < len { odd } else { 1 };
            if len <= 1 {
                write(&[0x5a]);
            } else {
                write(&bytes[..odd]);
            }
        }
        Harm::Garbage => {
            let garbage: Vec<u8> = (0..len.max(3 * entry_size)).map(|_| splitmix64(rng) as u8).collect();
            write(&garbage);
        }
        Harm::Zeroed => write(&vec![0u8; len.max(entry_size)]),
        Harm::SwapFirstTwo => {
            // With two entries only, swapping them also moves the last one.
            return len / entry_size >= 3 && swap_entries(path, entry_size, 0, 1);
        }
        Harm::SwapFirstLast => {
            let entries = len / entry_size;
            return entries >= 2 && swap_entries(path, entry_size, 0, entries - 1);
        }
        Harm::DropLastEntry => {
            if len < entry_size {
                return false;
            }
            write(&bytes[..len - entry_size]);
        }
    }
    true
}

/// Harms the chosen index files of every segment of the partition under `root`; returns
/// the base offsets of the segments that had an index file changed.
fn damage_indices(root: &Path, harm: Harm, files: Files, seed: u64) -> Vec<u64> {
    let dir = partition_dir(root);
    let mut rng = seed;
    let mut damaged = Vec::new();
    for base in segment_bases(&dir) {
        let mut changed = false;
        if files != Files::Times {
            changed |= harm_file(&index_path(&dir, base, "index"), OFFSET_ENTRY_SIZE, harm, &mut rng);
        }
        if files != Files::Offsets {
            changed |= harm_file(&index_path(&dir, base, "timeindex"), TIME_ENTRY_SIZE, harm, &mut rng);
        }
        if changed {
            damaged.push(base);
        }
    }
    damaged
}

/// Contents of every index file of the partition under `root`, by name.
fn index_files(root: &Path) -> Vec<(String, Vec<u8>)> {
    let dir = partition_dir(root);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("list partition")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|ext| ext == "index" || ext == "timeindex"))
        .map(|p| {
            let name = p.file_name().expect("file name").to_string_lossy().into_owned();
            (name, std::fs::read(&p).expect("read index file"))
        })
        .collect();
    files.sort();
    files
}

struct Written {
    _tmp: tempfile::TempDir,
    /// Dropped without `close` right after the last append.
    unclean: PathBuf,
    /// The same data, recovered and then closed cleanly.
    clean: PathBuf,
    before: Answers,
    segments: usize,
}

fn write_partition(config: TopicConfig) -> Written {
    let tmp = tempfile::tempdir().expect("tempdir");
    let build = tmp.path().join("build");
    let store = Store::open(&build, store_config()).expect("open");
    store.create_topic(TOPIC, config).expect("create topic");
    let p = store.partition(TOPIC, 0).expect("partition");
    let mut timestamps = Vec::new();
    for b in 0..BATCHES {
        let first = p.end_offset();
        let records = batch(first, b);
        let compression = if b % 5 == 4 { Compression::Lz4 } else { Compression::None };
        let info = p.append_records(&records, compression).expect("append").wait().expect("ack");
        assert_eq!(info.base_offset, first);
        timestamps.extend(records.iter().map(|r| r.timestamp_ms.expect("explicit timestamp")));
    }
    let segments = p.segment_count();
    assert!(segments >= 5, "the data spans several segments: {segments}");
    let before = answers(&p);
    for &(t, found) in &before.lookups {
        let model = timestamps.iter().position(|&ts| ts >= t).map(|i| i as u64);
        assert_eq!(found, model, "offset_for_timestamp({t}) against the model");
    }
    assert!(before.lookups.iter().any(|(_, found)| found.is_none()), "lookups past the newest record");
    drop(p);
    drop(store);
    let unclean = tmp.path().join("unclean");
    copy_dir(&build, &unclean);

    let store = Store::open(&build, store_config()).expect("reopen");
    let p = store.partition(TOPIC, 0).expect("partition");
    assert_same_answers(&answers(&p), &before, "recovery after an unclean stop");
    drop(p);
    store.close().expect("clean close");
    let clean = tmp.path().join("clean");
    copy_dir(&build, &clean);
    Written { _tmp: tmp, unclean, clean, before, segments }
}

/// For every kind of damage, after a clean close and after an unclean stop: the reopened
/// partition gives the same answers, rebuilds exactly the damaged segments (plus the last
/// segment after an unclean stop, which recovery always rebuilds), and its index files,
/// once closed, are byte for byte those of the undamaged copy (for sealed segments, the ones
/// the live appends wrote); the next open trusts them and appends continue.
#[test]
fn damaged_indices_are_rebuilt_and_answers_do_not_change() {
    let written = write_partition(topic_config());
    let pristine_clean_indices = index_files(&written.clean);
    let scratch = tempfile::tempdir().expect("scratch");
    for (i, damage) in DAMAGES.into_iter().enumerate() {
        for clean in [true, false] {
            let case = format!("{damage:?} after {} stop", if clean { "a clean" } else { "an unclean" });
            let work = scratch.path().join(format!("case-{i}-{clean}"));
            copy_dir(if clean { &written.clean } else { &written.unclean }, &work);
            let bases = segment_bases(&partition_dir(&work));
            assert_eq!(bases.len(), written.segments);
            let damaged = match damage {
                None => Vec::new(),
                Some((harm, files)) => {
                    let damaged = damage_indices(&work, harm, files, 0xda_3a9e ^ i as u64);
                    let sealed = &bases[..bases.len() - 1];
                    assert!(sealed.iter().all(|b| damaged.contains(b)), "{case}: every sealed segment was damaged");
                    damaged
                }
            };
            let last = *bases.last().expect("a segment");
            let expect_rebuilt = bases.iter().filter(|&&b| damaged.contains(&b) || (!clean && b == last)).count();

            let store = Store::open(&work, store_config()).unwrap_or_else(|e| panic!("{case}: reopen failed: {e}"));
            let p = store.partition(TOPIC, 0).expect("partition");
            let report = p.recovery_report().clone();
            assert_eq!(report.clean_shutdown, clean, "{case}");
            assert_eq!(report.truncated_bytes, 0, "{case}: an intact log loses nothing ({report:?})");
            assert_eq!(report.rebuilt_indices as usize, expect_rebuilt, "{case}: segments rebuilt ({report:?})");
            assert_same_answers(&answers(&p), &written.before, &format!("{case}, rebuilt"));
            drop(p);
            store.close().expect("clean close");
            assert_eq!(index_files(&work), pristine_clean_indices, "{case}: rebuilt index files");

            let store = Store::open(&work, store_config()).expect("reopen rebuilt");
            let p = store.partition(TOPIC, 0).expect("partition");
            assert_eq!(p.recovery_report().rebuilt_indices, 0, "{case}: rebuilt indices are trusted next time");
            assert_same_answers(&answers(&p), &written.before, &format!("{case}, reopened"));
            let end = written.before.end;
            let records = batch(end, 1);
            let info = p.append_records(&records, Compression::None).expect("append").wait().expect("ack");
            assert_eq!(info.base_offset, end, "{case}: appends continue");
            let read = p.read_records(end, 1 << 20).expect("read the new batch");
            let values: Vec<_> = read.iter().map(|r| r.value.clone()).collect();
            let expected: Vec<_> = records.iter().map(|r| r.value.clone()).collect();
            assert_eq!(values, expected, "{case}: the new batch reads back");
        }
    }
}

/// Moves the first entry of an offset index to the start of the batch after the one it
/// names, keeping the entries in order (so the checks on open still pass); returns whether
/// there was room to do so before the second entry.
fn displace_first_entry(dir: &Path, base: u64) -> bool {
    let index = index_path(dir, base, "index");
    let mut entries = std::fs::read(&index).expect("read .index");
    if entries.len() < 2 * OFFSET_ENTRY_SIZE {
        return false;
    }
    let position = |e: &[u8], i: usize| {
        u32::from_le_bytes(e[i * OFFSET_ENTRY_SIZE + 4..][..4].try_into().expect("4 bytes")) as u64
    };
    let (first, second) = (position(&entries, 0), position(&entries, 1));
    let log = std::fs::read(index_path(dir, base, "log")).expect("read .log");
    let size = peek_batch_size(&log[first as usize..first as usize + LOG_OVERHEAD]).expect("a batch header");
    let displaced = first + size;
    if displaced >= second {
        return false;
    }
    entries[4..8].copy_from_slice(&u32::try_from(displaced).expect("small segment").to_le_bytes());
    std::fs::write(&index, &entries).expect("write .index");
    true
}

/// An offset index damaged in a way the checks on open cannot see: an entry moved to the
/// start of a later batch, entries still in order, the last one intact. Reads must not
/// trust it blindly: every read from every offset still starts with the batch that holds
/// the offset, and every answer is as before, after a clean close and after an unclean stop.
#[test]
fn displaced_offset_entry_never_skips_records() {
    // Sparse entries (one per ~1000 bytes of log) leave batches between two entries.
    let written = write_partition(TopicConfig { index_interval_bytes: 1000, ..topic_config() });
    let scratch = tempfile::tempdir().expect("scratch");
    for clean in [true, false] {
        let case = format!("displaced entry after {} stop", if clean { "a clean" } else { "an unclean" });
        let work = scratch.path().join(format!("displaced-{clean}"));
        copy_dir(if clean { &written.clean } else { &written.unclean }, &work);
        let dir = partition_dir(&work);
        let displaced = segment_bases(&dir).into_iter().filter(|&base| displace_first_entry(&dir, base)).count();
        assert!(displaced >= written.segments - 1, "{case}: every sealed segment got a displaced entry");
        let store = Store::open(&work, store_config()).unwrap_or_else(|e| panic!("{case}: reopen failed: {e}"));
        let p = store.partition(TOPIC, 0).expect("partition");
        assert_same_answers(&answers(&p), &written.before, &case);
    }
}
