//! A real `kv-sidecar serve` process with a generated kvmesh.yaml on free
//! loopback ports.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use kv_sidecar::serve::config::{ModelConfig, ModelFiles};
use kv_sidecar::serve::stream::StateStreamClient;
use kvmesh_config::ModelSpec;
use router_core::fleet::FleetView;
use router_core::gateway::GatewayReport;
use router_core::state_stream::{state_update, StateUpdate};

use crate::harness::{free_port, paths, readiness, ManagedProcess};

/// One model of the generated config; the rest of its spec is the default.
#[derive(Debug, Clone)]
pub struct SidecarModel {
    pub name: String,
    pub block_size: u32,
    pub tokenizer: Option<PathBuf>,
}

impl SidecarModel {
    pub fn config(&self) -> ModelConfig {
        ModelConfig {
            shared: ModelSpec {
                block_size: self.block_size,
                ..ModelSpec::new(&self.name)
            },
            local: ModelFiles {
                tokenizer: self.tokenizer.clone(),
                chat_template: None,
            },
        }
    }
}

pub struct Sidecar {
    process: ManagedProcess,
    http_port: u16,
    grpc_port: u16,
    config_path: PathBuf,
    _config_dir: tempfile::TempDir,
}

impl Sidecar {
    /// Writes a config for `models` against `nats_url`, starts `serve` and
    /// waits for `/healthz` (not `/readyz`: tests decide what to wait for).
    pub fn start(
        nats_url: &str,
        models: &[SidecarModel],
        extra_state_yaml: &str,
    ) -> anyhow::Result<Self> {
        let models: Vec<ModelConfig> = models.iter().map(SidecarModel::config).collect();
        Self::start_with_specs(nats_url, &models, extra_state_yaml)
    }

    /// As [`start`](Self::start), with each model's whole spec.
    pub fn start_with_specs(
        nats_url: &str,
        models: &[ModelConfig],
        extra_state_yaml: &str,
    ) -> anyhow::Result<Self> {
        let (http_port, grpc_port) = (free_port(), free_port());
        let mut yaml = format!(
            "nats:\n  url: '{nats_url}'\nlisten:\n  http: '127.0.0.1:{http_port}'\n  grpc: '127.0.0.1:{grpc_port}'\n"
        );
        if !extra_state_yaml.is_empty() {
            yaml.push_str("state:\n");
            for line in extra_state_yaml.lines() {
                yaml.push_str(&format!("  {line}\n"));
            }
        }
        yaml.push_str(&serde_norway::to_string(&BTreeMap::from([(
            "models", models,
        )]))?);
        let config_dir = tempfile::tempdir()?;
        let config_path = config_dir.path().join("kvmesh.yaml");
        std::fs::write(&config_path, yaml)?;
        let process = Self::spawn(&config_path, http_port)?;
        Ok(Self {
            process,
            http_port,
            grpc_port,
            config_path,
            _config_dir: config_dir,
        })
    }

    fn spawn(config_path: &std::path::Path, http_port: u16) -> anyhow::Result<ManagedProcess> {
        let mut command = Command::new(paths::binary("kv-sidecar")?);
        command
            .env("RUST_LOG", "info")
            .arg("serve")
            .arg("--config")
            .arg(config_path);
        let mut process = ManagedProcess::spawn("kv-sidecar-serve", command)?;
        let health = format!("http://127.0.0.1:{http_port}/healthz");
        readiness::wait_http_ok(&mut process, &health, Duration::from_secs(30))?;
        Ok(process)
    }

    /// Kills the sidecar (as a crash would) and starts it again with the same
    /// config and ports.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.process.kill();
        self.process = Self::spawn(&self.config_path, self.http_port)?;
        Ok(())
    }

    /// The entries of `GET /v1/workers`.
    pub fn workers(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let mut body: serde_json::Value =
            reqwest::blocking::get(format!("{}/v1/workers", self.http_url()))?.json()?;
        match body["workers"].take() {
            serde_json::Value::Array(workers) => Ok(workers),
            other => anyhow::bail!("/v1/workers without a workers list: {other}"),
        }
    }

    /// Number of workers in `GET /v1/workers`.
    pub fn known_workers(&self) -> anyhow::Result<usize> {
        Ok(self.workers()?.len())
    }

    /// `ip:port` of the gRPC and HTTP listeners, for Envoy's clusters.
    pub fn endpoints(&self) -> crate::harness::SidecarEndpoints {
        crate::harness::SidecarEndpoints {
            grpc: format!("127.0.0.1:{}", self.grpc_port),
            http: format!("127.0.0.1:{}", self.http_port),
        }
    }

    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let url = format!("{}/readyz", self.http_url());
        readiness::wait_http_ok(&mut self.process, &url, timeout)
    }

    /// The sidecar's current state: the snapshot a fresh state-stream
    /// subscription receives first, its chunks applied to a replica (as a
    /// filter does) and taken back as one. The chunks come back to back and
    /// the stream's next update (a delta, at least the once-a-second
    /// keepalive) says the snapshot is whole.
    pub fn state_snapshot(&self) -> anyhow::Result<StateUpdate> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a runtime for the state stream")?;
        runtime.block_on(async {
            let mut client = StateStreamClient::connect(self.grpc_url()).await?;
            let reports = futures_util::stream::pending::<GatewayReport>();
            let mut stream = client.subscribe(reports).await?.into_inner();
            let next = Duration::from_secs(10);
            let first = tokio::time::timeout(next, stream.message())
                .await
                .context("no snapshot within 10 s")??
                .context("the stream ended before a snapshot")?;
            let mut replica = FleetView::new(&first.model, usize::MAX);
            replica.apply(&first)?;
            while let Ok(Ok(Some(update))) = tokio::time::timeout(next, stream.message()).await {
                let continues = matches!(
                    &update.kind,
                    Some(state_update::Kind::Snapshot(chunk)) if chunk.continues
                );
                if !continues {
                    break;
                }
                replica.apply(&update)?;
            }
            Ok(replica.snapshot())
        })
    }

    /// Each worker's blocks in the sidecar's index.
    pub fn blocks_by_worker(&self) -> anyhow::Result<BTreeMap<String, HashSet<u64>>> {
        Ok(blocks_by_worker(&self.state_snapshot()?))
    }

    /// Sum of the samples of `name` whose label text contains `labels`.
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        let url = format!("{}/metrics", self.http_url());
        crate::harness::client::prometheus_sum(&url, name, labels)
    }

    pub fn process(&mut self) -> &mut ManagedProcess {
        &mut self.process
    }
}

/// Each worker's blocks in a state-stream snapshot (empty for other updates).
pub fn blocks_by_worker(snapshot: &StateUpdate) -> BTreeMap<String, HashSet<u64>> {
    match &snapshot.kind {
        Some(state_update::Kind::Snapshot(s)) => s
            .workers
            .iter()
            .map(|w| (w.worker_id.clone(), w.blocks.iter().copied().collect()))
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// Runs `kv-sidecar check-config` on `yaml`: (exit success, stdout + stderr).
pub fn check_config(yaml: &str) -> anyhow::Result<(bool, String)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("kvmesh.yaml");
    std::fs::write(&path, yaml)?;
    let mut command = Command::new(paths::binary("kv-sidecar")?);
    command.arg("check-config").arg("--config").arg(&path);
    crate::harness::process::run_to_completion(command)
}
