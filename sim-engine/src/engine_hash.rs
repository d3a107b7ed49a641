//! The engine's own block hash, the one it reports in KV events.
//!
//! Modelled on vLLM's `sha256_cbor`: `sha256(canonical CBOR of (parent hash,
//! token ids, extra keys))`, truncated to its low 64 bits (the last 8 digest
//! bytes read big-endian) so events carry a u64 like vLLM's default
//! `ExternalBlockHash`. The first block's parent is a root derived from
//! `--engine-hash-seed` (vLLM: `NONE_HASH` from `PYTHONHASHSEED`). This is
//! deliberately *not* kvmesh's hash: kvmesh must work from token ids alone.

use serde::Serialize;
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineHasher {
    root: u64,
}

/// What is hashed, serialized as the CBOR array `[parent, [tokens...], null]`.
#[derive(Serialize)]
struct HashInput<'a>(u64, &'a [u32], Option<()>);

impl EngineHasher {
    pub fn new(seed: &str) -> Self {
        Self {
            root: low_64(&cbor_sha256(&seed)),
        }
    }

    /// Hash of a full block given its parent's hash (`None` for the first block).
    pub fn block_hash(&self, parent: Option<u64>, tokens: &[u32]) -> u64 {
        low_64(&cbor_sha256(&HashInput(
            parent.unwrap_or(self.root),
            tokens,
            None,
        )))
    }

    /// Hashes of every full block of `tokens`, chained from the root.
    pub fn chain(&self, tokens: &[u32], block_size: usize) -> Vec<u64> {
        let mut parent = None;
        tokens
            .chunks_exact(block_size.max(1))
            .map(|block| {
                let hash = self.block_hash(parent, block);
                parent = Some(hash);
                hash
            })
            .collect()
    }
}

fn cbor_sha256<T: Serialize>(value: &T) -> [u8; 32] {
    let mut bytes = Vec::with_capacity(128);
    // ciborium writes integers in their shortest form (canonical CBOR). The
    // only possible error is a value the serializer rejects, which tuples of
    // integers never are; hashing whatever was written keeps this total.
    if let Err(error) = ciborium::into_writer(value, &mut bytes) {
        tracing::error!(%error, "CBOR encoding of a block hash input failed");
    }
    Sha256::digest(&bytes).into()
}

fn low_64(digest: &[u8; 32]) -> u64 {
    let mut tail = [0u8; 8];
    tail.copy_from_slice(&digest[24..]);
    u64::from_be_bytes(tail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cbor_input_is_canonical_array() {
        let mut bytes = Vec::new();
        ciborium::into_writer(&HashInput(1, &[2, 300], None), &mut bytes).unwrap();
        // array(3), uint 1, array(2) [2, uint16 300], null
        assert_eq!(bytes, [0x83, 0x01, 0x82, 0x02, 0x19, 0x01, 0x2c, 0xf6]);
    }

    #[test]
    fn chain_depends_on_seed_parent_and_tokens() {
        let a = EngineHasher::new("0");
        let b = EngineHasher::new("1");
        let tokens: Vec<u32> = (0..32).collect();
        let chain = a.chain(&tokens, 16);
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[1], a.block_hash(Some(chain[0]), &tokens[16..]));
        assert_ne!(chain, b.chain(&tokens, 16));
        assert_ne!(a.block_hash(None, &tokens[16..]), chain[1]);
    }
}
