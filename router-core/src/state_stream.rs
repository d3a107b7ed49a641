//! Messages of the fleet state stream from `kv-sidecar serve` into each filter
//! VM: a snapshot, then ordered deltas. Shared so the sidecar encodes and the
//! filter decodes with the same code; written with `prost` derives (no protoc
//! here). Equivalent schema — field numbers never change meaning:
//!
//! ```proto
//! syntax = "proto3";
//! package kvmesh.v1;
//!
//! message StateUpdate {
//!   string model = 1;
//!   uint64 version = 2;          // the fleet view's version after this update
//!   oneof kind { Snapshot snapshot = 3; Delta delta = 4; }
//! }
//! message Snapshot { repeated WorkerSnapshot workers = 1; }
//! message WorkerSnapshot {
//!   string worker_id = 1;
//!   string address = 2;          // ip:port as Envoy knows the worker
//!   WorkerRole role = 3;
//!   repeated fixed64 blocks = 4; // kvmesh seq hashes held
//!   LoadReport load = 5;
//! }
//! message Delta { repeated Change changes = 1; }
//! message Change {
//!   oneof kind {
//!     WorkerJoined joined = 1; WorkerLeft left = 2;
//!     BlocksChanged stored = 3; BlocksChanged removed = 4;
//!     WorkerCleared cleared = 5; LoadReport load = 6;
//!   }
//! }
//! message WorkerJoined { string worker_id = 1; string address = 2; WorkerRole role = 3; }
//! message WorkerLeft { string worker_id = 1; }
//! message BlocksChanged { string worker_id = 1; repeated fixed64 hashes = 2; }
//! message WorkerCleared { string worker_id = 1; }
//! message LoadReport {
//!   string worker_id = 1;
//!   uint32 running = 2; uint32 waiting = 3;
//!   double kv_usage = 4;               // 0..1, from the engine
//!   uint64 active_blocks = 5;          // predicted by gateways' decisions
//!   uint64 queued_prefill_tokens = 6;  // predicted by gateways' decisions
//! }
//! ```

pub use crate::protocol::WorkerRole;

#[derive(Clone, PartialEq, prost::Message)]
pub struct StateUpdate {
    #[prost(string, tag = "1")]
    pub model: String,
    #[prost(uint64, tag = "2")]
    pub version: u64,
    #[prost(oneof = "state_update::Kind", tags = "3, 4")]
    pub kind: Option<state_update::Kind>,
}

pub mod state_update {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "3")]
        Snapshot(super::Snapshot),
        #[prost(message, tag = "4")]
        Delta(super::Delta),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Snapshot {
    #[prost(message, repeated, tag = "1")]
    pub workers: Vec<WorkerSnapshot>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkerSnapshot {
    #[prost(string, tag = "1")]
    pub worker_id: String,
    #[prost(string, tag = "2")]
    pub address: String,
    #[prost(enumeration = "WorkerRole", tag = "3")]
    pub role: i32,
    #[prost(fixed64, repeated, tag = "4")]
    pub blocks: Vec<u64>,
    #[prost(message, optional, tag = "5")]
    pub load: Option<LoadReport>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Delta {
    #[prost(message, repeated, tag = "1")]
    pub changes: Vec<Change>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Change {
    #[prost(oneof = "change::Kind", tags = "1, 2, 3, 4, 5, 6")]
    pub kind: Option<change::Kind>,
}

pub mod change {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "1")]
        Joined(super::WorkerJoined),
        #[prost(message, tag = "2")]
        Left(super::WorkerLeft),
        #[prost(message, tag = "3")]
        Stored(super::BlocksChanged),
        #[prost(message, tag = "4")]
        Removed(super::BlocksChanged),
        #[prost(message, tag = "5")]
        Cleared(super::WorkerCleared),
        #[prost(message, tag = "6")]
        Load(super::LoadReport),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkerJoined {
    #[prost(string, tag = "1")]
    pub worker_id: String,
    #[prost(string, tag = "2")]
    pub address: String,
    #[prost(enumeration = "WorkerRole", tag = "3")]
    pub role: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkerLeft {
    #[prost(string, tag = "1")]
    pub worker_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct BlocksChanged {
    #[prost(string, tag = "1")]
    pub worker_id: String,
    #[prost(fixed64, repeated, tag = "2")]
    pub hashes: Vec<u64>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkerCleared {
    #[prost(string, tag = "1")]
    pub worker_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LoadReport {
    #[prost(string, tag = "1")]
    pub worker_id: String,
    #[prost(uint32, tag = "2")]
    pub running: u32,
    #[prost(uint32, tag = "3")]
    pub waiting: u32,
    #[prost(double, tag = "4")]
    pub kv_usage: f64,
    #[prost(uint64, tag = "5")]
    pub active_blocks: u64,
    #[prost(uint64, tag = "6")]
    pub queued_prefill_tokens: u64,
}
