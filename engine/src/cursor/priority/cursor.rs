//! The priority cursor: leases, acks, nacks, retries, dead-lettering and the group-committed
//! checkpoint. The contract is in the parent module's docs.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex, MutexGuard};

use super::dlq::{dead_letter_record, DeadLetter};
use super::schedule::{LaneScheduler, LANES};
use super::state::{self, CursorState, Failure, QueueState};
use super::state_file::StateFile;
use super::{PriorityCursorConfig, PriorityTopic};
use crate::config::Clock;
use crate::error::{Error, Result};
use crate::format::{Compression, StoredRecord};
use crate::io::Storage;
use crate::limits::{PRIORITY_CURSOR_WINDOW_MAX, PRIORITY_LEASE_EXTENSION_MS_MAX};
use crate::log::partition::Partition;

/// Bytes of a lane partition read ahead into memory at once. Decoding is done under the
/// cursor's lock, so this bounds how long one poll can keep a more urgent delivery waiting
/// (64 KiB of small records decode in well under a millisecond).
const READ_AHEAD_BYTES: u64 = 64 * 1024;
/// Lanes below `p0` may hold at most `max_in_flight − ⌈max_in_flight / this⌉` leases, so
/// that a flood of unacked lower-lane leases always leaves `p0` room to be delivered.
const P0_RESERVED_SHARE: usize = 10;
/// Deliveries an `ack_many` settles between chances for other callers to take the lock.
const ACK_CHUNK: usize = 256;
/// Most deliveries a poll reserves room for up front.
const READ_AHEAD_RECORDS_HINT: usize = 4096;
const CURSORS_DIR: &str = "cursors";
const LEASE_EXPIRED_REASON: &str = "lease expired";

/// Lease ids are unique within the process, so a delivery from a closed instance of a cursor
/// can never settle a message leased by a later instance.
static NEXT_LEASE_ID: AtomicU64 = AtomicU64::new(1);

/// What a cursor needs from its store.
#[derive(Debug)]
pub(crate) struct Environment {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) store_dir: PathBuf,
}

/// Names the state write that makes a deferred ack durable
/// ([`PriorityCursor::ack_many_deferred`]); tickets of one cursor are ordered, and waiting
/// for one covers every earlier one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AckTicket(u64);

/// A leased message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// Lane the message was appended to.
    pub lane: u8,
    /// Partition of the lane topic.
    pub partition: u32,
    /// Offset in the lane partition.
    pub offset: u64,
    /// The record.
    pub record: StoredRecord,
    /// Deliveries of this message including this one (1 on the first).
    pub delivery_count: u32,
    /// The lease is reclaimed by the first poll or tick at or after this time (ms).
    pub lease_deadline_ms: i64,
    /// Since when the message had been ready when it was delivered (ms).
    pub ready_since_ms: i64,
    /// Identifies this lease; `ack`/`nack` of an older lease of the same message fail.
    pub lease_id: u64,
}

/// Queue metrics of one lane of a priority cursor (summed over its partitions).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LaneStats {
    /// Messages neither settled nor leased that are visible now (fresh ones in the log, and
    /// failed ones whose backoff has passed), including any beyond the tracking window.
    pub ready: u64,
    /// Messages neither settled nor leased still waiting for their retry backoff.
    pub waiting: u64,
    /// Leases held now.
    pub in_flight: u64,
    /// How long the oldest ready message has been ready (ms), 0 when none is. For a fresh
    /// message this is measured from its record timestamp; messages not yet read ahead
    /// do not count (the oldest read-ahead one is older than them).
    pub oldest_ready_age_ms: u64,
}

/// Queue metrics of a priority cursor ([`PriorityCursor::stats`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PriorityCursorStats {
    /// Per lane, `p0` first.
    pub lanes: Vec<LaneStats>,
    /// Records in the dead-letter topic: the sum of its partitions' end offsets.
    pub dlq_size: u64,
}

/// One lane partition's volatile reading state.
#[derive(Debug)]
struct Queue {
    lane: u8,
    partition: Arc<Partition>,
    /// Next offset not yet delivered since the cursor opened (or a read-ahead record).
    fresh_next: u64,
    /// Records read ahead, from `fresh_next` on.
    buffer: VecDeque<StoredRecord>,
    /// Failed, unleased messages waiting for redelivery: (visible_at_ms, offset).
    waiting: BTreeSet<(i64, u64)>,
}

/// Hashes lease keys (queue index, offset): a multiply-rotate mix (the keys are log
/// positions, not chosen by a remote party) that costs a few cycles, where the default
/// SipHash would cost more than the rest of an ack.
#[derive(Debug, Default)]
struct LeaseKeyHasher(u64);

impl Hasher for LeaseKeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_usize(&mut self, word: usize) {
        self.write_u64(word as u64);
    }
}

type Leases = HashMap<(usize, u64), Lease, BuildHasherDefault<LeaseKeyHasher>>;

/// A lease deadline: (deadline ms, queue index, offset, lease id).
type DeadlineEntry = (i64, usize, u64, u64);

/// Whether `entry` is the current deadline of a held lease (entries are not removed when a
/// lease is settled or extended; they go stale instead).
fn is_live(leases: &Leases, entry: &DeadlineEntry) -> bool {
    let (deadline_ms, index, offset, lease_id) = *entry;
    leases.get(&(index, offset)).is_some_and(|l| l.lease_id == lease_id && l.deadline_ms == deadline_ms)
}

/// Lease deadlines in expiry order. Every lease gets `now + lease_ms`, so deadlines mostly
/// arrive in order and go to the back of a queue (O(1)); an extension or a clock that
/// stepped back goes to an ordered set instead. Settled and extended leases leave stale
/// entries, dropped when they reach the front (acks mostly come in delivery order) or by
/// a sweep when stale entries outnumber live ones.
#[derive(Debug, Default)]
struct Deadlines {
    in_order: VecDeque<DeadlineEntry>,
    out_of_order: BTreeSet<DeadlineEntry>,
}

impl Deadlines {
    fn push(&mut self, entry: DeadlineEntry) {
        if self.in_order.back().is_none_or(|back| back.0 <= entry.0) {
            self.in_order.push_back(entry);
        } else {
            self.out_of_order.insert(entry);
        }
    }

    /// Removes and returns the earliest entry due at `now_ms` (possibly stale).
    fn pop_due(&mut self, now_ms: i64) -> Option<DeadlineEntry> {
        let front = self.in_order.front().copied().filter(|e| e.0 <= now_ms);
        let first = self.out_of_order.first().copied().filter(|e| e.0 <= now_ms);
        match (front, first) {
            (Some(a), Some(b)) if b < a => self.out_of_order.pop_first(),
            (Some(_), _) => self.in_order.pop_front(),
            (None, Some(_)) => self.out_of_order.pop_first(),
            (None, None) => None,
        }
    }

    /// Drops stale entries at the front, and sweeps the queue when it holds many more
    /// entries than there are leases.
    fn drop_stale(&mut self, leases: &Leases) {
        while self.in_order.front().is_some_and(|e| !is_live(leases, e)) {
            self.in_order.pop_front();
        }
        if self.in_order.len() > 2 * leases.len() + 1_024 {
            self.in_order.retain(|e| is_live(leases, e));
        }
        if self.out_of_order.len() > 2 * leases.len() + 1_024 {
            self.out_of_order.retain(|e| is_live(leases, e));
        }
    }
}

#[derive(Debug)]
struct Lease {
    deadline_ms: i64,
    lease_id: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Fresh,
    Retry,
}

/// The next message a lane partition would deliver.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    queue: usize,
    ready_since_ms: i64,
    offset: u64,
    source: Source,
}

#[derive(Debug)]
struct Inner {
    state: CursorState,
    queues: Vec<Queue>,
    leases: Leases,
    deadlines: Deadlines,
    scheduler: LaneScheduler,
    /// Bumped by every change of `state`; a write covers the generation it encoded.
    changed_generation: u64,
    written_generation: u64,
    writing: bool,
    failed: Option<String>,
}

/// A named consumer of a priority topic (see the module docs for its contract).
#[derive(Debug)]
pub struct PriorityCursor {
    name: String,
    topic: PriorityTopic,
    config: PriorityCursorConfig,
    env: Environment,
    /// Written only by the caller that set `Inner::writing`.
    file: Mutex<StateFile>,
    inner: Mutex<Inner>,
    written: Condvar,
}

impl PriorityCursor {
    pub(crate) fn open(
        topic: PriorityTopic,
        name: &str,
        config: PriorityCursorConfig,
        env: Environment,
    ) -> Result<Self> {
        let dir = env.store_dir.join(CURSORS_DIR).join(topic.name());
        let path = dir.join(format!("{name}.cursor"));
        if !env.storage.exists(&dir) {
            env.storage.create_dir_all(&dir)?;
            env.storage.sync_dir(&env.store_dir.join(CURSORS_DIR))?;
            env.storage.sync_dir(&env.store_dir)?;
        }
        let (file, loaded) = StateFile::open(&*env.storage, &path)?;
        let state = match loaded {
            Some(state) => state,
            None => CursorState::new(topic.lane_count(), topic.partitions()),
        };
        if state.lanes != topic.lane_count() || state.partitions != topic.partitions() {
            let reason = format!(
                "cursor state has {} lanes × {} partitions, topic has {} × {}",
                state.lanes,
                state.partitions,
                topic.lane_count(),
                topic.partitions()
            );
            return Err(Error::Corrupt { path, pos: 0, reason });
        }
        let queues = build_queues(&topic, &state)?;
        let scheduler = LaneScheduler::new(config.weights, config.aging_ms, topic.lane_count());
        let inner = Inner {
            state,
            queues,
            leases: HashMap::default(),
            deadlines: Deadlines::default(),
            scheduler,
            changed_generation: 0,
            written_generation: 0,
            writing: false,
            failed: None,
        };
        let (inner, written) = (Mutex::new(inner), Condvar::new());
        let file = Mutex::new(file);
        Ok(PriorityCursor { name: name.to_string(), topic, config, env, file, inner, written })
    }

    /// The cursor's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The priority topic it consumes.
    pub fn topic(&self) -> &PriorityTopic {
        &self.topic
    }

    /// Its configuration.
    pub fn config(&self) -> &PriorityCursorConfig {
        &self.config
    }

    /// Leases held now.
    pub fn in_flight(&self) -> usize {
        self.inner.lock().leases.len()
    }

    /// The committed offset of a lane partition: every message below it is settled.
    pub fn committed_offset(&self, lane: u8, partition: u32) -> Result<u64> {
        let index = self.queue_index(lane, partition)?;
        Ok(self.inner.lock().state.queues[index].committed)
    }

    /// Messages of a lane partition that failed and are not settled yet.
    pub fn failed_count(&self, lane: u8, partition: u32) -> Result<usize> {
        let index = self.queue_index(lane, partition)?;
        Ok(self.inner.lock().state.queues[index].failed.len())
    }

    /// Reclaims expired leases (as failures) and returns up to `max` new leases, fewer when
    /// `max_in_flight` leases are held. Returns once reclaimed leases are durable.
    pub fn poll(&self, max: usize) -> Result<Vec<Delivery>> {
        let now_ms = self.env.clock.now_ms();
        let mut inner = self.inner.lock();
        self.check_poisoned(&inner)?;
        let unchanged = inner.changed_generation;
        let reclaimed = self.expire_leases(&mut inner, now_ms);
        let limit = max.min((self.config.max_in_flight as usize).saturating_sub(inner.leases.len()));
        let mut deliveries = Vec::with_capacity(limit.min(READ_AHEAD_RECORDS_HINT));
        let delivered = if limit > 0 { self.deliver(&mut inner, now_ms, limit, &mut deliveries) } else { Ok(()) };
        // Only this poll's own changes (reclaimed leases, settled gaps) are waited for; acks
        // being written by other callers are theirs to wait for.
        if inner.changed_generation > unchanged {
            self.commit_changes(&mut inner)?;
        }
        reclaimed?;
        delivered?;
        Ok(deliveries)
    }

    /// Reclaims expired leases without delivering anything.
    pub fn tick(&self) -> Result<()> {
        self.poll(0).map(drop)
    }

    /// Settles a delivery; returns once that is durable.
    pub fn ack(&self, delivery: &Delivery) -> Result<()> {
        let mut inner = self.inner.lock();
        self.check_poisoned(&inner)?;
        let (index, _lease) = self.take_lease(&mut inner, delivery)?;
        inner.state.queues[index].settle(delivery.offset);
        inner.changed_generation += 1;
        self.commit_changes(&mut inner)
    }

    /// Settles several deliveries with one durable state write; returns once that is
    /// durable. Every delivery whose lease is held is settled; if any is not held (expired,
    /// settled, a stale lease, or listed twice) the others are still settled and the first
    /// such delivery's [`Error::LeaseNotHeld`] is returned.
    pub fn ack_many(&self, deliveries: &[Delivery]) -> Result<()> {
        let mut inner = self.inner.lock();
        self.check_poisoned(&inner)?;
        let settled = self.settle_held(&mut inner, deliveries);
        self.commit_changes(&mut inner)?;
        settled
    }

    /// Settles several deliveries like [`PriorityCursor::ack_many`] but returns before the
    /// state is written: the ticket names the write that makes them durable, and
    /// [`PriorityCursor::wait_durable`] waits for it (on any thread). Until then a crash
    /// delivers them again (at-least-once holds; the ack is just not yet final). This lets a
    /// consumer keep polling while another thread waits for the sync. A lease that is not
    /// held is reported as by `ack_many` (the others are settled; [`PriorityCursor::flush`]
    /// makes them durable).
    pub fn ack_many_deferred(&self, deliveries: &[Delivery]) -> Result<AckTicket> {
        let mut inner = self.inner.lock();
        self.check_poisoned(&inner)?;
        self.settle_held(&mut inner, deliveries)?;
        Ok(AckTicket(inner.changed_generation))
    }

    /// Waits until the settlements a ticket names are durable (writing the state if no
    /// write covering them is under way).
    pub fn wait_durable(&self, ticket: AckTicket) -> Result<()> {
        let mut inner = self.inner.lock();
        self.commit_up_to(&mut inner, ticket.0)
    }

    /// Waits until every change made so far is durable.
    pub fn flush(&self) -> Result<()> {
        let mut inner = self.inner.lock();
        self.commit_changes(&mut inner)
    }

    /// Settles every delivery whose lease is held; returns the first not-held error.
    fn settle_held(&self, inner: &mut MutexGuard<'_, Inner>, deliveries: &[Delivery]) -> Result<()> {
        let mut first_error = Ok(());
        for (i, delivery) in deliveries.iter().enumerate() {
            if i > 0 && i % ACK_CHUNK == 0 {
                // A long batch lets a waiting poll in now and then (fairly), so urgent
                // deliveries do not wait for the whole batch.
                MutexGuard::bump(inner);
            }
            match self.take_lease(inner, delivery) {
                Ok((index, _lease)) => inner.state.queues[index].settle(delivery.offset),
                Err(e) => {
                    if first_error.is_ok() {
                        first_error = Err(e);
                    }
                }
            }
        }
        inner.changed_generation += 1;
        first_error
    }

    /// Gives a delivery back: it is delivered again after `delay_ms` (or the configured
    /// backoff), or dead-lettered with `reason` if this was its last allowed delivery.
    /// Returns once that is durable.
    pub fn nack(&self, delivery: &Delivery, delay_ms: Option<u64>, reason: &str) -> Result<()> {
        let now_ms = self.env.clock.now_ms();
        let mut inner = self.inner.lock();
        self.check_poisoned(&inner)?;
        let (index, _lease) = self.take_lease(&mut inner, delivery)?;
        let failed = self.fail(&mut inner, index, delivery.offset, now_ms, delay_ms, reason);
        let committed = self.commit_changes(&mut inner);
        failed.and(committed)
    }

    /// Extends a held lease: its deadline becomes now + `extra_ms` (`extra_ms` at most
    /// [`PRIORITY_LEASE_EXTENSION_MS_MAX`]). Returns the delivery with the new deadline (same
    /// lease id). Fails with [`Error::LeaseNotHeld`] when `delivery` is not the current lease
    /// of its message or its deadline has passed (even if no poll reclaimed it yet), and with
    /// [`Error::InvalidConfig`] when `extra_ms` is 0 or above the limit. Leases are not
    /// durable, so nothing is written.
    pub fn extend_lease(&self, delivery: &Delivery, extra_ms: u64) -> Result<Delivery> {
        if !(1..=PRIORITY_LEASE_EXTENSION_MS_MAX).contains(&extra_ms) {
            return Err(Error::InvalidConfig {
                reason: format!("a lease extension must be in 1..={PRIORITY_LEASE_EXTENSION_MS_MAX} ms"),
            });
        }
        let now_ms = self.env.clock.now_ms();
        let mut inner = self.inner.lock();
        self.check_poisoned(&inner)?;
        let index = self.queue_index(delivery.lane, delivery.partition)?;
        let key = (index, delivery.offset);
        let held = inner.leases.get(&key).filter(|l| l.lease_id == delivery.lease_id && l.deadline_ms > now_ms);
        if held.is_none() {
            return Err(self.lease_not_held(delivery));
        }
        let deadline_ms = now_ms.saturating_add(i64::try_from(extra_ms).expect("extra_ms ≤ 1 hour"));
        // The entry of the old deadline goes stale (it no longer matches the lease).
        inner.deadlines.push((deadline_ms, index, delivery.offset, delivery.lease_id));
        inner.leases.get_mut(&key).expect("checked just above").deadline_ms = deadline_ms;
        Ok(Delivery { lease_deadline_ms: deadline_ms, ..delivery.clone() })
    }

    /// Queue metrics: per lane the ready, waiting and leased messages and the age of the
    /// oldest ready one, and the dead-letter topic's size. Reads nothing from the log.
    pub fn stats(&self) -> PriorityCursorStats {
        let now_ms = self.env.clock.now_ms();
        let inner = self.inner.lock();
        let mut lanes = vec![LaneStats::default(); usize::from(self.topic.lane_count())];
        let mut leased_by_queue = vec![0u64; inner.queues.len()];
        for (index, _) in inner.leases.keys() {
            leased_by_queue[*index] += 1;
        }
        let mut oldest: Vec<Option<i64>> = vec![None; lanes.len()];
        for (index, queue) in inner.queues.iter().enumerate() {
            let queue_state = &inner.state.queues[index];
            let lane = usize::from(queue.lane);
            let stats = &mut lanes[lane];
            let end = queue.partition.end_offset().max(queue_state.committed);
            let unsettled = end - queue_state.committed - queue_state.settled.range(..end).count() as u64;
            let leased = leased_by_queue[index];
            let waiting = queue.waiting.iter().filter(|(visible_at_ms, _)| *visible_at_ms > now_ms).count() as u64;
            stats.in_flight += leased;
            stats.waiting += waiting;
            stats.ready += unsettled.saturating_sub(leased + waiting);
            let retry = queue.waiting.first().map(|(visible_at_ms, _)| *visible_at_ms).filter(|v| *v <= now_ms);
            let fresh = queue
                .buffer
                .iter()
                .find(|r| !queue_state.is_settled(r.offset) && !queue_state.failed.contains_key(&r.offset))
                .map(|r| r.timestamp_ms.min(now_ms));
            for since in [retry, fresh].into_iter().flatten() {
                oldest[lane] = Some(oldest[lane].map_or(since, |o| o.min(since)));
            }
        }
        for (stats, since) in lanes.iter_mut().zip(oldest) {
            stats.oldest_ready_age_ms = since.map_or(0, |s| u64::try_from(now_ms - s).unwrap_or(0));
        }
        let dlq = self.topic.dlq();
        let dlq_size = (0..self.topic.partitions()).filter_map(|p| dlq.partition(p).ok()).map(|p| p.end_offset()).sum();
        PriorityCursorStats { lanes, dlq_size }
    }

    fn lease_not_held(&self, delivery: &Delivery) -> Error {
        Error::LeaseNotHeld {
            topic: self.topic.name().to_string(),
            lane: delivery.lane,
            partition: delivery.partition,
            offset: delivery.offset,
        }
    }

    fn queue_index(&self, lane: u8, partition: u32) -> Result<usize> {
        if lane >= self.topic.lane_count() || partition >= self.topic.partitions() {
            let topic = super::lane_topic_name(self.topic.name(), lane);
            return Err(Error::PartitionNotFound { topic, partition, partitions: self.topic.partitions() });
        }
        Ok(usize::from(lane) * self.topic.partitions() as usize + partition as usize)
    }

    fn check_poisoned(&self, inner: &Inner) -> Result<()> {
        match &inner.failed {
            Some(cause) => Err(Error::Poisoned { partition: self.label(), cause: cause.clone() }),
            None => Ok(()),
        }
    }

    fn label(&self) -> String {
        format!("priority cursor {} of {}", self.name, self.topic.name())
    }

    fn take_lease(&self, inner: &mut Inner, delivery: &Delivery) -> Result<(usize, Lease)> {
        let index = self.queue_index(delivery.lane, delivery.partition)?;
        let key = (index, delivery.offset);
        let lease = match inner.leases.remove(&key) {
            Some(lease) if lease.lease_id == delivery.lease_id => lease,
            Some(other) => {
                // A later lease of the same message: not this delivery's to settle.
                inner.leases.insert(key, other);
                return Err(self.lease_not_held(delivery));
            }
            None => return Err(self.lease_not_held(delivery)),
        };
        let Inner { deadlines, leases, .. } = inner;
        deadlines.drop_stale(leases);
        Ok((index, lease))
    }

    /// Fails every lease whose deadline has passed. Keeps going past a failed dead-letter
    /// append (the message is retried later) and reports the first such error.
    fn expire_leases(&self, inner: &mut Inner, now_ms: i64) -> Result<()> {
        let mut first_error = Ok(());
        while let Some(entry @ (_, index, offset, _)) = inner.deadlines.pop_due(now_ms) {
            if !is_live(&inner.leases, &entry) {
                continue;
            }
            inner.leases.remove(&(index, offset));
            if let Err(e) = self.fail(inner, index, offset, now_ms, None, LEASE_EXPIRED_REASON) {
                if first_error.is_ok() {
                    first_error = Err(e);
                }
            }
        }
        first_error
    }

    /// Records a failed delivery: schedules the retry, or dead-letters the message after
    /// its last allowed delivery.
    fn fail(
        &self,
        inner: &mut Inner,
        index: usize,
        offset: u64,
        now_ms: i64,
        delay_ms: Option<u64>,
        reason: &str,
    ) -> Result<()> {
        let queue_state = &mut inner.state.queues[index];
        if queue_state.is_settled(offset) {
            // Retention skipped it while it was leased.
            return Ok(());
        }
        let fresh = Failure { failures: 0, visible_at_ms: now_ms, first_failure_ms: now_ms, last_failure_ms: now_ms };
        let failure = queue_state.failed.entry(offset).or_insert(fresh);
        failure.failures += 1;
        failure.last_failure_ms = now_ms;
        let failure = *failure;
        inner.changed_generation += 1;
        let mut outcome = Ok(());
        if failure.failures >= self.config.max_deliveries {
            // Leases do not keep their record (it is read again only on this rare path).
            outcome = match read_one(&inner.queues[index].partition, offset) {
                Ok(Some(record)) => self.dead_letter(inner, index, &record, &failure, reason),
                Ok(None) => Ok(()), // retention deleted it: nothing left to dead-letter
                Err(e) => Err(e),
            };
            if outcome.is_ok() {
                inner.state.queues[index].settle(offset);
                return Ok(());
            }
        }
        let queue = &inner.queues[index];
        let sample = self.config.backoff.jitter_sample(queue.lane, queue.partition.id(), offset, failure.failures);
        let delay_ms = delay_ms.unwrap_or_else(|| self.config.backoff.delay_ms(failure.failures, sample));
        let visible_at_ms = now_ms.saturating_add(i64::try_from(delay_ms).unwrap_or(i64::MAX));
        if let Some(stored) = inner.state.queues[index].failed.get_mut(&offset) {
            stored.visible_at_ms = visible_at_ms;
        }
        inner.queues[index].waiting.insert((visible_at_ms, offset));
        outcome
    }

    fn dead_letter(
        &self,
        inner: &Inner,
        index: usize,
        record: &StoredRecord,
        failure: &Failure,
        reason: &str,
    ) -> Result<()> {
        let queue = &inner.queues[index];
        let letter = DeadLetter {
            reason: reason.to_string(),
            delivery_count: failure.failures,
            first_failure_ms: failure.first_failure_ms,
            last_failure_ms: failure.last_failure_ms,
            topic: self.topic.name().to_string(),
            lane: queue.lane,
            partition: queue.partition.id(),
            offset: record.offset,
        };
        let dlq = self.topic.dlq().partition(queue.partition.id())?;
        dlq.append_records(&[dead_letter_record(record, &letter)], Compression::None)?.wait().map(drop)
    }

    /// Chooses and leases messages one by one until `limit` are in `out` or nothing is
    /// ready. A lane partition's candidate depends only on its own queue (and on `now_ms`,
    /// fixed for the call), so only the queue just delivered from is looked at again.
    fn deliver(&self, inner: &mut Inner, now_ms: i64, limit: usize, out: &mut Vec<Delivery>) -> Result<()> {
        let mut candidates =
            (0..inner.queues.len()).map(|index| inner.candidate(index, now_ms)).collect::<Result<Vec<_>>>()?;
        let max_in_flight = self.config.max_in_flight as usize;
        let lower_lanes_cap = (max_in_flight - max_in_flight.div_ceil(P0_RESERVED_SHARE)).max(1);
        // Each round either delivers or settles a retry whose record retention deleted, so
        // the rounds are bounded by the window.
        while out.len() < limit {
            let mut best: [Option<Candidate>; LANES] = [None; LANES];
            let lower_lanes_full = inner.leases.len() >= lower_lanes_cap;
            for candidate in candidates.iter().flatten() {
                let lane = usize::from(inner.queues[candidate.queue].lane);
                if lane > 0 && lower_lanes_full {
                    continue;
                }
                if best[lane].is_none_or(|b| candidate.ready_since_ms < b.ready_since_ms) {
                    best[lane] = Some(*candidate);
                }
            }
            let oldest = best.map(|c| c.map(|c| c.ready_since_ms));
            let Some(lane) = inner.scheduler.pick(now_ms, &oldest) else { return Ok(()) };
            let candidate = best[usize::from(lane)].expect("the scheduler picks a lane with a candidate");
            if let Some(delivery) = self.lease(inner, candidate, now_ms)? {
                out.push(delivery);
            }
            candidates[candidate.queue] = inner.candidate(candidate.queue, now_ms)?;
        }
        Ok(())
    }

    fn lease(&self, inner: &mut Inner, candidate: Candidate, now_ms: i64) -> Result<Option<Delivery>> {
        let index = candidate.queue;
        let (record, delivery_count) = match candidate.source {
            Source::Fresh => {
                let queue = &mut inner.queues[index];
                let record = queue.buffer.pop_front().expect("a fresh candidate is the read-ahead front");
                queue.fresh_next = record.offset + 1;
                (record, 1)
            }
            Source::Retry => {
                inner.queues[index].waiting.remove(&(candidate.ready_since_ms, candidate.offset));
                let failures = inner.state.queues[index].failed.get(&candidate.offset).map_or(0, |f| f.failures);
                match read_one(&inner.queues[index].partition, candidate.offset)? {
                    Some(record) => (record, failures + 1),
                    None => {
                        inner.state.queues[index].settle(candidate.offset);
                        inner.changed_generation += 1;
                        return Ok(None);
                    }
                }
            }
        };
        let deadline_ms = now_ms.saturating_add(i64::try_from(self.config.lease_ms).expect("lease_ms ≤ 1 day"));
        let lease_id = NEXT_LEASE_ID.fetch_add(1, Ordering::Relaxed);
        let queue = &inner.queues[index];
        let offset = record.offset;
        inner.deadlines.push((deadline_ms, index, offset, lease_id));
        inner.leases.insert((index, offset), Lease { deadline_ms, lease_id });
        let delivery = Delivery {
            lane: queue.lane,
            partition: queue.partition.id(),
            offset,
            record,
            delivery_count,
            lease_deadline_ms: deadline_ms,
            ready_since_ms: candidate.ready_since_ms,
            lease_id,
        };
        Ok(Some(delivery))
    }

    /// Makes every change up to now durable: writes the state, or waits for a write that
    /// started after the change (group commit).
    fn commit_changes(&self, inner: &mut MutexGuard<'_, Inner>) -> Result<()> {
        let generation = inner.changed_generation;
        self.commit_up_to(inner, generation)
    }

    /// Makes every change up to `my_generation` durable (see [`Self::commit_changes`]).
    fn commit_up_to(&self, inner: &mut MutexGuard<'_, Inner>, my_generation: u64) -> Result<()> {
        loop {
            self.check_poisoned(inner)?;
            if inner.written_generation >= my_generation {
                return Ok(());
            }
            if !inner.writing {
                self.write_state(inner);
                continue;
            }
            self.written.wait(inner);
        }
    }

    fn write_state(&self, inner: &mut MutexGuard<'_, Inner>) {
        inner.writing = true;
        let generation = inner.changed_generation;
        let bytes = state::encode(&inner.state);
        let result = MutexGuard::unlocked(inner, || self.file.lock().write(&*self.env.storage, &bytes));
        inner.writing = false;
        match result {
            Ok(()) => inner.written_generation = inner.written_generation.max(generation),
            // The file's state is unknown after a failed write: refuse further changes until
            // the cursor is reopened, as a partition does after a failed fsync.
            Err(e) => inner.failed = Some(e.to_string()),
        }
        self.written.notify_all();
    }
}

impl Inner {
    /// The message lane partition `index` would deliver next, if one is ready.
    fn candidate(&mut self, index: usize, now_ms: i64) -> Result<Option<Candidate>> {
        let retry = self.queues[index].waiting.first().copied().filter(|(visible_at_ms, _)| *visible_at_ms <= now_ms);
        let retry = retry.map(|(ready_since_ms, offset)| Candidate {
            queue: index,
            ready_since_ms,
            offset,
            source: Source::Retry,
        });
        let fresh = self.fresh_head(index)?.map(|(timestamp_ms, offset)| Candidate {
            queue: index,
            ready_since_ms: timestamp_ms.min(now_ms),
            offset,
            source: Source::Fresh,
        });
        Ok(match (retry, fresh) {
            (Some(r), Some(f)) if (f.ready_since_ms, f.offset) < (r.ready_since_ms, r.offset) => Some(f),
            (Some(r), _) => Some(r),
            (None, f) => f,
        })
    }

    /// Timestamp and offset of the first never-delivered unsettled message of a lane
    /// partition within the window, reading ahead as needed.
    fn fresh_head(&mut self, index: usize) -> Result<Option<(i64, u64)>> {
        loop {
            let (queue, queue_state) = (&mut self.queues[index], &mut self.state.queues[index]);
            if let Some(front) = queue.buffer.front() {
                let offset = front.offset;
                if queue_state.is_settled(offset) || queue_state.failed.contains_key(&offset) {
                    // Settled or waiting for a retry before the cursor was reopened.
                    queue.buffer.pop_front();
                    queue.fresh_next = offset + 1;
                    continue;
                }
                if offset - queue_state.committed >= PRIORITY_CURSOR_WINDOW_MAX {
                    return Ok(None);
                }
                return Ok(Some((front.timestamp_ms, offset)));
            }
            if !self.read_ahead(index)? {
                return Ok(None);
            }
        }
    }

    /// Reads the next records of a lane partition into its buffer; `false` at the end of the
    /// log or of the window.
    fn read_ahead(&mut self, index: usize) -> Result<bool> {
        let (queue, queue_state) = (&mut self.queues[index], &mut self.state.queues[index]);
        let window_end = queue_state.committed + PRIORITY_CURSOR_WINDOW_MAX;
        if queue.fresh_next >= queue.partition.end_offset() || queue.fresh_next >= window_end {
            return Ok(false);
        }
        let records = match queue.partition.read_records(queue.fresh_next, READ_AHEAD_BYTES) {
            Ok(records) => records,
            Err(Error::OffsetOutOfRange { log_start, .. }) if queue.fresh_next < log_start => {
                // Retention deleted messages this cursor had not settled: skip them.
                queue_state.settle_below(log_start);
                queue.waiting.retain(|(_, offset)| *offset >= log_start);
                queue.fresh_next = log_start;
                self.changed_generation += 1;
                return Ok(true);
            }
            Err(e) => return Err(e),
        };
        let mut expected = queue.fresh_next;
        let mut gaps = false;
        for record in records {
            // Offsets without a record (none today; kept for compaction) are settled.
            for gap in expected..record.offset {
                queue_state.settle(gap);
                gaps = true;
            }
            expected = record.offset + 1;
            queue.buffer.push_back(record);
        }
        if gaps {
            self.changed_generation += 1;
        }
        Ok(!self.queues[index].buffer.is_empty())
    }
}

fn build_queues(topic: &PriorityTopic, state: &CursorState) -> Result<Vec<Queue>> {
    let mut queues = Vec::with_capacity(state.queues.len());
    for lane in 0..topic.lane_count() {
        for partition in 0..topic.partitions() {
            let queue_state: &QueueState = &state.queues[queues.len()];
            let waiting = queue_state.failed.iter().map(|(offset, f)| (f.visible_at_ms, *offset)).collect();
            queues.push(Queue {
                lane,
                partition: Arc::clone(topic.lane(lane)?.partition(partition)?),
                fresh_next: queue_state.committed,
                buffer: VecDeque::new(),
                waiting,
            });
        }
    }
    Ok(queues)
}

fn read_one(partition: &Partition, offset: u64) -> Result<Option<StoredRecord>> {
    match partition.read_records(offset, 1) {
        Ok(records) => Ok(records.into_iter().find(|r| r.offset == offset)),
        Err(Error::OffsetOutOfRange { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}
