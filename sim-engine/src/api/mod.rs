//! HTTP surface: the OpenAI API, `/health`, `/metrics`, and `/sim/*` debug
//! and fault endpoints. Every response carries `x-sim-worker-id` (so tests
//! can tell which worker served a request) and `X-Request-Id`; OpenAI
//! answers also `x-sim-data-parallel-rank`, the rank that served them.

pub mod debug;
pub mod error;
pub mod kv_transfer;
pub mod load_header;
pub mod openai;
pub mod ranks;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderName, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::faults::{Faults, RequestFault};
use crate::tokenizer::TextCodec;
use chat_template::ChatTemplate;
use error::ApiError;
use ranks::Ranks;

pub const WORKER_ID_HEADER: &str = "x-sim-worker-id";
pub const REQUEST_ID_HEADER: &str = "x-request-id";
pub const RANK_HEADER: &str = "x-sim-data-parallel-rank";

/// Limits the API checks requests against.
#[derive(Debug, Clone)]
pub struct ServedModel {
    pub name: String,
    pub max_model_len: usize,
    pub default_max_tokens: usize,
    pub block_size: usize,
    pub num_gpu_blocks: usize,
    /// This engine's side of SGLang-style handoffs.
    pub role: crate::config::Role,
}

pub struct AppState {
    pub model: ServedModel,
    pub worker_id: HeaderValue,
    /// Shared with the other workers of the process.
    pub codec: Arc<TextCodec>,
    pub template: Arc<ChatTemplate>,
    /// The engine's data-parallel ranks (one without data parallelism).
    pub ranks: Ranks,
    pub faults: Arc<Faults>,
    /// Prefilled prompts held for decode engines (vLLM-style disaggregation).
    pub transfers: kv_transfer::Transfers,
    /// Unix seconds at start, the `created` of `/v1/models`.
    pub started_unix: u64,
    generated_ids: AtomicU64,
}

impl AppState {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model: ServedModel,
        worker_id: &str,
        codec: Arc<TextCodec>,
        template: Arc<ChatTemplate>,
        ranks: Ranks,
        faults: Arc<Faults>,
        transfers: kv_transfer::Transfers,
        started_unix: u64,
    ) -> anyhow::Result<Self> {
        let worker_id = HeaderValue::from_str(worker_id)
            .map_err(|_| anyhow::anyhow!("--worker-id must be a valid HTTP header value"))?;
        Ok(Self {
            model,
            worker_id,
            codec,
            template,
            ranks,
            faults,
            transfers,
            started_unix,
            generated_ids: AtomicU64::new(0),
        })
    }

    fn next_request_id(&self) -> String {
        let n = self.generated_ids.fetch_add(1, Ordering::Relaxed);
        let worker = self.worker_id.to_str().unwrap_or("sim");
        format!("sim-{worker}-{n}")
    }
}

/// The request id of a request: the client's `X-Request-Id`, or one generated.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Largest request body the sim accepts: what kvmesh's filter can be set to
/// accept and more, as vLLM and SGLang set no limit of their own.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

pub fn router(state: Arc<AppState>) -> Router {
    let openai = Router::new()
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            inject_faults,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES));
    Router::new()
        .merge(openai)
        .route("/v1/models", get(openai::models))
        .route("/health", get(|| async { "" }))
        .route("/metrics", get(metrics))
        .route("/sim/cache", get(debug::cache))
        .route(
            "/sim/kv_transfer/{request_id}",
            get(kv_transfer::serve_transfer),
        )
        .route(
            "/sim/faults",
            get(debug::get_faults).post(debug::set_faults),
        )
        .route("/reset_prefix_cache", post(debug::reset_prefix_cache))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            tag_response,
        ))
        .with_state(state)
}

/// Assigns the request id and stamps worker and request ids on the response.
/// The SGLang-style rendezvous a prefill engine serves on its bootstrap port.
pub fn bootstrap_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/bootstrap/{room}", get(kv_transfer::serve_room))
        .with_state(state)
}

async fn tag_response(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let request_id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .unwrap_or_else(|| state.next_request_id());
    request
        .extensions_mut()
        .insert(RequestId(request_id.clone()));
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        HeaderName::from_static(WORKER_ID_HEADER),
        state.worker_id.clone(),
    );
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        headers.insert(HeaderName::from_static(REQUEST_ID_HEADER), value);
    }
    response
}

/// Applies configured faults to OpenAI API requests.
async fn inject_faults(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let fault = state.faults.on_request();
    let latency = state.faults.settings().added_latency_ms;
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    match fault {
        RequestFault::None => next.run(request).await,
        RequestFault::Error => {
            ApiError::internal("simulated engine failure (fault injection)").into_response()
        }
        RequestFault::Crash => {
            tracing::error!("fault injection: crashing after the configured number of requests");
            std::process::exit(1);
        }
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.ranks.render_metrics(),
    )
        .into_response()
}
