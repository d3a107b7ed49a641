//! One model's fleet as a router sees it: registered workers, their KV blocks
//! (a [`PrefixIndex`]) and their load, kept in step with the state stream.
//!
//! The sidecar keeps the authoritative copy and emits [`StateUpdate`]s; every
//! filter VM keeps a replica by applying them. Both sides run this code, so a
//! replica built from a snapshot plus the deltas after it equals the source.

use std::collections::HashMap;

use thiserror::Error;

use crate::hashing::SeqHash;
use crate::index::{Overlap, OverlapScratch, PrefixIndex, StoreOutcome, WorkerSlot};
use crate::state_stream::{
    change, state_update, Change, Delta, LoadReport, Snapshot, StateUpdate, WorkerRole,
    WorkerSnapshot,
};
use crate::target::Target;

#[derive(Debug, Clone, PartialEq)]
pub struct WorkerEntry {
    pub slot: WorkerSlot,
    pub worker_id: String,
    /// `ip:port` as Envoy's pool cluster knows the worker, and its rank
    /// there when the engine runs several data-parallel ranks.
    pub target: Target,
    pub role: WorkerRole,
    pub load: LoadReport,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ApplyError {
    #[error("update for model '{got}' applied to the view of '{expected}'")]
    WrongModel { expected: String, got: String },
    #[error("delta to version {got} does not follow version {have}; a fresh snapshot is needed")]
    VersionGap { have: u64, got: u64 },
    #[error("update carries neither a snapshot nor a delta")]
    Empty,
    #[error("snapshot chunk of version {got} continues nothing (view is at {have}); a fresh snapshot is needed")]
    OrphanChunk { have: u64, got: u64 },
}

/// What applying one update did, for counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub changes: usize,
    /// Changes naming a worker the view does not know (counted, skipped).
    pub unknown_worker: usize,
    /// Blocks not indexed because the index is full.
    pub rejected_blocks: usize,
}

#[derive(Debug, Clone)]
pub struct FleetView {
    model: String,
    version: u64,
    workers: HashMap<String, WorkerEntry>,
    /// slot → worker id; freed slots are reused to keep slots dense.
    slots: Vec<Option<String>>,
    index: PrefixIndex,
    max_entries: usize,
}

impl FleetView {
    pub fn new(model: &str, max_entries: usize) -> Self {
        Self {
            model: model.to_owned(),
            version: 0,
            workers: HashMap::new(),
            slots: Vec::new(),
            index: PrefixIndex::new(max_entries),
            max_entries,
        }
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn index(&self) -> &PrefixIndex {
        &self.index
    }

    pub fn worker(&self, worker_id: &str) -> Option<&WorkerEntry> {
        self.workers.get(worker_id)
    }

    pub fn worker_at(&self, slot: WorkerSlot) -> Option<&WorkerEntry> {
        let id = self.slots.get(slot.0 as usize)?.as_ref()?;
        self.workers.get(id)
    }

    pub fn workers(&self) -> impl Iterator<Item = &WorkerEntry> {
        self.workers.values()
    }

    /// Per-worker cached prefix of a prompt.
    pub fn overlaps<'s>(
        &self,
        prompt: &[SeqHash],
        scratch: &'s mut OverlapScratch,
    ) -> &'s [Overlap] {
        self.index.overlaps_into(prompt, scratch)
    }

    /// Applies one update from the state stream.
    pub fn apply(&mut self, update: &StateUpdate) -> Result<ApplyStats, ApplyError> {
        if update.model != self.model {
            return Err(ApplyError::WrongModel {
                expected: self.model.clone(),
                got: update.model.clone(),
            });
        }
        let stats = match &update.kind {
            None => return Err(ApplyError::Empty),
            Some(state_update::Kind::Snapshot(snapshot)) => {
                if snapshot.continues && update.version != self.version {
                    return Err(ApplyError::OrphanChunk {
                        have: self.version,
                        got: update.version,
                    });
                }
                self.load_snapshot(snapshot)
            }
            Some(state_update::Kind::Delta(delta)) => {
                if update.version != self.version + 1 {
                    return Err(ApplyError::VersionGap {
                        have: self.version,
                        got: update.version,
                    });
                }
                self.apply_delta(delta)
            }
        };
        self.version = update.version;
        Ok(stats)
    }

    /// Applies changes made locally (the authoritative side) and returns the
    /// update that replicas must apply to follow.
    pub fn commit(&mut self, changes: Vec<Change>) -> (StateUpdate, ApplyStats) {
        let delta = Delta { changes };
        let stats = self.apply_delta(&delta);
        self.version += 1;
        let update = StateUpdate {
            model: self.model.clone(),
            version: self.version,
            kind: Some(state_update::Kind::Delta(delta)),
            fleet_unheard: false,
        };
        (update, stats)
    }

    /// The whole view as one update, workers and blocks sorted so equal views
    /// give equal snapshots.
    pub fn snapshot(&self) -> StateUpdate {
        let mut workers: Vec<WorkerSnapshot> = self
            .workers
            .values()
            .map(|w| {
                let mut blocks: Vec<u64> = self.index.worker_blocks(w.slot).map(|h| h.0).collect();
                blocks.sort_unstable();
                WorkerSnapshot {
                    worker_id: w.worker_id.clone(),
                    address: w.target.address().to_owned(),
                    role: w.role as i32,
                    blocks,
                    load: Some(w.load.clone()),
                    data_parallel_rank: w.target.data_parallel_rank(),
                }
            })
            .collect();
        workers.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        StateUpdate {
            model: self.model.clone(),
            version: self.version,
            kind: Some(state_update::Kind::Snapshot(Snapshot {
                workers,
                continues: false,
            })),
            fleet_unheard: false,
        }
    }

    fn load_snapshot(&mut self, snapshot: &Snapshot) -> ApplyStats {
        if !snapshot.continues {
            self.workers.clear();
            self.slots.clear();
            self.index = PrefixIndex::new(self.max_entries);
        }
        let mut stats = ApplyStats::default();
        for worker in &snapshot.workers {
            let role = WorkerRole::try_from(worker.role).unwrap_or(WorkerRole::Unspecified);
            let target = Target::new(&*worker.address, worker.data_parallel_rank);
            let slot = self.join(&worker.worker_id, target, role);
            if let Some(load) = &worker.load {
                self.set_load(load);
            }
            let hashes: Vec<SeqHash> = worker.blocks.iter().copied().map(SeqHash).collect();
            stats.rejected_blocks += self.index.store(slot, &hashes).rejected;
            stats.changes += 1;
        }
        stats
    }

    fn apply_delta(&mut self, delta: &Delta) -> ApplyStats {
        let mut stats = ApplyStats::default();
        for change in &delta.changes {
            stats.changes += 1;
            let known = match &change.kind {
                None => true,
                Some(change::Kind::Joined(j)) => {
                    let role = WorkerRole::try_from(j.role).unwrap_or(WorkerRole::Unspecified);
                    self.join(
                        &j.worker_id,
                        Target::new(&*j.address, j.data_parallel_rank),
                        role,
                    );
                    true
                }
                Some(change::Kind::Left(l)) => self.leave(&l.worker_id),
                Some(change::Kind::Stored(s)) => match self.slot_of(&s.worker_id) {
                    Some(slot) => {
                        let hashes: Vec<SeqHash> = s.hashes.iter().copied().map(SeqHash).collect();
                        let StoreOutcome { rejected, .. } = self.index.store(slot, &hashes);
                        stats.rejected_blocks += rejected;
                        true
                    }
                    None => false,
                },
                Some(change::Kind::Removed(r)) => match self.slot_of(&r.worker_id) {
                    Some(slot) => {
                        let hashes: Vec<SeqHash> = r.hashes.iter().copied().map(SeqHash).collect();
                        self.index.remove(slot, &hashes);
                        true
                    }
                    None => false,
                },
                Some(change::Kind::Cleared(c)) => match self.slot_of(&c.worker_id) {
                    Some(slot) => {
                        self.index.clear_worker(slot);
                        true
                    }
                    None => false,
                },
                Some(change::Kind::Load(load)) => self.set_load(load),
                // Not fleet state: routers credit it on their own
                // (`routing::computing`).
                Some(change::Kind::Computing(c)) => self.workers.contains_key(&c.worker_id),
            };
            if !known {
                stats.unknown_worker += 1;
            }
        }
        stats
    }

    fn slot_of(&self, worker_id: &str) -> Option<WorkerSlot> {
        self.workers.get(worker_id).map(|w| w.slot)
    }

    /// Registers a worker (or updates its target and role); returns its slot.
    fn join(&mut self, worker_id: &str, target: Target, role: WorkerRole) -> WorkerSlot {
        if let Some(entry) = self.workers.get_mut(worker_id) {
            entry.target = target;
            entry.role = role;
            return entry.slot;
        }
        let free = self.slots.iter().position(Option::is_none);
        let slot = match free {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        self.slots[slot] = Some(worker_id.to_owned());
        let slot = WorkerSlot(slot as u32);
        self.workers.insert(
            worker_id.to_owned(),
            WorkerEntry {
                slot,
                worker_id: worker_id.to_owned(),
                target,
                role,
                load: LoadReport {
                    worker_id: worker_id.to_owned(),
                    ..LoadReport::default()
                },
            },
        );
        slot
    }

    fn leave(&mut self, worker_id: &str) -> bool {
        let Some(entry) = self.workers.remove(worker_id) else {
            return false;
        };
        self.index.clear_worker(entry.slot);
        if let Some(slot) = self.slots.get_mut(entry.slot.0 as usize) {
            *slot = None;
        }
        true
    }

    fn set_load(&mut self, load: &LoadReport) -> bool {
        match self.workers.get_mut(&load.worker_id) {
            Some(entry) => {
                entry.load = load.clone();
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state_stream::{
        split_snapshot, BlocksChanged, WorkerCleared, WorkerJoined, WorkerLeft,
    };
    use proptest::prelude::*;
    use prost::Message;

    fn joined(id: &str) -> Change {
        Change {
            kind: Some(change::Kind::Joined(WorkerJoined {
                worker_id: id.into(),
                address: format!("127.0.0.1:{}", 8000 + id.len()),
                role: WorkerRole::Decode as i32,
                data_parallel_rank: None,
            })),
        }
    }

    fn blocks(id: &str, hashes: &[u64], stored: bool) -> Change {
        let changed = BlocksChanged {
            worker_id: id.into(),
            hashes: hashes.to_vec(),
        };
        Change {
            kind: Some(if stored {
                change::Kind::Stored(changed)
            } else {
                change::Kind::Removed(changed)
            }),
        }
    }

    #[test]
    fn replica_follows_source_and_rejects_gaps() {
        let mut source = FleetView::new("m", 1000);
        let mut replica = FleetView::new("m", 1000);
        replica.apply(&source.snapshot()).unwrap();
        let (u1, _) = source.commit(vec![joined("a"), blocks("a", &[1, 2, 3], true)]);
        let (u2, _) = source.commit(vec![blocks("a", &[3], false)]);
        replica.apply(&u1).unwrap();
        assert_eq!(
            replica.apply(&u1),
            Err(ApplyError::VersionGap { have: 1, got: 1 })
        );
        replica.apply(&u2).unwrap();
        assert_eq!(replica.snapshot(), source.snapshot());
        let slot = replica.worker("a").unwrap().slot;
        assert_eq!(replica.index().blocks_of(slot), 2);
    }

    #[test]
    fn unknown_workers_are_counted_not_fatal_and_leaving_frees_blocks() {
        let mut view = FleetView::new("m", 1000);
        let (_, stats) = view.commit(vec![blocks("ghost", &[1], true), joined("a")]);
        assert_eq!(stats.unknown_worker, 1);
        view.commit(vec![blocks("a", &[1, 2], true)]);
        assert_eq!(view.index().entries(), 2);
        view.commit(vec![Change {
            kind: Some(change::Kind::Left(WorkerLeft {
                worker_id: "a".into(),
            })),
        }]);
        assert_eq!(view.index().entries(), 0);
        assert!(view.worker("a").is_none());
        // The freed slot is reused.
        view.commit(vec![joined("b")]);
        assert_eq!(view.worker("b").unwrap().slot, WorkerSlot(0));
    }

    #[test]
    fn wrong_model_is_rejected() {
        let mut view = FleetView::new("m", 10);
        let other = FleetView::new("x", 10).snapshot();
        assert!(matches!(
            view.apply(&other),
            Err(ApplyError::WrongModel { .. })
        ));
    }

    fn arbitrary_change() -> impl Strategy<Value = Change> {
        let id = prop_oneof![Just("a"), Just("b"), Just("c")];
        let hashes = proptest::collection::vec(0u64..20, 0..5);
        (0u8..6, id, hashes, 0u32..9).prop_map(|(op, id, hashes, n)| match op {
            0 => joined(id),
            1 => Change {
                kind: Some(change::Kind::Left(WorkerLeft {
                    worker_id: id.into(),
                })),
            },
            2 => blocks(id, &hashes, true),
            3 => blocks(id, &hashes, false),
            4 => Change {
                kind: Some(change::Kind::Cleared(WorkerCleared {
                    worker_id: id.into(),
                })),
            },
            _ => Change {
                kind: Some(change::Kind::Load(LoadReport {
                    worker_id: id.into(),
                    running: n,
                    waiting: n / 2,
                    kv_usage: f64::from(n) / 10.0,
                    active_blocks: u64::from(n) * 3,
                    queued_prefill_tokens: u64::from(n) * 16,
                    routed_requests: n,
                })),
            },
        })
    }

    proptest! {
        /// Bytes off the wire never panic the decoder or the replica.
        #[test]
        fn arbitrary_stream_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut view = FleetView::new("m", 100);
            if let Ok(update) = StateUpdate::decode(bytes.as_slice()) {
                let _ = view.apply(&update);
            }
        }

        /// Snapshot N plus the deltas after it equals snapshot M, also after a
        /// round trip through the protobuf encoding.
        #[test]
        fn snapshot_plus_deltas_equals_later_snapshot(
            batches in proptest::collection::vec(proptest::collection::vec(arbitrary_change(), 0..6), 1..20),
            cut in 0usize..20,
        ) {
            let total = batches.len();
            let cut = cut.min(total);
            let mut source = FleetView::new("m", usize::MAX);
            let mut snapshot_n = source.snapshot();
            let mut deltas = Vec::new();
            for (i, batch) in batches.into_iter().enumerate() {
                if i == cut {
                    snapshot_n = source.snapshot();
                }
                let (update, _) = source.commit(batch);
                if i >= cut {
                    deltas.push(update);
                }
            }
            if cut == total {
                snapshot_n = source.snapshot();
            }
            let mut replica = FleetView::new("m", usize::MAX);
            let wire = StateUpdate::decode(snapshot_n.encode_to_vec().as_slice()).unwrap();
            replica.apply(&wire).unwrap();
            for delta in &deltas {
                let wire = StateUpdate::decode(delta.encode_to_vec().as_slice()).unwrap();
                replica.apply(&wire).unwrap();
            }
            prop_assert_eq!(replica.snapshot(), source.snapshot());
        }

        /// A snapshot sent in chunks builds the same view as sent whole, over
        /// whatever the replica held before; a chunk that continues nothing
        /// is refused.
        #[test]
        fn chunked_snapshot_equals_whole(
            batch in proptest::collection::vec(arbitrary_change(), 0..30),
            before in proptest::collection::vec(arbitrary_change(), 0..10),
            max_blocks in 1usize..8,
        ) {
            let mut source = FleetView::new("m", usize::MAX);
            source.commit(batch);
            source.commit(Vec::new());
            let chunks = split_snapshot(source.snapshot(), max_blocks);
            prop_assert!(!chunks.is_empty());
            for chunk in &chunks {
                if let Some(state_update::Kind::Snapshot(s)) = &chunk.kind {
                    let blocks: usize = s.workers.iter().map(|w| w.blocks.len()).sum();
                    prop_assert!(blocks <= max_blocks);
                }
            }
            let mut replica = FleetView::new("m", usize::MAX);
            replica.commit(before);
            for chunk in &chunks {
                let wire = StateUpdate::decode(chunk.encode_to_vec().as_slice()).unwrap();
                replica.apply(&wire).unwrap();
            }
            prop_assert_eq!(replica.snapshot(), source.snapshot());
            if let Some(continued) = chunks.get(1) {
                let mut fresh = FleetView::new("m", usize::MAX);
                prop_assert_eq!(
                    fresh.apply(continued),
                    Err(ApplyError::OrphanChunk { have: 0, got: 2 })
                );
            }
        }
    }
}
