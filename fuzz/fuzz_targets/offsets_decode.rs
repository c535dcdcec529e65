//! Arbitrary bytes through `cursor::offsets::decode`: never panics; whatever decodes
//! re-encodes to a file that decodes to the same offsets (values are compared, not bytes:
//! entries need not be in key order in the input). Each input is also tried with its
//! trailing CRC-32 repaired, so mutations of the fields get past the check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rill_engine::cursor::offsets::{decode, encode};
use rill_fuzz::with_fixed_crc;

fn check(data: &[u8]) {
    if let Ok(offsets) = decode(data) {
        let again = decode(&encode(&offsets)).expect("re-encoded offsets decode");
        assert_eq!(again, offsets, "consumer offsets do not round-trip");
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if let Some(fixed) = with_fixed_crc(data) {
        check(&fixed);
    }
});
