//! A fault-injecting [`Storage`] for tests: real files underneath, with the power to fail
//! the Nth write or fsync, tear a write, and simulate a crash that drops or tears every
//! byte written since the file's last successful `fdatasync`.
//!
//! The crash model fits rill's append-only files: bytes written after the last sync of a
//! file are a suffix of it, so losing power keeps some prefix of that suffix. Index files
//! (written through maps, not through this layer) are caches that recovery rebuilds, so the
//! model leaves them alone.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use super::mmap::{ReadMap, WriteMap};
use super::std_storage::StdFile;
use super::{OpenMode, StdStorage, Storage, StorageFile};
use crate::error::{Error, Result};

/// What an injected write fault does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteFault {
    /// Nothing is written; the call fails with ENOSPC.
    NoSpace,
    /// The first `written_bytes` bytes reach the file, then the call fails with EIO.
    Torn {
        /// Bytes of the write that land before the failure.
        written_bytes: usize,
    },
}

/// What a simulated crash does to bytes written since each file's last sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// All unsynced bytes are lost.
    DropUnsynced,
    /// All unsynced bytes happened to reach the disk.
    KeepUnsynced,
    /// A prefix of the unsynced bytes, of a length drawn from `seed`, survives.
    TearUnsynced {
        /// Seed of the draw; print it so a failure can be replayed.
        seed: u64,
    },
}

#[derive(Debug, Default)]
struct FileTrack {
    synced_len: u64,
    written_len: u64,
}

#[derive(Debug, Default)]
struct FaultState {
    writes: u64,
    syncs: u64,
    fail_write_at: Option<(u64, WriteFault)>,
    fail_sync_at: Option<u64>,
    files: HashMap<PathBuf, FileTrack>,
}

/// Fault-injecting storage over the real file system. Clones share their state.
#[derive(Debug, Clone, Default)]
pub struct FaultStorage {
    state: Arc<Mutex<FaultState>>,
}

impl FaultStorage {
    /// A storage with no faults armed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the `nth` write from now (1-based) fail as `fault`.
    pub fn fail_write(&self, nth: u64, fault: WriteFault) {
        let mut state = self.state.lock();
        let at = state.writes + nth;
        state.fail_write_at = Some((at, fault));
    }

    /// Makes the `nth` `fdatasync` from now (1-based) fail with EIO.
    pub fn fail_sync(&self, nth: u64) {
        let mut state = self.state.lock();
        let at = state.syncs + nth;
        state.fail_sync_at = Some(at);
    }

    /// Writes and syncs performed so far.
    pub fn counts(&self) -> (u64, u64) {
        let state = self.state.lock();
        (state.writes, state.syncs)
    }

    /// Bytes of `path` known durable (synced), if the file was opened through this storage.
    pub fn synced_len(&self, path: &Path) -> Option<u64> {
        self.state.lock().files.get(path).map(|t| t.synced_len)
    }

    /// Simulates power loss: every file written through this storage loses (part of) what
    /// was written after its last successful sync. Call it after the store is dropped.
    pub fn crash(&self, mode: CrashMode) -> Result<()> {
        let mut state = self.state.lock();
        let mut rng = match mode {
            CrashMode::TearUnsynced { seed } => seed,
            _ => 0,
        };
        let mut paths: Vec<_> = state.files.keys().cloned().collect();
        paths.sort();
        for path in paths {
            let track = state.files.get_mut(&path).expect("key listed above");
            if !path.exists() || track.written_len <= track.synced_len {
                continue;
            }
            let unsynced = track.written_len - track.synced_len;
            let keep = match mode {
                CrashMode::DropUnsynced => 0,
                CrashMode::KeepUnsynced => unsynced,
                CrashMode::TearUnsynced { .. } => splitmix64(&mut rng) % (unsynced + 1),
            };
            let file = StdFile::open(&path, OpenMode::ReadWrite)?;
            let len = file.len()?.min(track.synced_len + keep);
            file.set_len(len)?;
            track.written_len = len;
        }
        Ok(())
    }
}

/// SplitMix64: a tiny deterministic generator, enough to draw tear points from a seed.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Storage for FaultStorage {
    fn open(&self, path: &Path, mode: OpenMode) -> Result<Arc<dyn StorageFile>> {
        let file = StdFile::open(path, mode)?;
        let len = file.len()?;
        let mut state = self.state.lock();
        let track = state.files.entry(path.to_path_buf()).or_default();
        track.written_len = len;
        track.synced_len = if mode == OpenMode::CreateNew { 0 } else { len };
        Ok(Arc::new(FaultFile { file, state: Arc::clone(&self.state) }))
    }

    fn remove_file(&self, path: &Path) -> Result<()> {
        self.state.lock().files.remove(path);
        StdStorage.remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        let mut state = self.state.lock();
        if let Some(track) = state.files.remove(from) {
            state.files.insert(to.to_path_buf(), track);
        }
        StdStorage.rename(from, to)
    }

    fn create_dir_all(&self, path: &Path) -> Result<()> {
        StdStorage.create_dir_all(path)
    }

    fn remove_dir_all(&self, path: &Path) -> Result<()> {
        self.state.lock().files.retain(|p, _| !p.starts_with(path));
        StdStorage.remove_dir_all(path)
    }

    fn sync_dir(&self, path: &Path) -> Result<()> {
        StdStorage.sync_dir(path)
    }

    fn list_dir(&self, path: &Path) -> Result<Vec<PathBuf>> {
        StdStorage.list_dir(path)
    }

    fn exists(&self, path: &Path) -> bool {
        StdStorage.exists(path)
    }
}

#[derive(Debug)]
struct FaultFile {
    file: StdFile,
    state: Arc<Mutex<FaultState>>,
}

impl StorageFile for FaultFile {
    fn path(&self) -> &Path {
        self.file.path()
    }

    fn write_all_at(&self, buf: &[u8], pos: u64) -> Result<()> {
        let fault = {
            let mut state = self.state.lock();
            state.writes += 1;
            let n = state.writes;
            match state.fail_write_at {
                Some((at, fault)) if at == n => Some(fault),
                _ => None,
            }
        };
        let (result, landed) = match fault {
            None => (self.file.write_all_at(buf, pos), buf.len()),
            Some(WriteFault::NoSpace) => (Err(injected("write", self.path(), libc_enospc())), 0),
            Some(WriteFault::Torn { written_bytes }) => {
                let n = written_bytes.min(buf.len());
                self.file.write_all_at(&buf[..n], pos)?;
                (Err(injected("write", self.path(), std::io::ErrorKind::Other.into())), n)
            }
        };
        let mut state = self.state.lock();
        if let Some(track) = state.files.get_mut(self.path()) {
            track.written_len = track.written_len.max(pos + landed as u64);
        }
        result
    }

    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        self.file.read_exact_at(buf, pos)
    }

    fn sync_data(&self) -> Result<()> {
        let (fail, len_before) = {
            let mut state = self.state.lock();
            state.syncs += 1;
            let fail = state.fail_sync_at == Some(state.syncs);
            let len = state.files.get(self.path()).map_or(0, |t| t.written_len);
            (fail, len)
        };
        if fail {
            return Err(injected("fdatasync", self.path(), std::io::ErrorKind::Other.into()));
        }
        self.file.sync_data()?;
        let mut state = self.state.lock();
        if let Some(track) = state.files.get_mut(self.path()) {
            track.synced_len = track.synced_len.max(len_before);
        }
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        self.file.len()
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.file.set_len(len)?;
        let mut state = self.state.lock();
        if let Some(track) = state.files.get_mut(self.path()) {
            track.written_len = len;
            track.synced_len = track.synced_len.min(len);
        }
        Ok(())
    }

    fn map_read(&self) -> Result<ReadMap> {
        self.file.map_read()
    }

    fn map_write(&self) -> Result<WriteMap> {
        self.file.map_write()
    }
}

fn libc_enospc() -> std::io::Error {
    std::io::Error::from(std::io::ErrorKind::StorageFull)
}

fn injected(op: &'static str, path: &Path, source: std::io::Error) -> Error {
    Error::io(op, path, std::io::Error::new(source.kind(), format!("injected fault: {source}")))
}
