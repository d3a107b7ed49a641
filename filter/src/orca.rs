//! ORCA `endpoint-load-metrics` response headers: the engine's own view of
//! its load, fresher than anything the sidecar relays. vLLM sends them on
//! non-streaming responses when the request asks with
//! `endpoint-load-metrics-format`.
//!
//! The filter does not know a worker's KV capacity, so waiting and running
//! requests are turned into the cost function's units with the mean prompt
//! size this VM routes.

use std::collections::HashMap;

use router_core::selection::WorkerLoad;
use serde::Deserialize;
use thiserror::Error;

/// Request header asking for the report, and its value.
pub const FORMAT_HEADER: &str = "endpoint-load-metrics-format";
pub const FORMAT: &str = "TEXT";
/// Response header carrying the report.
pub const LOAD_HEADER: &str = "endpoint-load-metrics";
/// A report older than this says nothing about the worker's load now.
const FRESH_MS: u64 = 2_000;
/// Workers remembered before the table starts over (worker churn).
const MAX_WORKERS: usize = 4096;

/// The named metrics vLLM reports.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OrcaReport {
    pub kv_cache_usage: f64,
    pub waiting: u32,
    pub running: u32,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum OrcaError {
    #[error("unsupported endpoint-load-metrics format (want TEXT or JSON)")]
    Format,
    #[error("malformed endpoint-load-metrics entry '{0}'")]
    Entry(String),
    #[error("malformed endpoint-load-metrics JSON")]
    Json,
}

#[derive(Deserialize)]
struct JsonReport {
    #[serde(default)]
    named_metrics: HashMap<String, f64>,
}

/// Parses a header value: `TEXT k=v, k=v` (older Envoy parsers write `k: v`)
/// or `JSON {"named_metrics": {...}}`. Unknown metrics are ignored.
pub fn parse(value: &str) -> Result<OrcaReport, OrcaError> {
    let value = value.trim();
    let mut report = OrcaReport::default();
    if let Some(json) = value.strip_prefix("JSON") {
        let parsed: JsonReport = serde_json::from_str(json.trim()).map_err(|_| OrcaError::Json)?;
        for (name, metric) in parsed.named_metrics {
            set(&mut report, &name, metric);
        }
        return Ok(report);
    }
    let text = value.strip_prefix("TEXT").ok_or(OrcaError::Format)?;
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, metric) = entry
            .split_once(['=', ':'])
            .ok_or_else(|| OrcaError::Entry(entry.to_owned()))?;
        let metric: f64 = metric
            .trim()
            .parse()
            .map_err(|_| OrcaError::Entry(entry.to_owned()))?;
        if let Some(name) = name.trim().strip_prefix("named_metrics.") {
            set(&mut report, name, metric);
        }
    }
    Ok(report)
}

fn set(report: &mut OrcaReport, name: &str, value: f64) {
    if !value.is_finite() || value < 0.0 {
        return;
    }
    // Saturating float-to-int casts: a huge count is still just "very busy".
    match name {
        "kv_cache_usage_perc" => report.kv_cache_usage = value,
        "num_requests_waiting" => report.waiting = value as u32,
        "num_requests_running" => report.running = value as u32,
        _ => {}
    }
}

/// The latest report of each worker this VM heard from.
#[derive(Debug)]
pub struct OrcaLoads {
    by_address: HashMap<String, (OrcaReport, u64)>,
    /// Exponential mean of routed prompt sizes, in tokens.
    mean_prompt_tokens: f64,
}

impl Default for OrcaLoads {
    fn default() -> Self {
        Self {
            by_address: HashMap::new(),
            mean_prompt_tokens: 512.0,
        }
    }
}

impl OrcaLoads {
    pub fn record(&mut self, address: &str, report: OrcaReport, now_ms: u64) {
        if self.by_address.len() >= MAX_WORKERS && !self.by_address.contains_key(address) {
            self.by_address.clear();
        }
        self.by_address.insert(address.to_owned(), (report, now_ms));
    }

    /// Folds one routed prompt into the mean prompt size.
    pub fn observe_prompt(&mut self, tokens: u64) {
        self.mean_prompt_tokens += (tokens as f64 - self.mean_prompt_tokens) / 16.0;
    }

    /// The worker's reported load in cost-function units, if fresh.
    pub fn load(&self, address: &str, block_size: u32, now_ms: u64) -> Option<WorkerLoad> {
        let (report, at) = self.by_address.get(address)?;
        if now_ms.saturating_sub(*at) > FRESH_MS {
            return None;
        }
        let prompt_tokens = self.mean_prompt_tokens.max(0.0);
        let prompt_blocks = prompt_tokens / f64::from(block_size.max(1));
        Some(WorkerLoad {
            active_blocks: (f64::from(report.running) * prompt_blocks) as u64,
            queued_prefill_tokens: (f64::from(report.waiting) * prompt_tokens) as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_with_either_separator_and_json() {
        let expected = OrcaReport {
            kv_cache_usage: 0.4,
            waiting: 3,
            running: 2,
        };
        for value in [
            "TEXT named_metrics.kv_cache_usage_perc=0.4, named_metrics.num_requests_waiting=3, named_metrics.num_requests_running=2",
            "TEXT named_metrics.kv_cache_usage_perc: 0.4, named_metrics.num_requests_waiting: 3,named_metrics.num_requests_running:2, cpu_utilization=0.9",
            r#"JSON {"named_metrics":{"kv_cache_usage_perc":0.4,"num_requests_waiting":3,"num_requests_running":2}}"#,
        ] {
            assert_eq!(parse(value), Ok(expected), "{value}");
        }
    }

    #[test]
    fn malformed_reports_are_errors() {
        assert_eq!(parse("BINARY abc"), Err(OrcaError::Format));
        assert!(matches!(
            parse("TEXT named_metrics.num_requests_waiting"),
            Err(OrcaError::Entry(_))
        ));
        assert!(matches!(
            parse("TEXT named_metrics.num_requests_waiting=lots"),
            Err(OrcaError::Entry(_))
        ));
        assert_eq!(parse("JSON {"), Err(OrcaError::Json));
        // Negative or non-finite values are ignored, not trusted.
        assert_eq!(
            parse("TEXT named_metrics.num_requests_waiting=-3").map(|r| r.waiting),
            Ok(0)
        );
    }

    #[test]
    fn fresh_reports_become_load() {
        let mut loads = OrcaLoads::default();
        for _ in 0..200 {
            loads.observe_prompt(160);
        }
        let report = OrcaReport {
            kv_cache_usage: 0.5,
            waiting: 2,
            running: 3,
        };
        loads.record("a", report, 1_000);
        let load = loads.load("a", 16, 1_500).unwrap();
        assert_eq!(load.queued_prefill_tokens, 320);
        assert_eq!(load.active_blocks, 30);
        assert!(loads.load("a", 16, 3_001).is_none());
        assert!(loads.load("b", 16, 1_500).is_none());
    }
}
