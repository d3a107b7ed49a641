//! vLLM/SGLang msgpack batches: decoding must never panic, and whatever
//! decodes must normalize without panicking either.
#![no_main]

use kv_sidecar::decode::vllm::{decode_batch, Dialect};
use kv_sidecar::normalize::{MediaPolicy, NormStats, Normalizer};
use libfuzzer_sys::fuzz_target;
use router_core::BlockSize;

fuzz_target!(|data: &[u8]| {
    for dialect in [Dialect::Vllm, Dialect::Sglang] {
        let Ok(batch) = decode_batch(data, dialect) else {
            continue;
        };
        let Ok(block_size) = BlockSize::new(1) else {
            return;
        };
        let mut normalizer = Normalizer::new("fuzz", block_size, MediaPolicy::default());
        let mut out = Vec::new();
        let mut stats = NormStats::default();
        for event in &batch.events {
            normalizer.apply(event, &mut out, &mut stats);
        }
    }
});
