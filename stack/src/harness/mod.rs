//! Process supervision and the components a test or the quickstart starts.

pub mod client;
pub mod dynamo_selector;
pub mod engine_publisher;
pub mod envoy;
pub mod fleet;
pub mod gateway;
pub mod istio;
pub mod load;
pub mod nats;
pub mod nats_tap;
pub mod paths;
pub mod ports;
pub mod process;
pub mod raw_http;
pub mod readiness;
pub mod relay;
pub mod sglang_router;
pub mod sidecar;
pub mod sim;
pub mod stack;
pub mod stats;
pub mod supervisor;
pub mod synthetic_fleet;
pub mod vllm;

pub use envoy::{
    Envoy, FallbackBalancing, GatewayConfig, GatewayLimits, ModelRoute, SidecarEndpoints,
};
pub use nats::NatsServer;
pub use ports::free_port;
pub use process::ManagedProcess;
pub use sim::SimEngine;
