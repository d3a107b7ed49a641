//! `scripts/bench`: kvmesh against Envoy's own balancing on the same
//! simulated fleet and workload, one policy after the other, each on a fresh
//! fleet (empty caches). Writes a markdown table, a CSV and SVG plots per
//! workload (see docs/benchmarks.md).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use kvmesh_stack::fleet_bench::bound::hit_rate_bound;
use kvmesh_stack::fleet_bench::mooncake::{trace_name, MooncakeReplay, TRACE_HINT};
use kvmesh_stack::fleet_bench::policy::Policy;
use kvmesh_stack::fleet_bench::prompts::PromptBlocker;
use kvmesh_stack::fleet_bench::report::{self, RunContext};
use kvmesh_stack::fleet_bench::run::{run_policy, FleetParams};
use kvmesh_stack::fleet_bench::scale::{LoadScale, SIZED_FOR_WORKERS};
use kvmesh_stack::fleet_bench::summary::Summary;
use kvmesh_stack::fleet_bench::workload::{MultiTenant, MultiTurn, Workload};
use kvmesh_stack::harness::fleet::SimHosting;
use kvmesh_stack::harness::stack::WorkerEngine;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum WorkloadKind {
    Mooncake,
    MultiTenant,
    MultiTurn,
}

#[derive(Debug, Parser)]
#[command(
    name = "kvmesh-bench",
    about = "Fleet benchmark: routing policies side by side on one simulated fleet"
)]
struct Args {
    #[command(flatten)]
    fleet: FleetParams,
    /// Workloads to run, comma-separated [default: all; mooncake only with
    /// a trace (--trace)]
    #[arg(long, value_enum, value_delimiter = ',')]
    workloads: Option<Vec<WorkloadKind>>,
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Policy::ALL)]
    policies: Vec<Policy>,
    /// Where the markdown, CSV and SVG files go.
    #[arg(long, default_value = "docs/benchmarks")]
    out: PathBuf,
    /// Also write every request (worker, prompt, TTFT) to
    /// `<workload>-requests.csv`.
    #[arg(long)]
    per_request: bool,
    /// Seed of the synthetic workloads.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Scale every workload's load by this factor, or `auto` (workers ÷ 4):
    /// the defaults are sized for 4 GPUs. Arrival rates and request counts
    /// are multiplied, and so are multi-tenant's tenants and multi-turn's
    /// sessions; Mooncake replays more of the trace at a higher rate (and the
    /// trace again, with fresh hash ids, past its end). KV blocks per GPU stay,
    /// so each GPU sees the same load and cache pressure and the run spans the
    /// same simulated time. Real time per simulated second grows with the
    /// factor: lower `--speedup` as the scale grows (docs/benchmarks.md).
    #[arg(long, default_value = "1")]
    scale: LoadScale,
    #[command(flatten)]
    mooncake: MooncakeReplay,
    #[command(flatten)]
    multi_tenant: MultiTenant,
    #[command(flatten)]
    multi_turn: MultiTurn,
}

/// What runs: the workloads asked for, else all of them, Mooncake only with
/// a trace to replay (the project ships none).
#[derive(Debug, PartialEq, Eq)]
struct Selection {
    workloads: Vec<WorkloadKind>,
    mooncake_skipped: bool,
}

fn select_workloads(asked: Option<&[WorkloadKind]>, has_trace: bool) -> anyhow::Result<Selection> {
    if let Some(asked) = asked {
        anyhow::ensure!(
            has_trace || !asked.contains(&WorkloadKind::Mooncake),
            "the mooncake workload needs a trace: {TRACE_HINT}"
        );
        return Ok(Selection {
            workloads: asked.to_vec(),
            mooncake_skipped: false,
        });
    }
    Ok(Selection {
        workloads: WorkloadKind::value_variants()
            .iter()
            .copied()
            .filter(|&kind| has_trace || kind != WorkloadKind::Mooncake)
            .collect(),
        mooncake_skipped: !has_trace,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let selection = select_workloads(args.workloads.as_deref(), args.mooncake.trace.is_some())?;
    if selection.mooncake_skipped {
        eprintln!("kvmesh-bench: skipping the mooncake workload (no trace): {TRACE_HINT}");
    }
    let command = reported_command(std::env::args().skip(1));
    let blocker = PromptBlocker::new(&args.fleet.model, args.fleet.engine.block_size())?;
    let factor = args.scale.factor(args.fleet.workers);
    for kind in &selection.workloads {
        let mut workload = match kind {
            WorkloadKind::Mooncake => args.mooncake.scaled(factor).workload()?,
            WorkloadKind::MultiTenant => args.multi_tenant.scaled(factor).workload(args.seed),
            WorkloadKind::MultiTurn => args.multi_turn.scaled(factor).workload(args.seed),
        };
        if factor != 1.0 {
            workload.description.push_str(&format!(
                "; load scaled ×{factor} from the {SIZED_FOR_WORKERS}-GPU sizing (`--scale {}`)",
                args.scale
            ));
        }
        let (rows, requests) = run_workload(&workload, &args, &blocker)?;
        if args.per_request {
            let path = args.out.join(format!("{}-requests.csv", workload.name));
            std::fs::create_dir_all(&args.out)?;
            std::fs::write(&path, requests)
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
        let context = RunContext {
            command: command.clone(),
            workload: workload.description.clone(),
            fleet: fleet_description(&args.fleet, &workload)
                + &other_routers_description(&args.fleet, &args.policies),
            workers: args.fleet.workers,
            gateways: usize::from(args.fleet.gateways),
        };
        let written = report::write(&args.out, &workload.name, &context, &rows)?;
        println!("{}", report::markdown(&workload.name, &context, &rows));
        for path in written {
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}

fn run_workload(
    workload: &Workload,
    args: &Args,
    blocker: &PromptBlocker,
) -> anyhow::Result<(Vec<Summary>, String)> {
    let style =
        ProgressStyle::with_template("{msg:40} [{bar:30}] {pos}/{len} requests, {elapsed}")?
            .progress_chars("=> ");
    let fleet_blocks = args.fleet.workers * workload.cache_blocks as usize;
    let mut rows = Vec::with_capacity(args.policies.len());
    let mut requests = report::REQUESTS_CSV_HEADER.to_owned();
    for &policy in &args.policies {
        if workload.has_token_ids() && !policy.takes_token_ids() {
            eprintln!(
                "kvmesh-bench: skipping {} on {}: its gateway refuses token-id prompts",
                policy.label(),
                workload.name
            );
            continue;
        }
        let progress = ProgressBar::new(workload.requests() as u64)
            .with_style(style.clone())
            .with_message(format!("{} / {}", workload.name, policy.label()));
        let run = run_policy(workload, policy, &args.fleet, &progress)
            .with_context(|| format!("{} under {}", workload.name, policy.label()))?;
        progress.finish();
        let prompts = blocker.blocked_run(&run)?;
        let bound = hit_rate_bound(&prompts, blocker.block_size(), fleet_blocks);
        let speedup = args.fleet.speedup(workload);
        requests.push_str(&report::request_rows(&run, &prompts, speedup));
        rows.push(Summary::new(&run, speedup, bound));
    }
    Ok((rows, requests))
}

fn fleet_description(fleet: &FleetParams, workload: &Workload) -> String {
    if fleet.engine == WorkerEngine::Vllm {
        let block_size = WorkerEngine::Vllm.block_size();
        let tokens = workload.cache_blocks * WorkerEngine::Sim.block_size();
        return format!(
            "{} real vLLM 0.32 CPU engines (tiny random-weight Qwen3: 2 layers, hidden 128), {} KV blocks of {block_size} tokens each, --speedup {}, {}, one nats-server, all on one shared 2-core machine; every policy on a fresh fleet",
            fleet.workers,
            tokens / block_size,
            fleet.speedup(workload),
            gateways_description(fleet),
        );
    }
    let ranks = match fleet.data_parallel_size {
        1 => String::new(),
        n => format!(
            " as {} engines of {n} data-parallel ranks each (one address per engine)",
            fleet.workers / usize::from(n)
        ),
    };
    format!(
        "{} simulated GPUs{ranks} (precise + P/D: {} prefill{} + {} decode), 8B-on-H100 timing model{}, {} KV blocks of {} tokens each, --speedup {}, relays scraping load every {} ms, {}, one nats-server{}; every policy on a fresh fleet{}",
        fleet.workers,
        fleet.prefill_workers,
        if fleet.dedicated_prefill {
            ""
        } else {
            " that also serve whole requests (`shared_workers`)"
        },
        fleet.workers.saturating_sub(fleet.prefill_workers),
        if workload.sim_args.is_empty() {
            String::new()
        } else {
            format!(" with {}", workload.sim_args.join(" "))
        },
        workload.cache_blocks,
        WorkerEngine::Sim.block_size(),
        fleet.speedup(workload),
        fleet.relay_load_interval().as_millis(),
        gateways_description(fleet),
        match fleet.sim_hosting() {
            SimHosting::ProcessPerWorker => "",
            SimHosting::OneProcess => ", all sim-engines in one process (a relay each)",
        },
        if fleet.sim_args.is_empty() {
            String::new()
        } else {
            format!("; sim-engine {}", fleet.sim_args.join(" "))
        }
    )
}

/// How the routers that are not Envoy sit in front of the same fleet.
fn other_routers_description(fleet: &FleetParams, policies: &[Policy]) -> String {
    let mut routers = String::new();
    if policies.contains(&Policy::SglangCacheAware) {
        routers.push_str("; SGLang's router (PyPI `sglang-router`, one per gateway, each balancing what it sent) routes in place of the Envoys");
    }
    if policies.contains(&Policy::DynamoKv) {
        let weight = fleet
            .dynamo_overlap_score_weight
            .map_or("its default weights".to_owned(), |w| {
                format!("overlap score weight {w}")
            });
        routers.push_str(&format!("; Dynamo's KV router (PyPI `ai-dynamo`'s selection service, one replica per gateway sharing the load they book, on the engines' KV events, {weight}) picks each request's worker and the client sends it there"));
    }
    routers
}

fn gateways_description(fleet: &FleetParams) -> String {
    let threads = fleet.gateway_threads;
    match fleet.gateways {
        1 => format!("one gateway (Envoy with {threads} worker threads and its kv-sidecar)"),
        n => format!(
            "{n} gateways (each Envoy with {threads} worker threads and its own kv-sidecar; the client sends requests to them in turn)"
        ),
    }
}

/// The command line the result files name: `scripts/bench` and the
/// arguments, the trace by its [`trace_name`].
fn reported_command(arguments: impl Iterator<Item = String>) -> String {
    let mut words = vec!["scripts/bench".to_owned()];
    let mut trace_follows = false;
    for argument in arguments {
        let is_trace_flag = argument == "--trace";
        let word = if trace_follows {
            trace_name(Path::new(&argument))
        } else if let Some(path) = argument.strip_prefix("--trace=") {
            format!("--trace={}", trace_name(Path::new(path)))
        } else {
            argument
        };
        trace_follows = is_trace_flag;
        words.push(word);
    }
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use WorkloadKind::{Mooncake, MultiTenant, MultiTurn};

    #[test]
    fn the_default_workloads_leave_mooncake_out_without_a_trace() {
        assert_eq!(
            select_workloads(None, true).unwrap(),
            Selection {
                workloads: vec![Mooncake, MultiTenant, MultiTurn],
                mooncake_skipped: false
            }
        );
        assert_eq!(
            select_workloads(None, false).unwrap(),
            Selection {
                workloads: vec![MultiTenant, MultiTurn],
                mooncake_skipped: true
            }
        );
    }

    #[test]
    fn asking_for_mooncake_without_a_trace_is_an_error() {
        let error = select_workloads(Some(&[MultiTurn, Mooncake]), false).unwrap_err();
        assert!(error.to_string().contains("--trace FILE"), "{error}");
        assert_eq!(
            select_workloads(Some(&[MultiTurn, Mooncake]), true)
                .unwrap()
                .workloads,
            [MultiTurn, Mooncake]
        );
        assert_eq!(
            select_workloads(Some(&[MultiTenant]), false).unwrap(),
            Selection {
                workloads: vec![MultiTenant],
                mooncake_skipped: false
            }
        );
    }

    #[test]
    fn a_lag_limit_needs_a_dedicated_prefill_pool() {
        let error =
            Args::try_parse_from(["kvmesh-bench", "--max-prefill-lag-tokens", "4096"]).unwrap_err();
        assert!(error.to_string().contains("--dedicated-prefill"), "{error}");
        let args = Args::try_parse_from([
            "kvmesh-bench",
            "--dedicated-prefill",
            "--max-prefill-lag-tokens",
            "4096",
        ])
        .unwrap();
        assert_eq!(args.fleet.max_prefill_lag_tokens, Some(4096));
    }

    #[test]
    fn the_reported_command_names_the_trace_by_its_file_name() {
        let arguments = [
            "--trace",
            "/data/traces/t.jsonl",
            "--trace=../x/u.jsonl",
            "--out",
            "/tmp/o",
        ];
        assert_eq!(
            reported_command(arguments.iter().map(|a| a.to_string())),
            "scripts/bench --trace t.jsonl --trace=u.jsonl --out /tmp/o"
        );
    }
}
