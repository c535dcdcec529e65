//! Server configuration: embedded defaults, overridden by a TOML file, overridden by flags.
//! Every key is documented in `docs/operations.md`.

use std::path::{Path, PathBuf};

use rill_engine::FsyncPolicy;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::limits::{CONNECTIONS_MAX, CONNECTION_INFLIGHT_BYTES_MAX, FRAME_SIZE_BYTES_MAX, SERVER_INFLIGHT_BYTES_MAX};

/// Default listener of the binary protocol.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7400";
/// Default listener of the metrics and health endpoints.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:7401";
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "rill-data";

/// Defaults for topics created without explicit settings.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TopicDefaults {
    /// Partitions of a new topic.
    pub partitions: u32,
    /// `"always"`, `"never"` or `"interval"`.
    pub fsync: String,
    /// Interval for `fsync = "interval"`.
    pub fsync_interval_ms: u64,
    /// Segment size.
    pub segment_size_bytes: u64,
    /// Retention by size (absent: unlimited).
    pub retention_bytes: Option<u64>,
    /// Retention by age (absent: unlimited).
    pub retention_ms: Option<u64>,
}

impl Default for TopicDefaults {
    fn default() -> Self {
        let engine = rill_engine::TopicConfig::default();
        TopicDefaults {
            partitions: 1,
            fsync: "always".into(),
            fsync_interval_ms: 1000,
            segment_size_bytes: engine.segment_size_bytes,
            retention_bytes: engine.retention_bytes,
            retention_ms: engine.retention_ms,
        }
    }
}

impl TopicDefaults {
    /// The fsync policy these defaults name.
    pub fn fsync_policy(&self) -> Result<FsyncPolicy> {
        parse_fsync(&self.fsync, self.fsync_interval_ms)
    }
}

/// Parses `always`, `never`, `interval` (with `interval_ms`) or `interval:<ms>`.
pub fn parse_fsync(text: &str, interval_ms: u64) -> Result<FsyncPolicy> {
    match text {
        "always" => Ok(FsyncPolicy::Always),
        "never" => Ok(FsyncPolicy::Never),
        "interval" => Ok(FsyncPolicy::Interval { interval_ms }),
        other => match other.strip_prefix("interval:").map(str::parse::<u64>) {
            Some(Ok(ms)) => Ok(FsyncPolicy::Interval { interval_ms: ms }),
            _ => Err(Error::Config {
                reason: format!("fsync must be always, never, interval or interval:<ms>, got '{other}'"),
            }),
        },
    }
}

/// The whole server configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Store directory.
    pub data_dir: PathBuf,
    /// Binary protocol listener.
    pub listen: String,
    /// Metrics/health HTTP listener; empty disables it.
    pub metrics_listen: String,
    /// Most concurrent connections; more are accepted and closed at once.
    pub max_connections: usize,
    /// Largest request frame.
    pub max_frame_bytes: u32,
    /// Request bytes in flight per connection before produce requests are throttled.
    pub connection_inflight_bytes_max: u64,
    /// Request bytes in flight in the whole server before produce requests are throttled.
    pub server_inflight_bytes_max: u64,
    /// How long a graceful shutdown waits for in-flight requests.
    pub shutdown_timeout_ms: u64,
    /// A priority cursor no request used for this long, holding no lease, is closed (its
    /// state is on disk; the next poll opens it again).
    pub priority_cursor_idle_close_ms: u64,
    /// File I/O backend: `std` (system calls) or `uring` (io_uring; falls back to `std`
    /// with a warning where the kernel refuses it).
    pub io_backend: String,
    /// Kafka-protocol listener (docs/protocol.md, "Kafka listener"); empty disables it.
    pub kafka_listen: String,
    /// `host:port` the Kafka listener announces in Metadata and FindCoordinator; empty
    /// announces the bound address (127.0.0.1 when bound to all interfaces).
    pub kafka_advertised_listener: String,
    /// Whether a Kafka Metadata request for a missing topic creates it (with the topic
    /// defaults), as Kafka's `auto.create.topics.enable`. Off: a typo gets
    /// UNKNOWN_TOPIC_OR_PARTITION instead of a new topic.
    pub kafka_auto_create_topics: bool,
    /// This node's id in a replicated cluster (from 1); 0, the default, runs one node on
    /// its own. Producer ids this node issues carry it (docs/format.md).
    pub node_id: u32,
    /// In a cluster: fewest in-sync replicas (the leader included) for a write.
    pub min_insync_replicas: usize,
    /// In a cluster: a follower not caught up for this long leaves the ISR.
    pub replica_lag_time_max_ms: u64,
    /// In a cluster: every controller voter as `"<node id>=<host:port>"`, this node's
    /// included (the same ids on every node); this node's controller listens on its entry.
    /// Empty with a `node_id`: no controller runs, and partition roles come from the
    /// program that embeds the server (`ServerHandle::cluster`).
    pub peers: Vec<String>,
    /// In a cluster: replicas of each partition of a topic created without saying.
    pub replication_factor: u32,
    /// In a cluster: a node whose heartbeats stop this long is marked down and loses the
    /// partitions it leads.
    pub node_timeout_ms: u64,
    /// In a cluster: how long an `acks = all` write waits for the in-sync replicas before
    /// it is answered with a timeout.
    pub replica_ack_timeout_ms: u64,
    /// In a cluster: the `host:port` other nodes fetch from (this node's rill listener);
    /// empty announces the bound address.
    pub advertised_listener: String,
    /// Defaults for new topics.
    pub topic_defaults: TopicDefaults,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            listen: DEFAULT_LISTEN.into(),
            metrics_listen: DEFAULT_METRICS_LISTEN.into(),
            max_connections: CONNECTIONS_MAX,
            max_frame_bytes: FRAME_SIZE_BYTES_MAX,
            connection_inflight_bytes_max: CONNECTION_INFLIGHT_BYTES_MAX,
            server_inflight_bytes_max: SERVER_INFLIGHT_BYTES_MAX,
            shutdown_timeout_ms: 10_000,
            priority_cursor_idle_close_ms: 60_000,
            io_backend: "std".into(),
            kafka_listen: String::new(),
            kafka_advertised_listener: String::new(),
            kafka_auto_create_topics: false,
            node_id: 0,
            min_insync_replicas: 2,
            replica_lag_time_max_ms: 10_000,
            peers: Vec::new(),
            replication_factor: 3,
            node_timeout_ms: 3_000,
            replica_ack_timeout_ms: 30_000,
            advertised_listener: String::new(),
            topic_defaults: TopicDefaults::default(),
        }
    }
}

impl ServerConfig {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config { reason: format!("cannot read {}: {e}", path.display()) })?;
        Self::from_toml(&text).map_err(|e| Error::Config { reason: format!("{}: {e}", path.display()) })
    }

    /// Parses TOML over the defaults.
    pub fn from_toml(text: &str) -> Result<Self> {
        let config: ServerConfig = toml::from_str(text).map_err(|e| Error::Config { reason: e.to_string() })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values against their limits.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::Config { reason });
        if self.max_frame_bytes == 0 || self.max_frame_bytes > FRAME_SIZE_BYTES_MAX {
            return bad(format!("max_frame_bytes must be in 1..={FRAME_SIZE_BYTES_MAX}"));
        }
        if self.connection_inflight_bytes_max < u64::from(self.max_frame_bytes) {
            return bad("connection_inflight_bytes_max must be at least max_frame_bytes".into());
        }
        if self.server_inflight_bytes_max < self.connection_inflight_bytes_max {
            return bad("server_inflight_bytes_max must be at least connection_inflight_bytes_max".into());
        }
        if self.max_connections == 0 {
            return bad("max_connections must be positive".into());
        }
        if rill_engine::io::Backend::parse(&self.io_backend).is_none() {
            return bad(format!("io_backend must be \"std\" or \"uring\", not {:?}", self.io_backend));
        }
        if self.priority_cursor_idle_close_ms == 0 {
            return bad("priority_cursor_idle_close_ms must be positive".into());
        }
        if self.node_id > rill_engine::producer::registry::NODE_ID_MAX {
            return bad(format!("node_id must be at most {}", rill_engine::producer::registry::NODE_ID_MAX));
        }
        if self.node_id != 0 {
            if self.min_insync_replicas == 0
                || self.replica_lag_time_max_ms == 0
                || self.node_timeout_ms == 0
                || self.replica_ack_timeout_ms == 0
            {
                return bad(
                    "min_insync_replicas, replica_lag_time_max_ms, node_timeout_ms and replica_ack_timeout_ms must be positive"
                        .into(),
                );
            }
            if self.replication_factor == 0 {
                return bad("replication_factor must be positive".into());
            }
            let peers = self.controller_peers()?;
            if !peers.is_empty() && !peers.contains_key(&self.node_id) {
                return bad(format!("peers must include this node ({}): its controller listens there", self.node_id));
            }
        }
        self.topic_defaults.fsync_policy()?;
        Ok(())
    }

    /// The controller voters from `peers` (`"<id>=<host:port>"` each).
    pub fn controller_peers(&self) -> Result<std::collections::BTreeMap<u32, std::net::SocketAddr>> {
        let mut peers = std::collections::BTreeMap::new();
        for entry in &self.peers {
            let bad = || Error::Config { reason: format!("peer {entry:?} is not <node id>=<host:port>") };
            let (id, addr) = entry.split_once('=').ok_or_else(bad)?;
            let id: u32 = id.trim().parse().map_err(|_| bad())?;
            let addr: std::net::SocketAddr = addr.trim().parse().map_err(|_| bad())?;
            if id == 0 || peers.insert(id, addr).is_some() {
                return Err(Error::Config { reason: format!("peer ids must be unique and from 1 ({entry:?})") });
            }
        }
        Ok(peers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A partial file overrides only what it names; unknown keys and bad values are errors.
    #[test]
    fn toml_overrides_defaults() {
        let config = ServerConfig::from_toml(
            "listen = \"127.0.0.1:9000\"\n[topic_defaults]\nfsync = \"interval:50\"\npartitions = 4\n",
        )
        .expect("parses");
        assert_eq!(config.listen, "127.0.0.1:9000");
        assert_eq!(config.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(config.topic_defaults.partitions, 4);
        assert_eq!(config.topic_defaults.fsync_policy().expect("policy"), FsyncPolicy::Interval { interval_ms: 50 });
        assert!(ServerConfig::from_toml("lisen = \"x\"").is_err());
        assert!(ServerConfig::from_toml("[topic_defaults]\nfsync = \"sometimes\"").is_err());
        assert!(ServerConfig::from_toml("max_frame_bytes = 0").is_err());
        assert_eq!(ServerConfig::from_toml("io_backend = \"uring\"").expect("uring").io_backend, "uring");
        assert!(ServerConfig::from_toml("io_backend = \"aio\"").is_err());
        assert!(ServerConfig::from_toml("priority_cursor_idle_close_ms = 0").is_err());
    }
}
