//! Arbitrary bytes through `replica::epochs::decode` (the leader-epoch checkpoint): never
//! panics; whatever decodes re-encodes to the same bytes and answers end-offset queries
//! consistently (epochs increase, so do the ends). Each input is also tried with its
//! trailing CRC-32 repaired, so mutations of the fields get past the check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rill_engine::replica::epochs::{decode, encode};
use rill_fuzz::with_fixed_crc;

fn check(data: &[u8]) {
    if let Ok(cache) = decode(data) {
        assert_eq!(encode(&cache), data, "checkpoint does not round-trip");
        let log_end = cache.latest().map_or(0, |e| e.start_offset).saturating_add(1);
        let mut previous = (0, 0);
        for entry in cache.entries() {
            let answer = cache.end_offset_for(entry.epoch, log_end);
            assert_eq!(answer.0, entry.epoch, "a recorded epoch answers for itself");
            assert!(answer >= previous, "answers do not go backwards");
            previous = answer;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if let Some(fixed) = with_fixed_crc(data) {
        check(&fixed);
    }
});
