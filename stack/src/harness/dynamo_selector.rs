//! NVIDIA Dynamo's KV router as its PyPI package `ai-dynamo` ships it for
//! runtimes that call their engines themselves: `python -m
//! dynamo.select_service`, Dynamo's worker selection (its radix-tree index of
//! the engines' own ZMQ KV events and its load accounting of the requests it
//! booked) behind an HTTP API. The benchmark's client asks it where to send
//! each prompt, as Dynamo's frontend asks its router.

use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;
use serde_json::json;

use crate::harness::stack::EventSource;
use crate::harness::{free_port, paths, readiness, ManagedProcess};

/// Loading the runtime's native module takes a few seconds on a busy machine.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

pub struct DynamoSelector {
    _process: ManagedProcess,
    port: u16,
}

/// `GET /ready`.
#[derive(Debug, Deserialize)]
struct Ready {
    ready: bool,
    schedulable_workers: usize,
}

impl DynamoSelector {
    /// Starts `replicas` selection services, each indexing every engine's
    /// events and sharing the load it books with the others (Dynamo's
    /// replica synchronization), as several frontends' routers run; with
    /// Dynamo's default weight of uncached blocks against load unless
    /// `overlap_score_weight` is given.
    pub fn start_replicas(
        model: &str,
        engines: &[EventSource],
        replicas: usize,
        overlap_score_weight: Option<f64>,
    ) -> anyhow::Result<Vec<Self>> {
        let sync_ports: Vec<u16> = (0..replicas).map(|_| free_port()).collect();
        (0..replicas)
            .map(|i| {
                let sync = if replicas > 1 {
                    let peers: Vec<String> = sync_ports
                        .iter()
                        .enumerate()
                        .filter(|&(j, _)| j != i)
                        .map(|(_, port)| format!("tcp://127.0.0.1:{port}"))
                        .collect();
                    vec![
                        "--replica-sync-port".to_owned(),
                        sync_ports[i].to_string(),
                        "--replica-sync-peers".to_owned(),
                        peers.join(","),
                    ]
                } else {
                    Vec::new()
                };
                let name = format!("dynamo-selector-{i}");
                Self::start(&name, model, engines, &sync, overlap_score_weight)
            })
            .collect()
    }

    /// Starts one service with `extra_args`, registers every engine for
    /// `model` (worker ids are their indexes) and waits until all are
    /// schedulable.
    fn start(
        name: &str,
        model: &str,
        engines: &[EventSource],
        extra_args: &[String],
        overlap_score_weight: Option<f64>,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(!engines.is_empty(), "Dynamo's selector needs a worker");
        let port = free_port();
        let mut command = Command::new(paths::dynamo_python()?);
        command
            .args(["-m", "dynamo.select_service"])
            .args(["--port", &port.to_string()])
            // Its indexer's threads would compete with the fleet for 2 cores.
            .args(["--threads", "1"])
            .args(extra_args);
        if let Some(weight) = overlap_score_weight {
            // Its frontend's `--kv-overlap-score-weight`, which the service
            // reads from the environment.
            command.env("DYN_ROUTER_KV_OVERLAP_SCORE_WEIGHT", weight.to_string());
        }
        let mut process = ManagedProcess::spawn(name, command)?;
        let base = format!("http://127.0.0.1:{port}");
        readiness::wait_http_ok(&mut process, &format!("{base}/health"), READY_TIMEOUT)?;
        let client = reqwest::blocking::Client::new();
        for (id, engine) in engines.iter().enumerate() {
            let worker = json!({
                "worker_id": id,
                "model_name": model,
                "endpoint": engine.url,
                "block_size": engine.block_size,
                "kv_events_endpoints": {"0": engine.events.publish},
                "replay_endpoint": engine.events.replay,
            });
            client
                .post(format!("{base}/workers"))
                .json(&worker)
                .send()
                .and_then(reqwest::blocking::Response::error_for_status)
                .with_context(|| format!("registering {} with Dynamo's selector", engine.url))?;
        }
        let expected = engines.len();
        readiness::wait_json(
            &mut process,
            &format!("{base}/ready"),
            &format!("{expected} schedulable workers"),
            READY_TIMEOUT,
            |r: &Ready| r.ready && r.schedulable_workers == expected,
        )?;
        Ok(Self {
            _process: process,
            port,
        })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}
