//! What a partition leader knows about its followers: each one's log end offset (from its
//! replica fetches), the in-sync replica set (ISR) and the high watermark.
//!
//! * A follower's fetch at offset `f` says its log holds everything below `f`.
//! * It is *caught up* when `f` reached the leader's log end at this fetch or at its
//!   previous one (Kafka's `lastCaughtUpTimeMs` rule); one that has not been caught up for
//!   `lag_time_max_ms` leaves the ISR, and rejoins once it has fetched up to the high
//!   watermark and into the current epoch.
//! * The high watermark is the smallest log end over the ISR (the leader included) and
//!   never moves backwards. Consumers read below it; `acks = all` completes when it passes a
//!   batch. With fewer than `min_insync_replicas` in the ISR the leader refuses writes.
//!
//! Pure state: no I/O, no clock of its own (times are passed in), so every rule is tested
//! directly. The server owns one per led partition.

use std::collections::{BTreeMap, BTreeSet};

use super::EpochEntry;

/// A node of the cluster.
pub type NodeId = u32;

/// Progress of one follower as the leader sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FollowerProgress {
    /// The follower's log end (its last fetch offset).
    pub end_offset: u64,
    /// When the follower was last caught up with the leader's log end.
    pub last_caught_up_ms: i64,
    /// The leader's log end at the follower's previous fetch.
    leader_end_at_last_fetch: u64,
    /// When the previous fetch arrived.
    last_fetch_ms: i64,
}

/// The leader's view of its partition's replicas.
#[derive(Clone, Debug)]
pub struct LeaderState {
    leader: NodeId,
    epoch: u32,
    /// Offset at which this leader's epoch began: a follower is in sync only once it
    /// has fetched past it.
    epoch_start: u64,
    followers: BTreeMap<NodeId, FollowerProgress>,
    isr: BTreeSet<NodeId>,
    high_watermark: u64,
    lag_time_max_ms: i64,
}

/// What a fetch or a time check changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// The high watermark moved forward.
    pub high_watermark: bool,
    /// The ISR gained or lost a member.
    pub isr: bool,
}

impl LeaderState {
    /// A new leadership in `epoch` (which began at its `start_offset` on the leader's log):
    /// `replicas` includes the leader; `isr` is the set the controller
    /// recorded (the leader is always added); `high_watermark` is the leader's last known
    /// one, and followers start as caught up at `now_ms`.
    pub fn new(
        leader: NodeId,
        epoch: EpochEntry,
        replicas: &[NodeId],
        isr: &[NodeId],
        high_watermark: u64,
        lag_time_max_ms: u64,
        now_ms: i64,
    ) -> LeaderState {
        let followers = replicas
            .iter()
            .filter(|&&r| r != leader)
            .map(|&r| {
                let progress = FollowerProgress {
                    end_offset: 0,
                    last_caught_up_ms: now_ms,
                    leader_end_at_last_fetch: 0,
                    last_fetch_ms: now_ms,
                };
                (r, progress)
            })
            .collect::<BTreeMap<_, _>>();
        let mut isr: BTreeSet<NodeId> = isr.iter().copied().filter(|r| followers.contains_key(r)).collect();
        isr.insert(leader);
        LeaderState {
            leader,
            epoch: epoch.epoch,
            epoch_start: epoch.start_offset,
            followers,
            isr,
            high_watermark,
            lag_time_max_ms: i64::try_from(lag_time_max_ms).unwrap_or(i64::MAX),
        }
    }

    /// The leader's epoch.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// The in-sync replicas, the leader included.
    pub fn isr(&self) -> Vec<NodeId> {
        self.isr.iter().copied().collect()
    }

    /// The high watermark.
    pub fn high_watermark(&self) -> u64 {
        self.high_watermark
    }

    /// A follower's progress, if it is a replica of this partition.
    pub fn follower(&self, node: NodeId) -> Option<&FollowerProgress> {
        self.followers.get(&node)
    }

    /// Whether a write may be accepted with `min_insync` replicas required.
    pub fn has_min_insync(&self, min_insync: usize) -> bool {
        self.isr.len() >= min_insync
    }

    /// A replica fetch from `follower` at `fetch_offset`, with the leader's log end now
    /// `leader_end`. Returns `None` for a node that is not a follower of this partition.
    pub fn on_fetch(&mut self, follower: NodeId, fetch_offset: u64, leader_end: u64, now_ms: i64) -> Option<Change> {
        let progress = self.followers.get_mut(&follower)?;
        progress.end_offset = fetch_offset.min(leader_end);
        if fetch_offset >= leader_end {
            progress.last_caught_up_ms = now_ms;
        } else if fetch_offset >= progress.leader_end_at_last_fetch {
            progress.last_caught_up_ms = progress.last_caught_up_ms.max(progress.last_fetch_ms);
        }
        progress.leader_end_at_last_fetch = leader_end;
        progress.last_fetch_ms = now_ms;
        let mut change = Change::default();
        if !self.isr.contains(&follower)
            && progress.end_offset >= self.high_watermark
            && progress.end_offset >= self.epoch_start
        {
            self.isr.insert(follower);
            change.isr = true;
        }
        change.high_watermark = self.advance(leader_end);
        Some(change)
    }

    /// The leader's own log end moved (an append was acknowledged locally); with no other
    /// replica in sync that alone moves the high watermark.
    pub fn on_leader_end(&mut self, leader_end: u64) -> bool {
        self.advance(leader_end)
    }

    /// The in-sync followers that have not been caught up for longer than the lag limit:
    /// the ISR to propose to the controller is the current one without them. (A shrink
    /// takes effect only once the controller has recorded it, through
    /// [`LeaderState::set_isr`]; otherwise a replica the leader dropped could be elected
    /// without records the smaller ISR let the high watermark pass.)
    pub fn lagging(&self, leader_end: u64, now_ms: i64) -> Vec<NodeId> {
        self.isr
            .iter()
            .copied()
            .filter(|r| *r != self.leader)
            .filter(|r| {
                self.followers
                    .get(r)
                    .is_some_and(|p| p.end_offset < leader_end && now_ms - p.last_caught_up_ms > self.lag_time_max_ms)
            })
            .collect()
    }

    /// Takes the ISR the controller recorded (the leader is always in it); returns what
    /// changed.
    pub fn set_isr(&mut self, isr: &[NodeId], leader_end: u64) -> Change {
        let mut next: BTreeSet<NodeId> = isr.iter().copied().filter(|r| self.followers.contains_key(r)).collect();
        next.insert(self.leader);
        let changed = next != self.isr;
        self.isr = next;
        Change { isr: changed, high_watermark: self.advance(leader_end) }
    }

    /// Drops followers that have not been caught up for longer than the lag limit.
    pub fn shrink_isr(&mut self, leader_end: u64, now_ms: i64) -> Change {
        let lagging = self.lagging(leader_end, now_ms);
        let mut change = Change::default();
        for node in lagging {
            self.isr.remove(&node);
            change.isr = true;
        }
        change.high_watermark = self.advance(leader_end);
        change
    }

    /// Recomputes the high watermark; returns whether it moved.
    fn advance(&mut self, leader_end: u64) -> bool {
        let min = self
            .isr
            .iter()
            .map(|r| if *r == self.leader { leader_end } else { self.followers[r].end_offset })
            .min()
            .unwrap_or(leader_end);
        if min > self.high_watermark {
            self.high_watermark = min;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three(now: i64) -> LeaderState {
        LeaderState::new(1, EpochEntry { epoch: 5, start_offset: 0 }, &[1, 2, 3], &[1, 2, 3], 0, 1_000, now)
    }

    /// The high watermark is the minimum log end over the ISR and follows the slowest
    /// in-sync follower.
    #[test]
    fn high_watermark_is_the_isr_minimum() {
        let mut s = three(0);
        assert!(!s.on_leader_end(10));
        assert_eq!(s.on_fetch(2, 10, 10, 1), Some(Change { high_watermark: false, isr: false }));
        assert_eq!(s.high_watermark(), 0);
        assert!(s.on_fetch(3, 7, 10, 2).expect("follower").high_watermark);
        assert_eq!(s.high_watermark(), 7);
        s.on_fetch(3, 10, 10, 3);
        assert_eq!(s.high_watermark(), 10);
        assert_eq!(s.on_fetch(9, 10, 10, 3), None, "not a replica");
    }

    /// A follower that stops fetching leaves the ISR after the lag limit; the high
    /// watermark then follows the others; it rejoins once caught up to the high watermark.
    #[test]
    fn isr_shrinks_and_expands() {
        let mut s = three(0);
        s.on_fetch(2, 0, 0, 0);
        s.on_fetch(3, 0, 0, 0);
        s.on_leader_end(50);
        s.on_fetch(2, 50, 50, 500);
        assert_eq!(s.high_watermark(), 0, "node 3 is in sync and at 0");
        assert_eq!(s.shrink_isr(50, 900), Change::default(), "within the lag limit");
        let change = s.shrink_isr(50, 1_600);
        assert!(change.isr && change.high_watermark);
        assert_eq!(s.isr(), vec![1, 2]);
        assert_eq!(s.high_watermark(), 50);
        assert!(s.has_min_insync(2) && !s.has_min_insync(3));
        let change = s.on_fetch(3, 40, 50, 1_700).expect("follower");
        assert!(!change.isr, "below the high watermark");
        let change = s.on_fetch(3, 50, 50, 1_800).expect("follower");
        assert!(change.isr);
        assert_eq!(s.isr(), vec![1, 2, 3]);
    }

    /// A follower that keeps fetching up to where the leader was at its previous fetch is
    /// caught up even if the leader moved on meanwhile (a steady stream never shrinks it).
    #[test]
    fn steady_follower_stays_in_sync() {
        let mut s = three(0);
        let mut end = 0;
        for t in 1..100 {
            let fetch = end;
            end += 10;
            s.on_fetch(2, fetch, end, t * 100);
            s.on_fetch(3, fetch, end, t * 100);
            assert!(!s.shrink_isr(end, t * 100).isr, "at {t}");
        }
        assert_eq!(s.isr().len(), 3);
    }

    /// A follower does not rejoin before it has fetched into the leader's epoch.
    #[test]
    fn rejoin_needs_the_current_epoch() {
        // Node 3 is in sync but has not fetched yet, which holds the high watermark at 90.
        let mut s = LeaderState::new(1, EpochEntry { epoch: 5, start_offset: 100 }, &[1, 2, 3], &[1, 3], 90, 1_000, 0);
        assert!(!s.on_fetch(2, 95, 120, 1).expect("follower").isr, "above the high watermark, before the epoch");
        assert_eq!(s.high_watermark(), 90);
        assert!(s.on_fetch(2, 100, 120, 2).expect("follower").isr);
    }
}
