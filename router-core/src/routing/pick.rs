//! Pickers: choosing one candidate from their costs.

use crate::routing::select::Candidate;

/// One candidate and its cost.
#[derive(Debug, Clone, Copy)]
pub struct Scored<'a> {
    pub cost: f64,
    pub candidate: &'a Candidate,
}

/// Chooses the index of one scored candidate; `None` only when there are
/// none. `random` is uniformly random, supplied by the caller.
pub trait Picker {
    fn pick(&self, scored: &[Scored<'_>], random: u64) -> Option<usize>;
}

/// The lowest cost; ties go to the least-loaded candidate, then to a random one.
#[derive(Debug, Clone, Copy, Default)]
pub struct LowestCost;

impl Picker for LowestCost {
    fn pick(&self, scored: &[Scored<'_>], random: u64) -> Option<usize> {
        let best = scored.iter().map(|s| s.cost).fold(f64::INFINITY, f64::min);
        let least_load = scored
            .iter()
            .filter(|s| s.cost == best)
            .map(|s| load_of(s.candidate))
            .min()?;
        let ties: Vec<usize> = scored
            .iter()
            .enumerate()
            .filter(|(_, s)| s.cost == best && load_of(s.candidate) == least_load)
            .map(|(i, _)| i)
            .collect();
        ties.get((random % ties.len() as u64) as usize).copied()
    }
}

/// Samples with `p ∝ exp(−normalized_cost / temperature)` over min-max
/// normalized costs: spreads load at the price of some cache hits.
#[derive(Debug, Clone, Copy)]
pub struct Softmax {
    pub temperature: f64,
}

impl Picker for Softmax {
    fn pick(&self, scored: &[Scored<'_>], random: u64) -> Option<usize> {
        let min = scored.iter().map(|s| s.cost).fold(f64::INFINITY, f64::min);
        let max = scored
            .iter()
            .map(|s| s.cost)
            .fold(f64::NEG_INFINITY, f64::max);
        let range = if max > min { max - min } else { 1.0 };
        let weights: Vec<f64> = scored
            .iter()
            .map(|s| (-((s.cost - min) / range) / self.temperature).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        if !(total.is_finite() && total > 0.0) {
            return LowestCost.pick(scored, random);
        }
        // 53 random bits → uniform in [0, 1).
        let mut point = (random >> 11) as f64 / (1u64 << 53) as f64 * total;
        for (i, weight) in weights.iter().enumerate() {
            if point < *weight {
                return Some(i);
            }
            point -= weight;
        }
        scored.len().checked_sub(1)
    }
}

fn load_of(candidate: &Candidate) -> u64 {
    candidate
        .load
        .active_blocks
        .saturating_add(candidate.load.queued_prefill_tokens)
}
