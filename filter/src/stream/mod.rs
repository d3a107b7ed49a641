//! One HTTP request through the filter: strip forged routing headers, buffer
//! the body of inference calls, parse it, and choose the endpoint.
//!
//! The request moves through [`Phase`]s; each callback turns the current
//! phase into the next, and what a phase holds is exactly what the steps
//! after it need. Every host call goes through the stream's [`Host`], so the
//! whole path runs against a mock in unit tests (`tests.rs`).

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, MapType};
use router_core::gateway::{RequestPhase, RequestProgress, RoutingDecision};
use router_core::openai_error::{bounded_message, error_body, ErrorKind};
use router_core::request::{parse_request, Endpoint, RequestError, PROMPT_FIELD_HEADER};
use router_core::routing::inflight::{RequestLoad, Ticket};
use router_core::routing::prefix_keys::PrefixKeys;
use router_core::routing::prompt::{is_tokenizable, PromptIdentity};
use router_core::routing::{plan, Decision, Mode, RoutedPrompt, RoutingPlan, Signals};
use router_core::target::DATA_PARALLEL_RANK_HEADER;
use router_core::{SeqHash, Target};
use serde::Deserialize;

mod prefill;
#[cfg(test)]
mod tests;

use prefill::{PrefillLeg, PrefillWait};

use crate::config::PluginConfig;
use crate::disagg::body;
use crate::host::{EnvoyHost, Host, HostError};
use crate::metrics::FilterMetrics;
use crate::orca;
use crate::vm_state::SharedVmState;
use router_core::routing::prompt_cache::prompt_keys;

/// Header read by Envoy's `override_host` load balancer.
pub const DESTINATION_HEADER: &str = "x-gateway-destination-endpoint";
/// Names the model's pool cluster; routes send it there with `cluster_header`.
pub const POOL_HEADER: &str = "x-kvmesh-pool";
/// Prefix of kvmesh's internal headers; never accepted from clients.
pub const RESERVED_PREFIX: &[u8] = b"x-kvmesh-";
/// Prefixes of request headers never passed on from clients: kvmesh's own,
/// and SGLang's `x-override-*`, which (with
/// `SGLANG_ENABLE_REQUEST_HEADER_OVERRIDES`) override the body's bootstrap
/// and rank fields the filter strips.
const RESERVED_PREFIXES: [&[u8]; 2] = [RESERVED_PREFIX, b"x-override-"];
/// Request headers only the filter may send upstream: the routing headers
/// (the worker, and its data-parallel rank behind that address), and the
/// request for an engine's load report (its answer is the filter's).
const RESERVED_HEADERS: [&str; 3] = [
    DESTINATION_HEADER,
    DATA_PARALLEL_RANK_HEADER,
    orca::FORMAT_HEADER,
];

pub struct InferenceStream<H: Host = EnvoyHost> {
    host: H,
    config: Rc<PluginConfig>,
    metrics: FilterMetrics,
    state: SharedVmState,
    phase: Phase,
    /// A tokenization that only fills the prompt cache: the request was
    /// routed from the cache without waiting for it.
    cache_fill: Option<TokenizeCall>,
    /// The routed request, whose decision and progress the sidecar is told.
    reported: Option<Reported>,
}

/// Where a request is.
enum Phase {
    /// The request headers have not arrived yet.
    Headers,
    /// An inference call's body is arriving; `body_size` bytes so far.
    Buffering {
        endpoint: Endpoint,
        body_size: usize,
    },
    /// Routing waits for the sidecar's block hashes.
    AwaitingTokens(PendingTokenize),
    /// The decode leg waits for the prefill leg's answer.
    AwaitingPrefill(PrefillWait),
    /// Sent on upstream, to the chosen worker if there was one.
    Routed(Routed),
    /// Nothing (more) to do: not an inference call, or the stream ended.
    Passthrough,
    /// Answered by the filter itself: an error, or a context leg that
    /// finished the request.
    Answered,
}

impl Phase {
    /// What Envoy does with the request in this phase.
    fn action(&self) -> Action {
        match self {
            Phase::Headers | Phase::Routed(_) | Phase::Passthrough => Action::Continue,
            Phase::Buffering { .. }
            | Phase::AwaitingTokens(_)
            | Phase::AwaitingPrefill(_)
            | Phase::Answered => Action::Pause,
        }
    }
}

/// A routed request's hold on shared state until its stream ends.
struct Routed {
    /// The chosen worker and its share of in-flight load there; `None` when
    /// no worker was chosen.
    steered: Option<Steered>,
    /// An SGLang prefill leg running beside the decode leg.
    prefill: Option<PrefillLeg>,
    /// What the opt-in debug response headers say.
    debug: Option<DebugHeaders>,
}

/// Where a request (or its prefill leg) was steered, and the load it holds
/// there.
struct Steered {
    target: Target,
    ticket: Ticket,
}

/// The address a worker's ORCA load reports are recorded for: none for a
/// data-parallel rank, since an engine's report covers every rank behind its
/// address (vLLM lists each rank's series under one name), which would make
/// all of them look as busy as the one listed last.
fn orca_subject(target: &Target) -> Option<&str> {
    target
        .data_parallel_rank()
        .is_none()
        .then(|| target.address())
}

/// The decision, and the worker that prefilled the prompt for the chosen
/// one (none when the chosen worker computes it itself).
struct DebugHeaders {
    decision: Decision,
    prefill_worker: Option<String>,
}

/// The buffered request body as routing found it.
#[derive(Debug, Clone, Copy)]
struct BufferedBody {
    /// Its length now (after any rewrite).
    size: usize,
    /// The client asked for a streamed response.
    client_streams: bool,
    /// A prefill worker may compute the prompt (it is not a batch).
    can_prefill_remotely: bool,
}

/// A `/v1/tokenize` callout in flight.
struct TokenizeCall {
    token: u32,
    /// Prompt-cache key its answer is stored under.
    cache_key: Option<u64>,
}

/// What a request waiting for its block hashes already knows.
struct PendingTokenize {
    call: TokenizeCall,
    model: String,
    /// Approximate-mode keys, if the sidecar does not answer in time.
    keys: PrefixKeys,
    body: BufferedBody,
}

/// A routed request: its decision and progress go to the sidecar.
struct Reported {
    model: String,
    request_id: String,
}

/// The part of `/v1/tokenize`'s answer routing needs.
#[derive(Deserialize)]
struct TokenizeResponse {
    block_hashes: Vec<u64>,
    /// Leading blocks that stay the same when the conversation goes on.
    #[serde(default)]
    history_blocks: usize,
}

impl<H: Host> InferenceStream<H> {
    pub fn new(
        host: H,
        config: Rc<PluginConfig>,
        metrics: FilterMetrics,
        state: SharedVmState,
    ) -> Self {
        Self {
            host,
            config,
            metrics,
            state,
            phase: Phase::Headers,
            cache_fill: None,
            reported: None,
        }
    }

    fn now_ns(&self) -> u64 {
        self.host.now_ns().unwrap_or(0)
    }

    fn now_ms(&self) -> u64 {
        self.host.now_ms().unwrap_or(0)
    }

    /// Microseconds since `started_ns` on the host clock.
    fn elapsed_us(&self, started_ns: u64) -> u64 {
        self.host
            .now_ns()
            .unwrap_or(started_ns)
            .saturating_sub(started_ns)
            / 1_000
    }

    /// Runs one request-path callback, timing how long it holds the thread.
    fn timed<T>(&mut self, callback: impl FnOnce(&mut Self, u64) -> T) -> T {
        let started_ns = self.now_ns();
        let result = callback(self, started_ns);
        self.metrics
            .callback_us
            .record(&self.host, self.elapsed_us(started_ns));
        result
    }

    /// Removes every client-supplied routing header, so only this filter's
    /// decision can steer the load balancer.
    fn strip_reserved_headers(&self) {
        let pairs = match self.host.header_pairs(MapType::HttpRequestHeaders) {
            Ok(pairs) => pairs,
            Err(err) => {
                self.host_error(err);
                return;
            }
        };
        for (name, _) in pairs {
            if is_reserved(&name) {
                self.metrics.forged_headers_removed.inc(&self.host);
                if let Err(err) = self.host.remove_header(MapType::HttpRequestHeaders, &name) {
                    self.host_error(err);
                }
            }
        }
    }

    fn request_header(&self, name: &str) -> Option<String> {
        match self.host.header(MapType::HttpRequestHeaders, name) {
            Ok(value) => value.and_then(|v| String::from_utf8(v).ok()),
            Err(err) => {
                self.host_error(err);
                None
            }
        }
    }

    fn host_error(&self, err: HostError) {
        self.metrics.host_errors.inc(&self.host);
        log::warn!("{err}");
    }

    /// Answers the client with an OpenAI error and stops the request.
    fn reject(&self, kind: ErrorKind, body: &str) -> Phase {
        let counter = match kind {
            ErrorKind::RequestTooLarge => self.metrics.rejected_too_large,
            ErrorKind::ModelNotFound => self.metrics.rejected_unknown_model,
            ErrorKind::InvalidRequest
            | ErrorKind::NoWorkerAvailable
            | ErrorKind::MethodNotAllowed => self.metrics.rejected_invalid,
        };
        counter.inc(&self.host);
        let headers: &[(&str, &str)] = match kind {
            ErrorKind::MethodNotAllowed => {
                &[("content-type", "application/json"), ("allow", "POST")]
            }
            _ => &[("content-type", "application/json")],
        };
        if let Err(err) =
            self.host
                .send_response(u32::from(kind.status()), headers, body.as_bytes())
        {
            self.host_error(err);
        }
        Phase::Answered
    }

    fn reject_request(&self, err: &RequestError) -> Phase {
        let (_, body) = err.to_response();
        self.reject(err.kind(), &body)
    }

    fn too_large(&self, size: usize) -> Phase {
        self.reject_request(&RequestError::TooLarge {
            size,
            limit: self.config.max_body_bytes,
        })
    }

    /// Parses the complete body (`body_size` bytes) and routes the request.
    fn route(&mut self, endpoint: Endpoint, body_size: usize) -> Phase {
        let body = match self.host.buffer(BufferType::HttpRequestBody, 0, body_size) {
            Ok(body) => body,
            Err(err) => {
                // An unread body cannot be checked for handshake fields:
                // refuse it rather than forward it unchecked.
                self.host_error(err);
                let message = "the request body could not be read; retry the request";
                return self.reject(
                    ErrorKind::NoWorkerAvailable,
                    &error_body(ErrorKind::NoWorkerAvailable, message, None),
                );
            }
        };
        let request = match parse_request(endpoint, &body, self.config.max_body_bytes) {
            Ok(request) => request,
            Err(err) => return self.reject_request(&err),
        };
        let client_streams = request.stream;
        let Some(model) = self.config.model(&request.model) else {
            let message = bounded_message(format_args!(
                "The model '{}' does not exist.",
                request.model
            ));
            return self.reject(
                ErrorKind::ModelNotFound,
                &error_body(ErrorKind::ModelNotFound, &message, Some("model")),
            );
        };
        let model_name = model.name.clone();
        let started_ns = self.now_ns();
        // Token ids are hashed, then dropped, before the body is rewritten:
        // at most two body-sized buffers are alive at a time.
        let PromptIdentity {
            exact,
            keys,
            text_seed,
        } = PromptIdentity::of(
            &model.hasher,
            &request.prompt,
            request.cache_salt.as_deref(),
        );
        let tokenizable = is_tokenizable(&request.prompt);
        let can_prefill_remotely = request.prompt.can_prefill_remotely();
        let cache_keys = prompt_keys(&request.raw_digests, text_seed);
        let has_handshake_fields = request.has_handshake_fields;
        drop(request);
        let (body, body_size) = if has_handshake_fields {
            match self.strip_router_fields(&body, body_size) {
                Some(stripped) => {
                    let size = stripped.len();
                    (stripped, size)
                }
                // Never forward fields that could not be removed.
                None => {
                    let message = "the request's handshake fields could not be removed";
                    return self.reject(
                        ErrorKind::InvalidRequest,
                        &error_body(ErrorKind::InvalidRequest, message, None),
                    );
                }
            }
        } else {
            (body, body_size)
        };
        let buffered = BufferedBody {
            size: body_size,
            client_streams,
            can_prefill_remotely,
        };
        let prompt = |exact| RoutedPrompt { exact, keys: &keys };
        if exact.is_some() || !tokenizable {
            return self.decide_and_apply(
                &model_name,
                prompt(exact.as_deref()),
                buffered,
                started_ns,
            );
        }
        let tokenize = |stream: &Self| {
            stream
                .dispatch_tokenize(&model_name, endpoint, &body)
                .map(|token| TokenizeCall {
                    token,
                    cache_key: cache_keys.last().copied(),
                })
        };
        let hit = self.state.borrow_mut().prompt_cache.lookup(&cache_keys);
        if let Some(hit) = hit {
            self.metrics.prompt_cache_hits.inc(&self.host);
            let phase =
                self.decide_and_apply(&model_name, prompt(Some(&hit.hashes)), buffered, started_ns);
            // A new turn: ask the sidecar in the background, so the cache
            // learns this request's messages for the turn after it. Sent
            // after deciding, so the decision never waits on the callout.
            if !hit.complete {
                self.cache_fill = tokenize(self);
            }
            return phase;
        }
        match tokenize(self) {
            Some(call) => {
                self.metrics.prompt_cache_misses.inc(&self.host);
                // The request waits for the sidecar; the Envoy thread does not.
                Phase::AwaitingTokens(PendingTokenize {
                    call,
                    model: model_name,
                    keys,
                    body: buffered,
                })
            }
            None => self.decide_and_apply(&model_name, prompt(None), buffered, started_ns),
        }
    }

    /// Removes the handshake fields a client put in the body (matched by
    /// parsed key, whatever the escaping): only the router may tell an
    /// engine where to fetch KV from. The stripped body replaces the
    /// buffered one (`body_size` bytes); `None` if it could not be rewritten.
    fn strip_router_fields(&self, raw: &[u8], body_size: usize) -> Option<Vec<u8>> {
        let stripped = body::strip_router_fields(raw).ok()?;
        self.metrics.router_fields_removed.inc(&self.host);
        self.replace_body(body_size, &stripped).then_some(stripped)
    }

    /// Asks the sidecar for the prompt's block hashes when precise routing is
    /// possible at all; `None` when routing must go on without them.
    fn dispatch_tokenize(&self, model: &str, endpoint: Endpoint, body: &[u8]) -> Option<u32> {
        let sidecar = self.config.sidecar.as_ref()?;
        let cluster = sidecar.http_cluster.as_ref()?;
        let now = self.now_ms();
        // Without a fresh view holding workers (the stream went stale, the
        // sidecar no longer hears the fleet, or another model's updates keep
        // the stream fresh) routing is approximate whatever the hashes: the
        // round trip would buy nothing.
        let has_workers = self
            .state
            .borrow()
            .replica
            .as_ref()
            .and_then(|r| r.fresh_view(model, now))
            .is_some_and(|view| view.workers().next().is_some());
        if !has_workers {
            return None;
        }
        let headers = [
            (":method", "POST"),
            (":path", "/v1/tokenize"),
            (":authority", "kv-sidecar"),
            ("content-type", "application/json"),
            (PROMPT_FIELD_HEADER, endpoint.prompt_field()),
        ];
        match self
            .host
            .dispatch_http_call(cluster, &headers, body, sidecar.tokenize_timeout)
        {
            Ok(token) => {
                self.metrics.tokenize_calls.inc(&self.host);
                Some(token)
            }
            Err(err) => {
                self.metrics.tokenize_failures.inc(&self.host);
                log::debug!("cannot call the tokenizer on {cluster}: {err}");
                None
            }
        }
    }

    /// Whether the callout whose response is being delivered answered 200.
    fn call_succeeded(&self) -> bool {
        self.status(MapType::HttpCallResponseHeaders) == Some(200)
    }

    /// The `:status` of the response (or callout response) in `map`.
    fn status(&self, map: MapType) -> Option<u16> {
        let status = self.host.header(map, ":status").ok().flatten()?;
        std::str::from_utf8(&status).ok()?.parse().ok()
    }

    /// The block hashes in the sidecar's `/v1/tokenize` answer, if it gave
    /// one; their history fills the prompt cache.
    fn tokenized(&self, call: &TokenizeCall, body_size: usize) -> Option<Vec<SeqHash>> {
        if !self.call_succeeded() {
            return None;
        }
        let body = self
            .host
            .buffer(BufferType::HttpCallResponseBody, 0, body_size)
            .ok()?;
        let response: TokenizeResponse = serde_json::from_slice(&body).ok()?;
        let hashes: Vec<SeqHash> = response.block_hashes.into_iter().map(SeqHash).collect();
        if let (Some(key), Some(history)) = (call.cache_key, hashes.get(..response.history_blocks))
        {
            self.state.borrow_mut().prompt_cache.insert(key, history);
        }
        Some(hashes)
    }

    /// The tokenization a request waited for answered (or failed, or timed
    /// out): route it.
    fn on_tokens(&mut self, pending: PendingTokenize, body_size: usize, started_ns: u64) -> Phase {
        let exact = self.tokenized(&pending.call, body_size);
        if exact.is_none() {
            // Timeout, error or garbage: route approximately rather than fail.
            self.metrics.tokenize_failures.inc(&self.host);
        }
        let prompt = RoutedPrompt {
            exact: exact.as_deref(),
            keys: &pending.keys,
        };
        self.decide_and_apply(&pending.model, prompt, pending.body, started_ns)
    }

    /// Sends the request to the model's own pool cluster. The route was
    /// picked before the body was read, so Envoy must pick it again.
    fn select_pool(&self, cluster: &str) {
        if let Err(err) = self
            .host
            .set_header(MapType::HttpRequestHeaders, POOL_HEADER, cluster)
        {
            self.host_error(err);
            return;
        }
        if let Err(err) = self.host.call_foreign_function("clear_route_cache") {
            self.host_error(err);
        }
    }

    /// Decides for `model` (a configured model) and applies the decision,
    /// starting a remote prefill where the model's policy wants one.
    /// `started_ns` is when work on the decision began (hashing included).
    fn decide_and_apply(
        &mut self,
        model: &str,
        prompt: RoutedPrompt<'_>,
        body: BufferedBody,
        started_ns: u64,
    ) -> Phase {
        let config = Rc::clone(&self.config);
        let Some(model) = config.model(model) else {
            self.metrics.fallback.inc(&self.host);
            return Phase::Routed(Routed {
                steered: None,
                prefill: None,
                debug: None,
            });
        };
        let block_size = u64::from(model.hasher.block_size().get());
        if let Some(cluster) = &model.cluster {
            self.select_pool(cluster);
        }
        let now = self.now_ms();
        let plan = {
            let mut guard = self.state.borrow_mut();
            let state = &mut *guard;
            let stale = state.replica_is_stale(now);
            if stale {
                self.metrics.stale_state.inc(&self.host);
            }
            let random = state.next_random();
            let last_known = state.replica.as_ref().and_then(|r| r.view(&model.name));
            let signals = Signals {
                view: last_known.filter(|_| !stale),
                last_known,
                now_ms: now,
                random,
            };
            let prefill = model
                .disaggregation
                .as_ref()
                .filter(|_| body.can_prefill_remotely)
                .map(|d| &d.routing);
            plan(&model.routing, prefill, prompt, signals, &mut state.router)
        };
        self.metrics
            .decision_us
            .record(&self.host, self.elapsed_us(started_ns));
        self.report_decision(&model.name, &plan, block_size);
        match (plan.prefill, &model.disaggregation) {
            (Some(prefill), Some(disaggregation)) => {
                self.start_prefill(disaggregation, plan.decode, &prefill, block_size, body)
            }
            _ => Phase::Routed(self.apply_decision(&plan.decode, block_size, None)),
        }
    }

    /// Tells the sidecar where this request went and what it computes, so
    /// other gateways (and this one's other VMs) see it.
    fn report_decision(&mut self, model: &str, plan: &RoutingPlan, block_size: u64) {
        let decision = &plan.decode;
        let Some(worker_id) = &decision.worker_id else {
            return;
        };
        let prefill_worker = plan.prefill.as_ref().and_then(|p| p.worker_id.as_deref());
        let mut state = self.state.borrow_mut();
        let request_id = state.reporter.next_request_id();
        let uncached = decision
            .prompt_blocks
            .saturating_sub(decision.cached_blocks);
        let decision = RoutingDecision {
            model: model.to_owned(),
            request_id: request_id.clone(),
            worker_id: worker_id.clone(),
            prefill_worker_id: prefill_worker.unwrap_or_default().to_owned(),
            prompt_blocks: decision.prompt_blocks,
            cached_blocks: decision.cached_blocks,
            prefill_tokens: u64::from(uncached) * block_size,
            computing: plan
                .computing
                .iter()
                .flat_map(|strides| strides.iter().map(|s| s.0))
                .collect(),
        };
        if state.reporter.decided(&self.host, decision) {
            self.metrics.reports_sent.inc(&self.host);
        }
        // Reported or not, its progress is: a stream connecting later is
        // told it is open until then.
        self.reported = Some(Reported {
            model: model.to_owned(),
            request_id,
        });
    }

    fn report_progress(&self, phase: RequestPhase) {
        let Some(reported) = &self.reported else {
            return;
        };
        let progress = RequestProgress {
            model: reported.model.clone(),
            request_id: reported.request_id.clone(),
            phase: phase as i32,
        };
        if self
            .state
            .borrow_mut()
            .reporter
            .progressed(&self.host, progress)
        {
            self.metrics.reports_sent.inc(&self.host);
        }
    }

    fn add_debug_headers(&self, debug: &DebugHeaders) {
        let decision = &debug.decision;
        let cached = decision.cached_blocks.to_string();
        let most_cached = decision.most_cached_blocks.to_string();
        let headers = [
            ("x-kvmesh-mode", decision.mode.as_str()),
            (
                "x-kvmesh-worker",
                decision.target.as_ref().map_or("", Target::key),
            ),
            ("x-kvmesh-cached-blocks", cached.as_str()),
            ("x-kvmesh-most-cached-blocks", most_cached.as_str()),
        ];
        let prefill = debug
            .prefill_worker
            .as_deref()
            .map(|worker| ("x-kvmesh-prefill-worker", worker));
        for (name, value) in headers.into_iter().chain(prefill) {
            if let Err(err) = self
                .host
                .set_header(MapType::HttpResponseHeaders, name, value)
            {
                self.host_error(err);
            }
        }
    }

    /// Steers the request to the decision's worker, counting it, and holds
    /// its in-flight load there (without its prefill when `prefill_worker`
    /// prefills it).
    fn apply_decision(
        &self,
        decision: &Decision,
        block_size: u64,
        prefill_worker: Option<&str>,
    ) -> Routed {
        Routed {
            steered: self.steer(decision, block_size, prefill_worker.is_some()),
            prefill: None,
            debug: self.config.debug_headers.then(|| DebugHeaders {
                decision: decision.clone(),
                prefill_worker: prefill_worker.map(str::to_owned),
            }),
        }
    }

    fn steer(&self, decision: &Decision, block_size: u64, remote_prefill: bool) -> Option<Steered> {
        let Some(target) = &decision.target else {
            self.metrics.fallback.inc(&self.host);
            return None;
        };
        if let Err(err) = self.set_target_headers(target) {
            self.host_error(err);
            self.metrics.fallback.inc(&self.host);
            return None;
        }
        let address = target.address();
        let mode = match decision.mode {
            Mode::Precise => self.metrics.precise,
            Mode::Approximate => self.metrics.approximate,
            Mode::Fallback => self.metrics.fallback,
        };
        mode.inc(&self.host);
        if self.config.orca_load_reports && orca_subject(target).is_some() {
            if let Err(err) = self.host.set_header(
                MapType::HttpRequestHeaders,
                orca::FORMAT_HEADER,
                orca::FORMAT,
            ) {
                self.host_error(err);
            }
        }
        self.metrics
            .cached_blocks
            .add(&self.host, u64::from(decision.cached_blocks));
        self.metrics
            .prompt_blocks
            .add(&self.host, u64::from(decision.prompt_blocks));
        let uncached = u64::from(decision.uncached_blocks());
        let mut state = self.state.borrow_mut();
        state.routed.routed_to(&self.host, address);
        state
            .router
            .orca
            .observe_prompt(u64::from(decision.prompt_blocks) * block_size);
        let prefill_tokens = if remote_prefill {
            0
        } else {
            uncached * block_size
        };
        let ticket = state.router.inflight.admit(RequestLoad {
            decode: target.key(),
            prefill: None,
            prefill_tokens,
            blocks: u64::from(decision.prompt_blocks),
        });
        Some(Steered {
            target: target.clone(),
            ticket,
        })
    }

    /// Points Envoy's load balancer at `target`'s address, and the engine
    /// there at its rank. The rank goes first: the destination is what
    /// steers, so a request is never steered to a rank's address without
    /// its rank.
    fn set_target_headers(&self, target: &Target) -> Result<(), HostError> {
        if let Some(rank) = target.data_parallel_rank() {
            self.host.set_header(
                MapType::HttpRequestHeaders,
                DATA_PARALLEL_RANK_HEADER,
                &rank.to_string(),
            )?;
        }
        let steered = self.host.set_header(
            MapType::HttpRequestHeaders,
            DESTINATION_HEADER,
            target.address(),
        );
        if steered.is_err() && target.data_parallel_rank().is_some() {
            // Envoy's own balancing picks the engine now, and its own
            // balancer the rank.
            let _ = self.host.remove_header(
                MapType::HttpRequestHeaders,
                DATA_PARALLEL_RANK_HEADER.as_bytes(),
            );
        }
        steered
    }

    /// Gives a request's share of a worker's in-flight load back.
    fn finish(&self, ticket: Ticket) {
        self.state.borrow_mut().router.inflight.finish(ticket);
    }

    /// Takes the worker's ORCA load report off its response: it is the
    /// filter's, never the client's. Recorded for `chosen`, the worker the
    /// request was routed to.
    fn take_load_report(&self, chosen: Option<&str>) {
        let value = match self
            .host
            .header(MapType::HttpResponseHeaders, orca::LOAD_HEADER)
        {
            Ok(Some(value)) => value,
            Ok(None) => return,
            Err(err) => return self.host_error(err),
        };
        if let Err(err) = self
            .host
            .remove_header(MapType::HttpResponseHeaders, orca::LOAD_HEADER.as_bytes())
        {
            self.host_error(err);
        }
        let Some(address) = chosen else {
            return;
        };
        match std::str::from_utf8(&value)
            .map_err(|_| orca::OrcaError::Format)
            .and_then(orca::parse)
        {
            Ok(report) => {
                self.metrics.orca_reports.inc(&self.host);
                let now = self.now_ms();
                self.state
                    .borrow_mut()
                    .router
                    .orca
                    .record(address, report, now);
            }
            Err(err) => {
                self.metrics.orca_report_errors.inc(&self.host);
                log::debug!("{address}: {err}");
            }
        }
    }

    /// Learns from where Envoy actually sent the request and how it went:
    /// served elsewhere (or nowhere), the chosen worker refused it and is
    /// left out for a while; served by it with a 5xx or 429 (twice in a
    /// row), it is failing or shedding load and left out too: an engine
    /// that fails fast looks idle (its requests end at once), so the cost
    /// function alone would send it ever more requests. Served by it
    /// otherwise, it is reachable.
    fn observe_upstream(&self, chosen: &str) {
        let served = match self.host.property(&["upstream", "address"]) {
            Ok(served) => served,
            Err(err) => return self.host_error(err),
        };
        let now = self.now_ms();
        if served.as_deref() != Some(chosen.as_bytes()) {
            self.metrics.upstream_failovers.inc(&self.host);
            log::info!("{chosen} did not serve a request routed to it; leaving it out for now");
            self.state.borrow_mut().router.unreachable.mark(chosen, now);
            return;
        }
        match self.status(MapType::HttpResponseHeaders) {
            Some(status) if is_worker_failure(status) => self.worker_errored(chosen),
            _ => self.state.borrow_mut().router.unreachable.clear(chosen),
        }
    }

    /// `worker` (decode or prefill) answered with an error: counted, and
    /// left out for a while after two in a row.
    fn worker_errored(&self, worker: &str) {
        self.metrics.upstream_errors.inc(&self.host);
        let now = self.now_ms();
        if self
            .state
            .borrow_mut()
            .router
            .unreachable
            .errored(worker, now)
        {
            log::info!("{worker} keeps answering with errors; leaving it out for now");
        }
    }

    /// A callout answered (or failed, or timed out): the phase it belongs
    /// to moves on, and a request that waited for it is resumed.
    fn on_callout(&mut self, phase: Phase, token: u32, body_size: usize, started_ns: u64) -> Phase {
        let next = match phase {
            Phase::AwaitingTokens(pending) if pending.call.token == token => {
                self.on_tokens(pending, body_size, started_ns)
            }
            Phase::AwaitingPrefill(wait) if wait.leg.token == token => {
                self.on_prefill_response(wait, body_size)
            }
            Phase::Routed(Routed {
                steered,
                prefill: Some(leg),
                debug,
            }) if leg.token == token => {
                // The decode leg never waited for it: nothing to resume.
                self.on_prefill_beside(leg);
                return Phase::Routed(Routed {
                    steered,
                    prefill: None,
                    debug,
                });
            }
            other => return other,
        };
        if next.action() == Action::Continue {
            if let Err(err) = self.host.resume_request() {
                self.host_error(err);
            }
        }
        next
    }

    fn request_headers(&self, end_of_stream: bool) -> Phase {
        self.strip_reserved_headers();
        let endpoint = self
            .request_header(":path")
            .as_deref()
            .and_then(Endpoint::from_path);
        let Some(endpoint) = endpoint else {
            self.metrics.passthrough.inc(&self.host);
            return Phase::Passthrough;
        };
        match self.request_header(":method").as_deref() {
            Some("POST") => {}
            // A browser's CORS preflight carries no body: the engine's to answer.
            Some("OPTIONS") => {
                self.metrics.passthrough.inc(&self.host);
                return Phase::Passthrough;
            }
            // Engines serve these paths for POST alone; anything else would
            // reach them unparsed, so it gets the filter's own answer.
            _ => {
                let kind = ErrorKind::MethodNotAllowed;
                let body = error_body(kind, "only POST is allowed on this path", None);
                return self.reject(kind, &body);
            }
        }
        if end_of_stream {
            return self.reject_request(&RequestError::EmptyBody);
        }
        let declared = self
            .request_header("content-length")
            .and_then(|v| v.trim().parse::<usize>().ok());
        if let Some(size) = declared.filter(|&size| size > self.config.max_body_bytes) {
            return self.too_large(size);
        }
        // Hold the headers until the body is parsed; requires
        // `allow_on_headers_stop_iteration` in the Wasm filter config.
        Phase::Buffering {
            endpoint,
            body_size: 0,
        }
    }

    fn response_headers(&mut self) {
        let debug = match &mut self.phase {
            Phase::Routed(routed) => {
                if let Some(steered) = &mut routed.steered {
                    let inflight = &mut self.state.borrow_mut().router.inflight;
                    inflight.prefill_done(&mut steered.ticket);
                }
                routed.debug.take()
            }
            _ => None,
        };
        let chosen = match &self.phase {
            Phase::Routed(Routed {
                steered: Some(steered),
                ..
            }) => Some(&steered.target),
            _ => None,
        };
        if let Some(chosen) = chosen {
            self.observe_upstream(chosen.address());
        }
        self.take_load_report(chosen.and_then(orca_subject));
        if let Some(debug) = debug {
            self.add_debug_headers(&debug);
        }
        self.report_progress(RequestPhase::FirstToken);
    }
}

/// A status that says the worker, not the request, is the problem: an
/// engine error or overload (5xx), or its rate limit (429).
fn is_worker_failure(status: u16) -> bool {
    status >= 500 || status == 429
}

fn is_reserved(name: &[u8]) -> bool {
    RESERVED_HEADERS
        .iter()
        .any(|reserved| name.eq_ignore_ascii_case(reserved.as_bytes()))
        || RESERVED_PREFIXES.iter().any(|reserved| {
            name.get(..reserved.len())
                .is_some_and(|prefix| prefix.eq_ignore_ascii_case(reserved))
        })
}

impl<H: Host> Context for InferenceStream<H> {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        self.timed(|stream, started_ns| {
            if let Some(call) = stream.cache_fill.take_if(|call| call.token == token) {
                stream.tokenized(&call, body_size);
                return;
            }
            let phase = std::mem::replace(&mut stream.phase, Phase::Passthrough);
            stream.phase = stream.on_callout(phase, token, body_size, started_ns);
        });
    }
}

impl<H: Host> HttpContext for InferenceStream<H> {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.timed(|stream, _| {
            stream.phase = stream.request_headers(end_of_stream);
            stream.phase.action()
        })
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.timed(|stream, _| {
            let Phase::Buffering { endpoint, .. } = stream.phase else {
                return Action::Continue;
            };
            stream.phase = if body_size > stream.config.max_body_bytes {
                stream.too_large(body_size)
            } else if end_of_stream {
                stream.route(endpoint, body_size)
            } else {
                Phase::Buffering {
                    endpoint,
                    body_size,
                }
            };
            stream.phase.action()
        })
    }

    /// Trailers end a request whose body never saw `end_of_stream` (HTTP/2,
    /// or chunked HTTP/1.1 with a trailer section): the body is complete
    /// now and takes the same path.
    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        self.timed(|stream, _| {
            let Phase::Buffering {
                endpoint,
                body_size,
            } = stream.phase
            else {
                return Action::Continue;
            };
            stream.phase = stream.route(endpoint, body_size);
            stream.phase.action()
        })
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.timed(|stream, _| stream.response_headers());
        Action::Continue
    }

    fn on_log(&mut self) {
        match std::mem::replace(&mut self.phase, Phase::Passthrough) {
            Phase::Routed(Routed {
                steered, prefill, ..
            }) => {
                let tickets = steered.map(|s| s.ticket).into_iter();
                for ticket in tickets.chain(prefill.map(|leg| leg.worker.ticket)) {
                    self.finish(ticket);
                }
            }
            Phase::AwaitingPrefill(wait) => {
                self.finish(wait.leg.worker.ticket);
                if let Some(hold) = wait.decode_hold {
                    self.finish(hold);
                }
            }
            _ => {}
        }
        self.report_progress(RequestPhase::Done);
    }
}
