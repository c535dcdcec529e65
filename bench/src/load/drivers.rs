//! The systems `rill-bench load` drives, behind one interface so that every system gets the
//! same client-side work: the same stamped payloads, the same producer and consumer tasks on
//! the same tokio runtime, the same histograms.
//!
//! A *stream* is a topic (rill, also through its Kafka listener), a set of stream keys (Redis,
//! one per partition) or a set of JetStream streams (NATS, one per partition, subject
//! `<stream>.<p>`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rill_engine::format::batch::{BatchBuilder, BatchIter};
use rill_engine::{Compression, FsyncPolicy, Partition, Record, Store, StoreConfig, TopicConfig};
use rill_server::client::{decode_fetched, Client, Producer, ProducerConfig};
use rill_server::messages::TopicSettings;

use crate::summary::Result;
use crate::TimingStorage;

/// How long a consumer's read waits for new messages before returning empty-handed.
pub const POLL_WAIT: Duration = Duration::from_millis(100);
/// Most bytes one consumer read asks for (rill), or messages (peers: 1 per KiB).
pub(crate) const READ_MAX_BYTES: u64 = 1 << 20;

/// A future acknowledging one send.
pub type AckFuture = Pin<Box<dyn Future<Output = Result<()>> + Send>>;

/// The durability a run asks of every system (matching pairs, see docs/benchmarks.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// rill fsync=always; Redis `appendfsync always`; NATS `sync_interval: always`.
    Always,
    /// rill fsync=interval(1000 ms); Redis `appendfsync everysec`; NATS default (2 min).
    Relaxed,
    /// rill fsync=never; Redis without AOF; NATS default (it has no "never").
    None,
}

impl Durability {
    /// The name used in results.
    pub fn name(self) -> &'static str {
        match self {
            Durability::Always => "always",
            Durability::Relaxed => "relaxed",
            Durability::None => "none",
        }
    }

    /// rill's fsync policy for it.
    pub fn policy(self) -> FsyncPolicy {
        match self {
            Durability::Always => FsyncPolicy::Always,
            Durability::Relaxed => FsyncPolicy::Interval { interval_ms: 1000 },
            Durability::None => FsyncPolicy::Never,
        }
    }
}

/// Which system.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SystemKind {
    /// The engine in this process (no network).
    Embedded,
    /// `rill serve` over loopback, native protocol: each send is one record batch
    /// (`Client::produce_pipelined`), as an append is embedded and a pipeline is for Redis.
    Server,
    /// `rill serve` over loopback through the batching client `Producer` (a send per
    /// message, batched by linger and size, a future per message).
    ServerProducer,
    /// `rill serve` over loopback through its Kafka listener, driven by the `rskafka` client:
    /// each send is one Produce request (acks = -1) of one record batch, consumers fetch.
    Kafka,
    /// Redis Streams (XADD / XREADGROUP), feature `peers`.
    Redis,
    /// NATS JetStream, feature `peers`.
    Nats,
}

impl SystemKind {
    /// The name used in results.
    pub fn name(self) -> &'static str {
        match self {
            SystemKind::Embedded => "rill-embedded",
            SystemKind::Server => "rill-server",
            SystemKind::ServerProducer => "rill-server-producer",
            SystemKind::Kafka => "rill-kafka",
            SystemKind::Redis => "redis",
            SystemKind::Nats => "nats",
        }
    }
}

/// Producer-side settings that map onto each system's own knobs.
#[derive(Clone, Debug)]
pub struct SendSettings {
    /// rill server `ProducerConfig::linger_ms`.
    pub linger_ms: u64,
    /// rill server `ProducerConfig::batch_size_bytes`.
    pub batch_bytes: usize,
    /// rill server `ProducerConfig::acks`.
    pub acks: rill_server::messages::Acks,
}

/// A connected system.
pub enum Driver {
    /// The engine, opened on a scratch directory, with write and fsync counters.
    Embedded {
        /// The store.
        store: Store,
        /// Its storage counters.
        io: TimingStorage,
    },
    /// A rill server. Topics are created and counted through its native protocol whatever
    /// the front door, so every front door gets the same topic settings.
    Server {
        /// Protocol address.
        addr: String,
        /// Admin connection.
        admin: Client,
        /// Segment size of created topics.
        segment_bytes: u64,
        /// How producers and consumers reach it.
        front: Front,
    },
    /// A Redis server.
    #[cfg(feature = "peers")]
    Redis(crate::load::peers::RedisDriver),
    /// A NATS server with JetStream.
    #[cfg(feature = "peers")]
    Nats(crate::load::peers::NatsDriver),
}

/// How a [`Driver::Server`]'s producers and consumers reach the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Front {
    /// The native protocol, one record batch per send.
    Batch,
    /// The native protocol through the batching client `Producer`.
    Producer,
    /// The Kafka listener at this address, through `rskafka`.
    Kafka(String),
}

/// One producer's connection.
pub enum ProducerHandle {
    /// Appends to the partitions of an embedded topic, round robin per send.
    Embedded { partitions: Vec<Arc<Partition>>, next: usize },
    /// One record batch per send on its own connection, round robin over the partitions.
    ServerBatch { client: Client, topic: String, partitions: u32, next: usize, acks: rill_server::messages::Acks },
    /// The batching client `Producer` (its own connection).
    Server { producer: Producer, topic: String },
    /// A Kafka client (its own connection), round robin over the partitions.
    Kafka(crate::load::kafka::KafkaProducer),
    /// A Redis connection.
    #[cfg(feature = "peers")]
    Redis(crate::load::peers::RedisProducer),
    /// A NATS connection.
    #[cfg(feature = "peers")]
    Nats(crate::load::peers::NatsProducer),
}

/// One consumer of one partition, reading from its start.
pub enum ConsumerHandle {
    /// Reads an embedded partition.
    Embedded { partition: Arc<Partition>, offset: u64 },
    /// Long-polling fetches on its own connection.
    Server { client: Client, topic: String, partition: u32, offset: u64 },
    /// Kafka fetches on its own connection.
    Kafka(crate::load::kafka::KafkaConsumer),
    /// XREADGROUP on its own connection.
    #[cfg(feature = "peers")]
    Redis(crate::load::peers::RedisConsumer),
    /// A JetStream pull consumer.
    #[cfg(feature = "peers")]
    Nats(Box<crate::load::peers::NatsConsumer>),
}

impl Driver {
    /// An embedded store in `dir`.
    pub fn embedded(dir: &std::path::Path) -> Result<Driver> {
        let io = TimingStorage::new();
        let config =
            StoreConfig { storage: Arc::new(io.clone()), retention_check_interval_ms: None, ..StoreConfig::default() };
        Ok(Driver::Embedded { store: Store::open(dir, config)?, io })
    }

    /// A rill server at `addr` (native protocol), its producers and consumers going through
    /// `front`.
    pub async fn server(addr: &str, segment_bytes: u64, front: Front) -> Result<Driver> {
        let admin = Client::connect(addr, "rill-bench-load-admin").await?;
        Ok(Driver::Server { addr: addr.to_string(), admin, segment_bytes, front })
    }

    /// Creates `stream` with `partitions` partitions at `durability`.
    pub async fn create(&self, stream: &str, partitions: u32, durability: Durability) -> Result<()> {
        match self {
            Driver::Embedded { store, .. } => {
                let config = TopicConfig {
                    partitions,
                    fsync: durability.policy(),
                    segment_size_bytes: 1 << 30,
                    segment_ms: None,
                    retention_ms: None,
                    ..TopicConfig::default()
                };
                store.create_topic(stream, config)?;
                Ok(())
            }
            Driver::Server { admin, segment_bytes, .. } => {
                let settings = TopicSettings {
                    partitions,
                    fsync: Some(durability.policy()),
                    segment_size_bytes: Some(*segment_bytes),
                    retention_bytes: None,
                    retention_ms: None,
                };
                admin.create_topic(stream, settings).await?;
                // In a cluster the topic reaches this node through the controller's metadata.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
                while admin.metadata(&[stream]).await.is_err() {
                    if std::time::Instant::now() > deadline {
                        return Err(format!("topic {stream} did not appear on the server").into());
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Ok(())
            }
            #[cfg(feature = "peers")]
            Driver::Redis(d) => d.create(stream, partitions, durability).await,
            #[cfg(feature = "peers")]
            Driver::Nats(d) => d.create(stream, partitions).await,
        }
    }

    /// Deletes `stream`.
    pub async fn delete(&self, stream: &str, partitions: u32) -> Result<()> {
        let _ = partitions; // only the peers keep one object per partition
        match self {
            Driver::Embedded { store, .. } => Ok(store.delete_topic(stream)?),
            Driver::Server { admin, .. } => Ok(admin.delete_topic(stream).await?),
            #[cfg(feature = "peers")]
            Driver::Redis(d) => d.delete(stream, partitions).await,
            #[cfg(feature = "peers")]
            Driver::Nats(d) => d.delete(stream, partitions).await,
        }
    }

    /// A producer (its own connection where the system has connections).
    pub async fn producer(&self, stream: &str, partitions: u32, id: usize, s: &SendSettings) -> Result<ProducerHandle> {
        match self {
            Driver::Embedded { store, .. } => {
                let parts = (0..partitions).map(|p| store.partition(stream, p)).collect::<rill_engine::Result<_>>()?;
                Ok(ProducerHandle::Embedded { partitions: parts, next: id })
            }
            Driver::Server { front: Front::Kafka(kafka), .. } => Ok(ProducerHandle::Kafka(
                crate::load::kafka::KafkaProducer::connect(kafka, stream, partitions, id).await?,
            )),
            Driver::Server { addr, front, .. } => {
                let client = Client::connect(addr.as_str(), &format!("rill-bench-load-producer-{id}")).await?;
                if *front == Front::Batch {
                    return Ok(ProducerHandle::ServerBatch {
                        client,
                        topic: stream.to_string(),
                        partitions,
                        next: id,
                        acks: s.acks,
                    });
                }
                let config = ProducerConfig {
                    linger_ms: s.linger_ms,
                    batch_size_bytes: s.batch_bytes,
                    acks: s.acks,
                    idempotent: false,
                    ..ProducerConfig::default()
                };
                Ok(ProducerHandle::Server { producer: Producer::new(client, config)?, topic: stream.to_string() })
            }
            #[cfg(feature = "peers")]
            Driver::Redis(d) => Ok(ProducerHandle::Redis(d.producer(stream, partitions, id).await?)),
            #[cfg(feature = "peers")]
            Driver::Nats(d) => Ok(ProducerHandle::Nats(d.producer(stream, partitions, id).await?)),
        }
    }

    /// A consumer of `partition` that reads everything from the start; `group` tells
    /// consumers that must each see every message (fan-out) apart.
    pub async fn consumer(&self, stream: &str, partition: u32, group: usize) -> Result<ConsumerHandle> {
        match self {
            Driver::Embedded { store, .. } => {
                Ok(ConsumerHandle::Embedded { partition: store.partition(stream, partition)?, offset: 0 })
            }
            Driver::Server { front: Front::Kafka(kafka), .. } => Ok(ConsumerHandle::Kafka(
                crate::load::kafka::KafkaConsumer::connect(kafka, stream, partition, group).await?,
            )),
            Driver::Server { addr, .. } => {
                let client =
                    Client::connect(addr.as_str(), &format!("rill-bench-load-consumer-{group}-{partition}")).await?;
                Ok(ConsumerHandle::Server { client, topic: stream.to_string(), partition, offset: 0 })
            }
            #[cfg(feature = "peers")]
            Driver::Redis(d) => Ok(ConsumerHandle::Redis(d.consumer(stream, partition, group).await?)),
            #[cfg(feature = "peers")]
            Driver::Nats(d) => Ok(ConsumerHandle::Nats(Box::new(d.consumer(stream, partition, group).await?))),
        }
    }

    /// Embedded only: bytes written so far and the duration of every fdatasync so far, ns.
    pub fn io_counts(&self) -> Option<(u64, Vec<u64>)> {
        match self {
            Driver::Embedded { io, .. } => {
                let snap = io.snapshot();
                Some((snap.write_bytes, snap.sync_ns))
            }
            _ => None,
        }
    }

    /// Closes what needs closing.
    pub fn close(self) -> Result<()> {
        match self {
            Driver::Embedded { store, .. } => Ok(store.close()?),
            _ => Ok(()),
        }
    }
}

impl ProducerHandle {
    /// Sends `values` (one request where the system has requests: an append of one batch,
    /// a pipeline of XADDs; the rill client batches by itself) and returns the future of
    /// their acknowledgement. The send is under way when this returns.
    pub async fn send(&mut self, values: Vec<Bytes>) -> Result<AckFuture> {
        match self {
            ProducerHandle::Embedded { partitions, next } => {
                let partition = &partitions[*next % partitions.len()];
                *next += 1;
                let records: Vec<Record> = values.into_iter().map(Record::from_value).collect();
                let handle = partition.append_records(&records, Compression::None)?;
                Ok(Box::pin(async move {
                    handle.await?;
                    Ok(())
                }))
            }
            ProducerHandle::ServerBatch { client, topic, partitions, next, acks } => {
                let partition = (*next % *partitions as usize) as u32;
                *next += 1;
                let mut builder = BatchBuilder::new(Compression::None, crate::now_ms());
                for value in values {
                    builder.push(&Record::from_value(value))?;
                }
                let batch = builder.build()?.freeze();
                let ack = client.produce_pipelined(topic, partition, *acks, batch).await?;
                Ok(Box::pin(async move {
                    ack.await?;
                    Ok(())
                }))
            }
            ProducerHandle::Kafka(p) => p.send(values),
            ProducerHandle::Server { producer, topic } => {
                let sends: Vec<_> = values.into_iter().map(|v| producer.send(topic, None, v, Vec::new())).collect();
                Ok(Box::pin(async move {
                    for send in sends {
                        send.await?;
                    }
                    Ok(())
                }))
            }
            #[cfg(feature = "peers")]
            ProducerHandle::Redis(p) => p.send(values),
            #[cfg(feature = "peers")]
            ProducerHandle::Nats(p) => p.send(values).await,
        }
    }

    /// Flushes and closes.
    pub async fn close(self) {
        if let ProducerHandle::Server { producer, .. } = self {
            producer.close().await;
        }
    }
}

impl ConsumerHandle {
    /// The next messages' values, waiting up to [`POLL_WAIT`] for some (empty if none came).
    pub async fn next(&mut self) -> Result<Vec<Bytes>> {
        match self {
            ConsumerHandle::Embedded { partition, offset } => {
                let mut buf = partition.read(*offset, READ_MAX_BYTES)?;
                if buf.is_empty() {
                    // Timing out is the normal way of finding nothing new.
                    let _ = tokio::time::timeout(POLL_WAIT, partition.wait_for_async(*offset)).await;
                    buf = partition.read(*offset, READ_MAX_BYTES)?;
                }
                let mut values = Vec::new();
                for batch in BatchIter::new(buf) {
                    let batch = batch?;
                    for record in batch.records()? {
                        if record.offset >= *offset {
                            values.push(record.value.unwrap_or_default());
                        }
                    }
                    *offset = batch.header().next_offset();
                }
                Ok(values)
            }
            ConsumerHandle::Server { client, topic, partition, offset } => {
                let wait_ms = u32::try_from(POLL_WAIT.as_millis()).unwrap_or(u32::MAX);
                let fetched = client.fetch(topic, *partition, *offset, READ_MAX_BYTES as u32, wait_ms).await?;
                let (records, next) = decode_fetched(*partition, *offset, fetched.records)?;
                *offset = next;
                Ok(records.into_iter().map(|r| r.value.unwrap_or_default()).collect())
            }
            ConsumerHandle::Kafka(c) => c.next().await,
            #[cfg(feature = "peers")]
            ConsumerHandle::Redis(c) => c.next().await,
            #[cfg(feature = "peers")]
            ConsumerHandle::Nats(c) => c.next().await,
        }
    }
}
