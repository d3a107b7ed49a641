//! A simulated GPU worker as kvmesh sees it in production: a sim-engine
//! publishing vLLM KV events, and the `kv-sidecar relay` beside it forwarding
//! them (and the engine's load) to NATS.

use kvmesh_config::{EngineKind, Role};

use crate::harness::relay::{Relay, RelayOptions};
use crate::harness::sim::SimEngineOptions;
use crate::harness::{free_port, SimEngine};

pub struct KvWorker {
    pub sim: SimEngine,
    pub relay: Relay,
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
        let (events, replay) = (free_port(), free_port());
        let model = options.model.clone();
        let worker_id = options.worker_id.clone();
        let options = options.args([
            "--kv-events-endpoint".to_owned(),
            format!("tcp://127.0.0.1:{events}"),
            "--kv-events-replay-endpoint".to_owned(),
            format!("tcp://127.0.0.1:{replay}"),
            "--block-size".to_owned(),
            block_size.to_string(),
            "--role".to_owned(),
            role.to_string(),
        ]);
        let sim = SimEngine::start(options)?;
        let relay = Relay::start(&RelayOptions {
            engine: EngineKind::Vllm,
            nats_url: nats_url.to_owned(),
            worker_id,
            model,
            address: sim.address(),
            block_size,
            zmq_endpoint: Some(format!("tcp://127.0.0.1:{events}")),
            zmq_replay_endpoint: Some(format!("tcp://127.0.0.1:{replay}")),
            metrics_url: Some(format!("{}/metrics", sim.url())),
            extra_args: vec![
                "--load-interval".into(),
                "200ms".into(),
                "--role".into(),
                role.to_string(),
            ],
        })?;
        Ok(Self { sim, relay })
    }
}
