//! TensorRT-LLM KV cache events: the JSON array `trtllm-serve` returns from
//! `POST /kv_cache_events` (docs/relay.md#input-formats-srcdecode):
//! `[{"event_id": 7, "data": {"type": "stored", "parent_hash": …, "blocks":
//! [{"block_hash": …, "tokens": [{"token_id": …}, …], "cache_level": 0}]},
//! "window_size": 32}, …]`.
//!
//! - Hashes are u64 JSON numbers above 2^53: serde_json keeps integers exact
//!   as long as the target is an integer type, which every hash field here
//!   is. Some builds print them signed; the `v2_sha256` hash mode sends hex
//!   strings, which become [`EngineHash::from_bytes`] of the decoded bytes.
//! - With partial block reuse (`allowPartial`) a `stored` event can end with
//!   a block holding fewer tokens than a full block: it is dropped (kvmesh
//!   hashes full blocks only) and counted, the full blocks are kept.
//! - `updated` with a `cache_level` change is a block moving between tiers
//!   (0 = GPU); one changing only the priority is ignored.
//!
//! Events decode one by one: an event that does not decode keeps its
//! `event_id` (so the sequence stays checkable) and is counted.
//! - With attention data parallelism every rank numbers its own events and
//!   keeps its own cache, and one response gathers all ranks' events
//!   (`attention_dp_rank`). Only rank 0's are kept: interleaved, the ranks'
//!   ids look like holes and restarts, and one rank's `created` would clear
//!   the others' blocks. The rest are counted in [`Poll::other_rank_events`].

use serde::Deserialize;
use serde_json::Value;

use super::{
    BlockMoved, BlockRemoved, BlockStored, DecodeError, EngineEvent, EngineHash, GroupKind, Medium,
};

/// One TensorRT-LLM event with its engine-wide id (consecutive; a hole means
/// the engine's event buffer overflowed between two polls).
#[derive(Debug, Clone, PartialEq)]
pub struct NumberedEvent {
    pub event_id: u64,
    pub event: Decoded,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    Event(EngineEvent),
    /// A kind the relay does not use (`updated` of the priority only, unknown
    /// types).
    Ignored,
    Undecodable(DecodeError),
}

/// One response body.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Poll {
    pub events: Vec<NumberedEvent>,
    /// Partial trailing blocks dropped from `stored` events.
    pub partial_blocks: u64,
    /// Events of attention-DP ranks other than 0, left out.
    pub other_rank_events: u32,
}

#[derive(Deserialize)]
struct RawEvent {
    event_id: u64,
    data: Value,
    #[serde(default)]
    attention_dp_rank: Option<u64>,
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
    Updated {
        block_hash: RawHash,
        #[serde(default)]
        cache_level: Option<RawDiff>,
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

#[derive(Deserialize)]
struct RawDiff {
    old_value: u32,
    new_value: u32,
}

/// A hash as u64, as i64 bit-cast (some builds print signed values), or as
/// a hex string (`v2_sha256`).
#[derive(Deserialize)]
#[serde(untagged)]
enum RawHash {
    Unsigned(u64),
    Signed(i64),
    Hex(String),
}

impl RawHash {
    fn engine_hash(&self) -> Result<EngineHash, DecodeError> {
        match self {
            RawHash::Unsigned(v) => Ok(EngineHash(*v)),
            RawHash::Signed(v) => Ok(EngineHash(*v as u64)),
            RawHash::Hex(text) => hex_bytes(text)
                .map(|bytes| EngineHash::from_bytes(&bytes))
                .ok_or(DecodeError::BadEvent("block hash string is not hex")),
        }
    }
}

fn hex_bytes(text: &str) -> Option<Vec<u8>> {
    let text = text.strip_prefix("0x").unwrap_or(text);
    if text.is_empty() || !text.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| char::from(c).to_digit(16);
    text.as_bytes()
        .chunks_exact(2)
        .map(|pair| match pair {
            [high, low] => Some((digit(*high)? << 4 | digit(*low)?) as u8),
            _ => None,
        })
        .collect()
}

fn medium(cache_level: u32) -> Medium {
    match cache_level {
        0 => Medium::Gpu,
        level => Medium::Other(format!("cache_level_{level}")),
    }
}

/// Decodes one response body; `block_size` is the engine's tokens per
/// block, which tells a partial single-block `stored` from a full one.
pub fn decode_events(body: &[u8], block_size: u32) -> Result<Poll, DecodeError> {
    let raw: Vec<RawEvent> =
        serde_json::from_slice(body).map_err(|e| DecodeError::Json(e.to_string()))?;
    let mut poll = Poll {
        events: Vec::with_capacity(raw.len()),
        partial_blocks: 0,
        other_rank_events: 0,
    };
    for RawEvent {
        event_id,
        data,
        attention_dp_rank,
    } in raw
    {
        if attention_dp_rank.is_some_and(|rank| rank != 0) {
            poll.other_rank_events = poll.other_rank_events.saturating_add(1);
            continue;
        }
        let event = match serde_json::from_value::<RawData>(data) {
            Ok(data) => convert(data, block_size, &mut poll.partial_blocks),
            Err(error) => Err(DecodeError::Json(error.to_string())),
        };
        let event = match event {
            Ok(Some(event)) => Decoded::Event(event),
            Ok(None) => Decoded::Ignored,
            Err(error) => Decoded::Undecodable(error),
        };
        poll.events.push(NumberedEvent { event_id, event });
    }
    Ok(poll)
}

fn convert(
    data: RawData,
    block_size: u32,
    partial_blocks: &mut u64,
) -> Result<Option<EngineEvent>, DecodeError> {
    let event = match data {
        // A freshly created cache holds no blocks.
        RawData::Created {} => EngineEvent::AllCleared,
        RawData::Stored {
            parent_hash,
            blocks,
        } => match stored(parent_hash, blocks, block_size, partial_blocks)? {
            Some(stored) => EngineEvent::Stored(stored),
            None => return Ok(None),
        },
        RawData::Removed { block_hashes } => EngineEvent::Removed(BlockRemoved {
            block_hashes: block_hashes
                .iter()
                .map(RawHash::engine_hash)
                .collect::<Result<_, _>>()?,
            medium: Medium::Unstated,
            group: 0,
        }),
        RawData::Updated {
            block_hash,
            cache_level: Some(level),
        } if level.old_value != level.new_value => EngineEvent::Moved(BlockMoved {
            block_hash: block_hash.engine_hash()?,
            from: medium(level.old_value),
            to: medium(level.new_value),
        }),
        RawData::Updated { .. } | RawData::Other => return Ok(None),
    };
    Ok(Some(event))
}

/// `None` when the event held only a partial block.
fn stored(
    parent: Option<RawHash>,
    mut blocks: Vec<RawBlock>,
    block_size: u32,
    partial_blocks: &mut u64,
) -> Result<Option<BlockStored>, DecodeError> {
    let Some(first) = blocks.first() else {
        return Err(DecodeError::MissingField("blocks"));
    };
    // Only the last block of an event may hold fewer tokens than a full one
    // (a partial block); with several blocks the first is full.
    let full = if blocks.len() >= 2 {
        first.tokens.len()
    } else {
        block_size as usize
    };
    if blocks.last().is_some_and(|b| b.tokens.len() < full) {
        blocks.pop();
        *partial_blocks += 1;
    }
    let Some(first) = blocks.first() else {
        return Ok(None);
    };
    let tokens_per_block = first.tokens.len();
    if blocks.iter().any(|b| b.tokens.len() != tokens_per_block) {
        return Err(DecodeError::BadEvent(
            "stored blocks of unequal token counts",
        ));
    }
    let block_size = u32::try_from(tokens_per_block).map_err(|_| DecodeError::OutOfRange {
        what: "block size",
        offset: 0,
    })?;
    Ok(Some(BlockStored {
        block_hashes: blocks
            .iter()
            .map(|b| b.block_hash.engine_hash())
            .collect::<Result<_, _>>()?,
        parent: parent.as_ref().map(RawHash::engine_hash).transpose()?,
        token_ids: blocks
            .iter()
            .flat_map(|b| b.tokens.iter().map(|t| t.token_id))
            .collect(),
        block_size,
        lora_id: first.lora_id,
        lora_name: None,
        medium: medium(first.cache_level.unwrap_or(0)),
        cache_salt: None,
        content_keys: Vec::new(),
        group: 0,
        group_kind: GroupKind::Unspecified,
    }))
}
