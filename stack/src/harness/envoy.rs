//! A real Envoy (from `.venv`) running the compiled kvmesh filter.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use kvmesh_config::{DisaggregationPolicy, EngineKind};
use serde::Serialize;

use crate::harness::{free_port, paths, process, readiness, ManagedProcess};

/// Listener buffer limit; above the filter's body limit so oversize bodies get
/// the filter's OpenAI-shaped 413 rather than Envoy's plain-text one.
const DEFAULT_BUFFER_LIMIT_BYTES: u64 = 64 * 1024 * 1024;
/// Envoy worker threads: one filter VM (and one state stream) each. Two, as
/// on the CI machines, so cross-VM behaviour is exercised.
pub const ENVOY_WORKER_THREADS: u64 = 2;
/// Fleet state older than this is not used for routing.
const SIDECAR_STALE_AFTER_MS: u64 = 3_000;

/// Pool cluster of models that do not name their own.
pub const DEFAULT_POOL: &str = "decode_pool";
/// Prefill pool cluster of disaggregated models.
pub const PREFILL_POOL: &str = "prefill_pool";

/// One model the gateway serves and its pool's workers (`ip:port`).
#[derive(Debug, Clone, Serialize)]
pub struct ModelRoute {
    pub name: String,
    pub block_size: u32,
    pub endpoints: Vec<String>,
    /// Envoy cluster of this model's own pool; `None` shares `decode_pool`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Remote prefill on a separate prefill pool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disaggregation: Option<Disaggregation>,
    /// The cost function's weight of uncached prompt blocks; the filter's
    /// default when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overlap_weight: Option<f64>,
}

/// The filter's `disaggregation` settings of one model; its prefill workers
/// become the `prefill_cluster` pool.
#[derive(Debug, Clone, Serialize)]
pub struct Disaggregation {
    pub policy: DisaggregationPolicy,
    pub protocol: EngineKind,
    pub prefill_cluster: String,
    pub prefill_endpoints: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_prefill_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_prefill_lag_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bootstrap_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// The prefill workers are of role `both`: they also serve whole
    /// requests, and are in the model's pool too.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub shared_workers: bool,
}

impl Disaggregation {
    /// `policy` remote prefill with `protocol` on `prefill_endpoints`, in the
    /// `prefill_pool` cluster.
    pub fn new(
        policy: DisaggregationPolicy,
        protocol: EngineKind,
        prefill_endpoints: Vec<String>,
    ) -> Self {
        Self {
            policy,
            protocol,
            prefill_cluster: PREFILL_POOL.to_owned(),
            prefill_endpoints,
            min_prefill_tokens: None,
            max_prefill_lag_tokens: None,
            bootstrap_port: None,
            timeout_ms: None,
            shared_workers: false,
        }
    }
}

impl ModelRoute {
    /// A model served by `endpoints` in the shared default pool.
    pub fn new(name: &str, block_size: u32, endpoints: Vec<String>) -> Self {
        Self {
            name: name.to_owned(),
            block_size,
            endpoints,
            cluster: None,
            disaggregation: None,
            overlap_weight: None,
        }
    }

    fn pool(&self) -> &str {
        self.cluster.as_deref().unwrap_or(DEFAULT_POOL)
    }
}

/// Values rendered into `envoy/gateway.yaml.j2`.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub listen_address: String,
    pub gateway_port: u16,
    pub admin_port: u16,
    pub max_body_bytes: Option<u64>,
    pub models: Vec<ModelRoute>,
    pub wasm_path: PathBuf,
    /// `kv-sidecar serve`'s listeners; `None` runs the filter without fleet
    /// state.
    pub sidecar: Option<SidecarEndpoints>,
    /// More `kv-sidecar serve` replicas behind the same two clusters, as a
    /// Kubernetes Service of several replicas: each filter VM's state stream
    /// goes to one of them, and to another when that one is gone.
    pub sidecar_replicas: Vec<SidecarEndpoints>,
    /// The filter's opt-in `x-kvmesh-*` response headers.
    pub debug_headers: bool,
    /// Envoy worker threads (`--concurrency`), each with its own filter VM.
    pub worker_threads: u64,
    /// `false` runs plain Envoy without the kvmesh filter (pools balance with
    /// `fallback`), as a baseline.
    pub filter: bool,
    /// How the pools balance requests the filter names no endpoint for.
    pub fallback: FallbackBalancing,
    /// How long a request waits for the sidecar's tokenization; the filter's
    /// default when `None`.
    pub tokenize_timeout_ms: Option<u64>,
    /// Paths routed to the pools; every other path gets the gateway's 404.
    pub inference_paths: Vec<String>,
    /// Let the engines' debug response headers ([`ENGINE_DEBUG_HEADERS`])
    /// reach clients; the gateway removes them otherwise.
    pub expose_engine_headers: bool,
    pub limits: GatewayLimits,
}

/// Connection, concurrency and time limits of the gateway
/// (`docs/failures.md`).
#[derive(Debug, Clone, Serialize)]
pub struct GatewayLimits {
    /// Downstream connections Envoy accepts at once (overload manager).
    pub max_connections: u64,
    /// Each pool cluster's circuit breakers: connections, pending and active
    /// requests, retries.
    pub pool_max_requests: u64,
    /// The tokenization cluster's circuit breakers.
    pub sidecar_max_requests: u64,
    /// A client must have sent its request headers within this.
    pub request_headers_timeout_s: u64,
    /// A client must have sent its whole request within this, counting the
    /// filter's wait for a prefill leg; the answer itself may take longer.
    pub request_timeout_s: u64,
    /// A downstream or upstream connection with no stream closes after this.
    pub idle_timeout_s: u64,
    /// Envoy's heap (not the filter VMs' wasm memory) past which the
    /// overload manager resets the streams buffering the most, then
    /// refuses new requests.
    pub max_heap_bytes: u64,
}

impl Default for GatewayLimits {
    fn default() -> Self {
        Self {
            max_connections: 16_384,
            pool_max_requests: 16_384,
            sidecar_max_requests: 16_384,
            request_headers_timeout_s: 10,
            request_timeout_s: 300,
            idle_timeout_s: 300,
            max_heap_bytes: 2 << 30,
        }
    }
}

/// The OpenAI paths the sim-engine (and vLLM) serve for inference.
pub const INFERENCE_PATHS: [&str; 3] = ["/v1/chat/completions", "/v1/completions", "/v1/models"];

/// Response headers the engines add for debugging, removed by the gateway
/// unless `expose_engine_headers` is on.
pub const ENGINE_DEBUG_HEADERS: [&str; 2] = ["x-sim-worker-id", "x-sim-data-parallel-rank"];

/// Envoy's own load balancing policy of the pool clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackBalancing {
    LeastRequest,
    RoundRobin,
}

#[derive(Serialize)]
struct FallbackExtension {
    extension: &'static str,
    type_name: &'static str,
}

impl FallbackBalancing {
    fn extension(self) -> FallbackExtension {
        let (extension, type_name) = match self {
            Self::LeastRequest => ("least_request", "LeastRequest"),
            Self::RoundRobin => ("round_robin", "RoundRobin"),
        };
        FallbackExtension {
            extension,
            type_name,
        }
    }
}

/// `ip:port` of `kv-sidecar serve`'s gRPC (state stream) and HTTP
/// (tokenization) listeners.
#[derive(Debug, Clone)]
pub struct SidecarEndpoints {
    pub grpc: String,
    pub http: String,
}

#[derive(Serialize)]
struct WorkerAddress {
    ip: String,
    port: u16,
}

#[derive(Serialize)]
struct Pool {
    name: String,
    workers: Vec<WorkerAddress>,
}

#[derive(Serialize)]
struct PluginConfig<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    max_body_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sidecar: Option<SidecarSettings>,
    debug_headers: bool,
    models: &'a [ModelRoute],
}

#[derive(Serialize)]
struct SidecarSettings {
    cluster: &'static str,
    http_cluster: &'static str,
    stale_after_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    tokenize_timeout_ms: Option<u64>,
}

/// Every replica's listeners, in order.
#[derive(Serialize)]
struct SidecarAddresses {
    grpc: Vec<WorkerAddress>,
    http: Vec<WorkerAddress>,
}

#[derive(Serialize)]
struct TemplateValues<'a> {
    filter: bool,
    fallback: FallbackExtension,
    listen_address: &'a str,
    gateway_port: u16,
    admin_port: u16,
    buffer_limit_bytes: u64,
    wasm_path: String,
    plugin_config_json: String,
    pools: Vec<Pool>,
    sidecar: Option<SidecarAddresses>,
    inference_paths: &'a [String],
    limits: &'a GatewayLimits,
    expose_engine_headers: bool,
    engine_debug_headers: &'static [&'static str],
}

impl GatewayConfig {
    /// Filter VMs Envoy runs: one per worker thread and one on its main
    /// thread, which never serves requests but subscribes to the state
    /// stream like the others (a module cannot tell which thread it is on).
    pub fn filter_vms(&self) -> u64 {
        self.worker_threads + 1
    }

    /// A loopback gateway on free ports serving `models`, with the built filter.
    pub fn new(models: Vec<ModelRoute>) -> anyhow::Result<Self> {
        Ok(Self {
            listen_address: "127.0.0.1".to_owned(),
            gateway_port: free_port(),
            admin_port: free_port(),
            max_body_bytes: None,
            models,
            wasm_path: paths::filter_wasm()?,
            sidecar: None,
            sidecar_replicas: Vec::new(),
            debug_headers: false,
            // The tests tell workers apart by the sim's own header.
            expose_engine_headers: true,
            worker_threads: ENVOY_WORKER_THREADS,
            filter: true,
            fallback: FallbackBalancing::LeastRequest,
            tokenize_timeout_ms: None,
            inference_paths: INFERENCE_PATHS.map(str::to_owned).to_vec(),
            limits: GatewayLimits::default(),
        })
    }

    /// Renders a template (`envoy/gateway.yaml.j2`, a piece template beside
    /// it, or any other) with this configuration; its imports are looked up
    /// in `envoy/`.
    pub fn render(&self, template: &Path) -> anyhow::Result<String> {
        let source = std::fs::read_to_string(template)
            .with_context(|| format!("reading {}", template.display()))?;
        let mut env = minijinja::Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        env.set_loader(minijinja::path_loader(paths::envoy_config_dir()));
        // YAML is written by the templates themselves; minijinja would
        // otherwise JSON-escape every value of a `*.yaml` template it loads.
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        let mut pools: Vec<Pool> = Vec::new();
        for model in &self.models {
            add_to_pool(&mut pools, model.pool(), &model.endpoints)?;
            if let Some(d) = &model.disaggregation {
                add_to_pool(&mut pools, &d.prefill_cluster, &d.prefill_endpoints)?;
            }
        }
        let buffer_limit_bytes = self
            .max_body_bytes
            .map_or(DEFAULT_BUFFER_LIMIT_BYTES, |limit| {
                DEFAULT_BUFFER_LIMIT_BYTES.max(limit.saturating_mul(2))
            });
        let values = TemplateValues {
            filter: self.filter,
            fallback: self.fallback.extension(),
            listen_address: &self.listen_address,
            gateway_port: self.gateway_port,
            admin_port: self.admin_port,
            buffer_limit_bytes,
            wasm_path: self.wasm_path.display().to_string(),
            // Pretty, so the examples rendered from these templates are
            // readable and editable.
            plugin_config_json: serde_json::to_string_pretty(&PluginConfig {
                max_body_bytes: self.max_body_bytes,
                sidecar: self.sidecar.as_ref().map(|_| SidecarSettings {
                    cluster: "kv_sidecar",
                    http_cluster: "kv_sidecar_http",
                    stale_after_ms: SIDECAR_STALE_AFTER_MS,
                    tokenize_timeout_ms: self.tokenize_timeout_ms,
                }),
                debug_headers: self.debug_headers,
                models: &self.models,
            })?,
            pools,
            sidecar: self
                .sidecar
                .as_ref()
                .map(|first| -> anyhow::Result<SidecarAddresses> {
                    let replicas = || std::iter::once(first).chain(&self.sidecar_replicas);
                    Ok(SidecarAddresses {
                        grpc: replicas()
                            .map(|s| parse_worker(&s.grpc))
                            .collect::<anyhow::Result<_>>()?,
                        http: replicas()
                            .map(|s| parse_worker(&s.http))
                            .collect::<anyhow::Result<_>>()?,
                    })
                })
                .transpose()?,
            inference_paths: &self.inference_paths,
            limits: &self.limits,
            expose_engine_headers: self.expose_engine_headers,
            engine_debug_headers: &ENGINE_DEBUG_HEADERS,
        };
        env.render_str(&source, values)
            .with_context(|| format!("rendering {}", template.display()))
    }
}

/// Adds `endpoints` to the pool cluster `name`, creating it if new.
fn add_to_pool(pools: &mut Vec<Pool>, name: &str, endpoints: &[String]) -> anyhow::Result<()> {
    let position = match pools.iter().position(|p| p.name == name) {
        Some(position) => position,
        None => {
            pools.push(Pool {
                name: name.to_owned(),
                workers: Vec::new(),
            });
            pools.len() - 1
        }
    };
    for endpoint in endpoints {
        pools[position].workers.push(parse_worker(endpoint)?);
    }
    Ok(())
}

fn parse_worker(endpoint: &str) -> anyhow::Result<WorkerAddress> {
    let address: std::net::SocketAddr = endpoint
        .parse()
        .with_context(|| format!("worker address '{endpoint}' is not ip:port"))?;
    Ok(WorkerAddress {
        ip: address.ip().to_string(),
        port: address.port(),
    })
}

/// `envoy --mode validate` on a configuration file: (accepted, Envoy's output).
pub fn validate_config(config_path: &Path) -> anyhow::Result<(bool, String)> {
    let mut command = Command::new(paths::envoy_binary()?);
    command
        .args(["--mode", "validate", "--config-path"])
        .arg(config_path);
    process::run_to_completion(command)
}

/// A running Envoy gateway.
pub struct Envoy {
    process: ManagedProcess,
    config: GatewayConfig,
    config_dir: tempfile::TempDir,
}

impl Envoy {
    /// Renders `envoy/gateway.yaml.j2`, starts Envoy and waits for `/ready`.
    pub fn start(config: GatewayConfig) -> anyhow::Result<Self> {
        Self::start_with_template(config, &paths::envoy_config_dir().join("gateway.yaml.j2"))
    }

    pub fn start_with_template(config: GatewayConfig, template: &Path) -> anyhow::Result<Self> {
        let text = config.render(template)?;
        Self::start_with_text(config, &text)
    }

    /// Starts Envoy with the configuration `text` (YAML or JSON); `config`
    /// says which ports it listens on.
    pub fn start_with_text(config: GatewayConfig, text: &str) -> anyhow::Result<Self> {
        let config_dir = tempfile::tempdir().context("creating a config directory")?;
        let config_path = config_dir.path().join("envoy.yaml");
        std::fs::write(&config_path, text).context("writing the Envoy config")?;
        let process = Self::spawn(&config, &config_path)?;
        Ok(Self {
            process,
            config,
            config_dir,
        })
    }

    /// Kills Envoy (as a crash would) and starts it again with the same
    /// configuration, so on the same ports.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.process.kill();
        let config_path = self.config_dir.path().join("envoy.yaml");
        self.process = Self::spawn(&self.config, &config_path)?;
        Ok(())
    }

    fn spawn(config: &GatewayConfig, config_path: &Path) -> anyhow::Result<ManagedProcess> {
        let mut command = Command::new(paths::envoy_binary()?);
        command
            .arg("--config-path")
            .arg(config_path)
            .arg("--concurrency")
            .arg(config.worker_threads.to_string())
            .args(["--log-level", "info"])
            .args(["--base-id", &config.admin_port.to_string()]);
        let mut process = ManagedProcess::spawn("envoy", command)?;
        let ready = format!("http://127.0.0.1:{}/ready", config.admin_port);
        readiness::wait_http_ok(&mut process, &ready, Duration::from_secs(60))?;
        Ok(process)
    }

    pub fn gateway_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.config.gateway_port)
    }

    /// The configuration Envoy was started with.
    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.config.admin_port)
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn process(&mut self) -> &mut ManagedProcess {
        &mut self.process
    }

    /// Everything Envoy has logged so far.
    pub fn logs(&self) -> String {
        self.process.logs()
    }

    /// Envoy's `/stats/prometheus` text.
    pub fn prometheus_stats(&self) -> anyhow::Result<String> {
        let url = format!("{}/stats/prometheus", self.admin_url());
        Ok(reqwest::blocking::get(&url)?.error_for_status()?.text()?)
    }

    /// Value of a stat from `/stats?filter=` by exact name, 0 when absent.
    pub fn stat(&self, name: &str) -> anyhow::Result<u64> {
        Ok(self
            .stat_text(name)?
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0))
    }

    /// The largest value a histogram recorded since Envoy started (its
    /// cumulative P100), once Envoy has flushed it (every 5 s).
    pub fn histogram_max(&self, name: &str) -> anyhow::Result<Option<f64>> {
        self.histogram_quantile(name, "P100")
    }

    /// A cumulative quantile (`P50`, `P99`, ...) of a histogram, once flushed.
    pub fn histogram_quantile(&self, name: &str, quantile: &str) -> anyhow::Result<Option<f64>> {
        // e.g. "P0(nan,1) P25(nan,3) ... P100(nan,1200)": (interval, cumulative)
        let prefix = format!("{quantile}(");
        Ok(self.stat_text(name)?.and_then(|summary| {
            let entry = summary
                .split_whitespace()
                .find(|q| q.starts_with(&prefix))?;
            let cumulative = entry.trim_end_matches(')').rsplit(',').next()?;
            cumulative.parse().ok()
        }))
    }

    fn stat_text(&self, name: &str) -> anyhow::Result<Option<String>> {
        let url = format!("{}/stats?filter=^{}$", self.admin_url(), regex_escape(name));
        let text = reqwest::blocking::get(&url)?.error_for_status()?.text()?;
        Ok(text
            .lines()
            .filter_map(|line| line.split_once(": "))
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.to_owned()))
    }
}

fn regex_escape(name: &str) -> String {
    name.chars()
        .flat_map(|c| {
            let escape = matches!(
                c,
                '.' | '+' | '*' | '?' | '(' | ')' | '[' | ']' | '{' | '}' | '|' | '^' | '$' | '\\'
            );
            escape.then_some('\\').into_iter().chain(std::iter::once(c))
        })
        .collect()
}
