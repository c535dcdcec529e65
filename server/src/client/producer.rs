//! The batching producer: records are routed to a partition (murmur2 of the key, else
//! round-robin), gathered into one open batch per partition, and sent by one task per
//! partition that keeps up to [`PRODUCER_INFLIGHT_BATCHES_MAX`] batches in flight, in order.
//!
//! Idempotence: every batch carries the producer id, epoch and the sequence number of its
//! first record; sequences advance by record count per partition. A retry resends the same
//! encoded batch, so the server recognises it and answers with the original offsets.
//!
//! It owns: partition choice, batching, sequence numbers, retries and their bounds.
//! It must never: resend a batch with a different sequence unless the server is known not to
//! have appended it, or settle a partition's batches out of order.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use rill_engine::format::batch::{set_producer_fields, BATCH_HEADER_SIZE};
use rill_engine::format::{BatchBuilder, Compression, Header, ProducerFields, Record};
use rill_engine::limits::{BATCH_SIZE_BYTES_MAX, RECORDS_PER_BATCH_MAX};
use rill_engine::log::partitioner::partition_for_key;
use rill_engine::producer::state::increment_sequence;
use rill_engine::ProducerIdentity;
use tokio::sync::{oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::{clone_error, produce_ack, Client, ResponseFuture};
use crate::error::{Error, ErrorCode, Result};
use crate::messages::{Acks, Request, Response};

/// Batches one partition keeps in flight. The server remembers a producer's last 5 batches
/// per partition (`rill_engine::producer::state::BATCHES_PER_PRODUCER_MAX`), so a retry of
/// any batch in flight is still recognised as a duplicate.
pub const PRODUCER_INFLIGHT_BATCHES_MAX: usize = rill_engine::producer::state::BATCHES_PER_PRODUCER_MAX;

/// First retry delay; doubled per attempt up to [`RETRY_BACKOFF_MS_MAX`].
const RETRY_BACKOFF_MS_MIN: u64 = 20;
/// Longest retry delay.
const RETRY_BACKOFF_MS_MAX: u64 = 1_000;
/// Bytes counted per record on top of its key, value and headers (varints, attributes),
/// for the buffer bound.
const RECORD_OVERHEAD_BYTES: usize = 32;

/// Settings of a [`Producer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProducerConfig {
    /// How long a partition's open batch waits for more records before it is sent.
    pub linger_ms: u64,
    /// A batch is sent once its encoded records reach this size.
    pub batch_size_bytes: usize,
    /// Stamp batches with a producer id and sequence numbers so that retries never
    /// duplicate records. Without it, a retry may duplicate or reorder records.
    pub idempotent: bool,
    /// Acknowledgement level: [`Acks::Leader`] or [`Acks::All`] (replicated: every in-sync
    /// replica holds the batch); the producer needs an answer to know where records landed
    /// (use [`Client::produce`] for fire-and-forget).
    pub acks: Acks,
    /// Compression of each batch's records.
    pub compression: Compression,
    /// Retries of one batch after retriable errors (throttling, a dropped connection, a
    /// timeout) before its records fail.
    pub max_retries: u32,
    /// How long one attempt waits for its response; on expiry the connection is closed and
    /// the batch retried on a new one.
    pub request_timeout_ms: u64,
    /// Record bytes buffered or in flight across all partitions; `send` waits for room.
    pub buffer_size_bytes: u64,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            linger_ms: 1,
            batch_size_bytes: 256 * 1024,
            idempotent: true,
            acks: Acks::Leader,
            compression: Compression::None,
            max_retries: 20,
            request_timeout_ms: 30_000,
            buffer_size_bytes: 32 * 1024 * 1024,
        }
    }
}

impl ProducerConfig {
    fn validate(&self) -> Result<()> {
        let invalid = |reason: String| Err(Error::Config { reason });
        if self.acks == Acks::None {
            return invalid(
                "the producer needs acks = leader or all to learn offsets; use Client::produce for acks = none".into(),
            );
        }
        let batch_max = BATCH_SIZE_BYTES_MAX as usize - BATCH_HEADER_SIZE;
        if self.batch_size_bytes == 0 || self.batch_size_bytes > batch_max {
            return invalid(format!("batch_size_bytes must be in 1..={batch_max}, got {}", self.batch_size_bytes));
        }
        if self.buffer_size_bytes == 0 || self.buffer_size_bytes > u64::from(u32::MAX) {
            return invalid(format!("buffer_size_bytes must be in 1..={}, got {}", u32::MAX, self.buffer_size_bytes));
        }
        if self.request_timeout_ms == 0 {
            return invalid("request_timeout_ms must be positive".into());
        }
        Ok(())
    }
}

/// Where a record landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SendReceipt {
    /// Partition the record was appended to.
    pub partition: u32,
    /// The record's offset.
    pub offset: u64,
}

/// A batching, retrying, by default idempotent producer over a [`Client`]. Cheap to clone.
/// Dropping the last clone sends what is buffered in the background; await [`flush`] or
/// [`close`] to know it was sent.
///
/// [`flush`]: Producer::flush
/// [`close`]: Producer::close
#[derive(Clone, Debug)]
pub struct Producer {
    handle: Arc<Handle>,
}

/// The user-side owner; its drop starts the background shutdown.
#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Release);
        for entry in self.shared.topics.lock().values() {
            for queue in entry.queues.values() {
                queue.wake.notify_one();
            }
        }
    }
}

#[derive(Debug)]
struct Shared {
    client: Client,
    config: ProducerConfig,
    runtime: tokio::runtime::Handle,
    /// Topics by name; lock order: `topics` before any partition queue's state.
    topics: Mutex<HashMap<String, TopicEntry>>,
    /// Topics whose partition count is being looked up.
    resolving: watch::Sender<usize>,
    /// Permits are record bytes buffered or in flight.
    buffer: Arc<Semaphore>,
    /// The producer identity every partition starts with.
    identity: tokio::sync::OnceCell<ProducerIdentity>,
    closing: AtomicBool,
}

#[derive(Debug, Default)]
struct TopicEntry {
    /// Partition count from metadata; `None` until looked up or after it went stale.
    partitions: Option<u32>,
    resolving: bool,
    /// Records sent while the partition count was unknown, in send order.
    waiting: Vec<(Record, Waiter)>,
    /// Kept when the count goes stale: a partition's sequence numbers live in its queue.
    queues: HashMap<u32, Arc<PartitionQueue>>,
    round_robin: u32,
}

/// One record's caller, waiting for its receipt; holds the record's buffer bytes.
#[derive(Debug)]
struct Waiter {
    tx: oneshot::Sender<Result<SendReceipt>>,
    _permit: OwnedSemaphorePermit,
}

impl Waiter {
    fn settle(self, result: Result<SendReceipt>) {
        // The caller may have dropped its future: the record was still sent.
        self.tx.send(result).ok();
    }
}

impl Producer {
    /// A producer over `client`; must be called inside a tokio runtime (its tasks run there).
    pub fn new(client: Client, config: ProducerConfig) -> Result<Producer> {
        config.validate()?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| Error::Config { reason: format!("Producer::new needs a tokio runtime: {e}") })?;
        let buffer = Arc::new(Semaphore::new(config.buffer_size_bytes as usize));
        let shared = Arc::new(Shared {
            client,
            config,
            runtime,
            topics: Mutex::new(HashMap::new()),
            resolving: watch::Sender::new(0),
            buffer,
            identity: tokio::sync::OnceCell::new(),
            closing: AtomicBool::new(false),
        });
        Ok(Producer { handle: Arc::new(Handle { shared }) })
    }

    /// Sends one record. It is queued when `send` is called (so records sent one after
    /// another keep their order within a partition), unless the buffer is full: then the
    /// returned future waits for room before queueing. The future resolves once the batch
    /// holding the record is acknowledged.
    pub fn send(
        &self,
        topic: &str,
        key: Option<Bytes>,
        value: Bytes,
        headers: Vec<Header>,
    ) -> impl Future<Output = Result<SendReceipt>> + Send + 'static {
        let record = Record { timestamp_ms: Some(now_ms()), key, value: Some(value), headers };
        let handle = Arc::clone(&self.handle);
        let cost = record_cost(&record, handle.shared.config.buffer_size_bytes);
        let queued = match Arc::clone(&handle.shared.buffer).try_acquire_many_owned(cost) {
            Ok(permit) => Ok(handle.shared.enqueue(topic, record, permit)),
            Err(_no_room) => Err((topic.to_string(), record)),
        };
        async move {
            let rx = match queued {
                Ok(rx) => rx,
                Err((topic, record)) => {
                    let permit = Arc::clone(&handle.shared.buffer)
                        .acquire_many_owned(cost)
                        .await
                        .map_err(|_closed| Error::ConnectionClosed)?;
                    handle.shared.enqueue(&topic, record, permit)
                }
            };
            let receipt = rx.await.map_err(|_dropped| Error::ConnectionClosed)?;
            drop(handle);
            receipt
        }
    }

    /// Sends every record queued so far without waiting for linger, and waits until each has
    /// been acknowledged or has failed (the outcome is reported to each record's future).
    pub async fn flush(&self) {
        let shared = &self.handle.shared;
        let mut resolving = shared.resolving.subscribe();
        // Records of topics whose partition count is being looked up are routed first.
        resolving.wait_for(|count| *count == 0).await.ok();
        let targets: Vec<(Arc<PartitionQueue>, u64)> = {
            let topics = shared.topics.lock();
            topics
                .values()
                .flat_map(|entry| entry.queues.values())
                .map(|queue| (Arc::clone(queue), queue.seal_now()))
                .collect()
        };
        for (queue, target) in targets {
            queue.wake.notify_one();
            let mut settled = queue.settled.subscribe();
            settled.wait_for(|settled| *settled >= target).await.ok();
        }
    }

    /// Flushes, then lets the partition tasks stop.
    pub async fn close(self) {
        self.flush().await;
    }
}

fn now_ms() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// Bytes a record is charged against the buffer (capped so that one huge record can still
/// be sent alone).
fn record_cost(record: &Record, buffer_size_bytes: u64) -> u32 {
    let size = record_size(record) as u64;
    u32::try_from(size.min(buffer_size_bytes)).unwrap_or(u32::MAX)
}

fn record_size(record: &Record) -> usize {
    let key = record.key.as_ref().map_or(0, Bytes::len);
    let value = record.value.as_ref().map_or(0, Bytes::len);
    let headers: usize = record.headers.iter().map(|h| h.key.len() + h.value.as_ref().map_or(0, Bytes::len) + 8).sum();
    key + value + headers + RECORD_OVERHEAD_BYTES
}

impl Shared {
    /// Routes a record to its partition queue, or parks it until the topic's partition
    /// count is known. Returns where its receipt will arrive.
    fn enqueue(
        self: &Arc<Self>,
        topic: &str,
        record: Record,
        permit: OwnedSemaphorePermit,
    ) -> oneshot::Receiver<Result<SendReceipt>> {
        let (tx, rx) = oneshot::channel();
        let waiter = Waiter { tx, _permit: permit };
        let mut topics = self.topics.lock();
        let entry = topics.entry(topic.to_string()).or_default();
        match entry.partitions {
            Some(partitions) => self.route(topic, entry, partitions, record, waiter),
            None => {
                entry.waiting.push((record, waiter));
                if !entry.resolving {
                    entry.resolving = true;
                    self.resolving.send_modify(|count| *count += 1);
                    self.runtime.spawn(resolve_topic(Arc::clone(self), topic.to_string()));
                }
            }
        }
        rx
    }

    fn route(self: &Arc<Self>, topic: &str, entry: &mut TopicEntry, partitions: u32, record: Record, waiter: Waiter) {
        let partition = match &record.key {
            Some(key) => partition_for_key(key, partitions),
            None => {
                let partition = entry.round_robin % partitions;
                entry.round_robin = entry.round_robin.wrapping_add(1);
                partition
            }
        };
        let queue = entry.queues.entry(partition).or_insert_with(|| {
            let queue = Arc::new(PartitionQueue::new(topic, partition));
            queue.state.lock().task_running = true;
            self.spawn_task(&queue);
            queue
        });
        if queue.push(record, waiter, &self.config) {
            self.spawn_task(queue);
        }
    }

    fn spawn_task(self: &Arc<Self>, queue: &Arc<PartitionQueue>) {
        let task = PartitionTask::new(Arc::clone(self), Arc::clone(queue));
        self.runtime.spawn(task.run());
    }

    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.config.request_timeout_ms)
    }

    /// The partition count of `topic`, from metadata.
    async fn partition_count(&self, topic: &str) -> Result<u32> {
        let timeout_ms = self.config.request_timeout_ms;
        let metadata = tokio::time::timeout(self.request_timeout(), self.client.metadata(&[topic]))
            .await
            .map_err(|_elapsed| Error::Timeout { what: "metadata", timeout_ms })??;
        let partitions = metadata.iter().find(|t| t.name == topic).map_or(0, |t| t.partitions.len());
        if partitions == 0 {
            return Err(Error::Server {
                code: ErrorCode::TopicNotFound,
                message: format!("topic '{topic}' is not in the metadata"),
                retry_after_ms: None,
            });
        }
        u32::try_from(partitions).map_err(|_overflow| Error::malformed("partition count over u32"))
    }

    /// A new producer identity from the server.
    async fn new_identity(&self) -> Result<ProducerIdentity> {
        let timeout_ms = self.config.request_timeout_ms;
        tokio::time::timeout(self.request_timeout(), self.client.init_producer_id(None))
            .await
            .map_err(|_elapsed| Error::Timeout { what: "init producer id", timeout_ms })?
    }

    /// Forgets a topic's partition count so that the next record looks it up again.
    fn invalidate(&self, topic: &str) {
        if let Some(entry) = self.topics.lock().get_mut(topic) {
            entry.partitions = None;
        }
    }
}

/// Looks up a topic's partition count, then routes the records that waited for it.
async fn resolve_topic(shared: Arc<Shared>, topic: String) {
    let result = shared.partition_count(&topic).await;
    {
        let mut topics = shared.topics.lock();
        let entry = topics.entry(topic.clone()).or_default();
        entry.resolving = false;
        let waiting = std::mem::take(&mut entry.waiting);
        match &result {
            Ok(partitions) => {
                entry.partitions = Some(*partitions);
                for (record, waiter) in waiting {
                    shared.route(&topic, entry, *partitions, record, waiter);
                }
            }
            Err(e) => {
                for (_record, waiter) in waiting {
                    waiter.settle(Err(clone_error(e)));
                }
            }
        }
    }
    shared.resolving.send_modify(|count| *count -= 1);
}

/// A batch being filled.
#[derive(Debug)]
struct OpenBatch {
    builder: BatchBuilder,
    waiters: Vec<Waiter>,
    opened_at: Instant,
}

/// A batch closed for records, waiting for its turn to be sent.
#[derive(Debug)]
struct SealedBatch {
    builder: BatchBuilder,
    waiters: Vec<Waiter>,
}

/// Per-partition sequence bookkeeping, kept in the queue while no task runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Sequencing {
    /// The identity this partition's batches carry; `None` until first needed, and again
    /// after a failure that leaves the server's expected sequence unknown or stale.
    identity: Option<ProducerIdentity>,
    /// Whether the producer's shared identity was taken (later ones are fresh).
    shared_identity_taken: bool,
    /// Sequence of the next batch's first record.
    next_sequence: i32,
}

impl Sequencing {
    /// Producer fields for a batch of `record_count` records; advances the sequence.
    fn stamp(&mut self, identity: ProducerIdentity, record_count: u32) -> ProducerFields {
        debug_assert!(self.identity == Some(identity), "stamping with the partition's identity");
        let fields = ProducerFields {
            producer_id: identity.producer_id,
            producer_epoch: identity.producer_epoch,
            base_sequence: self.next_sequence,
        };
        self.next_sequence = increment_sequence(self.next_sequence, record_count);
        fields
    }

    /// Switches to `identity`, whose sequences start at 0.
    fn reset(&mut self, identity: Option<ProducerIdentity>) {
        self.identity = identity;
        self.next_sequence = 0;
    }
}

#[derive(Debug, Default)]
struct QueueState {
    open: Option<OpenBatch>,
    sealed: VecDeque<SealedBatch>,
    /// Batches sealed so far; a flush waits until as many are settled.
    sealed_total: u64,
    task_running: bool,
    sequencing: Sequencing,
}

impl QueueState {
    fn seal(&mut self) {
        if let Some(open) = self.open.take() {
            if !open.waiters.is_empty() {
                self.sealed.push_back(SealedBatch { builder: open.builder, waiters: open.waiters });
                self.sealed_total += 1;
            }
        }
    }

    fn is_idle(&self) -> bool {
        self.open.is_none() && self.sealed.is_empty()
    }
}

/// Records of one partition on their way to its task.
#[derive(Debug)]
struct PartitionQueue {
    topic: String,
    partition: u32,
    state: Mutex<QueueState>,
    /// Woken when a batch is sealed, a batch is opened (its linger starts) or on shutdown.
    wake: Notify,
    /// Batches settled (acknowledged or failed), in order.
    settled: watch::Sender<u64>,
}

impl PartitionQueue {
    fn new(topic: &str, partition: u32) -> Self {
        PartitionQueue {
            topic: topic.to_string(),
            partition,
            state: Mutex::new(QueueState::default()),
            wake: Notify::new(),
            settled: watch::Sender::new(0),
        }
    }

    /// Adds a record to the open batch. Returns whether a task must be started for it.
    fn push(&self, record: Record, waiter: Waiter, config: &ProducerConfig) -> bool {
        let mut state = self.state.lock();
        let size = record_size(&record);
        if state.open.as_ref().is_some_and(|open| open.builder.records_size_bytes() + size > config.batch_size_bytes) {
            state.seal();
        }
        let mut wake = false;
        let open = state.open.get_or_insert_with(|| {
            wake = true;
            OpenBatch {
                builder: BatchBuilder::new(config.compression, 0),
                waiters: Vec::new(),
                opened_at: Instant::now(),
            }
        });
        match open.builder.push(&record) {
            Ok(()) => open.waiters.push(waiter),
            Err(e) => waiter.settle(Err(Error::Engine(e))),
        }
        let full = open.builder.records_size_bytes() >= config.batch_size_bytes
            || open.builder.record_count() >= RECORDS_PER_BATCH_MAX;
        if full {
            state.seal();
            wake = true;
        }
        let start_task = !state.task_running;
        state.task_running = true;
        drop(state);
        if wake {
            self.wake.notify_one();
        }
        start_task
    }

    /// Seals the open batch; returns how many batches must settle for all records queued
    /// so far to be settled.
    fn seal_now(&self) -> u64 {
        let mut state = self.state.lock();
        state.seal();
        state.sealed_total
    }

    fn pop_sealed(&self) -> Option<SealedBatch> {
        self.state.lock().sealed.pop_front()
    }
}

/// Where a batch in flight stands.
#[derive(Debug)]
enum Status {
    /// Must be (re)sent.
    Unsent,
    /// Sent; the response is awaited until `deadline`.
    Waiting { response: ResponseFuture, deadline: Instant },
    /// The outcome is known but earlier batches are not settled yet.
    Done(Result<Response>),
    /// Never sent (it could not be built or stamped): fails without touching sequences.
    Failed(Error),
}

#[derive(Debug)]
struct InFlight {
    batch: Bytes,
    record_count: u32,
    waiters: Vec<Waiter>,
    /// Sends after the first.
    retries: u32,
    status: Status,
}

impl InFlight {
    /// Waits for this batch's outcome and takes it. A timeout closes the connection, so
    /// that every later request on it fails too and is retried in order. Cancel-safe: the
    /// response future stays in place until the outcome is known.
    async fn outcome(&mut self, timeout_ms: u64) -> Result<Response> {
        if let Status::Waiting { response, deadline } = &mut self.status {
            let outcome = match tokio::time::timeout_at(*deadline, &mut *response).await {
                Ok(Ok(Some(response))) => Ok(response),
                Ok(Ok(None)) => Err(Error::malformed("a produce with acks got no response")),
                Ok(Err(e)) => Err(e),
                Err(_elapsed) => {
                    response.close_connection();
                    Err(Error::Timeout { what: "produce response", timeout_ms })
                }
            };
            self.status = Status::Done(outcome);
        }
        match std::mem::replace(&mut self.status, Status::Unsent) {
            Status::Done(outcome) => outcome,
            Status::Failed(e) => Err(e),
            Status::Unsent | Status::Waiting { .. } => {
                Err(Error::malformed("a produce outcome was awaited before the batch was sent"))
            }
        }
    }

    /// Waits for the outcome without taking it (when a batch ahead of it failed).
    async fn collect(&mut self, timeout_ms: u64) {
        if matches!(self.status, Status::Waiting { .. }) {
            let outcome = self.outcome(timeout_ms).await;
            self.status = Status::Done(outcome);
        }
    }
}

/// Whether, and after how long, a failed produce may be sent again unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Retry {
    /// Retry after this delay (the server's hint), or after backoff if `None`.
    After(Option<u64>),
    /// Do not retry.
    Never,
}

/// Classifies a produce failure for retrying.
fn retry_of(error: &Error) -> Retry {
    match error {
        Error::Server { code: ErrorCode::Throttled, retry_after_ms, .. } => Retry::After(retry_after_ms.map(u64::from)),
        // A sequence gap after a reconnect: an earlier batch is being resent; retry in order.
        Error::Server { code: ErrorCode::ShuttingDown | ErrorCode::OutOfOrderSequence, .. } => Retry::After(None),
        Error::ConnectionClosed | Error::Io { .. } | Error::Timeout { .. } | Error::Protocol { .. } => {
            Retry::After(None)
        }
        _ => Retry::Never,
    }
}

/// Whether a failed produce is known not to be in the log (the server rejected it), as
/// opposed to an outcome that is unknown (the connection dropped, the storage failed).
fn known_not_appended(error: &Error) -> bool {
    match error {
        Error::Server { code, .. } => !matches!(code, ErrorCode::StorageError | ErrorCode::Internal),
        Error::Engine(_) | Error::Config { .. } | Error::FrameTooLarge { .. } => true,
        _ => false,
    }
}

fn backoff_ms(retries: u32) -> u64 {
    RETRY_BACKOFF_MS_MIN.saturating_mul(1u64 << retries.min(16)).min(RETRY_BACKOFF_MS_MAX)
}

/// Rewrites the producer fields of an encoded batch and its CRC (the fields lie inside the
/// CRC's range). Used only for batches the server is known not to have appended.
fn restamp(batch: &[u8], fields: ProducerFields) -> Bytes {
    let mut out = BytesMut::from(batch);
    set_producer_fields(&mut out, fields);
    out.freeze()
}

/// Sends one partition's batches in order and settles them in order.
struct PartitionTask {
    shared: Arc<Shared>,
    queue: Arc<PartitionQueue>,
    sequencing: Sequencing,
    inflight: VecDeque<InFlight>,
    settled: u64,
}

impl PartitionTask {
    fn new(shared: Arc<Shared>, queue: Arc<PartitionQueue>) -> Self {
        let sequencing = queue.state.lock().sequencing;
        let settled = *queue.settled.borrow();
        PartitionTask { shared, queue, sequencing, inflight: VecDeque::new(), settled }
    }

    async fn run(mut self) {
        loop {
            let linger_deadline = self.seal_due();
            self.send_unsent().await;
            self.start_sealed().await;
            if self.inflight.is_empty() {
                if self.try_exit() {
                    return;
                }
                tokio::select! {
                    () = self.queue.wake.notified() => {}
                    () = sleep_until(linger_deadline) => {}
                }
                continue;
            }
            let room = self.inflight.len() < PRODUCER_INFLIGHT_BATCHES_MAX;
            let timeout_ms = self.shared.config.request_timeout_ms;
            let front = self.inflight.front_mut().expect("in-flight queue checked non-empty");
            let outcome = tokio::select! {
                outcome = front.outcome(timeout_ms) => Some(outcome),
                () = self.queue.wake.notified(), if room => None,
                () = sleep_until(linger_deadline) => None,
            };
            if let Some(outcome) = outcome {
                self.settle_front(outcome).await;
            }
        }
    }

    /// Seals the open batch if its linger expired (or the producer is closing); returns
    /// when it expires otherwise.
    fn seal_due(&self) -> Option<Instant> {
        let mut state = self.queue.state.lock();
        let due = state.open.as_ref()?.opened_at + Duration::from_millis(self.shared.config.linger_ms);
        if self.shared.is_closing() || Instant::now() >= due {
            state.seal();
            return None;
        }
        Some(due)
    }

    /// Stops the task if the producer is closing and nothing is left; the queue's
    /// sequencing is kept for a task started later.
    fn try_exit(&self) -> bool {
        if !self.shared.is_closing() {
            return false;
        }
        let mut state = self.queue.state.lock();
        if !state.is_idle() {
            return false;
        }
        state.task_running = false;
        state.sequencing = self.sequencing;
        true
    }

    /// The identity for this partition's next batch.
    async fn identity(&mut self) -> Result<ProducerIdentity> {
        if let Some(identity) = self.sequencing.identity {
            return Ok(identity);
        }
        let identity = if self.sequencing.shared_identity_taken {
            self.shared.new_identity().await?
        } else {
            let shared = Arc::clone(&self.shared);
            let identity = *shared.identity.get_or_try_init(|| shared.new_identity()).await?;
            self.sequencing.shared_identity_taken = true;
            identity
        };
        self.sequencing.reset(Some(identity));
        Ok(identity)
    }

    /// Builds and sends sealed batches while fewer than the maximum are in flight.
    async fn start_sealed(&mut self) {
        while self.inflight.len() < PRODUCER_INFLIGHT_BATCHES_MAX {
            let Some(SealedBatch { builder, waiters }) = self.queue.pop_sealed() else { return };
            let record_count = builder.record_count();
            let mut entry = InFlight { batch: Bytes::new(), record_count, waiters, retries: 0, status: Status::Unsent };
            match self.build(builder).await {
                Ok(batch) => {
                    entry.batch = batch;
                    start_entry(&self.shared, &self.queue, &mut entry).await;
                }
                Err(e) => entry.status = Status::Failed(e),
            }
            self.inflight.push_back(entry);
        }
    }

    async fn build(&mut self, builder: BatchBuilder) -> Result<Bytes> {
        if !self.shared.config.idempotent {
            return Ok(builder.build()?.freeze());
        }
        let identity = self.identity().await?;
        let before = self.sequencing;
        let fields = self.sequencing.stamp(identity, builder.record_count());
        match builder.producer(fields).build() {
            Ok(batch) => Ok(batch.freeze()),
            Err(e) => {
                self.sequencing = before; // nothing was sent: the sequence is not used
                Err(Error::Engine(e))
            }
        }
    }

    async fn send_unsent(&mut self) {
        for entry in self.inflight.iter_mut() {
            if matches!(entry.status, Status::Unsent) {
                start_entry(&self.shared, &self.queue, entry).await;
            }
        }
    }

    async fn settle_front(&mut self, outcome: Result<Response>) {
        let error = match outcome {
            Ok(response) => {
                let front = self.inflight.pop_front().expect("the front batch exists");
                self.complete(front.waiters, front.record_count, response);
                return;
            }
            Err(e) => e,
        };
        let retries = self.inflight.front().map_or(0, |f| f.retries);
        match retry_of(&error) {
            Retry::After(hint) if retries < self.shared.config.max_retries => {
                self.retry_in_order(&error, hint.unwrap_or_else(|| backoff_ms(retries))).await;
            }
            _ => self.fail_front(error).await,
        }
    }

    /// Settles a batch with its offsets: record `i` gets `base_offset + i`.
    fn complete(&mut self, waiters: Vec<Waiter>, record_count: u32, response: Response) {
        let result = produce_ack(response).and_then(|ack| {
            let count = ack.last_offset - ack.base_offset + 1;
            if count != u64::from(record_count) {
                return Err(Error::malformed(format!(
                    "a batch of {record_count} records was answered with {count} offsets"
                )));
            }
            Ok(ack)
        });
        let partition = self.queue.partition;
        match result {
            Ok(ack) => {
                for (i, waiter) in waiters.into_iter().enumerate() {
                    waiter.settle(Ok(SendReceipt { partition, offset: ack.base_offset + i as u64 }));
                }
            }
            Err(e) => settle_all(waiters, &e),
        }
        self.mark_settled();
    }

    fn mark_settled(&mut self) {
        self.settled += 1;
        self.queue.settled.send_replace(self.settled);
    }

    /// The front batch failed retriably. The batches behind it went out on the same
    /// connection and follow it in sequence, so their outcomes are collected too; then every
    /// retriable one is resent, unchanged and in order, after `delay_ms`.
    async fn retry_in_order(&mut self, error: &Error, delay_ms: u64) {
        tracing::debug!(topic = %self.queue.topic, partition = self.queue.partition, %error, delay_ms, "retrying produce");
        let timeout_ms = self.shared.config.request_timeout_ms;
        let max_retries = self.shared.config.max_retries;
        for entry in self.inflight.iter_mut().skip(1) {
            entry.collect(timeout_ms).await;
        }
        for (i, entry) in self.inflight.iter_mut().enumerate() {
            let retriable = match &entry.status {
                Status::Done(Err(e)) => retry_of(e) != Retry::Never,
                Status::Unsent => i == 0,
                _ => false,
            };
            if retriable && entry.retries < max_retries {
                entry.retries += 1;
                entry.status = Status::Unsent;
            }
        }
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    }

    /// The front batch failed for good.
    async fn fail_front(&mut self, error: Error) {
        let front = self.inflight.pop_front().expect("the front batch exists");
        // A batch that could not be built or stamped was never sent and used no sequence.
        let sent = !front.batch.is_empty();
        tracing::debug!(topic = %self.queue.topic, partition = self.queue.partition, %error, "produce failed");
        if matches!(&error, Error::Server { code: ErrorCode::TopicNotFound | ErrorCode::PartitionNotFound, .. }) {
            self.shared.invalidate(&self.queue.topic);
        }
        settle_all(front.waiters, &error);
        self.mark_settled();
        if !self.shared.config.idempotent || !sent {
            return;
        }
        // The server's next expected sequence for this identity is the failed batch's (or
        // unknown): later batches cannot be appended under it. Continue with a fresh one.
        self.sequencing.reset(None);
        let timeout_ms = self.shared.config.request_timeout_ms;
        for entry in self.inflight.iter_mut() {
            entry.collect(timeout_ms).await;
        }
        if known_not_appended(&error) {
            self.resequence().await;
        } else {
            self.fail_sent(&error);
        }
    }

    /// After a batch was rejected, none of the batches sent behind it can be in the log (the
    /// server refuses sequence gaps): stamp them under a fresh identity and resend in order.
    async fn resequence(&mut self) {
        let identity = match self.identity().await {
            Ok(identity) => identity,
            Err(e) => return self.fail_sent(&e),
        };
        for entry in self.inflight.iter_mut() {
            let resend = match &entry.status {
                Status::Done(Err(_)) | Status::Unsent => true,
                Status::Done(Ok(_)) | Status::Failed(_) | Status::Waiting { .. } => false,
            };
            if resend {
                let fields = self.sequencing.stamp(identity, entry.record_count);
                entry.batch = restamp(&entry.batch, fields);
                entry.status = Status::Unsent;
            }
        }
    }

    /// After a batch's outcome became unknown, the batches behind it cannot be resent
    /// without risking duplicates: settle them all, in order, with what is known.
    fn fail_sent(&mut self, error: &Error) {
        while let Some(InFlight { status, waiters, record_count, .. }) = self.inflight.pop_front() {
            match status {
                Status::Done(Ok(response)) => self.complete(waiters, record_count, response),
                Status::Failed(e) => {
                    settle_all(waiters, &e);
                    self.mark_settled();
                }
                Status::Done(Err(_)) | Status::Unsent | Status::Waiting { .. } => {
                    settle_all(waiters, error);
                    self.mark_settled();
                }
            }
        }
    }
}

fn settle_all(waiters: Vec<Waiter>, error: &Error) {
    for waiter in waiters {
        waiter.settle(Err(clone_error(error)));
    }
}

async fn start_entry(shared: &Shared, queue: &PartitionQueue, entry: &mut InFlight) {
    let request = Request::Produce {
        topic: queue.topic.clone(),
        partition: queue.partition,
        acks: shared.config.acks,
        batch: entry.batch.clone(),
    };
    entry.status = match shared.client.start(request).await {
        Ok(response) => Status::Waiting { response, deadline: Instant::now() + shared.request_timeout() },
        Err(e) => Status::Done(Err(e)),
    };
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rill_engine::format::{Batch, BatchHeader};

    fn server_error(code: ErrorCode, retry_after_ms: Option<u32>) -> Error {
        Error::Server { code, message: String::new(), retry_after_ms }
    }

    /// Throttling is retried after the server's hint; sequence gaps, shutdown and transport
    /// failures after backoff; every other rejection is final.
    #[test]
    fn retry_classification() {
        assert_eq!(retry_of(&server_error(ErrorCode::Throttled, Some(25))), Retry::After(Some(25)));
        assert_eq!(retry_of(&server_error(ErrorCode::OutOfOrderSequence, None)), Retry::After(None));
        assert_eq!(retry_of(&server_error(ErrorCode::ShuttingDown, None)), Retry::After(None));
        assert_eq!(retry_of(&Error::ConnectionClosed), Retry::After(None));
        assert_eq!(retry_of(&Error::Timeout { what: "x", timeout_ms: 1 }), Retry::After(None));
        assert_eq!(retry_of(&server_error(ErrorCode::InvalidBatch, None)), Retry::Never);
        assert_eq!(retry_of(&server_error(ErrorCode::StorageError, None)), Retry::Never);
        assert!(known_not_appended(&server_error(ErrorCode::InvalidBatch, None)));
        assert!(known_not_appended(&server_error(ErrorCode::OutOfOrderSequence, None)));
        assert!(!known_not_appended(&server_error(ErrorCode::StorageError, None)));
        assert!(!known_not_appended(&Error::ConnectionClosed));
        assert!(!known_not_appended(&Error::Timeout { what: "x", timeout_ms: 1 }));
    }

    /// Backoff doubles from the minimum and stays at the maximum, whatever the attempt.
    #[test]
    fn backoff_is_bounded() {
        assert_eq!(backoff_ms(0), RETRY_BACKOFF_MS_MIN);
        assert_eq!(backoff_ms(1), 2 * RETRY_BACKOFF_MS_MIN);
        assert_eq!(backoff_ms(30), RETRY_BACKOFF_MS_MAX);
        assert_eq!(backoff_ms(u32::MAX), RETRY_BACKOFF_MS_MAX);
    }

    /// Sequences advance by record count per batch and wrap from i32::MAX to 0; a reset
    /// starts a new identity at 0.
    #[test]
    fn sequence_bookkeeping() {
        let identity = ProducerIdentity { producer_id: 3, producer_epoch: 1 };
        let mut seq = Sequencing::default();
        seq.reset(Some(identity));
        assert_eq!(seq.stamp(identity, 3).base_sequence, 0);
        assert_eq!(seq.stamp(identity, 2).base_sequence, 3);
        assert_eq!(seq.next_sequence, 5);
        seq.next_sequence = i32::MAX - 1;
        let fields = seq.stamp(identity, 4);
        assert_eq!((fields.producer_id, fields.producer_epoch, fields.base_sequence), (3, 1, i32::MAX - 1));
        assert_eq!(seq.next_sequence, 2);
        let other = ProducerIdentity { producer_id: 4, producer_epoch: 0 };
        seq.reset(Some(other));
        assert_eq!(seq.stamp(other, 1).base_sequence, 0);
    }

    /// Restamping gives exactly the batch the builder would have written with the new
    /// fields: valid CRC, same records.
    #[test]
    fn restamp_equals_building_with_the_new_fields() {
        let build = |fields: ProducerFields| {
            let mut builder = BatchBuilder::new(Compression::Lz4, 7).producer(fields);
            builder.push(&Record::keyed("k", "v")).expect("push");
            builder.push(&Record::from_value("w")).expect("push");
            builder.build().expect("build").freeze()
        };
        let old = ProducerFields { producer_id: 1, producer_epoch: 0, base_sequence: 10 };
        let new = ProducerFields { producer_id: 9, producer_epoch: 2, base_sequence: 0 };
        let restamped = restamp(&build(old), new);
        assert_eq!(restamped, build(new));
        let batch = Batch::decode(restamped).expect("valid CRC");
        assert_eq!(batch.header().producer, Some(new));
        assert_eq!(batch.records().expect("records").len(), 2);
        assert_eq!(BatchHeader::parse(batch.as_bytes()).expect("header").record_count, 2);
    }

    /// Configurations the producer cannot honour are refused up front.
    #[test]
    fn config_validation() {
        assert!(ProducerConfig::default().validate().is_ok());
        assert!(ProducerConfig { acks: Acks::None, ..ProducerConfig::default() }.validate().is_err());
        assert!(ProducerConfig { batch_size_bytes: 0, ..ProducerConfig::default() }.validate().is_err());
        assert!(ProducerConfig { batch_size_bytes: BATCH_SIZE_BYTES_MAX as usize, ..ProducerConfig::default() }
            .validate()
            .is_err());
        assert!(ProducerConfig { buffer_size_bytes: 0, ..ProducerConfig::default() }.validate().is_err());
    }

    /// A queue seals its open batch once it reaches the batch size, and before a record that
    /// would take it past the size; empty batches are never sealed.
    #[test]
    fn queue_seals_by_size() {
        let config = ProducerConfig { batch_size_bytes: 200, ..ProducerConfig::default() };
        let buffer = Arc::new(Semaphore::new(1 << 20));
        let queue = PartitionQueue::new("t", 0);
        let waiter =
            || Waiter { tx: oneshot::channel().0, _permit: Arc::clone(&buffer).try_acquire_owned().expect("permit") };
        assert!(queue.push(Record::from_value(vec![1u8; 50]), waiter(), &config), "first push starts the task");
        assert!(!queue.push(Record::from_value(vec![1u8; 50]), waiter(), &config));
        assert_eq!(queue.state.lock().sealed.len(), 0);
        queue.push(Record::from_value(vec![1u8; 120]), waiter(), &config);
        assert_eq!(queue.state.lock().sealed.len(), 1, "sealed before the record that would overflow it");
        queue.push(Record::from_value(vec![1u8; 300]), waiter(), &config);
        let state = queue.state.lock();
        assert_eq!(state.sealed.len(), 3, "an oversized record goes alone and seals at once");
        assert_eq!(state.sealed.iter().map(|b| b.builder.record_count()).collect::<Vec<_>>(), vec![2, 1, 1]);
        assert!(state.open.is_none());
        drop(state);
        assert_eq!(queue.seal_now(), 3, "sealing nothing adds no batch");
    }
}
