//! Replication, the engine's part: the leader-epoch cache of a partition (`epochs.rs`) and
//! the leader's view of its followers, ISR and high watermark (`leader.rs`). The partition
//! itself stamps epochs on leader appends, takes replica appends that keep the leader's
//! offsets, and cuts a divergent suffix (`log/partition.rs`). The network side (replica
//! fetch, the controller) lives in the server.

pub mod epochs;
pub mod leader;

pub use epochs::{EpochCache, EpochEntry};
pub use leader::{Change, FollowerProgress, LeaderState, NodeId};
