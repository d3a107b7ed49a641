//! The block size is one fleet-wide fact: 32-token blocks work end to end
//! (engines, relays, sidecar model, filter), and a relay hashing another
//! size than its model's is refused by `kv-sidecar serve`, loudly. Runs on
//! sim-engines, so it holds where real vLLM cannot be installed too
//! (`tests/vllm.rs` repeats the refusal against real vLLM).

use std::time::Duration;

use kvmesh_stack::harness::client::{http_client, post_json, JsonResponse};
use kvmesh_stack::harness::free_port;
use kvmesh_stack::harness::readiness::poll_until;
use kvmesh_stack::harness::relay::{Relay, RelayOptions};
use kvmesh_stack::harness::stack::{Stack, StackOptions};
use serde_json::json;

const MODEL: &str = "qwen3";
const BLOCK: u32 = 32;
const SETTLE: Duration = Duration::from_secs(15);

#[test]
fn thirty_two_token_blocks_route_and_a_disagreeing_relay_is_refused() {
    let mut options = StackOptions::new(MODEL, 2).expect("stack options");
    options.block_size = BLOCK;
    options.sim_args = vec!["--speedup".into(), "50".into()];
    let stack = Stack::start(options, |config| config.debug_headers = true).expect("stack starts");

    // A 40-block token prompt, then the same prefix with another tail: the
    // second lands on a worker the fleet state shows holding all 40 blocks,
    // and the engine says so.
    let prefix: Vec<u32> = (1_000..1_000 + 40 * BLOCK).collect();
    let send = |tail: u32| {
        let mut prompt = prefix.clone();
        prompt.extend(tail..tail + 7);
        let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 2});
        let url = format!("{}/v1/completions", stack.envoy.gateway_url());
        let response = post_json(&http_client(), &url, &body).expect("gateway answers");
        assert_eq!(response.status, 200, "{}", response.text);
        response
    };
    send(90_000);
    poll_until("the sidecar indexes the prefix", SETTLE, || {
        stack.sidecar.metric("kvmesh_serve_index_blocks", "") >= 40.0
    })
    .unwrap();
    // Each Envoy worker thread's VM follows the state stream on its own:
    // send until the one answering shows all 40 blocks on some worker (only
    // the fleet state can: the VM's credit for prompts it sent comes in
    // 16-block steps, 32 of them).
    let most_cached =
        |response: &JsonResponse| response.routed_view().map(|v| v.most_cached_blocks);
    let mut second = send(95_000);
    poll_until("a VM sees the 40 cached blocks", SETTLE, || {
        let seen = most_cached(&second) >= Some(40);
        if !seen {
            second = send(95_000);
        }
        seen
    })
    .unwrap();
    assert_eq!(second.header("x-kvmesh-mode"), Some("precise"));
    // Sent to a worker holding the prefix, by the fleet state and by the
    // engine's own count.
    assert_eq!(second.header("x-kvmesh-cached-blocks"), Some("40"));
    assert!(
        second.cached_tokens() >= u64::from(40 * BLOCK),
        "cached_tokens {}",
        second.cached_tokens()
    );

    // Another relay for the first engine, hashing 16-token blocks.
    let engine = &stack.workers[0].sim;
    let metrics = format!("{}/metrics", engine.url());
    let _wrong = Relay::start(&RelayOptions {
        engine: kvmesh_config::EngineKind::Vllm,
        nats_url: stack.nats.url(),
        worker_id: "wrong-block-size".into(),
        model: MODEL.into(),
        address: engine.address(),
        block_size: 16,
        // Its events are never looked at: the heartbeat is refused.
        zmq_endpoint: Some(format!("tcp://127.0.0.1:{}", free_port())),
        zmq_replay_endpoint: None,
        metrics_url: Some(metrics),
        extra_args: Vec::new(),
    })
    .expect("relay starts");
    let metric = "kvmesh_serve_workers_block_size_mismatch_total";
    poll_until("the sidecar refuses the relay", SETTLE, || {
        stack.sidecar.metric(metric, "") >= 1.0
    })
    .unwrap();
    // Heartbeats keep coming every second: still refused, counted once.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(stack.sidecar.metric(metric, ""), 1.0);
    let workers = stack.sidecar.workers().expect("/v1/workers");
    let ids: Vec<&str> = workers
        .iter()
        .filter_map(|w| w["worker_id"].as_str())
        .collect();
    assert_eq!(ids, ["worker-0", "worker-1"]);
    let mut sidecar = stack.sidecar;
    let logs = sidecar.process().logs();
    assert!(
        logs.contains("ERROR") && logs.contains("wrong-block-size"),
        "no error logged:\n{logs}"
    );
}
