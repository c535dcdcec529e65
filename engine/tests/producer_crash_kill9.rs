//! A real crash test of idempotent producers: the test re-executes its own binary as a
//! child process that runs the ignored test [`kill9_child`], which opens the store
//! (`fsync = always`) and sends batches of logical records (`r-<n>`) for a producer id and
//! epoch and from a sequence that the parent passes through the environment, keeping a few
//! batches in flight and printing one flushed stdout line per acknowledged batch. The parent
//! SIGKILLs the child at a seeded random moment (after a random number of acks plus a
//! random jitter, so also during open, recovery, rolls and snapshot writes), over and over
//! on the same directory.
//!
//! Between rounds the batches the parent did not see acknowledged are re-sent with the same
//! producer id, epoch and sequence, together with some it did see acknowledged: either by
//! the parent itself, or by the next child, which starts a little before the first unacked
//! batch. Every answer must be either `duplicate = true` with the original offsets (the
//! batch reached the log before the kill) or a fresh append at the log end (it never did),
//! and an acknowledged batch re-sent outside the five-batch window must be rejected as a
//! `DuplicateSequence`. At the end every logical record is in the log exactly once, in
//! order, so record `n` sits at offset `n` and every acknowledgement ever printed names
//! exactly those offsets.
//!
//! The seed is printed; set `RILL_KILL9_SEED` to replay a run. The child protocol uses only
//! the test binary's libtest arguments (`--exact <name> --ignored --nocapture`), so the test
//! also works under `cargo nextest`, which runs the same binary.

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use rill_engine::io::fault::splitmix64;
use rill_engine::{Compression, Error, FsyncPolicy, ProducerFields, Record, Store, StoreConfig, TopicConfig};

const TOPIC: &str = "kill9";
/// Name of the child-mode test, as libtest knows it.
const CHILD_TEST: &str = "kill9_child";
const ENV_DIR: &str = "RILL_KILL9_DIR";
const ENV_PRODUCER_ID: &str = "RILL_KILL9_PRODUCER_ID";
const ENV_EPOCH: &str = "RILL_KILL9_EPOCH";
const ENV_NEXT_SEQUENCE: &str = "RILL_KILL9_NEXT_SEQUENCE";
const ENV_PLAN_SEED: &str = "RILL_KILL9_PLAN_SEED";
const ENV_SEED: &str = "RILL_KILL9_SEED";

/// Kill rounds on the same directory.
const ROUNDS: usize = 40;
/// Batches a child keeps in flight (sent, not yet acknowledged).
const IN_FLIGHT: usize = 3;
/// Remembered batches per producer (the engine's window).
const WINDOW: usize = rill_engine::producer::state::BATCHES_PER_PRODUCER_MAX;
/// How far before the first unacknowledged batch a re-sending child may start: its first
/// batch must still be inside the window, whatever of its in-flight batches reached the log.
const CHILD_RESEND_BACK_MAX: usize = WINDOW - IN_FLIGHT;
/// Batches in the plan; no run gets near the end.
const PLAN_BATCHES: usize = 5_000;
/// A child stops by itself after this many batches if the parent has not killed it.
const CHILD_BATCHES_MAX: usize = 200;
/// The parent kills a child after reading up to this many acknowledgements.
const ACKS_BEFORE_KILL_MAX: u64 = 30;
const JITTER_MICROS_MAX: u64 = 1_500;

const _: () = assert!(IN_FLIGHT < WINDOW);

/// The logical records split into batches of 1 to 4 records: batch `i` holds records
/// `first(i)..first(i + 1)` and carries sequence `first(i)` (one producer, one epoch).
struct Plan {
    firsts: Vec<u64>,
}

impl Plan {
    fn new(seed: u64) -> Self {
        let mut rng = seed;
        let mut firsts = Vec::with_capacity(PLAN_BATCHES + 1);
        let mut next = 0;
        for _ in 0..=PLAN_BATCHES {
            firsts.push(next);
            next += 1 + splitmix64(&mut rng) % 4;
        }
        Plan { firsts }
    }

    fn first(&self, batch: usize) -> u64 {
        self.firsts[batch]
    }

    fn count(&self, batch: usize) -> u64 {
        self.firsts[batch + 1] - self.firsts[batch]
    }

    fn sequence(&self, batch: usize) -> i32 {
        i32::try_from(self.first(batch)).expect("the plan stays far below i32::MAX records")
    }

    fn records(&self, batch: usize) -> Vec<Record> {
        (self.first(batch)..self.first(batch + 1)).map(|n| Record::from_value(format!("r-{n}"))).collect()
    }

    fn batch_starting_at(&self, sequence: u64) -> Option<usize> {
        self.firsts.binary_search(&sequence).ok()
    }
}

fn store_config() -> StoreConfig {
    StoreConfig { retention_check_interval_ms: None, ..StoreConfig::default() }
}

fn topic_config() -> TopicConfig {
    TopicConfig {
        fsync: FsyncPolicy::Always,
        // Small segments: a kill often lands in a roll, with its snapshot write.
        segment_size_bytes: 4096,
        index_interval_bytes: 256,
        index_size_bytes: 4096,
        ..TopicConfig::default()
    }
}

fn env_value<T: FromStr>(name: &str) -> T {
    let text = std::env::var(name).unwrap_or_else(|_| panic!("{name} is set by the parent"));
    text.parse().unwrap_or_else(|_| panic!("{name}={text} parses"))
}

/// Child mode: sends batches from the sequence the parent names until killed, printing one
/// line per acknowledged batch. Does nothing unless started by [`kill9_rounds`].
#[test]
#[ignore = "child mode of kill9_rounds, which starts it in a separate process"]
fn kill9_child() {
    let Ok(dir) = std::env::var(ENV_DIR) else {
        return;
    };
    let producer_id: i64 = env_value(ENV_PRODUCER_ID);
    let producer_epoch: i16 = env_value(ENV_EPOCH);
    let plan = Plan::new(env_value(ENV_PLAN_SEED));
    let next_sequence: u64 = env_value(ENV_NEXT_SEQUENCE);
    let start = plan.batch_starting_at(next_sequence).expect("the parent names the sequence of a batch");
    let store = Store::open(&dir, store_config()).expect("the child opens the store");
    let partition = store.partition(TOPIC, 0).expect("the topic exists");
    let mut stdout = std::io::stdout().lock();
    let mut in_flight = VecDeque::new();
    let mut ack = |batch: usize, handle: rill_engine::AppendHandle| {
        let info = handle.wait().expect("the append is acknowledged");
        writeln!(
            stdout,
            "ack batch={batch} first={} count={} base={} last={} dup={}",
            plan.first(batch),
            plan.count(batch),
            info.base_offset,
            info.last_offset,
            u8::from(info.duplicate)
        )
        .expect("write an ack line");
        stdout.flush().expect("flush the ack line");
    };
    for batch in start..start + CHILD_BATCHES_MAX {
        if in_flight.len() == IN_FLIGHT {
            let (acked, handle) = in_flight.pop_front().expect("in-flight batches");
            ack(acked, handle);
        }
        let fields = ProducerFields { producer_id, producer_epoch, base_sequence: plan.sequence(batch) };
        let handle = partition.append_producer_records(fields, &plan.records(batch), Compression::None);
        in_flight.push_back((batch, handle.expect("the batch is accepted")));
    }
    while let Some((batch, handle)) = in_flight.pop_front() {
        ack(batch, handle);
    }
    drop(partition);
    store.close().expect("the child closes the store");
}

/// One acknowledgement line of a child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ack {
    batch: usize,
    first: u64,
    count: u64,
    base_offset: u64,
    last_offset: u64,
    duplicate: bool,
}

/// Parses an ack line. libtest may print `test kill9_child ... ` before the child's first
/// line without a newline, so the ack may start anywhere in the line.
fn parse_ack(line: &str) -> Option<Ack> {
    let rest = &line[line.find("ack batch=")? + "ack ".len()..];
    let mut fields = BTreeMap::new();
    for part in rest.split_whitespace() {
        let (key, value) = part.split_once('=')?;
        fields.insert(key, value.parse::<u64>().ok()?);
    }
    Some(Ack {
        batch: usize::try_from(*fields.get("batch")?).ok()?,
        first: *fields.get("first")?,
        count: *fields.get("count")?,
        base_offset: *fields.get("base")?,
        last_offset: *fields.get("last")?,
        duplicate: *fields.get("dup")? == 1,
    })
}

/// What the parent knows across rounds.
struct Parent {
    dir: tempfile::TempDir,
    plan_seed: u64,
    plan: Plan,
    producer_id: i64,
    producer_epoch: i16,
    rng: u64,
    /// Offsets of every acknowledged batch.
    acked: BTreeMap<usize, (u64, u64)>,
    /// Batches below this are acknowledged.
    acked_end: usize,
    /// No batch at or above this can be in the log.
    maybe_end: usize,
    /// Re-sends answered as duplicates, appended fresh, and rejected as too old.
    duplicates: usize,
    fresh_resends: usize,
    too_old: usize,
}

impl Parent {
    fn new(seed: u64) -> Self {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let store = Store::open(dir.path(), store_config()).expect("open the store");
        store.create_topic(TOPIC, topic_config()).expect("create the topic");
        let identity = store.init_producer(None).expect("init the producer");
        store.close().expect("close the store");
        let mut rng = seed;
        let plan_seed = splitmix64(&mut rng);
        Parent {
            dir,
            plan_seed,
            plan: Plan::new(plan_seed),
            producer_id: identity.producer_id,
            producer_epoch: identity.producer_epoch,
            rng,
            acked: BTreeMap::new(),
            acked_end: 0,
            maybe_end: 0,
            duplicates: 0,
            fresh_resends: 0,
            too_old: 0,
        }
    }

    fn random(&mut self, below: u64) -> u64 {
        splitmix64(&mut self.rng) % below
    }

    /// Checks an acknowledgement (from a child or the parent) and remembers its offsets.
    /// Every record `n` ends up at offset `n`, so the offsets are known in advance.
    fn note_ack(&mut self, ack: Ack) {
        let (first, count) = (self.plan.first(ack.batch), self.plan.count(ack.batch));
        assert_eq!((ack.first, ack.count), (first, count), "the ack names the planned batch: {ack:?}");
        let offsets = (ack.base_offset, ack.last_offset);
        assert_eq!(offsets, (first, first + count - 1), "record n is at offset n: {ack:?}");
        self.duplicates += usize::from(ack.duplicate);
        if let Some(&original) = self.acked.get(&ack.batch) {
            assert!(ack.duplicate, "batch {} was appended a second time: {ack:?}", ack.batch);
            assert_eq!(offsets, original, "a duplicate is answered with the original offsets");
        }
        self.acked.insert(ack.batch, offsets);
    }

    /// Runs one child from batch `start`, kills it after `acks_before_kill` acks and a
    /// jitter, and returns the acks it printed (all of them, read to the end of its output)
    /// and whether the kill ended it (rather than the child finishing first).
    fn run_child(&mut self, start: usize, acks_before_kill: u64, jitter: Duration) -> (Vec<Ack>, bool) {
        let exe = std::env::current_exe().expect("path of the test binary");
        let mut child = Command::new(exe)
            .args(["--exact", CHILD_TEST, "--ignored", "--nocapture", "--test-threads", "1"])
            .env(ENV_DIR, self.dir.path())
            .env(ENV_PRODUCER_ID, self.producer_id.to_string())
            .env(ENV_EPOCH, self.producer_epoch.to_string())
            .env(ENV_NEXT_SEQUENCE, self.plan.first(start).to_string())
            .env(ENV_PLAN_SEED, self.plan_seed.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the child");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut acks = Vec::new();
        let mut lines = Vec::new();
        while (acks.len() as u64) < acks_before_kill {
            match read_line(&mut stdout) {
                Some(line) => {
                    if let Some(ack) = parse_ack(&line) {
                        acks.push(ack);
                    }
                    lines.push(line);
                }
                None => break,
            }
        }
        // The jitter only moves the kill to a random moment; nothing waits on it.
        let deadline = Instant::now() + jitter;
        while Instant::now() < deadline {
            std::hint::spin_loop();
        }
        child.kill().expect("SIGKILL the child");
        // Everything printed before the kill is still in the pipe.
        while let Some(line) = read_line(&mut stdout) {
            if let Some(ack) = parse_ack(&line) {
                acks.push(ack);
            }
            lines.push(line);
        }
        let status = child.wait().expect("reap the child");
        check_child_exit(&mut child, status, &lines);
        (acks, status.code().is_none())
    }

    /// Re-sends, as the parent, every batch that may or may not be in the log, then some
    /// acknowledged ones; closes the store cleanly or drops it.
    fn resolve(&mut self) {
        let store = Store::open(self.dir.path(), store_config()).expect("the parent opens the store");
        let partition = store.partition(TOPIC, 0).expect("the topic exists");
        let mut fresh = false;
        for batch in self.acked_end..self.maybe_end {
            let end_before = partition.end_offset();
            let info = self.send(&partition, batch).expect("a re-sent batch is accepted");
            if info.duplicate {
                assert!(!fresh, "batch {batch} is in the log although an earlier one was not");
            } else {
                fresh = true;
                self.fresh_resends += 1;
                assert_eq!(info.base_offset, end_before, "a fresh batch goes to the log end");
            }
            self.note_ack(Ack {
                batch,
                first: self.plan.first(batch),
                count: self.plan.count(batch),
                base_offset: info.base_offset,
                last_offset: info.last_offset,
                duplicate: info.duplicate,
            });
        }
        self.acked_end = self.maybe_end;
        // Some acknowledged batches again: the last five are duplicates, older ones too old.
        let last_batch = self.acked_end.checked_sub(1);
        for batch in self.acked_end.saturating_sub(WINDOW + 2)..self.acked_end {
            if self.random(2) == 0 {
                continue;
            }
            let last_batch = last_batch.expect("an acknowledged batch exists");
            match self.send(&partition, batch) {
                Ok(info) => {
                    assert!(last_batch - batch < WINDOW, "batch {batch} is older than the window: {info:?}");
                    assert!(info.duplicate, "an acknowledged batch is not appended again");
                    assert_eq!(Some(&(info.base_offset, info.last_offset)), self.acked.get(&batch));
                }
                Err(Error::DuplicateSequence { received, .. }) => {
                    assert!(last_batch - batch >= WINDOW, "batch {batch} is inside the window");
                    assert_eq!(received, self.plan.sequence(batch));
                    self.too_old += 1;
                }
                Err(e) => panic!("re-sending acknowledged batch {batch}: {e}"),
            }
        }
        drop(partition);
        if self.random(2) == 0 {
            store.close().expect("clean close");
        } else {
            drop(store);
        }
    }

    fn send(&self, partition: &rill_engine::Partition, batch: usize) -> rill_engine::Result<rill_engine::AppendInfo> {
        let fields = ProducerFields {
            producer_id: self.producer_id,
            producer_epoch: self.producer_epoch,
            base_sequence: self.plan.sequence(batch),
        };
        partition.append_producer_records(fields, &self.plan.records(batch), Compression::None)?.wait()
    }

    /// Every planned record below the end of the last resolved batch is in the log exactly
    /// once, in order, and nothing else is.
    fn verify(&self) {
        let store = Store::open(self.dir.path(), store_config()).expect("open for the final check");
        let partition = store.partition(TOPIC, 0).expect("the topic exists");
        let end = self.plan.first(self.acked_end);
        assert_eq!(partition.end_offset(), end, "the log ends after the last batch");
        let mut offset = 0;
        while offset < end {
            for record in partition.read_records(offset, 1 << 20).expect("read the log") {
                assert_eq!(record.offset, offset, "offsets are dense");
                let value = record.value.expect("records have values");
                assert_eq!(&value[..], format!("r-{offset}").as_bytes(), "record {offset} once, in order");
                offset += 1;
            }
        }
        drop(partition);
        store.close().expect("close after the final check");
    }
}

/// Reads one complete line; a line cut short by the kill (no newline) counts as unseen.
fn read_line(reader: &mut BufReader<ChildStdout>) -> Option<String> {
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) if line.ends_with('\n') => Some(line.trim_end().to_string()),
        Ok(_) => None,
    }
}

/// A killed child is fine; one that exited by itself must have succeeded.
fn check_child_exit(child: &mut Child, status: std::process::ExitStatus, lines: &[String]) {
    if status.code().is_none() || status.success() {
        return;
    }
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        drop(pipe.read_to_string(&mut stderr));
    }
    panic!("the child failed ({status}):\nstdout:\n{}\nstderr:\n{stderr}", lines.join("\n"));
}

fn seed() -> u64 {
    match std::env::var(ENV_SEED) {
        Ok(text) => text.parse().expect("RILL_KILL9_SEED is a u64"),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64),
    }
}

/// At least 20 children are SIGKILLed at random moments on one directory; after re-sends
/// of unacknowledged (and some acknowledged) batches with the same producer id, epoch and
/// sequences, every logical record is in the log exactly once, in order.
#[test]
fn kill9_rounds() {
    let seed = seed();
    eprintln!("kill9 seed = {seed} (set {ENV_SEED}={seed} to replay)");
    let started = Instant::now();
    let mut parent = Parent::new(seed);
    let mut kills = 0;
    for round in 0..ROUNDS {
        // Either the next child re-sends (starting a little before the first unacked
        // batch), or the parent does after this round's kill.
        let child_resends = parent.random(2) == 0;
        let back = if child_resends { parent.random(CHILD_RESEND_BACK_MAX as u64 + 1) as usize } else { 0 };
        let start = parent.acked_end.saturating_sub(back);
        let acks_before_kill = parent.random(ACKS_BEFORE_KILL_MAX + 1);
        let jitter = Duration::from_micros(parent.random(JITTER_MICROS_MAX));
        let (acks, killed) = parent.run_child(start, acks_before_kill, jitter);
        for (i, ack) in acks.iter().enumerate() {
            assert_eq!(ack.batch, start + i, "round {round}: a child acknowledges its batches in order");
            parent.note_ack(*ack);
        }
        // A child sends batch i only after acknowledging batch i - IN_FLIGHT.
        let sent_end = (acks.last().map_or(start, |ack| ack.batch + 1) + IN_FLIGHT).min(start + CHILD_BATCHES_MAX);
        parent.acked_end = parent.acked_end.max(acks.last().map_or(0, |ack| ack.batch + 1));
        parent.maybe_end = parent.maybe_end.max(sent_end).max(parent.acked_end);
        assert!(parent.maybe_end <= parent.acked_end + IN_FLIGHT, "the resend window covers what may be in the log");
        kills += usize::from(killed);
        if !child_resends || round == ROUNDS - 1 {
            parent.resolve();
        }
    }
    parent.verify();
    assert!(kills >= 20, "only {kills} children were killed before finishing");
    assert!(parent.acked_end > ROUNDS, "the rounds made progress: {} batches", parent.acked_end);
    eprintln!(
        "{kills} kills, {} batches; re-sends: {} duplicates, {} fresh, {} too old; {:?}",
        parent.acked_end,
        parent.duplicates,
        parent.fresh_resends,
        parent.too_old,
        started.elapsed()
    );
}
