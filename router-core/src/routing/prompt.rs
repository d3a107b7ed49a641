//! What routing knows of a prompt before any tokenizer runs: its exact block
//! hashes when the request carries token ids, and the keys of the learned
//! table. The filter and the sidecar's `/debug/route` derive both the same way.

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::request::Prompt;
use crate::routing::prefix_keys::PrefixKeys;
use crate::{BlockHasher, SeqHash};

/// A prompt's routing identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptIdentity {
    /// Exact block hashes, for token-id prompts.
    pub exact: Option<Vec<SeqHash>>,
    /// Keys for the learned table.
    pub keys: PrefixKeys,
    /// Seed of the prompt's text keys (learned table and prompt cache).
    pub text_seed: u64,
}

impl PromptIdentity {
    /// `cache_salt` is the request's: engines treat an empty salt as none,
    /// and a salted prompt never shares a block or key with another salt's.
    pub fn of(hasher: &BlockHasher, prompt: &Prompt, cache_salt: Option<&str>) -> Self {
        let salt = cache_salt.filter(|s| !s.is_empty());
        let exact = prompt
            .token_ids()
            .map(|tokens| hasher.sequence_hashes_after(salt.map(|s| hasher.salt_root(s)), tokens));
        let seed = hasher.seed().get();
        let text_seed = salt.map_or(seed, |salt| xxh3_64_with_seed(salt.as_bytes(), seed));
        let keys = match &exact {
            Some(exact) => PrefixKeys::from_blocks(exact, hasher.block_size()),
            None => PrefixKeys::from_text(prompt, text_seed),
        };
        Self {
            exact,
            keys,
            text_seed,
        }
    }
}

/// Prompts the sidecar can tokenize (a batch of texts is routed by load).
pub fn is_tokenizable(prompt: &Prompt) -> bool {
    matches!(prompt, Prompt::Text(_) | Prompt::Chat(_))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BlockSize, HashSeed};

    fn hasher() -> BlockHasher {
        BlockHasher::new(BlockSize::new(4).unwrap(), HashSeed::for_model("m", None))
    }

    #[test]
    fn token_ids_hash_exactly_and_salts_separate() {
        let prompt = Prompt::Tokens((0..16).collect());
        let plain = PromptIdentity::of(&hasher(), &prompt, None);
        assert_eq!(plain.exact.as_ref().map(Vec::len), Some(4));
        assert_eq!(PromptIdentity::of(&hasher(), &prompt, Some("")), plain);
        let salted = PromptIdentity::of(&hasher(), &prompt, Some("tenant-a"));
        assert_ne!(salted.exact, plain.exact);
        assert_ne!(salted.keys, plain.keys);
    }

    #[test]
    fn text_has_keys_but_no_exact_hashes() {
        let prompt = Prompt::Text("x".repeat(1024));
        let plain = PromptIdentity::of(&hasher(), &prompt, None);
        assert!(plain.exact.is_none());
        assert_eq!(plain.keys.keys().len(), 4);
        assert!(is_tokenizable(&prompt));
        let salted = PromptIdentity::of(&hasher(), &prompt, Some("s"));
        assert_ne!(salted.text_seed, plain.text_seed);
        assert_ne!(salted.keys, plain.keys);
    }
}
