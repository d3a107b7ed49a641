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
//! milliseconds later ([`Computing::record_shared`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::fleet::FleetView;
use crate::index::NoHash;
use crate::state_stream::{change, state_update, StateUpdate};
use crate::SeqHash;

/// How long a routed prompt counts as being computed.
pub const COMPUTING_TTL_MS: u64 = 5_000;
/// Blocks per credited step: 256 tokens at 16-token blocks.
pub const STRIDE: usize = 16;
/// Remembered stride blocks at most; the oldest prompts go first beyond it.
/// Every router holds the whole fleet's prompts in progress (they are
/// shared): 5 s of 12k-token cold prompts (47 strides) up to ~280 requests
/// a second, in ~3 MiB at most.
const MAX_ENTRIES: usize = 1 << 16;
/// Strides of one prompt another router shared, at most: 1M tokens at
/// 16-token blocks. The rest of a longer list is not credited.
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
    /// `worker` (an address) was sent `prompt` to compute at `now_ms`,
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

    /// Credits the prompts other routers sent to be computed: `update`'s
    /// `PromptComputing` changes, on the workers `view` (already brought up
    /// to `update`) knows. Returns how many prompts it credited.
    ///
    /// This router's own decisions come back this way too, as may one prompt
    /// sent twice: a prompt whose first stride this worker is already
    /// credited with is skipped, so an echo neither extends its credit nor
    /// takes memory twice.
    pub fn record_shared(&mut self, update: &StateUpdate, view: &FleetView, now_ms: u64) -> usize {
        let Some(state_update::Kind::Delta(delta)) = &update.kind else {
            return 0;
        };
        self.expire(now_ms);
        let mut credited = 0;
        for change in &delta.changes {
            let Some(change::Kind::Computing(computing)) = &change.kind else {
                continue;
            };
            let (Some(worker), Some(first)) =
                (view.worker(&computing.worker_id), computing.strides.first())
            else {
                continue;
            };
            if self.holder(&SeqHash(*first), now_ms) == Some(worker.address.as_str()) {
                continue;
            }
            let strides: Strides = computing
                .strides
                .iter()
                .take(MAX_SHARED_STRIDES)
                .copied()
                .map(SeqHash)
                .collect();
            self.insert(&worker.address, strides, now_ms);
            credited += 1;
        }
        credited
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
        while self.entries > MAX_ENTRIES {
            let Some(oldest) = self.sent.front().map(|s| s.until_ms) else {
                break;
            };
            self.expire(oldest);
        }
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
    use crate::state_stream::{Change, Delta, PromptComputing, Snapshot, WorkerJoined, WorkerRole};

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

    fn fleet() -> FleetView {
        let mut view = FleetView::new("m", 1 << 10);
        let joined = |id: &str, address: &str| Change {
            kind: Some(change::Kind::Joined(WorkerJoined {
                worker_id: id.into(),
                address: address.into(),
                role: WorkerRole::Both.into(),
            })),
        };
        view.commit(vec![joined("w-a", "a"), joined("w-b", "b")]);
        view
    }

    /// A delta of `PromptComputing` changes, as the sidecar streams them.
    fn shared(computing: &[(&str, &[SeqHash])]) -> StateUpdate {
        let changes = computing
            .iter()
            .map(|(worker_id, strides)| Change {
                kind: Some(change::Kind::Computing(PromptComputing {
                    worker_id: (*worker_id).into(),
                    strides: strides.iter().map(|s| s.0).collect(),
                })),
            })
            .collect();
        StateUpdate {
            model: "m".into(),
            version: 2,
            kind: Some(state_update::Kind::Delta(Delta { changes })),
        }
    }

    #[test]
    fn another_router_credits_what_one_shared() {
        let view = fleet();
        let (mut sender, mut receiver) = (Computing::default(), Computing::default());
        let prompt = sharing(40, 30);
        let strides = sender.record("a", &prompt, 0, 0).unwrap();
        assert_eq!(strides.len(), 4);
        assert_eq!(
            receiver.record_shared(&shared(&[("w-a", &strides)]), &view, 5),
            1
        );
        for (shared_blocks, credited) in [(40, 64), (70, 32)] {
            let asked = sharing(shared_blocks, 30);
            assert_eq!(cached_on(&receiver, "a", &asked, 0, 10), credited);
            assert_eq!(cached_on(&receiver, "b", &asked, 0, 10), 0);
        }
        // Its credit runs from when it was shared.
        assert_eq!(
            cached_on(&receiver, "a", &prompt, 0, 5 + COMPUTING_TTL_MS),
            0
        );
        // The sender hears its own decision back: nothing changes.
        assert_eq!(
            sender.record_shared(&shared(&[("w-a", &strides)]), &view, 5),
            0
        );
        assert_eq!(sender.entries, 4);
        assert_eq!(
            cached_on(&sender, "a", &prompt, 0, COMPUTING_TTL_MS - 1),
            64
        );
        assert_eq!(cached_on(&sender, "a", &prompt, 0, COMPUTING_TTL_MS), 0);
    }

    #[test]
    fn shared_prompts_on_unknown_workers_or_outside_deltas_are_skipped() {
        let view = fleet();
        let mut computing = Computing::default();
        let strides = blocks(0..4);
        let update = shared(&[("w-gone", &strides), ("w-b", &[]), ("w-b", &strides)]);
        assert_eq!(computing.record_shared(&update, &view, 0), 1);
        assert_eq!(
            cached_on(&computing, "b", &blocks(0..100), 0, 1),
            0,
            "not strides of this prompt"
        );
        let snapshot = StateUpdate {
            kind: Some(state_update::Kind::Snapshot(Snapshot::default())),
            ..update
        };
        assert_eq!(Computing::default().record_shared(&snapshot, &view, 0), 0);
        // A list longer than any prompt is credited up to the limit.
        let long = blocks(10_000..10_000 + MAX_SHARED_STRIDES as u64 + 5);
        assert_eq!(
            computing.record_shared(&shared(&[("w-a", &long)]), &view, 0),
            1
        );
        assert_eq!(computing.entries, 4 + MAX_SHARED_STRIDES);
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
