//! Whether a request's prompt is prefilled on the prefill pool.

/// When a model's requests are prefilled remotely: the configuration's
/// disaggregation policy.
pub use kvmesh_config::DisaggregationPolicy as PrefillPolicy;

/// A model's prefill pool, as routing sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefillRouting {
    pub policy: PrefillPolicy,
    /// `ip:port` of each prefill worker, used while no fleet state is known.
    pub endpoints: Vec<String>,
    /// `auto`: remote prefill once the decode worker would compute at least
    /// this many prompt tokens itself.
    pub min_prefill_tokens: u64,
    /// `auto`: only onto a prefill worker with less prefill queued than this.
    pub max_prefill_queue_tokens: u64,
}

impl PrefillRouting {
    /// Whether to prefill remotely, given how many prompt tokens the decode
    /// worker would have to compute and how much prefill the best prefill
    /// worker has queued.
    pub fn wants_remote_prefill(&self, uncached_tokens: u64, prefill_queue_tokens: u64) -> bool {
        match self.policy {
            PrefillPolicy::Never => false,
            PrefillPolicy::Always => true,
            PrefillPolicy::Auto => {
                uncached_tokens >= self.min_prefill_tokens
                    && prefill_queue_tokens < self.max_prefill_queue_tokens
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(policy: PrefillPolicy) -> PrefillRouting {
        PrefillRouting {
            policy,
            endpoints: Vec::new(),
            min_prefill_tokens: 1024,
            max_prefill_queue_tokens: 10,
        }
    }

    #[test]
    fn auto_needs_a_long_uncached_prompt_and_room() {
        assert!(!pool(PrefillPolicy::Never).wants_remote_prefill(1 << 20, 0));
        assert!(pool(PrefillPolicy::Always).wants_remote_prefill(0, 1 << 20));
        let auto = pool(PrefillPolicy::Auto);
        assert!(auto.wants_remote_prefill(1024, 9));
        assert!(!auto.wants_remote_prefill(1023, 0));
        assert!(!auto.wants_remote_prefill(4096, 10));
    }
}
