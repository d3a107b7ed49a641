//! The whole routing decision, shared by the filter (inside Envoy) and the
//! sidecar's `/debug/route`: [`plan`] takes a model's pools, what is known of
//! the prompt, the fleet state and the router's own observations, and returns
//! the [`RoutingPlan`]. Pure logic: time and randomness come in as values.
//! docs/architecture.md#the-routing-engine describes the parts.

pub mod computing;
pub mod disagg;
pub mod inflight;
pub mod learned;
pub mod load;
pub mod pick;
mod plan;
pub mod prefix_keys;
pub mod prompt;
pub mod prompt_cache;
pub mod score;
pub mod select;
pub mod unreachable;

pub use plan::{
    plan, Decision, LocalState, Mode, ModelRouting, RoutedPrompt, RoutingPlan, Signals,
};
