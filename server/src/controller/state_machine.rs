//! The applied state: openraft's `RaftStateMachine` over the `state` file.
//!
//! Owns the metadata as applied on this node, the last applied log id and membership, and
//! the watch channel that publishes the metadata. Every applied batch is written to the
//! `state` file (temporary file, fsync, rename, directory fsync) before openraft hears that it
//! was applied, so the state file is always a complete snapshot at its `last_applied`; the
//! snapshots openraft builds, sends and installs are that same state. Must never decide what
//! a command does (that is `state.rs`).

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::files::{self, STATE_FILE};
use super::state::{ClusterMetadata, CommandResult};
use super::TypeConfig;
use crate::{Error, Result};

/// What the state file holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct AppliedState {
    last_applied: Option<LogId<u32>>,
    last_membership: StoredMembership<u32, BasicNode>,
    metadata: ClusterMetadata,
}

struct SmInner {
    dir: PathBuf,
    state: AppliedState,
}

/// openraft's state machine for the controller. Cheap to clone (shared state).
#[derive(Clone)]
pub(crate) struct StateMachine {
    inner: Arc<Mutex<SmInner>>,
    published: Arc<watch::Sender<ClusterMetadata>>,
}

fn encode_state(state: &AppliedState) -> Result<Vec<u8>> {
    serde_json::to_vec(state).map_err(|source| Error::ControllerCodec { what: "applied state", source })
}

impl StateMachine {
    /// Loads the applied state from `dir` (empty if there is none yet).
    pub(crate) fn open(dir: &Path) -> Result<StateMachine> {
        let state = match files::read_small(dir, STATE_FILE)? {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| Error::ControllerCodec { what: "applied state", source })?,
            None => AppliedState::default(),
        };
        let (published, _) = watch::channel(state.metadata.clone());
        Ok(StateMachine {
            inner: Arc::new(Mutex::new(SmInner { dir: dir.to_path_buf(), state })),
            published: Arc::new(published),
        })
    }

    /// A receiver of the metadata as applied here, updated after every applied batch.
    pub(crate) fn subscribe(&self) -> watch::Receiver<ClusterMetadata> {
        self.published.subscribe()
    }

    /// Runs `f` on the locked state on the blocking pool, then persists the state and
    /// publishes the metadata.
    async fn update<T, F>(&self, f: F) -> Result<T, StorageError<u32>>
    where
        T: Send + 'static,
        F: FnOnce(&mut AppliedState) -> T + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        let published = Arc::clone(&self.published);
        let task = tokio::task::spawn_blocking(move || -> Result<T> {
            let mut inner = inner.lock();
            let out = f(&mut inner.state);
            files::write_small(&inner.dir, STATE_FILE, &encode_state(&inner.state)?)?;
            published.send_replace(inner.state.metadata.clone());
            Ok(out)
        });
        match task.await {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(e)) => Err(StorageIOError::write_state_machine(&e).into()),
            Err(join) => Err(StorageIOError::write_state_machine(&join).into()),
        }
    }

    fn snapshot_of(state: &AppliedState) -> Result<Snapshot<TypeConfig>> {
        let data = serde_json::to_vec(&state.metadata)
            .map_err(|source| Error::ControllerCodec { what: "snapshot", source })?;
        let snapshot_id = match state.last_applied {
            Some(id) => format!("{}-{}", id.leader_id, id.index),
            None => "empty".to_string(),
        };
        let meta = SnapshotMeta {
            last_log_id: state.last_applied,
            last_membership: state.last_membership.clone(),
            snapshot_id,
        };
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<u32>> {
        // The state file already is the snapshot: nothing to write.
        StateMachine::snapshot_of(&self.inner.lock().state).map_err(|e| StorageIOError::read_state_machine(&e).into())
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u32>>, StoredMembership<u32, BasicNode>), StorageError<u32>> {
        let inner = self.inner.lock();
        Ok((inner.state.last_applied, inner.state.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError<u32>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        self.update(move |state| {
            let mut results = Vec::with_capacity(entries.len());
            for entry in entries {
                state.last_applied = Some(entry.log_id);
                let result = match entry.payload {
                    EntryPayload::Blank => CommandResult::Applied,
                    EntryPayload::Normal(cmd) => state.metadata.apply(&cmd),
                    EntryPayload::Membership(membership) => {
                        state.last_membership = StoredMembership::new(Some(entry.log_id), membership);
                        CommandResult::Applied
                    }
                };
                results.push(result);
            }
            results
        })
        .await
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u32>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u32, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<u32>> {
        let metadata: ClusterMetadata = serde_json::from_slice(snapshot.get_ref())
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let (last_applied, last_membership) = (meta.last_log_id, meta.last_membership.clone());
        self.update(move |state| {
            *state = AppliedState { last_applied, last_membership, metadata };
        })
        .await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<u32>> {
        let inner = self.inner.lock();
        if inner.state.last_applied.is_none() {
            return Ok(None);
        }
        match StateMachine::snapshot_of(&inner.state) {
            Ok(snapshot) => Ok(Some(snapshot)),
            Err(e) => Err(StorageIOError::read_state_machine(&e).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use openraft::CommittedLeaderId;

    use super::*;
    use crate::controller::state::Command;

    /// Applied commands reach the watch channel and the state file: a reopened state machine
    /// has the same metadata and last applied id.
    #[tokio::test]
    async fn applied_state_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut sm = StateMachine::open(dir.path()).expect("opens");
        let mut rx = sm.subscribe();
        let log_id = LogId::new(CommittedLeaderId::new(1, 1), 1);
        let cmd = Command::RegisterNode { id: 1, addr: "a".into(), kafka_addr: String::new() };
        let entry = Entry { log_id, payload: EntryPayload::Normal(cmd) };
        let results = sm.apply(vec![entry]).await.expect("applies");
        assert_eq!(results, vec![CommandResult::Applied]);
        assert!(rx.has_changed().expect("sender alive"));
        assert!(rx.borrow_and_update().nodes[&1].alive);
        drop(sm);
        let mut sm = StateMachine::open(dir.path()).expect("reopens");
        let (applied, _) = sm.applied_state().await.expect("reads");
        assert_eq!(applied, Some(log_id));
        assert!(sm.subscribe().borrow().nodes.contains_key(&1));
        let snapshot = sm.get_current_snapshot().await.expect("builds").expect("a snapshot");
        assert_eq!(snapshot.meta.last_log_id, Some(log_id));
    }
}
