//! Named limits of the engine. Every bound the engine enforces lives here, with the
//! reason for its value, so that a reviewer can see all of them in one place.

/// Largest encoded record batch (header + records, after compression) the log accepts.
/// 16 MiB: large enough for any sane producer batch, small enough that a decoder can
/// allocate it without a second thought. Kafka's default `message.max.bytes` is 1 MiB.
pub const BATCH_SIZE_BYTES_MAX: u32 = 16 * 1024 * 1024;

/// Largest *decompressed* records section of a batch. Bounds what a hostile lz4 payload
/// can make a decoder allocate (a compression bomb).
pub const BATCH_UNCOMPRESSED_SIZE_BYTES_MAX: u32 = 64 * 1024 * 1024;

/// Most records one batch may carry. The last offset delta is a `u32`; this keeps it far
/// from overflow and keeps per-batch work bounded.
pub const RECORDS_PER_BATCH_MAX: u32 = 1_000_000;

/// Most headers one record may carry.
pub const HEADERS_PER_RECORD_MAX: u32 = 10_000;

/// Largest segment file. Index entries store file positions as `u32`, so a segment can
/// never exceed 4 GiB; 2 GiB leaves room for one maximum batch past the roll threshold.
pub const SEGMENT_SIZE_BYTES_MAX: u64 = 2 * 1024 * 1024 * 1024;

/// Smallest allowed segment size; below this a single batch could not fit.
pub const SEGMENT_SIZE_BYTES_MIN: u64 = 4 * 1024;

/// Largest preallocated index file per segment (offset or time index).
pub const INDEX_SIZE_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// Most partitions per topic.
pub const PARTITIONS_PER_TOPIC_MAX: u32 = 10_000;

/// Most producer ids whose state one partition keeps (bounds the snapshot a reader accepts).
pub const PRODUCERS_PER_PARTITION_MAX: u32 = 1_000_000;

/// Longest transactional id, in bytes.
pub const TRANSACTIONAL_ID_LEN_MAX: usize = 249;

/// Longest consumer group name, in bytes.
pub const CONSUMER_GROUP_LEN_MAX: usize = 249;

/// Most committed offsets a store keeps (each a (group, topic, partition) key); bounds the
/// checkpoint file that every commit rewrites.
pub const COMMITTED_OFFSETS_MAX: usize = 100_000;

/// Longest topic name, as in Kafka (file-name limits leave room for the partition suffix).
pub const TOPIC_NAME_LEN_MAX: usize = 249;

/// Most priority lanes a priority topic may have (`p0` critical … `p3` batch).
pub const PRIORITY_LANES_MAX: u8 = 4;

/// Largest lane weight of a priority cursor. The scheduler's stride is
/// `PRIORITY_STRIDE_SCALE / weight`, exact for every weight up to this value.
pub const PRIORITY_WEIGHT_MAX: u32 = 16;

/// lcm(1, …, 16): every allowed weight divides it, so strides are exact integers.
pub const PRIORITY_STRIDE_SCALE: u64 = 720_720;

/// Most offsets past its committed offset a priority cursor tracks per lane partition
/// (settled, failed or leased). Bounds the cursor's memory and the checkpoint every ack
/// rewrites: a lane partition whose oldest unsettled message lags this far stops
/// delivering new messages until it is settled.
pub const PRIORITY_CURSOR_WINDOW_MAX: u64 = 100_000;

/// Most leases one priority cursor may hold at once (`max_in_flight` ≤ this).
pub const PRIORITY_IN_FLIGHT_MAX: u32 = 100_000;

/// Longest a priority cursor's lease may be extended by one `extend_lease` call (1 hour):
/// the new deadline is at most this far in the future, so a stuck consumer cannot hold a
/// message indefinitely without calling again.
pub const PRIORITY_LEASE_EXTENSION_MS_MAX: u64 = 60 * 60 * 1000;

/// Largest `max_deliveries` of a priority cursor.
pub const PRIORITY_DELIVERIES_MAX: u32 = 1_000;

/// Most members of one consumer group (a join beyond it is refused).
pub const GROUP_MEMBERS_MAX: usize = 1_000;

/// Most topics one consumer-group member subscribes to.
pub const GROUP_TOPICS_MAX: usize = 100;

/// Shortest consumer-group session timeout (ms): shorter ones would expire members between
/// two heartbeats of a busy client.
pub const GROUP_SESSION_TIMEOUT_MS_MIN: u64 = 100;

/// Longest consumer-group session timeout (30 min): a dead member's partitions are idle at
/// most this long.
pub const GROUP_SESSION_TIMEOUT_MS_MAX: u64 = 30 * 60 * 1000;

/// Longest failure reason kept in a dead-letter record (longer reasons are cut at a
/// character boundary).
pub const DEAD_LETTER_REASON_LEN_MAX: usize = 1_024;

const _: () = assert!(BATCH_SIZE_BYTES_MAX as u64 <= SEGMENT_SIZE_BYTES_MIN * 4096);
const _: () = assert!(SEGMENT_SIZE_BYTES_MAX + BATCH_SIZE_BYTES_MAX as u64 <= u32::MAX as u64);
const _: () = assert!(BATCH_UNCOMPRESSED_SIZE_BYTES_MAX >= BATCH_SIZE_BYTES_MAX);
const _: () = assert!(SEGMENT_SIZE_BYTES_MIN < SEGMENT_SIZE_BYTES_MAX);
const _: () = {
    let mut weight = 1;
    while weight <= PRIORITY_WEIGHT_MAX {
        assert!(PRIORITY_STRIDE_SCALE.is_multiple_of(weight as u64), "every weight divides the stride scale");
        weight += 1;
    }
};
const _: () = assert!(PRIORITY_IN_FLIGHT_MAX as u64 <= PRIORITY_CURSOR_WINDOW_MAX * PRIORITY_LANES_MAX as u64);
