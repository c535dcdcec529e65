//! A real crash: a child process appends under `fsync = always` and reports every
//! acknowledged append on stdout; the parent SIGKILLs it at a random moment, over and over on
//! the same directory, and checks that every acknowledged record survives exactly once, in
//! order, with dense offsets and intact content.
//!
//! The child is this test binary re-executed (`std::env::current_exe()`) to run only the
//! ignored test `child_appender`, with the store directory and the round number in
//! environment variables. That works the same under `cargo test` and `cargo nextest`, which
//! both run libtest binaries. Without the variables `child_appender` does nothing, so running
//! the ignored tests on their own is harmless. `RILL_KILL9_SEED=<n>` replays a kill schedule.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rill_engine::format::batch::BatchIter;
use rill_engine::io::fault::splitmix64;
use rill_engine::{Compression, FsyncPolicy, Partition, Record, Store, StoreConfig, TopicConfig};

const TOPIC: &str = "kill9";
const DIR_ENV: &str = "RILL_KILL9_CHILD_DIR";
const ROUND_ENV: &str = "RILL_KILL9_CHILD_ROUND";
const ACK_MARK: &str = "@@ack ";
const WRITERS: u64 = 3;
/// Rounds to run; at least `MIN_ROUNDS` always run, the rest while within `TIME_BUDGET`.
const ROUNDS: u64 = 30;
const MIN_ROUNDS: u64 = 20;
const TIME_BUDGET: Duration = Duration::from_secs(15);
const SIGKILL: i32 = 9;
/// A child stops on its own after this long, in case its parent died without killing it.
const CHILD_LIFETIME: Duration = Duration::from_secs(20);
/// How long the parent waits for a child to say anything before failing the test.
const SILENCE_LIMIT: Duration = Duration::from_secs(15);

fn topic_config() -> TopicConfig {
    TopicConfig {
        partitions: 1,
        fsync: FsyncPolicy::Always,
        // Small segments and indices: rolls (and so kills during a roll) happen often.
        segment_size_bytes: 4096,
        segment_ms: None,
        retention_ms: None,
        index_interval_bytes: 128,
        index_size_bytes: 1024,
        ..TopicConfig::default()
    }
}

fn store_config() -> StoreConfig {
    StoreConfig { retention_check_interval_ms: None, ..StoreConfig::default() }
}

/// Value of record `r` of batch `b` of writer `w` in round `round`.
fn value(round: u64, w: u64, b: u64, r: u64) -> Bytes {
    Bytes::from(format!("rec-{round}-{w}-{b}-{r}"))
}

/// Batch `b` of a writer holds 1 to 3 records.
fn batch_len(b: u64) -> u64 {
    1 + b % 3
}

/// Runs in the child process only (see the module doc). Opens the store, appends from
/// `WRITERS` threads until killed, and prints `@@ack <base offset> <round> <writer> <batch>`
/// after each acknowledged append, flushing every line.
#[test]
#[ignore = "child process of `sigkill_rounds_keep_every_acknowledged_record`"]
fn child_appender() {
    let Some(dir) = std::env::var_os(DIR_ENV) else { return };
    let round: u64 = std::env::var(ROUND_ENV).expect("round number").parse().expect("round is a number");
    let store = Store::open(Path::new(&dir), store_config()).expect("child: open store");
    let p = store.partition(TOPIC, 0).expect("child: partition");
    let started = Instant::now();
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let p = Arc::clone(&p);
            std::thread::spawn(move || {
                for b in 0.. {
                    if started.elapsed() > CHILD_LIFETIME {
                        return;
                    }
                    let records: Vec<_> =
                        (0..batch_len(b)).map(|r| Record::from_value(value(round, w, b, r))).collect();
                    let compression = if b % 4 == 3 { Compression::Lz4 } else { Compression::None };
                    let info = p.append_records(&records, compression).expect("child: append").wait().expect("ack");
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "{ACK_MARK}{} {round} {w} {b}", info.base_offset).expect("child: report ack");
                    out.flush().expect("child: flush ack");
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("child: writer thread");
    }
}

/// One acknowledged batch as the child reported it.
#[derive(Clone, Copy, Debug)]
struct Ack {
    base_offset: u64,
    round: u64,
    writer: u64,
    batch: u64,
}

fn parse_ack(line: &str) -> Option<Ack> {
    let rest = &line[line.find(ACK_MARK)? + ACK_MARK.len()..];
    let mut fields = rest.split_whitespace().map(str::parse::<u64>);
    let ack = Ack {
        base_offset: fields.next()?.ok()?,
        round: fields.next()?.ok()?,
        writer: fields.next()?.ok()?,
        batch: fields.next()?.ok()?,
    };
    fields.next().is_none().then_some(ack)
}

/// Kills the child if the parent fails while it runs.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Already dead or reaped in the normal course; this is only the panic path.
        drop(self.0.kill());
        drop(self.0.wait());
    }
}

/// When the parent kills the child.
#[derive(Clone, Copy, Debug)]
enum KillPlan {
    /// After this many acknowledgements.
    Acks(u64),
    /// This long after the first acknowledgement.
    SinceFirstAck(Duration),
    /// This long after spawning (possibly during start-up or recovery).
    SinceSpawn(Duration),
}

/// Runs one child until the plan says kill, SIGKILLs it, and returns every ack it printed.
fn run_round(dir: &Path, round: u64, plan: KillPlan) -> Vec<Ack> {
    let exe = std::env::current_exe().expect("path of this test binary");
    let child = Command::new(exe)
        .args(["--exact", "child_appender", "--ignored", "--nocapture", "--test-threads=1"])
        .env(DIR_ENV, dir)
        .env(ROUND_ENV, round.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let spawned = Instant::now();
    let mut child = KillOnDrop(child);
    let stdout = child.0.stdout.take().expect("child stdout");
    let mut stderr = child.0.stderr.take().expect("child stderr");
    let (lines, incoming) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut stdout = BufReader::new(stdout);
        loop {
            let mut line = String::new();
            match stdout.read_line(&mut line) {
                // A line cut by the kill has no newline: its ack is not counted.
                Ok(0) | Err(_) => return,
                Ok(_) if line.ends_with('\n') => {
                    if lines.send(line).is_err() {
                        return;
                    }
                }
                Ok(_) => return,
            }
        }
    });
    let stderr_reader = std::thread::spawn(move || {
        let mut text = String::new();
        drop(stderr.read_to_string(&mut text));
        text
    });

    let mut acks = Vec::new();
    let mut first_ack: Option<Instant> = None;
    let mut last_heard = Instant::now();
    let mut exited_early = false;
    loop {
        let deadline = match plan {
            KillPlan::Acks(n) if acks.len() as u64 >= n => break,
            KillPlan::Acks(_) => None,
            KillPlan::SinceFirstAck(delay) => first_ack.map(|t| t + delay),
            KillPlan::SinceSpawn(delay) => Some(spawned + delay),
        };
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            break;
        }
        assert!(now.duration_since(last_heard) < SILENCE_LIMIT, "round {round}: the child went silent");
        let wait = deadline.map_or(Duration::from_millis(100), |d| d - now).min(Duration::from_millis(100));
        match incoming.recv_timeout(wait) {
            Ok(line) => {
                last_heard = Instant::now();
                if let Some(ack) = parse_ack(&line) {
                    first_ack.get_or_insert_with(Instant::now);
                    acks.push(ack);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                exited_early = true;
                break;
            }
        }
    }
    child.0.kill().expect("SIGKILL the child");
    let status = child.0.wait().expect("reap the child");
    reader.join().expect("stdout reader");
    // Acks printed before the kill landed are still in the pipe: they count too.
    acks.extend(incoming.try_iter().filter_map(|line| parse_ack(&line)));
    let stderr = stderr_reader.join().expect("stderr reader");
    let killed = status.signal() == Some(SIGKILL);
    assert!(
        killed && !exited_early,
        "round {round}: the child must die by SIGKILL, not on its own ({status}); stderr:\n{stderr}"
    );
    acks
}

/// Reads every record of the partition, checking that each batch passes its CRC and decodes
/// and that offsets are dense from 0.
fn read_all(p: &Partition) -> Vec<Bytes> {
    let end = p.end_offset();
    let mut out = Vec::new();
    while (out.len() as u64) < end {
        let next = out.len() as u64;
        let bytes = p.read(next, 64 * 1024).expect("read below the end offset");
        assert!(!bytes.is_empty(), "read at {next} below end {end} returned nothing");
        for batch in BatchIter::new(bytes) {
            let batch = batch.expect("every served batch passes its header and CRC checks");
            for record in batch.records().expect("every served batch decodes") {
                assert_eq!(record.offset, out.len() as u64, "offsets are dense");
                out.push(record.value.expect("records have values"));
            }
        }
    }
    out
}

/// Opens the store and checks: every acknowledged record at its acknowledged offset with its
/// value; every record in the log one the child appended, present once, its batch whole,
/// and each (round, writer)'s batches in append order. Closes cleanly or drops (unclean).
fn verify(dir: &Path, acked: &[Ack], clean_close: bool, context: &str) {
    let store = Store::open(dir, store_config()).unwrap_or_else(|e| panic!("{context}: reopen failed: {e}"));
    let p = store.partition(TOPIC, 0).expect("partition");
    let log = read_all(&p);
    eprintln!("{context}: {} records, recovery {:?}", log.len(), p.recovery_report());
    let mut seen: HashMap<&Bytes, usize> = HashMap::new();
    let mut last_batch: HashMap<(u64, u64), u64> = HashMap::new();
    for (offset, v) in log.iter().enumerate() {
        if let Some(first) = seen.insert(v, offset) {
            panic!("{context}: {v:?} appears twice, at {first} and {offset}");
        }
        let text = std::str::from_utf8(v).unwrap_or_else(|_| panic!("{context}: value at {offset} is not UTF-8"));
        let fields: Vec<u64> = text
            .strip_prefix("rec-")
            .map(|rest| rest.split('-').filter_map(|f| f.parse().ok()).collect())
            .unwrap_or_default();
        let [round, w, b, r] = fields[..] else { panic!("{context}: unknown value {text:?} at {offset}") };
        if r == 0 {
            if let Some(previous) = last_batch.insert((round, w), b) {
                assert!(previous < b, "{context}: round {round} writer {w}: batch {b} after {previous}");
            }
            for r in 1..batch_len(b) {
                let found = log.get(offset + r as usize);
                assert_eq!(found, Some(&value(round, w, b, r)), "{context}: batch {round}-{w}-{b} is whole");
            }
        }
    }
    for ack in acked {
        for r in 0..batch_len(ack.batch) {
            let offset = (ack.base_offset + r) as usize;
            let expected = value(ack.round, ack.writer, ack.batch, r);
            assert_eq!(log.get(offset), Some(&expected), "{context}: acknowledged record at offset {offset}");
        }
    }
    drop(p);
    if clean_close {
        store.close().expect("clean close");
    }
}

/// At least `MIN_ROUNDS` rounds on one directory: a child appends from `WRITERS` threads under
/// `fsync = always` and is SIGKILLed after a seeded random number of acks, a random delay
/// after its first ack, or a random delay after spawning (which may hit start-up or
/// recovery); the next round reopens the killed store (the parent verifies in between every
/// third round, alternating clean and unclean closes). At the end every acknowledged record
/// of every round is present once, at its acknowledged offset, with intact content.
#[test]
fn sigkill_rounds_keep_every_acknowledged_record() {
    let seed = std::env::var("RILL_KILL9_SEED").map_or(0x006b_696c_6c39, |s| s.parse().expect("RILL_KILL9_SEED"));
    let mut rng = seed;
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let store = Store::open(dir, store_config()).expect("open");
    store.create_topic(TOPIC, topic_config()).expect("create topic");
    store.close().expect("close");

    let mut acked: Vec<Ack> = Vec::new();
    let mut rounds = 0;
    while rounds < MIN_ROUNDS || (rounds < ROUNDS && started.elapsed() < TIME_BUDGET) {
        let round = rounds;
        rounds += 1;
        let plan = match splitmix64(&mut rng) % 3 {
            0 => KillPlan::Acks(1 + splitmix64(&mut rng) % 150),
            1 => KillPlan::SinceFirstAck(Duration::from_millis(5 + splitmix64(&mut rng) % 56)),
            _ => KillPlan::SinceSpawn(Duration::from_millis(splitmix64(&mut rng) % 80)),
        };
        let acks = run_round(dir, round, plan);
        eprintln!("round {round}: {plan:?}, {} acks", acks.len());
        acked.extend(acks);
        if round % 3 == 2 {
            let context = format!("seed {seed:#x}, after round {round} ({plan:?})");
            verify(dir, &acked, round % 2 == 0, &context);
        }
    }
    assert!(!acked.is_empty(), "the children acknowledged appends");
    let context = format!("seed {seed:#x}, after {rounds} rounds");
    verify(dir, &acked, false, &context);
}
