//! The per-request decision: precise (exact block hashes over fresh fleet
//! state), approximate (the prefix table learned from this VM's decisions,
//! over the pool's workers), or none at all (Envoy's own balancing).

use router_core::fleet::FleetView;
use router_core::index::{OverlapScratch, WorkerSlot};
use router_core::selection::{select, Candidate, PromptShape, WorkerLoad};
use router_core::state_stream::{LoadReport, WorkerRole};
use router_core::SeqHash;

use crate::approximate::{LearnedTable, PrefixKeys};
use crate::config::ModelConfig;
use crate::inflight::InFlight;
use crate::orca::OrcaLoads;
use crate::unreachable::Unreachable;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Chosen by exact KV overlap and load from fresh fleet state.
    Precise,
    /// Chosen by the learned prefix table and the load this VM knows of.
    Approximate,
    /// No choice: Envoy's fallback load balancing picks.
    Fallback,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Precise => "precise",
            Mode::Approximate => "approximate",
            Mode::Fallback => "fallback",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub mode: Mode,
    /// `ip:port` for the override header; `None` in fallback mode.
    pub address: Option<String>,
    /// The chosen worker's id, known when fleet state is.
    pub worker_id: Option<String>,
    /// Prompt blocks cached on the chosen worker (estimated when approximate).
    pub cached_blocks: u32,
    pub prompt_blocks: u32,
    /// The chosen worker's load before this request.
    pub load: WorkerLoad,
}

impl Decision {
    fn fallback(prompt_blocks: u32) -> Self {
        Self {
            mode: Mode::Fallback,
            address: None,
            worker_id: None,
            cached_blocks: 0,
            prompt_blocks,
            load: WorkerLoad::default(),
        }
    }
}

/// Which of a model's pools a decision is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// Workers that generate: the model's own pool.
    Decode,
    /// Workers that only prefill, for disaggregated requests.
    Prefill,
}

impl Pool {
    fn admits(self, role: WorkerRole) -> bool {
        match self {
            Pool::Decode => matches!(
                role,
                WorkerRole::Decode | WorkerRole::Both | WorkerRole::Unspecified
            ),
            Pool::Prefill => role == WorkerRole::Prefill,
        }
    }

    /// The pool's configured endpoints, used without fleet state.
    fn endpoints(self, model: &ModelConfig) -> &[String] {
        match (self, &model.disaggregation) {
            (Pool::Decode, _) => &model.endpoints,
            (Pool::Prefill, Some(d)) => &d.prefill_endpoints,
            (Pool::Prefill, None) => &[],
        }
    }
}

/// What is known of the prompt being routed.
#[derive(Debug, Clone, Copy)]
pub struct RoutedPrompt<'a> {
    /// Exact block hashes: token ids were sent, or the sidecar tokenized.
    pub exact: Option<&'a [SeqHash]>,
    /// Keys for the learned table.
    pub keys: &'a PrefixKeys,
}

/// This VM's state the decision reads.
pub struct Knowledge<'a> {
    /// The model's fleet view, when fresh.
    pub view: Option<&'a FleetView>,
    pub inflight: &'a InFlight,
    pub orca: &'a OrcaLoads,
    /// Workers left out for now: they just refused a connection.
    pub unreachable: &'a Unreachable,
    pub learned: &'a mut LearnedTable,
    pub now_ms: u64,
    /// Uniformly random; breaks ties in precise mode.
    pub random: u64,
}

/// Working memory reused across requests of one VM.
#[derive(Default)]
pub struct Scratch {
    overlaps: OverlapScratch,
    candidates: Vec<Candidate>,
}

pub fn decide(
    model: &ModelConfig,
    pool: Pool,
    prompt: RoutedPrompt<'_>,
    known: &mut Knowledge<'_>,
    scratch: &mut Scratch,
) -> Decision {
    // A view without a worker of this pool (the sidecar lost NATS and
    // forgot them, say) knows less than the configured endpoints and the
    // learned table: route approximately instead of not at all.
    let live = known
        .view
        .filter(|view| view.workers().any(|w| pool.admits(w.role)));
    match (live, prompt.exact) {
        (Some(view), Some(exact)) => precise(model, pool, exact, view, known, scratch),
        _ => approximate(model, pool, prompt, live, known, scratch),
    }
}

/// Whether a worker may be chosen now.
fn reachable(known: &Knowledge<'_>, address: &str) -> bool {
    !known.unreachable.is_down(address, known.now_ms)
}

fn precise(
    model: &ModelConfig,
    pool: Pool,
    prompt: &[SeqHash],
    view: &FleetView,
    known: &Knowledge<'_>,
    scratch: &mut Scratch,
) -> Decision {
    let prompt_blocks = u32::try_from(prompt.len()).unwrap_or(u32::MAX);
    scratch.candidates.clear();
    let overlaps = view.overlaps(prompt, &mut scratch.overlaps);
    for worker in view
        .workers()
        .filter(|w| pool.admits(w.role) && reachable(known, &w.address))
    {
        let cached_blocks = overlaps
            .iter()
            .find(|o| o.worker == worker.slot)
            .map_or(0, |o| o.blocks);
        scratch.candidates.push(Candidate {
            worker: worker.slot,
            cached_blocks,
            load: current_load(model, known, &worker.address, reported(&worker.load)),
        });
    }
    let shape = PromptShape {
        blocks: prompt_blocks,
        block_size: model.hasher.block_size().get(),
    };
    let chosen = select(shape, &scratch.candidates, model.weights, known.random).and_then(|s| {
        let load = chosen_load(&scratch.candidates, s.worker);
        view.worker_at(s.worker).map(|w| (w, s.cached_blocks, load))
    });
    match chosen {
        Some((worker, cached_blocks, load)) => Decision {
            mode: Mode::Precise,
            address: Some(worker.address.clone()),
            worker_id: Some(worker.worker_id.clone()),
            cached_blocks,
            prompt_blocks,
            load,
        },
        None => Decision::fallback(prompt_blocks),
    }
}

fn approximate(
    model: &ModelConfig,
    pool: Pool,
    prompt: RoutedPrompt<'_>,
    view: Option<&FleetView>,
    known: &mut Knowledge<'_>,
    scratch: &mut Scratch,
) -> Decision {
    let block_size = model.hasher.block_size();
    let keys = prompt.keys;
    let key_count = u32::try_from(keys.keys().len()).unwrap_or(u32::MAX);
    let prompt_blocks = match prompt.exact {
        Some(exact) => u32::try_from(exact.len()).unwrap_or(u32::MAX),
        None => keys.blocks(key_count, block_size),
    };
    let Some(&first_key) = keys.keys().first() else {
        return Decision::fallback(prompt_blocks);
    };
    // (address, worker id, load the fleet state reports)
    let workers: Vec<(&str, Option<&str>, WorkerLoad)> = match view {
        Some(view) => view
            .workers()
            .filter(|w| pool.admits(w.role) && reachable(known, &w.address))
            .map(|w| {
                (
                    w.address.as_str(),
                    Some(w.worker_id.as_str()),
                    reported(&w.load),
                )
            })
            .collect(),
        None => pool
            .endpoints(model)
            .iter()
            .filter(|e| reachable(known, e))
            .map(|e| (e.as_str(), None, WorkerLoad::default()))
            .collect(),
    };
    let mut matched = vec![0u32; workers.len()];
    for (address, run) in known.learned.matches(keys.keys(), known.now_ms) {
        if let Some(index) = workers.iter().position(|w| w.0 == address) {
            if let Some(slot) = matched.get_mut(index) {
                *slot = run;
            }
        }
    }
    scratch.candidates.clear();
    for (index, (address, _, reported)) in workers.iter().enumerate() {
        let run = matched.get(index).copied().unwrap_or(0);
        scratch.candidates.push(Candidate {
            worker: WorkerSlot(u32::try_from(index).unwrap_or(u32::MAX)),
            cached_blocks: keys.blocks(run, block_size).min(prompt_blocks),
            load: current_load(model, known, address, *reported),
        });
    }
    let shape = PromptShape {
        blocks: prompt_blocks,
        block_size: block_size.get(),
    };
    // Ties broken by the prompt, not at random: every VM and gateway sends a
    // new prefix to the same worker while they know nothing else.
    let selected = select(shape, &scratch.candidates, model.weights, first_key);
    let chosen = selected.and_then(|s| {
        let index = usize::try_from(s.worker.0).ok()?;
        let load = chosen_load(&scratch.candidates, s.worker);
        workers.get(index).map(|w| (w, s.cached_blocks, load))
    });
    match chosen {
        Some(((address, worker_id, _), cached_blocks, load)) => Decision {
            mode: Mode::Approximate,
            address: Some((*address).to_owned()),
            worker_id: worker_id.map(str::to_owned),
            cached_blocks,
            prompt_blocks,
            load,
        },
        None => Decision::fallback(prompt_blocks),
    }
}

/// The load a worker is under, by the freshest account of it: the fleet
/// state (engines' metrics plus every gateway's reported decisions), this
/// VM's own in-flight requests and the engine's ORCA reports. They estimate
/// the same thing with different lags, so the largest wins; adding them
/// would count a request several times.
fn current_load(
    model: &ModelConfig,
    known: &Knowledge<'_>,
    address: &str,
    reported: WorkerLoad,
) -> WorkerLoad {
    let local = known.inflight.load(address);
    let orca = known
        .orca
        .load(address, model.hasher.block_size().get(), known.now_ms)
        .unwrap_or_default();
    WorkerLoad {
        active_blocks: reported
            .active_blocks
            .max(local.active_blocks)
            .max(orca.active_blocks),
        queued_prefill_tokens: reported
            .queued_prefill_tokens
            .max(local.queued_prefill_tokens)
            .max(orca.queued_prefill_tokens),
    }
}

/// The part of a worker's load report the cost function uses.
fn reported(load: &LoadReport) -> WorkerLoad {
    WorkerLoad {
        active_blocks: load.active_blocks,
        queued_prefill_tokens: load.queued_prefill_tokens,
    }
}

fn chosen_load(candidates: &[Candidate], worker: WorkerSlot) -> WorkerLoad {
    candidates
        .iter()
        .find(|c| c.worker == worker)
        .map_or_else(WorkerLoad::default, |c| c.load)
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;

    use super::*;
    use crate::config::PluginConfig;
    use crate::orca::OrcaReport;
    use router_core::state_stream::{change, BlocksChanged, Change, LoadReport, WorkerJoined};

    fn model() -> ModelConfig {
        PluginConfig::parse(
            br#"{"models":[{"name":"m","endpoints":["127.0.0.1:1","127.0.0.1:2"]}]}"#,
        )
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

    /// This VM's state, with nothing routed or reported yet.
    struct Vm {
        inflight: InFlight,
        orca: OrcaLoads,
        unreachable: Unreachable,
        learned: LearnedTable,
        scratch: Scratch,
    }

    impl Vm {
        fn new() -> Self {
            Self {
                inflight: InFlight::default(),
                orca: OrcaLoads::default(),
                unreachable: Unreachable::default(),
                learned: LearnedTable::new(NonZeroUsize::new(100).unwrap(), 60_000),
                scratch: Scratch::default(),
            }
        }

        fn decide(&mut self, exact: Option<&[SeqHash]>, view: Option<&FleetView>) -> Decision {
            let keys = exact.map_or_else(PrefixKeys::default, |e| {
                PrefixKeys::from_blocks(e, model().hasher.block_size())
            });
            self.decide_in(Pool::Decode, exact, &keys, view)
        }

        fn decide_in(
            &mut self,
            pool: Pool,
            exact: Option<&[SeqHash]>,
            keys: &PrefixKeys,
            view: Option<&FleetView>,
        ) -> Decision {
            let mut known = Knowledge {
                view,
                inflight: &self.inflight,
                orca: &self.orca,
                unreachable: &self.unreachable,
                learned: &mut self.learned,
                now_ms: 1_000,
                random: 0,
            };
            let prompt = RoutedPrompt { exact, keys };
            decide(&model(), pool, prompt, &mut known, &mut self.scratch)
        }
    }

    fn prompt() -> Vec<SeqHash> {
        [1, 2, 3, 4].map(SeqHash).to_vec()
    }

    #[test]
    fn precise_prefers_cache_and_skips_prefill_only_workers() {
        let d = Vm::new().decide(Some(&prompt()), Some(&view()));
        assert_eq!(d.mode, Mode::Precise);
        assert_eq!(d.address.as_deref(), Some("127.0.0.1:11"));
        assert_eq!((d.cached_blocks, d.prompt_blocks), (3, 4));
    }

    #[test]
    fn local_inflight_load_moves_traffic_off_the_cached_worker() {
        let mut vm = Vm::new();
        vm.inflight.admit("127.0.0.1:11", 16 * 50, 50);
        let d = vm.decide(Some(&prompt()), Some(&view()));
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
        let d = Vm::new().decide(Some(&prompt()), Some(&view));
        assert_eq!(d.address.as_deref(), Some("127.0.0.1:10"));
    }

    #[test]
    fn orca_reports_count_as_load() {
        let mut vm = Vm::new();
        let busy = OrcaReport {
            kv_cache_usage: 0.9,
            waiting: 40,
            running: 8,
        };
        vm.orca.record("127.0.0.1:11", busy, 900);
        let d = vm.decide(Some(&prompt()), Some(&view()));
        assert_eq!(d.address.as_deref(), Some("127.0.0.1:10"));
    }

    #[test]
    fn without_state_the_learned_table_decides() {
        let mut vm = Vm::new();
        let long: Vec<SeqHash> = (1..=32).map(SeqHash).collect();
        let first = vm.decide(Some(&long), None);
        assert_eq!((first.mode, first.cached_blocks), (Mode::Approximate, 0));
        assert_eq!(first.prompt_blocks, 32);
        let keys = PrefixKeys::from_blocks(&long, model().hasher.block_size());
        let other = if first.address.as_deref() == Some("127.0.0.1:1") {
            "127.0.0.1:2"
        } else {
            "127.0.0.1:1"
        };
        // Ties go the same way every time (every VM agrees on a new prefix).
        assert_eq!(vm.decide(Some(&long), None), first);
        // Once the table says the other endpoint holds it, it goes there.
        vm.learned.record(keys.keys(), other, 1_000);
        let learned = vm.decide(Some(&long), None);
        assert_eq!(learned.address.as_deref(), Some(other));
        assert_eq!(learned.cached_blocks, 32);
        // Fresh fleet state without exact hashes (tokenization failed): the
        // table picks among the fleet's live workers.
        vm.learned.record(keys.keys(), "127.0.0.1:10", 1_000);
        assert_eq!(vm.decide(None, Some(&view())).mode, Mode::Fallback);
        let d = vm.decide_in(Pool::Decode, None, &keys, Some(&view()));
        assert_eq!(d.mode, Mode::Approximate);
        assert_eq!(d.address.as_deref(), Some("127.0.0.1:10"));
        assert_eq!(d.worker_id.as_deref(), Some("a"));
    }

    #[test]
    fn the_prefill_pool_holds_only_prefill_workers() {
        let exact = prompt();
        let keys = PrefixKeys::from_blocks(&exact, model().hasher.block_size());
        let mut vm = Vm::new();
        let d = vm.decide_in(Pool::Prefill, Some(&exact), &keys, Some(&view()));
        assert_eq!(d.worker_id.as_deref(), Some("p"));
        assert_eq!(d.cached_blocks, 4);
        // Without state, a model without prefill endpoints has no choice.
        let d = vm.decide_in(Pool::Prefill, Some(&exact), &keys, None);
        assert_eq!(d.mode, Mode::Fallback);
    }

    #[test]
    fn no_prefix_or_no_worker_falls_back() {
        let mut vm = Vm::new();
        assert_eq!(vm.decide(Some(&[]), None).mode, Mode::Fallback);
        for address in ["127.0.0.1:1", "127.0.0.1:2"] {
            vm.unreachable.mark(address, 1_000);
        }
        assert_eq!(vm.decide(Some(&prompt()), None).mode, Mode::Fallback);
    }

    #[test]
    fn fresh_state_without_workers_routes_approximately_on_the_endpoints() {
        // The sidecar lost NATS and forgot every worker: its state is fresh
        // but empty, and the configured endpoints know more.
        let empty = FleetView::new("m", 10);
        let d = Vm::new().decide(Some(&prompt()), Some(&empty));
        assert_eq!(d.mode, Mode::Approximate);
        assert!(["127.0.0.1:1", "127.0.0.1:2"].contains(&d.address.as_deref().unwrap()));
    }

    #[test]
    fn an_unreachable_worker_is_left_out_until_its_hold_ends() {
        let mut vm = Vm::new();
        vm.unreachable.mark("127.0.0.1:11", 900);
        let d = vm.decide(Some(&prompt()), Some(&view()));
        assert_eq!(
            (d.mode, d.address.as_deref()),
            (Mode::Precise, Some("127.0.0.1:10"))
        );
        vm.unreachable.mark("127.0.0.1:10", 900);
        assert_eq!(
            vm.decide(Some(&prompt()), Some(&view())).mode,
            Mode::Fallback
        );
        vm.unreachable.clear("127.0.0.1:11");
        let d = vm.decide(Some(&prompt()), Some(&view()));
        assert_eq!(d.address.as_deref(), Some("127.0.0.1:11"));
    }
}
