//! Prompts this router just sent to be computed, credited as cached on the
//! worker computing them until its KV events can say so.
//!
//! A worker publishes a prompt's blocks only as it computes them, seconds
//! after the request arrived when it queues behind long prompts. Without
//! this, a second request with the same long prefix arriving meanwhile sees
//! it cached nowhere and is sent to compute it again on another worker;
//! sent to the first, it waits for the prefill in progress and reuses it.
//! The credit lasts a fixed time: once the blocks are computed the fleet
//! state shows them (the decision takes the larger of the two), and an
//! engine rarely evicts what it computed seconds ago.
//!
//! Sequence hashes name a block and everything before it, so a worker
//! computing a prompt's block `k` computes its blocks `0..k` too. Only every
//! [`STRIDE`]th block is remembered (recording an 8k-token prompt is 32
//! inserts, not 512), so the credit comes in whole strides, and how far it
//! reaches is a binary search over them: in the usual case one lookup, of
//! the first stride past what the fleet state shows.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::index::NoHash;
use crate::SeqHash;

/// How long a routed prompt counts as being computed.
pub const COMPUTING_TTL_MS: u64 = 5_000;
/// Blocks per credited step: 256 tokens at 16-token blocks.
pub const STRIDE: usize = 16;
/// Remembered stride blocks at most; the oldest prompts go first beyond it.
const MAX_ENTRIES: usize = 1 << 14;

/// One routed prompt: who computes it, until when it counts.
struct Sent {
    worker: Arc<str>,
    until_ms: u64,
    /// Its every [`STRIDE`]th block hash.
    strides: Box<[SeqHash]>,
}

/// Every [`STRIDE`]th block of prompts being computed, with the worker
/// computing it (the latest, when two are).
#[derive(Default)]
pub struct Computing {
    holders: HashMap<SeqHash, (Arc<str>, u64), NoHash>,
    /// Prompts in the order they were sent, to expire them.
    sent: VecDeque<Sent>,
    entries: usize,
}

impl Computing {
    /// `worker` (an address) was sent `prompt` to compute at `now_ms`.
    pub fn record(&mut self, worker: &str, prompt: &[SeqHash], now_ms: u64) {
        self.expire(now_ms);
        let strides: Box<[SeqHash]> = prompt
            .iter()
            .skip(STRIDE - 1)
            .step_by(STRIDE)
            .copied()
            .collect();
        if strides.is_empty() {
            return;
        }
        let worker: Arc<str> = Arc::from(worker);
        let until_ms = now_ms.saturating_add(COMPUTING_TTL_MS);
        for block in strides.iter() {
            self.holders.insert(*block, (Arc::clone(&worker), until_ms));
        }
        self.entries += strides.len();
        self.sent.push_back(Sent {
            worker,
            until_ms,
            strides,
        });
        while self.entries > MAX_ENTRIES {
            let Some(oldest) = self.sent.front().map(|s| s.until_ms) else {
                break;
            };
            self.expire(oldest);
        }
    }

    /// How many leading blocks of `prompt` `worker` holds or is computing,
    /// given that the fleet state shows it holding `indexed` of them.
    pub fn cached_on(&self, worker: &str, prompt: &[SeqHash], indexed: u32, now_ms: u64) -> u32 {
        // Whether `worker` computes the first `strides` strides of `prompt`.
        let computes = |strides: usize| {
            strides
                .checked_mul(STRIDE)
                .and_then(|blocks| blocks.checked_sub(1))
                .and_then(|last| prompt.get(last))
                .and_then(|block| self.holders.get(block))
                .is_some_and(|(held_by, until)| &**held_by == worker && *until > now_ms)
        };
        let indexed_blocks = usize::try_from(indexed).unwrap_or(usize::MAX);
        let first = indexed_blocks / STRIDE + 1;
        if !computes(first) {
            return indexed;
        }
        // Past here whole strides fit in the prompt: no product overflows.
        // computes(low) holds; computes(high + 1) does not.
        let (mut low, mut high) = (first, prompt.len() / STRIDE);
        while low < high {
            let middle = low + (high - low).div_ceil(2);
            if computes(middle) {
                low = middle;
            } else {
                high = middle - 1;
            }
        }
        u32::try_from(low * STRIDE).unwrap_or(u32::MAX)
    }

    /// Forgets prompts whose credit ended by `now_ms`.
    fn expire(&mut self, now_ms: u64) {
        while self.sent.front().is_some_and(|s| s.until_ms <= now_ms) {
            let Some(sent) = self.sent.pop_front() else {
                break;
            };
            self.entries -= sent.strides.len();
            for block in sent.strides.iter() {
                // Unless a later prompt renewed it, or another worker took it.
                let ours = self.holders.get(block).is_some_and(|(held_by, until)| {
                    *held_by == sent.worker && *until <= sent.until_ms
                });
                if ours {
                    self.holders.remove(block);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(range: std::ops::Range<u64>) -> Vec<SeqHash> {
        range.map(SeqHash).collect()
    }

    fn sharing(shared: u64, tail: u64) -> Vec<SeqHash> {
        blocks(0..shared)
            .into_iter()
            .chain(blocks(1_000..1_000 + tail))
            .collect()
    }

    #[test]
    fn a_prompt_in_progress_counts_as_cached_on_its_worker_only() {
        let mut computing = Computing::default();
        computing.record("a", &blocks(0..70), 0);
        let prompt = sharing(50, 10);
        // Whole strides: 48 of the 50 shared blocks.
        assert_eq!(computing.cached_on("a", &prompt, 0, 10), 48);
        assert_eq!(computing.cached_on("b", &prompt, 0, 10), 0);
        // The fleet state already shows more: it wins.
        assert_eq!(computing.cached_on("a", &prompt, 49, 10), 49);
        // Every length of shared prefix, whatever the state shows below it.
        for shared in 0..=70u64 {
            let prompt = sharing(shared, 20);
            let credited = shared / STRIDE as u64 * STRIDE as u64;
            for indexed in 0..=shared {
                assert_eq!(
                    computing.cached_on("a", &prompt, indexed as u32, 10),
                    credited.max(indexed) as u32,
                    "{shared} shared, {indexed} indexed"
                );
            }
        }
        // Whatever the state claims, no overflow.
        assert_eq!(computing.cached_on("a", &prompt, u32::MAX, 10), u32::MAX);
        // Too short to be remembered.
        computing.record("c", &blocks(500..515), 0);
        assert_eq!(computing.cached_on("c", &blocks(500..515), 0, 10), 0);
    }

    #[test]
    fn the_credit_ends_with_its_time_to_live_unless_renewed() {
        let mut computing = Computing::default();
        computing.record("a", &blocks(0..64), 0);
        computing.record("a", &blocks(0..32), 3_000);
        let prompt = blocks(0..64);
        assert_eq!(
            computing.cached_on("a", &prompt, 0, COMPUTING_TTL_MS - 1),
            64
        );
        // The first prompt expired; the second renewed its first 32 blocks.
        computing.record("b", &blocks(500..516), COMPUTING_TTL_MS);
        assert_eq!(computing.cached_on("a", &prompt, 0, COMPUTING_TTL_MS), 32);
        computing.record("b", &blocks(500..516), 3_000 + COMPUTING_TTL_MS);
        assert_eq!(
            computing.cached_on("a", &prompt, 0, 3_000 + COMPUTING_TTL_MS),
            0
        );
        assert_eq!(computing.holders.len(), 1);
        // A prompt another worker took over stays with it when the first
        // worker's credit ends.
        computing.record("a", &blocks(0..16), 10_000);
        computing.record("b", &blocks(0..16), 12_000);
        computing.record("x", &blocks(600..616), 10_000 + COMPUTING_TTL_MS);
        assert_eq!(computing.cached_on("b", &blocks(0..16), 0, 15_000), 16);
    }

    #[test]
    fn memory_is_bounded_by_forgetting_the_oldest() {
        let mut computing = Computing::default();
        let size = (MAX_ENTRIES * STRIDE / 4) as u64;
        for prompt in 0..8u64 {
            computing.record("a", &blocks(prompt * size..(prompt + 1) * size), prompt);
        }
        assert!(computing.entries <= MAX_ENTRIES);
        assert!(computing.holders.len() <= MAX_ENTRIES);
        assert_eq!(computing.cached_on("a", &blocks(0..size), 0, 10), 0);
        let newest = blocks(7 * size..8 * size);
        assert_eq!(computing.cached_on("a", &newest, 0, 10), size as u32);
    }
}
