//! Which workers hold each block, in tables that never stall their thread.
//!
//! A hash table grows by moving every entry into a table twice its size, all
//! at once: one table of a million blocks would hold a filter callback (and
//! the Envoy thread) for tens of milliseconds when it did. So blocks are
//! spread over [`SHARDS`] tables by their hash, and a growing shard moves
//! only its own ~1/1024th. Equal shards would still fill up together and
//! grow within a few callbacks of each other (a 1M-entry snapshot's chunks
//! 217–227 of 256 took 4–5× the median), so shards get unequal shares of
//! the hash space, from one to three times the smallest: at any fleet size
//! only a few of them are near their growth threshold.
//!
//! An entry keeps up to [`INLINE`] holders in place and owns no memory, so
//! dropping or replacing the table frees its allocations without visiting
//! every entry (a fresh snapshot replaces the whole index at once). Blocks
//! held by more workers keep their holders in a per-shard side table.

use std::collections::HashMap;

use super::{NoHash, WorkerSlot};
use crate::hashing::SeqHash;

/// Tables the blocks are spread over.
const SHARDS: usize = 1 << 10;
/// A shard is chosen by hash bits 40..57, which hashbrown uses for neither
/// the bucket (low bits) nor the control byte (bits 57..64 natively, 25..32
/// on 32-bit targets such as wasm32), so each shard still spreads its keys.
const SHARD_SHIFT: u32 = 40;
const SHARD_BITS: u32 = 17;
/// Holders kept in place; most blocks are held by few workers.
const INLINE: usize = 3;

#[derive(Debug, Clone, Copy)]
struct Inline {
    len: u32,
    /// The first `len` are holders; the rest mean nothing.
    slots: [WorkerSlot; INLINE],
}

impl Default for Inline {
    fn default() -> Self {
        Self {
            len: 0,
            slots: [WorkerSlot(0); INLINE],
        }
    }
}

impl Inline {
    fn as_slice(&self) -> &[WorkerSlot] {
        &self.slots[..(self.len as usize).min(INLINE)]
    }
}

#[derive(Debug, Clone, Default)]
struct Shard {
    /// Blocks with at most `INLINE` holders.
    inline: HashMap<SeqHash, Inline, NoHash>,
    /// Blocks with more, all their holders.
    spilled: HashMap<SeqHash, Vec<WorkerSlot>, NoHash>,
}

#[derive(Debug, Clone)]
pub(super) struct HolderTable {
    shards: Vec<Shard>,
    blocks: usize,
}

impl Default for HolderTable {
    fn default() -> Self {
        Self {
            shards: vec![Shard::default(); SHARDS],
            blocks: 0,
        }
    }
}

impl HolderTable {
    /// Distinct blocks held by anyone.
    pub(super) fn len(&self) -> usize {
        self.blocks
    }

    /// The workers holding `hash`; `None` when nobody does.
    pub(super) fn get(&self, hash: &SeqHash) -> Option<&[WorkerSlot]> {
        let shard = self.shard(hash)?;
        match shard.inline.get(hash) {
            Some(inline) => Some(inline.as_slice()),
            None => shard.spilled.get(hash).map(Vec::as_slice),
        }
    }

    /// Adds `worker` to the holders of `hash` (the caller knows it is not one).
    pub(super) fn add(&mut self, hash: SeqHash, worker: WorkerSlot) {
        let index = shard_of(&hash);
        let Some(shard) = self.shards.get_mut(index) else {
            return;
        };
        if let Some(holders) = shard.spilled.get_mut(&hash) {
            holders.push(worker);
            return;
        }
        let inline = shard.inline.entry(hash).or_default();
        if inline.len == 0 {
            self.blocks += 1;
        }
        if let Some(slot) = inline.slots.get_mut(inline.len as usize) {
            *slot = worker;
            inline.len += 1;
            return;
        }
        let mut holders = Vec::with_capacity(INLINE * 2);
        holders.extend_from_slice(inline.as_slice());
        holders.push(worker);
        shard.inline.remove(&hash);
        shard.spilled.insert(hash, holders);
    }

    /// Removes `worker` from the holders of `hash`, and the block once
    /// nobody holds it.
    pub(super) fn remove(&mut self, hash: SeqHash, worker: WorkerSlot) {
        let index = shard_of(&hash);
        let Some(shard) = self.shards.get_mut(index) else {
            return;
        };
        if let Some(holders) = shard.spilled.get_mut(&hash) {
            holders.retain(|w| *w != worker);
            if holders.len() <= INLINE {
                let mut inline = Inline::default();
                for (slot, holder) in inline.slots.iter_mut().zip(holders.iter()) {
                    *slot = *holder;
                    inline.len += 1;
                }
                shard.spilled.remove(&hash);
                shard.inline.insert(hash, inline);
            }
            return;
        }
        let Some(inline) = shard.inline.get_mut(&hash) else {
            return;
        };
        let len = (inline.len as usize).min(INLINE);
        if let Some(position) = inline.slots[..len].iter().position(|w| *w == worker) {
            inline.slots.copy_within(position + 1..len, position);
            inline.len -= 1;
        }
        if inline.len == 0 {
            shard.inline.remove(&hash);
            self.blocks -= 1;
        }
    }

    fn shard(&self, hash: &SeqHash) -> Option<&Shard> {
        self.shards.get(shard_of(hash))
    }
}

/// With `u` a hash's place in `[0, 1)`, its shard is `SHARDS · (u² + u) / 2`:
/// the slope, shards per unit of `u`, runs from 1/2 to 3/2, so shares of
/// the hash space run from 2× to ⅔× an equal one and the shards cross each
/// growth threshold at fleet sizes spread over more than a doubling instead
/// of all at once. One multiply and a shift (`u` in units of 2^-17): this
/// runs once per block looked up.
fn shard_of(hash: &SeqHash) -> usize {
    const ONE: u64 = 1 << SHARD_BITS;
    let u = (hash.0 >> SHARD_SHIFT) & (ONE - 1);
    // Below 2^35, so below SHARDS (2^10) after the shift.
    ((u * (u + ONE)) >> (2 * SHARD_BITS + 1 - SHARDS.trailing_zeros())) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holders(table: &HolderTable, hash: u64) -> Vec<u32> {
        let mut slots: Vec<u32> = table
            .get(&SeqHash(hash))
            .unwrap_or_default()
            .iter()
            .map(|w| w.0)
            .collect();
        slots.sort_unstable();
        slots
    }

    #[test]
    fn holders_spill_past_the_inline_ones_and_come_back() {
        let mut table = HolderTable::default();
        let hash = 7 << SHARD_SHIFT | 3;
        for worker in 0..5 {
            table.add(SeqHash(hash), WorkerSlot(worker));
        }
        assert_eq!(holders(&table, hash), [0, 1, 2, 3, 4]);
        assert_eq!(table.len(), 1);
        table.remove(SeqHash(hash), WorkerSlot(1));
        table.remove(SeqHash(hash), WorkerSlot(3));
        assert_eq!(holders(&table, hash), [0, 2, 4]);
        for worker in [0, 4, 2] {
            table.remove(SeqHash(hash), WorkerSlot(worker));
        }
        assert!(table.get(&SeqHash(hash)).is_none());
        assert_eq!(table.len(), 0);
        // Removing what is not there changes nothing.
        table.remove(SeqHash(hash), WorkerSlot(0));
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn blocks_spread_over_the_shards() {
        let mut table = HolderTable::default();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..SHARDS * 16 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            table.add(SeqHash(x), WorkerSlot(0));
        }
        let sizes: Vec<usize> = table.shards.iter().map(|s| s.inline.len()).collect();
        assert_eq!(sizes.iter().sum::<usize>(), table.len());
        assert!(sizes.iter().all(|&n| n > 0 && n < 64), "{sizes:?}");
    }

    /// Every place in the hash space maps to a shard, in order, and the
    /// shares run from 2× to ⅔× an equal one: equal shares would make every
    /// shard grow within the same few callbacks.
    #[test]
    fn shard_shares_fall_threefold_across_the_shards() {
        let mut shares = vec![0u64; SHARDS];
        let mut previous = 0;
        for u in 0..1u64 << SHARD_BITS {
            let shard = shard_of(&SeqHash(u << SHARD_SHIFT));
            assert!(shard >= previous && shard < SHARDS, "u {u}: shard {shard}");
            shares[shard] += 1;
            previous = shard;
        }
        let equal = (1u64 << SHARD_BITS) as f64 / SHARDS as f64;
        let relative = |shard: usize| shares[shard] as f64 / equal;
        assert!(shares.iter().all(|&n| n > 0));
        assert!((1.9..=2.1).contains(&relative(0)), "{}", relative(0));
        assert!(
            (0.6..=0.72).contains(&relative(SHARDS - 1)),
            "{}",
            relative(SHARDS - 1)
        );
    }
}
