//! NATS side of the relay: connection with auth/TLS and reconnect handling,
//! the publisher task draining the bounded outbox, registration heartbeats,
//! and the sync responder. Public so that synthetic workers (the cost
//! benchmark's load generator in `kvmesh-stack`) register, publish and answer
//! sync requests with this same code.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use kvmesh_config::{EngineKind, Role};
use prost::Message;
use router_core::protocol::{self, SyncSeen, WorkerInfo, WorkerRole};
use tokio::sync::{mpsc, Notify};

use crate::nats_options::{connect_options, server_addrs, with_credentials, NatsCredentials};
use crate::relay::args::RelayArgs;
use crate::relay::metrics::{unix_ms, RelayMetrics};
use crate::relay::pipeline::{Control, Outgoing};

pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// Connects (retrying in the background if NATS is not up yet) and wires
/// reconnects to a snapshot and a re-registration.
pub async fn connect(
    args: &RelayArgs,
    metrics: RelayMetrics,
    control: mpsc::Sender<Control>,
    registration: Arc<Notify>,
) -> anyhow::Result<async_nats::Client> {
    let options =
        connect_options(format!("kvmesh-relay-{}", args.worker_id)).event_callback(move |event| {
            let metrics = metrics.clone();
            let control = control.clone();
            let registration = registration.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        tracing::info!("connected to NATS");
                        metrics.set_nats_up(true);
                        // Anything published while disconnected may be lost:
                        // re-register and send the whole view.
                        registration.notify_one();
                        let _ = control
                            .send(Control::FullState {
                                reply: None,
                                seen: None,
                            })
                            .await;
                    }
                    async_nats::Event::Disconnected => {
                        tracing::warn!("disconnected from NATS");
                        metrics.set_nats_up(false);
                    }
                    other => tracing::info!(event = %other, "NATS event"),
                }
            }
        });
    let credentials = NatsCredentials {
        token: args.nats_token.as_deref(),
        user: args.nats_user.as_deref(),
        password: args.nats_password.as_deref(),
        creds_file: args.nats_creds.as_deref(),
        tls_ca: args.nats_tls_ca.as_deref(),
        tls_cert: args.nats_tls_cert.as_deref(),
        tls_key: args.nats_tls_key.as_deref(),
    };
    with_credentials(options, credentials)
        .await?
        .connect(server_addrs(&args.nats_url)?)
        .await
        .with_context(|| format!("connecting to NATS at {}", args.nats_url))
}

/// Drains the outbox into NATS.
pub async fn publish_outbox(
    client: async_nats::Client,
    mut outbox: mpsc::Receiver<Outgoing>,
    metrics: RelayMetrics,
) {
    while let Some(message) = outbox.recv().await {
        if let Err(error) = client.publish(message.subject, message.payload).await {
            metrics.publish_error(message.kind);
            tracing::warn!(%error, kind = message.kind, "NATS publish failed");
        }
    }
}

/// Who a relay's worker is, as its registration tells the sidecars.
#[derive(Debug, Clone, Copy)]
pub struct Registration<'a> {
    pub worker_id: &'a str,
    pub model: &'a str,
    /// `ip:port` Envoy knows the worker as.
    pub address: &'a str,
    pub role: Role,
    /// The engine's data-parallel rank behind `address`, if it has several.
    pub data_parallel_rank: Option<u32>,
    pub engine: EngineKind,
    pub block_size: u32,
    /// This relay incarnation; its event seqs start at 1.
    pub epoch: u64,
}

/// The registration message; [`Heartbeat`] fills in the last seq, the time
/// and the engine's reachability each time it sends it.
pub fn registration(worker: Registration<'_>) -> WorkerInfo {
    WorkerInfo {
        worker_id: worker.worker_id.to_owned(),
        model: worker.model.to_owned(),
        address: worker.address.to_owned(),
        role: WorkerRole::from(worker.role) as i32,
        engine: protocol::EngineKind::from(worker.engine) as i32,
        block_size: worker.block_size,
        epoch: worker.epoch,
        last_seq: 0,
        heartbeat_interval_ms: HEARTBEAT.as_millis() as u32,
        timestamp_ms: 0,
        engine_unreachable: false,
        data_parallel_rank: worker.data_parallel_rank,
    }
}

/// Registration, repeated every second and at once after a reconnect.
pub struct Heartbeat {
    pub client: async_nats::Client,
    pub subject: String,
    pub info: WorkerInfo,
    pub last_seq: Arc<AtomicU64>,
    /// Set by the load reporter while the engine does not answer.
    pub engine_unreachable: Arc<AtomicBool>,
    pub registration: Arc<Notify>,
    pub metrics: RelayMetrics,
}

impl Heartbeat {
    pub async fn run(mut self) {
        let mut ticker = tokio::time::interval(HEARTBEAT);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = self.registration.notified() => {}
            }
            self.info.last_seq = self.last_seq.load(Ordering::Relaxed);
            self.info.engine_unreachable = self.engine_unreachable.load(Ordering::Relaxed);
            self.info.timestamp_ms = unix_ms();
            let payload = self.info.encode_to_vec();
            if let Err(error) = self
                .client
                .publish(self.subject.clone(), payload.into())
                .await
            {
                self.metrics.publish_error("worker");
                tracing::debug!(%error, "publishing heartbeat failed");
            }
        }
    }
}

/// Answers `<prefix>.sync.<model>.<worker>` requests with a fresh snapshot.
pub async fn serve_sync(
    client: async_nats::Client,
    subject: String,
    control: mpsc::Sender<Control>,
) {
    let mut subscription = match client.subscribe(subject.clone()).await {
        Ok(subscription) => subscription,
        Err(error) => {
            tracing::error!(%error, %subject, "cannot subscribe to sync requests");
            return;
        }
    };
    while let Some(request) = subscription.next().await {
        let seen = SyncSeen::decode(&request.payload);
        let reply = request.reply;
        if control
            .send(Control::FullState { reply, seen })
            .await
            .is_err()
        {
            return;
        }
    }
}
