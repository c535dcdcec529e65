//! Byte layouts: record batches, varints, topic metadata. Pure encode/decode and checksums;
//! this module never does I/O. The normative description is `docs/format.md`.

pub mod batch;
pub mod envelope;
pub mod topic_meta;
pub mod varint;

pub use batch::{
    Batch, BatchBuilder, BatchHeader, BatchIter, Compression, Header, ProducerFields, Record, StoredRecord,
};
