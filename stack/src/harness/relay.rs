//! A real `kv-sidecar relay` process.

use std::process::Command;
use std::time::Duration;

use kvmesh_config::EngineKind;

use crate::harness::{free_port, paths, readiness, ManagedProcess};

/// How to start one relay.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    pub engine: EngineKind,
    pub nats_url: String,
    pub worker_id: String,
    pub model: String,
    pub address: String,
    pub block_size: u32,
    pub zmq_endpoint: Option<String>,
    pub zmq_replay_endpoint: Option<String>,
    pub metrics_url: Option<String>,
    pub extra_args: Vec<String>,
}

pub struct Relay {
    process: ManagedProcess,
    listen_port: u16,
    options: RelayOptions,
}

impl Relay {
    /// Starts the relay and waits until `/healthz` says NATS is connected.
    pub fn start(options: &RelayOptions) -> anyhow::Result<Self> {
        let listen_port = free_port();
        let process = Self::spawn(options, listen_port)?;
        Ok(Self {
            process,
            listen_port,
            options: options.clone(),
        })
    }

    /// Kills the relay (as a crash would) and starts it again with the same
    /// options and listen port.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.process.kill();
        self.process = Self::spawn(&self.options, self.listen_port)?;
        Ok(())
    }

    fn spawn(options: &RelayOptions, listen_port: u16) -> anyhow::Result<ManagedProcess> {
        let mut command = Command::new(paths::binary("kv-sidecar")?);
        command.env("RUST_LOG", "info").args([
            "relay",
            "--engine",
            options.engine.as_str(),
            "--nats-url",
            &options.nats_url,
            "--worker-id",
            &options.worker_id,
            "--model",
            &options.model,
            "--address",
            &options.address,
            "--block-size",
            &options.block_size.to_string(),
            "--listen",
            &format!("127.0.0.1:{listen_port}"),
        ]);
        if let Some(endpoint) = &options.zmq_endpoint {
            command.args(["--zmq-endpoint", endpoint]);
        }
        if let Some(endpoint) = &options.zmq_replay_endpoint {
            command.args(["--zmq-replay-endpoint", endpoint]);
        }
        if let Some(url) = &options.metrics_url {
            command.args(["--metrics-url", url]);
        }
        command.args(&options.extra_args);
        let mut process = ManagedProcess::spawn(&format!("relay-{}", options.worker_id), command)?;
        let health = format!("http://127.0.0.1:{listen_port}/healthz");
        readiness::wait_http_ok(&mut process, &health, Duration::from_secs(20))?;
        Ok(process)
    }

    pub fn options(&self) -> &RelayOptions {
        &self.options
    }

    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.listen_port)
    }

    /// Sum of the samples of `name` whose label text contains `labels`.
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        crate::harness::client::prometheus_sum(&self.metrics_url(), name, labels)
    }

    pub fn process(&mut self) -> &mut ManagedProcess {
        &mut self.process
    }
}
