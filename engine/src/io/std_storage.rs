//! The standard backend: `pread`/`pwrite`/`fdatasync` through `std::fs`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::mmap::{ReadMap, WriteMap};
use super::{OpenMode, Storage, StorageFile};
use crate::error::{Error, Result};

/// Files on the local file system (the directory operations are the trait's defaults).
#[derive(Debug, Default, Clone, Copy)]
pub struct StdStorage;

impl Storage for StdStorage {
    fn open(&self, path: &Path, mode: OpenMode) -> Result<Arc<dyn StorageFile>> {
        Ok(Arc::new(StdFile::open(path, mode)?))
    }
}

/// A file opened by [`StdStorage`].
#[derive(Debug)]
pub struct StdFile {
    file: File,
    path: PathBuf,
}

impl StdFile {
    /// Opens `path` in `mode`.
    pub fn open(path: &Path, mode: OpenMode) -> Result<Self> {
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        match mode {
            OpenMode::CreateNew => options.create_new(true),
            OpenMode::ReadWrite => options.create(false),
        };
        let file = options.open(path).map_err(|e| Error::io("open", path, e))?;
        Ok(StdFile { file, path: path.to_path_buf() })
    }

    /// The open file.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }
}

impl StdFile {
    /// Extends the file to `len` by writing zeros after its current end.
    fn allocate_by_writing(&self, len: u64) -> Result<()> {
        const CHUNK: u64 = 64 * 1024;
        let zeros = vec![0u8; CHUNK as usize];
        let mut pos = self.len()?;
        while pos < len {
            let n = (len - pos).min(CHUNK);
            self.write_all_at(&zeros[..n as usize], pos)?;
            pos += n;
        }
        Ok(())
    }
}

impl StorageFile for StdFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn write_all_at(&self, buf: &[u8], pos: u64) -> Result<()> {
        self.file.write_all_at(buf, pos).map_err(|e| Error::io("write", &self.path, e))
    }

    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        self.file.read_exact_at(buf, pos).map_err(|e| Error::io("read", &self.path, e))
    }

    fn sync_data(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::io("fdatasync", &self.path, e))
    }

    fn len(&self) -> Result<u64> {
        Ok(self.file.metadata().map_err(|e| Error::io("stat", &self.path, e))?.len())
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.file.set_len(len).map_err(|e| Error::io("truncate", &self.path, e))
    }

    fn allocate(&self, len: u64) -> Result<()> {
        use rustix::io::Errno;
        match rustix::fs::fallocate(&self.file, rustix::fs::FallocateFlags::empty(), 0, len) {
            Ok(()) => Ok(()),
            // The file system cannot allocate without writing: write the zeros ourselves.
            Err(e) if e == Errno::OPNOTSUPP || e == Errno::NOSYS => self.allocate_by_writing(len),
            Err(e) => Err(Error::io("fallocate", &self.path, e.into())),
        }
    }

    fn map_read(&self) -> Result<ReadMap> {
        ReadMap::new(&self.file, &self.path)
    }

    fn map_write(&self) -> Result<WriteMap> {
        WriteMap::new(&self.file, &self.path)
    }
}
