//! Load this VM has sent to each worker and not yet seen finish: added at
//! routing, the prefill part removed at the first response byte, the rest
//! when the stream ends. It covers the gap until the engines' own metrics and
//! the sidecar's aggregate catch up, which is what stops a burst of requests
//! with a shared prefix from all landing on one worker.

use std::collections::HashMap;

use router_core::selection::WorkerLoad;

#[derive(Debug, Default)]
pub struct InFlight {
    by_address: HashMap<String, WorkerLoad>,
}

/// One routed request's contribution, returned by [`InFlight::admit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    address: String,
    prefill_tokens: u64,
    blocks: u64,
    prefill_pending: bool,
}

impl Ticket {
    /// The worker the request was sent to.
    pub fn address(&self) -> &str {
        &self.address
    }
}

impl InFlight {
    pub fn admit(&mut self, address: &str, prefill_tokens: u64, blocks: u64) -> Ticket {
        let load = self.by_address.entry(address.to_owned()).or_default();
        load.queued_prefill_tokens += prefill_tokens;
        load.active_blocks += blocks;
        Ticket {
            address: address.to_owned(),
            prefill_tokens,
            blocks,
            prefill_pending: true,
        }
    }

    /// The first response byte arrived: the prompt is prefilled.
    pub fn prefill_done(&mut self, ticket: &mut Ticket) {
        if !ticket.prefill_pending {
            return;
        }
        ticket.prefill_pending = false;
        if let Some(load) = self.by_address.get_mut(&ticket.address) {
            load.queued_prefill_tokens = load
                .queued_prefill_tokens
                .saturating_sub(ticket.prefill_tokens);
        }
    }

    /// The stream ended (completed, failed or reset).
    pub fn finish(&mut self, mut ticket: Ticket) {
        self.prefill_done(&mut ticket);
        if let Some(load) = self.by_address.get_mut(&ticket.address) {
            load.active_blocks = load.active_blocks.saturating_sub(ticket.blocks);
            if *load == WorkerLoad::default() {
                self.by_address.remove(&ticket.address);
            }
        }
    }

    pub fn load(&self, address: &str) -> WorkerLoad {
        self.by_address.get(address).copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_returns_to_zero() {
        let mut inflight = InFlight::default();
        let mut a = inflight.admit("w:1", 320, 30);
        let b = inflight.admit("w:1", 16, 5);
        assert_eq!(
            inflight.load("w:1"),
            WorkerLoad {
                active_blocks: 35,
                queued_prefill_tokens: 336
            }
        );
        inflight.prefill_done(&mut a);
        inflight.prefill_done(&mut a);
        assert_eq!(inflight.load("w:1").queued_prefill_tokens, 16);
        inflight.finish(a);
        inflight.finish(b);
        assert_eq!(inflight.load("w:1"), WorkerLoad::default());
        assert!(inflight.by_address.is_empty());
    }
}
