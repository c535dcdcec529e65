//! Consumer positions: committed offsets per (group, topic, partition), kept in one
//! checkpoint file that is replaced atomically on every commit (`offsets.rs`), and priority
//! cursors over priority topics (`priority/`: lanes, leases, retries, dead letters), and
//! consumer-group membership (`group.rs`: members, generations, partition assignment).
//!
//! It owns: the committed-offset map and its file; group membership (in memory); priority
//! cursors and their files.
//! It must never: write partition data (priority cursors only append dead letters and replays).

pub mod group;
pub mod offsets;
pub mod priority;

pub use group::{Assignment, GroupCoordinator};
pub use offsets::ConsumerOffsets;
pub use priority::{
    AckTicket, BackoffConfig, DeadLetter, Delivery, LaneStats, PriorityCursor, PriorityCursorConfig,
    PriorityCursorStats, PriorityTopic,
};
