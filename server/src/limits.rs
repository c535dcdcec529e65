//! Named limits of the server. Each is the default of a configurable setting or a hard
//! bound of the protocol, with the reason for its value.

use rill_engine::limits::BATCH_SIZE_BYTES_MAX;

/// Largest frame the server or client accepts (length prefix excluded): one maximum batch
/// plus room for the request header and topic name.
pub const FRAME_SIZE_BYTES_MAX: u32 = BATCH_SIZE_BYTES_MAX + 64 * 1024;

/// Default cap on concurrent connections.
pub const CONNECTIONS_MAX: usize = 1024;

/// Default cap on request bytes being processed per connection; beyond it produce requests
/// are answered `Throttled`.
pub const CONNECTION_INFLIGHT_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// Default cap on request bytes being processed by the whole server.
pub const SERVER_INFLIGHT_BYTES_MAX: u64 = 512 * 1024 * 1024;

/// Requests a connection may have outstanding before the server stops reading from it
/// (responses must be written in order, so this bounds buffered responses too).
pub const CONNECTION_INFLIGHT_REQUESTS_MAX: usize = 1024;

/// Longest wait a fetch may ask for.
pub const FETCH_WAIT_MS_MAX: u32 = 60_000;

/// Largest answer a fetch returns, whatever it asks for.
pub const FETCH_SIZE_BYTES_MAX: u32 = 64 * 1024 * 1024;

/// Longest client id, string field or topic list a request may carry.
pub const STRING_LEN_MAX: usize = 4096;

/// Most topics a metadata request may name.
pub const METADATA_TOPICS_MAX: u32 = 10_000;

/// How long a throttled producer is told to wait before retrying.
pub const THROTTLE_RETRY_AFTER_MS: u32 = 10;

/// Largest frame of the controller protocol (length prefix excluded): Raft append-entries
/// batches of small commands and snapshot chunks of [`CONTROLLER_SNAPSHOT_CHUNK_SIZE_BYTES`],
/// with room for their JSON envelope.
pub const CONTROLLER_FRAME_SIZE_BYTES_MAX: u32 = 16 * 1024 * 1024;

/// Size of the chunks a controller snapshot is sent in.
pub const CONTROLLER_SNAPSHOT_CHUNK_SIZE_BYTES: u64 = 1024 * 1024;

/// Largest controller log record or state file: one command, or the whole metadata. Bounds
/// the allocation made on a length read back from disk.
pub const CONTROLLER_RECORD_SIZE_BYTES_MAX: u32 = 64 * 1024 * 1024;

/// Most partitions a topic may be created with through the controller (keeps one command,
/// and so one log record, small).
pub const CONTROLLER_PARTITIONS_MAX: u32 = 10_000;

/// Highest replication factor the controller assigns.
pub const CONTROLLER_REPLICATION_FACTOR_MAX: u32 = 16;

/// How long `Controller::propose` keeps looking for a Raft leader (elections, forwarding
/// retries) before giving up.
pub const CONTROLLER_PROPOSE_TIMEOUT_MS: u64 = 10_000;

/// How often a controller sends its own node's heartbeat.
pub const CONTROLLER_HEARTBEAT_INTERVAL_MS: u64 = 500;

const _: () = assert!(FRAME_SIZE_BYTES_MAX > BATCH_SIZE_BYTES_MAX);
const _: () = assert!(FETCH_SIZE_BYTES_MAX as u64 + 1024 <= u32::MAX as u64);
const _: () = assert!(CONNECTION_INFLIGHT_BYTES_MAX >= FRAME_SIZE_BYTES_MAX as u64);
const _: () = assert!(SERVER_INFLIGHT_BYTES_MAX >= CONNECTION_INFLIGHT_BYTES_MAX);
const _: () = assert!(CONTROLLER_SNAPSHOT_CHUNK_SIZE_BYTES * 2 <= CONTROLLER_FRAME_SIZE_BYTES_MAX as u64);
const _: () = assert!(CONTROLLER_RECORD_SIZE_BYTES_MAX >= CONTROLLER_FRAME_SIZE_BYTES_MAX);
const _: () = assert!(
    CONTROLLER_PARTITIONS_MAX as u64 * CONTROLLER_REPLICATION_FACTOR_MAX as u64 * 64
        < CONTROLLER_RECORD_SIZE_BYTES_MAX as u64
);
