//! Arbitrary `.log` (and optionally `.index` / `.timeindex`) files opened with
//! `Segment::open` in every `OpenKind`. Nothing may panic. When the log was scanned
//! (always for `ActiveRecover`, and whenever the indices were rebuilt), the segment that comes
//! out must be a prefix of the file made of valid, contiguous batches that cannot be extended
//! by one more valid batch, and every lookup (`locate`, `read_at`, `find_by_timestamp`) must
//! agree with a plain walk of those batches. Optionally (mode bit 4) one batch is then
//! appended and the segment closed, reopened clean, sealed and reopened sealed: the indices
//! written live must be trusted on reopen and give the same answers.
//! Input layout: `rill_fuzz::SegmentInput`.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use rill_engine::format::batch::{set_base_offset, BatchBuilder, BatchHeader, BatchIter, Compression};
use rill_engine::io::StdStorage;
use rill_engine::segment::{log_file_name, OpenKind, ScanEnd, ScanReport, Segment, SegmentConfig};
use rill_engine::Record;
use rill_fuzz::SegmentInput;

const CONFIG: SegmentConfig = SegmentConfig { index_interval_bytes: 64, index_size_bytes: 4096 };

fn scratch_base() -> &'static Path {
    static BASE: OnceLock<std::path::PathBuf> = OnceLock::new();
    BASE.get_or_init(rill_fuzz::scratch_base)
}

/// Every batch of a segment known to hold only valid data: `(position, header)`.
fn walk(bytes: &Bytes) -> Vec<(u64, BatchHeader)> {
    let mut out = Vec::new();
    let mut position = 0u64;
    let mut expected = 0u64;
    for batch in BatchIter::new(bytes.clone()) {
        let batch = batch.expect("every batch of a recovered segment passes header and CRC checks");
        let header = *batch.header();
        assert_eq!(header.base_offset, expected, "batch offsets are contiguous from 0");
        out.push((position, header));
        position += header.size_bytes();
        expected = header.next_offset();
    }
    assert_eq!(position, bytes.len() as u64, "batches tile the whole segment");
    out
}

/// Checks a segment that must hold exactly `expected` (a prefix of what was written) as
/// valid, contiguous batches, and that every lookup agrees with a walk of them.
fn check_valid(segment: &Segment, expected: &[u8]) -> Vec<(u64, BatchHeader)> {
    let size = segment.size_bytes();
    assert_eq!(size, expected.len() as u64);
    let file_len = std::fs::metadata(segment.log_path()).expect("log exists").len();
    assert_eq!(file_len, size, "file length equals the segment's size");
    let bytes = segment.read_at(0, u64::MAX, u64::MAX).expect("a valid segment reads");
    assert_eq!(&bytes[..], expected, "read_at(0, MAX, MAX) returns every byte of the segment");
    let batches = walk(&bytes);
    let next = batches.last().map_or(0, |(_, h)| h.next_offset());
    assert_eq!(segment.next_offset(), next);
    let max_ts = batches.iter().map(|(_, h)| h.max_timestamp_ms).max();
    assert_eq!(segment.max_timestamp_ms(), max_ts);

    for &(position, header) in &batches {
        let (base, last) = (header.base_offset, header.last_offset());
        for offset in [base, base + (last - base) / 2, last] {
            assert_eq!(segment.locate(offset, u64::MAX).expect("locate"), Some(position), "locate({offset})");
            // Invisible once the end offset is at or below the batch's base offset.
            assert_eq!(segment.locate(offset, base).expect("locate"), None, "locate({offset}, end {base})");
        }
        let one = segment.read_at(position, 1, u64::MAX).expect("read_at");
        assert_eq!(one.len() as u64, header.size_bytes(), "read_at returns at least one whole batch");
        assert!(segment.read_at(position, u64::MAX, base).expect("read_at").is_empty());
    }
    assert_eq!(segment.locate(next, u64::MAX).expect("locate"), None, "nothing at next_offset");

    // The first batch whose max timestamp reaches T, for T at every batch's max.
    let mut probes: Vec<i64> = batches.iter().map(|(_, h)| h.max_timestamp_ms).collect();
    probes.push(i64::MIN);
    if let Some(t) = max_ts.and_then(|m| m.checked_add(1)) {
        probes.push(t);
    }
    for t in probes {
        let want = batches.iter().find(|(_, h)| h.max_timestamp_ms >= t).map(|&(p, h)| (h, p));
        assert_eq!(segment.find_by_timestamp(t, u64::MAX).expect("find_by_timestamp"), want, "timestamp {t}");
    }
    batches
}

/// Lookups on a segment whose indices were trusted without a full scan: they may fail, but
/// must not panic.
fn exercise(segment: &Segment) {
    if let Ok(bytes) = segment.read_at(0, u64::MAX, u64::MAX) {
        for batch in BatchIter::new(bytes) {
            let Ok(batch) = batch else { break };
            let _ = batch.validate_records();
        }
    }
    let next = segment.next_offset();
    for offset in [0, next / 2, next.saturating_sub(1), next] {
        let _ = segment.locate(offset, u64::MAX);
    }
    for t in [i64::MIN, 0, i64::MAX] {
        let _ = segment.find_by_timestamp(t, u64::MAX);
    }
    let _ = segment.read_at(segment.size_bytes() / 2, 100, u64::MAX);
}

fn check_recovery_report(original: &[u8], segment: &Segment, report: &ScanReport, batches: usize) {
    let valid = segment.size_bytes() as usize;
    assert_eq!(report.truncated_bytes as usize, original.len() - valid);
    assert_eq!(report.batches_scanned as usize, batches);
    let tail = &original[valid..];
    assert_eq!(report.end == ScanEnd::Clean, tail.is_empty(), "scan end {:?}", report.end);
    // Maximality: recovery must not drop a valid batch that continues the segment.
    if let Some(Ok(batch)) = BatchIter::new(Bytes::copy_from_slice(tail)).next() {
        assert_ne!(
            batch.header().base_offset,
            segment.next_offset(),
            "recovery cut a valid batch that continues the log at byte {valid}"
        );
    }
}

fn open(
    log_path: &Path,
    kind: OpenKind,
) -> rill_engine::Result<(Segment, rill_engine::segment::IndexingState, ScanReport)> {
    Segment::open(&StdStorage, log_path, 0, kind, &CONFIG)
}

/// Appends one batch, closes the indices as a clean shutdown does, reopens clean (indices
/// must be trusted), seals as a roll does and reopens sealed (trusted again).
fn append_and_reopen(segment: Segment, mut indexing: rill_engine::segment::IndexingState, fully_valid: bool) {
    let next = segment.next_offset();
    if !segment.indices_have_room() || next >= u64::from(u32::MAX) {
        return;
    }
    let log_path = segment.log_path().to_path_buf();
    let mut builder = BatchBuilder::new(Compression::None, 1_700_000_000_000);
    builder.push(&Record::keyed("fuzz", "appended")).expect("push");
    let mut batch = builder.build().expect("build");
    set_base_offset(&mut batch, next);
    let header = BatchHeader::parse(&batch).expect("built header parses");
    segment.append(&batch, &header, &mut indexing).expect("append");
    let mut expected = std::fs::read(&log_path).expect("read log");
    assert_eq!(expected.len() as u64, segment.size_bytes());
    assert_eq!(segment.next_offset(), next + 1);
    if fully_valid {
        check_valid(&segment, &expected);
    }
    segment.close_indices(&mut indexing).expect("close_indices");
    drop(segment);

    let (segment, mut indexing, report) = open(&log_path, OpenKind::ActiveClean).expect("clean reopen");
    if fully_valid {
        assert!(!report.rebuilt_indices, "indices written live are trusted on a clean reopen: {report:?}");
    }
    if report.rebuilt_indices {
        // Only possible when the first open trusted indices without reading the whole log:
        // the rebuild may then cut garbage the trusted open never looked at.
        expected.truncate(segment.size_bytes() as usize);
    }
    let valid = fully_valid || report.rebuilt_indices;
    check_or_exercise(&segment, &expected, valid);
    let end_offset = segment.next_offset();
    segment.seal(&mut indexing).expect("seal");
    drop(segment);

    let reopened = open(&log_path, OpenKind::Sealed { end_offset });
    if !valid {
        // Bytes no open has validated may make a sealed open fail (Error::Corrupt).
        if let Ok((segment, _, _)) = reopened {
            exercise(&segment);
        }
        return;
    }
    let (segment, _, report) = reopened.expect("sealed reopen of a valid segment");
    assert!(segment.is_sealed());
    assert!(!report.rebuilt_indices, "indices of a sealed segment are trusted: {report:?}");
    check_valid(&segment, &expected);
}

fn check_or_exercise(segment: &Segment, expected: &[u8], valid: bool) {
    if valid {
        check_valid(segment, expected);
    } else {
        exercise(segment);
    }
}

fuzz_target!(|data: &[u8]| {
    let input = SegmentInput::decode(data);
    let dir = tempfile::Builder::new().prefix("rill-fuzz-segment-").tempdir_in(scratch_base()).expect("temp dir");
    let log_path = dir.path().join(log_file_name(0));
    std::fs::write(&log_path, &input.log).expect("write log");
    if let Some(index) = &input.index {
        std::fs::write(log_path.with_extension("index"), index).expect("write index");
    }
    if let Some(timeindex) = &input.timeindex {
        std::fs::write(log_path.with_extension("timeindex"), timeindex).expect("write time index");
    }

    let Ok((segment, indexing, report)) = open(&log_path, input.kind) else { return };
    let scanned = input.kind == OpenKind::ActiveRecover || report.rebuilt_indices;
    if input.kind == OpenKind::ActiveRecover {
        assert!(report.rebuilt_indices, "recovery always rebuilds the indices");
    }
    if let OpenKind::Sealed { end_offset } = input.kind {
        assert!(segment.is_sealed());
        assert_eq!(segment.next_offset(), end_offset, "a sealed segment ends where the next begins");
        assert_eq!(report.truncated_bytes, 0, "a sealed segment is never truncated");
        assert_eq!(segment.size_bytes(), input.log.len() as u64);
    }
    if !scanned {
        assert_eq!(report.truncated_bytes, 0);
        assert_eq!(segment.size_bytes(), input.log.len() as u64, "trusted indices keep the whole log");
    }
    if scanned {
        let valid = segment.size_bytes() as usize;
        assert!(valid <= input.log.len(), "recovery truncates, never extends");
        let batches = check_valid(&segment, &input.log[..valid]);
        check_recovery_report(&input.log, &segment, &report, batches.len());
    } else {
        exercise(&segment);
    }
    if input.append_and_reopen && !segment.is_sealed() {
        append_and_reopen(segment, indexing, scanned);
    }
});
