//! kvmesh sidecar library: the engine-facing relay (`kv-sidecar relay`).
//! The binary in `main.rs` is only the command-line edge.

pub mod decode;
pub mod normalize;
pub mod relay;
pub mod serve;
pub mod tokenize;
