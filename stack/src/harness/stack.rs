//! The whole kvmesh stack on one machine: nats-server, simulated (or real
//! vLLM) workers each with its `kv-sidecar relay`, and a gateway — Envoy
//! with the filter fed by its own `kv-sidecar serve` — or several
//! ([`Stack::add_gateway`]). Used by `scripts/quickstart`, the benchmarks and
//! the end-to-end tests.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use kv_sidecar::serve::config::ModelConfig;
use kvmesh_config::{
    DisaggregationPolicy, DisaggregationSpec, EngineKind, NoLocalFields, Role, WithLocal,
};

use crate::harness::envoy::Disaggregation;
use crate::harness::fleet::{KvWorker, SimFleet, SimHosting, DEFAULT_LOAD_INTERVAL};
use crate::harness::gateway::{wait_for_fleet_state, Gateway};
use crate::harness::sidecar::{Sidecar, SidecarModel};
use crate::harness::sim::{KvEventEndpoints, SimEngineOptions};
use crate::harness::vllm::{VllmEngine, VllmOptions, VllmWorker};
use crate::harness::{free_port, paths, Envoy, GatewayConfig, ModelRoute, NatsServer};

/// What a stack's workers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkerEngine {
    /// sim-engine: simulated GPUs with a timing model.
    Sim,
    /// Real vLLM on CPU serving a tiny random-weight Qwen3 (`scripts/setup
    /// --with-vllm`): real caching and scheduling, CPU timings.
    Vllm,
}

impl WorkerEngine {
    /// Tokens per KV block: vLLM's CPU backend wants a multiple of 32.
    pub fn block_size(self) -> u32 {
        match self {
            Self::Sim => 16,
            Self::Vllm => 32,
        }
    }
}

#[derive(Debug, Clone)]
pub struct StackOptions {
    pub workers: usize,
    pub model: String,
    pub block_size: u32,
    /// `tokenizer.json` of the workers and the sidecar.
    pub tokenizer: PathBuf,
    /// Extra sim-engine arguments, e.g. `--speedup 20`.
    pub sim_args: Vec<String>,
    /// Prefill-only workers; with any, the others decode only and the
    /// filter prefills remotely as `disaggregation` says.
    pub prefill_workers: usize,
    /// `(policy, protocol)` of remote prefill.
    pub disaggregation: (DisaggregationPolicy, EngineKind),
    /// The prefill workers are of role `both` (`shared_workers` of the
    /// model's disaggregation): they serve whole requests too, so they are
    /// in the model's pool as well as in the prefill pool.
    pub shared_workers: bool,
    /// `Some`: the workers are real vLLM engines (`scripts/setup
    /// --with-vllm`) instead of sim-engines, in [`Stack::vllm_workers`].
    pub vllm: Option<VllmFleet>,
    /// One sim-engine process per worker (default: engines can be killed
    /// alone), or one for the decode workers and one for the prefill workers.
    pub sim_hosting: SimHosting,
    /// How often each sim worker's relay scrapes its engine's load.
    pub relay_load_interval: Duration,
    /// Data-parallel ranks per sim engine: the (decode) workers are the
    /// ranks of `workers / data_parallel_size` engines, one address each.
    pub data_parallel_size: u16,
}

/// The real-vLLM workers of a stack; the block size is the stack's.
#[derive(Debug, Clone)]
pub struct VllmFleet {
    /// KV cache capacity of each engine, in blocks.
    pub cache_blocks: u64,
    pub max_model_len: u32,
    /// Further engine flags for every worker.
    pub extra_args: Vec<String>,
}

impl Default for VllmFleet {
    fn default() -> Self {
        let defaults = VllmOptions::new("", "");
        Self {
            cache_blocks: defaults.cache_blocks,
            max_model_len: defaults.max_model_len,
            extra_args: Vec::new(),
        }
    }
}

impl StackOptions {
    /// `workers` workers serving `model` with the Qwen3 test tokenizer and
    /// 16-token blocks.
    pub fn new(model: &str, workers: usize) -> anyhow::Result<Self> {
        Ok(Self {
            workers,
            model: model.to_owned(),
            block_size: WorkerEngine::Sim.block_size(),
            tokenizer: paths::qwen3_tokenizer_dir()?.join("tokenizer.json"),
            sim_args: Vec::new(),
            prefill_workers: 0,
            disaggregation: (DisaggregationPolicy::Auto, EngineKind::Vllm),
            shared_workers: false,
            vllm: None,
            sim_hosting: SimHosting::default(),
            relay_load_interval: DEFAULT_LOAD_INTERVAL,
            data_parallel_size: 1,
        })
    }

    /// `workers` real vLLM workers with their block size.
    pub fn vllm(model: &str, workers: usize) -> anyhow::Result<Self> {
        let mut options = Self::new(model, workers)?;
        options.block_size = WorkerEngine::Vllm.block_size();
        options.vllm = Some(VllmFleet::default());
        Ok(options)
    }

    /// `decode` decode-only and `prefill` prefill-only sim workers; the
    /// filter (and the sidecar's `/debug/route`) prefill remotely as
    /// `policy` says, over `protocol`'s handshake.
    pub fn disaggregated(
        model: &str,
        decode: usize,
        prefill: usize,
        policy: DisaggregationPolicy,
        protocol: EngineKind,
    ) -> anyhow::Result<Self> {
        let mut options = Self::new(model, decode)?;
        options.prefill_workers = prefill;
        options.disaggregation = (policy, protocol);
        Ok(options)
    }

    /// `workers` workers running `engine`.
    pub fn for_engine(engine: WorkerEngine, model: &str, workers: usize) -> anyhow::Result<Self> {
        match engine {
            WorkerEngine::Sim => Self::new(model, workers),
            WorkerEngine::Vllm => Self::vllm(model, workers),
        }
    }
}

/// An engine as a router that indexes engines' KV events itself sees it.
#[derive(Debug, Clone)]
pub struct EventSource {
    /// Base URL requests go to.
    pub url: String,
    /// The sockets its relay reads.
    pub events: KvEventEndpoints,
    pub block_size: u32,
}

/// Fields drop in order: the Envoys first, so no request reaches a dead
/// worker. `envoy` and `sidecar` are the first gateway.
pub struct Stack {
    pub envoy: Envoy,
    /// Gateways started by [`Stack::add_gateway`], each with its own sidecar.
    pub more_gateways: Vec<Gateway>,
    pub sidecar: Sidecar,
    pub workers: Vec<KvWorker>,
    pub prefill_workers: Vec<KvWorker>,
    /// The workers when [`StackOptions::vllm`] is set (`workers` is empty).
    pub vllm_workers: Vec<VllmWorker>,
    pub nats: NatsServer,
    options: StackOptions,
    /// SGLang rendezvous port of the prefill worker.
    bootstrap_port: u16,
}

impl Stack {
    /// Starts everything and returns once every filter VM has fleet state
    /// (unless `configure` removes the filter or its sidecar); `configure`
    /// adjusts the gateway before Envoy starts.
    pub fn start(
        options: StackOptions,
        configure: impl FnOnce(&mut GatewayConfig),
    ) -> anyhow::Result<Self> {
        let nats = NatsServer::start().context("starting nats-server")?;
        let sglang = options.disaggregation.1 == EngineKind::Sglang;
        anyhow::ensure!(
            !(sglang && options.prefill_workers > 1),
            "SGLang-style disaggregation on one host supports one prefill worker: the filter names one bootstrap port per model"
        );
        let bootstrap_port = free_port();
        let disaggregated = options.prefill_workers > 0;
        let start = |prefix: &str, count: usize, role: Role, extra: Vec<String>, ranks: u16| {
            let engine = SimEngineOptions::new(&options.model, "")
                .tokenizer(options.tokenizer.clone())
                .args(options.sim_args.clone())
                .args(extra);
            let fleet = SimFleet {
                hosting: options.sim_hosting,
                load_interval: options.relay_load_interval,
                data_parallel_size: ranks,
                ..SimFleet::new(engine, options.block_size, role)
            };
            let ids: Vec<String> = (0..count).map(|i| format!("{prefix}-{i}")).collect();
            fleet
                .start(&nats.url(), &ids)
                .with_context(|| format!("starting the {prefix}s and their relays"))
        };
        let vllm_workers = match &options.vllm {
            Some(fleet) => {
                anyhow::ensure!(
                    options.prefill_workers == 0,
                    "a real-vLLM stack has no prefill workers"
                );
                start_vllm_workers(&nats.url(), &options, fleet)?
            }
            None => Vec::new(),
        };
        let sim_workers = if options.vllm.is_some() {
            0
        } else {
            options.workers
        };
        let role = if disaggregated {
            Role::Decode
        } else {
            Role::Both
        };
        let workers = start(
            "worker",
            sim_workers,
            role,
            Vec::new(),
            options.data_parallel_size,
        )?;
        let bootstrap = if sglang {
            vec![
                "--disaggregation-bootstrap-port".to_owned(),
                bootstrap_port.to_string(),
            ]
        } else {
            Vec::new()
        };
        let prefill_role = if options.shared_workers {
            Role::Both
        } else {
            Role::Prefill
        };
        let prefill_workers = start(
            "prefill",
            options.prefill_workers,
            prefill_role,
            bootstrap,
            1,
        )?;
        let gateway = Gateway::start(
            &nats.url(),
            &[sidecar_model(&options)],
            vec![model_route(
                &options,
                &worker_addresses(&workers, &vllm_workers),
                &prefill_workers,
                bootstrap_port,
            )],
            configure,
        )?;
        let Gateway { envoy, sidecar } = gateway;
        let stack = Self {
            workers,
            prefill_workers,
            vllm_workers,
            sidecar,
            envoy,
            more_gateways: Vec::new(),
            nats,
            options,
            bootstrap_port,
        };
        wait_for_fleet_state(&stack.envoy, &stack.sidecar, stack.worker_count())?;
        Ok(stack)
    }

    /// Starts one more gateway — Envoy and its own `kv-sidecar serve` — on
    /// this stack's NATS and workers, as a deployment scales its gateways
    /// out; returns once its filter VMs have fleet state. `configure` adjusts
    /// its Envoy as [`start`](Self::start)'s does the first gateway's.
    pub fn add_gateway(
        &mut self,
        configure: impl FnOnce(&mut GatewayConfig),
    ) -> anyhow::Result<&Gateway> {
        let index = self.more_gateways.len() + 1;
        let gateway = Gateway::start(
            &self.nats.url(),
            &[sidecar_model(&self.options)],
            vec![self.model_route()],
            configure,
        )
        .with_context(|| format!("starting gateway {index}"))?;
        gateway.wait_for_fleet_state(self.worker_count())?;
        self.more_gateways.push(gateway);
        Ok(&self.more_gateways[self.more_gateways.len() - 1])
    }

    /// Every gateway's Envoy: the first one's, then those of
    /// [`add_gateway`](Self::add_gateway) in order.
    pub fn envoys(&self) -> impl Iterator<Item = &Envoy> {
        std::iter::once(&self.envoy).chain(self.more_gateways.iter().map(|g| &g.envoy))
    }

    /// Every gateway's sidecar, in the order of [`envoys`](Self::envoys).
    pub fn sidecars(&self) -> impl Iterator<Item = &Sidecar> {
        std::iter::once(&self.sidecar).chain(self.more_gateways.iter().map(|g| &g.sidecar))
    }

    /// The model's route over this stack's workers, for another gateway.
    pub fn model_route(&self) -> ModelRoute {
        model_route(
            &self.options,
            &self.worker_addresses(),
            &self.prefill_workers,
            self.bootstrap_port,
        )
    }

    /// `ip:port` of every (decode) engine, simulated or vLLM: once per
    /// engine, however many data-parallel ranks it runs.
    pub fn worker_addresses(&self) -> Vec<String> {
        worker_addresses(&self.workers, &self.vllm_workers)
    }

    /// Base URL of every (decode) worker, simulated or vLLM.
    pub fn worker_urls(&self) -> Vec<String> {
        self.worker_addresses()
            .iter()
            .map(|a| format!("http://{a}"))
            .collect()
    }

    /// Every (decode) worker's engine and KV event sockets, as its relay
    /// reads them: for a router that indexes the engines' events itself.
    pub fn event_sources(&self) -> anyhow::Result<Vec<EventSource>> {
        anyhow::ensure!(
            self.options.data_parallel_size == 1,
            "event sources of data-parallel ranks are not listed: each rank publishes on the engine's ports plus its rank"
        );
        self.workers
            .iter()
            .map(|w| &w.relay)
            .chain(self.vllm_workers.iter().map(|w| &w.relay))
            .map(|relay| {
                let options = relay.options();
                let socket = |endpoint: &Option<String>| {
                    endpoint
                        .clone()
                        .with_context(|| format!("{} reads no KV events", options.worker_id))
                };
                Ok(EventSource {
                    url: format!("http://{}", options.address),
                    events: KvEventEndpoints {
                        publish: socket(&options.zmq_endpoint)?,
                        replay: socket(&options.zmq_replay_endpoint)?,
                    },
                    block_size: options.block_size,
                })
            })
            .collect()
    }

    /// Workers of every pool, as the sidecars count them.
    fn worker_count(&self) -> usize {
        self.workers.len() + self.prefill_workers.len() + self.vllm_workers.len()
    }
}

/// The sidecars' spec of the stack's model: the filter's, so `/debug/route`
/// plans the remote prefill too.
fn sidecar_model(options: &StackOptions) -> ModelConfig {
    let mut model = SidecarModel {
        name: options.model.clone(),
        block_size: options.block_size,
        tokenizer: Some(options.tokenizer.clone()),
    }
    .config();
    if options.prefill_workers > 0 {
        model.disaggregation = Some(WithLocal {
            shared: DisaggregationSpec {
                policy: options.disaggregation.0,
                shared_workers: options.shared_workers,
                ..DisaggregationSpec::default()
            },
            local: NoLocalFields {},
        });
    }
    model
}

/// Spawns every engine first so they load in parallel, then gives each ready
/// one its relay.
fn start_vllm_workers(
    nats_url: &str,
    options: &StackOptions,
    fleet: &VllmFleet,
) -> anyhow::Result<Vec<VllmWorker>> {
    let mut engines = Vec::with_capacity(options.workers);
    for index in 0..options.workers {
        let mut engine = VllmOptions::new(&options.model, &format!("worker-{index}"));
        engine.block_size = options.block_size;
        engine.cache_blocks = fleet.cache_blocks;
        engine.max_model_len = fleet.max_model_len;
        engine.extra_args = fleet.extra_args.clone();
        engines.push(VllmEngine::spawn(engine).with_context(|| format!("starting vLLM {index}"))?);
    }
    let mut workers = Vec::with_capacity(engines.len());
    for mut engine in engines {
        engine.wait_ready()?;
        workers.push(VllmWorker::attach(nats_url, engine)?);
    }
    Ok(workers)
}

/// Each engine's address once: the data-parallel ranks of one engine share
/// theirs.
fn worker_addresses(workers: &[KvWorker], vllm_workers: &[VllmWorker]) -> Vec<String> {
    let mut addresses: Vec<String> = Vec::new();
    let all = workers
        .iter()
        .map(|w| w.sim.address())
        .chain(vllm_workers.iter().map(|w| w.engine.address()));
    for address in all {
        if !addresses.contains(&address) {
            addresses.push(address);
        }
    }
    addresses
}

fn model_route(
    options: &StackOptions,
    workers: &[String],
    prefill_workers: &[KvWorker],
    bootstrap_port: u16,
) -> ModelRoute {
    let prefill: Vec<String> = prefill_workers.iter().map(|w| w.sim.address()).collect();
    let mut pool = workers.to_vec();
    if options.shared_workers {
        pool.extend(prefill.iter().cloned());
    }
    let mut route = ModelRoute::new(&options.model, options.block_size, pool);
    if !prefill_workers.is_empty() {
        let (policy, protocol) = options.disaggregation;
        let mut disaggregation = Disaggregation::new(policy, protocol, prefill);
        disaggregation.bootstrap_port = Some(bootstrap_port);
        disaggregation.shared_workers = options.shared_workers;
        route.disaggregation = Some(disaggregation);
    }
    route
}
