//! TensorRT-LLM event source: polls `POST /kv_cache_events` (DESIGN §3.3).
//!
//! TensorRT-LLM numbers events consecutively and has no replay, so a hole in
//! `event_id` (its buffer overflowed between polls) resets the view, and ids
//! going backwards mean the server restarted.

use std::time::Duration;

use router_core::protocol::ResetReason;
use tokio::sync::mpsc;

use crate::decode::trtllm::decode_events;
use crate::decode::EventBatch;
use crate::relay::backoff::Backoff;
use crate::relay::engine_zmq::count_events;
use crate::relay::metrics::RelayMetrics;
use crate::relay::pipeline::SourceMsg;

pub struct TrtllmSource {
    pub url: String,
    pub interval: Duration,
    pub metrics: RelayMetrics,
    pub tx: mpsc::Sender<SourceMsg>,
}

impl TrtllmSource {
    pub async fn run(self) {
        let client = reqwest::Client::new();
        let endpoint = format!("{}/kv_cache_events", self.url.trim_end_matches('/'));
        let mut backoff = Backoff::new(self.interval, Duration::from_secs(5));
        let mut expected: Option<u64> = None;
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
            match decode_events(&body) {
                Ok(events) if !events.is_empty() => {
                    self.metrics.mark_event_received();
                    let first = events.first().map(|e| e.event_id).unwrap_or(0);
                    let reset = match expected {
                        Some(next) if first < next => Some(ResetReason::EngineRestarted),
                        Some(next) if first > next => {
                            self.metrics.gaps.inc();
                            Some(ResetReason::EventsLost)
                        }
                        _ => None,
                    };
                    if let Some(reason) = reset {
                        tracing::warn!(?expected, first, ?reason, "TensorRT-LLM event ids jumped");
                        if self.tx.send(SourceMsg::Reset(reason)).await.is_err() {
                            return;
                        }
                    }
                    expected = events.last().map(|e| e.event_id.saturating_add(1));
                    let batch = EventBatch {
                        ignored_events: events.iter().filter(|e| e.event.is_none()).count() as u32,
                        events: events.into_iter().filter_map(|e| e.event).collect(),
                        ..EventBatch::default()
                    };
                    self.metrics.engine_batches.inc();
                    count_events(&self.metrics, &batch);
                    if self.tx.send(SourceMsg::Batch(batch.events)).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    self.metrics.decode_errors.inc();
                    tracing::warn!(%error, "undecodable TensorRT-LLM events; resetting the view");
                    if self
                        .tx
                        .send(SourceMsg::Reset(ResetReason::EventsLost))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
            tokio::time::sleep(self.interval).await;
        }
    }
}
