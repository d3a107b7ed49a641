//! Decoders for the engines' KV event wire formats (docs/relay.md#input-formats-srcdecode). Pure
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
    /// Whichever tier holds the block: TensorRT-LLM's removals do not say,
    /// and it evicts blocks from its secondary tier too.
    Unstated,
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

/// What kind of attention a KV cache group serves (vLLM hybrid models keep
/// one group per layer type and publish every event per group).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupKind {
    /// Not published (single-group models, older engines, `unknown`).
    #[default]
    Unspecified,
    /// Full attention (also MLA, attention sinks): a block held here holds
    /// the KV of its whole prefix, so it is a prefix hit by itself.
    Full,
    /// Sliding window, chunked local attention, Mamba state, encoder-only or
    /// cross attention: the group keeps only part of a prefix, so its blocks
    /// alone are never a prefix hit.
    Partial,
}

impl GroupKind {
    /// vLLM's `kv_cache_spec_kind` values. A kind this relay does not know
    /// counts as unspecified: a block is left out only on positive evidence.
    pub fn parse(kind: &str) -> Self {
        match kind {
            "full_attention" | "mla_attention" | "sink_full_attention" => GroupKind::Full,
            "sliding_window"
            | "sliding_window_mla"
            | "chunked_local_attention"
            | "mamba"
            | "encoder_only_attention"
            | "cross_attention" => GroupKind::Partial,
            _ => GroupKind::Unspecified,
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
    /// The prompt's `cache_salt` (vLLM: a bare string in the first block's
    /// `extra_keys`; SGLang: `cache_salt` or `metadata.cache_salt`). Engines
    /// mix it into the first block of a chain only.
    pub cache_salt: Option<String>,
    /// Per block, a digest of the inputs other than tokens and salt that the
    /// engine hashed into it (vLLM `extra_keys`: multimodal identifiers,
    /// prompt-embedding digests); `None` for plain token blocks. Empty when
    /// no block has any.
    pub content_keys: Vec<Option<u64>>,
    /// KV cache group (vLLM `group_idx`; 0 when not published).
    pub group: u32,
    pub group_kind: GroupKind,
}

impl BlockStored {
    /// Plain token blocks on the GPU: no adapter, salt, content keys or
    /// cache group.
    pub fn on_gpu(
        block_hashes: Vec<EngineHash>,
        parent: Option<EngineHash>,
        token_ids: Vec<u32>,
        block_size: u32,
    ) -> Self {
        Self {
            block_hashes,
            parent,
            token_ids,
            block_size,
            lora_id: None,
            lora_name: None,
            medium: Medium::Gpu,
            cache_salt: None,
            content_keys: Vec::new(),
            group: 0,
            group_kind: GroupKind::Unspecified,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BlockRemoved {
    pub block_hashes: Vec<EngineHash>,
    pub medium: Medium,
    pub group: u32,
}

/// A block that moved between cache tiers (TensorRT-LLM `updated`).
#[derive(Debug, Clone, PartialEq)]
pub struct BlockMoved {
    pub block_hash: EngineHash,
    pub from: Medium,
    pub to: Medium,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    Stored(BlockStored),
    Removed(BlockRemoved),
    Moved(BlockMoved),
    AllCleared,
}

/// One engine batch: vLLM/SGLang's `[ts, events, dp_rank]`, or one poll of
/// TensorRT-LLM's event endpoint.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EventBatch {
    pub timestamp: f64,
    pub events: Vec<EngineEvent>,
    pub dp_rank: Option<i64>,
    /// Events of a kind the decoder knows but the relay does not use (a
    /// TensorRT-LLM `updated` that only changes priority), or of an unknown
    /// kind: counted, not fatal.
    pub ignored_events: u32,
    /// Events of a known kind that did not decode (a field of the wrong
    /// type, a partial trailing block): skipped and counted, the rest of the
    /// batch is kept.
    pub undecodable_events: u32,
}

#[derive(Debug, Clone, Error, PartialEq)]
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
    #[error("malformed event: {0}")]
    BadEvent(&'static str),
    #[error("event has no tag")]
    MissingTag,
    #[error("invalid JSON: {0}")]
    Json(String),
}
