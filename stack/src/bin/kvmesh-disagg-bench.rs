//! `scripts/bench-disagg`: time to first token and inter-token latency of
//! aggregated against disaggregated serving, at equal worker count, on a
//! long-prompt workload.
//!
//! Two fleets, one after the other on the same machine: N workers that both
//! prefill and decode, and N/2 prefill plus N/2 decode workers with remote
//! prefill (`always`, the chosen protocol). Each gets the same open-loop
//! stream of unique long token-id prompts (no cache hits: prefill is all
//! compute), streamed back; TTFT and the gaps between tokens are measured at
//! the client.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use kvmesh_config::{DisaggregationPolicy, EngineKind};
use kvmesh_stack::harness::load::stream_timed;
use kvmesh_stack::harness::stack::{Stack, StackOptions};
use kvmesh_stack::harness::stats::quantile;
use serde_json::json;

#[derive(Debug, Parser)]
#[command(about = "Aggregated vs disaggregated TTFT and inter-token latency")]
struct Args {
    /// Workers per fleet (even: the disaggregated fleet splits them in half).
    #[arg(long, default_value_t = 4)]
    workers: usize,
    #[arg(long, default_value_t = 60)]
    requests: usize,
    /// Arrivals per second (real time), evenly spaced.
    #[arg(long, default_value_t = 2.0)]
    rate: f64,
    #[arg(long, default_value_t = 4_000)]
    prompt_tokens: u32,
    #[arg(long, default_value_t = 128)]
    output_tokens: u32,
    /// Simulated time runs this many times faster than real time.
    #[arg(long, default_value_t = 4.0)]
    speedup: f64,
    /// The handshake (`sglang`: one prefill worker only).
    #[arg(long, value_enum, default_value_t = EngineKind::Vllm)]
    protocol: EngineKind,
}

async fn run_load(
    gateway: &str,
    args: &Args,
    seed: u32,
) -> anyhow::Result<(Vec<f64>, Vec<f64>, usize)> {
    let client = reqwest::Client::new();
    let url = format!("{gateway}/v1/completions");
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let mut tasks = Vec::with_capacity(args.requests);
    for i in 0..args.requests as u32 {
        // Unique prompts: every block differs, so nothing is cached anywhere.
        let prompt: Vec<u32> = (0..args.prompt_tokens)
            .map(|t| 1_000 + (seed * 7_919 + i * 104_729 + t * 31) % 100_000)
            .collect();
        let body = json!({"model": "qwen3", "prompt": prompt,
            "max_tokens": args.output_tokens, "stream": true});
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            stream_timed(&client, &url, &body).await
        }));
        tokio::time::sleep(interval).await;
    }
    let (mut ttft, mut gaps, mut errors) = (Vec::new(), Vec::new(), 0);
    for task in tasks {
        match task.await? {
            Ok(streamed) => {
                ttft.extend(streamed.ttft());
                gaps.extend(streamed.inter_token_gaps());
            }
            Err(err) => {
                eprintln!("request failed: {err:#}");
                errors += 1;
            }
        }
    }
    Ok((ttft, gaps, errors))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.workers >= 2 && args.workers % 2 == 0,
        "--workers must be even and at least 2"
    );
    let runtime = tokio::runtime::Runtime::new()?;
    println!(
        "{} requests at {}/s, {}-token unique prompts, {} output tokens, {} workers per fleet, --speedup {}, protocol {}\n",
        args.requests, args.rate, args.prompt_tokens, args.output_tokens, args.workers, args.speedup, args.protocol
    );
    println!("| fleet | TTFT p50 | TTFT p90 | TTFT p99 | ITL p50 | ITL p99 | errors |");
    println!("|---|---|---|---|---|---|---|");
    for (name, prefill_workers) in [("aggregated", 0), ("disaggregated", args.workers / 2)] {
        let mut options = StackOptions::new("qwen3", args.workers - prefill_workers)?;
        options.sim_args = vec![
            "--speedup".to_owned(),
            args.speedup.to_string(),
            "--max-model-len".to_owned(),
            "65536".to_owned(),
        ];
        options.prefill_workers = prefill_workers;
        options.disaggregation = (DisaggregationPolicy::Always, args.protocol);
        let stack =
            Stack::start(options, |_| {}).with_context(|| format!("starting the {name} fleet"))?;
        let (mut ttft, mut gaps, errors) =
            runtime.block_on(run_load(&stack.envoy.gateway_url(), &args, 1))?;
        let ms = |v: f64| format!("{:.1} ms", v * 1e3);
        println!(
            "| {name} | {} | {} | {} | {} | {} | {errors} |",
            ms(quantile(&mut ttft, 0.5)),
            ms(quantile(&mut ttft, 0.9)),
            ms(quantile(&mut ttft, 0.99)),
            ms(quantile(&mut gaps, 0.5)),
            ms(quantile(&mut gaps, 0.99)),
        );
        if prefill_workers > 0 {
            let remote = stack.envoy.stat("wasmcustom.kvmesh_remote_prefills")?;
            let failed = stack.envoy.stat("wasmcustom.kvmesh_prefill_failures")?;
            eprintln!("{name}: {remote} remote prefills, {failed} prefilled locally");
        }
    }
    Ok(())
}
