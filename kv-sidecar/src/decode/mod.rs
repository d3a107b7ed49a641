//! Decoders for the engines' KV event wire formats (DESIGN §3.3). Pure
//! functions from bytes to [`EventBatch`]; no I/O, no panics on any input.

mod msgpack;
pub mod trtllm;
pub mod vllm;

use thiserror::Error;

/// A block hash as the engine sent it, only ever used as a handle to find the
/// block again (removals, parents): kvmesh never matches on engine hashes.
///
/// Integer hashes are bit-cast to u64 (SGLang's signed i64 and vLLM's u64
/// share one space). Byte-string hashes (vLLM's sha256 modes) become the
/// xxh3-64 of the bytes: stable across relay restarts, and a collision only
/// confuses two handles of one worker with odds of 2^-64 per pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EngineHash(pub u64);

impl EngineHash {
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self(xxhash_rust::xxh3::xxh3_64(bytes))
    }
}

/// Where a block lives. Only GPU blocks serve prefix hits without a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Medium {
    Gpu,
    Other(String),
}

impl Medium {
    /// Engines omit the medium (older vLLM, defaults) for the GPU tier.
    pub fn parse(name: Option<&str>) -> Self {
        match name {
            None => Medium::Gpu,
            Some(name) if name.eq_ignore_ascii_case("gpu") => Medium::Gpu,
            Some(name) => Medium::Other(name.to_owned()),
        }
    }
}

/// Blocks the engine stored, in chain order.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockStored {
    pub block_hashes: Vec<EngineHash>,
    pub parent: Option<EngineHash>,
    /// `block_hashes.len() × block_size` tokens.
    pub token_ids: Vec<u32>,
    pub block_size: u32,
    /// vLLM's numeric adapter id; older versions send only this, which is not
    /// enough to seed kvmesh hashes (they use the adapter name).
    pub lora_id: Option<i64>,
    pub lora_name: Option<String>,
    pub medium: Medium,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BlockRemoved {
    pub block_hashes: Vec<EngineHash>,
    pub medium: Medium,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    Stored(BlockStored),
    Removed(BlockRemoved),
    AllCleared,
}

/// One engine batch: vLLM/SGLang's `[ts, events, dp_rank]`, or one poll of
/// TensorRT-LLM's event endpoint.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EventBatch {
    pub timestamp: f64,
    pub events: Vec<EngineEvent>,
    pub dp_rank: Option<i64>,
    /// Events of a kind the decoder knows but the relay does not use
    /// (TensorRT-LLM `updated`), or of an unknown kind: counted, not fatal.
    pub ignored_events: u32,
}

#[derive(Debug, Error, PartialEq)]
pub enum DecodeError {
    #[error("input ends early at byte {offset}")]
    Truncated { offset: usize },
    #[error("expected {expected} at byte {offset}, found marker 0x{marker:02x}")]
    UnexpectedType {
        expected: &'static str,
        marker: u8,
        offset: usize,
    },
    #[error("value at byte {offset} does not fit in {what}")]
    OutOfRange { what: &'static str, offset: usize },
    #[error("invalid UTF-8 in string at byte {offset}")]
    InvalidUtf8 { offset: usize },
    #[error("{0} trailing bytes after the batch")]
    TrailingBytes(usize),
    #[error("event is missing required field `{0}`")]
    MissingField(&'static str),
    #[error("batch is not [ts, events, dp_rank]: {0}")]
    BadBatch(&'static str),
    #[error("event has no tag")]
    MissingTag,
    #[error("invalid JSON: {0}")]
    Json(String),
}
