//! The whole routing decision of a token-id request as the filter makes it:
//! hashing an 8k-token prompt, the learned-table keys, KV overlap over a fleet
//! view with 1M (block, worker) entries, the cost function over 4, 16, 64 or
//! 256 workers (the cost curves' fleet sizes), and recording the keys for
//! approximate mode. Run natively and
//! inside V8 (see docs/benchmarks.md for the commands).
// A benchmark is test code: setup that fails is a bug to stop on, as in
// the tests (clippy.toml), which cannot cover a benchmark's functions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::num::NonZeroUsize;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use router_core::fleet::FleetView;
use router_core::routing::learned::LearnedTable;
use router_core::routing::prefix_keys::PrefixKeys;
use router_core::routing::select::CostWeights;
use router_core::routing::{plan, LocalState, ModelRouting, RoutedPrompt, Signals};
use router_core::state_stream::{change, BlocksChanged, Change, WorkerJoined, WorkerRole};
use router_core::{BlockHasher, BlockSize, HashSeed};

const MODEL: &str = "bench";
const ENTRIES: usize = 1_000_000;
const PROMPT_TOKENS: u32 = 8_192;
/// Blocks per cached conversation in the synthetic fleet.
const CHAIN: u32 = 512;
/// Workers holding the benchmark prompt, at depths of 1/4 to all of it.
const HOLDERS: u32 = 4;

fn tokens(id: u32) -> Vec<u32> {
    (0..CHAIN * 16)
        .map(|t| t ^ id.wrapping_mul(2_654_435_761))
        .collect()
}

fn stored(worker: u32, hashes: Vec<u64>) -> Change {
    Change {
        kind: Some(change::Kind::Stored(BlocksChanged {
            worker_id: format!("w{worker}"),
            hashes,
        })),
    }
}

fn fleet(hasher: &BlockHasher, workers: u32) -> FleetView {
    let chain = |id: u32| -> Vec<u64> {
        hasher
            .sequence_hashes(&tokens(id))
            .into_iter()
            .map(|h| h.0)
            .collect()
    };
    let mut view = FleetView::new(MODEL, usize::MAX);
    let mut changes: Vec<Change> = (0..workers)
        .map(|w| Change {
            kind: Some(change::Kind::Joined(WorkerJoined {
                worker_id: format!("w{w}"),
                address: format!("10.0.{}.{}:8000", w / 256, w % 256),
                role: WorkerRole::Both as i32,
            })),
        })
        .collect();
    let prompt = chain(u32::MAX);
    for w in 0..HOLDERS {
        let depth = (CHAIN as usize / 4) * (1 + w as usize % 4);
        changes.push(stored(w, prompt[..depth].to_vec()));
    }
    let mut entries = changes.len();
    let mut id = 0;
    while entries < ENTRIES {
        changes.push(stored(id % workers, chain(id)));
        entries += CHAIN as usize;
        id += 1;
    }
    view.commit(changes);
    view
}

fn decision(c: &mut Criterion) {
    let block_size = BlockSize::VLLM_DEFAULT;
    let hasher = BlockHasher::new(block_size, HashSeed::for_model(MODEL, None));
    let model = ModelRouting {
        block_size,
        weights: CostWeights::default(),
        endpoints: Vec::new(),
    };
    let prompt: Vec<u32> = tokens(u32::MAX)[..PROMPT_TOKENS as usize].to_vec();
    let mut group = c.benchmark_group("decision_8k_token_prompt_1M_entries");
    for workers in [4u32, 16, 64, 256] {
        let view = fleet(&hasher, workers);
        let capacity = NonZeroUsize::new(65_536).expect("nonzero");
        let mut local = LocalState::new(LearnedTable::new(capacity, 300_000));
        let id = BenchmarkId::new("precise", format!("{workers}_workers"));
        group.bench_with_input(id, &prompt, |b, prompt| {
            b.iter(|| {
                let exact = hasher.sequence_hashes(prompt);
                let keys = PrefixKeys::from_blocks(&exact, block_size);
                let routed = RoutedPrompt {
                    exact: Some(&exact),
                    keys: &keys,
                };
                let signals = Signals {
                    view: Some(&view),
                    now_ms: 1_000,
                    random: 0,
                };
                plan(&model, None, routed, signals, &mut local)
                    .decode
                    .cached_blocks
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decision);
criterion_main!(benches);
