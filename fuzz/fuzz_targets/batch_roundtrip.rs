//! Property: records built into a batch by `BatchBuilder` (uncompressed and lz4) decode
//! back to exactly the same records, with the header the builder promises. The records come
//! from the input through `rill_fuzz::RoundtripInput` (layout documented there).
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use rill_engine::format::batch::{set_base_offset, set_leader_epoch, Batch, BatchBuilder, BatchIter, Compression};
use rill_engine::Error;
use rill_fuzz::RoundtripInput;

fn build(input: &RoundtripInput, compression: Compression) -> Option<BytesMut> {
    let mut builder = BatchBuilder::new(compression, input.now_ms);
    if let Some(producer) = input.producer {
        builder = builder.producer(producer);
    }
    for record in &input.records {
        match builder.push(record) {
            Ok(()) => {}
            // The layout cannot express more than 7 headers or records near the size limits.
            Err(e) => panic!("push of a small record failed: {e}"),
        }
    }
    assert_eq!(builder.record_count() as usize, input.records.len());
    match builder.build() {
        Ok(bytes) => Some(bytes),
        Err(Error::EmptyBatch) => {
            assert!(input.records.is_empty(), "EmptyBatch for a non-empty batch");
            None
        }
        Err(e) => panic!("build failed: {e}"),
    }
}

fn check(input: &RoundtripInput, compression: Compression, bytes: Bytes) -> Batch {
    let batch = Batch::decode(bytes.clone()).expect("a built batch decodes");
    let header = *batch.header();
    assert_eq!(header.compression(), compression);
    assert_eq!(header.base_offset, 0);
    assert_eq!(header.leader_epoch, 0);
    assert_eq!(header.record_count as usize, input.records.len());
    assert_eq!(header.producer, input.producer);
    assert_eq!(header.size_bytes(), bytes.len() as u64);
    let timestamps: Vec<i64> = input.records.iter().map(|r| r.timestamp_ms.unwrap_or(input.now_ms)).collect();
    assert_eq!(header.first_timestamp_ms, timestamps[0]);
    assert_eq!(header.max_timestamp_ms, *timestamps.iter().max().expect("non-empty"));
    batch.validate_records().expect("built records validate");
    let records = batch.records().expect("built records decode");
    assert_eq!(records.len(), input.records.len());
    for (i, (got, want)) in records.iter().zip(&input.records).enumerate() {
        assert_eq!(got.offset, i as u64, "offset of record {i}");
        assert_eq!(got.timestamp_ms, timestamps[i], "timestamp of record {i}");
        assert_eq!(got.key, want.key, "key of record {i}");
        assert_eq!(got.value, want.value, "value of record {i}");
        assert_eq!(got.headers, want.headers, "headers of record {i}");
    }
    batch
}

fuzz_target!(|data: &[u8]| {
    let input = RoundtripInput::decode(data);
    let Some(plain) = build(&input, Compression::None) else { return };
    let lz4 = build(&input, Compression::Lz4).expect("lz4 build succeeds where the plain one does");
    let plain = check(&input, Compression::None, plain.freeze());
    let lz4_batch = check(&input, Compression::Lz4, lz4.clone().freeze());
    assert_eq!(plain.records().ok(), lz4_batch.records().ok());

    // Base offset and leader epoch lie outside the CRC: the log stamps them without
    // re-hashing. Two stamped batches back to back iterate as two valid batches.
    let n = input.records.len() as u64;
    let base = u64::from_le_bytes(data.get(1..9).and_then(|b| b.try_into().ok()).unwrap_or_default()) >> 2;
    let mut log = BytesMut::new();
    let mut first = BytesMut::from(&plain.as_bytes()[..]);
    set_base_offset(&mut first, base);
    set_leader_epoch(&mut first, 7);
    log.extend_from_slice(&first);
    let mut second = lz4;
    set_base_offset(&mut second, base + n);
    set_leader_epoch(&mut second, 8);
    log.extend_from_slice(&second);
    let batches: Vec<Batch> = BatchIter::new(log.freeze()).map(|b| b.expect("stamped batch decodes")).collect();
    assert_eq!(batches.len(), 2);
    assert_eq!(batches[0].header().base_offset, base);
    assert_eq!(batches[0].header().leader_epoch, 7);
    assert_eq!(batches[1].header().base_offset, base + n);
    assert_eq!(batches[1].header().leader_epoch, 8);
    let offsets: Vec<u64> =
        batches.iter().flat_map(|b| b.records().expect("records decode")).map(|r| r.offset).collect();
    assert_eq!(offsets, (base..base + 2 * n).collect::<Vec<_>>());
});
