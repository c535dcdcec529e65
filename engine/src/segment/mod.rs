//! One segment of a partition log: `<base>.log` plus its offset and time indices.
//!
//! It owns: writing batches at the end of the active segment, keeping its indices, sealing,
//! validating or rebuilding indices on open, scanning for recovery, and serving reads.
//! It must never: assign offsets or decide when to roll or sync (that is `log/`).
//!
//! Concurrency: one appender (holding the log's appender lock) calls the `&self` methods
//! that write; readers call the read methods concurrently. Readers learn how many bytes are
//! written from `written_len`, stored with `Release` after the bytes are written and
//! loaded with `Acquire`; the indices sit behind their own short read/write locks.

mod scan;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::{Bytes, BytesMut};
use parking_lot::RwLock;

use crate::error::{Error, Result};
use crate::format::batch::{peek_batch_size, BatchHeader, BATCH_HEADER_SIZE};
use crate::index::{Index, OffsetEntry, TimeEntry};
use crate::io::{OpenMode, Storage, StorageFile};

pub use scan::{ScanEnd, ScanReport};

/// Settings a segment needs from its topic's configuration.
#[derive(Clone, Copy, Debug)]
pub struct SegmentConfig {
    /// Bytes of log between two offset index entries.
    pub index_interval_bytes: u32,
    /// Preallocated size of each index file while the segment is active.
    pub index_size_bytes: u64,
}

/// File name of a segment's log: the base offset, zero-padded to 20 digits.
pub fn log_file_name(base_offset: u64) -> String {
    format!("{base_offset:020}.log")
}

/// Parses a `<20 digits>.log` file name back into its base offset.
pub fn parse_log_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn sibling(log_path: &Path, extension: &str) -> PathBuf {
    log_path.with_extension(extension)
}

/// Appender-side indexing state of the active segment: decides where index entries go.
/// The same logic runs when appending and when rebuilding indices from the log, so a
/// rebuilt index equals the one written live.
#[derive(Clone, Copy, Debug)]
pub struct IndexingState {
    interval_bytes: u64,
    bytes_since_entry: u64,
    running_max_timestamp_ms: Option<i64>,
}

impl IndexingState {
    fn new(interval_bytes: u32) -> Self {
        IndexingState {
            interval_bytes: u64::from(interval_bytes),
            bytes_since_entry: 0,
            running_max_timestamp_ms: None,
        }
    }

    /// Records a batch written at `position`, adding index entries when due.
    fn observe(&mut self, segment_base: u64, position: u64, header: &BatchHeader, indices: &mut Indices<'_>) {
        if self.bytes_since_entry >= self.interval_bytes {
            let relative_offset = relative(segment_base, header.base_offset);
            let pushed = indices.offsets.push(OffsetEntry {
                relative_offset,
                position: u32::try_from(position).expect("segment positions fit u32 (SEGMENT_SIZE_BYTES_MAX)"),
            });
            debug_assert!(pushed, "appender rolls before the offset index fills");
            self.push_time_entry(relative_offset, indices);
            self.bytes_since_entry = 0;
        }
        self.bytes_since_entry += header.size_bytes();
        let max = self.running_max_timestamp_ms.map_or(header.max_timestamp_ms, |m| m.max(header.max_timestamp_ms));
        self.running_max_timestamp_ms = Some(max);
    }

    /// Adds a time entry bounding every batch before `relative_offset` if the bound grew.
    fn push_time_entry(&mut self, relative_offset: u32, indices: &mut Indices<'_>) {
        let Some(max) = self.running_max_timestamp_ms else { return };
        if indices.times.last().is_none_or(|last| max > last.timestamp_ms) {
            let pushed = indices.times.push(TimeEntry { timestamp_ms: max, relative_offset });
            debug_assert!(pushed, "appender rolls before the time index fills");
        }
    }

    /// Adds the entry that bounds every batch of the segment (sealing, clean shutdown), so
    /// the segment's max timestamp can be read back from the index.
    fn push_final_time_entry(&mut self, end_relative_offset: u32, indices: &mut Indices<'_>) {
        let Some(max) = self.running_max_timestamp_ms else { return };
        if indices.times.last().is_none_or(|last| last.relative_offset < end_relative_offset) {
            let pushed = indices.times.push(TimeEntry { timestamp_ms: max, relative_offset: end_relative_offset });
            assert!(pushed, "one time index slot is kept free for the final entry");
        }
    }
}

struct Indices<'a> {
    offsets: &'a mut Index<OffsetEntry>,
    times: &'a mut Index<TimeEntry>,
}

fn relative(segment_base: u64, offset: u64) -> u32 {
    u32::try_from(offset - segment_base).expect("relative offsets fit u32: the appender rolls before they overflow")
}

/// A segment file with its indices.
#[derive(Debug)]
pub struct Segment {
    base_offset: u64,
    log_path: PathBuf,
    log: Arc<dyn StorageFile>,
    offset_index: RwLock<Index<OffsetEntry>>,
    time_index: RwLock<Index<TimeEntry>>,
    written_len: AtomicU64,
    next_offset: AtomicU64,
    max_timestamp_ms: AtomicI64,
    sealed: OnceLock<Bytes>,
    /// Whether the time index was checked against every batch header: one of the
    /// `TIME_INDEX_*` states.
    time_index_state: AtomicU8,
}

/// The time index has not been checked against the log yet.
const TIME_INDEX_UNCHECKED: u8 = 0;
/// Every entry bounds the batches before it: lookups may skip by it.
const TIME_INDEX_VALID: u8 = 1;
/// An entry claims a smaller bound than a batch before it holds (damage): lookups walk the
/// segment from its start instead.
const TIME_INDEX_DAMAGED: u8 = 2;

impl Segment {
    /// Creates a new, empty active segment.
    pub fn create(
        storage: &dyn Storage,
        dir: &Path,
        base_offset: u64,
        config: &SegmentConfig,
    ) -> Result<(Self, IndexingState)> {
        let log_path = dir.join(log_file_name(base_offset));
        let log = storage.open(&log_path, OpenMode::CreateNew)?;
        let offset_index = Index::create(storage, &sibling(&log_path, "index"), config.index_size_bytes)?;
        let time_index = Index::create(storage, &sibling(&log_path, "timeindex"), config.index_size_bytes)?;
        let segment = Segment::assemble(base_offset, log_path, log, offset_index, time_index, 0);
        Ok((segment, IndexingState::new(config.index_interval_bytes)))
    }

    fn assemble(
        base_offset: u64,
        log_path: PathBuf,
        log: Arc<dyn StorageFile>,
        offset_index: Index<OffsetEntry>,
        time_index: Index<TimeEntry>,
        len: u64,
    ) -> Self {
        Segment {
            base_offset,
            log_path,
            log,
            offset_index: RwLock::new(offset_index),
            time_index: RwLock::new(time_index),
            written_len: AtomicU64::new(len),
            next_offset: AtomicU64::new(base_offset),
            max_timestamp_ms: AtomicI64::new(i64::MIN),
            sealed: OnceLock::new(),
            time_index_state: AtomicU8::new(TIME_INDEX_UNCHECKED),
        }
    }

    /// Offset of the segment's first record.
    pub fn base_offset(&self) -> u64 {
        self.base_offset
    }

    /// Offset after the segment's last record.
    pub fn next_offset(&self) -> u64 {
        self.next_offset.load(Ordering::Acquire)
    }

    /// Bytes written to the segment's log.
    pub fn size_bytes(&self) -> u64 {
        self.written_len.load(Ordering::Acquire)
    }

    /// Largest record timestamp in the segment, if it holds any batch.
    pub fn max_timestamp_ms(&self) -> Option<i64> {
        let ts = self.max_timestamp_ms.load(Ordering::Acquire);
        (self.next_offset() > self.base_offset).then_some(ts)
    }

    /// Path of the `.log` file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The log file (used by the log's flusher to sync the active segment).
    pub fn log_file(&self) -> &Arc<dyn StorageFile> {
        &self.log
    }

    /// Whether the segment is sealed (immutable).
    pub fn is_sealed(&self) -> bool {
        self.sealed.get().is_some()
    }

    /// Whether the indices can take another entry (plus the final time entry of sealing).
    pub fn indices_have_room(&self) -> bool {
        let offsets = self.offset_index.read();
        let times = self.time_index.read();
        offsets.len() < offsets.capacity() && times.len() + 1 < times.capacity()
    }

    /// Appends one encoded batch at the end of the active segment. The batch's offsets
    /// must already be assigned. Only the appender calls this.
    pub fn append(&self, batch: &[u8], header: &BatchHeader, indexing: &mut IndexingState) -> Result<()> {
        assert!(!self.is_sealed(), "append to sealed segment {}", self.log_path.display());
        assert_eq!(header.base_offset, self.next_offset(), "batch offsets are contiguous with the segment");
        assert_eq!(header.size_bytes(), batch.len() as u64, "batch length field matches its bytes");
        let position = self.written_len.load(Ordering::Relaxed);
        self.log.write_all_at(batch, position)?;
        {
            let mut offsets = self.offset_index.write();
            let mut times = self.time_index.write();
            let mut indices = Indices { offsets: &mut offsets, times: &mut times };
            indexing.observe(self.base_offset, position, header, &mut indices);
        }
        self.max_timestamp_ms.fetch_max(header.max_timestamp_ms, Ordering::AcqRel);
        self.next_offset.store(header.next_offset(), Ordering::Release);
        self.written_len.store(position + batch.len() as u64, Ordering::Release);
        Ok(())
    }

    /// Makes the segment's bytes durable.
    pub fn sync(&self) -> Result<()> {
        self.log.sync_data()
    }

    /// Seals the segment: syncs the log, writes the final time entry, trims and syncs the
    /// indices, and maps the log read-only. The segment is immutable afterwards.
    pub fn seal(&self, indexing: &mut IndexingState) -> Result<()> {
        self.close_indices(indexing)?;
        self.log.sync_data()?;
        let map = self.log.map_read()?;
        let bytes = map.to_bytes();
        assert_eq!(bytes.len() as u64, self.size_bytes(), "sealed map covers every written byte");
        self.sealed.set(bytes).expect("a segment is sealed once: the appender seals only the active segment");
        Ok(())
    }

    /// Writes the final time entry and trims both indices (sealing and clean shutdown).
    pub fn close_indices(&self, indexing: &mut IndexingState) -> Result<()> {
        let mut offsets = self.offset_index.write();
        let mut times = self.time_index.write();
        let end = relative(self.base_offset, self.next_offset());
        if end > 0 {
            let mut indices = Indices { offsets: &mut offsets, times: &mut times };
            indexing.push_final_time_entry(end, &mut indices);
        }
        offsets.trim()?;
        times.trim()
    }

    /// Opens an existing segment and, unless `trust_indices`, checks and possibly rebuilds
    /// its indices. `end_offset` is the next segment's base offset for a sealed segment.
    pub fn open(
        storage: &dyn Storage,
        log_path: &Path,
        base_offset: u64,
        open: OpenKind,
        config: &SegmentConfig,
    ) -> Result<(Self, IndexingState, ScanReport)> {
        scan::open_segment(storage, log_path, base_offset, open, config)
    }

    /// Position of the batch that contains `offset`, or `None` if no visible batch (base
    /// offset below `end_offset`) contains it.
    pub fn locate(&self, offset: u64, end_offset: u64) -> Result<Option<u64>> {
        if offset < self.base_offset {
            return Ok(None);
        }
        let (start, start_offset) = {
            let index = self.offset_index.read();
            let rel = offset - self.base_offset;
            let i = index.partition_point(|e| u64::from(e.relative_offset) <= rel);
            match i.checked_sub(1).map(|i| index.get(i)) {
                None => (0, self.base_offset),
                Some(e) => (u64::from(e.position), self.base_offset + u64::from(e.relative_offset)),
            }
        };
        let limit = self.size_bytes();
        // The open-time checks vouch only for the last entry: an earlier one, damaged but in
        // order, may point at another batch, and walking on from there would skip records.
        // Trust an entry only if the batch it points at starts at the offset it names.
        let trusted =
            start == 0 || matches!(self.header_at(start, limit), Ok(Some(h)) if h.base_offset == start_offset);
        let (mut position, mut expected) = if trusted { (start, start_offset) } else { (0, self.base_offset) };
        while let Some(header) = self.header_at(position, limit)? {
            // Sealed batches are not re-checked on open, and the base offset is outside the
            // CRC: a batch that does not continue its predecessor is damage, never data.
            if header.base_offset != expected {
                return Err(self.corrupt_at(
                    position,
                    format!("batch base offset {} where {expected} was expected", header.base_offset),
                ));
            }
            if header.base_offset >= end_offset {
                return Ok(None);
            }
            if header.last_offset() >= offset {
                return Ok(Some(position));
            }
            position += header.size_bytes();
            expected = header.next_offset();
        }
        if position != limit {
            return Err(self.corrupt_at(position, format!("the batches do not end at the segment's end ({limit})")));
        }
        Ok(None)
    }

    /// Reads whole batches from `position`: at least one (even if larger than `max_bytes`),
    /// then as many as fit in `max_bytes`, stopping before any batch at or past
    /// `end_offset`. Sealed segments answer with a zero-copy view of their map.
    pub fn read_at(&self, position: u64, max_bytes: u64, end_offset: u64) -> Result<Bytes> {
        let limit = self.size_bytes();
        // Look at least at one batch header: with a smaller window the length prefix does
        // not parse and the read would come back empty, as if at the end of the log.
        let first_window = max_bytes.max(BATCH_HEADER_SIZE as u64);
        let mut window = self.window(position, first_window.min(limit.saturating_sub(position)))?;
        let mut taken = 0u64;
        let mut expected = None;
        let mut reached_end_offset = false;
        loop {
            let rest = &window[taken as usize..];
            let Some(size) = peek_batch_size(rest) else { break };
            if rest.len() < BATCH_HEADER_SIZE {
                if taken == 0 && position + BATCH_HEADER_SIZE as u64 <= limit {
                    window = self.window(position, BATCH_HEADER_SIZE as u64)?;
                    continue;
                }
                break;
            }
            let header = BatchHeader::parse(rest).map_err(|e| self.corrupt(position + taken, e))?;
            if header.base_offset >= end_offset {
                reached_end_offset = true;
                break;
            }
            if expected.is_some_and(|next| header.base_offset != next) {
                // Damage (see `locate`): serve the batches before it; a read from here fails.
                break;
            }
            if size > rest.len() as u64 {
                if taken == 0 && position + size <= limit {
                    window = self.window(position, size)?;
                    continue;
                }
                break;
            }
            taken += size;
            expected = Some(header.next_offset());
        }
        if taken == 0 && position < limit && !reached_end_offset {
            // A located batch that cannot be served whole is damage, not the end of the log.
            return Err(self.corrupt_at(position, "the batch here runs past the end of the segment".into()));
        }
        Ok(window.slice(..taken as usize))
    }

    /// The first visible batch whose max timestamp is at least `timestamp_ms`: its header
    /// and position.
    ///
    /// The open-time checks vouch only for the order of the time index and its last entry; a
    /// damaged middle entry that still keeps the order would make the lookup skip batches.
    /// So the first lookup in a segment checks every entry against the batch headers (once);
    /// a segment whose time index fails is searched from its start.
    pub fn find_by_timestamp(&self, timestamp_ms: i64, end_offset: u64) -> Result<Option<(BatchHeader, u64)>> {
        let trusted = self.time_index_trusted()?;
        let start_offset = if !trusted {
            self.base_offset
        } else {
            let index = self.time_index.read();
            let i = index.partition_point(|e| e.timestamp_ms < timestamp_ms);
            if i == 0 {
                self.base_offset
            } else {
                self.base_offset + u64::from(index.get(i - 1).relative_offset)
            }
        };
        let Some(mut position) = self.locate(start_offset, end_offset)? else {
            return Ok(None);
        };
        let limit = self.size_bytes();
        while let Some(header) = self.header_at(position, limit)? {
            if header.base_offset >= end_offset {
                return Ok(None);
            }
            if header.max_timestamp_ms >= timestamp_ms {
                return Ok(Some((header, position)));
            }
            position += header.size_bytes();
        }
        Ok(None)
    }

    /// Checks (once) that every time-index entry bounds the max timestamps of all batches
    /// before the offset it names. Entries added after the check were written by this
    /// process and need none.
    fn time_index_trusted(&self) -> Result<bool> {
        match self.time_index_state.load(Ordering::Acquire) {
            TIME_INDEX_VALID => return Ok(true),
            TIME_INDEX_DAMAGED => return Ok(false),
            _ => {}
        }
        let entries: Vec<TimeEntry> = {
            let index = self.time_index.read();
            (0..index.len()).map(|i| index.get(i)).collect()
        };
        let limit = self.size_bytes();
        let mut position = 0;
        let mut prefix_max = i64::MIN;
        let mut next_offset = self.base_offset;
        let mut valid = true;
        let mut entries = entries.iter().peekable();
        loop {
            // Entries naming this offset bound every batch before it.
            while let Some(entry) = entries.next_if(|e| self.base_offset + u64::from(e.relative_offset) <= next_offset)
            {
                valid &= entry.timestamp_ms >= prefix_max;
            }
            let Some(header) = self.header_at(position, limit)? else { break };
            prefix_max = prefix_max.max(header.max_timestamp_ms);
            next_offset = header.next_offset();
            position += header.size_bytes();
        }
        // Entries past the walked batches were appended meanwhile (or name offsets the log
        // does not hold, which the open-time checks reject).
        let state = if valid { TIME_INDEX_VALID } else { TIME_INDEX_DAMAGED };
        self.time_index_state.store(state, Ordering::Release);
        Ok(valid)
    }

    /// Calls `visit` with the header of every batch from the one containing `from_offset`
    /// up to (not including) `end_offset` (recovery replays producer state this way).
    pub fn visit_headers(&self, from_offset: u64, end_offset: u64, mut visit: impl FnMut(&BatchHeader)) -> Result<()> {
        let Some(mut position) = self.locate(from_offset.max(self.base_offset), end_offset)? else {
            return Ok(());
        };
        let limit = self.size_bytes();
        while let Some(header) = self.header_at(position, limit)? {
            if header.base_offset >= end_offset {
                break;
            }
            visit(&header);
            position += header.size_bytes();
        }
        Ok(())
    }

    fn window(&self, position: u64, len: u64) -> Result<Bytes> {
        if let Some(map) = self.sealed.get() {
            let end = (position + len).min(map.len() as u64);
            return Ok(map.slice(position as usize..end as usize));
        }
        let mut buf = BytesMut::zeroed(len as usize);
        self.log.read_exact_at(&mut buf, position)?;
        Ok(buf.freeze())
    }

    fn header_at(&self, position: u64, limit: u64) -> Result<Option<BatchHeader>> {
        if position + BATCH_HEADER_SIZE as u64 > limit {
            return Ok(None);
        }
        let window = self.window(position, BATCH_HEADER_SIZE as u64)?;
        BatchHeader::parse(&window).map(Some).map_err(|e| self.corrupt(position, e))
    }

    fn corrupt(&self, position: u64, error: Error) -> Error {
        self.corrupt_at(position, error.to_string())
    }

    fn corrupt_at(&self, position: u64, reason: String) -> Error {
        Error::Corrupt { path: self.log_path.clone(), pos: position, reason }
    }

    /// Removes the segment's files (retention, topic deletion). Existing readers keep
    /// their views: removal unlinks, it never truncates.
    pub fn remove_files(&self, storage: &dyn Storage) -> Result<()> {
        for path in [self.log_path.clone(), sibling(&self.log_path, "index"), sibling(&self.log_path, "timeindex")] {
            if storage.exists(&path) {
                storage.remove_file(&path)?;
            }
        }
        Ok(())
    }
}

/// How a segment is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenKind {
    /// A sealed segment followed by one starting at `end_offset`; after a clean shutdown
    /// its indices are validated, otherwise it is trusted only if it was sealed (synced)
    /// before the crash, which every non-last segment is.
    Sealed {
        /// Base offset of the next segment.
        end_offset: u64,
    },
    /// The last segment after a clean shutdown: validate indices, keep appending.
    ActiveClean,
    /// The last segment after a crash: scan every batch, truncate at the first invalid
    /// one, rebuild indices.
    ActiveRecover,
}
