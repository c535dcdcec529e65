//! Arbitrary bytes through `cursor::priority::state::decode`: never panics; a decoded state
//! has `lanes × partitions` queues and re-encodes to a file that decodes to the same state.
//! Each input is also tried with its trailing CRC-32 repaired, so mutations of the fields
//! get past the check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rill_engine::cursor::priority::state::{decode, encode};
use rill_fuzz::with_fixed_crc;

fn check(data: &[u8]) {
    if let Ok(state) = decode(data) {
        assert_eq!(state.queues.len(), usize::from(state.lanes) * state.partitions as usize);
        let again = decode(&encode(&state)).expect("re-encoded cursor state decodes");
        assert_eq!(again, state, "cursor state does not round-trip");
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if let Some(fixed) = with_fixed_crc(data) {
        check(&fixed);
    }
});
