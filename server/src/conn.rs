//! One client connection: reads frames, starts each request, and writes the responses in
//! request order (requests are pipelined; each runs as its own task).
//!
//! It owns: the socket, its buffers, the connection's in-flight accounting and what happens
//! to bad input. A frame whose length or header cannot be trusted closes the connection
//! (the stream can no longer be parsed); a bad body gets an error response.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::cmd::{execute, produce, Shared};
use crate::error::{Error, ErrorCode};
use crate::frame::{get_request_header, split_frame, RequestHeader, WireReader};
use crate::limits::{CONNECTION_INFLIGHT_REQUESTS_MAX, THROTTLE_RETRY_AFTER_MS};
use crate::messages::{api, Acks, Request, Response, API_VERSION_V1};
use crate::metrics::Rejection;

/// A response slot, in request order.
enum Slot {
    Ready(Vec<Bytes>),
    Pending(JoinHandle<Vec<Bytes>>),
    /// An appended batch: the writer awaits its acknowledgement itself (acknowledgements
    /// are answered in request order anyway, so a task per produce would only add a
    /// spawn and a wake-up per request).
    Produce(Box<ProduceSlot>),
}

struct ProduceSlot {
    header: RequestHeader,
    pending: produce::PendingProduce,
    guard: Option<InflightGuard>,
}

/// Releases in-flight bytes when the request is done.
struct InflightGuard {
    bytes: u64,
    connection: Arc<AtomicU64>,
    shared: Arc<Shared>,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.connection.fetch_sub(self.bytes, Ordering::AcqRel);
        self.shared.inflight_bytes.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Serves one connection until the peer closes it, it sends something unparseable, or the
/// server shuts down (then in-flight requests are answered before the socket closes).
pub async fn serve(socket: TcpStream, shared: Arc<Shared>) {
    // Latency matters more than packet count for request/response traffic.
    drop(socket.set_nodelay(true));
    let (reader, writer) = socket.into_split();
    let (slots, queue) = mpsc::channel(CONNECTION_INFLIGHT_REQUESTS_MAX);
    let writer = tokio::spawn(write_responses(writer, queue, Arc::clone(&shared)));
    read_requests(reader, &shared, slots).await;
    // The reader dropped its sender: the writer drains what is queued, then ends.
    drop(writer.await);
}

async fn read_requests(mut reader: OwnedReadHalf, shared: &Arc<Shared>, slots: mpsc::Sender<Slot>) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let inflight = Arc::new(AtomicU64::new(0));
    let mut shutdown = shared.shutdown.clone();
    loop {
        loop {
            let frame = match split_frame(&mut buf, shared.config.max_frame_bytes) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(_) => {
                    shared.metrics.reject(Rejection::Oversize);
                    return;
                }
            };
            let Some(slot) = start_request(frame, shared, &inflight) else { return };
            if let Some(slot) = slot {
                if slots.send(slot).await.is_err() {
                    return;
                }
            }
        }
        tokio::select! {
            read = reader.read_buf(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            _ = shutdown.wait_for(|stopping| *stopping) => return,
        }
    }
}

/// Starts one request. `None`: close the connection; `Some(None)`: nothing to answer
/// (produce with acks = none); `Some(Some(slot))`: the response slot.
fn start_request(frame: Bytes, shared: &Arc<Shared>, inflight: &Arc<AtomicU64>) -> Option<Option<Slot>> {
    let frame_len = frame.len() as u64;
    let mut reader = WireReader::new(frame);
    let Ok(header) = get_request_header(&mut reader) else {
        shared.metrics.reject(Rejection::MalformedHeader);
        return None;
    };
    let cid = header.correlation_id;
    if header.api_key >= api::COUNT {
        shared.metrics.reject(Rejection::UnknownApi);
        let message = format!("unknown api key {}", header.api_key);
        return Some(Some(Slot::Ready(Response::encode_error(cid, ErrorCode::UnknownApi, &message, None))));
    }
    if header.api_version != API_VERSION_V1 {
        shared.metrics.reject(Rejection::UnsupportedVersion);
        shared.metrics.request(header.api_key, true);
        let message = format!("api {} version {} is not supported (supported: 1)", header.api_key, header.api_version);
        return Some(Some(Slot::Ready(Response::encode_error(cid, ErrorCode::UnsupportedVersion, &message, None))));
    }
    let request = match Request::decode(header.api_key, reader) {
        Ok(request) => request,
        Err(e) => {
            shared.metrics.reject(Rejection::MalformedBody);
            shared.metrics.request(header.api_key, true);
            return Some(Some(Slot::Ready(Response::encode_error(cid, e.code(), &e.to_string(), None))));
        }
    };
    // A lane produce is a produce to the lane topic: same admission, ordering and acks.
    let request = match request {
        Request::ProduceLane { topic, lane, partition, acks, batch } => Request::Produce {
            topic: rill_engine::cursor::priority::lane_topic_name(&topic, lane),
            partition,
            acks,
            batch,
        },
        request => request,
    };
    let guard = if let Request::Produce { .. } = request {
        match admit(shared, inflight, frame_len) {
            Some(guard) => Some(guard),
            None => {
                shared.metrics.throttled.fetch_add(1, Ordering::Relaxed);
                shared.metrics.request(header.api_key, true);
                let message = "in-flight limit reached; retry later";
                let frame = Response::encode_error(cid, ErrorCode::Throttled, message, Some(THROTTLE_RETRY_AFTER_MS));
                return Some(Some(Slot::Ready(frame)));
            }
        }
    } else {
        None
    };
    let silent = matches!(request, Request::Produce { acks: Acks::None, .. });
    let task = match request {
        // Appended here, in request order; the writer awaits the acknowledgement (a task
        // does for acks = none, which has no response slot).
        Request::Produce { topic, partition, batch, acks } => {
            match produce::start(shared, topic, partition, acks, batch) {
                Ok(pending) if !silent => {
                    return Some(Some(Slot::Produce(Box::new(ProduceSlot { header, pending, guard }))))
                }
                Ok(pending) => tokio::spawn(finish_produce(Arc::clone(shared), header, pending, guard)),
                Err(e) => {
                    drop(guard);
                    shared.metrics.request(header.api_key, true);
                    return Some(if silent { None } else { Some(Slot::Ready(error_frame(cid, &e))) });
                }
            }
        }
        request => tokio::spawn(run_request(Arc::clone(shared), header, request, guard)),
    };
    Some(if silent { None } else { Some(Slot::Pending(task)) })
}

async fn finish_produce(
    shared: Arc<Shared>,
    header: RequestHeader,
    pending: produce::PendingProduce,
    guard: Option<InflightGuard>,
) -> Vec<Bytes> {
    let result = produce::finish(&shared, pending).await;
    drop(guard);
    respond(&shared, &header, result)
}

/// Takes `bytes` of the connection's and the server's in-flight budget, or refuses.
fn admit(shared: &Arc<Shared>, connection: &Arc<AtomicU64>, bytes: u64) -> Option<InflightGuard> {
    let connection_now = connection.fetch_add(bytes, Ordering::AcqRel) + bytes;
    let server_now = shared.inflight_bytes.fetch_add(bytes, Ordering::AcqRel) + bytes;
    let guard = InflightGuard { bytes, connection: Arc::clone(connection), shared: Arc::clone(shared) };
    if connection_now > shared.config.connection_inflight_bytes_max
        || server_now > shared.config.server_inflight_bytes_max
    {
        return None; // dropping the guard gives the bytes back
    }
    Some(guard)
}

async fn run_request(
    shared: Arc<Shared>,
    header: RequestHeader,
    request: Request,
    guard: Option<InflightGuard>,
) -> Vec<Bytes> {
    let result = execute(&shared, request).await;
    drop(guard);
    respond(&shared, &header, result)
}

fn respond(shared: &Shared, header: &RequestHeader, result: crate::Result<Response>) -> Vec<Bytes> {
    shared.metrics.request(header.api_key, result.is_err());
    match result {
        Ok(response) => response.encode(header.correlation_id),
        Err(e) => error_frame(header.correlation_id, &e),
    }
}

fn error_frame(correlation_id: u32, e: &Error) -> Vec<Bytes> {
    let retry_after_ms = match e {
        Error::Server { retry_after_ms, .. } => *retry_after_ms,
        _ => None,
    };
    Response::encode_error(correlation_id, e.code(), &e.to_string(), retry_after_ms)
}

async fn write_responses(writer: OwnedWriteHalf, mut queue: mpsc::Receiver<Slot>, shared: Arc<Shared>) {
    let mut writer = BufWriter::with_capacity(64 * 1024, writer);
    while let Some(slot) = queue.recv().await {
        let chunks = match slot {
            Slot::Ready(chunks) => chunks,
            Slot::Pending(task) => match ready_or_flush(task, &mut writer).await {
                Some(Ok(chunks)) => chunks,
                // The task panicked (a server bug: the connection's stream of responses can
                // no longer be trusted to match its requests), or the socket failed: close.
                Some(Err(_)) | None => return,
            },
            Slot::Produce(slot) => {
                let ProduceSlot { header, pending, guard } = *slot;
                let Some(result) = ready_or_flush(produce::finish(&shared, pending), &mut writer).await else {
                    return;
                };
                drop(guard);
                respond(&shared, &header, result)
            }
        };
        for chunk in chunks {
            if writer.write_all(&chunk).await.is_err() {
                return;
            }
        }
        if queue.is_empty() && writer.flush().await.is_err() {
            return;
        }
    }
    drop(writer.shutdown().await);
}

/// Awaits `response`, but first writes out the responses already buffered if it is not
/// ready yet: they must not wait for a later request's fsync. `None` if that write failed.
async fn ready_or_flush<F: std::future::Future>(
    response: F,
    writer: &mut BufWriter<OwnedWriteHalf>,
) -> Option<F::Output> {
    let mut response = std::pin::pin!(response);
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(response.as_mut().poll(cx))).await;
    if let std::task::Poll::Ready(output) = first {
        return Some(output);
    }
    if !writer.buffer().is_empty() && writer.flush().await.is_err() {
        return None;
    }
    Some(response.await)
}
