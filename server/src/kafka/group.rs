//! Kafka's classic consumer-group protocol (JoinGroup, SyncGroup, Heartbeat, LeaveGroup) for
//! the Kafka listener.
//!
//! Unlike rill's own groups (`rill_engine::cursor::group`, assignment on the server), Kafka
//! clients assign partitions themselves: the broker collects the members of a generation,
//! hands every member's subscription to a leader member, and passes the leader's assignment
//! on. Membership is held in memory (as in rill's own groups); committed offsets go to the
//! engine's durable offsets under the group's name, so `rill consume --group G` sees them.
//!
//! Phases: `Empty` → (join) `PreparingRebalance` → (every member joined, or the rebalance
//! timeout) `AwaitingSync` → (leader's SyncGroup) `Stable` → (join, leave, expiry)
//! `PreparingRebalance` …

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::oneshot;

/// Kafka error codes used by the group protocol.
pub mod codes {
    /// `ILLEGAL_GENERATION`.
    pub const ILLEGAL_GENERATION: i16 = 22;
    /// `INCONSISTENT_GROUP_PROTOCOL`.
    pub const INCONSISTENT_GROUP_PROTOCOL: i16 = 23;
    /// `INVALID_GROUP_ID`.
    pub const INVALID_GROUP_ID: i16 = 24;
    /// `UNKNOWN_MEMBER_ID`.
    pub const UNKNOWN_MEMBER_ID: i16 = 25;
    /// `INVALID_SESSION_TIMEOUT`.
    pub const INVALID_SESSION_TIMEOUT: i16 = 26;
    /// `REBALANCE_IN_PROGRESS`.
    pub const REBALANCE_IN_PROGRESS: i16 = 27;
}

/// Shortest and longest session timeout a member may ask for (Kafka's broker defaults).
pub const SESSION_TIMEOUT_MS_MIN: i32 = 1_000;
/// See [`SESSION_TIMEOUT_MS_MIN`].
pub const SESSION_TIMEOUT_MS_MAX: i32 = 1_800_000;

/// What a JoinGroup is answered with.
#[derive(Clone, Debug, Default)]
pub struct JoinOutcome {
    /// Kafka error code (0 on success).
    pub error_code: i16,
    /// Generation the member joined.
    pub generation: i32,
    /// Chosen assignment protocol (e.g. `range`).
    pub protocol: Option<String>,
    /// The group's protocol type (`consumer`).
    pub protocol_type: Option<String>,
    /// Leader member id.
    pub leader: String,
    /// This member's id.
    pub member_id: String,
    /// For the leader only: every member and its metadata for the chosen protocol.
    pub members: Vec<(String, Bytes)>,
}

/// What a SyncGroup is answered with.
#[derive(Clone, Debug, Default)]
pub struct SyncOutcome {
    /// Kafka error code (0 on success).
    pub error_code: i16,
    /// The member's assignment (opaque to the broker).
    pub assignment: Bytes,
}

/// A JoinGroup as the coordinator needs it.
#[derive(Clone, Debug)]
pub struct JoinRequest {
    /// Member id; empty for a new member.
    pub member_id: String,
    /// Client id from the request header (prefix of a new member id).
    pub client_id: String,
    /// Session timeout.
    pub session_timeout_ms: i32,
    /// How long a rebalance waits for this member to rejoin.
    pub rebalance_timeout_ms: i32,
    /// Protocol type (`consumer`).
    pub protocol_type: String,
    /// Supported protocols in preference order, with their metadata.
    pub protocols: Vec<(String, Bytes)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Empty,
    PreparingRebalance,
    AwaitingSync,
    Stable,
}

#[derive(Debug)]
struct Member {
    session_timeout: Duration,
    rebalance_timeout: Duration,
    protocols: Vec<(String, Bytes)>,
    last_heard: Instant,
    join_waiter: Option<oneshot::Sender<JoinOutcome>>,
    sync_waiter: Option<oneshot::Sender<SyncOutcome>>,
    assignment: Bytes,
}

#[derive(Debug)]
struct Group {
    phase: Phase,
    generation: i32,
    protocol_type: Option<String>,
    protocol: Option<String>,
    leader: Option<String>,
    members: BTreeMap<String, Member>,
    /// When a rebalance gives up on members that have not rejoined.
    rebalance_deadline: Option<Instant>,
}

impl Group {
    fn new() -> Self {
        Group {
            phase: Phase::Empty,
            generation: 0,
            protocol_type: None,
            protocol: None,
            leader: None,
            members: BTreeMap::new(),
            rebalance_deadline: None,
        }
    }

    /// Enters `PreparingRebalance` (members learn of it from heartbeats); followers waiting
    /// in SyncGroup are told to rejoin.
    fn prepare_rebalance(&mut self, now: Instant) {
        if self.phase == Phase::AwaitingSync {
            for member in self.members.values_mut() {
                if let Some(waiter) = member.sync_waiter.take() {
                    drop(waiter.send(SyncOutcome { error_code: codes::REBALANCE_IN_PROGRESS, ..Default::default() }));
                }
            }
        }
        if self.phase != Phase::PreparingRebalance {
            let timeout = self.members.values().map(|m| m.rebalance_timeout).max().unwrap_or_default();
            self.rebalance_deadline = Some(now + timeout);
        }
        self.phase = Phase::PreparingRebalance;
    }

    /// Completes the rebalance if every member has rejoined, or if `force` (the deadline
    /// passed: members that did not rejoin are removed).
    fn maybe_complete(&mut self, force: bool) {
        if self.phase != Phase::PreparingRebalance {
            return;
        }
        let all_joined = self.members.values().all(|m| m.join_waiter.is_some());
        if !all_joined && !force {
            return;
        }
        self.members.retain(|_, m| m.join_waiter.is_some());
        self.rebalance_deadline = None;
        if self.members.is_empty() {
            self.phase = Phase::Empty;
            self.leader = None;
            self.protocol = None;
            self.protocol_type = None;
            self.generation += 1;
            return;
        }
        self.generation += 1;
        let leader = match &self.leader {
            Some(leader) if self.members.contains_key(leader) => leader.clone(),
            _ => self.members.keys().next().cloned().unwrap_or_default(),
        };
        // The first protocol of the leader's list that every member supports.
        let protocol = self.members.get(&leader).and_then(|l| {
            l.protocols
                .iter()
                .map(|(name, _)| name)
                .find(|name| self.members.values().all(|m| m.protocols.iter().any(|(n, _)| n == *name)))
                .cloned()
        });
        let roster: Vec<(String, Bytes)> = match &protocol {
            Some(chosen) => self
                .members
                .iter()
                .map(|(id, m)| {
                    let metadata = m.protocols.iter().find(|(n, _)| n == chosen).map(|(_, md)| md.clone());
                    (id.clone(), metadata.unwrap_or_default())
                })
                .collect(),
            None => Vec::new(),
        };
        self.leader = Some(leader.clone());
        self.protocol = protocol.clone();
        self.phase = Phase::AwaitingSync;
        let now = Instant::now();
        for (id, member) in &mut self.members {
            member.assignment = Bytes::new();
            member.last_heard = now;
            if let Some(waiter) = member.join_waiter.take() {
                let outcome = JoinOutcome {
                    error_code: if protocol.is_some() { 0 } else { codes::INCONSISTENT_GROUP_PROTOCOL },
                    generation: self.generation,
                    protocol: protocol.clone(),
                    protocol_type: self.protocol_type.clone(),
                    leader: leader.clone(),
                    member_id: id.clone(),
                    members: if *id == leader { roster.clone() } else { Vec::new() },
                };
                drop(waiter.send(outcome));
            }
        }
    }

    fn remove_member(&mut self, member_id: &str, now: Instant) {
        if let Some(member) = self.members.remove(member_id) {
            if let Some(waiter) = member.join_waiter {
                drop(waiter.send(JoinOutcome { error_code: codes::UNKNOWN_MEMBER_ID, ..Default::default() }));
            }
            if let Some(waiter) = member.sync_waiter {
                drop(waiter.send(SyncOutcome { error_code: codes::UNKNOWN_MEMBER_ID, ..Default::default() }));
            }
        }
        if self.members.is_empty() {
            self.phase = Phase::Empty;
            self.leader = None;
            self.rebalance_deadline = None;
            self.protocol = None;
            self.protocol_type = None;
        } else {
            self.prepare_rebalance(now);
            self.maybe_complete(false);
        }
    }

    /// Checks that `member_id` is in the group at `generation`; refreshes its session.
    fn check_member(&mut self, member_id: &str, generation: i32, now: Instant) -> Result<(), i16> {
        let current = self.generation;
        let member = self.members.get_mut(member_id).ok_or(codes::UNKNOWN_MEMBER_ID)?;
        member.last_heard = now;
        if generation != current {
            return Err(codes::ILLEGAL_GENERATION);
        }
        Ok(())
    }
}

/// The coordinator of every Kafka consumer group on this broker.
#[derive(Debug, Default)]
pub struct KafkaGroups {
    groups: Mutex<HashMap<String, Group>>,
    next_member: std::sync::atomic::AtomicU64,
    /// Distinguishes member ids of this process from those of an earlier one.
    boot: u64,
}

impl KafkaGroups {
    /// A coordinator with no groups.
    pub fn new() -> Self {
        let boot = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() ^ u64::from(d.subsec_nanos()) << 20);
        KafkaGroups { boot, ..Default::default() }
    }

    /// Handles a JoinGroup; resolves once the generation is formed (or the member is
    /// refused). The caller awaits the receiver.
    pub fn join(self: &Arc<Self>, group_id: &str, request: JoinRequest) -> oneshot::Receiver<JoinOutcome> {
        let (tx, rx) = oneshot::channel();
        let refuse = |tx: oneshot::Sender<JoinOutcome>, code: i16| {
            drop(tx.send(JoinOutcome { error_code: code, ..Default::default() }));
        };
        if group_id.is_empty() {
            refuse(tx, codes::INVALID_GROUP_ID);
            return rx;
        }
        if !(SESSION_TIMEOUT_MS_MIN..=SESSION_TIMEOUT_MS_MAX).contains(&request.session_timeout_ms) {
            refuse(tx, codes::INVALID_SESSION_TIMEOUT);
            return rx;
        }
        let now = Instant::now();
        let mut groups = self.groups.lock();
        let group = groups.entry(group_id.to_string()).or_insert_with(Group::new);
        if request.protocols.is_empty()
            || group.protocol_type.as_ref().is_some_and(|t| *t != request.protocol_type)
            || (group.phase != Phase::Empty
                && !request
                    .protocols
                    .iter()
                    .any(|(name, _)| group.members.values().all(|m| m.protocols.iter().any(|(n, _)| n == name))))
        {
            refuse(tx, codes::INCONSISTENT_GROUP_PROTOCOL);
            return rx;
        }
        let member_id = if request.member_id.is_empty() {
            let n = self.next_member.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let prefix = if request.client_id.is_empty() { "member" } else { request.client_id.as_str() };
            format!("{prefix}-{:x}-{n}", self.boot)
        } else if group.members.contains_key(&request.member_id) {
            request.member_id.clone()
        } else {
            refuse(tx, codes::UNKNOWN_MEMBER_ID);
            return rx;
        };
        if group.phase == Phase::Empty {
            group.protocol_type = Some(request.protocol_type.clone());
        }
        let rebalance_timeout_ms =
            if request.rebalance_timeout_ms > 0 { request.rebalance_timeout_ms } else { request.session_timeout_ms };
        let member = group.members.entry(member_id).or_insert_with(|| Member {
            session_timeout: Duration::ZERO,
            rebalance_timeout: Duration::ZERO,
            protocols: Vec::new(),
            last_heard: now,
            join_waiter: None,
            sync_waiter: None,
            assignment: Bytes::new(),
        });
        member.session_timeout = Duration::from_millis(request.session_timeout_ms.unsigned_abs().into());
        member.rebalance_timeout = Duration::from_millis(rebalance_timeout_ms.unsigned_abs().into());
        member.protocols = request.protocols;
        member.last_heard = now;
        if let Some(previous) = member.join_waiter.replace(tx) {
            drop(previous.send(JoinOutcome { error_code: codes::UNKNOWN_MEMBER_ID, ..Default::default() }));
        }
        group.prepare_rebalance(now);
        group.maybe_complete(false);
        rx
    }

    /// Handles a SyncGroup. The leader's call carries every member's assignment.
    pub fn sync(
        &self,
        group_id: &str,
        member_id: &str,
        generation: i32,
        assignments: Vec<(String, Bytes)>,
    ) -> oneshot::Receiver<SyncOutcome> {
        let (tx, rx) = oneshot::channel();
        let now = Instant::now();
        let mut groups = self.groups.lock();
        let Some(group) = groups.get_mut(group_id) else {
            drop(tx.send(SyncOutcome { error_code: codes::UNKNOWN_MEMBER_ID, ..Default::default() }));
            return rx;
        };
        if let Err(code) = group.check_member(member_id, generation, now) {
            drop(tx.send(SyncOutcome { error_code: code, ..Default::default() }));
            return rx;
        }
        match group.phase {
            Phase::Empty | Phase::PreparingRebalance => {
                drop(tx.send(SyncOutcome { error_code: codes::REBALANCE_IN_PROGRESS, ..Default::default() }));
            }
            Phase::Stable => {
                let assignment = group.members.get(member_id).map(|m| m.assignment.clone()).unwrap_or_default();
                drop(tx.send(SyncOutcome { error_code: 0, assignment }));
            }
            Phase::AwaitingSync if group.leader.as_deref() == Some(member_id) => {
                let mut assignments: HashMap<String, Bytes> = assignments.into_iter().collect();
                for (id, member) in &mut group.members {
                    member.assignment = assignments.remove(id).unwrap_or_default();
                    if let Some(waiter) = member.sync_waiter.take() {
                        drop(waiter.send(SyncOutcome { error_code: 0, assignment: member.assignment.clone() }));
                    }
                }
                group.phase = Phase::Stable;
                let assignment = group.members.get(member_id).map(|m| m.assignment.clone()).unwrap_or_default();
                drop(tx.send(SyncOutcome { error_code: 0, assignment }));
            }
            Phase::AwaitingSync => {
                if let Some(member) = group.members.get_mut(member_id) {
                    member.sync_waiter = Some(tx);
                }
            }
        }
        rx
    }

    /// Handles a Heartbeat: 0, or the error that tells the member to rejoin.
    pub fn heartbeat(&self, group_id: &str, member_id: &str, generation: i32) -> i16 {
        let now = Instant::now();
        let mut groups = self.groups.lock();
        let Some(group) = groups.get_mut(group_id) else { return codes::UNKNOWN_MEMBER_ID };
        if let Err(code) = group.check_member(member_id, generation, now) {
            return code;
        }
        match group.phase {
            Phase::PreparingRebalance => codes::REBALANCE_IN_PROGRESS,
            _ => 0,
        }
    }

    /// Handles a LeaveGroup for one member: 0 or `UNKNOWN_MEMBER_ID`.
    pub fn leave(&self, group_id: &str, member_id: &str) -> i16 {
        let now = Instant::now();
        let mut groups = self.groups.lock();
        let Some(group) = groups.get_mut(group_id) else { return codes::UNKNOWN_MEMBER_ID };
        if !group.members.contains_key(member_id) {
            return codes::UNKNOWN_MEMBER_ID;
        }
        group.remove_member(member_id, now);
        0
    }

    /// Checks an OffsetCommit against the membership: 0, or the Kafka error. A commit
    /// with generation −1 and no member id comes from outside the group protocol (a
    /// consumer that assigns partitions itself) and is accepted.
    pub fn check_commit(&self, group_id: &str, member_id: &str, generation: i32) -> i16 {
        if generation < 0 && member_id.is_empty() {
            return 0;
        }
        // The same checks as a heartbeat (which a commit also counts as).
        self.heartbeat(group_id, member_id, generation)
    }

    /// Removes members whose session expired and completes rebalances whose deadline
    /// passed. Called periodically by the listener.
    pub fn expire(&self, now: Instant) {
        let mut groups = self.groups.lock();
        for group in groups.values_mut() {
            let expired: Vec<String> = group
                .members
                .iter()
                .filter(|(_, m)| m.join_waiter.is_none() && now.duration_since(m.last_heard) > m.session_timeout)
                .map(|(id, _)| id.clone())
                .collect();
            for id in expired {
                tracing::info!(member = %id, "kafka group member session expired");
                group.remove_member(&id, now);
            }
            if group.rebalance_deadline.is_some_and(|deadline| now >= deadline) {
                group.maybe_complete(true);
            }
        }
        groups.retain(|_, g| g.phase != Phase::Empty || !g.members.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(member_id: &str, protocols: &[&str]) -> JoinRequest {
        JoinRequest {
            member_id: member_id.into(),
            client_id: "test".into(),
            session_timeout_ms: 10_000,
            rebalance_timeout_ms: 10_000,
            protocol_type: "consumer".into(),
            protocols: protocols.iter().map(|p| (p.to_string(), Bytes::from(p.to_string()))).collect(),
        }
    }

    fn outcome<T>(mut rx: oneshot::Receiver<T>) -> Option<T> {
        rx.try_recv().ok()
    }

    /// One member forms generation 1 at once; a second join puts the group into a rebalance
    /// that completes when the first rejoins; the leader's assignment reaches the follower.
    #[test]
    fn two_members_join_sync_and_rebalance() {
        let groups = Arc::new(KafkaGroups::new());
        let first = outcome(groups.join("g", request("", &["range"]))).expect("formed at once");
        assert_eq!((first.error_code, first.generation), (0, 1));
        assert_eq!(first.leader, first.member_id);
        assert_eq!(first.members.len(), 1);
        let a = first.member_id.clone();
        let sync = outcome(groups.sync("g", &a, 1, vec![(a.clone(), Bytes::from_static(b"all"))])).expect("sync");
        assert_eq!(sync.assignment, Bytes::from_static(b"all"));
        assert_eq!(groups.heartbeat("g", &a, 1), 0);

        let mut second = groups.join("g", request("", &["range", "roundrobin"]));
        assert!(second.try_recv().is_err(), "waits for the first member to rejoin");
        assert_eq!(groups.heartbeat("g", &a, 1), codes::REBALANCE_IN_PROGRESS);
        assert_eq!(groups.check_commit("g", &a, 1), codes::REBALANCE_IN_PROGRESS);
        let rejoined = outcome(groups.join("g", request(&a, &["range"]))).expect("completes");
        let second = second.try_recv().expect("second formed");
        assert_eq!((rejoined.generation, second.generation), (2, 2));
        assert_eq!(rejoined.leader, a, "the leader stays");
        assert_eq!(rejoined.members.len(), 2);
        assert!(second.members.is_empty(), "only the leader sees the roster");
        assert_eq!(rejoined.protocol.as_deref(), Some("range"));
        let b = second.member_id.clone();

        let mut follower = groups.sync("g", &b, 2, Vec::new());
        assert!(follower.try_recv().is_err(), "waits for the leader");
        assert_eq!(groups.heartbeat("g", &b, 2), 0, "heartbeats are fine while awaiting sync");
        let assignments = vec![(a.clone(), Bytes::from_static(b"p0")), (b.clone(), Bytes::from_static(b"p1"))];
        outcome(groups.sync("g", &a, 2, assignments)).expect("leader sync");
        assert_eq!(follower.try_recv().expect("follower assigned").assignment, Bytes::from_static(b"p1"));
        assert_eq!(groups.check_commit("g", &b, 1), codes::ILLEGAL_GENERATION);
        assert_eq!(groups.check_commit("g", &b, 2), 0);
        assert_eq!(groups.check_commit("g", "", -1), 0, "a commit from outside the protocol");
        assert_eq!(groups.check_commit("g", "nobody", 2), codes::UNKNOWN_MEMBER_ID);

        assert_eq!(groups.leave("g", &b), 0);
        assert_eq!(groups.heartbeat("g", &a, 2), codes::REBALANCE_IN_PROGRESS);
        let alone = outcome(groups.join("g", request(&a, &["range"]))).expect("alone");
        assert_eq!((alone.generation, alone.members.len()), (3, 1));
    }

    /// A member that stops heartbeating is removed after its session timeout; a rebalance
    /// whose members do not all rejoin completes at its deadline without them.
    #[test]
    fn silent_members_expire() {
        let groups = Arc::new(KafkaGroups::new());
        let a = outcome(groups.join("g", request("", &["range"]))).expect("a").member_id;
        outcome(groups.sync("g", &a, 1, Vec::new())).expect("sync");
        let mut b = groups.join("g", request("", &["range"]));
        let later = Instant::now() + Duration::from_secs(11);
        groups.expire(later);
        let b = b.try_recv().expect("formed without the silent member");
        assert_eq!((b.generation, b.members.len()), (2, 1));
        assert_eq!(groups.heartbeat("g", &a, 1), codes::UNKNOWN_MEMBER_ID);
    }

    /// Joins that cannot be served are refused with Kafka's codes.
    #[test]
    fn bad_joins_are_refused() {
        let groups = Arc::new(KafkaGroups::new());
        let code = |r: JoinRequest| outcome(groups.join("g", r)).expect("answered").error_code;
        assert_eq!(code(request("ghost", &["range"])), codes::UNKNOWN_MEMBER_ID);
        assert_eq!(
            code(JoinRequest { session_timeout_ms: 10, ..request("", &["range"]) }),
            codes::INVALID_SESSION_TIMEOUT
        );
        assert_eq!(code(request("", &[])), codes::INCONSISTENT_GROUP_PROTOCOL);
        outcome(groups.join("g", request("", &["range"]))).expect("first");
        assert_eq!(code(request("", &["sticky"])), codes::INCONSISTENT_GROUP_PROTOCOL);
        assert_eq!(outcome(groups.join("", request("", &["range"]))).expect("x").error_code, codes::INVALID_GROUP_ID);
    }
}
