//! Disaggregated prefill and decode (docs/sim-engine.md#disaggregated-prefill-all-three-handshakes): when a request's prompt
//! is prefilled on the prefill pool, and the bodies of each engine family's
//! handshake. The filter runs the handshake itself; there is no routing
//! sidecar beside the decode workers.

pub mod body;

/// Which engine family's handshake the pools speak: the configuration's
/// engine kind.
pub use kvmesh_config::EngineKind as Protocol;
