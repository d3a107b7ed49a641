//! `kvmesh.yaml`: what `kv-sidecar serve` connects to, listens on and routes
//! (docs/configuration.md#sidecar-yaml). Its models are `kvmesh_config::ModelSpec`,
//! the filter's per-model fields, plus the tokenizer files. Unknown keys are
//! errors (a typo must not silently fall back to a default), and every
//! validation problem names its field, e.g.
//! `models[0].block_size: must be at least 1`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use kvmesh_config::{
    check_index_entries, validate_models, FieldError, Invalid, ModelSpec, Problem, WithLocal,
    DEFAULT_MAX_INDEX_ENTRIES,
};
use router_core::protocol::subjects;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::nats_options::server_addrs;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub nats: NatsConfig,
    pub listen: ListenConfig,
    #[serde(default)]
    pub state: StateConfig,
    #[serde(default)]
    pub tokenize: TokenizeConfig,
    pub models: Vec<ModelConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    pub url: String,
    #[serde(default = "default_prefix")]
    pub subject_prefix: String,
    #[serde(default)]
    pub auth: Option<NatsAuth>,
    #[serde(default)]
    pub tls: Option<NatsTls>,
}

/// Exactly one way to authenticate. A token or password may come from a
/// file (a mounted Kubernetes Secret) so that no secret sits in the config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsAuth {
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    pub creds_file: Option<PathBuf>,
}

impl NatsAuth {
    /// Reads `token_file` / `password_file` into `token` / `password`
    /// (without a trailing newline).
    fn read_secret_files(&mut self, errors: &mut Vec<FieldError>) {
        for (field, file, value) in [
            ("nats.auth.token_file", &self.token_file, &mut self.token),
            (
                "nats.auth.password_file",
                &self.password_file,
                &mut self.password,
            ),
        ] {
            let Some(path) = file else { continue };
            let problem = if value.is_some() {
                "set the value or the file, not both".to_owned()
            } else {
                match std::fs::read_to_string(path) {
                    Ok(text) => {
                        *value = Some(text.trim_end_matches(['\n', '\r']).to_owned());
                        continue;
                    }
                    Err(e) => format!("cannot read {}: {e}", path.display()),
                }
            };
            errors.push(FieldError::new(field, Problem::Other(problem)));
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// Health, metrics, tokenization, debug.
    pub http: String,
    /// The state stream into the filters.
    pub grpc: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// A worker whose heartbeats stop is removed after this long.
    pub worker_timeout_ms: u64,
    /// Upper bound on (block, worker) entries per model.
    pub max_index_entries: usize,
    pub max_workers: usize,
    /// Routing decisions tracked per model until their completion arrives.
    pub max_inflight_requests: usize,
    /// A decision whose completion never arrives stops counting after this.
    pub inflight_ttl_ms: u64,
    /// A gateway whose state stream closed and stayed closed this long is
    /// gone: its decisions stop counting, here and on every sidecar.
    pub gateway_grace_ms: u64,
    /// Updates queued per stream subscriber before it gets a fresh snapshot.
    pub subscriber_buffer: usize,
    /// Minimum time between two full-state requests to the same relay.
    pub sync_retry_ms: u64,
    /// `/readyz` waits at most this long for relays' initial full states.
    pub initial_sync_timeout_ms: u64,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            // Relays heartbeat every second: tolerate one lost heartbeat and
            // still remove a dead worker within 3 s.
            worker_timeout_ms: 2500,
            max_index_entries: DEFAULT_MAX_INDEX_ENTRIES,
            max_workers: 4096,
            max_inflight_requests: 100_000,
            inflight_ttl_ms: 600_000,
            // Three times a filter's longest reconnect backoff (5 s): a
            // live VM whose stream broke is back well before.
            gateway_grace_ms: 15_000,
            subscriber_buffer: 1024,
            sync_retry_ms: 1000,
            initial_sync_timeout_ms: 5000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizeConfig {
    /// Cached text segments (between special tokens) per model.
    pub cache_entries: usize,
    /// Bytes those segments (text and ids) may hold per model.
    pub cache_bytes: usize,
    /// Largest request body accepted by `/v1/tokenize` and `/debug/route`.
    pub max_body_bytes: usize,
    /// Request bytes tokenized at once; past it `/v1/tokenize` answers 503
    /// (see `tokenize_budget.rs`). At least `max_body_bytes`; unset, the
    /// larger of 4 MiB and `max_body_bytes`.
    max_inflight_bytes: Option<usize>,
}

impl TokenizeConfig {
    /// Default of `max_inflight_bytes` when `max_body_bytes` is no larger.
    const INFLIGHT_BYTES: usize = 4 << 20;

    pub fn max_inflight_bytes(&self) -> usize {
        self.max_inflight_bytes
            .unwrap_or(Self::INFLIGHT_BYTES.max(self.max_body_bytes))
    }
}

impl Default for TokenizeConfig {
    fn default() -> Self {
        Self {
            cache_entries: 4096,
            cache_bytes: 64 << 20,
            max_body_bytes: 4 << 20,
            max_inflight_bytes: None,
        }
    }
}

/// A model: the spec the filter shares, plus what tokenizes its prompts.
pub type ModelConfig = WithLocal<ModelSpec, ModelFiles>;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFiles {
    /// `tokenizer.json`; without it the model has no tokenization service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<PathBuf>,
    /// A `tokenizer_config.json`-shaped file whose `chat_template` replaces
    /// the one beside `tokenizer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<PathBuf>,
}

fn default_prefix() -> String {
    subjects::DEFAULT_PREFIX.to_owned()
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error(transparent)]
    Invalid(#[from] Invalid),
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates YAML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let mut config: Config = serde_norway::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        let mut errors = Vec::new();
        if let Some(auth) = &mut config.nats.auth {
            auth.read_secret_files(&mut errors);
        }
        errors.extend(config.validate());
        Ok(Invalid::check(config, errors)?)
    }

    pub fn http_addr(&self) -> Result<SocketAddr, FieldError> {
        parse_addr("listen.http", &self.listen.http)
    }

    pub fn grpc_addr(&self) -> Result<SocketAddr, FieldError> {
        parse_addr("listen.grpc", &self.listen.grpc)
    }

    /// Every problem, not just the first: fixing a config should take one round.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = validate_models(self.models.iter().map(|m| &m.shared));
        errors.extend(check_index_entries(
            "state.max_index_entries",
            self.state.max_index_entries,
        ));
        let mut fail = |field: &str, problem: &str| {
            errors.push(FieldError::new(field, Problem::Other(problem.to_owned())))
        };
        let schemes = ["nats://", "tls://", "ws://", "wss://"];
        let urls: Vec<&str> = self.nats.url.split(',').map(str::trim).collect();
        if urls
            .iter()
            .any(|url| !schemes.iter().any(|scheme| url.starts_with(scheme)))
        {
            fail(
                "nats.url",
                "must start with nats://, tls://, ws:// or wss:// (each URL of a comma-separated list)",
            );
        } else if let Err(err) = server_addrs(&self.nats.url) {
            fail("nats.url", &format!("{err:#}"));
        }
        let prefix = &self.nats.subject_prefix;
        if prefix.is_empty()
            || prefix.split('.').any(str::is_empty)
            || prefix
                .chars()
                .any(|c| c == '*' || c == '>' || c.is_whitespace())
        {
            fail(
                "nats.subject_prefix",
                "must be non-empty dot-separated tokens without '*', '>' or whitespace",
            );
        }
        if let Some(auth) = &self.nats.auth {
            let ways = usize::from(auth.token.is_some())
                + usize::from(auth.user.is_some() || auth.password.is_some())
                + usize::from(auth.creds_file.is_some());
            if ways != 1 {
                fail(
                    "nats.auth",
                    "set exactly one of token (or token_file), user+password (or password_file), creds_file",
                );
            }
            if auth.user.is_some() != auth.password.is_some() {
                fail("nats.auth", "user and password go together");
            }
            if let Some(creds) = &auth.creds_file {
                if !creds.is_file() {
                    fail("nats.auth.creds_file", "file does not exist");
                }
            }
        }
        if let Some(tls) = &self.nats.tls {
            if tls.cert.is_some() != tls.key.is_some() {
                fail("nats.tls", "cert and key go together");
            }
            for (field, path) in [
                ("nats.tls.ca", &tls.ca),
                ("nats.tls.cert", &tls.cert),
                ("nats.tls.key", &tls.key),
            ] {
                if path.as_ref().is_some_and(|p| !p.is_file()) {
                    fail(field, "file does not exist");
                }
            }
        }
        for result in [self.http_addr(), self.grpc_addr()] {
            if let Err(e) = result {
                fail(&e.field, &e.problem.to_string());
            }
        }
        if self.listen.http == self.listen.grpc {
            fail("listen.grpc", "must differ from listen.http");
        }
        let state = &self.state;
        for (field, value) in [
            ("state.worker_timeout_ms", state.worker_timeout_ms as usize),
            ("state.max_workers", state.max_workers),
            ("state.max_inflight_requests", state.max_inflight_requests),
            ("state.inflight_ttl_ms", state.inflight_ttl_ms as usize),
            ("state.gateway_grace_ms", state.gateway_grace_ms as usize),
            ("state.subscriber_buffer", state.subscriber_buffer),
            ("state.sync_retry_ms", state.sync_retry_ms as usize),
        ] {
            if value == 0 {
                fail(field, "must be greater than 0");
            }
        }
        if self.tokenize.cache_entries == 0 {
            fail("tokenize.cache_entries", "must be greater than 0");
        }
        if self.tokenize.cache_bytes == 0 {
            fail("tokenize.cache_bytes", "must be greater than 0");
        }
        if self.tokenize.max_body_bytes == 0 {
            fail("tokenize.max_body_bytes", "must be greater than 0");
        }
        if self.tokenize.max_inflight_bytes() < self.tokenize.max_body_bytes {
            fail(
                "tokenize.max_inflight_bytes",
                "must be at least tokenize.max_body_bytes",
            );
        }
        let mut subject_tokens = HashMap::new();
        for (i, model) in self.models.iter().enumerate() {
            let at = |field: &str| format!("models[{i}].{field}");
            let token = router_core::protocol::subjects::token(&model.name);
            // A name listed twice is reported as such by `validate_models`.
            if subject_tokens
                .insert(token, model.name.as_str())
                .is_some_and(|other| other != model.name)
            {
                fail(
                    &at("name"),
                    "maps to the same NATS subject token as another model",
                );
            }
            if let Some(tokenizer) = &model.local.tokenizer {
                if !tokenizer.is_file() {
                    fail(&at("tokenizer"), "file does not exist");
                }
            }
            if let Some(template) = &model.local.chat_template {
                if model.local.tokenizer.is_none() {
                    fail(&at("chat_template"), "needs models[].tokenizer");
                }
                if let Err(e) = chat_template::ChatTemplate::from_config_file(template) {
                    fail(&at("chat_template"), &e.to_string());
                }
            }
        }
        errors
    }
}

fn parse_addr(field: &str, value: &str) -> Result<SocketAddr, FieldError> {
    value
        .parse()
        .map_err(|_| FieldError::new(field, Problem::NotAnAddress(value.to_owned())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "
nats: {url: 'nats://127.0.0.1:4222'}
listen: {http: '127.0.0.1:9100', grpc: '127.0.0.1:9101'}
models:
  - {name: m, block_size: 16, tokenizer: null}
";

    fn errors(text: &str) -> String {
        match Config::parse(text, "kvmesh.yaml") {
            Ok(_) => "ok".into(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = Config::parse(MINIMAL, "x").unwrap();
        assert_eq!(config.nats.subject_prefix, "kvmesh");
        assert_eq!(config.state.worker_timeout_ms, 2500);
        assert_eq!(config.state.max_index_entries, DEFAULT_MAX_INDEX_ENTRIES);
        assert_eq!(config.models[0].shared, ModelSpec::new("m"));
        assert_eq!(config.models[0].local, ModelFiles::default());
    }

    #[test]
    fn each_problem_names_its_field() {
        assert_eq!(
            errors(&MINIMAL.replace("block_size: 16", "block_size: 0")),
            "models[0].block_size: must be at least 1"
        );
        for (from, to, expected) in [
            ("block_size: 16", "backend: vllm", "unknown field `backend`"),
            ("tokenizer:", "tokenizr:", "unknown field `tokenizr`"),
            (
                "tokenizer: null",
                "disaggregation: {policy: auto, threshold_tokens: 1024}",
                "unknown field `threshold_tokens`",
            ),
            (
                "tokenizer: null",
                "disaggregation: {policy: sometimes}",
                "unknown variant `sometimes`",
            ),
        ] {
            let err = errors(&MINIMAL.replace(from, to));
            assert!(err.contains(expected), "{to}: {err}");
        }
        assert_eq!(
            errors(&MINIMAL.replace("9101", "x")),
            "listen.grpc: '127.0.0.1:x' is not an ip:port address"
        );
        assert_eq!(
            errors(&MINIMAL.replace(
                "listen:",
                "tokenize: {max_body_bytes: 2048, max_inflight_bytes: 1024}\nlisten:"
            )),
            "tokenize.max_inflight_bytes: must be at least tokenize.max_body_bytes"
        );
        // A config written for the earlier 8 MiB body limit still loads: the
        // budget follows the body limit it sets.
        let config = Config::parse(
            &MINIMAL.replace("listen:", "tokenize: {max_body_bytes: 8388608}\nlisten:"),
            "x",
        );
        assert_eq!(
            config.map(|c| c.tokenize.max_inflight_bytes()).ok(),
            Some(8 << 20)
        );
        let defaults = Config::parse(MINIMAL, "x").map(|c| c.tokenize.max_inflight_bytes());
        assert_eq!(defaults.ok(), Some(4 << 20));
        // Every problem at once, shared fields first.
        assert_eq!(
            errors(
                &MINIMAL
                    .replace(
                        "tokenizer: null",
                        "overlap_weight: -1, tokenizer: /nonexistent"
                    )
                    .replace("listen:", "state: {max_index_entries: 0}\nlisten:")
            ),
            "models[0].overlap_weight: must be a finite number >= 0\n\
             state.max_index_entries: must be between 1 and 16000000, got 0\n\
             models[0].tokenizer: file does not exist"
        );
    }

    #[test]
    fn models_read_the_filters_per_model_fields() {
        let config = Config::parse(
            &MINIMAL.replace(
                "tokenizer: null",
                "overlap_weight: 2, temperature: 0.5, disaggregation: {policy: auto, min_prefill_tokens: 512}",
            ),
            "x",
        )
        .unwrap();
        let model = &config.models[0];
        assert_eq!((model.overlap_weight, model.temperature), (2.0, 0.5));
        let disaggregation = model.remote_prefill().unwrap();
        assert_eq!(
            disaggregation.policy,
            kvmesh_config::DisaggregationPolicy::Auto
        );
        assert_eq!(disaggregation.min_prefill_tokens, 512);
        assert_eq!(disaggregation.max_prefill_queue_tokens, 262_144);
    }

    #[test]
    fn secrets_are_read_from_mounted_files() {
        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("password");
        std::fs::write(&password, "s3cret\n").unwrap();
        let with_auth = |auth: &str| {
            MINIMAL.replace(
                "nats: {url: 'nats://127.0.0.1:4222'}",
                &format!("nats: {{url: 'nats://127.0.0.1:4222', auth: {auth}}}"),
            )
        };
        let config = Config::parse(
            &with_auth(&format!(
                "{{user: kvmesh, password_file: '{}'}}",
                password.display()
            )),
            "x",
        )
        .unwrap();
        let auth = config.nats.auth.unwrap();
        assert_eq!(auth.password.as_deref(), Some("s3cret"));
        assert!(errors(&with_auth("{token: a, token_file: /nonexistent}"))
            .contains("nats.auth.token_file: set the value or the file, not both"));
        assert!(errors(&with_auth("{token_file: /nonexistent/token}"))
            .contains("nats.auth.token_file: cannot read /nonexistent/token"));
    }
}
