//! msgpack encoding of KV event batches, byte-compatible with vLLM's
//! `msgspec` structs (docs/relay.md#input-formats-srcdecode). Pure: no I/O.
//!
//! A batch is the array `[ts, [event, ...], data_parallel_rank]`, stamped
//! with the publishing rank as vLLM's publisher stamps it. Events:
//!
//! * `array` format (vLLM ≤ 0.23 `array_like` tagged structs):
//!   `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name]`,
//!   `["BlockRemoved", block_hashes, medium]`, `["AllBlocksCleared"]`;
//! * `map` format (newer vLLM): `{"type": tag, field: value, ...}` with the
//!   fields whose value equals their default (`lora_id`, `lora_name` = nil)
//!   omitted.
//!
//! Block hashes are msgpack unsigned integers (u64, may exceed 2^63).

use std::convert::Infallible;

use rmp::encode::{self, ByteBuf, ValueWriteError};

use crate::config::EventFormat;
use crate::kv_cache::CacheEvent;

/// Storage tier reported for every block: the simulated GPU.
pub const MEDIUM_GPU: &str = "GPU";

/// How a publisher encodes its batches.
#[derive(Debug, Clone, Copy)]
pub struct BatchFormat {
    pub format: EventFormat,
    pub block_size: u32,
    pub data_parallel_rank: u32,
}

/// Encodes one batch of events produced at wall-clock time `ts` (Unix seconds).
pub fn encode_batch(ts: f64, events: &[CacheEvent], batch: BatchFormat) -> Vec<u8> {
    let BatchFormat {
        format,
        block_size,
        data_parallel_rank,
    } = batch;
    let mut out = ByteBuf::with_capacity(64 + events.len() * 32);
    ok(encode::write_array_len(&mut out, 3));
    ok(encode::write_f64(&mut out, ts));
    ok(encode::write_array_len(&mut out, len32(events.len())));
    for event in events {
        match format {
            EventFormat::Array => write_array_event(&mut out, event, block_size),
            EventFormat::Map => write_map_event(&mut out, event, block_size),
        }
    }
    ok(encode::write_uint(&mut out, u64::from(data_parallel_rank)));
    out.into_vec()
}

fn write_array_event(out: &mut ByteBuf, event: &CacheEvent, block_size: u32) {
    match event {
        CacheEvent::Stored {
            block_hashes,
            parent_block_hash,
            token_ids,
        } => {
            ok(encode::write_array_len(out, 8));
            ok(encode::write_str(out, "BlockStored"));
            write_u64s(out, block_hashes);
            write_optional_u64(out, *parent_block_hash);
            write_u32s(out, token_ids);
            ok(encode::write_uint(out, u64::from(block_size)));
            ok(encode::write_nil(out)); // lora_id
            ok(encode::write_str(out, MEDIUM_GPU));
            ok(encode::write_nil(out)); // lora_name
        }
        CacheEvent::Removed { block_hashes } => {
            ok(encode::write_array_len(out, 3));
            ok(encode::write_str(out, "BlockRemoved"));
            write_u64s(out, block_hashes);
            ok(encode::write_str(out, MEDIUM_GPU));
        }
        CacheEvent::AllCleared => {
            ok(encode::write_array_len(out, 1));
            ok(encode::write_str(out, "AllBlocksCleared"));
        }
    }
}

fn write_map_event(out: &mut ByteBuf, event: &CacheEvent, block_size: u32) {
    match event {
        CacheEvent::Stored {
            block_hashes,
            parent_block_hash,
            token_ids,
        } => {
            // lora_id and lora_name are nil, their default: omitted.
            ok(encode::write_map_len(out, 6));
            write_key(out, "type");
            ok(encode::write_str(out, "BlockStored"));
            write_key(out, "block_hashes");
            write_u64s(out, block_hashes);
            write_key(out, "parent_block_hash");
            write_optional_u64(out, *parent_block_hash);
            write_key(out, "token_ids");
            write_u32s(out, token_ids);
            write_key(out, "block_size");
            ok(encode::write_uint(out, u64::from(block_size)));
            write_key(out, "medium");
            ok(encode::write_str(out, MEDIUM_GPU));
        }
        CacheEvent::Removed { block_hashes } => {
            ok(encode::write_map_len(out, 3));
            write_key(out, "type");
            ok(encode::write_str(out, "BlockRemoved"));
            write_key(out, "block_hashes");
            write_u64s(out, block_hashes);
            write_key(out, "medium");
            ok(encode::write_str(out, MEDIUM_GPU));
        }
        CacheEvent::AllCleared => {
            ok(encode::write_map_len(out, 1));
            write_key(out, "type");
            ok(encode::write_str(out, "AllBlocksCleared"));
        }
    }
}

fn write_key(out: &mut ByteBuf, key: &str) {
    ok(encode::write_str(out, key));
}

fn write_u64s(out: &mut ByteBuf, values: &[u64]) {
    ok(encode::write_array_len(out, len32(values.len())));
    for value in values {
        ok(encode::write_uint(out, *value));
    }
}

fn write_u32s(out: &mut ByteBuf, values: &[u32]) {
    ok(encode::write_array_len(out, len32(values.len())));
    for value in values {
        ok(encode::write_uint(out, u64::from(*value)));
    }
}

fn write_optional_u64(out: &mut ByteBuf, value: Option<u64>) {
    match value {
        Some(v) => ok(encode::write_uint(out, v)),
        None => ok(encode::write_nil(out)),
    }
}

/// msgpack arrays hold at most 2^32 - 1 items; batches are far smaller.
fn len32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// Writes into a [`ByteBuf`] cannot fail: its error type is uninhabited.
fn ok<T, E: Uninhabited>(result: Result<T, E>) {
    if let Err(error) = result {
        error.unreachable();
    }
}

trait Uninhabited {
    fn unreachable(self);
}

impl Uninhabited for Infallible {
    fn unreachable(self) {
        match self {}
    }
}

impl Uninhabited for ValueWriteError<Infallible> {
    fn unreachable(self) {
        match self {
            ValueWriteError::InvalidMarkerWrite(e) | ValueWriteError::InvalidDataWrite(e) => {
                match e {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored() -> CacheEvent {
        CacheEvent::Stored {
            block_hashes: vec![u64::MAX, 7],
            parent_block_hash: None,
            token_ids: vec![1, 300],
        }
    }

    fn format(format: EventFormat, block_size: u32) -> BatchFormat {
        BatchFormat {
            format,
            block_size,
            data_parallel_rank: 0,
        }
    }

    #[test]
    fn array_batch_bytes_are_exact() {
        let bytes = encode_batch(1.5, &[stored()], format(EventFormat::Array, 1));
        let mut expected = vec![0x93, 0xcb];
        expected.extend_from_slice(&1.5f64.to_be_bytes());
        expected.push(0x91); // one event
        expected.push(0x98); // array of 8
        expected.push(0xab);
        expected.extend_from_slice(b"BlockStored");
        expected.extend_from_slice(&[0x92, 0xcf]);
        expected.extend_from_slice(&u64::MAX.to_be_bytes());
        expected.push(0x07);
        expected.push(0xc0); // parent nil
        expected.extend_from_slice(&[0x92, 0x01, 0xcd, 0x01, 0x2c]);
        expected.push(0x01); // block size
        expected.push(0xc0); // lora_id
        expected.extend_from_slice(&[0xa3, b'G', b'P', b'U']);
        expected.push(0xc0); // lora_name
        expected.push(0x00); // data_parallel_rank
        assert_eq!(bytes, expected);
    }

    #[test]
    fn removed_and_cleared_in_array_form() {
        let bytes = encode_batch(
            0.0,
            &[
                CacheEvent::Removed {
                    block_hashes: vec![5],
                },
                CacheEvent::AllCleared,
            ],
            BatchFormat {
                data_parallel_rank: 3,
                ..format(EventFormat::Array, 16)
            },
        );
        let tail = &bytes[10..];
        let mut expected = vec![0x92, 0x93, 0xac];
        expected.extend_from_slice(b"BlockRemoved");
        expected.extend_from_slice(&[0x91, 0x05, 0xa3, b'G', b'P', b'U', 0x91, 0xb0]);
        expected.extend_from_slice(b"AllBlocksCleared");
        expected.push(0x03); // data_parallel_rank
        assert_eq!(tail, expected.as_slice());
    }

    #[test]
    fn map_form_names_fields_and_omits_nil_lora() {
        let bytes = encode_batch(0.0, &[stored()], format(EventFormat::Map, 16));
        let event = &bytes[11..];
        assert_eq!(event[0], 0x86, "map of 6: lora fields omitted");
        let text = String::from_utf8_lossy(event);
        for key in [
            "type",
            "BlockStored",
            "block_hashes",
            "parent_block_hash",
            "token_ids",
            "block_size",
            "medium",
        ] {
            assert!(text.contains(key), "{key}");
        }
        assert!(!text.contains("lora"));
    }
}
