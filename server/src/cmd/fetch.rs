//! `Fetch`: whole batches from an offset, with long polling.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::Shared;
use crate::error::Result;
use crate::limits::{FETCH_SIZE_BYTES_MAX, FETCH_WAIT_MS_MAX};
use crate::messages::Response;

/// Reads from `offset`; at the end of the log waits up to `max_wait_ms` for new data (or
/// until shutdown begins). Sealed data goes out as a zero-copy view of the segment map.
pub async fn fetch(
    shared: &Arc<Shared>,
    topic: &str,
    partition: u32,
    offset: u64,
    max_bytes: u32,
    max_wait_ms: u32,
) -> Result<Response> {
    let p = shared.store.partition(topic, partition)?;
    if offset == p.end_offset() && max_wait_ms > 0 {
        let wait = Duration::from_millis(u64::from(max_wait_ms.min(FETCH_WAIT_MS_MAX)));
        let mut shutdown = shared.shutdown.clone();
        tokio::select! {
            _ = tokio::time::timeout(wait, p.wait_for_async(offset)) => {}
            _ = shutdown.wait_for(|stopping| *stopping) => {}
        }
    }
    let records = p.read(offset, u64::from(max_bytes.clamp(1, FETCH_SIZE_BYTES_MAX)))?;
    let counters = shared.metrics.topic(topic);
    counters.fetch_requests.fetch_add(1, Ordering::Relaxed);
    counters.fetch_bytes.fetch_add(records.len() as u64, Ordering::Relaxed);
    Ok(Response::Fetch { log_start: p.log_start_offset(), end_offset: p.end_offset(), records })
}
