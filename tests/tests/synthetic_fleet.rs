//! The cost benchmark's synthetic workers (`harness::synthetic_fleet`, no
//! engines) are real workers to the real sidecar and filter: they register
//! as relays do, the blocks they announce reach the sidecar's index and every
//! filter VM's replica, and Envoy routes each worker's prompt to that
//! worker's address. The filter exports its memory gauge and its
//! state-stream callback histograms.
// Integration test: its helpers fail the test by panicking, like its tests
// (clippy.toml allows that in test functions only).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use kvmesh_stack::harness::client::{http_client, post_json, prometheus_sum, JsonResponse};
use kvmesh_stack::harness::sidecar::{Sidecar, SidecarModel};
use kvmesh_stack::harness::sim::SimEngineOptions;
use kvmesh_stack::harness::synthetic_fleet::{
    SyntheticFleet, SyntheticFleetOptions, SyntheticWorker,
};
use kvmesh_stack::harness::{Envoy, GatewayConfig, ModelRoute, NatsServer, SimEngine};
use router_core::{BlockHasher, BlockSize, HashSeed};
use serde_json::json;

const MODEL: &str = "qwen3";
const WORKERS: usize = 8;
/// Tokens of each worker's own prompt: 64 blocks, whose cache advantage
/// outweighs any load the synthetic workers report.
const PROMPT_TOKENS: u32 = 1024;
const TIMEOUT: Duration = Duration::from_secs(20);
const MIB: f64 = 1024.0 * 1024.0;

/// Worker `worker`'s prompt: token ids above any the synthetic caches draw.
fn prompt(worker: usize) -> Vec<u32> {
    let first = 100_000 + worker as u32 * PROMPT_TOKENS;
    (first..first + PROMPT_TOKENS).collect()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {TIMEOUT:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends `worker`'s prompt until a filter VM routes it precisely on its full
/// cached prefix (a VM may not have the fleet state or the announcement
/// yet); returns the last response.
fn route_prompt(client: &reqwest::blocking::Client, url: &str, worker: usize) -> JsonResponse {
    let body = json!({"model": MODEL, "prompt": prompt(worker), "max_tokens": 1});
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let response = post_json(client, url, &body).unwrap();
        assert_eq!(response.status, 200, "{}", response.text);
        let precise = response.header("x-kvmesh-mode") == Some("precise");
        let cached = response.header("x-kvmesh-cached-blocks") == Some("64");
        if (precise && cached) || Instant::now() >= deadline {
            return response;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn synthetic_workers_blocks_reach_the_filter_which_routes_their_prompts_to_them() {
    let nats = NatsServer::start().unwrap();
    let sims: Vec<SimEngine> = (0..WORKERS)
        .map(|i| SimEngine::start(SimEngineOptions::new(MODEL, &format!("w{i}"))).unwrap())
        .collect();
    let model = SidecarModel {
        name: MODEL.to_owned(),
        block_size: 16,
        tokenizer: None,
    };
    let sidecar = Sidecar::start(&nats.url(), &[model], "").unwrap();
    let fleet = SyntheticFleet::start(SyntheticFleetOptions {
        nats_url: nats.url(),
        model: MODEL.to_owned(),
        block_size: BlockSize::VLLM_DEFAULT,
        workers: sims
            .iter()
            .map(|sim| SyntheticWorker {
                id: sim.worker_id().to_owned(),
                address: sim.address(),
            })
            .collect(),
        cache_blocks: 256,
        load_interval: Duration::from_millis(200),
        seed: 5,
    })
    .unwrap();
    wait_until("every synthetic worker registered", || {
        sidecar.known_workers().unwrap() == WORKERS
    });
    // Full caches, then churn under the announcements.
    fleet.fill(4_000.0, TIMEOUT).unwrap();
    fleet.set_rate(400.0).unwrap();
    for worker in 0..WORKERS {
        fleet.pin(worker, prompt(worker)).unwrap();
    }

    let hasher = BlockHasher::new(BlockSize::VLLM_DEFAULT, HashSeed::for_model(MODEL, None));
    wait_until("the sidecar indexed every worker's prompt", || {
        let held = sidecar.blocks_by_worker().unwrap();
        (0..WORKERS).all(|worker| {
            let blocks = held.get(&format!("w{worker}"));
            hasher
                .sequence_hashes(&prompt(worker))
                .iter()
                .all(|hash| blocks.is_some_and(|b| b.contains(&hash.0)))
        })
    });
    let entries = sidecar.metric("kvmesh_serve_index_entries", "");
    assert!(
        entries >= (WORKERS * 256) as f64 * 0.9,
        "the synthetic caches fill the index: {entries} entries"
    );

    let mut config = GatewayConfig::new(vec![ModelRoute::new(
        MODEL,
        16,
        sims.iter().map(SimEngine::address).collect(),
    )])
    .unwrap();
    config.sidecar = Some(sidecar.endpoints());
    config.debug_headers = true;
    let envoy = Envoy::start(config).unwrap();
    let url = format!("{}/v1/completions", envoy.gateway_url());
    let client = http_client();
    for worker in 0..WORKERS {
        let response = route_prompt(&client, &url, worker);
        let routed = (
            response.header("x-kvmesh-mode"),
            response.header("x-kvmesh-cached-blocks"),
        );
        assert_eq!(
            routed,
            (Some("precise"), Some("64")),
            "worker {worker}'s prompt was not routed on its cached blocks"
        );
        assert_eq!(
            response.sim_worker().unwrap(),
            format!("w{worker}"),
            "worker {worker}'s prompt went elsewhere"
        );
    }

    // The filter's memory gauge and state-stream histograms are exported:
    // the gauge adds up the linear memory of every VM fed by the stream, at
    // least a MiB each, and each of them timed its snapshot.
    let streams = sidecar.metric("kvmesh_serve_stream_subscribers", "");
    assert!(streams >= 2.0, "{streams} filter VMs subscribed");
    let stats = format!("{}/stats/prometheus", envoy.admin_url());
    wait_until("the state-stream metrics are exported", || {
        envoy.stat("wasmcustom.kvmesh_vm_memory_bytes").unwrap() as f64 >= streams * MIB
            && prometheus_sum(&stats, "kvmesh_state_snapshot_us_count", "") >= streams
            && prometheus_sum(&stats, "kvmesh_state_delta_us_count", "") > 0.0
    });
}
