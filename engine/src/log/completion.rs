//! Append completion: a one-shot slot that the flusher fills when an append is durable,
//! and that the caller waits on by blocking or by `.await`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use parking_lot::{Condvar, Mutex};

use crate::error::Result;

/// Where an appended batch landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendInfo {
    /// Offset of the batch's first record.
    pub base_offset: u64,
    /// Offset of the batch's last record.
    pub last_offset: u64,
    /// Whether the batch was a producer's retry of a batch already in the log, answered
    /// with the original offsets instead of being appended again.
    pub duplicate: bool,
}

#[derive(Debug, Default)]
struct Slot {
    result: Option<Result<AppendInfo>>,
    waker: Option<Waker>,
}

/// The flusher's side of a pending append.
#[derive(Debug, Default)]
pub(crate) struct Completion {
    slot: Mutex<Slot>,
    done: Condvar,
}

impl Completion {
    /// Fills the slot and wakes the waiter. Called once.
    pub(crate) fn complete(&self, result: Result<AppendInfo>) {
        let waker = {
            let mut slot = self.slot.lock();
            debug_assert!(slot.result.is_none(), "an append completes once");
            slot.result = Some(result);
            self.done.notify_all();
            slot.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// Handle to an append: [`AppendHandle::wait`] blocks until the batch is acknowledged per
/// the topic's fsync policy; awaiting it does the same without blocking a thread.
#[derive(Debug)]
#[must_use = "an append is acknowledged only when its handle completes"]
pub struct AppendHandle {
    state: HandleState,
}

#[derive(Debug)]
enum HandleState {
    Ready(Option<Result<AppendInfo>>),
    Pending(Arc<Completion>),
}

impl AppendHandle {
    pub(crate) fn ready(result: Result<AppendInfo>) -> Self {
        AppendHandle { state: HandleState::Ready(Some(result)) }
    }

    pub(crate) fn pending(completion: Arc<Completion>) -> Self {
        AppendHandle { state: HandleState::Pending(completion) }
    }

    /// Blocks until the append is acknowledged (or fails).
    pub fn wait(self) -> Result<AppendInfo> {
        match self.state {
            HandleState::Ready(result) => result.expect("a ready handle is consumed once"),
            HandleState::Pending(completion) => {
                let mut slot = completion.slot.lock();
                loop {
                    if let Some(result) = slot.result.take() {
                        return result;
                    }
                    completion.done.wait(&mut slot);
                }
            }
        }
    }
}

impl Future for AppendHandle {
    type Output = Result<AppendInfo>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().state {
            HandleState::Ready(result) => Poll::Ready(result.take().expect("a completed future is not polled again")),
            HandleState::Pending(completion) => {
                let mut slot = completion.slot.lock();
                match slot.result.take() {
                    Some(result) => Poll::Ready(result),
                    None => {
                        slot.waker = Some(cx.waker().clone());
                        Poll::Pending
                    }
                }
            }
        }
    }
}
