//! This VM's replica of the fleet state, fed by the sidecar's state stream.

use std::collections::HashMap;

use router_core::fleet::{ApplyError, FleetView};
use router_core::routing::computing::{Computing, MAX_SHARED_STRIDES};
use router_core::state_stream::{change, state_update, StateUpdate};

use crate::config::{PluginConfig, SidecarConfig};

/// What one applied update did beyond the fleet view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Prompts other routers sent to be computed, now credited here.
    pub shared_prompts: u64,
}

pub struct FleetReplica {
    views: HashMap<String, FleetView>,
    /// Host time (ms) of the last update received; `None` before the first.
    last_update_ms: Option<u64>,
    /// The last update said the sidecar lost its feed of the fleet: its
    /// view is kept, not current.
    fleet_unheard: bool,
    stale_after_ms: u64,
}

impl FleetReplica {
    pub fn new(config: &PluginConfig, sidecar: &SidecarConfig) -> Self {
        let views = config
            .models()
            .map(|m| {
                (
                    m.name.clone(),
                    FleetView::new(&m.name, sidecar.max_index_entries),
                )
            })
            .collect();
        Self {
            views,
            last_update_ms: None,
            fleet_unheard: false,
            stale_after_ms: sidecar.stale_after_ms,
        }
    }

    /// Applies one update of the stream, and credits `computing` with the
    /// prompts it says other routers sent to be computed. `None` when it is
    /// for a model this gateway does not serve (a sidecar may serve more
    /// models than one gateway routes): skipped, though it still shows the
    /// stream is live.
    pub fn apply(
        &mut self,
        update: &StateUpdate,
        now_ms: u64,
        computing: &mut Computing,
    ) -> Result<Option<Applied>, ApplyError> {
        let applied = match self.views.get_mut(&update.model) {
            Some(view) => {
                view.apply(update)?;
                Some(Applied {
                    shared_prompts: credit_shared(update, view, computing, now_ms),
                })
            }
            None => None,
        };
        self.last_update_ms = Some(now_ms);
        self.fleet_unheard = update.fleet_unheard;
        Ok(applied)
    }

    /// The model's view if it is current: the stream delivered something
    /// recently enough, and the sidecar still hears the fleet.
    pub fn fresh_view(&self, model: &str, now_ms: u64) -> Option<&FleetView> {
        if self.is_stale(now_ms) {
            return None;
        }
        self.views.get(model)
    }

    /// Whether the sidecar said, in its last update, that it hears the fleet.
    pub fn fleet_heard(&self) -> bool {
        !self.fleet_unheard
    }

    /// The model's view however old: who the workers were when the stream
    /// last spoke.
    pub fn view(&self, model: &str) -> Option<&FleetView> {
        self.views.get(model)
    }

    /// True once updates stopped arriving for longer than the staleness
    /// limit, or the sidecar said it lost its feed of the fleet.
    pub fn is_stale(&self, now_ms: u64) -> bool {
        self.fleet_unheard
            || self
                .last_update_ms
                .is_none_or(|last| now_ms.saturating_sub(last) > self.stale_after_ms)
    }
}

/// Credits the prompts `update` (a delta, applied to `view`) says other
/// routers sent to be computed, on the workers `view` knows, at most
/// [`MAX_SHARED_STRIDES`] strides in all so one callback stays short.
/// Returns how many prompts it credited.
fn credit_shared(
    update: &StateUpdate,
    view: &FleetView,
    computing: &mut Computing,
    now_ms: u64,
) -> u64 {
    let Some(state_update::Kind::Delta(delta)) = &update.kind else {
        return 0;
    };
    let mut budget = MAX_SHARED_STRIDES;
    let mut credited = 0;
    for change in &delta.changes {
        let Some(change::Kind::Computing(shared)) = &change.kind else {
            continue;
        };
        let Some(worker) = view.worker(&shared.worker_id) else {
            continue;
        };
        let strides = shared.strides.get(..budget).unwrap_or(&shared.strides);
        budget -= strides.len();
        if computing.record_shared(worker.target.key(), strides, now_ms) {
            credited += 1;
        }
    }
    credited
}

#[cfg(test)]
mod tests {
    use super::*;
    use router_core::state_stream::{
        Change, Delta, PromptComputing, Snapshot, WorkerJoined, WorkerRole,
    };

    fn replica() -> FleetReplica {
        let config = PluginConfig::parse(
            br#"{"sidecar":{"cluster":"kv_sidecar","stale_after_ms":1000},"models":[{"name":"m"}]}"#,
        )
        .unwrap();
        let sidecar = config.sidecar.clone().unwrap();
        FleetReplica::new(&config, &sidecar)
    }

    fn snapshot(model: &str) -> StateUpdate {
        StateUpdate {
            model: model.into(),
            version: 7,
            kind: Some(state_update::Kind::Snapshot(Snapshot::default())),
            fleet_unheard: false,
        }
    }

    #[test]
    fn fresh_only_after_an_update_and_until_stale() {
        let mut replica = replica();
        assert!(replica.is_stale(0));
        assert!(replica.fresh_view("m", 0).is_none());
        replica
            .apply(&snapshot("m"), 100, &mut Computing::default())
            .unwrap();
        assert_eq!(replica.fresh_view("m", 1100).unwrap().version(), 7);
        assert!(replica.fresh_view("m", 1101).is_none());
        assert!(replica.is_stale(1101));
        assert!(replica.fresh_view("other", 200).is_none());
    }

    #[test]
    fn a_sidecar_that_lost_the_fleet_makes_the_view_stale_but_kept() {
        let mut replica = replica();
        let computing = &mut Computing::default();
        replica.apply(&snapshot("m"), 0, computing).unwrap();
        let unheard = StateUpdate {
            model: "m".into(),
            version: 8,
            kind: Some(state_update::Kind::Delta(Delta::default())),
            fleet_unheard: true,
        };
        replica.apply(&unheard, 10, computing).unwrap();
        assert!(replica.is_stale(10));
        assert!(!replica.fleet_heard());
        assert!(replica.fresh_view("m", 10).is_none());
        assert_eq!(replica.view("m").unwrap().version(), 8);
        // Another model's update says so too: the answer is the sidecar's.
        let heard = StateUpdate {
            fleet_unheard: false,
            ..snapshot("x")
        };
        replica.apply(&heard, 20, computing).unwrap();
        assert!(replica.fleet_heard());
        assert_eq!(replica.fresh_view("m", 20).unwrap().version(), 8);
    }

    #[test]
    fn another_models_update_is_skipped_and_keeps_the_stream_fresh() {
        let mut replica = replica();
        let computing = &mut Computing::default();
        assert_eq!(replica.apply(&snapshot("x"), 0, computing), Ok(None));
        assert!(!replica.is_stale(0));
        assert!(replica.fresh_view("x", 0).is_none());
        assert!(replica
            .apply(&snapshot("m"), 0, computing)
            .unwrap()
            .is_some());
    }

    #[test]
    fn shared_prompts_are_credited_on_known_workers_within_a_budget() {
        const W: &str = "10.0.0.1:8000";
        let mut replica = replica();
        let computing = &mut Computing::default();
        replica.apply(&snapshot("m"), 0, computing).unwrap();
        let change = |kind| Change { kind: Some(kind) };
        let shared = |worker_id: &str, strides: Vec<u64>| {
            change(change::Kind::Computing(PromptComputing {
                worker_id: worker_id.into(),
                strides,
            }))
        };
        let last = 100 + MAX_SHARED_STRIDES as u64 - 1;
        let changes = vec![
            change(change::Kind::Joined(WorkerJoined {
                worker_id: "w".into(),
                address: W.into(),
                role: WorkerRole::Both.into(),
                data_parallel_rank: None,
            })),
            shared("w", vec![1, 2]),
            shared("gone", vec![3]),
            shared("w", (100..=last).collect()),
            shared("w", vec![9]),
        ];
        let delta = StateUpdate {
            model: "m".into(),
            version: 8,
            kind: Some(state_update::Kind::Delta(Delta { changes })),
            fleet_unheard: false,
        };
        let applied = replica.apply(&delta, 10, computing).unwrap();
        assert_eq!(applied, Some(Applied { shared_prompts: 2 }));
        assert!(!computing.record_shared(W, &[1, 2], 10), "credited");
        // The budget ran out two strides before the long list's end.
        assert!(!computing.record_shared(W, &[last - 2], 10), "credited");
        assert!(computing.record_shared(W, &[last - 1], 10), "cut");
        assert!(computing.record_shared(W, &[9], 10), "past the budget");
    }
}
