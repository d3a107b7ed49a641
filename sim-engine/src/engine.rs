//! The engine loop: one task that repeatedly schedules an iteration, sleeps
//! for its simulated duration ÷ speedup, applies it, and publishes the
//! iteration's KV events and metrics.
//!
//! Simulated time is authoritative and deterministic: the clock advances by
//! exactly each iteration's modelled duration while busy, and jumps to the
//! real clock (× speedup) when a request arrives at an idle engine. A lone
//! request's time to first token is therefore exactly the sum of its
//! iterations' modelled durations, however loaded the host CPU is.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::kv_cache::{CacheError, CachedBlock};
use crate::kv_events::publisher::EventSink;
use crate::metrics::{EngineMetrics, LoadSnapshot};
use crate::scheduler::{NewSequence, Scheduler};
use crate::timing::TimingModel;

/// How far real time may fall behind the pacing deadline before the engine
/// stops trying to catch up (catching up would burst iterations).
const MAX_PACING_LAG: Duration = Duration::from_millis(50);
/// Re-check interval when work exists but nothing could be scheduled.
const STALL_RETRY: Duration = Duration::from_millis(10);

struct EngineState {
    scheduler: Scheduler,
    /// Simulated seconds since start.
    clock: f64,
}

pub struct Engine {
    state: Mutex<EngineState>,
    work: Notify,
    timing: TimingModel,
    speedup: f64,
    started: Instant,
    metrics: Arc<EngineMetrics>,
    events: Option<EventSink>,
}

/// `/sim/cache` content.
#[derive(Debug, Clone)]
pub struct CacheView {
    pub blocks: Vec<CachedBlock>,
    pub eviction_order: Vec<u64>,
    pub num_blocks: usize,
    pub num_free: usize,
}

impl Engine {
    pub fn new(
        scheduler: Scheduler,
        timing: TimingModel,
        speedup: f64,
        metrics: Arc<EngineMetrics>,
        events: Option<EventSink>,
    ) -> Self {
        Self {
            state: Mutex::new(EngineState {
                scheduler,
                clock: 0.0,
            }),
            work: Notify::new(),
            timing,
            speedup,
            started: Instant::now(),
            metrics,
            events,
        }
    }

    fn lock(&self) -> MutexGuard<'_, EngineState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn real_as_simulated(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * self.speedup
    }

    /// Queues a request; its updates arrive on `request.updates`.
    pub fn submit(&self, request: NewSequence) {
        let mut state = self.lock();
        if state.scheduler.is_idle() {
            state.clock = state.clock.max(self.real_as_simulated());
        }
        let now = state.clock;
        state.scheduler.submit(request, now);
        self.record_metrics(&state, &[]);
        drop(state);
        self.work.notify_one();
    }

    /// Stores transferred KV blocks of `tokens` in the cache (see
    /// `KvCache::import_prefix`); their stored events go out like any others.
    pub fn import_prefix(&self, tokens: &[u32]) -> usize {
        let mut state = self.lock();
        let imported = state.scheduler.cache_mut().import_prefix(tokens);
        let events = state.scheduler.cache_mut().take_events();
        self.record_metrics(&state, &[]);
        drop(state);
        if let Some(sink) = &self.events {
            sink.publish(events);
        }
        imported
    }

    pub fn load(&self) -> LoadSnapshot {
        load_of(&self.lock())
    }

    pub fn cache_view(&self) -> CacheView {
        let state = self.lock();
        let cache = state.scheduler.cache();
        CacheView {
            blocks: cache.cached_blocks(),
            eviction_order: cache.eviction_order(),
            num_blocks: cache.num_blocks(),
            num_free: cache.num_free(),
        }
    }

    /// Seq of the next KV event batch, if events are enabled.
    pub fn next_event_seq(&self) -> Option<u64> {
        self.events.as_ref().map(EventSink::next_seq)
    }

    /// Drops all cached blocks (vLLM `POST /reset_prefix_cache`).
    pub fn reset_prefix_cache(&self) -> Result<(), CacheError> {
        let mut state = self.lock();
        state.scheduler.cache_mut().clear()?;
        let events = state.scheduler.cache_mut().take_events();
        drop(state);
        if let Some(sink) = &self.events {
            sink.publish(events);
        }
        Ok(())
    }

    /// Runs iterations forever.
    pub async fn run(self: Arc<Self>) {
        let mut deadline = Instant::now();
        loop {
            let scheduled = {
                let mut state = self.lock();
                if state.scheduler.is_idle() {
                    None
                } else {
                    let step = state.scheduler.schedule();
                    Some((step, state.clock))
                }
            };
            let Some((step, start_clock)) = scheduled else {
                self.work.notified().await;
                deadline = Instant::now();
                continue;
            };
            if step.is_empty() {
                tokio::select! {
                    _ = self.work.notified() => {}
                    _ = tokio::time::sleep(STALL_RETRY) => {}
                }
                continue;
            }

            let seconds = self.timing.iteration_seconds(&step.shape);
            deadline += Duration::from_secs_f64(seconds / self.speedup);
            let now = Instant::now();
            if deadline + MAX_PACING_LAG < now {
                deadline = now;
            }
            tokio::time::sleep_until(deadline).await;

            let mut state = self.lock();
            let end = start_clock + seconds;
            state.clock = state.clock.max(end);
            let first_tokens = state.scheduler.complete(step, end);
            let events = state.scheduler.cache_mut().take_events();
            self.record_metrics(&state, &first_tokens);
            drop(state);
            if let Some(sink) = &self.events {
                sink.publish(events);
            }
        }
    }

    fn record_metrics(&self, state: &EngineState, first_tokens: &[f64]) {
        self.metrics
            .record(load_of(state), state.scheduler.counters(), first_tokens);
    }
}

fn load_of(state: &EngineState) -> LoadSnapshot {
    LoadSnapshot {
        running: state.scheduler.num_running(),
        waiting: state.scheduler.num_waiting(),
        kv_cache_usage: state.scheduler.cache().usage(),
    }
}
