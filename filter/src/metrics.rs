//! The filter's Envoy counters (visible in `/stats/prometheus`, summed over
//! every worker VM).

use proxy_wasm::types::MetricType;

use crate::host::{self, HostError};

/// One Envoy counter owned by this VM.
#[derive(Debug, Clone, Copy)]
pub struct Counter(u32);

impl Counter {
    fn define(name: &str) -> Result<Self, HostError> {
        host::define_metric(MetricType::Counter, name).map(Self)
    }

    /// Counting is best effort: a failed increment must never fail a request.
    pub fn inc(self) {
        if let Err(err) = host::increment_metric(self.0, 1) {
            log::debug!("{err}");
        }
    }
}

/// Every counter the filter maintains.
#[derive(Debug, Clone, Copy)]
pub struct FilterMetrics {
    /// Inference requests sent to a chosen endpoint.
    pub routed: Counter,
    /// Inference requests left to Envoy's fallback balancing (no decision).
    pub unrouted: Counter,
    /// Requests that are not inference calls and pass through untouched.
    pub passthrough: Counter,
    pub rejected_invalid: Counter,
    pub rejected_too_large: Counter,
    pub rejected_unknown_model: Counter,
    /// Client-supplied routing headers removed before routing.
    pub forged_headers_removed: Counter,
    /// Host calls that returned an error status on the request path.
    pub host_errors: Counter,
}

impl FilterMetrics {
    pub fn define() -> Result<Self, HostError> {
        Ok(Self {
            routed: Counter::define("kvmesh_requests_routed")?,
            unrouted: Counter::define("kvmesh_requests_unrouted")?,
            passthrough: Counter::define("kvmesh_requests_passthrough")?,
            rejected_invalid: Counter::define("kvmesh_requests_rejected_invalid")?,
            rejected_too_large: Counter::define("kvmesh_requests_rejected_too_large")?,
            rejected_unknown_model: Counter::define("kvmesh_requests_rejected_unknown_model")?,
            forged_headers_removed: Counter::define("kvmesh_forged_headers_removed")?,
            host_errors: Counter::define("kvmesh_host_call_errors")?,
        })
    }
}
