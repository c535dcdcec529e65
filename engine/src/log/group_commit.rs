//! Group commit: appends under `fsync = always` queue here after writing their bytes; the
//! partition's flusher thread takes every queued append at once, syncs once, and completes
//! them all. Appends that arrive while a sync is in flight form the next group, so the
//! number of syncs does not grow with the number of concurrent appenders.
//!
//! Built on `crate::sync` so `tests/loom_group_commit.rs` can model-check it.

use std::sync::Arc;
use std::time::Duration;

use super::completion::{AppendInfo, Completion};
use crate::sync::{Condvar, Mutex};

/// An append waiting for its bytes to be durable.
#[derive(Debug)]
pub struct PendingAppend {
    /// The end offset that must be durable for this append to complete.
    pub target_end: u64,
    /// What the append reports when it completes.
    pub info: AppendInfo,
    pub(crate) completion: Arc<Completion>,
}

impl PendingAppend {
    /// A pending append whose completion nobody waits on. Only for `tests/loom_group_commit.rs`,
    /// which model-checks the queue from outside the crate; the log builds its own.
    #[doc(hidden)]
    pub fn detached(target_end: u64, info: AppendInfo) -> Self {
        PendingAppend { target_end, info, completion: Arc::new(Completion::default()) }
    }
}

/// What the flusher should do next.
#[derive(Debug)]
pub enum Round {
    /// Sync, then complete these appends.
    Sync(Vec<PendingAppend>),
    /// The interval passed with nothing queued: sync whatever was written.
    Tick,
    /// Shut down: nothing is queued and no more appends will come.
    Stop,
}

#[derive(Debug, Default)]
struct Queue {
    pending: Vec<PendingAppend>,
    stopping: bool,
}

/// The queue between appenders and the flusher.
#[derive(Debug, Default)]
pub struct GroupCommit {
    queue: Mutex<Queue>,
    wake: Condvar,
}

impl GroupCommit {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues an append (or a producer's retry waiting for its original's sync). The caller
    /// holds the appender lock, so nothing is queued after [`GroupCommit::stop`] (which runs
    /// after the log is closed under that lock).
    pub fn enqueue(&self, append: PendingAppend) {
        let mut queue = self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        assert!(!queue.stopping, "no append is queued after the flusher is told to stop");
        let was_empty = queue.pending.is_empty();
        queue.pending.push(append);
        // The flusher waits only while the queue is empty (it checks under this lock), so
        // only the push that ends the emptiness needs to wake it.
        if was_empty {
            self.wake.notify_one();
        }
    }

    /// Waits for work: every queued append at once, a tick after `interval` with nothing
    /// queued, or the stop signal once the queue is drained.
    pub fn next_round(&self, interval: Option<Duration>) -> Round {
        let mut queue = self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            if !queue.pending.is_empty() {
                return Round::Sync(std::mem::take(&mut queue.pending));
            }
            if queue.stopping {
                return Round::Stop;
            }
            match interval {
                None => queue = self.wake.wait(queue).unwrap_or_else(std::sync::PoisonError::into_inner),
                Some(interval) => {
                    let (guard, timeout) =
                        self.wake.wait_timeout(queue, interval).unwrap_or_else(std::sync::PoisonError::into_inner);
                    queue = guard;
                    if timeout.timed_out() && queue.pending.is_empty() && !queue.stopping {
                        return Round::Tick;
                    }
                }
            }
        }
    }

    /// Tells the flusher to stop once the queue is drained.
    pub fn stop(&self) {
        let mut queue = self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        queue.stopping = true;
        self.wake.notify_all();
    }
}
