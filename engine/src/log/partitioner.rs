//! Key → partition mapping. rill uses Kafka's default: `murmur2(key) & 0x7fffffff % n`, so a
//! key lands on the same partition number in rill as in Kafka with the same count.

/// Kafka's murmur2 variant (seed 0x9747b28c), over `data`.
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes(chunk.try_into().expect("chunks_exact yields 4 bytes"));
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The partition for `key` among `partitions` (which must be positive).
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    assert!(partitions > 0, "a topic has at least one partition");
    (murmur2(key) & 0x7fff_ffff) % partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values computed by Kafka's `Utils.murmur2` for the same inputs (from its test suite),
    /// so keys partition identically in rill and Kafka.
    #[test]
    fn matches_kafka_reference_values() {
        assert_eq!(murmur2(b"21") as i32, -973_932_308);
        assert_eq!(murmur2(b"foobar") as i32, -790_332_482);
        assert_eq!(murmur2(b"a-little-bit-long-string") as i32, -985_981_536);
        assert_eq!(murmur2(b"a-little-bit-longer-string") as i32, -1_486_304_829);
        assert_eq!(murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") as i32, -58_897_971);
        assert_eq!(murmur2(b"abc") as i32, 479_470_107);
    }

    /// Every key maps inside the partition range, stably.
    #[test]
    fn stays_in_range() {
        for n in 1..20u32 {
            for key in [&b""[..], b"k", b"user-42", b"\xff\xff\xff\xff\xff"] {
                let p = partition_for_key(key, n);
                assert!(p < n);
                assert_eq!(p, partition_for_key(key, n));
            }
        }
    }
}
