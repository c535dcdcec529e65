//! Input layouts shared by the fuzz targets and by `examples/make_seeds.rs`.
//!
//! The structure-aware targets (`batch_roundtrip`, `segment_recovery`) read their input
//! through a small hand-written layout rather than `arbitrary`, so that every layout has an
//! encoder here and the committed seeds are meaningful inputs, not random bytes. Decoding is
//! total: any byte string decodes to some input (missing bytes read as zero).

use bytes::Bytes;
use rill_engine::format::batch::{
    compute_crc, peek_batch_size, Header, ProducerFields, Record, CRC_OFFSET, RECORDS_OFFSET,
};
use rill_engine::segment::OpenKind;

/// Reads fixed-size fields from the front of a byte string; past the end it yields zeros.
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Reads `data` from its start.
    pub fn new(data: &'a [u8]) -> Self {
        Reader { rest: data }
    }

    /// Whether every byte was consumed.
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.rest.split_at(n.min(self.rest.len()));
        self.rest = tail;
        head
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(usize::MAX)
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }
    /// Little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }
    /// Little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }
    /// Little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

/// Rewrites the CRC of every complete batch in a buffer of consecutive batches (as framed by
/// their length fields), so that mutations behind the CRC reach the code that runs after
/// the check. libFuzzer cannot repair a CRC by itself: a mutation that breaks it gains no
/// coverage and is dropped. Stops at the first chunk too short to hold a batch header.
pub fn fix_batch_crcs(buf: &mut [u8]) {
    let mut at = 0usize;
    while let Some(size) = peek_batch_size(&buf[at..]) {
        let Ok(size) = usize::try_from(size) else { break };
        if size < RECORDS_OFFSET || size > buf.len() - at {
            break;
        }
        let batch = &mut buf[at..at + size];
        let crc = compute_crc(batch);
        batch[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
        at += size;
    }
}

/// For the small metadata files that end with a CRC-32 of every preceding byte (producer
/// snapshots, consumer offsets, priority cursor state; see `format::envelope`): `data` with
/// that trailing CRC rewritten, or `None` when it is too short to hold one or already
/// matches (nothing new to try).
pub fn with_fixed_crc(data: &[u8]) -> Option<Vec<u8>> {
    let body_len = data.len().checked_sub(4)?;
    let mut fixed = data.to_vec();
    let crc = crc32fast::hash(&fixed[..body_len]);
    fixed[body_len..].copy_from_slice(&crc.to_le_bytes());
    (fixed != data).then_some(fixed)
}

// ---------------------------------------------------------------------------------------
// batch_roundtrip
// ---------------------------------------------------------------------------------------

/// Input of `batch_roundtrip`:
///
/// ```text
/// flags u8          bit 0: producer fields present
/// now_ms i64        timestamp for records without one
/// [producer]        id u64 (top bit cleared), epoch u16 (top bit cleared), seq u32 (top bit cleared)
/// record*           until the input ends:
///   tag u8          bit 0 timestamp, bit 1 key, bit 2 value, bits 3..=5 header count (0..=7)
///   [ts i64]
///   [key: len u8, bytes]
///   [value: len u16, bytes]
///   header*         key: len u8, bytes (lossy UTF-8); has_value u8 (bit 0); [value: len u8, bytes]
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct RoundtripInput {
    /// Timestamp the builder gives records without one.
    pub now_ms: i64,
    /// Producer fields, always valid (non-negative).
    pub producer: Option<ProducerFields>,
    /// Records, in order.
    pub records: Vec<Record>,
}

const TAG_TS: u8 = 1;
const TAG_KEY: u8 = 2;
const TAG_VALUE: u8 = 4;
const TAG_HEADERS_SHIFT: u32 = 3;
const TAG_HEADERS_MASK: u8 = 0b111;

impl RoundtripInput {
    /// Decodes the layout above; never fails.
    pub fn decode(data: &[u8]) -> Self {
        let mut r = Reader::new(data);
        let flags = r.u8();
        let now_ms = r.u64() as i64;
        let producer = (flags & 1 != 0).then(|| ProducerFields {
            producer_id: (r.u64() & (i64::MAX as u64)) as i64,
            producer_epoch: (r.u16() & 0x7fff) as i16,
            base_sequence: (r.u32() & 0x7fff_ffff) as i32,
        });
        let mut records = Vec::new();
        while !r.is_empty() {
            let tag = r.u8();
            let timestamp_ms = (tag & TAG_TS != 0).then(|| r.u64() as i64);
            let key = (tag & TAG_KEY != 0).then(|| {
                let n = r.u8() as usize;
                Bytes::copy_from_slice(r.bytes(n))
            });
            let value = (tag & TAG_VALUE != 0).then(|| {
                let n = r.u16() as usize;
                Bytes::copy_from_slice(r.bytes(n))
            });
            let header_count = (tag >> TAG_HEADERS_SHIFT) & TAG_HEADERS_MASK;
            let mut headers = Vec::new();
            for _ in 0..header_count {
                let n = r.u8() as usize;
                let key = String::from_utf8_lossy(r.bytes(n)).into_owned();
                let value = (r.u8() & 1 != 0).then(|| {
                    let n = r.u8() as usize;
                    Bytes::copy_from_slice(r.bytes(n))
                });
                headers.push(Header { key, value });
            }
            records.push(Record { timestamp_ms, key, value, headers });
        }
        RoundtripInput { now_ms, producer, records }
    }

    /// Encodes into the layout above (for seeds). Lengths must fit their fields and header
    /// keys must be valid UTF-8 for `decode(encode(x)) == x`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![u8::from(self.producer.is_some())];
        out.extend_from_slice(&self.now_ms.to_le_bytes());
        if let Some(p) = self.producer {
            out.extend_from_slice(&(p.producer_id as u64).to_le_bytes());
            out.extend_from_slice(&(p.producer_epoch as u16).to_le_bytes());
            out.extend_from_slice(&(p.base_sequence as u32).to_le_bytes());
        }
        for record in &self.records {
            assert!(record.headers.len() <= TAG_HEADERS_MASK as usize);
            let mut tag = (record.headers.len() as u8) << TAG_HEADERS_SHIFT;
            tag |= if record.timestamp_ms.is_some() { TAG_TS } else { 0 };
            tag |= if record.key.is_some() { TAG_KEY } else { 0 };
            tag |= if record.value.is_some() { TAG_VALUE } else { 0 };
            out.push(tag);
            if let Some(ts) = record.timestamp_ms {
                out.extend_from_slice(&ts.to_le_bytes());
            }
            if let Some(key) = &record.key {
                out.push(u8::try_from(key.len()).expect("key fits u8 length"));
                out.extend_from_slice(key);
            }
            if let Some(value) = &record.value {
                out.extend_from_slice(&u16::try_from(value.len()).expect("value fits u16 length").to_le_bytes());
                out.extend_from_slice(value);
            }
            for header in &record.headers {
                out.push(u8::try_from(header.key.len()).expect("header key fits u8 length"));
                out.extend_from_slice(header.key.as_bytes());
                match &header.value {
                    None => out.push(0),
                    Some(v) => {
                        out.push(1);
                        out.push(u8::try_from(v.len()).expect("header value fits u8 length"));
                        out.extend_from_slice(v);
                    }
                }
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------
// segment_recovery
// ---------------------------------------------------------------------------------------

/// Input of `segment_recovery`:
///
/// ```text
/// mode u8           bits 0..=1: 0 or 3 ActiveRecover, 1 ActiveClean, 2 Sealed;
///                   bit 2: write `.index`; bit 3: write `.timeindex`;
///                   bit 4: after a successful open, append one batch, close, reopen;
///                   bit 5: fix the CRC of every batch of the log first ([`fix_batch_crcs`])
/// end_offset u16    Sealed { end_offset }
/// [index: len u16, bytes]
/// [timeindex: len u16, bytes]
/// log               the rest: the `.log` file
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentInput {
    /// How to open the segment.
    pub kind: OpenKind,
    /// Contents of the `.index` file, if one is written.
    pub index: Option<Vec<u8>>,
    /// Contents of the `.timeindex` file, if one is written.
    pub timeindex: Option<Vec<u8>>,
    /// Whether to append, close and reopen after a successful open.
    pub append_and_reopen: bool,
    /// Whether to rewrite the batches' CRCs before writing the log.
    pub fix_crcs: bool,
    /// Contents of the `.log` file.
    pub log: Vec<u8>,
}

const MODE_INDEX: u8 = 1 << 2;
const MODE_TIMEINDEX: u8 = 1 << 3;
const MODE_APPEND: u8 = 1 << 4;
const MODE_FIX_CRCS: u8 = 1 << 5;

impl SegmentInput {
    /// Decodes the layout above; never fails.
    pub fn decode(data: &[u8]) -> Self {
        let mut r = Reader::new(data);
        let mode = r.u8();
        let end_offset = u64::from(r.u16());
        let kind = match mode & 0b11 {
            1 => OpenKind::ActiveClean,
            2 => OpenKind::Sealed { end_offset },
            _ => OpenKind::ActiveRecover,
        };
        let index = (mode & MODE_INDEX != 0).then(|| {
            let n = r.u16() as usize;
            r.bytes(n).to_vec()
        });
        let timeindex = (mode & MODE_TIMEINDEX != 0).then(|| {
            let n = r.u16() as usize;
            r.bytes(n).to_vec()
        });
        let fix_crcs = mode & MODE_FIX_CRCS != 0;
        let mut log = r.rest().to_vec();
        if fix_crcs {
            fix_batch_crcs(&mut log);
        }
        SegmentInput { kind, index, timeindex, append_and_reopen: mode & MODE_APPEND != 0, fix_crcs, log }
    }

    /// Encodes into the layout above (for seeds).
    pub fn encode(&self) -> Vec<u8> {
        let (bits, end_offset) = match self.kind {
            OpenKind::ActiveRecover => (0u8, 0u64),
            OpenKind::ActiveClean => (1, 0),
            OpenKind::Sealed { end_offset } => (2, end_offset),
        };
        let mut mode = bits;
        mode |= if self.index.is_some() { MODE_INDEX } else { 0 };
        mode |= if self.timeindex.is_some() { MODE_TIMEINDEX } else { 0 };
        mode |= if self.append_and_reopen { MODE_APPEND } else { 0 };
        mode |= if self.fix_crcs { MODE_FIX_CRCS } else { 0 };
        let mut out = vec![mode];
        out.extend_from_slice(&u16::try_from(end_offset).expect("end offset fits u16").to_le_bytes());
        for file in [&self.index, &self.timeindex].into_iter().flatten() {
            out.extend_from_slice(&u16::try_from(file.len()).expect("index fits u16 length").to_le_bytes());
            out.extend_from_slice(file);
        }
        out.extend_from_slice(&self.log);
        out
    }
}

/// Directory for the segment target's scratch files: `/dev/shm` when usable (no disk I/O,
/// `fdatasync` is free), else the system temp dir.
pub fn scratch_base() -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() && tempfile::tempdir_in(shm).is_ok() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_round_trip() {
        let input = RoundtripInput {
            now_ms: 42,
            producer: Some(ProducerFields { producer_id: 7, producer_epoch: 1, base_sequence: 9 }),
            records: vec![
                Record::keyed("k", "v"),
                Record {
                    timestamp_ms: Some(-5),
                    key: None,
                    value: Some(Bytes::new()),
                    headers: vec![Header { key: "h".into(), value: None }],
                },
            ],
        };
        assert_eq!(RoundtripInput::decode(&input.encode()), input);
        let seg = SegmentInput {
            kind: OpenKind::Sealed { end_offset: 3 },
            index: Some(vec![1, 2]),
            timeindex: None,
            append_and_reopen: true,
            fix_crcs: false,
            log: vec![9; 10],
        };
        assert_eq!(SegmentInput::decode(&seg.encode()), seg);
    }
}
