//! One client connection: a writer task that encodes and writes requests in the order they
//! are handed over, and a reader task that matches each response frame to the oldest
//! outstanding request.
//!
//! It owns: correlation ids, the queue of outstanding requests, closing the socket.
//! It must never: deliver a response whose correlation id differs from its request's, or
//! leave a request waiting after the connection closed (every outstanding request is
//! failed exactly once when it closes).

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};

use super::{CLIENT_INFLIGHT_REQUESTS_MAX, CONNECT_TIMEOUT_MS};
use crate::error::{Error, Result};
use crate::frame::split_frame;
use crate::limits::FRAME_SIZE_BYTES_MAX;
use crate::messages::{Acks, Request, Response};

/// Requests queued for the writer task beyond those being written.
const WRITE_QUEUE_LEN_MAX: usize = 256;
/// Writes are coalesced in a buffer of this size; larger payload chunks bypass it.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;
/// Initial read buffer; it grows to the largest frame seen.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// How a connection ended; decides the error its outstanding requests fail with.
#[derive(Clone, Debug)]
enum CloseReason {
    /// The server closed the socket, or the client let go of the connection.
    Closed,
    /// A socket operation failed.
    Io(String),
    /// The server broke the protocol: the byte stream cannot be trusted any more.
    Protocol(String),
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::Closed => f.write_str("closed"),
            CloseReason::Io(reason) => write!(f, "I/O error: {reason}"),
            CloseReason::Protocol(reason) => write!(f, "protocol error: {reason}"),
        }
    }
}

impl CloseReason {
    fn error(&self) -> Error {
        match self {
            CloseReason::Closed | CloseReason::Io(_) => Error::ConnectionClosed,
            CloseReason::Protocol(reason) => Error::Protocol { reason: reason.clone() },
        }
    }
}

/// What the caller waits for.
#[derive(Debug)]
enum Reply {
    /// The response, decoded.
    Response { tx: oneshot::Sender<Result<Response>>, permit: OwnedSemaphorePermit },
    /// That the request was written (requests that get no response).
    Written { tx: oneshot::Sender<()> },
}

#[derive(Debug)]
struct Outgoing {
    request: Request,
    reply: Reply,
}

/// A request written and waiting for its response.
#[derive(Debug)]
struct Pending {
    correlation_id: u32,
    api_key: u16,
    tx: oneshot::Sender<Result<Response>>,
    _permit: OwnedSemaphorePermit,
}

#[derive(Debug, Default)]
struct State {
    pending: VecDeque<Pending>,
    closed: bool,
}

/// State shared by the handle and the two tasks.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    closed: watch::Sender<bool>,
}

impl Shared {
    /// Queues a written request's reply slot; gives it back if the connection is closed.
    fn push_pending(&self, pending: Pending) -> std::result::Result<(), Pending> {
        let mut state = self.state.lock();
        if state.closed {
            return Err(pending);
        }
        state.pending.push_back(pending);
        Ok(())
    }

    /// Closes the connection once: fails every outstanding request and stops both tasks.
    fn close(&self, reason: CloseReason) {
        let pending = {
            let mut state = self.state.lock();
            if state.closed {
                return;
            }
            state.closed = true;
            std::mem::take(&mut state.pending)
        };
        tracing::debug!(%reason, outstanding = pending.len(), "client connection closed");
        self.closed.send_replace(true);
        for p in pending {
            // The caller may have stopped waiting; nothing to do then.
            p.tx.send(Err(reason.error())).ok();
        }
    }

    /// Matches one response frame to the oldest outstanding request. An error closes the
    /// connection: after a decode failure or a correlation mismatch, no later frame can be
    /// trusted to belong to the request it would be matched with.
    fn deliver(&self, frame: Bytes) -> std::result::Result<(), String> {
        let Some(pending) = self.state.lock().pending.pop_front() else {
            return Err("a response arrived with no request outstanding".to_string());
        };
        let expected = pending.correlation_id;
        let reason = match Response::decode(pending.api_key, frame) {
            Ok((correlation_id, result)) if correlation_id == expected => {
                pending.tx.send(result).ok();
                return Ok(());
            }
            Ok((correlation_id, _)) => {
                format!("response carries correlation id {correlation_id}, the oldest request has {expected}")
            }
            Err(e) => format!("response to correlation id {expected} does not decode: {e}"),
        };
        pending.tx.send(Err(Error::malformed(reason.clone()))).ok();
        Err(reason)
    }
}

/// A handle on one TCP connection. Dropping the last handle (and every [`ResponseFuture`])
/// lets the writer finish, then closes the socket.
#[derive(Debug)]
pub(crate) struct Connection {
    outgoing: mpsc::Sender<Outgoing>,
    shared: Arc<Shared>,
    inflight: Arc<Semaphore>,
}

impl Connection {
    /// Connects to the first address that accepts and starts the reader and writer tasks.
    pub(crate) async fn open(addrs: &[SocketAddr], client_id: &str) -> Result<Arc<Connection>> {
        let mut last_error = None;
        for addr in addrs {
            let connect = tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), TcpStream::connect(addr));
            match connect.await {
                Ok(Ok(stream)) => return Self::start_tasks(stream, client_id),
                Ok(Err(source)) => last_error = Some(Error::io("connect", source)),
                Err(_elapsed) => last_error = Some(Error::Timeout { what: "connect", timeout_ms: CONNECT_TIMEOUT_MS }),
            }
        }
        Err(last_error.unwrap_or(Error::ConnectionClosed))
    }

    fn start_tasks(stream: TcpStream, client_id: &str) -> Result<Arc<Connection>> {
        stream.set_nodelay(true).map_err(|source| Error::io("set TCP_NODELAY", source))?;
        let (read, write) = stream.into_split();
        let shared = Arc::new(Shared { state: Mutex::new(State::default()), closed: watch::Sender::new(false) });
        let (outgoing, queue) = mpsc::channel(WRITE_QUEUE_LEN_MAX);
        tokio::spawn(write_loop(queue, write, Arc::clone(&shared), client_id.to_string()));
        tokio::spawn(read_loop(read, Arc::clone(&shared)));
        Ok(Arc::new(Connection { outgoing, shared, inflight: Arc::new(Semaphore::new(CLIENT_INFLIGHT_REQUESTS_MAX)) }))
    }

    /// Whether the connection has closed (requests would fail).
    pub(crate) fn is_closed(&self) -> bool {
        *self.shared.closed.borrow()
    }

    /// Closes the connection now; outstanding requests fail with [`Error::ConnectionClosed`].
    pub(crate) fn close(&self) {
        self.shared.close(CloseReason::Closed);
    }

    /// Queues `request` for writing (waiting while [`CLIENT_INFLIGHT_REQUESTS_MAX`] are
    /// outstanding) and returns the future of its response.
    pub(crate) async fn start(self: &Arc<Self>, request: Request) -> Result<ResponseFuture> {
        if self.is_closed() {
            return Err(Error::ConnectionClosed);
        }
        let no_response = matches!(
            request,
            Request::Produce { acks: Acks::None, .. } | Request::ProduceLane { acks: Acks::None, .. }
        );
        let (reply, rx) = if no_response {
            let (tx, rx) = oneshot::channel();
            (Reply::Written { tx }, ResponseRx::Written(rx))
        } else {
            let permit = Arc::clone(&self.inflight).acquire_owned().await.map_err(|_closed| Error::ConnectionClosed)?;
            let (tx, rx) = oneshot::channel();
            (Reply::Response { tx, permit }, ResponseRx::Response(rx))
        };
        self.outgoing.send(Outgoing { request, reply }).await.map_err(|_closed| Error::ConnectionClosed)?;
        Ok(ResponseFuture { rx, connection: Arc::clone(self), not_leader: None })
    }
}

#[derive(Debug)]
enum ResponseRx {
    Response(oneshot::Receiver<Result<Response>>),
    Written(oneshot::Receiver<()>),
}

/// The response to a started request: `Some(response)`, or `None` for a request that gets
/// no response (produce with [`Acks::None`]) once it is written. A connection that closes
/// first yields [`Error::ConnectionClosed`]. Dropping it abandons the wait, not the request.
#[derive(Debug)]
pub(crate) struct ResponseFuture {
    rx: ResponseRx,
    connection: Arc<Connection>,
    /// Set when the answer is `NotLeader` (the client's partition routes are stale).
    not_leader: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl ResponseFuture {
    /// Sets `flag` if the answer turns out to be `NotLeader`.
    pub(crate) fn flag_not_leader(mut self, flag: Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.not_leader = Some(flag);
        self
    }

    /// Closes the connection the request was sent on (after a timeout: its response, and
    /// those of every later request, can no longer be told apart from stale ones).
    pub(crate) fn close_connection(&self) {
        self.connection.close();
    }
}

impl Future for ResponseFuture {
    type Output = Result<Option<Response>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match &mut this.rx {
            ResponseRx::Response(rx) => Pin::new(rx).poll(cx).map(|r| {
                let response = r.map_err(|_dropped| Error::ConnectionClosed)?;
                if let (Err(Error::Server { code: crate::ErrorCode::NotLeader, .. }), Some(flag)) =
                    (&response, &this.not_leader)
                {
                    flag.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                response.map(Some)
            }),
            ResponseRx::Written(rx) => Pin::new(rx).poll(cx).map(|r| {
                r.map_err(|_dropped| Error::ConnectionClosed)?;
                Ok(None)
            }),
        }
    }
}

/// Writes requests in queue order; coalesces whatever is queued into one flush.
async fn write_loop(
    mut queue: mpsc::Receiver<Outgoing>,
    socket: OwnedWriteHalf,
    shared: Arc<Shared>,
    client_id: String,
) {
    let mut closed = shared.closed.subscribe();
    let mut writer = BufWriter::with_capacity(WRITE_BUFFER_BYTES, socket);
    let mut next_correlation_id: u32 = 0;
    loop {
        let first = tokio::select! {
            next = queue.recv() => next,
            _ = closed.wait_for(|closed| *closed) => return,
        };
        let Some(first) = first else { break };
        let write = write_queued(first, &mut queue, &mut writer, &shared, &client_id, &mut next_correlation_id);
        let result = tokio::select! {
            result = write => result,
            _ = closed.wait_for(|closed| *closed) => return,
        };
        if let Err(source) = result {
            shared.close(CloseReason::Io(format!("write: {source}")));
            return;
        }
    }
    // Every handle is gone: nobody waits for a response any more.
    if let Err(source) = writer.shutdown().await {
        tracing::debug!(%source, "client connection shutdown failed");
    }
    shared.close(CloseReason::Closed);
}

/// Writes `first` and everything queued behind it, then flushes and reports the writes of
/// requests that get no response.
async fn write_queued(
    first: Outgoing,
    queue: &mut mpsc::Receiver<Outgoing>,
    writer: &mut BufWriter<OwnedWriteHalf>,
    shared: &Shared,
    client_id: &str,
    next_correlation_id: &mut u32,
) -> std::io::Result<()> {
    let mut written = Vec::new();
    let mut next = Some(first);
    while let Some(Outgoing { request, reply }) = next.take() {
        let correlation_id = *next_correlation_id;
        *next_correlation_id = correlation_id.wrapping_add(1);
        let chunks = request.encode(correlation_id, client_id);
        match reply {
            Reply::Response { tx, permit } => {
                let pending = Pending { correlation_id, api_key: request.api_key(), tx, _permit: permit };
                // Queued before its bytes are written, so the response cannot overtake it.
                if shared.push_pending(pending).is_err() {
                    return Ok(()); // closed: the dropped reply slot reports ConnectionClosed
                }
            }
            Reply::Written { tx } => written.push(tx),
        }
        for chunk in &chunks {
            writer.write_all(chunk).await?;
        }
        next = queue.try_recv().ok();
    }
    writer.flush().await?;
    for tx in written {
        tx.send(()).ok();
    }
    Ok(())
}

/// Reads response frames and hands each to the oldest outstanding request.
async fn read_loop(mut socket: OwnedReadHalf, shared: Arc<Shared>) {
    let mut closed = shared.closed.subscribe();
    let mut buf = BytesMut::with_capacity(READ_BUFFER_BYTES);
    let reason = 'read: loop {
        loop {
            match split_frame(&mut buf, FRAME_SIZE_BYTES_MAX) {
                Ok(Some(frame)) => {
                    if let Err(reason) = shared.deliver(frame) {
                        break 'read CloseReason::Protocol(reason);
                    }
                }
                Ok(None) => break,
                Err(e) => break 'read CloseReason::Protocol(e.to_string()),
            }
        }
        tokio::select! {
            read = socket.read_buf(&mut buf) => match read {
                Ok(0) => break CloseReason::Closed,
                Ok(_) => {}
                Err(source) => break CloseReason::Io(format!("read: {source}")),
            },
            _ = closed.wait_for(|closed| *closed) => return,
        }
    };
    shared.close(reason);
}
