//! End-to-end harness for kvmesh: starts real processes (nats-server, Envoy with
//! the compiled filter, sim-engines, sidecars) on free loopback ports, waits for
//! them to be ready, shows their logs when a test fails, and kills them on drop.

pub mod cost_curves;
pub mod fleet_bench;
pub mod harness;
