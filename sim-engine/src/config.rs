//! Command-line flags. Names follow vLLM's where vLLM has the same knob, so a
//! script can swap `vllm serve` for `sim-engine` with few edits.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use kvmesh_config::BlockSize;

use crate::faults::FaultSettings;
use crate::timing::TimingModel;

pub use kvmesh_config::Role;

/// How KV events are encoded inside a batch (docs/relay.md#input-formats-srcdecode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EventFormat {
    /// Each event a msgpack array `[tag, field, ...]` (vLLM ≤ 0.23, SGLang).
    Array,
    /// Each event a msgpack map with `"type"` and non-default fields (newer vLLM).
    Map,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "sim-engine",
    version,
    about = "Simulated GPU worker speaking vLLM's protocols"
)]
pub struct Config {
    /// Simulated workers this process hosts. Each is a whole engine (KV
    /// cache, scheduler, metrics, HTTP listener, KV event sockets) sharing
    /// only the flags and the loaded tokenizer; per-worker flags take one
    /// comma-separated value per worker.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Address to listen on for the OpenAI API, /metrics and /sim/* (every worker).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// HTTP port per worker; one port with `--workers N` means N consecutive
    /// ports from it (0: any free port, logged).
    #[arg(long, value_delimiter = ',', default_value = "8000")]
    pub port: Vec<u16>,
    /// Model name served (`model` in requests, `model_name` metric label).
    #[arg(long, default_value = "sim-model")]
    pub model: String,
    /// A Hugging Face `tokenizer.json`; the chat template comes from the sibling
    /// `tokenizer_config.json`. Without it: byte-level fallback (token id = byte).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Identity reported in the `x-sim-worker-id` response header, one per
    /// worker (default: `sim-0`, `sim-1`, …).
    #[arg(long, value_delimiter = ',')]
    pub worker_id: Vec<String>,

    /// Tokens per KV block.
    #[arg(long, default_value_t = BlockSize::VLLM_DEFAULT)]
    pub block_size: BlockSize,
    /// KV blocks on the simulated GPU (default ≈ an 8B model on an 80 GB H100).
    #[arg(long, default_value_t = 30_000)]
    pub num_gpu_blocks: usize,
    /// Data-parallel ranks behind each worker's one HTTP port, each with its
    /// own KV cache, scheduler, metrics series (`engine="<rank>"`) and KV
    /// event publisher on the endpoint's port plus the rank, as vLLM's
    /// `--data-parallel-size` runs them. `X-Data-Parallel-Rank` picks the
    /// rank; without it the least busy one serves.
    #[arg(long, default_value_t = 1)]
    pub data_parallel_size: usize,
    /// Most requests in one batch.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Most tokens (prefill chunks + decodes) in one iteration.
    #[arg(long, default_value_t = 8192)]
    pub max_num_batched_tokens: usize,
    /// Longest prompt + output accepted.
    #[arg(long, default_value_t = 32_768)]
    pub max_model_len: usize,
    /// `max_tokens` when a request gives none. vLLM would use the rest of the
    /// context window; a simulator defaults to something short.
    #[arg(long, default_value_t = 64)]
    pub default_max_tokens: usize,
    /// Simulated time runs this many times faster than real time.
    #[arg(long, default_value_t = 1.0)]
    pub speedup: f64,

    /// ZMQ PUB endpoint to bind for KV events, e.g. `tcp://127.0.0.1:5557`;
    /// one per worker.
    #[arg(long, value_delimiter = ',')]
    pub kv_events_endpoint: Vec<String>,
    /// ZMQ ROUTER endpoint to bind for replaying buffered event batches; one
    /// per worker.
    #[arg(long, value_delimiter = ',')]
    pub kv_events_replay_endpoint: Vec<String>,
    #[arg(long, default_value = "kv-events")]
    pub kv_events_topic: String,
    #[arg(long, value_enum, default_value_t = EventFormat::Array)]
    pub kv_events_format: EventFormat,
    /// Event batches kept for replay.
    #[arg(long, default_value_t = 10_000)]
    pub kv_events_replay_buffer: usize,
    /// Which side of a disaggregated request this engine takes when both
    /// legs look alike (SGLang's `bootstrap_*` fields).
    #[arg(long, value_enum, default_value_t = Role::Both)]
    pub role: Role,
    /// SGLang rendezvous port of a prefill engine (0: any free port, logged);
    /// one per worker.
    #[arg(long, value_delimiter = ',')]
    pub disaggregation_bootstrap_port: Vec<u16>,
    /// Host decode engines pull this engine's KV from (default: the bound
    /// address; set it when binding 0.0.0.0).
    #[arg(long)]
    pub advertise_host: Option<String>,
    /// How long a prefilled prompt is held for its decode engine to pull
    /// (vLLM: `VLLM_NIXL_ABORT_REQUEST_TIMEOUT`).
    #[arg(long, default_value_t = 480.0)]
    pub kv_transfer_timeout_secs: f64,
    /// Simulated KV-transfer link speed, GB/s (e.g. NIXL over RDMA).
    #[arg(long, default_value_t = 25.0)]
    pub kv_transfer_gbytes_per_second: f64,
    /// Simulated KV bytes per block (2 MiB: 16 tokens of an 8B model).
    #[arg(long, default_value_t = 2 * 1024 * 1024)]
    pub kv_bytes_per_block: u64,
    /// Seed of the engine's block hash chain (vLLM: `PYTHONHASHSEED`).
    #[arg(long, default_value = "0")]
    pub engine_hash_seed: String,

    #[command(flatten)]
    pub timing: TimingModel,
    #[command(flatten)]
    pub faults: FaultSettings,
}

impl Config {
    /// Checks the combinations clap cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.num_gpu_blocks >= 1,
            "--num-gpu-blocks must be at least 1"
        );
        anyhow::ensure!(self.max_num_seqs >= 1, "--max-num-seqs must be at least 1");
        anyhow::ensure!(
            (1..=256).contains(&self.data_parallel_size),
            "--data-parallel-size must be 1 to 256"
        );
        anyhow::ensure!(
            self.max_num_batched_tokens >= 1,
            "--max-num-batched-tokens must be at least 1"
        );
        anyhow::ensure!(
            self.speedup.is_finite() && self.speedup > 0.0,
            "--speedup must be a positive number"
        );
        anyhow::ensure!(
            self.kv_transfer_timeout_secs.is_finite() && self.kv_transfer_timeout_secs > 0.0,
            "--kv-transfer-timeout-secs must be a positive number"
        );
        anyhow::ensure!(
            self.kv_transfer_gbytes_per_second.is_finite()
                && self.kv_transfer_gbytes_per_second > 0.0,
            "--kv-transfer-gbytes-per-second must be a positive number"
        );
        self.timing.validate()?;
        self.faults.validate()?;
        Ok(())
    }
}
