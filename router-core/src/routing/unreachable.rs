//! Workers this VM just failed to reach. Envoy retries a refused connection
//! on another pool host, so the client never sees the failure; the filter
//! sees that the request was served elsewhere than it chose, and keeps the
//! worker out of its choices for a while, long before the fleet state says
//! the engine is gone. When the hold ends the worker is tried again (a
//! failure then costs one more retry), so an engine that returns is routed
//! to within one hold. A worker that answers with errors (5xx, 429) is left
//! out the same way after [`ERRORS_BEFORE_HOLD`] in a row: one may be the
//! request's fault, not the worker's.

use std::collections::HashMap;

/// How long a worker that refused a connection is left out.
pub const HOLD_MS: u64 = 2_000;
/// Error answers in a row that leave a worker out.
pub const ERRORS_BEFORE_HOLD: u32 = 2;
/// Bound on the workers tracked (a VM never needs more than its pools).
const MAX_TRACKED: usize = 4_096;

#[derive(Debug, Default)]
pub struct Unreachable {
    /// Address → until when it is left out (ms).
    until_ms: HashMap<String, u64>,
    /// Address → error answers since its last success or hold.
    errors: HashMap<String, u32>,
}

impl Unreachable {
    /// The request chosen for `address` was not served by it.
    pub fn mark(&mut self, address: &str, now_ms: u64) {
        if self.until_ms.len() >= MAX_TRACKED {
            self.until_ms.retain(|_, until| *until > now_ms);
        }
        if self.until_ms.len() < MAX_TRACKED {
            self.until_ms.insert(address.to_owned(), now_ms + HOLD_MS);
        }
    }

    /// `address` answered with an error; true when that leaves it out.
    pub fn errored(&mut self, address: &str, now_ms: u64) -> bool {
        if self.errors.len() >= MAX_TRACKED && !self.errors.contains_key(address) {
            self.errors.clear();
        }
        let errors = self.errors.entry(address.to_owned()).or_insert(0);
        *errors += 1;
        if *errors < ERRORS_BEFORE_HOLD {
            return false;
        }
        self.errors.remove(address);
        self.mark(address, now_ms);
        true
    }

    /// `address` served a request: it is reachable again.
    pub fn clear(&mut self, address: &str) {
        self.until_ms.remove(address);
        self.errors.remove(address);
    }

    pub fn is_down(&self, address: &str, now_ms: u64) -> bool {
        self.until_ms
            .get(address)
            .is_some_and(|&until| until > now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marked_worker_is_left_out_for_the_hold_then_tried_again() {
        let mut unreachable = Unreachable::default();
        assert!(!unreachable.is_down("10.0.0.1:8000", 0));
        unreachable.mark("10.0.0.1:8000", 1_000);
        assert!(unreachable.is_down("10.0.0.1:8000", 1_000));
        assert!(unreachable.is_down("10.0.0.1:8000", 1_000 + HOLD_MS - 1));
        assert!(!unreachable.is_down("10.0.0.1:8000", 1_000 + HOLD_MS));
        assert!(!unreachable.is_down("10.0.0.2:8000", 1_000));
        unreachable.mark("10.0.0.1:8000", 5_000);
        unreachable.clear("10.0.0.1:8000");
        assert!(!unreachable.is_down("10.0.0.1:8000", 5_001));
    }

    #[test]
    fn errors_in_a_row_leave_a_worker_out_and_a_success_starts_over() {
        let mut unreachable = Unreachable::default();
        assert!(!unreachable.errored("w", 0));
        unreachable.clear("w");
        assert!(!unreachable.errored("w", 0));
        assert!(!unreachable.is_down("w", 0));
        assert!(unreachable.errored("w", 0));
        assert!(unreachable.is_down("w", 1));
        assert!(!unreachable.is_down("w", HOLD_MS));
        assert!(!unreachable.errored("w", HOLD_MS));
    }

    #[test]
    fn tracking_is_bounded() {
        let mut unreachable = Unreachable::default();
        for i in 0..(MAX_TRACKED as u64 + 10) {
            unreachable.mark(&format!("w{i}"), 0);
        }
        assert!(unreachable.until_ms.len() <= MAX_TRACKED);
        // Expired entries make room.
        unreachable.mark("late", HOLD_MS + 1);
        assert!(unreachable.is_down("late", HOLD_MS + 1));
    }
}
