//! Prefix index hot paths at fleet scale: overlap lookup for an 8k-token
//! prompt with 1M (block, worker) entries over 64 and 256 workers, and the
//! rate at which stored/removed events are applied.

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use router_core::index::{OverlapScratch, PrefixIndex, WorkerSlot};
use router_core::{BlockHasher, BlockSize, HashSeed, SeqHash};

const ENTRIES: usize = 1_000_000;
const PROMPT_TOKENS: u32 = 8_192;
/// Blocks per cached conversation in the synthetic fleet.
const CHAIN: usize = 512;

fn hasher() -> BlockHasher {
    BlockHasher::new(BlockSize::VLLM_DEFAULT, HashSeed::for_model("bench", None))
}

/// A chain of `CHAIN` sequence hashes unique to `id`.
fn chain(id: u32) -> Vec<SeqHash> {
    let tokens: Vec<u32> = (0..CHAIN as u32 * 16)
        .map(|t| t ^ id.wrapping_mul(2_654_435_761))
        .collect();
    hasher().sequence_hashes(&tokens)
}

/// `ENTRIES` entries spread over `workers`; the benchmark prompt's chain is
/// cached on `holders` workers at depths of 1/4 to all of the prompt.
fn fleet(workers: u32, holders: u32) -> (PrefixIndex, Vec<SeqHash>) {
    let mut index = PrefixIndex::new(usize::MAX);
    let prompt = chain(u32::MAX);
    for w in 0..holders {
        let depth = (CHAIN / 4) * (1 + w as usize % 4);
        index.store(WorkerSlot(w), &prompt[..depth.min(prompt.len())]);
    }
    let mut id = 0;
    while index.entries() < ENTRIES {
        index.store(WorkerSlot(id % workers), &chain(id));
        id += 1;
    }
    (index, prompt[..(PROMPT_TOKENS / 16) as usize].to_vec())
}

fn overlap_lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("overlap_8k_prompt_1M_entries");
    // "typical": the prompt is cached on 4 workers; "adversarial": on a
    // quarter of the fleet, so every block has many holders to visit.
    for (workers, holders, case) in [
        (64u32, 4, "typical"),
        (256, 4, "typical"),
        (64, 16, "adversarial"),
        (256, 64, "adversarial"),
    ] {
        let (index, prompt) = fleet(workers, holders);
        let mut scratch = OverlapScratch::default();
        let id = BenchmarkId::new(case, format!("{workers}_workers"));
        group.bench_with_input(id, &prompt, |b, prompt| {
            b.iter(|| index.overlaps_into(prompt, &mut scratch).len())
        });
    }
    group.finish();
}

fn apply_events(c: &mut Criterion) {
    let mut group = c.benchmark_group("apply_events");
    let chains: Vec<Vec<SeqHash>> = (0..64).map(chain).collect();
    let blocks: usize = chains.iter().map(Vec::len).sum();
    group.throughput(Throughput::Elements(2 * blocks as u64));
    group.bench_function("store_then_remove_32k_blocks", |b| {
        b.iter_batched(
            || PrefixIndex::new(usize::MAX),
            |mut index| {
                for (i, c) in chains.iter().enumerate() {
                    index.store(WorkerSlot(i as u32 % 16), c);
                }
                for (i, c) in chains.iter().enumerate() {
                    index.remove(WorkerSlot(i as u32 % 16), c);
                }
                index
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, overlap_lookup, apply_events);
criterion_main!(benches);
