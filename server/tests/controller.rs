//! The controller end to end: three in-process controllers on loopback ports talking the
//! controller protocol, each with its own directory. Waits are deadlines on `metadata()`
//! and `raft_leader()` polling, never fixed sleeps used as assertions.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use rill_server::controller::{
    ClusterMetadata, Command, CommandResult, Controller, ControllerConfig, Rejection, TopicSettings,
};

/// Longest any awaited condition may take (elections and heartbeat timeouts on a loaded
/// two-core machine included).
const DEADLINE: Duration = Duration::from_secs(40);
const HEARTBEAT_TIMEOUT_MS: u64 = 1_500;

/// Loopback addresses that were free a moment ago (bound to port 0, then released, so
/// every controller can be told all of them before any starts).
fn free_addrs(count: u32) -> BTreeMap<u32, SocketAddr> {
    let listeners: Vec<_> =
        (0..count).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("binds a loopback port")).collect();
    listeners.iter().zip(1..).map(|(l, id)| (id, l.local_addr().expect("has an address"))).collect()
}

fn config(id: u32, peers: &BTreeMap<u32, SocketAddr>, root: &Path) -> ControllerConfig {
    ControllerConfig {
        node_id: id,
        listen: peers[&id],
        peers: peers.clone(),
        dir: root.join(format!("node-{id}")),
        heartbeat_timeout_ms: HEARTBEAT_TIMEOUT_MS,
        advertised_addr: String::new(),
        kafka_addr: String::new(),
    }
}

async fn start_all(peers: &BTreeMap<u32, SocketAddr>, root: &Path) -> BTreeMap<u32, Controller> {
    let mut controllers = BTreeMap::new();
    for &id in peers.keys() {
        controllers.insert(id, Controller::start(config(id, peers, root)).await.expect("controller starts"));
    }
    controllers
}

/// Waits until `controller`'s applied metadata satisfies `done`, and returns that state.
async fn wait_for(controller: &Controller, what: &str, done: impl Fn(&ClusterMetadata) -> bool) -> ClusterMetadata {
    let mut rx = controller.metadata();
    let deadline = Instant::now() + DEADLINE;
    loop {
        {
            let md = rx.borrow_and_update();
            if done(&md) {
                return md.clone();
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out waiting for {what}; metadata: {:?}", *rx.borrow());
        // Woken by the next applied entry or by the deadline, whichever is first.
        let _woken = tokio::time::timeout(left, rx.changed()).await;
    }
}

/// Waits until every controller names the same Raft leader, and returns it.
async fn wait_leader(controllers: &BTreeMap<u32, Controller>) -> u32 {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let leaders: Vec<Option<u32>> = controllers.values().map(Controller::raft_leader).collect();
        if let Some(Some(leader)) = leaders.first() {
            if leaders.iter().all(|l| *l == Some(*leader)) && controllers.contains_key(leader) {
                return *leader;
            }
        }
        assert!(Instant::now() < deadline, "no agreed raft leader: {leaders:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn settings() -> TopicSettings {
    TopicSettings {
        fsync: "always".into(),
        segment_size_bytes: 1 << 20,
        retention_bytes: None,
        retention_ms: Some(60_000),
    }
}

fn all_alive(ids: &[u32]) -> impl Fn(&ClusterMetadata) -> bool + '_ {
    move |md| ids.iter().all(|id| md.nodes.get(id).is_some_and(|n| n.alive))
}

/// The scenario of issue 10's controller: three controllers elect a leader and register;
/// a CreateTopic proposed on a follower is applied on all three; shutting down the Raft
/// leader, which also leads a partition, makes the new Raft leader mark it down after the
/// heartbeat timeout and move that partition's leadership to the other ISR member with
/// epoch 2; an UpdateIsr in the old epoch is refused; the stopped controller restarted from
/// its directory has the metadata at once and rejoins (registered alive on every node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_controllers_replicate_fail_over_and_rejoin() {
    let root = tempfile::tempdir().expect("tempdir");
    let peers = free_addrs(3);
    let mut controllers = start_all(&peers, root.path()).await;
    let leader = wait_leader(&controllers).await;
    for c in controllers.values() {
        wait_for(c, "all three registered", all_alive(&[1, 2, 3])).await;
    }

    // CreateTopic on a follower: forwarded to the leader, applied everywhere.
    let follower = *controllers.keys().find(|&&id| id != leader).expect("a follower");
    let create =
        Command::CreateTopic { name: "orders".into(), partitions: 3, replication_factor: 2, config: settings() };
    let result = controllers[&follower].propose(create.clone()).await.expect("proposal written");
    assert_eq!(result, CommandResult::Applied);
    for c in controllers.values() {
        let md = wait_for(c, "orders created", |md| md.topics.contains_key("orders")).await;
        assert_eq!(md.topics["orders"].config, settings());
        assert_eq!(md.topics["orders"].partitions.len(), 3);
    }
    let again = controllers[&follower].propose(create).await.expect("proposal written");
    assert_eq!(again, CommandResult::Rejected(Rejection::TopicExists { name: "orders".into() }));

    // The partition the Raft leader leads (round-robin: every node leads one).
    let md = controllers[&follower].metadata().borrow().clone();
    let (partition, assignment) = md.topics["orders"]
        .partitions
        .iter()
        .enumerate()
        .find(|(_, p)| p.leader == Some(leader))
        .expect("the raft leader leads a partition");
    assert_eq!(assignment.leader_epoch, 1);
    let successor = assignment.replicas.iter().copied().find(|&r| r != leader).expect("a second replica");

    // Stop it: a new Raft leader is elected and marks it down.
    let victim = controllers.remove(&leader).expect("the leader runs");
    victim.shutdown().await;
    let new_leader = wait_leader(&controllers).await;
    assert_ne!(new_leader, leader);
    for c in controllers.values() {
        let md = wait_for(c, "the stopped node marked down and its partition moved", |md| {
            let p = &md.topics["orders"].partitions[partition];
            !md.nodes[&leader].alive && p.leader == Some(successor)
        })
        .await;
        let p = &md.topics["orders"].partitions[partition];
        assert_eq!(p.leader_epoch, 2, "one leader change, one epoch bump");
        assert_eq!(p.isr, vec![successor], "the stopped leader left the ISR");
    }

    // A leader still in epoch 1 is stale.
    let proposer = *controllers.keys().find(|&&id| id != new_leader).expect("a follower");
    let stale =
        Command::UpdateIsr { topic: "orders".into(), partition: partition as u32, leader_epoch: 1, isr: vec![leader] };
    let refused = controllers[&proposer].propose(stale).await.expect("proposal written");
    assert_eq!(refused, CommandResult::Rejected(Rejection::StaleLeaderEpoch { given: 1, current: 2 }));

    // Restart from its directory: the metadata as it applied it is there before any Raft
    // traffic; then it catches up on what happened while it was down (epoch 2) and registers
    // again, and every node sees it alive.
    let restarted = Controller::start(config(leader, &peers, root.path())).await.expect("controller restarts");
    assert!(restarted.metadata().borrow().topics.contains_key("orders"), "metadata kept on disk");
    controllers.insert(leader, restarted);
    for c in controllers.values() {
        let alive = all_alive(&[1, 2, 3]);
        let md = wait_for(c, "the restarted node caught up and alive again", |md| {
            alive(md) && md.topics["orders"].partitions[partition].leader_epoch == 2
        })
        .await;
        assert_eq!(md.topics["orders"].partitions[partition].leader, Some(successor));
    }
    wait_leader(&controllers).await;
    for (_, c) in controllers {
        c.shutdown().await;
    }
}

/// Restarting every controller from its directory keeps the metadata and does not
/// re-initialise the group: the restarted cluster elects a leader and accepts new commands
/// on top of the old log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_restart_keeps_metadata() {
    let root = tempfile::tempdir().expect("tempdir");
    let peers = free_addrs(3);
    let controllers = start_all(&peers, root.path()).await;
    wait_leader(&controllers).await;
    let first = &controllers[&1];
    wait_for(first, "all three registered", all_alive(&[1, 2, 3])).await;
    let create = Command::CreateTopic { name: "a".into(), partitions: 2, replication_factor: 3, config: settings() };
    assert_eq!(first.propose(create).await.expect("proposal written"), CommandResult::Applied);
    for c in controllers.values() {
        wait_for(c, "topic a everywhere", |md| md.topics.contains_key("a")).await;
    }
    let before = first.metadata().borrow().clone();
    for (_, c) in controllers {
        c.shutdown().await;
    }

    let controllers = start_all(&peers, root.path()).await;
    for c in controllers.values() {
        assert_eq!(c.metadata().borrow().topics, before.topics, "metadata read back from disk");
    }
    wait_leader(&controllers).await;
    let create = Command::CreateTopic { name: "b".into(), partitions: 1, replication_factor: 1, config: settings() };
    let third = &controllers[&3];
    wait_for(third, "all three registered", all_alive(&[1, 2, 3])).await;
    assert_eq!(third.propose(create).await.expect("proposal written"), CommandResult::Applied);
    for c in controllers.values() {
        let md = wait_for(c, "topic b everywhere", |md| md.topics.contains_key("b")).await;
        // Same replicas, leaders and ISRs; each leader's registration at its restart began a
        // new leadership (one more epoch).
        for (after, was) in md.topics["a"].partitions.iter().zip(&before.topics["a"].partitions) {
            assert_eq!((&after.replicas, after.leader, &after.isr), (&was.replicas, was.leader, &was.isr));
            assert_eq!(after.leader_epoch, was.leader_epoch + 1, "a restarted leader leads in a new epoch");
        }
    }
    for (_, c) in controllers {
        c.shutdown().await;
    }
}

/// Writes one controller frame (length, version byte, JSON) built by hand from
/// docs/protocol.md, and reads the answer as JSON; `None` if the controller closed the
/// connection instead.
async fn raw_call(stream: &mut tokio::net::TcpStream, version: u8, json: &str) -> Option<serde_json::Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let len = u32::try_from(json.len() + 1).expect("small frame");
    let mut frame = len.to_le_bytes().to_vec();
    frame.push(version);
    frame.extend_from_slice(json.as_bytes());
    stream.write_all(&frame).await.expect("frame sent");
    let mut len = [0u8; 4];
    match tokio::time::timeout(DEADLINE, stream.read_exact(&mut len)).await.expect("an answer or a close in time") {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
        Err(e) => panic!("reading the answer: {e}"),
    }
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    stream.read_exact(&mut body).await.expect("answer body");
    assert_eq!(body[0], 1, "answers carry version 1");
    Some(serde_json::from_slice(&body[1..]).expect("answer is JSON"))
}

/// The controller protocol byte for byte against a single-node group (its own leader): a
/// hand-built `Forward` of a CreateTopic is applied and answered `Applied`, a `Heartbeat` is
/// accepted, and a frame of another version or over the size limit closes the connection
/// while the controller keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_protocol_raw_frames() {
    let root = tempfile::tempdir().expect("tempdir");
    let peers = free_addrs(1);
    let controllers = start_all(&peers, root.path()).await;
    assert_eq!(wait_leader(&controllers).await, 1);
    let c = &controllers[&1];
    wait_for(c, "the node registered", all_alive(&[1])).await;

    let mut stream = tokio::net::TcpStream::connect(peers[&1]).await.expect("connects");
    let create = r#"{"Forward":{"CreateTopic":{"name":"raw","partitions":2,"replication_factor":1,
        "config":{"fsync":"never","segment_size_bytes":1048576,"retention_bytes":null,"retention_ms":null}}}}"#;
    let answer = raw_call(&mut stream, 1, create).await.expect("answered");
    assert_eq!(answer, serde_json::json!({"Forward": {"Ok": "Applied"}}));
    wait_for(c, "topic raw", |md| md.topics.get("raw").is_some_and(|t| t.partitions.len() == 2)).await;
    let answer = raw_call(&mut stream, 1, r#"{"Heartbeat":{"node_id":1}}"#).await.expect("answered");
    assert_eq!(answer, serde_json::json!({"Heartbeat": {"Ok": null}}));
    let answer = raw_call(&mut stream, 1, create).await.expect("answered");
    assert_eq!(answer, serde_json::json!({"Forward": {"Ok": {"Rejected": {"TopicExists": {"name": "raw"}}}}}));

    assert_eq!(raw_call(&mut stream, 2, r#"{"Heartbeat":{"node_id":1}}"#).await, None, "version 2 closes");
    let mut stream = tokio::net::TcpStream::connect(peers[&1]).await.expect("connects");
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream.write_all(&u32::MAX.to_le_bytes()).await.expect("length sent");
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(DEADLINE, stream.read(&mut byte)).await.expect("closed in time");
        assert!(matches!(read, Ok(0) | Err(_)), "an oversized length closes the connection: {read:?}");
    }
    let mut stream = tokio::net::TcpStream::connect(peers[&1]).await.expect("connects");
    assert!(raw_call(&mut stream, 1, r#"{"Heartbeat":{"node_id":1}}"#).await.is_some(), "still serving");
    for (_, c) in controllers {
        c.shutdown().await;
    }
}
