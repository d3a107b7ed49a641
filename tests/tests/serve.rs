//! End to end for `kv-sidecar serve`: real nats-server, sim-engines with their
//! relays, and the sidecar. Its index (read through the gRPC state stream)
//! must equal the union of the engines' own caches; a replica following the
//! stream must equal the sidecar; dead workers leave within 3 s.
// Integration test: its helpers fail the test by panicking, like its tests
// (clippy.toml allows that in test functions only).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kv_sidecar::serve::stream::StateStreamClient;
use kvmesh_stack::harness::fleet::KvWorker;
use kvmesh_stack::harness::nats_tap::NatsTap;
use kvmesh_stack::harness::relay::Relay;
use kvmesh_stack::harness::sidecar::{blocks_by_worker, Sidecar, SidecarModel};
use kvmesh_stack::harness::sim::SimEngineOptions;
use kvmesh_stack::harness::{NatsServer, SimEngine};
use router_core::fleet::FleetView;
use router_core::gateway::{gateway_report, GatewayHello, GatewayReport, RoutingDecision};
use router_core::state_stream::{state_update, StateUpdate};
use serde_json::Value;
use tokio::sync::mpsc;

const MODEL: &str = "sim-model";
const BLOCK: u32 = 16;
const SETTLE: Duration = Duration::from_secs(30);

struct Worker {
    sim: SimEngine,
    relay: Relay,
}

fn start_worker(nats: &NatsServer, id: &str) -> Worker {
    let options =
        SimEngineOptions::new(MODEL, id).args(["--num-gpu-blocks", "48", "--speedup", "200"]);
    let KvWorker { sim, relay } =
        KvWorker::start(&nats.url(), options, BLOCK).expect("worker and relay start");
    Worker { sim, relay }
}

fn workers_json(sidecar: &Sidecar) -> Vec<Value> {
    sidecar.workers().unwrap_or_default()
}

fn worker_listed(sidecar: &Sidecar, id: &str) -> bool {
    workers_json(sidecar).iter().any(|w| w["worker_id"] == id)
}

/// A replica fed by a gRPC subscription on its own thread and runtime.
struct Replica {
    view: Arc<Mutex<FleetView>>,
    snapshots: Arc<Mutex<u64>>,
    reports: mpsc::Sender<GatewayReport>,
    _runtime: tokio::runtime::Runtime,
}

impl Replica {
    fn follow(url: String) -> Replica {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let view = Arc::new(Mutex::new(FleetView::new(MODEL, usize::MAX)));
        let snapshots = Arc::new(Mutex::new(0));
        let (reports, rx) = mpsc::channel(16);
        let (v, s) = (view.clone(), snapshots.clone());
        runtime.spawn(async move {
            let mut client = StateStreamClient::connect(url).await.expect("gRPC connect");
            let mut stream = client
                .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .expect("subscribe")
                .into_inner();
            while let Ok(Some(update)) = stream.message().await {
                if matches!(update.kind, Some(state_update::Kind::Snapshot(_))) {
                    *s.lock().unwrap() += 1;
                }
                v.lock()
                    .unwrap()
                    .apply(&update)
                    .expect("updates apply in order");
            }
        });
        Replica {
            view,
            snapshots,
            reports,
            _runtime: runtime,
        }
    }

    fn snapshot(&self) -> StateUpdate {
        self.view.lock().unwrap().snapshot()
    }
}

/// Waits until the sidecar's index equals the union of the engines' caches,
/// worker by worker, and the replica equals the sidecar.
fn assert_converges(sidecar: &Sidecar, replica: &Replica, workers: &[&Worker]) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let truth: BTreeMap<String, HashSet<u64>> = workers
            .iter()
            .map(|w| {
                (
                    w.sim.worker_id().to_owned(),
                    w.sim.cached_seq_hashes().expect("/sim/cache"),
                )
            })
            .collect();
        let snapshot = sidecar.state_snapshot().expect("sidecar snapshot");
        let index = blocks_by_worker(&snapshot);
        // Versions aside: an idle sidecar sends an empty delta every second
        // (a keepalive), so the replica and a snapshot taken a moment apart
        // hold the same fleet at versions one apart as often as not.
        let unversioned = |update: StateUpdate| StateUpdate {
            version: 0,
            ..update
        };
        let replica_equal = unversioned(replica.snapshot()) == unversioned(snapshot.clone());
        if index == truth && replica_equal {
            let union: HashSet<u64> = truth.values().flatten().copied().collect();
            assert!(!union.is_empty(), "the workload cached something");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "sidecar index did not converge: index {:?} vs engines {:?}, replica equal {replica_equal}",
            index.iter().map(|(k, v)| (k.clone(), v.len())).collect::<Vec<_>>(),
            truth.iter().map(|(k, v)| (k.clone(), v.len())).collect::<Vec<_>>(),
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn serve_index_equals_engine_caches_stream_replica_follows_and_dead_workers_leave() {
    let nats = NatsServer::start().expect("nats-server starts");
    let mut sidecar = Sidecar::start(
        &nats.url(),
        &[SidecarModel {
            name: MODEL.into(),
            block_size: BLOCK,
            tokenizer: None,
        }],
        "subscriber_buffer: 64",
    )
    .expect("sidecar starts");
    sidecar
        .wait_ready(Duration::from_secs(20))
        .expect("ready with no workers");
    let replica = Replica::follow(sidecar.grpc_url());

    let mut workers: Vec<Worker> = (0..4)
        .map(|i| start_worker(&nats, &format!("w{i}")))
        .collect();
    for (round, worker) in workers.iter().enumerate() {
        worker
            .sim
            .run_eviction_workload(round as u32, 12)
            .expect("workload");
    }
    assert_converges(&sidecar, &replica, &workers.iter().collect::<Vec<_>>());
    let listed = workers_json(&sidecar);
    assert_eq!(listed.len(), 4, "{listed:?}");
    assert!(listed.iter().all(|w| w["in_sync"] == true), "{listed:?}");

    // Gateway decisions raise predicted load, seen by the replica.
    replica
        .reports
        .blocking_send(GatewayReport {
            kind: Some(gateway_report::Kind::Hello(GatewayHello {
                gateway_id: "gw-test".into(),
            })),
        })
        .unwrap();
    replica
        .reports
        .blocking_send(GatewayReport {
            kind: Some(gateway_report::Kind::Decision(RoutingDecision {
                model: MODEL.into(),
                request_id: "r1".into(),
                worker_id: "w1".into(),
                prefill_worker_id: String::new(),
                prompt_blocks: 7,
                cached_blocks: 2,
                prefill_tokens: 80,
                computing: Vec::new(),
            })),
        })
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let load = replica
            .view
            .lock()
            .unwrap()
            .worker("w1")
            .map(|w| w.load.clone());
        if load
            .as_ref()
            .is_some_and(|l| l.active_blocks == 7 && l.queued_prefill_tokens == 80)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "predicted load not streamed: {load:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Malformed NATS messages are counted and skipped.
    let tap = NatsTap::subscribe(&nats.url(), "kvmesh.>").unwrap();
    tap.publish(
        &format!("kvmesh.events.{MODEL}.w0"),
        b"\xff\xff not protobuf",
    )
    .unwrap();
    tap.publish(&format!("kvmesh.workers.{MODEL}"), b"\x0a\xff")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while sidecar.metric("kvmesh_serve_malformed_messages_total", "events") < 1.0
        || sidecar.metric("kvmesh_serve_malformed_messages_total", "workers") < 1.0
    {
        assert!(Instant::now() < deadline, "malformed messages not counted");
        std::thread::sleep(Duration::from_millis(50));
    }

    // A dead worker (engine and relay) leaves within 3 s.
    let mut dead = workers.remove(3);
    dead.relay.process().kill();
    let killed = Instant::now();
    dead.sim.process().unwrap().kill();
    while worker_listed(&sidecar, "w3") {
        assert!(
            killed.elapsed() < Duration::from_secs(3),
            "w3 still listed after 3 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "w3 removed {:?} after its relay was killed",
        killed.elapsed()
    );
    drop(dead);

    // Restarted, it comes back, and the index follows its new cache.
    let restarted = start_worker(&nats, "w3");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !worker_listed(&sidecar, "w3") {
        assert!(Instant::now() < deadline, "w3 did not come back");
        std::thread::sleep(Duration::from_millis(50));
    }
    restarted
        .sim
        .run_eviction_workload(7, 10)
        .expect("workload");
    workers.push(restarted);
    for (round, worker) in workers.iter().enumerate().take(2) {
        worker
            .sim
            .run_eviction_workload(20 + round as u32, 6)
            .expect("workload");
    }
    assert_converges(&sidecar, &replica, &workers.iter().collect::<Vec<_>>());
    assert!(*replica.snapshots.lock().unwrap() >= 1);
}
