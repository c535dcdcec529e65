//! The Kafka listener's decoders on arbitrary bytes: a produce request's `records` field
//! through `kafka_to_rill` (framing, CRC-32C, codecs including decompression of gzip,
//! snappy and zstd sections), and the request decoders of every served Kafka api and version
//! (the `kafka-protocol` codec as the listener calls it). Nothing may panic; every batch the
//! translation accepts that the engine also accepts must translate back (`rill_to_kafka`) to
//! Kafka bytes that translate again to the identical rill batch.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use rill_engine::format::batch::Batch;
use rill_server::kafka::records::{kafka_to_rill, rill_to_kafka};
use rill_server::kafka::SUPPORTED;

fuzz_target!(|data: &[u8]| {
    if let Ok(batches) = kafka_to_rill(data) {
        for batch in batches {
            let frozen = batch.freeze();
            if Batch::decode(frozen.clone()).and_then(|b| b.records()).is_err() {
                continue;
            }
            let mut kafka = BytesMut::new();
            assert_eq!(rill_to_kafka(&frozen, &mut kafka), frozen.len(), "same size both ways");
            let again = kafka_to_rill(&kafka).expect("a translated batch translates back");
            assert_eq!(again.len(), 1);
            assert_eq!(&again[0][..], &frozen[..], "the round trip is exact");
        }
    }
    // The first byte picks a served api and version; the rest is the request body.
    if let Some((&pick, body)) = data.split_first() {
        let (key, min, max) = SUPPORTED[usize::from(pick) % SUPPORTED.len()];
        let span = i16::try_from(usize::from(pick) / SUPPORTED.len()).unwrap_or(0) % (max - min + 1);
        let mut bytes = Bytes::copy_from_slice(body);
        let _ = kafka_protocol::messages::RequestKind::decode(key, &mut bytes, min + span);
    }
});
