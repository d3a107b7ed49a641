//! The plugin configuration (JSON in the Envoy Wasm filter's `configuration`).
//!
//! Validated completely in `on_configure`: a bad configuration is refused with
//! one clear log line, so Envoy rejects it instead of routing with half a config.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;

use router_core::routing::disagg::{PrefillPolicy, PrefillRouting};
use router_core::routing::select::CostWeights;
use router_core::routing::ModelRouting;
use router_core::{BlockHasher, BlockSize, HashSeed};

pub use crate::disagg::Protocol;
use serde::Deserialize;
use thiserror::Error;

/// Default request body limit; large enough for a 128k-token chat.
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Largest accepted body limit. Routing a body holds at most about three
/// times its size in the VM's linear memory, which never shrinks: 16 MiB
/// keeps the worst case under 64 MiB per VM.
pub const MAX_BODY_BYTES_LIMIT: usize = 16 * 1024 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_max_body_bytes")]
    max_body_bytes: usize,
    #[serde(default)]
    sidecar: Option<RawSidecar>,
    #[serde(default)]
    debug_headers: bool,
    #[serde(default)]
    approximate: RawApproximate,
    /// Ask workers for ORCA `endpoint-load-metrics` and use what they report.
    #[serde(default = "default_true")]
    orca_load_reports: bool,
    models: Vec<RawModel>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawApproximate {
    table_entries: usize,
    entry_ttl_ms: u64,
}

impl Default for RawApproximate {
    fn default() -> Self {
        Self {
            table_entries: 65_536,
            entry_ttl_ms: 300_000,
        }
    }
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSidecar {
    /// Envoy cluster (HTTP/2) of `kv-sidecar serve`'s gRPC port.
    cluster: String,
    /// Envoy cluster of `kv-sidecar serve`'s HTTP port (tokenization).
    #[serde(default)]
    http_cluster: Option<String>,
    #[serde(default = "default_tokenize_timeout_ms")]
    tokenize_timeout_ms: u64,
    #[serde(default = "default_stale_after_ms")]
    stale_after_ms: u64,
    #[serde(default = "default_max_index_entries")]
    max_index_entries: usize,
}

fn default_tokenize_timeout_ms() -> u64 {
    250
}

fn default_stale_after_ms() -> u64 {
    5_000
}

fn default_max_index_entries() -> usize {
    4_000_000
}

fn default_max_body_bytes() -> usize {
    DEFAULT_MAX_BODY_BYTES
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: String,
    #[serde(default = "default_block_size")]
    block_size: u32,
    #[serde(default)]
    endpoints: Vec<String>,
    /// Envoy cluster of this model's pool, when models have separate pools.
    #[serde(default)]
    cluster: Option<String>,
    #[serde(default = "default_overlap_weight")]
    overlap_weight: f64,
    #[serde(default)]
    temperature: f64,
    #[serde(default)]
    disaggregation: Option<RawDisaggregation>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDisaggregation {
    #[serde(default)]
    policy: PrefillPolicy,
    #[serde(default)]
    protocol: Protocol,
    /// Envoy cluster of the prefill pool.
    prefill_cluster: String,
    /// `ip:port` of each prefill worker, used while no fleet state is known.
    #[serde(default)]
    prefill_endpoints: Vec<String>,
    #[serde(default = "default_min_prefill_tokens")]
    min_prefill_tokens: u64,
    #[serde(default = "default_max_prefill_queue_tokens")]
    max_prefill_queue_tokens: u64,
    #[serde(default = "default_prefill_timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "default_bootstrap_port")]
    bootstrap_port: u16,
}

fn default_min_prefill_tokens() -> u64 {
    1024
}

fn default_max_prefill_queue_tokens() -> u64 {
    262_144
}

fn default_prefill_timeout_ms() -> u64 {
    30_000
}

fn default_bootstrap_port() -> u16 {
    8998
}

fn default_overlap_weight() -> f64 {
    CostWeights::DEFAULT_OVERLAP_WEIGHT
}

fn default_block_size() -> u32 {
    BlockSize::VLLM_DEFAULT.get()
}

/// A model this gateway serves and the endpoints of its pool.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub name: String,
    pub hasher: BlockHasher,
    /// The decode pool, as routing sees it.
    pub routing: ModelRouting,
    /// The pool cluster the request is steered to (`x-kvmesh-pool`); `None`
    /// leaves the route's own cluster.
    pub cluster: Option<String>,
    /// Remote prefill, when configured and not `never`.
    pub disaggregation: Option<Disaggregation>,
}

/// How a model's requests are split between the prefill and decode pools.
#[derive(Debug, Clone, PartialEq)]
pub struct Disaggregation {
    /// The prefill pool, as routing sees it.
    pub routing: PrefillRouting,
    pub protocol: Protocol,
    pub prefill_cluster: String,
    /// A prefill leg slower than this is abandoned for local prefill.
    pub timeout: std::time::Duration,
    /// SGLang: the prefill engines' bootstrap port.
    pub bootstrap_port: u16,
}

/// Where the fleet state comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct SidecarConfig {
    pub cluster: String,
    /// Cluster for `/v1/tokenize`; `None` routes text prompts by load only.
    pub http_cluster: Option<String>,
    pub tokenize_timeout: std::time::Duration,
    /// With no state update for this long, the replica counts as stale and
    /// routing falls back.
    pub stale_after_ms: u64,
    pub max_index_entries: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    pub max_body_bytes: usize,
    pub sidecar: Option<SidecarConfig>,
    /// Adds `x-kvmesh-mode`, `x-kvmesh-worker` and `x-kvmesh-cached-blocks` to
    /// responses. Off by default: it tells clients about the fleet.
    pub debug_headers: bool,
    pub approximate: ApproximateConfig,
    pub orca_load_reports: bool,
    models: HashMap<String, ModelConfig>,
}

/// The learned table of approximate mode (see `approximate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApproximateConfig {
    /// Prefix keys remembered per VM (about 100 bytes each).
    pub table_entries: NonZeroUsize,
    /// How long a recorded prefix counts as still cached on its worker.
    pub entry_ttl_ms: u64,
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("plugin configuration is not valid JSON for kvmesh: {0}")]
    Json(#[from] serde_json::Error),
    #[error("models: at least one model is required")]
    NoModels,
    #[error("max_body_bytes: must be between 1 and {MAX_BODY_BYTES_LIMIT}, got {0}")]
    BodyLimit(usize),
    #[error("models[{index}].name: must not be empty")]
    EmptyModelName { index: usize },
    #[error("models[{index}].name: model '{name}' is configured twice")]
    DuplicateModel { index: usize, name: String },
    #[error("models[{index}].block_size: {source}")]
    BlockSize {
        index: usize,
        source: router_core::hashing::BlockSizeError,
    },
    #[error("sidecar.cluster and sidecar.http_cluster: must not be empty")]
    EmptySidecarCluster,
    #[error("sidecar.tokenize_timeout_ms: must be at least 1")]
    ZeroTokenizeTimeout,
    #[error("sidecar.stale_after_ms: must be at least 1")]
    ZeroStaleAfter,
    #[error("models[{index}].cluster: must be a non-empty ASCII cluster name")]
    Cluster { index: usize },
    #[error("models[{index}].overlap_weight: must be a finite number >= 0")]
    OverlapWeight { index: usize },
    #[error("approximate.table_entries and approximate.entry_ttl_ms: must be at least 1")]
    Approximate,
    #[error("models[{index}].temperature: must be a finite number >= 0")]
    Temperature { index: usize },
    #[error(
        "models[{index}].disaggregation.prefill_cluster: must be a non-empty ASCII cluster name"
    )]
    PrefillCluster { index: usize },
    #[error("models[{index}].disaggregation.timeout_ms: must be at least 1")]
    PrefillTimeout { index: usize },
    #[error("models[{index}].disaggregation.prefill_endpoints[{endpoint}]: '{value}' is not an ip:port address")]
    PrefillEndpoint {
        index: usize,
        endpoint: usize,
        value: String,
    },
    #[error("models[{index}].endpoints[{endpoint}]: '{value}' is not an ip:port address")]
    Endpoint {
        index: usize,
        endpoint: usize,
        value: String,
    },
}

impl PluginConfig {
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_json::from_slice(bytes)?;
        if !(1..=MAX_BODY_BYTES_LIMIT).contains(&raw.max_body_bytes) {
            return Err(ConfigError::BodyLimit(raw.max_body_bytes));
        }
        if raw.models.is_empty() {
            return Err(ConfigError::NoModels);
        }
        let sidecar = raw.sidecar.map(Self::parse_sidecar).transpose()?;
        let approximate = match NonZeroUsize::new(raw.approximate.table_entries) {
            Some(table_entries) if raw.approximate.entry_ttl_ms > 0 => ApproximateConfig {
                table_entries,
                entry_ttl_ms: raw.approximate.entry_ttl_ms,
            },
            _ => return Err(ConfigError::Approximate),
        };
        let mut models = HashMap::with_capacity(raw.models.len());
        for (index, model) in raw.models.into_iter().enumerate() {
            let parsed = Self::parse_model(index, model)?;
            if models.contains_key(&parsed.name) {
                return Err(ConfigError::DuplicateModel {
                    index,
                    name: parsed.name,
                });
            }
            models.insert(parsed.name.clone(), parsed);
        }
        Ok(Self {
            max_body_bytes: raw.max_body_bytes,
            sidecar,
            debug_headers: raw.debug_headers,
            approximate,
            orca_load_reports: raw.orca_load_reports,
            models,
        })
    }

    fn parse_sidecar(raw: RawSidecar) -> Result<SidecarConfig, ConfigError> {
        if raw.cluster.is_empty() {
            return Err(ConfigError::EmptySidecarCluster);
        }
        if raw.stale_after_ms == 0 {
            return Err(ConfigError::ZeroStaleAfter);
        }
        if raw.http_cluster.as_deref() == Some("") {
            return Err(ConfigError::EmptySidecarCluster);
        }
        if raw.tokenize_timeout_ms == 0 {
            return Err(ConfigError::ZeroTokenizeTimeout);
        }
        Ok(SidecarConfig {
            cluster: raw.cluster,
            http_cluster: raw.http_cluster,
            tokenize_timeout: std::time::Duration::from_millis(raw.tokenize_timeout_ms),
            stale_after_ms: raw.stale_after_ms,
            max_index_entries: raw.max_index_entries,
        })
    }

    fn parse_model(index: usize, raw: RawModel) -> Result<ModelConfig, ConfigError> {
        if raw.name.is_empty() {
            return Err(ConfigError::EmptyModelName { index });
        }
        let block_size = BlockSize::new(raw.block_size)
            .map_err(|source| ConfigError::BlockSize { index, source })?;
        if let Some((endpoint, value)) = first_bad_address(&raw.endpoints) {
            return Err(ConfigError::Endpoint {
                index,
                endpoint,
                value: value.to_owned(),
            });
        }
        if raw.cluster.as_deref().is_some_and(|c| !is_cluster_name(c)) {
            return Err(ConfigError::Cluster { index });
        }
        let disaggregation = raw
            .disaggregation
            .map(|d| Self::parse_disaggregation(index, d))
            .transpose()?
            .filter(|d| d.routing.policy != PrefillPolicy::Never);
        let valid = |x: f64| x.is_finite() && x >= 0.0;
        if !valid(raw.overlap_weight) {
            return Err(ConfigError::OverlapWeight { index });
        }
        if !valid(raw.temperature) {
            return Err(ConfigError::Temperature { index });
        }
        let hasher = BlockHasher::new(block_size, HashSeed::for_model(&raw.name, None));
        Ok(ModelConfig {
            name: raw.name,
            hasher,
            routing: ModelRouting {
                block_size,
                weights: CostWeights {
                    overlap_weight: raw.overlap_weight,
                    temperature: raw.temperature,
                },
                endpoints: raw.endpoints,
            },
            cluster: raw.cluster,
            disaggregation,
        })
    }

    fn parse_disaggregation(
        index: usize,
        raw: RawDisaggregation,
    ) -> Result<Disaggregation, ConfigError> {
        if !is_cluster_name(&raw.prefill_cluster) {
            return Err(ConfigError::PrefillCluster { index });
        }
        if raw.timeout_ms == 0 {
            return Err(ConfigError::PrefillTimeout { index });
        }
        if let Some((endpoint, value)) = first_bad_address(&raw.prefill_endpoints) {
            return Err(ConfigError::PrefillEndpoint {
                index,
                endpoint,
                value: value.to_owned(),
            });
        }
        Ok(Disaggregation {
            routing: PrefillRouting {
                policy: raw.policy,
                endpoints: raw.prefill_endpoints,
                min_prefill_tokens: raw.min_prefill_tokens,
                max_prefill_queue_tokens: raw.max_prefill_queue_tokens,
            },
            protocol: raw.protocol,
            prefill_cluster: raw.prefill_cluster,
            timeout: std::time::Duration::from_millis(raw.timeout_ms),
            bootstrap_port: raw.bootstrap_port,
        })
    }

    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.get(name)
    }

    pub fn models(&self) -> impl Iterator<Item = &ModelConfig> {
        self.models.values()
    }
}

fn is_cluster_name(name: &str) -> bool {
    !name.is_empty() && name.is_ascii()
}

/// The first entry that is not an `ip:port` address, with its position.
fn first_bad_address(addresses: &[String]) -> Option<(usize, &str)> {
    addresses
        .iter()
        .enumerate()
        .find(|(_, a)| a.parse::<SocketAddr>().is_err())
        .map(|(i, a)| (i, a.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_with_defaults() {
        let config = PluginConfig::parse(
            br#"{"models":[{"name":"qwen3","endpoints":["127.0.0.1:8000","[::1]:9000"]}]}"#,
        )
        .unwrap();
        assert_eq!(config.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        let model = config.model("qwen3").unwrap();
        assert_eq!(model.hasher.block_size().get(), 16);
        assert_eq!(model.routing.endpoints.len(), 2);
        assert_eq!(model.routing.weights, CostWeights::default());
        assert!(config.sidecar.is_none());
        assert!(config.orca_load_reports);
        assert_eq!(config.approximate.table_entries.get(), 65_536);
        assert!(config.model("other").is_none());
        let with_sidecar = PluginConfig::parse(
            br#"{"sidecar":{"cluster":"kv_sidecar"},"models":[{"name":"m","temperature":0.2}]}"#,
        )
        .unwrap();
        assert!(with_sidecar.model("m").unwrap().disaggregation.is_none());
        let disaggregated = PluginConfig::parse(
            br#"{"models":[{"name":"m","disaggregation":{"policy":"auto","protocol":"sglang","prefill_cluster":"prefill_pool"}},
                           {"name":"n","disaggregation":{"policy":"never","prefill_cluster":"prefill_pool"}}]}"#,
        )
        .unwrap();
        let d = disaggregated
            .model("m")
            .unwrap()
            .disaggregation
            .clone()
            .unwrap();
        assert_eq!(
            (d.routing.policy, d.protocol),
            (PrefillPolicy::Auto, Protocol::Sglang)
        );
        assert_eq!(
            (d.routing.min_prefill_tokens, d.bootstrap_port),
            (1024, 8998)
        );
        assert!(disaggregated.model("n").unwrap().disaggregation.is_none());
        let sidecar = with_sidecar.sidecar.unwrap();
        assert_eq!(sidecar.cluster, "kv_sidecar");
        assert_eq!(sidecar.stale_after_ms, 5_000);
    }

    #[test]
    fn each_invalid_config_names_its_field() {
        let cases = [
            (r#"{"models":[]}"#, "models"),
            (
                r#"{"models":[{"name":"m","endpoints":[]}],"bogus":1}"#,
                "unknown field `bogus`",
            ),
            (
                r#"{"max_body_bytes":0,"models":[{"name":"m","endpoints":[]}]}"#,
                "max_body_bytes",
            ),
            (
                r#"{"max_body_bytes":16777217,"models":[{"name":"m","endpoints":[]}]}"#,
                "max_body_bytes",
            ),
            (
                r#"{"models":[{"name":"","endpoints":[]}]}"#,
                "models[0].name",
            ),
            (
                r#"{"models":[{"name":"m","block_size":0,"endpoints":[]}]}"#,
                "models[0].block_size",
            ),
            (
                r#"{"models":[{"name":"m","endpoints":["host:1"]}]}"#,
                "models[0].endpoints[0]",
            ),
            (
                r#"{"models":[{"name":"m","endpoints":[]},{"name":"m","endpoints":[]}]}"#,
                "models[1].name",
            ),
            ("not json", "not valid JSON"),
            (
                r#"{"sidecar":{"cluster":""},"models":[{"name":"m"}]}"#,
                "sidecar.cluster",
            ),
            (
                r#"{"sidecar":{"cluster":"c","stale_after_ms":0},"models":[{"name":"m"}]}"#,
                "sidecar.stale_after_ms",
            ),
            (
                r#"{"models":[{"name":"m","overlap_weight":-1}]}"#,
                "models[0].overlap_weight",
            ),
            (
                r#"{"models":[{"name":"m","temperature":-0.5}]}"#,
                "models[0].temperature",
            ),
            (
                r#"{"approximate":{"table_entries":0},"models":[{"name":"m"}]}"#,
                "approximate.table_entries",
            ),
            (
                r#"{"approximate":{"ttl":5},"models":[{"name":"m"}]}"#,
                "unknown field `ttl`",
            ),
            (
                r#"{"models":[{"name":"m","disaggregation":{"prefill_cluster":""}}]}"#,
                "models[0].disaggregation.prefill_cluster",
            ),
            (
                r#"{"models":[{"name":"m","disaggregation":{"prefill_cluster":"p","policy":"sometimes"}}]}"#,
                "unknown variant `sometimes`",
            ),
            (
                r#"{"models":[{"name":"m","disaggregation":{"prefill_cluster":"p","protocol":"nixl"}}]}"#,
                "unknown variant `nixl`",
            ),
            (
                r#"{"models":[{"name":"m","disaggregation":{"prefill_cluster":"p","prefill_endpoints":["x"]}}]}"#,
                "models[0].disaggregation.prefill_endpoints[0]",
            ),
            (
                r#"{"models":[{"name":"m","disaggregation":{"prefill_cluster":"p","timeout_ms":0}}]}"#,
                "models[0].disaggregation.timeout_ms",
            ),
        ];
        for (json, expected) in cases {
            let err = PluginConfig::parse(json.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{json}: {err}");
        }
    }
}
