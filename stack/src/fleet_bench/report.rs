//! Results of one workload: a markdown table, a CSV and two SVG plots.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::fleet_bench::bound::BlockedPrompt;
use crate::fleet_bench::run::PolicyRun;
use crate::fleet_bench::summary::{Summary, PROMPT_CLASSES};

/// How the results came about, printed above the table.
#[derive(Debug, Clone)]
pub struct RunContext {
    pub command: String,
    pub workload: String,
    pub fleet: String,
    /// Simulated GPUs (prefill plus decode for P/D).
    pub workers: usize,
    pub gateways: usize,
}

impl RunContext {
    /// "16 workers, 2 gateways", for every table's caption.
    fn size(&self) -> String {
        let plural = |n: usize| if n == 1 { "" } else { "s" };
        format!(
            "{} worker{}, {} gateway{}",
            self.workers,
            plural(self.workers),
            self.gateways,
            plural(self.gateways)
        )
    }
}

/// The results table in markdown, with its context.
pub fn markdown(name: &str, context: &RunContext, rows: &[Summary]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "### Fleet benchmark: {name}, {}\n", context.size());
    let _ = writeln!(out, "- Command: `{}`", context.command);
    let _ = writeln!(out, "- Workload: {}", context.workload);
    let _ = writeln!(out, "- Fleet: {}", context.fleet);
    if let Some(first) = rows.first() {
        let _ = writeln!(
            out,
            "- Best achievable hit rate: {:.1}% with the fleet's KV memory pooled as one LRU cache; {:.1}% if every block seen before were still cached. The free-memory bound is the pooled cache less the blocks each policy's running requests held at each arrival (per policy: it follows the run's timing)",
            first.bound.pooled_lru * 100.0,
            first.bound.seen_before * 100.0
        );
    }
    let _ = writeln!(
        out,
        "- Latencies in simulated ms (client-side real time × speedup); ITL is each request's mean time between tokens; throughput in output tokens per simulated second.\n- Hit rate: cached ÷ prompt tokens from each request's usage report (first admission, as the bound counts it; for P/D the prefill pool's counters); engine counters: `vllm:prefix_cache_hits/queries`, which count a preempted request again at re-admission.\n"
    );
    let _ = writeln!(
        out,
        "| policy | TTFT p50 | TTFT p90 | TTFT p99 | ITL p50 | ITL p99 | e2e p50 | e2e p99 | output tok/s | hit rate | of pooled bound | of free-memory bound | engine counters | preemptions | requests | errors | kvmesh modes (precise/approx/fallback) | remote prefills (done/failed) |"
    );
    let _ = writeln!(
        out,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for row in rows {
        let share_of = |bound: f64| {
            if bound > 0.0 {
                format!("{:.0}%", row.comparable_hit_rate() / bound * 100.0)
            } else {
                "–".to_owned()
            }
        };
        let modes = row
            .modes
            .map_or_else(|| "–".to_owned(), |[p, a, f]| format!("{p}/{a}/{f}"));
        let remote = row.remote_prefills.map_or_else(
            || "–".to_owned(),
            |[done, failed]| format!("{done}/{failed}"),
        );
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {:.0} | {:.0} | {:.0} | {:.1}% | {} | {} | {:.1}% | {} | {} | {} | {} | {} |",
            row.policy, row.ttft_p50, row.ttft_p90, row.ttft_p99, row.itl_p50, row.itl_p99,
            row.e2e_p50, row.e2e_p99, row.output_tokens_per_s,
            row.comparable_hit_rate() * 100.0, share_of(row.bound.pooled_lru),
            share_of(row.bound.pooled_free), row.hit_rate * 100.0,
            row.preemptions, row.requests, row.errors, modes, remote
        );
    }
    prompt_length_table(&mut out, context, rows);
    pacing_table(&mut out, context, rows);
    out
}

/// TTFT p50/p90/p99 of each policy by prompt length.
fn prompt_length_table(out: &mut String, context: &RunContext, rows: &[Summary]) {
    let _ = writeln!(
        out,
        "\nTTFT by prompt length, {} (simulated ms, p50 / p90 / p99, requests):\n",
        context.size()
    );
    let classes: Vec<&str> = PROMPT_CLASSES.iter().map(|(name, _)| *name).collect();
    let _ = writeln!(out, "| policy | {} |", classes.join(" | "));
    let _ = writeln!(out, "|---|{}", "---|".repeat(classes.len()));
    for row in rows {
        let cells: Vec<String> = row
            .ttft_by_prompt
            .iter()
            .map(|c| match c.requests {
                0 => "–".to_owned(),
                n => format!("{:.0} / {:.0} / {:.0} ({n})", c.p50, c.p90, c.p99),
            })
            .collect();
        let _ = writeln!(out, "| {} | {} |", row.policy, cells.join(" | "));
    }
}

/// Whether the machine kept up: how late arrivals left the client, how busy
/// the cores were, how the client spread requests over the gateways.
fn pacing_table(out: &mut String, context: &RunContext, rows: &[Summary]) {
    let _ = writeln!(
        out,
        "\nClient pacing and machine load, {}: arrivals sent after their schedule (real ms; more than a few ms means the client or the machine could not keep the open-loop schedule), share of all cores' time busy during the replay and the part the bench and its fleet used (the rest is other work on the machine), requests per gateway:\n",
        context.size()
    );
    let _ = writeln!(
        out,
        "| policy | sent late p50 | sent late p99 | sent late max | CPU busy | of it the bench | requests by gateway |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    let percent =
        |share: Option<f64>| share.map_or_else(|| "–".to_owned(), |s| format!("{:.0}%", s * 100.0));
    for row in rows {
        let [p50, p99, max] = row.late_ms;
        let spread: Vec<String> = row.by_gateway.iter().map(usize::to_string).collect();
        let _ = writeln!(
            out,
            "| {} | {p50:.1} | {p99:.1} | {max:.1} | {} | {} | {} |",
            row.policy,
            percent(row.cpu.map(|c| c.machine)),
            percent(row.cpu.map(|c| c.bench)),
            spread.join(" / ")
        );
    }
}

/// The same rows as CSV (milliseconds, rates as fractions).
pub fn csv(context: &RunContext, rows: &[Summary]) -> String {
    let mut out = String::from(
        "policy,ttft_p50_ms,ttft_p90_ms,ttft_p99_ms,itl_p50_ms,itl_p99_ms,e2e_p50_ms,e2e_p99_ms,output_tokens_per_s,hit_rate,request_hit_rate,bound_pooled_lru,bound_pooled_free,bound_seen_before,preemptions,requests,errors,workers,gateways,sent_late_p99_ms,sent_late_max_ms,cpu_busy,cpu_bench,remote_prefills,prefill_failures\n",
    );
    for row in rows {
        let _ = writeln!(
            out,
            "{},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.5},{},{:.5},{:.5},{:.5},{},{},{},{},{},{:.3},{:.3},{},{},{},{}",
            row.slug,
            row.ttft_p50,
            row.ttft_p90,
            row.ttft_p99,
            row.itl_p50,
            row.itl_p99,
            row.e2e_p50,
            row.e2e_p99,
            row.output_tokens_per_s,
            row.hit_rate,
            row.request_hit_rate
                .map_or_else(String::new, |r| format!("{r:.5}")),
            row.bound.pooled_lru,
            row.bound.pooled_free,
            row.bound.seen_before,
            row.preemptions,
            row.requests,
            row.errors,
            context.workers,
            context.gateways,
            row.late_ms[1],
            row.late_ms[2],
            csv_share(row.cpu.map(|c| c.machine)),
            csv_share(row.cpu.map(|c| c.bench)),
            csv_count(row.remote_prefills.map(|[done, _]| done)),
            csv_count(row.remote_prefills.map(|[_, failed]| failed))
        );
    }
    out
}

/// A count as a CSV field; empty when it does not apply.
fn csv_count(count: Option<u64>) -> String {
    count.map_or_else(String::new, |c| c.to_string())
}

/// A share as a CSV fraction; empty when unknown.
fn csv_share(share: Option<f64>) -> String {
    share.map_or_else(String::new, |s| format!("{s:.3}"))
}

/// Header of the per-request CSV (`kvmesh-bench --per-request`).
pub const REQUESTS_CSV_HEADER: &str = "policy,sent_ms,gateway,worker,prompt_tokens,cached_tokens,\
routed_cached_blocks,most_cached_blocks,prefill_worker,first_block,ttft_ms,e2e_ms,error\n";

/// One CSV line per request of `run` (times in simulated ms; `first_block`
/// is the hash of the prompt's first KV block, which names its prefix;
/// `routed_cached_blocks` and `most_cached_blocks` are the prompt's blocks
/// the router saw cached on the chosen worker and on the candidate holding
/// the most, empty for the plain Envoy policies; `prefill_worker` is the
/// worker that prefilled the prompt for `worker` as the debug header names
/// it (address, `#rank` for a data-parallel rank), empty when `worker`
/// computed it).
pub fn request_rows(run: &PolicyRun, prompts: &[BlockedPrompt], speedup: f64) -> String {
    let ms = speedup * 1e3;
    let mut out = String::new();
    for (record, prompt) in run.records.iter().zip(prompts) {
        let first_block = prompt
            .block_hashes
            .first()
            .map_or_else(String::new, |h| format!("{h:016x}"));
        let (worker, cached, routed, prefill_worker, ttft, e2e, error) = match &record.outcome {
            Ok(streamed) => (
                streamed.worker.clone().unwrap_or_default(),
                streamed
                    .usage
                    .map_or_else(String::new, |u| u.cached_tokens.to_string()),
                streamed.routed.map_or_else(
                    || ",".to_owned(),
                    |r| format!("{},{}", r.cached_blocks, r.most_cached_blocks),
                ),
                streamed.prefill_worker.clone().unwrap_or_default(),
                streamed
                    .ttft()
                    .map_or_else(String::new, |t| format!("{:.3}", t * ms)),
                format!("{:.3}", streamed.total * ms),
                String::new(),
            ),
            Err(e) => (
                String::new(),
                String::new(),
                ",".to_owned(),
                String::new(),
                String::new(),
                String::new(),
                csv_field(e),
            ),
        };
        let _ = writeln!(
            out,
            "{},{:.3},{},{worker},{},{cached},{routed},{prefill_worker},{first_block},{ttft},{e2e},{error}",
            run.policy.slug(),
            record.sent_at * ms,
            record.gateway,
            prompt.tokens,
        );
    }
    out
}

/// Quotes a free-text CSV field.
fn csv_field(text: &str) -> String {
    format!("\"{}\"", text.replace('"', "\"\"").replace('\n', " "))
}

/// Writes `<name>.md`, `<name>.csv`, `<name>-ttft-cdf.svg` and
/// `<name>-hit-rate.svg` into `dir`; returns their paths.
pub fn write(
    dir: &Path,
    name: &str,
    context: &RunContext,
    rows: &[Summary],
) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let md = dir.join(format!("{name}.md"));
    let csv_path = dir.join(format!("{name}.csv"));
    let cdf = dir.join(format!("{name}-ttft-cdf.svg"));
    let hits = dir.join(format!("{name}-hit-rate.svg"));
    std::fs::write(&md, markdown(name, context, rows))
        .with_context(|| format!("writing {}", md.display()))?;
    std::fs::write(&csv_path, csv(context, rows))
        .with_context(|| format!("writing {}", csv_path.display()))?;
    ttft_cdf(&cdf, name, rows).with_context(|| format!("plotting {}", cdf.display()))?;
    hit_rates(&hits, name, rows).with_context(|| format!("plotting {}", hits.display()))?;
    Ok(vec![md, csv_path, cdf, hits])
}

fn ttft_cdf(path: &Path, name: &str, rows: &[Summary]) -> anyhow::Result<()> {
    // The slowest 1% would squeeze everything else into one corner.
    let x_max = rows.iter().map(|r| r.ttft_p99).fold(1.0_f64, f64::max) * 1.05;
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{name}: time to first token"), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..x_max, 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc("TTFT (simulated ms)")
        .y_desc("fraction of requests")
        .draw()?;
    for (index, row) in rows.iter().enumerate() {
        let color = Palette99::pick(index).to_rgba();
        let n = row.ttfts.len().max(1) as f64;
        let points = row
            .ttfts
            .iter()
            .enumerate()
            .map(|(i, &t)| (t.min(x_max), (i + 1) as f64 / n));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(row.policy)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    finish(&root, &mut chart, SeriesLabelPosition::LowerRight)
}

/// Draws the legend at `position` and writes the file.
fn finish<'a>(
    root: &DrawingArea<SVGBackend<'a>, Shift>,
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    position: SeriesLabelPosition,
) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .draw()?;
    root.present()?;
    Ok(())
}

fn hit_rates(path: &Path, name: &str, rows: &[Summary]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let n = rows.len().max(1);
    let labels: Vec<&str> = rows.iter().map(|r| r.policy).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{name}: prefix cache hit rate"), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..n as f64, 0.0..100.0)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&|x| {
            let slot = x - x.floor();
            if (slot - 0.5).abs() < 1e-6 {
                labels
                    .get(x.floor() as usize)
                    .map_or_else(String::new, |l| (*l).to_owned())
            } else {
                String::new()
            }
        })
        .y_desc("cached prompt tokens (%)")
        .draw()?;
    chart.draw_series(rows.iter().enumerate().map(|(i, row)| {
        Rectangle::new(
            [
                (i as f64 + 0.15, 0.0),
                (i as f64 + 0.85, row.comparable_hit_rate() * 100.0),
            ],
            Palette99::pick(i).filled(),
        )
    }))?;
    if let Some(first) = rows.first() {
        for (value, label, color) in [
            (
                first.bound.pooled_lru,
                "bound: fleet memory pooled (LRU)",
                BLACK,
            ),
            (
                first.bound.seen_before,
                "bound: every block seen before",
                RED,
            ),
        ] {
            let y = value * 100.0;
            chart
                .draw_series(LineSeries::new(
                    [(0.0, y), (n as f64, y)],
                    color.stroke_width(2),
                ))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
    }
    finish(&root, &mut chart, SeriesLabelPosition::UpperRight)
}
