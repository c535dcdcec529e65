//! File access. This is the only module that opens, writes, syncs or maps files; everything
//! above it goes through the [`Storage`] trait, so tests can inject faults (see
//! [`fault::FaultStorage`]) without touching the code under test.
//!
//! It owns: positioned reads and writes, `fdatasync`, directory syncs, memory maps.
//! It must never: interpret the bytes it moves.

pub mod fault;
// The only `unsafe` in the engine: memory maps, with their invariants in `mmap.rs`.
#[allow(unsafe_code)]
mod mmap;
mod std_storage;
// io_uring submissions point the kernel at caller buffers: `unsafe`, with the invariant (a
// call returns only after its operations completed) in `uring.rs`.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod uring;

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use mmap::{MmapBytes, ReadMap, WriteMap};
pub use std_storage::StdStorage;
#[cfg(target_os = "linux")]
pub use uring::UringStorage;

use crate::error::{Error, Result};

/// How to open a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// Create the file; fail if it exists.
    CreateNew,
    /// Open an existing file for reading and writing.
    ReadWrite,
}

/// A directory tree of files: the engine's view of the disk. The directory operations
/// default to the standard library's; backends differ in how they open files.
pub trait Storage: Send + Sync + Debug + 'static {
    /// Opens a file.
    fn open(&self, path: &Path, mode: OpenMode) -> Result<Arc<dyn StorageFile>>;
    /// Removes a file.
    fn remove_file(&self, path: &Path) -> Result<()> {
        std::fs::remove_file(path).map_err(|e| Error::io("remove file", path, e))
    }
    /// Atomically renames `from` to `to`, replacing `to`.
    fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        std::fs::rename(from, to).map_err(|e| Error::io("rename", from, e))
    }
    /// Creates a directory and its parents.
    fn create_dir_all(&self, path: &Path) -> Result<()> {
        std::fs::create_dir_all(path).map_err(|e| Error::io("create directory", path, e))
    }
    /// Removes a directory and everything in it.
    fn remove_dir_all(&self, path: &Path) -> Result<()> {
        std::fs::remove_dir_all(path).map_err(|e| Error::io("remove directory", path, e))
    }
    /// Makes the directory's entries (creations, renames, removals) durable.
    fn sync_dir(&self, path: &Path) -> Result<()> {
        let dir = std::fs::File::open(path).map_err(|e| Error::io("open directory", path, e))?;
        dir.sync_all().map_err(|e| Error::io("fsync directory", path, e))
    }
    /// Lists the entries of a directory, sorted by name.
    fn list_dir(&self, path: &Path) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(path).map_err(|e| Error::io("list directory", path, e))? {
            out.push(entry.map_err(|e| Error::io("list directory", path, e))?.path());
        }
        out.sort();
        Ok(out)
    }
    /// Whether a path exists.
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
}

/// An open file.
#[allow(clippy::len_without_is_empty)]
pub trait StorageFile: Send + Sync + Debug {
    /// The file's path.
    fn path(&self) -> &Path;
    /// Writes all of `buf` at byte position `pos`.
    fn write_all_at(&self, buf: &[u8], pos: u64) -> Result<()>;
    /// Reads exactly `buf.len()` bytes at `pos`.
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> Result<()>;
    /// Makes the file's data durable (`fdatasync`).
    fn sync_data(&self) -> Result<()>;
    /// Writes all of `buf` at `pos`, then makes the file's data durable. Backends that can
    /// submit both at once do (io_uring); the default is the two calls.
    fn write_all_at_and_sync(&self, buf: &[u8], pos: u64) -> Result<()> {
        self.write_all_at(buf, pos)?;
        self.sync_data()
    }
    /// Current length in bytes.
    fn len(&self) -> Result<u64>;
    /// Truncates or extends the file.
    fn set_len(&self, len: u64) -> Result<()>;
    /// Extends the file to at least `len` bytes with every block allocated (`fallocate`), so
    /// that writing through a map cannot run out of space: a full disk is an ENOSPC error
    /// here instead of a SIGBUS at the first touch of a sparse page.
    fn allocate(&self, len: u64) -> Result<()>;
    /// Maps the whole file read-only. The caller must keep the file from shrinking while
    /// the map lives (see the `SAFETY` notes in `mmap.rs`).
    fn map_read(&self) -> Result<ReadMap>;
    /// Maps the whole file read-write (shared).
    fn map_write(&self) -> Result<WriteMap>;
}

/// The file I/O backends a store can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `pread`/`pwrite`/`fdatasync` system calls.
    Std,
    /// io_uring (Linux), each thread with its own ring; a write and its sync are submitted
    /// together.
    Uring,
}

impl Backend {
    /// Parses `std` or `uring`.
    pub fn parse(name: &str) -> Option<Backend> {
        match name {
            "std" => Some(Backend::Std),
            "uring" | "io_uring" => Some(Backend::Uring),
            _ => None,
        }
    }

    /// The backend named by the environment variable `RILL_IO_BACKEND` (`std`, the default,
    /// or `uring`); used by [`crate::StoreConfig::default`], so the whole test suite can run
    /// on either backend.
    pub fn from_env() -> Backend {
        std::env::var("RILL_IO_BACKEND").ok().as_deref().and_then(Backend::parse).unwrap_or(Backend::Std)
    }

    /// The storage for this backend, or why it cannot be used here (io_uring refused by the
    /// kernel or a sandbox). Callers may fall back to [`Backend::Std`].
    pub fn storage(self) -> Result<Arc<dyn Storage>> {
        match self {
            Backend::Std => Ok(Arc::new(StdStorage)),
            #[cfg(target_os = "linux")]
            Backend::Uring => Ok(Arc::new(UringStorage::new()?)),
            #[cfg(not(target_os = "linux"))]
            Backend::Uring => {
                Err(crate::error::Error::InvalidConfig { reason: "the io_uring backend exists only on Linux".into() })
            }
        }
    }
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one:
/// write a temporary file, sync it, rename it over `path`, sync the directory.
pub fn write_atomically(storage: &dyn Storage, path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    if storage.exists(&tmp) {
        storage.remove_file(&tmp)?;
    }
    let file = storage.open(&tmp, OpenMode::CreateNew)?;
    file.write_all_at_and_sync(bytes, 0)?;
    storage.rename(&tmp, path)?;
    let parent = path.parent().expect("a file path has a parent directory");
    storage.sync_dir(parent)
}

/// Reads a whole small file (metadata, snapshots), refusing one larger than `size_bytes_max`
/// before allocating for it.
pub fn read_bounded(storage: &dyn Storage, path: &Path, size_bytes_max: u64) -> Result<Vec<u8>> {
    let file = storage.open(path, OpenMode::ReadWrite)?;
    let len = file.len()?;
    if len > size_bytes_max {
        return Err(crate::error::Error::Corrupt {
            path: path.to_path_buf(),
            pos: 0,
            reason: format!("{len} bytes is larger than any valid file of its kind ({size_bytes_max})"),
        });
    }
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}
