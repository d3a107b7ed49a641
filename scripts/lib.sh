# Sourced by the scripts that run a kvmesh binary: where the repository and
# the build output are, and setup with what the arguments need.
# shellcheck shell=bash

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Cargo resolves a relative CARGO_TARGET_DIR against the directory it runs
# in, and scripts/setup builds from the repository root.
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
case "$TARGET_DIR" in
  /*) ;;
  *) TARGET_DIR="$ROOT/$TARGET_DIR" ;;
esac

# Runs scripts/setup (output on stderr, so stdout carries only the binary's),
# with --with-vllm when the arguments ask for `--engine vllm`.
run_setup() {
  local setup_args=() previous="" arg
  for arg in "$@"; do
    if [ "$arg" = "--engine=vllm" ] || { [ "$previous" = "--engine" ] && [ "$arg" = "vllm" ]; }; then
      setup_args=(--with-vllm)
    fi
    previous="$arg"
  done
  # (The `+` form: bash before 4.4 calls an empty array unbound.)
  "$ROOT/scripts/setup" ${setup_args[@]+"${setup_args[@]}"} >&2
}
