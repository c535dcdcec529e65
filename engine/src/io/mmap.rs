//! Memory maps of segment and index files.
//!
//! Mapping a file is `unsafe` because the bytes behind the map can change or vanish (a
//! truncated file turns accesses past its new end into SIGBUS). rill upholds these
//! invariants, each enforced where named:
//!
//! 1. No other process writes the store: `Store::open` takes an exclusive lock on
//!    `<dir>/.lock` and holds it for the store's lifetime (`log/store.rs`).
//! 2. A file is mapped read-only ([`ReadMap`]) only once it is immutable: a sealed segment's
//!    `.log` (sealed in `segment/mod.rs`, never written or truncated afterwards; recovery
//!    truncates only before anything is mapped) or a trimmed index. Retention removes such
//!    files with `unlink`, which leaves existing maps valid.
//! 3. A file mapped read-write ([`WriteMap`]) is an index, and the index drops its map
//!    before it changes the file's length (`index/mod.rs`, `trim`).

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use memmap2::{Mmap, MmapMut};

use crate::error::{Error, Result};

/// A read-only map of a whole immutable file.
#[derive(Debug, Clone)]
pub struct ReadMap {
    map: Option<Arc<Mmap>>,
}

impl ReadMap {
    pub(super) fn new(file: &File, path: &Path) -> Result<Self> {
        let len = file.metadata().map_err(|e| Error::io("stat", path, e))?.len();
        if len == 0 {
            return Ok(ReadMap { map: None });
        }
        // SAFETY: the file is immutable while mapped (module invariants 1 and 2): no process
        // writes or truncates it, so the mapped bytes stay valid and unchanged.
        let map = unsafe { Mmap::map(file) }.map_err(|e| Error::io("mmap", path, e))?;
        Ok(ReadMap { map: Some(Arc::new(map)) })
    }

    /// The mapped bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.map.as_deref().map_or(&[], |m| &m[..])
    }

    /// The mapped bytes as a zero-copy [`Bytes`] that keeps the map alive.
    pub fn to_bytes(&self) -> Bytes {
        match &self.map {
            None => Bytes::new(),
            Some(map) => Bytes::from_owner(MmapBytes(Arc::clone(map))),
        }
    }
}

/// Owner handed to [`Bytes::from_owner`]: keeps a map alive while views of it exist.
#[derive(Debug)]
pub struct MmapBytes(Arc<Mmap>);

impl AsRef<[u8]> for MmapBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0[..]
    }
}

/// A shared read-write map of a whole file (index files while they are active).
#[derive(Debug)]
pub struct WriteMap {
    map: Option<MmapMut>,
}

impl WriteMap {
    pub(super) fn new(file: &File, path: &Path) -> Result<Self> {
        let len = file.metadata().map_err(|e| Error::io("stat", path, e))?.len();
        if len == 0 {
            return Ok(WriteMap { map: None });
        }
        // SAFETY: only this process writes the file (module invariant 1) and the owner of
        // the map never changes the file's length while the map lives (invariant 3).
        let map = unsafe { MmapMut::map_mut(file) }.map_err(|e| Error::io("mmap", path, e))?;
        Ok(WriteMap { map: Some(map) })
    }

    /// A map of nothing (used while the file is being resized).
    pub fn empty() -> Self {
        WriteMap { map: None }
    }

    /// The mapped bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.map.as_deref().map_or(&[], |m| m)
    }

    /// The mapped bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.map.as_deref_mut().map_or(&mut [], |m| &mut m[..])
    }

    /// Writes dirty pages back to the file (`msync`).
    pub fn flush(&self, path: &Path) -> Result<()> {
        match &self.map {
            None => Ok(()),
            Some(map) => map.flush().map_err(|e| Error::io("msync", path, e)),
        }
    }
}
