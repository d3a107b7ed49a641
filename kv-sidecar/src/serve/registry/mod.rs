//! One model's fleet registry: the pure state machine behind `serve`.
//!
//! It owns the model's authoritative `FleetView` and everything that decides
//! what goes into it: membership (`membership`), the relays' event sequences
//! and their gaps (`events`), engine load and gateways' in-flight decisions
//! (`load`). Each input queues fleet changes; [`FleetRegistry::commit`] turns
//! them into the next delta for the stream.
//!
//! Nothing here waits, sends or reads a clock: every time-dependent call takes
//! `now`, and what must go out (a full-state request, a delta) is returned to
//! the caller. So the same sequence of inputs and instants always gives the
//! same deltas, which is what the unit tests rely on. Metrics and logs are
//! recorded here because they describe the decisions made here.

mod events;
mod load;
mod membership;
#[cfg(test)]
mod testing;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use router_core::fleet::FleetView;
use router_core::protocol::{SyncSeen, WorkerInfo, WorkerLoad};
use router_core::state_stream::{Change, LoadReport, StateUpdate};

use crate::serve::config::{ModelConfig, StateConfig};
use crate::serve::inflight::InFlight;
use crate::serve::metrics::{ModelLabel, ServeMetrics};
use crate::serve::seq::SeqTracker;

/// A model with no changes still gets an (empty) delta this often, so filters
/// can tell a quiet fleet from a dead sidecar (they go stale after silence).
const KEEPALIVE: Duration = Duration::from_secs(1);
/// Heartbeats are collected this long before readiness is considered: until
/// then, "every known worker is in sync" may just mean none was heard yet.
const DISCOVERY: Duration = Duration::from_millis(1500);

/// A relay that must republish its full state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncRequest {
    pub model: String,
    pub worker_id: String,
    /// The last event seen on a live subscription, when a hole in it is
    /// what asks: a full state the relay publishes after it answers too.
    pub seen: Option<SyncSeen>,
}

struct WorkerMeta {
    info: WorkerInfo,
    last_heartbeat: Instant,
    tracker: SeqTracker,
    /// `last_seq` of the previous heartbeat: events up to it should have
    /// arrived by now, so being behind it means some were lost.
    previous_heartbeat_seq: u64,
    last_sync_request: Option<Instant>,
    engine: WorkerLoad,
    published_load: LoadReport,
}

pub struct FleetRegistry {
    config: ModelConfig,
    limits: StateConfig,
    fleet: FleetView,
    workers: HashMap<String, WorkerMeta>,
    inflight: InFlight,
    /// Workers refused because their relay hashes with another block size,
    /// with that size: logged and counted once per worker and size, not on
    /// every heartbeat.
    mismatched_block_size: HashMap<String, u32>,
    /// Changes since the last commit, in the order they happened.
    pending: Vec<Change>,
    /// This sidecar does not hear the fleet (its NATS connection is down, or
    /// not up yet): silent workers are kept as last heard, and every update
    /// says the view is not current.
    fleet_unheard: bool,
    /// `fleet_unheard` changed since the last commit, which is then due at once.
    feed_changed: bool,
    last_commit: Instant,
    metrics: ServeMetrics,
    label: ModelLabel,
}

impl FleetRegistry {
    /// An empty registry; `now` starts the keepalive clock.
    pub fn new(
        config: ModelConfig,
        limits: &StateConfig,
        metrics: ServeMetrics,
        now: Instant,
    ) -> Self {
        Self {
            fleet: FleetView::new(&config.name, limits.max_index_entries),
            label: ServeMetrics::model(&config.name),
            config,
            limits: limits.clone(),
            workers: HashMap::new(),
            inflight: InFlight::default(),
            mismatched_block_size: HashMap::new(),
            pending: Vec::new(),
            fleet_unheard: true,
            feed_changed: false,
            last_commit: now,
            metrics,
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The committed view: what every subscriber has (or gets in a snapshot).
    pub fn fleet(&self) -> &FleetView {
        &self.fleet
    }

    /// Whether this sidecar does not hear the fleet: its view is kept, not
    /// current.
    pub fn fleet_unheard(&self) -> bool {
        self.fleet_unheard
    }

    /// The committed view as one update, for a new or lagged subscriber.
    pub fn snapshot(&self) -> StateUpdate {
        StateUpdate {
            fleet_unheard: self.fleet_unheard,
            ..self.fleet.snapshot()
        }
    }

    /// Our NATS connection went down. Workers fall silent because we do, not
    /// because they died: they are kept as last heard instead of expiring,
    /// and the updates tell routers the view is not current.
    pub fn feed_lost(&mut self) {
        if !self.fleet_unheard {
            self.fleet_unheard = true;
            self.feed_changed = true;
        }
    }

    /// NATS delivers again after `unheard_for` without it. That silence was
    /// ours, not the workers': it does not count towards their timeouts.
    /// Only it, so a feed that comes and goes never keeps a dead worker.
    pub fn feed_resumed(&mut self, unheard_for: Duration, now: Instant) {
        for meta in self.workers.values_mut() {
            meta.last_heartbeat = (meta.last_heartbeat + unheard_for).min(now);
        }
        if self.fleet_unheard {
            self.fleet_unheard = false;
            self.feed_changed = true;
        }
    }

    /// Registered workers with their latest heartbeat and whether their
    /// blocks are exact (sorted by id).
    pub fn worker_infos(&self) -> Vec<(&WorkerInfo, bool)> {
        let mut infos: Vec<(&WorkerInfo, bool)> = self
            .workers
            .values()
            .map(|m| (&m.info, m.tracker.in_sync()))
            .collect();
        infos.sort_by(|a, b| a.0.worker_id.cmp(&b.0.worker_id));
        infos
    }

    pub fn all_in_sync(&self) -> bool {
        self.workers.values().all(|m| m.tracker.in_sync())
    }

    /// Removes workers whose heartbeats stopped and decisions whose
    /// completion never came. A worker's silence counts only up to
    /// `heard_at`, when NATS last delivered anything: past that it may be
    /// ours (see `state.rs`), and while the fleet is unheard it is.
    pub fn expire(&mut self, now: Instant, heard_at: Instant) {
        if !self.fleet_unheard {
            self.expire_workers(heard_at.min(now));
        }
        self.expire_decisions(now);
    }

    /// The delta of everything since the last commit, or an empty one when
    /// the model was quiet for [`KEEPALIVE`]; `None` while nothing is due.
    pub fn commit(&mut self, now: Instant) -> Option<StateUpdate> {
        if self.pending.is_empty()
            && !self.feed_changed
            && now.duration_since(self.last_commit) < KEEPALIVE
        {
            return None;
        }
        self.last_commit = now;
        self.feed_changed = false;
        let (mut update, stats) = self.fleet.commit(std::mem::take(&mut self.pending));
        update.fleet_unheard = self.fleet_unheard;
        let (metrics, label) = (&self.metrics, &self.label);
        if stats.rejected_blocks > 0 {
            metrics
                .rejected_blocks
                .get_or_create(label)
                .inc_by(stats.rejected_blocks as u64);
        }
        let gauges = [
            (&metrics.workers, self.workers.len() as i64),
            (&metrics.index_entries, self.fleet.index().entries() as i64),
            (&metrics.index_blocks, self.fleet.index().blocks() as i64),
            (&metrics.version, self.fleet.version() as i64),
            (&metrics.inflight, self.inflight.count() as i64),
        ];
        for (gauge, value) in gauges {
            gauge.get_or_create(label).set(value);
        }
        Some(update)
    }
}

/// Whether the initial state is loaded, `since_start` after the state task
/// started: after discovery, once every model's workers are in sync, or
/// regardless once `timeout` (`initial_sync_timeout_ms`) passed, since a
/// relay that never answers must not keep the gateway unready forever.
pub fn initial_sync_done(since_start: Duration, all_in_sync: bool, timeout: Duration) -> bool {
    since_start >= DISCOVERY && (all_in_sync || since_start >= timeout)
}

#[cfg(test)]
mod tests {
    use router_core::state_stream::state_update;

    use super::testing::{heartbeat, limits, Harness, MODEL};
    use super::*;

    fn delta_len(update: &StateUpdate) -> Option<usize> {
        match &update.kind {
            Some(state_update::Kind::Delta(delta)) => Some(delta.changes.len()),
            _ => None,
        }
    }

    #[test]
    fn without_nats_the_workers_are_kept_and_every_update_says_unheard() {
        let mut h = Harness::new(limits());
        h.registry.heartbeat(heartbeat("w1", 7, 0), h.at(0));
        let joined = h.registry.commit(h.at(0)).expect("joined");
        assert!(!joined.fleet_unheard);

        h.registry.feed_lost();
        let lost = h.registry.commit(h.at(1)).expect("due at once");
        assert!(lost.fleet_unheard);
        assert!(h.registry.snapshot().fleet_unheard);
        // Far past worker_timeout_ms (2.5 s): still there.
        h.expire(60_000);
        let keepalive = h.registry.commit(h.at(60_000)).expect("keepalive");
        assert_eq!(delta_len(&keepalive), Some(0));
        assert!(keepalive.fleet_unheard);
        assert_eq!(h.registry.worker_infos().len(), 1);

        // Back after 60 s unheard: the worker's silence before it counts,
        // the outage does not.
        h.registry
            .feed_resumed(Duration::from_secs(60), h.at(61_000));
        let restored = h.registry.commit(h.at(61_001)).expect("due at once");
        assert!(!restored.fleet_unheard);
        assert!(!h.registry.snapshot().fleet_unheard);
        h.expire(62_500);
        assert_eq!(h.registry.worker_infos().len(), 1);
        h.expire(62_501);
        assert_eq!(h.registry.worker_infos().len(), 0);
    }

    #[test]
    fn a_silence_counts_only_up_to_when_nats_last_delivered() {
        let mut h = Harness::new(limits());
        h.registry.heartbeat(heartbeat("w1", 7, 0), h.at(0));
        h.registry.heartbeat(heartbeat("w2", 7, 0), h.at(0));
        // Nothing delivered since 1 s: nobody's silence is theirs yet.
        h.registry.expire(h.at(10_000), h.at(1_000));
        assert_eq!(h.registry.worker_infos().len(), 2);
        // w2 was heard at 2 s; then something arrived at 2.501 s.
        h.registry.heartbeat(heartbeat("w2", 7, 0), h.at(2_000));
        h.registry.expire(h.at(10_000), h.at(2_501));
        let left: Vec<&str> = h
            .registry
            .worker_infos()
            .iter()
            .map(|(info, _)| info.worker_id.as_str())
            .collect();
        assert_eq!(left, ["w2"]);
    }

    #[test]
    fn a_commit_is_due_with_changes_or_after_a_quiet_keepalive() {
        let mut h = Harness::new(limits());
        assert_eq!(h.registry.commit(h.at(999)), None);
        let keepalive = h.registry.commit(h.at(1000)).expect("keepalive");
        assert_eq!((keepalive.version, delta_len(&keepalive)), (1, Some(0)));
        h.registry.heartbeat(heartbeat("w1", 7, 0), h.at(1001));
        let joined = h
            .registry
            .commit(h.at(1001))
            .expect("changes go out at once");
        assert_eq!((joined.version, delta_len(&joined)), (2, Some(1)));
        assert_eq!(h.registry.commit(h.at(2000)), None);
        assert!(h.registry.commit(h.at(2001)).is_some());
        let workers = h.metrics.workers.get_or_create(&ServeMetrics::model(MODEL));
        assert_eq!(workers.get(), 1);
        let version = h.metrics.version.get_or_create(&ServeMetrics::model(MODEL));
        assert_eq!(version.get(), 3);
    }

    #[test]
    fn initial_sync_waits_for_discovery_then_for_sync_or_the_timeout() {
        let at = Duration::from_millis;
        assert!(!initial_sync_done(at(1499), true, at(5000)));
        assert!(initial_sync_done(at(1500), true, at(5000)));
        assert!(!initial_sync_done(at(4999), false, at(5000)));
        assert!(initial_sync_done(at(5000), false, at(5000)));
    }

    #[test]
    fn workers_are_listed_by_id_with_their_sync_state() {
        let mut h = Harness::new(limits());
        h.registry.heartbeat(heartbeat("w2", 7, 0), h.at(0));
        h.registry.heartbeat(heartbeat("w1", 7, 0), h.at(0));
        let ids: Vec<(&str, bool)> = h
            .registry
            .worker_infos()
            .into_iter()
            .map(|(info, in_sync)| (info.worker_id.as_str(), in_sync))
            .collect();
        assert_eq!(ids, [("w1", false), ("w2", false)]);
        assert!(!h.registry.all_in_sync());
    }
}
