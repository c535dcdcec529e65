//! Server metrics: atomic counters updated on the request path and a Prometheus text page
//! (plus `/health`) served on a separate loopback HTTP listener.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use rill_engine::metrics::{HistogramSnapshot, LATENCY_BUCKETS_US};
use rill_engine::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::messages::api;

/// Appends a line to a `String` (formatting into a `String` cannot fail).
macro_rules! line {
    ($out:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        writeln!($out, $($arg)*).expect("writing to a String cannot fail");
    }};
}

/// Why a frame or connection was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// Length prefix over the frame limit (connection closed).
    Oversize,
    /// Frame too short for a request header, or a header that does not parse (closed).
    MalformedHeader,
    /// Unknown api key (answered with an error).
    UnknownApi,
    /// Unsupported api version (answered with an error).
    UnsupportedVersion,
    /// Body does not parse (answered with an error).
    MalformedBody,
    /// Connection over `max_connections` (closed).
    TooManyConnections,
}

const REJECTIONS: [(Rejection, &str); 6] = [
    (Rejection::Oversize, "oversize"),
    (Rejection::MalformedHeader, "malformed_header"),
    (Rejection::UnknownApi, "unknown_api"),
    (Rejection::UnsupportedVersion, "unsupported_version"),
    (Rejection::MalformedBody, "malformed_body"),
    (Rejection::TooManyConnections, "too_many_connections"),
];

const API_NAMES: [&str; api::COUNT as usize] = [
    "api_versions",
    "metadata",
    "create_topic",
    "delete_topic",
    "list_topics",
    "init_producer_id",
    "produce",
    "fetch",
    "list_offsets",
    "commit_offset",
    "fetch_offset",
    "stats",
    "create_priority_topic",
    "produce_lane",
    "priority_poll",
    "priority_ack",
    "priority_nack",
    "priority_extend_lease",
    "replay_dlq",
    "priority_open",
    "priority_close",
    "join_group",
    "group_heartbeat",
    "leave_group",
    "member_commit_offset",
    "replica_fetch",
    "epoch_end_offset",
    "leaders",
];

/// Per-topic traffic counters.
#[derive(Debug, Default)]
pub struct TopicCounters {
    /// Records appended.
    pub produce_records: AtomicU64,
    /// Batch bytes appended.
    pub produce_bytes: AtomicU64,
    /// Fetch requests answered.
    pub fetch_requests: AtomicU64,
    /// Bytes returned by fetches.
    pub fetch_bytes: AtomicU64,
}

/// All server counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Connections currently open.
    pub connections_open: AtomicI64,
    /// Connections accepted since start.
    pub connections_total: AtomicU64,
    rejected: [AtomicU64; REJECTIONS.len()],
    requests: [AtomicU64; api::COUNT as usize],
    request_errors: [AtomicU64; api::COUNT as usize],
    /// Produce requests answered `Throttled`.
    pub throttled: AtomicU64,
    topics: Mutex<HashMap<String, Arc<TopicCounters>>>,
    /// Set once shutdown begins (health turns 503).
    pub shutting_down: AtomicBool,
}

impl Metrics {
    /// Counts a rejected frame or connection.
    pub fn reject(&self, why: Rejection) {
        let i = REJECTIONS.iter().position(|(r, _)| *r == why).expect("every rejection is listed");
        self.rejected[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Total rejections of one kind.
    pub fn rejected(&self, why: Rejection) -> u64 {
        let i = REJECTIONS.iter().position(|(r, _)| *r == why).expect("every rejection is listed");
        self.rejected[i].load(Ordering::Relaxed)
    }

    /// Counts a request, and whether it failed.
    pub fn request(&self, api_key: u16, failed: bool) {
        if let Some(counter) = self.requests.get(usize::from(api_key)) {
            counter.fetch_add(1, Ordering::Relaxed);
            if failed {
                self.request_errors[usize::from(api_key)].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The counters of a topic.
    pub fn topic(&self, topic: &str) -> Arc<TopicCounters> {
        let mut topics = self.topics.lock();
        if let Some(counters) = topics.get(topic) {
            return Arc::clone(counters);
        }
        let counters = Arc::new(TopicCounters::default());
        topics.insert(topic.to_string(), Arc::clone(&counters));
        counters
    }

    /// Plain name/value pairs for the `Stats` request.
    pub fn stats(&self) -> Vec<(String, u64)> {
        let mut out = vec![
            ("connections_open".to_string(), self.connections_open.load(Ordering::Relaxed).max(0) as u64),
            ("connections_total".to_string(), self.connections_total.load(Ordering::Relaxed)),
            ("throttled_total".to_string(), self.throttled.load(Ordering::Relaxed)),
        ];
        for (i, (_, name)) in REJECTIONS.iter().enumerate() {
            out.push((format!("rejected_{name}_total"), self.rejected[i].load(Ordering::Relaxed)));
        }
        for (i, name) in API_NAMES.iter().enumerate() {
            out.push((format!("requests_{name}_total"), self.requests[i].load(Ordering::Relaxed)));
        }
        out
    }

    /// Renders the Prometheus text exposition page.
    pub fn render(&self, store: &Store) -> String {
        let mut out = String::with_capacity(4096);
        let gauge = |out: &mut String, name: &str, help: &str| {
            line!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        };
        let counter = |out: &mut String, name: &str, help: &str| {
            line!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        };
        gauge(&mut out, "rill_connections_open", "Open client connections.");
        line!(out, "rill_connections_open {}", self.connections_open.load(Ordering::Relaxed));
        counter(&mut out, "rill_connections_total", "Connections accepted.");
        line!(out, "rill_connections_total {}", self.connections_total.load(Ordering::Relaxed));
        counter(&mut out, "rill_rejected_total", "Frames or connections rejected, by reason.");
        for (i, (_, name)) in REJECTIONS.iter().enumerate() {
            line!(out, "rill_rejected_total{{reason=\"{name}\"}} {}", self.rejected[i].load(Ordering::Relaxed));
        }
        counter(&mut out, "rill_throttled_total", "Produce requests answered Throttled.");
        line!(out, "rill_throttled_total {}", self.throttled.load(Ordering::Relaxed));
        counter(&mut out, "rill_requests_total", "Requests handled, by api.");
        for (i, name) in API_NAMES.iter().enumerate() {
            line!(out, "rill_requests_total{{api=\"{name}\"}} {}", self.requests[i].load(Ordering::Relaxed));
        }
        counter(&mut out, "rill_request_errors_total", "Requests answered with an error, by api.");
        for (i, name) in API_NAMES.iter().enumerate() {
            let v = self.request_errors[i].load(Ordering::Relaxed);
            line!(out, "rill_request_errors_total{{api=\"{name}\"}} {v}");
        }
        self.render_topics(&mut out, store);
        out
    }

    fn render_topics(&self, out: &mut String, store: &Store) {
        let topics: Vec<(String, Arc<TopicCounters>)> =
            self.topics.lock().iter().map(|(k, v)| (k.clone(), Arc::clone(v))).collect();
        for (name, help, get) in [
            ("rill_produce_records_total", "Records appended.", 0usize),
            ("rill_produce_bytes_total", "Batch bytes appended.", 1),
            ("rill_fetch_requests_total", "Fetch requests answered.", 2),
            ("rill_fetch_bytes_total", "Bytes returned by fetches.", 3),
        ] {
            line!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (topic, c) in &topics {
                let v = [&c.produce_records, &c.produce_bytes, &c.fetch_requests, &c.fetch_bytes][get]
                    .load(Ordering::Relaxed);
                line!(out, "{name}{{topic=\"{topic}\"}} {v}");
            }
        }
        line!(out, "# HELP rill_log_end_offset Next offset to be written.\n# TYPE rill_log_end_offset gauge");
        let mut sizes = String::new();
        let mut starts = String::new();
        let mut fsync = HistogramSnapshot::default();
        for topic_name in store.topics() {
            let Ok(topic) = store.topic(&topic_name) else { continue };
            for p in topic.partitions() {
                let labels = format!("topic=\"{topic_name}\",partition=\"{}\"", p.id());
                line!(out, "rill_log_end_offset{{{labels}}} {}", p.end_offset());
                line!(starts, "rill_log_start_offset{{{labels}}} {}", p.log_start_offset());
                line!(sizes, "rill_log_size_bytes{{{labels}}} {}", p.size_bytes());
                fsync.merge(&p.fsync_latency());
            }
        }
        line!(out, "# HELP rill_log_start_offset First offset held.\n# TYPE rill_log_start_offset gauge");
        out.push_str(&starts);
        line!(out, "# HELP rill_log_size_bytes Bytes on disk.\n# TYPE rill_log_size_bytes gauge");
        out.push_str(&sizes);
        line!(out, "# HELP rill_consumer_lag Records between a group's committed offset and the end.");
        line!(out, "# TYPE rill_consumer_lag gauge");
        for (key, offset) in store.consumer_offsets().all() {
            if let Ok(p) = store.partition(&key.topic, key.partition) {
                let lag = p.end_offset().saturating_sub(offset);
                line!(
                    out,
                    "rill_consumer_lag{{group=\"{}\",topic=\"{}\",partition=\"{}\"}} {lag}",
                    key.group,
                    key.topic,
                    key.partition
                );
            }
        }
        render_histogram(out, "rill_fsync_latency_seconds", "Latency of fdatasync calls.", &fsync);
        render_priority_cursors(out, store);
    }
}

/// Queue depth, oldest ready age and DLQ size of every open priority cursor.
fn render_priority_cursors(out: &mut String, store: &Store) {
    let cursors: Vec<_> = store
        .open_priority_cursors()
        .into_iter()
        .map(|c| (c.topic().name().to_string(), c.name().to_string(), c.stats()))
        .collect();
    for (name, help, pick) in [
        ("rill_priority_ready", "Messages ready for delivery, by lane.", 0usize),
        ("rill_priority_waiting", "Messages waiting out a retry backoff, by lane.", 1),
        ("rill_priority_in_flight", "Leases held, by lane.", 2),
        ("rill_priority_oldest_ready_age_seconds", "Age of the oldest ready message, by lane.", 3),
    ] {
        line!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (topic, cursor, stats) in &cursors {
            for (lane, l) in stats.lanes.iter().enumerate() {
                let labels = format!("topic=\"{topic}\",cursor=\"{cursor}\",lane=\"p{lane}\"");
                match pick {
                    0 => line!(out, "{name}{{{labels}}} {}", l.ready),
                    1 => line!(out, "{name}{{{labels}}} {}", l.waiting),
                    2 => line!(out, "{name}{{{labels}}} {}", l.in_flight),
                    _ => line!(out, "{name}{{{labels}}} {}", l.oldest_ready_age_ms as f64 / 1e3),
                }
            }
        }
    }
    line!(out, "# HELP rill_priority_dlq_size Records in the dead-letter topic.\n# TYPE rill_priority_dlq_size gauge");
    for (topic, cursor, stats) in &cursors {
        line!(out, "rill_priority_dlq_size{{topic=\"{topic}\",cursor=\"{cursor}\"}} {}", stats.dlq_size);
    }
}

fn render_histogram(out: &mut String, name: &str, help: &str, h: &HistogramSnapshot) {
    line!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    let mut cumulative = 0;
    for (i, bound_us) in LATENCY_BUCKETS_US.iter().enumerate() {
        cumulative += h.buckets.get(i).copied().unwrap_or(0);
        line!(out, "{name}_bucket{{le=\"{}\"}} {cumulative}", *bound_us as f64 / 1e6);
    }
    line!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
    line!(out, "{name}_sum {}", h.sum_us as f64 / 1e6);
    line!(out, "{name}_count {}", h.count);
}

/// Serves `GET /metrics` and `GET /health` until the listener fails or the task is dropped.
pub async fn serve_http(listener: TcpListener, metrics: Arc<Metrics>, store: Arc<Store>) {
    loop {
        let Ok((socket, _)) = listener.accept().await else { continue };
        let metrics = Arc::clone(&metrics);
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            // A client that sends garbage or disconnects only loses its own answer.
            drop(answer_http(socket, &metrics, &store).await);
        });
    }
}

async fn answer_http(mut socket: TcpStream, metrics: &Metrics, store: &Store) -> std::io::Result<()> {
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") && len < buf.len() {
            let n = socket.read(&mut buf[len..]).await?;
            if n == 0 {
                break;
            }
            len += n;
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return Ok(());
    }
    let request = String::from_utf8_lossy(&buf[..len]);
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let (status, content_type, body) = match path {
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.render(store)),
        "/health" if metrics.shutting_down.load(Ordering::Relaxed) => {
            ("503 Service Unavailable", "text/plain", "shutting down\n".to_string())
        }
        "/health" => ("200 OK", "text/plain", "ok\n".to_string()),
        _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await?;
    socket.write_all(body.as_bytes()).await?;
    socket.shutdown().await
}
