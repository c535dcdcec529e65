//! One partition: a log of segments, its appender, its flusher and its readers.
//!
//! It owns: offset assignment, rolling, the fsync policy and group commit, the visible end
//! offset, recovery on open, clean shutdown, retention, and reads by offset or time.
//! It must never: read or write bytes itself (that is `segment/` through `io/`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use parking_lot::{Mutex, RwLock};

use super::completion::{AppendHandle, AppendInfo, Completion};
use super::group_commit::{GroupCommit, PendingAppend, Round};
use super::visibility::EndWatch;
use crate::config::{Clock, FsyncPolicy, TopicConfig};
use crate::error::{Error, Result};
use crate::format::batch::{
    set_base_offset, set_leader_epoch, Batch, BatchBuilder, BatchHeader, BatchIter, Compression, BATCH_HEADER_SIZE,
};
use crate::format::{ProducerFields, Record, StoredRecord};
use crate::io::{OpenMode, Storage};
use crate::limits::PRODUCERS_PER_PARTITION_MAX;
use crate::metrics::{HistogramSnapshot, LatencyHistogram};
use crate::producer::state::increment_sequence;
use crate::producer::{snapshot, BatchMetadata, ProducerRegistry, ProducerStates, SequenceCheck};
use crate::replica::EpochCache;
use crate::segment::{parse_log_file_name, IndexingState, OpenKind, ScanReport, Segment, SegmentConfig};

/// Name of the file whose presence says the partition was closed cleanly.
pub const CLEAN_SHUTDOWN_FILE: &str = ".clean_shutdown";

/// The appender's state, behind the appender lock.
#[derive(Debug)]
struct Appender {
    active: Arc<Segment>,
    indexing: IndexingState,
    next_offset: u64,
    /// Wall-clock time of the active segment's first batch (for roll by age).
    active_first_append_ms: Option<i64>,
    /// Idempotent-producer state as of `next_offset`.
    producers: ProducerStates,
    /// Leader epochs of the log (persisted in `leader-epoch.checkpoint`).
    epochs: EpochCache,
    /// Who writes: the leader stamps `leader_epoch` on client batches; a follower only
    /// takes the leader's batches.
    role: Role,
    leader_epoch: u32,
    closed: bool,
}

/// Which writes a partition accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Client appends, stamped with the leader epoch (a single node is always this).
    Leader,
    /// Only replica appends copied from the leader.
    Follower,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
        }
    }
}

/// What a partition needs from its store besides its own configuration.
#[derive(Clone, Debug)]
pub struct PartitionContext {
    /// File access.
    pub storage: Arc<dyn Storage>,
    /// Time source.
    pub clock: Arc<dyn Clock>,
    /// The store's producer ids (for "was this id issued" and fencing checks).
    pub registry: Arc<ProducerRegistry>,
    /// Producer ids idle for longer are forgotten.
    pub producer_id_expiration_ms: u64,
}

/// Snapshots kept per partition; older ones are deleted when a new one is written.
const SNAPSHOTS_KEPT: usize = 2;

/// What opening a partition found; useful to operators and tests.
#[derive(Clone, Debug, Default)]
pub struct RecoveryReport {
    /// Whether the partition had been closed cleanly.
    pub clean_shutdown: bool,
    /// Segments whose indices were rebuilt from the log.
    pub rebuilt_indices: u32,
    /// Bytes cut from the end of the log.
    pub truncated_bytes: u64,
    /// Why the tail was cut, if it was.
    pub truncation_reason: Option<String>,
}

/// A partition log.
#[derive(Debug)]
pub struct Partition {
    topic: String,
    id: u32,
    dir: PathBuf,
    config: TopicConfig,
    storage: Arc<dyn Storage>,
    clock: Arc<dyn Clock>,
    registry: Arc<ProducerRegistry>,
    producer_id_expiration_ms: u64,
    appender: Mutex<Appender>,
    segments: RwLock<Arc<Vec<Arc<Segment>>>>,
    end: EndWatch,
    /// The high watermark, published by the replication layer; consumers of a replicated
    /// partition read below it (a single node's consumers read below `end`).
    high_watermark: EndWatch,
    replicated: AtomicBool,
    high_watermark_lock: Mutex<()>,
    log_start: AtomicU64,
    poisoned: AtomicBool,
    poison_cause: Mutex<Option<String>>,
    commit: GroupCommit,
    flusher: Mutex<Option<JoinHandle<()>>>,
    recovery: RecoveryReport,
    fsync_latency: LatencyHistogram,
}

impl Partition {
    /// Opens (or creates) the partition in `dir`, recovering it if it was not closed
    /// cleanly, and starts its flusher thread when the policy needs one.
    pub fn open(
        context: &PartitionContext,
        dir: &Path,
        topic: &str,
        id: u32,
        config: TopicConfig,
    ) -> Result<Arc<Self>> {
        let storage = Arc::clone(&context.storage);
        storage.create_dir_all(dir)?;
        let marker = dir.join(CLEAN_SHUTDOWN_FILE);
        let clean_shutdown = storage.exists(&marker);
        if clean_shutdown {
            // From here on a crash must be recovered: remove the marker durably first.
            storage.remove_file(&marker)?;
            storage.sync_dir(dir)?;
        }
        let seg_config = segment_config(&config);
        let (segments, mut appender, recovery) = open_segments(&*storage, dir, clean_shutdown, &seg_config)?;
        let log_start = segments.first().map_or(0, |s| s.base_offset());
        appender.producers =
            load_producer_state(&*storage, dir, &segments, appender.next_offset, context.clock.now_ms())?;
        appender.epochs = load_epochs(&*storage, dir, &segments, appender.next_offset)?;
        appender.leader_epoch = appender.epochs.latest_epoch();
        let end = appender.next_offset;
        let partition = Arc::new(Partition {
            topic: topic.to_string(),
            id,
            dir: dir.to_path_buf(),
            config,
            storage,
            clock: Arc::clone(&context.clock),
            registry: Arc::clone(&context.registry),
            producer_id_expiration_ms: context.producer_id_expiration_ms,
            appender: Mutex::new(appender),
            segments: RwLock::new(Arc::new(segments)),
            end: EndWatch::new(end),
            high_watermark: EndWatch::new(0),
            replicated: AtomicBool::new(false),
            high_watermark_lock: Mutex::new(()),
            log_start: AtomicU64::new(log_start),
            poisoned: AtomicBool::new(false),
            poison_cause: Mutex::new(None),
            commit: GroupCommit::new(),
            flusher: Mutex::new(None),
            recovery,
            fsync_latency: LatencyHistogram::default(),
        });
        partition.start_flusher()?;
        Ok(partition)
    }

    fn start_flusher(self: &Arc<Self>) -> Result<()> {
        let interval = match self.config.fsync {
            FsyncPolicy::Never => return Ok(()),
            FsyncPolicy::Always => None,
            FsyncPolicy::Interval { interval_ms } => Some(Duration::from_millis(interval_ms)),
        };
        let partition = Arc::clone(self);
        let handle = std::thread::Builder::new()
            .name(format!("rill-flush-{}-{}", self.topic, self.id))
            .spawn(move || partition.run_flusher(interval))
            .map_err(|e| Error::io("spawn flusher thread", &self.dir, e))?;
        *self.flusher.lock() = Some(handle);
        Ok(())
    }

    /// Topic name.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Partition number.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The partition's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The topic configuration this partition runs with.
    pub fn config(&self) -> &TopicConfig {
        &self.config
    }

    /// What recovery found when the partition was opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// First offset still held (retention moves it forward).
    pub fn log_start_offset(&self) -> u64 {
        self.log_start.load(Ordering::Acquire)
    }

    /// Offset the next record visible to consumers will get: every record below it is
    /// acknowledged per the fsync policy (and, on a replicated partition, is below the high
    /// watermark) and readable.
    pub fn end_offset(&self) -> u64 {
        self.visible_end()
    }

    /// End of the local log: acknowledged per the fsync policy, not necessarily replicated.
    /// Followers fetch below it.
    pub fn log_end_offset(&self) -> u64 {
        self.end.load()
    }

    fn visible_end(&self) -> u64 {
        let end = self.end.load();
        if self.replicated.load(Ordering::Acquire) {
            end.min(self.high_watermark.load())
        } else {
            end
        }
    }

    fn visible_watch(&self) -> &EndWatch {
        if self.replicated.load(Ordering::Acquire) {
            &self.high_watermark
        } else {
            &self.end
        }
    }

    /// Latency of the flusher's `fdatasync` calls.
    pub fn fsync_latency(&self) -> HistogramSnapshot {
        self.fsync_latency.snapshot()
    }

    /// Number of segments.
    pub fn segment_count(&self) -> usize {
        self.segments.read().len()
    }

    /// Total bytes of all segments.
    pub fn size_bytes(&self) -> u64 {
        self.segments.read().iter().map(|s| s.size_bytes()).sum()
    }

    fn name(&self) -> String {
        format!("{}-{}", self.topic, self.id)
    }

    fn check_writable(&self) -> Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
            let cause = self.poison_cause.lock().clone().unwrap_or_default();
            return Err(Error::Poisoned { partition: self.name(), cause });
        }
        Ok(())
    }

    fn poison(&self, cause: &Error) {
        let mut slot = self.poison_cause.lock();
        if slot.is_none() {
            *slot = Some(cause.to_string());
        }
        self.poisoned.store(true, Ordering::Release);
    }

    /// Takes the appender lock for a write that `role` may make: the partition must be open,
    /// writable and in that role.
    fn lock_for(&self, role: Role) -> Result<parking_lot::MutexGuard<'_, Appender>> {
        let appender = self.appender.lock();
        if appender.closed {
            return Err(Error::Closed);
        }
        self.check_writable()?;
        if appender.role != role {
            return Err(Error::NotLeader { partition: self.name(), role: appender.role.name() });
        }
        Ok(appender)
    }

    /// Encodes `records` into one batch and appends it.
    pub fn append_records(&self, records: &[Record], compression: Compression) -> Result<AppendHandle> {
        self.append_records_from(None, records, compression)
    }

    /// Encodes `records` into one batch of an idempotent producer and appends it. A retry
    /// of one of the producer's last 5 batches is not appended again: the handle answers
    /// with the original offsets and `duplicate: true`.
    pub fn append_producer_records(
        &self,
        producer: ProducerFields,
        records: &[Record],
        compression: Compression,
    ) -> Result<AppendHandle> {
        self.append_records_from(Some(producer), records, compression)
    }

    fn append_records_from(
        &self,
        producer: Option<ProducerFields>,
        records: &[Record],
        compression: Compression,
    ) -> Result<AppendHandle> {
        let mut builder = BatchBuilder::new(compression, self.clock.now_ms());
        if let Some(producer) = producer {
            builder = builder.producer(producer);
        }
        for record in records {
            builder.push(record)?;
        }
        let batch = builder.build()?;
        let header = BatchHeader::parse(&batch)?;
        self.append_checked(batch, header)
    }

    /// Appends an encoded batch from outside (a client): checks its header, length, CRC
    /// and every record before anything is written. The base offset and leader epoch in the
    /// bytes are ignored and overwritten: the log assigns offsets.
    pub fn append_batch(&self, mut batch: BytesMut) -> Result<AppendHandle> {
        self.check_batch_size(batch.len())?;
        if batch.len() >= BATCH_HEADER_SIZE {
            // Whatever the client put there is not ours to validate: the log assigns both.
            set_base_offset(&mut batch, 0);
            set_leader_epoch(&mut batch, 0);
        }
        let checked = Batch::decode(batch.freeze())?;
        checked.validate_records()?;
        let header = *checked.header();
        let batch = checked.into_bytes().try_into_mut().unwrap_or_else(|shared| BytesMut::from(&shared[..]));
        self.append_checked(batch, header)
    }

    fn check_batch_size(&self, len: usize) -> Result<()> {
        if len as u64 > u64::from(self.config.batch_size_bytes_max) {
            return Err(Error::LimitExceeded {
                limit: "batch_size_bytes_max",
                max: u64::from(self.config.batch_size_bytes_max),
                actual: len as u64,
            });
        }
        Ok(())
    }

    fn append_checked(&self, mut batch: BytesMut, header: BatchHeader) -> Result<AppendHandle> {
        self.check_batch_size(batch.len())?;
        self.check_writable()?;
        let mut appender = self.lock_for(Role::Leader)?;
        let producer = match header.producer {
            None => None,
            Some(fields) => match self.check_producer(&mut appender, &fields, header.record_count)? {
                SequenceCheck::Duplicate(original) => return Ok(self.ack_duplicate(&original)),
                SequenceCheck::Append => Some(fields),
            },
        };
        self.maybe_roll(&mut appender, &header, batch.len() as u64)?;
        let base_offset = appender.next_offset;
        let leader_epoch = appender.leader_epoch;
        set_base_offset(&mut batch, base_offset);
        set_leader_epoch(&mut batch, leader_epoch);
        let header = BatchHeader { base_offset, leader_epoch, ..header };
        self.write_locked(&mut appender, &batch, &header, producer)
    }

    /// Writes a batch whose offsets and epoch are final, records its producer and epoch,
    /// and answers per the fsync policy. Called under the appender lock.
    fn write_locked(
        &self,
        appender: &mut Appender,
        batch: &[u8],
        header: &BatchHeader,
        producer: Option<ProducerFields>,
    ) -> Result<AppendHandle> {
        debug_assert_eq!(header.base_offset, appender.next_offset, "offsets are contiguous");
        if header.leader_epoch > appender.epochs.latest_epoch() {
            // The epoch's first batch: the cache names where it starts before the batch
            // exists, so a crash can only leave an entry at or past the log end.
            let mut epochs = appender.epochs.clone();
            epochs.assign(header.leader_epoch, header.base_offset)?;
            if let Err(e) = epochs.persist(&*self.storage, &self.dir) {
                self.poison(&e);
                return Err(e);
            }
            appender.epochs = epochs;
        }
        let Appender { active, indexing, .. } = &mut *appender;
        if let Err(e) = active.append(batch, header, indexing) {
            // The file may now hold part of the batch; only recovery can tell what is valid.
            self.poison(&e);
            return Err(e);
        }
        appender.next_offset = header.next_offset();
        appender.active_first_append_ms.get_or_insert_with(|| self.clock.now_ms());
        if let Some(fields) = producer {
            appender.producers.record(&fields, batch_metadata(&fields, header), self.clock.now_ms());
        }
        let info = AppendInfo { base_offset: header.base_offset, last_offset: header.last_offset(), duplicate: false };
        match self.config.fsync {
            FsyncPolicy::Always => {
                let completion = Arc::new(Completion::default());
                self.commit.enqueue(PendingAppend {
                    target_end: header.next_offset(),
                    info,
                    completion: Arc::clone(&completion),
                });
                Ok(AppendHandle::pending(completion))
            }
            FsyncPolicy::Interval { .. } | FsyncPolicy::Never => {
                self.end.publish(header.next_offset());
                Ok(AppendHandle::ready(Ok(info)))
            }
        }
    }

    /// Asks the store's registry and the partition's producer state about a batch.
    fn check_producer(
        &self,
        appender: &mut Appender,
        fields: &ProducerFields,
        record_count: u32,
    ) -> Result<SequenceCheck> {
        self.registry.check(fields.producer_id, fields.producer_epoch, fields.base_sequence)?;
        let now_ms = self.clock.now_ms();
        appender.producers.expire_producer(fields.producer_id, now_ms, self.producer_id_expiration_ms);
        if appender.producers.get(fields.producer_id).is_none()
            && appender.producers.len() >= PRODUCERS_PER_PARTITION_MAX as usize
        {
            return Err(Error::LimitExceeded {
                limit: "PRODUCERS_PER_PARTITION_MAX",
                max: u64::from(PRODUCERS_PER_PARTITION_MAX),
                actual: appender.producers.len() as u64 + 1,
            });
        }
        appender.producers.check(fields, record_count)
    }

    /// Answers a retried batch with its original offsets once they are acknowledged.
    fn ack_duplicate(&self, original: &BatchMetadata) -> AppendHandle {
        let info = AppendInfo { base_offset: original.base_offset, last_offset: original.last_offset, duplicate: true };
        if original.last_offset < self.end.load() {
            return AppendHandle::ready(Ok(info));
        }
        // The original is written but its sync is still pending: wait for the same sync.
        let completion = Arc::new(Completion::default());
        self.commit.enqueue(PendingAppend {
            target_end: original.last_offset + 1,
            info,
            completion: Arc::clone(&completion),
        });
        AppendHandle::pending(completion)
    }

    fn maybe_roll(&self, appender: &mut Appender, header: &BatchHeader, batch_len: u64) -> Result<()> {
        let active = &appender.active;
        if active.size_bytes() == 0 {
            return Ok(());
        }
        let too_big = active.size_bytes() + batch_len > self.config.segment_size_bytes;
        let too_old = match (self.config.segment_ms, appender.active_first_append_ms) {
            (Some(limit_ms), Some(first_ms)) => self.clock.now_ms().saturating_sub(first_ms) >= limit_ms as i64,
            _ => false,
        };
        // After this batch the segment's next offset, relative to its base, must still fit u32.
        let offsets_overflow =
            appender.next_offset + u64::from(header.last_offset_delta) + 1 - active.base_offset() > u64::from(u32::MAX);
        if too_big || too_old || offsets_overflow || !active.indices_have_room() {
            self.roll(appender)?;
        }
        Ok(())
    }

    /// Seals the active segment and starts a new one at the next offset.
    fn roll(&self, appender: &mut Appender) -> Result<()> {
        let result = (|| {
            appender.active.seal(&mut appender.indexing)?;
            appender.producers.expire(self.clock.now_ms(), self.producer_id_expiration_ms);
            self.write_snapshot(&appender.producers, appender.next_offset)?;
            let (segment, indexing) =
                Segment::create(&*self.storage, &self.dir, appender.next_offset, &segment_config(&self.config))?;
            self.storage.sync_dir(&self.dir)?;
            Ok::<_, Error>((Arc::new(segment), indexing))
        })();
        let (segment, indexing) = match result {
            Ok(created) => created,
            Err(e) => {
                self.poison(&e);
                return Err(e);
            }
        };
        {
            let mut segments = self.segments.write();
            let mut list = Vec::clone(&segments);
            list.push(Arc::clone(&segment));
            *segments = Arc::new(list);
        }
        appender.active = segment;
        appender.indexing = indexing;
        appender.active_first_append_ms = None;
        Ok(())
    }

    /// Writes the producer state as of `offset` and deletes all but the newest snapshots.
    fn write_snapshot(&self, producers: &ProducerStates, offset: u64) -> Result<()> {
        let path = self.dir.join(snapshot::file_name(offset));
        crate::io::write_atomically(&*self.storage, &path, &snapshot::encode(producers, offset))?;
        let mut offsets = list_snapshots(&*self.storage, &self.dir)?;
        offsets.sort_unstable_by(|a, b| b.cmp(a));
        for old in offsets.into_iter().skip(SNAPSHOTS_KEPT) {
            self.storage.remove_file(&self.dir.join(snapshot::file_name(old)))?;
        }
        Ok(())
    }

    fn run_flusher(&self, interval: Option<Duration>) {
        let mut synced_end = self.end.load();
        loop {
            let pending = match self.commit.next_round(interval) {
                Round::Stop => return,
                Round::Tick => Vec::new(),
                Round::Sync(pending) => pending,
            };
            let (target, active) = {
                let appender = self.appender.lock();
                (appender.next_offset, Arc::clone(&appender.active))
            };
            let result = if self.poisoned.load(Ordering::Acquire) {
                self.check_writable()
            } else if target == synced_end && pending.is_empty() {
                Ok(())
            } else {
                let started = Instant::now();
                let result = active.sync();
                self.fsync_latency.record_us(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
                result
            };
            match result {
                Ok(()) => {
                    synced_end = target;
                    if self.config.fsync == FsyncPolicy::Always {
                        self.end.publish(target);
                    }
                    for append in pending {
                        assert!(
                            append.target_end <= target,
                            "a queued append's bytes were written before the sync began"
                        );
                        append.completion.complete(Ok(append.info));
                    }
                }
                Err(e) => {
                    self.poison(&e);
                    for append in pending {
                        append
                            .completion
                            .complete(Err(Error::Poisoned { partition: self.name(), cause: e.to_string() }));
                    }
                }
            }
        }
    }

    /// Reads whole batches starting with the one that contains `offset`, up to `max_bytes`
    /// (at least one batch), below the end visible to consumers. Returns an empty buffer at
    /// that end.
    pub fn read(&self, offset: u64, max_bytes: u64) -> Result<Bytes> {
        self.read_below(offset, max_bytes, self.visible_end())
    }

    /// [`Partition::read`] for a follower's replica fetch: below the local log end, which
    /// may be past the high watermark.
    pub fn read_replica(&self, offset: u64, max_bytes: u64) -> Result<Bytes> {
        self.read_below(offset, max_bytes, self.end.load())
    }

    fn read_below(&self, offset: u64, max_bytes: u64, end: u64) -> Result<Bytes> {
        let segments = Arc::clone(&self.segments.read());
        let log_start = self.log_start_offset();
        if offset == end {
            return Ok(Bytes::new());
        }
        if offset < log_start || offset > end {
            return Err(Error::OffsetOutOfRange { requested: offset, log_start, log_end: end });
        }
        let i = segments.partition_point(|s| s.base_offset() <= offset);
        for segment in &segments[i.saturating_sub(1)..] {
            if let Some(position) = segment.locate(offset, end)? {
                return segment.read_at(position, max_bytes, end);
            }
        }
        // Retention removed the segment between the checks above and the lookup.
        Err(Error::OffsetOutOfRange { requested: offset, log_start: self.log_start_offset(), log_end: end })
    }

    /// Reads and decodes records from `offset` on (up to `max_bytes` of batches), dropping
    /// the records of the first batch that precede `offset`.
    pub fn read_records(&self, offset: u64, max_bytes: u64) -> Result<Vec<StoredRecord>> {
        let bytes = self.read(offset, max_bytes)?;
        let mut out = Vec::new();
        for batch in BatchIter::new(bytes) {
            out.extend(batch?.records()?.into_iter().filter(|r| r.offset >= offset));
        }
        Ok(out)
    }

    /// Offset of the first record whose timestamp is at least `timestamp_ms` ("replay from
    /// T"), or `None` if no visible record is that recent.
    pub fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<u64>> {
        let end = self.visible_end();
        let segments = Arc::clone(&self.segments.read());
        for segment in segments.iter() {
            if segment.max_timestamp_ms().is_none_or(|max| max < timestamp_ms) {
                continue;
            }
            let Some((header, position)) = segment.find_by_timestamp(timestamp_ms, end)? else {
                continue;
            };
            let bytes = segment.read_at(position, header.size_bytes(), end)?;
            if let Some(batch) = BatchIter::new(bytes).next() {
                let found = batch?.records()?.into_iter().find(|r| r.timestamp_ms >= timestamp_ms);
                if let Some(record) = found {
                    return Ok(Some(record.offset));
                }
            }
        }
        Ok(None)
    }

    /// Blocks until a record at `offset` is visible (returns `true`) or `timeout` passes.
    pub fn wait_for(&self, offset: u64, timeout: Duration) -> bool {
        self.visible_watch().wait_past(offset, Instant::now() + timeout)
    }

    /// Completes when a record at `offset` is visible or the partition closes.
    pub fn wait_for_async(&self, offset: u64) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.visible_watch().register(offset, cx.waker()) {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
    }

    /// Makes this replica the partition's leader for `epoch` (replicated mode): client
    /// appends are stamped with `epoch`, whose first offset is recorded now, and consumers
    /// read below the high watermark. Returns the log end, where the epoch begins.
    pub fn become_leader(&self, epoch: u32) -> Result<u64> {
        self.set_role(Role::Leader, epoch)
    }

    /// Makes this replica a follower in `epoch`: only [`Partition::append_replica`] writes.
    pub fn become_follower(&self, epoch: u32) -> Result<u64> {
        self.set_role(Role::Follower, epoch)
    }

    fn set_role(&self, role: Role, epoch: u32) -> Result<u64> {
        let mut appender = self.appender.lock();
        if appender.closed {
            return Err(Error::Closed);
        }
        let latest = appender.epochs.latest_epoch();
        if epoch < latest {
            return Err(Error::StaleLeaderEpoch { epoch, latest });
        }
        if role == Role::Leader && epoch > latest {
            let mut epochs = appender.epochs.clone();
            epochs.assign(epoch, appender.next_offset)?;
            epochs.persist(&*self.storage, &self.dir)?;
            appender.epochs = epochs;
        }
        appender.role = role;
        appender.leader_epoch = epoch;
        self.replicated.store(true, Ordering::Release);
        Ok(appender.next_offset)
    }

    /// The role and epoch this replica runs with.
    pub fn role(&self) -> (Role, u32) {
        let appender = self.appender.lock();
        (appender.role, appender.leader_epoch)
    }

    /// The newest leader epoch in this log's epoch cache (0 if none is recorded).
    pub fn latest_epoch(&self) -> u32 {
        self.appender.lock().epochs.latest_epoch()
    }

    /// The leader epochs recorded for this log, oldest first.
    pub fn epochs(&self) -> Vec<crate::replica::EpochEntry> {
        self.appender.lock().epochs.entries().to_vec()
    }

    /// Kafka's OffsetsForLeaderEpoch: the largest epoch not above `epoch` in this log and
    /// the offset where it ends here (the newest epoch ends at the acknowledged log end).
    pub fn end_offset_for_epoch(&self, epoch: u32) -> (u32, u64) {
        let appender = self.appender.lock();
        appender.epochs.end_offset_for(epoch, self.end.load())
    }

    /// The high watermark (replicated mode): consumers read below it.
    pub fn high_watermark(&self) -> u64 {
        self.high_watermark.load()
    }

    /// Moves the high watermark forward (never back) and wakes consumers waiting on it.
    pub fn advance_high_watermark(&self, high_watermark: u64) {
        // Leader fetch handlers and follower fetchers may race; the larger value wins.
        let _serial = self.high_watermark_lock.lock();
        if high_watermark > self.high_watermark.load() {
            self.high_watermark.publish(high_watermark);
        }
    }

    /// Appends batches copied from the leader (a replica fetch response): each keeps its
    /// base offset and leader epoch, must continue this log exactly, and passes the same
    /// header, CRC and record checks as a client batch. Producer state and the epoch cache
    /// follow the batches. Returns the handle of the last batch (`None` for no bytes).
    pub fn append_replica(&self, batches: Bytes) -> Result<Option<AppendHandle>> {
        self.check_writable()?;
        let mut appender = self.lock_for(Role::Follower)?;
        let total = batches.len();
        let mut consumed = 0;
        let mut last = None;
        for batch in BatchIter::new(batches) {
            let batch = batch?;
            batch.validate_records()?;
            let header = *batch.header();
            consumed += batch.as_bytes().len();
            self.check_batch_size(batch.as_bytes().len())?;
            if header.base_offset != appender.next_offset {
                return Err(Error::ReplicaGap {
                    partition: self.name(),
                    expected: appender.next_offset,
                    found: header.base_offset,
                });
            }
            let latest = appender.epochs.latest_epoch();
            if header.leader_epoch < latest {
                return Err(Error::StaleLeaderEpoch { epoch: header.leader_epoch, latest });
            }
            self.maybe_roll(&mut appender, &header, batch.as_bytes().len() as u64)?;
            last = Some(self.write_locked(&mut appender, batch.as_bytes(), &header, header.producer)?);
        }
        if consumed != total {
            return Err(Error::MalformedBatch {
                reason: format!("replica data ends with {} bytes that are not a whole batch", total - consumed),
            });
        }
        Ok(last)
    }

    /// Cuts the log of a follower so that it ends at or below `offset`, at a batch boundary
    /// (a divergent suffix found through the leader epochs). Returns the new log end.
    ///
    /// Every earlier append must be acknowledged first (nothing may wait in group commit
    /// for bytes that are cut). Whole segments past the cut are unlinked; a sealed segment
    /// that holds the cut is rewritten to its prefix and renamed over (readers keep their
    /// maps of the old file); the active one is cut in place. The log is then reopened from
    /// disk, as recovery would, which also rebuilds producer state.
    pub fn truncate_to(&self, offset: u64) -> Result<u64> {
        let mut appender = self.lock_for(Role::Follower)?;
        if offset >= appender.next_offset {
            // Nothing to cut from the log, but epochs that begin at its end wrote nothing
            // here (this replica led them without appending): forget them, or the leader's
            // batches of an older epoch would look stale.
            let end = appender.next_offset;
            let mut epochs = appender.epochs.clone();
            if epochs.truncate_from_end(end, false) {
                epochs.persist(&*self.storage, &self.dir)?;
                appender.epochs = epochs;
            }
            return Ok(end);
        }
        if self.end.load() != appender.next_offset {
            return Err(Error::InvalidConfig {
                reason: format!("{}: truncation while appends await their sync", self.name()),
            });
        }
        let log_start = self.log_start_offset();
        if offset < log_start {
            return Err(Error::OffsetOutOfRange { requested: offset, log_start, log_end: appender.next_offset });
        }
        let result = self.cut_files(&mut appender, offset);
        if let Err(e) = &result {
            self.poison(e);
        }
        result
    }

    fn cut_files(&self, appender: &mut Appender, offset: u64) -> Result<u64> {
        let mut epochs = appender.epochs.clone();
        if epochs.truncate_from_end(offset, false) {
            epochs.persist(&*self.storage, &self.dir)?;
        }
        let segments = Arc::clone(&self.segments.read());
        let end = appender.next_offset;
        for segment in segments.iter().rev() {
            if segment.base_offset() >= offset && segment.base_offset() > log_start_of(&segments) {
                segment.remove_files(&*self.storage)?;
                continue;
            }
            let Some(position) = segment.locate(offset, end)? else { break };
            if segment.is_sealed() {
                copy_prefix(&*self.storage, segment.log_path(), position)?;
            } else {
                segment.log_file().set_len(position)?;
                segment.log_file().sync_data()?;
            }
            break;
        }
        self.storage.sync_dir(&self.dir)?;
        let (reopened, mut fresh, _report) =
            open_segments(&*self.storage, &self.dir, false, &segment_config(&self.config))?;
        fresh.producers =
            load_producer_state(&*self.storage, &self.dir, &reopened, fresh.next_offset, self.clock.now_ms())?;
        if epochs.truncate_from_end(fresh.next_offset, true) {
            epochs.persist(&*self.storage, &self.dir)?;
        }
        fresh.epochs = epochs;
        fresh.role = appender.role;
        fresh.leader_epoch = appender.leader_epoch;
        let new_end = fresh.next_offset;
        debug_assert!(new_end <= offset, "the cut ends at or below the offset asked for");
        *self.segments.write() = Arc::new(reopened);
        *appender = fresh;
        // The only place the end moves back: nothing is pending (checked above) and no
        // flusher round is in flight for bytes past the cut.
        self.end.reset(new_end);
        Ok(new_end)
    }

    /// Completes when the local log end passes `offset` (a replica fetch's long poll) or
    /// the partition closes.
    pub fn wait_for_log_async(&self, offset: u64) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.end.register(offset, cx.waker()) {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
    }

    /// Deletes whole sealed segments beyond the retention limits; never the active one.
    /// Returns the number of segments removed.
    pub fn enforce_retention(&self) -> Result<usize> {
        let now_ms = self.clock.now_ms();
        let removed = {
            let mut segments = self.segments.write();
            let mut total: u64 = segments.iter().map(|s| s.size_bytes()).sum();
            let mut keep_from = 0;
            for segment in segments.iter().take(segments.len().saturating_sub(1)) {
                let over_size = self.config.retention_bytes.is_some_and(|max| total > max);
                let too_old = match (self.config.retention_ms, segment.max_timestamp_ms()) {
                    (Some(limit), Some(max_ts)) => now_ms.saturating_sub(max_ts) > limit as i64,
                    _ => false,
                };
                if !(over_size || too_old) {
                    break;
                }
                debug_assert!(segment.is_sealed(), "only sealed segments are deleted");
                total -= segment.size_bytes();
                keep_from += 1;
            }
            if keep_from == 0 {
                return Ok(0);
            }
            let removed: Vec<_> = segments[..keep_from].to_vec();
            let kept = Arc::new(segments[keep_from..].to_vec());
            self.log_start.store(kept[0].base_offset(), Ordering::Release);
            *segments = kept;
            removed
        };
        for segment in &removed {
            segment.remove_files(&*self.storage)?;
        }
        self.storage.sync_dir(&self.dir)?;
        Ok(removed.len())
    }

    /// Stops the flusher after it has completed every queued append. Idempotent.
    fn stop_flusher(&self) {
        self.commit.stop();
        if let Some(handle) = self.flusher.lock().take() {
            // A panicked flusher has already failed its appends; nothing more to report.
            if handle.join().is_err() {
                self.poisoned.store(true, Ordering::Release);
            }
        }
    }

    /// Closes the partition. With `clean`, syncs everything, trims the indices and writes
    /// the clean-shutdown marker so the next open skips recovery. Idempotent.
    pub fn close(&self, clean: bool) -> Result<()> {
        {
            let mut appender = self.appender.lock();
            if appender.closed {
                return Ok(());
            }
            appender.closed = true;
        }
        self.stop_flusher();
        self.end.close();
        self.high_watermark.close();
        if !clean || self.poisoned.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut appender = self.appender.lock();
        let Appender { active, indexing, producers, next_offset, .. } = &mut *appender;
        active.sync()?;
        active.close_indices(indexing)?;
        self.write_snapshot(producers, *next_offset)?;
        let marker = self.dir.join(CLEAN_SHUTDOWN_FILE);
        let file = self.storage.open(&marker, OpenMode::CreateNew)?;
        file.sync_data()?;
        self.storage.sync_dir(&self.dir)
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.commit.stop();
    }
}

fn segment_config(config: &TopicConfig) -> SegmentConfig {
    SegmentConfig { index_interval_bytes: config.index_interval_bytes, index_size_bytes: config.index_size_bytes }
}

type Opened = (Vec<Arc<Segment>>, Appender, RecoveryReport);

/// Loads every segment: sealed ones trusted after their index check, the last one
/// recovered by a full scan unless the shutdown was clean.
fn open_segments(storage: &dyn Storage, dir: &Path, clean_shutdown: bool, config: &SegmentConfig) -> Result<Opened> {
    let mut bases = Vec::new();
    for path in storage.list_dir(dir)? {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if let Some(base) = parse_log_file_name(name) {
            bases.push(base);
        } else if name.ends_with(".log.cut") {
            // An unfinished truncation: the old file is still in place.
            storage.remove_file(&path)?;
        } else if name.ends_with(".index") || name.ends_with(".timeindex") {
            // Indices without their log are leftovers of a deleted or unfinished segment.
            if !storage.exists(&path.with_extension("log")) {
                storage.remove_file(&path)?;
            }
        }
    }
    bases.sort_unstable();
    let mut report = RecoveryReport { clean_shutdown, ..RecoveryReport::default() };
    if bases.is_empty() {
        let (segment, indexing) = Segment::create(storage, dir, 0, config)?;
        storage.sync_dir(dir)?;
        let segment = Arc::new(segment);
        let appender = Appender {
            active: Arc::clone(&segment),
            indexing,
            next_offset: 0,
            active_first_append_ms: None,
            producers: ProducerStates::new(),
            epochs: EpochCache::default(),
            role: Role::Leader,
            leader_epoch: 0,
            closed: false,
        };
        return Ok((vec![segment], appender, report));
    }
    let mut segments = Vec::with_capacity(bases.len());
    let mut last_indexing = None;
    for (i, &base) in bases.iter().enumerate() {
        let kind = match bases.get(i + 1) {
            Some(&end_offset) => OpenKind::Sealed { end_offset },
            None if clean_shutdown => OpenKind::ActiveClean,
            None => OpenKind::ActiveRecover,
        };
        let path = dir.join(crate::segment::log_file_name(base));
        let (segment, indexing, scan) = Segment::open(storage, &path, base, kind, config)?;
        note_scan(&mut report, &scan);
        segments.push(Arc::new(segment));
        last_indexing = Some(indexing);
    }
    let active = Arc::clone(segments.last().expect("at least one segment was opened"));
    let indexing = last_indexing.expect("at least one segment was opened");
    let appender = Appender {
        next_offset: active.next_offset(),
        active_first_append_ms: None,
        active,
        indexing,
        producers: ProducerStates::new(),
        epochs: EpochCache::default(),
        role: Role::Leader,
        leader_epoch: 0,
        closed: false,
    };
    Ok((segments, appender, report))
}

fn note_scan(report: &mut RecoveryReport, scan: &ScanReport) {
    if scan.rebuilt_indices {
        report.rebuilt_indices += 1;
    }
    if scan.truncated_bytes > 0 {
        report.truncated_bytes += scan.truncated_bytes;
        if let crate::segment::ScanEnd::Invalid { position, reason } = &scan.end {
            report.truncation_reason = Some(format!("at byte {position}: {reason}"));
        }
    }
}

fn batch_metadata(fields: &ProducerFields, header: &BatchHeader) -> BatchMetadata {
    BatchMetadata {
        first_sequence: fields.base_sequence,
        last_sequence: increment_sequence(fields.base_sequence, header.record_count - 1),
        base_offset: header.base_offset,
        last_offset: header.last_offset(),
        timestamp_ms: header.max_timestamp_ms,
    }
}

fn list_snapshots(storage: &dyn Storage, dir: &Path) -> Result<Vec<u64>> {
    Ok(storage
        .list_dir(dir)?
        .iter()
        .filter_map(|p| p.file_name().and_then(|n| n.to_str()).and_then(snapshot::parse_file_name))
        .collect())
}

/// Rebuilds producer state: the newest readable snapshot at or below the log end, then
/// every producer batch after it. Snapshots past the end (the log was truncated below
/// them) and damaged ones are deleted; without any, the state is rebuilt from the whole log.
fn load_producer_state(
    storage: &dyn Storage,
    dir: &Path,
    segments: &[Arc<Segment>],
    end_offset: u64,
    now_ms: i64,
) -> Result<ProducerStates> {
    let mut offsets = list_snapshots(storage, dir)?;
    offsets.sort_unstable_by(|a, b| b.cmp(a));
    let log_start = segments.first().map_or(0, |s| s.base_offset());
    let mut loaded = None;
    for offset in offsets {
        let path = dir.join(snapshot::file_name(offset));
        if offset > end_offset || loaded.is_some() {
            if offset > end_offset {
                storage.remove_file(&path)?;
            }
            continue;
        }
        match read_snapshot(storage, &path) {
            Ok((states, at)) if at == offset => loaded = Some((states, offset)),
            // A damaged snapshot is only a cache of the log: drop it and use an older one
            // or the log itself.
            _ => storage.remove_file(&path)?,
        }
    }
    let (mut states, from) = loaded.unwrap_or_else(|| (ProducerStates::new(), log_start));
    let from = from.max(log_start);
    for segment in segments.iter().filter(|s| s.next_offset() > from) {
        segment.visit_headers(from, end_offset, |header| {
            if let Some(fields) = header.producer {
                states.record(&fields, batch_metadata(&fields, header), now_ms);
            }
        })?;
    }
    Ok(states)
}

fn read_snapshot(storage: &dyn Storage, path: &Path) -> Result<(ProducerStates, u64)> {
    snapshot::decode(&crate::io::read_bounded(storage, path, snapshot::SNAPSHOT_SIZE_BYTES_MAX)?)
}

/// Base offset of the first segment.
fn log_start_of(segments: &[Arc<Segment>]) -> u64 {
    segments.first().map_or(0, |s| s.base_offset())
}

/// Replaces the sealed log file at `path` by its first `len` bytes: the prefix is written
/// to a new file, synced and renamed over the old one, so a reader's map of the old file
/// stays valid and a crash leaves one or the other.
fn copy_prefix(storage: &dyn Storage, path: &Path, len: u64) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    let old = storage.open(path, OpenMode::ReadWrite)?;
    let tmp = path.with_extension("log.cut");
    if storage.exists(&tmp) {
        storage.remove_file(&tmp)?;
    }
    let new = storage.open(&tmp, OpenMode::CreateNew)?;
    let mut buf = vec![0u8; CHUNK.min(len) as usize];
    let mut pos = 0;
    while pos < len {
        let n = CHUNK.min(len - pos) as usize;
        old.read_exact_at(&mut buf[..n], pos)?;
        new.write_all_at(&buf[..n], pos)?;
        pos += n as u64;
    }
    new.sync_data()?;
    storage.rename(&tmp, path)
}

/// Loads the leader-epoch cache: the checkpoint file, or none for a log that was never
/// replicated; a damaged checkpoint is rebuilt from the batch headers. Entries that start
/// past the log end (a crash cut the log after they were written) are dropped.
fn load_epochs(storage: &dyn Storage, dir: &Path, segments: &[Arc<Segment>], end_offset: u64) -> Result<EpochCache> {
    let mut epochs = match EpochCache::load(storage, dir) {
        Ok(loaded) => loaded.unwrap_or_default(),
        Err(_) => {
            let mut rebuilt = EpochCache::default();
            let mut failed = None;
            for segment in segments {
                segment.visit_headers(segment.base_offset(), end_offset, |header| {
                    if header.leader_epoch > rebuilt.latest_epoch() {
                        if let Err(e) = rebuilt.assign(header.leader_epoch, header.base_offset) {
                            failed.get_or_insert(e);
                        }
                    }
                })?;
            }
            if let Some(e) = failed {
                return Err(e);
            }
            rebuilt.persist(storage, dir)?;
            rebuilt
        }
    };
    if epochs.truncate_from_end(end_offset.saturating_add(1), false) {
        epochs.persist(storage, dir)?;
    }
    Ok(epochs)
}
