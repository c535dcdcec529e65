//! A real full file system: a 4 MiB tmpfs mounted for the test, filled through the engine.
//! The append that finds the disk full fails with ENOSPC (`Error::Io` of kind
//! `StorageFull`), the partition refuses later appends (`Error::Poisoned`), every
//! acknowledged record is still served, and once space is freed the reopened store holds
//! every acknowledged record and takes appends again.
//!
//! Mounting needs root (CAP_SYS_ADMIN), which CI may not have, so the test is ignored by
//! default; the fault campaign runs it with
//! `cargo test -p rill-engine --release --test full_disk -- --ignored --nocapture`.
//! Set `RILL_FULL_DISK_DIR` to an existing small, empty file system to use it instead of
//! mounting one.

use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use rill_engine::format::batch::BatchIter;
use rill_engine::{Compression, Error, FsyncPolicy, Partition, Record, Store, StoreConfig, TopicConfig};

const TOPIC: &str = "t";
const BALLAST_BYTES: usize = 512 * 1024;

/// A tmpfs mounted at a fresh directory, unmounted on drop.
struct Mounted {
    dir: PathBuf,
    mounted: bool,
}

impl Mounted {
    fn new(test: &str) -> Mounted {
        if let Ok(dir) = std::env::var("RILL_FULL_DISK_DIR") {
            let dir = PathBuf::from(dir).join(test);
            std::fs::create_dir_all(&dir).expect("create test directory");
            return Mounted { dir, mounted: false };
        }
        let dir = std::env::temp_dir().join(format!("rill-full-disk-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
            .arg(&dir)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a 4 MiB tmpfs at {} failed ({status}); this test needs root, or set RILL_FULL_DISK_DIR",
            dir.display()
        );
        Mounted { dir, mounted: true }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.dir).status();
            let _ = std::fs::remove_dir(&self.dir);
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn config() -> StoreConfig {
    StoreConfig { retention_check_interval_ms: None, ..StoreConfig::default() }
}

fn record(n: u64, size: usize) -> Record {
    let pad = "p".repeat(size + (n % 7) as usize * size / 16);
    Record::from_value(Bytes::from(format!("r{n:06}-{pad}")))
}

/// Every record from offset 0 as values, each served batch passing its CRC.
fn read_values(p: &Partition) -> Vec<Bytes> {
    let mut out = Vec::new();
    while (out.len() as u64) < p.end_offset() {
        let bytes = p.read(out.len() as u64, 1 << 20).expect("read below the end");
        for batch in BatchIter::new(bytes) {
            for r in batch.expect("CRC-checked batch").records().expect("decodes") {
                assert_eq!(r.offset, out.len() as u64, "dense offsets");
                out.push(r.value.expect("value"));
            }
        }
    }
    out
}

/// Fills the file system through one partition with records of about `size` bytes and an
/// index entry every `index_interval_bytes`, so that the disk runs out in a log write or
/// (with small records and a dense index) while an index page is first touched.
fn fill_until_full(root: &Path, fsync: FsyncPolicy, size: usize, index_interval_bytes: u32) {
    // Ballast freed later, so the reopened store has room to append again.
    let ballast = root.join("ballast");
    std::fs::write(&ballast, vec![7u8; BALLAST_BYTES]).expect("write ballast");
    let data = root.join("data");
    let topic = TopicConfig {
        partitions: 1,
        fsync,
        segment_size_bytes: 256 * 1024,
        segment_ms: None,
        retention_ms: None,
        index_interval_bytes,
        index_size_bytes: 64 * 1024,
        ..TopicConfig::default()
    };
    let store = Store::open(&data, config()).expect("open");
    store.create_topic(TOPIC, topic).expect("create topic");
    let p = store.partition(TOPIC, 0).expect("partition");
    let mut acked: Vec<Bytes> = Vec::new();
    let mut n = 0u64;
    let err = loop {
        let records: Vec<Record> = (0..4).map(|i| record(n + i, size)).collect();
        match p.append_records(&records, Compression::None).and_then(|h| h.wait()) {
            Ok(info) => {
                assert_eq!(info.base_offset, acked.len() as u64);
                acked.extend(records.iter().map(|r| r.value.clone().expect("value")));
                n += 4;
            }
            Err(e) => break e,
        }
        assert!(n < 1_000_000, "a 4 MiB file system never filled up");
    };
    eprintln!("{fsync:?}, {size} B records: disk full after {} acknowledged records: {err}", acked.len());
    let no_space =
        |e: &Error| matches!(e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull);
    assert!(no_space(&err), "{fsync:?}: the append that found the disk full fails with ENOSPC, got {err:?}");
    match p.append_records(&[record(0, size)], Compression::None) {
        Err(Error::Poisoned { cause, .. }) => assert!(!cause.is_empty()),
        other => panic!("{fsync:?}: after ENOSPC the partition refuses appends, got {other:?}"),
    }
    assert_eq!(read_values(&p), acked, "{fsync:?}: every acknowledged record is still served");
    drop(p);
    drop(store);

    std::fs::remove_file(&ballast).expect("free the ballast");
    let store = Store::open(&data, config()).expect("reopen once space is free");
    let p = store.partition(TOPIC, 0).expect("partition");
    assert_eq!(read_values(&p), acked, "{fsync:?}: the reopened store holds exactly the acknowledged records");
    let end = p.end_offset();
    let info =
        p.append_records(&[record(1, size)], Compression::None).expect("append").wait().expect("ack after reopen");
    assert_eq!(info.base_offset, end, "appends resume at the acknowledged end");
    drop(p);
    store.close().expect("clean close");
    std::fs::remove_dir_all(&data).expect("clean up");
}

#[test]
#[ignore = "mounts a tmpfs (needs root); run by the fault campaign"]
fn a_full_file_system_fails_appends_cleanly_and_reopen_resumes() {
    let mount = Mounted::new("fill");
    for fsync in [FsyncPolicy::Always, FsyncPolicy::Interval { interval_ms: 5 }, FsyncPolicy::Never] {
        for (size, index_interval_bytes) in [(1500, 4096), (40, 1), (100, 1), (300, 64)] {
            fill_until_full(&mount.dir, fsync, size, index_interval_bytes);
        }
    }
}

/// Fills the file system to the last page, leaving the active segment room for one more
/// small batch in its last log page while that batch's offset-index entry is the first in
/// a new index page: the index must already own its pages (a sparse index file would get
/// SIGBUS when the map touches a page the file system cannot give). The append succeeds or
/// fails with a typed error; either way the store reopens with every acknowledged record.
#[test]
#[ignore = "mounts a tmpfs (needs root); run by the fault campaign"]
fn an_index_page_first_touched_on_a_full_disk_is_not_a_crash() {
    let mount = Mounted::new("index-page");
    let data = mount.dir.join("data-index-page");
    let topic = topic_config_index_page();
    let value = |n: u64, len: usize| Bytes::from(format!("{n:06}-{}", "v".repeat(len)));
    let store = Store::open(&data, config()).expect("open");
    store.create_topic(TOPIC, topic).expect("create topic");
    let p = store.partition(TOPIC, 0).expect("partition");
    let append = |n: u64, len: usize| {
        p.append_records(&[Record::from_value(value(n, len))], Compression::None).and_then(|h| h.wait())
    };
    // With an entry for every batch after the first, batch 513 writes entry 512: byte 4096
    // of the offset index, the first byte of its second page. Size the first batch so the
    // log then ends mid-page with room for batch 513.
    append(0, 10).expect("probe");
    let small = p.size_bytes();
    let after_512 = 512 * small;
    let room = |first: u64| 4096 - (first + after_512) % 4096;
    let first_pad = (0..4096).find(|pad| room(small + pad) >= 2 * small).expect("a pad leaves room");
    drop(p);
    drop(store);
    std::fs::remove_dir_all(&data).expect("reset");

    let store = Store::open(&data, config()).expect("open");
    store.create_topic(TOPIC, topic_config_index_page()).expect("create topic");
    let p = store.partition(TOPIC, 0).expect("partition");
    let mut acked = vec![value(0, 10 + first_pad as usize)];
    p.append_records(&[Record::from_value(acked[0].clone())], Compression::None)
        .and_then(|h| h.wait())
        .expect("first batch");
    for n in 1..513 {
        p.append_records(&[Record::from_value(value(n, 10))], Compression::None)
            .and_then(|h| h.wait())
            .expect("append while there is room");
        acked.push(value(n, 10));
    }
    let filler = mount.dir.join("filler");
    fill_file_system(&filler);
    match p.append_records(&[Record::from_value(value(513, 10))], Compression::None).and_then(|h| h.wait()) {
        Ok(info) => {
            assert_eq!(info.base_offset, 513);
            acked.push(value(513, 10));
        }
        Err(e) => eprintln!("append on the full disk failed cleanly: {e}"),
    }
    assert_eq!(read_values(&p), acked, "every acknowledged record is served");
    drop(p);
    drop(store);
    std::fs::remove_file(&filler).expect("free space");
    let store = Store::open(&data, config()).expect("reopen");
    let p = store.partition(TOPIC, 0).expect("partition");
    let served = read_values(&p);
    assert!(served.len() >= 513 && acked.starts_with(&served), "the reopened log is the acknowledged prefix");
    drop(p);
    store.close().expect("close");
    std::fs::remove_dir_all(&data).expect("clean up");
}

fn topic_config_index_page() -> TopicConfig {
    TopicConfig {
        partitions: 1,
        fsync: FsyncPolicy::Never,
        segment_size_bytes: 1 << 20,
        segment_ms: None,
        retention_ms: None,
        index_interval_bytes: 1,
        index_size_bytes: 64 * 1024,
        ..TopicConfig::default()
    }
}

/// Writes `path` until the file system has no free byte left.
fn fill_file_system(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).expect("create filler");
    for chunk in [65536usize, 4096, 512, 1] {
        let buf = vec![0xa5u8; chunk];
        while file.write_all(&buf).is_ok() {}
    }
    let _ = file.sync_all();
}
