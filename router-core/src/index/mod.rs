//! The prefix index: which workers hold which KV blocks, keyed by kvmesh
//! sequence hashes, and the per-worker prefix overlap of a prompt.
//!
//! A sequence hash identifies a block *and its whole prefix*, so a worker's
//! cached prefix for a prompt is the longest run of the prompt's hashes, from
//! the first, that the worker holds — exactly what an engine's prefix cache can
//! reuse. Hashes are uniformly distributed already, so the maps use them as
//! their own hash (no rehashing on the hot path).

mod holders;

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasherDefault;

use nohash_hasher::NoHashHasher;

use crate::hashing::SeqHash;
use holders::HolderTable;

impl nohash_hasher::IsEnabled for SeqHash {}

/// Sequence hashes are already uniform: hash maps keyed by them use them as is.
pub(crate) type NoHash = BuildHasherDefault<NoHashHasher<SeqHash>>;

/// Dense worker number assigned by a registry; small so holder lists stay inline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerSlot(pub u32);

/// Cached-prefix length of one worker for one prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overlap {
    pub worker: WorkerSlot,
    /// Number of leading prompt blocks the worker holds.
    pub blocks: u32,
}

/// Outcome of a store that may hit the index's size limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreOutcome {
    pub added: usize,
    /// Blocks not recorded because the index is full.
    pub rejected: usize,
}

#[derive(Debug, Clone)]
pub struct PrefixIndex {
    holders: HolderTable,
    by_worker: HashMap<WorkerSlot, HashSet<SeqHash, NoHash>>,
    /// Upper bound on (block, worker) entries, to bound memory.
    max_entries: usize,
    entries: usize,
}

impl PrefixIndex {
    pub fn new(max_entries: usize) -> Self {
        Self {
            holders: HolderTable::default(),
            by_worker: HashMap::new(),
            max_entries,
            entries: 0,
        }
    }

    /// Number of (block, worker) entries.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Number of distinct blocks.
    pub fn blocks(&self) -> usize {
        self.holders.len()
    }

    pub fn blocks_of(&self, worker: WorkerSlot) -> usize {
        self.by_worker.get(&worker).map_or(0, HashSet::len)
    }

    pub fn holds(&self, worker: WorkerSlot, hash: SeqHash) -> bool {
        self.by_worker
            .get(&worker)
            .is_some_and(|set| set.contains(&hash))
    }

    /// Every block `worker` holds, in no particular order.
    pub fn worker_blocks(&self, worker: WorkerSlot) -> impl Iterator<Item = SeqHash> + '_ {
        self.by_worker.get(&worker).into_iter().flatten().copied()
    }

    /// Workers with at least one block.
    pub fn workers(&self) -> impl Iterator<Item = WorkerSlot> + '_ {
        self.by_worker.keys().copied()
    }

    /// Records that `worker` holds `hashes`; already-known blocks are ignored.
    pub fn store(&mut self, worker: WorkerSlot, hashes: &[SeqHash]) -> StoreOutcome {
        let mut outcome = StoreOutcome::default();
        let set = self.by_worker.entry(worker).or_default();
        for &hash in hashes {
            if set.contains(&hash) {
                continue;
            }
            if self.entries >= self.max_entries {
                outcome.rejected += 1;
                continue;
            }
            set.insert(hash);
            self.holders.add(hash, worker);
            self.entries += 1;
            outcome.added += 1;
        }
        if set.is_empty() {
            self.by_worker.remove(&worker);
        }
        outcome
    }

    /// Forgets that `worker` holds `hashes`; unknown blocks are ignored.
    pub fn remove(&mut self, worker: WorkerSlot, hashes: &[SeqHash]) -> usize {
        let Some(set) = self.by_worker.get_mut(&worker) else {
            return 0;
        };
        let mut removed = 0;
        for hash in hashes {
            if set.remove(hash) {
                self.holders.remove(*hash, worker);
                removed += 1;
            }
        }
        if set.is_empty() {
            self.by_worker.remove(&worker);
        }
        self.entries -= removed;
        removed
    }

    /// Forgets every block of `worker` (cache cleared, reset, or worker gone).
    pub fn clear_worker(&mut self, worker: WorkerSlot) -> usize {
        let Some(set) = self.by_worker.remove(&worker) else {
            return 0;
        };
        for hash in &set {
            self.holders.remove(*hash, worker);
        }
        self.entries -= set.len();
        set.len()
    }

    /// Cached-prefix length per worker for a prompt's sequence hashes. Workers
    /// holding none of the first block are absent. The scratch space is reused
    /// across calls so the hot path does not allocate.
    ///
    /// Cost is the sum of the holder counts along the matched prefix: each
    /// depth only visits the workers that hold that block.
    pub fn overlaps_into<'s>(
        &self,
        prompt: &[SeqHash],
        scratch: &'s mut OverlapScratch,
    ) -> &'s [Overlap] {
        scratch.reset();
        let Some(first) = prompt.first().and_then(|h| self.holders.get(h)) else {
            return &scratch.overlaps;
        };
        for &worker in first {
            scratch.insert(worker);
        }
        for (depth, hash) in prompt.iter().enumerate().skip(1) {
            let Some(holders) = self.holders.get(hash) else {
                break;
            };
            let depth = depth as u32;
            let mut advanced = 0;
            for &worker in holders {
                if let Some(overlap) = scratch.get_mut(worker).filter(|o| o.blocks == depth) {
                    overlap.blocks += 1;
                    advanced += 1;
                }
            }
            if advanced == 0 {
                break;
            }
        }
        &scratch.overlaps
    }

    pub fn overlaps(&self, prompt: &[SeqHash]) -> Vec<Overlap> {
        let mut scratch = OverlapScratch::default();
        self.overlaps_into(prompt, &mut scratch).to_vec()
    }
}

/// Reusable working memory for [`PrefixIndex::overlaps_into`]: the result and a
/// dense slot → result-position table (slots are small, dense numbers).
#[derive(Debug, Clone, Default)]
pub struct OverlapScratch {
    overlaps: Vec<Overlap>,
    /// `position[slot] = index in overlaps + 1`, 0 when absent.
    position: Vec<u32>,
}

impl OverlapScratch {
    fn reset(&mut self) {
        for overlap in &self.overlaps {
            if let Some(p) = self.position.get_mut(overlap.worker.0 as usize) {
                *p = 0;
            }
        }
        self.overlaps.clear();
    }

    fn insert(&mut self, worker: WorkerSlot) {
        let slot = worker.0 as usize;
        if self.position.len() <= slot {
            self.position.resize(slot + 1, 0);
        }
        self.overlaps.push(Overlap { worker, blocks: 1 });
        self.position[slot] = self.overlaps.len() as u32;
    }

    fn get_mut(&mut self, worker: WorkerSlot) -> Option<&mut Overlap> {
        let position = *self.position.get(worker.0 as usize)?;
        self.overlaps.get_mut(position.checked_sub(1)? as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn h(values: &[u64]) -> Vec<SeqHash> {
        values.iter().copied().map(SeqHash).collect()
    }

    fn overlap_of(index: &PrefixIndex, prompt: &[SeqHash], worker: u32) -> u32 {
        index
            .overlaps(prompt)
            .iter()
            .find(|o| o.worker == WorkerSlot(worker))
            .map_or(0, |o| o.blocks)
    }

    #[test]
    fn overlap_is_the_longest_held_prefix() {
        let mut index = PrefixIndex::new(1000);
        index.store(WorkerSlot(0), &h(&[1, 2, 3]));
        index.store(WorkerSlot(1), &h(&[1, 2]));
        index.store(WorkerSlot(2), &h(&[2, 3])); // holds later blocks only
        let prompt = h(&[1, 2, 3, 4]);
        assert_eq!(overlap_of(&index, &prompt, 0), 3);
        assert_eq!(overlap_of(&index, &prompt, 1), 2);
        assert_eq!(overlap_of(&index, &prompt, 2), 0);
        assert!(index.overlaps(&h(&[9])).is_empty());
        assert!(index.overlaps(&[]).is_empty());
    }

    #[test]
    fn a_hole_ends_the_prefix() {
        let mut index = PrefixIndex::new(1000);
        index.store(WorkerSlot(0), &h(&[1, 3, 4]));
        assert_eq!(overlap_of(&index, &h(&[1, 2, 3, 4]), 0), 1);
    }

    #[test]
    fn remove_clear_and_counts() {
        let mut index = PrefixIndex::new(1000);
        index.store(WorkerSlot(0), &h(&[1, 2, 3]));
        index.store(WorkerSlot(1), &h(&[1, 2]));
        assert_eq!(index.entries(), 5);
        assert_eq!(index.blocks(), 3);
        assert_eq!(index.remove(WorkerSlot(0), &h(&[2, 7])), 1);
        assert_eq!(overlap_of(&index, &h(&[1, 2, 3]), 0), 1);
        assert_eq!(index.clear_worker(WorkerSlot(1)), 2);
        assert_eq!(index.entries(), 2);
        assert_eq!(index.blocks(), 2);
        assert!(!index.holds(WorkerSlot(1), SeqHash(1)));
        assert_eq!(index.workers().collect::<Vec<_>>(), vec![WorkerSlot(0)]);
    }

    #[test]
    fn duplicate_stores_are_idempotent_and_limit_is_enforced() {
        let mut index = PrefixIndex::new(3);
        assert_eq!(index.store(WorkerSlot(0), &h(&[1, 2])).added, 2);
        assert_eq!(index.store(WorkerSlot(0), &h(&[1, 2])).added, 0);
        let outcome = index.store(WorkerSlot(1), &h(&[1, 2, 3]));
        assert_eq!(
            outcome,
            StoreOutcome {
                added: 1,
                rejected: 2
            }
        );
        assert_eq!(index.entries(), 3);
    }

    proptest! {
        /// The index agrees with a naive model after any sequence of operations.
        #[test]
        fn matches_a_naive_model(ops in proptest::collection::vec((0u8..3, 0u32..4, proptest::collection::vec(0u64..12, 0..6)), 0..60),
                                 prompt in proptest::collection::vec(0u64..12, 0..8)) {
            let mut index = PrefixIndex::new(usize::MAX);
            let mut model: HashMap<u32, HashSet<u64>> = HashMap::new();
            for (op, worker, hashes) in ops {
                match op {
                    0 => { index.store(WorkerSlot(worker), &h(&hashes)); model.entry(worker).or_default().extend(&hashes); }
                    1 => { index.remove(WorkerSlot(worker), &h(&hashes)); if let Some(s) = model.get_mut(&worker) { for x in &hashes { s.remove(x); } } }
                    _ => { index.clear_worker(WorkerSlot(worker)); model.remove(&worker); }
                }
            }
            let entries: usize = model.values().map(HashSet::len).sum();
            prop_assert_eq!(index.entries(), entries);
            let prompt = h(&prompt);
            for worker in 0..4u32 {
                let held = model.get(&worker).cloned().unwrap_or_default();
                let expected = prompt.iter().take_while(|x| held.contains(&x.0)).count() as u32;
                prop_assert_eq!(overlap_of(&index, &prompt, worker), expected);
            }
        }
    }
}
