//! Priority topics end to end against the real `rill` binary: lanes, acks, nacks into the
//! dead-letter topic, replay, and the cursor's durable state across a SIGTERM restart.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::{http_get, metric, ServerProcess, RILL};
use rill_engine::format::BatchBuilder;
use rill_engine::{Compression, Record};
use rill_server::client::{decode_fetched, Client};
use rill_server::messages::{Acks, PriorityCursorSettings, PriorityDelivery, TopicSettings};
use rill_server::ErrorCode;

const TEST_TIMEOUT: Duration = Duration::from_secs(120);
const TOPIC: &str = "jobs";
const CURSOR: &str = "workers";

fn settings() -> PriorityCursorSettings {
    PriorityCursorSettings { max_deliveries: Some(3), ..PriorityCursorSettings::default() }
}

fn batch_of(values: &[String]) -> Bytes {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock after 1970");
    let now_ms = i64::try_from(now.as_millis()).expect("milliseconds fit i64");
    let mut builder = BatchBuilder::new(Compression::None, now_ms);
    for value in values {
        builder.push(&Record::from_value(value.clone())).expect("push a record");
    }
    builder.build().expect("build a batch").freeze()
}

fn value(d: &PriorityDelivery) -> String {
    String::from_utf8(d.value.clone().expect("every test record has a value").to_vec()).expect("utf-8 value")
}

async fn poll(client: &Client, max: u32) -> Vec<PriorityDelivery> {
    client.priority_poll(TOPIC, CURSOR, max, settings()).await.expect("priority poll")
}

/// Lane 0 goes first; acks settle; a message nacked `max_deliveries` times lands in the DLQ
/// with its metadata, is replayed to its lane and acked; after a SIGTERM restart exactly the
/// unsettled messages come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_flow() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let log = dir.path().join("server.log");
    let mut server = ServerProcess::start(&data, &log, "127.0.0.1:0", "127.0.0.1:0");
    let metrics_addr = server.metrics_addr.expect("metrics listener");
    let before = async {
        let client = Client::connect(server.addr, "priority").await.expect("connect");
        let topic = TopicSettings { partitions: 1, ..TopicSettings::default() };
        client.create_priority_topic(TOPIC, 4, topic.clone()).await.expect("create priority topic");
        let again = client.create_priority_topic(TOPIC, 4, topic).await.expect_err("second create fails");
        assert_eq!(again.code(), ErrorCode::TopicExists);

        let low: Vec<String> = (0..20).map(|i| format!("low-{i}")).collect();
        let high: Vec<String> = (0..3).map(|i| format!("high-{i}")).collect();
        let ack = client.produce_lane(TOPIC, 3, 0, Acks::Leader, batch_of(&low)).await.expect("produce p3");
        assert_eq!(ack.map(|a| (a.base_offset, a.last_offset)), Some((0, 19)));
        client.produce_lane(TOPIC, 0, 0, Acks::Leader, batch_of(&high)).await.expect("produce p0");

        // p0 is strictly preferred while p3 has not aged.
        let first = poll(&client, 3).await;
        assert_eq!(first.iter().map(|d| d.lease.lane).collect::<Vec<_>>(), [0, 0, 0]);
        assert_eq!(first.iter().map(value).collect::<Vec<_>>(), high);
        for d in &first {
            assert_eq!(d.delivery_count, 1);
            client.priority_ack(TOPIC, CURSOR, d.lease).await.expect("ack p0");
        }
        let stale = client.priority_ack(TOPIC, CURSOR, first[0].lease).await.expect_err("second ack fails");
        assert_eq!(stale.code(), ErrorCode::LeaseNotHeld);

        // Lease all of p3; settle offsets 0..10.
        let rest = poll(&client, 100).await;
        assert_eq!(
            rest.iter().map(|d| (d.lease.lane, d.lease.offset)).collect::<Vec<_>>(),
            (0..20).map(|o| (3, o)).collect::<Vec<_>>()
        );
        assert_eq!(rest.iter().map(value).collect::<Vec<_>>(), low);
        for d in &rest[..10] {
            client.priority_ack(TOPIC, CURSOR, d.lease).await.expect("ack p3");
        }
        let extended = client.priority_extend_lease(TOPIC, CURSOR, rest[11].lease, 60_000).await.expect("extend");
        assert_eq!(extended.lease, rest[11].lease);
        assert!(extended.lease_deadline_ms >= rest[11].lease_deadline_ms);

        // Queue metrics: p3 has 10 leases out, p0 none, nothing dead-lettered yet.
        let (status, page) = http_get(metrics_addr, "/metrics").await;
        assert_eq!(status, 200);
        let series =
            |name: &str, lane: &str| format!("{name}{{topic=\"{TOPIC}\",cursor=\"{CURSOR}\",lane=\"{lane}\"}}");
        assert_eq!(metric(&page, &series("rill_priority_in_flight", "p3")), Some(10.0), "{page}");
        assert_eq!(metric(&page, &series("rill_priority_in_flight", "p0")), Some(0.0));
        let dlq = format!("rill_priority_dlq_size{{topic=\"{TOPIC}\",cursor=\"{CURSOR}\"}}");
        assert_eq!(metric(&page, &dlq), Some(0.0));

        // Offset 10 fails three times (max_deliveries) and is dead-lettered.
        let mut lease = rest[10].lease;
        for attempt in 1..=3u32 {
            client.priority_nack(TOPIC, CURSOR, lease, Some(0), "boom").await.expect("nack");
            let again = poll(&client, 10).await;
            if attempt < 3 {
                assert_eq!(again.len(), 1, "attempt {attempt}: the nacked message is redelivered");
                assert_eq!((again[0].lease.offset, again[0].delivery_count), (10, attempt + 1));
                lease = again[0].lease;
            } else {
                assert!(again.is_empty(), "dead-lettered, not redelivered: {again:?}");
            }
        }
        let fetched = client.fetch("jobs.dlq", 0, 0, 1 << 20, 0).await.expect("fetch dlq");
        let (letters, _) = decode_fetched(0, 0, fetched.records).expect("decode dlq");
        assert_eq!(letters.len(), 1);
        let header = |key: &str| {
            let h = letters[0].headers.iter().find(|h| h.key == key).unwrap_or_else(|| panic!("header {key}"));
            String::from_utf8(h.value.clone().expect("header value").to_vec()).expect("utf-8 header")
        };
        assert_eq!(letters[0].value.as_deref(), Some(&b"low-10"[..]));
        assert_eq!(header("rill.dlq.reason"), "boom");
        assert_eq!(header("rill.dlq.delivery_count"), "3");
        assert_eq!(header("rill.dlq.topic"), TOPIC);
        assert_eq!(header("rill.dlq.lane"), "3");
        assert_eq!(header("rill.dlq.partition"), "0");
        assert_eq!(header("rill.dlq.offset"), "10");

        // Replay it to p3 (a new offset), receive it and ack it.
        assert_eq!(client.replay_dlq(TOPIC, 0, 0, 100).await.expect("replay"), 1);
        let replayed = poll(&client, 10).await;
        assert_eq!(replayed.len(), 1);
        assert_eq!((replayed[0].lease.lane, replayed[0].lease.offset), (3, 20));
        assert_eq!(value(&replayed[0]), "low-10");
        assert!(replayed[0].headers.iter().all(|(k, _)| !k.starts_with("rill.dlq.")));
        client.priority_ack(TOPIC, CURSOR, replayed[0].lease).await.expect("ack replayed");
    };
    tokio::time::timeout(TEST_TIMEOUT, before).await.expect("steps before the restart finish in time");
    let status = server.terminate();
    assert!(status.success(), "SIGTERM exits with status 0, got {status}\n{}", server.log());
    drop(server);

    let mut server = ServerProcess::start(&data, &log, "127.0.0.1:0", "127.0.0.1:0");
    let after = async {
        let client = Client::connect(server.addr, "priority-2").await.expect("reconnect");
        let redelivered = poll(&client, 100).await;
        let offsets: BTreeSet<(u8, u64)> = redelivered.iter().map(|d| (d.lease.lane, d.lease.offset)).collect();
        let expected: BTreeSet<(u8, u64)> = (11..20).map(|o| (3, o)).collect();
        assert_eq!(offsets, expected, "only the unsettled messages come back");
        assert_eq!(redelivered.len(), expected.len());
        assert!(poll(&client, 100).await.is_empty(), "all leased now");
    };
    tokio::time::timeout(TEST_TIMEOUT, after).await.expect("steps after the restart finish in time");
    let status = server.terminate();
    assert!(status.success(), "second SIGTERM exits with status 0, got {status}\n{}", server.log());
}

/// Runs `rill --addr addr args…` with `stdin` as input; panics unless it succeeds; returns
/// its stdout.
fn rill(addr: &str, args: &[&str], stdin: &str) -> String {
    let mut child = Command::new(RILL)
        .arg("--addr")
        .arg(addr)
        .args(args)
        .env_remove("RILL_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rill");
    let mut input = child.stdin.take().expect("stdin is piped");
    input.write_all(stdin.as_bytes()).expect("write stdin");
    drop(input); // end of input
    let output = child.wait_with_output().expect("rill runs");
    let stdout = String::from_utf8(output.stdout).expect("UTF-8 output");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "rill {args:?} failed ({})\nstdout:\n{stdout}\nstderr:\n{stderr}", output.status);
    stdout
}

/// The CLI: `topic create-priority`, `produce --lane`, `consume-priority` (acks by default,
/// so a second run prints nothing; `--nack` gives messages back).
#[test]
fn cli_priority_commands() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server =
        ServerProcess::start(&dir.path().join("data"), &dir.path().join("server.log"), "127.0.0.1:0", "127.0.0.1:0");
    let addr = server.addr.to_string();
    let created = rill(&addr, &["topic", "create-priority", "q", "--lanes", "2", "--partitions", "1"], "");
    assert!(created.contains("created priority topic q with 2 lanes"), "{created}");
    rill(&addr, &["produce", "q", "--lane", "1"], "slow\n");
    rill(&addr, &["produce", "q", "--lane", "0"], "fast\n");
    assert_eq!(rill(&addr, &["consume-priority", "q", "--cursor", "c"], ""), "0\t0\tfast\n1\t0\tslow\n");
    assert_eq!(rill(&addr, &["consume-priority", "q", "--cursor", "c"], ""), "");
    rill(&addr, &["produce", "q", "--lane", "0"], "again\n");
    assert_eq!(rill(&addr, &["consume-priority", "q", "--cursor", "c", "--nack", "--max", "1"], ""), "0\t1\tagain\n");
    let status = server.terminate();
    assert!(status.success(), "SIGTERM exits with status 0, got {status}\n{}", server.log());
}
