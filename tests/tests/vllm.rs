//! Real vLLM in the loop: two CPU vLLM engines (tiny random-weight Qwen3,
//! 32-token blocks) with their relays, `kv-sidecar serve` and Envoy with the
//! filter in precise mode. Needs `scripts/setup --with-vllm`; set
//! `KVMESH_SKIP_VLLM=<reason>` to skip (scripts/test does so, loudly, only
//! when vLLM cannot be installed).
//!
//! One stack for every phase: an engine takes ~30 s to start here, and the
//! phases need the history the earlier ones leave anyway.

use std::collections::HashSet;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use kvmesh_stack::harness::client::{http_client, post, post_json, JsonResponse};
use kvmesh_stack::harness::readiness::poll_until;
use kvmesh_stack::harness::relay::Relay;
use kvmesh_stack::harness::stack::{Stack, StackOptions};
use kvmesh_stack::harness::vllm::{relay_options, VllmWorker};
use serde_json::{json, Value};

const MODEL: &str = "qwen3";
const BLOCK: u32 = 32;
/// Small enough that a dozen long prompts evict the first ones.
const CACHE_BLOCKS: u64 = 256;
/// Below the concurrency of the load phase, so some requests wait.
const MAX_NUM_SEQS: usize = 4;
const SETTLE: Duration = Duration::from_secs(15);

#[test]
fn real_vllm_fleet_routes_on_its_cache_and_the_sidecar_follows_it() -> anyhow::Result<()> {
    if kvmesh_stack::harness::vllm::skipped("the real-vLLM e2e tests") {
        return Ok(());
    }
    let started = Instant::now();
    let mut options = StackOptions::vllm(MODEL, 2)?;
    options.block_size = BLOCK;
    if let Some(fleet) = options.vllm.as_mut() {
        fleet.cache_blocks = CACHE_BLOCKS;
        fleet.max_model_len = 2048;
        fleet.extra_args = vec!["--max-num-seqs".into(), MAX_NUM_SEQS.to_string()];
    }
    let mut stack = Stack::start(options, |config| config.debug_headers = true)
        .context("starting two vLLM workers behind the gateway")?;
    eprintln!("stack up in {:?}", started.elapsed());

    let holder = repeated_prefix_goes_to_its_holder(&stack)?;
    loosely_typed_fields_pass_as_vllm_takes_them(&stack)?;
    orca_headers_reach_the_filter(&stack)?;
    load_follows_the_engine(&stack, holder)?;
    reset_prefix_cache_empties_the_view(&stack, 1 - holder)?;
    relay_started_after_the_engine_replays_history(&mut stack, holder)?;
    eviction_removes_blocks(&stack, holder)?;
    block_size_mismatch_is_refused(&stack)?;
    killed_engine_traffic_moves(&mut stack)?;
    eprintln!("all phases in {:?}", started.elapsed());
    Ok(())
}

/// A text of `words` words, 5 to 7 tokens each, distinct per `seed`.
fn text(seed: &str, words: usize) -> String {
    (0..words)
        .map(|i| format!("{seed}{}", i * 7919 % 1000))
        .collect::<Vec<_>>()
        .join(" ")
}

fn complete(stack: &Stack, prompt: &str, max_tokens: u32) -> anyhow::Result<JsonResponse> {
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens});
    let response = post_json(
        &http_client(),
        &format!("{}/v1/completions", stack.envoy.gateway_url()),
        &body,
    )?;
    anyhow::ensure!(
        response.status == 200,
        "gateway answered {}: {}",
        response.status,
        response.text
    );
    Ok(response)
}

/// Straight to engine `index`, bypassing the gateway.
fn complete_on(stack: &Stack, index: usize, prompt: &str) -> anyhow::Result<JsonResponse> {
    let url = format!("{}/v1/completions", stack.worker_urls()[index]);
    let response = post_json(
        &http_client(),
        &url,
        &json!({"model": MODEL, "prompt": prompt, "max_tokens": 2}),
    )?;
    anyhow::ensure!(response.status == 200, "vLLM answered {}", response.text);
    Ok(response)
}

fn worker_index(stack: &Stack, response: &JsonResponse) -> anyhow::Result<usize> {
    let address = response
        .header("x-kvmesh-worker")
        .context("no x-kvmesh-worker header")?;
    stack
        .worker_addresses()
        .iter()
        .position(|a| a == address)
        .with_context(|| format!("x-kvmesh-worker {address} is no worker"))
}

/// Tokens of `prompt` as vLLM counts them.
fn token_count(stack: &Stack, prompt: &str) -> anyhow::Result<u64> {
    let response = post_json(
        &http_client(),
        &format!("{}/tokenize", stack.worker_urls()[0]),
        &json!({"model": MODEL, "prompt": prompt}),
    )?;
    response.json()?["count"]
        .as_u64()
        .with_context(|| format!("no count in {}", response.text))
}

/// The sidecar's answer to "which worker holds how much of `prompt`".
fn route(stack: &Stack, prompt: &str) -> anyhow::Result<Value> {
    let response = post(
        &http_client(),
        &format!("{}/debug/route", stack.sidecar.http_url()),
        json!({"model": MODEL, "prompt": prompt}).to_string(),
        &[],
    )?;
    response.json()
}

/// Blocks of `prompt` the sidecar's view of `worker` holds.
fn cached_blocks(stack: &Stack, prompt: &str, worker: usize) -> anyhow::Result<u64> {
    let route = route(stack, prompt)?;
    let id = format!("worker-{worker}");
    Ok(route["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|w| w["worker_id"] == id.as_str())
        .and_then(|w| w["cached_blocks"].as_u64())
        .unwrap_or(0))
}

fn prompt_hashes(stack: &Stack, prompt: &str) -> anyhow::Result<HashSet<u64>> {
    Ok(route(stack, prompt)?["block_hashes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .collect())
}

/// `/v1/workers` entry of `worker-<index>`.
fn sidecar_worker(stack: &Stack, index: usize) -> Option<Value> {
    let id = format!("worker-{index}");
    stack
        .sidecar
        .workers()
        .ok()?
        .into_iter()
        .find(|w| w["worker_id"] == id.as_str())
}

/// Precise mode sends a repeated long prefix to the worker that cached it,
/// and vLLM itself reports the prefix as cached. Returns that worker.
fn repeated_prefix_goes_to_its_holder(stack: &Stack) -> anyhow::Result<usize> {
    let mut first_holder = None;
    for round in 0..3 {
        let prefix = text(&format!("doc{round}w"), 170);
        let prefix_tokens = token_count(stack, &prefix)?;
        let first = complete(stack, &format!("{prefix} first question?"), 2)?;
        let holder = worker_index(stack, &first)?;
        let full_blocks = prefix_tokens / u64::from(BLOCK);
        poll_until("the sidecar sees the prefix on its worker", SETTLE, || {
            cached_blocks(stack, &prefix, holder).unwrap_or(0) >= full_blocks
        })?;
        let second = complete(stack, &format!("{prefix} another question?"), 2)?;
        let cached = second.cached_tokens();
        eprintln!(
            "prefix {round}: {prefix_tokens} tokens on worker-{holder}; second request on worker-{}, mode {:?}, cached_tokens {cached}",
            worker_index(stack, &second)?,
            second.header("x-kvmesh-mode"),
        );
        anyhow::ensure!(
            worker_index(stack, &second)? == holder,
            "not routed to the holder"
        );
        anyhow::ensure!(second.header("x-kvmesh-mode") == Some("precise"));
        anyhow::ensure!(
            cached as f64 >= 0.9 * prefix_tokens as f64,
            "vLLM found only {cached} of {prefix_tokens} prefix tokens cached"
        );
        first_holder.get_or_insert(holder);
    }
    first_holder.context("no rounds")
}

/// vLLM validates with pydantic's lax mode, so `"stream": "true"` and
/// `"max_tokens": "3"` work against it directly; through the gateway too.
fn loosely_typed_fields_pass_as_vllm_takes_them(stack: &Stack) -> anyhow::Result<()> {
    let body = json!({"model": MODEL, "prompt": text("loose", 40),
        "stream": "true", "max_tokens": "3", "max_completion_tokens": 3.0});
    let send = |url: String| -> anyhow::Result<JsonResponse> {
        let response = post_json(&http_client(), &url, &body)?;
        anyhow::ensure!(
            response.status == 200 && response.text.starts_with("data: "),
            "{url} answered {}: {}",
            response.status,
            response.text
        );
        Ok(response)
    };
    send(format!("{}/v1/completions", stack.worker_urls()[0]))?;
    let routed = send(format!("{}/v1/completions", stack.envoy.gateway_url()))?;
    anyhow::ensure!(
        routed.header("x-kvmesh-mode") == Some("precise"),
        "routed {:?}",
        routed.header("x-kvmesh-mode")
    );
    Ok(())
}

/// The filter asks every request for vLLM's ORCA `endpoint-load-metrics`
/// header (`orca_load_reports` is on by default) and parses vLLM's answers.
fn orca_headers_reach_the_filter(stack: &Stack) -> anyhow::Result<()> {
    let reports = stack.envoy.stat("wasmcustom.kvmesh_orca_reports")?;
    let errors = stack.envoy.stat("wasmcustom.kvmesh_orca_report_errors")?;
    eprintln!("ORCA: {reports} reports parsed, {errors} errors");
    anyhow::ensure!(reports >= 6, "only {reports} ORCA reports from 6 responses");
    anyhow::ensure!(errors == 0, "{errors} ORCA reports did not parse");
    Ok(())
}

/// The sidecar's running + waiting of a worker follows vLLM's own gauges
/// while concurrent requests run, and returns to zero after them.
fn load_follows_the_engine(stack: &Stack, index: usize) -> anyhow::Result<()> {
    let url = format!("{}/v1/completions", stack.worker_urls()[index]);
    let concurrency = MAX_NUM_SEQS + 3;
    let senders: Vec<_> = (0..concurrency)
        .map(|i| {
            let url = url.clone();
            thread::spawn(move || {
                let body = json!({
                    "model": MODEL, "prompt": text(&format!("load{i}x"), 100),
                    "max_tokens": 600, "ignore_eos": true,
                });
                post_json(&http_client(), &url, &body).map(|r| r.status)
            })
        })
        .collect();
    let engine = &stack.vllm_workers[index].engine;
    let (mut engine_peak, mut sidecar_peak, mut waiting_seen) = (0.0f64, 0u64, false);
    let mut matched = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while senders.iter().any(|s| !s.is_finished()) && Instant::now() < deadline {
        let running = engine.metric("vllm:num_requests_running");
        let waiting = engine.metric("vllm:num_requests_waiting");
        let load = sidecar_worker(stack, index).map(|w| w["load"].clone());
        let seen = load
            .as_ref()
            .map(|l| l["running"].as_u64().unwrap_or(0) + l["waiting"].as_u64().unwrap_or(0))
            .unwrap_or(0);
        engine_peak = engine_peak.max(running + waiting);
        sidecar_peak = sidecar_peak.max(seen);
        waiting_seen |= load.is_some_and(|l| l["waiting"].as_u64().unwrap_or(0) > 0);
        if seen as f64 == running + waiting && seen > 0 {
            matched += 1;
        }
        thread::sleep(Duration::from_millis(100));
    }
    for sender in senders {
        let status = sender
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
        anyhow::ensure!(status == 200, "a load request failed: {status}");
    }
    eprintln!(
        "load: engine peak running+waiting {engine_peak}, sidecar peak {sidecar_peak}, {matched} samples equal, waiting seen {waiting_seen}"
    );
    anyhow::ensure!(engine_peak as u64 == concurrency as u64);
    anyhow::ensure!(
        sidecar_peak as f64 == engine_peak,
        "sidecar peak {sidecar_peak}"
    );
    anyhow::ensure!(waiting_seen, "the sidecar never saw a waiting request");
    anyhow::ensure!(matched >= 3, "only {matched} samples agreed");
    poll_until("the sidecar sees the load drain", SETTLE, || {
        sidecar_worker(stack, index).is_some_and(|w| {
            w["load"]["running"].as_u64() == Some(0) && w["load"]["waiting"].as_u64() == Some(0)
        })
    })
}

fn sidecar_blocks(stack: &Stack, index: usize) -> u64 {
    sidecar_worker(stack, index)
        .and_then(|w| w["blocks"].as_u64())
        .unwrap_or(u64::MAX)
}

/// `POST /reset_prefix_cache` on an engine empties its view in the sidecar.
fn reset_prefix_cache_empties_the_view(stack: &Stack, index: usize) -> anyhow::Result<()> {
    complete_on(stack, index, &text("resetme", 300))?;
    poll_until("the sidecar sees the blocks", SETTLE, || {
        let blocks = sidecar_blocks(stack, index);
        blocks > 0 && blocks != u64::MAX
    })?;
    let before = sidecar_blocks(stack, index);
    let response: Value = reqwest::blocking::Client::new()
        .post(format!("{}/reset_prefix_cache", stack.worker_urls()[index]))
        .send()?
        .json()?;
    anyhow::ensure!(response["success"] == true, "reset refused: {response}");
    // vLLM publishes the queued clear with its next engine step; a prompt
    // shorter than a block adds no block of its own.
    complete_on(stack, index, "flush")?;
    poll_until("the view empties after the reset", SETTLE, || {
        sidecar_blocks(stack, index) == 0
    })?;
    eprintln!("reset_prefix_cache: worker-{index} view {before} -> 0 blocks");
    Ok(())
}

/// A relay started after the engine served requests learns them by replay.
fn relay_started_after_the_engine_replays_history(
    stack: &mut Stack,
    index: usize,
) -> anyhow::Result<()> {
    stack.vllm_workers[index].relay.process().kill();
    // Stored while no relay listens: only a replay can bring it back.
    let unseen = text("whilerelaydown", 150);
    complete_on(stack, index, &unseen)?;
    let hashes = prompt_hashes(stack, &unseen)?;
    let worker = &mut stack.vllm_workers[index];
    let nats = stack.nats.url();
    worker.relay = Relay::start(&relay_options(&nats, &worker.engine, BLOCK))?;
    // The first live batch tells the new relay what to replay.
    complete_on(stack, index, &text("afterrestart", 100))?;
    let id = format!("worker-{index}");
    poll_until("the replayed blocks reach the sidecar", SETTLE, || {
        stack
            .sidecar
            .blocks_by_worker()
            .ok()
            .and_then(|b| b.get(&id).cloned())
            .is_some_and(|blocks| hashes.is_subset(&blocks))
    })?;
    let replays = stack.vllm_workers[index]
        .relay
        .metric("kvmesh_relay_replays_total", "");
    eprintln!(
        "replay: {} blocks stored while the relay was down are in the view ({replays} replays)",
        hashes.len()
    );
    anyhow::ensure!(replays >= 1.0, "no replay counted");
    Ok(())
}

/// Long distinct prompts overflow the engine's cache; the blocks it evicts
/// leave the sidecar's view.
fn eviction_removes_blocks(stack: &Stack, index: usize) -> anyhow::Result<()> {
    let victim = text("whilerelaydown", 150);
    anyhow::ensure!(cached_blocks(stack, &victim, index)? > 0);
    for i in 0..12 {
        complete_on(stack, index, &text(&format!("evict{i}y"), 250))?;
    }
    poll_until("the evicted prefix leaves the view", SETTLE, || {
        cached_blocks(stack, &victim, index).is_ok_and(|b| b == 0)
    })?;
    let blocks = sidecar_blocks(stack, index);
    eprintln!(
        "eviction: worker-{index} holds {blocks} blocks in the view (capacity {CACHE_BLOCKS})"
    );
    anyhow::ensure!(blocks <= CACHE_BLOCKS, "{blocks} blocks in the view");
    Ok(())
}

/// A relay hashing 16-token blocks for a 32-token model is refused.
fn block_size_mismatch_is_refused(stack: &Stack) -> anyhow::Result<()> {
    let engine = &stack.vllm_workers[0].engine;
    let mut options = relay_options(&stack.nats.url(), engine, 16);
    options.worker_id = "worker-wrong-block-size".into();
    let _relay = Relay::start(&options)?;
    let metric = "kvmesh_serve_workers_block_size_mismatch_total";
    poll_until("the sidecar refuses the relay", SETTLE, || {
        stack.sidecar.metric(metric, "") >= 1.0
    })?;
    thread::sleep(Duration::from_secs(2));
    let listed = stack
        .sidecar
        .workers()?
        .iter()
        .any(|w| w["worker_id"] == "worker-wrong-block-size");
    anyhow::ensure!(!listed, "the mismatched worker was registered");
    eprintln!(
        "block size mismatch: refused, {metric} = {}",
        stack.sidecar.metric(metric, "")
    );
    Ok(())
}

/// Killing one engine moves every request to the other.
fn killed_engine_traffic_moves(stack: &mut Stack) -> anyhow::Result<()> {
    let VllmWorker { engine, .. } = &mut stack.vllm_workers[0];
    engine.process().kill();
    // The relay reports the engine unreachable after two failed scrapes.
    thread::sleep(Duration::from_secs(2));
    let mut served = [0usize; 2];
    for i in 0..8 {
        let response = complete(stack, &text(&format!("afterkill{i}z"), 150), 2)?;
        served[worker_index(stack, &response)?] += 1;
    }
    eprintln!("after killing worker-0: served {served:?}");
    anyhow::ensure!(served == [0, 8], "requests still reached the dead engine");
    Ok(())
}
