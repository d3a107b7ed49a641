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
    /// This chunk continues the previous snapshot chunk of the same version:
    /// add to the view instead of replacing it. Large snapshots are sent in
    /// chunks so a filter applies each in its own short callback.
    #[prost(bool, tag = "2")]
    pub continues: bool,
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

/// Splits a snapshot update into chunks of at most `max_blocks` blocks each
/// (a worker's blocks may span several), the first replacing the view and the
/// rest continuing it. Any other update is returned as it is.
pub fn split_snapshot(update: StateUpdate, max_blocks: usize) -> Vec<StateUpdate> {
    let Some(state_update::Kind::Snapshot(whole)) = update.kind else {
        return vec![update];
    };
    let max_blocks = max_blocks.max(1);
    let mut chunks: Vec<Snapshot> = vec![Snapshot {
        workers: Vec::new(),
        continues: whole.continues,
    }];
    let mut room = max_blocks;
    for worker in whole.workers {
        let mut rest = worker.blocks.as_slice();
        loop {
            let (now, later) = rest.split_at(rest.len().min(room));
            if let Some(chunk) = chunks.last_mut() {
                chunk.workers.push(WorkerSnapshot {
                    blocks: now.to_vec(),
                    ..worker.clone()
                });
            }
            room -= now.len();
            rest = later;
            if room == 0 {
                chunks.push(Snapshot {
                    workers: Vec::new(),
                    continues: true,
                });
                room = max_blocks;
            }
            if rest.is_empty() {
                break;
            }
        }
    }
    if chunks.len() > 1 && chunks.last().is_some_and(|c| c.workers.is_empty()) {
        chunks.pop();
    }
    chunks
        .into_iter()
        .map(|chunk| StateUpdate {
            model: update.model.clone(),
            version: update.version,
            kind: Some(state_update::Kind::Snapshot(chunk)),
        })
        .collect()
}
