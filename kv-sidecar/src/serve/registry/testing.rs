//! A registry driven by hand in unit tests: instants are offsets from a fixed
//! start, and every committed delta is applied to a replica, as a filter
//! would, so a test sees both the changes and the fleet they lead to.

use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use router_core::fleet::{FleetView, WorkerEntry};
use router_core::gateway::{RequestPhase, RequestProgress, RoutingDecision};
use router_core::protocol::{
    kv_event, BlocksStored, FullState, KvEvent, KvEventBatch, WorkerInfo, WorkerRole,
};
use router_core::state_stream::{change, state_update, Change, StateUpdate};

use super::FleetRegistry;
use crate::serve::config::{Config, StateConfig};
use crate::serve::metrics::{ModelLabel, ServeMetrics};

pub const MODEL: &str = "m";
pub const BLOCK_SIZE: u32 = 16;

/// Small limits, so that tests reach them.
pub fn limits() -> StateConfig {
    StateConfig {
        worker_timeout_ms: 2500,
        max_workers: 2,
        max_inflight_requests: 2,
        inflight_ttl_ms: 10_000,
        sync_retry_ms: 1000,
        ..StateConfig::default()
    }
}

pub struct Harness {
    pub registry: FleetRegistry,
    pub metrics: ServeMetrics,
    replica: FleetView,
    start: Instant,
}

impl Harness {
    pub fn new(limits: StateConfig) -> Self {
        let yaml = format!(
            "nats: {{url: 'nats://127.0.0.1:4222'}}\n\
             listen: {{http: '127.0.0.1:1', grpc: '127.0.0.1:2'}}\n\
             models: [{{name: {MODEL}, block_size: {BLOCK_SIZE}}}]\n"
        );
        let config = Config::parse(&yaml, "test").expect("test config");
        let model = config.models[0].clone();
        let metrics = ServeMetrics::new(&mut Registry::default());
        let start = Instant::now();
        let mut registry = FleetRegistry::new(model, &limits, metrics.clone(), start);
        // Connected to NATS from the start, without a commit to announce it.
        registry.fleet_unheard = false;
        Self {
            registry,
            metrics,
            replica: FleetView::new(MODEL, limits.max_index_entries),
            start,
        }
    }

    /// Expires at `ms`, NATS having delivered just then.
    pub fn expire(&mut self, ms: u64) {
        self.registry.expire(self.at(ms), self.at(ms));
    }

    /// `ms` milliseconds after the registry was created.
    pub fn at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms)
    }

    /// Commits at `ms` and returns the delta's changes (none when nothing
    /// was due or only a keepalive was), after applying it to the replica,
    /// which must then equal the registry's view.
    pub fn commit(&mut self, ms: u64) -> Vec<Change> {
        let Some(update) = self.registry.commit(self.at(ms)) else {
            return Vec::new();
        };
        self.replica
            .apply(&update)
            .expect("delta follows the replica");
        assert_eq!(self.replica.snapshot(), self.registry.fleet().snapshot());
        changes(update)
    }

    /// A worker as the subscribers see it.
    pub fn worker(&self, worker_id: &str) -> Option<&WorkerEntry> {
        self.replica.worker(worker_id)
    }

    /// The worker's blocks as the subscribers see them, sorted.
    pub fn blocks(&self, worker_id: &str) -> Vec<u64> {
        let Some(entry) = self.replica.worker(worker_id) else {
            return Vec::new();
        };
        let mut blocks: Vec<u64> = self
            .replica
            .index()
            .worker_blocks(entry.slot)
            .map(|h| h.0)
            .collect();
        blocks.sort_unstable();
        blocks
    }

    /// Value of a per-model counter.
    pub fn count(&self, family: impl Fn(&ServeMetrics) -> &Family<ModelLabel, Counter>) -> u64 {
        family(&self.metrics)
            .get_or_create(&ServeMetrics::model(MODEL))
            .get()
    }
}

fn changes(update: StateUpdate) -> Vec<Change> {
    match update.kind {
        Some(state_update::Kind::Delta(delta)) => delta.changes,
        other => panic!("a commit must give a delta, got {other:?}"),
    }
}

/// The kind of each change with its worker, e.g. `"joined w1"`, for
/// asserting on a delta's shape.
pub fn kinds(changes: &[Change]) -> Vec<String> {
    changes
        .iter()
        .map(|c| match &c.kind {
            Some(change::Kind::Joined(j)) => format!("joined {}", j.worker_id),
            Some(change::Kind::Left(l)) => format!("left {}", l.worker_id),
            Some(change::Kind::Stored(b)) => format!("stored {} {:?}", b.worker_id, b.hashes),
            Some(change::Kind::Removed(b)) => format!("removed {} {:?}", b.worker_id, b.hashes),
            Some(change::Kind::Cleared(c)) => format!("cleared {}", c.worker_id),
            Some(change::Kind::Load(l)) => format!(
                "load {} running={} active={} queued={} routed={}",
                l.worker_id, l.running, l.active_blocks, l.queued_prefill_tokens, l.routed_requests
            ),
            Some(change::Kind::Computing(c)) => {
                format!("computing {} {:?}", c.worker_id, c.strides)
            }
            None => "empty".to_owned(),
        })
        .collect()
}

/// A healthy decode worker's heartbeat.
pub fn heartbeat(worker_id: &str, epoch: u64, last_seq: u64) -> WorkerInfo {
    WorkerInfo {
        worker_id: worker_id.to_owned(),
        model: MODEL.to_owned(),
        address: format!("{worker_id}.pool:8000"),
        role: WorkerRole::Decode as i32,
        block_size: BLOCK_SIZE,
        epoch,
        last_seq,
        ..WorkerInfo::default()
    }
}

pub fn batch(worker_id: &str, epoch: u64, events: Vec<KvEvent>) -> KvEventBatch {
    KvEventBatch {
        worker_id: worker_id.to_owned(),
        model: MODEL.to_owned(),
        epoch,
        events,
        timestamp_ms: 0,
    }
}

pub fn stored(seq: u64, hashes: &[u64]) -> KvEvent {
    KvEvent {
        seq,
        kind: Some(kv_event::Kind::Stored(BlocksStored {
            parent: None,
            hashes: hashes.to_vec(),
        })),
    }
}

pub fn full_state(seq: u64, part: u32, last: bool, hashes: &[u64]) -> KvEvent {
    KvEvent {
        seq,
        kind: Some(kv_event::Kind::FullState(FullState {
            part,
            last,
            hashes: hashes.to_vec(),
        })),
    }
}

/// A decision for `worker_id`, prefilled there too.
pub fn decision(request_id: &str, worker_id: &str, blocks: u32, tokens: u64) -> RoutingDecision {
    RoutingDecision {
        model: MODEL.to_owned(),
        request_id: request_id.to_owned(),
        worker_id: worker_id.to_owned(),
        prefill_worker_id: String::new(),
        prompt_blocks: blocks,
        cached_blocks: 0,
        prefill_tokens: tokens,
        computing: Vec::new(),
    }
}

pub fn progress(request_id: &str, phase: RequestPhase) -> RequestProgress {
    RequestProgress {
        model: MODEL.to_owned(),
        request_id: request_id.to_owned(),
        phase: phase as i32,
    }
}
