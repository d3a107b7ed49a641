//! Load sent to each worker and not yet seen finish: added when a request is
//! routed, its prefill part removed at the first response byte (or when its
//! prefill worker is done), the rest when the stream ends. It covers the gap
//! until the engines' own metrics catch up, which is what stops a burst of
//! requests with a shared prefix from all landing on one worker.
//!
//! One ledger serves both sides: a filter VM keys it by the worker it routed
//! to ([`Target::key`](crate::Target::key): its address, with its
//! data-parallel rank if it has one), the sidecar by the worker ids gateways
//! report their decisions for.

use std::collections::HashMap;

use crate::routing::select::WorkerLoad;

#[derive(Debug, Default)]
pub struct InFlight {
    by_worker: HashMap<String, Account>,
}

/// One worker's part of the ledger.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Account {
    load: WorkerLoad,
    /// Requests on the worker as its engine counts them (running or
    /// waiting): those decoding there, and those it prefills for another.
    requests: u32,
}

/// One routed request's contribution, returned by [`InFlight::admit`]; give
/// it back to [`InFlight::finish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    decode: String,
    /// The worker computing the prompt: `decode` unless prefilled remotely.
    prefill: String,
    prefill_tokens: u64,
    blocks: u64,
    prefill_pending: bool,
}

/// Where a request runs and what it costs there.
#[derive(Debug, Clone, Copy)]
pub struct RequestLoad<'a> {
    /// The worker holding the request's KV blocks while it decodes.
    pub decode: &'a str,
    /// The worker prefilling the prompt, when not `decode`.
    pub prefill: Option<&'a str>,
    /// Prompt tokens still to be computed.
    pub prefill_tokens: u64,
    /// KV blocks the request holds while it runs.
    pub blocks: u64,
}

impl Ticket {
    /// The workers whose load this ticket changes.
    pub fn workers(&self) -> impl Iterator<Item = &str> {
        let prefill = (self.prefill != self.decode).then_some(self.prefill.as_str());
        std::iter::once(self.decode.as_str()).chain(prefill)
    }

    /// Whether the ticket counts load on `worker`.
    pub fn involves(&self, worker: &str) -> bool {
        self.decode == worker || self.prefill == worker
    }
}

impl InFlight {
    pub fn admit(&mut self, request: RequestLoad<'_>) -> Ticket {
        let prefill = request.prefill.unwrap_or(request.decode);
        let decode = self.by_worker.entry(request.decode.to_owned()).or_default();
        decode.load.active_blocks = decode.load.active_blocks.saturating_add(request.blocks);
        decode.requests = decode.requests.saturating_add(1);
        let prefilling = self.by_worker.entry(prefill.to_owned()).or_default();
        prefilling.load.queued_prefill_tokens = prefilling
            .load
            .queued_prefill_tokens
            .saturating_add(request.prefill_tokens);
        if prefill != request.decode {
            prefilling.requests = prefilling.requests.saturating_add(1);
        }
        Ticket {
            decode: request.decode.to_owned(),
            prefill: prefill.to_owned(),
            prefill_tokens: request.prefill_tokens,
            blocks: request.blocks,
            prefill_pending: true,
        }
    }

    /// The prompt is prefilled (the first response byte arrived).
    pub fn prefill_done(&mut self, ticket: &mut Ticket) {
        if !ticket.prefill_pending {
            return;
        }
        ticket.prefill_pending = false;
        let remote = ticket.prefill != ticket.decode;
        if let Some(account) = self.by_worker.get_mut(&ticket.prefill) {
            account.load.queued_prefill_tokens = account
                .load
                .queued_prefill_tokens
                .saturating_sub(ticket.prefill_tokens);
            if remote {
                account.requests = account.requests.saturating_sub(1);
            }
        }
        self.drop_if_idle(&ticket.prefill);
    }

    /// The stream ended (completed, failed or reset).
    pub fn finish(&mut self, mut ticket: Ticket) {
        self.prefill_done(&mut ticket);
        if let Some(account) = self.by_worker.get_mut(&ticket.decode) {
            account.load.active_blocks = account.load.active_blocks.saturating_sub(ticket.blocks);
            account.requests = account.requests.saturating_sub(1);
        }
        self.drop_if_idle(&ticket.decode);
    }

    /// Forgets a worker's load (it left, and its requests died with it).
    pub fn forget(&mut self, worker: &str) {
        self.by_worker.remove(worker);
    }

    pub fn load(&self, worker: &str) -> WorkerLoad {
        self.by_worker
            .get(worker)
            .map(|account| account.load)
            .unwrap_or_default()
    }

    /// Requests the ledger holds on `worker`, as its engine would count them.
    pub fn requests(&self, worker: &str) -> u32 {
        self.by_worker
            .get(worker)
            .map_or(0, |account| account.requests)
    }

    fn drop_if_idle(&mut self, worker: &str) {
        if self.by_worker.get(worker) == Some(&Account::default()) {
            self.by_worker.remove(worker);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local<'a>(worker: &'a str, prefill_tokens: u64, blocks: u64) -> RequestLoad<'a> {
        RequestLoad {
            decode: worker,
            prefill: None,
            prefill_tokens,
            blocks,
        }
    }

    #[test]
    fn lifecycle_returns_to_zero() {
        let mut inflight = InFlight::default();
        let mut a = inflight.admit(local("w:1", 320, 30));
        let b = inflight.admit(local("w:1", 16, 5));
        assert_eq!(inflight.requests("w:1"), 2);
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
        assert_eq!(inflight.requests("w:1"), 1);
        inflight.finish(b);
        assert_eq!(inflight.load("w:1"), WorkerLoad::default());
        assert!(inflight.by_worker.is_empty());
    }

    #[test]
    fn a_remote_prefill_queues_on_the_prefill_worker() {
        let mut inflight = InFlight::default();
        let mut ticket = inflight.admit(RequestLoad {
            decode: "d",
            prefill: Some("p"),
            prefill_tokens: 4096,
            blocks: 260,
        });
        assert_eq!(ticket.workers().collect::<Vec<_>>(), ["d", "p"]);
        assert!(ticket.involves("p") && !ticket.involves("x"));
        assert_eq!(inflight.load("d").queued_prefill_tokens, 0);
        assert_eq!(inflight.load("d").active_blocks, 260);
        assert_eq!(inflight.load("p").queued_prefill_tokens, 4096);
        assert_eq!(inflight.load("p").active_blocks, 0);
        assert_eq!((inflight.requests("d"), inflight.requests("p")), (1, 1));
        inflight.prefill_done(&mut ticket);
        assert_eq!(inflight.load("p"), WorkerLoad::default());
        assert_eq!((inflight.requests("d"), inflight.requests("p")), (1, 0));
        inflight.finish(ticket);
        assert!(inflight.by_worker.is_empty());
    }

    #[test]
    fn a_forgotten_worker_has_no_load() {
        let mut inflight = InFlight::default();
        let ticket = inflight.admit(local("w", 10, 10));
        inflight.forget("w");
        assert_eq!(inflight.load("w"), WorkerLoad::default());
        // Its request ending later changes nothing.
        inflight.finish(ticket);
        assert_eq!(inflight.load("w"), WorkerLoad::default());
    }
}
