//! The replicated cluster metadata and the rules that change it.
//!
//! Owns [`ClusterMetadata`], the [`Command`]s the Raft log carries and
//! [`ClusterMetadata::apply`], a pure function from (state, command) to (state, result). It is
//! the whole state machine: every node applies the same committed commands in the same order
//! and must reach the same bytes, so this module must never read clocks, randomness, the
//! environment or anything but its arguments.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::limits::{CONTROLLER_PARTITIONS_MAX, CONTROLLER_REPLICATION_FACTOR_MAX};

/// A broker node as the controller knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The address the node registered with.
    pub addr: String,
    /// Whether the node is considered up (registered and heartbeating).
    pub alive: bool,
    /// How many times the node registered (once per start): a node acts on the metadata
    /// only once its own new registration is in it, so never on a stale copy.
    #[serde(default)]
    pub registrations: u64,
    /// The node's Kafka-protocol listener (`host:port`) as Kafka clients should reach it;
    /// empty without one.
    #[serde(default)]
    pub kafka_addr: String,
}

/// A topic's settings, replicated with its assignment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicSettings {
    /// `"always"`, `"never"` or `"interval:<ms>"`.
    pub fsync: String,
    /// Segment roll size.
    pub segment_size_bytes: u64,
    /// Size-based retention per partition, if any.
    pub retention_bytes: Option<u64>,
    /// Time-based retention, if any.
    pub retention_ms: Option<u64>,
}

/// Where one partition lives and who leads it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionAssignment {
    /// The replicas; the first is the preferred leader.
    pub replicas: Vec<u32>,
    /// The current leader; `None` when the partition is offline (no live ISR member).
    pub leader: Option<u32>,
    /// Bumped on every leader change; starts at 1.
    pub leader_epoch: u32,
    /// The in-sync replicas; always includes the leader when there is one.
    pub isr: Vec<u32>,
}

/// A topic's partitions and settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicAssignment {
    /// One entry per partition, indexed by partition number.
    pub partitions: Vec<PartitionAssignment>,
    /// The topic's settings.
    pub config: TopicSettings,
}

/// Everything the controller replicates.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMetadata {
    /// Known nodes by id.
    pub nodes: BTreeMap<u32, NodeInfo>,
    /// Topics by name.
    pub topics: BTreeMap<String, TopicAssignment>,
}

/// A change to the cluster metadata, as carried by the Raft log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A node (re)starting; marks it alive and records its address.
    RegisterNode {
        /// The node.
        id: u32,
        /// Its address.
        addr: String,
        /// Its Kafka-protocol listener (`host:port`), empty without one.
        #[serde(default)]
        kafka_addr: String,
    },
    /// Proposed by the Raft leader when a node's heartbeats stop.
    NodeDown {
        /// The node.
        id: u32,
    },
    /// Proposed by the Raft leader when a node's heartbeats resume.
    NodeUp {
        /// The node.
        id: u32,
    },
    /// Creates a topic and assigns its replicas.
    CreateTopic {
        /// Topic name.
        name: String,
        /// Number of partitions (at least 1).
        partitions: u32,
        /// Replicas per partition (at least 1, at most the alive nodes).
        replication_factor: u32,
        /// The topic's settings.
        config: TopicSettings,
    },
    /// Deletes a topic.
    DeleteTopic {
        /// Topic name.
        name: String,
    },
    /// A partition leader reporting its in-sync replicas.
    UpdateIsr {
        /// Topic name.
        topic: String,
        /// Partition number.
        partition: u32,
        /// The epoch the leader leads in; must be the partition's current epoch.
        leader_epoch: u32,
        /// The new in-sync replicas; must contain the leader.
        isr: Vec<u32>,
    },
}

/// Why a command was not applied. The state is unchanged when a command is rejected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    /// `CreateTopic` for a name that exists.
    #[error("topic {name:?} exists")]
    TopicExists {
        /// The name.
        name: String,
    },
    /// A topic that does not exist.
    #[error("topic {name:?} not found")]
    TopicNotFound {
        /// The name.
        name: String,
    },
    /// A partition number past the topic's partitions.
    #[error("topic {topic:?} has no partition {partition}")]
    PartitionNotFound {
        /// The topic.
        topic: String,
        /// The partition asked for.
        partition: u32,
    },
    /// Fewer alive nodes than the replication factor.
    #[error("replication factor {replication_factor} needs that many alive nodes, {alive} alive")]
    NotEnoughAliveNodes {
        /// Asked for.
        replication_factor: u32,
        /// Alive now.
        alive: u32,
    },
    /// An argument out of its valid range (empty name, zero partitions, …).
    #[error("invalid argument: {reason}")]
    InvalidArgument {
        /// What is wrong.
        reason: String,
    },
    /// A command names a node that never registered.
    #[error("node {id} is not registered")]
    UnknownNode {
        /// The node.
        id: u32,
    },
    /// `UpdateIsr` from a leader whose epoch is not the partition's current one.
    #[error("leader epoch {given} is stale, current is {current}")]
    StaleLeaderEpoch {
        /// The epoch in the request.
        given: u32,
        /// The partition's epoch.
        current: u32,
    },
    /// `UpdateIsr` whose ISR leaves out the leader, names a non-replica, repeats a member, or
    /// targets an offline partition.
    #[error("invalid ISR {isr:?}: {reason}")]
    InvalidIsr {
        /// The ISR asked for.
        isr: Vec<u32>,
        /// What is wrong.
        reason: String,
    },
}

/// The outcome of applying one command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    /// The command was applied (possibly changing nothing, e.g. `NodeUp` of an alive node).
    Applied,
    /// The command was refused; the state is unchanged.
    Rejected(Rejection),
}

impl ClusterMetadata {
    /// Applies `cmd`, returning whether it was applied. Deterministic: the same state and
    /// command give the same result on every node.
    pub fn apply(&mut self, cmd: &Command) -> CommandResult {
        let outcome = match cmd {
            Command::RegisterNode { id, addr, kafka_addr } => {
                self.register_node(*id, addr, kafka_addr);
                Ok(())
            }
            Command::NodeDown { id } => self.node_down(*id),
            Command::NodeUp { id } => self.node_up(*id),
            Command::CreateTopic { name, partitions, replication_factor, config } => {
                self.create_topic(name, *partitions, *replication_factor, config)
            }
            Command::DeleteTopic { name } => match self.topics.remove(name) {
                Some(_) => Ok(()),
                None => Err(Rejection::TopicNotFound { name: name.clone() }),
            },
            Command::UpdateIsr { topic, partition, leader_epoch, isr } => {
                self.update_isr(topic, *partition, *leader_epoch, isr)
            }
        };
        #[cfg(debug_assertions)]
        self.check_invariants();
        match outcome {
            Ok(()) => CommandResult::Applied,
            Err(rejection) => CommandResult::Rejected(rejection),
        }
    }

    fn register_node(&mut self, id: u32, addr: &str, kafka_addr: &str) {
        let node = self.nodes.entry(id).or_insert_with(|| NodeInfo {
            addr: String::new(),
            alive: false,
            registrations: 0,
            kafka_addr: String::new(),
        });
        node.addr = addr.to_string();
        node.kafka_addr = kafka_addr.to_string();
        node.alive = true;
        node.registrations += 1;
        // A restarted leader starts a new leadership: its followers must check their logs
        // against it again (its unsynced tail may be gone).
        for topic in self.topics.values_mut() {
            for p in &mut topic.partitions {
                if p.leader == Some(id) {
                    p.leader_epoch += 1;
                }
            }
        }
        self.node_up_elect(id);
    }

    fn node_up(&mut self, id: u32) -> Result<(), Rejection> {
        let node = self.nodes.get_mut(&id).ok_or(Rejection::UnknownNode { id })?;
        node.alive = true;
        self.node_up_elect(id);
        Ok(())
    }

    /// Every offline partition whose ISR holds `id` gets `id` as its leader.
    fn node_up_elect(&mut self, id: u32) {
        for partition in self.partitions_mut() {
            if partition.leader.is_none() && partition.isr.contains(&id) {
                partition.leader = Some(id);
                partition.leader_epoch += 1;
            }
        }
    }

    fn node_down(&mut self, id: u32) -> Result<(), Rejection> {
        let node = self.nodes.get_mut(&id).ok_or(Rejection::UnknownNode { id })?;
        node.alive = false;
        let nodes = &self.nodes;
        let is_alive = |n: u32| nodes.get(&n).is_some_and(|info| info.alive);
        for topic in self.topics.values_mut() {
            for partition in &mut topic.partitions {
                match partition.leader {
                    Some(leader) if leader == id => {
                        // Clean election only: the next leader comes from the ISR. With none
                        // alive the partition goes offline and keeps its ISR, `id` included,
                        // so the last leader can take it back (`node_up_elect`).
                        let next = partition.isr.iter().copied().find(|&n| n != id && is_alive(n));
                        partition.leader_epoch += 1;
                        partition.leader = next;
                        if next.is_some() {
                            partition.isr.retain(|&n| n != id);
                        }
                    }
                    // A follower leaves the ISR of a partition that still has a leader; an
                    // offline partition's ISR stays as it was (it is who may lead it again).
                    Some(_) => partition.isr.retain(|&n| n != id),
                    None => {}
                }
            }
        }
        Ok(())
    }

    fn create_topic(
        &mut self,
        name: &str,
        partitions: u32,
        replication_factor: u32,
        config: &TopicSettings,
    ) -> Result<(), Rejection> {
        let invalid = |reason: &str| Err(Rejection::InvalidArgument { reason: reason.to_string() });
        if name.is_empty() {
            return invalid("empty topic name");
        }
        if partitions == 0 || partitions > CONTROLLER_PARTITIONS_MAX {
            return invalid(&format!("partitions must be in 1..={CONTROLLER_PARTITIONS_MAX}"));
        }
        if replication_factor == 0 || replication_factor > CONTROLLER_REPLICATION_FACTOR_MAX {
            return invalid(&format!("replication factor must be in 1..={CONTROLLER_REPLICATION_FACTOR_MAX}"));
        }
        if self.topics.contains_key(name) {
            return Err(Rejection::TopicExists { name: name.to_string() });
        }
        let alive: Vec<u32> = self.nodes.iter().filter(|(_, n)| n.alive).map(|(&id, _)| id).collect();
        if (alive.len() as u64) < u64::from(replication_factor) {
            let alive = u32::try_from(alive.len()).unwrap_or(u32::MAX);
            return Err(Rejection::NotEnoughAliveNodes { replication_factor, alive });
        }
        let rf = replication_factor as usize;
        let assignment = (0..partitions as usize)
            .map(|p| {
                let replicas: Vec<u32> = (0..rf).map(|r| alive[(p + r) % alive.len()]).collect();
                PartitionAssignment {
                    leader: replicas.first().copied(),
                    leader_epoch: 1,
                    isr: replicas.clone(),
                    replicas,
                }
            })
            .collect();
        self.topics.insert(name.to_string(), TopicAssignment { partitions: assignment, config: config.clone() });
        Ok(())
    }

    fn update_isr(&mut self, topic: &str, partition: u32, leader_epoch: u32, isr: &[u32]) -> Result<(), Rejection> {
        let assignment =
            self.topics.get_mut(topic).ok_or_else(|| Rejection::TopicNotFound { name: topic.to_string() })?;
        let p = assignment
            .partitions
            .get_mut(partition as usize)
            .ok_or_else(|| Rejection::PartitionNotFound { topic: topic.to_string(), partition })?;
        if leader_epoch != p.leader_epoch {
            return Err(Rejection::StaleLeaderEpoch { given: leader_epoch, current: p.leader_epoch });
        }
        let invalid = |reason: &str| Err(Rejection::InvalidIsr { isr: isr.to_vec(), reason: reason.to_string() });
        let Some(leader) = p.leader else {
            return invalid("the partition is offline");
        };
        if !isr.contains(&leader) {
            return invalid("the ISR must contain the leader");
        }
        if let Some(n) = isr.iter().find(|n| !p.replicas.contains(n)) {
            return invalid(&format!("node {n} is not a replica"));
        }
        if isr.iter().enumerate().any(|(i, n)| isr[..i].contains(n)) {
            return invalid("duplicate member");
        }
        p.isr = isr.to_vec();
        Ok(())
    }

    fn partitions_mut(&mut self) -> impl Iterator<Item = &mut PartitionAssignment> {
        self.topics.values_mut().flat_map(|t| t.partitions.iter_mut())
    }

    /// Asserts the invariants every applied state keeps: a leader is a replica and in the
    /// ISR, the ISR is a duplicate-free subset of the replicas, epochs start at 1.
    #[cfg(debug_assertions)]
    pub fn check_invariants(&self) {
        for (name, topic) in &self.topics {
            for (i, p) in topic.partitions.iter().enumerate() {
                assert!(p.leader_epoch >= 1, "{name}/{i}: epoch starts at 1");
                if let Some(leader) = p.leader {
                    assert!(p.isr.contains(&leader), "{name}/{i}: the leader is in the ISR");
                }
                assert!(p.isr.iter().all(|n| p.replicas.contains(n)), "{name}/{i}: the ISR is within the replicas");
                for (j, n) in p.isr.iter().enumerate() {
                    assert!(!p.isr[..j].contains(n), "{name}/{i}: no duplicate ISR member");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> TopicSettings {
        TopicSettings { fsync: "always".into(), segment_size_bytes: 1 << 20, retention_bytes: None, retention_ms: None }
    }

    fn cluster(nodes: &[u32]) -> ClusterMetadata {
        let mut md = ClusterMetadata::default();
        for &id in nodes {
            assert_eq!(
                md.apply(&Command::RegisterNode { id, addr: format!("n{id}"), kafka_addr: String::new() }),
                CommandResult::Applied
            );
        }
        md
    }

    fn create(md: &mut ClusterMetadata, name: &str, partitions: u32, rf: u32) -> CommandResult {
        md.apply(&Command::CreateTopic { name: name.into(), partitions, replication_factor: rf, config: settings() })
    }

    fn part<'a>(md: &'a ClusterMetadata, topic: &str, p: usize) -> &'a PartitionAssignment {
        &md.topics[topic].partitions[p]
    }

    /// CreateTopic assigns replicas round-robin over the alive nodes, leader = first replica,
    /// epoch 1, ISR = replicas; a dead node gets nothing.
    #[test]
    fn create_topic_round_robin_over_alive_nodes() {
        let mut md = cluster(&[1, 2, 3, 4]);
        assert_eq!(md.apply(&Command::NodeDown { id: 3 }), CommandResult::Applied);
        assert_eq!(create(&mut md, "t", 4, 2), CommandResult::Applied);
        let expected = [[1, 2], [2, 4], [4, 1], [1, 2]];
        for (p, replicas) in expected.iter().enumerate() {
            let a = part(&md, "t", p);
            assert_eq!(a.replicas, replicas.to_vec());
            assert_eq!(a.leader, Some(replicas[0]));
            assert_eq!(a.leader_epoch, 1);
            assert_eq!(a.isr, replicas.to_vec());
        }
        assert_eq!(md.topics["t"].config, settings());
    }

    /// CreateTopic refuses an existing name, too few alive nodes and out-of-range arguments,
    /// leaving the state unchanged.
    #[test]
    fn create_topic_rejections() {
        let mut md = cluster(&[1, 2]);
        assert_eq!(create(&mut md, "t", 1, 2), CommandResult::Applied);
        let before = md.clone();
        assert_eq!(create(&mut md, "t", 1, 1), CommandResult::Rejected(Rejection::TopicExists { name: "t".into() }));
        assert_eq!(
            create(&mut md, "u", 1, 3),
            CommandResult::Rejected(Rejection::NotEnoughAliveNodes { replication_factor: 3, alive: 2 })
        );
        assert!(matches!(create(&mut md, "u", 0, 1), CommandResult::Rejected(Rejection::InvalidArgument { .. })));
        assert!(matches!(create(&mut md, "u", 1, 0), CommandResult::Rejected(Rejection::InvalidArgument { .. })));
        assert!(matches!(create(&mut md, "", 1, 1), CommandResult::Rejected(Rejection::InvalidArgument { .. })));
        assert_eq!(md, before);
        assert_eq!(
            md.apply(&Command::DeleteTopic { name: "nope".into() }),
            CommandResult::Rejected(Rejection::TopicNotFound { name: "nope".into() })
        );
        assert_eq!(md.apply(&Command::DeleteTopic { name: "t".into() }), CommandResult::Applied);
        assert!(md.topics.is_empty());
    }

    /// NodeDown of a leader elects the first alive ISR member (skipping a dead one), bumps
    /// the epoch and drops the old leader from the ISR; a follower just leaves the ISR.
    #[test]
    fn node_down_moves_leadership_within_the_isr() {
        let mut md = cluster(&[1, 2, 3]);
        assert_eq!(create(&mut md, "t", 3, 3), CommandResult::Applied);
        // Partition 0: replicas [1, 2, 3]. Make 2 dead first: it is a follower there.
        assert_eq!(md.apply(&Command::NodeDown { id: 2 }), CommandResult::Applied);
        assert_eq!(part(&md, "t", 0).isr, vec![1, 3]);
        assert_eq!(part(&md, "t", 0).leader_epoch, 1, "a follower leaving changes no epoch");
        // Partition 1 was led by 2: the next alive ISR member is 3.
        assert_eq!(part(&md, "t", 1).leader, Some(3));
        assert_eq!(part(&md, "t", 1).leader_epoch, 2);
        assert_eq!(part(&md, "t", 1).isr, vec![3, 1]);
        assert_eq!(md.apply(&Command::NodeDown { id: 1 }), CommandResult::Applied);
        assert_eq!(part(&md, "t", 0).leader, Some(3));
        assert_eq!(part(&md, "t", 0).leader_epoch, 2);
        assert_eq!(part(&md, "t", 0).isr, vec![3]);
        assert!(!md.nodes[&1].alive);
        assert_eq!(md.apply(&Command::NodeDown { id: 9 }), CommandResult::Rejected(Rejection::UnknownNode { id: 9 }));
    }

    /// Unclean election is off: an alive replica outside the ISR never leads. With no alive
    /// ISR member the partition goes offline, the epoch is bumped and the ISR is kept; the
    /// last leader coming back (NodeUp or RegisterNode) takes it with another bump.
    #[test]
    fn offline_without_alive_isr_member_and_back() {
        let mut md = cluster(&[1, 2]);
        assert_eq!(create(&mut md, "t", 1, 2), CommandResult::Applied);
        // The leader shrinks the ISR to itself: 2 is out of sync but alive.
        let shrink = Command::UpdateIsr { topic: "t".into(), partition: 0, leader_epoch: 1, isr: vec![1] };
        assert_eq!(md.apply(&shrink), CommandResult::Applied);
        assert_eq!(md.apply(&Command::NodeDown { id: 1 }), CommandResult::Applied);
        let p = part(&md, "t", 0);
        assert_eq!(p.leader, None, "2 is alive but not in sync: no unclean election");
        assert_eq!(p.leader_epoch, 2);
        assert_eq!(p.isr, vec![1]);
        // 2 going down and up changes nothing: it is not in the ISR.
        assert_eq!(md.apply(&Command::NodeDown { id: 2 }), CommandResult::Applied);
        assert_eq!(md.apply(&Command::NodeUp { id: 2 }), CommandResult::Applied);
        assert_eq!(part(&md, "t", 0).leader, None);
        assert_eq!(
            md.apply(&Command::RegisterNode { id: 1, addr: "new".into(), kafka_addr: String::new() }),
            CommandResult::Applied
        );
        let p = part(&md, "t", 0);
        assert_eq!(p.leader, Some(1));
        assert_eq!(p.leader_epoch, 3);
        assert_eq!(
            md.nodes[&1],
            NodeInfo { addr: "new".into(), alive: true, registrations: 2, kafka_addr: String::new() }
        );
        // NodeUp of an alive leader changes nothing.
        assert_eq!(md.apply(&Command::NodeUp { id: 1 }), CommandResult::Applied);
        assert_eq!(part(&md, "t", 0).leader_epoch, 3);
        assert_eq!(md.apply(&Command::NodeUp { id: 7 }), CommandResult::Rejected(Rejection::UnknownNode { id: 7 }));
    }

    /// UpdateIsr applies only in the current epoch and only with the leader in the ISR, all
    /// members replicas, no duplicates; otherwise the state is unchanged.
    #[test]
    fn update_isr_checks_epoch_and_membership() {
        let mut md = cluster(&[1, 2, 3]);
        assert_eq!(create(&mut md, "t", 1, 3), CommandResult::Applied);
        assert_eq!(md.apply(&Command::NodeDown { id: 1 }), CommandResult::Applied);
        assert_eq!(part(&md, "t", 0).leader, Some(2));
        let before = md.clone();
        let update = |epoch: u32, isr: Vec<u32>| Command::UpdateIsr {
            topic: "t".into(),
            partition: 0,
            leader_epoch: epoch,
            isr,
        };
        assert_eq!(
            md.apply(&update(1, vec![2, 3])),
            CommandResult::Rejected(Rejection::StaleLeaderEpoch { given: 1, current: 2 })
        );
        assert!(matches!(md.apply(&update(2, vec![3])), CommandResult::Rejected(Rejection::InvalidIsr { .. })));
        assert!(matches!(md.apply(&update(2, vec![2, 5])), CommandResult::Rejected(Rejection::InvalidIsr { .. })));
        assert!(matches!(md.apply(&update(2, vec![2, 2])), CommandResult::Rejected(Rejection::InvalidIsr { .. })));
        let missing = Command::UpdateIsr { topic: "t".into(), partition: 1, leader_epoch: 2, isr: vec![2] };
        assert_eq!(
            md.apply(&missing),
            CommandResult::Rejected(Rejection::PartitionNotFound { topic: "t".into(), partition: 1 })
        );
        assert_eq!(md, before);
        assert_eq!(md.apply(&update(2, vec![2])), CommandResult::Applied);
        assert_eq!(part(&md, "t", 0).isr, vec![2]);
        assert_eq!(md.apply(&update(2, vec![2, 3, 1])), CommandResult::Applied);
        assert_eq!(part(&md, "t", 0).isr, vec![2, 3, 1]);
    }

    /// The metadata survives its JSON encoding unchanged (it is what the state file and
    /// snapshots hold).
    #[test]
    fn metadata_json_round_trip() {
        let mut md = cluster(&[1, 2]);
        assert_eq!(create(&mut md, "t", 2, 2), CommandResult::Applied);
        let bytes = serde_json::to_vec(&md).expect("metadata encodes");
        let back: ClusterMetadata = serde_json::from_slice(&bytes).expect("metadata decodes");
        assert_eq!(back, md);
    }
}
