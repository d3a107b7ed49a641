//! Chat templating shared by sim-engine (which renders like the engine) and
//! `kv-sidecar serve` (which must tokenize exactly what the engine will see):
//! one implementation, so the two can never drift apart.

mod messages;
mod template;

pub use messages::{flatten_message, MessageError};
pub use template::{ChatTemplate, ChatTemplateError, FALLBACK_TEMPLATE};
