//! SGLang's router — the SGLang Model Gateway, as its PyPI package
//! `sglang-router` ships it — in front of a fleet, so the benchmark compares
//! kvmesh with a router people run today rather than with a rewrite of one.

use std::process::Command;
use std::time::Duration;

use serde::Deserialize;

use crate::harness::{free_port, paths, readiness, ManagedProcess};

/// The gateway starts in about a second; its worker health checks follow.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// One gateway process routing to `workers`.
pub struct SglangRouter {
    _process: ManagedProcess,
    port: u16,
}

/// `GET /readiness`: ready once every worker passed its health check.
#[derive(Debug, Deserialize)]
struct Readiness {
    healthy_workers: usize,
    total_workers: usize,
}

impl SglangRouter {
    /// Starts the gateway with `policy` (`cache_aware`, `round_robin`, …)
    /// over the workers' base URLs and waits until it counts every one
    /// healthy.
    pub fn start(name: &str, workers: &[String], policy: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(!workers.is_empty(), "SGLang's router needs a worker");
        let port = free_port();
        let mut command = Command::new(paths::sglang_router_binary()?);
        command
            .arg("launch")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .arg("--worker-urls")
            .args(workers)
            .args(["--policy", policy])
            // Its own Prometheus listener defaults to a fixed port.
            .args(["--prometheus-port", &free_port().to_string()])
            .args(["--prometheus-host", "127.0.0.1"])
            .args(["--log-level", "warn"]);
        let mut process = ManagedProcess::spawn(name, command)?;
        let expected = workers.len();
        readiness::wait_json(
            &mut process,
            &format!("http://127.0.0.1:{port}/readiness"),
            &format!("{expected} healthy workers"),
            READY_TIMEOUT,
            |r: &Readiness| r.total_workers == expected && r.healthy_workers == expected,
        )?;
        Ok(Self {
            _process: process,
            port,
        })
    }

    /// Base URL clients send OpenAI requests to.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}
