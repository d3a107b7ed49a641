//! This VM's replica of the fleet state, fed by the sidecar's state stream.

use std::collections::HashMap;

use router_core::fleet::{ApplyError, ApplyStats, FleetView};
use router_core::routing::computing::Computing;
use router_core::state_stream::StateUpdate;

use crate::config::{PluginConfig, SidecarConfig};

/// What one applied update did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub stats: ApplyStats,
    /// Prompts other routers sent to be computed, now credited here.
    pub shared_prompts: usize,
}

pub struct FleetReplica {
    views: HashMap<String, FleetView>,
    /// Host time (ms) of the last update received; `None` before the first.
    last_update_ms: Option<u64>,
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
            Some(view) => Some(Applied {
                stats: view.apply(update)?,
                shared_prompts: computing.record_shared(update, view, now_ms),
            }),
            None => None,
        };
        self.last_update_ms = Some(now_ms);
        Ok(applied)
    }

    /// The model's view if the stream delivered something recently enough.
    pub fn fresh_view(&self, model: &str, now_ms: u64) -> Option<&FleetView> {
        let last = self.last_update_ms?;
        if now_ms.saturating_sub(last) > self.stale_after_ms {
            return None;
        }
        self.views.get(model)
    }

    /// True once updates stopped arriving for longer than the staleness limit.
    pub fn is_stale(&self, now_ms: u64) -> bool {
        self.last_update_ms
            .is_none_or(|last| now_ms.saturating_sub(last) > self.stale_after_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use router_core::state_stream::{state_update, Snapshot};

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
}
