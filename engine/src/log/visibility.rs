//! The handoff from the appender to readers: the end offset up to which records are
//! visible (acknowledged per the fsync policy), and waiting for it to move.
//!
//! The publisher writes a batch's bytes (and the segment's `written_len`) first, then
//! stores the new end offset with `Release`; a reader loads it with `Acquire`, so every
//! byte below the end it sees is already written. Readers never take the appender's lock.
//! `tests/loom_visibility.rs` model-checks this handoff.

use std::task::Waker;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use crate::sync::{AtomicU64, Ordering};

/// A monotonically increasing end offset, published with release ordering.
#[derive(Debug)]
pub struct EndOffset {
    value: AtomicU64,
}

impl EndOffset {
    /// Starts at `end`.
    pub fn new(end: u64) -> Self {
        EndOffset { value: AtomicU64::new(end) }
    }

    /// The end as last published. Everything below it is readable.
    pub fn load(&self) -> u64 {
        self.value.load(Ordering::Acquire)
    }

    /// Publishes a new end. Only one thread publishes at a time (the appender under its
    /// lock, or the flusher), so the value never moves backwards.
    pub fn publish(&self, end: u64) {
        let previous = self.value.load(Ordering::Relaxed);
        assert!(end >= previous, "end offset moves backwards: {previous} -> {end}");
        self.value.store(end, Ordering::Release);
    }
}

/// [`EndOffset`] plus blocking and async waiting for it to pass an offset (long poll).
#[derive(Debug)]
pub struct EndWatch {
    end: EndOffset,
    waiters: Mutex<Waiters>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct Waiters {
    wakers: Vec<Waker>,
    closed: bool,
}

impl EndWatch {
    /// Starts at `end`.
    pub fn new(end: u64) -> Self {
        EndWatch { end: EndOffset::new(end), waiters: Mutex::new(Waiters::default()), changed: Condvar::new() }
    }

    /// The visible end offset.
    pub fn load(&self) -> u64 {
        self.end.load()
    }

    /// Publishes a new end and wakes everyone waiting.
    pub fn publish(&self, end: u64) {
        self.end.publish(end);
        self.wake_all();
    }

    /// Moves the end back after a follower cut its log. The caller holds the appender lock
    /// and no publish can be in flight (nothing awaits a sync).
    pub fn reset(&self, end: u64) {
        self.end.value.store(end, Ordering::Release);
        self.wake_all();
    }

    /// Wakes every waiter for good: the log is closing.
    pub fn close(&self) {
        self.waiters.lock().closed = true;
        self.wake_all();
    }

    fn wake_all(&self) {
        let wakers = {
            let mut waiters = self.waiters.lock();
            self.changed.notify_all();
            std::mem::take(&mut waiters.wakers)
        };
        for waker in wakers {
            waker.wake();
        }
    }

    /// Blocks until the end passes `offset` (returns `true`), the deadline passes or the log
    /// closes (returns `false` unless the end passed meanwhile).
    pub fn wait_past(&self, offset: u64, deadline: Instant) -> bool {
        let mut waiters = self.waiters.lock();
        loop {
            if self.load() > offset {
                return true;
            }
            if waiters.closed || self.changed.wait_until(&mut waiters, deadline).timed_out() {
                return self.load() > offset;
            }
        }
    }

    /// Registers `waker` unless the end already passed `offset` or the log is closed;
    /// returns whether the caller should stop waiting.
    pub fn register(&self, offset: u64, waker: &Waker) -> bool {
        if self.load() > offset {
            return true;
        }
        let mut waiters = self.waiters.lock();
        if self.load() > offset || waiters.closed {
            return true;
        }
        if !waiters.wakers.iter().any(|w| w.will_wake(waker)) {
            waiters.wakers.push(waker.clone());
        }
        false
    }
}
