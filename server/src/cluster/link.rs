//! The node's side of the controller: follows the committed cluster metadata and makes the
//! local store and replica manager agree with it, and sends the leaders' ISR proposals to
//! the controller.
//!
//! * A topic in the metadata with a partition this node replicates is created locally
//!   (with the topic's recorded settings) if it is missing.
//! * Every partition this node replicates gets its role ([`PartitionRole`]) applied: the
//!   leader's address is the one the leader registered (its rill listener).
//! * A topic that disappears from the metadata after this process saw it there (a
//!   `DeleteTopic`) is deleted locally. Topics never seen in the metadata are left alone: a
//!   node whose controller state is new must not wipe data it cannot account for.
//! * ISR proposals from [`ReplicaManager::take_isr_proposals`] become `UpdateIsr` commands;
//!   a rejected one (stale epoch) is dropped, the leader's next check proposes again.

use std::sync::Arc;

use rill_engine::{FsyncPolicy, Store, TopicConfig};
use tokio::sync::watch;

use super::{PartitionRole, ReplicaManager};
use crate::controller::{ClusterMetadata, Command, CommandResult, Controller, TopicSettings};
use crate::error::{Error, Result};

/// Runs until `stop` turns true.
pub async fn run(
    controller: Arc<Controller>,
    manager: Arc<ReplicaManager>,
    store: Arc<Store>,
    mut stop: watch::Receiver<bool>,
) {
    if let Some(mut proposals) = manager.take_isr_proposals() {
        let controller = Arc::clone(&controller);
        tokio::spawn(async move {
            while let Some(p) = proposals.recv().await {
                let cmd = Command::UpdateIsr {
                    topic: p.topic.clone(),
                    partition: p.partition,
                    leader_epoch: p.leader_epoch,
                    isr: p.isr.clone(),
                };
                match controller.propose(cmd).await {
                    Ok(CommandResult::Applied) => {}
                    Ok(CommandResult::Rejected(why)) => {
                        tracing::debug!(topic = %p.topic, partition = p.partition, %why, "ISR change refused")
                    }
                    Err(e) => tracing::debug!(topic = %p.topic, partition = p.partition, %e, "ISR change not written"),
                }
            }
        });
    }
    let mut metadata = controller.metadata();
    // Until this start's registration is in the local metadata, the metadata may be a stale
    // copy from before a restart (naming this node leader of an epoch long over): act on
    // nothing until then.
    let me = manager.node_id();
    let at_start = controller.registrations_at_start();
    let registered = |m: &ClusterMetadata| m.nodes.get(&me).is_some_and(|n| n.registrations > at_start);
    tokio::select! {
        current = metadata.wait_for(registered) => if current.is_err() { return },
        _ = stop.wait_for(|stopping| *stopping) => return,
    }
    let mut seen = std::collections::BTreeSet::new();
    loop {
        let current = metadata.borrow_and_update().clone();
        if let Err(e) = apply(&manager, &store, &current, &mut seen).await {
            tracing::warn!(%e, "applying cluster metadata failed; retrying on the next change");
        }
        tokio::select! {
            changed = metadata.changed() => if changed.is_err() { return },
            _ = stop.wait_for(|stopping| *stopping) => return,
            // A failed apply (a local topic that could not be created yet) is retried.
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
}

/// Makes the local store and the replica manager match `metadata`; `seen` holds the
/// replicated topics of earlier metadata (those that disappear are deleted here).
pub async fn apply(
    manager: &Arc<ReplicaManager>,
    store: &Arc<Store>,
    metadata: &ClusterMetadata,
    seen: &mut std::collections::BTreeSet<String>,
) -> Result<()> {
    let me = manager.node_id();
    let mut first_error = None;
    let gone: Vec<String> = seen.iter().filter(|name| !metadata.topics.contains_key(*name)).cloned().collect();
    for name in gone {
        manager.forget_topic(&name);
        let (store, topic) = (Arc::clone(store), name.clone());
        let deleted = tokio::task::spawn_blocking(move || store.delete_topic(&topic))
            .await
            .map_err(|e| Error::io("delete a replicated topic", std::io::Error::other(e.to_string())))?;
        match deleted {
            Ok(()) | Err(rill_engine::Error::TopicNotFound { .. }) => {
                seen.remove(&name);
            }
            Err(e) => {
                first_error.get_or_insert(Error::from(e));
            }
        }
    }
    for (name, topic) in &metadata.topics {
        if !topic.partitions.iter().any(|p| p.replicas.contains(&me)) {
            continue;
        }
        seen.insert(name.clone());
        if store.topic(name).is_err() {
            let config = topic_config(&topic.config, topic.partitions.len())?;
            let (store, name) = (Arc::clone(store), name.clone());
            let created = tokio::task::spawn_blocking(move || store.create_topic(&name, config).map(drop))
                .await
                .map_err(|e| Error::io("create a replicated topic", std::io::Error::other(e.to_string())))?;
            if let Err(e) = created {
                first_error.get_or_insert(Error::from(e));
                continue;
            }
        }
        for (index, assignment) in topic.partitions.iter().enumerate() {
            if !assignment.replicas.contains(&me) {
                continue;
            }
            let role = PartitionRole {
                topic: name.clone(),
                partition: u32::try_from(index).expect("partition counts are u32"),
                leader: assignment.leader,
                leader_addr: assignment.leader.and_then(|l| metadata.nodes.get(&l)).map(|n| n.addr.clone()),
                leader_epoch: assignment.leader_epoch,
                replicas: assignment.replicas.clone(),
                isr: assignment.isr.clone(),
            };
            if let Err(e) = manager.apply(role).await {
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// The engine configuration of a replicated topic.
pub fn topic_config(settings: &TopicSettings, partitions: usize) -> Result<TopicConfig> {
    Ok(TopicConfig {
        partitions: u32::try_from(partitions).map_err(|_| Error::Config { reason: "too many partitions".into() })?,
        fsync: parse_fsync(&settings.fsync)?,
        segment_size_bytes: settings.segment_size_bytes,
        retention_bytes: settings.retention_bytes,
        retention_ms: settings.retention_ms,
        ..TopicConfig::default()
    })
}

/// The controller's spelling of an fsync policy.
pub fn fsync_name(policy: FsyncPolicy) -> String {
    match policy {
        FsyncPolicy::Always => "always".into(),
        FsyncPolicy::Never => "never".into(),
        FsyncPolicy::Interval { interval_ms } => format!("interval:{interval_ms}"),
    }
}

fn parse_fsync(name: &str) -> Result<FsyncPolicy> {
    match name {
        "always" => Ok(FsyncPolicy::Always),
        "never" => Ok(FsyncPolicy::Never),
        other => other
            .strip_prefix("interval:")
            .and_then(|ms| ms.parse().ok())
            .map(|interval_ms| FsyncPolicy::Interval { interval_ms })
            .ok_or_else(|| Error::Config { reason: format!("fsync policy {other:?} in the cluster metadata") }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every policy survives the controller's spelling.
    #[test]
    fn fsync_names_round_trip() {
        for policy in [FsyncPolicy::Always, FsyncPolicy::Never, FsyncPolicy::Interval { interval_ms: 250 }] {
            assert_eq!(parse_fsync(&fsync_name(policy)).expect("parses"), policy);
        }
        assert!(parse_fsync("sometimes").is_err());
    }
}
