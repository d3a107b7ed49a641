//! Text ↔ token ids: a Hugging Face `tokenizer.json`, or the documented
//! byte-level fallback (token id = byte value) when no tokenizer is given.

use std::path::Path;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum TokenizerError {
    #[error("loading tokenizer {path}: {message}")]
    Load { path: String, message: String },
    #[error("tokenizing: {0}")]
    Encode(String),
}

enum Vocabulary {
    HuggingFace(Box<tokenizers::Tokenizer>),
    /// Token id = UTF-8 byte value; decoding is lossy UTF-8.
    Bytes,
}

pub struct TextCodec {
    vocabulary: Vocabulary,
}

/// Words the simulated model "generates": plain ASCII so every token decodes
/// on its own and streamed deltas concatenate to the full text.
const OUTPUT_WORDS: &[&str] = &[
    "the",
    "cache",
    "block",
    "token",
    "prefix",
    "router",
    "engine",
    "batch",
    "decode",
    "prefill",
    "worker",
    "latency",
    "memory",
    "request",
    "stream",
    "model",
    "shared",
    "index",
    "event",
    "simulated",
    "answer",
    "is",
    "a",
    "of",
    "and",
    "to",
    "in",
    "with",
    "for",
    "quickly",
];

impl TextCodec {
    /// Loads `tokenizer.json`, or the byte-level fallback for `None`.
    pub fn load(path: Option<&Path>) -> Result<Self, TokenizerError> {
        let vocabulary = match path {
            None => Vocabulary::Bytes,
            Some(path) => {
                let tokenizer =
                    tokenizers::Tokenizer::from_file(path).map_err(|e| TokenizerError::Load {
                        path: path.display().to_string(),
                        message: e.to_string(),
                    })?;
                Vocabulary::HuggingFace(Box::new(tokenizer))
            }
        };
        Ok(Self { vocabulary })
    }

    /// Token ids of `text`. `add_special_tokens` follows vLLM: true for raw
    /// completion prompts (a BOS where the tokenizer adds one), false for
    /// rendered chat templates, which already spell their special tokens.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        match &self.vocabulary {
            Vocabulary::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Vocabulary::HuggingFace(tokenizer) => tokenizer
                .encode_fast(text, add_special_tokens)
                .map(|encoding| encoding.get_ids().to_vec())
                .map_err(|e| TokenizerError::Encode(e.to_string())),
        }
    }

    /// Text of `ids`, skipping special tokens. Unknown ids decode to nothing
    /// rather than failing: they come from clients and never affect routing.
    pub fn decode(&self, ids: &[u32]) -> String {
        match &self.vocabulary {
            Vocabulary::Bytes => {
                let bytes: Vec<u8> = ids.iter().filter_map(|id| u8::try_from(*id).ok()).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Vocabulary::HuggingFace(tokenizer) => tokenizer.decode(ids, true).unwrap_or_default(),
        }
    }

    /// `count` deterministic output tokens for `seed`: tokenized pseudo-random
    /// words, so each token decodes to clean text.
    pub fn output_tokens(&self, seed: u64, count: usize) -> Vec<u32> {
        let mut stream = crate::determinism::HashStream::new(seed);
        let mut ids = Vec::with_capacity(count);
        // Words are tokenized in groups to amortize the tokenizer call; a group
        // of 32 words yields at least 32 tokens, so the loop ends.
        while ids.len() < count {
            let mut text = String::new();
            for _ in 0..32 {
                text.push(' ');
                text.push_str(OUTPUT_WORDS[stream.below(OUTPUT_WORDS.len())]);
            }
            match self.encode(&text, false) {
                Ok(group) if !group.is_empty() => ids.extend(group),
                // A tokenizer that cannot encode ASCII words: fall back to bytes.
                _ => ids.extend(text.bytes().map(u32::from)),
            }
        }
        ids.truncate(count);
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_fallback_round_trips() {
        let codec = TextCodec::load(None).unwrap();
        let ids = codec.encode("héllo", true).unwrap();
        assert_eq!(ids.len(), 6);
        assert_eq!(ids[0], u32::from(b'h'));
        assert_eq!(codec.decode(&ids), "héllo");
    }

    #[test]
    fn output_tokens_are_deterministic_and_exact_length() {
        let codec = TextCodec::load(None).unwrap();
        let a = codec.output_tokens(42, 100);
        assert_eq!(a.len(), 100);
        assert_eq!(a, codec.output_tokens(42, 100));
        assert_ne!(a, codec.output_tokens(43, 100));
        // Each token decodes alone and pieces concatenate to the whole.
        let pieces: String = a.iter().map(|t| codec.decode(&[*t])).collect();
        assert_eq!(pieces, codec.decode(&a));
    }
}
