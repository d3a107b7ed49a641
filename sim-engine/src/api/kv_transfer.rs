//! vLLM-style disaggregated prefill, as vLLM's NIXL connector behaves at its
//! API (DESIGN §3.4). A prefill request (`kv_transfer_params.do_remote_decode`)
//! is computed here and answered with `kv_transfer_params` naming this engine
//! and the request; its prompt is held until a decode engine pulls it or the
//! hold expires. A decode request carrying those params pulls the blocks from
//! the prefill engine over HTTP (`GET /sim/kv_transfer/{id}`: a real transfer
//! between the two processes, paced by a bandwidth model) and stores them in
//! its own cache, as NIXL writes them into the decode engine's KV memory; the
//! request then finds them cached and computes none of them. Anything missing,
//! expired or unreachable means local prefill, counted.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use thiserror::Error;

use super::error::ApiError;
use super::AppState;

/// The fields of `kv_transfer_params` this engine acts on.
#[derive(Debug, Default, Deserialize)]
pub struct KvTransferParams {
    #[serde(default)]
    pub do_remote_decode: bool,
    #[serde(default)]
    pub do_remote_prefill: bool,
    pub remote_request_id: Option<String>,
    pub remote_host: Option<String>,
    pub remote_port: Option<u16>,
}

impl KvTransferParams {
    /// Parses the request field; malformed params are the client's error.
    pub fn from_request(value: Option<&Value>) -> Result<Option<Self>, ApiError> {
        match value {
            None | Some(Value::Null) => Ok(None),
            Some(value) => serde_json::from_value(value.clone())
                .map(Some)
                .map_err(|e| {
                    ApiError::invalid(
                        format!("invalid kv_transfer_params: {e}"),
                        Some("kv_transfer_params"),
                    )
                }),
        }
    }
}

/// Where decode engines reach this one, and how fast transfers are.
#[derive(Debug, Clone)]
pub struct TransferSettings {
    pub host: String,
    pub port: u16,
    /// How long a prefilled prompt waits to be pulled.
    pub hold: Duration,
    /// Simulated KV bytes per block, and the link's speed.
    pub bytes_per_block: u64,
    pub gbytes_per_second: f64,
    pub speedup: f64,
}

/// Prefilled prompts waiting for their decode engine.
pub struct Transfers {
    settings: TransferSettings,
    held: Mutex<HashMap<String, (Vec<u32>, Instant)>>,
    client: reqwest::Client,
}

#[derive(Debug, Error)]
pub enum PullError {
    #[error("kv_transfer_params lack remote_host, remote_port or remote_request_id")]
    Incomplete,
    #[error("pulling from the prefill engine: {0}")]
    Http(#[from] reqwest::Error),
}

impl Transfers {
    pub fn new(settings: TransferSettings) -> Self {
        Self {
            settings,
            held: Mutex::new(HashMap::new()),
            client: reqwest::Client::new(),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Vec<u32>, Instant)>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds a prefilled prompt and returns the params for the decode leg.
    pub fn hold(&self, request_id: &str, prompt: &[u32], block_size: usize) -> Value {
        let now = Instant::now();
        let mut held = self.held();
        held.retain(|_, (_, expires)| *expires > now);
        held.insert(
            request_id.to_owned(),
            (prompt.to_vec(), now + self.settings.hold),
        );
        let blocks: Vec<usize> = (0..prompt.len() / block_size).collect();
        json!({
            "do_remote_prefill": true,
            "do_remote_decode": false,
            "remote_block_ids": blocks,
            "remote_engine_id": format!("{}:{}", self.settings.host, self.settings.port),
            "remote_request_id": request_id,
            "remote_host": self.settings.host,
            "remote_port": self.settings.port,
            "tp_size": 1,
        })
    }

    /// Hands a held prompt over, once; `None` if unknown or expired.
    pub fn release(&self, request_id: &str) -> Option<Vec<u32>> {
        let (prompt, expires) = self.held().remove(request_id)?;
        (expires > Instant::now()).then_some(prompt)
    }

    /// Pulls a prefilled prompt from the engine `params` name, then waits
    /// the time its blocks take on the simulated link.
    pub async fn pull(
        &self,
        params: &KvTransferParams,
        block_size: usize,
    ) -> Result<Option<Vec<u32>>, PullError> {
        let (Some(host), Some(port), Some(id)) = (
            params.remote_host.as_deref(),
            params.remote_port,
            params.remote_request_id.as_deref(),
        ) else {
            return Err(PullError::Incomplete);
        };
        let response = self
            .client
            .get(format!("http://{host}:{port}/sim/kv_transfer/{id}"))
            .timeout(Duration::from_secs(10))
            .send()
            .await?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let body: Value = response.error_for_status()?.json().await?;
        let prompt: Vec<u32> = body["token_ids"]
            .as_array()
            .map(|ids| {
                ids.iter()
                    .filter_map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
                    .collect()
            })
            .unwrap_or_default();
        let blocks = (prompt.len() / block_size) as u64;
        let seconds = (blocks * self.settings.bytes_per_block) as f64
            / (self.settings.gbytes_per_second * 1e9)
            / self.settings.speedup;
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        Ok(Some(prompt))
    }
}

/// `GET /sim/kv_transfer/{id}`: the decode engine's side of the transfer.
pub async fn serve_transfer(
    State(state): State<Arc<AppState>>,
    Path(request_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let prompt = state
        .transfers
        .release(&request_id)
        .ok_or_else(|| ApiError::not_found(format!("no KV held for request '{request_id}'")))?;
    let blocks = prompt.len() / state.model.block_size;
    state.metrics.kv_blocks_sent(blocks as u64);
    Ok(Json(json!({"request_id": request_id, "token_ids": prompt})))
}

/// Decode side: with `do_remote_prefill`, pulls the prompt's KV from the
/// prefill engine into this engine's cache before the request is scheduled.
/// Whatever goes wrong, the request still runs and prefills locally.
pub async fn pull_remote_prefill(
    state: &AppState,
    params: Option<&KvTransferParams>,
    prompt: &[u32],
) {
    let Some(params) = params.filter(|p| p.do_remote_prefill) else {
        return;
    };
    let block_size = state.model.block_size;
    let pulled = match state.transfers.pull(params, block_size).await {
        Ok(Some(pulled)) => pulled,
        Ok(None) => {
            tracing::info!("remote KV unknown or expired; prefilling locally");
            state.metrics.remote_prefill_fallback();
            return;
        }
        Err(err) => {
            tracing::warn!(%err, "remote prefill failed; prefilling locally");
            state.metrics.remote_prefill_fallback();
            return;
        }
    };
    // Only KV of this very prompt is usable.
    let shared = pulled
        .iter()
        .zip(prompt)
        .take_while(|(a, b)| a == b)
        .count();
    let blocks = shared / block_size;
    if blocks == 0 {
        state.metrics.remote_prefill_fallback();
        return;
    }
    state.engine.import_prefix(&prompt[..blocks * block_size]);
    state.metrics.kv_blocks_received(blocks as u64);
}

/// Prefill side: with `do_remote_decode`, holds the prompt for the decode
/// engine and adds `kv_transfer_params` to the (non-streaming) answer.
pub async fn offer_for_decode(
    state: &AppState,
    params: Option<&KvTransferParams>,
    request_id: &str,
    prompt: &[u32],
    response: Response,
) -> Response {
    if !params.is_some_and(|p| p.do_remote_decode) || response.status() != StatusCode::OK {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(bytes) => bytes,
        Err(err) => return ApiError::internal(&err.to_string()).into_response(),
    };
    let Ok(Value::Object(mut answer)) = serde_json::from_slice::<Value>(&bytes) else {
        // A streamed answer: vLLM does not hand off those either.
        return Response::from_parts(parts, Body::from(bytes));
    };
    let params = state
        .transfers
        .hold(request_id, prompt, state.model.block_size);
    answer.insert("kv_transfer_params".into(), params);
    parts.headers.remove(header::CONTENT_LENGTH);
    let body = serde_json::to_vec(&answer).unwrap_or_default();
    Response::from_parts(parts, Body::from(body))
}
