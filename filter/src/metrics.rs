//! The filter's Envoy counters, histograms and gauge (visible in `/stats/prometheus`, summed over
//! every worker VM).

use std::collections::HashMap;

use proxy_wasm::types::MetricType;

use crate::host::{Host, HostError};

/// One Envoy counter owned by this VM.
#[derive(Debug, Clone, Copy)]
pub struct Counter(u32);

impl Counter {
    fn define(host: &impl Host, name: &str) -> Result<Self, HostError> {
        host.define_metric(MetricType::Counter, name).map(Self)
    }

    /// Counting is best effort: a failed increment must never fail a request.
    pub fn inc(self, host: &impl Host) {
        self.add(host, 1);
    }

    pub fn add(self, host: &impl Host, value: u64) {
        increment(host, self.0, saturating_i64(value));
    }
}

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Counting is best effort: a failed increment must never fail a request.
/// Returns whether the host took it.
fn increment(host: &impl Host, metric: u32, offset: i64) -> bool {
    match host.increment_metric(metric, offset) {
        Ok(()) => true,
        Err(err) => {
            log::debug!("{err}");
            false
        }
    }
}

/// Requests routed to each worker (`kvmesh_routed_to_<ip>_<port>`), defined
/// as workers are first chosen.
#[derive(Debug, Default)]
pub struct WorkerCounters {
    by_address: HashMap<String, Counter>,
}

/// Distinct workers counted before new ones are no longer (a bound on
/// Envoy's stats memory under worker churn).
const MAX_WORKER_COUNTERS: usize = 1024;

impl WorkerCounters {
    pub fn routed_to(&mut self, host: &impl Host, address: &str) {
        if let Some(counter) = self.by_address.get(address) {
            counter.inc(host);
            return;
        }
        if self.by_address.len() >= MAX_WORKER_COUNTERS {
            return;
        }
        let name: String = address
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        match Counter::define(host, &format!("kvmesh_routed_to_{name}")) {
            Ok(counter) => {
                counter.inc(host);
                self.by_address.insert(address.to_owned(), counter);
            }
            Err(err) => log::debug!("{err}"),
        }
    }
}

/// One Envoy histogram owned by this VM (Envoy computes the quantiles).
#[derive(Debug, Clone, Copy)]
pub struct Histogram(u32);

impl Histogram {
    fn define(host: &impl Host, name: &str) -> Result<Self, HostError> {
        host.define_metric(MetricType::Histogram, name).map(Self)
    }

    pub fn record(self, host: &impl Host, value: u64) {
        if let Err(err) = host.record_metric(self.0, value) {
            log::debug!("{err}");
        }
    }
}

/// One Envoy gauge shared by every VM: each adds its own share, so the
/// gauge holds their sum.
#[derive(Debug, Clone, Copy)]
pub struct Gauge(u32);

impl Gauge {
    fn define(host: &impl Host, name: &str) -> Result<Self, HostError> {
        host.define_metric(MetricType::Gauge, name).map(Self)
    }

    pub fn add(self, host: &impl Host, value: u64) {
        increment(host, self.0, saturating_i64(value));
    }

    /// Takes back what this VM added.
    pub fn subtract(self, host: &impl Host, value: u64) {
        increment(host, self.0, -saturating_i64(value));
    }
}

/// This VM's one-unit share of a gauge counting VMs in some condition: it
/// adds 1 on entering the condition and takes it back on leaving, so the
/// gauge holds how many VMs are in it.
#[derive(Debug)]
pub struct VmCount {
    gauge: Gauge,
    counted: bool,
}

impl VmCount {
    pub fn new(gauge: Gauge) -> Self {
        Self {
            gauge,
            counted: false,
        }
    }

    pub fn set(&mut self, host: &impl Host, counted: bool) {
        if counted == self.counted {
            return;
        }
        let offset = if counted { 1 } else { -1 };
        if increment(host, self.gauge.0, offset) {
            self.counted = counted;
        }
    }
}

/// Size of this VM's linear memory: everything the filter allocated (fleet
/// replica, learned table, prompt cache, request buffers) plus its stack and
/// static data, at its high-water mark, since wasm memory never shrinks.
/// Zero outside wasm (unit tests).
pub fn linear_memory_bytes() -> u64 {
    #[cfg(target_arch = "wasm32")]
    {
        const PAGE_BYTES: u64 = 65_536;
        core::arch::wasm32::memory_size(0) as u64 * PAGE_BYTES
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        0
    }
}

/// Every metric the filter maintains.
#[derive(Debug, Clone, Copy)]
pub struct FilterMetrics {
    /// Inference requests routed by KV overlap and load from fleet state.
    pub precise: Counter,
    /// Inference requests routed by the learned prefix table: no fresh fleet
    /// state, or no exact block hashes in time.
    pub approximate: Counter,
    /// Inference requests left to Envoy's fallback balancing (no decision).
    pub fallback: Counter,
    /// Decisions taken while a sidecar is configured but its state is stale.
    pub stale_state: Counter,
    /// Sum over routed requests of prompt blocks already cached on the chosen
    /// worker; divided by `prompt_blocks` it is the predicted hit rate.
    pub cached_blocks: Counter,
    pub prompt_blocks: Counter,
    /// Requests that are not inference calls and pass through untouched.
    pub passthrough: Counter,
    pub rejected_invalid: Counter,
    pub rejected_too_large: Counter,
    pub rejected_unknown_model: Counter,
    /// Client-supplied routing headers removed before routing.
    pub forged_headers_removed: Counter,
    /// Host calls that returned an error status on the request path.
    pub host_errors: Counter,
    pub state_updates_applied: Counter,
    /// State updates for models this gateway does not serve, skipped: the
    /// sidecar serves more models than this gateway's configuration lists.
    pub state_updates_skipped: Counter,
    /// State updates that could not be decoded or applied (the stream is
    /// reopened for a fresh snapshot).
    pub state_update_errors: Counter,
    /// Prompts other routers (this gateway's other VMs, other gateways)
    /// sent to be computed, credited as cached on the worker computing them.
    pub computing_shared: Counter,
    pub state_stream_opened: Counter,
    pub state_stream_closed: Counter,
    /// Text and chat prompts sent to the sidecar for block hashes.
    pub tokenize_calls: Counter,
    /// Tokenizations that failed or timed out (routed by load alone).
    pub tokenize_failures: Counter,
    /// Text and chat prompts whose block hashes this VM had cached (routed
    /// without waiting for the sidecar), and those it had not.
    pub prompt_cache_hits: Counter,
    pub prompt_cache_misses: Counter,
    /// Disaggregated requests whose prefill leg succeeded, and those that
    /// were prefilled by their decode worker after all (leg failed, timed
    /// out or answered without usable handshake parameters).
    pub remote_prefills: Counter,
    pub prefill_failures: Counter,
    /// Requests whose body carried handshake fields only the router may set.
    pub router_fields_removed: Counter,
    /// Decisions and their progress reported to the sidecar.
    pub reports_sent: Counter,
    /// ORCA `endpoint-load-metrics` response headers used, and refused.
    pub orca_reports: Counter,
    pub orca_report_errors: Counter,
    /// Requests Envoy served elsewhere than the filter chose (the chosen
    /// worker refused the connection and the retry went to another host);
    /// the worker is then left out for a while.
    pub upstream_failovers: Counter,
    /// Responses with a 5xx or 429 status from the worker the filter chose;
    /// the worker is then left out for a while.
    pub upstream_errors: Counter,
    /// Filter VMs configured: one per Envoy worker thread (and the main
    /// thread's) at start; any later rise is a VM that failed and was
    /// reloaded.
    pub vm_starts: Counter,
    /// Time to choose a worker, hashing included (µs).
    pub decision_us: Histogram,
    /// Time inside each request-path callback of the filter (µs): how long
    /// the filter holds the Envoy worker thread at a stretch.
    pub callback_us: Histogram,
    /// Time inside each state-stream callback (µs): reading, decoding and
    /// applying one snapshot chunk, or one delta. These hold the Envoy
    /// worker thread too, between requests.
    pub state_snapshot_us: Histogram,
    pub state_delta_us: Histogram,
    /// Linear memory of every filter VM with a state stream together
    /// ([`linear_memory_bytes`], each adding its growth): divided by the
    /// sidecar's stream subscribers (one per VM), one VM's.
    pub vm_memory_bytes: Gauge,
    /// Filter VMs routing with fleet state: their state stream is open, has
    /// delivered a snapshot, and is not stale. Below the VM count (one per
    /// Envoy worker thread), some threads route on load-blind fallbacks.
    pub state_synced_vms: Gauge,
}

impl FilterMetrics {
    pub fn define(host: &impl Host) -> Result<Self, HostError> {
        Ok(Self {
            precise: Counter::define(host, "kvmesh_requests_precise")?,
            approximate: Counter::define(host, "kvmesh_requests_approximate")?,
            fallback: Counter::define(host, "kvmesh_requests_fallback")?,
            stale_state: Counter::define(host, "kvmesh_requests_stale_state")?,
            cached_blocks: Counter::define(host, "kvmesh_routed_cached_blocks")?,
            prompt_blocks: Counter::define(host, "kvmesh_routed_prompt_blocks")?,
            passthrough: Counter::define(host, "kvmesh_requests_passthrough")?,
            rejected_invalid: Counter::define(host, "kvmesh_requests_rejected_invalid")?,
            rejected_too_large: Counter::define(host, "kvmesh_requests_rejected_too_large")?,
            rejected_unknown_model: Counter::define(
                host,
                "kvmesh_requests_rejected_unknown_model",
            )?,
            forged_headers_removed: Counter::define(host, "kvmesh_forged_headers_removed")?,
            host_errors: Counter::define(host, "kvmesh_host_call_errors")?,
            state_updates_applied: Counter::define(host, "kvmesh_state_updates_applied")?,
            state_updates_skipped: Counter::define(host, "kvmesh_state_updates_skipped")?,
            state_update_errors: Counter::define(host, "kvmesh_state_update_errors")?,
            computing_shared: Counter::define(host, "kvmesh_computing_shared")?,
            state_stream_opened: Counter::define(host, "kvmesh_state_stream_opened")?,
            state_stream_closed: Counter::define(host, "kvmesh_state_stream_closed")?,
            tokenize_calls: Counter::define(host, "kvmesh_tokenize_calls")?,
            tokenize_failures: Counter::define(host, "kvmesh_tokenize_failures")?,
            prompt_cache_hits: Counter::define(host, "kvmesh_prompt_cache_hits")?,
            prompt_cache_misses: Counter::define(host, "kvmesh_prompt_cache_misses")?,
            remote_prefills: Counter::define(host, "kvmesh_remote_prefills")?,
            prefill_failures: Counter::define(host, "kvmesh_prefill_failures")?,
            router_fields_removed: Counter::define(host, "kvmesh_router_fields_removed")?,
            reports_sent: Counter::define(host, "kvmesh_gateway_reports_sent")?,
            orca_reports: Counter::define(host, "kvmesh_orca_reports")?,
            orca_report_errors: Counter::define(host, "kvmesh_orca_report_errors")?,
            vm_starts: Counter::define(host, "kvmesh_vm_starts")?,
            upstream_failovers: Counter::define(host, "kvmesh_upstream_failovers")?,
            upstream_errors: Counter::define(host, "kvmesh_upstream_errors")?,
            decision_us: Histogram::define(host, "kvmesh_decision_us")?,
            callback_us: Histogram::define(host, "kvmesh_callback_us")?,
            state_snapshot_us: Histogram::define(host, "kvmesh_state_snapshot_us")?,
            state_delta_us: Histogram::define(host, "kvmesh_state_delta_us")?,
            vm_memory_bytes: Gauge::define(host, "kvmesh_vm_memory_bytes")?,
            state_synced_vms: Gauge::define(host, "kvmesh_state_synced_vms")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::mock::MockHost;

    #[test]
    fn each_vm_counts_once_while_in_the_condition() {
        let host = MockHost::default();
        let gauge = Gauge::define(&host, "vms").unwrap();
        let (mut first, mut second) = (VmCount::new(gauge), VmCount::new(gauge));
        first.set(&host, true);
        first.set(&host, true);
        assert_eq!(host.counter("vms"), 1, "entering twice counts once");
        second.set(&host, true);
        assert_eq!(host.counter("vms"), 2);
        first.set(&host, false);
        first.set(&host, false);
        assert_eq!(host.counter("vms"), 1, "leaving twice takes one back");
        second.set(&host, false);
        assert_eq!(host.counter("vms"), 0);
    }

    #[test]
    fn a_gauge_share_can_be_taken_back() {
        let host = MockHost::default();
        let gauge = Gauge::define(&host, "bytes").unwrap();
        gauge.add(&host, 5);
        gauge.add(&host, 7);
        gauge.subtract(&host, 5);
        assert_eq!(host.counter("bytes"), 7);
    }
}
