//! The log layer: partitions made of segments, their write path (offsets, rolling, fsync
//! policy, group commit), recovery, retention and reads; topics and the store on top.

pub mod completion;
pub mod group_commit;
pub mod partition;
pub mod partitioner;
pub mod store;
pub mod visibility;
