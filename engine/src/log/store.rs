//! The store: a directory of topics, each with its partitions.
//!
//! Layout (see `docs/format.md`, "Directory layout"):
//! `<dir>/.lock`, `<dir>/topics/<topic>/topic.meta`, `<dir>/topics/<topic>/<partition>/`.
//!
//! It owns: the directory lock, topic metadata, topic creation and deletion, the
//! retention thread, clean shutdown of every partition.

use std::collections::BTreeMap;
use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex, RwLock};

use super::completion::AppendHandle;
use super::partition::{Partition, PartitionContext};
use super::partitioner::partition_for_key;
use crate::config::{StoreConfig, TopicConfig};
use crate::cursor::priority::PriorityCursorRegistry;
use crate::cursor::{Assignment, ConsumerOffsets, GroupCoordinator};
use crate::error::{Error, Result};
use crate::format::topic_meta;
use crate::format::{Compression, Record};
use crate::limits::TOPIC_NAME_LEN_MAX;
use crate::producer::{ProducerIdentity, ProducerRegistry};

const TOPICS_DIR: &str = "topics";
const TOPIC_META_FILE: &str = "topic.meta";
const DELETED_PREFIX: &str = ".deleted-";

/// A topic: a name, a configuration and its partitions.
#[derive(Debug)]
pub struct Topic {
    name: String,
    config: TopicConfig,
    partitions: Vec<Arc<Partition>>,
    round_robin: AtomicU64,
}

impl Topic {
    /// Topic name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Topic configuration.
    pub fn config(&self) -> &TopicConfig {
        &self.config
    }

    /// All partitions, by number.
    pub fn partitions(&self) -> &[Arc<Partition>] {
        &self.partitions
    }

    /// Partition `id`.
    pub fn partition(&self, id: u32) -> Result<&Arc<Partition>> {
        self.partitions.get(id as usize).ok_or_else(|| Error::PartitionNotFound {
            topic: self.name.clone(),
            partition: id,
            partitions: self.config.partitions,
        })
    }

    /// The partition records with `key` go to (Kafka's murmur2 partitioner).
    pub fn partition_for_key(&self, key: &[u8]) -> u32 {
        partition_for_key(key, self.config.partitions)
    }

    /// Appends `records` as one batch: to the partition of `key` if given, otherwise to
    /// the next partition in round-robin order. Returns the partition and the handle.
    pub fn append(&self, key: Option<&[u8]>, records: &[Record]) -> Result<(u32, AppendHandle)> {
        let id = match key {
            Some(key) => self.partition_for_key(key),
            None => (self.round_robin.fetch_add(1, Ordering::Relaxed) % u64::from(self.config.partitions)) as u32,
        };
        let handle = self.partition(id)?.append_records(records, Compression::None)?;
        Ok((id, handle))
    }

    fn close(&self, clean: bool) -> Result<()> {
        let mut first_error = None;
        for partition in &self.partitions {
            if let Err(e) = partition.close(clean) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[derive(Debug)]
struct StoreInner {
    dir: PathBuf,
    config: StoreConfig,
    context: PartitionContext,
    offsets: ConsumerOffsets,
    groups: GroupCoordinator,
    priority_cursors: PriorityCursorRegistry,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    /// Held for the store's lifetime: keeps other processes from opening the directory.
    _lock: File,
}

#[derive(Debug, Default)]
struct Stop {
    stopped: Mutex<bool>,
    signal: Condvar,
}

/// An open store directory.
///
/// Call [`Store::close`] for a clean shutdown: the next open then skips recovery. Dropping
/// a store without closing it is safe (nothing acknowledged is lost) but makes the next
/// open scan the last segment of every partition.
#[derive(Debug)]
pub struct Store {
    inner: Arc<StoreInner>,
    stop: Arc<Stop>,
    maintenance: Option<JoinHandle<()>>,
}

impl Store {
    /// Opens or creates a store in `dir`, recovering every partition as needed.
    pub fn open(dir: impl AsRef<Path>, config: StoreConfig) -> Result<Store> {
        let dir = dir.as_ref().to_path_buf();
        let storage = Arc::clone(&config.storage);
        storage.create_dir_all(&dir.join(TOPICS_DIR))?;
        let lock = lock_dir(&dir)?;
        let registry = Arc::new(ProducerRegistry::open(Arc::clone(&storage), &dir, config.node_id)?);
        let context = PartitionContext {
            storage,
            clock: Arc::clone(&config.clock),
            registry,
            producer_id_expiration_ms: config.producer_id_expiration_ms,
        };
        let offsets = ConsumerOffsets::open(Arc::clone(&context.storage), &dir)?;
        let topics = load_topics(&context, &dir)?;
        let groups = GroupCoordinator::new(Arc::clone(&config.clock));
        let inner = Arc::new(StoreInner {
            dir,
            config,
            context,
            offsets,
            groups,
            priority_cursors: PriorityCursorRegistry::default(),
            topics: RwLock::new(topics),
            _lock: lock,
        });
        let stop = Arc::new(Stop::default());
        let maintenance = match inner.config.retention_check_interval_ms {
            None => None,
            Some(interval_ms) => Some(spawn_maintenance(Arc::clone(&inner), Arc::clone(&stop), interval_ms)?),
        };
        Ok(Store { inner, stop, maintenance })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Creates a topic.
    pub fn create_topic(&self, name: &str, config: TopicConfig) -> Result<Arc<Topic>> {
        validate_topic_name(name)?;
        config.validate()?;
        let mut topics = self.inner.topics.write();
        if topics.contains_key(name) {
            return Err(Error::TopicExists { topic: name.to_string() });
        }
        let storage = &*self.inner.config.storage;
        let topic_dir = self.inner.dir.join(TOPICS_DIR).join(name);
        if storage.exists(&topic_dir) {
            // Leftover of a creation that crashed before its metadata was durable.
            storage.remove_dir_all(&topic_dir)?;
        }
        storage.create_dir_all(&topic_dir)?;
        crate::io::write_atomically(storage, &topic_dir.join(TOPIC_META_FILE), &topic_meta::encode(&config))?;
        storage.sync_dir(&self.inner.dir.join(TOPICS_DIR))?;
        let topic = Arc::new(open_topic(&self.inner.context, &topic_dir, name, config)?);
        topics.insert(name.to_string(), Arc::clone(&topic));
        Ok(topic)
    }

    /// Deletes a topic and all its data.
    pub fn delete_topic(&self, name: &str) -> Result<()> {
        let topic =
            self.inner.topics.write().remove(name).ok_or_else(|| Error::TopicNotFound { topic: name.to_string() })?;
        topic.close(false)?;
        let storage = &*self.inner.config.storage;
        let topics_dir = self.inner.dir.join(TOPICS_DIR);
        let doomed = topics_dir.join(format!("{DELETED_PREFIX}{name}"));
        if storage.exists(&doomed) {
            storage.remove_dir_all(&doomed)?;
        }
        storage.rename(&topics_dir.join(name), &doomed)?;
        storage.sync_dir(&topics_dir)?;
        storage.remove_dir_all(&doomed)?;
        storage.sync_dir(&topics_dir)
    }

    /// Names of all topics, sorted.
    pub fn topics(&self) -> Vec<String> {
        self.inner.topics.read().keys().cloned().collect()
    }

    /// The named topic.
    pub fn topic(&self, name: &str) -> Result<Arc<Topic>> {
        self.inner.topics.read().get(name).cloned().ok_or_else(|| Error::TopicNotFound { topic: name.to_string() })
    }

    /// Partition `id` of the named topic.
    pub fn partition(&self, name: &str, id: u32) -> Result<Arc<Partition>> {
        self.topic(name)?.partition(id).cloned()
    }

    /// Issues an idempotent producer identity. With a transactional id, re-initialising
    /// returns the same producer id with a higher epoch and fences the previous instance.
    pub fn init_producer(&self, transactional_id: Option<&str>) -> Result<ProducerIdentity> {
        self.inner.context.registry.init_producer(transactional_id)
    }

    /// Checks a producer identity as an append would: `UnknownProducerId` for an id this
    /// store never issued, `ProducerFenced` for an epoch older than the current epoch of its
    /// transactional id.
    pub fn check_producer(&self, producer_id: i64, producer_epoch: i16) -> Result<()> {
        self.inner.context.registry.check(producer_id, producer_epoch, -1)
    }

    /// Committed consumer offsets.
    pub fn consumer_offsets(&self) -> &ConsumerOffsets {
        &self.inner.offsets
    }

    /// Consumer-group membership ([`GroupCoordinator`]; the methods below are the usual way in).
    pub fn groups(&self) -> &GroupCoordinator {
        &self.inner.groups
    }

    /// Joins consumer group `group` for `topics` (which must exist); see
    /// [`GroupCoordinator::join`]. The answer names the member's partitions in the new
    /// generation.
    pub fn join_group(
        &self,
        group: &str,
        member_id: Option<&str>,
        topics: &[&str],
        session_timeout_ms: u64,
    ) -> Result<Assignment> {
        let counted = topics
            .iter()
            .map(|name| {
                let count = u32::try_from(self.topic(name)?.partitions().len()).expect("partition counts are u32");
                Ok((name.to_string(), count))
            })
            .collect::<Result<Vec<_>>>()?;
        self.inner.groups.join(group, member_id, &counted, session_timeout_ms)
    }

    /// Renews a member's session; answers the current generation and its partitions.
    pub fn group_heartbeat(&self, group: &str, member_id: &str) -> Result<Assignment> {
        self.inner.groups.heartbeat(group, member_id)
    }

    /// Removes a member from its group now.
    pub fn leave_group(&self, group: &str, member_id: &str) -> Result<()> {
        self.inner.groups.leave(group, member_id)
    }

    /// Commits `offset` for a partition as a member of `group`: refused unless the member
    /// is current, `generation` is the group's, and the partition is assigned to it; durable
    /// when it returns.
    pub fn commit_offset_as_member(
        &self,
        group: &str,
        member_id: &str,
        generation: u64,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<()> {
        self.inner.groups.check_commit(group, member_id, generation, topic, partition)?;
        self.inner.offsets.commit(group, topic, partition, offset)
    }

    /// The store's configuration (storage and clock for components above the log).
    pub(crate) fn store_config(&self) -> &StoreConfig {
        &self.inner.config
    }

    /// The open priority cursors.
    pub(crate) fn priority_cursor_registry(&self) -> &PriorityCursorRegistry {
        &self.inner.priority_cursors
    }

    /// Applies retention to every partition now; returns the number of segments removed.
    pub fn enforce_retention(&self) -> Result<usize> {
        self.inner.enforce_retention()
    }

    /// Clean shutdown: completes pending appends, syncs, trims indices and writes each
    /// partition's clean-shutdown marker.
    pub fn close(self) -> Result<()> {
        self.shutdown()
    }

    /// [`Store::close`] through a shared reference (a server holding the store in an `Arc`).
    /// Afterwards every append fails with [`Error::Closed`]. Idempotent.
    pub fn shutdown(&self) -> Result<()> {
        self.signal_maintenance_stop();
        let topics: Vec<_> = self.inner.topics.read().values().cloned().collect();
        let mut first_error = None;
        for topic in topics {
            if let Err(e) = topic.close(true) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn signal_maintenance_stop(&self) {
        *self.stop.stopped.lock() = true;
        self.stop.signal.notify_all();
    }

    fn stop_maintenance(&mut self) {
        self.signal_maintenance_stop();
        if let Some(handle) = self.maintenance.take() {
            // The maintenance thread only applies retention; a panic there loses nothing.
            drop(handle.join());
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.stop_maintenance();
        for topic in self.inner.topics.read().values() {
            // Unclean close: completes queued appends and stops the flushers. Errors here
            // have already been reported to the appends they concern.
            drop(topic.close(false));
        }
    }
}

impl StoreInner {
    fn enforce_retention(&self) -> Result<usize> {
        let topics: Vec<_> = self.topics.read().values().cloned().collect();
        let mut removed = 0;
        for topic in topics {
            for partition in topic.partitions() {
                removed += partition.enforce_retention()?;
            }
        }
        Ok(removed)
    }
}

fn spawn_maintenance(inner: Arc<StoreInner>, stop: Arc<Stop>, interval_ms: u64) -> Result<JoinHandle<()>> {
    let dir = inner.dir.clone();
    std::thread::Builder::new()
        .name("rill-retention".into())
        .spawn(move || loop {
            {
                let mut stopped = stop.stopped.lock();
                if !*stopped {
                    stop.signal.wait_for(&mut stopped, Duration::from_millis(interval_ms));
                }
                if *stopped {
                    return;
                }
            }
            // A failure here (e.g. a file that cannot be removed) is retried next round.
            drop(inner.enforce_retention());
        })
        .map_err(|e| Error::io("spawn retention thread", dir, e))
}

fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io("open lock file", &path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(Error::Locked { path }),
        Err(TryLockError::Error(e)) => Err(Error::io("lock", &path, e)),
    }
}

fn load_topics(context: &PartitionContext, dir: &Path) -> Result<BTreeMap<String, Arc<Topic>>> {
    let storage = &*context.storage;
    let topics_dir = dir.join(TOPICS_DIR);
    let mut topics = BTreeMap::new();
    for path in storage.list_dir(&topics_dir)? {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        if name.starts_with(DELETED_PREFIX) {
            storage.remove_dir_all(&path)?;
            continue;
        }
        let meta_path = path.join(TOPIC_META_FILE);
        if !storage.exists(&meta_path) {
            // Creation crashed before the metadata was durable: the topic never existed.
            storage.remove_dir_all(&path)?;
            continue;
        }
        let buf = crate::io::read_bounded(storage, &meta_path, topic_meta::TOPIC_META_SIZE as u64)?;
        let topic_config = topic_meta::decode(&buf).map_err(|e| Error::Corrupt {
            path: meta_path.clone(),
            pos: 0,
            reason: e.to_string(),
        })?;
        let topic = open_topic(context, &path, &name, topic_config)?;
        topics.insert(name, Arc::new(topic));
    }
    Ok(topics)
}

fn open_topic(context: &PartitionContext, topic_dir: &Path, name: &str, topic_config: TopicConfig) -> Result<Topic> {
    let mut partitions = Vec::with_capacity(topic_config.partitions as usize);
    for id in 0..topic_config.partitions {
        let dir = topic_dir.join(id.to_string());
        let partition = Partition::open(context, &dir, name, id, topic_config.clone())?;
        partitions.push(partition);
    }
    Ok(Topic { name: name.to_string(), config: topic_config, partitions, round_robin: AtomicU64::new(0) })
}

/// Checks a topic name: 1 to 249 characters of `[A-Za-z0-9._-]`, not starting with `.`.
pub fn validate_topic_name(name: &str) -> Result<()> {
    let invalid = |reason| Err(Error::InvalidTopicName { name: name.to_string(), reason });
    if name.is_empty() {
        return invalid("empty");
    }
    if name.len() > TOPIC_NAME_LEN_MAX {
        return invalid("longer than 249 characters");
    }
    if name.starts_with('.') {
        return invalid("names starting with '.' are reserved");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-') {
        return invalid("only ASCII letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}
