//! Arbitrary bytes through `producer::snapshot::decode`: never panics; whatever decodes
//! re-encodes (`encode(states, offset)`) to a file that decodes to the same states and
//! offset (values are compared, not bytes: the per-producer reserved byte is not checked).
//! Each input is also tried with its trailing CRC-32 repaired, so mutations of the fields
//! get past the check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rill_engine::producer::snapshot::{decode, encode};
use rill_fuzz::with_fixed_crc;

fn check(data: &[u8]) {
    if let Ok((states, offset)) = decode(data) {
        let again = decode(&encode(&states, offset)).expect("re-encoded snapshot decodes");
        assert_eq!(again, (states, offset), "snapshot does not round-trip");
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if let Some(fixed) = with_fixed_crc(data) {
        check(&fixed);
    }
});
