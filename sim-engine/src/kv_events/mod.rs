//! KV events in vLLM's wire format: pure encoding, and the ZMQ publisher with
//! its replay socket.

pub mod encoding;
pub mod publisher;
