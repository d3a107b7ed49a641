//! The request path driven through the real `HttpContext` callbacks against a
//! mock host: headers, body, callouts, the decision and the response.

use std::cell::RefCell;
use std::time::Duration;

use prost::Message;
use router_core::gateway::{gateway_report, GatewayReport, RequestPhase};
use router_core::routing::select::WorkerLoad;
use router_core::state_stream::{
    change, state_update, Change, Delta, PromptComputing, Snapshot, StateUpdate, WorkerRole,
    WorkerSnapshot,
};
use serde_json::{json, Value};

use super::*;
use crate::host::mock::MockHost;
use crate::replica::FleetReplica;
use crate::vm_state::VmState;

const A: &str = "10.0.0.1:8000";
const B: &str = "10.0.0.2:8000";
const PREFILL: &str = "10.0.1.1:8000";
const NOW_MS: u64 = 1_000_000;
const COMPLETIONS: &str = "/v1/completions";
const CHAT: &str = "/v1/chat/completions";
const REQUEST: MapType = MapType::HttpRequestHeaders;
const RESPONSE: MapType = MapType::HttpResponseHeaders;

/// A gateway serving model `m` from A and B, with `model` added to the
/// model's configuration.
fn config(model: &str) -> String {
    format!(
        r#"{{"max_body_bytes": 4096, "debug_headers": true,
            "sidecar": {{"cluster": "kv_sidecar", "http_cluster": "kv_sidecar_http"}},
            "models": [{{"name": "m", "cluster": "pool_m", "endpoints": ["{A}", "{B}"] {model}}}]}}"#
    )
}

fn disaggregated(protocol: &str) -> String {
    config(&format!(
        r#", "disaggregation": {{"policy": "always", "protocol": "{protocol}",
            "prefill_cluster": "prefill_pool", "prefill_endpoints": ["{PREFILL}"]}}"#
    ))
}

/// A completion of `tokens` token ids (16 to a block), plus `extra` fields.
fn completion(tokens: u32, extra: &str) -> String {
    let ids: Vec<u32> = (0..tokens).collect();
    format!(r#"{{"model":"m","prompt":{}{extra}}}"#, json!(ids))
}

fn chat(turns: &[&str]) -> String {
    let messages: Vec<Value> = turns
        .iter()
        .map(|content| json!({"role": "user", "content": content}))
        .collect();
    json!({"model": "m", "messages": messages}).to_string()
}

/// One filter VM: its host, configuration, metrics and shared state.
struct Vm {
    host: MockHost,
    config: Rc<PluginConfig>,
    metrics: FilterMetrics,
    state: SharedVmState,
}

impl Vm {
    fn new(config: &str) -> Self {
        let host = MockHost::default();
        host.set_now_ms(NOW_MS);
        let config = PluginConfig::parse(config.as_bytes()).unwrap();
        let replica = config
            .sidecar
            .as_ref()
            .map(|sidecar| FleetReplica::new(&config, sidecar));
        let state = VmState::new(replica, config.approximate, 7);
        Self {
            metrics: FilterMetrics::define(&host).unwrap(),
            host,
            config: Rc::new(config),
            state: Rc::new(RefCell::new(state)),
        }
    }

    /// The block hashes of the first `tokens` token ids.
    fn blocks(&self, tokens: u32) -> Vec<u64> {
        let ids: Vec<u32> = (0..tokens).collect();
        let model = self.config.model("m").unwrap();
        model
            .hasher
            .sequence_hashes(&ids)
            .iter()
            .map(|h| h.0)
            .collect()
    }

    /// Fresh fleet state: decode workers A (empty) and B (holding the first
    /// three blocks of token ids 0..).
    fn with_fleet(self) -> Self {
        let worker = |id: &str, address: &str, blocks: Vec<u64>| WorkerSnapshot {
            worker_id: id.into(),
            address: address.into(),
            role: WorkerRole::Decode as i32,
            blocks,
            load: None,
            data_parallel_rank: None,
        };
        let update = StateUpdate {
            model: "m".into(),
            version: 1,
            kind: Some(state_update::Kind::Snapshot(Snapshot {
                workers: vec![worker("a", A, Vec::new()), worker("b", B, self.blocks(48))],
                continues: false,
            })),
            fleet_unheard: false,
        };
        self.apply(&update);
        self
    }

    /// Fresh fleet state: decode worker B (empty), and a prefill pool of
    /// two data-parallel ranks of one engine at `PREFILL`, rank 1 holding
    /// the first two blocks of token ids 0.., so that it prefills.
    fn with_ranked_prefill_pool(self) -> Self {
        let worker = |id: &str, address: &str, role: WorkerRole, rank, blocks| WorkerSnapshot {
            worker_id: id.into(),
            address: address.into(),
            role: role as i32,
            blocks,
            load: None,
            data_parallel_rank: rank,
        };
        let two_blocks = self.blocks(32);
        self.apply(&StateUpdate {
            model: "m".into(),
            version: 1,
            kind: Some(state_update::Kind::Snapshot(Snapshot {
                workers: vec![
                    worker("b", B, WorkerRole::Decode, None, Vec::new()),
                    worker("p0", PREFILL, WorkerRole::Prefill, Some(0), Vec::new()),
                    worker("p1", PREFILL, WorkerRole::Prefill, Some(1), two_blocks),
                ],
                continues: false,
            })),
            fleet_unheard: false,
        });
        self
    }

    /// Applies a state update as the root context does; returns how many
    /// prompts other routers shared it credited.
    fn apply(&self, update: &StateUpdate) -> u64 {
        let mut state = self.state.borrow_mut();
        let VmState {
            replica, router, ..
        } = &mut *state;
        let replica = replica.as_mut().unwrap();
        let applied = replica.apply(update, NOW_MS, &mut router.computing);
        applied.unwrap().unwrap().shared_prompts
    }

    /// The next delta after `with_fleet`'s snapshot: `worker_id` computes a
    /// prompt whose every 16th block hash is `strides`.
    fn computing(worker_id: &str, strides: Vec<u64>) -> StateUpdate {
        let change = Change {
            kind: Some(change::Kind::Computing(PromptComputing {
                worker_id: worker_id.into(),
                strides,
            })),
        };
        StateUpdate {
            model: "m".into(),
            version: 2,
            kind: Some(state_update::Kind::Delta(Delta {
                changes: vec![change],
            })),
            fleet_unheard: false,
        }
    }

    /// A state stream on which the sidecar has answered.
    fn attach_stream(&self) {
        let mut state = self.state.borrow_mut();
        state.reporter.attach(&self.host, 9);
        state.reporter.connected(&self.host, ["m"], NOW_MS);
    }

    fn stream(&self) -> InferenceStream<MockHost> {
        InferenceStream::new(
            self.host.clone(),
            Rc::clone(&self.config),
            self.metrics,
            Rc::clone(&self.state),
        )
    }

    /// A new request's headers and complete body, and the two actions.
    fn send(&self, path: &str, body: &str) -> (InferenceStream<MockHost>, [Action; 2]) {
        self.send_with(path, body, &[])
    }

    /// As [`send`](Self::send), with `extra` request headers.
    fn send_with(
        &self,
        path: &str,
        body: &str,
        extra: &[(&str, &str)],
    ) -> (InferenceStream<MockHost>, [Action; 2]) {
        let length = body.len().to_string();
        let mut headers = vec![
            (":method", "POST"),
            (":path", path),
            ("content-type", "application/json"),
            ("content-length", &length),
        ];
        headers.extend_from_slice(extra);
        self.host.set_headers(REQUEST, &headers);
        self.host
            .set_body(BufferType::HttpRequestBody, body.as_bytes());
        let mut stream = self.stream();
        let headers = stream.on_http_request_headers(headers.len(), false);
        let body = stream.on_http_request_body(body.len(), true);
        (stream, [headers, body])
    }

    /// Envoy delivers the answer to callout `token`: `status` `None` is a
    /// timeout or reset (no headers at all).
    fn answer(
        &self,
        stream: &mut InferenceStream<MockHost>,
        token: u32,
        status: Option<&str>,
        body: &str,
    ) {
        let headers: Vec<(&str, &str)> = status.map(|s| (":status", s)).into_iter().collect();
        self.host
            .set_headers(MapType::HttpCallResponseHeaders, &headers);
        self.host
            .set_body(BufferType::HttpCallResponseBody, body.as_bytes());
        stream.on_http_call_response(token, headers.len(), body.len(), 0);
    }

    /// The upstream `served_by` answers with `headers` (`:status` 200
    /// unless they hold one).
    fn respond(
        &self,
        stream: &mut InferenceStream<MockHost>,
        served_by: &str,
        headers: &[(&str, &str)],
    ) {
        let mut all = Vec::new();
        if !headers.iter().any(|(name, _)| *name == ":status") {
            all.push((":status", "200"));
        }
        all.extend_from_slice(headers);
        self.host.set_headers(RESPONSE, &all);
        self.host.set_property(&["upstream", "address"], served_by);
        let action = stream.on_http_response_headers(all.len(), false);
        assert_eq!(action, Action::Continue);
    }

    fn destination(&self) -> Option<String> {
        self.host.get(REQUEST, DESTINATION_HEADER)
    }

    fn load(&self, address: &str) -> WorkerLoad {
        self.state.borrow().router.inflight.load(address)
    }

    fn request_body(&self) -> Value {
        serde_json::from_slice(&self.host.body(BufferType::HttpRequestBody)).unwrap()
    }

    /// The reports sent on the state stream so far.
    fn reports(&self) -> Vec<gateway_report::Kind> {
        let recorded = self.host.recorded();
        recorded
            .grpc_messages
            .iter()
            .filter_map(|(_, bytes)| GatewayReport::decode(bytes.as_slice()).unwrap().kind)
            .collect()
    }

    /// The only local response sent: status and OpenAI error body.
    fn rejection(&self) -> (u32, Value) {
        let recorded = self.host.recorded();
        let [response] = recorded.responses.as_slice() else {
            panic!(
                "expected one local response, got {}",
                recorded.responses.len()
            );
        };
        assert_eq!(
            response.headers,
            [("content-type".to_owned(), "application/json".to_owned())]
        );
        (
            response.status,
            serde_json::from_slice(&response.body).unwrap(),
        )
    }
}

#[test]
fn reserved_headers() {
    assert!(is_reserved(b"x-gateway-destination-endpoint"));
    assert!(is_reserved(b"X-Gateway-Destination-Endpoint"));
    assert!(is_reserved(b"x-kvmesh-mode"));
    assert!(is_reserved(b"X-KVMESH-anything"));
    assert!(is_reserved(b"Endpoint-Load-Metrics-Format"));
    assert!(is_reserved(b"X-Data-Parallel-Rank"));
    assert!(is_reserved(b"X-Override-Bootstrap-Host"));
    assert!(is_reserved(b"x-override-routed-dp-rank"));
    assert!(!is_reserved(b"x-kvmes"));
    assert!(!is_reserved(b"x-request-id"));
}

#[test]
fn token_ids_go_precisely_to_the_worker_caching_them() {
    let vm = Vm::new(&config("")).with_fleet();
    let (_stream, actions) = vm.send(COMPLETIONS, &completion(64, ""));
    assert_eq!(actions, [Action::Pause, Action::Continue]);
    assert_eq!(vm.destination().as_deref(), Some(B));
    assert_eq!(vm.host.get(REQUEST, POOL_HEADER).as_deref(), Some("pool_m"));
    assert_eq!(vm.host.recorded().foreign_calls, ["clear_route_cache"]);
    assert_eq!(
        vm.host.get(REQUEST, orca::FORMAT_HEADER).as_deref(),
        Some("TEXT")
    );
    for (counter, value) in [
        ("kvmesh_requests_precise", 1),
        ("kvmesh_requests_approximate", 0),
        ("kvmesh_requests_fallback", 0),
        ("kvmesh_routed_prompt_blocks", 4),
        ("kvmesh_routed_cached_blocks", 3),
        ("kvmesh_routed_to_10_0_0_2_8000", 1),
        ("kvmesh_requests_stale_state", 0),
    ] {
        assert_eq!(vm.host.counter(counter), value, "{counter}");
    }
    assert_eq!(vm.host.samples("kvmesh_decision_us"), 1);
    assert_eq!(vm.host.samples("kvmesh_callback_us"), 2);
    // Four blocks held while it runs; the one uncached block to prefill.
    let expected = WorkerLoad {
        active_blocks: 4,
        queued_prefill_tokens: 16,
    };
    assert_eq!(vm.load(B), expected);
    assert!(vm.host.recorded().callouts.is_empty());
}

/// Ranks 0 and 1 of one engine behind address `A`; rank 1 holds the first
/// three blocks of token ids 0.., and the client asks for rank 0.
#[test]
fn a_data_parallel_rank_is_steered_to_by_its_header() {
    let vm = Vm::new(&config(""));
    let rank = |id: &str, rank: u32, blocks: Vec<u64>| WorkerSnapshot {
        worker_id: id.into(),
        address: A.into(),
        role: WorkerRole::Decode as i32,
        blocks,
        load: None,
        data_parallel_rank: Some(rank),
    };
    vm.apply(&StateUpdate {
        model: "m".into(),
        version: 1,
        kind: Some(state_update::Kind::Snapshot(Snapshot {
            workers: vec![rank("r0", 0, Vec::new()), rank("r1", 1, vm.blocks(48))],
            continues: false,
        })),
        fleet_unheard: false,
    });
    let (mut stream, actions) = vm.send_with(
        COMPLETIONS,
        &completion(64, ""),
        &[(DATA_PARALLEL_RANK_HEADER, "0")],
    );
    assert_eq!(actions, [Action::Pause, Action::Continue]);
    assert_eq!(vm.destination().as_deref(), Some(A));
    assert_eq!(
        vm.host.get(REQUEST, DATA_PARALLEL_RANK_HEADER).as_deref(),
        Some("1")
    );
    assert_eq!(vm.host.counter("kvmesh_routed_cached_blocks"), 3);
    // The load is held for rank 1, not for the address both ranks share.
    let rank1 = format!("{A}#1");
    assert_eq!(vm.load(&rank1).active_blocks, 4);
    assert_eq!(vm.load(A), WorkerLoad::default());
    // An engine's load report covers all its ranks: not asked for, and
    // not recorded for any one rank if it comes anyway.
    assert_eq!(vm.host.get(REQUEST, orca::FORMAT_HEADER), None);
    let report = "TEXT named_metrics.num_requests_waiting=50";
    vm.respond(&mut stream, A, &[(orca::LOAD_HEADER, report)]);
    assert_eq!(vm.host.get(RESPONSE, orca::LOAD_HEADER), None);
    assert_eq!(vm.host.counter("kvmesh_orca_reports"), 0);
    assert_eq!(vm.host.counter("kvmesh_upstream_failovers"), 0);
    stream.on_log();
    assert_eq!(vm.load(&rank1), WorkerLoad::default());
}

#[test]
fn forged_routing_headers_are_stripped() {
    let vm = Vm::new(&config(""));
    let forged = [
        ("X-Gateway-Destination-Endpoint", "10.6.6.6:1"),
        ("x-kvmesh-pool", "attacker_pool"),
        ("x-kvmesh-anything", "1"),
        ("endpoint-load-metrics-format", "JSON"),
        ("X-Data-Parallel-Rank", "3"),
    ];
    let mut headers = vec![(":method", "GET"), (":path", "/v1/models")];
    headers.extend_from_slice(&forged);
    vm.host.set_headers(REQUEST, &headers);
    assert_eq!(
        vm.stream().on_http_request_headers(7, true),
        Action::Continue
    );
    assert_eq!(
        vm.host.headers(REQUEST),
        [
            (":method".to_owned(), "GET".to_owned()),
            (":path".to_owned(), "/v1/models".to_owned())
        ]
    );
    assert_eq!(vm.host.counter("kvmesh_forged_headers_removed"), 5);
    assert_eq!(vm.host.counter("kvmesh_requests_passthrough"), 1);

    // An inference call too: with less than a block to route by, no worker
    // is chosen, and the client's choice must not survive either.
    let mut stream = vm.stream();
    vm.host.set_headers(
        REQUEST,
        &[
            (":method", "POST"),
            (":path", COMPLETIONS),
            (DESTINATION_HEADER, B),
        ],
    );
    let body = completion(4, "");
    vm.host
        .set_body(BufferType::HttpRequestBody, body.as_bytes());
    assert_eq!(stream.on_http_request_headers(3, false), Action::Pause);
    assert_eq!(
        stream.on_http_request_body(body.len(), true),
        Action::Continue
    );
    assert_eq!(vm.destination(), None);
    assert_eq!(vm.host.counter("kvmesh_requests_fallback"), 1);
}

#[test]
fn bad_requests_get_openai_errors() {
    let vm = Vm::new(&config(""));
    let (_, actions) = vm.send(COMPLETIONS, r#"{"model":"m","prompt":"#);
    assert_eq!(actions[1], Action::Pause);
    let (status, body) = vm.rejection();
    assert_eq!(status, 400);
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(vm.host.counter("kvmesh_requests_rejected_invalid"), 1);

    let vm = Vm::new(&config(""));
    vm.send(COMPLETIONS, r#"{"model":"other","prompt":"hi"}"#);
    let (status, body) = vm.rejection();
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "model_not_found");
    assert_eq!(body["error"]["param"], "model");
    assert_eq!(
        body["error"]["message"],
        "The model 'other' does not exist."
    );
    assert_eq!(vm.host.counter("kvmesh_requests_rejected_unknown_model"), 1);

    // Declared too large: refused before any byte of the body is buffered.
    let vm = Vm::new(&config(""));
    vm.host.set_headers(
        REQUEST,
        &[
            (":method", "POST"),
            (":path", CHAT),
            ("content-length", "4097"),
        ],
    );
    assert_eq!(vm.stream().on_http_request_headers(3, false), Action::Pause);
    let (status, body) = vm.rejection();
    assert_eq!(status, 413);
    assert_eq!(body["error"]["code"], "request_too_large");

    // Undeclared, and too large once buffered.
    let vm = Vm::new(&config(""));
    vm.host
        .set_headers(REQUEST, &[(":method", "POST"), (":path", CHAT)]);
    let mut stream = vm.stream();
    assert_eq!(stream.on_http_request_headers(2, false), Action::Pause);
    assert_eq!(stream.on_http_request_body(4000, false), Action::Pause);
    assert!(vm.host.recorded().responses.is_empty());
    assert_eq!(stream.on_http_request_body(4097, false), Action::Pause);
    assert_eq!(vm.rejection().0, 413);
    assert_eq!(vm.host.counter("kvmesh_requests_rejected_too_large"), 1);

    // No body at all.
    let vm = Vm::new(&config(""));
    vm.host
        .set_headers(REQUEST, &[(":method", "POST"), (":path", CHAT)]);
    assert_eq!(vm.stream().on_http_request_headers(2, true), Action::Pause);
    assert_eq!(vm.rejection().0, 400);
    assert_eq!(vm.destination(), None);
}

/// A fresh view without workers (the sidecar lost NATS) routes
/// approximately whatever the hashes, so no tokenization is asked for.
#[test]
fn a_view_without_workers_asks_for_no_tokenization() {
    let vm = Vm::new(&config(""));
    vm.apply(&StateUpdate {
        model: "m".into(),
        version: 1,
        kind: Some(state_update::Kind::Snapshot(Snapshot {
            workers: Vec::new(),
            continues: false,
        })),
        fleet_unheard: false,
    });
    let (_stream, actions) = vm.send(CHAT, &chat(&["hello"]));
    assert_eq!(actions, [Action::Pause, Action::Continue]);
    assert!(vm.host.recorded().callouts.is_empty());
    assert_eq!(vm.host.counter("kvmesh_tokenize_calls"), 0);
}

#[test]
fn a_chat_waits_for_the_sidecars_block_hashes() {
    let vm = Vm::new(&config("")).with_fleet();
    let first = chat(&["hello"]);
    let (mut stream, actions) = vm.send(CHAT, &first);
    assert_eq!(actions, [Action::Pause, Action::Pause]);
    let token = {
        let recorded = vm.host.recorded();
        let [call] = recorded.callouts.as_slice() else {
            panic!("expected one callout");
        };
        assert_eq!(call.cluster, "kv_sidecar_http");
        assert_eq!(call.header(":path"), Some("/v1/tokenize"));
        assert_eq!(call.body, first.as_bytes());
        assert_eq!(call.timeout, Duration::from_millis(250));
        call.token
    };
    assert_eq!(vm.destination(), None);
    assert_eq!(vm.host.counter("kvmesh_prompt_cache_misses"), 1);
    // An answer to some other callout changes nothing.
    vm.answer(&mut stream, token + 1, Some("200"), "{}");
    assert_eq!(vm.host.recorded().resumed, 0);

    let mut hashes = vm.blocks(48);
    hashes.push(99);
    let answer = json!({"block_hashes": hashes, "history_blocks": 3}).to_string();
    vm.answer(&mut stream, token, Some("200"), &answer);
    assert_eq!(vm.host.recorded().resumed, 1);
    assert_eq!(vm.destination().as_deref(), Some(B));
    assert_eq!(vm.host.counter("kvmesh_requests_precise"), 1);
    assert_eq!(vm.host.counter("kvmesh_tokenize_failures"), 0);

    // The next turn finds the first one's hashes in the prompt cache: it is
    // routed at once, and the sidecar tokenizes it in the background only
    // for the cache.
    let second = chat(&["hello", "again"]);
    let (mut stream, actions) = vm.send(CHAT, &second);
    assert_eq!(actions, [Action::Pause, Action::Continue]);
    assert_eq!(vm.destination().as_deref(), Some(B));
    assert_eq!(vm.host.counter("kvmesh_prompt_cache_hits"), 1);
    assert_eq!(vm.host.recorded().callouts.len(), 2);
    let answer = json!({"block_hashes": hashes, "history_blocks": 4}).to_string();
    vm.answer(&mut stream, 2, Some("200"), &answer);
    assert_eq!(vm.host.recorded().resumed, 1);

    // That filled the cache for the second turn itself: no callout now.
    let (_, actions) = vm.send(CHAT, &second);
    assert_eq!(actions, [Action::Pause, Action::Continue]);
    assert_eq!(vm.host.recorded().callouts.len(), 2);
    assert_eq!(vm.host.counter("kvmesh_prompt_cache_hits"), 2);
    assert_eq!(vm.host.counter("kvmesh_tokenize_calls"), 2);
}

#[test]
fn a_failed_tokenization_routes_approximately() {
    // Long enough for approximate routing's text keys.
    let question = "how long is a piece of string? ".repeat(20);
    for status in [Some("503"), None] {
        let vm = Vm::new(&config("")).with_fleet();
        let (mut stream, actions) = vm.send(CHAT, &chat(&[&question]));
        assert_eq!(actions[1], Action::Pause);
        vm.answer(&mut stream, 1, status, "upstream timeout");
        assert_eq!(vm.host.recorded().resumed, 1);
        assert_eq!(vm.host.counter("kvmesh_tokenize_failures"), 1);
        assert_eq!(vm.host.counter("kvmesh_requests_approximate"), 1);
        let destination = vm.destination().unwrap();
        assert!([A, B].contains(&destination.as_str()), "{destination}");
    }
}

#[test]
fn handshake_fields_are_removed_from_the_body() {
    for field in [
        r#","kv_transfer_params":{"remote_host":"10.6.6.6"}"#,
        r#","kv_transfer_param\u0073":{"do_remote_prefill":true}"#,
    ] {
        let vm = Vm::new(&config(""));
        let (_, actions) = vm.send(COMPLETIONS, &completion(32, field));
        assert_eq!(actions[1], Action::Continue);
        let body = vm.request_body();
        assert_eq!(
            body,
            json!({"model": "m", "prompt": (0..32).collect::<Vec<_>>()})
        );
        let length = vm.host.body(BufferType::HttpRequestBody).len().to_string();
        assert_eq!(vm.host.get(REQUEST, "content-length"), Some(length));
        assert_eq!(vm.host.counter("kvmesh_router_fields_removed"), 1);
    }
}

#[test]
fn the_response_releases_the_load_and_reports_progress() {
    let vm = Vm::new(&config("")).with_fleet();
    vm.attach_stream();
    let (mut stream, _) = vm.send(COMPLETIONS, &completion(64, ""));
    let Some(gateway_report::Kind::Decision(decision)) = vm.reports().pop() else {
        panic!("expected a decision report");
    };
    assert_eq!(
        (decision.worker_id.as_str(), decision.cached_blocks),
        ("b", 3)
    );
    assert_eq!(decision.prefill_tokens, 16);

    let load_report = "TEXT named_metrics.kv_cache_usage_perc=0.5";
    vm.respond(&mut stream, B, &[(orca::LOAD_HEADER, load_report)]);
    // The prefill is done; the blocks stay held until the stream ends.
    let running = WorkerLoad {
        active_blocks: 4,
        queued_prefill_tokens: 0,
    };
    assert_eq!(vm.load(B), running);
    assert_eq!(vm.host.get(RESPONSE, orca::LOAD_HEADER), None);
    assert_eq!(vm.host.counter("kvmesh_orca_reports"), 1);
    assert_eq!(
        vm.host.get(RESPONSE, "x-kvmesh-mode").as_deref(),
        Some("precise")
    );
    assert_eq!(vm.host.get(RESPONSE, "x-kvmesh-worker").as_deref(), Some(B));
    assert_eq!(
        vm.host.get(RESPONSE, "x-kvmesh-cached-blocks").as_deref(),
        Some("3")
    );
    assert_eq!(
        vm.host
            .get(RESPONSE, "x-kvmesh-most-cached-blocks")
            .as_deref(),
        Some("3")
    );
    assert_eq!(vm.host.counter("kvmesh_upstream_failovers"), 0);

    stream.on_log();
    assert_eq!(vm.load(B), WorkerLoad::default());
    let phases: Vec<i32> = vm
        .reports()
        .into_iter()
        .filter_map(|kind| match kind {
            gateway_report::Kind::Progress(progress) => {
                assert_eq!(progress.request_id, decision.request_id);
                Some(progress.phase)
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        phases,
        [RequestPhase::FirstToken as i32, RequestPhase::Done as i32]
    );
    assert_eq!(vm.host.counter("kvmesh_gateway_reports_sent"), 3);
}

/// Sidecars count a reported request's load until they hear it ended (or
/// for minutes). A stream that breaks loses what was sent on it, so the
/// next one to connect is told exactly which requests are still open:
/// one that ended meanwhile is not, one routed meanwhile is.
#[test]
fn a_new_stream_is_told_the_requests_still_open() {
    let vm = Vm::new(&config("")).with_fleet();
    vm.attach_stream();
    let (mut ended, _) = vm.send(COMPLETIONS, &completion(64, ""));
    vm.respond(&mut ended, B, &[]);
    vm.state.borrow_mut().reporter.detach();
    ended.on_log();
    let (mut running, _) = vm.send(COMPLETIONS, &completion(80, ""));
    vm.respond(&mut running, B, &[]);
    let before = vm.reports().len();
    // A new stream is not connected until the sidecar answers on it.
    let mut state = vm.state.borrow_mut();
    state.reporter.attach(&vm.host, 10);
    assert_eq!(state.reporter.connected(&vm.host, ["m"], NOW_MS), 1);
    assert_eq!(state.reporter.connected(&vm.host, ["m"], NOW_MS + 1), 0);
    drop(state);
    let reports = vm.reports();
    let [gateway_report::Kind::Hello(_), gateway_report::Kind::Resync(resync)] = &reports[before..]
    else {
        panic!("{reports:?}");
    };
    let [open] = resync.requests.as_slice() else {
        panic!("{resync:?}");
    };
    let decision = open.decision.as_ref().unwrap();
    assert_eq!((decision.prompt_blocks, open.first_token), (5, true));
    assert_eq!(
        (resync.model.as_str(), resync.part, resync.parts),
        ("m", 0, 1)
    );
    running.on_log();
    let mut state = vm.state.borrow_mut();
    state.reporter.detach();
    state.reporter.attach(&vm.host, 11);
    state.reporter.connected(&vm.host, ["m"], NOW_MS);
    drop(state);
    let Some(gateway_report::Kind::Resync(resync)) = vm.reports().pop() else {
        panic!("no resync");
    };
    assert!(resync.requests.is_empty(), "{resync:?}");
}

#[test]
fn its_decisions_share_the_prompt_being_computed() {
    let vm = Vm::new(&config("")).with_fleet();
    vm.attach_stream();
    vm.send(COMPLETIONS, &completion(512, ""));
    assert_eq!(vm.destination().as_deref(), Some(B));
    let Some(gateway_report::Kind::Decision(decision)) = vm.reports().pop() else {
        panic!("expected a decision report");
    };
    // B held 3 of the 32 blocks: both strides (blocks 15 and 31) are new.
    let blocks = vm.blocks(512);
    let strides = vec![blocks[15], blocks[31]];
    assert_eq!(decision.computing, strides);
    // The sidecar streams it back to this VM too: already credited.
    assert_eq!(vm.apply(&Vm::computing("b", strides)), 0);
    // A prompt shorter than one stride has nothing to share.
    vm.send(COMPLETIONS, &completion(48, ""));
    let Some(gateway_report::Kind::Decision(short)) = vm.reports().pop() else {
        panic!("expected a decision report");
    };
    assert_eq!(short.computing, Vec::<u64>::new());
}

#[test]
fn a_prompt_another_router_is_computing_routes_to_its_worker() {
    let vm = Vm::new(&config("")).with_fleet();
    let blocks = vm.blocks(512);
    // Without the share B, holding 3 blocks, would win (see above).
    assert_eq!(
        vm.apply(&Vm::computing("a", vec![blocks[15], blocks[31]])),
        1
    );
    vm.send(COMPLETIONS, &completion(512, ""));
    assert_eq!(vm.destination().as_deref(), Some(A));
    assert_eq!(vm.host.counter("kvmesh_routed_cached_blocks"), 32);
}

#[test]
fn a_load_report_never_reaches_the_client() {
    let vm = Vm::new(&config(""));
    vm.host
        .set_headers(REQUEST, &[(":method", "GET"), (":path", "/health")]);
    let mut stream = vm.stream();
    stream.on_http_request_headers(2, true);
    vm.respond(&mut stream, A, &[(orca::LOAD_HEADER, "TEXT a=1")]);
    assert_eq!(vm.host.get(RESPONSE, orca::LOAD_HEADER), None);
    assert_eq!(vm.host.counter("kvmesh_orca_reports"), 0);
    assert_eq!(vm.host.get(RESPONSE, "x-kvmesh-mode"), None);
}

#[test]
fn a_worker_that_did_not_serve_its_request_is_left_out() {
    let vm = Vm::new(&config("")).with_fleet();
    let (mut stream, _) = vm.send(COMPLETIONS, &completion(64, ""));
    assert_eq!(vm.destination().as_deref(), Some(B));
    // B refused the connection; Envoy's retry went to A.
    vm.respond(&mut stream, A, &[]);
    stream.on_log();
    assert_eq!(vm.host.counter("kvmesh_upstream_failovers"), 1);
    let (mut stream, _) = vm.send(COMPLETIONS, &completion(64, ""));
    assert_eq!(vm.destination().as_deref(), Some(A));
    // A served it: nothing is left out for that.
    vm.respond(&mut stream, A, &[]);
    assert_eq!(vm.host.counter("kvmesh_upstream_failovers"), 1);
}

/// A worker that fails fast looks idle to the cost function (its requests
/// end at once), so without the hold it would draw ever more of them.
#[test]
fn a_worker_that_answers_with_errors_is_left_out() {
    let vm = Vm::new(&config("")).with_fleet();
    for (status, held) in [("503", true), ("429", true), ("500", true), ("400", false)] {
        vm.state.borrow_mut().router.unreachable.clear(B);
        // One error may be the request's; the second in a row is the worker.
        for _ in 0..2 {
            let (mut stream, _) = vm.send(COMPLETIONS, &completion(64, ""));
            assert_eq!(vm.destination().as_deref(), Some(B), "{status}");
            vm.respond(&mut stream, B, &[(":status", status)]);
            stream.on_log();
        }
        let (mut stream, _) = vm.send(COMPLETIONS, &completion(64, ""));
        let expected = if held { A } else { B };
        assert_eq!(vm.destination().as_deref(), Some(expected), "{status}");
        vm.respond(&mut stream, expected, &[]);
        stream.on_log();
    }
    assert_eq!(vm.host.counter("kvmesh_upstream_errors"), 6);
    assert_eq!(vm.host.counter("kvmesh_upstream_failovers"), 0);
}

#[test]
fn vllm_decode_waits_for_the_prefill_leg() {
    let vm = Vm::new(&disaggregated("vllm")).with_fleet();
    let (mut stream, actions) = vm.send(COMPLETIONS, &completion(64, ""));
    assert_eq!(actions, [Action::Pause, Action::Pause]);
    let request_id = vm.host.get(REQUEST, "x-request-id").unwrap();
    {
        let recorded = vm.host.recorded();
        let [call] = recorded.callouts.as_slice() else {
            panic!("expected the prefill leg");
        };
        assert_eq!(call.cluster, "prefill_pool");
        assert_eq!(call.header(DESTINATION_HEADER), Some(PREFILL));
        assert_eq!(call.header("x-request-id"), Some(request_id.as_str()));
        let leg: Value = serde_json::from_slice(&call.body).unwrap();
        assert_eq!(leg["max_tokens"], 1);
        assert_eq!(leg["kv_transfer_params"]["do_remote_decode"], true);
    }
    assert_eq!(vm.destination(), None);
    assert_eq!(vm.load(PREFILL).queued_prefill_tokens, 64);

    let params = json!({"remote_engine_id": "e", "remote_block_ids": [1, 2]});
    let answer = json!({"choices": [], "kv_transfer_params": params}).to_string();
    vm.answer(&mut stream, 1, Some("200"), &answer);
    assert_eq!(vm.host.recorded().resumed, 1);
    assert_eq!(vm.destination().as_deref(), Some(B));
    assert_eq!(vm.request_body()["kv_transfer_params"], params);
    assert_eq!(vm.host.counter("kvmesh_remote_prefills"), 1);
    assert_eq!(vm.load(PREFILL), WorkerLoad::default());
    // The decode worker prefills nothing itself.
    assert_eq!(vm.load(B).queued_prefill_tokens, 0);
    vm.respond(&mut stream, B, &[]);
    assert_eq!(vm.host.get(RESPONSE, "x-kvmesh-worker").as_deref(), Some(B));
    assert_eq!(
        vm.host.get(RESPONSE, "x-kvmesh-prefill-worker").as_deref(),
        Some(PREFILL)
    );

    stream.on_log();

    // While the leg runs the decode worker counts the blocks it is about to
    // receive; the client leaving gives both workers' load back.
    let (mut stream, _) = vm.send(COMPLETIONS, &completion(64, ""));
    assert_ne!(vm.load(PREFILL), WorkerLoad::default());
    assert_eq!(vm.load(B).active_blocks, 4);
    stream.on_log();
    assert_eq!(vm.load(PREFILL), WorkerLoad::default());
    assert_eq!(vm.load(B), WorkerLoad::default());

    // A failed leg: the decode worker prefills the original request. A 4xx
    // is the request's fault; two 5xx (or no answer) in a row leave the
    // prefill worker out, so the next long prompt is not sent to it.
    for (token, status, failures, errors) in [(3, "400", 1, 0), (4, "500", 2, 1), (5, "500", 3, 2)]
    {
        let (mut stream, _) = vm.send(COMPLETIONS, &completion(64, ""));
        vm.answer(&mut stream, token, Some(status), "");
        assert_eq!(vm.host.counter("kvmesh_prefill_failures"), failures);
        assert_eq!(vm.request_body().get("kv_transfer_params"), None);
        assert_eq!(vm.destination().as_deref(), Some(B));
        vm.respond(&mut stream, B, &[]);
        assert_eq!(vm.host.get(RESPONSE, "x-kvmesh-prefill-worker"), None);
        stream.on_log();
        assert_eq!(vm.host.counter("kvmesh_upstream_errors"), errors);
    }
    let callouts = vm.host.recorded().callouts.len();
    let (_stream, actions) = vm.send(COMPLETIONS, &completion(64, ""));
    assert_eq!(actions, [Action::Pause, Action::Continue]);
    assert_eq!(vm.host.recorded().callouts.len(), callouts);
    assert_eq!(vm.destination().as_deref(), Some(B));
}

#[test]
fn the_prefill_leg_goes_to_a_prefill_workers_rank() {
    let vm = Vm::new(&disaggregated("vllm")).with_ranked_prefill_pool();
    let (mut stream, actions) = vm.send(COMPLETIONS, &completion(64, ""));
    assert_eq!(actions, [Action::Pause, Action::Pause]);
    {
        let recorded = vm.host.recorded();
        let [call] = recorded.callouts.as_slice() else {
            panic!("expected the prefill leg");
        };
        assert_eq!(call.header(DESTINATION_HEADER), Some(PREFILL));
        assert_eq!(call.header(DATA_PARALLEL_RANK_HEADER), Some("1"));
    }
    let rank1 = format!("{PREFILL}#1");
    assert_eq!(vm.load(&rank1).queued_prefill_tokens, 32);
    assert_eq!(vm.load(PREFILL), WorkerLoad::default());
    let params = json!({"remote_engine_id": "e", "remote_block_ids": [1, 2]});
    let answer = json!({"choices": [], "kv_transfer_params": params}).to_string();
    vm.answer(&mut stream, 1, Some("200"), &answer);
    // The decode worker is a plain one: no rank for it.
    assert_eq!(vm.destination().as_deref(), Some(B));
    assert_eq!(vm.host.get(REQUEST, DATA_PARALLEL_RANK_HEADER), None);
    assert_eq!(vm.load(&rank1), WorkerLoad::default());
    vm.respond(&mut stream, B, &[]);
    assert_eq!(
        vm.host.get(RESPONSE, "x-kvmesh-prefill-worker").as_deref(),
        Some(rank1.as_str())
    );
    stream.on_log();
}

#[test]
fn the_prefill_leg_carries_the_clients_credentials_and_trace() {
    let vm = Vm::new(&disaggregated("vllm")).with_fleet();
    let extra = [
        ("authorization", "Bearer sk-test"),
        (
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ),
        ("cookie", "session=1"),
    ];
    vm.send_with(COMPLETIONS, &completion(64, ""), &extra);
    let recorded = vm.host.recorded();
    let [call] = recorded.callouts.as_slice() else {
        panic!("expected the prefill leg");
    };
    assert_eq!(call.header("authorization"), Some("Bearer sk-test"));
    assert_eq!(call.header("traceparent"), Some(extra[1].1));
    assert_eq!(call.header("cookie"), None);
}

/// An engine answers a batch's prefill leg with its first prompt's transfer
/// parameters only; the decode leg would apply them to every prompt.
#[test]
fn a_batch_of_prompts_is_never_prefilled_remotely() {
    let vm = Vm::new(&disaggregated("vllm")).with_fleet();
    let ids = |start: u32| {
        (start..start + 64)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let body = format!(
        r#"{{"model":"m","prompt":[[{}],[{}]],"max_tokens":4}}"#,
        ids(0),
        ids(1000)
    );
    let (_stream, actions) = vm.send(COMPLETIONS, &body);
    assert_eq!(actions, [Action::Pause, Action::Continue]);
    assert!(vm.host.recorded().callouts.is_empty());
    assert_eq!(vm.destination().as_deref(), Some(B));
    assert_eq!(vm.host.counter("kvmesh_prefill_failures"), 0);
}

/// SGLang's decode engine finds the KV on the prefill rank both legs name,
/// not on `bootstrap_room % ranks`.
#[test]
fn sglang_legs_name_the_prefill_rank() {
    let vm = Vm::new(&disaggregated("sglang")).with_ranked_prefill_pool();
    let (_stream, actions) = vm.send(COMPLETIONS, &completion(64, ""));
    assert_eq!(actions, [Action::Pause, Action::Continue]);
    let recorded = vm.host.recorded();
    let [call] = recorded.callouts.as_slice() else {
        panic!("expected the prefill leg");
    };
    assert_eq!(call.header(DATA_PARALLEL_RANK_HEADER), Some("1"));
    let prefill_leg: Value = serde_json::from_slice(&call.body).unwrap();
    assert_eq!(prefill_leg["disagg_prefill_dp_rank"], 1);
    assert_eq!(vm.request_body()["disagg_prefill_dp_rank"], 1);
    assert_eq!(vm.destination().as_deref(), Some(B));
}

#[test]
fn sglang_runs_both_legs_at_once() {
    let vm = Vm::new(&disaggregated("sglang")).with_fleet();
    let (mut stream, actions) = vm.send(COMPLETIONS, &completion(64, ""));
    assert_eq!(actions, [Action::Pause, Action::Continue]);
    assert_eq!(vm.destination().as_deref(), Some(B));
    let body = vm.request_body();
    assert_eq!(body["bootstrap_host"], "10.0.1.1");
    assert_eq!(
        vm.host.recorded().callouts[0].body,
        vm.host.body(BufferType::HttpRequestBody)
    );
    assert_ne!(vm.load(PREFILL), WorkerLoad::default());
    vm.answer(&mut stream, 1, Some("200"), "{}");
    assert_eq!(vm.host.counter("kvmesh_remote_prefills"), 1);
    assert_eq!(vm.load(PREFILL), WorkerLoad::default());
    // The decode leg was never paused, so it is not resumed.
    assert_eq!(vm.host.recorded().resumed, 0);
    vm.respond(&mut stream, B, &[]);
    assert_eq!(
        vm.host.get(RESPONSE, "x-kvmesh-prefill-worker").as_deref(),
        Some(PREFILL)
    );
    stream.on_log();
    assert_eq!(vm.load(B), WorkerLoad::default());
}
