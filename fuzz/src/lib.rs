//! Input layouts shared by the fuzz targets and by `examples/make_seeds.rs`.
//!
//! The structure-aware targets (`batch_roundtrip`, `segment_recovery`, `store_ops`) read their input
//! through a small hand-written layout rather than `arbitrary`, so that every layout has an
//! encoder here and the committed seeds are meaningful inputs, not random bytes. Decoding is
//! total: any byte string decodes to some input (missing bytes read as zero).

use bytes::Bytes;
use rill_engine::format::batch::{
    compute_crc, peek_batch_size, Header, ProducerFields, Record, CRC_OFFSET, RECORDS_OFFSET,
};
use rill_engine::segment::OpenKind;

/// Reads fixed-size fields from the front of a byte string; past the end it yields zeros.
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Reads `data` from its start.
    pub fn new(data: &'a [u8]) -> Self {
        Reader { rest: data }
    }

    /// Whether every byte was consumed.
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.rest.split_at(n.min(self.rest.len()));
        self.rest = tail;
        head
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(usize::MAX)
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }
    /// Little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }
    /// Little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }
    /// Little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

/// Rewrites the CRC of every complete batch in a buffer of consecutive batches (as framed by
/// their length fields), so that mutations behind the CRC reach the code that runs after
/// the check. libFuzzer cannot repair a CRC by itself: a mutation that breaks it gains no
/// coverage and is dropped. Stops at the first chunk too short to hold a batch header.
pub fn fix_batch_crcs(buf: &mut [u8]) {
    let mut at = 0usize;
    while let Some(size) = peek_batch_size(&buf[at..]) {
        let Ok(size) = usize::try_from(size) else { break };
        if size < RECORDS_OFFSET || size > buf.len() - at {
            break;
        }
        let batch = &mut buf[at..at + size];
        let crc = compute_crc(batch);
        batch[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
        at += size;
    }
}

/// For the small metadata files that end with a CRC-32 of every preceding byte (producer
/// snapshots, consumer offsets, priority cursor state; see `format::envelope`): `data` with
/// that trailing CRC rewritten, or `None` when it is too short to hold one or already
/// matches (nothing new to try).
pub fn with_fixed_crc(data: &[u8]) -> Option<Vec<u8>> {
    let body_len = data.len().checked_sub(4)?;
    let mut fixed = data.to_vec();
    let crc = crc32fast::hash(&fixed[..body_len]);
    fixed[body_len..].copy_from_slice(&crc.to_le_bytes());
    (fixed != data).then_some(fixed)
}

// ---------------------------------------------------------------------------------------
// cursor_state_decode: priority cursor state file v2
// ---------------------------------------------------------------------------------------

fn le_u32_at(b: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(word)
}

/// Rewrites the CRC of one slot of a priority cursor state file (v2) over its header and the
/// state its length field names. Leaves a slot too short for a header, or whose length
/// field runs past the slot, as it is.
pub fn fix_slot_crc(slot: &mut [u8]) {
    use rill_engine::cursor::priority::state_file::{SLOT_HEADER_CRC, SLOT_HEADER_LEN, SLOT_HEADER_SIZE};
    if slot.len() < SLOT_HEADER_SIZE {
        return;
    }
    let len = le_u32_at(slot, SLOT_HEADER_LEN) as usize;
    let Some(end) = SLOT_HEADER_SIZE.checked_add(len).filter(|&end| end <= slot.len()) else { return };
    let mut crc = crc32fast::Hasher::new();
    crc.update(&slot[..SLOT_HEADER_CRC]);
    crc.update(&slot[SLOT_HEADER_SIZE..end]);
    slot[SLOT_HEADER_CRC..SLOT_HEADER_CRC + 4].copy_from_slice(&crc.finalize().to_le_bytes());
}

/// Writes a valid slot holding `state` (a `cursor::priority::state::encode` encoding) with
/// `sequence` at the start of `slot`, whose length is the slot size, as `docs/format.md`
/// ("Priority cursor state file v2") specifies; the rest of the slot is left as it is.
/// Panics if the state does not fit.
pub fn write_state_slot(slot: &mut [u8], sequence: u64, state: &[u8]) {
    use rill_engine::cursor::priority::state_file::*;
    let end = SLOT_HEADER_SIZE + state.len();
    assert!(end <= slot.len(), "a {}-byte state does not fit a {}-byte slot", state.len(), slot.len());
    let slot_size = u32::try_from(slot.len()).expect("slot size fits u32");
    slot[SLOT_HEADER_MAGIC..SLOT_HEADER_VERSION].copy_from_slice(&SLOT_MAGIC);
    slot[SLOT_HEADER_VERSION..SLOT_HEADER_RESERVED].copy_from_slice(&SLOT_VERSION.to_le_bytes());
    slot[SLOT_HEADER_RESERVED..SLOT_HEADER_SLOT_SIZE].copy_from_slice(&0u16.to_le_bytes());
    slot[SLOT_HEADER_SLOT_SIZE..SLOT_HEADER_SEQUENCE].copy_from_slice(&slot_size.to_le_bytes());
    slot[SLOT_HEADER_SEQUENCE..SLOT_HEADER_LEN].copy_from_slice(&sequence.to_le_bytes());
    let len = u32::try_from(state.len()).expect("state fits u32");
    slot[SLOT_HEADER_LEN..SLOT_HEADER_CRC].copy_from_slice(&len.to_le_bytes());
    slot[SLOT_HEADER_SIZE..end].copy_from_slice(state);
    fix_slot_crc(slot);
}

/// Input of the two-slot half of `cursor_state_decode`, which builds a whole state file
/// (at least 8 KiB) from a small input:
///
/// ```text
/// flags u8          bit 0: 8 KiB slots (else 4 KiB); bit 1: repair both slots' CRCs
/// split u16         slot 0 starts with rest[..split], slot 1 with the remainder
/// rest              (each part cut to the slot size; the slots are zero-padded)
/// ```
pub fn two_slot_file(data: &[u8]) -> Vec<u8> {
    use rill_engine::cursor::priority::state_file::SLOT_SIZE_MIN;
    let mut r = Reader::new(data);
    let flags = r.u8();
    let split = usize::from(r.u16());
    let rest = r.rest();
    let slot_size = SLOT_SIZE_MIN << (flags & 1);
    let (first, second) = rest.split_at(split.min(rest.len()));
    let mut file = vec![0u8; 2 * slot_size];
    for (slot, part) in file.chunks_mut(slot_size).zip([first, second]) {
        let n = part.len().min(slot_size);
        slot[..n].copy_from_slice(&part[..n]);
        if flags & 2 != 0 {
            fix_slot_crc(slot);
        }
    }
    file
}

/// Encodes the input [`two_slot_file`] reads (for seeds).
pub fn two_slot_input(large_slots: bool, fix_crcs: bool, first: &[u8], second: &[u8]) -> Vec<u8> {
    let mut out = vec![u8::from(large_slots) | (u8::from(fix_crcs) << 1)];
    out.extend_from_slice(&u16::try_from(first.len()).expect("first slot fits u16 length").to_le_bytes());
    out.extend_from_slice(first);
    out.extend_from_slice(second);
    out
}

// ---------------------------------------------------------------------------------------
// batch_roundtrip
// ---------------------------------------------------------------------------------------

/// Input of `batch_roundtrip`:
///
/// ```text
/// flags u8          bit 0: producer fields present
/// now_ms i64        timestamp for records without one
/// [producer]        id u64 (top bit cleared), epoch u16 (top bit cleared), seq u32 (top bit cleared)
/// record*           until the input ends:
///   tag u8          bit 0 timestamp, bit 1 key, bit 2 value, bits 3..=5 header count (0..=7)
///   [ts i64]
///   [key: len u8, bytes]
///   [value: len u16, bytes]
///   header*         key: len u8, bytes (lossy UTF-8); has_value u8 (bit 0); [value: len u8, bytes]
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct RoundtripInput {
    /// Timestamp the builder gives records without one.
    pub now_ms: i64,
    /// Producer fields, always valid (non-negative).
    pub producer: Option<ProducerFields>,
    /// Records, in order.
    pub records: Vec<Record>,
}

const TAG_TS: u8 = 1;
const TAG_KEY: u8 = 2;
const TAG_VALUE: u8 = 4;
const TAG_HEADERS_SHIFT: u32 = 3;
const TAG_HEADERS_MASK: u8 = 0b111;

impl RoundtripInput {
    /// Decodes the layout above; never fails.
    pub fn decode(data: &[u8]) -> Self {
        let mut r = Reader::new(data);
        let flags = r.u8();
        let now_ms = r.u64() as i64;
        let producer = (flags & 1 != 0).then(|| ProducerFields {
            producer_id: (r.u64() & (i64::MAX as u64)) as i64,
            producer_epoch: (r.u16() & 0x7fff) as i16,
            base_sequence: (r.u32() & 0x7fff_ffff) as i32,
        });
        let mut records = Vec::new();
        while !r.is_empty() {
            let tag = r.u8();
            let timestamp_ms = (tag & TAG_TS != 0).then(|| r.u64() as i64);
            let key = (tag & TAG_KEY != 0).then(|| {
                let n = r.u8() as usize;
                Bytes::copy_from_slice(r.bytes(n))
            });
            let value = (tag & TAG_VALUE != 0).then(|| {
                let n = r.u16() as usize;
                Bytes::copy_from_slice(r.bytes(n))
            });
            let header_count = (tag >> TAG_HEADERS_SHIFT) & TAG_HEADERS_MASK;
            let mut headers = Vec::new();
            for _ in 0..header_count {
                let n = r.u8() as usize;
                let key = String::from_utf8_lossy(r.bytes(n)).into_owned();
                let value = (r.u8() & 1 != 0).then(|| {
                    let n = r.u8() as usize;
                    Bytes::copy_from_slice(r.bytes(n))
                });
                headers.push(Header { key, value });
            }
            records.push(Record { timestamp_ms, key, value, headers });
        }
        RoundtripInput { now_ms, producer, records }
    }

    /// Encodes into the layout above (for seeds). Lengths must fit their fields and header
    /// keys must be valid UTF-8 for `decode(encode(x)) == x`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![u8::from(self.producer.is_some())];
        out.extend_from_slice(&self.now_ms.to_le_bytes());
        if let Some(p) = self.producer {
            out.extend_from_slice(&(p.producer_id as u64).to_le_bytes());
            out.extend_from_slice(&(p.producer_epoch as u16).to_le_bytes());
            out.extend_from_slice(&(p.base_sequence as u32).to_le_bytes());
        }
        for record in &self.records {
            assert!(record.headers.len() <= TAG_HEADERS_MASK as usize);
            let mut tag = (record.headers.len() as u8) << TAG_HEADERS_SHIFT;
            tag |= if record.timestamp_ms.is_some() { TAG_TS } else { 0 };
            tag |= if record.key.is_some() { TAG_KEY } else { 0 };
            tag |= if record.value.is_some() { TAG_VALUE } else { 0 };
            out.push(tag);
            if let Some(ts) = record.timestamp_ms {
                out.extend_from_slice(&ts.to_le_bytes());
            }
            if let Some(key) = &record.key {
                out.push(u8::try_from(key.len()).expect("key fits u8 length"));
                out.extend_from_slice(key);
            }
            if let Some(value) = &record.value {
                out.extend_from_slice(&u16::try_from(value.len()).expect("value fits u16 length").to_le_bytes());
                out.extend_from_slice(value);
            }
            for header in &record.headers {
                out.push(u8::try_from(header.key.len()).expect("header key fits u8 length"));
                out.extend_from_slice(header.key.as_bytes());
                match &header.value {
                    None => out.push(0),
                    Some(v) => {
                        out.push(1);
                        out.push(u8::try_from(v.len()).expect("header value fits u8 length"));
                        out.extend_from_slice(v);
                    }
                }
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------
// segment_recovery
// ---------------------------------------------------------------------------------------

/// Input of `segment_recovery`:
///
/// ```text
/// mode u8           bits 0..=1: 0 or 3 ActiveRecover, 1 ActiveClean, 2 Sealed;
///                   bit 2: write `.index`; bit 3: write `.timeindex`;
///                   bit 4: after a successful open, append one batch, close, reopen;
///                   bit 5: fix the CRC of every batch of the log first ([`fix_batch_crcs`])
/// end_offset u16    Sealed { end_offset }
/// [index: len u16, bytes]
/// [timeindex: len u16, bytes]
/// log               the rest: the `.log` file
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentInput {
    /// How to open the segment.
    pub kind: OpenKind,
    /// Contents of the `.index` file, if one is written.
    pub index: Option<Vec<u8>>,
    /// Contents of the `.timeindex` file, if one is written.
    pub timeindex: Option<Vec<u8>>,
    /// Whether to append, close and reopen after a successful open.
    pub append_and_reopen: bool,
    /// Whether to rewrite the batches' CRCs before writing the log.
    pub fix_crcs: bool,
    /// Contents of the `.log` file.
    pub log: Vec<u8>,
}

const MODE_INDEX: u8 = 1 << 2;
const MODE_TIMEINDEX: u8 = 1 << 3;
const MODE_APPEND: u8 = 1 << 4;
const MODE_FIX_CRCS: u8 = 1 << 5;

impl SegmentInput {
    /// Decodes the layout above; never fails.
    pub fn decode(data: &[u8]) -> Self {
        let mut r = Reader::new(data);
        let mode = r.u8();
        let end_offset = u64::from(r.u16());
        let kind = match mode & 0b11 {
            1 => OpenKind::ActiveClean,
            2 => OpenKind::Sealed { end_offset },
            _ => OpenKind::ActiveRecover,
        };
        let index = (mode & MODE_INDEX != 0).then(|| {
            let n = r.u16() as usize;
            r.bytes(n).to_vec()
        });
        let timeindex = (mode & MODE_TIMEINDEX != 0).then(|| {
            let n = r.u16() as usize;
            r.bytes(n).to_vec()
        });
        let fix_crcs = mode & MODE_FIX_CRCS != 0;
        let mut log = r.rest().to_vec();
        if fix_crcs {
            fix_batch_crcs(&mut log);
        }
        SegmentInput { kind, index, timeindex, append_and_reopen: mode & MODE_APPEND != 0, fix_crcs, log }
    }

    /// Encodes into the layout above (for seeds).
    pub fn encode(&self) -> Vec<u8> {
        let (bits, end_offset) = match self.kind {
            OpenKind::ActiveRecover => (0u8, 0u64),
            OpenKind::ActiveClean => (1, 0),
            OpenKind::Sealed { end_offset } => (2, end_offset),
        };
        let mut mode = bits;
        mode |= if self.index.is_some() { MODE_INDEX } else { 0 };
        mode |= if self.timeindex.is_some() { MODE_TIMEINDEX } else { 0 };
        mode |= if self.append_and_reopen { MODE_APPEND } else { 0 };
        mode |= if self.fix_crcs { MODE_FIX_CRCS } else { 0 };
        let mut out = vec![mode];
        out.extend_from_slice(&u16::try_from(end_offset).expect("end offset fits u16").to_le_bytes());
        for file in [&self.index, &self.timeindex].into_iter().flatten() {
            out.extend_from_slice(&u16::try_from(file.len()).expect("index fits u16 length").to_le_bytes());
            out.extend_from_slice(file);
        }
        out.extend_from_slice(&self.log);
        out
    }
}

// ---------------------------------------------------------------------------------------
// store_ops
// ---------------------------------------------------------------------------------------

/// Most operations `StoreOpsInput::decode` reads: bounds the work of one input.
pub const STORE_OPS_MAX: usize = 48;
/// Most records in one appended batch.
pub const STORE_BATCH_RECORDS_MAX: usize = 8;

/// A topic to create, as raw input fields (`fuzz_targets/store_ops.rs` maps them onto a
/// small `TopicConfig`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicSpec {
    /// `fsync = never` (else `always`).
    pub fsync_never: bool,
    /// Picks the segment size.
    pub segment_size: u16,
    /// Picks `segment_ms`, if set.
    pub segment_ms: Option<u16>,
    /// Picks `retention_bytes`, if set.
    pub retention_bytes: Option<u16>,
    /// Picks `retention_ms`, if set.
    pub retention_ms: Option<u16>,
    /// Picks `index_interval_bytes`.
    pub index_interval: u8,
    /// Picks `index_size_bytes`.
    pub index_size: u8,
}

/// One record of an appended batch, as raw input fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordSpec {
    /// Byte the key and value are filled with (and whether the header has a value).
    pub fill: u8,
    /// Key length, if the record has a key.
    pub key_len: Option<u8>,
    /// Picks the value length, if the record has a value.
    pub value_len: Option<u16>,
    /// Timestamp relative to the clock; `None` lets the log stamp "now".
    pub timestamp_delta_ms: Option<i16>,
    /// Whether the record carries a header.
    pub header: bool,
}

/// One operation of `store_ops`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreOp {
    /// Creates topic `t<slot % 3>` (or expects `TopicExists`).
    CreateTopic {
        /// Topic slot.
        slot: u8,
        /// Its configuration.
        spec: TopicSpec,
    },
    /// Moves the clock, then appends one batch to the topic and waits for the ack.
    Append {
        /// Topic slot.
        slot: u8,
        /// LZ4 (else uncompressed).
        lz4: bool,
        /// Clock advance before the append.
        advance_ms: u16,
        /// 1 to [`STORE_BATCH_RECORDS_MAX`] records.
        records: Vec<RecordSpec>,
    },
    /// Reads the topic at `selector % (end + 3)` with `max_bytes`.
    Read {
        /// Topic slot.
        slot: u8,
        /// Picks the offset.
        selector: u16,
        /// Byte limit of the read.
        max_bytes: u16,
    },
    /// Moves the clock by the topic's `segment_ms`, so its next append rolls.
    Roll {
        /// Topic slot.
        slot: u8,
    },
    /// Moves the clock.
    AdvanceClock {
        /// By this much.
        ms: u32,
    },
    /// Moves the clock, then applies retention through the store or every partition.
    Retention {
        /// Bit 0: `Store::enforce_retention` (else `Partition::enforce_retention` of each);
        /// bit 1: instead of `advance_ms`, move the clock to 1 ms before, at or after
        /// (bits 4..=5 % 3) the instant topic `t<bits 2..=3 % 3>`'s oldest segment reaches
        /// `retention_ms`.
        flags: u8,
        /// Clock advance first.
        advance_ms: u32,
    },
    /// Power loss: the store is dropped unclosed, `FaultStorage::crash` decides what the
    /// unsynced writes became, then the store is opened again.
    Crash {
        /// 0 drop, 1 keep, 2 tear, 3 scramble the unsynced writes.
        mode: u8,
        /// Seed of the tear or scramble.
        seed: u64,
    },
    /// Clean close, then open again.
    CloseReopen,
}

/// Input of `store_ops`: a sequence of operations against a store.
///
/// ```text
/// op*               until the input ends, at most STORE_OPS_MAX
///   kind u8         kind % 8 picks the op; its fields follow:
///   0 create        slot u8; flags u8 (bit 0 fsync never, bit 1 segment_ms, bit 2 retention_bytes,
///                   bit 3 retention_ms); segment_size u16; segment_ms u16; retention_bytes u16;
///                   retention_ms u16; index_interval u8; index_size u8
///   1 append        slot u8; flags u8 (bit 0 lz4, bits 1..=3 record count - 1); advance_ms u16;
///                   record*: tag u8 (bit 0 key, bit 1 value, bit 2 timestamp, bit 3 header);
///                   fill u8; [key_len u8]; [value_len u16]; [timestamp_delta_ms i16]
///   2 read          slot u8; selector u16; max_bytes u16
///   3 roll          slot u8
///   4 clock         ms u32
///   5 retention     flags u8 (bit 0 through the store; bit 1 to an age boundary, bits 2..=3 topic,
///                   bits 4..=5 1 ms before, at, after); advance_ms u32
///   6 crash         mode u8 (% 4); seed u64
///   7 reopen
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreOpsInput {
    /// The operations, in order.
    pub ops: Vec<StoreOp>,
}

const REC_KEY: u8 = 1;
const REC_VALUE: u8 = 2;
const REC_TS: u8 = 4;
const REC_HEADER: u8 = 8;
const TOPIC_NEVER: u8 = 1;
const TOPIC_SEGMENT_MS: u8 = 2;
const TOPIC_RETENTION_BYTES: u8 = 4;
const TOPIC_RETENTION_MS: u8 = 8;

impl StoreOpsInput {
    /// Decodes the layout above; never fails.
    pub fn decode(data: &[u8]) -> Self {
        let mut r = Reader::new(data);
        let mut ops = Vec::new();
        while !r.is_empty() && ops.len() < STORE_OPS_MAX {
            let op = match r.u8() % 8 {
                0 => {
                    let slot = r.u8();
                    let flags = r.u8();
                    let segment_size = r.u16();
                    let (segment_ms, retention_bytes, retention_ms) = (r.u16(), r.u16(), r.u16());
                    let spec = TopicSpec {
                        fsync_never: flags & TOPIC_NEVER != 0,
                        segment_size,
                        segment_ms: (flags & TOPIC_SEGMENT_MS != 0).then_some(segment_ms),
                        retention_bytes: (flags & TOPIC_RETENTION_BYTES != 0).then_some(retention_bytes),
                        retention_ms: (flags & TOPIC_RETENTION_MS != 0).then_some(retention_ms),
                        index_interval: r.u8(),
                        index_size: r.u8(),
                    };
                    StoreOp::CreateTopic { slot, spec }
                }
                1 => {
                    let slot = r.u8();
                    let flags = r.u8();
                    let advance_ms = r.u16();
                    let count = 1 + usize::from((flags >> 1) & 0b111);
                    let records = (0..count)
                        .map(|_| {
                            let tag = r.u8();
                            let fill = r.u8();
                            let key_len = (tag & REC_KEY != 0).then(|| r.u8());
                            let value_len = (tag & REC_VALUE != 0).then(|| r.u16());
                            let timestamp_delta_ms = (tag & REC_TS != 0).then(|| r.u16() as i16);
                            RecordSpec { fill, key_len, value_len, timestamp_delta_ms, header: tag & REC_HEADER != 0 }
                        })
                        .collect();
                    StoreOp::Append { slot, lz4: flags & 1 != 0, advance_ms, records }
                }
                2 => StoreOp::Read { slot: r.u8(), selector: r.u16(), max_bytes: r.u16() },
                3 => StoreOp::Roll { slot: r.u8() },
                4 => StoreOp::AdvanceClock { ms: r.u32() },
                5 => StoreOp::Retention { flags: r.u8(), advance_ms: r.u32() },
                6 => StoreOp::Crash { mode: r.u8() % 4, seed: r.u64() },
                _ => StoreOp::CloseReopen,
            };
            ops.push(op);
        }
        StoreOpsInput { ops }
    }

    /// Encodes into the layout above (for seeds). `decode(encode(x)) == x` when every
    /// append has 1 to [`STORE_BATCH_RECORDS_MAX`] records, every crash mode is below 4 and
    /// there are at most [`STORE_OPS_MAX`] ops.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for op in &self.ops {
            match op {
                StoreOp::CreateTopic { slot, spec } => {
                    let mut flags = if spec.fsync_never { TOPIC_NEVER } else { 0 };
                    flags |= if spec.segment_ms.is_some() { TOPIC_SEGMENT_MS } else { 0 };
                    flags |= if spec.retention_bytes.is_some() { TOPIC_RETENTION_BYTES } else { 0 };
                    flags |= if spec.retention_ms.is_some() { TOPIC_RETENTION_MS } else { 0 };
                    out.extend_from_slice(&[0, *slot, flags]);
                    for v in [spec.segment_size, spec.segment_ms.unwrap_or(0)] {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                    for v in [spec.retention_bytes.unwrap_or(0), spec.retention_ms.unwrap_or(0)] {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                    out.extend_from_slice(&[spec.index_interval, spec.index_size]);
                }
                StoreOp::Append { slot, lz4, advance_ms, records } => {
                    assert!((1..=STORE_BATCH_RECORDS_MAX).contains(&records.len()), "1 to 8 records a batch");
                    let flags = u8::from(*lz4) | (((records.len() - 1) as u8) << 1);
                    out.extend_from_slice(&[1, *slot, flags]);
                    out.extend_from_slice(&advance_ms.to_le_bytes());
                    for rec in records {
                        let mut tag = if rec.key_len.is_some() { REC_KEY } else { 0 };
                        tag |= if rec.value_len.is_some() { REC_VALUE } else { 0 };
                        tag |= if rec.timestamp_delta_ms.is_some() { REC_TS } else { 0 };
                        tag |= if rec.header { REC_HEADER } else { 0 };
                        out.extend_from_slice(&[tag, rec.fill]);
                        out.extend(rec.key_len);
                        out.extend(rec.value_len.map(u16::to_le_bytes).into_iter().flatten());
                        out.extend(rec.timestamp_delta_ms.map(i16::to_le_bytes).into_iter().flatten());
                    }
                }
                StoreOp::Read { slot, selector, max_bytes } => {
                    out.extend_from_slice(&[2, *slot]);
                    out.extend_from_slice(&selector.to_le_bytes());
                    out.extend_from_slice(&max_bytes.to_le_bytes());
                }
                StoreOp::Roll { slot } => out.extend_from_slice(&[3, *slot]),
                StoreOp::AdvanceClock { ms } => {
                    out.push(4);
                    out.extend_from_slice(&ms.to_le_bytes());
                }
                StoreOp::Retention { flags, advance_ms } => {
                    out.extend_from_slice(&[5, *flags]);
                    out.extend_from_slice(&advance_ms.to_le_bytes());
                }
                StoreOp::Crash { mode, seed } => {
                    out.extend_from_slice(&[6, *mode]);
                    out.extend_from_slice(&seed.to_le_bytes());
                }
                StoreOp::CloseReopen => out.push(7),
            }
        }
        out
    }
}

/// Directory for the segment target's scratch files: `/dev/shm` when usable (no disk I/O,
/// `fdatasync` is free), else the system temp dir.
pub fn scratch_base() -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() && tempfile::tempdir_in(shm).is_ok() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_round_trip() {
        let input = RoundtripInput {
            now_ms: 42,
            producer: Some(ProducerFields { producer_id: 7, producer_epoch: 1, base_sequence: 9 }),
            records: vec![
                Record::keyed("k", "v"),
                Record {
                    timestamp_ms: Some(-5),
                    key: None,
                    value: Some(Bytes::new()),
                    headers: vec![Header { key: "h".into(), value: None }],
                },
            ],
        };
        assert_eq!(RoundtripInput::decode(&input.encode()), input);
        let seg = SegmentInput {
            kind: OpenKind::Sealed { end_offset: 3 },
            index: Some(vec![1, 2]),
            timeindex: None,
            append_and_reopen: true,
            fix_crcs: false,
            log: vec![9; 10],
        };
        assert_eq!(SegmentInput::decode(&seg.encode()), seg);
        let spec = TopicSpec {
            fsync_never: true,
            segment_size: 300,
            segment_ms: Some(5),
            retention_bytes: None,
            retention_ms: Some(7),
            index_interval: 1,
            index_size: 2,
        };
        let record =
            RecordSpec { fill: 3, key_len: Some(4), value_len: None, timestamp_delta_ms: Some(-9), header: true };
        let ops = StoreOpsInput {
            ops: vec![
                StoreOp::CreateTopic { slot: 1, spec },
                StoreOp::Append { slot: 1, lz4: true, advance_ms: 10, records: vec![record; 3] },
                StoreOp::Read { slot: 1, selector: 2, max_bytes: 100 },
                StoreOp::Roll { slot: 1 },
                StoreOp::AdvanceClock { ms: 1 << 20 },
                StoreOp::Retention { flags: 0b11_1011, advance_ms: 9 },
                StoreOp::Crash { mode: 3, seed: u64::MAX },
                StoreOp::CloseReopen,
            ],
        };
        assert_eq!(StoreOpsInput::decode(&ops.encode()), ops);
    }
}
