//! kvmesh sidecar library: the engine-facing relay (`kv-sidecar relay`) and
//! the gateway-facing fleet state service (`kv-sidecar serve`). The binary in
//! `main.rs` is only the command-line edge.

pub mod decode;
pub mod nats_options;
pub mod normalize;
pub mod relay;
pub mod serve;
pub mod shutdown;
pub mod tokenize;
