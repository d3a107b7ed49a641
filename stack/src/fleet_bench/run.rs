//! One policy on a fresh fleet: start it, replay the workload open-loop in
//! real time (simulated time ÷ speedup), collect what the client saw and what
//! the engines counted.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::ProgressBar;
use serde_json::json;

use crate::fleet_bench::cpu::{CpuShare, CpuTimes};
use crate::fleet_bench::dynamo::DynamoRouting;
use crate::fleet_bench::policy::Policy;
use crate::fleet_bench::prompts::engine_tokenizer;
use crate::fleet_bench::workload::{Conversation, Prompt, Workload};
use crate::harness::client::prometheus_sum;
use crate::harness::dynamo_selector::DynamoSelector;
use crate::harness::fleet::SimHosting;
use crate::harness::load::{stream_timed, Streamed};
use crate::harness::sglang_router::SglangRouter;
use crate::harness::stack::{Stack, StackOptions, WorkerEngine};
use crate::harness::{Envoy, GatewayConfig};
use kvmesh_config::{DisaggregationPolicy, EngineKind};

/// Longest a single request may take, real time.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// The fleet every policy runs on.
#[derive(Debug, Clone, clap::Args)]
pub struct FleetParams {
    /// What the workers run.
    #[arg(long, value_enum, default_value_t = WorkerEngine::Sim)]
    pub engine: WorkerEngine,
    /// Simulated GPUs (prefill plus decode for `precise-disagg`).
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Of `--workers`, how many prefill for `precise-disagg`.
    #[arg(long, default_value_t = 2)]
    pub prefill_workers: usize,
    /// `precise-disagg`'s prefill workers only prefill (role `prefill`),
    /// instead of also serving whole requests (role `both`, the model's
    /// `shared_workers`).
    #[arg(long)]
    pub dedicated_prefill: bool,
    /// With `--dedicated-prefill`: the model's `max_prefill_lag_tokens`
    /// (the filter's default when unset). Shared workers have no lag limit.
    #[arg(long, requires = "dedicated_prefill")]
    pub max_prefill_lag_tokens: Option<u64>,
    /// Simulated time runs this many times faster than real time, for every
    /// workload (default: each workload's own).
    #[arg(long)]
    pub speedup: Option<f64>,
    #[arg(long, default_value = "qwen3")]
    pub model: String,
    /// Envoy worker threads: one filter VM each, and with it one learned
    /// prefix table in approximate mode.
    #[arg(long, default_value_t = 2)]
    pub gateway_threads: u64,
    /// Gateways, each an Envoy with `--gateway-threads` and its own
    /// `kv-sidecar serve`, all on the fleet's one NATS, so kvmesh's sidecars
    /// share each gateway's decisions with the others; plain-Envoy policies
    /// balance per gateway. The client sends each request to the next
    /// gateway in turn, as an L4 balancer in front of them would.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub gateways: u16,
    /// kvmesh's weight of uncached prompt blocks against load (the
    /// filter's `overlap_weight`; its default when unset).
    #[arg(long)]
    pub overlap_weight: Option<f64>,
    /// Dynamo's weight of a prompt's uncached blocks against its workers'
    /// active blocks (`--kv-overlap-score-weight` of its frontend; its
    /// default, 1, when unset), for `dynamo-kv`.
    #[arg(long)]
    pub dynamo_overlap_score_weight: Option<f64>,
    /// Extra sim-engine arguments for every worker, e.g.
    /// `--sim-arg=--timing-compute-us-per-token=40`.
    #[arg(long = "sim-arg", allow_hyphen_values = true)]
    pub sim_args: Vec<String>,
    /// How the sim-engines run (default: one process per worker up to 8
    /// workers, all in one process beyond). Relays stay one per worker.
    #[arg(long, value_enum)]
    pub sim_hosting: Option<SimHosting>,
    /// How often each relay scrapes its engine's load, in ms (default: 200
    /// up to 8 workers; beyond, 1000, the relay's own default: 64 relays
    /// at 200 ms make 320 scrapes/s).
    #[arg(long)]
    pub relay_load_interval_ms: Option<u64>,
    /// Data-parallel ranks per simulated engine: the `--workers` GPUs run
    /// as `workers / N` engines (one address each) of N ranks, as vLLM's
    /// `--data-parallel-size` runs them. kvmesh routes to each rank; the
    /// plain-Envoy policies pick an engine and its own balancer the rank.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub data_parallel_size: u16,
}

/// Largest fleet run as the published 4-worker results were (one sim
/// process per worker, load scraped every 200 ms) unless told otherwise.
const SMALL_FLEET_WORKERS: usize = 8;
const SMALL_FLEET_LOAD_INTERVAL: Duration = Duration::from_millis(200);
/// Larger fleets scrape at the relay's default, as production does.
const LARGE_FLEET_LOAD_INTERVAL: Duration = Duration::from_secs(1);

impl FleetParams {
    fn small(&self) -> bool {
        self.workers <= SMALL_FLEET_WORKERS
    }

    /// `--sim-hosting`, else one process per worker for small fleets.
    pub fn sim_hosting(&self) -> SimHosting {
        self.sim_hosting.unwrap_or(if self.small() {
            SimHosting::ProcessPerWorker
        } else {
            SimHosting::OneProcess
        })
    }

    /// `--relay-load-interval-ms`, else by fleet size.
    pub fn relay_load_interval(&self) -> Duration {
        match self.relay_load_interval_ms {
            Some(ms) => Duration::from_millis(ms),
            None if self.small() => SMALL_FLEET_LOAD_INTERVAL,
            None => LARGE_FLEET_LOAD_INTERVAL,
        }
    }

    /// How much faster than real time `workload` runs.
    pub fn speedup(&self, workload: &Workload) -> f64 {
        self.speedup.unwrap_or(workload.speedup)
    }

    /// The sim-engine arguments of a fleet sized for `workload`.
    pub fn sim_args(&self, workload: &Workload) -> Vec<String> {
        let mut args = vec![
            format!("--speedup={}", self.speedup(workload)),
            format!("--num-gpu-blocks={}", workload.cache_blocks),
            format!("--max-model-len={}", workload.max_model_len),
        ];
        args.extend(workload.sim_args.iter().cloned());
        args.extend(self.sim_args.iter().cloned());
        args
    }
}

/// One request as sent and as answered.
#[derive(Debug)]
pub struct RequestRecord {
    /// Index of the workload arrival (conversation) it belongs to.
    pub conversation: usize,
    /// Real seconds from the start of the replay.
    pub sent_at: f64,
    /// Real seconds the request left after its scheduled arrival (the first
    /// request of a conversation; later turns follow their answers): a
    /// client or machine too busy to keep the open-loop schedule.
    pub late_by: Option<f64>,
    /// Index of the gateway it went through.
    pub gateway: usize,
    pub prompt: Prompt,
    pub outcome: Result<Streamed, String>,
}

/// Everything measured of one policy.
#[derive(Debug)]
pub struct PolicyRun {
    pub policy: Policy,
    pub records: Vec<RequestRecord>,
    /// Real seconds from the first arrival until the last answer ended.
    pub wall: f64,
    /// Prompt tokens the prefilling engines found cached, and all they were
    /// asked for (their `vllm:prefix_cache_*` counters).
    pub cache_hits: f64,
    pub cache_queries: f64,
    /// Requests the engines preempted for KV memory (`vllm:num_preemptions`).
    /// A preempted request is looked up in the prefix cache again when it is
    /// re-admitted, as in vLLM, so preemptions inflate the counters' hit rate.
    pub preemptions: f64,
    /// kvmesh requests routed precise / approximate / fallback, over every
    /// gateway.
    pub modes: Option<[u64; 3]>,
    /// P/D requests prefilled on another worker, and those whose prefill
    /// leg failed so their decode worker computed them, over every gateway.
    pub remote_prefills: Option<[u64; 2]>,
    /// Shares of the cores' time busy during the replay, and used by the
    /// bench and its fleet (Linux only): near 1, the fleet's processes and
    /// the client compete for the cores and latencies measure the machine
    /// more than routing.
    pub cpu: Option<CpuShare>,
}

/// Starts a fleet for `policy`, replays `workload` through it and stops it.
pub fn run_policy(
    workload: &Workload,
    policy: Policy,
    fleet: &FleetParams,
    progress: &ProgressBar,
) -> anyhow::Result<PolicyRun> {
    let prefill_workers = if policy.disaggregated() {
        fleet.prefill_workers
    } else {
        0
    };
    anyhow::ensure!(
        prefill_workers < fleet.workers,
        "--prefill-workers must leave at least one decode worker"
    );
    let decode_workers = fleet.workers - prefill_workers;
    let mut options = match fleet.engine {
        WorkerEngine::Sim => StackOptions::new(&fleet.model, decode_workers)?,
        WorkerEngine::Vllm => {
            anyhow::ensure!(
                prefill_workers == 0,
                "precise-disagg needs --engine sim (the CPU vLLM has no KV transfer)"
            );
            let mut options = StackOptions::vllm(&fleet.model, decode_workers)?;
            if let Some(vllm) = options.vllm.as_mut() {
                // The same KV memory in tokens as the sim fleet the workload
                // was sized for, in vLLM's larger blocks.
                let tokens =
                    u64::from(workload.cache_blocks) * u64::from(WorkerEngine::Sim.block_size());
                vllm.cache_blocks = tokens / u64::from(options.block_size);
                // vLLM refuses a context longer than its cache, whose first
                // block it keeps as the null block.
                let usable = vllm.cache_blocks.saturating_sub(1) * u64::from(options.block_size);
                vllm.max_model_len = workload
                    .max_model_len
                    .min(u32::try_from(usable).unwrap_or(u32::MAX));
            }
            options
        }
    };
    options.sim_args = fleet.sim_args(workload);
    options.sim_hosting = if fleet.data_parallel_size > 1 {
        SimHosting::ProcessPerWorker
    } else {
        fleet.sim_hosting()
    };
    options.data_parallel_size = fleet.data_parallel_size;
    options.relay_load_interval = fleet.relay_load_interval();
    options.prefill_workers = prefill_workers;
    options.disaggregation = (DisaggregationPolicy::Auto, EngineKind::Vllm);
    options.shared_workers = prefill_workers > 0 && !fleet.dedicated_prefill;
    let configure = |config: &mut GatewayConfig| {
        policy.configure(config);
        // The per-request CSV records what the router saw at each decision.
        config.debug_headers = true;
        config.worker_threads = fleet.gateway_threads;
        for model in &mut config.models {
            model.overlap_weight = fleet.overlap_weight;
            if let Some(disaggregation) = model.disaggregation.as_mut() {
                disaggregation.max_prefill_lag_tokens = fleet.max_prefill_lag_tokens;
            }
        }
    };
    let mut stack = Stack::start(options, configure)
        .with_context(|| format!("starting the fleet for {}", policy.label()))?;
    for _ in 1..fleet.gateways {
        stack.add_gateway(configure)?;
    }
    let routing = routing(policy, fleet, &stack)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let cpu = CpuTimes::now();
    let started = Instant::now();
    let records = runtime.block_on(replay(
        workload,
        &fleet.model,
        routing,
        fleet.speedup(workload),
        progress,
    ))?;
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu.and_then(|before| CpuTimes::now()?.share_since(&before));
    // With remote prefill the decode engines "hit" the blocks they pulled;
    // the prefill engines' counters say what caching saved.
    let prefill_urls: Vec<String> = stack.prefill_workers.iter().map(|w| w.sim.url()).collect();
    let prefilling = if policy.disaggregated() {
        prefill_urls.clone()
    } else {
        stack.worker_urls()
    };
    let (mut cache_hits, mut cache_queries) = (0.0, 0.0);
    for url in &prefilling {
        let metrics = format!("{url}/metrics");
        cache_hits += prometheus_sum(&metrics, "vllm:prefix_cache_hits_total", "");
        cache_queries += prometheus_sum(&metrics, "vllm:prefix_cache_queries_total", "");
    }
    let preemptions = stack
        .worker_urls()
        .iter()
        .chain(&prefill_urls)
        .map(|url| prometheus_sum(&format!("{url}/metrics"), "vllm:num_preemptions_total", ""))
        .sum();
    let stat = |name: &str| -> anyhow::Result<u64> {
        let name = format!("wasmcustom.kvmesh_{name}");
        stack.envoys().map(|envoy| envoy.stat(&name)).sum()
    };
    let modes = if policy.kvmesh() {
        Some([
            stat("requests_precise")?,
            stat("requests_approximate")?,
            stat("requests_fallback")?,
        ])
    } else {
        None
    };
    let remote_prefills = if policy.disaggregated() {
        Some([stat("remote_prefills")?, stat("prefill_failures")?])
    } else {
        None
    };
    Ok(PolicyRun {
        policy,
        records,
        wall,
        cache_hits,
        cache_queries,
        preemptions,
        modes,
        remote_prefills,
        cpu,
    })
}

/// Where the replay sends `policy`'s requests, with the processes of a
/// router other than the fleet's Envoys.
fn routing(policy: Policy, fleet: &FleetParams, stack: &Stack) -> anyhow::Result<Routing> {
    if let Some(sglang_policy) = policy.sglang_router_policy() {
        // One SGLang router per gateway, each over every worker: without a
        // shared state each balances on what it sent itself, as Envoys do.
        let routers = (0..fleet.gateways)
            .map(|i| {
                SglangRouter::start(
                    &format!("sglang-router-{i}"),
                    &stack.worker_urls(),
                    sglang_policy,
                )
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        return Ok(Routing::gateways(
            routers.iter().map(SglangRouter::url).collect(),
            routers,
        ));
    }
    if policy != Policy::DynamoKv {
        return Ok(Routing::gateways(
            stack.envoys().map(Envoy::gateway_url).collect(),
            Vec::new(),
        ));
    }
    // One selection service per gateway, replicas sharing the load they
    // book, as several Dynamo frontends' routers; the client sends each
    // request straight to the worker its replica books.
    let selectors = DynamoSelector::start_replicas(
        &fleet.model,
        &stack.event_sources()?,
        usize::from(fleet.gateways),
        fleet.dynamo_overlap_score_weight,
    )?;
    let tokenizer = engine_tokenizer(&fleet.model, fleet.engine.block_size())?;
    Ok(Routing::Dynamo {
        client: DynamoRouting::new(
            selectors.iter().map(DynamoSelector::url).collect(),
            &fleet.model,
            tokenizer,
        ),
        _selectors: selectors,
    })
}

async fn replay(
    workload: &Workload,
    model: &str,
    routing: Routing,
    speedup: f64,
    progress: &ProgressBar,
) -> anyhow::Result<Vec<RequestRecord>> {
    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .pool_max_idle_per_host(256)
        .build()?;
    let context = Arc::new(Replay {
        client,
        routing,
        model: model.to_owned(),
        speedup,
        started: tokio::time::Instant::now(),
        progress: progress.clone(),
    });
    let mut tasks = Vec::with_capacity(workload.arrivals.len());
    for (index, arrival) in workload.arrivals.iter().enumerate() {
        let scheduled = arrival.at / speedup;
        tokio::time::sleep_until(context.started + Duration::from_secs_f64(scheduled)).await;
        let context = Arc::clone(&context);
        let conversation = arrival.conversation.clone();
        tasks.push(tokio::spawn(async move {
            context.converse(index, scheduled, conversation).await
        }));
    }
    let mut records = Vec::with_capacity(workload.requests());
    for task in tasks {
        records.extend(task.await.context("a replay task panicked")?);
    }
    records.sort_by(|a, b| a.sent_at.total_cmp(&b.sent_at));
    Ok(records)
}

/// Where the client sends each request; the routers it started run until
/// the replay drops it.
enum Routing {
    /// To the next gateway in turn, as an L4 balancer in front of them would.
    Gateways {
        /// Base URL of every gateway.
        urls: Vec<String>,
        next: AtomicUsize,
        _sglang_routers: Vec<SglangRouter>,
    },
    /// Where the next of Dynamo's selector replicas books it.
    Dynamo {
        client: DynamoRouting,
        _selectors: Vec<DynamoSelector>,
    },
}

impl Routing {
    fn gateways(urls: Vec<String>, sglang_routers: Vec<SglangRouter>) -> Self {
        Self::Gateways {
            urls,
            next: AtomicUsize::new(0),
            _sglang_routers: sglang_routers,
        }
    }
}

struct Replay {
    client: reqwest::Client,
    routing: Routing,
    model: String,
    speedup: f64,
    started: tokio::time::Instant,
    progress: ProgressBar,
}

impl Replay {
    /// Sends a conversation that was scheduled `scheduled` real seconds
    /// into the replay.
    async fn converse(
        &self,
        index: usize,
        scheduled: f64,
        conversation: Conversation,
    ) -> Vec<RequestRecord> {
        match conversation {
            Conversation::Single { prompt, max_tokens } => {
                vec![self.send(index, prompt, max_tokens, Some(scheduled)).await]
            }
            Conversation::Session {
                system,
                user_turns,
                max_tokens,
                think,
            } => {
                let mut messages = vec![json!({"role": "system", "content": system})];
                let total = user_turns.len();
                let mut records = Vec::with_capacity(total);
                for (turn, user) in user_turns.into_iter().enumerate() {
                    if turn > 0 {
                        tokio::time::sleep(Duration::from_secs_f64(think / self.speedup)).await;
                    }
                    messages.push(json!({"role": "user", "content": user}));
                    let schedule = (turn == 0).then_some(scheduled);
                    let record = self
                        .send(index, Prompt::Chat(messages.clone()), max_tokens, schedule)
                        .await;
                    let Ok(answer) = &record.outcome else {
                        // A session whose answer is lost ends, as a user
                        // would give up; the error is counted.
                        records.push(record);
                        self.progress.inc((total - turn - 1) as u64);
                        break;
                    };
                    messages.push(json!({"role": "assistant", "content": answer.text}));
                    records.push(record);
                }
                records
            }
        }
    }

    async fn send(
        &self,
        conversation: usize,
        prompt: Prompt,
        max_tokens: u32,
        scheduled: Option<f64>,
    ) -> RequestRecord {
        let sent_at = self.started.elapsed().as_secs_f64();
        let body = prompt.body(&self.model, max_tokens);
        let (gateway, outcome) = match &self.routing {
            Routing::Gateways { urls, next, .. } => {
                let gateway = next.fetch_add(1, Ordering::Relaxed) % urls.len();
                let url = format!("{}{}", urls[gateway], prompt.path());
                (gateway, stream_timed(&self.client, &url, &body).await)
            }
            Routing::Dynamo { client, .. } => client.send(&self.client, &prompt, &body).await,
        };
        let outcome = outcome.map_err(|e| format!("{e:#}"));
        self.progress.inc(1);
        RequestRecord {
            conversation,
            sent_at,
            late_by: scheduled.map(|at| (sent_at - at).max(0.0)),
            gateway,
            prompt,
            outcome,
        }
    }
}
