//! Kafka RecordBatch v2 (magic 2) ⇄ rill record batch v1.
//!
//! The two layouts put the same fields at the same byte offsets (docs/format.md); they differ
//! in byte order (Kafka big-endian, rill little-endian), the checksum (Kafka CRC-32C of bytes
//! 21..end, rill CRC-32 IEEE of the same range), the version byte (2 vs 1), and the codecs
//! rill stores (none and LZ4). The records section is identical, so translation rewrites the
//! 61-byte header and copies the records section; a gzip, snappy or zstd section is
//! decompressed and stored as one LZ4 frame (docs/protocol.md, "Kafka listener").

use std::io::Read;

use bytes::{BufMut, BytesMut};
use rill_engine::format::batch::{
    compute_crc, ATTRIBUTES_OFFSET, ATTR_COMPRESSION_MASK, ATTR_CONTROL, ATTR_LOG_APPEND_TIME, ATTR_TRANSACTIONAL,
    BASE_SEQUENCE_OFFSET, BATCH_FORMAT_VERSION, BATCH_HEADER_SIZE, BATCH_LENGTH_OFFSET, CRC_OFFSET,
    FIRST_TIMESTAMP_OFFSET, LAST_OFFSET_DELTA_OFFSET, LEADER_EPOCH_OFFSET, LOG_OVERHEAD, MAX_TIMESTAMP_OFFSET,
    PRODUCER_EPOCH_OFFSET, PRODUCER_ID_OFFSET, RECORD_COUNT_OFFSET, VERSION_OFFSET,
};
use rill_engine::limits::{BATCH_SIZE_BYTES_MAX, BATCH_UNCOMPRESSED_SIZE_BYTES_MAX};

/// Kafka's magic byte for RecordBatch v2.
pub const KAFKA_MAGIC: u8 = 2;
const CODEC_NONE: u16 = 0;
const CODEC_GZIP: u16 = 1;
const CODEC_SNAPPY: u16 = 2;
const CODEC_LZ4: u16 = 3;
const CODEC_ZSTD: u16 = 4;
/// Snappy as Kafka clients write it: the framing of snappy-java's stream format.
const XERIAL_MAGIC: &[u8; 8] = b"\x82SNAPPY\x00";
const XERIAL_HEADER_SIZE: usize = 16;

/// Why a produced Kafka batch was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// Framing, checksum or a field value is wrong (Kafka `CORRUPT_MESSAGE`).
    #[error("corrupt record batch: {0}")]
    Corrupt(String),
    /// A message format or feature rill does not store: magic 0/1, transactions, control
    /// batches (Kafka `UNSUPPORTED_FOR_MESSAGE_FORMAT`).
    #[error("unsupported record batch: {0}")]
    Unsupported(String),
    /// The batch is over a size limit (Kafka `MESSAGE_TOO_LARGE`).
    #[error("record batch too large: {0}")]
    TooLarge(String),
}

fn be_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}
fn be_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}
fn le_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

/// Reverses the byte order of the fixed-width field at `at..at + width` while copying it
/// from `src` to `dst` (both headers put every field at the same offset).
fn swap_field(src: &[u8], dst: &mut [u8], at: usize, width: usize) {
    for i in 0..width {
        dst[at + i] = src[at + width - 1 - i];
    }
}

/// Header fields after the checksum: (offset, width). Together with base offset, length,
/// leader epoch, version and CRC they cover all 61 header bytes.
const SWAPPED_FIELDS: [(usize, usize); 8] = [
    (ATTRIBUTES_OFFSET, 2),
    (LAST_OFFSET_DELTA_OFFSET, 4),
    (FIRST_TIMESTAMP_OFFSET, 8),
    (MAX_TIMESTAMP_OFFSET, 8),
    (PRODUCER_ID_OFFSET, 8),
    (PRODUCER_EPOCH_OFFSET, 2),
    (BASE_SEQUENCE_OFFSET, 4),
    (RECORD_COUNT_OFFSET, 4),
];

/// Splits the `records` field of a Kafka produce request into rill batches ready for
/// `Partition::append_batch` (base offsets zero: the log assigns them). Every batch is
/// checked for framing, magic and CRC-32C here; the engine validates the records.
pub fn kafka_to_rill(mut src: &[u8]) -> Result<Vec<BytesMut>, BatchError> {
    let mut out = Vec::new();
    while !src.is_empty() {
        if src.len() < BATCH_HEADER_SIZE {
            return Err(BatchError::Corrupt(format!("{} trailing bytes are not a whole batch header", src.len())));
        }
        let length = be_u32(src, BATCH_LENGTH_OFFSET);
        let total = u64::from(length) + LOG_OVERHEAD as u64;
        if total < BATCH_HEADER_SIZE as u64 || total > src.len() as u64 {
            return Err(BatchError::Corrupt(format!(
                "batch length {length} does not fit the {} bytes present",
                src.len()
            )));
        }
        let (batch, rest) = src.split_at(total as usize);
        out.push(one_kafka_batch(batch)?);
        src = rest;
    }
    if out.is_empty() {
        return Err(BatchError::Corrupt("no record batch in the request".into()));
    }
    Ok(out)
}

fn one_kafka_batch(batch: &[u8]) -> Result<BytesMut, BatchError> {
    let magic = batch[VERSION_OFFSET];
    if magic != KAFKA_MAGIC {
        return Err(BatchError::Unsupported(format!("message format magic {magic}; only magic 2 is accepted")));
    }
    let stored = be_u32(batch, CRC_OFFSET);
    let computed = crc32c::crc32c(&batch[ATTRIBUTES_OFFSET..]);
    if stored != computed {
        return Err(BatchError::Corrupt(format!("CRC-32C {stored:#010x} stored, {computed:#010x} computed")));
    }
    let attributes = be_u16(batch, ATTRIBUTES_OFFSET);
    if attributes & (ATTR_TRANSACTIONAL | ATTR_CONTROL) != 0 {
        return Err(BatchError::Unsupported("transactional and control batches are not supported".into()));
    }
    if attributes & !(ATTR_COMPRESSION_MASK | ATTR_LOG_APPEND_TIME) != 0 {
        return Err(BatchError::Corrupt(format!("unknown attribute bits {attributes:#06x}")));
    }
    let section = &batch[BATCH_HEADER_SIZE..];
    let codec = attributes & ATTR_COMPRESSION_MASK;
    let compressed;
    let (records, stored_codec) = match codec {
        CODEC_NONE => (section, CODEC_NONE),
        CODEC_LZ4 => (section, CODEC_LZ4),
        CODEC_GZIP | CODEC_SNAPPY | CODEC_ZSTD => {
            let plain = decompress(codec, section)?;
            compressed = lz4_frame(&plain)?;
            (&compressed[..], CODEC_LZ4)
        }
        other => return Err(BatchError::Corrupt(format!("unknown compression codec {other}"))),
    };
    let total = BATCH_HEADER_SIZE + records.len();
    if total > BATCH_SIZE_BYTES_MAX as usize {
        return Err(BatchError::TooLarge(format!("{total} bytes stored, limit {BATCH_SIZE_BYTES_MAX}")));
    }
    let mut out = BytesMut::zeroed(BATCH_HEADER_SIZE);
    let length = u32::try_from(total - LOG_OVERHEAD).map_err(|_| BatchError::TooLarge(format!("{total} bytes")))?;
    out[BATCH_LENGTH_OFFSET..LEADER_EPOCH_OFFSET].copy_from_slice(&length.to_le_bytes());
    out[VERSION_OFFSET] = BATCH_FORMAT_VERSION;
    for (at, width) in SWAPPED_FIELDS {
        swap_field(batch, &mut out, at, width);
    }
    let attributes = (attributes & !ATTR_COMPRESSION_MASK) | stored_codec;
    out[ATTRIBUTES_OFFSET..ATTRIBUTES_OFFSET + 2].copy_from_slice(&attributes.to_le_bytes());
    out.extend_from_slice(records);
    let crc = compute_crc(&out);
    out[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Decompresses a gzip, snappy (xerial-framed or raw) or zstd records section, refusing
/// anything that grows past the engine's uncompressed-size limit.
fn decompress(codec: u16, section: &[u8]) -> Result<Vec<u8>, BatchError> {
    let limit = u64::from(BATCH_UNCOMPRESSED_SIZE_BYTES_MAX);
    let bad = |what: &str, e: &dyn std::fmt::Display| BatchError::Corrupt(format!("{what} section: {e}"));
    let mut out = Vec::new();
    match codec {
        CODEC_GZIP => {
            flate2::read::GzDecoder::new(section).take(limit + 1).read_to_end(&mut out).map_err(|e| bad("gzip", &e))?;
        }
        CODEC_ZSTD => {
            zstd::stream::read::Decoder::new(section)
                .map_err(|e| bad("zstd", &e))?
                .take(limit + 1)
                .read_to_end(&mut out)
                .map_err(|e| bad("zstd", &e))?;
        }
        _ => snappy(section, limit, &mut out)?,
    }
    if out.len() as u64 > limit {
        return Err(BatchError::TooLarge(format!("records section decompresses past {limit} bytes")));
    }
    Ok(out)
}

/// Snappy as Kafka clients send it: the xerial stream (16-byte header, then blocks each
/// prefixed by a big-endian u32 length), or one raw snappy block.
fn snappy(section: &[u8], limit: u64, out: &mut Vec<u8>) -> Result<(), BatchError> {
    let block = |compressed: &[u8], out: &mut Vec<u8>| -> Result<(), BatchError> {
        let len = snap::raw::decompress_len(compressed).map_err(|e| BatchError::Corrupt(format!("snappy: {e}")))?;
        if (out.len() + len) as u64 > limit {
            return Err(BatchError::TooLarge(format!("records section decompresses past {limit} bytes")));
        }
        let start = out.len();
        out.resize(start + len, 0);
        snap::raw::Decoder::new()
            .decompress(compressed, &mut out[start..])
            .map_err(|e| BatchError::Corrupt(format!("snappy: {e}")))?;
        Ok(())
    };
    if !section.starts_with(XERIAL_MAGIC) {
        return block(section, out);
    }
    if section.len() < XERIAL_HEADER_SIZE {
        return Err(BatchError::Corrupt("snappy: truncated stream header".into()));
    }
    let mut rest = &section[XERIAL_HEADER_SIZE..];
    while !rest.is_empty() {
        if rest.len() < 4 {
            return Err(BatchError::Corrupt("snappy: truncated block length".into()));
        }
        let len = be_u32(rest, 0) as usize;
        if rest.len() - 4 < len {
            return Err(BatchError::Corrupt(format!("snappy: block of {len} bytes past the end")));
        }
        block(&rest[4..4 + len], out)?;
        rest = &rest[4 + len..];
    }
    Ok(())
}

fn lz4_frame(plain: &[u8]) -> Result<Vec<u8>, BatchError> {
    use std::io::Write;
    let mut encoder = lz4_flex::frame::FrameEncoder::new(Vec::with_capacity(plain.len() / 2 + 64));
    encoder.write_all(plain).map_err(|e| BatchError::Corrupt(format!("lz4: {e}")))?;
    encoder.finish().map_err(|e| BatchError::Corrupt(format!("lz4: {e}")))
}

/// Appends the Kafka form of every whole rill batch in `stored` (as returned by
/// `Partition::read`) to `out`; returns the bytes appended. A partial batch at the end
/// (never produced by the engine) is left out.
pub fn rill_to_kafka(mut stored: &[u8], out: &mut BytesMut) -> usize {
    let start = out.len();
    while stored.len() >= BATCH_HEADER_SIZE {
        let total = le_u32(stored, BATCH_LENGTH_OFFSET) as usize + LOG_OVERHEAD;
        if total < BATCH_HEADER_SIZE || total > stored.len() {
            debug_assert!(false, "the log returned a partial batch");
            break;
        }
        let (batch, rest) = stored.split_at(total);
        let at = out.len();
        out.reserve(total);
        out.put_bytes(0, BATCH_HEADER_SIZE);
        let header = &mut out[at..at + BATCH_HEADER_SIZE];
        swap_field(batch, header, 0, 8);
        swap_field(batch, header, BATCH_LENGTH_OFFSET, 4);
        swap_field(batch, header, LEADER_EPOCH_OFFSET, 4);
        header[VERSION_OFFSET] = KAFKA_MAGIC;
        for (offset, width) in SWAPPED_FIELDS {
            swap_field(batch, header, offset, width);
        }
        out.extend_from_slice(&batch[BATCH_HEADER_SIZE..]);
        let crc = crc32c::crc32c(&out[at + ATTRIBUTES_OFFSET..]);
        out[at + CRC_OFFSET..at + CRC_OFFSET + 4].copy_from_slice(&crc.to_be_bytes());
        stored = rest;
    }
    out.len() - start
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use kafka_protocol::records::{
        Compression as KafkaCompression, Record as KafkaRecord, RecordBatchDecoder, RecordBatchEncoder,
        RecordEncodeOptions, TimestampType,
    };
    use rill_engine::format::batch::Batch;

    fn kafka_records(n: i32) -> Vec<KafkaRecord> {
        (0..n)
            .map(|i| KafkaRecord {
                transactional: false,
                control: false,
                delete_horizon: false,
                partition_leader_epoch: 0,
                producer_id: 7,
                producer_epoch: 1,
                timestamp_type: TimestampType::Creation,
                offset: i64::from(i),
                sequence: 100 + i,
                timestamp: 1_700_000_000_000 + i64::from(i),
                key: Some(Bytes::from(format!("key-{i}"))),
                value: if i % 7 == 3 { None } else { Some(Bytes::from(vec![b'v'; (i % 50) as usize])) },
                headers: Default::default(),
            })
            .collect()
    }

    fn encode(records: &[KafkaRecord], compression: KafkaCompression) -> BytesMut {
        let mut buf = BytesMut::new();
        RecordBatchEncoder::encode(&mut buf, records, &RecordEncodeOptions { version: 2, compression })
            .expect("encode");
        buf
    }

    /// Every codec a Kafka client sends becomes a valid rill batch with the same records,
    /// and reading it back gives Kafka bytes that a Kafka decoder accepts, records equal.
    #[test]
    fn every_codec_round_trips_through_the_rill_format() {
        let records = kafka_records(120);
        for codec in [
            KafkaCompression::None,
            KafkaCompression::Gzip,
            KafkaCompression::Snappy,
            KafkaCompression::Lz4,
            KafkaCompression::Zstd,
        ] {
            let kafka = encode(&records, codec);
            let rill = kafka_to_rill(&kafka).expect("translate");
            assert_eq!(rill.len(), 1);
            let batch = Batch::decode(rill[0].clone().freeze()).expect("a valid rill batch");
            let stored = batch.records().expect("records");
            assert_eq!(stored.len(), records.len(), "{codec:?}");
            for (s, k) in stored.iter().zip(&records) {
                assert_eq!(s.key.as_ref(), k.key.as_ref(), "{codec:?}");
                assert_eq!(s.value.as_ref(), k.value.as_ref(), "{codec:?}");
                assert_eq!(s.timestamp_ms, k.timestamp, "{codec:?}");
            }
            let producer = batch.header().producer.expect("producer fields kept");
            assert_eq!((producer.producer_id, producer.producer_epoch, producer.base_sequence), (7, 1, 100));

            let mut back = BytesMut::new();
            assert_eq!(rill_to_kafka(&rill[0], &mut back), back.len());
            let mut bytes = back.freeze();
            let decoded = RecordBatchDecoder::decode(&mut bytes).expect("Kafka decodes the fetched batch");
            assert_eq!(decoded.records.len(), records.len());
            for (d, k) in decoded.records.iter().zip(&records) {
                assert_eq!((&d.key, &d.value, d.offset, d.sequence), (&k.key, &k.value, k.offset, k.sequence));
            }
        }
    }

    /// Damage, old formats and transactions are refused with the right kind of error.
    #[test]
    fn bad_batches_are_refused() {
        let good = encode(&kafka_records(3), KafkaCompression::None);
        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(matches!(kafka_to_rill(&flipped), Err(BatchError::Corrupt(_))));
        let mut old = good.clone();
        old[VERSION_OFFSET] = 1;
        assert!(matches!(kafka_to_rill(&old), Err(BatchError::Unsupported(_))));
        assert!(matches!(kafka_to_rill(&good[..good.len() - 1]), Err(BatchError::Corrupt(_))));
        assert!(matches!(kafka_to_rill(&[]), Err(BatchError::Corrupt(_))));
        let mut txn = good.clone();
        let attributes = be_u16(&txn, ATTRIBUTES_OFFSET) | ATTR_TRANSACTIONAL;
        txn[ATTRIBUTES_OFFSET..ATTRIBUTES_OFFSET + 2].copy_from_slice(&attributes.to_be_bytes());
        let crc = crc32c::crc32c(&txn[ATTRIBUTES_OFFSET..]);
        txn[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_be_bytes());
        assert!(matches!(kafka_to_rill(&txn), Err(BatchError::Unsupported(_))));
        // Two batches in one request are two rill batches.
        let mut two = good.clone();
        two.extend_from_slice(&good);
        assert_eq!(kafka_to_rill(&two).expect("two").len(), 2);
    }

    /// A snappy bomb stops at the limit instead of allocating without bound.
    #[test]
    fn decompression_is_bounded() {
        let plain = vec![0u8; 1 << 20];
        let block = snap::raw::Encoder::new().compress_vec(&plain).expect("compress");
        let mut out = Vec::new();
        assert!(matches!(snappy(&block, 1 << 19, &mut out), Err(BatchError::TooLarge(_))));
    }
}
