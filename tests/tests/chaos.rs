//! Chaos under load: two gateways (each Envoy with the compiled filter and
//! its own `kv-sidecar serve`), a three-node NATS cluster, and sim-engines
//! with their relays. Each component is killed and restarted in turn while
//! clients keep sending through both gateways. No request fails except those
//! in flight on a killed engine, and once the fleet settles both gateways'
//! views equal the engines' caches.
// Integration test: its helpers fail the test by panicking, like its tests
// (clippy.toml allows that in test functions only).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use kvmesh_stack::harness::client::{http_client, post_json};
use kvmesh_stack::harness::fleet::KvWorker;
use kvmesh_stack::harness::nats::NatsCluster;
use kvmesh_stack::harness::sidecar::{Sidecar, SidecarModel};
use kvmesh_stack::harness::sim::SimEngineOptions;
use kvmesh_stack::harness::{Envoy, GatewayConfig, ModelRoute};
use serde_json::json;

const MODEL: &str = "qwen3";
const BLOCK: u32 = 16;
const WORKERS: usize = 3;
/// Client loops per gateway.
const CLIENTS: u32 = 3;
/// How long each component stays dead, and how long the fleet runs between.
const DOWN: Duration = Duration::from_secs(3);
const SETTLE: Duration = Duration::from_secs(30);

struct Gateway {
    envoy: Envoy,
    sidecar: Sidecar,
}

struct Outcome {
    started: Instant,
    ended: Instant,
    status: u16,
}

fn start_gateway(nats_urls: &str, route: ModelRoute) -> Gateway {
    let model = SidecarModel {
        name: MODEL.into(),
        block_size: BLOCK,
        tokenizer: None,
    };
    let mut sidecar = Sidecar::start(nats_urls, &[model], "").unwrap();
    sidecar.wait_ready(SETTLE).unwrap();
    let mut config = GatewayConfig::new(vec![route]).unwrap();
    config.sidecar = Some(sidecar.endpoints());
    Gateway {
        envoy: Envoy::start(config).unwrap(),
        sidecar,
    }
}

/// Client loops over both gateways until `stop`.
fn run_load(urls: Vec<String>, stop: Arc<AtomicBool>) -> Vec<Outcome> {
    let loops: Vec<_> = urls
        .into_iter()
        .enumerate()
        .flat_map(|(g, url)| (0..CLIENTS).map(move |c| (g as u32 * CLIENTS + c, url.clone())))
        .map(|(client, url)| {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let http = http_client();
                let mut outcomes = Vec::new();
                // Bounded in count as well as by `stop`.
                for i in 0..20_000u32 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    // Prompts share prefixes, so the index has work to do.
                    let tokens: Vec<u32> = (0..64)
                        .map(|t| {
                            if t < 32 {
                                (i % 7) * 1_000 + t
                            } else {
                                client * 1_000_000 + i * 64 + t
                            }
                        })
                        .collect();
                    let body = json!({"model": MODEL, "prompt": tokens, "max_tokens": 4});
                    let started = Instant::now();
                    let status = post_json(&http, &url, &body).map_or(0, |r| r.status);
                    outcomes.push(Outcome {
                        started,
                        ended: Instant::now(),
                        status,
                    });
                    thread::sleep(Duration::from_millis(5));
                }
                outcomes
            })
        })
        .collect();
    loops.into_iter().flat_map(|l| l.join().unwrap()).collect()
}

/// Engines' caches by worker id, the ground truth.
fn engine_caches(workers: &[KvWorker]) -> BTreeMap<String, HashSet<u64>> {
    workers
        .iter()
        .map(|w| {
            (
                w.sim.worker_id().to_owned(),
                w.sim.cached_seq_hashes().unwrap(),
            )
        })
        .collect()
}

#[test]
fn every_component_killed_in_turn_costs_only_in_flight_engine_requests() {
    let mut nats = NatsCluster::start(3).unwrap();
    let urls = nats.urls();
    let mut workers: Vec<KvWorker> = (0..WORKERS)
        .map(|i| {
            let options = SimEngineOptions::new(MODEL, &format!("w{i}")).args([
                "--speedup",
                "20",
                "--num-gpu-blocks",
                "400",
            ]);
            KvWorker::start(&urls, options, BLOCK).unwrap()
        })
        .collect();
    let route = ModelRoute::new(
        MODEL,
        BLOCK,
        workers.iter().map(|w| w.sim.address()).collect(),
    );
    let mut gateways = [
        start_gateway(&urls, route.clone()),
        start_gateway(&urls, route),
    ];
    let deadline = Instant::now() + SETTLE;
    while gateways
        .iter()
        .any(|g| g.sidecar.known_workers().unwrap_or(0) < WORKERS)
    {
        assert!(
            Instant::now() < deadline,
            "the sidecars never saw every worker"
        );
        thread::sleep(Duration::from_millis(100));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let urls = gateways
            .iter()
            .map(|g| format!("{}/v1/completions", g.envoy.gateway_url()))
            .collect();
        let stop = Arc::clone(&stop);
        thread::spawn(move || run_load(urls, stop))
    };
    thread::sleep(DOWN);

    nats.nodes[0].process().kill();
    thread::sleep(DOWN);
    nats.nodes[0].restart().unwrap();
    nats.wait_meshed(SETTLE).unwrap();
    thread::sleep(DOWN);

    gateways[0].sidecar.process().kill();
    thread::sleep(DOWN);
    gateways[0].sidecar.restart().unwrap();
    thread::sleep(DOWN);

    workers[1].relay.process().kill();
    thread::sleep(DOWN);
    workers[1].relay.restart().unwrap();
    thread::sleep(DOWN);

    // A request in flight can fail as soon as the signal lands, before
    // kill() has reaped the process: bracket the kill.
    let kill_started = Instant::now();
    workers[2].sim.process().unwrap().kill();
    let kill_done = Instant::now();
    thread::sleep(DOWN);
    workers[2].sim.restart().unwrap();
    thread::sleep(DOWN);

    stop.store(true, Ordering::Relaxed);
    let outcomes = load.join().unwrap();
    let failures: Vec<&Outcome> = outcomes.iter().filter(|o| o.status != 200).collect();
    println!("{} requests, {} failed", outcomes.len(), failures.len());
    let offset = |at: Instant| -> f64 {
        if at >= kill_started {
            at.duration_since(kill_started).as_secs_f64()
        } else {
            -kill_started.duration_since(at).as_secs_f64()
        }
    };
    for failure in &failures {
        println!(
            "failed ({}): started {:+.3} s, ended {:+.3} s from the engine kill",
            failure.status,
            offset(failure.started),
            offset(failure.ended)
        );
    }
    // A request Envoy writes onto a pooled connection in the instant before
    // it sees that connection reset is in flight on the dead engine too.
    let in_flight_until = kill_done + Duration::from_millis(100);
    for failure in &failures {
        assert!(
            failure.started <= in_flight_until && failure.ended >= kill_started,
            "a request not in flight on the killed engine failed ({}): started {:+.3} s, ended {:+.3} s from the kill",
            failure.status,
            offset(failure.started),
            offset(failure.ended)
        );
    }
    assert!(failures.len() <= (2 * CLIENTS) as usize);

    // Both gateways' views converge on the engines' caches.
    let deadline = Instant::now() + SETTLE;
    loop {
        let truth = engine_caches(&workers);
        let views: Vec<_> = gateways
            .iter()
            .map(|g| g.sidecar.blocks_by_worker().unwrap_or_default())
            .collect();
        let agree = views.iter().all(|view| {
            truth
                .iter()
                .all(|(worker, blocks)| view.get(worker).cloned().unwrap_or_default() == *blocks)
        });
        if agree {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "views did not converge: engines {:?}, gateways {:?}",
            truth.iter().map(|(w, b)| (w, b.len())).collect::<Vec<_>>(),
            views
                .iter()
                .map(|v| v
                    .iter()
                    .map(|(w, b)| (w.clone(), b.len()))
                    .collect::<Vec<_>>())
                .collect::<Vec<_>>()
        );
        thread::sleep(Duration::from_millis(200));
    }
}
