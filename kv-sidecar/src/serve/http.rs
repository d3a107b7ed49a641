//! HTTP API of `serve`: health, readiness, metrics, the fleet as JSON, the
//! tokenization service and `/debug/route`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus_client::registry::Registry;
use router_core::request::{Endpoint, PROMPT_FIELD_HEADER};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::OwnedSemaphorePermit;

use crate::serve::route;
use crate::serve::state::{role_name, ServeState};
use crate::serve::tokenize_budget::TokenizeBudget;
use crate::tokenize::{ModelTokenizer, Tokenized};

#[derive(Clone)]
pub struct HttpState {
    pub state: Arc<ServeState>,
    pub registry: Arc<Registry>,
    pub tokenizers: Arc<HashMap<String, Arc<ModelTokenizer>>>,
    pub max_body_bytes: usize,
    pub tokenize_budget: TokenizeBudget,
}

pub fn router(http: HttpState) -> Router {
    let limit = http.max_body_bytes;
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/workers", get(workers))
        .route("/v1/models", get(models))
        .route("/v1/tokenize", post(tokenize))
        .route("/debug/route", post(debug_route))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(http)
}

/// An error as JSON `{"error": {"message": ...}}` with a status.
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": {"message": self.1}}))).into_response()
    }
}

async fn readyz(State(http): State<HttpState>) -> impl IntoResponse {
    if http.state.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(http): State<HttpState>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &http.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding metrics failed".into(),
        )
        .into_response(),
    }
}

async fn workers(State(http): State<HttpState>) -> Json<Value> {
    let mut all = Vec::new();
    for model in http.state.model_names() {
        let Some(guard) = http.state.lock(&model) else {
            continue;
        };
        let fleet = guard.registry.fleet();
        for (info, in_sync) in guard.registry.worker_infos() {
            let entry = fleet.worker(&info.worker_id);
            let blocks = entry.map_or(0, |e| fleet.index().blocks_of(e.slot));
            let load = entry.map(|e| e.load.clone()).unwrap_or_default();
            all.push(json!({
                "model": model,
                "worker_id": info.worker_id,
                "address": info.address,
                "data_parallel_rank": info.data_parallel_rank,
                "role": role_name(info.role),
                "epoch": info.epoch,
                "in_sync": in_sync,
                "blocks": blocks,
                "load": {
                    "running": load.running,
                    "waiting": load.waiting,
                    "kv_usage": load.kv_usage,
                    "active_blocks": load.active_blocks,
                    "queued_prefill_tokens": load.queued_prefill_tokens,
                    "routed_requests": load.routed_requests,
                },
            }));
        }
    }
    Json(json!({ "workers": all }))
}

async fn models(State(http): State<HttpState>) -> Json<Value> {
    let mut all = Vec::new();
    for model in http.state.model_names() {
        let Some(guard) = http.state.lock(&model) else {
            continue;
        };
        let (config, fleet) = (guard.registry.config(), guard.registry.fleet());
        all.push(json!({
            "name": model,
            "block_size": config.block_size,
            "overlap_weight": config.overlap_weight,
            "temperature": config.temperature,
            "disaggregation": config.disaggregation,
            "tokenizer": http.tokenizers.contains_key(&model),
            "version": fleet.version(),
            "fleet_unheard": guard.registry.fleet_unheard(),
            "workers": guard.registry.worker_infos().len(),
            "index_entries": fleet.index().entries(),
            "index_blocks": fleet.index().blocks(),
        }));
    }
    Json(json!({ "models": all }))
}

#[derive(Debug, Deserialize)]
struct TokenizeRequest {
    model: String,
    #[serde(default)]
    cache_salt: Option<String>,
    #[serde(default)]
    messages: Option<Vec<Value>>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    chat_template_kwargs: Option<serde_json::Map<String, Value>>,
}

/// What to tokenize, owned so it can move to a blocking thread.
enum TokenizeInput {
    Chat {
        messages: Vec<Value>,
        tools: Option<Value>,
        kwargs: Option<serde_json::Map<String, Value>>,
    },
    Prompt(String),
}

async fn tokenize(
    State(http): State<HttpState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let endpoint = match headers.get(PROMPT_FIELD_HEADER) {
        None => None,
        Some(field) => Some(
            Endpoint::from_prompt_field(field.as_bytes()).ok_or_else(|| {
                ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("{PROMPT_FIELD_HEADER} must be 'messages' or 'prompt'"),
                )
            })?,
        ),
    };
    let (model, tokenized) = tokenize_body(&http, &body, endpoint).await?;
    let segments: Vec<&[u32]> = tokenized.segments.iter().map(|s| &s[..]).collect();
    Ok(Json(json!({
        "model": model,
        "token_ids_by_segment": segments,
        "block_hashes": tokenized.block_hashes,
        "history_blocks": tokenized.history_blocks,
        "num_tokens": tokenized.num_tokens,
    })))
}

/// Tokenizes an OpenAI request body as the filter sends it to
/// `/v1/tokenize`; returns the model and its tokens and block hashes. The
/// prompt is read as `endpoint`'s engines read it, the other field ignored;
/// without an endpoint, the body must carry exactly one of them.
pub async fn tokenize_body(
    http: &HttpState,
    body: &[u8],
    endpoint: Option<Endpoint>,
) -> Result<(String, Tokenized), ApiError> {
    let budget = http.tokenize_budget.admit(body.len()).map_err(|_| {
        http.state.metrics.tokenize_busy.inc();
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "tokenize.max_inflight_bytes are being tokenized; try later".into(),
        )
    })?;
    let request: TokenizeRequest = serde_json::from_slice(body).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {e}"),
        )
    })?;
    let missing = |field: &str| ApiError(StatusCode::BAD_REQUEST, format!("'{field}' is missing"));
    let endpoint = match (endpoint, &request.messages, &request.prompt) {
        (Some(endpoint), _, _) => endpoint,
        (None, Some(_), None) => Endpoint::ChatCompletions,
        (None, None, Some(_)) => Endpoint::Completions,
        (None, _, _) => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "give exactly one of 'messages' and 'prompt'".into(),
            ))
        }
    };
    let input = match endpoint {
        Endpoint::ChatCompletions => TokenizeInput::Chat {
            messages: request.messages.ok_or_else(|| missing("messages"))?,
            tools: request.tools,
            kwargs: request.chat_template_kwargs,
        },
        Endpoint::Completions => {
            TokenizeInput::Prompt(request.prompt.ok_or_else(|| missing("prompt"))?)
        }
    };
    let mut tokenized = run_tokenizer(http, &request.model, input, budget).await?;
    let salt = request.cache_salt.as_deref().filter(|s| !s.is_empty());
    if let (Some(salt), Some(tokenizer)) = (salt, http.tokenizers.get(&request.model)) {
        tokenizer.salt(&mut tokenized, salt);
    }
    Ok((request.model, tokenized))
}

/// Tokenizes on the blocking pool, holding `budget` until done: a caller
/// that gives up (the filter's 250 ms) drops this future, not the work.
async fn run_tokenizer(
    http: &HttpState,
    model: &str,
    input: TokenizeInput,
    budget: OwnedSemaphorePermit,
) -> Result<Tokenized, ApiError> {
    let Some(tokenizer) = http.tokenizers.get(model).cloned() else {
        let status = if http.state.lock(model).is_some() {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::NOT_FOUND
        };
        return Err(ApiError(
            status,
            format!("no tokenizer configured for model '{model}'"),
        ));
    };
    let started = Instant::now();
    let result = tokio::task::spawn_blocking(move || {
        let _budget = budget;
        match input {
            TokenizeInput::Chat {
                messages,
                tools,
                kwargs,
            } => tokenizer.tokenize_chat(&messages, tools.as_ref(), kwargs.as_ref()),
            TokenizeInput::Prompt(prompt) => tokenizer.tokenize_prompt(&prompt),
        }
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    let metrics = &http.state.metrics;
    metrics
        .tokenize_seconds
        .observe(started.elapsed().as_secs_f64());
    metrics.tokenize_cache_hits.inc_by(result.cache_hits);
    metrics.tokenize_cache_misses.inc_by(result.cache_misses);
    Ok(result)
}

async fn debug_route(State(http): State<HttpState>, body: Bytes) -> Result<Json<Value>, ApiError> {
    route::explain(&http, &body).await.map(Json)
}
