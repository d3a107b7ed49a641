//! TensorRT-LLM KV cache events: the JSON array `trtllm-serve` returns from
//! `POST /kv_cache_events` (DESIGN §3.3):
//! `[{"event_id": 7, "data": {"type": "stored", "parent_hash": …, "blocks":
//! [{"block_hash": …, "tokens": [{"token_id": …}, …], "cache_level": 0}]},
//! "window_size": 32}, …]`.
//!
//! Hashes are u64 JSON numbers above 2^53: serde_json keeps integers exact as
//! long as the target is an integer type, which every hash field here is.

use serde::Deserialize;

use super::{BlockRemoved, BlockStored, DecodeError, EngineEvent, EngineHash, Medium};

/// One TensorRT-LLM event with its engine-wide id (consecutive; a hole means
/// the engine's event buffer overflowed between two polls).
#[derive(Debug, Clone, PartialEq)]
pub struct NumberedEvent {
    pub event_id: u64,
    /// `None` for a kind the relay does not use (`updated`, unknown).
    pub event: Option<EngineEvent>,
}

#[derive(Deserialize)]
struct RawEvent {
    event_id: u64,
    data: RawData,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum RawData {
    Created {},
    Stored {
        #[serde(default)]
        parent_hash: Option<RawHash>,
        blocks: Vec<RawBlock>,
    },
    Removed {
        block_hashes: Vec<RawHash>,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct RawBlock {
    block_hash: RawHash,
    tokens: Vec<RawToken>,
    #[serde(default)]
    lora_id: Option<i64>,
    #[serde(default)]
    cache_level: Option<u32>,
}

#[derive(Deserialize)]
struct RawToken {
    token_id: u32,
}

/// A hash as u64, or as i64 bit-cast (some builds print signed values).
#[derive(Deserialize)]
#[serde(untagged)]
enum RawHash {
    Unsigned(u64),
    Signed(i64),
}

impl RawHash {
    fn engine_hash(&self) -> EngineHash {
        match *self {
            RawHash::Unsigned(v) => EngineHash(v),
            RawHash::Signed(v) => EngineHash(v as u64),
        }
    }
}

/// Decodes one response body.
pub fn decode_events(body: &[u8]) -> Result<Vec<NumberedEvent>, DecodeError> {
    let raw: Vec<RawEvent> =
        serde_json::from_slice(body).map_err(|e| DecodeError::Json(e.to_string()))?;
    raw.into_iter().map(convert).collect()
}

fn convert(raw: RawEvent) -> Result<NumberedEvent, DecodeError> {
    let event = match raw.data {
        // A freshly created cache holds no blocks.
        RawData::Created {} => Some(EngineEvent::AllCleared),
        RawData::Stored {
            parent_hash,
            blocks,
        } => Some(EngineEvent::Stored(stored(parent_hash, blocks)?)),
        RawData::Removed { block_hashes } => Some(EngineEvent::Removed(BlockRemoved {
            block_hashes: block_hashes.iter().map(RawHash::engine_hash).collect(),
            medium: Medium::Gpu,
        })),
        RawData::Other => None,
    };
    Ok(NumberedEvent {
        event_id: raw.event_id,
        event,
    })
}

fn stored(parent: Option<RawHash>, blocks: Vec<RawBlock>) -> Result<BlockStored, DecodeError> {
    let first = blocks.first().ok_or(DecodeError::MissingField("blocks"))?;
    // Every block of one event carries its own tokens; they must be equally
    // long to be the engine's block size. A ragged event is a format error.
    let block_size = first.tokens.len();
    if blocks.iter().any(|b| b.tokens.len() != block_size) {
        return Err(DecodeError::BadBatch(
            "stored blocks of unequal token counts",
        ));
    }
    let block_size = u32::try_from(block_size).map_err(|_| DecodeError::OutOfRange {
        what: "block size",
        offset: 0,
    })?;
    let medium = match first.cache_level {
        None | Some(0) => Medium::Gpu,
        Some(level) => Medium::Other(format!("cache_level_{level}")),
    };
    Ok(BlockStored {
        block_hashes: blocks.iter().map(|b| b.block_hash.engine_hash()).collect(),
        parent: parent.as_ref().map(RawHash::engine_hash),
        token_ids: blocks
            .iter()
            .flat_map(|b| b.tokens.iter().map(|t| t.token_id))
            .collect(),
        block_size,
        lora_id: first.lora_id,
        lora_name: None,
        medium,
    })
}
