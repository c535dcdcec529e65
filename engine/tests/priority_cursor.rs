//! Scenarios of priority topics and priority cursors: lane topics, durable acks across a
//! crash, lease expiry, backoff timing under a manual clock, the in-flight bound,
//! dead-lettering with its metadata, replay, and a damaged checkpoint.

use std::path::Path;
use std::sync::Arc;

use rill_engine::cursor::priority::dlq::{DLQ_HEADER_LANE, DLQ_HEADER_OFFSET, DLQ_HEADER_REASON};
use rill_engine::cursor::priority::{dlq_topic_name, lane_topic_name};
use rill_engine::{
    BackoffConfig, DeadLetter, Delivery, Error, FsyncPolicy, ManualClock, PriorityCursorConfig, Record, Store,
    StoreConfig, TopicConfig,
};

const START_MS: i64 = 1_700_000_000_000;

fn tempdir() -> tempfile::TempDir {
    // tmpfs when there is one: the tests fsync on every ack.
    if Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm").expect("tempdir")
    } else {
        tempfile::tempdir().expect("tempdir")
    }
}

fn open(dir: &Path, clock: &Arc<ManualClock>) -> Store {
    let config =
        StoreConfig { clock: Arc::clone(clock) as _, retention_check_interval_ms: None, ..StoreConfig::default() };
    Store::open(dir, config).expect("open store")
}

fn topic_config(partitions: u32) -> TopicConfig {
    TopicConfig { partitions, fsync: FsyncPolicy::Never, ..TopicConfig::default() }
}

fn cursor_config() -> PriorityCursorConfig {
    PriorityCursorConfig {
        lease_ms: 1_000,
        max_deliveries: 3,
        backoff: BackoffConfig { base_ms: 100, factor: 2.0, max_ms: 1_000, jitter: 0.5, seed: 7 },
        ..PriorityCursorConfig::default()
    }
}

fn produce(store: &Store, lane: u8, values: &[&str]) {
    let topic = store.priority_topic("jobs").expect("priority topic");
    for value in values {
        let (_, handle) =
            topic.append_to_lane(lane, None, &[Record::keyed(value.to_string(), value.to_string())]).expect("append");
        handle.wait().expect("durable");
    }
}

fn value(d: &Delivery) -> String {
    String::from_utf8(d.record.value.as_deref().expect("value").to_vec()).expect("utf-8")
}

/// Creating a priority topic creates one topic per lane and a DLQ; names, lane counts and
/// re-creation are checked.
#[test]
fn lanes_are_topics() {
    let dir = tempdir();
    let store = open(dir.path(), &Arc::new(ManualClock::new(START_MS)));
    let topic = store.create_priority_topic("jobs", 3, topic_config(2)).expect("create");
    assert_eq!((topic.lane_count(), topic.partitions()), (3, 2));
    let mut names = store.topics();
    names.sort();
    assert_eq!(names, ["jobs.dlq", "jobs.p0", "jobs.p1", "jobs.p2"]);
    assert_eq!(lane_topic_name("jobs", 1), "jobs.p1");
    assert_eq!(dlq_topic_name("jobs"), "jobs.dlq");
    assert!(matches!(store.create_priority_topic("jobs", 3, topic_config(2)), Err(Error::TopicExists { .. })));
    assert!(matches!(store.create_priority_topic("x", 0, topic_config(1)), Err(Error::InvalidConfig { .. })));
    assert!(matches!(store.create_priority_topic("x", 5, topic_config(1)), Err(Error::InvalidConfig { .. })));
    assert!(matches!(store.priority_topic("nope"), Err(Error::TopicNotFound { .. })));
    let (partition, handle) = topic.append_to_lane(2, Some(b"k"), &[Record::keyed("k", "v")]).expect("append");
    assert_eq!(handle.wait().expect("durable").base_offset, 0);
    assert_eq!(store.partition("jobs.p2", partition).expect("partition").end_offset(), 1);
    assert!(topic.append_to_lane(3, None, &[Record::from_value("v")]).is_err(), "no lane 3");
    drop(store);
    let store = open(dir.path(), &Arc::new(ManualClock::new(START_MS)));
    assert_eq!(store.priority_topic("jobs").expect("after reopen").lane_count(), 3);
}

/// Fresh p0 messages go before p1; acks survive a crash (store and cursor dropped without
/// closing); leased and unacked messages are delivered again after it, acked ones never.
#[test]
fn acks_survive_a_crash_and_leases_are_redelivered() {
    let dir = tempdir();
    let clock = Arc::new(ManualClock::new(START_MS));
    let store = open(dir.path(), &clock);
    store.create_priority_topic("jobs", 2, topic_config(1)).expect("create");
    produce(&store, 1, &["b0", "b1"]);
    produce(&store, 0, &["a0", "a1", "a2"]);
    let cursor = store.priority_cursor("jobs", "workers", cursor_config()).expect("cursor");
    let same = store.priority_cursor("jobs", "workers", cursor_config()).expect("same cursor");
    assert!(Arc::ptr_eq(&cursor, &same));
    let polled = cursor.poll(4).expect("poll");
    assert_eq!(polled.iter().map(value).collect::<Vec<_>>(), ["a0", "a1", "a2", "b0"]);
    cursor.ack(&polled[0]).expect("ack a0");
    cursor.ack(&polled[2]).expect("ack a2");
    cursor.ack(&polled[3]).expect("ack b0");
    assert!(matches!(cursor.ack(&polled[3]), Err(Error::LeaseNotHeld { .. })), "double ack");
    assert_eq!(cursor.committed_offset(0, 0).expect("committed"), 1);
    drop((cursor, same, store));

    let store = open(dir.path(), &clock);
    let cursor = store.priority_cursor("jobs", "workers", cursor_config()).expect("reopen cursor");
    assert!(matches!(cursor.ack(&polled[1]), Err(Error::LeaseNotHeld { .. })), "lease of the old instance");
    let again = cursor.poll(10).expect("poll");
    assert_eq!(again.iter().map(value).collect::<Vec<_>>(), ["a1", "b1"]);
    assert!(again.iter().all(|d| d.delivery_count == 1), "an in-flight delivery at a crash is not counted");
    for d in &again {
        cursor.ack(d).expect("ack");
    }
    assert!(cursor.poll(10).expect("poll").is_empty());
    assert_eq!((cursor.committed_offset(0, 0).expect("p0"), cursor.committed_offset(1, 0).expect("p1")), (3, 2));
}

/// A deferred ack is final only once its ticket is waited for: dropped before that (a
/// crash), the messages come back; after `wait_durable`, they never do. A lease that is not
/// held is reported and the others are still settled (`flush` makes them durable).
#[test]
fn deferred_acks_are_durable_after_their_ticket() {
    let dir = tempdir();
    let clock = Arc::new(ManualClock::new(START_MS));
    let store = open(dir.path(), &clock);
    store.create_priority_topic("jobs", 1, topic_config(1)).expect("create");
    produce(&store, 0, &["a", "b", "c", "d"]);
    let cursor = store.priority_cursor("jobs", "c", cursor_config()).expect("cursor");
    let polled = cursor.poll(4).expect("poll");
    cursor.ack_many_deferred(&polled[..2]).expect("deferred ack of a, b");
    assert_eq!(cursor.committed_offset(0, 0).expect("committed"), 2, "settled in memory at once");
    drop((cursor, store));

    let store = open(dir.path(), &clock);
    let cursor = store.priority_cursor("jobs", "c", cursor_config()).expect("reopen");
    let again = cursor.poll(4).expect("poll");
    assert_eq!(again.iter().map(value).collect::<Vec<_>>(), ["a", "b", "c", "d"], "never waited for: redelivered");
    let first = cursor.ack_many_deferred(&again[..1]).expect("ack a");
    let second = cursor.ack_many_deferred(&again[1..2]).expect("ack b");
    assert!(first < second);
    cursor.wait_durable(second).expect("a and b durable");
    let stale = cursor.ack_many_deferred(&[again[2].clone(), again[0].clone()]);
    assert!(matches!(stale, Err(Error::LeaseNotHeld { offset: 0, .. })), "a was already settled: {stale:?}");
    cursor.flush().expect("c durable");
    drop((cursor, store));

    let store = open(dir.path(), &clock);
    let cursor = store.priority_cursor("jobs", "c", cursor_config()).expect("reopen");
    let last = cursor.poll(4).expect("poll");
    assert_eq!(last.iter().map(value).collect::<Vec<_>>(), ["d"], "a, b (waited) and c (flushed) are final");
}

/// Nack without a delay waits exactly the seeded backoff (never earlier); nack with a delay
/// waits that delay; an expired lease is reclaimed on poll and retried after its backoff.
#[test]
fn backoff_and_lease_expiry_follow_the_clock() {
    let dir = tempdir();
    let clock = Arc::new(ManualClock::new(START_MS));
    let store = open(dir.path(), &clock);
    store.create_priority_topic("jobs", 1, topic_config(1)).expect("create");
    produce(&store, 0, &["m"]);
    let config = PriorityCursorConfig { max_deliveries: 10, ..cursor_config() };
    let cursor = store.priority_cursor("jobs", "c", config.clone()).expect("cursor");
    let mut delivery = cursor.poll(1).expect("poll").pop().expect("one");
    for failures in 1..=3u32 {
        cursor.nack(&delivery, None, "try later").expect("nack");
        let delay = config.backoff.delay_ms(failures, config.backoff.jitter_sample(0, 0, 0, failures));
        let full = (100u64 << (failures - 1)).min(1_000);
        assert!(delay <= full && delay >= full / 2, "jitter takes at most half: {delay} of {full}");
        clock.advance_ms(delay as i64 - 1);
        assert!(cursor.poll(1).expect("poll").is_empty(), "visible 1 ms early after failure {failures}");
        clock.advance_ms(1);
        delivery = cursor.poll(1).expect("poll").pop().expect("visible on time");
        assert_eq!(delivery.delivery_count, failures + 1);
        assert_eq!(delivery.ready_since_ms, clock.now_ms_for_test());
    }
    cursor.nack(&delivery, Some(5_000), "explicit").expect("nack");
    clock.advance_ms(4_999);
    assert!(cursor.poll(1).expect("poll").is_empty());
    clock.advance_ms(1);
    let delivery = cursor.poll(1).expect("poll").pop().expect("after the explicit delay");
    assert_eq!(delivery.lease_deadline_ms, clock.now_ms_for_test() + 1_000);
    clock.advance_ms(999);
    cursor.tick().expect("tick");
    assert_eq!(cursor.in_flight(), 1, "not expired before the deadline");
    clock.advance_ms(1);
    cursor.tick().expect("tick");
    assert_eq!(cursor.in_flight(), 0, "reclaimed at the deadline");
    assert!(matches!(cursor.ack(&delivery), Err(Error::LeaseNotHeld { .. })));
    let delay = config.backoff.delay_ms(5, config.backoff.jitter_sample(0, 0, 0, 5));
    clock.advance_ms(delay as i64);
    assert_eq!(cursor.poll(1).expect("poll").pop().expect("retried").delivery_count, 6);
}

/// `poll` never holds more than `max_in_flight` leases.
#[test]
fn in_flight_is_bounded() {
    let dir = tempdir();
    let clock = Arc::new(ManualClock::new(START_MS));
    let store = open(dir.path(), &clock);
    store.create_priority_topic("jobs", 2, topic_config(2)).expect("create");
    produce(&store, 0, &["a", "b", "c", "d"]);
    produce(&store, 1, &["e", "f"]);
    let cursor = store
        .priority_cursor("jobs", "c", PriorityCursorConfig { max_in_flight: 3, ..cursor_config() })
        .expect("cursor");
    let first = cursor.poll(10).expect("poll");
    assert_eq!(first.len(), 3);
    assert!(cursor.poll(10).expect("poll").is_empty(), "at the bound");
    cursor.ack(&first[0]).expect("ack");
    assert_eq!(cursor.poll(10).expect("poll").len(), 1);
}

/// The third failure dead-letters the message with its metadata and settles it; replay
/// appends it back to its lane and partition, where the cursor delivers it afresh.
#[test]
fn dead_letters_carry_metadata_and_replay() {
    let dir = tempdir();
    let clock = Arc::new(ManualClock::new(START_MS));
    let store = open(dir.path(), &clock);
    let topic = store.create_priority_topic("jobs", 2, topic_config(2)).expect("create");
    let mut record = Record::keyed("key-1", "payload");
    record.headers.push(rill_engine::Header { key: "trace".into(), value: Some("t-1".into()) });
    let (partition, handle) = topic.append_to_lane(1, Some(b"key-1"), &[record]).expect("append");
    handle.wait().expect("durable");
    let config = PriorityCursorConfig { lease_ms: 50, ..cursor_config() };
    let cursor = store.priority_cursor("jobs", "c", config).expect("cursor");
    let first = cursor.poll(1).expect("poll").pop().expect("delivery");
    let first_failure_ms = clock.now_ms_for_test();
    cursor.nack(&first, Some(0), "boom 1").expect("nack");
    let second = cursor.poll(1).expect("poll").pop().expect("retry");
    clock.advance_ms(50);
    cursor.tick().expect("expiry is the second failure");
    clock.advance_ms(1_000);
    let third = cursor.poll(1).expect("poll").pop().expect("retry");
    assert_eq!((second.delivery_count, third.delivery_count), (2, 3));
    clock.advance_ms(10);
    cursor.nack(&third, None, "boom 3").expect("nack dead-letters");
    assert_eq!(cursor.committed_offset(1, partition).expect("committed"), 1);
    assert!(cursor.poll(1).expect("poll").is_empty());

    let dlq = store.partition("jobs.dlq", partition).expect("dlq partition");
    let letters = dlq.read_records(0, 1 << 20).expect("read dlq");
    assert_eq!(letters.len(), 1);
    let meta = DeadLetter::from_headers(&letters[0].headers).expect("metadata");
    let expected = DeadLetter {
        reason: "boom 3".into(),
        delivery_count: 3,
        first_failure_ms,
        last_failure_ms: clock.now_ms_for_test(),
        topic: "jobs".into(),
        lane: 1,
        partition,
        offset: 0,
    };
    assert_eq!(meta, expected);
    assert_eq!(letters[0].key.as_deref(), Some(&b"key-1"[..]));
    assert_eq!(letters[0].headers[0].key, "trace");
    assert!(letters[0].headers.iter().any(|h| h.key == DLQ_HEADER_REASON));

    assert_eq!(topic.replay_dlq(partition, 0..u64::MAX).expect("replay"), 1);
    let replayed = cursor.poll(1).expect("poll").pop().expect("replayed message");
    assert_eq!((replayed.lane, replayed.partition, replayed.offset), (1, partition, 1));
    assert_eq!((replayed.delivery_count, value(&replayed).as_str()), (1, "payload"));
    assert_eq!(replayed.record.headers.len(), 1, "only the original header is replayed");
    assert!(!replayed.record.headers.iter().any(|h| h.key == DLQ_HEADER_LANE || h.key == DLQ_HEADER_OFFSET));
    cursor.ack(&replayed).expect("ack");

    // A record without metadata in the DLQ is refused, naming its position.
    let (_, handle) = topic.dlq().append(Some(b"x"), &[Record::from_value("junk")]).expect("append junk");
    let junk = handle.wait().expect("durable");
    let junk_partition = topic.dlq().partition_for_key(b"x");
    let err = topic.replay_dlq(junk_partition, junk.base_offset..junk.base_offset + 1).expect_err("junk");
    assert!(matches!(err, Error::InvalidDeadLetter { offset, .. } if offset == junk.base_offset));
}

/// Acks from several threads at once are all durable when they return (they share writes):
/// after a crash nothing acked comes back and committed offsets are at the end.
#[test]
fn concurrent_acks_are_group_committed_and_durable() {
    let dir = tempdir();
    let clock = Arc::new(ManualClock::new(START_MS));
    let store = open(dir.path(), &clock);
    store.create_priority_topic("jobs", 2, topic_config(2)).expect("create");
    let values: Vec<String> = (0..40).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    produce(&store, 0, &refs[..20]);
    produce(&store, 1, &refs[20..]);
    let config = PriorityCursorConfig { max_in_flight: 100, ..cursor_config() };
    let cursor = store.priority_cursor("jobs", "c", config.clone()).expect("cursor");
    let deliveries = cursor.poll(100).expect("poll");
    assert_eq!(deliveries.len(), 40);
    let threads: Vec<_> = deliveries
        .chunks(10)
        .map(|chunk| {
            let (cursor, chunk) = (Arc::clone(&cursor), chunk.to_vec());
            std::thread::spawn(move || chunk.iter().for_each(|d| cursor.ack(d).expect("ack")))
        })
        .collect();
    for thread in threads {
        thread.join().expect("acking thread");
    }
    drop((cursor, store));
    let store = open(dir.path(), &clock);
    let cursor = store.priority_cursor("jobs", "c", config).expect("reopen");
    assert!(cursor.poll(100).expect("poll").is_empty(), "nothing acked is redelivered");
    for (lane, partition) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
        let end = store.partition(&lane_topic_name("jobs", lane), partition).expect("partition").end_offset();
        assert_eq!(cursor.committed_offset(lane, partition).expect("committed"), end);
    }
}

/// A damaged checkpoint makes the cursor refuse to open (`Error::Corrupt`), never guess;
/// a damaged newest slot falls back to the state before it (the last ack is redelivered,
/// nothing is skipped).
#[test]
fn damaged_checkpoint_is_refused() {
    let dir = tempdir();
    let clock = Arc::new(ManualClock::new(START_MS));
    let store = open(dir.path(), &clock);
    store.create_priority_topic("jobs", 1, topic_config(1)).expect("create");
    produce(&store, 0, &["m", "n"]);
    let cursor = store.priority_cursor("jobs", "c", cursor_config()).expect("cursor");
    let polled = cursor.poll(2).expect("poll");
    cursor.ack(&polled[0]).expect("ack m"); // sequence 1, slot 1
    cursor.ack(&polled[1]).expect("ack n"); // sequence 2, slot 0
    drop(cursor);
    let path = dir.path().join("cursors").join("jobs").join("c.cursor");
    let mut bytes = std::fs::read(&path).expect("checkpoint exists");
    let slot = bytes.len() / 2;
    bytes[40] ^= 1;
    std::fs::write(&path, &bytes).expect("damage the newest slot");
    let cursor = store.priority_cursor("jobs", "c", cursor_config()).expect("older slot");
    let again = cursor.poll(2).expect("poll");
    assert_eq!(again.iter().map(|d| d.offset).collect::<Vec<_>>(), vec![1], "only the ack in the damaged slot is lost");
    drop(cursor);
    bytes[slot + 40] ^= 1;
    std::fs::write(&path, &bytes).expect("damage both slots");
    assert!(matches!(store.priority_cursor("jobs", "c", cursor_config()), Err(Error::Corrupt { .. })));
}

trait NowForTest {
    fn now_ms_for_test(&self) -> i64;
}

impl NowForTest for Arc<ManualClock> {
    fn now_ms_for_test(&self) -> i64 {
        rill_engine::Clock::now_ms(&**self)
    }
}

/// `extend_lease` moves the deadline to now + extra (bounded by the limit), keeps the lease
/// id, and refuses an expired lease, a settled one, one of another instance, and a stale copy.
#[test]
fn extend_lease_moves_the_deadline() {
    use rill_engine::limits::PRIORITY_LEASE_EXTENSION_MS_MAX;
    let dir = tempdir();
    let clock = Arc::new(ManualClock::new(START_MS));
    let store = open(dir.path(), &clock);
    store.create_priority_topic("jobs", 1, topic_config(1)).expect("create");
    produce(&store, 0, &["a", "b"]);
    let cursor = store.priority_cursor("jobs", "c", cursor_config()).expect("cursor");
    let polled = cursor.poll(2).expect("poll");
    let (a, b) = (&polled[0], &polled[1]);
    assert_eq!(a.lease_deadline_ms, START_MS + 1_000);
    clock.advance_ms(900);
    let extended = cursor.extend_lease(a, 5_000).expect("extend a");
    assert_eq!(extended.lease_deadline_ms, START_MS + 900 + 5_000);
    assert_eq!((extended.lease_id, extended.offset), (a.lease_id, a.offset));
    assert!(matches!(cursor.extend_lease(a, 0), Err(Error::InvalidConfig { .. })));
    assert!(matches!(cursor.extend_lease(a, PRIORITY_LEASE_EXTENSION_MS_MAX + 1), Err(Error::InvalidConfig { .. })));
    clock.advance_ms(100);
    // b's deadline has passed: it cannot be extended even before a poll reclaims it.
    assert!(matches!(cursor.extend_lease(b, 5_000), Err(Error::LeaseNotHeld { .. })));
    cursor.tick().expect("tick");
    assert_eq!(cursor.in_flight(), 1, "a survived its original deadline, b was reclaimed");
    clock.advance_ms(4_899);
    cursor.tick().expect("tick");
    assert_eq!(cursor.in_flight(), 1, "a is held until the extended deadline");
    // Extending again (from the original copy: the lease id is what counts).
    let again = cursor.extend_lease(a, 10).expect("extend a again");
    assert_eq!(again.lease_deadline_ms, clock.now_ms_for_test() + 10);
    clock.advance_ms(10);
    assert!(matches!(cursor.extend_lease(&again, 10), Err(Error::LeaseNotHeld { .. })), "expired");
    cursor.tick().expect("tick");
    assert_eq!(cursor.in_flight(), 0);
    clock.advance_ms(10_000);
    let retried = cursor.poll(2).expect("poll");
    assert_eq!(retried.len(), 2);
    assert!(matches!(cursor.extend_lease(a, 10), Err(Error::LeaseNotHeld { .. })), "an older lease");
    cursor.ack(&retried[0]).expect("ack");
    assert!(matches!(cursor.extend_lease(&retried[0], 10), Err(Error::LeaseNotHeld { .. })), "settled");
    let extended = cursor.extend_lease(&retried[1], 60_000).expect("extend");
    clock.advance_ms(59_999);
    cursor.ack(&extended).expect("ack within the extended lease");
}

/// `stats` counts per lane the ready, waiting and leased messages, the oldest ready age,
/// and the dead-letter topic's size.
#[test]
fn stats_report_depth_in_flight_age_and_dlq() {
    let dir = tempdir();
    let clock = Arc::new(ManualClock::new(START_MS));
    let store = open(dir.path(), &clock);
    store.create_priority_topic("jobs", 2, topic_config(2)).expect("create");
    let cursor = store
        .priority_cursor("jobs", "c", PriorityCursorConfig { max_deliveries: 1, ..cursor_config() })
        .expect("cursor");
    let empty = cursor.stats();
    assert_eq!(empty.lanes.len(), 2);
    assert!(empty.lanes.iter().all(|l| *l == rill_engine::LaneStats::default()));
    assert_eq!(empty.dlq_size, 0);
    produce(&store, 0, &["a", "b", "c"]);
    clock.advance_ms(300);
    produce(&store, 1, &["x", "y"]);
    clock.advance_ms(200);
    let stats = cursor.stats();
    assert_eq!((stats.lanes[0].ready, stats.lanes[1].ready), (3, 2), "unread messages count as ready");
    let polled = cursor.poll(3).expect("poll");
    assert!(polled.iter().all(|d| d.lane == 0));
    let stats = cursor.stats();
    assert_eq!((stats.lanes[0].ready, stats.lanes[0].in_flight), (0, 3));
    assert_eq!((stats.lanes[1].ready, stats.lanes[1].in_flight), (2, 0));
    assert_eq!(stats.lanes[0].oldest_ready_age_ms, 0, "nothing ready in p0");
    assert_eq!(stats.lanes[1].oldest_ready_age_ms, 200, "p1's messages were appended 200 ms ago");
    cursor.ack(&polled[0]).expect("ack");
    cursor.nack(&polled[1], None, "dead").expect("max_deliveries 1: dead-lettered");
    let stats = cursor.stats();
    assert_eq!((stats.lanes[0].ready, stats.lanes[0].in_flight), (0, 1));
    assert_eq!(stats.dlq_size, 1);
    let p1 = cursor.poll(1).expect("poll").pop().expect("x or y");
    assert_eq!(p1.lane, 1);
    let stats = cursor.stats();
    assert_eq!((stats.lanes[1].ready, stats.lanes[1].in_flight, stats.lanes[1].waiting), (1, 1, 0));
    cursor.ack(&p1).expect("ack");
    cursor.ack(&polled[2]).expect("ack");
    let stats = cursor.stats();
    assert_eq!((stats.lanes[0].ready, stats.lanes[0].in_flight, stats.lanes[1].ready), (0, 0, 1));
}

/// `ack_many` settles every held lease with one write and reports the first one not held.
#[test]
fn ack_many_settles_a_batch() {
    let dir = tempdir();
    let clock = Arc::new(ManualClock::new(START_MS));
    let store = open(dir.path(), &clock);
    store.create_priority_topic("jobs", 1, topic_config(1)).expect("create");
    produce(&store, 0, &["a", "b", "c", "d"]);
    let cursor = store.priority_cursor("jobs", "c", cursor_config()).expect("cursor");
    let polled = cursor.poll(4).expect("poll");
    cursor.ack_many(&polled[..2]).expect("ack a, b");
    assert_eq!(cursor.committed_offset(0, 0).expect("committed"), 2);
    let batch = [polled[2].clone(), polled[0].clone(), polled[3].clone()];
    assert!(matches!(cursor.ack_many(&batch), Err(Error::LeaseNotHeld { offset: 0, .. })));
    assert_eq!(cursor.committed_offset(0, 0).expect("committed"), 4, "the held ones were settled");
    drop((cursor, store));
    let store = open(dir.path(), &clock);
    let cursor = store.priority_cursor("jobs", "c", cursor_config()).expect("reopen");
    assert!(cursor.poll(4).expect("poll").is_empty(), "durable");
}
