//! Per-worker sequence tracking of a relay's event stream.
//!
//! Follows exactly the rules of `router_core::protocol::WorkerView` (a new
//! epoch starts over, redelivered seqs are skipped, a hole makes the view
//! approximate until a reset or a complete full state), but keeps no block
//! set of its own: the blocks live once, in the model's `FleetView` index,
//! which is what bounds the sidecar's memory.

/// What to do with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    Apply,
    /// Already applied (redelivery or a replayed older batch).
    Duplicate,
}

#[derive(Debug, Default, Clone)]
pub struct SeqTracker {
    epoch: Option<u64>,
    next_seq: u64,
    missed: bool,
    snapshot_in_progress: bool,
}

impl SeqTracker {
    /// Starts a batch of `epoch`; true when it is a new epoch, whose events
    /// replace everything known about the worker.
    pub fn begin(&mut self, epoch: u64) -> bool {
        if self.epoch == Some(epoch) {
            return false;
        }
        *self = Self {
            epoch: Some(epoch),
            next_seq: 1,
            ..Self::default()
        };
        true
    }

    /// Decides on one event; a skipped seq marks the view approximate.
    pub fn accept(&mut self, seq: u64) -> Accept {
        if seq < self.next_seq {
            return Accept::Duplicate;
        }
        if seq > self.next_seq {
            self.missed = true;
        }
        self.next_seq = seq.saturating_add(1);
        Accept::Apply
    }

    /// A reset: empty is now the exact state.
    pub fn reset(&mut self) {
        self.missed = false;
        self.snapshot_in_progress = false;
    }

    /// One part of a full state was applied.
    pub fn full_state_part(&mut self, part: u32, last: bool) {
        if part == 0 {
            self.missed = false;
            self.snapshot_in_progress = true;
        }
        if last && !self.missed {
            self.snapshot_in_progress = false;
        }
    }

    /// Marks the view approximate, e.g. after our own NATS connection dropped.
    pub fn mark_missed(&mut self) {
        self.missed = true;
    }

    pub fn epoch(&self) -> Option<u64> {
        self.epoch
    }

    pub fn last_seq(&self) -> u64 {
        self.next_seq.saturating_sub(1)
    }

    pub fn in_sync(&self) -> bool {
        self.epoch.is_some() && !self.missed && !self.snapshot_in_progress
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gap_needs_a_complete_full_state() {
        let mut t = SeqTracker::default();
        assert!(!t.in_sync());
        assert!(t.begin(7));
        assert_eq!(t.accept(1), Accept::Apply);
        assert!(t.in_sync());
        assert_eq!(t.accept(1), Accept::Duplicate);
        assert_eq!(t.accept(3), Accept::Apply);
        assert!(!t.in_sync());
        t.full_state_part(0, false);
        assert!(!t.in_sync());
        t.full_state_part(1, true);
        assert!(t.in_sync());
        assert_eq!(t.last_seq(), 3);
        assert!(!t.begin(7));
        assert!(t.begin(8));
        assert_eq!(t.last_seq(), 0);
    }
}
