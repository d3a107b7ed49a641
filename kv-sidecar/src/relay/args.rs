//! Command-line flags of `kv-sidecar relay`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use kvmesh_config::{BlockSize, EngineKind, Role};
use router_core::protocol::subjects;

#[derive(Debug, Clone, Args)]
pub struct RelayArgs {
    #[arg(long, value_enum, env = "KVMESH_ENGINE")]
    pub engine: EngineKind,
    /// vLLM/SGLang ZMQ PUB endpoint of KV events, e.g. `tcp://127.0.0.1:5557`.
    #[arg(long, env = "KVMESH_ZMQ_ENDPOINT")]
    pub zmq_endpoint: Option<String>,
    /// vLLM ZMQ ROUTER endpoint that replays buffered batches (fills gaps).
    #[arg(long, env = "KVMESH_ZMQ_REPLAY_ENDPOINT")]
    pub zmq_replay_endpoint: Option<String>,
    /// ZMQ topic to subscribe to; empty subscribes to everything.
    #[arg(long, default_value = "")]
    pub zmq_topic: String,
    /// TensorRT-LLM server base URL, polled at `POST /kv_cache_events`.
    #[arg(long, env = "KVMESH_TRTLLM_URL")]
    pub trtllm_url: Option<String>,
    /// How often to poll TensorRT-LLM for events.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub trtllm_poll_interval: Duration,
    /// Engine Prometheus endpoint, e.g. `http://127.0.0.1:8000/metrics`.
    #[arg(long, env = "KVMESH_METRICS_URL")]
    pub metrics_url: Option<String>,
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub load_interval: Duration,
    #[arg(long, env = "KVMESH_WORKER_ID")]
    pub worker_id: String,
    /// `ip:port` Envoy knows this worker as.
    #[arg(long, env = "KVMESH_ADDRESS")]
    pub address: SocketAddr,
    #[arg(long, value_enum, default_value_t = Role::Both)]
    pub role: Role,
    /// The data-parallel rank this relay's worker is, when the engine's one
    /// API server at `--address` fronts several (vLLM
    /// `--data-parallel-size`, SGLang `--dp-size`); run one relay per rank,
    /// each with its own `--worker-id`. Events come from the rank's own
    /// publisher (the `--zmq-endpoint` port plus the rank, as the engines
    /// bind it), load from the metrics series labelled with the rank, and
    /// gateways steer requests to it with `X-Data-Parallel-Rank`.
    #[arg(long, env = "KVMESH_DATA_PARALLEL_RANK")]
    pub data_parallel_rank: Option<u32>,
    #[arg(long, env = "KVMESH_MODEL")]
    pub model: String,
    /// KV block size; must equal the engine's, blocks of another size are refused.
    #[arg(long, default_value_t = BlockSize::VLLM_DEFAULT)]
    pub block_size: BlockSize,
    /// Non-GPU media whose blocks are indexed too (e.g. `CPU`); GPU always is.
    #[arg(long = "index-medium")]
    pub index_media: Vec<String>,
    #[arg(long, default_value = "nats://127.0.0.1:4222", env = "KVMESH_NATS_URL")]
    pub nats_url: String,
    #[arg(long, env = "KVMESH_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,
    #[arg(long, env = "KVMESH_NATS_USER", requires = "nats_password")]
    pub nats_user: Option<String>,
    #[arg(
        long,
        env = "KVMESH_NATS_PASSWORD",
        hide_env_values = true,
        requires = "nats_user"
    )]
    pub nats_password: Option<String>,
    /// NATS `.creds` file (JWT + NKey seed).
    #[arg(long, env = "KVMESH_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// CA bundle to verify the NATS server; implies TLS.
    #[arg(long)]
    pub nats_tls_ca: Option<PathBuf>,
    /// Client certificate for mutual TLS (with `--nats-tls-key`).
    #[arg(long, requires = "nats_tls_key")]
    pub nats_tls_cert: Option<PathBuf>,
    #[arg(long, requires = "nats_tls_cert")]
    pub nats_tls_key: Option<PathBuf>,
    #[arg(long, default_value = subjects::DEFAULT_PREFIX)]
    pub subject_prefix: String,
    /// Where `/metrics` and `/healthz` of the relay listen.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub listen: SocketAddr,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| text.split_at(i))
        .unwrap_or((text, "s"));
    let value: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 250ms or 2s"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(value)),
        "s" => Ok(Duration::from_secs(value)),
        _ => Err(format!("unknown unit in `{text}` (use ms or s)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("1h").is_err());
    }
}
