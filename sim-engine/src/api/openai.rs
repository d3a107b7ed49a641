//! `POST /v1/completions`, `POST /v1/chat/completions` (streaming and not)
//! and `GET /v1/models`, shaped like vLLM's OpenAI server.

use chat_template::flatten_message;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::stream;
use router_core::request::lax;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::error::ApiError;
use super::kv_transfer::{self, Handoff, HandoffFields};
use super::ranks::RankId;
use super::{load_header, AppState, RequestId, RANK_HEADER};
use crate::determinism::seed_from_bytes;
use crate::scheduler::{NewSequence, SequenceSummary, SequenceUpdate};

/// Simulated time to first token of a non-streaming response, in seconds.
pub const TTFT_HEADER: &str = "x-sim-ttft-seconds";

// Scalars are read as the engines' pydantic models read them (lax).
#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default, deserialize_with = "lax::flag")]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    model: String,
    prompt: Value,
    #[serde(default, deserialize_with = "lax::count")]
    max_tokens: Option<u32>,
    #[serde(default, deserialize_with = "lax::flag")]
    stream: bool,
    stream_options: Option<StreamOptions>,
    seed: Option<u64>,
    #[serde(flatten)]
    handoff: HandoffFields,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<Value>,
    #[serde(default, deserialize_with = "lax::count")]
    max_tokens: Option<u32>,
    #[serde(default, deserialize_with = "lax::count")]
    max_completion_tokens: Option<u32>,
    #[serde(default, deserialize_with = "lax::flag")]
    stream: bool,
    stream_options: Option<StreamOptions>,
    seed: Option<u64>,
    #[serde(flatten)]
    handoff: HandoffFields,
    tools: Option<Value>,
    chat_template_kwargs: Option<serde_json::Map<String, Value>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Completions,
    Chat,
}

impl Endpoint {
    fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::Completions => "cmpl",
            Endpoint::Chat => "chatcmpl",
        }
    }
}

/// A validated request ready for the engine.
struct Prepared {
    endpoint: Endpoint,
    id: String,
    prompt: Vec<u32>,
    output: Vec<u32>,
    stream: bool,
    include_usage: bool,
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: CompletionRequest = parse_body(&body)?;
    check_model(&state, &request.model)?;
    let rank = state.ranks.for_request(&headers)?;
    let prompt = {
        let (state, prompt) = (Arc::clone(&state), request.prompt);
        off_the_runtime(move || completion_prompt(&state, &prompt)).await?
    };
    let handoff = request.handoff.handoff(state.model.role, &request_id.0)?;
    let prepared = prepare(
        &state,
        Endpoint::Completions,
        &request_id,
        prompt,
        handoff.max_tokens(request.max_tokens.map(u64::from)),
        request.seed,
        request.stream,
        request.stream_options.is_some_and(|o| o.include_usage),
    )?;
    Ok(serve_with_handoff(state, rank, prepared, handoff, &headers).await)
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: ChatRequest = parse_body(&body)?;
    check_model(&state, &request.model)?;
    let rank = state.ranks.for_request(&headers)?;
    if request.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    let prompt = {
        let state = Arc::clone(&state);
        let (messages, tools, kwargs) = (
            request.messages,
            request.tools,
            request.chat_template_kwargs,
        );
        off_the_runtime(move || {
            let invalid =
                |e: &dyn std::fmt::Display| ApiError::invalid(e.to_string(), Some("messages"));
            let messages = messages
                .iter()
                .map(|m| flatten_message(m).map_err(|e| invalid(&e)))
                .collect::<Result<Vec<_>, _>>()?;
            let rendered = state
                .template
                .render(&messages, tools.as_ref(), kwargs.as_ref())
                .map_err(|e| invalid(&e))?;
            state
                .codec
                .encode(&rendered, false)
                .map_err(|e| invalid(&e))
        })
        .await?
    };
    let handoff = request.handoff.handoff(state.model.role, &request_id.0)?;
    let prepared = prepare(
        &state,
        Endpoint::Chat,
        &request_id,
        prompt,
        handoff.max_tokens(
            request
                .max_completion_tokens
                .or(request.max_tokens)
                .map(u64::from),
        ),
        request.seed,
        request.stream,
        request.stream_options.is_some_and(|o| o.include_usage),
    )?;
    Ok(serve_with_handoff(state, rank, prepared, handoff, &headers).await)
}

pub async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.model.name,
            "object": "model",
            "created": state.started_unix,
            "owned_by": "sim-engine",
            "root": state.model.name,
            "parent": null,
            "max_model_len": state.model.max_model_len,
        }],
    }))
}

/// Serves a request on rank `rank`, running its side of a disaggregated
/// handoff first (decode side: pull the KV) or after (prefill side: hold it
/// and say where).
async fn serve_with_handoff(
    state: Arc<AppState>,
    rank: RankId,
    prepared: Prepared,
    handoff: Handoff,
    headers: &HeaderMap,
) -> Response {
    let mut response = match handoff {
        Handoff::None => serve(state, rank, prepared, headers).await,
        Handoff::Decode(source) => {
            kv_transfer::pull_remote_prefill(&state, rank, &source, &prepared.prompt).await;
            serve(state, rank, prepared, headers).await
        }
        Handoff::Prefill { key, answer } => {
            let prompt = prepared.prompt.clone();
            let response = serve(Arc::clone(&state), rank, prepared, headers).await;
            kv_transfer::offer_for_decode(&state, rank, &key, answer, &prompt, response).await
        }
    };
    response.headers_mut().insert(
        HeaderName::from_static(RANK_HEADER),
        HeaderValue::from(rank.index()),
    );
    response
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("invalid request body: {e}"), None))
}

fn check_model(state: &AppState, model: &str) -> Result<(), ApiError> {
    if model == state.model.name {
        Ok(())
    } else {
        Err(ApiError::model_not_found(model))
    }
}

/// Runs prompt rendering and tokenization, which take the CPU for seconds on
/// a long prompt, off the async threads: on them, `/metrics` and `/health`
/// stop answering and the engine looks dead to its relay. vLLM tokenizes
/// off its event loop too.
async fn off_the_runtime<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|_| Err(ApiError::internal("preparing the prompt failed")))
}

/// A completion prompt: a string, token ids, or a one-element list of either.
fn completion_prompt(state: &AppState, prompt: &Value) -> Result<Vec<u32>, ApiError> {
    let invalid = || {
        ApiError::invalid(
            "prompt must be a string or an array of token ids (one prompt per request)",
            Some("prompt"),
        )
    };
    match prompt {
        Value::String(text) => state
            .codec
            .encode(text, true)
            .map_err(|e| ApiError::invalid(e.to_string(), Some("prompt"))),
        Value::Array(items) if items.len() == 1 && !items[0].is_number() => {
            completion_prompt(state, &items[0])
        }
        Value::Array(items) => items
            .iter()
            .map(|item| item.as_u64().and_then(|id| u32::try_from(id).ok()))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(invalid),
        _ => Err(invalid()),
    }
}

#[allow(clippy::too_many_arguments)]
fn prepare(
    state: &AppState,
    endpoint: Endpoint,
    request_id: &RequestId,
    prompt: Vec<u32>,
    max_tokens: Option<u64>,
    seed: Option<u64>,
    stream: bool,
    include_usage: bool,
) -> Result<Prepared, ApiError> {
    let model = &state.model;
    if prompt.is_empty() {
        return Err(ApiError::invalid("the prompt is empty", Some("prompt")));
    }
    if prompt.len() >= model.max_model_len {
        return Err(ApiError::invalid(
            format!(
                "This model's maximum context length is {} tokens. However, your request has {} input tokens. Please reduce the length of the input messages.",
                model.max_model_len,
                prompt.len()
            ),
            Some("prompt"),
        ));
    }
    let room = model.max_model_len - prompt.len();
    let max_tokens = match max_tokens {
        Some(0) => {
            return Err(ApiError::invalid(
                "max_tokens must be at least 1",
                Some("max_tokens"),
            ))
        }
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        None => model.default_max_tokens.min(room),
    };
    if max_tokens > room {
        return Err(ApiError::invalid(
            format!(
                "This model's maximum context length is {} tokens. However, you requested {} tokens ({} in the input, {} in the completion). Please reduce the length of the input or completion.",
                model.max_model_len,
                prompt.len() + max_tokens,
                prompt.len(),
                max_tokens
            ),
            Some("max_tokens"),
        ));
    }
    // A request that can never fit in the KV cache would wait forever.
    let blocks_needed = (prompt.len() + max_tokens).div_ceil(model.block_size);
    if blocks_needed > model.num_gpu_blocks {
        return Err(ApiError::invalid(
            format!(
                "the request needs {blocks_needed} KV blocks but the engine has {}",
                model.num_gpu_blocks
            ),
            Some("max_tokens"),
        ));
    }
    // Outputs depend only on the prompt (or an explicit seed), so the same
    // request always gets the same answer on any worker.
    let seed = seed.unwrap_or_else(|| {
        let bytes: Vec<u8> = prompt.iter().flat_map(|t| t.to_le_bytes()).collect();
        seed_from_bytes(&bytes)
    });
    let output = state.codec.output_tokens(seed, max_tokens);
    Ok(Prepared {
        endpoint,
        id: format!("{}-{}", endpoint.id_prefix(), request_id.0),
        prompt,
        output,
        stream,
        include_usage,
    })
}

async fn serve(
    state: Arc<AppState>,
    rank: RankId,
    prepared: Prepared,
    headers: &HeaderMap,
) -> Response {
    let (tx, rx) = unbounded_channel();
    let planned = prepared.output.len();
    state.ranks.get(rank).engine.submit(NewSequence {
        prompt: prepared.prompt,
        output: prepared.output,
        updates: tx,
    });
    let created = unix_seconds();
    let reply = Reply {
        endpoint: prepared.endpoint,
        id: prepared.id,
        model: state.model.name.clone(),
        created,
        planned,
    };
    if prepared.stream {
        stream_response(state, reply, rx, prepared.include_usage)
    } else {
        let format = headers
            .get(load_header::FORMAT_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        full_response(state, rank, reply, rx, format).await
    }
}

/// What every response chunk repeats.
struct Reply {
    endpoint: Endpoint,
    id: String,
    model: String,
    created: u64,
    planned: usize,
}

impl Reply {
    fn object(&self, streaming: bool) -> &'static str {
        match (self.endpoint, streaming) {
            (Endpoint::Completions, _) => "text_completion",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
        }
    }

    fn envelope(&self, streaming: bool, choices: Value) -> serde_json::Map<String, Value> {
        let mut map = serde_json::Map::new();
        map.insert("id".into(), self.id.clone().into());
        map.insert("object".into(), self.object(streaming).into());
        map.insert("created".into(), self.created.into());
        map.insert("model".into(), self.model.clone().into());
        map.insert("choices".into(), choices);
        map
    }

    fn finish_reason(&self, generated: usize) -> Value {
        if generated >= self.planned {
            "length".into()
        } else {
            Value::Null
        }
    }

    fn stream_choice(&self, text: &str, finish_reason: Value, first: bool) -> Value {
        match self.endpoint {
            Endpoint::Completions => json!({
                "index": 0, "text": text, "logprobs": null,
                "finish_reason": finish_reason, "stop_reason": null,
            }),
            Endpoint::Chat => {
                let delta = if first {
                    json!({"role": "assistant", "content": text})
                } else {
                    json!({"content": text})
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason})
            }
        }
    }
}

fn usage(summary: &SequenceSummary) -> Value {
    json!({
        "prompt_tokens": summary.prompt_tokens,
        "completion_tokens": summary.completion_tokens,
        "total_tokens": summary.prompt_tokens + summary.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": summary.cached_tokens},
    })
}

/// Collects every token, then answers once, with usage.
async fn full_response(
    state: Arc<AppState>,
    rank: RankId,
    reply: Reply,
    mut updates: UnboundedReceiver<SequenceUpdate>,
    load_format: Option<String>,
) -> Response {
    let mut tokens = Vec::with_capacity(reply.planned);
    let summary = loop {
        match updates.recv().await {
            Some(SequenceUpdate::Token(token)) => tokens.push(token),
            Some(SequenceUpdate::Finished(summary)) => break summary,
            None => {
                return ApiError::internal("the engine dropped the request").into_response();
            }
        }
    };
    let text = state.codec.decode(&tokens);
    let choice = match reply.endpoint {
        Endpoint::Completions => json!({
            "index": 0, "text": text, "logprobs": null,
            "finish_reason": reply.finish_reason(tokens.len()), "stop_reason": null,
        }),
        Endpoint::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text, "tool_calls": []},
            "logprobs": null,
            "finish_reason": reply.finish_reason(tokens.len()),
            "stop_reason": null,
        }),
    };
    let mut body = reply.envelope(false, Value::Array(vec![choice]));
    body.insert("usage".into(), usage(&summary));
    let mut response = Json(Value::Object(body)).into_response();
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&summary.time_to_first_token.to_string()) {
        headers.insert(HeaderName::from_static(TTFT_HEADER), value);
    }
    let load = state.ranks.get(rank).engine.load();
    let load_value = load_format.and_then(|format| load_header::render(&format, load));
    if let Some(value) = load_value.and_then(|v| HeaderValue::from_str(&v).ok()) {
        headers.insert(HeaderName::from_static(load_header::LOAD_HEADER), value);
    }
    response
}

/// Server-sent events: one chunk per token, the last with its finish reason,
/// then the usage chunk if asked for, then `data: [DONE]`.
fn stream_response(
    state: Arc<AppState>,
    reply: Reply,
    updates: UnboundedReceiver<SequenceUpdate>,
    include_usage: bool,
) -> Response {
    struct Progress {
        state: Arc<AppState>,
        reply: Reply,
        updates: UnboundedReceiver<SequenceUpdate>,
        generated: usize,
        done: bool,
    }
    let progress = Progress {
        state,
        reply,
        updates,
        generated: 0,
        done: false,
    };
    let events = stream::unfold(progress, move |mut p| async move {
        if p.done {
            return None;
        }
        let chunk = match p.updates.recv().await {
            Some(SequenceUpdate::Token(token)) => {
                p.generated += 1;
                let text = p.state.codec.decode(&[token]);
                let choice = p.reply.stream_choice(
                    &text,
                    p.reply.finish_reason(p.generated),
                    p.generated == 1,
                );
                sse_data(&Value::Object(
                    p.reply.envelope(true, Value::Array(vec![choice])),
                ))
            }
            Some(SequenceUpdate::Finished(summary)) => {
                p.done = true;
                let mut text = String::new();
                if include_usage {
                    let mut body = p.reply.envelope(true, Value::Array(Vec::new()));
                    body.insert("usage".into(), usage(&summary));
                    text.push_str(&sse_data(&Value::Object(body)));
                }
                text.push_str("data: [DONE]\n\n");
                text
            }
            None => {
                p.done = true;
                let error = json!({"error": {"message": "the engine dropped the request", "type": "internal_server_error", "param": null, "code": "internal_error"}});
                format!("{}data: [DONE]\n\n", sse_data(&error))
            }
        };
        Some((Ok::<_, std::convert::Infallible>(Bytes::from(chunk)), p))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(events),
    )
        .into_response()
}

fn sse_data(value: &Value) -> String {
    format!("data: {value}\n\n")
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
