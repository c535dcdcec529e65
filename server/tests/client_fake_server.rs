//! The client against a fake server started in the test: a TCP listener that decodes
//! requests with the protocol codec and answers with canned frames. Proves pipelining and
//! first-in first-out matching, that a correlation mismatch or an undecodable response fails
//! every outstanding request with `Error::Protocol` and closes the connection, that a
//! dropped connection fails requests with `Error::ConnectionClosed` and the next request
//! reconnects, and that the producer and consumer drive the protocol as specified
//! (same-bytes retries, sequence numbers, receipts, positions, commits).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use rill_engine::format::batch::set_base_offset;
use rill_engine::format::{BatchBuilder, BatchHeader, Compression, Record};
use rill_engine::FsyncPolicy;
use rill_server::client::{Client, Consumer, Producer, ProducerConfig, StartPosition};
use rill_server::frame::{get_request_header, split_frame, RequestHeader, WireReader, WireWriter};
use rill_server::limits::FRAME_SIZE_BYTES_MAX;
use rill_server::messages::{PartitionInfo, Request, Response, TopicDescription};
use rill_server::{Error, ErrorCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TEST_TIMEOUT: Duration = Duration::from_secs(20);

/// One accepted connection of the fake server.
struct FakeConn {
    stream: TcpStream,
    buf: BytesMut,
}

impl FakeConn {
    async fn accept(listener: &TcpListener) -> FakeConn {
        let (stream, _) = listener.accept().await.expect("accept");
        FakeConn { stream, buf: BytesMut::new() }
    }

    /// The next request, or `None` at end of stream.
    async fn read(&mut self) -> Option<(RequestHeader, Request)> {
        loop {
            if let Some(frame) = split_frame(&mut self.buf, FRAME_SIZE_BYTES_MAX).expect("a valid frame") {
                let mut r = WireReader::new(frame);
                let header = get_request_header(&mut r).expect("a request header");
                assert_eq!(header.client_id, "test-client");
                let request = Request::decode(header.api_key, r).expect("a request body");
                return Some((header, request));
            }
            if self.stream.read_buf(&mut self.buf).await.expect("read") == 0 {
                return None;
            }
        }
    }

    async fn write(&mut self, chunks: Vec<Bytes>) {
        for chunk in chunks {
            self.stream.write_all(&chunk).await.expect("write");
        }
    }

    async fn reply(&mut self, header: &RequestHeader, response: Response) {
        self.write(response.encode(header.correlation_id)).await;
    }

    /// Waits until the client closes its side.
    async fn expect_eof(&mut self) {
        let mut scratch = [0u8; 64];
        loop {
            match self.stream.read(&mut scratch).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
}

async fn listen() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    (listener, addr)
}

async fn connect(addr: &str) -> Client {
    Client::connect(addr, "test-client").await.expect("connects")
}

/// Fifty requests from concurrent tasks are all written before the server answers any
/// (the server reads them all first, so a client that waited for each response would
/// hang), and each task gets the response to its own request.
#[tokio::test]
async fn pipelined_requests_get_their_own_responses() {
    let (listener, addr) = listen().await;
    let server = tokio::spawn(async move {
        let mut conn = FakeConn::accept(&listener).await;
        let mut requests = Vec::new();
        for _ in 0..50 {
            requests.push(conn.read().await.expect("a request"));
        }
        let ids: Vec<u32> = requests.iter().map(|(h, _)| h.correlation_id).collect();
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "correlation ids increase: {ids:?}");
        for (header, request) in requests {
            let Request::FetchOffset { partition, .. } = request else { panic!("fetch offset expected") };
            conn.reply(&header, Response::Offset(Some(u64::from(partition) * 10))).await;
        }
    });
    let client = connect(&addr).await;
    let tasks: Vec<_> = (0..50u32)
        .map(|partition| {
            let client = client.clone();
            tokio::spawn(async move { (partition, client.fetch_offset("g", "t", partition).await) })
        })
        .collect();
    tokio::time::timeout(TEST_TIMEOUT, async {
        for task in tasks {
            let (partition, result) = task.await.expect("task");
            assert_eq!(result.expect("response"), Some(u64::from(partition) * 10));
        }
        server.await.expect("server");
    })
    .await
    .expect("in time");
}

/// Different request kinds in flight together are decoded by their own api keys.
#[tokio::test]
async fn mixed_requests_decode_by_their_api_keys() {
    let (listener, addr) = listen().await;
    let server = tokio::spawn(async move {
        let mut conn = FakeConn::accept(&listener).await;
        let mut requests = Vec::new();
        for _ in 0..3 {
            requests.push(conn.read().await.expect("a request"));
        }
        for (header, request) in requests {
            let response = match request {
                Request::ListTopics => Response::ListTopics(vec!["a".into(), "b".into()]),
                Request::Stats => Response::Stats(vec![("requests".into(), 3)]),
                Request::DeleteTopic { .. } => Response::Empty,
                other => panic!("unexpected {other:?}"),
            };
            conn.reply(&header, response).await;
        }
    });
    let client = connect(&addr).await;
    let (topics, stats, deleted) = tokio::time::timeout(TEST_TIMEOUT, async {
        tokio::join!(client.list_topics(), client.stats(), client.delete_topic("x"))
    })
    .await
    .expect("in time");
    assert_eq!(topics.expect("topics"), vec!["a".to_string(), "b".to_string()]);
    assert_eq!(stats.expect("stats"), vec![("requests".to_string(), 3)]);
    deleted.expect("deleted");
    server.await.expect("server");
}

/// A response with the wrong correlation id fails that request and every other
/// outstanding one with `Error::Protocol`, and the client closes the connection; the next
/// request opens a new connection and succeeds.
#[tokio::test]
async fn correlation_mismatch_fails_outstanding_requests_and_reconnects() {
    let (listener, addr) = listen().await;
    let server = tokio::spawn(async move {
        let mut conn = FakeConn::accept(&listener).await;
        let (first, _) = conn.read().await.expect("first request");
        let (_second, _) = conn.read().await.expect("second request");
        let wrong = RequestHeader { correlation_id: first.correlation_id + 100, ..first.clone() };
        conn.reply(&wrong, Response::ListTopics(Vec::new())).await;
        conn.expect_eof().await;
        let mut conn = FakeConn::accept(&listener).await;
        let (header, request) = conn.read().await.expect("request on the new connection");
        assert_eq!(request, Request::ListTopics);
        conn.reply(&header, Response::ListTopics(vec!["fresh".into()])).await;
    });
    let client = connect(&addr).await;
    let (a, b) = tokio::time::timeout(TEST_TIMEOUT, async { tokio::join!(client.list_topics(), client.list_topics()) })
        .await
        .expect("in time");
    assert!(matches!(a, Err(Error::Protocol { ref reason }) if reason.contains("correlation id")), "{a:?}");
    assert!(matches!(b, Err(Error::Protocol { .. })), "{b:?}");
    let again = tokio::time::timeout(TEST_TIMEOUT, client.list_topics()).await.expect("in time");
    assert_eq!(again.expect("reconnected"), vec!["fresh".to_string()]);
    tokio::time::timeout(TEST_TIMEOUT, server).await.expect("in time").expect("server");
}

/// A response frame that does not decode (an unknown error code here) is a protocol error
/// for the request, and closes the connection.
#[tokio::test]
async fn undecodable_response_is_a_protocol_error() {
    let (listener, addr) = listen().await;
    let server = tokio::spawn(async move {
        let mut conn = FakeConn::accept(&listener).await;
        let (header, _) = conn.read().await.expect("a request");
        let mut w = WireWriter::new();
        w.u32(header.correlation_id).u16(999);
        conn.write(w.finish()).await;
        conn.expect_eof().await;
    });
    let client = connect(&addr).await;
    let result = tokio::time::timeout(TEST_TIMEOUT, client.stats()).await.expect("in time");
    assert!(matches!(result, Err(Error::Protocol { ref reason }) if reason.contains("999")), "{result:?}");
    tokio::time::timeout(TEST_TIMEOUT, server).await.expect("in time").expect("server");
}

/// The server closing the connection fails the outstanding request with
/// `Error::ConnectionClosed`; an error response, by contrast, fails only its own request
/// and leaves the connection usable.
#[tokio::test]
async fn dropped_connection_fails_with_connection_closed() {
    let (listener, addr) = listen().await;
    let server = tokio::spawn(async move {
        let mut conn = FakeConn::accept(&listener).await;
        let (header, _) = conn.read().await.expect("a request");
        conn.write(Response::encode_error(header.correlation_id, ErrorCode::TopicNotFound, "no such topic", None))
            .await;
        let (_header, _) = conn.read().await.expect("a second request");
        drop(conn);
    });
    let client = connect(&addr).await;
    let missing = tokio::time::timeout(TEST_TIMEOUT, client.delete_topic("missing")).await.expect("in time");
    assert!(matches!(missing, Err(Error::Server { code: ErrorCode::TopicNotFound, .. })), "{missing:?}");
    let dropped = tokio::time::timeout(TEST_TIMEOUT, client.list_topics()).await.expect("in time");
    assert!(matches!(dropped, Err(Error::ConnectionClosed)), "{dropped:?}");
    server.await.expect("server");
}

/// A produce with `Acks::None` gets no response and must not take one from the queue:
/// the request after it is matched to the next response.
#[tokio::test]
async fn acks_none_produce_expects_no_response() {
    let (listener, addr) = listen().await;
    let server = tokio::spawn(async move {
        let mut conn = FakeConn::accept(&listener).await;
        let (_, produce) = conn.read().await.expect("produce");
        assert!(matches!(produce, Request::Produce { acks: rill_server::messages::Acks::None, .. }));
        let (header, _) = conn.read().await.expect("list topics");
        conn.reply(&header, Response::ListTopics(vec!["after".into()])).await;
    });
    let client = connect(&addr).await;
    let batch = one_batch(0, &["x"]);
    let acked = client.produce("t", 0, rill_server::messages::Acks::None, batch).await.expect("written");
    assert_eq!(acked, None);
    let topics = tokio::time::timeout(TEST_TIMEOUT, client.list_topics()).await.expect("in time");
    assert_eq!(topics.expect("topics"), vec!["after".to_string()]);
    server.await.expect("server");
}

fn one_batch(base_offset: u64, values: &[&str]) -> Bytes {
    let mut builder = BatchBuilder::new(Compression::None, 1_000);
    for value in values {
        builder.push(&Record::from_value(value.to_string())).expect("push");
    }
    let mut batch = builder.build().expect("build");
    set_base_offset(&mut batch, base_offset);
    batch.freeze()
}

fn metadata(partitions: u32, end_offset: u64) -> Response {
    Response::Metadata(vec![TopicDescription {
        name: "t".into(),
        fsync: FsyncPolicy::Always,
        segment_size_bytes: 1 << 20,
        retention_bytes: None,
        retention_ms: None,
        partitions: (0..partitions)
            .map(|partition| PartitionInfo { partition, log_start: 0, end_offset, size_bytes: 0 })
            .collect(),
    }])
}

/// The producer's first batch is throttled, then its connection drops, then it is answered
/// as a duplicate: all three attempts carry the identical bytes (same producer id, epoch
/// and sequence 0), and the receipts are the batch's offsets in order. The next batch
/// continues at sequence 3.
#[tokio::test]
async fn producer_retries_resend_the_same_batch() {
    let (listener, addr) = listen().await;
    let attempts: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    let seen = Arc::clone(&attempts);
    let server = tokio::spawn(async move {
        let mut conn = FakeConn::accept(&listener).await;
        loop {
            let Some((header, request)) = conn.read().await else { break };
            let response = match request {
                Request::Metadata { .. } => metadata(1, 0),
                Request::InitProducerId { transactional_id: None } => {
                    Response::InitProducerId { producer_id: 7, producer_epoch: 0 }
                }
                Request::Produce { batch, .. } => {
                    let n = {
                        let mut seen = seen.lock();
                        seen.push(batch.clone());
                        seen.len()
                    };
                    let count = u64::from(BatchHeader::parse(&batch).expect("header").record_count);
                    match n {
                        1 => {
                            conn.write(Response::encode_error(
                                header.correlation_id,
                                ErrorCode::Throttled,
                                "busy",
                                Some(5),
                            ))
                            .await;
                            continue;
                        }
                        2 => {
                            // Close the first connection without answering; the retry comes on a new one.
                            conn.stream.shutdown().await.expect("shutdown");
                            conn = FakeConn::accept(&listener).await;
                            continue;
                        }
                        3 => Response::Produce { base_offset: 100, last_offset: 100 + count - 1, duplicate: true },
                        _ => Response::Produce { base_offset: 103, last_offset: 103 + count - 1, duplicate: false },
                    }
                }
                other => panic!("unexpected {other:?}"),
            };
            conn.reply(&header, response).await;
        }
    });
    let client = connect(&addr).await;
    let producer = Producer::new(client, ProducerConfig::default()).expect("producer");
    let sends: Vec<_> = ["a", "b", "c"].iter().map(|v| producer.send("t", None, Bytes::from(*v), Vec::new())).collect();
    let receipts = tokio::time::timeout(TEST_TIMEOUT, async {
        let mut receipts = Vec::new();
        for send in sends {
            receipts.push(send.await.expect("acknowledged"));
        }
        receipts
    })
    .await
    .expect("in time");
    assert_eq!(
        receipts.iter().map(|r| (r.partition, r.offset)).collect::<Vec<_>>(),
        vec![(0, 100), (0, 101), (0, 102)]
    );
    {
        let attempts = attempts.lock();
        assert_eq!(attempts.len(), 3);
        assert!(attempts.iter().all(|a| a == &attempts[0]), "every retry resends the identical batch");
        let header = BatchHeader::parse(&attempts[0]).expect("header");
        let producer_fields = header.producer.expect("idempotent batch");
        assert_eq!((producer_fields.producer_id, producer_fields.producer_epoch), (7, 0));
        assert_eq!((producer_fields.base_sequence, header.record_count), (0, 3));
    }
    let next = producer.send("t", Some(Bytes::from("k")), Bytes::from("d"), Vec::new());
    producer.flush().await;
    let receipt = tokio::time::timeout(TEST_TIMEOUT, next).await.expect("in time").expect("acknowledged");
    assert_eq!(receipt.offset, 103);
    let fourth = attempts.lock()[3].clone();
    assert_eq!(BatchHeader::parse(&fourth).expect("header").producer.expect("fields").base_sequence, 3);
    drop(producer);
    tokio::time::timeout(TEST_TIMEOUT, server).await.expect("the producer lets go of the client").expect("server");
}

/// The consumer starts at the requested offset, drops the records of a fetched batch below
/// it, advances past the batch, and commits the next offset for its group.
#[tokio::test]
async fn consumer_polls_from_its_position_and_commits() {
    let (listener, addr) = listen().await;
    let committed: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let commits = Arc::clone(&committed);
    let server = tokio::spawn(async move {
        let mut conn = FakeConn::accept(&listener).await;
        loop {
            let Some((header, request)) = conn.read().await else { break };
            let response = match request {
                Request::Metadata { .. } => metadata(1, 5),
                Request::Fetch { offset, .. } if offset < 5 => {
                    assert_eq!(offset, 2, "the first fetch starts at the requested offset");
                    Response::Fetch { log_start: 0, end_offset: 5, records: one_batch(0, &["a", "b", "c", "d", "e"]) }
                }
                Request::Fetch { .. } => Response::Fetch { log_start: 0, end_offset: 5, records: Bytes::new() },
                Request::CommitOffset { group, offset, .. } => {
                    commits.lock().push((group, offset));
                    Response::Empty
                }
                other => panic!("unexpected {other:?}"),
            };
            conn.reply(&header, response).await;
        }
    });
    let client = connect(&addr).await;
    let mut consumer = Consumer::new(client, Some("g".into()), "t", StartPosition::Offset(2)).await.expect("consumer");
    let records = tokio::time::timeout(TEST_TIMEOUT, consumer.poll(0)).await.expect("in time").expect("records");
    let got: Vec<(u64, Bytes)> = records.into_iter().map(|r| (r.offset, r.value.expect("value"))).collect();
    assert_eq!(got, vec![(2, Bytes::from("c")), (3, Bytes::from("d")), (4, Bytes::from("e"))]);
    assert_eq!(consumer.positions(), &[5]);
    let empty = tokio::time::timeout(TEST_TIMEOUT, consumer.poll(30)).await.expect("in time").expect("poll");
    assert!(empty.is_empty());
    consumer.commit().await.expect("commits");
    assert_eq!(committed.lock().clone(), vec![("g".to_string(), 5)]);
    drop(consumer);
    tokio::time::timeout(TEST_TIMEOUT, server).await.expect("in time").expect("server");
}

/// What the fake server saw and the producer reported in [`first_batch_fails`].
struct FailureRun {
    /// Producer fields and first value of every produce request, in arrival order.
    produced: Vec<(i64, i32, Bytes)>,
    /// How many producer ids were asked for.
    inits: usize,
    first: Result<rill_server::client::SendReceipt, Error>,
    second: Result<rill_server::client::SendReceipt, Error>,
}

/// Two one-record batches go out back to back; the server fails the first with `code` and
/// the second with `OutOfOrderSequence` (as a real server would, its predecessor missing),
/// then answers any further produce with offset 50.
async fn first_batch_fails(code: ErrorCode) -> FailureRun {
    let (listener, addr) = listen().await;
    let produced: Arc<Mutex<Vec<(i64, i32, Bytes)>>> = Arc::default();
    let inits: Arc<Mutex<usize>> = Arc::default();
    let (seen, init_count) = (Arc::clone(&produced), Arc::clone(&inits));
    let server = tokio::spawn(async move {
        let mut conn = FakeConn::accept(&listener).await;
        loop {
            let Some((header, request)) = conn.read().await else { break };
            let response = match request {
                Request::Metadata { .. } => metadata(1, 0),
                Request::InitProducerId { .. } => {
                    let mut count = init_count.lock();
                    *count += 1;
                    Response::InitProducerId { producer_id: 10 + *count as i64, producer_epoch: 0 }
                }
                Request::Produce { batch, .. } => {
                    let decoded = rill_engine::format::Batch::decode(batch).expect("valid batch");
                    let fields = decoded.header().producer.expect("idempotent");
                    let value = decoded.records().expect("records")[0].value.clone().expect("value");
                    let n = {
                        let mut seen = seen.lock();
                        seen.push((fields.producer_id, fields.base_sequence, value));
                        seen.len()
                    };
                    let error = match n {
                        1 => Some((code, "first fails")),
                        2 => Some((ErrorCode::OutOfOrderSequence, "gap")),
                        _ => None,
                    };
                    if let Some((code, message)) = error {
                        conn.write(Response::encode_error(header.correlation_id, code, message, None)).await;
                        continue;
                    }
                    Response::Produce { base_offset: 50, last_offset: 50, duplicate: false }
                }
                other => panic!("unexpected {other:?}"),
            };
            conn.reply(&header, response).await;
        }
    });
    let client = connect(&addr).await;
    // A one-byte batch size seals every record in a batch of its own.
    let config = ProducerConfig { batch_size_bytes: 1, ..ProducerConfig::default() };
    let producer = Producer::new(client, config).expect("producer");
    let first = producer.send("t", None, Bytes::from("one"), Vec::new());
    let second = producer.send("t", None, Bytes::from("two"), Vec::new());
    let (first, second) =
        tokio::time::timeout(TEST_TIMEOUT, async { tokio::join!(first, second) }).await.expect("in time");
    drop(producer);
    tokio::time::timeout(TEST_TIMEOUT, server).await.expect("in time").expect("server");
    let produced = produced.lock().clone();
    let inits = *inits.lock();
    FailureRun { produced, inits, first, second }
}

/// A batch the server rejected is known not to be in the log, so the batch sent behind it
/// (refused for the sequence gap) is stamped under a fresh producer id from sequence 0 and
/// resent, and succeeds.
#[tokio::test]
async fn rejected_batch_resequences_the_ones_behind_it() {
    let run = first_batch_fails(ErrorCode::LimitExceeded).await;
    assert!(matches!(run.first, Err(Error::Server { code: ErrorCode::LimitExceeded, .. })), "{:?}", run.first);
    assert_eq!(run.second.expect("resent and acknowledged").offset, 50);
    assert_eq!(run.inits, 2, "a fresh producer id for the resend");
    let expected = vec![(11, 0, Bytes::from("one")), (11, 1, Bytes::from("two")), (12, 0, Bytes::from("two"))];
    assert_eq!(run.produced, expected);
}

/// A batch whose outcome is unknown (a storage error may have left it in the log) fails,
/// and so do the batches behind it rather than being resent under another sequence.
#[tokio::test]
async fn unknown_outcome_fails_the_batches_behind_it() {
    let run = first_batch_fails(ErrorCode::StorageError).await;
    assert!(matches!(run.first, Err(Error::Server { code: ErrorCode::StorageError, .. })), "{:?}", run.first);
    assert!(matches!(run.second, Err(Error::Server { code: ErrorCode::StorageError, .. })), "{:?}", run.second);
    assert_eq!(run.produced.len(), 2, "nothing is resent");
}
