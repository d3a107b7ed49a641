//! How many request bytes `/v1/tokenize` works on at once. Tokenizing takes
//! ~300× the text in memory (the tokenizer's pre-tokens and encoding: a
//! 3.5 MiB chat takes +1 GB, a 7 MiB one +2 GB; parsing and rendering add
//! less), so a burst of large bodies, which the filter sends for every text
//! and chat request, could take the sidecar's memory.
//! A body past the budget is refused at once: the filter then routes that
//! request approximately, and it would have given up on a queued one anyway.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Clone)]
pub struct TokenizeBudget {
    bytes: Arc<Semaphore>,
}

/// The budget was spent on other bodies.
#[derive(Debug, PartialEq, Eq)]
pub struct Busy;

impl TokenizeBudget {
    pub fn new(max_inflight_bytes: usize) -> Self {
        Self {
            bytes: Arc::new(Semaphore::new(
                max_inflight_bytes.min(Semaphore::MAX_PERMITS),
            )),
        }
    }

    /// Reserves a body's bytes (at least one) until the permit drops.
    pub fn admit(&self, body_bytes: usize) -> Result<OwnedSemaphorePermit, Busy> {
        let bytes = u32::try_from(body_bytes.max(1)).map_err(|_| Busy)?;
        Arc::clone(&self.bytes)
            .try_acquire_many_owned(bytes)
            .map_err(|_| Busy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_admitted_while_their_bytes_fit() {
        let budget = TokenizeBudget::new(100);
        let first = budget.admit(60).unwrap();
        assert_eq!(budget.admit(50).unwrap_err(), Busy);
        let empty = budget.admit(0).unwrap();
        drop(first);
        let second = budget.admit(50).unwrap();
        assert_eq!(budget.admit(50).unwrap_err(), Busy, "49 left");
        drop((empty, second));
        assert!(budget.admit(100).is_ok());
        assert_eq!(budget.admit(101).unwrap_err(), Busy);
    }
}
