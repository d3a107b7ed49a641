//! The per-request decision: KV-aware selection over the fleet replica when it
//! is fresh, the stand-in prefix affinity when only a static endpoint list is
//! known, and no choice at all (Envoy's own balancing) otherwise.

use router_core::fleet::FleetView;
use router_core::index::OverlapScratch;
use router_core::selection::{select, Candidate, PromptShape, WorkerLoad};
use router_core::state_stream::WorkerRole;
use router_core::SeqHash;

use crate::config::ModelConfig;
use crate::inflight::InFlight;
use crate::stand_in_policy;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Chosen by KV overlap and load from fresh fleet state.
    Precise,
    /// Chosen by the stand-in prefix affinity over configured endpoints.
    StandIn,
    /// No choice: Envoy's fallback load balancing picks.
    Fallback,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Precise => "precise",
            Mode::StandIn => "stand-in",
            Mode::Fallback => "fallback",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub mode: Mode,
    /// `ip:port` for the override header; `None` in fallback mode.
    pub address: Option<String>,
    /// The chosen worker's id, known in precise mode.
    pub worker_id: Option<String>,
    pub cached_blocks: u32,
    pub prompt_blocks: u32,
}

impl Decision {
    fn fallback(prompt_blocks: u32) -> Self {
        Self {
            mode: Mode::Fallback,
            address: None,
            worker_id: None,
            cached_blocks: 0,
            prompt_blocks,
        }
    }
}

/// Working memory reused across requests of one VM.
#[derive(Default)]
pub struct Scratch {
    overlaps: OverlapScratch,
    candidates: Vec<Candidate>,
}

pub fn decide(
    model: &ModelConfig,
    prompt: &[SeqHash],
    view: Option<&FleetView>,
    inflight: &InFlight,
    scratch: &mut Scratch,
    random: u64,
) -> Decision {
    let prompt_blocks = u32::try_from(prompt.len()).unwrap_or(u32::MAX);
    let Some(view) = view else {
        return stand_in(model, prompt, prompt_blocks);
    };
    scratch.candidates.clear();
    let overlaps = view.overlaps(prompt, &mut scratch.overlaps);
    for worker in view.workers() {
        if !serves_decode(worker.role) {
            continue;
        }
        let cached_blocks = overlaps
            .iter()
            .find(|o| o.worker == worker.slot)
            .map_or(0, |o| o.blocks);
        let local = inflight.load(&worker.address);
        scratch.candidates.push(Candidate {
            worker: worker.slot,
            cached_blocks,
            load: WorkerLoad {
                active_blocks: worker
                    .load
                    .active_blocks
                    .saturating_add(local.active_blocks),
                queued_prefill_tokens: worker
                    .load
                    .queued_prefill_tokens
                    .saturating_add(local.queued_prefill_tokens),
            },
        });
    }
    let shape = PromptShape {
        blocks: prompt_blocks,
        block_size: model.hasher.block_size().get(),
    };
    let chosen = select(shape, &scratch.candidates, model.weights, random)
        .and_then(|s| view.worker_at(s.worker).map(|w| (w, s.cached_blocks)));
    match chosen {
        Some((worker, cached_blocks)) => Decision {
            mode: Mode::Precise,
            address: Some(worker.address.clone()),
            worker_id: Some(worker.worker_id.clone()),
            cached_blocks,
            prompt_blocks,
        },
        None => Decision::fallback(prompt_blocks),
    }
}

fn serves_decode(role: WorkerRole) -> bool {
    matches!(
        role,
        WorkerRole::Decode | WorkerRole::Both | WorkerRole::Unspecified
    )
}

fn stand_in(model: &ModelConfig, prompt: &[SeqHash], prompt_blocks: u32) -> Decision {
    match prompt
        .first()
        .and_then(|first| stand_in_policy::pick(*first, &model.endpoints))
    {
        Some(address) => Decision {
            mode: Mode::StandIn,
            address: Some(address.to_owned()),
            worker_id: None,
            cached_blocks: 0,
            prompt_blocks,
        },
        None => Decision::fallback(prompt_blocks),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PluginConfig;
    use router_core::state_stream::{change, BlocksChanged, Change, LoadReport, WorkerJoined};

    fn model() -> ModelConfig {
        PluginConfig::parse(br#"{"models":[{"name":"m","endpoints":["127.0.0.1:1"]}]}"#)
            .unwrap()
            .model("m")
            .unwrap()
            .clone()
    }

    fn view() -> FleetView {
        let mut view = FleetView::new("m", 1000);
        let join = |id: &str, port: u16, role: WorkerRole| Change {
            kind: Some(change::Kind::Joined(WorkerJoined {
                worker_id: id.into(),
                address: format!("127.0.0.1:{port}"),
                role: role as i32,
            })),
        };
        view.commit(vec![
            join("a", 10, WorkerRole::Decode),
            join("b", 11, WorkerRole::Both),
            join("p", 12, WorkerRole::Prefill),
            Change {
                kind: Some(change::Kind::Stored(BlocksChanged {
                    worker_id: "b".into(),
                    hashes: vec![1, 2, 3],
                })),
            },
            Change {
                kind: Some(change::Kind::Stored(BlocksChanged {
                    worker_id: "p".into(),
                    hashes: vec![1, 2, 3, 4],
                })),
            },
        ]);
        view
    }

    fn prompt() -> Vec<SeqHash> {
        [1, 2, 3, 4].map(SeqHash).to_vec()
    }

    #[test]
    fn precise_prefers_cache_and_skips_prefill_only_workers() {
        let d = decide(
            &model(),
            &prompt(),
            Some(&view()),
            &InFlight::default(),
            &mut Scratch::default(),
            0,
        );
        assert_eq!(d.mode, Mode::Precise);
        assert_eq!(d.address.as_deref(), Some("127.0.0.1:11"));
        assert_eq!((d.cached_blocks, d.prompt_blocks), (3, 4));
    }

    #[test]
    fn local_inflight_load_moves_traffic_off_the_cached_worker() {
        let mut inflight = InFlight::default();
        inflight.admit("127.0.0.1:11", 16 * 50, 50);
        let d = decide(
            &model(),
            &prompt(),
            Some(&view()),
            &inflight,
            &mut Scratch::default(),
            0,
        );
        assert_eq!(d.address.as_deref(), Some("127.0.0.1:10"));
    }

    #[test]
    fn reported_load_counts_too() {
        let mut view = view();
        view.commit(vec![Change {
            kind: Some(change::Kind::Load(LoadReport {
                worker_id: "b".into(),
                active_blocks: 500,
                ..LoadReport::default()
            })),
        }]);
        let d = decide(
            &model(),
            &prompt(),
            Some(&view),
            &InFlight::default(),
            &mut Scratch::default(),
            0,
        );
        assert_eq!(d.address.as_deref(), Some("127.0.0.1:10"));
    }

    #[test]
    fn without_state_stand_in_then_fallback() {
        let d = decide(
            &model(),
            &prompt(),
            None,
            &InFlight::default(),
            &mut Scratch::default(),
            0,
        );
        assert_eq!(
            (d.mode, d.address.as_deref()),
            (Mode::StandIn, Some("127.0.0.1:1"))
        );
        let d = decide(
            &model(),
            &[],
            None,
            &InFlight::default(),
            &mut Scratch::default(),
            0,
        );
        assert_eq!((d.mode, d.address), (Mode::Fallback, None));
        let empty = FleetView::new("m", 10);
        let d = decide(
            &model(),
            &prompt(),
            Some(&empty),
            &InFlight::default(),
            &mut Scratch::default(),
            0,
        );
        assert_eq!(d.mode, Mode::Fallback);
    }
}
