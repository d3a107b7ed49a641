//! Simulated GPU workers as kvmesh sees them in production: sim-engines
//! publishing vLLM KV events, each with the `kv-sidecar relay` beside it
//! forwarding them (and the engine's load) to NATS. The engines run one
//! process each or all in one process ([`SimHosting`]); the relays run one
//! process per engine either way, as in production.

use std::time::Duration;

use anyhow::Context;
use kvmesh_config::{EngineKind, Role};

use crate::harness::relay::{Relay, RelayOptions};
use crate::harness::sim::{HostedWorker, KvEventEndpoints, SimEngineOptions};
use crate::harness::SimEngine;

/// How often a relay scrapes its engine's `/metrics` for load unless told
/// otherwise: often enough that tests see load move within a second.
pub const DEFAULT_LOAD_INTERVAL: Duration = Duration::from_millis(200);

/// How a fleet's sim-engines are hosted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SimHosting {
    /// One sim-engine process per worker, so each can be killed and
    /// restarted alone (the failure and chaos tests do).
    #[default]
    ProcessPerWorker,
    /// One sim-engine process hosting every worker (`sim-engine --workers
    /// N`), each still with its own engine, ports, events and metrics: one
    /// runtime and one loaded tokenizer for tens of workers.
    OneProcess,
}

pub struct KvWorker {
    pub sim: SimEngine,
    pub relay: Relay,
}

/// Workers alike but for their ids, and how to start them.
#[derive(Debug, Clone)]
pub struct SimFleet {
    /// Model, tokenizer and flags of every engine; its worker id is unused.
    pub engine: SimEngineOptions,
    pub block_size: u32,
    /// The engines' and the relays' role.
    pub role: Role,
    pub hosting: SimHosting,
    /// The relays' `--load-interval`.
    pub load_interval: Duration,
    /// Data-parallel ranks per engine: the workers are the ranks of
    /// `workers / data_parallel_size` engines (one process and address
    /// each, `--data-parallel-size`), each rank with its own relay
    /// (`--data-parallel-rank`). 1: every worker is an engine.
    pub data_parallel_size: u16,
}

impl SimFleet {
    /// Workers of `role` serving `engine` in one process each, relays
    /// scraping load every [`DEFAULT_LOAD_INTERVAL`].
    pub fn new(engine: SimEngineOptions, block_size: u32, role: Role) -> Self {
        Self {
            engine,
            block_size,
            role,
            hosting: SimHosting::default(),
            load_interval: DEFAULT_LOAD_INTERVAL,
            data_parallel_size: 1,
        }
    }

    /// Starts one worker per id, with ZMQ events and replay on free ports,
    /// then each worker's relay.
    pub fn start(&self, nats_url: &str, worker_ids: &[String]) -> anyhow::Result<Vec<KvWorker>> {
        if self.data_parallel_size > 1 {
            return self.start_ranked(nats_url, worker_ids);
        }
        let events: Vec<KvEventEndpoints> = worker_ids
            .iter()
            .map(|_| KvEventEndpoints::on_free_ports())
            .collect();
        let engine = self.engine_options();
        let sims = match self.hosting {
            SimHosting::ProcessPerWorker => worker_ids
                .iter()
                .zip(&events)
                .map(|(id, events)| {
                    let options = SimEngineOptions {
                        worker_id: id.clone(),
                        ..engine.clone()
                    };
                    SimEngine::start(options.args(events.args()))
                        .with_context(|| format!("starting sim-engine {id}"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?,
            SimHosting::OneProcess => {
                let hosted: Vec<HostedWorker> = worker_ids
                    .iter()
                    .zip(&events)
                    .map(|(id, events)| HostedWorker {
                        worker_id: id.clone(),
                        kv_events: Some(events.clone()),
                    })
                    .collect();
                SimEngine::start_hosted(&engine, &hosted)
                    .context("starting the sim-engine process hosting the fleet")?
            }
        };
        sims.into_iter()
            .zip(&events)
            .map(|(sim, events)| {
                let relay = self
                    .start_relay(nats_url, &sim, events, None)
                    .with_context(|| format!("starting the relay of {}", sim.worker_id()))?;
                Ok(KvWorker { sim, relay })
            })
            .collect()
    }

    /// The workers as ranks of engines of `data_parallel_size` ranks, in
    /// order: `worker_ids[0..n]` are the first engine's ranks 0..n.
    fn start_ranked(&self, nats_url: &str, worker_ids: &[String]) -> anyhow::Result<Vec<KvWorker>> {
        let ranks = usize::from(self.data_parallel_size);
        anyhow::ensure!(
            self.hosting == SimHosting::ProcessPerWorker,
            "data-parallel ranks run one sim-engine process per engine"
        );
        anyhow::ensure!(
            worker_ids.len().is_multiple_of(ranks),
            "{} workers are not whole engines of {ranks} data-parallel ranks",
            worker_ids.len()
        );
        let engine = self.engine_options();
        let mut workers = Vec::with_capacity(worker_ids.len());
        for ids in worker_ids.chunks(ranks) {
            let events = KvEventEndpoints::on_free_ports_for_ranks(self.data_parallel_size)?;
            let sims = SimEngine::start_ranks(&engine, ids, &events)
                .with_context(|| format!("starting the engine of {}", ids.join(", ")))?;
            for (rank, sim) in sims.into_iter().enumerate() {
                let relay = self
                    .start_relay(nats_url, &sim, &events, Some(rank))
                    .with_context(|| format!("starting the relay of {}", sim.worker_id()))?;
                workers.push(KvWorker { sim, relay });
            }
        }
        Ok(workers)
    }

    /// Every engine's flags: the fleet's, then its block size and role.
    fn engine_options(&self) -> SimEngineOptions {
        self.engine.clone().args([
            "--block-size".to_owned(),
            self.block_size.to_string(),
            "--role".to_owned(),
            self.role.to_string(),
        ])
    }

    fn start_relay(
        &self,
        nats_url: &str,
        sim: &SimEngine,
        events: &KvEventEndpoints,
        rank: Option<usize>,
    ) -> anyhow::Result<Relay> {
        let mut extra_args = vec![
            "--load-interval".into(),
            format!("{}ms", self.load_interval.as_millis()),
            "--role".into(),
            self.role.to_string(),
        ];
        if let Some(rank) = rank {
            extra_args.extend(["--data-parallel-rank".to_owned(), rank.to_string()]);
        }
        Relay::start(&RelayOptions {
            engine: EngineKind::Vllm,
            nats_url: nats_url.to_owned(),
            worker_id: sim.worker_id().to_owned(),
            model: self.engine.model.clone(),
            address: sim.address(),
            block_size: self.block_size,
            zmq_endpoint: Some(events.publish.clone()),
            zmq_replay_endpoint: Some(events.replay.clone()),
            metrics_url: Some(format!("{}/metrics", sim.url())),
            extra_args,
        })
    }
}

impl KvWorker {
    /// Starts the engine with ZMQ events and replay on free ports, then its relay.
    pub fn start(
        nats_url: &str,
        options: SimEngineOptions,
        block_size: u32,
    ) -> anyhow::Result<Self> {
        Self::start_as(nats_url, options, block_size, Role::Both)
    }

    /// As [`start`](Self::start), for a worker of a disaggregated fleet:
    /// `role` is the engine's and the relay's.
    pub fn start_as(
        nats_url: &str,
        options: SimEngineOptions,
        block_size: u32,
        role: Role,
    ) -> anyhow::Result<Self> {
        let ids = [options.worker_id.clone()];
        SimFleet::new(options, block_size, role)
            .start(nats_url, &ids)?
            .pop()
            .context("a fleet of one started no worker")
    }
}
