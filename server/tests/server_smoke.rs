//! The server in-process on an ephemeral loopback port, spoken to with raw protocol frames:
//! create a topic, produce pipelined batches, fetch them back in order, long-poll, commit
//! and fetch an offset, and get specific errors for bad requests — on a real socket.

use bytes::{Bytes, BytesMut};
use rill_engine::format::batch::{BatchBuilder, BatchIter};
use rill_engine::{Compression, Record};
use rill_server::config::ServerConfig;
use rill_server::frame::split_frame;
use rill_server::limits::FRAME_SIZE_BYTES_MAX;
use rill_server::messages::{api, Acks, Request, Response, TopicSettings};
use rill_server::{Error, ErrorCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Raw {
    socket: TcpStream,
    buf: BytesMut,
    next_cid: u32,
}

impl Raw {
    async fn connect(addr: std::net::SocketAddr) -> Raw {
        Raw { socket: TcpStream::connect(addr).await.expect("connect"), buf: BytesMut::new(), next_cid: 0 }
    }

    async fn send(&mut self, request: &Request) -> u32 {
        self.next_cid += 1;
        for chunk in request.encode(self.next_cid, "smoke") {
            self.socket.write_all(&chunk).await.expect("write");
        }
        self.next_cid
    }

    async fn recv(&mut self, api_key: u16) -> (u32, Result<Response, Error>) {
        loop {
            if let Some(frame) = split_frame(&mut self.buf, FRAME_SIZE_BYTES_MAX).expect("frame") {
                return Response::decode(api_key, frame).expect("decodes");
            }
            let n = self.socket.read_buf(&mut self.buf).await.expect("read");
            assert!(n > 0, "server closed the connection");
        }
    }

    async fn call(&mut self, request: Request) -> Result<Response, Error> {
        let key = request.api_key();
        let cid = self.send(&request).await;
        let (got, response) = self.recv(key).await;
        assert_eq!(got, cid);
        response
    }
}

fn batch(values: &[&str]) -> Bytes {
    let mut builder = BatchBuilder::new(Compression::None, 1_700_000_000_000);
    for v in values {
        builder.push(&Record::from_value(v.to_string())).expect("push");
    }
    builder.build().expect("build").freeze()
}

/// The server in-process on an ephemeral loopback port, data in `dir`, no metrics listener.
async fn start(dir: &std::path::Path) -> rill_server::server::ServerHandle {
    let config = ServerConfig {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".into(),
        metrics_listen: String::new(),
        ..ServerConfig::default()
    };
    rill_server::server::start(config).await.expect("start")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_fetch_commit_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    let mut c = Raw::connect(server.addr).await;
    let settings = TopicSettings { partitions: 2, ..TopicSettings::default() };
    c.call(Request::CreateTopic { name: "events".into(), settings }).await.expect("create");
    // Pipelined produces are answered in order with consecutive offsets.
    let mut cids = Vec::new();
    for i in 0..20 {
        let request = Request::Produce {
            topic: "events".into(),
            partition: 1,
            acks: Acks::Leader,
            batch: batch(&[&format!("v{i}")]),
        };
        cids.push(c.send(&request).await);
    }
    for (i, cid) in cids.into_iter().enumerate() {
        let (got, response) = c.recv(api::PRODUCE).await;
        assert_eq!(got, cid);
        match response.expect("produced") {
            Response::Produce { base_offset, duplicate: false, .. } => assert_eq!(base_offset, i as u64),
            other => panic!("unexpected {other:?}"),
        }
    }
    let fetched = c
        .call(Request::Fetch { topic: "events".into(), partition: 1, offset: 5, max_bytes: 1 << 20, max_wait_ms: 0 })
        .await
        .expect("fetch");
    let Response::Fetch { end_offset, records, .. } = fetched else { panic!("not a fetch response") };
    assert_eq!(end_offset, 20);
    let values: Vec<_> = BatchIter::new(records)
        .flat_map(|b| b.expect("valid batch").records().expect("records"))
        .filter(|r| r.offset >= 5)
        .map(|r| r.value.expect("value"))
        .collect();
    assert_eq!(values.len(), 15);
    assert_eq!(values[0], Bytes::from("v5"));
    // Long poll: the fetch waits until another connection produces.
    let mut waiter = Raw::connect(server.addr).await;
    let poll =
        Request::Fetch { topic: "events".into(), partition: 1, offset: 20, max_bytes: 1 << 20, max_wait_ms: 10_000 };
    let cid = waiter.send(&poll).await;
    c.call(Request::Produce { topic: "events".into(), partition: 1, acks: Acks::Leader, batch: batch(&["late"]) })
        .await
        .expect("produce");
    let (got, response) = waiter.recv(api::FETCH).await;
    assert_eq!(got, cid);
    let Response::Fetch { records, .. } = response.expect("fetch") else { panic!("not a fetch") };
    assert!(!records.is_empty(), "long poll returned the new batch");
    // Offsets commit durably and read back.
    c.call(Request::CommitOffset { group: "g".into(), topic: "events".into(), partition: 1, offset: 7 })
        .await
        .expect("commit");
    let fetched = c.call(Request::FetchOffset { group: "g".into(), topic: "events".into(), partition: 1 }).await;
    assert_eq!(fetched.expect("fetch offset"), Response::Offset(Some(7)));
    // Specific errors, connection stays usable.
    let missing =
        c.call(Request::Fetch { topic: "nope".into(), partition: 0, offset: 0, max_bytes: 10, max_wait_ms: 0 }).await;
    assert!(matches!(missing, Err(Error::Server { code: ErrorCode::TopicNotFound, .. })));
    let mut corrupt = BytesMut::from(&batch(&["x"])[..]);
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    let bad = c
        .call(Request::Produce { topic: "events".into(), partition: 0, acks: Acks::Leader, batch: corrupt.freeze() })
        .await;
    assert!(matches!(bad, Err(Error::Server { code: ErrorCode::InvalidBatch, .. })));
    let listed = c.call(Request::ListTopics).await.expect("list");
    assert_eq!(listed, Response::ListTopics(vec!["events".into()]));
    drop(c);
    drop(waiter);
    server.shutdown().await.expect("clean shutdown");
    assert!(dir.path().join("topics/events/1/.clean_shutdown").exists(), "clean-shutdown marker written");
}

/// Regression: a response that is ready must not wait in the connection's write buffer while
/// a later pipelined request is still pending (it waited for a long poll, or for the next
/// produce's fsync, which put tens of milliseconds on acknowledgements under steady load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_response_is_not_held_behind_a_pending_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    let mut c = Raw::connect(server.addr).await;
    c.call(Request::CreateTopic { name: "events".into(), settings: TopicSettings::default() }).await.expect("create");
    // One write holding both frames, so the server reads them together: a quick request,
    // then a long poll at the log end that only a later produce can answer.
    let poll =
        Request::Fetch { topic: "events".into(), partition: 0, offset: 0, max_bytes: 1 << 20, max_wait_ms: 60_000 };
    let mut bytes = Vec::new();
    for chunk in Request::ApiVersions.encode(100, "smoke").into_iter().chain(poll.encode(101, "smoke")) {
        bytes.extend_from_slice(&chunk);
    }
    c.socket.write_all(&bytes).await.expect("write");
    let (cid, versions) = tokio::time::timeout(std::time::Duration::from_secs(20), c.recv(api::API_VERSIONS))
        .await
        .expect("the ready response is written while the long poll still waits");
    assert_eq!(cid, 100);
    assert!(matches!(versions, Ok(Response::ApiVersions(_))));
    // Now release the long poll.
    let mut producer = Raw::connect(server.addr).await;
    let produce = Request::Produce { topic: "events".into(), partition: 0, acks: Acks::Leader, batch: batch(&["x"]) };
    producer.call(produce).await.expect("produce");
    let (cid, fetched) = c.recv(api::FETCH).await;
    assert_eq!(cid, 101);
    let Ok(Response::Fetch { end_offset, .. }) = fetched else { panic!("not a fetch response: {fetched:?}") };
    assert_eq!(end_offset, 1);
}
