//! One HTTP request through the filter: strip forged routing headers, buffer
//! the body of inference calls, parse it, and choose the endpoint.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, MapType};
use router_core::gateway::{
    gateway_report, GatewayReport, RequestPhase, RequestProgress, RoutingDecision,
};
use router_core::openai_error::{error_body, ErrorKind};
use router_core::request::{parse_request, Endpoint, RequestError};
use router_core::routing::inflight::{RequestLoad, Ticket};
use router_core::routing::prefix_keys::PrefixKeys;
use router_core::routing::prompt::{is_tokenizable, PromptIdentity};
use router_core::routing::{plan, Decision, Mode, RoutedPrompt, Signals};
use router_core::SeqHash;
use serde::Deserialize;

mod prefill;

use prefill::PrefillWait;

use crate::config::PluginConfig;
use crate::disagg::body;
use crate::host;
use crate::metrics::FilterMetrics;
use crate::orca;
use crate::prompt_cache::prompt_keys;
use crate::vm_state::SharedVmState;

/// Header read by Envoy's `override_host` load balancer.
pub const DESTINATION_HEADER: &str = "x-gateway-destination-endpoint";
/// Names the model's pool cluster; routes send it there with `cluster_header`.
pub const POOL_HEADER: &str = "x-kvmesh-pool";
/// Prefix of kvmesh's internal headers; never accepted from clients.
pub const RESERVED_PREFIX: &[u8] = b"x-kvmesh-";
/// Request headers only the filter may send upstream: the routing headers,
/// and the request for an engine's load report (its answer is the filter's).
const RESERVED_HEADERS: [&str; 2] = [DESTINATION_HEADER, orca::FORMAT_HEADER];

pub struct InferenceStream {
    config: Rc<PluginConfig>,
    metrics: FilterMetrics,
    state: SharedVmState,
    /// Set once the headers show an inference call whose body we buffer.
    endpoint: Option<Endpoint>,
    /// Bytes of the request body buffered so far (the whole body once routed).
    body_size: usize,
    /// The client asked for a streamed response.
    client_streams: bool,
    /// This request's share of the chosen worker's in-flight load.
    ticket: Option<Ticket>,
    /// Its prefill worker's share, while a remote prefill runs.
    prefill_ticket: Option<Ticket>,
    /// The tokenization callout in flight, if any.
    tokenize_call: Option<u32>,
    /// The prefill-leg callout in flight, if any.
    prefill_call: Option<u32>,
    /// A request waiting for its prefill leg.
    prefill: Option<PrefillWait>,
    /// A request waiting for the sidecar's tokenization.
    pending_tokenize: Option<PendingTokenize>,
    /// Prompt-cache key the pending tokenization's answer is stored under.
    cache_fill: Option<u64>,
    /// The decision, kept for the opt-in debug response headers.
    decision: Option<Decision>,
    /// (model, request id) of a decision reported to the sidecar.
    reported: Option<(String, String)>,
}

/// What a request waiting for its block hashes already knows.
struct PendingTokenize {
    model: String,
    /// Approximate-mode keys, if the sidecar does not answer in time.
    keys: PrefixKeys,
}

/// The part of `/v1/tokenize`'s answer routing needs.
#[derive(Deserialize)]
struct TokenizeResponse {
    block_hashes: Vec<u64>,
    /// Leading blocks that stay the same when the conversation goes on.
    #[serde(default)]
    history_blocks: usize,
}

/// Whether the request goes on now or waits for a callout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Continue,
    Wait,
}

impl Next {
    fn action(self) -> Action {
        match self {
            Next::Continue => Action::Continue,
            Next::Wait => Action::Pause,
        }
    }
}

/// Whether the callout whose response is being delivered answered 200.
fn call_succeeded() -> bool {
    host::header(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten()
        .is_some_and(|status| status == b"200")
}

impl InferenceStream {
    pub fn new(config: Rc<PluginConfig>, metrics: FilterMetrics, state: SharedVmState) -> Self {
        Self {
            config,
            metrics,
            state,
            endpoint: None,
            body_size: 0,
            client_streams: false,
            ticket: None,
            prefill_ticket: None,
            tokenize_call: None,
            prefill_call: None,
            prefill: None,
            pending_tokenize: None,
            cache_fill: None,
            decision: None,
            reported: None,
        }
    }

    /// Removes every client-supplied routing header, so only this filter's
    /// decision can steer the load balancer.
    fn strip_reserved_headers(&self) {
        let pairs = match host::header_pairs(MapType::HttpRequestHeaders) {
            Ok(pairs) => pairs,
            Err(err) => {
                self.host_error(err);
                return;
            }
        };
        for (name, _) in pairs {
            if is_reserved(&name) {
                self.metrics.forged_headers_removed.inc();
                if let Err(err) = host::remove_header(MapType::HttpRequestHeaders, &name) {
                    self.host_error(err);
                }
            }
        }
    }

    fn request_header(&self, name: &str) -> Option<String> {
        match host::header(MapType::HttpRequestHeaders, name) {
            Ok(value) => value.and_then(|v| String::from_utf8(v).ok()),
            Err(err) => {
                self.host_error(err);
                None
            }
        }
    }

    fn host_error(&self, err: host::HostError) {
        self.metrics.host_errors.inc();
        log::warn!("{err}");
    }

    /// Answers the client with an OpenAI error and stops the request.
    fn reject(&self, kind: ErrorKind, body: &str) -> Action {
        let counter = match kind {
            ErrorKind::RequestTooLarge => self.metrics.rejected_too_large,
            ErrorKind::ModelNotFound => self.metrics.rejected_unknown_model,
            ErrorKind::InvalidRequest | ErrorKind::NoWorkerAvailable => {
                self.metrics.rejected_invalid
            }
        };
        counter.inc();
        let headers = [("content-type", "application/json")];
        if let Err(err) = host::send_response(u32::from(kind.status()), &headers, body.as_bytes()) {
            self.host_error(err);
        }
        Action::Pause
    }

    fn reject_request(&self, err: &RequestError) -> Action {
        let (_, body) = err.to_response();
        self.reject(err.kind(), &body)
    }

    fn too_large(&self, size: usize) -> Action {
        self.reject_request(&RequestError::TooLarge {
            size,
            limit: self.config.max_body_bytes,
        })
    }

    /// Parses the complete body (`self.body_size` bytes) and sets the
    /// destination header.
    fn route(&mut self, endpoint: Endpoint) -> Action {
        let body = match host::buffer(BufferType::HttpRequestBody, 0, self.body_size) {
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
        self.client_streams = request.stream;
        let Some(model) = self.config.model(&request.model) else {
            let message = format!("The model '{}' does not exist.", request.model);
            return self.reject(
                ErrorKind::ModelNotFound,
                &error_body(ErrorKind::ModelNotFound, &message, Some("model")),
            );
        };
        let model_name = model.name.clone();
        let started_ns = host::now_ns().unwrap_or(0);
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
        let cache_keys = prompt_keys(&request.prompt, &body, text_seed);
        let has_handshake_fields = request.has_handshake_fields;
        drop(request);
        let body = if has_handshake_fields {
            match self.strip_router_fields(&body) {
                Some(stripped) => stripped,
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
            body
        };
        if exact.is_some() || !tokenizable {
            return self
                .decide_and_apply(&model_name, exact.as_deref(), &keys, started_ns)
                .action();
        }
        let hit = self.state.borrow_mut().prompt_cache.lookup(&cache_keys);
        let dispatched = match &hit {
            Some(hit) if hit.complete => false,
            // A miss, or a new turn: ask the sidecar, so the cache learns this
            // request's messages for the turn after it.
            _ => self.dispatch_tokenize(&model_name, &body),
        };
        if dispatched {
            self.cache_fill = cache_keys.last().copied();
        }
        match hit {
            Some(hit) => {
                self.metrics.prompt_cache_hits.inc();
                self.decide_and_apply(&model_name, Some(&hit.hashes), &keys, started_ns)
                    .action()
            }
            None if dispatched => {
                self.metrics.prompt_cache_misses.inc();
                self.pending_tokenize = Some(PendingTokenize {
                    model: model_name,
                    keys,
                });
                // The request waits for the sidecar; the Envoy thread does not.
                Action::Pause
            }
            None => self
                .decide_and_apply(&model_name, None, &keys, started_ns)
                .action(),
        }
    }

    /// Removes the handshake fields a client put in the body (matched by
    /// parsed key, whatever the escaping): only the router may tell an
    /// engine where to fetch KV from. The stripped body replaces the
    /// buffered one; `None` if it could not be rewritten.
    fn strip_router_fields(&mut self, raw: &[u8]) -> Option<Vec<u8>> {
        let stripped = body::strip_router_fields(raw).ok()?;
        self.metrics.router_fields_removed.inc();
        self.replace_body(&stripped).then_some(stripped)
    }

    /// Asks the sidecar for the prompt's block hashes when precise routing is
    /// possible at all; false when routing must go on without them.
    fn dispatch_tokenize(&mut self, model: &str, body: &[u8]) -> bool {
        let Some(sidecar) = &self.config.sidecar else {
            return false;
        };
        let Some(cluster) = &sidecar.http_cluster else {
            return false;
        };
        let now = host::now_ms().unwrap_or(0);
        let fresh = self
            .state
            .borrow()
            .replica
            .as_ref()
            .is_some_and(|r| r.fresh_view(model, now).is_some());
        if !fresh {
            return false;
        }
        let headers = [
            (":method", "POST"),
            (":path", "/v1/tokenize"),
            (":authority", "kv-sidecar"),
            ("content-type", "application/json"),
        ];
        match host::dispatch_http_call(cluster, &headers, body, sidecar.tokenize_timeout) {
            Ok(token) => {
                self.metrics.tokenize_calls.inc();
                self.tokenize_call = Some(token);
                true
            }
            Err(err) => {
                self.metrics.tokenize_failures.inc();
                log::debug!("cannot call the tokenizer on {cluster}: {err}");
                false
            }
        }
    }

    /// The sidecar's `/v1/tokenize` answer, if it gave one.
    fn tokenize_response(&self, body_size: usize) -> Option<TokenizeResponse> {
        if !call_succeeded() {
            return None;
        }
        let body = host::buffer(BufferType::HttpCallResponseBody, 0, body_size).ok()?;
        serde_json::from_slice(&body).ok()
    }

    /// Sends the request to the model's own pool cluster. The route was
    /// picked before the body was read, so Envoy must pick it again.
    fn select_pool(&self, cluster: &str) {
        if let Err(err) = host::set_header(MapType::HttpRequestHeaders, POOL_HEADER, cluster) {
            self.host_error(err);
            return;
        }
        if let Err(err) = host::call_foreign_function("clear_route_cache") {
            self.host_error(err);
        }
    }

    /// Decides for `model` (a configured model) and applies the decision,
    /// starting a remote prefill where the model's policy wants one.
    /// `started_ns` is when work on the decision began (hashing included).
    fn decide_and_apply(
        &mut self,
        model: &str,
        exact: Option<&[SeqHash]>,
        keys: &PrefixKeys,
        started_ns: u64,
    ) -> Next {
        let config = Rc::clone(&self.config);
        let Some(model) = config.model(model) else {
            self.metrics.fallback.inc();
            return Next::Continue;
        };
        let block_size = u64::from(model.hasher.block_size().get());
        if let Some(cluster) = &model.cluster {
            self.select_pool(cluster);
        }
        let now = host::now_ms().unwrap_or(0);
        let plan = {
            let mut guard = self.state.borrow_mut();
            let state = &mut *guard;
            if state.replica.as_ref().is_some_and(|r| r.is_stale(now)) {
                self.metrics.stale_state.inc();
            }
            let random = state.next_random();
            let signals = Signals {
                view: state
                    .replica
                    .as_ref()
                    .and_then(|r| r.fresh_view(&model.name, now)),
                now_ms: now,
                random,
            };
            let prefill = model.disaggregation.as_ref().map(|d| &d.routing);
            let prompt = RoutedPrompt { exact, keys };
            plan(&model.routing, prefill, prompt, signals, &mut state.router)
        };
        self.metrics.decision_us.record(elapsed_us(started_ns));
        let prefill_worker = plan.prefill.as_ref().and_then(|p| p.worker_id.as_deref());
        self.report_decision(&model.name, &plan.decode, block_size, prefill_worker);
        match (plan.prefill, &model.disaggregation) {
            (Some(prefill), Some(disaggregation)) => {
                self.start_prefill(disaggregation, plan.decode, &prefill, block_size)
            }
            _ => {
                self.apply_decision(&plan.decode, block_size, false);
                Next::Continue
            }
        }
    }

    /// Tells the sidecar where this request went, so other gateways see it.
    fn report_decision(
        &mut self,
        model: &str,
        decision: &Decision,
        block_size: u64,
        prefill_worker: Option<&str>,
    ) {
        let Some(worker_id) = &decision.worker_id else {
            return;
        };
        let mut state = self.state.borrow_mut();
        let request_id = state.reporter.next_request_id();
        let uncached = decision
            .prompt_blocks
            .saturating_sub(decision.cached_blocks);
        let report = GatewayReport {
            kind: Some(gateway_report::Kind::Decision(RoutingDecision {
                model: model.to_owned(),
                request_id: request_id.clone(),
                worker_id: worker_id.clone(),
                prefill_worker_id: prefill_worker.unwrap_or_default().to_owned(),
                prompt_blocks: decision.prompt_blocks,
                cached_blocks: decision.cached_blocks,
                prefill_tokens: u64::from(uncached) * block_size,
            })),
        };
        if state.reporter.send(&report) {
            self.metrics.reports_sent.inc();
            self.reported = Some((model.to_owned(), request_id));
        }
    }

    fn report_progress(&self, phase: RequestPhase) {
        let Some((model, request_id)) = &self.reported else {
            return;
        };
        let report = GatewayReport {
            kind: Some(gateway_report::Kind::Progress(RequestProgress {
                model: model.clone(),
                request_id: request_id.clone(),
                phase: phase as i32,
            })),
        };
        if self.state.borrow().reporter.send(&report) {
            self.metrics.reports_sent.inc();
        }
    }

    fn add_debug_headers(&self, decision: &Decision) {
        let cached = decision.cached_blocks.to_string();
        let headers = [
            ("x-kvmesh-mode", decision.mode.as_str()),
            ("x-kvmesh-worker", decision.address.as_deref().unwrap_or("")),
            ("x-kvmesh-cached-blocks", cached.as_str()),
        ];
        for (name, value) in headers {
            if let Err(err) = host::set_header(MapType::HttpResponseHeaders, name, value) {
                self.host_error(err);
            }
        }
    }

    /// Steers the load balancer and records the request's in-flight load
    /// (without its prefill when another worker prefills it).
    fn apply_decision(&mut self, decision: &Decision, block_size: u64, remote_prefill: bool) {
        if self.config.debug_headers {
            self.decision = Some(decision.clone());
        }
        let Some(address) = &decision.address else {
            self.metrics.fallback.inc();
            return;
        };
        if let Err(err) = host::set_header(MapType::HttpRequestHeaders, DESTINATION_HEADER, address)
        {
            self.host_error(err);
            self.metrics.fallback.inc();
            return;
        }
        match decision.mode {
            Mode::Precise => self.metrics.precise.inc(),
            Mode::Approximate => self.metrics.approximate.inc(),
            Mode::Fallback => self.metrics.fallback.inc(),
        }
        if self.config.orca_load_reports {
            if let Err(err) = host::set_header(
                MapType::HttpRequestHeaders,
                orca::FORMAT_HEADER,
                orca::FORMAT,
            ) {
                self.host_error(err);
            }
        }
        self.metrics
            .cached_blocks
            .add(u64::from(decision.cached_blocks));
        self.metrics
            .prompt_blocks
            .add(u64::from(decision.prompt_blocks));
        let uncached = u64::from(
            decision
                .prompt_blocks
                .saturating_sub(decision.cached_blocks),
        );
        let mut state = self.state.borrow_mut();
        state.routed.routed_to(address);
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
            decode: address,
            prefill: None,
            prefill_tokens,
            blocks: u64::from(decision.prompt_blocks),
        });
        self.ticket = Some(ticket);
    }

    /// Takes the worker's ORCA load report off its response: it is the
    /// filter's, never the client's.
    fn take_load_report(&self) {
        let value = match host::header(MapType::HttpResponseHeaders, orca::LOAD_HEADER) {
            Ok(Some(value)) => value,
            Ok(None) => return,
            Err(err) => return self.host_error(err),
        };
        if let Err(err) =
            host::remove_header(MapType::HttpResponseHeaders, orca::LOAD_HEADER.as_bytes())
        {
            self.host_error(err);
        }
        let Some(address) = self.ticket.as_ref().map(Ticket::address) else {
            return;
        };
        match std::str::from_utf8(&value)
            .map_err(|_| orca::OrcaError::Format)
            .and_then(orca::parse)
        {
            Ok(report) => {
                self.metrics.orca_reports.inc();
                let now = host::now_ms().unwrap_or(0);
                self.state
                    .borrow_mut()
                    .router
                    .orca
                    .record(address, report, now);
            }
            Err(err) => {
                self.metrics.orca_report_errors.inc();
                log::debug!("{address}: {err}");
            }
        }
    }
}

impl InferenceStream {
    /// Learns from where Envoy actually sent the request: served elsewhere
    /// (or nowhere), the chosen worker refused it and is left out for a
    /// while; served by it, it is reachable.
    fn observe_upstream(&self) {
        let Some(chosen) = self.ticket.as_ref().map(Ticket::address) else {
            return;
        };
        let served = match host::property(&["upstream", "address"]) {
            Ok(served) => served,
            Err(err) => return self.host_error(err),
        };
        let mut state = self.state.borrow_mut();
        if served.as_deref() == Some(chosen.as_bytes()) {
            state.router.unreachable.clear(chosen);
            return;
        }
        self.metrics.upstream_failovers.inc();
        log::info!("{chosen} did not serve a request routed to it; leaving it out for now");
        state
            .router
            .unreachable
            .mark(chosen, host::now_ms().unwrap_or(0));
    }
}

fn is_reserved(name: &[u8]) -> bool {
    RESERVED_HEADERS
        .iter()
        .any(|reserved| name.eq_ignore_ascii_case(reserved.as_bytes()))
        || name
            .get(..RESERVED_PREFIX.len())
            .is_some_and(|prefix| prefix.eq_ignore_ascii_case(RESERVED_PREFIX))
}

impl Context for InferenceStream {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let started_ns = host::now_ns().unwrap_or(0);
        if self.prefill_call == Some(token) {
            self.prefill_call = None;
            self.on_prefill_response(body_size);
        } else if self.tokenize_call == Some(token) {
            self.tokenize_call = None;
            self.on_tokenize_response(body_size, started_ns);
        }
        self.metrics.callback_us.record(elapsed_us(started_ns));
    }
}

impl InferenceStream {
    /// The sidecar's tokenization answered (or failed, or timed out): fill
    /// the prompt cache, and route the request if it was waiting.
    fn on_tokenize_response(&mut self, body_size: usize, started_ns: u64) {
        let response = self.tokenize_response(body_size);
        let exact: Option<Vec<SeqHash>> = response.map(|r| {
            let hashes: Vec<SeqHash> = r.block_hashes.into_iter().map(SeqHash).collect();
            if let (Some(key), Some(history)) =
                (self.cache_fill.take(), hashes.get(..r.history_blocks))
            {
                self.state.borrow_mut().prompt_cache.insert(key, history);
            }
            hashes
        });
        if let Some(pending) = self.pending_tokenize.take() {
            if exact.is_none() {
                // Timeout, error or garbage: route approximately rather than fail.
                self.metrics.tokenize_failures.inc();
            }
            let next =
                self.decide_and_apply(&pending.model, exact.as_deref(), &pending.keys, started_ns);
            if next == Next::Continue {
                if let Err(err) = host::resume_request() {
                    self.host_error(err);
                }
            }
        }
    }
}

impl InferenceStream {
    fn request_headers(&mut self, end_of_stream: bool) -> Action {
        self.strip_reserved_headers();
        let is_post = self.request_header(":method").as_deref() == Some("POST");
        let endpoint = self
            .request_header(":path")
            .as_deref()
            .and_then(Endpoint::from_path);
        let Some(endpoint) = endpoint.filter(|_| is_post) else {
            self.metrics.passthrough.inc();
            return Action::Continue;
        };
        if end_of_stream {
            return self.reject_request(&RequestError::EmptyBody);
        }
        let declared = self
            .request_header("content-length")
            .and_then(|v| v.trim().parse::<usize>().ok());
        if let Some(size) = declared.filter(|&size| size > self.config.max_body_bytes) {
            return self.too_large(size);
        }
        self.endpoint = Some(endpoint);
        // Hold the headers until the body is parsed; requires
        // `allow_on_headers_stop_iteration` in the Wasm filter config.
        Action::Pause
    }

    fn request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(endpoint) = self.endpoint else {
            return Action::Continue;
        };
        if body_size > self.config.max_body_bytes {
            self.endpoint = None;
            return self.too_large(body_size);
        }
        self.body_size = body_size;
        if !end_of_stream {
            return Action::Pause;
        }
        self.endpoint = None;
        self.route(endpoint)
    }

    /// Trailers end a request whose body never saw `end_of_stream` (HTTP/2,
    /// or chunked HTTP/1.1 with a trailer section): the body is complete
    /// now and takes the same path.
    fn request_trailers(&mut self) -> Action {
        match self.endpoint.take() {
            Some(endpoint) => self.route(endpoint),
            None => Action::Continue,
        }
    }

    fn response_headers(&mut self) {
        if let Some(ticket) = &mut self.ticket {
            self.state.borrow_mut().router.inflight.prefill_done(ticket);
        }
        self.observe_upstream();
        self.take_load_report();
        if let Some(decision) = self.decision.take() {
            self.add_debug_headers(&decision);
        }
        self.report_progress(RequestPhase::FirstToken);
    }
}

/// Microseconds since `started_ns` on the host clock.
fn elapsed_us(started_ns: u64) -> u64 {
    host::now_ns()
        .unwrap_or(started_ns)
        .saturating_sub(started_ns)
        / 1_000
}

impl HttpContext for InferenceStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let started_ns = host::now_ns().unwrap_or(0);
        let action = self.request_headers(end_of_stream);
        self.metrics.callback_us.record(elapsed_us(started_ns));
        action
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let started_ns = host::now_ns().unwrap_or(0);
        let action = self.request_body(body_size, end_of_stream);
        self.metrics.callback_us.record(elapsed_us(started_ns));
        action
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        let started_ns = host::now_ns().unwrap_or(0);
        let action = self.request_trailers();
        self.metrics.callback_us.record(elapsed_us(started_ns));
        action
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let started_ns = host::now_ns().unwrap_or(0);
        self.response_headers();
        self.metrics.callback_us.record(elapsed_us(started_ns));
        Action::Continue
    }

    fn on_log(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.state.borrow_mut().router.inflight.finish(ticket);
        }
        self.finish_prefill_ticket();
        self.report_progress(RequestPhase::Done);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_headers() {
        assert!(is_reserved(b"x-gateway-destination-endpoint"));
        assert!(is_reserved(b"X-Gateway-Destination-Endpoint"));
        assert!(is_reserved(b"x-kvmesh-mode"));
        assert!(is_reserved(b"X-KVMESH-anything"));
        assert!(is_reserved(b"Endpoint-Load-Metrics-Format"));
        assert!(!is_reserved(b"x-kvmes"));
        assert!(!is_reserved(b"x-request-id"));
    }
}
