//! The lane scheduler of a priority cursor: which lane the next delivery comes from.
//!
//! Pure: it sees only, per lane, since when the lane's oldest ready message has been
//! ready, and the clock. The rule (aging, then stride scheduling among the most urgent
//! lanes) and the starvation bound it gives are stated in the parent module's docs.
//!
//! It owns: per-lane passes and the virtual time of stride scheduling.
//! It must never: read the log or the cursor's state.

use crate::limits::{PRIORITY_LANES_MAX, PRIORITY_STRIDE_SCALE};

/// Number of lanes as an array length.
pub(crate) const LANES: usize = PRIORITY_LANES_MAX as usize;

/// A lane's effective priority after waiting `waited_ms`: it rises (the number falls) by one
/// lane per `aging_ms` waited, down to 0 (`p0`, the most urgent).
pub fn effective_lane(lane: u8, waited_ms: u64, aging_ms: u64) -> u8 {
    let steps = waited_ms / aging_ms.max(1);
    lane.saturating_sub(u8::try_from(steps).unwrap_or(u8::MAX))
}

/// The starvation bound `B_k` in deliveries: once lane `lane`'s oldest ready message has
/// waited `lane × aging_ms`, at most this many deliveries from other lanes precede the next
/// delivery from `lane`. `B_k = Σ_{j ≠ k} (⌊w_j / w_k⌋ + 1)` over the topic's lanes.
pub fn starvation_bound(weights: &[u32], lane: u8) -> u64 {
    let k = usize::from(lane);
    let w_k = u64::from(weights[k].max(1));
    weights.iter().enumerate().filter(|(j, _)| *j != k).map(|(_, w_j)| u64::from(*w_j) / w_k + 1).sum()
}

/// Stride scheduling across lanes with aging (see the parent module's docs).
#[derive(Clone, Debug)]
pub(crate) struct LaneScheduler {
    strides: [u64; LANES],
    aging_ms: u64,
    lanes: usize,
    passes: [u64; LANES],
    /// Pass of the last lane picked (before its stride was added); never decreases.
    virtual_time: u64,
}

impl LaneScheduler {
    /// A scheduler for `lanes` lanes with the given weights (each in 1..=16, checked by the
    /// cursor's configuration).
    pub(crate) fn new(weights: [u32; LANES], aging_ms: u64, lanes: u8) -> Self {
        let strides = weights.map(|w| PRIORITY_STRIDE_SCALE / u64::from(w.max(1)));
        LaneScheduler { strides, aging_ms, lanes: usize::from(lanes), passes: [0; LANES], virtual_time: 0 }
    }

    /// Picks the lane of the next delivery, or `None` when no lane has a ready message.
    /// `oldest_ready_since_ms[k]` is since when lane k's oldest ready message has been ready.
    pub(crate) fn pick(&mut self, now_ms: i64, oldest_ready_since_ms: &[Option<i64>; LANES]) -> Option<u8> {
        let mut levels: [Option<u8>; LANES] = [None; LANES];
        for (k, level) in levels.iter_mut().enumerate().take(self.lanes) {
            *level = oldest_ready_since_ms[k].map(|since| {
                let waited_ms = u64::try_from(now_ms.saturating_sub(since)).unwrap_or(0);
                effective_lane(k as u8, waited_ms, self.aging_ms)
            });
        }
        let most_urgent = levels.iter().flatten().min().copied()?;
        let mut chosen: Option<usize> = None;
        for (k, level) in levels.iter().enumerate().take(self.lanes) {
            if *level != Some(most_urgent) {
                continue;
            }
            // A lane (re)joining the competition starts at the current virtual time, so
            // that time spent waiting or absent is not banked as credit.
            self.passes[k] = self.passes[k].max(self.virtual_time);
            if chosen.is_none_or(|c| self.passes[k] < self.passes[c]) {
                chosen = Some(k);
            }
        }
        let k = chosen.expect("the most urgent level belongs to at least one lane");
        self.virtual_time = self.passes[k];
        self.passes[k] += self.strides[k];
        Some(k as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With every lane fresh, p0 is strictly preferred; other lanes get nothing.
    #[test]
    fn fresh_p0_is_strictly_preferred() {
        let mut s = LaneScheduler::new([8, 4, 2, 1], 1_000, 4);
        let ready = [Some(100), Some(100), Some(100), Some(100)];
        for _ in 0..50 {
            assert_eq!(s.pick(100, &ready), Some(0));
        }
        assert_eq!(s.pick(100, &[None, Some(100), Some(100), None]), Some(1));
        assert_eq!(s.pick(100, &[None; LANES]), None);
    }

    /// All lanes aged to level 0 share deliveries in proportion to their weights.
    #[test]
    fn aged_lanes_share_by_weight() {
        let mut s = LaneScheduler::new([8, 4, 2, 1], 10, 4);
        let ready = [Some(0), Some(0), Some(0), Some(0)];
        let mut counts = [0u32; LANES];
        for _ in 0..150 {
            counts[usize::from(s.pick(1_000, &ready).expect("ready"))] += 1;
        }
        assert_eq!(counts, [80, 40, 20, 10]);
    }

    /// The bound formula with the default weights.
    #[test]
    fn default_bounds() {
        let w = [8, 4, 2, 1];
        assert_eq!([0, 1, 2, 3].map(|k| starvation_bound(&w, k)), [3, 5, 9, 17]);
        assert_eq!(effective_lane(3, 2_999, 1_000), 1);
        assert_eq!(effective_lane(3, 3_000, 1_000), 0);
        assert_eq!(effective_lane(0, 0, 1_000), 0);
    }
}
