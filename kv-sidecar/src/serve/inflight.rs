//! Predicted load from gateways' routing decisions (docs/architecture.md#the-request-path): a decision
//! adds the prompt's blocks to its decode worker's active blocks and its
//! uncached tokens to the prefill worker's queue; the first token frees the
//! queued prefill, completion frees the rest. Bounded in count and age, since
//! a gateway may die before reporting completions.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use router_core::gateway::{RequestPhase, RoutingDecision};
use router_core::selection::WorkerLoad;

struct Entry {
    decode: String,
    prefill: String,
    active_blocks: u64,
    /// Still queued on `prefill` (0 once the first token arrived).
    queued_tokens: u64,
    since: Instant,
}

/// A decision not counted because `max_inflight_requests` was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    Full,
}

#[derive(Default)]
pub struct InFlight {
    requests: HashMap<(String, String), Entry>,
    predicted: HashMap<String, WorkerLoad>,
}

impl InFlight {
    pub fn count(&self) -> usize {
        self.requests.len()
    }

    pub fn load_of(&self, worker_id: &str) -> WorkerLoad {
        self.predicted.get(worker_id).copied().unwrap_or_default()
    }

    /// Records a decision; returns the workers whose predicted load changed.
    pub fn decide(
        &mut self,
        gateway: &str,
        decision: &RoutingDecision,
        limit: usize,
        now: Instant,
    ) -> Result<Vec<String>, Dropped> {
        let key = (gateway.to_owned(), decision.request_id.clone());
        let mut touched = self.finish(&key);
        if self.requests.len() >= limit {
            return Err(Dropped::Full);
        }
        let prefill = if decision.prefill_worker_id.is_empty() {
            decision.worker_id.clone()
        } else {
            decision.prefill_worker_id.clone()
        };
        let entry = Entry {
            decode: decision.worker_id.clone(),
            prefill,
            active_blocks: u64::from(decision.prompt_blocks),
            queued_tokens: decision.prefill_tokens,
            since: now,
        };
        self.add(&entry, 1);
        touched.extend([entry.decode.clone(), entry.prefill.clone()]);
        self.requests.insert(key, entry);
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
                let queued = std::mem::take(&mut entry.queued_tokens);
                let prefill = entry.prefill.clone();
                if let Some(load) = self.predicted.get_mut(&prefill) {
                    load.queued_prefill_tokens = load.queued_prefill_tokens.saturating_sub(queued);
                }
                vec![prefill]
            }
            RequestPhase::Done => self.finish(&key),
            RequestPhase::Unspecified => Vec::new(),
        }
    }

    /// Drops decisions older than `ttl` and those naming workers that left.
    pub fn expire(&mut self, ttl: Duration, now: Instant) -> (usize, Vec<String>) {
        let old: Vec<(String, String)> = self
            .requests
            .iter()
            .filter(|(_, e)| now.duration_since(e.since) > ttl)
            .map(|(k, _)| k.clone())
            .collect();
        let mut touched = Vec::new();
        for key in &old {
            touched.extend(self.finish(key));
        }
        (old.len(), touched)
    }

    /// Forgets a worker that left: its requests died with it.
    pub fn forget_worker(&mut self, worker_id: &str) -> usize {
        let keys: Vec<(String, String)> = self
            .requests
            .iter()
            .filter(|(_, e)| e.decode == worker_id || e.prefill == worker_id)
            .map(|(k, _)| k.clone())
            .collect();
        for key in &keys {
            self.finish(key);
        }
        self.predicted.remove(worker_id);
        keys.len()
    }

    fn finish(&mut self, key: &(String, String)) -> Vec<String> {
        match self.requests.remove(key) {
            Some(entry) => {
                self.add(&entry, -1);
                vec![entry.decode, entry.prefill]
            }
            None => Vec::new(),
        }
    }

    fn add(&mut self, entry: &Entry, sign: i8) {
        let apply = |value: &mut u64, delta: u64| {
            *value = if sign > 0 {
                value.saturating_add(delta)
            } else {
                value.saturating_sub(delta)
            };
        };
        let decode = self.predicted.entry(entry.decode.clone()).or_default();
        apply(&mut decode.active_blocks, entry.active_blocks);
        let prefill = self.predicted.entry(entry.prefill.clone()).or_default();
        apply(&mut prefill.queued_prefill_tokens, entry.queued_tokens);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(id: &str, worker: &str, blocks: u32, tokens: u64) -> RoutingDecision {
        RoutingDecision {
            model: "m".into(),
            request_id: id.into(),
            worker_id: worker.into(),
            prefill_worker_id: String::new(),
            prompt_blocks: blocks,
            cached_blocks: 0,
            prefill_tokens: tokens,
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
            Err(Dropped::Full)
        );
        let (expired, _) = f.expire(Duration::ZERO, now + Duration::from_millis(1));
        assert_eq!(expired, 1);
        assert_eq!(f.load_of("w"), WorkerLoad::default());
    }
}
