//! A relay's KV events become fleet changes; its sequence numbers (see
//! `seq`) tell when some were lost, and then the relay is asked for its full
//! state, at most once per `sync_retry_ms`.

use std::time::{Duration, Instant};

use router_core::protocol::{kv_event::Kind, KvEventBatch, SyncSeen};
use router_core::state_stream::{change, BlocksChanged, Change, WorkerCleared};

use super::{FleetRegistry, SyncRequest, WorkerMeta};
use crate::serve::metrics::EventLabel;
use crate::serve::seq::Accept;

impl FleetRegistry {
    /// Applies one batch of a relay's events; returns a full-state request
    /// when the batch reveals a gap.
    pub fn events(&mut self, batch: &KvEventBatch, now: Instant) -> Option<SyncRequest> {
        let retry = self.sync_retry();
        let Self {
            config,
            workers,
            pending,
            metrics,
            label,
            ..
        } = self;
        let count = |kind: &'static str, status: &'static str| {
            metrics
                .events
                .get_or_create(&EventLabel {
                    model: config.name.clone(),
                    r#type: kind,
                    status,
                })
                .inc();
        };
        let Some(meta) = workers.get_mut(&batch.worker_id) else {
            // Not registered yet: the blocks cannot be indexed without the
            // worker's address. Its first heartbeat triggers a full state.
            for event in &batch.events {
                count(kind_name(event.kind.as_ref()), "unknown_worker");
            }
            return None;
        };
        let worker = &batch.worker_id;
        if meta.tracker.begin(batch.epoch) {
            pending.push(cleared(worker));
        }
        let mut gap = false;
        for event in &batch.events {
            let kind = kind_name(event.kind.as_ref());
            let was_missing = !meta.tracker.in_sync();
            if meta.tracker.accept(event.seq) == Accept::Duplicate {
                count(kind, "duplicate");
                continue;
            }
            gap |= !was_missing && !meta.tracker.in_sync();
            count(kind, "applied");
            match &event.kind {
                None => {}
                Some(Kind::Stored(stored)) => {
                    pending.push(blocks(change::Kind::Stored, worker, &stored.hashes));
                }
                Some(Kind::Removed(removed)) => {
                    pending.push(blocks(change::Kind::Removed, worker, &removed.hashes));
                }
                Some(Kind::Cleared(_)) => pending.push(cleared(worker)),
                Some(Kind::Reset(_)) => {
                    meta.tracker.reset();
                    pending.push(cleared(worker));
                }
                Some(Kind::FullState(part)) => {
                    if part.part == 0 {
                        pending.push(cleared(worker));
                    }
                    pending.push(blocks(change::Kind::Stored, worker, &part.hashes));
                    meta.tracker.full_state_part(part.part, part.last);
                }
            }
        }
        if !gap {
            return None;
        }
        metrics.gaps.get_or_create(label).inc();
        // This batch just arrived: the subscription is live.
        let seen = meta.tracker.epoch().map(|epoch| SyncSeen {
            epoch,
            seq: meta.tracker.last_seq(),
        });
        meta.request_sync(&config.name, retry, now, seen)
    }

    /// Our own NATS connection came (back) up: whatever relays published
    /// meanwhile is lost to us, so every worker's next heartbeat asks for a
    /// full state, without waiting out an earlier request's retry interval.
    pub fn messages_missed(&mut self) {
        for meta in self.workers.values_mut() {
            meta.tracker.mark_missed();
            meta.last_sync_request = None;
        }
    }

    pub(super) fn sync_retry(&self) -> Duration {
        Duration::from_millis(self.limits.sync_retry_ms)
    }
}

impl WorkerMeta {
    /// A full-state request, unless one went out less than `retry` ago: the
    /// relay needs time to republish, and asking again meanwhile would only
    /// make it start over.
    pub(super) fn request_sync(
        &mut self,
        model: &str,
        retry: Duration,
        now: Instant,
        seen: Option<SyncSeen>,
    ) -> Option<SyncRequest> {
        if self
            .last_sync_request
            .is_some_and(|at| now.duration_since(at) < retry)
        {
            return None;
        }
        self.last_sync_request = Some(now);
        Some(SyncRequest {
            model: model.to_owned(),
            worker_id: self.info.worker_id.clone(),
            seen,
        })
    }
}

fn blocks(kind: fn(BlocksChanged) -> change::Kind, worker_id: &str, hashes: &[u64]) -> Change {
    Change {
        kind: Some(kind(BlocksChanged {
            worker_id: worker_id.to_owned(),
            hashes: hashes.to_vec(),
        })),
    }
}

fn cleared(worker_id: &str) -> Change {
    Change {
        kind: Some(change::Kind::Cleared(WorkerCleared {
            worker_id: worker_id.to_owned(),
        })),
    }
}

fn kind_name(kind: Option<&Kind>) -> &'static str {
    match kind {
        None => "empty",
        Some(Kind::Stored(_)) => "stored",
        Some(Kind::Removed(_)) => "removed",
        Some(Kind::Cleared(_)) => "cleared",
        Some(Kind::Reset(_)) => "reset",
        Some(Kind::FullState(_)) => "full_state",
    }
}

#[cfg(test)]
mod tests {
    use router_core::protocol::{AllBlocksCleared, BlocksRemoved, KvEvent, WorkerReset};

    use super::super::testing::{
        batch, full_state, heartbeat, kinds, limits, stored, Harness, MODEL,
    };
    use super::*;
    use crate::serve::metrics::ServeMetrics;

    /// A registered worker of epoch 7 whose full state (blocks 1, 2) was
    /// applied through seq 2, at t = 0.
    fn synced() -> Harness {
        let mut h = Harness::new(limits());
        h.registry.heartbeat(heartbeat("w1", 7, 0), h.at(0));
        let full = vec![full_state(1, 0, false, &[1]), full_state(2, 1, true, &[2])];
        assert_eq!(h.registry.events(&batch("w1", 7, full), h.at(0)), None);
        h.commit(0);
        assert!(h.registry.all_in_sync());
        h
    }

    fn event(seq: u64, kind: Kind) -> KvEvent {
        KvEvent {
            seq,
            kind: Some(kind),
        }
    }

    fn events_counted(h: &Harness, kind: &'static str, status: &'static str) -> u64 {
        h.metrics
            .events
            .get_or_create(&EventLabel {
                model: MODEL.into(),
                r#type: kind,
                status,
            })
            .get()
    }

    #[test]
    fn relay_events_become_fleet_changes() {
        let mut h = synced();
        assert_eq!(h.blocks("w1"), [1, 2]);
        let events = vec![
            stored(3, &[3, 4]),
            event(4, Kind::Removed(BlocksRemoved { hashes: vec![1] })),
        ];
        h.registry.events(&batch("w1", 7, events), h.at(10));
        assert_eq!(kinds(&h.commit(10)), ["stored w1 [3, 4]", "removed w1 [1]"]);
        assert_eq!(h.blocks("w1"), [2, 3, 4]);
        let cleared = vec![event(5, Kind::Cleared(AllBlocksCleared {}))];
        h.registry.events(&batch("w1", 7, cleared), h.at(20));
        assert_eq!(kinds(&h.commit(20)), ["cleared w1"]);
        assert!(h.blocks("w1").is_empty());
        assert!(h.registry.all_in_sync());
    }

    #[test]
    fn redelivered_events_are_skipped() {
        let mut h = synced();
        h.registry
            .events(&batch("w1", 7, vec![stored(3, &[3])]), h.at(10));
        h.commit(10);
        h.registry
            .events(&batch("w1", 7, vec![stored(3, &[3])]), h.at(20));
        assert!(h.commit(20).is_empty());
        assert_eq!(events_counted(&h, "stored", "duplicate"), 1);
        assert!(h.registry.all_in_sync());
    }

    #[test]
    fn a_new_epoch_replaces_the_worker_blocks() {
        let mut h = synced();
        h.registry
            .events(&batch("w1", 8, vec![stored(1, &[9])]), h.at(10));
        assert_eq!(kinds(&h.commit(10)), ["cleared w1", "stored w1 [9]"]);
        assert_eq!(h.blocks("w1"), [9]);
    }

    /// Every sidecar sees a relay's hole; naming the last event seen lets
    /// the relay answer them all with one full state.
    #[test]
    fn a_gap_names_the_last_event_seen_and_a_heartbeat_names_none() {
        let mut h = synced();
        let sync = h
            .registry
            .events(&batch("w1", 7, vec![stored(4, &[4])]), h.at(5_000));
        assert_eq!(
            sync.and_then(|s| s.seen),
            Some(SyncSeen { epoch: 7, seq: 4 })
        );
        // Still out of sync at the next heartbeat past the retry interval:
        // that request asks for a full state whatever came before.
        let sync = h.registry.heartbeat(heartbeat("w1", 7, 4), h.at(10_000));
        assert_eq!(sync.map(|s| s.seen), Some(None));
    }

    #[test]
    fn a_gap_asks_for_a_full_state_at_most_once_per_retry_interval() {
        let mut h = synced();
        // The join's own request went out at 0: too recent to repeat.
        assert_eq!(
            h.registry
                .events(&batch("w1", 7, vec![stored(4, &[4])]), h.at(999)),
            None
        );
        assert_eq!(h.count(|m| &m.gaps), 1);
        assert!(!h.registry.all_in_sync());
        // The blocks after the hole are still indexed: approximate beats empty.
        h.commit(999);
        assert_eq!(h.blocks("w1"), [1, 2, 4]);
        // The next heartbeat after the retry interval asks.
        let sync = h.registry.heartbeat(heartbeat("w1", 7, 4), h.at(1000));
        assert_eq!(sync.map(|s| s.worker_id), Some("w1".into()));
        // A second hole, out of sync already, is no new gap; but it asks
        // again itself once the interval since the last request passed.
        assert_eq!(
            h.registry
                .events(&batch("w1", 7, vec![stored(6, &[6])]), h.at(1999)),
            None
        );
        assert_eq!(h.count(|m| &m.gaps), 1);
        assert_eq!(
            h.registry.heartbeat(heartbeat("w1", 7, 6), h.at(1999)),
            None
        );
        assert!(h
            .registry
            .heartbeat(heartbeat("w1", 7, 6), h.at(2000))
            .is_some());
        // The relay's full state makes the worker exact again.
        let full = vec![full_state(7, 0, false, &[1]), full_state(8, 1, true, &[6])];
        h.registry.events(&batch("w1", 7, full), h.at(2100));
        assert_eq!(
            kinds(&h.commit(2100)),
            [
                "stored w1 [6]",
                "cleared w1",
                "stored w1 [1]",
                "stored w1 [6]"
            ]
        );
        assert_eq!(h.blocks("w1"), [1, 6]);
        assert!(h.registry.all_in_sync());
        assert_eq!(
            h.registry.heartbeat(heartbeat("w1", 7, 8), h.at(4000)),
            None
        );
        // A new hole in sync is a new gap, asked about at once.
        let sync = h
            .registry
            .events(&batch("w1", 7, vec![stored(10, &[10])]), h.at(4000));
        assert!(sync.is_some());
        assert_eq!(h.count(|m| &m.gaps), 2);
    }

    #[test]
    fn a_reset_makes_empty_the_exact_state() {
        let mut h = synced();
        h.registry
            .events(&batch("w1", 7, vec![stored(4, &[4])]), h.at(10));
        assert!(!h.registry.all_in_sync());
        let reset = vec![event(5, Kind::Reset(WorkerReset { reason: 0 }))];
        h.registry.events(&batch("w1", 7, reset), h.at(20));
        assert!(h.registry.all_in_sync());
        assert_eq!(kinds(&h.commit(20)), ["stored w1 [4]", "cleared w1"]);
        assert!(h.blocks("w1").is_empty());
    }

    #[test]
    fn a_heartbeat_ahead_of_the_events_received_asks_for_a_full_state() {
        let mut h = synced();
        // The relay says it published through seq 5; only 2 arrived.
        assert_eq!(
            h.registry.heartbeat(heartbeat("w1", 7, 5), h.at(1000)),
            None
        );
        let sync = h.registry.heartbeat(heartbeat("w1", 7, 5), h.at(2000));
        assert_eq!(sync.map(|s| s.worker_id), Some("w1".into()));
    }

    #[test]
    fn a_heartbeat_of_another_epoch_asks_for_a_full_state() {
        let mut h = synced();
        assert!(h
            .registry
            .heartbeat(heartbeat("w1", 8, 0), h.at(1000))
            .is_some());
    }

    #[test]
    fn events_of_an_unregistered_worker_are_dropped() {
        let mut h = Harness::new(limits());
        let sync = h
            .registry
            .events(&batch("w9", 1, vec![stored(1, &[1])]), h.at(0));
        assert_eq!(sync, None);
        assert!(h.commit(0).is_empty());
        assert_eq!(events_counted(&h, "stored", "unknown_worker"), 1);
    }

    #[test]
    fn missed_messages_put_every_worker_out_of_sync_and_lift_the_retry_wait() {
        let mut h = synced();
        assert!(h
            .registry
            .heartbeat(heartbeat("w2", 1, 0), h.at(500))
            .is_some());
        h.registry.messages_missed();
        assert!(!h.registry.all_in_sync());
        // w2 was asked 10 ms ago, yet is asked again.
        for worker in ["w1", "w2"] {
            let sync = h.registry.heartbeat(heartbeat(worker, 7, 2), h.at(510));
            assert_eq!(sync.map(|s| s.worker_id), Some(worker.to_owned()));
        }
        assert_eq!(
            h.metrics
                .sync_requests
                .get_or_create(&ServeMetrics::model(MODEL))
                .get(),
            0,
            "requests are counted when sent, by the caller"
        );
    }
}
