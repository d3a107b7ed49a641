//! `POST /debug/route`: what a filter would decide for a request body, by
//! the same router-core code the filter runs (request parsing, prompt
//! identity, tokenization as `/v1/tokenize` does it, `routing::plan`) over
//! this sidecar's fleet state. A filter also counts its own in-flight
//! requests and ORCA reports, which this sidecar does not see; with none
//! outstanding, both choose alike.

use std::hash::{BuildHasher, RandomState};
use std::num::NonZeroUsize;

use axum::http::StatusCode;
use router_core::request::{parse_request, Endpoint};
use router_core::routing::disagg::PrefillRouting;
use router_core::routing::learned::LearnedTable;
use router_core::routing::prompt::{is_tokenizable, PromptIdentity};
use router_core::routing::score::{KvCost, Scorer};
use router_core::routing::select::PromptShape;
use router_core::routing::{plan, Decision, LocalState, Mode, ModelRouting, RoutedPrompt, Signals};
use router_core::{BlockHasher, BlockSize, HashSeed, SeqHash};
use serde_json::{json, Value};

use crate::serve::http::{tokenize_body, ApiError, HttpState};

pub async fn explain(http: &HttpState, body: &[u8]) -> Result<Value, ApiError> {
    let bad_request = |message: String| ApiError(StatusCode::BAD_REQUEST, message);
    // Chat bodies carry `messages`; anything else is read as a completion.
    let (endpoint, request) =
        match parse_request(Endpoint::ChatCompletions, body, http.max_body_bytes) {
            Ok(request) => (Endpoint::ChatCompletions, request),
            Err(_) => (
                Endpoint::Completions,
                parse_request(Endpoint::Completions, body, http.max_body_bytes)
                    .map_err(|e| bad_request(e.to_string()))?,
            ),
        };
    let model = request.model.clone();
    // The model spec the gateway's filter reads too, so the plan is the same.
    let (block_size, weights, prefill) = match http.state.lock(&model) {
        Some(guard) => {
            let spec = guard.registry.config();
            let prefill = spec
                .remote_prefill()
                .filter(|_| request.prompt.can_prefill_remotely())
                .map(|d| PrefillRouting {
                    spec: d.shared,
                    endpoints: Vec::new(),
                });
            (spec.block_size, spec.weights(), prefill)
        }
        None => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("model '{model}' is not configured"),
            ))
        }
    };
    let block_size = BlockSize::new(block_size)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let hasher = BlockHasher::new(block_size, HashSeed::for_model(&model, None));
    let identity = PromptIdentity::of(&hasher, &request.prompt, request.cache_salt.as_deref());
    let exact: Option<Vec<SeqHash>> = match identity.exact {
        Some(exact) => Some(exact),
        None if is_tokenizable(&request.prompt) => {
            let (_, tokenized) = tokenize_body(http, body, Some(endpoint)).await?;
            Some(tokenized.block_hashes.into_iter().map(SeqHash).collect())
        }
        None => None,
    };
    let Some(guard) = http.state.lock(&model) else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("model '{model}' is gone"),
        ));
    };
    let routing = ModelRouting {
        block_size,
        weights,
        endpoints: Vec::new(),
    };
    // This sidecar has no decisions of its own to learn from.
    let mut local = LocalState::new(LearnedTable::new(NonZeroUsize::MIN, 1));
    // A fleet this sidecar no longer hears is stale to the filters too.
    let fleet = guard.registry.fleet();
    let signals = Signals {
        view: Some(fleet).filter(|_| !guard.registry.fleet_unheard()),
        last_known: Some(fleet),
        now_ms: 0,
        // Only ties and temperature sampling use it; no need for a strong RNG.
        random: RandomState::new().hash_one(body.len()),
    };
    let prompt = RoutedPrompt {
        exact: exact.as_deref(),
        keys: &identity.keys,
    };
    let plan = plan(&routing, prefill.as_ref(), prompt, signals, &mut local);
    let shape = PromptShape {
        blocks: plan.decode.prompt_blocks,
        block_size: block_size.get(),
    };
    let scorer = KvCost::from(weights);
    let mut workers = Vec::new();
    if plan.mode() == Mode::Precise {
        for candidate in local.last_decode_candidates() {
            let Some(entry) = guard.registry.fleet().worker_at(candidate.worker) else {
                continue;
            };
            workers.push(json!({
                "worker_id": entry.worker_id,
                "address": entry.target.address(),
                "data_parallel_rank": entry.target.data_parallel_rank(),
                "cached_blocks": candidate.cached_blocks,
                "active_blocks": candidate.load.active_blocks,
                "queued_prefill_tokens": candidate.load.queued_prefill_tokens,
                "cost": scorer.cost(shape, candidate),
            }));
        }
        workers.sort_by(|a, b| a["worker_id"].as_str().cmp(&b["worker_id"].as_str()));
    }
    let decode = &plan.decode;
    let chosen = |decision: &Decision| {
        decision.target.as_ref().map(|target| {
            json!({
                "worker_id": decision.worker_id,
                "address": target.address(),
                "data_parallel_rank": target.data_parallel_rank(),
                "cached_blocks": decision.cached_blocks,
            })
        })
    };
    Ok(json!({
        "model": model,
        "mode": plan.mode().as_str(),
        "prompt_blocks": decode.prompt_blocks,
        "block_hashes": exact.unwrap_or_default().iter().map(|h| h.0).collect::<Vec<_>>(),
        "workers": workers,
        "choice": chosen(decode),
        "prefill": plan.prefill.as_ref().and_then(chosen),
    }))
}
