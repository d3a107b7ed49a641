//! Golden vectors for every engine format, built by hand from the documented
//! wire formats (docs/relay.md#input-formats-srcdecode) with `rmp` primitives or literal bytes, so they
//! do not share code with the decoders; plus normalization edge cases.
// Integration test: its helpers fail the test by panicking, like its tests
// (clippy.toml allows that in test functions only).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kv_sidecar::decode::trtllm::{decode_events, Decoded, NumberedEvent};
use kv_sidecar::decode::vllm::{decode_batch, Dialect};
use kv_sidecar::decode::{
    BlockMoved, BlockRemoved, BlockStored, EngineEvent, EngineHash, EventBatch, GroupKind, Medium,
};
use kv_sidecar::normalize::{MediaPolicy, NormEvent, NormStats, Normalizer};
use rmp::encode;
use router_core::{BlockHasher, BlockSize, HashSeed};

type Buf = Vec<u8>;

fn tokens(range: std::ops::Range<u32>) -> Vec<u32> {
    range.collect()
}

fn w_str(buf: &mut Buf, s: &str) {
    encode::write_str(buf, s).unwrap();
}

fn w_tokens(buf: &mut Buf, ids: &[u32]) {
    encode::write_array_len(buf, ids.len() as u32).unwrap();
    for id in ids {
        encode::write_uint(buf, u64::from(*id)).unwrap();
    }
}

const BIG_VLLM_HASH: u64 = 0xF000_0000_0000_0001; // above 2^63

#[test]
fn vllm_array_encoding() {
    let mut b = Buf::new();
    encode::write_array_len(&mut b, 3).unwrap();
    encode::write_f64(&mut b, 1712.5).unwrap();
    encode::write_array_len(&mut b, 3).unwrap();
    // BlockStored with every documented field plus one from the future.
    encode::write_array_len(&mut b, 11).unwrap();
    w_str(&mut b, "BlockStored");
    encode::write_array_len(&mut b, 2).unwrap();
    encode::write_u64(&mut b, BIG_VLLM_HASH).unwrap();
    encode::write_uint(&mut b, 7).unwrap();
    encode::write_nil(&mut b).unwrap(); // parent
    w_tokens(&mut b, &tokens(0..32));
    encode::write_uint(&mut b, 16).unwrap(); // block_size
    encode::write_nil(&mut b).unwrap(); // lora_id
    w_str(&mut b, "GPU"); // medium
    encode::write_nil(&mut b).unwrap(); // lora_name
    encode::write_nil(&mut b).unwrap(); // extra_keys
    encode::write_uint(&mut b, 0).unwrap(); // group_idx
    w_str(&mut b, "a field vLLM may add later");
    // BlockRemoved
    encode::write_array_len(&mut b, 3).unwrap();
    w_str(&mut b, "BlockRemoved");
    encode::write_array_len(&mut b, 1).unwrap();
    encode::write_u64(&mut b, BIG_VLLM_HASH).unwrap();
    w_str(&mut b, "GPU");
    // AllBlocksCleared
    encode::write_array_len(&mut b, 1).unwrap();
    w_str(&mut b, "AllBlocksCleared");
    encode::write_uint(&mut b, 0).unwrap(); // dp rank

    let batch = decode_batch(&b, Dialect::Vllm).unwrap();
    assert_eq!(
        batch,
        EventBatch {
            timestamp: 1712.5,
            events: vec![
                EngineEvent::Stored(BlockStored {
                    block_hashes: vec![EngineHash(BIG_VLLM_HASH), EngineHash(7)],
                    parent: None,
                    token_ids: tokens(0..32),
                    block_size: 16,
                    lora_id: None,
                    lora_name: None,
                    medium: Medium::Gpu,
                    cache_salt: None,
                    content_keys: vec![],
                    group: 0,
                    group_kind: GroupKind::Unspecified,
                }),
                EngineEvent::Removed(BlockRemoved {
                    block_hashes: vec![EngineHash(BIG_VLLM_HASH)],
                    medium: Medium::Gpu,
                    group: 0,
                }),
                EngineEvent::AllCleared,
            ],
            dp_rank: Some(0),
            ignored_events: 0,
            undecodable_events: 0,
        }
    );
}

#[test]
fn vllm_literal_bytes_minimal_batch() {
    // [0, [["AllBlocksCleared"]], nil] written out byte by byte.
    let mut b = vec![0x93, 0x00, 0x91, 0x91, 0xb0];
    b.extend_from_slice(b"AllBlocksCleared");
    b.push(0xc0);
    let batch = decode_batch(&b, Dialect::Vllm).unwrap();
    assert_eq!(batch.events, vec![EngineEvent::AllCleared]);
    assert_eq!(batch.dp_rank, None);
    // An older two-element batch without dp rank: [0, []].
    assert_eq!(
        decode_batch(&[0x92, 0x00, 0x90], Dialect::Vllm)
            .unwrap()
            .events,
        vec![]
    );
}

#[test]
fn vllm_older_array_events_stop_early() {
    // vLLM 0.8-era BlockStored: no medium, lora_name, extra keys.
    let mut b = Buf::new();
    encode::write_array_len(&mut b, 2).unwrap();
    encode::write_f64(&mut b, 0.0).unwrap();
    encode::write_array_len(&mut b, 1).unwrap();
    encode::write_array_len(&mut b, 6).unwrap();
    w_str(&mut b, "BlockStored");
    encode::write_array_len(&mut b, 1).unwrap();
    encode::write_uint(&mut b, 3).unwrap();
    encode::write_uint(&mut b, 2).unwrap(); // parent
    w_tokens(&mut b, &tokens(100..116));
    encode::write_uint(&mut b, 16).unwrap();
    encode::write_nil(&mut b).unwrap();
    let batch = decode_batch(&b, Dialect::Vllm).unwrap();
    let EngineEvent::Stored(stored) = &batch.events[0] else {
        panic!("expected stored, got {batch:?}")
    };
    assert_eq!(stored.parent, Some(EngineHash(2)));
    assert_eq!(stored.medium, Medium::Gpu);
}

#[test]
fn vllm_map_encoding_with_byte_hashes_defaults_and_unknown_fields() {
    let hash_a = [0xabu8; 32];
    let hash_parent = [0x01u8; 32];
    let mut b = Buf::new();
    encode::write_array_len(&mut b, 3).unwrap();
    encode::write_f64(&mut b, 2.0).unwrap();
    encode::write_array_len(&mut b, 3).unwrap();
    // Map event: "type" not first, an unknown nested field, lora_id omitted.
    encode::write_map_len(&mut b, 6).unwrap();
    w_str(&mut b, "block_hashes");
    encode::write_array_len(&mut b, 1).unwrap();
    encode::write_bin(&mut b, &hash_a).unwrap();
    w_str(&mut b, "extra_keys");
    encode::write_array_len(&mut b, 1).unwrap();
    encode::write_map_len(&mut b, 1).unwrap();
    w_str(&mut b, "mm");
    encode::write_bin(&mut b, b"x").unwrap();
    w_str(&mut b, "type");
    w_str(&mut b, "BlockStored");
    w_str(&mut b, "parent_block_hash");
    encode::write_bin(&mut b, &hash_parent).unwrap();
    w_str(&mut b, "token_ids");
    w_tokens(&mut b, &tokens(0..16));
    w_str(&mut b, "block_size");
    encode::write_uint(&mut b, 16).unwrap();
    // BlockRemoved on CPU.
    encode::write_map_len(&mut b, 3).unwrap();
    w_str(&mut b, "type");
    w_str(&mut b, "BlockRemoved");
    w_str(&mut b, "block_hashes");
    encode::write_array_len(&mut b, 1).unwrap();
    encode::write_bin(&mut b, &hash_a).unwrap();
    w_str(&mut b, "medium");
    w_str(&mut b, "CPU");
    // An event type this relay does not know.
    encode::write_map_len(&mut b, 1).unwrap();
    w_str(&mut b, "type");
    w_str(&mut b, "BlockPromoted");
    encode::write_nil(&mut b).unwrap();

    let batch = decode_batch(&b, Dialect::Vllm).unwrap();
    let a = EngineHash(xxhash_rust::xxh3::xxh3_64(&hash_a));
    let parent = EngineHash(xxhash_rust::xxh3::xxh3_64(&hash_parent));
    assert_eq!(
        batch.events,
        vec![
            EngineEvent::Stored(BlockStored {
                block_hashes: vec![a],
                parent: Some(parent),
                token_ids: tokens(0..16),
                block_size: 16,
                lora_id: None,
                lora_name: None,
                medium: Medium::Gpu,
                cache_salt: None,
                // The entry is not vLLM's tuple: it is content as a whole.
                content_keys: vec![Some(xxhash_rust::xxh3::xxh3_64(&[
                    0x81, 0xa2, b'm', b'm', 0xc4, 0x01, b'x'
                ]))],
                group: 0,
                group_kind: GroupKind::Unspecified,
            }),
            EngineEvent::Removed(BlockRemoved {
                block_hashes: vec![a],
                medium: Medium::Other("CPU".into()),
                group: 0,
            }),
        ]
    );
    assert_eq!(batch.ignored_events, 1);
}

#[test]
fn sglang_signed_hashes_and_page_size_one() {
    let mut b = Buf::new();
    encode::write_array_len(&mut b, 3).unwrap();
    encode::write_f64(&mut b, 3.0).unwrap();
    encode::write_array_len(&mut b, 1).unwrap();
    encode::write_array_len(&mut b, 5).unwrap();
    w_str(&mut b, "BlockStored");
    encode::write_array_len(&mut b, 3).unwrap();
    encode::write_i64(&mut b, -5).unwrap();
    encode::write_i64(&mut b, i64::MIN).unwrap();
    encode::write_sint(&mut b, -1).unwrap(); // negative fixint
    encode::write_i64(&mut b, -9).unwrap(); // parent
    w_tokens(&mut b, &[11, 12, 13]);
    encode::write_uint(&mut b, 1).unwrap();
    encode::write_nil(&mut b).unwrap(); // dp rank

    let batch = decode_batch(&b, Dialect::Vllm).unwrap();
    let EngineEvent::Stored(stored) = &batch.events[0] else {
        panic!("expected stored, got {batch:?}")
    };
    assert_eq!(
        stored.block_hashes,
        vec![
            EngineHash(u64::MAX - 4),
            EngineHash(1 << 63),
            EngineHash(u64::MAX)
        ]
    );
    assert_eq!(stored.parent, Some(EngineHash((-9i64) as u64)));
    assert_eq!(stored.block_size, 1);
    assert_eq!(stored.token_ids, vec![11, 12, 13]);
}

#[test]
fn malformed_msgpack_is_an_error_never_a_panic() {
    let cases: &[&[u8]] = &[
        &[],
        &[0xc1],
        &[0x93, 0x00],
        &[0x93, 0x00, 0x91, 0x91],
        &[0x92, 0x00, 0x91, 0x91, 0xa3, b'B', b'a'], // cut string
        &[0x92, 0x00, 0x90, 0x00],                   // trailing byte
        &[0x92, 0x00, 0xdd, 0xff, 0xff, 0xff, 0xff], // huge claimed array
        &[0x92, 0x00, 0xa1, b'x'],                   // events not a list
        b"not msgpack at all",
    ];
    for case in cases {
        assert!(
            decode_batch(case, Dialect::Vllm).is_err(),
            "accepted {case:?}"
        );
    }
}

#[test]
fn undecodable_events_are_skipped_and_counted_the_rest_kept() {
    let mut b = Buf::new();
    encode::write_array_len(&mut b, 2).unwrap();
    encode::write_f64(&mut b, 0.0).unwrap();
    encode::write_array_len(&mut b, 5).unwrap();
    encode::write_array_len(&mut b, 0).unwrap(); // no tag
                                                 // Missing token_ids.
    encode::write_array_len(&mut b, 2).unwrap();
    w_str(&mut b, "BlockStored");
    encode::write_array_len(&mut b, 0).unwrap();
    // A token id beyond u32.
    encode::write_array_len(&mut b, 5).unwrap();
    w_str(&mut b, "BlockStored");
    encode::write_array_len(&mut b, 1).unwrap();
    encode::write_uint(&mut b, 1).unwrap();
    encode::write_nil(&mut b).unwrap();
    encode::write_array_len(&mut b, 1).unwrap();
    encode::write_sint(&mut b, -3).unwrap();
    encode::write_uint(&mut b, 1).unwrap();
    // A map event whose hashes are not a list (what a real publisher sends
    // for a field of the wrong type).
    encode::write_map_len(&mut b, 2).unwrap();
    w_str(&mut b, "type");
    w_str(&mut b, "BlockRemoved");
    w_str(&mut b, "block_hashes");
    w_str(&mut b, "not a list");
    encode::write_array_len(&mut b, 1).unwrap();
    w_str(&mut b, "AllBlocksCleared");
    let batch = decode_batch(&b, Dialect::Vllm).unwrap();
    assert_eq!(batch.events, vec![EngineEvent::AllCleared]);
    assert_eq!(batch.undecodable_events, 4);
}

#[test]
fn trtllm_json_with_hashes_above_2_pow_53() {
    // 2^53 + 1 is the first integer an f64 cannot hold.
    let body = br#"[
      {"event_id": 1, "data": {"type": "created", "num_blocks_per_cache_level": [100, 0]}, "window_size": 32},
      {"event_id": 2, "data": {"type": "stored", "parent_hash": null, "blocks": [
          {"type": "stored_block", "block_hash": 9007199254740993,
           "tokens": [{"type": "unique_token", "token_id": 1, "token_extra_id": 0},
                      {"type": "unique_token", "token_id": 2, "token_extra_id": 0}],
           "lora_id": null, "cache_level": 0, "priority": 35, "mm_keys": []},
          {"type": "stored_block", "block_hash": 18446744073709551615,
           "tokens": [{"token_id": 3}, {"token_id": 4}], "cache_level": 0}]},
       "window_size": 32},
      {"event_id": 3, "data": {"type": "updated", "block_hash": 5,
          "cache_level": {"old_value": 0, "new_value": 1}, "priority": null}, "window_size": 32},
      {"event_id": 4, "data": {"type": "removed", "block_hashes": [9007199254740993]}, "window_size": 32},
      {"event_id": 5, "data": {"type": "stored", "parent_hash": 18446744073709551615, "blocks": [
          {"block_hash": -2, "tokens": [{"token_id": 5}, {"token_id": 6}], "cache_level": 1}]}}
    ]"#;
    let events = decode_events(body, 2).unwrap().events;
    let expected = vec![
        NumberedEvent {
            event_id: 1,
            event: Decoded::Event(EngineEvent::AllCleared),
        },
        NumberedEvent {
            event_id: 2,
            event: Decoded::Event(EngineEvent::Stored(BlockStored {
                block_hashes: vec![EngineHash(9_007_199_254_740_993), EngineHash(u64::MAX)],
                parent: None,
                token_ids: vec![1, 2, 3, 4],
                block_size: 2,
                lora_id: None,
                lora_name: None,
                medium: Medium::Gpu,
                cache_salt: None,
                content_keys: vec![],
                group: 0,
                group_kind: GroupKind::Unspecified,
            })),
        },
        NumberedEvent {
            event_id: 3,
            event: Decoded::Event(EngineEvent::Moved(BlockMoved {
                block_hash: EngineHash(5),
                from: Medium::Gpu,
                to: Medium::Other("cache_level_1".into()),
            })),
        },
        NumberedEvent {
            event_id: 4,
            event: Decoded::Event(EngineEvent::Removed(BlockRemoved {
                block_hashes: vec![EngineHash(9_007_199_254_740_993)],
                medium: Medium::Unstated,
                group: 0,
            })),
        },
        NumberedEvent {
            event_id: 5,
            event: Decoded::Event(EngineEvent::Stored(BlockStored {
                block_hashes: vec![EngineHash(u64::MAX - 1)],
                parent: Some(EngineHash(u64::MAX)),
                token_ids: vec![5, 6],
                block_size: 2,
                lora_id: None,
                lora_name: None,
                medium: Medium::Other("cache_level_1".into()),
                cache_salt: None,
                content_keys: vec![],
                group: 0,
                group_kind: GroupKind::Unspecified,
            })),
        },
    ];
    assert_eq!(events, expected);
}

#[test]
fn trtllm_malformed_body_is_an_error_malformed_event_is_skipped() {
    for body in [&b"{"[..], br#"[{"event_id": 1}]"#, br#"{"event_id": 1}"#] {
        assert!(
            decode_events(body, 2).is_err(),
            "accepted {}",
            String::from_utf8_lossy(body)
        );
    }
    for body in [
        br#"[{"event_id": 1, "data": {"type": "stored", "blocks": []}}]"#,
        &br#"[{"event_id": 1, "data": {"type": "removed", "block_hashes": [1.5]}}]"#[..],
        br#"[{"event_id": 1, "data": {"type": "stored", "blocks": [
            {"block_hash": 1, "tokens": [{"token_id": 1}]},
            {"block_hash": 2, "tokens": [{"token_id": 1}, {"token_id": 2}]}]}}]"#,
        br#"[{"event_id": 1, "data": {"type": "removed", "block_hashes": ["xyz"]}}]"#,
    ] {
        let events = decode_events(body, 2).unwrap().events;
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].event_id, 1, "the id survives");
        assert!(
            matches!(events[0].event, Decoded::Undecodable(_)),
            "decoded {}",
            String::from_utf8_lossy(body)
        );
    }
    // The message names the event, not a vLLM batch layout.
    let body = br#"[{"event_id": 1, "data": {"type": "stored", "blocks": [
        {"block_hash": 1, "tokens": [{"token_id": 1}, {"token_id": 2}]},
        {"block_hash": 2, "tokens": [{"token_id": 1}, {"token_id": 2}, {"token_id": 3}]}]}}]"#;
    let Decoded::Undecodable(error) = &decode_events(body, 2).unwrap().events[0].event else {
        panic!("ragged blocks decoded");
    };
    assert_eq!(
        error.to_string(),
        "malformed event: stored blocks of unequal token counts"
    );
}

/// `stored` as TensorRT-LLM's `KVCacheEventSerializer` writes it with partial
/// block reuse on: the last block may hold fewer tokens than a full one.
#[test]
fn trtllm_partial_trailing_block_is_dropped_full_ones_kept() {
    let body = br#"[
      {"event_id": 7, "data": {"type": "stored", "parent_hash": null, "blocks": [
          {"type": "stored_block", "block_hash": 1, "tokens": [
              {"type": "unique_token", "token_id": 1, "token_extra_id": 0},
              {"type": "unique_token", "token_id": 2, "token_extra_id": 0}],
           "cache_level": 0, "priority": 35},
          {"type": "stored_block", "block_hash": 2, "tokens": [
              {"type": "unique_token", "token_id": 3, "token_extra_id": 0}],
           "cache_level": 0, "priority": 35}]}, "window_size": 4096},
      {"event_id": 8, "data": {"type": "stored", "parent_hash": 1, "blocks": [
          {"type": "stored_block", "block_hash": 3, "tokens": [
              {"type": "unique_token", "token_id": 3, "token_extra_id": 0}],
           "cache_level": 0, "priority": 35}]}, "window_size": 4096}
    ]"#;
    let poll = decode_events(body, 2).unwrap();
    assert_eq!(poll.partial_blocks, 2);
    let Decoded::Event(EngineEvent::Stored(stored)) = &poll.events[0].event else {
        panic!("expected the full block: {:?}", poll.events[0]);
    };
    assert_eq!(stored.block_hashes, vec![EngineHash(1)]);
    assert_eq!(stored.token_ids, vec![1, 2]);
    assert_eq!(stored.block_size, 2);
    // A lone partial block is no event at all, and its id still counts.
    assert_eq!(poll.events[1].event_id, 8);
    assert_eq!(poll.events[1].event, Decoded::Ignored);
}

#[test]
fn trtllm_updated_moves_blocks_between_tiers_priority_only_is_ignored() {
    let body = br#"[
      {"event_id": 1, "data": {"type": "updated", "block_hash": 9,
          "cache_level": {"type": "event_diff", "new_value": 1, "old_value": 0},
          "priority": {"type": "event_diff", "new_value": 0, "old_value": 35}}, "window_size": 32},
      {"event_id": 2, "data": {"type": "updated", "block_hash": 9,
          "cache_level": {"type": "event_diff", "new_value": 0, "old_value": 1},
          "priority": null}, "window_size": 32},
      {"event_id": 3, "data": {"type": "updated", "block_hash": 9, "cache_level": null,
          "priority": {"type": "event_diff", "new_value": 50, "old_value": 35}}, "window_size": 32}
    ]"#;
    let events = decode_events(body, 2).unwrap().events;
    let moved = |from: Medium, to: Medium| {
        Decoded::Event(EngineEvent::Moved(BlockMoved {
            block_hash: EngineHash(9),
            from,
            to,
        }))
    };
    let level1 = || Medium::Other("cache_level_1".into());
    assert_eq!(events[0].event, moved(Medium::Gpu, level1()));
    assert_eq!(events[1].event, moved(level1(), Medium::Gpu));
    assert_eq!(events[2].event, Decoded::Ignored);
}

#[test]
fn trtllm_v2_sha256_hex_hashes_are_handles() {
    let a = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    let b = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752";
    let body = format!(
        r#"[{{"event_id": 1, "data": {{"type": "stored", "parent_hash": "{a}", "blocks": [
             {{"block_hash": "{b}", "tokens": [{{"token_id": 1}}, {{"token_id": 2}}], "cache_level": 0}}]}}}},
           {{"event_id": 2, "data": {{"type": "removed", "block_hashes": ["{}"]}}}}]"#,
        b.to_uppercase()
    );
    let events = decode_events(body.as_bytes(), 2).unwrap().events;
    let hex = |s: &str| -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    };
    let Decoded::Event(EngineEvent::Stored(stored)) = &events[0].event else {
        panic!("expected stored: {events:?}");
    };
    assert_eq!(stored.parent, Some(EngineHash::from_bytes(&hex(a))));
    assert_eq!(stored.block_hashes, vec![EngineHash::from_bytes(&hex(b))]);
    let Decoded::Event(EngineEvent::Removed(removed)) = &events[1].event else {
        panic!("expected removed: {events:?}");
    };
    assert_eq!(
        removed.block_hashes, stored.block_hashes,
        "hex case does not matter"
    );
}

// ---- normalization ----

const MODEL: &str = "qwen3";

fn normalizer(block: u32) -> Normalizer {
    Normalizer::new(
        MODEL,
        BlockSize::new(block).unwrap(),
        MediaPolicy::default(),
    )
}

fn hasher(block: u32, lora: Option<&str>) -> BlockHasher {
    BlockHasher::new(
        BlockSize::new(block).unwrap(),
        HashSeed::for_model(MODEL, lora),
    )
}

fn stored(
    hashes: &[u64],
    parent: Option<u64>,
    token_ids: Vec<u32>,
    block_size: u32,
) -> EngineEvent {
    EngineEvent::Stored(BlockStored::on_gpu(
        hashes.iter().map(|h| EngineHash(*h)).collect(),
        parent.map(EngineHash),
        token_ids,
        block_size,
    ))
}

fn removed(hashes: &[u64]) -> EngineEvent {
    EngineEvent::Removed(BlockRemoved {
        block_hashes: hashes.iter().map(|h| EngineHash(*h)).collect(),
        medium: Medium::Gpu,
        group: 0,
    })
}

fn run(n: &mut Normalizer, events: &[EngineEvent]) -> (Vec<NormEvent>, NormStats) {
    let mut out = Vec::new();
    let mut stats = NormStats::default();
    for e in events {
        n.apply(e, &mut out, &mut stats);
    }
    (out, stats)
}

fn seqs(block: u32, tokens: &[u32]) -> Vec<u64> {
    hasher(block, None)
        .sequence_hashes(tokens)
        .iter()
        .map(|s| s.0)
        .collect()
}

#[test]
fn chained_stores_hash_like_the_filter() {
    let mut n = normalizer(4);
    let all = tokens(0..12);
    let want = seqs(4, &all);
    let (out, stats) = run(
        &mut n,
        &[
            stored(&[100, 101], None, all[..8].to_vec(), 4),
            stored(&[102], Some(101), all[8..].to_vec(), 4),
        ],
    );
    assert_eq!(
        out,
        vec![
            NormEvent::Stored {
                parent: None,
                hashes: want[..2].to_vec()
            },
            NormEvent::Stored {
                parent: Some(want[1]),
                hashes: want[2..].to_vec()
            },
        ]
    );
    assert_eq!(stats.blocks_stored, 3);
    let (out, _) = run(&mut n, &[removed(&[101, 102])]);
    assert_eq!(
        out,
        vec![NormEvent::Removed {
            hashes: want[1..].to_vec()
        }]
    );
    assert_eq!(n.blocks().collect::<Vec<_>>(), vec![want[0]]);
}

#[test]
fn two_engine_blocks_with_one_content_are_reference_counted() {
    let mut n = normalizer(4);
    let t = tokens(0..4);
    let h = seqs(4, &t)[0];
    run(
        &mut n,
        &[stored(&[1], None, t.clone(), 4), stored(&[2], None, t, 4)],
    );
    let (out, _) = run(&mut n, &[removed(&[1])]);
    assert!(out.is_empty(), "block still held by engine hash 2: {out:?}");
    let (out, _) = run(&mut n, &[removed(&[2])]);
    assert_eq!(out, vec![NormEvent::Removed { hashes: vec![h] }]);
}

#[test]
fn unknown_parent_is_counted_once_and_never_mis_hashed() {
    let mut n = normalizer(4);
    let (out, stats) = run(
        &mut n,
        &[
            stored(&[10], Some(999), tokens(0..4), 4),
            // Child of the left-out block: recognised, not counted again.
            stored(&[11], Some(10), tokens(4..8), 4),
            removed(&[10, 11]),
        ],
    );
    assert!(out.is_empty());
    assert_eq!(stats.unknown_parent, 1);
    assert_eq!(stats.unknown_removed, 0);
    assert!(stats.lost_events());
    let (_, stats) = run(&mut n, &[removed(&[12])]);
    assert_eq!(stats.unknown_removed, 1);
}

#[test]
fn foreign_block_size_is_an_error_not_a_wrong_hash() {
    let mut n = normalizer(16);
    let (out, stats) = run(&mut n, &[stored(&[1, 2], None, tokens(0..64), 32)]);
    assert!(out.is_empty());
    assert_eq!(stats.block_size_mismatch, 2);
    let (out, stats) = run(&mut n, &[stored(&[3], None, tokens(0..15), 16)]);
    assert!(out.is_empty());
    assert_eq!(stats.token_count_mismatch, 1);
    assert_eq!(n.block_count(), 0);
}

#[test]
fn all_blocks_cleared_and_media() {
    let mut n = normalizer(4);
    let mut cpu = stored(&[5], None, tokens(0..4), 4);
    if let EngineEvent::Stored(s) = &mut cpu {
        s.medium = Medium::Other("CPU".into());
    }
    let (out, stats) = run(&mut n, &[cpu.clone()]);
    assert!(out.is_empty());
    assert_eq!(stats.ignored_medium, 1);

    let mut with_cpu = Normalizer::new(
        MODEL,
        BlockSize::new(4).unwrap(),
        MediaPolicy::with_extra(vec!["cpu".into()]),
    );
    let (out, _) = run(
        &mut with_cpu,
        &[
            cpu,
            stored(&[5], None, tokens(0..4), 4),
            EngineEvent::AllCleared,
        ],
    );
    assert_eq!(out.len(), 3);
    assert_eq!(out[2], NormEvent::Cleared);
    assert_eq!(with_cpu.block_count(), 0);
}

#[test]
fn lora_blocks_use_the_adapter_seed_and_bare_lora_ids_are_refused() {
    let mut n = normalizer(4);
    let t = tokens(0..4);
    let mut lora = stored(&[1], None, t.clone(), 4);
    if let EngineEvent::Stored(s) = &mut lora {
        s.lora_id = Some(3);
        s.lora_name = Some("sql".into());
    }
    let (out, _) = run(&mut n, &[lora.clone()]);
    let want = hasher(4, Some("sql")).sequence_hashes(&t)[0].0;
    assert_eq!(
        out,
        vec![NormEvent::Stored {
            parent: None,
            hashes: vec![want]
        }]
    );
    if let EngineEvent::Stored(s) = &mut lora {
        s.lora_name = None;
        s.block_hashes = vec![EngineHash(2)];
    }
    let (out, stats) = run(&mut n, &[lora]);
    assert!(out.is_empty());
    assert_eq!(stats.lora_without_name, 1);
}

#[test]
fn engine_hash_reused_for_other_content_replaces_the_old_block() {
    let mut n = normalizer(4);
    let old = seqs(4, &tokens(0..4))[0];
    let new = seqs(4, &tokens(4..8))[0];
    let (out, _) = run(
        &mut n,
        &[
            stored(&[1], None, tokens(0..4), 4),
            stored(&[1], None, tokens(4..8), 4),
        ],
    );
    assert_eq!(out[1], NormEvent::Removed { hashes: vec![old] });
    assert_eq!(n.blocks().collect::<Vec<_>>(), vec![new]);
}

// ---- engine families: salts, content keys, hybrid groups ----

/// SGLang 0.5.18–0.5.19: a salted store appends `{"cache_salt": ...}` where
/// vLLM has `lora_name`.
#[test]
fn sglang_salted_array_store_carries_its_salt() {
    let mut b = Buf::new();
    encode::write_array_len(&mut b, 3).unwrap();
    encode::write_f64(&mut b, 1.0).unwrap();
    encode::write_array_len(&mut b, 2).unwrap();
    for salt in [Some("tenant-a"), None] {
        encode::write_array_len(&mut b, if salt.is_some() { 8 } else { 7 }).unwrap();
        w_str(&mut b, "BlockStored");
        encode::write_array_len(&mut b, 1).unwrap();
        encode::write_i64(&mut b, -4).unwrap();
        encode::write_nil(&mut b).unwrap();
        w_tokens(&mut b, &tokens(0..4));
        encode::write_uint(&mut b, 4).unwrap();
        encode::write_nil(&mut b).unwrap(); // lora_id
        w_str(&mut b, "GPU");
        if let Some(salt) = salt {
            encode::write_map_len(&mut b, 1).unwrap();
            w_str(&mut b, "cache_salt");
            w_str(&mut b, salt);
        }
    }
    encode::write_uint(&mut b, 0).unwrap();
    let batch = decode_batch(&b, Dialect::Sglang).unwrap();
    let salts: Vec<_> = batch
        .events
        .iter()
        .map(|e| match e {
            EngineEvent::Stored(s) => s.cache_salt.clone(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(salts, vec![Some("tenant-a".to_owned()), None]);
    assert_eq!(batch.undecodable_events, 0);
    // The vLLM layout reads position 7 as a lora_name string: the salted
    // event does not decode that way.
    assert_eq!(
        decode_batch(&b, Dialect::Vllm).unwrap().undecodable_events,
        1
    );
}

/// An SGLang map-format batch of one `BlockStored` (engine hash 3) with
/// `fields` entries, written up to the value of its `token_ids`.
fn sglang_map_store_head(fields: u32) -> Buf {
    let mut b = Buf::new();
    encode::write_array_len(&mut b, 3).unwrap();
    encode::write_f64(&mut b, 1.0).unwrap();
    encode::write_array_len(&mut b, 1).unwrap();
    encode::write_map_len(&mut b, fields).unwrap();
    w_str(&mut b, "type");
    w_str(&mut b, "BlockStored");
    w_str(&mut b, "block_hashes");
    encode::write_array_len(&mut b, 1).unwrap();
    encode::write_i64(&mut b, 3).unwrap();
    w_str(&mut b, "token_ids");
    b
}

/// SGLang ≥ 0.5.21 map events name the salt.
#[test]
fn sglang_map_store_carries_its_salt() {
    let mut b = sglang_map_store_head(6);
    w_tokens(&mut b, &tokens(0..4));
    w_str(&mut b, "block_size");
    encode::write_uint(&mut b, 4).unwrap();
    w_str(&mut b, "cache_salt");
    w_str(&mut b, "s1");
    w_str(&mut b, "session_id");
    w_str(&mut b, "abc");
    encode::write_uint(&mut b, 0).unwrap();
    let batch = decode_batch(&b, Dialect::Sglang).unwrap();
    let EngineEvent::Stored(stored) = &batch.events[0] else {
        panic!("expected stored: {batch:?}");
    };
    assert_eq!(stored.cache_salt.as_deref(), Some("s1"));
}

/// vLLM's published `extra_keys`: per block a tuple of the LoRA name (when
/// the event has one), `(mm_identifier, offset)` pairs, the bare cache salt
/// (first block only) and prompt-embedding digests; plus `group_idx` and
/// `kv_cache_spec_kind` (array positions 8, 9, 10).
#[test]
fn vllm_extra_keys_give_salt_content_and_group() {
    let mut b = Buf::new();
    encode::write_array_len(&mut b, 3).unwrap();
    encode::write_f64(&mut b, 1.0).unwrap();
    encode::write_array_len(&mut b, 1).unwrap();
    encode::write_array_len(&mut b, 11).unwrap();
    w_str(&mut b, "BlockStored");
    encode::write_array_len(&mut b, 2).unwrap();
    encode::write_uint(&mut b, 1).unwrap();
    encode::write_uint(&mut b, 2).unwrap();
    encode::write_nil(&mut b).unwrap();
    w_tokens(&mut b, &tokens(0..8));
    encode::write_uint(&mut b, 4).unwrap();
    encode::write_uint(&mut b, 3).unwrap(); // lora_id
    w_str(&mut b, "GPU");
    w_str(&mut b, "sql"); // lora_name
    encode::write_array_len(&mut b, 2).unwrap(); // extra_keys
    encode::write_array_len(&mut b, 3).unwrap();
    w_str(&mut b, "sql");
    encode::write_array_len(&mut b, 2).unwrap();
    w_str(&mut b, "img-1");
    encode::write_uint(&mut b, 0).unwrap();
    w_str(&mut b, "tenant-a");
    encode::write_array_len(&mut b, 1).unwrap();
    w_str(&mut b, "sql");
    encode::write_uint(&mut b, 1).unwrap(); // group_idx
    w_str(&mut b, "sliding_window");
    encode::write_uint(&mut b, 0).unwrap();
    let batch = decode_batch(&b, Dialect::Vllm).unwrap();
    let EngineEvent::Stored(stored) = &batch.events[0] else {
        panic!("expected stored: {batch:?}");
    };
    assert_eq!(stored.lora_name.as_deref(), Some("sql"));
    assert_eq!(stored.cache_salt.as_deref(), Some("tenant-a"));
    assert_eq!(stored.content_keys.len(), 2);
    assert!(stored.content_keys[0].is_some() && stored.content_keys[1].is_none());
    assert_eq!(stored.group, 1);
    assert_eq!(stored.group_kind, GroupKind::Partial);
}

/// vLLM 0.17–0.22 published multimodal keys as bare identifier strings, in
/// front of the salt: the salt is the last string of the first entry, and
/// identifiers in every entry are content.
#[test]
fn vllm_bare_multimodal_identifiers_are_content_not_salt() {
    let mut b = Buf::new();
    encode::write_array_len(&mut b, 3).unwrap();
    encode::write_f64(&mut b, 1.0).unwrap();
    encode::write_array_len(&mut b, 1).unwrap();
    encode::write_array_len(&mut b, 9).unwrap();
    w_str(&mut b, "BlockStored");
    encode::write_array_len(&mut b, 3).unwrap();
    for h in 1..=3 {
        encode::write_uint(&mut b, h).unwrap();
    }
    encode::write_nil(&mut b).unwrap();
    w_tokens(&mut b, &tokens(0..12));
    encode::write_uint(&mut b, 4).unwrap();
    encode::write_nil(&mut b).unwrap(); // lora_id
    w_str(&mut b, "GPU");
    encode::write_nil(&mut b).unwrap(); // lora_name
    encode::write_array_len(&mut b, 3).unwrap(); // extra_keys
    encode::write_array_len(&mut b, 2).unwrap();
    w_str(&mut b, "3f9a-image-hash");
    w_str(&mut b, "tenant-a");
    encode::write_array_len(&mut b, 1).unwrap();
    w_str(&mut b, "3f9a-image-hash");
    encode::write_nil(&mut b).unwrap();
    encode::write_uint(&mut b, 0).unwrap();
    let batch = decode_batch(&b, Dialect::Vllm).unwrap();
    let EngineEvent::Stored(stored) = &batch.events[0] else {
        panic!("expected stored: {batch:?}");
    };
    assert_eq!(stored.cache_salt.as_deref(), Some("tenant-a"));
    assert!(stored.content_keys[0].is_some());
    assert_eq!(stored.content_keys[0], stored.content_keys[1], "same image");
    assert_eq!(stored.content_keys[2], None);
}

fn salted(hashes: &[u64], parent: Option<u64>, token_ids: Vec<u32>, salt: &str) -> EngineEvent {
    let mut event = stored(hashes, parent, token_ids, 4);
    if let EngineEvent::Stored(s) = &mut event {
        s.cache_salt = Some(salt.to_owned());
    }
    event
}

fn stored_hashes(out: &[NormEvent]) -> Vec<u64> {
    out.iter()
        .flat_map(|e| match e {
            NormEvent::Stored { hashes, .. } => hashes.clone(),
            _ => vec![],
        })
        .collect()
}

#[test]
fn salted_chains_hash_like_the_filter_and_never_alias() {
    let t = tokens(0..12);
    let h = hasher(4, None);
    let mut n = normalizer(4);
    let (out, _) = run(
        &mut n,
        &[
            salted(&[1, 2], None, t[..8].to_vec(), "tenant-a"),
            // A child store carries the salt too (SGLang) or not (vLLM):
            // the parent already holds it either way.
            salted(&[3], Some(2), t[8..].to_vec(), "tenant-a"),
            salted(&[4], None, t[..4].to_vec(), "tenant-b"),
            stored(&[5], None, t[..4].to_vec(), 4),
            // Engines ignore an empty salt.
            salted(&[6], None, t[..4].to_vec(), ""),
        ],
    );
    let want_a = h.sequence_hashes_after(Some(h.salt_root("tenant-a")), &t);
    let want_b = h.sequence_hashes_after(Some(h.salt_root("tenant-b")), &t[..4]);
    let plain = h.sequence_hashes(&t[..4]);
    let mut want: Vec<u64> = want_a.iter().map(|s| s.0).collect();
    want.push(want_b[0].0);
    want.push(plain[0].0);
    want.push(plain[0].0);
    assert_eq!(stored_hashes(&out), want);
    assert_ne!(want_a[0], want_b[0]);
    assert_ne!(want_a[0], plain[0]);
}

#[test]
fn content_keys_fold_so_multimodal_blocks_never_match_text() {
    let t = tokens(0..8);
    let mut n = normalizer(4);
    let mut mm = stored(&[1, 2], None, t.clone(), 4);
    if let EngineEvent::Stored(s) = &mut mm {
        s.content_keys = vec![Some(42), None];
    }
    let mut other_image = stored(&[3, 4], None, t.clone(), 4);
    if let EngineEvent::Stored(s) = &mut other_image {
        s.content_keys = vec![Some(43), None];
    }
    let (out, _) = run(&mut n, &[mm.clone(), other_image]);
    let hashes = stored_hashes(&out);
    let text = seqs(4, &t);
    assert!(
        hashes.iter().all(|h| !text.contains(h)),
        "{hashes:?} vs {text:?}"
    );
    assert_ne!(
        hashes[..2],
        hashes[2..],
        "different images, different hashes"
    );
    // Deterministic: another relay computes the same hashes.
    let (again, _) = run(&mut normalizer(4), &[mm]);
    assert_eq!(stored_hashes(&again), hashes[..2]);
}

fn in_group(mut event: EngineEvent, group: u32, kind: GroupKind) -> EngineEvent {
    match &mut event {
        EngineEvent::Stored(s) => {
            s.group = group;
            s.group_kind = kind;
        }
        EngineEvent::Removed(r) => r.group = group,
        _ => {}
    }
    event
}

/// vLLM hybrid models publish one store per KV cache group with the same
/// hashes; a sliding-window group evicting a block must not remove it while
/// the full-attention group holds it.
#[test]
fn hybrid_groups_keep_a_block_while_full_attention_holds_it() {
    let t = tokens(0..8);
    let want = seqs(4, &t);
    let mut n = normalizer(4);
    let (out, stats) = run(
        &mut n,
        &[
            in_group(stored(&[1, 2], None, t.clone(), 4), 0, GroupKind::Full),
            in_group(stored(&[1, 2], None, t.clone(), 4), 1, GroupKind::Partial),
            in_group(removed(&[1]), 1, GroupKind::Unspecified),
        ],
    );
    assert_eq!(stored_hashes(&out), want);
    assert!(
        !out.iter().any(|e| matches!(e, NormEvent::Removed { .. })),
        "{out:?}"
    );
    assert_eq!(stats.partial_attention_group, 3);
    let mut blocks: Vec<u64> = n.blocks().collect();
    blocks.sort_unstable();
    let mut sorted = want.clone();
    sorted.sort_unstable();
    assert_eq!(blocks, sorted);
    // Two full-attention groups: the block goes when the last one drops it.
    let (out, _) = run(
        &mut n,
        &[
            in_group(stored(&[1], None, t[..4].to_vec(), 4), 2, GroupKind::Full),
            in_group(removed(&[1]), 0, GroupKind::Unspecified),
        ],
    );
    assert!(!out.iter().any(|e| matches!(e, NormEvent::Removed { .. })));
    let (out, _) = run(
        &mut n,
        &[in_group(removed(&[1]), 2, GroupKind::Unspecified)],
    );
    assert_eq!(
        out,
        vec![NormEvent::Removed {
            hashes: vec![want[0]]
        }]
    );
}

#[test]
fn blocks_moving_off_the_gpu_leave_the_view_and_come_back() {
    let t = tokens(0..4);
    let want = seqs(4, &t)[0];
    let mut n = normalizer(4);
    let level1 = || Medium::Other("cache_level_1".into());
    let moved = |from: Medium, to: Medium| {
        EngineEvent::Moved(BlockMoved {
            block_hash: EngineHash(7),
            from,
            to,
        })
    };
    run(&mut n, &[stored(&[7], None, t, 4)]);
    let (out, _) = run(&mut n, &[moved(Medium::Gpu, level1())]);
    assert_eq!(out, vec![NormEvent::Removed { hashes: vec![want] }]);
    assert_eq!(n.block_count(), 0);
    let (out, _) = run(&mut n, &[moved(level1(), Medium::Gpu)]);
    assert_eq!(
        out,
        vec![NormEvent::Stored {
            parent: None,
            hashes: vec![want]
        }]
    );
    // Evicted from the GPU after coming back.
    let (out, stats) = run(&mut n, &[removed(&[7])]);
    assert_eq!(out, vec![NormEvent::Removed { hashes: vec![want] }]);
    assert_eq!(stats.unknown_removed, 0);
}

/// One SGLang array-format `BlockStored` of one page, as 0.4.x's radix cache
/// publishes it: content-only page hashes, `parent` as given.
fn sglang_04_store(hash: i64, parent: i64, page: &[u32]) -> Buf {
    let mut b = Buf::new();
    encode::write_array_len(&mut b, 3).unwrap();
    encode::write_f64(&mut b, 1.0).unwrap();
    encode::write_array_len(&mut b, 1).unwrap();
    encode::write_array_len(&mut b, 6).unwrap();
    w_str(&mut b, "BlockStored");
    encode::write_array_len(&mut b, 1).unwrap();
    encode::write_i64(&mut b, hash).unwrap();
    encode::write_i64(&mut b, parent).unwrap();
    w_tokens(&mut b, page);
    encode::write_uint(&mut b, page.len() as u64).unwrap();
    encode::write_nil(&mut b).unwrap(); // lora_id
    encode::write_nil(&mut b).unwrap(); // dp rank
    b
}

/// SGLang 0.4's radix cache gives a page under the tree's root the parent
/// `hash(())` (the root's empty last page), so every chain it stored was
/// dropped as having an unknown parent and the view stayed empty.
#[test]
fn sglang_04_pages_under_the_root_start_a_chain() {
    const PY_HASH_OF_EMPTY_TUPLE: i64 = 5_740_354_900_026_072_187;
    let first = sglang_04_store(11, PY_HASH_OF_EMPTY_TUPLE, &tokens(0..4));
    let second = sglang_04_store(12, 11, &tokens(4..8));
    let events: Vec<EngineEvent> = [&first, &second]
        .iter()
        .flat_map(|b| decode_batch(b, Dialect::Sglang).unwrap().events)
        .collect();
    let EngineEvent::Stored(stored) = &events[0] else {
        panic!("expected stored: {events:?}");
    };
    assert_eq!(stored.parent, None);
    let mut n = normalizer(4);
    let (out, stats) = run(&mut n, &events);
    assert_eq!(stats.unknown_parent, 0);
    assert_eq!(stored_hashes(&out), seqs(4, &tokens(0..8)));
    // vLLM has no such convention: the same bytes keep their parent.
    let batch = decode_batch(&first, Dialect::Vllm).unwrap();
    let EngineEvent::Stored(stored) = &batch.events[0] else {
        panic!("expected stored: {batch:?}");
    };
    assert_eq!(
        stored.parent,
        Some(EngineHash(PY_HASH_OF_EMPTY_TUPLE as u64))
    );
}

/// SGLang with EAGLE keys its radix cache by bigrams and publishes each
/// page's token ids as `(token, next token)` pairs.
#[test]
fn sglang_bigram_token_ids_are_their_first_tokens() {
    let mut b = sglang_map_store_head(4);
    encode::write_array_len(&mut b, 4).unwrap();
    for t in 0..4u64 {
        encode::write_array_len(&mut b, 2).unwrap();
        encode::write_uint(&mut b, t + 100).unwrap();
        encode::write_uint(&mut b, t + 101).unwrap();
    }
    w_str(&mut b, "block_size");
    encode::write_uint(&mut b, 4).unwrap();
    encode::write_uint(&mut b, 0).unwrap();
    let batch = decode_batch(&b, Dialect::Sglang).unwrap();
    let EngineEvent::Stored(stored) = &batch.events[0] else {
        panic!("expected stored: {batch:?}");
    };
    assert_eq!(stored.token_ids, tokens(100..104));
}

/// TensorRT-LLM's `removed` names no tier, and it evicts blocks from its
/// secondary tier too: with that tier indexed, a block moved there and then
/// removed leaves the index (it was kept as a false hit).
#[test]
fn trtllm_removal_finds_a_block_in_the_secondary_tier() {
    let body = br#"[
      {"event_id": 1, "data": {"type": "updated", "block_hash": 5,
          "cache_level": {"type": "event_diff", "new_value": 1, "old_value": 0},
          "priority": null}, "window_size": 32},
      {"event_id": 2, "data": {"type": "removed", "block_hashes": [5]}, "window_size": 32}
    ]"#;
    let decoded: Vec<EngineEvent> = decode_events(body, 4)
        .unwrap()
        .events
        .into_iter()
        .map(|numbered| match numbered.event {
            Decoded::Event(event) => event,
            other => panic!("expected an event: {other:?}"),
        })
        .collect();
    let mut n = Normalizer::new(
        MODEL,
        BlockSize::new(4).unwrap(),
        MediaPolicy::with_extra(vec!["cache_level_1".into()]),
    );
    let mut events = vec![stored(&[5], None, tokens(0..4), 4)];
    events.extend(decoded);
    let (out, stats) = run(&mut n, &events);
    assert_eq!(stats.unknown_removed, 0, "{out:?}");
    assert_eq!(n.block_count(), 0, "{out:?}");
    assert_eq!(
        out.last(),
        Some(&NormEvent::Removed {
            hashes: seqs(4, &tokens(0..4))
        })
    );
}

/// With attention data parallelism one response gathers every rank's events,
/// each rank numbering its own: only rank 0's are kept, so its ids stay
/// consecutive and another rank's `created` never clears its blocks.
#[test]
fn trtllm_attention_dp_keeps_rank_zero() {
    let body = br#"[
      {"event_id": 0, "data": {"type": "created", "num_blocks_per_cache_level": [8]}, "window_size": 32, "attention_dp_rank": 0},
      {"event_id": 0, "data": {"type": "created", "num_blocks_per_cache_level": [8]}, "window_size": 32, "attention_dp_rank": 1},
      {"event_id": 1, "data": {"type": "stored", "parent_hash": null, "blocks": [
          {"block_hash": 7, "tokens": [{"token_id": 1}, {"token_id": 2}], "cache_level": 0}]},
          "window_size": 32, "attention_dp_rank": 1},
      {"event_id": 1, "data": {"type": "stored", "parent_hash": null, "blocks": [
          {"block_hash": 8, "tokens": [{"token_id": 3}, {"token_id": 4}], "cache_level": 0}]},
          "window_size": 32, "attention_dp_rank": 0}
    ]"#;
    let poll = decode_events(body, 2).unwrap();
    assert_eq!(poll.other_rank_events, 2);
    let ids: Vec<u64> = poll.events.iter().map(|e| e.event_id).collect();
    assert_eq!(ids, [0, 1]);
    let Decoded::Event(EngineEvent::Stored(stored)) = &poll.events[1].event else {
        panic!("expected rank 0's store: {poll:?}");
    };
    assert_eq!(stored.block_hashes, [EngineHash(8)]);
}
