//! The server crate's error type and the protocol's error codes.

/// Result alias of the server crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Wire error codes (u16). Append-only: a retired code is never reused. Meanings are in
/// `docs/protocol.md`, "Error codes".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// Success.
    None = 0,
    /// The api key is not known.
    UnknownApi = 1,
    /// The api version is not supported.
    UnsupportedVersion = 2,
    /// The request body does not parse.
    MalformedRequest = 3,
    /// The topic does not exist.
    TopicNotFound = 4,
    /// The topic already exists.
    TopicExists = 5,
    /// The partition does not exist.
    PartitionNotFound = 6,
    /// The offset is outside the log.
    OffsetOutOfRange = 7,
    /// The record batch is malformed or fails its CRC.
    InvalidBatch = 8,
    /// A size or count limit was exceeded.
    LimitExceeded = 9,
    /// The server is at its in-flight limit; retry after the given time.
    Throttled = 10,
    /// Producer sequence gap.
    OutOfOrderSequence = 11,
    /// Producer batch older than the remembered window.
    DuplicateSequence = 12,
    /// Producer epoch fenced.
    ProducerFenced = 13,
    /// Producer id unknown or expired.
    UnknownProducerId = 14,
    /// A storage failure (I/O error, read-only after a failed fsync, corruption).
    StorageError = 15,
    /// Invalid configuration value.
    InvalidConfig = 16,
    /// Invalid topic name.
    InvalidTopicName = 17,
    /// The server is shutting down.
    ShuttingDown = 18,
    /// A bug in the server.
    Internal = 19,
    /// A priority-cursor ack, nack or lease extension names a lease that is not held.
    LeaseNotHeld = 20,
    /// A dead-letter record lacks valid dead-letter metadata and cannot be replayed.
    InvalidDeadLetter = 21,
    /// The consumer group has no such member (it left, timed out, or the server restarted).
    UnknownMember = 22,
    /// A member committed in an old generation: the group rebalanced.
    StaleGeneration = 23,
    /// A member committed a partition that is not assigned to it.
    PartitionNotAssigned = 24,
    /// This node does not lead the partition (or no longer leads it): refresh metadata and
    /// send to the leader.
    NotLeader = 25,
    /// The request names a leader epoch that is not the partition's current one.
    FencedLeaderEpoch = 26,
    /// Fewer replicas than `min_insync_replicas` are in sync: the write is refused (or,
    /// if already written, not acknowledged).
    NotEnoughReplicas = 27,
}

impl ErrorCode {
    /// Decodes a wire code.
    pub fn from_u16(code: u16) -> Option<Self> {
        use ErrorCode::*;
        Some(match code {
            0 => None,
            1 => UnknownApi,
            2 => UnsupportedVersion,
            3 => MalformedRequest,
            4 => TopicNotFound,
            5 => TopicExists,
            6 => PartitionNotFound,
            7 => OffsetOutOfRange,
            8 => InvalidBatch,
            9 => LimitExceeded,
            10 => Throttled,
            11 => OutOfOrderSequence,
            12 => DuplicateSequence,
            13 => ProducerFenced,
            14 => UnknownProducerId,
            15 => StorageError,
            16 => InvalidConfig,
            17 => InvalidTopicName,
            18 => ShuttingDown,
            19 => Internal,
            20 => LeaseNotHeld,
            21 => InvalidDeadLetter,
            22 => UnknownMember,
            23 => StaleGeneration,
            24 => PartitionNotAssigned,
            25 => NotLeader,
            26 => FencedLeaderEpoch,
            27 => NotEnoughReplicas,
            _ => return Option::None,
        })
    }

    /// Whether a client may retry the same request unchanged.
    pub fn is_retriable(self) -> bool {
        matches!(
            self,
            ErrorCode::Throttled | ErrorCode::ShuttingDown | ErrorCode::NotEnoughReplicas | ErrorCode::NotLeader
        )
    }
}

/// Everything that can go wrong in `rill-server` (server, client and CLI).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A frame or message does not follow the protocol.
    #[error("protocol error: {reason}")]
    Protocol {
        /// What is wrong.
        reason: String,
    },
    /// A frame's length prefix is over the limit.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// Announced length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// The server answered a request with an error code.
    #[error("server error {code:?}: {message}")]
    Server {
        /// The code.
        code: ErrorCode,
        /// The server's message.
        message: String,
        /// For `Throttled`: how long to wait before retrying.
        retry_after_ms: Option<u32>,
    },
    /// A socket or file operation failed.
    #[error("I/O error during {op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] rill_engine::Error),
    /// Configuration could not be read or is invalid.
    #[error("configuration error: {reason}")]
    Config {
        /// What is wrong.
        reason: String,
    },
    /// The connection closed before the response arrived.
    #[error("connection closed")]
    ConnectionClosed,
    /// A file operation failed (controller state).
    #[error("I/O error during {op} on {path}: {source}")]
    FileIo {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A controller state file does not hold what it must (bad magic, length or checksum).
    #[error("corrupt controller file {path}: {reason}")]
    ControllerCorrupt {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A controller message or record could not be encoded or decoded.
    #[error("controller codec error ({what}): {source}")]
    ControllerCodec {
        /// What was being encoded or decoded.
        what: &'static str,
        /// The error.
        #[source]
        source: serde_json::Error,
    },
    /// openraft failed an operation.
    #[error("raft error during {op}: {source}")]
    Raft {
        /// What was being done.
        op: &'static str,
        /// openraft's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Another controller node failed a forwarded request.
    #[error("controller node {node} failed the request: {reason}")]
    ControllerRemote {
        /// The node that answered.
        node: u32,
        /// Its reason.
        reason: String,
    },
    /// A request did not complete in time.
    #[error("timed out after {timeout_ms} ms waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// The timeout.
        timeout_ms: u64,
    },
}

impl Error {
    /// Shorthand for [`Error::Protocol`].
    pub fn malformed(reason: impl Into<String>) -> Self {
        Error::Protocol { reason: reason.into() }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(op: &'static str, source: std::io::Error) -> Self {
        Error::Io { op, source }
    }

    /// The wire code this error is answered with.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Protocol { .. } => ErrorCode::MalformedRequest,
            Error::FrameTooLarge { .. } => ErrorCode::LimitExceeded,
            Error::Server { code, .. } => *code,
            Error::Engine(e) => engine_code(e),
            Error::Config { .. } => ErrorCode::InvalidConfig,
            Error::FileIo { .. } | Error::ControllerCorrupt { .. } => ErrorCode::StorageError,
            Error::Io { .. }
            | Error::ConnectionClosed
            | Error::Timeout { .. }
            | Error::ControllerCodec { .. }
            | Error::Raft { .. }
            | Error::ControllerRemote { .. } => ErrorCode::Internal,
        }
    }
}

/// Maps an engine error to its wire code.
pub fn engine_code(e: &rill_engine::Error) -> ErrorCode {
    use rill_engine::Error as E;
    match e {
        E::MalformedBatch { .. } | E::ChecksumMismatch { .. } | E::UnsupportedVersion { .. } | E::EmptyBatch => {
            ErrorCode::InvalidBatch
        }
        E::LimitExceeded { .. } => ErrorCode::LimitExceeded,
        E::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
        E::TopicNotFound { .. } => ErrorCode::TopicNotFound,
        E::TopicExists { .. } => ErrorCode::TopicExists,
        E::PartitionNotFound { .. } => ErrorCode::PartitionNotFound,
        E::InvalidTopicName { .. } => ErrorCode::InvalidTopicName,
        E::InvalidConfig { .. } => ErrorCode::InvalidConfig,
        E::OutOfOrderSequence { .. } => ErrorCode::OutOfOrderSequence,
        E::DuplicateSequence { .. } => ErrorCode::DuplicateSequence,
        E::ProducerFenced { .. } => ErrorCode::ProducerFenced,
        E::UnknownProducerId { .. } => ErrorCode::UnknownProducerId,
        E::Closed => ErrorCode::ShuttingDown,
        E::LeaseNotHeld { .. } => ErrorCode::LeaseNotHeld,
        E::InvalidDeadLetter { .. } => ErrorCode::InvalidDeadLetter,
        E::UnknownMember { .. } => ErrorCode::UnknownMember,
        E::StaleGeneration { .. } => ErrorCode::StaleGeneration,
        E::PartitionNotAssigned { .. } => ErrorCode::PartitionNotAssigned,
        E::NotLeader { .. } => ErrorCode::NotLeader,
        E::StaleLeaderEpoch { .. } => ErrorCode::FencedLeaderEpoch,
        E::ReplicaGap { .. } => ErrorCode::OffsetOutOfRange,
        E::Io { .. } | E::Corrupt { .. } | E::Poisoned { .. } | E::Locked { .. } => ErrorCode::StorageError,
        _ => ErrorCode::Internal,
    }
}
