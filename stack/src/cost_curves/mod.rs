//! The cost curves behind `scripts/bench-cost-curves`: what kvmesh's fleet
//! state costs as the fleet grows. For each size, real nats-server,
//! `kv-sidecar serve` and Envoy with the filter are fed by synthetic workers
//! (`harness::synthetic_fleet`: the relay's own publishing code, no engines)
//! at one aggregate event rate, and the sidecar's CPU, the state stream's
//! bytes, the filter's memory, snapshot times and the filter's longest
//! state-stream callbacks are measured.

pub mod proc_stat;
pub mod report;
pub mod run;
pub mod stream_probe;
