//! Drivers of the peers (feature `peers`): Redis Streams through the `redis` crate (tokio,
//! multiplexed connections, XADD pipelines, XREADGROUP) and NATS JetStream through
//! `async-nats` (publish with asynchronous acks, pull consumers).

use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, AsyncConnectionConfig};

use crate::load::drivers::{AckFuture, Durability, POLL_WAIT};
use crate::summary::Result;

/// Most messages one consumer read returns.
const READ_COUNT: usize = 1000;
/// The field that holds a message's bytes in a Redis stream entry.
const FIELD: &str = "v";

fn redis_key(stream: &str, partition: u32) -> String {
    format!("{stream}-{partition}")
}

/// A Redis server; durability is set with `CONFIG SET` when a stream is created.
pub struct RedisDriver {
    client: redis::Client,
    admin: MultiplexedConnection,
}

/// One producer: its own connection; each send is one pipeline of XADDs.
pub struct RedisProducer {
    con: MultiplexedConnection,
    keys: Vec<String>,
    next: usize,
}

/// One consumer group's reader of one stream key, on its own connection.
pub struct RedisConsumer {
    con: MultiplexedConnection,
    key: String,
    group: String,
    name: String,
}

async fn redis_connection(client: &redis::Client) -> Result<MultiplexedConnection> {
    // The default response timeout (0.5 s) is shorter than a loaded fsync=always pipeline.
    let config = AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(30)));
    Ok(client.get_multiplexed_async_connection_with_config(&config).await?)
}

impl RedisDriver {
    /// Connects to `url` (`redis://127.0.0.1:6379`).
    pub async fn connect(url: &str) -> Result<RedisDriver> {
        let client = redis::Client::open(url)?;
        let admin = redis_connection(&client).await?;
        Ok(RedisDriver { client, admin })
    }

    /// Sets the AOF to match `durability`, then creates the stream keys (empty, via a
    /// consumer group with MKSTREAM).
    pub async fn create(&self, stream: &str, partitions: u32, durability: Durability) -> Result<()> {
        let mut con = self.admin.clone();
        let (appendonly, fsync) = match durability {
            Durability::Always => ("yes", "always"),
            Durability::Relaxed => ("yes", "everysec"),
            Durability::None => ("no", "everysec"),
        };
        redis::cmd("CONFIG").arg("SET").arg("appendfsync").arg(fsync).query_async::<()>(&mut con).await?;
        redis::cmd("CONFIG").arg("SET").arg("appendonly").arg(appendonly).query_async::<()>(&mut con).await?;
        // Switching the AOF on starts a rewrite in the background; let it finish first.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let info: String = redis::cmd("INFO").arg("persistence").query_async(&mut con).await?;
            let busy = info.lines().any(|l| {
                l.trim() == "aof_rewrite_in_progress:1"
                    || l.trim() == "aof_rewrite_scheduled:1"
                    || l.trim() == "rdb_bgsave_in_progress:1"
            });
            if !busy || std::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for p in 0..partitions {
            let key = redis_key(stream, p);
            let _: () = con.del(&key).await?;
        }
        Ok(())
    }

    /// Deletes the stream keys.
    pub async fn delete(&self, stream: &str, partitions: u32) -> Result<()> {
        let mut con = self.admin.clone();
        for p in 0..partitions {
            let _: () = con.del(redis_key(stream, p)).await?;
        }
        Ok(())
    }

    /// A producer on its own connection.
    pub async fn producer(&self, stream: &str, partitions: u32, id: usize) -> Result<RedisProducer> {
        Ok(RedisProducer {
            con: redis_connection(&self.client).await?,
            keys: (0..partitions).map(|p| redis_key(stream, p)).collect(),
            next: id,
        })
    }

    /// A reader in group `g<group>` of the partition's key, from its start.
    pub async fn consumer(&self, stream: &str, partition: u32, group: usize) -> Result<RedisConsumer> {
        let mut con = redis_connection(&self.client).await?;
        let key = redis_key(stream, partition);
        let group = format!("g{group}");
        let _: () = con.xgroup_create_mkstream(&key, &group, "0").await?;
        Ok(RedisConsumer { con, key, group, name: "c".into() })
    }
}

impl RedisProducer {
    /// One pipeline of `XADD key * v <value>`, one per value; spawned, so it is under way
    /// when this returns.
    pub fn send(&mut self, values: Vec<Bytes>) -> Result<AckFuture> {
        let key = &self.keys[self.next % self.keys.len()];
        self.next += 1;
        let mut pipe = redis::pipe();
        for value in values {
            pipe.cmd("XADD").arg(key).arg("*").arg(FIELD).arg(value.as_ref()).ignore();
        }
        let mut con = self.con.clone();
        let task = tokio::spawn(async move { pipe.query_async::<()>(&mut con).await });
        Ok(Box::pin(async move {
            task.await??;
            Ok(())
        }))
    }
}

impl RedisConsumer {
    /// `XREADGROUP GROUP g c COUNT 1000 BLOCK 100 NOACK STREAMS key >`.
    pub async fn next(&mut self) -> Result<Vec<Bytes>> {
        let options = StreamReadOptions::default()
            .group(&self.group, &self.name)
            .count(READ_COUNT)
            .block(POLL_WAIT.as_millis() as usize)
            .noack();
        let reply: Option<StreamReadReply> = self.con.xread_options(&[&self.key], &[">"], &options).await?;
        let mut values = Vec::new();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in key.ids {
                match entry.map.get(FIELD) {
                    Some(redis::Value::BulkString(bytes)) => values.push(Bytes::copy_from_slice(bytes)),
                    other => return Err(format!("stream entry without field {FIELD}: {other:?}").into()),
                }
            }
        }
        Ok(values)
    }
}

fn nats_stream(stream: &str, partition: u32) -> String {
    format!("{stream}-{partition}")
}

fn nats_subject(stream: &str, partition: u32) -> String {
    format!("{stream}.{partition}")
}

/// A NATS server with JetStream enabled; its durability (`sync_interval`) is the server's
/// configuration, chosen by whoever started it (`bench/peers.sh` starts one per setting).
pub struct NatsDriver {
    url: String,
    js: async_nats::jetstream::Context,
}

/// One producer: its own connection; publishes with asynchronous acks.
pub struct NatsProducer {
    js: async_nats::jetstream::Context,
    subjects: Vec<String>,
    next: usize,
}

/// A pull consumer of one partition's stream, delivering everything from the start.
pub struct NatsConsumer {
    messages: async_nats::jetstream::consumer::pull::Stream,
}

impl NatsDriver {
    /// Connects to `url` (`nats://127.0.0.1:4222`).
    pub async fn connect(url: &str) -> Result<NatsDriver> {
        let client = async_nats::connect(url).await?;
        Ok(NatsDriver { url: url.to_string(), js: async_nats::jetstream::new(client) })
    }

    /// One file-backed stream per partition.
    pub async fn create(&self, stream: &str, partitions: u32) -> Result<()> {
        for p in 0..partitions {
            let config = async_nats::jetstream::stream::Config {
                name: nats_stream(stream, p),
                subjects: vec![nats_subject(stream, p)],
                storage: async_nats::jetstream::stream::StorageType::File,
                ..Default::default()
            };
            self.js.create_stream(config).await?;
        }
        Ok(())
    }

    /// Deletes the streams.
    pub async fn delete(&self, stream: &str, partitions: u32) -> Result<()> {
        for p in 0..partitions {
            self.js.delete_stream(nats_stream(stream, p)).await?;
        }
        Ok(())
    }

    /// A producer on its own connection.
    pub async fn producer(&self, stream: &str, partitions: u32, _id: usize) -> Result<NatsProducer> {
        let client = async_nats::connect(self.url.as_str()).await?;
        Ok(NatsProducer {
            js: async_nats::jetstream::new(client),
            subjects: (0..partitions).map(|p| nats_subject(stream, p)).collect(),
            next: _id,
        })
    }

    /// An ephemeral pull consumer (no acks, from the first message) on its own connection.
    pub async fn consumer(&self, stream: &str, partition: u32, _group: usize) -> Result<NatsConsumer> {
        let client = async_nats::connect(self.url.as_str()).await?;
        let js = async_nats::jetstream::new(client);
        let stream = js.get_stream(nats_stream(stream, partition)).await?;
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::Config {
                ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
                deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await?;
        Ok(NatsConsumer { messages: consumer.messages().await? })
    }
}

impl NatsProducer {
    /// Publishes every value (each is on the connection when this returns); the future
    /// awaits their JetStream acks.
    pub async fn send(&mut self, values: Vec<Bytes>) -> Result<AckFuture> {
        let subject = self.subjects[self.next % self.subjects.len()].clone();
        self.next += 1;
        let mut acks = Vec::with_capacity(values.len());
        for value in values {
            acks.push(self.js.publish(subject.clone(), value).await?);
        }
        Ok(Box::pin(async move {
            for ack in acks {
                ack.await?;
            }
            Ok(())
        }))
    }
}

impl NatsConsumer {
    /// Waits up to [`POLL_WAIT`] for a message, then takes those already there (up to 1000).
    pub async fn next(&mut self) -> Result<Vec<Bytes>> {
        let mut values = Vec::new();
        let first = match tokio::time::timeout(POLL_WAIT, self.messages.next()).await {
            Ok(Some(message)) => message?,
            Ok(None) => return Err("the NATS consumer's message stream ended".into()),
            Err(_elapsed) => return Ok(values),
        };
        values.push(first.message.payload.clone());
        while values.len() < READ_COUNT {
            match self.messages.next().now_or_never() {
                Some(Some(message)) => values.push(message?.message.payload.clone()),
                Some(None) => return Err("the NATS consumer's message stream ended".into()),
                None => break,
            }
        }
        Ok(values)
    }
}
