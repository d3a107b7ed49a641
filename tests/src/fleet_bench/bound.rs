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
//! fully cached prompt still misses its last block.

use std::collections::HashMap;

/// One prompt as the engine blocks it.
#[derive(Debug, Clone)]
pub struct BlockedPrompt {
    /// Sequence hash of every full block, in order.
    pub block_hashes: Vec<u64>,
    pub tokens: usize,
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
        seen_hits += infinite.lookup_then_insert(blocks, &prompt.block_hashes) * block_size;
        pooled_hits += pooled.lookup_then_insert(blocks, &prompt.block_hashes) * block_size;
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
        BlockedPrompt {
            block_hashes: blocks.to_vec(),
            tokens,
        }
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
