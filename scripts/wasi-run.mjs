// Runs a wasm32-wasip1 command module (a `cargo test` binary) under Node's
// WASI, so router-core's tests also run with a 32-bit usize as in Envoy.
// Used as CARGO_TARGET_WASM32_WASIP1_RUNNER by scripts/test, and to run the
// criterion benches inside V8 (the engine Envoy embeds):
//   CARGO_TARGET_WASM32_WASIP1_RUNNER="node --no-warnings scripts/wasi-run.mjs" \
//     cargo bench --target wasm32-wasip1 -p kvmesh-router-core
// The filter's benches link the proxy-wasm ABI imports (module "env") without
// calling them; each is stubbed to throw if it ever is.
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
const imports = wasi.getImportObject();
for (const { module: from, name, kind } of WebAssembly.Module.imports(compiled)) {
  if (from === "env" && kind === "function") {
    imports.env ??= {};
    imports.env[name] = () => {
      throw new Error(`host function ${name} is not available outside Envoy`);
    };
  }
}
const instance = await WebAssembly.instantiate(compiled, imports);
// A proxy-wasm crate also exports `_initialize` (the plugin's entry point);
// a command module is started through `_start` alone.
exit(wasi.start({ exports: { ...instance.exports, _initialize: undefined } }));
