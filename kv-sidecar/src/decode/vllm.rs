//! vLLM and SGLang KV event batches (msgpack, docs/relay.md#input-formats-srcdecode).
//!
//! The batch is `[ts, [events], dp_rank]` (older vLLM: `[ts, [events]]`).
//! Events come in two encodings, both accepted in one batch:
//! - array (vLLM ≤ 0.23, SGLang ≤ 0.5.19): `["BlockStored", block_hashes,
//!   parent, token_ids, block_size, lora_id, medium, ...]`, `["BlockRemoved",
//!   block_hashes, medium, ...]`, `["AllBlocksCleared"]`; older versions stop
//!   early. What follows `medium` differs by engine ([`Dialect`]), so the
//!   positions are read per engine family, never one layout for both;
//! - map (vLLM ≥ 0.24, SGLang ≥ 0.5.21): `{"type": "BlockStored",
//!   "block_hashes": ...}` with fields equal to their defaults omitted and
//!   unknown keys skipped.
//!
//! An event that is well-formed msgpack but not a valid event (a field of the
//! wrong type, a missing field) is skipped and counted in
//! [`EventBatch::undecodable_events`]; the rest of its batch is kept. Only a
//! batch whose envelope does not decode is an error.

use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use super::msgpack::Reader;
use super::{
    BlockRemoved, BlockStored, DecodeError, EngineEvent, EngineHash, EventBatch, GroupKind, Medium,
};

/// Which engine's array layout to read after the shared leading fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// vLLM: `BlockStored` continues `lora_name, extra_keys, group_idx,
    /// kv_cache_spec_kind, ...`; `BlockRemoved` continues `group_idx, ...`.
    Vllm,
    /// SGLang: a salted `BlockStored` (0.5.18–0.5.19) continues with a map
    /// `{"cache_salt": ...}`; nothing follows `medium` otherwise.
    Sglang,
}

/// SGLang 0.4's radix cache links a page stored directly under the tree's
/// root to the root's last page, whose tokens are none: the parent it
/// publishes is Python's `hash(())`, the same in every CPython since 3.8.
/// No page has that hash (its pages hash their tokens, never none), so it
/// means "no parent". Later releases publish nil.
const SGLANG_ROOT_PARENT: EngineHash = EngineHash(5_740_354_900_026_072_187);

/// Decodes one ZMQ payload frame.
pub fn decode_batch(payload: &[u8], dialect: Dialect) -> Result<EventBatch, DecodeError> {
    let mut reader = Reader::new(payload);
    let mut batch = EventBatch::default();
    if reader.next_is_map()? {
        let fields = reader.map_len()?;
        let mut saw_events = false;
        for _ in 0..fields {
            match reader.str()? {
                "ts" => batch.timestamp = reader.f64()?,
                "events" => {
                    read_events(&mut reader, dialect, &mut batch)?;
                    saw_events = true;
                }
                "data_parallel_rank" | "attn_dp_rank" => batch.dp_rank = optional_i64(&mut reader)?,
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
        read_events(&mut reader, dialect, &mut batch)?;
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

fn read_events(
    reader: &mut Reader<'_>,
    dialect: Dialect,
    batch: &mut EventBatch,
) -> Result<(), DecodeError> {
    let count = reader.array_len()?;
    batch.events.reserve(count.min(reader.remaining()));
    for _ in 0..count {
        let start = reader.position();
        match read_event(reader, dialect) {
            Ok(Some(event)) => batch.events.push(event),
            Ok(None) => batch.ignored_events = batch.ignored_events.saturating_add(1),
            Err(_) => {
                // Skip the whole event if it is well-formed msgpack at all;
                // if not, nothing after it can be located either.
                reader.rewind(start);
                reader.skip()?;
                batch.undecodable_events = batch.undecodable_events.saturating_add(1);
            }
        }
    }
    Ok(())
}

fn read_event(
    reader: &mut Reader<'_>,
    dialect: Dialect,
) -> Result<Option<EngineEvent>, DecodeError> {
    let fields = if reader.next_is_map()? {
        Fields::read_map(reader)?
    } else {
        Fields::read_array(reader, dialect)?
    };
    fields.into_event()
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
    cache_salt: Option<String>,
    extra_keys: ExtraKeys,
    group: Option<u32>,
    group_kind: Option<String>,
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
    fn read_array(reader: &mut Reader<'_>, dialect: Dialect) -> Result<Self, DecodeError> {
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
            match (tag, position, dialect) {
                (Tag::Stored | Tag::Removed, 1, _) => fields.block_hashes = Some(hashes(reader)?),
                (Tag::Stored, 2, Dialect::Vllm) => fields.parent = optional_hash(reader)?,
                (Tag::Stored, 2, Dialect::Sglang) => {
                    fields.parent = optional_hash(reader)?.filter(|p| *p != SGLANG_ROOT_PARENT)
                }
                (Tag::Stored, 3, _) => fields.token_ids = Some(token_ids(reader)?),
                (Tag::Stored, 4, _) => fields.block_size = Some(reader.u32()?),
                (Tag::Stored, 5, _) => fields.lora_id = optional_i64(reader)?,
                (Tag::Stored, 6, _) | (Tag::Removed, 2, _) => {
                    fields.medium = optional_string(reader)?
                }
                (Tag::Stored, 7, Dialect::Vllm) => fields.lora_name = optional_string(reader)?,
                (Tag::Stored, 8, Dialect::Vllm) => fields.extra_keys = ExtraKeys::read(reader)?,
                (Tag::Stored, 9, Dialect::Vllm) | (Tag::Removed, 3, Dialect::Vllm) => {
                    fields.group = optional_u32(reader)?
                }
                (Tag::Stored, 10, Dialect::Vllm) => fields.group_kind = optional_string(reader)?,
                (Tag::Stored, 7, Dialect::Sglang) => fields.cache_salt = salt_metadata(reader)?,
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
                "cache_salt" => fields.cache_salt = optional_string(reader)?,
                "metadata" => fields.cache_salt = salt_metadata(reader)?,
                "extra_keys" => fields.extra_keys = ExtraKeys::read(reader)?,
                "group_idx" => fields.group = optional_u32(reader)?,
                "kv_cache_spec_kind" => fields.group_kind = optional_string(reader)?,
                _ => reader.skip()?,
            }
        }
        Ok(fields)
    }

    /// `None` for an event kind the relay does not know.
    fn into_event(self) -> Result<Option<EngineEvent>, DecodeError> {
        let event = match self.tag.ok_or(DecodeError::MissingTag)? {
            Tag::Stored => {
                let (salt, content_keys) = self.extra_keys.resolve(self.lora_name.as_deref());
                EngineEvent::Stored(BlockStored {
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
                    cache_salt: self.cache_salt.or(salt),
                    content_keys,
                    group: self.group.unwrap_or(0),
                    group_kind: self
                        .group_kind
                        .as_deref()
                        .map_or(GroupKind::Unspecified, GroupKind::parse),
                })
            }
            Tag::Removed => EngineEvent::Removed(BlockRemoved {
                block_hashes: self
                    .block_hashes
                    .ok_or(DecodeError::MissingField("block_hashes"))?,
                medium: Medium::parse(self.medium.as_deref()),
                group: self.group.unwrap_or(0),
            }),
            Tag::Cleared => EngineEvent::AllCleared,
            Tag::Unknown => return Ok(None),
        };
        Ok(Some(event))
    }
}

/// vLLM's `extra_keys` as published: one entry (nil or a tuple) per block,
/// holding in order the LoRA name (when the event names an adapter),
/// multimodal keys, the cache salt (first block of a prompt only) and
/// prompt-embedding digests. Multimodal keys are `(mm_identifier, offset)`
/// pairs from vLLM 0.23 on and bare identifier strings before, so the salt
/// is the *last* string of the first entry once the LoRA name is dropped;
/// every other item is content kvmesh cannot see in token ids.
#[derive(Default)]
struct ExtraKeys {
    entries: Vec<Option<Vec<ExtraItem>>>,
}

enum ExtraItem {
    Text(String),
    /// xxh3 of the item's encoded bytes.
    Other(u64),
}

impl ExtraKeys {
    fn read(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut keys = ExtraKeys::default();
        if reader.take_nil()? {
            return Ok(keys);
        }
        let entries = reader.array_len()?;
        keys.entries.reserve(entries.min(reader.remaining()));
        for _ in 0..entries {
            let entry = if reader.take_nil()? {
                None
            } else if reader.next_is_array()? {
                let len = reader.array_len()?;
                let mut items = Vec::with_capacity(len.min(reader.remaining()));
                for _ in 0..len {
                    items.push(if reader.next_is_str()? {
                        ExtraItem::Text(reader.str()?.to_owned())
                    } else {
                        ExtraItem::Other(xxh3_64(reader.raw_value()?))
                    });
                }
                Some(items)
            } else {
                // Not the documented tuple: the whole entry is content.
                Some(vec![ExtraItem::Other(xxh3_64(reader.raw_value()?))])
            };
            keys.entries.push(entry);
        }
        Ok(keys)
    }

    /// (cache salt, per-block content digests — empty when there are none).
    fn resolve(self, lora_name: Option<&str>) -> (Option<String>, Vec<Option<u64>>) {
        let mut salt = None;
        let content: Vec<Option<u64>> = self
            .entries
            .into_iter()
            .enumerate()
            .map(|(block, entry)| {
                let mut items = entry?;
                if let (Some(ExtraItem::Text(first)), Some(name)) = (items.first(), lora_name) {
                    if first == name {
                        items.remove(0);
                    }
                }
                if block == 0 {
                    let last_text = items
                        .iter()
                        .rposition(|item| matches!(item, ExtraItem::Text(_)));
                    if let Some(ExtraItem::Text(text)) = last_text.map(|i| items.remove(i)) {
                        salt = Some(text);
                    }
                }
                content_digest(&items)
            })
            .collect();
        let content = if content.iter().any(Option::is_some) {
            content
        } else {
            Vec::new()
        };
        (salt, content)
    }
}

/// One digest of a block's content items, `None` without any.
fn content_digest(items: &[ExtraItem]) -> Option<u64> {
    if let [ExtraItem::Other(digest)] = items {
        return Some(*digest);
    }
    if items.is_empty() {
        return None;
    }
    let mut digest = Xxh3::new();
    for item in items {
        match item {
            ExtraItem::Text(text) => {
                digest.update(b"s");
                digest.update(&(text.len() as u64).to_le_bytes());
                digest.update(text.as_bytes());
            }
            ExtraItem::Other(other) => {
                digest.update(b"o");
                digest.update(&other.to_le_bytes());
            }
        }
    }
    Some(digest.digest())
}

/// SGLang 0.5.18–0.5.19's trailing `{"cache_salt": ...}` (nil when absent).
fn salt_metadata(reader: &mut Reader<'_>) -> Result<Option<String>, DecodeError> {
    if reader.take_nil()? {
        return Ok(None);
    }
    let mut salt = None;
    for _ in 0..reader.map_len()? {
        match reader.str()? {
            "cache_salt" => salt = optional_string(reader)?,
            _ => reader.skip()?,
        }
    }
    Ok(salt)
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

/// Token ids, each a number or (SGLang with EAGLE's bigram keys) a pair of
/// a token and the next one, whose first is the page's token.
fn token_ids(reader: &mut Reader<'_>) -> Result<Vec<u32>, DecodeError> {
    let len = reader.array_len()?;
    let mut out = Vec::with_capacity(len.min(reader.remaining()));
    for _ in 0..len {
        if reader.next_is_array()? {
            let pair = reader.array_len()?;
            if pair == 0 {
                return Err(DecodeError::BadBatch("an empty token id tuple"));
            }
            out.push(reader.u32()?);
            for _ in 1..pair {
                reader.skip()?;
            }
        } else {
            out.push(reader.u32()?);
        }
    }
    Ok(out)
}

fn optional_u32(reader: &mut Reader<'_>) -> Result<Option<u32>, DecodeError> {
    if reader.take_nil()? {
        Ok(None)
    } else {
        reader.u32().map(Some)
    }
}

fn optional_string(reader: &mut Reader<'_>) -> Result<Option<String>, DecodeError> {
    if reader.take_nil()? {
        Ok(None)
    } else {
        reader.str().map(|s| Some(s.to_owned()))
    }
}
