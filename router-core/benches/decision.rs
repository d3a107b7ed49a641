//! The whole routing decision as the filter makes it, over a fleet view with
//! 1M (block, worker) entries and 4 to 256 workers (the cost curves' fleet
//! sizes), run natively and inside V8 (see docs/benchmarks.md for the
//! commands):
//! - an 8k-token token-id prompt: hashing, the learned-table keys, KV
//!   overlap, the cost function, recording the keys for approximate mode;
//! - a warm chat turn: parsing the body, the text keys, the prompt-cache
//!   keys and lookup (which yields the block hashes the sidecar tokenized on
//!   the previous turn), then the same plan.
// A benchmark is test code: setup that fails is a bug to stop on, as in
// the tests (clippy.toml), which cannot cover a benchmark's functions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::num::NonZeroUsize;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use router_core::fleet::FleetView;
use router_core::request::{parse_request, Endpoint};
use router_core::routing::learned::LearnedTable;
use router_core::routing::prefix_keys::PrefixKeys;
use router_core::routing::prompt::PromptIdentity;
use router_core::routing::prompt_cache::{prompt_keys, PromptCache};
use router_core::routing::select::CostWeights;
use router_core::routing::{plan, LocalState, ModelRouting, RoutedPrompt, Signals};
use router_core::state_stream::{change, BlocksChanged, Change, WorkerJoined, WorkerRole};
use router_core::{BlockHasher, BlockSize, HashSeed, SeqHash};
use serde_json::json;

const MODEL: &str = "bench";
const ENTRIES: usize = 1_000_000;
const PROMPT_TOKENS: u32 = 8_192;
/// Blocks per cached conversation in the synthetic fleet.
const CHAIN: u32 = 512;
/// Workers holding the benchmark prompt, at depths of 1/4 to all of it.
const HOLDERS: u32 = 4;
const WORKERS: [u32; 4] = [4, 16, 64, 256];
/// The warm chat: a 400-word system prompt, then this many turns of a
/// 30-word question and a 120-word answer; the benchmark routes the last.
const CHAT_TURNS: usize = 8;
/// Tokens the sidecar found in the previous turn (≈ 1.3 per word plus the
/// template), as block hashes in the prompt cache.
const CHAT_HISTORY_TOKENS: usize = 2_048;

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
                data_parallel_rank: None,
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

/// The benchmarked model's hasher and routing: vLLM's block size, default
/// weights, no configured endpoints (the fleet view is fresh).
fn bench_model() -> (BlockHasher, ModelRouting) {
    let block_size = BlockSize::VLLM_DEFAULT;
    let hasher = BlockHasher::new(block_size, HashSeed::for_model(MODEL, None));
    let model = ModelRouting {
        block_size,
        weights: CostWeights::default(),
        endpoints: Vec::new(),
    };
    (hasher, model)
}

fn decision(c: &mut Criterion) {
    let (hasher, model) = bench_model();
    let block_size = model.block_size;
    let prompt: Vec<u32> = tokens(u32::MAX)[..PROMPT_TOKENS as usize].to_vec();
    let mut group = c.benchmark_group("decision_8k_token_prompt_1M_entries");
    for workers in WORKERS {
        let view = fleet(&hasher, workers);
        let capacity = NonZeroUsize::new(65_536).expect("nonzero");
        let mut local = LocalState::new(LearnedTable::new(capacity, 300_000));
        let id = BenchmarkId::new("precise", format!("{workers}_workers"));
        group.bench_with_input(id, &prompt, |b, prompt| {
            b.iter(|| {
                let exact = hasher.sequence_hashes(prompt);
                let keys = PrefixKeys::from_blocks(&exact, block_size);
                cached_blocks(&model, &view, &exact, &keys, &mut local)
            })
        });
    }
    group.finish();
}

/// Plans a request with `exact` block hashes and returns the decode
/// worker's cached blocks (something the optimizer cannot drop).
fn cached_blocks(
    model: &ModelRouting,
    view: &FleetView,
    exact: &[SeqHash],
    keys: &PrefixKeys,
    local: &mut LocalState,
) -> u32 {
    let routed = RoutedPrompt {
        exact: Some(exact),
        keys,
    };
    let signals = Signals {
        view: Some(view),
        last_known: None,
        now_ms: 1_000,
        random: 0,
    };
    plan(model, None, routed, signals, local)
        .decode
        .cached_blocks
}

fn words(seed: usize, count: usize) -> String {
    (0..count)
        .map(|i| format!("w{}", (seed * 7_919 + i * 104_729) % 50_000))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The chat body of `turns` turns: every turn re-sends the history.
fn chat_body(turns: usize) -> Vec<u8> {
    let mut messages = vec![json!({"role": "system", "content": words(0, 400)})];
    for turn in 0..turns {
        messages.push(json!({"role": "user", "content": words(turn * 2 + 1, 30)}));
        if turn + 1 < turns {
            messages.push(json!({"role": "assistant", "content": words(turn * 2 + 2, 120)}));
        }
    }
    serde_json::to_vec(&json!({"model": MODEL, "messages": messages, "stream": true}))
        .expect("serializable")
}

/// A warm chat turn: the prompt cache holds the block hashes of the
/// conversation so far (one of the cached chains of the fleet), keyed by the
/// previous turn's messages, as the sidecar's last tokenization left them.
fn warm_chat_turn(c: &mut Criterion) {
    let (hasher, model) = bench_model();
    let body = chat_body(CHAT_TURNS);
    let history: Vec<SeqHash> = hasher.sequence_hashes(&tokens(u32::MAX)[..CHAT_HISTORY_TOKENS]);
    let mut group = c.benchmark_group("decision_warm_chat_turn_1M_entries");
    group.throughput(criterion::Throughput::Bytes(body.len() as u64));
    for workers in WORKERS {
        let view = fleet(&hasher, workers);
        let mut cache = PromptCache::default();
        let previous = {
            let request = parse_request(Endpoint::ChatCompletions, &body, usize::MAX).unwrap();
            let seed = PromptIdentity::of(&hasher, &request.prompt, None).text_seed;
            let keys = prompt_keys(&request.raw_digests, seed);
            keys[keys.len() - 2]
        };
        cache.insert(previous, &history);
        let capacity = NonZeroUsize::new(65_536).expect("nonzero");
        let mut local = LocalState::new(LearnedTable::new(capacity, 300_000));
        let id = BenchmarkId::new("precise", format!("{workers}_workers"));
        group.bench_with_input(id, &body, |b, body| {
            b.iter(|| {
                let request = parse_request(Endpoint::ChatCompletions, body, usize::MAX).unwrap();
                let identity = PromptIdentity::of(&hasher, &request.prompt, None);
                let keys = prompt_keys(&request.raw_digests, identity.text_seed);
                let hit = cache.lookup(&keys).expect("the previous turn is cached");
                cached_blocks(&model, &view, &hit.hashes, &identity.keys, &mut local)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decision, warm_chat_turn);
criterion_main!(benches);
