//! A state-stream subscriber beside the filters: the same gRPC
//! `kvmesh.v1.StateStream/Subscribe` each filter VM opens, timing the
//! initial snapshot and counting what the stream carries afterwards.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use kv_sidecar::serve::stream::StateStreamClient;
use router_core::gateway::GatewayReport;
use router_core::protocol::Message;
use router_core::state_stream::{state_update, StateUpdate};

/// gRPC's length-prefixed framing adds this to every message on the wire
/// (HTTP/2 framing, a few bytes per 16 KiB frame, is not counted).
const GRPC_MESSAGE_HEADER: u64 = 5;

/// The initial snapshot as one subscriber received it.
#[derive(Debug, Clone, Copy, Default)]
pub struct SnapshotReceipt {
    /// From starting to connect until its last chunk arrived.
    pub elapsed: Duration,
    pub chunks: u64,
    pub blocks: u64,
    pub bytes: u64,
}

/// Bytes and messages received so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Received {
    pub bytes: u64,
    pub messages: u64,
}

#[derive(Default)]
struct Watch {
    snapshot: SnapshotReceipt,
    /// Set at the first delta: the snapshot before it is complete.
    snapshot_done: bool,
    received: Received,
    failure: Option<String>,
}

/// Dropping it ends the subscription.
pub struct StreamProbe {
    _runtime: tokio::runtime::Runtime,
    watch: Arc<Mutex<Watch>>,
}

impl StreamProbe {
    /// Subscribes to the sidecar's state stream at `grpc_url`.
    pub fn subscribe(grpc_url: &str) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("starting the stream probe's runtime")?;
        let watch = Arc::new(Mutex::new(Watch::default()));
        let (url, shared) = (grpc_url.to_owned(), watch.clone());
        runtime.spawn(async move {
            if let Err(error) = follow(url, shared.clone()).await {
                lock(&shared).failure = Some(format!("{error:#}"));
            }
        });
        Ok(Self {
            _runtime: runtime,
            watch,
        })
    }

    /// Waits until the initial snapshot is complete (the first delta came).
    pub fn snapshot(&self, timeout: Duration) -> anyhow::Result<SnapshotReceipt> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let watch = self.watch();
                if let Some(failure) = &watch.failure {
                    anyhow::bail!("state stream probe: {failure}");
                }
                if watch.snapshot_done {
                    return Ok(watch.snapshot);
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "no complete snapshot within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn received(&self) -> anyhow::Result<Received> {
        let watch = self.watch();
        match &watch.failure {
            Some(failure) => anyhow::bail!("state stream probe: {failure}"),
            None => Ok(watch.received),
        }
    }

    fn watch(&self) -> MutexGuard<'_, Watch> {
        lock(&self.watch)
    }
}

/// A poisoned lock only means a probe task panicked mid-update; its counts
/// are still the best there are.
fn lock(watch: &Mutex<Watch>) -> MutexGuard<'_, Watch> {
    watch
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn follow(url: String, watch: Arc<Mutex<Watch>>) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut client = StateStreamClient::connect(url).await?;
    let reports = futures_util::stream::pending::<GatewayReport>();
    let mut stream = client.subscribe(reports).await?.into_inner();
    while let Some(update) = stream.message().await? {
        let bytes = update.encoded_len() as u64 + GRPC_MESSAGE_HEADER;
        let mut watch = lock(&watch);
        watch.received.bytes += bytes;
        watch.received.messages += 1;
        if watch.snapshot_done {
            continue;
        }
        match snapshot_blocks(&update) {
            Some(blocks) => {
                let snapshot = &mut watch.snapshot;
                snapshot.elapsed = started.elapsed();
                snapshot.chunks += 1;
                snapshot.blocks += blocks;
                snapshot.bytes += bytes;
            }
            None => watch.snapshot_done = true,
        }
    }
    anyhow::bail!("the sidecar ended the state stream")
}

/// Blocks in a snapshot chunk; `None` for a delta.
fn snapshot_blocks(update: &StateUpdate) -> Option<u64> {
    match &update.kind {
        Some(state_update::Kind::Snapshot(snapshot)) => {
            Some(snapshot.workers.iter().map(|w| w.blocks.len() as u64).sum())
        }
        _ => None,
    }
}
