//! The longest of a filter VM's snapshot callbacks: decodes and applies, one
//! chunk per timed step, a snapshot of `WORKERS` workers × `BLOCKS` blocks
//! split as the sidecar sends it, first into an empty replica, then again
//! into the full one (a fresh snapshot replacing the index). Prints the
//! median and longest step of each. Natively:
//! `cargo run --release -p kvmesh-router-core --example snapshot_callbacks -- 256 4096 4096`;
//! inside V8: build with `--target wasm32-wasip1` and run the `.wasm` with
//! `node --no-warnings scripts/wasi-run.mjs` (docs/benchmarks.md#cost-curves).
// A measuring tool: bad arguments or a failed decode are bugs to stop on.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Instant;

use prost::Message;
use router_core::fleet::FleetView;
use router_core::state_stream::{
    change, split_snapshot, BlocksChanged, Change, StateUpdate, WorkerJoined, WorkerRole,
};

fn argument(index: usize, default: usize) -> usize {
    std::env::args()
        .nth(index)
        .map_or(default, |a| a.parse().expect("arguments are numbers"))
}

fn main() {
    let (workers, blocks, chunk) = (argument(1, 256), argument(2, 4096), argument(3, 4096));
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut random = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut source = FleetView::new("m", usize::MAX);
    let mut changes = Vec::new();
    for w in 0..workers {
        let worker_id = format!("worker-{w}");
        changes.push(Change {
            kind: Some(change::Kind::Joined(WorkerJoined {
                worker_id: worker_id.clone(),
                address: format!("10.0.{}.{}:8000", w / 256, w % 256),
                role: WorkerRole::Both as i32,
                data_parallel_rank: None,
            })),
        });
        let hashes = (0..blocks).map(|_| random()).collect();
        changes.push(Change {
            kind: Some(change::Kind::Stored(BlocksChanged { worker_id, hashes })),
        });
    }
    source.commit(changes);
    let chunks: Vec<Vec<u8>> = split_snapshot(source.snapshot(), chunk)
        .iter()
        .map(Message::encode_to_vec)
        .collect();
    let mut replica = FleetView::new("m", usize::MAX);
    for round in ["into an empty replica", "replacing the full one"] {
        // Which chunks were slow tells work (the same chunks every run) from
        // the machine preempting the process (anywhere).
        let mut by_time: Vec<(usize, f64)> = chunks
            .iter()
            .map(|bytes| {
                let started = Instant::now();
                let update = StateUpdate::decode(bytes.as_slice()).unwrap();
                replica.apply(&update).unwrap();
                started.elapsed().as_secs_f64() * 1e6
            })
            .enumerate()
            .collect();
        let total_ms = by_time.iter().map(|(_, us)| us).sum::<f64>() / 1e3;
        by_time.sort_unstable_by(|a, b| a.1.total_cmp(&b.1));
        let longest: Vec<String> = by_time
            .iter()
            .rev()
            .take(5)
            .map(|(chunk, us)| format!("#{chunk} {us:.0}"))
            .collect();
        println!(
            "{workers} workers × {blocks} blocks, {} chunks of {chunk}, {round}: total {total_ms:.1} ms, median {:.0} µs, p99 {:.0} µs, longest (chunk µs) {}",
            chunks.len(),
            by_time[by_time.len() / 2].1,
            by_time[by_time.len() * 99 / 100].1,
            longest.join(", "),
        );
    }
}
