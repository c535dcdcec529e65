//! Embedded quick start: opens `./rill-example-data` (or the directory given as the first
//! argument), appends 100,000 records in batches of 100 with `fsync = always`, reads them
//! back from the start and from a timestamp, and closes the store cleanly.
//!
//! `cargo run --release -p rill-engine --example quickstart`

use std::time::Instant;

use rill_engine::format::batch::BatchIter;
use rill_engine::{Clock as _, Compression, Record, Store, StoreConfig, TopicConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "rill-example-data".to_string());
    let store = Store::open(&dir, StoreConfig::default())?;
    let topic = match store.topic("quickstart") {
        Ok(topic) => topic,
        Err(_) => store.create_topic("quickstart", TopicConfig { partitions: 1, ..TopicConfig::default() })?,
    };
    let partition = topic.partition(0)?;
    let start_offset = partition.end_offset();
    println!("opened {dir}: topic 'quickstart' holds offsets [{}, {start_offset})", partition.log_start_offset());

    let started = Instant::now();
    let mut handles = Vec::new();
    for batch in 0..1_000u64 {
        let records: Vec<Record> = (0..100u64)
            .map(|i| Record::keyed(format!("key-{}", i % 10), format!("event {}", batch * 100 + i)))
            .collect();
        handles.push(partition.append_records(&records, Compression::Lz4)?);
        if handles.len() == 64 {
            for handle in handles.drain(..) {
                handle.wait()?;
            }
        }
    }
    for handle in handles {
        handle.wait()?;
    }
    let elapsed = started.elapsed();
    println!("appended 100000 records (fsync=always, group commit) in {elapsed:.2?}");

    let started = Instant::now();
    let (mut offset, mut records) = (start_offset, 0u64);
    while offset < partition.end_offset() {
        let bytes = partition.read(offset, 1 << 20)?;
        for batch in BatchIter::new(bytes) {
            let batch = batch?;
            records += batch.records()?.len() as u64;
            offset = batch.header().next_offset();
        }
    }
    println!("read back {records} records in {:.2?}", started.elapsed());
    let since_ms = rill_engine::SystemClock.now_ms() - 60_000;
    println!("first offset written in the last minute: {:?}", partition.offset_for_timestamp(since_ms)?);
    store.close()?;
    println!("closed cleanly; run again to append more");
    Ok(())
}
