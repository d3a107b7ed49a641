//! Walking skeleton through the real Envoy with the real compiled filter and
//! real sim-engine workers: routing by prompt, forged headers, request errors,
//! and metrics (config validation: envoy_configs.rs).
// Integration test: its helpers fail the test by panicking, like its tests
// (clippy.toml allows that in test functions only).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use kvmesh_stack::harness::client::{
    http_client, post, post_json, prometheus_sum, send, JsonResponse,
};
use kvmesh_stack::harness::raw_http::{h1_chunked_post_with_trailers, h2_post, http1_exchange};
use kvmesh_stack::harness::sim::SimEngineOptions;
use kvmesh_stack::harness::{
    free_port, Envoy, GatewayConfig, ModelRoute, SidecarEndpoints, SimEngine,
};
use serde_json::json;

const MODEL: &str = "qwen3";
const WORKER_HEADER: &str = "x-sim-worker-id";

struct Fleet {
    workers: Vec<SimEngine>,
    envoy: Envoy,
}

impl Fleet {
    fn start(workers: usize, max_body_bytes: Option<u64>) -> Self {
        Self::start_with(workers, |config| config.max_body_bytes = max_body_bytes)
    }

    /// Starts `workers` sim-engines and Envoy, with `configure` applied to the
    /// gateway config first.
    fn start_with(workers: usize, configure: impl FnOnce(&mut GatewayConfig)) -> Self {
        let workers: Vec<SimEngine> = (0..workers)
            .map(|i| SimEngine::start(SimEngineOptions::new(MODEL, &format!("w{i}"))).unwrap())
            .collect();
        let mut config = GatewayConfig::new(vec![ModelRoute::new(
            MODEL,
            16,
            workers.iter().map(SimEngine::address).collect(),
        )])
        .unwrap();
        configure(&mut config);
        let envoy = Envoy::start(config).unwrap();
        Self { workers, envoy }
    }

    fn completions(&self) -> String {
        format!("{}/v1/completions", self.envoy.gateway_url())
    }
}

/// A 48-token prompt (three full blocks) unique to `seed`.
fn token_prompt(seed: u32) -> Vec<u32> {
    (0..48).map(|i| 1000 + seed * 97 + i).collect()
}

fn served_by(response: &JsonResponse) -> String {
    assert_eq!(response.status, 200, "{}", response.text);
    response
        .header(WORKER_HEADER)
        .expect("sim-engine names itself")
        .to_owned()
}

fn assert_openai_error(response: &JsonResponse, status: u16) {
    assert_eq!(response.status, status, "{}", response.text);
    let body = response.json().unwrap();
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{body}");
    assert!(body["error"]["type"].is_string(), "{body}");
    assert!(body["error"]["code"].is_string(), "{body}");
    assert!(
        response.header(WORKER_HEADER).is_none(),
        "the filter must answer, not a worker"
    );
}

fn counter(envoy: &Envoy, name: &str) -> u64 {
    envoy.stat(&format!("wasmcustom.{name}")).unwrap()
}

#[test]
fn same_token_prompt_same_endpoint_and_prompts_spread_over_all() {
    let fleet = Fleet::start(3, None);
    let client = http_client();
    let mut first_choice = HashMap::new();
    for round in 0..2 {
        for seed in 0..30 {
            let body = json!({"model": MODEL, "prompt": token_prompt(seed), "max_tokens": 1});
            let worker = served_by(&post_json(&client, &fleet.completions(), &body).unwrap());
            let first = first_choice.entry(seed).or_insert_with(|| worker.clone());
            assert_eq!(*first, worker, "prompt {seed} moved in round {round}");
        }
    }
    let used: HashSet<&String> = first_choice.values().collect();
    assert_eq!(
        used.len(),
        3,
        "30 prompts should reach all 3 workers: {first_choice:?}"
    );
    assert_eq!(counter(&fleet.envoy, "kvmesh_requests_approximate"), 60);
    // Each worker's routed counter matches what it served.
    for worker in &fleet.workers {
        let served = first_choice
            .values()
            .filter(|w| **w == worker.worker_id())
            .count() as u64
            * 2;
        let name = worker.address().replace(['.', ':'], "_");
        let routed = counter(&fleet.envoy, &format!("kvmesh_routed_to_{name}"));
        assert_eq!(routed, served, "{}", worker.address());
    }
}

#[test]
fn workers_orca_load_reports_are_read_and_kept_from_clients() {
    let fleet = Fleet::start(2, None);
    let client = http_client();
    let body = json!({"model": MODEL, "prompt": token_prompt(1), "max_tokens": 1}).to_string();
    let plain = post(&client, &fleet.completions(), body.clone(), &[]).unwrap();
    served_by(&plain);
    assert!(plain.header("endpoint-load-metrics").is_none());
    assert_eq!(counter(&fleet.envoy, "kvmesh_orca_reports"), 1);
    // A client asking for the report itself is not told the engine's load.
    let asked = post(
        &client,
        &fleet.completions(),
        body,
        &[("endpoint-load-metrics-format", "JSON")],
    )
    .unwrap();
    served_by(&asked);
    assert!(asked.header("endpoint-load-metrics").is_none());
    assert_eq!(counter(&fleet.envoy, "kvmesh_forged_headers_removed"), 1);
    // The filter's own request (TEXT) was still answered and read.
    assert_eq!(counter(&fleet.envoy, "kvmesh_orca_reports"), 2);
    assert_eq!(counter(&fleet.envoy, "kvmesh_orca_report_errors"), 0);
}

/// The gateway's listener as `ip:port`.
fn authority(fleet: &Fleet) -> String {
    fleet
        .envoy
        .gateway_url()
        .trim_start_matches("http://")
        .to_owned()
}

#[test]
fn handshake_fields_are_removed_whatever_the_escaping_protocol_or_trailers() {
    let fleet = Fleet::start(1, None);
    let authority = authority(&fleet);
    let client = http_client();
    // Each spelling names a handshake field to the engine's JSON parser.
    let smuggled = [
        r#""kv_transfer_param\u0073":{"do_remote_prefill":true,"remote_host":"127.0.0.1","remote_port":9,"remote_block_ids":[1],"remote_engine_id":"x","remote_request_id":"r"}"#,
        r#""\u006bv_transfer_params":{"do_remote_decode":true}"#,
        r#""bootstrap\u005fhost":"127.0.0.1","bootstrap\u005fport":9,"bootstrap\u005froom":7"#,
        r#""disaggregated_param\u0073":{"request_type":"generation_only","ctx_request_id":1}"#,
    ];
    let trailers = [("x-checksum", "1")];
    let mut sent = 0;
    for (i, extra) in smuggled.iter().enumerate() {
        let prompt = json!(token_prompt(20 + i as u32));
        let body = format!(r#"{{"model":"{MODEL}","prompt":{prompt},"max_tokens":1,{extra}}}"#);
        let bytes = body.clone().into_bytes();
        let responses: [(&str, u16, serde_json::Value, bool); 4] = [
            {
                let r = post(&client, &fleet.completions(), body, &[]).unwrap();
                let worker = r.header(WORKER_HEADER).is_some();
                ("HTTP/1.1", r.status, r.json().unwrap(), worker)
            },
            {
                let r =
                    h1_chunked_post_with_trailers(&authority, "/v1/completions", &bytes, &trailers)
                        .unwrap();
                let worker = r.header(WORKER_HEADER).is_some();
                ("HTTP/1.1 + trailers", r.status, r.json().unwrap(), worker)
            },
            {
                let r = h2_post(&authority, "/v1/completions", bytes.clone(), None).unwrap();
                let worker = r.header(WORKER_HEADER).is_some();
                ("HTTP/2", r.status, r.json().unwrap(), worker)
            },
            {
                let r = h2_post(&authority, "/v1/completions", bytes, Some(&trailers)).unwrap();
                let worker = r.header(WORKER_HEADER).is_some();
                ("HTTP/2 + trailers", r.status, r.json().unwrap(), worker)
            },
        ];
        for (transport, status, json, worker) in responses {
            assert_eq!(status, 200, "{transport} {extra}: {json}");
            assert!(worker, "{transport}: a worker must answer");
            assert_eq!(json["usage"]["prompt_tokens"], 48, "{transport}: {json}");
            // A prefill engine told to keep KV for remote decode names itself.
            assert!(
                json.get("kv_transfer_params").is_none(),
                "{transport}: {json}"
            );
            sent += 1;
        }
    }
    assert_eq!(counter(&fleet.envoy, "kvmesh_router_fields_removed"), sent);
    assert_eq!(counter(&fleet.envoy, "kvmesh_requests_approximate"), sent);
    let metrics = format!("{}/metrics", fleet.workers[0].url());
    for name in [
        "sim:remote_prefill_fallbacks_total",
        "sim:kv_transfer_blocks_received_total",
    ] {
        assert_eq!(prometheus_sum(&metrics, name, ""), 0.0, "{name}");
    }
    // Trailers do not carry a bad body past the parser either.
    for response in [
        h2_post(
            &authority,
            "/v1/completions",
            b"{not json".to_vec(),
            Some(&trailers),
        )
        .unwrap(),
        h1_chunked_post_with_trailers(&authority, "/v1/completions", b"{not json", &trailers)
            .unwrap(),
    ] {
        assert_eq!(response.status, 400);
        assert!(response.json().unwrap()["error"]["message"].is_string());
        assert!(response.header(WORKER_HEADER).is_none());
    }
    // vLLM takes `kv_transfer_params` from `vllm_xargs` too, where a
    // top-level rewrite cannot reach it: such a request never reaches an
    // engine.
    let nested = [
        r#""vllm_xargs":{"kv_transfer_params":""}"#,
        r#""vllm_xargs":{"kv_transfer_param\u0073":[1]}"#,
        r#""vllm_xargs":{"ec_transfer_params":0}"#,
    ];
    for extra in nested {
        let prompt = json!(token_prompt(40));
        let body = format!(r#"{{"model":"{MODEL}","prompt":{prompt},"max_tokens":1,{extra}}}"#);
        let h1 = post(&client, &fleet.completions(), body.clone(), &[]).unwrap();
        let h2 = h2_post(&authority, "/v1/completions", body.into_bytes(), None).unwrap();
        for (status, json, worker) in [
            (
                h1.status,
                h1.json().unwrap(),
                h1.header(WORKER_HEADER).is_some(),
            ),
            (
                h2.status,
                h2.json().unwrap(),
                h2.header(WORKER_HEADER).is_some(),
            ),
        ] {
            assert_eq!(status, 400, "{extra}");
            assert_eq!(json["error"]["param"], "vllm_xargs", "{extra}: {json}");
            assert!(!worker, "{extra}: an engine answered");
        }
    }
}

#[test]
fn only_inference_paths_reach_the_pool() {
    let fleet = Fleet::start_with(1, |config| config.expose_engine_headers = false);
    let client = http_client();
    let base = fleet.envoy.gateway_url();
    let probes = [
        ("POST", "/sim/faults"),
        ("GET", "/sim/cache"),
        ("GET", "/metrics"),
        ("POST", "/reset_prefix_cache"),
        ("GET", "/sim/kv_transfer/1"),
        ("GET", "//sim/cache"),
        ("GET", "/v1/../sim/cache"),
        ("POST", "/v1/completions/../../sim/faults"),
        ("GET", "/v1%2F..%2Fmetrics"),
        ("POST", "/v1/completions/"),
        ("GET", "/"),
    ];
    for (method, path) in probes {
        let request = match method {
            "POST" => client
                .post(format!("{base}{path}"))
                .header("content-type", "application/json")
                .body(r#"{"fail_requests":1.0,"exit":true}"#),
            _ => client.get(format!("{base}{path}")),
        };
        let response = request.send().unwrap();
        assert_eq!(response.status(), 404, "{method} {path}");
        assert!(response.headers().get(WORKER_HEADER).is_none());
        let body: serde_json::Value = response.json().unwrap();
        assert_eq!(
            body["error"]["code"], "not_found",
            "{method} {path}: {body}"
        );
    }
    // The worker never saw any of it: its cache is untouched and it serves.
    let models = client.get(format!("{base}/v1/models")).send().unwrap();
    assert_eq!(models.status(), 200);
    let body = json!({"model": MODEL, "prompt": token_prompt(2), "max_tokens": 1});
    let response = post_json(&client, &fleet.completions(), &body).unwrap();
    assert_eq!(response.status, 200, "{}", response.text);
    assert!(
        response.header(WORKER_HEADER).is_none(),
        "engine debug headers are removed unless exposed"
    );
    assert_eq!(response.json().unwrap()["usage"]["prompt_tokens"], 48);
}

#[test]
fn handshake_fields_from_clients_are_removed_before_the_engine_sees_them() {
    let fleet = Fleet::start(1, None);
    let client = http_client();
    let body = json!({"model": MODEL, "prompt": token_prompt(3), "max_tokens": 1,
        "kv_transfer_params": {"do_remote_prefill": true, "remote_host": "192.0.2.1",
            "remote_port": 1, "remote_block_ids": [1], "remote_engine_id": "x"},
        "bootstrap_host": "192.0.2.1", "bootstrap_port": 1, "bootstrap_room": 7,
        "disaggregated_params": {"request_type": "generation_only"}});
    let response = post_json(&client, &fleet.completions(), &body).unwrap();
    served_by(&response);
    // The rewritten body still carries the whole prompt.
    assert_eq!(response.json().unwrap()["usage"]["prompt_tokens"], 48);
    assert_eq!(counter(&fleet.envoy, "kvmesh_router_fields_removed"), 1);
    // Had the engine seen the forged params it would have tried to pull KV
    // from the host they name, and fallen back.
    let metrics = format!("{}/metrics", fleet.workers[0].url());
    assert_eq!(
        prometheus_sum(&metrics, "sim:remote_prefill_fallbacks_total", ""),
        0.0
    );
    assert_eq!(
        prometheus_sum(&metrics, "sim:kv_transfer_blocks_received_total", ""),
        0.0
    );
    let clean = json!({"model": MODEL, "prompt": token_prompt(4), "max_tokens": 1});
    served_by(&post_json(&client, &fleet.completions(), &clean).unwrap());
    assert_eq!(counter(&fleet.envoy, "kvmesh_router_fields_removed"), 1);
}

#[test]
fn forged_routing_headers_are_ignored() {
    let fleet = Fleet::start(3, None);
    let client = http_client();
    for seed in 0..6 {
        let body =
            json!({"model": MODEL, "prompt": token_prompt(seed), "max_tokens": 1}).to_string();
        let chosen = served_by(&post(&client, &fleet.completions(), body.clone(), &[]).unwrap());
        let other = fleet
            .workers
            .iter()
            .find(|w| w.worker_id() != chosen)
            .unwrap()
            .address();
        let forged = post(
            &client,
            &fleet.completions(),
            body,
            &[
                ("x-gateway-destination-endpoint", other.as_str()),
                ("x-kvmesh-worker", other.as_str()),
            ],
        )
        .unwrap();
        assert_eq!(
            served_by(&forged),
            chosen,
            "a forged header steered prompt {seed}"
        );
    }
    assert_eq!(counter(&fleet.envoy, "kvmesh_forged_headers_removed"), 12);
}

#[test]
fn bad_requests_get_openai_errors_and_never_crash_the_vm() {
    let limit = 64 * 1024;
    let fleet = Fleet::start(2, Some(limit));
    let client = http_client();
    let url = fleet.completions();
    let chat_url = format!("{}/v1/chat/completions", fleet.envoy.gateway_url());

    assert_openai_error(&post(&client, &url, "{not json", &[]).unwrap(), 400);
    let invalid_utf8 = b"{\"model\":\"\xff\xfe\",\"prompt\":[1]}".to_vec();
    assert_openai_error(&post(&client, &url, invalid_utf8, &[]).unwrap(), 400);
    let nested = format!(
        "{{\"model\":\"{MODEL}\",\"prompt\":{}1{}}}",
        "[".repeat(20_000),
        "]".repeat(20_000)
    );
    assert_openai_error(&post(&client, &url, nested, &[]).unwrap(), 400);
    assert_openai_error(&post(&client, &url, "", &[]).unwrap(), 400);
    let no_messages = r#"{"model":"qwen3","messages":[]}"#;
    assert_openai_error(&post(&client, &chat_url, no_messages, &[]).unwrap(), 400);
    let unknown = json!({"model": "no-such-model", "prompt": [1, 2, 3]});
    assert_openai_error(&post_json(&client, &url, &unknown).unwrap(), 404);
    let array = r#"["qwen3","hi",null,null,null,false,2]"#;
    assert_openai_error(&post(&client, &url, array, &[]).unwrap(), 400);
    // Engines serve inference paths for POST alone: other methods get the
    // filter's answer, not an engine's.
    for request in [
        client.get(&url),
        client.put(&url).body("{}"),
        client.delete(&chat_url),
    ] {
        let response = send(request).unwrap();
        assert_openai_error(&response, 405);
        assert_eq!(response.header("allow"), Some("POST"));
    }

    // Over the limit with a Content-Length, and streamed (chunked) without one.
    let huge = format!(
        "{{\"model\":\"{MODEL}\",\"prompt\":\"{}\"}}",
        "a".repeat(limit as usize * 2)
    );
    assert_openai_error(&post(&client, &url, huge.clone(), &[]).unwrap(), 413);
    let chunked = reqwest::blocking::Body::new(std::io::Cursor::new(huge.into_bytes()));
    assert_openai_error(&post(&client, &url, chunked, &[]).unwrap(), 413);

    // The VMs survived: routing still works and Envoy saw no Wasm failure.
    let body = json!({"model": MODEL, "prompt": token_prompt(1), "max_tokens": 1});
    served_by(&post_json(&client, &url, &body).unwrap());
    assert_eq!(counter(&fleet.envoy, "kvmesh_requests_approximate"), 1);
    assert_eq!(counter(&fleet.envoy, "kvmesh_requests_rejected_invalid"), 9);
    assert_eq!(
        counter(&fleet.envoy, "kvmesh_requests_rejected_unknown_model"),
        1
    );
    assert_eq!(
        counter(&fleet.envoy, "kvmesh_requests_rejected_too_large"),
        2
    );
    assert_eq!(counter(&fleet.envoy, "kvmesh_host_call_errors"), 0);
    assert_eq!(fleet.envoy.stat("wasm.kvmesh.vm_reload").unwrap(), 0);
    let logs = fleet.envoy.logs();
    for failure in [
        "Wasm VM failed",
        "Function: proxy_on",
        "panicked at",
        "wasm trap",
    ] {
        assert!(
            !logs.contains(failure),
            "Envoy logged a VM failure ({failure}):\n{logs}"
        );
    }
}

#[test]
fn non_inference_requests_pass_through_and_counters_reach_prometheus() {
    let fleet = Fleet::start(1, None);
    let client = http_client();
    let models = client
        .get(format!("{}/v1/models", fleet.envoy.gateway_url()))
        .send()
        .unwrap();
    assert_eq!(models.status(), 200);
    let text = fleet.envoy.prometheus_stats().unwrap();
    for name in [
        "kvmesh_requests_precise",
        "kvmesh_requests_approximate",
        "kvmesh_requests_fallback",
        "kvmesh_requests_stale_state",
        "kvmesh_routed_cached_blocks",
        "kvmesh_routed_prompt_blocks",
        "kvmesh_state_updates_applied",
        "kvmesh_state_updates_skipped",
        "kvmesh_state_update_errors",
        "kvmesh_state_stream_opened",
        "kvmesh_state_stream_closed",
        "kvmesh_state_synced_vms",
        "kvmesh_computing_shared",
        "kvmesh_upstream_failovers",
        "kvmesh_upstream_errors",
        "kvmesh_tokenize_calls",
        "kvmesh_tokenize_failures",
        "kvmesh_gateway_reports_sent",
        "kvmesh_orca_reports",
        "kvmesh_prompt_cache_hits",
        "kvmesh_prompt_cache_misses",
        "kvmesh_requests_passthrough",
        "kvmesh_requests_rejected_invalid",
        "kvmesh_requests_rejected_too_large",
        "kvmesh_requests_rejected_unknown_model",
        "kvmesh_forged_headers_removed",
        "kvmesh_host_call_errors",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{name}{{"))),
            "{name} missing from /stats/prometheus:\n{text}"
        );
    }
    let passthrough = text
        .lines()
        .find(|l| l.starts_with("kvmesh_requests_passthrough{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok());
    assert_eq!(passthrough, Some(1));
}

#[test]
fn prompts_without_a_full_block_fall_back_to_envoy_balancing() {
    let fleet = Fleet::start(2, None);
    let client = http_client();
    let body = json!({"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 1});
    let response = post_json(&client, &fleet.completions(), &body).unwrap();
    served_by(&response);
    assert!(
        response.header("x-kvmesh-mode").is_none(),
        "debug headers are opt-in"
    );
    assert_eq!(counter(&fleet.envoy, "kvmesh_requests_fallback"), 1);
    assert_eq!(counter(&fleet.envoy, "kvmesh_requests_approximate"), 0);
}

#[test]
fn unreachable_sidecar_fails_open() {
    // Nothing listens there: the state stream can never open.
    let fleet = Fleet::start_with(2, |config| {
        config.sidecar = Some(SidecarEndpoints {
            grpc: format!("127.0.0.1:{}", free_port()),
            http: format!("127.0.0.1:{}", free_port()),
        });
    });
    let envoy = &fleet.envoy;
    let client = http_client();
    let url = format!("{}/v1/completions", envoy.gateway_url());
    for seed in 0..5 {
        let body = json!({"model": MODEL, "prompt": token_prompt(seed), "max_tokens": 1});
        served_by(&post_json(&client, &url, &body).unwrap());
    }
    assert_eq!(counter(envoy, "kvmesh_requests_precise"), 0);
    assert_eq!(counter(envoy, "kvmesh_requests_approximate"), 5);
    assert_eq!(counter(envoy, "kvmesh_requests_stale_state"), 5);
    // The filter keeps trying to reach the sidecar with backoff.
    let deadline = Instant::now() + Duration::from_secs(10);
    while counter(envoy, "kvmesh_state_stream_closed") < 2 {
        assert!(Instant::now() < deadline, "no reconnect attempts seen");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(counter(envoy, "kvmesh_state_stream_opened") >= 2);
}

#[test]
fn each_model_is_routed_to_its_own_pool() {
    let start_pool = |model: &str| -> Vec<SimEngine> {
        (0..2)
            .map(|i| {
                SimEngine::start(SimEngineOptions::new(model, &format!("{model}-{i}"))).unwrap()
            })
            .collect()
    };
    let (alpha, beta) = (start_pool("alpha"), start_pool("beta"));
    let route = |model: &str, workers: &[SimEngine]| {
        let mut route =
            ModelRoute::new(model, 16, workers.iter().map(SimEngine::address).collect());
        route.cluster = Some(format!("pool_{model}"));
        route
    };
    let config = GatewayConfig::new(vec![route("alpha", &alpha), route("beta", &beta)]).unwrap();
    let envoy = Envoy::start(config).unwrap();
    let client = http_client();
    let url = format!("{}/v1/completions", envoy.gateway_url());
    for seed in 0..8 {
        for model in ["alpha", "beta"] {
            // A full-block prompt (approximate choice) and a short one (Envoy's
            // fallback balancing) must both stay inside the model's pool; a
            // sim-engine answers 404 for a model it does not serve.
            for prompt in [token_prompt(seed), vec![1, 2, 3]] {
                let body = json!({"model": model, "prompt": prompt, "max_tokens": 1});
                let worker = served_by(&post_json(&client, &url, &body).unwrap());
                assert!(
                    worker.starts_with(model),
                    "{model} request served by {worker}"
                );
            }
        }
    }
    // A client cannot pick the pool itself.
    let body = json!({"model": "alpha", "prompt": [1, 2, 3], "max_tokens": 1}).to_string();
    let forged = post(&client, &url, body, &[("x-kvmesh-pool", "pool_beta")]).unwrap();
    assert!(served_by(&forged).starts_with("alpha"));
}

#[test]
fn errors_envoy_makes_itself_are_openai_shaped() {
    let request_timeout = Duration::from_secs(2);
    let mut fleet = Fleet::start_with(1, |config| {
        config.limits.request_timeout_s = request_timeout.as_secs();
    });
    let authority = authority(&fleet);
    let client = http_client();

    // A body that never ends is cut at request_timeout (408).
    let started = Instant::now();
    let request =
        b"POST /v1/completions HTTP/1.1\r\nhost: gw\r\ncontent-length: 100\r\n\r\n{\"model\"";
    let response = http1_exchange(&authority, request).unwrap();
    assert_eq!(response.status, 408);
    assert_gateway_error(&String::from_utf8_lossy(&response.body));
    assert!(
        started.elapsed() >= request_timeout,
        "{:?}",
        started.elapsed()
    );

    // Headers too large for Envoy's codec (431).
    let huge = "x".repeat(100 * 1024);
    let response = post(
        &client,
        &fleet.completions(),
        "{}",
        &[("x-huge", huge.as_str())],
    )
    .unwrap();
    assert_eq!(response.status, 431, "{}", response.text);
    assert_gateway_error(&response.text);

    // Requests Envoy refuses before any route, whose own text is empty:
    // each still says what is wrong.
    for (request, status, details) in [
        (
            "GET /v1/models HTTP/1.1\r\nhost: gw\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
            403,
            "upgrade_failed",
        ),
        (
            "GET /v1/models%00 HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n",
            400,
            "path_normalization_failed",
        ),
        ("CONNECT gw:443 HTTP/1.1\r\nhost: gw:443\r\n\r\n", 404, "route_not_found"),
        (
            "GET /v1/models HTTP/1.1\r\nconnection: close\r\n\r\n",
            400,
            "missing_host_header",
        ),
    ] {
        let response = http1_exchange(&authority, request.as_bytes()).unwrap();
        let body = String::from_utf8_lossy(&response.body);
        assert_eq!(response.status, status, "{request}: {body}");
        assert_gateway_error(&body);
        assert_eq!(response.json().unwrap()["error"]["code"], details);
    }

    // HTTP/1.0 is refused (426).
    let request = b"POST /v1/completions HTTP/1.0\r\ncontent-length: 2\r\n\r\n{}";
    let response = http1_exchange(&authority, request).unwrap();
    assert_eq!(response.status, 426);
    assert_gateway_error(&String::from_utf8_lossy(&response.body));

    // The whole pool is gone (503): Envoy's own answer, OpenAI-shaped.
    fleet.workers[0].process().unwrap().kill();
    let body = json!({"model": MODEL, "prompt": token_prompt(7), "max_tokens": 1});
    let response = post_json(&client, &fleet.completions(), &body).unwrap();
    assert_eq!(response.status, 503, "{}", response.text);
    assert_gateway_error(&response.text);

    // The filter's own errors keep their own shape.
    let response = post(&client, &fleet.completions(), "{not json", &[]).unwrap();
    assert_openai_error(&response, 400);
    assert_eq!(response.json().unwrap()["error"]["code"], "invalid_request");
}

/// An OpenAI-shaped error body made by Envoy's `local_reply_config`.
fn assert_gateway_error(body: &str) {
    let error: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    assert_eq!(error["error"]["type"], "gateway_error", "{body}");
    assert!(
        !error["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "{body}"
    );
    assert!(error["error"]["code"].is_string(), "{body}");
}

/// Clients that send large bodies and never finish them hold Envoy's heap
/// (HTTP/1.1 streams are not among those the overload manager can reset).
/// Past 95% of `max_heap_bytes` the gateway refuses new requests with an
/// OpenAI-shaped 503 instead of growing until the process is killed, and
/// serves again once the memory is freed.
#[test]
fn a_gateway_under_heap_pressure_refuses_new_requests_and_recovers() {
    use std::io::Write;
    let fleet = Fleet::start_with(1, |config| {
        config.max_body_bytes = Some(8 << 20);
        config.limits.max_heap_bytes = 256 << 20;
    });
    let authority = authority(&fleet);
    let client = http_client();
    let request = json!({"model": MODEL, "prompt": token_prompt(1), "max_tokens": 1});
    let refusing = || {
        fleet
            .envoy
            .stat("overload.envoy.overload_actions.stop_accepting_requests.active")
            .unwrap()
            == 1
    };
    assert!(!refusing());
    // 48 bodies one byte short of 8 MiB: 384 MiB held.
    let body = vec![b' '; (8 << 20) - 2];
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len() + 1
    );
    let held: Vec<std::net::TcpStream> = (0..48)
        .map(|_| {
            let mut tcp = std::net::TcpStream::connect(&authority).unwrap();
            // Once under pressure, Envoy refuses the later ones.
            let _ = tcp
                .write_all(head.as_bytes())
                .and_then(|()| tcp.write_all(&body));
            tcp
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !refusing() {
        assert!(Instant::now() < deadline, "never under pressure");
        std::thread::sleep(Duration::from_millis(100));
    }
    let refused = post_json(&client, &fleet.completions(), &request).unwrap();
    assert_eq!(refused.status, 503, "{}", refused.text);
    assert_gateway_error(&refused.text);
    assert_eq!(refused.json().unwrap()["error"]["code"], "overload");

    drop(held);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let response = post_json(&client, &fleet.completions(), &request).unwrap();
        if response.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "{}", response.text);
        std::thread::sleep(Duration::from_millis(250));
    }
}
