//! Store-wide producer ids: issues ids, maps transactional ids to (id, epoch) and bumps the
//! epoch on re-initialisation so the older instance is fenced. Durable in `producers.meta`
//! (format in `docs/format.md`, "Producer registry v1"), rewritten atomically on change.
//!
//! Ids are issued from blocks of [`ID_BLOCK_SIZE`]: the file records the end of the current
//! block, so a restart skips the unused rest of a block and never issues an id twice.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::format::envelope;
use crate::io::Storage;
use crate::limits::TRANSACTIONAL_ID_LEN_MAX;

/// Magic bytes: ASCII `RPID`.
pub const REGISTRY_MAGIC: [u8; 4] = *b"RPID";
/// Version this build writes and reads.
pub const REGISTRY_VERSION: u16 = 1;
/// Producer ids reserved per durable write.
pub const ID_BLOCK_SIZE: i64 = 1_000;
/// A producer id is `node << NODE_ID_SHIFT | n`: the nodes of a cluster never issue the same
/// id, and a single node (node 0) issues 0, 1, 2, … The `n` part is what `producers.meta`
/// counts.
pub const NODE_ID_SHIFT: u32 = 40;
/// Most node ids (the id must leave the producer id positive).
pub const NODE_ID_MAX: u32 = (1 << (63 - NODE_ID_SHIFT)) - 1;
/// Most transactional ids a store keeps.
pub const TRANSACTIONAL_IDS_MAX: usize = 100_000;
const FILE_NAME: &str = "producers.meta";
const FILE_SIZE_BYTES_MAX: u64 = 24 + TRANSACTIONAL_IDS_MAX as u64 * (2 + TRANSACTIONAL_ID_LEN_MAX as u64 + 10);

/// A producer's identity: id and epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProducerIdentity {
    /// Producer id.
    pub producer_id: i64,
    /// Producer epoch.
    pub producer_epoch: i16,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct RegistryState {
    next_id: i64,
    block_end: i64,
    transactional: BTreeMap<String, ProducerIdentity>,
}

/// Issues and remembers producer ids for a store.
#[derive(Debug)]
pub struct ProducerRegistry {
    storage: Arc<dyn Storage>,
    /// `node << NODE_ID_SHIFT`: the high bits of every id this registry issues.
    node_bits: i64,
    path: PathBuf,
    state: Mutex<RegistryState>,
    /// Current epoch per transactional producer id, for fencing checks on append.
    epochs: Mutex<HashMap<i64, i16>>,
}

impl ProducerRegistry {
    /// Loads the registry of the store in `dir` (empty if the file does not exist yet); ids
    /// it issues carry `node_id` in their high bits.
    pub fn open(storage: Arc<dyn Storage>, dir: &Path, node_id: u32) -> Result<Self> {
        if node_id > NODE_ID_MAX {
            return Err(Error::InvalidConfig { reason: format!("node id {node_id} is above {NODE_ID_MAX}") });
        }
        let path = dir.join(FILE_NAME);
        let mut state = RegistryState::default();
        if storage.exists(&path) {
            let buf = crate::io::read_bounded(&*storage, &path, FILE_SIZE_BYTES_MAX)?;
            state = decode(&buf).map_err(|e| Error::Corrupt { path: path.clone(), pos: 0, reason: e.to_string() })?;
            // Ids up to the recorded block end may have been issued before the restart.
            state.next_id = state.block_end;
        }
        let epochs = state.transactional.values().map(|id| (id.producer_id, id.producer_epoch)).collect();
        let node_bits = i64::from(node_id) << NODE_ID_SHIFT;
        Ok(ProducerRegistry { storage, node_bits, path, state: Mutex::new(state), epochs: Mutex::new(epochs) })
    }

    /// Issues a producer identity. Without a transactional id: a fresh id with epoch 0.
    /// With one: the same id with the epoch bumped (fencing the previous holder), or a
    /// fresh id the first time (and when the epoch would overflow).
    pub fn init_producer(&self, transactional_id: Option<&str>) -> Result<ProducerIdentity> {
        let mut state = self.state.lock();
        let mut next = state.clone();
        let identity = match transactional_id {
            None => ProducerIdentity { producer_id: self.node_bits | issue_id(&mut next)?, producer_epoch: 0 },
            Some(tid) => {
                validate_transactional_id(tid)?;
                let identity = match next.transactional.get(tid) {
                    Some(old) if old.producer_epoch < i16::MAX => {
                        ProducerIdentity { producer_id: old.producer_id, producer_epoch: old.producer_epoch + 1 }
                    }
                    _ => {
                        if next.transactional.len() >= TRANSACTIONAL_IDS_MAX && !next.transactional.contains_key(tid) {
                            return Err(Error::LimitExceeded {
                                limit: "TRANSACTIONAL_IDS_MAX",
                                max: TRANSACTIONAL_IDS_MAX as u64,
                                actual: next.transactional.len() as u64 + 1,
                            });
                        }
                        ProducerIdentity { producer_id: self.node_bits | issue_id(&mut next)?, producer_epoch: 0 }
                    }
                };
                next.transactional.insert(tid.to_string(), identity);
                identity
            }
        };
        if next.block_end != state.block_end || transactional_id.is_some() {
            self.persist(&next)?;
        }
        *state = next;
        if transactional_id.is_some() {
            self.epochs.lock().insert(identity.producer_id, identity.producer_epoch);
        }
        Ok(identity)
    }

    /// Checks that `producer_id` was issued and that `epoch` is not older than the
    /// current epoch of a transactional producer. In a cluster (node ids from 1), an id
    /// issued by another node (a leader before a failover) is left to the partition's
    /// producer state, which knows it from the replicated batches or takes it only from
    /// sequence 0. A single node (node 0) issued every id it may see.
    pub fn check(&self, producer_id: i64, epoch: i16, base_sequence: i32) -> Result<()> {
        let single_node = self.node_bits == 0;
        let mine = producer_id >> NODE_ID_SHIFT == self.node_bits >> NODE_ID_SHIFT;
        let unissued =
            if mine { producer_id & ((1 << NODE_ID_SHIFT) - 1) >= self.state.lock().next_id } else { single_node };
        if producer_id < 0 || unissued {
            return Err(Error::UnknownProducerId { producer_id, base_sequence });
        }
        if let Some(&current_epoch) = self.epochs.lock().get(&producer_id) {
            if epoch < current_epoch {
                return Err(Error::ProducerFenced { producer_id, epoch, current_epoch });
            }
        }
        Ok(())
    }

    fn persist(&self, state: &RegistryState) -> Result<()> {
        crate::io::write_atomically(&*self.storage, &self.path, &encode(state))
    }
}

fn issue_id(state: &mut RegistryState) -> Result<i64> {
    if state.next_id >= (1 << NODE_ID_SHIFT) - 1 {
        return Err(Error::LimitExceeded {
            limit: "producer ids per node",
            max: 1 << NODE_ID_SHIFT,
            actual: state.next_id as u64,
        });
    }
    if state.next_id >= state.block_end {
        state.block_end = state.next_id + ID_BLOCK_SIZE;
    }
    let id = state.next_id;
    state.next_id += 1;
    Ok(id)
}

fn validate_transactional_id(tid: &str) -> Result<()> {
    if tid.is_empty() || tid.len() > TRANSACTIONAL_ID_LEN_MAX {
        return Err(Error::InvalidConfig {
            reason: format!("transactional id must be 1..={TRANSACTIONAL_ID_LEN_MAX} bytes, got {}", tid.len()),
        });
    }
    Ok(())
}

fn encode(state: &RegistryState) -> Vec<u8> {
    let mut buf = envelope::begin(REGISTRY_MAGIC, REGISTRY_VERSION, 12 + state.transactional.len() * 32);
    buf.extend_from_slice(&state.block_end.to_le_bytes());
    let count = u32::try_from(state.transactional.len()).expect("bounded by TRANSACTIONAL_IDS_MAX");
    buf.extend_from_slice(&count.to_le_bytes());
    for (tid, identity) in &state.transactional {
        let len = u16::try_from(tid.len()).expect("bounded by TRANSACTIONAL_ID_LEN_MAX");
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(tid.as_bytes());
        buf.extend_from_slice(&identity.producer_id.to_le_bytes());
        buf.extend_from_slice(&identity.producer_epoch.to_le_bytes());
    }
    envelope::seal(buf)
}

fn decode(buf: &[u8]) -> Result<RegistryState> {
    let bad = |reason: &str| Error::MalformedBatch { reason: format!("producer registry: {reason}") };
    let body = envelope::open(buf, REGISTRY_MAGIC, REGISTRY_VERSION, "producer registry")?;
    if body.len() < 20 {
        return Err(bad("shorter than its header"));
    }
    let block_end = i64::from_le_bytes(body[8..16].try_into().expect("8 bytes"));
    let count = u32::from_le_bytes(body[16..20].try_into().expect("4 bytes")) as usize;
    if block_end < 0 || count > TRANSACTIONAL_IDS_MAX {
        return Err(bad("header out of range"));
    }
    let mut pos = 20;
    let mut transactional = BTreeMap::new();
    for _ in 0..count {
        let len = body.get(pos..pos + 2).ok_or_else(|| bad("truncated"))?;
        let len = usize::from(u16::from_le_bytes([len[0], len[1]]));
        let entry = body.get(pos + 2..pos + 2 + len + 10).ok_or_else(|| bad("truncated"))?;
        let tid = std::str::from_utf8(&entry[..len]).map_err(|_utf8| bad("transactional id is not UTF-8"))?;
        let producer_id = i64::from_le_bytes(entry[len..len + 8].try_into().expect("8 bytes"));
        let producer_epoch = i16::from_le_bytes([entry[len + 8], entry[len + 9]]);
        if producer_id < 0 || producer_id >= block_end || producer_epoch < 0 || len == 0 {
            return Err(bad("entry out of range"));
        }
        transactional.insert(tid.to_string(), ProducerIdentity { producer_id, producer_epoch });
        pos += 2 + len + 10;
    }
    if pos != body.len() {
        return Err(bad("trailing bytes"));
    }
    Ok(RegistryState { next_id: block_end, block_end, transactional })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::StdStorage;

    /// Ids are never reissued across restarts; a transactional id keeps its producer id and
    /// bumps its epoch, which fences the older epoch.
    #[test]
    fn ids_survive_restart_and_epochs_fence() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage: Arc<dyn Storage> = Arc::new(StdStorage);
        let registry = ProducerRegistry::open(Arc::clone(&storage), dir.path(), 0).expect("open");
        let a = registry.init_producer(None).expect("init");
        let b = registry.init_producer(None).expect("init");
        assert_ne!(a.producer_id, b.producer_id);
        let t1 = registry.init_producer(Some("payments")).expect("init");
        let t2 = registry.init_producer(Some("payments")).expect("re-init");
        assert_eq!(t1.producer_id, t2.producer_id);
        assert_eq!(t2.producer_epoch, t1.producer_epoch + 1);
        assert!(matches!(registry.check(t1.producer_id, t1.producer_epoch, 0), Err(Error::ProducerFenced { .. })));
        registry.check(t2.producer_id, t2.producer_epoch, 0).expect("current epoch passes");
        assert!(matches!(registry.check(1 << 20, 0, 0), Err(Error::UnknownProducerId { .. })), "not issued yet");
        assert!(matches!(registry.check(-1, 0, 0), Err(Error::UnknownProducerId { .. })));
        assert!(
            matches!(registry.check(1 << NODE_ID_SHIFT, 0, 0), Err(Error::UnknownProducerId { .. })),
            "a single node issued every id it sees"
        );
        let node7_dir = tempfile::tempdir().expect("tempdir");
        let node7 = ProducerRegistry::open(Arc::clone(&storage), node7_dir.path(), 7).expect("open");
        assert_eq!(node7.init_producer(None).expect("init").producer_id, 7 << NODE_ID_SHIFT);
        node7.check(1 << NODE_ID_SHIFT, 0, 0).expect("in a cluster another node's id is left to the partition");
        assert!(matches!(node7.check((7 << NODE_ID_SHIFT) + 5, 0, 0), Err(Error::UnknownProducerId { .. })));
        drop(registry);
        let registry = ProducerRegistry::open(storage, dir.path(), 0).expect("reopen");
        let c = registry.init_producer(None).expect("init");
        assert!(c.producer_id > t1.producer_id && c.producer_id > b.producer_id, "no id reissued");
        let t3 = registry.init_producer(Some("payments")).expect("re-init after restart");
        assert_eq!((t3.producer_id, t3.producer_epoch), (t1.producer_id, t2.producer_epoch + 1));
    }

    /// Every flipped byte of the registry file is detected.
    #[test]
    fn damage_is_detected() {
        let mut state = RegistryState { next_id: 5, block_end: 1000, transactional: BTreeMap::new() };
        state.transactional.insert("tx".into(), ProducerIdentity { producer_id: 3, producer_epoch: 4 });
        let buf = encode(&state);
        assert_eq!(decode(&buf).expect("decodes").transactional, state.transactional);
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 1;
            assert!(decode(&bad).is_err(), "flip at {i}");
        }
    }
}
