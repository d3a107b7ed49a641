//! One fleet size: nats-server, `kv-sidecar serve` and Envoy with the filter,
//! all real, fed by synthetic workers at a fixed event rate; what each costs.

use std::time::{Duration, Instant};

use anyhow::Context;

use crate::cost_curves::proc_stat::cpu_seconds;
use crate::cost_curves::stream_probe::{SnapshotReceipt, StreamProbe};
use crate::harness::client::prometheus_sum;
use crate::harness::sidecar::{Sidecar, SidecarModel};
use crate::harness::synthetic_fleet::{SyntheticFleet, SyntheticFleetOptions, SyntheticWorker};
use crate::harness::{free_port, Envoy, GatewayConfig, ModelRoute, NatsServer};

const MODEL: &str = "synthetic";
/// Registration, filling and the filters' first snapshot each get this long.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Envoy publishes histograms at its stats flush, every 5 s.
const ENVOY_STATS_FLUSH: Duration = Duration::from_millis(5_500);

/// How every fleet size is loaded and measured.
#[derive(Debug, Clone, clap::Args)]
pub struct CurveParams {
    /// Engine KV events per second over the whole fleet while measuring.
    #[arg(long, default_value_t = 5_000.0)]
    pub rate: f64,
    /// Events per second while the caches fill up.
    #[arg(long, default_value_t = 40_000.0)]
    pub fill_rate: f64,
    /// KV cache capacity of each worker, in 16-token blocks: the sidecar's
    /// and every filter's index hold workers × this many entries.
    #[arg(long, default_value_t = 4_096)]
    pub cache_blocks: usize,
    /// Steady load before measuring starts.
    #[arg(long, default_value = "3", value_parser = parse_seconds)]
    pub settle: Duration,
    /// How long CPU and stream bytes are measured at each size.
    #[arg(long, default_value = "15", value_parser = parse_seconds)]
    pub window: Duration,
    /// Envoy worker threads (each runs a filter VM with its own stream).
    #[arg(long, default_value_t = 2)]
    pub gateway_threads: u64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    text.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("`{text}` is not a number of seconds"))
}

/// What one fleet size cost.
#[derive(Debug, Clone)]
pub struct SizeResult {
    pub workers: usize,
    /// (block, worker) entries in the sidecar's index at the end.
    pub index_entries: u64,
    /// Relay events the sidecar applied per second during the window.
    pub events_per_s: f64,
    /// Sidecar CPU (user + system) during the window, in cores.
    pub sidecar_cores: f64,
    /// Bytes and messages per second on one state-stream subscription.
    pub stream_bytes_per_s: f64,
    pub stream_messages_per_s: f64,
    /// Linear memory of one filter VM fed by the stream; how many VMs Envoy
    /// ran (one per worker thread, the main thread's, and one that only
    /// checks the configuration) and how many of them the stream feeds.
    pub vm_memory_bytes: f64,
    pub vms: u64,
    pub streams: u64,
    /// A fresh subscriber's initial snapshot.
    pub snapshot: SnapshotReceipt,
    /// Time a filter VM spent applying its initial snapshot, all chunks.
    pub filter_snapshot_ms: f64,
    /// The longest state-stream callbacks of any filter VM (µs, Envoy's
    /// cumulative histogram quantiles).
    pub snapshot_callback_max_us: f64,
    pub delta_callback_p99_us: f64,
    pub delta_callback_max_us: f64,
}

impl SizeResult {
    /// Sidecar CPU per 1,000 events/s, in percent of one core.
    pub fn cpu_percent_per_1k_events(&self) -> f64 {
        if self.events_per_s > 0.0 {
            self.sidecar_cores * 100.0 / (self.events_per_s / 1_000.0)
        } else {
            0.0
        }
    }

    /// The longest callback of either kind (µs).
    pub fn largest_callback_us(&self) -> f64 {
        self.snapshot_callback_max_us
            .max(self.delta_callback_max_us)
    }
}

/// Runs one fleet of `workers` synthetic workers; `progress` hears each step.
pub fn measure(
    workers: usize,
    params: &CurveParams,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<SizeResult> {
    let block_size = router_core::BlockSize::VLLM_DEFAULT;
    let nats = NatsServer::start().context("starting nats-server")?;
    let model = SidecarModel {
        name: MODEL.to_owned(),
        block_size: block_size.get(),
        tokenizer: None,
    };
    let mut sidecar = Sidecar::start(&nats.url(), &[model], "").context("starting the sidecar")?;
    let synthetic: Vec<SyntheticWorker> = (0..workers)
        .map(|i| SyntheticWorker {
            id: format!("worker-{i}"),
            // Nothing listens: no request is routed in this benchmark.
            address: format!("127.0.0.1:{}", free_port()),
        })
        .collect();
    let fleet = SyntheticFleet::start(SyntheticFleetOptions {
        nats_url: nats.url(),
        model: MODEL.to_owned(),
        block_size,
        workers: synthetic.clone(),
        cache_blocks: params.cache_blocks,
        load_interval: Duration::from_secs(1),
        seed: params.seed,
    })?;
    wait_for("every worker registered", || {
        Ok(sidecar.known_workers()? >= workers)
    })?;
    progress("registered; filling the caches");
    fleet.fill(params.fill_rate, STEP_TIMEOUT)?;
    fleet.set_rate(params.rate)?;
    std::thread::sleep(params.settle);

    progress("steady; timing a fresh subscriber's snapshot");
    let probe = StreamProbe::subscribe(&sidecar.grpc_url())?;
    let snapshot = probe.snapshot(STEP_TIMEOUT)?;

    progress("starting Envoy on the full index");
    let addresses = synthetic.iter().map(|w| w.address.clone()).collect();
    let mut config = GatewayConfig::new(vec![ModelRoute::new(MODEL, block_size.get(), addresses)])?;
    config.sidecar = Some(sidecar.endpoints());
    config.worker_threads = params.gateway_threads;
    let envoy = Envoy::start(config).context("starting Envoy")?;
    let streams = filter_streams(&sidecar, &envoy, snapshot.chunks)?;

    progress("measuring");
    let pid = sidecar.process().pid();
    let applied = |s: &Sidecar| s.metric("kvmesh_serve_events_total", "status=\"applied\"");
    let (cpu_before, events_before) = (cpu_seconds(pid)?, applied(&sidecar));
    let (received_before, started) = (probe.received()?, Instant::now());
    std::thread::sleep(params.window);
    let (cpu_after, events_after) = (cpu_seconds(pid)?, applied(&sidecar));
    let (received_after, seconds) = (probe.received()?, started.elapsed().as_secs_f64());
    std::thread::sleep(ENVOY_STATS_FLUSH);

    let stat = |name: &str| envoy.stat(&format!("wasmcustom.{name}"));
    let quantile = |name: &str, q: &str| -> anyhow::Result<f64> {
        Ok(envoy
            .histogram_quantile(&format!("wasmcustom.{name}"), q)?
            .unwrap_or(0.0))
    };
    let envoy_metrics = format!("{}/stats/prometheus", envoy.admin_url());
    let snapshot_us_total = prometheus_sum(&envoy_metrics, "kvmesh_state_snapshot_us_sum", "");
    let vms = stat("kvmesh_vm_starts")?;
    Ok(SizeResult {
        workers,
        index_entries: sidecar.metric("kvmesh_serve_index_entries", "") as u64,
        events_per_s: (events_after - events_before) / seconds,
        sidecar_cores: (cpu_after - cpu_before) / seconds,
        stream_bytes_per_s: (received_after.bytes - received_before.bytes) as f64 / seconds,
        stream_messages_per_s: (received_after.messages - received_before.messages) as f64
            / seconds,
        vm_memory_bytes: stat("kvmesh_vm_memory_bytes")? as f64 / streams as f64,
        vms,
        streams,
        snapshot,
        filter_snapshot_ms: snapshot_us_total / streams as f64 / 1_000.0,
        snapshot_callback_max_us: quantile("kvmesh_state_snapshot_us", "P100")?,
        delta_callback_p99_us: quantile("kvmesh_state_delta_us", "P99")?,
        delta_callback_max_us: quantile("kvmesh_state_delta_us", "P100")?,
    })
}

/// Waits until every filter VM's stream (the sidecar's subscribers but the
/// probe) has applied its `chunks`-chunk snapshot and a delta after it;
/// returns how many streams there are.
fn filter_streams(sidecar: &Sidecar, envoy: &Envoy, chunks: u64) -> anyhow::Result<u64> {
    let mut streams = 0;
    wait_for("the filters' initial snapshots", || {
        streams = (sidecar.metric("kvmesh_serve_stream_subscribers", "") as u64).saturating_sub(1);
        let applied = envoy.stat("wasmcustom.kvmesh_state_updates_applied")?;
        Ok(streams > 0 && applied >= streams * (chunks + 1))
    })?;
    Ok(streams)
}

fn wait_for(what: &str, mut done: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !done()? {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{what}: not after {STEP_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
