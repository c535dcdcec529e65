//! Consumer-group membership: members join a named group for some topics, the coordinator
//! splits the topics' partitions among them (range assignment), and every change of
//! membership — a join, a leave, a session that timed out — starts a new **generation** with
//! a new assignment.
//!
//! Members learn the current generation and their partitions from every `join` and
//! `heartbeat`. A commit made through the group ([`GroupCoordinator::check_commit`]) is
//! accepted only from a current member, in the current generation, for a partition it is
//! assigned: a member that missed a rebalance cannot overwrite the position of the
//! partition's new owner (it learns of the rebalance from the refusal or its next heartbeat).
//!
//! Delivery is at-least-once across a rebalance: a partition's new owner starts at the
//! committed offset, so records the old owner read but had not committed are read again.
//! Until the old owner's next heartbeat (at most its session timeout) both may read the
//! partition; only the new owner's commits count.
//!
//! Membership is volatile, like a session: it lives in memory and is lost when the process
//! stops; members then find their id unknown and join again. Committed offsets are durable
//! ([`super::offsets`]).
//!
//! Sessions are checked lazily: every operation on a group first removes its members whose
//! last join, heartbeat or commit is older than their session timeout.
//!
//! It owns: members, generations and assignments. It must never: write offsets itself.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::config::Clock;
use crate::error::{Error, Result};
use crate::limits::{GROUP_MEMBERS_MAX, GROUP_SESSION_TIMEOUT_MS_MAX, GROUP_SESSION_TIMEOUT_MS_MIN, GROUP_TOPICS_MAX};

/// A member's view of its group after a join or heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// The member's id (chosen by the coordinator at the first join).
    pub member_id: String,
    /// The group's generation; it changes at every rebalance.
    pub generation: u64,
    /// Partitions assigned to this member in this generation, sorted.
    pub partitions: Vec<(String, u32)>,
    /// Members of the group in this generation.
    pub members: u32,
}

#[derive(Debug)]
struct Member {
    topics: Vec<String>,
    session_timeout_ms: u64,
    last_seen_ms: i64,
}

#[derive(Debug, Default)]
struct Group {
    generation: u64,
    /// By member id, so the assignment order is stable.
    members: BTreeMap<String, Member>,
    /// Partition count of every topic some member subscribes to, as of the last rebalance.
    partitions: BTreeMap<String, u32>,
    assignment: BTreeMap<String, Vec<(String, u32)>>,
}

impl Group {
    /// Removes members whose session timed out; rebalances if any was removed.
    fn expire(&mut self, now_ms: i64) {
        let before = self.members.len();
        self.members.retain(|_, m| now_ms.saturating_sub(m.last_seen_ms) <= timeout_i64(m.session_timeout_ms));
        if self.members.len() != before {
            self.rebalance();
        }
    }

    /// Starts a new generation: range assignment per topic over the members (sorted by id)
    /// that subscribe to it.
    fn rebalance(&mut self) {
        self.generation += 1;
        self.assignment = self.members.keys().map(|id| (id.clone(), Vec::new())).collect();
        for (topic, &count) in &self.partitions {
            let subscribers: Vec<&String> =
                self.members.iter().filter(|(_, m)| m.topics.contains(topic)).map(|(id, _)| id).collect();
            if subscribers.is_empty() {
                continue;
            }
            let n = u32::try_from(subscribers.len()).expect("members are bounded by GROUP_MEMBERS_MAX");
            let (per_member, extra) = (count / n, count % n);
            let mut next = 0;
            for (i, id) in (0..n).zip(subscribers) {
                let take = per_member + u32::from(i < extra);
                let owned = self.assignment.get_mut(id).expect("every member has an assignment entry");
                owned.extend((next..next + take).map(|p| (topic.clone(), p)));
                next += take;
            }
        }
        for owned in self.assignment.values_mut() {
            owned.sort();
        }
        // Topics no member subscribes to any more are forgotten.
        let members = &self.members;
        self.partitions.retain(|topic, _| members.values().any(|m| m.topics.contains(topic)));
    }

    fn assignment_of(&self, member_id: &str) -> Assignment {
        Assignment {
            member_id: member_id.to_string(),
            generation: self.generation,
            partitions: self.assignment.get(member_id).cloned().unwrap_or_default(),
            members: u32::try_from(self.members.len()).expect("members are bounded by GROUP_MEMBERS_MAX"),
        }
    }
}

fn timeout_i64(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// Membership of every consumer group of a store ([`crate::Store::join_group`] and its
/// siblings are the public entry points).
#[derive(Debug)]
pub struct GroupCoordinator {
    clock: Arc<dyn Clock>,
    groups: Mutex<HashMap<String, Group>>,
    /// Distinguishes this coordinator's member ids from those of an earlier process.
    incarnation: u64,
    next_member: AtomicU64,
}

impl GroupCoordinator {
    /// An empty coordinator reading time from `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        let wall_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos() & u128::from(u64::MAX)).unwrap_or(0));
        let incarnation = wall_ns ^ u64::from(std::process::id()).rotate_left(32);
        GroupCoordinator { clock, groups: Mutex::new(HashMap::new()), incarnation, next_member: AtomicU64::new(1) }
    }

    /// Joins `group` for `topics` (`partitions` gives each topic's partition count, in the
    /// same order). Without `member_id` a new member is created; with one, that member's
    /// subscription and session are renewed (an unknown id is [`Error::UnknownMember`]: the
    /// member was expired or the process restarted, and must join without an id). A new
    /// member or a changed subscription starts a new generation.
    pub fn join(
        &self,
        group: &str,
        member_id: Option<&str>,
        topics: &[(String, u32)],
        session_timeout_ms: u64,
    ) -> Result<Assignment> {
        check_join(group, topics, session_timeout_ms)?;
        let now_ms = self.clock.now_ms();
        let mut groups = self.groups.lock();
        let entry = groups.entry(group.to_string()).or_default();
        entry.expire(now_ms);
        let mut subscription: Vec<String> = topics.iter().map(|(t, _)| t.clone()).collect();
        subscription.sort();
        subscription.dedup();
        let member_id = match member_id {
            Some(id) => {
                let Some(member) = entry.members.get_mut(id) else {
                    return Err(unknown_member(group, id));
                };
                member.session_timeout_ms = session_timeout_ms;
                member.last_seen_ms = now_ms;
                if member.topics != subscription {
                    member.topics = subscription;
                    entry.partitions.extend(topics.iter().cloned());
                    entry.rebalance();
                }
                id.to_string()
            }
            None => {
                if entry.members.len() >= GROUP_MEMBERS_MAX {
                    return Err(Error::LimitExceeded {
                        limit: "members of a consumer group",
                        max: GROUP_MEMBERS_MAX as u64,
                        actual: entry.members.len() as u64 + 1,
                    });
                }
                let n = self.next_member.fetch_add(1, Ordering::Relaxed);
                let id = format!("{group}-{:016x}-{n}", self.incarnation);
                entry
                    .members
                    .insert(id.clone(), Member { topics: subscription, session_timeout_ms, last_seen_ms: now_ms });
                entry.partitions.extend(topics.iter().cloned());
                entry.rebalance();
                id
            }
        };
        Ok(entry.assignment_of(&member_id))
    }

    /// Renews a member's session and returns the group's current generation and the
    /// member's partitions in it (a generation other than the member's last one means a
    /// rebalance happened: it must stop reading partitions it no longer has).
    pub fn heartbeat(&self, group: &str, member_id: &str) -> Result<Assignment> {
        self.with_member(group, member_id, |entry| Ok(entry.assignment_of(member_id)))
    }

    /// Runs `f` on `group` after expiring its timed-out members and renewing the session of
    /// `member_id` (which must be a member).
    fn with_member<T>(&self, group: &str, member_id: &str, f: impl FnOnce(&Group) -> Result<T>) -> Result<T> {
        let now_ms = self.clock.now_ms();
        let mut groups = self.groups.lock();
        let entry = groups.get_mut(group).ok_or_else(|| unknown_member(group, member_id))?;
        entry.expire(now_ms);
        let member = entry.members.get_mut(member_id).ok_or_else(|| unknown_member(group, member_id))?;
        member.last_seen_ms = now_ms;
        f(entry)
    }

    /// Removes a member at once (its partitions go to the others in a new generation).
    pub fn leave(&self, group: &str, member_id: &str) -> Result<()> {
        let now_ms = self.clock.now_ms();
        let mut groups = self.groups.lock();
        let entry = groups.get_mut(group).ok_or_else(|| unknown_member(group, member_id))?;
        entry.expire(now_ms);
        if entry.members.remove(member_id).is_none() {
            return Err(unknown_member(group, member_id));
        }
        entry.rebalance();
        if entry.members.is_empty() {
            groups.remove(group);
        }
        Ok(())
    }

    /// Accepts a commit of `topic`/`partition` by `member_id` in `generation` only if the
    /// member is current, the generation is the group's, and the partition is assigned to
    /// it; renews the member's session.
    pub fn check_commit(
        &self,
        group: &str,
        member_id: &str,
        generation: u64,
        topic: &str,
        partition: u32,
    ) -> Result<()> {
        self.with_member(group, member_id, |entry| {
            if generation != entry.generation {
                return Err(Error::StaleGeneration {
                    group: group.to_string(),
                    member_id: member_id.to_string(),
                    generation,
                    current: entry.generation,
                });
            }
            let owned =
                entry.assignment.get(member_id).is_some_and(|p| p.iter().any(|(t, n)| t == topic && *n == partition));
            if !owned {
                return Err(Error::PartitionNotAssigned {
                    group: group.to_string(),
                    member_id: member_id.to_string(),
                    topic: topic.to_string(),
                    partition,
                });
            }
            Ok(())
        })
    }

    /// Members of `group` now (after expiring timed-out sessions) and its generation; `None`
    /// for a group without members.
    pub fn describe(&self, group: &str) -> Option<(u64, Vec<Assignment>)> {
        let now_ms = self.clock.now_ms();
        let mut groups = self.groups.lock();
        let entry = groups.get_mut(group)?;
        entry.expire(now_ms);
        let members = entry.members.keys().map(|id| entry.assignment_of(id)).collect();
        Some((entry.generation, members))
    }
}

fn check_join(group: &str, topics: &[(String, u32)], session_timeout_ms: u64) -> Result<()> {
    if group.is_empty() {
        return Err(Error::InvalidConfig { reason: "a consumer group needs a name".into() });
    }
    if topics.is_empty() || topics.len() > GROUP_TOPICS_MAX {
        return Err(Error::InvalidConfig {
            reason: format!("a member subscribes to 1..={GROUP_TOPICS_MAX} topics, not {}", topics.len()),
        });
    }
    if !(GROUP_SESSION_TIMEOUT_MS_MIN..=GROUP_SESSION_TIMEOUT_MS_MAX).contains(&session_timeout_ms) {
        return Err(Error::InvalidConfig {
            reason: format!(
                "session timeout {session_timeout_ms} ms is outside \
                 {GROUP_SESSION_TIMEOUT_MS_MIN}..={GROUP_SESSION_TIMEOUT_MS_MAX} ms"
            ),
        });
    }
    Ok(())
}

fn unknown_member(group: &str, member_id: &str) -> Error {
    Error::UnknownMember { group: group.to_string(), member_id: member_id.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ManualClock;

    fn coordinator() -> (GroupCoordinator, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(1_000));
        (GroupCoordinator::new(Arc::clone(&clock) as Arc<dyn Clock>), clock)
    }

    fn topics(list: &[(&str, u32)]) -> Vec<(String, u32)> {
        list.iter().map(|(t, n)| (t.to_string(), *n)).collect()
    }

    /// Every partition of every topic is owned by exactly one member.
    fn assert_partitioned(c: &GroupCoordinator, group: &str, expected: &[(&str, u32)]) {
        let (_, members) = c.describe(group).expect("group exists");
        let mut owned: Vec<(String, u32)> = members.into_iter().flat_map(|a| a.partitions).collect();
        owned.sort();
        let mut all: Vec<(String, u32)> =
            expected.iter().flat_map(|(t, n)| (0..*n).map(move |p| (t.to_string(), p))).collect();
        all.sort();
        assert_eq!(owned, all);
    }

    #[test]
    fn range_assignment_splits_partitions_and_rebalances_on_join_and_leave() {
        let (c, _clock) = coordinator();
        let t = topics(&[("orders", 5)]);
        let a = c.join("g", None, &t, 10_000).unwrap();
        assert_eq!((a.generation, a.partitions.len(), a.members), (1, 5, 1));
        let b = c.join("g", None, &t, 10_000).unwrap();
        assert_eq!((b.generation, b.members), (2, 2));
        let a2 = c.heartbeat("g", &a.member_id).unwrap();
        assert_eq!(a2.generation, 2);
        assert_eq!(a2.partitions.len() + b.partitions.len(), 5);
        assert!(a2.partitions.len().abs_diff(b.partitions.len()) <= 1);
        assert_partitioned(&c, "g", &[("orders", 5)]);
        c.leave("g", &b.member_id).unwrap();
        let a3 = c.heartbeat("g", &a.member_id).unwrap();
        assert_eq!((a3.generation, a3.partitions.len(), a3.members), (3, 5, 1));
        assert!(matches!(c.heartbeat("g", &b.member_id), Err(Error::UnknownMember { .. })));
    }

    #[test]
    fn a_silent_member_times_out_and_loses_its_partitions() {
        let (c, clock) = coordinator();
        let t = topics(&[("t", 4)]);
        let a = c.join("g", None, &t, 1_000).unwrap();
        let b = c.join("g", None, &t, 3_000).unwrap();
        clock.advance_ms(900);
        c.heartbeat("g", &b.member_id).unwrap();
        clock.advance_ms(900); // a last seen 1,800 ms ago > 1,000
        let b2 = c.heartbeat("g", &b.member_id).unwrap();
        assert_eq!((b2.partitions.len(), b2.members), (4, 1));
        assert!(b2.generation > b.generation);
        assert!(matches!(c.heartbeat("g", &a.member_id), Err(Error::UnknownMember { .. })));
        // Rejoining without an id makes a new member.
        let a2 = c.join("g", None, &t, 1_000).unwrap();
        assert_ne!(a2.member_id, a.member_id);
        assert_partitioned(&c, "g", &[("t", 4)]);
    }

    #[test]
    fn commits_are_fenced_by_generation_and_assignment() {
        let (c, _clock) = coordinator();
        let t = topics(&[("t", 2)]);
        let a = c.join("g", None, &t, 10_000).unwrap();
        c.check_commit("g", &a.member_id, a.generation, "t", 1).unwrap();
        let b = c.join("g", None, &t, 10_000).unwrap();
        // a's generation is stale now, whatever partition it names.
        let stale = c.check_commit("g", &a.member_id, a.generation, "t", 0);
        assert!(matches!(stale, Err(Error::StaleGeneration { current, .. }) if current == b.generation));
        let a2 = c.heartbeat("g", &a.member_id).unwrap();
        let (&(_, mine), &(_, theirs)) = (&a2.partitions[0], &b.partitions[0]);
        c.check_commit("g", &a.member_id, a2.generation, "t", mine).unwrap();
        let foreign = c.check_commit("g", &a.member_id, a2.generation, "t", theirs);
        assert!(matches!(foreign, Err(Error::PartitionNotAssigned { .. })));
        assert!(matches!(c.check_commit("g", "nobody", a2.generation, "t", 0), Err(Error::UnknownMember { .. })));
    }

    #[test]
    fn members_with_different_subscriptions_share_only_common_topics() {
        let (c, _clock) = coordinator();
        let a = c.join("g", None, &topics(&[("x", 2), ("y", 3)]), 10_000).unwrap();
        let b = c.join("g", None, &topics(&[("y", 3)]), 10_000).unwrap();
        let a = c.heartbeat("g", &a.member_id).unwrap();
        assert!(b.partitions.iter().all(|(t, _)| t == "y"));
        assert_eq!(a.partitions.iter().filter(|(t, _)| t == "x").count(), 2);
        assert_partitioned(&c, "g", &[("x", 2), ("y", 3)]);
        // Changing a subscription rebalances; a topic nobody wants is dropped.
        let a2 = c.join("g", Some(&a.member_id), &topics(&[("y", 3)]), 10_000).unwrap();
        assert!(a2.generation > a.generation);
        assert_partitioned(&c, "g", &[("y", 3)]);
    }

    #[test]
    fn bad_joins_are_refused() {
        let (c, _clock) = coordinator();
        assert!(matches!(c.join("", None, &topics(&[("t", 1)]), 10_000), Err(Error::InvalidConfig { .. })));
        assert!(matches!(c.join("g", None, &[], 10_000), Err(Error::InvalidConfig { .. })));
        assert!(matches!(c.join("g", None, &topics(&[("t", 1)]), 0), Err(Error::InvalidConfig { .. })));
        assert!(matches!(c.join("g", Some("ghost"), &topics(&[("t", 1)]), 10_000), Err(Error::UnknownMember { .. })));
        assert!(matches!(c.leave("g", "ghost"), Err(Error::UnknownMember { .. })));
    }

    #[test]
    fn more_members_than_partitions_leaves_some_idle() {
        let (c, _clock) = coordinator();
        let t = topics(&[("t", 2)]);
        let ids: Vec<String> = (0..3).map(|_| c.join("g", None, &t, 10_000).unwrap().member_id).collect();
        let sizes: Vec<usize> = ids.iter().map(|id| c.heartbeat("g", id).unwrap().partitions.len()).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 2);
        assert_eq!(sizes.iter().filter(|&&n| n == 0).count(), 1);
    }
}
