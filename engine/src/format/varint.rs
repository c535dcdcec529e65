//! Zigzag varints, as Kafka's record format uses them: a signed value is zigzag-mapped to
//! unsigned, then written 7 bits at a time, least significant group first, with the high
//! bit of each byte set when more bytes follow. See `docs/format.md`, "Varints".

use crate::error::{Error, Result};

/// Longest encoding of a 32-bit varint.
pub const VARINT32_LEN_MAX: usize = 5;
/// Longest encoding of a 64-bit varint.
pub const VARINT64_LEN_MAX: usize = 10;

/// Appends `value` as a zigzag varint (32-bit range).
pub fn put_varint(buf: &mut Vec<u8>, value: i32) {
    put_varlong(buf, i64::from(value));
}

/// Appends `value` as a zigzag varint (64-bit range).
pub fn put_varlong(buf: &mut Vec<u8>, value: i64) {
    let mut zigzag = ((value << 1) ^ (value >> 63)) as u64;
    while zigzag >= 0x80 {
        buf.push((zigzag as u8) | 0x80);
        zigzag >>= 7;
    }
    buf.push(zigzag as u8);
}

/// Number of bytes `put_varint(value)` writes.
pub fn varint_len(value: i32) -> usize {
    varlong_len(i64::from(value))
}

/// Number of bytes `put_varlong(value)` writes.
pub fn varlong_len(value: i64) -> usize {
    let zigzag = ((value << 1) ^ (value >> 63)) as u64;
    let bits = 64 - zigzag.leading_zeros() as usize;
    bits.max(1).div_ceil(7)
}

/// Reads a 32-bit zigzag varint from the front of `buf`, advancing it.
pub fn get_varint(buf: &mut &[u8]) -> Result<i32> {
    let value = get_unsigned(buf, VARINT32_LEN_MAX)?;
    if value > u64::from(u32::MAX) {
        return Err(Error::malformed("varint overflows 32 bits"));
    }
    let value = value as u32;
    Ok(((value >> 1) as i32) ^ -((value & 1) as i32))
}

/// Reads a 64-bit zigzag varint from the front of `buf`, advancing it.
pub fn get_varlong(buf: &mut &[u8]) -> Result<i64> {
    let value = get_unsigned(buf, VARINT64_LEN_MAX)?;
    Ok(((value >> 1) as i64) ^ -((value & 1) as i64))
}

fn get_unsigned(buf: &mut &[u8], len_max: usize) -> Result<u64> {
    let mut value: u64 = 0;
    for i in 0..len_max {
        let Some((&byte, rest)) = buf.split_first() else {
            return Err(Error::malformed("varint runs past the end of the buffer"));
        };
        *buf = rest;
        let shift = 7 * i as u32;
        let bits = u64::from(byte & 0x7f);
        if shift == 63 && bits > 1 {
            return Err(Error::malformed("varint overflows 64 bits"));
        }
        value |= bits << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(Error::malformed("varint longer than its maximum length"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Round-trips boundary values and checks `varint_len` agrees with the encoder.
    #[test]
    fn round_trip_boundaries() {
        for v in [0i64, 1, -1, 63, -64, 64, -65, i64::from(i32::MAX), i64::from(i32::MIN), i64::MAX, i64::MIN] {
            let mut buf = Vec::new();
            put_varlong(&mut buf, v);
            assert_eq!(buf.len(), varlong_len(v), "length of {v}");
            let mut slice = &buf[..];
            assert_eq!(get_varlong(&mut slice).expect("decodes"), v);
            assert!(slice.is_empty());
        }
        for v in [0i32, -1, 1, i32::MAX, i32::MIN, 300, -300] {
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            assert_eq!(buf.len(), varint_len(v));
            let mut slice = &buf[..];
            assert_eq!(get_varint(&mut slice).expect("decodes"), v);
        }
    }

    /// Truncated, overlong and overflowing encodings are errors, not panics.
    #[test]
    fn rejects_bad_encodings() {
        assert!(get_varint(&mut &[0x80u8][..]).is_err());
        assert!(get_varint(&mut &[0xff, 0xff, 0xff, 0xff, 0x7f][..]).is_err());
        assert!(get_varint(&mut &[0x80, 0x80, 0x80, 0x80, 0x80, 0x01][..]).is_err());
        assert!(get_varlong(&mut &[0xff; 10][..]).is_err());
        assert!(get_varlong(&mut &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02][..]).is_err());
        assert!(get_varint(&mut &[][..]).is_err());
    }
}
