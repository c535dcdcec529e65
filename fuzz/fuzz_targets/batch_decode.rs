//! Arbitrary bytes through the batch decoders: `BatchHeader::parse`, `Batch::decode`,
//! `BatchIter`, `records()` and `validate_records()`. Nothing may panic, and whatever
//! decodes must satisfy the format's invariants. Each input is decoded twice: as it is, and
//! with the CRC of every length-framed batch repaired.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use rill_engine::format::batch::{Batch, BatchHeader, BatchIter};

fn check_batch(batch: &Batch) {
    let header = *batch.header();
    let bytes = batch.as_bytes();
    assert_eq!(header.size_bytes(), bytes.len() as u64, "size_bytes matches the buffer");
    assert_eq!(BatchHeader::parse(bytes).ok(), Some(header), "header parses back the same");
    assert!(header.record_count >= 1);
    assert_eq!(u64::from(header.last_offset_delta) + 1, u64::from(header.record_count));
    assert_eq!(header.next_offset(), header.last_offset() + 1);
    let _ = header.compression();
    let validated = batch.validate_records();
    match batch.records() {
        Ok(records) => {
            assert!(validated.is_ok(), "records() accepts what validate_records() rejects: {validated:?}");
            assert_eq!(records.len(), header.record_count as usize, "one record per counted record");
            for (i, record) in records.iter().enumerate() {
                assert_eq!(record.offset, header.base_offset + i as u64, "record offsets are base..=last");
            }
            assert_eq!(records.last().map(|r| r.offset), Some(header.last_offset()));
        }
        Err(e) => assert!(validated.is_err(), "validate_records() accepts what records() rejects: {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    decode_all(data);
    // Again with every batch's CRC repaired, so that mutations of headers and records get
    // past the checksum into the record decoder.
    let mut fixed = data.to_vec();
    rill_fuzz::fix_batch_crcs(&mut fixed);
    if fixed != data {
        decode_all(&fixed);
    }
});

fn decode_all(data: &[u8]) {
    let parsed = BatchHeader::parse(data);
    let bytes = Bytes::copy_from_slice(data);

    if let Ok(batch) = Batch::decode(bytes.clone()) {
        assert!(parsed.is_ok(), "Batch::decode accepts a header BatchHeader::parse rejects");
        check_batch(&batch);
    }

    let mut iter = BatchIter::new(bytes);
    let mut consumed = 0u64;
    let mut ended_with_error = false;
    for item in iter.by_ref() {
        match item {
            Ok(batch) => {
                // The iterator yields consecutive slices of the input.
                let start = consumed as usize;
                assert_eq!(&data[start..start + batch.as_bytes().len()], &batch.as_bytes()[..]);
                consumed += batch.header().size_bytes();
                check_batch(&batch);
            }
            Err(_) => {
                ended_with_error = true;
                break;
            }
        }
    }
    assert!(consumed <= data.len() as u64);
    if ended_with_error {
        assert!(iter.next().is_none(), "BatchIter stops after an error");
    }
}
