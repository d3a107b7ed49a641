//! Predicted load from gateways' routing decisions (docs/architecture.md#the-request-path):
//! each reported decision is admitted to router-core's in-flight ledger, the
//! same one a filter VM keeps for its own requests. The first token frees the
//! queued prefill, completion frees the rest. Bounded in count and age, since
//! a gateway may die before reporting completions.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use router_core::gateway::{GatewayResync, RequestPhase, RoutingDecision};
use router_core::routing::inflight::{self, RequestLoad, Ticket};
use router_core::routing::select::WorkerLoad;

struct Entry {
    ticket: Ticket,
    since: Instant,
}

/// A decision not counted because `max_inflight_requests` was reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Full {
    /// Workers whose load still changed: the request id's earlier decision
    /// was replaced before the ledger turned out full.
    pub touched: Vec<String>,
}

/// What a gateway's resync changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Resynced {
    /// Counted requests the gateway no longer has open.
    pub dropped: usize,
    /// Open requests that were not counted.
    pub added: usize,
    /// Open requests not counted because `max_inflight_requests` was reached.
    pub full: usize,
    /// Workers whose load may have changed.
    pub touched: Vec<String>,
}

/// A resync whose parts are still arriving: the requests they listed.
struct PendingResync {
    next_part: u32,
    listed: HashSet<String>,
}

/// Requests by (gateway, request id), and the load they put on each worker.
#[derive(Default)]
pub struct InFlight {
    requests: HashMap<(String, String), Entry>,
    ledger: inflight::InFlight,
    /// By gateway: at most one each, bounded by its open requests.
    resyncs: HashMap<String, PendingResync>,
}

impl InFlight {
    pub fn count(&self) -> usize {
        self.requests.len()
    }

    pub fn load_of(&self, worker_id: &str) -> WorkerLoad {
        self.ledger.load(worker_id)
    }

    /// Requests of gateways' decisions on the worker that have not ended.
    pub fn requests_on(&self, worker_id: &str) -> u32 {
        self.ledger.requests(worker_id)
    }

    /// Records a decision; returns the workers whose predicted load changed.
    pub fn decide(
        &mut self,
        gateway: &str,
        decision: &RoutingDecision,
        limit: usize,
        now: Instant,
    ) -> Result<Vec<String>, Full> {
        let key = (gateway.to_owned(), decision.request_id.clone());
        let mut touched = self.finish(&key);
        if self.requests.len() >= limit {
            return Err(Full { touched });
        }
        let ticket = self.admit(decision);
        touched.extend(ticket.workers().map(str::to_owned));
        self.requests.insert(key, Entry { ticket, since: now });
        Ok(touched)
    }

    /// Applies a progress report; returns the workers whose load changed.
    pub fn progress(
        &mut self,
        gateway: &str,
        request_id: &str,
        phase: RequestPhase,
    ) -> Vec<String> {
        let key = (gateway.to_owned(), request_id.to_owned());
        match phase {
            RequestPhase::FirstToken => {
                let Some(entry) = self.requests.get_mut(&key) else {
                    return Vec::new();
                };
                self.ledger.prefill_done(&mut entry.ticket);
                entry.ticket.workers().map(str::to_owned).collect()
            }
            RequestPhase::Done => self.finish(&key),
            RequestPhase::Unspecified => Vec::new(),
        }
    }

    /// Applies one part of a gateway's resync: its listed requests count
    /// (added if missing, confirmed if counted: their age starts again),
    /// and once every part has arrived in order, the gateway's requests not
    /// listed in any stop counting (they ended unheard). A part out of order
    /// (one was lost) only adds, until the next resync starts.
    pub fn resync(
        &mut self,
        gateway: &str,
        resync: &GatewayResync,
        limit: usize,
        now: Instant,
    ) -> Resynced {
        let mut resynced = Resynced::default();
        let listed = resync
            .requests
            .iter()
            .filter_map(|request| Some(request.decision.as_ref()?.request_id.clone()));
        if resync.part == 0 {
            self.resyncs.insert(
                gateway.to_owned(),
                PendingResync {
                    next_part: 0,
                    listed: HashSet::new(),
                },
            );
        }
        let complete = match self.resyncs.get_mut(gateway) {
            Some(pending) if pending.next_part == resync.part => {
                pending.listed.extend(listed);
                pending.next_part += 1;
                pending.next_part >= resync.parts
            }
            _ => {
                self.resyncs.remove(gateway);
                false
            }
        };
        // Dropping first leaves room under `limit` for the listed ones.
        if complete {
            if let Some(pending) = self.resyncs.remove(gateway) {
                let (dropped, touched) = self
                    .drop_where(|((from, id), _)| from == gateway && !pending.listed.contains(id));
                resynced.dropped = dropped;
                resynced.touched = touched;
            }
        }
        for request in &resync.requests {
            let Some(decision) = &request.decision else {
                continue;
            };
            let key = (gateway.to_owned(), decision.request_id.clone());
            if !self.requests.contains_key(&key) {
                if self.requests.len() >= limit {
                    resynced.full += 1;
                    continue;
                }
                let ticket = self.admit(decision);
                self.requests
                    .insert(key.clone(), Entry { ticket, since: now });
                resynced.added += 1;
            }
            if let Some(entry) = self.requests.get_mut(&key) {
                entry.since = now;
                if request.first_token {
                    self.ledger.prefill_done(&mut entry.ticket);
                }
                resynced
                    .touched
                    .extend(entry.ticket.workers().map(str::to_owned));
            }
        }
        resynced.touched.sort_unstable();
        resynced.touched.dedup();
        resynced
    }

    fn admit(&mut self, decision: &RoutingDecision) -> Ticket {
        self.ledger.admit(RequestLoad {
            decode: &decision.worker_id,
            prefill: decision.prefill_worker(),
            prefill_tokens: decision.prefill_tokens,
            blocks: u64::from(decision.prompt_blocks),
        })
    }

    /// Drops decisions older than `ttl`.
    pub fn expire(&mut self, ttl: Duration, now: Instant) -> (usize, Vec<String>) {
        self.drop_where(|(_, entry)| now.duration_since(entry.since) > ttl)
    }

    /// Drops the decisions of a gateway that is gone: its requests died with it.
    pub fn forget_gateway(&mut self, gateway: &str) -> (usize, Vec<String>) {
        self.resyncs.remove(gateway);
        self.drop_where(|((from, _), _)| from == gateway)
    }

    /// Drops the decisions `drop` picks; returns how many, and the workers
    /// whose load changed.
    fn drop_where(
        &mut self,
        drop: impl Fn(&(&(String, String), &Entry)) -> bool,
    ) -> (usize, Vec<String>) {
        let keys: Vec<(String, String)> = self
            .requests
            .iter()
            .filter(drop)
            .map(|(k, _)| k.clone())
            .collect();
        let mut touched = Vec::new();
        for key in &keys {
            touched.extend(self.finish(key));
        }
        (keys.len(), touched)
    }

    /// Forgets a worker that left: its requests died with it.
    pub fn forget_worker(&mut self, worker_id: &str) -> usize {
        let keys: Vec<(String, String)> = self
            .requests
            .iter()
            .filter(|(_, e)| e.ticket.involves(worker_id))
            .map(|(k, _)| k.clone())
            .collect();
        for key in &keys {
            self.finish(key);
        }
        self.ledger.forget(worker_id);
        keys.len()
    }

    fn finish(&mut self, key: &(String, String)) -> Vec<String> {
        match self.requests.remove(key) {
            Some(entry) => {
                let touched = entry.ticket.workers().map(str::to_owned).collect();
                self.ledger.finish(entry.ticket);
                touched
            }
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use router_core::gateway::OpenRequest;

    fn decision(id: &str, worker: &str, blocks: u32, tokens: u64) -> RoutingDecision {
        RoutingDecision {
            model: "m".into(),
            request_id: id.into(),
            worker_id: worker.into(),
            prefill_worker_id: String::new(),
            prompt_blocks: blocks,
            cached_blocks: 0,
            prefill_tokens: tokens,
            computing: Vec::new(),
        }
    }

    #[test]
    fn decisions_add_and_progress_frees() {
        let mut f = InFlight::default();
        let now = Instant::now();
        f.decide("g", &decision("r1", "w", 10, 160), 10, now)
            .unwrap();
        f.decide("g", &decision("r2", "w", 5, 80), 10, now).unwrap();
        assert_eq!(
            f.load_of("w"),
            WorkerLoad {
                active_blocks: 15,
                queued_prefill_tokens: 240
            }
        );
        f.progress("g", "r1", RequestPhase::FirstToken);
        assert_eq!(f.load_of("w").queued_prefill_tokens, 80);
        f.progress("g", "r1", RequestPhase::Done);
        assert_eq!(f.load_of("w").active_blocks, 5);
        assert_eq!(
            f.decide("g", &decision("r3", "w", 1, 1), 1, now),
            Err(Full {
                touched: Vec::new()
            })
        );
        let (expired, _) = f.expire(Duration::ZERO, now + Duration::from_millis(1));
        assert_eq!(expired, 1);
        assert_eq!(f.load_of("w"), WorkerLoad::default());
    }

    #[test]
    fn a_re_reported_decision_refused_as_full_still_frees_the_old_one() {
        let mut f = InFlight::default();
        let now = Instant::now();
        f.decide("g", &decision("r1", "a", 10, 0), 10, now).unwrap();
        f.decide("g", &decision("r2", "b", 5, 0), 10, now).unwrap();
        let refused = f.decide("g", &decision("r1", "c", 3, 0), 1, now);
        assert_eq!(
            refused,
            Err(Full {
                touched: vec!["a".to_owned()]
            })
        );
        assert_eq!(f.load_of("a"), WorkerLoad::default());
        assert_eq!(f.load_of("c"), WorkerLoad::default());
        assert_eq!(f.count(), 1);
    }

    fn open(id: &str, worker: &str, blocks: u32, tokens: u64, first_token: bool) -> OpenRequest {
        OpenRequest {
            decision: Some(decision(id, worker, blocks, tokens)),
            first_token,
        }
    }

    fn part(requests: Vec<OpenRequest>, part: u32, parts: u32) -> GatewayResync {
        GatewayResync {
            model: "m".into(),
            requests,
            part,
            parts,
        }
    }

    #[test]
    fn a_resync_counts_exactly_what_the_gateway_has_open() {
        let mut f = InFlight::default();
        let now = Instant::now();
        // Counted: r1 still open, r2 ended unheard; another gateway's r1.
        f.decide("g", &decision("r1", "a", 10, 160), 10, now)
            .unwrap();
        f.decide("g", &decision("r2", "a", 5, 80), 10, now).unwrap();
        f.decide("h", &decision("r1", "b", 7, 0), 10, now).unwrap();
        // Open: r1 past its first token, r3 routed unheard.
        let one = part(
            vec![
                open("r1", "a", 10, 160, true),
                open("r3", "c", 2, 32, false),
            ],
            0,
            1,
        );
        let later = now + Duration::from_secs(5);
        let resynced = f.resync("g", &one, 10, later);
        assert_eq!(
            resynced,
            Resynced {
                dropped: 1,
                added: 1,
                full: 0,
                touched: vec!["a".into(), "c".into()],
            }
        );
        assert_eq!(
            f.load_of("a"),
            WorkerLoad {
                active_blocks: 10,
                queued_prefill_tokens: 0
            }
        );
        assert_eq!(
            f.load_of("c"),
            WorkerLoad {
                active_blocks: 2,
                queued_prefill_tokens: 32
            }
        );
        assert_eq!(f.load_of("b").active_blocks, 7, "another gateway's");
        // Confirmed requests start their age again.
        let (expired, _) = f.expire(Duration::from_secs(3), later + Duration::from_secs(1));
        assert_eq!(expired, 1, "only the other gateway's, from `now`");
        // Past the limit, open requests are left uncounted.
        let full = part(
            vec![open("r5", "a", 1, 0, false), open("r6", "a", 1, 0, false)],
            0,
            1,
        );
        let full = f.resync("g", &full, 1, later);
        assert_eq!((full.dropped, full.added, full.full), (2, 1, 1));
    }

    #[test]
    fn what_is_not_listed_stops_counting_only_once_every_part_arrived() {
        let mut f = InFlight::default();
        let now = Instant::now();
        for id in ["r1", "r2", "ended"] {
            f.decide("g", &decision(id, "a", 1, 0), 10, now).unwrap();
        }
        let first = part(vec![open("r1", "a", 1, 0, false)], 0, 2);
        let second = part(vec![open("r2", "a", 1, 0, false)], 1, 2);
        // In order: r2, listed in the second part, never stops counting.
        let after_first = f.resync("g", &first, 10, now);
        assert_eq!((after_first.dropped, f.count()), (0, 3));
        let after_second = f.resync("g", &second, 10, now);
        assert_eq!((after_second.dropped, f.count()), (1, 2));
        // A part lost on the way: nothing is dropped.
        f.decide("g", &decision("ended", "a", 1, 0), 10, now)
            .unwrap();
        f.resync("g", &second, 10, now);
        assert_eq!(f.count(), 3, "the first part never came");
        let third = part(vec![open("r3", "a", 1, 0, false)], 2, 3);
        f.resync("g", &first, 10, now);
        let skipped = f.resync("g", &third, 10, now);
        assert_eq!(
            (skipped.added, skipped.dropped),
            (1, 0),
            "part 1 of 3 was lost"
        );
        assert_eq!(f.count(), 4);
        // The next whole resync sets it right; a gone gateway forgets its own.
        let whole = part(vec![open("r1", "a", 1, 0, false)], 0, 1);
        assert_eq!(f.resync("g", &whole, 10, now).dropped, 3);
        f.resync("g", &first, 10, now);
        f.forget_gateway("g");
        assert_eq!(f.resync("g", &second, 10, now).dropped, 0);
    }
}
