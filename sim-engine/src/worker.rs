//! One simulated worker: its KV cache, scheduler and engine loop, metrics,
//! fault settings, KV event sockets and HTTP listener, built from the
//! process's flags and the worker's [`WorkerSlot`]. Workers hosted by one
//! process share nothing else but the loaded tokenizer and chat template.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use chat_template::ChatTemplate;
use router_core::{BlockHasher, HashSeed};
use tracing::Instrument;

use crate::api::kv_transfer::{TransferSettings, Transfers};
use crate::api::{self, AppState, ServedModel};
use crate::config::Config;
use crate::engine::Engine;
use crate::engine_hash::EngineHasher;
use crate::faults::Faults;
use crate::hosting::WorkerSlot;
use crate::kv_cache::KvCache;
use crate::kv_events::publisher::{self, PublisherSettings};
use crate::metrics::EngineMetrics;
use crate::scheduler::{Scheduler, SchedulerLimits};
use crate::tokenizer::TextCodec;

/// Loaded once per process: a tokenizer can take tens of MB.
pub struct SharedAssets {
    codec: Arc<TextCodec>,
    template: Arc<ChatTemplate>,
    started_unix: u64,
}

impl SharedAssets {
    pub fn load(config: &Config) -> anyhow::Result<Self> {
        let codec = TextCodec::load(config.tokenizer.as_deref())?;
        let template = match &config.tokenizer {
            Some(path) => ChatTemplate::for_tokenizer(path)?,
            None => ChatTemplate::fallback()?,
        };
        let started_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Ok(Self {
            codec: Arc::new(codec),
            template: Arc::new(template),
            started_unix,
        })
    }
}

/// Binds the worker's sockets and starts its engine loop; returns its HTTP
/// server, which runs until `stop` completes.
pub async fn start(
    config: &Config,
    assets: &SharedAssets,
    slot: WorkerSlot,
    stop: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<impl Future<Output = anyhow::Result<()>> + Send + 'static> {
    let span = tracing::info_span!("worker", id = %slot.worker_id);
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
    let events = match &slot.kv_events_endpoint {
        Some(endpoint) => Some(
            publisher::start(
                PublisherSettings {
                    endpoint: endpoint.clone(),
                    replay_endpoint: slot.kv_events_replay_endpoint.clone(),
                    topic: config.kv_events_topic.clone(),
                    format: config.kv_events_format,
                    block_size: block_size.get(),
                    replay_capacity: config.kv_events_replay_buffer,
                },
                Arc::clone(&faults),
            )
            .instrument(span.clone())
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
    tokio::spawn(Arc::clone(&engine).run().instrument(span.clone()));

    let address = format!("{}:{}", config.host, slot.port);
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
    let state = Arc::new(AppState::new(
        ServedModel {
            name: config.model.clone(),
            max_model_len: config.max_model_len,
            default_max_tokens: config.default_max_tokens,
            block_size: block_size.as_usize(),
            num_gpu_blocks: config.num_gpu_blocks,
            role: config.role,
        },
        &slot.worker_id,
        Arc::clone(&assets.codec),
        Arc::clone(&assets.template),
        engine,
        metrics,
        faults,
        transfers,
        assets.started_unix,
    )?);
    span.in_scope(|| {
        tracing::info!(
            address = %local,
            model = %config.model,
            blocks = config.num_gpu_blocks,
            block_size = block_size.get(),
            speedup = config.speedup,
            "sim-engine listening"
        )
    });
    if let Some(port) = slot.bootstrap_port {
        serve_bootstrap(&config.host, port, Arc::clone(&state))
            .instrument(span.clone())
            .await?;
    }
    Ok(async move {
        axum::serve(listener, api::router(state))
            .with_graceful_shutdown(stop)
            .await
            .context("serving HTTP")
    }
    .instrument(span))
}

/// Binds the SGLang-style rendezvous server of a prefill engine and serves
/// it in the background.
async fn serve_bootstrap(host: &str, port: u16, state: Arc<AppState>) -> anyhow::Result<()> {
    let address = format!("{host}:{port}");
    let bootstrap = http_listen::bind(&address)
        .await
        .context("binding the bootstrap port")?;
    let local =
        axum::serve::Listener::local_addr(&bootstrap).context("reading the bootstrap address")?;
    tracing::info!(address = %local, "SGLang-style bootstrap server listening");
    let router = api::bootstrap_router(state);
    tokio::spawn(
        async move {
            if let Err(error) = axum::serve(bootstrap, router).await {
                tracing::error!(%error, "bootstrap server failed");
            }
        }
        .in_current_span(),
    );
    Ok(())
}
