//! End to end: real nats-server, real `kv-sidecar relay`, real sim-engine.
//! A NATS subscriber rebuilds each worker's block set from the relay's
//! messages only, and it must equal the engine's own `/sim/cache`, through
//! evictions, dropped batches, engine restarts and NATS restarts.
// Integration test: its helpers fail the test by panicking, like its tests
// (clippy.toml allows that in test functions only).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use kvmesh_stack::harness::fleet::KvWorker;
use kvmesh_stack::harness::nats_tap::NatsTap;
use kvmesh_stack::harness::relay::{Relay, RelayOptions};
use kvmesh_stack::harness::sim::SimEngineOptions;
use kvmesh_stack::harness::{readiness, NatsServer, SimEngine};
use router_core::protocol::{
    kv_event::Kind, subjects, ApplyOutcome, KvEventBatch, Message, WorkerInfo, WorkerLoad,
    WorkerView,
};
use serde_json::{json, Value};

const MODEL: &str = "sim-model";
const BLOCK: u32 = 16;
const SETTLE: Duration = Duration::from_secs(20);

struct Worker {
    sim: SimEngine,
    relay: Relay,
    view: WorkerView,
    resets: u64,
    full_states: u64,
}

fn start_worker(nats: &NatsServer, id: &str, extra_sim_args: &[&str]) -> Worker {
    let options = SimEngineOptions::new(MODEL, id)
        .args(["--num-gpu-blocks", "48", "--speedup", "200"])
        .args(extra_sim_args.iter().copied());
    let KvWorker { sim, relay } =
        KvWorker::start(&nats.url(), options, BLOCK).expect("worker and relay start");
    Worker {
        sim,
        relay,
        view: WorkerView::new(),
        resets: 0,
        full_states: 0,
    }
}

fn apply(tap: &NatsTap, workers: &mut [&mut Worker]) {
    for message in tap.drain() {
        if !message.subject.contains(".events.") {
            continue;
        }
        let batch = KvEventBatch::decode(message.payload.as_slice())
            .expect("relay publishes valid protobuf");
        let Some(worker) = workers
            .iter_mut()
            .find(|w| w.sim.worker_id() == batch.worker_id)
        else {
            continue;
        };
        for event in &batch.events {
            match &event.kind {
                Some(Kind::Reset(_)) => worker.resets += 1,
                Some(Kind::FullState(part)) if part.part == 0 => worker.full_states += 1,
                _ => {}
            }
        }
        worker.view.apply(&batch);
    }
}

/// Waits until every worker's rebuilt view is in sync and equals its cache.
fn assert_views_converge(tap: &NatsTap, workers: &mut [&mut Worker]) {
    let deadline = Instant::now() + SETTLE;
    loop {
        apply(tap, workers);
        let mismatched: Vec<String> = workers
            .iter()
            .filter_map(|w| {
                let truth = w.sim.cached_seq_hashes().expect("/sim/cache");
                let ok = w.view.outcome() == ApplyOutcome::InSync && w.view.blocks() == &truth;
                (!ok).then(|| {
                    format!(
                        "{}: view {} blocks ({:?}), engine {} blocks, missing {}, extra {}",
                        w.sim.worker_id(),
                        w.view.blocks().len(),
                        w.view.outcome(),
                        truth.len(),
                        truth.difference(w.view.blocks()).count(),
                        w.view.blocks().difference(&truth).count()
                    )
                })
            })
            .collect();
        if mismatched.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "views did not converge: {mismatched:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn set_faults(sim: &SimEngine, faults: Value) {
    let response = reqwest::blocking::Client::new()
        .post(format!("{}/sim/faults", sim.url()))
        .json(&faults)
        .send()
        .expect("POST /sim/faults");
    assert!(response.status().is_success());
}

#[test]
fn subscriber_rebuilds_each_worker_through_evictions_and_dropped_batches() {
    let nats = NatsServer::start().expect("nats-server starts");
    let tap = NatsTap::subscribe(&nats.url(), "kvmesh.>").expect("tap subscribes");
    let mut a = start_worker(&nats, "w-a", &["--kv-events-format", "array"]);
    let mut b = start_worker(&nats, "w-b", &["--kv-events-format", "map"]);

    a.sim.run_eviction_workload(0, 30).expect("workload");
    b.sim.run_eviction_workload(1, 30).expect("workload");
    assert_views_converge(&tap, &mut [&mut a, &mut b]);
    assert!(
        a.view.blocks().len() > 20,
        "the workload should fill the cache"
    );

    // Every third batch is withheld from the PUB socket; the relay must see
    // the holes and fill them from the replay socket.
    set_faults(&a.sim, json!({"drop_every": 3}));
    a.sim.run_eviction_workload(2, 30).expect("workload");
    set_faults(&a.sim, json!({"drop_every": null}));
    a.sim.run_eviction_workload(3, 3).expect("workload");
    assert_views_converge(&tap, &mut [&mut a, &mut b]);
    assert!(
        a.relay.metric("kvmesh_relay_gaps_total", "") > 0.0,
        "gaps counted"
    );
    assert!(
        a.relay
            .metric("kvmesh_relay_replays_total", "result=\"ok\"")
            > 0.0,
        "replays succeeded"
    );
    assert_eq!(
        a.relay.metric("kvmesh_relay_resets_total", "events_lost"),
        0.0,
        "no reset needed"
    );
    assert_eq!(a.relay.metric("kvmesh_relay_decode_errors_total", ""), 0.0);

    // Registration, heartbeats and load arrive on their subjects.
    // Heartbeats are sent every second.
    std::thread::sleep(Duration::from_millis(1200));
    let messages = tap.drain();
    let info = messages
        .iter()
        .filter(|m| m.subject == subjects::workers("kvmesh", MODEL))
        .filter_map(|m| WorkerInfo::decode(m.payload.as_slice()).ok())
        .find(|i| i.worker_id == "w-b")
        .expect("heartbeat of w-b");
    assert_eq!(info.address, b.sim.address());
    assert_eq!(info.block_size, BLOCK);
    let load = messages
        .iter()
        .filter(|m| m.subject == subjects::load("kvmesh", MODEL, "w-a"))
        .rev()
        .find_map(|m| WorkerLoad::decode(m.payload.as_slice()).ok())
        .expect("load of w-a");
    assert!((0.0..=1.0).contains(&load.kv_usage));
}

#[test]
fn engine_restart_yields_a_reset_and_a_correct_view() {
    let nats = NatsServer::start().expect("nats-server starts");
    let tap = NatsTap::subscribe(&nats.url(), "kvmesh.>").expect("tap subscribes");
    let mut w = start_worker(&nats, "w-r", &[]);
    w.sim.run_eviction_workload(0, 12).expect("workload");
    assert_views_converge(&tap, &mut [&mut w]);
    let resets_before = w.resets;

    w.sim.restart().expect("sim restarts");
    w.sim.run_eviction_workload(1, 12).expect("workload");
    assert_views_converge(&tap, &mut [&mut w]);
    assert!(w.resets > resets_before, "a restart must publish a reset");
    assert!(
        w.relay
            .metric("kvmesh_relay_resets_total", "engine_restarted")
            >= 1.0
    );
}

#[test]
fn nats_restart_is_survived_with_a_correct_view() {
    let mut nats = NatsServer::start().expect("nats-server starts");
    let tap = NatsTap::subscribe(&nats.url(), "kvmesh.>").expect("tap subscribes");
    let mut w = start_worker(&nats, "w-n", &[]);
    w.sim.run_eviction_workload(0, 12).expect("workload");
    assert_views_converge(&tap, &mut [&mut w]);

    // Same port, new server: subscribers and the relay both reconnect.
    nats.process().kill();
    w.sim.run_eviction_workload(1, 8).expect("workload"); // events while NATS is down
    nats.restart().expect("nats restarts");

    let deadline = Instant::now() + SETTLE;
    while tap.connects() < 2 {
        assert!(Instant::now() < deadline, "tap did not reconnect");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The relay re-announces itself with a full state after reconnecting; ask
    // once more in case it did before the tap was back.
    std::thread::sleep(Duration::from_millis(500));
    tap.publish(&subjects::sync("kvmesh", MODEL, "w-n"), b"")
        .expect("sync request");
    w.sim.run_eviction_workload(2, 4).expect("workload");
    assert_views_converge(&tap, &mut [&mut w]);
    assert!(w.full_states >= 1, "a full state rebuilt the view");
}

/// A fake engine: a real ZMQ PUB socket that sends whatever frames the test
/// wants, garbage included.
struct FakeEngine {
    runtime: tokio::runtime::Runtime,
    socket: zeromq::PubSocket,
}

impl FakeEngine {
    fn bind() -> (Self, u16) {
        use zeromq::Socket;
        // Multi-threaded so the socket accepts and handles subscriptions
        // between sends.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let (socket, endpoint) = runtime.block_on(async {
            let mut socket = zeromq::PubSocket::new();
            let endpoint = socket.bind("tcp://127.0.0.1:0").await;
            (socket, endpoint.expect("bind fake engine"))
        });
        let zeromq::Endpoint::Tcp(_, port) = endpoint else {
            panic!("tcp endpoint expected, got {endpoint}");
        };
        (Self { runtime, socket }, port)
    }

    fn send(&mut self, frames: &[&[u8]]) {
        use zeromq::SocketSend;
        let frames: Vec<bytes::Bytes> = frames
            .iter()
            .map(|f| bytes::Bytes::copy_from_slice(f))
            .collect();
        let message = zeromq::ZmqMessage::try_from(frames).expect("at least one frame");
        self.runtime
            .block_on(self.socket.send(message))
            .expect("send");
    }
}

#[test]
fn garbage_on_the_zmq_socket_is_counted_and_skipped() {
    let nats = NatsServer::start().expect("nats-server starts");
    let tap = NatsTap::subscribe(&nats.url(), "kvmesh.>").expect("tap subscribes");
    let (mut engine, port) = FakeEngine::bind();
    let relay = Relay::start(&RelayOptions {
        engine: kvmesh_config::EngineKind::Sglang,
        nats_url: nats.url(),
        worker_id: "w-g".into(),
        model: MODEL.into(),
        address: "127.0.0.1:9".into(),
        block_size: 2,
        zmq_endpoint: Some(format!("tcp://127.0.0.1:{port}")),
        zmq_replay_endpoint: None,
        metrics_url: None,
        extra_args: vec![],
    })
    .expect("relay starts");
    // PUB drops messages until the relay's subscription has arrived.
    std::thread::sleep(Duration::from_millis(500));

    let seq = |n: u64| n.to_be_bytes();
    engine.send(&[b"kv-events", b"short seq", b"\x93"]); // no valid seq frame
    engine.send(&[b"kv-events"]); // topic frame only
    engine.send(&[b"kv-events", &seq(0), b"\xc1\xc1 not msgpack"]);
    // A valid batch: [0, [["BlockStored", [-1], nil, [1, 2], 2]], nil]
    let valid: &[u8] = &[
        0x93, 0x00, 0x91, 0x95, 0xab, b'B', b'l', b'o', b'c', b'k', b'S', b't', b'o', b'r', b'e',
        b'd', 0x91, 0xff, 0xc0, 0x92, 0x01, 0x02, 0x02, 0xc0,
    ];
    engine.send(&[b"kv-events", &seq(1), valid]);

    let expected = router_core::BlockHasher::new(
        router_core::BlockSize::new(2).expect("block size"),
        router_core::HashSeed::for_model(MODEL, None),
    )
    .sequence_hashes(&[1, 2])[0]
        .0;
    let mut view = WorkerView::new();
    let deadline = Instant::now() + SETTLE;
    while !view.blocks().contains(&expected) {
        assert!(
            Instant::now() < deadline,
            "valid batch after garbage never arrived"
        );
        for message in tap.drain() {
            if let Ok(batch) = KvEventBatch::decode(message.payload.as_slice()) {
                if message.subject.contains(".events.") {
                    view.apply(&batch);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(view.outcome(), ApplyOutcome::InSync);
    assert!(relay.metric("kvmesh_relay_decode_errors_total", "") >= 3.0);
    assert!(readiness::http_ok(
        &reqwest::blocking::Client::new(),
        &relay.metrics_url()
    ));
}

/// A fake `trtllm-serve`: answers each `POST /kv_cache_events` with the next
/// queued body (`[]` once they run out), as TensorRT-LLM serializes events.
struct FakeTrtllm {
    port: u16,
    bodies: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<String>>>,
}

impl FakeTrtllm {
    fn start() -> Self {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind fake trtllm");
        let port = listener.local_addr().expect("local addr").port();
        let bodies = std::sync::Arc::new(std::sync::Mutex::new(
            std::collections::VecDeque::<String>::new(),
        ));
        let queue = std::sync::Arc::clone(&bodies);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let mut reader = BufReader::new(stream);
                let mut content_length = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(value) = lower.strip_prefix("content-length:") {
                        content_length = value.trim().parse().unwrap_or(0);
                    }
                }
                let mut request_body = vec![0; content_length];
                let _ = reader.read_exact(&mut request_body);
                let body = queue
                    .lock()
                    .unwrap()
                    .pop_front()
                    .unwrap_or_else(|| "[]".to_owned());
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = reader.get_mut().write_all(response.as_bytes());
            }
        });
        Self { port, bodies }
    }

    fn queue(&self, body: String) {
        self.bodies.lock().unwrap().push_back(body);
    }

    fn drained(&self) -> bool {
        self.bodies.lock().unwrap().is_empty()
    }
}

fn tokens_json(ids: std::ops::Range<u32>) -> Value {
    Value::Array(
        ids.map(|id| json!({"type": "unique_token", "token_id": id, "token_extra_id": 0}))
            .collect(),
    )
}

fn trt_block(hash: Value, ids: std::ops::Range<u32>) -> Value {
    json!({"type": "stored_block", "block_hash": hash, "tokens": tokens_json(ids),
           "cache_level": 0, "priority": 35})
}

fn trt_event(id: u64, data: Value) -> Value {
    json!({"event_id": id, "data": data, "window_size": 4096})
}

/// TensorRT-LLM through the relay's HTTP polling: partial trailing blocks
/// are dropped and the full ones kept, `updated` moves blocks off and back
/// onto the GPU, `v2_sha256` hex hashes work as handles, an undecodable
/// event is skipped without a reset, and an undecodable body resets once,
/// not twice.
#[test]
fn trtllm_partial_blocks_tier_moves_hex_hashes_and_one_reset() {
    let nats = NatsServer::start().expect("nats-server starts");
    let tap = NatsTap::subscribe(&nats.url(), "kvmesh.>").expect("tap subscribes");
    let engine = FakeTrtllm::start();
    let relay = Relay::start(&RelayOptions {
        engine: kvmesh_config::EngineKind::Trtllm,
        nats_url: nats.url(),
        worker_id: "w-t".into(),
        model: MODEL.into(),
        address: "127.0.0.1:9".into(),
        block_size: 2,
        zmq_endpoint: None,
        zmq_replay_endpoint: None,
        metrics_url: None,
        extra_args: vec![
            "--trtllm-url".into(),
            format!("http://127.0.0.1:{}", engine.port),
            "--trtllm-poll-interval".into(),
            "20ms".into(),
        ],
    })
    .expect("relay starts");
    let hasher = router_core::BlockHasher::new(
        router_core::BlockSize::new(2).expect("block size"),
        router_core::HashSeed::for_model(MODEL, None),
    );
    let chain = hasher.sequence_hashes(&[1, 2, 3, 4]);
    let hex_chain = hasher.sequence_hashes(&[7, 8]);
    let hex = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    let cache_level =
        |old: u32, new: u32| json!({"type": "event_diff", "old_value": old, "new_value": new});

    let mut view = WorkerView::new();
    let mut converge = |want: &[u64], what: &str| {
        let want: std::collections::HashSet<u64> = want.iter().copied().collect();
        let deadline = Instant::now() + SETTLE;
        loop {
            for message in tap.drain() {
                if message.subject.contains(".events.") {
                    if let Ok(batch) = KvEventBatch::decode(message.payload.as_slice()) {
                        view.apply(&batch);
                    }
                }
            }
            if engine.drained() && view.outcome() == ApplyOutcome::InSync && view.blocks() == &want
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: view {:?} ({:?}), want {want:?}",
                view.blocks(),
                view.outcome()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    // Two full blocks and a partial one; then a lone partial block; a chain
    // with hex hashes.
    engine.queue(
        json!([
            trt_event(1, json!({"type": "created", "num_blocks_per_cache_level": [64, 64]})),
            trt_event(2, json!({"type": "stored", "parent_hash": null, "blocks": [
                trt_block(json!(11), 1..3), trt_block(json!(12), 3..5), trt_block(json!(13), 5..6)]})),
            trt_event(3, json!({"type": "stored", "parent_hash": 12, "blocks": [
                trt_block(json!(14), 5..6)]})),
            trt_event(4, json!({"type": "stored", "parent_hash": null, "blocks": [
                trt_block(json!(hex), 7..9)]})),
        ])
        .to_string(),
    );
    converge(&[chain[0].0, chain[1].0, hex_chain[0].0], "stores");

    // Block 12 moves to host memory, then back; an event that does not
    // decode sits in between and is skipped.
    engine.queue(
        json!([trt_event(
            5,
            json!({"type": "updated", "block_hash": 12,
            "cache_level": cache_level(0, 1), "priority": null})
        )])
        .to_string(),
    );
    converge(&[chain[0].0, hex_chain[0].0], "moved off the GPU");
    engine.queue(
        json!([
            trt_event(6, json!({"type": "removed", "block_hashes": "not a list"})),
            trt_event(
                7,
                json!({"type": "updated", "block_hash": 12,
                "cache_level": cache_level(1, 0), "priority": null})
            ),
            trt_event(
                8,
                json!({"type": "removed", "block_hashes": [hex.to_uppercase()]})
            ),
        ])
        .to_string(),
    );
    converge(&[chain[0].0, chain[1].0], "moved back, hex hash removed");
    assert_eq!(
        relay.metric("kvmesh_relay_resets_total", "events_lost"),
        0.0
    );
    assert_eq!(
        relay.metric("kvmesh_relay_skipped_blocks_total", "partial_block"),
        2.0
    );
    assert!(relay.metric("kvmesh_relay_decode_errors_total", "") >= 1.0);

    // A body that does not decode: one reset, and the next poll (ids moved
    // on meanwhile) starts a new sequence without a second one.
    engine.queue("{\"not\": \"a list\"}".to_owned());
    engine.queue(
        json!([trt_event(
            12,
            json!({"type": "stored", "parent_hash": null, "blocks": [
            trt_block(json!(21), 7..9)]})
        )])
        .to_string(),
    );
    converge(&[hex_chain[0].0], "after an undecodable body");
    assert_eq!(
        relay.metric("kvmesh_relay_resets_total", "events_lost"),
        1.0
    );
}

/// A lost connection to an engine that did not restart (its seq and replay
/// buffer go on) keeps the worker's view: the relay applies only the batches
/// it missed. Before, every reconnect reset the view and rebuilt it from the
/// replay buffer, which holds only the last batches, so the prefixes stored
/// earlier (and only hit since, which publishes nothing) left the view.
#[test]
fn lost_connection_to_the_same_engine_keeps_its_view() {
    let nats = NatsServer::start().expect("nats-server starts");
    let tap = NatsTap::subscribe(&nats.url(), "kvmesh.>").expect("tap subscribes");
    let mut w = start_worker(&nats, "w-c", &["--kv-events-replay-buffer", "8"]);
    w.sim.run_eviction_workload(0, 12).expect("workload");
    assert_views_converge(&tap, &mut [&mut w]);
    let resets_before = w.resets;
    let replays = || {
        w.relay
            .metric("kvmesh_relay_replays_total", "result=\"ok\"")
    };
    let replays_before = replays();

    // The publisher drops its subscribers before its next batch, which the
    // relay then misses; the replay buffer still holds it.
    set_faults(&w.sim, json!({"rebind_events": true}));
    w.sim.run_eviction_workload(1, 1).expect("workload");
    let reconnected = Instant::now() + SETTLE;
    while replays() <= replays_before {
        assert!(Instant::now() < reconnected, "the relay never caught up");
        std::thread::sleep(Duration::from_millis(50));
    }
    w.sim.run_eviction_workload(2, 3).expect("workload");
    assert_views_converge(&tap, &mut [&mut w]);
    assert_eq!(w.resets, resets_before, "a lost connection reset the view");
    assert_eq!(
        w.relay
            .metric("kvmesh_relay_resets_total", "engine_restarted"),
        0.0
    );
}
