//! The relay's own Prometheus metrics (`GET /metrics`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::normalize::NormStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// Counters shared by all relay tasks; cheap to clone.
#[derive(Clone)]
pub struct RelayMetrics {
    pub engine_events: Family<TypeLabel, Counter>,
    pub published_events: Family<TypeLabel, Counter>,
    pub engine_batches: Counter,
    pub decode_errors: Counter,
    pub foreign_rank_batches: Counter,
    pub gaps: Counter,
    pub replays: Family<ResultLabel, Counter>,
    pub resets: Family<ReasonLabel, Counter>,
    pub skipped_blocks: Family<ReasonLabel, Counter>,
    pub publish_errors: Family<TypeLabel, Counter>,
    pub dropped: Family<TypeLabel, Counter>,
    pub load_scrape_errors: Counter,
    pub full_states: Counter,
    pub sync_requests_coalesced: Counter,
    pub blocks: Gauge,
    pub last_event_age_seconds: Gauge<f64, AtomicU64>,
    pub nats_connected: Gauge,
    pub engine_connected: Gauge,
    last_event_unix_ms: Arc<AtomicU64>,
    nats_up: Arc<AtomicBool>,
}

impl RelayMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            engine_events: Family::default(),
            published_events: Family::default(),
            engine_batches: Counter::default(),
            decode_errors: Counter::default(),
            foreign_rank_batches: Counter::default(),
            gaps: Counter::default(),
            replays: Family::default(),
            resets: Family::default(),
            skipped_blocks: Family::default(),
            publish_errors: Family::default(),
            dropped: Family::default(),
            load_scrape_errors: Counter::default(),
            full_states: Counter::default(),
            sync_requests_coalesced: Counter::default(),
            blocks: Gauge::default(),
            last_event_age_seconds: Gauge::default(),
            nats_connected: Gauge::default(),
            engine_connected: Gauge::default(),
            last_event_unix_ms: Arc::new(AtomicU64::new(0)),
            nats_up: Arc::new(AtomicBool::new(false)),
        };
        let r = registry.sub_registry_with_prefix("kvmesh_relay");
        r.register(
            "engine_events",
            "Engine KV events received, by type",
            m.engine_events.clone(),
        );
        r.register(
            "engine_batches",
            "Engine event batches received",
            m.engine_batches.clone(),
        );
        r.register(
            "published_events",
            "Normalized events published, by type",
            m.published_events.clone(),
        );
        r.register(
            "decode_errors",
            "Engine messages that could not be decoded",
            m.decode_errors.clone(),
        );
        r.register(
            "foreign_rank_batches",
            "Engine batches stamped with another data-parallel rank than --data-parallel-rank (skipped)",
            m.foreign_rank_batches.clone(),
        );
        r.register(
            "gaps",
            "Holes detected in the engine's event sequence",
            m.gaps.clone(),
        );
        r.register(
            "replays",
            "Replay requests to the engine, by result",
            m.replays.clone(),
        );
        r.register(
            "resets",
            "Worker resets published, by reason",
            m.resets.clone(),
        );
        r.register(
            "skipped_blocks",
            "Engine blocks left out of the view, by reason",
            m.skipped_blocks.clone(),
        );
        r.register(
            "publish_errors",
            "NATS publish failures, by message type",
            m.publish_errors.clone(),
        );
        r.register(
            "dropped",
            "Messages dropped from full buffers, by buffer",
            m.dropped.clone(),
        );
        r.register(
            "load_scrape_errors",
            "Failed scrapes of the engine's metrics",
            m.load_scrape_errors.clone(),
        );
        r.register(
            "full_states",
            "Full-state snapshots published",
            m.full_states.clone(),
        );
        r.register(
            "sync_requests_coalesced",
            "Full-state requests answered by one already on its way to the requester",
            m.sync_requests_coalesced.clone(),
        );
        r.register(
            "blocks",
            "Blocks in the worker's published view",
            m.blocks.clone(),
        );
        r.register(
            "last_event_age_seconds",
            "Seconds since the last engine event batch (-1 before any)",
            m.last_event_age_seconds.clone(),
        );
        r.register(
            "nats_connected",
            "1 while connected to NATS",
            m.nats_connected.clone(),
        );
        r.register(
            "engine_connected",
            "1 while the engine's event source is reachable",
            m.engine_connected.clone(),
        );
        m
    }

    pub fn engine_event(&self, kind: &'static str, n: u64) {
        self.engine_events
            .get_or_create(&TypeLabel { r#type: kind })
            .inc_by(n);
    }

    pub fn published(&self, kind: &'static str) {
        self.published_events
            .get_or_create(&TypeLabel { r#type: kind })
            .inc();
    }

    pub fn reset(&self, reason: &'static str) {
        self.resets.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn replay(&self, result: &'static str) {
        self.replays.get_or_create(&ResultLabel { result }).inc();
    }

    pub fn drop_message(&self, buffer: &'static str) {
        self.dropped
            .get_or_create(&TypeLabel { r#type: buffer })
            .inc();
    }

    pub fn publish_error(&self, kind: &'static str) {
        self.publish_errors
            .get_or_create(&TypeLabel { r#type: kind })
            .inc();
    }

    pub fn record_norm_stats(&self, stats: &NormStats) {
        let skipped = [
            ("unknown_parent", stats.unknown_parent),
            ("unknown_removed", stats.unknown_removed),
            ("block_size_mismatch", stats.block_size_mismatch),
            ("token_count_mismatch", stats.token_count_mismatch),
            ("lora_without_name", stats.lora_without_name),
            ("ignored_medium", stats.ignored_medium),
            ("partial_attention_group", stats.partial_attention_group),
        ];
        for (reason, n) in skipped {
            self.skipped_blocks(reason, n);
        }
    }

    /// Counts blocks left out of the view, by reason.
    pub fn skipped_blocks(&self, reason: &'static str, n: u64) {
        if n > 0 {
            self.skipped_blocks
                .get_or_create(&ReasonLabel { reason })
                .inc_by(n);
        }
    }

    pub fn mark_event_received(&self) {
        self.last_event_unix_ms.store(unix_ms(), Ordering::Relaxed);
    }

    pub fn set_nats_up(&self, up: bool) {
        self.nats_up.store(up, Ordering::Relaxed);
        self.nats_connected.set(i64::from(up));
    }

    pub fn nats_up(&self) -> bool {
        self.nats_up.load(Ordering::Relaxed)
    }

    /// Refreshes gauges derived from time; called before each scrape.
    pub fn refresh(&self) {
        let last = self.last_event_unix_ms.load(Ordering::Relaxed);
        let age = if last == 0 {
            -1.0
        } else {
            unix_ms().saturating_sub(last) as f64 / 1000.0
        };
        self.last_event_age_seconds.set(age);
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
