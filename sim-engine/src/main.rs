//! sim-engine: a simulated GPU inference worker that speaks vLLM's protocols
//! (OpenAI API, ZMQ KV events with replay, Prometheus metrics, ORCA load
//! headers) with a paged prefix-caching KV cache, continuous batching and a
//! roofline timing model. One process hosts `--workers` independent such
//! workers. See README.md and docs/sim-engine.md.

mod api;
mod config;
mod determinism;
mod engine;
mod engine_hash;
mod faults;
mod hosting;
mod kv_cache;
mod kv_events;
mod metrics;
mod scheduler;
mod timing;
mod tokenizer;
mod worker;

use anyhow::Context;
use clap::Parser;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::worker::SharedAssets;

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
    let slots = hosting::worker_slots(&config)?;
    let assets = SharedAssets::load(&config)?;

    let (stop, stopped) = watch::channel(false);
    let mut servers = JoinSet::new();
    for slot in slots {
        let id = slot.worker_id.clone();
        let mut stopped = stopped.clone();
        let until_stopped = async move {
            // A dropped sender stops the servers too.
            let _ = stopped.wait_for(|stop| *stop).await;
        };
        let server = worker::start(&config, &assets, slot, until_stopped)
            .await
            .with_context(|| format!("starting worker {id}"))?;
        servers.spawn(server);
    }
    // A server that ends before the signal failed: the process exits with
    // its error rather than serve on with a worker missing.
    let failed = tokio::select! {
        () = shutdown_signal() => None,
        Some(ended) = servers.join_next() => Some(ended),
    };
    let _ = stop.send(true);
    if let Some(ended) = failed {
        ended.context("a worker's HTTP server panicked")??;
        anyhow::bail!("a worker's HTTP server stopped");
    }
    while let Some(ended) = servers.join_next().await {
        ended.context("a worker's HTTP server panicked")??;
    }
    Ok(())
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
