//! `ListOffsets`, `CommitOffset`, `FetchOffset`.

use std::sync::Arc;

use super::{blocking, Shared};
use crate::error::Result;
use crate::messages::{OffsetQuery, Response};

/// Earliest, latest, or first offset at/after a timestamp.
pub fn list_offsets(shared: &Shared, topic: &str, partition: u32, query: OffsetQuery) -> Result<Response> {
    let p = shared.store.partition(topic, partition)?;
    let offset = match query {
        OffsetQuery::Earliest => Some(p.log_start_offset()),
        OffsetQuery::Latest => Some(p.end_offset()),
        OffsetQuery::Timestamp(ts) => p.offset_for_timestamp(ts)?,
    };
    Ok(Response::Offset(offset))
}

/// Commits a group's next offset for an existing partition; durable before the answer.
pub async fn commit(
    shared: &Arc<Shared>,
    group: String,
    topic: String,
    partition: u32,
    offset: u64,
) -> Result<Response> {
    shared.store.partition(&topic, partition)?;
    let store = Arc::clone(&shared.store);
    blocking(move || Ok(store.consumer_offsets().commit(&group, &topic, partition, offset)?)).await?;
    Ok(Response::Empty)
}

/// A group's committed offset, if any.
pub fn fetch_offset(shared: &Shared, group: &str, topic: &str, partition: u32) -> Result<Response> {
    shared.store.partition(topic, partition)?;
    Ok(Response::Offset(shared.store.consumer_offsets().fetch(group, topic, partition)))
}
