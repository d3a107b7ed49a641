//! Per-VM cache of the sidecar's tokenization: the block hashes of a chat's
//! messages, keyed by a digest of those messages, so the next turn of the
//! conversation is routed precisely without waiting for a callout.
//!
//! A chat request's keys are digests of its message prefixes (messages
//! `0..=j` for every `j`, chained, with the tools and template arguments
//! folded in first). The sidecar answers a tokenization with the prompt's
//! block hashes and how many of them stay valid when the conversation goes on
//! (`history_blocks`: the template's generation prompt is not history). Those
//! are stored under the digest of all the request's messages; the next turn
//! re-sends them plus the reply and a new question, so its longest cached
//! message prefix finds them. Text prompts are keyed by the whole prompt.
//!
//! Digests cover the raw JSON of each message ([`RawDigests`], taken as the
//! body is parsed): a client that re-serializes a message differently only
//! misses the cache. The entries are routing hints, never forwarded, so a
//! stale or colliding entry can cost cache hits but not correctness.

use std::num::NonZeroUsize;
use std::rc::Rc;

use crate::request::RawDigests;
use crate::SeqHash;
use lru::LruCache;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Block hashes held across all entries (8 bytes each): 8 MiB per VM.
const MAX_HASHES: usize = 1 << 20;
const ENTRIES: usize = 4096;

/// Cache keys of one request: one per message prefix for a chat (shortest
/// first), one for a text prompt, none for anything else. `seed` sets them
/// apart by model and cache salt.
pub fn prompt_keys(digests: &RawDigests, seed: u64) -> Vec<u64> {
    let chain = |digest: u64, part: u64| xxh3_64_with_seed(&part.to_le_bytes(), digest);
    match digests {
        RawDigests::None => Vec::new(),
        RawDigests::Text(text) => vec![chain(seed, *text)],
        RawDigests::Chat { context, messages } => {
            let mut digest = chain(seed, *context);
            messages
                .iter()
                .map(|message| {
                    digest = chain(digest, *message);
                    digest
                })
                .collect()
        }
    }
}

/// Block hashes by prompt key, bounded in entries and in hashes held.
pub struct PromptCache {
    entries: LruCache<u64, Rc<[SeqHash]>>,
    hashes: usize,
}

impl Default for PromptCache {
    fn default() -> Self {
        Self {
            entries: LruCache::new(NonZeroUsize::new(ENTRIES).unwrap_or(NonZeroUsize::MIN)),
            hashes: 0,
        }
    }
}

/// What a lookup found.
pub struct CacheHit {
    pub hashes: Rc<[SeqHash]>,
    /// The entry covers the whole request: nothing new to learn from it.
    pub complete: bool,
}

impl PromptCache {
    /// The entry of the longest key prefix of `keys` in the cache.
    pub fn lookup(&mut self, keys: &[u64]) -> Option<CacheHit> {
        keys.iter().enumerate().rev().find_map(|(index, key)| {
            self.entries.get(key).map(|hashes| CacheHit {
                hashes: Rc::clone(hashes),
                complete: index + 1 == keys.len(),
            })
        })
    }

    pub fn insert(&mut self, key: u64, hashes: &[SeqHash]) {
        if hashes.is_empty() || hashes.len() > MAX_HASHES {
            return;
        }
        // `push` hands back what it displaced: the key's old entry, or the
        // least recently used one when the cache is full of entries.
        if let Some((_, displaced)) = self.entries.push(key, Rc::from(hashes)) {
            self.hashes -= displaced.len();
        }
        self.hashes += hashes.len();
        while self.hashes > MAX_HASHES {
            match self.entries.pop_lru() {
                Some((_, evicted)) => self.hashes -= evicted.len(),
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{parse_request, Endpoint};

    fn keys(body: &str) -> Vec<u64> {
        let request = parse_request(Endpoint::ChatCompletions, body.as_bytes(), 1 << 20)
            .or_else(|_| parse_request(Endpoint::Completions, body.as_bytes(), 1 << 20))
            .unwrap();
        prompt_keys(&request.raw_digests, 1)
    }

    #[test]
    fn the_next_turn_finds_the_previous_one() {
        let turn1 = r#"{"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":"q1"}]}"#;
        let turn2 = r#"{"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":"q1"},{"role":"assistant","content":"a1"},{"role":"user","content":"q2"}]}"#;
        let (k1, k2) = (keys(turn1), keys(turn2));
        assert_eq!(k1.len(), 2);
        assert_eq!(k2[..2], k1[..]);
        let mut cache = PromptCache::default();
        assert!(cache.lookup(&k2).is_none());
        cache.insert(k1[1], &[SeqHash(7), SeqHash(8)]);
        let hit = cache.lookup(&k2).unwrap();
        assert_eq!(&*hit.hashes, &[SeqHash(7), SeqHash(8)]);
        assert!(!hit.complete);
        assert!(cache.lookup(&k1).unwrap().complete);
    }

    /// Entries evicted for their count give their hashes back; otherwise
    /// the budget shrinks until one long prompt flushes the whole cache.
    #[test]
    fn hashes_are_counted_for_the_entries_held() {
        let mut cache = PromptCache::default();
        for key in 0..(3 * ENTRIES as u64) {
            cache.insert(key, &[SeqHash(key); 3]);
        }
        cache.insert(1, &[SeqHash(1); 5]);
        let held: usize = cache.entries.iter().map(|(_, hashes)| hashes.len()).sum();
        assert_eq!(cache.hashes, held);
        let long = vec![SeqHash(9); MAX_HASHES / 2];
        cache.insert(u64::MAX, &long);
        assert!(cache.lookup(&[3 * ENTRIES as u64 - 1]).is_some());
        assert!(cache.lookup(&[u64::MAX]).is_some());
    }

    #[test]
    fn tools_and_template_arguments_change_every_key() {
        let plain = keys(r#"{"model":"m","messages":[{"role":"user","content":"q"}]}"#);
        let tools = keys(
            r#"{"model":"m","tools":[{"type":"function"}],"messages":[{"role":"user","content":"q"}]}"#,
        );
        let kwargs = keys(
            r#"{"model":"m","chat_template_kwargs":{"enable_thinking":false},"messages":[{"role":"user","content":"q"}]}"#,
        );
        assert_ne!(plain, tools);
        assert_ne!(plain, kwargs);
        assert_ne!(tools, kwargs);
        // Only the prompt's JSON counts: not the other fields, nor their order.
        let other_fields = keys(
            r#"{"stream":true,"messages":[{"role":"user","content":"q"}],"max_tokens":9,"model":"m"}"#,
        );
        assert_eq!(plain, other_fields);
        // A message serialized differently is another message.
        let spaced = keys(r#"{"model":"m","messages":[{"role": "user","content":"q"}]}"#);
        assert_ne!(plain, spaced);
        let text = keys(r#"{"model":"m","prompt":"hello"}"#);
        assert_eq!(text.len(), 1);
        assert!(keys(r#"{"model":"m","prompt":[1,2]}"#).is_empty());
    }

    #[test]
    fn bounded_by_hashes_held() {
        let mut cache = PromptCache::default();
        let big = vec![SeqHash(1); MAX_HASHES / 2];
        for key in 0..3 {
            cache.insert(key, &big);
        }
        assert!(cache.hashes <= MAX_HASHES);
        assert!(cache.lookup(&[0]).is_none());
        assert!(cache.lookup(&[2]).is_some());
        cache.insert(9, &vec![SeqHash(1); MAX_HASHES + 1]);
        assert!(cache.lookup(&[9]).is_none());
    }
}
