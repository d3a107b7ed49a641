//! TensorRT-LLM JSON event bodies: decoding must never panic.
#![no_main]

use kv_sidecar::decode::trtllm::decode_events;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_events(data, 16);
});
