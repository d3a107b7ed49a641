use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use router_core::{BlockHasher, BlockSize, HashSeed};

fn sequence_hashes(c: &mut Criterion) {
    let mut group = c.benchmark_group("sequence_hashes");
    let hasher = BlockHasher::new(BlockSize::VLLM_DEFAULT, HashSeed::for_model("qwen3", None));
    for tokens in [1_024usize, 8_192, 32_768] {
        let prompt: Vec<u32> = (0..tokens as u32)
            .map(|t| t.wrapping_mul(2_654_435_761))
            .collect();
        group.throughput(Throughput::Elements(tokens as u64));
        group.bench_with_input(BenchmarkId::from_parameter(tokens), &prompt, |b, prompt| {
            b.iter(|| hasher.sequence_hashes(prompt))
        });
    }
    group.finish();
}

criterion_group!(benches, sequence_hashes);
criterion_main!(benches);
