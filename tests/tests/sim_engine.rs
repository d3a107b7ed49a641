//! sim-engine end to end: the real binary on loopback ports, checked with
//! independent clients — an rmpv msgpack decoder written from the documented
//! vLLM event format, a Prometheus text parser, the HF tokenizer.
// Integration test: its helpers fail the test by panicking, like its tests
// (clippy.toml allows that in test functions only).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvmesh_stack::harness::client::{http_client, post, post_json, JsonResponse};
use kvmesh_stack::harness::sim::{HostedWorker, KvEventEndpoints, SimEngineOptions};
use kvmesh_stack::harness::{free_port, paths, SimEngine};
use router_core::{BlockHasher, BlockSize, HashSeed};
use serde_json::{json, Value};
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, SubSocket, ZmqMessage};

const MODEL: &str = "qwen3";
const TOPIC: &str = "kv-events";
const BLOCK_SIZE: usize = 16;
/// Bound on every wait for an event or a reply.
const WAIT: Duration = Duration::from_secs(10);
/// Time for a fresh ZMQ subscription to reach the publisher.
const SUBSCRIBE_SETTLE: Duration = Duration::from_millis(500);

// ---------------------------------------------------------------- helpers --

fn qwen3_tokenizer() -> PathBuf {
    paths::qwen3_tokenizer_dir().unwrap().join("tokenizer.json")
}

/// A byte-level engine (token id = byte), so prompts have exact lengths.
fn byte_engine(args: &[&str]) -> SimEngine {
    SimEngine::start(SimEngineOptions::new(MODEL, "w0").args(args.iter().copied())).unwrap()
}

struct EventPorts {
    publish: String,
    replay: String,
}

impl EventPorts {
    fn new() -> Self {
        Self {
            publish: format!("tcp://127.0.0.1:{}", free_port()),
            replay: format!("tcp://127.0.0.1:{}", free_port()),
        }
    }

    fn args(&self, format: &str) -> Vec<String> {
        vec![
            "--kv-events-endpoint".into(),
            self.publish.clone(),
            "--kv-events-replay-endpoint".into(),
            self.replay.clone(),
            "--kv-events-format".into(),
            format.into(),
        ]
    }
}

fn complete_ids(engine: &SimEngine, prompt: &[u32], max_tokens: u32) -> JsonResponse {
    let response = post_json(
        &http_client(),
        &format!("{}/v1/completions", engine.url()),
        &json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}),
    )
    .unwrap();
    assert_eq!(response.status, 200, "{}", response.text);
    response
}

fn cached_tokens(response: &JsonResponse) -> u64 {
    response.json().unwrap()["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap()
}

fn sim_cache(engine: &SimEngine) -> Value {
    http_client()
        .get(format!("{}/sim/cache", engine.url()))
        .send()
        .unwrap()
        .json()
        .unwrap()
}

fn tokens(start: u32, len: u32) -> Vec<u32> {
    (start..start + len).map(|t| t % 250 + 1).collect()
}

/// A multi-thread runtime keeps ZMQ socket tasks running between calls.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// A ZMQ subscriber to the engine's KV events.
struct Subscriber {
    runtime: tokio::runtime::Runtime,
    socket: SubSocket,
}

impl Subscriber {
    fn connect(endpoint: &str) -> Self {
        let runtime = runtime();
        let mut socket = SubSocket::new();
        runtime.block_on(async {
            socket.connect(endpoint).await.unwrap();
            socket.subscribe(TOPIC).await.unwrap();
            tokio::time::sleep(SUBSCRIBE_SETTLE).await;
        });
        Self { runtime, socket }
    }

    /// The next `(seq, payload)`, checking the frame layout.
    fn next(&mut self, wait: Duration) -> Option<(u64, Bytes)> {
        let socket = &mut self.socket;
        let message = self
            .runtime
            .block_on(async { tokio::time::timeout(wait, socket.recv()).await })
            .ok()?
            .unwrap();
        let frames = message.into_vec();
        assert_eq!(frames.len(), 3, "[topic, seq, payload]");
        assert_eq!(frames[0].as_ref(), TOPIC.as_bytes());
        let seq = u64::from_be_bytes(frames[1].as_ref().try_into().expect("8-byte seq"));
        Some((seq, frames[2].clone()))
    }

    /// Batches until `last_seq` has arrived (bounded by `WAIT`).
    fn until_seq(&mut self, last_seq: u64) -> Vec<(u64, Bytes)> {
        let deadline = Instant::now() + WAIT;
        let mut batches = Vec::new();
        while Instant::now() < deadline {
            match self.next(deadline.saturating_duration_since(Instant::now())) {
                Some(batch) => {
                    let seq = batch.0;
                    batches.push(batch);
                    if seq >= last_seq {
                        return batches;
                    }
                }
                None => break,
            }
        }
        panic!(
            "seq {last_seq} did not arrive; got {:?}",
            batches.iter().map(|b| b.0).collect::<Vec<_>>()
        );
    }
}

/// Waits until the engine has numbered all batches of finished work and
/// returns the last seq (`None` when no batch was ever produced).
fn settled_last_seq(engine: &SimEngine) -> Option<u64> {
    let mut previous = None;
    for _ in 0..50 {
        let next = sim_cache(engine)["kv_events_next_seq"].as_u64().unwrap();
        if previous == Some(next) {
            return next.checked_sub(1);
        }
        previous = Some(next);
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("event seq never settled");
}

// ------------------------------------------- independent event decoding --

/// A KV event as documented in docs/relay.md#input-formats-srcdecode, decoded without the sim's code.
#[derive(Debug, Clone, PartialEq)]
enum Event {
    Stored {
        hashes: Vec<u64>,
        parent: Option<u64>,
        tokens: Vec<u32>,
        block_size: u64,
        medium: Option<String>,
    },
    Removed {
        hashes: Vec<u64>,
    },
    Cleared,
}

fn as_u64s(value: &rmpv::Value) -> Vec<u64> {
    value
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v.as_u64().expect("unsigned integer"))
        .collect()
}

fn optional_u64(value: &rmpv::Value) -> Option<u64> {
    if value.is_nil() {
        None
    } else {
        Some(value.as_u64().expect("hash"))
    }
}

fn decode_event(value: &rmpv::Value, expected_format: &str) -> Event {
    match value {
        rmpv::Value::Array(fields) => {
            assert_eq!(expected_format, "array");
            match fields[0].as_str().expect("tag") {
                "BlockStored" => {
                    assert_eq!(fields.len(), 8, "tag + 7 fields");
                    assert!(fields[5].is_nil() && fields[7].is_nil(), "no LoRA");
                    Event::Stored {
                        hashes: as_u64s(&fields[1]),
                        parent: optional_u64(&fields[2]),
                        tokens: as_u64s(&fields[3]).into_iter().map(|t| t as u32).collect(),
                        block_size: fields[4].as_u64().unwrap(),
                        medium: fields[6].as_str().map(str::to_owned),
                    }
                }
                "BlockRemoved" => Event::Removed {
                    hashes: as_u64s(&fields[1]),
                },
                "AllBlocksCleared" => Event::Cleared,
                other => panic!("unknown tag {other}"),
            }
        }
        rmpv::Value::Map(entries) => {
            assert_eq!(expected_format, "map");
            let map: HashMap<&str, &rmpv::Value> = entries
                .iter()
                .map(|(k, v)| (k.as_str().expect("string key"), v))
                .collect();
            assert!(
                !map.contains_key("lora_id") && !map.contains_key("lora_name"),
                "defaults omitted"
            );
            match map["type"].as_str().unwrap() {
                "BlockStored" => Event::Stored {
                    hashes: as_u64s(map["block_hashes"]),
                    parent: optional_u64(map["parent_block_hash"]),
                    tokens: as_u64s(map["token_ids"])
                        .into_iter()
                        .map(|t| t as u32)
                        .collect(),
                    block_size: map["block_size"].as_u64().unwrap(),
                    medium: map
                        .get("medium")
                        .and_then(|m| m.as_str())
                        .map(str::to_owned),
                },
                "BlockRemoved" => Event::Removed {
                    hashes: as_u64s(map["block_hashes"]),
                },
                "AllBlocksCleared" => Event::Cleared,
                other => panic!("unknown type {other}"),
            }
        }
        other => panic!("event is neither array nor map: {other}"),
    }
}

/// `[ts, [events], data_parallel_rank]`.
fn decode_batch(payload: &[u8], format: &str) -> Vec<Event> {
    let mut reader = payload;
    let batch = rmpv::decode::read_value(&mut reader).expect("msgpack");
    assert!(reader.is_empty(), "one value per payload");
    let fields = batch.as_array().expect("batch array");
    assert_eq!(fields.len(), 3);
    assert!(
        fields[0].as_f64().expect("float ts") > 1.0e9,
        "unix seconds"
    );
    // Stamped with the publishing rank, as vLLM's publisher stamps it.
    assert_eq!(fields[2].as_u64(), Some(0), "data_parallel_rank");
    fields[1]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| decode_event(e, format))
        .collect()
}

/// The cache a subscriber reconstructs: engine hash → (parent, tokens).
#[derive(Default)]
struct Reconstructed {
    blocks: BTreeMap<u64, (Option<u64>, Vec<u32>)>,
}

impl Reconstructed {
    fn apply(&mut self, event: &Event) {
        match event {
            Event::Stored {
                hashes,
                parent,
                tokens,
                block_size,
                medium,
            } => {
                assert_eq!(*block_size as usize, BLOCK_SIZE);
                assert_eq!(medium.as_deref(), Some("GPU"));
                assert_eq!(tokens.len(), hashes.len() * BLOCK_SIZE);
                let mut parent = *parent;
                for (hash, chunk) in hashes.iter().zip(tokens.chunks(BLOCK_SIZE)) {
                    let previous = self.blocks.insert(*hash, (parent, chunk.to_vec()));
                    assert!(previous.is_none(), "block {hash} stored twice");
                    parent = Some(*hash);
                }
            }
            Event::Removed { hashes } => {
                for hash in hashes {
                    assert!(
                        self.blocks.remove(hash).is_some(),
                        "removed unknown block {hash}"
                    );
                }
            }
            Event::Cleared => self.blocks.clear(),
        }
    }

    /// kvmesh seq hash of a block: chain from the root through parents.
    fn seq_hash(
        &self,
        hash: u64,
        hasher: &BlockHasher,
        memo: &mut HashMap<u64, u64>,
    ) -> Option<u64> {
        if let Some(seq) = memo.get(&hash) {
            return Some(*seq);
        }
        let (parent, tokens) = self.blocks.get(&hash)?;
        let parent_seq = match parent {
            None => None,
            Some(p) => Some(router_core::SeqHash(self.seq_hash(*p, hasher, memo)?)),
        };
        let seq = hasher.chain(parent_seq, hasher.local_hash(tokens)).0;
        memo.insert(hash, seq);
        Some(seq)
    }
}

fn kvmesh_hasher() -> BlockHasher {
    BlockHasher::new(
        BlockSize::new(BLOCK_SIZE as u32).unwrap(),
        HashSeed::for_model(MODEL, None),
    )
}

// ------------------------------------------------------------------ tests --

#[test]
fn repeated_long_prefix_is_cached_and_shortens_simulated_ttft() {
    let engine = SimEngine::start(
        SimEngineOptions::new(MODEL, "w0")
            .tokenizer(qwen3_tokenizer())
            .args(["--speedup", "10"]),
    )
    .unwrap();
    let client = http_client();
    let url = format!("{}/v1/chat/completions", engine.url());
    let document = "The router keeps a replica of every worker's KV cache index. ".repeat(150);
    let chat = |question: &str| {
        let body = json!({
            "model": MODEL,
            "max_tokens": 4,
            "messages": [
                {"role": "system", "content": document},
                {"role": "user", "content": question},
            ],
        });
        let response = post_json(&client, &url, &body).unwrap();
        assert_eq!(response.status, 200, "{}", response.text);
        assert_eq!(response.header("x-sim-worker-id"), Some("w0"));
        let ttft: f64 = response
            .header("x-sim-ttft-seconds")
            .unwrap()
            .parse()
            .unwrap();
        (response.json().unwrap(), ttft)
    };
    let (cold, cold_ttft) = chat("What does the router keep?");
    let (warm, warm_ttft) = chat("And what else?");
    let prompt_tokens = cold["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 1500, "{prompt_tokens}");
    assert_eq!(cold["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let cached = warm["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        cached > prompt_tokens - 64 && cached % BLOCK_SIZE as u64 == 0,
        "cached {cached} of {prompt_tokens}"
    );
    assert!(
        warm_ttft < cold_ttft / 3.0,
        "warm {warm_ttft} cold {cold_ttft}"
    );

    // The TTFT histogram (simulated seconds) saw both requests.
    let metrics = scrape(&engine);
    let sum = sample(&metrics, "vllm:time_to_first_token_seconds_sum");
    assert!((sum - (cold_ttft + warm_ttft)).abs() < 1e-6, "{sum}");
    assert_eq!(
        sample(&metrics, "vllm:time_to_first_token_seconds_count"),
        2.0
    );
}

#[test]
fn cache_pressure_evicts_lru_and_reports_exactly_the_evicted_blocks() {
    let ports = EventPorts::new();
    let mut args = ports.args("array");
    args.extend(["--num-gpu-blocks", "16", "--speedup", "100"].map(String::from));
    let engine = SimEngine::start(SimEngineOptions::new(MODEL, "w0").args(args)).unwrap();
    let mut events = Subscriber::connect(&ports.publish);

    // Three 4-block prompts fill 12 of 16 blocks; each stays cached after
    // finishing. A is the least recently used.
    let prompts: Vec<Vec<u32>> = (0..3).map(|i| tokens(i * 64, 64)).collect();
    for prompt in &prompts {
        complete_ids(&engine, prompt, 1);
    }
    let last = settled_last_seq(&engine).unwrap();
    let mut stored: Vec<Vec<u64>> = Vec::new();
    for (seq, payload) in events.until_seq(last) {
        for event in decode_batch(&payload, "array") {
            match event {
                Event::Stored { hashes, .. } => stored.push(hashes),
                other => panic!("unexpected {other:?} at seq {seq}"),
            }
        }
    }
    assert_eq!(stored.len(), 3, "one stored event per request");
    let [a, b, c] = [&stored[0], &stored[1], &stored[2]];
    assert!(stored.iter().all(|s| s.len() == 4));
    // Eviction order: 4 never-used blocks are not listed; then A tail-first, B, C.
    let order: Vec<u64> =
        serde_json::from_value(sim_cache(&engine)["eviction_order"].clone()).unwrap();
    let expected: Vec<u64> = [a, b, c]
        .iter()
        .flat_map(|h| h.iter().rev().copied())
        .collect();
    assert_eq!(order, expected);

    // An 8-block prompt takes the 4 empty blocks, then evicts A's 4.
    complete_ids(&engine, &tokens(1100, 128), 1);
    let last_after = settled_last_seq(&engine).unwrap();
    let mut removed = Vec::new();
    let mut newly_stored = 0;
    for (_, payload) in events.until_seq(last_after) {
        for event in decode_batch(&payload, "array") {
            match event {
                Event::Removed { hashes } => removed.extend(hashes),
                Event::Stored { hashes, .. } => newly_stored += hashes.len(),
                Event::Cleared => panic!("unexpected clear"),
            }
        }
    }
    let a_tail_first: Vec<u64> = a.iter().rev().copied().collect();
    assert_eq!(
        removed, a_tail_first,
        "exactly A's blocks, least recent first"
    );
    assert_eq!(newly_stored, 8);
    let cached: Vec<u64> = sim_cache(&engine)["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["engine_hash"].as_u64().unwrap())
        .collect();
    assert!(a.iter().all(|h| !cached.contains(h)));
    assert!(b.iter().chain(c.iter()).all(|h| cached.contains(h)));

    // A lost its cache; B kept it (3 usable blocks of a 64-token prompt).
    assert_eq!(cached_tokens(&complete_ids(&engine, &prompts[1], 1)), 48);
    assert_eq!(cached_tokens(&complete_ids(&engine, &prompts[0], 1)), 0);
}

#[test]
fn subscriber_reconstructs_the_engine_cache_in_both_encodings() {
    for format in ["array", "map"] {
        let ports = EventPorts::new();
        let mut args = ports.args(format);
        args.extend(["--num-gpu-blocks", "40", "--speedup", "100"].map(String::from));
        let engine = SimEngine::start(SimEngineOptions::new(MODEL, "w0").args(args)).unwrap();
        let mut events = Subscriber::connect(&ports.publish);

        // Shared prefixes, divergent suffixes, generated tokens spanning
        // blocks, and enough volume to force evictions; some concurrently.
        let shared = tokens(7, 48);
        let mut prompts: Vec<Vec<u32>> = (0..12)
            .map(|i| {
                let mut p = shared.clone();
                p.extend(tokens(100 + i * 40, 20 + i * 9));
                p
            })
            .collect();
        prompts.push(tokens(3, 200));
        std::thread::scope(|scope| {
            for chunk in prompts.chunks(4) {
                let engine = &engine;
                scope.spawn(move || {
                    for prompt in chunk {
                        complete_ids(engine, prompt, 20);
                    }
                });
            }
        });
        // The last request's blocks are the most recent: still cached.
        let probe = tokens(11, 120);
        complete_ids(&engine, &probe, 1);
        let last = settled_last_seq(&engine).unwrap();
        let batches = events.until_seq(last);
        let seqs: Vec<u64> = batches.iter().map(|b| b.0).collect();
        assert_eq!(
            seqs,
            (0..=last).collect::<Vec<_>>(),
            "{format}: every batch, from seq 0"
        );

        let mut view = Reconstructed::default();
        let mut removals = 0;
        for (_, payload) in &batches {
            for event in decode_batch(payload, format) {
                removals += usize::from(matches!(event, Event::Removed { .. }));
                view.apply(&event);
            }
        }
        assert!(removals > 0, "{format}: the workload must evict");

        let truth = sim_cache(&engine);
        let hasher = kvmesh_hasher();
        let mut memo = HashMap::new();
        let engine_blocks = truth["blocks"].as_array().unwrap();
        assert_eq!(engine_blocks.len(), view.blocks.len(), "{format}");
        for block in engine_blocks {
            let hash = block["engine_hash"].as_u64().unwrap();
            let (parent, tokens) = view
                .blocks
                .get(&hash)
                .unwrap_or_else(|| panic!("{format}: {hash} missing"));
            assert_eq!(block["parent_engine_hash"].as_u64(), *parent);
            let engine_tokens: Vec<u32> =
                serde_json::from_value(block["token_ids"].clone()).unwrap();
            assert_eq!(&engine_tokens, tokens);
            // Where the chain back to the root is still cached, the kvmesh
            // seq hash computed from events equals the engine's view.
            if let Some(seq) = view.seq_hash(hash, &hasher, &mut memo) {
                assert_eq!(block["seq_hash"].as_u64(), Some(seq), "{format}");
            }
        }
        // router-core's hashes of the probe prompt are all in the engine's view.
        let seq_hashes: Vec<u64> = engine_blocks
            .iter()
            .map(|b| b["seq_hash"].as_u64().unwrap())
            .collect();
        for hash in hasher.sequence_hashes(&probe) {
            assert!(
                seq_hashes.contains(&hash.0),
                "{format}: probe block {hash:?}"
            );
        }
    }
}

/// Sends a replay request and collects `(seq, payload)` up to the end marker.
fn replay(endpoint: &str, start: u64) -> Vec<(i64, Bytes)> {
    let runtime = runtime();
    runtime.block_on(async {
        let mut dealer = DealerSocket::new();
        dealer.connect(endpoint).await.unwrap();
        let request = ZmqMessage::try_from(vec![
            Bytes::new(),
            Bytes::copy_from_slice(&start.to_be_bytes()),
        ])
        .unwrap();
        dealer.send(request).await.unwrap();
        let mut replies = Vec::new();
        for _ in 0..10_000 {
            let message = tokio::time::timeout(WAIT, dealer.recv())
                .await
                .expect("replay reply")
                .unwrap();
            let frames = message.into_vec();
            assert_eq!(frames.len(), 3, "['', seq, payload]");
            assert!(frames[0].is_empty());
            let seq = i64::from_be_bytes(frames[1].as_ref().try_into().unwrap());
            if seq == -1 {
                assert!(frames[2].is_empty(), "end marker has no payload");
                return replies;
            }
            replies.push((seq, frames[2].clone()));
        }
        panic!("no end marker");
    })
}

#[test]
fn replay_serves_batches_a_late_subscriber_missed() {
    let ports = EventPorts::new();
    let mut args = ports.args("map");
    args.extend(["--speedup", "100", "--kv-events-replay-buffer", "1000"].map(String::from));
    let engine = SimEngine::start(SimEngineOptions::new(MODEL, "w0").args(args)).unwrap();
    for i in 0..4 {
        complete_ids(&engine, &tokens(i * 50, 40), 3);
    }
    let last = settled_last_seq(&engine).unwrap() as i64;
    assert!(last >= 3);

    let all = replay(&ports.replay, 0);
    assert_eq!(
        all.iter().map(|r| r.0).collect::<Vec<_>>(),
        (0..=last).collect::<Vec<_>>()
    );
    let mut view = Reconstructed::default();
    for (_, payload) in &all {
        for event in decode_batch(payload, "map") {
            view.apply(&event);
        }
    }
    assert_eq!(
        view.blocks.len(),
        sim_cache(&engine)["blocks"].as_array().unwrap().len()
    );

    let tail = replay(&ports.replay, 2);
    assert_eq!(tail.first().map(|r| r.0), Some(2));
    assert_eq!(tail.len() as i64, last - 1);
    assert_eq!(
        tail[0].1, all[2].1,
        "replayed payloads are the published bytes"
    );
    assert!(replay(&ports.replay, last as u64 + 1).is_empty());
}

/// A parsed Prometheus text exposition (format 0.0.4): samples by
/// `(name, labels)`. Written here from the format spec because the crates.io
/// parsers tried (prometheus-parse 0.2, openmetrics-parser 0.4) reject the
/// `:` that vLLM's metric names contain.
struct Exposition {
    samples: HashMap<(String, BTreeMap<String, String>), f64>,
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"").expect("label=\"value\"");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => value.push(chars.next().expect("escape").1),
                '"' => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end.expect("closing quote");
        assert!(is_metric_name(name.trim()), "label name {name}");
        labels.insert(name.trim().to_owned(), value);
        rest = after[end + 1..].trim_start_matches(',');
    }
    labels
}

impl Exposition {
    fn parse(text: &str) -> Self {
        let mut types: HashMap<String, String> = HashMap::new();
        let mut samples = HashMap::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if let Some(comment) = line.strip_prefix('#') {
                let words: Vec<&str> = comment.split_whitespace().collect();
                if words.first() == Some(&"TYPE") {
                    assert!(is_metric_name(words[1]), "{line}");
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&words[2]),
                        "{line}"
                    );
                    types.insert(words[1].to_owned(), words[2].to_owned());
                }
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("sample value");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("value in {line}")),
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, parse_labels(labels.strip_suffix('}').expect("}"))),
                None => (series, BTreeMap::new()),
            };
            assert!(is_metric_name(name), "metric name {name}");
            // Every sample belongs to a declared family (counters by their
            // full `_total` name, histograms by their base name).
            let family_declared = types.contains_key(name)
                || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                    name.strip_suffix(suffix).is_some_and(|base| {
                        types.get(base).map(String::as_str) == Some("histogram")
                    })
                });
            assert!(family_declared, "{name} has no TYPE line");
            samples.insert((name.to_owned(), labels), value);
        }
        Self { samples }
    }
}

fn scrape(engine: &SimEngine) -> Exposition {
    let response = http_client()
        .get(format!("{}/metrics", engine.url()))
        .send()
        .unwrap();
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    Exposition::parse(&response.text().unwrap())
}

/// The value of the sample `name` labelled with our model (and rank 0, as
/// vLLM labels an engine without data parallelism).
fn sample(exposition: &Exposition, name: &str) -> f64 {
    rank_sample(exposition, name, 0)
}

/// The value of data-parallel rank `rank`'s sample `name`.
fn rank_sample(exposition: &Exposition, name: &str, rank: u32) -> f64 {
    let labels = BTreeMap::from([
        ("engine".to_owned(), rank.to_string()),
        ("model_name".to_owned(), MODEL.to_owned()),
    ]);
    *exposition
        .samples
        .get(&(name.to_owned(), labels))
        .unwrap_or_else(|| panic!("no sample {name} of rank {rank}"))
}

#[test]
fn metrics_parse_and_counters_follow_requests() {
    let engine = byte_engine(&["--speedup", "100"]);
    let before = scrape(&engine);
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
    ] {
        assert_eq!(sample(&before, name), 0.0, "{name}");
    }
    let prompt = tokens(0, 100);
    complete_ids(&engine, &prompt, 7);
    complete_ids(&engine, &prompt, 7);
    let after = scrape(&engine);
    assert_eq!(sample(&after, "vllm:prompt_tokens_total"), 200.0);
    assert_eq!(sample(&after, "vllm:generation_tokens_total"), 14.0);
    assert_eq!(sample(&after, "vllm:prefix_cache_queries_total"), 200.0);
    assert_eq!(
        sample(&after, "vllm:prefix_cache_hits_total"),
        96.0,
        "6 full blocks hit"
    );
    assert_eq!(sample(&after, "vllm:num_requests_running"), 0.0);
    let usage = sample(&after, "vllm:kv_cache_usage_perc");
    assert!((0.0..=1.0).contains(&usage));
    assert_eq!(
        sample(&after, "vllm:time_to_first_token_seconds_count"),
        2.0
    );

    // ORCA load header on a non-streaming response, both forms.
    for (format, prefix) in [
        ("TEXT", "TEXT named_metrics.kv_cache_usage_perc="),
        ("JSON", "JSON {"),
    ] {
        let response = post(
            &http_client(),
            &format!("{}/v1/completions", engine.url()),
            json!({"model": MODEL, "prompt": "hello", "max_tokens": 2}).to_string(),
            &[("endpoint-load-metrics-format", format)],
        )
        .unwrap();
        let header = response.header("endpoint-load-metrics").unwrap();
        assert!(header.starts_with(prefix), "{header}");
        assert!(header.contains("num_requests_waiting"), "{header}");
    }
}

/// `--data-parallel-size 2`: two engines behind one port, chosen by
/// `X-Data-Parallel-Rank` (else the least busy, rank 0 when idle), each
/// with its own cache and metrics series in one valid exposition.
#[test]
fn data_parallel_ranks_are_engines_of_their_own_behind_one_port() {
    let engine = byte_engine(&["--speedup", "100", "--data-parallel-size", "2"]);
    let url = format!("{}/v1/completions", engine.url());
    let prompt = tokens(0, 100);
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 2}).to_string();
    let send = |rank: Option<&str>| {
        let headers: Vec<(&str, &str)> = rank
            .map(|r| ("x-data-parallel-rank", r))
            .into_iter()
            .collect();
        post(&http_client(), &url, body.clone(), &headers).unwrap()
    };
    let first = send(Some("1"));
    let again = send(Some("1"));
    let unnamed = send(None);
    for (response, rank, cached) in [(&first, "1", 0), (&again, "1", 96), (&unnamed, "0", 0)] {
        assert_eq!(response.status, 200, "{}", response.text);
        assert_eq!(response.header("x-sim-data-parallel-rank"), Some(rank));
        assert_eq!(cached_tokens(response), cached, "rank {rank}");
    }
    for bad in ["2", "one", "-1"] {
        let refused = send(Some(bad));
        assert_eq!(refused.status, 400, "{bad}");
        let error = refused.json().unwrap();
        assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
    }
    let metrics = scrape(&engine);
    assert_eq!(rank_sample(&metrics, "vllm:prompt_tokens_total", 1), 200.0);
    assert_eq!(rank_sample(&metrics, "vllm:prompt_tokens_total", 0), 100.0);
    assert_eq!(
        rank_sample(&metrics, "vllm:prefix_cache_hits_total", 1),
        96.0
    );
    assert_eq!(
        rank_sample(&metrics, "vllm:prefix_cache_hits_total", 0),
        0.0
    );
    let cache = |rank: &str| -> Value {
        http_client()
            .get(format!("{}/sim/cache", engine.url()))
            .header("x-data-parallel-rank", rank)
            .send()
            .unwrap()
            .json()
            .unwrap()
    };
    for rank in ["0", "1"] {
        let cache = cache(rank);
        assert_eq!(cache["data_parallel_rank"].to_string(), rank);
        assert_eq!(cache["blocks"].as_array().unwrap().len(), 6, "rank {rank}");
    }
}

#[test]
fn qwen3_chat_template_renders_the_tokens_of_the_rendered_string() {
    let engine =
        SimEngine::start(SimEngineOptions::new(MODEL, "w0").tokenizer(qwen3_tokenizer())).unwrap();
    let messages = json!([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHello!"},
        {"role": "user", "content": [{"type": "text", "text": "Tell me about KV caches."}]},
    ]);
    // What Hugging Face's apply_chat_template gives for Qwen3 (reasoning of
    // earlier turns stripped, generation prompt appended).
    let rendered = "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
                    <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nTell me about KV caches.<|im_end|>\n\
                    <|im_start|>assistant\n";
    let tokenizer = tokenizers::Tokenizer::from_file(qwen3_tokenizer()).unwrap();
    let ids: Vec<u32> = tokenizer
        .encode(rendered, false)
        .unwrap()
        .get_ids()
        .to_vec();

    let client = http_client();
    let chat = post_json(
        &client,
        &format!("{}/v1/chat/completions", engine.url()),
        &json!({"model": MODEL, "messages": messages, "max_tokens": 12}),
    )
    .unwrap();
    assert_eq!(chat.status, 200, "{}", chat.text);
    let by_ids = complete_ids(&engine, &ids, 12);
    let chat = chat.json().unwrap();
    let by_ids_json = by_ids.json().unwrap();
    assert_eq!(
        chat["usage"]["prompt_tokens"].as_u64(),
        Some(ids.len() as u64)
    );
    // Outputs are seeded by the prompt token ids: equal text ⇒ equal ids.
    assert_eq!(
        chat["choices"][0]["message"]["content"],
        by_ids_json["choices"][0]["text"]
    );
    // And the id prompt hit every usable block the chat stored.
    let usable = (ids.len() - 1) / BLOCK_SIZE * BLOCK_SIZE;
    assert_eq!(cached_tokens(&by_ids), usable as u64);
}

#[test]
fn streaming_reports_usage_and_errors_are_openai_shaped() {
    let engine = byte_engine(&["--speedup", "100", "--max-model-len", "256"]);
    let client = http_client();
    let url = format!("{}/v1/chat/completions", engine.url());
    let response = post(
        &client,
        &url,
        json!({
            "model": MODEL, "max_completion_tokens": 5, "stream": true,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "stream please"}],
        })
        .to_string(),
        &[("x-request-id", "req-42")],
    )
    .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.header("x-request-id"), Some("req-42"));
    assert_eq!(response.header("x-sim-worker-id"), Some("w0"));
    let events: Vec<&str> = response
        .text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
        .collect();
    assert_eq!(chunks.len(), 6, "5 token chunks and a usage chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks[5]["choices"], json!([]));
    assert_eq!(chunks[5]["usage"]["completion_tokens"], 5);
    assert!(chunks[5]["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64());
    assert_eq!(chunks[0]["id"], "chatcmpl-req-42");

    let cases = [
        (
            json!({"model": "other", "messages": [{"role": "user", "content": "x"}]}),
            404,
        ),
        (json!({"model": MODEL}), 400),
        (json!({"model": MODEL, "prompt": "x".repeat(300)}), 400),
    ];
    for (body, status) in cases {
        let path = if body.get("prompt").is_some() {
            "completions"
        } else {
            "chat/completions"
        };
        let response = post_json(&client, &format!("{}/v1/{path}", engine.url()), &body).unwrap();
        assert_error(&response, status);
    }
    let malformed = post(&client, &url, "{not json", &[]).unwrap();
    assert_error(&malformed, 400);
}

fn assert_error(response: &JsonResponse, status: u16) {
    assert_eq!(response.status, status, "{}", response.text);
    assert_eq!(response.header("x-sim-worker-id"), Some("w0"));
    let body = response.json().unwrap();
    for field in ["message", "type", "param", "code"] {
        assert!(body["error"].get(field).is_some(), "{field} in {body}");
    }
}

#[test]
fn faults_inject_errors_gaps_and_crashes() {
    let ports = EventPorts::new();
    let mut args = ports.args("array");
    args.extend(["--speedup", "100", "--fault-drop-every", "2"].map(String::from));
    let mut engine = SimEngine::start(SimEngineOptions::new(MODEL, "w0").args(args)).unwrap();
    let client = http_client();
    let faults_url = format!("{}/sim/faults", engine.url());
    let mut events = Subscriber::connect(&ports.publish);

    // Every 2nd batch is not sent: the subscriber sees gaps, replay repairs.
    for i in 0..4 {
        complete_ids(&engine, &tokens(i * 40, 40), 1);
    }
    let last = settled_last_seq(&engine).unwrap();
    let mut seen = Vec::new();
    while let Some((seq, _)) = events.next(Duration::from_millis(500)) {
        seen.push(seq);
    }
    let expected: Vec<u64> = (0..=last).filter(|s| (s + 1) % 2 != 0).collect();
    assert_eq!(seen, expected, "odd seqs dropped");
    let replayed: Vec<i64> = replay(&ports.replay, 0).iter().map(|r| r.0).collect();
    assert_eq!(replayed, (0..=last as i64).collect::<Vec<_>>());

    // Paused publishing holds batches and sends them on resume.
    let paused = post(
        &client,
        &faults_url,
        r#"{"drop_every":null,"pause_events":true}"#,
        &[],
    )
    .unwrap();
    assert_eq!(paused.status, 200, "{}", paused.text);
    complete_ids(&engine, &tokens(900, 40), 1);
    assert!(
        events.next(Duration::from_millis(500)).is_none(),
        "held while paused"
    );
    post(&client, &faults_url, r#"{"pause_events":false}"#, &[]).unwrap();
    let (seq, _) = events.next(WAIT).expect("released on resume");
    assert_eq!(seq, last + 1);

    // Error rate 1: every API request fails with an OpenAI-shaped 500.
    post(&client, &faults_url, r#"{"error_rate":1.0}"#, &[]).unwrap();
    let failed = post_json(
        &client,
        &format!("{}/v1/completions", engine.url()),
        &json!({"model": MODEL, "prompt": "x", "max_tokens": 1}),
    )
    .unwrap();
    assert_error(&failed, 500);
    post(&client, &faults_url, r#"{"error_rate":0.0}"#, &[]).unwrap();

    // Crash after N: the next API request ends the process.
    let seen_so_far = 6; // 4 + 1 + 1 API requests above
    post(
        &client,
        &faults_url,
        format!(r#"{{"crash_after":{seen_so_far}}}"#),
        &[],
    )
    .unwrap();
    let crashed = post_json(
        &client,
        &format!("{}/v1/completions", engine.url()),
        &json!({"model": MODEL, "prompt": "x", "max_tokens": 1}),
    );
    assert!(crashed.is_err(), "the connection dies with the process");
    let deadline = Instant::now() + WAIT;
    while engine.process().unwrap().exit_status().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        engine
            .process()
            .unwrap()
            .exit_status()
            .and_then(|s| s.code()),
        Some(1)
    );
}

/// What a subscriber to one worker's events reconstructs, as kvmesh seq
/// hashes (every chain here reaches its root).
fn seq_hashes_from_events(batches: &[(u64, Bytes)]) -> HashSet<u64> {
    let mut view = Reconstructed::default();
    for (_, payload) in batches {
        for event in decode_batch(payload, "array") {
            view.apply(&event);
        }
    }
    let (hasher, mut memo) = (kvmesh_hasher(), HashMap::new());
    let hashes: Vec<u64> = view.blocks.keys().copied().collect();
    hashes
        .into_iter()
        .map(|hash| view.seq_hash(hash, &hasher, &mut memo).unwrap())
        .collect()
}

#[test]
fn workers_hosted_in_one_process_are_independent_engines() {
    let hosted: Vec<HostedWorker> = (0..3)
        .map(|i| HostedWorker {
            worker_id: format!("h{i}"),
            kv_events: Some(KvEventEndpoints::on_free_ports()),
        })
        .collect();
    let events = |i: usize| hosted[i].kv_events.clone().unwrap();
    let mut engines = SimEngine::start_hosted(
        &SimEngineOptions::new(MODEL, "unused").args(["--speedup", "100"]),
        &hosted,
    )
    .unwrap();
    let mut subscribers: Vec<Subscriber> = (0..3)
        .map(|i| Subscriber::connect(&events(i).publish))
        .collect();

    // Worker i serves i + 1 prompts of three blocks, none sharing a block
    // with another worker's (distinct first tokens).
    let prompts =
        |i: u32| -> Vec<Vec<u32>> { (0..=i).map(|r| tokens(60 * i + 17 * r, 48)).collect() };
    for (i, engine) in engines.iter().enumerate() {
        for prompt in prompts(i as u32) {
            let response = complete_ids(engine, &prompt, 1);
            assert_eq!(response.sim_worker().unwrap(), format!("h{i}"));
        }
    }

    let hasher = kvmesh_hasher();
    let mut caches: Vec<HashSet<u64>> = Vec::new();
    for (i, engine) in engines.iter().enumerate() {
        let served = i as f64 + 1.0;
        let metrics = scrape(engine);
        assert_eq!(
            sample(&metrics, "vllm:prompt_tokens_total"),
            48.0 * served,
            "h{i} counts only its own prompts"
        );
        assert_eq!(sample(&metrics, "vllm:generation_tokens_total"), served);
        assert_eq!(sim_cache(engine)["worker_id"], format!("h{i}"));
        let own: HashSet<u64> = prompts(i as u32)
            .iter()
            .flat_map(|p| hasher.sequence_hashes(p))
            .map(|h| h.0)
            .collect();
        let cached = engine.cached_seq_hashes().unwrap();
        assert_eq!(cached, own, "h{i} caches exactly its own prompts");
        // Its own PUB socket carried exactly those blocks, and its own
        // replay socket serves the same batches.
        let last = settled_last_seq(engine).unwrap();
        let published = subscribers[i].until_seq(last);
        assert_eq!(seq_hashes_from_events(&published), own, "h{i} events");
        let replayed: Vec<(u64, Bytes)> = replay(&events(i).replay, 0)
            .into_iter()
            .map(|(seq, payload)| (seq as u64, payload))
            .collect();
        assert_eq!(replayed, published, "h{i} replay");
        caches.push(cached);
    }
    assert!(caches[0].is_disjoint(&caches[1]) && caches[1].is_disjoint(&caches[2]));

    // Faults are per worker too.
    let faults = post(
        &http_client(),
        &format!("{}/sim/faults", engines[0].url()),
        r#"{"error_rate": 1.0}"#.to_owned(),
        &[],
    )
    .unwrap();
    assert_eq!(faults.status, 200, "{}", faults.text);
    let body = json!({"model": MODEL, "prompt": "x", "max_tokens": 1});
    let status = |engine: &SimEngine| {
        post_json(
            &http_client(),
            &format!("{}/v1/completions", engine.url()),
            &body,
        )
        .unwrap()
        .status
    };
    assert_eq!(status(&engines[0]), 500);
    assert_eq!(status(&engines[1]), 200);

    // One process: no worker can be killed alone.
    assert!(engines[1].process().is_err());
}

/// Long prompts are tokenized off the engine's async threads: while every
/// one of them would be busy tokenizing, `/metrics` (what its relay judges
/// it alive by) still answers, before any of those prompts is done.
#[test]
fn metrics_answer_while_long_prompts_are_tokenized() {
    let engine = SimEngine::start(
        SimEngineOptions::new(MODEL, "w0")
            .tokenizer(qwen3_tokenizer())
            .args(["--max-model-len", "16"]),
    )
    .unwrap();
    let words: Vec<String> = (0..5_000u32)
        .map(|i| format!("w{:x}q", i * 7_919))
        .collect();
    let text: String = (0..400_000usize)
        .map(|i| words[(i * 31 + i / 7) % words.len()].as_str())
        .collect::<Vec<_>>()
        .join(" ");
    let body =
        serde_json::to_vec(&json!({"model": MODEL, "prompt": text, "max_tokens": 1})).unwrap();
    let url = format!("{}/v1/completions", engine.url());
    // More prompts than the engine's async threads (one per core).
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) + 1;
    let done = Arc::new(AtomicUsize::new(0));
    let prompts: Vec<_> = (0..threads)
        .map(|_| {
            let (url, body, done) = (url.clone(), body.clone(), Arc::clone(&done));
            std::thread::spawn(move || {
                let status = post(&http_client(), &url, body, &[]).unwrap().status;
                done.fetch_add(1, Ordering::SeqCst);
                status
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let metrics = reqwest::blocking::get(format!("{}/metrics", engine.url())).unwrap();
    assert_eq!(metrics.status(), 200);
    assert_eq!(
        done.load(Ordering::SeqCst),
        0,
        "/metrics answered only after a long prompt was done"
    );
    for prompt in prompts {
        // Far past --max-model-len: refused once tokenized.
        assert_eq!(prompt.join().unwrap(), 400);
    }
}
