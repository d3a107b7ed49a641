//! Keys of a prompt's prefix for approximate routing, computed without a
//! tokenizer: each key stands for everything before it. A token-id prompt
//! keys every fourth block hash; a text or chat prompt keys 256-byte chunks
//! of its raw text, each chained to the one before.

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::request::{ChatMessage, MessageContent, Prompt};
use crate::{BlockSize, SeqHash};

/// Bytes of prompt text per key; about 64 tokens of English text.
pub const CHUNK_BYTES: usize = 256;
/// Rough bytes per token of BPE tokenizers on English text, used to turn
/// matched text into an estimate of cached blocks.
const BYTES_PER_TOKEN: u32 = 4;
/// Block hashes per key of a token-id prompt.
const BLOCKS_PER_KEY: usize = 4;
/// Keys beyond this (~32k tokens) add cost but no better choices.
const MAX_KEYS: usize = 512;
/// Separates text keys from block-hash keys.
const TEXT_DOMAIN: u64 = 0x6b76_6d65_7368_7478;

/// The chain of keys of one prompt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixKeys {
    keys: Vec<u64>,
    tokens_per_key: u32,
}

impl PrefixKeys {
    /// Keys of a prompt whose exact block hashes are known: the hash ending
    /// each group of blocks, and the last block's (so a short prompt still
    /// has a key).
    pub fn from_blocks(blocks: &[SeqHash], block_size: BlockSize) -> Self {
        let mut keys: Vec<u64> = blocks
            .chunks_exact(BLOCKS_PER_KEY)
            .filter_map(|group| group.last().map(|h| h.0))
            .take(MAX_KEYS)
            .collect();
        if !blocks.len().is_multiple_of(BLOCKS_PER_KEY) && keys.len() < MAX_KEYS {
            keys.extend(blocks.last().map(|h| h.0));
        }
        let tokens_per_key = u32::try_from(BLOCKS_PER_KEY)
            .unwrap_or(u32::MAX)
            .saturating_mul(block_size.get());
        Self {
            keys,
            tokens_per_key,
        }
    }

    /// Keys of the raw text of a text or chat prompt; empty for token ids.
    pub fn from_text(prompt: &Prompt, seed: u64) -> Self {
        let mut chunker = Chunker::new(seed ^ TEXT_DOMAIN);
        match prompt {
            Prompt::Text(text) => chunker.push(text.as_bytes()),
            Prompt::TextBatch(first) => chunker.push(first.as_bytes()),
            Prompt::Chat(messages) => messages.iter().for_each(|m| push_message(&mut chunker, m)),
            Prompt::Tokens(_) | Prompt::TokenBatch(_) => {}
        }
        Self {
            keys: chunker.keys,
            tokens_per_key: u32::try_from(CHUNK_BYTES).unwrap_or(u32::MAX) / BYTES_PER_TOKEN,
        }
    }

    pub fn keys(&self) -> &[u64] {
        &self.keys
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Estimated full KV blocks covered by `keys` leading keys.
    pub fn blocks(&self, keys: u32, block_size: BlockSize) -> u32 {
        keys.saturating_mul(self.tokens_per_key) / block_size.get()
    }
}

fn push_message(chunker: &mut Chunker, message: &ChatMessage) {
    chunker.push(message.role.as_bytes());
    chunker.push(b"\n");
    match &message.content {
        Some(MessageContent::Text(text)) => chunker.push(text.as_bytes()),
        Some(MessageContent::Parts(parts)) => {
            for text in parts.iter().filter_map(|p| p.text.as_deref()) {
                chunker.push(text.as_bytes());
                chunker.push(b"\n");
            }
        }
        None => {}
    }
    // Keeps "ab" + "c" apart from "a" + "bc".
    chunker.push(b"\0");
}

/// Hashes a byte stream in fixed chunks, each chained to the one before.
struct Chunker {
    seed: u64,
    /// The previous key, then the chunk being filled.
    buffer: Vec<u8>,
    keys: Vec<u64>,
}

impl Chunker {
    fn new(seed: u64) -> Self {
        let mut buffer = Vec::with_capacity(8 + CHUNK_BYTES);
        buffer.extend_from_slice(&0u64.to_le_bytes());
        Self {
            seed,
            buffer,
            keys: Vec::new(),
        }
    }

    fn push(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && self.keys.len() < MAX_KEYS {
            let room = 8 + CHUNK_BYTES - self.buffer.len();
            let (now, rest) = bytes.split_at(room.min(bytes.len()));
            self.buffer.extend_from_slice(now);
            bytes = rest;
            if self.buffer.len() == 8 + CHUNK_BYTES {
                let key = xxh3_64_with_seed(&self.buffer, self.seed);
                self.keys.push(key);
                self.buffer.clear();
                self.buffer.extend_from_slice(&key.to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BlockHasher, HashSeed};

    fn text(s: &str) -> PrefixKeys {
        PrefixKeys::from_text(&Prompt::Text(s.to_owned()), 7)
    }

    #[test]
    fn text_keys_chain_over_whole_chunks() {
        let shared = "s".repeat(CHUNK_BYTES * 3);
        let a = text(&format!("{shared}{}", "a".repeat(CHUNK_BYTES)));
        let b = text(&format!("{shared}{}", "b".repeat(CHUNK_BYTES)));
        assert_eq!(a.keys().len(), 4);
        assert_eq!(a.keys()[..3], b.keys()[..3]);
        assert_ne!(a.keys()[3], b.keys()[3]);
        // A partial chunk makes no key; the same text in one piece or many
        // makes the same keys.
        assert!(text(&"x".repeat(CHUNK_BYTES - 1)).is_empty());
        let mut pieces = Chunker::new(7 ^ TEXT_DOMAIN);
        for piece in shared.as_bytes().chunks(7) {
            pieces.push(piece);
        }
        assert_eq!(pieces.keys, a.keys()[..3]);
        assert_eq!(
            text(&"y".repeat(CHUNK_BYTES * (MAX_KEYS + 5))).keys().len(),
            MAX_KEYS
        );
    }

    #[test]
    fn chat_keys_separate_messages_and_roles() {
        let chat = |role: &str, content: &str| {
            let message: ChatMessage =
                serde_json::from_value(serde_json::json!({"role": role, "content": content}))
                    .unwrap();
            PrefixKeys::from_text(&Prompt::Chat(vec![message]), 1)
        };
        let long = "q".repeat(CHUNK_BYTES * 2);
        assert_eq!(chat("user", &long).keys().len(), 2);
        assert_ne!(chat("user", &long), chat("system", &long));
    }

    #[test]
    fn block_keys_take_every_fourth_hash() {
        let hasher = BlockHasher::new(BlockSize::new(16).unwrap(), HashSeed::for_model("m", None));
        let tokens: Vec<u32> = (0..16 * 9).collect();
        let blocks = hasher.sequence_hashes(&tokens);
        let keys = PrefixKeys::from_blocks(&blocks, hasher.block_size());
        assert_eq!(keys.keys(), [blocks[3].0, blocks[7].0, blocks[8].0]);
        assert_eq!(keys.blocks(2, hasher.block_size()), 8);
        let short = PrefixKeys::from_blocks(&blocks[..3], hasher.block_size());
        assert_eq!(short.keys(), [blocks[2].0]);
    }
}
