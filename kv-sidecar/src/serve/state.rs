//! The authoritative fleet state of every configured model, and the task that
//! keeps it: relay events, heartbeats, engine load and gateway reports come
//! in as [`Input`]s; each batch of them becomes one `FleetView::commit`, whose
//! delta goes to every stream subscriber.
//!
//! Readers (HTTP, new subscribers) take a model's lock briefly; nothing holds
//! it across an await.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use router_core::fleet::FleetView;
use router_core::gateway::{gateway_report, GatewayReport, RequestPhase};
use router_core::protocol::{kv_event::Kind, KvEventBatch, WorkerInfo, WorkerLoad, WorkerRole};
use router_core::state_stream::{
    change, BlocksChanged, Change, LoadReport, StateUpdate, WorkerCleared, WorkerJoined, WorkerLeft,
};
use tokio::sync::{mpsc, Notify};

use crate::serve::config::{Config, ModelConfig, StateConfig};
use crate::serve::inflight::{Dropped, InFlight};
use crate::serve::metrics::{EventLabel, KindLabel, ReasonLabel, ServeMetrics};
use crate::serve::seq::{Accept, SeqTracker};

/// Something the state task must apply.
#[derive(Debug)]
pub enum Input {
    Events(KvEventBatch),
    Worker(WorkerInfo),
    Load(WorkerLoad),
    /// From a gateway on this sidecar's stream, or shared by another sidecar.
    Report {
        gateway_id: String,
        report: GatewayReport,
    },
    /// Our NATS connection came (back) up: messages may have been missed.
    Connected,
}

/// A relay that must republish its full state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncRequest {
    pub model: String,
    pub worker_id: String,
}

struct WorkerMeta {
    info: WorkerInfo,
    last_heartbeat: Instant,
    tracker: SeqTracker,
    /// `last_seq` of the previous heartbeat: events up to it should have
    /// arrived by now, so being behind it means some were lost.
    previous_heartbeat_seq: u64,
    last_sync_request: Option<Instant>,
    engine: WorkerLoad,
    published_load: LoadReport,
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

/// One model's state; behind a mutex in [`ServeState`].
pub struct ModelState {
    pub config: ModelConfig,
    pub fleet: FleetView,
    workers: HashMap<String, WorkerMeta>,
    inflight: InFlight,
    subscribers: Vec<Subscriber>,
    position: usize,
    /// Workers refused because their relay hashes with another block size,
    /// with that size: logged and counted once per worker and size, not on
    /// every heartbeat.
    mismatched_block_size: HashMap<String, u32>,
}

impl ModelState {
    /// Registered workers with their latest heartbeat (sorted by id).
    pub fn worker_infos(&self) -> Vec<(&WorkerInfo, bool)> {
        let mut infos: Vec<(&WorkerInfo, bool)> = self
            .workers
            .values()
            .map(|m| (&m.info, m.tracker.in_sync()))
            .collect();
        infos.sort_by(|a, b| a.0.worker_id.cmp(&b.0.worker_id));
        infos
    }

    pub fn all_in_sync(&self) -> bool {
        self.workers.values().all(|m| m.tracker.in_sync())
    }
}

/// Shared handle to every model's state.
pub struct ServeState {
    models: Vec<Mutex<ModelState>>,
    by_name: HashMap<String, usize>,
    next_subscriber: AtomicU64,
    ready: AtomicBool,
    nats_connected: AtomicBool,
    pub metrics: ServeMetrics,
}

impl ServeState {
    pub fn new(config: &Config, metrics: ServeMetrics) -> Self {
        let models = config
            .models
            .iter()
            .enumerate()
            .map(|(position, model)| {
                Mutex::new(ModelState {
                    config: model.clone(),
                    fleet: FleetView::new(&model.name, config.state.max_index_entries),
                    workers: HashMap::new(),
                    inflight: InFlight::default(),
                    subscribers: Vec::new(),
                    position,
                    mismatched_block_size: HashMap::new(),
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
            nats_connected: AtomicBool::new(false),
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

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && self.nats_connected.load(Ordering::Relaxed)
    }

    pub fn set_nats_connected(&self, connected: bool) {
        self.nats_connected.store(connected, Ordering::Relaxed);
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
                snapshots.push(model.fleet.snapshot());
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
        let snapshot = model.fleet.snapshot();
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
    pub state: Arc<ServeState>,
    pub limits: StateConfig,
    pub sync_tx: mpsc::Sender<SyncRequest>,
}

/// Upper bound on inputs folded into one commit, so one burst cannot delay
/// the subscribers' deltas for long.
const MAX_BURST: usize = 1024;
const TICK: Duration = Duration::from_millis(100);
/// A model with no changes still gets an (empty) delta this often, so filters
/// can tell a quiet fleet from a dead sidecar (they go stale after silence).
const KEEPALIVE: Duration = Duration::from_secs(1);
/// Heartbeats are collected this long before readiness is considered.
const DISCOVERY: Duration = Duration::from_millis(1500);

impl StateTask {
    pub async fn run(self, mut inputs: mpsc::Receiver<Input>) {
        let started = Instant::now();
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending: Vec<Vec<Change>> = vec![Vec::new(); self.state.model_count()];
        let mut last_commit = vec![Instant::now(); self.state.model_count()];
        loop {
            tokio::select! {
                input = inputs.recv() => {
                    let Some(input) = input else { return };
                    self.apply(input, &mut pending);
                    let mut burst = 1;
                    while burst < MAX_BURST {
                        match inputs.try_recv() {
                            Ok(input) => self.apply(input, &mut pending),
                            Err(_) => break,
                        }
                        burst += 1;
                    }
                }
                _ = ticker.tick() => {
                    self.tick(&mut pending, started);
                }
            }
            self.commit(&mut pending, &mut last_commit);
        }
    }

    fn apply(&self, input: Input, pending: &mut [Vec<Change>]) {
        let metrics = &self.state.metrics;
        match input {
            Input::Events(batch) => {
                let Some(mut model) = self.state.lock(&batch.model) else {
                    metrics
                        .malformed
                        .get_or_create(&KindLabel { kind: "events" })
                        .inc();
                    return;
                };
                let changes = &mut pending[model.position];
                self.apply_events(&mut model, &batch, changes);
            }
            Input::Worker(info) => {
                let Some(mut model) = self.state.lock(&info.model) else {
                    metrics
                        .malformed
                        .get_or_create(&KindLabel { kind: "workers" })
                        .inc();
                    return;
                };
                let position = model.position;
                self.heartbeat(&mut model, info, &mut pending[position]);
            }
            Input::Load(load) => {
                let Some(mut model) = self.state.lock(&load.model) else {
                    metrics
                        .malformed
                        .get_or_create(&KindLabel { kind: "load" })
                        .inc();
                    return;
                };
                let position = model.position;
                if let Some(meta) = model.workers.get_mut(&load.worker_id) {
                    meta.engine = load;
                    let id = meta.info.worker_id.clone();
                    push_load(&mut model, &id, &mut pending[position]);
                }
            }
            Input::Report { gateway_id, report } => {
                self.report(&gateway_id, report, pending);
            }
            Input::Connected => {
                for index in 0..self.state.model_count() {
                    if let Some(mut model) = self.state.lock_at(index) {
                        for meta in model.workers.values_mut() {
                            meta.tracker.mark_missed();
                            meta.last_sync_request = None;
                        }
                    }
                }
            }
        }
    }

    fn apply_events(
        &self,
        model: &mut ModelState,
        batch: &KvEventBatch,
        changes: &mut Vec<Change>,
    ) {
        let metrics = &self.state.metrics;
        let model_name = model.config.name.clone();
        let count = |kind: &'static str, status: &'static str| {
            metrics
                .events
                .get_or_create(&EventLabel {
                    model: model_name.clone(),
                    r#type: kind,
                    status,
                })
                .inc();
        };
        let Some(meta) = model.workers.get_mut(&batch.worker_id) else {
            // Not registered yet: the blocks cannot be indexed without the
            // worker's address. Its first heartbeat triggers a full state.
            for event in &batch.events {
                count(kind_name(event.kind.as_ref()), "unknown_worker");
            }
            return;
        };
        let worker = batch.worker_id.clone();
        if meta.tracker.begin(batch.epoch) {
            changes.push(cleared(&worker));
        }
        let mut gap = false;
        for event in &batch.events {
            let kind = kind_name(event.kind.as_ref());
            let was_missing = !meta.tracker.in_sync();
            if meta.tracker.accept(event.seq) == Accept::Duplicate {
                count(kind, "duplicate");
                continue;
            }
            gap |= !was_missing && !meta.tracker.in_sync();
            count(kind, "applied");
            match &event.kind {
                None => {}
                Some(Kind::Stored(stored)) => changes.push(Change {
                    kind: Some(change::Kind::Stored(BlocksChanged {
                        worker_id: worker.clone(),
                        hashes: stored.hashes.clone(),
                    })),
                }),
                Some(Kind::Removed(removed)) => changes.push(Change {
                    kind: Some(change::Kind::Removed(BlocksChanged {
                        worker_id: worker.clone(),
                        hashes: removed.hashes.clone(),
                    })),
                }),
                Some(Kind::Cleared(_)) => changes.push(cleared(&worker)),
                Some(Kind::Reset(_)) => {
                    meta.tracker.reset();
                    changes.push(cleared(&worker));
                }
                Some(Kind::FullState(part)) => {
                    if part.part == 0 {
                        changes.push(cleared(&worker));
                    }
                    changes.push(Change {
                        kind: Some(change::Kind::Stored(BlocksChanged {
                            worker_id: worker.clone(),
                            hashes: part.hashes.clone(),
                        })),
                    });
                    meta.tracker.full_state_part(part.part, part.last);
                }
            }
        }
        if gap {
            metrics
                .gaps
                .get_or_create(&ServeMetrics::model(&model_name))
                .inc();
            self.request_sync(&model_name, meta, Instant::now());
        }
    }

    fn heartbeat(&self, model: &mut ModelState, info: WorkerInfo, changes: &mut Vec<Change>) {
        let now = Instant::now();
        let model_name = model.config.name.clone();
        if !self.block_size_agrees(model, &info, changes) {
            return;
        }
        if info.engine_unreachable {
            // The relay lives but its engine does not answer: no gateway may
            // route to it. A heartbeat without the flag registers it again,
            // with a full state sync.
            if model.workers.contains_key(&info.worker_id) {
                tracing::warn!(model = %model_name, worker = %info.worker_id, "the relay cannot reach its engine; removing the worker");
                self.remove_worker(model, &info.worker_id, changes);
                self.state
                    .metrics
                    .workers_unreachable
                    .get_or_create(&ServeMetrics::model(&model_name))
                    .inc();
            }
            return;
        }
        if !model.workers.contains_key(&info.worker_id) {
            if model.workers.len() >= self.limits.max_workers {
                self.state
                    .metrics
                    .workers_refused
                    .get_or_create(&ServeMetrics::model(&model_name))
                    .inc();
                return;
            }
            tracing::info!(model = %model_name, worker = %info.worker_id, address = %info.address, "worker joined");
            changes.push(Change {
                kind: Some(change::Kind::Joined(WorkerJoined {
                    worker_id: info.worker_id.clone(),
                    address: info.address.clone(),
                    role: info.role,
                })),
            });
            model.workers.insert(
                info.worker_id.clone(),
                WorkerMeta {
                    info: info.clone(),
                    last_heartbeat: now,
                    tracker: SeqTracker::default(),
                    previous_heartbeat_seq: 0,
                    last_sync_request: None,
                    engine: WorkerLoad::default(),
                    published_load: LoadReport {
                        worker_id: info.worker_id.clone(),
                        ..LoadReport::default()
                    },
                },
            );
        }
        let Some(meta) = model.workers.get_mut(&info.worker_id) else {
            return;
        };
        if meta.info.address != info.address || meta.info.role != info.role {
            changes.push(Change {
                kind: Some(change::Kind::Joined(WorkerJoined {
                    worker_id: info.worker_id.clone(),
                    address: info.address.clone(),
                    role: info.role,
                })),
            });
        }
        let same_epoch = meta.tracker.epoch() == Some(info.epoch);
        let behind = same_epoch && meta.tracker.last_seq() < meta.previous_heartbeat_seq;
        if !same_epoch || behind || !meta.tracker.in_sync() {
            // Never heard this epoch's events (joined mid-epoch or idle
            // relay), lost its tail, or saw a hole: ask for everything.
            self.request_sync(&model_name, meta, now);
        }
        meta.previous_heartbeat_seq = if same_epoch { info.last_seq } else { 0 };
        meta.last_heartbeat = now;
        meta.info = info;
    }

    /// Drops a worker, its in-flight accounting and its blocks.
    /// False (and the worker out of every view) when the relay hashes blocks
    /// of another size than the model's: every hash it publishes would miss
    /// every hash the filter computes, so routing on it would be silently
    /// wrong. 0 is a relay too old to say.
    fn block_size_agrees(
        &self,
        model: &mut ModelState,
        info: &WorkerInfo,
        changes: &mut Vec<Change>,
    ) -> bool {
        let expected = model.config.block_size;
        if info.block_size == 0 || info.block_size == expected {
            model.mismatched_block_size.remove(&info.worker_id);
            return true;
        }
        let known = model.mismatched_block_size.get(&info.worker_id);
        if known != Some(&info.block_size) {
            tracing::error!(
                model = %model.config.name,
                worker = %info.worker_id,
                relay_block_size = info.block_size,
                model_block_size = expected,
                "refusing a worker whose relay's --block-size differs from the model's block_size: its block hashes cannot match the gateway's"
            );
            self.state
                .metrics
                .workers_block_size_mismatch
                .get_or_create(&ServeMetrics::model(&model.config.name))
                .inc();
            model
                .mismatched_block_size
                .insert(info.worker_id.clone(), info.block_size);
        }
        if model.workers.contains_key(&info.worker_id) {
            self.remove_worker(model, &info.worker_id, changes);
        }
        false
    }

    fn remove_worker(&self, model: &mut ModelState, worker: &str, changes: &mut Vec<Change>) {
        model.workers.remove(worker);
        let dropped = model.inflight.forget_worker(worker);
        if dropped > 0 {
            self.state
                .metrics
                .inflight_dropped
                .get_or_create(&ReasonLabel {
                    reason: "worker_left",
                })
                .inc_by(dropped as u64);
        }
        changes.push(Change {
            kind: Some(change::Kind::Left(WorkerLeft {
                worker_id: worker.to_owned(),
            })),
        });
    }

    fn request_sync(&self, model: &str, meta: &mut WorkerMeta, now: Instant) {
        let retry = Duration::from_millis(self.limits.sync_retry_ms);
        if meta
            .last_sync_request
            .is_some_and(|at| now.duration_since(at) < retry)
        {
            return;
        }
        meta.last_sync_request = Some(now);
        let request = SyncRequest {
            model: model.to_owned(),
            worker_id: meta.info.worker_id.clone(),
        };
        if self.sync_tx.try_send(request).is_ok() {
            self.state
                .metrics
                .sync_requests
                .get_or_create(&ServeMetrics::model(model))
                .inc();
        }
    }

    fn report(&self, gateway_id: &str, report: GatewayReport, pending: &mut [Vec<Change>]) {
        let metrics = &self.state.metrics;
        let (model_name, touched) = match report.kind {
            Some(gateway_report::Kind::Decision(decision)) => {
                metrics
                    .gateway_reports
                    .get_or_create(&KindLabel { kind: "decision" })
                    .inc();
                let Some(mut model) = self.state.lock(&decision.model) else {
                    metrics
                        .malformed
                        .get_or_create(&KindLabel { kind: "report" })
                        .inc();
                    return;
                };
                let limit = self.limits.max_inflight_requests;
                match model
                    .inflight
                    .decide(gateway_id, &decision, limit, Instant::now())
                {
                    Ok(touched) => (decision.model, touched),
                    Err(Dropped::Full) => {
                        metrics
                            .inflight_dropped
                            .get_or_create(&ReasonLabel { reason: "full" })
                            .inc();
                        return;
                    }
                }
            }
            Some(gateway_report::Kind::Progress(progress)) => {
                metrics
                    .gateway_reports
                    .get_or_create(&KindLabel { kind: "progress" })
                    .inc();
                let Some(mut model) = self.state.lock(&progress.model) else {
                    metrics
                        .malformed
                        .get_or_create(&KindLabel { kind: "report" })
                        .inc();
                    return;
                };
                let phase =
                    RequestPhase::try_from(progress.phase).unwrap_or(RequestPhase::Unspecified);
                let touched = model
                    .inflight
                    .progress(gateway_id, &progress.request_id, phase);
                (progress.model, touched)
            }
            Some(gateway_report::Kind::Hello(_)) | None => return,
        };
        if let Some(mut model) = self.state.lock(&model_name) {
            let position = model.position;
            for worker in touched {
                push_load(&mut model, &worker, &mut pending[position]);
            }
        }
    }

    fn tick(&self, pending: &mut [Vec<Change>], started: Instant) {
        let now = Instant::now();
        let timeout = Duration::from_millis(self.limits.worker_timeout_ms);
        let ttl = Duration::from_millis(self.limits.inflight_ttl_ms);
        let mut all_in_sync = true;
        for (index, changes) in pending.iter_mut().enumerate() {
            let Some(mut model) = self.state.lock_at(index) else {
                continue;
            };
            let name = model.config.name.clone();
            let expired: Vec<String> = model
                .workers
                .values()
                .filter(|m| now.duration_since(m.last_heartbeat) > timeout)
                .map(|m| m.info.worker_id.clone())
                .collect();
            for worker in expired {
                tracing::warn!(model = %name, %worker, "worker heartbeats stopped; removing it");
                self.remove_worker(&mut model, &worker, changes);
                self.state
                    .metrics
                    .workers_expired
                    .get_or_create(&ServeMetrics::model(&name))
                    .inc();
            }
            let (count, touched) = model.inflight.expire(ttl, now);
            if count > 0 {
                self.state
                    .metrics
                    .inflight_dropped
                    .get_or_create(&ReasonLabel { reason: "expired" })
                    .inc_by(count as u64);
            }
            for worker in touched {
                push_load(&mut model, &worker, changes);
            }
            all_in_sync &= model.all_in_sync();
        }
        let elapsed = now.duration_since(started);
        let initial = Duration::from_millis(self.limits.initial_sync_timeout_ms);
        if elapsed >= DISCOVERY && (all_in_sync || elapsed >= initial) {
            self.state.ready.store(true, Ordering::Relaxed);
        }
    }

    /// Commits each model's pending changes and fans the delta out.
    fn commit(&self, pending: &mut [Vec<Change>], last_commit: &mut [Instant]) {
        let metrics = &self.state.metrics;
        let now = Instant::now();
        for ((index, changes), last) in pending.iter_mut().enumerate().zip(last_commit.iter_mut()) {
            if changes.is_empty() && now.duration_since(*last) < KEEPALIVE {
                continue;
            }
            *last = now;
            let Some(mut model) = self.state.lock_at(index) else {
                continue;
            };
            let (update, stats) = model.fleet.commit(std::mem::take(changes));
            let label = ServeMetrics::model(model.fleet.model());
            if stats.rejected_blocks > 0 {
                metrics
                    .rejected_blocks
                    .get_or_create(&label)
                    .inc_by(stats.rejected_blocks as u64);
            }
            metrics
                .workers
                .get_or_create(&label)
                .set(model.workers.len() as i64);
            metrics
                .index_entries
                .get_or_create(&label)
                .set(model.fleet.index().entries() as i64);
            metrics
                .index_blocks
                .get_or_create(&label)
                .set(model.fleet.index().blocks() as i64);
            metrics
                .version
                .get_or_create(&label)
                .set(model.fleet.version() as i64);
            metrics
                .inflight
                .get_or_create(&label)
                .set(model.inflight.count() as i64);
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

/// Queues the worker's combined load if it changed since last published.
fn push_load(model: &mut ModelState, worker_id: &str, changes: &mut Vec<Change>) {
    let predicted = model.inflight.load_of(worker_id);
    let Some(meta) = model.workers.get_mut(worker_id) else {
        return;
    };
    let load = LoadReport {
        worker_id: worker_id.to_owned(),
        running: meta.engine.running,
        waiting: meta.engine.waiting,
        kv_usage: meta.engine.kv_usage,
        active_blocks: predicted.active_blocks,
        queued_prefill_tokens: predicted.queued_prefill_tokens,
    };
    if load != meta.published_load {
        meta.published_load = load.clone();
        changes.push(Change {
            kind: Some(change::Kind::Load(load)),
        });
    }
}

fn cleared(worker_id: &str) -> Change {
    Change {
        kind: Some(change::Kind::Cleared(WorkerCleared {
            worker_id: worker_id.to_owned(),
        })),
    }
}

fn kind_name(kind: Option<&Kind>) -> &'static str {
    match kind {
        None => "empty",
        Some(Kind::Stored(_)) => "stored",
        Some(Kind::Removed(_)) => "removed",
        Some(Kind::Cleared(_)) => "cleared",
        Some(Kind::Reset(_)) => "reset",
        Some(Kind::FullState(_)) => "full_state",
    }
}

/// Role names for the HTTP API.
pub fn role_name(role: i32) -> &'static str {
    match WorkerRole::try_from(role).unwrap_or(WorkerRole::Unspecified) {
        WorkerRole::Unspecified => "unspecified",
        WorkerRole::Prefill => "prefill",
        WorkerRole::Decode => "decode",
        WorkerRole::Both => "both",
    }
}
