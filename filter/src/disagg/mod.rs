//! Disaggregated prefill and decode (docs/sim-engine.md#disaggregated-prefill-all-three-handshakes): when a request's prompt
//! is prefilled on the prefill pool, and the bodies of each engine family's
//! handshake. The filter runs the handshake itself; there is no routing
//! sidecar beside the decode workers.

pub mod body;

use serde::Deserialize;

/// When a model's requests are prefilled remotely.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    #[default]
    Never,
    Always,
    /// Only when the decode worker would compute enough of the prompt itself
    /// and a prefill worker has room.
    Auto,
}

/// Which engine family's handshake the pools speak.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Prefill leg first; its `kv_transfer_params` go into the decode leg.
    #[default]
    Vllm,
    /// Both legs at once, meeting at the prefill engine's bootstrap server.
    Sglang,
    /// Context leg first; its `disaggregated_params` go into generation.
    Trtllm,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Vllm => "vllm",
            Protocol::Sglang => "sglang",
            Protocol::Trtllm => "trtllm",
        }
    }
}

/// Whether to prefill remotely, given how many prompt tokens the decode
/// worker would have to compute and how much prefill the best prefill worker
/// has queued.
pub fn wants_remote_prefill(
    policy: Policy,
    uncached_tokens: u64,
    prefill_queue_tokens: u64,
    min_prefill_tokens: u64,
    max_prefill_queue_tokens: u64,
) -> bool {
    match policy {
        Policy::Never => false,
        Policy::Always => true,
        Policy::Auto => {
            uncached_tokens >= min_prefill_tokens && prefill_queue_tokens < max_prefill_queue_tokens
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_needs_a_long_uncached_prompt_and_room() {
        assert!(!wants_remote_prefill(Policy::Never, 1 << 20, 0, 1, 10));
        assert!(wants_remote_prefill(Policy::Always, 0, 1 << 20, 1024, 10));
        assert!(wants_remote_prefill(Policy::Auto, 1024, 9, 1024, 10));
        assert!(!wants_remote_prefill(Policy::Auto, 1023, 0, 1024, 10));
        assert!(!wants_remote_prefill(Policy::Auto, 4096, 10, 1024, 10));
    }
}
