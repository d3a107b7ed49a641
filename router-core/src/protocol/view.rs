//! Subscriber side of the events stream: rebuilds one worker's exact block set
//! from [`KvEventBatch`]es and says when it cannot be trusted.

use std::collections::HashSet;

use super::{kv_event::Kind, KvEventBatch};

/// Whether the view equals the relay's knowledge after applying a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Every event up to the newest one was seen: the view is exact.
    InSync,
    /// Events were missed (gap in seq, or joined mid-epoch) or a snapshot is
    /// half applied: the view is approximate until a full state completes.
    /// Subscribers should ask for one on the sync subject.
    NeedsSync,
}

/// One worker's cache as seen through its relay's events.
#[derive(Debug, Default, Clone)]
pub struct WorkerView {
    epoch: Option<u64>,
    next_seq: u64,
    blocks: HashSet<u64>,
    missed_events: bool,
    snapshot_in_progress: bool,
}

impl WorkerView {
    pub fn new() -> Self {
        Self::default()
    }

    /// Seq hashes currently cached on the worker.
    pub fn blocks(&self) -> &HashSet<u64> {
        &self.blocks
    }

    pub fn epoch(&self) -> Option<u64> {
        self.epoch
    }

    /// Seq of the newest event applied (0 before any).
    pub fn last_seq(&self) -> u64 {
        self.next_seq.saturating_sub(1)
    }

    pub fn outcome(&self) -> ApplyOutcome {
        if self.epoch.is_some() && !self.missed_events && !self.snapshot_in_progress {
            ApplyOutcome::InSync
        } else {
            ApplyOutcome::NeedsSync
        }
    }

    /// Applies a batch; events already applied are skipped, so redelivery is
    /// harmless.
    pub fn apply(&mut self, batch: &KvEventBatch) -> ApplyOutcome {
        if self.epoch != Some(batch.epoch) {
            // A new relay incarnation numbers from 1 again and starts with a
            // reset; whatever the old one said no longer holds.
            self.epoch = Some(batch.epoch);
            self.next_seq = 1;
            self.blocks.clear();
            self.missed_events = false;
            self.snapshot_in_progress = false;
        }
        for event in &batch.events {
            if event.seq < self.next_seq {
                continue;
            }
            if event.seq > self.next_seq {
                self.missed_events = true;
            }
            self.next_seq = event.seq.saturating_add(1);
            let Some(kind) = &event.kind else { continue };
            match kind {
                Kind::Stored(stored) => self.blocks.extend(stored.hashes.iter().copied()),
                Kind::Removed(removed) => {
                    for hash in &removed.hashes {
                        self.blocks.remove(hash);
                    }
                }
                Kind::Cleared(_) => self.blocks.clear(),
                Kind::Reset(_) => {
                    // Empty is the relay's exact knowledge after a reset.
                    self.blocks.clear();
                    self.missed_events = false;
                    self.snapshot_in_progress = false;
                }
                Kind::FullState(part) => {
                    if part.part == 0 {
                        self.blocks.clear();
                        self.missed_events = false;
                        self.snapshot_in_progress = true;
                    }
                    self.blocks.extend(part.hashes.iter().copied());
                    if part.last && !self.missed_events {
                        self.snapshot_in_progress = false;
                    }
                }
            }
        }
        self.outcome()
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;

    fn batch(epoch: u64, events: Vec<(u64, Kind)>) -> KvEventBatch {
        KvEventBatch {
            worker_id: "w".into(),
            model: "m".into(),
            epoch,
            events: events
                .into_iter()
                .map(|(seq, kind)| KvEvent {
                    seq,
                    kind: Some(kind),
                })
                .collect(),
            timestamp_ms: 0,
        }
    }

    fn stored(hashes: &[u64]) -> Kind {
        Kind::Stored(BlocksStored {
            parent: None,
            hashes: hashes.to_vec(),
        })
    }

    fn full(part: u32, last: bool, hashes: &[u64]) -> Kind {
        Kind::FullState(FullState {
            part,
            last,
            hashes: hashes.to_vec(),
        })
    }

    #[test]
    fn applies_in_order_and_skips_duplicates() {
        let mut view = WorkerView::new();
        let reset = Kind::Reset(WorkerReset { reason: 1 });
        assert_eq!(
            view.apply(&batch(1, vec![(1, reset), (2, stored(&[1, 2, 3]))])),
            ApplyOutcome::InSync
        );
        let removed = Kind::Removed(BlocksRemoved { hashes: vec![2] });
        assert_eq!(
            view.apply(&batch(1, vec![(3, removed)])),
            ApplyOutcome::InSync
        );
        // Redelivered old batch changes nothing.
        assert_eq!(
            view.apply(&batch(1, vec![(2, stored(&[1, 2, 3]))])),
            ApplyOutcome::InSync
        );
        assert_eq!(view.blocks(), &HashSet::from([1, 3]));
        assert_eq!(view.last_seq(), 3);
    }

    #[test]
    fn gap_needs_sync_until_a_full_state_completes() {
        let mut view = WorkerView::new();
        view.apply(&batch(1, vec![(1, stored(&[1]))]));
        assert_eq!(
            view.apply(&batch(1, vec![(3, stored(&[9]))])),
            ApplyOutcome::NeedsSync
        );
        assert_eq!(
            view.apply(&batch(1, vec![(4, full(0, false, &[5]))])),
            ApplyOutcome::NeedsSync
        );
        assert_eq!(
            view.apply(&batch(1, vec![(5, full(1, true, &[6]))])),
            ApplyOutcome::InSync
        );
        assert_eq!(view.blocks(), &HashSet::from([5, 6]));
    }

    #[test]
    fn joining_mid_epoch_needs_sync_and_new_epoch_starts_over() {
        let mut view = WorkerView::new();
        assert_eq!(
            view.apply(&batch(1, vec![(10, stored(&[1]))])),
            ApplyOutcome::NeedsSync
        );
        let reset = Kind::Reset(WorkerReset { reason: 1 });
        assert_eq!(
            view.apply(&batch(2, vec![(1, reset), (2, stored(&[7]))])),
            ApplyOutcome::InSync
        );
        assert_eq!(view.blocks(), &HashSet::from([7]));
    }
}
