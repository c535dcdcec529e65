//! Topic metadata file (`topic.meta`), format version 1: the topic's partition count and
//! configuration, fixed-size, little-endian, CRC-protected. Normative in `docs/format.md`.

use crate::config::{FsyncPolicy, TopicConfig};
use crate::error::{Error, Result};

/// Magic bytes at the start of the file: ASCII `RTOP`.
pub const TOPIC_META_MAGIC: [u8; 4] = *b"RTOP";
/// The version this build writes and reads.
pub const TOPIC_META_VERSION: u16 = 1;

/// Offset of the magic (4 bytes).
pub const MAGIC_OFFSET: usize = 0;
/// Offset of the version (u16).
pub const VERSION_OFFSET: usize = MAGIC_OFFSET + 4;
/// Offset of the reserved field (u16, zero).
pub const RESERVED_OFFSET: usize = VERSION_OFFSET + 2;
/// Offset of the partition count (u32).
pub const PARTITIONS_OFFSET: usize = RESERVED_OFFSET + 2;
/// Offset of the fsync policy kind (u8: 0 always, 1 interval, 2 never).
pub const FSYNC_KIND_OFFSET: usize = PARTITIONS_OFFSET + 4;
/// Offset of the presence flags (u8; bit 0 segment_ms, bit 1 retention_bytes, bit 2 retention_ms).
pub const FLAGS_OFFSET: usize = FSYNC_KIND_OFFSET + 1;
/// Offset of the second reserved field (u16, zero).
pub const RESERVED2_OFFSET: usize = FLAGS_OFFSET + 1;
/// Offset of the fsync interval in ms (u64; 0 unless the policy is interval).
pub const FSYNC_INTERVAL_MS_OFFSET: usize = RESERVED2_OFFSET + 2;
/// Offset of the segment size (u64).
pub const SEGMENT_SIZE_BYTES_OFFSET: usize = FSYNC_INTERVAL_MS_OFFSET + 8;
/// Offset of the segment age limit in ms (u64; meaningful when flag bit 0 is set).
pub const SEGMENT_MS_OFFSET: usize = SEGMENT_SIZE_BYTES_OFFSET + 8;
/// Offset of the retention size (u64; flag bit 1).
pub const RETENTION_BYTES_OFFSET: usize = SEGMENT_MS_OFFSET + 8;
/// Offset of the retention age in ms (u64; flag bit 2).
pub const RETENTION_MS_OFFSET: usize = RETENTION_BYTES_OFFSET + 8;
/// Offset of the index interval (u32).
pub const INDEX_INTERVAL_BYTES_OFFSET: usize = RETENTION_MS_OFFSET + 8;
/// Offset of the maximum batch size (u32).
pub const BATCH_SIZE_BYTES_MAX_OFFSET: usize = INDEX_INTERVAL_BYTES_OFFSET + 4;
/// Offset of the index preallocation size (u64).
pub const INDEX_SIZE_BYTES_OFFSET: usize = BATCH_SIZE_BYTES_MAX_OFFSET + 4;
/// Offset of the CRC-32 over every preceding byte (u32).
pub const CRC_OFFSET: usize = INDEX_SIZE_BYTES_OFFSET + 8;
/// Total size of the file.
pub const TOPIC_META_SIZE: usize = CRC_OFFSET + 4;

const _: () = assert!(TOPIC_META_SIZE == 76);

const FLAG_SEGMENT_MS: u8 = 1 << 0;
const FLAG_RETENTION_BYTES: u8 = 1 << 1;
const FLAG_RETENTION_MS: u8 = 1 << 2;

/// Encodes a topic's configuration.
pub fn encode(config: &TopicConfig) -> [u8; TOPIC_META_SIZE] {
    let mut buf = [0u8; TOPIC_META_SIZE];
    let (kind, interval_ms) = match config.fsync {
        FsyncPolicy::Always => (0u8, 0u64),
        FsyncPolicy::Interval { interval_ms } => (1, interval_ms),
        FsyncPolicy::Never => (2, 0),
    };
    let mut flags = 0u8;
    flags |= if config.segment_ms.is_some() { FLAG_SEGMENT_MS } else { 0 };
    flags |= if config.retention_bytes.is_some() { FLAG_RETENTION_BYTES } else { 0 };
    flags |= if config.retention_ms.is_some() { FLAG_RETENTION_MS } else { 0 };
    buf[MAGIC_OFFSET..][..4].copy_from_slice(&TOPIC_META_MAGIC);
    buf[VERSION_OFFSET..][..2].copy_from_slice(&TOPIC_META_VERSION.to_le_bytes());
    buf[PARTITIONS_OFFSET..][..4].copy_from_slice(&config.partitions.to_le_bytes());
    buf[FSYNC_KIND_OFFSET] = kind;
    buf[FLAGS_OFFSET] = flags;
    buf[FSYNC_INTERVAL_MS_OFFSET..][..8].copy_from_slice(&interval_ms.to_le_bytes());
    buf[SEGMENT_SIZE_BYTES_OFFSET..][..8].copy_from_slice(&config.segment_size_bytes.to_le_bytes());
    buf[SEGMENT_MS_OFFSET..][..8].copy_from_slice(&config.segment_ms.unwrap_or(0).to_le_bytes());
    buf[RETENTION_BYTES_OFFSET..][..8].copy_from_slice(&config.retention_bytes.unwrap_or(0).to_le_bytes());
    buf[RETENTION_MS_OFFSET..][..8].copy_from_slice(&config.retention_ms.unwrap_or(0).to_le_bytes());
    buf[INDEX_INTERVAL_BYTES_OFFSET..][..4].copy_from_slice(&config.index_interval_bytes.to_le_bytes());
    buf[BATCH_SIZE_BYTES_MAX_OFFSET..][..4].copy_from_slice(&config.batch_size_bytes_max.to_le_bytes());
    buf[INDEX_SIZE_BYTES_OFFSET..][..8].copy_from_slice(&config.index_size_bytes.to_le_bytes());
    let crc = crc32fast::hash(&buf[..CRC_OFFSET]);
    buf[CRC_OFFSET..][..4].copy_from_slice(&crc.to_le_bytes());
    buf
}

fn u16_at(buf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([buf[at], buf[at + 1]])
}
fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

/// Decodes and validates a topic metadata file.
pub fn decode(buf: &[u8]) -> Result<TopicConfig> {
    let malformed = |reason: String| Error::InvalidConfig { reason: format!("topic metadata: {reason}") };
    if buf.len() != TOPIC_META_SIZE {
        return Err(malformed(format!("{} bytes, expected {TOPIC_META_SIZE}", buf.len())));
    }
    if buf[MAGIC_OFFSET..][..4] != TOPIC_META_MAGIC {
        return Err(malformed("bad magic".into()));
    }
    let version = u16_at(buf, VERSION_OFFSET);
    if version != TOPIC_META_VERSION {
        return Err(Error::UnsupportedVersion {
            what: "topic metadata",
            found: u32::from(version),
            supported: u32::from(TOPIC_META_VERSION),
        });
    }
    let expected = u32_at(buf, CRC_OFFSET);
    let actual = crc32fast::hash(&buf[..CRC_OFFSET]);
    if expected != actual {
        return Err(Error::ChecksumMismatch { expected, actual });
    }
    let flags = buf[FLAGS_OFFSET];
    let fsync = match buf[FSYNC_KIND_OFFSET] {
        0 => FsyncPolicy::Always,
        1 => FsyncPolicy::Interval { interval_ms: u64_at(buf, FSYNC_INTERVAL_MS_OFFSET) },
        2 => FsyncPolicy::Never,
        other => return Err(malformed(format!("unknown fsync policy {other}"))),
    };
    let optional = |flag: u8, at: usize| (flags & flag != 0).then(|| u64_at(buf, at));
    let config = TopicConfig {
        partitions: u32_at(buf, PARTITIONS_OFFSET),
        fsync,
        segment_size_bytes: u64_at(buf, SEGMENT_SIZE_BYTES_OFFSET),
        segment_ms: optional(FLAG_SEGMENT_MS, SEGMENT_MS_OFFSET),
        retention_bytes: optional(FLAG_RETENTION_BYTES, RETENTION_BYTES_OFFSET),
        retention_ms: optional(FLAG_RETENTION_MS, RETENTION_MS_OFFSET),
        index_interval_bytes: u32_at(buf, INDEX_INTERVAL_BYTES_OFFSET),
        batch_size_bytes_max: u32_at(buf, BATCH_SIZE_BYTES_MAX_OFFSET),
        index_size_bytes: u64_at(buf, INDEX_SIZE_BYTES_OFFSET),
    };
    config.validate()?;
    // Only the canonical encoding is accepted: reserved fields, unknown flag bits, an absent
    // field's value and the interval of a non-interval policy must be zero, as `encode`
    // writes them. Anything else is damage or a format this build does not understand.
    if encode(&config)[..] != buf[..] {
        return Err(malformed("reserved, unknown or unused bytes are not zero".into()));
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field survives a round trip; a flipped byte anywhere is rejected.
    #[test]
    fn round_trip_and_corruption() {
        let config = TopicConfig {
            partitions: 7,
            fsync: FsyncPolicy::Interval { interval_ms: 250 },
            retention_bytes: Some(1 << 30),
            segment_ms: None,
            ..TopicConfig::default()
        };
        let buf = encode(&config);
        assert_eq!(decode(&buf).expect("decodes"), config);
        for i in 0..TOPIC_META_SIZE {
            let mut bad = buf;
            bad[i] ^= 0x40;
            assert!(decode(&bad).is_err(), "flip at byte {i} detected");
        }
        assert!(decode(&buf[..TOPIC_META_SIZE - 1]).is_err());
    }

    /// Regression (found by `fuzz/topic_meta_decode`): bytes `encode` always writes as zero
    /// were ignored, so a file with a valid CRC but stray bytes there decoded, and decoding
    /// was not the inverse of encoding. Each such byte must now be rejected.
    #[test]
    fn rejects_non_zero_reserved_and_unused_bytes() {
        let config = TopicConfig { segment_ms: None, ..TopicConfig::default() };
        let buf = encode(&config);
        let with_crc = |mut bad: [u8; TOPIC_META_SIZE]| {
            let crc = crc32fast::hash(&bad[..CRC_OFFSET]);
            bad[CRC_OFFSET..][..4].copy_from_slice(&crc.to_le_bytes());
            bad
        };
        assert_eq!(decode(&with_crc(buf)).expect("canonical decodes"), config);
        // Reserved fields, unknown flag bits, the interval of `Always`, unflagged segment_ms.
        for (at, value) in [(RESERVED_OFFSET, 1), (RESERVED2_OFFSET + 1, 0x80), (FLAGS_OFFSET, 0x08 | 0x04)]
            .into_iter()
            .chain([(FSYNC_INTERVAL_MS_OFFSET, 5), (SEGMENT_MS_OFFSET + 7, 1)])
        {
            let mut bad = buf;
            bad[at] = value;
            assert!(decode(&with_crc(bad)).is_err(), "byte {at} = {value:#x} rejected");
        }
    }
}
