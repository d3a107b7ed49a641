//! One synthetic worker's KV cache, as the engine events that change it.
//!
//! A request stores one of a few system prompts the worker serves (shared
//! with other workers, held until the end) followed by a suffix of its own;
//! once the cache is full, the least recently stored suffix is evicted
//! first. Each call yields one engine event, a vLLM `BlockStored` or
//! `BlockRemoved` with the token ids the relay's normalizer hashes, so the
//! published chains are real kvmesh block-hash chains.

use std::collections::{HashSet, VecDeque};

use kv_sidecar::decode::{BlockRemoved, BlockStored, EngineEvent, EngineHash, Medium};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use router_core::BlockSize;

/// System prompts in the whole fleet, and how many of them one worker serves
/// (worker `w` serves `w`, `w + 1`, …): each is cached on about a quarter of
/// the fleet, as if routing kept tenants on a few workers.
const PREFIXES: u32 = 16;
const PREFIXES_PER_WORKER: u32 = 4;
/// Blocks of each system prompt (512 tokens at 16-token blocks).
const PREFIX_BLOCKS: u32 = 32;
/// Suffix blocks per request: uniform in 1..=MAX, mean 8.
const MAX_SUFFIX_BLOCKS: usize = 15;
/// Token ids are drawn below this (a vocabulary every tokenizer covers).
const VOCABULARY: u32 = 32_000;
/// Engine hashes of system-prompt blocks carry this bit; those of other
/// blocks count up from 1 and never reach it.
const PREFIX_HASH: u64 = 1 << 63;

/// What the next request stores, drawn once and kept until it fits.
#[derive(Debug, Clone, Copy)]
struct Request {
    prefix: u32,
    suffix_blocks: usize,
}

pub struct SyntheticCache {
    worker: u32,
    block_size: BlockSize,
    capacity: usize,
    cached_blocks: usize,
    prefixes: HashSet<u32>,
    /// Evictable suffixes, least recently stored first.
    suffixes: VecDeque<Vec<EngineHash>>,
    next: Option<Request>,
    next_hash: u64,
    evicting: bool,
    rng: SmallRng,
}

impl SyntheticCache {
    /// An empty cache of `capacity` blocks for worker number `worker`.
    pub fn new(worker: u32, block_size: BlockSize, capacity: usize, seed: u64) -> Self {
        Self {
            worker,
            block_size,
            capacity,
            cached_blocks: 0,
            prefixes: HashSet::new(),
            suffixes: VecDeque::new(),
            next: None,
            next_hash: 1,
            evicting: false,
            rng: SmallRng::seed_from_u64(seed ^ u64::from(worker).wrapping_mul(0x9E37_79B9)),
        }
    }

    /// True once the cache has been full (it evicts from then on).
    pub fn is_full(&self) -> bool {
        self.evicting
    }

    /// Fraction of the capacity in use, as an engine reports it.
    pub fn usage(&self) -> f64 {
        self.cached_blocks as f64 / self.capacity.max(1) as f64
    }

    #[cfg(test)]
    fn cached_blocks(&self) -> usize {
        self.cached_blocks
    }

    /// The next engine event: the pending request's blocks if they fit,
    /// else the eviction of the oldest suffix.
    pub fn next_event(&mut self) -> EngineEvent {
        let request = *self.next.get_or_insert_with(|| Request {
            prefix: (self.worker + self.rng.random_range(0..PREFIXES_PER_WORKER)) % PREFIXES,
            suffix_blocks: self.rng.random_range(1..=MAX_SUFFIX_BLOCKS),
        });
        let prefix_blocks = if self.prefixes.contains(&request.prefix) {
            0
        } else {
            PREFIX_BLOCKS as usize
        };
        let needed = prefix_blocks + request.suffix_blocks;
        if self.cached_blocks + needed > self.capacity {
            if let Some(oldest) = self.suffixes.pop_front() {
                self.evicting = true;
                self.cached_blocks -= oldest.len();
                return EngineEvent::Removed(BlockRemoved {
                    block_hashes: oldest,
                    medium: Medium::Gpu,
                    group: 0,
                });
            }
        }
        self.next = None;
        self.store(request)
    }

    /// Stores `tokens` (whole blocks of them) as a chain of its own that is
    /// never evicted nor counted against the capacity: a prompt a test sends
    /// later and expects to find on this worker.
    pub fn pinned(&mut self, tokens: &[u32]) -> EngineEvent {
        let blocks = self.block_size.full_blocks(tokens.len());
        let hashes = self.fresh_hashes(blocks);
        stored(
            hashes,
            None,
            tokens[..blocks * self.block_size.as_usize()].to_vec(),
            self.block_size,
        )
    }

    fn store(&mut self, request: Request) -> EngineEvent {
        let mut hashes = Vec::new();
        let mut tokens = Vec::new();
        let parent = prefix_hash(request.prefix, PREFIX_BLOCKS - 1);
        let parent = if self.prefixes.insert(request.prefix) {
            hashes.extend((0..PREFIX_BLOCKS).map(|block| prefix_hash(request.prefix, block)));
            let length = PREFIX_BLOCKS * self.block_size.get();
            tokens.extend((0..length).map(|t| (request.prefix * length + t) % VOCABULARY));
            self.cached_blocks += PREFIX_BLOCKS as usize;
            None
        } else {
            Some(parent)
        };
        let suffix = self.fresh_hashes(request.suffix_blocks);
        let length = request.suffix_blocks * self.block_size.as_usize();
        tokens.extend((0..length).map(|_| self.rng.random_range(0..VOCABULARY)));
        hashes.extend_from_slice(&suffix);
        self.cached_blocks += suffix.len();
        self.suffixes.push_back(suffix);
        stored(hashes, parent, tokens, self.block_size)
    }

    fn fresh_hashes(&mut self, blocks: usize) -> Vec<EngineHash> {
        let first = self.next_hash;
        self.next_hash += blocks as u64;
        (first..self.next_hash).map(EngineHash).collect()
    }
}

fn prefix_hash(prefix: u32, block: u32) -> EngineHash {
    EngineHash(PREFIX_HASH | u64::from(prefix) << 32 | u64::from(block))
}

fn stored(
    block_hashes: Vec<EngineHash>,
    parent: Option<EngineHash>,
    token_ids: Vec<u32>,
    block_size: BlockSize,
) -> EngineEvent {
    EngineEvent::Stored(BlockStored::on_gpu(
        block_hashes,
        parent,
        token_ids,
        block_size.get(),
    ))
}

#[cfg(test)]
mod tests {
    use kv_sidecar::normalize::{MediaPolicy, NormEvent, NormStats, Normalizer};

    use super::*;

    fn blocks(event: &EngineEvent) -> isize {
        match event {
            EngineEvent::Stored(s) => s.block_hashes.len() as isize,
            EngineEvent::Removed(r) => -(r.block_hashes.len() as isize),
            _ => 0,
        }
    }

    #[test]
    fn fills_up_then_stays_within_capacity_alternating_stores_and_evictions() {
        let mut cache = SyntheticCache::new(3, BlockSize::VLLM_DEFAULT, 512, 7);
        let mut held = 0isize;
        let mut events = 0;
        while !cache.is_full() {
            held += blocks(&cache.next_event());
            events += 1;
            assert!(events < 1_000, "never filled");
        }
        let (mut stores, mut removals) = (0, 0);
        for _ in 0..2_000 {
            let event = cache.next_event();
            held += blocks(&event);
            if blocks(&event) > 0 {
                stores += 1;
            } else {
                removals += 1;
            }
            assert!(held as usize <= 512 && held as usize == cache.cached_blocks());
        }
        assert!(held > 512 - 2 * MAX_SUFFIX_BLOCKS as isize);
        assert!(
            stores > 800 && removals > 800,
            "{stores} stores, {removals} removals"
        );
    }

    #[test]
    fn the_relay_normalizer_takes_every_event_without_losing_a_block() {
        let block_size = BlockSize::VLLM_DEFAULT;
        let mut cache = SyntheticCache::new(0, block_size, 256, 1);
        let mut normalizer = Normalizer::new("m", block_size, MediaPolicy::default());
        let (mut out, mut stats) = (Vec::new(), NormStats::default());
        for _ in 0..500 {
            normalizer.apply(&cache.next_event(), &mut out, &mut stats);
        }
        normalizer.apply(&cache.pinned(&[5; 40]), &mut out, &mut stats);
        assert_eq!(stats.unknown_parent + stats.unknown_removed, 0);
        assert_eq!(stats.token_count_mismatch, 0);
        assert_eq!(normalizer.block_count(), cache.cached_blocks() + 2);
        assert!(out.iter().all(|e| !matches!(e, NormEvent::Cleared)));
    }
}
