//! The durable state of a priority cursor and its checkpoint codec ("Priority cursor state
//! v1" in `docs/format.md`; the constants below are that table's offsets and sizes).
//!
//! It owns: per lane partition the committed offset, the settled offsets above it and the
//! failure records of unsettled messages; encoding and validating decoding.
//! It must never: do I/O or know about leases (they are not durable).

use std::collections::{BTreeMap, BTreeSet};

use crate::error::{Error, Result};
use crate::limits::{
    PARTITIONS_PER_TOPIC_MAX, PRIORITY_CURSOR_WINDOW_MAX, PRIORITY_DELIVERIES_MAX, PRIORITY_LANES_MAX,
};

/// Magic bytes: ASCII `RPCS`.
pub const STATE_MAGIC: [u8; 4] = *b"RPCS";
/// Version this build writes and reads.
pub const STATE_VERSION: u16 = 1;

/// Header field offsets.
pub const HEADER_MAGIC: usize = 0;
/// Version (u16).
pub const HEADER_VERSION: usize = HEADER_MAGIC + 4;
/// Lane count (u8).
pub const HEADER_LANES: usize = HEADER_VERSION + 2;
/// Reserved (u8, zero).
pub const HEADER_RESERVED: usize = HEADER_LANES + 1;
/// Partitions per lane (u32).
pub const HEADER_PARTITIONS: usize = HEADER_RESERVED + 1;
/// Number of queue records (u32) = lanes × partitions.
pub const HEADER_QUEUE_COUNT: usize = HEADER_PARTITIONS + 4;
/// Size of the header.
pub const HEADER_SIZE: usize = HEADER_QUEUE_COUNT + 4;

/// Queue record: lane (u8).
pub const QUEUE_LANE: usize = 0;
/// Reserved (3 bytes, zero).
pub const QUEUE_RESERVED: usize = QUEUE_LANE + 1;
/// Partition (u32).
pub const QUEUE_PARTITION: usize = QUEUE_RESERVED + 3;
/// Committed offset (u64).
pub const QUEUE_COMMITTED: usize = QUEUE_PARTITION + 4;
/// Settled entry count (u32).
pub const QUEUE_SETTLED_COUNT: usize = QUEUE_COMMITTED + 8;
/// Failure entry count (u32).
pub const QUEUE_FAILED_COUNT: usize = QUEUE_SETTLED_COUNT + 4;
/// Size of the fixed part of a queue record.
pub const QUEUE_FIXED_SIZE: usize = QUEUE_FAILED_COUNT + 4;
/// Size of one settled entry (an offset, u64).
pub const SETTLED_ENTRY_SIZE: usize = 8;

/// Failure entry: offset (u64).
pub const FAILED_OFFSET: usize = 0;
/// Failures so far (u32).
pub const FAILED_FAILURES: usize = FAILED_OFFSET + 8;
/// Reserved (u32, zero).
pub const FAILED_RESERVED: usize = FAILED_FAILURES + 4;
/// Visible again from (i64 ms).
pub const FAILED_VISIBLE_AT: usize = FAILED_RESERVED + 4;
/// First failure time (i64 ms).
pub const FAILED_FIRST: usize = FAILED_VISIBLE_AT + 8;
/// Last failure time (i64 ms).
pub const FAILED_LAST: usize = FAILED_FIRST + 8;
/// Size of one failure entry.
pub const FAILED_ENTRY_SIZE: usize = FAILED_LAST + 8;
/// Size of the trailing CRC-32.
pub const CRC_SIZE: usize = 4;

/// The failure history of an unsettled message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Failed deliveries so far (nacks and expired leases), ≥ 1.
    pub failures: u32,
    /// The message is not redelivered before this time (ms).
    pub visible_at_ms: i64,
    /// Time of the first failure (ms).
    pub first_failure_ms: i64,
    /// Time of the last failure (ms).
    pub last_failure_ms: i64,
}

/// Durable state of one lane partition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueState {
    /// Every offset below this one is settled (acked, dead-lettered or holds no record).
    pub committed: u64,
    /// Settled offsets above `committed` (never containing `committed` itself).
    pub settled: BTreeSet<u64>,
    /// Unsettled messages that failed at least once, by offset (all ≥ `committed`).
    pub failed: BTreeMap<u64, Failure>,
}

impl QueueState {
    /// Whether `offset` is settled.
    pub fn is_settled(&self, offset: u64) -> bool {
        offset < self.committed || self.settled.contains(&offset)
    }

    /// Settles `offset` and moves the committed offset over the settled run it completes.
    pub fn settle(&mut self, offset: u64) {
        if offset < self.committed {
            return;
        }
        if !self.failed.is_empty() {
            self.failed.remove(&offset);
        }
        if offset == self.committed && self.settled.is_empty() {
            // The common case, acks in order: no set to maintain.
            self.committed += 1;
            return;
        }
        self.settled.insert(offset);
        while self.settled.remove(&self.committed) {
            self.committed += 1;
        }
    }

    /// Settles everything below `offset` (messages retention deleted before they settled).
    pub fn settle_below(&mut self, offset: u64) {
        if offset <= self.committed {
            return;
        }
        self.committed = offset;
        self.settled = self.settled.split_off(&offset);
        self.failed = self.failed.split_off(&offset);
        while self.settled.remove(&self.committed) {
            self.committed += 1;
        }
    }
}

/// Durable state of a whole priority cursor: one [`QueueState`] per lane partition, at
/// index `lane × partitions + partition`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CursorState {
    /// Lanes of the topic.
    pub lanes: u8,
    /// Partitions per lane.
    pub partitions: u32,
    /// Per lane partition.
    pub queues: Vec<QueueState>,
}

impl CursorState {
    /// A cursor that has settled nothing.
    pub fn new(lanes: u8, partitions: u32) -> Self {
        let count = usize::from(lanes) * partitions as usize;
        CursorState { lanes, partitions, queues: vec![QueueState::default(); count] }
    }
}

/// Encodes a cursor state.
pub fn encode(state: &CursorState) -> Vec<u8> {
    let entries: usize = state.queues.iter().map(|q| q.settled.len() * 8 + q.failed.len() * FAILED_ENTRY_SIZE).sum();
    let mut buf = Vec::with_capacity(HEADER_SIZE + state.queues.len() * QUEUE_FIXED_SIZE + entries + CRC_SIZE);
    buf.extend_from_slice(&STATE_MAGIC);
    buf.extend_from_slice(&STATE_VERSION.to_le_bytes());
    buf.push(state.lanes);
    buf.push(0);
    buf.extend_from_slice(&state.partitions.to_le_bytes());
    let count = u32::try_from(state.queues.len()).expect("lanes × partitions fits in u32 (≤ 4 × 10,000)");
    buf.extend_from_slice(&count.to_le_bytes());
    for (i, queue) in state.queues.iter().enumerate() {
        let lane = u8::try_from(i / state.partitions as usize).expect("queue index < lanes × partitions");
        let partition = u32::try_from(i % state.partitions as usize).expect("remainder < partitions");
        encode_queue(&mut buf, lane, partition, queue);
    }
    let crc = crc32fast::hash(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    buf
}

fn encode_queue(buf: &mut Vec<u8>, lane: u8, partition: u32, queue: &QueueState) {
    let window = "entries are bounded by PRIORITY_CURSOR_WINDOW_MAX";
    buf.push(lane);
    buf.extend_from_slice(&[0; 3]);
    buf.extend_from_slice(&partition.to_le_bytes());
    buf.extend_from_slice(&queue.committed.to_le_bytes());
    buf.extend_from_slice(&u32::try_from(queue.settled.len()).expect(window).to_le_bytes());
    buf.extend_from_slice(&u32::try_from(queue.failed.len()).expect(window).to_le_bytes());
    for offset in &queue.settled {
        buf.extend_from_slice(&offset.to_le_bytes());
    }
    for (offset, failure) in &queue.failed {
        buf.extend_from_slice(&offset.to_le_bytes());
        buf.extend_from_slice(&failure.failures.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
        buf.extend_from_slice(&failure.visible_at_ms.to_le_bytes());
        buf.extend_from_slice(&failure.first_failure_ms.to_le_bytes());
        buf.extend_from_slice(&failure.last_failure_ms.to_le_bytes());
    }
}

fn bad(reason: impl std::fmt::Display) -> Error {
    Error::malformed(format!("priority cursor state: {reason}"))
}

/// Bounds-checked little-endian reader over a byte slice.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.rest.len() < n {
            return Err(bad("truncated"));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
}

/// Decodes and validates a checkpoint; every violation of the format is an error.
pub fn decode(buf: &[u8]) -> Result<CursorState> {
    if buf.len() < HEADER_SIZE + CRC_SIZE {
        return Err(bad("shorter than its header"));
    }
    let (body, crc) = buf.split_at(buf.len() - CRC_SIZE);
    let expected = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
    let actual = crc32fast::hash(body);
    if expected != actual {
        return Err(Error::ChecksumMismatch { expected, actual });
    }
    if body[HEADER_MAGIC..HEADER_VERSION] != STATE_MAGIC {
        return Err(bad("bad magic"));
    }
    let version = u16::from_le_bytes([body[HEADER_VERSION], body[HEADER_VERSION + 1]]);
    if version != STATE_VERSION {
        let (found, supported) = (u32::from(version), u32::from(STATE_VERSION));
        return Err(Error::UnsupportedVersion { what: "priority cursor state", found, supported });
    }
    let mut r = Reader { rest: &body[HEADER_LANES..] };
    let lanes = r.u8()?;
    let reserved = r.u8()?;
    let partitions = r.u32()?;
    let count = r.u32()?;
    if !(1..=PRIORITY_LANES_MAX).contains(&lanes) || !(1..=PARTITIONS_PER_TOPIC_MAX).contains(&partitions) {
        return Err(bad("lanes or partitions out of range"));
    }
    if reserved != 0 || u64::from(count) != u64::from(lanes) * u64::from(partitions) {
        return Err(bad("reserved byte set or queue count is not lanes × partitions"));
    }
    let mut state = CursorState::new(lanes, partitions);
    for (i, queue) in state.queues.iter_mut().enumerate() {
        *queue = decode_queue(&mut r, i, partitions)?;
    }
    if !r.rest.is_empty() {
        return Err(bad("trailing bytes"));
    }
    Ok(state)
}

fn decode_queue(r: &mut Reader<'_>, index: usize, partitions: u32) -> Result<QueueState> {
    let lane = r.u8()?;
    let reserved = r.take(3)?;
    let partition = r.u32()?;
    if usize::from(lane) * partitions as usize + partition as usize != index || partition >= partitions {
        return Err(bad(format!("queue {index} is out of order")));
    }
    if reserved != [0; 3] {
        return Err(bad("reserved bytes set"));
    }
    let committed = r.u64()?;
    let settled_count = u64::from(r.u32()?);
    let failed_count = u64::from(r.u32()?);
    let window_end =
        committed.checked_add(PRIORITY_CURSOR_WINDOW_MAX).ok_or_else(|| bad("committed offset overflows"))?;
    if settled_count + failed_count > PRIORITY_CURSOR_WINDOW_MAX {
        return Err(bad("more entries than the window allows"));
    }
    let mut queue = QueueState { committed, ..QueueState::default() };
    let mut previous = committed;
    for _ in 0..settled_count {
        let offset = r.u64()?;
        if offset <= previous || offset >= window_end {
            return Err(bad("settled offsets must increase, above the committed offset, within the window"));
        }
        previous = offset;
        queue.settled.insert(offset);
    }
    let mut previous: Option<u64> = None;
    for _ in 0..failed_count {
        let (offset, failure) = decode_failure(r)?;
        if offset < committed || offset >= window_end || previous.is_some_and(|p| offset <= p) {
            return Err(bad("failure offsets must increase, from the committed offset, within the window"));
        }
        if queue.settled.contains(&offset) {
            return Err(bad("an offset is both settled and failed"));
        }
        previous = Some(offset);
        queue.failed.insert(offset, failure);
    }
    Ok(queue)
}

fn decode_failure(r: &mut Reader<'_>) -> Result<(u64, Failure)> {
    let offset = r.u64()?;
    let failures = r.u32()?;
    let reserved = r.u32()?;
    let failure = Failure { failures, visible_at_ms: r.i64()?, first_failure_ms: r.i64()?, last_failure_ms: r.i64()? };
    if reserved != 0 || !(1..=PRIORITY_DELIVERIES_MAX).contains(&failures) {
        return Err(bad("failure count out of range or reserved bytes set"));
    }
    if failure.first_failure_ms > failure.last_failure_ms {
        return Err(bad("first failure after last failure"));
    }
    Ok((offset, failure))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CursorState {
        let mut state = CursorState::new(2, 3);
        let q = &mut state.queues[4];
        q.committed = 10;
        q.settled.extend([12, 15]);
        let failure = Failure { failures: 2, visible_at_ms: 500, first_failure_ms: 100, last_failure_ms: 300 };
        q.failed.insert(10, failure);
        q.failed.insert(13, Failure { failures: 1, ..failure });
        state
    }

    /// Encoding round-trips; every single-bit flip and every truncation is rejected.
    #[test]
    fn round_trip_and_damage() {
        let state = sample();
        let bytes = encode(&state);
        assert_eq!(decode(&bytes).expect("decode"), state);
        assert_eq!(
            bytes.len(),
            HEADER_SIZE + 6 * QUEUE_FIXED_SIZE + 2 * SETTLED_ENTRY_SIZE + 2 * FAILED_ENTRY_SIZE + 4
        );
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut bad = bytes.clone();
                bad[i] ^= 1 << bit;
                assert!(decode(&bad).is_err(), "flip at {i} bit {bit}");
            }
        }
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "truncated to {len}");
        }
    }

    /// Invalid contents with a valid CRC are rejected too.
    #[test]
    fn invalid_contents_are_rejected() {
        let mut state = sample();
        state.queues[4].settled.insert(10);
        assert!(decode(&encode(&state)).is_err(), "settled and failed");
        let mut state = sample();
        state.queues[0].settled.insert(PRIORITY_CURSOR_WINDOW_MAX);
        assert!(decode(&encode(&state)).is_err(), "outside the window");
        let mut bytes = encode(&sample());
        bytes[HEADER_VERSION] = 2;
        let len = bytes.len();
        let crc = crc32fast::hash(&bytes[..len - 4]);
        bytes[len - 4..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(decode(&bytes), Err(Error::UnsupportedVersion { found: 2, .. })));
    }

    /// Settling moves the committed offset over completed runs only.
    #[test]
    fn settle_advances_committed() {
        let mut q = QueueState::default();
        q.settle(1);
        q.settle(2);
        assert_eq!((q.committed, q.settled.len()), (0, 2));
        q.settle(0);
        assert_eq!((q.committed, q.settled.len()), (3, 0));
        q.settle(5);
        q.settle_below(5);
        assert_eq!((q.committed, q.settled.len()), (6, 0));
        assert!(q.is_settled(4) && !q.is_settled(6));
    }
}
