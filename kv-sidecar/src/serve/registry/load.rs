//! A worker's published load: what its engine reports (running, waiting, KV
//! usage) plus what the gateways' in-flight decisions predict (active blocks,
//! queued prefill tokens). A `Load` change goes out only when the combination
//! differs from the last one published.

use std::time::{Duration, Instant};

use router_core::gateway::{GatewayResync, RequestPhase, RequestProgress, RoutingDecision};
use router_core::protocol::WorkerLoad;
use router_core::routing::computing::MAX_SHARED_STRIDES;
use router_core::state_stream::{change, Change, LoadReport, PromptComputing};

use super::FleetRegistry;
use crate::serve::inflight::{Full, Resynced};
use crate::serve::metrics::ReasonLabel;

impl FleetRegistry {
    /// A relay's engine metrics; ignored for a worker not registered.
    pub fn engine_load(&mut self, load: WorkerLoad) {
        let Some(meta) = self.workers.get_mut(&load.worker_id) else {
            return;
        };
        let worker = load.worker_id.clone();
        meta.engine = load;
        self.publish_load(&worker);
    }

    /// A gateway routed a request: its blocks and prefill count against the
    /// chosen workers until it completes or expires, and the prompt it sent
    /// to be computed goes to every router (`PromptComputing`).
    pub fn decision(&mut self, gateway: &str, decision: &RoutingDecision, now: Instant) {
        self.share_computing(decision);
        let limit = self.limits.max_inflight_requests;
        match self.inflight.decide(gateway, decision, limit, now) {
            Ok(touched) => self.publish_loads(touched),
            Err(Full { touched }) => {
                self.publish_loads(touched);
                self.metrics
                    .inflight_dropped
                    .get_or_create(&ReasonLabel { reason: "full" })
                    .inc();
            }
        }
    }

    /// Streams the strides of a prompt being computed on a registered worker,
    /// so routers that did not decide it credit it too (a router skips its
    /// own). Past `MAX_SHARED_STRIDES` a list is cut: routers would not
    /// credit more.
    fn share_computing(&mut self, decision: &RoutingDecision) {
        let worker = decision.computing_worker();
        if decision.computing.is_empty() || !self.workers.contains_key(worker) {
            return;
        }
        let strides = &decision.computing;
        let strides = strides.get(..MAX_SHARED_STRIDES).unwrap_or(strides);
        self.pending.push(Change {
            kind: Some(change::Kind::Computing(PromptComputing {
                worker_id: worker.to_owned(),
                strides: strides.to_vec(),
            })),
        });
    }

    /// A gateway's request got its first token or completed.
    pub fn progress(&mut self, gateway: &str, progress: &RequestProgress) {
        let phase = RequestPhase::try_from(progress.phase).unwrap_or(RequestPhase::Unspecified);
        let touched = self.inflight.progress(gateway, &progress.request_id, phase);
        self.publish_loads(touched);
    }

    /// A gateway told which of its requests are open (a sidecar first
    /// answered on its new stream): what is counted for it now matches.
    pub fn resync(&mut self, gateway: &str, resync: &GatewayResync, now: Instant) {
        let limit = self.limits.max_inflight_requests;
        let Resynced {
            dropped,
            added,
            full,
            touched,
        } = self.inflight.resync(gateway, resync, limit, now);
        if dropped + added > 0 {
            tracing::info!(model = %self.config.name, %gateway, ended = dropped, added, "gateway resynced its open requests");
        }
        if full > 0 {
            self.metrics
                .inflight_dropped
                .get_or_create(&ReasonLabel { reason: "full" })
                .inc_by(full as u64);
        }
        self.dropped_decisions((dropped, touched), "resync");
    }

    /// Decisions older than `inflight_ttl_ms` stop counting: their gateway
    /// may have died before reporting completion.
    pub(super) fn expire_decisions(&mut self, now: Instant) {
        let ttl = Duration::from_millis(self.limits.inflight_ttl_ms);
        let dropped = self.inflight.expire(ttl, now);
        self.dropped_decisions(dropped, "expired");
    }

    /// A gateway is gone (its stream stayed closed past `gateway_grace_ms`,
    /// here or on the sidecar that told us): its decisions stop counting.
    pub fn gateway_gone(&mut self, gateway: &str) {
        let dropped = self.inflight.forget_gateway(gateway);
        if dropped.0 > 0 {
            tracing::info!(model = %self.config.name, %gateway, requests = dropped.0, "gateway gone; its requests stop counting");
        }
        self.dropped_decisions(dropped, "gateway_gone");
    }

    fn dropped_decisions(&mut self, (count, touched): (usize, Vec<String>), reason: &'static str) {
        if count > 0 {
            self.metrics
                .inflight_dropped
                .get_or_create(&ReasonLabel { reason })
                .inc_by(count as u64);
        }
        self.publish_loads(touched);
    }

    fn publish_loads(&mut self, workers: Vec<String>) {
        for worker in workers {
            self.publish_load(&worker);
        }
    }

    /// Queues the worker's combined load if it changed since last published.
    fn publish_load(&mut self, worker_id: &str) {
        let predicted = self.inflight.load_of(worker_id);
        let Some(meta) = self.workers.get_mut(worker_id) else {
            return;
        };
        let load = LoadReport {
            worker_id: worker_id.to_owned(),
            running: meta.engine.running,
            waiting: meta.engine.waiting,
            kv_usage: meta.engine.kv_usage,
            active_blocks: predicted.active_blocks,
            queued_prefill_tokens: predicted.queued_prefill_tokens,
            routed_requests: self.inflight.requests_on(worker_id),
        };
        if load != meta.published_load {
            meta.published_load = load.clone();
            self.pending.push(Change {
                kind: Some(change::Kind::Load(load)),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{decision, heartbeat, kinds, limits, progress, Harness, MODEL};
    use super::*;
    use crate::serve::config::StateConfig;

    /// Workers w1 and w2 registered at t = 0.
    fn fleet(limits: StateConfig) -> Harness {
        let mut h = Harness::new(limits);
        for worker in ["w1", "w2"] {
            h.registry.heartbeat(heartbeat(worker, 7, 0), h.at(0));
        }
        h.commit(0);
        h
    }

    fn engine(worker_id: &str, running: u32) -> WorkerLoad {
        WorkerLoad {
            worker_id: worker_id.to_owned(),
            model: MODEL.to_owned(),
            running,
            waiting: 1,
            kv_usage: 0.5,
            timestamp_ms: 0,
        }
    }

    fn dropped(h: &Harness, reason: &'static str) -> u64 {
        h.metrics
            .inflight_dropped
            .get_or_create(&ReasonLabel { reason })
            .get()
    }

    #[test]
    fn engine_load_is_published_when_it_changes() {
        let mut h = fleet(limits());
        h.registry.engine_load(engine("w1", 3));
        assert_eq!(
            kinds(&h.commit(10)),
            ["load w1 running=3 active=0 queued=0 routed=0"]
        );
        let load = h.worker("w1").map(|w| w.load.clone()).unwrap_or_default();
        assert_eq!((load.running, load.waiting, load.kv_usage), (3, 1, 0.5));
        h.registry.engine_load(engine("w1", 3));
        assert!(h.commit(20).is_empty(), "an unchanged load is not repeated");
        h.registry.engine_load(engine("w9", 3));
        assert!(h.commit(30).is_empty(), "unregistered workers have no load");
    }

    #[test]
    fn decisions_and_progress_move_the_predicted_load() {
        let mut h = fleet(limits());
        h.registry.engine_load(engine("w1", 3));
        h.registry
            .decision("g", &decision("r1", "w1", 10, 160), h.at(10));
        let split = RoutingDecision {
            prefill_worker_id: "w2".into(),
            ..decision("r2", "w1", 5, 80)
        };
        h.registry.decision("g", &split, h.at(10));
        assert_eq!(
            kinds(&h.commit(10)),
            [
                "load w1 running=3 active=0 queued=0 routed=0",
                "load w1 running=3 active=10 queued=160 routed=1",
                "load w1 running=3 active=15 queued=160 routed=2",
                "load w2 running=0 active=0 queued=80 routed=1",
            ]
        );
        h.registry
            .progress("g", &progress("r1", RequestPhase::FirstToken));
        assert_eq!(
            kinds(&h.commit(20)),
            ["load w1 running=3 active=15 queued=0 routed=2"]
        );
        h.registry
            .progress("g", &progress("r2", RequestPhase::Done));
        assert_eq!(
            kinds(&h.commit(30)),
            [
                "load w1 running=3 active=10 queued=0 routed=1",
                "load w2 running=0 active=0 queued=0 routed=0",
            ]
        );
        // Request ids are per gateway: another gateway's r1 is another request.
        h.registry
            .progress("other", &progress("r1", RequestPhase::Done));
        assert!(h.commit(40).is_empty());
    }

    #[test]
    fn a_prompt_being_computed_is_shared_with_its_computing_worker() {
        let mut h = fleet(limits());
        let computing = |request, worker: &str, prefill: &str, strides: Vec<u64>| RoutingDecision {
            prefill_worker_id: prefill.into(),
            computing: strides,
            ..decision(request, worker, 40, 640)
        };
        h.registry
            .decision("g", &computing("r1", "w1", "", vec![15, 31]), h.at(0));
        h.registry
            .decision("g", &computing("r2", "w1", "w2", vec![47]), h.at(0));
        // Nothing being computed, or on a worker this sidecar does not know.
        h.registry
            .decision("g", &computing("r3", "w1", "", vec![]), h.at(0));
        h.registry
            .decision("g", &computing("r4", "w9", "", vec![63]), h.at(0));
        let shared: Vec<String> = kinds(&h.commit(0))
            .into_iter()
            .filter(|kind| kind.starts_with("computing"))
            .collect();
        assert_eq!(shared, ["computing w1 [15, 31]", "computing w2 [47]"]);
        let long = (0..MAX_SHARED_STRIDES as u64 + 3).collect();
        h.registry
            .decision("g", &computing("r5", "w2", "", long), h.at(0));
        let cut = h.commit(0).into_iter().find_map(|c| match c.kind {
            Some(change::Kind::Computing(c)) => Some(c.strides.len()),
            _ => None,
        });
        assert_eq!(cut, Some(MAX_SHARED_STRIDES));
    }

    #[test]
    fn stale_decisions_stop_counting() {
        let mut h = fleet(StateConfig {
            worker_timeout_ms: 60_000,
            ..limits()
        });
        h.registry
            .decision("g", &decision("r1", "w1", 10, 160), h.at(0));
        h.registry
            .decision("g", &decision("r2", "w1", 1, 16), h.at(5000));
        h.commit(5000);
        h.expire(10_000);
        assert!(
            h.commit(10_000).is_empty(),
            "exactly the ttl is not past it"
        );
        h.expire(10_001);
        assert_eq!(
            kinds(&h.commit(10_001)),
            ["load w1 running=0 active=1 queued=16 routed=1"]
        );
        assert_eq!(dropped(&h, "expired"), 1);
    }

    #[test]
    fn a_gone_gateways_decisions_stop_counting_and_only_its_own() {
        let mut h = fleet(StateConfig {
            max_inflight_requests: 10,
            ..limits()
        });
        h.registry
            .decision("gone", &decision("r1", "w1", 10, 160), h.at(0));
        h.registry
            .decision("gone", &decision("r2", "w1", 2, 32), h.at(0));
        h.registry
            .decision("stays", &decision("r1", "w1", 1, 16), h.at(0));
        h.commit(0);
        h.registry.gateway_gone("gone");
        assert_eq!(
            kinds(&h.commit(1)).last().map(String::as_str),
            Some("load w1 running=0 active=1 queued=16 routed=1")
        );
        assert_eq!(dropped(&h, "gateway_gone"), 2);
        h.registry.gateway_gone("never-seen");
        assert!(h.commit(2).is_empty());
    }

    #[test]
    fn a_resync_replaces_what_a_gateway_had_counted() {
        let mut h = fleet(StateConfig {
            max_inflight_requests: 10,
            ..limits()
        });
        h.registry
            .decision("g", &decision("ended", "w1", 10, 160), h.at(0));
        h.commit(0);
        let open = |id, worker| router_core::gateway::OpenRequest {
            decision: Some(decision(id, worker, 3, 48)),
            first_token: false,
        };
        let resync = GatewayResync {
            model: MODEL.to_owned(),
            requests: vec![open("unheard", "w2")],
            part: 0,
            parts: 1,
        };
        h.registry.resync("g", &resync, h.at(1));
        assert_eq!(
            kinds(&h.commit(1)),
            [
                "load w1 running=0 active=0 queued=0 routed=0",
                "load w2 running=0 active=3 queued=48 routed=1"
            ]
        );
        assert_eq!(dropped(&h, "resync"), 1);
        h.registry.resync("g", &resync, h.at(2));
        assert!(h.commit(2).is_empty(), "a repeated resync changes nothing");
    }

    #[test]
    fn decisions_past_the_limit_are_dropped() {
        let mut h = fleet(limits());
        for request in ["r1", "r2", "r3"] {
            h.registry
                .decision("g", &decision(request, "w1", 1, 0), h.at(0));
        }
        assert_eq!(
            kinds(&h.commit(0)),
            [
                "load w1 running=0 active=1 queued=0 routed=1",
                "load w1 running=0 active=2 queued=0 routed=2"
            ]
        );
        assert_eq!(dropped(&h, "full"), 1);
    }

    #[test]
    fn a_departed_worker_takes_its_decisions_along() {
        let mut h = fleet(limits());
        h.registry
            .decision("g", &decision("r1", "w1", 10, 160), h.at(0));
        h.registry.heartbeat(heartbeat("w2", 7, 0), h.at(2000));
        h.expire(2501);
        assert_eq!(
            kinds(&h.commit(2501)),
            ["load w1 running=0 active=10 queued=160 routed=1", "left w1"]
        );
        assert_eq!(dropped(&h, "worker_left"), 1);
        // Back again, it starts from no predicted load.
        h.registry.heartbeat(heartbeat("w1", 7, 0), h.at(3000));
        h.registry.engine_load(engine("w1", 1));
        assert_eq!(
            kinds(&h.commit(3000)),
            ["joined w1", "load w1 running=1 active=0 queued=0 routed=0"]
        );
    }
}
