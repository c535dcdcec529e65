//! The cluster controller: cluster metadata (nodes, topic assignments, partition leaders and
//! ISRs) kept in a Raft group built on openraft.
//!
//! Owns the Raft node of this process, its durable state under [`ControllerConfig::dir`]
//! (docs/format.md, "Controller state v1"), the controller protocol listener
//! (docs/protocol.md, "Controller protocol v1"), node liveness as the Raft leader sees it,
//! and this node's own registration and heartbeats. Any node can propose: a follower
//! forwards to the Raft leader. Must never touch partition data (that is the engine's) nor
//! decide a command's effect outside [`state`].
//!
//! * `state.rs`: the metadata and the pure rules ([`ClusterMetadata::apply`]).
//! * `files.rs`: file layouts; `log_store.rs`: the Raft log and vote; `state_machine.rs`:
//!   the applied state.
//! * `network.rs`: frames, messages, the peer client and its use by openraft.

mod files;
mod log_store;
mod network;
pub mod state;
mod state_machine;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, Raft, ServerState};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use self::log_store::LogStore;
use self::network::{ForwardError, Network, PeerClient, Request, Response};
pub use self::state::{
    ClusterMetadata, Command, CommandResult, NodeInfo, PartitionAssignment, Rejection, TopicAssignment, TopicSettings,
};
use self::state_machine::StateMachine;
use crate::limits::{
    CONTROLLER_HEARTBEAT_INTERVAL_MS, CONTROLLER_PROPOSE_TIMEOUT_MS, CONTROLLER_SNAPSHOT_CHUNK_SIZE_BYTES,
};
use crate::{Error, Result};

openraft::declare_raft_types!(
    /// openraft's types for the controller: commands in, command results out, `u32` node ids.
    pub(crate) TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = u32,
        Node = BasicNode,
        SnapshotData = std::io::Cursor<Vec<u8>>,
);

/// Raft heartbeat interval between controllers.
const RAFT_HEARTBEAT_INTERVAL_MS: u64 = 100;
/// Raft election timeout range (a follower that hears no leader for this long stands).
const RAFT_ELECTION_TIMEOUT_MIN_MS: u64 = 600;
const RAFT_ELECTION_TIMEOUT_MAX_MS: u64 = 1200;
/// How long a proposal waits between attempts while there is no reachable leader.
const PROPOSE_RETRY_MS: u64 = 50;
/// Timeout of one forwarded request.
const FORWARD_TIMEOUT_MS: u64 = 5_000;

/// How to start a [`Controller`].
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// This node's id; must be a key of `peers`.
    pub node_id: u32,
    /// Where to listen for the controller protocol (Raft RPCs, forwarded requests).
    pub listen: SocketAddr,
    /// Every voter's controller address, this node's included.
    pub peers: BTreeMap<u32, SocketAddr>,
    /// Directory of the durable Raft state (created if absent).
    pub dir: PathBuf,
    /// A node silent this long is marked down by the Raft leader.
    pub heartbeat_timeout_ms: u64,
    /// The address this node registers in the metadata (its rill protocol address, which
    /// followers fetch from); empty registers the controller address.
    pub advertised_addr: String,
    /// The Kafka-protocol address this node registers (`host:port`); empty without one.
    pub kafka_addr: String,
}

/// When the Raft leader last heard from each node.
#[derive(Default)]
struct Liveness {
    last_seen: HashMap<u32, Instant>,
}

/// What the controller's tasks share.
struct Core {
    node_id: u32,
    raft: Raft<TypeConfig>,
    peers: BTreeMap<u32, SocketAddr>,
    liveness: parking_lot::Mutex<Liveness>,
    /// The connection used to forward to the Raft leader.
    forward: tokio::sync::Mutex<Option<PeerClient>>,
}

/// A running controller node. See the module documentation.
pub struct Controller {
    core: Arc<Core>,
    metadata: watch::Receiver<ClusterMetadata>,
    /// This node's registration count in the metadata as it was opened.
    registrations_at_start: u64,
    server: parking_lot::Mutex<Option<JoinHandle<()>>>,
    background: parking_lot::Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller").field("node_id", &self.core.node_id).finish_non_exhaustive()
    }
}

fn raft_err<E: std::error::Error + Send + Sync + 'static>(op: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::Raft { op, source: Box::new(e) }
}

impl Controller {
    /// Opens the Raft state in `config.dir`, starts listening on `config.listen`, and joins
    /// the group. The node with the lowest id initialises the cluster with every peer as a
    /// voter when its log is empty; restarting with existing state never re-initialises.
    /// A background task registers this node (`RegisterNode` with its controller address)
    /// and then sends its heartbeat every [`CONTROLLER_HEARTBEAT_INTERVAL_MS`].
    pub async fn start(config: ControllerConfig) -> Result<Controller> {
        let Some(own_addr) = config.peers.get(&config.node_id).copied() else {
            return Err(Error::Config { reason: format!("controller peers lack node {}", config.node_id) });
        };
        if config.heartbeat_timeout_ms == 0 {
            return Err(Error::Config { reason: "heartbeat_timeout_ms must be positive".into() });
        }
        std::fs::create_dir_all(&config.dir).map_err(|source| Error::FileIo {
            op: "create directory",
            path: config.dir.clone(),
            source,
        })?;
        let log_store = LogStore::open(&config.dir)?;
        let state_machine = StateMachine::open(&config.dir)?;
        let metadata = state_machine.subscribe();
        let raft_config = openraft::Config {
            cluster_name: "rill-controller".into(),
            heartbeat_interval: RAFT_HEARTBEAT_INTERVAL_MS,
            election_timeout_min: RAFT_ELECTION_TIMEOUT_MIN_MS,
            election_timeout_max: RAFT_ELECTION_TIMEOUT_MAX_MS,
            snapshot_max_chunk_size: CONTROLLER_SNAPSHOT_CHUNK_SIZE_BYTES,
            ..Default::default()
        };
        let raft_config = Arc::new(raft_config.validate().map_err(raft_err("validate config"))?);
        let listener = TcpListener::bind(config.listen).await.map_err(|e| Error::io("bind controller listener", e))?;
        let network = Network { peers: config.peers.clone() };
        let raft = Raft::new(config.node_id, raft_config, network, log_store, state_machine)
            .await
            .map_err(raft_err("start"))?;
        let core = Arc::new(Core {
            node_id: config.node_id,
            raft,
            peers: config.peers.clone(),
            liveness: parking_lot::Mutex::new(Liveness::default()),
            forward: tokio::sync::Mutex::new(None),
        });
        let server = tokio::spawn(serve(listener, Arc::clone(&core)));
        if config.peers.keys().next() == Some(&config.node_id) {
            core.initialize().await?;
        }
        let timeout = Duration::from_millis(config.heartbeat_timeout_ms);
        let registrations_at_start = metadata.borrow().nodes.get(&config.node_id).map_or(0, |n| n.registrations);
        let background = vec![
            tokio::spawn(watch_liveness(Arc::clone(&core), metadata.clone(), timeout)),
            tokio::spawn(register_and_heartbeat(
                Arc::clone(&core),
                if config.advertised_addr.is_empty() { own_addr.to_string() } else { config.advertised_addr.clone() },
                config.kafka_addr.clone(),
            )),
        ];
        Ok(Controller {
            core,
            metadata,
            registrations_at_start,
            server: parking_lot::Mutex::new(Some(server)),
            background: parking_lot::Mutex::new(background),
        })
    }

    /// Proposes `cmd` and waits until it is applied (on the Raft leader), returning whether
    /// the rules applied or rejected it. On a follower the command is forwarded to the
    /// leader. Gives up after [`CONTROLLER_PROPOSE_TIMEOUT_MS`] without a reachable leader.
    pub async fn propose(&self, cmd: Command) -> Result<CommandResult> {
        self.core.propose(cmd).await
    }

    /// This node's registration count in the metadata when it started: once the local
    /// metadata shows a larger one, this start's registration and everything committed
    /// before it have been applied here (the metadata is not a stale copy).
    pub fn registrations_at_start(&self) -> u64 {
        self.registrations_at_start
    }

    /// The metadata as applied on this node, updated after every applied entry.
    pub fn metadata(&self) -> watch::Receiver<ClusterMetadata> {
        self.metadata.clone()
    }

    /// Reports `node_id` alive to the Raft leader (locally when this node leads). Nodes call
    /// it about every 500 ms; this controller already does so for its own node. A failure
    /// (no leader, unreachable) is logged and dropped: the next heartbeat retries.
    pub async fn heartbeat(&self, node_id: u32) {
        self.core.heartbeat(node_id).await;
    }

    /// The Raft leader as this node knows it.
    pub fn raft_leader(&self) -> Option<u32> {
        self.core.raft.metrics().borrow().current_leader
    }

    /// Stops heartbeating, stops the Raft node and closes the listener and its connections.
    /// A second call does nothing.
    pub async fn shutdown(&self) {
        let background = std::mem::take(&mut *self.background.lock());
        let Some(server) = self.server.lock().take() else { return };
        for task in &background {
            task.abort();
        }
        for task in background {
            // Cancelled or finished: either way it is gone.
            let _cancelled = task.await;
        }
        if let Err(e) = self.core.raft.shutdown().await {
            tracing::warn!(node = self.core.node_id, error = %e, "controller: raft shutdown");
        }
        server.abort();
        let _cancelled = server.await;
    }
}

impl Core {
    fn is_leader(&self) -> bool {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.node_id)
    }

    async fn initialize(&self) -> Result<()> {
        if self.raft.is_initialized().await.map_err(raft_err("check initialized"))? {
            return Ok(());
        }
        let members: BTreeMap<u32, BasicNode> =
            self.peers.iter().map(|(&id, addr)| (id, BasicNode::new(addr))).collect();
        match self.raft.initialize(members).await {
            Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(raft_err("initialize")(e)),
        }
    }

    /// Writes `cmd` through the local Raft node; `Ok(Err(leader))` when it is not the
    /// leader (with the leader it knows of).
    async fn write_local(&self, cmd: Command) -> Result<Result<CommandResult, Option<u32>>> {
        match self.raft.client_write(cmd).await {
            Ok(response) => Ok(Ok(response.data)),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Ok(Err(f.leader_id)),
            Err(e) => Err(raft_err("client write")(e)),
        }
    }

    /// [`Core::write_local`] for a peer's `Forward`.
    async fn write_forwarded(&self, cmd: Command) -> Result<CommandResult, ForwardError> {
        match self.write_local(cmd).await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(leader)) => Err(ForwardError::NotLeader { leader }),
            Err(e) => Err(ForwardError::Failed { reason: e.to_string() }),
        }
    }

    async fn propose(&self, cmd: Command) -> Result<CommandResult> {
        let deadline = Instant::now() + Duration::from_millis(CONTROLLER_PROPOSE_TIMEOUT_MS);
        let mut last_error: Option<Error> = None;
        while Instant::now() < deadline {
            let leader = match self.write_local(cmd.clone()).await? {
                Ok(result) => return Ok(result),
                Err(leader) => leader,
            };
            if let Some(leader) = leader.filter(|&l| l != self.node_id) {
                match self.forward(leader, &Request::Forward(cmd.clone())).await {
                    Ok(Response::Forward(Ok(result))) => return Ok(result),
                    Ok(Response::Forward(Err(ForwardError::Failed { reason }))) => {
                        return Err(Error::ControllerRemote { node: leader, reason });
                    }
                    Ok(Response::Forward(Err(ForwardError::NotLeader { .. }))) => {}
                    Ok(_) => last_error = Some(Error::malformed("a forward answered with another kind")),
                    Err(e) => last_error = Some(e),
                }
            }
            tokio::time::sleep(Duration::from_millis(PROPOSE_RETRY_MS)).await;
        }
        if let Some(e) = last_error {
            tracing::debug!(node = self.node_id, error = %e, "controller: last forwarding failure");
        }
        Err(Error::Timeout {
            what: "a controller leader to write a command",
            timeout_ms: CONTROLLER_PROPOSE_TIMEOUT_MS,
        })
    }

    /// Sends `request` to `leader` over the cached forwarding connection.
    async fn forward(&self, leader: u32, request: &Request) -> Result<Response> {
        let Some(addr) = self.peers.get(&leader) else {
            return Err(Error::Config { reason: format!("raft leader {leader} is not among the peers") });
        };
        let mut slot = self.forward.lock().await;
        let client = match &mut *slot {
            Some(client) if client.target == leader => client,
            _ => slot.insert(PeerClient::new(leader, addr.to_string())),
        };
        client.call(request, Duration::from_millis(FORWARD_TIMEOUT_MS)).await.map_err(network::CallError::into_error)
    }

    /// Records a heartbeat if this node leads, else reports whether the caller should
    /// forward it.
    fn heartbeat_local(&self, node_id: u32) -> Result<(), ForwardError> {
        if !self.is_leader() {
            return Err(ForwardError::NotLeader { leader: self.raft.metrics().borrow().current_leader });
        }
        self.liveness.lock().last_seen.insert(node_id, Instant::now());
        Ok(())
    }

    async fn heartbeat(&self, node_id: u32) {
        let leader = match self.heartbeat_local(node_id) {
            Ok(()) => return,
            Err(ForwardError::NotLeader { leader: Some(leader) }) if leader != self.node_id => leader,
            Err(_) => return,
        };
        match self.forward(leader, &Request::Heartbeat { node_id }).await {
            Ok(Response::Heartbeat(Ok(()))) => {}
            Ok(Response::Heartbeat(Err(e))) => {
                tracing::debug!(node_id, leader, error = %e, "controller: heartbeat refused")
            }
            Ok(_) => tracing::debug!(node_id, leader, "controller: heartbeat answered with another kind"),
            Err(e) => tracing::debug!(node_id, leader, error = %e, "controller: heartbeat not delivered"),
        }
    }

    /// Answers one request from a peer.
    async fn handle(&self, request: Request) -> Response {
        match request {
            Request::AppendEntries(rpc) => Response::AppendEntries(self.raft.append_entries(rpc).await),
            Request::Vote(rpc) => Response::Vote(self.raft.vote(rpc).await),
            Request::InstallSnapshot(rpc) => Response::InstallSnapshot(self.raft.install_snapshot(rpc).await),
            Request::Forward(cmd) => Response::Forward(self.write_forwarded(cmd).await),
            Request::Heartbeat { node_id } => Response::Heartbeat(self.heartbeat_local(node_id)),
        }
    }
}

/// Accepts peers' connections until aborted; dropping the task drops (aborts) every
/// connection task with it.
async fn serve(listener: TcpListener, core: Arc<Core>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, Arc::clone(&core)));
                }
                Err(e) => {
                    tracing::warn!(node = core.node_id, error = %e, "controller: accept failed");
                    tokio::time::sleep(Duration::from_millis(PROPOSE_RETRY_MS)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// One peer connection: a request frame in, its response frame out, until the peer closes
/// or breaks the protocol.
async fn serve_connection(mut stream: TcpStream, core: Arc<Core>) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "controller: set nodelay");
    }
    loop {
        let request = match network::read_frame::<Request>(&mut stream).await {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(node = core.node_id, error = %e, "controller: closing a connection");
                return;
            }
        };
        let response = core.handle(request).await;
        let frame = match network::encode_frame(&response) {
            Ok(frame) => frame,
            Err(e) => {
                tracing::warn!(node = core.node_id, error = %e, "controller: response not encodable");
                return;
            }
        };
        if let Err(e) = tokio::io::AsyncWriteExt::write_all(&mut stream, &frame).await {
            tracing::debug!(node = core.node_id, error = %e, "controller: response not sent");
            return;
        }
    }
}

/// This node's registration, then its heartbeat every [`CONTROLLER_HEARTBEAT_INTERVAL_MS`].
async fn register_and_heartbeat(core: Arc<Core>, addr: String, kafka_addr: String) {
    loop {
        let cmd = Command::RegisterNode { id: core.node_id, addr: addr.clone(), kafka_addr: kafka_addr.clone() };
        match core.propose(cmd).await {
            Ok(CommandResult::Applied) => break,
            Ok(CommandResult::Rejected(r)) => {
                tracing::warn!(node = core.node_id, rejection = %r, "controller: registration refused")
            }
            Err(e) => tracing::debug!(node = core.node_id, error = %e, "controller: registration not written yet"),
        }
        tokio::time::sleep(Duration::from_millis(CONTROLLER_HEARTBEAT_INTERVAL_MS)).await;
    }
    let mut tick = tokio::time::interval(Duration::from_millis(CONTROLLER_HEARTBEAT_INTERVAL_MS));
    loop {
        tick.tick().await;
        core.heartbeat(core.node_id).await;
    }
}

/// On the Raft leader: proposes `NodeDown` for a node silent for `timeout` and `NodeUp` for
/// a down node heard from again. A node that just became leader first gives every node a
/// full `timeout` from that moment.
async fn watch_liveness(core: Arc<Core>, metadata: watch::Receiver<ClusterMetadata>, timeout: Duration) {
    let period = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
    let mut tick = tokio::time::interval(period);
    let mut leading = false;
    loop {
        tick.tick().await;
        if !core.is_leader() {
            leading = false;
            continue;
        }
        let now = Instant::now();
        if !leading {
            // Heartbeats went to the previous leader: start every alive node's clock now, and
            // let a down node come back only by speaking to this one.
            leading = true;
            let alive: Vec<u32> = metadata.borrow().nodes.iter().filter(|(_, n)| n.alive).map(|(&id, _)| id).collect();
            let mut liveness = core.liveness.lock();
            liveness.last_seen.clear();
            for id in alive {
                liveness.last_seen.insert(id, now);
            }
            continue;
        }
        let changes: Vec<Command> = {
            let md = metadata.borrow();
            let mut liveness = core.liveness.lock();
            md.nodes
                .iter()
                .filter_map(|(&id, info)| {
                    let silent = match liveness.last_seen.get(&id) {
                        Some(&seen) => now.duration_since(seen) > timeout,
                        // Registered since this node took over: its clock starts now.
                        None if info.alive => {
                            liveness.last_seen.insert(id, now);
                            false
                        }
                        None => true,
                    };
                    match (info.alive, silent) {
                        (true, true) => Some(Command::NodeDown { id }),
                        (false, false) => Some(Command::NodeUp { id }),
                        _ => None,
                    }
                })
                .collect()
        };
        for cmd in changes {
            match core.write_forwarded(cmd.clone()).await {
                Ok(result) => tracing::info!(node = core.node_id, ?cmd, ?result, "controller: liveness change"),
                Err(e) => {
                    tracing::debug!(node = core.node_id, ?cmd, error = %e, "controller: liveness change not written")
                }
            }
        }
    }
}
