//! ORCA `endpoint-load-metrics` response headers: the engine's own view of
//! its load, fresher than anything the sidecar relays. vLLM sends them on
//! non-streaming responses when the request asks with
//! `endpoint-load-metrics-format`.
//! The report's load model lives in `router_core::routing::load`.

use std::collections::HashMap;

pub use router_core::routing::load::OrcaReport;
use serde::Deserialize;
use thiserror::Error;

/// Request header asking for the report, and its value.
pub const FORMAT_HEADER: &str = "endpoint-load-metrics-format";
pub const FORMAT: &str = "TEXT";
/// Response header carrying the report.
pub const LOAD_HEADER: &str = "endpoint-load-metrics";

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
}
