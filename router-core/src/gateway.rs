//! Messages gateways (filter VMs) send back to `kv-sidecar serve` on the state
//! stream, and that sidecars share with each other on NATS
//! `<prefix>.decisions.<model>`: which worker each request was routed to and
//! how far it got, so every gateway's load view includes every gateway's
//! in-flight requests (docs/architecture.md#the-request-path "filter's own in-flight accounting").
//! Written with `prost` derives (no protoc here). Equivalent schema — field
//! numbers never change meaning:
//!
//! ```proto
//! syntax = "proto3";
//! package kvmesh.v1;
//!
//! service StateStream {
//!   rpc Subscribe(stream GatewayReport) returns (stream StateUpdate);
//! }
//!
//! message GatewayReport {
//!   oneof kind {
//!     GatewayHello hello = 1;
//!     RoutingDecision decision = 2;
//!     RequestProgress progress = 3;
//!   }
//! }
//! message GatewayHello { string gateway_id = 1; }
//! message RoutingDecision {
//!   string model = 1;
//!   string request_id = 2;        // unique per gateway
//!   string worker_id = 3;         // decode (or only) worker
//!   string prefill_worker_id = 4; // empty unless prefill runs elsewhere
//!   uint32 prompt_blocks = 5;     // full blocks of the prompt
//!   uint32 cached_blocks = 6;     // of those, cached on the prefill worker
//!   uint64 prefill_tokens = 7;    // prompt tokens the prefill worker computes
//! }
//! message RequestProgress {
//!   string model = 1;
//!   string request_id = 2;
//!   RequestPhase phase = 3;
//! }
//! enum RequestPhase {
//!   REQUEST_PHASE_UNSPECIFIED = 0;
//!   REQUEST_PHASE_FIRST_TOKEN = 1; // prefill done: its queued tokens are freed
//!   REQUEST_PHASE_DONE = 2;        // finished or failed: everything is freed
//! }
//! // <prefix>.decisions.<model>
//! message SharedReport {
//!   string origin = 1;            // id of the sidecar that received it
//!   string gateway_id = 2;
//!   GatewayReport report = 3;
//! }
//! ```

#[derive(Clone, PartialEq, prost::Message)]
pub struct GatewayReport {
    #[prost(oneof = "gateway_report::Kind", tags = "1, 2, 3")]
    pub kind: Option<gateway_report::Kind>,
}

pub mod gateway_report {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "1")]
        Hello(super::GatewayHello),
        #[prost(message, tag = "2")]
        Decision(super::RoutingDecision),
        #[prost(message, tag = "3")]
        Progress(super::RequestProgress),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct GatewayHello {
    #[prost(string, tag = "1")]
    pub gateway_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RoutingDecision {
    #[prost(string, tag = "1")]
    pub model: String,
    #[prost(string, tag = "2")]
    pub request_id: String,
    #[prost(string, tag = "3")]
    pub worker_id: String,
    #[prost(string, tag = "4")]
    pub prefill_worker_id: String,
    #[prost(uint32, tag = "5")]
    pub prompt_blocks: u32,
    #[prost(uint32, tag = "6")]
    pub cached_blocks: u32,
    #[prost(uint64, tag = "7")]
    pub prefill_tokens: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RequestProgress {
    #[prost(string, tag = "1")]
    pub model: String,
    #[prost(string, tag = "2")]
    pub request_id: String,
    #[prost(enumeration = "RequestPhase", tag = "3")]
    pub phase: i32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum RequestPhase {
    Unspecified = 0,
    FirstToken = 1,
    Done = 2,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SharedReport {
    #[prost(string, tag = "1")]
    pub origin: String,
    #[prost(string, tag = "2")]
    pub gateway_id: String,
    #[prost(message, optional, tag = "3")]
    pub report: Option<GatewayReport>,
}

/// NATS subject of shared decisions (docs/relay.md#output-router-coresrcprotocol).
pub fn decisions_subject(prefix: &str, model: &str) -> String {
    format!(
        "{prefix}.decisions.{}",
        crate::protocol::subjects::token(model)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn shared_report_round_trips() {
        let shared = SharedReport {
            origin: "sidecar-1".into(),
            gateway_id: "gw".into(),
            report: Some(GatewayReport {
                kind: Some(gateway_report::Kind::Decision(RoutingDecision {
                    model: "m".into(),
                    request_id: "r1".into(),
                    worker_id: "w0".into(),
                    prefill_worker_id: String::new(),
                    prompt_blocks: 10,
                    cached_blocks: 4,
                    prefill_tokens: 96,
                })),
            }),
        };
        let bytes = shared.encode_to_vec();
        assert_eq!(SharedReport::decode(bytes.as_slice()).ok(), Some(shared));
        assert_eq!(decisions_subject("kvmesh", "a.b"), "kvmesh.decisions.a_b");
    }
}
