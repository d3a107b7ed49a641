//! The single owner of a worker's view: normalizes engine batches, numbers
//! the resulting events, batches them into NATS messages, and publishes full
//! snapshots when subscribers may have missed something.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use router_core::protocol::{
    kv_event::Kind, AllBlocksCleared, BlocksRemoved, BlocksStored, FullState, KvEvent,
    KvEventBatch, ResetReason, SyncSeen, WorkerReset,
};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::time::Instant;

use crate::decode::EngineEvent;
use crate::normalize::{NormEvent, NormStats, Normalizer};
use crate::relay::metrics::{unix_ms, RelayMetrics};

/// From the engine-facing sources, in engine order.
#[derive(Debug)]
pub enum SourceMsg {
    Batch(Vec<EngineEvent>),
    /// History was lost or the engine restarted: forget the view.
    Reset(ResetReason),
}

/// Requests from the NATS side.
#[derive(Debug)]
pub enum Control {
    /// Publish a full snapshot (unless one is already on its way to a
    /// requester that has seen `seen`); answer `reply` with the seq of its
    /// first part.
    FullState {
        reply: Option<async_nats::Subject>,
        seen: Option<SyncSeen>,
    },
}

/// A message ready for the NATS publisher task.
#[derive(Debug)]
pub struct Outgoing {
    pub subject: String,
    pub payload: Bytes,
    pub kind: &'static str,
}

/// Small events are coalesced for at most this long, keeping NATS message
/// rates near one per engine step rather than one per block.
const LINGER: Duration = Duration::from_millis(5);
/// Flush once a message would carry this many hashes (~33 KB).
const MAX_BATCH_HASHES: usize = 4096;
/// Hashes per full-state part: 512 KB, under NATS's default 1 MB payload cap.
const FULL_STATE_PART: usize = 65_536;
/// How often to retry a snapshot that did not fit in the outbox.
const SNAPSHOT_RETRY: Duration = Duration::from_millis(100);
/// How often refused block sizes are logged: a hybrid vLLM model whose KV
/// cache groups use other block sizes has some in every store, and the
/// metric counts them all.
const BLOCK_SIZE_ERROR_EVERY: Duration = Duration::from_secs(60);

pub struct Pipeline {
    normalizer: Normalizer,
    worker_id: String,
    model: String,
    subject: String,
    epoch: u64,
    next_seq: u64,
    pending: Vec<KvEvent>,
    pending_hashes: usize,
    linger_until: Option<Instant>,
    needs_full_state: bool,
    outbox: mpsc::Sender<Outgoing>,
    metrics: RelayMetrics,
    last_seq: Arc<AtomicU64>,
    block_size_logged_at: Option<Instant>,
    /// Seq of the first part of the last full state delivered to NATS.
    last_full_state: Option<u64>,
}

impl Pipeline {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        normalizer: Normalizer,
        worker_id: String,
        model: String,
        subject: String,
        epoch: u64,
        outbox: mpsc::Sender<Outgoing>,
        metrics: RelayMetrics,
        last_seq: Arc<AtomicU64>,
    ) -> Self {
        Self {
            normalizer,
            worker_id,
            model,
            subject,
            epoch,
            next_seq: 1,
            pending: Vec::new(),
            pending_hashes: 0,
            linger_until: None,
            needs_full_state: false,
            outbox,
            metrics,
            last_seq,
            block_size_logged_at: None,
            last_full_state: None,
        }
    }

    pub async fn run(
        mut self,
        mut sources: mpsc::Receiver<SourceMsg>,
        mut control: mpsc::Receiver<Control>,
    ) {
        // Every incarnation starts from an empty view, so subscribers drop
        // whatever an earlier relay of this worker told them.
        self.reset(ResetReason::RelayStarted);
        self.flush();
        loop {
            let wake = match (self.linger_until, self.needs_full_state) {
                (Some(at), _) => Some(at),
                (None, true) => Some(Instant::now() + SNAPSHOT_RETRY),
                (None, false) => None,
            };
            tokio::select! {
                msg = sources.recv() => match msg {
                    Some(SourceMsg::Batch(events)) => self.apply(&events),
                    Some(SourceMsg::Reset(reason)) => self.reset(reason),
                    None => break,
                },
                Some(Control::FullState { reply, seen }) = control.recv() => {
                    let first = self.full_state_for(seen);
                    if let Some(reply) = reply {
                        let answer = Outgoing {
                            subject: reply.to_string(),
                            payload: Bytes::from(first.to_string()),
                            kind: "sync_reply",
                        };
                        self.send(answer);
                    }
                }
                _ = sleep_until_opt(wake) => {
                    if self.linger_until.is_some() {
                        self.flush();
                    } else if self.needs_full_state {
                        self.full_state();
                    }
                }
            }
        }
        self.flush();
    }

    /// Normalizes one engine batch into pending events.
    pub fn apply(&mut self, events: &[EngineEvent]) {
        let mut normalized = Vec::with_capacity(events.len());
        let mut stats = NormStats::default();
        for event in events {
            self.normalizer.apply(event, &mut normalized, &mut stats);
        }
        self.metrics.record_norm_stats(&stats);
        if stats.lost_events() {
            tracing::warn!(
                unknown_parents = stats.unknown_parent,
                "stored blocks whose parent was never seen: engine events were lost \
                 before this relay saw them; those blocks stay out of the view"
            );
        }
        let log_block_size = self
            .block_size_logged_at
            .is_none_or(|at| at.elapsed() >= BLOCK_SIZE_ERROR_EVERY);
        if stats.block_size_mismatch > 0 && log_block_size {
            self.block_size_logged_at = Some(Instant::now());
            tracing::error!(
                blocks = stats.block_size_mismatch,
                "engine block size differs from --block-size; blocks refused \
                 (kvmesh_relay_skipped_blocks_total counts them; logged at most once a minute)"
            );
        }
        for event in normalized {
            // One engine event may hold a whole prompt's blocks (SGLang
            // merges a radix node's pages): split so every message stays
            // far under NATS's payload limit, which would refuse it and
            // leave a hole every subscriber resyncs over.
            match event {
                NormEvent::Stored { mut parent, hashes } => self.push_blocks(&hashes, |chunk| {
                    let stored = BlocksStored {
                        parent,
                        hashes: chunk.to_vec(),
                    };
                    parent = chunk.last().copied();
                    Kind::Stored(stored)
                }),
                NormEvent::Removed { hashes } => self.push_blocks(&hashes, |chunk| {
                    Kind::Removed(BlocksRemoved {
                        hashes: chunk.to_vec(),
                    })
                }),
                NormEvent::Cleared => self.push(Kind::Cleared(AllBlocksCleared {})),
            }
        }
        self.metrics
            .blocks
            .set(self.normalizer.block_count() as i64);
    }

    pub fn reset(&mut self, reason: ResetReason) {
        self.normalizer.reset();
        self.metrics.reset(reason_name(reason));
        self.metrics.blocks.set(0);
        self.push(Kind::Reset(WorkerReset {
            reason: reason as i32,
        }));
    }

    /// Pushes `hashes` as events of at most [`MAX_BATCH_HASHES`], each made
    /// by `event` from its chunk, in order.
    fn push_blocks(&mut self, hashes: &[u64], mut event: impl FnMut(&[u64]) -> Kind) {
        for chunk in hashes.chunks(MAX_BATCH_HASHES) {
            self.pending_hashes += chunk.len();
            self.push(event(chunk));
        }
    }

    fn push(&mut self, kind: Kind) {
        self.metrics.published(kind_name(&kind));
        self.pending.push(KvEvent {
            seq: self.next_seq,
            kind: Some(kind),
        });
        self.next_seq += 1;
        if self.pending_hashes >= MAX_BATCH_HASHES {
            self.flush();
        } else if self.linger_until.is_none() {
            self.linger_until = Some(Instant::now() + LINGER);
        }
    }

    /// Hands pending events to the publisher; if its buffer is full the
    /// events are dropped and a snapshot follows once there is room, because
    /// subscribers can rebuild from a snapshot but not from a hole.
    pub fn flush(&mut self) {
        self.linger_until = None;
        self.pending_hashes = 0;
        if self.pending.is_empty() {
            return;
        }
        let events = std::mem::take(&mut self.pending);
        let last = events.last().map(|e| e.seq).unwrap_or(0);
        if self.send_batch(events, "events") {
            self.last_seq.store(last, Ordering::Relaxed);
            if self.needs_full_state {
                self.full_state();
            }
        } else {
            self.needs_full_state = true;
        }
    }

    /// Answers a full-state request: with the last full state when it comes
    /// after everything the requester has seen (every subscriber that saw
    /// one hole asks, and one full state answers them all), else with a new
    /// one. Returns its first part's seq.
    fn full_state_for(&mut self, seen: Option<SyncSeen>) -> u64 {
        if let (Some(seen), Some(first)) = (seen, self.last_full_state) {
            if seen.epoch == self.epoch && first > seen.seq && !self.needs_full_state {
                self.metrics.sync_requests_coalesced.inc();
                return first;
            }
        }
        self.flush();
        self.full_state()
    }

    /// Publishes the whole view as numbered parts; returns the first part's seq.
    pub fn full_state(&mut self) -> u64 {
        // Cleared first so that flush does not start a second snapshot.
        self.needs_full_state = false;
        self.flush();
        let first = self.next_seq;
        let hashes: Vec<u64> = self.normalizer.blocks().collect();
        let parts: Vec<&[u64]> = if hashes.is_empty() {
            vec![&[]]
        } else {
            hashes.chunks(FULL_STATE_PART).collect()
        };
        let count = parts.len();
        let mut delivered = true;
        for (index, part) in parts.into_iter().enumerate() {
            let event = KvEvent {
                seq: self.next_seq,
                kind: Some(Kind::FullState(FullState {
                    part: u32::try_from(index).unwrap_or(u32::MAX),
                    last: index + 1 == count,
                    hashes: part.to_vec(),
                })),
            };
            self.next_seq += 1;
            self.metrics.published("full_state");
            delivered &= self.send_batch(vec![event], "full_state");
        }
        self.needs_full_state = !delivered;
        if delivered {
            self.metrics.full_states.inc();
            self.last_seq.store(self.next_seq - 1, Ordering::Relaxed);
            self.last_full_state = Some(first);
        }
        first
    }

    fn send_batch(&mut self, events: Vec<KvEvent>, kind: &'static str) -> bool {
        let batch = KvEventBatch {
            worker_id: self.worker_id.clone(),
            model: self.model.clone(),
            epoch: self.epoch,
            events,
            timestamp_ms: unix_ms(),
        };
        self.send(Outgoing {
            subject: self.subject.clone(),
            payload: Bytes::from(batch.encode_to_vec()),
            kind,
        })
    }

    fn send(&mut self, message: Outgoing) -> bool {
        match self.outbox.try_send(message) {
            Ok(()) => true,
            Err(TrySendError::Full(message)) => {
                self.metrics.drop_message("outbox");
                tracing::warn!(kind = message.kind, "NATS outbox full; message dropped");
                false
            }
            Err(TrySendError::Closed(_)) => false,
        }
    }
}

fn reason_name(reason: ResetReason) -> &'static str {
    match reason {
        ResetReason::Unspecified => "unspecified",
        ResetReason::RelayStarted => "relay_started",
        ResetReason::EngineRestarted => "engine_restarted",
        ResetReason::EventsLost => "events_lost",
    }
}

fn kind_name(kind: &Kind) -> &'static str {
    match kind {
        Kind::Stored(_) => "stored",
        Kind::Removed(_) => "removed",
        Kind::Cleared(_) => "cleared",
        Kind::Reset(_) => "reset",
        Kind::FullState(_) => "full_state",
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{BlockStored, EngineHash};
    use crate::normalize::MediaPolicy;
    use router_core::BlockSize;

    const EPOCH: u64 = 1;

    /// A pipeline of a block size of 1, and what it publishes.
    fn pipeline() -> (Pipeline, mpsc::Receiver<Outgoing>) {
        let (outbox, published) = mpsc::channel(64);
        let block_size = BlockSize::new(1).unwrap();
        let pipeline = Pipeline::new(
            Normalizer::new("m", block_size, MediaPolicy::default()),
            "w".into(),
            "m".into(),
            "subject".into(),
            EPOCH,
            outbox,
            RelayMetrics::new(&mut prometheus_client::registry::Registry::default()),
            Arc::new(AtomicU64::new(0)),
        );
        (pipeline, published)
    }

    #[test]
    fn one_full_state_answers_every_requester_that_has_not_seen_it() {
        let (mut pipeline, mut published) = pipeline();
        let first = pipeline.full_state_for(None);
        assert!(published.try_recv().is_ok());
        let seen = |epoch, seq| Some(SyncSeen { epoch, seq });
        // Seen up to just before it: it is still on its way there.
        assert_eq!(pipeline.full_state_for(seen(EPOCH, first - 1)), first);
        assert!(published.try_recv().is_err());
        // Seen it already, another epoch, or no seq named: a new one.
        for requester in [seen(EPOCH, first), seen(EPOCH + 1, 0), None] {
            let next = pipeline.full_state_for(requester);
            assert!(next > first, "{requester:?}");
            assert!(published.try_recv().is_ok(), "{requester:?}");
        }
    }

    #[test]
    fn a_prompt_stored_in_one_engine_event_is_published_in_bounded_messages() {
        let (mut pipeline, mut published) = pipeline();
        let blocks = 3 * MAX_BATCH_HASHES as u64 + 5;
        pipeline.apply(&[EngineEvent::Stored(BlockStored::on_gpu(
            (1..=blocks).map(EngineHash).collect(),
            None,
            (0..blocks as u32).collect(),
            1,
        ))]);
        pipeline.flush();
        let mut stored = Vec::new();
        while let Ok(message) = published.try_recv() {
            assert!(
                message.payload.len() < 64 * 1024,
                "{}",
                message.payload.len()
            );
            let batch = KvEventBatch::decode(message.payload).unwrap();
            for event in batch.events {
                if let Some(Kind::Stored(blocks)) = event.kind {
                    assert!(blocks.hashes.len() <= MAX_BATCH_HASHES);
                    stored.push(blocks);
                }
            }
        }
        assert_eq!(stored.len(), 4);
        for pair in stored.windows(2) {
            assert_eq!(pair[1].parent, pair[0].hashes.last().copied());
        }
        let total: usize = stored.iter().map(|s| s.hashes.len()).sum();
        assert_eq!(total as u64, blocks);
    }
}
