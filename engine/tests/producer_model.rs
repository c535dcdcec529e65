//! Model-based test of idempotent producers on one partition: proptest generates sequences
//! of producer operations (new batches, retries of recent batches, sequence gaps, epoch
//! bumps, sends from a fenced epoch, clean restarts and crashes) for up to three
//! transactional producers and runs each against the real engine and against an in-memory
//! model.
//!
//! The model keeps the log as a list of producer batches. The partition's producer state is
//! derived from that list exactly as the engine defines it (per producer: the epoch of its
//! latest batch and that epoch's last five batches); the registry's epochs are tracked
//! separately, because a bump fences the old epoch before the new one has written
//! anything. From these the model predicts the exact outcome of every send: an append at
//! the next offsets, a duplicate answered with the original offsets, or the typed error
//! (`OutOfOrderSequence` with the expected sequence, `DuplicateSequence`,
//! `ProducerFenced` with the current epoch, `UnknownProducerId`). After every operation
//! the log must hold exactly the model's records: each logical record once, in order.
//!
//! Segments are small, so rolls (and the producer snapshots written at each roll) happen
//! often, and restarts rebuild the state from a snapshot plus the log after it. Crashes drop
//! the store without closing it and then cut every file back to what a power loss may leave
//! (`FaultStorage::crash`). Under `fsync = always` nothing acknowledged may be lost; under
//! `fsync = never` a suffix of whole batches may vanish, after which each producer re-sends
//! its lost batches of the current epoch, as a client would, and they are appended again.

use std::sync::Arc;

use proptest::prelude::*;
use rill_engine::io::fault::{CrashMode, FaultStorage};
use rill_engine::producer::state::BATCHES_PER_PRODUCER_MAX;
use rill_engine::{
    AppendInfo, Compression, Error, FsyncPolicy, ManualClock, Partition, ProducerFields, Record, Store, StoreConfig,
    TopicConfig,
};

const TOPIC: &str = "producers";
const PRODUCERS: usize = 3;
/// A retry picks one of the producer's last this many batches: one more than the log
/// remembers, so retries older than the window are generated too.
const RETRY_CHOICES: usize = BATCHES_PER_PRODUCER_MAX + 1;
const CLOCK_START_MS: i64 = 1_700_000_000_000;

/// What a simulated power loss does to unsynced bytes.
#[derive(Clone, Copy, Debug)]
enum Crash {
    Drop,
    Keep,
    Tear(u64),
}

#[derive(Clone, Debug)]
enum Op {
    /// Producer `producer` sends its next `records` records with its current epoch.
    NewBatch {
        producer: usize,
        records: u32,
    },
    /// Producer `producer` re-sends, exactly as sent, its `index`-th most recent batch
    /// (counted among its last [`RETRY_CHOICES`] successful sends).
    RetryOneOfLast {
        producer: usize,
        index: usize,
    },
    /// Producer `producer` sends one record `skip` sequence numbers past its next one.
    Gap {
        producer: usize,
        skip: i32,
    },
    /// Producer `producer` re-initialises its transactional id: a new epoch, sequences
    /// restart at 0, and the previous epoch is fenced.
    BumpEpoch {
        producer: usize,
    },
    /// The fenced previous instance of `producer` (if it was ever bumped) sends its next batch.
    UseOldEpoch {
        producer: usize,
    },
    CloseReopen,
    CrashReopen(Crash),
}

/// The outcome the model predicts for one send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Append,
    Duplicate { base_offset: u64, last_offset: u64 },
    OutOfOrder { expected: i32 },
    DuplicateSequence,
    Fenced { current_epoch: i16 },
    UnknownProducerId,
}

/// A batch as a producer sent it (enough to re-send it byte for byte).
#[derive(Clone, Debug)]
struct SentBatch {
    epoch: i16,
    base_sequence: i32,
    values: Vec<String>,
}

/// One producer batch in the model's log.
#[derive(Clone, Debug)]
struct LogBatch {
    producer: usize,
    epoch: i16,
    first_sequence: i32,
    last_sequence: i32,
    base_offset: u64,
    values: Vec<String>,
}

/// The client side of one producer.
#[derive(Clone, Debug)]
struct Client {
    transactional_id: String,
    producer_id: i64,
    epoch: i16,
    next_sequence: i32,
    /// The previous instance (epoch and its next sequence) after a bump.
    fenced: Option<(i16, i32)>,
    /// Every batch sent successfully (appended or answered as a duplicate), oldest first.
    sent: Vec<SentBatch>,
}

/// The log and the registry as the model sees them.
#[derive(Debug, Default)]
struct Model {
    log: Vec<LogBatch>,
    end: u64,
    /// Epoch per producer as the store's registry knows it (bumped by re-initialisation).
    registry_epochs: Vec<i16>,
}

impl Model {
    /// The engine's verdict on a batch, derived from the batches in the log.
    fn predict(&self, producer: usize, epoch: i16, base_sequence: i32, count: u32) -> Expect {
        let registry_epoch = self.registry_epochs[producer];
        if epoch < registry_epoch {
            return Expect::Fenced { current_epoch: registry_epoch };
        }
        let mine: Vec<&LogBatch> = self.log.iter().filter(|b| b.producer == producer).collect();
        let Some(latest) = mine.last() else {
            return if base_sequence == 0 { Expect::Append } else { Expect::UnknownProducerId };
        };
        if epoch < latest.epoch {
            return Expect::Fenced { current_epoch: latest.epoch };
        }
        if epoch > latest.epoch {
            return if base_sequence == 0 { Expect::Append } else { Expect::OutOfOrder { expected: 0 } };
        }
        let same_epoch: Vec<&&LogBatch> = mine.iter().filter(|b| b.epoch == epoch).collect();
        let window = &same_epoch[same_epoch.len().saturating_sub(BATCHES_PER_PRODUCER_MAX)..];
        let last_sequence = base_sequence + count as i32 - 1;
        if let Some(original) =
            window.iter().find(|b| b.first_sequence == base_sequence && b.last_sequence == last_sequence)
        {
            return Expect::Duplicate {
                base_offset: original.base_offset,
                last_offset: original.base_offset + original.values.len() as u64 - 1,
            };
        }
        let expected = window.last().expect("the producer's latest batch has its epoch").last_sequence + 1;
        if base_sequence == expected {
            Expect::Append
        } else if base_sequence > expected {
            Expect::OutOfOrder { expected }
        } else {
            Expect::DuplicateSequence
        }
    }

    fn values(&self) -> Vec<String> {
        self.log.iter().flat_map(|b| b.values.iter().cloned()).collect()
    }

    /// Keeps only the batches below `end` (a crash lost the rest).
    fn truncate(&mut self, end: u64) {
        let keep = self.log.iter().take_while(|b| b.base_offset + b.values.len() as u64 <= end).count();
        self.log.truncate(keep);
        let kept_end = self.log.last().map_or(0, |b| b.base_offset + b.values.len() as u64);
        assert_eq!(kept_end, end, "recovery cuts the log at a batch boundary");
        self.end = end;
    }
}

/// The run's fixed parameters.
#[derive(Clone, Copy, Debug)]
struct RunConfig {
    fsync: FsyncPolicy,
    segment_size_bytes: u64,
    /// Extra bytes in every record value (bigger values roll segments sooner).
    padding: usize,
}

/// The engine under test plus the model.
struct Harness {
    dir: tempfile::TempDir,
    fault: FaultStorage,
    clock: Arc<ManualClock>,
    store: Option<Store>,
    config: RunConfig,
    clients: Vec<Client>,
    model: Model,
    /// Every send's outcome, in order.
    outcomes: Vec<Expect>,
    /// Most segments the partition had after any operation.
    segments_max: usize,
    /// Batches lost in a crash and appended again when re-sent.
    resent_after_loss: usize,
}

impl Harness {
    fn new(config: RunConfig) -> Self {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let mut harness = Harness {
            dir,
            fault: FaultStorage::new(),
            clock: Arc::new(ManualClock::new(CLOCK_START_MS)),
            store: None,
            config,
            clients: Vec::new(),
            model: Model::default(),
            outcomes: Vec::new(),
            segments_max: 0,
            resent_after_loss: 0,
        };
        let store = harness.open_store();
        let topic = TopicConfig {
            fsync: config.fsync,
            segment_size_bytes: config.segment_size_bytes,
            segment_ms: None,
            retention_ms: None,
            index_interval_bytes: 256,
            index_size_bytes: 4096,
            ..TopicConfig::default()
        };
        store.create_topic(TOPIC, topic).expect("create the topic");
        for k in 0..PRODUCERS {
            let transactional_id = format!("producer-{k}");
            let identity = store.init_producer(Some(&transactional_id)).expect("init a producer");
            harness.clients.push(Client {
                transactional_id,
                producer_id: identity.producer_id,
                epoch: identity.producer_epoch,
                next_sequence: 0,
                fenced: None,
                sent: Vec::new(),
            });
            harness.model.registry_epochs.push(identity.producer_epoch);
        }
        harness.store = Some(store);
        harness
    }

    fn open_store(&self) -> Store {
        let config = StoreConfig {
            storage: Arc::new(self.fault.clone()),
            clock: Arc::clone(&self.clock) as Arc<dyn rill_engine::Clock>,
            retention_check_interval_ms: None,
            ..StoreConfig::default()
        };
        Store::open(self.dir.path(), config).expect("open the store")
    }

    fn store(&self) -> &Store {
        self.store.as_ref().expect("the store is open between operations")
    }

    fn partition(&self) -> Arc<Partition> {
        self.store().partition(TOPIC, 0).expect("the topic has partition 0")
    }

    fn value(&self, producer: usize, epoch: i16, sequence: i32) -> String {
        format!("p{producer}-e{epoch}-s{sequence}-{}", "x".repeat(self.config.padding))
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::NewBatch { producer, records } => {
                let client = &self.clients[producer];
                let (epoch, base_sequence) = (client.epoch, client.next_sequence);
                let values = (0..records as i32).map(|i| self.value(producer, epoch, base_sequence + i)).collect();
                let batch = SentBatch { epoch, base_sequence, values };
                let expect = self.send(producer, &batch);
                if matches!(expect, Expect::Append | Expect::Duplicate { .. }) {
                    let client = &mut self.clients[producer];
                    client.next_sequence += records as i32;
                    client.sent.push(batch);
                }
            }
            Op::RetryOneOfLast { producer, index } => {
                let sent = &self.clients[producer].sent;
                let choices = sent.len().min(RETRY_CHOICES);
                if choices > 0 {
                    let batch = sent[sent.len() - 1 - index % choices].clone();
                    self.send(producer, &batch);
                }
            }
            Op::Gap { producer, skip } => {
                let client = &self.clients[producer];
                let (epoch, base_sequence) = (client.epoch, client.next_sequence + skip);
                let batch =
                    SentBatch { epoch, base_sequence, values: vec![self.value(producer, epoch, base_sequence)] };
                self.send(producer, &batch);
            }
            Op::BumpEpoch { producer } => {
                let client = &self.clients[producer];
                let identity = self.store().init_producer(Some(&client.transactional_id)).expect("re-init");
                assert_eq!(identity.producer_id, client.producer_id, "a transactional id keeps its producer id");
                assert_eq!(identity.producer_epoch, client.epoch + 1, "re-initialisation bumps the epoch");
                let client = &mut self.clients[producer];
                client.fenced = Some((client.epoch, client.next_sequence));
                client.epoch = identity.producer_epoch;
                client.next_sequence = 0;
                self.model.registry_epochs[producer] = identity.producer_epoch;
            }
            Op::UseOldEpoch { producer } => {
                if let Some((epoch, base_sequence)) = self.clients[producer].fenced {
                    let batch =
                        SentBatch { epoch, base_sequence, values: vec![self.value(producer, epoch, base_sequence)] };
                    let expect = self.send(producer, &batch);
                    assert!(matches!(expect, Expect::Fenced { .. }), "an older epoch is always fenced");
                }
            }
            Op::CloseReopen => self.close_and_reopen(),
            Op::CrashReopen(crash) => self.crash_and_reopen(crash),
        }
        self.check_log();
    }

    /// Sends `batch` for `producer`, checks the engine's answer against the model's
    /// prediction and applies an append to the model. Returns the prediction.
    fn send(&mut self, producer: usize, batch: &SentBatch) -> Expect {
        let count = u32::try_from(batch.values.len()).expect("a few records");
        let expect = self.model.predict(producer, batch.epoch, batch.base_sequence, count);
        let client = &self.clients[producer];
        let fields = ProducerFields {
            producer_id: client.producer_id,
            producer_epoch: batch.epoch,
            base_sequence: batch.base_sequence,
        };
        let records: Vec<Record> = batch.values.iter().map(|v| Record::from_value(v.clone())).collect();
        let result = self
            .partition()
            .append_producer_records(fields, &records, Compression::None)
            .and_then(|handle| handle.wait());
        let what = format!("{fields:?} x{count}: expected {expect:?}, got {result:?}");
        match (expect, result) {
            (Expect::Append, Ok(AppendInfo { base_offset, last_offset, duplicate: false })) => {
                assert_eq!(
                    (base_offset, last_offset),
                    (self.model.end, self.model.end + u64::from(count) - 1),
                    "{what}"
                );
                self.model.log.push(LogBatch {
                    producer,
                    epoch: batch.epoch,
                    first_sequence: batch.base_sequence,
                    last_sequence: batch.base_sequence + count as i32 - 1,
                    base_offset,
                    values: batch.values.clone(),
                });
                self.model.end += u64::from(count);
            }
            (
                Expect::Duplicate { base_offset, last_offset },
                Ok(AppendInfo { base_offset: got_base, last_offset: got_last, duplicate: true }),
            ) => assert_eq!((got_base, got_last), (base_offset, last_offset), "{what}"),
            (Expect::OutOfOrder { expected }, Err(Error::OutOfOrderSequence { expected: got, received, .. })) => {
                assert_eq!((got, received), (expected, batch.base_sequence), "{what}");
            }
            (Expect::DuplicateSequence, Err(Error::DuplicateSequence { received, .. })) => {
                assert_eq!(received, batch.base_sequence, "{what}");
            }
            (Expect::Fenced { current_epoch }, Err(Error::ProducerFenced { epoch, current_epoch: got, .. })) => {
                assert_eq!((epoch, got), (batch.epoch, current_epoch), "{what}");
            }
            (Expect::UnknownProducerId, Err(Error::UnknownProducerId { base_sequence, .. })) => {
                assert_eq!(base_sequence, batch.base_sequence, "{what}");
            }
            _ => panic!("{what}"),
        }
        self.outcomes.push(expect);
        expect
    }

    fn close_and_reopen(&mut self) {
        let store = self.store.take().expect("the store is open");
        store.close().expect("clean close");
        let store = self.open_store();
        let report = store.partition(TOPIC, 0).expect("partition 0").recovery_report().clone();
        assert!(report.clean_shutdown, "a closed store reopens clean: {report:?}");
        self.store = Some(store);
    }

    fn crash_and_reopen(&mut self, crash: Crash) {
        drop(self.store.take());
        let mode = match crash {
            Crash::Drop => CrashMode::DropUnsynced,
            Crash::Keep => CrashMode::KeepUnsynced,
            Crash::Tear(seed) => CrashMode::TearUnsynced { seed },
        };
        self.fault.crash(mode).expect("simulate the power loss");
        self.store = Some(self.open_store());
        let partition = self.partition();
        assert!(!partition.recovery_report().clean_shutdown, "a dropped store reopens unclean");
        let end = partition.end_offset();
        drop(partition);
        if self.config.fsync == FsyncPolicy::Always || matches!(crash, Crash::Keep) {
            assert_eq!(end, self.model.end, "nothing acknowledged is lost under {:?} / {crash:?}", self.config.fsync);
            return;
        }
        assert!(end <= self.model.end, "a crash cannot add records");
        self.model.truncate(end);
        self.check_log();
        // Each producer re-sends its lost batches of the current epoch, in order; the older
        // epochs are fenced and their lost batches are gone for good.
        for producer in 0..PRODUCERS {
            let client = &self.clients[producer];
            let lost: Vec<SentBatch> =
                client
                    .sent
                    .iter()
                    .filter(|s| s.epoch == client.epoch)
                    .filter(|s| {
                        !self.model.log.iter().any(|b| {
                            b.producer == producer && b.epoch == s.epoch && b.first_sequence == s.base_sequence
                        })
                    })
                    .cloned()
                    .collect();
            for batch in lost {
                let expect = self.send(producer, &batch);
                assert_eq!(expect, Expect::Append, "a lost batch is appended again when re-sent");
                self.resent_after_loss += 1;
            }
        }
    }

    /// The partition holds exactly the model's records, each once and in order.
    fn check_log(&mut self) {
        let p = self.partition();
        self.segments_max = self.segments_max.max(p.segment_count());
        assert_eq!(p.end_offset(), self.model.end, "end offset");
        assert_eq!(p.log_start_offset(), 0, "nothing is deleted");
        let mut values = Vec::new();
        let mut offset = 0;
        while offset < p.end_offset() {
            let records = p.read_records(offset, 1 << 20).expect("read the log");
            assert!(!records.is_empty(), "reading below the end returns records");
            for record in records {
                assert_eq!(record.offset, offset, "offsets are dense");
                let value = record.value.expect("every record has a value");
                values.push(String::from_utf8(value.to_vec()).expect("values are UTF-8"));
                offset += 1;
            }
        }
        assert_eq!(values, self.model.values(), "the log holds each logical record once, in order");
    }
}

/// What a run did, for the named tests to check that their scenario happened.
#[derive(Debug)]
struct Summary {
    outcomes: Vec<Expect>,
    segments_max: usize,
    resent_after_loss: usize,
}

impl Summary {
    fn count(&self, matches: impl Fn(&Expect) -> bool) -> usize {
        self.outcomes.iter().filter(|e| matches(e)).count()
    }
}

fn run(config: RunConfig, ops: &[Op]) -> Summary {
    let mut harness = Harness::new(config);
    for op in ops {
        harness.apply(op);
    }
    if let Some(store) = harness.store.take() {
        store.close().expect("final clean close");
    }
    Summary {
        outcomes: harness.outcomes,
        segments_max: harness.segments_max,
        resent_after_loss: harness.resent_after_loss,
    }
}

fn op() -> impl Strategy<Value = Op> {
    // Producer 0 is the busiest, so it often has more batches than the log remembers.
    let producer = prop_oneof![3 => Just(0usize), 1 => Just(1), 1 => Just(2)];
    let crash = prop_oneof![Just(Crash::Drop), Just(Crash::Keep), any::<u64>().prop_map(Crash::Tear)];
    prop_oneof![
        10 => (producer.clone(), 1u32..=4).prop_map(|(producer, records)| Op::NewBatch { producer, records }),
        // The oldest choice is favoured: it is the one just outside the remembered window.
        5 => (producer.clone(), prop_oneof![3 => 0..RETRY_CHOICES, 1 => Just(RETRY_CHOICES - 1)])
            .prop_map(|(producer, index)| Op::RetryOneOfLast { producer, index }),
        2 => (producer.clone(), 1i32..=3).prop_map(|(producer, skip)| Op::Gap { producer, skip }),
        1 => producer.clone().prop_map(|producer| Op::BumpEpoch { producer }),
        1 => producer.prop_map(|producer| Op::UseOldEpoch { producer }),
        1 => Just(Op::CloseReopen),
        1 => crash.prop_map(Op::CrashReopen),
    ]
}

fn run_config() -> impl Strategy<Value = RunConfig> {
    (
        prop_oneof![Just(FsyncPolicy::Always), Just(FsyncPolicy::Never)],
        prop_oneof![3 => Just(4096u64), 1 => Just(8192), 1 => Just(1 << 20)],
        prop_oneof![1 => Just(8usize), 4 => 150usize..400],
    )
        .prop_map(|(fsync, segment_size_bytes, padding)| RunConfig { fsync, segment_size_bytes, padding })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        // Shrunk failures are kept as named regression tests below, not in a file.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Every send gets exactly the answer the model predicts, and the log holds exactly the
    /// model's records after every operation of every generated sequence.
    #[test]
    fn producers_match_model(config in run_config(), ops in proptest::collection::vec(op(), 20..50)) {
        run(config, &ops);
    }
}

// ---- Named regression tests and hand-picked scenarios --------------------------------

const SMALL: RunConfig = RunConfig { fsync: FsyncPolicy::Always, segment_size_bytes: 4096, padding: 150 };

fn batches(producer: usize, count: usize, records: u32) -> Vec<Op> {
    vec![Op::NewBatch { producer, records }; count]
}

/// Retries of all six latest batches after rolls and a crash: five are duplicates with their
/// original offsets, the sixth is a `DuplicateSequence`; the state came from a snapshot
/// plus the log after it.
#[test]
fn retries_across_rolls_and_crash() {
    let mut ops = Vec::new();
    for _ in 0..4 {
        ops.extend(batches(0, 3, 4));
        ops.extend(batches(1, 2, 1));
    }
    ops.push(Op::CrashReopen(Crash::Drop));
    ops.extend((0..RETRY_CHOICES).map(|index| Op::RetryOneOfLast { producer: 0, index }));
    ops.extend((0..RETRY_CHOICES).map(|index| Op::RetryOneOfLast { producer: 1, index }));
    ops.push(Op::CloseReopen);
    ops.extend((0..RETRY_CHOICES).map(|index| Op::RetryOneOfLast { producer: 0, index }));
    ops.extend(batches(0, 2, 2));
    let summary = run(SMALL, &ops);
    assert!(summary.segments_max >= 2, "the log rolled: {summary:?}");
    assert_eq!(summary.count(|e| matches!(e, Expect::Duplicate { .. })), 15, "{summary:?}");
    assert_eq!(summary.count(|e| *e == Expect::DuplicateSequence), 3, "{summary:?}");
}

/// After a bump, the old epoch is fenced (also across restarts, before the new epoch has
/// written anything), retries of old-epoch batches are fenced, and a gap in the new epoch
/// expects sequence 0.
#[test]
fn epoch_bump_fences_across_restarts() {
    let mut ops = batches(2, 3, 2);
    ops.push(Op::BumpEpoch { producer: 2 });
    ops.push(Op::CrashReopen(Crash::Drop));
    ops.push(Op::UseOldEpoch { producer: 2 });
    ops.push(Op::RetryOneOfLast { producer: 2, index: 0 });
    ops.push(Op::Gap { producer: 2, skip: 2 });
    ops.push(Op::CloseReopen);
    ops.push(Op::UseOldEpoch { producer: 2 });
    ops.extend(batches(2, 2, 3));
    ops.push(Op::RetryOneOfLast { producer: 2, index: 1 });
    let summary = run(SMALL, &ops);
    assert_eq!(summary.count(|e| *e == Expect::Fenced { current_epoch: 1 }), 3, "{summary:?}");
    assert_eq!(summary.count(|e| *e == Expect::OutOfOrder { expected: 0 }), 1, "{summary:?}");
    assert_eq!(summary.count(|e| matches!(e, Expect::Duplicate { .. })), 1, "{summary:?}");
}

/// A producer that never wrote to the partition gets `UnknownProducerId` for a gap, and
/// under `fsync = never` a crash that drops unsynced batches lets them be re-sent.
#[test]
fn unknown_producer_and_lost_batches_under_fsync_never() {
    let mut ops = vec![Op::Gap { producer: 1, skip: 1 }];
    ops.extend(batches(0, 8, 3));
    ops.push(Op::CrashReopen(Crash::Tear(7)));
    ops.extend(batches(0, 2, 1));
    ops.push(Op::CrashReopen(Crash::Drop));
    ops.push(Op::RetryOneOfLast { producer: 0, index: 0 });
    let summary = run(RunConfig { fsync: FsyncPolicy::Never, ..SMALL }, &ops);
    assert_eq!(summary.outcomes[0], Expect::UnknownProducerId, "{summary:?}");
    assert!(summary.resent_after_loss > 0, "the crashes lost batches: {summary:?}");
}
