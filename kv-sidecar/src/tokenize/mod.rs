//! Prompt → token ids → kvmesh block hashes, as the engine computes them
//! (docs/sidecar-serve.md): the model's chat template, then its `tokenizer.json`.
//!
//! The rendered text is split at the tokenizer's added tokens. Hugging Face
//! `tokenizers` splits there first as well and encodes each piece on its own,
//! so the concatenated per-segment ids equal encoding the whole string — and
//! each text segment (a system prompt, an earlier turn) can be cached.

use std::path::Path;
use std::sync::{Arc, Mutex};

use aho_corasick::{AhoCorasick, MatchKind};
use router_core::{BlockHasher, BlockSize, HashSeed};
use serde_json::Value;
use thiserror::Error;

use chat_template::{flatten_message, ChatTemplate};

mod segment_cache;
pub use segment_cache::CacheLimits;
use segment_cache::SegmentCache;

#[derive(Debug, Error)]
pub enum TokenizeError {
    #[error("loading tokenizer {path}: {message}")]
    Load { path: String, message: String },
    #[error("chat template: {0}")]
    Template(String),
    #[error("invalid block size: {0}")]
    BlockSize(String),
    #[error("messages: {0}")]
    Messages(String),
    #[error("tokenizing: {0}")]
    Encode(String),
}

/// What a prompt becomes.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokenized {
    pub segments: Vec<Arc<[u32]>>,
    pub block_hashes: Vec<u64>,
    /// Leading `block_hashes` that stay the same when a chat goes on (all of
    /// them for a plain prompt): what a router may cache for the next turn.
    pub history_blocks: usize,
    pub num_tokens: usize,
    pub cache_hits: u64,
    pub cache_misses: u64,
}

impl Tokenized {
    pub fn token_ids(&self) -> Vec<u32> {
        self.segments
            .iter()
            .flat_map(|s| s.iter().copied())
            .collect()
    }
}

/// One model's tokenizer, template, segment cache and hasher. `Send + Sync`:
/// called from blocking threads, never from the async reactor.
pub struct ModelTokenizer {
    tokenizer: tokenizers::Tokenizer,
    template: ChatTemplate,
    /// Matches every added token (leftmost-longest, as `tokenizers` does).
    added: Option<AhoCorasick>,
    added_ids: Vec<u32>,
    /// Ids a raw completion prompt gets around it (e.g. BOS), from encoding "".
    prompt_prefix: Vec<u32>,
    cache: Mutex<SegmentCache>,
    hasher: BlockHasher,
}

impl ModelTokenizer {
    /// Loads `tokenizer.json`; the chat template comes from `template_config`
    /// (a `tokenizer_config.json`-shaped file of any name), else from the
    /// `tokenizer_config.json` beside the tokenizer.
    pub fn load(
        model: &str,
        tokenizer_json: &Path,
        template_config: Option<&Path>,
        block_size: u32,
        cache: CacheLimits,
    ) -> Result<Self, TokenizeError> {
        let load_error = |message: String| TokenizeError::Load {
            path: tokenizer_json.display().to_string(),
            message,
        };
        let tokenizer = tokenizers::Tokenizer::from_file(tokenizer_json)
            .map_err(|e| load_error(e.to_string()))?;
        let template = match template_config {
            Some(config) => ChatTemplate::from_config_file(config),
            None => ChatTemplate::for_tokenizer(tokenizer_json),
        }
        .map_err(|e| TokenizeError::Template(e.to_string()))?;
        // Only tokens `tokenizers` matches verbatim: one that strips
        // neighbouring whitespace, must be a single word or is matched after
        // normalization stays inside its segment, where `tokenizers` handles it.
        let mut added: Vec<(u32, String)> = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| !(t.lstrip || t.rstrip || t.single_word || t.normalized))
            .map(|(id, token)| (id, token.content))
            .filter(|(_, content)| !content.is_empty())
            .collect();
        added.sort();
        let added_ids = added.iter().map(|(id, _)| *id).collect();
        let matcher = if added.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(added.iter().map(|(_, content)| content.as_str()))
                    .map_err(|e| load_error(e.to_string()))?,
            )
        };
        let prompt_prefix = tokenizer
            .encode_fast("", true)
            .map_err(|e| load_error(e.to_string()))?
            .get_ids()
            .to_vec();
        let block_size =
            BlockSize::new(block_size).map_err(|e| TokenizeError::BlockSize(e.to_string()))?;
        Ok(Self {
            tokenizer,
            template,
            added: matcher,
            added_ids,
            prompt_prefix,
            cache: Mutex::new(SegmentCache::new(cache)),
            hasher: BlockHasher::new(block_size, HashSeed::for_model(model, None)),
        })
    }

    /// A raw completion prompt, with the tokenizer's special tokens around it
    /// as vLLM adds them (`add_special_tokens=true`).
    pub fn tokenize_prompt(&self, prompt: &str) -> Result<Tokenized, TokenizeError> {
        let mut tokenized = self.tokenize_text(prompt)?;
        if !self.prompt_prefix.is_empty() {
            tokenized
                .segments
                .insert(0, Arc::from(self.prompt_prefix.as_slice()));
        }
        Ok(self.finish(tokenized))
    }

    /// Chat messages rendered with the template (`add_generation_prompt=true`).
    pub fn tokenize_chat(
        &self,
        messages: &[Value],
        tools: Option<&Value>,
        kwargs: Option<&serde_json::Map<String, Value>>,
    ) -> Result<Tokenized, TokenizeError> {
        let text = self.render(messages, tools, kwargs)?;
        let mut tokenized = self.finish(self.tokenize_text(&text)?);
        // The next turn renders these messages without the generation
        // prompt; whatever tokens both renderings share is history. Its
        // segments are mostly cache hits, so this costs one more render.
        let history_text = self.render_history(messages, tools, kwargs)?;
        let history = self.tokenize_text(&history_text)?.token_ids();
        let shared = history
            .iter()
            .zip(tokenized.segments.iter().flat_map(|s| s.iter()))
            .take_while(|(a, b)| a == b)
            .count();
        let block_size = self.hasher.block_size().as_usize();
        tokenized.history_blocks = (shared / block_size).min(tokenized.block_hashes.len());
        Ok(tokenized)
    }

    /// The prompt string the engine sees for `messages`.
    pub fn render(
        &self,
        messages: &[Value],
        tools: Option<&Value>,
        kwargs: Option<&serde_json::Map<String, Value>>,
    ) -> Result<String, TokenizeError> {
        self.render_conversation(messages, tools, kwargs, true)
    }

    /// `messages` as the history of a later turn (no generation prompt).
    fn render_history(
        &self,
        messages: &[Value],
        tools: Option<&Value>,
        kwargs: Option<&serde_json::Map<String, Value>>,
    ) -> Result<String, TokenizeError> {
        self.render_conversation(messages, tools, kwargs, false)
    }

    fn render_conversation(
        &self,
        messages: &[Value],
        tools: Option<&Value>,
        kwargs: Option<&serde_json::Map<String, Value>>,
        add_generation_prompt: bool,
    ) -> Result<String, TokenizeError> {
        let messages = messages
            .iter()
            .map(|m| flatten_message(m).map_err(|e| TokenizeError::Messages(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        self.template
            .render_conversation(&messages, tools, kwargs, add_generation_prompt)
            .map_err(|e| TokenizeError::Template(e.to_string()))
    }

    /// Whole-string encoding without segmenting or caching (the reference the
    /// segmented path must equal).
    pub fn encode_whole(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
        self.tokenizer
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizeError::Encode(e.to_string()))
    }

    pub fn hasher(&self) -> &BlockHasher {
        &self.hasher
    }

    /// Re-keys `tokenized`'s block hashes for a request with a `cache_salt`:
    /// its chain starts at the salt's root, as the filter and the relays
    /// key salted blocks, so it never matches another salt's blocks.
    pub fn salt(&self, tokenized: &mut Tokenized, salt: &str) {
        let root = self.hasher.salt_root(salt);
        tokenized.block_hashes = self
            .hasher
            .sequence_hashes_after(Some(root), &tokenized.token_ids())
            .into_iter()
            .map(|h| h.0)
            .collect();
    }

    fn finish(&self, mut tokenized: Tokenized) -> Tokenized {
        let ids = tokenized.token_ids();
        tokenized.num_tokens = ids.len();
        tokenized.block_hashes = self
            .hasher
            .sequence_hashes(&ids)
            .into_iter()
            .map(|h| h.0)
            .collect();
        tokenized.history_blocks = tokenized.block_hashes.len();
        tokenized
    }

    /// Segments of `text` without special tokens added around it.
    pub fn tokenize_text(&self, text: &str) -> Result<Tokenized, TokenizeError> {
        let mut tokenized = Tokenized {
            segments: Vec::new(),
            block_hashes: Vec::new(),
            history_blocks: 0,
            num_tokens: 0,
            cache_hits: 0,
            cache_misses: 0,
        };
        let mut start = 0;
        if let Some(matcher) = &self.added {
            for found in matcher.find_iter(text) {
                if found.start() > start {
                    self.push_text(&text[start..found.start()], &mut tokenized)?;
                }
                if let Some(id) = self.added_ids.get(found.pattern().as_usize()) {
                    tokenized.segments.push(Arc::from([*id].as_slice()));
                }
                start = found.end();
            }
        }
        if start < text.len() {
            self.push_text(&text[start..], &mut tokenized)?;
        }
        Ok(tokenized)
    }

    fn push_text(&self, segment: &str, tokenized: &mut Tokenized) -> Result<(), TokenizeError> {
        if let Some(ids) = self.cache_lock().get(segment) {
            tokenized.cache_hits += 1;
            tokenized.segments.push(ids);
            return Ok(());
        }
        tokenized.cache_misses += 1;
        let ids: Arc<[u32]> = Arc::from(self.encode_whole(segment)?);
        self.cache_lock().put(segment, ids.clone());
        tokenized.segments.push(ids);
        Ok(())
    }

    fn cache_lock(&self) -> std::sync::MutexGuard<'_, SegmentCache> {
        // A panic mid-update could leave its byte count off, which only
        // makes it evict sooner or later (it saturates): keep using it.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}
