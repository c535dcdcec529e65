//! Priority topics and priority cursors: queue semantics on top of the log.
//!
//! A **priority topic** `t` with `L` lanes (1 ≤ L ≤ 4) is `L` ordinary topics `t.p0` (most
//! urgent) … `t.p{L-1}` plus a dead-letter topic `t.dlq`, all with the same partition count.
//! Producers choose the lane ([`PriorityTopic::append_to_lane`]); order is kept per lane
//! partition.
//!
//! A **priority cursor** ([`PriorityCursor`]) is a named consumer of a priority topic. `poll`
//! leases messages; `ack` settles one; `nack` or an expired lease makes it visible again after
//! an exponential backoff with jitter; the `max_deliveries`-th failure appends it to `t.dlq`
//! with its failure metadata ([`DeadLetter`]) and settles it.
//!
//! # Scheduling and the starvation bound
//!
//! A message is *ready* from its record timestamp (the log's append time unless the producer
//! set one; capped at now) or, after a failure, from its `visible_at` time. Within a lane
//! partition messages are delivered in offset order (retries by `visible_at`); within a lane,
//! the partition whose candidate has been ready longest goes first.
//!
//! Each delivery picks a lane in two steps:
//! 1. **Aging.** Lane `k`'s effective lane is `e_k = max(0, k − ⌊w / a⌋)` where `w` is how
//!    long its oldest ready message has waited and `a = aging_ms`. Only the lanes with the
//!    smallest `e_k` compete. A fresh `p0` message is always at level 0, so `p0` is strictly
//!    preferred over every lane that has not aged to level 0.
//! 2. **Weighted fair choice** among the competing lanes by stride scheduling: lane `k` has
//!    a pass `π_k` and stride `S / w_k` (`S` = [`crate::limits::PRIORITY_STRIDE_SCALE`], the
//!    weights `w_k` default to 8/4/2/1); the lane with the smallest pass wins (ties: lower
//!    lane), and its pass grows by its stride. A lane joining the competition has its pass
//!    raised to the virtual time `V` (the pass of the last winner), so absence earns no credit.
//!
//! **Starvation bound.** Once lane `k`'s oldest ready message has waited `k · a` ms, at most
//!
//! ```text
//! B_k = Σ_{j ≠ k} (⌊w_j / w_k⌋ + 1)
//! ```
//!
//! deliveries from other lanes precede the next delivery from lane `k` (with 8/4/2/1:
//! `B = 3, 5, 9, 17` for `p0…p3`). So, however hard `p0` floods, a ready message at the head
//! of lane `k` is delivered after waiting at most `k · a` ms plus `B_k` other deliveries;
//! a consumer taking `r` messages per ms waits at most `k · a + ⌈(B_k + 1) / r⌉` ms.
//! Proof sketch: after `k · a` ms lane `k` is at level 0, the smallest, so it competes in
//! every pick. Its pass is at most `V + S/w_k` (it was last raised to `V` or set to
//! `V' + S/w_k` for an earlier `V' ≤ V`), and every competing pass is at least `V`. Lane
//! `j` wins only while `π_j ≤ π_k`, each win adds `S/w_j`, so it wins at most
//! `⌊w_j/w_k⌋ + 1` times before lane `k` does. [`starvation_bound`] computes `B_k`; the
//! property test `engine/tests/priority_model.rs` checks it under random arrivals with a
//! `p0` flood.
//!
//! # Delivery contract (at-least-once)
//!
//! * Durable state, per lane partition: the committed offset (everything below is
//!   settled), the settled offsets above it, and for each message that failed at least once
//!   its failure count, `visible_at` and first/last failure times. It is written durably
//!   (`<store>/cursors/<topic>/<cursor>.cursor`, two slots overwritten in place alternately:
//!   "Priority cursor state file v2" in `docs/format.md`) before `ack`, `nack` or a poll that
//!   reclaimed expired leases returns; concurrent callers share one write (group commit).
//! * `ack_many_deferred` settles at once in memory but is durable only once its
//!   [`AckTicket`] is waited for (`wait_durable`, `flush`, or any later write): a crash
//!   before that delivers those messages again, as if they had not been acked.
//! * After a crash and reopen: no acked or dead-lettered message is delivered again, and
//!   every other message is delivered again. Leases are not durable: a message leased at
//!   the crash is redelivered, and the delivery that was in flight does not count toward
//!   `max_deliveries` (only failures that were written do). Failure times and `visible_at`
//!   survive, so backoff continues where it was.
//! * A lease is reclaimed by the first `poll` or `tick` at or after its deadline; until then
//!   `ack` and `nack` of it are accepted. After that they fail with
//!   [`crate::Error::LeaseNotHeld`].
//! * Dead-lettering appends to `t.dlq` (and waits for it to be durable) before the message is
//!   settled; a crash between the two dead-letters it again on a later failure (the DLQ is
//!   at-least-once too).
//! * Messages deleted by retention before they settled are skipped (retention wins).
//! * Per lane partition at most [`crate::limits::PRIORITY_CURSOR_WINDOW_MAX`] offsets past the
//!   committed offset are tracked; beyond that the lane partition delivers nothing new until
//!   its oldest unsettled message settles.
//!
//! It owns: lane topics naming, the cursor's leases, scheduling, retries and its state file.
//! It must never: write a lane topic except to replay dead letters, or rewrite log data.

mod cursor;
pub mod dlq;
pub mod schedule;
pub mod state;
pub mod state_file;

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

pub use cursor::{AckTicket, Delivery, LaneStats, PriorityCursor, PriorityCursorStats};
pub use dlq::DeadLetter;
pub use schedule::{effective_lane, starvation_bound};

use crate::config::TopicConfig;
use crate::error::{Error, Result};
use crate::format::{Compression, Record};
use crate::limits::{PRIORITY_DELIVERIES_MAX, PRIORITY_IN_FLIGHT_MAX, PRIORITY_LANES_MAX, PRIORITY_WEIGHT_MAX};
use crate::log::completion::AppendHandle;
use crate::log::store::{validate_topic_name, Store, Topic};

/// Open priority cursors of a store, by (topic, cursor name): at most one instance each.
pub(crate) type PriorityCursorRegistry = Mutex<BTreeMap<(String, String), Weak<PriorityCursor>>>;

const DAY_MS: u64 = 24 * 60 * 60 * 1000;

/// Exponential backoff with jitter between failed deliveries.
#[derive(Clone, Debug, PartialEq)]
pub struct BackoffConfig {
    /// Delay after the first failure.
    pub base_ms: u64,
    /// Each further failure multiplies the delay by this (≥ 1).
    pub factor: f64,
    /// Largest delay.
    pub max_ms: u64,
    /// Fraction (0 ≤ jitter ≤ 1) of the delay that is randomly taken off.
    pub jitter: f64,
    /// Seed of the jitter: the same seed, message and failure number give the same delay.
    pub seed: u64,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig { base_ms: 1_000, factor: 2.0, max_ms: 60_000, jitter: 0.2, seed: 0 }
    }
}

impl BackoffConfig {
    /// The delay after failure number `failures` (1-based), with `sample` a uniformly random
    /// `u64`: `d = min(max_ms, base_ms · factor^(failures−1))`, minus `⌊d · jitter · u⌋`-ish
    /// where `u = sample / 2^64` ∈ [0, 1).
    pub fn delay_ms(&self, failures: u32, sample: u64) -> u64 {
        let exponent = i32::try_from(failures.saturating_sub(1).min(1_000)).expect("at most 1,000");
        let raw = self.base_ms as f64 * self.factor.powi(exponent);
        let capped = if raw.is_finite() { raw.min(self.max_ms as f64) } else { self.max_ms as f64 };
        let unit = (sample >> 11) as f64 / (1u64 << 53) as f64;
        (capped - capped * self.jitter * unit).max(0.0) as u64
    }

    /// The jitter sample of one message's failure: SplitMix64 of the seed and its position.
    pub fn jitter_sample(&self, lane: u8, partition: u32, offset: u64, failures: u32) -> u64 {
        let mut x = self.seed;
        for word in [u64::from(lane), u64::from(partition), offset, u64::from(failures)] {
            x = splitmix64(x ^ word);
        }
        x
    }

    fn validate(&self) -> Result<()> {
        let ok = self.factor.is_finite()
            && self.factor >= 1.0
            && (0.0..=1.0).contains(&self.jitter)
            && self.base_ms <= self.max_ms
            && self.max_ms <= DAY_MS;
        if !ok {
            return invalid("backoff needs factor ≥ 1, 0 ≤ jitter ≤ 1 and base_ms ≤ max_ms ≤ 1 day".into());
        }
        Ok(())
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn invalid<T>(reason: String) -> Result<T> {
    Err(Error::InvalidConfig { reason })
}

/// Configuration of a priority cursor (not stored: pass the same one on every open).
#[derive(Clone, Debug, PartialEq)]
pub struct PriorityCursorConfig {
    /// Weight of each lane `p0`…`p3` in 1..=16 (lanes the topic lacks are ignored).
    pub weights: [u32; 4],
    /// A waiting message's effective priority rises one lane per `aging_ms` (≥ 1).
    pub aging_ms: u64,
    /// How long a delivery stays leased before it is reclaimed (≥ 1).
    pub lease_ms: u64,
    /// Deliveries before a message is dead-lettered (1..=1,000).
    pub max_deliveries: u32,
    /// Delay before a failed message is delivered again (unless `nack` names one).
    pub backoff: BackoffConfig,
    /// Most leases held at once (1..=100,000); `poll` returns fewer at the bound. Lanes
    /// below `p0` stop at 90 % of it (rounded down, at least 1), so a backlog of unacked lower-lane leases
    /// cannot keep `p0` messages from being delivered.
    pub max_in_flight: u32,
}

impl Default for PriorityCursorConfig {
    fn default() -> Self {
        PriorityCursorConfig {
            weights: [8, 4, 2, 1],
            aging_ms: 10_000,
            lease_ms: 30_000,
            max_deliveries: 5,
            backoff: BackoffConfig::default(),
            max_in_flight: 1_000,
        }
    }
}

impl PriorityCursorConfig {
    /// Checks every field's range.
    pub fn validate(&self) -> Result<()> {
        if self.weights.iter().any(|w| !(1..=PRIORITY_WEIGHT_MAX).contains(w)) {
            return invalid(format!("lane weights must be in 1..={PRIORITY_WEIGHT_MAX}"));
        }
        if self.aging_ms == 0 || self.lease_ms == 0 || self.aging_ms > DAY_MS || self.lease_ms > DAY_MS {
            return invalid("aging_ms and lease_ms must be in 1..=1 day".into());
        }
        if !(1..=PRIORITY_DELIVERIES_MAX).contains(&self.max_deliveries) {
            return invalid(format!("max_deliveries must be in 1..={PRIORITY_DELIVERIES_MAX}"));
        }
        if !(1..=PRIORITY_IN_FLIGHT_MAX).contains(&self.max_in_flight) {
            return invalid(format!("max_in_flight must be in 1..={PRIORITY_IN_FLIGHT_MAX}"));
        }
        self.backoff.validate()
    }
}

/// Name of lane `lane` of priority topic `name`.
pub fn lane_topic_name(name: &str, lane: u8) -> String {
    format!("{name}.p{lane}")
}

/// Name of the dead-letter topic of priority topic `name`.
pub fn dlq_topic_name(name: &str) -> String {
    format!("{name}.dlq")
}

/// A priority topic: its lane topics and its dead-letter topic.
#[derive(Clone, Debug)]
pub struct PriorityTopic {
    name: String,
    lanes: Vec<Arc<Topic>>,
    dlq: Arc<Topic>,
}

impl PriorityTopic {
    /// The priority topic's name (without suffix).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of lanes.
    pub fn lane_count(&self) -> u8 {
        u8::try_from(self.lanes.len()).expect("at most PRIORITY_LANES_MAX lanes")
    }

    /// Partitions of every lane (and of the dead-letter topic).
    pub fn partitions(&self) -> u32 {
        self.dlq.config().partitions
    }

    /// The topic of lane `lane`.
    pub fn lane(&self, lane: u8) -> Result<&Arc<Topic>> {
        self.lanes
            .get(usize::from(lane))
            .ok_or_else(|| Error::TopicNotFound { topic: lane_topic_name(&self.name, lane) })
    }

    /// The dead-letter topic.
    pub fn dlq(&self) -> &Arc<Topic> {
        &self.dlq
    }

    /// Appends `records` as one batch to lane `lane`: to the partition of `key` if given,
    /// otherwise round-robin. Returns the partition and the append's handle.
    pub fn append_to_lane(&self, lane: u8, key: Option<&[u8]>, records: &[Record]) -> Result<(u32, AppendHandle)> {
        self.lane(lane)?.append(key, records)
    }

    /// Appends the dead letters at `offsets` of dead-letter partition `dlq_partition` back to
    /// their original lane and partition (without the `rill.dlq.*` headers, with a fresh
    /// timestamp), waiting until they are durable. Returns how many were replayed; offsets
    /// past the end are ignored. A record without valid metadata, or of another topic, fails
    /// with [`Error::InvalidDeadLetter`] before anything of that read is appended.
    pub fn replay_dlq(&self, dlq_partition: u32, offsets: Range<u64>) -> Result<u64> {
        let partition = self.dlq.partition(dlq_partition)?;
        let end = offsets.end.min(partition.end_offset());
        let mut next = offsets.start.max(partition.log_start_offset());
        let mut replayed = 0;
        while next < end {
            let stored = partition.read_records(next, 1 << 20)?;
            let Some(last) = stored.last() else { break };
            next = last.offset + 1;
            let mut targets = Vec::new();
            for record in stored.iter().filter(|r| offsets.contains(&r.offset) && r.offset < end) {
                targets.push(self.replay_target(record, dlq_partition)?);
            }
            let mut handles = Vec::with_capacity(targets.len());
            for (lane, lane_partition, record) in targets {
                let topic = self.lane(lane)?;
                handles.push(topic.partition(lane_partition)?.append_records(&[record], Compression::None)?);
            }
            for handle in handles {
                handle.wait()?;
                replayed += 1;
            }
        }
        Ok(replayed)
    }

    fn replay_target(&self, stored: &crate::format::StoredRecord, dlq_partition: u32) -> Result<(u8, u32, Record)> {
        let (letter, record) = dlq::replay_record(stored, dlq_partition)?;
        let wrong =
            |reason: String| Error::InvalidDeadLetter { partition: dlq_partition, offset: stored.offset, reason };
        if letter.topic != self.name {
            return Err(wrong(format!("belongs to topic {:?}", letter.topic)));
        }
        if letter.lane >= self.lane_count() || letter.partition >= self.partitions() {
            return Err(wrong(format!("lane {} partition {} does not exist", letter.lane, letter.partition)));
        }
        Ok((letter.lane, letter.partition, record))
    }
}

impl Store {
    /// Creates priority topic `name` with `lanes` lanes (1..=4): topics `name.p0` …
    /// `name.p{lanes-1}` and `name.dlq`, each with `config`. `name.p0` is created last and
    /// marks the priority topic as existing; leftovers of a crashed creation with the same
    /// configuration are reused.
    pub fn create_priority_topic(&self, name: &str, lanes: u8, config: TopicConfig) -> Result<PriorityTopic> {
        validate_topic_name(name)?;
        validate_topic_name(&dlq_topic_name(name))?;
        if !(1..=PRIORITY_LANES_MAX).contains(&lanes) {
            return invalid(format!("a priority topic has 1..={PRIORITY_LANES_MAX} lanes, not {lanes}"));
        }
        config.validate()?;
        let p0 = lane_topic_name(name, 0);
        if self.topic(&p0).is_ok() {
            return Err(Error::TopicExists { topic: p0 });
        }
        let mut names: Vec<String> = (1..lanes).rev().map(|lane| lane_topic_name(name, lane)).collect();
        names.push(dlq_topic_name(name));
        names.push(p0);
        for topic in names {
            match self.topic(&topic) {
                Ok(existing) if existing.config() == &config => {}
                Ok(_) => return Err(Error::TopicExists { topic }),
                Err(_) => {
                    self.create_topic(&topic, config.clone())?;
                }
            }
        }
        self.priority_topic(name)
    }

    /// The priority topic `name`: lanes `name.p0`, `name.p1`, … as long as they exist, and
    /// `name.dlq`.
    pub fn priority_topic(&self, name: &str) -> Result<PriorityTopic> {
        let mut lanes = vec![self.topic(&lane_topic_name(name, 0))?];
        for lane in 1..PRIORITY_LANES_MAX {
            match self.topic(&lane_topic_name(name, lane)) {
                Ok(topic) => lanes.push(topic),
                Err(_) => break,
            }
        }
        let dlq = self.topic(&dlq_topic_name(name))?;
        let partitions = dlq.config().partitions;
        if let Some(odd) = lanes.iter().find(|t| t.config().partitions != partitions) {
            return invalid(format!("lane topic {} does not have {partitions} partitions", odd.name()));
        }
        Ok(PriorityTopic { name: name.to_string(), lanes, dlq })
    }

    /// Every priority cursor open now (for metrics), ordered by (topic, cursor).
    pub fn open_priority_cursors(&self) -> Vec<Arc<PriorityCursor>> {
        self.priority_cursor_registry().lock().values().filter_map(Weak::upgrade).collect()
    }

    /// Opens priority cursor `cursor` of priority topic `topic`, loading its state. While it
    /// is open, opening it again returns the same instance (the configuration must match).
    pub fn priority_cursor(
        &self,
        topic: &str,
        cursor: &str,
        config: PriorityCursorConfig,
    ) -> Result<Arc<PriorityCursor>> {
        validate_topic_name(cursor)?;
        config.validate()?;
        let priority_topic = self.priority_topic(topic)?;
        let mut registry = self.priority_cursor_registry().lock();
        let key = (topic.to_string(), cursor.to_string());
        if let Some(open) = registry.get(&key).and_then(Weak::upgrade) {
            if open.config() != &config {
                return invalid(format!("priority cursor {cursor} of {topic} is open with another configuration"));
            }
            return Ok(open);
        }
        let store_config = self.store_config();
        let opened = Arc::new(PriorityCursor::open(
            priority_topic,
            cursor,
            config,
            cursor::Environment {
                storage: Arc::clone(&store_config.storage),
                clock: Arc::clone(&store_config.clock),
                store_dir: self.dir().to_path_buf(),
            },
        )?);
        registry.retain(|_, weak| weak.strong_count() > 0);
        registry.insert(key, Arc::downgrade(&opened));
        Ok(opened)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Backoff grows by the factor, stops at the maximum, and jitter only ever shortens it.
    #[test]
    fn backoff_delays() {
        let b = BackoffConfig { base_ms: 100, factor: 2.0, max_ms: 1_000, jitter: 0.0, seed: 1 };
        assert_eq!([1, 2, 3, 4, 5, 60].map(|n| b.delay_ms(n, u64::MAX)), [100, 200, 400, 800, 1_000, 1_000]);
        let b = BackoffConfig { jitter: 0.5, ..b };
        assert_eq!(b.delay_ms(1, 0), 100);
        assert_eq!(b.delay_ms(1, u64::MAX), 50);
        assert_eq!(b.jitter_sample(1, 2, 3, 4), b.jitter_sample(1, 2, 3, 4));
        assert_ne!(b.jitter_sample(1, 2, 3, 4), b.jitter_sample(1, 2, 3, 5));
        assert!(BackoffConfig { factor: 0.5, ..b.clone() }.validate().is_err());
        assert!(BackoffConfig { jitter: 1.5, ..b }.validate().is_err());
    }
}
