//! The whole kvmesh stack on one machine: nats-server, simulated workers each
//! with its `kv-sidecar relay`, `kv-sidecar serve`, and Envoy with the filter
//! fed by the sidecar. Used by `scripts/quickstart`, the benchmarks and the
//! end-to-end tests.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::harness::envoy::Disaggregation;
use crate::harness::fleet::KvWorker;
use crate::harness::sidecar::{Sidecar, SidecarModel};
use crate::harness::sim::SimEngineOptions;
use crate::harness::{free_port, paths, Envoy, GatewayConfig, ModelRoute, NatsServer};

/// How long the sidecar may take to connect to NATS and load its state, and
/// the filters to receive it.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// `(policy, protocol)` of remote prefill, e.g. `("auto", "vllm")`.
    pub disaggregation: (String, String),
}

impl StackOptions {
    /// `workers` workers serving `model` with the Qwen3 test tokenizer and
    /// 16-token blocks.
    pub fn new(model: &str, workers: usize) -> anyhow::Result<Self> {
        Ok(Self {
            workers,
            model: model.to_owned(),
            block_size: 16,
            tokenizer: paths::qwen3_tokenizer_dir()?.join("tokenizer.json"),
            sim_args: Vec::new(),
            prefill_workers: 0,
            disaggregation: ("auto".to_owned(), "vllm".to_owned()),
        })
    }
}

/// Fields drop in order: Envoy first, so no request reaches a dead worker.
pub struct Stack {
    pub envoy: Envoy,
    pub sidecar: Sidecar,
    pub workers: Vec<KvWorker>,
    pub prefill_workers: Vec<KvWorker>,
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
        let sglang = options.disaggregation.1 == "sglang";
        anyhow::ensure!(
            !(sglang && options.prefill_workers > 1),
            "SGLang-style disaggregation on one host supports one prefill worker: the filter names one bootstrap port per model"
        );
        let bootstrap_port = free_port();
        let disaggregated = options.prefill_workers > 0;
        let start = |name: String, role: &str, extra: Vec<String>| {
            let sim = SimEngineOptions::new(&options.model, &name)
                .tokenizer(options.tokenizer.clone())
                .args(options.sim_args.clone())
                .args(extra);
            KvWorker::start_as(&nats.url(), sim, options.block_size, role)
                .with_context(|| format!("starting {name} and its relay"))
        };
        let mut workers = Vec::with_capacity(options.workers);
        for index in 0..options.workers {
            let role = if disaggregated { "decode" } else { "both" };
            workers.push(start(format!("worker-{index}"), role, Vec::new())?);
        }
        let mut prefill_workers = Vec::with_capacity(options.prefill_workers);
        for index in 0..options.prefill_workers {
            let bootstrap = if sglang {
                vec![
                    "--disaggregation-bootstrap-port".to_owned(),
                    bootstrap_port.to_string(),
                ]
            } else {
                Vec::new()
            };
            prefill_workers.push(start(format!("prefill-{index}"), "prefill", bootstrap)?);
        }
        let model = SidecarModel {
            name: options.model.clone(),
            block_size: options.block_size,
            tokenizer: Some(options.tokenizer.clone()),
        };
        let mut sidecar =
            Sidecar::start(&nats.url(), &[model], "").context("starting kv-sidecar serve")?;
        sidecar
            .wait_ready(READY_TIMEOUT)
            .context("waiting for kv-sidecar serve to be ready")?;
        let mut config = GatewayConfig::new(vec![model_route(
            &options,
            &workers,
            &prefill_workers,
            bootstrap_port,
        )])?;
        config.sidecar = Some(sidecar.endpoints());
        configure(&mut config);
        let vms = config.worker_threads;
        let routes_on_fleet_state = config.filter && config.sidecar.is_some();
        let envoy = Envoy::start(config).context("starting Envoy")?;
        let stack = Self {
            workers,
            prefill_workers,
            sidecar,
            envoy,
            nats,
            options,
            bootstrap_port,
        };
        if routes_on_fleet_state {
            stack.wait_for_fleet_state(vms)?;
        }
        Ok(stack)
    }

    /// The model's route over this stack's workers, for another gateway.
    pub fn model_route(&self) -> ModelRoute {
        model_route(
            &self.options,
            &self.workers,
            &self.prefill_workers,
            self.bootstrap_port,
        )
    }

    /// Every worker known to the sidecar and fleet state in each filter VM:
    /// before that the gateway would route blind.
    fn wait_for_fleet_state(&self, vms: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let known = self.sidecar.known_workers().unwrap_or(0);
            let updates = self
                .envoy
                .stat("wasmcustom.kvmesh_state_updates_applied")
                .unwrap_or(0);
            let expected = self.workers.len() + self.prefill_workers.len();
            if known >= expected && updates >= vms {
                return Ok(());
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "fleet state not ready after {READY_TIMEOUT:?}: sidecar knows {known}/{expected} workers, filters applied {updates} updates"
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn model_route(
    options: &StackOptions,
    workers: &[KvWorker],
    prefill_workers: &[KvWorker],
    bootstrap_port: u16,
) -> ModelRoute {
    let mut route = ModelRoute::new(
        &options.model,
        options.block_size,
        workers.iter().map(|w| w.sim.address()).collect(),
    );
    if !prefill_workers.is_empty() {
        let (policy, protocol) = &options.disaggregation;
        let mut disaggregation = Disaggregation::new(
            policy,
            protocol,
            prefill_workers.iter().map(|w| w.sim.address()).collect(),
        );
        disaggregation.bootstrap_port = Some(bootstrap_port);
        route.disaggregation = Some(disaggregation);
    }
    route
}
