//! `rill inspect` on bit-flipped sealed segments: a store is written with known records
//! (several sealed segments, dense indices), closed cleanly, and for each trial a copy gets
//! 1..=3 bits flipped (seeded) in one sealed segment's `.log`, `.index` or `.timeindex`.
//!
//! * `.log` damage is reported as corruption (exit status 3, a `CORRUPT:` line naming the
//!   file), except flips confined to the `leader_epoch` field: it lies outside the CRC (as in
//!   Kafka's format) and no check can tell a flipped epoch from a written one; the records
//!   are unchanged, and those trials are counted apart.
//! * `.index` / `.timeindex` damage is reported as repairable (exit status 4, naming the
//!   index), unless the damaged file is still a true index of the log (checked here
//!   independently of `rill inspect`: e.g. a time entry whose bound only grew), which is
//!   reported as valid.
//!
//! The engine side (reads never serve damage, nothing below it is lost) is
//! `engine/tests/bit_flips.rs`. `RILL_BITFLIP_TRIALS=<n>` sets the trial count (default 40;
//! the fault campaign runs 1000), `RILL_BITFLIP_TRIAL=<n>` replays one.

use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use rill_engine::format::batch::BatchIter;
use rill_engine::io::fault::splitmix64;
use rill_engine::{Compression, FsyncPolicy, Record, Store, StoreConfig, TopicConfig};

const RILL: &str = env!("CARGO_BIN_EXE_rill");
const TOPIC: &str = "flip";

/// A batch of a sealed segment: where it is and what it holds.
#[derive(Clone, Copy, Debug)]
struct Placed {
    position: u64,
    base: u64,
    next: u64,
    max_timestamp_ms: i64,
}

fn partition_dir(root: &Path) -> PathBuf {
    root.join("topics").join(TOPIC).join("0")
}

fn write_store(root: &Path) -> Vec<(u64, Vec<Placed>)> {
    let config = StoreConfig { retention_check_interval_ms: None, ..StoreConfig::default() };
    let store = Store::open(root, config).expect("open");
    let topic = TopicConfig {
        partitions: 1,
        fsync: FsyncPolicy::Never,
        segment_size_bytes: 4096,
        segment_ms: None,
        retention_ms: None,
        index_interval_bytes: 100,
        index_size_bytes: 1024,
        ..TopicConfig::default()
    };
    store.create_topic(TOPIC, topic).expect("create topic");
    let p = store.partition(TOPIC, 0).expect("partition");
    let mut offset = 0i64;
    for b in 0..150u64 {
        let records: Vec<Record> = (0..1 + b % 3)
            .map(|r| {
                offset += 1;
                let ts = 5_000_000 + 10 * offset - if offset % 5 == 3 { 45 } else { 0 };
                Record {
                    timestamp_ms: Some(ts),
                    ..Record::keyed(format!("k{b}"), format!("v{b}-{r}-{}", "q".repeat((b % 40) as usize)))
                }
            })
            .collect();
        let compression = if b % 4 == 3 { Compression::Lz4 } else { Compression::None };
        p.append_records(&records, compression).expect("append").wait().expect("ack");
    }
    drop(p);
    store.close().expect("clean close");
    let dir = partition_dir(root);
    let mut bases: Vec<u64> = std::fs::read_dir(&dir)
        .expect("list")
        .filter_map(|e| e.ok()?.file_name().into_string().ok()?.strip_suffix(".log")?.parse().ok())
        .collect();
    bases.sort_unstable();
    bases.pop(); // the active segment
    bases
        .into_iter()
        .map(|base| {
            let bytes = Bytes::from(std::fs::read(dir.join(format!("{base:020}.log"))).expect("read"));
            let mut position = 0;
            let placed = BatchIter::new(bytes)
                .map(|batch| {
                    let h = *batch.expect("valid").header();
                    let placed = Placed {
                        position,
                        base: h.base_offset,
                        next: h.next_offset(),
                        max_timestamp_ms: h.max_timestamp_ms,
                    };
                    position += h.size_bytes();
                    placed
                })
                .collect();
            (base, placed)
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("list") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// Whether `bytes` is still a true offset index of the segment: increasing entries, each
/// naming the position and offset of a batch.
fn offset_index_is_true(bytes: &[u8], base: u64, batches: &[Placed]) -> bool {
    let entries: Vec<(u64, u64)> = bytes
        .chunks_exact(8)
        .map(|e| {
            let rel = u32::from_le_bytes(e[..4].try_into().expect("4"));
            let pos = u32::from_le_bytes(e[4..].try_into().expect("4"));
            (base + u64::from(rel), u64::from(pos))
        })
        .collect();
    bytes.len().is_multiple_of(8)
        && entries.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1)
        && entries.iter().all(|&(offset, pos)| batches.iter().any(|b| b.base == offset && b.position == pos))
}

/// Whether `bytes` is still a true time index: in order, each entry bounding the max
/// timestamp of every batch before the offset it names, the last naming the segment's end.
fn time_index_is_true(bytes: &[u8], base: u64, batches: &[Placed]) -> bool {
    if !bytes.len().is_multiple_of(12) || bytes.is_empty() {
        return false;
    }
    let entries: Vec<(i64, u64)> = bytes
        .chunks_exact(12)
        .map(|e| {
            let ts = i64::from_le_bytes(e[..8].try_into().expect("8"));
            let rel = u32::from_le_bytes(e[8..].try_into().expect("4"));
            (ts, base + u64::from(rel))
        })
        .collect();
    let end = batches.last().expect("batches").next;
    entries.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1)
        && entries.last().is_some_and(|&(_, bound)| bound == end)
        && entries.iter().all(|&(ts, bound)| {
            bound <= end && batches.iter().filter(|b| b.base < bound).all(|b| b.max_timestamp_ms <= ts)
        })
}

#[test]
fn rill_inspect_reports_every_bit_flip_in_sealed_segments() {
    let pristine = tempfile::tempdir().expect("tempdir");
    let sealed = write_store(pristine.path());
    assert!(sealed.len() >= 3, "several sealed segments");
    let status = Command::new(RILL).arg("inspect").arg(pristine.path()).output().expect("run rill inspect");
    assert!(status.status.success(), "the undamaged store is clean: {}", String::from_utf8_lossy(&status.stdout));

    let var = |name: &str| std::env::var(name).ok().map(|v| v.trim().parse::<u64>().expect("a number"));
    let trials = match var("RILL_BITFLIP_TRIAL") {
        Some(t) => t..t + 1,
        None => 0..var("RILL_BITFLIP_TRIALS").unwrap_or(40),
    };
    let (mut corrupt, mut repairable, mut true_index, mut epoch_only) = (0, 0, 0, 0);
    let started = std::time::Instant::now();
    for trial in trials.clone() {
        let mut rng = trial.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x0117_5ec7;
        let mut next = move || splitmix64(&mut rng);
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("store");
        copy_dir(pristine.path(), &root);
        let (base, batches) = &sealed[(next() % sealed.len() as u64) as usize];
        let extension = ["log", "log", "index", "timeindex"][(next() % 4) as usize];
        let file = partition_dir(&root).join(format!("{base:020}.{extension}"));
        let mut bytes = std::fs::read(&file).expect("read");
        let bits = bytes.len() as u64 * 8;
        let anchor = next() % bits;
        let flipped: Vec<u64> = (0..1 + next() % 3).map(|_| (anchor + next() % 256) % bits).collect();
        for bit in &flipped {
            bytes[(bit / 8) as usize] ^= 1 << (bit % 8);
        }
        std::fs::write(&file, &bytes).expect("write");
        let pristine_bytes =
            std::fs::read(pristine.path().join(file.strip_prefix(&root).expect("inside"))).expect("read");
        let out = Command::new(RILL).arg("inspect").arg(&root).output().expect("run rill inspect");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let code = out.status.code();
        let what = format!("trial {trial} (replay: RILL_BITFLIP_TRIAL={trial}): {extension} of segment {base}, bits {flipped:?}: exit {code:?}\n{stdout}");
        if bytes == pristine_bytes {
            // Flips that cancelled out.
            assert_eq!(code, Some(0), "{what}");
            continue;
        }
        match extension {
            "log" => {
                let in_epoch = |bit: &u64| {
                    let byte = bit / 8;
                    batches.iter().any(|b| byte >= b.position + 12 && byte < b.position + 16)
                };
                let changed: Vec<u64> = (0..bits)
                    .filter(|bit| {
                        (bytes[(bit / 8) as usize] ^ pristine_bytes[(bit / 8) as usize]) & (1 << (bit % 8)) != 0
                    })
                    .collect();
                if changed.iter().all(in_epoch) {
                    epoch_only += 1;
                    continue;
                }
                assert_eq!(code, Some(3), "{what}");
                assert!(stdout.contains("CORRUPT:") && stdout.contains(&format!("{base:020}.log")), "{what}");
                corrupt += 1;
            }
            _ => {
                let still_true = if extension == "index" {
                    offset_index_is_true(&bytes, *base, batches)
                } else {
                    time_index_is_true(&bytes, *base, batches)
                };
                if still_true {
                    assert_eq!(code, Some(0), "{what}");
                    true_index += 1;
                } else {
                    assert_eq!(code, Some(4), "{what}");
                    assert!(stdout.contains("REPAIRABLE:") && stdout.contains(&format!(".{extension}")), "{what}");
                    repairable += 1;
                }
            }
        }
    }
    eprintln!(
        "rill inspect on {} bit-flip trials in {:.1} s: {corrupt} log damage reported corrupt, {repairable} index \
         damage reported repairable, {true_index} flipped indices still true (reported valid), {epoch_only} flips only \
         in leader_epoch (outside the CRC, records unchanged)",
        trials.end - trials.start,
        started.elapsed().as_secs_f64()
    );
}
