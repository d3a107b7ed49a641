//! Generates the wire messages from `proto/kvmesh/v1/*.proto` (workspace
//! root) into `OUT_DIR`: protox parses the files (pure Rust, so no `protoc`
//! on any build machine), prost-build writes the code. The build script runs
//! on the host, so this works for the wasm32 filter build too.
//!
//! Each file's code is included by its own module. A type one file takes from
//! another (`WorkerRole` in the state stream) is declared `extern_path` to the
//! other file's module, so every type exists once.

use std::error::Error;
use std::path::{Path, PathBuf};

use prost_types::FileDescriptorProto;

/// Each `.proto` file, the module including its code, and the `OUT_DIR`
/// subdirectory the code is written to (prost-build names its output after
/// the package, which all files share).
const FILES: [(&str, &str, &str); 3] = [
    ("kvmesh/v1/relay.proto", "crate::protocol", "protocol"),
    (
        "kvmesh/v1/state_stream.proto",
        "crate::state_stream",
        "state_stream",
    ),
    ("kvmesh/v1/gateway.proto", "crate::gateway", "gateway"),
];

fn main() -> Result<(), Box<dyn Error>> {
    // Read when the script runs, not baked in when it is compiled: cargo
    // reuses a compiled build script across checkouts sharing a target dir.
    let manifest_dir =
        std::env::var_os("CARGO_MANIFEST_DIR").ok_or("CARGO_MANIFEST_DIR is not set")?;
    let proto_dir = Path::new(&manifest_dir).join("../proto");
    println!("cargo:rerun-if-changed={}", proto_dir.display());
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    let fds = protox::compile(FILES.map(|(file, ..)| file), [&proto_dir])?;
    for (file, _, subdir) in FILES {
        let mut config = prost_build::Config::new();
        for other in fds.file.iter().filter(|other| other.name() != file) {
            let module = FILES
                .iter()
                .find(|(name, ..)| *name == other.name())
                .map(|(_, module, _)| *module)
                .ok_or_else(|| format!("{} is not in router-core's FILES", other.name()))?;
            for name in top_level_types(other) {
                config.extern_path(
                    format!(".{}.{name}", other.package()),
                    format!("{module}::{name}"),
                );
            }
        }
        let dir = out_dir.join(subdir);
        std::fs::create_dir_all(&dir)?;
        config.out_dir(&dir).compile_fds(fds.clone())?;
    }
    Ok(())
}

/// Messages and enums declared at the top of `file` (the proto names are
/// already the Rust names: upper camel case).
fn top_level_types(file: &FileDescriptorProto) -> impl Iterator<Item = &str> {
    let messages = file.message_type.iter().map(|m| m.name());
    let enums = file.enum_type.iter().map(|e| e.name());
    messages.chain(enums)
}
