//! Prometheus metrics of `kv-sidecar serve` (`GET /metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    pub model: String,
    pub r#type: &'static str,
    /// applied | duplicate | unknown_worker
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// Shared by all serve tasks; cheap to clone.
#[derive(Clone)]
pub struct ServeMetrics {
    pub workers: Family<ModelLabel, Gauge>,
    pub index_entries: Family<ModelLabel, Gauge>,
    pub index_blocks: Family<ModelLabel, Gauge>,
    pub events: Family<EventLabel, Counter>,
    pub gaps: Family<ModelLabel, Counter>,
    pub sync_requests: Family<ModelLabel, Counter>,
    pub rejected_blocks: Family<ModelLabel, Counter>,
    pub workers_expired: Family<ModelLabel, Counter>,
    pub workers_unreachable: Family<ModelLabel, Counter>,
    pub workers_refused: Family<ModelLabel, Counter>,
    pub workers_block_size_mismatch: Family<ModelLabel, Counter>,
    /// NATS messages that did not decode or named an unconfigured model.
    pub malformed: Family<KindLabel, Counter>,
    pub version: Family<ModelLabel, Gauge>,
    pub subscribers: Gauge,
    pub snapshots: Family<ReasonLabel, Counter>,
    pub snapshot_bytes: Histogram,
    pub gateway_reports: Family<KindLabel, Counter>,
    pub inflight: Family<ModelLabel, Gauge>,
    pub inflight_dropped: Family<ReasonLabel, Counter>,
    pub tokenize_seconds: Histogram,
    pub tokenize_cache_hits: Counter,
    pub tokenize_busy: Counter,
    pub tokenize_cache_misses: Counter,
    pub nats_connected: Gauge,
    pub fleet_unheard: Gauge,
}

impl ServeMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            workers: Family::default(),
            index_entries: Family::default(),
            index_blocks: Family::default(),
            events: Family::default(),
            gaps: Family::default(),
            sync_requests: Family::default(),
            rejected_blocks: Family::default(),
            workers_expired: Family::default(),
            workers_unreachable: Family::default(),
            workers_refused: Family::default(),
            workers_block_size_mismatch: Family::default(),
            malformed: Family::default(),
            version: Family::default(),
            subscribers: Gauge::default(),
            snapshots: Family::default(),
            snapshot_bytes: Histogram::new(exponential_buckets(1024.0, 4.0, 10)),
            gateway_reports: Family::default(),
            inflight: Family::default(),
            inflight_dropped: Family::default(),
            tokenize_seconds: Histogram::new(exponential_buckets(1e-5, 3.0, 12)),
            tokenize_cache_hits: Counter::default(),
            tokenize_busy: Counter::default(),
            tokenize_cache_misses: Counter::default(),
            nats_connected: Gauge::default(),
            fleet_unheard: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("kvmesh_serve");
        r.register("workers", "Registered workers", m.workers.clone());
        r.register(
            "index_entries",
            "Indexed (block, worker) entries",
            m.index_entries.clone(),
        );
        r.register(
            "index_blocks",
            "Distinct indexed blocks",
            m.index_blocks.clone(),
        );
        r.register(
            "events",
            "Relay KV events by type and status",
            m.events.clone(),
        );
        r.register(
            "gaps",
            "Holes seen in relays' event sequences",
            m.gaps.clone(),
        );
        r.register(
            "sync_requests",
            "Full-state requests sent to relays",
            m.sync_requests.clone(),
        );
        r.register(
            "rejected_blocks",
            "Blocks not indexed because max_index_entries was reached",
            m.rejected_blocks.clone(),
        );
        r.register(
            "workers_expired",
            "Workers removed because their heartbeats stopped",
            m.workers_expired.clone(),
        );
        r.register(
            "workers_unreachable",
            "Workers removed because their relay could not reach the engine",
            m.workers_unreachable.clone(),
        );
        r.register(
            "workers_refused",
            "Registrations refused because max_workers was reached",
            m.workers_refused.clone(),
        );
        r.register(
            "workers_block_size_mismatch",
            "Workers refused because their relay's block size differs from the model's",
            m.workers_block_size_mismatch.clone(),
        );
        r.register(
            "malformed_messages",
            "NATS messages skipped because they did not decode, by subject kind",
            m.malformed.clone(),
        );
        r.register("state_version", "Fleet view version", m.version.clone());
        r.register(
            "stream_subscribers",
            "Connected state stream subscribers",
            m.subscribers.clone(),
        );
        r.register(
            "stream_snapshots",
            "Snapshots sent to subscribers, by reason",
            m.snapshots.clone(),
        );
        r.register(
            "stream_snapshot_bytes",
            "Encoded size of snapshots sent",
            m.snapshot_bytes.clone(),
        );
        r.register(
            "gateway_reports",
            "Gateway reports by kind: received from gateways (stream) and other sidecars (nats), and `gone` ones this sidecar made",
            m.gateway_reports.clone(),
        );
        r.register(
            "inflight_requests",
            "Routing decisions awaiting completion",
            m.inflight.clone(),
        );
        r.register(
            "inflight_dropped",
            "In-flight decisions dropped without completion, by reason",
            m.inflight_dropped.clone(),
        );
        r.register(
            "tokenize_seconds",
            "Latency of /v1/tokenize requests",
            m.tokenize_seconds.clone(),
        );
        r.register(
            "tokenize_cache_hits",
            "Text segments answered from the token cache",
            m.tokenize_cache_hits.clone(),
        );
        r.register(
            "tokenize_cache_misses",
            "Text segments that had to be tokenized",
            m.tokenize_cache_misses.clone(),
        );
        r.register(
            "tokenize_busy",
            "/v1/tokenize requests refused while tokenize.max_inflight_bytes were being tokenized",
            m.tokenize_busy.clone(),
        );
        r.register(
            "nats_connected",
            "1 while connected to NATS",
            m.nats_connected.clone(),
        );
        r.register(
            "fleet_unheard",
            "1 while NATS delivers nothing to this sidecar (down, hung or not reached yet): the fleet is kept as last heard and filters route approximately",
            m.fleet_unheard.clone(),
        );
        m.fleet_unheard.set(1);
        m
    }

    pub fn model(model: &str) -> ModelLabel {
        ModelLabel {
            model: model.to_owned(),
        }
    }
}
