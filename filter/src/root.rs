//! Per-VM root context: validates the plugin configuration, keeps the fleet
//! state stream from the sidecar open (reconnecting with backoff), and creates
//! one stream context per HTTP request.

use std::cell::RefCell;
use std::rc::Rc;

use prost::Message;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType};
use router_core::state_stream::{state_update, StateUpdate};

use crate::config::PluginConfig;
use crate::host::{self, EnvoyHost, Host};
use crate::metrics::{linear_memory_bytes, FilterMetrics, VmCount};
use crate::replica::FleetReplica;
use crate::stream::InferenceStream;
use crate::vm_state::{SharedVmState, VmState};

/// Upper bound on the plugin configuration read from the host.
const MAX_CONFIG_BYTES: usize = 4 * 1024 * 1024;
const TICK_MS: u32 = 250;
const RECONNECT_MIN_MS: u64 = 250;
const RECONNECT_MAX_MS: u64 = 5_000;
const STATE_SERVICE: &str = "kvmesh.v1.StateStream";
const STATE_METHOD: &str = "Subscribe";

enum Subscription {
    Closed { retry_at_ms: u64, backoff_ms: u64 },
    Open { token: u32, backoff_ms: u64 },
}

pub struct KvmeshRoot {
    context_id: u32,
    config: Option<Rc<PluginConfig>>,
    metrics: Option<FilterMetrics>,
    state: Option<SharedVmState>,
    subscription: Subscription,
    /// This VM's linear memory as last added to `kvmesh_vm_memory_bytes`.
    reported_memory_bytes: u64,
    /// This VM's share of `kvmesh_state_synced_vms`.
    synced: Option<VmCount>,
}

impl KvmeshRoot {
    pub fn new(context_id: u32) -> Self {
        Self {
            context_id,
            config: None,
            metrics: None,
            state: None,
            subscription: Subscription::Closed {
                retry_at_ms: 0,
                backoff_ms: RECONNECT_MIN_MS,
            },
            reported_memory_bytes: 0,
            synced: None,
        }
    }

    /// Counts this VM in `kvmesh_state_synced_vms` or takes it out.
    fn set_synced(&mut self, synced: bool) {
        if let Some(count) = &mut self.synced {
            count.set(&EnvoyHost, synced);
        }
    }

    /// Adds this VM's memory growth since the last report to the shared
    /// gauge (memory only grows, so the gauge stays the sum over the VMs
    /// that report: those fed by a state stream, whose replica it measures).
    fn report_memory(&mut self) {
        let Some(metrics) = self.metrics else {
            return;
        };
        let bytes = linear_memory_bytes();
        if bytes > self.reported_memory_bytes {
            metrics
                .vm_memory_bytes
                .add(&EnvoyHost, bytes - self.reported_memory_bytes);
            self.reported_memory_bytes = bytes;
        }
    }

    fn now_ms(&self) -> u64 {
        EnvoyHost.now_ms().unwrap_or(0)
    }

    fn open_stream(&mut self, now_ms: u64, backoff_ms: u64) {
        let (Some(config), Some(metrics)) = (&self.config, self.metrics) else {
            return;
        };
        let Some(sidecar) = &config.sidecar else {
            return;
        };
        match host::open_grpc_stream(&sidecar.cluster, STATE_SERVICE, STATE_METHOD) {
            Ok(token) => {
                metrics.state_stream_opened.inc(&EnvoyHost);
                self.subscription = Subscription::Open { token, backoff_ms };
                if let Some(state) = &self.state {
                    state.borrow_mut().reporter.attach(&EnvoyHost, token);
                }
            }
            Err(err) => {
                log::warn!(
                    "cannot open the state stream to cluster {}: {err}",
                    sidecar.cluster
                );
                self.retry_later(now_ms, backoff_ms);
            }
        }
    }

    fn retry_later(&mut self, now_ms: u64, backoff_ms: u64) {
        self.set_synced(false);
        if let Some(state) = &self.state {
            state.borrow_mut().reporter.detach();
        }
        self.subscription = Subscription::Closed {
            retry_at_ms: now_ms + backoff_ms,
            backoff_ms: (backoff_ms * 2).min(RECONNECT_MAX_MS),
        };
    }

    /// Applies one state update; on failure the stream is dropped so the next
    /// one starts with a fresh snapshot.
    fn receive(&mut self, token: u32, size: usize) {
        let (Some(metrics), Some(state), Some(config)) = (self.metrics, &self.state, &self.config)
        else {
            return;
        };
        let started_ns = EnvoyHost.now_ns().unwrap_or(0);
        let now = started_ns / 1_000_000;
        let mut snapshot = false;
        let applied = EnvoyHost
            .buffer(BufferType::GrpcReceiveBuffer, 0, size)
            .map_err(|err| err.to_string())
            .and_then(|bytes| StateUpdate::decode(bytes.as_slice()).map_err(|err| err.to_string()))
            .and_then(|update| {
                snapshot = matches!(update.kind, Some(state_update::Kind::Snapshot(_)));
                let mut state = state.borrow_mut();
                let VmState {
                    replica, router, ..
                } = &mut *state;
                let replica = replica.as_mut().ok_or("no replica configured")?;
                replica
                    .apply(&update, now, &mut router.computing)
                    .map_err(|err| err.to_string())
            });
        let elapsed_us = EnvoyHost
            .now_ns()
            .unwrap_or(started_ns)
            .saturating_sub(started_ns)
            / 1_000;
        let histogram = if snapshot {
            metrics.state_snapshot_us
        } else {
            metrics.state_delta_us
        };
        histogram.record(&EnvoyHost, elapsed_us);
        match applied {
            Ok(applied) => {
                let models = config.models().map(|model| model.name.as_str());
                let resyncs = state
                    .borrow_mut()
                    .reporter
                    .connected(&EnvoyHost, models, now);
                metrics.reports_sent.add(&EnvoyHost, resyncs as u64);
                if let Some(applied) = applied {
                    metrics.state_updates_applied.inc(&EnvoyHost);
                    if applied.shared_prompts > 0 {
                        metrics
                            .computing_shared
                            .add(&EnvoyHost, applied.shared_prompts);
                    }
                    // A stream starts with snapshots, so any update applied
                    // on it means this VM holds fleet state: current unless
                    // the sidecar lost its own feed of the fleet.
                    let heard = state
                        .borrow()
                        .replica
                        .as_ref()
                        .is_some_and(FleetReplica::fleet_heard);
                    self.set_synced(heard);
                } else {
                    metrics.state_updates_skipped.inc(&EnvoyHost);
                }
                if let Subscription::Open { backoff_ms, .. } = &mut self.subscription {
                    *backoff_ms = RECONNECT_MIN_MS;
                }
            }
            Err(err) => {
                metrics.state_update_errors.inc(&EnvoyHost);
                log::warn!("dropping the state stream after a bad update: {err}");
                if let Err(err) = host::cancel_grpc_stream(token) {
                    log::debug!("cancelling the state stream: {err}");
                }
                self.retry_later(now, RECONNECT_MIN_MS);
            }
        }
    }
}

impl Context for KvmeshRoot {
    /// Envoy tears this VM down (its configuration changed or was removed):
    /// its shares of the gauges every VM adds to go with it, or they would
    /// count a VM that no longer exists.
    fn on_done(&mut self) -> bool {
        self.set_synced(false);
        if let Some(metrics) = self.metrics {
            metrics
                .vm_memory_bytes
                .subtract(&EnvoyHost, self.reported_memory_bytes);
            self.reported_memory_bytes = 0;
        }
        true
    }

    fn on_grpc_stream_message(&mut self, token_id: u32, message_size: usize) {
        match self.subscription {
            Subscription::Open { token, .. } if token == token_id => {
                self.receive(token, message_size)
            }
            _ => {}
        }
    }

    fn on_grpc_stream_close(&mut self, token_id: u32, status_code: u32) {
        let Subscription::Open { token, backoff_ms } = self.subscription else {
            return;
        };
        if token != token_id {
            return;
        }
        if let Some(metrics) = self.metrics {
            metrics.state_stream_closed.inc(&EnvoyHost);
        }
        log::info!(
            "state stream closed (grpc status {status_code}); reconnecting in {backoff_ms} ms"
        );
        let now = self.now_ms();
        self.retry_later(now, backoff_ms);
    }
}

impl RootContext for KvmeshRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = match EnvoyHost.buffer(BufferType::PluginConfiguration, 0, MAX_CONFIG_BYTES) {
            Ok(bytes) => bytes,
            Err(err) => {
                log::error!("cannot read the plugin configuration: {err}");
                return false;
            }
        };
        let config = match PluginConfig::parse(&bytes) {
            Ok(config) => config,
            Err(err) => {
                log::error!("invalid plugin configuration: {err}");
                return false;
            }
        };
        let metrics = match FilterMetrics::define(&EnvoyHost) {
            Ok(metrics) => metrics,
            Err(err) => {
                log::error!("cannot define metrics: {err}");
                return false;
            }
        };
        metrics.vm_starts.inc(&EnvoyHost);
        let replica = config
            .sidecar
            .as_ref()
            .map(|sidecar| FleetReplica::new(&config, sidecar));
        if replica.is_some() {
            if let Err(err) = host::set_tick_period_ms(TICK_MS) {
                log::error!("cannot start the state stream timer: {err}");
                return false;
            }
        }
        let seed = vm_seed(self.now_ms(), self.context_id);
        log::info!(
            "configured: {} model(s), body limit {} bytes, fleet state from {}",
            config.models().count(),
            config.max_body_bytes,
            config
                .sidecar
                .as_ref()
                .map_or("nowhere (approximate routing)", |s| s.cluster.as_str())
        );
        self.state = Some(Rc::new(RefCell::new(VmState::new(
            replica,
            config.approximate,
            seed,
        ))));
        self.config = Some(Rc::new(config));
        self.synced = Some(VmCount::new(metrics.state_synced_vms));
        self.metrics = Some(metrics);
        true
    }

    fn on_tick(&mut self) {
        if let Subscription::Open { .. } = self.subscription {
            self.report_memory();
            let now = self.now_ms();
            let stale = self
                .state
                .as_ref()
                .is_some_and(|state| state.borrow().replica_is_stale(now));
            if stale {
                self.set_synced(false);
            }
        }
        if let Subscription::Closed {
            retry_at_ms,
            backoff_ms,
        } = self.subscription
        {
            let now = self.now_ms();
            if now >= retry_at_ms {
                self.open_stream(now, backoff_ms);
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Envoy only creates streams after a successful on_configure; if it
        // ever does otherwise, no context means the request passes untouched.
        let config = self.config.clone()?;
        let metrics = self.metrics?;
        let state = self.state.clone()?;
        Some(Box::new(InferenceStream::new(
            EnvoyHost, config, metrics, state,
        )))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Seeds this VM's request ids (`envoy-vm-<seed>-<n>`, the key of its
/// decisions in every sidecar's in-flight ledger) and its tie-breaking.
/// Envoy configures its VMs, one per worker thread and all with the same
/// root context id, in the same millisecond: seeded from the clock, VMs
/// shared one seed, their requests' ids collided, and a sidecar took one
/// VM's decision for a replacement of another's, losing its load.
fn vm_seed(now_ms: u64, context_id: u32) -> u64 {
    getrandom::u64().unwrap_or_else(|err| {
        log::warn!("no randomness from the host ({err}): seeding from the clock");
        now_ms ^ (u64::from(context_id) << 32)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vms_configured_together_get_their_own_seeds() {
        let seeds: std::collections::HashSet<u64> = (0..8).map(|_| vm_seed(1_000, 1)).collect();
        assert_eq!(seeds.len(), 8);
    }
}
