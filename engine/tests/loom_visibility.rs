//! Loom model of the appender → reader handoff through the real
//! `rill_engine::log::visibility::EndOffset`.
//!
//! Run with:
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p rill-engine --release --test loom_visibility --test loom_group_commit
//! ```
//!
//! The appender writes a record's bytes into a slot (a `loom::cell::UnsafeCell`, standing
//! for the segment's bytes below `written_len`) and then publishes the new end with
//! `EndOffset::publish`; a reader loads the end with `EndOffset::load` and reads every slot
//! below it, without any lock. Loom explores every interleaving (and every value a load may
//! see under the C++11 memory model) and fails on any read of a slot that is not ordered
//! after its write. The models prove that no such race exists, that a reader sees exactly
//! the bytes written below the end it loaded, and that the end it sees never goes back.
//!
//! Why `Release`/`Acquire` and not `Relaxed`: a relaxed store of the end does not order the
//! slot's write before it, so a reader can load the new end and still race with (or miss)
//! the write. `relaxed_publish_is_a_data_race` runs the same model with a relaxed end and
//! expects loom to report exactly that.
#![cfg(loom)]

use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicU64, Ordering};
use loom::sync::Arc;
use loom::thread;
use rill_engine::log::visibility::EndOffset;

/// Bytes of one modelled record.
const RECORD_LEN: usize = 4;

/// The bytes record `i` is written with.
fn record(i: usize) -> [u8; RECORD_LEN] {
    [i as u8 + 1, 0xAB, i as u8 ^ 0x5A, 0xCD]
}

/// Something that publishes an end offset and lets readers load it.
trait End: Send + Sync + 'static {
    fn new(end: u64) -> Self;
    fn publish(&self, end: u64);
    fn load(&self) -> u64;
}

impl End for EndOffset {
    fn new(end: u64) -> Self {
        EndOffset::new(end)
    }
    fn publish(&self, end: u64) {
        EndOffset::publish(self, end);
    }
    fn load(&self) -> u64 {
        EndOffset::load(self)
    }
}

/// The broken alternative: the end stored and loaded with `Relaxed`.
struct RelaxedEnd(AtomicU64);

impl End for RelaxedEnd {
    fn new(end: u64) -> Self {
        RelaxedEnd(AtomicU64::new(end))
    }
    fn publish(&self, end: u64) {
        self.0.store(end, Ordering::Relaxed);
    }
    fn load(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A log of `slots.len()` record slots and the end offset that says how many are visible.
struct Log<E> {
    slots: Vec<UnsafeCell<[u8; RECORD_LEN]>>,
    end: E,
}

// SAFETY: the slots follow the log's discipline: only the single appender thread writes a
// slot, and only at an index at or above the published end; readers read only slots below
// an end they loaded. Whether that discipline is enough to rule out a data race is exactly
// what the loom models in this file check (and `relaxed_publish_is_a_data_race` shows that
// loom reports the race when the ordering is too weak).
unsafe impl<E: Sync> Sync for Log<E> {}

impl<E: End> Log<E> {
    fn new(slots: usize) -> Self {
        Log { slots: (0..slots).map(|_| UnsafeCell::new([0; RECORD_LEN])).collect(), end: E::new(0) }
    }

    /// The appender: writes record `i`'s bytes, then publishes the end past it.
    fn append(&self, i: usize) {
        self.slots[i].with_mut(|slot| {
            // SAFETY: slot `i` is at the end offset, which is not published yet, so no reader
            // looks at it; this thread is the only appender.
            unsafe { *slot = record(i) };
        });
        self.end.publish(i as u64 + 1);
    }

    /// A reader: loads the end and checks every record below it. Returns the end seen.
    fn read_visible(&self) -> u64 {
        let end = self.end.load();
        assert!(end as usize <= self.slots.len(), "end {end} past the last slot");
        for (i, slot) in self.slots.iter().enumerate().take(end as usize) {
            // SAFETY: slot `i` is below an end this thread loaded; the appender wrote it
            // before publishing that end and never writes it again.
            let bytes = slot.with(|slot| unsafe { *slot });
            assert_eq!(bytes, record(i), "record {i} below end {end} reads back as written");
        }
        end
    }
}

/// No preemption bound: these models are small enough to explore exhaustively (about ten
/// seconds in release). `LOOM_MAX_PREEMPTIONS` still bounds them if set.
fn builder() -> loom::model::Builder {
    loom::model::Builder::new()
}

/// One appender publishes three records one at a time; one reader reads what is visible
/// twice. Every record below each end it loads reads back as written, and the second end
/// is not below the first.
fn one_appender_one_reader<E: End>() {
    builder().check(|| {
        let log = Arc::new(Log::<E>::new(3));
        let appender = {
            let log = Arc::clone(&log);
            thread::spawn(move || (0..3).for_each(|i| log.append(i)))
        };
        let reader = {
            let log = Arc::clone(&log);
            thread::spawn(move || {
                let first = log.read_visible();
                let second = log.read_visible();
                assert!(second >= first, "the visible end went back from {first} to {second}");
            })
        };
        appender.join().expect("appender thread");
        reader.join().expect("reader thread");
        assert_eq!(log.read_visible(), 3, "after the appender is joined every record is visible");
    });
}

#[test]
fn reader_sees_every_record_below_the_published_end() {
    one_appender_one_reader::<EndOffset>();
}

/// Two readers at once: each sees a consistent prefix, independently of the other.
#[test]
fn concurrent_readers_each_see_a_written_prefix() {
    builder().check(|| {
        let log = Arc::new(Log::<EndOffset>::new(2));
        let appender = {
            let log = Arc::clone(&log);
            thread::spawn(move || (0..2).for_each(|i| log.append(i)))
        };
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let log = Arc::clone(&log);
                thread::spawn(move || log.read_visible())
            })
            .collect();
        appender.join().expect("appender thread");
        for reader in readers {
            let end = reader.join().expect("reader thread");
            assert!(end <= 2, "a reader saw end {end} past what was published");
        }
    });
}

/// The negative control: with a relaxed end, loom finds a reader that loads the new end
/// and then reads the slot concurrently with (not after) the appender's write.
#[test]
#[should_panic(expected = "Causality violation")]
fn relaxed_publish_is_a_data_race() {
    one_appender_one_reader::<RelaxedEnd>();
}
