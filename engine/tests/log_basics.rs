//! End-to-end behaviour of one partition through the public API: append, read by offset,
//! roll, reopen after a clean close and after a crash, time lookups, retention, limits.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rill_engine::format::batch::{BatchBuilder, BatchIter};
use rill_engine::{Compression, Error, FsyncPolicy, ManualClock, Record, Store, StoreConfig, TopicConfig};

fn small_topic(fsync: FsyncPolicy) -> TopicConfig {
    TopicConfig {
        partitions: 1,
        fsync,
        segment_size_bytes: 4096,
        index_interval_bytes: 256,
        index_size_bytes: 4096,
        ..TopicConfig::default()
    }
}

fn value(i: u64) -> Bytes {
    Bytes::from(format!("record-{i:06}-{}", "x".repeat((i % 50) as usize)))
}

/// Appending 300 single-record batches across many segments gives dense offsets 0..300,
/// and every one reads back with its content, from any starting offset, before and after
/// a clean reopen.
#[test]
fn append_read_roll_and_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), StoreConfig::default()).expect("open");
    store.create_topic("t", small_topic(FsyncPolicy::Always)).expect("create");
    let p = store.partition("t", 0).expect("partition");
    for i in 0..300u64 {
        let info =
            p.append_records(&[Record::from_value(value(i))], Compression::None).expect("append").wait().expect("ack");
        assert_eq!(info.base_offset, i);
    }
    assert!(p.segment_count() > 3, "small segments rolled: {}", p.segment_count());
    let check = |p: &rill_engine::Partition| {
        assert_eq!(p.end_offset(), 300);
        for start in [0u64, 1, 57, 150, 299] {
            let mut next = start;
            while next < 300 {
                let records = p.read_records(next, 1000).expect("read");
                assert!(!records.is_empty(), "progress from {next}");
                for r in records {
                    assert_eq!(r.offset, next);
                    assert_eq!(r.value.as_ref(), Some(&value(next)));
                    next += 1;
                }
            }
        }
        assert!(p.read(300, 1000).expect("read at end").is_empty());
        assert!(matches!(p.read(301, 1000), Err(Error::OffsetOutOfRange { .. })));
    };
    check(&p);
    drop(p);
    store.close().expect("close");
    let store = Store::open(dir.path(), StoreConfig::default()).expect("reopen");
    let p = store.partition("t", 0).expect("partition");
    assert!(p.recovery_report().clean_shutdown);
    assert_eq!(p.recovery_report().rebuilt_indices, 0, "clean indices are trusted");
    check(&p);
    // Appends continue where they stopped.
    let info =
        p.append_records(&[Record::from_value(value(300))], Compression::None).expect("append").wait().expect("ack");
    assert_eq!(info.base_offset, 300);
}

/// Dropping the store without `close` is a crash as far as the next open knows: the last
/// segment is scanned and its indices rebuilt, and nothing acknowledged is missing.
#[test]
fn unclean_reopen_recovers_everything_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = Store::open(dir.path(), StoreConfig::default()).expect("open");
        store.create_topic("t", small_topic(FsyncPolicy::Always)).expect("create");
        let p = store.partition("t", 0).expect("partition");
        for i in 0..100u64 {
            p.append_records(&[Record::from_value(value(i))], Compression::Lz4).expect("append").wait().expect("ack");
        }
    }
    let store = Store::open(dir.path(), StoreConfig::default()).expect("reopen");
    let p = store.partition("t", 0).expect("partition");
    assert!(!p.recovery_report().clean_shutdown);
    assert_eq!(p.end_offset(), 100);
    let records = p.read_records(0, 1 << 20).expect("read");
    assert!(!records.is_empty());
    let mut next = 0;
    while next < 100 {
        for r in p.read_records(next, 1 << 20).expect("read") {
            assert_eq!(r.value.as_ref(), Some(&value(next)));
            next += 1;
        }
    }
}

/// Reading from a timestamp returns the first record at or after it, across segments,
/// and `None` past the newest record.
#[test]
fn offset_for_timestamp_finds_first_record_at_or_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), StoreConfig::default()).expect("open");
    store.create_topic("t", small_topic(FsyncPolicy::Never)).expect("create");
    let p = store.partition("t", 0).expect("partition");
    for i in 0..200i64 {
        let record = Record { timestamp_ms: Some(1_000_000 + i * 10), ..Record::from_value(value(i as u64)) };
        p.append_records(&[record], Compression::None).expect("append").wait().expect("ack");
    }
    assert_eq!(p.offset_for_timestamp(0).expect("lookup"), Some(0));
    assert_eq!(p.offset_for_timestamp(1_000_000).expect("lookup"), Some(0));
    assert_eq!(p.offset_for_timestamp(1_000_001).expect("lookup"), Some(1));
    assert_eq!(p.offset_for_timestamp(1_000_995).expect("lookup"), Some(100));
    assert_eq!(p.offset_for_timestamp(1_001_990).expect("lookup"), Some(199));
    assert_eq!(p.offset_for_timestamp(1_001_991).expect("lookup"), None);
    drop(p);
    store.close().expect("close");
    let store = Store::open(dir.path(), StoreConfig::default()).expect("reopen");
    let p = store.partition("t", 0).expect("partition");
    assert_eq!(p.offset_for_timestamp(1_000_995).expect("lookup"), Some(100));
}

/// Retention by size deletes the oldest sealed segments, never the active one; reads
/// below the new log start get `OffsetOutOfRange`. Retention by age uses the clock.
#[test]
fn retention_by_size_and_age() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(10_000_000));
    let config = StoreConfig { clock: clock.clone(), retention_check_interval_ms: None, ..StoreConfig::default() };
    let store = Store::open(dir.path(), config).expect("open");
    let topic =
        TopicConfig { retention_bytes: Some(16 * 1024), retention_ms: Some(60_000), ..small_topic(FsyncPolicy::Never) };
    store.create_topic("t", topic).expect("create");
    let p = store.partition("t", 0).expect("partition");
    for i in 0..400u64 {
        p.append_records(&[Record::from_value(value(i))], Compression::None).expect("append").wait().expect("ack");
    }
    let before = p.segment_count();
    let removed = store.enforce_retention().expect("retention");
    assert!(removed > 0);
    assert_eq!(p.segment_count(), before - removed);
    assert!(p.size_bytes() <= 16 * 1024 + 4096, "size {} within limit plus one segment", p.size_bytes());
    let start = p.log_start_offset();
    assert!(start > 0);
    assert!(matches!(p.read(start - 1, 100), Err(Error::OffsetOutOfRange { .. })));
    assert_eq!(p.read_records(start, 100).expect("read")[0].offset, start);
    clock.advance_ms(120_000);
    store.enforce_retention().expect("retention by age");
    assert_eq!(p.segment_count(), 1, "only the active segment survives age retention");
    assert_eq!(p.end_offset(), 400);
}

/// A client-encoded batch is validated before it is written: a flipped byte is a CRC
/// error, an oversize batch a limit error, garbage a malformed-batch error; none panics.
#[test]
fn append_batch_rejects_bad_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), StoreConfig::default()).expect("open");
    let config = TopicConfig { batch_size_bytes_max: 2048, ..small_topic(FsyncPolicy::Never) };
    store.create_topic("t", config).expect("create");
    let p = store.partition("t", 0).expect("partition");
    let mut builder = BatchBuilder::new(Compression::None, 1);
    builder.push(&Record::keyed("k", "v")).expect("push");
    let good = builder.build().expect("build");
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(matches!(p.append_batch(bad), Err(Error::ChecksumMismatch { .. })));
    assert!(p.append_batch(BytesMut::from(&b"garbage"[..])).is_err());
    let mut big = BatchBuilder::new(Compression::None, 1);
    big.push(&Record::from_value(vec![0u8; 4096])).expect("push");
    assert!(matches!(p.append_batch(big.build().expect("build")), Err(Error::LimitExceeded { .. })));
    // The client's base offset is ignored: the log assigns 0.
    let mut offset_lie = good.clone();
    offset_lie[..8].copy_from_slice(&999u64.to_le_bytes());
    assert_eq!(p.append_batch(offset_lie).expect("append").wait().expect("ack").base_offset, 0);
    let bytes = p.read(0, 1 << 20).expect("read");
    let batches: Vec<_> = BatchIter::new(bytes).collect::<Result<_, _>>().expect("valid");
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].header().base_offset, 0);
}

/// Rolling by age happens on the first append after the active segment got old.
#[test]
fn roll_by_age() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(5_000));
    let config = StoreConfig { clock: clock.clone(), retention_check_interval_ms: None, ..StoreConfig::default() };
    let store = Store::open(dir.path(), config).expect("open");
    let topic = TopicConfig { segment_ms: Some(1_000), segment_size_bytes: 1 << 20, ..small_topic(FsyncPolicy::Never) };
    store.create_topic("t", topic).expect("create");
    let p = store.partition("t", 0).expect("partition");
    p.append_records(&[Record::from_value("a")], Compression::None).expect("append").wait().expect("ack");
    p.append_records(&[Record::from_value("b")], Compression::None).expect("append").wait().expect("ack");
    assert_eq!(p.segment_count(), 1);
    clock.advance_ms(1_000);
    p.append_records(&[Record::from_value("c")], Compression::None).expect("append").wait().expect("ack");
    assert_eq!(p.segment_count(), 2);
}
