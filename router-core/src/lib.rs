//! Routing logic that must behave identically inside the Envoy wasm VM (32-bit
//! `usize`) and in the native sidecar: block hashing, request parsing and the
//! routing decision. No I/O.

pub mod fleet;
pub mod gateway;
pub mod hashing;
pub mod index;
pub mod openai_error;
pub mod protocol;
pub mod request;
pub mod routing;
pub mod state_stream;
pub mod target;

pub use hashing::{BlockHasher, BlockSize, HashSeed, LocalBlockHash, SeqHash};
pub use target::Target;
