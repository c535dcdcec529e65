//! The leader-epoch cache of a partition: for each leader epoch that wrote (or could have
//! written) to the log, the offset of its first record. Followers ask a new leader "where
//! does my last epoch end on your log?" and cut their log there (Kafka's KIP-101/279), so
//! a divergent suffix written under an older leader is never kept.
//!
//! Durable in `leader-epoch.checkpoint` (format in `docs/format.md`, "Leader-epoch
//! checkpoint v1"), rewritten atomically on every change. Changes are rare: one per
//! leadership change, plus truncations.
//!
//! Epoch 0 is a single node's: it is never recorded. Batches before the first recorded
//! epoch are epoch 0, so a log that was never replicated has no checkpoint file at all.

use std::path::Path;

use crate::error::{Error, Result};
use crate::format::envelope;
use crate::io::Storage;

/// Magic bytes: ASCII `REPC`.
pub const EPOCHS_MAGIC: [u8; 4] = *b"REPC";
/// Version this build writes and reads.
pub const EPOCHS_VERSION: u16 = 1;
/// File name inside the partition directory.
pub const EPOCHS_FILE: &str = "leader-epoch.checkpoint";
/// Most epochs a partition remembers; older ones are forgotten first (a follower that far
/// behind is answered from the oldest kept entry, which only cuts more, never less).
pub const EPOCHS_MAX: usize = 4_096;
const ENTRY_SIZE: usize = 4 + 8;
const FILE_SIZE_BYTES_MAX: u64 = (envelope::PREAMBLE_SIZE + 4 + EPOCHS_MAX * ENTRY_SIZE + envelope::CRC_SIZE) as u64;

/// One epoch and the offset of its first record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochEntry {
    /// Leader epoch.
    pub epoch: u32,
    /// Offset of the first record written in this epoch (or the log end when the epoch
    /// began, if it wrote nothing yet).
    pub start_offset: u64,
}

/// The cache: entries with strictly increasing epochs and non-decreasing start offsets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EpochCache {
    entries: Vec<EpochEntry>,
}

impl EpochCache {
    /// The entries, oldest first.
    pub fn entries(&self) -> &[EpochEntry] {
        &self.entries
    }

    /// The newest epoch, if any.
    pub fn latest(&self) -> Option<EpochEntry> {
        self.entries.last().copied()
    }

    /// Records that `epoch` starts at `start_offset`. Returns whether the cache changed.
    /// An epoch already present is kept as it is; entries that start at or after
    /// `start_offset` under older epochs are dropped (they wrote nothing that is still
    /// in the log). An epoch older than the newest is refused.
    pub fn assign(&mut self, epoch: u32, start_offset: u64) -> Result<bool> {
        if epoch == 0 {
            return Ok(false);
        }
        if let Some(latest) = self.latest() {
            if epoch == latest.epoch {
                return Ok(false);
            }
            if epoch < latest.epoch {
                return Err(Error::StaleLeaderEpoch { epoch, latest: latest.epoch });
            }
        }
        self.entries.retain(|e| e.start_offset < start_offset);
        self.entries.push(EpochEntry { epoch, start_offset });
        if self.entries.len() > EPOCHS_MAX {
            self.entries.remove(0);
        }
        Ok(true)
    }

    /// Kafka's OffsetsForLeaderEpoch answer: the largest epoch not above `epoch` and the
    /// offset where it ends on this log (the start of the next epoch, or `log_end` for the
    /// newest). Below the first recorded epoch lies epoch 0.
    pub fn end_offset_for(&self, epoch: u32, log_end: u64) -> (u32, u64) {
        let i = self.entries.partition_point(|e| e.epoch <= epoch);
        let found = if i == 0 { 0 } else { self.entries[i - 1].epoch };
        let end = self.entries.get(i).map_or(log_end, |next| next.start_offset);
        (found, end)
    }

    /// The newest epoch (0 when none is recorded).
    pub fn latest_epoch(&self) -> u32 {
        self.latest().map_or(0, |e| e.epoch)
    }

    /// Forgets every epoch that starts at or after `end` (the log was cut there), keeping
    /// an epoch that begins exactly at the end only when `keep_at_end` is set.
    pub fn truncate_from_end(&mut self, end: u64, keep_at_end: bool) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| e.start_offset < end || (keep_at_end && e.start_offset == end));
        self.entries.len() != before
    }

    /// Loads the cache from `dir`; `None` when the file does not exist.
    pub fn load(storage: &dyn Storage, dir: &Path) -> Result<Option<EpochCache>> {
        let path = dir.join(EPOCHS_FILE);
        if !storage.exists(&path) {
            return Ok(None);
        }
        let buf = crate::io::read_bounded(storage, &path, FILE_SIZE_BYTES_MAX)?;
        decode(&buf).map(Some).map_err(|e| Error::Corrupt { path, pos: 0, reason: e.to_string() })
    }

    /// Writes the cache to `dir` atomically.
    pub fn persist(&self, storage: &dyn Storage, dir: &Path) -> Result<()> {
        crate::io::write_atomically(storage, &dir.join(EPOCHS_FILE), &encode(self))
    }
}

/// Encodes a checkpoint file.
pub fn encode(cache: &EpochCache) -> Vec<u8> {
    let mut buf = envelope::begin(EPOCHS_MAGIC, EPOCHS_VERSION, 4 + cache.entries.len() * ENTRY_SIZE);
    let count = u32::try_from(cache.entries.len()).expect("at most EPOCHS_MAX entries");
    buf.extend_from_slice(&count.to_le_bytes());
    for entry in &cache.entries {
        buf.extend_from_slice(&entry.epoch.to_le_bytes());
        buf.extend_from_slice(&entry.start_offset.to_le_bytes());
    }
    envelope::seal(buf)
}

/// Decodes a checkpoint file, checking its CRC, count and ordering.
pub fn decode(buf: &[u8]) -> Result<EpochCache> {
    let body =
        &envelope::open(buf, EPOCHS_MAGIC, EPOCHS_VERSION, "leader-epoch checkpoint")?[envelope::PREAMBLE_SIZE..];
    let bad = |reason: String| Error::MalformedBatch { reason: format!("leader-epoch checkpoint: {reason}") };
    let count_bytes: [u8; 4] = body.get(..4).and_then(|b| b.try_into().ok()).ok_or_else(|| bad("no count".into()))?;
    let count = u32::from_le_bytes(count_bytes) as usize;
    if count > EPOCHS_MAX {
        return Err(bad(format!("{count} entries, at most {EPOCHS_MAX}")));
    }
    let rest = &body[4..];
    if rest.len() != count * ENTRY_SIZE {
        return Err(bad(format!("{} bytes of entries for a count of {count}", rest.len())));
    }
    let mut cache = EpochCache::default();
    for chunk in rest.chunks_exact(ENTRY_SIZE) {
        let epoch = u32::from_le_bytes(chunk[..4].try_into().expect("4 bytes"));
        let start_offset = u64::from_le_bytes(chunk[4..].try_into().expect("8 bytes"));
        if let Some(last) = cache.latest() {
            if epoch <= last.epoch || start_offset < last.start_offset {
                return Err(bad(format!(
                    "entry ({epoch}, {start_offset}) is not after ({}, {})",
                    last.epoch, last.start_offset
                )));
            }
        }
        cache.entries.push(EpochEntry { epoch, start_offset });
    }
    Ok(cache)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(entries: &[(u32, u64)]) -> EpochCache {
        let mut c = EpochCache::default();
        for &(e, s) in entries {
            c.assign(e, s).expect("in order");
        }
        c
    }

    /// The answers of KIP-279: the end of an epoch is the start of the next one; an epoch
    /// between known ones answers the largest below it; the newest ends at the log end.
    #[test]
    fn end_offsets() {
        let c = cache(&[(1, 4), (3, 10), (4, 25)]);
        assert_eq!(c.end_offset_for(0, 40), (0, 4), "epoch 0 precedes the first entry");
        assert_eq!(c.end_offset_for(1, 40), (1, 10));
        assert_eq!(c.end_offset_for(2, 40), (1, 10));
        assert_eq!(c.end_offset_for(3, 40), (3, 25));
        assert_eq!(c.end_offset_for(4, 40), (4, 40));
        assert_eq!(c.end_offset_for(9, 40), (4, 40));
        assert_eq!(EpochCache::default().end_offset_for(0, 40), (0, 40), "a single node's log");
        let mut single = EpochCache::default();
        assert!(!single.assign(0, 7).expect("epoch 0"), "epoch 0 is never recorded");
    }

    /// A newer epoch starting where older ones wrote nothing replaces them; an older epoch
    /// is refused; the same epoch is a no-op.
    #[test]
    fn assign_rules() {
        let mut c = cache(&[(1, 0), (2, 10)]);
        assert!(!c.assign(2, 12).expect("same epoch"));
        assert!(matches!(c.assign(1, 12), Err(Error::StaleLeaderEpoch { epoch: 1, latest: 2 })));
        assert!(c.assign(5, 10).expect("newer"));
        assert_eq!(c.entries(), &[EpochEntry { epoch: 1, start_offset: 0 }, EpochEntry { epoch: 5, start_offset: 10 }]);
    }

    /// Cutting the log forgets the epochs that began at or after the cut.
    #[test]
    fn truncation() {
        let mut c = cache(&[(1, 0), (2, 10), (3, 20)]);
        assert!(!c.truncate_from_end(25, false));
        assert!(!c.truncate_from_end(20, true));
        assert_eq!(c.entries().len(), 3);
        assert!(c.truncate_from_end(10, false));
        assert_eq!(c.entries(), &[EpochEntry { epoch: 1, start_offset: 0 }]);
    }

    /// Encode and decode agree; every flipped byte, a short file and out-of-order entries
    /// are rejected.
    #[test]
    fn file_round_trip_and_damage() {
        let c = cache(&[(1, 0), (2, 10), (7, 10_000_000_000)]);
        let bytes = encode(&c);
        assert_eq!(decode(&bytes).expect("decodes"), c);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert!(decode(&bad).is_err(), "flip at {i}");
        }
        assert!(decode(&bytes[..bytes.len() - 1]).is_err());
        let unordered = EpochCache {
            entries: vec![EpochEntry { epoch: 2, start_offset: 5 }, EpochEntry { epoch: 1, start_offset: 9 }],
        };
        assert!(decode(&encode(&unordered)).is_err());
    }
}
