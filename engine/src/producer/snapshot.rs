//! Producer-state snapshot file (`<offset>.snapshot`), format version 1. Normative in
//! `docs/format.md`, "Producer snapshot v1". Pure encode/decode.

use std::collections::VecDeque;

use super::state::{BatchMetadata, ProducerEntry, ProducerStates, BATCHES_PER_PRODUCER_MAX};
use crate::error::{Error, Result};
use crate::format::envelope;
use crate::limits::PRODUCERS_PER_PARTITION_MAX;

/// Magic bytes: ASCII `RPSN`.
pub const SNAPSHOT_MAGIC: [u8; 4] = *b"RPSN";
/// Version this build writes and reads.
pub const SNAPSHOT_VERSION: u16 = 1;

/// Offset of the magic (4 bytes).
pub const MAGIC_OFFSET: usize = 0;
/// Offset of the version (u16).
pub const VERSION_OFFSET: usize = MAGIC_OFFSET + 4;
/// Offset of the reserved field (u16, zero).
pub const RESERVED_OFFSET: usize = VERSION_OFFSET + 2;
/// Offset of the snapshot offset (u64): the state covers every batch below it.
pub const SNAPSHOT_OFFSET_OFFSET: usize = RESERVED_OFFSET + 2;
/// Offset of the producer count (u32).
pub const PRODUCER_COUNT_OFFSET: usize = SNAPSHOT_OFFSET_OFFSET + 8;
/// Offset of the first producer entry.
pub const ENTRIES_OFFSET: usize = PRODUCER_COUNT_OFFSET + 4;

/// Producer entry: producer_id i64, epoch i16, batch_count u8, reserved u8, last_timestamp_ms i64.
pub const PRODUCER_ENTRY_SIZE: usize = 8 + 2 + 1 + 1 + 8;
/// Batch entry: first_sequence i32, last_sequence i32, base_offset u64, last_offset u64, timestamp_ms i64.
pub const BATCH_ENTRY_SIZE: usize = 4 + 4 + 8 + 8 + 8;
/// Trailing CRC-32 over every preceding byte.
pub const CRC_SIZE: usize = 4;

const _: () = assert!(ENTRIES_OFFSET == 20);

/// Largest snapshot file a reader accepts (checked before reading it).
pub const SNAPSHOT_SIZE_BYTES_MAX: u64 = (ENTRIES_OFFSET
    + PRODUCERS_PER_PARTITION_MAX as usize * (PRODUCER_ENTRY_SIZE + BATCHES_PER_PRODUCER_MAX * BATCH_ENTRY_SIZE)
    + CRC_SIZE) as u64;

/// Encodes `states` as of `offset`.
pub fn encode(states: &ProducerStates, offset: u64) -> Vec<u8> {
    let capacity = 12 + states.len() * (PRODUCER_ENTRY_SIZE + 2 * BATCH_ENTRY_SIZE);
    let mut buf = envelope::begin(SNAPSHOT_MAGIC, SNAPSHOT_VERSION, capacity);
    buf.extend_from_slice(&offset.to_le_bytes());
    let count = u32::try_from(states.len()).expect("producer count bounded by PRODUCERS_PER_PARTITION_MAX");
    buf.extend_from_slice(&count.to_le_bytes());
    for (&producer_id, entry) in states.iter() {
        buf.extend_from_slice(&producer_id.to_le_bytes());
        buf.extend_from_slice(&entry.epoch.to_le_bytes());
        buf.push(u8::try_from(entry.batches.len()).expect("at most 5 batches per producer"));
        buf.push(0);
        buf.extend_from_slice(&entry.last_timestamp_ms.to_le_bytes());
        for b in &entry.batches {
            buf.extend_from_slice(&b.first_sequence.to_le_bytes());
            buf.extend_from_slice(&b.last_sequence.to_le_bytes());
            buf.extend_from_slice(&b.base_offset.to_le_bytes());
            buf.extend_from_slice(&b.last_offset.to_le_bytes());
            buf.extend_from_slice(&b.timestamp_ms.to_le_bytes());
        }
    }
    envelope::seal(buf)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N]> {
        let end = self.pos + N;
        let Some(bytes) = self.buf.get(self.pos..end) else {
            return Err(malformed(format!("truncated at byte {}", self.pos)));
        };
        self.pos = end;
        Ok(bytes.try_into().expect("slice of N bytes"))
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take::<1>()?[0])
    }
    fn i16(&mut self) -> Result<i16> {
        Ok(i16::from_le_bytes(self.take()?))
    }
    fn i32(&mut self) -> Result<i32> {
        Ok(i32::from_le_bytes(self.take()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take()?))
    }
    fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_le_bytes(self.take()?))
    }
}

fn malformed(reason: String) -> Error {
    Error::MalformedBatch { reason: format!("producer snapshot: {reason}") }
}

/// Decodes and validates a snapshot; returns the states and the snapshot offset.
pub fn decode(buf: &[u8]) -> Result<(ProducerStates, u64)> {
    let body = envelope::open(buf, SNAPSHOT_MAGIC, SNAPSHOT_VERSION, "producer snapshot")?;
    let mut r = Reader { buf: body, pos: SNAPSHOT_OFFSET_OFFSET };
    let offset = r.u64()?;
    let count = r.u32()?;
    if count > PRODUCERS_PER_PARTITION_MAX {
        return Err(malformed(format!("{count} producers")));
    }
    let mut states = ProducerStates::new();
    for _ in 0..count {
        let producer_id = r.i64()?;
        let epoch = r.i16()?;
        let batch_count = r.u8()?;
        r.u8()?;
        let last_timestamp_ms = r.i64()?;
        if producer_id < 0 || epoch < 0 || usize::from(batch_count) > BATCHES_PER_PRODUCER_MAX {
            return Err(malformed(format!("invalid entry for producer {producer_id}")));
        }
        let mut batches = VecDeque::with_capacity(usize::from(batch_count));
        for _ in 0..batch_count {
            let meta = BatchMetadata {
                first_sequence: r.i32()?,
                last_sequence: r.i32()?,
                base_offset: r.u64()?,
                last_offset: r.u64()?,
                timestamp_ms: r.i64()?,
            };
            if meta.first_sequence < 0
                || meta.last_sequence < 0
                || meta.last_offset < meta.base_offset
                || meta.last_offset >= offset
            {
                return Err(malformed(format!("invalid batch entry for producer {producer_id}")));
            }
            batches.push_back(meta);
        }
        if states.get(producer_id).is_some() {
            return Err(malformed(format!("producer {producer_id} listed twice")));
        }
        states.insert(producer_id, ProducerEntry { epoch, batches, last_timestamp_ms });
    }
    if r.pos != body.len() {
        return Err(malformed(format!("{} trailing bytes", body.len() - r.pos)));
    }
    Ok((states, offset))
}

/// File name of the snapshot taken at `offset`.
pub fn file_name(offset: u64) -> String {
    format!("{offset:020}.snapshot")
}

/// Parses a snapshot file name back into its offset.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".snapshot")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ProducerFields;

    fn sample() -> ProducerStates {
        let mut states = ProducerStates::new();
        for pid in [1i64, 5, 9] {
            for i in 0..7u64 {
                let fields = ProducerFields { producer_id: pid, producer_epoch: 2, base_sequence: (i * 2) as i32 };
                let meta = BatchMetadata {
                    first_sequence: (i * 2) as i32,
                    last_sequence: (i * 2 + 1) as i32,
                    base_offset: i * 10,
                    last_offset: i * 10 + 1,
                    timestamp_ms: 1_000 + i as i64,
                };
                states.record(&fields, meta, 1_000 + i as i64);
            }
        }
        states
    }

    /// A snapshot round-trips exactly; any flipped byte or truncation is detected.
    #[test]
    fn round_trip_and_damage() {
        let states = sample();
        let buf = encode(&states, 500);
        let (decoded, offset) = decode(&buf).expect("decodes");
        assert_eq!(offset, 500);
        assert_eq!(decoded, states);
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x10;
            assert!(decode(&bad).is_err(), "flip at {i}");
        }
        for len in 0..buf.len() {
            assert!(decode(&buf[..len]).is_err(), "truncation to {len}");
        }
    }
}
