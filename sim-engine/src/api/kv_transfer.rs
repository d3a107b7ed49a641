//! Disaggregated prefill at the engines' API (docs/sim-engine.md#disaggregated-prefill-all-three-handshakes), for all three
//! engine families. A prefill-side request is computed here and its prompt
//! held until a decode engine pulls it (or the hold expires); a decode-side
//! request pulls the blocks from the prefill engine over HTTP (a real
//! transfer between the two processes, paced by a bandwidth model) and stores
//! them in its own cache, as the engines' KV connectors write them into the
//! decode engine's KV memory; the request then finds them cached and computes
//! none of them. Anything missing, expired or unreachable means local
//! prefill, counted in `sim:remote_prefill_fallbacks`.
//!
//! - vLLM (NIXL): `kv_transfer_params.do_remote_decode` marks the prefill leg,
//!   whose answer carries `kv_transfer_params` for the decode leg
//!   (`do_remote_prefill`, `remote_host`, `remote_port`, `remote_request_id`).
//! - SGLang: both legs carry `bootstrap_host/port/room`; `--role` says which
//!   side this engine is. Prefill engines serve the rendezvous on
//!   `--disaggregation-bootstrap-port`, where the decode engine waits for the
//!   room's prefill to finish.
//! - TensorRT-LLM: `disaggregated_params.request_type` `context_only` runs
//!   the context phase (one token) and answers with `disaggregated_params`
//!   (`first_gen_tokens`, `ctx_request_id`, `opaque_state` naming this
//!   engine); `generation_only` pulls from the engine `opaque_state` names.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use thiserror::Error;

use super::error::ApiError;
use super::ranks::RankId;
use super::AppState;
use crate::config::Role;

/// How long a decode engine waits at the bootstrap server for its room.
const ROOM_WAIT: Duration = Duration::from_secs(10);

/// The handshake fields of an OpenAI request body.
#[derive(Debug, Default, Deserialize)]
pub struct HandoffFields {
    kv_transfer_params: Option<Value>,
    bootstrap_host: Option<String>,
    bootstrap_port: Option<u16>,
    bootstrap_room: Option<u64>,
    disaggregated_params: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
struct VllmParams {
    #[serde(default)]
    do_remote_decode: bool,
    #[serde(default)]
    do_remote_prefill: bool,
    remote_request_id: Option<String>,
    remote_host: Option<String>,
    remote_port: Option<u16>,
}

#[derive(Debug, Deserialize)]
struct TrtllmParams {
    request_type: String,
    ctx_request_id: Option<String>,
    opaque_state: Option<String>,
}

/// Where a decode-side request pulls its KV from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    host: String,
    port: u16,
    /// Path on that engine serving the held prompt.
    path: String,
}

/// This engine's part in a request's handoff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handoff {
    None,
    /// Compute, then hold the prompt under `key`; `Answer` says what the
    /// response must carry for the decode leg.
    Prefill {
        key: String,
        answer: Answer,
    },
    /// Pull the prompt's KV from `source` first.
    Decode(Source),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Nothing (SGLang: the decode engine meets us at the bootstrap server).
    Unchanged,
    /// Top-level `kv_transfer_params` (vLLM).
    KvTransferParams,
    /// `choices[0].disaggregated_params` (TensorRT-LLM).
    DisaggregatedParams,
}

fn invalid(field: &str, err: impl std::fmt::Display) -> ApiError {
    ApiError::invalid(format!("invalid {field}: {err}"), Some(field))
}

fn parse<T: serde::de::DeserializeOwned>(field: &str, value: &Value) -> Result<T, ApiError> {
    serde_json::from_value(value.clone()).map_err(|e| invalid(field, e))
}

impl HandoffFields {
    /// What this engine (in `role`) does for the request `request_id`.
    /// Malformed fields are the client's error.
    pub fn handoff(&self, role: Role, request_id: &str) -> Result<Handoff, ApiError> {
        if let Some(value) = self.kv_transfer_params.as_ref().filter(|v| !v.is_null()) {
            let params: VllmParams = parse("kv_transfer_params", value)?;
            if params.do_remote_decode {
                return Ok(Handoff::Prefill {
                    key: request_id.to_owned(),
                    answer: Answer::KvTransferParams,
                });
            }
            if params.do_remote_prefill {
                let (Some(host), Some(port), Some(id)) = (
                    params.remote_host,
                    params.remote_port,
                    params.remote_request_id,
                ) else {
                    return Err(invalid(
                        "kv_transfer_params",
                        "remote_host, remote_port and remote_request_id are required",
                    ));
                };
                return Ok(Handoff::Decode(Source {
                    host,
                    port,
                    path: format!("/sim/kv_transfer/{id}"),
                }));
            }
        }
        if let Some(room) = self.bootstrap_room {
            return Ok(match role {
                Role::Prefill => Handoff::Prefill {
                    key: room_key(room),
                    answer: Answer::Unchanged,
                },
                Role::Decode => {
                    let (Some(host), Some(port)) =
                        (self.bootstrap_host.clone(), self.bootstrap_port)
                    else {
                        return Err(invalid(
                            "bootstrap_host",
                            "bootstrap_host and bootstrap_port are required",
                        ));
                    };
                    Handoff::Decode(Source {
                        host,
                        port,
                        path: format!("/bootstrap/{room}"),
                    })
                }
                Role::Both => Handoff::None,
            });
        }
        if let Some(value) = self.disaggregated_params.as_ref().filter(|v| !v.is_null()) {
            let params: TrtllmParams = parse("disaggregated_params", value)?;
            return match params.request_type.as_str() {
                "context_only" => Ok(Handoff::Prefill {
                    key: request_id.to_owned(),
                    answer: Answer::DisaggregatedParams,
                }),
                "generation_only" => {
                    let (Some(state), Some(id)) = (params.opaque_state, params.ctx_request_id)
                    else {
                        return Err(invalid(
                            "disaggregated_params",
                            "opaque_state and ctx_request_id are required",
                        ));
                    };
                    let (host, port) = state
                        .rsplit_once(':')
                        .and_then(|(h, p)| Some((h.to_owned(), p.parse().ok()?)))
                        .ok_or_else(|| {
                            invalid("disaggregated_params", "opaque_state is not host:port")
                        })?;
                    Ok(Handoff::Decode(Source {
                        host,
                        port,
                        path: format!("/sim/kv_transfer/{id}"),
                    }))
                }
                other => Err(invalid(
                    "disaggregated_params",
                    format!("unknown request_type '{other}'"),
                )),
            };
        }
        Ok(Handoff::None)
    }
}

impl Handoff {
    /// A TensorRT-LLM context phase produces the first token only.
    pub fn max_tokens(&self, requested: Option<u64>) -> Option<u64> {
        match self {
            Handoff::Prefill {
                answer: Answer::DisaggregatedParams,
                ..
            } => Some(1),
            _ => requested,
        }
    }
}

fn room_key(room: u64) -> String {
    format!("room-{room}")
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

/// Prompts held for decode engines: the prompt, the rank holding its KV,
/// and when the hold expires.
type Held = HashMap<String, (Vec<u32>, RankId, Instant)>;

/// Prefilled prompts waiting for their decode engine.
pub struct Transfers {
    settings: TransferSettings,
    held: Mutex<Held>,
    client: reqwest::Client,
}

#[derive(Debug, Error)]
enum PullError {
    #[error("the prefill engine holds no KV for this request (unknown or expired)")]
    NotHeld,
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

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn hold(&self, key: &str, prompt: &[u32], rank: RankId) {
        let now = Instant::now();
        let mut held = self.held();
        held.retain(|_, (_, _, expires)| *expires > now);
        held.insert(
            key.to_owned(),
            (prompt.to_vec(), rank, now + self.settings.hold),
        );
    }

    /// Hands a held prompt over, once; `None` if unknown or expired.
    fn release(&self, key: &str) -> Option<(Vec<u32>, RankId)> {
        let (prompt, rank, expires) = self.held().remove(key)?;
        (expires > Instant::now()).then_some((prompt, rank))
    }

    /// This engine as `host:port`.
    fn endpoint(&self) -> String {
        format!("{}:{}", self.settings.host, self.settings.port)
    }

    /// Pulls a prefilled prompt, then waits the time its blocks take on the
    /// simulated link.
    async fn pull(&self, source: &Source, block_size: usize) -> Result<Vec<u32>, PullError> {
        let url = format!("http://{}:{}{}", source.host, source.port, source.path);
        let response = self
            .client
            .get(url)
            .timeout(ROOM_WAIT + Duration::from_secs(5))
            .send()
            .await?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Err(PullError::NotHeld);
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
        Ok(prompt)
    }
}

/// Hands a held prompt to the decode engine pulling it.
fn hand_over(state: &AppState, key: &str) -> Result<Json<Value>, ApiError> {
    let (prompt, rank) = state
        .transfers
        .release(key)
        .ok_or_else(|| ApiError::not_found(format!("no KV held for '{key}'")))?;
    let blocks = prompt.len() / state.model.block_size;
    state.ranks.get(rank).metrics.kv_blocks_sent(blocks as u64);
    Ok(Json(json!({"token_ids": prompt})))
}

/// `GET /sim/kv_transfer/{id}` (vLLM and TensorRT-LLM pulls).
pub async fn serve_transfer(
    State(state): State<Arc<AppState>>,
    Path(request_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    hand_over(&state, &request_id)
}

/// `GET /bootstrap/{room}` on the bootstrap port (SGLang): waits for the
/// room's prefill to finish, since both legs start at once.
pub async fn serve_room(
    State(state): State<Arc<AppState>>,
    Path(room): Path<u64>,
) -> Result<Json<Value>, ApiError> {
    let deadline = Instant::now() + ROOM_WAIT;
    let key = room_key(room);
    loop {
        match hand_over(&state, &key) {
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            result => return result,
        }
    }
}

/// Decode side: pulls the prompt's KV into rank `rank`'s cache before the
/// request is scheduled. Whatever goes wrong, the request still runs and
/// prefills locally.
pub async fn pull_remote_prefill(state: &AppState, rank: RankId, source: &Source, prompt: &[u32]) {
    let block_size = state.model.block_size;
    let rank = state.ranks.get(rank);
    let pulled = match state.transfers.pull(source, block_size).await {
        Ok(pulled) => pulled,
        Err(err) => {
            tracing::warn!(%err, "remote prefill failed; prefilling locally");
            rank.metrics.remote_prefill_fallback();
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
        rank.metrics.remote_prefill_fallback();
        return;
    }
    rank.engine.import_prefix(&prompt[..blocks * block_size]);
    rank.metrics.kv_blocks_received(blocks as u64);
}

/// Prefill side: holds the prompt `rank` computed under `key` for the
/// decode engine and adds what the decode leg needs to the (non-streaming)
/// answer.
pub async fn offer_for_decode(
    state: &AppState,
    rank: RankId,
    key: &str,
    answer: Answer,
    prompt: &[u32],
    response: Response,
) -> Response {
    if response.status() != StatusCode::OK {
        return response;
    }
    state.transfers.hold(key, prompt, rank);
    if answer == Answer::Unchanged {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(bytes) => bytes,
        Err(err) => return ApiError::internal(&err.to_string()).into_response(),
    };
    let Ok(Value::Object(mut reply)) = serde_json::from_slice::<Value>(&bytes) else {
        // A streamed answer: the engines do not hand those off either.
        return Response::from_parts(parts, Body::from(bytes));
    };
    let endpoint = state.transfers.endpoint();
    match answer {
        Answer::KvTransferParams => {
            let blocks: Vec<usize> = (0..prompt.len() / state.model.block_size).collect();
            reply.insert(
                "kv_transfer_params".into(),
                json!({
                    "do_remote_prefill": true,
                    "do_remote_decode": false,
                    "remote_block_ids": blocks,
                    "remote_engine_id": endpoint,
                    "remote_request_id": key,
                    "remote_host": state.transfers.settings.host,
                    "remote_port": state.transfers.settings.port,
                    "tp_size": 1,
                }),
            );
        }
        Answer::DisaggregatedParams => add_context_params(&mut reply, key, &endpoint),
        Answer::Unchanged => {}
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    let body = serde_json::to_vec(&reply).unwrap_or_default();
    Response::from_parts(parts, Body::from(body))
}

/// TensorRT-LLM: the context phase's answer says generation goes on and
/// where its KV is.
fn add_context_params(reply: &mut Map<String, Value>, key: &str, endpoint: &str) {
    let Some(choice) = reply
        .get_mut("choices")
        .and_then(|c| c.get_mut(0))
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    choice.insert("finish_reason".into(), "not_finished".into());
    choice.insert(
        "disaggregated_params".into(),
        json!({
            "request_type": "context_only",
            "first_gen_tokens": [],
            "ctx_request_id": key,
            "opaque_state": endpoint,
        }),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(value: Value) -> HandoffFields {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn each_protocol_maps_to_its_side() {
        let vllm = fields(json!({"kv_transfer_params": {"do_remote_decode": true}}));
        assert_eq!(
            vllm.handoff(Role::Both, "r1").unwrap(),
            Handoff::Prefill {
                key: "r1".into(),
                answer: Answer::KvTransferParams
            }
        );
        let decode = fields(json!({"kv_transfer_params": {"do_remote_prefill": true,
            "remote_host": "10.0.0.1", "remote_port": 8000, "remote_request_id": "r1"}}));
        assert_eq!(
            decode.handoff(Role::Both, "r2").unwrap(),
            Handoff::Decode(Source {
                host: "10.0.0.1".into(),
                port: 8000,
                path: "/sim/kv_transfer/r1".into()
            })
        );
        let sglang = fields(
            json!({"bootstrap_host": "10.0.0.2", "bootstrap_port": 8998, "bootstrap_room": 7}),
        );
        assert!(matches!(
            sglang.handoff(Role::Prefill, "r").unwrap(),
            Handoff::Prefill {
                answer: Answer::Unchanged,
                ..
            }
        ));
        assert_eq!(
            sglang.handoff(Role::Decode, "r").unwrap(),
            Handoff::Decode(Source {
                host: "10.0.0.2".into(),
                port: 8998,
                path: "/bootstrap/7".into()
            })
        );
        assert_eq!(sglang.handoff(Role::Both, "r").unwrap(), Handoff::None);
        let context = fields(json!({"disaggregated_params": {"request_type": "context_only"}}));
        let handoff = context.handoff(Role::Both, "c1").unwrap();
        assert_eq!(handoff.max_tokens(Some(50)), Some(1));
        let generation = fields(
            json!({"disaggregated_params": {"request_type": "generation_only",
            "ctx_request_id": "c1", "opaque_state": "10.0.0.3:8000", "first_gen_tokens": [5]}}),
        );
        assert_eq!(
            generation.handoff(Role::Both, "g").unwrap(),
            Handoff::Decode(Source {
                host: "10.0.0.3".into(),
                port: 8000,
                path: "/sim/kv_transfer/c1".into()
            })
        );
        assert_eq!(
            fields(json!({})).handoff(Role::Both, "x").unwrap(),
            Handoff::None
        );
    }

    #[test]
    fn malformed_fields_are_client_errors() {
        for bad in [
            json!({"kv_transfer_params": "yes"}),
            json!({"kv_transfer_params": {"do_remote_prefill": true}}),
            json!({"disaggregated_params": {"request_type": "both"}}),
            json!({"disaggregated_params": {"request_type": "generation_only", "ctx_request_id": "c", "opaque_state": "nohost"}}),
        ] {
            assert!(
                fields(bad.clone()).handoff(Role::Both, "r").is_err(),
                "{bad}"
            );
        }
        let room_only = fields(json!({"bootstrap_room": 1}));
        assert!(room_only.handoff(Role::Decode, "r").is_err());
    }
}
