//! The benchmark's client routing through Dynamo's selection service
//! ([`DynamoSelector`](crate::harness::dynamo_selector::DynamoSelector)) as
//! Dynamo's frontend routes through its KV router: it tokenizes each prompt
//! (chat with the engines' template), books the worker the selector picks
//! for those tokens (`POST /select_and_reserve`), sends the request there,
//! and reports the end of its prefill and its completion, which is all the
//! load the selector counts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use kv_sidecar::tokenize::ModelTokenizer;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::fleet_bench::workload::Prompt;
use crate::harness::load::{stream_timed_from, Streamed};

pub struct DynamoRouting {
    /// Base URL of every replica of the selection service.
    selectors: Vec<String>,
    model: String,
    /// The engines' tokenizer and chat template.
    tokenizer: Arc<ModelTokenizer>,
    next_selection: AtomicU64,
}

/// What `POST /select_and_reserve` answers that the client uses.
#[derive(Debug, Deserialize)]
struct Selected {
    /// Base URL of the worker booked.
    endpoint: String,
}

impl DynamoRouting {
    pub fn new(selectors: Vec<String>, model: &str, tokenizer: ModelTokenizer) -> Self {
        Self {
            selectors,
            model: model.to_owned(),
            tokenizer: Arc::new(tokenizer),
            next_selection: AtomicU64::new(0),
        }
    }

    /// Routes and streams one request through the next selector replica in
    /// turn (returned with the outcome), which books and frees it; its times
    /// run from before the tokenizing and the selection, which are part of
    /// the routing.
    pub async fn send(
        &self,
        client: &reqwest::Client,
        prompt: &Prompt,
        body: &Value,
    ) -> (usize, anyhow::Result<Streamed>) {
        let n = self.next_selection.fetch_add(1, Ordering::Relaxed);
        let replica = (n % self.selectors.len() as u64) as usize;
        let id = format!("bench-{n}");
        let outcome = self
            .send_through(&self.selectors[replica], &id, client, prompt, body)
            .await;
        (replica, outcome)
    }

    async fn send_through(
        &self,
        selector: &str,
        id: &str,
        client: &reqwest::Client,
        prompt: &Prompt,
        body: &Value,
    ) -> anyhow::Result<Streamed> {
        let started = Instant::now();
        let token_ids = self.token_ids(prompt).await?;
        let selected: Selected = client
            .post(format!("{selector}/select_and_reserve"))
            .json(&json!({"selection_id": id, "model_name": self.model, "token_ids": token_ids}))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .context("POST /select_and_reserve")?
            .json()
            .await
            .context("reading the selection")?;
        let reservation = format!("{selector}/reservations/{id}");
        let mut prefill_reported = None;
        let outcome = stream_timed_from(
            client,
            &format!("{}{}", selected.endpoint, prompt.path()),
            body,
            started,
            || {
                let request = client.post(format!("{reservation}/prefill_complete"));
                prefill_reported = Some(tokio::spawn(lifecycle(request)));
            },
        )
        .await;
        // Freed however the request ended, as the frontend frees it.
        let freed = lifecycle(client.delete(&reservation)).await;
        let streamed = outcome?;
        if let Some(reported) = prefill_reported {
            reported
                .await
                .context("the prefill report panicked")?
                .context("POST prefill_complete")?;
        }
        freed.context("DELETE the reservation")?;
        Ok(streamed)
    }

    /// The prompt as the engine will tokenize it.
    async fn token_ids(&self, prompt: &Prompt) -> anyhow::Result<Vec<u32>> {
        match prompt {
            Prompt::TokenIds(tokens) => Ok(tokens.clone()),
            Prompt::Chat(messages) => {
                let (tokenizer, messages) = (Arc::clone(&self.tokenizer), messages.clone());
                let tokenized = tokio::task::spawn_blocking(move || {
                    tokenizer.tokenize_chat(&messages, None, None)
                })
                .await
                .context("the tokenizer panicked")?
                .context("tokenizing a chat prompt")?;
                Ok(tokenized.token_ids())
            }
        }
    }
}

async fn lifecycle(request: reqwest::RequestBuilder) -> reqwest::Result<()> {
    request.send().await?.error_for_status().map(drop)
}
