//! Byte layouts of the controller's files and the two ways they are written.
//!
//! Owns "Controller state v1" of `docs/format.md`: the small-file envelope (vote, applied
//! state), written whole to a temporary file, fsync'd, renamed over and the directory
//! fsync'd; and the framing of the append-only log file's records. Nothing here knows
//! what the payloads mean, and nothing here may write a file in place except by appending
//! to or truncating the log.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use crate::limits::CONTROLLER_RECORD_SIZE_BYTES_MAX;
use crate::{Error, Result};

/// First bytes of a small file (vote, applied state).
pub(crate) const SMALL_FILE_MAGIC: [u8; 8] = *b"rillcs01";
/// First bytes of the log file.
pub(crate) const LOG_FILE_MAGIC: [u8; 8] = *b"rillcl01";

/// Small file: magic, then the payload length (u32), then its CRC-32 (u32).
pub(crate) const SMALL_MAGIC_OFFSET: usize = 0;
pub(crate) const SMALL_LEN_OFFSET: usize = SMALL_MAGIC_OFFSET + SMALL_FILE_MAGIC.len();
pub(crate) const SMALL_CRC_OFFSET: usize = SMALL_LEN_OFFSET + 4;
pub(crate) const SMALL_HEADER_SIZE: usize = SMALL_CRC_OFFSET + 4;

/// Log record: payload length (u32), CRC-32 of the payload (u32), payload.
pub(crate) const RECORD_LEN_OFFSET: usize = 0;
pub(crate) const RECORD_CRC_OFFSET: usize = RECORD_LEN_OFFSET + 4;
pub(crate) const RECORD_HEADER_SIZE: usize = RECORD_CRC_OFFSET + 4;

/// Name of the log file in the controller directory.
pub(crate) const LOG_FILE: &str = "raft.log";
/// Name of the vote file.
pub(crate) const VOTE_FILE: &str = "vote";
/// Name of the applied-state file.
pub(crate) const STATE_FILE: &str = "state";

fn file_io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::FileIo { op, path: path.to_path_buf(), source }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> Error {
    Error::ControllerCorrupt { path: path.to_path_buf(), reason: reason.into() }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

/// Encodes a small file: header and payload.
pub(crate) fn encode_small(payload: &[u8]) -> Result<Vec<u8>> {
    let len = checked_len(payload)?;
    let mut out = Vec::with_capacity(SMALL_HEADER_SIZE + payload.len());
    out.extend_from_slice(&SMALL_FILE_MAGIC);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Validates a small file read from `path` and returns its payload.
pub(crate) fn decode_small<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a [u8]> {
    if bytes.len() < SMALL_HEADER_SIZE {
        return Err(corrupt(path, format!("{} bytes, shorter than the header", bytes.len())));
    }
    if bytes[SMALL_MAGIC_OFFSET..SMALL_LEN_OFFSET] != SMALL_FILE_MAGIC {
        return Err(corrupt(path, "bad magic"));
    }
    let len = u32_at(bytes, SMALL_LEN_OFFSET) as usize;
    let payload = &bytes[SMALL_HEADER_SIZE..];
    if payload.len() != len {
        return Err(corrupt(path, format!("length {len} but {} payload bytes", payload.len())));
    }
    let (expected, actual) = (u32_at(bytes, SMALL_CRC_OFFSET), crc32fast::hash(payload));
    if expected != actual {
        return Err(corrupt(path, format!("checksum {actual:#010x}, expected {expected:#010x}")));
    }
    Ok(payload)
}

fn checked_len(payload: &[u8]) -> Result<u32> {
    match u32::try_from(payload.len()) {
        Ok(len) if len <= CONTROLLER_RECORD_SIZE_BYTES_MAX => Ok(len),
        _ => Err(Error::FrameTooLarge {
            len: u32::try_from(payload.len()).unwrap_or(u32::MAX),
            max: CONTROLLER_RECORD_SIZE_BYTES_MAX,
        }),
    }
}

/// Reads and validates the small file `name` in `dir`; `None` if it does not exist.
pub(crate) fn read_small(dir: &Path, name: &str) -> Result<Option<Vec<u8>>> {
    let path = dir.join(name);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(file_io("read", &path)(e)),
    };
    Ok(Some(decode_small(&path, &bytes)?.to_vec()))
}

/// Replaces the small file `name` in `dir` atomically and durably: temporary file, fsync,
/// rename over, fsync of the directory.
pub(crate) fn write_small(dir: &Path, name: &str, payload: &[u8]) -> Result<()> {
    let bytes = encode_small(payload)?;
    replace_file(dir, name, &bytes)
}

/// Writes `bytes` as `dir/name` through a temporary file, durably.
pub(crate) fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut file = File::create(&tmp).map_err(file_io("create", &tmp))?;
    file.write_all(bytes).map_err(file_io("write", &tmp))?;
    file.sync_all().map_err(file_io("fsync", &tmp))?;
    drop(file);
    let path = dir.join(name);
    std::fs::rename(&tmp, &path).map_err(file_io("rename", &path))?;
    sync_dir(dir)
}

/// fsyncs a directory, so that renames and creations in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    let handle = File::open(dir).map_err(file_io("open directory", dir))?;
    handle.sync_all().map_err(file_io("fsync directory", dir))
}

/// Appends one log record (header and payload) to `out`.
pub(crate) fn encode_record(payload: &[u8], out: &mut Vec<u8>) -> Result<()> {
    let len = checked_len(payload)?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// The records found in a log file's bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ScannedLog<'a> {
    /// Each valid record: its position in the file and its payload.
    pub records: Vec<(u64, &'a [u8])>,
    /// Where the valid prefix ends; the file is cut here on open.
    pub valid_len: u64,
    /// Why the scan stopped before the end of the bytes, if it did.
    pub bad_tail: Option<String>,
}

/// Scans a whole log file: the magic, then records up to the first torn or damaged one.
pub(crate) fn scan_log<'a>(path: &Path, bytes: &'a [u8]) -> Result<ScannedLog<'a>> {
    if bytes.len() < LOG_FILE_MAGIC.len() || bytes[..LOG_FILE_MAGIC.len()] != LOG_FILE_MAGIC {
        return Err(corrupt(path, "bad magic"));
    }
    let mut pos = LOG_FILE_MAGIC.len();
    let mut records = Vec::new();
    let bad_tail = loop {
        let rest = &bytes[pos..];
        if rest.is_empty() {
            break None;
        }
        if rest.len() < RECORD_HEADER_SIZE {
            break Some(format!("torn record header at {pos}"));
        }
        let len = u32_at(rest, RECORD_LEN_OFFSET);
        if len > CONTROLLER_RECORD_SIZE_BYTES_MAX {
            break Some(format!("record at {pos} claims {len} bytes"));
        }
        let end = RECORD_HEADER_SIZE + len as usize;
        if rest.len() < end {
            break Some(format!("torn record at {pos}"));
        }
        let payload = &rest[RECORD_HEADER_SIZE..end];
        if crc32fast::hash(payload) != u32_at(rest, RECORD_CRC_OFFSET) {
            break Some(format!("checksum mismatch in the record at {pos}"));
        }
        records.push((pos as u64, payload));
        pos += end;
    };
    Ok(ScannedLog { records, valid_len: pos as u64, bad_tail })
}

/// Opens (creating it with its magic, durably, if absent) the log file for reading and
/// writing at explicit positions.
pub(crate) fn open_log(dir: &Path) -> Result<(File, PathBuf)> {
    let path = dir.join(LOG_FILE);
    if !path.exists() {
        replace_file(dir, LOG_FILE, &LOG_FILE_MAGIC)?;
    }
    let file = OpenOptions::new().read(true).write(true).open(&path).map_err(file_io("open", &path))?;
    Ok((file, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small file round-trips; any flipped byte, a short file and a wrong length are
    /// `ControllerCorrupt`, never a panic.
    #[test]
    fn small_file_round_trip_and_every_flip_detected() {
        let path = Path::new("x");
        let bytes = encode_small(b"{\"vote\":1}").expect("encodes");
        assert_eq!(decode_small(path, &bytes).expect("decodes"), b"{\"vote\":1}");
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(matches!(decode_small(path, &bad), Err(Error::ControllerCorrupt { .. })), "flip at {i}");
        }
        for cut in 0..bytes.len() {
            assert!(matches!(decode_small(path, &bytes[..cut]), Err(Error::ControllerCorrupt { .. })), "cut at {cut}");
        }
    }

    /// The scan returns every whole record and stops at a torn tail (cut at every byte of the
    /// last record) or a damaged record, reporting where the valid prefix ends.
    #[test]
    fn log_scan_stops_at_torn_or_bad_record() {
        let path = Path::new("log");
        let mut bytes = LOG_FILE_MAGIC.to_vec();
        encode_record(b"first", &mut bytes).expect("encodes");
        let second_at = bytes.len();
        encode_record(b"second", &mut bytes).expect("encodes");
        let scan = scan_log(path, &bytes).expect("scans");
        assert_eq!(scan.records, vec![(8, &b"first"[..]), (second_at as u64, &b"second"[..])]);
        assert_eq!(scan.valid_len, bytes.len() as u64);
        assert_eq!(scan.bad_tail, None);
        for cut in second_at + 1..bytes.len() {
            let scan = scan_log(path, &bytes[..cut]).expect("scans");
            assert_eq!(scan.records.len(), 1, "cut at {cut}");
            assert_eq!(scan.valid_len, second_at as u64);
            assert!(scan.bad_tail.is_some());
        }
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let scan = scan_log(path, &bad).expect("scans");
        assert_eq!(scan.valid_len, second_at as u64);
        assert!(matches!(scan_log(path, b"rillcl0"), Err(Error::ControllerCorrupt { .. })));
    }

    /// `write_small` replaces the file durably and `read_small` answers `None` for a missing
    /// file.
    #[test]
    fn small_file_replace() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read_small(dir.path(), "v").expect("reads"), None);
        write_small(dir.path(), "v", b"one").expect("writes");
        write_small(dir.path(), "v", b"two").expect("writes");
        assert_eq!(read_small(dir.path(), "v").expect("reads"), Some(b"two".to_vec()));
        assert!(!dir.path().join("v.tmp").exists());
    }
}
