//! Per-partition producer state: for each producer id its epoch and the metadata of its
//! last [`BATCHES_PER_PRODUCER_MAX`] batches. Decides whether a batch is new, a retry of
//! one already in the log (answer with the original offsets), or an error.
//!
//! Pure logic: no I/O. The partition calls it under its appender lock.

use std::collections::{BTreeMap, VecDeque};

use crate::error::{Error, Result};
use crate::format::ProducerFields;

/// Batches remembered per producer: as in Kafka, up to 5 batches may be in flight.
pub const BATCHES_PER_PRODUCER_MAX: usize = 5;

/// What the log remembers of one appended batch of a producer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchMetadata {
    /// Sequence of the batch's first record.
    pub first_sequence: i32,
    /// Sequence of the batch's last record.
    pub last_sequence: i32,
    /// Offset of the batch's first record.
    pub base_offset: u64,
    /// Offset of the batch's last record.
    pub last_offset: u64,
    /// The batch's max timestamp (ms).
    pub timestamp_ms: i64,
}

/// One producer's state in one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProducerEntry {
    /// Current epoch.
    pub epoch: i16,
    /// Last batches, oldest first, at most [`BATCHES_PER_PRODUCER_MAX`].
    pub batches: VecDeque<BatchMetadata>,
    /// Wall-clock time (ms) the producer was last seen: its last append, or the open that
    /// replayed its batches from the log. Expiry counts from here, not from record
    /// timestamps, so a producer replaying old events is not expired while it writes.
    pub last_timestamp_ms: i64,
}

/// The verdict on an incoming batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SequenceCheck {
    /// A new batch: append it.
    Append,
    /// A retry of a batch already in the log: do not append, answer with these offsets.
    Duplicate(BatchMetadata),
}

/// `sequence + increment`, wrapping from `i32::MAX` to 0 as Kafka's sequences do.
pub fn increment_sequence(sequence: i32, increment: u32) -> i32 {
    debug_assert!(sequence >= 0, "sequences are non-negative");
    let room = i64::from(i32::MAX) - i64::from(sequence);
    if i64::from(increment) > room {
        (i64::from(increment) - room - 1) as i32
    } else {
        sequence + increment as i32
    }
}

/// Producer state of a partition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProducerStates {
    producers: BTreeMap<i64, ProducerEntry>,
}

impl ProducerStates {
    /// No producers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of producers tracked.
    pub fn len(&self) -> usize {
        self.producers.len()
    }

    /// Whether no producer is tracked.
    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    /// The state of one producer.
    pub fn get(&self, producer_id: i64) -> Option<&ProducerEntry> {
        self.producers.get(&producer_id)
    }

    /// Every producer, by id.
    pub fn iter(&self) -> impl Iterator<Item = (&i64, &ProducerEntry)> {
        self.producers.iter()
    }

    /// Inserts a producer's state as read from a snapshot.
    pub fn insert(&mut self, producer_id: i64, entry: ProducerEntry) {
        self.producers.insert(producer_id, entry);
    }

    /// Decides what to do with a batch of `record_count` records carrying `fields`.
    pub fn check(&self, fields: &ProducerFields, record_count: u32) -> Result<SequenceCheck> {
        let ProducerFields { producer_id, producer_epoch, base_sequence } = *fields;
        let last_sequence = increment_sequence(base_sequence, record_count - 1);
        let Some(entry) = self.producers.get(&producer_id) else {
            if base_sequence == 0 {
                return Ok(SequenceCheck::Append);
            }
            return Err(Error::UnknownProducerId { producer_id, base_sequence });
        };
        if producer_epoch < entry.epoch {
            return Err(Error::ProducerFenced { producer_id, epoch: producer_epoch, current_epoch: entry.epoch });
        }
        if producer_epoch > entry.epoch {
            if base_sequence != 0 {
                return Err(Error::OutOfOrderSequence { producer_id, expected: 0, received: base_sequence });
            }
            return Ok(SequenceCheck::Append);
        }
        if let Some(original) =
            entry.batches.iter().find(|b| b.first_sequence == base_sequence && b.last_sequence == last_sequence)
        {
            return Ok(SequenceCheck::Duplicate(*original));
        }
        let Some(last) = entry.batches.back() else {
            // A producer with no remembered batch (e.g. all of its batches expired from the
            // snapshot) may continue only from sequence 0.
            if base_sequence == 0 {
                return Ok(SequenceCheck::Append);
            }
            return Err(Error::UnknownProducerId { producer_id, base_sequence });
        };
        let expected = increment_sequence(last.last_sequence, 1);
        if base_sequence == expected {
            return Ok(SequenceCheck::Append);
        }
        // Distance in the 31-bit sequence space: small and forward is a gap, otherwise the
        // batch is older than the remembered window.
        let ahead = (i64::from(base_sequence) - i64::from(expected)).rem_euclid(1i64 << 31);
        if ahead < (1i64 << 30) {
            Err(Error::OutOfOrderSequence { producer_id, expected, received: base_sequence })
        } else {
            Err(Error::DuplicateSequence { producer_id, received: base_sequence })
        }
    }

    /// Records a batch that is now in the log (after a successful write, or while replaying
    /// the log on recovery, where no check is made: the log is the truth), seen at `seen_ms`.
    pub fn record(&mut self, fields: &ProducerFields, meta: BatchMetadata, seen_ms: i64) {
        let entry = self.producers.entry(fields.producer_id).or_insert_with(|| ProducerEntry {
            epoch: fields.producer_epoch,
            batches: VecDeque::new(),
            last_timestamp_ms: seen_ms,
        });
        if fields.producer_epoch != entry.epoch {
            entry.epoch = fields.producer_epoch;
            entry.batches.clear();
        }
        entry.batches.push_back(meta);
        while entry.batches.len() > BATCHES_PER_PRODUCER_MAX {
            entry.batches.pop_front();
        }
        entry.last_timestamp_ms = entry.last_timestamp_ms.max(seen_ms);
    }

    /// Forgets `producer_id` if its last batch is older than `now_ms - expiration_ms`.
    pub fn expire_producer(&mut self, producer_id: i64, now_ms: i64, expiration_ms: u64) {
        let horizon = now_ms.saturating_sub(i64::try_from(expiration_ms).unwrap_or(i64::MAX));
        if self.producers.get(&producer_id).is_some_and(|entry| entry.last_timestamp_ms < horizon) {
            self.producers.remove(&producer_id);
        }
    }

    /// Forgets producers whose last batch is older than `now_ms - expiration_ms`.
    /// Returns how many were removed.
    pub fn expire(&mut self, now_ms: i64, expiration_ms: u64) -> usize {
        let before = self.producers.len();
        let horizon = now_ms.saturating_sub(i64::try_from(expiration_ms).unwrap_or(i64::MAX));
        self.producers.retain(|_, entry| entry.last_timestamp_ms >= horizon);
        before - self.producers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(epoch: i16, seq: i32) -> ProducerFields {
        ProducerFields { producer_id: 7, producer_epoch: epoch, base_sequence: seq }
    }

    fn meta(first: i32, count: u32, base: u64) -> BatchMetadata {
        BatchMetadata {
            first_sequence: first,
            last_sequence: increment_sequence(first, count - 1),
            base_offset: base,
            last_offset: base + u64::from(count) - 1,
            timestamp_ms: 1,
        }
    }

    /// Sequences wrap from i32::MAX to 0 like Kafka's.
    #[test]
    fn sequences_wrap() {
        assert_eq!(increment_sequence(0, 5), 5);
        assert_eq!(increment_sequence(i32::MAX, 1), 0);
        assert_eq!(increment_sequence(i32::MAX - 1, 3), 1);
    }

    /// New, duplicate, gap, old, fenced and unknown batches each get their verdict.
    #[test]
    fn verdicts() {
        let mut states = ProducerStates::new();
        assert_eq!(states.check(&fields(0, 0), 3).expect("new producer"), SequenceCheck::Append);
        assert!(matches!(states.check(&fields(0, 3), 1), Err(Error::UnknownProducerId { .. })));
        for (i, first) in [0, 3, 6, 9, 12, 15].into_iter().enumerate() {
            states.record(&fields(0, first), meta(first, 3, i as u64 * 3), 1);
        }
        // 0..3 fell out of the 5-batch window; 3..6 is still remembered.
        assert_eq!(states.check(&fields(0, 3), 3).expect("dup"), SequenceCheck::Duplicate(meta(3, 3, 3)));
        assert!(matches!(states.check(&fields(0, 0), 3), Err(Error::DuplicateSequence { .. })));
        assert_eq!(states.check(&fields(0, 18), 1).expect("next"), SequenceCheck::Append);
        assert!(matches!(states.check(&fields(0, 19), 1), Err(Error::OutOfOrderSequence { expected: 18, .. })));
        assert!(matches!(states.check(&fields(1, 5), 1), Err(Error::OutOfOrderSequence { expected: 0, .. })));
        assert_eq!(states.check(&fields(1, 0), 1).expect("new epoch"), SequenceCheck::Append);
        states.record(&fields(1, 0), meta(0, 1, 100), 1);
        assert!(matches!(states.check(&fields(0, 18), 1), Err(Error::ProducerFenced { current_epoch: 1, .. })));
        assert_eq!(states.get(7).expect("entry").batches.len(), 1, "epoch bump clears the window");
    }

    /// Expiry removes only producers idle past the horizon.
    #[test]
    fn expiry() {
        let mut states = ProducerStates::new();
        states.record(&fields(0, 0), meta(0, 1, 0), 1_000);
        let other = ProducerFields { producer_id: 8, ..fields(0, 0) };
        states.record(&other, meta(0, 1, 1), 5_000);
        assert_eq!(states.expire(6_000, 2_000), 1);
        assert!(states.get(7).is_none());
        assert!(states.get(8).is_some());
    }
}
