//! The engine's one error type. Variants say what went wrong and where; the source error
//! is always kept.

use std::path::PathBuf;

/// Result alias used throughout the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `rill-engine`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system call failed.
    #[error("I/O error during {op} on {path}: {source}")]
    Io {
        /// What the engine was doing (`"open"`, `"write"`, `"fdatasync"`, ...).
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The operating-system error.
        #[source]
        source: std::io::Error,
    },
    /// Bytes handed to a decoder do not form a valid record batch.
    #[error("malformed record batch: {reason}")]
    MalformedBatch {
        /// What is wrong with the bytes.
        reason: String,
    },
    /// A batch's stored CRC-32 does not match its contents.
    #[error("record batch checksum mismatch: stored {expected:#010x}, computed {actual:#010x}")]
    ChecksumMismatch {
        /// CRC stored in the batch header.
        expected: u32,
        /// CRC computed over the bytes.
        actual: u32,
    },
    /// A structure carries a format version this build does not understand.
    #[error("unsupported {what} format version {found} (this build reads {supported})")]
    UnsupportedVersion {
        /// Which structure (`"record batch"`, `"topic metadata"`, ...).
        what: &'static str,
        /// Version found in the bytes.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// A file on disk is damaged in a way recovery must not paper over.
    #[error("corrupt data in {path} at byte {pos}: {reason}")]
    Corrupt {
        /// The damaged file.
        path: PathBuf,
        /// Byte position of the damage.
        pos: u64,
        /// What is wrong.
        reason: String,
    },
    /// A size or count exceeds one of the limits in [`crate::limits`] or the configuration.
    #[error("{limit} exceeded: {actual} > {max}")]
    LimitExceeded {
        /// Name of the limit.
        limit: &'static str,
        /// The maximum allowed.
        max: u64,
        /// The value that was asked for.
        actual: u64,
    },
    /// A batch without records was appended.
    #[error("a record batch must contain at least one record")]
    EmptyBatch,
    /// A read asked for an offset outside `[log_start, log_end]`.
    #[error("offset {requested} out of range: log holds [{log_start}, {log_end})")]
    OffsetOutOfRange {
        /// The offset asked for.
        requested: u64,
        /// First offset still held.
        log_start: u64,
        /// Offset the next record will get.
        log_end: u64,
    },
    /// The named topic does not exist.
    #[error("topic '{topic}' does not exist")]
    TopicNotFound {
        /// Topic name.
        topic: String,
    },
    /// A topic with this name already exists.
    #[error("topic '{topic}' already exists")]
    TopicExists {
        /// Topic name.
        topic: String,
    },
    /// The topic has no such partition.
    #[error("topic '{topic}' has no partition {partition} (it has {partitions})")]
    PartitionNotFound {
        /// Topic name.
        topic: String,
        /// Partition asked for.
        partition: u32,
        /// Partitions the topic has.
        partitions: u32,
    },
    /// A topic name is not allowed.
    #[error("invalid topic name '{name}': {reason}")]
    InvalidTopicName {
        /// The rejected name.
        name: String,
        /// Why it is rejected.
        reason: &'static str,
    },
    /// A configuration value is out of range.
    #[error("invalid configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
    /// An earlier write or fsync failed; the partition refuses appends until it is reopened,
    /// because after a failed fsync the page cache no longer tells what reached the disk.
    #[error("partition {partition} is read-only after an earlier I/O failure ({cause}); reopen the store to recover")]
    Poisoned {
        /// `topic-partition` of the poisoned log.
        partition: String,
        /// The failure that poisoned it.
        cause: String,
    },
    /// The store or partition was closed.
    #[error("the log is closed")]
    Closed,
    /// A producer's batch does not continue its sequence: a batch is missing before it.
    #[error("out-of-order sequence from producer {producer_id}: expected {expected}, received {received}")]
    OutOfOrderSequence {
        /// Producer id.
        producer_id: i64,
        /// The sequence the log expected next.
        expected: i32,
        /// The batch's base sequence.
        received: i32,
    },
    /// A producer's batch is older than the batches the log remembers for it: a retry that
    /// came too late to be answered with its original offsets.
    #[error("duplicate sequence {received} from producer {producer_id} is older than the last 5 batches")]
    DuplicateSequence {
        /// Producer id.
        producer_id: i64,
        /// The batch's base sequence.
        received: i32,
    },
    /// A newer epoch of this producer id exists: this producer instance is fenced off.
    #[error("producer {producer_id} with epoch {epoch} is fenced by epoch {current_epoch}")]
    ProducerFenced {
        /// Producer id.
        producer_id: i64,
        /// Epoch in the batch.
        epoch: i16,
        /// Current epoch.
        current_epoch: i16,
    },
    /// The producer id was never issued, or its state expired and the batch does not start
    /// a new sequence at 0.
    #[error("unknown or expired producer id {producer_id} (batch starts at sequence {base_sequence})")]
    UnknownProducerId {
        /// Producer id.
        producer_id: i64,
        /// The batch's base sequence.
        base_sequence: i32,
    },
    /// A priority-cursor delivery was acked or nacked without holding its lease: it was
    /// already settled, its lease expired and was reclaimed, or it came from another cursor.
    #[error("lease of {topic} lane {lane} partition {partition} offset {offset} is not held")]
    LeaseNotHeld {
        /// Priority topic.
        topic: String,
        /// Lane of the delivery.
        lane: u8,
        /// Partition of the delivery.
        partition: u32,
        /// Offset of the delivery.
        offset: u64,
    },
    /// A record of a dead-letter topic lacks valid dead-letter metadata and cannot be replayed.
    #[error("dead-letter record at partition {partition} offset {offset} is invalid: {reason}")]
    InvalidDeadLetter {
        /// Dead-letter partition.
        partition: u32,
        /// Offset of the record.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A consumer-group operation named a member the group does not have: it left, its
    /// session timed out, or the process restarted. The member must join again without an id.
    #[error("consumer group {group} has no member {member_id}")]
    UnknownMember {
        /// Group.
        group: String,
        /// The member id that was given.
        member_id: String,
    },
    /// A consumer-group commit carried an old generation: the group rebalanced since the
    /// member last joined or heartbeated.
    #[error("consumer group {group} is at generation {current}, member {member_id} committed in {generation}")]
    StaleGeneration {
        /// Group.
        group: String,
        /// The committing member.
        member_id: String,
        /// The generation the commit carried.
        generation: u64,
        /// The group's generation.
        current: u64,
    },
    /// A consumer-group commit named a partition that is not assigned to the member.
    #[error("partition {partition} of {topic} is not assigned to member {member_id} of consumer group {group}")]
    PartitionNotAssigned {
        /// Group.
        group: String,
        /// The committing member.
        member_id: String,
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
    },
    /// Another process holds the store directory.
    #[error("store directory {path} is locked by another process")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },

    /// A leader epoch older than one this partition has already seen.
    #[error("leader epoch {epoch} is older than epoch {latest}, already in this log")]
    StaleLeaderEpoch {
        /// The epoch offered.
        epoch: u32,
        /// The newest epoch the partition knows.
        latest: u32,
    },

    /// A client write reached a replica that is not the partition's leader (or a replica
    /// write reached the leader).
    #[error("partition {partition} is a {role} here")]
    NotLeader {
        /// `topic-partition`.
        partition: String,
        /// What this replica is: "follower" or "leader".
        role: &'static str,
    },

    /// Batches from the leader do not continue this replica's log.
    #[error("replica batch for {partition} starts at offset {found}, the log ends at {expected}")]
    ReplicaGap {
        /// `topic-partition`.
        partition: String,
        /// The log end of this replica.
        expected: u64,
        /// The batch's base offset.
        found: u64,
    },
}

impl Error {
    /// Shorthand for [`Error::Io`].
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { op, path: path.into(), source }
    }

    /// Shorthand for [`Error::MalformedBatch`].
    pub(crate) fn malformed(reason: impl Into<String>) -> Self {
        Error::MalformedBatch { reason: reason.into() }
    }
}
