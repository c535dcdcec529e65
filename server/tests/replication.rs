//! Replication between three in-process servers on loopback, with the test playing the
//! controller: it assigns each partition's leader, epoch and ISR (`ReplicaManager::apply`,
//! Kafka's LeaderAndIsr) and records the ISR changes leaders propose. Followers pull over
//! the real protocol (`ReplicaFetch`, `EpochEndOffset`).
//!
//! Checked: `acks = all` writes survive the loss of their leader; a restarted replica
//! catches up and rejoins the ISR; an old leader's unreplicated suffix is cut when it comes
//! back as a follower; writes are refused with `NotEnoughReplicas` once the ISR is too
//! small; a follower refuses client writes; at the end every replica holds the same bytes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rill_engine::format::batch::{BatchBuilder, BatchIter};
use rill_engine::{Compression, FsyncPolicy, Record, Store, StoreConfig};
use rill_server::client::Client;
use rill_server::cluster::{PartitionRole, ReplicaManager};
use rill_server::config::ServerConfig;
use rill_server::messages::{Acks, TopicSettings};
use rill_server::server::{self, ServerHandle};
use rill_server::{Error, ErrorCode};
use tokio::sync::Mutex;

const TOPIC: &str = "events";
const DEADLINE: Duration = Duration::from_secs(20);

struct Node {
    id: u32,
    dir: tempfile::TempDir,
    handle: Option<ServerHandle>,
}

impl Node {
    fn addr(&self) -> SocketAddr {
        self.handle.as_ref().expect("node is up").addr
    }

    fn manager(&self) -> Option<Arc<ReplicaManager>> {
        self.handle.as_ref().and_then(|h| h.cluster.clone())
    }

    async fn start(&mut self) {
        let config = ServerConfig {
            data_dir: self.dir.path().to_path_buf(),
            listen: "127.0.0.1:0".into(),
            metrics_listen: String::new(),
            node_id: self.id,
            min_insync_replicas: 2,
            replica_lag_time_max_ms: 1_000,
            ..ServerConfig::default()
        };
        let handle = server::start(config).await.expect("start node");
        let client = Client::connect(handle.addr, "setup").await.expect("connect");
        let settings = TopicSettings { partitions: 1, fsync: Some(FsyncPolicy::Always), ..TopicSettings::default() };
        match client.create_topic(TOPIC, settings).await {
            Ok(()) => {}
            Err(Error::Server { code: ErrorCode::TopicExists, .. }) => {}
            Err(e) => panic!("create topic: {e}"),
        }
        self.handle = Some(handle);
    }

    async fn stop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown().await.expect("clean shutdown");
        }
    }
}

/// The test's controller: one partition's role, applied to every live node; ISR proposals
/// from the leader are recorded when they name the current epoch.
struct Cluster {
    nodes: Vec<Node>,
    role: Arc<Mutex<PartitionRole>>,
    /// The replica managers of the live nodes (a stopped node's store must be released).
    live: Arc<std::sync::Mutex<Vec<Option<Arc<ReplicaManager>>>>>,
}

impl Cluster {
    async fn new() -> Cluster {
        let mut nodes = Vec::new();
        for id in 1..=3 {
            let mut node = Node { id, dir: tempfile::tempdir().expect("tempdir"), handle: None };
            node.start().await;
            nodes.push(node);
        }
        let role = PartitionRole {
            topic: TOPIC.into(),
            partition: 0,
            leader: Some(1),
            leader_addr: Some(nodes[0].addr().to_string()),
            leader_epoch: 1,
            replicas: vec![1, 2, 3],
            isr: vec![1, 2, 3],
        };
        let live = nodes.iter().map(Node::manager).collect();
        let cluster = Cluster { nodes, role: Arc::new(Mutex::new(role)), live: Arc::new(std::sync::Mutex::new(live)) };
        for i in 0..3 {
            cluster.listen_for_isr(i);
        }
        cluster.apply().await;
        cluster
    }

    fn managers(&self) -> Vec<Arc<ReplicaManager>> {
        live_managers(&self.live)
    }

    /// Applies the current role to every live node.
    async fn apply(&self) {
        let role = self.role.lock().await.clone();
        for manager in self.managers() {
            manager.apply(role.clone()).await.expect("apply role");
        }
    }

    /// Records ISR proposals from node `i` and applies them to the live nodes.
    fn listen_for_isr(&self, i: usize) {
        let Some(manager) = self.nodes[i].manager() else { return };
        let Some(mut proposals) = manager.take_isr_proposals() else { return };
        let role = Arc::clone(&self.role);
        let live = Arc::clone(&self.live);
        drop(manager);
        tokio::spawn(async move {
            while let Some(proposal) = proposals.recv().await {
                let updated = {
                    let mut role = role.lock().await;
                    if proposal.leader_epoch != role.leader_epoch
                        || !role.leader.is_some_and(|l| proposal.isr.contains(&l))
                    {
                        continue;
                    }
                    role.isr = proposal.isr;
                    role.clone()
                };
                for manager in live_managers(&live) {
                    // A node stopping meanwhile refuses: its store is closed.
                    drop(manager.apply(updated.clone()).await);
                }
            }
        });
    }

    /// Elects `leader` (must be alive and in the ISR) with a new epoch; `down` leaves the ISR.
    async fn elect(&mut self, leader: u32, down: Option<u32>) {
        {
            let mut role = self.role.lock().await;
            assert!(role.isr.contains(&leader), "only an ISR member is elected");
            role.leader = Some(leader);
            role.leader_addr = Some(self.nodes[leader as usize - 1].addr().to_string());
            role.leader_epoch += 1;
            if let Some(down) = down {
                role.isr.retain(|r| *r != down);
            }
        }
        self.apply().await;
    }

    async fn stop(&mut self, i: usize) {
        self.live.lock().expect("live list")[i] = None;
        self.nodes[i].stop().await;
    }

    async fn restart(&mut self, i: usize) {
        self.nodes[i].start().await;
        self.live.lock().expect("live list")[i] = self.nodes[i].manager();
        self.listen_for_isr(i);
        self.apply().await;
    }

    async fn wait_for_isr(&self, size: usize) {
        let started = Instant::now();
        while self.role.lock().await.isr.len() != size {
            assert!(started.elapsed() < DEADLINE, "ISR never reached {size}: {:?}", self.role.lock().await.isr);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.stop(i).await;
        }
    }
}

fn live_managers(live: &std::sync::Mutex<Vec<Option<Arc<ReplicaManager>>>>) -> Vec<Arc<ReplicaManager>> {
    live.lock().expect("live list").iter().flatten().cloned().collect()
}

fn batch(values: &[String]) -> Bytes {
    let mut builder = BatchBuilder::new(Compression::None, 1_700_000_000_000);
    for v in values {
        builder.push(&Record::from_value(v.clone())).expect("push");
    }
    builder.build().expect("build").freeze()
}

/// Produces `count` one-record batches with `acks`; returns (offset, value) of each.
async fn produce(client: &Client, prefix: &str, count: usize, acks: Acks) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    for i in 0..count {
        let value = format!("{prefix}-{i:05}");
        let ack = client.produce(TOPIC, 0, acks, batch(std::slice::from_ref(&value))).await.expect("produce");
        out.push((ack.expect("acknowledged").base_offset, value));
    }
    out
}

/// A replica's log: its bytes, and (offset, value) of each record.
type Log = (Vec<u8>, Vec<(u64, String)>);

/// Every replica's log after a clean stop.
fn read_logs(cluster: &Cluster) -> Vec<Log> {
    cluster
        .nodes
        .iter()
        .map(|node| {
            let config = StoreConfig { retention_check_interval_ms: None, node_id: node.id, ..StoreConfig::default() };
            // A stopped node's store is free once its shutdown returned; wait for that
            // bounded, in case a task of the test still held a reference a moment longer.
            let started = Instant::now();
            let store = loop {
                match Store::open(node.dir.path(), config.clone()) {
                    Ok(store) => break store,
                    Err(rill_engine::Error::Locked { .. }) if started.elapsed() < DEADLINE => {
                        std::thread::sleep(Duration::from_millis(10)); // polling the lock
                    }
                    Err(e) => panic!("open store: {e}"),
                }
            };
            let p = store.partition(TOPIC, 0).expect("partition");
            let bytes = p.read_replica(0, 1 << 30).expect("read");
            let mut records = Vec::new();
            for b in BatchIter::new(bytes.clone()) {
                for r in b.expect("batch").records().expect("records") {
                    let value = String::from_utf8(r.value.expect("value").to_vec()).expect("utf-8");
                    records.push((r.offset, value));
                }
            }
            (bytes.to_vec(), records)
        })
        .collect()
}

fn code(result: Result<Option<rill_server::client::ProduceAck>, Error>) -> Option<ErrorCode> {
    match result {
        Err(Error::Server { code, .. }) => Some(code),
        _ => None,
    }
}

/// acks=all writes survive their leader's loss; the old leader comes back as a follower,
/// catches up and rejoins the ISR; followers refuse writes; replicas end identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acks_all_survive_leader_failover() {
    let mut cluster = Cluster::new().await;
    let leader = Client::connect(cluster.nodes[0].addr(), "producer").await.expect("connect");
    let mut acked = produce(&leader, "first", 100, Acks::All).await;
    let follower = Client::connect(cluster.nodes[2].addr(), "stray").await.expect("connect");
    assert_eq!(code(follower.produce(TOPIC, 0, Acks::All, batch(&["x".into()])).await), Some(ErrorCode::NotLeader));

    cluster.stop(0).await;
    cluster.elect(2, Some(1)).await;
    let leader = Client::connect(cluster.nodes[1].addr(), "producer").await.expect("connect");
    acked.extend(produce(&leader, "second", 100, Acks::All).await);

    cluster.restart(0).await;
    cluster.wait_for_isr(3).await;
    acked.extend(produce(&leader, "third", 20, Acks::All).await);
    let fetched = leader.fetch(TOPIC, 0, 0, 1 << 20, 0).await.expect("fetch");
    assert_eq!(fetched.end_offset, 220, "the high watermark covers every acknowledged write");

    cluster.stop_all().await;
    let logs = read_logs(&cluster);
    assert!(logs.iter().all(|l| l.0 == logs[1].0), "replicas hold identical bytes");
    assert_eq!(logs[1].1, acked, "every acknowledged record, once, at its offset");
}

/// An old leader's unreplicated suffix (written with acks=leader) is cut when it returns
/// as a follower; with too few replicas in sync, writes are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn divergent_suffix_is_cut_and_min_insync_refuses() {
    let mut cluster = Cluster::new().await;
    let leader = Client::connect(cluster.nodes[0].addr(), "producer").await.expect("connect");
    let mut acked = produce(&leader, "replicated", 30, Acks::All).await;
    // Followers stop fetching (the partition looks offline to them); the leader writes on.
    {
        let mut offline = cluster.role.lock().await.clone();
        offline.leader = None;
        offline.leader_addr = None;
        for i in 1..3 {
            cluster.nodes[i].manager().expect("manager").apply(offline.clone()).await.expect("apply");
        }
    }
    let lost = produce(&leader, "unreplicated", 10, Acks::Leader).await;
    assert_eq!(lost[0].0, 30);
    cluster.stop(0).await;
    cluster.elect(2, Some(1)).await;
    let leader = Client::connect(cluster.nodes[1].addr(), "producer").await.expect("connect");
    acked.extend(produce(&leader, "after", 15, Acks::All).await);
    assert_eq!(acked[30].0, 30, "the new leader continues from the replicated end");

    cluster.restart(0).await;
    cluster.wait_for_isr(3).await;

    // Two replicas stop. The next write cannot reach them; once they have lagged for
    // `replica_lag_time_max_ms` the ISR shrinks to the leader, and the write, replicated
    // too little, is answered NotEnoughReplicas. Later writes are refused before append.
    cluster.stop(2).await;
    cluster.stop(0).await;
    let stranded = leader.produce(TOPIC, 0, Acks::All, batch(&["stranded".into()])).await;
    assert_eq!(code(stranded), Some(ErrorCode::NotEnoughReplicas));
    cluster.wait_for_isr(1).await;
    let refused = leader.produce(TOPIC, 0, Acks::All, batch(&["refused".into()])).await;
    assert_eq!(code(refused), Some(ErrorCode::NotEnoughReplicas));

    cluster.stop_all().await;
    let logs = read_logs(&cluster);
    assert_eq!(logs[0].0, logs[2].0, "the old leader's suffix was cut");
    assert_eq!(logs[0].1, acked);
    assert_eq!(logs[1].1.len(), acked.len() + 1, "the stranded write stays on the leader, unacknowledged");
    assert!(logs[0].1.iter().all(|(_, v)| !v.starts_with("unreplicated")));
}
