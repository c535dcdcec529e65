//! Mixed load on a real server and the exactly-once checks the server fault scenarios share
//! (SIGKILL, lost responses, SIGSTOP pauses).
//!
//! The load: idempotent `Producer`s writing uniquely named messages `p{producer}-{n}` to
//! [`TOPIC`]; a consumer of group [`GROUP`] that fetches, and commits its positions; an
//! idempotent producer writing `j{n}` to the lanes of priority topic [`PRIORITY`]; and a
//! priority cursor consumer that polls and acks them, now and then nacking one (redelivered
//! at once) or abandoning one (its lease must expire and it must come back).
//!
//! The [`Ledger`] remembers what the clients were told: every acknowledged record with its
//! position, every record read at each position (so a position that changes meaning is
//! caught, across any number of restarts), every committed offset the server confirmed,
//! and every priority ack the server confirmed. [`Load::check`] compares the log with it.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use rill_engine::FsyncPolicy;
use rill_server::client::{Client, Consumer, Producer, ProducerConfig, SendReceipt, StartPosition};
use rill_server::messages::{PriorityCursorSettings, TopicSettings};
use rill_server::ErrorCode;

use super::Rng;

/// The plain topic the producers write and the group consumer reads.
pub const TOPIC: &str = "mixed";
/// Partitions of [`TOPIC`].
pub const PARTITIONS: u32 = 3;
/// The consumer group that commits offsets of [`TOPIC`].
pub const GROUP: &str = "mixed-readers";
/// The priority topic (lanes `jobs.p0`, `jobs.p1`).
pub const PRIORITY: &str = "jobs";
/// Lanes of [`PRIORITY`].
pub const LANES: u8 = 2;
/// Partitions of each lane.
pub const LANE_PARTITIONS: u32 = 2;
/// The priority cursor the priority consumer uses.
pub const CURSOR: &str = "workers";
/// Messages one producer keeps unacknowledged.
const WINDOW: usize = 200;
/// Messages the priority producer keeps unacknowledged.
const PRIORITY_WINDOW: usize = 50;
/// Priority messages acknowledged but not settled beyond which the priority producer waits
/// for the consumer (so the backlog left at the end stays small).
const PRIORITY_BACKLOG_MAX: usize = 1_000;
/// Segment size of every topic: small, so that segments roll during a run.
const SEGMENT_SIZE_BYTES: u64 = 64 * 1024;
/// One in this many priority deliveries is nacked (redelivered at once) instead of acked.
const NACK_ONE_IN: u64 = 20;
/// One in this many priority deliveries is abandoned: neither acked nor nacked, so it must
/// come back when its lease expires or the server restarts.
const ABANDON_ONE_IN: u64 = 20;
/// Lease of a priority delivery (abandoned ones come back after this).
const LEASE_MS: u64 = 2_000;
/// Longest a check may take to read the log back (it retries while the server restarts).
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between attempts of a client loop whose last request failed (the server is down or
/// paused); the loop itself checks its stop flag and deadline.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// The cursor settings every priority poll passes (the server keeps the first ones).
pub fn cursor_settings() -> PriorityCursorSettings {
    // Many deliveries allowed: nacks must not dead-letter anything in these runs.
    PriorityCursorSettings {
        max_deliveries: Some(1_000),
        lease_ms: Some(LEASE_MS),
        ..PriorityCursorSettings::default()
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Idempotent producers of [`TOPIC`], each with its own connection.
    pub producers: usize,
    /// Where the producers connect (a proxy, or the server).
    pub producer_addr: SocketAddr,
    /// Key each message by its producer (all of a producer's messages in one partition, so
    /// its order in the log is its send order) instead of by itself (spread).
    pub key_by_producer: bool,
    /// The producers' request timeout.
    pub request_timeout_ms: u64,
    /// Run the group consumer and the priority producer and consumer.
    pub mixed: bool,
}

/// Everything the clients were told, and every fault found so far.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Acknowledged messages of [`TOPIC`] and where.
    pub acked: HashMap<String, SendReceipt>,
    /// Messages that failed for good, with why.
    pub failed: Vec<(String, String)>,
    /// Every record ever read: (topic, partition, offset) → value.
    pub seen: HashMap<(String, u32, u64), String>,
    /// Positions whose record changed, described.
    pub changed: Vec<String>,
    /// Highest committed offset the server confirmed, per partition.
    pub committed: BTreeMap<u32, u64>,
    /// Highest committed offset read back, per partition.
    pub committed_read: BTreeMap<u32, u64>,
    /// Committed offsets that moved backwards, described.
    pub backwards: Vec<String>,
    /// Acknowledged priority messages: value → (lane, receipt).
    pub priority_acked: HashMap<String, (u8, SendReceipt)>,
    /// Priority messages whose ack the server confirmed.
    pub settled: HashSet<String>,
    /// Priority messages acked when the connection failed (outcome unknown), not since
    /// delivered again.
    pub settle_unknown: HashSet<String>,
    /// Priority deliveries of a message after its ack was confirmed, described.
    pub redelivered: Vec<String>,
    /// Priority deliveries in all.
    pub deliveries: u64,
    /// Priority acks that failed with a connection error (outcome unknown when sent).
    pub ack_errors: u64,
    /// Priority deliveries left unacknowledged on purpose (they must come back).
    pub abandoned: u64,
    /// Records the group consumer read.
    pub consumed: u64,
    /// Commits the server confirmed.
    pub commits: u64,
}

impl Ledger {
    /// Remembers that `value` was read at `topic`/`partition`/`offset`; a different value
    /// than before is a position that changed meaning.
    fn saw(&mut self, topic: &str, partition: u32, offset: u64, value: &str) {
        match self.seen.entry((topic.to_string(), partition, offset)) {
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(value.to_string());
            }
            std::collections::hash_map::Entry::Occupied(slot) => {
                if slot.get() != value {
                    let was = slot.get().clone();
                    self.changed.push(format!("{topic}/{partition}/{offset} held {was:?}, now {value:?}"));
                }
            }
        }
    }

    /// What is known about committed offsets before a read of them starts: a read may
    /// only be compared with commits confirmed (and reads made) before it began.
    fn committed_baseline(&self) -> (BTreeMap<u32, u64>, BTreeMap<u32, u64>) {
        (self.committed.clone(), self.committed_read.clone())
    }

    /// Remembers a committed offset read back from the server, which must not be below
    /// what `baseline` knew before the read.
    fn read_committed(
        &mut self,
        baseline: &(BTreeMap<u32, u64>, BTreeMap<u32, u64>),
        partition: u32,
        offset: u64,
        context: &str,
    ) {
        let confirmed = baseline.0.get(&partition).copied().unwrap_or(0);
        let read = baseline.1.get(&partition).copied().unwrap_or(0);
        if offset < confirmed || offset < read {
            self.backwards.push(format!(
                "{context}: partition {partition} committed offset {offset}, after a confirmed commit of \
                 {confirmed} and a read of {read}"
            ));
        }
        let slot = self.committed_read.entry(partition).or_default();
        *slot = (*slot).max(offset);
    }
}

/// Figures of one check of the log against the ledger.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Check {
    /// Records of [`TOPIC`] acknowledged so far.
    pub acked: u64,
    /// Acknowledged records not at their acknowledged position.
    pub lost: u64,
    /// Messages at more than one position.
    pub duplicated: u64,
    /// Producer messages out of send order within a partition.
    pub reordered: u64,
    /// Positions whose record changed (all so far).
    pub changed: u64,
    /// Committed offsets that moved backwards (all so far).
    pub backwards: u64,
    /// Priority messages acknowledged by the server to their producer.
    pub priority_acked: u64,
    /// Priority messages redelivered after their ack was confirmed (all so far).
    pub redelivered: u64,
}

impl Check {
    /// Whether every figure that counts a fault is zero.
    pub fn clean(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.reordered == 0
            && self.changed == 0
            && self.backwards == 0
            && self.redelivered == 0
    }
}

/// The running load.
pub struct Load {
    pub ledger: Arc<Mutex<Ledger>>,
    /// Messages of [`TOPIC`] acknowledged so far (for progress waits).
    pub acked: Arc<AtomicU64>,
    /// Priority messages settled so far (for progress waits).
    pub settled: Arc<AtomicU64>,
    config: LoadConfig,
    server_addr: SocketAddr,
    stop_producers: Arc<AtomicBool>,
    stop_consumers: Arc<AtomicBool>,
    producers: Vec<tokio::task::JoinHandle<()>>,
    consumers: Vec<tokio::task::JoinHandle<()>>,
}

/// Creates [`TOPIC`] and [`PRIORITY`] with `fsync = always`.
pub async fn create_topics(admin: &Client) {
    let settings = TopicSettings {
        partitions: PARTITIONS,
        fsync: Some(FsyncPolicy::Always),
        segment_size_bytes: Some(SEGMENT_SIZE_BYTES),
        ..TopicSettings::default()
    };
    admin.create_topic(TOPIC, settings.clone()).await.expect("create the topic");
    let lanes = TopicSettings { partitions: LANE_PARTITIONS, ..settings };
    admin.create_priority_topic(PRIORITY, LANES, lanes).await.expect("create the priority topic");
}

impl Load {
    /// Starts the load against the server at `server_addr` (topics created).
    pub fn start(server_addr: SocketAddr, config: LoadConfig, seed: u64) -> Load {
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let acked = Arc::new(AtomicU64::new(0));
        let settled = Arc::new(AtomicU64::new(0));
        let stop_producers = Arc::new(AtomicBool::new(false));
        let stop_consumers = Arc::new(AtomicBool::new(false));
        let mut producers = Vec::new();
        for id in 0..config.producers {
            let task =
                produce(config.clone(), id, Arc::clone(&stop_producers), Arc::clone(&acked), Arc::clone(&ledger));
            producers.push(tokio::spawn(task));
        }
        let mut consumers = Vec::new();
        if config.mixed {
            let stop = Arc::clone(&stop_producers);
            producers.push(tokio::spawn(produce_priority(server_addr, stop, Arc::clone(&ledger))));
            let stop = Arc::clone(&stop_consumers);
            consumers.push(tokio::spawn(consume_group(server_addr, stop, Arc::clone(&ledger))));
            let stop = Arc::clone(&stop_consumers);
            let task = consume_priority(server_addr, stop, Arc::clone(&ledger), Arc::clone(&settled), seed);
            consumers.push(tokio::spawn(task));
        }
        Load { ledger, acked, settled, config, server_addr, stop_producers, stop_consumers, producers, consumers }
    }

    /// Waits (polling, bounded by `timeout`) until `count` more messages were acknowledged
    /// and, with mixed load, at least one more priority message was settled. `context` is
    /// printed on failure.
    pub async fn wait_for_progress(&self, count: u64, timeout: Duration, context: impl Fn() -> String) {
        let target = self.acked.load(Ordering::Relaxed) + count;
        let settled_target = self.settled.load(Ordering::Relaxed) + u64::from(self.config.mixed);
        let deadline = Instant::now() + timeout;
        while self.acked.load(Ordering::Relaxed) < target || self.settled.load(Ordering::Relaxed) < settled_target {
            assert!(
                Instant::now() < deadline,
                "the load stalled at {} acknowledged and {} settled messages (waiting for {target} and \
                 {settled_target})\n{}",
                self.acked.load(Ordering::Relaxed),
                self.settled.load(Ordering::Relaxed),
                context()
            );
            tokio::time::sleep(Duration::from_millis(5)).await; // polling the counters
        }
    }

    /// Reads the whole log back and compares it with the ledger (retrying while the server
    /// is not reachable). Committed offsets are read too.
    pub async fn check(&self) -> Check {
        let deadline = Instant::now() + CHECK_TIMEOUT;
        loop {
            match self.try_check().await {
                Ok(check) => return check,
                Err(e) if Instant::now() < deadline => eprintln!("check failed, retrying: {e}"),
                Err(e) => panic!("could not read the log back in {CHECK_TIMEOUT:?}: {e}"),
            }
            tokio::time::sleep(RETRY_PAUSE).await; // retry pacing
        }
    }

    async fn try_check(&self) -> Result<Check, rill_server::Error> {
        let client = Client::connect(self.server_addr, "check").await?;
        // What was acknowledged before the read began must all be in what it reads.
        let (acked, priority_acked) = {
            let ledger = self.ledger.lock();
            (ledger.acked.clone(), ledger.priority_acked.clone())
        };
        let log = read_topic(&client, TOPIC).await?;
        let mut lanes = Vec::new();
        for lane in 0..LANES {
            let topic = format!("{PRIORITY}.p{lane}");
            let records = read_topic(&client, &topic).await?;
            lanes.push((lane, topic, records));
        }
        let baseline = self.ledger.lock().committed_baseline();
        let mut committed = Vec::new();
        if self.config.mixed {
            for partition in 0..PARTITIONS {
                committed.push((partition, client.fetch_offset(GROUP, TOPIC, partition).await?));
            }
        }

        let mut check =
            Check { acked: acked.len() as u64, priority_acked: priority_acked.len() as u64, ..Check::default() };
        let mut ledger = self.ledger.lock();
        let mut positions: HashMap<&str, Vec<(u32, u64)>> = HashMap::new();
        for (&(partition, offset), value) in &log {
            ledger.saw(TOPIC, partition, offset, value);
            positions.entry(value.as_str()).or_default().push((partition, offset));
        }
        for (message, receipt) in &acked {
            if log.get(&(receipt.partition, receipt.offset)) != Some(message) {
                check.lost += 1;
                eprintln!("LOST: {message} acknowledged at {}/{}", receipt.partition, receipt.offset);
            }
        }
        for (message, at) in &positions {
            if at.len() > 1 {
                check.duplicated += 1;
                eprintln!("DUPLICATED: {message} at {at:?}");
            }
        }
        // Each producer's messages, per partition, in offset order must be in send order.
        let mut last: HashMap<(u32, &str), u64> = HashMap::new();
        for (&(partition, _), value) in &log {
            let Some((producer, n)) = parse_message(value) else { continue };
            if let Some(previous) = last.insert((partition, producer), n) {
                if n <= previous {
                    check.reordered += 1;
                    eprintln!("REORDERED: {value} after {producer}-{previous} in partition {partition}");
                }
            }
        }
        let mut lane_positions: HashMap<&str, Vec<(u8, u32, u64)>> = HashMap::new();
        for (lane, topic, records) in &lanes {
            for (&(partition, offset), value) in records {
                ledger.saw(topic, partition, offset, value);
                lane_positions.entry(value.as_str()).or_default().push((*lane, partition, offset));
            }
        }
        for (message, (lane, receipt)) in &priority_acked {
            let topic = &lanes[usize::from(*lane)].2;
            if topic.get(&(receipt.partition, receipt.offset)) != Some(message) {
                check.lost += 1;
                eprintln!("LOST: priority {message} acknowledged at p{lane}/{}/{}", receipt.partition, receipt.offset);
            }
        }
        for (message, at) in &lane_positions {
            if at.len() > 1 {
                check.duplicated += 1;
                eprintln!("DUPLICATED: priority {message} at {at:?}");
            }
        }
        for (partition, offset) in committed {
            ledger.read_committed(&baseline, partition, offset.unwrap_or(0), "check");
        }
        for line in ledger.changed.iter().chain(&ledger.backwards).chain(&ledger.redelivered) {
            eprintln!("FAULT: {line}");
        }
        check.changed = ledger.changed.len() as u64;
        check.backwards = ledger.backwards.len() as u64;
        check.redelivered = ledger.redelivered.len() as u64;
        Ok(check)
    }

    /// Stops the producers (each flushes what it sent), lets the priority consumer settle
    /// every acknowledged priority message (bounded by `timeout`), stops the consumers, and
    /// checks the log a last time. Returns the check and the priority messages lost
    /// (acknowledged to their producer, never settled nor with an ack of unknown outcome).
    pub async fn finish(mut self, timeout: Duration) -> (Check, u64, Arc<Mutex<Ledger>>) {
        self.stop_producers.store(true, Ordering::Relaxed);
        for task in self.producers.drain(..) {
            task.await.expect("producer task");
        }
        // The drain may take long after a long run: it only has to keep making progress.
        let mut deadline = Instant::now() + timeout;
        let mut last_missing = usize::MAX;
        let unsettled = |ledger: &Ledger| {
            let mut missing: Vec<&String> = ledger
                .priority_acked
                .keys()
                .filter(|m| !ledger.settled.contains(*m) && !ledger.settle_unknown.contains(*m))
                .collect();
            missing.sort();
            missing.into_iter().cloned().collect::<Vec<_>>()
        };
        loop {
            let missing = unsettled(&self.ledger.lock());
            if missing.is_empty() {
                break;
            }
            if missing.len() < last_missing {
                last_missing = missing.len();
                deadline = Instant::now() + timeout;
            }
            if Instant::now() >= deadline {
                eprintln!("priority messages never settled: {missing:?}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await; // polling the drain
        }
        self.stop_consumers.store(true, Ordering::Relaxed);
        for task in self.consumers.drain(..) {
            task.await.expect("consumer task");
        }
        let check = self.check().await;
        let lost_priority = unsettled(&self.ledger.lock()).len() as u64;
        (check, lost_priority, self.ledger)
    }
}

/// What a poll of the priority cursor right after a restart found out about the acks whose
/// outcome the consumer never learned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InDoubt {
    /// In-doubt messages delivered again (their ack had not landed); now acked.
    pub redelivered: u64,
    /// In-doubt messages not delivered again: the server had applied their ack.
    pub settled: u64,
    /// Messages delivered again although their ack was confirmed.
    pub violations: u64,
}

/// Right after a restart (no lease survives one), every unsettled message of the cursor
/// is delivered again and nothing settled is (the contract in
/// engine/src/cursor/priority/mod.rs). Polls until the cursor has nothing left, acking
/// each delivery, and classifies the in-doubt acks of `ledger`. Call after [`Load::finish`]
/// and a restart.
pub async fn resolve_in_doubt(addr: SocketAddr, ledger: &Mutex<Ledger>) -> InDoubt {
    let client = Client::connect(addr, "in-doubt").await.expect("connect");
    let mut out = InDoubt::default();
    let mut returned = HashSet::new();
    loop {
        let deliveries = client.priority_poll(PRIORITY, CURSOR, 256, cursor_settings()).await.expect("poll");
        if deliveries.is_empty() {
            break;
        }
        for delivery in deliveries {
            let value = value_of(delivery.value);
            let unexpected = {
                let ledger = ledger.lock();
                ledger.settled.contains(&value)
            };
            if unexpected {
                eprintln!("FAULT: {value} delivered after the final restart although its ack was confirmed");
                out.violations += 1;
            }
            client.priority_ack(PRIORITY, CURSOR, delivery.lease).await.expect("ack");
            returned.insert(value);
        }
    }
    let ledger = ledger.lock();
    out.redelivered = ledger.settle_unknown.intersection(&returned).count() as u64;
    out.settled = ledger.settle_unknown.len() as u64 - out.redelivered;
    out
}

/// `p{producer}-{n}` → (`p{producer}`, n).
fn parse_message(value: &str) -> Option<(&str, u64)> {
    let (producer, n) = value.split_once('-')?;
    Some((producer, n.parse().ok()?))
}

/// Every record of `topic`: value by (partition, offset), up to the end offsets seen when
/// the read starts.
pub async fn read_topic(client: &Client, topic: &str) -> Result<BTreeMap<(u32, u64), String>, rill_server::Error> {
    let mut consumer = Consumer::new(client.clone(), None, topic, StartPosition::Earliest).await?;
    let ends = consumer.end_offsets().to_vec();
    let deadline = Instant::now() + CHECK_TIMEOUT;
    let mut out = BTreeMap::new();
    while consumer.positions().iter().zip(&ends).any(|(position, end)| position < end) {
        assert!(Instant::now() < deadline, "read the whole of {topic} in time");
        for record in consumer.poll(100).await? {
            out.insert((record.partition, record.offset), value_of(record.value));
        }
    }
    Ok(out)
}

fn value_of(value: Option<Bytes>) -> String {
    String::from_utf8(value.expect("every test record has a value").to_vec()).expect("UTF-8 test record")
}

/// One producer: sends `p{id}-{n}` until stopped, keeping up to [`WINDOW`] unacknowledged,
/// and records every outcome in the ledger.
async fn produce(
    config: LoadConfig,
    id: usize,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    ledger: Arc<Mutex<Ledger>>,
) {
    let client = Client::connect(config.producer_addr, &format!("producer-{id}")).await.expect("connect");
    // Enough retries (backoff up to 1 s) to ride out a restart or a pause.
    let producer_config = ProducerConfig {
        linger_ms: 2,
        max_retries: 60,
        request_timeout_ms: config.request_timeout_ms,
        ..ProducerConfig::default()
    };
    let producer = Producer::new(client, producer_config).expect("producer");
    let settle = |message: String, receipt: Result<SendReceipt, rill_server::Error>| {
        let mut ledger = ledger.lock();
        match receipt {
            Ok(receipt) => {
                ledger.acked.insert(message, receipt);
                acked.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                eprintln!("{message} failed for good: {e}");
                ledger.failed.push((message, e.to_string()));
            }
        }
    };
    let mut pending = VecDeque::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let message = format!("p{id}-{n}");
        n += 1;
        let key = if config.key_by_producer { Bytes::from(format!("p{id}")) } else { Bytes::from(message.clone()) };
        let receipt = producer.send(TOPIC, Some(key), Bytes::from(message.clone()), Vec::new());
        pending.push_back(async move { (message, receipt.await) });
        if pending.len() >= WINDOW {
            let (message, receipt) = pending.pop_front().expect("the window is full").await;
            settle(message, receipt);
        }
    }
    producer.flush().await;
    for next in pending {
        let (message, receipt) = next.await;
        settle(message, receipt);
    }
}

/// The priority producer: sends `j{n}` to lane `n % LANES` until stopped.
async fn produce_priority(addr: SocketAddr, stop: Arc<AtomicBool>, ledger: Arc<Mutex<Ledger>>) {
    let client = Client::connect(addr, "priority-producer").await.expect("connect");
    let config =
        ProducerConfig { linger_ms: 2, max_retries: 60, request_timeout_ms: 5_000, ..ProducerConfig::default() };
    let producer = Producer::new(client, config).expect("producer");
    let settle = |(message, lane, receipt): (String, u8, Result<SendReceipt, rill_server::Error>)| {
        let mut ledger = ledger.lock();
        match receipt {
            Ok(receipt) => {
                ledger.priority_acked.insert(message, (lane, receipt));
            }
            Err(e) => {
                eprintln!("priority {message} failed for good: {e}");
                ledger.failed.push((message, e.to_string()));
            }
        }
    };
    let mut pending = VecDeque::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let backlog = {
            let ledger = ledger.lock();
            (ledger.priority_acked.len() + pending.len())
                .saturating_sub(ledger.settled.len() + ledger.settle_unknown.len())
        };
        if backlog > PRIORITY_BACKLOG_MAX {
            tokio::time::sleep(Duration::from_millis(5)).await; // pacing: the consumer is behind
            continue;
        }
        let message = format!("j{n}");
        let lane = (n % u64::from(LANES)) as u8;
        n += 1;
        let value = Bytes::from(message.clone());
        let receipt = producer.send(&format!("{PRIORITY}.p{lane}"), Some(value.clone()), value, Vec::new());
        pending.push_back(async move { (message, lane, receipt.await) });
        if pending.len() >= PRIORITY_WINDOW {
            settle(pending.pop_front().expect("the window is full").await);
        }
    }
    producer.flush().await;
    for next in pending {
        settle(next.await);
    }
}

/// The group consumer: from the committed offsets, polls and commits every few polls; on
/// any error starts over from the committed offsets (which must not be below a confirmed
/// commit).
async fn consume_group(addr: SocketAddr, stop: Arc<AtomicBool>, ledger: Arc<Mutex<Ledger>>) {
    let mut polls = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let baseline = ledger.lock().committed_baseline();
        let consumer = async {
            let client = Client::connect(addr, "group-consumer").await?;
            Consumer::new(client, Some(GROUP.to_string()), TOPIC, StartPosition::Committed).await
        };
        let mut consumer = match consumer.await {
            Ok(consumer) => consumer,
            Err(_) => {
                tokio::time::sleep(RETRY_PAUSE).await; // retry pacing while the server is down
                continue;
            }
        };
        {
            let mut ledger = ledger.lock();
            for (partition, &offset) in consumer.positions().iter().enumerate() {
                ledger.read_committed(&baseline, partition as u32, offset, "consumer start");
            }
        }
        while !stop.load(Ordering::Relaxed) {
            let records = match consumer.poll(100).await {
                Ok(records) => records,
                Err(_) => break,
            };
            {
                let mut ledger = ledger.lock();
                ledger.consumed += records.len() as u64;
                for record in records {
                    let value = value_of(record.value);
                    ledger.saw(TOPIC, record.partition, record.offset, &value);
                }
            }
            polls += 1;
            if polls.is_multiple_of(4) {
                let positions = consumer.positions().to_vec();
                if consumer.commit().await.is_err() {
                    break;
                }
                let mut ledger = ledger.lock();
                ledger.commits += 1;
                for (partition, offset) in positions.into_iter().enumerate() {
                    let slot = ledger.committed.entry(partition as u32).or_default();
                    *slot = (*slot).max(offset);
                }
            }
        }
    }
}

/// The priority consumer: polls up to 32 messages, acks them concurrently (nacks one in
/// [`NACK_ONE_IN`], abandons one in [`ABANDON_ONE_IN`]), and records what the server
/// confirmed.
async fn consume_priority(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    ledger: Arc<Mutex<Ledger>>,
    settled: Arc<AtomicU64>,
    seed: u64,
) {
    let mut rng = Rng::new(seed ^ 0x7072_696f);
    let mut client: Option<Client> = None;
    while !stop.load(Ordering::Relaxed) {
        let current = match &client {
            Some(client) => client.clone(),
            None => match Client::connect(addr, "priority-consumer").await {
                Ok(c) => {
                    client = Some(c.clone());
                    c
                }
                Err(_) => {
                    tokio::time::sleep(RETRY_PAUSE).await; // retry pacing while the server is down
                    continue;
                }
            },
        };
        let deliveries = match current.priority_poll(PRIORITY, CURSOR, 32, cursor_settings()).await {
            Ok(deliveries) => deliveries,
            Err(e) => {
                if matches!(e, rill_server::Error::Server { .. }) {
                    eprintln!("priority poll failed: {e}");
                }
                tokio::time::sleep(RETRY_PAUSE).await; // retry pacing while the server is down
                continue;
            }
        };
        if deliveries.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await; // nothing ready: poll pacing
            continue;
        }
        let mut acks = tokio::task::JoinSet::new();
        {
            let mut ledger = ledger.lock();
            ledger.deliveries += deliveries.len() as u64;
            for delivery in deliveries {
                let value = value_of(delivery.value);
                let lease = delivery.lease;
                ledger.saw(&format!("{PRIORITY}.p{}", lease.lane), lease.partition, lease.offset, &value);
                if ledger.settled.contains(&value) {
                    ledger.redelivered.push(format!(
                        "{value} delivered again (delivery {}) after its ack was confirmed",
                        delivery.delivery_count
                    ));
                }
                ledger.settle_unknown.remove(&value);
                if rng.below(ABANDON_ONE_IN) == 0 {
                    ledger.abandoned += 1;
                    continue;
                }
                let client = current.clone();
                let nack = rng.below(NACK_ONE_IN) == 0;
                acks.spawn(async move {
                    let result = if nack {
                        client.priority_nack(PRIORITY, CURSOR, lease, Some(0), "campaign").await
                    } else {
                        client.priority_ack(PRIORITY, CURSOR, lease).await
                    };
                    (value, nack, result)
                });
            }
        }
        while let Some(joined) = acks.join_next().await {
            let (value, nack, result) = joined.expect("ack task");
            let mut ledger = ledger.lock();
            match result {
                Ok(()) if !nack => {
                    ledger.settled.insert(value);
                    settled.fetch_add(1, Ordering::Relaxed);
                }
                Ok(()) => {}
                // The lease ended (a restart, an expiry): the message comes back.
                Err(e) if e.code() == ErrorCode::LeaseNotHeld => {}
                // The connection failed: the ack may or may not have been applied.
                Err(e) if !nack => {
                    eprintln!("ack of {value} failed: {e}");
                    ledger.ack_errors += 1;
                    ledger.settle_unknown.insert(value);
                }
                Err(_) => {}
            }
        }
    }
}

/// The summary line the campaign script collects.
pub fn summary(scenario: &str, rounds: u64, check: &Check, lost_priority: u64, extra: &str) {
    println!(
        "campaign: scenario={scenario} rounds={rounds} acked={} lost={} duplicated={} reordered={} \
         offsets_changed={} commits_backwards={} priority_acked={} priority_redelivered_after_ack={} \
         priority_lost={lost_priority}{}{extra}",
        check.acked + check.priority_acked,
        check.lost + lost_priority,
        check.duplicated + check.redelivered,
        check.reordered,
        check.changed,
        check.backwards,
        check.priority_acked,
        check.redelivered,
        if extra.is_empty() { "" } else { " " },
    );
}
