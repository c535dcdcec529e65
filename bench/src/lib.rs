//! Shared helpers of the rill benchmarks: the criterion benches (`benches/engine.rs`) and
//! the `rill-bench` binary (`src/bin/rill-bench.rs`) build their workloads here so that
//! both measure the same thing.

pub mod idempotence;
pub mod load;
pub mod priority;
pub mod server_load;
pub mod summary;
pub mod sync_floor;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use rill_engine::format::batch::{peek_batch_size, BatchBuilder, BatchHeader};
use rill_engine::io::{OpenMode, ReadMap, StdStorage, Storage, StorageFile, WriteMap};
use rill_engine::{Compression, Record};

/// `count` records, each with a value of `value_size` bytes (no key, no headers). The
/// values share one buffer, so building many of them costs nothing.
pub fn records(count: usize, value_size: usize) -> Vec<Record> {
    let value = Bytes::from((0..value_size).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    (0..count).map(|_| Record::from_value(value.clone())).collect()
}

/// Encodes `records` into one uncompressed batch stamped `now_ms`.
pub fn encode(records: &[Record], now_ms: i64) -> rill_engine::Result<BytesMut> {
    let mut builder = BatchBuilder::new(Compression::None, now_ms);
    for record in records {
        builder.push(record)?;
    }
    builder.build()
}

/// Walks the batches of a read result by their headers only (the bytes of the records are
/// not touched). Returns the number of whole batches, their total size in bytes, and the
/// offset following the last one, or `None` if the buffer holds no whole batch.
pub fn walk_headers(buf: &[u8]) -> rill_engine::Result<(u64, u64, Option<u64>)> {
    let mut position = 0usize;
    let mut batches = 0u64;
    let mut next_offset = None;
    while let Some(size) = peek_batch_size(&buf[position..]) {
        let size = size as usize;
        if position + size > buf.len() {
            break;
        }
        let header = BatchHeader::parse(&buf[position..])?;
        next_offset = Some(header.next_offset());
        batches += 1;
        position += size;
    }
    Ok((batches, position as u64, next_offset))
}

/// A scratch directory that is removed (with everything in it) when dropped.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates a fresh, uniquely named directory inside `parent`.
    pub fn new_in(parent: &Path) -> std::io::Result<Self> {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let path = parent.join(format!("rill-bench-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(ScratchDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        // Best effort: a scratch directory that cannot be removed is only wasted space.
        drop(std::fs::remove_dir_all(&self.path));
    }
}

/// The current wall-clock time in ms since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A [`Storage`] over the real file system that counts and times every `write_all_at` and
/// `sync_data` of the files it opens (the group-commit benchmark's window onto the disk).
/// Writes are tallied with atomics; sync durations (one flusher per partition, so a few
/// thousand a second at most) are kept individually for percentiles.
#[derive(Debug, Clone, Default)]
pub struct TimingStorage {
    stats: Arc<IoStats>,
}

/// What a [`TimingStorage`] has seen so far.
#[derive(Debug, Default)]
pub struct IoStats {
    writes: AtomicU64,
    write_bytes: AtomicU64,
    write_ns: AtomicU64,
    write_ns_max: AtomicU64,
    sync_ns: Mutex<Vec<u64>>,
}

/// A copy of the counters of an [`IoStats`] at one moment.
#[derive(Clone, Debug, Default)]
pub struct IoSnapshot {
    /// `write_all_at` calls.
    pub writes: u64,
    /// Bytes written by them.
    pub write_bytes: u64,
    /// Total time spent in them.
    pub write_ns: u64,
    /// Duration of each `sync_data` call, in call order.
    pub sync_ns: Vec<u64>,
}

impl TimingStorage {
    /// A fresh storage with zeroed counters.
    pub fn new() -> Self {
        Self::default()
    }

    /// The counters now.
    pub fn snapshot(&self) -> IoSnapshot {
        IoSnapshot {
            writes: self.stats.writes.load(Ordering::Relaxed),
            write_bytes: self.stats.write_bytes.load(Ordering::Relaxed),
            write_ns: self.stats.write_ns.load(Ordering::Relaxed),
            sync_ns: self.stats.sync_ns.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone(),
        }
    }

    /// Longest single write so far (ns); [`TimingStorage::reset_write_max`] restarts it.
    pub fn write_ns_max(&self) -> u64 {
        self.stats.write_ns_max.load(Ordering::Relaxed)
    }

    /// Restarts the longest-write tracking.
    pub fn reset_write_max(&self) {
        self.stats.write_ns_max.store(0, Ordering::Relaxed);
    }
}

impl Storage for TimingStorage {
    fn open(&self, path: &Path, mode: OpenMode) -> rill_engine::Result<Arc<dyn StorageFile>> {
        let inner = StdStorage.open(path, mode)?;
        Ok(Arc::new(TimingFile { inner, stats: Arc::clone(&self.stats) }))
    }
    fn remove_file(&self, path: &Path) -> rill_engine::Result<()> {
        StdStorage.remove_file(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> rill_engine::Result<()> {
        StdStorage.rename(from, to)
    }
    fn create_dir_all(&self, path: &Path) -> rill_engine::Result<()> {
        StdStorage.create_dir_all(path)
    }
    fn remove_dir_all(&self, path: &Path) -> rill_engine::Result<()> {
        StdStorage.remove_dir_all(path)
    }
    fn sync_dir(&self, path: &Path) -> rill_engine::Result<()> {
        StdStorage.sync_dir(path)
    }
    fn list_dir(&self, path: &Path) -> rill_engine::Result<Vec<PathBuf>> {
        StdStorage.list_dir(path)
    }
    fn exists(&self, path: &Path) -> bool {
        StdStorage.exists(path)
    }
}

#[derive(Debug)]
struct TimingFile {
    inner: Arc<dyn StorageFile>,
    stats: Arc<IoStats>,
}

fn elapsed_ns(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

impl StorageFile for TimingFile {
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn write_all_at(&self, buf: &[u8], pos: u64) -> rill_engine::Result<()> {
        let start = Instant::now();
        let result = self.inner.write_all_at(buf, pos);
        let ns = elapsed_ns(start);
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.stats.write_bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.stats.write_ns.fetch_add(ns, Ordering::Relaxed);
        self.stats.write_ns_max.fetch_max(ns, Ordering::Relaxed);
        result
    }
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> rill_engine::Result<()> {
        self.inner.read_exact_at(buf, pos)
    }
    fn sync_data(&self) -> rill_engine::Result<()> {
        let start = Instant::now();
        let result = self.inner.sync_data();
        let ns = elapsed_ns(start);
        self.stats.sync_ns.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(ns);
        result
    }
    fn len(&self) -> rill_engine::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> rill_engine::Result<()> {
        self.inner.set_len(len)
    }
    fn allocate(&self, len: u64) -> rill_engine::Result<()> {
        self.inner.allocate(len)
    }
    fn map_read(&self) -> rill_engine::Result<ReadMap> {
        self.inner.map_read()
    }
    fn map_write(&self) -> rill_engine::Result<WriteMap> {
        self.inner.map_write()
    }
}

/// Scheduler accounting from `/proc/<task>/schedstat`: time on a CPU and time spent
/// runnable but waiting for one (ns). `None` where the kernel does not provide it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sched {
    /// Nanoseconds spent running on a CPU.
    pub on_cpu_ns: u64,
    /// Nanoseconds spent runnable, waiting in a run queue.
    pub wait_ns: u64,
}

impl Sched {
    /// The difference `self - earlier`.
    pub fn since(self, earlier: Sched) -> Sched {
        Sched {
            on_cpu_ns: self.on_cpu_ns.saturating_sub(earlier.on_cpu_ns),
            wait_ns: self.wait_ns.saturating_sub(earlier.wait_ns),
        }
    }

    fn parse(text: &str) -> Option<Sched> {
        let mut fields = text.split_whitespace();
        let on_cpu_ns = fields.next()?.parse().ok()?;
        let wait_ns = fields.next()?.parse().ok()?;
        Some(Sched { on_cpu_ns, wait_ns })
    }

    /// The calling thread's accounting.
    pub fn thread() -> Option<Sched> {
        Sched::parse(&std::fs::read_to_string("/proc/thread-self/schedstat").ok()?)
    }

    /// The sum over every live thread of this process.
    pub fn process() -> Option<Sched> {
        let mut total = Sched::default();
        for entry in std::fs::read_dir("/proc/self/task").ok()? {
            let Ok(entry) = entry else { continue };
            // A thread that exited since the listing is simply skipped.
            let Ok(text) = std::fs::read_to_string(entry.path().join("schedstat")) else { continue };
            let sched = Sched::parse(&text)?;
            total.on_cpu_ns += sched.on_cpu_ns;
            total.wait_ns += sched.wait_ns;
        }
        Some(total)
    }
}

/// CPU seconds (user + system) used by the waited-for children of this process, from
/// `/proc/self/stat` (clock ticks of 1/100 s, the Linux default).
pub fn children_cpu_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let cutime: f64 = fields.get(13)?.parse().ok()?;
    let cstime: f64 = fields.get(14)?.parse().ok()?;
    Some((cutime + cstime) / 100.0)
}

/// The 1-minute load average.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}
