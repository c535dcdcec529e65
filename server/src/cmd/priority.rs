//! `CreatePriorityTopic`, `PriorityPoll`, `PriorityAck`, `PriorityNack`,
//! `PriorityExtendLease`, `ReplayDlq` (`ProduceLane` is a produce to the lane topic).
//!
//! `PriorityOpen`, `PriorityClose`.
//!
//! `PriorityOpen` or the first poll opens a priority cursor and keeps it in
//! [`Shared::priority_cursors`], so leases live from one request to the next; ack, nack and
//! extension use the open cursor (a cursor that is not open holds no lease). A cursor stays
//! open until `PriorityClose`, or until [`close_idle`] finds it unused for a while with no
//! lease held. Poll, ack, nack and replay may write (and fsync) the cursor state or the
//! logs, so they run on the blocking pool.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rill_engine::{Delivery, PriorityCursor, PriorityCursorConfig, StoredRecord};

use super::{blocking, topics, Shared};
use crate::error::Result;
use crate::messages::{
    LeaseRef, PriorityCursorOptions, PriorityCursorSettings, PriorityDelivery, Response, TopicSettings,
};

/// A priority cursor the server keeps open, and when a request last used it.
#[derive(Debug)]
pub struct OpenCursor {
    cursor: Arc<PriorityCursor>,
    last_used: Mutex<Instant>,
}

impl OpenCursor {
    fn touch(&self) -> Arc<PriorityCursor> {
        *self.last_used.lock() = Instant::now();
        Arc::clone(&self.cursor)
    }
}

/// The open priority cursors, by (topic, cursor name).
pub type OpenCursors = Mutex<BTreeMap<(String, String), OpenCursor>>;

/// Creates a priority topic, filling unset settings from the server's topic defaults.
pub async fn create(shared: &Arc<Shared>, name: String, lanes: u8, settings: TopicSettings) -> Result<Response> {
    let config = topics::topic_config(shared, &settings)?;
    let store = Arc::clone(&shared.store);
    blocking(move || Ok(store.create_priority_topic(&name, lanes, config).map(drop)?)).await?;
    Ok(Response::Empty)
}

fn is_unset(settings: &PriorityCursorSettings) -> bool {
    settings == &PriorityCursorSettings::default()
}

fn cursor_config(settings: &PriorityCursorSettings) -> PriorityCursorConfig {
    let mut config = PriorityCursorConfig::default();
    if let Some(lease_ms) = settings.lease_ms {
        config.lease_ms = lease_ms;
    }
    if let Some(max_deliveries) = settings.max_deliveries {
        config.max_deliveries = max_deliveries;
    }
    if let Some(aging_ms) = settings.aging_ms {
        config.aging_ms = aging_ms;
    }
    if let Some(base_ms) = settings.backoff_base_ms {
        config.backoff.base_ms = base_ms;
    }
    if let Some(max_ms) = settings.backoff_max_ms {
        config.backoff.max_ms = max_ms;
    }
    config
}

/// The open cursor `topic`/`cursor`, opened with `config` if it is not open. `None` for
/// `config` accepts whatever configuration an open cursor has (and opens with the defaults);
/// otherwise an open cursor with another configuration is `InvalidConfig`.
fn open_with(
    shared: &Shared,
    topic: &str,
    cursor: &str,
    config: Option<PriorityCursorConfig>,
) -> Result<Arc<PriorityCursor>> {
    let mut cursors = shared.priority_cursors.lock();
    let key = (topic.to_string(), cursor.to_string());
    let open = match cursors.get(&key) {
        Some(open) => open.touch(),
        None => {
            let config = config.clone().unwrap_or_default();
            let open = shared.store.priority_cursor(topic, cursor, config)?;
            let entry = OpenCursor { cursor: Arc::clone(&open), last_used: Mutex::new(Instant::now()) };
            cursors.insert(key, entry);
            open
        }
    };
    if config.is_some_and(|c| open.config() != &c) {
        return Err(rill_engine::Error::InvalidConfig {
            reason: format!("priority cursor {cursor} of {topic} is open with another configuration"),
        }
        .into());
    }
    Ok(open)
}

/// Opens a cursor with every setting given (no-op if it is open with the same ones).
pub async fn open(
    shared: &Arc<Shared>,
    topic: String,
    cursor: String,
    options: PriorityCursorOptions,
) -> Result<Response> {
    let config = options.to_config();
    let shared = Arc::clone(shared);
    blocking(move || open_with(&shared, &topic, &cursor, Some(config)).map(|_| Response::Empty)).await
}

/// Closes an open cursor: its leases are dropped (their messages are delivered again by the
/// next instance, without counting as failures). Closing a cursor that is not open is a
/// no-op.
pub fn close(shared: &Shared, topic: String, cursor: String) -> Response {
    shared.priority_cursors.lock().remove(&(topic, cursor));
    Response::Empty
}

/// Opens (or reuses) a cursor and leases up to `max` messages. A poll without settings
/// uses the open cursor whatever its configuration.
pub async fn poll(
    shared: &Arc<Shared>,
    topic: String,
    cursor: String,
    max: u32,
    settings: PriorityCursorSettings,
) -> Result<Response> {
    let config = (!is_unset(&settings)).then(|| cursor_config(&settings));
    let shared = Arc::clone(shared);
    blocking(move || {
        let open = open_with(&shared, &topic, &cursor, config)?;
        let deliveries = open.poll(max as usize)?;
        Ok(Response::PriorityDeliveries(deliveries.into_iter().map(to_wire).collect()))
    })
    .await
}

/// Closes the cursors no request used for `idle` that hold no lease (expired leases are
/// reclaimed first, as the next poll would). Returns how many were closed. Blocking: call
/// it off the async workers.
pub fn close_idle(shared: &Shared, idle: Duration) -> usize {
    let candidates: Vec<((String, String), Arc<PriorityCursor>)> = shared
        .priority_cursors
        .lock()
        .iter()
        .filter(|(_, open)| open.last_used.lock().elapsed() >= idle)
        .map(|(key, open)| (key.clone(), Arc::clone(&open.cursor)))
        .collect();
    let mut closed = 0;
    for (key, cursor) in candidates {
        if let Err(e) = cursor.tick() {
            tracing::warn!(topic = %key.0, cursor = %key.1, %e, "reclaiming expired leases of an idle cursor failed");
            continue;
        }
        let mut cursors = shared.priority_cursors.lock();
        // Still idle (no request came in meanwhile) and no lease held: close it.
        let idle_now = cursors.get(&key).is_some_and(|open| open.last_used.lock().elapsed() >= idle);
        if idle_now && cursor.in_flight() == 0 {
            cursors.remove(&key);
            closed += 1;
        }
    }
    closed
}

fn to_wire(d: Delivery) -> PriorityDelivery {
    PriorityDelivery {
        lease: LeaseRef { lane: d.lane, partition: d.partition, offset: d.offset, lease_id: d.lease_id },
        delivery_count: d.delivery_count,
        lease_deadline_ms: d.lease_deadline_ms,
        timestamp_ms: d.record.timestamp_ms,
        key: d.record.key,
        value: d.record.value,
        headers: d.record.headers.into_iter().map(|h| (h.key, h.value)).collect(),
    }
}

/// The delivery `lease` names, as far as the engine checks it (lane, partition, offset and
/// lease id; the record is not consulted).
fn delivery_of(lease: &LeaseRef) -> Delivery {
    Delivery {
        lane: lease.lane,
        partition: lease.partition,
        offset: lease.offset,
        record: StoredRecord { offset: lease.offset, timestamp_ms: 0, key: None, value: None, headers: Vec::new() },
        delivery_count: 0,
        lease_deadline_ms: 0,
        ready_since_ms: 0,
        lease_id: lease.lease_id,
    }
}

/// The open cursor, or `LeaseNotHeld` (a cursor that is not open holds no lease).
fn open_cursor(shared: &Shared, topic: &str, cursor: &str, lease: &LeaseRef) -> Result<Arc<PriorityCursor>> {
    let cursors = shared.priority_cursors.lock();
    match cursors.get(&(topic.to_string(), cursor.to_string())) {
        Some(open) => Ok(open.touch()),
        None => Err(rill_engine::Error::LeaseNotHeld {
            topic: topic.to_string(),
            lane: lease.lane,
            partition: lease.partition,
            offset: lease.offset,
        }
        .into()),
    }
}

/// Settles a lease.
pub async fn ack(shared: &Arc<Shared>, topic: String, cursor: String, lease: LeaseRef) -> Result<Response> {
    let open = open_cursor(shared, &topic, &cursor, &lease)?;
    blocking(move || Ok(open.ack(&delivery_of(&lease))?)).await?;
    Ok(Response::Empty)
}

/// Gives a lease back.
pub async fn nack(
    shared: &Arc<Shared>,
    topic: String,
    cursor: String,
    lease: LeaseRef,
    delay_ms: Option<u64>,
    reason: String,
) -> Result<Response> {
    let open = open_cursor(shared, &topic, &cursor, &lease)?;
    blocking(move || Ok(open.nack(&delivery_of(&lease), delay_ms, &reason)?)).await?;
    Ok(Response::Empty)
}

/// Extends a lease (writes nothing: leases are not durable).
pub fn extend_lease(
    shared: &Shared,
    topic: String,
    cursor: String,
    lease: LeaseRef,
    extra_ms: u64,
) -> Result<Response> {
    let open = open_cursor(shared, &topic, &cursor, &lease)?;
    let extended = open.extend_lease(&delivery_of(&lease), extra_ms)?;
    Ok(Response::PriorityDeliveries(vec![to_wire(extended)]))
}

/// Replays dead letters `from..to` of dead-letter partition `partition`.
pub async fn replay_dlq(shared: &Arc<Shared>, topic: String, partition: u32, from: u64, to: u64) -> Result<Response> {
    let store = Arc::clone(&shared.store);
    let replayed = blocking(move || Ok(store.priority_topic(&topic)?.replay_dlq(partition, from..to)?)).await?;
    Ok(Response::Count(replayed))
}
