//! Load generator for measuring how many simulated requests per second one
//! sim-engine sustains. Closed loop: `--concurrency` clients each send
//! completions with token-id prompts (no tokenization on either side) for
//! `--seconds`, then the achieved rates are printed. Every request has a
//! unique prefix so nothing is served from the prefix cache.
//!
//! See docs/sim-engine.md for the command and the measured numbers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Base URL of the sim-engine.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    #[arg(long, default_value = "sim-model")]
    model: String,
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, default_value_t = 512)]
    prompt_tokens: u32,
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    #[arg(long, default_value_t = 20)]
    seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;
    let url = format!("{}/v1/completions", args.url);
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let next_prompt = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..args.concurrency {
        let (client, url, model) = (client.clone(), url.clone(), args.model.clone());
        let (done, failed, next_prompt) = (done.clone(), failed.clone(), next_prompt.clone());
        let (prompt_tokens, max_tokens) = (args.prompt_tokens, args.max_tokens);
        clients.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let n = next_prompt.fetch_add(1, Ordering::Relaxed) as u32;
                let prompt: Vec<u32> = (0..prompt_tokens)
                    .map(|i| 1 + (n.wrapping_mul(7919) + i) % 100_000)
                    .collect();
                let body =
                    serde_json::json!({"model": model, "prompt": prompt, "max_tokens": max_tokens});
                let ok = match client.post(&url).json(&body).send().await {
                    Ok(response) => {
                        response.status().is_success() && response.bytes().await.is_ok()
                    }
                    Err(_) => false,
                };
                let counter = if ok { &done } else { &failed };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for client in clients {
        client.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let completed = done.load(Ordering::Relaxed);
    println!(
        "completed {completed} failed {} in {elapsed:.1} s: {:.1} requests/s, {:.0} output tokens/s, {:.0} prompt tokens/s",
        failed.load(Ordering::Relaxed),
        completed as f64 / elapsed,
        completed as f64 * f64::from(args.max_tokens) / elapsed,
        completed as f64 * f64::from(args.prompt_tokens) / elapsed,
    );
    Ok(())
}
