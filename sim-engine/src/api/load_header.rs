//! ORCA `endpoint-load-metrics` response header, as vLLM sends it on
//! non-streaming responses when asked with `endpoint-load-metrics-format`.

use crate::metrics::LoadSnapshot;

/// Name of the request header choosing the format, and of the response header.
pub const FORMAT_HEADER: &str = "endpoint-load-metrics-format";
pub const LOAD_HEADER: &str = "endpoint-load-metrics";

/// The header value for `format` (`TEXT` or `JSON`, case-insensitive), or
/// `None` for formats vLLM does not support either.
pub fn render(format: &str, load: LoadSnapshot) -> Option<String> {
    match format.trim().to_ascii_uppercase().as_str() {
        "TEXT" => Some(format!(
            "TEXT named_metrics.kv_cache_usage_perc={}, named_metrics.num_requests_waiting={}, named_metrics.num_requests_running={}",
            load.kv_cache_usage, load.waiting, load.running
        )),
        "JSON" => {
            let body = serde_json::json!({
                "named_metrics": {
                    "kv_cache_usage_perc": load.kv_cache_usage,
                    "num_requests_waiting": load.waiting,
                    "num_requests_running": load.running,
                }
            });
            Some(format!("JSON {body}"))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOAD: LoadSnapshot = LoadSnapshot {
        running: 2,
        waiting: 3,
        kv_cache_usage: 0.4,
    };

    #[test]
    fn text_and_json_forms() {
        assert_eq!(
            render("TEXT", LOAD).unwrap(),
            "TEXT named_metrics.kv_cache_usage_perc=0.4, named_metrics.num_requests_waiting=3, named_metrics.num_requests_running=2"
        );
        let json = render("json", LOAD).unwrap();
        let value: serde_json::Value =
            serde_json::from_str(json.strip_prefix("JSON ").unwrap()).unwrap();
        assert_eq!(value["named_metrics"]["num_requests_waiting"], 3);
        assert!(render("BINARY", LOAD).is_none());
    }
}
