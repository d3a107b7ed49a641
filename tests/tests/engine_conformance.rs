//! Engine conformance: the engines' own KV event publishers (vLLM's and
//! SGLang's `kv_events` modules from their released wheels, run unchanged)
//! → ZMQ → real `kv-sidecar relay` → real nats-server → real `kv-sidecar
//! serve`. For every release: events published before the relay starts
//! (late start), live events with salts, multimodal blocks and hybrid KV
//! cache groups where the release has them, dropped PUB frames (gaps the
//! relay must replay), undecodable batches inside a replay, a relay
//! restart and an engine restart. After each phase the sidecar's index of the worker must equal
//! the ground truth computed from the events, and no reset may report lost
//! events: replay could repair every gap here. For the newest releases,
//! two data-parallel ranks of one engine as well: each rank's own publisher
//! binds the configured ports plus its rank and stamps its batches, and a
//! relay per rank must index exactly its rank's cache.
// Integration test: its helpers fail the test by panicking, like its tests
// (clippy.toml allows that in test functions only).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use kvmesh_config::EngineKind;
use kvmesh_stack::harness::engine_publisher::{
    Capabilities, EnginePublisher, EngineRelease, HashStyle,
};
use kvmesh_stack::harness::relay::{Relay, RelayOptions};
use kvmesh_stack::harness::sidecar::{Sidecar, SidecarModel};
use kvmesh_stack::harness::NatsServer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use router_core::{BlockHasher, BlockSize, HashSeed, SeqHash};
use serde_json::{json, Value};

const MODEL: &str = "conformance-model";
const BLOCK: u32 = 4;
const SETTLE: Duration = Duration::from_secs(30);

/// One cached chain the workload can extend or evict from.
struct Chain {
    /// Engine hashes, in order.
    blocks: Vec<u64>,
    salt: Option<String>,
    /// Also stored in a sliding-window group (hybrid model).
    hybrid: bool,
    /// Blocks carry this multimodal identifier: they must never show up as
    /// text blocks.
    mm: Option<String>,
    /// Token ids of the whole chain.
    tokens: Vec<u32>,
}

/// The engine's cache as the events describe it, and what kvmesh must
/// index for it.
struct Truth {
    hasher: BlockHasher,
    chains: Vec<Chain>,
    /// Full-attention blocks held: engine hash → kvmesh seq hash (`None`
    /// for multimodal blocks, whose hashes only the relay's folding knows).
    held: HashMap<u64, Option<SeqHash>>,
    next_hash: u64,
    rng: StdRng,
    capabilities: Capabilities,
}

impl Truth {
    fn new(seed: u64, capabilities: Capabilities) -> Self {
        Self {
            hasher: BlockHasher::new(
                BlockSize::new(BLOCK).expect("block size"),
                HashSeed::for_model(MODEL, None),
            ),
            chains: Vec::new(),
            held: HashMap::new(),
            next_hash: 1,
            rng: StdRng::seed_from_u64(seed),
            capabilities,
        }
    }

    /// Unique engine hashes, half of them above 2^63 (negative when signed).
    fn engine_hash(&mut self) -> u64 {
        self.next_hash += 1;
        self.next_hash.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1
    }

    fn seq_hashes(&self, chain: &Chain) -> Vec<SeqHash> {
        let root = chain.salt.as_deref().map(|s| self.hasher.salt_root(s));
        self.hasher.sequence_hashes_after(root, &chain.tokens)
    }

    /// Seq hashes kvmesh must index, and how many multimodal blocks besides.
    fn expected(&self) -> (HashSet<u64>, usize) {
        let text = self.held.values().flatten().map(|s| s.0).collect();
        let mm = self.held.values().filter(|s| s.is_none()).count();
        (text, mm)
    }

    /// Text hashes the multimodal blocks would have without their keys.
    fn mm_lookalikes(&self) -> HashSet<u64> {
        self.chains
            .iter()
            .filter(|c| c.mm.is_some())
            .flat_map(|c| self.seq_hashes(c))
            .map(|s| s.0)
            .collect()
    }

    fn stored(&self, chain: &Chain, from: usize, group: Option<(u32, &str)>) -> Value {
        let tokens = &chain.tokens[from * BLOCK as usize..];
        json!({
            "kind": "stored",
            "hashes": &chain.blocks[from..],
            "parent": if from == 0 { None } else { Some(chain.blocks[from - 1]) },
            "tokens": tokens,
            "block_size": BLOCK,
            "salt": chain.salt,
            "mm": chain.mm,
            "group": group.map(|g| g.0),
            "group_kind": group.map(|g| g.1),
        })
    }

    /// Stores for a chain's blocks from `from` on, in every group it lives in.
    fn store_events(&mut self, chain_index: usize, from: usize) -> Vec<Value> {
        let chain = &self.chains[chain_index];
        let seqs = self.seq_hashes(chain);
        let groups = self.capabilities.groups;
        let mut events = vec![self.stored(chain, from, groups.then_some((0, "full_attention")))];
        if chain.hybrid {
            events.push(self.stored(chain, from, Some((1, "sliding_window"))));
        }
        let mm = chain.mm.is_some();
        let new: Vec<(u64, Option<SeqHash>)> = chain.blocks[from..]
            .iter()
            .zip(&seqs[from..])
            .map(|(h, s)| (*h, (!mm).then_some(*s)))
            .collect();
        self.held.extend(new);
        events
    }

    fn new_chain(&mut self) -> Vec<Value> {
        let blocks = 1 + self.rng.random_range(0..3) as usize;
        let caps = self.capabilities;
        let salt = (caps.salt && self.rng.random_range(0..3) == 0)
            .then(|| format!("tenant-{}", self.rng.random_range(0..2)));
        let mm = (caps.mm && salt.is_none() && self.rng.random_range(0..5) == 0)
            .then(|| format!("image-{}", self.chains.len()));
        let hybrid = caps.groups && mm.is_none() && self.rng.random_range(0..3) == 0;
        // A shared system prompt now and then, so equal tokens with and
        // without salts meet.
        let shared = self.rng.random_range(0..2) == 0;
        let tokens: Vec<u32> = (0..blocks * BLOCK as usize)
            .map(|i| {
                if shared {
                    i as u32
                } else {
                    70_000 + self.rng.random_range(0..50_000) as u32
                }
            })
            .collect();
        let hashes = (0..blocks).map(|_| self.engine_hash()).collect();
        self.chains.push(Chain {
            blocks: hashes,
            salt,
            hybrid,
            mm,
            tokens,
        });
        self.store_events(self.chains.len() - 1, 0)
    }

    fn extend_chain(&mut self) -> Vec<Value> {
        let candidates: Vec<usize> = (0..self.chains.len())
            .filter(|i| {
                let c = &self.chains[*i];
                c.mm.is_none() && c.blocks.last().is_some_and(|h| self.held.contains_key(h))
            })
            .collect();
        if candidates.is_empty() {
            return self.new_chain();
        }
        let index = candidates[self.rng.random_range(0..candidates.len() as u64) as usize];
        let from = self.chains[index].blocks.len();
        let more = 1 + self.rng.random_range(0..2) as usize;
        for _ in 0..more {
            let hash = self.engine_hash();
            let token = 90_000 + self.rng.random_range(0..10_000) as u32;
            let chain = &mut self.chains[index];
            chain.blocks.push(hash);
            chain.tokens.extend((0..BLOCK).map(|i| token + i));
        }
        self.store_events(index, from)
    }

    /// Evicts the last held block of some chain (engines evict leaves).
    fn evict(&mut self) -> Vec<Value> {
        let held: Vec<(usize, usize)> = self
            .chains
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let last = c.blocks.iter().rposition(|h| self.held.contains_key(h))?;
                Some((i, last))
            })
            .collect();
        if held.is_empty() {
            return Vec::new();
        }
        let (index, position) = held[self.rng.random_range(0..held.len() as u64) as usize];
        let chain = &self.chains[index];
        let hash = chain.blocks[position];
        let groups = self.capabilities.groups;
        let mut events = Vec::new();
        if chain.hybrid {
            // The sliding window drops it first; the block stays routable.
            events.push(json!({"kind": "removed", "hashes": [hash], "group": 1}));
            if self.rng.random_range(0..2) == 0 {
                return events;
            }
        }
        events.push(json!({"kind": "removed", "hashes": [hash], "group": groups.then_some(0)}));
        self.held.remove(&hash);
        events
    }

    /// A new engine process: nothing cached, nothing to extend.
    fn engine_restarted(&mut self) {
        self.chains.clear();
        self.held.clear();
    }

    fn cleared(&mut self) -> Vec<Value> {
        self.held.clear();
        vec![json!({"kind": "cleared"})]
    }

    /// One engine step: a few stores and evictions.
    fn step(&mut self) -> Vec<Value> {
        let mut events = Vec::new();
        for _ in 0..1 + self.rng.random_range(0..3) {
            let mut more = match self.rng.random_range(0..4) {
                0 => self.extend_chain(),
                1 => self.evict(),
                _ => self.new_chain(),
            };
            events.append(&mut more);
        }
        events
    }
}

struct Bench {
    nats: NatsServer,
    sidecar: Sidecar,
}

impl Bench {
    fn start() -> Self {
        let nats = NatsServer::start().expect("nats-server starts");
        let sidecar = Sidecar::start(
            &nats.url(),
            &[SidecarModel {
                name: MODEL.into(),
                block_size: BLOCK,
                tokenizer: None,
            }],
            "",
        )
        .expect("kv-sidecar serve starts");
        Self { nats, sidecar }
    }

    /// Starts a relay for `engine` and waits until its subscription is in
    /// (a PUB socket drops what it sends before then).
    fn relay(&self, release: &EngineRelease, engine: &EnginePublisher, worker: &str) -> Relay {
        let endpoints = (engine.endpoint(), engine.replay_endpoint());
        self.relay_at(release, endpoints, worker, &[])
    }

    /// As [`relay`](Self::relay), on the engine endpoints `(publish,
    /// replay)` and with further flags.
    fn relay_at(
        &self,
        release: &EngineRelease,
        (publish, replay): (String, String),
        worker: &str,
        extra: &[&str],
    ) -> Relay {
        let mut extra_args = vec!["--zmq-topic".into(), "kv-events".into()];
        extra_args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        let relay = Relay::start(&RelayOptions {
            engine: release.engine,
            nats_url: self.nats.url(),
            worker_id: worker.into(),
            model: MODEL.into(),
            address: "127.0.0.1:9".into(),
            block_size: BLOCK,
            zmq_endpoint: Some(publish),
            zmq_replay_endpoint: Some(replay),
            metrics_url: None,
            extra_args,
        })
        .expect("relay starts");
        let deadline = Instant::now() + SETTLE;
        while relay.metric("kvmesh_relay_engine_connected", "") < 1.0 {
            assert!(
                Instant::now() < deadline,
                "{worker}: relay never subscribed"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        relay
    }

    /// Waits until the sidecar's index of `worker` equals the truth.
    fn assert_converges(&self, worker: &str, truth: &Truth, phase: &str) {
        let (text, mm) = truth.expected();
        let lookalikes = truth.mm_lookalikes();
        let deadline = Instant::now() + SETTLE;
        loop {
            let view = self
                .sidecar
                .blocks_by_worker()
                .expect("sidecar snapshot")
                .remove(worker)
                .unwrap_or_default();
            let missing = text.difference(&view).count();
            let extra: Vec<&u64> = view.difference(&text).collect();
            let aliased = extra.iter().any(|h| lookalikes.contains(h));
            if missing == 0 && extra.len() == mm && !aliased {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{worker} {phase}: sidecar holds {} blocks, truth {} text + {mm} multimodal; \
                 missing {missing}, extra {}, multimodal aliasing text {aliased}",
                view.len(),
                text.len(),
                extra.len(),
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn assert_nothing_lost(relay: &Relay, worker: &str, phase: &str) {
    assert_eq!(
        relay.metric("kvmesh_relay_resets_total", "events_lost"),
        0.0,
        "{worker} {phase}: replay could repair every gap, yet a reset reported lost events"
    );
}

/// Two engine steps a moment apart after a relay starts: should a slow
/// subscription still miss the first, the second reveals the history.
fn wake(engine: &mut EnginePublisher, truth: &mut Truth) {
    for _ in 0..2 {
        let events = truth.step();
        engine.publish(&events, false).expect("engine publishes");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The phases every release goes through, against one relay worker.
fn conform(release: EngineRelease, seed: u64) {
    let bench = Bench::start();
    let worker = format!("{}-{}", release.engine, release.version.replace('.', "_"));
    let mut engine = EnginePublisher::start(&release).expect("engine publisher starts");
    let mut truth = Truth::new(seed, engine.capabilities);
    let publish = |engine: &mut EnginePublisher, events: Vec<Value>, drop: bool| {
        engine.publish(&events, drop).expect("engine publishes");
    };

    // Late start: the engine has been running before the relay comes up.
    for _ in 0..15 {
        let events = truth.step();
        publish(&mut engine, events, false);
    }
    // PUB/SUB has no history: the relay learns the past through replay at
    // the next event it receives.
    let relay = bench.relay(&release, &engine, &worker);
    wake(&mut engine, &mut truth);
    bench.assert_converges(&worker, &truth, "late start");

    // Live, with an engine-wide clear in the middle.
    for i in 0..30 {
        let events = if i == 10 {
            truth.cleared()
        } else {
            truth.step()
        };
        publish(&mut engine, events, false);
    }
    bench.assert_converges(&worker, &truth, "live");
    assert_nothing_lost(&relay, &worker, "live");

    // Dropped frames: every third batch never reaches the relay, and two
    // undecodable batches (one whole, one with a bad event) are dropped too,
    // so the relay meets them inside a replay.
    for i in 0..30 {
        let events = truth.step();
        publish(&mut engine, events, i % 3 == 1);
        if i == 13 {
            engine.publish_garbage("batch", true).expect("garbage");
        }
        if i == 20 {
            engine.publish_garbage("event", true).expect("garbage");
        }
    }
    let events = truth.step();
    publish(&mut engine, events, false);
    bench.assert_converges(&worker, &truth, "dropped frames");
    assert!(
        relay.metric("kvmesh_relay_gaps_total", "") > 0.0,
        "gaps seen"
    );
    assert!(
        relay.metric("kvmesh_relay_replays_total", "result=\"ok\"") > 0.0,
        "replays succeeded"
    );
    assert!(
        relay.metric("kvmesh_relay_decode_errors_total", "") >= 2.0,
        "undecodable replayed batches counted"
    );
    assert_nothing_lost(&relay, &worker, "dropped frames");

    // Relay restart: events published while no relay runs come back through
    // the replay the new relay asks for at its first event.
    drop(relay);
    for _ in 0..10 {
        let events = truth.step();
        publish(&mut engine, events, false);
    }
    let relay = bench.relay(&release, &engine, &worker);
    wake(&mut engine, &mut truth);
    bench.assert_converges(&worker, &truth, "relay restart");
    assert_nothing_lost(&relay, &worker, "relay restart");

    // Engine restart: a new engine on the same ports starts from seq 0 with
    // an empty cache; the relay must see it and rebuild from the new engine.
    engine.restart().expect("engine restarts");
    truth.engine_restarted();
    wake(&mut engine, &mut truth);
    for _ in 0..10 {
        let events = truth.step();
        publish(&mut engine, events, false);
    }
    bench.assert_converges(&worker, &truth, "engine restart");
    assert_nothing_lost(&relay, &worker, "engine restart");
    assert!(
        relay.metric("kvmesh_relay_resets_total", "engine_restarted") >= 1.0,
        "the restart was seen"
    );
    assert!(
        !truth.held.is_empty(),
        "the workload should leave blocks cached"
    );
    let caps = truth.capabilities;
    let chains = &truth.chains;
    assert!(
        !caps.salt || chains.iter().any(|c| c.salt.is_some()),
        "salted prompts ran"
    );
    assert!(
        !caps.mm || chains.iter().any(|c| c.mm.is_some()),
        "multimodal prompts ran"
    );
    assert!(
        !caps.groups || chains.iter().any(|c| c.hybrid),
        "hybrid groups ran"
    );
}

/// Two data-parallel ranks of one engine, each running the release's own
/// publisher with the engine's configured ports, and one relay per rank
/// given those same ports and `--data-parallel-rank`: each relay must find
/// its rank's sockets and index exactly its rank's cache, events published
/// before it started included. A relay whose ports are one below the
/// engine's lands, for rank 1, on rank 0's sockets: it must skip every batch
/// (stamped rank 0 by the engine) and index nothing.
fn data_parallel_ranks(release: EngineRelease, seed: u64) {
    let bench = Bench::start();
    let mut engines = EnginePublisher::start_ranks(&release, 2).expect("rank publishers start");
    let mut truths: Vec<Truth> = (0..2u64)
        .map(|rank| Truth::new(seed + rank, engines[0].capabilities))
        .collect();
    for (engine, truth) in engines.iter_mut().zip(&mut truths) {
        for _ in 0..8 {
            let events = truth.step();
            engine.publish(&events, false).expect("engine publishes");
        }
    }
    let configured = (engines[0].endpoint(), engines[0].replay_endpoint());
    let relays: Vec<Relay> = (0..2)
        .map(|rank| {
            let rank = rank.to_string();
            let worker = format!("dp-{rank}");
            let flags = ["--data-parallel-rank", rank.as_str()];
            bench.relay_at(&release, configured.clone(), &worker, &flags)
        })
        .collect();
    let one_below = |endpoint: &str| {
        let (host, port) = endpoint.rsplit_once(':').unwrap();
        format!("{host}:{}", port.parse::<u16>().unwrap() - 1)
    };
    let misconfigured = bench.relay_at(
        &release,
        (one_below(&configured.0), one_below(&configured.1)),
        "dp-misconfigured",
        &["--data-parallel-rank", "1"],
    );
    for (engine, truth) in engines.iter_mut().zip(&mut truths) {
        wake(engine, truth);
    }
    for (rank, (truth, relay)) in truths.iter().zip(&relays).enumerate() {
        let worker = format!("dp-{rank}");
        bench.assert_converges(&worker, truth, "data-parallel rank");
        assert_nothing_lost(relay, &worker, "data-parallel rank");
        assert_eq!(
            relay.metric("kvmesh_relay_foreign_rank_batches_total", ""),
            0.0,
            "{worker}"
        );
    }
    assert!(misconfigured.metric("kvmesh_relay_foreign_rank_batches_total", "") >= 2.0);
    let indexed = bench.sidecar.blocks_by_worker().expect("sidecar snapshot");
    assert!(indexed
        .get("dp-misconfigured")
        .is_none_or(HashSet::is_empty));
}

fn release(engine: EngineKind, version: &'static str, hash_style: HashStyle) -> EngineRelease {
    EngineRelease {
        engine,
        version,
        hash_style,
    }
}

/// vLLM 0.9: array events, Python `hash()` block hashes (signed), no medium.
#[test]
fn vllm_0_9_array_events_with_signed_hashes() {
    conform(release(EngineKind::Vllm, "0.9.2", HashStyle::Signed), 9);
}

/// vLLM 0.23: the last release with array events (extra_keys, group_idx).
#[test]
fn vllm_0_23_last_array_release() {
    conform(release(EngineKind::Vllm, "0.23.0", HashStyle::Unsigned), 23);
}

/// vLLM 0.24: the first release with map events.
#[test]
fn vllm_0_24_first_map_release() {
    conform(release(EngineKind::Vllm, "0.24.0", HashStyle::Bytes), 24);
}

/// vLLM 0.26: replay replies gain a topic frame.
#[test]
fn vllm_0_26_replay_with_topic_frame() {
    conform(release(EngineKind::Vllm, "0.26.0", HashStyle::Unsigned), 26);
}

/// The newest vLLM release downloaded by scripts/setup.
#[test]
fn vllm_newest() {
    conform(release(EngineKind::Vllm, "0.33.0", HashStyle::Bytes), 33);
}

/// SGLang 0.4: array events without a medium, signed hashes.
#[test]
fn sglang_0_4_array_events() {
    conform(
        release(EngineKind::Sglang, "0.4.10.post2", HashStyle::Signed),
        4,
    );
}

/// SGLang 0.5.19: salted stores append a `{"cache_salt"}` map.
#[test]
fn sglang_0_5_19_salted_array_stores() {
    conform(
        release(EngineKind::Sglang, "0.5.19", HashStyle::Signed),
        519,
    );
}

/// SGLang 0.5.21: map events with `cache_salt`.
#[test]
fn sglang_0_5_21_map_events() {
    conform(
        release(EngineKind::Sglang, "0.5.21", HashStyle::Signed),
        521,
    );
}

/// The newest SGLang release downloaded by scripts/setup (4-frame replay).
#[test]
fn sglang_newest() {
    conform(
        release(EngineKind::Sglang, "0.5.23", HashStyle::Signed),
        523,
    );
}

/// vLLM's data-parallel ranks, newest release.
#[test]
fn vllm_data_parallel_ranks() {
    data_parallel_ranks(release(EngineKind::Vllm, "0.33.0", HashStyle::Bytes), 330);
}

/// SGLang's data-parallel ranks, newest release.
#[test]
fn sglang_data_parallel_ranks() {
    data_parallel_ranks(
        release(EngineKind::Sglang, "0.5.23", HashStyle::Signed),
        5230,
    );
}
