//! Disaggregated prefill through the real filter in Envoy: the filter sends
//! the prefill leg to the prefill pool through its Envoy cluster, and every
//! way that leg can fail still answers the client, prefilled locally.
//!
//! The sim-engines speak each engine family's handshake, with a real KV pull
//! between the two engine processes.
// Integration test: its helpers fail the test by panicking, like its tests
// (clippy.toml allows that in test functions only).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kvmesh_config::{DisaggregationPolicy, EngineKind, Role};
use kvmesh_stack::harness::client::{http_client, post_json, prometheus_sum, JsonResponse};
use kvmesh_stack::harness::envoy::Disaggregation;
use kvmesh_stack::harness::fleet::KvWorker;
use kvmesh_stack::harness::readiness::poll_until;
use kvmesh_stack::harness::sim::SimEngineOptions;
use kvmesh_stack::harness::stack::{Stack, StackOptions};
use kvmesh_stack::harness::{free_port, Envoy, GatewayConfig, ModelRoute, SimEngine};
use serde_json::{json, Value};
use std::time::Duration;

const MODEL: &str = "qwen3";
/// Prompt tokens: 16 full blocks.
const PROMPT: u32 = 256;

struct Pools {
    decode: SimEngine,
    prefill: SimEngine,
    envoy: Envoy,
}

impl Pools {
    /// One decode and one prefill sim speaking `protocol` (the prefill one
    /// with `extra_prefill_args`); the filter's prefill pool lists the
    /// prefill sim, or a dead port.
    fn start(protocol: EngineKind, dead_prefill: bool, extra_prefill_args: &[&str]) -> Self {
        let bootstrap_port = free_port();
        let (mut prefill_args, decode_args): (Vec<String>, Vec<String>) = match protocol {
            EngineKind::Sglang => (
                vec![
                    "--role".into(),
                    Role::Prefill.to_string(),
                    "--disaggregation-bootstrap-port".into(),
                    bootstrap_port.to_string(),
                ],
                vec!["--role".into(), Role::Decode.to_string()],
            ),
            _ => (Vec::new(), Vec::new()),
        };
        prefill_args.extend(extra_prefill_args.iter().map(|a| (*a).to_owned()));
        let decode =
            SimEngine::start(SimEngineOptions::new(MODEL, "decode").args(decode_args)).unwrap();
        let prefill =
            SimEngine::start(SimEngineOptions::new(MODEL, "prefill").args(prefill_args)).unwrap();
        let prefill_endpoint = if dead_prefill {
            format!("127.0.0.1:{}", free_port())
        } else {
            prefill.address()
        };
        let mut route = ModelRoute::new(MODEL, 16, vec![decode.address()]);
        let mut disaggregation = Disaggregation::new(
            DisaggregationPolicy::Always,
            protocol,
            vec![prefill_endpoint],
        );
        disaggregation.timeout_ms = Some(5_000);
        disaggregation.bootstrap_port = Some(bootstrap_port);
        route.disaggregation = Some(disaggregation);
        let envoy = Envoy::start(GatewayConfig::new(vec![route]).unwrap()).unwrap();
        Self {
            decode,
            prefill,
            envoy,
        }
    }

    fn counter(&self, name: &str) -> u64 {
        self.envoy.stat(&format!("wasmcustom.{name}")).unwrap()
    }

    /// The counter once it reaches `expected`, or its value after 5 s. With
    /// SGLang the legs run at once, and the prefill leg's answer (which
    /// counts the remote prefill) may land after the client's response.
    fn counter_reaching(&self, name: &str, expected: u64) -> u64 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let value = self.counter(name);
            if value >= expected || std::time::Instant::now() >= deadline {
                return value;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Sends a `PROMPT`-token completion, checks the decode worker answered
    /// it, and returns its JSON (non-streaming) or nothing.
    fn complete(&self, stream: bool) -> Option<Value> {
        let prompt: Vec<u32> = (0..PROMPT).map(|t| 3000 + t).collect();
        let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 4, "stream": stream});
        let url = format!("{}/v1/completions", self.envoy.gateway_url());
        let response = post_json(&http_client(), &url, &body).unwrap();
        assert_eq!(response.status, 200, "{}", response.text);
        assert_eq!(response.header("x-sim-worker-id"), Some("decode"));
        if stream {
            assert!(response.text.contains("data: [DONE]"), "{}", response.text);
            return None;
        }
        let answer = response.json().unwrap();
        assert_eq!(answer["usage"]["prompt_tokens"], PROMPT);
        Some(answer)
    }
}

fn metric(sim: &SimEngine, name: &str) -> f64 {
    prometheus_sum(&format!("{}/metrics", sim.url()), name, "")
}

fn prompt_tokens_served(sim: &SimEngine) -> f64 {
    metric(sim, "vllm:prompt_tokens_total")
}

#[test]
fn a_dead_prefill_pool_means_local_prefill_for_every_protocol() {
    for &protocol in EngineKind::ALL {
        let pools = Pools::start(protocol, true, &[]);
        pools.complete(false);
        pools.complete(true);
        assert_eq!(pools.counter("kvmesh_remote_prefills"), 0, "{protocol}");
        // The VM whose leg failed leaves the prefill worker out for a while,
        // so the second request tries it only on Envoy's other VM.
        let failures = pools.counter_reaching("kvmesh_prefill_failures", 1);
        assert!((1..=2).contains(&failures), "{protocol}: {failures}");
        assert_eq!(
            pools.counter_reaching("kvmesh_upstream_errors", failures),
            failures,
            "{protocol}"
        );
        assert_eq!(prompt_tokens_served(&pools.prefill), 0.0);
    }
}

#[test]
fn every_protocol_prefills_remotely_and_the_decode_engine_computes_none_of_it() {
    for &protocol in EngineKind::ALL {
        let pools = Pools::start(protocol, false, &[]);
        let answer = pools.complete(false).unwrap();
        // The decode engine found the whole prompt cached but its last block
        // (which an engine always recomputes to produce the first token).
        let cached = answer["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        assert_eq!(cached, u64::from(PROMPT) - 16, "{protocol}");
        let received = "sim:kv_transfer_blocks_received_total";
        assert_eq!(metric(&pools.decode, received), 16.0, "{protocol}");
        let sent = "sim:kv_transfer_blocks_sent_total";
        assert_eq!(metric(&pools.prefill, sent), 16.0, "{protocol}");
        let hits = metric(&pools.decode, "vllm:prefix_cache_hits_total");
        assert_eq!(hits, cached as f64, "{protocol}");
        assert_eq!(
            prompt_tokens_served(&pools.prefill),
            f64::from(PROMPT),
            "{protocol}"
        );
        assert_eq!(
            pools.counter_reaching("kvmesh_remote_prefills", 1),
            1,
            "{protocol}"
        );
        // Streaming: the decode leg streams through untouched.
        pools.complete(true);
        assert_eq!(metric(&pools.decode, received), 32.0, "{protocol}");
        assert_eq!(
            pools.counter_reaching("kvmesh_remote_prefills", 2),
            2,
            "{protocol}"
        );
        assert_eq!(pools.counter("kvmesh_prefill_failures"), 0, "{protocol}");
        let fallbacks = "sim:remote_prefill_fallbacks_total";
        assert_eq!(metric(&pools.decode, fallbacks), 0.0, "{protocol}");
    }
}

#[test]
fn expired_prefilled_kv_means_local_prefill_on_the_decode_engine() {
    // The prefill engine lets go of its KV before the decode engine asks.
    let pools = Pools::start(
        EngineKind::Vllm,
        false,
        &["--kv-transfer-timeout-secs", "0.000001"],
    );
    let answer = pools.complete(false).unwrap();
    assert_eq!(answer["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(
        metric(&pools.decode, "sim:remote_prefill_fallbacks_total"),
        1.0
    );
    assert_eq!(
        metric(&pools.decode, "sim:kv_transfer_blocks_received_total"),
        0.0
    );
}

/// The sidecar reads the filter's model spec, disaggregation included, so
/// `/debug/route` plans the remote prefill as the gateway does.
#[test]
fn debug_route_plans_the_remote_prefill_of_the_model_spec() {
    let always = DisaggregationPolicy::Always;
    let options = StackOptions::disaggregated(MODEL, 1, 1, always, EngineKind::Vllm).unwrap();
    let stack = Stack::start(options, |_| {}).unwrap();
    let url = format!("{}/debug/route", stack.sidecar.http_url());
    let body = json!({"model": MODEL, "prompt": (0..64).collect::<Vec<u32>>(), "max_tokens": 1});
    let explained: Value = post_json(&http_client(), &url, &body)
        .unwrap()
        .json()
        .unwrap();
    let address = |worker: &KvWorker| Value::from(worker.sim.address());
    assert_eq!(
        explained["choice"]["address"],
        address(&stack.workers[0]),
        "{explained}"
    );
    assert_eq!(
        explained["prefill"]["address"],
        address(&stack.prefill_workers[0]),
        "{explained}"
    );
}

/// A fleet of one decode worker and two workers of role `both` shared by
/// both pools (`shared_workers`), with `policy`.
fn shared_fleet(policy: DisaggregationPolicy) -> Stack {
    let mut options = StackOptions::disaggregated(MODEL, 1, 2, policy, EngineKind::Vllm).unwrap();
    options.shared_workers = true;
    Stack::start(options, |_| {}).unwrap()
}

fn every_worker(stack: &Stack) -> Vec<&KvWorker> {
    stack.workers.iter().chain(&stack.prefill_workers).collect()
}

/// Sends `prompt_tokens` tokens unique to `seed` through the gateway and
/// returns the worker that answered.
fn complete_through(stack: &Stack, seed: u32, prompt_tokens: u32) -> String {
    let prompt: Vec<u32> = (0..prompt_tokens).map(|t| seed * 100_000 + t).collect();
    send_tokens(&stack.envoy, &prompt)
        .header("x-sim-worker-id")
        .unwrap()
        .to_owned()
}

fn blocks_sent(worker: &KvWorker) -> f64 {
    metric(&worker.sim, "sim:kv_transfer_blocks_sent_total")
}

/// Shared workers serve whole requests and prefill for the others, but a
/// worker never prefills for itself.
#[test]
fn shared_workers_decode_and_prefill_for_others_never_for_themselves() {
    let stack = shared_fleet(DisaggregationPolicy::Always);
    let workers = every_worker(&stack);
    let mut served = std::collections::BTreeSet::new();
    for seed in 0..12 {
        let sent_before: Vec<f64> = workers.iter().map(|w| blocks_sent(w)).collect();
        let decode = complete_through(&stack, seed, PROMPT);
        let sent: Vec<f64> = workers.iter().map(|w| blocks_sent(w)).collect();
        let prefilled_by: Vec<&str> = workers
            .iter()
            .zip(sent.iter().zip(&sent_before))
            .filter(|(_, (after, before))| after > before)
            .map(|(w, _)| w.sim.worker_id())
            .collect();
        assert_eq!(prefilled_by.len(), 1, "one prefill leg per request");
        assert_ne!(prefilled_by[0], decode, "a worker prefilled for itself");
        assert_ne!(
            prefilled_by[0], "worker-0",
            "the decode-only worker prefilled"
        );
        served.insert(decode);
    }
    // The idle fleet's ties are random: the shared workers decode too.
    assert!(
        served.iter().any(|w| w.starts_with("prefill-")),
        "{served:?}"
    );
}

/// `auto` with shared workers on an idle fleet: the decode worker's own
/// prefill is as fast as a remote one, so every long prompt is served
/// aggregated, on any of the three workers.
#[test]
fn auto_with_shared_workers_keeps_an_idle_fleet_aggregated() {
    let stack = shared_fleet(DisaggregationPolicy::Auto);
    let mut served = std::collections::BTreeSet::new();
    for seed in 0..9 {
        served.insert(complete_through(&stack, seed, 1_088));
    }
    let remote = stack
        .envoy
        .stat("wasmcustom.kvmesh_remote_prefills")
        .unwrap();
    assert_eq!(remote, 0);
    assert!(every_worker(&stack).iter().all(|w| blocks_sent(w) == 0.0));
    assert!(served.len() >= 2, "{served:?}");
}

/// Sends `prompt` through `envoy` and returns its response.
fn send_tokens(envoy: &Envoy, prompt: &[u32]) -> JsonResponse {
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 2});
    let url = format!("{}/v1/completions", envoy.gateway_url());
    let response = post_json(&http_client(), &url, &body).unwrap();
    assert_eq!(response.status, 200, "{}", response.text);
    response
}

/// A dedicated prefill pool with `auto` and `max_prefill_lag_tokens: 0`: a
/// long prompt whose start the decode worker holds, and the prefill worker
/// does not, would be done later remotely, so the decode worker prefills
/// it. A gateway with the default lag sends such a prompt to the pool.
#[test]
fn a_dedicated_pool_lagging_past_the_limit_leaves_the_prompt_local() {
    let options =
        StackOptions::disaggregated(MODEL, 1, 1, DisaggregationPolicy::Auto, EngineKind::Vllm)
            .unwrap();
    let mut stack = Stack::start(options, |config| {
        config.debug_headers = true;
        // One VM, so the wait below and the send after it see one state.
        config.worker_threads = 1;
        for model in &mut config.models {
            model
                .disaggregation
                .as_mut()
                .unwrap()
                .max_prefill_lag_tokens = Some(0);
        }
    })
    .unwrap();
    stack
        .add_gateway(|config| config.debug_headers = true)
        .unwrap();
    let envoys: Vec<&Envoy> = stack.envoys().collect();
    let remote_prefills = |envoy: &Envoy| envoy.stat("wasmcustom.kvmesh_remote_prefills").unwrap();
    let prefill_worker = &stack.prefill_workers[0];

    // 60 blocks, under `min_prefill_tokens`: the decode worker computes them.
    let start: Vec<u32> = (0..960).map(|t| 7_000 + t).collect();
    poll_until(
        "the decode worker holds the start",
        Duration::from_secs(20),
        || {
            send_tokens(envoys[0], &start)
                .routed_view()
                .unwrap()
                .cached_blocks
                >= 59
        },
    )
    .unwrap();
    assert_eq!(remote_prefills(envoys[0]), 0);
    let longer = |seed: u32| -> Vec<u32> {
        start
            .iter()
            .copied()
            .chain((0..1_088).map(|t| seed * 100_000 + t))
            .collect()
    };

    // The decode worker computes 1,088 tokens itself, the prefill worker
    // would compute 2,048: later by 960, over the lag of 0.
    let local = send_tokens(envoys[0], &longer(1));
    assert_eq!(local.header("x-sim-worker-id"), Some("worker-0"));
    assert_eq!(local.header("x-kvmesh-prefill-worker"), None);
    assert_eq!(remote_prefills(envoys[0]), 0);
    assert_eq!(blocks_sent(prefill_worker), 0.0);

    let remote = send_tokens(envoys[1], &longer(2));
    assert_eq!(remote.header("x-sim-worker-id"), Some("worker-0"));
    // The debug header names the worker that prefilled it.
    assert_eq!(
        remote.header("x-kvmesh-prefill-worker"),
        Some(prefill_worker.sim.address().as_str())
    );
    assert_eq!(remote_prefills(envoys[1]), 1);
    assert!(blocks_sent(prefill_worker) > 0.0);
}
