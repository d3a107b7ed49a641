//! The best prefix-cache hit rate a workload allows a fleet: what the
//! engines' own counters are compared against.
//!
//! Three numbers, from the block hashes of the prompts in the order they were
//! sent:
//! * **seen before** — a block can only hit if an earlier prompt computed it
//!   (an infinite cache): a hard upper bound for any router;
//! * **pooled LRU** — one LRU cache as large as the whole fleet's KV memory
//!   (every worker's blocks pooled, as if the router always knew and reached
//!   the one cache): what perfect routing with the fleet's memory reaches;
//! * **pooled free memory** — the same cache, except that the blocks of
//!   requests still running in the run cannot be evicted and take room from
//!   it, as in the engines. On long prompts at high load running requests
//!   hold most of the memory, which no router can give back. It depends on
//!   the run's own timing, so it is a bound per policy.
//!
//! Like the engines, the last token of a prompt is always computed, so a
//! fully cached prompt still misses its last block. The engines also cache
//! the full blocks of what they generate; a chat's next turn re-sends that
//! answer, so those blocks count as computed too (`answer_blocks`).

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// One prompt as the engine blocks it.
#[derive(Debug, Clone)]
pub struct BlockedPrompt {
    /// Sequence hash of every full block, in order.
    pub block_hashes: Vec<u64>,
    pub tokens: usize,
    /// Full blocks the engine computed while generating the answer, as
    /// hashed in the conversation's next prompt (empty for the last turn).
    pub answer_blocks: Vec<u64>,
    /// When the request held KV memory in the run; `None` when it failed.
    pub held: Option<Held>,
}

/// A request's hold on KV memory: its prompt's and generated blocks, from
/// when it was sent until its answer ended (seconds from the run's start).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Held {
    pub from: f64,
    pub until: f64,
    /// Full blocks of generated tokens.
    pub generated_blocks: usize,
}

impl BlockedPrompt {
    pub fn new(block_hashes: Vec<u64>, tokens: usize) -> Self {
        Self {
            block_hashes,
            tokens,
            answer_blocks: Vec::new(),
            held: None,
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
    pub pooled_free: f64,
}

/// Hit rates (cached prompt tokens ÷ prompt tokens) of `prompts` in order.
pub fn hit_rate_bound(
    prompts: &[BlockedPrompt],
    block_size: usize,
    fleet_blocks: usize,
) -> HitRateBound {
    let mut infinite = PooledCache::new(usize::MAX);
    let mut pooled = PooledCache::new(fleet_blocks);
    let mut pooled_free = PooledCache::new(fleet_blocks);
    let (mut queried, mut seen_hits, mut pooled_hits, mut free_hits) = (0, 0, 0, 0);
    for (request, prompt) in prompts.iter().enumerate() {
        // The engine recomputes at least the prompt's last token.
        let reusable = prompt.tokens.saturating_sub(1) / block_size;
        let lookup: Vec<Block> = prompt.block_hashes[..prompt.block_hashes.len().min(reusable)]
            .iter()
            .map(|&hash| Block::Hash(hash))
            .collect();
        queried += prompt.tokens;
        let mut computed: Vec<Block> = prompt
            .block_hashes
            .iter()
            .chain(&prompt.answer_blocks)
            .map(|&hash| Block::Hash(hash))
            .collect();
        seen_hits += infinite.admit(&lookup, &computed, None) * block_size;
        pooled_hits += pooled.admit(&lookup, &computed, None) * block_size;
        if let Some(held) = prompt.held {
            let unhashed = held
                .generated_blocks
                .saturating_sub(prompt.answer_blocks.len());
            computed.extend((0..unhashed).map(|index| Block::Generated { request, index }));
        }
        free_hits += pooled_free.admit(&lookup, &computed, prompt.held) * block_size;
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
        pooled_free: rate(free_hits),
    }
}

/// A KV block as the bound tracks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Block {
    /// A block some prompt can hit: its sequence hash.
    Hash(u64),
    /// A generated block no later prompt re-sends: it only takes room.
    Generated { request: usize, index: usize },
}

/// One cache for the whole fleet: blocks of running requests stay, the
/// others go least recently used first when the room is needed.
struct PooledCache {
    capacity: usize,
    /// Blocks running requests hold, with how many hold each.
    held: HashMap<Block, u32>,
    /// Running requests' blocks by when they end (µs, then arrival order).
    running: BTreeMap<(u64, u64), Vec<Block>>,
    arrivals: u64,
    free: LruBlocks,
}

impl PooledCache {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            held: HashMap::new(),
            running: BTreeMap::new(),
            arrivals: 0,
            free: LruBlocks::default(),
        }
    }

    /// The cached prefix length of `lookup` in blocks when a request
    /// arrives; then its `blocks` are cached, and held from its arrival
    /// until it ends if it `held` memory.
    fn admit(&mut self, lookup: &[Block], blocks: &[Block], held: Option<Held>) -> usize {
        if let Some(held) = held {
            self.release_until(micros(held.from));
        }
        let hits = lookup
            .iter()
            .take_while(|block| self.held.contains_key(block) || self.free.contains(block))
            .count();
        match held {
            Some(held) => {
                for block in blocks {
                    self.free.remove(block);
                    *self.held.entry(*block).or_default() += 1;
                }
                self.arrivals += 1;
                self.running
                    .insert((micros(held.until), self.arrivals), blocks.to_vec());
            }
            None => {
                for block in blocks {
                    if !self.held.contains_key(block) {
                        self.free.touch(*block);
                    }
                }
            }
        }
        let room = self.capacity.saturating_sub(self.held.len());
        self.free.evict_down_to(room);
        hits
    }

    /// Frees the blocks of requests that ended by `now`.
    fn release_until(&mut self, now: u64) {
        while let Some(entry) = self.running.first_entry() {
            if entry.key().0 > now {
                break;
            }
            for block in entry.remove() {
                if let Some(holders) = self.held.get_mut(&block) {
                    *holders -= 1;
                    if *holders == 0 {
                        self.held.remove(&block);
                        self.free.touch(block);
                    }
                }
            }
        }
    }
}

fn micros(seconds: f64) -> u64 {
    (seconds.max(0.0) * 1e6) as u64
}

/// Blocks with their last use; evicts the least recently used.
#[derive(Default)]
struct LruBlocks {
    clock: u64,
    last_use: HashMap<Block, u64>,
    /// `(last use, block)`, ordered oldest first.
    by_age: BTreeSet<(u64, Block)>,
}

impl LruBlocks {
    fn contains(&self, block: &Block) -> bool {
        self.last_use.contains_key(block)
    }

    /// Makes `block` the most recently used, adding it if absent.
    fn touch(&mut self, block: Block) {
        self.clock += 1;
        if let Some(previous) = self.last_use.insert(block, self.clock) {
            self.by_age.remove(&(previous, block));
        }
        self.by_age.insert((self.clock, block));
    }

    fn remove(&mut self, block: &Block) {
        if let Some(used) = self.last_use.remove(block) {
            self.by_age.remove(&(used, *block));
        }
    }

    fn evict_down_to(&mut self, capacity: usize) {
        while self.last_use.len() > capacity {
            let Some((_, block)) = self.by_age.pop_first() else {
                break;
            };
            self.last_use.remove(&block);
        }
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

    fn held(prompt: &mut BlockedPrompt, from: f64, until: f64, generated_blocks: usize) {
        prompt.held = Some(Held {
            from,
            until,
            generated_blocks,
        });
    }

    #[test]
    fn running_requests_hold_their_blocks_out_of_the_free_memory() {
        // A pool of 4 blocks. Prompt A (2 blocks) ends at t=1; B (2 blocks
        // and 2 generated) runs from t=2 to t=10; C repeats A at t=3.
        let mut a = prompt(&[1, 2], 40);
        held(&mut a, 0.0, 1.0, 0);
        let mut b = prompt(&[7, 8], 40);
        held(&mut b, 2.0, 10.0, 2);
        let mut c = prompt(&[1, 2], 40);
        held(&mut c, 3.0, 4.0, 0);
        let bound = hit_rate_bound(&[a.clone(), b.clone(), c.clone()], 16, 4);
        // All memory: B's 2 blocks leave room for A's, which C hits.
        assert!((bound.pooled_lru - 32.0 / 120.0).abs() < 1e-12);
        // Free memory: B's 4 held blocks fill the pool and evicted A's.
        assert_eq!(bound.pooled_free, 0.0);
        // Without generated blocks B leaves A's 2 blocks room.
        held(&mut b, 2.0, 10.0, 0);
        let bound = hit_rate_bound(&[a, b, c], 16, 4);
        assert_eq!(bound.pooled_free, bound.pooled_lru);
    }

    #[test]
    fn a_running_request_shares_its_blocks() {
        // B arrives while A runs: A's blocks are held, not evicted, and hit.
        let mut a = prompt(&[1, 2, 3], 60);
        held(&mut a, 0.0, 10.0, 0);
        let mut b = prompt(&[1, 2, 3], 60);
        held(&mut b, 1.0, 2.0, 0);
        let bound = hit_rate_bound(&[a, b], 16, 3);
        assert!((bound.pooled_free - 48.0 / 120.0).abs() < 1e-12);
        assert_eq!(bound.pooled_free, bound.pooled_lru);
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
