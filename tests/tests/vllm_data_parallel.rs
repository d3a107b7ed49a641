//! Real vLLM with data parallelism: one CPU vLLM API server running two
//! data-parallel ranks (`--data-parallel-size 2`, tiny random-weight Qwen3),
//! one `kv-sidecar relay --data-parallel-rank` per rank, `kv-sidecar serve`
//! and Envoy with the filter. vLLM binds each rank's event sockets, labels
//! each rank's metrics and reads `X-Data-Parallel-Rank` itself: this checks
//! kvmesh against those, not against the sim-engine's copy of them. Needs
//! `scripts/setup --with-vllm`; `KVMESH_SKIP_VLLM=<reason>` skips it, as it
//! does tests/tests/vllm.rs.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context;
use kvmesh_stack::harness::client::{http_client, post, prometheus_rank_sum, JsonResponse};
use kvmesh_stack::harness::gateway::Gateway;
use kvmesh_stack::harness::readiness::poll_until;
use kvmesh_stack::harness::relay::Relay;
use kvmesh_stack::harness::sidecar::SidecarModel;
use kvmesh_stack::harness::vllm::{relay_options, VllmEngine, VllmOptions};
use kvmesh_stack::harness::NatsServer;
use serde_json::{json, Value};

const MODEL: &str = "qwen3";
const BLOCK: u32 = 32;
const SETTLE: Duration = Duration::from_secs(20);

/// A token-id prompt of `blocks` full blocks unique to `id`, then a partial
/// block that differs by `probe`.
fn prompt(id: u32, blocks: u32, probe: u32) -> Value {
    let mut tokens: Vec<u32> = (0..blocks * BLOCK)
        .map(|t| 1_000 + id * 10_000 + t)
        .collect();
    tokens.extend((0..4).map(|t| 500 + probe * 10 + t));
    json!({"model": MODEL, "prompt": tokens, "max_tokens": 2})
}

fn send(url: &str, body: &Value, rank: Option<u32>) -> anyhow::Result<JsonResponse> {
    let rank = rank.map(|r| r.to_string());
    let headers: Vec<(&str, &str)> = rank
        .as_deref()
        .map(|r| ("x-data-parallel-rank", r))
        .into_iter()
        .collect();
    let response = post(&http_client(), url, body.to_string(), &headers)?;
    anyhow::ensure!(
        response.status == 200,
        "{}: {}",
        response.status,
        response.text
    );
    Ok(response)
}

#[test]
fn real_vllm_data_parallel_ranks_are_routed_as_separate_gpus() -> anyhow::Result<()> {
    if kvmesh_stack::harness::vllm::skipped("the real-vLLM data-parallel test") {
        return Ok(());
    }
    let started = Instant::now();
    let nats = NatsServer::start()?;
    let mut options = VllmOptions::new(MODEL, "vllm-dp");
    options.block_size = BLOCK;
    options.cache_blocks = 256;
    options.max_model_len = 2048;
    options.data_parallel_size = 2;
    let engine = VllmEngine::start(options).context("starting vLLM with two ranks")?;
    eprintln!("vLLM with two ranks up in {:?}", started.elapsed());
    let relays = (0..2u32)
        .map(|rank| {
            let mut relay = relay_options(&nats.url(), &engine, BLOCK);
            relay.worker_id = format!("dp-{rank}");
            relay
                .extra_args
                .extend(["--data-parallel-rank".to_owned(), rank.to_string()]);
            Relay::start(&relay)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let model = SidecarModel {
        name: MODEL.to_owned(),
        block_size: BLOCK,
        tokenizer: None,
    }
    .config();
    let route = kvmesh_stack::harness::ModelRoute::new(MODEL, BLOCK, vec![engine.address()]);
    let gateway = Gateway::start(&nats.url(), &[model], vec![route], |config| {
        config.debug_headers = true;
    })?;
    gateway.wait_for_fleet_state(2)?;

    // Prefix r + 1 on rank r, straight at vLLM, which runs it on that rank.
    let direct = format!("{}/v1/completions", engine.url());
    let blocks = 4;
    for rank in 0..2 {
        send(&direct, &prompt(rank + 1, blocks, 0), Some(rank))?;
    }
    // The engine's own counters show each rank computed its own prompt.
    let metrics = format!("{}/metrics", engine.url());
    let prompt_tokens = |rank| prometheus_rank_sum(&metrics, "vllm:prompt_tokens_total", rank);
    let each = f64::from(blocks * BLOCK + 4);
    anyhow::ensure!(
        (prompt_tokens(0), prompt_tokens(1)) == (each, each),
        "each rank ran one prompt: {} {}",
        prompt_tokens(0),
        prompt_tokens(1)
    );
    let indexed = || -> BTreeMap<String, usize> {
        gateway
            .sidecar
            .blocks_by_worker()
            .unwrap_or_default()
            .into_iter()
            .map(|(worker, blocks)| (worker, blocks.len()))
            .collect()
    };
    let expected = BTreeMap::from([("dp-0".to_owned(), 4), ("dp-1".to_owned(), 4)]);
    poll_until("each relay to index its rank's four blocks", SETTLE, || {
        indexed() == expected
    })?;
    let by_worker = gateway.sidecar.blocks_by_worker()?;
    anyhow::ensure!(
        by_worker["dp-0"].is_disjoint(&by_worker["dp-1"]),
        "a rank's blocks reached the other rank's relay"
    );
    std::thread::sleep(Duration::from_millis(300));

    // Through the gateway each follow-up returns to the rank holding its
    // prefix: vLLM's own balancer, without the filter's header, would send
    // these sequential requests to whichever rank it counts as less busy.
    let gateway_url = format!("{}/v1/completions", gateway.envoy.gateway_url());
    for (probe, rank) in [1u32, 0, 1, 0].into_iter().enumerate() {
        let probe = u32::try_from(probe)? + 1;
        let response = send(&gateway_url, &prompt(rank + 1, blocks, probe), None)?;
        anyhow::ensure!(
            response.cached_tokens() == u64::from(blocks * BLOCK),
            "rank {rank} holds the whole prefix, the rank that ran it found {} tokens cached",
            response.cached_tokens()
        );
        let worker = format!("{}#{rank}", engine.address());
        anyhow::ensure!(
            response.header("x-kvmesh-worker") == Some(worker.as_str()),
            "routed to {:?}, not {worker}",
            response.header("x-kvmesh-worker")
        );
    }
    anyhow::ensure!(
        prompt_tokens(0) == 3.0 * each && prompt_tokens(1) == 3.0 * each,
        "the follow-ups ran on the ranks holding them: {} {}",
        prompt_tokens(0),
        prompt_tokens(1)
    );
    let foreign: HashSet<u64> = relays
        .iter()
        .map(|r| r.metric("kvmesh_relay_foreign_rank_batches_total", "") as u64)
        .collect();
    anyhow::ensure!(foreign == HashSet::from([0]), "batches of another rank");
    eprintln!("done in {:?}", started.elapsed());
    Ok(())
}
