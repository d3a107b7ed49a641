//! Continuous batching over the paged KV cache, one iteration at a time,
//! following vLLM's v1 scheduler: running requests first (decodes and
//! unfinished prefill chunks), then waiting requests within the token budget
//! (chunked prefill) and the sequence limit; when blocks run out the most
//! recently admitted request is preempted and later recomputed.
//!
//! The scheduler is synchronous and knows nothing about time or I/O; the
//! engine loop drives it and sleeps for the timing model's duration between
//! [`Scheduler::schedule`] and [`Scheduler::complete`].

use std::collections::VecDeque;

use tokio::sync::mpsc::UnboundedSender;

use crate::kv_cache::{BlockId, BlockLink, KvCache};
use crate::timing::BatchShape;

pub type SequenceId = u64;

/// What the engine tells a request's API handler.
#[derive(Debug, Clone, PartialEq)]
pub enum SequenceUpdate {
    /// The next output token.
    Token(u32),
    Finished(SequenceSummary),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SequenceSummary {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache at first admission.
    pub cached_tokens: usize,
    /// Simulated seconds from arrival to the first output token.
    pub time_to_first_token: f64,
}

/// A request as submitted by the API.
#[derive(Debug)]
pub struct NewSequence {
    pub prompt: Vec<u32>,
    /// Exactly these tokens are generated, one per step.
    pub output: Vec<u32>,
    pub updates: UnboundedSender<SequenceUpdate>,
}

#[derive(Debug)]
struct Sequence {
    id: SequenceId,
    /// Prompt followed by the tokens generated so far.
    tokens: Vec<u32>,
    prompt_len: usize,
    planned_output: Vec<u32>,
    blocks: Vec<BlockId>,
    /// Links of the leading full blocks already registered (or found cached).
    links: Vec<BlockLink>,
    num_computed: usize,
    cached_tokens: Option<usize>,
    arrival: f64,
    first_token_at: Option<f64>,
    updates: UnboundedSender<SequenceUpdate>,
}

impl Sequence {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerLimits {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
}

/// What one iteration computes: (sequence, tokens) pairs and the batch shape.
#[derive(Debug, Default)]
pub struct Step {
    scheduled: Vec<(SequenceId, usize)>,
    pub shape: BatchShape,
}

impl Step {
    pub fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
    }
}

/// Counters the metrics module exports; cumulative since start.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerCounters {
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub preemptions: u64,
    pub finished: u64,
}

/// Time-to-first-token samples produced by one `complete` call.
pub type FirstTokenTimes = Vec<f64>;

pub struct Scheduler {
    cache: KvCache,
    limits: SchedulerLimits,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    next_id: SequenceId,
    counters: SchedulerCounters,
}

impl Scheduler {
    pub fn new(cache: KvCache, limits: SchedulerLimits) -> Self {
        Self {
            cache,
            limits,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            counters: SchedulerCounters::default(),
        }
    }

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    pub fn cache_mut(&mut self) -> &mut KvCache {
        &mut self.cache
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    pub fn counters(&self) -> SchedulerCounters {
        self.counters
    }

    /// Queues a request that arrived at simulated time `now`.
    pub fn submit(&mut self, request: NewSequence, now: f64) -> SequenceId {
        let id = self.next_id;
        self.next_id += 1;
        self.counters.prompt_tokens += request.prompt.len() as u64;
        self.waiting.push_back(Sequence {
            id,
            prompt_len: request.prompt.len(),
            tokens: request.prompt,
            planned_output: request.output,
            blocks: Vec::new(),
            links: Vec::new(),
            num_computed: 0,
            cached_tokens: None,
            arrival: now,
            first_token_at: None,
            updates: request.updates,
        });
        id
    }

    /// Picks the work of the next iteration and reserves its KV blocks.
    pub fn schedule(&mut self) -> Step {
        self.drop_abandoned();
        let mut step = Step::default();
        let mut budget = self.limits.max_num_batched_tokens;

        let preemptions_before = self.counters.preemptions;
        let mut index = 0;
        while index < self.running.len() && budget > 0 {
            let seq = &self.running[index];
            let tokens = (seq.tokens.len() - seq.num_computed).min(budget);
            if tokens == 0 {
                index += 1;
                continue;
            }
            let target = seq.num_computed + tokens;
            if !self.reserve_running(index, target) {
                // The sequence itself was preempted; everything after it too.
                break;
            }
            let seq = &mut self.running[index];
            Self::add_to_shape(&mut step.shape, seq, tokens);
            register_blocks(&mut self.cache, seq, target);
            step.scheduled.push((seq.id, tokens));
            budget -= tokens;
            index += 1;
        }

        // Like vLLM, admit nobody in an iteration that had to preempt.
        let preempted = self.counters.preemptions != preemptions_before;
        while !preempted && budget > 0 && self.running.len() < self.limits.max_num_seqs {
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            self.admit_from_cache(&mut seq);
            let tokens = (seq.tokens.len() - seq.num_computed).min(budget);
            let target = seq.num_computed + tokens;
            if !grow(&mut self.cache, &mut seq, target) {
                // Not enough free blocks: give the hits back and wait.
                reset(&mut self.cache, &mut seq);
                self.waiting.push_front(seq);
                break;
            }
            // Counted once per admission, as vLLM does: a request that waits
            // for blocks is looked up again but not counted again.
            self.counters.prefix_cache_queries += seq.tokens.len() as u64;
            self.counters.prefix_cache_hits += seq.num_computed as u64;
            Self::add_to_shape(&mut step.shape, &seq, tokens);
            register_blocks(&mut self.cache, &mut seq, target);
            step.scheduled.push((seq.id, tokens));
            budget -= tokens;
            self.running.push(seq);
        }
        step
    }

    /// Applies a computed iteration that ended at simulated time `now`:
    /// advances each sequence, emits tokens and finishes sequences.
    pub fn complete(&mut self, step: Step, now: f64) -> FirstTokenTimes {
        let mut first_tokens = Vec::new();
        for (id, tokens) in step.scheduled {
            let Some(index) = self.running.iter().position(|s| s.id == id) else {
                continue;
            };
            let seq = &mut self.running[index];
            seq.num_computed += tokens;
            if seq.num_computed < seq.tokens.len() {
                continue; // a prefill chunk; no token yet
            }
            let Some(&token) = seq.planned_output.get(seq.generated()) else {
                continue;
            };
            seq.tokens.push(token);
            self.counters.generation_tokens += 1;
            if seq.first_token_at.is_none() {
                seq.first_token_at = Some(now);
                first_tokens.push(now - seq.arrival);
            }
            let delivered = seq.updates.send(SequenceUpdate::Token(token)).is_ok();
            if !delivered || seq.generated() >= seq.planned_output.len() {
                let seq = self.running.remove(index);
                self.finish(seq, delivered);
            }
        }
        first_tokens
    }

    fn finish(&mut self, seq: Sequence, notify: bool) {
        self.cache.release(&seq.blocks);
        self.counters.finished += 1;
        if notify {
            let summary = SequenceSummary {
                prompt_tokens: seq.prompt_len,
                completion_tokens: seq.generated(),
                cached_tokens: seq.cached_tokens.unwrap_or(0),
                time_to_first_token: seq.first_token_at.map_or(0.0, |first| first - seq.arrival),
            };
            // The receiver may be gone already; nothing more to do then.
            let _ = seq.updates.send(SequenceUpdate::Finished(summary));
        }
    }

    /// Aborts requests whose client went away (vLLM aborts on disconnect).
    fn drop_abandoned(&mut self) {
        let (gone, kept): (Vec<Sequence>, Vec<Sequence>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|s| s.updates.is_closed());
        self.running = kept;
        for seq in gone {
            self.cache.release(&seq.blocks);
        }
        self.waiting.retain(|s| !s.updates.is_closed());
    }

    /// Looks the sequence's full blocks up in the prefix cache on admission.
    /// At least one token is always computed, as in vLLM, so a fully cached
    /// prompt still recomputes its last block.
    fn admit_from_cache(&mut self, seq: &mut Sequence) {
        let block_size = self.cache.block_size();
        let hashes = self.cache.engine_hasher().chain(&seq.tokens, block_size);
        let usable = (seq.tokens.len().saturating_sub(1)) / block_size;
        let mut hits = self
            .cache
            .lookup_prefix(&hashes[..usable.min(hashes.len())]);
        hits.truncate(usable);
        let ids: Vec<BlockId> = hits.iter().map(|h| h.0).collect();
        self.cache.acquire(&ids);
        seq.blocks = ids;
        seq.links = hits.iter().map(|h| h.1).collect();
        seq.num_computed = seq.links.len() * block_size;
        if seq.cached_tokens.is_none() {
            seq.cached_tokens = Some(seq.num_computed);
        }
    }

    /// Ensures running sequence `index` has blocks for `target` tokens,
    /// preempting from the back of the running list as needed. False when the
    /// sequence at `index` had to be preempted itself.
    fn reserve_running(&mut self, index: usize, target: usize) -> bool {
        loop {
            if grow(&mut self.cache, &mut self.running[index], target) {
                return true;
            }
            let Some(mut victim) = self.running.pop() else {
                return false;
            };
            let victim_was_self = self.running.len() == index;
            reset(&mut self.cache, &mut victim);
            self.counters.preemptions += 1;
            tracing::debug!(sequence = victim.id, "preempted for lack of KV blocks");
            self.waiting.push_front(victim);
            if victim_was_self {
                return false;
            }
        }
    }

    fn add_to_shape(shape: &mut BatchShape, seq: &Sequence, tokens: usize) {
        let decoding = seq.num_computed >= seq.prompt_len && tokens == 1;
        if decoding {
            shape.add_decode(seq.num_computed);
        } else {
            shape.add_prefill(tokens, seq.num_computed);
        }
    }
}

/// Registers the sequence's blocks that become full once `target` tokens are
/// computed. vLLM does this at scheduling time, since the tokens are known.
fn register_blocks(cache: &mut KvCache, seq: &mut Sequence, target: usize) {
    let block_size = cache.block_size();
    let full = target / block_size;
    while seq.links.len() < full {
        let index = seq.links.len();
        let tokens = &seq.tokens[index * block_size..(index + 1) * block_size];
        let link = cache.register_full_block(seq.blocks[index], seq.links.last().copied(), tokens);
        seq.links.push(link);
    }
}

/// Allocates blocks so the sequence can hold `target` tokens.
fn grow(cache: &mut KvCache, seq: &mut Sequence, target: usize) -> bool {
    let needed = target.div_ceil(cache.block_size());
    if needed <= seq.blocks.len() {
        return true;
    }
    match cache.allocate(needed - seq.blocks.len()) {
        Some(ids) => {
            seq.blocks.extend(ids);
            true
        }
        None => false,
    }
}

/// Frees everything a sequence holds; it will be recomputed from its tokens
/// so far (prompt + output), hitting whatever is still cached.
fn reset(cache: &mut KvCache, seq: &mut Sequence) {
    cache.release(&seq.blocks);
    seq.blocks.clear();
    seq.links.clear();
    seq.num_computed = 0;
}

#[cfg(test)]
mod tests {
    use router_core::{BlockHasher, BlockSize, HashSeed};
    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

    use super::*;
    use crate::engine_hash::EngineHasher;
    use crate::kv_cache::CacheEvent;

    fn scheduler(blocks: usize, seqs: usize, budget: usize) -> Scheduler {
        let cache = KvCache::new(
            blocks,
            EngineHasher::new("0"),
            BlockHasher::new(BlockSize::new(4).unwrap(), HashSeed::for_model("m", None)),
        );
        Scheduler::new(
            cache,
            SchedulerLimits {
                max_num_seqs: seqs,
                max_num_batched_tokens: budget,
            },
        )
    }

    fn submit(
        s: &mut Scheduler,
        prompt: Vec<u32>,
        outputs: usize,
    ) -> UnboundedReceiver<SequenceUpdate> {
        let (tx, rx) = unbounded_channel();
        s.submit(
            NewSequence {
                prompt,
                output: (1000..1000 + outputs as u32).collect(),
                updates: tx,
            },
            0.0,
        );
        rx
    }

    fn run_to_idle(s: &mut Scheduler) -> usize {
        let mut steps = 0;
        while !s.is_idle() && steps < 1000 {
            let step = s.schedule();
            s.complete(step, steps as f64);
            steps += 1;
        }
        steps
    }

    fn summary(rx: &mut UnboundedReceiver<SequenceUpdate>) -> (Vec<u32>, SequenceSummary) {
        let mut tokens = Vec::new();
        while let Ok(update) = rx.try_recv() {
            match update {
                SequenceUpdate::Token(t) => tokens.push(t),
                SequenceUpdate::Finished(s) => return (tokens, s),
            }
        }
        panic!("not finished");
    }

    #[test]
    fn generates_planned_tokens_and_reuses_prefix() {
        let mut s = scheduler(64, 8, 64);
        let prompt: Vec<u32> = (0..18).collect();
        let mut rx = submit(&mut s, prompt.clone(), 3);
        run_to_idle(&mut s);
        let (tokens, first) = summary(&mut rx);
        assert_eq!(tokens, vec![1000, 1001, 1002]);
        assert_eq!(first.cached_tokens, 0);
        let mut rx = submit(&mut s, prompt, 3);
        run_to_idle(&mut s);
        let (_, second) = summary(&mut rx);
        assert_eq!(second.cached_tokens, 16, "4 full blocks of 18 tokens");
        assert_eq!(s.counters().prefix_cache_hits, 16);
        assert_eq!(s.counters().prefix_cache_queries, 36);
    }

    #[test]
    fn fully_cached_prompt_recomputes_last_block() {
        let mut s = scheduler(64, 8, 64);
        let prompt: Vec<u32> = (0..16).collect();
        run_to_idle_with(&mut s, prompt.clone());
        let mut rx = submit(&mut s, prompt, 1);
        run_to_idle(&mut s);
        assert_eq!(summary(&mut rx).1.cached_tokens, 12);
    }

    fn run_to_idle_with(s: &mut Scheduler, prompt: Vec<u32>) {
        let _rx = submit(s, prompt, 1);
        run_to_idle(s);
    }

    #[test]
    fn chunked_prefill_respects_the_token_budget() {
        let mut s = scheduler(64, 8, 8);
        let mut rx = submit(&mut s, (0..20).collect(), 1);
        let first = s.schedule();
        assert_eq!(first.shape.tokens, 8);
        s.complete(first, 1.0);
        assert!(rx.try_recv().is_err(), "no token before the prefill ends");
        let steps = run_to_idle(&mut s);
        assert_eq!(steps, 2, "20 tokens in chunks of 8");
        assert_eq!(summary(&mut rx).0.len(), 1);
    }

    #[test]
    fn max_num_seqs_limits_the_batch() {
        let mut s = scheduler(64, 2, 100);
        let _a = submit(&mut s, vec![1; 4], 5);
        let _b = submit(&mut s, vec![2; 4], 5);
        let _c = submit(&mut s, vec![3; 4], 5);
        let step = s.schedule();
        assert_eq!((s.num_running(), s.num_waiting()), (2, 1));
        s.complete(step, 1.0);
    }

    #[test]
    fn preempts_the_latest_request_when_blocks_run_out() {
        // 4 blocks of 4 tokens. Two requests of 7 prompt tokens each need two
        // blocks; growing past 8 tokens needs a third, which is not there.
        let mut s = scheduler(4, 8, 100);
        let mut a = submit(&mut s, (0..7).collect(), 6);
        let mut b = submit(&mut s, (100..107).collect(), 6);
        let steps = run_to_idle(&mut s);
        assert!(steps < 1000);
        assert!(s.counters().preemptions >= 1);
        let (ta, _) = summary(&mut a);
        let (tb, _) = summary(&mut b);
        assert_eq!(ta.len(), 6);
        assert_eq!(
            tb,
            (1000..1006).collect::<Vec<u32>>(),
            "recomputation keeps outputs"
        );
        assert_eq!(s.cache().num_free(), 4, "everything released at the end");
    }

    #[test]
    fn a_request_waiting_for_blocks_is_counted_once_when_admitted() {
        // 4 blocks of 4 tokens: `a` holds 3, then 4 while it decodes, so `b`
        // (2 blocks) is looked up on every step until `a` finishes.
        let mut s = scheduler(4, 8, 100);
        let mut a = submit(&mut s, (0..12).collect(), 4);
        let mut b = submit(&mut s, (100..107).collect(), 1);
        let first = s.schedule();
        assert_eq!(first.scheduled.len(), 1, "b must wait for blocks");
        s.complete(first, 1.0);
        run_to_idle(&mut s);
        summary(&mut a);
        summary(&mut b);
        assert_eq!(s.counters().preemptions, 0);
        assert_eq!(s.counters().prefix_cache_queries, 12 + 7);
    }

    #[test]
    fn abandoned_requests_free_their_blocks() {
        let mut s = scheduler(8, 8, 100);
        let rx = submit(&mut s, (0..7).collect(), 50);
        let step = s.schedule();
        s.complete(step, 1.0);
        assert!(s.cache().num_free() < 8);
        drop(rx);
        let step = s.schedule();
        assert!(step.is_empty());
        assert!(s.is_idle());
        assert_eq!(s.cache().num_free(), 8);
    }

    #[test]
    fn stored_events_cover_generated_tokens_too() {
        let mut s = scheduler(16, 8, 100);
        let _rx = submit(&mut s, (0..6).collect(), 4);
        run_to_idle(&mut s);
        // 6 prompt + 4 generated; the last generated token's KV is never
        // computed, so 9 tokens are in KV: 2 full blocks.
        let stored: usize = s
            .cache_mut()
            .take_events()
            .iter()
            .map(|e| match e {
                CacheEvent::Stored { block_hashes, .. } => block_hashes.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(stored, 2);
    }
}
