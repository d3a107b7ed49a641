//! The routing policies compared, each a way to configure the same gateway.

use crate::harness::{FallbackBalancing, GatewayConfig};

/// Bodies up to a 64k-token token-id prompt.
const BENCH_MAX_BODY_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// Plain Envoy, `round_robin`.
    RoundRobin,
    /// Plain Envoy, `least_request`.
    LeastRequest,
    /// kvmesh without fleet state: prefixes learned from its own decisions.
    Approximate,
    /// kvmesh with the sidecar's KV events and load.
    Precise,
    /// kvmesh precise on a fleet split into prefill and decode pools.
    PreciseDisagg,
}

impl Policy {
    pub const ALL: [Self; 5] = [
        Self::RoundRobin,
        Self::LeastRequest,
        Self::Approximate,
        Self::Precise,
        Self::PreciseDisagg,
    ];

    /// Name in tables and plots.
    pub fn label(self) -> &'static str {
        match self {
            Self::RoundRobin => "Envoy round_robin",
            Self::LeastRequest => "Envoy least_request",
            Self::Approximate => "kvmesh approximate",
            Self::Precise => "kvmesh precise",
            Self::PreciseDisagg => "kvmesh precise + P/D",
        }
    }

    /// Name in CSV and on the command line.
    pub fn slug(self) -> &'static str {
        match self {
            Self::RoundRobin => "round-robin",
            Self::LeastRequest => "least-request",
            Self::Approximate => "approximate",
            Self::Precise => "precise",
            Self::PreciseDisagg => "precise-disagg",
        }
    }

    pub fn disaggregated(self) -> bool {
        self == Self::PreciseDisagg
    }

    /// Sets the gateway up for this policy; the fleet behind it is the same.
    pub fn configure(self, config: &mut GatewayConfig) {
        config.max_body_bytes = Some(BENCH_MAX_BODY_BYTES);
        match self {
            Self::RoundRobin => {
                config.filter = false;
                config.fallback = FallbackBalancing::RoundRobin;
            }
            Self::LeastRequest => {
                config.filter = false;
                config.fallback = FallbackBalancing::LeastRequest;
            }
            Self::Approximate => config.sidecar = None,
            Self::Precise | Self::PreciseDisagg => {}
        }
    }
}
