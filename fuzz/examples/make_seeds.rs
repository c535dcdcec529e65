//! Writes the committed seed corpora under `fuzz/corpus/<target>/`, built with the engine's
//! own encoders so every seed starts the fuzzer on valid, deep inputs.
//!
//! `cd fuzz && cargo +nightly run --example make_seeds` (overwrites the seeds it knows,
//! leaves any other file alone). Every seed is kept under 8 KiB.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use rill_engine::cursor::offsets::{self, OffsetKey};
use rill_engine::cursor::priority::state::{self as cursor_state, CursorState, Failure};
use rill_engine::cursor::priority::state_file;
use rill_engine::format::batch::{
    set_base_offset, BatchBuilder, BatchHeader, Compression, Header, ProducerFields, Record, BATCH_HEADER_SIZE,
};
use rill_engine::format::topic_meta;
use rill_engine::format::varint::{put_varint, put_varlong};
use rill_engine::io::StdStorage;
use rill_engine::producer::snapshot;
use rill_engine::producer::state::{BatchMetadata, ProducerEntry, ProducerStates};
use rill_engine::segment::{OpenKind, Segment, SegmentConfig};
use rill_engine::{FsyncPolicy, TopicConfig};
use rill_fuzz::{
    two_slot_input, write_state_slot, RecordSpec, RoundtripInput, SegmentInput, StoreOp, StoreOpsInput, TopicSpec,
};

const SEED_MAX: usize = 8 * 1024;

fn corpus_dir(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    std::fs::create_dir_all(&dir).expect("create corpus dir");
    dir
}

fn write_seed(target: &str, name: &str, bytes: &[u8]) {
    assert!(bytes.len() < SEED_MAX, "seed {target}/{name} is {} bytes", bytes.len());
    std::fs::write(corpus_dir(target).join(name), bytes).expect("write seed");
}

fn sample_records(n: usize, salt: u8) -> Vec<Record> {
    (0..n)
        .map(|i| Record {
            timestamp_ms: if i % 3 == 2 { None } else { Some(1_700_000_000_000 + (i as i64) * 7 - 20) },
            key: (i % 2 == 0).then(|| Bytes::from(format!("key-{salt}-{i}"))),
            value: if i % 5 == 4 { None } else { Some(Bytes::from(vec![b'a' + (i % 26) as u8; i * 3])) },
            headers: (0..(i % 3))
                .map(|h| Header { key: format!("h{h}"), value: (h % 2 == 0).then(|| Bytes::from(format!("v{i}"))) })
                .collect(),
        })
        .collect()
}

fn build(records: &[Record], compression: Compression, producer: Option<ProducerFields>, base: u64) -> BytesMut {
    let mut builder = BatchBuilder::new(compression, 1_700_000_000_500);
    if let Some(p) = producer {
        builder = builder.producer(p);
    }
    for record in records {
        builder.push(record).expect("push");
    }
    let mut batch = builder.build().expect("build");
    set_base_offset(&mut batch, base);
    batch
}

/// `count` batches, contiguous offsets from 0, alternating codecs.
fn log_of(count: usize) -> Vec<u8> {
    let mut log = Vec::new();
    let mut next = 0u64;
    for i in 0..count {
        let records = sample_records(1 + i % 4, i as u8);
        let codec = if i % 2 == 0 { Compression::None } else { Compression::Lz4 };
        let batch = build(&records, codec, None, next);
        next = BatchHeader::parse(&batch).expect("header").next_offset();
        log.extend_from_slice(&batch);
    }
    log
}

fn batch_seeds() {
    let t = "batch_decode";
    let plain = build(&sample_records(4, 1), Compression::None, None, 0);
    let lz4 = build(&sample_records(6, 2), Compression::Lz4, None, 4);
    let producer = ProducerFields { producer_id: 42, producer_epoch: 3, base_sequence: 17 };
    let idempotent = build(&sample_records(2, 3), Compression::None, Some(producer), 1000);
    write_seed(t, "plain", &plain);
    write_seed(t, "lz4", &lz4);
    write_seed(t, "producer", &idempotent);
    write_seed(t, "two_batches", &[&plain[..], &lz4[..]].concat());
    write_seed(t, "torn_tail", &[&plain[..], &lz4[..lz4.len() - 5]].concat());
    let mut bad_crc = plain.to_vec();
    *bad_crc.last_mut().expect("non-empty") ^= 1;
    write_seed(t, "bad_crc", &bad_crc);
    write_seed(t, "header_only", &plain[..BATCH_HEADER_SIZE]);
}

fn roundtrip_seeds() {
    let t = "batch_roundtrip";
    let cases = [
        ("one_value", RoundtripInput { now_ms: 5, producer: None, records: vec![Record::from_value("x")] }),
        ("mixed", RoundtripInput { now_ms: 1_700_000_000_000, producer: None, records: sample_records(8, 4) }),
        (
            "producer",
            RoundtripInput {
                now_ms: -1,
                producer: Some(ProducerFields { producer_id: 1, producer_epoch: 0, base_sequence: 0 }),
                records: sample_records(3, 5),
            },
        ),
        (
            "extreme_timestamps",
            RoundtripInput {
                now_ms: i64::MIN,
                producer: None,
                records: vec![
                    Record { timestamp_ms: Some(i64::MAX), ..Record::keyed("a", "") },
                    Record { timestamp_ms: None, ..Record::default() },
                    Record { timestamp_ms: Some(0), ..Record::from_value(vec![0u8; 300]) },
                ],
            },
        ),
    ];
    for (name, input) in cases {
        assert_eq!(RoundtripInput::decode(&input.encode()), input, "seed {name} round-trips");
        write_seed(t, name, &input.encode());
    }
}

/// Files of a segment written live by the engine: `(log, index, timeindex, next_offset)`.
fn live_segment(batches: usize, closed: bool) -> (Vec<u8>, Vec<u8>, Vec<u8>, u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = SegmentConfig { index_interval_bytes: 64, index_size_bytes: 4096 };
    let (segment, mut indexing) = Segment::create(&StdStorage, dir.path(), 0, &config).expect("create");
    let log = log_of(batches);
    for batch in rill_engine::format::BatchIter::new(Bytes::from(log)) {
        let batch = batch.expect("batch");
        segment.append(batch.as_bytes(), batch.header(), &mut indexing).expect("append");
    }
    if closed {
        segment.close_indices(&mut indexing).expect("close");
    }
    let next = segment.next_offset();
    let path = segment.log_path().to_path_buf();
    drop(segment);
    let read = |ext: &str| std::fs::read(path.with_extension(ext)).expect("read");
    (read("log"), read("index"), read("timeindex"), next)
}

fn segment_seeds() {
    let t = "segment_recovery";
    let (log, index, timeindex, next) = live_segment(12, true);
    let seg = |kind, index: Option<&Vec<u8>>, timeindex: Option<&Vec<u8>>, append, log: Vec<u8>| SegmentInput {
        kind,
        index: index.cloned(),
        timeindex: timeindex.cloned(),
        append_and_reopen: append,
        fix_crcs: false,
        log,
    };
    let mut torn = log.clone();
    torn.truncate(log.len() - 20);
    let mut garbage = log.clone();
    garbage.extend_from_slice(&[0xab; 40]);
    let mut flipped = log.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x10;
    let cases = [
        (
            "recover_clean",
            SegmentInput { fix_crcs: true, ..seg(OpenKind::ActiveRecover, None, None, false, log.clone()) },
        ),
        ("recover_torn", SegmentInput { fix_crcs: true, ..seg(OpenKind::ActiveRecover, None, None, false, torn) }),
        (
            "recover_garbage_append",
            SegmentInput { fix_crcs: true, ..seg(OpenKind::ActiveRecover, None, None, true, garbage) },
        ),
        ("recover_flipped", seg(OpenKind::ActiveRecover, None, None, false, flipped)),
        ("recover_empty_append", seg(OpenKind::ActiveRecover, None, None, true, Vec::new())),
        ("clean_trusted", seg(OpenKind::ActiveClean, Some(&index), Some(&timeindex), true, log.clone())),
        ("clean_no_index", seg(OpenKind::ActiveClean, None, Some(&timeindex), false, log.clone())),
        (
            "sealed_trusted",
            seg(OpenKind::Sealed { end_offset: next }, Some(&index), Some(&timeindex), false, log.clone()),
        ),
        ("sealed_rebuild", seg(OpenKind::Sealed { end_offset: next }, None, None, false, log.clone())),
        (
            "sealed_wrong_end",
            seg(OpenKind::Sealed { end_offset: next + 1 }, Some(&index), Some(&timeindex), false, log),
        ),
    ];
    for (name, input) in cases {
        assert_eq!(SegmentInput::decode(&input.encode()), input, "seed {name} round-trips");
        write_seed(t, name, &input.encode());
    }
    // Enough batches for a few dozen index entries.
    let (log, _, _, _) = live_segment(40, true);
    let many = SegmentInput { fix_crcs: true, ..seg(OpenKind::ActiveRecover, None, None, true, log) };
    write_seed(t, "recover_many", &many.encode());
    // Indices preallocated and not trimmed: a crash of an active segment.
    let (log, index, timeindex, _) = live_segment(6, false);
    let input = seg(OpenKind::ActiveClean, Some(&index[..256].to_vec()), Some(&timeindex[..240].to_vec()), true, log);
    write_seed(t, "clean_untrimmed", &input.encode());
}

fn topic_meta_seeds() {
    let t = "topic_meta_decode";
    let configs = [
        ("default", TopicConfig::default()),
        (
            "interval",
            TopicConfig {
                partitions: 7,
                fsync: FsyncPolicy::Interval { interval_ms: 250 },
                retention_bytes: Some(1 << 30),
                segment_ms: None,
                ..TopicConfig::default()
            },
        ),
        (
            "never",
            TopicConfig {
                partitions: 10_000,
                fsync: FsyncPolicy::Never,
                segment_size_bytes: 4096,
                segment_ms: None,
                retention_ms: None,
                index_interval_bytes: 1,
                index_size_bytes: 64,
                batch_size_bytes_max: 1,
                ..TopicConfig::default()
            },
        ),
    ];
    for (name, config) in configs {
        let encoded = topic_meta::encode(&config);
        assert_eq!(topic_meta::decode(&encoded).expect("decodes"), config);
        write_seed(t, name, &encoded);
    }
}

fn varint_seeds() {
    let t = "varint";
    let mut small = Vec::new();
    for v in [0, 1, -1, 63, -64, 64, 300, -300] {
        put_varint(&mut small, v);
    }
    write_seed(t, "small", &small);
    let mut bounds = Vec::new();
    for v in [i32::MAX, i32::MIN] {
        put_varint(&mut bounds, v);
    }
    for v in [i64::MAX, i64::MIN, i64::from(u32::MAX), 1 << 62] {
        put_varlong(&mut bounds, v);
    }
    write_seed(t, "bounds", &bounds);
    write_seed(
        t,
        "overlong",
        &[0x80, 0x80, 0x80, 0x80, 0x80, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
    );
}

fn snapshot_seeds() {
    let t = "snapshot_decode";
    let meta = |first: i32, base: u64| BatchMetadata {
        first_sequence: first,
        last_sequence: first + 2,
        base_offset: base,
        last_offset: base + 2,
        timestamp_ms: 1_700_000_000_000 + base as i64,
    };
    let mut states = ProducerStates::new();
    states.insert(1, ProducerEntry { epoch: 0, batches: [meta(0, 0)].into(), last_timestamp_ms: 5 });
    states.insert(
        42,
        ProducerEntry {
            epoch: 3,
            batches: (0..5).map(|i| meta(i * 3, 10 + i as u64 * 3)).collect(),
            last_timestamp_ms: 1_700_000_000_999,
        },
    );
    states.insert(i64::MAX, ProducerEntry { epoch: i16::MAX, batches: Default::default(), last_timestamp_ms: -1 });
    for (name, states, offset) in [("empty", ProducerStates::new(), 0u64), ("three", states, 100)] {
        let encoded = snapshot::encode(&states, offset);
        assert_eq!(snapshot::decode(&encoded).expect("decodes"), (states, offset));
        write_seed(t, name, &encoded);
    }
}

fn offsets_seeds() {
    let t = "offsets_decode";
    let key = |group: &str, topic: &str, partition| OffsetKey { group: group.into(), topic: topic.into(), partition };
    let one: BTreeMap<_, _> = [(key("g", "orders", 0), 19u64)].into();
    let many: BTreeMap<_, _> = [
        (key("g", "orders", 0), 19u64),
        (key("g", "orders", 7), 0),
        (key("billing", "invoices", u32::MAX), u64::MAX),
        (key("g", "", 1), 3),
    ]
    .into();
    for (name, map) in [("empty", BTreeMap::new()), ("one", one), ("many", many)] {
        let encoded = offsets::encode(&map);
        assert_eq!(offsets::decode(&encoded).expect("decodes"), map);
        write_seed(t, name, &encoded);
    }
}

fn cursor_state_seeds() {
    let t = "cursor_state_decode";
    let mut state = CursorState::new(2, 3);
    let q = &mut state.queues[4];
    q.committed = 10;
    q.settled.extend([12, 15]);
    let failure = Failure { failures: 2, visible_at_ms: 500, first_failure_ms: 100, last_failure_ms: 300 };
    q.failed.insert(10, failure);
    q.failed.insert(13, Failure { failures: 1, ..failure });
    state.queues[0].committed = 7;
    let states = [("fresh", CursorState::new(1, 1)), ("two_lanes", state), ("four_lanes", CursorState::new(4, 2))];
    for (name, state) in &states {
        let encoded = cursor_state::encode(state);
        assert_eq!(&cursor_state::decode(&encoded).expect("decodes"), state);
        write_seed(t, name, &encoded);
    }
    // Two-slot state files (v2), as `rill_fuzz::two_slot_file` builds them from small inputs:
    // each slot's header and state, the rest of the slot zeros.
    let full_slot = |slot_size: usize, sequence: u64, state: &CursorState| {
        let encoded = cursor_state::encode(state);
        let mut bytes = vec![0u8; slot_size];
        write_state_slot(&mut bytes, sequence, &encoded);
        bytes.truncate(state_file::SLOT_HEADER_SIZE + encoded.len());
        bytes
    };
    // A slot whose CRC is zeroed: valid only once the target repairs it.
    let stale_crc = |sequence: u64, state: &CursorState| {
        let mut bytes = full_slot(state_file::SLOT_SIZE_MIN, sequence, state);
        bytes[state_file::SLOT_HEADER_CRC..state_file::SLOT_HEADER_SIZE].fill(0);
        bytes
    };
    let small = state_file::SLOT_SIZE_MIN;
    let (fresh, two, four) = (&states[0].1, &states[1].1, &states[2].1);
    let cases = [
        ("slots_newest_second", two_slot_input(false, false, &full_slot(small, 4, fresh), &full_slot(small, 5, two))),
        ("slots_newest_first", two_slot_input(false, false, &full_slot(small, 7, four), &full_slot(small, 6, two))),
        ("slots_one_valid", two_slot_input(false, false, &[], &full_slot(small, 1, two))),
        ("slots_equal_sequence", two_slot_input(false, true, &full_slot(small, 3, two), &full_slot(small, 3, fresh))),
        ("slots_large", two_slot_input(true, false, &full_slot(2 * small, 9, four), &full_slot(2 * small, 8, fresh))),
        // CRCs repaired by the target: mutations of the fields behind the CRC get through.
        ("slots_fix_crcs", two_slot_input(false, true, &stale_crc(2, two), &stale_crc(1, four))),
    ];
    for (name, input) in cases {
        let file = rill_fuzz::two_slot_file(&input);
        assert!(state_file::decode_file(&file).is_ok(), "seed {name} is a valid state file");
        write_seed(t, name, &input);
    }
}

fn store_seeds() {
    let t = "store_ops";
    let spec = |fsync_never: bool| TopicSpec {
        fsync_never,
        segment_size: 0,
        segment_ms: None,
        retention_bytes: None,
        retention_ms: None,
        index_interval: 8,
        index_size: 15,
    };
    let record = |fill: u8, value_len: u16| RecordSpec {
        fill,
        key_len: (fill % 2 == 0).then_some(fill % 16),
        value_len: Some(value_len),
        timestamp_delta_ms: (fill % 3 != 0).then_some(i16::from(fill) * 10 - 500),
        header: fill % 4 == 0,
    };
    let append = |slot: u8, lz4: bool, fill: u8, count: usize, value_len: u16| StoreOp::Append {
        slot,
        lz4,
        advance_ms: u16::from(fill) * 3,
        records: (0..count).map(|i| record(fill.wrapping_add(i as u8), value_len)).collect(),
    };
    let appends = |slot: u8, n: u8, value_len: u16| -> Vec<StoreOp> {
        (0..n).map(|i| append(slot, i % 3 == 1, i * 7, 1 + usize::from(i % 8), value_len)).collect()
    };
    let read = |slot: u8, selector: u16, max_bytes: u16| StoreOp::Read { slot, selector, max_bytes };
    let crash = |mode: u8, seed: u64| StoreOp::Crash { mode, seed };

    let mut always = vec![StoreOp::CreateTopic { slot: 0, spec: spec(false) }];
    always.extend(appends(0, 14, 300));
    always.extend([read(0, 3, 1), read(0, 20, 5000), crash(0, 1)]);
    always.extend(appends(0, 3, 500));
    always.extend([crash(3, 77), StoreOp::CloseReopen, read(0, 7, 100)]);

    let timed = TopicSpec { segment_ms: Some(999), index_size: 0, ..spec(true) };
    let mut never = vec![StoreOp::CreateTopic { slot: 1, spec: timed }];
    never.extend(appends(1, 6, 200));
    never.push(StoreOp::Roll { slot: 1 });
    never.extend(appends(1, 5, 400));
    never.push(crash(2, 12345));
    never.extend(appends(1, 4, 100));
    never.push(crash(3, 999));
    never.extend(appends(1, 2, 100));
    never.extend([crash(1, 0), read(1, 10, 2000)]);
    never.extend(appends(1, 3, 100));
    never.extend([StoreOp::CloseReopen, crash(0, 0)]);

    let retained = TopicSpec {
        segment_size: 1000,
        retention_bytes: Some(1200),
        retention_ms: Some(3000),
        segment_ms: Some(20_000),
        ..spec(false)
    };
    let mut retention = vec![StoreOp::CreateTopic { slot: 2, spec: retained }];
    retention.extend(appends(2, 20, 700));
    retention.extend([
        StoreOp::Retention { flags: 1, advance_ms: 0 },
        read(2, 0, 100),
        // 1 ms before, exactly at and 1 ms past the age limit of t2's oldest segment.
        StoreOp::Retention { flags: 0b00_1010, advance_ms: 0 },
        StoreOp::Retention { flags: 0b01_1011, advance_ms: 0 },
        StoreOp::Retention { flags: 0b10_1010, advance_ms: 0 },
    ]);
    retention.extend(appends(2, 4, 50));
    retention.extend([
        StoreOp::Retention { flags: 0, advance_ms: 60_000 },
        StoreOp::CloseReopen,
        StoreOp::AdvanceClock { ms: 10_000_000 },
        StoreOp::Retention { flags: 1, advance_ms: 1 },
    ]);

    let mut two_topics = vec![
        StoreOp::CreateTopic { slot: 0, spec: TopicSpec { segment_size: 4000, ..spec(false) } },
        StoreOp::CreateTopic { slot: 2, spec: spec(true) },
        StoreOp::CreateTopic { slot: 0, spec: spec(true) },
    ];
    for i in 0..8u8 {
        two_topics.push(append(0, true, i, 4, 600));
        two_topics.push(append(2, false, i + 100, 3, 600));
    }
    two_topics.extend([read(0, 5, 3000), read(1, 0, 0), crash(2, 4242), read(2, 9, 1)]);
    two_topics.extend([append(1, false, 1, 1, 1), StoreOp::CloseReopen, read(0, 30, 60_000)]);

    for (name, ops) in
        [("always_crash", always), ("never_crashes", never), ("retention", retention), ("two_topics", two_topics)]
    {
        let input = StoreOpsInput { ops };
        assert_eq!(StoreOpsInput::decode(&input.encode()), input, "seed {name} round-trips");
        write_seed(t, name, &input.encode());
    }
}

fn config_seeds() {
    let t = "config_parse";
    let cases: [(&str, &str); 4] = [
        ("empty", ""),
        (
            "full",
            "data_dir = \"/var/lib/rill\"\nlisten = \"0.0.0.0:7400\"\nmetrics_listen = \"\"\nmax_connections = 64\n\
             max_frame_bytes = 1048576\nconnection_inflight_bytes_max = 8388608\nserver_inflight_bytes_max = 67108864\n\
             shutdown_timeout_ms = 5000\n\n[topic_defaults]\npartitions = 4\nfsync = \"interval\"\n\
             fsync_interval_ms = 250\nsegment_size_bytes = 1073741824\nretention_bytes = 10000000\nretention_ms = 86400000\n",
        ),
        ("fsync_colon", "[topic_defaults]\nfsync = \"interval:100\"\n"),
        ("invalid", "max_frame_bytes = 0\nlisten = 5\n"),
    ];
    for (name, text) in cases {
        write_seed(t, name, text.as_bytes());
    }
    assert!(rill_server::config::ServerConfig::from_toml(cases[1].1).is_ok(), "full config seed parses");
}

/// Request and response frames of several api keys, encoded by the server's own encoders;
/// one request is also written as `api key + body` for the second half of `frame_decode`.
fn frame_seeds() {
    use rill_server::messages::{Request, Response};
    let join = |parts: Vec<Bytes>| parts.iter().flat_map(|p| p.iter().copied()).collect::<Vec<u8>>();
    let requests = [
        ("api_versions", Request::ApiVersions),
        ("list_topics", Request::ListTopics),
        ("stats", Request::Stats),
        ("metadata", Request::Metadata { topics: vec!["events".into(), "orders".into()] }),
        ("delete_topic", Request::DeleteTopic { name: "events".into() }),
        ("init_producer_id", Request::InitProducerId { transactional_id: Some("tx-1".into()) }),
    ];
    for (name, request) in &requests {
        write_seed("frame_decode", &format!("request_{name}"), &join(request.encode(42, "seed-client")));
    }
    // Two frames back to back.
    let mut two = join(requests[0].1.encode(1, "a"));
    two.extend(join(requests[3].1.encode(2, "b")));
    write_seed("frame_decode", "two_requests", &two);
    let responses = [
        ("empty", Response::Empty),
        ("list_topics", Response::ListTopics(vec!["events".into()])),
        ("api_versions", Response::ApiVersions(vec![(0, 1, 1), (7, 1, 1)])),
    ];
    for (name, response) in &responses {
        write_seed("frame_decode", &format!("response_{name}"), &join(response.encode(9)));
    }
    // api key (LE) + body: a metadata request body.
    let frame = join(requests[3].1.encode(3, "c"));
    let mut keyed = 1u16.to_le_bytes().to_vec();
    keyed.extend_from_slice(&frame[4..]);
    write_seed("frame_decode", "keyed_metadata_body", &keyed);
}

fn main() {
    frame_seeds();
    batch_seeds();
    roundtrip_seeds();
    segment_seeds();
    topic_meta_seeds();
    varint_seeds();
    snapshot_seeds();
    offsets_seeds();
    cursor_state_seeds();
    store_seeds();
    config_seeds();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut total = 0u64;
    for target in std::fs::read_dir(&root).expect("corpus") {
        for seed in std::fs::read_dir(target.expect("entry").path()).expect("target dir") {
            total += seed.expect("seed").metadata().expect("metadata").len();
        }
    }
    println!("seeds written under {}: {total} bytes in all", root.display());
}
