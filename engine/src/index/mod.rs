//! Sparse, memory-mapped segment indices: the offset index (`.index`) and the time index
//! (`.timeindex`). Layouts are normative in `docs/format.md`.
//!
//! It owns: the entry encoding, the map, binary search, trimming.
//! It must never: be trusted. Indices are caches of the `.log` file; `segment/` validates
//! them on open and rebuilds them from the log when they are missing or inconsistent.

use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::Result;
use crate::io::{OpenMode, Storage, StorageFile, WriteMap};

/// One fixed-size index entry.
pub trait IndexEntry: Copy + std::fmt::Debug {
    /// Encoded size in bytes.
    const SIZE: usize;
    /// Decodes an entry from exactly `SIZE` bytes.
    fn decode(buf: &[u8]) -> Self;
    /// Encodes into exactly `SIZE` bytes.
    fn encode(&self, buf: &mut [u8]);
}

/// Offset index entry: a batch's base offset (relative to the segment) and its byte position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffsetEntry {
    /// Batch base offset minus the segment's base offset.
    pub relative_offset: u32,
    /// Byte position of the batch in the `.log` file.
    pub position: u32,
}

/// Offset of `relative_offset` in an offset index entry.
pub const OFFSET_ENTRY_RELATIVE_OFFSET: usize = 0;
/// Offset of `position` in an offset index entry.
pub const OFFSET_ENTRY_POSITION: usize = OFFSET_ENTRY_RELATIVE_OFFSET + 4;
/// Size of an offset index entry.
pub const OFFSET_ENTRY_SIZE: usize = OFFSET_ENTRY_POSITION + 4;

impl IndexEntry for OffsetEntry {
    const SIZE: usize = OFFSET_ENTRY_SIZE;
    fn decode(buf: &[u8]) -> Self {
        OffsetEntry {
            relative_offset: u32::from_le_bytes(buf[OFFSET_ENTRY_RELATIVE_OFFSET..][..4].try_into().expect("4 bytes")),
            position: u32::from_le_bytes(buf[OFFSET_ENTRY_POSITION..][..4].try_into().expect("4 bytes")),
        }
    }
    fn encode(&self, buf: &mut [u8]) {
        buf[OFFSET_ENTRY_RELATIVE_OFFSET..][..4].copy_from_slice(&self.relative_offset.to_le_bytes());
        buf[OFFSET_ENTRY_POSITION..][..4].copy_from_slice(&self.position.to_le_bytes());
    }
}

/// Time index entry: every batch of the segment whose base offset is below
/// `segment base + relative_offset` has a max timestamp of at most `timestamp_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeEntry {
    /// Upper bound of the max timestamps of the batches before `relative_offset`.
    pub timestamp_ms: i64,
    /// Relative offset of the first batch not covered by the bound.
    pub relative_offset: u32,
}

/// Offset of `timestamp_ms` in a time index entry.
pub const TIME_ENTRY_TIMESTAMP: usize = 0;
/// Offset of `relative_offset` in a time index entry.
pub const TIME_ENTRY_RELATIVE_OFFSET: usize = TIME_ENTRY_TIMESTAMP + 8;
/// Size of a time index entry.
pub const TIME_ENTRY_SIZE: usize = TIME_ENTRY_RELATIVE_OFFSET + 4;

impl IndexEntry for TimeEntry {
    const SIZE: usize = TIME_ENTRY_SIZE;
    fn decode(buf: &[u8]) -> Self {
        TimeEntry {
            timestamp_ms: i64::from_le_bytes(buf[TIME_ENTRY_TIMESTAMP..][..8].try_into().expect("8 bytes")),
            relative_offset: u32::from_le_bytes(buf[TIME_ENTRY_RELATIVE_OFFSET..][..4].try_into().expect("4 bytes")),
        }
    }
    fn encode(&self, buf: &mut [u8]) {
        buf[TIME_ENTRY_TIMESTAMP..][..8].copy_from_slice(&self.timestamp_ms.to_le_bytes());
        buf[TIME_ENTRY_RELATIVE_OFFSET..][..4].copy_from_slice(&self.relative_offset.to_le_bytes());
    }
}

/// A memory-mapped index file of `E` entries. While a segment is active the file is
/// preallocated to its capacity; `entries` counts the valid prefix.
#[derive(Debug)]
pub struct Index<E: IndexEntry> {
    file: Arc<dyn StorageFile>,
    path: PathBuf,
    map: WriteMap,
    entries: usize,
    capacity: usize,
    _entry: PhantomData<E>,
}

impl<E: IndexEntry> Index<E> {
    /// Creates an empty index preallocated for `capacity_bytes`, replacing any file there.
    pub fn create(storage: &dyn Storage, path: &Path, capacity_bytes: u64) -> Result<Self> {
        if storage.exists(path) {
            storage.remove_file(path)?;
        }
        let file = storage.open(path, OpenMode::CreateNew)?;
        let capacity = (capacity_bytes / E::SIZE as u64) as usize;
        // Allocated, not just sized: entries are written through the map, where a full disk
        // would be a SIGBUS instead of an error.
        file.allocate((capacity * E::SIZE) as u64)?;
        let map = file.map_write()?;
        Ok(Index { file, path: path.to_path_buf(), map, entries: 0, capacity, _entry: PhantomData })
    }

    /// Opens a trimmed index: every entry in the file counts. Returns `None` when the file
    /// is missing or its length is not a whole number of entries (the caller rebuilds).
    pub fn open_trimmed(storage: &dyn Storage, path: &Path) -> Result<Option<Self>> {
        if !storage.exists(path) {
            return Ok(None);
        }
        let file = storage.open(path, OpenMode::ReadWrite)?;
        let len = file.len()?;
        if len % E::SIZE as u64 != 0 {
            return Ok(None);
        }
        let entries = (len / E::SIZE as u64) as usize;
        let map = file.map_write()?;
        Ok(Some(Index { file, path: path.to_path_buf(), map, entries, capacity: entries, _entry: PhantomData }))
    }

    /// Number of valid entries.
    pub fn len(&self) -> usize {
        self.entries
    }

    /// Entries the file has room for.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether the index has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Entry `i` (must be below `len()`).
    pub fn get(&self, i: usize) -> E {
        debug_assert!(i < self.entries, "index entry {i} out of {}", self.entries);
        E::decode(&self.map.as_slice()[i * E::SIZE..(i + 1) * E::SIZE])
    }

    /// The last entry, if any.
    pub fn last(&self) -> Option<E> {
        self.entries.checked_sub(1).map(|i| self.get(i))
    }

    /// Index of the first entry for which `pred` is false, given that `pred` is true for a
    /// prefix of the entries and false after it (binary search).
    pub fn partition_point(&self, pred: impl Fn(&E) -> bool) -> usize {
        let (mut lo, mut hi) = (0, self.entries);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if pred(&self.get(mid)) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// Appends an entry; returns `false` (and writes nothing) when the index is full.
    pub fn push(&mut self, entry: E) -> bool {
        if self.entries == self.capacity {
            return false;
        }
        let at = self.entries * E::SIZE;
        entry.encode(&mut self.map.as_mut_slice()[at..at + E::SIZE]);
        self.entries += 1;
        true
    }

    /// Whether no entry can be added.
    pub fn is_full(&self) -> bool {
        self.entries == self.capacity
    }

    /// Shrinks the file to the valid entries and makes it durable (done when sealing).
    pub fn trim(&mut self) -> Result<()> {
        self.map.flush(&self.path)?;
        self.resize((self.entries * E::SIZE) as u64)?;
        self.capacity = self.entries;
        self.file.sync_data()
    }

    /// Grows a trimmed index back to `capacity_bytes` so entries can be appended again
    /// (the active segment after a clean restart).
    pub fn reopen_for_append(&mut self, capacity_bytes: u64) -> Result<()> {
        let capacity = ((capacity_bytes / E::SIZE as u64) as usize).max(self.entries);
        self.resize((capacity * E::SIZE) as u64)?;
        self.capacity = capacity;
        Ok(())
    }

    /// Writes dirty pages back to the file.
    pub fn flush(&self) -> Result<()> {
        self.map.flush(&self.path)
    }

    fn resize(&mut self, len: u64) -> Result<()> {
        // The map must not outlive a change of the file's length (io/mmap.rs invariant 3):
        // replace it with an empty one first, then resize, then map again.
        self.map = WriteMap::empty();
        if len > self.file.len()? {
            // Growing: allocate the blocks the map will write (see `create`).
            self.file.allocate(len)?;
        } else {
            self.file.set_len(len)?;
        }
        self.map = self.file.map_write()?;
        Ok(())
    }
}
