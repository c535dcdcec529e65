//! Consumer positions. For now: committed offsets per (group, topic, partition), kept in
//! one checkpoint file that is replaced atomically on every commit.
//!
//! It owns: the committed-offset map and its file.
//! It must never: read or move a partition's data.

pub mod offsets;

pub use offsets::ConsumerOffsets;
