//! Disaggregated prefill and decode (docs/sim-engine.md#disaggregated-prefill-all-three-handshakes): when a request's prompt
//! is prefilled on the prefill pool, and the bodies of each engine family's
//! handshake. The filter runs the handshake itself; there is no routing
//! sidecar beside the decode workers.

pub mod body;

use serde::Deserialize;

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
