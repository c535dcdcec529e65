//! The priority cursor's state file: two fixed-size slots overwritten in place, alternately
//! ("Priority cursor state file v2" in `docs/format.md`).
//!
//! Each write goes to the slot that does not hold the newest state, then `fdatasync`s. The
//! file's blocks are written once when it is created, so a slot overwrite changes no file
//! metadata: the sync is one data write and a device flush, without a journal commit. (The
//! atomic-rename scheme of version 1 needed a new file, a rename and a directory sync per
//! state change; a journal commit also waits for other files' freshly allocated data, which
//! made every ack as slow as the busiest log on the file system.) A torn slot fails its
//! checksums and the other slot, synced before this write began, is the state. When a
//! state outgrows its slot the file is replaced atomically by one with larger slots.
//!
//! It owns: the slot layout, choosing the newest valid slot, growing the file, and reading
//! the version-1 file (one state, replaced atomically) that earlier builds wrote.
//! It must never: interpret the state (that is `state.rs`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::state::{self, CursorState};
use crate::error::{Error, Result};
use crate::io::{OpenMode, Storage, StorageFile};

/// Magic of a slot: ASCII `RPCW`.
pub const SLOT_MAGIC: [u8; 4] = *b"RPCW";
/// Version of the slotted file this build writes.
pub const SLOT_VERSION: u16 = 2;
/// Slot header: magic (4).
pub const SLOT_HEADER_MAGIC: usize = 0;
/// Version (u16).
pub const SLOT_HEADER_VERSION: usize = SLOT_HEADER_MAGIC + 4;
/// Reserved (u16, zero).
pub const SLOT_HEADER_RESERVED: usize = SLOT_HEADER_VERSION + 2;
/// Size of each slot in bytes (u32, a power of two ≥ [`SLOT_SIZE_MIN`]).
pub const SLOT_HEADER_SLOT_SIZE: usize = SLOT_HEADER_RESERVED + 2;
/// Sequence number of the write (u64); the valid slot with the larger one is current.
pub const SLOT_HEADER_SEQUENCE: usize = SLOT_HEADER_SLOT_SIZE + 4;
/// Length of the state that follows the header (u32).
pub const SLOT_HEADER_LEN: usize = SLOT_HEADER_SEQUENCE + 8;
/// CRC-32 of the header bytes before it and of the state (u32).
pub const SLOT_HEADER_CRC: usize = SLOT_HEADER_LEN + 4;
/// Size of a slot header; the state (a "Priority cursor state v1" encoding) follows it.
pub const SLOT_HEADER_SIZE: usize = SLOT_HEADER_CRC + 4;
/// Smallest slot.
pub const SLOT_SIZE_MIN: usize = 4096;
/// Largest slot (1 GiB): bounds what opening a damaged file may allocate. A state needs
/// 24 bytes per lane partition plus 8 per settled and 40 per failed offset above the
/// committed one, so a cursor reaches this only with millions of out-of-order settlements.
pub const SLOT_SIZE_MAX: usize = 1 << 30;

/// An open state file, ready for the next write.
#[derive(Debug)]
pub(crate) struct StateFile {
    path: PathBuf,
    /// Open file and its slot size; `None` until the first write (or after a version-1 file
    /// was read: the first write converts it).
    file: Option<(Arc<dyn StorageFile>, usize)>,
    /// Sequence of the newest state on disk.
    sequence: u64,
}

impl StateFile {
    /// Reads the newest valid state of `path` (`None` if the file does not exist).
    pub(crate) fn open(storage: &dyn Storage, path: &Path) -> Result<(StateFile, Option<CursorState>)> {
        let mut this = StateFile { path: path.to_path_buf(), file: None, sequence: 0 };
        if !storage.exists(path) {
            return Ok((this, None));
        }
        let bytes = crate::io::read_bounded(storage, path, 2 * SLOT_SIZE_MAX as u64)?;
        let (sequence, decoded) = decode_file(&bytes).map_err(|e| Error::Corrupt {
            path: path.to_path_buf(),
            pos: 0,
            reason: e.to_string(),
        })?;
        if let Some(sequence) = sequence {
            this.sequence = sequence;
            this.file = Some((storage.open(path, OpenMode::ReadWrite)?, bytes.len() / 2));
        }
        Ok((this, Some(decoded)))
    }

    /// Makes `state` (encoded with [`state::encode`]) the file's newest state, durably.
    pub(crate) fn write(&mut self, storage: &dyn Storage, encoded: &[u8]) -> Result<()> {
        let sequence = self.sequence + 1;
        let needed = SLOT_HEADER_SIZE + encoded.len();
        match &self.file {
            Some((file, slot_size)) if needed <= *slot_size => {
                let slot = encode_slot(*slot_size, sequence, encoded);
                let offset = (sequence % 2) * *slot_size as u64;
                file.write_all_at_and_sync(&slot, offset)?;
            }
            _ => self.replace(storage, sequence, encoded, needed)?,
        }
        self.sequence = sequence;
        Ok(())
    }

    /// Writes a new file whose slots fit `needed` bytes with room to grow, and renames it
    /// over the old one.
    fn replace(&mut self, storage: &dyn Storage, sequence: u64, encoded: &[u8], needed: usize) -> Result<()> {
        let slot_size = (2 * needed).next_power_of_two().max(SLOT_SIZE_MIN);
        if slot_size > SLOT_SIZE_MAX {
            return Err(Error::LimitExceeded {
                limit: "priority cursor state size",
                max: SLOT_SIZE_MAX as u64,
                actual: slot_size as u64,
            });
        }
        // Both slots are written in full, so every block of the file is allocated now and
        // later overwrites change no metadata. The other slot stays invalid (zeros).
        let mut bytes = vec![0u8; 2 * slot_size];
        let slot = encode_slot(slot_size, sequence, encoded);
        let at = (sequence % 2) as usize * slot_size;
        bytes[at..at + slot.len()].copy_from_slice(&slot);
        self.file = None;
        crate::io::write_atomically(storage, &self.path, &bytes)?;
        self.file = Some((storage.open(&self.path, OpenMode::ReadWrite)?, slot_size));
        Ok(())
    }
}

/// Decodes a whole state file: the newest valid slot of a version-2 file (with its
/// sequence), or the state of a version-1 file (no sequence). Pure; fuzzed.
pub fn decode_file(bytes: &[u8]) -> Result<(Option<u64>, CursorState)> {
    if bytes.starts_with(&state::STATE_MAGIC) {
        // Version 1: the whole file is one state.
        return Ok((None, state::decode(bytes)?));
    }
    let slot_size = bytes.len() / 2;
    let sane = bytes.len().is_multiple_of(2) && slot_size.is_power_of_two() && slot_size >= SLOT_SIZE_MIN;
    if !sane {
        return Err(Error::malformed(format!("{} bytes is not two priority cursor state slots", bytes.len())));
    }
    let (first, second) = bytes.split_at(slot_size);
    let (sequence, decoded) = match (decode_slot(first, slot_size), decode_slot(second, slot_size)) {
        (Ok(a), Ok(b)) => {
            if a.0 >= b.0 {
                a
            } else {
                b
            }
        }
        (Ok(a), Err(_)) => a,
        (Err(_), Ok(b)) => b,
        (Err(a), Err(b)) => {
            return Err(Error::malformed(format!("no valid priority cursor state slot: first {a}; second {b}")))
        }
    };
    Ok((Some(sequence), decoded))
}

/// One slot's bytes (header and state; the rest of the slot is left as it is).
fn encode_slot(slot_size: usize, sequence: u64, encoded: &[u8]) -> Vec<u8> {
    let mut slot = Vec::with_capacity(SLOT_HEADER_SIZE + encoded.len());
    slot.extend_from_slice(&SLOT_MAGIC);
    slot.extend_from_slice(&SLOT_VERSION.to_le_bytes());
    slot.extend_from_slice(&0u16.to_le_bytes());
    slot.extend_from_slice(&u32::try_from(slot_size).expect("slot size ≤ SLOT_SIZE_MAX").to_le_bytes());
    slot.extend_from_slice(&sequence.to_le_bytes());
    slot.extend_from_slice(&u32::try_from(encoded.len()).expect("state < slot size").to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&slot);
    crc.update(encoded);
    slot.extend_from_slice(&crc.finalize().to_le_bytes());
    slot.extend_from_slice(encoded);
    debug_assert_eq!(slot.len(), SLOT_HEADER_SIZE + encoded.len());
    slot
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// A slot's sequence and state, or why it is not valid.
fn decode_slot(slot: &[u8], slot_size: usize) -> Result<(u64, CursorState)> {
    let bad = |reason: &str| Error::malformed(format!("priority cursor state slot: {reason}"));
    if slot[SLOT_HEADER_MAGIC..SLOT_HEADER_VERSION] != SLOT_MAGIC {
        return Err(bad("bad magic (never written, or torn)"));
    }
    let len = le_u32(slot, SLOT_HEADER_LEN) as usize;
    if len > slot_size - SLOT_HEADER_SIZE {
        return Err(bad("state longer than the slot"));
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&slot[..SLOT_HEADER_CRC]);
    crc.update(&slot[SLOT_HEADER_SIZE..SLOT_HEADER_SIZE + len]);
    let (expected, actual) = (le_u32(slot, SLOT_HEADER_CRC), crc.finalize());
    if expected != actual {
        return Err(Error::ChecksumMismatch { expected, actual });
    }
    let version = u16::from_le_bytes([slot[SLOT_HEADER_VERSION], slot[SLOT_HEADER_VERSION + 1]]);
    if version != SLOT_VERSION {
        let (found, supported) = (u32::from(version), u32::from(SLOT_VERSION));
        return Err(Error::UnsupportedVersion { what: "priority cursor state file", found, supported });
    }
    let reserved = u16::from_le_bytes([slot[SLOT_HEADER_RESERVED], slot[SLOT_HEADER_RESERVED + 1]]);
    if reserved != 0 || le_u32(slot, SLOT_HEADER_SLOT_SIZE) as usize != slot_size {
        return Err(bad("reserved bytes set or slot size differs from the file's"));
    }
    let sequence = u64::from_le_bytes(slot[SLOT_HEADER_SEQUENCE..SLOT_HEADER_LEN].try_into().expect("8 bytes"));
    let decoded = state::decode(&slot[SLOT_HEADER_SIZE..SLOT_HEADER_SIZE + len])?;
    Ok((sequence, decoded))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cursor::priority::state::Failure;
    use crate::io::StdStorage;

    fn sample(committed: u64) -> CursorState {
        let mut s = CursorState::new(2, 3);
        s.queues[4].committed = committed;
        s.queues[4].settled.insert(committed + 2);
        let failure = Failure { failures: 2, visible_at_ms: 9, first_failure_ms: 1, last_failure_ms: 5 };
        s.queues[1].failed.insert(7, failure);
        s
    }

    fn reopen(path: &Path) -> Option<CursorState> {
        StateFile::open(&StdStorage, path).expect("opens").1
    }

    #[test]
    fn writes_alternate_slots_and_the_newest_valid_one_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.cursor");
        let (mut file, none) = StateFile::open(&StdStorage, &path).expect("opens");
        assert!(none.is_none());
        for committed in 0..5 {
            file.write(&StdStorage, &state::encode(&sample(committed))).expect("write");
            assert_eq!(reopen(&path), Some(sample(committed)));
        }
        assert_eq!(std::fs::metadata(&path).expect("metadata").len(), 2 * SLOT_SIZE_MIN as u64);
        // Tear the newest slot (sequence 5 is in slot 1): the previous state is read.
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[SLOT_SIZE_MIN + SLOT_HEADER_SIZE + 3] ^= 0x40;
        std::fs::write(&path, &bytes).expect("write");
        assert_eq!(reopen(&path), Some(sample(3)));
        // Both torn: a clear corruption error, never an empty state.
        bytes[SLOT_HEADER_SIZE + 3] ^= 0x40;
        std::fs::write(&path, &bytes).expect("write");
        assert!(matches!(StateFile::open(&StdStorage, &path), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn a_state_that_outgrows_its_slot_moves_to_a_larger_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.cursor");
        let (mut file, _) = StateFile::open(&StdStorage, &path).expect("opens");
        file.write(&StdStorage, &state::encode(&sample(1))).expect("write");
        let mut big = sample(1);
        big.queues[0].settled.extend((10..2_000).step_by(2));
        file.write(&StdStorage, &state::encode(&big)).expect("write grows the file");
        let len = std::fs::metadata(&path).expect("metadata").len();
        assert!(len > 2 * SLOT_SIZE_MIN as u64 && (len / 2).is_power_of_two());
        assert_eq!(reopen(&path), Some(big.clone()));
        file.write(&StdStorage, &state::encode(&sample(9))).expect("write in place again");
        assert_eq!(reopen(&path), Some(sample(9)));
    }

    /// A version-1 file (one state, as earlier builds wrote it) is read, and the first write
    /// converts it.
    #[test]
    fn reads_and_converts_a_version_1_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.cursor");
        std::fs::write(&path, state::encode(&sample(4))).expect("write v1");
        let (mut file, read) = StateFile::open(&StdStorage, &path).expect("opens v1");
        assert_eq!(read, Some(sample(4)));
        file.write(&StdStorage, &state::encode(&sample(6))).expect("write");
        let bytes = std::fs::read(&path).expect("read");
        assert!(bytes[SLOT_SIZE_MIN..].starts_with(&SLOT_MAGIC), "sequence 1 is in slot 1");
        assert_eq!(reopen(&path), Some(sample(6)));
    }

    #[test]
    fn rejects_files_that_are_not_two_slots() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.cursor");
        for len in [0usize, 100, 3 * SLOT_SIZE_MIN, 2 * SLOT_SIZE_MIN + 2] {
            std::fs::write(&path, vec![0u8; len]).expect("write");
            assert!(matches!(StateFile::open(&StdStorage, &path), Err(Error::Corrupt { .. })), "length {len}");
        }
        // A slot from a future version is not read as valid.
        let (mut file, _) = StateFile::open(&StdStorage, &path.with_extension("new")).expect("opens");
        file.write(&StdStorage, &state::encode(&sample(1))).expect("write");
        let mut bytes = std::fs::read(path.with_extension("new")).expect("read");
        let at = SLOT_SIZE_MIN + SLOT_HEADER_VERSION;
        bytes[at] = 3;
        std::fs::write(&path, &bytes).expect("write");
        assert!(matches!(StateFile::open(&StdStorage, &path), Err(Error::Corrupt { .. })));
    }
}
