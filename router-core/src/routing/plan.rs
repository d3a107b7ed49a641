//! The per-request decision: precise (exact block hashes over fresh fleet
//! state), approximate (the prefix table learned from this router's own
//! decisions, over the pool's workers), or none at all (the proxy's own
//! balancing); then whether the prompt is prefilled on the prefill pool.

use crate::fleet::FleetView;
use crate::index::{OverlapScratch, WorkerSlot};
use crate::routing::computing::{Computing, Strides};
use crate::routing::disagg::{PrefillRouting, PrefillWork};
use crate::routing::inflight::InFlight;
use crate::routing::learned::LearnedTable;
use crate::routing::load::{merged, OrcaLoads, Routed};
use crate::routing::prefix_keys::PrefixKeys;
use crate::routing::score::{KvCost, PrefillCost, Scorer};
use crate::routing::select::{select, Candidate, CostWeights, PromptShape, Selection, WorkerLoad};
use crate::routing::unreachable::Unreachable;
use crate::state_stream::{LoadReport, WorkerRole};
use crate::{BlockSize, SeqHash, Target};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Chosen by exact KV overlap and load from fresh fleet state.
    Precise,
    /// Chosen by the learned prefix table and the load this router knows of.
    Approximate,
    /// No choice: the proxy's fallback load balancing picks.
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

/// The choice of one worker in one pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub mode: Mode,
    /// Where the chosen worker is; `None` in fallback mode.
    pub target: Option<Target>,
    /// The chosen worker's id, known when fleet state is.
    pub worker_id: Option<String>,
    /// Prompt blocks cached on the chosen worker (estimated when approximate).
    pub cached_blocks: u32,
    /// The most prompt blocks any candidate held: above `cached_blocks`
    /// when load outweighed the longest prefix.
    pub most_cached_blocks: u32,
    pub prompt_blocks: u32,
    /// The chosen worker's load before this request.
    pub load: WorkerLoad,
}

impl Decision {
    fn fallback(prompt_blocks: u32) -> Self {
        Self {
            mode: Mode::Fallback,
            target: None,
            worker_id: None,
            cached_blocks: 0,
            most_cached_blocks: 0,
            prompt_blocks,
            load: WorkerLoad::default(),
        }
    }

    /// `ip:port` of the chosen worker.
    pub fn address(&self) -> Option<&str> {
        self.target.as_ref().map(Target::address)
    }

    /// Prompt blocks the chosen worker must compute.
    pub fn uncached_blocks(&self) -> u32 {
        self.prompt_blocks.saturating_sub(self.cached_blocks)
    }
}

/// Where a request goes: its decode worker, and the prefill worker when the
/// prompt is prefilled remotely.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingPlan {
    pub decode: Decision,
    pub prefill: Option<Decision>,
    /// What this router now credits as being computed on the worker that
    /// computes the prompt (the prefill worker, if any, else the decode
    /// one), for the routers it shares its decisions with.
    pub computing: Option<Strides>,
}

impl RoutingPlan {
    pub fn mode(&self) -> Mode {
        self.decode.mode
    }
}

/// A model's decode pool, as routing sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRouting {
    pub block_size: BlockSize,
    pub weights: CostWeights,
    /// Each worker, at its `ip:port` exactly as the pool cluster lists it;
    /// used only while no fleet state is available.
    pub endpoints: Vec<Target>,
}

/// Which of a model's pools a decision is for.
#[derive(Debug, Clone, Copy)]
enum Pool<'a> {
    /// Workers that generate: the model's own pool.
    Decode(&'a ModelRouting),
    /// Workers that prefill for others, except the decode worker itself
    /// (`exclude`). Another data-parallel rank of its engine may prefill
    /// for it; a configured endpoint at its address may not, since the
    /// engine there would pick the rank.
    Prefill {
        routing: &'a PrefillRouting,
        exclude: Option<&'a Target>,
    },
}

impl Pool<'_> {
    /// Whether a worker of the fleet state belongs to the pool.
    fn admits(self, role: WorkerRole, target: &Target) -> bool {
        match self {
            Pool::Decode(_) => matches!(
                role,
                WorkerRole::Decode | WorkerRole::Both | WorkerRole::Unspecified
            ),
            Pool::Prefill { routing, .. } => {
                let prefills = role == WorkerRole::Prefill
                    || (routing.spec.shared_workers && role == WorkerRole::Both);
                let excluded = exclude_of(self).is_some_and(|e| e.key() == target.key());
                prefills && !excluded
            }
        }
    }

    /// Whether a configured endpoint may be chosen.
    fn admits_endpoint(self, endpoint: &Target) -> bool {
        exclude_of(self).is_none_or(|e| e.address() != endpoint.address())
    }

    /// Chooses among the pool's candidates: a decode worker by the KV cost,
    /// a prefill worker by when it would finish the prompt.
    fn select(
        self,
        prompt: PromptShape,
        candidates: &[Candidate],
        weights: CostWeights,
        random: u64,
    ) -> Option<Selection> {
        let kv_cost;
        let scorer: &dyn Scorer = match self {
            Pool::Decode(_) => {
                kv_cost = KvCost::from(weights);
                &kv_cost
            }
            Pool::Prefill { .. } => &PrefillCost,
        };
        select(prompt, candidates, scorer, weights.temperature, random)
    }

    /// The pool's configured endpoints, used without fleet state.
    fn endpoints(&self) -> &[Target] {
        match self {
            Pool::Decode(model) => &model.endpoints,
            Pool::Prefill { routing, .. } => &routing.endpoints,
        }
    }
}

/// The worker a prefill pool must not choose.
fn exclude_of(pool: Pool<'_>) -> Option<&Target> {
    match pool {
        Pool::Decode(_) => None,
        Pool::Prefill { exclude, .. } => exclude,
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

/// The shared state a decision reads, and this moment.
#[derive(Debug, Clone, Copy)]
pub struct Signals<'a> {
    /// The model's fleet view, when fresh.
    pub view: Option<&'a FleetView>,
    /// The model's fleet view however old. When `view` is stale and the pool
    /// has no configured endpoints (Kubernetes: membership comes from the
    /// fleet state only), approximate mode takes this view's workers as
    /// candidates rather than leaving the choice to Envoy; their reported
    /// load is not trusted.
    pub last_known: Option<&'a FleetView>,
    pub now_ms: u64,
    /// Uniformly random; breaks ties in precise mode.
    pub random: u64,
}

/// What one router (a filter VM, or the sidecar explaining a decision) has
/// learned on its own, beyond the shared fleet state.
pub struct LocalState {
    /// Load it sent and has not seen finish.
    pub inflight: InFlight,
    /// Workers' own load reports from response headers.
    pub orca: OrcaLoads,
    /// Workers left out for now: they just refused a connection.
    pub unreachable: Unreachable,
    /// Where it sent which prompt prefixes.
    pub learned: LearnedTable,
    /// Prompts it just sent to be computed, by exact block hashes.
    pub computing: Computing,
    scratch: Scratch,
}

impl LocalState {
    pub fn new(learned: LearnedTable) -> Self {
        Self {
            inflight: InFlight::default(),
            orca: OrcaLoads::default(),
            unreachable: Unreachable::default(),
            learned,
            computing: Computing::default(),
            scratch: Scratch::default(),
        }
    }

    /// The decode pool's candidates of the last plan, with the cached
    /// blocks and merged load they were scored with. In precise mode their
    /// slots are the fleet view's.
    pub fn last_decode_candidates(&self) -> &[Candidate] {
        &self.scratch.decode
    }
}

/// Working memory reused across requests.
#[derive(Default)]
struct Scratch {
    overlaps: OverlapScratch,
    candidates: Vec<Candidate>,
    /// The decode pool's candidates of the last plan.
    decode: Vec<Candidate>,
}

/// Decides where a request for `model` goes, and whether `prefill` (the
/// model's prefill pool, if it has one) prefills it. Remembers the decode
/// choice in the learned table.
pub fn plan(
    model: &ModelRouting,
    prefill: Option<&PrefillRouting>,
    prompt: RoutedPrompt<'_>,
    signals: Signals<'_>,
    local: &mut LocalState,
) -> RoutingPlan {
    let decode = decide(model, Pool::Decode(model), prompt, signals, local);
    let scratch = &mut local.scratch;
    std::mem::swap(&mut scratch.candidates, &mut scratch.decode);
    let prefill = prefill.and_then(|routing| {
        let pool = Pool::Prefill {
            routing,
            exclude: decode.target.as_ref(),
        };
        let chosen = decide(model, pool, prompt, signals, local);
        let block_size = model.block_size.get();
        let wanted = chosen.target.is_some()
            && routing.wants_remote_prefill(
                PrefillWork::of(&decode, block_size),
                PrefillWork::of(&chosen, block_size),
            );
        wanted.then_some(chosen)
    });
    if let Some(target) = &decode.target {
        local
            .learned
            .record(prompt.keys.keys(), target.key(), signals.now_ms);
    }
    let computes = prefill.as_ref().unwrap_or(&decode);
    let computing = match (prompt.exact, &computes.target, computes.mode) {
        (Some(exact), Some(target), Mode::Precise) => {
            let cached = computes.cached_blocks;
            local
                .computing
                .record(target.key(), exact, cached, signals.now_ms)
        }
        _ => None,
    };
    RoutingPlan {
        decode,
        prefill,
        computing,
    }
}

fn decide(
    model: &ModelRouting,
    pool: Pool<'_>,
    prompt: RoutedPrompt<'_>,
    signals: Signals<'_>,
    local: &mut LocalState,
) -> Decision {
    local.scratch.candidates.clear();
    // A view without a worker of this pool (the sidecar lost NATS and
    // forgot them, say) knows less than the configured endpoints and the
    // learned table: route approximately instead of not at all.
    let serves_pool = |view: &&FleetView| view.workers().any(|w| pool.admits(w.role, &w.target));
    let live = signals.view.filter(serves_pool);
    if let (Some(view), Some(exact)) = (live, prompt.exact) {
        return precise(model, pool, exact, view, signals, local);
    }
    // Only for the decode pool: without the prefill pool's load, prefilling
    // locally is the safer choice.
    let membership = match live {
        Some(view) => Membership::Fleet {
            view,
            reported_load: true,
        },
        None => match signals.last_known.filter(serves_pool) {
            Some(view) if matches!(pool, Pool::Decode(_)) && pool.endpoints().is_empty() => {
                Membership::Fleet {
                    view,
                    reported_load: false,
                }
            }
            _ => Membership::Endpoints,
        },
    };
    approximate(model, pool, prompt, membership, signals, local)
}

/// Where approximate mode takes its candidates from.
#[derive(Clone, Copy)]
enum Membership<'a> {
    /// A fleet view's workers, with the load they report when the view is
    /// fresh (a stale view's is not trusted).
    Fleet {
        view: &'a FleetView,
        reported_load: bool,
    },
    /// The pool's configured endpoints.
    Endpoints,
}

fn precise(
    model: &ModelRouting,
    pool: Pool<'_>,
    prompt: &[SeqHash],
    view: &FleetView,
    signals: Signals<'_>,
    local: &mut LocalState,
) -> Decision {
    let prompt_blocks = u32::try_from(prompt.len()).unwrap_or(u32::MAX);
    let LocalState {
        scratch,
        inflight,
        orca,
        unreachable,
        computing,
        ..
    } = local;
    scratch.candidates.clear();
    let overlaps = view.overlaps(prompt, &mut scratch.overlaps);
    let mut credit = computing.credit(prompt, signals.now_ms);
    for worker in view.workers().filter(|w| {
        pool.admits(w.role, &w.target) && !unreachable.is_down(w.target.address(), signals.now_ms)
    }) {
        let indexed = overlaps
            .iter()
            .find(|o| o.worker == worker.slot)
            .map_or(0, |o| o.blocks);
        let cached_blocks = credit.cached_on(worker.target.key(), indexed);
        scratch.candidates.push(Candidate {
            worker: worker.slot,
            cached_blocks,
            load: current_load(
                model,
                inflight,
                orca,
                signals,
                &worker.target,
                reported(&worker.load),
            ),
        });
    }
    let shape = PromptShape {
        blocks: prompt_blocks,
        block_size: model.block_size.get(),
    };
    let selected = pool.select(shape, &scratch.candidates, model.weights, signals.random);
    let chosen = selected.and_then(|s| {
        let load = chosen_load(&scratch.candidates, s.worker);
        view.worker_at(s.worker).map(|w| (w, s.cached_blocks, load))
    });
    match chosen {
        Some((worker, cached_blocks, load)) => Decision {
            mode: Mode::Precise,
            target: Some(worker.target.clone()),
            worker_id: Some(worker.worker_id.clone()),
            cached_blocks,
            most_cached_blocks: most_cached(&scratch.candidates),
            prompt_blocks,
            load,
        },
        None => Decision::fallback(prompt_blocks),
    }
}

fn approximate(
    model: &ModelRouting,
    pool: Pool<'_>,
    prompt: RoutedPrompt<'_>,
    membership: Membership<'_>,
    signals: Signals<'_>,
    local: &mut LocalState,
) -> Decision {
    let block_size = model.block_size;
    let keys = prompt.keys;
    let key_count = u32::try_from(keys.keys().len()).unwrap_or(u32::MAX);
    let prompt_blocks = match prompt.exact {
        Some(exact) => u32::try_from(exact.len()).unwrap_or(u32::MAX),
        None => keys.blocks(key_count, block_size),
    };
    let Some(&first_key) = keys.keys().first() else {
        return Decision::fallback(prompt_blocks);
    };
    let LocalState {
        scratch,
        inflight,
        orca,
        unreachable,
        learned,
        ..
    } = local;
    let reachable = |address: &str| !unreachable.is_down(address, signals.now_ms);
    // (target, worker id, load the fleet state reports)
    let workers: Vec<(&Target, Option<&str>, Routed)> = match membership {
        Membership::Fleet {
            view,
            reported_load,
        } => view
            .workers()
            .filter(|w| pool.admits(w.role, &w.target) && reachable(w.target.address()))
            .map(|w| {
                let load = if reported_load {
                    reported(&w.load)
                } else {
                    Routed::default()
                };
                (&w.target, Some(w.worker_id.as_str()), load)
            })
            .collect(),
        Membership::Endpoints => pool
            .endpoints()
            .iter()
            .filter(|e| pool.admits_endpoint(e) && reachable(e.address()))
            .map(|e| (e, None, Routed::default()))
            .collect(),
    };
    let mut matched = vec![0u32; workers.len()];
    for (key, run) in learned.matches(keys.keys(), signals.now_ms) {
        if let Some(index) = workers.iter().position(|w| w.0.was_sent(key)) {
            if let Some(slot) = matched.get_mut(index) {
                // Several ranks of one engine map to its one endpoint.
                *slot = (*slot).max(run);
            }
        }
    }
    scratch.candidates.clear();
    for (index, (target, _, reported)) in workers.iter().enumerate() {
        let run = matched.get(index).copied().unwrap_or(0);
        scratch.candidates.push(Candidate {
            worker: WorkerSlot(u32::try_from(index).unwrap_or(u32::MAX)),
            cached_blocks: keys.blocks(run, block_size).min(prompt_blocks),
            load: current_load(model, inflight, orca, signals, target, *reported),
        });
    }
    let shape = PromptShape {
        blocks: prompt_blocks,
        block_size: block_size.get(),
    };
    // Ties broken by the prompt, not at random: every VM and gateway sends a
    // new prefix to the same worker while they know nothing else.
    let selected = pool.select(shape, &scratch.candidates, model.weights, first_key);
    let chosen = selected.and_then(|s| {
        let index = usize::try_from(s.worker.0).ok()?;
        let load = chosen_load(&scratch.candidates, s.worker);
        workers.get(index).map(|w| (w, s.cached_blocks, load))
    });
    match chosen {
        Some(((target, worker_id, _), cached_blocks, load)) => Decision {
            mode: Mode::Approximate,
            target: Some((*target).clone()),
            worker_id: worker_id.map(str::to_owned),
            cached_blocks,
            most_cached_blocks: most_cached(&scratch.candidates),
            prompt_blocks,
            load,
        },
        None => Decision::fallback(prompt_blocks),
    }
}

/// The load a worker is under, by the freshest account of it: the fleet
/// state, this router's in-flight requests (by the worker's
/// [`Target::key`]) and the engine's ORCA reports of requests beyond those
/// (by the address that answered; never for a data-parallel rank, whose
/// engine's report covers all its ranks).
fn current_load(
    model: &ModelRouting,
    inflight: &InFlight,
    orca: &OrcaLoads,
    signals: Signals<'_>,
    target: &Target,
    reported: Routed,
) -> WorkerLoad {
    let known = Routed {
        load: merged([reported.load, inflight.load(target.key())]),
        requests: reported.requests.max(inflight.requests(target.key())),
    };
    let orca = match target.data_parallel_rank() {
        None => orca.load(
            target.address(),
            model.block_size.get(),
            signals.now_ms,
            known,
        ),
        Some(_) => None,
    }
    .unwrap_or_default();
    merged([known.load, orca])
}

/// What a worker's load report says of the requests gateways routed to it.
fn reported(load: &LoadReport) -> Routed {
    Routed {
        load: WorkerLoad {
            active_blocks: load.active_blocks,
            queued_prefill_tokens: load.queued_prefill_tokens,
        },
        requests: load.routed_requests,
    }
}

fn most_cached(candidates: &[Candidate]) -> u32 {
    candidates
        .iter()
        .map(|c| c.cached_blocks)
        .max()
        .unwrap_or(0)
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
    use crate::routing::disagg::{DisaggregationSpec, PrefillPolicy};
    use crate::routing::inflight::RequestLoad;
    use crate::routing::load::OrcaReport;
    use crate::state_stream::{change, BlocksChanged, Change, LoadReport, WorkerJoined};

    fn model() -> ModelRouting {
        ModelRouting {
            block_size: BlockSize::new(16).unwrap(),
            weights: CostWeights::default(),
            endpoints: vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()],
        }
    }

    fn prefill_pool(endpoints: &[&str]) -> PrefillRouting {
        PrefillRouting {
            spec: DisaggregationSpec {
                policy: PrefillPolicy::Always,
                min_prefill_tokens: 0,
                max_prefill_queue_tokens: u64::MAX,
                max_prefill_lag_tokens: u64::MAX,
                shared_workers: false,
            },
            endpoints: endpoints.iter().map(|e| Target::from(*e)).collect(),
        }
    }

    fn auto_pool(min_prefill_tokens: u64, shared_workers: bool) -> PrefillRouting {
        let mut pool = prefill_pool(&[]);
        pool.spec.policy = PrefillPolicy::Auto;
        pool.spec.min_prefill_tokens = min_prefill_tokens;
        pool.spec.shared_workers = shared_workers;
        pool
    }

    fn view() -> FleetView {
        let mut view = FleetView::new("m", 1000);
        let join = |id: &str, port: u16, role: WorkerRole| Change {
            kind: Some(change::Kind::Joined(WorkerJoined {
                worker_id: id.into(),
                address: format!("127.0.0.1:{port}"),
                role: role as i32,
                data_parallel_rank: None,
            })),
        };
        let stored = |id: &str, hashes: Vec<u64>| Change {
            kind: Some(change::Kind::Stored(BlocksChanged {
                worker_id: id.into(),
                hashes,
            })),
        };
        view.commit(vec![
            join("a", 10, WorkerRole::Decode),
            join("b", 11, WorkerRole::Both),
            join("p", 12, WorkerRole::Prefill),
            stored("b", vec![1, 2, 3]),
            stored("p", vec![1, 2, 3, 4]),
        ]);
        view
    }

    /// One router's state, with nothing routed or reported yet.
    struct Vm {
        local: LocalState,
    }

    impl Vm {
        fn new() -> Self {
            let learned = LearnedTable::new(NonZeroUsize::new(100).unwrap(), 60_000);
            Self {
                local: LocalState::new(learned),
            }
        }

        fn decide(&mut self, exact: Option<&[SeqHash]>, view: Option<&FleetView>) -> Decision {
            let keys = exact.map_or_else(PrefixKeys::default, |e| {
                PrefixKeys::from_blocks(e, model().block_size)
            });
            self.plan(None, exact, &keys, view).decode
        }

        fn plan(
            &mut self,
            prefill: Option<&PrefillRouting>,
            exact: Option<&[SeqHash]>,
            keys: &PrefixKeys,
            view: Option<&FleetView>,
        ) -> RoutingPlan {
            self.plan_with(&model(), prefill, exact, keys, view, None)
        }

        fn plan_with(
            &mut self,
            model: &ModelRouting,
            prefill: Option<&PrefillRouting>,
            exact: Option<&[SeqHash]>,
            keys: &PrefixKeys,
            view: Option<&FleetView>,
            last_known: Option<&FleetView>,
        ) -> RoutingPlan {
            let signals = Signals {
                view,
                last_known,
                now_ms: 1_000,
                random: 0,
            };
            let prompt = RoutedPrompt { exact, keys };
            plan(model, prefill, prompt, signals, &mut self.local)
        }
    }

    fn prompt() -> Vec<SeqHash> {
        [1, 2, 3, 4].map(SeqHash).to_vec()
    }

    #[test]
    fn precise_prefers_cache_and_skips_prefill_only_workers() {
        let d = Vm::new().decide(Some(&prompt()), Some(&view()));
        assert_eq!(d.mode, Mode::Precise);
        assert_eq!(d.address(), Some("127.0.0.1:11"));
        assert_eq!((d.cached_blocks, d.prompt_blocks), (3, 4));
        assert_eq!(d.most_cached_blocks, 3);
    }

    /// Two data-parallel ranks of one engine, behind one address; rank 1
    /// holds the prompt's first three blocks.
    fn ranks_view() -> FleetView {
        let mut view = FleetView::new("m", 1000);
        let rank = |id: &str, rank: u32| Change {
            kind: Some(change::Kind::Joined(WorkerJoined {
                worker_id: id.into(),
                address: "127.0.0.1:20".into(),
                role: WorkerRole::Both as i32,
                data_parallel_rank: Some(rank),
            })),
        };
        view.commit(vec![
            rank("dp0", 0),
            rank("dp1", 1),
            Change {
                kind: Some(change::Kind::Stored(BlocksChanged {
                    worker_id: "dp1".into(),
                    hashes: vec![1, 2, 3],
                })),
            },
        ]);
        view
    }

    #[test]
    fn ranks_behind_one_address_are_chosen_and_loaded_apart() {
        let view = ranks_view();
        let mut vm = Vm::new();
        let d = vm.decide(Some(&prompt()), Some(&view));
        let target = d.target.clone().unwrap();
        assert_eq!(
            (
                target.address(),
                target.data_parallel_rank(),
                d.cached_blocks
            ),
            ("127.0.0.1:20", Some(1), 3)
        );
        // A cold prompt computing on one rank is credited to that rank only.
        let cold: Vec<SeqHash> = (100..140).map(SeqHash).collect();
        let chosen = vm.decide(Some(&cold), Some(&view)).target.unwrap();
        let other = Target::new("127.0.0.1:20", chosen.data_parallel_rank().map(|r| 1 - r));
        let mut credit = vm.local.computing.credit(&cold, 1_000);
        assert_eq!(credit.cached_on(chosen.key(), 0), 32);
        assert_eq!(credit.cached_on(other.key(), 0), 0);
        // This router's in-flight load is held per rank: a heavy load on
        // rank 1 moves the next request to rank 0, which the shared address
        // could not express.
        vm.local.inflight.admit(RequestLoad {
            decode: "127.0.0.1:20#1",
            prefill: None,
            prefill_tokens: 16 * 400,
            blocks: 400,
        });
        let d = vm.decide(Some(&prompt()), Some(&view));
        assert_eq!(d.address(), Some("127.0.0.1:20"));
        assert_eq!(d.target.and_then(|t| t.data_parallel_rank()), Some(0));
    }

    #[test]
    fn a_ranks_engine_never_prefills_for_it_by_address() {
        // The prefill pool is known only by its configured endpoints: the
        // decode rank's own engine is left out, though its key differs.
        let view = ranks_view();
        let pool = prefill_pool(&["127.0.0.1:20", "127.0.0.1:30"]);
        let exact = prompt();
        let keys = PrefixKeys::from_blocks(&exact, model().block_size);
        for _ in 0..8 {
            let plan = Vm::new().plan(Some(&pool), Some(&exact), &keys, Some(&view));
            assert_eq!(plan.decode.address(), Some("127.0.0.1:20"));
            let prefill = plan.prefill.expect("always prefills remotely");
            assert_eq!(prefill.address(), Some("127.0.0.1:30"));
        }
    }

    #[test]
    fn what_a_rank_was_sent_counts_for_its_engines_endpoint() {
        // Learned while the fleet state was fresh, used once it is gone and
        // only the engines' configured endpoints are left.
        let routing = ModelRouting {
            endpoints: vec!["127.0.0.1:21".into(), "127.0.0.1:20".into()],
            ..model()
        };
        let exact = prompt();
        let keys = PrefixKeys::from_blocks(&exact, routing.block_size);
        let mut vm = Vm::new();
        vm.local
            .learned
            .record(keys.keys(), "127.0.0.1:20#1", 1_000);
        let d = vm.plan_with(&routing, None, None, &keys, None, None).decode;
        assert_eq!(d.mode, Mode::Approximate);
        assert_eq!(d.address(), Some("127.0.0.1:20"));
        assert!(d.cached_blocks > 0);
    }

    #[test]
    fn local_inflight_load_moves_traffic_off_the_cached_worker() {
        let mut vm = Vm::new();
        vm.local.inflight.admit(RequestLoad {
            decode: "127.0.0.1:11",
            prefill: None,
            prefill_tokens: 16 * 50,
            blocks: 50,
        });
        let d = vm.decide(Some(&prompt()), Some(&view()));
        assert_eq!(d.address(), Some("127.0.0.1:10"));
        // The decision still says what the load cost it.
        assert_eq!((d.cached_blocks, d.most_cached_blocks), (0, 3));
    }

    #[test]
    fn a_prompt_being_computed_counts_as_cached_where_it_is_computed() {
        let long: Vec<SeqHash> = (100..132).map(SeqHash).collect();
        let mut vm = Vm::new();
        let first = vm.decide(Some(&long), Some(&view()));
        assert_eq!(first.cached_blocks, 0);
        // Its KV events have not arrived: the same prefix follows it.
        let mut longer = long.clone();
        longer.extend((900..904).map(SeqHash));
        let second = vm.decide(Some(&longer), Some(&view()));
        assert_eq!(second.address(), first.address());
        assert_eq!((second.cached_blocks, second.most_cached_blocks), (32, 32));
        // Another router (or the sidecar explaining) knows nothing of it.
        assert_eq!(
            Vm::new().decide(Some(&longer), Some(&view())).cached_blocks,
            0
        );
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
        assert_eq!(d.address(), Some("127.0.0.1:10"));
    }

    /// An ORCA report of 48 requests.
    fn busy_engine() -> OrcaReport {
        OrcaReport {
            kv_cache_usage: 0.9,
            waiting: 40,
            running: 8,
        }
    }

    #[test]
    fn an_engines_orca_report_is_no_ranks_load() {
        // A report recorded for the engine's address (routed while only
        // endpoints were known) covers all its ranks: it must not make the
        // rank holding the prompt look busy next to a plain worker.
        let mut view = ranks_view();
        view.commit(vec![Change {
            kind: Some(change::Kind::Joined(WorkerJoined {
                worker_id: "plain".into(),
                address: "127.0.0.1:21".into(),
                role: WorkerRole::Both as i32,
                data_parallel_rank: None,
            })),
        }]);
        let mut vm = Vm::new();
        vm.local.orca.record("127.0.0.1:20", busy_engine(), 900);
        let d = vm.decide(Some(&prompt()), Some(&view));
        assert_eq!(d.target.and_then(|t| t.data_parallel_rank()), Some(1));
    }

    #[test]
    fn orca_reports_count_as_load() {
        let mut vm = Vm::new();
        vm.local.orca.record("127.0.0.1:11", busy_engine(), 900);
        let d = vm.decide(Some(&prompt()), Some(&view()));
        assert_eq!(d.address(), Some("127.0.0.1:10"));
    }

    /// The engine of b counts 48 requests, every one routed by gateways
    /// whose decisions the fleet state holds (8 blocks in all): b is no
    /// busier than that, so the prompt it caches still goes there. Counted
    /// at the mean prompt size, the same report steers it away (above).
    #[test]
    fn orca_reports_of_routed_requests_add_nothing_to_their_load() {
        let mut view = view();
        view.commit(vec![Change {
            kind: Some(change::Kind::Load(LoadReport {
                worker_id: "b".into(),
                active_blocks: 8,
                routed_requests: 48,
                ..LoadReport::default()
            })),
        }]);
        let mut vm = Vm::new();
        vm.local.orca.record("127.0.0.1:11", busy_engine(), 900);
        let d = vm.decide(Some(&prompt()), Some(&view));
        assert_eq!(d.address(), Some("127.0.0.1:11"));
    }

    #[test]
    fn without_state_the_learned_table_decides() {
        let long: Vec<SeqHash> = (1..=32).map(SeqHash).collect();
        let keys = PrefixKeys::from_blocks(&long, model().block_size);
        let mut vm = Vm::new();
        let first = vm.decide(Some(&long), None);
        assert_eq!((first.mode, first.cached_blocks), (Mode::Approximate, 0));
        assert_eq!(first.prompt_blocks, 32);
        // The plan remembered its choice: the prompt now goes there as a hit.
        let again = vm.decide(Some(&long), None);
        assert_eq!(
            (again.address(), again.cached_blocks),
            (first.address(), 32)
        );
        // Ties go the same way every time (every VM agrees on a new prefix).
        assert_eq!(Vm::new().decide(Some(&long), None), first);
        // Once the table says the other endpoint holds it, it goes there.
        let other = if first.address() == Some("127.0.0.1:1") {
            "127.0.0.1:2"
        } else {
            "127.0.0.1:1"
        };
        let mut vm = Vm::new();
        vm.local.learned.record(keys.keys(), other, 1_000);
        let learned = vm.decide(Some(&long), None);
        assert_eq!(learned.address(), Some(other));
        assert_eq!(learned.cached_blocks, 32);
        // Fresh fleet state without exact hashes (tokenization failed): the
        // table picks among the fleet's live workers.
        vm.local.learned.record(keys.keys(), "127.0.0.1:10", 1_000);
        assert_eq!(vm.decide(None, Some(&view())).mode, Mode::Fallback);
        let d = vm.plan(None, None, &keys, Some(&view())).decode;
        assert_eq!(d.mode, Mode::Approximate);
        assert_eq!(d.address(), Some("127.0.0.1:10"));
        assert_eq!(d.worker_id.as_deref(), Some("a"));
    }

    #[test]
    fn the_prefill_pool_holds_only_prefill_workers() {
        let exact = prompt();
        let keys = PrefixKeys::from_blocks(&exact, model().block_size);
        let mut vm = Vm::new();
        let pool = prefill_pool(&[]);
        let plan = vm.plan(Some(&pool), Some(&exact), &keys, Some(&view()));
        let prefill = plan.prefill.expect("remote prefill");
        assert_eq!(prefill.worker_id.as_deref(), Some("p"));
        assert_eq!(prefill.cached_blocks, 4);
        assert_eq!(plan.decode.worker_id.as_deref(), Some("b"));
        // Without state, a model without prefill endpoints has no choice.
        let plan = vm.plan(Some(&pool), Some(&exact), &keys, None);
        assert_eq!(plan.prefill, None);
        let pool = prefill_pool(&["127.0.0.1:9"]);
        let plan = vm.plan(Some(&pool), Some(&exact), &keys, None);
        let prefill = plan.prefill.expect("remote prefill on the endpoints");
        assert_eq!(prefill.address(), Some("127.0.0.1:9"));
    }

    #[test]
    fn auto_keeps_a_cached_prompt_local() {
        let exact = prompt();
        let keys = PrefixKeys::from_blocks(&exact, model().block_size);
        let pool = auto_pool(2 * 16, false);
        // One uncached block on the decode worker: below the threshold.
        let plan = Vm::new().plan(Some(&pool), Some(&exact), &keys, Some(&view()));
        assert_eq!(plan.prefill, None);
        let uncached: Vec<SeqHash> = (100..110).map(SeqHash).collect();
        let keys = PrefixKeys::from_blocks(&uncached, model().block_size);
        let plan = Vm::new().plan(Some(&pool), Some(&uncached), &keys, Some(&view()));
        assert!(plan.prefill.is_some());
    }

    #[test]
    fn shared_workers_prefill_for_others_only_when_faster() {
        let uncached: Vec<SeqHash> = (100..110).map(SeqHash).collect();
        let keys = PrefixKeys::from_blocks(&uncached, model().block_size);
        let dedicated = auto_pool(16, false);
        let shared = auto_pool(16, true);
        // Idle fleet: the decode worker (a or b, equally idle) prefills
        // itself when workers are shared.
        let mut vm = Vm::new();
        let plan = vm.plan(Some(&shared), Some(&uncached), &keys, Some(&view()));
        assert!(matches!(plan.decode.worker_id.as_deref(), Some("a" | "b")));
        assert_eq!(plan.prefill, None);
        let plan = vm.plan(Some(&dedicated), Some(&uncached), &keys, Some(&view()));
        assert_eq!(plan.prefill.and_then(|p| p.worker_id).as_deref(), Some("p"));
        // The decode-capable workers a and b are busy prefilling, the
        // prefill worker is down, and c (role `both`) holds many decoding
        // sequences but has no prefill queued: c is no decode choice, but
        // prefills for the busy worker, only when workers are shared. a
        // decodes (one block less queued than b); b (role `both`) could
        // prefill too, but its queue is longer than c's.
        let mut vm = Vm::new();
        let load = [
            ("127.0.0.1:10", 4_000, 0),
            ("127.0.0.1:11", 4_016, 0),
            ("127.0.0.1:13", 0, 10_000),
        ];
        for (address, prefill_tokens, blocks) in load {
            vm.local.inflight.admit(RequestLoad {
                decode: address,
                prefill: None,
                prefill_tokens,
                blocks,
            });
        }
        vm.local.unreachable.mark("127.0.0.1:12", 1_000);
        let mut view = view();
        view.commit(vec![Change {
            kind: Some(change::Kind::Joined(WorkerJoined {
                worker_id: "c".into(),
                address: "127.0.0.1:13".into(),
                role: WorkerRole::Both as i32,
                data_parallel_rank: None,
            })),
        }]);
        let plan = vm.plan(Some(&shared), Some(&uncached), &keys, Some(&view));
        assert_eq!(plan.decode.worker_id.as_deref(), Some("a"));
        let prefill = plan.prefill.expect("c prefills");
        assert_eq!(prefill.worker_id.as_deref(), Some("c"));
        let plan = vm.plan(Some(&dedicated), Some(&uncached), &keys, Some(&view));
        assert_eq!(
            plan.prefill, None,
            "a `both` worker prefills only when shared"
        );
    }

    #[test]
    fn no_prefix_or_no_worker_falls_back() {
        let mut vm = Vm::new();
        assert_eq!(vm.decide(Some(&[]), None).mode, Mode::Fallback);
        for address in ["127.0.0.1:1", "127.0.0.1:2"] {
            vm.local.unreachable.mark(address, 1_000);
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
        assert!(["127.0.0.1:1", "127.0.0.1:2"].contains(&d.address().unwrap()));
    }

    /// On Kubernetes no endpoints are configured: a stale view (the sidecar
    /// gone) still says who the workers are, better than Envoy's own pick.
    #[test]
    fn a_stale_view_names_the_candidates_only_when_no_endpoints_are_configured() {
        let exact = prompt();
        let keys = PrefixKeys::from_blocks(&exact, model().block_size);
        let stale = view();
        let no_endpoints = ModelRouting {
            endpoints: Vec::new(),
            ..model()
        };
        let mut vm = Vm::new();
        let mut decide = |model: &ModelRouting, last_known| {
            vm.plan_with(model, None, Some(&exact), &keys, None, last_known)
                .decode
        };
        let d = decide(&no_endpoints, Some(&stale));
        assert_eq!(d.mode, Mode::Approximate);
        assert!(
            matches!(d.address(), Some("127.0.0.1:10" | "127.0.0.1:11")),
            "{d:?}"
        );
        assert_eq!(decide(&no_endpoints, None).mode, Mode::Fallback);
        let d = decide(&model(), Some(&stale));
        assert!(
            matches!(d.address(), Some("127.0.0.1:1" | "127.0.0.1:2")),
            "{d:?}"
        );
        // Not for the prefill pool, whose load a stale view does not know.
        let plan = vm.plan_with(
            &no_endpoints,
            Some(&prefill_pool(&[])),
            Some(&exact),
            &keys,
            None,
            Some(&stale),
        );
        assert_eq!(plan.decode.mode, Mode::Approximate);
        assert_eq!(plan.prefill, None);
    }

    #[test]
    fn an_unreachable_worker_is_left_out_until_its_hold_ends() {
        let mut vm = Vm::new();
        vm.local.unreachable.mark("127.0.0.1:11", 900);
        let d = vm.decide(Some(&prompt()), Some(&view()));
        assert_eq!((d.mode, d.address()), (Mode::Precise, Some("127.0.0.1:10")));
        vm.local.unreachable.mark("127.0.0.1:10", 900);
        assert_eq!(
            vm.decide(Some(&prompt()), Some(&view())).mode,
            Mode::Fallback
        );
        vm.local.unreachable.clear("127.0.0.1:11");
        let d = vm.decide(Some(&prompt()), Some(&view()));
        assert_eq!(d.address(), Some("127.0.0.1:11"));
    }
}
