//! Three real `rill serve` processes on loopback form a cluster (`--node-id`, `--peers`: the
//! openraft controller assigns partitions, elects leaders, tracks the ISR). An idempotent
//! producer writes with `acks = all` while a consumer reads below the high watermark; the
//! test SIGKILLs the partition's leader (as the nodes' `Leaders` answers with the newest
//! epoch name it) in even rounds and a follower in odd ones, waits until writes are
//! acknowledged again, and restarts it, for `RILL_CLUSTER_KILL9_ROUNDS` rounds
//! (default 20) at seeded random moments.
//!
//! Checked at the end, on the leader's log: every acknowledged record is present exactly
//! once at its acknowledged offset, records are in the producer's order, and every record a
//! consumer read (below the high watermark) is still there at the same offset: nothing a
//! consumer saw was ever truncated. A failing run replays with `RILL_CLUSTER_KILL9_SEED`.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{env_count, free_port, Rng, ServerProcess};
use parking_lot::Mutex;
use rill_engine::format::batch::{BatchBuilder, BatchIter};
use rill_engine::{Compression, FsyncPolicy, ProducerFields, Record};
use rill_server::client::{Client, Consumer, Producer, ProducerConfig, StartPosition};
use rill_server::messages::{Acks, TopicSettings};
use rill_server::{Error, ErrorCode};

const TOPIC: &str = "orders";
const NODES: usize = 3;
const DEADLINE: Duration = Duration::from_secs(60);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

struct Node {
    id: u32,
    dir: PathBuf,
    log: PathBuf,
    listen: SocketAddr,
    config: PathBuf,
    process: Option<ServerProcess>,
}

impl Node {
    fn start(&mut self, peers: &str) {
        let extra = vec![
            "--config".to_string(),
            self.config.display().to_string(),
            "--node-id".to_string(),
            self.id.to_string(),
            "--peers".to_string(),
            peers.to_string(),
        ];
        self.process =
            Some(ServerProcess::start_retrying_with(&self.dir, &self.log, &self.listen.to_string(), "", &extra));
    }
}

/// What the producer and consumer saw.
#[derive(Default)]
struct Ledger {
    /// Acknowledged: offset → value.
    acked: BTreeMap<u64, String>,
    /// Read by the consumer: offset → value.
    consumed: BTreeMap<u64, String>,
    /// Consumer reads that found another value at an offset read before.
    changed: Vec<(u64, String, String)>,
}

fn batch(producer: (i64, i16), sequence: i32, value: &str) -> Bytes {
    let mut builder = BatchBuilder::new(Compression::None, 1_700_000_000_000).producer(ProducerFields {
        producer_id: producer.0,
        producer_epoch: producer.1,
        base_sequence: sequence,
    });
    builder.push(&Record::from_value(value.to_string())).expect("push");
    builder.build().expect("build").freeze()
}

/// Sends `request` to the nodes in turn, starting with `*current`, until one acknowledges.
async fn produce_somewhere(
    addrs: &[SocketAddr],
    current: &AtomicUsize,
    producer: (i64, i16),
    sequence: i32,
    value: &str,
    stop: &AtomicBool,
) -> Option<u64> {
    let bytes = batch(producer, sequence, value);
    while !stop.load(Ordering::Relaxed) {
        let i = current.load(Ordering::Relaxed);
        let attempt = async {
            let client = Client::connect(addrs[i], "cluster-producer").await?;
            client.produce(TOPIC, 0, Acks::All, bytes.clone()).await
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, attempt).await {
            Ok(Ok(Some(ack))) => return Some(ack.base_offset),
            Ok(Err(Error::Server {
                code: ErrorCode::OutOfOrderSequence | ErrorCode::UnknownProducerId,
                message,
                ..
            })) => {
                panic!("the cluster lost producer state for sequence {sequence}: {message}")
            }
            _ => {
                current.store((i + 1) % addrs.len(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await; // pause before the next node
            }
        }
    }
    None
}

/// Reads whatever is below the high watermark of whichever node answers.
async fn consume(addrs: Vec<SocketAddr>, ledger: Arc<Mutex<Ledger>>, stop: Arc<AtomicBool>) {
    let mut next = 0u64;
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let read = async {
            let client = Client::connect(addrs[i], "cluster-consumer").await?;
            client.fetch(TOPIC, 0, next, 1 << 20, 200).await
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, read).await {
            Ok(Ok(fetched)) => {
                for b in BatchIter::new(fetched.records) {
                    let b = b.expect("a served batch is valid");
                    for r in b.records().expect("records") {
                        if r.offset < next {
                            continue;
                        }
                        let value = String::from_utf8(r.value.expect("value").to_vec()).expect("utf-8");
                        let mut ledger = ledger.lock();
                        if let Some(old) = ledger.consumed.insert(r.offset, value.clone()) {
                            if old != value {
                                ledger.changed.push((r.offset, old, value));
                            }
                        }
                        next = r.offset + 1;
                    }
                }
            }
            _ => {
                i = (i + 1) % addrs.len();
                tokio::time::sleep(Duration::from_millis(20)).await; // pause before the next node
            }
        }
    }
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await; // polling the shared ledger
    }
}

/// The index of the node that leads the partition, by the answer with the newest leader
/// epoch among the nodes that answer.
async fn current_leader(addrs: &[SocketAddr]) -> usize {
    let started = Instant::now();
    loop {
        let mut best: Option<(u32, u32)> = None;
        for addr in addrs {
            let ask = async { Client::connect(*addr, "leader-probe").await?.leaders().await };
            if let Ok(Ok((_, partitions))) = tokio::time::timeout(REQUEST_TIMEOUT, ask).await {
                for p in partitions.iter().filter(|p| p.topic == TOPIC && p.partition == 0) {
                    if let Some(leader) = p.leader {
                        if best.is_none_or(|(epoch, _)| p.leader_epoch > epoch) {
                            best = Some((p.leader_epoch, leader));
                        }
                    }
                }
            }
        }
        if let Some((_, leader)) = best {
            return leader as usize - 1;
        }
        assert!(started.elapsed() < DEADLINE, "no node names a leader");
        tokio::time::sleep(Duration::from_millis(50)).await; // the partition is offline for now
    }
}

/// Starts three nodes in `root` (fixed ports, so a restarted node keeps its addresses).
fn start_cluster(root: &std::path::Path) -> (Vec<Node>, Vec<SocketAddr>, String) {
    let controller_ports: Vec<u16> = (0..NODES).map(|_| free_port()).collect();
    let peers: String =
        (0..NODES).map(|i| format!("{}=127.0.0.1:{}", i + 1, controller_ports[i])).collect::<Vec<_>>().join(",");
    let mut nodes: Vec<Node> = (0..NODES)
        .map(|i| {
            let dir = root.join(format!("node-{}", i + 1));
            std::fs::create_dir_all(&dir).expect("data dir");
            let config = root.join(format!("node-{}.toml", i + 1));
            std::fs::write(
                &config,
                "node_timeout_ms = 1500\nreplica_lag_time_max_ms = 3000\nmin_insync_replicas = 2\nreplication_factor = 3\n",
            )
            .expect("config");
            Node {
                id: i as u32 + 1,
                log: root.join(format!("node-{}.log", i + 1)),
                dir,
                listen: SocketAddr::from(([127, 0, 0, 1], free_port())),
                config,
                process: None,
            }
        })
        .collect();
    for node in &mut nodes {
        node.start(&peers);
    }
    let addrs = nodes.iter().map(|n| n.listen).collect();
    (nodes, addrs, peers)
}

/// Creates the test topic through `addr` once the controller has a leader and every node
/// has registered.
async fn create_topic(addr: SocketAddr, partitions: u32) {
    let started = Instant::now();
    loop {
        let client = Client::connect(addr, "admin").await.expect("connect");
        let settings = TopicSettings { partitions, fsync: Some(FsyncPolicy::Always), ..TopicSettings::default() };
        match client.create_topic(TOPIC, settings).await {
            Ok(()) => return,
            Err(e) => assert!(started.elapsed() < DEADLINE, "create the topic: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // the controller is still forming
    }
}

/// A `Producer` and a `Consumer` connected to nodes that lead none or only some of the
/// partitions reach every partition's leader: the client learns the leaders (`Leaders`)
/// and follows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_follow_partition_leaders() {
    let root = tempfile::tempdir().expect("tempdir");
    let (mut nodes, addrs, _peers) = start_cluster(root.path());
    create_topic(addrs[0], 3).await;
    let client = Client::connect(addrs[1], "routed-producer").await.expect("connect");
    let producer =
        Producer::new(client, ProducerConfig { acks: Acks::All, ..ProducerConfig::default() }).expect("producer");
    let started = Instant::now();
    let mut receipts = BTreeMap::new();
    for i in 0..300u32 {
        let value = format!("routed-{i:04}");
        loop {
            let send =
                producer.send(TOPIC, Some(Bytes::from(format!("key-{i}"))), Bytes::from(value.clone()), Vec::new());
            match send.await {
                Ok(receipt) => {
                    receipts.insert((receipt.partition, receipt.offset), value);
                    break;
                }
                // The replicas may still be taking their roles right after the topic exists.
                Err(e) => assert!(started.elapsed() < DEADLINE, "send {value}: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await; // roles are being applied
        }
    }
    let partitions: std::collections::BTreeSet<u32> = receipts.keys().map(|(p, _)| *p).collect();
    assert_eq!(partitions.len(), 3, "keys spread over every partition: {partitions:?}");
    let client = Client::connect(addrs[2], "routed-consumer").await.expect("connect");
    let mut consumer = Consumer::new(client, None, TOPIC, StartPosition::Earliest).await.expect("consumer");
    let mut read = BTreeMap::new();
    while read.len() < receipts.len() {
        assert!(started.elapsed() < DEADLINE, "read {} of {}", read.len(), receipts.len());
        for r in consumer.poll(200).await.expect("poll") {
            let value = String::from_utf8(r.value.expect("value").to_vec()).expect("utf-8");
            read.insert((r.partition, r.offset), value);
        }
    }
    assert_eq!(read, receipts, "every acknowledged record, read back through the leaders");
    for node in &mut nodes {
        if let Some(mut process) = node.process.take() {
            assert!(process.terminate().success(), "node {} exits cleanly", node.id);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_sigkill_under_acks_all_loses_nothing() {
    // 20 rounds: 10 leader kills and 10 follower kills.
    let rounds = env_count("RILL_CLUSTER_KILL9_ROUNDS", 20);
    let seed = Rng::seed_from_env("RILL_CLUSTER_KILL9_SEED");
    let mut rng = Rng::new(seed);
    let root = tempfile::tempdir().expect("tempdir");
    let (mut nodes, addrs, peers) = start_cluster(root.path());
    create_topic(addrs[0], 1).await;
    let producer = loop {
        let client = Client::connect(addrs[0], "admin").await.expect("connect");
        if let Ok(identity) = client.init_producer_id(None).await {
            break (identity.producer_id, identity.producer_epoch);
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // not yet serving
    };

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let leader_hint = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let producing = {
        let (addrs, ledger, stop, hint, sent) =
            (addrs.clone(), Arc::clone(&ledger), Arc::clone(&stop), Arc::clone(&leader_hint), Arc::clone(&sent));
        tokio::spawn(async move {
            let mut sequence = 0i32;
            loop {
                let value = format!("record-{sequence:06}");
                let Some(offset) = produce_somewhere(&addrs, &hint, producer, sequence, &value, &stop).await else {
                    return;
                };
                let previous = ledger.lock().acked.insert(offset, value.clone());
                assert!(previous.is_none_or(|p| p == value), "offset {offset} acknowledged for two records");
                sequence += 1;
                sent.store(sequence as u64, Ordering::Relaxed);
            }
        })
    };
    let consuming = tokio::spawn(consume(addrs.clone(), Arc::clone(&ledger), Arc::clone(&stop)));

    for round in 0..rounds {
        let before = sent.load(Ordering::Relaxed);
        let wanted = before + 20 + rng.below(200);
        wait_for("writes before the kill", || sent.load(Ordering::Relaxed) >= wanted).await;
        // Even rounds kill the leader, odd rounds a follower.
        let leader = current_leader(&addrs).await;
        let victim = if round % 2 == 0 { leader } else { (leader + 1 + rng.below(2) as usize) % NODES };
        nodes[victim].process.as_mut().expect("running").kill();
        let killed_at = sent.load(Ordering::Relaxed);
        // The cluster fails over (or drops the follower from the ISR): writes are
        // acknowledged again.
        wait_for("writes after the kill", || sent.load(Ordering::Relaxed) >= killed_at + 10).await;
        let role = if victim == leader { "leader" } else { "follower" };
        eprintln!("round {round}: killed node {} ({role}) after {killed_at} records", victim + 1);
        nodes[victim].start(&peers);
    }
    let total = sent.load(Ordering::Relaxed) + 50;
    wait_for("the last writes", || sent.load(Ordering::Relaxed) >= total).await;
    stop.store(true, Ordering::Relaxed);
    producing.await.expect("producer task");
    consuming.await.expect("consumer task");

    // The leader's log below the high watermark holds every acknowledged record, once.
    let leader = addrs[current_leader(&addrs).await];
    let acked = ledger.lock().acked.clone();
    let last_acked = *acked.keys().next_back().expect("records were acknowledged");
    let log = loop {
        let client = Client::connect(leader, "cluster-check").await.expect("connect");
        let log: Vec<(u64, String)> = common::load::read_topic(&client, TOPIC)
            .await
            .expect("read the leader's log")
            .into_iter()
            .map(|((_, offset), value)| (offset, value))
            .collect();
        if log.last().is_some_and(|(o, _)| *o >= last_acked) {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // the high watermark catches up
    };
    let by_offset: BTreeMap<u64, String> = log.iter().cloned().collect();
    let mut lost = 0;
    for (offset, value) in &acked {
        if by_offset.get(offset) != Some(value) {
            lost += 1;
            eprintln!("acknowledged {value} at {offset}, found {:?}", by_offset.get(offset));
        }
    }
    let mut values: Vec<&String> = log.iter().map(|(_, v)| v).collect();
    let in_order = values.windows(2).all(|w| w[0] < w[1]);
    let count = values.len();
    values.dedup();
    let duplicated = count - values.len();
    let ledger = ledger.lock();
    let truncated_reads = ledger.consumed.iter().filter(|(o, v)| by_offset.get(*o) != Some(*v)).count();
    println!(
        "campaign: scenario=cluster-sigkill rounds={rounds} leader_kills={} acked={} lost={lost} duplicated={duplicated} \
         consumed={} truncated_reads={truncated_reads} changed_reads={} seed={seed}",
        rounds.div_ceil(2),
        acked.len(),
        ledger.consumed.len(),
        ledger.changed.len()
    );
    assert_eq!(lost, 0, "acknowledged records lost");
    assert_eq!(duplicated, 0, "records stored twice");
    assert!(in_order, "records are in the producer's order");
    assert_eq!(truncated_reads, 0, "a consumer read a record that was later truncated");
    assert!(ledger.changed.is_empty(), "an offset changed under a consumer: {:?}", ledger.changed);
    drop(ledger);
    for node in &mut nodes {
        if let Some(mut process) = node.process.take() {
            let status = process.terminate();
            assert!(status.success(), "node {} exits cleanly: {status}", node.id);
        }
    }
}
