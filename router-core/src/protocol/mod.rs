//! Wire messages between `kv-sidecar relay` (one per engine) and its
//! subscribers (`kv-sidecar serve`, tests), published on NATS (docs/relay.md#output-router-coresrcprotocol).
//!
//! The types are written by hand with `prost` derives because no `protoc` is
//! available where kvmesh builds; the equivalent schema is below and is the
//! contract (field numbers never change meaning):
//!
//! ```proto
//! syntax = "proto3";
//! package kvmesh.v1;
//!
//! // <prefix>.events.<model>.<worker_id>
//! message KvEventBatch {
//!   string worker_id = 1;
//!   string model = 2;
//!   uint64 epoch = 3;             // one relay incarnation; seq restarts with it
//!   repeated KvEvent events = 4;  // consecutive seq numbers, in order
//!   uint64 timestamp_ms = 5;      // unix ms when the relay published
//! }
//! message KvEvent {
//!   uint64 seq = 1;               // per worker and epoch, starting at 1, no holes
//!   oneof kind {
//!     BlocksStored stored = 2;
//!     BlocksRemoved removed = 3;
//!     AllBlocksCleared cleared = 4;
//!     WorkerReset reset = 5;
//!     FullState full_state = 6;
//!   }
//! }
//! message BlocksStored {
//!   optional fixed64 parent = 1;  // seq hash of the block before hashes[0]
//!   repeated fixed64 hashes = 2;  // kvmesh seq hashes (docs/architecture.md#block-hashes), chained
//! }
//! message BlocksRemoved { repeated fixed64 hashes = 1; }
//! message AllBlocksCleared {}
//! message WorkerReset { ResetReason reason = 1; }
//! // A snapshot split in parts: part 0 replaces the view, later parts add,
//! // the view is complete again at the part with last = true.
//! message FullState { uint32 part = 1; bool last = 2; repeated fixed64 hashes = 3; }
//! enum ResetReason {
//!   RESET_REASON_UNSPECIFIED = 0;
//!   RESET_REASON_RELAY_STARTED = 1;
//!   RESET_REASON_ENGINE_RESTARTED = 2;
//!   RESET_REASON_EVENTS_LOST = 3;
//! }
//!
//! // <prefix>.workers.<model>: registration, then a heartbeat every second.
//! message WorkerInfo {
//!   string worker_id = 1;
//!   string model = 2;
//!   string address = 3;           // ip:port as Envoy knows the worker
//!   WorkerRole role = 4;
//!   EngineKind engine = 5;
//!   uint32 block_size = 6;
//!   uint64 epoch = 7;
//!   uint64 last_seq = 8;          // last event seq published in this epoch
//!   uint32 heartbeat_interval_ms = 9;
//!   uint64 timestamp_ms = 10;
//!   bool engine_unreachable = 11; // the relay cannot reach its engine
//! }
//! enum WorkerRole { WORKER_ROLE_UNSPECIFIED = 0; WORKER_ROLE_PREFILL = 1;
//!                   WORKER_ROLE_DECODE = 2; WORKER_ROLE_BOTH = 3; }
//! enum EngineKind { ENGINE_KIND_UNSPECIFIED = 0; ENGINE_KIND_VLLM = 1;
//!                   ENGINE_KIND_SGLANG = 2; ENGINE_KIND_TRTLLM = 3; }
//!
//! // <prefix>.load.<model>.<worker_id>
//! message WorkerLoad {
//!   string worker_id = 1;
//!   string model = 2;
//!   uint32 running = 3;
//!   uint32 waiting = 4;
//!   double kv_usage = 5;          // 0..1
//!   uint64 timestamp_ms = 6;
//! }
//! ```
//!
//! Hashes are `fixed64`: they are uniformly distributed, so a varint would
//! spend 10 bytes on most of them instead of 8.

mod view;

/// Re-exported so subscribers decode with the same prost as the types.
pub use prost::Message;
pub use view::{ApplyOutcome, WorkerView};

/// A batch of normalized KV events of one worker.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KvEventBatch {
    #[prost(string, tag = "1")]
    pub worker_id: String,
    #[prost(string, tag = "2")]
    pub model: String,
    #[prost(uint64, tag = "3")]
    pub epoch: u64,
    #[prost(message, repeated, tag = "4")]
    pub events: Vec<KvEvent>,
    #[prost(uint64, tag = "5")]
    pub timestamp_ms: u64,
}

/// One normalized event with its per-worker sequence number.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KvEvent {
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    #[prost(oneof = "kv_event::Kind", tags = "2, 3, 4, 5, 6")]
    pub kind: Option<kv_event::Kind>,
}

pub mod kv_event {
    /// What happened to the worker's block set.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "2")]
        Stored(super::BlocksStored),
        #[prost(message, tag = "3")]
        Removed(super::BlocksRemoved),
        #[prost(message, tag = "4")]
        Cleared(super::AllBlocksCleared),
        #[prost(message, tag = "5")]
        Reset(super::WorkerReset),
        #[prost(message, tag = "6")]
        FullState(super::FullState),
    }
}

/// Blocks now cached on the worker, as kvmesh seq hashes in chain order.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BlocksStored {
    #[prost(fixed64, optional, tag = "1")]
    pub parent: Option<u64>,
    #[prost(fixed64, repeated, tag = "2")]
    pub hashes: Vec<u64>,
}

/// Blocks evicted from the worker.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BlocksRemoved {
    #[prost(fixed64, repeated, tag = "1")]
    pub hashes: Vec<u64>,
}

/// The engine dropped its whole cache.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AllBlocksCleared {}

/// The relay lost track of the worker's cache: forget everything known about
/// it; what follows rebuilds the view from empty.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkerReset {
    #[prost(enumeration = "ResetReason", tag = "1")]
    pub reason: i32,
}

/// One part of a snapshot of the worker's whole block set.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FullState {
    #[prost(uint32, tag = "1")]
    pub part: u32,
    #[prost(bool, tag = "2")]
    pub last: bool,
    #[prost(fixed64, repeated, tag = "3")]
    pub hashes: Vec<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ResetReason {
    Unspecified = 0,
    RelayStarted = 1,
    EngineRestarted = 2,
    EventsLost = 3,
}

/// Registration and heartbeat of one worker.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkerInfo {
    #[prost(string, tag = "1")]
    pub worker_id: String,
    #[prost(string, tag = "2")]
    pub model: String,
    #[prost(string, tag = "3")]
    pub address: String,
    #[prost(enumeration = "WorkerRole", tag = "4")]
    pub role: i32,
    #[prost(enumeration = "EngineKind", tag = "5")]
    pub engine: i32,
    #[prost(uint32, tag = "6")]
    pub block_size: u32,
    #[prost(uint64, tag = "7")]
    pub epoch: u64,
    #[prost(uint64, tag = "8")]
    pub last_seq: u64,
    #[prost(uint32, tag = "9")]
    pub heartbeat_interval_ms: u32,
    #[prost(uint64, tag = "10")]
    pub timestamp_ms: u64,
    /// The relay cannot reach its engine (its metrics endpoint stopped
    /// answering): the worker must not be routed to. False by default, so
    /// relays that predate the field read as healthy.
    #[prost(bool, tag = "11")]
    pub engine_unreachable: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum WorkerRole {
    Unspecified = 0,
    Prefill = 1,
    Decode = 2,
    Both = 3,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum EngineKind {
    Unspecified = 0,
    Vllm = 1,
    Sglang = 2,
    Trtllm = 3,
}

/// Load of one worker, scraped from the engine's metrics.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkerLoad {
    #[prost(string, tag = "1")]
    pub worker_id: String,
    #[prost(string, tag = "2")]
    pub model: String,
    #[prost(uint32, tag = "3")]
    pub running: u32,
    #[prost(uint32, tag = "4")]
    pub waiting: u32,
    #[prost(double, tag = "5")]
    pub kv_usage: f64,
    #[prost(uint64, tag = "6")]
    pub timestamp_ms: u64,
}

/// NATS subject names (docs/relay.md#output-router-coresrcprotocol). Model names and worker ids are mapped to
/// single subject tokens: `.`, `*`, `>` and whitespace would otherwise split or
/// wildcard the subject, so they become `_` (the message body carries the
/// exact names).
pub mod subjects {
    pub fn token(name: &str) -> String {
        let token: String = name
            .chars()
            .map(|c| match c {
                '.' | '*' | '>' => '_',
                c if c.is_whitespace() || c.is_control() => '_',
                c => c,
            })
            .collect();
        if token.is_empty() {
            "_".to_owned()
        } else {
            token
        }
    }

    pub fn events(prefix: &str, model: &str, worker_id: &str) -> String {
        format!("{prefix}.events.{}.{}", token(model), token(worker_id))
    }

    pub fn load(prefix: &str, model: &str, worker_id: &str) -> String {
        format!("{prefix}.load.{}.{}", token(model), token(worker_id))
    }

    pub fn workers(prefix: &str, model: &str) -> String {
        format!("{prefix}.workers.{}", token(model))
    }

    /// Request subject: any message here makes the relay publish a full state
    /// on its events subject and reply with the seq of the snapshot's first part.
    pub fn sync(prefix: &str, model: &str, worker_id: &str) -> String {
        format!("{prefix}.sync.{}.{}", token(model), token(worker_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn batch_round_trips_and_keeps_large_hashes() {
        let batch = KvEventBatch {
            worker_id: "w0".into(),
            model: "Qwen/Qwen3-0.6B".into(),
            epoch: 7,
            events: vec![
                KvEvent {
                    seq: 1,
                    kind: Some(kv_event::Kind::Stored(BlocksStored {
                        parent: None,
                        hashes: vec![u64::MAX, 1 << 63, 3],
                    })),
                },
                KvEvent {
                    seq: 2,
                    kind: Some(kv_event::Kind::Reset(WorkerReset {
                        reason: ResetReason::EngineRestarted as i32,
                    })),
                },
            ],
            timestamp_ms: 1,
        };
        let bytes = batch.encode_to_vec();
        assert_eq!(KvEventBatch::decode(bytes.as_slice()).ok(), Some(batch));
    }

    #[test]
    fn hashes_are_fixed64_on_the_wire() {
        let removed = BlocksRemoved {
            hashes: vec![u64::MAX],
        };
        // tag (field 1, length-delimited), length 8, then 8 little-endian bytes.
        let mut expected = vec![0x0a, 8];
        expected.extend_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(removed.encode_to_vec(), expected);
    }

    #[test]
    fn subject_tokens_never_split_or_wildcard() {
        assert_eq!(
            subjects::events("kvmesh", "Qwen/Qwen3-0.6B", "w.1"),
            "kvmesh.events.Qwen/Qwen3-0_6B.w_1"
        );
        assert_eq!(
            subjects::workers("kvmesh", "a*b>c d"),
            "kvmesh.workers.a_b_c_d"
        );
        assert_eq!(subjects::token(""), "_");
    }
}
