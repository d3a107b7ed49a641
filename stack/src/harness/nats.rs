//! A real nats-server on free loopback ports.

use std::process::Command;
use std::time::Duration;

use crate::harness::{free_port, paths, readiness, ManagedProcess};

pub struct NatsServer {
    process: ManagedProcess,
    port: u16,
    monitor_port: u16,
    /// This node's cluster port and its peers', when it is one of a cluster.
    cluster: Option<ClusterPorts>,
}

#[derive(Debug, Clone)]
struct ClusterPorts {
    own: u16,
    routes: Vec<u16>,
}

impl NatsServer {
    /// Starts nats-server with JetStream off and waits for its health endpoint.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_node(None)
    }

    fn start_node(cluster: Option<ClusterPorts>) -> anyhow::Result<Self> {
        let (port, monitor_port) = (free_port(), free_port());
        let process = Self::spawn(port, monitor_port, cluster.as_ref())?;
        Ok(Self {
            process,
            port,
            monitor_port,
            cluster,
        })
    }

    fn spawn(
        port: u16,
        monitor_port: u16,
        cluster: Option<&ClusterPorts>,
    ) -> anyhow::Result<ManagedProcess> {
        let mut command = Command::new(paths::nats_server_binary()?);
        command.args([
            "--addr",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--http_port",
            &monitor_port.to_string(),
        ]);
        if let Some(cluster) = cluster {
            let routes: Vec<String> = cluster
                .routes
                .iter()
                .map(|port| format!("nats://127.0.0.1:{port}"))
                .collect();
            command.args([
                "--cluster_name",
                "kvmesh",
                "--cluster",
                &format!("nats://127.0.0.1:{}", cluster.own),
                "--routes",
                &routes.join(","),
            ]);
        }
        let mut process = ManagedProcess::spawn("nats-server", command)?;
        let health = format!("http://127.0.0.1:{monitor_port}/healthz");
        readiness::wait_http_ok(&mut process, &health, Duration::from_secs(15))?;
        Ok(process)
    }

    /// Kills the server (as a crash would) and starts a new one on the same
    /// ports; clients reconnect on their own.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.process.kill();
        self.process = Self::spawn(self.port, self.monitor_port, self.cluster.as_ref())?;
        Ok(())
    }

    /// Routes to other cluster nodes this node has now (`/routez`).
    pub fn routes(&self) -> anyhow::Result<u64> {
        let routez: serde_json::Value =
            reqwest::blocking::get(format!("{}/routez", self.monitor_url()))?.json()?;
        Ok(routez["num_routes"].as_u64().unwrap_or(0))
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

/// A NATS cluster of nodes on free loopback ports, fully meshed.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `size` nodes and waits until every node routes to every other.
    pub fn start(size: usize) -> anyhow::Result<Self> {
        let cluster_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let nodes = cluster_ports
            .iter()
            .map(|&own| {
                let routes = cluster_ports
                    .iter()
                    .copied()
                    .filter(|&p| p != own)
                    .collect();
                NatsServer::start_node(Some(ClusterPorts { own, routes }))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let cluster = Self { nodes };
        cluster.wait_meshed(Duration::from_secs(20))?;
        Ok(cluster)
    }

    /// Waits until every node has a route to every other.
    pub fn wait_meshed(&self, timeout: Duration) -> anyhow::Result<()> {
        let peers = self.nodes.len().saturating_sub(1) as u64;
        let deadline = std::time::Instant::now() + timeout;
        while !self
            .nodes
            .iter()
            .all(|n| n.routes().is_ok_and(|r| r >= peers))
        {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the NATS cluster did not mesh in {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Every node's client URL, comma-separated, as relays and sidecars take it.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}
