//! One gateway as deployed: Envoy with the kvmesh filter and its own
//! `kv-sidecar serve`. Gateways on the same NATS share their routing
//! decisions through their sidecars (`<prefix>.decisions.<model>`), so each
//! sees the load the others put on the workers.

use std::time::{Duration, Instant};

use anyhow::Context;
use kv_sidecar::serve::config::ModelConfig;

use crate::harness::sidecar::Sidecar;
use crate::harness::{Envoy, GatewayConfig, ModelRoute};

/// How long a sidecar may take to connect to NATS and load its state, and
/// the filters to receive it.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Gateway {
    pub envoy: Envoy,
    pub sidecar: Sidecar,
}

impl Gateway {
    /// Starts a sidecar for `models` on `nats_url`, waits until it is ready,
    /// then Envoy routing `routes` with the sidecar's fleet state; `configure`
    /// adjusts Envoy's configuration (policy, threads) before it starts.
    pub fn start(
        nats_url: &str,
        models: &[ModelConfig],
        routes: Vec<ModelRoute>,
        configure: impl FnOnce(&mut GatewayConfig),
    ) -> anyhow::Result<Self> {
        let mut sidecar =
            Sidecar::start_with_specs(nats_url, models, "").context("starting kv-sidecar serve")?;
        sidecar
            .wait_ready(READY_TIMEOUT)
            .context("waiting for kv-sidecar serve to be ready")?;
        let mut config = GatewayConfig::new(routes)?;
        config.sidecar = Some(sidecar.endpoints());
        configure(&mut config);
        let envoy = Envoy::start(config).context("starting Envoy")?;
        Ok(Self { envoy, sidecar })
    }

    /// Returns once the sidecar knows `workers` workers and every filter VM
    /// has applied fleet state: before that the gateway would route blind.
    /// At once when the filter does not use the sidecar (plain Envoy,
    /// approximate routing).
    pub fn wait_for_fleet_state(&self, workers: usize) -> anyhow::Result<()> {
        wait_for_fleet_state(&self.envoy, &self.sidecar, workers)
    }
}

/// [`Gateway::wait_for_fleet_state`] for an Envoy and the sidecar it reads.
pub fn wait_for_fleet_state(
    envoy: &Envoy,
    sidecar: &Sidecar,
    workers: usize,
) -> anyhow::Result<()> {
    let config = envoy.config();
    if !(config.filter && config.sidecar.is_some()) {
        return Ok(());
    }
    let vms = config.filter_vms();
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let known = sidecar.known_workers().unwrap_or(0);
        // Each VM counts itself once it holds a snapshot (Envoy sums the
        // VMs' update counters instead: one VM's deltas could fill those
        // while another still waits for its snapshot).
        let synced = envoy
            .stat("wasmcustom.kvmesh_state_synced_vms")
            .unwrap_or(0);
        if known >= workers && synced >= vms {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "fleet state not ready after {READY_TIMEOUT:?}: sidecar knows {known}/{workers} workers, {synced}/{vms} filter VMs hold fleet state"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
