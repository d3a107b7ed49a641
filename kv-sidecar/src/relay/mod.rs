//! `kv-sidecar relay`: engine KV events and load → normalized, sequenced
//! NATS messages (docs/relay.md#input-formats-srcdecode, docs/relay.md#output-router-coresrcprotocol). One relay runs beside each engine.
//!
//! Tasks: an engine source (ZMQ or TensorRT-LLM HTTP) feeds the pipeline,
//! which owns the view and numbers events into a bounded outbox drained by
//! the NATS publisher; heartbeat, load reporter, sync responder and the HTTP
//! endpoints run beside them.

pub mod args;
mod backoff;
pub mod data_parallel;
mod engine_trtllm;
mod engine_zmq;
mod http;
pub mod load;
pub mod metrics;
pub mod nats;
pub mod pipeline;

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use kvmesh_config::EngineKind;
use prometheus_client::registry::Registry;
use router_core::protocol::subjects;
use tokio::sync::{mpsc, Notify};

use crate::decode::vllm::Dialect;
use crate::normalize::{MediaPolicy, Normalizer};
use args::RelayArgs;
use data_parallel::RankSeries;
use kvmesh_config::data_parallel::{offset_endpoint, ranks_collide};
use metrics::RelayMetrics;
use pipeline::Pipeline;

/// Engine batches waiting for the pipeline. The ZMQ source waits when this is
/// full; ZMQ then drops at its own high-water mark and the gap is replayed.
pub const SOURCE_QUEUE: usize = 1024;
/// NATS messages waiting for the publisher; overflow is dropped and counted,
/// then repaired with a snapshot.
pub const OUTBOX_QUEUE: usize = 4096;

pub async fn run(args: RelayArgs) -> anyhow::Result<()> {
    let block_size = args.block_size;
    let prefix = args.subject_prefix.trim_end_matches('.').to_owned();
    anyhow::ensure!(!prefix.is_empty(), "--subject-prefix must not be empty");
    let rank_series = args
        .data_parallel_rank
        .map(|rank| RankSeries::new(args.engine, rank))
        .transpose()?;
    let epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ u64::from(std::process::id());

    let mut registry = Registry::default();
    let metrics = RelayMetrics::new(&mut registry);
    let (control_tx, control_rx) = mpsc::channel(16);
    let registration = Arc::new(Notify::new());
    let client = nats::connect(
        &args,
        metrics.clone(),
        control_tx.clone(),
        registration.clone(),
    )
    .await?;

    let (outbox_tx, outbox_rx) = mpsc::channel(OUTBOX_QUEUE);
    let (source_tx, source_rx) = mpsc::channel(SOURCE_QUEUE);
    let last_seq = Arc::new(AtomicU64::new(0));
    let engine_unreachable = Arc::new(AtomicBool::new(false));
    let normalizer = Normalizer::new(
        &args.model,
        block_size,
        MediaPolicy::with_extra(args.index_media.clone()),
    );
    let pipeline = Pipeline::new(
        normalizer,
        args.worker_id.clone(),
        args.model.clone(),
        subjects::events(&prefix, &args.model, &args.worker_id),
        epoch,
        outbox_tx,
        metrics.clone(),
        last_seq.clone(),
    );

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(pipeline.run(source_rx, control_rx));
    tasks.spawn(nats::publish_outbox(
        client.clone(),
        outbox_rx,
        metrics.clone(),
    ));
    tasks.spawn(
        nats::Heartbeat {
            client: client.clone(),
            subject: subjects::workers(&prefix, &args.model),
            info: nats::registration(nats::Registration {
                worker_id: &args.worker_id,
                model: &args.model,
                address: &args.address.to_string(),
                role: args.role,
                data_parallel_rank: args.data_parallel_rank,
                engine: args.engine,
                block_size: block_size.get(),
                epoch,
            }),
            last_seq,
            engine_unreachable: engine_unreachable.clone(),
            registration: registration.clone(),
            metrics: metrics.clone(),
        }
        .run(),
    );
    tasks.spawn(nats::serve_sync(
        client.clone(),
        subjects::sync(&prefix, &args.model, &args.worker_id),
        control_tx,
    ));
    if let Some(url) = &args.metrics_url {
        tasks.spawn(
            load::LoadReporter {
                engine: args.engine,
                rank: rank_series,
                url: url.clone(),
                interval: args.load_interval,
                subject: subjects::load(&prefix, &args.model, &args.worker_id),
                worker_id: args.worker_id.clone(),
                model: args.model.clone(),
                client: client.clone(),
                metrics: metrics.clone(),
                engine_unreachable,
                registration,
            }
            .run(),
        );
    }
    match args.engine {
        EngineKind::Vllm | EngineKind::Sglang => {
            let endpoint = args
                .zmq_endpoint
                .as_deref()
                .context("--zmq-endpoint is required for vllm and sglang")?;
            let rank = args.data_parallel_rank.unwrap_or(0);
            if let Some(replay) = args.zmq_replay_endpoint.as_deref() {
                anyhow::ensure!(
                    !ranks_collide(endpoint, replay, rank),
                    "--zmq-endpoint {endpoint} and --zmq-replay-endpoint {replay} are at most {rank} ports apart: \
                     ranks 0..={rank} of the engine bind both ports plus their rank, so one port twice; \
                     configure the engine's two endpoints at least as many ports apart as it has ranks (e.g. 5557 and 5657)"
                );
            }
            let replay_endpoint = args
                .zmq_replay_endpoint
                .as_deref()
                .map(|replay| offset_endpoint(replay, rank))
                .transpose()?;
            tasks.spawn(
                engine_zmq::ZmqSource {
                    endpoint: offset_endpoint(endpoint, rank)?,
                    replay_endpoint,
                    data_parallel_rank: args.data_parallel_rank,
                    topic: args.zmq_topic.clone(),
                    dialect: if args.engine == EngineKind::Sglang {
                        Dialect::Sglang
                    } else {
                        Dialect::Vllm
                    },
                    metrics: metrics.clone(),
                    tx: source_tx,
                }
                .run(),
            );
        }
        EngineKind::Trtllm => {
            let url = args
                .trtllm_url
                .clone()
                .context("--trtllm-url is required for trtllm")?;
            tasks.spawn(
                engine_trtllm::TrtllmSource {
                    url,
                    interval: args.trtllm_poll_interval,
                    block_size: block_size.get(),
                    metrics: metrics.clone(),
                    tx: source_tx,
                }
                .run(),
            );
        }
    }

    tokio::select! {
        served = http::serve(args.listen, registry, metrics) => served,
        _ = tasks.join_next() => anyhow::bail!("a relay task ended unexpectedly"),
        _ = crate::shutdown::signal() => {
            tracing::info!("shutting down");
            // Pending publishes reach the server before the process exits.
            let _ = client.flush().await;
            Ok(())
        }
    }
}
