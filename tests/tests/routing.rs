//! Precise KV-aware routing end to end: real Envoy with the compiled filter,
//! `kv-sidecar serve`, nats-server, and sim-engines with their relays. The
//! engines' own `cached_tokens` prove where the prefix was.
// Integration test: its helpers fail the test by panicking, like its tests
// (clippy.toml allows that in test functions only).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use kvmesh_stack::harness::client::{
    http_client, post_json, prometheus_rank_sum, prometheus_sum, JsonResponse,
};
use kvmesh_stack::harness::fleet::SimHosting;
use kvmesh_stack::harness::readiness::poll_until;
use kvmesh_stack::harness::sidecar::{Sidecar, SidecarModel};
use kvmesh_stack::harness::sim::SimEngineOptions;
use kvmesh_stack::harness::stack::StackOptions;
use kvmesh_stack::harness::{self, Envoy, GatewayConfig, ModelRoute, NatsServer};
use serde_json::{json, Value};

const MODEL: &str = "qwen3";
const BLOCK: u32 = 16;
const WORKERS: usize = 3;
const SETTLE: Duration = Duration::from_secs(20);

/// The harness's whole stack, with this test's checks.
struct Stack(harness::stack::Stack);

impl std::ops::Deref for Stack {
    type Target = harness::stack::Stack;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Stack {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Stack {
    fn start() -> Self {
        Self::start_with(|_| {})
    }

    fn start_with(configure: impl FnOnce(&mut GatewayConfig)) -> Self {
        Self::start_with_sims(&["--speedup", "20"], configure)
    }

    fn start_with_sims(sim_args: &[&str], configure: impl FnOnce(&mut GatewayConfig)) -> Self {
        Self::start_hosted(sim_args, SimHosting::ProcessPerWorker, configure)
    }

    fn start_hosted(
        sim_args: &[&str],
        hosting: SimHosting,
        configure: impl FnOnce(&mut GatewayConfig),
    ) -> Self {
        let mut options = StackOptions::new(MODEL, WORKERS).unwrap();
        options.block_size = BLOCK;
        options.sim_hosting = hosting;
        options.sim_args = sim_args
            .iter()
            .chain(&["--max-model-len", "65536"])
            .map(|arg| (*arg).to_owned())
            .collect();
        Self(
            harness::stack::Stack::start(options, |config| {
                config.debug_headers = true;
                configure(config);
            })
            .unwrap(),
        )
    }

    fn wait_for(&self, what: &str, ready: impl FnMut() -> bool) {
        poll_until(what, SETTLE, ready).unwrap();
    }

    /// Sends fresh requests until the filters route one precisely again
    /// (the second precise decision of the test).
    fn wait_for_precise_again(&self, base: u32) {
        let deadline = Instant::now() + SETTLE;
        let mut i = 10;
        while self.counter("kvmesh_requests_precise") < 2 {
            assert!(Instant::now() < deadline, "precise routing never came back");
            self.send("/v1/completions", &token_completion(base, i));
            i += 1;
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn counter(&self, name: &str) -> u64 {
        self.envoy.stat(&format!("wasmcustom.{name}")).unwrap()
    }

    /// Waits until the sidecar's index holds `blocks` blocks of `body`'s
    /// prompt on some worker, then gives the filters' streams a moment.
    fn wait_indexed(&self, body: &Value, blocks: u64) {
        let url = format!("{}/debug/route", self.sidecar.http_url());
        let client = http_client();
        self.wait_for("the prefix to reach the index", || {
            post_json(&client, &url, body)
                .ok()
                .and_then(|r| r.json().ok())
                .and_then(|v: Value| {
                    v["workers"].as_array().map(|ws| {
                        ws.iter()
                            .any(|w| w["cached_blocks"].as_u64().unwrap_or(0) >= blocks)
                    })
                })
                .unwrap_or(false)
        });
        std::thread::sleep(Duration::from_millis(300));
    }

    /// Prompt tokens of `body` by the sidecar's tokenizer.
    fn sidecar_tokens(&self, body: &Value) -> u64 {
        let url = format!("{}/v1/tokenize", self.sidecar.http_url());
        let response = post_json(&http_client(), &url, body).unwrap();
        response.json().unwrap()["num_tokens"].as_u64().unwrap()
    }

    fn send(&self, path: &str, body: &Value) -> JsonResponse {
        let url = format!("{}{path}", self.envoy.gateway_url());
        let response = post_json(&http_client(), &url, body).unwrap();
        assert_eq!(response.status, 200, "{}", response.text);
        response
    }
}

/// A 64-token completion (four full blocks) unique to `base` and `i`.
fn token_completion(base: u32, i: u32) -> Value {
    let tokens: Vec<u32> = (0..64).map(|t| base + i * 100 + t).collect();
    json!({"model": MODEL, "prompt": tokens, "max_tokens": 2})
}

/// Sends a cold request, waits until its blocks are indexed, then a request
/// extending it: the second must land where the first ran and hit its cache.
fn assert_follow_up_hits(stack: &Stack, path: &str, first: Value, second: Value, blocks: u64) {
    let cold = stack.send(path, &first);
    let owner = cold.sim_worker().unwrap();
    stack.wait_indexed(&second, blocks);
    let warm = stack.send(path, &second);
    assert_eq!(
        warm.sim_worker().unwrap(),
        owner,
        "{path}: follow-up left the worker holding its prefix"
    );
    let cached = warm.cached_tokens();
    assert!(
        cached >= blocks * u64::from(BLOCK),
        "{path}: only {cached} cached tokens"
    );
}

fn long_text(topic: &str, words: usize) -> String {
    (0..words)
        .map(|i| format!("{topic}-{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn shared_prefixes_land_where_they_are_cached() {
    let stack = Stack::start();

    // Token ids, completions.
    let prefix: Vec<u32> = (0..320).map(|i| 1000 + i * 7).collect();
    let mut longer = prefix.clone();
    longer.extend(5000..5040);
    assert_follow_up_hits(
        &stack,
        "/v1/completions",
        json!({"model": MODEL, "prompt": prefix, "max_tokens": 2}),
        json!({"model": MODEL, "prompt": longer, "max_tokens": 2}),
        18,
    );

    // Text, completions (tokenized by the sidecar).
    let text = long_text("alpha", 300);
    assert_follow_up_hits(
        &stack,
        "/v1/completions",
        json!({"model": MODEL, "prompt": text, "max_tokens": 2}),
        json!({"model": MODEL, "prompt": format!("{text} and then some more words"), "max_tokens": 2}),
        16,
    );

    // Chat: a second turn re-sends the history.
    let system = json!({"role": "system", "content": long_text("policy", 300)});
    let first_turn = json!([system, {"role": "user", "content": "What is rule 7?"}]);
    let second_turn = json!([
        system,
        {"role": "user", "content": "What is rule 7?"},
        {"role": "assistant", "content": "Rule 7 says policy-7."},
        {"role": "user", "content": "And rule 9?"}
    ]);
    assert_follow_up_hits(
        &stack,
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": first_turn, "max_tokens": 2}),
        json!({"model": MODEL, "messages": second_turn, "max_tokens": 2}),
        16,
    );

    // A stray field of the other endpoint's is ignored, as engines ignore
    // it: the chat is tokenized by its messages.
    let system = json!({"role": "system", "content": long_text("charter", 300)});
    let first_turn = json!([system, {"role": "user", "content": "What is clause 3?"}]);
    let second_turn = json!([
        system,
        {"role": "user", "content": "What is clause 3?"},
        {"role": "assistant", "content": "Clause 3 says charter-3."},
        {"role": "user", "content": "And clause 4?"}
    ]);
    let stray = |messages: &Value| json!({"model": MODEL, "messages": messages, "prompt": "z", "max_tokens": 2});
    assert_follow_up_hits(
        &stack,
        "/v1/chat/completions",
        stray(&first_turn),
        stray(&second_turn),
        16,
    );

    assert!(
        stack.counter("kvmesh_requests_precise") >= 8,
        "precise / approximate / fallback: {} / {} / {}",
        stack.counter("kvmesh_requests_precise"),
        stack.counter("kvmesh_requests_approximate"),
        stack.counter("kvmesh_requests_fallback"),
    );
    assert!(stack.counter("kvmesh_tokenize_calls") >= 6);
    assert_eq!(stack.counter("kvmesh_tokenize_failures"), 0);
    assert!(stack.counter("kvmesh_routed_cached_blocks") >= 50);
    // Every precise decision and its progress went back to the sidecar.
    let precise = stack.counter("kvmesh_requests_precise");
    assert!(stack.counter("kvmesh_gateway_reports_sent") >= 2 * precise);
    let received = stack
        .sidecar
        .metric("kvmesh_serve_gateway_reports_total", "");
    assert!(
        received >= 2.0 * precise as f64,
        "sidecar got {received} reports"
    );
}

/// A token-id completion: `blocks` full blocks of prefix `id`, then one
/// block unique to `probe`.
fn prefixed_completion(id: u32, blocks: u32, probe: u32, max_tokens: u32) -> Value {
    let mut tokens: Vec<u32> = (0..blocks * BLOCK).map(|t| id * 100_000 + t).collect();
    tokens.extend((0..BLOCK).map(|t| 90_000_000 + probe * 1_000 + t));
    json!({"model": MODEL, "prompt": tokens, "max_tokens": max_tokens})
}

/// Asks the sidecar's `/debug/route` about `body`, then sends it through
/// the gateway: the filter must choose a worker `/debug/route` ranks
/// cheapest (ties are broken at random on both sides), and see as many of
/// the prompt's blocks cached on it and on the worker holding the most.
/// Returns the explanation.
fn assert_debug_route_matches_the_filter(stack: &Stack, body: &Value) -> Value {
    let url = format!("{}/debug/route", stack.sidecar.http_url());
    let explained: Value = post_json(&http_client(), &url, body)
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(explained["mode"], "precise", "{explained}");
    let workers = explained["workers"].as_array().unwrap();
    let cost = |w: &Value| w["cost"].as_f64().unwrap();
    let best = workers.iter().map(cost).fold(f64::INFINITY, f64::min);
    let response = stack.send("/v1/completions", body);
    assert_eq!(response.header("x-kvmesh-mode"), Some("precise"));
    let chosen = workers
        .iter()
        .filter(|w| cost(w) == best)
        .find(|w| w["address"].as_str() == response.header("x-kvmesh-worker"));
    let Some(chosen) = chosen else {
        panic!(
            "the filter chose {:?}, not a cheapest worker of /debug/route: {explained}",
            response.header("x-kvmesh-worker")
        );
    };
    let routed = response.routed_view();
    assert_eq!(
        routed.map(|r| r.cached_blocks),
        chosen["cached_blocks"].as_u64(),
        "{explained}"
    );
    let most_cached = workers
        .iter()
        .filter_map(|w| w["cached_blocks"].as_u64())
        .max();
    assert_eq!(
        routed.map(|r| r.most_cached_blocks),
        most_cached,
        "{explained}"
    );
    explained
}

/// Three sim workers hosted by one sim-engine process (`--workers 3`), each
/// with its own relay, behind the sidecar and Envoy with the filter. Each
/// must act as a GPU of its own: its cache and counters hold only its
/// requests, the sidecar indexes its blocks under its id and address, and
/// the filter sends a repeated prefix back to it. Shared caches, or events,
/// ports or ids wired to the wrong worker, fail one of these checks.
#[test]
fn workers_hosted_by_one_sim_process_are_routed_as_separate_gpus() {
    let mut stack = Stack::start_hosted(&["--speedup", "20"], SimHosting::OneProcess, |_| {});
    assert!(
        stack.workers[0].sim.process().is_err(),
        "the workers share one process"
    );
    let ids: Vec<String> = (0..WORKERS).map(|i| format!("worker-{i}")).collect();
    let listed: BTreeMap<String, String> = stack
        .sidecar
        .workers()
        .unwrap()
        .iter()
        .map(|w| {
            let field = |name: &str| w[name].as_str().unwrap().to_owned();
            (field("worker_id"), field("address"))
        })
        .collect();
    let expected: BTreeMap<String, String> =
        ids.iter().cloned().zip(stack.worker_addresses()).collect();
    assert_eq!(
        listed, expected,
        "the sidecar knows each worker at its own address"
    );

    // Prefix i + 1 warmed on worker i directly, bypassing the gateway.
    let blocks = 8;
    for (i, worker) in stack.workers.iter().enumerate() {
        let url = format!("{}/v1/completions", worker.sim.url());
        let body = prefixed_completion(i as u32 + 1, blocks, 0, 2);
        let response = post_json(&http_client(), &url, &body).unwrap();
        assert_eq!(response.sim_worker().unwrap(), ids[i]);
    }
    let hasher = router_core::BlockHasher::new(
        router_core::BlockSize::new(BLOCK).unwrap(),
        router_core::HashSeed::for_model(MODEL, None),
    );
    let truth: BTreeMap<String, HashSet<u64>> = stack
        .workers
        .iter()
        .map(|w| {
            (
                w.sim.worker_id().to_owned(),
                w.sim.cached_seq_hashes().unwrap(),
            )
        })
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let body = prefixed_completion(i as u32 + 1, blocks, 0, 2);
        let tokens: Vec<u32> = serde_json::from_value(body["prompt"].clone()).unwrap();
        let own: HashSet<u64> = hasher
            .sequence_hashes(&tokens)
            .iter()
            .map(|h| h.0)
            .collect();
        assert!(truth[id].is_superset(&own), "{id} cached its prompt");
        for (other, cached) in &truth {
            assert!(
                other == id || cached.is_disjoint(&own),
                "{other} holds blocks of {id}'s prompt"
            );
        }
    }
    stack.wait_for("the sidecar to index every worker's own blocks", || {
        stack.sidecar.blocks_by_worker().ok().as_ref() == Some(&truth)
    });
    std::thread::sleep(Duration::from_millis(300));

    // The follow-ups through the gateway go back to the worker holding them.
    for (i, id) in ids.iter().enumerate() {
        let response = stack.send(
            "/v1/completions",
            &prefixed_completion(i as u32 + 1, blocks, 1, 2),
        );
        assert_eq!(response.header("x-kvmesh-mode"), Some("precise"));
        assert_eq!(response.sim_worker().unwrap(), *id);
        assert!(response.cached_tokens() >= u64::from(blocks * BLOCK));
    }
    // Each worker counted exactly its own two prompts of 9 blocks.
    for worker in &stack.workers {
        let metrics = format!("{}/metrics", worker.sim.url());
        let prompt_tokens = prometheus_sum(&metrics, "vllm:prompt_tokens_total", "");
        assert_eq!(
            prompt_tokens,
            f64::from(2 * (blocks + 1) * BLOCK),
            "{}",
            worker.sim.worker_id()
        );
    }
}

#[test]
fn debug_route_explains_the_filters_choice_idle_and_under_load() {
    // Sims at their own speed, so long streams stay in flight while probed;
    // one Envoy thread, so the probing VM made every decision it holds.
    let stack = Stack::start_with_sims(&[], |config| config.worker_threads = 1);
    // Three cached prefixes of different lengths, and one a tenant salted.
    let salted = |mut body: Value| {
        body["cache_salt"] = json!("tenant-7");
        body
    };
    let prefixes = [(1, 12), (2, 8), (3, 4)];
    for (id, blocks) in prefixes {
        stack.send("/v1/completions", &prefixed_completion(id, blocks, 0, 2));
        stack.wait_indexed(&prefixed_completion(id, blocks, 1, 2), u64::from(blocks));
    }
    // The sims ignore the salt and store the blocks unsalted: a salted
    // prompt must then find nothing cached, by both accounts.
    stack.send("/v1/completions", &salted(prefixed_completion(4, 8, 0, 2)));
    stack.wait_indexed(&prefixed_completion(4, 8, 1, 2), 8);
    // ORCA reports of the warm-up (and of each probe) are fresh for 2 s in
    // the filter, which /debug/route does not see: let them age out.
    let orca_fresh = Duration::from_millis(2_100);
    let probes = prefixes
        .iter()
        .enumerate()
        .map(|(probe, &(id, blocks))| {
            let body = prefixed_completion(id, blocks, 10 + probe as u32, 2);
            (body, u64::from(blocks))
        })
        .chain([(salted(prefixed_completion(4, 8, 10, 2)), 0)]);
    for (body, cached) in probes {
        std::thread::sleep(orca_fresh);
        let explained = assert_debug_route_matches_the_filter(&stack, &body);
        assert_eq!(
            explained["choice"]["cached_blocks"].as_u64(),
            Some(cached),
            "{explained}"
        );
    }

    // Under load: long streams on prefix 1, left unread so they stay in
    // flight; both sides see them (the filter in its own ledger, the
    // sidecar through the filter's reports).
    let client = http_client();
    let url = format!("{}/v1/completions", stack.envoy.gateway_url());
    let streams: Vec<reqwest::blocking::Response> = (0..6)
        .map(|i| {
            let mut body = prefixed_completion(1, 12, 100 + i, 4_000);
            body["stream"] = json!(true);
            let response = client.post(&url).json(&body).send().unwrap();
            assert_eq!(response.status(), 200);
            response
        })
        .collect();
    std::thread::sleep(orca_fresh);
    for (probe, (id, blocks)) in prefixes.into_iter().enumerate() {
        let body = prefixed_completion(id, blocks, 200 + probe as u32, 2);
        let explained = assert_debug_route_matches_the_filter(&stack, &body);
        let busy = explained["workers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["active_blocks"].as_u64().unwrap_or(0) > 0);
        assert!(busy, "the streams' load is not in the state: {explained}");
        std::thread::sleep(orca_fresh);
    }
    drop(streams);
}

#[test]
fn the_next_turn_of_a_chat_is_routed_from_the_prompt_cache() {
    // One Envoy worker thread: one filter VM, one prompt cache. A loaded
    // machine must not time the first tokenization out (that is
    // `losing_the_sidecar_*`'s subject, not this test's).
    let stack = Stack::start_with(|config| {
        config.worker_threads = 1;
        config.tokenize_timeout_ms = Some(10_000);
    });
    let system = json!({"role": "system", "content": long_text("handbook", 300)});
    let first = json!([system, {"role": "user", "content": "What is section 4?"}]);
    let mut second = first.as_array().unwrap().clone();
    second.push(json!({"role": "assistant", "content": "Section 4 is handbook-4."}));
    second.push(json!({"role": "user", "content": "And section 5?"}));
    let turn = |messages: &Value| json!({"model": MODEL, "messages": messages, "max_tokens": 2});

    let cold = stack.send("/v1/chat/completions", &turn(&first));
    assert_eq!(stack.counter("kvmesh_prompt_cache_misses"), 1);
    assert_eq!(stack.counter("kvmesh_prompt_cache_hits"), 0);
    stack.wait_indexed(&turn(&json!(second)), 16);
    let calls_before = stack.counter("kvmesh_tokenize_calls");

    let warm = stack.send("/v1/chat/completions", &turn(&json!(second)));
    // Routed at once from the cached history, precisely, to its holder.
    assert_eq!(stack.counter("kvmesh_prompt_cache_hits"), 1);
    assert_eq!(stack.counter("kvmesh_prompt_cache_misses"), 1);
    assert_eq!(warm.header("x-kvmesh-mode"), Some("precise"));
    assert_eq!(warm.sim_worker().unwrap(), cold.sim_worker().unwrap());
    assert!(warm.cached_tokens() >= 16 * u64::from(BLOCK));
    // The sidecar was still asked, in the background, so the turn after this
    // one finds this one.
    assert_eq!(stack.counter("kvmesh_tokenize_calls"), calls_before + 1);
    // An identical request is fully cached: no callout at all.
    stack.send("/v1/chat/completions", &turn(&first));
    assert_eq!(stack.counter("kvmesh_prompt_cache_hits"), 2);
    assert_eq!(stack.counter("kvmesh_tokenize_calls"), calls_before + 1);
    assert_eq!(stack.counter("kvmesh_tokenize_failures"), 0);
}

#[test]
fn a_cold_32k_token_chat_never_blocks_the_envoy_thread() {
    // One Envoy worker thread, and a tokenization that cannot finish until
    // the test lets it: every other request must still be served meanwhile.
    let mut stack = Stack::start_with(|config| {
        config.worker_threads = 1;
        config.tokenize_timeout_ms = Some(20_000);
    });
    let history: Vec<Value> = (0..16)
        .flat_map(|i| {
            [
                json!({"role": "user", "content": long_text(&format!("question{i}"), 180)}),
                json!({"role": "assistant", "content": long_text(&format!("answer{i}"), 180)}),
            ]
        })
        .chain([json!({"role": "user", "content": "Summarize all of it."})])
        .collect();
    let cold = json!({"model": MODEL, "messages": history, "max_tokens": 2});
    let tokens = stack.sidecar_tokens(&cold);
    assert!(tokens >= 32_000, "only {tokens} tokens");

    let sidecar_pid = stack.sidecar.process().pid();
    let thaw = || {
        // SAFETY: signalling a child this test started.
        unsafe { libc::kill(sidecar_pid as libc::pid_t, libc::SIGCONT) };
    };
    // SAFETY: as above.
    unsafe { libc::kill(sidecar_pid as libc::pid_t, libc::SIGSTOP) };
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let waiting = scope.spawn(|| {
            let response = stack.send("/v1/chat/completions", &cold);
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            response
        });
        stack.wait_for("the chat to wait for its tokenization", || {
            stack.counter("kvmesh_prompt_cache_misses") == 1
        });
        for i in 0..5 {
            stack.send("/v1/completions", &token_completion(40_000, i));
        }
        let blocked = !done.load(std::sync::atomic::Ordering::SeqCst);
        thaw();
        assert!(blocked, "the chat finished before the sidecar could answer");
        let response = waiting.join().unwrap();
        assert_eq!(response.json().unwrap()["usage"]["prompt_tokens"], tokens);
    });
    assert_eq!(stack.counter("kvmesh_tokenize_failures"), 0);
    // Not asserted (timings are for benchmarks): the longest time the filter
    // held the Envoy thread in one callback, for docs/benchmarks.md.
    // Envoy publishes histograms at its stats flush (every 5 s).
    let mut longest = None;
    stack.wait_for("Envoy to flush the callback histogram", || {
        longest = stack
            .envoy
            .histogram_max("wasmcustom.kvmesh_callback_us")
            .unwrap();
        longest.is_some()
    });
    println!("longest filter callback with a cold {tokens}-token chat: {longest:?} µs");
}

#[test]
fn a_shared_system_prompt_does_not_herd_concurrent_requests() {
    let stack = Stack::start();
    let system = json!({"role": "system", "content": long_text("shared", 400)});
    let warmup = json!({"model": MODEL, "max_tokens": 2,
        "messages": [system, {"role": "user", "content": "warm up"}]});
    stack.send("/v1/chat/completions", &warmup);
    stack.wait_indexed(&warmup, 16);

    let counts: HashMap<String, usize> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..24)
            .map(|i| {
                let body = json!({"model": MODEL, "max_tokens": 48,
                    "messages": [system, {"role": "user", "content": format!("question {i}")}]});
                let stack = &stack;
                scope.spawn(move || {
                    stack
                        .send("/v1/chat/completions", &body)
                        .sim_worker()
                        .unwrap()
                })
            })
            .collect();
        let mut counts = HashMap::new();
        for handle in handles {
            *counts.entry(handle.join().unwrap()).or_insert(0) += 1;
        }
        counts
    });
    assert!(
        counts.len() >= 2,
        "all 24 requests herded onto one worker: {counts:?}"
    );
    assert!(
        counts.values().all(|&n| n <= 20),
        "one worker took almost everything: {counts:?}"
    );
}

#[test]
fn losing_the_sidecar_fails_open_and_recovery_restores_precise_routing() {
    let mut stack = Stack::start();
    let base = 20_000;
    let body = |i: u32| token_completion(base, i);
    let vms = stack.envoy.config().filter_vms();
    assert_eq!(stack.counter("kvmesh_state_synced_vms"), vms);
    stack.send("/v1/completions", &body(0));
    assert_eq!(stack.counter("kvmesh_requests_precise"), 1);

    stack.sidecar.process().kill();
    // Past the staleness limit every request still succeeds, by approximate
    // routing, and the gauge says no VM holds fleet state.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(stack.counter("kvmesh_state_synced_vms"), 0);
    for i in 1..6 {
        stack.send("/v1/completions", &body(i));
    }
    assert_eq!(stack.counter("kvmesh_requests_precise"), 1);
    assert!(stack.counter("kvmesh_requests_approximate") >= 5);
    assert!(stack.counter("kvmesh_requests_stale_state") >= 5);

    stack.sidecar.restart().unwrap();
    stack.sidecar.wait_ready(SETTLE).unwrap();
    stack.wait_for_precise_again(base);
    stack.wait_for("every VM to hold fleet state again", || {
        stack.counter("kvmesh_state_synced_vms") == vms
    });
    assert_eq!(stack.workers.len(), WORKERS);
}

/// A NATS server that hangs (SIGSTOP: connections stay up, nothing moves)
/// gives no client a reason to reconnect for seconds. The sidecar's probe
/// of its own feed stops coming back: the silence is the sidecar's, so it
/// keeps the workers and says the fleet is unheard.
#[test]
fn a_hung_nats_keeps_the_workers_and_routes_approximately_until_it_delivers_again() {
    let mut stack = Stack::start();
    let base = 60_000;
    let body = |i: u32| token_completion(base, i);
    stack.send("/v1/completions", &body(0));
    assert_eq!(stack.counter("kvmesh_requests_precise"), 1);
    let vms = stack.envoy.config().filter_vms();

    stack.nats.process().signal(libc::SIGSTOP);
    let hung_at = Instant::now();
    stack.wait_for("the filters to hear the sidecar lost the fleet", || {
        stack.counter("kvmesh_state_synced_vms") == 0
    });
    println!("fleet unheard {:?} after NATS hung", hung_at.elapsed());
    assert_eq!(stack.sidecar.metric("kvmesh_serve_fleet_unheard", ""), 1.0);
    // The sidecar's explanation of a decision follows the filters'.
    let explained: Value = post_json(
        &http_client(),
        &format!("{}/debug/route", stack.sidecar.http_url()),
        &body(100),
    )
    .unwrap()
    .json()
    .unwrap();
    assert_eq!(explained["mode"], "approximate", "{explained}");
    // Past the sidecar's worker timeout (2.5 s).
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(stack.sidecar.known_workers().unwrap(), WORKERS);
    let (approximate, fallback) = (
        stack.counter("kvmesh_requests_approximate"),
        stack.counter("kvmesh_requests_fallback"),
    );
    for i in 1..6 {
        stack.send("/v1/completions", &body(i));
    }
    assert_eq!(
        stack.counter("kvmesh_requests_approximate"),
        approximate + 5
    );
    assert_eq!(stack.counter("kvmesh_requests_fallback"), fallback);
    assert_eq!(stack.counter("kvmesh_requests_precise"), 1);

    stack.nats.process().signal(libc::SIGCONT);
    stack.wait_for_precise_again(base);
    stack.wait_for("every VM to hold current fleet state again", || {
        stack.counter("kvmesh_state_synced_vms") == vms
    });
    assert_eq!(stack.sidecar.known_workers().unwrap(), WORKERS);
}

/// With NATS healthy and every relay gone, nothing but the sidecar's own
/// probe comes through: that proves the silence is the workers', and they
/// expire, with the fleet heard all along.
#[test]
fn workers_whose_relays_all_died_expire_while_nats_delivers() {
    let mut stack = Stack::start();
    let vms = stack.envoy.config().filter_vms();
    for worker in &mut stack.workers {
        worker.relay.process().kill();
    }
    stack.wait_for("the sidecar to expire the silent workers", || {
        stack.sidecar.known_workers().unwrap_or(usize::MAX) == 0
    });
    assert_eq!(stack.sidecar.metric("kvmesh_serve_fleet_unheard", ""), 0.0);
    assert_eq!(stack.counter("kvmesh_state_synced_vms"), vms);
}

#[test]
fn a_quiet_fleet_keeps_the_filters_fresh() {
    // No relays: nothing changes, and only the sidecar's keepalive deltas
    // tell the filters their state is current.
    let nats = NatsServer::start().unwrap();
    let sim =
        kvmesh_stack::harness::SimEngine::start(SimEngineOptions::new(MODEL, "lone")).unwrap();
    let model = SidecarModel {
        name: MODEL.to_owned(),
        block_size: BLOCK,
        tokenizer: None,
    };
    let mut sidecar = Sidecar::start(&nats.url(), &[model], "").unwrap();
    sidecar.wait_ready(SETTLE).unwrap();
    let mut config =
        GatewayConfig::new(vec![ModelRoute::new(MODEL, BLOCK, vec![sim.address()])]).unwrap();
    config.sidecar = Some(sidecar.endpoints());
    let envoy = Envoy::start(config).unwrap();
    // Longer than the filters' staleness limit (3 s in the harness).
    std::thread::sleep(Duration::from_secs(5));
    let applied = envoy
        .stat("wasmcustom.kvmesh_state_updates_applied")
        .unwrap();
    assert!(applied >= 8, "only {applied} updates in 5 s across two VMs");
    assert_eq!(
        envoy.stat("wasmcustom.kvmesh_state_synced_vms").unwrap(),
        envoy.config().filter_vms(),
        "a quiet stream is not a stale one"
    );
    let tokens: Vec<u32> = (0..64).collect();
    let body = json!({"model": MODEL, "prompt": tokens, "max_tokens": 2});
    let response = post_json(
        &http_client(),
        &format!("{}/v1/completions", envoy.gateway_url()),
        &body,
    )
    .unwrap();
    assert_eq!(response.status, 200, "{}", response.text);
    assert_eq!(
        envoy
            .stat("wasmcustom.kvmesh_requests_stale_state")
            .unwrap(),
        0
    );
    // No registered worker: no precise choice; the configured endpoints
    // and the learned table serve it.
    assert_eq!(
        envoy
            .stat("wasmcustom.kvmesh_requests_approximate")
            .unwrap(),
        1
    );
    assert_eq!(
        envoy.stat("wasmcustom.kvmesh_requests_fallback").unwrap(),
        0
    );
}

/// A sidecar may serve more models than one gateway routes: the other
/// models' updates are skipped, not taken for a broken stream (which would
/// drop it, and with it the fleet state, at every snapshot).
#[test]
fn a_gateway_routing_fewer_models_than_its_sidecar_keeps_its_state_stream() {
    let nats = NatsServer::start().unwrap();
    let sim =
        kvmesh_stack::harness::SimEngine::start(SimEngineOptions::new(MODEL, "lone")).unwrap();
    let spec = |name: &str| SidecarModel {
        name: name.to_owned(),
        block_size: BLOCK,
        tokenizer: None,
    };
    let mut sidecar = Sidecar::start(&nats.url(), &[spec(MODEL), spec("other-model")], "").unwrap();
    sidecar.wait_ready(SETTLE).unwrap();
    let mut config =
        GatewayConfig::new(vec![ModelRoute::new(MODEL, BLOCK, vec![sim.address()])]).unwrap();
    config.sidecar = Some(sidecar.endpoints());
    let envoy = Envoy::start(config).unwrap();
    let vms = envoy.config().filter_vms();
    let stat = |name: &str| envoy.stat(&format!("wasmcustom.{name}")).unwrap();
    poll_until("every VM to hold fleet state", SETTLE, || {
        stat("kvmesh_state_synced_vms") == vms
    })
    .unwrap();
    // Two seconds of both models' keepalives.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(stat("kvmesh_state_update_errors"), 0);
    assert_eq!(stat("kvmesh_state_stream_opened"), vms);
    assert!(stat("kvmesh_state_updates_skipped") >= vms);
    assert_eq!(stat("kvmesh_state_synced_vms"), vms);
}

#[test]
fn losing_nats_routes_approximately_and_recovery_restores_precise_routing() {
    let mut stack = Stack::start();
    let base = 40_000;
    let body = |i: u32| token_completion(base, i);
    stack.send("/v1/completions", &body(0));
    assert_eq!(stack.counter("kvmesh_requests_precise"), 1);

    // Without NATS the sidecar hears nothing, keeps the workers it last
    // heard and tells the filters so: they route approximately (the learned
    // table over the configured endpoints), not by Envoy's fallback, and
    // count no VM as holding current fleet state.
    let vms = stack.envoy.config().filter_vms();
    stack.nats.process().kill();
    stack.wait_for("the filters to hear the sidecar lost the fleet", || {
        stack.counter("kvmesh_state_synced_vms") == 0
    });
    // Past the sidecar's worker timeout (2.5 s): the workers are kept.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(stack.sidecar.known_workers().unwrap(), WORKERS);
    let fallback_before = stack.counter("kvmesh_requests_fallback");
    let approximate_before = stack.counter("kvmesh_requests_approximate");
    let stale_before = stack.counter("kvmesh_requests_stale_state");
    for i in 1..6 {
        stack.send("/v1/completions", &body(i));
    }
    assert_eq!(stack.counter("kvmesh_requests_precise"), 1);
    assert_eq!(stack.counter("kvmesh_requests_fallback"), fallback_before);
    assert_eq!(
        stack.counter("kvmesh_requests_approximate"),
        approximate_before + 5
    );
    assert_eq!(
        stack.counter("kvmesh_requests_stale_state"),
        stale_before + 5
    );

    // Relays and the sidecar reconnect and rebuild; precise routing returns
    // within 5 s of NATS.
    stack.nats.restart().unwrap();
    let back = Instant::now();
    stack.wait_for_precise_again(base);
    let took = back.elapsed();
    println!("precise again {took:?} after NATS returned");
    assert!(
        took < Duration::from_secs(5),
        "precise only {took:?} after NATS returned"
    );
    assert_eq!(stack.counter("kvmesh_state_synced_vms"), vms);
    assert_eq!(stack.sidecar.known_workers().unwrap(), WORKERS);
}

/// One sim-engine API server fronting two data-parallel ranks
/// (`--data-parallel-size 2`), each rank with its own relay
/// (`--data-parallel-rank`) reading the rank's own event socket and metrics
/// series, as vLLM and SGLang deployments with data parallelism run. Both
/// ranks share one address, so only the `X-Data-Parallel-Rank` header the
/// filter sets can send a prompt back to the rank holding its prefix: the
/// engine's own balancer would put every one of these sequential requests
/// on idle rank 0.
#[test]
fn data_parallel_ranks_behind_one_address_are_routed_as_separate_gpus() {
    // Two workers as the two ranks of one engine: the harness starts one
    // sim-engine with `--data-parallel-size 2` on consecutive event ports,
    // and a relay per rank given the engine's configured ports.
    let mut options = StackOptions::new(MODEL, 2).unwrap();
    options.block_size = BLOCK;
    options.sim_args = vec!["--speedup".into(), "20".into()];
    options.data_parallel_size = 2;
    let stack =
        harness::stack::Stack::start(options, |config| config.debug_headers = true).unwrap();
    let sim = &stack.workers[0].sim;
    assert_eq!(stack.worker_addresses(), [sim.address()], "one engine");
    let relays: Vec<_> = stack.workers.iter().map(|w| &w.relay).collect();
    let mut listed: Vec<(String, String, u64)> = stack
        .sidecar
        .workers()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["worker_id"].as_str().unwrap().to_owned(),
                w["address"].as_str().unwrap().to_owned(),
                w["data_parallel_rank"].as_u64().unwrap(),
            )
        })
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        [
            ("worker-0".to_owned(), sim.address(), 0),
            ("worker-1".to_owned(), sim.address(), 1)
        ]
    );

    // Prefix r + 1 warmed on rank r, straight at the engine.
    let blocks = 8;
    let completions = format!("{}/v1/completions", sim.url());
    for rank in 0..2u32 {
        let response = http_client()
            .post(&completions)
            .header("x-data-parallel-rank", rank.to_string())
            .json(&prefixed_completion(rank + 1, blocks, 0, 2))
            .send()
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["x-sim-data-parallel-rank"],
            rank.to_string().as_str()
        );
    }
    let hasher = router_core::BlockHasher::new(
        router_core::BlockSize::new(BLOCK).unwrap(),
        router_core::HashSeed::for_model(MODEL, None),
    );
    let prefix = |id: u32| -> HashSet<u64> {
        let body = prefixed_completion(id, blocks, 0, 2);
        let tokens: Vec<u32> = serde_json::from_value(body["prompt"].clone()).unwrap();
        hasher
            .sequence_hashes(&tokens)
            .iter()
            .map(|h| h.0)
            .collect()
    };
    let (on_rank0, on_rank1) = (prefix(1), prefix(2));
    poll_until(
        "the sidecar to index each rank's own blocks",
        SETTLE,
        || {
            let Ok(indexed) = stack.sidecar.blocks_by_worker() else {
                return false;
            };
            let (Some(rank0), Some(rank1)) = (indexed.get("worker-0"), indexed.get("worker-1"))
            else {
                return false;
            };
            rank0.is_superset(&on_rank0) && rank1.is_superset(&on_rank1)
        },
    )
    .unwrap();
    let indexed = stack.sidecar.blocks_by_worker().unwrap();
    assert!(
        indexed["worker-0"].is_disjoint(&on_rank1),
        "rank 1's events reached rank 0's relay"
    );
    assert!(
        indexed["worker-1"].is_disjoint(&on_rank0),
        "rank 0's events reached rank 1's relay"
    );
    std::thread::sleep(Duration::from_millis(300));

    // Follow-ups through the gateway return to the rank holding them, and a
    // client's own rank header does not survive the filter.
    let gateway_completions = format!("{}/v1/completions", stack.envoy.gateway_url());
    for rank in [1u32, 0, 1] {
        let response = http_client()
            .post(&gateway_completions)
            .header("x-data-parallel-rank", "0")
            .json(&prefixed_completion(rank + 1, blocks, 1 + rank, 2))
            .send()
            .unwrap();
        assert_eq!(response.status(), 200);
        let headers = response.headers().clone();
        let body: Value = response.json().unwrap();
        let cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        assert!(cached >= u64::from(blocks * BLOCK), "rank {rank}: {body}");
        assert_eq!(headers["x-kvmesh-mode"], "precise");
        assert_eq!(
            headers["x-kvmesh-worker"],
            format!("{}#{rank}", sim.address()).as_str()
        );
        assert_eq!(
            headers["x-sim-data-parallel-rank"],
            rank.to_string().as_str()
        );
    }

    // Each rank counted its own prompts, and each relay reads its own
    // series of the engine's one /metrics: a long answer running on rank 1
    // is rank 1's load only.
    let metrics = format!("{}/metrics", sim.url());
    let prompt_tokens = |rank| prometheus_rank_sum(&metrics, "vllm:prompt_tokens_total", rank);
    let prompt = f64::from((blocks + 1) * BLOCK);
    assert_eq!(prompt_tokens(0), 2.0 * prompt);
    assert_eq!(prompt_tokens(1), 3.0 * prompt);
    let mut long = prefixed_completion(9, 1, 0, 20_000);
    long["stream"] = json!(true);
    let running = http_client()
        .post(&completions)
        .header("x-data-parallel-rank", "1")
        .json(&long)
        .send()
        .unwrap();
    assert_eq!(running.status(), 200);
    let running_by_worker = || -> BTreeMap<String, u64> {
        stack
            .sidecar
            .workers()
            .unwrap()
            .iter()
            .map(|w| {
                let id = w["worker_id"].as_str().unwrap().to_owned();
                (id, w["load"]["running"].as_u64().unwrap())
            })
            .collect()
    };
    let expected = BTreeMap::from([("worker-0".to_owned(), 0), ("worker-1".to_owned(), 1)]);
    poll_until(
        "the running request to be rank 1's load only",
        SETTLE,
        || running_by_worker() == expected,
    )
    .unwrap();
    drop(running);
    for relay in relays {
        assert_eq!(
            relay.metric("kvmesh_relay_foreign_rank_batches_total", ""),
            0.0
        );
        assert_eq!(
            relay.metric("kvmesh_relay_load_scrape_errors_total", ""),
            0.0
        );
    }
    assert_eq!(
        stack
            .envoy
            .stat("wasmcustom.kvmesh_forged_headers_removed")
            .unwrap(),
        3
    );
}
