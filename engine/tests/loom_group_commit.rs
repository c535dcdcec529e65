//! Loom model of the group-commit queue, `rill_engine::log::group_commit::GroupCommit`.
//!
//! Run with:
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p rill-engine --release --test loom_visibility --test loom_group_commit
//! ```
//!
//! Two appender threads take offsets under a shared lock (the partition's appender lock)
//! and enqueue one `PendingAppend` per offset while holding it, as
//! `Partition::append_checked` does; a flusher thread loops on `next_round` until `Stop`;
//! the main thread joins the appenders and then calls `stop`, as `Partition::close` does.
//! Each appender waits for its append to be acknowledged before the next one, as a caller
//! of `AppendHandle::wait` does; the flusher acknowledges each round it is handed.
//! Loom explores every interleaving of the queue's mutex and condition variable and checks:
//! every enqueued append reaches the flusher exactly once, in queue (here: offset) order,
//! in non-empty rounds; the flusher never gets `Stop` while appends are queued; and
//! everybody terminates (a lost wake-up leaves an appender or the flusher waiting forever,
//! which loom reports as a deadlock).
//!
//! Under loom `Condvar::wait_timeout` never times out, so the interval variant checks the
//! same wake-up logic through the `wait_timeout` branch (ticks themselves are not modelled).
#![cfg(loom)]

use std::time::Duration;

use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;
use rill_engine::log::group_commit::{GroupCommit, PendingAppend, Round};
use rill_engine::AppendInfo;

const APPENDERS: u64 = 2;

/// `preemption_bound` unless `LOOM_MAX_PREEMPTIONS` says otherwise. Lost wake-ups and
/// stop/drain races need one or two preemptions; the bound keeps each model to seconds.
fn builder(preemption_bound: usize) -> loom::model::Builder {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(preemption_bound);
    }
    builder
}

/// The acknowledgements: the end up to which the flusher has completed appends. Stands in
/// for each append's `Completion` (not loom-instrumented), which the appender waits on.
#[derive(Default)]
struct Acks {
    durable_end: Mutex<u64>,
    changed: Condvar,
}

impl Acks {
    fn complete_up_to(&self, end: u64) {
        let mut durable_end = self.durable_end.lock().expect("acks lock is not poisoned");
        assert!(end > *durable_end, "each round completes appends past the previous one");
        *durable_end = end;
        self.changed.notify_all();
    }

    fn wait_for(&self, end: u64) {
        let mut durable_end = self.durable_end.lock().expect("acks lock is not poisoned");
        while *durable_end < end {
            durable_end = self.changed.wait(durable_end).expect("acks lock is not poisoned");
        }
    }
}

/// Runs the flusher loop, completing each round; returns the target ends of each round.
fn flusher(commit: &GroupCommit, acks: &Acks, interval: Option<Duration>) -> Vec<Vec<u64>> {
    let mut rounds = Vec::new();
    loop {
        match commit.next_round(interval) {
            Round::Sync(appends) => {
                assert!(!appends.is_empty(), "a sync round carries at least one append");
                for append in &appends {
                    assert_eq!(append.info.last_offset + 1, append.target_end, "append handed over intact");
                }
                let targets: Vec<u64> = appends.iter().map(|a| a.target_end).collect();
                acks.complete_up_to(*targets.last().expect("the round is not empty"));
                rounds.push(targets);
            }
            Round::Tick => panic!("no tick: loom's wait_timeout never times out"),
            Round::Stop => return rounds,
        }
    }
}

/// `APPENDERS` threads enqueue `appends_each` appends each; the flusher must see offsets
/// `1..=total` exactly once, in order, then stop.
fn check_group_commit(interval: Option<Duration>, appends_each: u64, preemption_bound: usize) {
    builder(preemption_bound).check(move || {
        let commit = Arc::new(GroupCommit::new());
        let acks = Arc::new(Acks::default());
        let next_offset = Arc::new(Mutex::new(0u64));
        let flush = {
            let (commit, acks) = (Arc::clone(&commit), Arc::clone(&acks));
            thread::spawn(move || flusher(&commit, &acks, interval))
        };
        let appenders: Vec<_> = (0..APPENDERS)
            .map(|_| {
                let (commit, acks) = (Arc::clone(&commit), Arc::clone(&acks));
                let next_offset = Arc::clone(&next_offset);
                thread::spawn(move || {
                    for _ in 0..appends_each {
                        let target_end = {
                            let mut next = next_offset.lock().expect("appender lock is not poisoned");
                            let base_offset = *next;
                            *next += 1;
                            let info = AppendInfo { base_offset, last_offset: base_offset, duplicate: false };
                            commit.enqueue(PendingAppend::detached(base_offset + 1, info));
                            base_offset + 1
                        };
                        // `AppendHandle::wait`: only an acknowledged append lets the
                        // appender go on, so a lost wake-up of the flusher deadlocks here.
                        acks.wait_for(target_end);
                    }
                })
            })
            .collect();
        for appender in appenders {
            appender.join().expect("appender thread");
        }
        commit.stop();
        let rounds = flush.join().expect("flusher thread");
        let handed: Vec<u64> = rounds.concat();
        let expected: Vec<u64> = (1..=APPENDERS * appends_each).collect();
        assert_eq!(handed, expected, "every append handed to the flusher once, in offset order: {rounds:?}");
    });
}

#[test]
fn every_append_reaches_the_flusher_once_in_order() {
    check_group_commit(None, 2, 2);
}

#[test]
fn interval_branch_wakes_the_flusher_too() {
    check_group_commit(Some(Duration::from_millis(5)), 1, 3);
}
