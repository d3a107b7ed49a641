//! TensorRT-LLM event source: polls `POST /kv_cache_events` (docs/relay.md#input-formats-srcdecode).
//!
//! TensorRT-LLM numbers events consecutively and has no replay, so a hole in
//! `event_id` (its buffer overflowed between polls) resets the view, and ids
//! going backwards mean the server restarted. An event that does not decode
//! is skipped and counted; its id still counts as seen. A body that does not
//! decode at all resets once and forgets `expected`, so the next poll starts
//! a new sequence instead of reporting the same loss again.

use std::time::Duration;

use router_core::protocol::ResetReason;
use tokio::sync::mpsc;

use crate::decode::trtllm::{decode_events, Decoded, Poll};
use crate::decode::EventBatch;
use crate::relay::backoff::Backoff;
use crate::relay::engine_zmq::count_events;
use crate::relay::metrics::RelayMetrics;
use crate::relay::pipeline::SourceMsg;

pub struct TrtllmSource {
    pub url: String,
    pub interval: Duration,
    /// Tokens per full block, to tell partial blocks apart.
    pub block_size: u32,
    pub metrics: RelayMetrics,
    pub tx: mpsc::Sender<SourceMsg>,
}

impl TrtllmSource {
    pub async fn run(self) {
        let client = reqwest::Client::new();
        let endpoint = format!("{}/kv_cache_events", self.url.trim_end_matches('/'));
        let mut backoff = Backoff::new(self.interval, Duration::from_secs(5));
        let mut expected: Option<u64> = None;
        let mut warned_other_ranks = false;
        loop {
            let body = client
                .post(&endpoint)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .and_then(|r| r.error_for_status());
            let body = match body {
                Ok(response) => response.bytes().await,
                Err(error) => Err(error),
            };
            let body = match body {
                Ok(body) => body,
                Err(error) => {
                    self.metrics.engine_connected.set(0);
                    let delay = backoff.next_delay();
                    tracing::warn!(%error, ?delay, "polling TensorRT-LLM events failed");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            self.metrics.engine_connected.set(1);
            backoff.reset();
            match decode_events(&body, self.block_size) {
                Ok(poll) => {
                    if poll.other_rank_events > 0 && !warned_other_ranks {
                        warned_other_ranks = true;
                        tracing::warn!(
                            "TensorRT-LLM runs attention data parallelism: only rank 0's \
                             cache is indexed, the other ranks' events are ignored"
                        );
                    }
                    if !self.apply(poll, &mut expected).await {
                        return;
                    }
                }
                Err(error) => {
                    self.metrics.decode_errors.inc();
                    tracing::warn!(%error, "undecodable TensorRT-LLM events; resetting the view");
                    expected = None;
                    if !self.send(SourceMsg::Reset(ResetReason::EventsLost)).await {
                        return;
                    }
                }
            }
            tokio::time::sleep(self.interval).await;
        }
    }

    /// Checks the poll's ids against `expected` and forwards its events.
    /// Returns false once the pipeline is gone.
    async fn apply(&self, poll: Poll, expected: &mut Option<u64>) -> bool {
        self.metrics
            .skipped_blocks("partial_block", poll.partial_blocks);
        let ids = poll
            .events
            .first()
            .zip(poll.events.last())
            .map(|(first, last)| (first.event_id, last.event_id));
        let mut batch = EventBatch {
            ignored_events: poll.other_rank_events,
            ..EventBatch::default()
        };
        for numbered in poll.events {
            match numbered.event {
                Decoded::Event(event) => batch.events.push(event),
                Decoded::Ignored => batch.ignored_events = batch.ignored_events.saturating_add(1),
                Decoded::Undecodable(error) => {
                    tracing::warn!(%error, event_id = numbered.event_id, "undecodable TensorRT-LLM event skipped");
                    batch.undecodable_events = batch.undecodable_events.saturating_add(1);
                }
            }
        }
        let Some((first, last)) = ids else {
            // Other ranks' events alone: counted, nothing to apply.
            count_events(&self.metrics, &batch);
            return true;
        };
        self.metrics.mark_event_received();
        let reset = match *expected {
            Some(next) if first < next => Some(ResetReason::EngineRestarted),
            Some(next) if first > next => {
                self.metrics.gaps.inc();
                Some(ResetReason::EventsLost)
            }
            _ => None,
        };
        if let Some(reason) = reset {
            tracing::warn!(?expected, first, ?reason, "TensorRT-LLM event ids jumped");
            if !self.send(SourceMsg::Reset(reason)).await {
                return false;
            }
        }
        *expected = Some(last.saturating_add(1));
        self.metrics.engine_batches.inc();
        count_events(&self.metrics, &batch);
        self.send(SourceMsg::Batch(batch.events)).await
    }

    async fn send(&self, msg: SourceMsg) -> bool {
        self.tx.send(msg).await.is_ok()
    }
}
