//! A fault-injecting [`Storage`] for tests: real files underneath, with the power to fail
//! the Nth write or fsync, tear a write, run out of space, cut the power at an instant, and
//! simulate a crash that drops, keeps or tears what was written since each file's last
//! successful `fdatasync`.
//!
//! The crash models fit rill's append-only files: bytes written after the last sync of a
//! file are a suffix of it. [`CrashMode::TearUnsynced`] keeps some prefix of that suffix;
//! [`CrashMode::ScrambleUnsynced`] decides each unsynced write on its own (kept, lost or
//! torn, a lost or torn part reading back as zeros, as when the file's size reached the
//! disk but its data did not). Index files (written through maps, not through this layer)
//! are caches that recovery validates or rebuilds, so the models leave them alone.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

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
    /// A short write: the first `written_bytes` bytes reach the file, then the file system
    /// is full and the call fails with ENOSPC.
    ShortNoSpace {
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
    /// Each unsynced write, drawn from `seed`, is kept, lost or torn (a random prefix kept);
    /// lost bytes read back as zeros, and the file keeps its written length or is cut back
    /// to its synced length (also drawn).
    ScrambleUnsynced {
        /// Seed of the draws; print it so a failure can be replayed.
        seed: u64,
    },
}

/// A completed, successful `fdatasync` (see [`FaultStorage::sync_log`]).
#[derive(Clone, Debug)]
pub struct SyncEvent {
    /// The file synced.
    pub path: PathBuf,
    /// When the call began: everything written to the file before this is durable.
    pub started: Instant,
    /// When the call returned.
    pub finished: Instant,
    /// Bytes of the file durable after the call.
    pub synced_len: u64,
    /// Name of the thread that called it (the flusher is `rill-flush-<topic>-<partition>`).
    pub thread: Option<String>,
}

#[derive(Debug, Default)]
struct FileTrack {
    synced_len: u64,
    written_len: u64,
    /// Unsynced writes (position, length), oldest first, for [`CrashMode::ScrambleUnsynced`].
    unsynced: Vec<(u64, u64)>,
}

#[derive(Debug, Default)]
struct FaultState {
    writes: u64,
    syncs: u64,
    fail_write_at: Option<(u64, WriteFault)>,
    fail_sync_at: Option<u64>,
    /// After [`FaultStorage::power_cut`], every write, sync and allocation fails.
    power_cut: bool,
    record_syncs: bool,
    sync_log: Vec<SyncEvent>,
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

    /// Starts recording every successful `fdatasync` (see [`FaultStorage::sync_log`]).
    pub fn record_syncs(&self) {
        self.state.lock().record_syncs = true;
    }

    /// The successful syncs recorded since [`FaultStorage::record_syncs`], in completion order.
    pub fn sync_log(&self) -> Vec<SyncEvent> {
        self.state.lock().sync_log.clone()
    }

    /// Cuts the power now: from this instant every write, sync and allocation fails with
    /// EIO, and a sync still in flight does not count as completed. What is durable is
    /// frozen; [`FaultStorage::crash`] then decides what the unsynced bytes became.
    pub fn power_cut(&self) -> Instant {
        let mut state = self.state.lock();
        state.power_cut = true;
        Instant::now()
    }

    /// Simulates power loss: every file written through this storage loses (part of) what
    /// was written after its last successful sync. Call it after the store is dropped.
    pub fn crash(&self, mode: CrashMode) -> Result<()> {
        let mut state = self.state.lock();
        let mut rng = match mode {
            CrashMode::TearUnsynced { seed } | CrashMode::ScrambleUnsynced { seed } => seed,
            _ => 0,
        };
        let mut paths: Vec<_> = state.files.keys().cloned().collect();
        paths.sort();
        for path in paths {
            let track = state.files.get_mut(&path).expect("key listed above");
            if !path.exists() || track.written_len <= track.synced_len {
                track.unsynced.clear();
                continue;
            }
            let unsynced = track.written_len - track.synced_len;
            let file = StdFile::open(&path, OpenMode::ReadWrite)?;
            let len = match mode {
                CrashMode::DropUnsynced => track.synced_len,
                CrashMode::KeepUnsynced => track.written_len,
                CrashMode::TearUnsynced { .. } => track.synced_len + splitmix64(&mut rng) % (unsynced + 1),
                CrashMode::ScrambleUnsynced { .. } => {
                    scramble(&file, track, &mut rng)?;
                    // The size may or may not have reached the disk.
                    if splitmix64(&mut rng).is_multiple_of(4) {
                        track.synced_len
                    } else {
                        track.written_len
                    }
                }
            };
            let len = file.len()?.min(len);
            file.set_len(len)?;
            track.written_len = len;
            track.unsynced.clear();
        }
        state.power_cut = false;
        Ok(())
    }
}

/// Decides each unsynced write of `track` on its own: kept (1 in 3), lost (zeros), or torn
/// (a prefix kept, the rest zeros). Bytes below the synced length are never touched.
fn scramble(file: &StdFile, track: &FileTrack, rng: &mut u64) -> Result<()> {
    for &(pos, len) in &track.unsynced {
        let start = pos.max(track.synced_len);
        let end = (pos + len).min(track.written_len);
        if start >= end {
            continue;
        }
        let kept = match splitmix64(rng) % 3 {
            0 => end - start,
            1 => 0,
            _ => splitmix64(rng) % (end - start),
        };
        let zeros = vec![0u8; (end - start - kept) as usize];
        if !zeros.is_empty() {
            file.write_all_at(&zeros, start + kept)?;
        }
    }
    Ok(())
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
        track.unsynced.clear();
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
            if state.power_cut {
                return Err(power_is_off("write", self.path()));
            }
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
            Some(WriteFault::ShortNoSpace { written_bytes }) => {
                let n = written_bytes.min(buf.len());
                self.file.write_all_at(&buf[..n], pos)?;
                (Err(injected("write", self.path(), libc_enospc())), n)
            }
        };
        let mut state = self.state.lock();
        if let Some(track) = state.files.get_mut(self.path()) {
            track.written_len = track.written_len.max(pos + landed as u64);
            if landed > 0 {
                track.unsynced.push((pos, landed as u64));
            }
        }
        result
    }

    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        self.file.read_exact_at(buf, pos)
    }

    fn sync_data(&self) -> Result<()> {
        let started = Instant::now();
        let (fail, len_before) = {
            let mut state = self.state.lock();
            if state.power_cut {
                return Err(power_is_off("fdatasync", self.path()));
            }
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
        if state.power_cut {
            // The power went out before the sync returned: nothing of it counts.
            return Err(power_is_off("fdatasync", self.path()));
        }
        let Some(track) = state.files.get_mut(self.path()) else { return Ok(()) };
        track.synced_len = track.synced_len.max(len_before);
        let synced_len = track.synced_len;
        track.unsynced.retain(|&(pos, len)| pos + len > synced_len);
        if state.record_syncs {
            let thread = std::thread::current().name().map(str::to_owned);
            let event =
                SyncEvent { path: self.path().to_path_buf(), started, finished: Instant::now(), synced_len, thread };
            state.sync_log.push(event);
        }
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        self.file.len()
    }

    fn set_len(&self, len: u64) -> Result<()> {
        if self.state.lock().power_cut {
            return Err(power_is_off("truncate", self.path()));
        }
        self.file.set_len(len)?;
        let mut state = self.state.lock();
        if let Some(track) = state.files.get_mut(self.path()) {
            track.written_len = len;
            track.synced_len = track.synced_len.min(len);
            track.unsynced.retain(|&(pos, _)| pos < len);
        }
        Ok(())
    }

    fn allocate(&self, len: u64) -> Result<()> {
        if self.state.lock().power_cut {
            return Err(power_is_off("fallocate", self.path()));
        }
        self.file.allocate(len)?;
        let mut state = self.state.lock();
        if let Some(track) = state.files.get_mut(self.path()) {
            track.written_len = track.written_len.max(len);
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

fn power_is_off(op: &'static str, path: &Path) -> Error {
    Error::io(op, path, std::io::Error::other("injected fault: power cut"))
}

fn injected(op: &'static str, path: &Path, source: std::io::Error) -> Error {
    Error::io(op, path, std::io::Error::new(source.kind(), format!("injected fault: {source}")))
}
