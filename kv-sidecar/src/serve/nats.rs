//! NATS side of `serve`: connection (auth, TLS, reconnects), the relay
//! subscriptions decoded into state [`Input`]s, full-state requests to
//! relays, and decisions shared with other sidecars.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use prost::Message;
use router_core::gateway::{decisions_subject, SharedReport};
use router_core::protocol::{subjects, KvEventBatch, WorkerInfo, WorkerLoad};
use tokio::sync::mpsc;

use crate::nats_options::{connect_options, server_addrs, with_credentials, NatsCredentials};
use crate::serve::config::NatsConfig;
use crate::serve::metrics::KindLabel;
use crate::serve::registry::SyncRequest;
use crate::serve::state::{Input, ServeState};
use crate::serve::stream::SharedReportOut;

pub async fn connect(
    config: &NatsConfig,
    state: Arc<ServeState>,
    inputs: mpsc::Sender<Input>,
) -> anyhow::Result<async_nats::Client> {
    let options = connect_options("kvmesh-serve".to_owned()).event_callback(move |event| {
        let state = state.clone();
        let inputs = inputs.clone();
        async move {
            match event {
                async_nats::Event::Connected => {
                    tracing::info!("connected to NATS");
                    state.set_nats_connected(true);
                    // Whatever relays published meanwhile is lost to us.
                    let _ = inputs.send(Input::Connected).await;
                }
                async_nats::Event::Disconnected => {
                    tracing::warn!("disconnected from NATS; keeping the fleet as last heard");
                    state.set_nats_connected(false);
                    let _ = inputs.send(Input::Disconnected).await;
                }
                other => tracing::info!(event = %other, "NATS event"),
            }
        }
    });
    let auth = config.auth.as_ref();
    let tls = config.tls.as_ref();
    let credentials = NatsCredentials {
        token: auth.and_then(|a| a.token.as_deref()),
        user: auth.and_then(|a| a.user.as_deref()),
        password: auth.and_then(|a| a.password.as_deref()),
        creds_file: auth.and_then(|a| a.creds_file.as_deref()),
        tls_ca: tls.and_then(|t| t.ca.as_deref()),
        tls_cert: tls.and_then(|t| t.cert.as_deref()),
        tls_key: tls.and_then(|t| t.key.as_deref()),
    };
    with_credentials(options, credentials)
        .await?
        .connect(server_addrs(&config.url)?)
        .await
        .with_context(|| format!("connecting to NATS at {}", config.url))
}

/// Which relay message a subscription carries.
#[derive(Debug, Clone, Copy)]
enum Feed {
    Events,
    Workers,
    Load,
    Decisions,
}

impl Feed {
    fn name(self) -> &'static str {
        match self {
            Feed::Events => "events",
            Feed::Workers => "workers",
            Feed::Load => "load",
            Feed::Decisions => "decisions",
        }
    }
}

/// Subscribes to every model's relay subjects; returns once subscribed, the
/// forwarding runs in spawned tasks.
pub async fn subscribe(
    client: &async_nats::Client,
    prefix: &str,
    origin: &str,
    state: Arc<ServeState>,
    inputs: mpsc::Sender<Input>,
) -> anyhow::Result<()> {
    for model in state.model_names() {
        let token = subjects::token(&model);
        let feeds = [
            (Feed::Events, format!("{prefix}.events.{token}.*")),
            (Feed::Workers, subjects::workers(prefix, &model)),
            (Feed::Load, format!("{prefix}.load.{token}.*")),
            (Feed::Decisions, decisions_subject(prefix, &model)),
        ];
        for (feed, subject) in feeds {
            let subscription = client
                .subscribe(subject.clone())
                .await
                .with_context(|| format!("subscribing to {subject}"))?;
            tokio::spawn(forward(
                subscription,
                feed,
                origin.to_owned(),
                state.clone(),
                inputs.clone(),
            ));
        }
    }
    Ok(())
}

async fn forward(
    mut subscription: async_nats::Subscriber,
    feed: Feed,
    origin: String,
    state: Arc<ServeState>,
    inputs: mpsc::Sender<Input>,
) {
    while let Some(message) = subscription.next().await {
        let payload = message.payload.as_ref();
        let input = match feed {
            Feed::Events => KvEventBatch::decode(payload).ok().map(Input::Events),
            Feed::Workers => WorkerInfo::decode(payload).ok().map(Input::Worker),
            Feed::Load => WorkerLoad::decode(payload).ok().map(Input::Load),
            Feed::Decisions => match SharedReport::decode(payload) {
                // Our own gateways' reports were applied when they arrived.
                Ok(shared) if shared.origin == origin => continue,
                Ok(SharedReport {
                    gateway_id,
                    report: Some(report),
                    ..
                }) => Some(Input::PeerReport { gateway_id, report }),
                _ => None,
            },
        };
        let Some(input) = input else {
            tracing::debug!(subject = %message.subject, "skipping a malformed message");
            state
                .metrics
                .malformed
                .get_or_create(&KindLabel { kind: feed.name() })
                .inc();
            continue;
        };
        if inputs.send(input).await.is_err() {
            return;
        }
    }
}

/// How often this sidecar sends itself a message through NATS.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Proves, once a second, that NATS still delivers to this sidecar: a
/// message to itself, on a subject of its own, comes back as
/// [`Input::Heard`]. Relays' heartbeats prove it too while there are any;
/// this holds with none (a fleet whose only worker died), and it stops
/// the moment the server hangs or is cut off, long before the client's
/// pings give up on the connection.
pub async fn probe_feed(client: async_nats::Client, subject: String, inputs: mpsc::Sender<Input>) {
    let mut echoes = match client.subscribe(subject.clone()).await {
        Ok(subscription) => subscription,
        Err(error) => {
            tracing::error!(%error, %subject, "cannot subscribe to this sidecar's own probe subject");
            return;
        }
    };
    let mut ticker = tokio::time::interval(PROBE_INTERVAL);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                if let Err(error) = client.publish(subject.clone(), Default::default()).await {
                    tracing::debug!(%error, "publishing the feed probe failed");
                }
            }
            echo = echoes.next() => {
                if echo.is_none() || inputs.send(Input::Heard).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Asks relays to republish their full state.
pub async fn send_sync_requests(
    client: async_nats::Client,
    prefix: String,
    mut requests: mpsc::Receiver<SyncRequest>,
) {
    while let Some(request) = requests.recv().await {
        let subject = subjects::sync(&prefix, &request.model, &request.worker_id);
        tracing::info!(model = %request.model, worker = %request.worker_id, "requesting a full state");
        let body = request
            .seen
            .map_or_else(Vec::new, |seen| seen.encode().to_vec());
        if let Err(error) = client.publish(subject, body.into()).await {
            tracing::warn!(%error, "sync request failed");
        }
    }
}

/// Publishes this sidecar's gateway reports for the other sidecars.
pub async fn share_reports(
    client: async_nats::Client,
    prefix: String,
    origin: String,
    mut reports: mpsc::Receiver<SharedReportOut>,
) {
    use router_core::gateway::gateway_report::Kind;
    while let Some(out) = reports.recv().await {
        let model = match &out.report.kind {
            Some(Kind::Decision(d)) => &d.model,
            Some(Kind::Progress(p)) => &p.model,
            Some(Kind::Gone(g)) => &g.model,
            Some(Kind::Resync(r)) => &r.model,
            Some(Kind::Hello(_)) | None => continue,
        };
        let subject = decisions_subject(&prefix, model);
        let shared = SharedReport {
            origin: origin.clone(),
            gateway_id: out.gateway_id,
            report: Some(out.report),
        };
        if let Err(error) = client.publish(subject, shared.encode_to_vec().into()).await {
            tracing::debug!(%error, "sharing a decision failed");
        }
    }
}
