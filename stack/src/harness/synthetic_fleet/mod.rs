//! Synthetic workers for the cost benchmark and its test: no engines, but
//! each worker publishes to NATS exactly what `kv-sidecar relay` would —
//! through the relay's own code. Per worker: its [`Pipeline`] (normalizer,
//! sequencing, batching, full states on sync requests), outbox publisher,
//! [`Heartbeat`] registration and sync responder, fed by a synthetic cache
//! ([`cache`]) instead of an engine's ZMQ events. Engine load goes out as the
//! relay's load reporter sends it, from the cache's fill.
//!
//! One driver task hands out events at a fixed aggregate rate, round robin
//! over the workers, every [`TICK`]; heartbeats and load reports are spread
//! over their interval as independent relays' would be.

mod cache;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use kv_sidecar::decode::EngineEvent;
use kv_sidecar::normalize::{MediaPolicy, Normalizer};
use kv_sidecar::relay::metrics::{unix_ms, RelayMetrics};
use kv_sidecar::relay::nats::{self as relay_nats, Heartbeat, Registration};
use kv_sidecar::relay::pipeline::{Pipeline, SourceMsg};
use kv_sidecar::relay::{OUTBOX_QUEUE, SOURCE_QUEUE};
use kvmesh_config::{EngineKind, Role};
use prometheus_client::registry::Registry;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use router_core::protocol::{subjects, Message, WorkerLoad};
use router_core::BlockSize;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use cache::SyntheticCache;

/// How often the driver hands out the events and load reports due.
const TICK: Duration = Duration::from_millis(10);
/// Events owed after a stall are forgotten beyond this much time's worth:
/// a generator that cannot keep up shows as a lower measured rate.
const MAX_CATCH_UP: Duration = Duration::from_millis(100);

/// One synthetic worker: its id and the `ip:port` it registers.
#[derive(Debug, Clone)]
pub struct SyntheticWorker {
    pub id: String,
    pub address: String,
}

#[derive(Debug, Clone)]
pub struct SyntheticFleetOptions {
    pub nats_url: String,
    pub model: String,
    pub block_size: BlockSize,
    pub workers: Vec<SyntheticWorker>,
    /// KV cache capacity of each worker, in blocks.
    pub cache_blocks: usize,
    /// How often each worker reports its load (the relay's `--load-interval`).
    pub load_interval: Duration,
    pub seed: u64,
}

/// What the driver is told from outside.
enum Command {
    /// Engine events per second over the whole fleet, from now on.
    Rate(f64),
    /// Store these tokens on one worker, for good.
    Pin { worker: usize, tokens: Vec<u32> },
}

/// The running synthetic workers; dropping it stops them.
pub struct SyntheticFleet {
    /// `None` only while dropping.
    runtime: Option<tokio::runtime::Runtime>,
    commands: mpsc::UnboundedSender<Command>,
    /// Workers whose cache has filled, as the driver last counted.
    full_workers: Arc<AtomicUsize>,
    workers: usize,
}

impl SyntheticFleet {
    /// Connects to NATS and starts every worker's relay tasks: they register
    /// (spread over the first second) and answer sync requests; no events
    /// flow until [`set_rate`](Self::set_rate).
    pub fn start(options: SyntheticFleetOptions) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("synthetic-fleet")
            .enable_all()
            .build()
            .context("starting the synthetic fleet's runtime")?;
        let client = runtime
            .block_on(async_nats::connect(options.nats_url.as_str()))
            .with_context(|| format!("connecting to NATS at {}", options.nats_url))?;
        let metrics = RelayMetrics::new(&mut Registry::default());
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let count = options.workers.len();
        let mut sources = Vec::with_capacity(count);
        {
            let _entered = runtime.enter();
            for (index, worker) in options.workers.iter().enumerate() {
                let stagger = relay_nats::HEARTBEAT.mul_f64(index as f64 / count as f64);
                let relay = WorkerRelay {
                    client: client.clone(),
                    options: &options,
                    worker,
                    epoch: epoch + index as u64,
                    metrics: metrics.clone(),
                };
                sources.push(relay.spawn(stagger));
            }
        }
        let caches = (0..count)
            .map(|index| {
                let worker = u32::try_from(index).unwrap_or(u32::MAX);
                SyntheticCache::new(
                    worker,
                    options.block_size,
                    options.cache_blocks,
                    options.seed,
                )
            })
            .collect();
        let (commands, command_rx) = mpsc::unbounded_channel();
        let full_workers = Arc::new(AtomicUsize::new(0));
        let driver = Driver {
            caches,
            sources,
            loads: LoadReports {
                client,
                subjects: options
                    .workers
                    .iter()
                    .map(|w| subjects::load(subjects::DEFAULT_PREFIX, &options.model, &w.id))
                    .collect(),
                ids: options.workers.iter().map(|w| w.id.clone()).collect(),
                model: options.model.clone(),
                per_second: count as f64 / options.load_interval.as_secs_f64().max(1e-3),
                owed: 0.0,
                next: 0,
                rng: SmallRng::seed_from_u64(options.seed),
            },
            full_workers: full_workers.clone(),
            rate: 0.0,
            owed: 0.0,
            next_worker: 0,
        };
        runtime.spawn(driver.run(command_rx));
        Ok(Self {
            runtime: Some(runtime),
            commands,
            full_workers,
            workers: count,
        })
    }

    /// Sets the aggregate engine event rate (events/s over all workers).
    pub fn set_rate(&self, events_per_s: f64) -> anyhow::Result<()> {
        self.command(Command::Rate(events_per_s))
    }

    /// Stores `tokens` on worker `worker` for good (whole blocks only).
    pub fn pin(&self, worker: usize, tokens: Vec<u32>) -> anyhow::Result<()> {
        anyhow::ensure!(worker < self.workers, "no synthetic worker {worker}");
        self.command(Command::Pin { worker, tokens })
    }

    fn command(&self, command: Command) -> anyhow::Result<()> {
        self.commands
            .send(command)
            .map_err(|_| anyhow::anyhow!("the synthetic fleet's driver stopped"))
    }

    /// Workers whose cache has filled (they evict from then on).
    fn full_workers(&self) -> usize {
        self.full_workers.load(Ordering::Relaxed)
    }

    /// Sets the event rate to `events_per_s` and waits until every cache is
    /// full; the rate stays until set again.
    pub fn fill(&self, events_per_s: f64, timeout: Duration) -> anyhow::Result<()> {
        self.set_rate(events_per_s)?;
        let deadline = std::time::Instant::now() + timeout;
        while self.full_workers() < self.workers {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "{} of {} synthetic caches full after {timeout:?}",
                self.full_workers(),
                self.workers
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for SyntheticFleet {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The relay tasks of one worker.
struct WorkerRelay<'a> {
    client: async_nats::Client,
    options: &'a SyntheticFleetOptions,
    worker: &'a SyntheticWorker,
    epoch: u64,
    metrics: RelayMetrics,
}

impl WorkerRelay<'_> {
    /// Spawns the pipeline, publisher, sync responder and (after `stagger`)
    /// heartbeat; returns the pipeline's input.
    fn spawn(self, stagger: Duration) -> mpsc::Sender<SourceMsg> {
        let prefix = subjects::DEFAULT_PREFIX;
        let (model, id) = (&self.options.model, &self.worker.id);
        let (outbox_tx, outbox_rx) = mpsc::channel(OUTBOX_QUEUE);
        let (source_tx, source_rx) = mpsc::channel(SOURCE_QUEUE);
        let (control_tx, control_rx) = mpsc::channel(16);
        let last_seq = Arc::new(AtomicU64::new(0));
        let pipeline = Pipeline::new(
            Normalizer::new(model, self.options.block_size, MediaPolicy::default()),
            id.clone(),
            model.clone(),
            subjects::events(prefix, model, id),
            self.epoch,
            outbox_tx,
            self.metrics.clone(),
            last_seq.clone(),
        );
        tokio::spawn(pipeline.run(source_rx, control_rx));
        tokio::spawn(relay_nats::publish_outbox(
            self.client.clone(),
            outbox_rx,
            self.metrics.clone(),
        ));
        tokio::spawn(relay_nats::serve_sync(
            self.client.clone(),
            subjects::sync(prefix, model, id),
            control_tx,
        ));
        let heartbeat = Heartbeat {
            client: self.client,
            subject: subjects::workers(prefix, model),
            info: relay_nats::registration(Registration {
                worker_id: id,
                model,
                address: &self.worker.address,
                role: Role::Both,
                data_parallel_rank: None,
                engine: EngineKind::Vllm,
                block_size: self.options.block_size.get(),
                epoch: self.epoch,
            }),
            last_seq,
            engine_unreachable: Arc::new(AtomicBool::new(false)),
            registration: Arc::new(Notify::new()),
            metrics: self.metrics,
        };
        tokio::spawn(async move {
            tokio::time::sleep(stagger).await;
            heartbeat.run().await;
        });
        source_tx
    }
}

/// Each worker's engine load, published on its load subject as the relay's
/// load reporter does, every worker once per load interval.
struct LoadReports {
    client: async_nats::Client,
    subjects: Vec<String>,
    ids: Vec<String>,
    model: String,
    per_second: f64,
    owed: f64,
    next: usize,
    rng: SmallRng,
}

impl LoadReports {
    async fn publish_due(&mut self, elapsed: Duration, caches: &[SyntheticCache]) {
        self.owed = (self.owed + self.per_second * elapsed.as_secs_f64())
            .min(self.per_second * MAX_CATCH_UP.as_secs_f64() + 1.0);
        while self.owed >= 1.0 {
            self.owed -= 1.0;
            let index = self.next;
            self.next = (self.next + 1) % self.ids.len().max(1);
            let (Some(subject), Some(id), Some(cache)) = (
                self.subjects.get(index),
                self.ids.get(index),
                caches.get(index),
            ) else {
                return;
            };
            let load = WorkerLoad {
                worker_id: id.clone(),
                model: self.model.clone(),
                // A light load that changes between reports (so they reach
                // the stream as load changes) yet never outweighs a cached
                // prompt in the filter's choice.
                running: self.rng.random_range(0..2),
                waiting: 0,
                kv_usage: cache.usage(),
                timestamp_ms: unix_ms(),
            };
            // A lost report is replaced by the worker's next one, as a relay's.
            let _ = self
                .client
                .publish(subject.clone(), load.encode_to_vec().into())
                .await;
        }
    }
}

/// Owns every worker's cache and hands their events to the pipelines.
struct Driver {
    caches: Vec<SyntheticCache>,
    sources: Vec<mpsc::Sender<SourceMsg>>,
    loads: LoadReports,
    full_workers: Arc<AtomicUsize>,
    rate: f64,
    owed: f64,
    next_worker: usize,
}

impl Driver {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = Instant::now();
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    None => return,
                    Some(Command::Rate(rate)) => self.rate = rate.max(0.0),
                    Some(Command::Pin { worker, tokens }) => {
                        let Some(cache) = self.caches.get_mut(worker) else { continue };
                        let event = cache.pinned(&tokens);
                        if !self.send(worker, vec![event]).await {
                            return;
                        }
                    }
                },
                _ = ticker.tick() => {
                    let now = Instant::now();
                    let elapsed = now.duration_since(last);
                    last = now;
                    if !self.events_due(elapsed).await {
                        return;
                    }
                    self.loads.publish_due(elapsed, &self.caches).await;
                }
            }
        }
    }

    /// Hands out the events owed for `elapsed`, one per worker in turn;
    /// false once the pipelines are gone.
    async fn events_due(&mut self, elapsed: Duration) -> bool {
        self.owed = (self.owed + self.rate * elapsed.as_secs_f64())
            .min(self.rate * MAX_CATCH_UP.as_secs_f64() + 1.0);
        let due = self.owed.floor() as usize;
        self.owed -= due as f64;
        let workers = self.caches.len();
        if due == 0 || workers == 0 {
            return true;
        }
        let mut batches: Vec<Vec<EngineEvent>> = vec![Vec::new(); workers];
        for _ in 0..due {
            let worker = self.next_worker;
            self.next_worker = (worker + 1) % workers;
            if let (Some(cache), Some(batch)) =
                (self.caches.get_mut(worker), batches.get_mut(worker))
            {
                batch.push(cache.next_event());
            }
        }
        for (worker, batch) in batches.into_iter().enumerate() {
            if !batch.is_empty() && !self.send(worker, batch).await {
                return false;
            }
        }
        let full = self.caches.iter().filter(|c| c.is_full()).count();
        self.full_workers.store(full, Ordering::Relaxed);
        true
    }

    /// One engine batch to a worker's pipeline, as its ZMQ source sends it.
    async fn send(&self, worker: usize, events: Vec<EngineEvent>) -> bool {
        match self.sources.get(worker) {
            Some(source) => source.send(SourceMsg::Batch(events)).await.is_ok(),
            None => false,
        }
    }
}
