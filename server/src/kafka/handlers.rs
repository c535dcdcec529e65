//! One function per Kafka api, each a thin call into the engine (or the group coordinator).
//! Fields a response version lacks are left at their defaults (the codec refuses others).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::create_topics_response::CreatableTopicResult;
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::list_offsets_response::{ListOffsetsPartitionResponse, ListOffsetsTopicResponse};
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::offset_commit_response::{OffsetCommitResponsePartition, OffsetCommitResponseTopic};
use kafka_protocol::messages::offset_fetch_response::{OffsetFetchResponsePartition, OffsetFetchResponseTopic};
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{
    BrokerId, CreateTopicsRequest, CreateTopicsResponse, DeleteTopicsRequest, DeleteTopicsResponse, FetchRequest,
    FetchResponse, FindCoordinatorRequest, FindCoordinatorResponse, HeartbeatRequest, HeartbeatResponse,
    InitProducerIdRequest, InitProducerIdResponse, JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest,
    LeaveGroupResponse, ListOffsetsRequest, ListOffsetsResponse, MetadataRequest, MetadataResponse,
    OffsetCommitRequest, OffsetCommitResponse, OffsetFetchRequest, OffsetFetchResponse, ProduceRequest,
    ProduceResponse, ProducerId, RequestHeader, RequestKind, ResponseKind, SyncGroupRequest, SyncGroupResponse,
    TopicName,
};
use kafka_protocol::protocol::StrBytes;
use rill_engine::{AppendHandle, Partition, TopicConfig};

use super::group::JoinRequest;
use super::records::{kafka_to_rill, rill_to_kafka, BatchError};
use super::{api_versions, KafkaContext, NODE_ID};
use crate::cmd::blocking;
use crate::error::{Error, ErrorCode};
use crate::limits::FETCH_WAIT_MS_MAX;

/// Kafka error codes the listener answers with (besides the group codes in `group::codes`).
mod code {
    pub const UNKNOWN_SERVER_ERROR: i16 = -1;
    pub const OFFSET_OUT_OF_RANGE: i16 = 1;
    pub const CORRUPT_MESSAGE: i16 = 2;
    pub const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
    pub const LEADER_NOT_AVAILABLE: i16 = 5;
    pub const NOT_LEADER_OR_FOLLOWER: i16 = 6;
    pub const REQUEST_TIMED_OUT: i16 = 7;
    pub const NOT_ENOUGH_REPLICAS: i16 = 19;
    pub const NOT_ENOUGH_REPLICAS_AFTER_APPEND: i16 = 20;
    pub const FENCED_LEADER_EPOCH: i16 = 74;
    pub const MESSAGE_TOO_LARGE: i16 = 10;
    pub const INVALID_TOPIC_EXCEPTION: i16 = 17;
    pub const INVALID_REQUIRED_ACKS: i16 = 21;
    pub const TOPIC_ALREADY_EXISTS: i16 = 36;
    pub const INVALID_PARTITIONS: i16 = 37;
    pub const INVALID_REPLICATION_FACTOR: i16 = 38;
    pub const INVALID_REQUEST: i16 = 42;
    pub const INVALID_CONFIG: i16 = 40;
    pub const UNSUPPORTED_FOR_MESSAGE_FORMAT: i16 = 43;
    pub const OUT_OF_ORDER_SEQUENCE_NUMBER: i16 = 45;
    pub const DUPLICATE_SEQUENCE_NUMBER: i16 = 46;
    pub const INVALID_PRODUCER_EPOCH: i16 = 47;
    pub const KAFKA_STORAGE_ERROR: i16 = 56;
    pub const UNKNOWN_PRODUCER_ID: i16 = 59;
    pub const PRODUCER_FENCED: i16 = 90;
}

/// The Kafka code for a server error (docs/protocol.md lists the mapping).
pub fn kafka_code(e: &Error) -> i16 {
    match e.code() {
        ErrorCode::None => 0,
        ErrorCode::TopicNotFound | ErrorCode::PartitionNotFound => code::UNKNOWN_TOPIC_OR_PARTITION,
        ErrorCode::TopicExists => code::TOPIC_ALREADY_EXISTS,
        ErrorCode::OffsetOutOfRange => code::OFFSET_OUT_OF_RANGE,
        ErrorCode::InvalidBatch => code::CORRUPT_MESSAGE,
        ErrorCode::LimitExceeded => code::MESSAGE_TOO_LARGE,
        ErrorCode::OutOfOrderSequence => code::OUT_OF_ORDER_SEQUENCE_NUMBER,
        ErrorCode::DuplicateSequence => code::DUPLICATE_SEQUENCE_NUMBER,
        ErrorCode::ProducerFenced => code::INVALID_PRODUCER_EPOCH,
        ErrorCode::UnknownProducerId => code::UNKNOWN_PRODUCER_ID,
        ErrorCode::StorageError | ErrorCode::ShuttingDown => code::KAFKA_STORAGE_ERROR,
        ErrorCode::InvalidConfig => code::INVALID_CONFIG,
        ErrorCode::InvalidTopicName => code::INVALID_TOPIC_EXCEPTION,
        ErrorCode::NotLeader => code::NOT_LEADER_OR_FOLLOWER,
        ErrorCode::NotEnoughReplicas => code::NOT_ENOUGH_REPLICAS,
        ErrorCode::FencedLeaderEpoch => code::FENCED_LEADER_EPOCH,
        _ if matches!(e, Error::Timeout { .. }) => code::REQUEST_TIMED_OUT,
        _ => code::UNKNOWN_SERVER_ERROR,
    }
}

fn batch_code(e: &BatchError) -> i16 {
    match e {
        BatchError::Corrupt(_) => code::CORRUPT_MESSAGE,
        BatchError::Unsupported(_) => code::UNSUPPORTED_FOR_MESSAGE_FORMAT,
        BatchError::TooLarge(_) => code::MESSAGE_TOO_LARGE,
    }
}

fn str_bytes(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

fn topic_name(s: &str) -> TopicName {
    TopicName(str_bytes(s))
}

/// The partition `index` of `topic`, or the Kafka error code.
fn partition(context: &KafkaContext, topic: &str, index: i32) -> Result<Arc<Partition>, i16> {
    let index = u32::try_from(index).map_err(|_| code::UNKNOWN_TOPIC_OR_PARTITION)?;
    context.shared.store.partition(topic, index).map_err(|e| kafka_code(&Error::from(e)))
}

/// Executes every api but Produce.
pub async fn execute(
    context: &Arc<KafkaContext>,
    header: &RequestHeader,
    request: RequestKind,
    version: i16,
) -> ResponseKind {
    match request {
        RequestKind::ApiVersions(_) => ResponseKind::ApiVersions(api_versions(0)),
        RequestKind::Metadata(r) => ResponseKind::Metadata(metadata(context, r, version).await),
        RequestKind::Fetch(r) => ResponseKind::Fetch(fetch(context, r, version).await),
        RequestKind::ListOffsets(r) => ResponseKind::ListOffsets(list_offsets(context, r)),
        RequestKind::InitProducerId(r) => ResponseKind::InitProducerId(init_producer_id(context, r, version).await),
        RequestKind::CreateTopics(r) => ResponseKind::CreateTopics(create_topics(context, r, version).await),
        RequestKind::DeleteTopics(r) => ResponseKind::DeleteTopics(delete_topics(context, r, version).await),
        RequestKind::FindCoordinator(r) => ResponseKind::FindCoordinator(find_coordinator(context, r, version)),
        RequestKind::JoinGroup(r) => ResponseKind::JoinGroup(join_group(context, header, r).await),
        RequestKind::SyncGroup(r) => ResponseKind::SyncGroup(sync_group(context, r).await),
        RequestKind::Heartbeat(r) => ResponseKind::Heartbeat(heartbeat(context, r)),
        RequestKind::LeaveGroup(r) => ResponseKind::LeaveGroup(leave_group(context, r, version)),
        RequestKind::OffsetCommit(r) => ResponseKind::OffsetCommit(offset_commit(context, r).await),
        RequestKind::OffsetFetch(r) => ResponseKind::OffsetFetch(offset_fetch(context, r, version)),
        // Produce is started by the connection; nothing else passes the version table.
        other => {
            tracing::error!(request = ?std::mem::discriminant(&other), "Kafka request without a handler");
            ResponseKind::ApiVersions(api_versions(super::UNSUPPORTED_VERSION))
        }
    }
}

/// Kafka's `UNSUPPORTED_VERSION`, the answer to an api rill does not serve.
const UNSUPPORTED_VERSION: i16 = 35;
/// Kafka's `UNSUPPORTED_SASL_MECHANISM`.
const UNSUPPORTED_SASL_MECHANISM: i16 = 33;

/// An error response for an api rill does not serve but a client may try without checking
/// ApiVersions (admin tools, SASL): UNSUPPORTED_VERSION on every item, or
/// UNSUPPORTED_SASL_MECHANISM with no mechanisms. `None` for the others (the connection
/// closes, with the reason logged).
pub fn unserved(request: RequestKind) -> Option<ResponseKind> {
    use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
    use kafka_protocol::messages::describe_configs_response::DescribeConfigsResult;
    use kafka_protocol::messages::describe_groups_response::DescribedGroup;
    use kafka_protocol::messages::offset_for_leader_epoch_response::{EpochEndOffset, OffsetForLeaderTopicResult};
    use kafka_protocol::messages::{
        DeleteGroupsResponse, DescribeClusterResponse, DescribeConfigsResponse, DescribeGroupsResponse,
        ListGroupsResponse, OffsetForLeaderEpochResponse, SaslHandshakeResponse,
    };
    Some(match request {
        RequestKind::SaslHandshake(_) => {
            let mut response = SaslHandshakeResponse::default();
            response.error_code = UNSUPPORTED_SASL_MECHANISM;
            ResponseKind::SaslHandshake(response)
        }
        RequestKind::ListGroups(_) => {
            let mut response = ListGroupsResponse::default();
            response.error_code = UNSUPPORTED_VERSION;
            ResponseKind::ListGroups(response)
        }
        RequestKind::DescribeCluster(_) => {
            let mut response = DescribeClusterResponse::default();
            response.error_code = UNSUPPORTED_VERSION;
            ResponseKind::DescribeCluster(response)
        }
        RequestKind::DescribeGroups(r) => {
            let mut response = DescribeGroupsResponse::default();
            for group_id in r.groups {
                let mut group = DescribedGroup::default();
                group.error_code = UNSUPPORTED_VERSION;
                group.group_id = group_id;
                response.groups.push(group);
            }
            ResponseKind::DescribeGroups(response)
        }
        RequestKind::DeleteGroups(r) => {
            let mut response = DeleteGroupsResponse::default();
            for group_id in r.groups_names {
                let mut result = DeletableGroupResult::default();
                result.error_code = UNSUPPORTED_VERSION;
                result.group_id = group_id;
                response.results.push(result);
            }
            ResponseKind::DeleteGroups(response)
        }
        RequestKind::DescribeConfigs(r) => {
            let mut response = DescribeConfigsResponse::default();
            for resource in r.resources {
                let mut result = DescribeConfigsResult::default();
                result.error_code = UNSUPPORTED_VERSION;
                result.resource_type = resource.resource_type;
                result.resource_name = resource.resource_name;
                response.results.push(result);
            }
            ResponseKind::DescribeConfigs(response)
        }
        RequestKind::OffsetForLeaderEpoch(r) => {
            let mut response = OffsetForLeaderEpochResponse::default();
            for topic in r.topics {
                let mut result = OffsetForLeaderTopicResult::default();
                result.topic = topic.topic;
                for wanted in topic.partitions {
                    let mut partition = EpochEndOffset::default();
                    partition.error_code = UNSUPPORTED_VERSION;
                    partition.partition = wanted.partition;
                    result.partitions.push(partition);
                }
                response.topics.push(result);
            }
            ResponseKind::OffsetForLeaderEpoch(response)
        }
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------
// Produce

/// A partition's appends (handles, request bytes), or the Kafka error and its message.
/// One partition's appended batches.
struct Appended {
    partition: Arc<Partition>,
    handles: Vec<AppendHandle>,
    /// Bytes of the request's records.
    bytes: u64,
    /// In a cluster with acks=-1: the leader epoch the batches were appended in.
    replicated_in: Option<u32>,
}

/// A produce request whose batches have been appended (or refused), in request order.
pub struct StartedProduce {
    topics: Vec<(TopicName, Vec<StartedPartition>)>,
}

struct StartedPartition {
    index: i32,
    outcome: Result<Appended, (i16, String)>,
}

/// Translates and appends every partition's batches. Runs on the connection's reader so
/// that pipelined produce requests land in the order they were sent.
pub fn produce_start(context: &KafkaContext, request: ProduceRequest) -> StartedProduce {
    let valid_acks = matches!(request.acks, -1..=1);
    let topics = request
        .topic_data
        .into_iter()
        .map(|topic| {
            let partitions = topic
                .partition_data
                .into_iter()
                .map(|data| {
                    let outcome = if valid_acks {
                        append(context, &topic.name, data.index, data.records, request.acks)
                    } else {
                        Err((code::INVALID_REQUIRED_ACKS, format!("acks must be -1, 0 or 1, not {}", request.acks)))
                    };
                    StartedPartition { index: data.index, outcome }
                })
                .collect();
            (topic.name, partitions)
        })
        .collect();
    StartedProduce { topics }
}

fn append(
    context: &KafkaContext,
    topic: &str,
    index: i32,
    records: Option<Bytes>,
    acks: i16,
) -> Result<Appended, (i16, String)> {
    let p = partition(context, topic, index).map_err(|code| (code, format!("{topic}/{index}")))?;
    // In a cluster: this node must lead the partition with enough replicas in sync; with
    // acks=-1 the answer waits for the high watermark under that leader epoch.
    let replicated_in = match &context.shared.cluster {
        Some(cluster) => {
            let epoch = cluster.check_produce(topic, p.id()).map_err(|e| (kafka_code(&e), e.to_string()))?;
            (acks == -1).then_some(epoch)
        }
        None => None,
    };
    let records = records.ok_or((code::CORRUPT_MESSAGE, "no records".to_string()))?;
    let batches = kafka_to_rill(&records).map_err(|e| (batch_code(&e), e.to_string()))?;
    let mut handles = Vec::with_capacity(batches.len());
    for batch in batches {
        // A failure after an earlier batch of the same partition was appended is reported
        // for the partition; the earlier batch stays (as in Kafka, batches are independent).
        let handle = p.append_batch(batch).map_err(|e| {
            let e = Error::from(e);
            (kafka_code(&e), e.to_string())
        })?;
        handles.push(handle);
    }
    Ok(Appended { partition: p, handles, bytes: records.len() as u64, replicated_in })
}

/// Waits for the acknowledgements and builds the response.
pub async fn produce_finish(context: &KafkaContext, started: StartedProduce, version: i16) -> ProduceResponse {
    let mut response = ProduceResponse::default();
    for (name, partitions) in started.topics {
        let mut topic = TopicProduceResponse::default();
        let counters = context.shared.metrics.topic(&name.0);
        for started in partitions {
            let mut out = PartitionProduceResponse::default();
            out.index = started.index;
            let result = match started.outcome {
                Ok(Appended { partition: p, handles, bytes, replicated_in }) => {
                    let mut first = None;
                    let mut last = None;
                    let mut failure = None;
                    let mut records = 0;
                    for handle in handles {
                        match handle.await {
                            Ok(info) => {
                                first.get_or_insert(info.base_offset);
                                last = Some(info.last_offset);
                                if !info.duplicate {
                                    records += info.last_offset - info.base_offset + 1;
                                }
                            }
                            Err(e) => {
                                let e = Error::from(e);
                                failure.get_or_insert((kafka_code(&e), e.to_string()));
                            }
                        }
                    }
                    if let (Some(cluster), None) = (&context.shared.cluster, &failure) {
                        match (replicated_in, last) {
                            (Some(epoch), Some(last)) => {
                                if let Err(e) = cluster.await_replicated(&name.0, p.id(), epoch, last).await {
                                    let code = match e.code() {
                                        ErrorCode::NotEnoughReplicas => code::NOT_ENOUGH_REPLICAS_AFTER_APPEND,
                                        _ => kafka_code(&e),
                                    };
                                    failure = Some((code, e.to_string()));
                                }
                            }
                            _ => cluster.on_local_append(&name.0, p.id()),
                        }
                    }
                    counters.produce_records.fetch_add(records, Ordering::Relaxed);
                    counters.produce_bytes.fetch_add(bytes, Ordering::Relaxed);
                    if version >= 5 {
                        out.log_start_offset = i64::try_from(p.log_start_offset()).unwrap_or(i64::MAX);
                    }
                    match failure {
                        Some(failure) => Err(failure),
                        None => Ok(first.unwrap_or_default()),
                    }
                }
                Err(failure) => Err(failure),
            };
            match result {
                Ok(base_offset) => out.base_offset = i64::try_from(base_offset).unwrap_or(i64::MAX),
                Err((code, message)) => {
                    tracing::debug!(topic = %name.0, partition = started.index, code, %message, "Kafka produce refused");
                    out.error_code = code;
                    out.base_offset = -1;
                    if version >= 8 {
                        out.error_message = Some(str_bytes(&message));
                    }
                }
            }
            topic.partition_responses.push(out);
        }
        topic.name = name;
        response.responses.push(topic);
    }
    response
}

// ---------------------------------------------------------------------------------------
// Fetch

async fn fetch(context: &Arc<KafkaContext>, request: FetchRequest, version: i16) -> FetchResponse {
    let shared = &context.shared;
    let max_wait = Duration::from_millis(u64::try_from(request.max_wait_ms).unwrap_or(0).min(FETCH_WAIT_MS_MAX.into()));
    let min_bytes = usize::try_from(request.min_bytes).unwrap_or(0);
    let response_max = usize::try_from(request.max_bytes).unwrap_or(usize::MAX).max(1);
    let deadline = tokio::time::Instant::now() + max_wait;
    loop {
        let (response, bytes, waits) = fetch_once(context, &request, version, response_max);
        let now = tokio::time::Instant::now();
        if bytes >= min_bytes.max(1) || waits.is_empty() || now >= deadline || *shared.shutdown.borrow() {
            return response;
        }
        // Nothing (or too little) yet: wait for any of the partitions to grow.
        let mut waiting = tokio::task::JoinSet::new();
        for (p, offset) in waits {
            waiting.spawn(async move { p.wait_for_async(offset).await });
        }
        let mut shutdown = shared.shutdown.clone();
        tokio::select! {
            _ = waiting.join_next() => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = shutdown.wait_for(|stopping| *stopping) => {}
        }
    }
}

/// One pass over the requested partitions: the response, the record bytes in it, and the
/// partitions (with their fetch offsets) that are at their end.
fn fetch_once(
    context: &KafkaContext,
    request: &FetchRequest,
    version: i16,
    response_max: usize,
) -> (FetchResponse, usize, Vec<(Arc<Partition>, u64)>) {
    let mut response = FetchResponse::default();
    let mut total = 0usize;
    let mut waits = Vec::new();
    for topic in &request.topics {
        let mut out_topic = FetchableTopicResponse::default();
        out_topic.topic = topic.topic.clone();
        for wanted in &topic.partitions {
            let mut out = PartitionData::default();
            out.partition_index = wanted.partition;
            out.high_watermark = -1;
            match partition(context, &topic.topic.0, wanted.partition) {
                Err(code) => out.error_code = code,
                Ok(p) => {
                    let end = p.end_offset();
                    let start = p.log_start_offset();
                    out.high_watermark = i64::try_from(end).unwrap_or(i64::MAX);
                    out.last_stable_offset = out.high_watermark;
                    if version >= 5 {
                        out.log_start_offset = i64::try_from(start).unwrap_or(i64::MAX);
                    }
                    let room = response_max.saturating_sub(total);
                    let limit = usize::try_from(wanted.partition_max_bytes).unwrap_or(0).min(room);
                    match u64::try_from(wanted.fetch_offset) {
                        Ok(offset) if offset == end => waits.push((Arc::clone(&p), offset)),
                        Ok(offset) if limit > 0 || total == 0 => match p.read(offset, limit.max(1) as u64) {
                            Ok(stored) => {
                                let mut kafka = BytesMut::with_capacity(stored.len());
                                total += rill_to_kafka(&stored, &mut kafka);
                                out.records = Some(kafka.freeze());
                                let counters = context.shared.metrics.topic(&topic.topic.0);
                                counters.fetch_requests.fetch_add(1, Ordering::Relaxed);
                                counters.fetch_bytes.fetch_add(stored.len() as u64, Ordering::Relaxed);
                            }
                            Err(e) => out.error_code = kafka_code(&Error::from(e)),
                        },
                        Ok(_) => {}
                        Err(_) => out.error_code = code::OFFSET_OUT_OF_RANGE,
                    }
                }
            }
            out_topic.partitions.push(out);
        }
        response.responses.push(out_topic);
    }
    (response, total, waits)
}

// ---------------------------------------------------------------------------------------
// Metadata, topics, offsets

/// This node's broker id: its cluster node id, or 0 on a single node.
fn broker_id(context: &KafkaContext) -> i32 {
    match &context.shared.controller {
        Some(_) => i32::try_from(context.shared.config.node_id).unwrap_or(i32::MAX),
        None => NODE_ID,
    }
}

/// Metadata in a cluster: every node that registered a Kafka listener is a broker, and each
/// partition's leader, replicas and ISR are the controller's.
fn cluster_metadata(
    context: &KafkaContext,
    controller: &crate::controller::Controller,
    request: MetadataRequest,
    version: i16,
) -> MetadataResponse {
    let metadata = controller.metadata().borrow().clone();
    let mut response = MetadataResponse::default();
    for (id, node) in &metadata.nodes {
        let Some((host, port)) = node.kafka_addr.rsplit_once(':') else { continue };
        let Ok(port) = port.parse::<i32>() else { continue };
        let mut broker = MetadataResponseBroker::default();
        broker.node_id = BrokerId(i32::try_from(*id).unwrap_or(i32::MAX));
        broker.host = str_bytes(host);
        broker.port = port;
        response.brokers.push(broker);
    }
    if version >= 2 {
        response.cluster_id = Some(str_bytes("rill"));
    }
    let raft_leader = controller.raft_leader().and_then(|id| i32::try_from(id).ok());
    response.controller_id = BrokerId(raft_leader.unwrap_or_else(|| broker_id(context)));
    let names: Vec<String> = match request.topics {
        None => metadata.topics.keys().cloned().collect(),
        Some(topics) => topics.into_iter().filter_map(|t| t.name.map(|n| n.0.to_string())).collect(),
    };
    let broker = |id: u32| BrokerId(i32::try_from(id).unwrap_or(i32::MAX));
    for name in names {
        let mut out = MetadataResponseTopic::default();
        out.name = Some(topic_name(&name));
        match metadata.topics.get(&name) {
            None => out.error_code = code::UNKNOWN_TOPIC_OR_PARTITION,
            Some(topic) => {
                for (index, p) in topic.partitions.iter().enumerate() {
                    let mut part = MetadataResponsePartition::default();
                    part.partition_index = i32::try_from(index).unwrap_or(i32::MAX);
                    match p.leader {
                        Some(leader) => part.leader_id = broker(leader),
                        None => {
                            part.leader_id = BrokerId(-1);
                            part.error_code = code::LEADER_NOT_AVAILABLE;
                        }
                    }
                    if version >= 7 {
                        part.leader_epoch = i32::try_from(p.leader_epoch).unwrap_or(i32::MAX);
                    }
                    part.replica_nodes = p.replicas.iter().map(|&r| broker(r)).collect();
                    part.isr_nodes = p.isr.iter().map(|&r| broker(r)).collect();
                    out.partitions.push(part);
                }
            }
        }
        response.topics.push(out);
    }
    response
}

async fn metadata(context: &Arc<KafkaContext>, request: MetadataRequest, version: i16) -> MetadataResponse {
    if let Some(controller) = &context.shared.controller {
        return cluster_metadata(context, controller, request, version);
    }
    let store = &context.shared.store;
    let mut response = MetadataResponse::default();
    let mut broker = MetadataResponseBroker::default();
    broker.node_id = BrokerId(NODE_ID);
    broker.host = str_bytes(&context.host);
    broker.port = context.port;
    response.brokers.push(broker);
    if version >= 2 {
        response.cluster_id = Some(str_bytes("rill"));
    }
    response.controller_id = BrokerId(NODE_ID);
    let names: Vec<String> = match request.topics {
        None => store.topics(),
        Some(topics) => topics.into_iter().filter_map(|t| t.name.map(|n| n.0.to_string())).collect(),
    };
    let auto_create =
        context.shared.config.kafka_auto_create_topics && (version < 4 || request.allow_auto_topic_creation);
    for name in names {
        let mut out = MetadataResponseTopic::default();
        out.name = Some(topic_name(&name));
        let topic = match store.topic(&name) {
            Err(_) if auto_create => {
                let config = crate::cmd::topic_config(&context.shared, &Default::default());
                let created = match config {
                    Ok(config) => {
                        let store = Arc::clone(store);
                        let create = name.clone();
                        blocking(move || Ok(store.create_topic(&create, config)?)).await
                    }
                    Err(e) => Err(e),
                };
                created.or_else(|_| Ok::<_, Error>(store.topic(&name)?))
            }
            found => found.map_err(Error::from),
        };
        match topic {
            Err(e) => out.error_code = kafka_code(&e),
            Ok(topic) => {
                out.is_internal = false;
                for p in topic.partitions() {
                    let mut part = MetadataResponsePartition::default();
                    part.partition_index = i32::try_from(p.id()).unwrap_or(i32::MAX);
                    part.leader_id = BrokerId(NODE_ID);
                    part.replica_nodes = vec![BrokerId(NODE_ID)];
                    part.isr_nodes = vec![BrokerId(NODE_ID)];
                    out.partitions.push(part);
                }
            }
        }
        response.topics.push(out);
    }
    response
}

fn list_offsets(context: &KafkaContext, request: ListOffsetsRequest) -> ListOffsetsResponse {
    const LATEST: i64 = -1;
    const EARLIEST: i64 = -2;
    let mut response = ListOffsetsResponse::default();
    for topic in request.topics {
        let mut out_topic = ListOffsetsTopicResponse::default();
        for wanted in topic.partitions {
            let mut out = ListOffsetsPartitionResponse::default();
            out.partition_index = wanted.partition_index;
            match partition(context, &topic.name.0, wanted.partition_index) {
                Err(code) => out.error_code = code,
                Ok(p) => {
                    let found = match wanted.timestamp {
                        LATEST => Ok(Some((p.end_offset(), -1))),
                        EARLIEST => Ok(Some((p.log_start_offset(), -1))),
                        ts if ts >= 0 => p.offset_for_timestamp(ts).and_then(|found| match found {
                            None => Ok(None),
                            Some(offset) => {
                                let first = p.read_records(offset, 1)?;
                                let ts = first.iter().find(|r| r.offset == offset).map_or(ts, |r| r.timestamp_ms);
                                Ok(Some((offset, ts)))
                            }
                        }),
                        _ => Ok(Some((p.end_offset(), -1))),
                    };
                    match found {
                        Ok(Some((offset, timestamp))) => {
                            out.offset = i64::try_from(offset).unwrap_or(i64::MAX);
                            out.timestamp = timestamp;
                        }
                        Ok(None) => {}
                        Err(e) => out.error_code = kafka_code(&Error::from(e)),
                    }
                }
            }
            out_topic.partitions.push(out);
        }
        out_topic.name = topic.name;
        response.topics.push(out_topic);
    }
    response
}

async fn init_producer_id(
    context: &KafkaContext,
    request: InitProducerIdRequest,
    version: i16,
) -> InitProducerIdResponse {
    let mut response = InitProducerIdResponse::default();
    let store = Arc::clone(&context.shared.store);
    let transactional_id = request.transactional_id.map(|t| t.0.to_string());
    if transactional_id.as_deref() == Some("") {
        // As Kafka: a transactional id is absent (null) or non-empty.
        response.error_code = code::INVALID_REQUEST;
        response.producer_id = ProducerId(-1);
        response.producer_epoch = -1;
        return response;
    }
    if version >= 3 && transactional_id.is_some() && request.producer_id.0 >= 0 {
        // A producer re-initialising its transactional id presents its current identity; one
        // fenced by a newer instance is told so instead of fencing that instance in turn.
        if let Err(e @ rill_engine::Error::ProducerFenced { .. }) =
            store.check_producer(request.producer_id.0, request.producer_epoch)
        {
            tracing::debug!(%e, "Kafka InitProducerId from a fenced producer");
            response.error_code = code::PRODUCER_FENCED;
            response.producer_id = ProducerId(-1);
            response.producer_epoch = -1;
            return response;
        }
    }
    match blocking(move || Ok(store.init_producer(transactional_id.as_deref())?)).await {
        Ok(identity) => {
            response.producer_id = ProducerId(identity.producer_id);
            response.producer_epoch = identity.producer_epoch;
        }
        Err(e) => {
            response.error_code = kafka_code(&e);
            response.producer_id = ProducerId(-1);
            response.producer_epoch = -1;
        }
    }
    response
}

/// The topic configuration of a CreateTopics entry: the server's topic defaults, the
/// partition count, and the Kafka topic configs rill has an equivalent for.
fn creatable_config(
    context: &KafkaContext,
    partitions: i32,
    replication_factor: i16,
    configs: &[(String, Option<String>)],
) -> Result<TopicConfig, (i16, String)> {
    if replication_factor > 1 && context.shared.controller.is_none() {
        return Err((
            code::INVALID_REPLICATION_FACTOR,
            format!("replication factor {replication_factor}: this is a single-node cluster"),
        ));
    }
    if partitions == 0 || partitions < -1 {
        return Err((code::INVALID_PARTITIONS, format!("{partitions} partitions")));
    }
    let mut config =
        crate::cmd::topic_config(&context.shared, &Default::default()).map_err(|e| (kafka_code(&e), e.to_string()))?;
    if partitions > 0 {
        config.partitions = partitions.unsigned_abs();
    }
    for (name, value) in configs {
        let value = value.as_deref().unwrap_or("");
        let number =
            || value.parse::<i64>().map_err(|_| (code::INVALID_CONFIG, format!("{name}={value:?} is not a number")));
        let limit = |n: i64| u64::try_from(n).ok();
        match name.as_str() {
            "retention.ms" => config.retention_ms = limit(number()?),
            "retention.bytes" => config.retention_bytes = limit(number()?),
            "segment.bytes" => {
                config.segment_size_bytes =
                    limit(number()?).ok_or((code::INVALID_CONFIG, format!("segment.bytes={value} must be positive")))?
            }
            "segment.ms" => config.segment_ms = limit(number()?),
            other => return Err((code::INVALID_CONFIG, format!("topic config {other:?} is not supported by rill"))),
        }
    }
    config.validate().map_err(|e| (code::INVALID_CONFIG, e.to_string()))?;
    Ok(config)
}

async fn create_topics(context: &KafkaContext, request: CreateTopicsRequest, version: i16) -> CreateTopicsResponse {
    let mut response = CreateTopicsResponse::default();
    for topic in request.topics {
        let mut out = CreatableTopicResult::default();
        let configs: Vec<(String, Option<String>)> =
            topic.configs.iter().map(|c| (c.name.to_string(), c.value.as_ref().map(|v| v.to_string()))).collect();
        let result = match creatable_config(context, topic.num_partitions, topic.replication_factor, &configs) {
            Err(failure) => Err(failure),
            Ok(config) if !topic.assignments.is_empty() => {
                Err((code::INVALID_REQUEST, format!("manual replica assignment is not supported ({config:?})")))
            }
            Ok(config) => {
                let partitions = config.partitions;
                if request.validate_only {
                    rill_engine::log::store::validate_topic_name(&topic.name.0)
                        .map_err(|e| (kafka_code(&Error::from(e)), String::new()))
                        .and_then(|()| match context.shared.store.topic(&topic.name.0) {
                            Ok(_) => Err((code::TOPIC_ALREADY_EXISTS, format!("topic {} exists", &*topic.name.0))),
                            Err(_) => Ok(partitions),
                        })
                } else {
                    // In a cluster the controller assigns the replicas (-1: the server's default).
                    let replicas = u32::try_from(topic.replication_factor).ok().filter(|&r| r > 0);
                    let name = topic.name.0.to_string();
                    match crate::cmd::create_topic_with(&context.shared, name, config, replicas).await {
                        Ok(_) => Ok(partitions),
                        Err(e) => Err((kafka_code(&e), e.to_string())),
                    }
                }
            }
        };
        match result {
            Ok(partitions) => {
                if version >= 5 {
                    out.num_partitions = i32::try_from(partitions).unwrap_or(i32::MAX);
                    out.replication_factor = 1;
                }
            }
            Err((code, message)) => {
                out.error_code = code;
                out.error_message = Some(str_bytes(&message));
            }
        }
        out.name = topic.name;
        response.topics.push(out);
    }
    response
}

async fn delete_topics(context: &KafkaContext, request: DeleteTopicsRequest, version: i16) -> DeleteTopicsResponse {
    let mut response = DeleteTopicsResponse::default();
    for name in request.topic_names {
        let mut out = DeletableTopicResult::default();
        if let Err(e) = crate::cmd::delete_topic(&context.shared, name.0.to_string()).await {
            out.error_code = kafka_code(&e);
            if version >= 5 {
                out.error_message = Some(str_bytes(&e.to_string()));
            }
        }
        out.name = Some(name);
        response.responses.push(out);
    }
    response
}

// ---------------------------------------------------------------------------------------
// Groups

fn find_coordinator(context: &KafkaContext, request: FindCoordinatorRequest, version: i16) -> FindCoordinatorResponse {
    let mut response = FindCoordinatorResponse::default();
    if version >= 1 && request.key_type != 0 {
        // Transaction coordinators (key type 1): rill has no transactions.
        response.error_code = 15; // COORDINATOR_NOT_AVAILABLE
        response.error_message = Some(str_bytes("rill has no transaction coordinator"));
        response.node_id = BrokerId(-1);
        response.host = str_bytes("");
        response.port = -1;
        return response;
    }
    response.node_id = BrokerId(broker_id(context));
    response.host = str_bytes(&context.host);
    response.port = context.port;
    response
}

async fn join_group(context: &KafkaContext, header: &RequestHeader, request: JoinGroupRequest) -> JoinGroupResponse {
    let join = JoinRequest {
        member_id: request.member_id.to_string(),
        client_id: header.client_id.as_ref().map(|c| c.to_string()).unwrap_or_default(),
        session_timeout_ms: request.session_timeout_ms,
        rebalance_timeout_ms: request.rebalance_timeout_ms,
        protocol_type: request.protocol_type.to_string(),
        protocols: request.protocols.into_iter().map(|p| (p.name.to_string(), p.metadata)).collect(),
    };
    let receiver = context.groups.join(&request.group_id.0, join);
    let mut response = JoinGroupResponse::default();
    let mut shutdown = context.shared.shutdown.clone();
    let outcome = tokio::select! {
        outcome = receiver => outcome.ok(),
        _ = shutdown.wait_for(|stopping| *stopping) => None,
    };
    let Some(outcome) = outcome else {
        response.error_code = super::group::codes::REBALANCE_IN_PROGRESS;
        return response;
    };
    response.error_code = outcome.error_code;
    response.generation_id = outcome.generation;
    response.protocol_name = Some(str_bytes(outcome.protocol.as_deref().unwrap_or("")));
    response.leader = str_bytes(&outcome.leader);
    response.member_id = str_bytes(&outcome.member_id);
    response.members = outcome
        .members
        .into_iter()
        .map(|(id, metadata)| {
            let mut member = JoinGroupResponseMember::default();
            member.member_id = str_bytes(&id);
            member.metadata = metadata;
            member
        })
        .collect();
    response
}

async fn sync_group(context: &KafkaContext, request: SyncGroupRequest) -> SyncGroupResponse {
    let assignments = request.assignments.into_iter().map(|a| (a.member_id.to_string(), a.assignment)).collect();
    let receiver = context.groups.sync(&request.group_id.0, &request.member_id, request.generation_id, assignments);
    let mut response = SyncGroupResponse::default();
    let mut shutdown = context.shared.shutdown.clone();
    let outcome = tokio::select! {
        outcome = receiver => outcome.ok(),
        _ = shutdown.wait_for(|stopping| *stopping) => None,
    };
    match outcome {
        Some(outcome) => {
            response.error_code = outcome.error_code;
            response.assignment = outcome.assignment;
        }
        None => response.error_code = super::group::codes::REBALANCE_IN_PROGRESS,
    }
    response
}

fn heartbeat(context: &KafkaContext, request: HeartbeatRequest) -> HeartbeatResponse {
    let mut response = HeartbeatResponse::default();
    response.error_code = context.groups.heartbeat(&request.group_id.0, &request.member_id, request.generation_id);
    response
}

fn leave_group(context: &KafkaContext, request: LeaveGroupRequest, version: i16) -> LeaveGroupResponse {
    let mut response = LeaveGroupResponse::default();
    if version < 3 {
        response.error_code = context.groups.leave(&request.group_id.0, &request.member_id);
        return response;
    }
    for member in request.members {
        let mut out = MemberResponse::default();
        out.error_code = context.groups.leave(&request.group_id.0, &member.member_id);
        out.member_id = member.member_id;
        response.members.push(out);
    }
    response
}

async fn offset_commit(context: &KafkaContext, request: OffsetCommitRequest) -> OffsetCommitResponse {
    let group = request.group_id.0.to_string();
    let membership = context.groups.check_commit(&group, &request.member_id, request.generation_id_or_member_epoch);
    let mut response = OffsetCommitResponse::default();
    for topic in request.topics {
        let mut out_topic = OffsetCommitResponseTopic::default();
        for wanted in topic.partitions {
            let mut out = OffsetCommitResponsePartition::default();
            out.partition_index = wanted.partition_index;
            out.error_code = if membership != 0 {
                membership
            } else {
                match (
                    partition(context, &topic.name.0, wanted.partition_index),
                    u64::try_from(wanted.committed_offset),
                ) {
                    (Err(code), _) => code,
                    (Ok(_), Err(_)) => code::OFFSET_OUT_OF_RANGE,
                    (Ok(p), Ok(offset)) => {
                        let store = Arc::clone(&context.shared.store);
                        let (group, topic) = (group.clone(), topic.name.0.to_string());
                        let id = p.id();
                        match blocking(move || Ok(store.consumer_offsets().commit(&group, &topic, id, offset)?)).await {
                            Ok(()) => 0,
                            Err(e) => kafka_code(&e),
                        }
                    }
                }
            };
            out_topic.partitions.push(out);
        }
        out_topic.name = topic.name;
        response.topics.push(out_topic);
    }
    response
}

fn offset_fetch(context: &KafkaContext, request: OffsetFetchRequest, version: i16) -> OffsetFetchResponse {
    let group = request.group_id.0.to_string();
    let offsets = context.shared.store.consumer_offsets();
    let wanted: Vec<(String, Vec<i32>)> = match request.topics {
        Some(topics) => topics.into_iter().map(|t| (t.name.0.to_string(), t.partition_indexes)).collect(),
        None => {
            // Every partition the group committed (version 2 and later may ask for all).
            let mut all: Vec<(String, Vec<i32>)> = Vec::new();
            for (key, _) in offsets.group(&group) {
                let partition = i32::try_from(key.partition).unwrap_or(i32::MAX);
                match all.iter_mut().find(|(t, _)| *t == key.topic) {
                    Some((_, partitions)) => partitions.push(partition),
                    None => all.push((key.topic.clone(), vec![partition])),
                }
            }
            all
        }
    };
    let mut response = OffsetFetchResponse::default();
    for (topic, partitions) in wanted {
        let mut out_topic = OffsetFetchResponseTopic::default();
        for index in partitions {
            let mut out = OffsetFetchResponsePartition::default();
            out.partition_index = index;
            out.committed_offset = -1;
            match partition(context, &topic, index) {
                Err(code) if version < 2 || code != code::UNKNOWN_TOPIC_OR_PARTITION => out.error_code = code,
                Err(_) => {}
                Ok(p) => {
                    if let Some(offset) = offsets.fetch(&group, &topic, p.id()) {
                        out.committed_offset = i64::try_from(offset).unwrap_or(i64::MAX);
                    }
                }
            }
            out_topic.partitions.push(out);
        }
        out_topic.name = topic_name(&topic);
        response.topics.push(out_topic);
    }
    response
}
