//! Prompts as the engines tokenize and block them, for the hit-rate bound
//! and for the routers that take token ids.

use std::collections::HashMap;

use anyhow::Context;
use kv_sidecar::tokenize::{CacheLimits, ModelTokenizer};

use crate::fleet_bench::bound::{BlockedPrompt, Held};
use crate::fleet_bench::run::PolicyRun;
use crate::fleet_bench::workload::Prompt;
use crate::harness::load::Streamed;
use crate::harness::paths;

/// The tokenizer and chat template the benchmark's engines serve `model`
/// with (the Qwen3 test tokenizer from `scripts/setup`).
pub fn engine_tokenizer(model: &str, block_size: u32) -> anyhow::Result<ModelTokenizer> {
    let tokenizer_json = paths::qwen3_tokenizer_dir()?.join("tokenizer.json");
    ModelTokenizer::load(
        model,
        &tokenizer_json,
        None,
        block_size,
        CacheLimits::default(),
    )
    .with_context(|| format!("loading {}", tokenizer_json.display()))
}

/// Token ids and chat messages to block hashes, with the engines'
/// tokenizer, chat template and block size.
pub struct PromptBlocker {
    tokenizer: ModelTokenizer,
}

impl PromptBlocker {
    pub fn new(model: &str, block_size: u32) -> anyhow::Result<Self> {
        Ok(Self {
            tokenizer: engine_tokenizer(model, block_size)?,
        })
    }

    pub fn block_size(&self) -> usize {
        self.tokenizer.hasher().block_size().as_usize()
    }

    pub fn blocked(&self, prompt: &Prompt) -> anyhow::Result<BlockedPrompt> {
        match prompt {
            Prompt::TokenIds(tokens) => Ok(BlockedPrompt::new(
                self.tokenizer
                    .hasher()
                    .sequence_hashes(tokens)
                    .into_iter()
                    .map(|h| h.0)
                    .collect(),
                tokens.len(),
            )),
            Prompt::Chat(messages) => {
                let tokenized = self
                    .tokenizer
                    .tokenize_chat(messages, None, None)
                    .context("tokenizing a chat prompt")?;
                Ok(BlockedPrompt::new(
                    tokenized.block_hashes,
                    tokenized.num_tokens,
                ))
            }
        }
    }

    /// Every request of `run` blocked, in order, each chat turn with the
    /// answer blocks its conversation's next turn shows it generated.
    pub fn blocked_run(&self, run: &PolicyRun) -> anyhow::Result<Vec<BlockedPrompt>> {
        let mut prompts = run
            .records
            .iter()
            .map(|r| self.blocked(&r.prompt))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let block_size = self.block_size();
        for (prompt, record) in prompts.iter_mut().zip(&run.records) {
            prompt.held = record.outcome.as_ref().ok().map(|streamed| Held {
                from: record.sent_at,
                until: record.sent_at + streamed.total,
                generated_blocks: generated_tokens(streamed) / block_size,
            });
        }
        let mut last_turn: HashMap<usize, usize> = HashMap::new();
        for (i, record) in run.records.iter().enumerate() {
            if let Some(previous) = last_turn.insert(record.conversation, i) {
                let generated = run.records[previous]
                    .outcome
                    .as_ref()
                    .map_or(0, generated_tokens);
                // `previous < i`: the earlier turn is in the left half.
                let (earlier, later) = prompts.split_at_mut(i);
                earlier[previous].answered_in(&later[0], generated, block_size);
            }
        }
        Ok(prompts)
    }
}

/// Tokens a request generated, by its usage report or else its chunks.
fn generated_tokens(streamed: &Streamed) -> usize {
    streamed
        .usage
        .map_or(streamed.token_times.len(), |u| u.completion_tokens as usize)
}
