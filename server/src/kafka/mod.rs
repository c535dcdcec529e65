//! The Kafka listener: a second front door of `rill serve` that speaks the Kafka wire
//! protocol over the same engine, so Kafka clients (librdkafka, kafka-python, …) produce to
//! and consume from rill unchanged. Enabled by `kafka_listen`; specified in
//! `docs/protocol.md`, "Kafka listener".
//!
//! It owns: Kafka framing (a big-endian i32 size, then the request header and body, decoded
//! with the `kafka-protocol` crate), answering requests in order per connection, the api
//! and version table ([`SUPPORTED`]), record batch translation ([`records`]) and Kafka's
//! client-assigned consumer groups ([`group`]). The engine does everything else: appends,
//! idempotent sequencing, reads, offsets.

pub mod group;
mod handlers;
pub mod records;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::{ApiKey, ApiVersionsResponse, RequestHeader, RequestKind, ResponseHeader, ResponseKind};
use kafka_protocol::protocol::{Decodable, Encodable};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use crate::cmd::Shared;
use crate::error::{Error, Result};

/// Requests a Kafka connection may have in flight (Kafka clients pipeline up to 5 by default).
pub const KAFKA_INFLIGHT_REQUESTS_MAX: usize = 64;
/// The broker id this server announces (one node until replication lands).
pub const NODE_ID: i32 = 0;
/// Kafka's `UNSUPPORTED_VERSION`.
const UNSUPPORTED_VERSION: i16 = 35;

/// Every api the listener answers, with the versions it accepts. Clients read this from
/// ApiVersions and use min(their max, ours); anything else closes the connection with a
/// logged reason, as a Kafka broker does.
pub const SUPPORTED: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 9),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::ListOffsets, 1, 7),
    (ApiKey::Metadata, 1, 12),
    (ApiKey::OffsetCommit, 2, 8),
    (ApiKey::OffsetFetch, 1, 7),
    (ApiKey::FindCoordinator, 0, 3),
    (ApiKey::JoinGroup, 0, 5),
    (ApiKey::Heartbeat, 0, 3),
    (ApiKey::LeaveGroup, 0, 3),
    (ApiKey::SyncGroup, 0, 3),
    (ApiKey::ApiVersions, 0, 3),
    (ApiKey::CreateTopics, 2, 5),
    (ApiKey::DeleteTopics, 1, 5),
    (ApiKey::InitProducerId, 0, 4),
];

/// The version range accepted for `key`, if the api is served.
pub fn supported_versions(key: ApiKey) -> Option<(i16, i16)> {
    SUPPORTED.iter().find(|(k, _, _)| *k == key).map(|(_, min, max)| (*min, *max))
}

/// What every Kafka request handler can reach.
#[derive(Debug)]
pub struct KafkaContext {
    /// The server's shared state (store, configuration, metrics, shutdown signal).
    pub shared: Arc<Shared>,
    /// Kafka consumer groups.
    pub groups: Arc<group::KafkaGroups>,
    /// Host announced in Metadata and FindCoordinator.
    pub host: String,
    /// Port announced with `host`.
    pub port: i32,
}

/// Binds the Kafka listener and serves it until shutdown; the returned task ends once
/// every Kafka connection has finished (or the shutdown timeout passed).
/// The Kafka listener, bound, with the address it announces.
#[derive(Debug)]
pub struct KafkaBinding {
    listener: TcpListener,
    /// The bound address.
    pub addr: SocketAddr,
    /// The announced host.
    pub host: String,
    /// The announced port.
    pub port: u16,
}

impl KafkaBinding {
    /// `host:port` as Kafka clients are told to reach this listener.
    pub fn advertised(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Binds `kafka_listen` and works out the announced address (`kafka_advertised_listener`,
/// or the bound address, 127.0.0.1 when bound to all interfaces).
pub async fn bind(config: &crate::config::ServerConfig) -> Result<KafkaBinding> {
    let listener = TcpListener::bind(&config.kafka_listen).await.map_err(|e| Error::io("bind Kafka listener", e))?;
    let addr = listener.local_addr().map_err(|e| Error::io("Kafka listener address", e))?;
    let (host, port) = match config.kafka_advertised_listener.rsplit_once(':') {
        Some((host, port)) => (
            host.to_string(),
            port.parse::<u16>().map_err(|_| Error::Config {
                reason: format!("kafka_advertised_listener {:?} has no valid port", config.kafka_advertised_listener),
            })?,
        ),
        None if addr.ip().is_unspecified() => ("127.0.0.1".to_string(), addr.port()),
        None => (addr.ip().to_string(), addr.port()),
    };
    Ok(KafkaBinding { listener, addr, host, port })
}

/// Serves Kafka clients on `binding` until shutdown.
pub fn start(shared: Arc<Shared>, binding: KafkaBinding) -> (SocketAddr, JoinHandle<()>) {
    let KafkaBinding { listener, addr, host, port } = binding;
    let context =
        Arc::new(KafkaContext { groups: Arc::new(group::KafkaGroups::new()), shared, host, port: i32::from(port) });
    tracing::info!(%addr, advertised = %format!("{}:{}", context.host, context.port), "Kafka listener serving");
    (addr, tokio::spawn(accept_loop(listener, context)))
}

async fn accept_loop(listener: TcpListener, context: Arc<KafkaContext>) {
    let mut stop = context.shared.shutdown.clone();
    let mut connections = JoinSet::new();
    let mut sweep = tokio::time::interval(Duration::from_millis(250));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((socket, peer)) = accepted else { continue };
                if connections.len() >= context.shared.config.max_connections {
                    tracing::warn!(%peer, "Kafka connection refused: max_connections reached");
                    continue;
                }
                connections.spawn(serve_connection(socket, Arc::clone(&context)));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = sweep.tick() => context.groups.expire(Instant::now()),
            _ = stop.wait_for(|stopping| *stopping) => break,
        }
    }
    drop(listener);
    let drain = async { while connections.join_next().await.is_some() {} };
    let timeout = Duration::from_millis(context.shared.config.shutdown_timeout_ms);
    if tokio::time::timeout(timeout, drain).await.is_err() {
        connections.shutdown().await;
    }
}

/// A response in the making: `None` when the request gets no response (Produce with acks=0).
type Pending = JoinHandle<Option<Bytes>>;

async fn serve_connection(socket: TcpStream, context: Arc<KafkaContext>) {
    drop(socket.set_nodelay(true));
    let peer = socket.peer_addr().ok();
    let (mut reader, writer) = socket.into_split();
    let (queue, pending) = mpsc::channel::<Pending>(KAFKA_INFLIGHT_REQUESTS_MAX);
    let writer = tokio::spawn(write_responses(writer, pending));
    let mut stop = context.shared.shutdown.clone();
    let max = context.shared.config.max_frame_bytes;
    loop {
        let frame = tokio::select! {
            frame = read_frame(&mut reader, max) => frame,
            _ = stop.wait_for(|stopping| *stopping) => break,
        };
        let body = match frame {
            Ok(Some(body)) => body,
            Ok(None) => break,
            Err(reason) => {
                tracing::warn!(?peer, %reason, "closing Kafka connection");
                break;
            }
        };
        match start_request(&context, body) {
            Ok(Some(task)) => {
                if queue.send(task).await.is_err() {
                    break;
                }
            }
            Ok(None) => {}
            Err(reason) => {
                tracing::warn!(?peer, %reason, "closing Kafka connection");
                break;
            }
        }
    }
    drop(queue);
    drop(writer.await);
}

/// Reads one size-prefixed frame; `Ok(None)` at a clean end of stream.
async fn read_frame(reader: &mut tokio::net::tcp::OwnedReadHalf, max: u32) -> Result<Option<Bytes>, String> {
    let size = match reader.read_i32().await {
        Ok(size) => size,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(format!("read: {e}")),
    };
    let size = u32::try_from(size).map_err(|_| format!("negative frame size {size}"))?;
    if size > max || size < 8 {
        return Err(format!("frame size {size} outside 8..={max}"));
    }
    let mut body = BytesMut::zeroed(size as usize);
    reader.read_exact(&mut body).await.map_err(|e| format!("read: {e}"))?;
    Ok(Some(body.freeze()))
}

async fn write_responses(writer: tokio::net::tcp::OwnedWriteHalf, mut pending: mpsc::Receiver<Pending>) {
    let mut out = BufWriter::with_capacity(64 * 1024, writer);
    while let Some(task) = pending.recv().await {
        let response = match task.await {
            Ok(response) => response,
            Err(e) => {
                tracing::error!(%e, "Kafka request task failed");
                return;
            }
        };
        if let Some(bytes) = response {
            if out.write_all(&bytes).await.is_err() {
                return;
            }
        }
        if pending.is_empty() && out.flush().await.is_err() {
            return;
        }
    }
    drop(out.flush().await);
    drop(out.shutdown().await);
}

/// Decodes one request and starts it. Produce appends happen here, in arrival order; the
/// rest (waiting for acknowledgements, long polls, group barriers) runs in the task.
fn start_request(context: &Arc<KafkaContext>, mut body: Bytes) -> Result<Option<Pending>, String> {
    let api_key = i16::from_be_bytes([body[0], body[1]]);
    let version = i16::from_be_bytes([body[2], body[3]]);
    let key = ApiKey::try_from(api_key).map_err(|_| format!("unknown api key {api_key}"))?;
    let header = RequestHeader::decode(&mut body, key.request_header_version(version))
        .map_err(|e| format!("{key:?} v{version}: bad request header: {e}"))?;
    if key == ApiKey::ApiVersions && supported_versions(key).is_some_and(|(min, max)| version < min || version > max) {
        // KIP-511: an ApiVersions the broker cannot parse is answered in version 0 with
        // UNSUPPORTED_VERSION and the table, so the client can retry with a version we know.
        let response = api_versions(UNSUPPORTED_VERSION);
        let bytes = encode_response(&header, key, 0, &ResponseKind::ApiVersions(response))?;
        return Ok(Some(tokio::spawn(async move { Some(bytes) })));
    }
    let Some((min, max)) = supported_versions(key) else {
        // Not served (and not in ApiVersions): answered with an error where the api has a
        // place for one, else the connection closes.
        let valid = key.valid_versions();
        let unserved = (valid.min..=valid.max)
            .contains(&version)
            .then(|| RequestKind::decode(key, &mut body, version).ok())
            .flatten()
            .and_then(handlers::unserved);
        let Some(response) = unserved else {
            return Err(format!("api {key:?} v{version} is not served by rill"));
        };
        tracing::debug!(?key, version, "Kafka api not served: answered with an error");
        let bytes = encode_response(&header, key, version, &response)?;
        return Ok(Some(tokio::spawn(async move { Some(bytes) })));
    };
    if version < min || version > max {
        return Err(format!("{key:?} v{version} is outside the served versions {min}..={max}"));
    }
    let request = RequestKind::decode(key, &mut body, version).map_err(|e| format!("{key:?} v{version}: {e}"))?;
    if body.has_remaining() {
        tracing::debug!(?key, version, trailing = body.remaining(), "trailing bytes after a Kafka request");
    }
    let context = Arc::clone(context);
    if let RequestKind::Produce(produce) = request {
        let acks = produce.acks;
        let started = handlers::produce_start(&context, produce);
        let task = tokio::spawn(async move {
            let response = handlers::produce_finish(&context, started, version).await;
            if acks == 0 {
                return None;
            }
            respond(&header, key, version, ResponseKind::Produce(response))
        });
        return Ok(if acks == 0 { None } else { Some(task) });
    }
    Ok(Some(tokio::spawn(async move {
        let response = handlers::execute(&context, &header, request, version).await;
        respond(&header, key, version, response)
    })))
}

fn respond(header: &RequestHeader, key: ApiKey, version: i16, response: ResponseKind) -> Option<Bytes> {
    match encode_response(header, key, version, &response) {
        Ok(bytes) => Some(bytes),
        Err(reason) => {
            // A bug in a handler (a field set that this version lacks); the client times out.
            tracing::error!(%reason, "cannot encode a Kafka response");
            None
        }
    }
}

/// Size prefix, response header and body.
fn encode_response(header: &RequestHeader, key: ApiKey, version: i16, body: &ResponseKind) -> Result<Bytes, String> {
    let mut buf = BytesMut::with_capacity(256);
    buf.put_i32(0);
    ResponseHeader::default()
        .with_correlation_id(header.correlation_id)
        .encode(&mut buf, key.response_header_version(version))
        .map_err(|e| format!("{key:?} v{version} response header: {e}"))?;
    body.encode(&mut buf, version).map_err(|e| format!("{key:?} v{version} response: {e}"))?;
    let size = i32::try_from(buf.len() - 4).map_err(|_| format!("{key:?} response of {} bytes", buf.len()))?;
    buf[..4].copy_from_slice(&size.to_be_bytes());
    Ok(buf.freeze())
}

/// The ApiVersions table with `error_code`.
fn api_versions(error_code: i16) -> ApiVersionsResponse {
    let mut response = ApiVersionsResponse::default();
    response.error_code = error_code;
    response.api_keys = SUPPORTED
        .iter()
        .map(|(key, min, max)| {
            let mut v = ApiVersion::default();
            v.api_key = *key as i16;
            v.min_version = *min;
            v.max_version = *max;
            v
        })
        .collect();
    response
}
