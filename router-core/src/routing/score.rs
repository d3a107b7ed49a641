//! Scorers: the cost of sending the prompt to one candidate.

use crate::routing::select::{Candidate, CostWeights, PromptShape};

/// Gives each candidate a cost; lower is better.
pub trait Scorer {
    fn cost(&self, prompt: PromptShape, candidate: &Candidate) -> f64;
}

/// KV-aware cost: `overlap_weight × prefill_blocks + decode_blocks`, where
/// `prefill_blocks` is the prompt blocks the candidate must compute (not
/// cached) plus the prefill already queued on it, and `decode_blocks` the KV
/// blocks active on it once this request runs.
///
/// The load term is what keeps a cache-affine router from herding: every
/// request routed to the worker holding a popular prefix raises its queued
/// prefill and active blocks until another worker becomes cheaper.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvCost {
    pub overlap_weight: f64,
}

impl From<CostWeights> for KvCost {
    fn from(weights: CostWeights) -> Self {
        Self {
            overlap_weight: weights.overlap_weight,
        }
    }
}

impl Scorer for KvCost {
    fn cost(&self, prompt: PromptShape, candidate: &Candidate) -> f64 {
        let decode_blocks = candidate.load.active_blocks as f64 + f64::from(prompt.blocks);
        self.overlap_weight * prefill_blocks(prompt, candidate) + decode_blocks
    }
}

/// Prefill-only cost: `prefill_blocks` alone, the work done on the candidate
/// before the prompt's last token. A prefill worker holds the prompt's KV only
/// until it is sent to the decode worker, so its decoding load does not make
/// it a worse place to prefill; its queue does.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PrefillCost;

impl Scorer for PrefillCost {
    fn cost(&self, prompt: PromptShape, candidate: &Candidate) -> f64 {
        prefill_blocks(prompt, candidate)
    }
}

/// Blocks the candidate computes before the prompt's last token: the prompt
/// blocks it has not cached, plus the prefill already queued on it.
fn prefill_blocks(prompt: PromptShape, candidate: &Candidate) -> f64 {
    let block_size = f64::from(prompt.block_size.max(1));
    let uncached = f64::from(prompt.blocks.saturating_sub(candidate.cached_blocks));
    uncached + candidate.load.queued_prefill_tokens as f64 / block_size
}
