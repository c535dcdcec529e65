//! Idempotent producers: store-wide id issue and fencing (`registry`), per-partition
//! sequence state (`state`) and its snapshot file (`snapshot`).
//!
//! It owns: deciding whether a producer's batch is new, a retry, or an error.
//! It must never: write the log (the partition does, after asking).

pub mod registry;
pub mod snapshot;
pub mod state;

pub use registry::{ProducerIdentity, ProducerRegistry};
pub use state::{BatchMetadata, ProducerEntry, ProducerStates, SequenceCheck};
