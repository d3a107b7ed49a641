//! The best prefix-cache hit rate a workload allows a fleet: what the
//! engines' own counters are compared against.
//!
//! Two numbers, from the block hashes of the prompts in the order they were
//! sent:
//! * **seen before** — a block can only hit if an earlier prompt computed it
//!   (an infinite cache): a hard upper bound for any router;
//! * **pooled LRU** — one LRU cache as large as the whole fleet's KV memory
//!   (every worker's blocks pooled, as if the router always knew and reached
//!   the one cache): what perfect routing with the fleet's memory reaches.
//!
//! Like the engines, the last token of a prompt is always computed, so a
//! fully cached prompt still misses its last block. The engines also cache
//! the full blocks of what they generate; a chat's next turn re-sends that
//! answer, so those blocks count as computed too (`answer_blocks`).

use std::collections::HashMap;

/// One prompt as the engine blocks it.
#[derive(Debug, Clone)]
pub struct BlockedPrompt {
    /// Sequence hash of every full block, in order.
    pub block_hashes: Vec<u64>,
    pub tokens: usize,
    /// Full blocks the engine computed while generating the answer, as
    /// hashed in the conversation's next prompt (empty for the last turn).
    pub answer_blocks: Vec<u64>,
}

impl BlockedPrompt {
    pub fn new(block_hashes: Vec<u64>, tokens: usize) -> Self {
        Self {
            block_hashes,
            tokens,
            answer_blocks: Vec::new(),
        }
    }

    /// Sets `answer_blocks` from the conversation's next prompt: its blocks
    /// past this prompt's, within the `generated` tokens that followed it.
    pub fn answered_in(&mut self, next: &BlockedPrompt, generated: usize, block_size: usize) {
        let first = self.block_hashes.len();
        let end = ((self.tokens + generated) / block_size).min(next.block_hashes.len());
        // Only when the next prompt really extends this one.
        let extends = next.block_hashes.get(..first) == Some(&self.block_hashes[..]);
        self.answer_blocks = if extends && end > first {
            next.block_hashes[first..end].to_vec()
        } else {
            Vec::new()
        };
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HitRateBound {
    pub seen_before: f64,
    pub pooled_lru: f64,
}

/// Hit rates (cached prompt tokens ÷ prompt tokens) of `prompts` in order.
pub fn hit_rate_bound(
    prompts: &[BlockedPrompt],
    block_size: usize,
    fleet_blocks: usize,
) -> HitRateBound {
    let mut infinite = LruBlocks::new(usize::MAX);
    let mut pooled = LruBlocks::new(fleet_blocks);
    let (mut queried, mut seen_hits, mut pooled_hits) = (0usize, 0usize, 0usize);
    for prompt in prompts {
        // The engine recomputes at least the prompt's last token.
        let reusable = prompt.tokens.saturating_sub(1) / block_size;
        let blocks = &prompt.block_hashes[..prompt.block_hashes.len().min(reusable)];
        queried += prompt.tokens;
        let computed: Vec<u64> = prompt
            .block_hashes
            .iter()
            .chain(&prompt.answer_blocks)
            .copied()
            .collect();
        seen_hits += infinite.lookup_then_insert(blocks, &computed) * block_size;
        pooled_hits += pooled.lookup_then_insert(blocks, &computed) * block_size;
    }
    let rate = |hits: usize| {
        if queried == 0 {
            0.0
        } else {
            hits as f64 / queried as f64
        }
    };
    HitRateBound {
        seen_before: rate(seen_hits),
        pooled_lru: rate(pooled_hits),
    }
}

/// Block hashes with their last use; evicts the least recently used.
struct LruBlocks {
    capacity: usize,
    clock: u64,
    last_use: HashMap<u64, u64>,
    /// `(last use, hash)`, ordered oldest first.
    by_age: std::collections::BTreeSet<(u64, u64)>,
}

impl LruBlocks {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            clock: 0,
            last_use: HashMap::new(),
            by_age: std::collections::BTreeSet::new(),
        }
    }

    /// The cached prefix length of `lookup` in blocks; then every block of
    /// `computed` becomes most recently used.
    fn lookup_then_insert(&mut self, lookup: &[u64], computed: &[u64]) -> usize {
        let hits = lookup
            .iter()
            .take_while(|hash| self.last_use.contains_key(hash))
            .count();
        for &hash in computed {
            self.clock += 1;
            if let Some(previous) = self.last_use.insert(hash, self.clock) {
                self.by_age.remove(&(previous, hash));
            }
            self.by_age.insert((self.clock, hash));
        }
        while self.last_use.len() > self.capacity {
            let Some((used, hash)) = self.by_age.pop_first() else {
                break;
            };
            debug_assert_eq!(self.last_use.get(&hash), Some(&used));
            self.last_use.remove(&hash);
        }
        hits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(blocks: &[u64], tokens: usize) -> BlockedPrompt {
        BlockedPrompt::new(blocks.to_vec(), tokens)
    }

    #[test]
    fn a_chat_answer_is_cached_for_the_next_turn() {
        // Turn 1: 2 blocks + 8 tokens; 40 generated tokens end at token 80,
        // so the engine filled blocks 3, 4 and 5 of turn 2's prompt.
        let mut first = prompt(&[1, 2], 40);
        let second = prompt(&[1, 2, 3, 4, 5, 6], 100);
        first.answered_in(&second, 40, 16);
        assert_eq!(first.answer_blocks, [3, 4, 5]);
        let bound = hit_rate_bound(&[first.clone(), second.clone()], 16, 1_000);
        // Turn 2 hits blocks 1–5 (80 tokens).
        assert!((bound.seen_before - 80.0 / 140.0).abs() < 1e-12);
        // A "next" prompt that does not extend this one adds nothing.
        let mut unrelated = prompt(&[1, 2], 40);
        unrelated.answered_in(&prompt(&[9, 2, 3, 4], 70), 40, 16);
        assert!(unrelated.answer_blocks.is_empty());
    }

    #[test]
    fn only_blocks_seen_before_hit_and_the_last_token_is_computed() {
        let prompts = [
            prompt(&[1, 2, 3], 48),
            // Same prompt: blocks 1 and 2 hit, the last block holds the last token.
            prompt(&[1, 2, 3], 48),
            // Longer: all three hit.
            prompt(&[1, 2, 3, 4], 70),
        ];
        let bound = hit_rate_bound(&prompts, 16, 1_000);
        let expected = (32.0 + 48.0) / (48.0 + 48.0 + 70.0);
        assert!((bound.seen_before - expected).abs() < 1e-12);
        assert_eq!(bound.seen_before, bound.pooled_lru);
    }

    #[test]
    fn a_small_pool_evicts_the_least_recently_used() {
        let prompts = [
            prompt(&[1, 2], 40),
            prompt(&[7, 8], 40),
            // Pool of 2 blocks: 1 and 2 were evicted by 7 and 8.
            prompt(&[1, 2], 40),
        ];
        let bound = hit_rate_bound(&prompts, 16, 2);
        assert_eq!(bound.pooled_lru, 0.0);
        assert!((bound.seen_before - 32.0 / 120.0).abs() < 1e-12);
    }
}
