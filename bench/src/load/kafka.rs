//! The Kafka driver: `rill serve`'s Kafka listener through `rskafka`, a Kafka client of its
//! own (ApiVersions, Metadata, Produce, Fetch), so the listener is measured from the same
//! load generator as the native protocol and the peers.
//!
//! Each producer and each consumer has its own `rskafka` client, hence its own connection.
//! A send is one Produce request of one record batch (no compression, acks = -1); several
//! sends of one producer are in flight on its connection at once. A consumer fetches from
//! offset 0 with the same long-poll wait and size as the native driver.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rskafka::client::partition::{Compression, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use rskafka::record::Record;
use rskafka::BackoffConfig;

use crate::load::drivers::{AckFuture, POLL_WAIT, READ_MAX_BYTES};
use crate::summary::Result;

/// How long `rskafka` retries a failing request before the error reaches the benchmark.
const RETRY_DEADLINE: Duration = Duration::from_secs(30);

/// One producer: its own client, one partition client per partition.
pub struct KafkaProducer {
    partitions: Vec<Arc<PartitionClient>>,
    next: usize,
}

/// A reader of one partition from its start, on its own client.
pub struct KafkaConsumer {
    partition: PartitionClient,
    offset: i64,
}

async fn client(addr: &str, id: String) -> Result<Client> {
    let backoff = BackoffConfig { deadline: Some(RETRY_DEADLINE), ..BackoffConfig::default() };
    Ok(ClientBuilder::new(vec![addr.to_string()]).client_id(id).backoff_config(backoff).build().await?)
}

fn partition_index(partition: u32) -> Result<i32> {
    Ok(i32::try_from(partition).map_err(|_| format!("partition {partition} is not a Kafka partition number"))?)
}

impl KafkaProducer {
    /// A producer of `topic`'s `partitions` through the Kafka listener at `addr`.
    pub async fn connect(addr: &str, topic: &str, partitions: u32, id: usize) -> Result<KafkaProducer> {
        let client = client(addr, format!("rill-bench-load-kafka-producer-{id}")).await?;
        let mut clients = Vec::with_capacity(partitions as usize);
        for p in 0..partitions {
            let partition = client.partition_client(topic, partition_index(p)?, UnknownTopicHandling::Retry).await?;
            clients.push(Arc::new(partition));
        }
        if clients.is_empty() {
            return Err(format!("topic {topic} has no partitions to produce to").into());
        }
        Ok(KafkaProducer { partitions: clients, next: id })
    }

    /// One Produce request of `values` (one record batch) to the next partition; spawned, so
    /// it is under way when this returns.
    pub fn send(&mut self, values: Vec<Bytes>) -> Result<AckFuture> {
        let partition = Arc::clone(&self.partitions[self.next % self.partitions.len()]);
        self.next += 1;
        let timestamp =
            chrono::DateTime::from_timestamp_millis(crate::now_ms()).ok_or("the clock is out of chrono's range")?;
        let records: Vec<Record> = values
            .into_iter()
            .map(|v| Record { key: None, value: Some(v.to_vec()), headers: Default::default(), timestamp })
            .collect();
        let expected = records.len();
        let task = tokio::spawn(async move { partition.produce(records, Compression::NoCompression).await });
        Ok(Box::pin(async move {
            let offsets = task.await??;
            if offsets.len() != expected {
                return Err(format!("Produce acknowledged {} of {expected} records", offsets.len()).into());
            }
            Ok(())
        }))
    }
}

impl KafkaConsumer {
    /// A reader of `topic`'s `partition` from offset 0 through the Kafka listener at `addr`.
    pub async fn connect(addr: &str, topic: &str, partition: u32, group: usize) -> Result<KafkaConsumer> {
        let client = client(addr, format!("rill-bench-load-kafka-consumer-{group}-{partition}")).await?;
        let partition =
            client.partition_client(topic, partition_index(partition)?, UnknownTopicHandling::Retry).await?;
        Ok(KafkaConsumer { partition, offset: 0 })
    }

    /// One Fetch from the next offset, waiting up to [`POLL_WAIT`] for data.
    pub async fn next(&mut self) -> Result<Vec<Bytes>> {
        let wait_ms = i32::try_from(POLL_WAIT.as_millis()).unwrap_or(i32::MAX);
        let max_bytes = i32::try_from(READ_MAX_BYTES).unwrap_or(i32::MAX);
        let (records, _high_watermark) = self.partition.fetch_records(self.offset, 1..max_bytes, wait_ms).await?;
        let mut values = Vec::with_capacity(records.len());
        for r in records {
            // rskafka drops what precedes the asked offset (a batch may start before it).
            debug_assert!(r.offset >= self.offset, "fetched offset {} before {}", r.offset, self.offset);
            self.offset = r.offset + 1;
            values.push(Bytes::from(r.record.value.unwrap_or_default()));
        }
        Ok(values)
    }
}
