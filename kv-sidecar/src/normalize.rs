//! Turns one worker's engine events into kvmesh block events (docs/architecture.md#block-hashes).
//!
//! Engines name blocks by hashes kvmesh cannot reproduce, so the normalizer
//! recomputes kvmesh seq hashes from token ids and keeps, per worker, the map
//! engine hash → seq hash that later removals and child blocks refer to.
//! Whatever it cannot hash exactly (unknown parent, foreign block size, LoRA
//! without a name) it leaves out and counts: a view that misses a block costs
//! a cache hit; a view with a wrongly hashed block misroutes.
//!
//! Two engine blocks can map to one seq hash (two media, two full-attention
//! KV cache groups, LoRA ids); a reference count per seq hash makes the
//! published set exact: `Removed` only when the last goes.
//!
//! Block identity beyond token ids, so that no two prompts the engine keeps
//! apart share a kvmesh hash:
//! - cache salt: a chain's first block (no parent) with a `cache_salt` chains
//!   onto [`BlockHasher::salt_root`] instead of nothing, as the filter does
//!   for a request carrying that salt;
//! - other content keys (vLLM `extra_keys`: multimodal identifiers, prompt
//!   embedding digests): folded into that block's local hash under a domain
//!   tag, so such blocks and their descendants never equal a text-only
//!   prompt's hashes (the filter sees no images and never asks for them).
//!
//! Hybrid models (vLLM `group_idx`): engine blocks are keyed by (hash,
//! medium, group). Only groups that hold whole prefixes count: a block is
//! routable while a full-attention (or unspecified) group holds it. Groups
//! whose published `kv_cache_spec_kind` says they keep only part of a prefix
//! (sliding window, chunked local, Mamba) are left out, and their evictions
//! never remove a block a full-attention group still holds.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::RangeInclusive;

use router_core::{BlockHasher, BlockSize, HashSeed, LocalBlockHash, SeqHash};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::decode::{
    BlockMoved, BlockRemoved, BlockStored, EngineEvent, EngineHash, GroupKind, Medium,
};

/// A normalized event, ready to be sequenced and published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NormEvent {
    /// `hashes` chain on from `parent`; some may already have been present.
    Stored {
        parent: Option<u64>,
        hashes: Vec<u64>,
    },
    /// Seq hashes no longer held by any engine block.
    Removed {
        hashes: Vec<u64>,
    },
    Cleared,
}

/// What happened while normalizing, for metrics and logs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NormStats {
    pub blocks_stored: u64,
    pub blocks_removed: u64,
    pub clears: u64,
    /// Stored events whose parent the relay never saw: events were lost.
    pub unknown_parent: u64,
    /// Removals of engine hashes the relay never saw stored.
    pub unknown_removed: u64,
    /// Blocks of a block size other than the configured one.
    pub block_size_mismatch: u64,
    /// Stored events whose token count is not blocks × block size.
    pub token_count_mismatch: u64,
    /// Blocks under a LoRA adapter the event names only by id.
    pub lora_without_name: u64,
    /// Blocks on a medium the relay does not index (CPU, disk, …).
    pub ignored_medium: u64,
    /// Blocks of a KV cache group that keeps only part of a prefix.
    pub partial_attention_group: u64,
}

impl NormStats {
    /// True when the view lost exactness because events went missing.
    pub fn lost_events(&self) -> bool {
        self.unknown_parent > 0
    }
}

/// Which media count as cached: GPU always, others only if configured
/// (blocks offloaded to CPU still save prefill, but cost a reload).
#[derive(Debug, Clone, Default)]
pub struct MediaPolicy {
    extra: Vec<String>,
}

impl MediaPolicy {
    pub fn with_extra(extra: Vec<String>) -> Self {
        Self { extra }
    }

    /// Slot 0 is the GPU; a block on two media is two engine blocks.
    /// An unstated medium is the GPU's slot here; removals look wherever the
    /// block is (`slots`).
    fn slot(&self, medium: &Medium) -> Option<u8> {
        match medium {
            Medium::Gpu | Medium::Unstated => Some(0),
            Medium::Other(name) => self
                .extra
                .iter()
                .position(|m| m.eq_ignore_ascii_case(name))
                .and_then(|i| u8::try_from(i + 1).ok()),
        }
    }

    /// The slots a block on `medium` may be in (`None` when not indexed):
    /// every indexed one when the engine does not say.
    fn slots(&self, medium: &Medium) -> Option<RangeInclusive<u8>> {
        match medium {
            Medium::Unstated => Some(0..=u8::try_from(self.extra.len()).unwrap_or(u8::MAX)),
            _ => self.slot(medium).map(|slot| slot..=slot),
        }
    }
}

/// Where an engine block lives: medium slot and KV cache group, packed so a
/// key hashes as two words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Place(u64);

impl Place {
    fn new(slot: u8, group: u32) -> Self {
        Self((u64::from(slot) << 32) | u64::from(group))
    }
}

type Key = (EngineHash, Place);

/// Domain tag of content-key folding: a folded local hash never equals a
/// plain one by construction of its input.
const CONTENT_DOMAIN: &[u8] = b"kvmesh.content_keys\0";

fn fold_content(seed: HashSeed, local: LocalBlockHash, digest: u64) -> LocalBlockHash {
    let mut bytes = [0u8; CONTENT_DOMAIN.len() + 16];
    bytes[..CONTENT_DOMAIN.len()].copy_from_slice(CONTENT_DOMAIN);
    bytes[CONTENT_DOMAIN.len()..CONTENT_DOMAIN.len() + 8].copy_from_slice(&local.0.to_le_bytes());
    bytes[CONTENT_DOMAIN.len() + 8..].copy_from_slice(&digest.to_le_bytes());
    LocalBlockHash(xxh3_64_with_seed(&bytes, seed.get()))
}

/// Keys are hashes already; a multiply-xor mix is enough and several times
/// cheaper than SipHash on the relay's hot path.
#[derive(Default)]
pub struct MixHasher(u64);

impl Hasher for MixHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u8(&mut self, v: u8) {
        self.write_u64(u64::from(v));
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type Fast = BuildHasherDefault<MixHasher>;

/// Blocks the normalizer left out are remembered so that their children and
/// removals are recognised rather than counted again; past this many the set
/// is dropped (its only cost is recounting).
const MAX_UNRESOLVED: usize = 1 << 20;

pub struct Normalizer {
    model: String,
    block_size: BlockSize,
    base: BlockHasher,
    lora_hashers: HashMap<String, BlockHasher>,
    media: MediaPolicy,
    engine_to_seq: HashMap<Key, SeqHash, Fast>,
    refcount: HashMap<SeqHash, u32, Fast>,
    unresolved: HashSet<Key, Fast>,
    /// KV cache groups published as keeping only part of a prefix.
    partial_groups: HashSet<u32, Fast>,
    /// Blocks that moved to an unindexed tier, so a move back finds them.
    parked: HashMap<EngineHash, SeqHash, Fast>,
}

impl Normalizer {
    pub fn new(model: &str, block_size: BlockSize, media: MediaPolicy) -> Self {
        Self {
            model: model.to_owned(),
            block_size,
            base: BlockHasher::new(block_size, HashSeed::for_model(model, None)),
            lora_hashers: HashMap::new(),
            media,
            engine_to_seq: HashMap::default(),
            refcount: HashMap::default(),
            unresolved: HashSet::default(),
            partial_groups: HashSet::default(),
            parked: HashMap::default(),
        }
    }

    /// Forgets everything (engine restart, unrecoverable gap).
    pub fn reset(&mut self) {
        self.engine_to_seq.clear();
        self.refcount.clear();
        self.unresolved.clear();
        self.partial_groups.clear();
        self.parked.clear();
    }

    /// Seq hashes the worker holds, for full-state snapshots.
    pub fn blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.refcount.keys().map(|h| h.0)
    }

    pub fn block_count(&self) -> usize {
        self.refcount.len()
    }

    pub fn apply(&mut self, event: &EngineEvent, out: &mut Vec<NormEvent>, stats: &mut NormStats) {
        match event {
            EngineEvent::Stored(stored) => self.stored(stored, out, stats),
            EngineEvent::Removed(removed) => self.removed(removed, out, stats),
            EngineEvent::Moved(moved) => self.moved(moved, out, stats),
            EngineEvent::AllCleared => {
                self.reset();
                stats.clears += 1;
                out.push(NormEvent::Cleared);
            }
        }
    }

    fn hasher(&mut self, lora: Option<&str>) -> BlockHasher {
        match lora {
            None => self.base,
            Some(name) => {
                if let Some(h) = self.lora_hashers.get(name) {
                    return *h;
                }
                let h = BlockHasher::new(
                    self.block_size,
                    HashSeed::for_model(&self.model, Some(name)),
                );
                self.lora_hashers.insert(name.to_owned(), h);
                h
            }
        }
    }

    fn leave_out(&mut self, place: Place, hashes: &[EngineHash]) {
        if self.unresolved.len() + hashes.len() > MAX_UNRESOLVED {
            self.unresolved.clear();
        }
        self.unresolved.extend(hashes.iter().map(|h| (*h, place)));
    }

    fn stored(&mut self, event: &BlockStored, out: &mut Vec<NormEvent>, stats: &mut NormStats) {
        let blocks = event.block_hashes.len() as u64;
        let Some(medium) = self.media.slot(&event.medium) else {
            stats.ignored_medium += blocks;
            return;
        };
        if event.group_kind == GroupKind::Partial {
            self.partial_groups.insert(event.group);
            stats.partial_attention_group += blocks;
            return;
        }
        let place = Place::new(medium, event.group);
        if event.lora_id.is_some() && event.lora_name.is_none() {
            stats.lora_without_name += blocks;
            self.leave_out(place, &event.block_hashes);
            return;
        }
        if event.block_size != self.block_size.get() {
            stats.block_size_mismatch += blocks;
            self.leave_out(place, &event.block_hashes);
            return;
        }
        let expected_tokens = event
            .block_hashes
            .len()
            .checked_mul(self.block_size.as_usize());
        if expected_tokens != Some(event.token_ids.len()) {
            stats.token_count_mismatch += 1;
            self.leave_out(place, &event.block_hashes);
            return;
        }
        let parent = match event.parent {
            None => None,
            Some(engine_parent) => match self.engine_to_seq.get(&(engine_parent, place)) {
                Some(seq) => Some(*seq),
                None => {
                    // A parent left out earlier was already counted.
                    if !self.unresolved.contains(&(engine_parent, place)) {
                        stats.unknown_parent += 1;
                    }
                    self.leave_out(place, &event.block_hashes);
                    return;
                }
            },
        };
        let hasher = self.hasher(event.lora_name.as_deref());
        let mut hashes = Vec::with_capacity(event.block_hashes.len());
        // Engines ignore an empty salt (vLLM: `if request.cache_salt`).
        let mut previous = match (parent, event.cache_salt.as_deref()) {
            (None, Some(salt)) if !salt.is_empty() => Some(hasher.salt_root(salt)),
            _ => parent,
        };
        for (i, (engine_hash, tokens)) in event
            .block_hashes
            .iter()
            .zip(event.token_ids.chunks_exact(self.block_size.as_usize()))
            .enumerate()
        {
            let mut local = hasher.local_hash(tokens);
            if let Some(Some(digest)) = event.content_keys.get(i) {
                local = fold_content(hasher.seed(), local, *digest);
            }
            let seq = hasher.chain(previous, local);
            previous = Some(seq);
            hashes.push(seq.0);
            let key = (*engine_hash, place);
            self.unresolved.remove(&key);
            match self.engine_to_seq.insert(key, seq) {
                // Re-stored without a removal in between: nothing changes.
                Some(old) if old == seq => continue,
                Some(old) => {
                    if let Some(gone) = self.release(old) {
                        out.push(NormEvent::Removed { hashes: vec![gone] });
                    }
                }
                None => {}
            }
            self.retain(seq);
        }
        stats.blocks_stored += blocks;
        out.push(NormEvent::Stored {
            parent: parent.map(|p| p.0),
            hashes,
        });
    }

    /// Drops one reference; returns the hash if no engine block holds it now.
    fn release(&mut self, seq: SeqHash) -> Option<u64> {
        let count = self.refcount.get_mut(&seq)?;
        *count = count.saturating_sub(1);
        if *count == 0 {
            self.refcount.remove(&seq);
            Some(seq.0)
        } else {
            None
        }
    }

    fn retain(&mut self, seq: SeqHash) {
        *self.refcount.entry(seq).or_insert(0) += 1;
    }

    /// A block moved between tiers: it leaves the view if it left the last
    /// indexed medium holding it, and (re)enters it on an indexed one.
    fn moved(&mut self, event: &BlockMoved, out: &mut Vec<NormEvent>, stats: &mut NormStats) {
        let from = self.media.slot(&event.from).map(|s| Place::new(s, 0));
        let to = self.media.slot(&event.to).map(|s| Place::new(s, 0));
        let seq = match from {
            Some(from) => self.engine_to_seq.remove(&(event.block_hash, from)),
            None => self.parked.remove(&event.block_hash),
        };
        let Some(seq) = seq else {
            // Never seen stored: nothing to carry.
            stats.unknown_removed += 1;
            return;
        };
        match to {
            Some(to) => {
                self.engine_to_seq.insert((event.block_hash, to), seq);
                self.retain(seq);
            }
            None => {
                if self.parked.len() >= MAX_UNRESOLVED {
                    self.parked.clear();
                }
                self.parked.insert(event.block_hash, seq);
            }
        }
        if from.is_some() {
            if let Some(gone) = self.release(seq) {
                stats.blocks_removed += 1;
                out.push(NormEvent::Removed { hashes: vec![gone] });
            }
        } else if to.is_some() {
            stats.blocks_stored += 1;
            out.push(NormEvent::Stored {
                parent: None,
                hashes: vec![seq.0],
            });
        }
    }

    fn removed(&mut self, event: &BlockRemoved, out: &mut Vec<NormEvent>, stats: &mut NormStats) {
        let Some(slots) = self.media.slots(&event.medium) else {
            stats.ignored_medium += event.block_hashes.len() as u64;
            return;
        };
        if self.partial_groups.contains(&event.group) {
            stats.partial_attention_group += event.block_hashes.len() as u64;
            return;
        }
        let mut gone = Vec::new();
        for engine_hash in &event.block_hashes {
            let keys = slots
                .clone()
                .map(|slot| (*engine_hash, Place::new(slot, event.group)));
            match keys.clone().find_map(|key| self.engine_to_seq.remove(&key)) {
                Some(seq) => {
                    stats.blocks_removed += 1;
                    gone.extend(self.release(seq));
                }
                None => {
                    let known = keys.fold(false, |known, key| self.unresolved.remove(&key) | known)
                        || self.parked.remove(engine_hash).is_some();
                    if !known {
                        stats.unknown_removed += 1;
                    }
                }
            }
        }
        if !gone.is_empty() {
            out.push(NormEvent::Removed { hashes: gone });
        }
    }
}
