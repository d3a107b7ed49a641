//! `kv-sidecar`: the kvmesh sidecar binary.

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(name = "kv-sidecar", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Beside an engine: relay its KV events and load to NATS.
    Relay(Box<kv_sidecar::relay::args::RelayArgs>),
    /// Beside Envoy: fleet state from NATS, streamed into the filter.
    Serve(kv_sidecar::serve::ConfigArgs),
    /// Validate a kvmesh.yaml: prints OK or every problem, exits non-zero on error.
    CheckConfig(kv_sidecar::serve::ConfigArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    match Cli::parse().command {
        Command::Relay(args) => kv_sidecar::relay::run(*args).await,
        Command::Serve(args) => kv_sidecar::serve::run(args).await,
        Command::CheckConfig(args) => match kv_sidecar::serve::check_config(&args) {
            Ok(()) => {
                println!("OK");
                Ok(())
            }
            Err(error) => {
                eprintln!("{error}");
                std::process::exit(1);
            }
        },
    }
}
