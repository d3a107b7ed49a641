//! The I/O side of the fleet state: every model's [`FleetRegistry`] behind a
//! lock with its stream subscribers, and the task that feeds the registries.
//! Relay events, heartbeats, engine load and gateway reports come in as
//! [`Input`]s; the task reads the clock, hands each input to its model's
//! registry, sends the full-state requests they return to NATS, and once per
//! burst fans each model's committed delta out to its subscribers.
//!
//! Readers (HTTP, new subscribers) take a model's lock briefly; nothing holds
//! it across an await.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use router_core::gateway::{gateway_report, GatewayGone, GatewayReport};
use router_core::protocol::{KvEventBatch, WorkerInfo, WorkerLoad, WorkerRole};
use router_core::state_stream::StateUpdate;
use tokio::sync::{mpsc, Notify};

use crate::serve::config::Config;
use crate::serve::feed::{FeedHealth, Transition};
use crate::serve::gateways::GatewayPresence;
use crate::serve::metrics::{KindLabel, ServeMetrics};
use crate::serve::registry::{self, FleetRegistry, SyncRequest};
use crate::serve::stream::SharedReportOut;

/// Something the state task must apply.
#[derive(Debug)]
pub enum Input {
    Events(KvEventBatch),
    Worker(WorkerInfo),
    Load(WorkerLoad),
    /// From a gateway on this sidecar's stream.
    Report {
        gateway_id: String,
        report: GatewayReport,
    },
    /// A gateway's report another sidecar shared over NATS.
    PeerReport {
        gateway_id: String,
        report: GatewayReport,
    },
    /// Our NATS connection came (back) up: messages may have been missed.
    Connected,
    /// Our NATS connection went down: the fleet is unheard until `Connected`.
    Disconnected,
    /// Our own probe came back through NATS (`nats::probe_feed`).
    Heard,
    /// A gateway's state stream said hello under this id.
    GatewayOpened(String),
    /// A stream that said hello under this id ended.
    GatewayClosed(String),
}

/// One stream subscriber, as seen from the models it follows.
#[derive(Clone)]
pub struct Subscriber {
    pub id: u64,
    pub tx: mpsc::Sender<StateUpdate>,
    /// Set when an update did not fit: the subscriber discards what it has
    /// queued and re-snapshots every model (see `stream.rs`).
    pub lagged: Arc<AtomicBool>,
    pub wake: Arc<Notify>,
    /// Per model (config order): deltas are withheld until it re-snapshots.
    pub paused: Arc<[AtomicBool]>,
}

/// One model's state; behind a mutex in [`ServeState`]. The subscribers sit
/// under the same lock as the registry so that a new subscriber's snapshot
/// and the deltas it then receives cannot miss or repeat a commit.
pub struct ModelState {
    pub registry: FleetRegistry,
    subscribers: Vec<Subscriber>,
}

/// Shared handle to every model's state.
pub struct ServeState {
    models: Vec<Mutex<ModelState>>,
    by_name: HashMap<String, usize>,
    next_subscriber: AtomicU64,
    ready: AtomicBool,
    initial_sync_timeout: Duration,
    pub metrics: ServeMetrics,
}

impl ServeState {
    pub fn new(config: &Config, metrics: ServeMetrics) -> Self {
        let now = Instant::now();
        let models = config
            .models
            .iter()
            .map(|model| {
                Mutex::new(ModelState {
                    registry: FleetRegistry::new(
                        model.clone(),
                        &config.state,
                        metrics.clone(),
                        now,
                    ),
                    subscribers: Vec::new(),
                })
            })
            .collect();
        let by_name = config
            .models
            .iter()
            .enumerate()
            .map(|(i, m)| (m.name.clone(), i))
            .collect();
        Self {
            models,
            by_name,
            next_subscriber: AtomicU64::new(1),
            ready: AtomicBool::new(false),
            initial_sync_timeout: Duration::from_millis(config.state.initial_sync_timeout_ms),
            metrics,
        }
    }

    pub fn model_count(&self) -> usize {
        self.models.len()
    }

    pub fn model_names(&self) -> Vec<String> {
        let mut names: Vec<(usize, String)> =
            self.by_name.iter().map(|(n, i)| (*i, n.clone())).collect();
        names.sort();
        names.into_iter().map(|(_, n)| n).collect()
    }

    /// Locks one model. A panic while holding the lock would poison it; the
    /// state is still consistent per commit, so keep serving it.
    pub fn lock(&self, model: &str) -> Option<MutexGuard<'_, ModelState>> {
        let index = *self.by_name.get(model)?;
        self.lock_at(index)
    }

    fn lock_at(&self, index: usize) -> Option<MutexGuard<'_, ModelState>> {
        let model = self.models.get(index)?;
        Some(
            model
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    /// The initial state is loaded (NATS reached, then discovery). Not tied
    /// to NATS afterwards: without it this sidecar still tokenizes and serves
    /// the view it last heard, marked unheard (`kvmesh_serve_fleet_unheard`),
    /// which beats none.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn set_nats_connected(&self, connected: bool) {
        self.metrics.nats_connected.set(i64::from(connected));
    }

    /// Registers a subscriber on every model and returns their snapshots;
    /// deltas after them go to `tx` in version order.
    pub fn subscribe(&self, tx: mpsc::Sender<StateUpdate>) -> (Subscriber, Vec<StateUpdate>) {
        let subscriber = Subscriber {
            id: self.next_subscriber.fetch_add(1, Ordering::Relaxed),
            tx,
            lagged: Arc::new(AtomicBool::new(false)),
            wake: Arc::new(Notify::new()),
            paused: (0..self.models.len())
                .map(|_| AtomicBool::new(false))
                .collect(),
        };
        let mut snapshots = Vec::with_capacity(self.models.len());
        for index in 0..self.models.len() {
            if let Some(mut model) = self.lock_at(index) {
                snapshots.push(model.registry.snapshot());
                model.subscribers.push(subscriber.clone());
            }
        }
        self.metrics.subscribers.inc();
        (subscriber, snapshots)
    }

    /// Fresh snapshot of model `index` for a lagged subscriber; its deltas
    /// resume right after it.
    pub fn resnapshot(&self, subscriber: &Subscriber, index: usize) -> Option<StateUpdate> {
        let model = self.lock_at(index)?;
        let snapshot = model.registry.snapshot();
        if let Some(paused) = subscriber.paused.get(index) {
            paused.store(false, Ordering::Release);
        }
        Some(snapshot)
    }

    pub fn unsubscribe(&self, subscriber: &Subscriber) {
        for index in 0..self.models.len() {
            if let Some(mut model) = self.lock_at(index) {
                model.subscribers.retain(|s| s.id != subscriber.id);
            }
        }
        self.metrics.subscribers.dec();
    }
}

/// The state task: applies inputs in order, commits once per burst.
pub struct StateTask {
    state: Arc<ServeState>,
    sync_tx: mpsc::Sender<SyncRequest>,
    /// To other sidecars over NATS: the gateways found gone here.
    share: mpsc::Sender<SharedReportOut>,
    gateways: GatewayPresence,
    gateway_grace: Duration,
    feed: FeedHealth,
}

/// Upper bound on inputs folded into one commit, so one burst cannot delay
/// the subscribers' deltas for long.
const MAX_BURST: usize = 1024;
/// How often silent workers and stale decisions are looked for, and quiet
/// models get their keepalive.
const TICK: Duration = Duration::from_millis(100);

impl StateTask {
    /// A task feeding `state`'s registries; full-state requests go out on
    /// `sync_tx`, gateways gone for `gateway_grace` on `share`.
    pub fn new(
        state: Arc<ServeState>,
        sync_tx: mpsc::Sender<SyncRequest>,
        share: mpsc::Sender<SharedReportOut>,
        gateway_grace: Duration,
    ) -> Self {
        Self {
            state,
            sync_tx,
            share,
            gateways: GatewayPresence::default(),
            gateway_grace,
            feed: FeedHealth::new(Instant::now()),
        }
    }

    pub async fn run(mut self, mut inputs: mpsc::Receiver<Input>) {
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                input = inputs.recv() => {
                    let Some(input) = input else { return };
                    self.apply(input, Instant::now());
                    let mut burst = 1;
                    while burst < MAX_BURST {
                        match inputs.try_recv() {
                            Ok(input) => self.apply(input, Instant::now()),
                            Err(_) => break,
                        }
                        burst += 1;
                    }
                }
                _ = ticker.tick() => {
                    self.tick(Instant::now());
                }
            }
            self.commit(Instant::now());
        }
    }

    fn apply(&mut self, input: Input, now: Instant) {
        if matches!(
            input,
            Input::Events(_)
                | Input::Worker(_)
                | Input::Load(_)
                | Input::PeerReport { .. }
                | Input::Heard
        ) {
            let transition = self.feed.heard(now);
            self.apply_feed(transition, now);
        }
        match input {
            Input::Events(batch) => {
                let sync = self
                    .model(&batch.model, "events")
                    .and_then(|mut model| model.registry.events(&batch, now));
                self.send_sync(sync);
            }
            Input::Worker(info) => {
                let sync = self
                    .model(&info.model, "workers")
                    .and_then(|mut model| model.registry.heartbeat(info, now));
                self.send_sync(sync);
            }
            Input::Load(load) => {
                if let Some(mut model) = self.model(&load.model, "load") {
                    model.registry.engine_load(load);
                }
            }
            Input::Report { gateway_id, report } => self.report(&gateway_id, report, now),
            Input::PeerReport { gateway_id, report } => {
                self.peer_report(&gateway_id, report, now);
            }
            Input::Connected => {
                let transition = self.feed.connected(now);
                self.apply_feed(transition, now);
            }
            Input::Disconnected => {
                let transition = self.feed.disconnected();
                self.apply_feed(transition, now);
            }
            Input::Heard => {}
            Input::GatewayOpened(gateway_id) => self.gateways.opened(&gateway_id),
            Input::GatewayClosed(gateway_id) => self.gateways.closed(&gateway_id, now),
        }
    }

    /// Applies a change of whether NATS delivers to every registry.
    fn apply_feed(&self, transition: Transition, now: Instant) {
        match transition {
            Transition::Unchanged => return,
            Transition::Lost => {
                tracing::warn!("NATS delivers nothing; keeping the fleet as last heard");
                self.each_registry(FleetRegistry::feed_lost);
            }
            Transition::Resumed {
                unheard_for,
                missed,
            } => {
                tracing::info!(
                    unheard_ms = unheard_for.as_millis() as u64,
                    "NATS delivers again"
                );
                self.each_registry(|registry| {
                    if missed {
                        registry.messages_missed();
                    }
                    registry.feed_resumed(unheard_for, now);
                });
            }
        }
        self.state
            .metrics
            .fleet_unheard
            .set(i64::from(!self.feed.is_heard()));
    }

    /// A gateway's report another sidecar shared. One about a gateway whose
    /// stream is open here is stale, whatever its kind: the gateway moved
    /// here and reports here, so a late decision or `Gone` from where it was
    /// would undo what its resync here set right. Any other proves the
    /// gateway alive elsewhere, whatever its presence here says.
    fn peer_report(&mut self, gateway_id: &str, report: GatewayReport, now: Instant) {
        if self.gateways.is_open(gateway_id) {
            return;
        }
        if !matches!(report.kind, Some(gateway_report::Kind::Gone(_))) {
            self.gateways.heard_elsewhere(gateway_id);
        }
        self.report(gateway_id, report, now);
    }

    fn each_registry(&self, mut action: impl FnMut(&mut FleetRegistry)) {
        for index in 0..self.state.model_count() {
            if let Some(mut model) = self.state.lock_at(index) {
                action(&mut model.registry);
            }
        }
    }

    fn report(&self, gateway_id: &str, report: GatewayReport, now: Instant) {
        let reports = &self.state.metrics.gateway_reports;
        match report.kind {
            Some(gateway_report::Kind::Decision(decision)) => {
                reports.get_or_create(&KindLabel { kind: "decision" }).inc();
                if let Some(mut model) = self.model(&decision.model, "report") {
                    model.registry.decision(gateway_id, &decision, now);
                }
            }
            Some(gateway_report::Kind::Progress(progress)) => {
                reports.get_or_create(&KindLabel { kind: "progress" }).inc();
                if let Some(mut model) = self.model(&progress.model, "report") {
                    model.registry.progress(gateway_id, &progress);
                }
            }
            Some(gateway_report::Kind::Gone(gone)) => {
                reports.get_or_create(&KindLabel { kind: "gone" }).inc();
                if let Some(mut model) = self.model(&gone.model, "report") {
                    model.registry.gateway_gone(gateway_id);
                }
            }
            Some(gateway_report::Kind::Resync(resync)) => {
                reports.get_or_create(&KindLabel { kind: "resync" }).inc();
                if let Some(mut model) = self.model(&resync.model, "report") {
                    model.registry.resync(gateway_id, &resync, now);
                }
            }
            Some(gateway_report::Kind::Hello(_)) | None => {}
        }
    }

    /// Drops the requests of the gateways whose streams stayed closed past
    /// the grace period, and tells the other sidecars, which heard of those
    /// requests from us.
    fn forget_gone_gateways(&mut self, now: Instant) {
        for gateway_id in self.gateways.gone(self.gateway_grace, now) {
            for model in self.state.model_names() {
                let report = GatewayReport {
                    kind: Some(gateway_report::Kind::Gone(GatewayGone { model })),
                };
                // Best effort, as for decisions: a full queue leaves the
                // other sidecars to `inflight_ttl_ms`.
                let _ = self.share.try_send(SharedReportOut {
                    gateway_id: gateway_id.clone(),
                    report: report.clone(),
                });
                self.report(&gateway_id, report, now);
            }
        }
    }

    /// Locks the model an input names; an unconfigured one counts the input
    /// as malformed.
    fn model(&self, name: &str, kind: &'static str) -> Option<MutexGuard<'_, ModelState>> {
        let model = self.state.lock(name);
        if model.is_none() {
            self.state
                .metrics
                .malformed
                .get_or_create(&KindLabel { kind })
                .inc();
        }
        model
    }

    /// Best effort: a request lost to a full queue is made again by a
    /// heartbeat after `sync_retry_ms`, as long as the worker is out of sync.
    fn send_sync(&self, request: Option<SyncRequest>) {
        let Some(request) = request else { return };
        let label = ServeMetrics::model(&request.model);
        if self.sync_tx.try_send(request).is_ok() {
            self.state.metrics.sync_requests.get_or_create(&label).inc();
        }
    }

    fn tick(&mut self, now: Instant) {
        self.forget_gone_gateways(now);
        let transition = self.feed.tick(now);
        self.apply_feed(transition, now);
        let mut all_in_sync = true;
        for index in 0..self.state.model_count() {
            if let Some(mut model) = self.state.lock_at(index) {
                model.registry.expire(now, self.feed.last_heard());
                all_in_sync &= model.registry.all_in_sync();
            }
        }
        // Discovery starts once NATS is reached: before, an empty fleet is
        // not a fleet heard to be empty.
        let Some(connected) = self.feed.first_connected() else {
            return;
        };
        let since_start = now.duration_since(connected);
        if registry::initial_sync_done(since_start, all_in_sync, self.state.initial_sync_timeout) {
            self.state.ready.store(true, Ordering::Relaxed);
        }
    }

    /// Commits each model's pending changes and fans the delta out.
    fn commit(&self, now: Instant) {
        for index in 0..self.state.model_count() {
            let Some(mut model) = self.state.lock_at(index) else {
                continue;
            };
            let Some(update) = model.registry.commit(now) else {
                continue;
            };
            model
                .subscribers
                .retain(|subscriber| fan_out(subscriber, index, &update));
        }
    }
}

/// Sends one delta to a subscriber; false drops a subscriber that is gone.
fn fan_out(subscriber: &Subscriber, index: usize, update: &StateUpdate) -> bool {
    let paused = subscriber
        .paused
        .get(index)
        .is_some_and(|p| p.load(Ordering::Acquire));
    if paused || subscriber.lagged.load(Ordering::Acquire) {
        return true;
    }
    match subscriber.tx.try_send(update.clone()) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            // Everything queued will be discarded: pause every model until
            // each has sent a fresh snapshot.
            for paused in subscriber.paused.iter() {
                paused.store(true, Ordering::Release);
            }
            subscriber.lagged.store(true, Ordering::Release);
            subscriber.wake.notify_one();
            true
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

/// Role names for the HTTP API: the configuration's (`--role`), or
/// `unspecified` for a relay that predates roles.
pub fn role_name(role: i32) -> &'static str {
    WorkerRole::try_from(role)
        .ok()
        .and_then(|wire| kvmesh_config::Role::try_from(wire).ok())
        .map_or("unspecified", kvmesh_config::Role::as_str)
}
