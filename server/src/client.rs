//! Async client of protocol v1 (normative: `docs/protocol.md`): [`Client`] sends single
//! requests, [`Producer`] batches records and retries idempotently, [`Consumer`] reads a
//! topic.
//!
//! It owns: one TCP connection per client (re-opened on the next request after it drops),
//! pipelining (many requests in flight, responses matched first-in first-out and checked
//! by correlation id), client-side batching, partitioning and retries.
//! It must never: reorder requests on a connection, or retry a produce with anything but the
//! same encoded batch (that is what lets the server recognise a retry and answer it with the
//! original offsets).

mod connection;
mod consumer;
mod producer;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use rill_engine::ProducerIdentity;
use tokio::net::{lookup_host, ToSocketAddrs};

use crate::error::{Error, ErrorCode, Result};
use crate::limits::{FRAME_SIZE_BYTES_MAX, METADATA_TOPICS_MAX, STRING_LEN_MAX};
use crate::messages::{
    Acks, GroupAssignment, LeaseRef, OffsetQuery, PriorityCursorOptions, PriorityCursorSettings, PriorityDelivery,
    Request, Response, TopicDescription, TopicSettings,
};

use connection::Connection;
pub(crate) use connection::ResponseFuture;
pub use consumer::{decode_fetched, ConsumedRecord, Consumer, StartPosition, POLL_WAIT_MS_MIN};
pub use producer::{Producer, ProducerConfig, SendReceipt, PRODUCER_INFLIGHT_BATCHES_MAX};

/// How long opening a connection may take before the attempt fails.
pub const CONNECT_TIMEOUT_MS: u64 = 10_000;

/// Requests one client connection keeps outstanding; a further request waits for a
/// response first. Equal to the server's per-connection limit, so a client never makes the
/// server stop reading.
pub const CLIENT_INFLIGHT_REQUESTS_MAX: usize = crate::limits::CONNECTION_INFLIGHT_REQUESTS_MAX;

/// Where a produce request landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProduceAck {
    /// Offset of the batch's first record.
    pub base_offset: u64,
    /// Offset of the batch's last record.
    pub last_offset: u64,
    /// The batch was a retry of one already in the log, answered with its original offsets.
    pub duplicate: bool,
}

/// What a fetch returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// First offset the partition holds.
    pub log_start: u64,
    /// Next offset to be written (high watermark).
    pub end_offset: u64,
    /// Whole record batches as stored; decode them with `rill_engine::format::BatchIter`.
    pub records: Bytes,
}

/// A connection to a rill server. Cheap to clone: clones share the connection, and requests
/// from all of them are pipelined on it. If the connection drops, requests in flight fail
/// with [`Error::ConnectionClosed`] and the next request opens a new one.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<ClientInner>,
}

#[derive(Debug)]
struct ClientInner {
    addrs: Vec<SocketAddr>,
    client_id: String,
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
    /// Where partition leaders are, in a cluster.
    routing: tokio::sync::Mutex<Routing>,
    /// Set by an answer `NotLeader`: the routes are refreshed before the next request.
    routes_stale: Arc<std::sync::atomic::AtomicBool>,
}

/// The client's view of a cluster: requests for a partition go to its leader.
#[derive(Debug, Default)]
struct Routing {
    /// `None` until a `NotLeader` answer made the client ask; `Some(false)` on a single node.
    cluster: Option<bool>,
    /// Never route (`Client::connect_unrouted`).
    unrouted: bool,
    leaders: std::collections::HashMap<(String, u32), SocketAddr>,
    connections: std::collections::HashMap<SocketAddr, Arc<Connection>>,
    refreshed: Option<std::time::Instant>,
}

/// Shortest time between two refreshes of the routes for a partition they lack.
const ROUTES_REFRESH_MIN: std::time::Duration = std::time::Duration::from_millis(100);

/// The partition a request is about, for requests a partition's leader must answer.
fn routed_partition(request: &Request) -> Option<(&str, u32)> {
    match request {
        Request::Produce { topic, partition, .. }
        | Request::Fetch { topic, partition, .. }
        | Request::ListOffsets { topic, partition, .. } => Some((topic, *partition)),
        _ => None,
    }
}

impl Client {
    /// Resolves `addr` and connects (with `TCP_NODELAY`). `client_id` names this client in
    /// the server's logs and metrics.
    pub async fn connect(addr: impl ToSocketAddrs, client_id: &str) -> Result<Client> {
        check_string("client id", client_id)?;
        let addrs: Vec<SocketAddr> =
            lookup_host(addr).await.map_err(|source| Error::io("resolve server address", source))?.collect();
        if addrs.is_empty() {
            return Err(Error::Config { reason: "the server address resolves to no socket address".into() });
        }
        let connection = Connection::open(&addrs, client_id).await?;
        Ok(Client {
            inner: Arc::new(ClientInner {
                addrs,
                client_id: client_id.to_string(),
                connection: tokio::sync::Mutex::new(Some(connection)),
                routing: tokio::sync::Mutex::new(Routing::default()),
                routes_stale: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            }),
        })
    }

    /// Like [`Client::connect`], but every request goes to this node, also in a cluster
    /// (no routing to partition leaders): for tools and tests that address one node.
    pub async fn connect_unrouted(addr: impl ToSocketAddrs, client_id: &str) -> Result<Client> {
        let client = Client::connect(addr, client_id).await?;
        client.inner.routing.lock().await.unrouted = true;
        Ok(client)
    }

    /// The connection for `topic`/`partition`: its leader's in a cluster, else the client's
    /// own. The routes are learned from `Leaders` only once a node has answered `NotLeader`
    /// (so a single node never sees the request), and refreshed after each later one.
    async fn partition_connection(&self, topic: &str, partition: u32) -> Result<Arc<Connection>> {
        let mut routing = self.inner.routing.lock().await;
        let never_asked = routing.cluster.is_none();
        let quiet = !self.inner.routes_stale.load(std::sync::atomic::Ordering::Relaxed);
        if routing.unrouted || ((never_asked || routing.cluster == Some(false)) && quiet) {
            drop(routing);
            return self.connection().await;
        }
        let key = (topic.to_string(), partition);
        let stale = self.inner.routes_stale.swap(false, std::sync::atomic::Ordering::Relaxed);
        let missing = routing.cluster == Some(true) && !routing.leaders.contains_key(&key);
        let may_refresh = routing.refreshed.is_none_or(|at| at.elapsed() >= ROUTES_REFRESH_MIN);
        if (stale || missing) && may_refresh {
            self.refresh_routes(&mut routing).await;
        }
        let Some(&addr) = routing.leaders.get(&key).filter(|_| routing.cluster == Some(true)) else {
            drop(routing);
            return self.connection().await;
        };
        if let Some(connection) = routing.connections.get(&addr).filter(|c| !c.is_closed()) {
            return Ok(Arc::clone(connection));
        }
        let connection = Connection::open(&[addr], &self.inner.client_id).await?;
        routing.connections.insert(addr, Arc::clone(&connection));
        Ok(connection)
    }

    async fn refresh_routes(&self, routing: &mut Routing) {
        routing.refreshed = Some(std::time::Instant::now());
        let answer = async { self.connection().await?.start(Request::Leaders).await?.await };
        match answer.await {
            Ok(Some(Response::Leaders { nodes, partitions })) => {
                routing.cluster = Some(!nodes.is_empty());
                let addrs: std::collections::HashMap<u32, SocketAddr> =
                    nodes.iter().filter_map(|(id, addr)| Some((*id, addr.parse().ok()?))).collect();
                routing.leaders = partitions
                    .into_iter()
                    .filter_map(|p| Some(((p.topic, p.partition), *addrs.get(&p.leader?)?)))
                    .collect();
            }
            // A server without the api (older than replication) is a single node.
            Err(Error::Server { code: ErrorCode::UnknownApi, .. }) => routing.cluster = Some(false),
            // Unreachable for now: keep what is known and try again later.
            _ => {}
        }
    }

    /// The client id sent with every request.
    pub fn client_id(&self) -> &str {
        &self.inner.client_id
    }

    /// The current connection, or a new one if it closed.
    async fn connection(&self) -> Result<Arc<Connection>> {
        let mut slot = self.inner.connection.lock().await;
        if let Some(connection) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(Arc::clone(connection));
        }
        *slot = None;
        let connection = Connection::open(&self.inner.addrs, &self.inner.client_id).await?;
        *slot = Some(Arc::clone(&connection));
        Ok(connection)
    }

    /// Hands `request` to the connection's writer and returns the future of its response.
    /// Requests started one after another by one task are written in that order.
    pub(crate) async fn start(&self, request: Request) -> Result<ResponseFuture> {
        check_request(&request)?;
        let connection = match routed_partition(&request) {
            Some((topic, partition)) => self.partition_connection(topic, partition).await?,
            None => self.connection().await?,
        };
        let flag = Arc::clone(&self.inner.routes_stale);
        Ok(connection.start(request).await?.flag_not_leader(flag))
    }

    /// Sends `request` and waits for its response.
    async fn call(&self, request: Request) -> Result<Response> {
        self.start(request).await?.await?.ok_or_else(|| Error::malformed("the request got no response"))
    }

    /// The `(api key, min version, max version)` of every api the server supports.
    pub async fn api_versions(&self) -> Result<Vec<(u16, u16, u16)>> {
        match self.call(Request::ApiVersions).await? {
            Response::ApiVersions(apis) => Ok(apis),
            other => Err(unexpected(&other)),
        }
    }

    /// Describes `topics`, or every topic when `topics` is empty.
    pub async fn metadata(&self, topics: &[&str]) -> Result<Vec<TopicDescription>> {
        let topics = topics.iter().map(|t| t.to_string()).collect();
        match self.call(Request::Metadata { topics }).await? {
            Response::Metadata(descriptions) => Ok(descriptions),
            other => Err(unexpected(&other)),
        }
    }

    /// Creates a topic.
    pub async fn create_topic(&self, name: &str, settings: TopicSettings) -> Result<()> {
        expect_empty(self.call(Request::CreateTopic { name: name.to_string(), settings }).await?)
    }

    /// Deletes a topic and all its records.
    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        expect_empty(self.call(Request::DeleteTopic { name: name.to_string() }).await?)
    }

    /// Names of all topics.
    pub async fn list_topics(&self) -> Result<Vec<String>> {
        match self.call(Request::ListTopics).await? {
            Response::ListTopics(names) => Ok(names),
            other => Err(unexpected(&other)),
        }
    }

    /// Asks for an idempotent producer identity. With a transactional id, a repeated call
    /// bumps the epoch and fences the previous holder.
    pub async fn init_producer_id(&self, transactional_id: Option<&str>) -> Result<ProducerIdentity> {
        let request = Request::InitProducerId { transactional_id: transactional_id.map(str::to_string) };
        match self.call(request).await? {
            Response::InitProducerId { producer_id, producer_epoch } => {
                Ok(ProducerIdentity { producer_id, producer_epoch })
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Appends one encoded record batch (built with `rill_engine::format::BatchBuilder`).
    /// With [`Acks::None`] nothing is answered: `Ok(None)` once the request is written.
    pub async fn produce(&self, topic: &str, partition: u32, acks: Acks, batch: Bytes) -> Result<Option<ProduceAck>> {
        let request = Request::Produce { topic: topic.to_string(), partition, acks, batch };
        match self.start(request).await?.await? {
            None => Ok(None),
            Some(response) => produce_ack(response).map(Some),
        }
    }

    /// Pipelined [`produce`](Client::produce): the request is queued on the connection when
    /// this returns, and the returned future waits for its answer. Batches started one after
    /// another by one task are appended in that order (one connection, written in order), so
    /// a caller can keep many batches in flight without a task per batch. Not idempotent by
    /// itself: a batch without producer fields that fails in flight may or may not be in the
    /// log.
    pub async fn produce_pipelined(
        &self,
        topic: &str,
        partition: u32,
        acks: Acks,
        batch: Bytes,
    ) -> Result<impl Future<Output = Result<Option<ProduceAck>>> + Send + 'static> {
        let request = Request::Produce { topic: topic.to_string(), partition, acks, batch };
        let response = self.start(request).await?;
        Ok(async move {
            match response.await? {
                None => Ok(None),
                Some(response) => produce_ack(response).map(Some),
            }
        })
    }

    /// Reads whole batches of `topic`/`partition` from `offset`: at most `max_bytes` (but at
    /// least one batch), waiting up to `max_wait_ms` for data if there is none yet.
    pub async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: u32,
        max_wait_ms: u32,
    ) -> Result<Fetched> {
        let request = Request::Fetch { topic: topic.to_string(), partition, offset, max_bytes, max_wait_ms };
        fetched(self.call(request).await?)
    }

    /// A follower's replica fetch (replication): batches from the follower's log end in
    /// its leader epoch.
    pub async fn replica_fetch(
        &self,
        fetch: crate::cluster::ReplicaFetchRequest,
    ) -> Result<crate::cluster::ReplicaData> {
        let request = Request::from(fetch);
        match self.call(request).await? {
            Response::ReplicaFetch { high_watermark, log_end, records } => {
                Ok(crate::cluster::ReplicaData { high_watermark, log_end, records })
            }
            other => Err(unexpected(&other)),
        }
    }

    /// The cluster's nodes (id, client address) and every partition's leader, as the
    /// connected node's controller knows them; both empty on a single node.
    pub async fn leaders(&self) -> Result<(Vec<(u32, String)>, Vec<crate::messages::PartitionLeader>)> {
        match self.call(Request::Leaders).await? {
            Response::Leaders { nodes, partitions } => Ok((nodes, partitions)),
            other => Err(unexpected(&other)),
        }
    }

    /// Where `epoch` ends on the leader of `topic`/`partition`: the largest epoch there not
    /// above it, and its end offset.
    pub async fn epoch_end_offset(&self, topic: &str, partition: u32, epoch: u32) -> Result<(u32, u64)> {
        match self.call(Request::EpochEndOffset { topic: topic.to_string(), partition, epoch }).await? {
            Response::EpochEndOffset { epoch, end_offset } => Ok((epoch, end_offset)),
            other => Err(unexpected(&other)),
        }
    }

    /// The earliest or latest offset of a partition, or the first offset with a timestamp
    /// at or after a time (`None` if no record is that recent).
    pub async fn list_offsets(&self, topic: &str, partition: u32, query: OffsetQuery) -> Result<Option<u64>> {
        offset(self.call(Request::ListOffsets { topic: topic.to_string(), partition, query }).await?)
    }

    /// Commits `offset` (the next offset to read) for a consumer group.
    pub async fn commit_offset(&self, group: &str, topic: &str, partition: u32, offset: u64) -> Result<()> {
        let request = Request::CommitOffset { group: group.to_string(), topic: topic.to_string(), partition, offset };
        expect_empty(self.call(request).await?)
    }

    /// The offset a consumer group committed, if any.
    pub async fn fetch_offset(&self, group: &str, topic: &str, partition: u32) -> Result<Option<u64>> {
        offset(self.call(Request::FetchOffset { group: group.to_string(), topic: topic.to_string(), partition }).await?)
    }

    /// Creates priority topic `name` with `lanes` lanes (topics `name.p0`… and `name.dlq`).
    pub async fn create_priority_topic(&self, name: &str, lanes: u8, settings: TopicSettings) -> Result<()> {
        expect_empty(self.call(Request::CreatePriorityTopic { name: name.to_string(), lanes, settings }).await?)
    }

    /// Appends one encoded batch to lane `lane` (topic `topic.p<lane>`) partition `partition`;
    /// `None` with [`Acks::None`].
    pub async fn produce_lane(
        &self,
        topic: &str,
        lane: u8,
        partition: u32,
        acks: Acks,
        batch: Bytes,
    ) -> Result<Option<ProduceAck>> {
        let request = Request::ProduceLane { topic: topic.to_string(), lane, partition, acks, batch };
        match self.start(request).await?.await? {
            None => Ok(None),
            Some(response) => produce_ack(response).map(Some),
        }
    }

    /// Leases up to `max` messages from priority cursor `cursor` of `topic`, opening it with
    /// `settings` on the server (later polls must pass the same settings).
    pub async fn priority_poll(
        &self,
        topic: &str,
        cursor: &str,
        max: u32,
        settings: PriorityCursorSettings,
    ) -> Result<Vec<PriorityDelivery>> {
        let request = Request::PriorityPoll { topic: topic.to_string(), cursor: cursor.to_string(), max, settings };
        deliveries(self.call(request).await?)
    }

    /// Settles a leased message.
    pub async fn priority_ack(&self, topic: &str, cursor: &str, lease: LeaseRef) -> Result<()> {
        expect_empty(
            self.call(Request::PriorityAck { topic: topic.to_string(), cursor: cursor.to_string(), lease }).await?,
        )
    }

    /// Gives a leased message back: redelivered after `delay_ms` (or the backoff), or
    /// dead-lettered with `reason` after its last allowed delivery.
    pub async fn priority_nack(
        &self,
        topic: &str,
        cursor: &str,
        lease: LeaseRef,
        delay_ms: Option<u64>,
        reason: &str,
    ) -> Result<()> {
        let request = Request::PriorityNack {
            topic: topic.to_string(),
            cursor: cursor.to_string(),
            lease,
            delay_ms,
            reason: reason.to_string(),
        };
        expect_empty(self.call(request).await?)
    }

    /// Extends a lease to now + `extra_ms`; returns the delivery with its new deadline.
    pub async fn priority_extend_lease(
        &self,
        topic: &str,
        cursor: &str,
        lease: LeaseRef,
        extra_ms: u64,
    ) -> Result<PriorityDelivery> {
        let request =
            Request::PriorityExtendLease { topic: topic.to_string(), cursor: cursor.to_string(), lease, extra_ms };
        let mut out = deliveries(self.call(request).await?)?;
        match (out.pop(), out.is_empty()) {
            (Some(delivery), true) => Ok(delivery),
            _ => Err(Error::malformed("a lease extension is answered with exactly one delivery")),
        }
    }

    /// Appends dead letters `from..to` of dead-letter partition `partition` of `topic.dlq`
    /// back to their lanes; returns how many were replayed.
    pub async fn replay_dlq(&self, topic: &str, partition: u32, from: u64, to: u64) -> Result<u64> {
        match self.call(Request::ReplayDlq { topic: topic.to_string(), partition, from, to }).await? {
            Response::Count(n) => Ok(n),
            other => Err(unexpected(&other)),
        }
    }

    /// Opens priority cursor `cursor` of `topic` on the server with every setting in
    /// `options`; later polls may pass no settings. `InvalidConfig` if it is open with others.
    pub async fn priority_open(&self, topic: &str, cursor: &str, options: PriorityCursorOptions) -> Result<()> {
        let request = Request::PriorityOpen { topic: topic.to_string(), cursor: cursor.to_string(), options };
        expect_empty(self.call(request).await?)
    }

    /// Closes priority cursor `cursor` of `topic` on the server; its leases are dropped and
    /// their messages delivered again later.
    pub async fn priority_close(&self, topic: &str, cursor: &str) -> Result<()> {
        expect_empty(self.call(Request::PriorityClose { topic: topic.to_string(), cursor: cursor.to_string() }).await?)
    }

    /// Joins consumer group `group` for `topics` as a new member (`member_id` `None`) or
    /// renews a membership; answers the member's partitions in the new generation.
    pub async fn join_group(
        &self,
        group: &str,
        member_id: Option<&str>,
        session_timeout_ms: u32,
        topics: &[&str],
    ) -> Result<GroupAssignment> {
        let request = Request::JoinGroup {
            group: group.to_string(),
            member_id: member_id.map(str::to_string),
            session_timeout_ms,
            topics: topics.iter().map(|t| t.to_string()).collect(),
        };
        assignment(self.call(request).await?)
    }

    /// Renews a member's session; answers the group's current generation and the member's
    /// partitions in it.
    pub async fn group_heartbeat(&self, group: &str, member_id: &str) -> Result<GroupAssignment> {
        assignment(
            self.call(Request::GroupHeartbeat { group: group.to_string(), member_id: member_id.to_string() }).await?,
        )
    }

    /// Leaves a consumer group now.
    pub async fn leave_group(&self, group: &str, member_id: &str) -> Result<()> {
        expect_empty(
            self.call(Request::LeaveGroup { group: group.to_string(), member_id: member_id.to_string() }).await?,
        )
    }

    /// Commits `offset` as member `member_id` in `generation` (refused with
    /// `StaleGeneration` after a rebalance, `PartitionNotAssigned` for another's partition).
    pub async fn member_commit_offset(
        &self,
        group: &str,
        member_id: &str,
        generation: u64,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<()> {
        let request = Request::MemberCommitOffset {
            group: group.to_string(),
            member_id: member_id.to_string(),
            generation,
            topic: topic.to_string(),
            partition,
            offset,
        };
        expect_empty(self.call(request).await?)
    }

    /// The server's counters, by name.
    pub async fn stats(&self) -> Result<Vec<(String, u64)>> {
        match self.call(Request::Stats).await? {
            Response::Stats(stats) => Ok(stats),
            other => Err(unexpected(&other)),
        }
    }
}

fn unexpected(response: &Response) -> Error {
    Error::malformed(format!("unexpected response {response:?}"))
}

fn expect_empty(response: Response) -> Result<()> {
    match response {
        Response::Empty => Ok(()),
        other => Err(unexpected(&other)),
    }
}

fn assignment(response: Response) -> Result<GroupAssignment> {
    match response {
        Response::Assignment(a) => Ok(a),
        other => Err(unexpected(&other)),
    }
}

fn deliveries(response: Response) -> Result<Vec<PriorityDelivery>> {
    match response {
        Response::PriorityDeliveries(deliveries) => Ok(deliveries),
        other => Err(unexpected(&other)),
    }
}

fn offset(response: Response) -> Result<Option<u64>> {
    match response {
        Response::Offset(offset) => Ok(offset),
        other => Err(unexpected(&other)),
    }
}

pub(crate) fn fetched(response: Response) -> Result<Fetched> {
    match response {
        Response::Fetch { log_start, end_offset, records } => Ok(Fetched { log_start, end_offset, records }),
        other => Err(unexpected(&other)),
    }
}

pub(crate) fn produce_ack(response: Response) -> Result<ProduceAck> {
    match response {
        Response::Produce { base_offset, last_offset, duplicate } => {
            if last_offset < base_offset {
                return Err(Error::malformed(format!("produce answered offsets {base_offset}..={last_offset}")));
            }
            Ok(ProduceAck { base_offset, last_offset, duplicate })
        }
        other => Err(unexpected(&other)),
    }
}

/// Checks what the encoder would otherwise assert: string lengths, list lengths and the
/// frame size. A request that fails here is never sent.
fn check_request(request: &Request) -> Result<()> {
    match request {
        Request::ApiVersions | Request::ListTopics | Request::Stats | Request::Leaders => Ok(()),
        Request::Metadata { topics } => {
            if topics.len() > METADATA_TOPICS_MAX as usize {
                return Err(Error::malformed(format!(
                    "{} topics in one metadata request, over {METADATA_TOPICS_MAX}",
                    topics.len()
                )));
            }
            topics.iter().try_for_each(|t| check_string("topic", t))
        }
        Request::CreateTopic { name, .. } | Request::DeleteTopic { name } => check_string("topic", name),
        Request::InitProducerId { transactional_id } => {
            transactional_id.as_deref().map_or(Ok(()), |id| check_string("transactional id", id))
        }
        Request::Produce { topic, batch, .. } => {
            check_string("topic", topic)?;
            // Header, topic and fields stay far below the 64 KiB slack of FRAME_SIZE_BYTES_MAX.
            let max = FRAME_SIZE_BYTES_MAX - 16 * 1024;
            if batch.len() as u64 > u64::from(max) {
                return Err(Error::FrameTooLarge { len: u32::try_from(batch.len()).unwrap_or(u32::MAX), max });
            }
            Ok(())
        }
        Request::Fetch { topic, .. }
        | Request::ListOffsets { topic, .. }
        | Request::ReplicaFetch { topic, .. }
        | Request::EpochEndOffset { topic, .. } => check_string("topic", topic),
        Request::CommitOffset { group, topic, .. } | Request::FetchOffset { group, topic, .. } => {
            check_string("group", group)?;
            check_string("topic", topic)
        }
        Request::CreatePriorityTopic { name, .. } => check_string("topic", name),
        Request::ProduceLane { topic, batch, .. } => check_request(&Request::Produce {
            topic: topic.clone(),
            partition: 0,
            acks: Acks::Leader,
            batch: batch.clone(),
        }),
        Request::PriorityPoll { topic, cursor, .. }
        | Request::PriorityAck { topic, cursor, .. }
        | Request::PriorityExtendLease { topic, cursor, .. } => {
            check_string("topic", topic)?;
            check_string("cursor", cursor)
        }
        Request::PriorityNack { topic, cursor, reason, .. } => {
            check_string("topic", topic)?;
            check_string("cursor", cursor)?;
            check_string("reason", reason)
        }
        Request::ReplayDlq { topic, .. } => check_string("topic", topic),
        Request::PriorityOpen { topic, cursor, .. } | Request::PriorityClose { topic, cursor } => {
            check_string("topic", topic)?;
            check_string("cursor", cursor)
        }
        Request::JoinGroup { group, member_id, topics, .. } => {
            check_string("group", group)?;
            member_id.as_deref().map_or(Ok(()), |id| check_string("member id", id))?;
            if topics.len() > METADATA_TOPICS_MAX as usize {
                return Err(Error::malformed(format!(
                    "{} topics in one join, over {METADATA_TOPICS_MAX}",
                    topics.len()
                )));
            }
            topics.iter().try_for_each(|t| check_string("topic", t))
        }
        Request::GroupHeartbeat { group, member_id } | Request::LeaveGroup { group, member_id } => {
            check_string("group", group)?;
            check_string("member id", member_id)
        }
        Request::MemberCommitOffset { group, member_id, topic, .. } => {
            check_string("group", group)?;
            check_string("member id", member_id)?;
            check_string("topic", topic)
        }
    }
}

fn check_string(what: &str, value: &str) -> Result<()> {
    if value.len() > STRING_LEN_MAX {
        return Err(Error::malformed(format!("{what} of {} bytes is over {STRING_LEN_MAX}", value.len())));
    }
    Ok(())
}

/// A copy of `error` for the second and later requests that fail for the same reason (the
/// error type holds sources that cannot be cloned; their text is kept).
pub(crate) fn clone_error(error: &Error) -> Error {
    match error {
        Error::Protocol { reason } => Error::Protocol { reason: reason.clone() },
        Error::FrameTooLarge { len, max } => Error::FrameTooLarge { len: *len, max: *max },
        Error::Server { code, message, retry_after_ms } => {
            Error::Server { code: *code, message: message.clone(), retry_after_ms: *retry_after_ms }
        }
        Error::Io { op, source } => Error::Io { op, source: std::io::Error::new(source.kind(), source.to_string()) },
        Error::Config { reason } => Error::Config { reason: reason.clone() },
        Error::ConnectionClosed => Error::ConnectionClosed,
        Error::Timeout { what, timeout_ms } => Error::Timeout { what, timeout_ms: *timeout_ms },
        other => Error::malformed(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests whose fields the encoder would reject by assertion are refused before they
    /// are written, with an error instead of a panic.
    #[test]
    fn oversized_fields_are_refused_before_encoding() {
        let long = "x".repeat(STRING_LEN_MAX + 1);
        assert!(check_request(&Request::DeleteTopic { name: long.clone() }).is_err());
        assert!(check_request(&Request::FetchOffset { group: long, topic: "t".into(), partition: 0 }).is_err());
        assert!(check_request(&Request::Metadata { topics: vec![String::new(); METADATA_TOPICS_MAX as usize + 1] })
            .is_err());
        let batch = Bytes::from(vec![0u8; FRAME_SIZE_BYTES_MAX as usize]);
        let produce = Request::Produce { topic: "t".into(), partition: 0, acks: Acks::Leader, batch };
        assert!(matches!(check_request(&produce), Err(Error::FrameTooLarge { .. })));
        assert!(check_request(&Request::DeleteTopic { name: "x".repeat(STRING_LEN_MAX) }).is_ok());
    }

    /// Cloned errors keep their kind and fields, so each failed request can be told why.
    #[test]
    fn clone_error_keeps_kind() {
        let e =
            Error::Server { code: crate::error::ErrorCode::Throttled, message: "slow".into(), retry_after_ms: Some(3) };
        assert!(matches!(clone_error(&e), Error::Server { retry_after_ms: Some(3), .. }));
        assert!(matches!(clone_error(&Error::ConnectionClosed), Error::ConnectionClosed));
        let io = Error::io("read", std::io::Error::new(std::io::ErrorKind::BrokenPipe, "gone"));
        assert!(
            matches!(clone_error(&io), Error::Io { source, .. } if source.kind() == std::io::ErrorKind::BrokenPipe)
        );
    }
}
