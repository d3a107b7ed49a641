//! The plugin configuration (JSON in the Envoy Wasm filter's `configuration`,
//! docs/configuration.md#filter-json). The per-model fields shared with the
//! sidecar are `kvmesh_config::ModelSpec`; the pool fields are the filter's own.
//!
//! Validated completely in `on_configure`: a bad configuration is refused with
//! one log entry listing every bad field, so Envoy rejects it instead of
//! routing with half a config.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;

use kvmesh_config::{
    check_index_entries, validate_models, EngineKind, FieldError, Invalid, ModelSpec, Problem,
    WithLocal, DEFAULT_MAX_INDEX_ENTRIES,
};
use router_core::routing::disagg::PrefillRouting;
use router_core::routing::ModelRouting;
use router_core::{BlockHasher, BlockSize, HashSeed, Target};

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

/// A model: the shared spec plus the filter's pool fields.
type RawModel = WithLocal<ModelSpec<RawPrefillPool>, RawPool>;

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
    DEFAULT_MAX_INDEX_ENTRIES
}

fn default_max_body_bytes() -> usize {
    DEFAULT_MAX_BODY_BYTES
}

/// The model's decode pool.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    #[serde(default)]
    endpoints: Vec<String>,
    /// Envoy cluster of this model's pool, when models have separate pools.
    #[serde(default)]
    cluster: Option<String>,
}

/// The prefill pool and handshake, beside the shared `disaggregation` fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrefillPool {
    #[serde(default)]
    protocol: EngineKind,
    /// Envoy cluster of the prefill pool.
    prefill_cluster: String,
    /// `ip:port` of each prefill worker, used while no fleet state is known.
    #[serde(default)]
    prefill_endpoints: Vec<String>,
    #[serde(default = "default_prefill_timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "default_bootstrap_port")]
    bootstrap_port: u16,
}

fn default_prefill_timeout_ms() -> u64 {
    30_000
}

fn default_bootstrap_port() -> u16 {
    8998
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
    /// Adds `x-kvmesh-mode`, `x-kvmesh-worker`, `x-kvmesh-cached-blocks`,
    /// `x-kvmesh-most-cached-blocks` and, after a remote prefill,
    /// `x-kvmesh-prefill-worker` to responses. Off by default: it tells
    /// clients about the fleet.
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
    #[error(transparent)]
    Invalid(#[from] Invalid),
}

impl PluginConfig {
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_json::from_slice(bytes)?;
        let mut errors = validate_models(raw.models.iter().map(|m| &m.shared));
        let mut fail = |field: String, problem| errors.push(FieldError::new(field, problem));
        if !(1..=MAX_BODY_BYTES_LIMIT).contains(&raw.max_body_bytes) {
            fail(
                "max_body_bytes".into(),
                Problem::OutOfRange {
                    value: raw.max_body_bytes as u64,
                    max: MAX_BODY_BYTES_LIMIT as u64,
                },
            );
        }
        if raw.approximate.table_entries == 0 {
            fail("approximate.table_entries".into(), Problem::Zero);
        }
        if raw.approximate.entry_ttl_ms == 0 {
            fail("approximate.entry_ttl_ms".into(), Problem::Zero);
        }
        if let Some(sidecar) = &raw.sidecar {
            Self::check_sidecar(sidecar, &mut fail);
        }
        for (index, model) in raw.models.iter().enumerate() {
            Self::check_pools(&format!("models[{index}]"), model, &mut fail);
        }
        let raw = Invalid::check(raw, errors)?;
        let approximate = ApproximateConfig {
            // Checked above; the minimum is never taken.
            table_entries: NonZeroUsize::new(raw.approximate.table_entries)
                .unwrap_or(NonZeroUsize::MIN),
            entry_ttl_ms: raw.approximate.entry_ttl_ms,
        };
        Ok(Self {
            max_body_bytes: raw.max_body_bytes,
            sidecar: raw.sidecar.map(|sidecar| SidecarConfig {
                cluster: sidecar.cluster,
                http_cluster: sidecar.http_cluster,
                tokenize_timeout: std::time::Duration::from_millis(sidecar.tokenize_timeout_ms),
                stale_after_ms: sidecar.stale_after_ms,
                max_index_entries: sidecar.max_index_entries,
            }),
            debug_headers: raw.debug_headers,
            approximate,
            orca_load_reports: raw.orca_load_reports,
            models: raw
                .models
                .into_iter()
                .map(|model| (model.name.clone(), Self::build_model(model)))
                .collect(),
        })
    }

    fn check_sidecar(sidecar: &RawSidecar, fail: &mut impl FnMut(String, Problem)) {
        if sidecar.cluster.is_empty() {
            fail("sidecar.cluster".into(), Problem::Empty);
        }
        if sidecar.http_cluster.as_deref() == Some("") {
            fail("sidecar.http_cluster".into(), Problem::Empty);
        }
        if sidecar.tokenize_timeout_ms == 0 {
            fail("sidecar.tokenize_timeout_ms".into(), Problem::Zero);
        }
        if sidecar.stale_after_ms == 0 {
            fail("sidecar.stale_after_ms".into(), Problem::Zero);
        }
        if let Some(e) = check_index_entries("sidecar.max_index_entries", sidecar.max_index_entries)
        {
            fail(e.field, e.problem);
        }
    }

    /// The filter's own fields of one model: clusters and addresses.
    fn check_pools(at: &str, model: &RawModel, fail: &mut impl FnMut(String, Problem)) {
        check_addresses(&format!("{at}.endpoints"), &model.local.endpoints, fail);
        if model
            .local
            .cluster
            .as_deref()
            .is_some_and(|c| !is_cluster_name(c))
        {
            fail(format!("{at}.cluster"), Problem::ClusterName);
        }
        let Some(disaggregation) = model.disaggregation.as_ref() else {
            return;
        };
        let prefill = &disaggregation.local;
        if disaggregation.shared_workers && prefill.protocol == EngineKind::Sglang {
            // An SGLang engine's side of a handoff is fixed when it starts.
            fail(
                format!("{at}.disaggregation.shared_workers"),
                Problem::Other("SGLang workers cannot be shared: use vllm or trtllm".into()),
            );
        }
        if !is_cluster_name(&prefill.prefill_cluster) {
            fail(
                format!("{at}.disaggregation.prefill_cluster"),
                Problem::ClusterName,
            );
        }
        if prefill.timeout_ms == 0 {
            fail(format!("{at}.disaggregation.timeout_ms"), Problem::Zero);
        }
        check_addresses(
            &format!("{at}.disaggregation.prefill_endpoints"),
            &prefill.prefill_endpoints,
            fail,
        );
    }

    /// A validated model in the form routing reads.
    fn build_model(raw: RawModel) -> ModelConfig {
        // Validated by `validate_models`; the default is never taken.
        let block_size = BlockSize::new(raw.block_size).unwrap_or_default();
        let disaggregation = raw.remote_prefill().map(|d| Disaggregation {
            routing: PrefillRouting {
                spec: d.shared,
                endpoints: targets(&d.local.prefill_endpoints),
            },
            protocol: d.local.protocol,
            prefill_cluster: d.local.prefill_cluster.clone(),
            timeout: std::time::Duration::from_millis(d.local.timeout_ms),
            bootstrap_port: d.local.bootstrap_port,
        });
        ModelConfig {
            hasher: BlockHasher::new(block_size, HashSeed::for_model(&raw.name, None)),
            routing: ModelRouting {
                block_size,
                weights: raw.weights(),
                endpoints: targets(&raw.local.endpoints),
            },
            disaggregation,
            name: raw.shared.name,
            cluster: raw.local.cluster,
        }
    }

    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.get(name)
    }

    pub fn models(&self) -> impl Iterator<Item = &ModelConfig> {
        self.models.values()
    }
}

/// Configured endpoints as routing targets: engines without ranks.
fn targets(addresses: &[String]) -> Vec<Target> {
    addresses.iter().map(|a| Target::from(a.as_str())).collect()
}

fn is_cluster_name(name: &str) -> bool {
    !name.is_empty() && name.is_ascii()
}

/// Every entry of `field` that is not an `ip:port` address.
fn check_addresses(field: &str, addresses: &[String], fail: &mut impl FnMut(String, Problem)) {
    for (i, address) in addresses.iter().enumerate() {
        if address.parse::<SocketAddr>().is_err() {
            fail(
                format!("{field}[{i}]"),
                Problem::NotAnAddress(address.clone()),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use router_core::routing::disagg::PrefillPolicy;
    use router_core::routing::select::CostWeights;

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
            (d.routing.spec.policy, d.protocol),
            (PrefillPolicy::Auto, Protocol::Sglang)
        );
        assert_eq!(
            (d.routing.spec.min_prefill_tokens, d.bootstrap_port),
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
                r#"{"sidecar":{"cluster":"c","max_index_entries":16000001},"models":[{"name":"m"}]}"#,
                "sidecar.max_index_entries",
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
            (
                r#"{"models":[{"name":"m","disaggregation":{"prefill_cluster":"p","protocol":"sglang","shared_workers":true}}]}"#,
                "models[0].disaggregation.shared_workers: SGLang workers cannot be shared",
            ),
        ];
        for (json, expected) in cases {
            let err = PluginConfig::parse(json.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{json}: {err}");
        }
    }

    #[test]
    fn every_bad_field_is_reported_at_once() {
        let err = PluginConfig::parse(
            br#"{"max_body_bytes":0,"models":[{"name":"m","block_size":0,"cluster":"",
                 "disaggregation":{"policy":"auto","prefill_cluster":"p","timeout_ms":0}}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err.lines().collect::<Vec<_>>(),
            [
                "models[0].block_size: must be at least 1",
                "max_body_bytes: must be between 1 and 16777216, got 0",
                "models[0].cluster: must be a non-empty ASCII cluster name",
                "models[0].disaggregation.timeout_ms: must be at least 1",
            ]
        );
    }
}
