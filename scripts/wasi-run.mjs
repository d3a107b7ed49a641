// Runs a wasm32-wasip1 command module (a `cargo test` binary) under Node's
// WASI, so router-core's tests also run with a 32-bit usize as in Envoy.
// Used as CARGO_TARGET_WASM32_WASIP1_RUNNER by scripts/test.
import { readFile } from "node:fs/promises";
import { argv, env, exit } from "node:process";
import { WASI } from "node:wasi";

const [, , module, ...args] = argv;
if (!module) {
  console.error("usage: node wasi-run.mjs MODULE.wasm [ARGS...]");
  exit(2);
}
const wasi = new WASI({ version: "preview1", args: [module, ...args], env, returnOnExit: true });
const compiled = await WebAssembly.compile(await readFile(module));
const instance = await WebAssembly.instantiate(compiled, wasi.getImportObject());
exit(wasi.start(instance));
