//! `kv-sidecar serve`: beside each Envoy. Builds every configured model's
//! fleet state from the relays' NATS subjects and streams it into the filter
//! (gRPC `kvmesh.v1.StateStream`); serves tokenization and debugging over HTTP.
//!
//! One job per module: `config` (kvmesh.yaml), `nats` (ingest, sync
//! requests, shared decisions), `registry` (each model's fleet state machine:
//! membership, gaps, expiry, load; pure, time passed in), `state` (the task
//! that feeds the registries and fans their deltas out, and the shared
//! state), `seq` (relay sequence tracking), `inflight` (predicted load),
//! `gateways` (which gateways have a stream open, and which are gone),
//! `feed` (whether NATS delivers),
//! `stream` (gRPC), `http` and `route` (HTTP API), `tokenize_budget` (bytes
//! tokenized at once), `metrics`.

pub mod config;
pub mod feed;
pub mod gateways;
pub mod http;
pub mod inflight;
pub mod metrics;
pub mod nats;
pub mod registry;
pub mod route;
pub mod seq;
pub mod state;
pub mod stream;
pub mod tokenize_budget;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;

use crate::serve::config::Config;
use crate::serve::metrics::ServeMetrics;
use crate::serve::state::{ServeState, StateTask};
use crate::serve::stream::{StateStreamServer, StateStreamService};
use crate::serve::tokenize_budget::TokenizeBudget;
use crate::tokenize::{CacheLimits, ModelTokenizer};

#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// kvmesh.yaml
    #[arg(long, env = "KVMESH_CONFIG")]
    pub config: PathBuf,
}

/// Inputs queued for the state task; relays' NATS messages wait here.
const INPUT_QUEUE: usize = 8192;

pub async fn run(args: ConfigArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    let http_addr = config.http_addr()?;
    let grpc_addr = config.grpc_addr()?;
    let prefix = config.nats.subject_prefix.clone();
    // Names this process among the sidecars sharing decisions; a sidecar
    // skips what carries its own origin. In Kubernetes every pod's sidecar
    // may be PID 1 and pods start together, so the name is random.
    let origin = format!(
        "{}-{:016x}",
        std::process::id(),
        getrandom::u64().context("no randomness to name this sidecar")?
    );

    let mut registry = Registry::default();
    let metrics = ServeMetrics::new(&mut registry);
    let state = Arc::new(ServeState::new(&config, metrics));
    let tokenizers = load_tokenizers(&config).await?;

    let (input_tx, input_rx) = mpsc::channel(INPUT_QUEUE);
    let (sync_tx, sync_rx) = mpsc::channel(256);
    let (share_tx, share_rx) = mpsc::channel(4096);
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(
        StateTask::new(
            state.clone(),
            sync_tx,
            share_tx.clone(),
            Duration::from_millis(config.state.gateway_grace_ms),
        )
        .run(input_rx),
    );

    let client = nats::connect(&config.nats, state.clone(), input_tx.clone()).await?;
    nats::subscribe(&client, &prefix, &origin, state.clone(), input_tx.clone()).await?;
    tasks.spawn(nats::send_sync_requests(
        client.clone(),
        prefix.clone(),
        sync_rx,
    ));
    tasks.spawn(nats::probe_feed(
        client.clone(),
        format!("{prefix}.serve-probe.{origin}"),
        input_tx.clone(),
    ));
    tasks.spawn(nats::share_reports(
        client.clone(),
        prefix,
        origin,
        share_rx,
    ));

    let service = StateStreamService {
        state: state.clone(),
        inputs: input_tx,
        share: share_tx,
        buffer: config.state.subscriber_buffer,
    };
    // A gateway whose node vanished closes no connection: keepalives end
    // its stream within seconds, so its presence (and then its requests)
    // ends too, rather than after TCP's ~15 min of retransmissions.
    let grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .add_service(StateStreamServer::new(service))
        .serve(grpc_addr);
    tracing::info!(%grpc_addr, "state stream listening");

    let app = http::router(http::HttpState {
        state,
        registry: Arc::new(registry),
        tokenizers: Arc::new(tokenizers),
        max_body_bytes: config.tokenize.max_body_bytes,
        tokenize_budget: TokenizeBudget::new(config.tokenize.max_inflight_bytes()),
    });
    let listener = http_listen::bind(http_addr).await?;
    tracing::info!(%http_addr, "HTTP API listening");

    tokio::select! {
        result = grpc => result.context("serving gRPC"),
        result = axum::serve(listener, app) => result.context("serving HTTP"),
        _ = tasks.join_next() => anyhow::bail!("a serve task ended unexpectedly"),
        _ = crate::shutdown::signal() => {
            tracing::info!("shutting down");
            Ok(())
        }
    }
}

/// `kv-sidecar check-config`: OK, or every problem and a non-zero exit.
pub fn check_config(args: &ConfigArgs) -> Result<(), config::ConfigError> {
    Config::load(&args.config).map(|_| ())
}

async fn load_tokenizers(config: &Config) -> anyhow::Result<HashMap<String, Arc<ModelTokenizer>>> {
    let mut tokenizers = HashMap::new();
    for (i, model) in config.models.iter().enumerate() {
        let Some(path) = model.local.tokenizer.clone() else {
            continue;
        };
        let (name, template) = (model.name.clone(), model.local.chat_template.clone());
        let block_size = model.block_size;
        let cache = CacheLimits {
            entries: config.tokenize.cache_entries,
            bytes: config.tokenize.cache_bytes,
        };
        // Loading takes ~0.4 s of CPU per tokenizer.
        let tokenizer = tokio::task::spawn_blocking(move || {
            ModelTokenizer::load(&name, &path, template.as_deref(), block_size, cache)
        })
        .await?
        .with_context(|| format!("models[{i}].tokenizer"))?;
        tokenizers.insert(model.name.clone(), Arc::new(tokenizer));
    }
    Ok(tokenizers)
}
