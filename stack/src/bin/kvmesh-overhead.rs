//! `scripts/bench-overhead`: the latency the kvmesh filter adds to Envoy.
//!
//! One fleet (simulated workers with relays, NATS, the sidecar) behind three
//! gateways: Envoy with the filter fed by the sidecar, plain Envoy
//! (`least_request`, no filter), and the filter without a sidecar. Warm
//! multi-turn chats are sent through each, rotating which goes first, one
//! request at a time; the engines run fast and answer one token, so the
//! differences in latency are the gateways'. Also reports the filter's own
//! decision and callback histograms.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use kvmesh_stack::harness::client::{http_client, post_json};
use kvmesh_stack::harness::stack::{Stack, StackOptions};
use kvmesh_stack::harness::stats::quantile;
use kvmesh_stack::harness::{Envoy, GatewayConfig};
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(about = "Measure the latency the kvmesh filter adds over plain Envoy")]
struct Args {
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Conversations, sent one after another, turn by turn.
    #[arg(long, default_value_t = 24)]
    conversations: usize,
    /// Turns per conversation; each re-sends the whole history.
    #[arg(long, default_value_t = 8)]
    turns: usize,
    /// Words in each conversation's system prompt.
    #[arg(long, default_value_t = 400)]
    system_words: usize,
    /// Simulated time runs this many times faster than real time.
    #[arg(long, default_value_t = 1000.0)]
    speedup: f64,
}

fn timed(
    client: &reqwest::blocking::Client,
    url: &str,
    body: &Value,
) -> anyhow::Result<(f64, Value)> {
    let started = Instant::now();
    let response = post_json(client, url, body)?;
    let elapsed = started.elapsed().as_secs_f64() * 1e6;
    anyhow::ensure!(response.status == 200, "{url}: {}", response.text);
    Ok((elapsed, response.json()?))
}

fn words(topic: &str, count: usize) -> String {
    (0..count)
        .map(|i| format!("{topic}{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut options = StackOptions::new("qwen3", args.workers)?;
    options.sim_args = vec!["--speedup".to_owned(), args.speedup.to_string()];
    let stack = Stack::start(options, |_| {}).context("starting the kvmesh stack")?;
    let mut plain_config = GatewayConfig::new(vec![stack.model_route()])?;
    plain_config.filter = false;
    let plain = Envoy::start(plain_config).context("starting plain Envoy")?;
    // The filter alone, without the sidecar's callouts and reports.
    let standalone = Envoy::start(GatewayConfig::new(vec![stack.model_route()])?)
        .context("starting Envoy with the filter and no sidecar")?;

    let gateways = [&stack.envoy, &plain, &standalone]
        .map(|envoy| format!("{}/v1/chat/completions", envoy.gateway_url()));
    let clients = [http_client(), http_client(), http_client()];
    let mut samples: [Vec<f64>; 3] = Default::default();
    for conversation in 0..args.conversations {
        let mut messages = vec![json!({"role": "system",
            "content": words(&format!("c{conversation}policy"), args.system_words)})];
        for turn in 0..args.turns {
            messages.push(
                json!({"role": "user", "content": format!("question {turn} of {conversation}?")}),
            );
            let body = json!({"model": "qwen3", "messages": messages, "max_tokens": 1});
            // Rotate which gateway goes first, so none always meets a cache
            // another just warmed.
            let mut order = [0, 1, 2];
            order.rotate_left((conversation + turn) % 3);
            let mut reply = String::new();
            for gateway in order {
                let (latency, response) = timed(&clients[gateway], &gateways[gateway], &body)?;
                samples[gateway].push(latency);
                reply = response["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
            }
            messages.push(json!({"role": "assistant", "content": reply}));
        }
    }
    // Envoy publishes histograms at its 5 s stats flush.
    std::thread::sleep(Duration::from_secs(6));
    let envoy = &stack.envoy;
    let histogram = |name: &str, q: &str| -> anyhow::Result<String> {
        Ok(envoy
            .histogram_quantile(&format!("wasmcustom.{name}"), q)?
            .map_or_else(|| "n/a".to_owned(), |v| format!("{v:.0}")))
    };
    let requests = args.conversations * args.turns;
    println!(
        "{requests} warm multi-turn chat requests per gateway, {} workers, --speedup {}\n",
        args.workers, args.speedup
    );
    println!("| gateway | p50 | p90 | p99 |");
    println!("|---|---|---|---|");
    let [mut filtered, mut baseline, mut alone] = samples;
    let rows = [
        ("Envoy + kvmesh (precise, sidecar)", &mut filtered),
        ("plain Envoy (least_request)", &mut baseline),
        ("Envoy + kvmesh (no sidecar)", &mut alone),
    ];
    let mut medians = Vec::new();
    for (name, latencies) in rows {
        let (p50, p90, p99) = (
            quantile(latencies, 0.5),
            quantile(latencies, 0.9),
            quantile(latencies, 0.99),
        );
        medians.push((p50, p99));
        println!("| {name} | {p50:.0} µs | {p90:.0} µs | {p99:.0} µs |");
    }
    let added = |(p50, p99): (f64, f64)| {
        let baseline: (f64, f64) = medians[1];
        (p50 - baseline.0, p99 - baseline.1)
    };
    let (precise, alone) = (added(medians[0]), added(medians[2]));
    println!(
        "\nadded over plain Envoy: precise p50 {:.0} µs, p99 {:.0} µs; no sidecar p50 {:.0} µs, p99 {:.0} µs",
        precise.0, precise.1, alone.0, alone.1
    );
    println!(
        "filter decision (µs): p50 {}, p99 {}, max {}",
        histogram("kvmesh_decision_us", "P50")?,
        histogram("kvmesh_decision_us", "P99")?,
        histogram("kvmesh_decision_us", "P100")?
    );
    println!(
        "filter callback (µs): p50 {}, p99 {}, longest {}",
        histogram("kvmesh_callback_us", "P50")?,
        histogram("kvmesh_callback_us", "P99")?,
        histogram("kvmesh_callback_us", "P100")?
    );
    println!(
        "prompt cache hits {}, misses {}",
        envoy.stat("wasmcustom.kvmesh_prompt_cache_hits")?,
        envoy.stat("wasmcustom.kvmesh_prompt_cache_misses")?
    );
    Ok(())
}
