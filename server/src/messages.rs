//! Request and response bodies of protocol v1 (normative: `docs/protocol.md`). Pure
//! encode/decode; the server decodes requests and encodes responses, the client the reverse.

use bytes::Bytes;
use rill_engine::FsyncPolicy;

use crate::error::{Error, ErrorCode, Result};
use crate::frame::{put_request_header, put_response_header, RequestHeader, WireReader, WireWriter};
use crate::limits::METADATA_TOPICS_MAX;

/// Api keys. Append-only.
pub mod api {
    /// Versions handshake.
    pub const API_VERSIONS: u16 = 0;
    /// Topic descriptions (all or named).
    pub const METADATA: u16 = 1;
    /// Create a topic.
    pub const CREATE_TOPIC: u16 = 2;
    /// Delete a topic.
    pub const DELETE_TOPIC: u16 = 3;
    /// Topic names.
    pub const LIST_TOPICS: u16 = 4;
    /// Issue an idempotent producer id.
    pub const INIT_PRODUCER_ID: u16 = 5;
    /// Append a record batch.
    pub const PRODUCE: u16 = 6;
    /// Read record batches.
    pub const FETCH: u16 = 7;
    /// Earliest / latest / by-timestamp offsets.
    pub const LIST_OFFSETS: u16 = 8;
    /// Commit a consumer group's offset.
    pub const COMMIT_OFFSET: u16 = 9;
    /// Read a consumer group's committed offset.
    pub const FETCH_OFFSET: u16 = 10;
    /// Server counters.
    pub const STATS: u16 = 11;
    /// Create a priority topic (lanes `<name>.p0`… and `<name>.dlq`).
    pub const CREATE_PRIORITY_TOPIC: u16 = 12;
    /// Append a record batch to one lane of a priority topic.
    pub const PRODUCE_LANE: u16 = 13;
    /// Lease messages from a priority cursor.
    pub const PRIORITY_POLL: u16 = 14;
    /// Settle a leased message.
    pub const PRIORITY_ACK: u16 = 15;
    /// Give a leased message back (retry later or dead-letter).
    pub const PRIORITY_NACK: u16 = 16;
    /// Extend a lease.
    pub const PRIORITY_EXTEND_LEASE: u16 = 17;
    /// Append dead letters back to their lanes.
    pub const REPLAY_DLQ: u16 = 18;
    /// Open a priority cursor with a full configuration.
    pub const PRIORITY_OPEN: u16 = 19;
    /// Close an open priority cursor (its leases are dropped).
    pub const PRIORITY_CLOSE: u16 = 20;
    /// Join a consumer group (or renew a membership) and learn the assignment.
    pub const JOIN_GROUP: u16 = 21;
    /// Renew a consumer-group session and learn the current assignment.
    pub const GROUP_HEARTBEAT: u16 = 22;
    /// Leave a consumer group.
    pub const LEAVE_GROUP: u16 = 23;
    /// Commit an offset as a member of a consumer group (fenced by generation).
    pub const MEMBER_COMMIT_OFFSET: u16 = 24;
    /// A follower's replica fetch from a partition leader (replication).
    pub const REPLICA_FETCH: u16 = 25;
    /// Where a leader epoch ends on the leader's log (a follower's truncation point).
    pub const EPOCH_END_OFFSET: u16 = 26;
    /// Where each partition's leader is (cluster metadata for clients).
    pub const LEADERS: u16 = 27;
    /// Number of api keys defined.
    pub const COUNT: u16 = 28;
}

/// The only version of every api in protocol v1.
pub const API_VERSION_V1: u16 = 1;

/// Acknowledgement level of a produce request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acks {
    /// No response is sent.
    None = 0,
    /// Answered when the leader's log acknowledges the batch per the topic's fsync policy.
    Leader = 1,
    /// Answered when the batch is below the high watermark: every in-sync replica holds
    /// it (on a single node, the same as `Leader`).
    All = 2,
}

/// What a list-offsets request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffsetQuery {
    /// The log start offset.
    Earliest,
    /// The end offset (next offset to be written).
    Latest,
    /// The first record with a timestamp at or after this (ms).
    Timestamp(i64),
}

/// Topic settings in a create request; `None` means the server's default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TopicSettings {
    /// Partitions.
    pub partitions: u32,
    /// Fsync policy; `None` = server default.
    pub fsync: Option<FsyncPolicy>,
    /// Segment size.
    pub segment_size_bytes: Option<u64>,
    /// Retention by size.
    pub retention_bytes: Option<u64>,
    /// Retention by age.
    pub retention_ms: Option<u64>,
}

/// Most nodes a `Leaders` answer may list.
pub const LEADERS_NODES_MAX: u32 = 10_000;

/// Where one partition's leader is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionLeader {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// The leader's node id; `None` while the partition is offline.
    pub leader: Option<u32>,
    /// The leader epoch.
    pub leader_epoch: u32,
}

/// One partition's offsets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionInfo {
    /// Partition number.
    pub partition: u32,
    /// First offset held.
    pub log_start: u64,
    /// Next offset to be written (high watermark).
    pub end_offset: u64,
    /// Bytes on disk.
    pub size_bytes: u64,
}

/// A topic's configuration and partitions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicDescription {
    /// Topic name.
    pub name: String,
    /// Fsync policy.
    pub fsync: FsyncPolicy,
    /// Segment size.
    pub segment_size_bytes: u64,
    /// Retention by size.
    pub retention_bytes: Option<u64>,
    /// Retention by age.
    pub retention_ms: Option<u64>,
    /// Partitions, by number.
    pub partitions: Vec<PartitionInfo>,
}

/// Priority cursor settings in a poll; `None` means the engine's default. The server keeps a
/// cursor open between requests: later polls must name the same settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PriorityCursorSettings {
    /// How long a delivery stays leased (ms).
    pub lease_ms: Option<u64>,
    /// Deliveries before a message is dead-lettered.
    pub max_deliveries: Option<u32>,
    /// Aging period (ms): a waiting message rises one lane per period.
    pub aging_ms: Option<u64>,
    /// Backoff after the first failure (ms).
    pub backoff_base_ms: Option<u64>,
    /// Largest backoff (ms).
    pub backoff_max_ms: Option<u64>,
}

/// Every setting of a priority cursor (`PriorityOpen`); the engine checks the ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriorityCursorOptions {
    /// Weight of lanes `p0`…`p3`.
    pub weights: [u32; 4],
    /// Aging period (ms).
    pub aging_ms: u64,
    /// Lease length (ms).
    pub lease_ms: u64,
    /// Deliveries before dead-lettering.
    pub max_deliveries: u32,
    /// Backoff after the first failure (ms).
    pub backoff_base_ms: u64,
    /// Backoff growth per failure, in thousandths (2,000 = ×2).
    pub backoff_factor_milli: u32,
    /// Largest backoff (ms).
    pub backoff_max_ms: u64,
    /// Fraction of a backoff taken off at random, in thousandths (0..=1,000).
    pub backoff_jitter_milli: u32,
    /// Seed of the jitter.
    pub backoff_seed: u64,
    /// Most leases held at once.
    pub max_in_flight: u32,
}

impl PriorityCursorOptions {
    /// The engine configuration these options describe.
    pub fn to_config(&self) -> rill_engine::PriorityCursorConfig {
        rill_engine::PriorityCursorConfig {
            weights: self.weights,
            aging_ms: self.aging_ms,
            lease_ms: self.lease_ms,
            max_deliveries: self.max_deliveries,
            backoff: rill_engine::BackoffConfig {
                base_ms: self.backoff_base_ms,
                factor: f64::from(self.backoff_factor_milli) / 1_000.0,
                max_ms: self.backoff_max_ms,
                jitter: f64::from(self.backoff_jitter_milli) / 1_000.0,
                seed: self.backoff_seed,
            },
            max_in_flight: self.max_in_flight,
        }
    }

    /// Options for an engine configuration (factor and jitter rounded to thousandths).
    pub fn from_config(config: &rill_engine::PriorityCursorConfig) -> Self {
        let milli = |x: f64| (x * 1_000.0).round().clamp(0.0, f64::from(u32::MAX)) as u32;
        PriorityCursorOptions {
            weights: config.weights,
            aging_ms: config.aging_ms,
            lease_ms: config.lease_ms,
            max_deliveries: config.max_deliveries,
            backoff_base_ms: config.backoff.base_ms,
            backoff_factor_milli: milli(config.backoff.factor),
            backoff_max_ms: config.backoff.max_ms,
            backoff_jitter_milli: milli(config.backoff.jitter),
            backoff_seed: config.backoff.seed,
            max_in_flight: config.max_in_flight,
        }
    }
}

/// A member's partitions in a consumer group's generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupAssignment {
    /// The member's id.
    pub member_id: String,
    /// The group's generation.
    pub generation: u64,
    /// Members in this generation.
    pub members: u32,
    /// The member's partitions, sorted.
    pub partitions: Vec<(String, u32)>,
}

/// Identifies one lease of a priority cursor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseRef {
    /// Lane.
    pub lane: u8,
    /// Partition of the lane topic.
    pub partition: u32,
    /// Offset in the lane partition.
    pub offset: u64,
    /// The lease id of the delivery.
    pub lease_id: u64,
}

/// One leased message in a priority poll response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriorityDelivery {
    /// The lease.
    pub lease: LeaseRef,
    /// Deliveries including this one.
    pub delivery_count: u32,
    /// The lease is reclaimed at or after this time (ms).
    pub lease_deadline_ms: i64,
    /// Record timestamp (ms).
    pub timestamp_ms: i64,
    /// Key.
    pub key: Option<Bytes>,
    /// Value.
    pub value: Option<Bytes>,
    /// Headers, in order.
    pub headers: Vec<(String, Option<Bytes>)>,
}

/// A request body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Supported api versions.
    ApiVersions,
    /// Describe topics (all when empty).
    Metadata {
        /// Topics to describe.
        topics: Vec<String>,
    },
    /// Create a topic.
    CreateTopic {
        /// Name.
        name: String,
        /// Settings.
        settings: TopicSettings,
    },
    /// Delete a topic.
    DeleteTopic {
        /// Name.
        name: String,
    },
    /// List topic names.
    ListTopics,
    /// Issue a producer id.
    InitProducerId {
        /// Transactional id: re-init bumps the epoch and fences the previous holder.
        transactional_id: Option<String>,
    },
    /// Append one record batch (format v1, as on disk).
    Produce {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// Acknowledgement level.
        acks: Acks,
        /// The encoded batch.
        batch: Bytes,
    },
    /// A follower's fetch (replication): batches from `offset` on, below the leader's log
    /// end; the leader learns the follower's log end from `offset`.
    ReplicaFetch {
        /// The follower's node id.
        replica_id: u32,
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// The leader epoch the follower follows; another epoch is refused.
        leader_epoch: u32,
        /// The follower's log end.
        offset: u64,
        /// Most bytes to return.
        max_bytes: u32,
        /// Long poll: wait up to this long for data past `offset`.
        max_wait_ms: u32,
    },
    /// The cluster's nodes and every partition's leader.
    Leaders,
    /// Kafka's OffsetsForLeaderEpoch for one partition.
    EpochEndOffset {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// The follower's newest epoch.
        epoch: u32,
    },
    /// Read batches.
    Fetch {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// First offset wanted.
        offset: u64,
        /// Most bytes to return (at least one batch is returned).
        max_bytes: u32,
        /// Long poll: wait up to this long for data at `offset`.
        max_wait_ms: u32,
    },
    /// Offsets by position or time.
    ListOffsets {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// What to look up.
        query: OffsetQuery,
    },
    /// Commit a group's position.
    CommitOffset {
        /// Group.
        group: String,
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// Next offset the group will read.
        offset: u64,
    },
    /// Read a group's position.
    FetchOffset {
        /// Group.
        group: String,
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
    },
    /// Server counters.
    Stats,
    /// Create a priority topic.
    CreatePriorityTopic {
        /// Name (without suffix).
        name: String,
        /// Lanes (1..=4).
        lanes: u8,
        /// Settings of every lane topic and the dead-letter topic.
        settings: TopicSettings,
    },
    /// Append one record batch to a lane (`<topic>.p<lane>`).
    ProduceLane {
        /// Priority topic.
        topic: String,
        /// Lane.
        lane: u8,
        /// Partition.
        partition: u32,
        /// Acknowledgement level.
        acks: Acks,
        /// The encoded batch.
        batch: Bytes,
    },
    /// Lease up to `max` messages.
    PriorityPoll {
        /// Priority topic.
        topic: String,
        /// Cursor name.
        cursor: String,
        /// Most messages to lease.
        max: u32,
        /// Cursor settings.
        settings: PriorityCursorSettings,
    },
    /// Settle a lease.
    PriorityAck {
        /// Priority topic.
        topic: String,
        /// Cursor name.
        cursor: String,
        /// The lease.
        lease: LeaseRef,
    },
    /// Give a lease back.
    PriorityNack {
        /// Priority topic.
        topic: String,
        /// Cursor name.
        cursor: String,
        /// The lease.
        lease: LeaseRef,
        /// Redeliver after this long instead of the backoff.
        delay_ms: Option<u64>,
        /// Why (recorded when dead-lettered).
        reason: String,
    },
    /// Extend a lease.
    PriorityExtendLease {
        /// Priority topic.
        topic: String,
        /// Cursor name.
        cursor: String,
        /// The lease.
        lease: LeaseRef,
        /// New deadline: now + this (ms).
        extra_ms: u64,
    },
    /// Replay dead letters `from..to` of a dead-letter partition to their lanes.
    ReplayDlq {
        /// Priority topic.
        topic: String,
        /// Dead-letter partition.
        partition: u32,
        /// First offset.
        from: u64,
        /// End offset (exclusive).
        to: u64,
    },
    /// Open a priority cursor with every setting given.
    PriorityOpen {
        /// Priority topic.
        topic: String,
        /// Cursor name.
        cursor: String,
        /// Its settings.
        options: PriorityCursorOptions,
    },
    /// Close an open priority cursor.
    PriorityClose {
        /// Priority topic.
        topic: String,
        /// Cursor name.
        cursor: String,
    },
    /// Join a consumer group.
    JoinGroup {
        /// Group.
        group: String,
        /// The member's id when renewing; none for a new member.
        member_id: Option<String>,
        /// The member is removed when silent this long (ms).
        session_timeout_ms: u32,
        /// Topics it reads.
        topics: Vec<String>,
    },
    /// Renew a consumer-group session.
    GroupHeartbeat {
        /// Group.
        group: String,
        /// Member id.
        member_id: String,
    },
    /// Leave a consumer group.
    LeaveGroup {
        /// Group.
        group: String,
        /// Member id.
        member_id: String,
    },
    /// Commit a position as a member of a consumer group.
    MemberCommitOffset {
        /// Group.
        group: String,
        /// Member id.
        member_id: String,
        /// The generation the member is in.
        generation: u64,
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// Next offset the group will read.
        offset: u64,
    },
}

/// A successful response body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// `(api key, min version, max version)` per supported api.
    ApiVersions(Vec<(u16, u16, u16)>),
    /// Topic descriptions.
    Metadata(Vec<TopicDescription>),
    /// No body (create, delete, commit).
    Empty,
    /// Topic names.
    ListTopics(Vec<String>),
    /// Issued producer identity.
    InitProducerId {
        /// Producer id.
        producer_id: i64,
        /// Producer epoch.
        producer_epoch: i16,
    },
    /// Where the batch landed.
    Produce {
        /// First offset.
        base_offset: u64,
        /// Last offset.
        last_offset: u64,
        /// The batch was a retry answered with its original offsets.
        duplicate: bool,
    },
    /// A replica fetch's answer.
    ReplicaFetch {
        /// The leader's high watermark.
        high_watermark: u64,
        /// The leader's log end.
        log_end: u64,
        /// Whole batches, as on disk (offsets and epochs as the leader wrote them).
        records: Bytes,
    },
    /// The cluster's nodes and partition leaders (both empty on a single node).
    Leaders {
        /// Every node: id and client address.
        nodes: Vec<(u32, String)>,
        /// Every partition: topic, partition, leader node (`None`: offline), leader epoch.
        partitions: Vec<PartitionLeader>,
    },
    /// Where an epoch ends on the leader.
    EpochEndOffset {
        /// The largest epoch on the leader's log not above the one asked for.
        epoch: u32,
        /// Where it ends there.
        end_offset: u64,
    },
    /// Batches read.
    Fetch {
        /// Log start offset.
        log_start: u64,
        /// End offset (high watermark).
        end_offset: u64,
        /// Whole batches, as on disk.
        records: Bytes,
    },
    /// An offset, if one matches.
    Offset(Option<u64>),
    /// Counters.
    Stats(Vec<(String, u64)>),
    /// Leased messages (poll), or the extended lease (one delivery).
    PriorityDeliveries(Vec<PriorityDelivery>),
    /// A count (dead letters replayed).
    Count(u64),
    /// A consumer-group member's assignment (join, heartbeat).
    Assignment(GroupAssignment),
}

impl Request {
    /// The api key of this request.
    pub fn api_key(&self) -> u16 {
        match self {
            Request::ApiVersions => api::API_VERSIONS,
            Request::Metadata { .. } => api::METADATA,
            Request::CreateTopic { .. } => api::CREATE_TOPIC,
            Request::DeleteTopic { .. } => api::DELETE_TOPIC,
            Request::ListTopics => api::LIST_TOPICS,
            Request::InitProducerId { .. } => api::INIT_PRODUCER_ID,
            Request::Produce { .. } => api::PRODUCE,
            Request::Fetch { .. } => api::FETCH,
            Request::ReplicaFetch { .. } => api::REPLICA_FETCH,
            Request::EpochEndOffset { .. } => api::EPOCH_END_OFFSET,
            Request::Leaders => api::LEADERS,
            Request::ListOffsets { .. } => api::LIST_OFFSETS,
            Request::CommitOffset { .. } => api::COMMIT_OFFSET,
            Request::FetchOffset { .. } => api::FETCH_OFFSET,
            Request::Stats => api::STATS,
            Request::CreatePriorityTopic { .. } => api::CREATE_PRIORITY_TOPIC,
            Request::ProduceLane { .. } => api::PRODUCE_LANE,
            Request::PriorityPoll { .. } => api::PRIORITY_POLL,
            Request::PriorityAck { .. } => api::PRIORITY_ACK,
            Request::PriorityNack { .. } => api::PRIORITY_NACK,
            Request::PriorityExtendLease { .. } => api::PRIORITY_EXTEND_LEASE,
            Request::ReplayDlq { .. } => api::REPLAY_DLQ,
            Request::PriorityOpen { .. } => api::PRIORITY_OPEN,
            Request::PriorityClose { .. } => api::PRIORITY_CLOSE,
            Request::JoinGroup { .. } => api::JOIN_GROUP,
            Request::GroupHeartbeat { .. } => api::GROUP_HEARTBEAT,
            Request::LeaveGroup { .. } => api::LEAVE_GROUP,
            Request::MemberCommitOffset { .. } => api::MEMBER_COMMIT_OFFSET,
        }
    }

    /// Encodes a whole request frame.
    pub fn encode(&self, correlation_id: u32, client_id: &str) -> Vec<Bytes> {
        let mut w = WireWriter::new();
        let header = RequestHeader {
            api_key: self.api_key(),
            api_version: API_VERSION_V1,
            correlation_id,
            client_id: client_id.to_string(),
        };
        put_request_header(&mut w, &header);
        match self {
            Request::ApiVersions | Request::ListTopics | Request::Stats => {}
            Request::Metadata { topics } => {
                w.u32(u32::try_from(topics.len()).expect("topic lists are bounded by METADATA_TOPICS_MAX"));
                for topic in topics {
                    w.string(topic);
                }
            }
            Request::CreateTopic { name, settings } => {
                w.string(name);
                put_settings(&mut w, settings);
            }
            Request::CreatePriorityTopic { name, lanes, settings } => {
                w.string(name).u8(*lanes);
                put_settings(&mut w, settings);
            }
            Request::ProduceLane { topic, lane, partition, acks, batch } => {
                w.string(topic).u8(*lane).u32(*partition).u8(*acks as u8).bytes(batch.clone());
            }
            Request::PriorityPoll { topic, cursor, max, settings } => {
                w.string(topic).string(cursor).u32(*max);
                w.opt_u64(settings.lease_ms).opt_u64(settings.max_deliveries.map(u64::from));
                w.opt_u64(settings.aging_ms).opt_u64(settings.backoff_base_ms).opt_u64(settings.backoff_max_ms);
            }
            Request::PriorityAck { topic, cursor, lease } => {
                w.string(topic).string(cursor);
                put_lease(&mut w, lease);
            }
            Request::PriorityNack { topic, cursor, lease, delay_ms, reason } => {
                w.string(topic).string(cursor);
                put_lease(&mut w, lease);
                w.opt_u64(*delay_ms).string(reason);
            }
            Request::PriorityExtendLease { topic, cursor, lease, extra_ms } => {
                w.string(topic).string(cursor);
                put_lease(&mut w, lease);
                w.u64(*extra_ms);
            }
            Request::ReplayDlq { topic, partition, from, to } => {
                w.string(topic).u32(*partition).u64(*from).u64(*to);
            }
            Request::PriorityOpen { topic, cursor, options: o } => {
                w.string(topic).string(cursor);
                for weight in o.weights {
                    w.u32(weight);
                }
                w.u64(o.aging_ms).u64(o.lease_ms).u32(o.max_deliveries).u64(o.backoff_base_ms);
                w.u32(o.backoff_factor_milli).u64(o.backoff_max_ms).u32(o.backoff_jitter_milli);
                w.u64(o.backoff_seed).u32(o.max_in_flight);
            }
            Request::PriorityClose { topic, cursor } => {
                w.string(topic).string(cursor);
            }
            Request::JoinGroup { group, member_id, session_timeout_ms, topics } => {
                w.string(group).opt_string(member_id.as_deref()).u32(*session_timeout_ms);
                w.u32(u32::try_from(topics.len()).expect("topic lists are bounded by METADATA_TOPICS_MAX"));
                for topic in topics {
                    w.string(topic);
                }
            }
            Request::GroupHeartbeat { group, member_id } | Request::LeaveGroup { group, member_id } => {
                w.string(group).string(member_id);
            }
            Request::MemberCommitOffset { group, member_id, generation, topic, partition, offset } => {
                w.string(group).string(member_id).u64(*generation).string(topic).u32(*partition).u64(*offset);
            }
            Request::DeleteTopic { name } => {
                w.string(name);
            }
            Request::InitProducerId { transactional_id } => {
                w.opt_string(transactional_id.as_deref());
            }
            Request::Produce { topic, partition, acks, batch } => {
                w.string(topic).u32(*partition).u8(*acks as u8).bytes(batch.clone());
            }
            Request::Fetch { topic, partition, offset, max_bytes, max_wait_ms } => {
                w.string(topic).u32(*partition).u64(*offset).u32(*max_bytes).u32(*max_wait_ms);
            }
            Request::ReplicaFetch { replica_id, topic, partition, leader_epoch, offset, max_bytes, max_wait_ms } => {
                w.u32(*replica_id).string(topic).u32(*partition).u32(*leader_epoch).u64(*offset);
                w.u32(*max_bytes).u32(*max_wait_ms);
            }
            Request::EpochEndOffset { topic, partition, epoch } => {
                w.string(topic).u32(*partition).u32(*epoch);
            }
            Request::Leaders => {}
            Request::ListOffsets { topic, partition, query } => {
                let q = match query {
                    OffsetQuery::Earliest => -2,
                    OffsetQuery::Latest => -1,
                    OffsetQuery::Timestamp(t) => *t,
                };
                w.string(topic).u32(*partition).i64(q);
            }
            Request::CommitOffset { group, topic, partition, offset } => {
                w.string(group).string(topic).u32(*partition).u64(*offset);
            }
            Request::FetchOffset { group, topic, partition } => {
                w.string(group).string(topic).u32(*partition);
            }
        }
        w.finish()
    }

    /// Decodes a request body for `api_key` (the header is already read).
    pub fn decode(api_key: u16, mut r: WireReader) -> Result<Request> {
        let request = match api_key {
            api::API_VERSIONS => Request::ApiVersions,
            api::LIST_TOPICS => Request::ListTopics,
            api::STATS => Request::Stats,
            api::METADATA => {
                let count = r.u32("topic count")?;
                if count > METADATA_TOPICS_MAX {
                    return Err(Error::malformed(format!("{count} topics in a metadata request")));
                }
                let topics = (0..count).map(|_| r.string("topic")).collect::<Result<_>>()?;
                Request::Metadata { topics }
            }
            api::CREATE_TOPIC => {
                let name = r.string("topic")?;
                Request::CreateTopic { name, settings: get_settings(&mut r)? }
            }
            api::CREATE_PRIORITY_TOPIC => {
                let name = r.string("topic")?;
                let lanes = r.u8("lanes")?;
                Request::CreatePriorityTopic { name, lanes, settings: get_settings(&mut r)? }
            }
            api::PRODUCE_LANE => {
                let topic = r.string("topic")?;
                let lane = r.u8("lane")?;
                let partition = r.u32("partition")?;
                let acks = get_acks(&mut r)?;
                Request::ProduceLane { topic, lane, partition, acks, batch: r.bytes("batch")? }
            }
            api::PRIORITY_POLL => {
                let topic = r.string("topic")?;
                let cursor = r.string("cursor")?;
                let max = r.u32("max")?;
                let lease_ms = r.opt_u64("lease ms")?;
                let max_deliveries = match r.opt_u64("max deliveries")? {
                    None => None,
                    Some(n) => {
                        Some(u32::try_from(n).map_err(|_| Error::malformed(format!("max deliveries {n} over u32")))?)
                    }
                };
                let settings = PriorityCursorSettings {
                    lease_ms,
                    max_deliveries,
                    aging_ms: r.opt_u64("aging ms")?,
                    backoff_base_ms: r.opt_u64("backoff base ms")?,
                    backoff_max_ms: r.opt_u64("backoff max ms")?,
                };
                Request::PriorityPoll { topic, cursor, max, settings }
            }
            api::PRIORITY_ACK => Request::PriorityAck {
                topic: r.string("topic")?,
                cursor: r.string("cursor")?,
                lease: get_lease(&mut r)?,
            },
            api::PRIORITY_NACK => Request::PriorityNack {
                topic: r.string("topic")?,
                cursor: r.string("cursor")?,
                lease: get_lease(&mut r)?,
                delay_ms: r.opt_u64("delay ms")?,
                reason: r.string("reason")?,
            },
            api::PRIORITY_EXTEND_LEASE => Request::PriorityExtendLease {
                topic: r.string("topic")?,
                cursor: r.string("cursor")?,
                lease: get_lease(&mut r)?,
                extra_ms: r.u64("extra ms")?,
            },
            api::REPLAY_DLQ => Request::ReplayDlq {
                topic: r.string("topic")?,
                partition: r.u32("partition")?,
                from: r.u64("from")?,
                to: r.u64("to")?,
            },
            api::PRIORITY_OPEN => {
                let topic = r.string("topic")?;
                let cursor = r.string("cursor")?;
                let mut weights = [0u32; 4];
                for weight in &mut weights {
                    *weight = r.u32("lane weight")?;
                }
                let options = PriorityCursorOptions {
                    weights,
                    aging_ms: r.u64("aging ms")?,
                    lease_ms: r.u64("lease ms")?,
                    max_deliveries: r.u32("max deliveries")?,
                    backoff_base_ms: r.u64("backoff base ms")?,
                    backoff_factor_milli: r.u32("backoff factor")?,
                    backoff_max_ms: r.u64("backoff max ms")?,
                    backoff_jitter_milli: r.u32("backoff jitter")?,
                    backoff_seed: r.u64("backoff seed")?,
                    max_in_flight: r.u32("max in flight")?,
                };
                Request::PriorityOpen { topic, cursor, options }
            }
            api::PRIORITY_CLOSE => Request::PriorityClose { topic: r.string("topic")?, cursor: r.string("cursor")? },
            api::JOIN_GROUP => {
                let group = r.string("group")?;
                let member_id = r.opt_string("member id")?;
                let session_timeout_ms = r.u32("session timeout")?;
                let count = r.u32("topic count")?;
                if count > METADATA_TOPICS_MAX {
                    return Err(Error::malformed(format!("{count} topics in a join")));
                }
                let topics = (0..count).map(|_| r.string("topic")).collect::<Result<_>>()?;
                Request::JoinGroup { group, member_id, session_timeout_ms, topics }
            }
            api::GROUP_HEARTBEAT => {
                Request::GroupHeartbeat { group: r.string("group")?, member_id: r.string("member id")? }
            }
            api::LEAVE_GROUP => Request::LeaveGroup { group: r.string("group")?, member_id: r.string("member id")? },
            api::MEMBER_COMMIT_OFFSET => Request::MemberCommitOffset {
                group: r.string("group")?,
                member_id: r.string("member id")?,
                generation: r.u64("generation")?,
                topic: r.string("topic")?,
                partition: r.u32("partition")?,
                offset: r.u64("offset")?,
            },
            api::DELETE_TOPIC => Request::DeleteTopic { name: r.string("topic")? },
            api::INIT_PRODUCER_ID => Request::InitProducerId { transactional_id: r.opt_string("transactional id")? },
            api::PRODUCE => {
                let topic = r.string("topic")?;
                let partition = r.u32("partition")?;
                let acks = get_acks(&mut r)?;
                Request::Produce { topic, partition, acks, batch: r.bytes("batch")? }
            }
            api::FETCH => Request::Fetch {
                topic: r.string("topic")?,
                partition: r.u32("partition")?,
                offset: r.u64("offset")?,
                max_bytes: r.u32("max bytes")?,
                max_wait_ms: r.u32("max wait")?,
            },
            api::REPLICA_FETCH => Request::ReplicaFetch {
                replica_id: r.u32("replica id")?,
                topic: r.string("topic")?,
                partition: r.u32("partition")?,
                leader_epoch: r.u32("leader epoch")?,
                offset: r.u64("offset")?,
                max_bytes: r.u32("max bytes")?,
                max_wait_ms: r.u32("max wait")?,
            },
            api::LEADERS => Request::Leaders,
            api::EPOCH_END_OFFSET => Request::EpochEndOffset {
                topic: r.string("topic")?,
                partition: r.u32("partition")?,
                epoch: r.u32("epoch")?,
            },
            api::LIST_OFFSETS => {
                let topic = r.string("topic")?;
                let partition = r.u32("partition")?;
                let query = match r.i64("query")? {
                    -2 => OffsetQuery::Earliest,
                    -1 => OffsetQuery::Latest,
                    t if t >= 0 => OffsetQuery::Timestamp(t),
                    other => return Err(Error::malformed(format!("offset query {other}"))),
                };
                Request::ListOffsets { topic, partition, query }
            }
            api::COMMIT_OFFSET => Request::CommitOffset {
                group: r.string("group")?,
                topic: r.string("topic")?,
                partition: r.u32("partition")?,
                offset: r.u64("offset")?,
            },
            api::FETCH_OFFSET => Request::FetchOffset {
                group: r.string("group")?,
                topic: r.string("topic")?,
                partition: r.u32("partition")?,
            },
            other => {
                return Err(Error::Server {
                    code: ErrorCode::UnknownApi,
                    message: format!("unknown api key {other}"),
                    retry_after_ms: None,
                })
            }
        };
        r.finish("request body")?;
        Ok(request)
    }
}

fn get_acks(r: &mut WireReader) -> Result<Acks> {
    match r.u8("acks")? {
        0 => Ok(Acks::None),
        1 => Ok(Acks::Leader),
        2 => Ok(Acks::All),
        other => Err(Error::malformed(format!("acks {other} is not 0 (none), 1 (leader) or 2 (all)"))),
    }
}

fn put_settings(w: &mut WireWriter, settings: &TopicSettings) {
    w.u32(settings.partitions);
    put_fsync(w, settings.fsync);
    w.opt_u64(settings.segment_size_bytes).opt_u64(settings.retention_bytes).opt_u64(settings.retention_ms);
}

fn get_settings(r: &mut WireReader) -> Result<TopicSettings> {
    let partitions = r.u32("partitions")?;
    let fsync = get_fsync(r)?;
    Ok(TopicSettings {
        partitions,
        fsync,
        segment_size_bytes: r.opt_u64("segment size")?,
        retention_bytes: r.opt_u64("retention bytes")?,
        retention_ms: r.opt_u64("retention ms")?,
    })
}

fn put_lease(w: &mut WireWriter, lease: &LeaseRef) {
    w.u8(lease.lane).u32(lease.partition).u64(lease.offset).u64(lease.lease_id);
}

fn get_lease(r: &mut WireReader) -> Result<LeaseRef> {
    Ok(LeaseRef {
        lane: r.u8("lane")?,
        partition: r.u32("partition")?,
        offset: r.u64("offset")?,
        lease_id: r.u64("lease id")?,
    })
}

fn put_fsync(w: &mut WireWriter, fsync: Option<FsyncPolicy>) {
    match fsync {
        None => w.u8(255).u64(0),
        Some(FsyncPolicy::Always) => w.u8(0).u64(0),
        Some(FsyncPolicy::Interval { interval_ms }) => w.u8(1).u64(interval_ms),
        Some(FsyncPolicy::Never) => w.u8(2).u64(0),
    };
}

fn get_fsync(r: &mut WireReader) -> Result<Option<FsyncPolicy>> {
    let kind = r.u8("fsync kind")?;
    let interval_ms = r.u64("fsync interval")?;
    match kind {
        255 => Ok(None),
        0 => Ok(Some(FsyncPolicy::Always)),
        1 => Ok(Some(FsyncPolicy::Interval { interval_ms })),
        2 => Ok(Some(FsyncPolicy::Never)),
        other => Err(Error::malformed(format!("fsync kind {other}"))),
    }
}

impl Response {
    /// Encodes a successful response frame.
    pub fn encode(&self, correlation_id: u32) -> Vec<Bytes> {
        let mut w = WireWriter::new();
        put_response_header(&mut w, correlation_id, ErrorCode::None);
        match self {
            Response::Empty => {}
            Response::ApiVersions(apis) => {
                w.u16(u16::try_from(apis.len()).expect("api count fits u16"));
                for (key, min, max) in apis {
                    w.u16(*key).u16(*min).u16(*max);
                }
            }
            Response::Metadata(topics) => {
                w.u32(u32::try_from(topics.len()).expect("topic count fits u32"));
                for t in topics {
                    w.string(&t.name);
                    put_fsync(&mut w, Some(t.fsync));
                    w.u64(t.segment_size_bytes).opt_u64(t.retention_bytes).opt_u64(t.retention_ms);
                    w.u32(u32::try_from(t.partitions.len()).expect("partitions fit u32"));
                    for p in &t.partitions {
                        w.u32(p.partition).u64(p.log_start).u64(p.end_offset).u64(p.size_bytes);
                    }
                }
            }
            Response::ListTopics(names) => {
                w.u32(u32::try_from(names.len()).expect("topic count fits u32"));
                for name in names {
                    w.string(name);
                }
            }
            Response::InitProducerId { producer_id, producer_epoch } => {
                w.i64(*producer_id).i16(*producer_epoch);
            }
            Response::Produce { base_offset, last_offset, duplicate } => {
                w.u64(*base_offset).u64(*last_offset).bool(*duplicate);
            }
            Response::Fetch { log_start, end_offset, records } => {
                w.u64(*log_start).u64(*end_offset).bytes(records.clone());
            }
            Response::ReplicaFetch { high_watermark, log_end, records } => {
                w.u64(*high_watermark).u64(*log_end).bytes(records.clone());
            }
            Response::EpochEndOffset { epoch, end_offset } => {
                w.u32(*epoch).u64(*end_offset);
            }
            Response::Leaders { nodes, partitions } => {
                w.u32(u32::try_from(nodes.len()).expect("node count fits u32"));
                for (id, addr) in nodes {
                    w.u32(*id).string(addr);
                }
                w.u32(u32::try_from(partitions.len()).expect("partition count fits u32"));
                for p in partitions {
                    w.string(&p.topic).u32(p.partition).i64(p.leader.map_or(-1, i64::from)).u32(p.leader_epoch);
                }
            }
            Response::Offset(offset) => {
                w.opt_u64(*offset);
            }
            Response::Stats(stats) => {
                w.u32(u32::try_from(stats.len()).expect("stat count fits u32"));
                for (name, value) in stats {
                    w.string(name).u64(*value);
                }
            }
            Response::PriorityDeliveries(deliveries) => {
                w.u32(u32::try_from(deliveries.len()).expect("deliveries are bounded by the poll's max u32"));
                for d in deliveries {
                    put_lease(&mut w, &d.lease);
                    w.u32(d.delivery_count).i64(d.lease_deadline_ms).i64(d.timestamp_ms);
                    w.opt_blob(d.key.as_deref()).opt_blob(d.value.as_deref());
                    w.u32(u32::try_from(d.headers.len()).expect("record headers are bounded by the batch format"));
                    for (key, value) in &d.headers {
                        w.string(key).opt_blob(value.as_deref());
                    }
                }
            }
            Response::Count(n) => {
                w.u64(*n);
            }
            Response::Assignment(a) => {
                w.string(&a.member_id).u64(a.generation).u32(a.members);
                w.u32(u32::try_from(a.partitions.len()).expect("assignments are bounded by the topics' partitions"));
                for (topic, partition) in &a.partitions {
                    w.string(topic).u32(*partition);
                }
            }
        }
        w.finish()
    }

    /// Encodes an error response frame.
    pub fn encode_error(
        correlation_id: u32,
        code: ErrorCode,
        message: &str,
        retry_after_ms: Option<u32>,
    ) -> Vec<Bytes> {
        let mut w = WireWriter::new();
        put_response_header(&mut w, correlation_id, code);
        if code == ErrorCode::Throttled {
            w.u32(retry_after_ms.unwrap_or(0));
        }
        let message = truncate_utf8(message, crate::limits::STRING_LEN_MAX);
        w.string(message);
        w.finish()
    }

    /// Decodes a response frame to a request with `api_key`; error codes become
    /// [`Error::Server`]. Returns the correlation id too.
    pub fn decode(api_key: u16, frame: Bytes) -> Result<(u32, Result<Response>)> {
        let mut r = WireReader::new(frame);
        let correlation_id = r.u32("correlation id")?;
        let code = r.u16("error code")?;
        let code = ErrorCode::from_u16(code).ok_or_else(|| Error::malformed(format!("unknown error code {code}")))?;
        if code != ErrorCode::None {
            let retry_after_ms = if code == ErrorCode::Throttled { Some(r.u32("retry after")?) } else { None };
            let message = r.string("error message")?;
            return Ok((correlation_id, Err(Error::Server { code, message, retry_after_ms })));
        }
        let response = decode_body(api_key, &mut r)?;
        r.finish("response body")?;
        Ok((correlation_id, Ok(response)))
    }
}

fn decode_body(api_key: u16, r: &mut WireReader) -> Result<Response> {
    Ok(match api_key {
        api::CREATE_TOPIC
        | api::DELETE_TOPIC
        | api::COMMIT_OFFSET
        | api::CREATE_PRIORITY_TOPIC
        | api::PRIORITY_ACK
        | api::PRIORITY_NACK
        | api::PRIORITY_OPEN
        | api::PRIORITY_CLOSE
        | api::LEAVE_GROUP
        | api::MEMBER_COMMIT_OFFSET => Response::Empty,
        api::JOIN_GROUP | api::GROUP_HEARTBEAT => {
            let member_id = r.string("member id")?;
            let generation = r.u64("generation")?;
            let members = r.u32("members")?;
            let count = r.u32("partition count")?;
            let mut partitions = Vec::with_capacity(count.min(1024) as usize);
            for _ in 0..count {
                partitions.push((r.string("topic")?, r.u32("partition")?));
            }
            Response::Assignment(GroupAssignment { member_id, generation, members, partitions })
        }
        api::PRIORITY_POLL | api::PRIORITY_EXTEND_LEASE => {
            let count = r.u32("delivery count")?;
            let mut deliveries = Vec::with_capacity(count.min(1024) as usize);
            for _ in 0..count {
                let lease = get_lease(r)?;
                let delivery_count = r.u32("delivery count")?;
                let lease_deadline_ms = r.i64("lease deadline")?;
                let timestamp_ms = r.i64("timestamp")?;
                let key = r.opt_blob("key")?;
                let value = r.opt_blob("value")?;
                let n = r.u32("header count")?;
                let mut headers = Vec::with_capacity(n.min(64) as usize);
                for _ in 0..n {
                    headers.push((r.string("header key")?, r.opt_blob("header value")?));
                }
                deliveries.push(PriorityDelivery {
                    lease,
                    delivery_count,
                    lease_deadline_ms,
                    timestamp_ms,
                    key,
                    value,
                    headers,
                });
            }
            Response::PriorityDeliveries(deliveries)
        }
        api::REPLAY_DLQ => Response::Count(r.u64("count")?),
        api::API_VERSIONS => {
            let count = r.u16("api count")?;
            let apis = (0..count)
                .map(|_| Ok((r.u16("api key")?, r.u16("min version")?, r.u16("max version")?)))
                .collect::<Result<_>>()?;
            Response::ApiVersions(apis)
        }
        api::METADATA => {
            let count = r.u32("topic count")?;
            let mut topics = Vec::with_capacity(count.min(1024) as usize);
            for _ in 0..count {
                let name = r.string("topic")?;
                let fsync = get_fsync(r)?.ok_or_else(|| Error::malformed("topic without fsync policy"))?;
                let segment_size_bytes = r.u64("segment size")?;
                let retention_bytes = r.opt_u64("retention bytes")?;
                let retention_ms = r.opt_u64("retention ms")?;
                let n = r.u32("partition count")?;
                let mut partitions = Vec::with_capacity(n.min(1024) as usize);
                for _ in 0..n {
                    partitions.push(PartitionInfo {
                        partition: r.u32("partition")?,
                        log_start: r.u64("log start")?,
                        end_offset: r.u64("end offset")?,
                        size_bytes: r.u64("size")?,
                    });
                }
                topics.push(TopicDescription {
                    name,
                    fsync,
                    segment_size_bytes,
                    retention_bytes,
                    retention_ms,
                    partitions,
                });
            }
            Response::Metadata(topics)
        }
        api::LIST_TOPICS => {
            let count = r.u32("topic count")?;
            Response::ListTopics((0..count).map(|_| r.string("topic")).collect::<Result<_>>()?)
        }
        api::INIT_PRODUCER_ID => {
            Response::InitProducerId { producer_id: r.i64("producer id")?, producer_epoch: r.i16("epoch")? }
        }
        api::PRODUCE | api::PRODUCE_LANE => Response::Produce {
            base_offset: r.u64("base offset")?,
            last_offset: r.u64("last offset")?,
            duplicate: r.bool("duplicate")?,
        },
        api::FETCH => {
            Response::Fetch { log_start: r.u64("log start")?, end_offset: r.u64("end")?, records: r.bytes("records")? }
        }
        api::REPLICA_FETCH => Response::ReplicaFetch {
            high_watermark: r.u64("high watermark")?,
            log_end: r.u64("log end")?,
            records: r.bytes("records")?,
        },
        api::EPOCH_END_OFFSET => Response::EpochEndOffset { epoch: r.u32("epoch")?, end_offset: r.u64("end offset")? },
        api::LEADERS => {
            let count = r.u32("node count")?;
            if count > LEADERS_NODES_MAX {
                return Err(Error::malformed(format!("{count} nodes, over {LEADERS_NODES_MAX}")));
            }
            let nodes =
                (0..count).map(|_| Ok((r.u32("node id")?, r.string("node address")?))).collect::<Result<_>>()?;
            let count = r.u32("partition count")?;
            let mut partitions = Vec::new();
            for _ in 0..count {
                let topic = r.string("topic")?;
                let partition = r.u32("partition")?;
                let leader = match r.i64("leader")? {
                    -1 => None,
                    id => Some(u32::try_from(id).map_err(|_| Error::malformed(format!("leader {id}")))?),
                };
                partitions.push(PartitionLeader { topic, partition, leader, leader_epoch: r.u32("leader epoch")? });
            }
            Response::Leaders { nodes, partitions }
        }
        api::LIST_OFFSETS | api::FETCH_OFFSET => Response::Offset(r.opt_u64("offset")?),
        api::STATS => {
            let count = r.u32("stat count")?;
            Response::Stats((0..count).map(|_| Ok((r.string("name")?, r.u64("value")?))).collect::<Result<_>>()?)
        }
        other => return Err(Error::malformed(format!("response to unknown api key {other}"))),
    })
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{get_request_header, split_frame};
    use crate::limits::FRAME_SIZE_BYTES_MAX;
    use bytes::BytesMut;

    fn join(chunks: Vec<Bytes>) -> BytesMut {
        let mut buf = BytesMut::new();
        for c in chunks {
            buf.extend_from_slice(&c);
        }
        buf
    }

    const LEASE: LeaseRef = LeaseRef { lane: 2, partition: 1, offset: 40, lease_id: 77 };

    /// Every request kind survives encode → frame split → header → decode.
    #[test]
    fn requests_round_trip() {
        let requests = vec![
            Request::ApiVersions,
            Request::Metadata { topics: vec!["a".into(), "b".into()] },
            Request::CreateTopic {
                name: "t".into(),
                settings: TopicSettings {
                    partitions: 3,
                    fsync: Some(FsyncPolicy::Interval { interval_ms: 5 }),
                    retention_ms: Some(9),
                    ..TopicSettings::default()
                },
            },
            Request::DeleteTopic { name: "t".into() },
            Request::ListTopics,
            Request::InitProducerId { transactional_id: Some("tx".into()) },
            Request::Produce {
                topic: "t".into(),
                partition: 2,
                acks: Acks::Leader,
                batch: Bytes::from(vec![1u8; 10_000]),
            },
            Request::Fetch { topic: "t".into(), partition: 0, offset: 7, max_bytes: 100, max_wait_ms: 5 },
            Request::ListOffsets { topic: "t".into(), partition: 0, query: OffsetQuery::Timestamp(44) },
            Request::CommitOffset { group: "g".into(), topic: "t".into(), partition: 1, offset: 5 },
            Request::FetchOffset { group: "g".into(), topic: "t".into(), partition: 1 },
            Request::ReplicaFetch {
                replica_id: 3,
                topic: "t".into(),
                partition: 2,
                leader_epoch: 9,
                offset: 77,
                max_bytes: 1 << 20,
                max_wait_ms: 500,
            },
            Request::EpochEndOffset { topic: "t".into(), partition: 1, epoch: 4 },
            Request::Leaders,
            Request::Stats,
            Request::CreatePriorityTopic {
                name: "q".into(),
                lanes: 4,
                settings: TopicSettings { partitions: 2, fsync: Some(FsyncPolicy::Always), ..TopicSettings::default() },
            },
            Request::ProduceLane {
                topic: "q".into(),
                lane: 3,
                partition: 1,
                acks: Acks::None,
                batch: Bytes::from(vec![2u8; 5_000]),
            },
            Request::PriorityPoll { topic: "q".into(), cursor: "c".into(), max: 10, settings: Default::default() },
            Request::PriorityPoll {
                topic: "q".into(),
                cursor: "c".into(),
                max: 1,
                settings: PriorityCursorSettings {
                    lease_ms: Some(1),
                    max_deliveries: Some(3),
                    aging_ms: Some(5),
                    backoff_base_ms: Some(6),
                    backoff_max_ms: Some(7),
                },
            },
            Request::PriorityAck { topic: "q".into(), cursor: "c".into(), lease: LEASE },
            Request::PriorityNack {
                topic: "q".into(),
                cursor: "c".into(),
                lease: LEASE,
                delay_ms: Some(0),
                reason: "bad".into(),
            },
            Request::PriorityNack {
                topic: "q".into(),
                cursor: "c".into(),
                lease: LEASE,
                delay_ms: None,
                reason: "".into(),
            },
            Request::PriorityExtendLease { topic: "q".into(), cursor: "c".into(), lease: LEASE, extra_ms: 500 },
            Request::ReplayDlq { topic: "q".into(), partition: 1, from: 2, to: 9 },
            Request::PriorityOpen {
                topic: "q".into(),
                cursor: "c".into(),
                options: PriorityCursorOptions::from_config(&rill_engine::PriorityCursorConfig::default()),
            },
            Request::PriorityClose { topic: "q".into(), cursor: "c".into() },
            Request::JoinGroup {
                group: "g".into(),
                member_id: None,
                session_timeout_ms: 10_000,
                topics: vec!["a".into(), "b".into()],
            },
            Request::JoinGroup {
                group: "g".into(),
                member_id: Some("m".into()),
                session_timeout_ms: 1,
                topics: vec![],
            },
            Request::GroupHeartbeat { group: "g".into(), member_id: "m".into() },
            Request::LeaveGroup { group: "g".into(), member_id: "m".into() },
            Request::MemberCommitOffset {
                group: "g".into(),
                member_id: "m".into(),
                generation: 3,
                topic: "t".into(),
                partition: 2,
                offset: 99,
            },
        ];
        for (i, request) in requests.into_iter().enumerate() {
            let mut buf = join(request.encode(i as u32, "cli"));
            let frame = split_frame(&mut buf, FRAME_SIZE_BYTES_MAX).expect("ok").expect("frame");
            let mut r = WireReader::new(frame);
            let header = get_request_header(&mut r).expect("header");
            assert_eq!(header.correlation_id, i as u32);
            assert_eq!(header.client_id, "cli");
            assert_eq!(Request::decode(header.api_key, r).expect("decodes"), request);
        }
    }

    /// Responses and error responses round-trip; throttling carries its retry delay.
    #[test]
    fn responses_round_trip() {
        let cases = vec![
            (api::PRODUCE, Response::Produce { base_offset: 1, last_offset: 4, duplicate: true }),
            (api::FETCH, Response::Fetch { log_start: 0, end_offset: 9, records: Bytes::from(vec![3u8; 9000]) }),
            (
                api::REPLICA_FETCH,
                Response::ReplicaFetch { high_watermark: 5, log_end: 9, records: Bytes::from(vec![4u8; 300]) },
            ),
            (api::EPOCH_END_OFFSET, Response::EpochEndOffset { epoch: 3, end_offset: 1_000 }),
            (
                api::LEADERS,
                Response::Leaders {
                    nodes: vec![(1, "127.0.0.1:7401".into()), (2, "127.0.0.1:7402".into())],
                    partitions: vec![
                        PartitionLeader { topic: "t".into(), partition: 0, leader: Some(2), leader_epoch: 7 },
                        PartitionLeader { topic: "t".into(), partition: 1, leader: None, leader_epoch: 3 },
                    ],
                },
            ),
            (api::LIST_OFFSETS, Response::Offset(None)),
            (api::STATS, Response::Stats(vec![("x".into(), 3)])),
            (api::LIST_TOPICS, Response::ListTopics(vec!["a".into()])),
            (api::CREATE_PRIORITY_TOPIC, Response::Empty),
            (api::PRODUCE_LANE, Response::Produce { base_offset: 3, last_offset: 3, duplicate: false }),
            (api::PRIORITY_ACK, Response::Empty),
            (api::PRIORITY_NACK, Response::Empty),
            (api::REPLAY_DLQ, Response::Count(12)),
            (api::PRIORITY_OPEN, Response::Empty),
            (api::PRIORITY_CLOSE, Response::Empty),
            (api::LEAVE_GROUP, Response::Empty),
            (api::MEMBER_COMMIT_OFFSET, Response::Empty),
            (
                api::JOIN_GROUP,
                Response::Assignment(GroupAssignment {
                    member_id: "g-1".into(),
                    generation: 4,
                    members: 2,
                    partitions: vec![("a".into(), 0), ("b".into(), 3)],
                }),
            ),
            (
                api::GROUP_HEARTBEAT,
                Response::Assignment(GroupAssignment {
                    member_id: "g-1".into(),
                    generation: 5,
                    members: 1,
                    partitions: vec![],
                }),
            ),
            (api::PRIORITY_POLL, Response::PriorityDeliveries(vec![])),
            (
                api::PRIORITY_POLL,
                Response::PriorityDeliveries(vec![
                    PriorityDelivery {
                        lease: LEASE,
                        delivery_count: 2,
                        lease_deadline_ms: -4,
                        timestamp_ms: 99,
                        key: Some(Bytes::from_static(b"k")),
                        value: Some(Bytes::from(vec![7u8; 10_000])),
                        headers: vec![("a".into(), None), ("b".into(), Some(Bytes::new()))],
                    },
                    PriorityDelivery {
                        lease: LeaseRef { lane: 0, ..LEASE },
                        delivery_count: 1,
                        lease_deadline_ms: 5,
                        timestamp_ms: 0,
                        key: None,
                        value: None,
                        headers: vec![],
                    },
                ]),
            ),
        ];
        for (key, response) in cases {
            let mut buf = join(response.encode(77));
            let frame = split_frame(&mut buf, FRAME_SIZE_BYTES_MAX).expect("ok").expect("frame");
            let (cid, decoded) = Response::decode(key, frame).expect("decodes");
            assert_eq!(cid, 77);
            assert_eq!(decoded.expect("success"), response);
        }
        let mut buf = join(Response::encode_error(5, ErrorCode::Throttled, "slow down", Some(25)));
        let frame = split_frame(&mut buf, FRAME_SIZE_BYTES_MAX).expect("ok").expect("frame");
        match Response::decode(api::PRODUCE, frame).expect("decodes").1 {
            Err(Error::Server { code: ErrorCode::Throttled, retry_after_ms: Some(25), message }) => {
                assert_eq!(message, "slow down")
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
