//! Per-policy numbers from a run, in simulated time.

use crate::fleet_bench::bound::HitRateBound;
use crate::fleet_bench::cpu::CpuShare;
use crate::fleet_bench::run::PolicyRun;
use crate::harness::stats::quantile;

/// Prompt-length classes TTFT is also reported by: a name and the class's
/// largest prompt (tokens). Routing that trades short prompts' latency for
/// long prompts' cache hits shows only in such a split.
pub const PROMPT_CLASSES: [(&str, u64); 3] =
    [("< 2k", 2_047), ("2k–8k", 8_191), ("≥ 8k", u64::MAX)];

/// TTFT quantiles of the requests of one prompt-length class.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClassTtft {
    pub requests: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

/// One row of the results table. Latencies in simulated milliseconds
/// (client-side real time × speedup).
#[derive(Debug, Clone)]
pub struct Summary {
    pub policy: &'static str,
    pub slug: &'static str,
    pub requests: usize,
    pub errors: usize,
    pub ttft_p50: f64,
    pub ttft_p90: f64,
    pub ttft_p99: f64,
    /// Inter-token latency: each request's mean time between tokens.
    pub itl_p50: f64,
    pub itl_p99: f64,
    pub e2e_p50: f64,
    pub e2e_p99: f64,
    /// Generated tokens per simulated second over the whole run.
    pub output_tokens_per_s: f64,
    /// Prefix-cache hit rate from the engines' counters (every admission,
    /// re-admissions after preemption included).
    pub hit_rate: f64,
    /// Cached ÷ prompt tokens over the requests' own usage reports: each
    /// prompt counted once, at its first admission, as the bound counts it.
    /// `None` with remote prefill, where the decode engine reports the
    /// blocks it pulled as cached.
    pub request_hit_rate: Option<f64>,
    pub preemptions: u64,
    pub bound: HitRateBound,
    /// kvmesh requests routed precise / approximate / fallback.
    pub modes: Option<[u64; 3]>,
    /// P/D requests prefilled remotely / by their decode worker after a
    /// failed prefill leg.
    pub remote_prefills: Option<[u64; 2]>,
    /// Every successful request's TTFT, sorted, for the CDF.
    pub ttfts: Vec<f64>,
    /// TTFT by [`PROMPT_CLASSES`], over the requests that reported usage.
    pub ttft_by_prompt: [ClassTtft; PROMPT_CLASSES.len()],
    /// How late arrivals left the client (real ms, p50 / p99 / max): the
    /// replay keeping its open-loop schedule, or not.
    pub late_ms: [f64; 3],
    /// Shares of the cores' time busy and used by the bench during the replay.
    pub cpu: Option<CpuShare>,
    /// Requests sent through each gateway.
    pub by_gateway: Vec<usize>,
}

impl Summary {
    pub fn new(run: &PolicyRun, speedup: f64, bound: HitRateBound) -> Self {
        let ms = speedup * 1e3;
        let mut ttfts = Vec::new();
        let mut gaps = Vec::new();
        let mut totals = Vec::new();
        let mut output_tokens = 0usize;
        let mut errors = 0;
        let (mut cached_tokens, mut prompt_tokens) = (0u64, 0u64);
        let mut by_class: [Vec<f64>; PROMPT_CLASSES.len()] = Default::default();
        let mut late: Vec<f64> = Vec::new();
        let mut by_gateway: Vec<usize> = Vec::new();
        for record in &run.records {
            late.extend(record.late_by.map(|s| s * 1e3));
            if by_gateway.len() <= record.gateway {
                by_gateway.resize(record.gateway + 1, 0);
            }
            by_gateway[record.gateway] += 1;
            match &record.outcome {
                Ok(streamed) => {
                    ttfts.extend(streamed.ttft().map(|t| t * ms));
                    if let (Some(usage), Some(ttft)) = (streamed.usage, streamed.ttft()) {
                        let class = PROMPT_CLASSES
                            .iter()
                            .position(|(_, largest)| usage.prompt_tokens <= *largest)
                            .unwrap_or(PROMPT_CLASSES.len() - 1);
                        by_class[class].push(ttft * ms);
                    }
                    gaps.extend(streamed.mean_inter_token().map(|g| g * ms));
                    totals.push(streamed.total * ms);
                    output_tokens += streamed.token_times.len();
                    if let Some(usage) = streamed.usage {
                        cached_tokens += usage.cached_tokens;
                        prompt_tokens += usage.prompt_tokens;
                    }
                }
                Err(_) => errors += 1,
            }
        }
        let simulated_seconds = run.wall * speedup;
        Self {
            policy: run.policy.label(),
            slug: run.policy.slug(),
            requests: run.records.len(),
            errors,
            ttft_p50: quantile(&mut ttfts, 0.5),
            ttft_p90: quantile(&mut ttfts, 0.9),
            ttft_p99: quantile(&mut ttfts, 0.99),
            itl_p50: quantile(&mut gaps, 0.5),
            itl_p99: quantile(&mut gaps, 0.99),
            e2e_p50: quantile(&mut totals, 0.5),
            e2e_p99: quantile(&mut totals, 0.99),
            output_tokens_per_s: if simulated_seconds > 0.0 {
                output_tokens as f64 / simulated_seconds
            } else {
                0.0
            },
            hit_rate: if run.cache_queries > 0.0 {
                run.cache_hits / run.cache_queries
            } else {
                0.0
            },
            request_hit_rate: (prompt_tokens > 0 && !run.policy.disaggregated())
                .then(|| cached_tokens as f64 / prompt_tokens as f64),
            preemptions: run.preemptions as u64,
            bound,
            modes: run.modes,
            remote_prefills: run.remote_prefills,
            ttfts,
            ttft_by_prompt: by_class.map(|mut class| ClassTtft {
                requests: class.len(),
                p50: quantile(&mut class, 0.5),
                p90: quantile(&mut class, 0.9),
                p99: quantile(&mut class, 0.99),
            }),
            late_ms: [
                quantile(&mut late, 0.5),
                quantile(&mut late, 0.99),
                quantile(&mut late, 1.0),
            ],
            cpu: run.cpu,
            by_gateway,
        }
    }

    /// The hit rate to set against the bound: per request where the
    /// requests say it, else the engines' counters.
    pub fn comparable_hit_rate(&self) -> f64 {
        self.request_hit_rate.unwrap_or(self.hit_rate)
    }
}
