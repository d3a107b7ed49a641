//! A minimal blocking OpenAI-style HTTP client for tests.

use std::time::Duration;

use anyhow::Context;

use crate::harness::load::RoutedView;

/// A response with its body parsed as JSON when possible.
#[derive(Debug)]
pub struct JsonResponse {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl JsonResponse {
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(&self.text).with_context(|| format!("body is not JSON: {}", self.text))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The sim-engine that answered (`x-sim-worker-id`).
    pub fn sim_worker(&self) -> anyhow::Result<String> {
        self.header("x-sim-worker-id")
            .map(str::to_owned)
            .with_context(|| format!("no x-sim-worker-id header: {}", self.text))
    }

    /// What the router saw at its decision, from the filter's debug headers.
    pub fn routed_view(&self) -> Option<RoutedView> {
        RoutedView::from_headers(&self.headers)
    }

    /// `usage.prompt_tokens_details.cached_tokens`; 0 when absent.
    pub fn cached_tokens(&self) -> u64 {
        self.json()
            .ok()
            .and_then(|v| v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64())
            .unwrap_or(0)
    }
}

/// Shared client with a bounded per-request timeout.
// Building fails only when the client's runtime thread cannot start, and
// then no test or tool can run at all: not worth a Result at every caller.
#[allow(clippy::expect_used)]
pub fn http_client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("a default reqwest client builds")
}

/// POSTs raw bytes with extra headers.
pub fn post(
    client: &reqwest::blocking::Client,
    url: &str,
    body: impl Into<reqwest::blocking::Body>,
    headers: &[(&str, &str)],
) -> anyhow::Result<JsonResponse> {
    let mut request = client
        .post(url)
        .header("content-type", "application/json")
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    send(request).with_context(|| format!("POST {url}"))
}

/// Sends any request and reads its whole answer.
pub fn send(request: reqwest::blocking::RequestBuilder) -> anyhow::Result<JsonResponse> {
    let response = request.send()?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().context("reading the response body")?;
    Ok(JsonResponse {
        status,
        headers,
        text,
    })
}

/// POSTs a JSON value.
pub fn post_json(
    client: &reqwest::blocking::Client,
    url: &str,
    body: &serde_json::Value,
) -> anyhow::Result<JsonResponse> {
    post(client, url, body.to_string(), &[])
}

/// Sum of the samples of `name` (any labels) whose label text contains
/// `labels`, scraped from a Prometheus text endpoint; 0 when unreachable.
pub fn prometheus_sum(url: &str, name: &str, labels: &str) -> f64 {
    let text = reqwest::blocking::get(url)
        .and_then(|r| r.text())
        .unwrap_or_default();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// [`prometheus_sum`] of data-parallel rank `rank`'s series, labelled
/// `engine="<rank>"` as vLLM (and the sim-engine) label them.
pub fn prometheus_rank_sum(url: &str, name: &str, rank: u32) -> f64 {
    prometheus_sum(url, name, &format!("engine=\"{rank}\""))
}
