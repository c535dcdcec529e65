//! Record batch, format version 1: the unit of write, CRC and compression.
//!
//! The layout is normative in `docs/format.md` ("Record batch v1"); this module is its only
//! implementation. Every offset below is derived from the previous field's offset plus its
//! size, so a reordering cannot go unnoticed. All integers are little-endian.
//!
//! This module is pure: it encodes and decodes bytes and never does I/O.

use std::io::Read;

use bytes::{Bytes, BytesMut};

use super::varint::{get_varint, get_varlong, put_varint, put_varlong, varint_len, varlong_len};
use crate::error::{Error, Result};
use crate::limits::{
    BATCH_SIZE_BYTES_MAX, BATCH_UNCOMPRESSED_SIZE_BYTES_MAX, HEADERS_PER_RECORD_MAX, RECORDS_PER_BATCH_MAX,
};

/// The batch format version this build writes and reads.
pub const BATCH_FORMAT_VERSION: u8 = 1;

/// Offset of the first record's offset (u64). Outside the CRC: the log assigns it.
pub const BASE_OFFSET_OFFSET: usize = 0;
const BASE_OFFSET_SIZE: usize = 8;
/// Offset of the batch length (u32): number of bytes that follow this field.
pub const BATCH_LENGTH_OFFSET: usize = BASE_OFFSET_OFFSET + BASE_OFFSET_SIZE;
const BATCH_LENGTH_SIZE: usize = 4;
/// Offset of the leader epoch (u32). Outside the CRC: the leader stamps it.
pub const LEADER_EPOCH_OFFSET: usize = BATCH_LENGTH_OFFSET + BATCH_LENGTH_SIZE;
const LEADER_EPOCH_SIZE: usize = 4;
/// Offset of the format version (u8).
pub const VERSION_OFFSET: usize = LEADER_EPOCH_OFFSET + LEADER_EPOCH_SIZE;
const VERSION_SIZE: usize = 1;
/// Offset of the CRC-32 (u32, IEEE polynomial) over every byte from `ATTRIBUTES_OFFSET` on.
pub const CRC_OFFSET: usize = VERSION_OFFSET + VERSION_SIZE;
const CRC_SIZE: usize = 4;
/// Offset of the attributes (u16): compression codec and flags.
pub const ATTRIBUTES_OFFSET: usize = CRC_OFFSET + CRC_SIZE;
const ATTRIBUTES_SIZE: usize = 2;
/// Offset of the last offset delta (u32): record count minus one.
pub const LAST_OFFSET_DELTA_OFFSET: usize = ATTRIBUTES_OFFSET + ATTRIBUTES_SIZE;
const LAST_OFFSET_DELTA_SIZE: usize = 4;
/// Offset of the first record's timestamp (i64, ms since the Unix epoch).
pub const FIRST_TIMESTAMP_OFFSET: usize = LAST_OFFSET_DELTA_OFFSET + LAST_OFFSET_DELTA_SIZE;
const FIRST_TIMESTAMP_SIZE: usize = 8;
/// Offset of the largest record timestamp in the batch (i64, ms).
pub const MAX_TIMESTAMP_OFFSET: usize = FIRST_TIMESTAMP_OFFSET + FIRST_TIMESTAMP_SIZE;
const MAX_TIMESTAMP_SIZE: usize = 8;
/// Offset of the producer id (i64; -1 when the batch has no producer).
pub const PRODUCER_ID_OFFSET: usize = MAX_TIMESTAMP_OFFSET + MAX_TIMESTAMP_SIZE;
const PRODUCER_ID_SIZE: usize = 8;
/// Offset of the producer epoch (i16; -1 without producer).
pub const PRODUCER_EPOCH_OFFSET: usize = PRODUCER_ID_OFFSET + PRODUCER_ID_SIZE;
const PRODUCER_EPOCH_SIZE: usize = 2;
/// Offset of the base sequence (i32; -1 without producer).
pub const BASE_SEQUENCE_OFFSET: usize = PRODUCER_EPOCH_OFFSET + PRODUCER_EPOCH_SIZE;
const BASE_SEQUENCE_SIZE: usize = 4;
/// Offset of the record count (u32).
pub const RECORD_COUNT_OFFSET: usize = BASE_SEQUENCE_OFFSET + BASE_SEQUENCE_SIZE;
const RECORD_COUNT_SIZE: usize = 4;
/// Offset of the records section; also the size of the batch header.
pub const RECORDS_OFFSET: usize = RECORD_COUNT_OFFSET + RECORD_COUNT_SIZE;
/// Size of the fixed batch header.
pub const BATCH_HEADER_SIZE: usize = RECORDS_OFFSET;
/// Bytes before the batch length's coverage begins (base offset + length field).
pub const LOG_OVERHEAD: usize = BATCH_LENGTH_OFFSET + BATCH_LENGTH_SIZE;

const _: () = assert!(BATCH_HEADER_SIZE == 61);
const _: () = assert!(LOG_OVERHEAD == 12);

/// Attribute bits 0..=2: compression codec (numbers as in Kafka).
pub const ATTR_COMPRESSION_MASK: u16 = 0b111;
/// Attribute bit 3: timestamps are log-append time rather than create time.
pub const ATTR_LOG_APPEND_TIME: u16 = 1 << 3;
/// Attribute bit 4: the batch belongs to a transaction (reserved; not written in v1).
pub const ATTR_TRANSACTIONAL: u16 = 1 << 4;
/// Attribute bit 5: control batch (reserved; not written in v1).
pub const ATTR_CONTROL: u16 = 1 << 5;
const ATTR_KNOWN: u16 = ATTR_COMPRESSION_MASK | ATTR_LOG_APPEND_TIME | ATTR_TRANSACTIONAL | ATTR_CONTROL;

const CODEC_NONE: u16 = 0;
const CODEC_LZ4: u16 = 3;

/// Compression of a batch's records section.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Compression {
    /// Records stored as they are.
    #[default]
    None,
    /// Records section is one LZ4 frame (codec 3, as in Kafka).
    Lz4,
}

impl Compression {
    fn codec(self) -> u16 {
        match self {
            Compression::None => CODEC_NONE,
            Compression::Lz4 => CODEC_LZ4,
        }
    }

    fn from_attributes(attributes: u16) -> Result<Self> {
        match attributes & ATTR_COMPRESSION_MASK {
            CODEC_NONE => Ok(Compression::None),
            CODEC_LZ4 => Ok(Compression::Lz4),
            other => Err(Error::malformed(format!("unsupported compression codec {other}"))),
        }
    }
}

/// Idempotent-producer fields of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProducerFields {
    /// Producer id (non-negative).
    pub producer_id: i64,
    /// Producer epoch (non-negative).
    pub producer_epoch: i16,
    /// Sequence number of the batch's first record (non-negative).
    pub base_sequence: i32,
}

/// The decoded fixed header of a record batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    /// Offset of the first record.
    pub base_offset: u64,
    /// Bytes following the length field.
    pub batch_length: u32,
    /// Leader epoch of the leader that appended the batch.
    pub leader_epoch: u32,
    /// Stored CRC-32.
    pub crc: u32,
    /// Attribute bits.
    pub attributes: u16,
    /// Record count minus one.
    pub last_offset_delta: u32,
    /// Timestamp of the first record (ms).
    pub first_timestamp_ms: i64,
    /// Largest record timestamp (ms).
    pub max_timestamp_ms: i64,
    /// Producer fields, if the batch was written by an idempotent producer.
    pub producer: Option<ProducerFields>,
    /// Number of records.
    pub record_count: u32,
}

fn read_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([buf[at], buf[at + 1]])
}
fn read_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("slice of 4 bytes"))
}
fn read_u64(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("slice of 8 bytes"))
}

/// Total size in bytes of the batch whose header starts `buf`, read from the length field
/// alone (no validation beyond presence). `None` if `buf` is shorter than `LOG_OVERHEAD`.
pub fn peek_batch_size(buf: &[u8]) -> Option<u64> {
    if buf.len() < LOG_OVERHEAD {
        return None;
    }
    Some(LOG_OVERHEAD as u64 + u64::from(read_u32(buf, BATCH_LENGTH_OFFSET)))
}

impl BatchHeader {
    /// Parses and validates the fixed header at the front of `buf`. Checks the version,
    /// length bounds, attribute bits, record count and producer fields; not the CRC.
    pub fn parse(buf: &[u8]) -> Result<Self> {
        if buf.len() < BATCH_HEADER_SIZE {
            return Err(Error::malformed(format!("batch header needs {BATCH_HEADER_SIZE} bytes, got {}", buf.len())));
        }
        let version = buf[VERSION_OFFSET];
        if version != BATCH_FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                what: "record batch",
                found: u32::from(version),
                supported: u32::from(BATCH_FORMAT_VERSION),
            });
        }
        let header = BatchHeader {
            base_offset: read_u64(buf, BASE_OFFSET_OFFSET),
            batch_length: read_u32(buf, BATCH_LENGTH_OFFSET),
            leader_epoch: read_u32(buf, LEADER_EPOCH_OFFSET),
            crc: read_u32(buf, CRC_OFFSET),
            attributes: read_u16(buf, ATTRIBUTES_OFFSET),
            last_offset_delta: read_u32(buf, LAST_OFFSET_DELTA_OFFSET),
            first_timestamp_ms: read_u64(buf, FIRST_TIMESTAMP_OFFSET) as i64,
            max_timestamp_ms: read_u64(buf, MAX_TIMESTAMP_OFFSET) as i64,
            producer: None,
            record_count: read_u32(buf, RECORD_COUNT_OFFSET),
        };
        let producer_id = read_u64(buf, PRODUCER_ID_OFFSET) as i64;
        let producer_epoch = read_u16(buf, PRODUCER_EPOCH_OFFSET) as i16;
        let base_sequence = read_u32(buf, BASE_SEQUENCE_OFFSET) as i32;
        let producer = parse_producer_fields(producer_id, producer_epoch, base_sequence)?;
        let header = BatchHeader { producer, ..header };
        header.validate()?;
        Ok(header)
    }

    fn validate(&self) -> Result<()> {
        let size = self.size_bytes();
        if size < BATCH_HEADER_SIZE as u64 {
            return Err(Error::malformed(format!("batch length {} shorter than its header", self.batch_length)));
        }
        if size > u64::from(BATCH_SIZE_BYTES_MAX) {
            return Err(Error::LimitExceeded {
                limit: "BATCH_SIZE_BYTES_MAX",
                max: u64::from(BATCH_SIZE_BYTES_MAX),
                actual: size,
            });
        }
        if self.attributes & !ATTR_KNOWN != 0 {
            return Err(Error::malformed(format!("unknown attribute bits {:#06x}", self.attributes)));
        }
        Compression::from_attributes(self.attributes)?;
        if self.record_count == 0 {
            return Err(Error::malformed("batch holds no records"));
        }
        if self.record_count > RECORDS_PER_BATCH_MAX {
            return Err(Error::LimitExceeded {
                limit: "RECORDS_PER_BATCH_MAX",
                max: u64::from(RECORDS_PER_BATCH_MAX),
                actual: u64::from(self.record_count),
            });
        }
        if u64::from(self.last_offset_delta) + 1 != u64::from(self.record_count) {
            return Err(Error::malformed(format!(
                "last offset delta {} does not match record count {}",
                self.last_offset_delta, self.record_count
            )));
        }
        if self.max_timestamp_ms < self.first_timestamp_ms && !self.has(ATTR_LOG_APPEND_TIME) {
            return Err(Error::malformed("max timestamp below first timestamp"));
        }
        if self.base_offset.checked_add(u64::from(self.last_offset_delta)).is_none_or(|last| last >= i64::MAX as u64) {
            return Err(Error::malformed("offsets overflow"));
        }
        Ok(())
    }

    fn has(&self, bit: u16) -> bool {
        self.attributes & bit != 0
    }

    /// Total size of the batch in bytes, header included.
    pub fn size_bytes(&self) -> u64 {
        LOG_OVERHEAD as u64 + u64::from(self.batch_length)
    }

    /// Offset of the last record.
    pub fn last_offset(&self) -> u64 {
        self.base_offset + u64::from(self.last_offset_delta)
    }

    /// Offset following the last record.
    pub fn next_offset(&self) -> u64 {
        self.last_offset() + 1
    }

    /// Compression codec of the records section.
    pub fn compression(&self) -> Compression {
        Compression::from_attributes(self.attributes).expect("validated in parse")
    }
}

fn parse_producer_fields(producer_id: i64, producer_epoch: i16, base_sequence: i32) -> Result<Option<ProducerFields>> {
    match (producer_id, producer_epoch, base_sequence) {
        (-1, -1, -1) => Ok(None),
        (id, epoch, seq) if id >= 0 && epoch >= 0 && seq >= 0 => {
            Ok(Some(ProducerFields { producer_id: id, producer_epoch: epoch, base_sequence: seq }))
        }
        (id, epoch, seq) => {
            Err(Error::malformed(format!("inconsistent producer fields: id {id}, epoch {epoch}, base sequence {seq}")))
        }
    }
}

/// Computes the CRC-32 of a whole encoded batch (over everything from the attributes on).
pub fn compute_crc(batch: &[u8]) -> u32 {
    crc32fast::hash(&batch[ATTRIBUTES_OFFSET..])
}

/// Checks the CRC of a whole encoded batch.
pub fn verify_crc(batch: &[u8]) -> Result<()> {
    debug_assert!(batch.len() >= BATCH_HEADER_SIZE);
    let expected = read_u32(batch, CRC_OFFSET);
    let actual = compute_crc(batch);
    if expected != actual {
        return Err(Error::ChecksumMismatch { expected, actual });
    }
    Ok(())
}

/// Overwrites the base offset of an encoded batch. The base offset lies outside the CRC,
/// so the log can assign offsets without re-hashing the batch.
pub fn set_base_offset(batch: &mut [u8], base_offset: u64) {
    batch[BASE_OFFSET_OFFSET..BASE_OFFSET_OFFSET + BASE_OFFSET_SIZE].copy_from_slice(&base_offset.to_le_bytes());
}

/// Overwrites the producer fields of an encoded batch and recomputes its CRC (the fields
/// lie inside the CRC's range). For a client re-sequencing a batch the server never appended.
pub fn set_producer_fields(batch: &mut [u8], fields: ProducerFields) {
    batch[PRODUCER_ID_OFFSET..][..PRODUCER_ID_SIZE].copy_from_slice(&fields.producer_id.to_le_bytes());
    batch[PRODUCER_EPOCH_OFFSET..][..PRODUCER_EPOCH_SIZE].copy_from_slice(&fields.producer_epoch.to_le_bytes());
    batch[BASE_SEQUENCE_OFFSET..][..BASE_SEQUENCE_SIZE].copy_from_slice(&fields.base_sequence.to_le_bytes());
    let crc = compute_crc(batch);
    batch[CRC_OFFSET..][..CRC_SIZE].copy_from_slice(&crc.to_le_bytes());
}

/// Overwrites the leader epoch of an encoded batch (outside the CRC).
pub fn set_leader_epoch(batch: &mut [u8], leader_epoch: u32) {
    batch[LEADER_EPOCH_OFFSET..LEADER_EPOCH_OFFSET + LEADER_EPOCH_SIZE].copy_from_slice(&leader_epoch.to_le_bytes());
}

/// A record header: a string key and an optional byte value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Header key (UTF-8).
    pub key: String,
    /// Header value; `None` is distinct from empty.
    pub value: Option<Bytes>,
}

/// A record to append. The log assigns its offset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    /// Record timestamp in ms since the Unix epoch; `None` means "now" at batch build time.
    pub timestamp_ms: Option<i64>,
    /// Optional key (used for partitioning and compaction by key).
    pub key: Option<Bytes>,
    /// Optional value; `None` is distinct from empty.
    pub value: Option<Bytes>,
    /// Headers, in order.
    pub headers: Vec<Header>,
}

impl Record {
    /// A record with only a value.
    pub fn from_value(value: impl Into<Bytes>) -> Self {
        Record { value: Some(value.into()), ..Record::default() }
    }

    /// A record with a key and a value.
    pub fn keyed(key: impl Into<Bytes>, value: impl Into<Bytes>) -> Self {
        Record { key: Some(key.into()), value: Some(value.into()), ..Record::default() }
    }
}

/// A record read back from the log, with the offset and timestamp the log holds for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRecord {
    /// The record's offset.
    pub offset: u64,
    /// The record's timestamp (ms).
    pub timestamp_ms: i64,
    /// Key, if any.
    pub key: Option<Bytes>,
    /// Value, if any.
    pub value: Option<Bytes>,
    /// Headers, in order.
    pub headers: Vec<Header>,
}

/// Builds one encoded record batch. The base offset is left at 0 and the leader epoch at 0:
/// the log sets both when it appends.
#[derive(Debug)]
pub struct BatchBuilder {
    compression: Compression,
    producer: Option<ProducerFields>,
    now_ms: i64,
    /// The batch being built: `BATCH_HEADER_SIZE` reserved bytes, then the records, so an
    /// uncompressed batch is finished in place without copying.
    buf: Vec<u8>,
    record_count: u32,
    first_timestamp_ms: Option<i64>,
    max_timestamp_ms: i64,
}

impl BatchBuilder {
    /// Starts a batch; records without a timestamp get `now_ms`.
    pub fn new(compression: Compression, now_ms: i64) -> Self {
        BatchBuilder {
            compression,
            producer: None,
            now_ms,
            buf: vec![0; BATCH_HEADER_SIZE],
            record_count: 0,
            first_timestamp_ms: None,
            max_timestamp_ms: i64::MIN,
        }
    }

    /// Marks the batch as written by an idempotent producer.
    pub fn producer(mut self, producer: ProducerFields) -> Self {
        self.producer = Some(producer);
        self
    }

    /// Number of records pushed so far.
    pub fn record_count(&self) -> u32 {
        self.record_count
    }

    /// Bytes of encoded (uncompressed) records so far, header excluded.
    pub fn records_size_bytes(&self) -> usize {
        self.buf.len() - BATCH_HEADER_SIZE
    }

    /// Adds a record.
    pub fn push(&mut self, record: &Record) -> Result<()> {
        if self.record_count >= RECORDS_PER_BATCH_MAX {
            return Err(Error::LimitExceeded {
                limit: "RECORDS_PER_BATCH_MAX",
                max: u64::from(RECORDS_PER_BATCH_MAX),
                actual: u64::from(self.record_count) + 1,
            });
        }
        if record.headers.len() > HEADERS_PER_RECORD_MAX as usize {
            return Err(Error::LimitExceeded {
                limit: "HEADERS_PER_RECORD_MAX",
                max: u64::from(HEADERS_PER_RECORD_MAX),
                actual: record.headers.len() as u64,
            });
        }
        let timestamp_ms = record.timestamp_ms.unwrap_or(self.now_ms);
        let first_timestamp_ms = *self.first_timestamp_ms.get_or_insert(timestamp_ms);
        self.max_timestamp_ms = self.max_timestamp_ms.max(timestamp_ms);
        let timestamp_delta = timestamp_ms.wrapping_sub(first_timestamp_ms);
        let offset_delta = self.record_count as i32;
        // The length prefix comes first, so size the body before writing it.
        let mut body_len = 1 + varlong_len(timestamp_delta) + varint_len(offset_delta);
        body_len += optional_bytes_len(record.key.as_deref()) + optional_bytes_len(record.value.as_deref());
        body_len += varint_len(record.headers.len() as i32);
        for header in &record.headers {
            body_len += optional_bytes_len(Some(header.key.as_bytes())) + optional_bytes_len(header.value.as_deref());
        }
        if body_len > BATCH_SIZE_BYTES_MAX as usize {
            return Err(Error::LimitExceeded {
                limit: "BATCH_SIZE_BYTES_MAX",
                max: u64::from(BATCH_SIZE_BYTES_MAX),
                actual: body_len as u64,
            });
        }
        let buf = &mut self.buf;
        put_varint(buf, body_len as i32);
        let body_start = buf.len();
        buf.reserve(body_len);
        buf.push(0); // record attributes, unused
        put_varlong(buf, timestamp_delta);
        put_varint(buf, offset_delta);
        put_optional_bytes(buf, record.key.as_deref());
        put_optional_bytes(buf, record.value.as_deref());
        put_varint(buf, record.headers.len() as i32);
        for header in &record.headers {
            put_optional_bytes(buf, Some(header.key.as_bytes()));
            put_optional_bytes(buf, header.value.as_deref());
        }
        debug_assert_eq!(buf.len() - body_start, body_len, "record length prefix matches its body");
        self.record_count += 1;
        Ok(())
    }

    /// Encodes the batch. Fails on an empty batch or one over [`BATCH_SIZE_BYTES_MAX`].
    pub fn build(self) -> Result<BytesMut> {
        let Some(first_timestamp_ms) = self.first_timestamp_ms else {
            return Err(Error::EmptyBatch);
        };
        let mut buf = match self.compression {
            Compression::None => self.buf,
            Compression::Lz4 => {
                let mut compressed = vec![0; BATCH_HEADER_SIZE];
                lz4_compress(&self.buf[BATCH_HEADER_SIZE..], &mut compressed)?;
                compressed
            }
        };
        let size = buf.len();
        if size > BATCH_SIZE_BYTES_MAX as usize {
            return Err(Error::LimitExceeded {
                limit: "BATCH_SIZE_BYTES_MAX",
                max: u64::from(BATCH_SIZE_BYTES_MAX),
                actual: size as u64,
            });
        }
        put_header(
            &mut buf,
            &BatchHeader {
                base_offset: 0,
                batch_length: (size - LOG_OVERHEAD) as u32,
                leader_epoch: 0,
                crc: 0,
                attributes: self.compression.codec(),
                last_offset_delta: self.record_count - 1,
                first_timestamp_ms,
                max_timestamp_ms: self.max_timestamp_ms,
                producer: self.producer,
                record_count: self.record_count,
            },
        );
        let crc = compute_crc(&buf);
        buf[CRC_OFFSET..CRC_OFFSET + CRC_SIZE].copy_from_slice(&crc.to_le_bytes());
        debug_assert!(BatchHeader::parse(&buf).is_ok(), "builder writes a valid header");
        // A uniquely owned `Vec` converts without copying.
        Ok(BytesMut::from(Bytes::from(buf)))
    }
}

fn put_header(buf: &mut [u8], header: &BatchHeader) {
    let (producer_id, producer_epoch, base_sequence) = match header.producer {
        Some(p) => (p.producer_id, p.producer_epoch, p.base_sequence),
        None => (-1, -1, -1),
    };
    buf[BASE_OFFSET_OFFSET..][..8].copy_from_slice(&header.base_offset.to_le_bytes());
    buf[BATCH_LENGTH_OFFSET..][..4].copy_from_slice(&header.batch_length.to_le_bytes());
    buf[LEADER_EPOCH_OFFSET..][..4].copy_from_slice(&header.leader_epoch.to_le_bytes());
    buf[VERSION_OFFSET] = BATCH_FORMAT_VERSION;
    buf[CRC_OFFSET..][..4].copy_from_slice(&header.crc.to_le_bytes());
    buf[ATTRIBUTES_OFFSET..][..2].copy_from_slice(&header.attributes.to_le_bytes());
    buf[LAST_OFFSET_DELTA_OFFSET..][..4].copy_from_slice(&header.last_offset_delta.to_le_bytes());
    buf[FIRST_TIMESTAMP_OFFSET..][..8].copy_from_slice(&header.first_timestamp_ms.to_le_bytes());
    buf[MAX_TIMESTAMP_OFFSET..][..8].copy_from_slice(&header.max_timestamp_ms.to_le_bytes());
    buf[PRODUCER_ID_OFFSET..][..8].copy_from_slice(&producer_id.to_le_bytes());
    buf[PRODUCER_EPOCH_OFFSET..][..2].copy_from_slice(&producer_epoch.to_le_bytes());
    buf[BASE_SEQUENCE_OFFSET..][..4].copy_from_slice(&base_sequence.to_le_bytes());
    buf[RECORD_COUNT_OFFSET..][..4].copy_from_slice(&header.record_count.to_le_bytes());
}

/// Appends a length-prefixed byte string (-1 = null). Lengths are bounded by the caller's
/// batch-size check, which runs first.
fn put_optional_bytes(buf: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        None => put_varint(buf, -1),
        Some(b) => {
            put_varint(buf, b.len() as i32);
            buf.extend_from_slice(b);
        }
    }
}

/// Bytes [`put_optional_bytes`] writes; lengths past `i32` saturate (and then fail the
/// caller's size check).
fn optional_bytes_len(bytes: Option<&[u8]>) -> usize {
    match bytes {
        None => 1,
        Some(b) => varint_len(i32::try_from(b.len()).unwrap_or(i32::MAX)) + b.len(),
    }
}

fn lz4_compress(records: &[u8], out: &mut Vec<u8>) -> Result<()> {
    use std::io::Write;
    out.reserve(records.len() / 2 + 64);
    let mut encoder = lz4_flex::frame::FrameEncoder::new(out);
    encoder.write_all(records).map_err(|source| Error::malformed(format!("lz4 compression failed: {source}")))?;
    encoder.finish().map_err(|source| Error::malformed(format!("lz4 compression failed: {source}")))?;
    Ok(())
}

fn lz4_decompress(section: &[u8]) -> Result<Vec<u8>> {
    let limit = u64::from(BATCH_UNCOMPRESSED_SIZE_BYTES_MAX);
    let mut out = Vec::new();
    lz4_flex::frame::FrameDecoder::new(section)
        .take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|source| Error::malformed(format!("lz4 records section does not decode: {source}")))?;
    if out.len() as u64 > limit {
        return Err(Error::LimitExceeded {
            limit: "BATCH_UNCOMPRESSED_SIZE_BYTES_MAX",
            max: limit,
            actual: out.len() as u64,
        });
    }
    Ok(out)
}

/// A complete, CRC-checked encoded batch.
#[derive(Clone, Debug)]
pub struct Batch {
    header: BatchHeader,
    bytes: Bytes,
}

impl Batch {
    /// Validates `bytes` as exactly one batch: length and CRC first (so damage in transit or
    /// on disk is reported as a checksum mismatch whatever field it hit), then the header's
    /// fields. Records are decoded lazily by [`Batch::records`].
    pub fn decode(bytes: Bytes) -> Result<Self> {
        if bytes.len() < BATCH_HEADER_SIZE {
            return Err(Error::malformed(format!("batch header needs {BATCH_HEADER_SIZE} bytes, got {}", bytes.len())));
        }
        let size = peek_batch_size(&bytes).expect("the buffer holds a whole header");
        if size != bytes.len() as u64 {
            return Err(Error::malformed(format!(
                "batch length field says {size} bytes, buffer holds {}",
                bytes.len()
            )));
        }
        if bytes[VERSION_OFFSET] == BATCH_FORMAT_VERSION {
            verify_crc(&bytes)?;
        }
        let header = BatchHeader::parse(&bytes)?;
        Ok(Batch { header, bytes })
    }

    /// The decoded header.
    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// The encoded bytes of the whole batch.
    pub fn as_bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Gives back the encoded bytes.
    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }

    /// Decodes every record. Uncompressed keys and values are zero-copy slices of the batch.
    pub fn records(&self) -> Result<Vec<StoredRecord>> {
        let mut out = Vec::with_capacity(self.header.record_count.min(4096) as usize);
        self.for_each_record(|record| {
            out.push(record);
        })?;
        Ok(out)
    }

    /// Walks every record, checking framing, offset deltas and counts, without keeping them
    /// (and without allocating per record: this runs on every produced batch).
    pub fn validate_records(&self) -> Result<()> {
        self.walk_records(|_, _, _| Ok(()))
    }

    fn for_each_record(&self, mut visit: impl FnMut(StoredRecord)) -> Result<()> {
        self.walk_records(|section, record, index| {
            let mut headers = Vec::with_capacity(record.header_count.min(64) as usize);
            walk_headers(record.headers, record.header_count, index, |key, value| {
                headers.push(Header { key: key.to_string(), value: value.map(|v| section.slice_ref(v)) });
            })?;
            visit(StoredRecord {
                offset: self.header.base_offset + u64::from(index),
                timestamp_ms: record.timestamp_ms,
                key: record.key.map(|k| section.slice_ref(k)),
                value: record.value.map(|v| section.slice_ref(v)),
                headers,
            });
            Ok(())
        })
    }

    /// Parses every record in place (no allocation per record unless `visit` makes one).
    fn walk_records(&self, mut visit: impl FnMut(&Bytes, RecordRef<'_>, u32) -> Result<()>) -> Result<()> {
        let section = match self.header.compression() {
            Compression::None => self.bytes.slice(RECORDS_OFFSET..),
            Compression::Lz4 => Bytes::from(lz4_decompress(&self.bytes[RECORDS_OFFSET..])?),
        };
        let mut rest: &[u8] = &section;
        for index in 0..self.header.record_count {
            let record = parse_record(&mut rest, &self.header, index)?;
            visit(&section, record, index)?;
        }
        if !rest.is_empty() {
            return Err(Error::malformed(format!("{} trailing bytes after the last record", rest.len())));
        }
        Ok(())
    }
}

/// One record, parsed and checked in place.
struct RecordRef<'a> {
    timestamp_ms: i64,
    key: Option<&'a [u8]>,
    value: Option<&'a [u8]>,
    /// The encoded headers (already checked by [`walk_headers`]).
    headers: &'a [u8],
    header_count: u32,
}

fn parse_record<'a>(rest: &mut &'a [u8], header: &BatchHeader, index: u32) -> Result<RecordRef<'a>> {
    let len = get_varint(rest)?;
    let len =
        usize::try_from(len).map_err(|_negative| Error::malformed(format!("record {index} has negative length")))?;
    if len > rest.len() {
        return Err(Error::malformed(format!("record {index} runs past the records section")));
    }
    let (body, after) = rest.split_at(len);
    *rest = after;
    let Some((_attributes, mut body)) = body.split_first() else {
        return Err(Error::malformed(format!("record {index} is empty")));
    };
    let timestamp_delta = get_varlong(&mut body)?;
    let offset_delta = get_varint(&mut body)?;
    if i64::from(offset_delta) != i64::from(index) {
        return Err(Error::malformed(format!("record {index} has offset delta {offset_delta}")));
    }
    let key = get_optional_slice(&mut body)?;
    let value = get_optional_slice(&mut body)?;
    let header_count = get_varint(&mut body)?;
    let header_count = u32::try_from(header_count)
        .map_err(|_negative| Error::malformed(format!("record {index} has a negative header count")))?;
    if header_count > HEADERS_PER_RECORD_MAX {
        return Err(Error::malformed(format!("record {index} has {header_count} headers")));
    }
    let headers = body;
    let rest_after_headers = walk_headers(body, header_count, index, |_, _| {})?;
    if !rest_after_headers.is_empty() {
        return Err(Error::malformed(format!("record {index} has {} trailing bytes", rest_after_headers.len())));
    }
    let timestamp_ms = header.first_timestamp_ms.wrapping_add(timestamp_delta);
    Ok(RecordRef { timestamp_ms, key, value, headers, header_count })
}

/// Walks `count` encoded headers, checking each (non-null UTF-8 key, optional value) and
/// handing it to `visit`; returns the bytes after them.
fn walk_headers<'a>(
    mut body: &'a [u8],
    count: u32,
    index: u32,
    mut visit: impl FnMut(&'a str, Option<&'a [u8]>),
) -> Result<&'a [u8]> {
    for _ in 0..count {
        let Some(key) = get_optional_slice(&mut body)? else {
            return Err(Error::malformed(format!("record {index} has a header with a null key")));
        };
        let key = std::str::from_utf8(key)
            .map_err(|_invalid| Error::malformed(format!("record {index} has a header key that is not UTF-8")))?;
        visit(key, get_optional_slice(&mut body)?);
    }
    Ok(body)
}

/// Reads a length-prefixed byte string (-1 = null) from the front of `body`.
fn get_optional_slice<'a>(body: &mut &'a [u8]) -> Result<Option<&'a [u8]>> {
    let len = get_varint(body)?;
    if len == -1 {
        return Ok(None);
    }
    let len = usize::try_from(len).map_err(|_negative| Error::malformed(format!("byte string length {len}")))?;
    if len > body.len() {
        return Err(Error::malformed("byte string runs past its record"));
    }
    let (bytes, rest) = body.split_at(len);
    *body = rest;
    Ok(Some(bytes))
}

/// Splits a buffer of consecutive batches, checking each one's header and CRC. A trailing
/// partial batch ends the iteration without error (reads are cut at byte limits); a
/// complete but invalid batch yields an error and ends the iteration.
#[derive(Debug)]
pub struct BatchIter {
    rest: Bytes,
    failed: bool,
}

impl BatchIter {
    /// Iterates the batches in `bytes`.
    pub fn new(bytes: Bytes) -> Self {
        BatchIter { rest: bytes, failed: false }
    }
}

impl Iterator for BatchIter {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let size = peek_batch_size(&self.rest)?;
        if size > self.rest.len() as u64 {
            if size > u64::from(BATCH_SIZE_BYTES_MAX) {
                self.failed = true;
                return Some(Err(Error::LimitExceeded {
                    limit: "BATCH_SIZE_BYTES_MAX",
                    max: u64::from(BATCH_SIZE_BYTES_MAX),
                    actual: size,
                }));
            }
            return None;
        }
        let bytes = self.rest.split_to(size as usize);
        let batch = Batch::decode(bytes);
        self.failed = batch.is_err();
        Some(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_records() -> Vec<Record> {
        vec![
            Record { timestamp_ms: Some(1_000), ..Record::keyed("k1", "v1") },
            Record { timestamp_ms: Some(900), key: None, value: None, headers: vec![] },
            Record {
                timestamp_ms: None,
                key: Some(Bytes::new()),
                value: Some(Bytes::from(vec![7u8; 300])),
                headers: vec![
                    Header { key: "trace".into(), value: Some(Bytes::from_static(b"abc")) },
                    Header { key: "empty".into(), value: None },
                ],
            },
        ]
    }

    /// Records survive build → decode with both codecs: keys, values, null vs empty,
    /// headers, timestamps (including one below the first), offsets; the header agrees.
    #[test]
    fn build_decode_round_trip() {
        for compression in [Compression::None, Compression::Lz4] {
            let mut builder = BatchBuilder::new(compression, 5_000).producer(ProducerFields {
                producer_id: 3,
                producer_epoch: 1,
                base_sequence: 10,
            });
            for r in sample_records() {
                builder.push(&r).expect("push");
            }
            let mut bytes = builder.build().expect("build");
            set_base_offset(&mut bytes, 40);
            let batch = Batch::decode(bytes.freeze()).expect("decode");
            let header = batch.header();
            assert_eq!(header.base_offset, 40);
            assert_eq!(header.record_count, 3);
            assert_eq!(header.compression(), compression);
            assert_eq!((header.first_timestamp_ms, header.max_timestamp_ms), (1_000, 5_000));
            assert_eq!(header.producer.map(|p| p.base_sequence), Some(10));
            let decoded = batch.records().expect("records");
            for (i, (got, want)) in decoded.iter().zip(sample_records()).enumerate() {
                assert_eq!(got.offset, 40 + i as u64);
                assert_eq!(got.timestamp_ms, want.timestamp_ms.unwrap_or(5_000));
                assert_eq!((&got.key, &got.value, &got.headers), (&want.key, &want.value, &want.headers));
            }
        }
    }

    /// Every single-byte flip of a batch is rejected (CRC or header checks), except in the
    /// base offset and leader epoch, which lie outside the CRC by design.
    #[test]
    fn every_flip_outside_offset_and_epoch_is_detected() {
        let mut builder = BatchBuilder::new(Compression::None, 1);
        builder.push(&Record::keyed("key", "value")).expect("push");
        let bytes = builder.build().expect("build").freeze();
        for i in 0..bytes.len() {
            let mut bad = BytesMut::from(&bytes[..]);
            bad[i] ^= 0x01;
            let outside_crc = (BASE_OFFSET_OFFSET..BATCH_LENGTH_OFFSET).contains(&i)
                || (LEADER_EPOCH_OFFSET..VERSION_OFFSET).contains(&i);
            assert_eq!(Batch::decode(bad.freeze()).is_ok(), outside_crc, "flip at byte {i}");
        }
    }
}
