//! The durable Raft log and vote: openraft's `RaftLogStorage` over `raft.log` and `vote`.
//!
//! Owns the controller directory's log file (append-only records, cut at the first bad one
//! on open; truncation cuts the file, purging rewrites it through a temporary file) and the
//! vote file. An append is acknowledged to openraft only after its fdatasync. A failed write
//! or sync poisons the store: every later call fails until the controller is restarted.
//! Must never interpret commands (that is `state.rs`), nor touch the applied-state file.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::File;
use std::ops::RangeBounds;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{Entry, LogId, LogState, RaftLogReader, StorageError, StorageIOError, Vote};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::files::{self, LOG_FILE, LOG_FILE_MAGIC, VOTE_FILE};
use super::TypeConfig;
use crate::{Error, Result};

/// One record of the log file.
#[derive(Serialize, Deserialize)]
enum LogRecord {
    /// Every entry up to and including this log id was purged (first record after a purge).
    Purged(LogId<u32>),
    /// A log entry.
    Entry(Entry<TypeConfig>),
}

struct LogInner {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    /// Bytes of valid records in the file; the next record goes here.
    file_len: u64,
    /// Entries by index, each with its record's position in the file.
    entries: BTreeMap<u64, (u64, Entry<TypeConfig>)>,
    last_purged: Option<LogId<u32>>,
    vote: Option<Vote<u32>>,
    /// Set by a failed write or sync: the file's state is unknown from then on.
    poisoned: bool,
}

/// openraft's log store for the controller. Cheap to clone (shared state).
#[derive(Clone)]
pub(crate) struct LogStore {
    inner: Arc<Mutex<LogInner>>,
}

fn encode(record: &impl Serialize) -> Result<Vec<u8>> {
    serde_json::to_vec(record).map_err(|source| Error::ControllerCodec { what: "log record", source })
}

impl LogStore {
    /// Opens the log and vote in `dir` (created if absent), cutting a torn or damaged log
    /// tail.
    pub(crate) fn open(dir: &Path) -> Result<LogStore> {
        let vote = match files::read_small(dir, VOTE_FILE)? {
            Some(bytes) => {
                Some(serde_json::from_slice(&bytes).map_err(|source| Error::ControllerCodec { what: "vote", source })?)
            }
            None => None,
        };
        let (file, path) = files::open_log(dir)?;
        let bytes = std::fs::read(&path).map_err(|source| Error::FileIo { op: "read", path: path.clone(), source })?;
        let scan = files::scan_log(&path, &bytes)?;
        let mut inner = LogInner {
            dir: dir.to_path_buf(),
            path: path.clone(),
            file,
            file_len: scan.valid_len,
            entries: BTreeMap::new(),
            last_purged: None,
            vote,
            poisoned: false,
        };
        for (pos, payload) in &scan.records {
            let record: LogRecord = serde_json::from_slice(payload)
                .map_err(|source| Error::ControllerCodec { what: "log record", source })?;
            inner.load_record(*pos, record)?;
        }
        if let Some(reason) = scan.bad_tail {
            // Only an unacknowledged append can be torn: acknowledgements wait for the sync.
            tracing::warn!(path = %path.display(), %reason, valid_len = scan.valid_len, "controller log: cutting the tail");
            inner.file.set_len(scan.valid_len).map_err(|source| Error::FileIo {
                op: "truncate",
                path: path.clone(),
                source,
            })?;
            inner.file.sync_data().map_err(|source| Error::FileIo { op: "fsync", path: path.clone(), source })?;
        }
        Ok(LogStore { inner: Arc::new(Mutex::new(inner)) })
    }

    /// Runs `f` on the locked state on the blocking pool (it may fsync); `to_storage` turns
    /// its error into openraft's.
    async fn blocking<T, F>(&self, to_storage: fn(&Error) -> StorageIOError<u32>, f: F) -> Result<T, StorageError<u32>>
    where
        T: Send + 'static,
        F: FnOnce(&mut LogInner) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        match tokio::task::spawn_blocking(move || f(&mut inner.lock())).await {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(e)) => Err(to_storage(&e).into()),
            Err(join) => Err(StorageIOError::write_logs(&join).into()),
        }
    }
}

impl LogInner {
    fn load_record(&mut self, pos: u64, record: LogRecord) -> Result<()> {
        match record {
            LogRecord::Purged(log_id) => {
                self.entries.retain(|&index, _| index > log_id.index);
                self.last_purged = Some(log_id);
            }
            LogRecord::Entry(entry) => {
                let index = entry.log_id.index;
                if self.last_purged.is_some_and(|p| index <= p.index) {
                    return Ok(());
                }
                let expected = self.next_index();
                if expected.is_some_and(|next| next != index) {
                    let reason = format!("entry {index} at {pos} does not follow {expected:?}");
                    return Err(Error::ControllerCorrupt { path: self.path.clone(), reason });
                }
                self.entries.insert(index, (pos, entry));
            }
        }
        Ok(())
    }

    fn next_index(&self) -> Option<u64> {
        match self.entries.last_key_value() {
            Some((&index, _)) => Some(index + 1),
            None => self.last_purged.map(|p| p.index + 1),
        }
    }

    fn check_poisoned(&self) -> Result<()> {
        if self.poisoned {
            let reason = "poisoned by an earlier failed write".to_string();
            return Err(Error::ControllerCorrupt { path: self.path.clone(), reason });
        }
        Ok(())
    }

    /// Writes and syncs `entries` after the last record; they become readable only once
    /// durable.
    fn append(&mut self, entries: Vec<Entry<TypeConfig>>) -> Result<()> {
        let mut bytes = Vec::new();
        let mut placed = Vec::with_capacity(entries.len());
        for entry in entries {
            let pos = self.file_len + bytes.len() as u64;
            files::encode_record(&encode(&EntryRef::Entry(&entry))?, &mut bytes)?;
            placed.push((pos, entry));
        }
        let write = self.file.write_all_at(&bytes, self.file_len).and_then(|()| self.file.sync_data());
        if let Err(source) = write {
            self.poisoned = true;
            return Err(Error::FileIo { op: "append", path: self.path.clone(), source });
        }
        self.file_len += bytes.len() as u64;
        for (pos, entry) in placed {
            self.entries.insert(entry.log_id.index, (pos, entry));
        }
        Ok(())
    }

    fn truncate(&mut self, index: u64) -> Result<()> {
        let Some((_, (pos, _))) = self.entries.range(index..).next() else {
            return Ok(());
        };
        let pos = *pos;
        self.entries.retain(|&i, _| i < index);
        let cut = self.file.set_len(pos).and_then(|()| self.file.sync_data());
        if let Err(source) = cut {
            self.poisoned = true;
            return Err(Error::FileIo { op: "truncate", path: self.path.clone(), source });
        }
        self.file_len = pos;
        Ok(())
    }

    /// Drops entries up to `log_id` by rewriting the file: magic, a `Purged` record, the
    /// remaining entries; then renamed over the old one.
    fn purge(&mut self, log_id: LogId<u32>) -> Result<()> {
        self.entries.retain(|&i, _| i > log_id.index);
        self.last_purged = Some(log_id);
        let mut bytes = LOG_FILE_MAGIC.to_vec();
        files::encode_record(&encode(&LogRecord::Purged(log_id))?, &mut bytes)?;
        let mut positions = Vec::with_capacity(self.entries.len());
        for (&index, (_, entry)) in &self.entries {
            positions.push((index, bytes.len() as u64));
            files::encode_record(&encode(&EntryRef::Entry(entry))?, &mut bytes)?;
        }
        if let Err(e) = files::replace_file(&self.dir, LOG_FILE, &bytes) {
            self.poisoned = true;
            return Err(e);
        }
        let (file, _) = files::open_log(&self.dir)?;
        self.file = file;
        self.file_len = bytes.len() as u64;
        for (index, pos) in positions {
            if let Some(slot) = self.entries.get_mut(&index) {
                slot.0 = pos;
            }
        }
        Ok(())
    }
}

/// Serializes exactly like `LogRecord::Entry`, without cloning the entry.
#[derive(Serialize)]
enum EntryRef<'a> {
    Entry(&'a Entry<TypeConfig>),
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<u32>> {
        let inner = self.inner.lock();
        Ok(inner.entries.range(range).map(|(_, (_, entry))| entry.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<u32>> {
        let inner = self.inner.lock();
        let last = inner.entries.last_key_value().map(|(_, (_, entry))| entry.log_id);
        Ok(LogState { last_purged_log_id: inner.last_purged, last_log_id: last.or(inner.last_purged) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u32>) -> Result<(), StorageError<u32>> {
        let vote = *vote;
        self.blocking(
            |e| StorageIOError::write_vote(e),
            move |inner| {
                inner.check_poisoned()?;
                let bytes =
                    serde_json::to_vec(&vote).map_err(|source| Error::ControllerCodec { what: "vote", source })?;
                files::write_small(&inner.dir, VOTE_FILE, &bytes)?;
                inner.vote = Some(vote);
                Ok(())
            },
        )
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u32>>, StorageError<u32>> {
        Ok(self.inner.lock().vote)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError<u32>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        self.blocking(
            |e| StorageIOError::write_logs(e),
            move |inner| {
                let appended = inner.check_poisoned().and_then(|()| inner.append(entries));
                // openraft learns of the outcome both ways: the callback and the return value.
                match &appended {
                    Ok(()) => callback.log_io_completed(Ok(())),
                    Err(e) => callback.log_io_completed(Err(std::io::Error::other(e.to_string()))),
                }
                appended
            },
        )
        .await
    }

    async fn truncate(&mut self, log_id: LogId<u32>) -> Result<(), StorageError<u32>> {
        self.blocking(
            |e| StorageIOError::write_logs(e),
            move |inner| {
                inner.check_poisoned()?;
                inner.truncate(log_id.index)
            },
        )
        .await
    }

    async fn purge(&mut self, log_id: LogId<u32>) -> Result<(), StorageError<u32>> {
        self.blocking(
            |e| StorageIOError::write_logs(e),
            move |inner| {
                inner.check_poisoned()?;
                if inner.last_purged > Some(log_id) {
                    let reason = format!("purge to {log_id} after a purge to {:?}", inner.last_purged);
                    return Err(Error::ControllerCorrupt { path: inner.path.clone(), reason });
                }
                inner.purge(log_id)
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;
    use crate::controller::state::Command;

    fn entry(term: u64, index: u64) -> Entry<TypeConfig> {
        let cmd = Command::NodeUp { id: index as u32 };
        Entry { log_id: LogId::new(CommittedLeaderId::new(term, 1), index), payload: EntryPayload::Normal(cmd) }
    }

    fn indexes(store: &LogStore) -> Vec<u64> {
        store.inner.lock().entries.keys().copied().collect()
    }

    /// Appends, a truncation and a purge survive a reopen; a torn last record is cut on open
    /// and the entries before it are kept.
    #[test]
    fn log_survives_reopen_truncate_purge_and_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LogStore::open(dir.path()).expect("opens");
        store.inner.lock().append((1..=6).map(|i| entry(1, i)).collect()).expect("appends");
        store.inner.lock().truncate(5).expect("truncates");
        store.inner.lock().append(vec![entry(2, 5)]).expect("appends");
        assert_eq!(indexes(&store), vec![1, 2, 3, 4, 5]);
        drop(store);
        let store = LogStore::open(dir.path()).expect("reopens");
        assert_eq!(indexes(&store), vec![1, 2, 3, 4, 5]);
        assert_eq!(store.inner.lock().entries[&5].1.log_id.leader_id.term, 2);
        let purged_to = LogId::new(CommittedLeaderId::new(1, 1), 2);
        store.inner.lock().purge(purged_to).expect("purges");
        store.inner.lock().append(vec![entry(2, 6)]).expect("appends");
        drop(store);
        let store = LogStore::open(dir.path()).expect("reopens");
        assert_eq!(indexes(&store), vec![3, 4, 5, 6]);
        assert_eq!(store.inner.lock().last_purged, Some(purged_to));
        drop(store);
        // Tear the last record: the file ends three bytes into entry 6's payload.
        let path = dir.path().join(LOG_FILE);
        let len = std::fs::metadata(&path).expect("stat").len();
        let file = std::fs::OpenOptions::new().write(true).open(&path).expect("opens");
        file.set_len(len - 3).expect("cuts");
        let store = LogStore::open(dir.path()).expect("reopens");
        assert_eq!(indexes(&store), vec![3, 4, 5]);
        let cut_len = store.inner.lock().file_len;
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), cut_len, "the torn tail is cut on open");
    }
}
