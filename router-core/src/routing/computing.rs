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
//! inserts, not 512; a hit records only the strides past what the worker
//! held), so the credit comes in whole strides, and how far it reaches is a
//! binary search over them: in the usual case one lookup per decision, of
//! the first stride past what the fleet state shows, which most candidates
//! share.
//!
//! Each router (filter VM) records its own decisions at once, and reports
//! the strides it recorded to its sidecar, which shares them with every other
//! router on the fleet's NATS and streams them back as `PromptComputing`
//! changes: another Envoy thread or gateway credits the prompt too, some
//! milliseconds later, for as long from when it heard of it
//! ([`Computing::record_shared`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::index::NoHash;
use crate::SeqHash;

/// How long a routed prompt counts as being computed.
pub const COMPUTING_TTL_MS: u64 = 5_000;
/// Blocks per credited step: 256 tokens at 16-token blocks.
pub const STRIDE: usize = 16;
/// Remembered stride blocks at most; the oldest prompts go first beyond it.
/// Every router holds the whole fleet's prompts in progress (they are
/// shared): 5 s of 12k-token cold prompts (47 strides) up to ~280 requests
/// a second, in ~3.5 MiB per VM at most.
const MAX_ENTRIES: usize = 1 << 16;
/// Strides of one prompt another router shared, at most: 1M tokens at
/// 16-token blocks. The rest of a longer list is not credited. Also what
/// one state update may credit in all, so one callback stays short.
pub const MAX_SHARED_STRIDES: usize = 4_096;

/// The every [`STRIDE`]th block hashes of a prompt being computed, past what
/// its worker held: what a router records, and shares.
pub type Strides = Arc<[SeqHash]>;

/// One routed prompt: who computes it, until when it counts.
struct Sent {
    worker: Arc<str>,
    until_ms: u64,
    strides: Strides,
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
    /// `worker` (a [`Target::key`](crate::Target::key)) was sent `prompt` to compute at `now_ms`,
    /// holding (or being credited) its first `cached_blocks` already: only
    /// the strides past those need the credit, so a hit records little.
    /// A request reusing a prompt in progress therefore does not extend its
    /// credit: that runs from when the prompt was sent to be computed.
    /// Returns the strides recorded, for the routers this one shares its
    /// decisions with; `None` when nothing needed the credit.
    pub fn record(
        &mut self,
        worker: &str,
        prompt: &[SeqHash],
        cached_blocks: u32,
        now_ms: u64,
    ) -> Option<Strides> {
        self.expire(now_ms);
        let cached = usize::try_from(cached_blocks).unwrap_or(usize::MAX);
        let first = last_block_of(first_stride_past(cached)).unwrap_or(usize::MAX);
        let strides: Strides = prompt
            .get(first..)
            .unwrap_or_default()
            .iter()
            .step_by(STRIDE)
            .copied()
            .collect();
        if strides.is_empty() {
            return None;
        }
        self.insert(worker, Arc::clone(&strides), now_ms);
        Some(strides)
    }

    /// Credits a prompt another router sent `worker` (a [`Target::key`](crate::Target::key)) to
    /// compute: its strides as that router recorded them. Only the strides
    /// not already credited to `worker` are recorded, so this router's own
    /// decision coming back (or a prompt shared twice) changes nothing and
    /// extends nothing, while a longer prompt over one in progress adds its
    /// tail. Returns whether anything was new; at most
    /// [`MAX_SHARED_STRIDES`] strides are taken.
    pub fn record_shared(&mut self, worker: &str, strides: &[u64], now_ms: u64) -> bool {
        self.expire(now_ms);
        let new: Strides = strides
            .iter()
            .take(MAX_SHARED_STRIDES)
            .map(|s| SeqHash(*s))
            .filter(|s| self.holder(s, now_ms) != Some(worker))
            .collect();
        if new.is_empty() {
            return false;
        }
        self.insert(worker, new, now_ms);
        true
    }

    fn insert(&mut self, worker: &str, strides: Strides, now_ms: u64) {
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
        while self.entries > MAX_ENTRIES && self.forget_oldest() {}
    }

    /// The credit for `prompt` at `now_ms`, to ask of each candidate.
    pub fn credit<'a>(&'a self, prompt: &'a [SeqHash], now_ms: u64) -> PromptCredit<'a> {
        PromptCredit {
            computing: self,
            prompt,
            now_ms,
            probed: None,
        }
    }

    /// Who computes the prompt's block `block`, while the credit lasts.
    fn holder(&self, block: &SeqHash, now_ms: u64) -> Option<&str> {
        self.holders
            .get(block)
            .filter(|(_, until)| *until > now_ms)
            .map(|(worker, _)| &**worker)
    }

    /// Forgets prompts whose credit ended by `now_ms`.
    fn expire(&mut self, now_ms: u64) {
        while self.sent.front().is_some_and(|s| s.until_ms <= now_ms) && self.forget_oldest() {}
    }

    /// Forgets the prompt sent first; false when there is none.
    fn forget_oldest(&mut self) -> bool {
        let Some(sent) = self.sent.pop_front() else {
            return false;
        };
        self.entries -= sent.strides.len();
        for block in sent.strides.iter() {
            // Unless a later prompt renewed it, or another worker took it.
            let ours = self
                .holders
                .get(block)
                .is_some_and(|(held_by, until)| *held_by == sent.worker && *until <= sent.until_ms);
            if ours {
                self.holders.remove(block);
            }
        }
        true
    }
}

/// The first stride (counted from 1) not wholly within a prompt's first
/// `blocks` blocks.
fn first_stride_past(blocks: usize) -> usize {
    blocks / STRIDE + 1
}

/// The index of the last block of stride `stride` (counted from 1): the
/// block whose hash stands for the whole stride.
fn last_block_of(stride: usize) -> Option<usize> {
    stride.checked_mul(STRIDE)?.checked_sub(1)
}

/// One prompt's credit, asked of every candidate of a decision. Most
/// candidates hold the same number of the prompt's blocks in the fleet state
/// (often none), so they ask about the same stride: its holder is looked up
/// once per decision, not once per candidate.
pub struct PromptCredit<'a> {
    computing: &'a Computing,
    prompt: &'a [SeqHash],
    now_ms: u64,
    /// The last first stride asked about, and who computes it.
    probed: Option<(usize, Option<&'a str>)>,
}

impl PromptCredit<'_> {
    /// How many leading blocks of the prompt `worker` holds or is
    /// computing, given that the fleet state shows it holding `indexed`.
    pub fn cached_on(&mut self, worker: &str, indexed: u32) -> u32 {
        let (computing, prompt, now_ms) = (self.computing, self.prompt, self.now_ms);
        // Who computes the first `strides` strides of the prompt.
        let holder = |strides: usize| {
            last_block_of(strides)
                .and_then(|last| prompt.get(last))
                .and_then(|block| computing.holder(block, now_ms))
        };
        let first = first_stride_past(usize::try_from(indexed).unwrap_or(usize::MAX));
        let first_holder = match self.probed {
            Some((probed, held_by)) if probed == first => held_by,
            _ => {
                let held_by = holder(first);
                self.probed = Some((first, held_by));
                held_by
            }
        };
        if first_holder != Some(worker) {
            return indexed;
        }
        // Past here whole strides fit in the prompt: no product overflows.
        // `worker` computes stride `low`, and none past `high`.
        let (mut low, mut high) = (first, prompt.len() / STRIDE);
        while low < high {
            let middle = low + (high - low).div_ceil(2);
            if holder(middle) == Some(worker) {
                low = middle;
            } else {
                high = middle - 1;
            }
        }
        u32::try_from(low * STRIDE).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(range: std::ops::Range<u64>) -> Vec<SeqHash> {
        range.map(SeqHash).collect()
    }

    fn cached_on(
        computing: &Computing,
        worker: &str,
        prompt: &[SeqHash],
        indexed: u32,
        now_ms: u64,
    ) -> u32 {
        computing.credit(prompt, now_ms).cached_on(worker, indexed)
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
        computing.record("a", &blocks(0..70), 0, 0);
        let prompt = sharing(50, 10);
        // Whole strides: 48 of the 50 shared blocks.
        assert_eq!(cached_on(&computing, "a", &prompt, 0, 10), 48);
        assert_eq!(cached_on(&computing, "b", &prompt, 0, 10), 0);
        // The fleet state already shows more: it wins.
        assert_eq!(cached_on(&computing, "a", &prompt, 49, 10), 49);
        // Every length of shared prefix, whatever the state shows below it.
        for shared in 0..=70u64 {
            let prompt = sharing(shared, 20);
            let credited = shared / STRIDE as u64 * STRIDE as u64;
            for indexed in 0..=shared {
                assert_eq!(
                    cached_on(&computing, "a", &prompt, indexed as u32, 10),
                    credited.max(indexed) as u32,
                    "{shared} shared, {indexed} indexed"
                );
            }
        }
        // Whatever the state claims, no overflow.
        assert_eq!(cached_on(&computing, "a", &prompt, u32::MAX, 10), u32::MAX);
        // Too short to be remembered.
        computing.record("c", &blocks(500..515), 0, 0);
        assert_eq!(cached_on(&computing, "c", &blocks(500..515), 0, 10), 0);
    }

    #[test]
    fn the_credit_ends_with_its_time_to_live_unless_renewed() {
        let mut computing = Computing::default();
        computing.record("a", &blocks(0..64), 0, 0);
        computing.record("a", &blocks(0..32), 0, 3_000);
        let prompt = blocks(0..64);
        assert_eq!(
            cached_on(&computing, "a", &prompt, 0, COMPUTING_TTL_MS - 1),
            64
        );
        // The first prompt expired; the second renewed its first 32 blocks.
        computing.record("b", &blocks(500..516), 0, COMPUTING_TTL_MS);
        assert_eq!(cached_on(&computing, "a", &prompt, 0, COMPUTING_TTL_MS), 32);
        computing.record("b", &blocks(500..516), 0, 3_000 + COMPUTING_TTL_MS);
        assert_eq!(
            cached_on(&computing, "a", &prompt, 0, 3_000 + COMPUTING_TTL_MS),
            0
        );
        assert_eq!(computing.holders.len(), 1);
        // A prompt another worker took over stays with it when the first
        // worker's credit ends.
        computing.record("a", &blocks(0..16), 0, 10_000);
        computing.record("b", &blocks(0..16), 0, 12_000);
        computing.record("x", &blocks(600..616), 0, 10_000 + COMPUTING_TTL_MS);
        assert_eq!(cached_on(&computing, "b", &blocks(0..16), 0, 15_000), 16);
    }

    #[test]
    fn only_strides_past_what_the_worker_holds_are_recorded() {
        let mut computing = Computing::default();
        // It held 40 blocks: strides 1 and 2 (blocks 15 and 31) need no
        // credit, strides 3 and 4 do.
        computing.record("a", &blocks(0..70), 40, 0);
        assert_eq!(computing.entries, 2);
        assert_eq!(cached_on(&computing, "a", &blocks(0..70), 40, 10), 64);
        // Below what it held, the fleet state is asked, not the credit.
        assert_eq!(cached_on(&computing, "a", &blocks(0..70), 0, 10), 0);
        // A whole prompt held records nothing.
        computing.record("a", &blocks(0..64), 64, 0);
        assert_eq!(computing.entries, 2);
        computing.record("b", &blocks(200..232), u32::MAX, 0);
        assert_eq!(computing.entries, 2);
    }

    #[test]
    fn one_credit_answers_every_candidate_of_a_decision() {
        let mut computing = Computing::default();
        computing.record("a", &blocks(0..64), 0, 0);
        computing.record("b", &sharing(32, 32), 32, 0);
        let prompt = sharing(32, 32);
        let mut credit = computing.credit(&prompt, 10);
        // Candidates in any order, the same stride asked again and again.
        let asked = [("c", 0), ("a", 0), ("b", 0), ("a", 0), ("b", 32), ("a", 16)];
        let answers: Vec<u32> = asked
            .iter()
            .map(|(worker, indexed)| credit.cached_on(worker, *indexed))
            .collect();
        assert_eq!(answers, [0, 32, 0, 32, 64, 32]);
    }

    fn raw(strides: &[SeqHash]) -> Vec<u64> {
        strides.iter().map(|s| s.0).collect()
    }

    #[test]
    fn another_router_credits_what_one_shared() {
        let (mut sender, mut receiver) = (Computing::default(), Computing::default());
        let prompt = sharing(40, 30);
        let strides = sender.record("a", &prompt, 0, 0).unwrap();
        assert_eq!(strides.len(), 4);
        assert!(receiver.record_shared("a", &raw(&strides), 5));
        for (shared_blocks, credited) in [(40, 64), (70, 32)] {
            let asked = sharing(shared_blocks, 30);
            assert_eq!(cached_on(&receiver, "a", &asked, 0, 10), credited);
            assert_eq!(cached_on(&receiver, "b", &asked, 0, 10), 0);
        }
        // Its credit runs from when it was shared.
        assert_eq!(
            cached_on(&receiver, "a", &prompt, 0, 4 + COMPUTING_TTL_MS),
            64
        );
        assert_eq!(
            cached_on(&receiver, "a", &prompt, 0, 5 + COMPUTING_TTL_MS),
            0
        );
        // The sender hears its own decision back: nothing changes.
        assert!(!sender.record_shared("a", &raw(&strides), 5));
        assert_eq!(sender.entries, 4);
        assert_eq!(
            cached_on(&sender, "a", &prompt, 0, COMPUTING_TTL_MS - 1),
            64
        );
        assert_eq!(cached_on(&sender, "a", &prompt, 0, COMPUTING_TTL_MS), 0);
    }

    #[test]
    fn a_longer_prompt_shared_over_one_in_progress_adds_its_tail() {
        let mut computing = Computing::default();
        let short = blocks(0..32);
        let long = blocks(0..64);
        let short_strides = computing.record("a", &short, 0, 0).unwrap();
        // Another router sent the longer prompt before it heard of the
        // shorter one: its list repeats the shorter one's strides.
        let long_strides = Computing::default().record("a", &long, 0, 0).unwrap();
        assert!(long_strides.starts_with(&short_strides));
        assert!(computing.record_shared("a", &raw(&long_strides), 1));
        assert_eq!(computing.entries, 4);
        assert_eq!(cached_on(&computing, "a", &long, 0, 2), 64);
        // The same prompt computed on another worker is that worker's now.
        assert!(computing.record_shared("b", &raw(&short_strides), 2));
        assert_eq!(cached_on(&computing, "b", &short, 0, 3), 32);
        // A list longer than any prompt is credited up to the limit.
        let huge: Vec<u64> = (10_000..10_000 + MAX_SHARED_STRIDES as u64 + 5).collect();
        assert!(computing.record_shared("c", &huge, 3));
        assert_eq!(computing.entries, 6 + MAX_SHARED_STRIDES);
        assert!(!computing.record_shared("c", &[], 3));
    }

    #[test]
    fn a_full_table_forgets_only_what_it_must() {
        let mut computing = Computing::default();
        // All in one millisecond, as one burst of shared prompts arrives.
        let per_prompt = MAX_SHARED_STRIDES as u64;
        let prompts = (MAX_ENTRIES / MAX_SHARED_STRIDES) as u64 + 1;
        for prompt in 0..prompts {
            let strides: Vec<u64> = (prompt * per_prompt..(prompt + 1) * per_prompt).collect();
            assert!(computing.record_shared("a", &strides, 7));
        }
        assert_eq!(computing.entries, MAX_ENTRIES);
        // The first prompt went; the last one, and the others, stayed.
        let last = (prompts - 1) * per_prompt;
        assert_eq!(computing.holder(&SeqHash(0), 7), None);
        assert_eq!(computing.holder(&SeqHash(last), 7), Some("a"));
        assert_eq!(computing.holder(&SeqHash(per_prompt), 7), Some("a"));
    }

    #[test]
    fn memory_is_bounded_by_forgetting_the_oldest() {
        let mut computing = Computing::default();
        let size = (MAX_ENTRIES * STRIDE / 4) as u64;
        for prompt in 0..8u64 {
            computing.record("a", &blocks(prompt * size..(prompt + 1) * size), 0, prompt);
        }
        assert!(computing.entries <= MAX_ENTRIES);
        assert!(computing.holders.len() <= MAX_ENTRIES);
        assert_eq!(cached_on(&computing, "a", &blocks(0..size), 0, 10), 0);
        let newest = blocks(7 * size..8 * size);
        assert_eq!(cached_on(&computing, "a", &newest, 0, 10), size as u32);
    }
}
