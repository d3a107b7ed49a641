//! kvmesh's own KV block hashes (docs/architecture.md#block-hashes).
//!
//! Engines hash blocks with algorithms that cannot be reproduced outside the
//! engine (vLLM seeds a pickle-based sha256 with `PYTHONHASHSEED`), so kvmesh
//! recomputes a content hash from token ids everywhere it needs to match blocks:
//! `local[i] = xxh3_64(le_u32(tokens of block i), seed)` and
//! `seq[0] = local[0]`, `seq[i] = xxh3_64(le(seq[i-1]) ‖ le(local[i]), seed)`.
//! Only full blocks are hashed: a partial block is never shared by engines.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

pub use kvmesh_config::{BlockSize, BlockSizeError};

/// Per-model hash seed, so equal token ids of different models (or LoRA
/// adapters) never alias in a shared index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HashSeed(u64);

impl HashSeed {
    /// Seed for a model and an optional LoRA adapter name.
    ///
    /// The adapter name is hashed with the model seed, so the same adapter name
    /// under two base models still yields two seeds.
    pub fn for_model(model: &str, lora: Option<&str>) -> Self {
        let model_seed = xxh3_64(model.as_bytes());
        match lora {
            None => Self(model_seed),
            Some(adapter) => Self(xxh3_64_with_seed(adapter.as_bytes(), model_seed)),
        }
    }

    pub const fn from_raw(seed: u64) -> Self {
        Self(seed)
    }

    pub const fn get(self) -> u64 {
        self.0
    }
}

/// Hash of one block's tokens alone, independent of what precedes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LocalBlockHash(pub u64);

/// Hash of a block and the whole prefix before it: the key of the prefix index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqHash(pub u64);

/// Computes kvmesh block hashes for one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHasher {
    block_size: BlockSize,
    seed: HashSeed,
}

impl BlockHasher {
    pub fn new(block_size: BlockSize, seed: HashSeed) -> Self {
        Self { block_size, seed }
    }

    pub fn block_size(&self) -> BlockSize {
        self.block_size
    }

    pub fn seed(&self) -> HashSeed {
        self.seed
    }

    /// Hash of one block's token ids. The caller guarantees a full block; the
    /// relay checks engine block sizes before calling this.
    pub fn local_hash(&self, block_tokens: &[u32]) -> LocalBlockHash {
        let mut bytes = vec![0; block_tokens.len() * 4];
        encode_tokens(block_tokens, &mut bytes);
        LocalBlockHash(xxh3_64_with_seed(&bytes, self.seed.0))
    }

    /// Chains a block onto its parent's sequence hash (`None` for the first block).
    pub fn chain(&self, parent: Option<SeqHash>, local: LocalBlockHash) -> SeqHash {
        match parent {
            None => SeqHash(local.0),
            Some(parent) => {
                let mut bytes = [0u8; 16];
                bytes[..8].copy_from_slice(&parent.0.to_le_bytes());
                bytes[8..].copy_from_slice(&local.0.to_le_bytes());
                SeqHash(xxh3_64_with_seed(&bytes, self.seed.0))
            }
        }
    }

    /// Sequence hashes of every full block of `tokens`, in order.
    pub fn sequence_hashes(&self, tokens: &[u32]) -> Vec<SeqHash> {
        self.sequence_hashes_after(None, tokens)
    }

    /// The parent every chain isolated by a cache salt starts from.
    ///
    /// Engines mix a request's `cache_salt` into its first block only (vLLM's
    /// `extra_keys` of block 0, SGLang's per-store `cache_salt`); chaining
    /// carries it to every later block. kvmesh does the same by giving the
    /// first block this parent, so prompts with equal tokens and different
    /// salts share no block hash, and a salted chain can be extended from its
    /// last hash without knowing the salt again.
    pub fn salt_root(&self, salt: &str) -> SeqHash {
        // A domain tag keeps a salt root from equalling any block's hash by
        // construction (block hashes never hash these bytes).
        const DOMAIN: &[u8] = b"kvmesh.cache_salt\0";
        let mut bytes = Vec::with_capacity(DOMAIN.len() + salt.len());
        bytes.extend_from_slice(DOMAIN);
        bytes.extend_from_slice(salt.as_bytes());
        SeqHash(xxh3_64_with_seed(&bytes, self.seed.0))
    }

    /// Sequence hashes of every full block of `tokens` chained onto `parent`
    /// (`None` for a prompt's start, a [`salt_root`](Self::salt_root) for a
    /// salted prompt).
    pub fn sequence_hashes_after(&self, parent: Option<SeqHash>, tokens: &[u32]) -> Vec<SeqHash> {
        // The engines' usual block sizes get a buffer of constant length:
        // xxh3 is then specialised for it, which in V8 (no 64×64→128-bit
        // multiply) halves the cost of an 8k-token prompt (docs/benchmarks.md).
        match self.block_size.get() {
            16 => self.chain_blocks(parent, tokens, &mut [0; 16 * 4]),
            32 => self.chain_blocks(parent, tokens, &mut [0; 32 * 4]),
            size => self.chain_blocks(parent, tokens, &mut vec![0; size as usize * 4]),
        }
    }

    /// Hashes and chains every full block of `tokens`; `bytes` holds one
    /// encoded block.
    #[inline(always)]
    fn chain_blocks(
        &self,
        parent: Option<SeqHash>,
        tokens: &[u32],
        bytes: &mut [u8],
    ) -> Vec<SeqHash> {
        let block_size = self.block_size.as_usize();
        let mut hashes = Vec::with_capacity(self.block_size.full_blocks(tokens.len()));
        let mut parent = parent;
        for block in tokens.chunks_exact(block_size) {
            encode_tokens(block, bytes);
            let local = LocalBlockHash(xxh3_64_with_seed(bytes, self.seed.0));
            let seq = self.chain(parent, local);
            hashes.push(seq);
            parent = Some(seq);
        }
        hashes
    }
}

/// Writes `tokens` little-endian into `out`, which holds exactly as many.
fn encode_tokens(tokens: &[u32], out: &mut [u8]) {
    for (bytes, token) in out.chunks_exact_mut(4).zip(tokens) {
        bytes.copy_from_slice(&token.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hasher(block: u32) -> BlockHasher {
        BlockHasher::new(
            BlockSize::new(block).unwrap(),
            HashSeed::for_model("qwen3", None),
        )
    }

    /// Independent restatement of docs/architecture.md#block-hashes used to pin the byte layout.
    fn reference(tokens: &[u32], block: usize, seed: u64) -> Vec<u64> {
        let mut out: Vec<u64> = Vec::new();
        for chunk in tokens.chunks(block).filter(|c| c.len() == block) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|t| t.to_le_bytes()).collect();
            let local = xxh3_64_with_seed(&bytes, seed);
            let seq = match out.last() {
                None => local,
                Some(prev) => {
                    let mut b = prev.to_le_bytes().to_vec();
                    b.extend_from_slice(&local.to_le_bytes());
                    xxh3_64_with_seed(&b, seed)
                }
            };
            out.push(seq);
        }
        out
    }

    #[test]
    fn salted_chains_share_no_hash_with_other_salts_or_none() {
        let h = hasher(4);
        let tokens: Vec<u32> = (0..16).collect();
        let plain = h.sequence_hashes(&tokens);
        let a = h.sequence_hashes_after(Some(h.salt_root("tenant-a")), &tokens);
        let b = h.sequence_hashes_after(Some(h.salt_root("tenant-b")), &tokens);
        for (i, hash) in a.iter().enumerate() {
            assert!(!plain.contains(hash) && !b.contains(hash), "block {i}");
        }
        assert_eq!(
            a,
            h.sequence_hashes_after(Some(h.salt_root("tenant-a")), &tokens)
        );
        // Extending a salted chain from its last hash needs no salt.
        let tail = h.sequence_hashes_after(Some(a[1]), &tokens[8..]);
        assert_eq!(tail, a[2..]);
    }

    #[test]
    fn matches_reference_definition() {
        let tokens: Vec<u32> = (0..100).map(|i| i * 7919 + 3).collect();
        let h = hasher(16);
        let got: Vec<u64> = h.sequence_hashes(&tokens).iter().map(|s| s.0).collect();
        assert_eq!(got, reference(&tokens, 16, h.seed().get()));
        assert_eq!(got.len(), 6, "100 tokens hold 6 full blocks of 16");
    }

    #[test]
    fn pinned_vector_guards_byte_order_and_seed() {
        // Computed once from the definition; a change here breaks every
        // deployed index, so it must be deliberate.
        let h = BlockHasher::new(BlockSize::new(4).unwrap(), HashSeed::from_raw(42));
        let got = h.sequence_hashes(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let first = xxh3_64_with_seed(&[1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0], 42);
        assert_eq!(got[0].0, first);
        let big_endian = xxh3_64_with_seed(&[0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4], 42);
        assert_ne!(got[0].0, big_endian);
        let unseeded = xxh3_64(&[1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0]);
        assert_ne!(got[0].0, unseeded);
        let second_local = xxh3_64_with_seed(&[5, 0, 0, 0, 6, 0, 0, 0, 7, 0, 0, 0, 8, 0, 0, 0], 42);
        let mut chain = first.to_le_bytes().to_vec();
        chain.extend_from_slice(&second_local.to_le_bytes());
        assert_eq!(got[1].0, xxh3_64_with_seed(&chain, 42));
    }

    #[test]
    fn partial_block_is_not_hashed() {
        let h = hasher(16);
        assert!(h.sequence_hashes(&[1; 15]).is_empty());
        let full = h.sequence_hashes(&[1; 16]);
        assert_eq!(h.sequence_hashes(&[1; 31]), full);
    }

    #[test]
    fn seed_separates_models_and_adapters() {
        let tokens = [9u32; 32];
        let base = hasher(16).sequence_hashes(&tokens);
        let other = BlockHasher::new(
            BlockSize::new(16).unwrap(),
            HashSeed::for_model("llama3", None),
        )
        .sequence_hashes(&tokens);
        let lora = BlockHasher::new(
            BlockSize::new(16).unwrap(),
            HashSeed::for_model("qwen3", Some("sql-adapter")),
        )
        .sequence_hashes(&tokens);
        assert_ne!(base, other);
        assert_ne!(base, lora);
        assert_ne!(
            HashSeed::for_model("a", Some("b")),
            HashSeed::for_model("b", Some("b"))
        );
    }

    #[test]
    fn chain_depends_on_position() {
        // Two equal blocks in a row must get different sequence hashes.
        let h = hasher(4);
        let hashes = h.sequence_hashes(&[7; 8]);
        assert_ne!(hashes[0], hashes[1]);
    }

    #[test]
    fn incremental_chain_equals_bulk() {
        let h = hasher(4);
        let tokens: Vec<u32> = (0..20).collect();
        let mut parent = None;
        let mut incremental = Vec::new();
        for block in tokens.chunks_exact(4) {
            let seq = h.chain(parent, h.local_hash(block));
            incremental.push(seq);
            parent = Some(seq);
        }
        assert_eq!(incremental, h.sequence_hashes(&tokens));
    }

    proptest! {
        #[test]
        fn every_block_size_matches_the_reference(
            tokens in proptest::collection::vec(any::<u32>(), 0..300),
            block in prop_oneof![Just(16u32), Just(32), 1u32..70],
        ) {
            let h = hasher(block);
            let got: Vec<u64> = h.sequence_hashes(&tokens).iter().map(|s| s.0).collect();
            prop_assert_eq!(got, reference(&tokens, block as usize, h.seed().get()));
        }

        #[test]
        fn hashes_of_a_prefix_are_a_prefix_of_the_hashes(
            tokens in proptest::collection::vec(any::<u32>(), 0..300),
            cut in 0usize..300,
            block in 1u32..40,
        ) {
            let h = hasher(block);
            let cut = cut.min(tokens.len());
            let whole = h.sequence_hashes(&tokens);
            let prefix = h.sequence_hashes(&tokens[..cut]);
            prop_assert_eq!(&whole[..prefix.len()], &prefix[..]);
            prop_assert_eq!(prefix.len(), cut / block as usize);
        }

        #[test]
        fn a_changed_token_changes_its_block_and_all_later_ones(
            tokens in proptest::collection::vec(any::<u32>(), 64..128),
            at in 0usize..64,
        ) {
            let h = hasher(16);
            let mut changed = tokens.clone();
            changed[at] = changed[at].wrapping_add(1);
            let a = h.sequence_hashes(&tokens);
            let b = h.sequence_hashes(&changed);
            let block = at / 16;
            prop_assert_eq!(&a[..block], &b[..block]);
            for i in block..a.len() {
                prop_assert_ne!(a[i], b[i]);
            }
        }
    }
}
