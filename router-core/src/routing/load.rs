//! The load a worker is under, merged from every account this router has
//! of it: the fleet state (engines' metrics plus every gateway's reported
//! decisions), this router's own in-flight requests, and the engine's ORCA
//! load reports (fresher than anything relayed, but in requests, not blocks).
//!
//! ORCA counts requests, not their sizes. The router knows the size of the
//! requests gateways routed (its own ledger, and every gateway's decisions
//! through the fleet state), so a report adds only the requests beyond
//! those, each taken at the mean prompt size this router routes: counting
//! every reported request at the mean instead made a queue of short prompts
//! look as long as the trace's mean prompt (12k tokens on Mooncake) and
//! outweighed the exact accounts (docs/benchmarks.md).

use std::collections::HashMap;

use crate::routing::select::WorkerLoad;

/// A report older than this says nothing about the worker's load now.
const FRESH_MS: u64 = 2_000;
/// Workers remembered before the table starts over (worker churn).
const MAX_WORKERS: usize = 4096;

/// The named metrics vLLM reports.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OrcaReport {
    pub kv_cache_usage: f64,
    pub waiting: u32,
    pub running: u32,
}

/// What gateways routed to a worker and have not seen end: its load, and
/// how many requests that is.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Routed {
    pub load: WorkerLoad,
    pub requests: u32,
}

/// The latest report of each worker this VM heard from.
#[derive(Debug)]
pub struct OrcaLoads {
    by_address: HashMap<String, (OrcaReport, u64)>,
    /// Exponential mean of routed prompt sizes, in tokens.
    mean_prompt_tokens: f64,
}

impl Default for OrcaLoads {
    fn default() -> Self {
        Self {
            by_address: HashMap::new(),
            mean_prompt_tokens: 512.0,
        }
    }
}

impl OrcaLoads {
    pub fn record(&mut self, address: &str, report: OrcaReport, now_ms: u64) {
        if self.by_address.len() >= MAX_WORKERS && !self.by_address.contains_key(address) {
            self.by_address.clear();
        }
        self.by_address.insert(address.to_owned(), (report, now_ms));
    }

    /// Folds one routed prompt into the mean prompt size.
    pub fn observe_prompt(&mut self, tokens: u64) {
        self.mean_prompt_tokens += (tokens as f64 - self.mean_prompt_tokens) / 16.0;
    }

    /// The worker's load by its latest report, if fresh: the load of the
    /// requests gateways `routed` to it, plus the reported requests beyond
    /// those at the mean prompt size, waiting ones first.
    pub fn load(
        &self,
        address: &str,
        block_size: u32,
        now_ms: u64,
        routed: Routed,
    ) -> Option<WorkerLoad> {
        let (report, at) = self.by_address.get(address)?;
        if now_ms.saturating_sub(*at) > FRESH_MS {
            return None;
        }
        let others = report
            .waiting
            .saturating_add(report.running)
            .saturating_sub(routed.requests);
        let waiting = others.min(report.waiting);
        let running = others - waiting;
        let prompt_tokens = self.mean_prompt_tokens.max(0.0);
        let prompt_blocks = prompt_tokens / f64::from(block_size.max(1));
        Some(WorkerLoad {
            active_blocks: routed
                .load
                .active_blocks
                .saturating_add((f64::from(running) * prompt_blocks) as u64),
            queued_prefill_tokens: routed
                .load
                .queued_prefill_tokens
                .saturating_add((f64::from(waiting) * prompt_tokens) as u64),
        })
    }
}

/// Merges the accounts of one worker's load. They estimate the same thing
/// with different lags, so the largest wins; adding them would count a
/// request several times.
pub fn merged(accounts: impl IntoIterator<Item = WorkerLoad>) -> WorkerLoad {
    accounts
        .into_iter()
        .fold(WorkerLoad::default(), |merged, load| WorkerLoad {
            active_blocks: merged.active_blocks.max(load.active_blocks),
            queued_prefill_tokens: merged.queued_prefill_tokens.max(load.queued_prefill_tokens),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_reports_become_load() {
        let mut loads = OrcaLoads::default();
        for _ in 0..200 {
            loads.observe_prompt(160);
        }
        let report = OrcaReport {
            kv_cache_usage: 0.5,
            waiting: 2,
            running: 3,
        };
        loads.record("a", report, 1_000);
        let none = Routed::default();
        let load = loads.load("a", 16, 1_500, none).unwrap();
        assert_eq!(load.queued_prefill_tokens, 320);
        assert_eq!(load.active_blocks, 30);
        assert!(loads.load("a", 16, 3_001, none).is_none());
        assert!(loads.load("b", 16, 1_500, none).is_none());
    }

    /// A report of the requests gateways routed adds nothing to what the
    /// router knows of them: two short prompts waiting are 200 tokens, not
    /// two prompts of the mean size. Requests beyond those count at the
    /// mean, waiting ones first.
    #[test]
    fn reports_add_only_the_requests_the_router_did_not_send() {
        let mut loads = OrcaLoads::default();
        for _ in 0..200 {
            loads.observe_prompt(12_000);
        }
        let report = OrcaReport {
            kv_cache_usage: 0.5,
            waiting: 2,
            running: 1,
        };
        loads.record("a", report, 1_000);
        let known = WorkerLoad {
            active_blocks: 40,
            queued_prefill_tokens: 200,
        };
        let routed = |requests| Routed {
            load: known,
            requests,
        };
        assert_eq!(loads.load("a", 16, 1_000, routed(3)), Some(known));
        let load = loads.load("a", 16, 1_000, routed(1)).unwrap();
        let mean = loads.mean_prompt_tokens;
        assert!(mean > 11_000.0, "{mean}");
        assert_eq!(load.queued_prefill_tokens, 200 + (2.0 * mean) as u64);
        assert_eq!(load.active_blocks, 40);
        let load = loads.load("a", 16, 1_000, routed(0)).unwrap();
        assert_eq!(load.active_blocks, 40 + (mean / 16.0) as u64);
    }

    #[test]
    fn the_largest_account_wins_per_field() {
        let load = |active_blocks, queued_prefill_tokens| WorkerLoad {
            active_blocks,
            queued_prefill_tokens,
        };
        assert_eq!(
            merged([load(5, 0), load(2, 300), load(4, 100)]),
            load(5, 300)
        );
        assert_eq!(merged([]), WorkerLoad::default());
    }
}
