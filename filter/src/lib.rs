//! kvmesh proxy-wasm filter: picks the GPU worker for each OpenAI inference
//! request inside Envoy and tells Envoy's `override_host` load balancer through
//! the `x-gateway-destination-endpoint` header.
//!
//! Request-path code never panics: a trapped VM would hand every stream on its
//! worker thread to the failure policy. Host calls go through [`host`], which
//! returns errors where the SDK would panic.

#[cfg(target_arch = "wasm32")]
mod allocator;
pub mod config;
pub mod disagg;
mod host;
mod metrics;
pub mod orca;
pub mod replica;
mod reporter;
mod root;
mod stream;
mod vm_state;

/// Grows the VM's memory in large steps (see `allocator`).
#[cfg(target_arch = "wasm32")]
#[global_allocator]
static ALLOCATOR: allocator::GrowInSteps = allocator::GrowInSteps;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(root::KvmeshRoot::new(context_id))
    });
}}
