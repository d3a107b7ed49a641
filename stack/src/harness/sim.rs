//! A real sim-engine process on a free loopback port.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::harness::{free_port, paths, readiness, ManagedProcess};

/// How to start one simulated worker.
#[derive(Debug, Clone)]
pub struct SimEngineOptions {
    pub model: String,
    pub worker_id: String,
    /// `tokenizer.json`; `None` uses the sim's byte-level fallback.
    pub tokenizer: Option<PathBuf>,
    /// Further flags passed verbatim (timing model, events, faults).
    pub extra_args: Vec<String>,
}

impl SimEngineOptions {
    pub fn new(model: &str, worker_id: &str) -> Self {
        Self {
            model: model.to_owned(),
            worker_id: worker_id.to_owned(),
            tokenizer: None,
            extra_args: Vec::new(),
        }
    }

    pub fn tokenizer(mut self, path: PathBuf) -> Self {
        self.tokenizer = Some(path);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }
}

pub struct SimEngine {
    process: ManagedProcess,
    port: u16,
    options: SimEngineOptions,
}

impl SimEngine {
    /// Starts a sim-engine and waits for `GET /health`.
    pub fn start(options: SimEngineOptions) -> anyhow::Result<Self> {
        let port = free_port();
        let mut process = Self::spawn(&options, port)?;
        let health = format!("http://127.0.0.1:{port}/health");
        readiness::wait_http_ok(&mut process, &health, Duration::from_secs(30))?;
        Ok(Self {
            process,
            port,
            options,
        })
    }

    fn spawn(options: &SimEngineOptions, port: u16) -> anyhow::Result<ManagedProcess> {
        let mut command = Command::new(paths::binary("sim-engine")?);
        command.args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--model",
            &options.model,
            "--worker-id",
            &options.worker_id,
        ]);
        if let Some(tokenizer) = &options.tokenizer {
            command.arg("--tokenizer").arg(tokenizer);
        }
        command.args(&options.extra_args);
        ManagedProcess::spawn(&format!("sim-engine-{}", options.worker_id), command)
    }

    /// Kills the engine and starts it again on the same port with the same flags.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.process.kill();
        self.process = Self::spawn(&self.options, self.port)?;
        let health = format!("{}/health", self.url());
        readiness::wait_http_ok(&mut self.process, &health, Duration::from_secs(30))
    }

    /// `ip:port` as Envoy knows this worker.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address())
    }

    pub fn worker_id(&self) -> &str {
        &self.options.worker_id
    }

    pub fn process(&mut self) -> &mut ManagedProcess {
        &mut self.process
    }

    /// The kvmesh sequence hashes of the blocks the engine caches now
    /// (`GET /sim/cache`): the ground truth routers are compared with.
    pub fn cached_seq_hashes(&self) -> anyhow::Result<std::collections::HashSet<u64>> {
        let body: serde_json::Value =
            reqwest::blocking::get(format!("{}/sim/cache", self.url()))?.json()?;
        let blocks = body["blocks"]
            .as_array()
            .ok_or_else(|| anyhow::anyhow!("/sim/cache has no blocks array: {body}"))?;
        Ok(blocks
            .iter()
            .filter_map(|b| b["seq_hash"].as_u64())
            .collect())
    }

    /// `requests` completions sharing three 48-token prefixes with varied
    /// tails, distinct per `round`: with a small `--num-gpu-blocks` they force
    /// evictions, so caches churn in both directions.
    pub fn run_eviction_workload(&self, round: u32, requests: u32) -> anyhow::Result<()> {
        let client = reqwest::blocking::Client::new();
        for i in 0..requests {
            let prefix = (i % 3) * 1000 + round * 10_000;
            let mut prompt: Vec<u32> = (prefix..prefix + 48).collect();
            prompt.extend((0..(20 + (i * 7) % 40)).map(|t| 500_000 + round * 10_000 + i * 100 + t));
            let body =
                serde_json::json!({"model": self.options.model, "prompt": prompt, "max_tokens": 4});
            let response = client
                .post(format!("{}/v1/completions", self.url()))
                .json(&body)
                .timeout(Duration::from_secs(20))
                .send()?;
            anyhow::ensure!(
                response.status().is_success(),
                "sim answered {}",
                response.status()
            );
        }
        Ok(())
    }
}
