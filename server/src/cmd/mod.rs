//! Request execution: one function per request kind, each a thin call into the engine.
//! Calls that may `fsync` (topic creation and deletion, offset commits, producer-id
//! reservation) run on the blocking pool; appends await the engine's handle, so no tokio
//! worker ever waits on a disk sync.

mod admin;
mod fetch;
mod groups;
mod offsets;
pub mod priority;
pub mod produce;
mod topics;

pub(crate) use topics::{create_with as create_topic_with, delete as delete_topic, topic_config};

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use rill_engine::Store;
use tokio::sync::watch;

use crate::config::ServerConfig;
use crate::error::{Error, Result};
use crate::messages::{Request, Response};
use crate::metrics::Metrics;

/// What every request handler can reach.
#[derive(Debug)]
pub struct Shared {
    /// The engine.
    pub store: Arc<Store>,
    /// Configuration in force.
    pub config: ServerConfig,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Request bytes in flight in the whole server.
    pub inflight_bytes: AtomicU64,
    /// Turns `true` when shutdown begins (long polls end early).
    pub shutdown: watch::Receiver<bool>,
    /// Priority cursors opened by `PriorityOpen` or polls, by (topic, cursor): kept open so
    /// that their leases live from one request to the next.
    pub priority_cursors: priority::OpenCursors,
    /// Replication, when this node is part of a cluster.
    pub cluster: Option<Arc<crate::cluster::ReplicaManager>>,
    /// The cluster controller, when this node is part of a cluster: topics are created and
    /// deleted through it.
    pub controller: Option<Arc<crate::controller::Controller>>,
}

/// The cluster's nodes and partition leaders as this node's controller knows them (empty
/// lists on a single node).
fn leaders(shared: &Shared) -> Response {
    let Some(controller) = &shared.controller else {
        return Response::Leaders { nodes: Vec::new(), partitions: Vec::new() };
    };
    let metadata = controller.metadata();
    let metadata = metadata.borrow();
    let nodes = metadata.nodes.iter().map(|(id, node)| (*id, node.addr.clone())).collect();
    let mut partitions = Vec::new();
    for (topic, assignment) in &metadata.topics {
        for (index, p) in assignment.partitions.iter().enumerate() {
            partitions.push(crate::messages::PartitionLeader {
                topic: topic.clone(),
                partition: u32::try_from(index).expect("partition counts are u32"),
                leader: p.leader,
                leader_epoch: p.leader_epoch,
            });
        }
    }
    Response::Leaders { nodes, partitions }
}

/// In a cluster, reads are served by any replica of the partition (below its high
/// watermark); a node that holds none answers `NotLeader` so the client looks up the leader.
fn check_replica(shared: &Shared, topic: &str, partition: u32) -> Result<()> {
    match &shared.cluster {
        Some(cluster) if cluster.role(topic, partition).is_none() => Err(crate::Error::Server {
            code: crate::ErrorCode::NotLeader,
            message: format!("this node holds no replica of {topic}-{partition}"),
            retry_after_ms: None,
        }),
        _ => Ok(()),
    }
}

/// The replica manager, or the answer a single node gives to replication requests.
fn cluster(shared: &Shared) -> Result<&Arc<crate::cluster::ReplicaManager>> {
    shared.cluster.as_ref().ok_or_else(|| crate::Error::Server {
        code: crate::ErrorCode::NotLeader,
        message: "this node is not part of a cluster".into(),
        retry_after_ms: None,
    })
}

/// Executes one request. (The connection appends produce batches itself, in order, via
/// [`produce::start`]; this path serves callers that do not pipeline.)
pub async fn execute(shared: &Arc<Shared>, request: Request) -> Result<Response> {
    match request {
        Request::ApiVersions => Ok(admin::api_versions()),
        Request::Stats => Ok(Response::Stats(shared.metrics.stats())),
        Request::InitProducerId { transactional_id } => admin::init_producer_id(shared, transactional_id).await,
        Request::Metadata { topics } => topics::metadata(shared, &topics),
        Request::ListTopics => Ok(Response::ListTopics(shared.store.topics())),
        Request::CreateTopic { name, settings } => topics::create(shared, name, settings).await,
        Request::DeleteTopic { name } => topics::delete(shared, name).await,
        Request::Produce { topic, partition, batch, acks } => {
            let pending = produce::start(shared, topic, partition, acks, batch)?;
            produce::finish(shared, pending).await
        }
        Request::Fetch { topic, partition, offset, max_bytes, max_wait_ms } => {
            check_replica(shared, &topic, partition)?;
            fetch::fetch(shared, &topic, partition, offset, max_bytes, max_wait_ms).await
        }
        Request::ReplicaFetch { replica_id, topic, partition, leader_epoch, offset, max_bytes, max_wait_ms } => {
            let fetch = crate::cluster::ReplicaFetchRequest {
                replica_id,
                topic,
                partition,
                leader_epoch,
                offset,
                max_bytes,
                max_wait_ms,
            };
            let data = cluster(shared)?.replica_fetch(fetch).await?;
            Ok(Response::ReplicaFetch {
                high_watermark: data.high_watermark,
                log_end: data.log_end,
                records: data.records,
            })
        }
        Request::Leaders => Ok(leaders(shared)),
        Request::EpochEndOffset { topic, partition, epoch } => {
            let (epoch, end_offset) = cluster(shared)?.epoch_end_offset(&topic, partition, epoch)?;
            Ok(Response::EpochEndOffset { epoch, end_offset })
        }
        Request::ListOffsets { topic, partition, query } => {
            check_replica(shared, &topic, partition)?;
            offsets::list_offsets(shared, &topic, partition, query)
        }
        Request::CommitOffset { group, topic, partition, offset } => {
            offsets::commit(shared, group, topic, partition, offset).await
        }
        Request::FetchOffset { group, topic, partition } => offsets::fetch_offset(shared, &group, &topic, partition),
        Request::CreatePriorityTopic { name, lanes, settings } => priority::create(shared, name, lanes, settings).await,
        Request::ProduceLane { topic, lane, partition, batch, acks } => {
            let topic = rill_engine::cursor::priority::lane_topic_name(&topic, lane);
            let pending = produce::start(shared, topic, partition, acks, batch)?;
            produce::finish(shared, pending).await
        }
        Request::PriorityPoll { topic, cursor, max, settings } => {
            priority::poll(shared, topic, cursor, max, settings).await
        }
        Request::PriorityAck { topic, cursor, lease } => priority::ack(shared, topic, cursor, lease).await,
        Request::PriorityNack { topic, cursor, lease, delay_ms, reason } => {
            priority::nack(shared, topic, cursor, lease, delay_ms, reason).await
        }
        Request::PriorityExtendLease { topic, cursor, lease, extra_ms } => {
            priority::extend_lease(shared, topic, cursor, lease, extra_ms)
        }
        Request::ReplayDlq { topic, partition, from, to } => {
            priority::replay_dlq(shared, topic, partition, from, to).await
        }
        Request::PriorityOpen { topic, cursor, options } => priority::open(shared, topic, cursor, options).await,
        Request::PriorityClose { topic, cursor } => Ok(priority::close(shared, topic, cursor)),
        Request::JoinGroup { group, member_id, session_timeout_ms, topics } => {
            groups::join(shared, group, member_id, session_timeout_ms, topics)
        }
        Request::GroupHeartbeat { group, member_id } => groups::heartbeat(shared, &group, &member_id),
        Request::LeaveGroup { group, member_id } => groups::leave(shared, &group, &member_id),
        Request::MemberCommitOffset { group, member_id, generation, topic, partition, offset } => {
            groups::commit(shared, group, member_id, generation, topic, partition, offset).await
        }
    }
}

/// Runs blocking engine work (anything that may fsync) off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Io { op: "blocking task", source: std::io::Error::other(e.to_string()) })?
}
