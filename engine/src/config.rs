//! Configuration of the store and of each topic, with validation.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::io::{StdStorage, Storage};
use crate::limits::{
    BATCH_SIZE_BYTES_MAX, INDEX_SIZE_BYTES_MAX, PARTITIONS_PER_TOPIC_MAX, SEGMENT_SIZE_BYTES_MAX,
    SEGMENT_SIZE_BYTES_MIN,
};

/// When appended bytes are made durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum FsyncPolicy {
    /// An append is acknowledged only after `fdatasync` of its bytes (group-committed).
    #[default]
    Always,
    /// Appends are acknowledged once written; a background thread syncs every `interval_ms`.
    /// A crash loses at most the appends of the last interval.
    Interval {
        /// Time between syncs.
        interval_ms: u64,
    },
    /// Appends are acknowledged once written to the page cache; never synced by rill
    /// (the OS writes them back). For benchmarks and caches.
    Never,
}

/// Per-topic configuration, fixed at creation and stored in `topic.meta`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicConfig {
    /// Number of partitions.
    pub partitions: u32,
    /// Durability policy.
    pub fsync: FsyncPolicy,
    /// Roll the active segment when the next batch would take it past this size.
    pub segment_size_bytes: u64,
    /// Roll the active segment when its first batch is older than this.
    pub segment_ms: Option<u64>,
    /// Delete the oldest sealed segments while the partition is larger than this.
    pub retention_bytes: Option<u64>,
    /// Delete sealed segments whose newest record is older than this.
    pub retention_ms: Option<u64>,
    /// Bytes of log between offset index entries.
    pub index_interval_bytes: u32,
    /// Preallocated size of each index file of the active segment.
    pub index_size_bytes: u64,
    /// Largest batch an append accepts (at most [`BATCH_SIZE_BYTES_MAX`]).
    pub batch_size_bytes_max: u32,
}

const DAY_MS: u64 = 24 * 60 * 60 * 1000;

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig {
            partitions: 1,
            fsync: FsyncPolicy::Always,
            segment_size_bytes: 1024 * 1024 * 1024,
            segment_ms: Some(7 * DAY_MS),
            retention_bytes: None,
            retention_ms: Some(7 * DAY_MS),
            index_interval_bytes: 4096,
            index_size_bytes: 10 * 1024 * 1024,
            batch_size_bytes_max: 8 * 1024 * 1024,
        }
    }
}

impl TopicConfig {
    /// Checks every value against its limit.
    pub fn validate(&self) -> Result<()> {
        let invalid = |reason: String| Err(Error::InvalidConfig { reason });
        if self.partitions == 0 || self.partitions > PARTITIONS_PER_TOPIC_MAX {
            return invalid(format!("partitions must be in 1..={PARTITIONS_PER_TOPIC_MAX}, got {}", self.partitions));
        }
        if !(SEGMENT_SIZE_BYTES_MIN..=SEGMENT_SIZE_BYTES_MAX).contains(&self.segment_size_bytes) {
            return invalid(format!(
                "segment_size_bytes must be in {SEGMENT_SIZE_BYTES_MIN}..={SEGMENT_SIZE_BYTES_MAX}, got {}",
                self.segment_size_bytes
            ));
        }
        if self.batch_size_bytes_max == 0 || self.batch_size_bytes_max > BATCH_SIZE_BYTES_MAX {
            return invalid(format!(
                "batch_size_bytes_max must be in 1..={BATCH_SIZE_BYTES_MAX}, got {}",
                self.batch_size_bytes_max
            ));
        }
        if self.index_interval_bytes == 0 {
            return invalid("index_interval_bytes must be positive".into());
        }
        if !(64..=INDEX_SIZE_BYTES_MAX).contains(&self.index_size_bytes) {
            return invalid(format!(
                "index_size_bytes must be in 64..={INDEX_SIZE_BYTES_MAX}, got {}",
                self.index_size_bytes
            ));
        }
        if let FsyncPolicy::Interval { interval_ms } = self.fsync {
            if interval_ms == 0 || interval_ms > DAY_MS {
                return invalid(format!("fsync interval must be in 1..={DAY_MS} ms, got {interval_ms}"));
            }
        }
        if self.segment_ms == Some(0) || self.retention_ms == Some(0) {
            return invalid("segment_ms and retention_ms must be positive when set".into());
        }
        Ok(())
    }
}

/// Source of wall-clock time in ms since the Unix epoch (replaceable in tests).
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Current time.
    fn now_ms(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
    }
}

/// A clock that moves only when told to (tests of roll-by-age and retention).
#[derive(Debug, Default)]
pub struct ManualClock {
    now_ms: AtomicI64,
}

impl ManualClock {
    /// A clock reading `now_ms`.
    pub fn new(now_ms: i64) -> Self {
        ManualClock { now_ms: AtomicI64::new(now_ms) }
    }

    /// Moves the clock forward.
    pub fn advance_ms(&self, delta_ms: i64) {
        self.now_ms.fetch_add(delta_ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.now_ms.load(Ordering::SeqCst)
    }
}

/// Store-wide configuration.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// File access backend.
    pub storage: Arc<dyn Storage>,
    /// Time source for timestamps, segment age and retention.
    pub clock: Arc<dyn Clock>,
    /// How often the background thread applies retention; `None` disables the thread
    /// (call [`crate::Store::enforce_retention`] yourself).
    pub retention_check_interval_ms: Option<u64>,
    /// A producer id with no batch for this long is forgotten by each partition; its next
    /// batch must then start a new sequence at 0 (Kafka's `producer.id.expiration.ms`).
    pub producer_id_expiration_ms: u64,
    /// This node's id in a cluster (0 for a single node): the high bits of the producer
    /// ids it issues, so ids from different leaders never collide.
    pub node_id: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        // `RILL_IO_BACKEND=uring` runs a store on io_uring (falling back to the standard
        // calls where the kernel refuses it); see `io::Backend::from_env`.
        let storage = crate::io::Backend::from_env().storage().unwrap_or_else(|_| Arc::new(StdStorage));
        StoreConfig {
            storage,
            clock: Arc::new(SystemClock),
            retention_check_interval_ms: Some(30_000),
            producer_id_expiration_ms: DAY_MS,
            node_id: 0,
        }
    }
}
