//! Bad input against the real `rill serve` binary while a well-behaved client keeps working:
//! thousands of random and mutated frames, each on a fresh or a reused connection, must
//! neither crash nor wedge the server, must get the specific error code (or the connection
//! close) that `docs/protocol.md` promises, and must be counted as rejections.

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::{http_get, metric, Rng, ServerProcess};
use rill_engine::format::batch::{BATCH_LENGTH_OFFSET, VERSION_OFFSET};
use rill_engine::format::BatchBuilder;
use rill_engine::{Compression, FsyncPolicy, Record};
use rill_server::client::{Client, Consumer, Producer, ProducerConfig, StartPosition};
use rill_server::frame::split_frame;
use rill_server::limits::FRAME_SIZE_BYTES_MAX;
use rill_server::messages::{api, Acks, OffsetQuery, Request, TopicSettings};
use rill_server::ErrorCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bad frames sent (at least 5,000, as the scenario promises).
const FRAMES: usize = 6_000;
/// The bad-frame phase stops here even if `FRAMES` were not all sent (then the test fails).
const FUZZ_DEADLINE: Duration = Duration::from_secs(120);
/// How long one exchange may wait for answers or for the server to close.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// A reused connection is replaced after this many frames.
const FRAMES_PER_REUSED_CONNECTION: u32 = 250;
/// The well-behaved producer keeps at most this many records unacknowledged.
const GOOD_WINDOW: usize = 64;
/// Topic whose bad frames are harmless to the well-behaved client.
const FUZZ_TOPIC: &str = "fuzz";
/// Topic of the specific corrupt-batch checks (no mutated frame names it).
const PROBE_TOPIC: &str = "probe";
/// Topic of the well-behaved client.
const GOOD_TOPIC: &str = "good";

/// What a bad frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// Random bytes, random length.
    RandomBytes,
    /// A valid request with 1 to 3 bytes flipped anywhere (length prefix included).
    FlippedFrame,
    /// A valid request cut short, then the client half-closes.
    TruncatedFrame,
    /// A length prefix over the frame limit.
    OversizeLength,
    /// A frame of length 0.
    ZeroLength,
    /// A frame too short for the request header, or whose client id does not parse.
    BadHeader,
    /// A header with an undefined api key.
    UnknownApi,
    /// A defined api with a version other than 1.
    BadVersion,
    /// A valid header with random body bytes.
    GarbageBody,
    /// A body with a specific defect (trailing bytes, bad enum, bad UTF-8, over a limit).
    MalformedBody,
    /// A produce whose batch is damaged (CRC range flip, truncation, bad length).
    CorruptBatch,
}

/// Kinds sent on a fresh connection whose outcome is a close (or is not fixed).
const CLOSING_KINDS: [Kind; 6] = [
    Kind::RandomBytes,
    Kind::FlippedFrame,
    Kind::TruncatedFrame,
    Kind::OversizeLength,
    Kind::ZeroLength,
    Kind::BadHeader,
];
/// Kinds that must be answered on a connection that stays open.
const ANSWERED_KINDS: [Kind; 5] =
    [Kind::UnknownApi, Kind::BadVersion, Kind::GarbageBody, Kind::MalformedBody, Kind::CorruptBatch];

/// What the server must answer to one frame of an exchange.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// An answer with this correlation id and error code.
    Code(u32, ErrorCode),
    /// An answer with this correlation id, whatever its code.
    Answer(u32),
}

/// Proves that bad input is rejected precisely and never hurts other clients: starts the
/// binary, runs a producer and a consumer on their own connections, and meanwhile sends
/// `FRAMES` bad frames of every [`Kind`] from a seeded generator (seed printed; replay with
/// `RILL_BAD_INPUT_SEED`). Frames that keep the connection open go in pipelined bursts on a
/// reused connection or alone on a fresh one followed by a valid request, and each must be
/// answered with its correlation id and the documented code; frames that must close the
/// connection go on fresh connections that must be closed without an answer; frames with no
/// fixed outcome (random, flipped) must only end with the server closing after the client
/// half-closes. Afterwards every record the producer had acknowledged was read back in
/// order, the server still answers, and its rejection counters (`Stats` and `/metrics`)
/// cover every kind sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_while_a_good_client_keeps_working() {
    let seed = Rng::seed_from_env("RILL_BAD_INPUT_SEED");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server =
        ServerProcess::start(&dir.path().join("data"), &dir.path().join("server.log"), "127.0.0.1:0", "127.0.0.1:0");
    let addr = server.addr;
    let admin = Client::connect(addr, "bad-input-admin").await.expect("connect");
    for topic in [GOOD_TOPIC, FUZZ_TOPIC, PROBE_TOPIC] {
        let settings = TopicSettings { partitions: 1, fsync: Some(FsyncPolicy::Always), ..TopicSettings::default() };
        admin.create_topic(topic, settings).await.expect("create topic");
    }
    admin.produce(FUZZ_TOPIC, 0, Acks::Leader, batch(&["seed"])).await.expect("produce to the fuzz topic");

    let stop = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicU64::new(u64::MAX));
    let read = Arc::new(AtomicU64::new(0));
    let producer = tokio::spawn(good_producer(addr, Arc::clone(&stop), Arc::clone(&produced)));
    let consumer = tokio::spawn(good_consumer(addr, Arc::clone(&produced), Arc::clone(&read)));

    let started = Instant::now();
    let tally = send_bad_frames(addr, seed).await;
    let read_during_fuzz = read.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let total = producer.await.expect("producer task");
    let consumed = consumer.await.expect("consumer task");
    eprintln!(
        "seed {seed}: {} bad frames in {:?}; good client produced {total}, read {read_during_fuzz} meanwhile; {tally:?}",
        tally.sent.values().sum::<u64>(),
        started.elapsed()
    );
    assert_eq!(consumed, total, "the consumer read every acknowledged record");
    assert!(total > 0 && read_during_fuzz > 0, "the good client made progress while bad frames arrived");
    check_rejection_counters(&admin, &server, &tally).await;
    let status = server.terminate();
    assert!(status.success(), "the server still shuts down cleanly: {status}\n{}", server.log());
}

/// Counts of what was sent and seen.
#[derive(Debug, Default)]
struct Tally {
    sent: BTreeMap<Kind, u64>,
    /// Exchanges of frames without a fixed outcome that neither answered nor closed in time
    /// (a mutated fetch may legitimately long-poll).
    stalled: u64,
}

fn batch(values: &[&str]) -> Bytes {
    let mut builder = BatchBuilder::new(Compression::None, 1_700_000_000_000);
    for value in values {
        builder.push(&Record::from_value(value.to_string())).expect("push");
    }
    builder.build().expect("build").freeze()
}

/// Produces `m0, m1, …` to the good topic until `stop`; checks every receipt's offset
/// (one partition, no failure expected: record `i` is at offset `i`) and publishes the
/// total in `produced`.
async fn good_producer(addr: SocketAddr, stop: Arc<AtomicBool>, produced: Arc<AtomicU64>) -> u64 {
    let client = Client::connect(addr, "good-producer").await.expect("connect");
    let producer =
        Producer::new(client, ProducerConfig { linger_ms: 1, ..ProducerConfig::default() }).expect("producer");
    let mut receipts = VecDeque::new();
    let mut acknowledged = 0u64;
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        receipts.push_back(producer.send(GOOD_TOPIC, None, Bytes::from(format!("m{sent}")), Vec::new()));
        sent += 1;
        if receipts.len() >= GOOD_WINDOW {
            let receipt = receipts.pop_front().expect("window is non-empty").await.expect("good record acknowledged");
            assert_eq!(receipt.offset, acknowledged, "records land in send order");
            acknowledged += 1;
        }
    }
    producer.flush().await;
    for receipt in receipts {
        let receipt = receipt.await.expect("good record acknowledged");
        assert_eq!(receipt.offset, acknowledged, "records land in send order");
        acknowledged += 1;
    }
    produced.store(acknowledged, Ordering::Relaxed);
    acknowledged
}

/// Reads the good topic from the start, checking that record `i` is `m{i}` at offset `i`,
/// until it has read as many records as the producer acknowledged.
async fn good_consumer(addr: SocketAddr, produced: Arc<AtomicU64>, read: Arc<AtomicU64>) -> u64 {
    let client = Client::connect(addr, "good-consumer").await.expect("connect");
    let mut consumer = Consumer::new(client, None, GOOD_TOPIC, StartPosition::Earliest).await.expect("consumer");
    let mut next = 0u64;
    let mut deadline = None;
    while next < produced.load(Ordering::Relaxed) {
        if produced.load(Ordering::Relaxed) != u64::MAX {
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + Duration::from_secs(30));
            assert!(Instant::now() < deadline, "read {next} of {} records in time", produced.load(Ordering::Relaxed));
        }
        for record in consumer.poll(100).await.expect("good poll") {
            assert_eq!(record.offset, next, "records are read in order, without gaps");
            assert_eq!(record.value, Some(Bytes::from(format!("m{next}"))), "record {next} is intact");
            next += 1;
            read.store(next, Ordering::Relaxed);
        }
    }
    next
}

/// Sends `FRAMES` bad frames; panics on the first wrong outcome.
async fn send_bad_frames(addr: SocketAddr, seed: u64) -> Tally {
    let mut rng = Rng::new(seed);
    let templates = templates();
    let mut tally = Tally::default();
    let mut reused = Reused::connect(addr).await;
    let deadline = Instant::now() + FUZZ_DEADLINE;
    let mut sent = 0;
    while sent < FRAMES {
        assert!(Instant::now() < deadline, "only {sent} of {FRAMES} bad frames were sent in {FUZZ_DEADLINE:?}");
        // Two picks in three close a fresh connection; the others are answered, alone on a
        // fresh connection or in a burst of up to 8 on the reused one.
        let kind = if rng.below(3) < 2 { *rng.pick(&CLOSING_KINDS) } else { *rng.pick(&ANSWERED_KINDS) };
        match kind {
            Kind::RandomBytes | Kind::FlippedFrame => {
                let bytes = if kind == Kind::RandomBytes {
                    let len = rng.range(1, 300) as usize;
                    rng.bytes(len)
                } else {
                    let template = rng.pick(&templates).clone();
                    flipped(&mut rng, &template)
                };
                if fresh_exchange(addr, &bytes, true).await == Closed::Stalled {
                    tally.stalled += 1;
                }
                sent += 1;
            }
            Kind::TruncatedFrame | Kind::OversizeLength | Kind::ZeroLength | Kind::BadHeader => {
                let (bytes, half_close) = closing_frame(&mut rng, kind, &templates);
                let outcome = fresh_exchange(addr, &bytes, half_close).await;
                assert_eq!(outcome, Closed::WithoutAnswer, "{kind:?} {bytes:02x?}");
                sent += 1;
            }
            _ if rng.below(4) == 0 => {
                answered_alone(addr, &mut rng, kind).await;
                sent += 1;
            }
            _ => {
                sent += answered_in_burst(&mut rng, &mut reused, &mut tally).await;
                if reused.frames >= FRAMES_PER_REUSED_CONNECTION {
                    reused = Reused::connect(addr).await;
                }
                continue;
            }
        }
        *tally.sent.entry(kind).or_default() += 1;
    }
    assert!(tally.stalled * 100 <= sent as u64, "too many exchanges stalled: {tally:?}");
    tally
}

/// One answered frame alone on a fresh connection, followed by a valid request: the
/// connection must have stayed open to answer it.
async fn answered_alone(addr: SocketAddr, rng: &mut Rng, kind: Kind) {
    let mut fresh = Reused::connect(addr).await;
    let (frame, expect) = answered_frame(rng, kind, fresh.cid());
    let cid = fresh.cid();
    let probe = encode(&Request::ApiVersions, cid);
    let frames = vec![
        (format!("{kind:?}"), frame, expect),
        ("valid api versions".into(), probe, Expect::Code(cid, ErrorCode::None)),
    ];
    fresh.exchange(frames).await;
}

/// A pipelined burst of 1 to 8 answered frames on the reused connection, with valid
/// requests between some of them (served normally); returns the bad frames sent.
async fn answered_in_burst(rng: &mut Rng, reused: &mut Reused, tally: &mut Tally) -> usize {
    let burst = rng.range(1, 8) as usize;
    let mut frames = Vec::with_capacity(2 * burst);
    for _ in 0..burst {
        let kind = *rng.pick(&ANSWERED_KINDS);
        let (frame, expect) = answered_frame(rng, kind, reused.cid());
        frames.push((format!("{kind:?}"), frame, expect));
        *tally.sent.entry(kind).or_default() += 1;
        if rng.below(4) == 0 {
            let cid = reused.cid();
            let valid = encode(&Request::Metadata { topics: vec![FUZZ_TOPIC.into()] }, cid);
            frames.push(("valid metadata".into(), valid, Expect::Code(cid, ErrorCode::None)));
        }
    }
    reused.exchange(frames).await;
    burst
}

/// A request frame from the client "fuzz", as bytes.
fn encode(request: &Request, cid: u32) -> Vec<u8> {
    request.encode(cid, "fuzz").iter().flat_map(|chunk| chunk.to_vec()).collect()
}

/// Valid requests on the fuzz topic that mutations start from (never create or delete).
fn templates() -> Vec<Vec<u8>> {
    let topic = || FUZZ_TOPIC.to_string();
    let requests = [
        Request::ApiVersions,
        Request::Metadata { topics: vec![topic()] },
        Request::ListTopics,
        Request::InitProducerId { transactional_id: None },
        Request::Produce { topic: topic(), partition: 0, acks: Acks::Leader, batch: batch(&["a", "b"]) },
        Request::Produce { topic: topic(), partition: 0, acks: Acks::None, batch: batch(&["c"]) },
        Request::Fetch { topic: topic(), partition: 0, offset: 0, max_bytes: 1 << 16, max_wait_ms: 0 },
        Request::ListOffsets { topic: topic(), partition: 0, query: OffsetQuery::Latest },
        Request::CommitOffset { group: "fuzz-group".into(), topic: topic(), partition: 0, offset: 1 },
        Request::FetchOffset { group: "fuzz-group".into(), topic: topic(), partition: 0 },
        Request::Stats,
    ];
    requests.iter().map(|r| encode(r, 0)).collect()
}

/// `template` with 1 to 3 bytes xor-ed with non-zero values.
fn flipped(rng: &mut Rng, template: &[u8]) -> Vec<u8> {
    let mut bytes = template.to_vec();
    for _ in 0..rng.range(1, 3) {
        let at = rng.below(bytes.len() as u64) as usize;
        bytes[at] ^= rng.range(1, 255) as u8;
    }
    bytes
}

/// A frame the server must close the connection on without answering, and whether the
/// client half-closes after it (a truncated frame only ends at end of stream).
fn closing_frame(rng: &mut Rng, kind: Kind, templates: &[Vec<u8>]) -> (Vec<u8>, bool) {
    match kind {
        Kind::TruncatedFrame => {
            let template = rng.pick(templates).clone();
            (template[..rng.range(1, template.len() as u64 - 1) as usize].to_vec(), true)
        }
        Kind::OversizeLength => {
            let len = rng.range(u64::from(FRAME_SIZE_BYTES_MAX) + 1, u64::from(u32::MAX)) as u32;
            let mut bytes = len.to_le_bytes().to_vec();
            let tail = rng.range(0, 64) as usize;
            bytes.extend(rng.bytes(tail));
            (bytes, false)
        }
        Kind::ZeroLength => (vec![0; 4], false),
        _ => {
            let header = match rng.below(3) {
                // Shorter than the fixed header plus the client id's length.
                0 => {
                    let len = rng.range(1, 9) as usize;
                    rng.bytes(len)
                }
                // A client id longer than what follows.
                1 => {
                    let mut header = vec![1, 0, 1, 0, 7, 0, 0, 0];
                    header.extend(200u16.to_le_bytes());
                    header.extend(b"short");
                    header
                }
                // A client id that is not UTF-8.
                _ => {
                    let mut header = vec![1, 0, 1, 0, 7, 0, 0, 0];
                    header.extend(2u16.to_le_bytes());
                    header.extend([0xff, 0xfe]);
                    header
                }
            };
            let mut bytes = (header.len() as u32).to_le_bytes().to_vec();
            bytes.extend(header);
            (bytes, false)
        }
    }
}

/// A request frame: length prefix, header, body.
fn frame(api_key: u16, api_version: u16, cid: u32, body: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(12 + body.len());
    payload.extend(api_key.to_le_bytes());
    payload.extend(api_version.to_le_bytes());
    payload.extend(cid.to_le_bytes());
    payload.extend(4u16.to_le_bytes());
    payload.extend(b"fuzz");
    payload.extend(body);
    let mut bytes = (payload.len() as u32).to_le_bytes().to_vec();
    bytes.extend(payload);
    bytes
}

/// The body of `request` (its frame without length prefix and header).
fn body_of(request: &Request) -> Vec<u8> {
    let bytes = encode(request, 0);
    bytes[4 + 8 + 2 + 4..].to_vec()
}

/// A frame the server must answer (keeping the connection open), and what it must answer.
fn answered_frame(rng: &mut Rng, kind: Kind, cid: u32) -> (Vec<u8>, Expect) {
    match kind {
        Kind::UnknownApi => {
            let key = rng.range(u64::from(api::COUNT), u64::from(u16::MAX)) as u16;
            let len = rng.range(0, 40) as usize;
            (frame(key, rng.next_u64() as u16, cid, &rng.bytes(len)), Expect::Code(cid, ErrorCode::UnknownApi))
        }
        Kind::BadVersion => {
            let key = rng.below(u64::from(api::COUNT)) as u16;
            let version = match rng.range(1, u64::from(u16::MAX)) as u16 {
                1 => 0,
                version => version,
            };
            let len = rng.range(0, 40) as usize;
            (frame(key, version, cid, &rng.bytes(len)), Expect::Code(cid, ErrorCode::UnsupportedVersion))
        }
        Kind::GarbageBody => {
            // Not create or delete (side effects on other topics), produce (acks = 0 is not
            // answered) or fetch (a long poll).
            const KEYS: [u16; 8] = [
                api::API_VERSIONS,
                api::METADATA,
                api::LIST_TOPICS,
                api::INIT_PRODUCER_ID,
                api::LIST_OFFSETS,
                api::COMMIT_OFFSET,
                api::FETCH_OFFSET,
                api::STATS,
            ];
            let key = *rng.pick(&KEYS);
            let len = rng.range(1, 64) as usize;
            (frame(key, 1, cid, &rng.bytes(len)), Expect::Answer(cid))
        }
        Kind::MalformedBody => (malformed_body(rng, cid), Expect::Code(cid, ErrorCode::MalformedRequest)),
        Kind::CorruptBatch => {
            let batch = corrupt_batch(rng);
            let request = Request::Produce { topic: PROBE_TOPIC.into(), partition: 0, acks: Acks::Leader, batch };
            (encode(&request, cid), Expect::Code(cid, ErrorCode::InvalidBatch))
        }
        other => unreachable!("{other:?} is not answered"),
    }
}

/// A frame with a valid header and a body with one specific defect.
fn malformed_body(rng: &mut Rng, cid: u32) -> Vec<u8> {
    let fetch = Request::Fetch { topic: PROBE_TOPIC.into(), partition: 0, offset: 0, max_bytes: 10, max_wait_ms: 0 };
    match rng.below(9) {
        0 => {
            let key = *rng.pick(&[api::API_VERSIONS, api::LIST_TOPICS, api::STATS]);
            let len = rng.range(1, 16) as usize;
            frame(key, 1, cid, &rng.bytes(len)) // trailing bytes
        }
        1 => {
            let body = body_of(&fetch);
            frame(api::FETCH, 1, cid, &body[..rng.below(body.len() as u64) as usize])
            // truncated
        }
        2 => {
            let mut body = body_of(&fetch);
            let trailing = rng.range(1, 8) as usize;
            body.extend(rng.bytes(trailing)); // trailing bytes
            frame(api::FETCH, 1, cid, &body)
        }
        3 => {
            let produce =
                Request::Produce { topic: PROBE_TOPIC.into(), partition: 0, acks: Acks::Leader, batch: batch(&["x"]) };
            let mut body = body_of(&produce);
            body[2 + PROBE_TOPIC.len() + 4] = rng.range(3, 255) as u8; // acks not 0, 1 or 2
            frame(api::PRODUCE, 1, cid, &body)
        }
        4 => frame(api::METADATA, 1, cid, &10_001u32.to_le_bytes()), // over the topic-list limit
        5 => {
            let create = Request::CreateTopic { name: "never-created".into(), settings: TopicSettings::default() };
            let mut body = body_of(&create);
            body[2 + "never-created".len() + 4] = rng.range(3, 254) as u8; // no such fsync kind
            frame(api::CREATE_TOPIC, 1, cid, &body)
        }
        6 => frame(api::INIT_PRODUCER_ID, 1, cid, &[rng.range(2, 255) as u8]), // not a boolean
        7 => {
            let mut body = 2u16.to_le_bytes().to_vec();
            body.extend([0xc3, 0x28]); // a group name that is not UTF-8
            body.extend(5u16.to_le_bytes());
            body.extend(PROBE_TOPIC.as_bytes());
            body.extend(0u32.to_le_bytes());
            frame(api::FETCH_OFFSET, 1, cid, &body)
        }
        _ => {
            let mut body = 5000u16.to_le_bytes().to_vec(); // a string over the 4096-byte limit
            body.extend(vec![b'a'; 5000]);
            frame(api::DELETE_TOPIC, 1, cid, &body)
        }
    }
}

/// A valid batch with one defect the server must refuse as `InvalidBatch`.
fn corrupt_batch(rng: &mut Rng) -> Bytes {
    let mut bytes = BytesMut::from(&batch(&["one", "two", "three"])[..]);
    match rng.below(3) {
        0 => {
            // A byte inside the checksummed range, the checksum itself or the version.
            let at = rng.range(VERSION_OFFSET as u64, bytes.len() as u64 - 1) as usize;
            bytes[at] ^= rng.range(1, 255) as u8;
        }
        1 => bytes.truncate(rng.below(bytes.len() as u64) as usize),
        _ => {
            let wrong = (bytes.len() as u32).wrapping_add(rng.range(1, 100) as u32);
            bytes[BATCH_LENGTH_OFFSET..BATCH_LENGTH_OFFSET + 4].copy_from_slice(&wrong.to_le_bytes());
        }
    }
    bytes.freeze()
}

/// How a fresh connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Closed {
    /// The server closed it without sending a byte.
    WithoutAnswer,
    /// The server answered something, then closed it.
    AfterAnswer,
    /// Neither within [`EXCHANGE_TIMEOUT`].
    Stalled,
}

/// Sends `bytes` on a new connection (half-closing after them if asked) and reads until
/// the server closes it. A reset counts as closed: the server may close while bytes it did
/// not read are still arriving.
async fn fresh_exchange(addr: SocketAddr, bytes: &[u8], half_close: bool) -> Closed {
    let mut socket = TcpStream::connect(addr).await.expect("connect");
    // A write may fail once the server has closed; reading below sees the close.
    if socket.write_all(bytes).await.is_ok() && half_close {
        socket.shutdown().await.ok();
    }
    let mut received = 0usize;
    let mut scratch = [0u8; 4096];
    let read_all = async {
        loop {
            match socket.read(&mut scratch).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received += n,
            }
        }
    };
    match tokio::time::timeout(EXCHANGE_TIMEOUT, read_all).await {
        Err(_elapsed) => Closed::Stalled,
        Ok(()) if received == 0 => Closed::WithoutAnswer,
        Ok(()) => Closed::AfterAnswer,
    }
}

/// A connection kept open across many exchanges.
struct Reused {
    socket: TcpStream,
    buf: BytesMut,
    next_cid: u32,
    frames: u32,
}

impl Reused {
    async fn connect(addr: SocketAddr) -> Reused {
        let socket = TcpStream::connect(addr).await.expect("connect");
        Reused { socket, buf: BytesMut::new(), next_cid: 1, frames: 0 }
    }

    fn cid(&mut self) -> u32 {
        self.next_cid += 1;
        self.next_cid
    }

    /// Writes every frame at once (pipelined), then checks one answer per frame, in order.
    async fn exchange(&mut self, frames: Vec<(String, Vec<u8>, Expect)>) {
        let wire: Vec<u8> = frames.iter().flat_map(|(_, bytes, _)| bytes.iter().copied()).collect();
        self.frames += frames.len() as u32;
        let exchange = async {
            self.socket.write_all(&wire).await.expect("write a burst");
            for (what, bytes, expect) in &frames {
                let (cid, code) = self.answer().await;
                let context = || format!("{what} {expect:?} frame {bytes:02x?}");
                match *expect {
                    Expect::Code(want_cid, want_code) => {
                        assert_eq!((cid, code), (want_cid, want_code as u16), "{}", context())
                    }
                    Expect::Answer(want_cid) => assert_eq!(cid, want_cid, "{}", context()),
                }
            }
        };
        tokio::time::timeout(EXCHANGE_TIMEOUT, exchange).await.expect("answers arrive in time");
    }

    /// The correlation id and error code of the next answer.
    async fn answer(&mut self) -> (u32, u16) {
        loop {
            if let Some(frame) = split_frame(&mut self.buf, FRAME_SIZE_BYTES_MAX).expect("a valid response frame") {
                assert!(frame.len() >= 6, "a response header");
                let cid = u32::from_le_bytes(frame[..4].try_into().expect("4 bytes"));
                let code = u16::from_le_bytes(frame[4..6].try_into().expect("2 bytes"));
                return (cid, code);
            }
            let n = self.socket.read_buf(&mut self.buf).await.expect("read an answer");
            assert!(n > 0, "the server closed a connection it had to keep open");
        }
    }
}

/// Every rejection reason exercised is counted, in `Stats` and in `/metrics`, at least as
/// often as this test caused it (random and flipped frames add more).
async fn check_rejection_counters(admin: &Client, server: &ServerProcess, tally: &Tally) {
    let stats: BTreeMap<String, u64> = admin.stats().await.expect("stats after the bad frames").into_iter().collect();
    let (status, page) = http_get(server.http_addr(), "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(http_get(server.http_addr(), "/health").await.0, 200, "still healthy");
    let sent = |kinds: &[Kind]| kinds.iter().map(|k| tally.sent.get(k).copied().unwrap_or(0)).sum::<u64>();
    let reasons = [
        ("oversize", sent(&[Kind::OversizeLength])),
        ("malformed_header", sent(&[Kind::ZeroLength, Kind::BadHeader])),
        ("unknown_api", sent(&[Kind::UnknownApi])),
        ("unsupported_version", sent(&[Kind::BadVersion])),
        ("malformed_body", sent(&[Kind::MalformedBody])),
    ];
    for (reason, caused) in reasons {
        assert!(caused > 0, "the test sent frames rejected as {reason}");
        let counted = stats[&format!("rejected_{reason}_total")];
        assert!(counted >= caused, "rejected_{reason}_total = {counted}, but {caused} were sent");
        let series = format!("rill_rejected_total{{reason=\"{reason}\"}}");
        assert!(metric(&page, &series).is_some_and(|v| v >= caused as f64), "{series}\n{page}");
    }
    let invalid_batches = sent(&[Kind::CorruptBatch]);
    assert!(invalid_batches > 0);
    let produce_errors = metric(&page, "rill_request_errors_total{api=\"produce\"}").expect("produce errors");
    assert!(produce_errors >= invalid_batches as f64, "{produce_errors} produce errors, {invalid_batches} sent");
}
