//! `rill inspect <dir>`: an offline, read-only check of a store directory (layout in
//! `docs/format.md`, "Directory layout"). For every partition it lists the segments, walks
//! each `.log` batch by batch (header, contiguity, length, CRC; with `--deep` also every
//! record) and reports the first problem with its file and byte position, and checks the
//! `.index` and `.timeindex` files against the batches found.
//!
//! It must never write: files are only opened for reading (the engine's own open path
//! truncates torn tails and rebuilds indices, so it is not used here).
//!
//! Damage in a sealed segment, in the last segment after a clean shutdown, or in a topic's
//! metadata is corruption (exit status 3): opening the store would fail or lose data. An
//! invalid tail of the last segment without the clean-shutdown marker (what a crash leaves;
//! recovery truncates it) and a missing or inconsistent index (rebuilt on open) are
//! repairable damage (exit status 4). Stray files are only noted.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use bytes::Bytes;
use rill_engine::format::batch::{verify_crc, Batch, BatchHeader, BATCH_HEADER_SIZE};
use rill_engine::format::topic_meta;
use rill_engine::index::{IndexEntry, OffsetEntry, TimeEntry};
use rill_engine::limits::INDEX_SIZE_BYTES_MAX;
use rill_engine::log::partition::CLEAN_SHUTDOWN_FILE;
use rill_engine::segment::parse_log_file_name;

use super::{fail, InspectArgs, EXIT_CORRUPTION, EXIT_REPAIRABLE};
use crate::error::{Error, Result};

/// Directory of the topics inside a store (`docs/format.md`, "Directory layout").
const TOPICS_DIR: &str = "topics";
/// A topic's configuration file.
const TOPIC_META_FILE: &str = "topic.meta";
/// Prefix of a topic directory being deleted.
const DELETED_PREFIX: &str = ".deleted-";
/// Largest `topic.meta` read (the file is 76 bytes; anything much larger is damage).
const TOPIC_META_READ_MAX: u64 = 4096;

pub(super) fn run(args: &InspectArgs) -> ExitCode {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match inspect(&args.dir, args.deep, &mut out) {
        Ok(tally) if tally.corrupt > 0 => ExitCode::from(EXIT_CORRUPTION),
        Ok(tally) if tally.repairable > 0 => ExitCode::from(EXIT_REPAIRABLE),
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// Counts over the whole store.
#[derive(Debug, Default, PartialEq, Eq)]
struct Tally {
    topics: u64,
    partitions: u64,
    segments: u64,
    batches: u64,
    bytes: u64,
    /// Damage that opening the store cannot repair.
    corrupt: u64,
    /// Damage that opening the store repairs (torn tail after a crash, indices).
    repairable: u64,
    /// Things that are not damage but not expected either.
    notes: u64,
}

impl Tally {
    fn corrupt(&mut self, out: &mut impl Write, indent: &str, what: impl std::fmt::Display) -> Result<()> {
        self.corrupt += 1;
        line(out, format_args!("{indent}CORRUPT: {what}"))
    }

    fn repairable(&mut self, out: &mut impl Write, indent: &str, what: impl std::fmt::Display) -> Result<()> {
        self.repairable += 1;
        line(out, format_args!("{indent}REPAIRABLE: {what}"))
    }

    fn note(&mut self, out: &mut impl Write, indent: &str, what: impl std::fmt::Display) -> Result<()> {
        self.notes += 1;
        line(out, format_args!("{indent}note: {what}"))
    }
}

fn line(out: &mut impl Write, args: std::fmt::Arguments<'_>) -> Result<()> {
    writeln!(out, "{args}").map_err(|source| Error::io("write the report", source))
}

fn io_error(op: &'static str, path: &Path, source: std::io::Error) -> Error {
    Error::Io { op, source: std::io::Error::new(source.kind(), format!("{}: {source}", path.display())) }
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| io_error("list directory", dir, e))?;
    let mut paths = entries
        .map(|entry| entry.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| io_error("list directory", dir, e))?;
    paths.sort();
    Ok(paths)
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Checks every topic of the store at `dir`, writing the report to `out`.
fn inspect(dir: &Path, deep: bool, out: &mut impl Write) -> Result<Tally> {
    let topics_dir = dir.join(TOPICS_DIR);
    if !topics_dir.is_dir() {
        return Err(Error::Config { reason: format!("{} is not a rill store (no {TOPICS_DIR}/)", dir.display()) });
    }
    let mut tally = Tally::default();
    for path in sorted_entries(&topics_dir)? {
        let name = file_name(&path);
        if !path.is_dir() {
            tally.note(out, "", format_args!("{}: unexpected file in {TOPICS_DIR}/", path.display()))?;
        } else if name.starts_with(DELETED_PREFIX) {
            line(out, format_args!("{name}: a deleted topic (removed when the store opens)"))?;
        } else {
            inspect_topic(&path, &name, deep, out, &mut tally)?;
        }
    }
    let verdict = match (tally.corrupt, tally.repairable) {
        (0, 0) => "no damage".to_string(),
        (corrupt, repairable) => format!("{corrupt} corrupt, {repairable} repairable"),
    };
    line(
        out,
        format_args!(
            "inspected {} topics, {} partitions, {} segments, {} batches ({} bytes): {verdict}, {} notes",
            tally.topics, tally.partitions, tally.segments, tally.batches, tally.bytes, tally.notes
        ),
    )?;
    Ok(tally)
}

fn inspect_topic(dir: &Path, name: &str, deep: bool, out: &mut impl Write, tally: &mut Tally) -> Result<()> {
    tally.topics += 1;
    let meta_path = dir.join(TOPIC_META_FILE);
    if !meta_path.exists() {
        line(out, format_args!("topic {name}: no {TOPIC_META_FILE} (a creation that crashed; removed on open)"))?;
        return Ok(());
    }
    let config = match read_limited(&meta_path, TOPIC_META_READ_MAX).map(|b| topic_meta::decode(&b)) {
        Ok(Ok(config)) => config,
        Ok(Err(e)) => return tally.corrupt(out, "", format_args!("{}: {e}", meta_path.display())),
        Err(e) => return tally.corrupt(out, "", format_args!("{}: {e}", meta_path.display())),
    };
    line(
        out,
        format_args!(
            "topic {name}: {} partitions, fsync {}, segment {} bytes",
            config.partitions,
            super::parse::format_fsync(config.fsync),
            config.segment_size_bytes
        ),
    )?;
    for partition in 0..config.partitions {
        let partition_dir = dir.join(partition.to_string());
        if !partition_dir.is_dir() {
            tally.repairable(out, "  ", format_args!("partition {partition}: directory missing (created on open)"))?;
            continue;
        }
        inspect_partition(&partition_dir, partition, deep, out, tally)?;
    }
    for path in sorted_entries(dir)? {
        let entry = file_name(&path);
        let known = entry == TOPIC_META_FILE || entry.parse::<u32>().is_ok_and(|p| p < config.partitions);
        if !known {
            tally.note(out, "  ", format_args!("{}: not part of the topic", path.display()))?;
        }
    }
    Ok(())
}

fn read_limited(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    File::open(path)?.take(max).read_to_end(&mut buf)?;
    Ok(buf)
}

fn inspect_partition(dir: &Path, partition: u32, deep: bool, out: &mut impl Write, tally: &mut Tally) -> Result<()> {
    tally.partitions += 1;
    let clean = dir.join(CLEAN_SHUTDOWN_FILE).exists();
    let mut segments: Vec<(u64, PathBuf)> = Vec::new();
    let mut snapshots = 0;
    for path in sorted_entries(dir)? {
        let name = file_name(&path);
        if let Some(base) = parse_log_file_name(&name) {
            segments.push((base, path));
        } else if name.ends_with(".snapshot") {
            snapshots += 1;
        } else if !(name.ends_with(".index") || name.ends_with(".timeindex") || name == CLEAN_SHUTDOWN_FILE) {
            tally.note(out, "    ", format_args!("{}: unexpected file", path.display()))?;
        }
    }
    segments.sort();
    let shutdown = if clean { "clean shutdown" } else { "no clean-shutdown marker (crashed or running)" };
    line(
        out,
        format_args!(
            "  partition {partition}: {} segments, {snapshots} producer snapshots, {shutdown}",
            segments.len()
        ),
    )?;
    let mut expected_base: Option<u64> = None;
    for (i, (base, path)) in segments.iter().enumerate() {
        let active = i + 1 == segments.len();
        if let Some(expected) = expected_base.filter(|e| e != base) {
            tally.corrupt(
                out,
                "    ",
                format_args!("{}: starts at offset {base}, the previous segment ends at {expected}", path.display()),
            )?;
        }
        let scan = inspect_segment(path, *base, Segment { active, clean, deep }, out, tally)?;
        expected_base = scan.filter(|s| s.problem.is_none()).map(|s| s.next_offset);
    }
    Ok(())
}

/// How a segment is judged.
#[derive(Clone, Copy, Debug)]
struct Segment {
    /// The last segment of its partition (still appended to).
    active: bool,
    /// The partition was closed cleanly (its last segment was synced and trimmed).
    clean: bool,
    /// Decode every record.
    deep: bool,
}

fn inspect_segment(
    path: &Path,
    base: u64,
    segment: Segment,
    out: &mut impl Write,
    tally: &mut Tally,
) -> Result<Option<LogScan>> {
    tally.segments += 1;
    let scan = match scan_log(path, base, segment.deep) {
        Ok(scan) => scan,
        Err(e) => {
            tally.corrupt(out, "    ", format_args!("{}: cannot be read: {e}", path.display()))?;
            return Ok(None);
        }
    };
    tally.batches += scan.batches.len() as u64;
    tally.bytes += scan.len;
    let range =
        if scan.next_offset > base { format!("offsets {base}..={}", scan.next_offset - 1) } else { "empty".into() };
    line(out, format_args!("    {}: {} bytes, {} batches, {range}", file_name(path), scan.len, scan.batches.len()))?;
    if let Some((pos, reason)) = &scan.problem {
        let at = format!("{} at byte {pos}: {reason}", path.display());
        if segment.active && !segment.clean {
            let cut = scan.len - pos;
            tally.repairable(
                out,
                "      ",
                format_args!("{at} (a torn tail: recovery truncates these {cut} bytes)"),
            )?;
        } else {
            tally.corrupt(out, "      ", at)?;
        }
    }
    let trimmed = !segment.active || segment.clean;
    for (extension, check) in [("index", check_offset_index as IndexCheck), ("timeindex", check_time_index)] {
        let index_path = path.with_extension(extension);
        let verdict = match read_limited(&index_path, INDEX_SIZE_BYTES_MAX + 1) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err("missing".to_string()),
            Err(e) => Err(format!("cannot be read: {e}")),
            Ok(bytes) if bytes.len() as u64 > INDEX_SIZE_BYTES_MAX => {
                Err(format!("larger than INDEX_SIZE_BYTES_MAX ({INDEX_SIZE_BYTES_MAX} bytes)"))
            }
            Ok(bytes) => check(&bytes, base, &scan, trimmed),
        };
        match verdict {
            Ok(summary) => line(out, format_args!("      .{extension}: {summary}"))?,
            Err(problem) => {
                tally.repairable(out, "      ", format_args!(".{extension}: {problem} (rebuilt on open)"))?
            }
        }
    }
    Ok(Some(scan))
}

/// One valid batch of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BatchSummary {
    position: u64,
    base_offset: u64,
    next_offset: u64,
    max_timestamp_ms: i64,
}

/// What walking a `.log` found.
#[derive(Clone, Debug, PartialEq, Eq)]
struct LogScan {
    len: u64,
    batches: Vec<BatchSummary>,
    /// Offset after the last valid batch.
    next_offset: u64,
    /// The first invalid byte and why.
    problem: Option<(u64, String)>,
}

/// Walks a segment's batches from the start, as recovery does: each header must parse,
/// continue the previous batch's offsets, fit in the file and match its CRC.
fn scan_log(path: &Path, base_offset: u64, deep: bool) -> std::io::Result<LogScan> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut scan = LogScan { len, batches: Vec::new(), next_offset: base_offset, problem: None };
    let mut buf = vec![0u8; BATCH_HEADER_SIZE];
    let mut position = 0;
    while position < len {
        match check_batch(&mut file, position, len, scan.next_offset, deep, &mut buf)? {
            Ok(header) => {
                scan.batches.push(BatchSummary {
                    position,
                    base_offset: header.base_offset,
                    next_offset: header.next_offset(),
                    max_timestamp_ms: header.max_timestamp_ms,
                });
                scan.next_offset = header.next_offset();
                position += header.size_bytes();
            }
            Err(reason) => {
                scan.problem = Some((position, reason));
                break;
            }
        }
    }
    Ok(scan)
}

/// Checks the batch at `position`: `Ok(Err(reason))` when it is invalid.
fn check_batch(
    file: &mut File,
    position: u64,
    len: u64,
    expected_offset: u64,
    deep: bool,
    buf: &mut Vec<u8>,
) -> std::io::Result<std::result::Result<BatchHeader, String>> {
    if len - position < BATCH_HEADER_SIZE as u64 {
        return Ok(Err(format!("{} bytes left, less than a batch header", len - position)));
    }
    buf.resize(BATCH_HEADER_SIZE, 0);
    file.seek(SeekFrom::Start(position))?;
    file.read_exact(buf)?;
    let header = match BatchHeader::parse(buf) {
        Ok(header) => header,
        Err(e) => return Ok(Err(format!("batch header: {e}"))),
    };
    if header.base_offset != expected_offset {
        return Ok(Err(format!("batch base offset {} where {expected_offset} was expected", header.base_offset)));
    }
    if header.size_bytes() > len - position {
        return Ok(Err(format!("batch of {} bytes runs past the end of the file", header.size_bytes())));
    }
    buf.resize(header.size_bytes() as usize, 0);
    file.read_exact(&mut buf[BATCH_HEADER_SIZE..])?;
    if let Err(e) = verify_crc(buf) {
        return Ok(Err(e.to_string()));
    }
    if deep {
        let records = Batch::decode(Bytes::copy_from_slice(buf)).and_then(|batch| batch.validate_records());
        if let Err(e) = records {
            return Ok(Err(format!("records do not decode: {e}")));
        }
    }
    Ok(Ok(header))
}

/// Checks an index file against the scanned log: `Ok(summary)` or `Err(problem)`.
type IndexCheck = fn(&[u8], u64, &LogScan, bool) -> std::result::Result<String, String>;

/// Splits an index file into its entries. A preallocated (active) index is zero-filled past
/// its entries; an all-zero entry is never valid (the first batch of a segment has no index
/// entry, and every time entry bounds at least one batch), so it ends the entries.
fn index_entries<E: IndexEntry>(bytes: &[u8], trimmed: bool) -> std::result::Result<(Vec<E>, usize), String> {
    if !bytes.len().is_multiple_of(E::SIZE) {
        return Err(format!("{} bytes is not a whole number of {}-byte entries", bytes.len(), E::SIZE));
    }
    let slots: Vec<&[u8]> = bytes.chunks_exact(E::SIZE).collect();
    let used = slots.iter().position(|s| s.iter().all(|b| *b == 0)).unwrap_or(slots.len());
    if slots[used..].iter().any(|s| s.iter().any(|b| *b != 0)) {
        return Err(format!("entries after the empty slot {used}"));
    }
    let spare = slots.len() - used;
    if trimmed && spare > 0 {
        return Err(format!("{spare} empty slots in an index that should be trimmed"));
    }
    Ok((slots[..used].iter().map(|s| E::decode(s)).collect(), spare))
}

fn entries_summary(count: usize, spare: usize) -> String {
    if spare > 0 {
        format!("{count} entries (+{spare} preallocated slots), valid")
    } else {
        format!("{count} entries, valid")
    }
}

fn check_offset_index(bytes: &[u8], base: u64, scan: &LogScan, trimmed: bool) -> std::result::Result<String, String> {
    let (entries, spare) = index_entries::<OffsetEntry>(bytes, trimmed)?;
    for (i, entry) in entries.iter().enumerate() {
        if i > 0 {
            let previous = entries[i - 1];
            if entry.relative_offset <= previous.relative_offset || entry.position <= previous.position {
                return Err(format!("entry {i} does not increase"));
            }
        }
        let offset = base + u64::from(entry.relative_offset);
        let found = scan.batches.binary_search_by_key(&u64::from(entry.position), |b| b.position);
        match found {
            Ok(at) if scan.batches[at].base_offset == offset => {}
            _ => return Err(format!("entry {i} (offset {offset} at byte {}) names no batch", entry.position)),
        }
    }
    Ok(entries_summary(entries.len(), spare))
}

fn check_time_index(bytes: &[u8], base: u64, scan: &LogScan, trimmed: bool) -> std::result::Result<String, String> {
    let (entries, spare) = index_entries::<TimeEntry>(bytes, trimmed)?;
    // prefix_max[k]: largest max timestamp of the first k batches.
    let mut prefix_max = Vec::with_capacity(scan.batches.len() + 1);
    prefix_max.push(i64::MIN);
    for batch in &scan.batches {
        let last = *prefix_max.last().expect("starts with one element");
        prefix_max.push(last.max(batch.max_timestamp_ms));
    }
    for (i, entry) in entries.iter().enumerate() {
        if i > 0 {
            let previous = entries[i - 1];
            if entry.timestamp_ms < previous.timestamp_ms || entry.relative_offset < previous.relative_offset {
                return Err(format!("entry {i} decreases"));
            }
        }
        let bound = base + u64::from(entry.relative_offset);
        if bound > scan.next_offset {
            return Err(format!("entry {i} covers offsets up to {bound}, past the log's end {}", scan.next_offset));
        }
        let covered = scan.batches.partition_point(|b| b.base_offset < bound);
        if prefix_max[covered] > entry.timestamp_ms {
            return Err(format!(
                "entry {i} bounds timestamps by {} but a batch has {}",
                entry.timestamp_ms, prefix_max[covered]
            ));
        }
    }
    if trimmed && !scan.batches.is_empty() {
        let bounds_all = entries.last().is_some_and(|last| base + u64::from(last.relative_offset) == scan.next_offset);
        if !bounds_all {
            return Err("the last entry does not bound the whole segment".into());
        }
    }
    Ok(entries_summary(entries.len(), spare))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rill_engine::{Record, Store, StoreConfig, TopicConfig};

    fn report(dir: &Path) -> (Tally, String) {
        let mut out = Vec::new();
        let tally = inspect(dir, true, &mut out).expect("inspects");
        (tally, String::from_utf8(out).expect("utf8"))
    }

    /// Writes a store with small segments (several per partition) and closes it cleanly.
    fn store_with_data(dir: &Path) {
        let store = Store::open(dir, StoreConfig::default()).expect("opens");
        let config = TopicConfig {
            partitions: 2,
            segment_size_bytes: 4096,
            index_interval_bytes: 256,
            ..TopicConfig::default()
        };
        store.create_topic("events", config).expect("creates");
        let topic = store.topic("events").expect("topic");
        for i in 0..200u32 {
            let record = Record::keyed(format!("k{}", i % 7), vec![b'v'; 40 + (i % 13) as usize]);
            let (_, handle) = topic.append(Some(format!("k{}", i % 7).as_bytes()), &[record]).expect("appends");
            handle.wait().expect("durable");
        }
        store.close().expect("closes");
    }

    fn segments(dir: &Path) -> Vec<PathBuf> {
        let partition = dir.join("topics/events/0");
        let mut logs: Vec<PathBuf> =
            sorted_entries(&partition).expect("lists").into_iter().filter(|p| file_name(p).ends_with(".log")).collect();
        logs.sort();
        logs
    }

    /// A cleanly closed store with rolled segments and populated indices has no problem and
    /// no warning, and inspecting it changes no file.
    #[test]
    fn clean_store_is_clean_and_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        store_with_data(dir.path());
        assert!(segments(dir.path()).len() > 2, "the test needs rolled segments");
        let before = snapshot(dir.path());
        let (tally, text) = report(dir.path());
        assert_eq!((tally.corrupt, tally.repairable, tally.notes), (0, 0, 0), "{text}");
        assert_eq!(tally.partitions, 2);
        assert!(tally.batches >= 200, "{text}");
        assert!(text.contains(".index: ") && !text.contains(".index: 0 entries"), "{text}");
        assert_eq!(snapshot(dir.path()), before, "inspect must not modify the store");
    }

    fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut files = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for p in sorted_entries(&d).expect("lists") {
                if p.is_dir() {
                    stack.push(p);
                } else {
                    files.push((p.clone(), std::fs::read(&p).expect("reads")));
                }
            }
        }
        files.sort();
        files
    }

    /// A flipped byte inside a sealed segment is corruption, reported with the file and
    /// the byte position of the damaged batch.
    #[test]
    fn flipped_byte_in_sealed_segment_is_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        store_with_data(dir.path());
        let first = segments(dir.path())[0].clone();
        let mut bytes = std::fs::read(&first).expect("reads");
        let size =
            usize::try_from(rill_engine::format::batch::peek_batch_size(&bytes).expect("a batch")).expect("fits");
        bytes[size + BATCH_HEADER_SIZE + 3] ^= 0x40; // a record byte of the second batch
        std::fs::write(&first, &bytes).expect("writes");
        let (tally, text) = report(dir.path());
        assert!(tally.corrupt >= 1, "{text}");
        let expected = format!("CORRUPT: {} at byte {size}: record batch checksum mismatch", first.display());
        assert!(text.contains(&expected), "{text}");
    }

    /// A torn tail of the last segment without the clean-shutdown marker is repairable;
    /// with the marker it is corruption.
    #[test]
    fn torn_tail_is_a_warning_after_a_crash() {
        let dir = tempfile::tempdir().expect("tempdir");
        store_with_data(dir.path());
        let last = segments(dir.path()).last().expect("segments").clone();
        let mut file = std::fs::OpenOptions::new().append(true).open(&last).expect("opens");
        file.write_all(&[7u8; 30]).expect("appends garbage");
        drop(file);
        let (tally, text) = report(dir.path());
        assert_eq!(tally.corrupt, 1, "{text}");
        let marker = dir.path().join("topics/events/0").join(CLEAN_SHUTDOWN_FILE);
        std::fs::remove_file(marker).expect("removes marker");
        let (tally, text) = report(dir.path());
        assert_eq!((tally.corrupt, tally.repairable), (0, 1), "{text}");
        assert!(text.contains("torn tail: recovery truncates these 30 bytes"), "{text}");
    }

    /// A damaged index is repairable (indices are rebuilt on open), not corruption.
    #[test]
    fn bad_index_is_a_warning() {
        let dir = tempfile::tempdir().expect("tempdir");
        store_with_data(dir.path());
        let index = segments(dir.path())[0].with_extension("index");
        let mut bytes = std::fs::read(&index).expect("reads");
        assert!(bytes.len() >= 16, "the test needs two entries");
        bytes[4] ^= 0x01; // position of the first entry
        std::fs::write(&index, &bytes).expect("writes");
        let (tally, text) = report(dir.path());
        assert_eq!(tally.corrupt, 0, "{text}");
        assert!(tally.repairable >= 1 && text.contains("names no batch"), "{text}");
    }

    /// A directory that is not a store is an error, not a report.
    #[test]
    fn not_a_store_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(inspect(dir.path(), false, &mut Vec::new()).is_err());
    }
}
