//! `Produce`: validate and append one batch, answer once the engine acknowledges it.
//!
//! The append itself happens in [`start`], called by the connection in request order, so
//! pipelined batches from one connection land in the order they were sent; only the wait
//! for the acknowledgement (the fsync under `fsync = always`) runs concurrently.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rill_engine::AppendHandle;

use super::Shared;
use crate::error::Result;
use crate::messages::{Acks, Response};

/// An appended batch waiting for its acknowledgement.
#[derive(Debug)]
pub struct PendingProduce {
    handle: AppendHandle,
    topic: String,
    partition: u32,
    size_bytes: u64,
    /// In a cluster: the leader epoch the batch was appended in, for `acks = all`.
    replicated_in: Option<u32>,
}

/// Checks and appends `batch` (wire bytes = on-disk format v1); the engine validates it
/// fully before writing and assigns its offsets. Never waits for a sync. In a cluster the
/// node must lead the partition with enough replicas in sync.
pub fn start(shared: &Shared, topic: String, partition: u32, acks: Acks, batch: Bytes) -> Result<PendingProduce> {
    let epoch = match &shared.cluster {
        Some(cluster) => Some(cluster.check_produce(&topic, partition)?),
        None => None,
    };
    let p = shared.store.partition(&topic, partition)?;
    let size_bytes = batch.len() as u64;
    let handle = p.append_batch(BytesMut::from(&batch[..]))?;
    let replicated_in = if acks == Acks::All { epoch } else { None };
    Ok(PendingProduce { handle, topic, partition, size_bytes, replicated_in })
}

/// Awaits the acknowledgement (without blocking a worker) and builds the response. With
/// `acks = all` in a cluster, that is the high watermark passing the batch.
pub async fn finish(shared: &Arc<Shared>, pending: PendingProduce) -> Result<Response> {
    let info = pending.handle.await?;
    if let Some(cluster) = &shared.cluster {
        match pending.replicated_in {
            Some(epoch) => cluster.await_replicated(&pending.topic, pending.partition, epoch, info.last_offset).await?,
            None => cluster.on_local_append(&pending.topic, pending.partition),
        }
    }
    if !info.duplicate {
        let counters = shared.metrics.topic(&pending.topic);
        counters.produce_records.fetch_add(info.last_offset - info.base_offset + 1, Ordering::Relaxed);
        counters.produce_bytes.fetch_add(pending.size_bytes, Ordering::Relaxed);
    }
    Ok(Response::Produce { base_offset: info.base_offset, last_offset: info.last_offset, duplicate: info.duplicate })
}

#[cfg(test)]
mod tests {
    use crate::{Error, ErrorCode};
    use rill_engine::format::batch::{Batch, RECORD_COUNT_OFFSET};
    use rill_engine::format::{BatchBuilder, Compression, Record};

    /// Regression (found by `tests/bad_input.rs`, seed 1795426385498773646): a batch whose
    /// record count was damaged in transit was answered `LimitExceeded`, because the engine
    /// checked the count before the CRC. The engine now checks the CRC first, so damage is
    /// `InvalidBatch`; a batch with a good CRC that is over a limit stays `LimitExceeded`.
    #[test]
    fn damaged_header_field_is_an_invalid_batch() {
        let mut builder = BatchBuilder::new(Compression::None, 1_000);
        builder.push(&Record::from_value("v")).expect("push");
        let valid = builder.build().expect("build");
        let mut damaged = valid.clone();
        damaged[RECORD_COUNT_OFFSET + 3] ^= 0x8c;
        let engine_error = Batch::decode(damaged.freeze()).expect_err("damaged batch");
        assert_eq!(Error::from(engine_error).code(), ErrorCode::InvalidBatch);
        let over = rill_engine::Error::LimitExceeded { limit: "batch_size_bytes_max", max: 1, actual: 2 };
        assert_eq!(Error::from(over).code(), ErrorCode::LimitExceeded);
    }
}
