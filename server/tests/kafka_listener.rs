//! The Kafka listener against a Kafka-protocol client built from the `kafka-protocol` codec:
//! every served api at every served version, idempotent produce (duplicates and gaps, also
//! across a restart), fetch in Kafka's format, consumer-group rounds with commits, and the
//! connection closing for apis rill does not serve. (`scripts/kafka-clients.sh` runs the
//! real kafka-python and librdkafka clients in CI.)

use std::net::SocketAddr;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::api_versions_request::ApiVersionsRequest;
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::leave_group_request::MemberIdentity;
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::offset_commit_request::{OffsetCommitRequestPartition, OffsetCommitRequestTopic};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable, Request, StrBytes};
use kafka_protocol::records::{Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions};
use rill_server::config::ServerConfig;
use rill_server::kafka::SUPPORTED;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct KafkaClient {
    stream: TcpStream,
    correlation: i32,
}

impl KafkaClient {
    async fn connect(addr: SocketAddr) -> Self {
        KafkaClient { stream: TcpStream::connect(addr).await.expect("connect"), correlation: 0 }
    }

    async fn send<R: Request>(&mut self, request: &R, version: i16) {
        let key = ApiKey::try_from(R::KEY).expect("known key");
        let mut header = RequestHeader::default();
        header.request_api_key = R::KEY;
        header.request_api_version = version;
        header.correlation_id = self.correlation;
        header.client_id = Some(StrBytes::from_static_str("rill-test"));
        let mut buf = BytesMut::new();
        buf.put_i32(0);
        header.encode(&mut buf, key.request_header_version(version)).expect("header");
        request.encode(&mut buf, version).expect("request");
        let size = (buf.len() - 4) as i32;
        buf[..4].copy_from_slice(&size.to_be_bytes());
        self.stream.write_all(&buf).await.expect("write");
    }

    /// The next response frame, or `None` if the server closed the connection.
    async fn receive_frame(&mut self) -> Option<Bytes> {
        let size = self.stream.read_i32().await.ok()?;
        let mut body = vec![0u8; size as usize];
        self.stream.read_exact(&mut body).await.ok()?;
        Some(Bytes::from(body))
    }

    async fn call<R: Request>(&mut self, request: &R, version: i16) -> R::Response {
        self.correlation += 1;
        self.send(request, version).await;
        let mut body = self.receive_frame().await.unwrap_or_else(|| panic!("api {} v{version}: closed", R::KEY));
        let key = ApiKey::try_from(R::KEY).expect("known key");
        let header = ResponseHeader::decode(&mut body, key.response_header_version(version)).expect("header");
        assert_eq!(header.correlation_id, self.correlation, "responses in request order");
        let response = R::Response::decode(&mut body, version).expect("response decodes");
        assert!(!body.has_remaining(), "api {} v{version}: trailing bytes", R::KEY);
        response
    }
}

fn name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_string()))
}

fn versions(key: ApiKey) -> std::ops::RangeInclusive<i16> {
    let (_, min, max) = SUPPORTED.iter().find(|(k, _, _)| *k == key).expect("served");
    *min..=*max
}

/// An idempotent batch of `count` records from `producer`, first sequence `sequence`.
fn batch(producer: (i64, i16), sequence: i32, count: i32, tag: &str, compression: Compression) -> Bytes {
    let records: Vec<Record> = (0..count)
        .map(|i| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: 0,
            producer_id: producer.0,
            producer_epoch: producer.1,
            timestamp_type: kafka_protocol::records::TimestampType::Creation,
            offset: i64::from(i),
            sequence: sequence + i,
            timestamp: 1_700_000_000_000 + i64::from(i),
            key: Some(Bytes::from(format!("key-{i}"))),
            value: Some(Bytes::from(format!("{tag}-{}", sequence + i))),
            headers: Default::default(),
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(&mut buf, &records, &RecordEncodeOptions { version: 2, compression }).expect("encode");
    buf.freeze()
}

fn produce_request(topic: &str, partition: i32, records: Bytes) -> ProduceRequest {
    let mut data = PartitionProduceData::default();
    data.index = partition;
    data.records = Some(records);
    let mut topic_data = TopicProduceData::default();
    topic_data.name = name(topic);
    topic_data.partition_data = vec![data];
    let mut request = ProduceRequest::default();
    request.acks = -1;
    request.timeout_ms = 10_000;
    request.topic_data = vec![topic_data];
    request
}

/// (error code, base offset) of the only partition of a produce response.
fn produced(response: &ProduceResponse) -> (i16, i64) {
    let p = &response.responses[0].partition_responses[0];
    if p.error_code != 0 {
        eprintln!("produce error {}: {:?}", p.error_code, p.error_message);
    }
    (p.error_code, p.base_offset)
}

fn fetch_request(topic: &str, partition: i32, offset: i64, max_wait_ms: i32) -> FetchRequest {
    let mut wanted = FetchPartition::default();
    wanted.partition = partition;
    wanted.fetch_offset = offset;
    wanted.partition_max_bytes = 1 << 20;
    let mut fetch_topic = FetchTopic::default();
    fetch_topic.topic = name(topic);
    fetch_topic.partitions = vec![wanted];
    let mut request = FetchRequest::default();
    request.replica_id = BrokerId(-1);
    request.max_wait_ms = max_wait_ms;
    request.min_bytes = 1;
    request.max_bytes = 1 << 24;
    request.topics = vec![fetch_topic];
    request
}

/// Values (as strings) of every record in a fetch response's only partition, with offsets.
fn fetched(response: &FetchResponse) -> (i16, i64, Vec<(i64, String)>) {
    let p = &response.responses[0].partitions[0];
    let mut records = p.records.clone().unwrap_or_default();
    let mut out = Vec::new();
    if records.has_remaining() {
        for set in RecordBatchDecoder::decode_all(&mut records).expect("Kafka batches") {
            for r in set.records {
                out.push((r.offset, String::from_utf8(r.value.expect("value").to_vec()).expect("utf-8")));
            }
        }
    }
    (p.error_code, p.high_watermark, out)
}

fn config(dir: &std::path::Path) -> ServerConfig {
    ServerConfig {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".into(),
        metrics_listen: String::new(),
        kafka_listen: "127.0.0.1:0".into(),
        ..ServerConfig::default()
    }
}

async fn create_topic(client: &mut KafkaClient, topic: &str, partitions: i32, version: i16) -> i16 {
    let mut creatable = CreatableTopic::default();
    creatable.name = name(topic);
    creatable.num_partitions = partitions;
    creatable.replication_factor = 1;
    let mut request = CreateTopicsRequest::default();
    request.topics = vec![creatable];
    request.timeout_ms = 5_000;
    let response = client.call(&request, version).await;
    if response.topics[0].error_code != 0 {
        eprintln!("create error {}: {:?}", response.topics[0].error_code, response.topics[0].error_message);
    }
    response.topics[0].error_code
}

/// Every api at every version the listener announces answers and decodes, with the effects
/// a Kafka client relies on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_at_every_served_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = rill_server::server::start(config(dir.path())).await.expect("start");
    let addr = server.kafka_addr.expect("Kafka listener");
    let mut client = KafkaClient::connect(addr).await;

    for v in versions(ApiKey::ApiVersions) {
        let response = client.call(&ApiVersionsRequest::default(), v).await;
        assert_eq!(response.error_code, 0);
        let produce = response.api_keys.iter().find(|k| k.api_key == 0).expect("Produce listed");
        assert_eq!((produce.min_version, produce.max_version), (3, 9));
    }
    // A newer ApiVersions than served is answered in version 0 with UNSUPPORTED_VERSION.
    client.correlation += 1;
    client.send(&ApiVersionsRequest::default(), 4).await;
    let mut body = client.receive_frame().await.expect("answered");
    ResponseHeader::decode(&mut body, 0).expect("v0 header");
    let response = ApiVersionsResponse::decode(&mut body, 0).expect("v0 body");
    assert_eq!(response.error_code, 35);
    assert_eq!(response.api_keys.len(), SUPPORTED.len());

    for v in versions(ApiKey::CreateTopics) {
        assert_eq!(create_topic(&mut client, &format!("t{v}"), 2, v).await, 0, "CreateTopics v{v}");
    }
    assert_eq!(create_topic(&mut client, "t2", 2, 5).await, 36, "TOPIC_ALREADY_EXISTS");
    assert_eq!(create_topic(&mut client, "bad/name", 2, 5).await, 17, "INVALID_TOPIC_EXCEPTION");
    assert_eq!(create_topic(&mut client, "zero", 0, 5).await, 37, "INVALID_PARTITIONS");

    for v in versions(ApiKey::Metadata) {
        let mut request = MetadataRequest::default();
        let mut wanted = MetadataRequestTopic::default();
        wanted.name = Some(name("t3"));
        let mut missing = MetadataRequestTopic::default();
        missing.name = Some(name("missing"));
        request.topics = Some(vec![wanted, missing]);
        let response = client.call(&request, v).await;
        assert_eq!(response.brokers.len(), 1);
        assert_eq!(response.brokers[0].port, i32::from(addr.port()), "Metadata v{v}");
        assert_eq!(response.topics[0].error_code, 0);
        assert_eq!(response.topics[0].partitions.len(), 2);
        assert!(response.topics[0].partitions.iter().all(|p| p.leader_id.0 == 0 && p.isr_nodes.len() == 1));
        assert_eq!(response.topics[1].error_code, 3, "not created: auto-creation is off by default");
    }

    let mut producers = Vec::new();
    for v in versions(ApiKey::InitProducerId) {
        let mut request = InitProducerIdRequest::default();
        request.transactional_id = Some(TransactionalId(StrBytes::from_static_str("")));
        assert_eq!(client.call(&request, v).await.error_code, 42, "INVALID_REQUEST for an empty transactional id");
        request.transactional_id = None;
        request.transaction_timeout_ms = 60_000;
        let response = client.call(&request, v).await;
        assert_eq!(response.error_code, 0);
        assert!(response.producer_id.0 >= 0);
        producers.push((response.producer_id.0, response.producer_epoch));
    }
    let producer = producers[0];
    // A transactional id: re-initialising bumps the epoch; the older instance, presenting
    // its identity, is PRODUCER_FENCED; its batches are INVALID_PRODUCER_EPOCH.
    let mut init = InitProducerIdRequest::default();
    init.transactional_id = Some(TransactionalId(StrBytes::from_static_str("payments")));
    init.transaction_timeout_ms = 60_000;
    let old = client.call(&init, 4).await;
    let new = client.call(&init, 4).await;
    assert_eq!((new.producer_id, new.producer_epoch), (old.producer_id, old.producer_epoch + 1));
    init.producer_id = old.producer_id;
    init.producer_epoch = old.producer_epoch;
    assert_eq!(client.call(&init, 4).await.error_code, 90, "PRODUCER_FENCED");
    let stale = batch((old.producer_id.0, old.producer_epoch), 0, 1, "f", Compression::None);
    assert_eq!(produced(&client.call(&produce_request("t3", 0, stale), 9).await).0, 47, "INVALID_PRODUCER_EPOCH");
    let unknown_id = batch((1 << 40, 0), 0, 1, "u", Compression::None);
    assert_eq!(produced(&client.call(&produce_request("t3", 0, unknown_id), 9).await).0, 59, "UNKNOWN_PRODUCER_ID");
    let codecs = [Compression::None, Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd];
    let mut sequence = 0;
    let mut expected = Vec::new();
    for (i, v) in versions(ApiKey::Produce).enumerate() {
        let records = batch(producer, sequence, 5, "p", codecs[i % codecs.len()]);
        let response = client.call(&produce_request("t3", 1, records.clone()), v).await;
        assert_eq!(produced(&response), (0, i64::from(sequence)), "Produce v{v}");
        // The same batch again (a retry after a lost response) is not appended twice.
        let retry = client.call(&produce_request("t3", 1, records), v).await;
        assert_eq!(produced(&retry), (0, i64::from(sequence)), "Produce v{v} retry");
        expected.extend((sequence..sequence + 5).map(|s| (i64::from(s), format!("p-{s}"))));
        sequence += 5;
    }
    // Seven batches later, a retry of the first is older than the five remembered.
    let ancient = client.call(&produce_request("t3", 1, batch(producer, 0, 5, "p", codecs[0])), 9).await;
    assert_eq!(produced(&ancient).0, 46, "DUPLICATE_SEQUENCE_NUMBER");
    let gap = client.call(&produce_request("t3", 1, batch(producer, sequence + 3, 1, "p", Compression::None)), 9).await;
    assert_eq!(produced(&gap).0, 45, "OUT_OF_ORDER_SEQUENCE_NUMBER");
    let unknown = client.call(&produce_request("nope", 0, batch((-1, -1), -1, 1, "x", Compression::None)), 9).await;
    assert_eq!(produced(&unknown).0, 3, "UNKNOWN_TOPIC_OR_PARTITION");
    let mut corrupt = BytesMut::from(&batch((-1, -1), -1, 2, "x", Compression::None)[..]);
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0x40;
    let corrupt = client.call(&produce_request("t3", 0, corrupt.freeze()), 9).await;
    assert_eq!(produced(&corrupt).0, 2, "CORRUPT_MESSAGE");

    for v in versions(ApiKey::Fetch) {
        let response = client.call(&fetch_request("t3", 1, 0, 0), v).await;
        let (code, high_watermark, records) = fetched(&response);
        assert_eq!((code, high_watermark), (0, i64::from(sequence)), "Fetch v{v}");
        assert_eq!(records, expected, "Fetch v{v}");
        let beyond = client.call(&fetch_request("t3", 1, i64::from(sequence) + 10, 0), v).await;
        assert_eq!(fetched(&beyond).0, 1, "OFFSET_OUT_OF_RANGE");
    }
    // A long poll at the end is answered when a record arrives.
    let poll = fetch_request("t3", 0, 0, 5_000);
    let mut waiter = KafkaClient::connect(addr).await;
    let long_poll = tokio::spawn(async move { fetched(&waiter.call(&poll, 12).await) });
    let plain = client.call(&produce_request("t3", 0, batch((-1, -1), -1, 1, "late", Compression::None)), 9).await;
    assert_eq!(produced(&plain), (0, 0));
    let (code, _, records) = long_poll.await.expect("long poll");
    assert_eq!((code, records), (0, vec![(0, "late--1".to_string())]));

    for v in versions(ApiKey::ListOffsets) {
        let mut wanted = Vec::new();
        for timestamp in [-2, -1, 1_700_000_000_000, 4_000_000_000_000] {
            let mut p = ListOffsetsPartition::default();
            p.partition_index = 1;
            p.timestamp = timestamp;
            wanted.push(p);
        }
        let mut topic = ListOffsetsTopic::default();
        topic.name = name("t3");
        topic.partitions = wanted;
        let mut request = ListOffsetsRequest::default();
        request.replica_id = BrokerId(-1);
        request.topics = vec![topic];
        let response = client.call(&request, v).await;
        let offsets: Vec<i64> = response.topics[0].partitions.iter().map(|p| p.offset).collect();
        assert_eq!(offsets, vec![0, i64::from(sequence), 0, -1], "ListOffsets v{v}");
    }

    for v in versions(ApiKey::FindCoordinator) {
        let mut request = FindCoordinatorRequest::default();
        request.key = StrBytes::from_static_str("group");
        let response = client.call(&request, v).await;
        assert_eq!((response.error_code, response.node_id.0, response.port), (0, 0, i32::from(addr.port())));
    }

    // One member per group version: join, sync, heartbeat, commit, fetch the commit, leave.
    let commit_versions: Vec<i16> = versions(ApiKey::OffsetCommit).collect();
    let fetch_versions: Vec<i16> = versions(ApiKey::OffsetFetch).collect();
    for (i, v) in versions(ApiKey::JoinGroup).enumerate() {
        let group = GroupId(StrBytes::from_string(format!("g{v}")));
        let mut protocol = JoinGroupRequestProtocol::default();
        protocol.name = StrBytes::from_static_str("range");
        protocol.metadata = Bytes::from_static(b"subscription");
        let mut join = JoinGroupRequest::default();
        join.group_id = group.clone();
        join.session_timeout_ms = 10_000;
        join.rebalance_timeout_ms = if v >= 1 { 10_000 } else { -1 };
        join.protocol_type = StrBytes::from_static_str("consumer");
        join.protocols = vec![protocol];
        let joined = client.call(&join, v).await;
        assert_eq!((joined.error_code, joined.generation_id), (0, 1), "JoinGroup v{v}");
        assert_eq!(joined.leader, joined.member_id);
        assert_eq!(joined.members.len(), 1);
        assert_eq!(joined.members[0].metadata, Bytes::from_static(b"subscription"));
        let member = joined.member_id.clone();
        let small = v.min(3);

        let mut assignment = SyncGroupRequestAssignment::default();
        assignment.member_id = member.clone();
        assignment.assignment = Bytes::from_static(b"t3:0,1");
        let mut sync = SyncGroupRequest::default();
        sync.group_id = group.clone();
        sync.generation_id = 1;
        sync.member_id = member.clone();
        sync.assignments = vec![assignment];
        let synced = client.call(&sync, small).await;
        assert_eq!((synced.error_code, synced.assignment.clone()), (0, Bytes::from_static(b"t3:0,1")));

        let mut heartbeat = HeartbeatRequest::default();
        heartbeat.group_id = group.clone();
        heartbeat.generation_id = 1;
        heartbeat.member_id = member.clone();
        assert_eq!(client.call(&heartbeat, small).await.error_code, 0);
        heartbeat.generation_id = 0;
        assert_eq!(client.call(&heartbeat, small).await.error_code, 22, "ILLEGAL_GENERATION");

        let commit_version = commit_versions[i % commit_versions.len()];
        let mut committed = OffsetCommitRequestPartition::default();
        committed.partition_index = 1;
        committed.committed_offset = 7 + i64::from(v);
        let mut topic = OffsetCommitRequestTopic::default();
        topic.name = name("t3");
        topic.partitions = vec![committed];
        let mut commit = OffsetCommitRequest::default();
        commit.group_id = group.clone();
        commit.generation_id_or_member_epoch = 1;
        commit.member_id = member.clone();
        commit.topics = vec![topic];
        let response = client.call(&commit, commit_version).await;
        assert_eq!(response.topics[0].partitions[0].error_code, 0, "OffsetCommit v{commit_version}");
        commit.generation_id_or_member_epoch = 5;
        let stale = client.call(&commit, commit_version).await;
        assert_eq!(stale.topics[0].partitions[0].error_code, 22, "a stale generation is refused");

        let fetch_version = fetch_versions[i % fetch_versions.len()];
        let mut wanted = OffsetFetchRequestTopic::default();
        wanted.name = name("t3");
        wanted.partition_indexes = vec![0, 1];
        let mut fetch = OffsetFetchRequest::default();
        fetch.group_id = group.clone();
        fetch.topics = Some(vec![wanted]);
        let response = client.call(&fetch, fetch_version).await;
        let offsets: Vec<i64> = response.topics[0].partitions.iter().map(|p| p.committed_offset).collect();
        assert_eq!(offsets, vec![-1, 7 + i64::from(v)], "OffsetFetch v{fetch_version}");

        let mut leave = LeaveGroupRequest::default();
        leave.group_id = group.clone();
        if small >= 3 {
            let mut identity = MemberIdentity::default();
            identity.member_id = member.clone();
            leave.members = vec![identity];
            assert_eq!(client.call(&leave, small).await.members[0].error_code, 0);
        } else {
            leave.member_id = member.clone();
            assert_eq!(client.call(&leave, small).await.error_code, 0);
        }
        heartbeat.generation_id = 1;
        assert_eq!(client.call(&heartbeat, small).await.error_code, 25, "UNKNOWN_MEMBER_ID after leaving");
    }

    for v in versions(ApiKey::DeleteTopics) {
        let doomed = format!("d{v}");
        assert_eq!(create_topic(&mut client, &doomed, 1, 5).await, 0);
        let mut request = DeleteTopicsRequest::default();
        request.topic_names = vec![name(&doomed)];
        request.timeout_ms = 5_000;
        assert_eq!(client.call(&request, v).await.responses[0].error_code, 0, "DeleteTopics v{v}");
        assert_eq!(client.call(&request, v).await.responses[0].error_code, 3, "already gone");
    }

    // Apis rill does not serve that clients try without ApiVersions get an error answer.
    let mut describe = DescribeConfigsRequest::default();
    let mut resource = kafka_protocol::messages::describe_configs_request::DescribeConfigsResource::default();
    resource.resource_type = 2;
    resource.resource_name = StrBytes::from_static_str("t3");
    describe.resources = vec![resource];
    assert_eq!(client.call(&describe, 1).await.results[0].error_code, 35, "UNSUPPORTED_VERSION");
    assert_eq!(client.call(&ListGroupsRequest::default(), 3).await.error_code, 35);
    assert_eq!(client.call(&SaslHandshakeRequest::default(), 1).await.error_code, 33);
    // Any other api closes the connection (as a Kafka broker does), the reason logged.
    client.correlation += 1;
    client.send(&EndTxnRequest::default(), 1).await;
    assert!(client.receive_frame().await.is_none(), "connection closed");
    let mut other = KafkaClient::connect(addr).await;
    other.stream.write_all(&[0, 0, 0, 8, 0x03, 0xe7, 0, 0, 0, 0, 0, 1]).await.expect("write");
    assert!(other.receive_frame().await.is_none(), "unknown api key: closed");
    server.shutdown().await.expect("shutdown");
}

/// What an idempotent Kafka producer and a committing group wrote survives a restart: a
/// retry of the last batch is still recognised, the next sequence is accepted, and the
/// committed offset is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotence_and_commits_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = rill_server::server::start(config(dir.path())).await.expect("start");
    let mut client = KafkaClient::connect(server.kafka_addr.expect("kafka")).await;
    assert_eq!(create_topic(&mut client, "orders", 1, 5).await, 0);
    let mut init = InitProducerIdRequest::default();
    init.transactional_id = None;
    let producer = client.call(&init, 4).await;
    let producer = (producer.producer_id.0, producer.producer_epoch);
    let first = batch(producer, 0, 10, "o", Compression::Zstd);
    let second = batch(producer, 10, 10, "o", Compression::Gzip);
    assert_eq!(produced(&client.call(&produce_request("orders", 0, first), 9).await), (0, 0));
    assert_eq!(produced(&client.call(&produce_request("orders", 0, second.clone()), 9).await), (0, 10));
    let mut committed = OffsetCommitRequestPartition::default();
    committed.committed_offset = 10;
    let mut topic = OffsetCommitRequestTopic::default();
    topic.name = name("orders");
    topic.partitions = vec![committed];
    let mut commit = OffsetCommitRequest::default();
    commit.group_id = GroupId(StrBytes::from_static_str("billing"));
    commit.generation_id_or_member_epoch = -1;
    commit.topics = vec![topic];
    assert_eq!(client.call(&commit, 8).await.topics[0].partitions[0].error_code, 0);
    drop(client);
    server.shutdown().await.expect("shutdown");

    let server = rill_server::server::start(config(dir.path())).await.expect("restart");
    let mut client = KafkaClient::connect(server.kafka_addr.expect("kafka")).await;
    assert_eq!(produced(&client.call(&produce_request("orders", 0, second), 9).await), (0, 10), "still a duplicate");
    let third = batch(producer, 20, 5, "o", Compression::Snappy);
    assert_eq!(produced(&client.call(&produce_request("orders", 0, third), 9).await), (0, 20));
    let mut wanted = OffsetFetchRequestTopic::default();
    wanted.name = name("orders");
    wanted.partition_indexes = vec![0];
    let mut fetch = OffsetFetchRequest::default();
    fetch.group_id = GroupId(StrBytes::from_static_str("billing"));
    fetch.topics = Some(vec![wanted]);
    assert_eq!(client.call(&fetch, 7).await.topics[0].partitions[0].committed_offset, 10);
    let (_, _, records) = fetched(&client.call(&fetch_request("orders", 0, 10, 0), 12).await);
    let values: Vec<String> = records.into_iter().map(|(_, v)| v).collect();
    let expected: Vec<String> = (10..25).map(|s| format!("o-{s}")).collect();
    assert_eq!(values, expected, "resumes at the committed offset, exactly once");
    server.shutdown().await.expect("shutdown");
}

/// Regression (found by the `kafka_records` fuzz target): a request of a few bytes that
/// declares an array of two billion elements made the Kafka decoder ask for tens of
/// gigabytes up front, and the allocator aborted the server. The count is now refused
/// (vendor/kafka-protocol/RILL-PATCH.md): the connection closes, the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_array_lengths_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = rill_server::server::start(config(dir.path())).await.expect("start");
    let addr = server.kafka_addr.expect("kafka");
    for (key, version, flexible) in [(3i16, 1i16, false), (0, 3, false), (3, 12, true), (1, 12, true)] {
        let mut frame = BytesMut::new();
        frame.put_i32(0);
        frame.put_i16(key);
        frame.put_i16(version);
        frame.put_i32(1); // correlation id
        frame.put_i16(-1); // null client id
        if flexible {
            frame.put_u8(0); // no tagged fields in the header
            if key == 1 {
                frame.put_i32(-1); // Fetch: replica id, max wait, min bytes, max bytes
                frame.put_i32(0);
                frame.put_i32(0);
                frame.put_i32(0);
                frame.put_u8(0); // isolation level
                frame.put_i32(0); // session id, epoch
                frame.put_i32(-1);
            }
            frame.put_slice(&[0xff, 0xff, 0xff, 0xff, 0x07]); // compact array of 2^31 − 2
        } else {
            if key == 0 {
                frame.put_i16(-1); // Produce: null transactional id, acks, timeout
                frame.put_i16(1);
                frame.put_i32(1000);
            }
            frame.put_i32(i32::MAX); // array of 2^31 − 1 elements
        }
        frame.put_slice(b"few");
        let size = (frame.len() - 4) as i32;
        frame[..4].copy_from_slice(&size.to_be_bytes());
        let mut client = KafkaClient::connect(addr).await;
        client.stream.write_all(&frame).await.expect("write");
        assert!(client.receive_frame().await.is_none(), "api {key} v{version}: refused, connection closed");
    }
    let mut client = KafkaClient::connect(addr).await;
    assert_eq!(client.call(&ApiVersionsRequest::default(), 3).await.error_code, 0, "still serving");
    server.shutdown().await.expect("shutdown");
}

/// Three nodes in a cluster (in process, controllers on loopback), each with a Kafka
/// listener: Kafka's Metadata from any node lists every broker and names the partition's
/// leader; a produce with acks=-1 to the leader is acknowledged, one to another broker is
/// answered NOT_LEADER_OR_FOLLOWER, as Kafka clients expect when they follow metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_metadata_names_every_broker_and_the_leader() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("tempdir")).collect();
    let ports: Vec<u16> = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port())
        .collect();
    let peers: Vec<String> = ports.iter().enumerate().map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1)).collect();
    let mut nodes = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let config =
            ServerConfig { node_id: i as u32 + 1, peers: peers.clone(), node_timeout_ms: 1_500, ..config(dir.path()) };
        nodes.push(rill_server::server::start(config).await.expect("start node"));
    }
    let kafka: Vec<SocketAddr> = nodes.iter().map(|n| n.kafka_addr.expect("Kafka listener")).collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut client = KafkaClient::connect(kafka[1]).await;
    loop {
        let mut creatable = CreatableTopic::default();
        creatable.name = name("clustered");
        creatable.num_partitions = 1;
        creatable.replication_factor = 3;
        let mut request = CreateTopicsRequest::default();
        request.topics = vec![creatable];
        request.timeout_ms = 5_000;
        if client.call(&request, 5).await.topics[0].error_code == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the cluster takes the topic");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await; // the controller is forming
    }
    let (leader, brokers) = loop {
        let mut request = MetadataRequest::default();
        let mut topic = MetadataRequestTopic::default();
        topic.name = Some(name("clustered"));
        request.topics = Some(vec![topic]);
        let response = client.call(&request, 9).await;
        let partition =
            response.topics[0].partitions.first().map(|p| (p.leader_id.0, p.leader_epoch, p.isr_nodes.len()));
        if let (3, Some((leader, epoch, 3))) = (response.brokers.len(), partition) {
            assert!(epoch >= 1, "leader epochs are reported");
            let brokers: Vec<(i32, i32)> = response.brokers.iter().map(|b| (b.node_id.0, b.port)).collect();
            break (leader, brokers);
        }
        assert!(std::time::Instant::now() < deadline, "metadata names three brokers and a leader: {response:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await; // roles are being applied
    };
    let port_of = |id: i32| brokers.iter().find(|(b, _)| *b == id).map(|(_, port)| *port).expect("broker listed");
    for (i, addr) in kafka.iter().enumerate() {
        assert_eq!(i32::from(addr.port()), port_of(i as i32 + 1), "broker {} is announced at its listener", i + 1);
    }
    let leader_addr = kafka[leader as usize - 1];
    let follower_addr = kafka[if leader == 1 { 1 } else { 0 }];
    let mut to_leader = KafkaClient::connect(leader_addr).await;
    let records = batch((-1, -1), -1, 3, "clustered", Compression::None);
    let (code, offset) = loop {
        let answer = produced(&to_leader.call(&produce_request("clustered", 0, records.clone()), 9).await);
        if answer.0 == 0 || std::time::Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await; // followers are joining the ISR
    };
    assert_eq!((code, offset), (0, 0), "the leader acknowledges acks=-1");
    let mut to_follower = KafkaClient::connect(follower_addr).await;
    let (code, _) = produced(&to_follower.call(&produce_request("clustered", 0, records), 9).await);
    assert_eq!(code, 6, "NOT_LEADER_OR_FOLLOWER from a follower");
    for node in nodes {
        node.shutdown().await.expect("clean shutdown");
    }
}
