//! A real nats-server on free loopback ports.

use std::process::Command;
use std::time::Duration;

use crate::harness::{free_port, paths, readiness, ManagedProcess};

pub struct NatsServer {
    process: ManagedProcess,
    port: u16,
    monitor_port: u16,
}

impl NatsServer {
    /// Starts nats-server with JetStream off and waits for its health endpoint.
    pub fn start() -> anyhow::Result<Self> {
        let (port, monitor_port) = (free_port(), free_port());
        let process = Self::spawn(port, monitor_port)?;
        Ok(Self {
            process,
            port,
            monitor_port,
        })
    }

    fn spawn(port: u16, monitor_port: u16) -> anyhow::Result<ManagedProcess> {
        let mut command = Command::new(paths::nats_server_binary()?);
        command.args([
            "--addr",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--http_port",
            &monitor_port.to_string(),
        ]);
        let mut process = ManagedProcess::spawn("nats-server", command)?;
        let health = format!("http://127.0.0.1:{monitor_port}/healthz");
        readiness::wait_http_ok(&mut process, &health, Duration::from_secs(15))?;
        Ok(process)
    }

    /// Kills the server (as a crash would) and starts a new one on the same
    /// ports; clients reconnect on their own.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.process.kill();
        self.process = Self::spawn(self.port, self.monitor_port)?;
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
    }

    pub fn process(&mut self) -> &mut ManagedProcess {
        &mut self.process
    }
}
