//! Wakes the open-loop senders at their intended send times with the precision of the OS
//! timer. tokio's timer works in whole milliseconds and rounds up, so a sender sleeping on
//! it wakes up to 1 ms late: that lateness is the load generator's, yet it is inside every
//! latency measured from the intended time. One pacer thread sleeps (`park_timeout`, a
//! high-resolution timer) until the earliest time a sender waits for and wakes that sender.
//!
//! Race freedom: a sender publishes its due time, then reads the pacer's planned wake-up
//! and unparks the pacer if it is due earlier; the pacer publishes its planned wake-up,
//! then re-reads every due time before it parks. Both sides use `SeqCst`, so one of them
//! always sees the other's write, and `unpark` before `park` is not lost.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// No wake-up wanted.
const IDLE: u64 = u64::MAX;
/// Longest park of the pacer thread (it also re-checks `stop` this often).
const PARK_MAX_NS: u64 = 50_000_000;

struct Slot {
    /// When the sender wants to be woken, ns after the origin; [`IDLE`] if it does not wait.
    due_ns: AtomicU64,
    wake: Notify,
}

struct Shared {
    origin: Instant,
    slots: Vec<Slot>,
    /// When the pacer thread will next look, ns after the origin.
    planned_ns: AtomicU64,
    stop: AtomicBool,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// The pacer thread; stopped and joined on drop.
pub struct Pacer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// One sender's handle.
#[derive(Clone)]
pub struct PacerHandle {
    shared: Arc<Shared>,
    thread: Thread,
    index: usize,
}

impl Pacer {
    /// A pacer for `senders` senders whose times count from `origin`.
    pub fn start(origin: Instant, senders: usize) -> std::io::Result<Pacer> {
        let slots = (0..senders).map(|_| Slot { due_ns: AtomicU64::new(IDLE), wake: Notify::new() }).collect();
        let shared = Arc::new(Shared { origin, slots, planned_ns: AtomicU64::new(0), stop: AtomicBool::new(false) });
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new().name("rill-bench-pacer".into()).spawn(move || run(&shared))?
        };
        Ok(Pacer { shared, thread: Some(thread) })
    }

    /// The handle of sender `index` (< `senders`).
    pub fn handle(&self, index: usize) -> PacerHandle {
        assert!(index < self.shared.slots.len(), "sender {index} of {}", self.shared.slots.len());
        let thread = self.thread.as_ref().map(|t| t.thread().clone()).expect("the pacer runs until dropped");
        PacerHandle { shared: Arc::clone(&self.shared), thread, index }
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            drop(thread.join());
        }
    }
}

impl PacerHandle {
    /// Returns at `due_ns` after the origin (or soon after; never before it, unless a wake-up
    /// left over from an earlier wait ends this one early, so callers re-check the time).
    pub async fn sleep_until(&self, due_ns: u64) {
        if self.shared.now_ns() >= due_ns {
            return;
        }
        let slot = &self.shared.slots[self.index];
        slot.due_ns.store(due_ns, Ordering::SeqCst);
        if due_ns < self.shared.planned_ns.load(Ordering::SeqCst) {
            self.thread.unpark();
        }
        slot.wake.notified().await;
    }
}

fn run(shared: &Shared) {
    while !shared.stop.load(Ordering::SeqCst) {
        let now = shared.now_ns();
        let mut next = now.saturating_add(PARK_MAX_NS);
        for slot in &shared.slots {
            let due = slot.due_ns.load(Ordering::SeqCst);
            if due <= now {
                // A sender that set a new time in between keeps it.
                if slot.due_ns.compare_exchange(due, IDLE, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                    slot.wake.notify_one();
                }
            } else {
                next = next.min(due);
            }
        }
        shared.planned_ns.store(next, Ordering::SeqCst);
        // A sender that published before it could see `next` may have skipped the unpark.
        if shared.slots.iter().any(|s| s.due_ns.load(Ordering::SeqCst) < next) {
            continue;
        }
        let now = shared.now_ns();
        if next > now {
            std::thread::park_timeout(Duration::from_nanos(next - now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn senders_wake_at_or_after_their_times() {
        let origin = Instant::now();
        let pacer = Pacer::start(origin, 3).expect("start");
        let mut tasks = Vec::new();
        for i in 0..3 {
            let handle = pacer.handle(i);
            tasks.push(tokio::spawn(async move {
                let mut woke = Vec::new();
                for k in 0..20u64 {
                    let due = 2_000_000 + k * 700_000 + i as u64 * 200_000;
                    // Re-check as the producers do: an early return is allowed, a late
                    // return is what is measured.
                    while handle.shared.now_ns() < due {
                        handle.sleep_until(due).await;
                    }
                    woke.push((due, handle.shared.now_ns()));
                }
                woke
            }));
        }
        let mut late = Vec::new();
        for task in tasks {
            for (due, woke) in task.await.expect("sender") {
                assert!(woke >= due, "woke at {woke} before {due}");
                late.push(woke - due);
            }
        }
        drop(pacer);
        // Generous, for a shared test machine; a lost wake-up waits for the pacer's next
        // routine look, `PARK_MAX_NS` (50 ms) later.
        late.sort_unstable();
        let median = late[late.len() / 2];
        assert!(median < 5_000_000, "median lateness {} µs", median / 1000);
    }
}
