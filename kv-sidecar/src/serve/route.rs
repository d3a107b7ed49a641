//! `POST /debug/route`: what the filter would decide for a request body,
//! computed with the same router-core code the filter runs (request parsing,
//! block hashing, fleet overlaps, `selection::select`).

use std::hash::{BuildHasher, RandomState};

use axum::http::StatusCode;
use router_core::index::OverlapScratch;
use router_core::request::{parse_request, Endpoint, Prompt};
use router_core::selection::{self, Candidate, CostWeights, PromptShape, WorkerLoad};
use router_core::state_stream::WorkerRole;
use router_core::SeqHash;
use serde_json::{json, Value};

use crate::serve::http::{run_tokenizer, ApiError, HttpState, TokenizeInput};

pub async fn explain(http: &HttpState, body: &[u8]) -> Result<Value, ApiError> {
    let raw: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {e}"),
        )
    })?;
    let endpoint = if raw.get("messages").is_some() {
        Endpoint::ChatCompletions
    } else {
        Endpoint::Completions
    };
    let request = parse_request(endpoint, body, http.max_body_bytes)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    let model = request.model.clone();
    let block_size = match http.state.lock(&model) {
        Some(guard) => guard.registry.config().block_size,
        None => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("model '{model}' is not configured"),
            ))
        }
    };
    let hashes: Vec<u64> = match &request.prompt {
        Prompt::Tokens(_) | Prompt::TokenBatch(_) => {
            let tokens = request.prompt.token_ids().unwrap_or_default();
            let seed = router_core::HashSeed::for_model(&model, None);
            let size = router_core::BlockSize::new(block_size)
                .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
            router_core::BlockHasher::new(size, seed)
                .sequence_hashes(tokens)
                .into_iter()
                .map(|h| h.0)
                .collect()
        }
        Prompt::Text(text) => text_hashes(http, &model, text.clone()).await?,
        Prompt::TextBatch(first) => text_hashes(http, &model, first.clone()).await?,
        Prompt::Chat(_) => {
            let messages = raw
                .get("messages")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let input = TokenizeInput::Chat {
                messages,
                tools: raw.get("tools").cloned(),
                kwargs: raw
                    .get("chat_template_kwargs")
                    .and_then(Value::as_object)
                    .cloned(),
            };
            run_tokenizer(http, &model, input).await?.block_hashes
        }
    };
    let Some(guard) = http.state.lock(&model) else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("model '{model}' is gone"),
        ));
    };
    let (routing, fleet) = (&guard.registry.config().routing, guard.registry.fleet());
    let weights = CostWeights {
        overlap_weight: routing.overlap_weight,
        temperature: routing.temperature,
    };
    let prompt: Vec<SeqHash> = hashes.iter().copied().map(SeqHash).collect();
    let mut scratch = OverlapScratch::default();
    let overlaps = fleet.overlaps(&prompt, &mut scratch).to_vec();
    let shape = PromptShape {
        blocks: u32::try_from(prompt.len()).unwrap_or(u32::MAX),
        block_size,
    };
    let mut candidates = Vec::new();
    let mut workers = Vec::new();
    let mut entries: Vec<_> = fleet
        .workers()
        .filter(|w| w.role != WorkerRole::Prefill)
        .collect();
    entries.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
    for entry in entries {
        let cached_blocks = overlaps
            .iter()
            .find(|o| o.worker == entry.slot)
            .map_or(0, |o| o.blocks);
        let candidate = Candidate {
            worker: entry.slot,
            cached_blocks,
            load: WorkerLoad {
                active_blocks: entry.load.active_blocks,
                queued_prefill_tokens: entry.load.queued_prefill_tokens,
            },
        };
        workers.push(json!({
            "worker_id": entry.worker_id,
            "address": entry.address,
            "cached_blocks": cached_blocks,
            "active_blocks": entry.load.active_blocks,
            "queued_prefill_tokens": entry.load.queued_prefill_tokens,
            "cost": selection::logit(shape, &candidate, weights),
        }));
        candidates.push(candidate);
    }
    // Only ties and temperature sampling use it; no need for a strong RNG.
    let random = RandomState::new().hash_one(prompt.len());
    let choice = selection::select(shape, &candidates, weights, random).and_then(|s| {
        let entry = fleet.worker_at(s.worker)?;
        Some(json!({
            "worker_id": entry.worker_id,
            "address": entry.address,
            "cached_blocks": s.cached_blocks,
            "cost": s.logit,
        }))
    });
    Ok(json!({
        "model": model,
        "prompt_blocks": prompt.len(),
        "block_hashes": hashes,
        "workers": workers,
        "choice": choice,
    }))
}

async fn text_hashes(http: &HttpState, model: &str, text: String) -> Result<Vec<u64>, ApiError> {
    Ok(run_tokenizer(http, model, TokenizeInput::Prompt(text))
        .await?
        .block_hashes)
}
