//! Idempotent producers through the public API: retries of any of the last 5 batches are
//! answered with the original offsets and not appended again, gaps and stale epochs are
//! typed errors, and the state survives clean and unclean restarts (snapshot + log replay).

use rill_engine::{
    Compression, Error, FsyncPolicy, ProducerFields, ProducerIdentity, Record, Store, StoreConfig, TopicConfig,
};

fn fields(id: ProducerIdentity, base_sequence: i32) -> ProducerFields {
    ProducerFields { producer_id: id.producer_id, producer_epoch: id.producer_epoch, base_sequence }
}

fn records(seq: i32, n: i32) -> Vec<Record> {
    (seq..seq + n).map(|s| Record::from_value(format!("seq-{s}-{}", "p".repeat(40)))).collect()
}

fn topic(fsync: FsyncPolicy) -> TopicConfig {
    TopicConfig {
        fsync,
        segment_size_bytes: 4096,
        index_interval_bytes: 256,
        index_size_bytes: 4096,
        ..TopicConfig::default()
    }
}

/// Retried batches inside the window come back as duplicates with their original offsets;
/// the log holds each record once; a gap, an old batch outside the window and an unissued
/// producer id are rejected with their own errors.
#[test]
fn retries_are_not_appended_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), StoreConfig::default()).expect("open");
    store.create_topic("t", topic(FsyncPolicy::Always)).expect("create");
    let p = store.partition("t", 0).expect("partition");
    let id = store.init_producer(None).expect("init");
    let mut originals = Vec::new();
    for b in 0..8 {
        let info = p.append_producer_records(fields(id, b * 3), &records(b * 3, 3), Compression::None).expect("append");
        originals.push(info.wait().expect("ack"));
    }
    for b in 3..8 {
        let retry = p.append_producer_records(fields(id, b * 3), &records(b * 3, 3), Compression::None).expect("retry");
        let info = retry.wait().expect("ack");
        assert!(info.duplicate, "batch {b} recognised as a retry");
        assert_eq!(
            (info.base_offset, info.last_offset),
            (originals[b as usize].base_offset, originals[b as usize].last_offset)
        );
    }
    assert_eq!(p.end_offset(), 24, "no retry appended");
    assert!(matches!(
        p.append_producer_records(fields(id, 0), &records(0, 3), Compression::None),
        Err(Error::DuplicateSequence { .. })
    ));
    assert!(matches!(
        p.append_producer_records(fields(id, 30), &records(30, 1), Compression::None),
        Err(Error::OutOfOrderSequence { expected: 24, .. })
    ));
    let unissued = ProducerIdentity { producer_id: 1 << 40, producer_epoch: 0 };
    assert!(matches!(
        p.append_producer_records(fields(unissued, 0), &records(0, 1), Compression::None),
        Err(Error::UnknownProducerId { .. })
    ));
    // Non-idempotent appends still work beside idempotent ones.
    assert_eq!(
        p.append_records(&records(0, 1), Compression::None).expect("append").wait().expect("ack").base_offset,
        24
    );
}

/// Re-initialising a transactional id bumps the epoch; the old instance is fenced even on
/// a partition the new one has not written to yet.
#[test]
fn transactional_reinit_fences_the_old_producer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), StoreConfig::default()).expect("open");
    store.create_topic("t", TopicConfig { partitions: 2, ..topic(FsyncPolicy::Never) }).expect("create");
    let old = store.init_producer(Some("payments")).expect("init");
    let p0 = store.partition("t", 0).expect("partition");
    let p1 = store.partition("t", 1).expect("partition");
    p0.append_producer_records(fields(old, 0), &records(0, 1), Compression::None).expect("append").wait().expect("ack");
    let new = store.init_producer(Some("payments")).expect("re-init");
    assert_eq!(new.producer_id, old.producer_id);
    assert!(new.producer_epoch > old.producer_epoch);
    for p in [&p0, &p1] {
        assert!(matches!(
            p.append_producer_records(fields(old, 1), &records(1, 1), Compression::None),
            Err(Error::ProducerFenced { .. })
        ));
    }
    p0.append_producer_records(fields(new, 0), &records(0, 1), Compression::None).expect("append").wait().expect("ack");
}

const BATCHES: i32 = 120;

/// After a clean close (snapshot), after an unclean drop (replay of the last segment) and
/// with every snapshot deleted (rebuild from the whole log), the producer state is the
/// same: retries are still recognised and the next sequence is still expected.
#[test]
fn state_survives_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), StoreConfig::default()).expect("open");
    store.create_topic("t", topic(FsyncPolicy::Always)).expect("create");
    let id = store.init_producer(None).expect("init");
    let p = store.partition("t", 0).expect("partition");
    let mut last = None;
    for b in 0..BATCHES {
        let handle =
            p.append_producer_records(fields(id, b * 2), &records(b * 2, 2), Compression::Lz4).expect("append");
        last = Some(handle.wait().expect("ack"));
    }
    let last = last.expect("appended");
    assert!(p.segment_count() > 2, "rolled, so snapshots were written");
    let partition_dir = p.dir().to_path_buf();
    drop(p);
    store.close().expect("close");
    let check = |store: &Store| {
        let p = store.partition("t", 0).expect("partition");
        let last_seq = (BATCHES - 1) * 2;
        let retry =
            p.append_producer_records(fields(id, last_seq), &records(last_seq, 2), Compression::Lz4).expect("retry");
        let info = retry.wait().expect("ack");
        assert!(info.duplicate);
        assert_eq!(info.base_offset, last.base_offset);
        assert!(matches!(
            p.append_producer_records(fields(id, BATCHES * 2 + 10), &records(0, 1), Compression::None),
            Err(Error::OutOfOrderSequence { expected, .. }) if expected == BATCHES * 2
        ));
    };
    // Clean restart: the snapshot written at close is loaded.
    let store = Store::open(dir.path(), StoreConfig::default()).expect("reopen clean");
    check(&store);
    drop(store);
    // Unclean restart: the newest snapshot plus a replay of the log after it.
    let store = Store::open(dir.path(), StoreConfig::default()).expect("reopen unclean");
    check(&store);
    drop(store);
    // No snapshot at all: rebuilt from the whole log.
    for entry in std::fs::read_dir(&partition_dir).expect("list") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "snapshot") {
            std::fs::remove_file(path).expect("remove snapshot");
        }
    }
    let store = Store::open(dir.path(), StoreConfig::default()).expect("reopen without snapshots");
    check(&store);
}
