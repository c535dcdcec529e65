//! An io_uring backend for positioned reads, writes and `fdatasync` ([`UringStorage`]).
//!
//! Each thread that does file I/O gets its own small ring (created on first use), so threads
//! never wait for each other's operations; every call submits its operations and waits for
//! their completions before returning, so it is a drop-in for the blocking [`StdStorage`]
//! calls. A write followed by a sync ([`StorageFile::write_all_at_and_sync`]) is one
//! submission: the write and the `fdatasync` linked, one system call instead of two.
//! Directory operations, lengths, truncation and memory maps are the standard library's.
//!
//! It owns: the per-thread rings and turning completions into results.
//! It must never: return before the kernel is done with a buffer it was given.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};

use super::std_storage::StdFile;
use super::{OpenMode, ReadMap, Storage, StorageFile, WriteMap};
use crate::error::{Error, Result};

/// Submission queue entries per ring: a call submits at most two linked operations.
const RING_ENTRIES: u32 = 8;
/// Largest single read or write submitted (the opcode's length is a u32).
const CHUNK_BYTES: usize = 1 << 30;

thread_local! {
    static RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's ring, creating it on first use.
fn with_ring<T>(f: impl FnOnce(&mut IoUring) -> io::Result<T>) -> io::Result<T> {
    RING.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(IoUring::new(RING_ENTRIES)?);
        }
        f(slot.as_mut().expect("created just above"))
    })
}

/// Submits `entries`, linked in order when there are several (a failure cancels the rest),
/// waits for all of them and returns each one's result (negative: `-errno`).
///
/// # Safety
///
/// Every buffer an entry points to must stay valid (and, for reads, unaliased) until this
/// function returns.
unsafe fn run(ring: &mut IoUring, entries: &[squeue::Entry]) -> io::Result<Vec<i32>> {
    debug_assert!(entries.len() <= RING_ENTRIES as usize);
    for (i, entry) in entries.iter().enumerate() {
        let last = i + 1 == entries.len();
        let flags = if last { squeue::Flags::empty() } else { squeue::Flags::IO_LINK };
        let entry = entry.clone().user_data(i as u64).flags(flags);
        // SAFETY: the caller keeps the buffers valid until we return, and we return only
        // after every submitted entry has completed (below). The queue has room: each call
        // drains all its completions, so the queue is empty when a call starts.
        unsafe { ring.submission().push(&entry) }.map_err(|_| io::Error::other("io_uring submission queue full"))?;
    }
    let mut results = vec![None; entries.len()];
    let mut done = 0;
    while done < entries.len() {
        match ring.submit_and_wait(entries.len() - done) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for completion in ring.completion() {
            let slot = usize::try_from(completion.user_data()).ok().and_then(|i| results.get_mut(i));
            let slot = slot.ok_or_else(|| io::Error::other("io_uring completion for an unknown operation"))?;
            *slot = Some(completion.result());
            done += 1;
        }
    }
    Ok(results.into_iter().map(|r| r.expect("every operation completed")).collect())
}

fn check(result: i32) -> io::Result<usize> {
    usize::try_from(result).map_err(|_| io::Error::from_raw_os_error(-result))
}

fn write_entry(file: &File, buf: &[u8], pos: u64) -> squeue::Entry {
    let len = u32::try_from(buf.len().min(CHUNK_BYTES)).expect("chunks fit in u32");
    opcode::Write::new(types::Fd(file.as_raw_fd()), buf.as_ptr(), len).offset(pos).build()
}

fn datasync_entry(file: &File) -> squeue::Entry {
    opcode::Fsync::new(types::Fd(file.as_raw_fd())).flags(types::FsyncFlags::DATASYNC).build()
}

/// Writes all of `buf` at `pos`, resubmitting after short writes.
fn write_all(file: &File, mut buf: &[u8], mut pos: u64) -> io::Result<()> {
    while !buf.is_empty() {
        let entry = write_entry(file, buf, pos);
        // SAFETY: `buf` outlives the call, which waits for the write to complete.
        let written = check(with_ring(|ring| unsafe { run(ring, &[entry]) })?[0])?;
        if written == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "io_uring write wrote nothing"));
        }
        buf = &buf[written..];
        pos += written as u64;
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes at `pos`.
fn read_exact(file: &File, mut buf: &mut [u8], mut pos: u64) -> io::Result<()> {
    while !buf.is_empty() {
        let len = u32::try_from(buf.len().min(CHUNK_BYTES)).expect("chunks fit in u32");
        let entry = opcode::Read::new(types::Fd(file.as_raw_fd()), buf.as_mut_ptr(), len).offset(pos).build();
        // SAFETY: `buf` is exclusively borrowed for the call, which waits for the read.
        let read = check(with_ring(|ring| unsafe { run(ring, &[entry]) })?[0])?;
        if read == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file ends before the bytes asked for"));
        }
        buf = &mut buf[read..];
        pos += read as u64;
    }
    Ok(())
}

fn datasync(file: &File) -> io::Result<()> {
    let entry = datasync_entry(file);
    // SAFETY: a sync points at no buffer.
    check(with_ring(|ring| unsafe { run(ring, &[entry]) })?[0]).map(drop)
}

/// A [`Storage`] whose files read, write and sync through io_uring.
#[derive(Debug, Default, Clone, Copy)]
pub struct UringStorage;

impl UringStorage {
    /// The backend, if this kernel and process may use io_uring (checked by creating this
    /// thread's ring: that is what a kernel or sandbox that forbids io_uring refuses).
    pub fn new() -> Result<UringStorage> {
        with_ring(|_| Ok(())).map_err(|e| Error::io("io_uring setup", PathBuf::new(), e))?;
        Ok(UringStorage)
    }
}

impl Storage for UringStorage {
    fn open(&self, path: &Path, mode: OpenMode) -> Result<Arc<dyn StorageFile>> {
        Ok(Arc::new(UringFile { inner: StdFile::open(path, mode)? }))
    }
}

/// A file opened by [`UringStorage`].
#[derive(Debug)]
pub struct UringFile {
    inner: StdFile,
}

impl StorageFile for UringFile {
    fn path(&self) -> &Path {
        self.inner.path()
    }

    fn write_all_at(&self, buf: &[u8], pos: u64) -> Result<()> {
        write_all(self.inner.file(), buf, pos).map_err(|e| Error::io("write", self.path(), e))
    }

    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        read_exact(self.inner.file(), buf, pos).map_err(|e| Error::io("read", self.path(), e))
    }

    fn sync_data(&self) -> Result<()> {
        datasync(self.inner.file()).map_err(|e| Error::io("fdatasync", self.path(), e))
    }

    fn write_all_at_and_sync(&self, buf: &[u8], pos: u64) -> Result<()> {
        let file = self.inner.file();
        let entries = [write_entry(file, buf, pos), datasync_entry(file)];
        // SAFETY: `buf` outlives the call, which waits for both operations to complete.
        let results =
            with_ring(|ring| unsafe { run(ring, &entries) }).map_err(|e| Error::io("write", self.path(), e))?;
        let written = check(results[0]).map_err(|e| Error::io("write", self.path(), e))?;
        if written == buf.len() && check(results[1]).is_ok() {
            return Ok(());
        }
        // A short write cancels the linked sync (and a failed sync is reported by a retry
        // of it): finish the rest one operation at a time.
        self.write_all_at(&buf[written..], pos + written as u64)?;
        self.sync_data()
    }

    fn len(&self) -> Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.inner.set_len(len)
    }

    fn allocate(&self, len: u64) -> Result<()> {
        self.inner.allocate(len)
    }

    fn map_read(&self) -> Result<ReadMap> {
        self.inner.map_read()
    }

    fn map_write(&self) -> Result<WriteMap> {
        self.inner.map_write()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_reads_and_syncs_like_std() {
        let Ok(storage) = UringStorage::new() else {
            panic!("io_uring is unavailable here; run the engine tests with RILL_IO_BACKEND=std");
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let file = storage.open(&path, OpenMode::CreateNew).expect("create");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        file.write_all_at(&data, 0).expect("write");
        file.write_all_at_and_sync(b"tail", data.len() as u64).expect("write and sync");
        file.sync_data().expect("sync");
        assert_eq!(file.len().expect("len"), data.len() as u64 + 4);
        let mut back = vec![0u8; data.len()];
        file.read_exact_at(&mut back, 0).expect("read");
        assert_eq!(back, data);
        assert_eq!(std::fs::read(&path).expect("std read")[data.len()..], *b"tail");
        let mut past_end = [0u8; 8];
        let eof = file.read_exact_at(&mut past_end, data.len() as u64);
        assert!(matches!(eof, Err(Error::Io { op: "read", .. })), "{eof:?}");
    }

    /// A bad descriptor's error comes back as the operation's error, not a hang or panic.
    #[test]
    fn errors_are_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ro");
        std::fs::write(&path, b"x").expect("write");
        let read_only = File::open(&path).expect("open read-only");
        let error = write_all(&read_only, b"y", 0).expect_err("writing a read-only descriptor fails");
        assert_eq!(error.raw_os_error(), Some(9), "EBADF: {error}");
    }
}
