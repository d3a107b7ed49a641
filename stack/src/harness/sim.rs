//! Real sim-engine workers on free loopback ports: one process each, or
//! many in one process (`sim-engine --workers N`).

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use crate::harness::ports::free_consecutive_ports;
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

/// The per-worker flags of one worker in a shared process.
#[derive(Debug, Clone)]
pub struct HostedWorker {
    pub worker_id: String,
    /// Its own KV event sockets; every worker of a process has them or none.
    pub kv_events: Option<KvEventEndpoints>,
}

/// ZMQ endpoints a worker binds for its KV events.
#[derive(Debug, Clone)]
pub struct KvEventEndpoints {
    /// PUB socket of live event batches.
    pub publish: String,
    /// ROUTER socket answering replay requests.
    pub replay: String,
}

impl KvEventEndpoints {
    /// Both sockets on free loopback ports.
    pub fn on_free_ports() -> Self {
        Self {
            publish: format!("tcp://127.0.0.1:{}", free_port()),
            replay: format!("tcp://127.0.0.1:{}", free_port()),
        }
    }

    /// Both sockets of each of `ranks` data-parallel ranks: the ranks bind
    /// these ports plus their rank, so each is the first of a free run.
    pub fn on_free_ports_for_ranks(ranks: u16) -> anyhow::Result<Self> {
        Ok(Self {
            publish: format!("tcp://127.0.0.1:{}", free_consecutive_ports(ranks)?),
            replay: format!("tcp://127.0.0.1:{}", free_consecutive_ports(ranks)?),
        })
    }

    /// The sim-engine flags binding them, for a worker with a process of its own.
    pub fn args(&self) -> [String; 4] {
        [
            "--kv-events-endpoint".to_owned(),
            self.publish.clone(),
            "--kv-events-replay-endpoint".to_owned(),
            self.replay.clone(),
        ]
    }
}

/// One simulated worker: its own process, or one of several a process hosts.
pub struct SimEngine {
    process: SimProcess,
    port: u16,
    options: SimEngineOptions,
}

enum SimProcess {
    Own(ManagedProcess),
    /// Shared with the other workers started with it: it stops when the last
    /// of them is dropped.
    Hosted(Arc<ManagedProcess>),
}

impl SimEngine {
    /// Starts a sim-engine and waits for `GET /health`.
    pub fn start(options: SimEngineOptions) -> anyhow::Result<Self> {
        let port = free_port();
        let mut process = Self::spawn(&options, port)?;
        let health = format!("http://127.0.0.1:{port}/health");
        readiness::wait_http_ok(&mut process, &health, Duration::from_secs(30))?;
        Ok(Self {
            process: SimProcess::Own(process),
            port,
            options,
        })
    }

    /// Starts one sim-engine process hosting one worker per entry of
    /// `workers`, each on a free port of its own, and waits until every one
    /// answers `GET /health`. All share `options`' model, tokenizer and
    /// flags; its worker id is replaced by each worker's.
    pub fn start_hosted(
        options: &SimEngineOptions,
        workers: &[HostedWorker],
    ) -> anyhow::Result<Vec<Self>> {
        let (Some(first), Some(last)) = (workers.first(), workers.last()) else {
            return Ok(Vec::new());
        };
        let with_events = workers.iter().filter(|w| w.kv_events.is_some()).count();
        anyhow::ensure!(
            with_events == 0 || with_events == workers.len(),
            "the workers of one sim-engine process publish KV events all or none"
        );
        let ports: Vec<u16> = workers.iter().map(|_| free_port()).collect();
        let list = |values: Vec<String>| values.join(",");
        let mut per_worker = vec![
            "--workers".to_owned(),
            workers.len().to_string(),
            "--port".to_owned(),
            list(ports.iter().map(u16::to_string).collect()),
            "--worker-id".to_owned(),
            list(workers.iter().map(|w| w.worker_id.clone()).collect()),
        ];
        let events: Vec<&KvEventEndpoints> = workers
            .iter()
            .filter_map(|w| w.kv_events.as_ref())
            .collect();
        if !events.is_empty() {
            per_worker.extend([
                "--kv-events-endpoint".to_owned(),
                list(events.iter().map(|e| e.publish.clone()).collect()),
                "--kv-events-replay-endpoint".to_owned(),
                list(events.iter().map(|e| e.replay.clone()).collect()),
            ]);
        }
        let name = format!("sim-engine-{}..{}", first.worker_id, last.worker_id);
        let mut process = ManagedProcess::spawn(&name, Self::command(options, &per_worker)?)?;
        for port in &ports {
            let health = format!("http://127.0.0.1:{port}/health");
            readiness::wait_http_ok(&mut process, &health, Duration::from_secs(30))?;
        }
        let named = workers.iter().map(|w| w.worker_id.as_str()).zip(ports);
        Ok(Self::sharing(process, options, named))
    }

    /// One handle per `(worker id, port)` on a process they share.
    fn sharing<'a>(
        process: ManagedProcess,
        options: &SimEngineOptions,
        workers: impl Iterator<Item = (&'a str, u16)>,
    ) -> Vec<Self> {
        let process = Arc::new(process);
        workers
            .map(|(worker_id, port)| Self {
                process: SimProcess::Hosted(Arc::clone(&process)),
                port,
                options: SimEngineOptions {
                    worker_id: worker_id.to_owned(),
                    ..options.clone()
                },
            })
            .collect()
    }

    /// Starts one sim-engine process running one data-parallel rank per
    /// entry of `ranks` behind one free port (`--data-parallel-size`), with
    /// KV events on `events` (each rank at the ports plus its rank), and
    /// returns one handle per rank, named by `ranks`, sharing the process
    /// as hosted workers do. The engine's own `x-sim-worker-id` is the
    /// first rank's name.
    pub fn start_ranks(
        options: &SimEngineOptions,
        ranks: &[String],
        events: &KvEventEndpoints,
    ) -> anyhow::Result<Vec<Self>> {
        let Some(first) = ranks.first() else {
            return Ok(Vec::new());
        };
        let port = free_port();
        let mut per_engine = vec![
            "--port".to_owned(),
            port.to_string(),
            "--worker-id".to_owned(),
            first.clone(),
            "--data-parallel-size".to_owned(),
            ranks.len().to_string(),
        ];
        per_engine.extend(events.args());
        let mut process = ManagedProcess::spawn(
            &format!("sim-engine-{first}"),
            Self::command(options, &per_engine)?,
        )?;
        let health = format!("http://127.0.0.1:{port}/health");
        readiness::wait_http_ok(&mut process, &health, Duration::from_secs(30))?;
        let named = ranks.iter().map(|rank| (rank.as_str(), port));
        Ok(Self::sharing(process, options, named))
    }

    fn spawn(options: &SimEngineOptions, port: u16) -> anyhow::Result<ManagedProcess> {
        let per_worker = [
            "--port".to_owned(),
            port.to_string(),
            "--worker-id".to_owned(),
            options.worker_id.clone(),
        ];
        ManagedProcess::spawn(
            &format!("sim-engine-{}", options.worker_id),
            Self::command(options, &per_worker)?,
        )
    }

    /// sim-engine on loopback serving `options`' model with its tokenizer,
    /// the `per_worker` flags, then `options`' own flags.
    fn command(options: &SimEngineOptions, per_worker: &[String]) -> anyhow::Result<Command> {
        let mut command = Command::new(paths::binary("sim-engine")?);
        command
            .args(["--host", "127.0.0.1", "--model", &options.model])
            .args(per_worker);
        if let Some(tokenizer) = &options.tokenizer {
            command.arg("--tokenizer").arg(tokenizer);
        }
        command.args(&options.extra_args);
        Ok(command)
    }

    /// Kills the engine and starts it again on the same port with the same
    /// flags; refused for a worker sharing its process.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let (options, port) = (self.options.clone(), self.port);
        let health = format!("{}/health", self.url());
        let process = self.process()?;
        process.kill();
        *process = Self::spawn(&options, port)?;
        readiness::wait_http_ok(process, &health, Duration::from_secs(30))
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

    /// The worker's own process; an error for a worker sharing its process,
    /// which cannot be killed or restarted alone.
    pub fn process(&mut self) -> anyhow::Result<&mut ManagedProcess> {
        match &mut self.process {
            SimProcess::Own(process) => Ok(process),
            SimProcess::Hosted(shared) => anyhow::bail!(
                "{} shares its sim-engine process (pid {}) with other workers: start one process per worker to kill or restart it alone",
                self.options.worker_id,
                shared.pid()
            ),
        }
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
