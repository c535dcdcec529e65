//! SIGKILL of the real `rill serve` binary under load from idempotent producers: after any
//! number of crashes and restarts, every acknowledged message is in the log exactly once, at
//! the offset its acknowledgement named, and no message is ever duplicated.

mod common;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{free_port, Rng, ServerProcess, RILL};
use rill_engine::FsyncPolicy;
use rill_server::client::{Client, Consumer, Producer, ProducerConfig, SendReceipt, StartPosition};
use rill_server::messages::TopicSettings;

/// Concurrent producers, each with its own connection and producer id.
const PRODUCERS: usize = 3;
/// Crash-and-restart rounds.
const ROUNDS: usize = 12;
/// Partitions of the topic.
const PARTITIONS: u32 = 3;
/// Messages one producer keeps unacknowledged.
const WINDOW: usize = 200;
/// The whole scenario must finish within this.
const TOTAL_BUDGET: Duration = Duration::from_secs(60);
/// Longest wait for the producers to make progress after a restart.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(20);
const TOPIC: &str = "kill9";

/// What one producer sent: each message id with its receipt or why it failed for good.
type Outcomes = Vec<(String, Result<SendReceipt, String>)>;

/// Proves that a crash never loses or duplicates an acknowledged message: starts the binary
/// on a fixed loopback port (chosen free up front, so producers reconnect to the same
/// address after a restart) with a 3-partition topic under `fsync = always`; runs three
/// idempotent `Producer`s (acks = leader) sending uniquely named messages; then, for each of
/// 12 rounds, waits until the producers have made some seeded amount of progress, waits a
/// seeded random moment more, SIGKILLs the server (`Child::kill`) and restarts it on the
/// same directory and port. The producers retry unacknowledged batches with the same
/// sequence numbers. At the end it reads every partition and checks that each acknowledged
/// message is present exactly once at its acknowledged position, that no message appears
/// twice (failed ones may be absent), and that a clean shutdown leaves a store that
/// `rill inspect` finds undamaged. Seed printed; replay with `RILL_KILL9_SEED`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_sigkill_exactly_once() {
    let started = Instant::now();
    let mut rng = Rng::new(Rng::seed_from_env("RILL_KILL9_SEED"));
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, log) = (dir.path().join("data"), dir.path().join("server.log"));
    let listen = format!("127.0.0.1:{}", free_port());
    let mut server = ServerProcess::start_retrying(&data, &log, &listen, "");
    let addr = server.addr;
    let admin = Client::connect(addr, "kill9-admin").await.expect("connect");
    let settings =
        TopicSettings { partitions: PARTITIONS, fsync: Some(FsyncPolicy::Always), ..TopicSettings::default() };
    admin.create_topic(TOPIC, settings).await.expect("create topic");

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|id| tokio::spawn(produce_until_stopped(addr, id, Arc::clone(&stop), Arc::clone(&acked))))
        .collect();
    for round in 0..ROUNDS {
        wait_for_progress(&acked, rng.range(20, 300), &server).await;
        tokio::time::sleep(Duration::from_millis(rng.range(0, 40))).await; // the random kill moment
        eprintln!("round {round}: SIGKILL after {} acknowledged messages", acked.load(Ordering::Relaxed));
        server = tokio::task::block_in_place(|| {
            server.kill();
            ServerProcess::start_retrying(&data, &log, &listen, "")
        });
        assert_eq!(server.addr, addr, "restarted on the same address");
    }
    wait_for_progress(&acked, 50, &server).await;
    stop.store(true, Ordering::Relaxed);
    let mut outcomes = Outcomes::new();
    for producer in producers {
        outcomes.extend(producer.await.expect("producer task"));
    }
    let log_contents = read_topic(&admin).await;
    check_exactly_once(&outcomes, &log_contents);

    let status = tokio::task::block_in_place(|| server.terminate());
    assert!(status.success(), "clean shutdown after the crashes: {status}\n{}", server.log());
    let inspect = std::process::Command::new(RILL).arg("inspect").arg(&data).output().expect("run rill inspect");
    let report = String::from_utf8_lossy(&inspect.stdout);
    assert!(inspect.status.success(), "rill inspect finds no damage:\n{report}");
    let elapsed = started.elapsed();
    eprintln!("{} messages, {ROUNDS} SIGKILL rounds in {elapsed:?}", outcomes.len());
    assert!(elapsed < TOTAL_BUDGET, "the scenario took {elapsed:?}, over {TOTAL_BUDGET:?}");
}

/// Waits (polling, bounded) until `count` more messages were acknowledged.
async fn wait_for_progress(acked: &AtomicU64, count: u64, server: &ServerProcess) {
    let target = acked.load(Ordering::Relaxed) + count;
    let deadline = Instant::now() + PROGRESS_TIMEOUT;
    while acked.load(Ordering::Relaxed) < target {
        assert!(
            Instant::now() < deadline,
            "producers stalled at {} acknowledged messages (waiting for {target})\n--- server log ---\n{}",
            acked.load(Ordering::Relaxed),
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(5)).await; // polling the acknowledged count
    }
}

/// Sends messages `p{id}-{n}` (keyed by themselves, so spread over the partitions) until
/// `stop`, keeping up to [`WINDOW`] unacknowledged; returns every message's outcome.
async fn produce_until_stopped(addr: SocketAddr, id: usize, stop: Arc<AtomicBool>, acked: Arc<AtomicU64>) -> Outcomes {
    let client = Client::connect(addr, &format!("kill9-producer-{id}")).await.expect("connect");
    // Enough retries (backoff up to 1 s) to ride out a restart; a short request timeout in
    // case a response is lost with the server.
    let config =
        ProducerConfig { linger_ms: 2, max_retries: 40, request_timeout_ms: 5_000, ..ProducerConfig::default() };
    let producer = Producer::new(client, config).expect("producer");
    let mut pending = VecDeque::new();
    let mut outcomes = Outcomes::new();
    let settle = |(message, receipt): (String, Result<SendReceipt, rill_server::Error>), outcomes: &mut Outcomes| {
        if receipt.is_ok() {
            acked.fetch_add(1, Ordering::Relaxed);
        }
        outcomes.push((message, receipt.map_err(|e| e.to_string())));
    };
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let message = format!("p{id}-{n}");
        n += 1;
        let bytes = Bytes::from(message.clone());
        let receipt = producer.send(TOPIC, Some(bytes.clone()), bytes, Vec::new());
        pending.push_back(async move { (message, receipt.await) });
        if pending.len() >= WINDOW {
            let next = pending.pop_front().expect("the window is full");
            settle(next.await, &mut outcomes);
        }
    }
    producer.flush().await;
    for next in pending {
        settle(next.await, &mut outcomes);
    }
    outcomes
}

/// Every record of the topic: message id by (partition, offset).
async fn read_topic(client: &Client) -> BTreeMap<(u32, u64), String> {
    let mut consumer = Consumer::new(client.clone(), None, TOPIC, StartPosition::Earliest).await.expect("consumer");
    let ends = consumer.end_offsets().to_vec();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut out = BTreeMap::new();
    while consumer.positions().iter().zip(&ends).any(|(position, end)| position < end) {
        assert!(Instant::now() < deadline, "read the whole topic in time");
        for record in consumer.poll(100).await.expect("poll") {
            let value = String::from_utf8(record.value.expect("a value").to_vec()).expect("UTF-8 message id");
            out.insert((record.partition, record.offset), value);
        }
    }
    out
}

/// Each acknowledged message is at its acknowledged position and nowhere else; no message
/// appears twice.
fn check_exactly_once(outcomes: &Outcomes, log: &BTreeMap<(u32, u64), String>) {
    let mut copies: BTreeMap<&str, Vec<(u32, u64)>> = BTreeMap::new();
    for (position, message) in log {
        copies.entry(message.as_str()).or_default().push(*position);
    }
    let duplicated: Vec<_> = copies.iter().filter(|(_, positions)| positions.len() > 1).take(10).collect();
    assert!(duplicated.is_empty(), "messages in the log more than once: {duplicated:?}");
    let (mut acknowledged, mut failed, mut failed_but_present) = (0, 0, 0);
    for (message, outcome) in outcomes {
        match outcome {
            Ok(SendReceipt { partition, offset }) => {
                acknowledged += 1;
                let found = log.get(&(*partition, *offset));
                assert_eq!(found, Some(message), "{message} acknowledged at {partition}/{offset}");
            }
            Err(why) => {
                failed += 1;
                if copies.contains_key(message.as_str()) {
                    failed_but_present += 1;
                }
                eprintln!("{message} failed for good: {why}");
            }
        }
    }
    let sent: BTreeSet<&str> = outcomes.iter().map(|(message, _)| message.as_str()).collect();
    let unknown: Vec<_> = copies.keys().filter(|m| !sent.contains(*m)).take(10).collect();
    assert!(unknown.is_empty(), "the log holds messages nobody sent: {unknown:?}");
    eprintln!(
        "{acknowledged} acknowledged, {failed} failed ({failed_but_present} of them in the log anyway), {} records",
        log.len()
    );
    assert!(acknowledged > 0);
}
