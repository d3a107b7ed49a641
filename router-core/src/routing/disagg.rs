//! Whether a request's prompt is prefilled on the prefill pool.

use crate::routing::plan::Decision;
use crate::Target;
pub use kvmesh_config::{DisaggregationPolicy as PrefillPolicy, DisaggregationSpec};

/// A model's prefill pool, as routing sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefillRouting {
    /// The policy and its limits, from the model's configuration.
    pub spec: DisaggregationSpec,
    /// Each prefill worker at its `ip:port`, used while no fleet state is
    /// known.
    pub endpoints: Vec<Target>,
}

/// The prefill a worker would do before this prompt's first token: the
/// prompt tokens it must compute, after what is queued on it already.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrefillWork {
    pub uncached_tokens: u64,
    pub queued_tokens: u64,
}

impl PrefillWork {
    /// The prefill of the worker `decision` chose.
    pub fn of(decision: &Decision, block_size: u32) -> Self {
        Self {
            uncached_tokens: u64::from(decision.uncached_blocks()) * u64::from(block_size),
            queued_tokens: decision.load.queued_prefill_tokens,
        }
    }

    /// Tokens computed before this prompt's last one, on a compute-bound
    /// worker: what its time to first token grows with.
    fn until_done(self) -> u64 {
        self.uncached_tokens.saturating_add(self.queued_tokens)
    }

    /// Whether this (remote) prefill ends before `local`'s by at least half
    /// of `local`'s own prompt tokens.
    fn saves_against(self, local: Self) -> bool {
        self.until_done().saturating_add(local.uncached_tokens / 2) <= local.until_done()
    }

    /// Whether this (remote) prefill ends at most `lag` tokens after `local`'s.
    fn lags_at_most(self, local: Self, lag: u64) -> bool {
        self.until_done() <= local.until_done().saturating_add(lag)
    }
}

impl PrefillRouting {
    /// Whether to prefill remotely: `local` is the decode worker's own
    /// prefill of the prompt, `remote` the best prefill worker's.
    ///
    /// `auto` wants a long uncached prompt and a prefill worker below the
    /// queue limit. With shared workers it also wants the remote prefill to
    /// finish earlier than the local one by half the prompt's own prefill,
    /// a margin for moving the KV to the decode worker (in the simulated
    /// fleet of docs/benchmarks.md moving a prompt's KV takes about 0.6 of
    /// computing it): a decode worker keeps the prompt (aggregated
    /// serving) unless the prefill pool is clearly less busy, which keeps a
    /// shared fleet's time to first token near aggregated serving's. A
    /// dedicated pool exists to take prefill off the decode workers, so it
    /// gets the prompt even when it would finish later, by up to
    /// `max_prefill_lag_tokens`: past that the decode worker's steps are
    /// cheaper to slow than the prompt's first token is to delay.
    pub fn wants_remote_prefill(&self, local: PrefillWork, remote: PrefillWork) -> bool {
        let spec = &self.spec;
        match spec.policy {
            PrefillPolicy::Never => false,
            PrefillPolicy::Always => true,
            PrefillPolicy::Auto => {
                local.uncached_tokens >= spec.min_prefill_tokens
                    && remote.queued_tokens < spec.max_prefill_queue_tokens
                    && if spec.shared_workers {
                        remote.saves_against(local)
                    } else {
                        remote.lags_at_most(local, spec.max_prefill_lag_tokens)
                    }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(policy: PrefillPolicy, shared_workers: bool) -> PrefillRouting {
        PrefillRouting {
            spec: DisaggregationSpec {
                policy,
                min_prefill_tokens: 1024,
                max_prefill_queue_tokens: 10_000,
                max_prefill_lag_tokens: 16_384,
                shared_workers,
            },
            endpoints: Vec::new(),
        }
    }

    fn work(uncached_tokens: u64, queued_tokens: u64) -> PrefillWork {
        PrefillWork {
            uncached_tokens,
            queued_tokens,
        }
    }

    #[test]
    fn auto_needs_a_long_uncached_prompt_and_room() {
        let idle = work(0, 0);
        assert!(!pool(PrefillPolicy::Never, false).wants_remote_prefill(work(1 << 20, 0), idle));
        assert!(pool(PrefillPolicy::Always, false).wants_remote_prefill(idle, work(0, 1 << 20)));
        let auto = pool(PrefillPolicy::Auto, false);
        assert!(auto.wants_remote_prefill(work(1024, 0), work(1024, 9_999)));
        assert!(!auto.wants_remote_prefill(work(1023, 0), idle));
        assert!(!auto.wants_remote_prefill(work(4096, 0), work(4096, 10_000)));
    }

    #[test]
    fn shared_workers_prefill_remotely_only_when_not_slower() {
        let auto = pool(PrefillPolicy::Auto, true);
        // The decode worker is idle: its own prefill is as fast as any.
        assert!(!auto.wants_remote_prefill(work(4096, 0), work(4096, 0)));
        // It is busy prefilling: an idle prefill worker is faster, by at
        // least half the prompt.
        assert!(auto.wants_remote_prefill(work(4096, 8192), work(4096, 2048)));
        assert!(auto.wants_remote_prefill(work(4096, 2048), work(4096, 0)));
        assert!(!auto.wants_remote_prefill(work(4096, 2047), work(4096, 0)));
        // The prefill worker holds more of the prompt.
        assert!(auto.wants_remote_prefill(work(4096, 1024), work(1024, 1024)));
        // Still a long prompt and under the limit.
        assert!(!auto.wants_remote_prefill(work(1000, 9000), work(1000, 0)));
        assert!(!auto.wants_remote_prefill(work(4096, 50_000), work(4096, 10_000)));
    }

    #[test]
    fn a_dedicated_pool_prefills_remotely_until_it_lags_too_far_behind() {
        let mut auto = pool(PrefillPolicy::Auto, false);
        auto.spec.max_prefill_queue_tokens = 1 << 20;
        // An idle decode worker: the prefill pool may be up to the lag behind.
        assert!(auto.wants_remote_prefill(work(4096, 0), work(4096, 16_384)));
        assert!(!auto.wants_remote_prefill(work(4096, 0), work(4096, 16_385)));
        // A decode worker prefilling overflow itself: the pool takes prompts
        // again once it is within the lag of that worker.
        assert!(!auto.wants_remote_prefill(work(4096, 8192), work(4096, 24_577)));
        assert!(auto.wants_remote_prefill(work(4096, 8192), work(4096, 24_576)));
        // What the prefill worker holds of the prompt counts.
        assert!(auto.wants_remote_prefill(work(4096, 0), work(1024, 19_456)));
        // The queue limit still applies.
        auto.spec.max_prefill_queue_tokens = 10_000;
        assert!(!auto.wants_remote_prefill(work(4096, 0), work(4096, 10_000)));
    }
}
