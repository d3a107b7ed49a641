//! `scripts/bench-cost-curves`: what kvmesh's fleet state costs at 4, 16, 64
//! and 256 workers (docs/benchmarks.md#cost-curves). Each size runs on
//! fresh processes — nats-server, `kv-sidecar serve`, Envoy with the filter —
//! fed by synthetic workers publishing as relays do, one size after another.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use kvmesh_stack::cost_curves::report;
use kvmesh_stack::cost_curves::run::{measure, CurveParams};

#[derive(Debug, Parser)]
#[command(
    name = "kvmesh-cost-curves",
    about = "Sidecar CPU, state-stream bytes, filter memory, snapshot and callback times by fleet size"
)]
struct Args {
    /// Fleet sizes, measured one after another.
    #[arg(long, value_delimiter = ',', default_values_t = [4, 16, 64, 256])]
    workers: Vec<usize>,
    #[command(flatten)]
    params: CurveParams,
    /// Where `cost-curves.md` and `cost-curves.csv` go.
    #[arg(long, default_value = "docs/benchmarks")]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let command = std::iter::once("scripts/bench-cost-curves".to_owned())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let mut rows = Vec::with_capacity(args.workers.len());
    for &workers in &args.workers {
        let mut progress = |step: &str| eprintln!("{workers} workers: {step}");
        let row = measure(workers, &args.params, &mut progress)
            .with_context(|| format!("measuring {workers} workers"))?;
        rows.push(row);
    }
    let markdown = report::markdown(&command, &rows);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    for (name, text) in [
        ("cost-curves.md", markdown.clone()),
        ("cost-curves.csv", report::csv(&rows)),
    ] {
        let path = args.out.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    println!("{markdown}");
    Ok(())
}
