//! Generates the `kvmesh.v1.StateStream` gRPC server and client from
//! `proto/kvmesh/v1/state_stream_service.proto` (workspace root): protox
//! parses it (pure Rust, no `protoc`), tonic-prost-build writes the service.
//! The messages are router-core's, generated there from the same files.

use std::error::Error;
use std::path::Path;

const SERVICE: &str = "kvmesh/v1/state_stream_service.proto";

fn main() -> Result<(), Box<dyn Error>> {
    // Read when the script runs, not baked in when it is compiled: cargo
    // reuses a compiled build script across checkouts sharing a target dir.
    let manifest_dir =
        std::env::var_os("CARGO_MANIFEST_DIR").ok_or("CARGO_MANIFEST_DIR is not set")?;
    let proto_dir = Path::new(&manifest_dir).join("../proto");
    println!("cargo:rerun-if-changed={}", proto_dir.display());
    let mut fds = protox::compile([SERVICE], [&proto_dir])?;
    // Only the service file: the imported ones hold the messages, which would
    // otherwise be generated a second time here.
    fds.file.retain(|file| file.name() == SERVICE);
    tonic_prost_build::configure()
        .extern_path(
            ".kvmesh.v1.GatewayReport",
            "::router_core::gateway::GatewayReport",
        )
        .extern_path(
            ".kvmesh.v1.StateUpdate",
            "::router_core::state_stream::StateUpdate",
        )
        .compile_fds(fds)?;
    Ok(())
}
