//! `/sim/*` endpoints for tests: the engine's cache truth and live faults;
//! and vLLM's `POST /reset_prefix_cache`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use router_core::target::DATA_PARALLEL_RANK_HEADER;
use serde_json::{json, Value};

use super::error::ApiError;
use super::AppState;
use crate::faults::FaultUpdate;

/// Every cached block of one rank (the request's `X-Data-Parallel-Rank`,
/// else rank 0) with its engine hash and kvmesh sequence hash, so a test
/// can compare a router's view of this worker with the truth.
pub async fn cache(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let rank = match headers.get(DATA_PARALLEL_RANK_HEADER) {
        Some(_) => state.ranks.for_request(&headers)?,
        None => state.ranks.first(),
    };
    let engine = &state.ranks.get(rank).engine;
    let view = engine.cache_view();
    let blocks: Vec<Value> = view
        .blocks
        .iter()
        .map(|b| {
            json!({
                "block_id": b.block_id,
                "engine_hash": b.engine_hash,
                "parent_engine_hash": b.parent_engine_hash,
                "seq_hash": b.seq_hash.0,
                "ref_count": b.ref_count,
                "token_ids": b.token_ids,
            })
        })
        .collect();
    Ok(Json(json!({
        "worker_id": state.worker_id.to_str().unwrap_or_default(),
        "data_parallel_rank": rank.index(),
        "model": state.model.name,
        "block_size": state.model.block_size,
        "num_gpu_blocks": view.num_blocks,
        "num_free_blocks": view.num_free,
        "kv_events_next_seq": engine.next_event_seq(),
        "blocks": blocks,
        "eviction_order": view.eviction_order,
    })))
}

pub async fn get_faults(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!(state.faults.settings()))
}

/// Partial update: `{"error_rate":0.5}`, `{"drop_every":null}`, ...
pub async fn set_faults(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let update: FaultUpdate = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("invalid fault update: {e}"), None))?;
    let settings = state
        .faults
        .update(update)
        .map_err(|e| ApiError::invalid(e.to_string(), None))?;
    tracing::info!(?settings, "faults changed");
    Ok(Json(json!(settings)))
}

/// Every rank's, as vLLM resets all its engines.
pub async fn reset_prefix_cache(State(state): State<Arc<AppState>>) -> Response {
    for rank in state.ranks.iter() {
        if let Err(e) = rank.engine.reset_prefix_cache() {
            return ApiError::invalid(e.to_string(), None).into_response();
        }
    }
    StatusCode::OK.into_response()
}
