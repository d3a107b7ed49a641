//! Two gateways sharing load through NATS, as `kvmesh-bench --gateways 2`
//! runs them: each Envoy with the compiled filter and its own `kv-sidecar
//! serve`, one nats-server, sim-engines with their relays. Both route with
//! fleet state, and a request in flight through one gateway is load the
//! other gateway's sidecar — and through it that gateway's filter — sees,
//! as is a prompt one gateway just sent to be computed.
// Integration test: its helpers fail the test by panicking, like its tests
// (clippy.toml allows that in test functions only).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Read;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use kvmesh_stack::harness::client::{http_client, post_json, JsonResponse};
use kvmesh_stack::harness::gateway::wait_for_fleet_state;
use kvmesh_stack::harness::nats_tap::NatsTap;
use kvmesh_stack::harness::readiness::poll_until;
use kvmesh_stack::harness::sidecar::Sidecar;
use kvmesh_stack::harness::stack::{Stack, StackOptions};
use kvmesh_stack::harness::{free_port, Envoy, GatewayConfig};
use prost::Message;
use router_core::gateway::{decisions_subject, gateway_report, SharedReport};
use serde_json::json;

const MODEL: &str = "qwen3";
const WORKERS: usize = 2;
/// Simulated time 10× slower than real time, so a long answer stays in
/// flight for seconds.
const SIM_SPEEDUP: &str = "--speedup=0.1";
/// Tokens of the long request's prompt: 20 blocks of 16.
const LONG_PROMPT_TOKENS: u32 = 320;
const LONG_PROMPT_BLOCKS: u64 = 20;
/// Output tokens of the long request (~60 ms each in real time).
const LONG_ANSWER_TOKENS: u32 = 150;
const SETTLE: Duration = Duration::from_secs(20);

fn completions(envoy: &Envoy) -> String {
    format!("{}/v1/completions", envoy.gateway_url())
}

/// `tokens` token ids of their own, starting at `first`.
fn prompt(first: u32, tokens: u32) -> Vec<u32> {
    (first..first + tokens).collect()
}

/// Predicted active blocks of each worker in the sidecar's fleet state.
fn active_blocks(sidecar: &Sidecar) -> Vec<(String, u64)> {
    sidecar
        .workers()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["worker_id"].as_str().unwrap().to_owned(),
                w["load"]["active_blocks"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn blocks_of(blocks: &[(String, u64)], worker: &str) -> u64 {
    blocks
        .iter()
        .find(|(id, _)| id == worker)
        .map_or(0, |(_, blocks)| *blocks)
}

/// Waits until `check` holds for the sidecar's fleet state.
fn wait_for(sidecar: &Sidecar, what: &str, check: impl Fn(&[(String, u64)]) -> bool) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let blocks = active_blocks(sidecar);
        if check(&blocks) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {blocks:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// A long streamed request through `envoy`, in the background: sends the
/// worker that answers once the headers are in, then reads the answer to
/// its end and returns its status (0 if the answer broke off).
fn long_request(
    envoy: &Envoy,
    first_token: u32,
) -> (mpsc::Receiver<String>, thread::JoinHandle<u16>) {
    request_answering(completions(envoy), first_token, LONG_ANSWER_TOKENS)
}

/// As [`long_request`], to the completions `url`, with an answer of
/// `answer_tokens`.
fn request_answering(
    url: String,
    first_token: u32,
    answer_tokens: u32,
) -> (mpsc::Receiver<String>, thread::JoinHandle<u16>) {
    let body = json!({"model": MODEL, "prompt": prompt(first_token, LONG_PROMPT_TOKENS),
        "max_tokens": answer_tokens, "stream": true});
    let (worker_tx, worker_rx) = mpsc::channel();
    let request = thread::spawn(move || {
        let mut response = http_client().post(url).json(&body).send().unwrap();
        let worker = response
            .headers()
            .get("x-sim-worker-id")
            .and_then(|v| v.to_str().ok())
            .unwrap()
            .to_owned();
        worker_tx.send(worker).unwrap();
        let mut answer = String::new();
        // 0: the answer broke off (its gateway died).
        match response.read_to_string(&mut answer) {
            Ok(_) => response.status().as_u16(),
            Err(_) => 0,
        }
    });
    (worker_rx, request)
}

/// Two gateways, each with its own sidecar, on one NATS, before the
/// slowed-down sim-engines.
fn two_gateways() -> Stack {
    let mut options = StackOptions::new(MODEL, WORKERS).unwrap();
    options.sim_args = vec![SIM_SPEEDUP.to_owned()];
    let mut stack = Stack::start(options, |_| {}).unwrap();
    stack.add_gateway(|_| {}).unwrap();
    stack
}

#[test]
fn gateways_on_one_nats_see_each_others_in_flight_requests() {
    let stack = two_gateways();
    let envoys: Vec<&Envoy> = stack.envoys().collect();
    let sidecars: Vec<&Sidecar> = stack.sidecars().collect();
    assert_eq!((envoys.len(), sidecars.len()), (2, 2));
    assert_ne!(envoys[0].gateway_url(), envoys[1].gateway_url());
    assert_ne!(sidecars[0].http_url(), sidecars[1].http_url());

    // Each gateway answers, routing on its own sidecar's fleet state.
    let http = http_client();
    for (index, envoy) in envoys.iter().enumerate() {
        let body =
            json!({"model": MODEL, "prompt": prompt(1_000 * index as u32, 40), "max_tokens": 2});
        let response = post_json(&http, &completions(envoy), &body).unwrap();
        assert_eq!(response.status, 200, "gateway {index}: {}", response.text);
        assert_eq!(
            envoy.stat("wasmcustom.kvmesh_requests_precise").unwrap(),
            1,
            "gateway {index} did not route on fleet state"
        );
    }
    for sidecar in &sidecars {
        wait_for(sidecar, "the short requests still count", |blocks| {
            blocks.len() == WORKERS && blocks.iter().all(|(_, b)| *b == 0)
        });
    }

    for (from, to) in [(0, 1), (1, 0)] {
        let (worker_rx, request) = long_request(envoys[from], 100_000 * (from as u32 + 1));
        let busy = worker_rx.recv_timeout(SETTLE).unwrap();
        // The other gateway's sidecar heard of the decision only over NATS.
        wait_for(
            sidecars[to],
            "the other gateway's request never showed",
            |blocks| blocks_of(blocks, &busy) >= LONG_PROMPT_BLOCKS,
        );
        // And the other gateway's filter, fed by that sidecar, steers new
        // prompts (no cache anywhere) away from the loaded worker.
        for probe in 0..3u32 {
            assert!(!request.is_finished(), "the long request ended too soon");
            let first = 500_000 + 1_000 * (probe + 10 * from as u32);
            let body = json!({"model": MODEL, "prompt": prompt(first, 48), "max_tokens": 1});
            let response = post_json(&http, &completions(envoys[to]), &body).unwrap();
            assert_eq!(response.status, 200, "{}", response.text);
            assert_ne!(
                response.sim_worker().unwrap(),
                busy,
                "gateway {to} sent probe {probe} to the worker gateway {from} loaded"
            );
        }
        assert_eq!(request.join().unwrap(), 200);
        // Completion is shared too: the load is gone on both sidecars.
        for sidecar in &sidecars {
            wait_for(sidecar, "the finished request still counts", |blocks| {
                blocks_of(blocks, &busy) == 0
            });
        }
    }
    for (index, envoy) in envoys.iter().enumerate() {
        assert_eq!(
            envoy.stat("wasmcustom.kvmesh_requests_fallback").unwrap(),
            0,
            "gateway {index}"
        );
    }
}

/// A request that ends while its gateway's sidecar is down cannot report
/// its completion, but every sidecar heard of its decision (the other one
/// over NATS) and would count its load for `inflight_ttl_ms` (10 minutes):
/// the filter sends the completion once its sidecar is back.
#[test]
fn a_completion_made_while_the_sidecar_was_down_frees_the_load_everywhere() {
    let mut stack = two_gateways();
    let (worker_rx, request) = long_request(&stack.envoy, 700_000);
    let busy = worker_rx.recv_timeout(SETTLE).unwrap();
    let peer = &stack.more_gateways[0].sidecar;
    wait_for(
        peer,
        "the other gateway's sidecar never heard of it",
        |blocks| blocks_of(blocks, &busy) >= LONG_PROMPT_BLOCKS,
    );
    stack.sidecar.process().kill();
    assert!(!request.is_finished(), "the long request ended too soon");
    assert_eq!(request.join().unwrap(), 200);
    stack.sidecar.restart().unwrap();
    let peer = &stack.more_gateways[0].sidecar;
    wait_for(peer, "the finished request still counts", |blocks| {
        blocks_of(blocks, &busy) == 0
    });
}

/// Predicted active blocks over all workers.
fn total_blocks(sidecar: &Sidecar) -> u64 {
    active_blocks(sidecar)
        .iter()
        .map(|(_, blocks)| blocks)
        .sum()
}

/// What breaks the first gateway's sidecar's streams once it has hung.
#[derive(Clone, Copy, PartialEq)]
enum Break {
    /// Killed and started again on the same ports, empty.
    Restart,
    /// Killed for good: its gateway's VMs move to another replica.
    Kill,
}

/// Sends a short and a long request to `url`, which reports to the first
/// sidecar of `stack`, and waits until every sidecar counts both. Hangs that
/// sidecar (SIGSTOP) while the short one finishes, so its completion goes
/// into a stream nobody reads, then breaks it; the sidecars still running
/// must then count exactly the long one, and nothing once it ends.
fn lose_a_completion_with_its_stream(stack: &mut Stack, url: &str, then: Break) {
    // ~2.4 s and ~18 s of answer.
    let (short_rx, short) = request_answering(url.to_owned(), 900_000, 40);
    let (long_rx, long) = request_answering(url.to_owned(), 950_000, 300);
    short_rx.recv_timeout(SETTLE).unwrap();
    long_rx.recv_timeout(SETTLE).unwrap();
    let both = 2 * LONG_PROMPT_BLOCKS;
    for sidecar in stack.sidecars() {
        let deadline = Instant::now() + SETTLE;
        while total_blocks(sidecar) != both {
            assert!(Instant::now() < deadline, "{:?}", active_blocks(sidecar));
            thread::sleep(Duration::from_millis(50));
        }
    }
    stack.sidecar.process().signal(libc::SIGSTOP);
    assert!(!short.is_finished(), "the short request ended too soon");
    assert_eq!(short.join().unwrap(), 200);
    match then {
        Break::Restart => stack.sidecar.restart().unwrap(),
        Break::Kill => stack.sidecar.process().kill(),
    }
    let broken_at = Instant::now();
    // The killed sidecar is the first.
    let dead = usize::from(then == Break::Kill);
    for sidecar in stack.sidecars().skip(dead) {
        let deadline = Instant::now() + SETTLE;
        while total_blocks(sidecar) != LONG_PROMPT_BLOCKS {
            assert!(
                Instant::now() < deadline,
                "{} counts {:?} for one running request",
                sidecar.http_url(),
                active_blocks(sidecar)
            );
            thread::sleep(Duration::from_millis(50));
        }
        assert!(
            !long.is_finished(),
            "the long request ended before the sidecars agreed"
        );
        assert!(sidecar.metric("kvmesh_serve_gateway_reports_total", "resync") >= 1.0);
    }
    println!(
        "open requests resynced {:?} after the break",
        broken_at.elapsed()
    );
    assert_eq!(long.join().unwrap(), 200);
    for sidecar in stack.sidecars().skip(dead) {
        wait_for(sidecar, "the finished request still counts", |blocks| {
            blocks.iter().all(|(_, b)| *b == 0)
        });
    }
}

/// A sidecar counts a gateway's requests from its reports, and a stream that
/// breaks loses what was on it: here the gateway's sidecar hangs while one
/// of two requests finishes, then is killed and restarted, empty. Once the
/// gateway's new stream connects, the gateway tells every sidecar which of
/// its requests are open: the one still running counts again on the
/// restarted sidecar (before: never again), and the finished one stops
/// counting on the other (before: for `inflight_ttl_ms`, 10 minutes).
#[test]
fn after_a_broken_stream_every_sidecar_counts_exactly_the_gateways_open_requests() {
    let mut stack = two_gateways();
    let url = completions(&stack.envoy);
    lose_a_completion_with_its_stream(&mut stack, &url, Break::Restart);
}

/// On Kubernetes, sidecar replicas sit behind one Service: a gateway whose
/// replica dies moves its streams to another, which had heard of its
/// requests only over NATS. Here an Envoy reports to the first of two
/// replicas (the second was down when it started), that one hangs while
/// one of two requests finishes and dies: the other replica then counts
/// exactly the request still running (before: the finished one too, for
/// `inflight_ttl_ms`).
#[test]
fn a_gateway_whose_sidecar_replica_dies_moves_to_another_that_counts_exactly_its_requests() {
    let mut stack = two_gateways();
    let replica = &mut stack.more_gateways[0].sidecar;
    replica.process().kill();
    let mut config = stack.envoy.config().clone();
    config.gateway_port = free_port();
    config.admin_port = free_port();
    config.sidecar_replicas = vec![replica.endpoints()];
    let envoy = Envoy::start(config).unwrap();
    wait_for_fleet_state(&envoy, &stack.sidecar, WORKERS).unwrap();
    let replica = &mut stack.more_gateways[0].sidecar;
    replica.restart().unwrap();
    poll_until("the restarted replica knows the workers", SETTLE, || {
        replica.known_workers().ok() == Some(WORKERS)
    })
    .unwrap();
    lose_a_completion_with_its_stream(&mut stack, &completions(&envoy), Break::Kill);
    assert_eq!(
        envoy.stat("wasmcustom.kvmesh_requests_fallback").unwrap(),
        0
    );
}

/// Envoy killed with requests in flight takes them along (its connections
/// to the engines close), but no filter is left to report their
/// completions, and every sidecar that heard of them (the other one over
/// NATS) would count their load for `inflight_ttl_ms` (10 minutes). The
/// dead gateway's sidecar sees its streams stay closed past
/// `gateway_grace_ms` (15 s) and drops their requests, here and, over NATS,
/// on every other sidecar.
#[test]
fn a_gateway_that_dies_with_requests_in_flight_frees_their_load_everywhere() {
    let mut stack = two_gateways();
    let (worker_rx, request) = long_request(&stack.envoy, 800_000);
    let busy = worker_rx.recv_timeout(SETTLE).unwrap();
    for sidecar in stack.sidecars() {
        wait_for(sidecar, "the long request never showed", |blocks| {
            blocks_of(blocks, &busy) >= LONG_PROMPT_BLOCKS
        });
    }
    stack.envoy.process().kill();
    let killed_at = Instant::now();
    assert_eq!(
        request.join().unwrap(),
        0,
        "the request outlived its gateway"
    );
    let grace = Duration::from_secs(15);
    for sidecar in stack.sidecars() {
        let deadline = killed_at + grace + SETTLE;
        while blocks_of(&active_blocks(sidecar), &busy) > 0 {
            assert!(
                Instant::now() < deadline,
                "the dead gateway's request still counts"
            );
            thread::sleep(Duration::from_millis(100));
        }
        assert!(
            killed_at.elapsed() >= grace,
            "dropped before the grace period ended"
        );
        assert_eq!(
            sidecar.metric("kvmesh_serve_inflight_dropped_total", "gateway_gone"),
            1.0
        );
    }
    println!("load freed {:?} after the kill", killed_at.elapsed());
}

/// Simulated prefill time per prompt token (375× the timing model's), so a
/// prompt stays being computed for seconds: the blocker ~9 s, the shared
/// prompt ~12 s.
const SLOW_PREFILL: &str = "--timing-compute-us-per-token=12000";
/// The prompt both gateways send: 64 blocks, 4 credited strides of 16.
const SHARED_PROMPT_TOKENS: u32 = 1_024;
const SHARED_PROMPT_BLOCKS: &str = "64";
/// A prompt that keeps one worker busy: 48 blocks. Enough load that the
/// second gateway, knowing nothing of the shared prompt, would send it to
/// the other worker; little enough that the credit for the prompt in
/// progress outweighs it (see the costs below). Its queued prefill counts
/// until its first token, so everything must happen within its prefill.
const BLOCKER_TOKENS: u32 = 768;
const BLOCKER_BLOCKS: u64 = 48;
const BLOCKER_PREFILL: Duration = Duration::from_millis(9_200);
/// What the second gateway's decision may still take after the check.
const SLACK: Duration = Duration::from_secs(2);

/// Prompts other routers shared as being computed, credited by `envoy`'s VMs.
fn computing_shared(envoy: &Envoy) -> u64 {
    envoy.stat("wasmcustom.kvmesh_computing_shared").unwrap()
}

fn send_in_background(envoy: &Envoy, prompt: Vec<u32>) -> thread::JoinHandle<JsonResponse> {
    let url = completions(envoy);
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 1});
    thread::spawn(move || post_json(&http_client(), &url, &body).unwrap())
}

#[test]
fn a_prompt_one_gateway_is_computing_draws_the_other_gateways_copy_of_it() {
    let mut options = StackOptions::new(MODEL, WORKERS).unwrap();
    options.sim_args = vec![SLOW_PREFILL.to_owned()];
    let debug = |config: &mut GatewayConfig| config.debug_headers = true;
    let mut stack = Stack::start(options, debug).unwrap();
    stack.add_gateway(debug).unwrap();
    let envoys: Vec<&Envoy> = stack.envoys().collect();
    let sidecars: Vec<&Sidecar> = stack.sidecars().collect();
    let vms = envoys[0].config().filter_vms();
    let decisions =
        NatsTap::subscribe(&stack.nats.url(), &decisions_subject("kvmesh", MODEL)).unwrap();

    // Gateway 0 keeps one worker (`busy`) prefilling a blocker, and both
    // sidecars know its load.
    let blocker_sent = Instant::now();
    let blocker = send_in_background(envoys[0], prompt(1_000_000, BLOCKER_TOKENS));
    for sidecar in &sidecars {
        wait_for(sidecar, "the blocker's load never showed", |blocks| {
            blocks.iter().any(|(_, b)| *b >= BLOCKER_BLOCKS)
        });
    }
    let (busy, _) = active_blocks(sidecars[0])
        .into_iter()
        .find(|(_, b)| *b >= BLOCKER_BLOCKS)
        .unwrap();
    // Every VM but the one that decided it heard of it, and of its load (in
    // the same delta).
    poll_until(
        "the blocker was not shared as being computed",
        SETTLE,
        || computing_shared(envoys[1]) >= vms && computing_shared(envoys[0]) >= vms - 1,
    )
    .unwrap();

    // Gateway 0 sends the shared prompt to the idle worker, whose KV events
    // will show none of it for ~12 s; every other VM hears of it within
    // milliseconds (gateway 0's own other VMs included; the deciding VM
    // skips its own decision coming back).
    let first = send_in_background(envoys[0], prompt(0, SHARED_PROMPT_TOKENS));
    poll_until(
        "the prompt was not shared as being computed",
        SETTLE,
        || computing_shared(envoys[1]) >= 2 * vms && computing_shared(envoys[0]) >= 2 * (vms - 1),
    )
    .unwrap();
    let elapsed = blocker_sent.elapsed();
    eprintln!("the second gateway routes {elapsed:?} after the blocker was sent");
    assert!(
        elapsed < BLOCKER_PREFILL - SLACK && !first.is_finished(),
        "the machine took {elapsed:?} to get here, too close to the blocker's prefill \
         ({BLOCKER_PREFILL:?}): the test would prove nothing"
    );

    // Gateway 1 routes the same prompt. Costs (4 × blocks to prefill +
    // active blocks + the prompt's 64): the blocked worker 4 × (64 + 48) +
    // 48 + 64 = 560; the other, credited with the prompt, 4 × (0 + 64
    // queued) + 64 + 64 = 384 — without the credit 4 × (64 + 64) + 64 + 64
    // = 640, and the prompt would be computed twice.
    let second = post_json(
        &http_client(),
        &completions(envoys[1]),
        &json!({"model": MODEL, "prompt": prompt(0, SHARED_PROMPT_TOKENS), "max_tokens": 1}),
    )
    .unwrap();
    let (first, blocker) = (first.join().unwrap(), blocker.join().unwrap());
    for response in [&first, &second, &blocker] {
        assert_eq!(response.status, 200, "{}", response.text);
    }
    assert_eq!(blocker.sim_worker().unwrap(), busy);
    let computing = first.sim_worker().unwrap();
    assert_ne!(computing, busy);
    assert_eq!(
        second.sim_worker().unwrap(),
        computing,
        "gateway 1 computed the prompt again elsewhere: {:?}",
        second.headers
    );
    assert_eq!(
        second.header("x-kvmesh-cached-blocks"),
        Some(SHARED_PROMPT_BLOCKS)
    );
    // Each shared prompt credited once per VM, never twice by its own.
    assert_eq!(computing_shared(envoys[0]), 2 * (vms - 1));
    assert_eq!(computing_shared(envoys[1]), 2 * vms);
    // Every decision has its own request id, whichever VM made it: VMs
    // seeded from the clock once shared ids, and a sidecar then took r1's
    // decision for a replacement of the blocker's, losing the blocker's load.
    let keys: Vec<(String, String)> = decisions
        .drain()
        .into_iter()
        .filter_map(|message| {
            let shared = SharedReport::decode(message.payload.as_slice()).unwrap();
            match shared.report?.kind? {
                gateway_report::Kind::Decision(d) => Some((shared.gateway_id, d.request_id)),
                _ => None,
            }
        })
        .collect();
    let unique: std::collections::HashSet<&(String, String)> = keys.iter().collect();
    assert_eq!((keys.len(), unique.len()), (3, 3), "{keys:?}");
}
