//! Priority cursors opened with every setting over the wire, closed on request, and closed by
//! the server when idle — in-process server on a loopback port, real client.

mod common;

use std::time::Duration;

use bytes::Bytes;
use rill_engine::format::batch::BatchBuilder;
use rill_engine::{Compression, FsyncPolicy, PriorityCursorConfig, Record};
use rill_server::client::Client;
use rill_server::config::ServerConfig;
use rill_server::messages::{Acks, PriorityCursorOptions, PriorityCursorSettings, TopicSettings};
use rill_server::{Error, ErrorCode};

const TOPIC: &str = "jobs";
const IDLE_CLOSE_MS: u64 = 300;
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

fn batch(values: &[String]) -> Bytes {
    let mut builder = BatchBuilder::new(Compression::None, 1_700_000_000_000);
    for v in values {
        builder.push(&Record::from_value(v.clone())).expect("push");
    }
    builder.build().expect("build").freeze()
}

fn code(result: Result<impl std::fmt::Debug, Error>) -> ErrorCode {
    match result {
        Err(Error::Server { code, .. }) => code,
        other => panic!("expected a server error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursor_options_close_and_idle_close() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = ServerConfig {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".into(),
        metrics_listen: "127.0.0.1:0".into(),
        priority_cursor_idle_close_ms: IDLE_CLOSE_MS,
        ..ServerConfig::default()
    };
    let server = rill_server::server::start(config).await.expect("start");
    let http = server.metrics_addr.expect("metrics listener");
    let is_open = |page: &str| page.contains("rill_priority_dlq_size{topic=\"jobs\",cursor=\"c\"}");
    let steps = async {
        let client = Client::connect(server.addr, "lifecycle").await.expect("connect");
        let settings = TopicSettings { partitions: 1, fsync: Some(FsyncPolicy::Always), ..TopicSettings::default() };
        client.create_priority_topic(TOPIC, 4, settings).await.expect("create");
        let values: Vec<String> = (0..10).map(|i| format!("job-{i}")).collect();
        client.produce_lane(TOPIC, 0, 0, Acks::Leader, batch(&values)).await.expect("produce");

        // Every setting travels: max_in_flight 3 caps the poll, the lease length shows in the
        // deadline, and the weights are kept.
        let config =
            PriorityCursorConfig { weights: [16, 8, 4, 1], lease_ms: 120_000, max_in_flight: 3, ..Default::default() };
        let options = PriorityCursorOptions::from_config(&config);
        assert_eq!(options.to_config(), config, "factor and jitter survive the wire in thousandths");
        client.priority_open(TOPIC, "c", options.clone()).await.expect("open");
        client.priority_open(TOPIC, "c", options.clone()).await.expect("opening again with the same options");
        let other = PriorityCursorOptions { max_in_flight: 4, ..options.clone() };
        assert_eq!(code(client.priority_open(TOPIC, "c", other).await), ErrorCode::InvalidConfig);
        let bad = PriorityCursorOptions { weights: [0, 1, 1, 1], ..options.clone() };
        assert_eq!(code(client.priority_open(TOPIC, "bad", bad).await), ErrorCode::InvalidConfig);
        let first = client.priority_poll(TOPIC, "c", 10, PriorityCursorSettings::default()).await.expect("poll");
        assert_eq!(first.len(), 3, "max_in_flight from the open bounds the poll");
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
        assert!(first.iter().all(|d| d.lease_deadline_ms > now_ms + 100_000), "lease_ms from the open");
        let changed = PriorityCursorSettings { lease_ms: Some(5), ..Default::default() };
        assert_eq!(code(client.priority_poll(TOPIC, "c", 1, changed).await), ErrorCode::InvalidConfig);

        // Close drops the leases: acking one is refused, and the messages come back.
        client.priority_ack(TOPIC, "c", first[0].lease).await.expect("ack while open");
        client.priority_close(TOPIC, "c").await.expect("close");
        assert_eq!(code(client.priority_ack(TOPIC, "c", first[1].lease).await), ErrorCode::LeaseNotHeld);
        client.priority_close(TOPIC, "c").await.expect("closing a closed cursor is a no-op");
        let again = client.priority_poll(TOPIC, "c", 20, PriorityCursorSettings::default()).await.expect("reopen");
        let values: Vec<Bytes> = again.iter().map(|d| d.value.clone().expect("value")).collect();
        let expected: Vec<Bytes> = (1..10).map(|i| Bytes::from(format!("job-{i}"))).collect();
        assert_eq!(values, expected, "reopened with the defaults: everything but the acked job, in order");
        assert!(again.iter().take(2).all(|d| d.delivery_count == 1), "a close does not count as a failure");

        // Idle with leases held: stays open (its leases still settle after the idle period).
        let wait_past_idle = tokio::time::Instant::now() + Duration::from_millis(3 * IDLE_CLOSE_MS);
        tokio::time::sleep_until(wait_past_idle).await; // lets the idle period pass: what is tested is that nothing closes
        for d in &again {
            client.priority_ack(TOPIC, "c", d.lease).await.expect("leases of an idle cursor are kept");
        }
        // Idle with no lease: closed (it leaves the metrics page), so a different
        // configuration can be opened.
        assert!(is_open(&common::http_get(http, "/metrics").await.1), "open while its leases are held");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while is_open(&common::http_get(http, "/metrics").await.1) {
            assert!(tokio::time::Instant::now() < deadline, "the idle cursor was never closed");
            tokio::time::sleep(Duration::from_millis(50)).await; // polling a condition until the deadline
        }
        client.priority_open(TOPIC, "c", options.clone()).await.expect("a closed cursor opens with new options");
        let rest = client.priority_poll(TOPIC, "c", 10, PriorityCursorSettings::default()).await.expect("poll");
        assert!(rest.is_empty(), "all acked before the idle close: nothing left, got {}", rest.len());
    };
    tokio::time::timeout(TEST_TIMEOUT, steps).await.expect("steps finish in time");
    server.shutdown().await.expect("shutdown");
}
