//! Blocks decoded (vLLM msgpack) and normalized (kvmesh hashes, engine-hash
//! map, reference counts) per second on one core.
//!
//! Each iteration decodes and applies one batch storing 1,024 blocks of 16
//! tokens (64 events of 16 chained blocks, token ids above 65,535 as engines
//! send them) and one batch removing them again, so the state stays bounded.
//! Throughput counts stored blocks; removal work is included in the time.
// A benchmark is test code: setup that fails is a bug to stop on, as in
// the tests (clippy.toml), which cannot cover a benchmark's functions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kv_sidecar::decode::vllm::{decode_batch, Dialect};
use kv_sidecar::normalize::{MediaPolicy, NormStats, Normalizer};
use rmp::encode;
use router_core::BlockSize;

const EVENTS: u64 = 64;
const BLOCKS_PER_EVENT: u64 = 16;
const BLOCK: u64 = 16;

fn stored_batch() -> Vec<u8> {
    let mut b = Vec::new();
    encode::write_array_len(&mut b, 3).unwrap();
    encode::write_f64(&mut b, 0.0).unwrap();
    encode::write_array_len(&mut b, EVENTS as u32).unwrap();
    for e in 0..EVENTS {
        encode::write_array_len(&mut b, 8).unwrap();
        encode::write_str(&mut b, "BlockStored").unwrap();
        encode::write_array_len(&mut b, BLOCKS_PER_EVENT as u32).unwrap();
        for i in 0..BLOCKS_PER_EVENT {
            encode::write_u64(
                &mut b,
                (e * BLOCKS_PER_EVENT + i).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            )
            .unwrap();
        }
        encode::write_nil(&mut b).unwrap();
        encode::write_array_len(&mut b, (BLOCKS_PER_EVENT * BLOCK) as u32).unwrap();
        for t in 0..BLOCKS_PER_EVENT * BLOCK {
            encode::write_uint(&mut b, 70_000 + (e * 7919 + t * 31) % 80_000).unwrap();
        }
        encode::write_uint(&mut b, BLOCK).unwrap();
        encode::write_nil(&mut b).unwrap();
        encode::write_str(&mut b, "GPU").unwrap();
        encode::write_nil(&mut b).unwrap();
    }
    encode::write_uint(&mut b, 0).unwrap();
    b
}

fn removed_batch() -> Vec<u8> {
    let mut b = Vec::new();
    encode::write_array_len(&mut b, 3).unwrap();
    encode::write_f64(&mut b, 0.0).unwrap();
    encode::write_array_len(&mut b, 1).unwrap();
    encode::write_array_len(&mut b, 3).unwrap();
    encode::write_str(&mut b, "BlockRemoved").unwrap();
    encode::write_array_len(&mut b, (EVENTS * BLOCKS_PER_EVENT) as u32).unwrap();
    for i in 0..EVENTS * BLOCKS_PER_EVENT {
        encode::write_u64(&mut b, i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).unwrap();
    }
    encode::write_str(&mut b, "GPU").unwrap();
    encode::write_uint(&mut b, 0).unwrap();
    b
}

fn bench(c: &mut Criterion) {
    let stored = stored_batch();
    let removed = removed_batch();
    let mut normalizer = Normalizer::new(
        "bench-model",
        BlockSize::new(16).unwrap(),
        MediaPolicy::default(),
    );
    let mut out = Vec::new();
    let mut group = c.benchmark_group("relay");
    group.throughput(Throughput::Elements(EVENTS * BLOCKS_PER_EVENT));
    group.bench_function("decode_and_normalize_blocks", |bench| {
        bench.iter(|| {
            let mut stats = NormStats::default();
            for payload in [&stored, &removed] {
                let batch = decode_batch(payload, Dialect::Vllm).unwrap();
                for event in &batch.events {
                    normalizer.apply(event, &mut out, &mut stats);
                }
                out.clear();
            }
            assert_eq!(stats.blocks_removed, EVENTS * BLOCKS_PER_EVENT);
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
