//! Decoders of untrusted engine bytes never panic: arbitrary bytes, and valid
//! batches with bytes flipped, truncated or extended, either decode or return
//! a typed error; whatever decodes also normalizes without panicking. Runs in
//! every `scripts/test` (the cargo-fuzz targets in `fuzz/` go deeper).
// Integration test: its helpers fail the test by panicking, like its tests
// (clippy.toml allows that in test functions only).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kv_sidecar::decode::trtllm::decode_events;
use kv_sidecar::decode::vllm::{decode_batch, Dialect};
use kv_sidecar::normalize::{MediaPolicy, NormStats, Normalizer};
use proptest::prelude::*;
use rmp::encode;
use router_core::BlockSize;

/// A valid vLLM array-encoded batch with one BlockStored of two 2-token blocks
/// and one BlockRemoved.
fn valid_vllm_batch() -> Vec<u8> {
    let mut b = Vec::new();
    encode::write_array_len(&mut b, 3).unwrap();
    encode::write_f64(&mut b, 1.5).unwrap();
    encode::write_array_len(&mut b, 2).unwrap();
    encode::write_array_len(&mut b, 7).unwrap();
    encode::write_str(&mut b, "BlockStored").unwrap();
    encode::write_array_len(&mut b, 2).unwrap();
    encode::write_uint(&mut b, u64::MAX - 1).unwrap();
    encode::write_sint(&mut b, -7).unwrap();
    encode::write_nil(&mut b).unwrap();
    encode::write_array_len(&mut b, 4).unwrap();
    for t in [1u64, 2, 3, 4] {
        encode::write_uint(&mut b, t).unwrap();
    }
    encode::write_uint(&mut b, 2).unwrap();
    encode::write_nil(&mut b).unwrap();
    encode::write_str(&mut b, "GPU").unwrap();
    encode::write_array_len(&mut b, 3).unwrap();
    encode::write_str(&mut b, "BlockRemoved").unwrap();
    encode::write_array_len(&mut b, 1).unwrap();
    encode::write_sint(&mut b, -7).unwrap();
    encode::write_str(&mut b, "GPU").unwrap();
    encode::write_nil(&mut b).unwrap();
    b
}

const VALID_TRTLLM: &str = r#"[{"event_id":1,"data":{"type":"stored","parent_hash":null,
  "blocks":[{"block_hash":18446744073709551615,"tokens":[{"token_id":1},{"token_id":2}]}]},"window_size":32}]"#;

fn decode_and_normalize(bytes: &[u8]) {
    for dialect in [Dialect::Vllm, Dialect::Sglang] {
        decode_and_normalize_as(bytes, dialect);
    }
}

fn decode_and_normalize_as(bytes: &[u8], dialect: Dialect) {
    if let Ok(batch) = decode_batch(bytes, dialect) {
        let mut normalizer =
            Normalizer::new("m", BlockSize::new(2).unwrap(), MediaPolicy::default());
        let (mut out, mut stats) = (Vec::new(), NormStats::default());
        for event in &batch.events {
            normalizer.apply(event, &mut out, &mut stats);
        }
    }
}

#[test]
fn the_seed_inputs_are_valid() {
    assert_eq!(
        decode_batch(&valid_vllm_batch(), Dialect::Vllm)
            .unwrap()
            .events
            .len(),
        2
    );
    assert_eq!(
        decode_events(VALID_TRTLLM.as_bytes(), 2)
            .unwrap()
            .events
            .len(),
        1
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_and_normalize(&bytes);
        let _ = decode_events(&bytes, 2);
    }

    #[test]
    fn mutated_vllm_batches_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in any::<prop::sample::Index>(),
        tail in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        let mut bytes = valid_vllm_batch();
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        bytes.truncate(cut.index(bytes.len() + 1));
        bytes.extend(tail);
        decode_and_normalize(&bytes);
    }

    #[test]
    fn mutated_trtllm_bodies_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = VALID_TRTLLM.as_bytes().to_vec();
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        bytes.truncate(cut.index(bytes.len() + 1));
        let _ = decode_events(&bytes, 2);
    }
}
