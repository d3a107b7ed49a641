//! The routing policies compared: ways to configure the same Envoy gateway,
//! and the routers of SGLang and Dynamo on the same fleet.

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
    /// SGLang's router (the SGLang Model Gateway from PyPI) with its default
    /// `cache_aware` policy, instead of Envoy.
    SglangCacheAware,
    /// NVIDIA Dynamo's KV router (its selection service from PyPI, on the
    /// engines' KV events), asked by the client where each request goes.
    DynamoKv,
}

impl Policy {
    pub const ALL: [Self; 7] = [
        Self::RoundRobin,
        Self::LeastRequest,
        Self::SglangCacheAware,
        Self::DynamoKv,
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
            Self::SglangCacheAware => "SGLang router cache_aware",
            Self::DynamoKv => "Dynamo KV router",
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
            Self::SglangCacheAware => "sglang-cache-aware",
            Self::DynamoKv => "dynamo-kv",
        }
    }

    /// Whether kvmesh's filter routes (and counts its routing modes).
    pub fn kvmesh(self) -> bool {
        matches!(
            self,
            Self::Approximate | Self::Precise | Self::PreciseDisagg
        )
    }

    /// The policy SGLang's router runs, when it routes instead of Envoy.
    pub fn sglang_router_policy(self) -> Option<&'static str> {
        match self {
            Self::SglangCacheAware => Some("cache_aware"),
            _ => None,
        }
    }

    /// Whether the policy's gateway takes token-id prompts. SGLang's router
    /// answers a `/v1/completions` prompt of token ids with HTTP 422 (its
    /// request type knows text prompts only), so it runs the chat
    /// workloads only.
    pub fn takes_token_ids(self) -> bool {
        self.sglang_router_policy().is_none()
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
            // The fleet's Envoy stays idle beside the other router.
            Self::SglangCacheAware | Self::DynamoKv => config.filter = false,
            Self::Approximate => config.sidecar = None,
            Self::Precise | Self::PreciseDisagg => {}
        }
    }
}
