// Runs a wasm32-wasip1 command module (a `cargo test` binary) under Node's
// WASI, so router-core's tests also run with a 32-bit usize as in Envoy.
// Used as CARGO_TARGET_WASM32_WASIP1_RUNNER by scripts/test, and to run the
// criterion benches inside V8 (the engine Envoy embeds):
//   CARGO_TARGET_WASM32_WASIP1_RUNNER="node --no-warnings scripts/wasi-run.mjs" \
//     cargo bench --target wasm32-wasip1 -p kvmesh-router-core
import { readFile } from "node:fs/promises";
import { argv, cwd, env, exit } from "node:process";
import { WASI } from "node:wasi";

const [, , module, ...args] = argv;
if (!module) {
  console.error("usage: node wasi-run.mjs MODULE.wasm [ARGS...]");
  exit(2);
}
// The working directory is preopened so criterion can keep its reports.
const wasi = new WASI({
  version: "preview1",
  args: [module, ...args],
  env,
  preopens: { ".": cwd() },
  returnOnExit: true,
});
const compiled = await WebAssembly.compile(await readFile(module));
const instance = await WebAssembly.instantiate(compiled, wasi.getImportObject());
exit(wasi.start(instance));
