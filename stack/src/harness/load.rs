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
    /// The sim-engine that answered (its `x-sim-worker-id` header).
    pub worker: Option<String>,
    /// What the router saw when it chose, when the gateway sends its debug
    /// headers.
    pub routed: Option<RoutedView>,
    /// The worker that prefilled the prompt for the one that answered, when
    /// another did (`x-kvmesh-prefill-worker`, a debug header: its address,
    /// with `#rank` for a data-parallel rank).
    pub prefill_worker: Option<String>,
    /// The engine's final usage chunk, sent when the request asks for
    /// `stream_options.include_usage`.
    pub usage: Option<Usage>,
}

/// The prompt's cached blocks as the router saw them at its decision
/// (`x-kvmesh-cached-blocks` and `x-kvmesh-most-cached-blocks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutedView {
    /// On the worker it chose.
    pub cached_blocks: u64,
    /// On the candidate that held the most.
    pub most_cached_blocks: u64,
}

impl RoutedView {
    /// From a response's debug headers; `None` unless both are there.
    pub fn from_headers(headers: &reqwest::header::HeaderMap) -> Option<Self> {
        let blocks = |name: &str| headers.get(name)?.to_str().ok()?.parse().ok();
        Some(Self {
            cached_blocks: blocks("x-kvmesh-cached-blocks")?,
            most_cached_blocks: blocks("x-kvmesh-most-cached-blocks")?,
        })
    }
}

/// Prompt accounting of one request as its engine reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Prompt tokens found in the prefix cache when the request was first
    /// scheduled (`prompt_tokens_details.cached_tokens`).
    pub cached_tokens: u64,
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
    stream_timed_from(client, url, body, Instant::now(), || {}).await
}

/// As [`stream_timed`], with times from `started` (before the client chose
/// where to send it, when it routes itself), calling `on_first_token` when
/// the first generated text arrives.
pub async fn stream_timed_from(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
    started: Instant,
    on_first_token: impl FnOnce(),
) -> anyhow::Result<Streamed> {
    let mut on_first_token = Some(on_first_token);
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
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let worker = header("x-sim-worker-id");
    let prefill_worker = header("x-kvmesh-prefill-worker");
    let routed = RoutedView::from_headers(response.headers());
    let mut chunks = response.bytes_stream();
    let mut pending = Vec::new();
    let mut streamed = Streamed {
        token_times: Vec::new(),
        total: 0.0,
        text: String::new(),
        worker,
        routed,
        prefill_worker,
        usage: None,
    };
    while let Some(chunk) = chunks.next().await {
        let at = started.elapsed().as_secs_f64();
        pending.extend_from_slice(&chunk.context("reading the stream")?);
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            match parse_event(&event) {
                Some(Event::Text(piece)) => {
                    if let Some(first_token) = on_first_token.take() {
                        first_token();
                    }
                    streamed.token_times.push(at);
                    streamed.text.push_str(&piece);
                }
                Some(Event::Usage(usage)) => streamed.usage = Some(usage),
                None => {}
            }
        }
    }
    streamed.total = started.elapsed().as_secs_f64();
    anyhow::ensure!(!streamed.token_times.is_empty(), "no token streamed");
    Ok(streamed)
}

/// What one server-sent event of a stream carries that the timer keeps.
#[derive(Debug, PartialEq)]
enum Event {
    /// Non-empty generated text.
    Text(String),
    /// The final usage chunk.
    Usage(Usage),
}

fn parse_event(event: &[u8]) -> Option<Event> {
    let text = std::str::from_utf8(event).ok()?;
    let data = text.trim().strip_prefix("data:")?.trim_start();
    let value: serde_json::Value = serde_json::from_str(data).ok()?;
    let choice = &value["choices"][0];
    let piece = choice["delta"]["content"]
        .as_str()
        .or_else(|| choice["text"].as_str())
        .filter(|piece| !piece.is_empty());
    if let Some(piece) = piece {
        return Some(Event::Text(piece.to_owned()));
    }
    let usage = value.get("usage").filter(|u| u.is_object())?;
    Some(Event::Usage(Usage {
        prompt_tokens: usage["prompt_tokens"].as_u64()?,
        completion_tokens: usage["completion_tokens"].as_u64().unwrap_or(0),
        cached_tokens: usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_chat_and_completion_chunks_and_usage_and_skips_the_rest() {
        let chat = br#"data: {"choices":[{"delta":{"content":"hi"}}]}"#;
        let completion = br#"data: {"choices":[{"text":" there"}]}"#;
        let role_only = br#"data: {"choices":[{"delta":{"role":"assistant"}}]}"#;
        let usage = br#"data: {"choices":[],"usage":{"prompt_tokens":40,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":32}}}"#;
        let text = |s: &str| Some(Event::Text(s.to_owned()));
        assert_eq!(parse_event(chat), text("hi"));
        assert_eq!(parse_event(completion), text(" there"));
        assert_eq!(parse_event(role_only), None);
        assert_eq!(parse_event(b"data: [DONE]"), None);
        assert_eq!(
            parse_event(usage),
            Some(Event::Usage(Usage {
                prompt_tokens: 40,
                completion_tokens: 5,
                cached_tokens: 32
            }))
        );
    }
}
