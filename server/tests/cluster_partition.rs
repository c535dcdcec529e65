//! A network partition between the nodes of a three-process cluster, made with relays on
//! every path between nodes (`common/cut.rs`): the partition's leader is cut off from the
//! other two (controller traffic both ways, and the path its followers fetch on).
//!
//! Checked: the isolated leader acknowledges no `acks = all` write (it cannot reach its
//! followers, and the controller never records the ISR shrink it proposes); the majority
//! side marks it down, elects another in-sync replica and acknowledges writes; after the
//! partition heals, the old leader learns the new epoch, cuts the write it took while
//! isolated and catches up, and both logs hold exactly the acknowledged records.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::cut::CutRelay;
use common::{free_port, ServerProcess};
use rill_engine::format::batch::BatchBuilder;
use rill_engine::{Compression, FsyncPolicy, Record};
use rill_server::client::Client;
use rill_server::messages::{Acks, TopicSettings};

const TOPIC: &str = "ledger";
const DEADLINE: Duration = Duration::from_secs(60);

fn batch(value: &str) -> Bytes {
    let mut builder = BatchBuilder::new(Compression::None, 1_700_000_000_000);
    builder.push(&Record::from_value(value.to_string())).expect("push");
    builder.build().expect("build").freeze()
}

/// Every record below the high watermark of the node at `addr` (asked directly).
async fn read_node(addr: SocketAddr) -> Vec<(u64, String)> {
    let client = Client::connect_unrouted(addr, "check").await.expect("connect");
    let records = common::load::read_topic(&client, TOPIC).await.expect("read");
    records.into_iter().map(|((_, offset), value)| (offset, value)).collect()
}

/// Writes `value` with acks=all through a routed client on `addr`, retrying until acknowledged.
async fn write(addr: SocketAddr, value: &str) -> u64 {
    let started = Instant::now();
    loop {
        let attempt = async { Client::connect(addr, "writer").await?.produce(TOPIC, 0, Acks::All, batch(value)).await };
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok(Some(ack))) => return ack.base_offset,
            other => assert!(started.elapsed() < DEADLINE, "write {value}: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // the cluster is failing over
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn isolated_leader_acknowledges_nothing_and_rejoins() {
    let root = tempfile::tempdir().expect("tempdir");
    let n = 3;
    let controller: Vec<SocketAddr> = (0..n).map(|_| SocketAddr::from(([127, 0, 0, 1], free_port()))).collect();
    let listen: Vec<SocketAddr> = (0..n).map(|_| SocketAddr::from(([127, 0, 0, 1], free_port()))).collect();
    // relays[i][j]: node i's path to node j's controller; data[i]: everyone's path to node i.
    let mut relays: Vec<Vec<Option<CutRelay>>> = Vec::new();
    for i in 0..n {
        let mut row = Vec::new();
        for (j, target) in controller.iter().enumerate() {
            row.push(if i == j { None } else { Some(CutRelay::start(*target).await) });
        }
        relays.push(row);
    }
    let mut data = Vec::new();
    for target in &listen {
        data.push(CutRelay::start(*target).await);
    }
    let mut nodes = Vec::new();
    for i in 0..n {
        let peers: Vec<String> = (0..n)
            .map(|j| {
                let addr = relays[i][j].as_ref().map_or(controller[i], |r| r.addr);
                format!("{}={addr}", j + 1)
            })
            .collect();
        let config = root.path().join(format!("node-{}.toml", i + 1));
        std::fs::write(
            &config,
            format!(
                "node_timeout_ms = 1500\nreplica_lag_time_max_ms = 2000\nreplica_ack_timeout_ms = 4000\n\
                 min_insync_replicas = 2\nadvertised_listener = \"{}\"\n",
                data[i].addr
            ),
        )
        .expect("config");
        let dir = root.path().join(format!("node-{}", i + 1));
        std::fs::create_dir_all(&dir).expect("dir");
        let extra = vec![
            "--config".to_string(),
            config.display().to_string(),
            "--node-id".to_string(),
            (i + 1).to_string(),
            "--peers".to_string(),
            peers.join(","),
        ];
        let log = root.path().join(format!("node-{}.log", i + 1));
        nodes.push(ServerProcess::start_retrying_with(&dir, &log, &listen[i].to_string(), "", &extra));
    }

    let started = Instant::now();
    loop {
        let client = Client::connect(listen[0], "admin").await.expect("connect");
        let settings = TopicSettings { partitions: 1, fsync: Some(FsyncPolicy::Always), ..TopicSettings::default() };
        match client.create_topic(TOPIC, settings).await {
            Ok(()) => break,
            Err(e) => assert!(started.elapsed() < DEADLINE, "create the topic: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // the controller is forming
    }
    let mut acked = BTreeMap::new();
    for i in 0..30 {
        let value = format!("before-{i:03}");
        acked.insert(write(listen[0], &value).await, value);
    }
    let (_, leaders) = Client::connect(listen[0], "probe").await.expect("connect").leaders().await.expect("leaders");
    assert_eq!(leaders[0].leader, Some(1), "the first replica leads");

    // Cut node 1 off: its controller from the others' and theirs from it, and the path
    // everyone else reaches its listener on.
    for (i, row) in relays.iter().enumerate() {
        for (j, relay) in row.iter().enumerate() {
            if let Some(relay) = relay {
                if i == 0 || j == 0 {
                    relay.set_cut(true);
                }
            }
        }
    }
    data[0].set_cut(true);

    // Straight to the isolated leader: accepted into its log, never acknowledged.
    let isolated = Client::connect_unrouted(listen[0], "isolated").await.expect("connect");
    let answer =
        tokio::time::timeout(Duration::from_secs(20), isolated.produce(TOPIC, 0, Acks::All, batch("isolated")))
            .await
            .expect("the isolated leader answers in time");
    assert!(answer.is_err(), "an isolated leader acknowledged an acks=all write: {answer:?}");

    // The majority side fails over and takes writes.
    for i in 0..30 {
        let value = format!("during-{i:03}");
        acked.insert(write(listen[1], &value).await, value);
    }

    // Heal: node 1 learns the new epoch, cuts "isolated" and catches up.
    for row in &relays {
        for relay in row.iter().flatten() {
            relay.set_cut(false);
        }
    }
    data[0].set_cut(false);
    for i in 0..10 {
        let value = format!("after-{i:03}");
        acked.insert(write(listen[1], &value).await, value);
    }
    let expected: Vec<(u64, String)> = acked.into_iter().collect();
    let started = Instant::now();
    loop {
        let leader_log = read_node(listen[1]).await;
        let old_leader_log = read_node(listen[0]).await;
        if leader_log == expected && old_leader_log == expected {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "logs did not converge on the acknowledged records:\nexpected {expected:?}\nnode 2 {leader_log:?}\nnode 1 {old_leader_log:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // node 1 is catching up
    }
    for mut node in nodes {
        assert!(node.terminate().success(), "clean exit");
    }
}
