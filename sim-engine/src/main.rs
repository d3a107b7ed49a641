//! sim-engine: a simulated GPU inference worker that speaks vLLM's protocols
//! (OpenAI API, ZMQ KV events with replay, Prometheus metrics, ORCA load
//! headers) with a paged prefix-caching KV cache, continuous batching and a
//! roofline timing model. See README.md and docs/sim-engine.md.

mod api;
mod config;
mod determinism;
mod engine;
mod engine_hash;
mod faults;
mod kv_cache;
mod kv_events;
mod metrics;
mod scheduler;
mod timing;
mod tokenizer;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Parser;
use router_core::{BlockHasher, HashSeed};

use crate::api::kv_transfer::{TransferSettings, Transfers};
use crate::api::{AppState, ServedModel};
use crate::config::Config;
use crate::engine::Engine;
use crate::engine_hash::EngineHasher;
use crate::faults::Faults;
use crate::kv_cache::KvCache;
use crate::kv_events::publisher::{self, PublisherSettings};
use crate::metrics::EngineMetrics;
use crate::scheduler::{Scheduler, SchedulerLimits};
use crate::tokenizer::TextCodec;
use chat_template::ChatTemplate;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let config = Config::parse();
    config.validate()?;

    let codec = TextCodec::load(config.tokenizer.as_deref())?;
    let template = match &config.tokenizer {
        Some(path) => ChatTemplate::for_tokenizer(path)?,
        None => ChatTemplate::fallback()?,
    };
    let block_size = config.block_size;
    let kvmesh_hasher = BlockHasher::new(block_size, HashSeed::for_model(&config.model, None));
    let cache = KvCache::new(
        config.num_gpu_blocks,
        EngineHasher::new(&config.engine_hash_seed),
        kvmesh_hasher,
    );
    let scheduler = Scheduler::new(
        cache,
        SchedulerLimits {
            max_num_seqs: config.max_num_seqs,
            max_num_batched_tokens: config.max_num_batched_tokens,
        },
    );
    let faults = Arc::new(Faults::new(config.faults.clone()));
    let metrics = Arc::new(EngineMetrics::new(&config.model));
    let events = match &config.kv_events_endpoint {
        Some(endpoint) => Some(
            publisher::start(
                PublisherSettings {
                    endpoint: endpoint.clone(),
                    replay_endpoint: config.kv_events_replay_endpoint.clone(),
                    topic: config.kv_events_topic.clone(),
                    format: config.kv_events_format,
                    block_size: block_size.get(),
                    replay_capacity: config.kv_events_replay_buffer,
                },
                Arc::clone(&faults),
            )
            .await?,
        ),
        None => None,
    };
    let engine = Arc::new(Engine::new(
        scheduler,
        config.timing.clone(),
        config.speedup,
        Arc::clone(&metrics),
        events,
    ));
    tokio::spawn(Arc::clone(&engine).run());

    let started_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let address = format!("{}:{}", config.host, config.port);
    let listener = http_listen::bind(&address).await?;
    let local =
        axum::serve::Listener::local_addr(&listener).context("reading the bound address")?;
    let transfers = Transfers::new(TransferSettings {
        host: config
            .advertise_host
            .clone()
            .unwrap_or_else(|| local.ip().to_string()),
        port: local.port(),
        hold: Duration::from_secs_f64(config.kv_transfer_timeout_secs),
        bytes_per_block: config.kv_bytes_per_block,
        gbytes_per_second: config.kv_transfer_gbytes_per_second,
        speedup: config.speedup,
    });
    let state = AppState::new(
        ServedModel {
            name: config.model.clone(),
            max_model_len: config.max_model_len,
            default_max_tokens: config.default_max_tokens,
            block_size: block_size.as_usize(),
            num_gpu_blocks: config.num_gpu_blocks,
            role: config.role,
        },
        &config.worker_id,
        codec,
        template,
        engine,
        metrics,
        faults,
        transfers,
        started_unix,
    )?;
    tracing::info!(
        %address,
        model = %config.model,
        worker_id = %config.worker_id,
        blocks = config.num_gpu_blocks,
        block_size = block_size.get(),
        speedup = config.speedup,
        "sim-engine listening"
    );
    let state = Arc::new(state);
    if let Some(port) = config.disaggregation_bootstrap_port {
        let address = format!("{}:{port}", config.host);
        let bootstrap = http_listen::bind(&address)
            .await
            .context("binding the bootstrap port")?;
        let local = axum::serve::Listener::local_addr(&bootstrap)
            .context("reading the bootstrap address")?;
        tracing::info!(address = %local, "SGLang-style bootstrap server listening");
        let router = api::bootstrap_router(Arc::clone(&state));
        tokio::spawn(async move {
            if let Err(error) = axum::serve(bootstrap, router).await {
                tracing::error!(%error, "bootstrap server failed");
            }
        });
    }
    axum::serve(listener, api::router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving HTTP")
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for SIGTERM");
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
    tracing::info!("shutting down");
}
