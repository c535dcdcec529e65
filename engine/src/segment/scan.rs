//! Opening a segment: validating trusted indices, or scanning the log batch by batch to
//! rebuild them and find the end of the valid data.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{sibling, IndexingState, Indices, OpenKind, Segment, SegmentConfig};
use crate::error::{Error, Result};
use crate::format::batch::{verify_crc, BatchHeader, BATCH_HEADER_SIZE};
use crate::index::{Index, OffsetEntry, TimeEntry};
use crate::io::{OpenMode, Storage, StorageFile};

/// How the scan of a segment ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScanEnd {
    /// Every byte belongs to a valid batch.
    Clean,
    /// The data stops being valid at `position`.
    Invalid {
        /// First byte that is not part of a valid batch.
        position: u64,
        /// Why the batch there is rejected.
        reason: String,
    },
}

/// What opening a segment found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanReport {
    /// Whether the indices were rebuilt from the log.
    pub rebuilt_indices: bool,
    /// Batches read during a scan (0 when the indices were trusted).
    pub batches_scanned: u64,
    /// Bytes cut from the end of the log (torn or invalid tail).
    pub truncated_bytes: u64,
    /// How the scan ended.
    pub end: ScanEnd,
}

pub(super) fn open_segment(
    storage: &dyn Storage,
    log_path: &Path,
    base_offset: u64,
    kind: OpenKind,
    config: &SegmentConfig,
) -> Result<(Segment, IndexingState, ScanReport)> {
    let log = storage.open(log_path, OpenMode::ReadWrite)?;
    let len = log.len()?;
    if kind != OpenKind::ActiveRecover {
        if let Some(opened) = open_trusted(storage, log_path, &log, base_offset, len, kind, config)? {
            return Ok(opened);
        }
    }
    let mut offsets = Index::create(storage, &sibling(log_path, "index"), config.index_size_bytes)?;
    let mut times = Index::create(storage, &sibling(log_path, "timeindex"), config.index_size_bytes)?;
    let mut indexing = IndexingState::new(config.index_interval_bytes);
    let scan =
        scan_log(&log, base_offset, len, &mut indexing, &mut Indices { offsets: &mut offsets, times: &mut times })?;
    let mut report = ScanReport {
        rebuilt_indices: true,
        batches_scanned: scan.batches,
        truncated_bytes: len - scan.valid_len,
        end: scan.end.clone(),
    };
    if let OpenKind::Sealed { end_offset } = kind {
        if scan.end != ScanEnd::Clean || scan.next_offset != end_offset {
            let (pos, reason) = match scan.end {
                ScanEnd::Invalid { position, reason } => (position, reason),
                ScanEnd::Clean => (
                    len,
                    format!("segment ends at offset {} but the next segment starts at {end_offset}", scan.next_offset),
                ),
            };
            return Err(Error::Corrupt {
                path: log_path.to_path_buf(),
                pos,
                reason: format!("sealed segment is damaged: {reason}"),
            });
        }
        report.truncated_bytes = 0;
    } else if scan.valid_len < len {
        assert!(scan.valid_len <= len, "recovery truncates, never extends");
        log.set_len(scan.valid_len)?;
        log.sync_data()?;
    }
    let segment = Segment::assemble(base_offset, log_path.to_path_buf(), log, offsets, times, scan.valid_len);
    segment.next_offset.store(scan.next_offset, Ordering::Release);
    if let Some(max) = scan.max_timestamp_ms {
        segment.max_timestamp_ms.store(max, Ordering::Release);
    }
    if matches!(kind, OpenKind::Sealed { .. }) {
        segment.seal(&mut indexing)?;
    }
    Ok((segment, indexing, report))
}

/// Opens the indices as they are and checks them against the log. `None` if they are
/// missing or do not match (the caller rebuilds).
fn open_trusted(
    storage: &dyn Storage,
    log_path: &Path,
    log: &Arc<dyn StorageFile>,
    base_offset: u64,
    len: u64,
    kind: OpenKind,
    config: &SegmentConfig,
) -> Result<Option<(Segment, IndexingState, ScanReport)>> {
    let Some(mut offsets) = Index::<OffsetEntry>::open_trimmed(storage, &sibling(log_path, "index"))? else {
        return Ok(None);
    };
    let Some(mut times) = Index::<TimeEntry>::open_trimmed(storage, &sibling(log_path, "timeindex"))? else {
        return Ok(None);
    };
    let Some(checked) = check_indices(log, base_offset, len, &offsets, &times)? else {
        return Ok(None);
    };
    if let OpenKind::Sealed { end_offset } = kind {
        if checked.next_offset != end_offset {
            return Ok(None);
        }
    }
    let mut indexing = IndexingState::new(config.index_interval_bytes);
    indexing.bytes_since_entry = len - checked.last_entry_position;
    indexing.running_max_timestamp_ms = checked.max_timestamp_ms;
    if kind == OpenKind::ActiveClean {
        offsets.reopen_for_append(config.index_size_bytes)?;
        times.reopen_for_append(config.index_size_bytes)?;
    }
    let segment = Segment::assemble(base_offset, log_path.to_path_buf(), Arc::clone(log), offsets, times, len);
    segment.next_offset.store(checked.next_offset, Ordering::Release);
    if let Some(max) = checked.max_timestamp_ms {
        segment.max_timestamp_ms.store(max, Ordering::Release);
    }
    if matches!(kind, OpenKind::Sealed { .. }) {
        let map = segment.log.map_read()?;
        segment.sealed.set(map.to_bytes()).expect("freshly opened segment is not sealed yet");
    }
    let report = ScanReport { rebuilt_indices: false, batches_scanned: 0, truncated_bytes: 0, end: ScanEnd::Clean };
    Ok(Some((segment, indexing, report)))
}

struct Checked {
    next_offset: u64,
    max_timestamp_ms: Option<i64>,
    last_entry_position: u64,
}

/// Checks indices against the log without reading all of it: entries must be monotone and
/// inside the file, the last offset entry must point at the batch it names, the batches
/// after it must tile the rest of the file exactly, and the time index must end with the
/// entry that bounds the whole segment.
fn check_indices(
    log: &Arc<dyn StorageFile>,
    base_offset: u64,
    len: u64,
    offsets: &Index<OffsetEntry>,
    times: &Index<TimeEntry>,
) -> Result<Option<Checked>> {
    for i in 1..offsets.len() {
        let (a, b) = (offsets.get(i - 1), offsets.get(i));
        if a.relative_offset >= b.relative_offset || a.position >= b.position {
            return Ok(None);
        }
    }
    for i in 1..times.len() {
        let (a, b) = (times.get(i - 1), times.get(i));
        if a.timestamp_ms > b.timestamp_ms || a.relative_offset > b.relative_offset {
            return Ok(None);
        }
    }
    let (mut position, mut expected) = match offsets.last() {
        None => (0, base_offset),
        Some(e) => (u64::from(e.position), base_offset + u64::from(e.relative_offset)),
    };
    let last_entry_position = position;
    if offsets.last().is_some() && position >= len {
        // The last entry must name a batch inside the log; past its end nothing vouches for
        // the offset it claims (and `len - last_entry_position` would underflow).
        return Ok(None);
    }
    let mut header_buf = [0u8; BATCH_HEADER_SIZE];
    let mut walked_max: Option<i64> = None;
    while position < len {
        if len - position < BATCH_HEADER_SIZE as u64 {
            return Ok(None);
        }
        log.read_exact_at(&mut header_buf, position)?;
        let Ok(header) = BatchHeader::parse(&header_buf) else { return Ok(None) };
        if header.base_offset != expected || header.size_bytes() > len - position {
            return Ok(None);
        }
        walked_max = Some(walked_max.map_or(header.max_timestamp_ms, |m| m.max(header.max_timestamp_ms)));
        expected = header.next_offset();
        position += header.size_bytes();
    }
    let max_timestamp_ms = match times.last() {
        None if len == 0 => None,
        None => return Ok(None),
        Some(last) => {
            let covers_all = base_offset + u64::from(last.relative_offset) == expected;
            if !covers_all || walked_max.is_some_and(|m| m > last.timestamp_ms) || len == 0 {
                return Ok(None);
            }
            Some(last.timestamp_ms)
        }
    };
    Ok(Some(Checked { next_offset: expected, max_timestamp_ms, last_entry_position }))
}

struct Scan {
    batches: u64,
    valid_len: u64,
    next_offset: u64,
    max_timestamp_ms: Option<i64>,
    end: ScanEnd,
}

/// Reads every batch from the start of the log, checking header, contiguity, length and
/// CRC, and indexing each valid batch. Stops at the first invalid byte.
fn scan_log(
    log: &Arc<dyn StorageFile>,
    base_offset: u64,
    len: u64,
    indexing: &mut IndexingState,
    indices: &mut Indices<'_>,
) -> Result<Scan> {
    let mut scan =
        Scan { batches: 0, valid_len: 0, next_offset: base_offset, max_timestamp_ms: None, end: ScanEnd::Clean };
    let mut buf = Vec::new();
    while scan.valid_len < len {
        let position = scan.valid_len;
        let invalid = |reason: String| ScanEnd::Invalid { position, reason };
        if len - position < BATCH_HEADER_SIZE as u64 {
            scan.end = invalid(format!("{} bytes left, less than a batch header", len - position));
            break;
        }
        buf.resize(BATCH_HEADER_SIZE, 0);
        log.read_exact_at(&mut buf, position)?;
        let header = match BatchHeader::parse(&buf) {
            Ok(header) => header,
            Err(e) => {
                scan.end = invalid(e.to_string());
                break;
            }
        };
        if header.base_offset != scan.next_offset {
            scan.end =
                invalid(format!("batch base offset {} where {} was expected", header.base_offset, scan.next_offset));
            break;
        }
        if header.size_bytes() > len - position {
            scan.end = invalid(format!("batch of {} bytes runs past the end of the file", header.size_bytes()));
            break;
        }
        buf.resize(header.size_bytes() as usize, 0);
        log.read_exact_at(&mut buf[BATCH_HEADER_SIZE..], position + BATCH_HEADER_SIZE as u64)?;
        if let Err(e) = verify_crc(&buf) {
            scan.end = invalid(e.to_string());
            break;
        }
        indexing.observe(base_offset, position, &header, indices);
        scan.batches += 1;
        scan.valid_len += header.size_bytes();
        scan.next_offset = header.next_offset();
        scan.max_timestamp_ms =
            Some(scan.max_timestamp_ms.map_or(header.max_timestamp_ms, |m| m.max(header.max_timestamp_ms)));
    }
    Ok(scan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::batch::{BatchBuilder, Compression};
    use crate::index::IndexEntry;
    use crate::io::StdStorage;
    use crate::segment::log_file_name;
    use crate::Record;

    /// Regression (found by `fuzz/segment_recovery`): an offset index whose last entry points
    /// past the end of the log was trusted on a clean open; it made the segment claim offsets
    /// the log does not hold and underflowed `len - last_entry_position`. It must be rebuilt.
    #[test]
    fn last_offset_entry_past_end_of_log_is_rebuilt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log_path = dir.path().join(log_file_name(0));
        let mut builder = BatchBuilder::new(Compression::None, 1_000);
        builder.push(&Record::from_value("v")).expect("push");
        let batch = builder.build().expect("build");
        std::fs::write(&log_path, &batch).expect("write log");
        let mut index = [0u8; OffsetEntry::SIZE];
        OffsetEntry { relative_offset: 5, position: 77_582 }.encode(&mut index);
        std::fs::write(sibling(&log_path, "index"), index).expect("write index");
        let mut times = [0u8; TimeEntry::SIZE];
        TimeEntry { timestamp_ms: 1_000, relative_offset: 5 }.encode(&mut times);
        std::fs::write(sibling(&log_path, "timeindex"), times).expect("write time index");
        let config = SegmentConfig { index_interval_bytes: 64, index_size_bytes: 4096 };

        for kind in [OpenKind::ActiveClean, OpenKind::Sealed { end_offset: 1 }] {
            let (segment, _, report) = open_segment(&StdStorage, &log_path, 0, kind, &config).expect("open");
            assert!(report.rebuilt_indices, "{kind:?}: bad index rebuilt");
            assert_eq!(segment.next_offset(), 1, "{kind:?}: next offset from the log, not the index");
            assert_eq!(segment.size_bytes(), batch.len() as u64);
            drop(segment);
            std::fs::write(sibling(&log_path, "index"), index).expect("rewrite index");
            std::fs::write(sibling(&log_path, "timeindex"), times).expect("rewrite time index");
        }
        // The fuzzer's case: empty log, empty time index, one offset entry far past the end.
        std::fs::write(&log_path, b"").expect("empty log");
        std::fs::write(sibling(&log_path, "timeindex"), b"").expect("empty time index");
        let (segment, _, report) =
            open_segment(&StdStorage, &log_path, 0, OpenKind::ActiveClean, &config).expect("open empty");
        assert!(report.rebuilt_indices);
        assert_eq!(segment.next_offset(), 0);
    }
}
