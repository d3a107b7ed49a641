//! Who is in the fleet: a worker joins on its first heartbeat, re-announces
//! itself when its address, data-parallel rank or role changes, and leaves when its relay says
//! the engine is unreachable, when its relay's block size disagrees with the
//! model's, or when its heartbeats stop.

use std::time::{Duration, Instant};

use router_core::protocol::{WorkerInfo, WorkerLoad};
use router_core::state_stream::{change, Change, LoadReport, WorkerJoined, WorkerLeft};

use super::{FleetRegistry, SyncRequest, WorkerMeta};
use crate::serve::metrics::ReasonLabel;
use crate::serve::seq::SeqTracker;

impl FleetRegistry {
    /// Applies a relay heartbeat; returns a full-state request when the
    /// worker's blocks here cannot be trusted to match its engine's.
    pub fn heartbeat(&mut self, info: WorkerInfo, now: Instant) -> Option<SyncRequest> {
        if !self.block_size_agrees(&info) {
            return None;
        }
        if info.engine_unreachable {
            // The relay lives but its engine does not answer: no gateway may
            // route to it. A heartbeat without the flag registers it again,
            // with a full state sync.
            if self.workers.contains_key(&info.worker_id) {
                tracing::warn!(model = %self.config.name, worker = %info.worker_id, "the relay cannot reach its engine; removing the worker");
                self.remove_worker(&info.worker_id);
                self.metrics
                    .workers_unreachable
                    .get_or_create(&self.label)
                    .inc();
            }
            return None;
        }
        if !self.workers.contains_key(&info.worker_id) && !self.join(&info, now) {
            return None;
        }
        let retry = self.sync_retry();
        let meta = self.workers.get_mut(&info.worker_id)?;
        if meta.info.address != info.address
            || meta.info.data_parallel_rank != info.data_parallel_rank
            || meta.info.role != info.role
        {
            self.pending.push(joined(&info));
        }
        let same_epoch = meta.tracker.epoch() == Some(info.epoch);
        let behind = same_epoch && meta.tracker.last_seq() < meta.previous_heartbeat_seq;
        let sync = if !same_epoch || behind || !meta.tracker.in_sync() {
            // Never heard this epoch's events (joined mid-epoch or idle
            // relay), lost its tail, or saw a hole: ask for everything,
            // whatever the relay published before.
            meta.request_sync(&self.config.name, retry, now, None)
        } else {
            None
        };
        meta.previous_heartbeat_seq = if same_epoch { info.last_seq } else { 0 };
        meta.last_heartbeat = now;
        meta.info = info;
        sync
    }

    /// Registers a new worker; false when `max_workers` is reached.
    fn join(&mut self, info: &WorkerInfo, now: Instant) -> bool {
        if self.workers.len() >= self.limits.max_workers {
            self.metrics
                .workers_refused
                .get_or_create(&self.label)
                .inc();
            return false;
        }
        tracing::info!(model = %self.config.name, worker = %info.worker_id, address = %info.address, data_parallel_rank = ?info.data_parallel_rank, "worker joined");
        self.pending.push(joined(info));
        self.workers.insert(
            info.worker_id.clone(),
            WorkerMeta {
                info: info.clone(),
                last_heartbeat: now,
                tracker: SeqTracker::default(),
                previous_heartbeat_seq: 0,
                last_sync_request: None,
                engine: WorkerLoad::default(),
                published_load: LoadReport {
                    worker_id: info.worker_id.clone(),
                    ..LoadReport::default()
                },
            },
        );
        true
    }

    /// False (and the worker out of every view) when the relay hashes blocks
    /// of another size than the model's: every hash it publishes would miss
    /// every hash the filter computes, so routing on it would be silently
    /// wrong. 0 is a relay too old to say.
    fn block_size_agrees(&mut self, info: &WorkerInfo) -> bool {
        let expected = self.config.block_size;
        if info.block_size == 0 || info.block_size == expected {
            self.mismatched_block_size.remove(&info.worker_id);
            return true;
        }
        let known = self.mismatched_block_size.get(&info.worker_id);
        if known != Some(&info.block_size) {
            tracing::error!(
                model = %self.config.name,
                worker = %info.worker_id,
                relay_block_size = info.block_size,
                model_block_size = expected,
                "refusing a worker whose relay's --block-size differs from the model's block_size: its block hashes cannot match the gateway's"
            );
            self.metrics
                .workers_block_size_mismatch
                .get_or_create(&self.label)
                .inc();
            self.mismatched_block_size
                .insert(info.worker_id.clone(), info.block_size);
        }
        if self.workers.contains_key(&info.worker_id) {
            self.remove_worker(&info.worker_id);
        }
        false
    }

    pub(super) fn expire_workers(&mut self, now: Instant) {
        let timeout = Duration::from_millis(self.limits.worker_timeout_ms);
        let mut expired: Vec<String> = self
            .workers
            .values()
            .filter(|m| now.duration_since(m.last_heartbeat) > timeout)
            .map(|m| m.info.worker_id.clone())
            .collect();
        // Map order would make the delta's order differ between runs.
        expired.sort_unstable();
        for worker in expired {
            tracing::warn!(model = %self.config.name, %worker, "worker heartbeats stopped; removing it");
            self.remove_worker(&worker);
            self.metrics
                .workers_expired
                .get_or_create(&self.label)
                .inc();
        }
    }

    /// Drops a worker, its in-flight accounting and its blocks.
    fn remove_worker(&mut self, worker: &str) {
        self.workers.remove(worker);
        let dropped = self.inflight.forget_worker(worker);
        if dropped > 0 {
            self.metrics
                .inflight_dropped
                .get_or_create(&ReasonLabel {
                    reason: "worker_left",
                })
                .inc_by(dropped as u64);
        }
        self.pending.push(Change {
            kind: Some(change::Kind::Left(WorkerLeft {
                worker_id: worker.to_owned(),
            })),
        });
    }
}

fn joined(info: &WorkerInfo) -> Change {
    Change {
        kind: Some(change::Kind::Joined(WorkerJoined {
            worker_id: info.worker_id.clone(),
            address: info.address.clone(),
            role: info.role,
            data_parallel_rank: info.data_parallel_rank,
        })),
    }
}

#[cfg(test)]
mod tests {
    use router_core::protocol::WorkerRole;

    use super::super::testing::{heartbeat, kinds, limits, Harness, MODEL};
    use super::*;

    #[test]
    fn first_heartbeat_joins_and_asks_for_a_full_state() {
        let mut h = Harness::new(limits());
        let sync = h.registry.heartbeat(heartbeat("w1", 7, 0), h.at(0));
        assert_eq!(
            sync,
            Some(SyncRequest {
                model: MODEL.into(),
                worker_id: "w1".into(),
                seen: None,
            })
        );
        assert_eq!(kinds(&h.commit(0)), ["joined w1"]);
        let entry = h.worker("w1").expect("w1 joined");
        assert_eq!(entry.target.address(), "w1.pool:8000");
        assert_eq!(entry.role, WorkerRole::Decode);
        let infos = h.registry.worker_infos();
        assert_eq!(infos.len(), 1);
        assert!(!infos[0].1, "no events heard yet: not in sync");
        // Heartbeats of a known worker change nothing in the fleet.
        h.registry.heartbeat(heartbeat("w1", 7, 0), h.at(100));
        assert!(h.commit(100).is_empty());
    }

    #[test]
    fn new_address_rank_or_role_is_announced_again() {
        let mut h = Harness::new(limits());
        h.registry.heartbeat(heartbeat("w1", 7, 0), h.at(0));
        h.commit(0);
        let moved = WorkerInfo {
            address: "10.9.9.9:8001".into(),
            ..heartbeat("w1", 7, 0)
        };
        h.registry.heartbeat(moved.clone(), h.at(100));
        assert_eq!(kinds(&h.commit(100)), ["joined w1"]);
        assert_eq!(
            h.worker("w1").map(|w| w.target.key()),
            Some("10.9.9.9:8001")
        );
        let ranked = WorkerInfo {
            data_parallel_rank: Some(3),
            ..moved
        };
        h.registry.heartbeat(ranked.clone(), h.at(150));
        assert_eq!(kinds(&h.commit(150)), ["joined w1"]);
        assert_eq!(
            h.worker("w1").map(|w| w.target.key()),
            Some("10.9.9.9:8001#3")
        );
        let prefill = WorkerInfo {
            role: WorkerRole::Prefill as i32,
            ..ranked
        };
        h.registry.heartbeat(prefill, h.at(200));
        assert_eq!(kinds(&h.commit(200)), ["joined w1"]);
        assert_eq!(h.worker("w1").map(|w| w.role), Some(WorkerRole::Prefill));
        assert_eq!(h.registry.worker_infos().len(), 1);
    }

    #[test]
    fn unreachable_engine_removes_the_worker_until_it_answers_again() {
        let mut h = Harness::new(limits());
        h.registry.heartbeat(heartbeat("w1", 7, 0), h.at(0));
        h.commit(0);
        let unreachable = WorkerInfo {
            engine_unreachable: true,
            ..heartbeat("w1", 7, 0)
        };
        assert_eq!(h.registry.heartbeat(unreachable.clone(), h.at(100)), None);
        assert_eq!(kinds(&h.commit(100)), ["left w1"]);
        assert!(h.worker("w1").is_none());
        // Still unreachable: nothing left to remove, nothing counted twice.
        h.registry.heartbeat(unreachable, h.at(200));
        assert!(h.commit(200).is_empty());
        assert_eq!(h.count(|m| &m.workers_unreachable), 1);
        // Back: a fresh registration, which must sync its blocks again.
        let sync = h.registry.heartbeat(heartbeat("w1", 7, 0), h.at(300));
        assert!(sync.is_some());
        assert_eq!(kinds(&h.commit(300)), ["joined w1"]);
    }

    #[test]
    fn silent_worker_expires_after_the_timeout() {
        let mut h = Harness::new(limits());
        h.registry.heartbeat(heartbeat("w1", 7, 0), h.at(0));
        h.registry.heartbeat(heartbeat("w2", 7, 0), h.at(0));
        h.commit(0);
        h.registry.heartbeat(heartbeat("w2", 7, 0), h.at(2000));
        h.expire(2500);
        assert!(
            h.commit(2500).is_empty(),
            "exactly the timeout is not past it"
        );
        h.expire(2501);
        assert_eq!(kinds(&h.commit(2501)), ["left w1"]);
        assert!(h.worker("w2").is_some());
        assert_eq!(h.count(|m| &m.workers_expired), 1);
        // Its relay comes back: it joins as new.
        h.registry.heartbeat(heartbeat("w1", 7, 0), h.at(3000));
        assert_eq!(kinds(&h.commit(3000)), ["joined w1"]);
        h.expire(4501);
        assert_eq!(kinds(&h.commit(4501)), ["left w2"]);
    }

    #[test]
    fn registrations_past_max_workers_are_refused() {
        let mut h = Harness::new(limits());
        for worker in ["w1", "w2", "w3"] {
            h.registry.heartbeat(heartbeat(worker, 7, 0), h.at(0));
        }
        assert_eq!(kinds(&h.commit(0)), ["joined w1", "joined w2"]);
        assert_eq!(h.count(|m| &m.workers_refused), 1);
        h.expire(2501);
        h.commit(2501);
        assert_eq!(
            h.registry
                .heartbeat(heartbeat("w3", 7, 0), h.at(2600))
                .map(|s| s.worker_id),
            Some("w3".into())
        );
        assert_eq!(kinds(&h.commit(2600)), ["joined w3"]);
    }

    #[test]
    fn relay_with_another_block_size_is_refused_and_removed() {
        let mut h = Harness::new(limits());
        h.registry.heartbeat(heartbeat("w1", 7, 0), h.at(0));
        h.commit(0);
        let mismatched = WorkerInfo {
            block_size: 32,
            ..heartbeat("w1", 7, 0)
        };
        assert_eq!(h.registry.heartbeat(mismatched.clone(), h.at(100)), None);
        assert_eq!(kinds(&h.commit(100)), ["left w1"]);
        h.registry.heartbeat(mismatched, h.at(200));
        assert!(
            h.commit(200).is_empty(),
            "refused workers are not registered"
        );
        assert_eq!(
            h.count(|m| &m.workers_block_size_mismatch),
            1,
            "once per worker and size"
        );
        // A relay too old to say its block size is trusted.
        let unknown = WorkerInfo {
            block_size: 0,
            ..heartbeat("w1", 7, 0)
        };
        h.registry.heartbeat(unknown, h.at(300));
        assert_eq!(kinds(&h.commit(300)), ["joined w1"]);
    }
}
