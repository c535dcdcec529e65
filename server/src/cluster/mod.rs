//! Replication over the network, per partition (Kafka's model):
//!
//! * The controller decides each partition's leader, leader epoch, replicas and ISR
//!   ([`PartitionRole`], Kafka's LeaderAndIsr); [`ReplicaManager::apply`] makes the local
//!   partition a leader or a follower accordingly.
//! * A **leader** answers replica fetches (`api::REPLICA_FETCH`): the fetch offset is the
//!   follower's log end, which feeds the engine's `LeaderState` (ISR, high watermark).
//!   Consumers read below the high watermark; `acks = all` completes when it passes the
//!   batch; with fewer than `min_insync_replicas` in sync, writes are refused.
//! * A **follower** runs a fetcher task (`fetcher.rs`): it asks the leader where its newest
//!   epoch ends (`api::EPOCH_END_OFFSET`), cuts a divergent suffix, then pulls batches and
//!   appends them with the leader's offsets.
//! * ISR changes go to the controller as [`IsrProposal`]s. An expansion is used at once
//!   (it only makes the high watermark more careful); a shrink takes effect only when the
//!   controller's recorded ISR comes back through `apply`.

mod fetcher;
pub mod link;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use rill_engine::replica::{EpochEntry, LeaderState, NodeId};
use rill_engine::{Partition, Role, Store};
use tokio::sync::mpsc;

use crate::error::{Error, ErrorCode, Result};

/// Replication settings of a node.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// This node's id (≥ 1).
    pub node_id: NodeId,
    /// Fewest in-sync replicas (the leader included) for a write to be accepted.
    pub min_insync_replicas: usize,
    /// A follower not caught up for this long leaves the ISR.
    pub replica_lag_time_max_ms: u64,
    /// Most bytes per replica fetch.
    pub replica_fetch_max_bytes: u32,
    /// How long a replica fetch waits at the leader for new data.
    pub replica_fetch_wait_ms: u32,
    /// How long an `acks = all` produce waits for the high watermark.
    pub ack_timeout_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node_id: 1,
            min_insync_replicas: 2,
            replica_lag_time_max_ms: 10_000,
            replica_fetch_max_bytes: 1 << 20,
            replica_fetch_wait_ms: 500,
            ack_timeout_ms: 30_000,
        }
    }
}

/// What the controller decided for one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionRole {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// The leader, if the partition is online.
    pub leader: Option<NodeId>,
    /// The leader's address (rill protocol), for followers to fetch from.
    pub leader_addr: Option<String>,
    /// The leader epoch.
    pub leader_epoch: u32,
    /// All replicas, the leader included.
    pub replicas: Vec<NodeId>,
    /// The in-sync replicas as the controller recorded them.
    pub isr: Vec<NodeId>,
}

/// A leader's request to the controller to record a new ISR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IsrProposal {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// The proposing leader's epoch (the controller refuses a stale one).
    pub leader_epoch: u32,
    /// The proposed ISR.
    pub isr: Vec<NodeId>,
}

/// A replica fetch, as a follower sends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaFetchRequest {
    /// The follower's node id.
    pub replica_id: NodeId,
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// The leader epoch the follower follows.
    pub leader_epoch: u32,
    /// The follower's log end.
    pub offset: u64,
    /// Most bytes to return.
    pub max_bytes: u32,
    /// How long to wait for data past `offset`.
    pub max_wait_ms: u32,
}

impl From<ReplicaFetchRequest> for crate::messages::Request {
    fn from(r: ReplicaFetchRequest) -> Self {
        crate::messages::Request::ReplicaFetch {
            replica_id: r.replica_id,
            topic: r.topic,
            partition: r.partition,
            leader_epoch: r.leader_epoch,
            offset: r.offset,
            max_bytes: r.max_bytes,
            max_wait_ms: r.max_wait_ms,
        }
    }
}

/// A led partition, as the ISR check sees it.
type Led = (String, u32, Arc<Partition>, Arc<Mutex<LeaderState>>, u32);

/// A replica fetch's answer.
#[derive(Clone, Debug)]
pub struct ReplicaData {
    /// The leader's high watermark.
    pub high_watermark: u64,
    /// The leader's log end.
    pub log_end: u64,
    /// Batches from the fetch offset on.
    pub records: Bytes,
}

struct Entry {
    role: PartitionRole,
    partition: Arc<Partition>,
    leader: Option<Arc<Mutex<LeaderState>>>,
    fetcher: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        if let Some(task) = self.fetcher.take() {
            task.abort();
        }
    }
}

/// The node's replicas: roles, leader states, fetchers.
pub struct ReplicaManager {
    config: ClusterConfig,
    store: Arc<Store>,
    entries: Mutex<HashMap<(String, u32), Entry>>,
    isr_tx: mpsc::UnboundedSender<IsrProposal>,
    isr_rx: Mutex<Option<mpsc::UnboundedReceiver<IsrProposal>>>,
    started: Instant,
}

impl std::fmt::Debug for ReplicaManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaManager").field("node_id", &self.config.node_id).finish_non_exhaustive()
    }
}

fn not_leader(topic: &str, partition: u32) -> Error {
    Error::Server {
        code: ErrorCode::NotLeader,
        message: format!("this node does not lead {topic}-{partition}"),
        retry_after_ms: None,
    }
}

impl ReplicaManager {
    /// A manager for `store`; call [`ReplicaManager::spawn_isr_checks`] to start the lag checks.
    pub fn new(store: Arc<Store>, config: ClusterConfig) -> Arc<ReplicaManager> {
        let (isr_tx, isr_rx) = mpsc::unbounded_channel();
        Arc::new(ReplicaManager {
            config,
            store,
            entries: Mutex::new(HashMap::new()),
            isr_tx,
            isr_rx: Mutex::new(Some(isr_rx)),
            started: Instant::now(),
        })
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.config.node_id
    }

    /// The settings.
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// The stream of ISR proposals, for the controller integration (taken once).
    pub fn take_isr_proposals(&self) -> Option<mpsc::UnboundedReceiver<IsrProposal>> {
        self.isr_rx.lock().take()
    }

    fn now_ms(&self) -> i64 {
        i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX)
    }

    /// Makes the local replica of `role.topic`/`role.partition` what the controller
    /// decided: leader (stamping the new epoch), follower (with a fetcher task), or a
    /// follower with nothing to fetch while the partition is offline. A role already in
    /// force is a no-op; the same epoch with another ISR updates the leader's ISR.
    pub async fn apply(self: &Arc<Self>, role: PartitionRole) -> Result<()> {
        let partition = self.store.partition(&role.topic, role.partition)?;
        let key = (role.topic.clone(), role.partition);
        let me = self.config.node_id;
        {
            let mut entries = self.entries.lock();
            if let Some(entry) = entries.get_mut(&key) {
                if entry.role == role {
                    return Ok(());
                }
                let same_leadership = entry.role.leader == role.leader
                    && entry.role.leader_epoch == role.leader_epoch
                    && entry.role.replicas == role.replicas;
                if same_leadership {
                    if let Some(state) = &entry.leader {
                        let mut state = state.lock();
                        let change = state.set_isr(&role.isr, partition.log_end_offset());
                        if change.high_watermark {
                            partition.advance_high_watermark(state.high_watermark());
                        }
                    }
                    entry.role = role;
                    return Ok(());
                }
            }
            // A new leadership: whatever ran for the old one stops first.
            entries.remove(&key);
        }
        let epoch = role.leader_epoch;
        let leading = role.leader == Some(me);
        let p = Arc::clone(&partition);
        let start =
            tokio::task::spawn_blocking(
                move || {
                    if leading {
                        p.become_leader(epoch)
                    } else {
                        p.become_follower(epoch)
                    }
                },
            )
            .await
            .map_err(|e| Error::io("change replica role", std::io::Error::other(e.to_string())))??;
        let mut entry = Entry { role: role.clone(), partition: Arc::clone(&partition), leader: None, fetcher: None };
        if leading {
            let state = LeaderState::new(
                me,
                EpochEntry { epoch, start_offset: start },
                &role.replicas,
                &role.isr,
                partition.high_watermark(),
                self.config.replica_lag_time_max_ms,
                self.now_ms(),
            );
            entry.leader = Some(Arc::new(Mutex::new(state)));
        } else if role.leader.is_some() && role.replicas.contains(&me) {
            entry.fetcher = Some(tokio::spawn(fetcher::run(Arc::clone(self), role.clone(), Arc::clone(&partition))));
        }
        self.entries.lock().insert(key, entry);
        if leading {
            self.on_local_append(&role.topic, role.partition);
        }
        tracing::info!(
            topic = %role.topic, partition = role.partition, leader = ?role.leader, epoch,
            role = if leading { "leader" } else { "follower" }, "replica role applied"
        );
        Ok(())
    }

    /// The role in force for a partition, if the controller assigned one.
    pub fn role(&self, topic: &str, partition: u32) -> Option<PartitionRole> {
        self.entries.lock().get(&(topic.to_string(), partition)).map(|e| e.role.clone())
    }

    fn leader_state(&self, topic: &str, partition: u32) -> Result<(Arc<Partition>, Arc<Mutex<LeaderState>>, u32)> {
        let entries = self.entries.lock();
        let entry = entries.get(&(topic.to_string(), partition)).ok_or_else(|| not_leader(topic, partition))?;
        let state = entry.leader.as_ref().ok_or_else(|| not_leader(topic, partition))?;
        Ok((Arc::clone(&entry.partition), Arc::clone(state), entry.role.leader_epoch))
    }

    /// Before a client append: this node must lead the partition with enough replicas in
    /// sync. Returns the leader epoch the append will carry.
    pub fn check_produce(&self, topic: &str, partition: u32) -> Result<u32> {
        let (_, state, epoch) = self.leader_state(topic, partition)?;
        let state = state.lock();
        if !state.has_min_insync(self.config.min_insync_replicas) {
            return Err(Error::Server {
                code: ErrorCode::NotEnoughReplicas,
                message: format!(
                    "{topic}-{partition} has {} in-sync replicas, {} required",
                    state.isr().len(),
                    self.config.min_insync_replicas
                ),
                retry_after_ms: None,
            });
        }
        Ok(epoch)
    }

    /// The leader's own log end moved: with no follower in the ISR that alone moves the
    /// high watermark.
    pub fn on_local_append(&self, topic: &str, partition: u32) {
        if let Ok((p, state, _)) = self.leader_state(topic, partition) {
            let mut state = state.lock();
            if state.on_leader_end(p.log_end_offset()) {
                p.advance_high_watermark(state.high_watermark());
            }
        }
    }

    /// `acks = all`: waits until the high watermark passes `last_offset` while this node
    /// still leads in `epoch` with enough replicas in sync.
    pub async fn await_replicated(&self, topic: &str, partition: u32, epoch: u32, last_offset: u64) -> Result<()> {
        self.on_local_append(topic, partition);
        let p = self.store.partition(topic, partition)?;
        let timeout = Duration::from_millis(self.config.ack_timeout_ms);
        if tokio::time::timeout(timeout, p.wait_for_async(last_offset)).await.is_err() {
            return Err(Error::Timeout {
                what: "in-sync replicas to acknowledge",
                timeout_ms: self.config.ack_timeout_ms,
            });
        }
        // The high watermark passed under this leadership, or the replica was demoted and
        // the offset may now hold another record: only the former is an acknowledgement.
        if p.role() != (Role::Leader, epoch) || p.high_watermark() <= last_offset {
            return Err(not_leader(topic, partition));
        }
        // The high watermark may have passed because the ISR shrank below the minimum
        // (Kafka's NotEnoughReplicasAfterAppend): written, replicated too little, not acked.
        self.check_produce(topic, partition)?;
        Ok(())
    }

    /// The leader's side of a replica fetch.
    pub async fn replica_fetch(&self, request: ReplicaFetchRequest) -> Result<ReplicaData> {
        let ReplicaFetchRequest { replica_id, ref topic, partition, leader_epoch, offset, max_bytes, max_wait_ms } =
            request;
        let (p, state, epoch) = self.leader_state(topic, partition)?;
        if leader_epoch != epoch {
            return Err(Error::Server {
                code: if leader_epoch < epoch { ErrorCode::FencedLeaderEpoch } else { ErrorCode::NotLeader },
                message: format!("{topic}-{partition} is in leader epoch {epoch}, the fetch names {leader_epoch}"),
                retry_after_ms: None,
            });
        }
        if offset > p.log_end_offset() {
            // The follower holds more than this leader: it must truncate first, and its
            // offset says nothing about what it shares with this log.
            return Err(Error::Engine(rill_engine::Error::OffsetOutOfRange {
                requested: offset,
                log_start: p.log_start_offset(),
                log_end: p.log_end_offset(),
            }));
        }
        let isr_change = {
            let mut state = state.lock();
            let change = state.on_fetch(replica_id, offset, p.log_end_offset(), self.now_ms()).ok_or_else(|| {
                Error::malformed(format!("node {replica_id} is not a replica of {topic}-{partition}"))
            })?;
            if change.high_watermark {
                p.advance_high_watermark(state.high_watermark());
            }
            change.isr.then(|| state.isr())
        };
        if let Some(isr) = isr_change {
            self.propose_isr(topic, partition, epoch, isr);
        }
        if offset >= p.log_end_offset() && max_wait_ms > 0 {
            let wait = Duration::from_millis(u64::from(max_wait_ms));
            drop(tokio::time::timeout(wait, p.wait_for_log_async(offset)).await);
        }
        let log_end = p.log_end_offset();
        let records = if offset < log_end { p.read_replica(offset, u64::from(max_bytes))? } else { Bytes::new() };
        let high_watermark = state.lock().high_watermark();
        Ok(ReplicaData { high_watermark, log_end, records })
    }

    /// Where `epoch` ends on this node's log (answered by the leader only).
    pub fn epoch_end_offset(&self, topic: &str, partition: u32, epoch: u32) -> Result<(u32, u64)> {
        let (p, _, _) = self.leader_state(topic, partition)?;
        Ok(p.end_offset_for_epoch(epoch))
    }

    fn propose_isr(&self, topic: &str, partition: u32, leader_epoch: u32, isr: Vec<NodeId>) {
        // The receiver is gone only when nobody plays controller; the leader's own state
        // already holds an expansion, and a shrink simply waits.
        drop(self.isr_tx.send(IsrProposal { topic: topic.to_string(), partition, leader_epoch, isr }));
    }

    /// Proposes ISR shrinks for lagging followers of every led partition, every quarter of
    /// the lag limit, until the returned task is aborted.
    pub fn spawn_isr_checks(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let manager = Arc::clone(self);
        let period = Duration::from_millis((self.config.replica_lag_time_max_ms / 4).max(10));
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            loop {
                ticks.tick().await;
                let led: Vec<Led> = manager
                    .entries
                    .lock()
                    .iter()
                    .filter_map(|((t, p), e)| {
                        e.leader
                            .as_ref()
                            .map(|s| (t.clone(), *p, Arc::clone(&e.partition), Arc::clone(s), e.role.leader_epoch))
                    })
                    .collect();
                for (topic, partition, p, state, epoch) in led {
                    let proposal = {
                        let state = state.lock();
                        let lagging = state.lagging(p.log_end_offset(), manager.now_ms());
                        (!lagging.is_empty())
                            .then(|| state.isr().into_iter().filter(|r| !lagging.contains(r)).collect::<Vec<_>>())
                    };
                    if let Some(isr) = proposal {
                        manager.propose_isr(&topic, partition, epoch, isr);
                    }
                }
            }
        })
    }

    /// Drops the roles of every partition of `topic` (deleted from the cluster); their
    /// fetchers stop.
    pub fn forget_topic(&self, topic: &str) {
        self.entries.lock().retain(|(t, _), _| t != topic);
    }

    /// Stops every fetcher and waits until each has ended (shutdown: afterwards no task of
    /// this manager touches the store).
    pub async fn stop(&self) {
        let entries: Vec<Entry> = self.entries.lock().drain().map(|(_, entry)| entry).collect();
        let fetchers: Vec<_> = entries.into_iter().filter_map(|mut entry| entry.fetcher.take()).collect();
        for task in &fetchers {
            task.abort();
        }
        for task in fetchers {
            // Aborted or finished: either way it no longer holds the partition.
            let _ended = task.await;
        }
    }
}
