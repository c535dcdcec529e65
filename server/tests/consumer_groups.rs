//! Consumer groups against the real `rill` binary: three members split a topic's partitions,
//! a member that leaves and a member whose session times out hand their partitions over, a
//! member that missed the rebalance cannot commit, and after a server restart (membership
//! is volatile) the survivor joins again and resumes from the committed offsets. Across all
//! of it every record produced is read, and the records read after each hand-over start at
//! the committed offsets.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use common::ServerProcess;
use rill_engine::format::batch::BatchBuilder;
use rill_engine::{Compression, FsyncPolicy, Record};
use rill_server::client::{Client, Consumer};
use rill_server::messages::{Acks, TopicSettings};
use rill_server::{Error, ErrorCode};

const TOPIC: &str = "events";
const GROUP: &str = "workers";
const PARTITIONS: u32 = 6;
const SESSION_TIMEOUT_MS: u32 = 1_500;
const TEST_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a step may wait for the group to settle.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);

/// What the members read: (partition, offset) → value, and how often each was read.
#[derive(Default)]
struct Seen {
    reads: BTreeMap<(u32, u64), (Bytes, u32)>,
}

impl Seen {
    fn add(&mut self, partition: u32, offset: u64, value: Bytes) {
        let entry = self.reads.entry((partition, offset)).or_insert((value.clone(), 0));
        assert_eq!(entry.0, value, "partition {partition} offset {offset} changed its value");
        entry.1 += 1;
    }
}

async fn produce(client: &Client, first: u32, count: u32) -> BTreeSet<String> {
    let mut values = BTreeSet::new();
    for partition in 0..PARTITIONS {
        let mut builder = BatchBuilder::new(Compression::None, 1_700_000_000_000);
        for i in (first..first + count).filter(|i| i % PARTITIONS == partition) {
            let value = format!("record-{i}");
            builder.push(&Record::from_value(value.clone())).expect("push");
            values.insert(value);
        }
        let batch = builder.build().expect("build").freeze();
        client.produce(TOPIC, partition, Acks::Leader, batch).await.expect("produce");
    }
    values
}

/// Polls `member` once and records what it read.
async fn poll_into(member: &mut Consumer, seen: &mut Seen) -> usize {
    let records = member.poll(50).await.expect("poll");
    for r in &records {
        seen.add(r.partition, r.offset, r.value.clone().expect("value"));
    }
    records.len()
}

/// Polls every member until their assignments are disjoint, cover every partition, and are
/// all in one generation; returns each member's partitions.
async fn settle(members: &mut [&mut Consumer], seen: &mut Seen) -> Vec<Vec<u32>> {
    let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
    loop {
        for member in members.iter_mut() {
            poll_into(member, seen).await;
        }
        let generations: BTreeSet<u64> = members.iter().map(|m| m.membership().expect("member").1).collect();
        let owned: Vec<Vec<u32>> = members.iter().map(|m| m.assigned_partitions()).collect();
        let mut all: Vec<u32> = owned.iter().flatten().copied().collect();
        all.sort_unstable();
        if generations.len() == 1 && all == (0..PARTITIONS).collect::<Vec<_>>() {
            return owned;
        }
        assert!(tokio::time::Instant::now() < deadline, "group did not settle: {owned:?}, generations {generations:?}");
    }
}

/// Polls until `member` has read every value of `expected` (others may be read too).
async fn read_until(member: &mut Consumer, seen: &mut Seen, expected: &BTreeSet<String>) {
    let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
    loop {
        let read: BTreeSet<String> =
            seen.reads.values().map(|(v, _)| String::from_utf8(v.to_vec()).expect("utf-8")).collect();
        if expected.is_subset(&read) {
            return;
        }
        poll_into(member, seen).await;
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} records not read in time",
            expected.difference(&read).count()
        );
    }
}

async fn committed(client: &Client) -> Vec<u64> {
    let mut out = Vec::new();
    for partition in 0..PARTITIONS {
        out.push(client.fetch_offset(GROUP, TOPIC, partition).await.expect("fetch offset").unwrap_or(0));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_split_partitions_and_hand_them_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, log) = (dir.path().join("data"), dir.path().join("server.log"));
    let mut server = ServerProcess::start(&data, &log, "127.0.0.1:0", "");
    let steps = async {
        let admin = Client::connect(server.addr, "admin").await.expect("connect");
        let settings =
            TopicSettings { partitions: PARTITIONS, fsync: Some(FsyncPolicy::Always), ..TopicSettings::default() };
        admin.create_topic(TOPIC, settings).await.expect("create");
        let mut seen = Seen::default();

        let connect = |name: &'static str| {
            let addr = server.addr;
            async move { Client::connect(addr, name).await.expect("connect") }
        };
        let mut a = Consumer::join(connect("a").await, GROUP, TOPIC, SESSION_TIMEOUT_MS).await.expect("join a");
        let mut b = Consumer::join(connect("b").await, GROUP, TOPIC, SESSION_TIMEOUT_MS).await.expect("join b");
        let mut c = Consumer::join(connect("c").await, GROUP, TOPIC, SESSION_TIMEOUT_MS).await.expect("join c");

        // Three members, two partitions each.
        let owned = settle(&mut [&mut a, &mut b, &mut c], &mut seen).await;
        assert!(owned.iter().all(|p| p.len() == 2), "range assignment gives 2 partitions each: {owned:?}");
        let mut expected = produce(&admin, 0, 600).await;
        // Everyone drains its partitions and commits.
        let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
        while seen.reads.len() < 600 {
            for member in [&mut a, &mut b, &mut c] {
                poll_into(member, &mut seen).await;
            }
            assert!(tokio::time::Instant::now() < deadline, "only {} of 600 read", seen.reads.len());
        }
        assert!(seen.reads.values().all(|(_, n)| *n == 1), "in a stable group every record is read once");
        for member in [&mut a, &mut b, &mut c] {
            member.commit().await.expect("commit in a stable group");
        }
        assert_eq!(committed(&admin).await, vec![100; PARTITIONS as usize]);

        // c leaves: a and b take its partitions at once.
        c.leave().await.expect("leave");
        let owned = settle(&mut [&mut a, &mut b], &mut seen).await;
        assert!(owned.iter().all(|p| p.len() == 3), "{owned:?}");
        expected.extend(produce(&admin, 600, 300).await);
        let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
        while seen.reads.len() < 900 {
            poll_into(&mut a, &mut seen).await;
            poll_into(&mut b, &mut seen).await;
            assert!(tokio::time::Instant::now() < deadline, "only {} of 900 read", seen.reads.len());
        }
        a.commit().await.expect("a commits");
        b.commit().await.expect("b commits");
        assert_eq!(committed(&admin).await, vec![150; PARTITIONS as usize]);

        // b goes silent (reads 30 more records without committing, then stops): after its
        // session times out a owns everything and re-reads b's uncommitted records.
        expected.extend(produce(&admin, 900, 60).await);
        let b_partitions = b.assigned_partitions();
        let before_b: usize = seen.reads.values().filter(|(_, n)| *n > 1).count();
        let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
        loop {
            poll_into(&mut b, &mut seen).await;
            let b_read = seen.reads.keys().filter(|(p, o)| b_partitions.contains(p) && *o >= 150).count();
            if b_read == 30 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "b read {b_read} of its 30 new records");
        }
        let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
        while a.assigned_partitions().len() < PARTITIONS as usize {
            poll_into(&mut a, &mut seen).await;
            assert!(tokio::time::Instant::now() < deadline, "a never took over b's partitions");
        }
        // b missed the rebalance: its commit is refused, whatever it read.
        match b.commit().await {
            Err(Error::Server { code: ErrorCode::UnknownMember | ErrorCode::StaleGeneration, .. }) => {}
            other => panic!("a commit by an expired member must be refused, got {other:?}"),
        }
        assert_eq!(committed(&admin).await, vec![150; PARTITIONS as usize], "the refused commit moved nothing");
        read_until(&mut a, &mut seen, &expected).await;
        let reread = seen.reads.values().filter(|(_, n)| *n > 1).count() - before_b;
        assert_eq!(
            reread, 30,
            "a re-reads exactly b's uncommitted records (at-least-once, from the committed offsets)"
        );
        a.commit().await.expect("a commits everything");
        assert_eq!(committed(&admin).await, vec![160; PARTITIONS as usize]);
        drop(b);
        drop((admin, a));
        expected
    };
    let expected = tokio::time::timeout(TEST_TIMEOUT, steps).await.expect("steps finish in time");
    let status = server.terminate();
    assert!(status.success(), "SIGTERM exits with status 0\n{}", server.log());

    // Membership is volatile: after a restart the member joins afresh and resumes from the
    // committed offsets.
    let server = ServerProcess::start(&data, &log, "127.0.0.1:0", "");
    let after_restart = async {
        let admin = Client::connect(server.addr, "admin").await.expect("connect");
        let more = produce(&admin, 960, 60).await;
        let mut a = Consumer::join(admin.clone(), GROUP, TOPIC, SESSION_TIMEOUT_MS).await.expect("join");
        let mut seen = Seen::default();
        read_until(&mut a, &mut seen, &more).await;
        assert_eq!(seen.reads.len(), 60, "only records past the committed offsets are read");
        assert!(seen.reads.keys().all(|(_, offset)| *offset >= 160));
        assert_eq!(expected.len(), 960);
    };
    tokio::time::timeout(TEST_TIMEOUT, after_restart).await.expect("steps after the restart finish in time");
}
