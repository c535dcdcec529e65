//! The frame shared by the small metadata files (producer registry, producer snapshots,
//! consumer offsets): magic (4 bytes), version (u16), reserved (u16, zero), the body, and a
//! CRC-32 of every preceding byte (u32). Normative in `docs/format.md` with each file.

use crate::error::{Error, Result};

/// Bytes before the body: magic, version, reserved.
pub const PREAMBLE_SIZE: usize = 4 + 2 + 2;
/// Size of the trailing CRC-32.
pub const CRC_SIZE: usize = 4;

/// Starts a file: magic, version, reserved zero.
pub fn begin(magic: [u8; 4], version: u16, capacity: usize) -> Vec<u8> {
    let mut buf = Vec::with_capacity(PREAMBLE_SIZE + capacity + CRC_SIZE);
    buf.extend_from_slice(&magic);
    buf.extend_from_slice(&version.to_le_bytes());
    buf.extend_from_slice(&0u16.to_le_bytes());
    buf
}

/// Ends a file: appends the CRC-32 of everything before it.
pub fn seal(mut buf: Vec<u8>) -> Vec<u8> {
    let crc = crc32fast::hash(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    buf
}

/// Checks the CRC, then magic, version and reserved field. Returns the file without its CRC
/// (preamble included, so the fields' documented offsets apply to it).
pub fn open<'a>(buf: &'a [u8], magic: [u8; 4], version: u16, what: &'static str) -> Result<&'a [u8]> {
    let bad = |reason: &str| Error::MalformedBatch { reason: format!("{what}: {reason}") };
    if buf.len() < PREAMBLE_SIZE + CRC_SIZE {
        return Err(bad("shorter than its header"));
    }
    let (body, crc) = buf.split_at(buf.len() - CRC_SIZE);
    let expected = u32::from_le_bytes(crc.try_into().expect("CRC_SIZE bytes"));
    let actual = crc32fast::hash(body);
    if expected != actual {
        return Err(Error::ChecksumMismatch { expected, actual });
    }
    if body[..4] != magic {
        return Err(bad("bad magic"));
    }
    let found = u16::from_le_bytes([body[4], body[5]]);
    if found != version {
        return Err(Error::UnsupportedVersion { what, found: u32::from(found), supported: u32::from(version) });
    }
    if body[6..PREAMBLE_SIZE] != [0, 0] {
        return Err(bad("reserved field is not zero"));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sealed file opens to its body; a flipped byte anywhere, a wrong magic or version,
    /// and truncation are each rejected.
    #[test]
    fn seal_and_open() {
        let mut buf = begin(*b"TEST", 3, 4);
        buf.extend_from_slice(b"body");
        let sealed = seal(buf);
        assert_eq!(&open(&sealed, *b"TEST", 3, "test").expect("opens")[PREAMBLE_SIZE..], b"body");
        assert!(matches!(open(&sealed, *b"TEST", 4, "test"), Err(Error::UnsupportedVersion { .. })));
        assert!(open(&sealed, *b"NOPE", 3, "test").is_err());
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x20;
            assert!(open(&bad, *b"TEST", 3, "test").is_err(), "flip at {i}");
        }
        assert!(open(&sealed[..PREAMBLE_SIZE + CRC_SIZE - 1], *b"TEST", 3, "test").is_err());
    }
}
