//! Dead letters: the record a priority cursor appends to `<topic>.dlq` when a message has
//! failed `max_deliveries` times, and the way back (replay).
//!
//! A dead-letter record keeps the original key, value and headers and adds the failure
//! metadata as headers named `rill.dlq.*` (values are UTF-8 decimal numbers or text).
//!
//! It owns: the metadata headers and their validation.
//! It must never: touch the cursor's state.

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::format::{Header, Record, StoredRecord};
use crate::limits::{DEAD_LETTER_REASON_LEN_MAX, PARTITIONS_PER_TOPIC_MAX, PRIORITY_LANES_MAX};

/// Prefix of every dead-letter metadata header.
pub const DLQ_HEADER_PREFIX: &str = "rill.dlq.";
/// Header: why the last delivery failed (nack reason or `lease expired`).
pub const DLQ_HEADER_REASON: &str = "rill.dlq.reason";
/// Header: deliveries made, all failed.
pub const DLQ_HEADER_DELIVERY_COUNT: &str = "rill.dlq.delivery_count";
/// Header: time of the first failure (ms).
pub const DLQ_HEADER_FIRST_FAILURE_MS: &str = "rill.dlq.first_failure_ms";
/// Header: time of the last failure (ms).
pub const DLQ_HEADER_LAST_FAILURE_MS: &str = "rill.dlq.last_failure_ms";
/// Header: the priority topic.
pub const DLQ_HEADER_TOPIC: &str = "rill.dlq.topic";
/// Header: original lane.
pub const DLQ_HEADER_LANE: &str = "rill.dlq.lane";
/// Header: original partition.
pub const DLQ_HEADER_PARTITION: &str = "rill.dlq.partition";
/// Header: original offset.
pub const DLQ_HEADER_OFFSET: &str = "rill.dlq.offset";

/// The failure metadata of a dead-lettered message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// Why the last delivery failed.
    pub reason: String,
    /// Deliveries made (all failed).
    pub delivery_count: u32,
    /// Time of the first failure (ms).
    pub first_failure_ms: i64,
    /// Time of the last failure (ms).
    pub last_failure_ms: i64,
    /// The priority topic (without the lane suffix).
    pub topic: String,
    /// Original lane.
    pub lane: u8,
    /// Original partition.
    pub partition: u32,
    /// Original offset in the lane partition.
    pub offset: u64,
}

impl DeadLetter {
    /// The metadata as headers, in a fixed order.
    pub fn to_headers(&self) -> Vec<Header> {
        let text = |key: &str, value: String| Header { key: key.to_string(), value: Some(Bytes::from(value)) };
        vec![
            text(DLQ_HEADER_REASON, truncate(&self.reason, DEAD_LETTER_REASON_LEN_MAX).to_string()),
            text(DLQ_HEADER_DELIVERY_COUNT, self.delivery_count.to_string()),
            text(DLQ_HEADER_FIRST_FAILURE_MS, self.first_failure_ms.to_string()),
            text(DLQ_HEADER_LAST_FAILURE_MS, self.last_failure_ms.to_string()),
            text(DLQ_HEADER_TOPIC, self.topic.clone()),
            text(DLQ_HEADER_LANE, self.lane.to_string()),
            text(DLQ_HEADER_PARTITION, self.partition.to_string()),
            text(DLQ_HEADER_OFFSET, self.offset.to_string()),
        ]
    }

    /// Reads the metadata back from a record's headers; `Err(reason)` when a header is
    /// missing, repeated or out of range.
    pub fn from_headers(headers: &[Header]) -> std::result::Result<Self, String> {
        let get = |key: &str| -> std::result::Result<&str, String> {
            let mut found = headers.iter().filter(|h| h.key == key);
            let header = found.next().ok_or_else(|| format!("missing header {key}"))?;
            if found.next().is_some() {
                return Err(format!("repeated header {key}"));
            }
            let value = header.value.as_deref().ok_or_else(|| format!("header {key} has no value"))?;
            std::str::from_utf8(value).map_err(|e| format!("header {key} is not UTF-8: {e}"))
        };
        fn number<T: std::str::FromStr>(key: &str, text: &str) -> std::result::Result<T, String> {
            text.parse().map_err(|_parse| format!("header {key} is not a number: {text:?}"))
        }
        let letter = DeadLetter {
            reason: get(DLQ_HEADER_REASON)?.to_string(),
            delivery_count: number(DLQ_HEADER_DELIVERY_COUNT, get(DLQ_HEADER_DELIVERY_COUNT)?)?,
            first_failure_ms: number(DLQ_HEADER_FIRST_FAILURE_MS, get(DLQ_HEADER_FIRST_FAILURE_MS)?)?,
            last_failure_ms: number(DLQ_HEADER_LAST_FAILURE_MS, get(DLQ_HEADER_LAST_FAILURE_MS)?)?,
            topic: get(DLQ_HEADER_TOPIC)?.to_string(),
            lane: number(DLQ_HEADER_LANE, get(DLQ_HEADER_LANE)?)?,
            partition: number(DLQ_HEADER_PARTITION, get(DLQ_HEADER_PARTITION)?)?,
            offset: number(DLQ_HEADER_OFFSET, get(DLQ_HEADER_OFFSET)?)?,
        };
        if letter.lane >= PRIORITY_LANES_MAX || letter.partition >= PARTITIONS_PER_TOPIC_MAX {
            return Err("lane or partition out of range".into());
        }
        Ok(letter)
    }
}

fn truncate(text: &str, len_max: usize) -> &str {
    let mut end = text.len().min(len_max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The dead-letter record for `record`: its key, value and headers (minus any earlier
/// `rill.dlq.*` headers) followed by `letter`'s headers.
pub(crate) fn dead_letter_record(record: &StoredRecord, letter: &DeadLetter) -> Record {
    let mut headers: Vec<Header> =
        record.headers.iter().filter(|h| !h.key.starts_with(DLQ_HEADER_PREFIX)).cloned().collect();
    headers.extend(letter.to_headers());
    Record { timestamp_ms: None, key: record.key.clone(), value: record.value.clone(), headers }
}

/// The record to append back to the original lane, and where it goes.
pub(crate) fn replay_record(stored: &StoredRecord, dlq_partition: u32) -> Result<(DeadLetter, Record)> {
    let letter = DeadLetter::from_headers(&stored.headers).map_err(|reason| Error::InvalidDeadLetter {
        partition: dlq_partition,
        offset: stored.offset,
        reason,
    })?;
    let headers = stored.headers.iter().filter(|h| !h.key.starts_with(DLQ_HEADER_PREFIX)).cloned().collect();
    let record = Record { timestamp_ms: None, key: stored.key.clone(), value: stored.value.clone(), headers };
    Ok((letter, record))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Metadata survives the header round trip; damage is a readable error.
    #[test]
    fn headers_round_trip() {
        let letter = DeadLetter {
            reason: "é".repeat(600),
            delivery_count: 3,
            first_failure_ms: -5,
            last_failure_ms: 7,
            topic: "jobs".into(),
            lane: 2,
            partition: 1,
            offset: 99,
        };
        let back = DeadLetter::from_headers(&letter.to_headers()).expect("round trip");
        assert_eq!(back.reason.len(), 1_024);
        assert_eq!(DeadLetter { reason: letter.reason[..1_024].to_string(), ..letter.clone() }, back);
        let mut headers = letter.to_headers();
        headers.retain(|h| h.key != DLQ_HEADER_OFFSET);
        assert!(DeadLetter::from_headers(&headers).is_err());
        let mut headers = letter.to_headers();
        headers[5].value = Some(Bytes::from_static(b"9"));
        assert!(DeadLetter::from_headers(&headers).is_err(), "lane 9");
    }
}
