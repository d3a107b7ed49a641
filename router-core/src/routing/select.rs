//! Choosing one worker among candidates: a [`Scorer`] gives each candidate a
//! cost, a [`Picker`] chooses by cost (docs/architecture.md#the-request-path).
//! A new policy is one scorer or picker; [`select`] is the configured one.

use crate::index::WorkerSlot;
use crate::routing::pick::{LowestCost, Picker, Scored, Softmax};
use crate::routing::score::Scorer;

/// What the router knows of one worker's current load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerLoad {
    /// KV blocks held by running requests.
    pub active_blocks: u64,
    /// Prompt tokens admitted or queued but not yet prefilled.
    pub queued_prefill_tokens: u64,
}

/// One worker that may serve the request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub worker: WorkerSlot,
    /// Leading prompt blocks already cached on the worker.
    pub cached_blocks: u32,
    pub load: WorkerLoad,
}

pub use kvmesh_config::CostWeights;

/// The prompt being routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptShape {
    /// Full blocks in the prompt.
    pub blocks: u32,
    pub block_size: u32,
}

/// The chosen worker and why.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Selection {
    pub worker: WorkerSlot,
    pub cached_blocks: u32,
    pub cost: f64,
}

/// Scores every candidate with `scorer` and lets `picker` choose; `None`
/// only when there are no candidates. `random` is a uniformly random value
/// supplied by the caller (no I/O here).
pub fn select_with(
    prompt: PromptShape,
    candidates: &[Candidate],
    scorer: &dyn Scorer,
    picker: &dyn Picker,
    random: u64,
) -> Option<Selection> {
    let scored: Vec<Scored<'_>> = candidates
        .iter()
        .map(|candidate| Scored {
            cost: scorer.cost(prompt, candidate),
            candidate,
        })
        .collect();
    let chosen = scored.get(picker.pick(&scored, random)?)?;
    Some(Selection {
        worker: chosen.candidate.worker,
        cached_blocks: chosen.candidate.cached_blocks,
        cost: chosen.cost,
    })
}

/// The configured policy: `scorer`, then the lowest cost (or a softmax
/// sample when the temperature is above 0).
pub fn select(
    prompt: PromptShape,
    candidates: &[Candidate],
    scorer: &dyn Scorer,
    temperature: f64,
    random: u64,
) -> Option<Selection> {
    if temperature > 0.0 {
        let picker = Softmax { temperature };
        select_with(prompt, candidates, scorer, &picker, random)
    } else {
        select_with(prompt, candidates, scorer, &LowestCost, random)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::score::{KvCost, PrefillCost};

    /// The decode pool's policy with `weights`.
    fn kv_select(
        prompt: PromptShape,
        candidates: &[Candidate],
        weights: CostWeights,
        random: u64,
    ) -> Option<Selection> {
        let scorer = KvCost::from(weights);
        select(prompt, candidates, &scorer, weights.temperature, random)
    }

    const PROMPT: PromptShape = PromptShape {
        blocks: 100,
        block_size: 16,
    };

    fn candidate(worker: u32, cached: u32, active: u64, queued: u64) -> Candidate {
        Candidate {
            worker: WorkerSlot(worker),
            cached_blocks: cached,
            load: WorkerLoad {
                active_blocks: active,
                queued_prefill_tokens: queued,
            },
        }
    }

    fn pick(candidates: &[Candidate], weights: CostWeights, random: u64) -> u32 {
        kv_select(PROMPT, candidates, weights, random)
            .unwrap()
            .worker
            .0
    }

    #[test]
    fn cache_wins_when_load_is_equal() {
        let c = [
            candidate(0, 0, 10, 0),
            candidate(1, 80, 10, 0),
            candidate(2, 40, 10, 0),
        ];
        assert_eq!(pick(&c, CostWeights::default(), 0), 1);
    }

    #[test]
    fn load_beats_cache_when_the_cached_worker_is_overloaded() {
        // Worker 1 holds the prefix but has 2000 prompt tokens queued (125 blocks).
        let c = [candidate(0, 0, 10, 0), candidate(1, 80, 10, 2000)];
        assert_eq!(pick(&c, CostWeights::default(), 0), 0);
    }

    #[test]
    fn logit_follows_the_formula() {
        let weights = CostWeights {
            overlap_weight: 2.0,
            temperature: 0.0,
        };
        // uncached 60 + queued 32/16=2 → prefill 62; decode = 5 + 100.
        let l = KvCost::from(weights).cost(PROMPT, &candidate(0, 40, 5, 32));
        assert!((l - (2.0 * 62.0 + 105.0)).abs() < 1e-9, "{l}");
    }

    #[test]
    fn ties_go_to_least_loaded_then_random() {
        // Equal logits at weight 1: (100-50) + 0 + 10 + 100 = 160 and
        // (100-60) + 0 + 20 + 100 = 160.
        let unit = CostWeights {
            overlap_weight: 1.0,
            temperature: 0.0,
        };
        let c = [candidate(0, 50, 10, 0), candidate(1, 60, 20, 0)];
        assert_eq!(pick(&c, unit, 7), 0);
        let same = [
            candidate(0, 0, 0, 0),
            candidate(1, 0, 0, 0),
            candidate(2, 0, 0, 0),
        ];
        let chosen: std::collections::HashSet<u32> = (0..30)
            .map(|r| pick(&same, CostWeights::default(), r))
            .collect();
        assert_eq!(chosen.len(), 3);
    }

    #[test]
    fn temperature_spreads_choices_and_prefers_cheap() {
        let c = [candidate(0, 90, 0, 0), candidate(1, 0, 0, 0)];
        let weights = CostWeights {
            overlap_weight: 1.0,
            temperature: 0.5,
        };
        let mut counts = [0u32; 2];
        let mut state = 0x1234_5678_9abc_def0u64;
        for _ in 0..2000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            counts[pick(&c, weights, state) as usize] += 1;
        }
        // p(worker 1) = e^-2 / (1 + e^-2) ≈ 0.12
        assert!(counts[0] > counts[1] && counts[1] > 100, "{counts:?}");
    }

    #[test]
    fn a_cached_tenant_stays_while_its_worker_decodes_a_few_more_requests() {
        // The fleet benchmark's multi-tenant shape: a 259-block chat whose
        // first 249 blocks are cached on worker 0, which runs three more
        // such requests in decode than idle worker 1 and has nothing queued.
        // Moving would re-prefill 4k tokens to dodge a few ms of batching.
        let prompt = PromptShape {
            blocks: 259,
            block_size: 16,
        };
        let c = [candidate(0, 249, 3 * 263, 0), candidate(1, 0, 0, 0)];
        let chosen = kv_select(prompt, &c, CostWeights::default(), 0).unwrap();
        assert_eq!(chosen.worker.0, 0);
    }

    #[test]
    fn a_prefill_goes_to_the_shortest_queue_whatever_it_decodes() {
        // Worker 0 decodes many sequences with nothing queued; worker 1
        // decodes nothing but has 2000 prompt tokens queued. Decoding the
        // prompt, worker 1 is cheaper; prefilling it, worker 0 ends first.
        let c = [candidate(0, 0, 5_000, 0), candidate(1, 0, 0, 2_000)];
        assert_eq!(pick(&c, CostWeights::default(), 0), 1);
        let prefill = select(PROMPT, &c, &PrefillCost, 0.0, 0).unwrap();
        assert_eq!(prefill.worker.0, 0);
        // Cached blocks count the same way as queued ones.
        let c = [candidate(0, 0, 0, 320), candidate(1, 30, 0, 0)];
        assert_eq!(
            select(PROMPT, &c, &PrefillCost, 0.0, 0).unwrap().worker.0,
            1
        );
    }

    #[test]
    fn no_candidates_no_choice() {
        assert!(kv_select(PROMPT, &[], CostWeights::default(), 0).is_none());
    }

    #[test]
    fn herding_is_bounded_by_the_load_term() {
        // Every request shares a 64-block system prompt cached on worker 0.
        // Simulate in-flight accounting: each routed request adds its prompt
        // to the chosen worker's queue and active blocks.
        let prompt = PromptShape {
            blocks: 80,
            block_size: 16,
        };
        let mut workers: Vec<Candidate> = (0..4).map(|w| candidate(w, 0, 0, 0)).collect();
        workers[0].cached_blocks = 64;
        let mut routed = [0u32; 4];
        for request in 0..40u64 {
            let chosen = kv_select(prompt, &workers, CostWeights::default(), request).unwrap();
            let w = &mut workers[chosen.worker.0 as usize];
            routed[chosen.worker.0 as usize] += 1;
            let uncached = prompt.blocks - w.cached_blocks;
            w.load.queued_prefill_tokens += u64::from(uncached * prompt.block_size);
            w.load.active_blocks += u64::from(prompt.blocks);
            w.cached_blocks = prompt.blocks.min(64);
        }
        assert!(routed.iter().all(|&n| n > 0), "{routed:?}");
        assert!(routed[0] < 20, "worker 0 took {routed:?}");
    }
}
