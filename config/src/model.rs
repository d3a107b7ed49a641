//! The per-model spec shared by the filter's JSON and the sidecar's YAML:
//! same field names, same defaults, same checks. Each program adds its own
//! fields beside these (see [`WithLocal`]).

use std::collections::HashSet;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::block_size::BlockSize;
use crate::enums::DisaggregationPolicy;
use crate::error::{FieldError, Problem};
use crate::split::WithLocal;

/// Tunables of the routing cost function (`router_core::routing::select`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostWeights {
    /// How much a block of prefill counts against a block of decode load.
    pub overlap_weight: f64,
    /// 0 picks the lowest cost; larger values spread load by sampling.
    pub temperature: f64,
}

impl CostWeights {
    /// A block to prefill costs compute before the first token; a block of
    /// decode load costs memory and microseconds per step. At 4 a worker
    /// keeps its cached prefixes until it runs about four more requests than
    /// another, which still bounds herding (how it was chosen:
    /// docs/benchmarks.md#cost-function-weight).
    pub const DEFAULT_OVERLAP_WEIGHT: f64 = 4.0;
}

impl Default for CostWeights {
    fn default() -> Self {
        Self {
            overlap_weight: Self::DEFAULT_OVERLAP_WEIGHT,
            temperature: 0.0,
        }
    }
}

/// A section with no fields of its own, for a program that reads only the
/// shared ones (unknown keys are still refused).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoLocalFields {}

/// One model: its name, KV block size, routing weights and disaggregation.
/// `P` is the program's own fields of the `disaggregation` section (the
/// filter's prefill pool); the sidecar has none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, bound(deserialize = "P: DeserializeOwned"))]
pub struct ModelSpec<P = NoLocalFields> {
    pub name: String,
    /// Tokens per KV block; must equal the engines' (`--block-size`).
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    #[serde(default = "default_overlap_weight")]
    pub overlap_weight: f64,
    #[serde(default)]
    pub temperature: f64,
    /// Remote prefill; absent is `policy: never`.
    #[serde(default = "none", skip_serializing_if = "Option::is_none")]
    pub disaggregation: Option<WithLocal<DisaggregationSpec, P>>,
}

/// When a model's prompts are prefilled on the prefill pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DisaggregationSpec {
    pub policy: DisaggregationPolicy,
    /// `auto`: remote prefill once the decode worker would compute at least
    /// this many prompt tokens itself.
    pub min_prefill_tokens: u64,
    /// `auto`: only onto a prefill worker with less prefill queued than this.
    pub max_prefill_queue_tokens: u64,
    /// `auto` with a dedicated prefill pool: prefill remotely only while the
    /// prefill worker would finish the prompt within this many tokens of
    /// prefill after the decode worker would finish it itself. Beyond, the
    /// decode worker prefills the prompt (aggregated serving): its decode
    /// steps slow down, but the prompt's first token does not wait for a
    /// backed-up prefill pool.
    pub max_prefill_lag_tokens: u64,
    /// Workers of role `both` also prefill for other workers, and the
    /// prefill pool's workers serve whole requests: the decode worker is
    /// chosen among all, and `auto` prefills remotely only where that is
    /// not slower than prefilling locally. Needs engines that take either
    /// side of a handoff per request (vLLM with a `kv_both` connector).
    pub shared_workers: bool,
}

impl DisaggregationSpec {
    pub const DEFAULT_MIN_PREFILL_TOKENS: u64 = 1024;
    /// Lowering it to 32k made `auto` keep long prompts local while the
    /// prefill pool had room (docs/benchmarks.md).
    pub const DEFAULT_MAX_PREFILL_QUEUE_TOKENS: u64 = 262_144;
    pub const DEFAULT_MAX_PREFILL_LAG_TOKENS: u64 = 262_144;
}

impl Default for DisaggregationSpec {
    fn default() -> Self {
        Self {
            policy: DisaggregationPolicy::Never,
            min_prefill_tokens: Self::DEFAULT_MIN_PREFILL_TOKENS,
            max_prefill_queue_tokens: Self::DEFAULT_MAX_PREFILL_QUEUE_TOKENS,
            max_prefill_lag_tokens: Self::DEFAULT_MAX_PREFILL_LAG_TOKENS,
            shared_workers: false,
        }
    }
}

fn default_block_size() -> u32 {
    BlockSize::VLLM_DEFAULT.get()
}

fn default_overlap_weight() -> f64 {
    CostWeights::DEFAULT_OVERLAP_WEIGHT
}

fn none<T>() -> Option<T> {
    None
}

impl<P> ModelSpec<P> {
    /// A model with every default.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            block_size: default_block_size(),
            overlap_weight: default_overlap_weight(),
            temperature: 0.0,
            disaggregation: None,
        }
    }

    pub fn weights(&self) -> CostWeights {
        CostWeights {
            overlap_weight: self.overlap_weight,
            temperature: self.temperature,
        }
    }

    /// The disaggregation section unless it is absent or `never`.
    pub fn remote_prefill(&self) -> Option<&WithLocal<DisaggregationSpec, P>> {
        self.disaggregation
            .as_ref()
            .filter(|d| d.policy != DisaggregationPolicy::Never)
    }

    /// Problems of this model's shared fields, named under `at` (`models[0]`).
    pub fn validate(&self, at: &str) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let mut fail =
            |field: &str, problem| errors.push(FieldError::new(format!("{at}.{field}"), problem));
        if self.name.is_empty() {
            fail("name", Problem::Empty);
        }
        if let Err(e) = BlockSize::new(self.block_size) {
            fail("block_size", e.into());
        }
        for (field, value) in [
            ("overlap_weight", self.overlap_weight),
            ("temperature", self.temperature),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                fail(field, Problem::NotFiniteOrNegative);
            }
        }
        if self
            .disaggregation
            .as_ref()
            .is_some_and(|d| d.max_prefill_queue_tokens == 0)
        {
            // `auto` would never find a prefill worker with room.
            fail("disaggregation.max_prefill_queue_tokens", Problem::Zero);
        }
        errors
    }
}

/// Problems of a `models` list: at least one model, each valid, no name twice.
pub fn validate_models<'a, P: 'a>(
    models: impl IntoIterator<Item = &'a ModelSpec<P>>,
) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let mut names = HashSet::new();
    let mut count = 0;
    for (index, model) in models.into_iter().enumerate() {
        count += 1;
        let at = format!("models[{index}]");
        errors.extend(model.validate(&at));
        if !model.name.is_empty() && !names.insert(model.name.as_str()) {
            errors.push(FieldError::new(format!("{at}.name"), Problem::Duplicate));
        }
    }
    if count == 0 {
        errors.push(FieldError::new(
            "models",
            Problem::Other("must list at least one model".to_owned()),
        ));
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    type Spec = ModelSpec<NoLocalFields>;

    fn parse(json: &str) -> Result<Spec, serde_json::Error> {
        serde_json::from_str(json)
    }

    fn problems(json: &str) -> Vec<String> {
        validate_models([&parse(json).unwrap()])
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn defaults() {
        let spec = parse(r#"{"name":"m"}"#).unwrap();
        assert_eq!(spec, Spec::new("m"));
        assert_eq!(spec.block_size, 16);
        assert_eq!(spec.weights(), CostWeights::default());
        assert_eq!(spec.weights().overlap_weight, 4.0);
        assert!(spec.disaggregation.is_none() && spec.remote_prefill().is_none());
        let spec = parse(r#"{"name":"m","disaggregation":{}}"#).unwrap();
        let disaggregation = spec.disaggregation.as_ref().unwrap();
        assert_eq!(disaggregation.shared, DisaggregationSpec::default());
        assert_eq!(disaggregation.min_prefill_tokens, 1024);
        assert_eq!(disaggregation.max_prefill_queue_tokens, 262_144);
        assert_eq!(disaggregation.max_prefill_lag_tokens, 262_144);
        assert!(!disaggregation.shared_workers);
        assert!(
            spec.remote_prefill().is_none(),
            "never is no remote prefill"
        );
        let spec = parse(r#"{"name":"m","disaggregation":{"policy":"auto"}}"#).unwrap();
        assert!(spec.remote_prefill().is_some());
        assert!(validate_models([&spec]).is_empty());
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        assert_eq!(
            problems(
                r#"{"name":"","block_size":0,"overlap_weight":-1,"temperature":-0.5,
                    "disaggregation":{"max_prefill_queue_tokens":0}}"#
            ),
            [
                "models[0].name: must not be empty",
                "models[0].block_size: must be at least 1",
                "models[0].overlap_weight: must be a finite number >= 0",
                "models[0].temperature: must be a finite number >= 0",
                "models[0].disaggregation.max_prefill_queue_tokens: must be at least 1",
            ]
        );
        assert_eq!(
            problems(r#"{"name":"m","block_size":4097}"#),
            ["models[0].block_size: 4097 exceeds the maximum of 4096"]
        );
        let m = Spec::new("m");
        let twice: Vec<String> = validate_models([&m, &m])
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(twice, ["models[1].name: is listed twice"]);
        let none: [&Spec; 0] = [];
        assert_eq!(
            validate_models(none)[0].to_string(),
            "models: must list at least one model"
        );
    }

    #[test]
    fn unknown_fields_and_values_are_refused() {
        for (json, expected) in [
            (r#"{"name":"m","routing":{}}"#, "unknown field `routing`"),
            (
                r#"{"name":"m","disaggregation":{"threshold_tokens":5}}"#,
                "unknown field `threshold_tokens`",
            ),
            (
                r#"{"name":"m","disaggregation":{"policy":"sometimes"}}"#,
                "unknown variant `sometimes`",
            ),
            (r#"{"block_size":16}"#, "missing field `name`"),
        ] {
            let err = parse(json).unwrap_err().to_string();
            assert!(err.contains(expected), "{json}: {err}");
        }
    }
}
