//! # rill-engine
//!
//! A durable, segmented, crash-safe append-only log for event streams, embedded as a
//! library: open a directory, create topics, append batches of records and read them back
//! by offset or by time. See `docs/architecture.md` for the map of the code and
//! `docs/format.md` for every byte on disk.
//!
//! ```
//! use rill_engine::{Record, Store, StoreConfig, TopicConfig};
//!
//! let dir = tempfile::tempdir()?;
//! let store = Store::open(dir.path(), StoreConfig::default())?;
//! store.create_topic("orders", TopicConfig { partitions: 2, ..TopicConfig::default() })?;
//! let orders = store.topic("orders")?;
//! let (partition, handle) = orders.append(Some(b"customer-7"), &[Record::keyed("customer-7", "paid")])?;
//! let appended = handle.wait()?; // durable: fsync = always by default
//! let records = orders.partition(partition)?.read_records(appended.base_offset, 1 << 20)?;
//! assert_eq!(records[0].value.as_deref(), Some(&b"paid"[..]));
//! store.close()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]
#![deny(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod config;
pub mod cursor;
pub mod error;
pub mod format;
pub mod index;
pub mod io;
pub mod limits;
pub mod log;
pub mod metrics;
pub mod producer;
pub mod replica;
pub mod segment;
pub(crate) mod sync;

pub use config::{Clock, FsyncPolicy, ManualClock, StoreConfig, SystemClock, TopicConfig};
pub use cursor::{
    AckTicket, Assignment, BackoffConfig, DeadLetter, Delivery, GroupCoordinator, LaneStats, PriorityCursor,
    PriorityCursorConfig, PriorityCursorStats, PriorityTopic,
};
pub use error::{Error, Result};
pub use format::{Compression, Header, ProducerFields, Record, StoredRecord};
pub use log::completion::{AppendHandle, AppendInfo};
pub use log::partition::{Partition, RecoveryReport, Role};
pub use log::store::{Store, Topic};
pub use producer::ProducerIdentity;
