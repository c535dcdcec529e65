//! The open-loop schedule: message `i` of a producer is *intended* to be sent at a fixed
//! time, whatever happened to the messages before it. Latency is measured from that
//! intended time, so a stall of the system (or of the load generator) shows up as latency
//! of every message that should have gone out during it, instead of silently lowering the
//! send rate (coordinated omission).

/// Intended send times of one producer's messages, in ns after the run's origin.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    /// Time between two messages of this producer, ns.
    interval_ns: f64,
    /// Intended time of message 0, ns after the origin.
    offset_ns: f64,
}

impl Schedule {
    /// The share of producer `index` (of `producers`) of a total rate of `rate` messages per
    /// second: each producer sends `rate / producers` a second, and their start times are
    /// staggered by `1 / rate` so the merged stream is evenly spaced.
    pub fn for_producer(rate: f64, producers: usize, index: usize) -> Option<Schedule> {
        if !(rate.is_finite() && rate > 0.0) || producers == 0 || index >= producers {
            return None;
        }
        let total_interval_ns = 1e9 / rate;
        Some(Schedule {
            interval_ns: total_interval_ns * producers as f64,
            offset_ns: total_interval_ns * index as f64,
        })
    }

    /// Intended send time of message `i`, ns after the origin.
    pub fn due_ns(&self, i: u64) -> u64 {
        (self.offset_ns + i as f64 * self.interval_ns) as u64
    }

    /// How many messages are due at `now_ns` (messages `0..n` have `due_ns <= now_ns`).
    pub fn due_count(&self, now_ns: u64) -> u64 {
        if (now_ns as f64) < self.offset_ns {
            return 0;
        }
        let n = ((now_ns as f64 - self.offset_ns) / self.interval_ns).floor() as u64 + 1;
        // Float rounding may put the boundary one message off; settle it with due_ns itself.
        let mut n = n;
        while n > 0 && self.due_ns(n - 1) > now_ns {
            n -= 1;
        }
        while self.due_ns(n) <= now_ns {
            n += 1;
        }
        n
    }

    /// The messages due by `now_ns` that have not been sent yet (`sent` of them were),
    /// but not more than `max` and none intended at or after `end_ns`: the half-open range
    /// of message indexes to send now.
    pub fn next_batch(&self, sent: u64, now_ns: u64, end_ns: u64, max: u64) -> std::ops::Range<u64> {
        let due = self.due_count(now_ns.min(end_ns.saturating_sub(1)));
        let due = if end_ns == 0 { 0 } else { due };
        let upto = due.min(sent + max);
        sent..upto.max(sent)
    }
}

/// Writes the 8-byte little-endian stamp (intended send time, ns after the origin) at the
/// start of a message value of `size` bytes (at least 8); the rest is filler.
pub fn stamped_value(intended_ns: u64, size: usize) -> Vec<u8> {
    let mut value = vec![0x5a_u8; size.max(8)];
    value[..8].copy_from_slice(&intended_ns.to_le_bytes());
    value
}

/// The stamp of a value written by [`stamped_value`]; `None` if it is shorter than 8 bytes.
pub fn stamp_of(value: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(value.get(..8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_producer_is_evenly_spaced() {
        let s = Schedule::for_producer(50_000.0, 1, 0).unwrap();
        assert_eq!(s.due_ns(0), 0);
        assert_eq!(s.due_ns(1), 20_000);
        assert_eq!(s.due_ns(50_000), 1_000_000_000);
    }

    #[test]
    fn producers_interleave_into_the_total_rate() {
        let rate = 1000.0;
        let mut all: Vec<u64> = (0..4)
            .flat_map(|p| {
                let s = Schedule::for_producer(rate, 4, p).unwrap();
                (0..250).map(move |i| s.due_ns(i))
            })
            .collect();
        all.sort_unstable();
        // 1000 messages, one every ms, none twice.
        for (i, t) in all.iter().enumerate() {
            assert_eq!(*t, i as u64 * 1_000_000, "message {i}");
        }
    }

    #[test]
    fn due_count_counts_messages_due_by_now() {
        let s = Schedule::for_producer(1000.0, 2, 1).unwrap(); // due at 1, 3, 5, ... ms
        assert_eq!(s.due_count(0), 0);
        assert_eq!(s.due_count(999_999), 0);
        assert_eq!(s.due_count(1_000_000), 1);
        assert_eq!(s.due_count(2_999_999), 1);
        assert_eq!(s.due_count(3_000_000), 2);
        for now in (0..50_000_000).step_by(333_333) {
            let n = s.due_count(now);
            assert!(n == 0 || s.due_ns(n - 1) <= now);
            assert!(s.due_ns(n) > now);
        }
    }

    #[test]
    fn a_stall_makes_every_missed_message_due_at_once() {
        // The sender wakes 10 ms late: all ten messages it missed are due, each keeping its
        // own intended time (that is what the latency is measured from).
        let s = Schedule::for_producer(1000.0, 1, 0).unwrap();
        let batch = s.next_batch(1, 10_500_000, u64::MAX, 1000);
        assert_eq!(batch, 1..11);
        assert_eq!(s.due_ns(batch.start), 1_000_000);
        // Capped by max, and nothing intended at or after the end.
        assert_eq!(s.next_batch(1, 10_500_000, u64::MAX, 4), 1..5);
        assert_eq!(s.next_batch(1, 10_500_000, 5_000_000, 1000), 1..5);
        assert_eq!(s.next_batch(11, 10_500_000, u64::MAX, 1000), 11..11);
    }

    #[test]
    fn rejects_nonsense() {
        assert!(Schedule::for_producer(0.0, 1, 0).is_none());
        assert!(Schedule::for_producer(f64::NAN, 1, 0).is_none());
        assert!(Schedule::for_producer(10.0, 0, 0).is_none());
        assert!(Schedule::for_producer(10.0, 2, 2).is_none());
    }

    #[test]
    fn stamps_round_trip() {
        let v = stamped_value(123_456_789, 100);
        assert_eq!(v.len(), 100);
        assert_eq!(stamp_of(&v), Some(123_456_789));
        assert_eq!(stamped_value(1, 3).len(), 8);
        assert_eq!(stamp_of(&[1, 2, 3]), None);
    }
}
