//! Approximate mode: prefix affinity learned from this VM's own routing
//! decisions, for when exact block hashes or fleet state are missing (no
//! sidecar, a stale one, or a tokenization that did not answer in time).
//!
//! A prompt becomes a chain of keys, each standing for everything before it:
//! every fourth block hash of a token-id prompt, or hashes of 256-byte chunks
//! of the raw text of a text or chat prompt (the filter has no tokenizer).
//! Every routed request records its keys against the worker it went to; the
//! longest run of a later prompt's leading keys recorded for one worker
//! estimates how much of the prompt that worker holds. This is how the
//! approximate prefix scorers of the Gateway API inference extension work.
//! It is an estimate: the engine may have evicted the blocks since, which the
//! entries' time to live bounds.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::rc::Rc;

use lru::LruCache;
use router_core::request::{ChatMessage, MessageContent, Prompt};
use router_core::{BlockSize, SeqHash};
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Bytes of prompt text per key; about 64 tokens of English text.
pub const CHUNK_BYTES: usize = 256;
/// Rough bytes per token of BPE tokenizers on English text, used to turn
/// matched text into an estimate of cached blocks.
const BYTES_PER_TOKEN: u32 = 4;
/// Block hashes per key of a token-id prompt.
const BLOCKS_PER_KEY: usize = 4;
/// Keys beyond this (~32k tokens) add cost but no better choices.
const MAX_KEYS: usize = 512;
/// Workers remembered per key: a hot prefix spreads over a few workers.
const HOLDERS: usize = 4;
/// Distinct worker addresses remembered before the table starts over.
const MAX_WORKERS: usize = 4096;
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Holder {
    worker: u32,
    seen_ms: u64,
}

type Holders = [Option<Holder>; HOLDERS];

/// Which workers were recently sent which prompt prefixes, by this VM.
pub struct LearnedTable {
    entries: LruCache<u64, Holders>,
    ttl_ms: u64,
    addresses: Vec<Rc<str>>,
    numbers: HashMap<Rc<str>, u32>,
    /// (worker, leading keys matched) of the last lookup.
    matched: Vec<(u32, u32)>,
}

impl LearnedTable {
    pub fn new(capacity: NonZeroUsize, ttl_ms: u64) -> Self {
        Self {
            entries: LruCache::new(capacity),
            ttl_ms,
            addresses: Vec::new(),
            numbers: HashMap::new(),
            matched: Vec::new(),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    /// For each worker that was sent the first keys of `keys`, how many
    /// leading keys in a row it was sent (only entries younger than the TTL).
    pub fn matches(&mut self, keys: &[u64], now_ms: u64) -> impl Iterator<Item = (&str, u32)> {
        self.matched.clear();
        for (position, key) in keys.iter().enumerate() {
            let position = u32::try_from(position).unwrap_or(u32::MAX);
            let Some(holders) = self.entries.get(key) else {
                break;
            };
            let mut extended = false;
            for holder in holders.iter().flatten() {
                if now_ms.saturating_sub(holder.seen_ms) > self.ttl_ms {
                    continue;
                }
                if position == 0 {
                    self.matched.push((holder.worker, 1));
                    extended = true;
                } else if let Some(run) = self
                    .matched
                    .iter_mut()
                    .find(|(worker, run)| *worker == holder.worker && *run == position)
                {
                    run.1 += 1;
                    extended = true;
                }
            }
            if !extended {
                break;
            }
        }
        let addresses = &self.addresses;
        self.matched.iter().filter_map(|(worker, run)| {
            let index = usize::try_from(*worker).ok()?;
            addresses.get(index).map(|a| (&**a, *run))
        })
    }

    /// Remembers that `keys` were sent to `address` at `now_ms`.
    pub fn record(&mut self, keys: &[u64], address: &str, now_ms: u64) {
        if keys.is_empty() {
            return;
        }
        let worker = self.number(address);
        let seen = Holder {
            worker,
            seen_ms: now_ms,
        };
        for key in keys {
            let holders = self.entries.get_or_insert_mut(*key, || [None; HOLDERS]);
            let slot = match holders
                .iter()
                .position(|h| h.is_some_and(|h| h.worker == worker))
                .or_else(|| holders.iter().position(Option::is_none))
            {
                Some(slot) => slot,
                None => oldest(holders),
            };
            if let Some(holder) = holders.get_mut(slot) {
                *holder = Some(seen);
            }
        }
    }

    fn number(&mut self, address: &str) -> u32 {
        if let Some(number) = self.numbers.get(address) {
            return *number;
        }
        if self.addresses.len() >= MAX_WORKERS {
            // Worker churn beyond any real pool: start over rather than grow.
            self.entries.clear();
            self.addresses.clear();
            self.numbers.clear();
        }
        let number = u32::try_from(self.addresses.len()).unwrap_or(u32::MAX);
        let address: Rc<str> = Rc::from(address);
        self.addresses.push(Rc::clone(&address));
        self.numbers.insert(address, number);
        number
    }
}

fn oldest(holders: &Holders) -> usize {
    holders
        .iter()
        .enumerate()
        .min_by_key(|(_, h)| h.map_or(0, |h| h.seen_ms))
        .map_or(0, |(slot, _)| slot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use router_core::{BlockHasher, HashSeed};

    fn table() -> LearnedTable {
        LearnedTable::new(NonZeroUsize::new(1000).unwrap(), 1_000)
    }

    fn text(s: &str) -> PrefixKeys {
        PrefixKeys::from_text(&Prompt::Text(s.to_owned()), 7)
    }

    fn matches(table: &mut LearnedTable, keys: &[u64], now: u64) -> Vec<(String, u32)> {
        let mut found: Vec<(String, u32)> = table
            .matches(keys, now)
            .map(|(a, n)| (a.to_owned(), n))
            .collect();
        found.sort();
        found
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

    #[test]
    fn longest_leading_run_per_worker() {
        let mut table = table();
        table.record(&[1, 2, 3, 4], "a", 0);
        table.record(&[1, 2, 9], "b", 0);
        assert_eq!(
            matches(&mut table, &[1, 2, 3, 5], 10),
            [("a".to_owned(), 3), ("b".to_owned(), 2)]
        );
        // A run must start at the first key.
        assert!(matches(&mut table, &[5, 1, 2], 10).is_empty());
        // A worker's run ends at its first gap.
        table.record(&[7, 8], "c", 0);
        table.record(&[1, 8], "c", 0);
        assert_eq!(
            matches(&mut table, &[1, 2, 8], 10),
            [
                ("a".to_owned(), 2),
                ("b".to_owned(), 2),
                ("c".to_owned(), 1)
            ]
        );
    }

    #[test]
    fn old_entries_expire_and_the_oldest_holder_is_replaced() {
        let mut table = table();
        table.record(&[1], "a", 0);
        assert!(matches(&mut table, &[1], 2_000).is_empty());
        for (i, worker) in ["b", "c", "d", "e"].iter().enumerate() {
            table.record(&[1], worker, 100 + i as u64);
        }
        let holders: Vec<String> = matches(&mut table, &[1], 200)
            .into_iter()
            .map(|(a, _)| a)
            .collect();
        assert_eq!(holders, ["b", "c", "d", "e"]);
        table.record(&[1], "b", 300);
        table.record(&[1], "f", 301);
        let holders: Vec<String> = matches(&mut table, &[1], 400)
            .into_iter()
            .map(|(a, _)| a)
            .collect();
        assert_eq!(holders, ["b", "d", "e", "f"]);
    }

    #[test]
    fn capacity_bounds_the_table() {
        let mut table = LearnedTable::new(NonZeroUsize::new(8).unwrap(), 1_000);
        let keys: Vec<u64> = (0..100).collect();
        table.record(&keys, "a", 0);
        assert_eq!(table.len(), 8);
    }
}
