//! `scripts/quickstart`: the whole kvmesh stack on simulated GPUs, on one machine.
//!
//! Starts nats-server, N sim-engine workers each with its `kv-sidecar relay`,
//! `kv-sidecar serve`, and Envoy with the kvmesh filter fed by the sidecar;
//! prints one `name: url` line per component once everything is ready
//! (`gateway:` first), and stops every child on Ctrl-C or SIGTERM.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use kvmesh_tests::harness::envoy::ENVOY_WORKER_THREADS;
use kvmesh_tests::harness::fleet::KvWorker;
use kvmesh_tests::harness::sidecar::{Sidecar, SidecarModel};
use kvmesh_tests::harness::sim::SimEngineOptions;
use kvmesh_tests::harness::{free_port, paths, Envoy, GatewayConfig, ModelRoute, NatsServer};
use signal_hook::consts::{SIGINT, SIGTERM};

/// How long the sidecar may take to connect to NATS and load its state.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The gateway is ready only once the sidecar knows every worker and every
/// filter VM has received fleet state; before that it would route blind.
fn wait_for_fleet_state(envoy: &Envoy, sidecar: &Sidecar, workers: usize) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    loop {
        let known = sidecar.known_workers().unwrap_or(0);
        let updates = envoy
            .stat("wasmcustom.kvmesh_state_updates_applied")
            .unwrap_or(0);
        if known >= workers && updates >= ENVOY_WORKER_THREADS {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            anyhow::bail!(
                "fleet state not ready after {READY_TIMEOUT:?}: sidecar knows {known}/{workers} workers, filter applied {updates} updates"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[derive(Debug, Parser)]
#[command(
    about = "Run kvmesh on simulated GPUs: nats-server, sim-engine workers, Envoy with the filter"
)]
struct Args {
    /// Number of simulated (decode) workers.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    workers: u16,
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
    /// KV block size in tokens, shared by the workers and the filter.
    #[arg(long, default_value_t = 16)]
    block_size: u32,
    /// Simulated time runs this many times faster than real time.
    #[arg(long, default_value_t = 1.0)]
    speedup: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Register before starting children so an early Ctrl-C still cleans up.
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("installing signal handlers")?;

    let tokenizer = match args.tokenizer.clone() {
        Some(path) => path,
        None => paths::qwen3_tokenizer_dir()?.join("tokenizer.json"),
    };
    let nats = NatsServer::start().context("starting nats-server")?;
    let mut workers = Vec::with_capacity(usize::from(args.workers));
    for index in 0..args.workers {
        let options = SimEngineOptions::new(&args.model, &format!("worker-{index}"))
            .tokenizer(tokenizer.clone())
            .args(["--speedup".to_owned(), args.speedup.to_string()]);
        let worker = KvWorker::start(&nats.url(), options, args.block_size)
            .with_context(|| format!("starting worker {index} and its relay"))?;
        workers.push(worker);
    }
    let model = SidecarModel {
        name: args.model.clone(),
        block_size: args.block_size,
        tokenizer: Some(tokenizer.clone()),
    };
    let mut sidecar =
        Sidecar::start(&nats.url(), &[model], "").context("starting kv-sidecar serve")?;
    sidecar
        .wait_ready(READY_TIMEOUT)
        .context("waiting for kv-sidecar serve to be ready")?;
    let mut config = GatewayConfig::new(vec![ModelRoute::new(
        &args.model,
        args.block_size,
        workers.iter().map(|w| w.sim.address()).collect(),
    )])?;
    config.gateway_port = args.gateway_port.unwrap_or_else(free_port);
    config.admin_port = args.admin_port.unwrap_or_else(free_port);
    config.sidecar = Some(sidecar.endpoints());
    let mut envoy = Envoy::start(config).context("starting Envoy")?;
    wait_for_fleet_state(&envoy, &sidecar, workers.len())?;

    println!("gateway: {}", envoy.gateway_url());
    println!("nats: {}", nats.url());
    println!("sidecar: {}", sidecar.http_url());
    for worker in &workers {
        println!("worker: {}", worker.sim.url());
    }
    println!("envoy-admin: {}", envoy.admin_url());
    eprintln!(
        "kvmesh is up. Try:\n  curl -s {}/v1/chat/completions -H 'content-type: application/json' \\\n    -d '{{\"model\":\"{}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}],\"max_tokens\":16}}'\nCtrl-C stops everything.",
        envoy.gateway_url(),
        args.model
    );

    loop {
        if let Some(signal) = signals.pending().next() {
            eprintln!("received signal {signal}, stopping");
            break;
        }
        envoy.process().ensure_running()?;
        sidecar.process().ensure_running()?;
        for worker in &mut workers {
            worker.sim.process().ensure_running()?;
            worker.relay.process().ensure_running()?;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Dropping stops the children: Envoy first, so no request hits a dead worker.
    drop(envoy);
    drop(sidecar);
    drop(workers);
    drop(nats);
    Ok(())
}
