//! A follower's fetcher: one task per followed partition. Each session connects to the
//! leader, cuts this replica's divergent suffix (KIP-279, the loop in `session`), then
//! fetches from the log end, appends
//! the leader's batches as they are and takes the leader's high watermark. Any error ends
//! the session; the next one starts after a pause. The task is aborted when the role changes.

use std::sync::Arc;
use std::time::Duration;

use rill_engine::Partition;

use super::{PartitionRole, ReplicaFetchRequest, ReplicaManager};
use crate::client::Client;
use crate::error::{Error, Result};

const RETRY_PAUSE: Duration = Duration::from_millis(100);

pub(super) async fn run(manager: Arc<ReplicaManager>, role: PartitionRole, partition: Arc<Partition>) {
    loop {
        if let Err(e) = session(&manager, &role, &partition).await {
            tracing::debug!(topic = %role.topic, partition = role.partition, %e, "replica fetch session ended");
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

async fn session(manager: &ReplicaManager, role: &PartitionRole, p: &Arc<Partition>) -> Result<()> {
    let addr = role.leader_addr.clone().ok_or_else(|| Error::Config { reason: "the leader has no address".into() })?;
    let me = manager.node_id();
    let client = Client::connect(addr.as_str(), &format!("rill-replica-{me}")).await?;
    // KIP-279: if this log has the epoch the leader answered with, cut at the smaller of the
    // two ends of it; if not, cut at this log's end of the largest epoch below it and ask
    // again with the new newest epoch (each round lowers it, so this ends).
    loop {
        let (epoch, leader_end) = client.epoch_end_offset(&role.topic, role.partition, p.latest_epoch()).await?;
        let (own_epoch, own_end) = p.end_offset_for_epoch(epoch);
        let done = own_epoch == epoch;
        let cut = if done { leader_end.min(own_end) } else { own_end };
        let truncated = Arc::clone(p);
        let end = tokio::task::spawn_blocking(move || truncated.truncate_to(cut))
            .await
            .map_err(|e| Error::io("truncate replica", std::io::Error::other(e.to_string())))??;
        tracing::debug!(topic = %role.topic, partition = role.partition, epoch, own_epoch, cut, end, "replica truncation");
        if done {
            break;
        }
    }
    let config = manager.config();
    loop {
        let offset = p.log_end_offset();
        let data = client
            .replica_fetch(ReplicaFetchRequest {
                replica_id: me,
                topic: role.topic.clone(),
                partition: role.partition,
                leader_epoch: role.leader_epoch,
                offset,
                max_bytes: config.replica_fetch_max_bytes,
                max_wait_ms: config.replica_fetch_wait_ms,
            })
            .await?;
        if !data.records.is_empty() {
            if let Some(handle) = p.append_replica(data.records)? {
                handle.await?;
            }
        }
        p.advance_high_watermark(data.high_watermark.min(p.log_end_offset()));
    }
}
