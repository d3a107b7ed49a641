//! Prompts as the engines block them, for the hit-rate bound.

use anyhow::Context;
use kv_sidecar::tokenize::ModelTokenizer;

use crate::fleet_bench::bound::BlockedPrompt;
use crate::fleet_bench::workload::Prompt;

/// Token ids and chat messages to block hashes, with the engines'
/// tokenizer, chat template and block size.
pub struct PromptBlocker {
    tokenizer: ModelTokenizer,
}

impl PromptBlocker {
    pub fn new(
        model: &str,
        tokenizer_json: &std::path::Path,
        block_size: u32,
    ) -> anyhow::Result<Self> {
        let tokenizer = ModelTokenizer::load(model, tokenizer_json, None, block_size, 4_096)
            .with_context(|| format!("loading {}", tokenizer_json.display()))?;
        Ok(Self { tokenizer })
    }

    pub fn block_size(&self) -> usize {
        self.tokenizer.hasher().block_size().as_usize()
    }

    pub fn blocked(&self, prompt: &Prompt) -> anyhow::Result<BlockedPrompt> {
        match prompt {
            Prompt::TokenIds(tokens) => Ok(BlockedPrompt {
                block_hashes: self
                    .tokenizer
                    .hasher()
                    .sequence_hashes(tokens)
                    .into_iter()
                    .map(|h| h.0)
                    .collect(),
                tokens: tokens.len(),
            }),
            Prompt::Chat(messages) => {
                let tokenized = self
                    .tokenizer
                    .tokenize_chat(messages, None, None)
                    .context("tokenizing a chat prompt")?;
                Ok(BlockedPrompt {
                    block_hashes: tokenized.block_hashes,
                    tokens: tokenized.num_tokens,
                })
            }
        }
    }
}
