//! Streamed OpenAI requests timed at the client, for the benchmarks.

use std::time::Instant;

use anyhow::Context;
use futures_util::StreamExt;

/// What the client saw of one streamed completion; times in real seconds
/// from sending the request.
#[derive(Debug, Clone)]
pub struct Streamed {
    /// Arrival of each chunk that carried generated text.
    pub token_times: Vec<f64>,
    /// Until the stream ended.
    pub total: f64,
    /// The generated text (chat `delta.content` or completion `text`).
    pub text: String,
}

impl Streamed {
    /// Time to the first generated text.
    pub fn ttft(&self) -> Option<f64> {
        self.token_times.first().copied()
    }

    /// Gaps between consecutive generated chunks.
    pub fn inter_token_gaps(&self) -> impl Iterator<Item = f64> + '_ {
        self.token_times.windows(2).map(|w| w[1] - w[0])
    }

    /// Mean time between tokens after the first (vLLM's TPOT); `None` for a
    /// single token. Unlike single gaps it does not read 0 when the network
    /// delivers several tokens in one read.
    pub fn mean_inter_token(&self) -> Option<f64> {
        let (first, last) = (self.token_times.first()?, self.token_times.last()?);
        let gaps = self.token_times.len().checked_sub(1).filter(|&n| n > 0)?;
        Some((last - first) / gaps as f64)
    }
}

/// POSTs `body` (which must ask for `"stream": true`) and times the
/// server-sent events until `data: [DONE]` or the end of the stream.
pub async fn stream_timed(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> anyhow::Result<Streamed> {
    let started = Instant::now();
    let response = client
        .post(url)
        .json(body)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        anyhow::bail!("{status}: {text}");
    }
    let mut chunks = response.bytes_stream();
    let mut pending = Vec::new();
    let mut streamed = Streamed {
        token_times: Vec::new(),
        total: 0.0,
        text: String::new(),
    };
    while let Some(chunk) = chunks.next().await {
        let at = started.elapsed().as_secs_f64();
        pending.extend_from_slice(&chunk.context("reading the stream")?);
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            if let Some(piece) = generated_text(&event) {
                streamed.token_times.push(at);
                streamed.text.push_str(&piece);
            }
        }
    }
    streamed.total = started.elapsed().as_secs_f64();
    anyhow::ensure!(!streamed.token_times.is_empty(), "no token streamed");
    Ok(streamed)
}

/// The non-empty text one SSE event carries, if any.
fn generated_text(event: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(event).ok()?;
    let data = text.trim().strip_prefix("data:")?.trim_start();
    let value: serde_json::Value = serde_json::from_str(data).ok()?;
    let choice = &value["choices"][0];
    choice["delta"]["content"]
        .as_str()
        .or_else(|| choice["text"].as_str())
        .filter(|piece| !piece.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_chat_and_completion_chunks_and_skips_the_rest() {
        let chat = br#"data: {"choices":[{"delta":{"content":"hi"}}]}"#;
        let completion = br#"data: {"choices":[{"text":" there"}]}"#;
        let role_only = br#"data: {"choices":[{"delta":{"role":"assistant"}}]}"#;
        assert_eq!(generated_text(chat).as_deref(), Some("hi"));
        assert_eq!(generated_text(completion).as_deref(), Some(" there"));
        assert_eq!(generated_text(role_only), None);
        assert_eq!(generated_text(b"data: [DONE]"), None);
    }
}
