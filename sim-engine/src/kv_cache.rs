//! Paged KV cache with prefix caching, modelled on vLLM's block pool.
//!
//! * The cache holds `num_gpu_blocks` blocks of `block_size` tokens.
//! * A full block is identified by its content chain (engine hash of parent
//!   hash + tokens) and registered for reuse once computed.
//! * Running requests hold blocks by reference count. A block with no
//!   references sits in the free queue; if it is registered it stays cached
//!   (and reusable) until the free queue hands it out again, which evicts it.
//! * The free queue is LRU: a released request appends its blocks tail-first,
//!   so a prefix outlives its own continuation, as in vLLM.
//! * Only one block per content hash is registered: a concurrent duplicate
//!   stays private to its request, so every `BlockStored` is matched by
//!   exactly one later `BlockRemoved` (vLLM may register duplicates).
//!
//! Every change a subscriber must know about is queued as a [`CacheEvent`].

use std::collections::{BTreeMap, HashMap};

use router_core::{BlockHasher, SeqHash};
use thiserror::Error;

use crate::engine_hash::EngineHasher;

pub type BlockId = usize;

/// A change of the set of cached blocks, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheEvent {
    /// Consecutive blocks of one chain were registered.
    Stored {
        block_hashes: Vec<u64>,
        parent_block_hash: Option<u64>,
        token_ids: Vec<u32>,
    },
    /// Blocks were evicted.
    Removed { block_hashes: Vec<u64> },
    /// Every cached block was dropped.
    AllCleared,
}

/// Where a full block sits in its chain: what the next block chains onto.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLink {
    pub engine_hash: u64,
    pub seq_hash: SeqHash,
}

/// A block registered in the prefix cache, as `/sim/cache` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedBlock {
    pub block_id: BlockId,
    pub engine_hash: u64,
    pub parent_engine_hash: Option<u64>,
    /// kvmesh's sequence hash of the block (docs/architecture.md#block-hashes).
    pub seq_hash: SeqHash,
    pub ref_count: u32,
    pub token_ids: Vec<u32>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CacheError {
    #[error("{0} blocks are still referenced by running requests")]
    BlocksInUse(usize),
}

#[derive(Debug, Default)]
struct Block {
    ref_count: u32,
    registered: Option<CachedBlock>,
    /// Key in the free queue while unreferenced.
    free_tick: Option<u64>,
}

pub struct KvCache {
    blocks: Vec<Block>,
    /// Unreferenced blocks by release order; the first entry is evicted next.
    free_queue: BTreeMap<u64, BlockId>,
    next_tick: u64,
    by_hash: HashMap<u64, BlockId>,
    block_size: usize,
    engine_hasher: EngineHasher,
    kvmesh_hasher: BlockHasher,
    events: Vec<CacheEvent>,
}

impl KvCache {
    pub fn new(num_blocks: usize, engine_hasher: EngineHasher, kvmesh_hasher: BlockHasher) -> Self {
        let mut cache = Self {
            blocks: (0..num_blocks).map(|_| Block::default()).collect(),
            free_queue: BTreeMap::new(),
            next_tick: 0,
            by_hash: HashMap::new(),
            block_size: kvmesh_hasher.block_size().as_usize(),
            engine_hasher,
            kvmesh_hasher,
            events: Vec::new(),
        };
        for id in 0..num_blocks {
            cache.push_free(id);
        }
        cache
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks not held by any request (cached or empty).
    pub fn num_free(&self) -> usize {
        self.free_queue.len()
    }

    /// Fraction of blocks held by running requests, like `vllm:kv_cache_usage_perc`.
    pub fn usage(&self) -> f64 {
        if self.blocks.is_empty() {
            return 0.0;
        }
        1.0 - self.num_free() as f64 / self.blocks.len() as f64
    }

    pub fn engine_hasher(&self) -> &EngineHasher {
        &self.engine_hasher
    }

    /// The longest run of cached blocks matching `engine_hashes` from the
    /// start, as (block ids, their links).
    pub fn lookup_prefix(&self, engine_hashes: &[u64]) -> Vec<(BlockId, BlockLink)> {
        engine_hashes
            .iter()
            .map_while(|hash| {
                let id = *self.by_hash.get(hash)?;
                let cached = self.blocks[id].registered.as_ref()?;
                Some((
                    id,
                    BlockLink {
                        engine_hash: cached.engine_hash,
                        seq_hash: cached.seq_hash,
                    },
                ))
            })
            .collect()
    }

    /// Takes a reference on each block (cache hits), pulling unreferenced
    /// ones out of the free queue so they cannot be evicted.
    pub fn acquire(&mut self, ids: &[BlockId]) {
        for &id in ids {
            let block = &mut self.blocks[id];
            if let Some(tick) = block.free_tick.take() {
                self.free_queue.remove(&tick);
            }
            block.ref_count += 1;
        }
    }

    /// `count` fresh blocks, evicting the least recently released cached
    /// blocks; `None` (and no change) if fewer than `count` are free.
    pub fn allocate(&mut self, count: usize) -> Option<Vec<BlockId>> {
        if self.free_queue.len() < count {
            return None;
        }
        let mut ids = Vec::with_capacity(count);
        let mut evicted = Vec::new();
        for _ in 0..count {
            let (_, id) = self.free_queue.pop_first()?;
            let block = &mut self.blocks[id];
            block.free_tick = None;
            block.ref_count = 1;
            if let Some(cached) = block.registered.take() {
                self.by_hash.remove(&cached.engine_hash);
                evicted.push(cached.engine_hash);
            }
            ids.push(id);
        }
        // vLLM reports one BlockRemoved per evicted block.
        self.events
            .extend(evicted.into_iter().map(|hash| CacheEvent::Removed {
                block_hashes: vec![hash],
            }));
        Some(ids)
    }

    /// Drops one reference per block, in reverse order so a request's tail
    /// blocks are evicted before its prefix.
    pub fn release(&mut self, ids: &[BlockId]) {
        for &id in ids.iter().rev() {
            let block = &mut self.blocks[id];
            block.ref_count = block.ref_count.saturating_sub(1);
            if block.ref_count == 0 && block.free_tick.is_none() {
                self.push_free(id);
            }
        }
    }

    /// Registers the full block `id` holding `tokens` after `parent`, and
    /// returns its link for the next block. A block whose content is already
    /// cached elsewhere stays unregistered (see module docs).
    pub fn register_full_block(
        &mut self,
        id: BlockId,
        parent: Option<BlockLink>,
        tokens: &[u32],
    ) -> BlockLink {
        let engine_hash = self
            .engine_hasher
            .block_hash(parent.map(|p| p.engine_hash), tokens);
        let local = self.kvmesh_hasher.local_hash(tokens);
        let seq_hash = self.kvmesh_hasher.chain(parent.map(|p| p.seq_hash), local);
        let link = BlockLink {
            engine_hash,
            seq_hash,
        };
        if self.by_hash.contains_key(&engine_hash) || self.blocks[id].registered.is_some() {
            return link;
        }
        self.by_hash.insert(engine_hash, id);
        self.blocks[id].registered = Some(CachedBlock {
            block_id: id,
            engine_hash,
            parent_engine_hash: parent.map(|p| p.engine_hash),
            seq_hash,
            ref_count: 0,
            token_ids: tokens.to_vec(),
        });
        self.record_stored(engine_hash, parent.map(|p| p.engine_hash), tokens);
        link
    }

    /// Extends the previous `Stored` event when this block continues its
    /// chain, so one request's blocks of one iteration form one event.
    fn record_stored(&mut self, hash: u64, parent: Option<u64>, tokens: &[u32]) {
        if let Some(CacheEvent::Stored {
            block_hashes,
            token_ids,
            ..
        }) = self.events.last_mut()
        {
            if parent.is_some() && block_hashes.last().copied() == parent {
                block_hashes.push(hash);
                token_ids.extend_from_slice(tokens);
                return;
            }
        }
        self.events.push(CacheEvent::Stored {
            block_hashes: vec![hash],
            parent_block_hash: parent,
            token_ids: tokens.to_vec(),
        });
    }

    /// Stores the full blocks of `tokens` as cached, as a KV transfer writes
    /// them, and returns how many were new. Stops early when no block can be
    /// freed for them.
    pub fn import_prefix(&mut self, tokens: &[u32]) -> usize {
        let mut parent: Option<BlockLink> = None;
        let mut imported = 0;
        for block in tokens.chunks_exact(self.block_size) {
            let engine_hash = self
                .engine_hasher
                .block_hash(parent.map(|p| p.engine_hash), block);
            let cached = self
                .by_hash
                .get(&engine_hash)
                .and_then(|&id| self.blocks[id].registered.as_ref());
            if let Some(cached) = cached {
                parent = Some(BlockLink {
                    engine_hash,
                    seq_hash: cached.seq_hash,
                });
                continue;
            }
            let Some(ids) = self.allocate(1) else {
                break;
            };
            parent = Some(self.register_full_block(ids[0], parent, block));
            self.release(&ids);
            imported += 1;
        }
        imported
    }

    /// Drops every cached block (vLLM `reset_prefix_cache`); refused while
    /// requests hold blocks.
    pub fn clear(&mut self) -> Result<(), CacheError> {
        let in_use = self.blocks.iter().filter(|b| b.ref_count > 0).count();
        if in_use > 0 {
            return Err(CacheError::BlocksInUse(in_use));
        }
        for block in &mut self.blocks {
            block.registered = None;
        }
        self.by_hash.clear();
        self.events.push(CacheEvent::AllCleared);
        Ok(())
    }

    /// Changes since the last call.
    pub fn take_events(&mut self) -> Vec<CacheEvent> {
        std::mem::take(&mut self.events)
    }

    /// Every registered block, in block-id order.
    pub fn cached_blocks(&self) -> Vec<CachedBlock> {
        self.blocks
            .iter()
            .filter_map(|b| {
                b.registered.as_ref().map(|cached| CachedBlock {
                    ref_count: b.ref_count,
                    ..cached.clone()
                })
            })
            .collect()
    }

    /// Engine hashes of cached blocks in eviction order (next victim first).
    pub fn eviction_order(&self) -> Vec<u64> {
        self.free_queue
            .values()
            .filter_map(|&id| self.blocks[id].registered.as_ref().map(|c| c.engine_hash))
            .collect()
    }

    fn push_free(&mut self, id: BlockId) {
        let tick = self.next_tick;
        self.next_tick += 1;
        self.free_queue.insert(tick, id);
        self.blocks[id].free_tick = Some(tick);
    }
}

#[cfg(test)]
mod tests {
    use router_core::{BlockSize, HashSeed};

    use super::*;

    const BS: usize = 4;

    fn cache(blocks: usize) -> KvCache {
        KvCache::new(
            blocks,
            EngineHasher::new("0"),
            BlockHasher::new(
                BlockSize::new(BS as u32).unwrap(),
                HashSeed::for_model("m", None),
            ),
        )
    }

    /// Allocates and registers `tokens` (whole blocks) like a request would.
    fn store(cache: &mut KvCache, tokens: &[u32]) -> (Vec<BlockId>, Vec<BlockLink>) {
        let ids = cache.allocate(tokens.len() / BS).unwrap();
        let mut links: Vec<BlockLink> = Vec::new();
        for (id, chunk) in ids.iter().zip(tokens.chunks(BS)) {
            let link = cache.register_full_block(*id, links.last().copied(), chunk);
            links.push(link);
        }
        (ids, links)
    }

    #[test]
    fn registered_blocks_are_found_by_prefix_and_emit_one_stored_event() {
        let mut c = cache(8);
        let tokens: Vec<u32> = (0..12).collect();
        let (ids, links) = store(&mut c, &tokens);
        let events = c.take_events();
        assert_eq!(
            events,
            vec![CacheEvent::Stored {
                block_hashes: links.iter().map(|l| l.engine_hash).collect(),
                parent_block_hash: None,
                token_ids: tokens.clone(),
            }]
        );
        let hashes = c.engine_hasher().chain(&tokens, BS);
        assert_eq!(
            hashes,
            links.iter().map(|l| l.engine_hash).collect::<Vec<_>>()
        );
        let hit = c.lookup_prefix(&hashes);
        assert_eq!(hit.iter().map(|h| h.0).collect::<Vec<_>>(), ids);
        // kvmesh seq hashes agree with router-core's own chain.
        let hasher = BlockHasher::new(
            BlockSize::new(BS as u32).unwrap(),
            HashSeed::for_model("m", None),
        );
        assert_eq!(
            hasher.sequence_hashes(&tokens),
            links.iter().map(|l| l.seq_hash).collect::<Vec<_>>()
        );
    }

    #[test]
    fn refcounts_keep_shared_blocks_until_last_release() {
        let mut c = cache(4);
        let tokens: Vec<u32> = (0..8).collect();
        let (ids, _) = store(&mut c, &tokens);
        assert_eq!(c.num_free(), 2);
        c.acquire(&ids); // a second request hits the prefix
        c.release(&ids);
        assert_eq!(c.num_free(), 2, "still held by the second request");
        c.release(&ids);
        assert_eq!(c.num_free(), 4);
        assert_eq!(c.cached_blocks().len(), 2, "released blocks stay cached");
        // A hit on a free cached block pulls it out of the free queue.
        c.acquire(&ids[..1]);
        assert_eq!(c.num_free(), 3);
        assert!(c.allocate(4).is_none(), "only 3 free blocks");
    }

    #[test]
    fn eviction_is_lru_and_tail_first() {
        let mut c = cache(4);
        c.take_events();
        let a: Vec<u32> = (0..8).collect();
        let b: Vec<u32> = (100..108).collect();
        let (ids_a, links_a) = store(&mut c, &a);
        let (ids_b, links_b) = store(&mut c, &b);
        c.release(&ids_a); // released first: least recently used
        c.release(&ids_b);
        c.take_events();
        assert_eq!(
            c.eviction_order(),
            vec![
                links_a[1].engine_hash,
                links_a[0].engine_hash,
                links_b[1].engine_hash,
                links_b[0].engine_hash
            ]
        );
        let _ = c.allocate(3).unwrap();
        assert_eq!(
            c.take_events(),
            vec![
                CacheEvent::Removed {
                    block_hashes: vec![links_a[1].engine_hash]
                },
                CacheEvent::Removed {
                    block_hashes: vec![links_a[0].engine_hash]
                },
                CacheEvent::Removed {
                    block_hashes: vec![links_b[1].engine_hash]
                },
            ]
        );
        let survivors: Vec<u64> = c.cached_blocks().iter().map(|b| b.engine_hash).collect();
        assert_eq!(survivors, vec![links_b[0].engine_hash]);
    }

    #[test]
    fn a_hit_refreshes_recency() {
        let mut c = cache(4);
        let a: Vec<u32> = (0..4).collect();
        let b: Vec<u32> = (10..14).collect();
        let (ids_a, links_a) = store(&mut c, &a);
        let (ids_b, links_b) = store(&mut c, &b);
        c.release(&ids_a);
        c.release(&ids_b);
        c.acquire(&ids_a);
        c.release(&ids_a); // a used again: now b is older
        assert_eq!(
            c.eviction_order(),
            vec![links_b[0].engine_hash, links_a[0].engine_hash]
        );
    }

    #[test]
    fn duplicate_content_is_registered_once() {
        let mut c = cache(4);
        let tokens: Vec<u32> = (0..4).collect();
        store(&mut c, &tokens);
        store(&mut c, &tokens);
        assert_eq!(c.cached_blocks().len(), 1);
        assert_eq!(c.take_events().len(), 1);
    }

    #[test]
    fn clear_refuses_blocks_in_use_then_clears() {
        let mut c = cache(4);
        let (ids, _) = store(&mut c, &(0..4).collect::<Vec<u32>>());
        assert_eq!(c.clear(), Err(CacheError::BlocksInUse(1)));
        c.release(&ids);
        c.take_events();
        assert_eq!(c.clear(), Ok(()));
        assert!(c.cached_blocks().is_empty());
        assert_eq!(c.take_events(), vec![CacheEvent::AllCleared]);
    }
}
