//! Committed consumer offsets: `consumer_offsets.meta` in the store directory, format v1 in
//! `docs/format.md` ("Consumer offsets v1"). Every commit rewrites the file atomically
//! (temporary file, fsync, rename, directory fsync) before it is acknowledged; commits that
//! arrive while one is being written are folded into the next write (group commit), so
//! many consumers committing at once cost one write, not one each.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::format::envelope;
use crate::io::Storage;
use crate::limits::{COMMITTED_OFFSETS_MAX, CONSUMER_GROUP_LEN_MAX, TOPIC_NAME_LEN_MAX};

/// Magic bytes: ASCII `RCOF`.
pub const OFFSETS_MAGIC: [u8; 4] = *b"RCOF";
/// Version this build writes and reads.
pub const OFFSETS_VERSION: u16 = 1;
const FILE_NAME: &str = "consumer_offsets.meta";
const HEADER_SIZE: usize = 12;
const ENTRY_FIXED_SIZE: usize = 2 + 2 + 4 + 8;
const FILE_SIZE_BYTES_MAX: u64 =
    (HEADER_SIZE + COMMITTED_OFFSETS_MAX * (ENTRY_FIXED_SIZE + CONSUMER_GROUP_LEN_MAX + TOPIC_NAME_LEN_MAX) + 4) as u64;

/// Key of a committed offset.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OffsetKey {
    /// Consumer group.
    pub group: String,
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
}

#[derive(Debug, Default)]
struct State {
    /// What readers see: committed (durable) offsets.
    durable: BTreeMap<OffsetKey, u64>,
    /// Commits waiting for the next write.
    pending: BTreeMap<OffsetKey, u64>,
    /// Generation of the last completed write, and whether one is running.
    written_generation: u64,
    next_generation: u64,
    writing: bool,
    failed: Option<String>,
}

/// The store's committed consumer offsets.
#[derive(Debug)]
pub struct ConsumerOffsets {
    storage: Arc<dyn Storage>,
    path: PathBuf,
    state: Mutex<State>,
    written: Condvar,
}

impl ConsumerOffsets {
    /// Loads the offsets of the store in `dir`.
    pub fn open(storage: Arc<dyn Storage>, dir: &Path) -> Result<Self> {
        let path = dir.join(FILE_NAME);
        let mut durable = BTreeMap::new();
        if storage.exists(&path) {
            let buf = crate::io::read_bounded(&*storage, &path, FILE_SIZE_BYTES_MAX)?;
            durable = decode(&buf).map_err(|e| Error::Corrupt { path: path.clone(), pos: 0, reason: e.to_string() })?;
        }
        Ok(ConsumerOffsets {
            storage,
            path,
            state: Mutex::new(State { durable, ..State::default() }),
            written: Condvar::new(),
        })
    }

    /// The committed offset of `group` for a partition.
    pub fn fetch(&self, group: &str, topic: &str, partition: u32) -> Option<u64> {
        let key = OffsetKey { group: group.to_string(), topic: topic.to_string(), partition };
        self.state.lock().durable.get(&key).copied()
    }

    /// Every committed offset of `group`.
    pub fn group(&self, group: &str) -> Vec<(OffsetKey, u64)> {
        let state = self.state.lock();
        state.durable.iter().filter(|(k, _)| k.group == group).map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// Every committed offset.
    pub fn all(&self) -> Vec<(OffsetKey, u64)> {
        self.state.lock().durable.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// Commits `offset` (the next offset the group will read) and returns once it is durable.
    pub fn commit(&self, group: &str, topic: &str, partition: u32, offset: u64) -> Result<()> {
        if group.is_empty() || group.len() > CONSUMER_GROUP_LEN_MAX {
            return Err(Error::InvalidConfig {
                reason: format!("consumer group name must be 1..={CONSUMER_GROUP_LEN_MAX} bytes"),
            });
        }
        let key = OffsetKey { group: group.to_string(), topic: topic.to_string(), partition };
        let mut state = self.state.lock();
        if !state.durable.contains_key(&key)
            && !state.pending.contains_key(&key)
            && state.durable.len() >= COMMITTED_OFFSETS_MAX
        {
            return Err(Error::LimitExceeded {
                limit: "COMMITTED_OFFSETS_MAX",
                max: COMMITTED_OFFSETS_MAX as u64,
                actual: state.durable.len() as u64 + 1,
            });
        }
        state.pending.insert(key, offset);
        let my_generation = state.next_generation + 1;
        // Wait until a write that started after this commit completes, doing it ourselves
        // when no write is running.
        loop {
            if let Some(cause) = &state.failed {
                return Err(Error::Poisoned { partition: "consumer offsets".into(), cause: cause.clone() });
            }
            if state.written_generation >= my_generation {
                return Ok(());
            }
            if !state.writing {
                self.write_pending(&mut state);
                continue;
            }
            self.written.wait(&mut state);
        }
    }

    fn write_pending(&self, state: &mut parking_lot::MutexGuard<'_, State>) {
        state.writing = true;
        state.next_generation += 1;
        let generation = state.next_generation;
        let mut next = state.durable.clone();
        next.append(&mut std::mem::take(&mut state.pending));
        let bytes = encode(&next);
        let result = parking_lot::MutexGuard::unlocked(state, || {
            crate::io::write_atomically(&*self.storage, &self.path, &bytes)
        });
        state.writing = false;
        match result {
            Ok(()) => {
                state.durable = next;
                state.written_generation = generation;
            }
            // Like a failed fsync of the log, a failed write leaves the file's state unknown:
            // refuse further commits until the store is reopened.
            Err(e) => state.failed = Some(e.to_string()),
        }
        self.written.notify_all();
    }
}

/// Encodes a consumer offsets file (public for the fuzz targets' round trip).
pub fn encode(offsets: &BTreeMap<OffsetKey, u64>) -> Vec<u8> {
    let mut buf = envelope::begin(OFFSETS_MAGIC, OFFSETS_VERSION, 4 + offsets.len() * 48);
    let count = u32::try_from(offsets.len()).expect("bounded by COMMITTED_OFFSETS_MAX");
    buf.extend_from_slice(&count.to_le_bytes());
    for (key, offset) in offsets {
        let group_len = u16::try_from(key.group.len()).expect("bounded by CONSUMER_GROUP_LEN_MAX");
        let topic_len = u16::try_from(key.topic.len()).expect("bounded by TOPIC_NAME_LEN_MAX");
        buf.extend_from_slice(&group_len.to_le_bytes());
        buf.extend_from_slice(key.group.as_bytes());
        buf.extend_from_slice(&topic_len.to_le_bytes());
        buf.extend_from_slice(key.topic.as_bytes());
        buf.extend_from_slice(&key.partition.to_le_bytes());
        buf.extend_from_slice(&offset.to_le_bytes());
    }
    envelope::seal(buf)
}

/// Decodes a consumer offsets file.
pub fn decode(buf: &[u8]) -> Result<BTreeMap<OffsetKey, u64>> {
    let bad = |reason: &str| Error::MalformedBatch { reason: format!("consumer offsets: {reason}") };
    let body = envelope::open(buf, OFFSETS_MAGIC, OFFSETS_VERSION, "consumer offsets")?;
    if body.len() < HEADER_SIZE {
        return Err(bad("shorter than its header"));
    }
    let count = u32::from_le_bytes(body[8..12].try_into().expect("4 bytes")) as usize;
    if count > COMMITTED_OFFSETS_MAX {
        return Err(bad("too many entries"));
    }
    let mut rest = &body[HEADER_SIZE..];
    let mut take = |n: usize| -> Result<&[u8]> {
        if rest.len() < n {
            return Err(bad("truncated"));
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let mut out = BTreeMap::new();
    for _ in 0..count {
        let group_len = usize::from(u16::from_le_bytes(take(2)?.try_into().expect("2 bytes")));
        let group = std::str::from_utf8(take(group_len)?).map_err(|_utf8| bad("group is not UTF-8"))?.to_string();
        let topic_len = usize::from(u16::from_le_bytes(take(2)?.try_into().expect("2 bytes")));
        let topic = std::str::from_utf8(take(topic_len)?).map_err(|_utf8| bad("topic is not UTF-8"))?.to_string();
        let partition = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes"));
        let offset = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
        if group.is_empty() || group.len() > CONSUMER_GROUP_LEN_MAX || topic.len() > TOPIC_NAME_LEN_MAX {
            return Err(bad("entry out of range"));
        }
        if out.insert(OffsetKey { group, topic, partition }, offset).is_some() {
            return Err(bad("duplicate entry"));
        }
    }
    if !rest.is_empty() {
        return Err(bad("trailing bytes"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::StdStorage;

    /// Commits are durable across reopen; concurrent commits all land; damage is detected.
    #[test]
    fn commits_survive_reopen_and_damage_is_detected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage: Arc<dyn Storage> = Arc::new(StdStorage);
        let offsets = Arc::new(ConsumerOffsets::open(Arc::clone(&storage), dir.path()).expect("open"));
        let threads: Vec<_> = (0..8u32)
            .map(|t| {
                let offsets = Arc::clone(&offsets);
                std::thread::spawn(move || {
                    for i in 0..20u64 {
                        offsets.commit("g", "orders", t, i).expect("commit");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        offsets.commit("other", "orders", 0, 5).expect("commit");
        drop(offsets);
        let offsets = ConsumerOffsets::open(Arc::clone(&storage), dir.path()).expect("reopen");
        for t in 0..8 {
            assert_eq!(offsets.fetch("g", "orders", t), Some(19));
        }
        assert_eq!(offsets.fetch("other", "orders", 0), Some(5));
        assert_eq!(offsets.fetch("nobody", "orders", 0), None);
        assert_eq!(offsets.group("g").len(), 8);
        let buf = std::fs::read(dir.path().join(FILE_NAME)).expect("read");
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 4;
            assert!(decode(&bad).is_err(), "flip at {i}");
        }
    }
}
