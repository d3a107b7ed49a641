//! `kv-sidecar serve` costs: memory per indexed (block, worker) entry
//! (counting allocator), snapshot encode/decode of 1M blocks, and relay
//! events applied per second through the state task (NATS excluded).
//! Run: `cargo bench -p kv-sidecar --bench serve`.
// A benchmark is test code: setup that fails is a bug to stop on, as in
// the tests (clippy.toml), which cannot cover a benchmark's functions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use kv_sidecar::serve::config::Config;
use kv_sidecar::serve::metrics::ServeMetrics;
use kv_sidecar::serve::state::{Input, ServeState, StateTask};
use prost::Message;
use router_core::fleet::FleetView;
use router_core::protocol::{kv_event, BlocksStored, KvEvent, KvEventBatch, WorkerInfo};
use router_core::state_stream::{change, BlocksChanged, Change, StateUpdate, WorkerJoined};

/// Counts live heap bytes so the bench can report bytes per index entry.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const WORKERS: u64 = 4;

/// 4 workers storing `blocks_per_worker` hashes each, the second half of each
/// worker's range shared with the next worker (as shared prefixes are).
fn fleet(blocks_per_worker: u64) -> FleetView {
    let mut view = FleetView::new("m", usize::MAX);
    let mut changes = Vec::new();
    for w in 0..WORKERS {
        let id = format!("w{w}");
        changes.push(Change {
            kind: Some(change::Kind::Joined(WorkerJoined {
                worker_id: id.clone(),
                address: format!("10.0.0.{w}:8000"),
                role: 2,
                data_parallel_rank: None,
            })),
        });
        let start = w * blocks_per_worker / 2;
        let hashes = (start..start + blocks_per_worker)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        changes.push(Change {
            kind: Some(change::Kind::Stored(BlocksChanged {
                worker_id: id,
                hashes,
            })),
        });
    }
    view.commit(changes);
    view
}

fn memory_per_entry() {
    let before = LIVE.load(Ordering::Relaxed);
    let view = fleet(250_000);
    let after = LIVE.load(Ordering::Relaxed);
    let entries = view.index().entries();
    eprintln!(
        "memory: {} (block, worker) entries over {} blocks use {:.1} MB = {:.1} bytes/entry",
        entries,
        view.index().blocks(),
        (after - before) as f64 / 1e6,
        (after - before) as f64 / entries as f64
    );
}

fn snapshot(c: &mut Criterion) {
    memory_per_entry();
    let view = fleet(250_000);
    let update = view.snapshot();
    let bytes = update.encode_to_vec();
    eprintln!(
        "snapshot: {} entries encode to {:.1} MB",
        view.index().entries(),
        bytes.len() as f64 / 1e6
    );
    let mut group = c.benchmark_group("snapshot_1M_entries");
    group.sample_size(10);
    group.bench_function("build", |b| b.iter(|| view.snapshot()));
    group.bench_function("encode", |b| b.iter(|| update.encode_to_vec()));
    group.bench_function("decode", |b| {
        b.iter(|| StateUpdate::decode(bytes.as_slice()))
    });
    group.bench_function("decode_and_apply", |b| {
        b.iter(|| {
            let mut replica = FleetView::new("m", usize::MAX);
            if let Ok(update) = StateUpdate::decode(bytes.as_slice()) {
                let _ = replica.apply(&update);
            }
            replica
        })
    });
    group.finish();
}

fn state_task(c: &mut Criterion) {
    let config = Config::parse(
        "nats: {url: 'nats://127.0.0.1:4222'}\n\
         listen: {http: '127.0.0.1:1', grpc: '127.0.0.1:2'}\n\
         models: [{name: m, block_size: 16}]\n",
        "bench",
    )
    .expect("bench config");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    const BATCHES: u64 = 1000;
    const EVENTS: u64 = 10;
    const HASHES: u64 = 8;
    let mut group = c.benchmark_group("state_task");
    group.sample_size(10);
    group.throughput(Throughput::Elements(BATCHES * EVENTS));
    group.bench_function("apply_events", |b| {
        b.iter_batched(
            || {
                let mut registry = prometheus_client::registry::Registry::default();
                let state = Arc::new(ServeState::new(&config, ServeMetrics::new(&mut registry)));
                let mut inputs = vec![Input::Worker(WorkerInfo {
                    worker_id: "w".into(),
                    model: "m".into(),
                    address: "10.0.0.1:8000".into(),
                    epoch: 1,
                    ..WorkerInfo::default()
                })];
                for batch in 0..BATCHES {
                    let events = (0..EVENTS)
                        .map(|e| {
                            let seq = batch * EVENTS + e + 1;
                            KvEvent {
                                seq,
                                kind: Some(kv_event::Kind::Stored(BlocksStored {
                                    parent: None,
                                    hashes: (0..HASHES).map(|h| seq * HASHES + h).collect(),
                                })),
                            }
                        })
                        .collect();
                    inputs.push(Input::Events(KvEventBatch {
                        worker_id: "w".into(),
                        model: "m".into(),
                        epoch: 1,
                        events,
                        timestamp_ms: 0,
                    }));
                }
                (state, inputs)
            },
            |(state, inputs)| {
                runtime.block_on(async {
                    let (tx, rx) = tokio::sync::mpsc::channel(inputs.len() + 1);
                    let (sync_tx, _sync_rx) = tokio::sync::mpsc::channel(16);
                    let (share_tx, _share_rx) = tokio::sync::mpsc::channel(16);
                    let task =
                        StateTask::new(state.clone(), sync_tx, share_tx, Duration::from_secs(15));
                    for input in inputs {
                        let _ = tx.send(input).await;
                    }
                    drop(tx);
                    task.run(rx).await;
                    let entries = state
                        .lock("m")
                        .map(|m| m.registry.fleet().index().entries());
                    assert_eq!(entries, Some((BATCHES * EVENTS * HASHES) as usize));
                })
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, snapshot, state_task);
criterion_main!(benches);
