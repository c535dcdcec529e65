//! Request and response bodies of protocol v1 (normative: `docs/protocol.md`). Pure
//! encode/decode; the server decodes requests and encodes responses, the client the reverse.

use bytes::Bytes;
use rill_engine::FsyncPolicy;

use crate::error::{Error, ErrorCode, Result};
use crate::frame::{put_request_header, put_response_header, RequestHeader, WireReader, WireWriter};
use crate::limits::METADATA_TOPICS_MAX;

/// Api keys. Append-only.
pub mod api {
    /// Versions handshake.
    pub const API_VERSIONS: u16 = 0;
    /// Topic descriptions (all or named).
    pub const METADATA: u16 = 1;
    /// Create a topic.
    pub const CREATE_TOPIC: u16 = 2;
    /// Delete a topic.
    pub const DELETE_TOPIC: u16 = 3;
    /// Topic names.
    pub const LIST_TOPICS: u16 = 4;
    /// Issue an idempotent producer id.
    pub const INIT_PRODUCER_ID: u16 = 5;
    /// Append a record batch.
    pub const PRODUCE: u16 = 6;
    /// Read record batches.
    pub const FETCH: u16 = 7;
    /// Earliest / latest / by-timestamp offsets.
    pub const LIST_OFFSETS: u16 = 8;
    /// Commit a consumer group's offset.
    pub const COMMIT_OFFSET: u16 = 9;
    /// Read a consumer group's committed offset.
    pub const FETCH_OFFSET: u16 = 10;
    /// Server counters.
    pub const STATS: u16 = 11;
    /// Number of api keys defined.
    pub const COUNT: u16 = 12;
}

/// The only version of every api in protocol v1.
pub const API_VERSION_V1: u16 = 1;

/// Acknowledgement level of a produce request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acks {
    /// No response is sent.
    None = 0,
    /// Answered when the leader's log acknowledges the batch per the topic's fsync policy.
    Leader = 1,
}

/// What a list-offsets request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffsetQuery {
    /// The log start offset.
    Earliest,
    /// The end offset (next offset to be written).
    Latest,
    /// The first record with a timestamp at or after this (ms).
    Timestamp(i64),
}

/// Topic settings in a create request; `None` means the server's default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TopicSettings {
    /// Partitions.
    pub partitions: u32,
    /// Fsync policy; `None` = server default.
    pub fsync: Option<FsyncPolicy>,
    /// Segment size.
    pub segment_size_bytes: Option<u64>,
    /// Retention by size.
    pub retention_bytes: Option<u64>,
    /// Retention by age.
    pub retention_ms: Option<u64>,
}

/// One partition's offsets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionInfo {
    /// Partition number.
    pub partition: u32,
    /// First offset held.
    pub log_start: u64,
    /// Next offset to be written (high watermark).
    pub end_offset: u64,
    /// Bytes on disk.
    pub size_bytes: u64,
}

/// A topic's configuration and partitions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicDescription {
    /// Topic name.
    pub name: String,
    /// Fsync policy.
    pub fsync: FsyncPolicy,
    /// Segment size.
    pub segment_size_bytes: u64,
    /// Retention by size.
    pub retention_bytes: Option<u64>,
    /// Retention by age.
    pub retention_ms: Option<u64>,
    /// Partitions, by number.
    pub partitions: Vec<PartitionInfo>,
}

/// A request body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Supported api versions.
    ApiVersions,
    /// Describe topics (all when empty).
    Metadata {
        /// Topics to describe.
        topics: Vec<String>,
    },
    /// Create a topic.
    CreateTopic {
        /// Name.
        name: String,
        /// Settings.
        settings: TopicSettings,
    },
    /// Delete a topic.
    DeleteTopic {
        /// Name.
        name: String,
    },
    /// List topic names.
    ListTopics,
    /// Issue a producer id.
    InitProducerId {
        /// Transactional id: re-init bumps the epoch and fences the previous holder.
        transactional_id: Option<String>,
    },
    /// Append one record batch (format v1, as on disk).
    Produce {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// Acknowledgement level.
        acks: Acks,
        /// The encoded batch.
        batch: Bytes,
    },
    /// Read batches.
    Fetch {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// First offset wanted.
        offset: u64,
        /// Most bytes to return (at least one batch is returned).
        max_bytes: u32,
        /// Long poll: wait up to this long for data at `offset`.
        max_wait_ms: u32,
    },
    /// Offsets by position or time.
    ListOffsets {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// What to look up.
        query: OffsetQuery,
    },
    /// Commit a group's position.
    CommitOffset {
        /// Group.
        group: String,
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// Next offset the group will read.
        offset: u64,
    },
    /// Read a group's position.
    FetchOffset {
        /// Group.
        group: String,
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
    },
    /// Server counters.
    Stats,
}

/// A successful response body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// `(api key, min version, max version)` per supported api.
    ApiVersions(Vec<(u16, u16, u16)>),
    /// Topic descriptions.
    Metadata(Vec<TopicDescription>),
    /// No body (create, delete, commit).
    Empty,
    /// Topic names.
    ListTopics(Vec<String>),
    /// Issued producer identity.
    InitProducerId {
        /// Producer id.
        producer_id: i64,
        /// Producer epoch.
        producer_epoch: i16,
    },
    /// Where the batch landed.
    Produce {
        /// First offset.
        base_offset: u64,
        /// Last offset.
        last_offset: u64,
        /// The batch was a retry answered with its original offsets.
        duplicate: bool,
    },
    /// Batches read.
    Fetch {
        /// Log start offset.
        log_start: u64,
        /// End offset (high watermark).
        end_offset: u64,
        /// Whole batches, as on disk.
        records: Bytes,
    },
    /// An offset, if one matches.
    Offset(Option<u64>),
    /// Counters.
    Stats(Vec<(String, u64)>),
}

impl Request {
    /// The api key of this request.
    pub fn api_key(&self) -> u16 {
        match self {
            Request::ApiVersions => api::API_VERSIONS,
            Request::Metadata { .. } => api::METADATA,
            Request::CreateTopic { .. } => api::CREATE_TOPIC,
            Request::DeleteTopic { .. } => api::DELETE_TOPIC,
            Request::ListTopics => api::LIST_TOPICS,
            Request::InitProducerId { .. } => api::INIT_PRODUCER_ID,
            Request::Produce { .. } => api::PRODUCE,
            Request::Fetch { .. } => api::FETCH,
            Request::ListOffsets { .. } => api::LIST_OFFSETS,
            Request::CommitOffset { .. } => api::COMMIT_OFFSET,
            Request::FetchOffset { .. } => api::FETCH_OFFSET,
            Request::Stats => api::STATS,
        }
    }

    /// Encodes a whole request frame.
    pub fn encode(&self, correlation_id: u32, client_id: &str) -> Vec<Bytes> {
        let mut w = WireWriter::new();
        let header = RequestHeader {
            api_key: self.api_key(),
            api_version: API_VERSION_V1,
            correlation_id,
            client_id: client_id.to_string(),
        };
        put_request_header(&mut w, &header);
        match self {
            Request::ApiVersions | Request::ListTopics | Request::Stats => {}
            Request::Metadata { topics } => {
                w.u32(u32::try_from(topics.len()).expect("topic lists are bounded by METADATA_TOPICS_MAX"));
                for topic in topics {
                    w.string(topic);
                }
            }
            Request::CreateTopic { name, settings } => {
                w.string(name).u32(settings.partitions);
                put_fsync(&mut w, settings.fsync);
                w.opt_u64(settings.segment_size_bytes).opt_u64(settings.retention_bytes).opt_u64(settings.retention_ms);
            }
            Request::DeleteTopic { name } => {
                w.string(name);
            }
            Request::InitProducerId { transactional_id } => {
                w.opt_string(transactional_id.as_deref());
            }
            Request::Produce { topic, partition, acks, batch } => {
                w.string(topic).u32(*partition).u8(*acks as u8).bytes(batch.clone());
            }
            Request::Fetch { topic, partition, offset, max_bytes, max_wait_ms } => {
                w.string(topic).u32(*partition).u64(*offset).u32(*max_bytes).u32(*max_wait_ms);
            }
            Request::ListOffsets { topic, partition, query } => {
                let q = match query {
                    OffsetQuery::Earliest => -2,
                    OffsetQuery::Latest => -1,
                    OffsetQuery::Timestamp(t) => *t,
                };
                w.string(topic).u32(*partition).i64(q);
            }
            Request::CommitOffset { group, topic, partition, offset } => {
                w.string(group).string(topic).u32(*partition).u64(*offset);
            }
            Request::FetchOffset { group, topic, partition } => {
                w.string(group).string(topic).u32(*partition);
            }
        }
        w.finish()
    }

    /// Decodes a request body for `api_key` (the header is already read).
    pub fn decode(api_key: u16, mut r: WireReader) -> Result<Request> {
        let request = match api_key {
            api::API_VERSIONS => Request::ApiVersions,
            api::LIST_TOPICS => Request::ListTopics,
            api::STATS => Request::Stats,
            api::METADATA => {
                let count = r.u32("topic count")?;
                if count > METADATA_TOPICS_MAX {
                    return Err(Error::malformed(format!("{count} topics in a metadata request")));
                }
                let topics = (0..count).map(|_| r.string("topic")).collect::<Result<_>>()?;
                Request::Metadata { topics }
            }
            api::CREATE_TOPIC => {
                let name = r.string("topic")?;
                let partitions = r.u32("partitions")?;
                let fsync = get_fsync(&mut r)?;
                let settings = TopicSettings {
                    partitions,
                    fsync,
                    segment_size_bytes: r.opt_u64("segment size")?,
                    retention_bytes: r.opt_u64("retention bytes")?,
                    retention_ms: r.opt_u64("retention ms")?,
                };
                Request::CreateTopic { name, settings }
            }
            api::DELETE_TOPIC => Request::DeleteTopic { name: r.string("topic")? },
            api::INIT_PRODUCER_ID => Request::InitProducerId { transactional_id: r.opt_string("transactional id")? },
            api::PRODUCE => {
                let topic = r.string("topic")?;
                let partition = r.u32("partition")?;
                let acks = match r.u8("acks")? {
                    0 => Acks::None,
                    1 => Acks::Leader,
                    other => return Err(Error::malformed(format!("acks {other} is not 0 (none) or 1 (leader)"))),
                };
                Request::Produce { topic, partition, acks, batch: r.bytes("batch")? }
            }
            api::FETCH => Request::Fetch {
                topic: r.string("topic")?,
                partition: r.u32("partition")?,
                offset: r.u64("offset")?,
                max_bytes: r.u32("max bytes")?,
                max_wait_ms: r.u32("max wait")?,
            },
            api::LIST_OFFSETS => {
                let topic = r.string("topic")?;
                let partition = r.u32("partition")?;
                let query = match r.i64("query")? {
                    -2 => OffsetQuery::Earliest,
                    -1 => OffsetQuery::Latest,
                    t if t >= 0 => OffsetQuery::Timestamp(t),
                    other => return Err(Error::malformed(format!("offset query {other}"))),
                };
                Request::ListOffsets { topic, partition, query }
            }
            api::COMMIT_OFFSET => Request::CommitOffset {
                group: r.string("group")?,
                topic: r.string("topic")?,
                partition: r.u32("partition")?,
                offset: r.u64("offset")?,
            },
            api::FETCH_OFFSET => Request::FetchOffset {
                group: r.string("group")?,
                topic: r.string("topic")?,
                partition: r.u32("partition")?,
            },
            other => {
                return Err(Error::Server {
                    code: ErrorCode::UnknownApi,
                    message: format!("unknown api key {other}"),
                    retry_after_ms: None,
                })
            }
        };
        r.finish("request body")?;
        Ok(request)
    }
}

fn put_fsync(w: &mut WireWriter, fsync: Option<FsyncPolicy>) {
    match fsync {
        None => w.u8(255).u64(0),
        Some(FsyncPolicy::Always) => w.u8(0).u64(0),
        Some(FsyncPolicy::Interval { interval_ms }) => w.u8(1).u64(interval_ms),
        Some(FsyncPolicy::Never) => w.u8(2).u64(0),
    };
}

fn get_fsync(r: &mut WireReader) -> Result<Option<FsyncPolicy>> {
    let kind = r.u8("fsync kind")?;
    let interval_ms = r.u64("fsync interval")?;
    match kind {
        255 => Ok(None),
        0 => Ok(Some(FsyncPolicy::Always)),
        1 => Ok(Some(FsyncPolicy::Interval { interval_ms })),
        2 => Ok(Some(FsyncPolicy::Never)),
        other => Err(Error::malformed(format!("fsync kind {other}"))),
    }
}

impl Response {
    /// Encodes a successful response frame.
    pub fn encode(&self, correlation_id: u32) -> Vec<Bytes> {
        let mut w = WireWriter::new();
        put_response_header(&mut w, correlation_id, ErrorCode::None);
        match self {
            Response::Empty => {}
            Response::ApiVersions(apis) => {
                w.u16(u16::try_from(apis.len()).expect("api count fits u16"));
                for (key, min, max) in apis {
                    w.u16(*key).u16(*min).u16(*max);
                }
            }
            Response::Metadata(topics) => {
                w.u32(u32::try_from(topics.len()).expect("topic count fits u32"));
                for t in topics {
                    w.string(&t.name);
                    put_fsync(&mut w, Some(t.fsync));
                    w.u64(t.segment_size_bytes).opt_u64(t.retention_bytes).opt_u64(t.retention_ms);
                    w.u32(u32::try_from(t.partitions.len()).expect("partitions fit u32"));
                    for p in &t.partitions {
                        w.u32(p.partition).u64(p.log_start).u64(p.end_offset).u64(p.size_bytes);
                    }
                }
            }
            Response::ListTopics(names) => {
                w.u32(u32::try_from(names.len()).expect("topic count fits u32"));
                for name in names {
                    w.string(name);
                }
            }
            Response::InitProducerId { producer_id, producer_epoch } => {
                w.i64(*producer_id).i16(*producer_epoch);
            }
            Response::Produce { base_offset, last_offset, duplicate } => {
                w.u64(*base_offset).u64(*last_offset).bool(*duplicate);
            }
            Response::Fetch { log_start, end_offset, records } => {
                w.u64(*log_start).u64(*end_offset).bytes(records.clone());
            }
            Response::Offset(offset) => {
                w.opt_u64(*offset);
            }
            Response::Stats(stats) => {
                w.u32(u32::try_from(stats.len()).expect("stat count fits u32"));
                for (name, value) in stats {
                    w.string(name).u64(*value);
                }
            }
        }
        w.finish()
    }

    /// Encodes an error response frame.
    pub fn encode_error(
        correlation_id: u32,
        code: ErrorCode,
        message: &str,
        retry_after_ms: Option<u32>,
    ) -> Vec<Bytes> {
        let mut w = WireWriter::new();
        put_response_header(&mut w, correlation_id, code);
        if code == ErrorCode::Throttled {
            w.u32(retry_after_ms.unwrap_or(0));
        }
        let message = truncate_utf8(message, crate::limits::STRING_LEN_MAX);
        w.string(message);
        w.finish()
    }

    /// Decodes a response frame to a request with `api_key`; error codes become
    /// [`Error::Server`]. Returns the correlation id too.
    pub fn decode(api_key: u16, frame: Bytes) -> Result<(u32, Result<Response>)> {
        let mut r = WireReader::new(frame);
        let correlation_id = r.u32("correlation id")?;
        let code = r.u16("error code")?;
        let code = ErrorCode::from_u16(code).ok_or_else(|| Error::malformed(format!("unknown error code {code}")))?;
        if code != ErrorCode::None {
            let retry_after_ms = if code == ErrorCode::Throttled { Some(r.u32("retry after")?) } else { None };
            let message = r.string("error message")?;
            return Ok((correlation_id, Err(Error::Server { code, message, retry_after_ms })));
        }
        let response = decode_body(api_key, &mut r)?;
        r.finish("response body")?;
        Ok((correlation_id, Ok(response)))
    }
}

fn decode_body(api_key: u16, r: &mut WireReader) -> Result<Response> {
    Ok(match api_key {
        api::CREATE_TOPIC | api::DELETE_TOPIC | api::COMMIT_OFFSET => Response::Empty,
        api::API_VERSIONS => {
            let count = r.u16("api count")?;
            let apis = (0..count)
                .map(|_| Ok((r.u16("api key")?, r.u16("min version")?, r.u16("max version")?)))
                .collect::<Result<_>>()?;
            Response::ApiVersions(apis)
        }
        api::METADATA => {
            let count = r.u32("topic count")?;
            let mut topics = Vec::with_capacity(count.min(1024) as usize);
            for _ in 0..count {
                let name = r.string("topic")?;
                let fsync = get_fsync(r)?.ok_or_else(|| Error::malformed("topic without fsync policy"))?;
                let segment_size_bytes = r.u64("segment size")?;
                let retention_bytes = r.opt_u64("retention bytes")?;
                let retention_ms = r.opt_u64("retention ms")?;
                let n = r.u32("partition count")?;
                let mut partitions = Vec::with_capacity(n.min(1024) as usize);
                for _ in 0..n {
                    partitions.push(PartitionInfo {
                        partition: r.u32("partition")?,
                        log_start: r.u64("log start")?,
                        end_offset: r.u64("end offset")?,
                        size_bytes: r.u64("size")?,
                    });
                }
                topics.push(TopicDescription {
                    name,
                    fsync,
                    segment_size_bytes,
                    retention_bytes,
                    retention_ms,
                    partitions,
                });
            }
            Response::Metadata(topics)
        }
        api::LIST_TOPICS => {
            let count = r.u32("topic count")?;
            Response::ListTopics((0..count).map(|_| r.string("topic")).collect::<Result<_>>()?)
        }
        api::INIT_PRODUCER_ID => {
            Response::InitProducerId { producer_id: r.i64("producer id")?, producer_epoch: r.i16("epoch")? }
        }
        api::PRODUCE => Response::Produce {
            base_offset: r.u64("base offset")?,
            last_offset: r.u64("last offset")?,
            duplicate: r.bool("duplicate")?,
        },
        api::FETCH => {
            Response::Fetch { log_start: r.u64("log start")?, end_offset: r.u64("end")?, records: r.bytes("records")? }
        }
        api::LIST_OFFSETS | api::FETCH_OFFSET => Response::Offset(r.opt_u64("offset")?),
        api::STATS => {
            let count = r.u32("stat count")?;
            Response::Stats((0..count).map(|_| Ok((r.string("name")?, r.u64("value")?))).collect::<Result<_>>()?)
        }
        other => return Err(Error::malformed(format!("response to unknown api key {other}"))),
    })
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{get_request_header, split_frame};
    use crate::limits::FRAME_SIZE_BYTES_MAX;
    use bytes::BytesMut;

    fn join(chunks: Vec<Bytes>) -> BytesMut {
        let mut buf = BytesMut::new();
        for c in chunks {
            buf.extend_from_slice(&c);
        }
        buf
    }

    /// Every request kind survives encode → frame split → header → decode.
    #[test]
    fn requests_round_trip() {
        let requests = vec![
            Request::ApiVersions,
            Request::Metadata { topics: vec!["a".into(), "b".into()] },
            Request::CreateTopic {
                name: "t".into(),
                settings: TopicSettings {
                    partitions: 3,
                    fsync: Some(FsyncPolicy::Interval { interval_ms: 5 }),
                    retention_ms: Some(9),
                    ..TopicSettings::default()
                },
            },
            Request::DeleteTopic { name: "t".into() },
            Request::ListTopics,
            Request::InitProducerId { transactional_id: Some("tx".into()) },
            Request::Produce {
                topic: "t".into(),
                partition: 2,
                acks: Acks::Leader,
                batch: Bytes::from(vec![1u8; 10_000]),
            },
            Request::Fetch { topic: "t".into(), partition: 0, offset: 7, max_bytes: 100, max_wait_ms: 5 },
            Request::ListOffsets { topic: "t".into(), partition: 0, query: OffsetQuery::Timestamp(44) },
            Request::CommitOffset { group: "g".into(), topic: "t".into(), partition: 1, offset: 5 },
            Request::FetchOffset { group: "g".into(), topic: "t".into(), partition: 1 },
            Request::Stats,
        ];
        for (i, request) in requests.into_iter().enumerate() {
            let mut buf = join(request.encode(i as u32, "cli"));
            let frame = split_frame(&mut buf, FRAME_SIZE_BYTES_MAX).expect("ok").expect("frame");
            let mut r = WireReader::new(frame);
            let header = get_request_header(&mut r).expect("header");
            assert_eq!(header.correlation_id, i as u32);
            assert_eq!(header.client_id, "cli");
            assert_eq!(Request::decode(header.api_key, r).expect("decodes"), request);
        }
    }

    /// Responses and error responses round-trip; throttling carries its retry delay.
    #[test]
    fn responses_round_trip() {
        let cases = vec![
            (api::PRODUCE, Response::Produce { base_offset: 1, last_offset: 4, duplicate: true }),
            (api::FETCH, Response::Fetch { log_start: 0, end_offset: 9, records: Bytes::from(vec![3u8; 9000]) }),
            (api::LIST_OFFSETS, Response::Offset(None)),
            (api::STATS, Response::Stats(vec![("x".into(), 3)])),
            (api::LIST_TOPICS, Response::ListTopics(vec!["a".into()])),
        ];
        for (key, response) in cases {
            let mut buf = join(response.encode(77));
            let frame = split_frame(&mut buf, FRAME_SIZE_BYTES_MAX).expect("ok").expect("frame");
            let (cid, decoded) = Response::decode(key, frame).expect("decodes");
            assert_eq!(cid, 77);
            assert_eq!(decoded.expect("success"), response);
        }
        let mut buf = join(Response::encode_error(5, ErrorCode::Throttled, "slow down", Some(25)));
        let frame = split_frame(&mut buf, FRAME_SIZE_BYTES_MAX).expect("ok").expect("frame");
        match Response::decode(api::PRODUCE, frame).expect("decodes").1 {
            Err(Error::Server { code: ErrorCode::Throttled, retry_after_ms: Some(25), message }) => {
                assert_eq!(message, "slow down")
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
