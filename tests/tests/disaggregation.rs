//! Disaggregated prefill through the real filter in Envoy: the filter sends
//! the prefill leg to the prefill pool through its Envoy cluster, and every
//! way that leg can fail still answers the client, prefilled locally.
//!
//! The sim-engine does not speak the prefill/decode handshakes yet, so these
//! tests cover the legs' plumbing and the fallbacks, not a KV transfer.

use kvmesh_tests::harness::client::{http_client, post_json, prometheus_sum};
use kvmesh_tests::harness::envoy::Disaggregation;
use kvmesh_tests::harness::sim::SimEngineOptions;
use kvmesh_tests::harness::{free_port, Envoy, GatewayConfig, ModelRoute, SimEngine};
use serde_json::json;

const MODEL: &str = "qwen3";

struct Pools {
    decode: SimEngine,
    prefill: SimEngine,
    envoy: Envoy,
}

impl Pools {
    /// One decode and one prefill sim; the filter's prefill pool lists
    /// `prefill_endpoint` (the prefill sim's, or a dead port).
    fn start(protocol: &str, dead_prefill: bool) -> Self {
        let decode = SimEngine::start(SimEngineOptions::new(MODEL, "decode")).unwrap();
        let prefill = SimEngine::start(SimEngineOptions::new(MODEL, "prefill")).unwrap();
        let prefill_endpoint = if dead_prefill {
            format!("127.0.0.1:{}", free_port())
        } else {
            prefill.address()
        };
        let mut route = ModelRoute::new(MODEL, 16, vec![decode.address()]);
        let mut disaggregation = Disaggregation::new("always", protocol, vec![prefill_endpoint]);
        disaggregation.timeout_ms = Some(5_000);
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

    /// Sends a 64-token completion and checks the decode worker answered.
    fn complete(&self, stream: bool) {
        let prompt: Vec<u32> = (0..64).map(|t| 3000 + t).collect();
        let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 4, "stream": stream});
        let url = format!("{}/v1/completions", self.envoy.gateway_url());
        let response = post_json(&http_client(), &url, &body).unwrap();
        assert_eq!(response.status, 200, "{}", response.text);
        assert_eq!(response.header("x-sim-worker-id"), Some("decode"));
        if !stream {
            assert_eq!(response.json().unwrap()["usage"]["prompt_tokens"], 64);
        }
    }
}

fn prompt_tokens_served(sim: &SimEngine) -> f64 {
    prometheus_sum(
        &format!("{}/metrics", sim.url()),
        "vllm:prompt_tokens_total",
        "",
    )
}

#[test]
fn a_dead_prefill_pool_means_local_prefill_for_every_protocol() {
    for protocol in ["vllm", "sglang", "trtllm"] {
        let pools = Pools::start(protocol, true);
        pools.complete(false);
        pools.complete(true);
        assert_eq!(pools.counter("kvmesh_remote_prefills"), 0, "{protocol}");
        assert_eq!(pools.counter("kvmesh_prefill_failures"), 2, "{protocol}");
        assert_eq!(prompt_tokens_served(&pools.prefill), 0.0);
    }
}

#[test]
fn the_prefill_leg_reaches_the_chosen_prefill_worker() {
    for protocol in ["vllm", "sglang", "trtllm"] {
        let pools = Pools::start(protocol, false);
        pools.complete(false);
        // The prefill sim got the leg through the prefill pool's cluster.
        assert_eq!(prompt_tokens_served(&pools.prefill), 64.0, "{protocol}");
        assert_eq!(prompt_tokens_served(&pools.decode), 64.0, "{protocol}");
        if protocol == "sglang" {
            // Both legs at once; the prefill's own answer only counts.
            assert_eq!(pools.counter("kvmesh_remote_prefills"), 1);
        } else {
            // A vLLM-compatible engine without a KV connector returns no
            // handshake parameters: the decode worker prefills itself.
            assert_eq!(pools.counter("kvmesh_prefill_failures"), 1, "{protocol}");
        }
    }
}
