//! `scripts/quickstart`: the whole kvmesh stack on simulated GPUs (or real
//! CPU vLLM engines, `--engine vllm`), on one machine.
//!
//! Starts nats-server, N workers each with its `kv-sidecar relay`,
//! `kv-sidecar serve`, and Envoy with the kvmesh filter fed by the sidecar;
//! prints one `name: url` line per component once everything is ready
//! (`gateway:` first) and a `logs:` line, restarts any child that exits (see
//! [`Supervisor`]), and stops every child on Ctrl-C or SIGTERM.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use kvmesh_config::{DisaggregationPolicy, EngineKind};
use kvmesh_stack::harness::free_port;
use kvmesh_stack::harness::stack::{Stack, StackOptions, WorkerEngine};
use kvmesh_stack::harness::supervisor::Supervisor;
use signal_hook::consts::{SIGINT, SIGTERM};

#[derive(Debug, Parser)]
#[command(
    about = "Run kvmesh on simulated GPUs (or real CPU vLLM): nats-server, workers with their relays, Envoy with the filter"
)]
struct Args {
    /// What the workers run.
    #[arg(long, value_enum, default_value_t = WorkerEngine::Sim)]
    engine: WorkerEngine,
    /// Number of (decode) workers.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    workers: u16,
    /// Prefill-only workers; with any, long prompts are prefilled on them
    /// (policy `auto`) and the `--workers` decode only.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=64))]
    prefill_workers: u16,
    /// The prefill/decode handshake the workers speak.
    #[arg(long, value_enum, default_value_t = EngineKind::Vllm)]
    disagg_protocol: EngineKind,
    /// Gateway port on 127.0.0.1 (default: a free port).
    #[arg(long)]
    gateway_port: Option<u16>,
    /// Envoy admin port on 127.0.0.1 (default: a free port).
    #[arg(long)]
    admin_port: Option<u16>,
    /// Model name served by the gateway and the workers.
    #[arg(long, default_value = "qwen3")]
    model: String,
    /// `tokenizer.json` for the workers (default: the Qwen3 test tokenizer from scripts/setup).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// KV block size in tokens, shared by the workers and the filter
    /// (default: 16 for sim, 32 for vLLM, whose CPU backend needs a multiple
    /// of 32).
    #[arg(long)]
    block_size: Option<u32>,
    /// Simulated time runs this many times faster than real time.
    #[arg(long, default_value_t = 1.0)]
    speedup: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Register before starting children so an early Ctrl-C still cleans up.
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("installing signal handlers")?;

    let workers = usize::from(args.workers);
    anyhow::ensure!(
        args.engine == WorkerEngine::Sim || args.prefill_workers == 0,
        "--prefill-workers needs --engine sim"
    );
    let mut options = StackOptions::for_engine(args.engine, &args.model, workers)?;
    if let Some(block_size) = args.block_size {
        options.block_size = block_size;
    }
    options.sim_args = vec!["--speedup".to_owned(), args.speedup.to_string()];
    options.prefill_workers = usize::from(args.prefill_workers);
    options.disaggregation = (DisaggregationPolicy::Auto, args.disagg_protocol);
    if let Some(tokenizer) = args.tokenizer.clone() {
        options.tokenizer = tokenizer;
    }
    let stack = Stack::start(options, |config| {
        config.gateway_port = args.gateway_port.unwrap_or_else(free_port);
        config.admin_port = args.admin_port.unwrap_or_else(free_port);
    })
    .context("starting the kvmesh stack")?;
    let mut supervisor = Supervisor::new(stack).context("supervising the kvmesh stack")?;
    let stack = supervisor.stack();
    let (envoy, nats, sidecar) = (&stack.envoy, &stack.nats, &stack.sidecar);
    println!("gateway: {}", envoy.gateway_url());
    println!("nats: {}", nats.url());
    println!("sidecar: {}", sidecar.http_url());
    for url in stack.worker_urls() {
        println!("worker: {url}");
    }
    for worker in &stack.prefill_workers {
        println!("prefill-worker: {}", worker.sim.url());
    }
    println!("envoy-admin: {}", envoy.admin_url());
    println!("logs: {}", supervisor.log_dir().display());
    eprintln!(
        "kvmesh is up. Try:\n  curl -s {}/v1/chat/completions -H 'content-type: application/json' \\\n    -d '{{\"model\":\"{}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}],\"max_tokens\":16}}'\nA component that exits is restarted. Ctrl-C stops everything.",
        envoy.gateway_url(),
        args.model
    );

    loop {
        if let Some(signal) = signals.pending().next() {
            eprintln!("received signal {signal}, stopping");
            break;
        }
        supervisor.poll();
        std::thread::sleep(Duration::from_millis(200));
    }
    // Dropping the supervisor stops every child, Envoy first.
    drop(supervisor);
    Ok(())
}
