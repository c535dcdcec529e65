//! Property tests of priority cursors against models.
//!
//! `starvation_bound_holds`: random arrivals on all four lanes (two partitions each) under a
//! `p0` flood that outpaces the consumer, with nothing ever acked. Replaying the delivery
//! sequence, for every lane `k` the test counts deliveries from other lanes made while lane
//! `k`'s oldest undelivered message had waited at least `k · aging_ms`; the count restarts
//! at each delivery from lane `k` and must never exceed `B_k = Σ_{j≠k} (⌊w_j/w_k⌋ + 1)`.
//! Deliveries within a lane partition must come in offset order.
//!
//! `cursor_matches_model`: random produce / poll / ack / nack / clock advance (lease expiry)
//! / crash-and-reopen schedules on two lanes. The model tracks each message's durable
//! failure count, whether it is leased, acked or dead-lettered, and when it may be delivered
//! again; every delivery must be of a message the model says is deliverable, with the
//! delivery count the model predicts. A crash drops the store and the cursor without
//! closing them: leases vanish, acks and failures stay. At the end the test drains the
//! cursor and checks that every message is acked or dead-lettered exactly as the model says
//! and that the dead-letter topic holds exactly the model's dead letters, each once.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use rill_engine::cursor::priority::starvation_bound;
use rill_engine::{
    BackoffConfig, Clock, DeadLetter, Delivery, FsyncPolicy, ManualClock, PriorityCursor, PriorityCursorConfig, Record,
    Store, StoreConfig, TopicConfig,
};

const START_MS: i64 = 1_700_000_000_000;
const WEIGHTS: [u32; 4] = [8, 4, 2, 1];

fn tempdir() -> tempfile::TempDir {
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

fn topic_config() -> TopicConfig {
    TopicConfig { partitions: 2, fsync: FsyncPolicy::Never, ..TopicConfig::default() }
}

/// One tick of the starvation schedule: how many messages arrive on each lane, and how many
/// the consumer takes.
#[derive(Clone, Debug)]
struct Tick {
    arrivals: [u8; 4],
    polls: u8,
}

fn tick_strategy() -> impl Strategy<Value = Tick> {
    (2u8..=4, 0u8..=2, 0u8..=1, 0u8..=1, 1u8..=3)
        .prop_map(|(a0, a1, a2, a3, polls)| Tick { arrivals: [a0, a1, a2, a3], polls })
}

/// Checks the bound while replaying deliveries; `waiting[k]` holds lane k's undelivered
/// messages as (ready_since_ms, partition, offset) in arrival order.
struct StarvationCheck {
    waiting: [VecDeque<(i64, u32, u64)>; 4],
    others_since_aged: [u64; 4],
    aging_ms: i64,
}

impl StarvationCheck {
    fn deliver(&mut self, now_ms: i64, d: &Delivery) -> Result<(), TestCaseError> {
        let lane = usize::from(d.lane);
        for k in 0..4 {
            if k == lane {
                continue;
            }
            let aged = self.waiting[k].front().is_some_and(|(since, _, _)| now_ms - since >= k as i64 * self.aging_ms);
            if aged {
                self.others_since_aged[k] += 1;
                let bound = starvation_bound(&WEIGHTS, k as u8);
                prop_assert!(self.others_since_aged[k] <= bound, "lane {k} waited past B_k = {bound}");
            } else {
                self.others_since_aged[k] = 0;
            }
        }
        self.others_since_aged[lane] = 0;
        let queue = &mut self.waiting[lane];
        let position = queue.iter().position(|(_, p, o)| (*p, *o) == (d.partition, d.offset));
        let position = position.ok_or_else(|| TestCaseError::fail(format!("unexpected delivery {d:?}")))?;
        let earlier_same_partition = queue.iter().take(position).any(|(_, p, _)| *p == d.partition);
        prop_assert!(!earlier_same_partition, "out of order within lane {lane} partition {}", d.partition);
        queue.remove(position);
        Ok(())
    }
}

fn run_starvation(ticks: &[Tick], aging_ms: i64) -> Result<(), TestCaseError> {
    let dir = tempdir();
    let clock = Arc::new(ManualClock::new(START_MS));
    let store = open(dir.path(), &clock);
    let topic = store.create_priority_topic("flood", 4, topic_config()).expect("create");
    let config = PriorityCursorConfig {
        weights: WEIGHTS,
        aging_ms: aging_ms as u64,
        lease_ms: 1_000_000,
        max_in_flight: 100_000,
        ..PriorityCursorConfig::default()
    };
    let cursor = store.priority_cursor("flood", "c", config).expect("cursor");
    let mut check = StarvationCheck { waiting: Default::default(), others_since_aged: [0; 4], aging_ms };
    for (t, tick) in ticks.iter().enumerate() {
        let now_ms = clock.now_ms();
        for (lane, count) in tick.arrivals.iter().enumerate() {
            for i in 0..*count {
                let key = format!("{t}-{i}");
                let (partition, handle) =
                    topic.append_to_lane(lane as u8, Some(key.as_bytes()), &[Record::from_value("x")]).expect("append");
                let offset = handle.wait().expect("append").base_offset;
                check.waiting[lane].push_back((now_ms, partition, offset));
            }
        }
        for _ in 0..tick.polls {
            for d in cursor.poll(1).expect("poll") {
                check.deliver(now_ms, &d)?;
            }
        }
        clock.advance_ms(1);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn starvation_bound_holds(ticks in prop::collection::vec(tick_strategy(), 20..80), aging_ms in 1i64..8) {
        run_starvation(&ticks, aging_ms)?;
    }
}

#[derive(Clone, Debug)]
enum Op {
    Produce { lane: u8, count: u8 },
    Poll { max: u8 },
    Ack { pick: usize },
    Nack { pick: usize, delay_ms: Option<u16> },
    Advance { ms: u16 },
    Crash,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..2, 1u8..4).prop_map(|(lane, count)| Op::Produce { lane, count }),
        4 => (1u8..5).prop_map(|max| Op::Poll { max }),
        3 => any::<usize>().prop_map(|pick| Op::Ack { pick }),
        2 => (any::<usize>(), prop::option::of(0u16..300)).prop_map(|(pick, delay_ms)| Op::Nack { pick, delay_ms }),
        2 => (1u16..1_500).prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::Crash),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Ready,
    Leased,
    Acked,
    DeadLettered,
}

#[derive(Clone, Debug)]
struct Message {
    status: Status,
    failures: u32,
    visible_at_ms: i64,
    lease_deadline_ms: i64,
}

type Key = (u8, u32, u64);

struct Harness {
    dir: tempfile::TempDir,
    clock: Arc<ManualClock>,
    config: PriorityCursorConfig,
    store: Option<Store>,
    cursor: Option<Arc<PriorityCursor>>,
    model: BTreeMap<Key, Message>,
    leases: Vec<Delivery>,
}

impl Harness {
    fn new() -> Self {
        let dir = tempdir();
        let clock = Arc::new(ManualClock::new(START_MS));
        let store = open(dir.path(), &clock);
        store.create_priority_topic("m", 2, topic_config()).expect("create");
        let config = PriorityCursorConfig {
            lease_ms: 1_000,
            max_deliveries: 3,
            max_in_flight: 6,
            backoff: BackoffConfig { base_ms: 100, factor: 2.0, max_ms: 400, jitter: 0.5, seed: 3 },
            ..PriorityCursorConfig::default()
        };
        let cursor = store.priority_cursor("m", "c", config.clone()).expect("cursor");
        Harness {
            dir,
            clock,
            config,
            store: Some(store),
            cursor: Some(cursor),
            model: BTreeMap::new(),
            leases: Vec::new(),
        }
    }

    fn cursor(&self) -> &PriorityCursor {
        self.cursor.as_ref().expect("open")
    }

    fn store(&self) -> &Store {
        self.store.as_ref().expect("open")
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Produce { lane, count } => self.produce(*lane, *count),
            Op::Poll { max } => self.poll(usize::from(*max))?,
            Op::Ack { pick } => self.settle(*pick, None)?,
            Op::Nack { pick, delay_ms } => self.settle(*pick, Some(delay_ms.map(u64::from)))?,
            Op::Advance { ms } => self.clock.advance_ms(i64::from(*ms)),
            Op::Crash => self.crash(),
        }
        Ok(())
    }

    fn produce(&mut self, lane: u8, count: u8) {
        let topic = self.store().priority_topic("m").expect("topic");
        for _ in 0..count {
            let (partition, handle) = topic.append_to_lane(lane, None, &[Record::from_value("v")]).expect("append");
            let offset = handle.wait().expect("append").base_offset;
            let message = Message { status: Status::Ready, failures: 0, visible_at_ms: 0, lease_deadline_ms: 0 };
            self.model.insert((lane, partition, offset), message);
        }
    }

    /// Applies one failure to the model, as the cursor must.
    fn fail_in_model(&mut self, key: Key, delay_ms: Option<u64>) {
        let now_ms = self.clock.now_ms();
        let backoff = self.config.backoff.clone();
        let max_deliveries = self.config.max_deliveries;
        let message = self.model.get_mut(&key).expect("known message");
        message.failures += 1;
        if message.failures >= max_deliveries {
            message.status = Status::DeadLettered;
            return;
        }
        let sample = backoff.jitter_sample(key.0, key.1, key.2, message.failures);
        let delay_ms = delay_ms.unwrap_or_else(|| backoff.delay_ms(message.failures, sample));
        message.status = Status::Ready;
        message.visible_at_ms = now_ms + delay_ms as i64;
    }

    fn poll(&mut self, max: usize) -> Result<(), TestCaseError> {
        let now_ms = self.clock.now_ms();
        let expired: Vec<Key> = self
            .model
            .iter()
            .filter(|(_, m)| m.status == Status::Leased && m.lease_deadline_ms <= now_ms)
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            self.fail_in_model(key, None);
            self.leases.retain(|d| (d.lane, d.partition, d.offset) != key);
        }
        let deliveries = self.cursor().poll(max).expect("poll");
        prop_assert!(deliveries.len() <= max);
        prop_assert!(self.leases.len() + deliveries.len() <= self.config.max_in_flight as usize);
        for d in deliveries {
            let key = (d.lane, d.partition, d.offset);
            let message = self.model.get_mut(&key).expect("delivered message exists");
            prop_assert_eq!(message.status, Status::Ready, "{:?} delivered while {:?}", key, message.status);
            prop_assert!(message.visible_at_ms <= now_ms, "{key:?} delivered before its backoff ended");
            prop_assert_eq!(d.delivery_count, message.failures + 1);
            message.status = Status::Leased;
            message.lease_deadline_ms = now_ms + self.config.lease_ms as i64;
            self.leases.push(d);
        }
        Ok(())
    }

    fn settle(&mut self, pick: usize, nack: Option<Option<u64>>) -> Result<(), TestCaseError> {
        if self.leases.is_empty() {
            return Ok(());
        }
        let d = self.leases.remove(pick % self.leases.len());
        let key = (d.lane, d.partition, d.offset);
        match nack {
            None => {
                self.cursor().ack(&d).expect("ack of a held lease");
                self.model.get_mut(&key).expect("known").status = Status::Acked;
            }
            Some(delay_ms) => {
                self.cursor().nack(&d, delay_ms, "model nack").expect("nack of a held lease");
                self.fail_in_model(key, delay_ms);
            }
        }
        Ok(())
    }

    fn crash(&mut self) {
        self.cursor = None;
        self.store = None;
        let store = open(self.dir.path(), &self.clock);
        self.cursor = Some(store.priority_cursor("m", "c", self.config.clone()).expect("reopen cursor"));
        self.store = Some(store);
        for d in self.leases.drain(..) {
            // Leases are not durable; the failed count is what was written.
            self.model.get_mut(&(d.lane, d.partition, d.offset)).expect("known").status = Status::Ready;
        }
    }

    /// Delivers and acks everything that is left, then compares the outcome with the model.
    fn drain_and_check(&mut self) -> Result<(), TestCaseError> {
        while !self.leases.is_empty() {
            self.settle(0, None)?;
        }
        for _ in 0..200 {
            self.clock.advance_ms(500);
            self.poll(6)?;
            while !self.leases.is_empty() {
                self.settle(0, None)?;
            }
            if self.model.values().all(|m| matches!(m.status, Status::Acked | Status::DeadLettered)) {
                break;
            }
        }
        prop_assert!(self.model.values().all(|m| matches!(m.status, Status::Acked | Status::DeadLettered)));
        prop_assert!(self.cursor().poll(10).expect("poll").is_empty(), "nothing left to deliver");
        self.check_dlq()
    }

    fn check_dlq(&self) -> Result<(), TestCaseError> {
        let mut letters = Vec::new();
        let topic = self.store().priority_topic("m").expect("topic");
        for partition in topic.dlq().partitions() {
            for record in partition.read_records(0, 1 << 24).expect("read dlq") {
                let letter = DeadLetter::from_headers(&record.headers).expect("metadata");
                prop_assert_eq!(letter.partition, partition.id());
                prop_assert_eq!(letter.delivery_count, self.config.max_deliveries);
                letters.push((letter.lane, letter.partition, letter.offset));
            }
        }
        letters.sort_unstable();
        let expected: Vec<Key> =
            self.model.iter().filter(|(_, m)| m.status == Status::DeadLettered).map(|(k, _)| *k).collect();
        prop_assert_eq!(letters, expected);
        for lane in 0..2u8 {
            for partition in 0..2u32 {
                let end = self.store().partition(&format!("m.p{lane}"), partition).expect("lane").end_offset();
                prop_assert_eq!(self.cursor().committed_offset(lane, partition).expect("committed"), end);
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn cursor_matches_model(ops in prop::collection::vec(op_strategy(), 1..40)) {
        let mut harness = Harness::new();
        for op in &ops {
            harness.apply(op)?;
        }
        harness.drain_and_check()?;
    }
}
