//! vLLM and SGLang KV event batches (msgpack, DESIGN §3.3).
//!
//! The batch is `[ts, [events], dp_rank]` (older vLLM: `[ts, [events]]`).
//! Events come in two encodings, both accepted in one batch:
//! - array (vLLM ≤ 0.23, SGLang): `["BlockStored", block_hashes, parent,
//!   token_ids, block_size, lora_id, medium, lora_name, extra_keys, ...]`,
//!   `["BlockRemoved", block_hashes, medium, ...]`, `["AllBlocksCleared"]`;
//!   older versions stop early, newer ones append fields: trailing fields are
//!   optional and unknown ones skipped;
//! - map (newer vLLM): `{"type": "BlockStored", "block_hashes": ...}` with
//!   fields equal to their defaults omitted and unknown keys skipped.

use super::msgpack::Reader;
use super::{BlockRemoved, BlockStored, DecodeError, EngineEvent, EngineHash, EventBatch, Medium};

/// Decodes one ZMQ payload frame.
pub fn decode_batch(payload: &[u8]) -> Result<EventBatch, DecodeError> {
    let mut reader = Reader::new(payload);
    let mut batch = EventBatch::default();
    if reader.next_is_map()? {
        let fields = reader.map_len()?;
        let mut saw_events = false;
        for _ in 0..fields {
            match reader.str()? {
                "ts" => batch.timestamp = reader.f64()?,
                "events" => {
                    read_events(&mut reader, &mut batch)?;
                    saw_events = true;
                }
                "data_parallel_rank" => batch.dp_rank = optional_i64(&mut reader)?,
                _ => reader.skip()?,
            }
        }
        if !saw_events {
            return Err(DecodeError::BadBatch("map batch without `events`"));
        }
    } else {
        let len = reader.array_len()?;
        if len < 2 {
            return Err(DecodeError::BadBatch("fewer than 2 elements"));
        }
        batch.timestamp = reader.f64()?;
        read_events(&mut reader, &mut batch)?;
        if len >= 3 {
            batch.dp_rank = optional_i64(&mut reader)?;
        }
        for _ in 3..len {
            reader.skip()?;
        }
    }
    if !reader.is_at_end() {
        return Err(DecodeError::TrailingBytes(reader.remaining()));
    }
    Ok(batch)
}

fn optional_i64(reader: &mut Reader<'_>) -> Result<Option<i64>, DecodeError> {
    if reader.take_nil()? {
        Ok(None)
    } else {
        reader.i64().map(Some)
    }
}

fn read_events(reader: &mut Reader<'_>, batch: &mut EventBatch) -> Result<(), DecodeError> {
    let count = reader.array_len()?;
    batch.events.reserve(count.min(reader.remaining()));
    for _ in 0..count {
        let fields = if reader.next_is_map()? {
            Fields::read_map(reader)?
        } else {
            Fields::read_array(reader)?
        };
        match fields.into_event()? {
            Some(event) => batch.events.push(event),
            None => batch.ignored_events = batch.ignored_events.saturating_add(1),
        }
    }
    Ok(())
}

/// The union of all event fields, filled from either encoding.
#[derive(Default)]
struct Fields {
    tag: Option<Tag>,
    block_hashes: Option<Vec<EngineHash>>,
    parent: Option<EngineHash>,
    token_ids: Option<Vec<u32>>,
    block_size: Option<u32>,
    lora_id: Option<i64>,
    medium: Option<String>,
    lora_name: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tag {
    Stored,
    Removed,
    Cleared,
    Unknown,
}

impl Tag {
    fn parse(name: &str) -> Self {
        match name {
            "BlockStored" => Tag::Stored,
            "BlockRemoved" => Tag::Removed,
            "AllBlocksCleared" => Tag::Cleared,
            _ => Tag::Unknown,
        }
    }
}

impl Fields {
    fn read_array(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let len = reader.array_len()?;
        if len == 0 {
            return Err(DecodeError::MissingTag);
        }
        let tag = Tag::parse(reader.str()?);
        let mut fields = Fields {
            tag: Some(tag),
            ..Fields::default()
        };
        for position in 1..len {
            match (tag, position) {
                (Tag::Stored | Tag::Removed, 1) => fields.block_hashes = Some(hashes(reader)?),
                (Tag::Stored, 2) => fields.parent = optional_hash(reader)?,
                (Tag::Stored, 3) => fields.token_ids = Some(token_ids(reader)?),
                (Tag::Stored, 4) => fields.block_size = Some(reader.u32()?),
                (Tag::Stored, 5) => fields.lora_id = optional_i64(reader)?,
                (Tag::Stored, 6) | (Tag::Removed, 2) => fields.medium = optional_string(reader)?,
                (Tag::Stored, 7) => fields.lora_name = optional_string(reader)?,
                _ => reader.skip()?,
            }
        }
        Ok(fields)
    }

    fn read_map(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let len = reader.map_len()?;
        let mut fields = Fields::default();
        for _ in 0..len {
            match reader.str()? {
                "type" => fields.tag = Some(Tag::parse(reader.str()?)),
                "block_hashes" => fields.block_hashes = Some(hashes(reader)?),
                "parent_block_hash" => fields.parent = optional_hash(reader)?,
                "token_ids" => fields.token_ids = Some(token_ids(reader)?),
                "block_size" => fields.block_size = Some(reader.u32()?),
                "lora_id" => fields.lora_id = optional_i64(reader)?,
                "medium" => fields.medium = optional_string(reader)?,
                "lora_name" => fields.lora_name = optional_string(reader)?,
                _ => reader.skip()?,
            }
        }
        Ok(fields)
    }

    /// `None` for an event kind the relay does not know.
    fn into_event(self) -> Result<Option<EngineEvent>, DecodeError> {
        let event = match self.tag.ok_or(DecodeError::MissingTag)? {
            Tag::Stored => EngineEvent::Stored(BlockStored {
                block_hashes: self
                    .block_hashes
                    .ok_or(DecodeError::MissingField("block_hashes"))?,
                parent: self.parent,
                token_ids: self
                    .token_ids
                    .ok_or(DecodeError::MissingField("token_ids"))?,
                block_size: self
                    .block_size
                    .ok_or(DecodeError::MissingField("block_size"))?,
                lora_id: self.lora_id,
                lora_name: self.lora_name,
                medium: Medium::parse(self.medium.as_deref()),
            }),
            Tag::Removed => EngineEvent::Removed(BlockRemoved {
                block_hashes: self
                    .block_hashes
                    .ok_or(DecodeError::MissingField("block_hashes"))?,
                medium: Medium::parse(self.medium.as_deref()),
            }),
            Tag::Cleared => EngineEvent::AllCleared,
            Tag::Unknown => return Ok(None),
        };
        Ok(Some(event))
    }
}

fn hash(reader: &mut Reader<'_>) -> Result<EngineHash, DecodeError> {
    if reader.next_is_bytes()? {
        Ok(EngineHash::from_bytes(reader.bytes()?))
    } else {
        Ok(EngineHash(reader.int()?.bits()))
    }
}

fn optional_hash(reader: &mut Reader<'_>) -> Result<Option<EngineHash>, DecodeError> {
    if reader.take_nil()? {
        Ok(None)
    } else {
        hash(reader).map(Some)
    }
}

fn hashes(reader: &mut Reader<'_>) -> Result<Vec<EngineHash>, DecodeError> {
    let len = reader.array_len()?;
    let mut out = Vec::with_capacity(len.min(reader.remaining()));
    for _ in 0..len {
        out.push(hash(reader)?);
    }
    Ok(out)
}

fn token_ids(reader: &mut Reader<'_>) -> Result<Vec<u32>, DecodeError> {
    let len = reader.array_len()?;
    let mut out = Vec::with_capacity(len.min(reader.remaining()));
    for _ in 0..len {
        out.push(reader.u32()?);
    }
    Ok(out)
}

fn optional_string(reader: &mut Reader<'_>) -> Result<Option<String>, DecodeError> {
    if reader.take_nil()? {
        Ok(None)
    } else {
        reader.str().map(|s| Some(s.to_owned()))
    }
}
