//! Arbitrary bytes through `get_varint` / `get_varlong`: never panic; every decoded value
//! re-encodes to something that decodes to the same value, with the length `varint_len` /
//! `varlong_len` predict; the 32- and 64-bit decoders agree where both succeed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rill_engine::format::varint::{
    get_varint, get_varlong, put_varint, put_varlong, varint_len, varlong_len, VARINT32_LEN_MAX, VARINT64_LEN_MAX,
};

fuzz_target!(|data: &[u8]| {
    // Decode the input as a stream of 64-bit varints, and separately as 32-bit ones; at
    // every start position also try the other width.
    for wide in [false, true] {
        let mut rest = data;
        while !rest.is_empty() {
            let before = rest;
            let mut as32 = before;
            let mut as64 = before;
            let r32 = get_varint(&mut as32);
            let r64 = get_varlong(&mut as64);
            if let Ok(v) = r32 {
                let used = before.len() - as32.len();
                assert!((1..=VARINT32_LEN_MAX).contains(&used));
                let mut buf = Vec::new();
                put_varint(&mut buf, v);
                assert_eq!(buf.len(), varint_len(v));
                assert!(buf.len() <= used, "canonical encoding is never longer than the one read");
                assert_eq!(get_varint(&mut &buf[..]).ok(), Some(v));
                assert_eq!(r64.as_ref().ok(), Some(&i64::from(v)), "32- and 64-bit decoders disagree");
                assert_eq!(as64.len(), as32.len());
            }
            if let Ok(v) = r64 {
                let used = before.len() - as64.len();
                assert!((1..=VARINT64_LEN_MAX).contains(&used));
                let mut buf = Vec::new();
                put_varlong(&mut buf, v);
                assert_eq!(buf.len(), varlong_len(v));
                assert!(buf.len() <= used, "canonical encoding is never longer than the one read");
                let mut slice = &buf[..];
                assert_eq!(get_varlong(&mut slice).ok(), Some(v));
                assert!(slice.is_empty());
                if let Ok(v32) = i32::try_from(v) {
                    // A value in i32 range encodes identically in both widths.
                    let mut buf32 = Vec::new();
                    put_varint(&mut buf32, v32);
                    assert_eq!(buf32, buf);
                }
            }
            let next = if wide { (r64.is_ok(), as64) } else { (r32.is_ok(), as32) };
            rest = if next.0 { next.1 } else { &before[1..] };
        }
    }
});
