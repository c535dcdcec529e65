//! Arbitrary bytes through `topic_meta::decode`: never panics; whatever decodes is the
//! canonical encoding of its configuration (`encode(decode(x)) == x`) and is valid. Each
//! input is also tried with its CRC repaired, so mutations of the fields get past the check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rill_engine::format::topic_meta::{decode, encode, CRC_OFFSET, TOPIC_META_SIZE};

fn check(data: &[u8]) {
    if let Ok(config) = decode(data) {
        assert!(config.validate().is_ok(), "decode returned an invalid config: {config:?}");
        assert_eq!(&encode(&config)[..], data, "decoded {config:?} does not re-encode to its input");
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() == TOPIC_META_SIZE {
        let mut fixed = data.to_vec();
        let crc = crc32fast::hash(&fixed[..CRC_OFFSET]);
        fixed[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        if fixed != data {
            check(&fixed);
        }
    }
});
