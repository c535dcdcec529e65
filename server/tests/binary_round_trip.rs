//! The real `rill serve` binary on ephemeral ports, driven through the Rust client
//! (`Client`, `Producer`, `Consumer`): keyed records with headers across partitions,
//! pipelined produces, long polls, offsets by time, consumer-group commits that survive a
//! SIGTERM restart, `/health` and `/metrics`, and the clean-shutdown marker.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{http_get, metric, ServerProcess};
use rill_engine::format::BatchBuilder;
use rill_engine::log::partition::CLEAN_SHUTDOWN_FILE;
use rill_engine::log::partitioner::partition_for_key;
use rill_engine::{Compression, FsyncPolicy, Header, Record};
use rill_server::client::{decode_fetched, Client, ConsumedRecord, Consumer, ProduceAck, Producer, ProducerConfig};
use rill_server::client::{SendReceipt, StartPosition};
use rill_server::messages::{Acks, OffsetQuery, TopicSettings};

/// Bound on the whole test, so that a hang fails instead of stalling the suite.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a step may poll for records it expects.
const POLL_DEADLINE: Duration = Duration::from_secs(20);

/// Proves that the shipped binary serves the client end to end and survives a clean
/// restart: starts `rill serve --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0` on a temp
/// dir, parses both bound addresses from its ready line, runs each step below against it,
/// stops it with SIGTERM while a long poll waits (the poll is answered, the exit status is 0,
/// every partition gets its clean-shutdown marker), restarts it on the same dir and checks that committed group positions and the records
/// are still there and that a consumer resumes at the committed positions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let log = dir.path().join("server.log");
    let mut server = ServerProcess::start(&data, &log, "127.0.0.1:0", "127.0.0.1:0");
    let steps = async {
        let client = Client::connect(server.addr, "round-trip").await.expect("connect");
        keyed_records_with_headers_round_trip(&client).await;
        pipelined_produces_come_back_in_order(&client).await;
        long_poll_waits_for_data_or_max_wait(&client, server.addr).await;
        offsets_by_timestamp(&client).await;
        commit_group_positions(&client).await;
        health_and_metrics(server.http_addr()).await;
    };
    tokio::time::timeout(TEST_TIMEOUT, steps).await.expect("steps before the restart finish in time");
    tokio::time::timeout(TEST_TIMEOUT, shutdown_answers_a_pending_long_poll(&mut server))
        .await
        .expect("graceful shutdown in time");
    assert_clean_shutdown(&data);
    drop(server);

    let mut server = ServerProcess::start(&data, &log, "127.0.0.1:0", "127.0.0.1:0");
    let after_restart = async {
        let client = Client::connect(server.addr, "round-trip-2").await.expect("reconnect after restart");
        resume_from_committed_positions(&client).await;
        let orders = client.metadata(&["orders"]).await.expect("metadata after restart");
        let total: u64 = orders[0].partitions.iter().map(|p| p.end_offset).sum();
        assert_eq!(total, 60, "every record produced before the restart is still there");
    };
    tokio::time::timeout(TEST_TIMEOUT, after_restart).await.expect("steps after the restart finish in time");
    let status = server.terminate();
    assert!(status.success(), "second SIGTERM exits with status 0, got {status}\n{}", server.log());
    assert_clean_shutdown(&data);
}

async fn create(client: &Client, name: &str, partitions: u32) {
    let settings = TopicSettings { partitions, fsync: Some(FsyncPolicy::Always), ..TopicSettings::default() };
    client.create_topic(name, settings).await.unwrap_or_else(|e| panic!("create topic {name}: {e}"));
}

/// Polls `consumer` until it has returned `count` records (bounded by [`POLL_DEADLINE`]).
async fn poll_exactly(consumer: &mut Consumer, count: usize) -> Vec<ConsumedRecord> {
    let deadline = Instant::now() + POLL_DEADLINE;
    let mut out = Vec::new();
    while out.len() < count {
        assert!(Instant::now() < deadline, "only {} of {count} records arrived in time", out.len());
        out.extend(consumer.poll(500).await.expect("poll"));
    }
    assert_eq!(out.len(), count, "no more records than produced");
    out
}

/// A record as sent: key, value, headers.
type Sent = (Option<Bytes>, Bytes, Vec<Header>);

/// Keyed records land in the partition their key hashes to, keyless ones spread over every
/// partition, and each record comes back through a `Consumer` at the offset its receipt
/// named, with its key, value and headers (including a null header value) intact.
async fn keyed_records_with_headers_round_trip(client: &Client) {
    create(client, "orders", 3).await;
    let producer = Producer::new(client.clone(), ProducerConfig::default()).expect("producer");
    let mut sent = Vec::new();
    for i in 0..60u32 {
        let key = (i < 40).then(|| Bytes::from(format!("customer-{}", i % 7)));
        let headers = vec![
            Header { key: "source".into(), value: Some(Bytes::from_static(b"round-trip")) },
            Header { key: "seq".into(), value: Some(Bytes::from(i.to_le_bytes().to_vec())) },
            Header { key: "empty".into(), value: None },
        ];
        let value = Bytes::from(format!("order-{i}"));
        let receipt = producer.send("orders", key.clone(), value.clone(), headers.clone());
        sent.push((key, value, headers, receipt));
    }
    let mut by_position: BTreeMap<(u32, u64), Sent> = BTreeMap::new();
    let mut keyless_partitions = BTreeSet::new();
    for (key, value, headers, receipt) in sent {
        let SendReceipt { partition, offset } = receipt.await.expect("record acknowledged");
        match &key {
            Some(key) => assert_eq!(partition, partition_for_key(key, 3), "key {key:?} goes to its hash partition"),
            None => {
                keyless_partitions.insert(partition);
            }
        }
        assert!(by_position.insert((partition, offset), (key, value, headers)).is_none(), "receipts are distinct");
    }
    producer.close().await;
    assert_eq!(keyless_partitions.len(), 3, "keyless records are spread over every partition");
    let mut consumer = Consumer::new(client.clone(), None, "orders", StartPosition::Earliest).await.expect("consumer");
    for record in poll_exactly(&mut consumer, 60).await {
        let (key, value, headers) =
            by_position.remove(&(record.partition, record.offset)).expect("each record was acknowledged there");
        assert_eq!(record.key, key);
        assert_eq!(record.value, Some(value));
        assert_eq!(record.headers, headers);
    }
    assert!(by_position.is_empty(), "every acknowledged record was consumed");
}

/// Polls every future in index order until all are ready. Each first poll queues its
/// request on the shared connection before the next future is polled, so requests are
/// written in index order and are all in flight together.
async fn join_in_order<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().map(|o| o.expect("every future completed")).collect()
}

fn batch_of(records: &[Record]) -> Bytes {
    let mut builder = BatchBuilder::new(Compression::None, now_ms());
    for record in records {
        builder.push(record).expect("push a record");
    }
    builder.build().expect("build a batch").freeze()
}

fn now_ms() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock after 1970");
    i64::try_from(now.as_millis()).expect("milliseconds fit i64")
}

/// Every record of one partition from offset 0 to its end, read with plain fetches.
async fn read_partition(client: &Client, topic: &str, partition: u32) -> Vec<ConsumedRecord> {
    let mut out = Vec::new();
    let mut position = 0;
    loop {
        let fetched = client.fetch(topic, partition, position, 1 << 20, 0).await.expect("fetch");
        let (records, next) = decode_fetched(partition, position, fetched.records).expect("decode");
        out.extend(records);
        position = next;
        if position >= fetched.end_offset {
            return out;
        }
    }
}

/// 200 produce requests in flight at once on one connection are answered in request
/// order with consecutive offsets, and the log holds them in the order they were sent; then
/// 100 more of two records each, queued by one task with `produce_pipelined`.
async fn pipelined_produces_come_back_in_order(client: &Client) {
    create(client, "pipeline", 1).await;
    let requests: Vec<_> = (0..200)
        .map(|i| client.produce("pipeline", 0, Acks::Leader, batch_of(&[Record::from_value(format!("p{i}"))])))
        .collect();
    let acks = join_in_order(requests).await;
    for (i, ack) in acks.into_iter().enumerate() {
        let ack = ack.expect("produce").expect("acks = leader gets an answer");
        let offset = i as u64;
        assert_eq!(ack, ProduceAck { base_offset: offset, last_offset: offset, duplicate: false }, "request {i}");
    }
    // `produce_pipelined` queues each request before it returns, so one task keeps all of
    // them in flight and awaits the answers afterwards, in any order.
    let mut pending = Vec::new();
    for i in 200..300 {
        let batch = batch_of(&[Record::from_value(format!("p{i}")), Record::from_value(format!("q{i}"))]);
        pending.push(client.produce_pipelined("pipeline", 0, Acks::Leader, batch).await.expect("queued"));
    }
    for (i, ack) in pending.into_iter().enumerate().rev() {
        let ack = ack.await.expect("produce").expect("acks = leader gets an answer");
        let offset = 200 + 2 * i as u64;
        assert_eq!(ack, ProduceAck { base_offset: offset, last_offset: offset + 1, duplicate: false }, "batch {i}");
    }
    let values: Vec<_> = read_partition(client, "pipeline", 0).await.into_iter().map(|r| r.value).collect();
    let mut expected: Vec<_> = (0..200).map(|i| Some(Bytes::from(format!("p{i}")))).collect();
    expected.extend((200..300).flat_map(|i| [Some(Bytes::from(format!("p{i}"))), Some(Bytes::from(format!("q{i}")))]));
    assert_eq!(values, expected);
}

/// A fetch at the end of an empty partition with nobody producing answers empty after
/// about `max_wait_ms`; a fetch at the end with a long `max_wait_ms` answers with the new
/// record as soon as another connection produces it, long before its wait is over.
///
/// Order of events: the long fetch on "poll" is started on its own connection; then the
/// empty long poll on "idle" takes its 300 ms; only then is "poll" produced to. The long
/// fetch comes back with the record, so it was held open by the server while "poll" was
/// empty (answering at once would have returned nothing), and it comes back well before its
/// 30 s wait, so the produce woke it.
async fn long_poll_waits_for_data_or_max_wait(client: &Client, addr: SocketAddr) {
    create(client, "poll", 1).await;
    create(client, "idle", 1).await;
    let poller = Client::connect(addr, "long-poll").await.expect("second connection");
    let poll = tokio::spawn(async move {
        let started = Instant::now();
        let fetched = poller.fetch("poll", 0, 0, 1 << 20, 30_000).await;
        (fetched, started.elapsed())
    });

    let started = Instant::now();
    let empty = client.fetch("idle", 0, 0, 1 << 20, 300).await.expect("empty long poll");
    let waited = started.elapsed();
    assert!(empty.records.is_empty() && empty.end_offset == 0, "nothing to return: {empty:?}");
    assert!(waited >= Duration::from_millis(250), "the server waited max_wait before answering: {waited:?}");
    assert!(waited < Duration::from_secs(5), "the server answered soon after max_wait: {waited:?}");

    assert!(!poll.is_finished(), "the long poll on an empty partition is still waiting");
    client.produce("poll", 0, Acks::Leader, batch_of(&[Record::from_value("wake")])).await.expect("produce");
    let (fetched, waited) = poll.await.expect("poll task");
    let fetched = fetched.expect("long poll");
    let (records, _) = decode_fetched(0, 0, fetched.records).expect("decode");
    assert_eq!(records.len(), 1, "the long poll returned the record produced while it waited");
    assert_eq!(records[0].value.as_deref(), Some(&b"wake"[..]));
    assert!(waited < Duration::from_secs(10), "answered as soon as data arrived, not after 30 s: {waited:?}");
}

/// `ListOffsets` by timestamp finds the first record at or after a chosen time, across
/// single-record batches and inside a multi-record batch; earliest and latest are the log
/// bounds; a time after every record finds nothing; a `Consumer` started at a time reads
/// from there and sees the records' own timestamps.
async fn offsets_by_timestamp(client: &Client) {
    create(client, "timed", 1).await;
    let base = now_ms() - 3_600_000;
    for i in 0..10 {
        let record = Record { timestamp_ms: Some(base + i * 1_000), ..Record::from_value(format!("t{i}")) };
        client.produce("timed", 0, Acks::Leader, batch_of(&[record])).await.expect("produce");
    }
    let tail: Vec<Record> = (10..13)
        .map(|i| Record { timestamp_ms: Some(base + i * 1_000), ..Record::from_value(format!("t{i}")) })
        .collect();
    client.produce("timed", 0, Acks::Leader, batch_of(&tail)).await.expect("produce a multi-record batch");
    let cases = [
        (OffsetQuery::Timestamp(0), Some(0)),
        (OffsetQuery::Timestamp(base), Some(0)),
        (OffsetQuery::Timestamp(base + 2_500), Some(3)),
        (OffsetQuery::Timestamp(base + 9_000), Some(9)),
        (OffsetQuery::Timestamp(base + 10_500), Some(11)),
        (OffsetQuery::Timestamp(base + 12_000), Some(12)),
        (OffsetQuery::Timestamp(base + 12_001), None),
        (OffsetQuery::Earliest, Some(0)),
        (OffsetQuery::Latest, Some(13)),
    ];
    for (query, expected) in cases {
        let found = client.list_offsets("timed", 0, query).await.expect("list offsets");
        assert_eq!(found, expected, "{query:?} (base {base})");
    }
    let start = StartPosition::Timestamp(base + 4_200);
    let mut consumer = Consumer::new(client.clone(), None, "timed", start).await.expect("consumer by time");
    assert_eq!(consumer.positions(), &[5]);
    let records = poll_exactly(&mut consumer, 8).await;
    for (record, i) in records.iter().zip(5i64..) {
        assert_eq!((record.offset, record.timestamp_ms), (i as u64, base + i * 1_000));
    }
}

/// A group's positions are committed through a `Consumer` and read back with
/// `FetchOffset`; the lag gauge is checked in [`health_and_metrics`] and the positions
/// after the restart in [`resume_from_committed_positions`].
async fn commit_group_positions(client: &Client) {
    create(client, "groups", 2).await;
    for partition in 0..2u32 {
        let records: Vec<Record> = (0..10).map(|i| Record::from_value(format!("g{partition}-{i}"))).collect();
        for record in records {
            client.produce("groups", partition, Acks::Leader, batch_of(&[record])).await.expect("produce");
        }
    }
    let mut consumer = Consumer::new(client.clone(), Some("billing".into()), "groups", StartPosition::Committed)
        .await
        .expect("consumer");
    assert_eq!(consumer.positions(), &[0, 0], "no commit yet: the group starts at the log start");
    poll_exactly(&mut consumer, 20).await;
    // Pretend processing stopped part-way through each partition.
    consumer.seek(0, 4).expect("seek partition 0");
    consumer.seek(1, 7).expect("seek partition 1");
    consumer.commit().await.expect("commit");
    assert_eq!(client.fetch_offset("billing", "groups", 0).await.expect("fetch offset"), Some(4));
    assert_eq!(client.fetch_offset("billing", "groups", 1).await.expect("fetch offset"), Some(7));
    assert_eq!(client.fetch_offset("nobody", "groups", 1).await.expect("fetch offset"), None);
}

/// `/health` answers 200 `ok`; `/metrics` carries the documented series with the values
/// this test caused; an unknown path is 404.
async fn health_and_metrics(http: SocketAddr) {
    assert_eq!(http_get(http, "/health").await, (200, "ok\n".to_string()));
    assert_eq!(http_get(http, "/nothing-here").await.0, 404);
    let (status, page) = http_get(http, "/metrics").await;
    assert_eq!(status, 200);
    let expect = |series: &str, expected: f64| {
        assert_eq!(metric(&page, series), Some(expected), "{series}\n{page}");
    };
    expect("rill_produce_records_total{topic=\"orders\"}", 60.0);
    expect("rill_produce_records_total{topic=\"pipeline\"}", 400.0);
    expect("rill_produce_records_total{topic=\"timed\"}", 13.0);
    expect("rill_log_end_offset{topic=\"pipeline\",partition=\"0\"}", 400.0);
    expect("rill_log_start_offset{topic=\"pipeline\",partition=\"0\"}", 0.0);
    expect("rill_consumer_lag{group=\"billing\",topic=\"groups\",partition=\"0\"}", 6.0);
    expect("rill_consumer_lag{group=\"billing\",topic=\"groups\",partition=\"1\"}", 3.0);
    expect("rill_rejected_total{reason=\"oversize\"}", 0.0);
    let at_least = |series: &str, min: f64| {
        let value = metric(&page, series).unwrap_or_else(|| panic!("{series} missing\n{page}"));
        assert!(value >= min, "{series} = {value}, expected at least {min}");
    };
    at_least("rill_requests_total{api=\"produce\"}", 300.0 + 11.0 + 20.0 + 1.0);
    at_least("rill_fetch_requests_total{topic=\"orders\"}", 1.0);
    at_least("rill_produce_bytes_total{topic=\"pipeline\"}", 200.0 * 61.0);
    at_least("rill_log_size_bytes{topic=\"pipeline\",partition=\"0\"}", 200.0 * 61.0);
    at_least("rill_fsync_latency_seconds_count", 1.0);
    at_least("rill_connections_open", 1.0);
    at_least("rill_connections_total", 2.0);
}

/// After the restart the committed positions are still there, and a group consumer starts
/// at them and reads exactly the records after them.
async fn resume_from_committed_positions(client: &Client) {
    assert_eq!(client.fetch_offset("billing", "groups", 0).await.expect("fetch offset"), Some(4));
    assert_eq!(client.fetch_offset("billing", "groups", 1).await.expect("fetch offset"), Some(7));
    let mut consumer = Consumer::new(client.clone(), Some("billing".into()), "groups", StartPosition::Committed)
        .await
        .expect("consumer");
    assert_eq!(consumer.positions(), &[4, 7], "the consumer resumes at the committed positions");
    let mut records = poll_exactly(&mut consumer, 6 + 3).await;
    records.sort_by_key(|r| (r.partition, r.offset));
    let got: Vec<(u32, u64, Option<Bytes>)> = records.into_iter().map(|r| (r.partition, r.offset, r.value)).collect();
    let expected: Vec<(u32, u64, Option<Bytes>)> = (4..10)
        .map(|i| (0, i, Some(Bytes::from(format!("g0-{i}")))))
        .chain((7..10).map(|i| (1, i, Some(Bytes::from(format!("g1-{i}"))))))
        .collect();
    assert_eq!(got, expected);
}

/// SIGTERM answers a long poll that is waiting (with no records, long before its 30 s) and
/// the server exits with status 0. The poll is known to be waiting on the server because a
/// 300 ms long poll on another connection ran between sending it and the signal.
async fn shutdown_answers_a_pending_long_poll(server: &mut ServerProcess) {
    let client = Client::connect(server.addr, "before-shutdown").await.expect("connect");
    let poller = Client::connect(server.addr, "shutdown-poll").await.expect("connect");
    let end = client.list_offsets("idle", 0, OffsetQuery::Latest).await.expect("end offset").expect("an end");
    let poll = tokio::spawn(async move { poller.fetch("idle", 0, end, 1 << 20, 30_000).await });
    let empty = client.fetch("poll", 0, 1, 1 << 20, 300).await.expect("a 300 ms long poll meanwhile");
    assert!(empty.records.is_empty());
    assert!(!poll.is_finished(), "the long poll is waiting on the server");
    let started = Instant::now();
    let status = tokio::task::block_in_place(|| server.terminate());
    assert!(status.success(), "SIGTERM exits with status 0, got {status}\n{}", server.log());
    let answered = poll.await.expect("poll task").expect("the pending long poll is answered, not dropped");
    assert!(answered.records.is_empty(), "no records arrived: {answered:?}");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "shutdown ended the long poll early: {took:?}");
}

/// Every partition of every topic carries the clean-shutdown marker.
fn assert_clean_shutdown(data: &Path) {
    let mut partitions = 0;
    for topic in std::fs::read_dir(data.join("topics")).expect("list topics") {
        let topic = topic.expect("topic entry").path();
        for entry in std::fs::read_dir(&topic).expect("list partitions") {
            let path = entry.expect("partition entry").path();
            if path.is_dir() {
                partitions += 1;
                assert!(path.join(CLEAN_SHUTDOWN_FILE).exists(), "{} has no clean-shutdown marker", path.display());
            }
        }
    }
    assert_eq!(partitions, 3 + 1 + 1 + 1 + 1 + 2, "every partition was checked");
}
