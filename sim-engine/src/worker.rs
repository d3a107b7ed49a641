//! One simulated worker: per data-parallel rank its KV cache, scheduler and
//! engine loop, metrics and KV event sockets; its fault settings and HTTP
//! listener, built from the process's flags and the worker's
//! [`WorkerSlot`]. Workers hosted by one process share nothing else but the
//! loaded tokenizer and chat template.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use chat_template::ChatTemplate;
use kvmesh_config::data_parallel::offset_endpoint;
use router_core::{BlockHasher, HashSeed};
use tracing::Instrument;

use crate::api::kv_transfer::{TransferSettings, Transfers};
use crate::api::ranks::{Rank, Ranks};
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
    let faults = Arc::new(Faults::new(config.faults.clone()));
    let mut ranks = Vec::with_capacity(config.data_parallel_size);
    for rank in 0..config.data_parallel_size {
        let span = tracing::info_span!(parent: &span, "rank", rank);
        let engine = start_rank(config, &slot, rank, &faults)
            .instrument(span)
            .await
            .with_context(|| format!("starting data-parallel rank {rank}"))?;
        ranks.push(engine);
    }
    let ranks = Ranks::new(ranks).context("--data-parallel-size must be at least 1")?;

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
        ranks,
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
            data_parallel_size = config.data_parallel_size,
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

/// Starts one data-parallel rank: its cache, scheduler, engine loop and
/// metrics, and its KV event publisher on the worker's endpoints offset by
/// the rank, as vLLM binds them.
async fn start_rank(
    config: &Config,
    slot: &WorkerSlot,
    rank: usize,
    faults: &Arc<Faults>,
) -> anyhow::Result<Rank> {
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
    let metrics = Arc::new(EngineMetrics::new(&config.model, rank));
    let rank_number = u32::try_from(rank).context("too many ranks")?;
    let offset = |endpoint: &String| offset_endpoint(endpoint, rank_number);
    let events = match &slot.kv_events_endpoint {
        Some(endpoint) => Some(
            publisher::start(
                PublisherSettings {
                    endpoint: offset(endpoint)?,
                    replay_endpoint: slot
                        .kv_events_replay_endpoint
                        .as_ref()
                        .map(offset)
                        .transpose()?,
                    topic: config.kv_events_topic.clone(),
                    format: config.kv_events_format,
                    block_size: block_size.get(),
                    replay_capacity: config.kv_events_replay_buffer,
                    data_parallel_rank: rank_number,
                },
                Arc::clone(faults),
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
    tokio::spawn(Arc::clone(&engine).run().in_current_span());
    Ok(Rank { engine, metrics })
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
