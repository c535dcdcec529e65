//! A consumer of one topic: fetches from each partition it reads, decodes the batches, drops
//! records below the position, advances, and commits positions for a consumer group. It
//! reads every partition ([`Consumer::new`]) or, as a member of a consumer group
//! ([`Consumer::join`]), the partitions the group assigns it, following rebalances.
//!
//! It owns: per-partition positions and their start, long-poll pacing, its group session.
//! It must never: advance a position past a record it has not returned.

use std::time::Duration;

use bytes::Bytes;
use rill_engine::format::{BatchIter, Header};
use tokio::time::Instant;

use super::{fetched, Client, ResponseFuture};
use crate::error::{Error, ErrorCode, Result};
use crate::messages::{GroupAssignment, OffsetQuery, Request, Response};

/// Smallest wait a long-polling fetch asks for once a poll found no data (keeps a poll on
/// many empty partitions from spinning).
pub const POLL_WAIT_MS_MIN: u32 = 10;

/// Bytes one fetch asks for per partition unless changed with
/// [`Consumer::set_fetch_max_bytes`].
const FETCH_MAX_BYTES_DEFAULT: u32 = 1024 * 1024;

/// Where a [`Consumer`] starts in each partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartPosition {
    /// The group's committed offset; the log start where the group has none.
    Committed,
    /// The first offset each partition holds.
    Earliest,
    /// The end of each partition: only records written from now on.
    Latest,
    /// This offset in every partition (clamped into the log when it is outside).
    Offset(u64),
    /// The first record with a timestamp at or after this time (ms since the Unix epoch);
    /// the end where no record is that recent.
    Timestamp(i64),
}

/// A record read by a [`Consumer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumedRecord {
    /// Partition it was read from.
    pub partition: u32,
    /// Its offset.
    pub offset: u64,
    /// Its timestamp (ms since the Unix epoch).
    pub timestamp_ms: i64,
    /// Key, if any.
    pub key: Option<Bytes>,
    /// Value, if any.
    pub value: Option<Bytes>,
    /// Headers, in order.
    pub headers: Vec<Header>,
}

/// A consumer's membership of its group.
#[derive(Debug)]
struct Membership {
    member_id: String,
    generation: u64,
    session_timeout_ms: u32,
    last_heartbeat: Instant,
    /// A commit was refused for a rebalance: heartbeat at the next poll.
    refresh: bool,
}

/// Reads one topic: every partition ([`Consumer::new`]; a group then only names where
/// positions are committed), or the partitions a consumer group assigns ([`Consumer::join`]).
#[derive(Debug)]
pub struct Consumer {
    client: Client,
    group: Option<String>,
    topic: String,
    /// Next offset to return, per partition.
    positions: Vec<u64>,
    /// End offsets as last seen (metadata at start, then every fetch).
    end_offsets: Vec<u64>,
    /// Whether this consumer reads each partition.
    assigned: Vec<bool>,
    membership: Option<Membership>,
    fetch_max_bytes: u32,
}

impl Consumer {
    /// A consumer of every partition of `topic`, positioned at `start`.
    /// [`StartPosition::Committed`] needs a `group`.
    pub async fn new(client: Client, group: Option<String>, topic: &str, start: StartPosition) -> Result<Consumer> {
        let metadata = client.metadata(&[topic]).await?;
        let Some(description) = metadata.into_iter().find(|t| t.name == topic) else {
            return Err(Error::Server {
                code: ErrorCode::TopicNotFound,
                message: format!("topic '{topic}' does not exist"),
                retry_after_ms: None,
            });
        };
        let mut partitions = description.partitions;
        partitions.sort_by_key(|p| p.partition);
        if partitions.iter().enumerate().any(|(i, p)| p.partition as usize != i) {
            return Err(Error::malformed(format!("topic '{topic}' metadata does not list partitions 0..n")));
        }
        let end_offsets: Vec<u64> = partitions.iter().map(|p| p.end_offset).collect();
        let log_starts: Vec<u64> = partitions.iter().map(|p| p.log_start).collect();
        let assigned = vec![true; end_offsets.len()];
        let mut consumer = Consumer {
            client,
            group,
            topic: topic.to_string(),
            positions: Vec::new(),
            end_offsets,
            assigned,
            membership: None,
            fetch_max_bytes: FETCH_MAX_BYTES_DEFAULT,
        };
        consumer.positions = consumer.start_positions(start, &log_starts).await?;
        Ok(consumer)
    }

    /// Joins consumer group `group` as a new member reading `topic`, and reads the
    /// partitions the group assigns it, each from the group's committed offset (the log
    /// start where none is committed). [`Consumer::poll`] keeps the session alive (it must
    /// be called more often than `session_timeout_ms`) and follows rebalances;
    /// [`Consumer::commit`] commits as a member.
    pub async fn join(client: Client, group: &str, topic: &str, session_timeout_ms: u32) -> Result<Consumer> {
        let mut consumer = Consumer::new(client, Some(group.to_string()), topic, StartPosition::Earliest).await?;
        consumer.assigned.fill(false);
        let assignment = consumer.client.join_group(group, None, session_timeout_ms, &[topic]).await?;
        consumer.membership = Some(Membership {
            member_id: assignment.member_id.clone(),
            generation: 0,
            session_timeout_ms,
            last_heartbeat: Instant::now(),
            refresh: false,
        });
        consumer.apply_assignment(assignment).await?;
        Ok(consumer)
    }

    /// The member id and generation, for a group member.
    pub fn membership(&self) -> Option<(&str, u64)> {
        self.membership.as_ref().map(|m| (m.member_id.as_str(), m.generation))
    }

    /// Partitions this consumer reads now.
    pub fn assigned_partitions(&self) -> Vec<u32> {
        (0..self.partition_count()).filter(|&p| self.assigned[p as usize]).collect()
    }

    /// Adopts a (possibly new) generation's assignment: newly assigned partitions start at
    /// the group's committed offset; partitions kept keep their position.
    async fn apply_assignment(&mut self, assignment: GroupAssignment) -> Result<()> {
        let Some(membership) = self.membership.as_mut() else { return Ok(()) };
        membership.last_heartbeat = Instant::now();
        if assignment.generation == membership.generation {
            return Ok(());
        }
        membership.generation = assignment.generation;
        let mut now_assigned = vec![false; self.assigned.len()];
        for (topic, partition) in &assignment.partitions {
            match now_assigned.get_mut(*partition as usize) {
                Some(slot) if *topic == self.topic => *slot = true,
                _ => {
                    return Err(Error::malformed(format!("assigned {topic} partition {partition}, not of this topic")))
                }
            }
        }
        let fresh: Vec<u32> =
            (0..self.partition_count()).filter(|&p| now_assigned[p as usize] && !self.assigned[p as usize]).collect();
        let group = self.group()?.to_string();
        let requests = fresh.iter().map(|&partition| Request::FetchOffset {
            group: group.clone(),
            topic: self.topic.clone(),
            partition,
        });
        let committed = self.pipeline(requests).await?;
        for (&partition, response) in fresh.iter().zip(committed) {
            let position = match offset_of(response?)? {
                Some(offset) => offset,
                None => self.client.list_offsets(&self.topic, partition, OffsetQuery::Earliest).await?.unwrap_or(0),
            };
            self.positions[partition as usize] = position;
        }
        tracing::debug!(topic = %self.topic, generation = assignment.generation, partitions = ?assignment.partitions, "group assignment");
        self.assigned = now_assigned;
        Ok(())
    }

    /// Heartbeats when a third of the session has passed; rejoins when the group forgot
    /// this member.
    async fn keep_membership(&mut self) -> Result<()> {
        let Some(membership) = self.membership.as_mut() else { return Ok(()) };
        let interval = Duration::from_millis(u64::from(membership.session_timeout_ms) / 3);
        if !std::mem::take(&mut membership.refresh) && membership.last_heartbeat.elapsed() < interval {
            return Ok(());
        }
        let (member_id, session_timeout_ms) = (membership.member_id.clone(), membership.session_timeout_ms);
        let group = self.group()?.to_string();
        let assignment = match self.client.group_heartbeat(&group, &member_id).await {
            Err(Error::Server { code: ErrorCode::UnknownMember, .. }) => {
                tracing::warn!(%group, %member_id, "the group forgot this member; joining again");
                let joined = self.client.join_group(&group, None, session_timeout_ms, &[&self.topic]).await?;
                let membership = self.membership.as_mut().expect("checked above");
                membership.member_id = joined.member_id.clone();
                // Everything is reassigned from the committed offsets.
                self.assigned.fill(false);
                membership.generation = 0;
                joined
            }
            other => other?,
        };
        self.apply_assignment(assignment).await
    }

    /// Leaves the consumer group now (its partitions go to the other members at once).
    pub async fn leave(self) -> Result<()> {
        match (&self.group, &self.membership) {
            (Some(group), Some(membership)) => self.client.leave_group(group, &membership.member_id).await,
            _ => Ok(()),
        }
    }

    async fn start_positions(&self, start: StartPosition, log_starts: &[u64]) -> Result<Vec<u64>> {
        let n = self.partition_count();
        match start {
            StartPosition::Earliest => Ok(log_starts.to_vec()),
            StartPosition::Latest => Ok(self.end_offsets.clone()),
            StartPosition::Offset(offset) => Ok(vec![offset; n as usize]),
            StartPosition::Timestamp(timestamp_ms) => {
                let query = OffsetQuery::Timestamp(timestamp_ms.max(0));
                let requests =
                    (0..n).map(|partition| Request::ListOffsets { topic: self.topic.clone(), partition, query });
                let found = self.pipeline(requests).await?;
                found.into_iter().zip(&self.end_offsets).map(|(r, end)| Ok(offset_of(r?)?.unwrap_or(*end))).collect()
            }
            StartPosition::Committed => {
                let group = self.group()?;
                let requests = (0..n).map(|partition| Request::FetchOffset {
                    group: group.to_string(),
                    topic: self.topic.clone(),
                    partition,
                });
                let committed = self.pipeline(requests).await?;
                committed.into_iter().zip(log_starts).map(|(r, start)| Ok(offset_of(r?)?.unwrap_or(*start))).collect()
            }
        }
    }

    /// Starts every request, then collects the responses (one round trip for all).
    async fn pipeline(&self, requests: impl Iterator<Item = Request>) -> Result<Vec<Result<Response>>> {
        let mut started: Vec<ResponseFuture> = Vec::new();
        for request in requests {
            started.push(self.client.start(request).await?);
        }
        let mut responses = Vec::with_capacity(started.len());
        for response in started {
            responses.push(response.await.and_then(|r| r.ok_or_else(|| Error::malformed("no response"))));
        }
        Ok(responses)
    }

    fn group(&self) -> Result<&str> {
        self.group.as_deref().ok_or_else(|| Error::Config { reason: "committed offsets need a consumer group".into() })
    }

    /// The topic read.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Number of partitions read.
    pub fn partition_count(&self) -> u32 {
        u32::try_from(self.end_offsets.len()).expect("partition counts come from a u32 on the wire")
    }

    /// Next offset to be returned, per partition.
    pub fn positions(&self) -> &[u64] {
        &self.positions
    }

    /// End offsets as last seen: from metadata when the consumer was created, then from
    /// each fetch.
    pub fn end_offsets(&self) -> &[u64] {
        &self.end_offsets
    }

    /// Moves a partition's position (the next poll reads from `offset`).
    pub fn seek(&mut self, partition: u32, offset: u64) -> Result<()> {
        let n = self.partition_count();
        let position = self.positions.get_mut(partition as usize).ok_or_else(|| Error::Config {
            reason: format!("partition {partition} is not in topic '{}' ({n} partitions)", self.topic),
        })?;
        *position = offset;
        Ok(())
    }

    /// Bytes each partition's fetch asks for (at least one batch is returned whatever this is).
    pub fn set_fetch_max_bytes(&mut self, max_bytes: u32) {
        self.fetch_max_bytes = max_bytes.max(1);
    }

    /// Returns the records available in any partition, waiting up to `max_wait_ms` for
    /// some to arrive; an empty vector when none did.
    pub async fn poll(&mut self, max_wait_ms: u32) -> Result<Vec<ConsumedRecord>> {
        let deadline = Instant::now() + Duration::from_millis(u64::from(max_wait_ms));
        let mut wait_ms = 0;
        loop {
            self.keep_membership().await?;
            if let Some(membership) = self.membership.as_ref().filter(|_| !self.assigned.contains(&true)) {
                // Nothing assigned: wait for a rebalance, heartbeating meanwhile.
                let next_heartbeat =
                    membership.last_heartbeat + Duration::from_millis(u64::from(membership.session_timeout_ms) / 3);
                if next_heartbeat >= deadline {
                    tokio::time::sleep_until(deadline).await;
                    return Ok(Vec::new());
                }
                tokio::time::sleep_until(next_heartbeat).await;
                continue;
            }
            let records = self.fetch_round(wait_ms).await?;
            if !records.is_empty() {
                return Ok(records);
            }
            let remaining_ms = deadline.saturating_duration_since(Instant::now()).as_millis();
            if remaining_ms == 0 {
                return Ok(records);
            }
            // Responses come back in request order, so each partition's long poll gets a
            // share of the time left: a round ends in time whether the server waits on the
            // partitions one after another or all at once.
            let mut remaining_ms = u32::try_from(remaining_ms).unwrap_or(u32::MAX);
            if let Some(membership) = &self.membership {
                // Long polls end in time for the next heartbeat.
                remaining_ms = remaining_ms.min(membership.session_timeout_ms / 3).max(1);
            }
            let reading = u32::try_from(self.assigned.iter().filter(|&&a| a).count()).unwrap_or(u32::MAX);
            wait_ms = (remaining_ms / reading.max(1)).max(POLL_WAIT_MS_MIN).min(remaining_ms);
        }
    }

    /// One fetch per partition, pipelined. Partitions are applied in order up to the first
    /// error; if records were read before it, they are returned (the error will recur on
    /// the next poll), so no position moves past a record that is not returned.
    async fn fetch_round(&mut self, wait_ms: u32) -> Result<Vec<ConsumedRecord>> {
        let reading: Vec<u32> = self.assigned_partitions();
        let requests: Vec<Request> = reading
            .iter()
            .map(|&partition| Request::Fetch {
                topic: self.topic.clone(),
                partition,
                offset: self.positions[partition as usize],
                max_bytes: self.fetch_max_bytes,
                max_wait_ms: wait_ms,
            })
            .collect();
        let responses = self.pipeline(requests.into_iter()).await?;
        let mut out = Vec::new();
        for (&partition, response) in reading.iter().zip(responses) {
            let index = partition as usize;
            let applied = match response.and_then(fetched) {
                Ok(fetched) => {
                    self.end_offsets[index] = fetched.end_offset;
                    decode_fetched(partition, self.positions[index], fetched.records).map(|(records, next)| {
                        self.positions[index] = next;
                        out.extend(records);
                    })
                }
                Err(Error::Server { code: ErrorCode::OffsetOutOfRange, .. }) => {
                    self.reset_out_of_range(partition).await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = applied {
                if out.is_empty() {
                    return Err(e);
                }
                tracing::debug!(partition, %e, "fetch failed; returning the records read before it");
                break;
            }
        }
        Ok(out)
    }

    /// Moves a position that fell outside the log (retention deleted it, or a seek went past
    /// the end) to the nearest offset the log holds.
    async fn reset_out_of_range(&mut self, partition: u32) -> Result<()> {
        let earliest = self.client.list_offsets(&self.topic, partition, OffsetQuery::Earliest).await?.unwrap_or(0);
        let latest = self.client.list_offsets(&self.topic, partition, OffsetQuery::Latest).await?.unwrap_or(earliest);
        let position = &mut self.positions[partition as usize];
        let clamped = (*position).clamp(earliest, latest.max(earliest));
        tracing::warn!(topic = %self.topic, partition, from = *position, to = clamped, "offset out of range; position reset");
        *position = clamped;
        Ok(())
    }

    /// Commits the position of every partition read for the consumer's group. A group
    /// member commits as a member: after a rebalance it is refused (`StaleGeneration`,
    /// `PartitionNotAssigned` or `UnknownMember`), and the next poll adopts the new
    /// assignment (joining again if the group forgot the member).
    pub async fn commit(&mut self) -> Result<()> {
        let group = self.group()?.to_string();
        let membership = self.membership.as_ref().map(|m| (m.member_id.clone(), m.generation));
        let requests: Vec<Request> = self
            .assigned_partitions()
            .into_iter()
            .map(|partition| {
                let (topic, offset) = (self.topic.clone(), self.positions[partition as usize]);
                match &membership {
                    None => Request::CommitOffset { group: group.clone(), topic, partition, offset },
                    Some((member_id, generation)) => Request::MemberCommitOffset {
                        group: group.clone(),
                        member_id: member_id.clone(),
                        generation: *generation,
                        topic,
                        partition,
                        offset,
                    },
                }
            })
            .collect();
        let mut first_error = None;
        for response in self.pipeline(requests.into_iter()).await? {
            match response {
                Ok(Response::Empty) => {}
                Ok(other) => return Err(Error::malformed(format!("unexpected response {other:?} to a commit"))),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let Some(error) = first_error else { return Ok(()) };
        let rebalanced = matches!(
            &error,
            Error::Server {
                code: ErrorCode::StaleGeneration | ErrorCode::PartitionNotAssigned | ErrorCode::UnknownMember,
                ..
            }
        );
        if let Some(membership) = self.membership.as_mut().filter(|_| rebalanced) {
            membership.refresh = true;
        }
        Err(error)
    }
}

fn offset_of(response: Response) -> Result<Option<u64>> {
    match response {
        Response::Offset(offset) => Ok(offset),
        other => Err(Error::malformed(format!("unexpected response {other:?}"))),
    }
}

/// Decodes the batches of one partition's fetch: returns the records at or after
/// `position` and the position after the last batch. A trailing partial batch (cut by the
/// byte limit) is left for the next fetch; an invalid batch is an error and moves nothing.
pub fn decode_fetched(partition: u32, position: u64, records: Bytes) -> Result<(Vec<ConsumedRecord>, u64)> {
    let mut out = Vec::new();
    let mut next = position;
    for batch in BatchIter::new(records) {
        let batch = batch?;
        if batch.header().next_offset() <= next {
            continue;
        }
        for record in batch.records()? {
            if record.offset < next {
                continue;
            }
            out.push(ConsumedRecord {
                partition,
                offset: record.offset,
                timestamp_ms: record.timestamp_ms,
                key: record.key,
                value: record.value,
                headers: record.headers,
            });
        }
        next = batch.header().next_offset();
    }
    Ok((out, next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rill_engine::format::batch::set_base_offset;
    use rill_engine::format::{BatchBuilder, Compression, Record};

    fn batch(base_offset: u64, values: &[&str]) -> Vec<u8> {
        let mut builder = BatchBuilder::new(Compression::None, 1_000);
        for v in values {
            builder.push(&Record::from_value(v.to_string())).expect("push");
        }
        let mut bytes = builder.build().expect("build");
        set_base_offset(&mut bytes, base_offset);
        bytes.to_vec()
    }

    /// Records below the position are dropped (a fetch returns whole batches), the position
    /// moves past the last whole batch, and a cut-off trailing batch is left for later.
    #[test]
    fn decode_fetched_skips_below_position_and_stops_at_partial_batch() {
        let mut wire = batch(10, &["a", "b", "c"]);
        wire.extend(batch(13, &["d"]));
        let third = batch(14, &["e", "f"]);
        wire.extend(&third[..third.len() - 1]);
        let (records, next) = decode_fetched(2, 11, Bytes::from(wire)).expect("decodes");
        let values: Vec<_> = records.iter().map(|r| r.value.clone().expect("value")).collect();
        assert_eq!(values, vec![Bytes::from("b"), Bytes::from("c"), Bytes::from("d")]);
        assert_eq!(records.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![11, 12, 13]);
        assert!(records.iter().all(|r| r.partition == 2 && r.timestamp_ms == 1_000));
        assert_eq!(next, 14);
    }

    /// A damaged batch is an error and the caller's position does not move.
    #[test]
    fn decode_fetched_rejects_corrupt_batch() {
        let mut wire = batch(0, &["a"]);
        let last = wire.len() - 1;
        wire[last] ^= 0xff;
        assert!(decode_fetched(0, 0, Bytes::from(wire)).is_err());
        let (records, next) = decode_fetched(0, 5, Bytes::new()).expect("empty fetch");
        assert!(records.is_empty());
        assert_eq!(next, 5);
    }
}
